"""Pictures of the tile plan: :func:`plot_plan` (``tilerseg info IMAGE --plot``) and one
tile up close, :func:`plot_tile` (the geometry figure of the documentation).

Both use the engine's own plan (:func:`tilerseg.engine.prepare.prepare`, the one a run
would use) and draw it over the image, extended by mirroring where the read windows
reach past its border.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError
from . import draw, sampling

__all__ = ["plot_plan", "plot_tile", "save_plan", "check_plot_path", "GRID_COLOR",
           "MIRROR_TINT", "WINDOW_COLORS"]

GRID_COLOR = (255, 255, 0)
"""Colour of the write regions' borders (pure yellow)."""

MIRROR_TINT = (40, 90, 200)
"""Tint of the mirrored border (the parts of read windows outside the image)."""

WINDOW_COLORS = ((255, 64, 64), (64, 255, 255), (255, 128, 255), (128, 255, 64))
"""Colours of the read windows drawn."""

SMALLEST_PLAN = 64
"""The smallest plan picture (px, longest side)."""


def _check_size(size: Any, name: str) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) \
            or size < SMALLEST_PLAN:
        raise InvalidArgumentError(f"{name} must be an integer >= {SMALLEST_PLAN} (pixels)")


def _prepared(image: Any, model: Any, tile: Any, level: int, channel: Any, device: str) -> Any:
    from ..engine.options import run_options
    from ..engine.prepare import prepare

    return prepare(image, model, run_options(tile=tile, device=device, normalize="none",
                                             level=level, channel=channel))


def _low_resolution(p: Any, scale: float, z: int | None) -> tuple[np.ndarray, int, int]:
    """The image at about ``scale`` of the run's level, as RGB: (picture, level, stride).

    Reads the coarsest pyramid level that is at least that fine, strided if even that is
    more than twice finer than needed.
    """
    s = p.source
    axes = s.axes
    y, x = axes.index("Y"), axes.index("X")
    levels = s.levels or (s.shape,)
    arrays = list(s.level_data) or [s.data]
    base = levels[s.level]
    j, stride = sampling.level_and_stride(levels, s.level, y, 1.0 / scale)
    shape = levels[j]
    channel = p.view.channels[0] if p.view.channels else 0
    key = sampling.image_key(axes, shape, base, z, slice(0, shape[y], stride),
                             slice(0, shape[x], stride), channel)
    return draw.grey(np.asarray(arrays[j][key])), j, stride


def _hatch(shape: Sequence[int], spacing: int = 8) -> np.ndarray:
    yy, xx = np.indices(shape[:2])
    return (yy + xx) % spacing < max(1, spacing // 4)


def _shade_halo(PIL: Any, image_pil: Any, box: Sequence[int], inner: Sequence[int],
                color: Sequence[int], opacity: int) -> Any:
    """Shade the halo of a read window (``box`` less ``inner``) in ``color`` at ``opacity``
    (0 to 255) in place; returns a new pen on ``image_pil``."""
    halo = PIL.Image.new("L", image_pil.size, 0)
    mask = PIL.ImageDraw.Draw(halo)
    mask.rectangle(box, fill=opacity)
    mask.rectangle(inner, fill=0)
    image_pil.paste(PIL.Image.new("RGB", image_pil.size, color), (0, 0), halo)
    return PIL.ImageDraw.Draw(image_pil, "RGBA")


def _tiles_to_draw(grid: Sequence[int], count: int) -> list[tuple[int, int]]:
    """The first tile, the last, one in the middle, then one beside the first."""
    gy, gx = grid
    wanted = [(0, 0), (gy - 1, gx - 1), (gy // 2, gx // 2), (0, min(1, gx - 1))]
    out: list[tuple[int, int]] = []
    for t in wanted:
        if t not in out:
            out.append(t)
    return out[:count]


def plot_plan(
    image: Any,
    model: Any,
    *,
    tile: int | Sequence[int] | None = None,
    level: int = 0,
    channel: Sequence[int] | None = None,
    device: str = "auto",
    size: int = 1024,
    windows: int = 3,
    z: int | None = None,
    legend: bool = True,
) -> np.ndarray:
    """Draw the tile plan of ``image`` over a low-resolution level of it.

    The picture covers every read window: the image, and around it the mirrored border
    (the parts of the read windows outside the image, filled by reflection when the
    model runs), shaded blue and hatched. Every tile's write region is outlined in
    yellow (every n-th border only, where the tiles would be under 4 px apart), and
    the read windows of a few tiles (the first, the last, one in the middle) are drawn
    with their halo shaded. A legend names the sizes.

    Parameters
    ----------
    image : path or array
        Anything :func:`tilerseg.segment_to_zarr` accepts.
    model : torch.nn.Module
        The model the plan is for.
    tile, level, channel, device
        As for :func:`tilerseg.segment_to_zarr` (the plan is the one a run would use).
    size : int, default 1024
        Longest side of the picture in pixels (the picture is exactly that long).
    windows : int, default 3
        How many tiles' read windows to draw (0 to 4).
    z : int, optional
        The plane of a 3D image drawn under the plan (default: the middle one).
    legend : bool, default True
        Draw the legend (top right), in smaller text where the picture is small; not
        drawn (logged) where even that does not fit.

    Returns
    -------
    numpy.ndarray of uint8, shape ``(Y, X, 3)``

    Raises
    ------
    InvalidArgumentError
        Bad ``size`` or ``windows``, Pillow missing, or what :func:`tilerseg.plan` raises.

    Examples
    --------
    >>> import numpy as np, tilerseg
    >>> from tilerseg.pictures import plot_plan
    >>> model = tilerseg.create_model("unet", depth=2, base_channels=2)
    >>> image = np.zeros((500, 300), np.uint8)
    >>> plot_plan(image, model, tile=128, size=400, device="cpu").shape
    (400, 307, 3)
    """
    PIL = draw.require_pillow()
    _check_size(size, f"size={size!r}")
    if not 0 <= windows <= 4:
        raise InvalidArgumentError(f"windows={windows!r} must be within 0 to 4")
    p = _prepared(image, model, tile, level, channel, device)
    plan, g = p.plan, p.geometry
    H, W = plan.image_shape[-2:]
    ty, tx = plan.tile[-2:]
    wy, wx = plan.window[-2:]
    hy, hx = g.halo[-2:]
    gy, gx = plan.grid[-2:]
    nd = len(plan.image_shape)
    if nd == 3:
        nz = plan.image_shape[0]
        z = nz // 2 if z is None else z
        if not 0 <= z < nz:
            raise InvalidArgumentError(f"z={z!r} is not a plane of the image (0 to {nz - 1})")
    # the canvas: every read window, in image coordinates
    top, left = -hy, -hx
    bottom, right = (gy - 1) * ty - hy + wy, (gx - 1) * tx - hx + wx
    extent = (bottom - top, right - left)
    scale = size / max(extent)
    shape = tuple(max(1, int(round(n * scale))) for n in extent)
    low, j, stride = _low_resolution(p, scale, z)
    # mirror the low-resolution image as the engine mirrors the full one, then fit it
    r = (low.shape[0] / H, low.shape[1] / W)
    pads = [(int(round(hy * r[0])), max(0, int(round((bottom - H) * r[0])))),
            (int(round(hx * r[1])), max(0, int(round((right - W) * r[1])))), (0, 0)]
    mode = "reflect" if min(low.shape[:2]) > 1 else "edge"
    padded = np.pad(low, pads, mode=mode)
    picture = draw.resize(padded, shape)

    def py(v: float) -> int:
        return int(round((v - top) * scale))

    def px(v: float) -> int:
        return int(round((v - left) * scale))

    outside = np.ones(shape, dtype=bool)
    outside[py(0):py(H), px(0):px(W)] = False
    picture = draw.blend(picture, np.array(MIRROR_TINT), np.where(outside, 0.35, 0.0))
    picture[outside & _hatch(shape, 12)] = MIRROR_TINT
    image_pil = PIL.Image.fromarray(picture)
    pen = PIL.ImageDraw.Draw(image_pil, "RGBA")
    line = max(1, size // 700)
    every = max(1, math.ceil(4 / (min(ty, tx) * scale)))
    for k in range(0, gy + 1, every):
        v = py(min(k * ty, H))
        pen.line([(px(0), v), (px(W) - 1, v)], fill=GRID_COLOR, width=line)
    for k in range(0, gx + 1, every):
        v = px(min(k * tx, W))
        pen.line([(v, py(0)), (v, py(H) - 1)], fill=GRID_COLOR, width=line)
    if every > 1:  # the image border is always drawn
        pen.line([(px(0), py(H) - 1), (px(W) - 1, py(H) - 1)], fill=GRID_COLOR, width=line)
        pen.line([(px(W) - 1, py(0)), (px(W) - 1, py(H) - 1)], fill=GRID_COLOR, width=line)
    shown = _tiles_to_draw((gy, gx), windows)
    index0 = (0,) * (nd - 2)
    for color, (iy, ix) in zip(WINDOW_COLORS, shown):
        t = plan[(*index0, iy, ix)]
        ry, rx = t.read_start[-2:]
        wr, wc = t.write[-2:]
        box = [px(rx), py(ry), px(rx + wx) - 1, py(ry + wy) - 1]
        inner = [px(wc.start), py(wr.start), px(wc.stop) - 1, py(wr.stop) - 1]
        pen = _shade_halo(PIL, image_pil, box, inner, color, 90)
        pen.rectangle(box, outline=color, width=line + 1)
        pen.rectangle(inner, outline=color, width=line)
    picture = np.asarray(image_pil)
    if legend:
        zs = f", plane {z} of {plan.image_shape[0]}" if nd == 3 else ""
        lines = [f"image {H} x {W} px{zs} (level {p.source.level}; drawn from level {j}"
                 + (f", every {stride} px" if stride > 1 else "") + ")",
                 f"write regions: {len(plan)} tile{'s' if len(plan) > 1 else ''} of {ty} x "
                 f"{tx} px ({gy} x {gx}"
                 + (f" x {plan.grid[0]}" if nd == 3 and plan.grid[0] > 1 else "") + ")"
                 + (f", every {every}th border drawn" if every > 1 else "")]
        swatches: list[Any] = [None, GRID_COLOR]
        for color, (iy, ix) in zip(WINDOW_COLORS, shown):
            lines.append(f"read window of tile ({iy}, {ix}): {wy} x {wx} px, halo {hy} px")
            swatches.append(color)
        lines.append("mirrored border (reflection of the image)")
        swatches.append(MIRROR_TINT)
        picture = draw.draw_text(picture, lines, corner="top-right", swatches=swatches)
    return picture


def plot_tile(
    image: Any,
    model: Any,
    *,
    tile: int | Sequence[int] | None = None,
    index: Sequence[int] = (0, 0),
    size: int = 800,
    margin: int | None = None,
    device: str = "cpu",
    legend: bool = True,
) -> np.ndarray:
    """Draw one tile's geometry at full resolution, scaled up: input window, halo, output
    crop, the pooling grid from its origin, and the mirrored border at the image edge.

    Parameters
    ----------
    image : path or array
        A 2D image (anything :func:`tilerseg.segment_to_zarr` accepts).
    model : torch.nn.Module
        The model (its halo and pooling step decide the geometry).
    tile : int, optional
        Output tile side (as for :func:`tilerseg.segment_to_zarr`).
    index : (int, int), default (0, 0)
        The tile (its grid position); (0, 0) reaches past the image's top-left corner.
    size : int, default 800
        Longest side of the picture.
    margin : int, optional
        Image pixels shown around the read window (default: a pooling step).
    device : str, default "cpu"
        As for :func:`tilerseg.segment_to_zarr` (decides the default tile).
    legend : bool, default True
        Draw the legend.

    Returns
    -------
    numpy.ndarray of uint8, shape ``(Y, X, 3)``

    Examples
    --------
    >>> import numpy as np, tilerseg
    >>> from tilerseg.pictures import plot_tile
    >>> model = tilerseg.create_model("unet", depth=2, base_channels=2)
    >>> plot_tile(np.zeros((300, 300), np.uint8), model, tile=64, size=300).shape[:2]
    (300, 300)
    """
    from ..geometry import reflect_indices

    PIL = draw.require_pillow()
    p = _prepared(image, model, tile, 0, None, device)
    plan, g = p.plan, p.geometry
    if len(plan.image_shape) != 2:
        raise InvalidArgumentError("plot_tile draws 2D images only")
    try:
        t = plan[tuple(int(i) for i in index)]
    except IndexError as err:
        raise InvalidArgumentError(f"index={tuple(index)} is not a tile: {err}") from None
    step = g.step
    margin = step[0] if margin is None else int(margin)
    ry, rx = t.read_start
    wy, wx = plan.window
    top, left = ry - margin, rx - margin
    extent = (wy + 2 * margin, wx + 2 * margin)
    H, W = plan.image_shape
    rows = reflect_indices(top, extent[0], H)
    cols = reflect_indices(left, extent[1], W)
    r0, c0 = int(rows.min()), int(cols.min())
    data = np.asarray(p.view[(slice(0, 1), slice(r0, int(rows.max()) + 1),
                              slice(c0, int(cols.max()) + 1))])[0]
    crop = data[np.ix_(rows - r0, cols - c0)]  # only the image the window shows is read
    scale = size / max(extent)
    shape = tuple(int(round(n * scale)) for n in extent)
    picture = draw.resize(draw.grey(crop), shape, nearest=True)

    def py(v: float) -> int:
        return int(round((v - top) * scale))

    def px(v: float) -> int:
        return int(round((v - left) * scale))

    yy, xx = np.arange(extent[0]) + top, np.arange(extent[1]) + left
    outside = ~(((yy >= 0) & (yy < H))[:, None] & ((xx >= 0) & (xx < W))[None, :])
    outside = draw.resize(outside.astype(np.uint8), shape, nearest=True).astype(bool)
    picture = draw.blend(picture, np.array(MIRROR_TINT), np.where(outside, 0.45, 0.0))
    picture[outside & _hatch(shape, 12)] = MIRROR_TINT
    image_pil = PIL.Image.fromarray(picture)
    pen = PIL.ImageDraw.Draw(image_pil, "RGBA")
    hy, hx = g.halo
    oy, ox = -hy, -hx  # the pooling grid's origin: the padded frame's first pixel
    grid_color = (255, 255, 255, 90)
    k0y = math.ceil((top - oy) / step[0])
    for k in range(k0y, k0y + extent[0] // step[0] + 2):
        pen.line([(0, py(oy + k * step[0])), (shape[1], py(oy + k * step[0]))],
                 fill=grid_color, width=1)
    k0x = math.ceil((left - ox) / step[1])
    for k in range(k0x, k0x + extent[1] // step[1] + 2):
        pen.line([(px(ox + k * step[1]), 0), (px(ox + k * step[1]), shape[0])],
                 fill=grid_color, width=1)
    halo_color, window_color, crop_color = (255, 160, 40), (255, 64, 64), GRID_COLOR
    wr, wc = t.write
    box = [px(rx), py(ry), px(rx + wx) - 1, py(ry + wy) - 1]
    inner = [px(wc.start), py(wr.start), px(wc.stop) - 1, py(wr.stop) - 1]
    pen = _shade_halo(PIL, image_pil, box, inner, halo_color, 80)
    width = max(2, size // 300)
    pen.rectangle(box, outline=window_color, width=width)
    pen.rectangle(inner, outline=crop_color, width=width)
    edge = (255, 255, 255, 255)
    if 0 >= top:
        pen.line([(0, py(0)), (shape[1], py(0))], fill=edge, width=width)
    if 0 >= left:
        pen.line([(px(0), 0), (px(0), shape[0])], fill=edge, width=width)
    dot = max(4, size // 100)
    if top <= oy and left <= ox:
        pen.ellipse([px(ox) - dot, py(oy) - dot, px(ox) + dot, py(oy) + dot],
                    fill=(64, 255, 64, 255))
    picture = np.asarray(image_pil)
    if legend:
        lines = [f"input window {wy} x {wx} px (tile {tuple(t.index)})",
                 f"halo {hy} px: context the output needs",
                 f"output crop {wr.stop - wr.start} x {wc.stop - wc.start} px (written)",
                 f"pooling grid: every {step[0]} px from the origin (-{hy}, -{hx})",
                 "mirrored border (outside the image)", "image edge"]
        swatches = [window_color, halo_color, crop_color, (64, 255, 64), MIRROR_TINT,
                    (255, 255, 255)]
        picture = draw.draw_text(picture, lines, corner="bottom-right", swatches=swatches)
    return picture


def check_plot_path(path: str, image: Any = None, size: Any = None) -> None:
    """Refuse a picture path that cannot be written as PNG, a plot without an image, or
    a ``--plot-size`` that :func:`plot_plan` would refuse (before anything is done).

    Raises
    ------
    InvalidArgumentError
        No image, ``path`` not ending in ``.png``, ``size`` below 64 px, or Pillow missing.
    """
    draw.require_pillow()
    if image is None:
        raise InvalidArgumentError("--plot needs an IMAGE: tilerseg info IMAGE --plot PLAN.png")
    draw.png_path(str(path), "--plot")
    if size is not None:
        _check_size(size, f"--plot-size {size}")


def save_plan(path: str | Any, image: Any, model: Any, **options: Any) -> str:
    """Draw the tile plan (:func:`plot_plan`) and write it as a PNG file.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.png`` file.
    image, model, **options
        As for :func:`plot_plan`.

    Returns
    -------
    str
        ``path``, with the picture's size: ``"plan.png (1024 x 768 px)"``.
    """
    picture = plot_plan(image, model, **options)
    written = draw.save_png(picture, path)
    return f"{written} ({picture.shape[1]} x {picture.shape[0]} px)"

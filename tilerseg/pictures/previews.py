"""A picture of a result: :func:`preview` (``tilerseg preview``).

The result of a run (probabilities, class labels or instance labels) is drawn over the
input image at the resolution of one pyramid level: the finest level of the output whose
picture fits ``size`` pixels, and the input's level of the same downsampling. Only that
level is read, of the output and (where it has one) of the input; ``region`` reads only
the chunks of the level that overlap the crop.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import (ImageNotFoundError, InvalidArgumentError, InvalidImageError, OutputError,
                      TilersegError)
from . import draw, sampling

__all__ = ["preview", "render_preview", "Preview", "LAYERS", "parse_region"]

logger = logging.getLogger(__name__)

LAYERS = ("probabilities", "labels", "instances")
"""The layers a preview can show."""


@dataclass(frozen=True)
class Preview:
    """A preview and what it was drawn from.

    Attributes
    ----------
    picture : numpy.ndarray of uint8, shape ``(Y, X, 3)``
        The RGB picture.
    layer : str
        The layer shown (one of :data:`LAYERS`).
    level : int
        The output pyramid level read.
    input_level : int or None
        The input level read (None: the input was not drawn).
    input_stride : int
        Every how many pixels of ``input_level`` were read (1 where the input has a level
        of the output level's resolution).
    region : tuple of (int, int)
        The region shown, in full-resolution (level 0) output pixels, per spatial axis
        (rows, columns).
    notes : list of str
        What the caller should know (input missing, read strided...).
    """

    picture: np.ndarray
    layer: str
    level: int
    input_level: int | None
    input_stride: int
    region: tuple[tuple[int, int], ...]
    notes: list[str] = field(default_factory=list)


def parse_region(text: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """``"Y0:Y1,X0:X1"`` as ``((Y0, Y1), (X0, X1))``.

    Examples
    --------
    >>> parse_region("100:612, 0:512")
    ((100, 612), (0, 512))
    """
    try:
        parts = [p.split(":") for p in text.split(",")]
        if len(parts) != 2 or any(len(p) != 2 for p in parts):
            raise ValueError
        (y0, y1), (x0, x1) = ((int(a), int(b)) for a, b in parts)
    except ValueError:
        raise InvalidArgumentError(
            f"--region {text!r} must look like Y0:Y1,X0:X1 (full-resolution rows and "
            "columns, e.g. 0:1024,2048:3072)") from None
    return (y0, y1), (x0, x1)


def _layer_arrays(root: Any, info: dict[str, Any]) -> dict[str, list[Any]]:
    """Every level of every layer of an output (its root group; metadata only, no chunk is
    read)."""
    layers: dict[str, list[Any]] = {}
    for name in LAYERS:
        base = info[name]
        if base is None:
            continue
        prefix = base.path.rsplit("/", 1)[0] if "/" in base.path else ""
        layers[name] = [base] + [root[f"{prefix}/{k}" if prefix else str(k)]
                                 for k in range(1, info["levels"])]
    return layers


def _pixel_size(root: Any, layer: list[Any], level: int) -> float | None:
    """Micrometres per pixel along X at ``level``, from the OME-Zarr ``scale`` (``root``: the
    output's root group)."""
    path = layer[level].path.rsplit("/", 1)[0] if "/" in layer[level].path else ""
    group = root[path] if path else root
    try:
        ms = dict(group.attrs["ome"])["multiscales"][0]
        axis = next(i for i, a in enumerate(ms["axes"]) if a["name"] == "x")
        if ms["axes"][axis].get("unit") != "micrometer":
            return None
        scale = next(t["scale"] for t in ms["datasets"][level]["coordinateTransformations"]
                     if t["type"] == "scale")
        return float(scale[axis])
    except (KeyError, StopIteration, IndexError, TypeError, ValueError):
        return None


def _recorded_input(attrs: dict[str, Any]) -> str | None:
    """The run's input path: the absolute path its manifest records where that exists
    (a relative path given to the run was relative to where the run was started), else the
    path as given."""
    given = attrs.get("input", {}).get("path")
    absolute = attrs.get("manifest", {}).get("input", {}).get("path")
    if given is not None and absolute is not None and os.path.exists(absolute):
        return absolute
    return given


def _input_exists(source: str) -> bool:
    """Whether the input at ``source`` (a path, glob or URL) may still be there: False only
    where it is surely gone; a URL that cannot be checked is left to the read to judge."""
    from ..io import remote

    if any(c in source for c in "*?[") and not remote.is_url(source):
        return True  # a glob: the read says whether it matches
    try:
        loc = remote.location(source)
        return loc.exists() if remote.is_local(loc) else remote.exists(loc)
    except TilersegError:
        return True


def _choose_level(region: Sequence[tuple[int, int]], levels: int, size: int) -> int:
    """The finest level at which ``region`` (level-0 rows, columns) fits ``size`` px: at
    level ``k`` it covers pixels ``lo >> k`` to ``ceil(hi / 2**k)``."""
    for k in range(levels):
        if max(-(-hi // 2**k) - (lo >> k) for lo, hi in region) <= size:
            return k
    return levels - 1


def _level_slice(lo: int, hi: int, k: int, n: int) -> slice:
    """Level-0 range ``[lo, hi)`` at level ``k`` (``n`` pixels long)."""
    return slice(min(lo >> k, n - 1), min(-(-hi // 2**k), n))


def _read_input(path: str, run_level: int, level: int, shape0: Sequence[int],
                picture_shape: Sequence[int], region: Sequence[tuple[int, int]],
                z: int | None, channels: Sequence[int]
                ) -> tuple[np.ndarray, int, int, list[str]]:
    """The input under the picture: (RGB picture, input level, stride, notes).

    ``z`` is the full-resolution plane drawn. Read strided, the samples are those of the
    whole picture (every ``stride``-th pixel from the level's first), so a region's
    picture is the crop of the whole one.
    """
    from ..io import open_image

    notes: list[str] = []
    # the input level of the same resolution where the pyramid halves like the output's,
    # else its coarsest level above the run's: a level that does not exist is refused
    # before any pixel is read, and opening one reads two pixels of it
    for guess in range(run_level + level, run_level - 1, -1):
        try:
            source = open_image(path, level=guess)
            break
        except InvalidArgumentError:
            if guess == run_level:
                raise
    axes, levels = source.axes, source.levels
    y = axes.index("Y")
    base = levels[run_level]
    if (base[y], base[axes.index("X")]) != tuple(shape0[-2:]):
        raise InvalidImageError(
            f"image {path} level {run_level} is {base[y]} x {base[axes.index('X')]} px; the "
            f"output is {shape0[-2]} x {shape0[-1]} px")
    j, stride = sampling.level_and_stride(levels, run_level, y, 2.0**level)
    if j != source.level:
        source = open_image(path, level=j)
    if stride > 1:
        notes.append(f"the input has no level of 1/{2**level} resolution: level {j} was "
                     f"read every {stride} pixels")
    shape = levels[j]
    spans = []
    for letter, (lo, hi), n in zip("YX", region, picture_shape):
        a = axes.index(letter)
        r = shape[a] / base[a]
        # on the whole picture's grid of samples, and as many as the picture has pixels
        # (unless this level's steps are not a multiple of the output's)
        start = int(math.floor(lo * r)) // stride * stride
        covering = -(-(max(int(math.ceil(hi * r)), start + 1) - start) // stride)
        count = n if abs(covering - n) <= 1 else covering
        spans.append(slice(start, min(shape[a], start + count * stride), stride))
    key = sampling.image_key(axes, shape, base, z, spans[0], spans[1],
                             int(channels[0]) if channels else 0)
    data = np.asarray(source.data[key])
    rgb = draw.grey(data)
    return draw.resize(rgb, picture_shape), j, stride, notes


def render_preview(
    output: str | os.PathLike,
    *,
    size: int = 2048,
    region: Sequence[tuple[int, int]] | None = None,
    show: str | None = None,
    class_index: int | None = None,
    z: int | None = None,
    image: str | os.PathLike | None = None,
    opacity: float = 0.6,
    scale_bar: bool = True,
    legend: bool = True,
) -> Preview:
    """Draw a run's result over its input; see :func:`preview` (which returns the picture).

    Returns
    -------
    Preview
        The picture and the levels it was drawn from.
    """
    import zarr

    from ..io import remote
    from ..io.writers import decode_probabilities, open_output

    loc = remote.location(output)
    output = str(loc)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 16:
        raise InvalidArgumentError(f"size={size!r} must be an integer >= 16 (pixels)")
    if not 0 <= opacity <= 1:
        raise InvalidArgumentError(f"opacity={opacity!r} must be within [0, 1]")
    if not (loc.is_dir() if remote.is_local(loc) else remote.exists(loc)):
        raise OutputError(f"'{output}' is not a tilerseg output (no such folder)")
    info = open_output(output)
    attrs = info["attributes"]
    if not attrs:
        raise OutputError(f"'{output}' is an OME-Zarr image but not a tilerseg output "
                          "(no 'tilerseg' attributes)")
    root = zarr.open_group(output, mode="r", zarr_format=3)
    layers = _layer_arrays(root, info)
    if show is None:
        show = next(n for n in ("instances", "labels", "probabilities") if n in layers)
    if show not in LAYERS:
        raise InvalidArgumentError(f"show={show!r} is not a layer; expected one of {LAYERS}")
    if show not in layers:
        raise InvalidArgumentError(f"{output} has no {show}; it has {', '.join(layers)}")
    arrays = layers[show]
    channel = show == "probabilities"
    spatial = tuple(int(n) for n in arrays[0].shape[channel:])
    nd = len(spatial)
    H, W = spatial[-2:]
    if region is None:
        region = ((0, H), (0, W))
    region = tuple((int(a), int(b)) for a, b in region)
    if len(region) != 2 or not all(0 <= a < b <= n for (a, b), n in zip(region, (H, W))):
        raise InvalidArgumentError(
            f"region {region} is not inside the image: expected 0 <= Y0 < Y1 <= {H} and "
            f"0 <= X0 < X1 <= {W}")
    if nd == 3:
        nz = spatial[0]
        z = nz // 2 if z is None else z
        if isinstance(z, bool) or not isinstance(z, (int, np.integer)) or not 0 <= z < nz:
            raise InvalidArgumentError(f"z={z!r} is not a plane of the output (0 to {nz - 1})")
    elif z not in (None, 0):
        raise InvalidArgumentError(f"z={z!r} given for a 2D output")
    k = _choose_level(region, len(arrays), int(size))
    level = arrays[k]
    lshape = tuple(int(n) for n in level.shape[channel:])
    key: list[Any] = [_level_slice(a, b, k, n) for (a, b), n in zip(region, lshape[-2:])]
    notes: list[str] = []
    plane, where = None, ""
    if nd == 3:
        # the output halves Z too: plane z >> k of level k is full-resolution plane
        # (z >> k) << k for labels (subsampled), the mean of 2^k planes for probabilities
        key.insert(0, min(z >> k, lshape[0] - 1))
        plane = key[0] << k
        last = min(nz, plane + 2**k) - 1
        where = f"z {plane}" + (f" (mean of planes {plane} to {last})"
                                if channel and last > plane else "")
        if plane != z or (channel and last > plane):
            notes.append(f"output level {k} keeps one plane in {2**k}: z {z} is drawn as "
                         + where)
    if channel:
        classes = int(level.shape[0])
        if class_index is None:
            resolved = attrs.get("manifest", {}).get("resolved", {}).get("labels", {})
            class_index = 0 if classes == 1 else min(int(resolved.get("foreground", 1)),
                                                     classes - 1)
        if isinstance(class_index, bool) or not isinstance(class_index, (int, np.integer)) \
                or not 0 <= class_index < classes:
            raise InvalidArgumentError(f"class {class_index!r} is not one of the output's "
                                       f"{classes} classes (0 to {classes - 1})")
        values = decode_probabilities(level[(int(class_index), *key)])
    else:
        values = np.asarray(level[tuple(key)])
    picture_shape = values.shape
    base, input_level, stride = None, None, 1
    source = os.fspath(image) if image is not None else _recorded_input(attrs)
    if source is None:
        notes.append("the input was an in-memory array: the result is drawn alone")
    elif not _input_exists(source):
        if image is not None:  # given explicitly: a mistake, not a moved input
            raise ImageNotFoundError(f"image {source} does not exist")
        notes.append(f"the input {source} is gone: the result is drawn alone")
    else:
        try:
            base, input_level, stride, more = _read_input(
                source, int(attrs.get("input", {}).get("level", 0)), k, spatial, picture_shape,
                region, plane, attrs.get("input", {}).get("channels") or [])
            notes += more
        except TilersegError as err:
            if image is not None:
                raise
            notes.append(f"the input {source} cannot be read ({err}): the result is drawn alone")
    for note in notes:
        if "drawn alone" in note:
            logger.warning("preview of %s: %s", output, note)
        else:
            logger.info("preview of %s: %s", output, note)
    if base is None:
        base = np.full((*picture_shape, 3), 32, np.uint8)
    if show == "probabilities":
        alpha = opacity * values if input_level is not None else np.ones_like(values)
        picture = draw.blend(base, draw.colormap(values), alpha)
        title = f"probability of class {class_index}"
    else:  # labels and instances: a translucent fill with opaque outlines
        if show == "labels":
            fill = draw.class_colors(values)
            strength = 0.3
            classes_shown = sorted(int(c) for c in np.unique(values) if c)
            title = "labels (class outlines)"
        else:
            ids, colors = draw.instance_colors(values)
            index = np.searchsorted(ids, values)
            fill = colors[np.clip(index, 0, max(len(ids) - 1, 0))] if len(ids) else \
                np.zeros((*values.shape, 3), np.uint8)
            strength = 0.45
            title = f"instances ({len(ids)} objects in view)"
        inside = values != 0
        picture = draw.blend(base, fill, np.where(inside, strength * opacity / 0.6, 0.0))
        edge = draw.outlines(values) & inside
        picture[edge] = fill[edge]
    longest = max(picture.shape[:2])
    factor = 1.0
    if longest > size:  # even the coarsest level is too large
        factor = size / longest
        shape = tuple(max(1, int(round(n * factor))) for n in picture.shape[:2])
        picture = draw.resize(picture, shape)
    if scale_bar:
        px = _pixel_size(root, arrays, k)
        if px is not None:
            picture = draw.scale_bar(picture, px / factor)
    if legend and min(picture.shape[:2]) >= 64:
        lines = [title, f"output level {k} (1/{2**k})" + (f", {where}" if where else "")]
        swatches: list[Any] = [None, None]
        if show == "labels":
            for c in classes_shown[:6]:
                lines.append(f"class {c}")
                swatches.append(draw.class_colors(np.array(c)))
        picture = draw.draw_text(picture, lines, swatches=swatches)
    return Preview(picture, show, k, input_level, stride, region, notes)


def preview(
    output: str | os.PathLike,
    size: int = 2048,
    region: Sequence[tuple[int, int]] | None = None,
    show: str | None = None,
    *,
    class_index: int | None = None,
    z: int | None = None,
    image: str | os.PathLike | None = None,
    opacity: float = 0.6,
    scale_bar: bool = True,
    legend: bool = True,
) -> np.ndarray:
    """Draw the result of a run over its input, at the resolution that fits ``size``.

    The finest output pyramid level whose picture (of ``region``, or of the whole image)
    fits ``size`` pixels on its longest side is read, and nothing else of the output; the
    input is read at its level of the same downsampling (or strided from the nearest
    finer level where it has none). A picture larger than ``size`` even at the coarsest
    level is scaled down.

    Parameters
    ----------
    output : str or os.PathLike
        A tilerseg OME-Zarr output.
    size : int, default 2048
        Longest side of the picture, in pixels, at most.
    region : ((Y0, Y1), (X0, X1)), optional
        A crop in full-resolution (level 0) pixels; default the whole image.
    show : {"probabilities", "labels", "instances"}, optional
        The layer: probabilities as a colour map blended over the grey input (opacity
        proportional to the probability), labels as class outlines, instances in
        distinct colours with outlines (touching objects do not share a colour where each
        has fewer neighbours than :data:`~tilerseg.pictures.draw.INSTANCE_PALETTE` has
        colours, 12). Default: instances if the output has them, else labels, else
        probabilities.
    class_index : int, optional
        The class whose probability is shown (default: the run's foreground class).
    z : int, optional
        The plane of a 3D output, in full-resolution planes (default: the middle one).
        Below level 0 the output has one plane per ``2**level``: the picture shows plane
        ``(z >> level) << level`` of the input and of labels, and for probabilities the
        mean of the ``2**level`` planes from there (the legend says which).
    image : str or os.PathLike, optional
        The input to draw under the result (default: the run's input, from the output's
        metadata). When the recorded input is gone, the result is drawn alone with a
        logged warning; an ``image`` that does not exist is refused.
    opacity : float, default 0.6
        Opacity of the result over the input.
    scale_bar : bool, default True
        Draw a scale bar where the output records its pixel size.
    legend : bool, default True
        Write the layer and level in the top-left corner.

    Returns
    -------
    numpy.ndarray of uint8, shape ``(Y, X, 3)``
        The RGB picture; save it with :func:`tilerseg.pictures.save_png`.

    Raises
    ------
    OutputError
        ``output`` is not a tilerseg output.
    ImageNotFoundError
        ``image`` does not exist.
    InvalidArgumentError
        An unknown or missing layer, a region outside the image, a bad class, plane or
        size, or Pillow missing (``pip install "tilerseg[plot]"``).

    Examples
    --------
    >>> import numpy as np, tempfile, pathlib, tilerseg, torch
    >>> from tilerseg.pictures import preview
    >>> _ = torch.manual_seed(0)
    >>> model = tilerseg.create_model("unet", depth=2, base_channels=2)
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "out.zarr"
    >>> image = np.random.default_rng(0).integers(0, 255, (300, 200), dtype=np.uint8)
    >>> _ = tilerseg.segment_to_zarr(image, model, out, tile=64, backend="torch")
    >>> preview(out, size=100).shape   # level 2 of 300 x 200 is 75 x 50
    (75, 50, 3)
    """
    draw.require_pillow()
    return render_preview(output, size=size, region=region, show=show,
                          class_index=class_index, z=z, image=image, opacity=opacity,
                          scale_bar=scale_bar, legend=legend).picture

"""Drawing primitives of the pictures: grey levels, colour maps, outlines, distinct
instance colours, a scale bar, text and PNG files.

Pictures are numpy RGB arrays ``(rows, columns, 3)`` of uint8. The pixel work is numpy;
Pillow (the ``plot`` extra) draws lines, text and writes PNG files, and is imported only
when one of those is needed.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError

__all__ = [
    "require_pillow", "grey", "colormap", "blend", "outlines", "class_colors",
    "instance_colors", "nice_length", "length_label", "scale_bar", "draw_text", "resize",
    "png_path", "save_png",
]

logger = logging.getLogger(__name__)

SMALLEST_TEXT = 8
"""The smallest font size (px) :func:`draw_text` shrinks a legend to."""

_VIRIDIS = np.array([
    (68, 1, 84), (72, 40, 120), (62, 74, 137), (49, 104, 142), (38, 130, 142),
    (31, 158, 137), (53, 183, 121), (110, 206, 88), (181, 222, 43), (253, 231, 37),
], dtype=np.float64)
_MAGMA = np.array([
    (0, 0, 4), (28, 16, 68), (79, 18, 123), (129, 37, 129), (181, 54, 122),
    (229, 80, 100), (251, 135, 97), (254, 194, 135), (252, 253, 191),
], dtype=np.float64)
_MAPS = {"viridis": _VIRIDIS, "magma": _MAGMA}

def require_pillow() -> Any:
    """Import Pillow, or say which extra installs it.

    Returns
    -------
    module
        ``PIL`` with ``Image``, ``ImageDraw`` and ``ImageFont`` imported.

    Raises
    ------
    InvalidArgumentError
        Pillow is not installed (``pip install "tilerseg[plot]"``).
    """
    try:
        import PIL
        from PIL import Image, ImageDraw, ImageFont  # noqa: F401
    except ImportError:
        raise InvalidArgumentError(
            'pictures need Pillow: pip install "tilerseg[plot]"') from None
    return PIL


def grey(image: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """An image (2D, or 2D with 3/4 RGB(A) samples last) as displayable uint8 RGB.

    Parameters
    ----------
    image : numpy.ndarray
        ``(Y, X)`` or ``(Y, X, 3|4)``.
    low, high : float, optional
        The values shown black and white; by default the dtype range for uint8 and bool,
        else the 0.5 and 99.5 percentiles of ``image``.

    Returns
    -------
    numpy.ndarray of uint8, shape ``(Y, X, 3)``

    Examples
    --------
    >>> grey(np.array([[0, 1000], [2000, 4000]], np.uint16), 0, 4000)[..., 0].tolist()
    [[0, 64], [128, 255]]
    """
    image = np.asarray(image)
    rgb = image.ndim == 3 and image.shape[-1] in (3, 4)
    if rgb:
        image = image[..., :3]
    if low is None or high is None:
        if image.dtype in (np.uint8, np.bool_):
            low, high = 0.0, 255.0 if image.dtype == np.uint8 else 1.0
        else:
            finite = image[np.isfinite(image)] if image.dtype.kind == "f" else image
            if finite.size == 0:
                low, high = 0.0, 1.0
            else:
                low, high = (float(v) for v in np.percentile(finite, (0.5, 99.5)))
    scale = 255.0 / max(float(high) - float(low), 1e-12)
    out = np.clip((image.astype(np.float32) - float(low)) * scale, 0, 255)
    out = np.nan_to_num(out).round().astype(np.uint8)
    return out if rgb else np.repeat(out[..., None], 3, axis=-1)


def colormap(values: np.ndarray, name: str = "viridis") -> np.ndarray:
    """Values in [0, 1] as RGB colours of a perceptually uniform colour map.

    Parameters
    ----------
    values : numpy.ndarray
        Any shape; clipped to [0, 1] (NaN is 0).
    name : {"viridis", "magma"}
        The colour map (matplotlib's, sampled at a few points and interpolated).

    Returns
    -------
    numpy.ndarray of uint8, shape ``values.shape + (3,)``

    Examples
    --------
    >>> colormap(np.array([0.0, 1.0])).tolist()
    [[68, 1, 84], [253, 231, 37]]
    """
    try:
        anchors = _MAPS[name]
    except KeyError:
        raise InvalidArgumentError(
            f"colour map {name!r} is not known; expected one of {sorted(_MAPS)}") from None
    lut = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(anchors)),
                              anchors[:, c]) for c in range(3)], axis=-1).round()
    index = (np.clip(np.nan_to_num(np.asarray(values, np.float32)), 0, 1) * 255).round()
    return lut.astype(np.uint8)[index.astype(np.intp)]


def blend(base: np.ndarray, color: np.ndarray, alpha: np.ndarray | float) -> np.ndarray:
    """``base * (1 - alpha) + color * alpha``, per pixel, as uint8 RGB.

    Parameters
    ----------
    base, color : numpy.ndarray of uint8, shape ``(Y, X, 3)``
        ``color`` may also be one RGB triple.
    alpha : float or numpy.ndarray of shape ``(Y, X)``
        Opacity of ``color`` in [0, 1].

    Returns
    -------
    numpy.ndarray of uint8, shape ``(Y, X, 3)``

    Examples
    --------
    >>> blend(np.zeros((1, 1, 3), np.uint8), np.array([200, 100, 0]), 0.5).tolist()
    [[[100, 50, 0]]]
    """
    a = np.asarray(alpha, np.float32)
    if a.ndim == 2:
        a = a[..., None]
    out = base.astype(np.float32) * (1 - a) + np.asarray(color, np.float32) * a
    return np.clip(out.round(), 0, 255).astype(np.uint8)


def outlines(labels: np.ndarray) -> np.ndarray:
    """Pixels of a label image that touch a different label (4-connectivity), both sides.

    Parameters
    ----------
    labels : numpy.ndarray, shape ``(Y, X)``

    Returns
    -------
    numpy.ndarray of bool, shape ``(Y, X)``

    Examples
    --------
    >>> outlines(np.array([[1, 1, 2, 2]])).astype(int).tolist()
    [[0, 1, 1, 0]]
    """
    edge = np.zeros(labels.shape, dtype=bool)
    dy = labels[1:, :] != labels[:-1, :]
    dx = labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    return edge


def class_colors(labels: np.ndarray) -> np.ndarray:
    """The colour of each pixel's class: the palette of the output's ``image-label``
    metadata (class ``k`` gets colour ``(k - 1) % 10``; class 0 gets the last colour)."""
    from ..io.writers import _PALETTE  # the output's own palette (imported when drawn)

    palette = np.array(_PALETTE, dtype=np.uint8)
    index = (labels.astype(np.int64) - 1) % len(palette)
    return palette[index]


def _hues(count: int) -> np.ndarray:
    """``count`` well separated saturated colours (golden-ratio hue steps, two lightnesses)."""
    k = np.arange(count)
    hue = (k * 0.6180339887) % 1.0
    value = np.where(k % 2, 0.80, 1.0)
    saturation = np.where(k % 3 == 2, 0.55, 0.9)
    i = np.floor(hue * 6).astype(int) % 6
    f = hue * 6 - np.floor(hue * 6)
    p, q, t = value * (1 - saturation), value * (1 - f * saturation), \
        value * (1 - (1 - f) * saturation)
    table = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value),
             (value, p, q)]
    rgb = np.stack([np.choose(i, [row[c] for row in table]) for c in range(3)], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


INSTANCE_PALETTE = _hues(12)
"""The colours of instance labels: 12 saturated hues, each far from the next."""


def instance_colors(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A colour per object such that touching objects never share a colour.

    Each id starts with a colour from its own value (the same object keeps its colour
    from one picture to the next); where two touching objects (4-connectivity) got the
    same colour, the later one takes the first colour none of its neighbours has (there
    is one whenever it has fewer neighbours than :data:`INSTANCE_PALETTE` has colours).

    Parameters
    ----------
    labels : numpy.ndarray of int, shape ``(Y, X)``
        Instance labels, 0 for background.

    Returns
    -------
    ids : numpy.ndarray
        The sorted non-zero ids present.
    colors : numpy.ndarray of uint8, shape ``(len(ids), 3)``
        Their colours (from :data:`INSTANCE_PALETTE`).

    Examples
    --------
    Ids 1 and 13 would share a colour (13 = 1 modulo 12) but touch, so they differ:

    >>> ids, colors = instance_colors(np.array([[1, 1, 13, 13]]))
    >>> ids.tolist(), bool((colors[0] != colors[1]).any())
    ([1, 13], True)
    """
    labels = np.asarray(labels)
    ids = np.unique(labels)
    ids = ids[ids != 0]
    n = len(INSTANCE_PALETTE)
    choice = ((ids.astype(np.uint64) * np.uint64(7)) % np.uint64(n)).astype(np.int64)
    pairs = []
    for a, b in ((labels[1:, :], labels[:-1, :]), (labels[:, 1:], labels[:, :-1])):
        touch = (a != b) & (a != 0) & (b != 0)
        pairs.append(np.stack([np.minimum(a[touch], b[touch]),
                               np.maximum(a[touch], b[touch])], axis=1))
    edges = np.unique(np.concatenate(pairs), axis=0) if pairs else np.zeros((0, 2), int)
    if len(edges):
        ia, ib = np.searchsorted(ids, edges[:, 0]), np.searchsorted(ids, edges[:, 1])
        clash = choice[ia] == choice[ib]
        if clash.any():
            neighbours: dict[int, list[int]] = {}
            for x, y in zip(ia.tolist(), ib.tolist()):
                neighbours.setdefault(x, []).append(y)
                neighbours.setdefault(y, []).append(x)
            for k in sorted(set(ib[clash].tolist())):  # only objects in a clash move
                taken = {int(choice[m]) for m in neighbours[k]}
                if int(choice[k]) in taken:
                    free = [c for c in range(n) if c not in taken]
                    if free:
                        choice[k] = free[0]
    return ids, INSTANCE_PALETTE[choice]


def nice_length(longest: float) -> float:
    """The largest 1, 2 or 5 times a power of ten that is at most ``longest``.

    Examples
    --------
    >>> nice_length(73.0), nice_length(0.3), nice_length(1999.0)
    (50.0, 0.2, 1000.0)
    """
    if not longest > 0 or not math.isfinite(longest):
        raise InvalidArgumentError(f"scale bar length {longest!r} must be positive")
    power = 10.0 ** math.floor(math.log10(longest))
    for factor in (5, 2, 1):
        if factor * power <= longest * (1 + 1e-9):
            return float(f"{factor * power:.12g}")
    return float(f"{power:.12g}")


def length_label(um: float) -> str:
    """A length in micrometres as text: ``"50 um"``, ``"2 mm"``, ``"500 nm"`` (ASCII:
    Pillow's default font has no micro sign).

    Examples
    --------
    >>> length_label(50.0), length_label(2000.0), length_label(0.5)
    ('50 um', '2 mm', '500 nm')
    """
    if um >= 1000:
        return f"{um / 1000:g} mm"
    if um < 1:
        return f"{um * 1000:g} nm"
    return f"{um:g} um"


def _font(size: int) -> Any:
    require_pillow()
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def draw_text(picture: np.ndarray, lines: Sequence[str], *, corner: str = "top-left",
              size: int | None = None, swatches: Sequence[Any] | None = None) -> np.ndarray:
    """Write lines of text in a box with a dark translucent background.

    Parameters
    ----------
    picture : numpy.ndarray of uint8, shape ``(Y, X, 3)``
    lines : sequence of str
    corner : {"top-left", "top-right", "bottom-left", "bottom-right"}
    size : int, optional
        Font size in px (default: about 1/60 of the picture's longest side, 12 to 24).
        Where the box would not fit inside the picture, the text is made smaller, down to
        :data:`SMALLEST_TEXT` px; if it still does not fit, nothing is drawn (logged).
    swatches : sequence of RGB triples or None, optional
        A colour square before each line (None: no square on that line).

    Returns
    -------
    numpy.ndarray
        A new picture.

    Examples
    --------
    >>> picture = np.zeros((60, 300, 3), np.uint8)
    >>> bool(draw_text(picture, ["a legend"]).any())   # drawn
    True
    >>> bool(draw_text(picture, ["a legend " * 20]).any())   # too wide even when small
    False
    """
    PIL = require_pillow()
    size = size or int(np.clip(max(picture.shape[:2]) / 60, 12, 24))
    image = PIL.Image.fromarray(picture)
    draw = PIL.ImageDraw.Draw(image, "RGBA")
    while True:
        font = _font(size)
        pad, gap = size // 2, size // 4
        box = size if swatches else 0
        width = max((draw.textlength(t, font=font) for t in lines), default=0) + box + 2 * pad
        height = len(lines) * (size + gap) + 2 * pad - gap
        if width + 2 * pad <= picture.shape[1] and height + 2 * pad <= picture.shape[0]:
            break
        if size <= SMALLEST_TEXT:
            logger.info("a %d x %d px picture is too small for its legend (%s...): "
                        "not drawn", picture.shape[1], picture.shape[0], lines[0] if lines
                        else "")
            return picture.copy()
        size -= 1
    y0 = pad if corner.startswith("top") else picture.shape[0] - height - pad
    x0 = pad if corner.endswith("left") else picture.shape[1] - width - pad
    draw.rectangle([x0, y0, x0 + width, y0 + height], fill=(0, 0, 0, 160))
    for k, text in enumerate(lines):
        y = y0 + pad + k * (size + gap)
        swatch = swatches[k] if swatches else None
        if swatch is not None:
            draw.rectangle([x0 + pad, y + 2, x0 + pad + size * 3 // 4, y + size * 3 // 4 + 2],
                           fill=tuple(int(c) for c in swatch[:3]) + (255,),
                           outline=(255, 255, 255, 255))
        draw.text((x0 + pad + box, y), text, fill=(255, 255, 255, 255), font=font)
    return np.asarray(image.convert("RGB"))


def scale_bar(picture: np.ndarray, pixel_size: float, *, fraction: float = 0.2) -> np.ndarray:
    """Draw a scale bar of a round length (1, 2 or 5 x 10^k) with its label, bottom right.

    Parameters
    ----------
    picture : numpy.ndarray of uint8, shape ``(Y, X, 3)``
    pixel_size : float
        Micrometres per picture pixel.
    fraction : float
        The bar is at most this fraction of the picture's width.

    Returns
    -------
    numpy.ndarray
        A new picture (the same one if it is too small for a bar).
    """
    PIL = require_pillow()
    h, w = picture.shape[:2]
    if w < 40 or h < 24:
        return picture
    length = nice_length(fraction * w * pixel_size)
    bar = max(1, int(round(length / pixel_size)))
    size = int(np.clip(max(h, w) / 60, 12, 24))
    font = _font(size)
    image = PIL.Image.fromarray(picture)
    draw = PIL.ImageDraw.Draw(image, "RGBA")
    label = length_label(length)
    text_w = draw.textlength(label, font=font)
    thick = max(2, size // 4)
    pad = size // 2
    x1 = w - 2 * pad
    x0 = x1 - bar
    y1 = h - 2 * pad
    y0 = y1 - thick
    draw.rectangle([min(x0, x1 - text_w) - pad, y0 - size - 2 * pad, x1 + pad, y1 + pad],
                   fill=(0, 0, 0, 150))
    draw.rectangle([x0, y0, x1, y1], fill=(255, 255, 255, 255))
    draw.text(((x0 + x1 - text_w) / 2, y0 - size - pad // 2), label, fill=(255, 255, 255, 255),
              font=font)
    return np.asarray(image.convert("RGB"))


def resize(picture: np.ndarray, shape: Sequence[int], *, nearest: bool = False) -> np.ndarray:
    """Resize an RGB (or 2D) uint8 picture to ``shape`` (rows, columns) with Pillow."""
    PIL = require_pillow()
    if tuple(picture.shape[:2]) == tuple(shape):
        return picture
    method = PIL.Image.Resampling.NEAREST if nearest else PIL.Image.Resampling.BOX \
        if shape[0] <= picture.shape[0] else PIL.Image.Resampling.BILINEAR
    image = PIL.Image.fromarray(np.ascontiguousarray(picture))
    return np.asarray(image.resize((int(shape[1]), int(shape[0])), method))


def png_path(path: str | os.PathLike, what: str = "picture path") -> str:
    """``path`` as a string, refused unless it ends in ``.png`` (any case).

    Parameters
    ----------
    path : str or os.PathLike
    what : str
        How the error names the path (a CLI flag, say).

    Raises
    ------
    InvalidArgumentError
        ``path`` does not end in ``.png``.

    Examples
    --------
    >>> png_path("plan.PNG")
    'plan.PNG'
    >>> png_path("plan.jpg", "--plot")
    Traceback (most recent call last):
    ...
    tilerseg.errors.InvalidArgumentError: --plot 'plan.jpg' must end in .png
    """
    path = os.fspath(path)
    if not path.lower().endswith(".png"):
        raise InvalidArgumentError(f"{what} {path!r} must end in .png")
    return path


def save_png(picture: np.ndarray, path: str | os.PathLike) -> str:
    """Write an RGB picture as a PNG file.

    Parameters
    ----------
    picture : numpy.ndarray of uint8, shape ``(Y, X, 3)``
    path : str or os.PathLike

    Returns
    -------
    str
        The path written.

    Raises
    ------
    InvalidArgumentError
        Pillow is missing, or ``path`` does not end in ``.png``.
    """
    PIL = require_pillow()
    path = png_path(path)
    PIL.Image.fromarray(np.ascontiguousarray(picture, dtype=np.uint8)).save(path, optimize=False)
    return path

"""Global intensity normalisation: one affine map for the whole image, never per tile.

Tiling invariance requires that nothing applied to a tile depends on the tile, so the
scale is computed once from the image (or a strided sample of it) and every tile is
mapped by the same ``(x - low) / (high - low)``.

A display window (``normalize=("window", centre, width)``, a named CT preset of
:data:`WINDOW_PRESETS` or the DICOM file's own window) maps ``[centre - width / 2,
centre + width / 2]`` to [0, 1] and clips the values outside, as a DICOM viewer displays
the image; clipping is per pixel, so tiling stays exact.

For multi-modal MRI, ``normalize="zscore"`` maps each channel by its own mean and
standard deviation over the foreground (the voxels that are nonzero in any channel: the
brain of skull-stripped MRI), the statistics of nnU-Net's z-score normalisation, computed
once per image from all its voxels, so tiling stays exact here too. Unlike nnU-Net, which
sets the voxels outside its mask to 0, every voxel goes through the same affine map.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable, Iterable
from typing import Union

import numpy as np

from .errors import InvalidArgumentError, InvalidImageError

__all__ = ["Normalization", "NormalizeSpec", "WINDOW_PRESETS", "parse_window",
           "resolve_normalization", "zscore_statistics"]

NormalizeSpec = Union[bool, str, tuple[float, float], tuple[str, str],
                      tuple[str, float, float], None]
"""What callers may pass as ``normalize=``: see :func:`resolve_normalization`."""

_PERCENTILES = (1.0, 99.8)

WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft-tissue": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "liver": (30.0, 150.0),
}
"""Named CT windows ``(centre, width)`` in Hounsfield units: the usual values listed by
Radiopaedia's "Windowing (CT)" article (W:1500 L:-600 lungs, W:350 L:50 mediastinum,
W:400 L:40 soft tissues, W:1800 L:400 bone, W:80 L:40 brain, W:150 L:30 liver)."""


Bound = Union[float, tuple[float, ...]]
"""One value for every channel, or one per channel (first axis of a tile)."""


@dataclass(frozen=True)
class Normalization:
    """The affine map ``(x - low) / (high - low)`` applied to every tile.

    ``low = 0, high = 1`` is the identity (the input is only cast to float32). With
    ``method="window"`` the result is also clipped to [0, 1] (a display window of centre
    ``(low + high) / 2`` and width ``high - low``). ``low`` and ``high`` are numbers (one
    map for every channel) or, for ``method="zscore"``, tuples with one value per channel,
    applied along a tile's first axis.

    Examples
    --------
    >>> import numpy as np
    >>> Normalization("window", -160.0, 240.0)(np.array([-1000, 40, 1000]))
    array([0. , 0.5, 1. ], dtype=float32)
    >>> Normalization("zscore", (10.0, 0.0), (12.0, 4.0))(np.array([[10, 14], [0, 8]]))
    array([[0., 2.],
           [0., 2.]], dtype=float32)
    """

    method: str
    low: Bound = 0.0
    high: Bound = 1.0

    def __post_init__(self) -> None:
        per_channel = [isinstance(v, (tuple, list, np.ndarray)) for v in (self.low, self.high)]
        if any(per_channel):  # one value per channel (lists from JSON records become tuples)
            low, high = (tuple(float(x) for x in np.ravel(v)) for v in (self.low, self.high))
            if not all(per_channel) or len(low) != len(high) or not low:
                raise InvalidArgumentError(
                    f"normalisation range ({self.low}, {self.high}) must give low and high "
                    "for the same channels")
            object.__setattr__(self, "low", low)
            object.__setattr__(self, "high", high)
        lows, highs = np.atleast_1d(self.low), np.atleast_1d(self.high)
        if not (np.isfinite(lows).all() and np.isfinite(highs).all()) or (highs <= lows).any():
            raise InvalidArgumentError(
                f"normalisation range ({self.low}, {self.high}) must be finite with low < high"
            )

    @property
    def channels(self) -> int | None:
        """How many channels the map is for (None: any number, one map for all)."""
        return len(self.low) if isinstance(self.low, tuple) else None

    def __call__(self, tile: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Return ``tile`` as float32, normalised (into ``out``, float32, if given).

        A per-channel map takes ``tile`` with its channels on the first axis.
        """
        if out is None:
            out = np.empty(np.shape(tile), np.float32)
        out[...] = tile
        if self.channels is not None:
            if out.ndim == 0 or out.shape[0] != self.channels:
                raise InvalidImageError(
                    f"the {self.method} normalisation was computed for {self.channels} "
                    f"channel(s) but a tile of shape {out.shape} has "
                    f"{out.shape[0] if out.ndim else 0} on its first axis")
            shape = (-1,) + (1,) * (out.ndim - 1)
            low = np.asarray(self.low, np.float32).reshape(shape)
            out -= low
            out /= np.asarray(self.high, np.float32).reshape(shape) - low
        elif (self.low, self.high) != (0.0, 1.0):
            out -= np.float32(self.low)
            out /= np.float32(self.high - self.low)
        if self.method == "window":
            np.clip(out, 0.0, 1.0, out=out)
        return out

    def as_dict(self) -> dict[str, float | str | list[float]]:
        """Plain-value description, for metadata (per-channel values as lists)."""
        def plain(v: Bound) -> float | list[float]:
            return list(v) if isinstance(v, tuple) else v
        return {"method": self.method, "low": plain(self.low), "high": plain(self.high)}


def _dtype_range(dtype: np.dtype) -> tuple[float, float]:
    if dtype == np.bool_:
        return 0.0, 1.0
    info = np.iinfo(dtype)
    return float(info.min), float(info.max)


def _percentiles(sample: np.ndarray,
                 percentiles: tuple[float, float] = _PERCENTILES) -> tuple[float, float]:
    low, high = np.percentile(sample, percentiles)
    if high <= low:  # a flat image: map it to 0 rather than divide by zero
        high = low + 1.0
    return float(low), float(high)


def _percentile_pair(spec: str) -> tuple[float, float]:
    """The percentiles of a ``"percentile:LOW:HIGH"`` spec, checked."""
    try:
        low, high = (float(v) for v in spec.split(":")[1:])
    except ValueError:
        low = high = float("nan")
    if not 0.0 <= low < high <= 100.0:
        raise InvalidArgumentError(
            f"normalize={spec!r} is not understood; expected 'percentile:LOW:HIGH' with "
            "0 <= LOW < HIGH <= 100")
    return low, high


def _mean_std(sample: np.ndarray) -> tuple[float, float]:
    """(mean, mean + std) of the sample: the range mapped to [0, 1] by ``"meanstd"``."""
    values = np.asarray(sample, dtype=np.float64)
    mean, std = float(values.mean()), float(values.std())
    return mean, mean + (std if std > 0 else 1.0)  # a flat image: map it to 0


def zscore_statistics(blocks: np.ndarray | Iterable[np.ndarray]
                      ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel ``(mean, mean + std)`` over the foreground of an image given whole or
    in blocks, each ``(C, ...)``: the low and high of ``normalize="zscore"``.

    The foreground is the voxels that are nonzero in any channel; a channel flat there is
    mapped to 0 rather than divided by zero, and an image that is 0 everywhere by
    ``(0, 1)``. Blocks are combined exactly (counts, means and squared deviations, Chan et
    al.'s pairwise update), so a volume read slab by slab gives the statistics of the
    whole volume at the memory of one slab.

    Examples
    --------
    >>> image = np.array([[0, 2, 4, 6], [0, 5, 5, 5]])
    >>> zscore_statistics(image) == zscore_statistics([image[:, :2], image[:, 2:]])
    True
    >>> zscore_statistics(image)[0]
    (4.0, 5.0)
    """
    total: tuple[int, np.ndarray, np.ndarray] | None = None
    channels = None
    for block in [blocks] if isinstance(blocks, np.ndarray) else blocks:
        values = np.asarray(block)
        if values.ndim < 2:
            raise InvalidArgumentError(
                f"normalize='zscore' needs channels first, got shape {values.shape}")
        channels = values.shape[0]
        values = values.reshape(channels, -1)
        foreground = values[:, (values != 0).any(axis=0)]
        if foreground.shape[1]:
            total = _merge(total, foreground)
    if channels is None:
        raise InvalidArgumentError("normalize='zscore' got an empty image")
    if total is None:  # no voxel is nonzero
        return (0.0,) * channels, (1.0,) * channels
    count, mean, m2 = total
    std = np.sqrt(m2 / count)
    std[~(std > 0)] = 1.0
    return tuple(float(m) for m in mean), tuple(float(m + d) for m, d in zip(mean, std))


def _merge(total: tuple[int, np.ndarray, np.ndarray] | None, values: np.ndarray
           ) -> tuple[int, np.ndarray, np.ndarray]:
    """(count, mean, sum of squared deviations) of ``total`` and the columns of ``values``,
    in float64 (the sums of integer values are exact)."""
    count = values.shape[1]
    mean = values.sum(axis=1, dtype=np.float64) / count
    deviations = values.astype(np.float64)
    deviations -= mean[:, None]
    m2 = np.einsum("ij,ij->i", deviations, deviations)
    if total is None:
        return count, mean, m2
    n, mu, s2 = total
    delta = mean - mu
    both = n + count
    return both, mu + delta * count / both, s2 + m2 + delta ** 2 * n * count / both


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def _window(center: float, width: float, what: str) -> Normalization:
    if not (np.isfinite(center) and np.isfinite(width)) or width <= 0:
        raise InvalidArgumentError(
            f"window {what} must have a finite centre and a width > 0, got centre {center:g}, "
            f"width {width:g}")
    return Normalization("window", float(center) - float(width) / 2,
                         float(center) + float(width) / 2)


def parse_window(text: str) -> tuple[str, str] | tuple[str, float, float]:
    """The ``normalize=`` value of a ``--window`` argument.

    Parameters
    ----------
    text : str
        ``"dicom"`` (the image's own window), a name of :data:`WINDOW_PRESETS` or
        ``"C,W"`` (centre and width, in the image's units).

    Returns
    -------
    tuple
        ``("window", "dicom")``, ``("window", NAME)`` or ``("window", C, W)``.

    Raises
    ------
    InvalidArgumentError
        Anything else, or a width <= 0.

    Examples
    --------
    >>> parse_window("40,400"), parse_window("Lung")
    (('window', 40.0, 400.0), ('window', 'lung'))
    """
    name = text.strip().lower()
    if name == "dicom" or name in WINDOW_PRESETS:
        return ("window", name)
    parts = name.split(",")
    try:
        center, width = (float(p) for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        center = width = None
    if center is None or width is None:
        raise InvalidArgumentError(
            f"--window {text!r} is not understood; expected dicom, a preset "
            f"({', '.join(WINDOW_PRESETS)}) or CENTRE,WIDTH such as 40,400")
    _window(center, width, repr(text))
    return ("window", center, width)


def resolve_normalization(
    normalize: NormalizeSpec, dtype: np.dtype, sample: Callable[[], np.ndarray],
    window: Callable[[], tuple[float, float] | None] | None = None,
) -> Normalization:
    """Turn a ``normalize=`` argument into one global :class:`Normalization`.

    Parameters
    ----------
    normalize : bool, str, (float, float) or None
        - ``True`` or ``"auto"`` (default): 8-bit and boolean images are scaled from
          their dtype's range to [0, 1]; wider integer images (16-bit X-ray or
          fluorescence data) by their global percentiles, as ``"percentile"``; float
          images are used unchanged.
        - ``"range"``: the dtype range (uint16 / 65535...), for integer images only.
        - ``"percentile"``: the 1st and 99.8th percentiles of the image, estimated from
          ``sample()``, map to 0 and 1, for any dtype.
        - ``"percentile:LOW:HIGH"``: the same with the LOW-th and HIGH-th percentiles.
        - ``"meanstd"``: the image's mean maps to 0 and its standard deviation to 1
          (estimated from ``sample()``).
        - ``"zscore"``: the same per channel, over the foreground (the voxels nonzero in
          any channel), the statistics nnU-Net normalises MRI with; ``sample()`` gives
          the whole image, channels first, as one array or an iterable of blocks (see
          :func:`zscore_statistics`).
        - ``(low, high)``: an explicit range mapped to [0, 1].
        - ``("window", centre, width)``: the display window ``[centre - width / 2,
          centre + width / 2]`` mapped to [0, 1], values outside clipped;
          ``("window", NAME)`` a CT preset of :data:`WINDOW_PRESETS` (Hounsfield units);
          ``("window", "dicom")`` the image's own window (DICOM WindowCenter and
          WindowWidth, first values), from ``window()``.
        - ``False`` or ``None``: values are only cast to float32.
        - a :class:`Normalization`: used as it is.
    dtype : numpy.dtype
        The image's dtype.
    sample : callable
        Returns a representative sample of the image (a low-resolution level or a strided
        subsample); only called for percentiles.
    window : callable, optional
        Returns the image's own window ``(centre, width)`` or None; only called for
        ``("window", "dicom")``.

    Returns
    -------
    Normalization

    Raises
    ------
    InvalidArgumentError
        ``normalize`` is not understood, or ``("window", "dicom")`` is asked of an image
        without a window.

    Examples
    --------
    >>> import numpy as np
    >>> resolve_normalization("auto", np.dtype(np.uint8), lambda: None)
    Normalization(method='range', low=0.0, high=255.0)
    >>> resolve_normalization("auto", np.dtype(np.uint16), lambda: np.arange(1001)).method
    'percentile'
    >>> resolve_normalization(False, np.dtype(np.uint8), lambda: None).method
    'none'
    >>> resolve_normalization("percentile:0:100", np.dtype(np.uint16), lambda: np.arange(11))
    Normalization(method='percentile:0:100', low=0.0, high=10.0)
    >>> resolve_normalization("meanstd", np.dtype(np.float32), lambda: np.array([1.0, 3.0]))
    Normalization(method='meanstd', low=2.0, high=3.0)
    >>> resolve_normalization("zscore", np.dtype(np.int16), lambda: np.array([[0, 2, 4], [0, 5, 5]]))
    Normalization(method='zscore', low=(3.0, 5.0), high=(4.0, 6.0))
    >>> resolve_normalization(("window", "lung"), np.dtype(np.int32), lambda: None)
    Normalization(method='window', low=-1350.0, high=150.0)
    """
    if isinstance(normalize, Normalization):  # already resolved (e.g. recorded by a run)
        return normalize
    dtype = np.dtype(dtype)
    is_int = dtype == np.bool_ or np.issubdtype(dtype, np.integer)
    if normalize is False or normalize is None or normalize == "none":
        return Normalization("none")
    if normalize is True or normalize == "auto":
        if not is_int:
            return Normalization("none")
        if dtype.itemsize == 1:
            return Normalization("range", *_dtype_range(dtype))
        return Normalization("percentile", *_percentiles(sample()))
    if normalize == "range":
        if not is_int:
            raise InvalidArgumentError(
                f"normalize='range' needs an integer image, got dtype {dtype}; "
                "use 'percentile' or an explicit (low, high)"
            )
        return Normalization("range", *_dtype_range(dtype))
    if normalize == "percentile":
        return Normalization("percentile", *_percentiles(sample()))
    if isinstance(normalize, str) and normalize.startswith("percentile:"):
        return Normalization(normalize, *_percentiles(sample(), _percentile_pair(normalize)))
    if normalize == "meanstd":
        return Normalization("meanstd", *_mean_std(sample()))
    if normalize == "zscore":
        return Normalization("zscore", *zscore_statistics(sample()))
    if (
        isinstance(normalize, (tuple, list))
        and len(normalize) == 2
        and all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in normalize)
    ):
        return Normalization("fixed", float(normalize[0]), float(normalize[1]))
    if isinstance(normalize, (tuple, list)) and normalize and normalize[0] == "window":
        args = tuple(normalize[1:])
        if len(args) == 2 and all(_is_number(v) for v in args):
            return _window(float(args[0]), float(args[1]), repr(tuple(normalize)))
        if len(args) == 1 and isinstance(args[0], str) and args[0].lower() in WINDOW_PRESETS:
            return _window(*WINDOW_PRESETS[args[0].lower()], repr(args[0]))
        if args == ("dicom",):
            found = window() if window is not None else None
            if found is None:
                raise InvalidArgumentError(
                    "normalize=('window', 'dicom') needs the image's own window (DICOM "
                    "WindowCenter/WindowWidth) and the image has none; give a window as "
                    "CENTRE,WIDTH or a preset")
            return _window(float(found[0]), float(found[1]), "from the image")
    raise InvalidArgumentError(
        f"normalize={normalize!r} is not understood; expected True/'auto', 'range', "
        "'percentile', 'percentile:LOW:HIGH', 'meanstd', 'zscore', False/'none', a (low, high) "
        "pair, "
        "('window', centre, width), "
        f"('window', 'dicom') or ('window', NAME) with NAME one of {', '.join(WINDOW_PRESETS)}"
    )

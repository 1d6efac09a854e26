"""Global intensity normalisation: one affine map for the whole image, never per tile.

Tiling invariance requires that nothing applied to a tile depends on the tile, so the
scale is computed once from the image (or a strided sample of it) and every tile is
mapped by the same ``(x - low) / (high - low)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable
from typing import Union

import numpy as np

from .errors import InvalidArgumentError

__all__ = ["Normalization", "NormalizeSpec", "resolve_normalization"]

NormalizeSpec = Union[bool, str, tuple[float, float], None]
"""What callers may pass as ``normalize=``: see :func:`resolve_normalization`."""

_PERCENTILES = (1.0, 99.8)


@dataclass(frozen=True)
class Normalization:
    """The affine map ``(x - low) / (high - low)`` applied to every tile.

    ``low = 0, high = 1`` is the identity (the input is only cast to float32).
    """

    method: str
    low: float = 0.0
    high: float = 1.0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.low) and np.isfinite(self.high)) or self.high <= self.low:
            raise InvalidArgumentError(
                f"normalisation range ({self.low}, {self.high}) must be finite with low < high"
            )

    def __call__(self, tile: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Return ``tile`` as float32, normalised (into ``out``, float32, if given)."""
        if out is None:
            out = np.empty(np.shape(tile), np.float32)
        out[...] = tile
        if (self.low, self.high) != (0.0, 1.0):
            out -= np.float32(self.low)
            out /= np.float32(self.high - self.low)
        return out

    def as_dict(self) -> dict[str, float | str]:
        """Plain-value description, for metadata."""
        return {"method": self.method, "low": self.low, "high": self.high}


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


def resolve_normalization(
    normalize: NormalizeSpec, dtype: np.dtype, sample: Callable[[], np.ndarray]
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
        - ``(low, high)``: an explicit range mapped to [0, 1].
        - ``False`` or ``None``: values are only cast to float32.
        - a :class:`Normalization`: used as it is.
    dtype : numpy.dtype
        The image's dtype.
    sample : callable
        Returns a representative sample of the image (a low-resolution level or a strided
        subsample); only called for percentiles.

    Returns
    -------
    Normalization

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
    if (
        isinstance(normalize, (tuple, list))
        and len(normalize) == 2
        and all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in normalize)
    ):
        return Normalization("fixed", float(normalize[0]), float(normalize[1]))
    raise InvalidArgumentError(
        f"normalize={normalize!r} is not understood; expected True/'auto', 'range', "
        "'percentile', False/'none' or a (low, high) pair"
    )

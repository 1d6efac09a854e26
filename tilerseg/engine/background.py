"""Background skipping: find output tiles whose whole input window is flat background.

Such a tile's output is the model's output on a constant window, which is the same for
every tile (tile origins share one phase of the pooling grid), so it is computed once
and written as the fill of every skipped chunk. For an exactly constant background the
result equals the full run; with a tolerance it is the output on the background value.

The decision is made from a coarse map of per-block minima and maxima: from a
low-resolution pyramid level where the file has one (its pixels stand for blocks, so
minimum = maximum = the level's value), else from one pass over the image reading one
output tile at a time.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError
from ..geometry import TilePlan
from .view import ChannelFirstView

__all__ = ["BackgroundMap", "find_background", "decode_skipped"]

log = logging.getLogger(__name__)

MIN_PER_TILE = 4  # a pyramid level is used only with >= 4 of its pixels per tile side


@dataclass
class BackgroundMap:
    """Which tiles of a plan are background, and how that was decided.

    Attributes
    ----------
    skip : numpy.ndarray of bool, shape ``plan.grid``
        True for tiles whose whole input window is within ``tolerance`` of ``value``.
    value : list of float
        Background intensity per model input channel, in the model's input units
        (after normalisation).
    tolerance : float
        Largest deviation from ``value`` still counted as background (input units).
    method : str
        Where the coarse map came from.
    """

    skip: np.ndarray
    value: list[float]
    tolerance: float
    method: str

    def as_dict(self) -> dict[str, Any]:
        """JSON description, with the skipped-tile map packed (see :func:`decode_skipped`)."""
        packed = base64.b64encode(np.packbits(self.skip.ravel()).tobytes()).decode("ascii")
        return {
            "skipped_chunks": int(self.skip.sum()),
            "chunks": int(self.skip.size),
            "value": [round(v, 6) for v in self.value],
            "tolerance": self.tolerance,
            "method": self.method,
            "fill": "the model's output on a constant window of the background value",
            "skipped": {"grid": list(self.skip.shape), "packbits_base64": packed},
        }


def decode_skipped(record: dict[str, Any]) -> np.ndarray:
    """The boolean chunk map of a run's ``background`` record (True = filled, not run).

    Examples
    --------
    >>> m = BackgroundMap(np.array([[True, False], [False, True]]), [0.0], 0.05, "test")
    >>> decode_skipped(m.as_dict()).tolist()
    [[True, False], [False, True]]
    """
    grid = tuple(record["skipped"]["grid"])
    bits = np.frombuffer(base64.b64decode(record["skipped"]["packbits_base64"]), np.uint8)
    return np.unpackbits(bits)[: int(np.prod(grid))].astype(bool).reshape(grid)


def _coarse_from_level(source: Any, view: ChannelFirstView, norm: Any,
                       plan: TilePlan) -> tuple[np.ndarray, np.ndarray, tuple[float, ...], str] | None:
    """(min, max, factors, method) from the coarsest usable pyramid level, or None."""
    spatial = view.spatial
    full = dict(zip(source.axes, source.shape))
    best = None
    for k, data in enumerate(source.level_data):
        shape = dict(zip(source.axes, data.shape))
        if any(a not in shape for a in spatial):
            continue
        factors = tuple(full[a] / shape[a] for a in spatial)
        if all(f <= 1 for f in factors):
            continue
        usable = all(t / f >= MIN_PER_TILE for t, f in zip(plan.tile, factors))
        if usable and (best is None or np.prod(factors) > np.prod(best[1])):
            best = (k, factors, data)
    if best is None:
        return None
    k, factors, data = best
    low = ChannelFirstView(data, source.axes, spatial, view.channels)
    values = norm(np.asarray(low[(slice(None),) * (len(spatial) + 1)]))
    shape = "x".join(str(n) for n in values.shape[1:])
    return values, values, factors, f"pyramid level {k} ({shape})"


def _coarse_from_tiles(view: ChannelFirstView, norm: Any, plan: TilePlan,
                       block: int = 64) -> tuple[np.ndarray, np.ndarray, tuple[float, ...], str]:
    """Per-block minima and maxima of the whole image, read one output tile at a time."""
    blocks = tuple(min(block, t) for t in plan.tile)
    grid = tuple(-(-n // b) for n, b in zip(plan.image_shape, blocks))
    lo = np.empty((view.shape[0], *grid), np.float32)
    hi = np.empty_like(lo)
    for tile in plan:
        data = norm(np.asarray(view[(slice(None), *tile.write)]))
        start = tuple(s.start // b for s, b in zip(tile.write, blocks))
        for idx in np.ndindex(*(-(-n // b) for n, b in zip(data.shape[1:], blocks))):
            region = tuple(slice(i * b, (i + 1) * b) for i, b in zip(idx, blocks))
            part = data[(slice(None), *region)].reshape(data.shape[0], -1)
            at = (slice(None), *(s + i for s, i in zip(start, idx)))
            lo[at], hi[at] = part.min(axis=1), part.max(axis=1)
    shape = "x".join(str(b) for b in blocks)
    return lo, hi, tuple(float(b) for b in blocks), f"minima and maxima of {shape}-px blocks"


def _mode(values: np.ndarray) -> float:
    """The most common value, to 1/256 of the range (the median of the modal bin)."""
    values = values[np.isfinite(values)]
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return lo
    counts, edges = np.histogram(values, bins=256, range=(lo, hi))
    k = int(np.argmax(counts))
    inside = values[(values >= edges[k]) & (values <= edges[k + 1])]
    return float(np.median(inside))


def find_background(
    source: Any,
    view: ChannelFirstView,
    norm: Any,
    plan: TilePlan,
    tolerance: float = 0.05,
    value: float | None = None,
) -> BackgroundMap:
    """Decide which tiles of ``plan`` lie in flat background.

    Parameters
    ----------
    source : ImageSource
        The opened image (its pyramid levels are looked at).
    view : ChannelFirstView
        The model's view of the chosen level.
    norm : Normalization
        The run's intensity normalisation (values are compared in model input units).
    plan : TilePlan
        The run's tiles.
    tolerance : float
        Largest deviation from the background value, in model input units (0.05 = 5% of
        the normalised range, about 13 grey levels of an 8-bit image).
    value : float, optional
        Background value in model input units; by default the most common value of the
        coarse map (glass, empty resin, air).

    Returns
    -------
    BackgroundMap
    """
    if not (np.isfinite(tolerance) and tolerance >= 0):
        raise InvalidArgumentError(f"background tolerance {tolerance!r} must be >= 0")
    coarse = None
    if source.level == 0 and len(source.level_data) > 1:
        coarse = _coarse_from_level(source, view, norm, plan)
    if coarse is None:
        coarse = _coarse_from_tiles(view, norm, plan)
    lo, hi, factors, method = coarse
    mid = (lo + hi) / 2
    if value is None:
        bg = [_mode(mid[c]) for c in range(mid.shape[0])]
    else:
        bg = [float(value)] * mid.shape[0]
    target = np.asarray(bg, np.float32).reshape(-1, *(1,) * (mid.ndim - 1))
    flat = ((np.abs(lo - target) <= tolerance) & (np.abs(hi - target) <= tolerance)).all(axis=0)
    skip = np.zeros(plan.grid, dtype=bool)
    for tile in plan:
        bounds = tuple(
            slice(int(max(0, s) // f), int(-(-min(n, s + w) // f)))
            for s, w, n, f in zip(tile.read_start, plan.window, plan.image_shape, factors)
        )
        skip[tile.index] = bool(flat[bounds].all())
    log.info("background: %d of %d tiles within %.3g of %s (%s)", skip.sum(), skip.size,
             tolerance, [round(v, 4) for v in bg], method)
    return BackgroundMap(skip, bg, float(tolerance), method)

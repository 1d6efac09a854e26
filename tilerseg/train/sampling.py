"""Training patches with the engine's geometry, 2D and 3D: per-axis admissible windows,
mirror-windowed reads, foreground oversampling, normalisation."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..engine.windows import read_window
from ..errors import InvalidArgumentError
from ..geometry import ModelGeometry
from ..models import model_geometry
from ..normalize import Normalization, resolve_normalization
from .augment import augment
from .data import Pair

__all__ = ["DEFAULT_OUTPUT_3D", "PatchSampler", "foreground_fraction", "pair_normalization",
           "training_normalize", "training_window"]

log = logging.getLogger(__name__)

DEFAULT_OUTPUT_3D = (16, 64, 64)
"""Default output of a 3D training window ``(Z, Y, X)``: the window is the smallest
admissible input giving at least this output (``48 x 156 x 156`` -> ``16 x 68 x 68`` for
``unet3d``'s default depth 3), one step of a few tenths of a second on 2 CPU cores."""

_MAX_LOCATIONS = 10_000
"""Foreground voxels kept per class and volume for oversampling (evenly strided)."""


def training_window(geometry: ModelGeometry, window: int | Sequence[int] | None
                    ) -> tuple[int, ...]:
    """The training input window per axis: ``window`` (one side for all axes, or one per
    axis) rounded up to admissible sizes on each axis.

    Default: in 2D the smallest admissible side of at least 380 px, or of twice the halo
    plus one pooling step where that is more (FCN-8s); in 3D the smallest admissible
    input with an output of at least :data:`DEFAULT_OUTPUT_3D`.

    Raises
    ------
    InvalidArgumentError
        Not one positive side or one per axis.

    Examples
    --------
    >>> from tilerseg.geometry import ModelGeometry
    >>> g = ModelGeometry(3, 4, 3, (2, 8, 8), (34, 92, 92), (32, 88, 88), (16, 44, 44))
    >>> training_window(g, None), training_window(g, (40, 100, 100)), training_window(g, 96)
    ((48, 156, 156), (40, 100, 100), (96, 100, 100))
    """
    n = geometry.ndim
    if window is None:
        if n == 3:
            wanted: tuple[int, ...] = tuple(o + 2 * h for o, h in zip(DEFAULT_OUTPUT_3D,
                                                                      geometry.halo))
        else:
            wanted = tuple(max(380, 2 * h + s) for h, s in zip(geometry.halo, geometry.step))
    else:
        values = [window] if isinstance(window, (int, np.integer)) else list(window)
        ok = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1
                 for v in values)
        if not ok or len(values) not in (1, n):
            raise InvalidArgumentError(
                f"window={window!r} must be one positive side or {n} (one per axis"
                f"{', Z,Y,X' if n == 3 else ''})")
        wanted = tuple(int(v) for v in values) * (n if len(values) == 1 else 1)
    return tuple(geometry.admissible_input(w, a) for a, w in enumerate(wanted))


def foreground_fraction(fraction: float | None, ndim: int) -> float:
    """The share of patches centred on foreground: ``fraction``, or by default 1/3 in 3D
    (nnU-Net's oversampling) and 0 in 2D (the paper's uniform tiles)."""
    if fraction is None:
        return 1 / 3 if ndim == 3 else 0.0
    return float(fraction)


def training_normalize(normalize: Any, ndim: int) -> Any:
    """The normalisation a run trains with (and the model states for inference):
    ``normalize``, where ``"auto"`` means ``"zscore"`` for volumes (per channel, over the
    foreground of each volume, as nnU-Net normalises MRI) and stays ``"auto"`` in 2D.

    Examples
    --------
    >>> training_normalize("auto", 3), training_normalize("auto", 2)
    ('zscore', 'auto')
    """
    if normalize in ("auto", True) and ndim == 3:
        return "zscore"
    return normalize


def pair_normalization(pair: Pair, normalize: Any) -> Normalization:
    """The global normalisation of one training image, computed once from all of it
    (``sample()`` is the whole channel-first image)."""
    return resolve_normalization(normalize, pair.image.dtype, lambda: pair.image)


def _locations(mask: np.ndarray) -> dict[int, np.ndarray]:
    """Flat indices of (at most :data:`_MAX_LOCATIONS`) voxels of each foreground class."""
    out = {}
    flat = mask.ravel()
    for c in np.unique(flat).tolist():
        if c > 0:
            where = np.flatnonzero(flat == c)
            stride = -(-len(where) // _MAX_LOCATIONS)
            out[int(c)] = where[::stride]
    return out


def one_side(values: Sequence[int]) -> int | tuple[int, ...]:
    """One int where all axes agree (2D records and messages as before), else the tuple.

    Examples
    --------
    >>> one_side((380, 380)), one_side((48, 156, 156))
    (380, (48, 156, 156))
    """
    return values[0] if len(set(values)) == 1 else tuple(values)


class PatchSampler:
    """Random training tiles with the engine's geometry and mirror padding, 2D or 3D.

    A tile is an admissible input window (per axis) at a random position of a random
    image, read with :func:`tilerseg.engine.read_window` (so image borders are mirrored
    exactly as at inference), normalised as the image is at inference, augmented
    together with its mask and weight map, and paired with the label crop the model
    predicts for it. A share ``foreground`` of tiles (default 1/3 in 3D, none in 2D) is
    placed instead so that a random voxel of a random foreground class of the chosen
    volume lies at the centre of the output (shifted only to stay inside the image).

    Attributes
    ----------
    windows, halos, outs : tuple of int
        Input window, halo and kept output per axis.
    window, halo, out : int or tuple of int
        The same, one int where all axes agree.
    norms : list of Normalization
        Each image's normalisation.
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        weights: Sequence[np.ndarray] | None,
        model: nn.Module,
        window: int | Sequence[int] | None,
        config: Any,
        rng: np.random.Generator,
        norms: Sequence[Normalization] | None = None,
    ) -> None:
        g = model_geometry(model)
        self.pairs, self.weights, self.config, self.rng = pairs, weights, config, rng
        self.ndim = g.ndim
        self.windows = training_window(g, window)
        self.halos = g.halo
        self.outs = tuple(w - 2 * h for w, h in zip(self.windows, self.halos))
        spec = training_normalize(getattr(config, "normalize", "auto"), g.ndim)
        self.norms = (list(norms) if norms is not None
                      else [pair_normalization(p, spec) for p in pairs])
        self.foreground = foreground_fraction(getattr(config, "foreground", None), g.ndim)
        elastic_p = getattr(config, "elastic_p", None)
        self.elastic_p = (1.0 if g.ndim == 2 else 0.2) if elastic_p is None else float(elastic_p)
        self.locations = [_locations(p.mask) for p in pairs] if self.foreground > 0 else []

    window = property(lambda self: one_side(self.windows))
    halo = property(lambda self: one_side(self.halos))
    out = property(lambda self: one_side(self.outs))

    def origin(self, k: int) -> tuple[int, ...]:
        """A random output origin in image ``k`` (on foreground with the chosen share)."""
        shape = self.pairs[k].mask.shape
        if self.foreground > 0 and self.rng.random() < self.foreground and self.locations[k]:
            found = self.locations[k]
            classes = sorted(found)
            where = found[classes[int(self.rng.integers(len(classes)))]]
            voxel = np.unravel_index(int(where[int(self.rng.integers(len(where)))]), shape)
            return tuple(min(max(0, int(v) - o // 2), max(0, n - o))
                         for v, o, n in zip(voxel, self.outs, shape))
        return tuple(int(self.rng.integers(0, max(1, n - o + 1)))
                     for n, o in zip(shape, self.outs))

    def sample(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One tile: input ``(C, *windows)`` float32, labels and weights ``(*outs)``."""
        k = int(self.rng.integers(len(self.pairs)))
        pair = self.pairs[k]
        origin = self.origin(k)
        start = tuple(o - h for o, h in zip(origin, self.halos))
        size = self.windows
        image = self.norms[k](read_window(pair.image, start, size))
        mask = read_window(pair.mask[None], start, size)[0]
        weights = None if self.weights is None else read_window(self.weights[k][None], start,
                                                                size)[0]
        c = self.config
        spacing = pair.relative_spacing() if self.ndim == 3 else None
        elastic = c.elastic and (self.elastic_p >= 1 or (
            self.elastic_p > 0 and self.rng.random() < self.elastic_p))
        image, mask, weights = augment(image, mask, weights, self.rng, elastic=elastic,
                                       flips=c.flips, grey=c.grey, spacing=spacing)
        keep = tuple(slice(h, h + o) for h, o in zip(self.halos, self.outs))
        w = np.ones(size, np.float32) if weights is None else weights
        return (np.ascontiguousarray(image, dtype=np.float32),
                np.ascontiguousarray(mask[keep], dtype=np.int64),
                np.ascontiguousarray(w[keep], dtype=np.float32))

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``size`` tiles as tensors ``(B, C, *windows)``, ``(B, *outs)``, ``(B, *outs)``."""
        tiles = [self.sample() for _ in range(size)]
        return tuple(torch.from_numpy(np.stack(parts)) for parts in zip(*tiles))

"""Pure shape arithmetic of the overlap-tile strategy.

Nothing here imports torch, dask or zarr or touches a file: a :class:`ModelGeometry` is
derived from a model once (see :func:`tilerseg.models.model_geometry`), and everything
else is integer arithmetic on shapes.

Coordinates
-----------
All positions are array indices (rows, columns, planes), never x/y. A tile's *read
window* is given in image coordinates and may start before 0 or end past the image: those
pixels are filled by mirror reflection (numpy ``mode="reflect"``), see
:func:`reflect_indices`.

Exactness
---------
The one-shot reference pads the whole image by ``halo`` on every side and runs the model
once; its pooling grid starts at image coordinate ``-halo``. A tile whose window starts at
``origin - halo`` shares that grid exactly when ``origin`` is a multiple of the pooling
step, so output tiles are multiples of the step and start on the step grid.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import InvalidArgumentError, InvalidModelError

__all__ = ["ModelGeometry", "Tile", "TilePlan", "plan_tiles", "reflect_indices", "normalize_tile"]


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


@dataclass(frozen=True)
class ModelGeometry:
    """The input/output contract of a fully convolutional model, per spatial axis.

    Parameters
    ----------
    ndim : int
        Number of spatial axes (2 for images, 3 for volumes).
    in_channels, out_channels : int
        Channels the model takes and produces.
    step : tuple of int
        Pooling step: admissible input sides differ by multiples of it, and tile origins
        must sit on its grid (``2**depth`` for a U-Net).
    min_input : tuple of int
        Smallest admissible input side (the model runs and produces at least one pixel).
    shrink : tuple of int
        Input side minus output side (``2 * halo`` for valid convolutions, 0 for same).
    halo : tuple of int
        Context the model needs on each side of an output pixel. For a valid-convolution
        model this is ``shrink // 2``; for a same-padded one it is its receptive-field
        radius, so that zero padding never reaches a kept pixel.

    Examples
    --------
    The paper's network (depth 4): 572 -> 388, admissible sides ``16 b + 124``.

    >>> g = ModelGeometry(2, 1, 2, step=(16, 16), min_input=(188, 188),
    ...                   shrink=(184, 184), halo=(92, 92))
    >>> g.output_size(572)
    388
    >>> g.is_admissible(572), g.is_admissible(570)
    (True, False)
    >>> g.window_for_tile(1024)
    1212
    """

    ndim: int
    in_channels: int
    out_channels: int
    step: tuple[int, ...]
    min_input: tuple[int, ...]
    shrink: tuple[int, ...]
    halo: tuple[int, ...]

    def __post_init__(self) -> None:
        for name in ("step", "min_input", "shrink", "halo"):
            value = tuple(int(v) for v in getattr(self, name))
            if len(value) != self.ndim:
                raise InvalidModelError(
                    f"geometry {name}={value} has {len(value)} entries; expected ndim={self.ndim}"
                )
            object.__setattr__(self, name, value)
        if self.ndim < 1 or self.in_channels < 1 or self.out_channels < 1:
            raise InvalidModelError(
                f"geometry needs ndim, in_channels and out_channels >= 1, got "
                f"{self.ndim}, {self.in_channels}, {self.out_channels}"
            )
        for a in range(self.ndim):
            s, m, k, h = self.step[a], self.min_input[a], self.shrink[a], self.halo[a]
            if s < 1 or m < 1 or k < 0 or k % 2 or h < k // 2 or m - k < 1:
                raise InvalidModelError(
                    f"inconsistent geometry on axis {a}: step={s}, min_input={m}, "
                    f"shrink={k}, halo={h} (expected step >= 1, even shrink, "
                    "halo >= shrink / 2 and a positive output at min_input)"
                )

    def as_dict(self) -> dict[str, int | list[int]]:
        """Plain JSON values (for model files and run manifests)."""
        return {"ndim": self.ndim, "in_channels": self.in_channels,
                "out_channels": self.out_channels, "step": list(self.step),
                "min_input": list(self.min_input), "shrink": list(self.shrink),
                "halo": list(self.halo)}

    @classmethod
    def from_dict(cls, values: dict) -> ModelGeometry:
        """The geometry of :meth:`as_dict`'s values (extra keys are ignored).

        Raises
        ------
        InvalidModelError
            Missing or inconsistent values.
        """
        try:
            return cls(int(values["ndim"]), int(values["in_channels"]),
                       int(values["out_channels"]), tuple(values["step"]),
                       tuple(values["min_input"]), tuple(values["shrink"]),
                       tuple(values["halo"]))
        except (KeyError, TypeError, ValueError) as err:
            raise InvalidModelError(f"incomplete geometry record ({err})") from None

    # -- per-axis arithmetic -------------------------------------------------------------
    def is_admissible(self, n: int, axis: int = 0) -> bool:
        """Whether an input side ``n`` runs without any pooling layer flooring its size."""
        m, s = self.min_input[axis], self.step[axis]
        return n >= m and (n - m) % s == 0

    def admissible_input(self, n: int, axis: int = 0) -> int:
        """Smallest admissible input side that is at least ``n``."""
        m, s = self.min_input[axis], self.step[axis]
        return m if n <= m else m + _round_up(n - m, s)

    def admissible_inputs(self, count: int = 4, axis: int = 0) -> list[int]:
        """The ``count`` smallest admissible input sides (for messages)."""
        return [self.min_input[axis] + i * self.step[axis] for i in range(count)]

    def output_size(self, n: int, axis: int = 0) -> int:
        """Output side for an admissible input side ``n``."""
        if not self.is_admissible(n, axis):
            raise InvalidArgumentError(
                f"input side {n} is not admissible on axis {axis}; admissible sides are "
                f"{self.min_input[axis]} + k * {self.step[axis]}, e.g. "
                f"{self.admissible_inputs(axis=axis)}"
            )
        return n - self.shrink[axis]

    def window_for_tile(self, tile: int, axis: int = 0) -> int:
        """Input window side that yields an output tile of side ``tile`` with full context."""
        return self.admissible_input(tile + 2 * self.halo[axis], axis)

    def crop_offset(self, axis: int = 0) -> int:
        """Index in the model output of the first kept pixel (0 for valid models)."""
        return self.halo[axis] - self.shrink[axis] // 2

    def per_plane(self) -> "ModelGeometry":
        """This geometry with a leading pass-through axis: a 2D model run plane by plane.

        The new axis has step 1, no halo and no shrink, so a z-stack is cut into single
        planes that the model sees one at a time.

        Examples
        --------
        >>> g = ModelGeometry(2, 1, 2, (16, 16), (188, 188), (184, 184), (92, 92))
        >>> g.per_plane().halo, g.per_plane().step
        ((0, 92, 92), (1, 16, 16))
        """
        return ModelGeometry(
            self.ndim + 1, self.in_channels, self.out_channels, (1, *self.step),
            (1, *self.min_input), (0, *self.shrink), (0, *self.halo),
        )

    @property
    def is_valid(self) -> bool:
        """True for valid-convolution models (the output is smaller than the input)."""
        return all(k > 0 for k in self.shrink)


def normalize_tile(
    tile: int | Sequence[int], geometry: ModelGeometry, image_shape: Sequence[int]
) -> tuple[int, ...]:
    """Validate an output tile size and clip it to the image.

    Parameters
    ----------
    tile : int or sequence of int
        Output tile side in pixels, one for all axes or one per spatial axis. Each must be
        a positive multiple of the model's pooling step.
    geometry : ModelGeometry
        The model's contract.
    image_shape : sequence of int
        Spatial shape of the image; a tile larger than the image (rounded up to the
        step) is reduced to it, which changes nothing but the work done.

    Returns
    -------
    tuple of int
        One tile side per spatial axis.

    Examples
    --------
    >>> g = ModelGeometry(2, 1, 2, (16, 16), (188, 188), (184, 184), (92, 92))
    >>> normalize_tile(512, g, (40, 3000))
    (48, 512)
    """
    nd = geometry.ndim
    if isinstance(tile, (int, np.integer)) and not isinstance(tile, bool):
        sides = (int(tile),) * nd
    elif (
        isinstance(tile, Sequence)
        and len(tile) == nd
        and all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in tile)
    ):
        sides = tuple(int(t) for t in tile)
    else:
        raise InvalidArgumentError(
            f"tile={tile!r} is not usable; expected a positive integer or {nd} integers"
        )
    out = []
    for axis, (t, size) in enumerate(zip(sides, image_shape)):
        s = geometry.step[axis]
        if t <= 0 or t % s:
            examples = ", ".join(str(s * k) for k in (16, 32, 48, 64))
            raise InvalidArgumentError(
                f"tile={tile!r} is not admissible: output tile sides must be positive "
                f"multiples of the model's pooling step {s} (e.g. {examples})"
            )
        out.append(min(t, _round_up(int(size), s)))
    return tuple(out)


def reflect_indices(start: int, size: int, n: int) -> np.ndarray:
    """Source indices of ``size`` positions from ``start`` in a mirror-extended axis.

    The extension is numpy's ``mode="reflect"`` (the edge pixel is not repeated),
    continued periodically where the window reaches further than the image is long,
    exactly as ``np.pad(..., mode="reflect")`` does for wide pads.

    Parameters
    ----------
    start : int
        First position, in image coordinates (may be negative).
    size : int
        Number of positions.
    n : int
        Length of the image axis (>= 1).

    Returns
    -------
    numpy.ndarray of int64, shape (size,)

    Examples
    --------
    >>> reflect_indices(-3, 9, 4).tolist()
    [3, 2, 1, 0, 1, 2, 3, 2, 1]
    """
    idx = np.arange(start, start + size, dtype=np.int64)
    if n == 1:
        return np.zeros(size, dtype=np.int64)
    period = 2 * (n - 1)
    idx %= period
    return np.where(idx >= n, period - idx, idx)


@dataclass(frozen=True)
class Tile:
    """One tile of a :class:`TilePlan`.

    Attributes
    ----------
    index : tuple of int
        Position in the tile grid.
    read_start : tuple of int
        Origin of the input window in image coordinates; the window may reach outside the
        image, where it is filled by reflection.
    write : tuple of slice
        Region of the image (and of the output) this tile produces, clipped to the image.
    crop : tuple of slice
        Region of the model output that is written to ``write``.
    """

    index: tuple[int, ...]
    read_start: tuple[int, ...]
    write: tuple[slice, ...]
    crop: tuple[slice, ...]


@dataclass(frozen=True)
class TilePlan:
    """How an image is cut into overlapping input windows and disjoint output tiles.

    Output tiles of side ``tile`` start at multiples of ``tile`` (hence on the pooling
    grid) and partition the image; the last tile on each axis is clipped to it. Every
    input window has the same side ``window``, so tiles batch without padding.

    Parameters
    ----------
    image_shape : tuple of int
        Spatial shape of the image.
    tile : tuple of int
        Output tile side per axis (multiples of ``geometry.step``).
    geometry : ModelGeometry
        The model's contract.

    Examples
    --------
    >>> g = ModelGeometry(2, 1, 2, (16, 16), (188, 188), (184, 184), (92, 92))
    >>> p = TilePlan((1000, 2048), (512, 1024), g)
    >>> p.grid, p.window, len(p)
    ((2, 2), (700, 1212), 4)
    >>> t = p[1, 0]
    >>> t.read_start, t.write, t.crop
    ((420, -92), (slice(512, 1000, None), slice(0, 1024, None)), (slice(0, 488, None), slice(0, 1024, None)))
    """

    image_shape: tuple[int, ...]
    tile: tuple[int, ...]
    geometry: ModelGeometry
    window: tuple[int, ...] = field(init=False)
    grid: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        g = self.geometry
        shape = tuple(int(n) for n in self.image_shape)
        tile = tuple(int(t) for t in self.tile)
        if len(shape) != g.ndim or len(tile) != g.ndim:
            raise InvalidArgumentError(
                f"image_shape={shape} and tile={tile} must both have {g.ndim} entries"
            )
        if any(n < 1 for n in shape):
            raise InvalidArgumentError(f"image_shape={shape} must be positive on every axis")
        if any(t < 1 or t % s for t, s in zip(tile, g.step)):
            raise InvalidArgumentError(
                f"tile={tile} must be positive multiples of the pooling step {g.step}"
            )
        object.__setattr__(self, "image_shape", shape)
        object.__setattr__(self, "tile", tile)
        object.__setattr__(
            self, "window", tuple(g.window_for_tile(t, a) for a, t in enumerate(tile))
        )
        object.__setattr__(self, "grid", tuple(-(-n // t) for n, t in zip(shape, tile)))

    def __len__(self) -> int:
        return int(np.prod(self.grid))

    def __iter__(self) -> Iterator[Tile]:
        for index in itertools.product(*(range(k) for k in self.grid)):
            yield self[index]

    def __getitem__(self, index: tuple[int, ...]) -> Tile:
        g = self.geometry
        read, write, crop = [], [], []
        for a, k in enumerate(index):
            if not 0 <= k < self.grid[a]:
                raise IndexError(f"tile index {index} outside grid {self.grid}")
            lo = k * self.tile[a]
            hi = min(lo + self.tile[a], self.image_shape[a])
            c = g.crop_offset(a)
            read.append(lo - g.halo[a])
            write.append(slice(lo, hi))
            crop.append(slice(c, c + hi - lo))
        return Tile(tuple(index), tuple(read), tuple(write), tuple(crop))


def plan_tiles(
    image_shape: Sequence[int], geometry: ModelGeometry, tile: int | Sequence[int]
) -> TilePlan:
    """Plan the tiles for an image of spatial shape ``image_shape``.

    Parameters
    ----------
    image_shape : sequence of int
        Spatial shape (rows, columns[, ...]) of the image, without channels.
    geometry : ModelGeometry
        The model's contract.
    tile : int or sequence of int
        Output tile side(s); validated and clipped by :func:`normalize_tile`.

    Returns
    -------
    TilePlan

    Examples
    --------
    >>> g = ModelGeometry(2, 1, 2, (16, 16), (188, 188), (184, 184), (92, 92))
    >>> plan_tiles((1, 5000), g, 1024).tile
    (16, 1024)
    """
    shape = tuple(int(n) for n in image_shape)
    return TilePlan(shape, normalize_tile(tile, geometry, shape), geometry)

"""What a reader returns: a lazily readable image with its axes and physical pixel size."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

__all__ = ["ArrayLike", "ImageSource", "AXES"]

AXES = "TCZYXS"
"""Axis letters: T time, C channel, Z plane, Y row, X column, S sample (RGB(A) components)."""


class ArrayLike(Protocol):
    """What tilerseg reads from: shape, dtype and basic slicing that returns numpy."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def __getitem__(self, key: Any) -> Any: ...


@dataclass(frozen=True)
class ImageSource:
    """A lazily readable image.

    Attributes
    ----------
    data : ArrayLike
        The chosen pyramid level, in the order given by ``axes``. Slicing it reads only
        what is asked for (a zarr array over a TIFF or Zarr store, a memory map...).
    axes : str
        One letter per axis of ``data``, from ``"TCZYXS"``, e.g. ``"YX"``, ``"CYX"``,
        ``"ZYX"``, ``"YXS"`` (RGB), ``"CZYX"``.
    pixel_size : dict of str to float
        Physical pixel size in micrometres per spatial axis (``"Z"``, ``"Y"``, ``"X"``)
        at the chosen level, where the file records it; missing axes are unknown.
    levels : tuple of tuple of int
        Shapes of all pyramid levels, full resolution first (one entry if no pyramid).
    level : int
        Index of the chosen level in ``levels``.
    format : str
        ``"tiff"``, ``"ome-tiff"``, ``"svs"``, ``"tiff-sequence"``, ``"zarr"``,
        ``"ome-zarr"``, ``"npy"``, ``"png"``, ``"jpeg"``, ``"dicom"``, ``"dicom-series"``,
        ``"array"`` or ``"dask"``.
    path : str or None
        Where it was read from.
    level_data : tuple
        Lazy arrays of every level (same axes), e.g. to estimate statistics from a
        low-resolution level.
    window : (float, float) or None
        The display window ``(centre, width)`` the file records (DICOM WindowCenter and
        WindowWidth, in rescaled units), used by ``normalize=("window", "dicom")``.
    """

    data: ArrayLike
    axes: str
    pixel_size: dict[str, float] = field(default_factory=dict)
    levels: tuple[tuple[int, ...], ...] = ()
    level: int = 0
    format: str = "array"
    path: str | None = None
    level_data: tuple[ArrayLike, ...] = ()
    window: tuple[float, float] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data.dtype)

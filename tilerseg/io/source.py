"""What a reader returns: a lazily readable image with its axes and physical pixel size."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

__all__ = ["ArrayLike", "ImageSource", "ImageSpace", "AXES"]

AXES = "TCZYXS"
"""Axis letters: T time, C channel, Z plane, Y row, X column, S sample (RGB(A) components)."""


class ArrayLike(Protocol):
    """What tilerseg reads from: shape, dtype and basic slicing that returns numpy."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def __getitem__(self, key: Any) -> Any: ...


@dataclass(frozen=True)
class ImageSpace:
    """Where an image's voxels lie in the world, as its file records it: enough to write
    a result back in the same space (plain data: it pickles and becomes JSON).

    Attributes
    ----------
    affine : tuple of 4 tuples of 4 floats
        The 4x4 matrix taking voxel indices ``(i, j, k, 1)`` along ``axes`` to world
        coordinates in millimetres in ``frame``. For NIfTI the file's own: the sform
        when its code is above 0, else the qform (as ``nibabel``'s ``img.affine``).
    axes : str
        The image axes that the voxel indices ``i, j, k`` run along: ``"XYZ"`` for NIfTI
        (index ``i`` is the column ``X``, ``k`` the plane ``Z``).
    shape : tuple of int
        The spatial shape along ``axes`` as the file stores it (``(nx, ny, nz)``; two
        values for a 2-D NIfTI file).
    frame : str
        The world frame of ``affine``: ``"RAS"`` (x to the right, y anterior, z
        superior: NIfTI's).
    sform_code, qform_code : int
        The file's NIfTI sform and qform codes (0 unknown, 1 scanner, 2 aligned,
        3 Talairach, 4 MNI, 5 template); 0 where the format has none.
    header : bytes
        The file's header as stored (NIfTI-1: 348 bytes, NIfTI-2: 540; no extensions),
        to write the result with the same header; empty where there is none.
    header_format : str
        ``"nifti1"`` or ``"nifti2"`` (what ``header`` is), or ``""``.

    Examples
    --------
    >>> space = ImageSpace(((2.0, 0, 0, -10.0), (0, 2.0, 0, 0), (0, 0, 3.0, 5.0), (0, 0, 0, 1)),
    ...                    "XYZ", (4, 5, 6), sform_code=2)
    >>> ImageSpace.from_dict(space.to_dict()) == space
    True
    """

    affine: tuple[tuple[float, ...], ...]
    axes: str
    shape: tuple[int, ...]
    frame: str = "RAS"
    sform_code: int = 0
    qform_code: int = 0
    header: bytes = b""
    header_format: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The space as JSON values (``header`` in base64)."""
        return {
            "affine": [[float(v) for v in row] for row in self.affine], "axes": self.axes,
            "shape": [int(n) for n in self.shape], "frame": self.frame,
            "sform_code": int(self.sform_code), "qform_code": int(self.qform_code),
            "header": base64.b64encode(self.header).decode("ascii"),
            "header_format": self.header_format,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageSpace:
        """The :class:`ImageSpace` of :meth:`to_dict`."""
        return cls(
            affine=tuple(tuple(float(v) for v in row) for row in data["affine"]),
            axes=str(data["axes"]), shape=tuple(int(n) for n in data["shape"]),
            frame=str(data.get("frame", "RAS")), sform_code=int(data.get("sform_code", 0)),
            qform_code=int(data.get("qform_code", 0)),
            header=base64.b64decode(data.get("header") or ""),
            header_format=str(data.get("header_format", "")),
        )


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
        ``"nifti"`` (a ``.nii`` / ``.nii.gz`` file), ``"nifti-case"`` (the modality files
        of one case), ``"array"`` or ``"dask"``.
    path : str or None
        Where it was read from.
    level_data : tuple
        Lazy arrays of every level (same axes), e.g. to estimate statistics from a
        low-resolution level.
    window : (float, float) or None
        The display window ``(centre, width)`` the file records (DICOM WindowCenter and
        WindowWidth, in rescaled units), used by ``normalize=("window", "dicom")``.
    space : ImageSpace or None
        Where the voxels lie in the world (the affine and the header of a NIfTI file),
        to write results back in the same space; None where the file records none.
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
    space: ImageSpace | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data.dtype)

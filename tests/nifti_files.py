"""Synthetic NIfTI files written with nibabel itself, for the NIfTI tests: a rotated,
translated, anisotropic affine, 3-D and 4-D files, scaled or not, and cases in nnU-Net
naming."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["AFFINE", "QFORM", "tumour", "write_case", "write_nifti_file"]

_ANGLES = np.radians([12.0, -20.0, 31.0])


def _rotation() -> np.ndarray:
    cx, cy, cz = np.cos(_ANGLES)
    sx, sy, sz = np.sin(_ANGLES)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _affine(spacing: Sequence[float], origin: Sequence[float]) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = _rotation() @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


AFFINE = _affine((1.0, 1.0, 3.0), (-91.25, 12.5, 40.0))
"""The sform: voxel (i, j, k) -> RAS mm, spacing 1 x 1 x 3 mm in x, y, z, rotated."""

QFORM = _affine((1.0, 1.0, 3.0), (-90.0, 10.0, 38.0))
"""A qform differing from the sform (its translation), to see which one is kept."""


def tumour(shape: Sequence[int] = (16, 48, 48), modalities: int = 4,
           seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``tilerseg.synthetic.tumour_volume`` (image (C, Z, Y, X) int16, labels (Z, Y, X))
    at 3 x 1 x 1 mm (Z, Y, X)."""
    from tilerseg.synthetic import tumour_volume

    return tumour_volume(tuple(shape), (3.0, 1.0, 1.0), modalities, seed=seed)


def write_nifti_file(path: Path, zyx: np.ndarray, *, channels: bool = False,
                     scaled: bool = False, units: tuple[str, str] = ("mm", "unknown"),
                     step: float | None = None, nifti2: bool = False,
                     affine: np.ndarray = AFFINE) -> Path:
    """Write ``zyx`` (``(Z, Y, X)``, or ``(C, Z, Y, X)`` with ``channels``) as a NIfTI file
    in NIfTI's voxel order ``(X, Y, Z[, C])``, sform ``affine`` (code 2, aligned) and qform
    :data:`QFORM` (code 1, scanner). ``scaled`` stores float values as int16 with
    nibabel's own slope and intercept; ``units`` and ``step`` (``pixdim[4]``) set the
    header's xyzt_units and 4th step. ``.gz`` names are gzipped by nibabel."""
    import nibabel as nib

    data = np.asarray(zyx)
    data = data.transpose(3, 2, 1, 0) if channels else data.transpose(2, 1, 0)
    if scaled:
        data = data.astype(np.float32) * np.float32(0.37) + np.float32(-12.5)
    cls = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    image = cls(np.ascontiguousarray(data), affine)
    image.set_sform(affine, code=2)
    image.set_qform(QFORM, code=1)
    if scaled:
        image.set_data_dtype(np.int16)
    image.header.set_xyzt_units(*units)
    if step is not None:
        image.header["pixdim"][4] = step
    nib.save(image, path)
    return Path(path)


def write_case(folder: Path, case: str, image: np.ndarray, *, ext: str = ".nii.gz",
               indices: Sequence[int] | None = None) -> list[Path]:
    """Write the modalities of ``image`` (``(C, Z, Y, X)``) as nnU-Net files
    ``folder/CASE_0000.nii.gz``... (``indices`` renames them: a gap, for example)."""
    folder.mkdir(parents=True, exist_ok=True)
    indices = range(len(image)) if indices is None else indices
    return [write_nifti_file(folder / f"{case}_{i:04d}{ext}", modality)
            for i, modality in zip(indices, image)]

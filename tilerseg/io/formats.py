"""The image file formats tilerseg reads, by extension: the one list every caller uses.

Examples
--------
>>> is_image_file("slide.OME.TIF"), is_image_file("notes.txt")
(True, False)
>>> strip_image_suffix("slide.ome.tif"), strip_image_suffix("stack")
('slide', 'stack')
>>> strip_image_suffix("case.nii.gz"), is_image_file("BRATS_001_0000.NII.GZ")
('case', True)
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any

from tilerseg.errors import ImageNotFoundError

__all__ = [
    "FORMAT_BY_EXTENSION",
    "IMAGE_EXTENSIONS",
    "SLICE_EXTENSIONS",
    "image_paths",
    "is_image_file",
    "is_zarr_dir",
    "natural_key",
    "strip_image_suffix",
]

FORMAT_BY_EXTENSION = {
    ".tif": "tiff", ".tiff": "tiff", ".btf": "tiff", ".tf8": "tiff", ".svs": "tiff",
    ".ndpi": "tiff", ".lsm": "tiff", ".qptiff": "tiff", ".scn": "tiff",
    ".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".npy": "npy",
    ".dcm": "dicom", ".dicom": "dicom", ".nii": "nifti", ".nii.gz": "nifti",
}  # fmt: skip
"""Single-file image formats by (lower-case) extension; the reader checks the magic bytes."""

IMAGE_EXTENSIONS = tuple(FORMAT_BY_EXTENSION)
"""Extensions of the single-file images tilerseg reads (folders of them, batches...)."""

SLICE_EXTENSIONS = (".tif", ".tiff")
"""Extensions of the 2D slices a folder or glob is read as a z-stack from."""

_NAMED_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.zarr", ".zarr") + IMAGE_EXTENSIONS


def is_image_file(name: str) -> bool:
    """Whether ``name`` has the extension of a single-file image tilerseg reads."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def strip_image_suffix(name: str) -> str:
    """``name`` without its image extension (``.ome.tif``, ``.zarr``, ``.png``...)."""
    lower = name.lower()
    for suffix in sorted(_NAMED_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def is_zarr_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Zarr (v2 or v3) array or group directory."""
    return any(os.path.exists(os.path.join(path, m)) for m in ("zarr.json", ".zarray", ".zgroup"))


def natural_key(text: str) -> list[Any]:
    """Sort key putting ``img2`` before ``img10`` (case-insensitive).

    Examples
    --------
    >>> sorted(["b10", "b2", "A1"], key=natural_key)
    ['A1', 'b2', 'b10']
    """
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def image_paths(path: str, what: str = "image") -> list[str]:
    """The images a path names, in natural order: a file or Zarr store, a folder of DICOM
    files (one series, one image), the image files and ``.zarr`` stores of another folder
    (not hidden), or what a glob matches.

    In a folder of images (``what="image"``), NIfTI modality files in nnU-Net naming
    (``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``...) are one image per case, named by
    its identifier ``folder/CASE`` (which :func:`tilerseg.open_image` reads); other
    ``what`` (labels, masks) list files as they are.

    Raises
    ------
    ImageNotFoundError
        The path does not exist, the folder holds no images, the glob matches nothing.
    """
    if os.path.isdir(path):
        if is_zarr_dir(path):
            return [path]
        from tilerseg.io.dicom import dicom_files  # here: io.dicom imports this module

        if dicom_files(path):  # a DICOM series (any file names) is one image
            return [path]
        names = sorted((n for n in os.listdir(path) if not n.startswith(".")), key=natural_key)
        found = [
            os.path.join(path, n) for n in names
            if (is_image_file(n) and os.path.isfile(os.path.join(path, n)))
            or (n.lower().endswith(".zarr") and os.path.isdir(os.path.join(path, n)))
        ]
        if what == "image":
            from tilerseg.io.nifti import nifti_cases

            cases = nifti_cases(path, [os.path.basename(f) for f in found])
            found = list(dict.fromkeys(cases.get(os.path.basename(f), f) for f in found))
        if not found:
            raise ImageNotFoundError(
                f"folder {path} holds no {what} files (TIFF, PNG, JPEG, DICOM, NIfTI, .npy "
                "or .zarr)")
        return found
    if os.path.isfile(path):
        return [path]
    if any(c in path for c in "*?["):
        matches = sorted(glob.glob(path), key=natural_key)
        if not matches:
            raise ImageNotFoundError(f"{what} glob {path} matches no files")
        return matches
    raise ImageNotFoundError(f"{what} {path} does not exist")

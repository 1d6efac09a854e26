"""Synthetic DICOM files written with pydicom's own writer (uncompressed, Explicit VR Little
Endian), for the DICOM tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["rle_compress", "write_dicom", "write_series"]


def write_dicom(path: Path, pixels: np.ndarray, *, frames: bool = False,
                photometric: str | None = None, series: str | None = None,
                **tags: Any) -> Path:
    """Write ``pixels`` as a DICOM file with ``tags`` (keyword = value).

    ``pixels`` is ``(rows, columns)``, ``(rows, columns, 3)`` (RGB) or, with
    ``frames=True``, ``(frames, rows, columns)``.
    """
    import pydicom  # here, so that collecting this module needs no pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    pixels = np.ascontiguousarray(pixels)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series or generate_uid()
    rgb = pixels.ndim == 3 and not frames
    ds.Rows, ds.Columns = pixels.shape[1:3] if frames else pixels.shape[:2]
    if frames:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = photometric or ("RGB" if rgb else "MONOCHROME2")
    if rgb:
        ds.PlanarConfiguration = 0
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    for name, value in tags.items():
        setattr(ds, name, value)
    ds.PixelData = pixels.tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return Path(path)


def write_series(folder: Path, volume: np.ndarray, order: Sequence[int], *,
                 z0: float = 10.0, dz: float = 2.5, **tags: Any) -> list[Path]:
    """Write the planes of ``volume`` as one series, in the file order ``order``: file
    ``f`` holds plane ``order[f]`` (names and InstanceNumber follow the file order, so
    only the positions tell the planes' order)."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    paths = []
    for f, z in enumerate(order):
        paths.append(write_dicom(
            folder / f"IM{f:04d}", volume[z], series=series, InstanceNumber=f + 1,
            ImagePositionPatient=[-50.0, -40.0, z0 + dz * z],
            ImageOrientationPatient=[1, 0, 0, 0, 1, 0], **tags))
    return paths


def rle_compress(path: Path, pixels: np.ndarray, *, segments: int | None = None,
                 extra_rows: int = 0) -> Path:
    """Rewrite the single-frame DICOM file ``path`` as RLE Lossless with pydicom's own RLE
    encoder. ``segments`` overwrites the segment count in the RLE header (a corrupt
    header); ``extra_rows`` encodes that many more rows than the file declares (decoded
    segments longer than the frame: non-conformant padding)."""
    import struct

    import pydicom
    from pydicom.encaps import encapsulate, generate_frames
    from pydicom.uid import RLELossless

    ds = pydicom.dcmread(path)
    rows = int(ds.Rows)
    if extra_rows:
        pixels = np.concatenate([pixels, pixels[:extra_rows]])
        ds.Rows = rows + extra_rows
    ds.compress(RLELossless, np.ascontiguousarray(pixels))
    ds.Rows = rows
    if segments is not None:
        frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
        frame[:4] = struct.pack("<I", segments)
        ds.PixelData = encapsulate([bytes(frame)])
    ds.save_as(path)
    return Path(path)

"""NIfTI-1 and NIfTI-2 images (``.nii``, ``.nii.gz``): reading, case folders, writing.

Reading needs nibabel (``pip install "tilerseg[nifti]"``); it is imported only when a NIfTI
file is opened or written.

What is read, and how:

- Opening parses the header only (with nibabel). An uncompressed ``.nii`` is read lazily
  through a memory map of its voxel data: a window reads only the pages that hold it.
  A ``.nii.gz`` cannot be read in pieces (gzip has no random access), so its voxel data
  is decompressed whole, once, on the first pixel access (opening an image reads its
  two corner voxels, to catch truncated files early: so that is when), and kept in
  memory as stored (the volume's size in its stored dtype) for the image's lifetime;
  one lock makes the threads that read it at once decompress it only once. Each process
  (a cluster worker) decompresses it again.
- Values: ``scl_slope`` / ``scl_inter`` are applied as nibabel applies them; the result
  is float32 when they scale (slope not 1 or intercept not 0), else the stored dtype
  (big-endian data becomes native).
- Axes: NIfTI's voxel axes ``i, j, k`` are ``X, Y, Z`` (``i`` varies fastest); the
  image is ``ZYX`` (or ``CZYX``) like every other 3-D image, reordered lazily. A third
  axis of length 1 is dropped (a 2-D image).
- Pixel size: the header's zooms (``pixdim[1:4]``) in the spatial unit of
  ``xyzt_units`` (metre, mm or micron), as micrometres; an unknown unit is taken as mm,
  as NIfTI tools do.
- The 4th axis (``dim[4] > 1``) holds channels (the modalities of multi-modal MRI, as in
  the Medical Segmentation Decathlon's BraTS files) unless the header says it is time:
  the intent is "time series" (2001), or ``xyzt_units`` has a time unit (s, ms, µs)
  and the step ``pixdim[4]`` is neither 0 nor 1. Tools that always write a time unit
  (SimpleITK, ITK) write ``pixdim[4] = 1`` for non-time 4-D images, which this rule
  reads as channels; a time series is refused with a one-line error (tilerseg
  segments one time point). A 5-D file whose 4th dimension is 1 and 5th above 1
  (NIfTI's vector intent) has channels along its 5th.
- A case in nnU-Net / Decathlon naming, ``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``...
  (one 3-D file per modality, a 4-digit modality index), is one image with a channel
  per file: open it by its identifier (``imagesTr/CASE``, which exists only as those
  files) or as a folder holding exactly one case's files. The files must have the same
  shape and (to 1e-3 mm) the same affine, and the indices must run from 0000 without a
  gap. Each channel is read lazily from its own file.
- Space: the affine (sform when its code is above 0, else qform), both codes and the
  header (no extensions) are kept as :class:`~tilerseg.io.source.ImageSpace` in
  ``ImageSource.space`` (for a case: of its first file), to write results back in the
  same space (:func:`write_nifti`).

Writing (:func:`write_nifti`): the labels of a complete OME-Zarr output as a NIfTI file
with the input's header and affine (``scl_slope`` / ``scl_inter`` reset, the labels'
dtype, intent "label", the input's spatial shape in its voxel order X, Y, Z) and,
optionally, the probabilities as a 4-D float32 ``(X, Y, Z, classes)`` file with the same
affine. Both are written from memory (the labels and, for the probabilities, 4 bytes per
voxel and class) into a temporary file beside the target and renamed into place.

Examples
--------
>>> is_nifti_path("case.NII.gz"), is_nifti_path("case.nii.zip"), probabilities_path("seg.nii.gz")
(True, False, 'seg_probabilities.nii.gz')
>>> case_name("BRATS_001_0002.nii.gz"), case_name("BRATS_001.nii.gz")
(('BRATS_001', 2), None)
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import os
import re
import threading
import uuid
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tilerseg.errors import InvalidImageError, OutputError, TilersegError
from tilerseg.io.raw import RawImage, expand_key, needs, short_reason, to_micrometres, unreadable
from tilerseg.io.source import ImageSpace

__all__ = [
    "NIFTI_EXTENSIONS", "NiftiArray", "ChannelStack", "case_files", "case_name",
    "folder_case", "is_nifti_path", "looks_like_nifti", "probabilities_path",
    "read_nifti", "read_nifti_case", "run_manifest", "write_nifti",
]

log = logging.getLogger(__name__)

NIFTI_EXTENSIONS = (".nii.gz", ".nii")
"""Extensions of NIfTI files (lower case; compared case-insensitively)."""

_CASE = re.compile(r"^(?P<case>.+)_(?P<index>\d{4})(?P<ext>\.nii(?:\.gz)?)$", re.IGNORECASE)
_TIME_UNITS = ("sec", "msec", "usec")
_TIME_SERIES = 2001  # NIFTI_INTENT_TIME_SERIES
_AFFINE_TOLERANCE = 1e-3  # mm
_LABEL_INTENT = "label"  # NIFTI_INTENT_LABEL (1002)
_load_lock = threading.Lock()


def is_nifti_path(name: str | os.PathLike) -> bool:
    """Whether ``name`` (a path, or a URL's path) ends in ``.nii`` or ``.nii.gz`` (any
    case)."""
    return str(name).lower().endswith(NIFTI_EXTENSIONS)


def _split_ext(path: str) -> tuple[str, str]:
    """``path`` without its NIfTI extension, and the extension."""
    ext = ".nii.gz" if path.lower().endswith(".nii.gz") else ".nii"
    return path[: -len(ext)], path[-len(ext):]


def probabilities_path(path: str | os.PathLike) -> str:
    """Where the probabilities of NIfTI output ``path`` go: ``seg.nii.gz`` ->
    ``seg_probabilities.nii.gz``."""
    stem, ext = _split_ext(os.fspath(path))
    return f"{stem}_probabilities{ext}"


def looks_like_nifti(head: bytes, name: str) -> bool:
    """Whether a file's first 348 bytes ``head`` (and its ``name``) say it is NIfTI: the
    NIfTI-1 magic ``n+1\\0`` at byte 344, the NIfTI-2 magic ``n+2\\0`` at byte 4, or the
    gzip magic with a ``.nii.gz`` name.

    Examples
    --------
    >>> looks_like_nifti(bytes(344) + b"n+1\\0", "x"), looks_like_nifti(b"\\x1f\\x8b", "x.nii.gz")
    (True, True)
    >>> looks_like_nifti(b"\\x1f\\x8b", "x.gz")
    False
    """
    if head[344:348] == b"n+1\0" or head[4:8] == b"n+2\0":
        return True
    return head[:2] == b"\x1f\x8b" and name.lower().endswith(".nii.gz")


def case_name(name: str) -> tuple[str, int] | None:
    """The case and modality index of a file named in nnU-Net's way
    (``CASE_0000.nii.gz``), or None."""
    match = _CASE.match(name)
    return (match["case"], int(match["index"])) if match else None


def _nibabel(label: str) -> Any:
    return needs("nibabel", label, "NIfTI", '"tilerseg[nifti]"')


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _quiet_nibabel(label: str) -> Iterator[None]:
    """nibabel's header warnings (Python warnings and its ``nibabel.global`` logger, which
    prints to stderr) become warnings of this module's log, naming the file."""
    from nibabel import imageglobals

    keep = _Keep()
    with _load_lock, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handlers = list(imageglobals.logger.handlers)
        propagate = imageglobals.logger.propagate
        for handler in handlers:
            imageglobals.logger.removeHandler(handler)
        imageglobals.logger.addHandler(keep)
        imageglobals.logger.propagate = False  # nor to the root logger's handlers
        try:
            yield
        finally:
            imageglobals.logger.removeHandler(keep)
            imageglobals.logger.propagate = propagate
            for handler in handlers:
                imageglobals.logger.addHandler(handler)
    for message in keep.messages + [str(w.message) for w in caught]:
        log.warning("%s: %s", label, " ".join(message.split()))


def _load(path: str) -> Any:
    """The nibabel image of ``path`` (header parsed, no voxel read), or a one-line error."""
    nib = _nibabel(path)
    try:
        with _quiet_nibabel(path):
            image = nib.load(path, mmap=False)
    except TilersegError:
        raise
    except Exception as exc:  # noqa: BLE001 - nibabel's many header and file errors
        raise unreadable(path, short_reason(exc)) from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise unreadable(path, f"not a single-file NIfTI image ({type(image).__name__})")
    return image


class NiftiArray:
    """The voxels of one NIfTI file, lazily, in the file's axis order ``(i, j, k, ...)``.

    Slicing with integers and slices returns numpy, scaled (float32) where the header
    scales. An uncompressed file is memory-mapped; a gzipped one is decompressed whole
    on the first access and kept (see the module notes). It pickles as its path and
    header values (a process reopens the file).
    """

    def __init__(self, path: str, shape: Sequence[int], stored: np.dtype, offset: int,
                 slope: float, inter: float, compressed: bool) -> None:
        self.path = path
        self.shape = tuple(int(n) for n in shape)
        self._stored = np.dtype(stored)
        self._offset = int(offset)
        self._slope, self._inter = float(slope), float(inter)
        self.scaled = (self._slope, self._inter) != (1.0, 0.0)
        self.compressed = compressed
        self.dtype = np.dtype(np.float32) if self.scaled else self._stored.newbyteorder("=")
        self._lock = threading.Lock()
        self._voxels: np.ndarray | None = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return f"NiftiArray({self.path!r}, shape={self.shape}, dtype={self.dtype})"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_voxels"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _stored_voxels(self) -> np.ndarray:
        """The stored voxels: a memory map, or the decompressed array (made once)."""
        voxels = self._voxels
        if voxels is not None:
            return voxels
        with self._lock:
            if self._voxels is None:
                if self.compressed:  # gzip directly: no nibabel (and its globals) here
                    count = int(np.prod(self.shape))
                    size = count * self._stored.itemsize
                    log.debug("decompressing %s (%d bytes)", self.path, size)
                    try:
                        with gzip.open(self.path, "rb") as f:
                            f.seek(self._offset)
                            data = f.read(size)
                    except (OSError, EOFError) as exc:
                        raise unreadable(self.path, short_reason(exc)) from None
                    if len(data) < size:
                        raise unreadable(self.path, f"truncated: {len(data)} of the {size} "
                                         "bytes of voxel data the header describes")
                    self._voxels = np.frombuffer(data, self._stored, count).reshape(
                        self.shape, order="F")
                else:
                    self._voxels = np.memmap(self.path, dtype=self._stored, mode="r",
                                             offset=self._offset, shape=self.shape, order="F")
            return self._voxels

    def __getitem__(self, key: Any) -> np.ndarray:
        out = np.array(self._stored_voxels()[key], dtype=self._stored.newbyteorder("="))
        if not self.scaled:
            return out
        return (out.astype(np.float64) * self._slope + self._inter).astype(np.float32)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype)


class ChannelStack:
    """Arrays of one spatial shape as one lazy array with a last channel axis: the
    modality files of one case, ``(i, j, k, C)``."""

    def __init__(self, arrays: Sequence[Any]) -> None:
        self.arrays = list(arrays)
        self.shape = tuple(self.arrays[0].shape) + (len(self.arrays),)
        self.dtype = np.result_type(*(a.dtype for a in self.arrays))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return f"ChannelStack({len(self.arrays)} x {self.arrays[0]!r})"

    def __getitem__(self, key: Any) -> np.ndarray:
        key = expand_key(key, self.ndim)
        spatial, channel = key[:-1], key[-1]
        if not isinstance(channel, slice):
            return np.asarray(self.arrays[channel][spatial], dtype=self.dtype)
        planes = [np.asarray(self.arrays[c][spatial], dtype=self.dtype)
                  for c in range(len(self.arrays))[channel]]
        if not planes:
            return np.empty(np.empty(self.shape[:-1])[spatial].shape + (0,), self.dtype)
        return np.stack(planes, axis=-1)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype)


def _space(image: Any, spatial: tuple[int, ...]) -> ImageSpace:
    header = image.header
    sform, sform_code = header.get_sform(coded=True)
    qform, qform_code = header.get_qform(coded=True)
    return ImageSpace(
        affine=tuple(tuple(float(v) for v in row) for row in np.asarray(image.affine)),
        axes="XYZ", shape=spatial, frame="RAS", sform_code=int(sform_code),
        qform_code=int(qform_code), header=bytes(header.binaryblock),
        header_format="nifti2" if type(header).__name__ == "Nifti2Header" else "nifti1",
    )


def _time_step(header: Any) -> str | None:
    """What says the 4th axis is time (for the error), or None."""
    if int(header["intent_code"]) == _TIME_SERIES:
        return "its intent is 'time series'"
    unit = header.get_xyzt_units()[1]
    step = float(header["pixdim"][4])
    if unit in _TIME_UNITS and np.isfinite(step) and step not in (0.0, 1.0):
        return f"xyzt_units give the unit {unit} and pixdim[4] a step of {step:g}"
    return None


def _axes(image: Any, label: str) -> list[str]:
    """One axis name per voxel-array dimension (see the module notes)."""
    shape = tuple(int(n) for n in image.shape)
    if len(shape) < 2:
        raise InvalidImageError(f"{label} has {len(shape)} dimension (shape {shape}); "
                                "NIfTI images of 2 to 5 dimensions are read")
    axes = ["X", "Y"] + (["Z" if shape[2] > 1 else "k"] if len(shape) > 2 else [])
    if len(shape) >= 4:
        extra = shape[3:]
        if len(shape) > 5 and any(n > 1 for n in shape[5:]):
            raise InvalidImageError(
                f"{label} has {len(shape)} dimensions (shape {shape}); NIfTI images of 2 to 5 "
                "dimensions are read (X, Y, Z and channels)")
        if extra[0] > 1 and len(extra) > 1 and extra[1] > 1:
            raise InvalidImageError(
                f"{label} has both a 4th and a 5th dimension above 1 (shape {shape}); "
                "one of them may hold channels")
        if extra[0] > 1:
            why = _time_step(image.header)
            if why is not None:
                raise InvalidImageError(
                    f"{label} is a time series of {extra[0]} volumes ({why}); tilerseg "
                    "reads a 4th axis as channels only: if it holds modalities, split it into "
                    "one 3-D file per modality named CASE_0000.nii.gz, CASE_0001.nii.gz, ... "
                    "and open CASE; else segment one volume at a time")
            axes.append("C")
        else:
            axes.append("t")
        if len(extra) > 1:
            axes.append("C" if extra[0] == 1 and extra[1] > 1 else "v")
        axes += [f"d{i}" for i in range(6, len(shape) + 1)]
    return axes


def _pixel_size(image: Any, axes: Sequence[str]) -> dict[str, float]:
    unit = image.header.get_xyzt_units()[0]
    unit = "mm" if unit in (None, "unknown") else unit
    out = {}
    for name, zoom in zip(axes[:3], image.header.get_zooms()[:3]):
        size = to_micrometres(zoom, unit)
        if name in "XYZ" and size is not None:
            out[name] = size
    return out


def _array(image: Any, path: str) -> NiftiArray:
    """The lazy voxels of a loaded image, after checking the file holds them."""
    proxy = image.dataobj
    shape = tuple(int(n) for n in image.shape)
    stored = np.dtype(image.header.get_data_dtype())
    compressed = path.lower().endswith(".gz")
    if not compressed:
        needed = int(proxy.offset) + int(np.prod(shape)) * stored.itemsize
        size = os.path.getsize(path)
        if size < needed:
            raise unreadable(path, f"truncated: its header gives {needed - int(proxy.offset)} "
                             f"bytes of voxel data from byte {int(proxy.offset)}, the file holds "
                             f"{max(0, size - int(proxy.offset))}")
    return NiftiArray(path, shape, stored, int(proxy.offset), float(proxy.slope),
                      float(proxy.inter), compressed)


def read_nifti(path: str) -> RawImage:
    """Read a NIfTI file's header and describe its voxels lazily.

    Parameters
    ----------
    path : str
        A ``.nii`` or ``.nii.gz`` file (NIfTI-1 or NIfTI-2).

    Returns
    -------
    RawImage
        One level, a :class:`NiftiArray` with axes ``X, Y, Z`` (and ``C`` for channels),
        the pixel size in micrometres and the file's :class:`ImageSpace`.

    Raises
    ------
    InvalidImageError
        nibabel is missing; the header is unreadable or the file truncated; the 4th axis
        is time; more dimensions than X, Y, Z and channels.
    """
    image = _load(path)
    axes = _axes(image, path)
    array = _array(image, path)
    spatial = tuple(int(n) for n in image.shape[:3])
    return RawImage([array], axes, "nifti", pixel_size=_pixel_size(image, axes),
                    space=_space(image, spatial))


def case_files(path: str) -> list[str] | None:
    """The modality files of the case identifier ``path`` (``imagesTr/CASE`` ->
    ``imagesTr/CASE_0000.nii.gz``, ``imagesTr/CASE_0001.nii.gz``...), in index order, or
    None if there is none.

    Raises
    ------
    InvalidImageError
        A modality index is missing, or given by two files (``.nii`` and ``.nii.gz``).
    """
    folder, name = os.path.split(os.fspath(path))
    folder = folder or "."
    if not name or not os.path.isdir(folder):
        return None
    found: dict[int, list[str]] = {}
    for entry in os.listdir(folder):
        parsed = case_name(entry)
        if parsed is not None and parsed[0] == name and os.path.isfile(os.path.join(folder, entry)):
            found.setdefault(parsed[1], []).append(os.path.join(folder, entry))
    if not found:
        return None
    return _ordered(found, os.fspath(path))


def _ordered(found: dict[int, list[str]], label: str) -> list[str]:
    twice = next((sorted(v) for v in found.values() if len(v) > 1), None)
    if twice:
        raise InvalidImageError(f"case {label} has two files for one modality: {twice[0]} and "
                                f"{twice[1]}; keep one")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        have = ", ".join(f"{i:04d}" for i in sorted(found))
        raise InvalidImageError(
            f"case {label} has modality files {have} but no {missing[0]:04d}; modalities are "
            "numbered _0000, _0001, ... without a gap")
    return [found[i][0] for i in sorted(found)]


def _cases(names: Sequence[str]) -> dict[str, dict[int, list[str]]]:
    cases: dict[str, dict[int, list[str]]] = {}
    for name in names:
        parsed = case_name(name)
        if parsed is not None:
            cases.setdefault(parsed[0], {}).setdefault(parsed[1], []).append(name)
    return cases


def folder_case(folder: str) -> list[str] | None:
    """The modality files of the one case a folder holds (nnU-Net naming), or None if it
    holds no NIfTI file named so.

    Raises
    ------
    InvalidImageError
        The folder holds several cases, or other NIfTI files beside the case, or a
        modality is missing.
    """
    names = sorted(n for n in os.listdir(folder) if not n.startswith(".")
                   and is_nifti_path(n) and os.path.isfile(os.path.join(folder, n)))
    cases = _cases(names)
    if not cases:
        return None
    if len(cases) > 1:
        shown = ", ".join(sorted(cases)[:3]) + (", ..." if len(cases) > 3 else "")
        raise InvalidImageError(
            f"folder {folder} holds {len(cases)} cases ({shown}); open one case "
            f"({os.path.join(folder, sorted(cases)[0])}) or segment them all with "
            "'tilerseg batch'")
    (case, found), = cases.items()
    others = [n for n in names if case_name(n) is None]
    if others:
        raise InvalidImageError(f"folder {folder} holds case {case} and other NIfTI files "
                                f"({others[0]}); open the case or the file")
    return _ordered({i: [os.path.join(folder, n) for n in v] for i, v in found.items()},
                    os.path.join(folder, case))


def nifti_cases(folder: str, names: Sequence[str]) -> dict[str, str]:
    """For the names of a folder's entries: each modality file named in nnU-Net's way
    (``CASE_0000.nii.gz``) -> the case identifier path ``folder/CASE``."""
    return {n: os.path.join(folder, case) for case, found in _cases(names).items()
            for files in found.values() for n in files}


def read_nifti_case(files: Sequence[str], label: str) -> RawImage:
    """Read the modality files of one case as one image with a channel per file.

    Parameters
    ----------
    files : sequence of str
        The files, in modality order (see :func:`case_files`, :func:`folder_case`).
    label : str
        What to name in errors (the case identifier or folder).

    Returns
    -------
    RawImage
        One level, a :class:`ChannelStack` with axes ``X, Y, Z, C`` (format
        ``"nifti-case"``); pixel size and space of the first file.

    Raises
    ------
    InvalidImageError
        A file is unreadable or not 3-D, or the files' shapes or affines differ.
    """
    images = [_load(f) for f in files]
    first = images[0]
    for f, image in zip(files, images):
        if len(image.shape) > 3 and any(n > 1 for n in image.shape[3:]):
            raise InvalidImageError(
                f"{f} has shape {tuple(image.shape)}; a case's modality files must be 3-D "
                "(one modality each)")
    shape0 = tuple(int(n) for n in first.shape[:3])
    for f, image in zip(files[1:], images[1:]):
        shape = tuple(int(n) for n in image.shape[:3])
        if shape != shape0:
            raise InvalidImageError(
                f"case {label}: {f} has shape {shape} but {files[0]} has {shape0}; a case's "
                "modality files must have one shape")
        if not np.allclose(image.affine, first.affine, rtol=0, atol=_AFFINE_TOLERANCE):
            worst = float(np.abs(np.asarray(image.affine) - np.asarray(first.affine)).max())
            raise InvalidImageError(
                f"case {label}: the affine of {f} differs from that of {files[0]} by up to "
                f"{worst:.4g} mm (tolerance {_AFFINE_TOLERANCE:g} mm); a case's modality files "
                "must be in one space (resample them)")
    arrays = []
    for f, image in zip(files, images):
        array = _array(image, f)
        if array.ndim > 3:  # trailing dimensions of length 1
            array = _Squeezed(array, 3)
        arrays.append(array)
    axes = _axes(first, files[0])[:3]
    return RawImage([ChannelStack(arrays)], axes + ["C"], "nifti-case",
                    pixel_size=_pixel_size(first, axes), space=_space(first, shape0))


class _Squeezed:
    """An array read with its trailing length-1 dimensions dropped."""

    def __init__(self, base: Any, ndim: int) -> None:
        self.base = base
        self.shape = tuple(base.shape[:ndim])
        self.dtype = base.dtype
        self._extra = (0,) * (len(base.shape) - ndim)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            at = next(i for i, k in enumerate(key) if k is Ellipsis)
            key = key[:at] + (slice(None),) * (len(self.shape) - len(key) + 1) + key[at + 1:]
        key = key + (slice(None),) * (len(self.shape) - len(key))
        return self.base[key + self._extra]


# ----------------------------------------------------------------------------- writing


def _spatial_axes(axes: str) -> str:
    return "".join(a for a in axes if a in "ZYX")


def _to_voxel_order(array: np.ndarray, axes: str, shape: Sequence[int]) -> np.ndarray:
    """An array with axes ``[C]ZYX`` / ``[C]YX`` in NIfTI's order ``X, Y, Z[, C]``, shaped
    ``shape`` (+ classes)."""
    spatial = _spatial_axes(axes)
    order = [axes.index(a) for a in reversed(spatial)] + [i for i, a in enumerate(axes)
                                                          if a not in "ZYX"]
    out = array.transpose(order)
    extra = out.shape[len(spatial):]
    return out.reshape(tuple(shape) + tuple(extra))


def _default_space(pixel_size: dict[str, float], shape: tuple[int, ...]) -> ImageSpace:
    """A space for an input without one: a diagonal affine from the pixel sizes in mm
    (1 mm where unknown), origin 0."""
    sizes = [pixel_size.get(a, 1000.0) / 1000.0 for a in "XYZ"]
    affine = np.diag(sizes + [1.0])
    return ImageSpace(tuple(tuple(float(v) for v in row) for row in affine), "XYZ", shape)


def _header(nib: Any, space: ImageSpace, dtype: np.dtype, description: str) -> Any:
    if space.header:
        cls = nib.Nifti2Header if space.header_format == "nifti2" else nib.Nifti1Header
        header = cls.from_fileobj(io.BytesIO(space.header), check=False)
    else:
        header = nib.Nifti1Header()
        header.set_xyzt_units("mm")
    header.set_data_dtype(dtype)
    header.set_slope_inter(1.0, 0.0)
    header["cal_min"] = header["cal_max"] = 0
    header.set_intent("none")
    header["descrip"] = description.encode("ascii", "replace")[:79]
    return header


_MANIFEST_CODE = 6  # NIfTI extension code "comment"
_MANIFEST_TAG = b"tilerseg-manifest "


def run_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of the run that wrote a NIfTI output (kept in a header extension by
    :func:`write_nifti`), or None for another file.

    Parameters
    ----------
    path : path
        A ``.nii`` / ``.nii.gz`` file.

    Returns
    -------
    dict or None
        What ``tilerseg run --resume`` compares with the run asked for.
    """
    nib = _nibabel(os.fspath(path))
    try:
        with _quiet_nibabel(os.fspath(path)):
            extensions = nib.load(os.fspath(path)).header.extensions
    except Exception:  # noqa: BLE001 - not a readable NIfTI file: not tilerseg's
        return None
    for extension in extensions:
        content = extension.get_content()
        if extension.get_code() == _MANIFEST_CODE and isinstance(content, bytes) \
                and content.startswith(_MANIFEST_TAG):
            try:
                return json.loads(content[len(_MANIFEST_TAG):].rstrip(b"\0"))
            except ValueError:
                return None
    return None


def _write_image(nib: Any, data: np.ndarray, space: ImageSpace, description: str,
                 target: Path, intent: str | None, manifest: dict[str, Any] | None) -> Path:
    """Write ``data`` as a NIfTI image in ``space`` into a temporary file beside
    ``target``; return the temporary file (renamed by the caller)."""
    header = _header(nib, space, data.dtype, description)
    if manifest is not None:  # what --resume compares (see run_manifest)
        header.extensions.append(nib.nifti1.Nifti1Extension(
            _MANIFEST_CODE, _MANIFEST_TAG + json.dumps(manifest, sort_keys=True).encode()))
    cls = nib.Nifti2Image if space.header_format == "nifti2" else nib.Nifti1Image
    affine = np.array(space.affine, dtype=np.float64)
    if space.header:  # the file's own sform and qform, as read
        image = cls(data, None, header)
    else:
        image = cls(data, affine, header)
    if intent is not None:
        image.header.set_intent(intent)
    if data.ndim > 3:  # channels, not time: no time unit or step
        space_unit = image.header.get_xyzt_units()[0]
        image.header.set_xyzt_units(space_unit, "unknown")
        image.header["pixdim"][4] = 1.0
    stem, ext = _split_ext(target.name)
    temp = target.with_name(f".{stem}.{uuid.uuid4().hex[:12]}.tmp{ext}")
    try:
        with _quiet_nibabel(str(target)):
            nib.save(image, temp)
    except BaseException as exc:
        temp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write '{target}': {exc.strerror or exc}") from None
        raise
    return temp


def write_nifti(output: str | os.PathLike, path: str | os.PathLike, *,
                probabilities: str | os.PathLike | bool | None = None,
                overwrite: bool = False) -> Path:
    """Write the labels (and probabilities) of a complete tilerseg OME-Zarr output as NIfTI,
    in the input's space.

    Parameters
    ----------
    output : path
        A complete OME-Zarr output of :func:`tilerseg.segment_to_zarr` with labels
        (``output="labels"`` or ``"both"``).
    path : path
        The labels file, ``.nii`` or ``.nii.gz`` (gzipped).
    probabilities : path or bool, optional
        Also write the probabilities as a 4-D float32 ``(X, Y, Z, classes)`` image: to
        this path, or with True to :func:`probabilities_path` of ``path``.
    overwrite : bool
        Replace existing files (else an existing one is an error).

    Returns
    -------
    pathlib.Path
        The labels file.

    Notes
    -----
    A NIfTI input's header and affine are reused (recorded in the output's
    ``attrs["tilerseg"]["input"]["space"]``): the sform, the qform and their codes are
    the input's, the data shape is the input's spatial shape in its voxel order
    ``X, Y, Z``, ``scl_slope`` / ``scl_inter`` and ``cal_min`` / ``cal_max`` are reset,
    the intent is "label" (none for probabilities), ``descrip`` names tilerseg, and a
    header extension (code 6, comment) holds the run's manifest (:func:`run_manifest`). Any
    other input gets a diagonal affine of its pixel sizes in mm (1 mm where unknown)
    with nibabel's default codes (sform 2 "aligned", qform 0), and a 2-D image one plane
    (``(X, Y, 1)``). Each file is written whole from memory into a temporary file
    beside it and renamed into place, so an existing file is replaced only by a
    complete one.

    Raises
    ------
    OutputError
        ``output`` is not a complete output with labels (or probabilities when asked), a
        file exists without ``overwrite``, or a file cannot be written.

    Examples
    --------
    >>> import tempfile, numpy as np, nibabel as nib, tilerseg
    >>> folder = tempfile.mkdtemp()
    >>> model = tilerseg.create_model("unet", depth=1, base_channels=2, in_channels=1)
    >>> store = tilerseg.segment_to_zarr(np.zeros((40, 48), np.float32), model,
    ...                                  f"{folder}/out.zarr", output="labels", workers=1)
    >>> nib.load(write_nifti(store, f"{folder}/seg.nii.gz")).shape
    (48, 40, 1)
    """
    from tilerseg.io.writers import decode_probabilities, open_output

    nib = _nibabel(str(path))
    target = Path(os.fspath(path))
    if not is_nifti_path(target):
        raise OutputError(f"NIfTI output '{target}' must end in .nii or .nii.gz")
    wanted = [target]
    prob_target = None
    if probabilities:
        prob_target = Path(probabilities_path(target) if probabilities is True
                           else os.fspath(probabilities))
        if not is_nifti_path(prob_target):
            raise OutputError(f"NIfTI output '{prob_target}' must end in .nii or .nii.gz")
        wanted.append(prob_target)
    if not overwrite:
        existing = next((p for p in wanted if p.exists()), None)
        if existing is not None:
            raise OutputError(f"output '{existing}' exists; pass --overwrite to replace it")
    found = open_output(output)
    info = found["attributes"]
    if not info.get("complete"):
        raise OutputError(f"'{output}' is not a complete tilerseg output")
    if found["labels"] is None:
        raise OutputError(f"'{output}' holds no labels (run it with output 'labels' or "
                          "'both')")
    if prob_target is not None and found["probabilities"] is None:
        raise OutputError(f"'{output}' holds no probabilities (run it with output "
                          "'probabilities' or 'both')")
    spec = info.get("manifest", {}).get("spec", {})
    spatial = spec.get("spatial_axes") or "ZYX"[-found["labels"].ndim:]
    recorded = (info.get("input") or {}).get("space")
    shape = tuple(int(n) for n in reversed(found["labels"].shape))
    if recorded:
        space = ImageSpace.from_dict(recorded)
    else:
        space = _default_space(dict(spec.get("pixel_size") or {}),
                               shape + (1,) * (3 - len(shape)))
    if shape + (1,) * (len(space.shape) - len(shape)) != tuple(space.shape):
        raise OutputError(f"'{output}' has labels of shape {tuple(found['labels'].shape)} but "
                          f"its input's space has {space.shape} voxels")
    version = info.get("version", "")
    temps: list[tuple[Path, Path]] = []
    try:
        if prob_target is not None:
            probs = decode_probabilities(np.asarray(found["probabilities"][...]))
            planes = tuple(space.shape) + (1,) * (3 - len(space.shape))  # classes 4th
            data = _to_voxel_order(probs, "C" + spatial, planes)
            temps.append((_write_image(nib, data, space,
                                       f"tilerseg {version} class probabilities", prob_target,
                                       None, info.get("manifest")), prob_target))
        labels = np.asarray(found["labels"][...])
        data = _to_voxel_order(labels, spatial, space.shape)
        temps.append((_write_image(nib, data, space, f"tilerseg {version} labels", target,
                                   _LABEL_INTENT, info.get("manifest")), target))
        for temp, final in temps:  # the labels last: they mark the output complete
            os.replace(temp, final)
    finally:
        for temp, _ in temps:
            temp.unlink(missing_ok=True)
    log.info("wrote %s%s", target, f" and {prob_target}" if prob_target else "")
    return target


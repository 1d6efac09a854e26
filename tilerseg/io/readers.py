"""Open an image lazily, whatever its format: :func:`open_image`.

Format readers (:mod:`tilerseg.io.tiff`, :mod:`tilerseg.io.zarr_input` and the small
ones here) describe what they found as a :class:`RawImage`: lazy arrays of every level
with one axis name per dimension. :func:`open_image` then turns that into an
:class:`~tilerseg.io.source.ImageSource` the same way for every format: unknown axes of
length 1 and a time axis of length 1 are dropped, the others are put in ``"CZYXS"``
order (lazily: nothing is read), the level is chosen and one pixel is read at each end
to catch corrupt or truncated files early.
"""

from __future__ import annotations

import glob
import io
import itertools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from tilerseg.errors import (
    ImageNotFoundError,
    InvalidArgumentError,
    InvalidImageError,
    TilersegError,
)
from tilerseg.io import dicom, nifti, remote, tiff, zarr_input
from tilerseg.io.formats import FORMAT_BY_EXTENSION, SLICE_EXTENSIONS, is_zarr_dir
from tilerseg.io.raw import RawImage, expand_key, guess_axes, needs, short_reason, unreadable
from tilerseg.io.source import AXES, ImageSource

__all__ = ["LazyView", "RawImage", "open_image", "sample_for_statistics"]

_MAGIC = (
    (b"II*\0", "tiff"), (b"MM\0*", "tiff"), (b"II+\0", "tiff"), (b"MM\0+", "tiff"),
    (b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"\x93NUMPY", "npy"),
)
_STATS_MIN_PLANE = 65536


def _sniff(head: bytes) -> str | None:
    """The format its first 132 bytes say a file is: ``"dicom"`` when ``DICM`` is at byte
    128 (asked first: a DICOM file's 128-byte preamble may be anything, a TIFF header
    included, as in pydicom's own test files), else the kind of a magic number it starts
    with, else None.

    Examples
    --------
    >>> _sniff(b"II*\\0" + bytes(124) + b"DICM"), _sniff(b"II*\\0" + bytes(8)), _sniff(b"")
    ('dicom', 'tiff', None)
    """
    if head[128:132] == b"DICM":
        return "dicom"
    return next((k for magic, k in _MAGIC if head.startswith(magic)), None)


class LazyView:
    """A lazy view of an array: some axes fixed at an index, the others reordered.

    Slicing it with integers and slices reads only the asked region of the base array
    and returns numpy.
    """

    def __init__(self, base: Any, fixed: dict[int, int], order: Sequence[int]) -> None:
        self.base = base
        self._fixed = dict(fixed)
        self._order = tuple(order)
        self.shape = tuple(int(base.shape[i]) for i in self._order)
        self.dtype = np.dtype(base.dtype)
        chunks = getattr(base, "chunks", None)
        self.chunks = (
            tuple(int(chunks[i]) for i in self._order)
            if isinstance(chunks, tuple) and all(isinstance(c, (int, np.integer)) for c in chunks)
            else None
        )

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return f"LazyView(shape={self.shape}, dtype={self.dtype}, base={type(self.base).__name__})"

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = expand_key(key, self.ndim)
        base_key: list[Any] = [None] * len(self.base.shape)
        for axis, index in self._fixed.items():
            base_key[axis] = index
        for axis, base_axis in enumerate(self._order):
            base_key[base_axis] = key[axis]
        out = np.asarray(self.base[tuple(base_key)])
        kept = [b for b, k in enumerate(base_key) if isinstance(k, slice)]
        wanted = [self._order[a] for a, k in enumerate(key) if isinstance(k, slice)]
        perm = [kept.index(b) for b in wanted]
        return out if perm == sorted(perm) else out.transpose(perm)


def _normalise(raw: RawImage, label: str) -> tuple[str, list[Any]]:
    """Drop T=1 and unknown length-1 axes, order the rest as CZYXS; lazily."""
    shape = tuple(int(n) for n in raw.levels[0].shape)
    if len(raw.axes) != len(shape):
        raise unreadable(label, f"axes {raw.axes} do not match shape {shape}")
    fixed: dict[int, int] = {}
    kept: list[int] = []
    for i, (name, n) in enumerate(zip(raw.axes, shape)):
        if name in AXES and name != "T":
            kept.append(i)
        elif n == 1:
            fixed[i] = 0
        elif name == "T":
            raise InvalidImageError(
                f"{label} has a time axis of length {n}; only one time point is supported "
                "(T must be 1)"
            )
        else:
            raise InvalidImageError(f"{label} has an unsupported axis '{name}' of length {n}")
    letters = [raw.axes[i] for i in kept]
    duplicated = sorted({a for a in letters if letters.count(a) > 1})
    if duplicated:
        raise InvalidImageError(f"{label} has more than one '{duplicated[0]}' axis")
    if "Y" not in letters or "X" not in letters:
        raise InvalidImageError(f"{label} has no Y and X axes (axes {''.join(raw.axes)})")
    order = sorted(kept, key=lambda i: AXES.index(raw.axes[i]))
    axes = "".join(raw.axes[i] for i in order)
    if not fixed and order == kept:
        return axes, list(raw.levels)
    views = []
    for level in raw.levels:
        if isinstance(level, np.ndarray):
            index = tuple(fixed.get(i, slice(None)) for i in range(len(shape)))
            views.append(level[index].transpose([kept.index(i) for i in order]))
        else:
            views.append(LazyView(level, fixed, order))
    return axes, views


def _check_dtype(dtype: Any, label: str) -> None:
    if np.dtype(dtype).kind not in "biuf":
        raise InvalidImageError(
            f"{label} has unsupported dtype {np.dtype(dtype)} (need integer, float or bool pixels)"
        )


def _finish(raw: RawImage, label: str, path: str | None, level: Any, probe: bool) -> ImageSource:
    """Validate a RawImage, choose its level and make the ImageSource."""
    _check_dtype(raw.levels[0].dtype, label)
    if len(raw.levels[0].shape) > 6:
        raise InvalidImageError(f"{label} has {len(raw.levels[0].shape)} dimensions; at most 5")
    axes, arrays = _normalise(raw, label)
    shapes = tuple(tuple(int(n) for n in a.shape) for a in arrays)
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not (
        0 <= level < len(shapes)
    ):
        available = "0" if len(shapes) == 1 else f"0 to {len(shapes) - 1}"
        raise InvalidArgumentError(
            f"level {level!r} is not available in {label}: available levels: {available} "
            f"(shapes {', '.join(str(s) for s in shapes)})"
        )
    level = int(level)
    data = arrays[level]
    if 0 in shapes[level]:
        raise InvalidImageError(f"{label} is empty (shape {shapes[level]}, axes {axes})")
    if raw.level_pixel_sizes is not None:
        pixel_size = dict(raw.level_pixel_sizes[level])
    else:
        pixel_size = {
            a: size * shapes[0][axes.index(a)] / shapes[level][axes.index(a)]
            for a, size in raw.pixel_size.items()
            if a in axes
        }
    if probe:
        try:
            for corner in (0, -1):
                np.asarray(data[(corner,) * len(shapes[level])])
        except TilersegError:
            raise
        except Exception as exc:
            raise unreadable(label, f"cannot read pixel data ({short_reason(exc)})") from None
    for array in arrays:
        if raw.keep is not None and not isinstance(array, np.ndarray):
            try:
                array._tilerseg_keep = raw.keep
            except AttributeError:
                pass
    return ImageSource(
        data=data, axes=axes, pixel_size={a: float(pixel_size[a]) for a in "ZYX" if a in pixel_size},
        levels=shapes, level=level, format=raw.format, path=path, level_data=tuple(arrays),
        window=raw.window, space=raw.space,
    )


def _open_array(source: Any, level: Any) -> ImageSource:
    """An in-memory or lazy array given directly."""
    module = type(source).__module__.split(".")[0]
    kind = {"numpy": "array", "dask": "dask", "zarr": "zarr"}.get(module, "array")
    label = f"the input {'array' if kind == 'array' else kind + ' array'}"
    _check_dtype(source.dtype, label)
    axes = list(guess_axes(tuple(int(n) for n in source.shape), label))
    return _finish(RawImage([source], axes, kind), label, None, level, probe=False)


def _open_plain_file(path: str, kind: str) -> RawImage:
    """npy (memory-mapped), PNG or JPEG."""
    if kind == "npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:
            if "Python objects" in str(exc):  # object arrays cannot be memory-mapped
                raise InvalidImageError(f"{path} has unsupported dtype object") from None
            raise unreadable(path, short_reason(exc)) from None
        return RawImage([array], list(guess_axes(array.shape, path)), "npy")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise unreadable(path, short_reason(exc)) from None
    array = _decode(data, kind, path)
    return RawImage([array], list("YX" if array.ndim == 2 else "YXS"), kind)


def _open_folder(path: str) -> RawImage:
    """A Zarr directory, a folder of TIFF slices or DICOM files (even beside a .zarr), the
    NIfTI modality files of one case (nnU-Net naming), or a folder holding one .zarr."""
    if is_zarr_dir(path):
        return zarr_input.read_zarr(path)
    names = sorted(n for n in os.listdir(path) if not n.startswith("."))
    slices = [
        os.path.join(path, n) for n in names
        if n.lower().endswith(SLICE_EXTENSIONS) and os.path.isfile(os.path.join(path, n))
    ]
    if slices:
        return tiff.read_tiff_sequence(slices, path)
    dicoms = dicom.dicom_files(path)  # before a lone .zarr: an output written beside them
    if dicoms:
        return dicom.read_dicom_series(dicoms, path)
    case = nifti.folder_case(path)
    if case:
        return nifti.read_nifti_case(case, path)
    zarrs = [os.path.join(path, n) for n in names if n.lower().endswith(".zarr")]
    if len(zarrs) == 1 and os.path.isdir(zarrs[0]):
        return zarr_input.read_zarr(zarrs[0])
    raise ImageNotFoundError(
        f"folder {path} contains no TIFF slices, no DICOM files, no NIfTI case "
        "(CASE_0000.nii.gz, ...) and no single .zarr image")


def _open_file(path: str) -> RawImage:
    """A single file, its format told by its first bytes, else by its extension."""
    try:
        with open(path, "rb") as f:
            head = f.read(348)  # NIfTI-1's magic ends at byte 348
    except OSError as exc:
        raise unreadable(path, short_reason(exc)) from None
    if not head:
        raise unreadable(path, "empty file (0 bytes)")
    kind = _sniff(head)
    if kind is None and nifti.looks_like_nifti(head, path):
        return nifti.read_nifti(path)
    if kind is None:
        lower = path.lower()
        expected = next((k for ext, k in FORMAT_BY_EXTENSION.items() if lower.endswith(ext)), None)
        if expected is None:
            ext = os.path.splitext(path)[1] or "(none)"
            raise unreadable(path, f"unknown image format (extension {ext})")
        raise unreadable(path, f"not a {expected.upper()} file (starts with {head[:8]!r})")
    if kind == "tiff":
        return tiff.read_tiff(path)
    if kind == "dicom":
        return dicom.read_dicom(path)
    return _open_plain_file(path, kind)


def _open_url(url: str) -> RawImage:
    """A Zarr store or a single file at a remote URL (see :mod:`tilerseg.io.remote`):
    Zarr through fsspec, TIFF lazily through an fsspec file, the others read whole."""
    loc = remote.location(url)
    fs, path = remote.filesystem(loc)
    try:
        kind, _ = remote.probe(fs, path)  # not isdir: over HTTP it downloads the file
    except Exception as exc:  # noqa: BLE001 - an unreachable server, denied access...
        raise unreadable(url, short_reason(exc)) from None
    if kind == "zarr":
        return zarr_input.read_zarr(url)
    if kind == "folder":
        raise InvalidImageError(
            f"{url} is a remote folder but not a Zarr store; folders and globs of TIFF "
            "slices are read from local paths only")
    if kind is None:
        raise ImageNotFoundError(f"image {url} does not exist")
    f = remote.open_file(loc)
    try:
        head = f.read(132)  # a DICOM file has its magic at byte 128
        f.seek(0)
        kind = _sniff(head)
        if kind == "tiff":
            return tiff.read_tiff(url, file=f)
        data = f.read() if kind not in (None, "dicom") else b""
    except TilersegError:
        raise
    except Exception as exc:  # noqa: BLE001 - a read failing midway
        raise unreadable(url, short_reason(exc)) from None
    if kind == "dicom" or (kind is None and url.lower().endswith((".dcm", ".dicom"))):
        raise unreadable(url, "DICOM is read from local files only (copy it to a local folder)")
    if kind is None:
        raise unreadable(url, "empty file (0 bytes)" if not head else
                         f"not a TIFF, PNG, JPEG or .npy file (starts with {head[:8]!r}; "
                         "DICOM is read from local files only)")
    f.close()
    if kind != "npy":
        array = _decode(data, kind, url)
        return RawImage([array], list("YX" if array.ndim == 2 else "YXS"), kind)
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise unreadable(url, short_reason(exc)) from None
    return RawImage([array], list(guess_axes(array.shape, url)), "npy")


def _decode(data: bytes, kind: str, label: str) -> np.ndarray:
    """Decode PNG or JPEG bytes."""
    imagecodecs = needs("imagecodecs", label, kind.upper(), "imagecodecs")
    decode = imagecodecs.png_decode if kind == "png" else imagecodecs.jpeg_decode
    try:
        array = np.asarray(decode(data))
    except Exception as exc:
        raise unreadable(label, short_reason(exc)) from None
    if array.ndim not in (2, 3):
        raise unreadable(label, f"unexpected decoded shape {array.shape}")
    return array


def open_image(source: Any, level: int = 0) -> ImageSource:
    """Open an image lazily: nothing but metadata and two pixels is read.

    Parameters
    ----------
    source : str, os.PathLike or array
        A file (TIFF, BigTIFF, OME-TIFF, SVS, ImageJ TIFF, ``.npy``, PNG, JPEG), a Zarr
        array or OME-Zarr image directory, a folder or glob pattern of 2-D TIFF slices
        (read as a z-stack in natural name order), or a numpy, dask or zarr array (axes
        guessed: ``"YX"``, ``"CYX"`` (``"YXS"`` if shaped like RGB), ``"CZYX"``,
        ``"TCZYX"`` with T=1).
        Also a DICOM file, or a folder of one DICOM series read as a z-stack ordered by
        slice position (see :mod:`tilerseg.io.dicom`; needs ``tilerseg[dicom]``).
        Also a NIfTI file (``.nii``, ``.nii.gz``; a 4th axis of modalities as channels),
        or one case of NIfTI modality files in nnU-Net naming, by its identifier
        (``imagesTr/CASE`` for ``imagesTr/CASE_0000.nii.gz``, ``CASE_0001``...) or as a
        folder holding only that case (see :mod:`tilerseg.io.nifti`; needs
        ``tilerseg[nifti]``).
        Or a URL of any fsspec protocol whose implementation is installed
        (``file://`` is a local path; ``memory://``, ``s3://``, ``gs://``, ``https://``...):
        a Zarr / OME-Zarr store, a TIFF read lazily (only the tiles a read needs are
        fetched), or a ``.npy``, PNG or JPEG file (read whole).
    level : int
        Pyramid level to read, 0 for full resolution.

    Returns
    -------
    ImageSource
        ``data`` is lazy (a zarr array, a memory map, a :class:`LazyView`...), with axes
        among ``"CZYXS"`` in that order; ``pixel_size`` is in micrometres at ``level``.

    Raises
    ------
    ImageNotFoundError
        The file, folder or URL does not exist, or the glob matches nothing.
    InvalidImageError
        The file is empty, truncated, corrupt, of unknown format, or has an unsupported
        dtype, number of dimensions or axis (e.g. more than one time point).
    InvalidArgumentError
        ``level`` is not one of the image's levels, ``source`` is of unknown type, or a
        URL's protocol is unknown or needs a package that is not installed.

    Examples
    --------
    >>> import numpy as np
    >>> image = open_image(np.zeros((2, 64, 48), np.uint8))
    >>> image.axes, image.shape, image.format
    ('CYX', (2, 64, 48), 'array')
    """
    if not isinstance(source, remote.PATHS):
        if all(hasattr(source, a) for a in ("shape", "dtype", "__getitem__")):
            return _open_array(source, level)
        raise InvalidArgumentError(
            f"cannot open an image from a {type(source).__name__}: give a path or an array"
        )
    path = remote.local_path(source)  # a file:// URL is a local path
    if remote.is_url(path):
        return _finish(_open_url(path), path, path, level, probe=True)
    if not os.path.exists(path) and any(c in path for c in "*?["):
        files = [f for f in glob.glob(path) if os.path.isfile(f) or is_zarr_dir(f)]
        if not files:
            raise ImageNotFoundError(f"glob {path} matches no files")
        if len(files) == 1:
            return open_image(files[0], level)
        others = [f for f in files if not f.lower().endswith(SLICE_EXTENSIONS)]
        if others:
            raise InvalidImageError(
                f"glob {path} matches {len(files)} files, not all TIFF slices "
                f"(e.g. {others[0]}); a glob must select 2-D TIFF slices"
            )
        raw = tiff.read_tiff_sequence(files, path)
    elif os.path.isdir(path):
        raw = _open_folder(path)
    elif os.path.isfile(path):
        raw = _open_file(path)
    elif case := nifti.case_files(path):
        raw = nifti.read_nifti_case(case, path)
    else:
        raise ImageNotFoundError(f"image {path} does not exist")
    return _finish(raw, path, path, level, probe=True)


def _block_ranges(n: int, fraction: float, block: int) -> list[slice]:
    """Evenly spread blocks covering about ``fraction`` of ``range(n)``."""
    block = max(1, min(block, n))
    count = max(1, min(n // block, int(n * fraction // block)))
    starts = np.unique(np.linspace(0, n - block, count).round().astype(int))
    return [slice(int(s), int(s) + block) for s in starts]


def sample_for_statistics(image: ImageSource, max_pixels: int = 1 << 22) -> np.ndarray:
    """A small sample of an image, to estimate global statistics such as percentiles.

    Takes the lowest-resolution pyramid level that still has at least 65536 pixels per
    plane (the chosen level if none has), reads it whole if it has at most
    ``max_pixels`` values, otherwise reads an evenly spread grid of blocks (whole chunks
    where the array is chunked) so that about ``max_pixels`` values are read.

    Parameters
    ----------
    image : ImageSource
        The image, as returned by :func:`open_image`.
    max_pixels : int
        About how many values (pixels times channels) to read at most.

    Returns
    -------
    numpy.ndarray
        Same axes as ``image.axes``; spatial axes shortened to the sampled blocks.

    Examples
    --------
    >>> import numpy as np
    >>> image = open_image(np.arange(1024 * 1024, dtype=np.uint32).reshape(1024, 1024))
    >>> sample_for_statistics(image, max_pixels=65536).size <= 65536
    True
    """
    axes = image.axes
    y, x = axes.index("Y"), axes.index("X")
    arrays = list(image.level_data) or [image.data]
    big = [a for a in arrays if a.shape[y] * a.shape[x] >= _STATS_MIN_PLANE]
    array = min(big, key=lambda a: a.shape[y] * a.shape[x]) if big else image.data
    shape = tuple(int(n) for n in array.shape)
    if int(np.prod(shape)) <= max_pixels:
        return np.asarray(array[(slice(None),) * len(shape)])
    spatial = [i for i, a in enumerate(axes) if a in "ZYX"]
    per_pixel = int(np.prod([shape[i] for i in range(len(shape)) if i not in spatial]))
    budget = max(1, max_pixels // per_pixel)
    fraction = (budget / np.prod([shape[i] for i in spatial])) ** (1 / len(spatial))
    chunks = getattr(array, "chunks", None)
    ranges: list[list[slice]] = []
    for i, n in enumerate(shape):
        if i not in spatial:
            ranges.append([slice(0, n)])
            continue
        block = 1 if axes[i] == "Z" else 256
        chunk = chunks[i] if isinstance(chunks, tuple) else None
        if axes[i] != "Z" and isinstance(chunk, (int, np.integer)) and 16 <= chunk <= 1024:
            block = int(chunk)
        ranges.append(_block_ranges(n, fraction, block))
    out = np.empty([sum(s.stop - s.start for s in r) for r in ranges], dtype=image.dtype)
    offsets = [np.cumsum([0] + [s.stop - s.start for s in r]) for r in ranges]
    for combo in itertools.product(*(range(len(r)) for r in ranges)):
        key = tuple(r[j] for r, j in zip(ranges, combo))
        target = tuple(slice(o[j], o[j + 1]) for o, j in zip(offsets, combo))
        out[target] = np.asarray(array[key])
    return out


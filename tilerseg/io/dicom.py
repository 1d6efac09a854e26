"""DICOM readers: single-frame and multi-frame files, and folders of one series.

Reading DICOM needs pydicom (``pip install "tilerseg[dicom]"``); it is imported only when
a DICOM file is opened. Opening reads the headers only (``stop_before_pixels``); a frame
is decoded when a tile first needs it (:func:`pydicom.pixels.pixel_array` with
``index=``, which reads only that frame of a multi-frame file) and a few decoded frames
are kept in a small cache.

What is read, and how:

- Axes: ``YX`` for one frame, ``ZYX`` for a multi-frame file or a series, ``YXS`` /
  ``ZYXS`` for colour (SamplesPerPixel 3; YBR is converted to RGB). The frames of a
  multi-frame file are ordered along the slice normal when every frame has a distinct
  position (PlanePositionSequence), else kept in stored order.
- A series (a folder) is ordered by ImagePositionPatient projected on the slice normal
  (the cross product of ImageOrientationPatient's row and column directions), else by
  InstanceNumber, else by file name. Files of more than one SeriesInstanceUID, of other
  sizes or sample formats, or two files at one position are refused.
- Values: Rescale Slope/Intercept are applied (CT in Hounsfield units), per file or per
  frame. The result keeps the stored dtype when there is no rescale, becomes int32 when
  slope and intercept are integers (8- and 16-bit data), float32 otherwise.
- MONOCHROME1 (low values displayed white) is inverted within the stored range
  (``low + high - value``) before the rescale, so that high values are bright as in
  MONOCHROME2; the window centre is mapped the same way, so windowing shows what a
  viewer shows.
- Pixel size: PixelSpacing (else ImagerPixelSpacing, the detector's spacing) in mm, as
  micrometres; Z from the slice positions (their median step), else
  SpacingBetweenSlices, else SliceThickness. Enhanced multi-frame files are read through
  their shared and per-frame functional groups.
- Window: the first WindowCenter/WindowWidth values (of the first slice of a series), in
  the rescaled units, for ``normalize=("window", "dicom")``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tilerseg.errors import InvalidImageError, TilersegError
from tilerseg.io.formats import natural_key
from tilerseg.io.raw import RawImage, expand_key, needs, short_reason, to_micrometres, unreadable

__all__ = ["DICOM_EXTENSIONS", "DicomFrames", "dicom_files", "is_dicom_file", "read_dicom",
           "read_dicom_series"]

log = logging.getLogger(__name__)

DICOM_EXTENSIONS = (".dcm", ".dicom")
"""Extensions of DICOM files (files without one are recognised by their magic bytes)."""

_MAGIC_OFFSET = 128
_NATIVE_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")
_CACHE_BYTES = 256 << 20


def is_dicom_file(path: str) -> bool:
    """Whether ``path`` is a file starting with the DICOM preamble (``DICM`` at byte 128).

    Examples
    --------
    >>> is_dicom_file(__file__)
    False
    """
    try:
        with open(path, "rb") as f:
            f.seek(_MAGIC_OFFSET)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def dicom_files(folder: str) -> list[str]:
    """The DICOM files of a folder (not hidden; any extension, told by the magic bytes).

    Parameters
    ----------
    folder : str
        The folder.

    Returns
    -------
    list of str
        Their paths, in natural name order.
    """
    names = sorted((n for n in os.listdir(folder) if not n.startswith(".")), key=natural_key)
    paths = [os.path.join(folder, n) for n in names]
    return [p for p in paths if os.path.isfile(p) and is_dicom_file(p)]


class _Forward(logging.Handler):
    """pydicom's log records while it reads here: a warning becomes one warning of this
    module's log naming the file (once per file and message); the rest, e.g. a decoder's
    error that the exception raised also carries, are logged at DEBUG."""

    local = threading.local()
    warned: set[tuple[str, str]] = set()

    def emit(self, record: logging.LogRecord) -> None:
        path = getattr(self.local, "path", None) or "DICOM"
        message = " ".join(record.getMessage().split())
        if record.levelno == logging.WARNING and len(self.warned) < 10000:
            if (path, message) not in self.warned:
                self.warned.add((path, message))
                log.warning("%s: %s", path, message)
            return
        log.debug("%s: pydicom: %s", path, message)


_FORWARD = _Forward()
_quiet_lock = threading.Lock()
_quiet: list[Any] = []  # while any thread reads: [depth, catch_warnings, propagate]


@contextlib.contextmanager
def _quiet_pydicom(path: str) -> Iterator[None]:
    """Read ``path`` with pydicom's log records sent to :class:`_Forward` (not to the
    application's handlers) and its Python warnings ignored: pydicom warns and logs the
    same message, and its error messages are in the exception raised."""
    logger = logging.getLogger("pydicom")
    with _quiet_lock:
        if not _quiet:
            catch = warnings.catch_warnings()
            catch.__enter__()
            warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
            _quiet[:] = [0, catch, logger.propagate]
            logger.propagate = False
            logger.addHandler(_FORWARD)
        _quiet[0] += 1
    previous = getattr(_Forward.local, "path", None)
    _Forward.local.path = path
    try:
        yield
    finally:
        _Forward.local.path = previous
        with _quiet_lock:
            _quiet[0] -= 1
            if not _quiet[0]:
                _, catch, logger.propagate = _quiet
                logger.removeHandler(_FORWARD)
                catch.__exit__(None, None, None)
                _quiet.clear()


def _pydicom(label: str) -> Any:
    needs("pydicom.pixels", label, "DICOM", '"tilerseg[dicom]"')  # the decoders too
    return needs("pydicom", label, "DICOM", '"tilerseg[dicom]"')


def _first(value: Any) -> Any:
    """The first value of a multi-valued element."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return value[0] if len(value) else None
    return value


def _group_value(ds: Any, sequence: str, name: str, frame: int | None = None) -> Any:
    """``name`` from the dataset, else from its per-frame (``frame``) or shared functional
    group ``sequence`` (enhanced multi-frame files)."""
    value = ds.get(name)
    if value is not None:
        return value
    groups = []
    if frame is not None and "PerFrameFunctionalGroupsSequence" in ds:
        per_frame = ds.PerFrameFunctionalGroupsSequence
        if frame < len(per_frame):
            groups.append(per_frame[frame])
    if "SharedFunctionalGroupsSequence" in ds and len(ds.SharedFunctionalGroupsSequence):
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    for group in groups:
        items = group.get(sequence)
        if items is not None and len(items) and items[0].get(name) is not None:
            return items[0].get(name)
    return None


def _floats(value: Any, count: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == count and all(np.isfinite(out)) else None


def _number(value: Any, default: float | None = None) -> float | None:
    try:
        out = float(_first(value))
    except (TypeError, ValueError):
        return default
    return out if np.isfinite(out) else default


@dataclass(frozen=True)
class _Header:
    """What one DICOM file says about its pixels (read without the pixel data)."""

    path: str
    rows: int
    columns: int
    samples: int
    frames: int
    stored: np.dtype
    stored_range: tuple[int, int]
    photometric: str
    rescale: tuple[tuple[float, float], ...]  # (slope, intercept) per frame
    window: tuple[float, float] | None
    spacing: tuple[float, float] | None  # (row, column) in mm
    z_step: float | None  # SpacingBetweenSlices, else SliceThickness, mm
    positions: tuple[tuple[float, float, float], ...] | None  # per frame
    normal: tuple[float, float, float] | None
    instance: int | None
    series: str | None
    time: bool = False  # the frames are moments in time (FrameTime...), not slices


_TIME_POINTERS = {0x00181063, 0x00181065, 0x00181055}  # FrameTime, FrameTimeVector, TriggerTime
_GRID_OFFSETS = 0x3004000C  # GridFrameOffsetVector (RT dose): the frames' offsets in mm


def _frame_increments(ds: Any) -> set[int]:
    """The tags ``FrameIncrementPointer`` names: what changes from one frame to the next."""
    pointer = ds.get("FrameIncrementPointer")
    if pointer is None:
        return set()
    return {int(v) for v in ([pointer] if isinstance(pointer, int) else pointer)}  # a tag or tags


def _grid_step(ds: Any) -> float | None:
    """The median step between an RT dose's frame offsets (``GridFrameOffsetVector``), mm."""
    offsets = ds.get("GridFrameOffsetVector")
    if offsets is None or len(offsets) < 2:
        return None
    steps = np.abs(np.diff(np.asarray([float(v) for v in offsets])))
    return float(np.median(steps)) if steps.size and np.median(steps) > 0 else None


def _stored_dtype(ds: Any, label: str) -> tuple[np.dtype, tuple[int, int]]:
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise InvalidImageError(f"{label}: DICOM float pixel data is not supported")
    bits = int(ds.get("BitsAllocated") or 0)
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    if bits not in (8, 16, 32):
        raise InvalidImageError(f"{label}: DICOM BitsAllocated {bits} is not supported "
                                "(8, 16 or 32)")
    stored = int(ds.get("BitsStored") or bits)
    dtype = np.dtype(f"{'i' if signed else 'u'}{bits // 8}")
    low, high = ((-(1 << (stored - 1)), (1 << (stored - 1)) - 1) if signed
                 else (0, (1 << stored) - 1))
    return dtype, (low, high)


def _check_pixel_data(ds: Any, f: Any, size: int, label: str, frames: int,
                      dtype: np.dtype) -> None:
    """Refuse a file without pixel data, or whose native pixel data is cut short."""
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if syntax == _DEFLATED:  # deflated: file offsets tell nothing
        return
    at = f.tell()
    head = f.read(8)
    if len(head) < 8 or head[:2] not in (b"\xe0\x7f", b"\x7f\xe0"):
        reason = "no pixel data" if len(ds) else "no DICOM data set (truncated?)"
        raise unreadable(label, reason)
    if syntax not in _NATIVE_SYNTAXES:
        return
    expected = frames * int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) \
        * dtype.itemsize
    if size - at - 8 < expected:
        raise unreadable(label, f"truncated file (pixel data needs {expected} bytes, the file "
                         f"has {max(0, size - at - 8)} after the header)")


def _check_decoder(pydicom: Any, ds: Any, label: str) -> None:
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None or str(syntax) in _NATIVE_SYNTAXES:
        return
    try:
        decoder = pydicom.pixels.get_decoder(syntax)
    except Exception:
        raise InvalidImageError(
            f"{label}: DICOM transfer syntax {syntax} ({getattr(syntax, 'name', '?')}) is not "
            "supported") from None
    if not decoder.is_available:
        needs = "; ".join(getattr(decoder, "missing_dependencies", []) or []) or "a decoder"
        raise InvalidImageError(
            f"{label}: compressed DICOM ({syntax.name}) needs a decoder that is not "
            f"installed: {needs}")


_DEFLATED = "1.2.840.10008.1.2.1.99"


def _decode(path: str, index: int | None) -> np.ndarray:
    """Frame ``index`` of a file (all of it for None), decoded by pydicom. A deflated data
    set is read whole (``pydicom.pixels.pixel_array`` reads a file's pixel data in place,
    which a deflated file has no offsets for)."""
    import pydicom
    from pydicom.pixels import pixel_array

    try:
        return np.asarray(pixel_array(path, index=index))
    except Exception:
        ds = pydicom.dcmread(path)
        if str(ds.file_meta.get("TransferSyntaxUID", "")) != _DEFLATED:
            raise
        array = np.asarray(ds.pixel_array)
        frames = int(ds.get("NumberOfFrames") or 1)
        return array if index is None or frames == 1 else array[index]


def _other_decoders(path: str) -> str:
    """What else could decode the file's compressed pixel data: ``"; other decoders of
    <syntax>: <what they need>"`` (pydicom's own list), or "" (native data, none known)."""
    try:
        import pydicom

        syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        if str(syntax) in _NATIVE_SYNTAXES or str(syntax) == _DEFLATED:
            return ""
        missing = pydicom.pixels.get_decoder(syntax).missing_dependencies
    except Exception:  # noqa: BLE001 - only a hint
        return ""
    return f"; other decoders of {syntax.name}: {'; '.join(missing)}" if missing else ""


def _read_header(path: str) -> _Header:
    """Parse one file's header (no pixel data) and check its pixel data is there."""
    pydicom = _pydicom(path)
    with _quiet_pydicom(path):
        return _parse_header(pydicom, path)


def _parse_header(pydicom: Any, path: str) -> _Header:
    name = path
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            if "Rows" not in ds or "Columns" not in ds:
                raise unreadable(name, "no image (Rows/Columns missing)" if len(ds)
                                 else "no DICOM data set (truncated?)")
            frames = int(_number(ds.get("NumberOfFrames"), 1) or 1)
            stored, stored_range = _stored_dtype(ds, name)
            _check_pixel_data(ds, f, size, name, frames, stored)
        _check_decoder(pydicom, ds, name)
        samples = int(ds.get("SamplesPerPixel") or 1)
        photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip()
        if samples not in (1, 3) or photometric.startswith("PALETTE"):
            raise InvalidImageError(f"{name}: DICOM with {samples} samples per pixel and "
                                    f"photometric interpretation {photometric} is not supported")
        rescale = []
        for k in range(frames):
            slope = _number(_group_value(ds, "PixelValueTransformationSequence", "RescaleSlope",
                                         k), 1.0)
            intercept = _number(_group_value(ds, "PixelValueTransformationSequence",
                                             "RescaleIntercept", k), 0.0)
            rescale.append((slope, intercept) if samples == 1 else (1.0, 0.0))
        center = _number(_group_value(ds, "FrameVOILUTSequence", "WindowCenter", 0))
        width = _number(_group_value(ds, "FrameVOILUTSequence", "WindowWidth", 0))
        spacing = _floats(_group_value(ds, "PixelMeasuresSequence", "PixelSpacing", 0) or
                          ds.get("ImagerPixelSpacing") or (), 2)
        increments = _frame_increments(ds)
        z_step = ((_grid_step(ds) if _GRID_OFFSETS in increments else None)
                  or _number(_group_value(ds, "PixelMeasuresSequence", "SpacingBetweenSlices", 0))
                  or _number(_group_value(ds, "PixelMeasuresSequence", "SliceThickness", 0)))
        orientation = _floats(_group_value(ds, "PlaneOrientationSequence",
                                           "ImageOrientationPatient", 0) or (), 6)
        normal = (tuple(float(v) for v in np.cross(orientation[:3], orientation[3:]))
                  if orientation else None)
        positions = [_floats(_group_value(ds, "PlanePositionSequence", "ImagePositionPatient",
                                          k) or (), 3) for k in range(frames)]
        instance = ds.get("InstanceNumber")
        return _Header(
            path=path, rows=int(ds.Rows), columns=int(ds.Columns), samples=samples,
            frames=frames, stored=stored, stored_range=stored_range, photometric=photometric,
            rescale=tuple(rescale),
            window=(center, width) if center is not None and width and width > 0 else None,
            spacing=spacing if spacing and min(spacing) > 0 else None,
            z_step=z_step if z_step and z_step > 0 else None,
            positions=tuple(positions) if all(positions) else None,  # type: ignore[arg-type]
            normal=normal, instance=int(instance) if instance not in (None, "") else None,
            series=str(ds.get("SeriesInstanceUID")) if ds.get("SeriesInstanceUID") else None,
            time=frames > 1 and bool(increments & _TIME_POINTERS))
    except TilersegError:
        raise
    except Exception as exc:
        raise unreadable(name, short_reason(exc)) from None


def _output_dtype(headers: Sequence[_Header]) -> np.dtype:
    first = headers[0]
    pairs = {p for h in headers for p in h.rescale}
    if first.samples == 3 or pairs <= {(1.0, 0.0)}:
        return first.stored
    integral = all(float(s).is_integer() and float(i).is_integer() for s, i in pairs)
    return np.dtype(np.int32 if integral and first.stored.itemsize <= 2 else np.float32)


class DicomFrames:
    """A lazy ``(Z, Y, X[, S])`` (or ``(Y, X[, S])``) array over DICOM frames.

    Slicing decodes only the frames it touches (rescaled, MONOCHROME1 inverted), keeping
    the most recent ones in a cache of about 256 MiB (at least two frames); a frame that
    cannot be decoded raises :class:`~tilerseg.errors.InvalidImageError` naming its file.

    Parameters
    ----------
    frames : sequence of (str, int or None, float, float)
        Per plane: the file, the frame index in it (None for a single-frame file), the
        rescale slope and intercept.
    frame_shape : tuple of int
        ``(rows, columns)`` or ``(rows, columns, 3)``.
    dtype : numpy.dtype
        The values' dtype after the rescale.
    invert : int or None
        ``low + high`` of the stored range for MONOCHROME1 (values become ``invert - v``
        before the rescale), None otherwise.
    stack : bool
        Whether the array has a leading Z axis (else it has one frame and none).
    label : str
        The file or folder, for the repr.
    """

    def __init__(self, frames: Sequence[tuple[str, int | None, float, float]],
                 frame_shape: tuple[int, ...], dtype: Any, invert: int | None = None,
                 stack: bool = True, label: str = "DICOM") -> None:
        self.frames = list(frames)
        self.frame_shape = tuple(int(n) for n in frame_shape)
        self.dtype = np.dtype(dtype)
        self.invert = invert
        self.stack = stack
        self.label = label
        self.shape = ((len(self.frames),) if stack else ()) + self.frame_shape
        self.chunks = ((1,) if stack else ()) + self.frame_shape
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        frame_bytes = int(np.prod(self.frame_shape)) * self.dtype.itemsize
        self._keep = max(2, _CACHE_BYTES // max(1, frame_bytes))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return f"DicomFrames(shape={self.shape}, dtype={self.dtype}, files={self.label})"

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype)

    def frame(self, k: int) -> np.ndarray:
        """Plane ``k``, decoded (read-only; cached)."""
        with self._lock:
            if k in self._cache:
                self._cache.move_to_end(k)
                return self._cache[k]
        path, index, slope, intercept = self.frames[k]
        try:
            with _quiet_pydicom(path):
                array = _decode(path, index)
        except Exception as exc:
            raise unreadable(path, f"cannot decode pixel data ({short_reason(exc)})"
                             f"{_other_decoders(path)}") from None
        if array.shape != self.frame_shape:
            raise unreadable(path, f"decoded frame has shape {array.shape}, expected "
                             f"{self.frame_shape}")
        if self.invert is not None:
            array = (self.invert - array.astype(np.int64)).astype(array.dtype)
        if (slope, intercept) != (1.0, 0.0):
            work = np.float64 if self.dtype.kind == "f" else np.int64
            array = array.astype(work) * (work(slope)) + work(intercept)
        array = array.astype(self.dtype, copy=False)
        array.flags.writeable = False
        with self._lock:
            self._cache[k] = array
            while len(self._cache) > self._keep:
                self._cache.popitem(last=False)
        return array

    def __getitem__(self, key: Any) -> np.ndarray:
        key = expand_key(key, self.ndim)
        if not self.stack:
            return np.array(self.frame(0)[key])
        planes, rest = key[0], key[1:]
        if isinstance(planes, slice):
            picked = range(len(self.frames))[planes]
            out = np.empty((len(picked), *np.empty(self.frame_shape, np.bool_)[rest].shape),
                           self.dtype)
            for i, k in enumerate(picked):
                out[i] = self.frame(k)[rest]
            return out
        k = int(planes)
        if not -len(self.frames) <= k < len(self.frames):
            raise IndexError(f"index {k} is out of range for {len(self.frames)} planes")
        return np.array(self.frame(k % len(self.frames))[rest])


def _mm_to_um(value: float | None) -> float | None:
    return to_micrometres(value, "mm") if value else None


def _raw(headers: Sequence[_Header], frames: list[tuple[str, int | None, float, float]],
         z_size: float | None, label: str, fmt: str) -> RawImage:
    first = headers[0]
    invert = None
    window = first.window
    if first.photometric == "MONOCHROME1" and first.samples == 1:
        invert = sum(first.stored_range)
        if window is not None:
            slope, intercept = first.rescale[0]
            window = (invert * slope + 2 * intercept - window[0], window[1])
    frame_shape = (first.rows, first.columns) + ((3,) if first.samples == 3 else ())
    stack = len(frames) > 1
    array = DicomFrames(frames, frame_shape, _output_dtype(headers), invert, stack, label)
    axes = ([("T" if first.time else "Z")] if stack else []) + ["Y", "X"] + \
        (["S"] if first.samples == 3 else [])
    sizes: dict[str, float] = {}
    if first.spacing is not None:
        sizes["Y"], sizes["X"] = (_mm_to_um(s) for s in first.spacing)
    z = _mm_to_um(z_size)
    if stack and z and not first.time:
        sizes["Z"] = z
    return RawImage([array], axes, fmt, pixel_size={a: s for a, s in sizes.items() if s},
                    window=window)


def _position_step(positions: Sequence[Sequence[float]], normal: Sequence[float]) -> float | None:
    """The median distance between consecutive positions along ``normal``."""
    if len(positions) < 2:
        return None
    along = np.sort(np.asarray(positions, float) @ np.asarray(normal, float))
    steps = np.diff(along)
    steps = steps[steps > 0]
    if not steps.size:
        return None
    step = float(np.median(steps))
    if steps.max() - steps.min() > 0.01 * step:
        log.warning("DICOM slices are not evenly spaced (steps %.4g to %.4g mm); the Z pixel "
                    "size is their median, %.4g mm", steps.min(), steps.max(), step)
    return step


def read_dicom(path: str) -> RawImage:
    """Describe a DICOM file, lazily: one frame (``YX``) or several (``ZYX``, ordered along
    the slice normal when every frame has a distinct position, else in stored order).

    Parameters
    ----------
    path : str
        A DICOM file (with the ``DICM`` preamble).

    Returns
    -------
    RawImage
        One :class:`DicomFrames` array; format ``"dicom"``; the pixel size in
        micrometres; the first window (centre, width) where the file has one.

    Raises
    ------
    InvalidImageError
        pydicom is missing, or the file is truncated, corrupt, has no pixel data, a
        compressed transfer syntax without an installed decoder, or an unsupported pixel
        format.
    """
    header = _read_header(path)
    if header.frames > 1:
        order = list(range(header.frames))
        if header.positions is not None and header.normal is not None:
            spatial, same = _order_of([float(np.dot(p, header.normal))
                                       for p in header.positions])
            if same is None:  # else (e.g. frames over time at one position): stored order
                order = spatial
        frames = [(path, k, *header.rescale[k]) for k in order]
    else:
        frames = [(path, None, *header.rescale[0])]
    z = None
    if header.positions is not None and header.normal is not None:
        z = _position_step(header.positions, header.normal)
    return _raw([header], frames, z or header.z_step, path, "dicom")


def _series_order(headers: list[_Header], label: str) -> list[_Header]:
    """Headers ordered along the slice normal, else by InstanceNumber, else by name."""
    normal = headers[0].normal
    if normal is not None and all(h.positions for h in headers):
        keys = [float(np.dot(h.positions[0], normal)) for h in headers]  # type: ignore[index]
        what = "slice position"
    elif all(h.instance is not None for h in headers):
        keys = [float(h.instance) for h in headers]  # type: ignore[arg-type]
        what = "InstanceNumber"
    else:
        return headers
    order, same = _order_of(keys)
    if same is not None:
        a, b = same
        raise InvalidImageError(
            f"{label}: {os.path.basename(headers[a].path)} and "
            f"{os.path.basename(headers[b].path)} have the same {what} ({keys[a]:g}); a "
            "series must have one image per slice")
    return [headers[i] for i in order]


def _order_of(keys: Sequence[float]) -> tuple[list[int], tuple[int, int] | None]:
    """The indices that sort ``keys`` (slice positions along the normal, in mm), and the
    first two indices whose keys are equal (within 1e-4), if any."""
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    for a, b in zip(order, order[1:]):
        if np.isclose(keys[a], keys[b], rtol=0, atol=1e-4):
            return order, (a, b)
    return order, None


def read_dicom_series(files: Sequence[str], label: str) -> RawImage:
    """Describe the DICOM files of one series as a lazy z-stack.

    Parameters
    ----------
    files : sequence of str
        Single-frame DICOM files of one series, in any order (or one multi-frame file).
    label : str
        The folder they come from, for messages.

    Returns
    -------
    RawImage
        Axes ``ZYX`` (``ZYXS`` for colour), ordered along the slice normal (see the module
        notes); format ``"dicom-series"``; Z pixel size from the slice positions.

    Raises
    ------
    InvalidImageError
        A file is unreadable (as for :func:`read_dicom`); the files belong to more than
        one series, differ in size or pixel format, share a position, or include
        multi-frame files.
    """
    files = [os.fspath(f) for f in files]
    if len(files) == 1:
        return read_dicom(files[0])
    headers = [_read_header(f) for f in files]
    series = sorted({h.series for h in headers if h.series is not None})
    if len(series) > 1:
        raise InvalidImageError(
            f"{label} holds {len(series)} DICOM series ({', '.join(series[:3])}); give a "
            "folder holding one series, or one file")
    multi = [h for h in headers if h.frames > 1]
    if multi:
        raise InvalidImageError(
            f"{label}: {os.path.basename(multi[0].path)} has {multi[0].frames} frames; a "
            "folder must hold single-frame files of one series (open a multi-frame file "
            "by its path)")
    first = headers[0]
    fmt = (first.rows, first.columns, first.samples, first.stored, first.photometric)
    for h in headers[1:]:
        other = (h.rows, h.columns, h.samples, h.stored, h.photometric)
        if other != fmt:
            raise InvalidImageError(
                f"{label}: DICOM files differ: {os.path.basename(first.path)} is "
                f"{first.rows}x{first.columns} {first.stored} {first.photometric}, "
                f"{os.path.basename(h.path)} is {h.rows}x{h.columns} {h.stored} "
                f"{h.photometric}")
    headers = _series_order(headers, label)
    z = None
    if first.normal is not None and all(h.positions for h in headers):
        z = _position_step([h.positions[0] for h in headers], first.normal)  # type: ignore
    frames = [(h.path, None, *h.rescale[0]) for h in headers]
    return _raw(headers, frames, z or first.z_step, label, "dicom-series")

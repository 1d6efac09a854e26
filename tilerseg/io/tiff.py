"""TIFF readers: TIFF/BigTIFF, OME-TIFF, ImageJ, Aperio SVS and folders of TIFF slices.

Pixels are read through tifffile's Zarr stores (``series.aszarr``), so slicing a level
decodes only the tiles or strips it touches. The TiffFile stays open as long as the
arrays live (the store refers to it; it is also attached to the arrays).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from typing import Any
from xml.etree import ElementTree

import tifffile
import zarr

from tilerseg.errors import InvalidImageError, TilersegError
from tilerseg.io.raw import RawImage, short_reason, to_micrometres, unreadable

__all__ = ["read_tiff", "read_tiff_sequence"]

# micrometres per TIFF ResolutionUnit (2 inch, 3 centimetre; 4 and 5 are tifffile's
# millimetre and micrometre extensions); 1 (none) means no physical size.
_UM_PER_RESUNIT = {2: 25400.0, 3: 1e4, 4: 1e3, 5: 1.0}
# Below this, an inch resolution is a screen or print default (72, 96, 300 dpi...),
# not a microscope's: it would mean pixels larger than 25 µm.
_MIN_DPI = 1000.0
_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9.]+(?:[eE][-+]?[0-9]+)?)")


def _axis_names(axes: str, shape: Sequence[int], label: str) -> list[str]:
    """tifffile axis letters to ours: a single unnamed planes axis (I, Q) becomes Z."""
    planes = [i for i, a in enumerate(axes) if a in "IQ" and shape[i] > 1]
    names = []
    for i, letter in enumerate(axes):
        if letter in "TCZYXS":
            names.append(letter)
        elif letter in "IQ" and shape[i] > 1:
            y = axes.find("Y")
            if len(planes) == 1 and "Z" not in axes and 0 <= i < y:
                names.append("Z")
            else:
                raise InvalidImageError(
                    f"{label} has an unnamed axis '{letter}' of length {shape[i]} that cannot "
                    f"be read as a z-stack (tifffile axes {axes}, shape {tuple(shape)})"
                )
        else:
            names.append(tifffile.TIFF.AXES_NAMES.get(letter, letter).lower())
    return names


def _check_truncated(series: Any, label: str) -> None:
    """Raise if the first or last page's pixel data lies beyond the end of its file."""
    offset = series.dataoffset
    if offset is not None:
        ends = [(offset + series.nbytes, series.parent.filehandle.size)]
    else:
        pages = [series[0], series[len(series) - 1]] if len(series) else []
        ends = [
            (max((o + c for o, c in zip(p.dataoffsets, p.databytecounts) if c), default=0),
             p.parent.filehandle.size)
            for p in pages if p is not None
        ]
    for end, size in ends:
        if end > size:
            raise unreadable(
                label, f"truncated file (pixel data ends at byte {end}, file has {size} bytes)"
            )


def _ome_pixel_size(xml: str) -> dict[str, float]:
    """PhysicalSizeX/Y/Z of the first OME Pixels element, in micrometres."""
    root = ElementTree.fromstring(xml)
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return {}
    sizes = {}
    for axis in "ZYX":
        value = pixels.get(f"PhysicalSize{axis}")
        size = to_micrometres(value, pixels.get(f"PhysicalSize{axis}Unit", "µm"))
        if value is not None and size is not None:
            sizes[axis] = size
    return sizes


def pixel_size(tif: tifffile.TiffFile) -> dict[str, float]:
    """Physical pixel size in micrometres at full resolution, where the file records it.

    Parameters
    ----------
    tif : tifffile.TiffFile
        An open TIFF file.

    Returns
    -------
    dict of str to float
        Sizes for ``"Z"``, ``"Y"`` and ``"X"`` from, in order of preference: the Aperio
        ``MPP``, the OME-XML ``PhysicalSize*``, ImageJ ``unit``/``spacing`` with the
        resolution tags, or the resolution tags with an inch/centimetre unit.
    """
    page = tif.pages.first
    if tif.is_svs:
        match = _MPP.search(page.description)
        size = to_micrometres(match.group(1), "µm") if match else None
        return {"Y": size, "X": size} if size else {}
    if tif.is_ome and tif.ome_metadata:
        return _ome_pixel_size(tif.ome_metadata)
    xres, yres = page.resolution
    if tif.is_imagej:
        meta = tif.imagej_metadata or {}
        unit = meta.get("unit")
        sizes = {"Z": to_micrometres(meta.get("spacing"), unit)}
        if xres > 0 and yres > 0:
            sizes.update(X=to_micrometres(1 / xres, unit), Y=to_micrometres(1 / yres, unit))
        return {a: s for a, s in sizes.items() if s}
    factor = _UM_PER_RESUNIT.get(int(page.resolutionunit))
    if not factor or xres <= 0 or yres <= 0 or (factor == 25400.0 and xres < _MIN_DPI):
        return {}
    return {"Y": factor / yres, "X": factor / xres}


def read_tiff(path: str, file: Any = None) -> RawImage:
    """Describe the first series of a TIFF file, with its pyramid levels, lazily.

    Parameters
    ----------
    path : str
        TIFF, BigTIFF, OME-TIFF, ImageJ TIFF or Aperio SVS file (with ``file``: its name,
        for messages).
    file : binary file object, optional
        The open, seekable file to read instead of opening ``path`` (e.g. an fsspec file
        of a remote URL: only the bytes of the tiles read are fetched).

    Returns
    -------
    RawImage
        One zarr array per pyramid level; format ``"svs"``, ``"ome-tiff"`` or ``"tiff"``.

    Raises
    ------
    InvalidImageError
        The file is not a TIFF, is truncated or corrupt, or has an axis tilerseg cannot
        interpret.
    """
    try:
        tif = tifffile.TiffFile(path if file is None else file)
    except Exception as exc:
        raise unreadable(path, short_reason(exc)) from None
    try:
        if not tif.series:
            raise unreadable(path, "no image data in the file")
        series = tif.series[0]
        names = _axis_names(series.axes, series.shape, path)
        for level in series.levels:
            _check_truncated(level, path)
        arrays = [
            zarr.open(series.aszarr(level=k), mode="r") for k in range(len(series.levels))
        ]
        fmt = "svs" if tif.is_svs else "ome-tiff" if tif.is_ome else "tiff"
        try:
            sizes = pixel_size(tif)
        except Exception:  # unreadable metadata leaves the pixel size unknown
            sizes = {}
    except TilersegError:
        tif.close()
        raise
    except Exception as exc:
        tif.close()
        raise unreadable(path, short_reason(exc)) from None
    return RawImage(arrays, names, fmt, pixel_size=sizes, keep=tif)


def _slice_info(path: str, label: str) -> tuple[str, tuple[int, ...], Any, dict[str, float]]:
    """Axes, shape, dtype and pixel size of one TIFF slice."""
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            try:
                sizes = pixel_size(tif)
            except Exception:
                sizes = {}
            return series.axes, tuple(series.shape), series.dtype, sizes
    except Exception as exc:
        raise unreadable(label, f"slice {path}: {short_reason(exc)}") from None


def _read_slice(label: str, path: str, **kwargs: Any) -> Any:
    """One slice of a sequence, read when a tile needs it; a slice that cannot be read is
    a one-line error naming it (tifffile's own says only how many bytes were missing)."""
    try:
        return tifffile.imread(path, **kwargs)
    except Exception as exc:
        raise unreadable(label, f"slice {path}: {short_reason(exc)}") from None


def read_tiff_sequence(files: Sequence[str], label: str) -> RawImage:
    """Describe 2-D TIFF slices, sorted naturally by name, as one lazy z-stack.

    Parameters
    ----------
    files : sequence of str
        The slice files, in any order.
    label : str
        The folder or glob they come from, for messages.

    Returns
    -------
    RawImage
        Axes ``ZYX`` (or ``ZYXS`` for RGB slices), format ``"tiff-sequence"``. The
        first, middle and last slices are checked to have the same shape and dtype.

    Raises
    ------
    InvalidImageError
        A checked slice is unreadable, not 2-D, or differs from the first.
    """
    files = tifffile.natural_sorted(os.fspath(f) for f in files)
    axes, shape, dtype, sizes = _slice_info(files[0], label)
    if axes not in ("YX", "YXS"):
        raise InvalidImageError(
            f"{label}: slice {files[0]} has axes {axes} (shape {shape}); a folder or glob "
            "of slices must hold 2-D images (YX or YXS)"
        )
    for other in sorted({files[len(files) // 2], files[-1]} - {files[0]}):
        _, other_shape, other_dtype, _ = _slice_info(other, label)
        if (other_shape, other_dtype) != (shape, dtype):
            raise InvalidImageError(
                f"{label}: slices differ: {files[0]} is {shape} {dtype}, "
                f"{other} is {other_shape} {other_dtype}"
            )
    try:
        sequence = tifffile.TiffSequence(files, imread=functools.partial(_read_slice, label))
        array = zarr.open(sequence.aszarr(), mode="r")
    except Exception as exc:
        raise unreadable(label, short_reason(exc)) from None
    sizes.pop("Z", None)
    return RawImage([array], ["Z", *axes], "tiff-sequence", pixel_size=sizes, keep=sequence)

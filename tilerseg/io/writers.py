"""OME-Zarr output: class probabilities and/or a label image, OME-NGFF 0.5 on Zarr v3.

Layout
------
With probabilities (labels optional)::

    out.zarr/                       root group = the probability image
        zarr.json                   attributes "ome" (multiscales, axes c[z]yx) and "tilerseg"
        0/ 1/ ...                   (C, [Z,] Y, X) levels, all classes in one chunk
        labels/                     only if labels were requested; "ome": {"labels": [...]}
            segmentation/           label image: multiscales (axes [z]yx) + "image-label"
                0/ 1/ ...           with "source": {"image": "../../"}
            instances/              instance labels (output "instances"): uint32 object
                0/ 1/ ...           ids, uint64 when there are more; same metadata

Labels only (no probabilities)::

    out.zarr/                       root group = the label image itself
        zarr.json                   "ome": multiscales (axes [z]yx) + "image-label" (no
        0/ 1/ ...                   "source": there is no intensity image), and "tilerseg"

OME-NGFF has no valid group that holds only a ``labels/`` sub-group (``labels`` must sit
under a multiscale image), so a labels-only output makes the root itself the label
image. It validates as an ``Image`` and as an ``ImageLabel`` with ``ome-zarr-models``,
and ``ome-zarr``'s reader (hence ``napari-ome-zarr``) shows it as a labels layer because
of its ``image-label`` key. :func:`open_output` hides the difference.

Every array has ``dimension_names`` equal to the axis names (``ome-zarr-models``
requires it). Level ``k`` has scale ``pixel_size * 2**k`` on spatial axes; axes of
unknown pixel size have scale ``1.0 * 2**k`` and no ``unit``. A probability level is the
2x block mean of the level before (:func:`tilerseg.io.pyramid.downsample`), so its pixel
``i`` is centred on the ``2**k`` level-0 pixels ``i * 2**k ...`` it averages: its
``translation`` (after the scale) is ``pixel_size * (2**k - 1) / 2``. (Along an axis whose
level-0 length ``2**k`` does not divide, the last pixel averages a partial block, whose
centre lies up to that much nearer the start.)
A label level (segmentation and instances) takes the first pixel of each block, level-0
pixel ``i * 2**k``: no translation. Every label image is chunked as the probabilities
(spatially): level 0 in output tiles, the eager levels in halved tiles, the rest in tiles.

The probabilities' ``omero`` metadata names and colours the channels (one per class) and
gives the window of the stored values and ``rdefs`` (``defaultT`` 0, ``defaultZ`` the
middle plane of a z-stack, ``model`` ``"greyscale"`` for one channel, else ``"color"``).

Probabilities are stored as ``uint8`` (``round(p * 255)``; ``attrs["tilerseg"]
["probability_scale"] = 1/255``), ``float16`` or ``float32``. ``attrs["tilerseg"]`` holds
the run attributes plus ``"complete"``: ``False`` while writing, ``True`` after
:meth:`OutputWriter.commit`.

Everything is written into a hidden sibling directory ``.NAME.partial-UUID`` and only
moved to the final path by :meth:`OutputWriter.commit`, so an existing output is never
touched before the new one is complete.

Examples
--------
>>> import numpy as np
>>> encode_probabilities(np.array([0.0, 0.5, 1.0], np.float32), "uint8")
array([  0, 128, 255], dtype=uint8)
"""

from __future__ import annotations

import dataclasses
import os
import logging
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import zarr
from upath import UPath

from tilerseg.errors import InvalidArgumentError, OutputError
from tilerseg.io import remote
from tilerseg.io.chunks import COMPRESSOR, ChunkWriter
from tilerseg.io.pyramid import downsample, level_chunks, level_shapes, mean2
from tilerseg.labels import label_dtype, labels_from_probabilities

log = logging.getLogger(__name__)

__all__ = [
    "PROBABILITY_DTYPES",
    "class_colors",
    "label_colors",
    "OutputSpec",
    "OutputWriter",
    "decode_probabilities",
    "encode_probabilities",
    "label_dtype",
    "labels_from_probabilities",
    "open_output",
    "check_output_folder",
    "spec_from_dict",
    "spec_to_dict",
]

PROBABILITY_DTYPES = ("uint8", "float16", "float32")
"""Dtypes in which probabilities can be stored."""

LABEL_NAME = "segmentation"
"""Name of the label image under ``labels/``."""

INSTANCE_NAME = "instances"
"""Name of the instance label image under ``labels/`` (see :mod:`tilerseg.engine.instances`)."""

_PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip


def class_colors(num_classes: int) -> list[str]:
    """The ``RRGGBB`` colour of each class's probability channel (``omero``): white for
    class 0 (background), then the colour its value has in the label image.

    Examples
    --------
    >>> class_colors(3)[0]
    'FFFFFF'
    """
    rgb = [(255, 255, 255)] + [_PALETTE[(k - 1) % len(_PALETTE)]
                               for k in range(1, int(num_classes))]
    return ["%02X%02X%02X" % tuple(c) for c in rgb]


def label_colors(num_classes: int) -> list[dict[str, Any]]:
    """The ``image-label`` colours of a label image of ``num_classes`` classes: value 0
    transparent, value ``v`` the palette's ``v``-th colour (at least values 0 and 1, at
    most 256 values).

    Examples
    --------
    >>> label_colors(2)[0]
    {'label-value': 0, 'rgba': [0, 0, 0, 0]}
    """
    values = max(int(num_classes), 2)
    return [{"label-value": 0, "rgba": [0, 0, 0, 0]}] + [
        {"label-value": v, "rgba": [*_PALETTE[(v - 1) % len(_PALETTE)], 255]}
        for v in range(1, min(values, 256))]


@dataclass
class OutputSpec:
    """What to write.

    Attributes
    ----------
    spatial_axes : str
        ``"YX"`` or ``"ZYX"``.
    shape : tuple of int
        Spatial shape.
    chunks : tuple of int
        Spatial chunk shape (the output tile); clipped to ``shape``.
    num_classes : int
        Number of probability channels (1 for a binary sigmoid model).
    probabilities : str or None
        Stored dtype of the probabilities (``"uint8"``, ``"float16"``, ``"float32"``),
        or None to write no probabilities.
    labels : bool
        Whether to write a label image.
    instances : bool
        Whether the output has an instance label image ``labels/instances`` (written by
        :mod:`tilerseg.engine.instances`; needs probabilities). Its level 0 is created
        there, once the number of objects gives its dtype; the writer builds its pyramid
        (nearest, each level chunked as the probabilities' level) and metadata at
        :meth:`OutputWriter.commit`.
    pixel_size : dict of str to float
        Micrometres per spatial axis letter (``"Z"``, ``"Y"``, ``"X"``); may be partial.
    attributes : dict
        Run parameters (JSON-serialisable), stored under ``attrs["tilerseg"]``.
    pyramid : bool
        Build the lower-resolution levels at :meth:`OutputWriter.commit` (2x per level,
        until the image fits one chunk); False writes level 0 only.
    eager_levels : int
        Up to this many levels after level 0 are written tile by tile, from the float
        probabilities, by :meth:`OutputWriter.write` (so every level-0 chunk must be
        written through it, not into the array directly). Each such level ``k`` is
        chunked ``chunks / 2**k``, so one tile is exactly one chunk of it; only levels whose
        chunks stay whole and at least 128 px are done this way
        (see :func:`eager_level_count`). The rest are built at commit, as usual.
    class_names : tuple of str
        A name per probability channel (the model's ``metadata["classes"]``), shown by
        viewers as the channels' labels; empty: ``class 0``, ``class 1``...
    """

    spatial_axes: str
    shape: tuple[int, ...]

    chunks: tuple[int, ...]
    num_classes: int
    probabilities: str | None
    labels: bool
    pixel_size: dict[str, float] = field(default_factory=dict)
    attributes: dict = field(default_factory=dict)
    pyramid: bool = True
    eager_levels: int = 0
    instances: bool = False
    class_names: tuple[str, ...] = ()


def check_output_folder(path: str | os.PathLike) -> None:
    """Make the folder of output ``path`` (with its parents) where it is missing, as
    ``mkdir -p`` would, and raise :class:`OutputError` unless it is then a writable folder
    (nothing is done for a remote URL: object stores have no folders)."""
    loc = remote.location(path)
    if not remote.is_local(loc):
        return
    parent = Path(os.path.abspath(loc)).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"output directory '{parent}' is not a folder") from None
    except OSError as err:
        raise OutputError(f"cannot create the output directory '{parent}': "
                          f"{err.strerror or err}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output directory '{parent}' is not writable")


def spec_to_dict(spec: OutputSpec) -> dict[str, Any]:
    """The spec as plain JSON values (see :func:`spec_from_dict`)."""
    return _jsonable(dataclasses.asdict(spec))


def spec_from_dict(data: dict[str, Any]) -> OutputSpec:
    """The :class:`OutputSpec` of :func:`spec_to_dict`."""
    values = dict(data)
    values["shape"] = tuple(values["shape"])
    values["chunks"] = tuple(values["chunks"])
    values["class_names"] = tuple(values.get("class_names", ()))  # not in older manifests
    return OutputSpec(**values)


def encode_probabilities(probs: np.ndarray, dtype: str) -> np.ndarray:
    """Convert float probabilities in [0, 1] to their stored dtype.

    Parameters
    ----------
    probs : numpy.ndarray
        Probabilities (any float dtype); values outside [0, 1] are clipped.
    dtype : {"uint8", "float16", "float32"}
        Stored dtype. ``uint8`` stores ``round(p * 255)``.

    Returns
    -------
    numpy.ndarray
        Array of the same shape in ``dtype``.

    Raises
    ------
    InvalidArgumentError
        If ``dtype`` is not one of :data:`PROBABILITY_DTYPES`.
    """
    if dtype not in PROBABILITY_DTYPES:
        raise InvalidArgumentError(
            f"probability dtype must be one of {', '.join(PROBABILITY_DTYPES)}, got {dtype!r}"
        )
    if dtype == "uint8":  # round(255 p), in place in one float32 scratch array
        scaled = np.multiply(probs, np.float32(255.0), dtype=np.float32)
        np.clip(scaled, 0.0, 255.0, out=scaled)
        np.rint(scaled, out=scaled)
        return scaled.astype(np.uint8)
    p = np.clip(np.asarray(probs, dtype=np.float32), 0.0, 1.0)
    return p.astype(dtype)


def decode_probabilities(stored: np.ndarray) -> np.ndarray:
    """Convert stored probabilities back to float32 in [0, 1].

    Parameters
    ----------
    stored : numpy.ndarray
        ``uint8`` (divided by 255), ``float16`` or ``float32`` probabilities.

    Returns
    -------
    numpy.ndarray
        float32 array of the same shape.
    """
    stored = np.asarray(stored)
    if stored.dtype == np.uint8:
        return stored.astype(np.float32) / np.float32(255.0)
    return stored.astype(np.float32, copy=False)


def _jsonable(value: Any) -> Any:
    """``value`` with numpy scalars/arrays, paths, tuples and sets made JSON types."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise InvalidArgumentError(f"output attribute value {value!r} is not JSON-serialisable")


def eager_level_count(shape: Sequence[int], chunks: Sequence[int], spec: OutputSpec) -> int:
    """How many pyramid levels after level 0 can be written tile by tile.

    Level ``k`` qualifies while it exists, every chunk side divides by ``2**k`` and the
    halved chunks stay at least 128 px (or the whole level) on every axis.

    Examples
    --------
    >>> spec = OutputSpec("YX", (5000, 5000), (1024, 1024), 2, "uint8", False, eager_levels=2)
    >>> eager_level_count((5000, 5000), (1024, 1024), spec)
    2
    >>> eager_level_count((5000, 5000), (100, 100), spec)
    0
    """
    shapes = level_shapes(shape, chunks)
    count = 0
    for k in range(1, min(int(spec.eager_levels), len(shapes) - 1) + 1):
        ok = all(c % (1 << k) == 0 and (c >> k >= 128 or c >> k >= n)
                 for c, n in zip(chunks, shapes[k]))
        if not ok:
            break
        count = k
    return count


def _check_spec(spec: OutputSpec) -> None:
    """Raise InvalidArgumentError for an unusable spec."""
    if spec.spatial_axes not in ("YX", "ZYX"):
        raise InvalidArgumentError(f"spatial axes must be 'YX' or 'ZYX', got {spec.spatial_axes!r}")
    nd = len(spec.spatial_axes)
    if len(spec.shape) != nd or any(int(n) < 1 for n in spec.shape):
        raise InvalidArgumentError(
            f"output shape {spec.shape} does not fit axes {spec.spatial_axes}"
        )
    if len(spec.chunks) != nd or any(int(c) < 1 for c in spec.chunks):
        raise InvalidArgumentError(
            f"output chunks {spec.chunks} do not fit axes {spec.spatial_axes}"
        )
    if int(spec.num_classes) < 1:
        raise InvalidArgumentError(f"number of classes must be >= 1, got {spec.num_classes}")
    if spec.probabilities is not None and spec.probabilities not in PROBABILITY_DTYPES:
        raise InvalidArgumentError(
            f"probability dtype must be one of {', '.join(PROBABILITY_DTYPES)} or None, "
            f"got {spec.probabilities!r}"
        )
    if spec.probabilities is None and not spec.labels:
        raise InvalidArgumentError("nothing to write: neither probabilities nor labels requested")
    if spec.instances and spec.probabilities is None:
        raise InvalidArgumentError("instance labels are written with the probabilities")


class OutputWriter:
    """Write one OME-Zarr segmentation output, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Final output directory (e.g. ``"cells.ome.zarr"``), or an fsspec URL
        (``"s3://bucket/cells.ome.zarr"``; ``file://`` is a local path): see
        :mod:`tilerseg.io.remote`.
    spec : OutputSpec
        What to write.
    overwrite : bool, default False
        Replace an existing ``path`` at :meth:`commit` (it is untouched before).

    Attributes
    ----------
    path : pathlib.Path or str
        Absolute final path (a URL string for a remote output).
    spec : OutputSpec
        The spec.
    probabilities : zarr.Array or None
        Level 0 of the probabilities, shape ``(C, *shape)``, chunks ``(C, *chunks)``,
        dtype ``spec.probabilities``; write values from :func:`encode_probabilities`.
    labels : zarr.Array or None
        Level 0 of the labels, shape ``shape``, chunks ``chunks``, dtype
        :func:`label_dtype` of ``num_classes``.

    staging : str or os.PathLike, optional
        Where the output is built before :meth:`commit` moves it to ``path``; by default
        a new hidden sibling ``.NAME.partial-UUID``.
    existing : bool
        Open the unfinished output already at ``staging`` (written with the same spec,
        e.g. by another process) instead of creating it.

    Raises
    ------
    OutputError
        If ``path`` exists and not ``overwrite``, if its parent directory does not exist
        or is not writable, if the temporary output cannot be created, or (``existing``)
        if it cannot be opened.
    InvalidArgumentError
        If the spec is unusable.

    Notes
    -----
    Write whole chunks (output tiles aligned to ``chunks``) from parallel workers
    without locks. Used as a context manager, the writer aborts when the block raises;
    it does not commit by itself.
    """

    def __init__(self, path: str | os.PathLike, spec: OutputSpec, *, overwrite: bool = False,
                 staging: str | os.PathLike | None = None, existing: bool = False):
        _check_spec(spec)
        self.spec = spec
        self.path = remote.output_location(path)
        self.overwrite = overwrite
        self._attributes = _jsonable(dict(spec.attributes))
        self._shape = tuple(int(n) for n in spec.shape)
        self._chunks = level_chunks(spec.chunks, self._shape)
        self.eager = eager_level_count(self._shape, self._chunks, spec) if spec.pyramid else 0
        self._state = "open"
        #: the temporary store holds the only copy of a finished output (its move into
        #: place failed or was refused): :meth:`abort` and callers leave it in place
        self.kept = False
        #: :meth:`commit` replaced an output that was at :attr:`path` (``overwrite``)
        self.replaced = False
        self.staging = (remote.output_location(staging) if staging is not None
                        else self.path.with_name(remote.staging_name(self.path)))
        self.probabilities: zarr.Array | None = None
        self.labels: zarr.Array | None = None
        self._chunk_writers: dict[str, ChunkWriter | None] = {}  # array path -> its writer
        self._chunk_lock = threading.Lock()
        if existing:
            try:
                self._open_existing()
            except (OSError, KeyError, ValueError) as err:
                raise OutputError(
                    f"cannot open the unfinished output '{self.staging}': {err}") from err
            return
        if not overwrite and remote.exists(self.path):  # no round trip to a remote when replacing
            raise OutputError(f"output '{os.fspath(path)}' exists; pass --overwrite to replace it")
        check_output_folder(self.path)
        try:
            self._create()
        except BaseException as err:
            remote.remove(self.staging, ignore_errors=True)
            if isinstance(err, (OSError, NotImplementedError)):  # remote: a read-only protocol
                raise OutputError(f"cannot write output '{self.path}': {err}") from err
            raise

    # -- layout -------------------------------------------------------------------------

    @property
    def _label_images(self) -> list[str]:
        """The label images under ``labels/`` (with probabilities)."""
        return [LABEL_NAME] * bool(self.spec.labels) + [INSTANCE_NAME] * bool(self.spec.instances)

    @property
    def _labels_group(self) -> str:
        """Path of the label image inside the output ('' = the root)."""
        return f"labels/{LABEL_NAME}" if self.spec.probabilities is not None else ""

    def _create_level(self, level: int, shape: tuple[int, ...]
                      ) -> tuple[zarr.Array | None, zarr.Array | None]:
        """Create the arrays of one pyramid level (empty): (probabilities, labels)."""
        axes = self.spec.spatial_axes.lower()
        chunks = self._level_chunks(level, shape)
        store = str(self.staging)
        probs = labels = None
        if self.spec.probabilities is not None:
            c = int(self.spec.num_classes)
            arr = zarr.create_array(
                store, name=str(level), shape=(c, *shape), chunks=(c, *chunks),
                dtype=self.spec.probabilities, dimension_names=("c", *axes), zarr_format=3,
                compressors=COMPRESSOR,
                overwrite=level > self.eager,  # a commit-time level may be redone
            )  # fmt: skip
            probs = arr
            if level == 0:
                self.probabilities = arr
        if self.spec.labels:
            name = "/".join(p for p in (self._labels_group, str(level)) if p)
            arr = zarr.create_array(
                store, name=name, shape=shape, chunks=chunks,
                dtype=label_dtype(int(self.spec.num_classes)), dimension_names=tuple(axes),
                zarr_format=3, compressors=COMPRESSOR, overwrite=level > self.eager,
            )  # fmt: skip
            labels = arr
            if level == 0:
                self.labels = arr
        return probs, labels

    def _create(self) -> None:
        """Create the temporary output with level 0 and provisional metadata."""
        root = zarr.open_group(str(self.staging), mode="w-", zarr_format=3)
        if self.spec.probabilities is not None and self._label_images:
            group = root.create_group("labels")
            for name in self._label_images:
                group.create_group(name)
        self._create_level(0, self._shape)
        shapes = level_shapes(self._shape, self._chunks)
        self._eager_arrays = {k: self._create_level(k, shapes[k]) for k in range(1, self.eager + 1)}
        self._write_metadata(1, complete=False)

    def _open_level(self, level: int) -> tuple[zarr.Array | None, zarr.Array | None]:
        """Open the arrays of one existing level for writing: (probabilities, labels)."""
        store = str(self.staging)
        probs = labels = None
        if self.spec.probabilities is not None:
            probs = zarr.open_array(store, path=str(level), mode="r+", zarr_format=3)
        if self.spec.labels:
            name = "/".join(p for p in (self._labels_group, str(level)) if p)
            labels = zarr.open_array(store, path=name, mode="r+", zarr_format=3)
        return probs, labels

    def _open_existing(self) -> None:
        """Open level 0 and the eager levels of an unfinished output made by this spec."""
        if not remote.exists(self.staging / "zarr.json"):
            raise OSError(f"no Zarr group at '{self.staging}'")
        self.probabilities, self.labels = self._open_level(0)
        self._eager_arrays = {k: self._open_level(k) for k in range(1, self.eager + 1)}

    def _level_chunks(self, level: int, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Spatial chunk shape of pyramid level ``level`` (spatial ``shape``), the same for
        the probabilities and every label image: the output tile, halved per level for the
        eager levels (one tile is one chunk of them), clipped to the level."""
        nominal = self._chunks
        if 0 < level <= self.eager:
            nominal = tuple(c >> level for c in self._chunks)
        return level_chunks(nominal, shape)

    def _multiscale(self, name: str, channel: bool, levels: int, method: str) -> dict:
        """One OME-NGFF 0.5 ``multiscales`` entry.

        Level ``k`` has scale ``pixel_size * 2**k``; a ``"mean"`` level also has the
        translation ``pixel_size * (2**k - 1) / 2`` on every spatial axis, where the centre
        of the ``2**k`` level-0 pixels it averages lies (a ``"nearest"`` level keeps the
        first of them: no translation).
        """
        axes: list[dict] = [{"name": "c", "type": "channel"}] if channel else []
        sizes = []
        for letter in self.spec.spatial_axes:
            size = self.spec.pixel_size.get(letter, self.spec.pixel_size.get(letter.lower()))
            axis = {"name": letter.lower(), "type": "space"}
            if size is not None:
                axis["unit"] = "micrometer"
            axes.append(axis)
            sizes.append(1.0 if size is None else float(size))
        datasets = []
        for k in range(levels):
            transforms = [{"type": "scale", "scale": [1.0] * channel + [s * 2**k for s in sizes]}]
            if method == "mean" and k > 0:
                transforms.append({"type": "translation",
                                   "translation": [0.0] * channel + [s * (2**k - 1) / 2
                                                                     for s in sizes]})
            datasets.append({"path": str(k), "coordinateTransformations": transforms})
        from tilerseg import __version__

        how = ("mean of each 2x2 block (2x2x2 in 3D) of the level before; on an axis of odd "
               "length the last block has only the pixels inside" if method == "mean" else
               "the first pixel of each 2x2 block (2x2x2 in 3D) of the level before")
        return {"name": name, "axes": axes, "datasets": datasets, "type": method,
                "metadata": {"description": how, "method": "tilerseg.io.pyramid.downsample",
                             "version": __version__}}

    def _omero(self) -> dict:
        """Display settings of the probability channels (OME-NGFF's transitional
        ``omero``), which viewers such as napari use: one channel per class, named after
        it (``class_names``, else ``class k``), the colour of its value in the label image
        (white for class 0), the window of the stored values."""
        top = 255 if self.spec.probabilities == "uint8" else 1.0
        count = int(self.spec.num_classes)
        colors = class_colors(count)
        names = list(self.spec.class_names) if len(self.spec.class_names) == count else \
            [f"class {k}" for k in range(count)]
        channels = [
            {"label": str(names[k]), "color": colors[k],
             "active": True, "coefficient": 1.0, "family": "linear", "inverted": False,
             "window": {"min": 0, "max": top, "start": 0, "end": top}}
            for k in range(int(self.spec.num_classes))
        ]
        # the time point and plane viewers show first (the middle plane of a z-stack); one
        # channel is shown in grey, several in their colours
        z = self._shape[0] // 2 if self.spec.spatial_axes == "ZYX" else 0
        rdefs = {"defaultT": 0, "defaultZ": z, "model": "greyscale" if count == 1 else "color"}
        return {"channels": channels, "rdefs": rdefs}

    def _image_label(self, source: bool) -> dict:
        """The ``image-label`` metadata (colours: 0 transparent, classes from a palette)."""
        meta: dict[str, Any] = {"version": "0.5", "colors": label_colors(self.spec.num_classes)}
        if source:
            meta["source"] = {"image": "../../"}
        return meta

    def _write_metadata(self, levels: int, *, complete: bool) -> None:
        """Write the ``ome`` and ``tilerseg`` attributes for ``levels`` levels."""
        root = zarr.open_group(str(self.staging), mode="r+", zarr_format=3)
        info = dict(self._attributes)
        info["complete"] = complete
        if self.spec.probabilities == "uint8":
            info["probability_scale"] = 1.0 / 255.0
        label_ms = self._multiscale(LABEL_NAME, False, levels, "nearest")
        if self.spec.probabilities is None:
            ome = {
                "version": "0.5",
                "multiscales": [label_ms],
                "image-label": self._image_label(False),
            }
            root.update_attributes({"ome": ome, "tilerseg": info})  # one write
            return
        ome = {
            "version": "0.5",
            "multiscales": [self._multiscale("probabilities", True, levels, "mean")],
            "omero": self._omero(),
        }
        root.update_attributes({"ome": ome, "tilerseg": info})
        if self._label_images:
            root["labels"].attrs["ome"] = {"version": "0.5", "labels": self._label_images}
        if self.spec.labels:
            root[f"labels/{LABEL_NAME}"].attrs["ome"] = {
                "version": "0.5",
                "multiscales": [label_ms],
                "image-label": self._image_label(True),
            }
        if self.spec.instances:  # no colours: one per object is the viewer's job
            root[f"labels/{INSTANCE_NAME}"].attrs["ome"] = {
                "version": "0.5",
                "multiscales": [self._multiscale(INSTANCE_NAME, False, levels, "nearest")],
                "image-label": {"version": "0.5", "source": {"image": "../../"}},
            }

    # -- writing ------------------------------------------------------------------------

    def write(
        self, region: tuple[slice, ...], probs: np.ndarray, *, threshold: float = 0.5,
        labels: np.ndarray | None = None,
    ) -> None:
        """Write float probabilities of one spatial region (encoded, and their labels).

        Also writes the region's eager pyramid levels (``spec.eager_levels``), so with
        eager levels every level-0 chunk must be written through this method.

        Parameters
        ----------
        region : tuple of slice
            Spatial region, one slice per spatial axis; best aligned to ``chunks``.
        probs : numpy.ndarray
            ``(C, *region shape)`` float probabilities in [0, 1].
        threshold : float, default 0.5
            Foreground threshold for a single class (see :func:`labels_from_probabilities`).
        labels : numpy.ndarray, optional
            The region's labels, when the caller derives them otherwise (default:
            :func:`labels_from_probabilities` with ``threshold``).
        """
        self._check_open()
        region = tuple(region)
        if self.probabilities is not None:
            self._store(self.probabilities, (slice(None), *region),
                        encode_probabilities(probs, self.spec.probabilities))
        if self.labels is not None:
            if labels is None:
                labels = labels_from_probabilities(probs, threshold)
            self._store(self.labels, region, labels)
        if self.eager:
            self.write_levels(region, probs, labels)

    def _store(self, array: zarr.Array, region: tuple[slice, ...], values: np.ndarray) -> None:
        """Write ``values`` into ``region`` of ``array``: a whole chunk encoded here and put
        straight into the store (see :mod:`tilerseg.io.chunks`), anything else through
        zarr."""
        with self._chunk_lock:
            if array.path not in self._chunk_writers:
                try:
                    self._chunk_writers[array.path] = ChunkWriter(array, self.staging)
                except ValueError as err:  # other codecs (an output made otherwise): zarr
                    log.debug("writing %s through zarr: %s", array.path, err)
                    self._chunk_writers[array.path] = None
            chunks = self._chunk_writers[array.path]
        start = tuple(0 if s.start is None else int(s.start) for s in region)
        stop = tuple(size if s.stop is None else int(s.stop)
                     for s, size in zip(region, array.shape))
        exact = all(s.step in (None, 1) and b - a == n
                    for s, a, b, n in zip(region, start, stop, values.shape))
        if chunks is not None and exact and chunks.whole(start, values.shape):
            chunks.write(start, values)
        else:
            array[region] = values

    def write_levels(self, region: tuple[slice, ...], probs: np.ndarray | None,
                     labels: np.ndarray | None) -> None:
        """Write the eager pyramid levels (``spec.eager_levels``) of one level-0 chunk.

        Parameters
        ----------
        region : tuple of slice
            The level-0 chunk (spatial), aligned to ``chunks``.
        probs : numpy.ndarray or None
            Its float probabilities ``(C, *region shape)`` (None without probabilities).
        labels : numpy.ndarray or None
            Its level-0 labels (None without labels).

        Notes
        -----
        Probability levels are 2x means of the float probabilities (the same reduction
        as at commit, which starts from the stored values instead), label levels take
        every other pixel. Each call writes whole chunks: no locks are needed.
        """
        self._check_open()
        nd = len(self._shape)
        for k in range(1, self.eager + 1):
            level = tuple(slice(s.start >> k, -(-s.stop >> k)) for s in region)
            prob_array, label_array = self._eager_arrays[k]
            if probs is not None and prob_array is not None:
                probs = mean2(probs, nd, None, None, np.dtype(np.float32))
                self._store(prob_array, (slice(None), *level),
                            encode_probabilities(probs, self.spec.probabilities))
            if labels is not None and label_array is not None:
                labels = labels[(slice(None, None, 2),) * nd]
                self._store(label_array, level, labels)

    def update_attributes(self, **values: Any) -> None:
        """Add run information (JSON-serialisable) to ``attrs["tilerseg"]`` before commit."""
        self._check_open()
        self._attributes.update(_jsonable(values))

    def _check_open(self) -> None:
        if self._state != "open":
            raise OutputError(f"output '{self.path}' was already {self._state}")

    def _build_pyramid(self, shapes: list[tuple[int, ...]]) -> None:
        """Create and fill levels 1.. from the level before each."""
        root = zarr.open_group(str(self.staging), mode="r+", zarr_format=3)
        nd = len(self._shape)
        for k in range(1, len(shapes)):
            if self.spec.instances:  # created after the tiles: never eager
                before = root[f"labels/{INSTANCE_NAME}/{k - 1}"]
                level = zarr.create_array(
                    str(self.staging), name=f"labels/{INSTANCE_NAME}/{k}", shape=shapes[k],
                    chunks=self._level_chunks(k, shapes[k]), dtype=before.dtype,
                    fill_value=0, dimension_names=before.metadata.dimension_names,
                    zarr_format=3, compressors=COMPRESSOR, overwrite=True)
                downsample(before, level, "nearest", spatial_ndim=nd)
            if k <= self.eager:  # written tile by tile (write_levels)
                continue
            self._create_level(k, shapes[k])
            if self.spec.probabilities is not None:
                encode = partial(encode_probabilities, dtype=self.spec.probabilities)
                downsample(
                    root[str(k - 1)], root[str(k)], "mean", spatial_ndim=nd,
                    decode=decode_probabilities, encode=encode,
                )  # fmt: skip
            if self.spec.labels:
                prefix = f"{self._labels_group}/" if self._labels_group else ""
                downsample(
                    root[f"{prefix}{k - 1}"], root[f"{prefix}{k}"], "nearest", spatial_ndim=nd
                )

    def commit(self) -> UPath:
        """Finish the output and move it into place.

        Builds the lower-resolution levels, writes the final metadata (``complete``
        true), then renames the temporary directory to ``path`` (on a remote filesystem:
        copies it, the root ``zarr.json`` last; see :func:`tilerseg.io.remote.move`). With
        ``overwrite``, an existing output is moved aside only now and deleted after the
        move (moved back if the move fails or is interrupted, after what the failed move
        left at ``path`` is removed). A finished output that could not be moved into
        place stays in the temporary directory, which the message names (:attr:`kept`).

        Returns
        -------
        upath.UPath
            The final location (:attr:`path`). :attr:`probabilities` and :attr:`labels` then refer to the
            final arrays, opened read-only.

        Raises
        ------
        OutputError
            If the writer was aborted, or ``path`` appeared meanwhile without
            ``overwrite`` (the finished output is kept in the temporary directory, which
            the message names), or the move fails.
        OSError
            Building the pyramid or writing the metadata failed (disk full...); the
            temporary directory is kept as it was.
        """
        if self._state == "committed":
            return self.path
        self._check_open()
        try:
            shapes = level_shapes(self._shape, self._chunks)
            if not self.spec.pyramid:
                shapes = shapes[:1]
            self._build_pyramid(shapes)
            self._write_metadata(len(shapes), complete=True)
        except OSError as err:  # an I/O failure (disk full...), not a user error
            raise OSError(err.errno, f"cannot finish output '{self.path}': "
                          f"{err.strerror or err}") from err
        self._move_into_place()
        self._state = "committed"
        self.probabilities = self._reopen("0" if self.spec.probabilities else None)
        self.labels = self._reopen(
            "/".join(p for p in (self._labels_group, "0") if p) if self.spec.labels else None
        )
        return self.path

    def _move_into_place(self) -> None:
        """Rename the temporary directory to the final path (see :meth:`commit`)."""
        old = None
        self.kept = True  # from here on the temporary store is the only copy of the result
        if remote.exists(self.path):
            if not self.overwrite:
                raise OutputError(
                    f"output '{self.path}' exists; pass --overwrite to replace it "
                    f"(the new output is kept in '{self.staging}')"
                )
            old = self.path.with_name(f".{self.path.name}.old-{uuid.uuid4().hex}")
            try:
                remote.move(self.path, old)  # on failure: ``old`` cleared, ``path`` as it was
            except Exception as err:
                raise OutputError(f"cannot replace output '{self.path}': {err} (the new "
                                  f"output is kept in '{self.staging}')") from err
        try:
            remote.move(self.staging, self.path)
        except BaseException as err:
            note = self._restore(old)
            if not isinstance(err, Exception):  # KeyboardInterrupt, SystemExit: no message
                log.warning("interrupted while moving the output into '%s': the new output "
                            "is kept in '%s'%s", self.path, self.staging, note)
                raise
            raise OutputError(f"cannot move output into '{self.path}': {err} (the new output "
                              f"is kept in '{self.staging}'{note})") from err
        self.kept = False
        self.replaced = old is not None
        if old is not None:
            remote.remove(old)

    def _restore(self, old: UPath | None) -> str:
        """Put the output moved aside to ``old`` back at :attr:`path` after a failed move
        (clearing what that move left there); a note on it for the message."""
        if old is None:
            return ""
        try:
            if not remote.is_local(self.path):  # a local rename leaves nothing half-way
                remote.remove(self.path)
            remote.move(old, self.path)
        except BaseException as err:
            if not isinstance(err, Exception):
                log.error("interrupted while moving the old output '%s' back to '%s'", old,
                          self.path)
                raise
            return f"; the old output is in '{old}': moving it back failed: {err}"
        return "; the old output is back in place"

    def _reopen(self, name: str | None) -> zarr.Array | None:
        """Read-only array ``name`` of the committed output."""
        if name is None:
            return None
        return zarr.open_array(str(self.path), path=name, mode="r", zarr_format=3)

    def abort(self) -> None:
        """Delete the temporary output (unless :attr:`kept`); the final path is untouched.

        Does nothing after :meth:`commit` or a previous :meth:`abort`.
        """
        if self._state != "open":
            return
        self._state = "aborted"
        self.probabilities = self.labels = None
        if not self.kept:
            remote.remove(self.staging, ignore_errors=True)

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()


def open_output(path: str | os.PathLike) -> dict[str, Any]:
    """Open a tilerseg OME-Zarr output for reading.

    Parameters
    ----------
    path : str or os.PathLike
        Output directory, or an fsspec URL.

    Returns
    -------
    dict
        ``"probabilities"``: level 0 of the probabilities (zarr.Array, stored dtype) or
        None; ``"labels"``: level 0 of the labels or None; ``"instances"``: level 0 of
        the instance labels or None; ``"attributes"``: the
        ``tilerseg`` attributes; ``"levels"``: number of pyramid levels.

    Raises
    ------
    OutputError
        If ``path`` is not an OME-Zarr multiscale image.
    """
    try:
        root = zarr.open_group(os.fspath(path), mode="r", zarr_format=3)
        ome = dict(root.attrs.get("ome", {}))
        levels = len(ome["multiscales"][0]["datasets"])
    except (
        OSError,
        KeyError,
        IndexError,
        TypeError,
        ValueError,
    ) as err:  # zarr's not-found errors are both
        raise OutputError(f"'{path}' is not an OME-Zarr output: {err}") from err
    probabilities = labels = instances = None
    if "image-label" in ome:
        labels = root["0"]
    else:
        probabilities = root["0"]
        if f"labels/{LABEL_NAME}/0" in root:
            labels = root[f"labels/{LABEL_NAME}/0"]
        if f"labels/{INSTANCE_NAME}/0" in root:
            instances = root[f"labels/{INSTANCE_NAME}/0"]
    return {
        "probabilities": probabilities,
        "labels": labels,
        "instances": instances,
        "attributes": dict(root.attrs.get("tilerseg", {})),
        "levels": levels,
    }

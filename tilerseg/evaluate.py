"""Score a segmentation against ground-truth masks: :func:`evaluate` and ``tilerseg eval``.

Probabilities come from a model run on images (:func:`tilerseg.segment`, a 2D model
segmenting a stack plane by plane) or are given: arrays, or OME-Zarr outputs written
by tilerseg. Each is paired, in order, with a ground-truth mask, and scored with
:mod:`tilerseg.metrics`:

* pixel error of the class map (argmax; ``p >= 0.5`` for a one-class model), IoU and
  Dice per class;
* adapted Rand error of the cells of that class map;
* the ISBI 2012 figures (:func:`tilerseg.metrics.isbi_scores`): best pixel error and
  best adapted Rand error over thresholds of the foreground (cell interior)
  probability.

Figures are given per image and overall (pooled over every pixel for pixel error,
IoU and Dice; averaged over every slice for the Rand error).

Volumes (a 3D model, predicted class maps, NIfTI masks, or ``volume=True``) are scored
as BraTS reports them instead: Dice, IoU and the 95th-percentile Hausdorff distance
(:func:`tilerseg.metrics.hd95`) of every foreground class and of named regions (unions
of classes), in 3D with the voxel spacing, per image and as means over images.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import (
    InvalidArgumentError,
    InvalidImageError,
    OutputError,
)
from .io.formats import image_paths
from .labels import LabelPolicy
from .metrics import (
    DEFAULT_THRESHOLDS,
    _class_scores,
    _confusion,
    _mean_ignoring_nan,
    adapted_rand_error,
    cells,
    check_distance,
    check_regions,
    check_spacing,
    check_thresholds,
    is_binary_255,
    slice_curves,
    summarise_curves,
    volume_scores,
)

__all__ = ["add_parser", "evaluate", "format_table", "to_json"]

_GUESSED_FORMATS = ("array", "dask", "npy", "zarr")


# -- inputs ---------------------------------------------------------------------------------


@dataclass
class _Item:
    """One input: an image, a mask or probabilities, as a path or an array."""

    name: str
    source: Any
    is_path: bool


def _items(spec: Any, what: str) -> list[_Item]:
    """Expand a path, folder, glob, array or list of them into inputs, in order."""
    if spec is None:
        raise InvalidArgumentError(f"no {what}s given")
    if isinstance(spec, (str, os.PathLike)):
        return [_Item(os.path.basename(os.path.normpath(p)), p, True)
                for p in image_paths(os.fspath(spec), what)]
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise InvalidArgumentError(f"the list of {what}s is empty")
        out: list[_Item] = []
        for i, entry in enumerate(spec):
            if isinstance(entry, (str, os.PathLike)):
                out.extend(_items(entry, what))
            else:
                out.append(_Item(f"#{i + 1}", _array_input(entry, what), False))
        return out
    return [_Item("#1", _array_input(spec, what), False)]


def _array_input(value: Any, what: str) -> Any:
    from .io.source import ImageSource

    if isinstance(value, ImageSource) or all(hasattr(value, a) for a in ("shape", "dtype")):
        return value
    raise InvalidArgumentError(
        f"cannot read a {what} from a {type(value).__name__}: give a path or an array"
    )


def _to_czyx(arr: np.ndarray, axes: str, label: str) -> np.ndarray:
    """Reorder an array with axes from ``"CZYXS"`` to ``(C, Z, Y, X)`` (S becomes C)."""
    shape = dict(zip(axes, arr.shape))
    if "S" in axes:
        if shape.get("C", 1) > 1 and shape["S"] > 1:
            raise InvalidImageError(f"{label} has both channels and colour samples")
        if "C" in axes:
            arr = np.take(arr, 0, axis=axes.index("C"))
            axes = axes.replace("C", "")
        axes = axes.replace("S", "C")
    extra = [a for a in axes if a not in "CZYX"]
    if extra or len(set(axes)) != len(axes) or not {"Y", "X"} <= set(axes):
        raise InvalidImageError(f"{label} has axes {axes!r}; expected Y, X and optionally C, Z")
    for letter in "ZC":
        if letter not in axes:
            arr, axes = arr[None], letter + axes
    return arr.transpose([axes.index(a) for a in "CZYX"])


def _open(item: _Item, label: str) -> tuple[Any, str, str, dict[str, float]]:
    """Data, axes, format and pixel size (µm) of an image or mask input (lazily for paths)."""
    from .io import open_image
    from .io.raw import guess_axes
    from .io.source import ImageSource

    if item.is_path:
        source = open_image(item.source)
        return source.data, source.axes, source.format, dict(source.pixel_size)
    if isinstance(item.source, ImageSource):
        source = item.source
        return source.data, source.axes, source.format, dict(source.pixel_size)
    arr = item.source
    if len(arr.shape) not in (2, 3, 4):
        raise InvalidImageError(f"{label} has shape {tuple(arr.shape)}; expected 2 to 4 dimensions")
    return arr, guess_axes(tuple(arr.shape), label), "array", {}


def _layout(data: Any, axes: str, fmt: str, label: str, planes_in_c: bool) -> np.ndarray:
    """``(C, Z, Y, X)`` view of ``data``; a guessed C axis is read as Z if ``planes_in_c``."""
    if planes_in_c and fmt in _GUESSED_FORMATS and "C" in axes and "Z" not in axes:
        axes = axes.replace("C", "Z")
    return _to_czyx(data, axes, label)


def _shape_only(data: Any) -> np.ndarray:
    """A zero-memory array of ``data``'s shape, to work out layouts before reading."""
    return np.broadcast_to(np.zeros((), np.uint8), tuple(int(n) for n in data.shape))


def _read(data: Any) -> np.ndarray:
    return np.asarray(data[(slice(None),) * len(data.shape)])


@dataclass
class _Mask:
    """A class map: a ground-truth mask or (``what="labels"``) a predicted one."""

    item: _Item
    data: Any
    axes: str
    format: str
    shape: tuple[int, int, int]
    pixel_size: dict[str, float]
    what: str = "mask"

    @classmethod
    def open(cls, item: _Item, what: str = "mask") -> _Mask:
        label = f"{what} {item.name}"
        data, axes, fmt, pixel_size = _open(item, label)
        czyx = _layout(_shape_only(data), axes, fmt, label, planes_in_c=True)
        if czyx.shape[0] != 1 and "S" not in axes:
            raise InvalidImageError(f"{label} has {czyx.shape[0]} channels; a class map has one")
        return cls(item, data, axes, fmt, tuple(czyx.shape[1:]), pixel_size, what)

    def classes(self, num_classes: int) -> np.ndarray:
        """The mask as a ``(Z, Y, X)`` class map (0/255 binary: 255 -> class 1)."""
        label = f"{self.what} {self.item.name}"
        full = _layout(_read(self.data), self.axes, self.format, label, planes_in_c=True)
        if full.shape[0] > 1:  # colour samples (RGB, RGBA): the colours must agree
            colours = full[:3]
            if not (colours == colours[:1]).all():
                raise InvalidImageError(f"{label} is a colour image; give a grey-level class map")
        return _class_map(full[0], num_classes, label)


def _class_map(arr: np.ndarray, num_classes: int, label: str) -> np.ndarray:
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    if arr.dtype.kind not in "iuf":
        raise InvalidImageError(f"{label} has unsupported dtype {arr.dtype}")
    values = np.unique(arr)
    whole = np.isfinite(values).all() and (values == np.round(values)).all()
    if arr.dtype.kind == "f" and not whole:
        raise InvalidImageError(f"{label} values are not understood: not whole class numbers")
    if is_binary_255(values) and num_classes <= 255:
        return (arr == 255).astype(np.uint8)
    if values.min() < 0 or values.max() >= num_classes:
        shown = ", ".join(str(v) for v in values[:6].tolist())
        shown += ", ..." if len(values) > 6 else ""
        raise InvalidImageError(
            f"{label} values ({shown}) are not understood: expected class numbers "
            f"0..{num_classes - 1} or a 0/255 binary mask"
        )
    return arr.astype(np.int64 if num_classes > 255 else np.uint8)


class _Probabilities:
    """Probabilities of one input: given (array or OME-Zarr) or computed by a model."""

    def __init__(
        self, item: _Item, model: Any = None, segment_kwargs: dict | None = None,
        geometry: Any = None,
    ) -> None:
        self.item, self.model, self.kwargs = item, model, segment_kwargs or {}
        self.geometry = geometry
        if model is None:
            self._open_given()
        else:
            self._open_image()

    def _open_given(self) -> None:
        label = f"probabilities {self.item.name}"
        if self.item.is_path:
            from .io.writers import open_output

            output = open_output(self.item.source)
            if output["probabilities"] is None:
                raise InvalidImageError(
                    f"{self.item.source} holds labels only, no probabilities (write it with "
                    "output='probabilities' or 'both')"
                )
            data = output["probabilities"]
            axes = "CYX" if len(data.shape) == 3 else "CZYX"
        else:
            data = self.item.source
            ndim = len(data.shape)
            if ndim not in (2, 3, 4):
                raise InvalidImageError(
                    f"{label} has shape {tuple(data.shape)}; expected (C, Y, X), (C, Z, Y, X) "
                    "or (Y, X) for one foreground class"
                )
            axes = {2: "YX", 3: "CYX", 4: "CZYX"}[ndim]
        self.data, self.axes = data, axes
        czyx = _to_czyx(_shape_only(data), axes, label)
        self.num_outputs, self.shape = czyx.shape[0], tuple(czyx.shape[1:])

    def _open_image(self) -> None:
        label = f"image {self.item.name}"
        data, axes, fmt, _ = _open(self.item, label)
        one_channel = self.geometry.in_channels == 1
        czyx = _layout(_shape_only(data), axes, fmt, label, planes_in_c=one_channel)
        if self.geometry.ndim == 3 and czyx.shape[1] == 1:
            raise InvalidImageError(f"{label} has no Z axis, which a 3D model needs")
        self.data, self.axes, self.format = data, axes, fmt
        self.num_outputs, self.shape = self.geometry.out_channels, tuple(czyx.shape[1:])

    def load(self) -> np.ndarray:
        """``(C, Z, Y, X)`` float32 probabilities in [0, 1]."""
        if self.model is None:
            from .io.writers import decode_probabilities

            label = f"probabilities {self.item.name}"
            probs = decode_probabilities(_to_czyx(_read(self.data), self.axes, label))
            if not np.isfinite(probs).all():
                raise InvalidImageError(f"{label} contain NaN or Inf values")
            if probs.min() < -1e-3 or probs.max() > 1 + 1e-3:
                raise InvalidImageError(
                    f"{label} are not probabilities: values {float(probs.min()):.4g} to "
                    f"{float(probs.max()):.4g}, outside [0, 1]"
                )
            return np.clip(probs, 0, 1)
        from .engine import segment

        image = _layout(_read(self.data), self.axes, self.format, f"image {self.item.name}",
                        planes_in_c=self.geometry.in_channels == 1)
        if self.geometry.ndim == 3:
            return np.asarray(segment(image, self.model, **self.kwargs))
        planes = [np.asarray(segment(image[:, z], self.model, **self.kwargs))
                  for z in range(image.shape[1])]
        return np.stack(planes, axis=1)


# -- evaluation -----------------------------------------------------------------------------


def _check_int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise InvalidArgumentError(f"{name} {value!r} must be an integer >= {low}")
    return int(value)


class _Tally:
    """Figures accumulated over slices (of one image, or of all)."""

    def __init__(self, num_classes: int, thresholds: np.ndarray) -> None:
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.mismatches = np.zeros(len(thresholds), dtype=np.int64)
        self.rand_curves: list[np.ndarray] = []
        self.rand_argmax: list[float] = []
        self.pixels = 0
        self.thresholds = thresholds

    def add(self, other: _Tally) -> None:
        self.confusion += other.confusion
        self.mismatches += other.mismatches
        self.rand_curves += other.rand_curves
        self.rand_argmax += other.rand_argmax
        self.pixels += other.pixels

    def summary(self) -> dict[str, Any]:
        rand = _mean_ignoring_nan(np.asarray(self.rand_argmax, dtype=np.float64))
        return {
            "slices": len(self.rand_argmax),
            "pixels": self.pixels,
            "pixel_error": float(1 - np.trace(self.confusion) / self.pixels),
            "rand_error": float(rand),
            "classes": _class_scores(self.confusion),
            "isbi": summarise_curves(
                self.thresholds, self.mismatches, self.pixels, np.array(self.rand_curves)
            ),
        }


def _score(
    probs: np.ndarray,
    classes: np.ndarray,
    foreground_class: int,
    thresholds: np.ndarray,
    distance: float,
) -> _Tally:
    policy = LabelPolicy(probs.shape[0], None, foreground_class)
    num_classes = max(probs.shape[0], 2)
    tally = _Tally(num_classes, thresholds)
    predicted = policy(probs)
    tally.confusion += _confusion(predicted, classes, num_classes)
    tally.pixels += classes.size
    foreground = policy.foreground_probability(probs)
    true_interior = classes == foreground_class
    predicted_interior = predicted == foreground_class
    for z in range(classes.shape[0]):
        tally.rand_argmax.append(adapted_rand_error(
            cells(true_interior[z]), cells(predicted_interior[z], distance)
        ))
        mismatches, rand = slice_curves(foreground[z], true_interior[z], thresholds, distance)
        tally.mismatches += mismatches
        tally.rand_curves.append(rand)
    return tally


def evaluate(
    images: Any,
    masks: Any,
    model: Any = None,
    probabilities: Any = None,
    *,
    tile: int | Sequence[int] | None = None,
    device: str = "auto",
    foreground_class: int = 1,
    thresholds: Sequence[float] | np.ndarray = DEFAULT_THRESHOLDS,
    expand_distance: int = 32,
    tta: bool | str = False,
    labels: Any = None,
    num_classes: int | None = None,
    volume: bool | None = None,
    spacing: Sequence[float] | None = None,
    regions: dict[str, Sequence[int]] | None = None,
) -> dict[str, Any]:
    """Score segmentations against ground-truth masks.

    Give either a ``model`` and ``images`` to segment, or precomputed ``probabilities``
    (``images`` is then unused and may be None). Inputs are paired in order with
    ``masks``; a folder or glob is taken in natural name order (``img2`` before
    ``img10``). Each input is read whole into memory.

    Parameters
    ----------
    images : path, array or list of them, optional
        Images to segment: a file (TIFF, PNG, JPEG, .npy...), a folder of such files,
        a glob, an array or :class:`~tilerseg.ImageSource`, or a list of these. A
        multi-page TIFF or 3-D array for a one-channel 2D model is a stack of planes,
        segmented and scored plane by plane.
    masks : path, array or list of them
        Ground truth in the same forms: class maps (integers ``0..num_classes-1``) or
        0/255 binary masks (255 becomes class 1, the cell interior of the ISBI
        convention); ``(Z, Y, X)`` for a stack.
    model : torch.nn.Module, optional
        The model (see :func:`tilerseg.load_model`).
    probabilities : path, array or list of them, optional
        OME-Zarr outputs written by tilerseg (:func:`tilerseg.segment_to_zarr`), or
        arrays ``(C, Y, X)``, ``(C, Z, Y, X)`` or ``(Y, X)`` (one foreground class).
    tile, device
        Passed to :func:`tilerseg.segment`.
    foreground_class : int
        The class whose probability the ISBI figures threshold and whose connected
        components are the cells (1 = cell interior for the project's EM models). For a
        one-channel (sigmoid) model, class 1 is ``p`` and class 0 is ``1 - p``.
    thresholds : sequence of float
        Thresholds of the ISBI figures (see :func:`tilerseg.metrics.isbi_scores`).
    expand_distance : int
        How far predicted cells grow over the predicted membrane before the Rand error.
    tta : bool or {"dihedral", "flips"}
        Test-time augmentation when segmenting (see :func:`tilerseg.segment`).
    labels : path, array or list of them, optional
        Predicted class maps (instead of a model or probabilities), in the forms of
        ``masks`` (TIFF stacks, .npy, Zarr, NIfTI where readable...); scored as volumes.
    num_classes : int, optional
        Number of classes (>= 2). By default the probabilities' channel count (at least
        2), or for ``labels`` the largest class number in them and the masks, plus one.
        Mask or label values beyond it are an error.
    volume : bool, optional
        Score as volumes (Dice, IoU and HD95 per foreground class, in 3D). By default
        True for a 3D model, with ``labels``, ``spacing`` or ``regions``, or for NIfTI
        masks; False otherwise (the 2D figures above, plane by plane).
    spacing : sequence of float, optional
        Voxel size ``(Z, Y, X)`` in mm (``(Y, X)`` for single planes) for every image.
        By default each mask's recorded pixel size is used; HD95 is then in voxels
        where no mask records one.
    regions : mapping of str to sequence of int, optional
        Named unions of foreground classes also scored as volumes, e.g. BraTS's
        ``{"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}``.

    Returns
    -------
    dict
        ``"per_image"``: a list with one dict per input; ``"overall"``: the same figures
        over all inputs; also ``"num_classes"``, ``"foreground_class"``,
        ``"thresholds"``, ``"expand_distance"`` and ``"source"`` (``"model"`` or
        ``"probabilities"``). Each figure dict holds ``"slices"``, ``"pixels"``,
        ``"pixel_error"`` (class map vs mask), ``"rand_error"`` (adapted Rand error of
        the class map's cells, mean over slices), ``"classes"`` (``{class: {"iou",
        "dice"}}``) and ``"isbi"`` (best pixel and Rand error over thresholds, see
        :func:`tilerseg.metrics.isbi_scores`); a per-image dict also has ``"name"``,
        ``"mask"`` and ``"shape"`` ((Z, Y, X)). Pixel error, IoU and Dice pool all
        pixels; Rand errors average slices.

        Volume scoring returns instead ``"mode": "volume"``, ``"num_classes"``,
        ``"source"`` (also ``"labels"``), ``"unit"`` of HD95 and spacing (``"mm"``;
        ``"um"`` when a voxel side is under 0.1 mm; ``"voxel"`` when no voxel size is
        known), ``"regions"`` (``{name: [classes]}``), ``"per_image"`` (``"name"``,
        ``"mask"``, ``"shape"``, ``"spacing"`` (Z, Y, X) and ``"classes"`` /
        ``"regions"``: ``{class or name: {"iou", "dice", "hd95"}}``, see
        :func:`tilerseg.metrics.volume_scores`: HD95 0 when absent from both, ``inf``
        when in only one of prediction and truth) and ``"overall"``: ``"images"`` and
        the means over images of each figure, HD95 over the images where it is finite
        (their count in ``"hd95_images"``; NaN if none).

    Raises
    ------
    InvalidArgumentError
        Neither or several of a model, probabilities and labels, no images for a model,
        different numbers of inputs and masks, shapes that differ, bad thresholds,
        distance, foreground class, class count, spacing or regions, or masks of which
        only some record their voxel size (without ``spacing``).
    ImageNotFoundError
        A file, folder or glob does not exist or holds no image.
    InvalidImageError
        An unreadable file, or mask values that are neither class numbers nor 0/255.
    OutputError
        A probabilities path that is not a tilerseg OME-Zarr output.

    Examples
    --------
    >>> import numpy as np
    >>> mask = np.zeros((16, 16), np.uint8)
    >>> mask[:, :7] = mask[:, 9:] = 255
    >>> probs = np.stack([1 - mask / 255, mask / 255])
    >>> result = evaluate(None, mask, probabilities=probs, thresholds=[0.5])
    >>> result["overall"]["pixel_error"], result["overall"]["isbi"]["rand_error"]
    (0.0, 0.0)

    A label volume one slice off, 3 mm slices:

    >>> true = np.zeros((6, 8, 8), np.uint8)
    >>> true[2:4, 2:6, 2:6] = 1
    >>> volumes = evaluate(None, true, labels=np.roll(true, 1, axis=0), spacing=(3, 1, 1))
    >>> volumes["unit"], volumes["overall"]["classes"][1]["dice"]
    ('mm', 0.5)
    >>> volumes["per_image"][0]["classes"][1]["hd95"]
    3.0
    """
    if labels is not None and (model is not None or probabilities is not None):
        raise InvalidArgumentError("give one of a model, probabilities or labels, not several")
    if model is None and probabilities is None and labels is None:
        raise InvalidArgumentError(
            "give a model (with images to segment), probabilities or labels"
        )
    if model is not None and probabilities is not None:
        raise InvalidArgumentError("give either a model or probabilities, not both")
    if model is not None and images is None:
        raise InvalidArgumentError("a model needs images to segment")
    ts = check_thresholds(thresholds)
    distance = check_distance(expand_distance)
    foreground_class = _check_int(foreground_class, "foreground class", 0)
    if num_classes is not None:
        num_classes = _check_int(num_classes, "num_classes", 2)
    if volume is not None and not isinstance(volume, bool):
        raise InvalidArgumentError(f"volume {volume!r} must be True, False or None")
    if tta and model is None:
        raise InvalidArgumentError("--tta / tta= applies when a model segments the images, "
                                   "not to given probabilities or labels")

    mask_items = _items(masks, "mask")
    if labels is not None:
        given, what = _items(labels, "labels file"), "label maps"
    elif model is None:
        given, what = _items(probabilities, "probabilities file"), "probability inputs"
    else:
        given, what = _items(images, "image"), "images"
    if len(given) != len(mask_items):
        raise InvalidArgumentError(
            f"{len(given)} {what} but {len(mask_items)} masks; they are paired in order"
        )
    kwargs = {"tile": tile, "device": device, "tta": tta}
    geometry = None
    if model is not None:
        from .models import model_geometry

        geometry = model_geometry(model)
    sources: list[Any]
    if labels is not None:
        sources = [_Mask.open(item, "labels") for item in given]
    else:
        sources = [_Probabilities(item, model, kwargs, geometry) for item in given]
    mask_list = [_Mask.open(item) for item in mask_items]
    if labels is not None:
        if num_classes is None:
            num_classes = max(2, *(1 + _highest(m) for m in sources + mask_list))
    else:
        num_outputs = {s.num_outputs for s in sources}
        if len(num_outputs) > 1:
            raise InvalidArgumentError(
                f"probability inputs differ in class count: {sorted(num_outputs)}"
            )
        outputs = max(num_outputs.pop(), 2)
        if num_classes is not None and num_classes != outputs:
            raise InvalidArgumentError(
                f"num_classes {num_classes} differs from the {outputs} classes of the "
                "probabilities"
            )
        num_classes = outputs
    if foreground_class >= num_classes:
        raise InvalidArgumentError(
            f"foreground class {foreground_class} is not one of the {num_classes} classes"
        )
    for source, mask in zip(sources, mask_list):
        if source.shape != mask.shape:
            raise InvalidArgumentError(
                f"{source.item.name} has (Z, Y, X) shape {source.shape} but mask "
                f"{mask.item.name} has {mask.shape}"
            )
    if volume is None:
        if geometry is not None:
            volume = geometry.ndim == 3
        else:
            volume = (labels is not None or spacing is not None or regions is not None
                      or any(m.format.startswith("nifti") for m in mask_list))
    if volume:
        return _evaluate_volumes(sources, mask_list, num_classes, spacing, regions,
                                 "labels" if labels is not None else
                                 "probabilities" if model is None else "model")
    for name, value in (("labels", labels), ("spacing", spacing), ("regions", regions)):
        if value is not None:
            raise InvalidArgumentError(
                f"{name} are for volume scoring (Dice and HD95), not with volume=False"
            )

    overall = _Tally(num_classes, ts)
    per_image = []
    for source, mask in zip(sources, mask_list):
        classes = mask.classes(num_classes)
        probs = source.load()
        tally = _score(probs, classes, foreground_class, ts, distance)
        overall.add(tally)
        per_image.append({"name": source.item.name, "mask": mask.item.name,
                          "shape": list(mask.shape), **tally.summary()})
    return {
        "per_image": per_image,
        "overall": {"images": len(per_image), **overall.summary()},
        "num_classes": num_classes,
        "foreground_class": foreground_class,
        "thresholds": [float(t) for t in ts],
        "expand_distance": distance,
        "source": "probabilities" if model is None else "model",
    }


# -- volumes (BraTS-style) ------------------------------------------------------------------

_MM_FROM = 0.1
"""Smallest voxel side (mm) for which HD95 is reported in mm; finer spacings give µm."""


def _highest(mask: _Mask) -> int:
    """The largest class number of a class map (1 for a 0/255 binary mask)."""
    values = np.unique(_read(mask.data))
    if values.size and is_binary_255(values):
        return 1
    return int(values.max()) if values.size else 0


def _voxel_sizes(
    masks: list[_Mask], spacing: Sequence[float] | None
) -> tuple[list[np.ndarray], str]:
    """Each mask's (Z, Y, X) voxel size in the reported unit, and that unit.

    ``spacing`` (mm) applies to every mask; otherwise each mask's recorded pixel size
    (µm) is used. The unit is ``"mm"`` unless a voxel side is under 0.1 mm (then
    ``"um"``), or ``"voxel"`` where no mask records its voxel size.
    """
    flat = all(m.shape[0] == 1 for m in masks)
    if spacing is not None:
        values = np.atleast_1d(np.asarray(spacing, dtype=object))
        if flat and values.size == 2:  # (Y, X) of single planes
            values = np.concatenate([[1.0], values])
        sizes = [check_spacing(values[0] if values.size == 1 else list(values), 3)] * len(masks)
    else:
        known = [m for m in masks if {"Y", "X"} <= set(m.pixel_size)
                 and ("Z" in m.pixel_size or m.shape[0] == 1)]
        if not known:
            return [np.ones(3)] * len(masks), "voxel"
        if len(known) < len(masks):
            missing = next(m for m in masks if m not in known)
            raise InvalidArgumentError(
                f"mask {missing.item.name} records no voxel size while mask "
                f"{known[0].item.name} does; give the spacing (Z,Y,X in mm)"
            )
        sizes = [np.array([m.pixel_size.get(a, 1000.0) for a in "ZYX"]) / 1000.0
                 for m in masks]
    finest = min(float(s[1:].min() if flat else s.min()) for s in sizes)
    if finest >= _MM_FROM:
        return sizes, "mm"
    return [s * 1000.0 for s in sizes], "um"


def _predicted_classes(source: Any, num_classes: int) -> np.ndarray:
    if isinstance(source, _Mask):
        return source.classes(num_classes)
    probs = source.load()
    return LabelPolicy(probs.shape[0])(probs)


def _mean_scores(entries: list[dict[str, float]]) -> dict[str, Any]:
    """Means over images: Dice and IoU of all, HD95 of those where it is finite."""
    hd = np.array([e["hd95"] for e in entries], dtype=np.float64)
    finite = hd[np.isfinite(hd)]
    return {
        "iou": float(np.mean([e["iou"] for e in entries])),
        "dice": float(np.mean([e["dice"] for e in entries])),
        "hd95": float(finite.mean()) if finite.size else float("nan"),
        "hd95_images": int(finite.size),
    }


def _evaluate_volumes(
    sources: list[Any],
    masks: list[_Mask],
    num_classes: int,
    spacing: Sequence[float] | None,
    regions: dict[str, Sequence[int]] | None,
    source_kind: str,
) -> dict[str, Any]:
    region_map = check_regions(regions, num_classes)
    sizes, unit = _voxel_sizes(masks, spacing)
    per_image = []
    for source, mask, size in zip(sources, masks, sizes):
        true = mask.classes(num_classes)
        pred = _predicted_classes(source, num_classes)
        scores = volume_scores(pred, true, num_classes, size, region_map)
        per_image.append({"name": source.item.name, "mask": mask.item.name,
                          "shape": list(mask.shape), "spacing": [float(v) for v in size],
                          **scores})
    overall: dict[str, Any] = {"images": len(per_image)}
    for key in ("classes", "regions"):
        overall[key] = {name: _mean_scores([e[key][name] for e in per_image])
                        for name in per_image[0][key]}
    return {
        "per_image": per_image,
        "overall": overall,
        "mode": "volume",
        "num_classes": num_classes,
        "unit": unit,
        "regions": {name: list(c) for name, c in region_map.items()},
        "source": source_kind,
    }


# -- output ---------------------------------------------------------------------------------


def _number(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _at(value: Any, threshold: Any) -> str:
    return f"{_number(value)} @{'n/a' if threshold is None else f'{threshold:.2f}'}"


def format_table(result: dict[str, Any]) -> str:
    """A readable table of an :func:`evaluate` result.

    One row per image and one for all: slices, pixel error and adapted Rand error of
    the class map, the best ISBI pixel and Rand errors with their thresholds, and IoU
    and Dice of the foreground class; then IoU and Dice of every class over all images.

    Parameters
    ----------
    result : dict
        What :func:`evaluate` returned.

    Returns
    -------
    str
        The table (no trailing newline).

    Examples
    --------
    >>> import numpy as np
    >>> mask = np.zeros((16, 16), np.uint8)
    >>> mask[:, :7] = mask[:, 9:] = 255
    >>> probs = mask[None] / 255
    >>> print(format_table(evaluate(None, [mask, mask], probabilities=[probs, 1 - probs])))
    ... # doctest: +NORMALIZE_WHITESPACE
    image    slices  pixel err  Rand err  best pixel err  best Rand err  IoU fg  Dice fg
    -------  ------  ---------  --------  --------------  -------------  ------  -------
    #1            1     0.0000    0.0000    0.0000 @0.50   0.0000 @0.50  1.0000   1.0000
    #2            1     1.0000    0.3353    1.0000 @0.50   0.3353 @0.50  0.0000   0.0000
    -------  ------  ---------  --------  --------------  -------------  ------  -------
    overall       2     0.5000    0.1677    0.5000 @0.50   0.1677 @0.50  0.4667   0.6364
    (errors of the argmax class map; best: over thresholds of class 1's probability)
    <BLANKLINE>
    overall  IoU     Dice
    class 0  0.1111  0.2000
    class 1  0.4667  0.6364
    """
    if result.get("mode") == "volume":
        return _volume_table(result)
    fg = result["foreground_class"]
    header = ["image", "slices", "pixel err", "Rand err", "best pixel err", "best Rand err",
              "IoU fg", "Dice fg"]
    rows = []
    entries = [(r["name"], r) for r in result["per_image"]] + [("overall", result["overall"])]
    for name, r in entries:
        isbi, cls = r["isbi"], r["classes"][fg]
        rows.append([
            name, str(r["slices"]), _number(r["pixel_error"]), _number(r["rand_error"]),
            _at(isbi["pixel_error"], isbi["pixel_threshold"]),
            _at(isbi["rand_error"], isbi["rand_threshold"]),
            _number(cls["iou"]), _number(cls["dice"]),
        ])
    out = _columns(header, rows)
    out.append(f"(errors of the argmax class map; best: over thresholds of class {fg}'s "
               "probability)")
    out.append("")
    out.append("overall  IoU     Dice")
    for c, s in result["overall"]["classes"].items():
        out.append(f"class {c:<2} {_number(s['iou'])}  {_number(s['dice'])}")
    return "\n".join(out)


def _columns(header: list[str], rows: list[list[str]]) -> list[str]:
    """Aligned lines: the header, a rule, the rows, a rule and the last row (overall)."""
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]

    def line(texts: list[str]) -> str:
        return "  ".join(
            t.ljust(w) if i == 0 else t.rjust(w) for i, (t, w) in enumerate(zip(texts, widths))
        ).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(row) for row in rows[:-1]]
    return out + [line(["-" * w for w in widths]), line(rows[-1])]


def _distance(value: float) -> str:
    if math.isinf(value):
        return "inf"
    return _number(value, 2)


def _volume_table(result: dict[str, Any]) -> str:
    unit = result["unit"]
    names = [(key, name) for key in ("classes", "regions") for name in result["overall"][key]]
    header = ["image"]
    header += [f"Dice {name}" for _, name in names]
    header += [f"HD95 {name} [{unit}]" for _, name in names]
    rows = []
    entries = [(r["name"], r) for r in result["per_image"]] + [("mean", result["overall"])]
    for label, r in entries:
        rows.append([label] + [_number(r[k][n]["dice"]) for k, n in names]
                    + [_distance(r[k][n]["hd95"]) for k, n in names])
    out = _columns(header, rows)
    out.append("(Dice and 95th-percentile Hausdorff distance of each foreground class"
               + (" and region" if result["regions"] else "") + " in 3D; mean over images)")
    out.append("(HD95 inf: in only one of prediction and truth; its mean leaves such images out)")
    for name, classes in result["regions"].items():
        out.append(f"region {name}: classes {', '.join(str(c) for c in classes)}")
    return "\n".join(out)


def _jsonable(value: Any) -> Any:
    """NaN becomes None, numpy scalars Python numbers, dict keys strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(result: dict[str, Any]) -> str:
    """An :func:`evaluate` result as JSON text (NaN and infinity written as null).

    Parameters
    ----------
    result : dict
        What :func:`evaluate` returned.

    Returns
    -------
    str
    """
    return json.dumps(_jsonable(result), indent=2)


# -- command line ---------------------------------------------------------------------------

_EPILOG = """\
examples:
  tilerseg eval train-volume.tif train-labels.tif            bundled ISBI model, 30-slice stacks
  tilerseg eval images/ masks/ --model em.pt --json scores.json
  tilerseg eval masks/ --probabilities outputs/ --json -     OME-Zarr outputs, JSON on stdout
  tilerseg eval truth/ --labels predicted/ --region WT=1,2,3 --region TC=1,3 --region ET=3
                                                             label volumes, BraTS-style

Masks: 0/255 binary (255 = cell interior) or class maps 0..C-1. Files of a folder are
paired in natural name order. Rand error: adapted Rand error (ISBI 2012) of the cells,
connected components of the foreground grown over the predicted membrane, true
membrane ignored; 'best' figures are the best over thresholds of the foreground
probability (0.05 to 0.95 by default).

Volumes (a 3D model, --labels, NIfTI masks, --spacing, --region or --3d): Dice and
HD95 (95th-percentile Hausdorff distance, MONAI's definition) of each foreground class
and region, in 3D with the masks' voxel size (or --spacing), per image and mean.
HD95 is in mm, in um when a voxel side is under 0.1 mm, in voxels when the masks
record no voxel size and --spacing is not given.
"""


def _thresholds(text: str | None) -> np.ndarray:
    if text is None:
        return DEFAULT_THRESHOLDS
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise InvalidArgumentError(
            f"--thresholds {text!r} must be comma-separated numbers"
        ) from None
    return check_thresholds(values)


def _spacing(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(t) for t in text.split(",")]
    except ValueError:
        raise InvalidArgumentError(
            f"--spacing {text!r} must be comma-separated numbers: Z,Y,X in mm"
        ) from None
    if len(values) not in (2, 3):
        raise InvalidArgumentError(
            f"--spacing {text!r} has {len(values)} values; expected 3 (Z,Y,X in mm), or 2 "
            "(Y,X) for single planes"
        )
    return values


def _regions(texts: list[str] | None) -> dict[str, list[int]] | None:
    if not texts:
        return None
    regions: dict[str, list[int]] = {}
    for text in texts:
        name, sep, classes = text.partition("=")
        try:
            values = [int(c) for c in classes.split(",")]
        except ValueError:
            values = []
        if not sep or not name.strip() or not values:
            raise InvalidArgumentError(
                f"--region {text!r} must be NAME=CLASS[,CLASS...], e.g. WT=1,2,3"
            )
        if name.strip() in regions:
            raise InvalidArgumentError(f"--region {name.strip()} is given twice")
        regions[name.strip()] = values
    return regions


def _cmd_eval(args: argparse.Namespace) -> int:
    paths = list(args.paths)
    given = [o for o, v in (("--probabilities", args.probabilities), ("--labels", args.labels))
             if v is not None]
    if len(given) > 1:
        raise InvalidArgumentError("give either --probabilities or --labels, not both")
    if given:
        if len(paths) != 1:
            raise InvalidArgumentError(
                f"with {given[0]} give MASKS only, not {len(paths)} paths"
            )
        if args.model is not None:
            raise InvalidArgumentError(f"give either --model or {given[0]}, not both")
        images, masks, model = None, paths[0], None
    else:
        if len(paths) != 2:
            raise InvalidArgumentError(
                f"give IMAGES and MASKS (or MASKS with --probabilities), not {len(paths)} paths"
            )
        images, masks = paths
        _items(images, "image"), _items(masks, "mask")  # input errors before loading a model
        from .models.checkpoint import model_from_spec

        model = model_from_spec(args.model)
    if args.expand_distance < 0:
        raise InvalidArgumentError(f"--expand-distance {args.expand_distance} must be >= 0")
    result = evaluate(
        images, masks, model, args.probabilities, tile=args.tile, device=args.device,
        tta=args.tta,
        foreground_class=args.foreground_class, thresholds=_thresholds(args.thresholds),
        expand_distance=args.expand_distance, labels=args.labels, num_classes=args.classes,
        volume=True if args.volume else None, spacing=_spacing(args.spacing),
        regions=_regions(args.region),
    )
    if args.json == "-":
        print(to_json(result))
        return 0
    if args.json is not None:
        try:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(to_json(result) + "\n")
        except OSError as exc:
            raise OutputError(f"cannot write {args.json}: {exc.strerror or exc}") from None
    print(format_table(result))
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``eval`` command on ``tilerseg``'s sub-command parsers.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        What ``ArgumentParser.add_subparsers`` returned.

    Returns
    -------
    argparse.ArgumentParser
        The ``eval`` parser; its ``func`` default runs the command and returns 0.

    Examples
    --------
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="tilerseg")
    >>> _ = add_parser(parser.add_subparsers(dest="command"))
    >>> args = parser.parse_args(["eval", "masks/", "--probabilities", "out.zarr"])
    >>> args.paths, args.probabilities, args.json
    (['masks/'], 'out.zarr', None)
    """
    p = subparsers.add_parser(
        "eval", help="score segmentations against ground-truth masks",
        usage="tilerseg eval [-h] IMAGES MASKS [--model NAME|PATH] [options]\n"
              "       tilerseg eval [-h] MASKS --probabilities OUT.zarr [options]\n"
              "       tilerseg eval [-h] MASKS --labels PREDICTED [options]",
        description="Segment IMAGES with a model (or read precomputed probabilities) and "
        "report pixel error, adapted Rand error (ISBI 2012), IoU and Dice against MASKS. "
        "IMAGES and MASKS are files, folders, globs or stacks.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="IMAGES MASKS",
                   help="images and masks; masks alone with --probabilities")
    p.add_argument("--model", default=None, metavar="NAME|PATH",
                   help="model file (.pt), bundled model or architecture name (default: the "
                   "bundled ISBI 2012 EM model)")
    p.add_argument("--probabilities", default=None, metavar="OUT.zarr",
                   help="score tilerseg OME-Zarr outputs (a store, a folder or glob of "
                   "stores) instead of running a model")
    p.add_argument("--labels", default=None, metavar="PREDICTED",
                   help="score predicted class maps (files, a folder or glob: TIFF stacks, "
                   ".npy, Zarr, NIfTI...) as volumes instead of running a model")
    p.add_argument("--classes", type=int, default=None, metavar="N",
                   help="number of classes with --labels (default: the largest label + 1)")
    p.add_argument("--3d", dest="volume", action="store_true",
                   help="score as volumes: Dice and HD95 per class in 3D (automatic with a 3D "
                   "model, --labels, NIfTI masks, --spacing or --region)")
    p.add_argument("--spacing", default=None, metavar="Z,Y,X",
                   help="voxel size in mm for HD95 (default: the masks' recorded voxel size)")
    p.add_argument("--region", action="append", default=None, metavar="NAME=C[,C...]",
                   help="also score a union of classes, e.g. WT=1,2,3 (repeatable)")
    p.add_argument("--tile", type=int, default=None, metavar="N",
                   help="output tile side in px (default: 512 on CPU, 1024 on GPU)")
    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--foreground-class", type=int, default=1, metavar="K",
                   help="cell-interior class (default 1)")
    p.add_argument("--thresholds", default=None, metavar="T[,T...]",
                   help="foreground thresholds to try (default 0.05,0.10,...,0.95)")
    from .cli import add_tta_flag

    add_tta_flag(p)
    p.add_argument("--expand-distance", type=float, default=32, metavar="PX",
                   help="growth of predicted cells over the predicted membrane (default 32)")
    p.add_argument("--json", default=None, metavar="FILE|-",
                   help="also write the full results as JSON to FILE; '-' prints JSON "
                   "instead of the table")
    p.set_defaults(func=_cmd_eval)
    return p

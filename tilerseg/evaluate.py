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
    check_thresholds,
    slice_curves,
    summarise_curves,
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


def _open(item: _Item, label: str) -> tuple[Any, str, str]:
    """Data, axes and format of an image or mask input (lazily for paths)."""
    from .io import open_image
    from .io.raw import guess_axes
    from .io.source import ImageSource

    if item.is_path:
        source = open_image(item.source)
        return source.data, source.axes, source.format
    if isinstance(item.source, ImageSource):
        return item.source.data, item.source.axes, item.source.format
    arr = item.source
    if len(arr.shape) not in (2, 3, 4):
        raise InvalidImageError(f"{label} has shape {tuple(arr.shape)}; expected 2 to 4 dimensions")
    return arr, guess_axes(tuple(arr.shape), label), "array"


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
    item: _Item
    data: Any
    axes: str
    format: str
    shape: tuple[int, int, int]

    @classmethod
    def open(cls, item: _Item) -> _Mask:
        label = f"mask {item.name}"
        data, axes, fmt = _open(item, label)
        czyx = _layout(_shape_only(data), axes, fmt, label, planes_in_c=True)
        if czyx.shape[0] != 1 and "S" not in axes:
            raise InvalidImageError(f"{label} has {czyx.shape[0]} channels; a mask has one")
        return cls(item, data, axes, fmt, tuple(czyx.shape[1:]))

    def classes(self, num_classes: int) -> np.ndarray:
        """The mask as a ``(Z, Y, X)`` class map (0/255 binary: 255 -> class 1)."""
        label = f"mask {self.item.name}"
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
    if np.isin(values, (0, 255)).all() and num_classes <= 255:
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
        data, axes, fmt = _open(self.item, label)
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
    tta: bool = False,
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
    tta : bool
        Test-time augmentation when segmenting (see :func:`tilerseg.segment`).

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

    Raises
    ------
    InvalidArgumentError
        Neither or both of a model and probabilities, no images for a model, different
        numbers of inputs and masks, shapes that differ, bad thresholds, distance or
        foreground class.
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
    """
    if model is None and probabilities is None:
        raise InvalidArgumentError("give a model (with images to segment) or probabilities")
    if model is not None and probabilities is not None:
        raise InvalidArgumentError("give either a model or probabilities, not both")
    if model is not None and images is None:
        raise InvalidArgumentError("a model needs images to segment")
    ts = check_thresholds(thresholds)
    distance = check_distance(expand_distance)
    foreground_class = _check_int(foreground_class, "foreground class", 0)

    mask_items = _items(masks, "mask")
    given = _items(probabilities if model is None else images,
                   "probabilities file" if model is None else "image")
    if len(given) != len(mask_items):
        what = "probability inputs" if model is None else "images"
        raise InvalidArgumentError(
            f"{len(given)} {what} but {len(mask_items)} masks; they are paired in order"
        )
    kwargs = {"tile": tile, "device": device, "tta": tta}
    geometry = None
    if model is not None:
        from .models import model_geometry

        geometry = model_geometry(model)
    sources = [_Probabilities(item, model, kwargs, geometry) for item in given]
    mask_list = [_Mask.open(item) for item in mask_items]
    num_outputs = {s.num_outputs for s in sources}
    if len(num_outputs) > 1:
        raise InvalidArgumentError(
            f"probability inputs differ in class count: {sorted(num_outputs)}"
        )
    num_classes = max(num_outputs.pop(), 2)
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
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]

    def line(texts: list[str]) -> str:
        return "  ".join(
            t.ljust(w) if i == 0 else t.rjust(w) for i, (t, w) in enumerate(zip(texts, widths))
        ).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(row) for row in rows[:-1]]
    out += [line(["-" * w for w in widths]), line(rows[-1])]
    out.append(f"(errors of the argmax class map; best: over thresholds of class {fg}'s "
               "probability)")
    out.append("")
    out.append("overall  IoU     Dice")
    for c, s in result["overall"]["classes"].items():
        out.append(f"class {c:<2} {_number(s['iou'])}  {_number(s['dice'])}")
    return "\n".join(out)


def _jsonable(value: Any) -> Any:
    """NaN becomes None, numpy scalars Python numbers, dict keys strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def to_json(result: dict[str, Any]) -> str:
    """An :func:`evaluate` result as JSON text (NaN written as null).

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

Masks: 0/255 binary (255 = cell interior) or class maps 0..C-1. Files of a folder are
paired in natural name order. Rand error: adapted Rand error (ISBI 2012) of the cells,
connected components of the foreground grown over the predicted membrane, true
membrane ignored; 'best' figures are the best over thresholds of the foreground
probability (0.05 to 0.95 by default).
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


def _cmd_eval(args: argparse.Namespace) -> int:
    paths = list(args.paths)
    if args.probabilities is not None:
        if len(paths) != 1:
            raise InvalidArgumentError(
                f"with --probabilities give MASKS only, not {len(paths)} paths"
            )
        if args.model is not None:
            raise InvalidArgumentError("give either --model or --probabilities, not both")
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
        expand_distance=args.expand_distance,
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
              "       tilerseg eval [-h] MASKS --probabilities OUT.zarr [options]",
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
    p.add_argument("--tile", type=int, default=None, metavar="N",
                   help="output tile side in px (default: 512 on CPU, 1024 on GPU)")
    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--foreground-class", type=int, default=1, metavar="K",
                   help="cell-interior class (default 1)")
    p.add_argument("--thresholds", default=None, metavar="T[,T...]",
                   help="foreground thresholds to try (default 0.05,0.10,...,0.95)")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average the 8 flips/rotations (8x the work)")
    p.add_argument("--expand-distance", type=float, default=32, metavar="PX",
                   help="growth of predicted cells over the predicted membrane (default 32)")
    p.add_argument("--json", default=None, metavar="FILE|-",
                   help="also write the full results as JSON to FILE; '-' prints JSON "
                   "instead of the table")
    p.set_defaults(func=_cmd_eval)
    return p

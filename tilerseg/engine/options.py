"""The options of a run, coerced and validated once at the public entry.

:class:`RunOptions` is a frozen dataclass: every public function that runs a model over
an image turns its keyword arguments into one with :func:`run_options` (in the manner of
dask's ``coerce_depth``) and passes only that inward. Options are plain values (strings,
numbers, tuples), so they travel to other processes and into the run's manifest as they
are. What needs the model or the image (the tile on the pooling grid, the device's
existence, the normalisation statistics) is resolved later, in
:func:`tilerseg.engine.prepare.prepare`.

Examples
--------
>>> o = run_options(tile=512, output="both")
>>> o.tile, o.output, o.dtype
(512, 'both', 'uint8')
>>> run_options(o, dtype="float16").dtype
'float16'
>>> run_options(tiles=512)
Traceback (most recent call last):
...
tilerseg.errors.InvalidArgumentError: unknown option 'tiles'; options are tile, batch_size, ...
"""

from __future__ import annotations

import dataclasses
import os
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError
from ..normalize import Normalization, NormalizeSpec
from .backends import BACKENDS
from .tta import tta_mode

__all__ = ["OUTPUTS", "DTYPES", "PRECISIONS", "RunOptions", "run_options", "OUTPUT_OPTIONS",
           "RESOLVED_OPTIONS", "PLAIN_OUTPUT_OPTIONS", "RUNTIME_OPTIONS"]

OUTPUTS = ("probabilities", "labels", "both", "instances")
INSTANCE_MODES = ("components", "split")
TABLE_FORMATS = ("csv", "parquet")
DTYPES = ("uint8", "float16", "float32")
PRECISIONS = ("fp32", "bf16", "fp16", "int8")

OUTPUT_OPTIONS = (
    "tile", "normalize", "output", "dtype", "threshold", "level", "channel", "precision",
    "calibration", "skip_background", "background_tolerance", "background_value", "pyramid",
    "instances", "split_radius", "split_context", "object_table", "tta",
)
"""Options that decide the output's values; the others (device, batch size, workers,
threads, compile, backend) only decide how fast it is computed. A run resumes only with the same
output options (see :mod:`tilerseg.engine.jobs`)."""

RESOLVED_OPTIONS = ("tile", "normalize", "threshold", "channel")
"""Output options whose value is resolved for the image and model (a default tile, the
percentiles, the model's threshold, all channels): compared and reused as resolved."""

PLAIN_OUTPUT_OPTIONS = tuple(o for o in OUTPUT_OPTIONS if o not in RESOLVED_OPTIONS)
"""Output options compared and reused as given."""


def _positive_int(name: str, value: Any, optional: bool = True) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidArgumentError(f"{name}={value!r} must be a positive integer")
    return int(value)


def _number(name: str, value: Any, optional: bool = True) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise InvalidArgumentError(f"{name}={value!r} must be a number")
    if not math.isfinite(float(value)):
        raise InvalidArgumentError(f"{name}={value!r} must be finite")
    return float(value)


def _choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise InvalidArgumentError(f"{name}={value!r} must be one of {', '.join(choices)}")
    return str(value)


@dataclass(frozen=True)
class RunOptions:
    """How to segment an image; see :func:`tilerseg.segment_to_zarr` for each option.

    Attributes
    ----------
    tile : int, tuple of int or None
        Output tile side(s); None for the device's default. Checked against the model's
        pooling step by :func:`tilerseg.geometry.normalize_tile`.
    batch_size : int or None
        Tiles per forward pass; None for the device's default.
    device : str or tuple of str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or several.
    normalize : bool, str, (float, float), Normalization or None
        Global intensity normalisation.
        ``("window", centre, width)``, ``("window", NAME)`` or ``("window", "dicom")``:
        a display window (see :func:`tilerseg.normalize.resolve_normalization`).
    output : {"probabilities", "labels", "both", "instances"}
        ``"instances"``: the probabilities and an instance label image.
    dtype : {"uint8", "float16", "float32"}
    threshold : float or None
        Foreground threshold of the labels (see :mod:`tilerseg.labels`).
    level : int
        Input pyramid level.
    channel : tuple of int or None
        Input channels fed to the model, in order; all by default.
    precision : {"fp32", "bf16", "fp16", "int8"}
        ``"int8"``: the model quantised with NNCF for OpenVINO on the CPU (see
        :mod:`tilerseg.engine.int8`).
    calibration : str or None
        With ``precision="int8"``: a folder of images to calibrate the quantisation on
        (default: the image being segmented).
    compile : bool
    backend : {"auto", "torch", "openvino"}
        The runtime of the forward pass (see :mod:`tilerseg.engine.backends`).
    skip_background : bool
    background_tolerance : float
    background_value : float or None
    pyramid : bool
    instances : {"components", "split"}
        Instance labels: connected components of the foreground, or components split
        by a seeded watershed (see :mod:`tilerseg.engine.instances`).
    split_radius : int
        Radius (px) of the disc that erodes the foreground into the split's markers.
    split_context : int or None
        Context (px) read around a chunk for the split; larger objects are kept whole.
        None: 128 px for 2D images, 32 for 3D.
    object_table : {"csv", "parquet"} or None
        Write a table of the objects beside the output.
    workers, threads : int or None
        CPU model workers and torch threads per worker.
    tta : {"dihedral", "flips"} or None
        Test-time augmentation of every window, exact (see :mod:`tilerseg.engine.tta`);
        ``True`` is coerced to ``"dihedral"``, ``False`` to None.
    """

    tile: int | tuple[int, ...] | None = None
    batch_size: int | None = None
    device: str | tuple[str, ...] = "auto"
    normalize: NormalizeSpec | Normalization = "auto"
    output: str = "probabilities"
    dtype: str = "uint8"
    threshold: float | None = None
    level: int = 0
    channel: tuple[int, ...] | None = None
    precision: str = "fp32"
    calibration: str | None = None
    compile: bool = False
    backend: str = "auto"
    skip_background: bool = False
    background_tolerance: float = 0.05
    background_value: float | None = None
    pyramid: bool = True
    instances: str = "components"
    split_radius: int = 3
    split_context: int | None = None
    object_table: str | None = None
    workers: int | None = None
    threads: int | None = None
    tta: str | None = None

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        tile = self.tile
        if isinstance(tile, Sequence) and not isinstance(tile, str):
            tile = tuple(tile)
        if tile is not None and not (
            (isinstance(tile, (int, np.integer)) and not isinstance(tile, bool))
            or (isinstance(tile, tuple) and tile
                and all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in tile))
        ):
            raise InvalidArgumentError(
                f"tile={self.tile!r} is not usable; expected a positive integer or one per axis")
        set_("tile", tile if not isinstance(tile, np.integer) else int(tile))
        set_("batch_size", _positive_int("batch_size", self.batch_size))
        device = self.device
        if isinstance(device, (list, tuple)):
            device = tuple(str(d) for d in device)
        elif not isinstance(device, str):
            device = str(device)  # a torch.device
        set_("device", device)
        if isinstance(self.normalize, list):
            set_("normalize", tuple(self.normalize))
        set_("output", _choice("output", self.output, OUTPUTS))
        set_("dtype", _choice("dtype", self.dtype, DTYPES))
        threshold = _number("threshold", self.threshold)
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise InvalidArgumentError(f"threshold={self.threshold!r} must be within [0, 1]")
        set_("threshold", threshold)
        if isinstance(self.level, bool) or not isinstance(self.level, (int, np.integer)) \
                or self.level < 0:
            raise InvalidArgumentError(f"level={self.level!r} must be an integer >= 0")
        set_("level", int(self.level))
        if self.channel is not None:
            try:
                channel = tuple(int(c) for c in self.channel)
            except (TypeError, ValueError):
                raise InvalidArgumentError(
                    f"channel={self.channel!r} must be a sequence of integers") from None
            set_("channel", channel)
        set_("precision", _choice("precision", self.precision, PRECISIONS))
        if self.calibration is not None:
            try:
                folder = os.fspath(self.calibration)
            except TypeError:
                raise InvalidArgumentError(
                    f"calibration={self.calibration!r} must be a folder's path") from None
            if self.precision != "int8":
                raise InvalidArgumentError(
                    f"calibration={folder!r} applies to precision='int8' (precision is "
                    f"{self.precision!r})")
            from ..io.remote import is_url

            if is_url(str(folder)):
                raise InvalidArgumentError(f"calibration={folder!r} must be a local folder")
            set_("calibration", os.path.abspath(folder))
        set_("backend", _choice("backend", self.backend, BACKENDS))
        for name in ("compile", "skip_background", "pyramid"):
            set_(name, bool(getattr(self, name)))
        tolerance = _number("background_tolerance", self.background_tolerance, optional=False)
        if tolerance is None or tolerance < 0:
            raise InvalidArgumentError(
                f"background tolerance {self.background_tolerance!r} must be >= 0")
        set_("background_tolerance", tolerance)
        set_("background_value", _number("background_value", self.background_value))
        set_("instances", _choice("instances", self.instances, INSTANCE_MODES))
        if isinstance(self.split_radius, bool) or not isinstance(
                self.split_radius, (int, np.integer)) or self.split_radius < 0:
            raise InvalidArgumentError(
                f"split_radius={self.split_radius!r} must be an integer >= 0")
        set_("split_radius", int(self.split_radius))
        set_("split_context", _positive_int("split_context", self.split_context))
        if self.object_table is not None:
            set_("object_table", _choice("object_table", self.object_table, TABLE_FORMATS))
        if self.output != "instances":
            for name in ("instances", "split_radius", "split_context", "object_table"):
                if getattr(self, name) != getattr(RunOptions, name):
                    raise InvalidArgumentError(
                        f"{name}={getattr(self, name)!r} needs output='instances' (output is "
                        f"{self.output!r})")
        set_("workers", _positive_int("workers", self.workers))
        set_("threads", _positive_int("threads", self.threads))
        set_("tta", tta_mode(self.tta))

    def replace(self, **changes: Any) -> RunOptions:
        """A copy with ``changes`` (validated)."""
        return run_options(self, **changes)

    def output_options(self) -> dict[str, Any]:
        """The options that decide the output's values, as plain JSON values."""
        out: dict[str, Any] = {}
        for name in OUTPUT_OPTIONS:
            value = getattr(self, name)
            if isinstance(value, Normalization):
                value = value.as_dict()
            out[name] = list(value) if isinstance(value, tuple) else value
        return out


_FIELDS = tuple(f.name for f in dataclasses.fields(RunOptions))

RUNTIME_OPTIONS = tuple(f for f in _FIELDS if f not in OUTPUT_OPTIONS)
"""Options that decide only how fast the output is computed (device, batch size...)."""


def run_options(options: RunOptions | None = None, **overrides: Any) -> RunOptions:
    """Coerce keyword options (over ``options``) into a validated :class:`RunOptions`.

    Parameters
    ----------
    options : RunOptions, optional
        Starting values; the defaults otherwise.
    **overrides
        Fields of :class:`RunOptions` to set.

    Returns
    -------
    RunOptions

    Raises
    ------
    InvalidArgumentError
        An unknown option, or a value that is not usable (named in the message).
    """
    unknown = [k for k in overrides if k not in _FIELDS]
    if unknown:
        raise InvalidArgumentError(
            f"unknown option {unknown[0]!r}; options are {', '.join(_FIELDS[:2])}, ... "
            f"({', '.join(_FIELDS)})")
    if options is None:
        return RunOptions(**overrides)
    if not isinstance(options, RunOptions):
        raise InvalidArgumentError(
            f"options must be a RunOptions, got {type(options).__name__}")
    return dataclasses.replace(options, **overrides) if overrides else options

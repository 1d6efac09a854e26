"""What a run computes and how it is cut: tasks, the manifest, and comparing runs.

The output's tile grid (one tile = one Zarr chunk of level 0, and one chunk of each eager
pyramid level) is cut into rectangular blocks of up to :data:`TILES_PER_TASK` tiles along
the last axis: a task (:class:`TaskGrid`). Tasks are numbered row-major. A run crosses
process and machine boundaries as a :class:`RunRef`, plain data (input path, level,
channels, the run's config hash, where the output is) of a few hundred bytes; the
processes that compute it claim its tasks one at a time in its work directory (see
:mod:`tilerseg.engine.workdir` and :mod:`tilerseg.engine.claims`).

The manifest (:func:`build_manifest`) records everything that decides a run's output, with
a hash of it; :func:`differences` names what a new request would change against it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError
from ..geometry import ModelGeometry, normalize_tile
from ..io import remote
from ..io.formats import SLICE_EXTENSIONS, is_zarr_dir, strip_image_suffix
from ..io.dicom import dicom_files
from ..normalize import Normalization, resolve_normalization
from .options import PLAIN_OUTPUT_OPTIONS, RunOptions

__all__ = [
    "TILES_PER_TASK", "FORMAT", "FORMAT_VERSION", "RunRef", "TaskGrid", "default_output_path",
    "build_manifest", "differences", "input_identity", "path_identity", "geometry_of",
    "read_final_manifest", "quick_complete",
]

log = logging.getLogger(__name__)

TILES_PER_TASK = 4
"""Tiles (output chunks) per task, along the last axis."""

FORMAT = "tilerseg-run"
FORMAT_VERSION = 1


def default_output_path(image: str | os.PathLike) -> Path:
    """``slide.tif`` -> ``slide.tilerseg.zarr`` beside the input (folders and globs too).

    Examples
    --------
    >>> default_output_path("/data/slide.ome.tif").as_posix()
    '/data/slide.tilerseg.zarr'
    >>> default_output_path("/data/stack/*.tif").as_posix()
    '/data/stack.tilerseg.zarr'
    >>> default_output_path("file:///data/slide.tif").as_posix()
    '/data/slide.tilerseg.zarr'
    """
    if remote.is_remote(image):
        raise InvalidArgumentError(
            f"a remote input ({image}) has no default output: give one (-o/--out, "
            "out=), a local path or a URL")
    path = Path(remote.local_path(image))
    if any(c in path.name for c in "*?["):  # a glob: name it after its folder
        path = path.parent
    return path.with_name(f"{strip_image_suffix(path.name)}.tilerseg.zarr")


# -- tasks ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskGrid:
    """The tile grid of an output cut into blocks of tiles: the tasks.

    Examples
    --------
    >>> g = TaskGrid((3, 10), (1, 4))
    >>> len(g), g.region(2), g.tiles(2)
    (9, ((0, 1), (8, 10)), [(0, 8), (0, 9)])
    >>> g.task_of((2, 5))
    7
    """

    grid: tuple[int, ...]
    block: tuple[int, ...]

    @classmethod
    def for_grid(cls, grid: Sequence[int], tiles_per_task: int = TILES_PER_TASK) -> TaskGrid:
        """Blocks of ``tiles_per_task`` tiles along the last axis."""
        grid = tuple(int(g) for g in grid)
        return cls(grid, (1,) * (len(grid) - 1) + (min(tiles_per_task, grid[-1]),))

    @property
    def shape(self) -> tuple[int, ...]:
        """Tasks per axis."""
        return tuple(-(-g // b) for g, b in zip(self.grid, self.block))

    def __len__(self) -> int:
        return int(np.prod(self.shape))

    def region(self, task_id: int) -> tuple[tuple[int, int], ...]:
        """The task's tiles: ``[lo, hi)`` tile indices per axis."""
        position = np.unravel_index(task_id, self.shape)
        return tuple((int(p) * b, min(g, (int(p) + 1) * b))
                     for p, b, g in zip(position, self.block, self.grid))

    @functools.cached_property
    def tile_counts(self) -> np.ndarray:
        """The number of tiles of every task, by task number.

        Examples
        --------
        >>> TaskGrid((2, 10), (1, 4)).tile_counts.tolist()
        [4, 4, 2, 4, 4, 2]
        """
        counts = np.ones((), dtype=np.int64)
        for g, b in zip(self.grid, self.block):  # the tasks' extent along each axis
            counts = np.multiply.outer(counts, np.minimum(b, g - np.arange(0, g, b)))
        return counts.reshape(-1)

    def tiles_of(self, task_ids: Iterable[int]) -> int:
        """How many tiles the tasks ``task_ids`` have in all."""
        ids = np.fromiter(task_ids, dtype=np.int64)
        return int(self.tile_counts[ids].sum()) if ids.size else 0

    def tiles(self, task_id: int) -> list[tuple[int, ...]]:
        """The tile indices of a task, row-major."""
        region = self.region(task_id)
        return [tuple(lo + int(i) for i, (lo, _) in zip(idx, region))
                for idx in np.ndindex(*(hi - lo for lo, hi in region))]

    def task_of(self, tile: Sequence[int]) -> int:
        """The task a tile belongs to."""
        return int(np.ravel_multi_index(tuple(t // b for t, b in zip(tile, self.block)),
                                        self.shape))


@dataclass(frozen=True)
class RunRef:
    """One run as plain data: what another process needs to join it and claim its tasks.

    Attributes
    ----------
    output : str
        The final output path.
    work : str
        The run's work directory (holds the manifest; see the module notes).
    config_hash : str
        The manifest's hash: a worker refuses a run it does not know.
    image : str or None
        The input's absolute path; None for an in-memory image (this process only).
    level : int
        The input pyramid level.
    channels : tuple of int
        The input channels fed to the model.

    A worker checks ``image``, ``level`` and ``channels`` against the run's manifest, which
    it reads once per process, with the rest of what the run needs; which tasks it
    computes it learns by claiming them (see :mod:`tilerseg.engine.claims`).
    """

    output: str
    work: str
    config_hash: str
    image: str | None
    level: int
    channels: tuple[int, ...]


# -- what a run computes ----------------------------------------------------------------------


def path_identity(path: str) -> dict[str, Any]:
    """An input path's identity without opening it: absolute path, and the number, total
    size and latest modification time of the files that make it up.

    A file is itself; a folder of slices is its TIFF slices; a Zarr store is its metadata
    files (``zarr.json``, ``.zarray``, ``.zgroup``, ``.zattrs``, two levels deep), not its
    chunks; a glob is the files it matches. Other files in a folder (an output written
    beside the slices) do not count. A folder without TIFF slices is its DICOM files, else
    the modality files of the NIfTI case it holds; a NIfTI case identifier
    (``imagesTr/CASE``) is its modality files. A ``file://`` URL is its
    local path; another URL is recorded as it is (see :func:`tilerseg.io.remote.identity`).
    """
    from ..io.nifti import case_files, folder_case

    path = remote.local_path(path)
    if remote.is_url(path):
        return remote.identity(path)
    out: dict[str, Any] = {"path": os.path.abspath(path)}
    if os.path.isdir(path):
        base = Path(path)
        if is_zarr_dir(path):
            names = ("zarr.json", ".zarray", ".zgroup", ".zattrs")
            files = [p for pattern in ("", "*/", "*/*/") for n in names
                     for p in base.glob(pattern + n)]
        else:
            files = [p for p in base.iterdir() if p.name.lower().endswith(SLICE_EXTENSIONS)]
            if not files:  # a DICOM series, else a NIfTI case
                files = [Path(f) for f in dicom_files(path) or folder_case(path) or []]
    elif os.path.exists(path):
        files = [Path(path)]
    elif case_files(path):
        files = [Path(f) for f in case_files(path)]
    else:  # a glob
        import glob

        files = [Path(f) for f in glob.glob(path)]
    stats = [f.stat() for f in sorted(files)]
    out.update(files=len(stats), size=sum(s.st_size for s in stats),
               mtime_ns=max((s.st_mtime_ns for s in stats), default=0))
    return out


def input_identity(image: Any, source: Any = None) -> dict[str, Any]:
    """What identifies an input: path, size and modification time, or an array's content.

    Parameters
    ----------
    image : path or array
        What the caller passed.
    source : ImageSource, optional
        The opened image, for paths, Dask and Zarr arrays (its format, axes, shape and
        dtype are recorded too).

    Returns
    -------
    dict
        Plain values: those of :func:`path_identity` for a path; the SHA-256 of its bytes
        for a numpy array; Dask's token for a Dask or Zarr array.
    """
    if source is None:
        arr = np.ascontiguousarray(image)
        return {"format": "array", "shape": list(arr.shape), "dtype": str(arr.dtype),
                "sha256": hashlib.sha256(arr.view(np.uint8).reshape(-1)).hexdigest()}
    out: dict[str, Any] = {"format": source.format, "axes": source.axes,
                           "shape": list(source.shape), "dtype": str(source.dtype),
                           "level": source.level}
    if getattr(source, "window", None) is not None:  # the display window a file records
        out["window"] = [float(v) for v in source.window]
    if source.path is not None:
        out.update(path_identity(source.path))
        return out
    from dask.base import tokenize

    out["token"] = tokenize(source.data)
    return out


def geometry_of(manifest: dict[str, Any]) -> ModelGeometry:
    """The model's geometry recorded in a manifest."""
    return ModelGeometry.from_dict(manifest["geometry"])


def _hash(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest's content, without its creation time and the hash."""
    content = {k: v for k, v in manifest.items()
               if k not in ("created", "run_id", "config_hash", "spec", "store")}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def build_manifest(*, output: Path, version: str, identity: dict[str, Any],
                   model: dict[str, Any], geometry: ModelGeometry, per_plane: bool,
                   options: dict[str, Any], resolved: dict[str, Any],
                   spec: dict[str, Any], grid: TaskGrid) -> dict[str, Any]:
    """A run's manifest: everything that decides its output, and how it is cut.

    ``options`` are the output-deciding options as requested, ``resolved`` what they
    became (tile, normalisation with its statistics, labels, channels, background map).
    The ``config_hash`` fingerprints all of it but the creation time, the run's random
    ``run_id`` and the output spec.
    """
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "tilerseg": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run_id": uuid.uuid4().hex,
        "output": str(output), "input": identity, "model": model,
        "geometry": {**geometry.as_dict(), "per_plane": per_plane},
        "options": options, "resolved": resolved, "spec": spec,
        "tasks": {"grid": list(grid.grid), "block": list(grid.block), "count": len(grid)},
    }
    manifest["config_hash"] = _hash(manifest)
    return manifest


class _NeedsStatistics(Exception):
    pass


def _normalization_differs(spec: Any, dtype: str, recorded: dict[str, Any],
                           window: Any = None) -> bool:
    """Whether ``normalize=spec`` would map the input otherwise than ``recorded`` did
    (``window``: the input's own display window, as its identity records it)."""

    def sample() -> np.ndarray:
        raise _NeedsStatistics

    try:
        now = resolve_normalization(spec, np.dtype(dtype), sample,
                                    window=lambda: tuple(window) if window else None)
    except _NeedsStatistics:  # percentiles: the recorded ones are those of this input
        if isinstance(spec, str) and spec not in ("auto", "percentile"):
            return recorded["method"] != spec  # "percentile:LOW:HIGH", "meanstd"
        return recorded["method"] != "percentile"
    return now != Normalization(**recorded)


def differences(manifest: dict[str, Any], options: RunOptions, *, version: str,
                digest: str | None,
                identity: dict[str, Any], labels: dict[str, Any] | None,
                geometry: ModelGeometry | None = None) -> list[str]:
    """What a new request changes against a recorded run, one phrase each (empty: same).

    Parameters
    ----------
    manifest : dict
        The recorded run (from a work directory or a finished output).
    options : RunOptions
        The new request. Options left at None (tile, channel) take the recorded values.
    version : str
        This tilerseg's version.
    digest : str or None
        The new model's weights digest; None when the caller checked that the model is
        the very file the run used.
    identity : dict
        The new input's :func:`input_identity` (or a part of it: only its keys are
        compared).
    labels : dict or None
        The new label policy (``LabelPolicy.as_dict()``); None compares the requested
        threshold instead (the same model file has the same default).
    geometry : ModelGeometry, optional
        The new model's geometry: its halo, step and shrink are compared with the
        recorded ones (a package's ``--halo`` changes them, not its weights). None: not
        compared.
    """
    out = []

    def differ(name: str, then: Any, now: Any) -> None:
        out.append(f"{name} ({then} then, {now} now)")

    if manifest.get("tilerseg") != version:
        differ("tilerseg version", manifest.get("tilerseg"), version)
    if digest is not None and manifest["model"]["digest"] != digest:
        differ("model weights", manifest["model"]["digest"][:12], digest[:12])
    if geometry is not None:
        then_g, now_g = manifest.get("geometry") or {}, geometry.as_dict()
        for name in ("halo", "step", "shrink"):
            if name in then_g and list(then_g[name]) != now_g[name]:
                differ(f"model {name}", then_g[name], now_g[name])
                break
    recorded_input = manifest["input"]
    for key in sorted(identity):
        if recorded_input.get(key) != identity.get(key):
            differ(f"input {key}", recorded_input.get(key), identity.get(key))
            break
    requested, resolved = manifest["options"], manifest["resolved"]
    if options.tile is not None:
        shape = manifest["spec"]["shape"][-len(resolved["tile"]):]
        try:
            tile = list(normalize_tile(options.tile, geometry_of(manifest), shape))
        except ValueError as err:
            tile = f"{options.tile!r}: {err}"
        if tile != resolved["tile"]:
            differ("tile", resolved["tile"], tile)
    window = identity["window"] if "window" in identity else recorded_input.get("window")
    if _normalization_differs(options.normalize, recorded_input["dtype"],
                              resolved["normalization"], window):
        differ("normalize", requested["normalize"], options.normalize)
    channels = (list(options.channel) if options.channel is not None
                else list(range(resolved["available_channels"])))
    if channels != resolved["channels"]:
        differ("channel", resolved["channels"], channels)
    if labels is None and options.threshold != requested["threshold"]:
        differ("threshold", requested["threshold"], options.threshold)
    elif labels is not None and labels != resolved["labels"]:
        differ("threshold", resolved["labels"], labels)
    now = options.output_options()
    for name in PLAIN_OUTPUT_OPTIONS:
        then = requested.get(name, getattr(RunOptions, name))  # older runs lack newer options
        if then != now[name]:
            differ(name, then, now[name])
    return out


def quick_complete(out: Path, image: str, model_file: Path, options: RunOptions,
                   version: str) -> bool:
    """Whether ``out`` is a finished run of the same image file, model file and options,
    decided from file metadata alone: no image is opened, no model loaded (no torch).

    Parameters
    ----------
    out : Path
        The output.
    image : str
        The input path (compared by :func:`path_identity` and the level).
    model_file : Path
        The model file (compared by path, size and modification time).
    options : RunOptions
        The request.
    version : str
        This tilerseg's version.

    Returns
    -------
    bool
        True when it is; False means "not known to be": the caller then checks the slow
        way (loading the model and opening the image).
    """
    from ..models.catalog import file_identity

    try:
        with open(Path(out) / "zarr.json", encoding="utf-8") as f:
            info = json.load(f)["attributes"]["tilerseg"]
        manifest = info["manifest"]
        if not info.get("complete") or manifest["model"].get("file") != file_identity(
                model_file):
            return False
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            return False
        identity = {**path_identity(image), "level": options.level}
        return not differences(manifest, options, version=version, digest=None,
                               identity=identity, labels=None)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def read_final_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest a finished output recorded (None if it is not a complete tilerseg run)."""
    import zarr

    try:
        attrs = dict(zarr.open_group(str(out), mode="r", zarr_format=3).attrs)
    except Exception:  # noqa: BLE001 - not a readable output: treated as foreign
        return None
    info = attrs.get("tilerseg") or {}
    manifest = info.get("manifest")
    if not info.get("complete") or not isinstance(manifest, dict) or \
            manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        return None
    return manifest

"""The output cut into tasks, and the work directory that makes a run resumable.

Tasks
-----
The output's tile grid (one tile = one Zarr chunk of level 0, and one chunk of each
eager pyramid level) is cut into rectangular blocks of up to :data:`TILES_PER_TASK`
tiles along the last axis: a task. Tasks are numbered row-major. A run crosses process and
machine boundaries as a :class:`RunRef`, plain data (input path, level, channels, the
run's config hash, where the output is) of a few hundred bytes; the processes that
compute it claim its tasks one at a time (see :mod:`tilerseg.engine.claims`).

The work directory
------------------
An unfinished output ``OUT.zarr`` lives beside it in ``OUT.zarr.partial/``::

    OUT.zarr.partial/
        manifest.json     what is being computed (see :func:`build_manifest`), with its hash
        output.zarr/      the output being written; moved to OUT.zarr by the commit
        done/             one completion record per finished task, e.g. done/17
        claims/           one claim per task being computed, e.g. claims/18 (see
                          tilerseg.engine.claims)
        locks/            one lock per process running the run (run-*.lock, join-*.lock),
                          commit.lock (see tilerseg.engine.locks)
        workers/          what each process that computed tasks did: tasks, tiles, stage
                          times, the runtime that ran the model

A task's record is written only after all its chunks (eager pyramid levels included)
are stored, so a crash between the two redoes the task; every chunk write is idempotent.
The commit builds the remaining pyramid levels, marks the output complete, renames
``output.zarr`` to ``OUT.zarr`` and removes the work directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError, OutputError
from ..geometry import ModelGeometry, normalize_tile
from ..io import remote
from ..io.formats import SLICE_EXTENSIONS, is_zarr_dir, strip_image_suffix
from ..io.dicom import dicom_files
from ..normalize import Normalization, resolve_normalization
from .locks import FileLock, LockedError, LockHolder, live_locks, read_lock
from .options import PLAIN_OUTPUT_OPTIONS, RunOptions

__all__ = [
    "TILES_PER_TASK", "RunRef", "TaskGrid", "WorkDir", "default_output_path", "work_path",
    "build_manifest",
    "differences", "input_identity", "path_identity", "geometry_of", "read_final_manifest",
    "quick_complete", "remove_debris", "remove_tree", "store_of",
]

log = logging.getLogger(__name__)

TILES_PER_TASK = 4
"""Tiles (output chunks) per task, along the last axis."""

MANIFEST = "manifest.json"
_FOLDERS = ("done", "claims", "locks", "workers")
STORE = "output.zarr"
FORMAT = "tilerseg-run"
FORMAT_VERSION = 1


def store_of(work: Path, manifest: dict[str, Any]) -> Path | str:
    """The Zarr store a run writes: ``output.zarr`` in its work directory ``work``, or for
    a remote output the staging URL beside it that the manifest records as ``store``.

    Examples
    --------
    >>> store_of(Path("/data/out.zarr.partial"), {}).as_posix()
    '/data/out.zarr.partial/output.zarr'
    >>> store_of(Path("/tmp/w.partial"), {"store": "memory://runs/.out.zarr.partial-1"})
    'memory://runs/.out.zarr.partial-1'
    """
    return manifest.get("store") or Path(work) / STORE


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


def work_path(out: str | os.PathLike) -> Path:
    """Where the unfinished output of ``out`` lives: ``OUT.zarr`` -> ``OUT.zarr.partial``.

    Examples
    --------
    >>> work_path("/data/slide.tilerseg.zarr").as_posix()
    '/data/slide.tilerseg.zarr.partial'
    """
    out = Path(os.path.abspath(os.fspath(out)))
    return out.with_name(out.name + ".partial")


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
    beside the slices) do not count. A folder without TIFF slices is its DICOM files. A ``file://`` URL is its
    local path; another URL is recorded as it is (see :func:`tilerseg.io.remote.identity`).
    """
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
            if not files:  # a DICOM series
                files = [Path(f) for f in dicom_files(path)]
    elif os.path.exists(path):
        files = [Path(path)]
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
        "output": os.fspath(output), "input": identity, "model": model,
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


# -- the work directory -----------------------------------------------------------------------


class WorkDir:
    """The unfinished output of one run (see the module notes).

    Use :meth:`create` or :meth:`open`; the manifest is read once.
    """

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.grid = TaskGrid(tuple(manifest["tasks"]["grid"]), tuple(manifest["tasks"]["block"]))

    @property
    def config_hash(self) -> str:
        return str(self.manifest["config_hash"])

    @property
    def store(self) -> Path | str:
        """The Zarr store being written: ``output.zarr`` here, or for a remote output the
        staging URL beside it recorded as the manifest's ``store``."""
        return store_of(self.path, self.manifest)

    @property
    def done_dir(self) -> Path:
        return self.path / "done"

    @property
    def locks(self) -> Path:
        return self.path / "locks"

    @property
    def claims_dir(self) -> Path:
        return self.path / "claims"

    @property
    def workers_dir(self) -> Path:
        return self.path / "workers"

    @classmethod
    def create(cls, path: Path, manifest: dict[str, Any],
               make_store: Callable[[Path], None]) -> tuple[WorkDir, bool]:
        """Create the work directory atomically, or open the one another process made.

        Everything is built in a hidden sibling first and renamed into place, so
        processes starting at once (shards of a job array) agree on one directory.

        Returns
        -------
        (WorkDir, bool)
            The work directory, and whether this call created it.
        """
        tmp = path.parent / f".{path.name}.new-{uuid.uuid4().hex}"
        try:
            tmp.mkdir()
            for sub in _FOLDERS:
                (tmp / sub).mkdir()
            _write_json(tmp / MANIFEST, manifest)
            make_store(tmp / STORE)
            os.rename(tmp, path)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if path.is_dir():  # another process won the rename
                return cls.open(path), False
            raise OSError(err.errno, f"cannot create the work directory '{path}': "
                          f"{err.strerror or err}") from err
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(path, manifest), True

    @classmethod
    def open(cls, path: Path) -> WorkDir:
        """Open an existing work directory."""
        try:
            with open(path / MANIFEST, encoding="utf-8") as f:
                manifest = json.load(f)
        except (OSError, ValueError) as err:
            raise OutputError(
                f"'{path}' is not a tilerseg work directory ({err}); remove it or pass "
                "--overwrite") from None
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise OutputError(f"'{path}' was written by another tilerseg version; remove it "
                              "or pass --overwrite")
        return cls(Path(path), manifest)

    def done(self) -> set[int]:
        """The tasks with a completion record."""
        return {int(n) for n in _listdir(self.done_dir) if n.isdigit()}

    def missing(self) -> list[int]:
        """The tasks without a completion record, in order."""
        done = self.done()
        return [k for k in range(len(self.grid)) if k not in done]

    def mark_done(self, task_id: int, **info: Any) -> None:
        """Record that a task's chunks are all stored."""
        record = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(), **info}
        with open(self.done_dir / str(task_id), "w", encoding="utf-8") as f:
            json.dump(record, f)

    def is_done(self, task_id: int) -> bool:
        """Whether a task has a completion record."""
        return os.path.exists(self.done_dir / str(int(task_id)))

    def claim(self, task_id: int, info: dict[str, Any] | None = None) -> FileLock | None:
        """Claim a task for this process (see :mod:`tilerseg.engine.claims`).

        Returns
        -------
        FileLock or None
            The claim, held (release it after the task's record is written); None when
            the task is recorded, a live process holds it, or the run is over (its work
            directory was committed and removed meanwhile).
        """
        if self.is_done(task_id):
            return None
        claim = FileLock(self.claims_dir / str(int(task_id)), "claim", info)
        try:
            claim.acquire()
        except LockedError:
            return None
        except FileNotFoundError:
            if not self.path.is_dir():
                return None
            self.claims_dir.mkdir(exist_ok=True)  # a run begun by an earlier tilerseg
            return self.claim(task_id, info)
        if self.is_done(task_id):  # finished by the previous holder meanwhile
            claim.release()
            return None
        return claim

    def claims(self) -> dict[int, LockHolder]:
        """Who holds (or held) each claimed task's claim, stale or not."""
        out = {}
        for name in _listdir(self.claims_dir):
            if name.isdigit():
                holder = read_lock(self.claims_dir / name)
                if holder is not None:
                    out[int(name)] = holder
        return out

    def running(self) -> list[LockHolder]:
        """The live processes working on this run: holders of its locks (runs, shards, a
        commit) and of its claims, one entry per process."""
        seen, out = set(), []
        holders = live_locks(self.locks) + [h for _, h in sorted(self.claims().items())
                                             if not h.stale]
        for holder in holders:
            if (holder.host, holder.pid) not in seen:
                seen.add((holder.host, holder.pid))
                out.append(holder)
        return out

    def record_worker(self, **info: Any) -> None:
        """Write what one process did on this run (tasks, tiles, stage times...), once,
        when it stops computing."""
        name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "job": os.environ.get("SLURM_JOB_ID"), "time": time.time(), **info}
        try:
            _write_json(self.workers_dir / name, record)
        except FileNotFoundError:  # committed and removed by another process meanwhile
            if self.path.is_dir():
                self.workers_dir.mkdir(exist_ok=True)
                _write_json(self.workers_dir / name, record)

    def worker_records(self) -> list[dict[str, Any]]:
        """What each process that computed tasks of this run did, oldest first."""
        out = []
        for name in _listdir(self.workers_dir):
            try:
                with open(self.workers_dir / name, encoding="utf-8") as f:
                    out.append(json.load(f))
            except (OSError, ValueError):
                continue
        return sorted(out, key=lambda r: r.get("time", 0))

    def ref(self, image: str | None, level: int, channels: Sequence[int]) -> RunRef:
        """This run as plain data for other processes (:class:`RunRef`)."""
        return RunRef(self.manifest["output"], os.fspath(self.path), self.config_hash, image,
                      int(level), tuple(int(c) for c in channels))

    def remove(self) -> None:
        """Delete the work directory (after a commit, or to start again)."""
        remove_tree(self.path)


def remove_debris(out: Path, older_than: float = 600.0) -> None:
    """Remove what killed processes can leave beside ``out``: work directories renamed
    aside for removal (``.OUT.zarr.partial.removed-*``), and ones never renamed into
    place (``.OUT.zarr.partial.new-*``) older than ``older_than`` seconds."""
    now = time.time()
    for p in out.parent.glob(f".{out.name}.partial.*-*"):
        try:
            stale = ".removed-" in p.name or (".new-" in p.name
                                              and now - p.stat().st_mtime > older_than)
        except OSError:
            continue
        if stale:
            shutil.rmtree(p, ignore_errors=True)


def remove_tree(path: Path) -> None:
    """Delete a directory: renamed aside first, so it vanishes at once for other runs."""
    aside = path.with_name(f".{path.name}.removed-{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _listdir(folder: Path) -> list[str]:
    """The names in a folder (none if it is not there), without hidden temporary files."""
    try:
        return [n for n in os.listdir(folder) if not n.startswith(".")]
    except FileNotFoundError:
        return []


def _write_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename: readers never see half of it."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


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
        attrs = dict(zarr.open_group(os.fspath(out), mode="r", zarr_format=3).attrs)
    except Exception:  # noqa: BLE001 - not a readable output: treated as foreign
        return None
    info = attrs.get("tilerseg") or {}
    manifest = info.get("manifest")
    if not info.get("complete") or not isinstance(manifest, dict) or \
            manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        return None
    return manifest

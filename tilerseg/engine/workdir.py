"""The work directory: an unfinished run as one object.

An unfinished output ``OUT.zarr`` lives beside it in ``OUT.zarr.partial/`` (a remote
output's in a private local folder, see :mod:`tilerseg.io.remote`)::

    OUT.zarr.partial/
        manifest.json     what is being computed (see tilerseg.engine.jobs.build_manifest),
                          with its hash
        output.zarr/      the output being written; moved to OUT.zarr by the commit
        done/             one completion record per finished task, e.g. done/17
        claims/           one claim per task being computed, e.g. claims/18
        locks/            one lock per process working on the run, commit.lock
        workers/          what each process that computed tasks did: tasks, tiles, stage
                          times, the runtime that ran the model

:class:`WorkDir` owns all of it: the manifest (read once), the completion records, the
claims (:meth:`WorkDir.claim`, see :mod:`tilerseg.engine.claims`), the lock each process
working on the run holds (:meth:`WorkDir.join`), what each process did
(:meth:`WorkDir.record_worker`), and the commit (:meth:`WorkDir.commit`).

A task's record is written only after all its chunks (eager pyramid levels included) are
stored, so a crash between the two redoes the task; every chunk write is idempotent. The
commit builds the remaining pyramid levels, marks the output complete, renames
``output.zarr`` to ``OUT.zarr`` and removes the work directory, exactly once, by the first
process that finds every task recorded (once the others have left, or after a short wait).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from upath import UPath

from ..errors import OutputError
from ..io import remote
from .jobs import FORMAT, FORMAT_VERSION, RunRef, TaskGrid
from .locks import FileLock, LockedError, LockHolder, _alive, live_locks, read_lock

if TYPE_CHECKING:
    from ..io.writers import OutputWriter
    from .instances import Mapper

__all__ = ["WorkDir", "work_path", "store_of", "remove_debris", "remove_tree"]

log = logging.getLogger(__name__)

LEAVE_WAIT = 10.0
"""Seconds a committing process waits for the others working on the run to leave."""

MANIFEST = "manifest.json"
STORE = "output.zarr"
_FOLDERS = ("done", "claims", "locks", "workers")


def store_of(work: Path, manifest: dict[str, Any]) -> UPath:
    """The location of the Zarr store a run writes: ``output.zarr`` in its work directory
    ``work``, or for a remote output the staging URL beside it that the manifest records
    as ``store``.

    Examples
    --------
    >>> store_of(Path("/data/out.zarr.partial"), {}).as_posix()
    '/data/out.zarr.partial/output.zarr'
    >>> str(store_of(Path("/tmp/w.partial"), {"store": "memory://runs/.out.zarr.partial-1"}))
    'memory://runs/.out.zarr.partial-1'
    """
    return remote.location(manifest.get("store") or Path(work) / STORE)




def work_path(out: str | os.PathLike) -> Path:
    """Where the unfinished output of ``out`` lives: ``OUT.zarr`` -> ``OUT.zarr.partial``.

    Examples
    --------
    >>> work_path("/data/slide.tilerseg.zarr").as_posix()
    '/data/slide.tilerseg.zarr.partial'
    """
    out = Path(os.path.abspath(os.fspath(out)))
    return out.with_name(out.name + ".partial")


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
    def store(self) -> UPath:
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
            write_json(tmp / MANIFEST, manifest)
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

    def record_worker(self, name: str | None = None, **info: Any) -> str:
        """Write what one process did on this run (tasks, tiles, stage times...) when it
        has nothing more to compute in it; ``name``: the record to replace (a process
        completes it later, e.g. with its stage times). Returns the record's name."""
        name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "job": os.environ.get("SLURM_JOB_ID"), "time": time.time(), **info}
        try:
            write_json(self.workers_dir / name, record)
        except FileNotFoundError:  # committed and removed by another process meanwhile
            if self.path.is_dir():
                self.workers_dir.mkdir(exist_ok=True)
                write_json(self.workers_dir / name, record)
        return name

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

    # -- who works on it ----------------------------------------------------------------

    def join(self, kind: str = "run", info: dict[str, Any] | None = None) -> FileLock:
        """Take this process's own lock on the run (``locks/KIND-HOST-PID-*.lock``), held
        while it works on it: it says the run is being worked on, so that nobody starts it
        again or removes it meanwhile, and that this process may still commit it.

        Parameters
        ----------
        kind : str
            ``"run"`` or ``"shard"``.
        info : dict, optional
            More plain values for the lock (e.g. the shard).

        Raises
        ------
        OutputError
            The work directory was removed meanwhile.
        """
        name = f"{kind}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.lock"
        lock = FileLock(self.locks / name, kind, info)
        try:
            return lock.acquire()
        except FileNotFoundError:
            raise OutputError(f"the unfinished run in '{self.path}' was removed "
                              "meanwhile") from None

    # -- the commit ---------------------------------------------------------------------

    def commit(self, out: UPath, *, overwrite: bool = False,
               attributes: dict[str, Any] | Callable[[WorkDir], dict[str, Any]] | None = None,
               writer: OutputWriter | None = None, mapper: Mapper | None = None) -> bool:
        """Finish the run once its tasks are all recorded: instances, pyramid, metadata,
        move, object table, clean up.

        The object table is placed beside the output only once the output is in place, so
        a failed move leaves the old output and its table together; a process killed in
        between leaves the table in the work directory, where
        :func:`~tilerseg.engine.finish.clear_leftover` (run by ``--resume`` and
        ``finalize``) finds and places it.

        Exactly once among processes finishing at the same time: under the commit lock (a
        process finding it held by a live one leaves the commit to it) and only if the
        output is still in the work directory. Each process releases its own lock
        (:meth:`join`) before it calls this; the committer waits up to
        :data:`LEAVE_WAIT` seconds for the other processes working on the run to leave
        too, so that their records (stage times) reach the profile, then commits anyway.

        Parameters
        ----------
        out : Path or str
            The final output path (a URL for a remote output).
        overwrite : bool
            Replace an existing output at ``out``.
        attributes : dict or callable, optional
            Added to the output's ``tilerseg`` attributes (executor...); a callable is
            given the work directory once it is this call's to commit (so that a profile
            merged from every process's record sees them all).
        writer : OutputWriter, optional
            The run's writer, already open on :attr:`store` (else one is opened).
        mapper : callable, optional
            Runs the instance passes over chunks (a cluster's ``map``); default: threads
            here. See :meth:`~tilerseg.engine.instances.InstanceRun.run`.

        Returns
        -------
        bool
            True if this call committed, False if another process did or does.

        Raises
        ------
        OutputError
            Tasks are missing, or ``out`` exists without ``overwrite``; the work directory
            is kept.
        OSError
            The output cannot be finished or moved (disk full...); the work directory is
            kept: the commit can be retried (``tilerseg finalize`` or ``--resume``).
        """
        from ..io.writers import OutputWriter, spec_from_dict
        from .instances import InstanceRun, place_tables

        lock = FileLock(self.locks / "commit.lock", "commit")
        try:
            lock.acquire()
        except (LockedError, FileNotFoundError):
            log.info("%s is being (or was) committed by another process", out)
            return False
        try:
            if not remote.exists(self.store):
                return False
            missing = self.missing()
            if missing:
                raise OutputError(f"'{out}' cannot be finished: {len(missing)} of "
                                  f"{len(self.grid)} tasks are not done (e.g. task "
                                  f"{missing[0]})")
            self._wait_for_others(out)
            if writer is None:
                writer = OutputWriter(out, spec_from_dict(self.manifest["spec"]),
                                      staging=self.store, existing=True)
            writer.overwrite = overwrite
            instances = InstanceRun.of(self.path, self.manifest)
            extra = dict((attributes(self) if callable(attributes) else attributes) or {})
            if instances is not None:
                extra["instances"] = instances.run(mapper)
            # a remote output's staging store is gone once committed: not recorded
            manifest = {k: v for k, v in self.manifest.items() if k != "store"}
            writer.update_attributes(manifest=manifest, config_hash=self.config_hash,
                                     committed_by=f"{socket.gethostname()}:{os.getpid()}",
                                     **extra)
            writer.commit()
            place_tables(instances, out, replacing=writer.replaced)
        finally:
            lock.release()
        self.remove()
        return True

    def _wait_for_others(self, out: UPath) -> None:
        """Wait (at most :data:`LEAVE_WAIT` seconds) until no other process holds a lock or
        a claim of the run, and every live process that recorded a task has left its
        worker record: once every task is recorded they only write their records."""
        me = (socket.gethostname(), os.getpid())
        deadline = time.monotonic() + LEAVE_WAIT
        writers = self._task_writers() - {me}
        while True:
            others = [h.describe() for h in self.running() if (h.host, h.pid) != me]
            recorded = {(r.get("host"), r.get("pid")) for r in self.worker_records()}
            others += [f"{h}:{p} (its record)" for h, p in writers - recorded
                       if h != me[0] or _alive(p, None)]  # a local process gone leaves none
            if not others:
                return
            if time.monotonic() > deadline:
                log.info("%s: committing while %s is not done with it", out, others[0])
                return
            time.sleep(0.2)

    def _task_writers(self) -> set[tuple[str, int]]:
        """The processes (host, pid) that recorded the run's tasks."""
        out = set()
        for name in _listdir(self.done_dir):
            try:
                with open(self.done_dir / name, encoding="utf-8") as f:
                    record = json.load(f)
                out.add((str(record["host"]), int(record["pid"])))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return out

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


def write_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename: readers never see half of it, and
    a failed write leaves nothing behind."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

"""Lock files on a (possibly shared) filesystem, with stale-lock detection.

A lock is a small JSON file created with ``O_CREAT | O_EXCL`` (atomic on local
filesystems and on NFS v3 and later). It names the host, the process id and the
process's start time, and a thread touches it every :data:`HEARTBEAT` seconds while it
is held. A lock is stale, and may be taken over, when

- it was made on this host and its process no longer runs (or the pid now belongs to a
  process that started at another time: the pid was reused), or
- it was made on another host and has not been touched for :data:`STALE_AFTER`
  seconds (that host may have crashed; a process on it cannot be checked from here), or
- it was made by an earlier run of this very batch job: the same ``SLURM_JOB_ID`` with a
  lower ``SLURM_RESTART_COUNT`` (the job was requeued, so that run is over; processes of
  one run of a job, such as the tasks of a multi-node job, share its id and count).

Each lock carries a random token: a process touches or removes only a lock file that
still holds its own token, so a lock taken over meanwhile is never lost by its new holder.

Examples
--------
>>> import tempfile, os
>>> d = tempfile.mkdtemp()
>>> with FileLock(os.path.join(d, "run.lock"), "run") as lock:
...     [h.pid == os.getpid() for h in live_locks(d)]
[True]
>>> live_locks(d)
[]
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["FileLock", "LockHolder", "LockedError", "live_locks", "read_lock", "HEARTBEAT",
           "STALE_AFTER"]

log = logging.getLogger(__name__)

HEARTBEAT = 10.0
"""Seconds between touches of a held lock."""

STALE_AFTER = 120.0
"""A lock from another host untouched for this long is stale."""


class LockedError(Exception):
    """The lock is held by a live process (``holder`` says which)."""

    def __init__(self, holder: LockHolder) -> None:
        super().__init__(holder.describe())
        self.holder = holder


def _start_ticks(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


@functools.lru_cache(maxsize=None)
def _ticks_of(pid: int) -> int | None:
    return _start_ticks(pid)


def _own_ticks() -> int | None:
    """This process's start time (read once per process; a forked child reads its own)."""
    return _ticks_of(os.getpid())


def _restart_count() -> int:
    """How often this SLURM job was requeued (``SLURM_RESTART_COUNT``; 0 outside SLURM)."""
    value = os.environ.get("SLURM_RESTART_COUNT", "0")
    return int(value) if value.isdigit() else 0


def _alive(pid: int, ticks: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    now = _start_ticks(pid)
    return ticks is None or now is None or now == ticks


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or held) a lock, read from its file."""

    path: str
    kind: str
    host: str
    pid: int
    ticks: int | None
    since: str
    touched: float
    info: dict[str, Any]
    token: str | None = None
    job: str | None = None
    restart: int = 0

    @property
    def stale(self) -> bool:
        """True when the holder is known to be gone (see the module notes)."""
        if self.host == socket.gethostname():
            return not _alive(self.pid, self.ticks)
        if self.job is not None and self.job == os.environ.get("SLURM_JOB_ID") and \
                self.restart < _restart_count():
            return True
        return time.time() - self.touched > STALE_AFTER

    def describe(self) -> str:
        """One line: what holds it, where and since when."""
        if self.pid < 0:
            return f"an unreadable lock file {self.path}"
        extra = f" ({', '.join(f'{k} {v}' for k, v in self.info.items())})" if self.info else ""
        return f"{self.kind}{extra} on host {self.host}, pid {self.pid}, since {self.since}"


def read_lock(path: str | os.PathLike) -> LockHolder | None:
    """The holder recorded in a lock file, or None if there is none (or it is unreadable).

    A lock file being written (empty or partial) counts as held by an unknown live
    process for :data:`STALE_AFTER` seconds.
    """
    path = os.fspath(path)
    try:
        touched = os.stat(path).st_mtime
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return LockHolder(path, str(data["kind"]), str(data["host"]), int(data["pid"]),
                          data.get("ticks"), str(data["since"]), touched,
                          dict(data.get("info") or {}), data.get("token"), data.get("job"),
                          int(data.get("restart") or 0))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        try:
            touched = os.stat(path).st_mtime
        except OSError:
            return None
        return LockHolder(path, "unknown", "?", -1, None, "?", touched, {})


def live_locks(folder: str | os.PathLike, pattern: str = "*.lock") -> list[LockHolder]:
    """The holders of the locks in ``folder`` that are not stale."""
    out = []
    for p in sorted(Path(folder).glob(pattern)):
        holder = read_lock(p)
        if holder is not None and not holder.stale:
            out.append(holder)
    return out


class FileLock:
    """An exclusive lock file with a heartbeat; see the module notes.

    Parameters
    ----------
    path : str or os.PathLike
        The lock file (its folder must exist).
    kind : str
        What holds it ("run", "shard", "commit"...), for messages.
    info : dict, optional
        More plain values to record (e.g. the shard).
    heartbeat : bool
        Touch the file every :data:`HEARTBEAT` seconds from a daemon thread.

    Raises
    ------
    LockedError
        From :meth:`acquire`: a live process holds it.
    """

    def __init__(self, path: str | os.PathLike, kind: str, info: dict[str, Any] | None = None,
                 *, heartbeat: bool = True) -> None:
        self.path, self.kind, self.info = os.fspath(path), kind, dict(info or {})
        self.heartbeat = heartbeat
        self.held = False
        self.token: str | None = None

    def acquire(self) -> FileLock:
        """Take the lock, taking over a stale one; raise :class:`LockedError` if held."""
        self.token = uuid.uuid4().hex
        record = json.dumps({
            "kind": self.kind, "host": socket.gethostname(), "pid": os.getpid(),
            "ticks": _own_ticks(), "token": self.token,
            "job": os.environ.get("SLURM_JOB_ID"), "restart": _restart_count(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "info": self.info,
        })
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_lock(self.path)
                if holder is None:
                    continue  # released meanwhile
                if not holder.stale:
                    raise LockedError(holder) from None
                self._take_over(holder)
                continue
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(record)
            except BaseException:  # e.g. a full disk: no empty lock file left behind
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
                raise
            self.held = True
            if self.heartbeat:
                _HEARTBEAT.add(self)
            return self
        holder = read_lock(self.path)
        raise LockedError(holder or LockHolder(self.path, "unknown", "?", -1, None, "?", 0, {}))

    def _take_over(self, stale: LockHolder) -> None:
        """Remove the stale lock ``stale`` unless another process replaced it meanwhile."""
        log.info("taking over a stale lock: %s", stale.describe())
        aside = f"{self.path}.stale-{uuid.uuid4().hex}"
        try:
            os.rename(self.path, aside)  # only one contender moves any given file
        except FileNotFoundError:
            return
        moved = read_lock(aside)
        if moved is not None and moved.token != stale.token:  # a fresh lock: put it back
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(aside)

    def mine(self) -> bool:
        """Whether the lock file is still this lock's (not released, not taken over)."""
        holder = read_lock(self.path)
        return holder is not None and holder.token == self.token

    def touch(self) -> bool:
        """Refresh the lock's modification time; False if it is no longer this process's."""
        if not self.held:
            return False
        if not self.mine():
            if self.held:  # not released meanwhile: taken over
                log.warning("lost the lock %s to another process", self.path)
            return False
        os.utime(self.path)
        return True

    def release(self) -> None:
        """Give the lock up (remove the file, if it is still this process's)."""
        if not self.held:
            return
        _HEARTBEAT.discard(self)
        self.held = False
        with contextlib.suppress(FileNotFoundError):
            if self.mine():
                os.unlink(self.path)

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


class _Heartbeat:
    """One daemon thread per process that touches every held lock every :data:`HEARTBEAT`
    seconds (a process may hold many: its claims on tasks, its run lock...)."""

    def __init__(self) -> None:
        self._locks: set[FileLock] = set()
        self._guard = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def add(self, lock: FileLock) -> None:
        with self._guard:
            if self._pid != os.getpid():  # a forked child: the parent's thread is not here
                self._locks, self._thread, self._pid = set(), None, os.getpid()
            self._locks.add(lock)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="tilerseg-lock-heartbeat")
                self._thread.start()

    def discard(self, lock: FileLock) -> None:
        with self._guard:
            self._locks.discard(lock)

    def _run(self) -> None:
        warned: set[str] = set()
        while True:
            time.sleep(HEARTBEAT)
            with self._guard:
                locks = list(self._locks)
            for lock in locks:
                try:
                    if not lock.touch():
                        self.discard(lock)
                except FileNotFoundError:  # released (or its run removed) meanwhile
                    self.discard(lock)
                except OSError as err:  # e.g. a network filesystem hiccup: try again
                    if lock.path not in warned:
                        log.warning("cannot touch the lock %s (%s); retrying", lock.path, err)
                        warned.add(lock.path)


_HEARTBEAT = _Heartbeat()

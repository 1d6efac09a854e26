"""Claiming tasks: which process computes which task of a run, among any number of them.

Every process that works on a run (the local run, a ``--resume`` that joins it, each job of
a job array, each worker process of a Dask cluster) takes its tasks one at a time by
*claiming* them in the run's work directory, as chunkflow and daisy do, instead of being
handed a fixed share:

- a claim is the file ``claims/K`` of task ``K``, created with ``O_EXCL`` by
  :class:`~tilerseg.engine.locks.FileLock` (host, pid, start time, SLURM job id, a
  random token, and who claims: a shard, a worker), touched every
  :data:`~tilerseg.engine.locks.HEARTBEAT` seconds while the task is computed;
- a process claims only a task without a completion record, and looks for the record
  again once it holds the claim (the holder before it may have just finished it);
- the claim is removed after the task's completion record is written;
- a claim whose holder is gone (same host: its process no longer runs; another host: not
  touched for :data:`~tilerseg.engine.locks.STALE_AFTER` seconds; the same SLURM job:
  requeued) is stale and taken over.

So a resubmitted array index helps finish instead of redoing, a slow node holds only the
task it is on, and two processes compute the same task only when one was presumed dead.
Tasks are tried in their number order, and each task's output does not depend on who
computes it, so results are byte-stable.

A process first claims every task it can (:meth:`TaskClaims.claimable`), then waits for
the tasks other live processes hold (:meth:`TaskClaims.wait`), taking over any whose
holder dies, until every task is recorded: whoever records the last one may commit.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .locks import FileLock

if TYPE_CHECKING:
    from .workdir import WorkDir

__all__ = ["TaskClaims", "POLL"]

log = logging.getLogger(__name__)

POLL = 1.0
"""Seconds between looks at tasks held by other processes while waiting for them."""


class TaskClaims:
    """The tasks of one run that this process computes, claimed one at a time, in order.

    Parameters
    ----------
    work : WorkDir
        The run.
    candidates : iterable of int
        The tasks to try, in order (those without a record when the run was joined).
    info : dict, optional
        Who claims (e.g. ``{"shard": "2/3"}``), recorded in every claim.

    Attributes
    ----------
    found : list of int
        Tasks found recorded by other processes (not computed here).
    elsewhere : list of int
        Tasks a live process held when tried, to wait for.
    """

    def __init__(self, work: WorkDir, candidates: Iterable[int],
                 info: dict[str, Any] | None = None) -> None:
        self.work = work
        self.candidates = [int(k) for k in candidates]
        self.info = dict(info or {})
        self.elsewhere: list[int] = []  # held by another live process when tried
        self.found: list[int] = []
        self._held: dict[int, FileLock] = {}
        self._lock = threading.Lock()

    def _try(self, task_id: int) -> bool:
        """Claim one task: True if this process now holds it."""
        claim = self.work.claim(task_id, self.info)
        if claim is None:
            return False
        with self._lock:
            self._held[task_id] = claim
        return True

    def claimable(self, stop: Callable[[], bool] = lambda: False) -> Iterator[int]:
        """Claim, in order, every candidate that has no record and no live holder; the ones
        held elsewhere are kept for :meth:`wait`. Ends early when ``stop()`` is true."""
        for task_id in self.candidates:
            if stop() or self.over:
                return
            if self._try(task_id):
                yield task_id
            elif self.work.is_done(task_id):
                self.found.append(task_id)
            else:
                self.elsewhere.append(task_id)

    def wait(self, stop: Callable[[], bool] = lambda: False, poll: float = POLL,
             sleep: Callable[[float], Any] | None = None) -> Iterator[int]:
        """Wait for the tasks held by other processes to be recorded; claim (and yield)
        any whose holder is gone. Ends when none is left, or early when ``stop()`` is true.

        ``sleep(seconds)`` waits between looks (default :func:`time.sleep`; pass an event's
        ``wait`` to wake up at once when the run stops)."""
        import time

        sleep = sleep or time.sleep
        while self.elsewhere and not stop() and not self.over:
            left = []
            for task_id in self.elsewhere:
                if self._try(task_id):
                    log.info("took over task %d of %s from a process that is gone", task_id,
                             self.work.path)
                    yield task_id
                elif self.work.is_done(task_id):
                    self.found.append(task_id)
                else:
                    left.append(task_id)
            self.elsewhere = left
            if left:
                sleep(poll)

    def owns(self, task_id: int) -> bool:
        """Whether this process still holds the claim of a task: False once another
        process took it over (this one was presumed dead: stalled, suspended) or the run
        is over; what it would write then is left to the new holder."""
        with self._lock:
            claim = self._held.get(task_id)
        return claim is not None and claim.mine()

    @property
    def over(self) -> bool:
        """Whether the run is over: committed by another process (its work directory gone)."""
        return not self.work.path.is_dir()

    def release(self, task_id: int) -> None:
        """Give up the claim of a task (after its record is written, or when it failed)."""
        with self._lock:
            claim = self._held.pop(task_id, None)
        if claim is not None:
            claim.release()

    def release_all(self) -> None:
        """Give up every claim still held (the run stopped or failed here): other
        processes may take the tasks at once."""
        with self._lock:
            held, self._held = list(self._held.values()), {}
        for claim in held:
            claim.release()

    @property
    def held(self) -> list[int]:
        """The tasks this process holds now."""
        with self._lock:
            return sorted(self._held)

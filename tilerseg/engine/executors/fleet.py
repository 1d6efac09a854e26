"""Keeping a cluster's workers alive, and never waiting forever for them.

:class:`Watchdog` is what a cluster run's client asks, every half second, which workers are
alive. It raises a :class:`~tilerseg.errors.ClusterError` naming the cause when nothing can
compute any more:

- no worker has been alive for ``timeout`` seconds (whatever the reason: a scheduler whose
  workers all died, jobs that never start), or
- on a dask-jobqueue cluster (SLURM, PBS, LSF), every worker job has ended and no more
  may be started.

On a dask-jobqueue cluster :class:`JobFleet` keeps the jobs asked for alive: a job that ended
(its walltime, a node failure, ``scancel``) is replaced by a new one, up to a number of
replacements. On SLURM the jobs' states come from ``squeue`` (so a job that ends before its
worker ever connected is seen too, with the reason: time limit, node failure...); on PBS
and LSF a job counts as ended when its worker has left the scheduler.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import time
from collections import Counter
from typing import Any

from ...errors import ClusterError

__all__ = ["Watchdog", "JobFleet", "slurm_states", "ASK_EVERY"]

log = logging.getLogger(__name__)

ASK_EVERY = 5.0
"""Seconds between two looks at a batch cluster's jobs (``squeue``)."""

_LIVE = {"PENDING", "RUNNING", "CONFIGURING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
         "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}
_WORDS = {"TIMEOUT": "time limit", "CANCELLED": "cancelled", "NODE_FAIL": "node failure",
          "FAILED": "failed", "COMPLETED": "completed", "OUT_OF_MEMORY": "out of memory",
          "PREEMPTED": "preempted", "BOOT_FAIL": "boot failure", "DEADLINE": "deadline",
          "COMPLETING": "ending", "GONE": "no longer known to the batch system",
          "LEFT": "its worker left"}


def slurm_states(job_ids: list[str]) -> dict[str, tuple[str, str]] | None:
    """``{job id: (state, reason)}`` of SLURM jobs from ``squeue`` (finished jobs too, for
    as long as SLURM keeps them: ``MinJobAge``); None when ``squeue`` cannot be asked.

    A job ``squeue`` does not list has ended long enough ago to be forgotten.
    """
    if not job_ids:
        return {}
    squeue = shutil.which("squeue")
    if squeue is None:
        return None
    try:
        out = subprocess.run([squeue, "-h", "-t", "all", "-j", ",".join(job_ids),
                              "-o", "%i %T %r"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 and "Invalid job id" not in out.stderr:
        return None
    states = {}
    for line in out.stdout.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2:
            states[parts[0]] = (parts[1], parts[2] if len(parts) > 2 else "")
    return states


class JobFleet:
    """The worker jobs of a dask-jobqueue cluster: replaces those that end, within a budget.

    Parameters
    ----------
    cluster : dask_jobqueue.JobQueueCluster
        The cluster (its jobs were asked for with ``scale``).
    replacements : int, optional
        How many ended jobs may be replaced by new ones (default twice the jobs asked for).
    """

    def __init__(self, cluster: Any, replacements: int | None = None) -> None:
        self.cluster = cluster
        self.target = len(cluster.worker_spec)
        self.budget = 2 * self.target if replacements is None else int(replacements)
        self.replaced = 0
        self.ended: dict[str, str] = {}  # job id -> state
        self.slurm = getattr(getattr(cluster, "job_cls", None), "submit_command", "") == "sbatch"
        self._closing: set[Any] = set()
        self._handled: set[str] = set()  # job names seen to end
        # job names asked for whose job is not submitted yet (not an ended job)
        self._pending: set[str] = set(cluster.worker_spec) - set(cluster.workers)
        self._lost: set[str] = set()  # jobs whose worker left, not yet handled by poll()
        self._asked = -ASK_EVERY

    def poll(self) -> None:
        """Look at the jobs (the batch system is asked at most every :data:`ASK_EVERY`
        seconds); replace (or drop) those that ended."""
        now = time.monotonic()
        if now - self._asked < ASK_EVERY:
            return
        self._asked = now
        jobs = dict(self.cluster.workers)
        ids = {name: str(job.job_id) for name, job in jobs.items()
               if getattr(job, "job_id", None)}
        states = slurm_states(sorted(set(ids.values()))) if self.slurm else None
        ended = []
        if states is not None:
            for name, job_id in ids.items():
                state = states.get(job_id, ("GONE", ""))[0]
                if state not in _LIVE:
                    ended.append((name, job_id, state))
        # jobs whose worker left the scheduler, removed from ``workers`` by the cluster itself
        self._pending -= set(jobs)
        for name in (set(self.cluster.worker_spec) - set(jobs) - self._pending) | self._lost:
            if name not in self._handled:
                ended.append((name, None, "LEFT"))
        for name, job_id, state in ended:
            if name in self._handled:
                continue
            self._handled.add(name)
            if job_id is not None:
                self.ended[job_id] = state
            else:
                self.ended[f"{name} (worker left)"] = state
            replace = self.replaced < self.budget
            if replace:
                self.replaced += 1
            log.warning("cluster: worker job %s ended (%s)%s", job_id or name,
                        _WORDS.get(state, state.lower()),
                        f"; starting a replacement ({self.replaced} of {self.budget})"
                        if replace else "; no replacement left")
            self.cluster.loop.add_callback(self._swap, name, replace)

    def _swap(self, name: str, replace: bool) -> None:
        """In the cluster's event loop: forget job ``name`` (cancelling it, if still
        queued somewhere) and, if ``replace``, ask for a new job under a new name."""
        cluster = self.cluster
        job = cluster.workers.pop(name, None)
        cluster.worker_spec.pop(name, None)
        if job is not None:
            closing = asyncio.ensure_future(job.close())
            self._closing.add(closing)  # keep a reference until it is done
            closing.add_done_callback(self._closing.discard)
        if replace:
            new = cluster.new_worker_spec()
            self._pending.update(new)
            cluster.worker_spec.update(new)
        # a job whose worker left since poll() looked would be submitted again under its
        # name by the scale below, outside the budget: the next poll() handles it instead
        for other in set(cluster.worker_spec) - set(cluster.workers) - self._pending:
            cluster.worker_spec.pop(other, None)
            self._lost.add(other)
        cluster.scale(jobs=len(cluster.worker_spec))

    @property
    def exhausted(self) -> bool:
        """Every job asked for has ended and none may be started any more."""
        return self.replaced >= self.budget and not self.cluster.workers and \
            not self.cluster.worker_spec

    def describe(self) -> str:
        """What happened to the jobs, for an error: e.g. ``"all 2 worker jobs ended (2
        time limit) and no more may be started (2 of 2 replacements used)"``."""
        counts = Counter(_WORDS.get(s, s.lower()) for s in self.ended.values())
        why = ", ".join(f"{n} {word}" for word, n in counts.most_common())
        return (f"all {len(self.ended)} worker jobs ended ({why}) and no more may be "
                f"started ({self.replaced} of {self.budget} replacements used; "
                "--max-replacements)")

    def pending(self) -> str:
        """The jobs submitted and not seen to end, for a message: e.g. ``"2 worker job(s)
        submitted, none connected"``."""
        return f"{len(self.cluster.workers)} worker job(s) submitted, none connected"


class Watchdog:
    """Which workers of a cluster are alive; stops the run when none can be any more.

    Parameters
    ----------
    client : distributed.Client
        The run's client.
    timeout : float
        Seconds without any live worker after which the run stops.
    replacements : int, optional
        For a dask-jobqueue cluster, see :class:`JobFleet`.
    """

    def __init__(self, client: Any, timeout: float, replacements: int | None = None) -> None:
        self.client, self.timeout = client, float(timeout)
        cluster = getattr(client, "cluster", None)
        jobqueue = type(cluster).__module__.startswith("dask_jobqueue")
        self.fleet = JobFleet(cluster, replacements) if jobqueue else None
        self.last_alive = time.monotonic()

    def poll(self) -> dict[str, Any]:
        """The live workers, ``{address: name}``.

        Raises
        ------
        ClusterError
            The scheduler is gone, no worker has been alive for ``timeout`` seconds, or
            every job of a dask-jobqueue cluster has ended with no replacement left.
        """
        try:
            workers = self.client.scheduler_info()["workers"]
        except Exception as err:  # noqa: BLE001 - the scheduler is gone
            raise ClusterError(f"lost the Dask scheduler ({type(err).__name__}: {err}); the "
                               "unfinished run is kept (--resume continues it)") from None
        now = time.monotonic()
        if workers:
            self.last_alive = now
        if self.fleet is not None:
            self.fleet.poll()
            if not workers and self.fleet.exhausted:
                raise ClusterError(f"{self.fleet.describe()}; the unfinished run is kept "
                                   "(--resume continues it)")
        if not workers and now - self.last_alive > self.timeout:
            jobs = f" ({self.fleet.pending()})" if self.fleet is not None else ""
            raise ClusterError(f"no Dask worker has been alive for {self.timeout:.0f} s{jobs}; "
                               "the unfinished run is kept (--resume continues it; "
                               "--worker-timeout waits longer)")
        return {address: info.get("name") for address, info in workers.items()}

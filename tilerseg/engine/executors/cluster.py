"""Connecting to a ``dask.distributed`` cluster: local processes, a scheduler, or SLURM/PBS/LSF.

``--cluster local:N`` starts a ``LocalCluster`` of ``N`` worker processes with one Dask
thread each on the loopback interface; ``--scheduler tcp://HOST:PORT`` joins a running
one; ``--cluster slurm|pbs|lsf`` starts dask-jobqueue workers as batch jobs, configured
by dask-jobqueue's usual file (``~/.config/dask/jobqueue.yaml``) and the flags of
:class:`JobSpec`, which win over it. Each job runs one worker process, which uses all the
job's cores for torch and its GPU(s).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ...errors import ClusterError, InvalidArgumentError
from ..cores import available_cores

__all__ = ["JobSpec", "ClusterSpec", "connect", "import_jobqueue", "job_script",
           "parse_cluster"]

log = logging.getLogger(__name__)

_JOBQUEUE = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "lsf": "LSFCluster"}


def _local_worker_config() -> dict[str, Any]:
    """Dask settings for the worker processes of ``local:N``: they look at their memory
    every second, not ten times a second (the nanny's default), and at the system every
    two (there is no dashboard); and they start without the ``MALLOC_TRIM_THRESHOLD_``
    that distributed puts in their environment (glibc's own adaptive thresholds, as in a
    local run; see :func:`~tilerseg.engine.executors.plugin.keep_freed_memory` for workers
    started elsewhere)."""
    import dask
    import distributed  # noqa: F401 - loads distributed's defaults

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", None) or {})
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    return {"distributed.worker.memory.monitor-interval": "1s",
            "distributed.admin.system-monitor.interval": "2s",
            "distributed.nanny.pre-spawn-environ": environ}


@dataclass(frozen=True)
class JobSpec:
    """Batch-job resources for dask-jobqueue (None: from its configuration file).

    Attributes
    ----------
    jobs : int
        Jobs (one worker process each) to start.
    cores : int, optional
        Cores per job.
    memory : str, optional
        Memory per job, e.g. ``"32GB"``.
    walltime : str, optional
        Wall-clock limit per job, e.g. ``"04:00:00"``.
    gpus : int
        GPUs per job (0: none).
    queue, account : str, optional
        Partition/queue and account/project to charge.
    replacements : int, optional
        Worker jobs that end may be replaced by new ones up to this many times in all
        (default twice ``jobs``; see :class:`~tilerseg.engine.executors.fleet.JobFleet`).
    """

    jobs: int = 1
    cores: int | None = None
    memory: str | None = None
    walltime: str | None = None
    gpus: int = 0
    queue: str | None = None
    account: str | None = None
    replacements: int | None = None

    def directives(self, kind: str) -> list[str]:
        """Scheduler directives requesting the GPUs (empty without GPUs; PBS asks for them
        in its ``select`` statement instead)."""
        if not self.gpus or kind == "pbs":
            return []
        return {"slurm": [f"--gres=gpu:{self.gpus}"], "lsf": [f'-gpu "num={self.gpus}"']}[kind]


@dataclass(frozen=True)
class ClusterSpec:
    """Where a run's tasks go: ``kind`` is ``"local"``, ``"scheduler"`` or a batch system;
    ``worker_timeout``: seconds a run waits with no live worker before it stops."""

    kind: str
    workers: int = 1
    address: str | None = None
    job: JobSpec = JobSpec()
    worker_timeout: float = 300.0


def parse_cluster(cluster: str | None, scheduler: str | None,
                  job: JobSpec | None = None, worker_timeout: float = 300.0
                  ) -> ClusterSpec | None:
    """The cluster a command line asks for (None: run locally).

    Parameters
    ----------
    cluster : str, optional
        ``"local"``, ``"local:N"``, ``"slurm"``, ``"pbs"`` or ``"lsf"``.
    scheduler : str, optional
        The address of a running scheduler, ``tcp://HOST:PORT``.
    job : JobSpec, optional
        Batch-job resources (for slurm, pbs, lsf).
    worker_timeout : float
        Seconds a run waits with no live worker before it stops (> 0).

    Returns
    -------
    ClusterSpec or None

    Raises
    ------
    InvalidArgumentError
        Both given, or a value not understood.

    Examples
    --------
    >>> parse_cluster("local:3", None).workers
    3
    >>> parse_cluster(None, "tcp://10.0.0.1:8786").address
    'tcp://10.0.0.1:8786'
    """
    if cluster is not None and scheduler is not None:
        raise InvalidArgumentError("give --cluster or --scheduler, not both")
    if not worker_timeout > 0:
        raise InvalidArgumentError(
            f"--worker-timeout {worker_timeout!r} must be a positive number of seconds")
    if job is not None and job.replacements is not None and job.replacements < 0:
        raise InvalidArgumentError(
            f"--max-replacements {job.replacements} must be 0 or more")
    if scheduler is not None:
        if "://" not in scheduler:
            raise InvalidArgumentError(
                f"--scheduler {scheduler!r} must be an address like tcp://HOST:PORT")
        return ClusterSpec("scheduler", address=scheduler, worker_timeout=worker_timeout)
    if cluster is None:
        return None
    if cluster == "local" or cluster.startswith("local:"):
        _, _, count = cluster.partition(":")
        try:
            workers = int(count) if count else available_cores()
        except ValueError:
            workers = 0
        if workers < 1:
            raise InvalidArgumentError(f"--cluster {cluster!r} must be local:N with N >= 1")
        return ClusterSpec("local", workers=workers, worker_timeout=worker_timeout)
    if cluster in _JOBQUEUE:
        return ClusterSpec(cluster, workers=(job or JobSpec()).jobs, job=job or JobSpec(),
                           worker_timeout=worker_timeout)
    raise InvalidArgumentError(
        f"--cluster {cluster!r} is not understood; expected local:N, slurm, pbs or lsf")


def import_jobqueue(kind: str = "slurm") -> Any:
    """``dask_jobqueue``, imported without letting it take SIGINT: importing it installs a
    SIGINT handler that calls ``sys.exit()`` (``dask_jobqueue.runner``), which would turn
    Ctrl-C into an exit without clean-up; the handler in place before is put back. Import
    it in the main thread first (a thread cannot set signal handlers).

    Raises
    ------
    InvalidArgumentError
        dask-jobqueue is not installed.
    """
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        import dask_jobqueue
    except ImportError:
        raise InvalidArgumentError(
            f"--cluster {kind} needs dask-jobqueue (pip install 'tilerseg[cluster]')"
        ) from None
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGINT, previous)
    return dask_jobqueue


def _jobqueue_cluster(spec: ClusterSpec, **extra: Any) -> Any:
    dask_jobqueue = import_jobqueue(spec.kind)
    import dask

    job = spec.job
    # the scheduler's dashboard on a free port unless configured: the default, 8787, is
    # taken by any other cluster on the host (and distributed then warns)
    options = dict(dask.config.get(f"jobqueue.{spec.kind}.scheduler-options", None) or {})
    options.setdefault("dashboard_address", ":0")
    kwargs: dict[str, Any] = {"processes": 1, "scheduler_options": options, **extra}
    for name in ("memory", "walltime", "queue"):
        if getattr(job, name) is not None:
            kwargs[name] = getattr(job, name)
    if job.account is not None:  # LSF calls it the project
        kwargs["project" if spec.kind == "lsf" else "account"] = job.account
    # the job books all its cores and its worker runs one claiming pipeline with all of
    # them (SLURM_CPUS_PER_TASK); one Dask thread is enough for that one long Dask task
    cores = job.cores or dask.config.get(f"jobqueue.{spec.kind}.cores", None)
    if cores is not None:
        kwargs["cores"] = 1
        if spec.kind == "slurm":
            kwargs["job_cpu"] = int(cores)
        elif spec.kind == "lsf":
            kwargs["ncpus"] = int(cores)
        else:  # PBS: the resource request names the cores
            kwargs["resource_spec"] = _pbs_resources(int(cores), kwargs.get(
                "memory") or dask.config.get("jobqueue.pbs.memory", None), job.gpus)
    directives = job.directives(spec.kind)
    if directives:
        kwargs["job_extra_directives"] = directives
    try:
        return getattr(dask_jobqueue, _JOBQUEUE[spec.kind])(**kwargs)
    except ValueError as err:  # e.g. cores or memory neither given nor configured
        raise InvalidArgumentError(f"--cluster {spec.kind}: {err}") from None


def _pbs_resources(cores: int, memory: str | None, gpus: int) -> str:
    """A PBS Pro ``select`` statement for one worker job."""
    spec = f"select=1:ncpus={cores}"
    if memory:
        from dask.utils import parse_bytes

        spec += f":mem={-(-parse_bytes(memory) // 2**30)}GB"
    if gpus:
        spec += f":ngpus={gpus}"
    return spec


def job_script(spec: ClusterSpec) -> str:
    """The batch script dask-jobqueue would submit for each worker job.

    Parameters
    ----------
    spec : ClusterSpec
        A batch-system cluster (slurm, pbs, lsf).

    Returns
    -------
    str
        The script (nothing is submitted).
    """
    cluster = _jobqueue_cluster(spec)
    try:
        return str(cluster.job_script())
    finally:
        cluster.close()


@contextlib.contextmanager
def connect(spec: ClusterSpec) -> Iterator[Any]:
    """A ``distributed.Client`` on the cluster of ``spec``, closed (with the cluster) after.

    Parameters
    ----------
    spec : ClusterSpec
        What to start or join: ``local`` starts a ``LocalCluster`` on loopback (one Dask
        thread per worker process), a batch system submits ``spec.workers`` jobs,
        ``scheduler`` connects to ``spec.address``.

    Yields
    ------
    distributed.Client
    """
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise InvalidArgumentError(
            "a cluster needs dask.distributed (pip install 'tilerseg[cluster]')") from None
    cluster = None
    if spec.kind == "scheduler":
        try:
            client = Client(spec.address, timeout="30s")
        except OSError as err:
            raise InvalidArgumentError(
                f"--scheduler {spec.address}: cannot connect ({err})") from None
    else:
        if spec.kind == "local":
            import dask

            with dask.config.set(_local_worker_config()):
                cluster = LocalCluster(n_workers=spec.workers, threads_per_worker=1,
                                       processes=True, host="127.0.0.1",
                                       dashboard_address=":0")  # None binds 8787
        else:
            cluster = _jobqueue_cluster(spec)
            cluster.scale(jobs=spec.workers)
        client = Client(cluster)
        if spec.kind == "local":
            try:
                client.wait_for_workers(spec.workers, timeout=spec.worker_timeout)
            except TimeoutError:
                client.close()
                cluster.close()
                raise ClusterError(f"--cluster local:{spec.workers}: the worker processes did "
                                   f"not start within {spec.worker_timeout:.0f} s") from None
    log.info("cluster: %s", client)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()

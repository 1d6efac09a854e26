"""The pipeline of one process, and the local executor that runs a whole run through it.

:func:`run_pipelined` is the one tile path of every executor: the local run, each job of a
job array and each worker process of a Dask cluster claim their tasks and compute them
through it, with the same bounded queues, batches and threads.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ..compute import replicate
from ..cores import available_cores
from ..device import cpu_budget, torch_threads
from ..pipeline import StageTimes
from ..tasks import Work, first_and_rest, run_tasks

__all__ = ["LocalExecutor", "run_pipelined"]

log = logging.getLogger(__name__)


def run_pipelined(works: Iterable[Work], *, cores: int | None = None,
                  workers: int | None = None,
                  progress: Callable[[int], None] | None = None, isolate: bool = False,
                  record: dict | None = None, should_stop: Callable[[], bool] | None = None,
                  worker: str | None = None) -> StageTimes:
    """Claim and compute tasks of ``works`` in this process: readers, one compute thread per
    model worker, writers (see :func:`~tilerseg.engine.tasks.run_tasks`).

    On the CPU, ``workers`` forward passes run at once with ``threads`` torch threads each
    (by default 2 x ``cores`` / 2, see :func:`~tilerseg.engine.device.cpu_budget`); on GPUs
    one replica per device. The options come from the first work's run options. When the
    pipeline stops, each work's run gets a record of what this process did
    (:meth:`~tilerseg.engine.workdir.WorkDir.record_worker`): its tasks and tiles, its stage
    times (when it computed one run only) and the runtime that ran the model.

    Parameters
    ----------
    works : iterable of Work
        Consumed lazily.
    cores : int, optional
        The cores this process may use (default :func:`~tilerseg.engine.cores.available_cores`;
        a cluster worker passes its share of its host).
    workers : int, optional
        Model workers on the CPU (default: the run's options, see
        :func:`~tilerseg.engine.device.cpu_budget`).
    progress, isolate, record, should_stop
        As for :func:`~tilerseg.engine.tasks.run_tasks`.
    worker : str, optional
        What this process is, for its records (e.g. ``"shard 2/3"``, a Dask worker's name).

    Returns
    -------
    StageTimes
    """
    first, works = first_and_rest(works)
    if first is None:
        return StageTimes()
    p = first.context.p
    runner, options = p.runner, p.options
    cpu = p.device.type == "cpu"
    cores = cores or available_cores()
    threads = None
    if cpu:
        count, threads = cpu_budget(workers or options.workers, options.threads, cores=cores,
                                    ndim=p.model_geometry.ndim)
        replicas = [runner.replica] * count
    else:
        replicas = [runner.replica] + replicate(
            runner.model, p.devices[1:], runner.model_ndim, options.precision,
            options.compile, views=runner.views)
    # I/O threads mostly wait on the queues; decoding and compressing release the GIL. Two
    # even for a worker process with one core's share: with one, its model waited for
    # input 0.9 s against 0.5 s in a 4096^2 run on 2 cores (two processes)
    machine = os.cpu_count() or 1
    readers = min(2, machine) if cpu else max(2, min(8, machine // (2 * len(replicas))))
    seen: list[Work] = []
    names: dict[int, str | None] = {}  # id(work) -> this process's record of it

    given: dict[int, Callable[[Work], None] | None] = {}  # id(work) -> its on_complete

    def recording(work: Work) -> Callable[[Work], None]:
        """``on_complete`` that first leaves this process's record (a commit that follows
        at once, here or in a cluster's client, finds it), then does what it did."""
        then = given[id(work)] = work.on_complete

        def on_complete(w: Work) -> None:
            names[id(w)] = _record([w], None, started, worker, record, replicas[0]).get(id(w))
            if then is not None:
                then(w)
        return on_complete

    def track(items: Iterable[Work]) -> Iterable[Work]:
        for work in items:
            seen.append(work)
            work.on_complete = recording(work)
            yield work

    started = time.time()
    times: StageTimes | None = None  # None: the pipeline stopped or failed
    try:
        with torch_threads(threads):
            for r in replicas[: 1 if cpu else None]:  # the CPU's workers share one replica
                r.warm_up(runner.model_window, p.geometry.in_channels, p.batch_size,
                          streams=len(replicas) if cpu else 1,
                          threads=len(replicas) * threads if cpu else None)
            log.info("pipeline: %d reader(s), %d compute worker(s) on %s%s with %s, %d "
                     "writer(s)", readers, len(replicas), ", ".join(str(d) for d in p.devices),
                     f" x {torch.get_num_threads()} thread(s)" if cpu else "",
                     runner.replica.engine, readers)
            times = run_tasks(track(works), replicas, readers=readers, writers=readers,
                              progress=progress, isolate=isolate, record=record,
                              should_stop=should_stop)
        log.info("pipeline: %s", times.summary())
        return times
    finally:  # the stage times, where this process computed one run; the other records
        single = times if len(seen) == 1 else None
        _record([w for w in seen if id(w) not in names or single is not None], single,
                started, worker, record, replicas[0], names)
        for work in seen:  # the works as they were given
            work.on_complete = given[id(work)]


def _record(works: Sequence[Work], times: StageTimes | None, started: float,
            worker: str | None, record: dict | None, replica: Any,
            names: dict[int, str | None] | None = None) -> dict[int, str]:
    """Leave in each run's work directory what this process did on it (replacing the
    records ``names`` gives), with the runtime of ``replica`` (the pipeline's, which every
    run after the first uses too); the records' names."""
    written: dict[int, str] = {}
    for work in works:
        if not work.computed:
            continue
        info: dict[str, Any] = {
            "worker": worker or f"{socket.gethostname()}:{os.getpid()}",
            "tasks": sorted(work.computed), "tiles": work.tiles,
            "start": started, "end": time.time(), **(record or {})}
        info["runtime"] = {"engine": replica.engine, "precision": replica.runtime_precision,
                           "device": str(replica.device)}
        int8 = replica.int8
        if int8 is not None:
            info["runtime"]["int8"] = int8
        if times is not None:  # the stage times of this run alone
            info["times"] = times.as_dict()
        try:
            written[id(work)] = work.context.work.record_worker(
                name=(names or {}).get(id(work)), **info)
        except OSError as err:  # the run goes on without this record
            log.warning("cannot record what this process did in %s: %s",
                        work.context.work.path, err)
    return written


class LocalExecutor:
    """Threads in this process (:func:`run_pipelined`): readers, one compute thread per
    model worker, writers.
    """

    name = "pipeline"
    waits_for_all = True  # every thread has stopped when run() returns or raises

    def plan_device(self, requested: str | tuple[str, ...]) -> str | None:
        """None: the model runs in this process."""
        return None

    def map(self, fn: Callable[..., Any], items: list) -> list:
        """``fn(*item)`` for each item, on threads of this process."""
        from ..instances import local_mapper

        return local_mapper(fn, items)

    def run(self, works: Iterable[Work], *, progress: Callable[[int], None] | None = None,
            isolate: bool = False, record: dict | None = None) -> StageTimes:
        """Claim and run the tasks of ``works`` here (see :func:`run_pipelined`)."""
        return run_pipelined(works, progress=progress, isolate=isolate, record=record)

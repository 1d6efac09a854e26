"""The local executor: every task of a run through one pipeline of threads."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ..compute import replicate
from ..device import cpu_budget, torch_threads
from ..pipeline import StageTimes
from ..tasks import Work, first_and_rest, run_tasks

__all__ = ["LocalExecutor"]

log = logging.getLogger(__name__)


class LocalExecutor:
    """Threads in this process: readers, one compute thread per model worker, writers.

    On the CPU, ``workers`` forward passes run at once with ``threads`` torch threads
    each (by default 2 x cores / 2, see :func:`~tilerseg.engine.device.cpu_budget`); on GPUs
    one replica per device. The options come from the first work's run options.
    """

    name = "pipeline"
    waits_for_all = True  # every thread has stopped when run() returns or raises

    def select(self, task_ids: Sequence[int]) -> list[int]:
        """All of them."""
        return list(task_ids)

    def plan_device(self, requested: str | tuple[str, ...]) -> str | None:
        """None: the model runs in this process."""
        return None

    def map(self, fn: Callable[..., Any], items: list) -> list:
        """``fn(*item)`` for each item, on threads of this process."""
        from ..instances import local_mapper

        return local_mapper(fn, items)

    def run(self, works: Iterable[Work], *, progress: Callable[[int], None] | None = None,
            isolate: bool = False, record: dict | None = None) -> StageTimes:
        """Run the tasks of ``works`` (see :func:`~tilerseg.engine.tasks.run_tasks`)."""
        first, works = first_and_rest(works)
        if first is None:
            return StageTimes()
        p = first.context.p
        runner, options = p.runner, p.options
        cpu = p.device.type == "cpu"
        threads = None
        if cpu:
            workers, threads = cpu_budget(options.workers, options.threads)
            replicas = [runner.replica] * workers
        else:
            replicas = [runner.replica] + replicate(
                runner.model, p.devices[1:], runner.model_ndim, options.precision,
                options.compile)
        many = os.cpu_count() or 1
        # I/O threads mostly wait on the queues; decoding and compressing release the GIL
        readers = min(2, many) if cpu else max(2, min(8, many // (2 * len(replicas))))
        with torch_threads(threads):
            for r in replicas[: 1 if cpu else None]:  # the CPU's workers share one replica
                r.warm_up(runner.model_window, p.geometry.in_channels, p.batch_size,
                          streams=len(replicas) if cpu else 1,
                          threads=len(replicas) * threads if cpu else None)
            log.info("pipeline: %d reader(s), %d compute worker(s) on %s%s with %s, %d "
                     "writer(s)", readers, len(replicas), ", ".join(str(d) for d in p.devices),
                     f" x {torch.get_num_threads()} thread(s)" if cpu else "",
                     runner.replica.engine, readers)
            times = run_tasks(works, replicas, readers=readers, writers=readers,
                              progress=progress, isolate=isolate, record=record)
        log.info("pipeline: %s", times.summary())
        return times

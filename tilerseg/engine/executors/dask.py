"""The Dask executor: one Dask task per task, on Dask's local threads or on a cluster.

With a ``distributed.Client`` every task is submitted as plain data
(:class:`~tilerseg.engine.jobs.Task`, a few hundred bytes) to
:func:`tilerseg.engine.worker.run_task`. Each worker process loads the model once
(:class:`~tilerseg.engine.executors.plugin.ModelPlugin`, registered on the client),
reopens the input itself and writes whole chunks straight into the shared output, then
the task's completion record. Failed tasks are retried (``retries``); the tasks of a
worker that dies are rescheduled by Dask on the others. The client commits.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import dask
from dask.callbacks import Callback

from ...errors import ClusterError, InvalidArgumentError, TilersegError
from ...models.checkpoint import model_to_bytes, weights_digest
from ..device import cpu_budget, torch_threads
from ..options import RUNTIME_OPTIONS
from ..pipeline import StageTimes
from ..tasks import Work, complete
from ..worker import forget_context, run_task, share_context, share_model

__all__ = ["DaskExecutor"]

log = logging.getLogger(__name__)


def _local_error(err: BaseException, key: Any) -> BaseException:
    """A task's error as the caller should see it: tilerseg's own errors and OSErrors as
    they are, a failure of the cluster itself (a worker killed too often...) as a
    :class:`~tilerseg.errors.ClusterError`."""
    if isinstance(err, (TilersegError, OSError)):
        return err
    reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return ClusterError(f"task {key} failed on the cluster: {type(err).__name__}: {reason}")


class DaskExecutor:
    """Run each task as one Dask task.

    Parameters
    ----------
    client : distributed.Client, optional
        The cluster to run on. Without one, Dask's local threaded scheduler runs the
        tasks in this process (``workers`` threads of the run's options).
    retries : int
        How often a failed task is retried on a cluster before the run fails.
    """

    def __init__(self, client: Any = None, retries: int = 2) -> None:
        self.client, self.retries = client, retries
        self.waits_for_all = False  # Dask does not wait for running tasks when one fails
        self.name = "dask" if client is None else "dask.distributed"
        self._plugins: set[str] = set()

    def select(self, task_ids: Sequence[int]) -> list[int]:
        """All of them."""
        return list(task_ids)

    def plan_device(self, requested: str | tuple[str, ...]) -> str | None:
        """Where the workers of a cluster run the model (None without a cluster, where it
        runs in this process): ``"cuda"`` when the device asked for is a GPU, or ``"auto"``
        and the workers have GPUs; else ``"cpu"``."""
        if self.client is None:
            return None
        names = [requested] if isinstance(requested, str) else list(requested)
        if all(n.split(":")[0] == "cpu" for n in names):
            return "cpu"
        if any(n.startswith("cuda") for n in names):
            return "cuda"
        from .plugin import cuda_available

        has_gpu = self.client.run(cuda_available)
        return "cuda" if any(has_gpu.values()) else "cpu"

    def run(self, works: Iterable[Work], *, progress: Callable[[int], None] | None = None,
            isolate: bool = False, record: dict | None = None) -> StageTimes:
        """Run the tasks of ``works``; see :class:`~tilerseg.engine.executors.Executor`."""
        start = time.perf_counter()
        if self.client is None:
            computed = self._run_threads(works, progress, isolate, record)
        else:
            computed = self._run_cluster(works, progress, isolate, record)
        return StageTimes(wall=time.perf_counter() - start, tiles=computed)

    def map(self, fn: Callable[..., Any], items: list) -> list:
        """``fn(*item)`` for each item: on the cluster's workers (retried like the tasks),
        else on threads here."""
        if self.client is None:
            from ..instances import local_mapper

            return local_mapper(fn, items)
        futures = self.client.map(fn, *zip(*items), retries=self.retries, pure=False)
        try:
            return self.client.gather(futures)
        except Exception as err:  # noqa: BLE001 - named as a cluster failure
            raise _local_error(err, "instances") from err
        finally:
            self.client.cancel([f for f in futures if not f.done()])

    # -- Dask's local threads ---------------------------------------------------------

    def _run_threads(self, works: Iterable[Work], progress: Callable[[int], None] | None,
                     isolate: bool, record: dict | None) -> int:
        total, computed = [0], [0]
        lock = threading.Lock()

        class _Progress(Callback):
            def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, id: Any) -> None:
                if isinstance(result, dict) and "tiles" in result:
                    with lock:
                        total[0] += result["tiles"]
                        computed[0] += result["computed"]
                        done = total[0]
                    if progress is not None:
                        progress(done)

        for work in works:
            ctx = work.context
            share_model(ctx.p.model, ctx.p.options)
            share_context(ctx)
            workers, threads = cpu_budget(ctx.p.options.workers, ctx.p.options.threads)
            if ctx.p.device.type != "cpu":
                threads = None
            tasks = [dask.delayed(run_task, pure=False)(t, record)
                     for t in ctx.tasks(work.task_ids)]
            try:
                with torch_threads(threads), _Progress():
                    results = dask.compute(*tasks, scheduler="threads", num_workers=workers)
            except Exception as err:  # noqa: BLE001
                if not isolate:
                    raise
                work.error = err
                continue
            finally:
                forget_context(ctx)
            work.tiles += sum(r["tiles"] for r in results)
            complete(work, isolate)
        return computed[0]

    # -- a dask.distributed cluster ---------------------------------------------------------

    def _register(self, work: Work) -> None:
        """Load the run's model on every worker once (and on workers joining later)."""
        from .plugin import ModelPlugin, host_of

        p = work.context.p
        name = f"tilerseg-model-{weights_digest(p.model)[:16]}"
        if name in self._plugins:
            return
        try:
            data = model_to_bytes(p.model)
        except Exception as err:  # not a registered architecture
            raise InvalidArgumentError(
                f"a cluster run needs a model from tilerseg.create_model or load_model "
                f"({err})") from None
        options = {k: getattr(p.options, k) for k in RUNTIME_OPTIONS}
        per_host: dict[str, int] = {}
        for address in self.client.scheduler_info().get("workers", {}):
            per_host[host_of(address)] = per_host.get(host_of(address), 0) + 1
        self.client.register_plugin(ModelPlugin(data, options, p.options.threads, per_host),
                                    name=name)
        self._plugins.add(name)
        log.info("cluster: model %s loaded on the workers", name)

    def _run_cluster(self, works: Iterable[Work], progress: Callable[[int], None] | None,
                     isolate: bool, record: dict | None) -> int:
        from distributed import as_completed

        run = uuid.uuid4().hex[:8]
        owner: dict[str, Work] = {}
        left: dict[int, int] = {}
        futures = []
        for work in works:
            ctx = work.context
            if ctx.image is None:
                raise InvalidArgumentError(
                    "an in-memory image cannot be sent to a cluster: save it (np.save, "
                    "tifffile.imwrite or zarr) and pass its path")
            self._register(work)
            left[id(work)] = len(work.task_ids)
            if not work.task_ids:
                complete(work, isolate)
            for task in ctx.tasks(work.task_ids):
                key = f"tilerseg-{run}-{len(futures)}-task-{task.task_id}"
                future = self.client.submit(run_task, task, record, key=key,
                                            retries=self.retries, pure=False)
                owner[future.key] = work
                futures.append(future)
        tiles = computed = 0
        try:
            for future in as_completed(futures):
                work = owner[future.key]
                if future.status != "finished":
                    err = _local_error(future.exception(), future.key)
                    if not isolate:
                        raise err
                    work.error = work.error or err
                    continue
                result = future.result()
                tiles += result["tiles"]
                computed += result["computed"]
                work.tiles += result["tiles"]
                if progress is not None:
                    progress(tiles)
                left[id(work)] -= 1
                if left[id(work)] == 0 and work.error is None:
                    complete(work, isolate)
        finally:
            self.client.cancel([f for f in futures if not f.done()])
            for name in self._plugins:  # the workers forget the model again
                self.client.unregister_worker_plugin(name)
            self._plugins.clear()
        return computed

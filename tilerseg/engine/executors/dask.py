"""The Dask executor: one claiming pipeline per worker, on Dask's local threads or a cluster.

With a ``distributed.Client`` every run is sent as plain data
(:class:`~tilerseg.engine.jobs.RunRef`, a few hundred bytes) to
:func:`tilerseg.engine.worker.run_claims`, one long Dask task per worker process, pinned
to it. Each worker process loads the model once
(:class:`~tilerseg.engine.executors.plugin.ModelPlugin`, registered on the client),
reopens the input itself, claims tasks one at a time in the run's work directory and
computes them through the same pipeline as a local run (reading, the model and writing
overlapped), writing whole chunks straight into the shared output, then each task's
completion record. A worker that joins later gets a loop of its own; the claims of a
worker that dies are taken over by the others. The client commits.

The client never waits forever: when no worker has been alive for ``worker_timeout``
seconds, or a dask-jobqueue cluster's jobs have all ended and may not be replaced any more
(:class:`~tilerseg.engine.executors.fleet.Watchdog`), or live workers have neither
recorded nor claimed a task for ``worker_timeout`` seconds (stuck), it stops with a
:class:`~tilerseg.errors.ClusterError` naming the cause; the unfinished run is kept for
``--resume``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import dask

from ...errors import ClusterError, InvalidArgumentError, TilersegError
from ...models.checkpoint import model_to_bytes, weights_digest
from ..device import cpu_budget, torch_threads
from ..options import RUNTIME_OPTIONS
from ..pipeline import StageTimes
from ..tasks import Work, complete
from ..worker import run_claims, share_model

__all__ = ["DaskExecutor", "WORKER_TIMEOUT"]

log = logging.getLogger(__name__)

WORKER_TIMEOUT = 300.0
"""Seconds a cluster run waits with no live worker before it stops (``--worker-timeout``)."""

POLL = 0.5
"""Seconds between the client's looks at its workers, their loops and the runs."""

_GRACE = 30.0
"""Seconds the client waits for the workers' loops to end once every task is recorded."""


def _local_error(err: BaseException, what: str) -> BaseException:
    """A worker's error as the caller should see it: tilerseg's own errors and OSErrors as
    they are, a failure of the cluster itself as a :class:`~tilerseg.errors.ClusterError`."""
    if isinstance(err, (TilersegError, OSError)):
        return err
    reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return ClusterError(f"{what} failed on the cluster: {type(err).__name__}: {reason}")


class DaskExecutor:
    """Run the tasks in claiming pipelines, one per worker process (or per thread).

    Parameters
    ----------
    client : distributed.Client, optional
        The cluster to run on. Without one, Dask's local threaded scheduler runs
        ``workers`` pipelines (of the run's options) in this process.
    retries : int
        How often a worker's loop that failed for a reason of the cluster (not an error
        of the input or the output) is started again before the run fails.
    worker_timeout : float
        Seconds the run waits with no live worker before it stops (see the module notes).
    replacements : int, optional
        For a dask-jobqueue cluster: how many worker jobs that ended may be replaced by
        new ones (default twice the jobs asked for).
    """

    def __init__(self, client: Any = None, retries: int = 2,
                 worker_timeout: float = WORKER_TIMEOUT, replacements: int | None = None
                 ) -> None:
        if worker_timeout <= 0:
            raise InvalidArgumentError(
                f"worker_timeout={worker_timeout!r} must be a positive number of seconds")
        self.client, self.retries = client, retries
        self.worker_timeout, self.replacements = float(worker_timeout), replacements
        self.waits_for_all = False  # Dask does not wait for running tasks when one fails
        self.name = "dask" if client is None else "dask.distributed"
        self._plugins: set[str] = set()

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

        try:  # ask a worker: wait for the first one (a batch job may still be queued)
            self.client.wait_for_workers(1, timeout=self.worker_timeout)
        except TimeoutError:
            raise ClusterError(f"no Dask worker started within {self.worker_timeout:.0f} s "
                               "(--worker-timeout)") from None
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
        else on threads here. On a cluster it stops with a
        :class:`~tilerseg.errors.ClusterError` when no worker has been alive for
        ``worker_timeout`` seconds, as a run does."""
        if self.client is None:
            from ..instances import local_mapper

            return local_mapper(fn, items)
        from distributed import wait

        from .fleet import Watchdog

        futures = self.client.map(fn, *zip(*items), retries=self.retries, pure=False)
        watchdog = Watchdog(self.client, self.worker_timeout, self.replacements)
        try:
            while True:  # never wait forever: stop when no worker is left to compute them
                try:
                    wait(futures, timeout=POLL)
                    break
                except (TimeoutError, asyncio.TimeoutError):  # distinct before Python 3.11
                    watchdog.poll()
            return self.client.gather(futures)
        except Exception as err:  # noqa: BLE001 - named as a cluster failure
            raise _local_error(err, "the instance pass") from err
        finally:
            self.client.cancel([f for f in futures if not f.done()])

    # -- Dask's local threads ---------------------------------------------------------

    def _run_threads(self, works: Iterable[Work], progress: Callable[[int], None] | None,
                     isolate: bool, record: dict | None) -> int:
        """``workers`` claiming pipelines at once on Dask's threaded scheduler, each with
        its share of the cores."""
        computed = 0
        for work in works:
            ctx = work.context
            share_model(ctx.p.model, ctx.p.options)
            workers, threads = cpu_budget(ctx.p.options.workers, ctx.p.options.threads,
                                          ndim=ctx.p.model_geometry.ndim)
            if ctx.p.device.type != "cpu":
                workers, threads = 1, None
            stopping = threading.Event()  # set if this thread is interrupted
            loops = [dask.delayed(run_claims, pure=False)(
                [ctx.ref()], record, isolate=isolate, contexts=[ctx], cores=threads,
                workers=1, should_stop=stopping.is_set) for _ in range(workers)]
            done = threading.Event()
            watcher = threading.Thread(target=_report, args=(work, progress, done),
                                       daemon=True)
            watcher.start()
            try:
                with torch_threads(threads):
                    results = dask.compute(*loops, scheduler="threads", num_workers=workers)
            except Exception as err:  # noqa: BLE001
                if not isolate:
                    raise
                work.error = err
                continue
            finally:
                stopping.set()
                done.set()
                watcher.join()
            computed += _apply(list(results), [work], isolate)
            _commit_finished([work], isolate)
        return computed

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
        self.client.register_plugin(ModelPlugin(data, options, per_host), name=name)
        self._plugins.add(name)
        log.info("cluster: model %s loaded on the workers", name)

    def _run_cluster(self, works: Iterable[Work], progress: Callable[[int], None] | None,
                     isolate: bool, record: dict | None) -> int:
        from distributed import Event, wait

        from .fleet import Watchdog

        works = list(works)
        refs = []
        for work in works:
            if work.context.image is None:
                raise InvalidArgumentError(
                    "an in-memory image cannot be sent to a cluster: save it (np.save, "
                    "tifffile.imwrite or zarr) and pass its path")
            self._register(work)
            refs.append(work.context.ref())
        run = uuid.uuid4().hex[:8]
        stop = Event(f"tilerseg-stop-{run}", client=self.client)
        watchdog = Watchdog(self.client, self.worker_timeout, self.replacements)
        loops: dict[str, Any] = {}  # worker address -> its loop (a future)
        counts = {"submitted": 0, "restarts": 0, "computed": 0, "shown": -1}

        def submit(address: str) -> None:
            counts["submitted"] += 1
            key = f"tilerseg-{run}-{counts['submitted']}-{re.sub(r'[^0-9A-Za-z]+', '-', address)}"
            loops[address] = self.client.submit(
                run_claims, refs, record, isolate=isolate, stop=stop.name, key=key,
                workers=[address], allow_other_workers=False, pure=False)

        def restart(address: str, why: str) -> None:
            if counts["restarts"] >= self.retries:
                raise ClusterError(f"the loop of worker {address} {why}, "
                                   f"{self.retries + 1} times; the unfinished run is kept "
                                   "(--resume continues it)")
            counts["restarts"] += 1
            log.warning("cluster: the loop of worker %s %s; starting it again", address, why)

        def collect(address: str, future: Any) -> None:
            """A loop that ended: its result folded into the works, or its error raised
            (or the loop started again, next time round, for a failure of the cluster)."""
            del loops[address]
            if future.status == "cancelled":  # e.g. the client reconnected: submit again
                return
            if future.status == "finished":
                result = future.result()
                counts["computed"] += _apply([result], works, isolate)
                if not all(w.complete or w.error is not None for w in works) and \
                        not any(r.get("tasks") for r in result.get("runs", {}).values()):
                    restart(address, "ended without finishing the run or computing a task")
                return
            err = future.exception()
            if isinstance(err, (TilersegError, OSError)):
                raise err
            restart(address, f"failed ({_local_error(err, 'it')})")

        recorded_at = None  # when every run was first seen complete or failed
        active = time.monotonic()  # when a task was last seen recorded or claimed
        try:
            while True:
                tiles = _commit_finished(works, isolate)
                if tiles != counts["shown"] or _claimed(works):
                    active = time.monotonic()
                if progress is not None and tiles != counts["shown"]:
                    progress(tiles)
                counts["shown"] = tiles
                done = all(w.complete or w.error is not None for w in works)
                if done:  # the loops end within a poll or two (they leave their records)
                    recorded_at = recorded_at or time.monotonic()
                    if not loops or time.monotonic() - recorded_at > _GRACE:
                        break
                    alive = dict.fromkeys(loops)
                else:
                    alive = watchdog.poll()  # raises ClusterError when nothing can run
                    if time.monotonic() - active > self.worker_timeout:  # alive, yet idle
                        raise ClusterError(
                            f"the cluster's {len(alive)} worker(s) have neither recorded nor "
                            f"claimed a task for {self.worker_timeout:.0f} s; the unfinished "
                            "run is kept (--resume continues it; --worker-timeout waits "
                            "longer)")
                for address, future in list(loops.items()):
                    if future.done():
                        collect(address, future)
                    elif address not in alive:  # its worker is gone: its claims go stale
                        future.cancel()
                        del loops[address]
                if not done:  # every live worker runs a loop until the runs are done
                    for address in sorted(set(alive) - set(loops)):
                        submit(address)
                if loops:  # wake up as soon as a loop ends (the last one: the run is done)
                    try:
                        wait(list(loops.values()), timeout=POLL, return_when="FIRST_COMPLETED")
                    except (TimeoutError, asyncio.TimeoutError):  # distinct before Python 3.11
                        pass
                else:
                    time.sleep(POLL)
        finally:
            stop.set()
            self.client.cancel([f for f in loops.values() if not f.done()])
            for name in self._plugins:  # the workers forget the model again
                self.client.unregister_worker_plugin(name)
            self._plugins.clear()
        return counts["computed"]


def _claimed(works: list[Work]) -> bool:
    """Whether a task of an unfinished work is claimed now (someone computes it)."""
    for work in works:
        if work.complete or work.error is not None:
            continue
        try:
            if any(n.isdigit() for n in os.listdir(work.context.work.claims_dir)):
                return True
        except FileNotFoundError:
            continue
    return False


def _commit_finished(works: list[Work], isolate: bool) -> int:
    """Complete (``on_complete``: commit) each work whose tasks are all recorded; the tiles
    of the recorded tasks of all works (for the progress)."""
    tiles = 0
    for work in works:
        wd = work.context.work
        if work.complete or not wd.path.is_dir():  # committed here, or by someone else
            tiles += wd.grid.tiles_of(work.task_ids)
            continue
        done = wd.done()
        tiles += wd.grid.tiles_of(k for k in work.task_ids if k in done)
        if work.error is None and len(done) == len(wd.grid):
            work._completed = True
            complete(work, isolate)
    return tiles


def _apply(results: list[dict[str, Any]], works: list[Work], isolate: bool) -> int:
    """Fold the workers' results into ``works`` (tiles written, errors); returns the tiles
    that ran the model."""
    by_path = {str(w.context.work.path): w for w in works}
    computed = 0
    for result in results:
        computed += int(result.get("times", {}).get("tiles", 0))
        for path, run in result.get("runs", {}).items():
            work = by_path.get(path)
            if work is None:
                continue
            work.tiles += int(run.get("tiles", 0))
            if run.get("error") and work.error is None and not work.complete:
                work.error = ClusterError(f"{run['error']} (on {result.get('worker')})")
                if not isolate:
                    raise work.error
    return computed


def _report(work: Work, progress: Callable[[int], None] | None,
            done: threading.Event) -> None:
    """Report the recorded tiles of ``work`` every :data:`POLL` seconds until ``done``."""
    if progress is None:
        return
    last = -1
    while not done.wait(POLL):
        wd = work.context.work
        recorded = wd.done()
        tiles = wd.grid.tiles_of(k for k in work.task_ids if k in recorded)
        if tiles != last:
            last = tiles
            progress(tiles)

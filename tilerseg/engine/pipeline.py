"""A pipelined executor: read, compute and write stages joined by bounded queues.

Reader threads turn batches of tiles into host tensors, one compute thread per model
worker (a GPU, or a share of the CPU cores) runs the model, and writer threads store
the results, all at once on different batches. The queues between the stages are
bounded, so a slow stage holds the others back (back-pressure) and memory stays at a
few batches in flight whatever the image size.

A failure in any stage stops every stage promptly: each blocking queue operation polls
a shared stop flag, so no thread waits forever on a queue whose other end has died.
The first error is re-raised in the calling thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Direct", "StageTimes", "merge_profile", "run_attributes", "run_pipeline"]

log = logging.getLogger(__name__)

_POLL = 0.05  # seconds between checks of the stop flag while blocked on a queue
_END = object()  # end-of-stream marker


@dataclass
class StageTimes:
    """Where a pipelined run spent its time.

    Busy times are summed over each stage's threads; ``starved`` is how long compute
    workers waited for input, ``blocked`` how long they waited for room downstream.
    """

    wall: float = 0.0
    read: float = 0.0
    compute: float = 0.0
    write: float = 0.0
    starved: float = 0.0
    blocked: float = 0.0
    batches: int = 0
    tiles: int = 0
    compute_workers: int = 1

    @property
    def model_share(self) -> float:
        """Fraction of the compute workers' wall time spent in the model."""
        return self.compute / (self.wall * self.compute_workers) if self.wall > 0 else 0.0

    def as_dict(self) -> dict[str, float | int]:
        """Plain values in seconds (rounded), for metadata and logs."""
        out: dict[str, float | int] = {
            k: round(getattr(self, k), 3)
            for k in ("wall", "read", "compute", "write", "starved", "blocked")
        }
        out.update(batches=self.batches, tiles=self.tiles,
                   compute_workers=self.compute_workers,
                   model_share=round(self.model_share, 3))
        return out

    def summary(self) -> str:
        """One line: the stage times and the model's share of wall time."""
        return (f"wall {self.wall:.1f} s; read {self.read:.1f} s, model {self.compute:.1f} s, "
                f"write {self.write:.1f} s (busy seconds summed over threads); model busy "
                f"{100 * self.model_share:.0f}% of wall x {self.compute_workers} worker(s), "
                f"waited {self.starved:.1f} s for input, {self.blocked:.1f} s for the writers")


_BUSY = ("read", "compute", "write", "starved", "blocked")


def run_attributes(records: list[dict[str, Any]], wall: float, executor: str
                   ) -> dict[str, Any]:
    """What an output's metadata says of the run that made it: ``profile`` (see
    :func:`merge_profile`), ``executor``, and ``runtime``, what ran the model in every
    process that computed tiles (engines and precisions joined by ``+`` where they differ;
    absent when no process recorded one; with ``int8``, the calibration and the check of
    the int8 network).

    Examples
    --------
    >>> r = {"worker": "a:1", "tasks": [0], "tiles": 4,
    ...      "runtime": {"engine": "openvino", "precision": "fp32", "device": "cpu"}}
    >>> a = run_attributes([r], 1.0, "local")
    >>> a["executor"], a["runtime"], a["profile"]["processes"]
    ('local', {'engine': 'openvino', 'precision': 'fp32'}, 1)
    """
    out: dict[str, Any] = {"profile": merge_profile(records, wall), "executor": executor}
    runtimes = {(r["runtime"]["engine"], r["runtime"]["precision"])
                for r in records if r.get("runtime")}
    if runtimes:
        out["runtime"] = {"engine": "+".join(sorted({e for e, _ in runtimes})),
                          "precision": "+".join(sorted({q for _, q in runtimes}))}
        int8 = [r["runtime"]["int8"] for r in records if (r.get("runtime") or {}).get("int8")]
        if int8:  # the calibration and check (one network: the same in every process)
            out["runtime"]["int8"] = int8[0]
    return out


def merge_profile(records: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """One run's profile from what each process that computed its tasks recorded.

    Parameters
    ----------
    records : list of dict
        :meth:`~tilerseg.engine.workdir.WorkDir.worker_records`: each with ``tasks``,
        ``tiles`` and, when the process computed this run alone, ``times``
        (:meth:`StageTimes.as_dict`) and ``runtime``.
    wall : float
        The seconds the committing process spent on the tiles (its own pipeline, or
        waiting for a cluster's workers).

    Returns
    -------
    dict
        ``wall``; the busy seconds of each stage, ``batches``, ``tiles`` (that ran the
        model) and ``compute_workers`` summed over the processes; ``model_share``, the
        model's busy time over the processes' pipeline time times their compute workers;
        ``processes``, and ``workers``: one entry per process (its name, host, SLURM job,
        shard, tasks, tiles written, pipeline wall and model time, runtime).

    Examples
    --------
    >>> r = {"worker": "a:1", "tasks": [0, 1], "tiles": 8, "times": {"wall": 2.0,
    ...      "read": 0.5, "compute": 3.0, "write": 1.0, "starved": 0.1, "blocked": 0.0,
    ...      "batches": 8, "tiles": 8, "compute_workers": 2}}
    >>> p = merge_profile([r], 2.5)
    >>> p["compute"], p["model_share"], p["processes"]
    (3.0, 0.75, 1)
    """
    out: dict[str, Any] = {"wall": round(wall, 3)}
    timed = [r["times"] for r in records if r.get("times")]
    for key in _BUSY:
        out[key] = round(sum(t.get(key, 0.0) for t in timed), 3)
    for key in ("batches", "tiles", "compute_workers"):
        out[key] = int(sum(t.get(key, 0) for t in timed))
    capacity = sum(t.get("wall", 0.0) * t.get("compute_workers", 1) for t in timed)
    out["model_share"] = round(out["compute"] / capacity, 3) if capacity > 0 else 0.0
    out["processes"] = len(records)
    out["workers"] = [
        {"worker": r.get("worker"), "host": r.get("host"), "job": r.get("job"),
         "shard": r.get("shard"), "tasks": len(r.get("tasks", [])), "tiles": r.get("tiles", 0),
         "wall": (r.get("times") or {}).get("wall"),
         "compute": (r.get("times") or {}).get("compute"), "runtime": r.get("runtime")}
        for r in records]
    return out


class _Stop(Exception):
    """Raised inside a stage when another stage failed."""


class _Pipeline:
    def __init__(self, stop: threading.Event | None = None) -> None:
        self.stop = stop if stop is not None else threading.Event()
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.times = StageTimes()

    def fail(self, err: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = err
        self.stop.set()

    def put(self, q: queue.Queue, item: Any) -> float:
        """Put with back-pressure; returns the seconds spent waiting."""
        start = time.perf_counter()
        while True:
            if self.stop.is_set():
                raise _Stop
            try:
                q.put(item, timeout=_POLL)
                return time.perf_counter() - start
            except queue.Full:
                continue

    def get(self, q: queue.Queue) -> tuple[Any, float]:
        start = time.perf_counter()
        while True:
            if self.stop.is_set():
                raise _Stop
            try:
                return q.get(timeout=_POLL), time.perf_counter() - start
            except queue.Empty:
                continue

    def add(self, **seconds: float) -> None:
        with self.lock:
            for k, v in seconds.items():
                setattr(self.times, k, getattr(self.times, k) + v)


def run_pipeline(
    batches: Iterable[Sequence[Any]],
    load: Callable[[Sequence[Any]], Any],
    workers: Sequence[Any],
    write: Callable[[Any, Any], None],
    *,
    readers: int = 1,
    writers: int = 1,
    depth: int = 2,
    progress: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
) -> StageTimes:
    """Run ``write(item, result)`` for every item of every batch, stages overlapped.

    Parameters
    ----------
    batches : iterable of sequences
        The work, in batches (e.g. tiles per forward pass). Consumed lazily.
    load : callable
        ``load(batch) -> host data`` (reading and normalising the inputs); called from
        ``readers`` threads. A batch whose items should skip the compute stage may be
        answered with :class:`Direct` (its results go straight to the writers).
    workers : sequence
        One compute worker per thread, each with ``submit(data, batch) -> pending`` and
        ``collect(pending) -> list of results`` (see :class:`~tilerseg.engine.compute.Replica`).
        A worker keeps one batch in flight: it submits the next before collecting the
        previous, so an asynchronous device computes while the thread uploads.
    write : callable
        ``write(item, result)``; called from ``writers`` threads.
    readers, writers : int
        Threads of the read and write stages.
    depth : int
        Queue capacity per compute worker, in batches (input side) and in batches'
        worth of results (output side).
    progress : callable, optional
        ``progress(items_written)`` after every write, from a writer thread.
    stop : threading.Event, optional
        Set by the pipeline when a stage fails (or the caller is interrupted), so that
        ``batches`` can stop waiting; a fresh one by default.

    Returns
    -------
    StageTimes

    Raises
    ------
    BaseException
        The first error of any stage, after all threads have stopped.
    """
    n = len(workers)
    if n < 1 or readers < 1 or writers < 1 or depth < 1:
        raise ValueError("run_pipeline needs at least one thread per stage and depth >= 1")
    p = _Pipeline(stop)
    p.times.compute_workers = n
    inbox: queue.Queue = queue.Queue(maxsize=depth * n)
    outbox: queue.Queue = queue.Queue(maxsize=depth * n)
    source = iter(batches)
    source_lock = threading.Lock()
    remaining = {"readers": readers, "workers": n}
    written = [0]

    def finished(stage: str, q: queue.Queue, count: int) -> None:
        with p.lock:
            remaining[stage] -= 1
            last = remaining[stage] == 0
        if last:
            for _ in range(count):
                p.put(q, _END)

    def reader() -> None:
        while True:
            with source_lock:
                batch = next(source, _END)
            if batch is _END:
                break
            start = time.perf_counter()
            data = load(batch)
            p.add(read=time.perf_counter() - start)
            if isinstance(data, Direct):
                for item, result in zip(batch, data.results):
                    p.put(outbox, (item, result))
            else:
                p.put(inbox, (batch, data))
        finished("readers", inbox, n)

    def compute(worker: Any) -> None:
        pending = None
        while True:
            job, waited = p.get(inbox)
            p.add(starved=waited)
            if job is _END:
                break
            start = time.perf_counter()
            submitted = (job[0], worker.submit(job[1], job[0]))
            if pending is not None:
                drain(worker, pending)
            pending = submitted
            if not getattr(worker, "asynchronous", False):
                drain(worker, pending)
                pending = None
            p.add(compute=time.perf_counter() - start)
        if pending is not None:
            start = time.perf_counter()
            drain(worker, pending)
            p.add(compute=time.perf_counter() - start)
        finished("workers", outbox, writers)

    def drain(worker: Any, pending: tuple[Sequence[Any], Any]) -> None:
        batch, handle = pending
        results = worker.collect(handle)
        blocked = sum(p.put(outbox, (item, r)) for item, r in zip(batch, results))
        p.add(blocked=blocked, compute=-blocked, batches=1, tiles=len(batch))

    def writer() -> None:
        while True:
            job, _ = p.get(outbox)
            if job is _END:
                break
            start = time.perf_counter()
            write(*job)
            p.add(write=time.perf_counter() - start)
            if progress is not None:
                with p.lock:
                    written[0] += 1
                    done = written[0]
                progress(done)

    def guarded(target: Callable[..., None], *args: Any) -> Callable[[], None]:
        def run() -> None:
            try:
                target(*args)
            except _Stop:
                pass
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                p.fail(err)
        return run

    threads = (
        [threading.Thread(target=guarded(reader), name=f"tilerseg-read-{k}")
         for k in range(readers)]
        + [threading.Thread(target=guarded(compute, w), name=f"tilerseg-compute-{k}")
           for k, w in enumerate(workers)]
        + [threading.Thread(target=guarded(writer), name=f"tilerseg-write-{k}")
           for k in range(writers)]
    )
    start = time.perf_counter()
    for t in threads:
        t.daemon = True
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(timeout=0.2)
    except BaseException as err:  # KeyboardInterrupt in the caller: stop the stages
        p.fail(err)
        for t in threads:
            t.join()
    p.times.wall = time.perf_counter() - start
    if p.error is not None:
        raise p.error
    log.debug("pipeline: %s", p.times.summary())
    return p.times


class Direct:
    """Results a loader hands straight to the writers, bypassing compute (e.g. fills)."""

    def __init__(self, results: Sequence[Any]) -> None:
        self.results = list(results)

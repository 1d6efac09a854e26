"""Running tasks: one process's view of an output (:class:`RunContext`) and the pipeline
that claims and computes the tiles of many tasks, records each finished task and reports
each finished output (:func:`run_tasks`).

Every process that computes ends up here, through
:func:`~tilerseg.engine.executors.local.run_pipelined`: a local run or a shard runs all
the tasks it can claim of its run (or of a batch of images), and so does each worker
process of a Dask cluster.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import OutputError
from ..geometry import Tile
from ..io.writers import OutputWriter, spec_from_dict
from ..labels import LabelPolicy
from ..normalize import Normalization
from .background import decode_skipped
from .claims import TaskClaims
from .instances import InstanceRun
from .jobs import RunRef, geometry_of
from .options import PLAIN_OUTPUT_OPTIONS, RunOptions, run_options
from .pipeline import Direct, StageTimes, run_pipeline
from .prepare import Prepared, prepare
from .workdir import WorkDir

__all__ = ["RunContext", "Work", "complete", "first_and_rest", "open_context", "recorded_options",
           "run_tasks"]

log = logging.getLogger(__name__)


class RunContext:
    """One output as this process computes it: the prepared run, its work directory and
    writer, and the background tiles to fill instead of running.

    Parameters
    ----------
    prepared : Prepared
        The run (image, model, plan, normalisation, label policy).
    work : WorkDir
        Its work directory.
    writer : OutputWriter
        The output being written (at ``work.store``).
    skip : numpy.ndarray of bool, optional
        Tiles (``plan.grid``) to fill with the model's output on ``background`` instead
        of running the model.
    background : list of float, optional
        The background value per input channel, in model input units.
    image : str, optional
        The input path, for tasks sent to other processes (None: in memory).
    """

    def __init__(self, prepared: Prepared, work: WorkDir, writer: OutputWriter,
                 skip: np.ndarray | None = None, background: list[float] | None = None,
                 image: str | None = None) -> None:
        self.p, self.work, self.writer, self.image = prepared, work, writer, image
        self.skip = skip if skip is not None else np.zeros(prepared.plan.grid, dtype=bool)
        self.background = background
        self.instances = InstanceRun.of(work.path, work.manifest)
        self._fill: np.ndarray | None = None
        self._lock = threading.Lock()

    def tiles(self, task_id: int) -> list[Tile]:
        """The tiles of a task."""
        return [self.p.plan[index] for index in self.work.grid.tiles(task_id)]

    def ref(self) -> RunRef:
        """This run as plain data for other processes (:class:`~tilerseg.engine.jobs.RunRef`)."""
        return self.work.ref(self.image, self.p.source.level, self.p.view.channels)

    def fill(self, tile: Tile) -> np.ndarray:
        """The model's probabilities of ``tile`` on a constant window of the background.

        Computed once (one forward pass): tile origins share one phase of the pooling
        grid, so the output on a constant window is the same for every tile.
        """
        with self._lock:
            if self._fill is None:
                plan = self.p.plan
                window = np.empty((self.p.geometry.in_channels, *plan.window), np.float32)
                value = np.asarray(self.background, np.float32)
                window[...] = value.reshape(-1, *(1,) * len(plan.window))
                first = plan[(0,) * len(plan.grid)]
                self._fill = self.p.runner.replica(torch.from_numpy(window[None]), [first])[0]
        return self._fill[(slice(None), *(slice(0, s.stop - s.start) for s in tile.write))]

    def write(self, tile: Tile, probs: np.ndarray) -> None:
        """Store a tile's probabilities and/or labels (and its eager pyramid levels), and
        label its instances chunk by chunk (the first instance pass)."""
        labels = self.p.labels(probs) if self.writer.labels is not None else None
        self.writer.write(tile.write, probs, labels=labels)
        if self.instances is not None:
            self.instances.first_pass(tile.write, probs)


def recorded_options(manifest: dict[str, Any], options: RunOptions | None = None) -> RunOptions:
    """The options of a recorded run.

    Parameters
    ----------
    manifest : dict
        The run's manifest.
    options : RunOptions, optional
        How to compute it now (device, batch size, threads...).

    Returns
    -------
    RunOptions
        What decides the output from the manifest (the tile, normalisation, threshold and
        channels as resolved then), the rest from ``options``.
    """
    requested, resolved = manifest["options"], manifest["resolved"]
    return run_options(
        options, tile=tuple(resolved["tile"]),
        normalize=Normalization(**resolved["normalization"]),
        threshold=resolved["labels"]["threshold"], channel=tuple(resolved["channels"]),
        **{k: requested.get(k, getattr(RunOptions, k)) for k in PLAIN_OUTPUT_OPTIONS})


def open_context(work: WorkDir, model: nn.Module, image: Any,
                 options: RunOptions | None = None, *, path: str | None = None) -> RunContext:
    """The :class:`RunContext` of a recorded run, rebuilt from its manifest.

    The model is not probed (its geometry is recorded) and no statistics are computed
    (the normalisation is recorded).

    Parameters
    ----------
    work : WorkDir
        The run.
    model : torch.nn.Module
        Its model (the caller checked the weights' digest).
    image : path, ImageSource or array
        Its input.
    options : RunOptions, optional
        How to compute (device, batch size, threads...).
    path : str, optional
        The input's absolute path, for tasks sent to other processes.

    Returns
    -------
    RunContext

    Raises
    ------
    OutputError
        The image no longer has the recorded shape.
    """
    manifest = work.manifest
    p = prepare(image, model, recorded_options(manifest, options), geometry=geometry_of(manifest))
    spec = spec_from_dict(manifest["spec"])
    if tuple(p.plan.image_shape) != tuple(spec.shape) or list(p.plan.grid) != list(work.grid.grid):
        raise OutputError(
            f"the image no longer matches the run in '{work.path}' (shape "
            f"{p.plan.image_shape}, recorded {tuple(spec.shape)}); pass --overwrite")
    resolved = manifest["resolved"]
    p = dataclasses.replace(p, labels=LabelPolicy(p.geometry.out_channels, **resolved["labels"]))
    writer = OutputWriter(manifest["output"], spec, staging=work.store, existing=True)
    background = resolved.get("background")
    skip = decode_skipped(background) if background else None
    value = background["value"] if background else None
    return RunContext(p, work, writer, skip, value, image=path)


@dataclass(eq=False)
class Work:
    """Tasks of one output for an executor to run.

    Attributes
    ----------
    context : RunContext
        The output.
    task_ids : list of int
        The tasks to try, in order (those without a completion record when the run was
        joined); each is claimed before it is computed (see :mod:`tilerseg.engine.claims`),
        so other processes may do some of them.
    on_complete : callable, optional
        ``on_complete(work)`` once every task of the run is recorded (e.g. commit), called
        by the process that sees it first.
    error : BaseException or None
        Set when the work failed (with ``isolate``, the others go on).
    tiles : int
        Tiles written by this process so far.
    computed : list of int
        The tasks this process computed and recorded.
    """

    context: RunContext
    task_ids: list[int]
    on_complete: Callable[[Work], None] | None = None
    error: BaseException | None = None
    tiles: int = 0
    computed: list[int] = field(default_factory=list)
    _claims: TaskClaims | None = field(default=None, repr=False)
    _left: dict[int, int] = field(default_factory=dict, repr=False)
    _in_flight: int = field(default=0, repr=False)
    _claiming: bool = field(default=True, repr=False)
    _completed: bool = field(default=False, repr=False)

    @property
    def complete(self) -> bool:
        """Whether :attr:`on_complete` ran (or had nothing to run) after every task of the
        run was recorded."""
        return self._completed


@dataclass(frozen=True)
class _Item:
    work: Work
    task_id: int
    tile: Tile


class _Failed:
    """The result of a batch whose computation failed (``isolate``)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Worker:
    """Adapts a Replica to the pipeline's compute stage for items of :class:`_Item`."""

    def __init__(self, replica: Any, isolate: bool) -> None:
        self.replica, self.isolate = replica, isolate
        self.asynchronous = getattr(replica, "asynchronous", False)

    def submit(self, data: Any, batch: Sequence[_Item]) -> Any:
        if batch[0].work.error is not None:
            return None
        try:
            return self.replica.submit(data, [item.tile for item in batch])
        except Exception as err:  # noqa: BLE001 - handed to the item's work
            if not self.isolate:
                raise
            return _Failed(err)

    def collect(self, pending: Any) -> list[Any]:
        if pending is None or isinstance(pending, _Failed):
            return [pending]  # one result is enough to tell the work
        try:
            return self.replica.collect(pending)
        except Exception as err:  # noqa: BLE001
            if not self.isolate:
                raise
            return [_Failed(err)] * len(pending.tiles)


def run_tasks(
    works: Iterable[Work],
    replicas: Sequence[Any],
    *,
    readers: int = 1,
    writers: int = 1,
    progress: Callable[[int], None] | None = None,
    isolate: bool = False,
    record: dict[str, Any] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> StageTimes:
    """Claim, compute, store and record the tasks of ``works`` through one pipeline.

    Each work's tasks are claimed one at a time as the readers need them (see
    :mod:`tilerseg.engine.claims`); once nothing more can be claimed, the pipeline waits
    for the tasks other processes hold, taking over those of processes that are gone, so
    it returns when every task of every work is recorded (or it stopped, or failed).

    Parameters
    ----------
    works : iterable of Work
        Consumed lazily (a batch of images may be prepared as it goes).
    replicas : sequence of Replica
        One compute thread each (the same replica may appear several times on a CPU).
    readers, writers : int
        Threads reading/normalising and encoding/storing.
    progress : callable, optional
        ``progress(tiles)``: the tiles of the works recorded so far, by this process
        or found recorded by others.
    isolate : bool
        A failing work (unreadable tile, non-finite output, full disk...) records its
        error in ``work.error`` and is dropped; the others go on. Without it, the first
        error stops everything and is raised.
    record : dict, optional
        Extra values for every claim and completion record (e.g. the shard).
    should_stop : callable, optional
        Polled before each claim: once it returns True no task is claimed any more (the
        tasks in flight are finished and recorded), e.g. when a cluster client gave up.

    Returns
    -------
    StageTimes
    """
    lock = threading.Lock()
    written = [0]
    extra = dict(record or {})
    stop = threading.Event()
    external = should_stop or (lambda: False)

    def stopped() -> bool:
        return stop.is_set() or external()

    def fail(work: Work, err: BaseException) -> None:
        if not isolate:
            raise err
        with lock:
            first = work.error is None
            if first:
                work.error = err
        if first and work._claims is not None:  # others may take this run's tasks at once
            work._claims.release_all()

    def tell(tiles: int) -> None:
        with lock:
            written[0] += tiles
            done = written[0]
        if progress is not None:
            progress(done)

    def finish_if_done(work: Work) -> None:
        """Run ``on_complete`` once nothing is claimed or in flight and every task of the
        run is recorded."""
        with lock:
            if work._claiming or work._in_flight or work._completed or work.error is not None:
                return
            work._completed = True
        if not stopped() and not work.context.work.missing():
            complete(work, isolate)
        else:
            with lock:
                work._completed = False

    def task_batches(work: Work, claimed: Iterable[int]) -> Iterator[list[_Item]]:
        ctx = work.context
        size = ctx.p.batch_size
        for task_id in claimed:  # batches never span tasks: any executor batches
            tiles = ctx.tiles(task_id)  # alike, so outputs are bitwise alike
            with lock:
                work._left[task_id] = len(tiles)
                work._in_flight += 1
            run = [_Item(work, task_id, t) for t in tiles if not ctx.skip[t.index]]
            for k in range(0, len(run), size):
                yield run[k:k + size]
            for t in tiles:
                if ctx.skip[t.index]:
                    yield [_Item(work, task_id, t)]
            if work.error is not None:
                return

    def claiming_over(work: Work) -> None:
        with lock:
            work._claiming = False
        finish_if_done(work)

    seen: list[Work] = []

    def found_elsewhere(work: Work, claims: TaskClaims, before: int) -> None:
        """Count, for the progress, the tasks found recorded by other processes."""
        tiles = work.context.work.grid.tiles_of(claims.found[before:])
        if tiles:
            tell(tiles)

    def batches() -> Iterator[list[_Item]]:
        for work in works:
            claims = work._claims = TaskClaims(work.context.work, work.task_ids, extra)
            seen.append(work)
            yield from task_batches(work, claims.claimable(
                lambda: stopped() or work.error is not None))
            found_elsewhere(work, claims, 0)
            if not claims.elsewhere:
                claiming_over(work)
        for work in list(seen):  # then the tasks other processes hold, for all works
            claims = work._claims
            assert claims is not None
            if claims.elsewhere:
                before = len(claims.found)
                yield from task_batches(work, claims.wait(
                    lambda: stopped() or work.error is not None, sleep=stop.wait))
                found_elsewhere(work, claims, before)
                claiming_over(work)

    def load(batch: list[_Item]) -> Any:
        work, ctx = batch[0].work, batch[0].work.context
        if work.error is not None:
            return Direct([None] * len(batch))
        try:
            if ctx.skip[batch[0].tile.index]:
                return Direct([ctx.fill(item.tile) for item in batch])
            return ctx.p.runner.load([item.tile for item in batch])
        except Exception as err:  # noqa: BLE001
            fail(work, err)
            return Direct([None] * len(batch))

    def abandon(item: _Item) -> None:
        """Drop an item of a task this process no longer holds."""
        with lock:
            work = item.work
            work._left[item.task_id] -= 1
            last = work._left[item.task_id] == 0
            if last:
                work._in_flight -= 1
        if last:
            log.warning("task %d of %s was taken over by another process (this one was "
                        "presumed dead); left to it", item.task_id, item.work.context.work.path)
            finish_if_done(item.work)

    def write(item: _Item, result: Any) -> None:
        work = item.work
        if isinstance(result, _Failed):
            fail(work, result.error)
        if work.error is not None or result is None:
            return
        assert work._claims is not None
        if not work._claims.owns(item.task_id):
            abandon(item)
            return
        try:
            work.context.write(item.tile, result)
        except Exception as err:  # noqa: BLE001
            fail(work, err)
            return
        with lock:
            work.tiles += 1
            work._left[item.task_id] -= 1
            task_finished = work._left[item.task_id] == 0
        if task_finished:
            try:
                work.context.work.mark_done(item.task_id, **extra)
            except Exception as err:  # noqa: BLE001
                fail(work, err)
                return
            work._claims.release(item.task_id)
            with lock:
                work.computed.append(item.task_id)
                work._in_flight -= 1
            finish_if_done(work)
        tell(1)

    workers = [_Worker(r, isolate) for r in replicas]
    try:
        return run_pipeline(batches(), load, workers, write, readers=readers,
                            writers=writers, stop=stop)
    finally:  # stopped or failed: what this process still holds, others may take now
        for work in seen:
            if work._claims is not None:
                work._claims.release_all()


def complete(work: Work, isolate: bool) -> None:
    """Call ``work.on_complete`` (e.g. the commit) once all its tasks are recorded; its
    failure fails the work (``isolate``) or is raised."""
    if work.on_complete is None:
        return
    try:
        work.on_complete(work)
    except Exception as err:  # noqa: BLE001
        if not isolate:
            raise
        work.error = work.error or err


def first_and_rest(items: Iterable[Any]) -> tuple[Any, Iterable[Any]]:
    """The first item of an iterable (None if empty) and an iterable of all of them."""
    it = iter(items)
    first = next(it, None)
    return first, (itertools.chain([first], it) if first is not None else ())

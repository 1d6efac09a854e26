"""Lazy inference: a Dask array of probabilities with one task per output tile.

Each task reads its tile's mirror-filled input window from the lazily opened image
(only the in-bounds region it needs), runs the model and returns the kept crop. The
array's chunks are the output tiles, so a task's result is exactly one output chunk and
writing it to a Zarr array chunked the same way needs no lock and no read-modify-write.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import os
import uuid
from collections.abc import Iterator
from typing import Any

import dask
import dask.array as da
import numpy as np
import torch
from dask.callbacks import Callback

from ..geometry import Tile, TilePlan
from .runner import TileRunner

__all__ = ["lazy_probabilities", "local_compute", "TileProgress", "cpu_budget", "torch_threads"]

log = logging.getLogger(__name__)


def _tile_task(runner: TileRunner, tile: Tile) -> np.ndarray:
    return runner([tile])[0]


def lazy_probabilities(runner: TileRunner, batch_size: int = 1) -> da.Array:
    """The probabilities of ``runner``'s image as a Dask array, one chunk per tile.

    Parameters
    ----------
    runner : TileRunner
        Holds the model (in eval mode), the lazy image view, the plan and normalisation.
    batch_size : int
        Tiles per forward pass: consecutive tiles (row-major) are computed by one task
        and handed out as separate chunks.

    Returns
    -------
    dask.array.Array of float32, shape (num_classes, *spatial), chunks = output tiles
    """
    plan: TilePlan = runner.plan
    name = f"tilerseg-probabilities-{uuid.uuid4().hex}"
    chunks = ((plan.geometry.out_channels,),) + tuple(
        tuple(min(t, n - k * t) for k in range(g))
        for n, t, g in zip(plan.image_shape, plan.tile, plan.grid)
    )
    graph: dict[Any, Any] = {}
    tiles = list(plan)
    for b in range(0, len(tiles), batch_size):
        batch = tiles[b : b + batch_size]
        if len(batch) == 1:
            graph[(name, 0, *batch[0].index)] = (_tile_task, runner, batch[0])
            continue
        batch_key = (f"{name}-batch", b)
        graph[batch_key] = (runner, batch)
        for i, tile in enumerate(batch):
            graph[(name, 0, *tile.index)] = (operator.getitem, batch_key, i)
    meta = np.empty((0,) * (plan.geometry.ndim + 1), dtype=np.float32)
    return da.Array(graph, name, chunks, dtype=np.float32, meta=meta)


class TileProgress(Callback):
    """Dask callback reporting ``progress(done, total)`` as tile tasks finish."""

    def __init__(self, array: da.Array, progress: Any) -> None:
        super().__init__()
        self.name, self.progress = array.name, progress
        self.total, self.done = int(np.prod(array.numblocks)), 0

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        if isinstance(key, tuple) and key and key[0] == self.name:
            self.done += 1
            self.progress(self.done, self.total)


def default_workers(device: torch.device) -> int:
    """Concurrent model workers: two where there are 2+ cores (one per GPU elsewhere).

    On the project's 2-core reference machine, two forward passes with one torch
    thread each ran 8-20% faster than one pass with two threads
    (``benchmarks/bench_threads.py``).
    """
    return 2 if device.type != "cpu" else max(1, min(2, os.cpu_count() or 1))


def cpu_budget(workers: int | None = None, threads: int | None = None) -> tuple[int, int]:
    """Split the cores between concurrent forward passes: ``(workers, torch threads each)``.

    Defaults: :func:`default_workers` workers, ``cores // workers`` threads each, so
    ``workers * threads <= cores`` (no oversubscription). Explicit values are kept; an
    oversubscribed choice is logged.

    Examples
    --------
    >>> w, t = cpu_budget(1, 3)
    >>> (w, t)
    (1, 3)
    """
    cores = os.cpu_count() or 1
    workers = workers or default_workers(torch.device("cpu"))
    threads = threads or max(1, cores // workers)
    if workers * threads > cores:
        log.warning("%d workers x %d torch threads oversubscribe %d cores", workers, threads,
                    cores)
    return workers, threads


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Set torch's intra-op thread count for a block (None: leave it), then restore it."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def local_compute(device: torch.device, workers: int | None = None) -> Iterator[int]:
    """Threaded Dask scheduler with torch threads sized so the cores are not oversubscribed.

    On the CPU, ``workers`` Dask threads each run torch with ``cores // workers``
    intra-op threads (see :func:`cpu_budget`). The previous torch thread count is
    restored afterwards.

    Yields
    ------
    int
        The number of Dask worker threads.
    """
    workers = workers or default_workers(device)
    threads = cpu_budget(workers)[1] if device.type == "cpu" else None
    with torch_threads(threads):
        log.info("local run: %d dask threads x %d torch threads", workers,
                 torch.get_num_threads())
        with dask.config.set(scheduler="threads", num_workers=workers):
            yield workers

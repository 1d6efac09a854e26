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

__all__ = ["lazy_probabilities", "local_compute", "TileProgress"]

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
    """Dask threads for a local run: two (one can read while the other computes)."""
    return 2 if device.type != "cpu" else max(1, min(2, os.cpu_count() or 1))


@contextlib.contextmanager
def local_compute(device: torch.device, workers: int | None = None) -> Iterator[int]:
    """Threaded Dask scheduler with torch threads sized so the cores are not oversubscribed.

    On the CPU, ``workers`` Dask threads each run torch with ``cores // workers``
    intra-op threads (2 x 1 measured fastest on 2 cores). The previous torch thread count
    is restored afterwards.

    Yields
    ------
    int
        The number of Dask worker threads.
    """
    workers = workers or default_workers(device)
    previous = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    log.info("local run: %d dask threads x %d torch threads", workers, torch.get_num_threads())
    try:
        with dask.config.set(scheduler="threads", num_workers=workers):
            yield workers
    finally:
        torch.set_num_threads(previous)

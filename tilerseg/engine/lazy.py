"""Lazy inference: a Dask array of probabilities with one task per output tile.

Each task reads its tile's mirror-filled input window from the lazily opened image
(only the in-bounds region it needs), runs the model and returns the kept crop. The
array's chunks are the output tiles, so a task's result is exactly one output chunk and
writing it to a Zarr array chunked the same way needs no lock and no read-modify-write.
"""

from __future__ import annotations

import operator
import uuid
from typing import Any

import dask.array as da
import numpy as np

from ..geometry import Tile, TilePlan
from .runner import TileRunner

__all__ = ["lazy_probabilities"]


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
    # set the runtime up now, for full batches (Dask may run the last, partial one first)
    runner.replica.warm_up(runner.model_window, runner.image.shape[0], batch_size)
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

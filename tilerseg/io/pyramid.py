"""Lower-resolution pyramid levels of a Zarr array, computed out of core with dask.

Each level halves every spatial axis (the last ``spatial_ndim`` axes; leading axes such
as channels are kept), rounding up so that odd sizes keep their last row/column:
``ceil(n / 2)``. Two reductions are offered:

``"mean"``
    Mean of each 2x2 (2x2x2) block, computed in float32. A block that sticks out of an
    odd-sized image is the mean of the pixels it has (the block is padded by repeating
    its edge, which weights each real pixel equally).
``"nearest"``
    The top-left pixel of each block (``x[..., ::2, ::2]``), for label images.

Memory stays bounded: the source is read in dask blocks of twice the destination's
chunk size, so each block reduces to exactly one destination chunk, which is written
whole (no locks needed, no read-modify-write of a chunk).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import zarr

__all__ = ["downsample", "level_chunks", "level_shapes", "mean2"]


def level_shapes(shape: Sequence[int], chunks: Sequence[int]) -> list[tuple[int, ...]]:
    """Spatial shapes of every pyramid level, full resolution first.

    Levels are added, each halving every axis (rounding up), until no side exceeds the
    largest chunk side; an image that already fits has a single level.

    Parameters
    ----------
    shape : sequence of int
        Spatial shape of level 0.
    chunks : sequence of int
        Spatial chunk shape of level 0.

    Returns
    -------
    list of tuple of int
        One spatial shape per level.

    Examples
    --------
    >>> level_shapes((1000, 777), (256, 256))
    [(1000, 777), (500, 389), (250, 195)]
    >>> level_shapes((100, 80), (256, 256))
    [(100, 80)]
    """
    limit = max(int(c) for c in chunks)
    shapes = [tuple(int(n) for n in shape)]
    while max(shapes[-1]) > limit:
        shapes.append(tuple(math.ceil(n / 2) for n in shapes[-1]))
    return shapes


def level_chunks(chunks: Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
    """Chunk shape ``chunks`` clipped to ``shape`` (at least 1 per axis).

    Parameters
    ----------
    chunks : sequence of int
        Nominal chunk shape.
    shape : sequence of int
        Array shape.

    Returns
    -------
    tuple of int
        ``min(chunk, size)`` per axis.
    """
    return tuple(max(1, min(int(c), int(n))) for c, n in zip(chunks, shape, strict=True))


def mean2(
    block: np.ndarray,
    spatial_ndim: int,
    decode: Callable[[np.ndarray], np.ndarray] | None,
    encode: Callable[[np.ndarray], np.ndarray] | None,
    dtype: np.dtype,
) -> np.ndarray:
    """2x mean reduction of one block (see the module docstring).

    ``decode`` / ``encode`` (optional) convert stored values to float32 and back.
    """
    x = decode(block) if decode is not None else block.astype(np.float32, copy=False)
    lead = x.ndim - spatial_ndim
    pad = [(0, 0)] * lead + [(0, n % 2) for n in x.shape[lead:]]
    if any(after for _, after in pad):
        x = np.pad(x, pad, mode="edge")
    # sum of the 2**d strided sub-grids, then one scaling: several times faster than
    # reshape(...).mean(axes) on large tiles
    mean = None
    for offsets in itertools.product((0, 1), repeat=spatial_ndim):
        part = x[(slice(None),) * lead + tuple(slice(o, None, 2) for o in offsets)]
        if mean is None:
            mean = part.astype(np.float32, copy=True)
        else:
            mean += part
    assert mean is not None
    mean *= np.float32(1.0 / 2**spatial_ndim)
    return encode(mean) if encode is not None else mean.astype(dtype)


def _nearest2(block: np.ndarray, spatial_ndim: int) -> np.ndarray:
    """2x subsampling of one block: every other pixel, starting at the first."""
    lead = block.ndim - spatial_ndim
    return block[(slice(None),) * lead + (slice(None, None, 2),) * spatial_ndim]


def downsample(
    src: zarr.Array,
    dst: zarr.Array,
    method: Literal["mean", "nearest"],
    *,
    spatial_ndim: int,
    decode: Callable[[np.ndarray], np.ndarray] | None = None,
    encode: Callable[[np.ndarray], np.ndarray] | None = None,
    scheduler: str = "threads",
) -> None:
    """Write the 2x reduction of ``src`` into the (already created) array ``dst``.

    Parameters
    ----------
    src : zarr.Array
        The previous level.
    dst : zarr.Array
        The new level: same leading axes, spatial sides ``ceil(n / 2)``.
    method : {"mean", "nearest"}
        Block mean (intensities, probabilities) or subsampling (labels).
    spatial_ndim : int
        Number of trailing spatial axes; leading axes are not reduced.
    decode, encode : callable, optional
        For ``"mean"``: turn a stored block into float32 before averaging, and the
        float32 mean into the stored dtype afterwards (default: plain casts).
    scheduler : str, default "threads"
        Dask scheduler used for the computation.

    Raises
    ------
    ValueError
        If ``dst`` does not have the reduced shape of ``src``.
    """
    lead = src.ndim - spatial_ndim
    expected = tuple(src.shape[:lead]) + tuple(math.ceil(n / 2) for n in src.shape[lead:])
    if tuple(dst.shape) != expected:
        raise ValueError(f"level shape {dst.shape} is not the 2x reduction {expected}")
    # One source block of twice the destination chunk per destination chunk.
    read_chunks = tuple(src.shape[:lead]) + tuple(
        min(2 * c, n) for c, n in zip(dst.chunks[lead:], src.shape[lead:], strict=True)
    )
    import dask.array as da  # deferred: a run whose levels are all eager never needs it

    x = da.from_zarr(src, chunks=read_chunks)
    out_chunks = x.chunks[:lead] + tuple(
        tuple(math.ceil(b / 2) for b in axis) for axis in x.chunks[lead:]
    )
    meta = np.empty((0,) * dst.ndim, dtype=dst.dtype)
    if method == "mean":
        y = x.map_blocks(
            mean2,
            spatial_ndim,
            decode,
            encode,
            np.dtype(dst.dtype),
            chunks=out_chunks,
            dtype=dst.dtype,
            meta=meta,
        )
    elif method == "nearest":
        y = x.map_blocks(_nearest2, spatial_ndim, chunks=out_chunks, dtype=dst.dtype, meta=meta)
    else:
        raise ValueError(f"unknown downsampling method {method!r}")
    # Every dask block is exactly one chunk of dst: whole-chunk writes, no lock needed.
    da.store(y, dst, lock=False, scheduler=scheduler)

"""Whole chunks of an output array, encoded here and put straight into its store.

Writing one chunk through ``zarr.Array.__setitem__`` costs, besides compressing it, about
as much again in zarr's own machinery (selection, the asynchronous codec pipeline, the
check for an empty chunk): 8.8 ms against 5.0 ms for a 2 x 1024^2 uint8 probability
chunk, 4.2 ms against 1.8 ms for a label chunk (``benchmarks/bench_write.py``). The
writer fills its arrays one whole chunk per tile, so it encodes each such chunk itself
with the array's own codecs (the ``bytes`` codec, then ``zstd``: the only pipeline the
output arrays use) and writes the bytes under the array's chunk key: the stored bytes are
the ones zarr writes, and every reader opens them as zarr's own.

Unlike zarr, a chunk equal to the fill value everywhere is stored too (zarr leaves it
out); readers see the same values either way.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Sequence

import numcodecs
import numpy as np
import zarr
from upath import UPath
from zarr.codecs import BytesCodec, ZstdCodec

from tilerseg.io import remote

__all__ = ["ChunkWriter", "COMPRESSOR"]

COMPRESSOR = ZstdCodec(level=1)
"""The compressor of every output array: zstd level 1 (zarr's default is level 0, i.e.
zstd's 3), 1.9x faster on probability chunks for 4% larger ones
(``benchmarks/bench_write.py``)."""


class ChunkWriter:
    """Write whole chunks of one Zarr v3 array as encoded bytes.

    Parameters
    ----------
    array : zarr.Array
        A Zarr v3 array whose codecs are ``bytes`` followed by ``zstd`` (as the output
        writer creates them).
    root : pathlib.Path or upath.UPath
        The location of the store that holds ``array`` (its chunks are at
        ``root / array.path / chunk key``).

    Raises
    ------
    ValueError
        If the array uses other codecs.
    """

    def __init__(self, array: zarr.Array, root: UPath) -> None:
        meta = array.metadata
        codecs = tuple(meta.codecs)
        if (len(codecs) != 2 or not isinstance(codecs[0], BytesCodec)
                or not isinstance(codecs[1], ZstdCodec)):
            raise ValueError(f"chunks of array '{array.path}' are encoded with {codecs}, "
                             "not bytes + zstd")
        self.array = array
        self.chunks = tuple(int(c) for c in meta.chunk_grid.chunk_shape)
        self.dtype = np.dtype(array.dtype).newbyteorder("<")  # bytes codec: little endian
        self.fill = meta.fill_value
        self._codec = numcodecs.Zstd(level=codecs[1].level, checksum=codecs[1].checksum)
        self._folder = root / array.path if array.path else root
        self._local = remote.is_local(root)
        self._made: set[str] = set()
        self._lock = threading.Lock()

    def whole(self, start: Sequence[int], shape: Sequence[int]) -> bool:
        """Whether the region at ``start`` of ``shape`` is exactly one chunk (a chunk at
        the array's edge is whole when it reaches the edge)."""
        for s, n, c, size in zip(start, shape, self.chunks, self.array.shape, strict=True):
            if s % c or n != min(c, size - s):
                return False
        return True

    def write(self, start: Sequence[int], data: np.ndarray) -> None:
        """Store ``data``, the whole chunk that begins at ``start`` (see :meth:`whole`).

        Parameters
        ----------
        start : sequence of int
            The chunk's first element, per axis.
        data : numpy.ndarray
            Its values, of the chunk's shape or, at the array's edge, of the part inside
            the array (the rest is filled with the fill value, as zarr stores it).
        """
        if not self.whole(start, data.shape):
            raise ValueError(f"region at {tuple(start)} of shape {data.shape} is not one "
                             f"whole chunk of {self.chunks} in array '{self.array.path}'")
        if data.shape != self.chunks:
            full = np.full(self.chunks, self.fill, self.dtype)
            full[tuple(slice(0, n) for n in data.shape)] = data
            data = full
        data = np.ascontiguousarray(data, dtype=self.dtype)
        key = self.array.metadata.encode_chunk_key(
            tuple(s // c for s, c in zip(start, self.chunks)))
        path = self._folder / key
        encoded = self._codec.encode(data)
        if not self._local:  # an object store: one put, no folders
            path.write_bytes(encoded)
            return
        self._make_folder(path.parent)
        # as zarr writes a local chunk: whole or not at all, for a reader looking in
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
        try:
            tmp.write_bytes(encoded)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _make_folder(self, folder: UPath) -> None:
        name = os.fspath(folder)
        if name in self._made:
            return
        folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._made.add(name)

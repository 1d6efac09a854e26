"""Whole output chunks encoded by tilerseg and put straight into the store
(tilerseg.io.chunks): the same bytes as zarr's own write, used for every aligned tile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec

from tilerseg.io.chunks import COMPRESSOR, ChunkWriter
from tilerseg.io.writers import OutputSpec, OutputWriter, encode_probabilities, open_output


def _probs(shape: tuple[int, ...], classes: int, seed: int = 0) -> np.ndarray:
    p = np.random.default_rng(seed).random((classes, *shape), dtype=np.float32)
    return p / p.sum(axis=0, keepdims=True)


def _tiles(shape: tuple[int, ...], chunks: tuple[int, ...]):
    grid = [range(0, n, c) for n, c in zip(shape, chunks)]
    for start in np.stack(np.meshgrid(*grid, indexing="ij"), -1).reshape(-1, len(shape)):
        yield tuple(slice(int(s), min(int(s) + c, n)) for s, c, n in zip(start, chunks, shape))


def _chunk_files(array: zarr.Array, root: Path) -> dict[str, bytes]:
    folder = root / array.path
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "zarr.json"}


@pytest.mark.parametrize("axes, shape, chunks, dtype, classes", [
    ("YX", (70, 45), (32, 16), "uint8", 2),      # edge chunks in both axes
    ("YX", (64, 48), (32, 16), "float16", 3),
    ("ZYX", (9, 20, 17), (4, 8, 8), "float32", 2),
    ("YX", (40, 40), (16, 16), "uint8", 300),    # uint16 labels: byte order matters
])  # fmt: skip
def test_chunks_are_the_bytes_zarr_writes(tmp_path: Path, axes, shape, chunks, dtype,
                                          classes) -> None:
    probs = _probs(shape, classes, seed=1)
    probs[(slice(None), *(slice(0, c) for c in chunks))] = 0  # an all-zero first chunk
    probs[(0, *(slice(0, c) for c in chunks))] = 1
    spec = OutputSpec(axes, shape, chunks, classes, dtype, True, eager_levels=1)
    with OutputWriter(tmp_path / "out.zarr", spec) as w:
        for region in _tiles(shape, chunks):
            w.write(region, probs[(slice(None), *region)])
        out = w.commit()
    got = open_output(out)
    # the reference: the same values written by zarr itself into arrays made alike
    for array in (got["probabilities"], got["labels"]):
        ref = zarr.create_array(tmp_path / "ref.zarr", name=array.path, shape=array.shape,
                                chunks=array.chunks, dtype=array.dtype, zarr_format=3,
                                compressors=COMPRESSOR)
        ref[...] = array[...]
        ours, theirs = _chunk_files(array, out), _chunk_files(ref, tmp_path / "ref.zarr")
        assert theirs and set(theirs) <= set(ours)
        assert all(ours[k] == theirs[k] for k in theirs)
        for key in set(ours) - set(theirs):  # zarr leaves out chunks of the fill value
            index = tuple(int(i) for i in key.split("/")[1:])
            block = tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, array.chunks))
            assert not np.any(array[block])
    expected = encode_probabilities(probs, dtype)
    np.testing.assert_array_equal(got["probabilities"][...], expected)


def test_aligned_tiles_bypass_zarr_and_others_go_through_it(tmp_path: Path,
                                                            monkeypatch) -> None:
    calls: list[str] = []
    setitem = zarr.Array.__setitem__

    def counting(self, selection, value):
        calls.append(self.path)
        return setitem(self, selection, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", counting)
    shape, chunks = (1000, 700), (256, 256)
    probs = _probs(shape, 2, seed=3)
    spec = OutputSpec("YX", shape, chunks, 2, "uint8", True, eager_levels=1)
    with OutputWriter(tmp_path / "a.zarr", spec) as w:
        for region in _tiles(shape, chunks):  # tile by tile, edges included
            w.write(region, probs[(slice(None), *region)])
        assert calls == []  # level 0 and the eager level 1: all straight to the store
        a = w.commit()  # (levels from 2 on are built at commit, through zarr)
    calls.clear()
    spec = OutputSpec("YX", shape, chunks, 2, "uint8", True, pyramid=False)
    with OutputWriter(tmp_path / "b.zarr", spec) as w:
        w.write((slice(0, 300), slice(0, 700)), probs[:, :300])  # not whole chunks: zarr
        w.write((slice(300, 1000), slice(0, 700)), probs[:, 300:])
        assert calls == ["0", "labels/segmentation/0"] * 2
        b = w.commit()
    for key in ("probabilities", "labels"):
        np.testing.assert_array_equal(open_output(a)[key][...], open_output(b)[key][...])


def test_output_arrays_use_zstd_level_1(tmp_path: Path) -> None:
    spec = OutputSpec("YX", (600, 600), (256, 256), 2, "uint8", True)
    with OutputWriter(tmp_path / "o.zarr", spec) as w:
        w.write((slice(None), slice(None)), _probs((600, 600), 2))
        out = w.commit()
    root = zarr.open_group(out, mode="r")
    for path in ("0", "1", "labels/segmentation/0", "labels/segmentation/1"):
        (codec,) = root[path].compressors
        assert (type(codec).__name__, codec.level) == ("ZstdCodec", 1)


def test_chunk_writer_refuses_other_codecs_and_partial_chunks(tmp_path: Path) -> None:
    blosc = zarr.create_array(tmp_path / "s.zarr", name="a", shape=(8, 8), chunks=(4, 4),
                              dtype="uint8", zarr_format=3, compressors=BloscCodec())
    with pytest.raises(ValueError, match="not bytes \\+ zstd"):
        ChunkWriter(blosc, tmp_path / "s.zarr")
    ok = zarr.create_array(tmp_path / "s.zarr", name="b", shape=(8, 8), chunks=(4, 4),
                           dtype="uint8", zarr_format=3, compressors=COMPRESSOR)
    writer = ChunkWriter(ok, tmp_path / "s.zarr")
    with pytest.raises(ValueError, match="not one whole chunk"):
        writer.write((0, 2), np.ones((4, 2), np.uint8))
    writer.write((4, 4), np.full((4, 4), 7, np.uint8))
    assert ok[4:, 4:].tolist() == [[7] * 4] * 4 and not ok[:4].any()
    assert not list((tmp_path / "s.zarr" / "b").rglob("*.partial"))
    wide = zarr.create_array(tmp_path / "s.zarr", name="c", shape=(4, 4), chunks=(4, 4),
                             dtype="uint16", zarr_format=3, compressors=COMPRESSOR)
    big_endian = np.arange(16, dtype=">u2").reshape(4, 4) * 257  # bytes that differ
    ChunkWriter(wide, tmp_path / "s.zarr").write((0, 0), big_endian)
    assert wide[...].tolist() == big_endian.tolist()

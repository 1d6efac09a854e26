"""Benchmark: what writing one output tile costs, piece by piece, on one thread.

What it measures
----------------
The bundled model segments the top-left 1024^2 of the synthetic membrane slide
(:func:`tilerseg.synthetic.write_membrane_tiff`, seed 0, 4096^2, cached in ``--workdir``)
with :func:`tilerseg.segment`: one output tile's float32 probabilities ``(2, 1024, 1024)``
and its labels (the model's :class:`tilerseg.labels.LabelPolicy`). Then, each timed as the
median of ``--repeats`` calls on one thread:

* ``encode``: :func:`tilerseg.io.writers.encode_probabilities` to uint8;
* the codecs on the encoded probability chunk (2 MiB) and the label chunk (1 MiB): zstd at
  levels 0 (zarr's default, zstd's 3), 1 (tilerseg's) and -1, lz4 (blosc, byte shuffle),
  with the compression ratio;
* one chunk stored through ``zarr.Array.__setitem__`` against
  :class:`tilerseg.io.chunks.ChunkWriter` (the same zstd level 1 bytes, put straight into
  the store), for the probabilities and the labels;
* ``OutputWriter.write`` of the whole tile (probabilities, labels and the two eager
  pyramid levels), as the pipeline's writers call it, on an 8192^2 output;
* the same tile written as the writer did before it stored chunks itself (commit
  2876d1d): zarr arrays with zarr's default codecs (zstd level 0), filled through
  ``zarr.Array.__setitem__``: the encoded probabilities and the labels at level 0, then
  levels 1 and 2 (2x means of the float probabilities, encoded; every other label).

Run from the repository root, with the virtualenv active::

    python benchmarks/bench_write.py
    python benchmarks/bench_write.py --repeats 40 --json write.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numcodecs
import numpy as np
import zarr

import tilerseg
from tilerseg.io.chunks import COMPRESSOR, ChunkWriter
from tilerseg.io.pyramid import mean2
from tilerseg.io.writers import OutputSpec, OutputWriter, encode_probabilities
from tilerseg.labels import LabelPolicy

sys.path.insert(0, str(Path(__file__).parent))
from bench_end_to_end import add_output_arguments, open_workdir, write_json  # noqa: E402
from bench_memory import make_slide  # noqa: E402
from bench_scale_out import cpu_name  # noqa: E402

TILE = 1024


def median_ms(call: Callable[[int], object], repeats: int) -> float:
    """Median milliseconds of ``call(k)`` for k = 0 .. repeats - 1 (after one untimed)."""
    call(0)
    times = []
    for k in range(repeats):
        start = time.perf_counter()
        call(k)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def zarr_levels(root: Path, label_dtype: np.dtype) -> list[tuple[zarr.Array, zarr.Array]]:
    """Levels 0-2 of an 8 x 8 tile output made as the writer made them before: zarr's
    default codecs, one chunk per tile at each level."""
    levels = []
    for level in range(3):
        side, chunk = (8 * TILE) >> level, TILE >> level
        prob = zarr.create_array(root, name=str(level), shape=(2, side, side),
                                 chunks=(2, chunk, chunk), dtype="uint8", zarr_format=3)
        lab = zarr.create_array(root, name=f"labels/{level}", shape=(side, side),
                                chunks=(chunk, chunk), dtype=label_dtype, zarr_format=3)
        levels.append((prob, lab))
    return levels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="calls per figure (20)")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    workdir = open_workdir(args.workdir)
    import tifffile

    slide = tifffile.imread(make_slide(workdir, 4096))[:TILE, :TILE]
    model = tilerseg.load_model()
    probs = tilerseg.segment(slide, model, tile=512)
    labels = LabelPolicy.for_model(probs.shape[0], getattr(model, "metadata", None))(probs)
    encoded = encode_probabilities(probs, "uint8")
    numcodecs.blosc.set_nthreads(1)
    result: dict = {"cpu": cpu_name(), "date": time.strftime("%Y-%m-%d"), "tile": TILE}
    print(f"{cpu_name()}; one {TILE}^2 tile of the bundled model, 2 classes; "
          f"median of {args.repeats} calls, one thread")
    result["encode_ms"] = median_ms(lambda k: encode_probabilities(probs, "uint8"),
                                    args.repeats)
    print(f"encode float32 -> uint8: {result['encode_ms']:.2f} ms")
    codecs = {"zstd 0 (zarr's default)": numcodecs.Zstd(level=0),
              "zstd 1 (tilerseg)": numcodecs.Zstd(level=1),
              "zstd -1": numcodecs.Zstd(level=-1),
              "blosc lz4, shuffle": numcodecs.Blosc("lz4", 5, numcodecs.Blosc.SHUFFLE)}
    result["codecs"] = {}
    for name, codec in codecs.items():
        row = {}
        for what, data in (("probabilities", encoded), ("labels", labels)):
            row[f"{what}_ms"] = median_ms(lambda k: codec.encode(data), args.repeats)
            row[f"{what}_ratio"] = data.nbytes / len(codec.encode(data))
        result["codecs"][name] = row
        print(f"{name}: probabilities {row['probabilities_ms']:.2f} ms (ratio "
              f"{row['probabilities_ratio']:.2f}), labels {row['labels_ms']:.2f} ms "
              f"(ratio {row['labels_ratio']:.1f})")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = Path(tmp) / "store.zarr"
        result["store"] = {}
        for what, data in (("probabilities", encoded), ("labels", labels)):
            shape = (*data.shape[:-2], 8 * TILE, 8 * TILE)
            array = zarr.create_array(root, name=what, shape=shape, chunks=data.shape,
                                      dtype=data.dtype, zarr_format=3, compressors=COMPRESSOR)
            direct = ChunkWriter(array, root)
            lead = (slice(None),) * (data.ndim - 2)

            def region(k: int) -> tuple[slice, ...]:
                y, x = divmod(k % 64, 8)
                return (*lead, slice(y * TILE, (y + 1) * TILE), slice(x * TILE, (x + 1) * TILE))

            def through_zarr(k: int, array=array, data=data) -> None:
                array[region(k)] = data

            def straight(k: int, direct=direct, data=data) -> None:
                direct.write(tuple(s.start or 0 for s in region(k)), data)

            row = {"zarr_ms": median_ms(through_zarr, args.repeats),
                   "direct_ms": median_ms(straight, args.repeats)}
            result["store"][what] = row
            print(f"store one {what} chunk: zarr.Array.__setitem__ {row['zarr_ms']:.2f} ms, "
                  f"ChunkWriter {row['direct_ms']:.2f} ms (both zstd 1)")
        spec = OutputSpec("YX", (8 * TILE, 8 * TILE), (TILE, TILE), 2, "uint8", True,
                          eager_levels=2)
        writer = OutputWriter(Path(tmp) / "out.zarr", spec)

        def write_tile(k: int) -> None:
            y, x = divmod(k % 64, 8)
            writer.write((slice(y * TILE, (y + 1) * TILE), slice(x * TILE, (x + 1) * TILE)),
                         probs, labels=labels)

        result["writer_tile_ms"] = median_ms(write_tile, args.repeats)
        writer.abort()
        print(f"OutputWriter.write of one tile (uint8 probabilities, labels, levels 1-2): "
              f"{result['writer_tile_ms']:.2f} ms")
        before = zarr_levels(Path(tmp) / "before.zarr", labels.dtype)

        def write_before(k: int) -> None:
            y, x = divmod(k % 64, 8)
            p, lab = probs, labels
            for level, (prob_array, label_array) in enumerate(before):
                t = TILE >> level
                region = (slice(y * t, (y + 1) * t), slice(x * t, (x + 1) * t))
                if level:
                    p = mean2(p, 2, None, None, np.dtype(np.float32))
                    lab = lab[::2, ::2]
                prob_array[(slice(None), *region)] = encode_probabilities(p, "uint8")
                label_array[region] = lab

        result["zarr_tile_ms"] = median_ms(write_before, args.repeats)
        print(f"the same through zarr's __setitem__, zstd level 0 (the writer before): "
              f"{result['zarr_tile_ms']:.2f} ms")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

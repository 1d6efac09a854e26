"""Benchmark 2: ``segment_to_zarr()`` with a trivial model against a plain TIFF -> Zarr copy.

What it measures
----------------
How close tilerseg's I/O path comes to the I/O ceiling: with a model that costs almost
nothing, a run is bounded by reading and decoding the TIFF, normalising, encoding and
compressing the output and writing it, plus the pyramid. The ceiling is a plain copy of
the same image into Zarr, written the way a user would write it.

A seamless synthetic membrane slide of N x N uint8 pixels (default N = 16384) is written
once as a tiled (512 px), zlib-compressed BigTIFF with
:func:`tilerseg.synthetic.write_membrane_tiff` (seed 0) and cached in ``--workdir``
(shared with the other benchmarks). Then, for ``--repeats`` rounds, alternating which
path goes first:

(a) **tilerseg**: ``segment_to_zarr(slide, conv, out, tile=1024, dtype="uint8",
    overwrite=True)`` with ``conv = torch.nn.Conv2d(1, 1, 1)`` (``torch.manual_seed(0)``;
    halo 0, step 1, so the input windows are the 1024^2 output tiles; one class, so a
    sigmoid). Defaults otherwise: the pipelined executor, 2 model workers x 1 torch
    thread on 2 cores, two reader and two writer threads. Two times are reported: the
    **total** (the whole call, which also builds the pyramid levels and writes the
    metadata; ``--no-pyramid`` writes level 0 only, like the copy) and the **tile
    pipeline** alone (``profile["wall"]`` of the output).
(b) **copy**: the image copied into a Zarr v3 array with the same chunks (1024^2), dtype
    and codecs as tilerseg's output arrays (``zarr.create_array(..., zarr_format=3)``
    with its default codecs: bytes + zstd), reading the TIFF through tifffile's Zarr
    store (``tifffile.imread(slide, aszarr=True)`` + ``zarr.open(store, mode="r")``),
    with 2 threads for the 2 cores. Two straightforward ways (``--copy``):

    * ``dask``: ``dask.array.from_zarr(src).rechunk(1024).to_zarr(dst)`` under the
      threaded scheduler with ``num_workers=2``;
    * ``chunks``: a 2-thread pool copying one 1024^2 chunk at a time,
      ``dst[block] = src[block]``.

    With ``--copy both`` (the default) both run each round and the faster one of the
    round is the ceiling.

Outputs of both paths are deleted before each timed run (not in the timings), so
neither pays for removing an old output. tilerseg's output has a channel axis
(1, N, N) and the model's probabilities, not the input pixels, so its chunks compress
differently; the bytes before compression are the same (N^2 uint8).

Throughput is N^2 pixels per second. Figures of merit: ``ratio = tilerseg throughput /
copy throughput = copy time / tilerseg time``, per round (paired), for the total and for
the tile pipeline. Target: the median of the paired ratios >= 0.7, for the total (the
exit status follows it) and reported for the pipeline alone.

Before the rounds, tilerseg is warmed up on one tile (a 1024^2 crop of the slide in
memory) so lazy imports and first-call costs fall outside the timings.

Run from the repository root, with the virtualenv active::

    python benchmarks/bench_io_ceiling.py                             # 16384^2, 3 rounds
    python benchmarks/bench_io_ceiling.py --json io_ceiling.json      # also save the figures

Options: ``--size``, ``--tile``, ``--repeats``, ``--copy``, ``--workdir`` (default
``/tmp/tilerseg-bench``), ``--json`` (see ``--help``). Disk: the 16384^2 slide is about
a quarter of a GiB, and each output up to as much again.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import tifffile
import torch
import zarr

# helpers shared with benchmark 1 (this directory is on sys.path when a script in it runs)
from bench_end_to_end import (CommitTimer, add_output_arguments, environment, open_workdir,
                              profile_line, write_json)
from bench_memory import make_slide
from torch import nn

import tilerseg

TARGET = 0.7
COPY_THREADS = 2
MODEL_SEED = 0
COPIES = ("dask", "chunks")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=16384,
                        help="slide side in px (default 16384)")
    parser.add_argument("--tile", type=int, default=1024,
                        help="output tile side = Zarr chunk side of both paths (default 1024)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--copy", choices=(*COPIES, "both"), default="both",
                        help="how the plain copy is done (default both: the faster of the "
                        "round is the ceiling)")
    add_output_arguments(parser)
    parser.add_argument("--no-pyramid", action="store_true",
                        help="tilerseg writes level 0 only (segment_to_zarr(pyramid=False)), "
                        "like the copy")
    return parser.parse_args(argv)


def trivial_model() -> nn.Module:
    """A 1x1 convolution, 1 -> 1 channel (halo 0, step 1; one class: sigmoid)."""
    torch.manual_seed(MODEL_SEED)
    return nn.Conv2d(1, 1, 1)


# -- the two paths ------------------------------------------------------------------------


def time_tilerseg(image: Any, model: nn.Module, out: Path, tile: int,
                  pyramid: bool = True) -> dict[str, Any]:
    """One ``segment_to_zarr`` call into a fresh ``out``.

    Returns
    -------
    dict
        ``total_s`` (the whole call), ``commit_s`` (pyramid + metadata + move) and
        ``profile`` (the output's ``attrs["tilerseg"]["profile"]``).
    """
    shutil.rmtree(out, ignore_errors=True)
    timer = CommitTimer()
    with timer.active():
        start = time.perf_counter()
        tilerseg.segment_to_zarr(image, model, out, tile=tile, dtype="uint8", overwrite=True,
                                 pyramid=pyramid)
        total = time.perf_counter() - start
    profile = dict(zarr.open_group(os.fspath(out), mode="r").attrs["tilerseg"]["profile"])
    return {"total_s": total, "commit_s": sum(timer.seconds), "profile": profile}


def _target(src: zarr.Array, out: Path, chunk: int) -> zarr.Array:
    """An empty Zarr v3 array like tilerseg's outputs: default codecs, ``chunk`` chunks."""
    chunks = tuple(min(chunk, n) for n in src.shape)
    return zarr.create_array(os.fspath(out), shape=src.shape, chunks=chunks, dtype=src.dtype,
                             zarr_format=3)


def copy_dask(slide: Path, out: Path, chunk: int) -> None:
    """``from_zarr(tiff store).rechunk(chunk).to_zarr(dst)``, threaded scheduler, 2 workers."""
    with tifffile.imread(slide, aszarr=True) as store:
        src = zarr.open(store, mode="r")
        dst = _target(src, out, chunk)
        with dask.config.set(scheduler="threads", num_workers=COPY_THREADS):
            da.from_zarr(src).rechunk(chunk).to_zarr(dst)


def copy_chunks(slide: Path, out: Path, chunk: int) -> None:
    """Chunk by chunk, ``dst[block] = src[block]``, from a pool of 2 threads."""
    with tifffile.imread(slide, aszarr=True) as store:
        src = zarr.open(store, mode="r")
        dst = _target(src, out, chunk)
        blocks = [(slice(r, r + chunk), slice(c, c + chunk))
                  for r in range(0, src.shape[0], chunk) for c in range(0, src.shape[1], chunk)]

        def copy(block: tuple[slice, slice]) -> None:
            dst[block] = src[block]

        with ThreadPoolExecutor(COPY_THREADS) as pool:
            for _ in pool.map(copy, blocks):
                pass


def time_copy(method: str, slide: Path, out: Path, chunk: int) -> float:
    """Seconds of one copy into a fresh ``out``."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    (copy_dask if method == "dask" else copy_chunks)(slide, out, chunk)
    return time.perf_counter() - start


# -- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = open_workdir(args.workdir)
    slide = make_slide(workdir, args.size)
    out = workdir / f"io-ceiling-tilerseg-{args.size}.zarr"
    copy_out = workdir / f"io-ceiling-copy-{args.size}.zarr"
    methods = COPIES if args.copy == "both" else (args.copy,)
    pixels = args.size * args.size

    model = trivial_model()
    plan = tilerseg.plan((args.size, args.size), model, tile=args.tile)
    geometry = tilerseg.model_geometry(model)
    print(f"torch {torch.__version__}, {os.cpu_count()} cores; model Conv2d(1, 1, 1): halo "
          f"{geometry.halo}, step {geometry.step}")
    print(f"plan: tile {plan.tile}, window {plan.window}, grid {plan.grid}, {len(plan)} tiles; "
          f"copy: {', '.join(methods)} with {COPY_THREADS} threads", flush=True)

    with tifffile.TiffFile(slide) as tif:
        crop = tif.pages[0].asarray()[: args.tile, : args.tile].copy()
    warm = workdir / "io-ceiling-warm-up.zarr"
    print(f"warm-up (one tile): tilerseg {time_tilerseg(crop, model, warm, args.tile)['total_s']:.2f} s",
          flush=True)
    shutil.rmtree(warm, ignore_errors=True)

    rounds: list[dict[str, Any]] = []
    for r in range(args.repeats):
        copies: dict[str, float] = {}
        if r % 2 == 0:  # alternate the order so that neither path always runs second
            run = time_tilerseg(slide, model, out, args.tile, not args.no_pyramid)
            for m in methods:
                copies[m] = time_copy(m, slide, copy_out, args.tile)
        else:
            for m in methods:
                copies[m] = time_copy(m, slide, copy_out, args.tile)
            run = time_tilerseg(slide, model, out, args.tile, not args.no_pyramid)
        ceiling = min(copies.values())
        wall = run["profile"]["wall"]
        run.update(copy_s=copies, ceiling_s=ceiling, ceiling_method=min(copies, key=copies.get),
                   ratio_total=ceiling / run["total_s"], ratio_pipeline=ceiling / wall)
        rounds.append(run)
        copy_text = ", ".join(f"copy ({m}) {s:.2f} s ({pixels / s / 1e6:.1f} Mpx/s)"
                              for m, s in copies.items())
        print(f"round {r + 1}/{args.repeats}: tilerseg total {run['total_s']:.2f} s "
              f"({pixels / run['total_s'] / 1e6:.1f} Mpx/s), pipeline {wall:.2f} s "
              f"({pixels / wall / 1e6:.1f} Mpx/s); {copy_text}; ratios total "
              f"{run['ratio_total']:.3f}, pipeline {run['ratio_pipeline']:.3f}")
        print(f"  {profile_line(run['profile'])}")
        print(f"  pyramid + metadata (commit) {run['commit_s']:.2f} s", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(copy_out, ignore_errors=True)

    def mpx(seconds: float) -> float:
        return pixels / seconds / 1e6

    med = {
        "total_s": statistics.median(x["total_s"] for x in rounds),
        "pipeline_s": statistics.median(x["profile"]["wall"] for x in rounds),
        "commit_s": statistics.median(x["commit_s"] for x in rounds),
        "ceiling_s": statistics.median(x["ceiling_s"] for x in rounds),
        **{f"copy_{m}_s": statistics.median(x["copy_s"][m] for x in rounds) for m in methods},
        "ratio_total": statistics.median(x["ratio_total"] for x in rounds),
        "ratio_pipeline": statistics.median(x["ratio_pipeline"] for x in rounds),
    }
    print()
    header = (f"{'round':>5} {'total s':>8} {'Mpx/s':>7} {'pipe s':>7} {'Mpx/s':>7} "
              + " ".join(f"{m + ' s':>9} {'Mpx/s':>7}" for m in methods)
              + f" {'r total':>8} {'r pipe':>7}")
    print(header)
    print("-" * len(header))
    for i, x in enumerate(rounds, 1):
        wall = x["profile"]["wall"]
        copies_text = " ".join(f"{x['copy_s'][m]:>9.2f} {mpx(x['copy_s'][m]):>7.1f}"
                               for m in methods)
        print(f"{i:>5} {x['total_s']:>8.2f} {mpx(x['total_s']):>7.1f} {wall:>7.2f} "
              f"{mpx(wall):>7.1f} {copies_text} {x['ratio_total']:>8.3f} "
              f"{x['ratio_pipeline']:>7.3f}")
    print(f"median tilerseg total:    {med['total_s']:.2f} s ({mpx(med['total_s']):.1f} Mpx/s; "
          f"pyramid + metadata {med['commit_s']:.2f} s)")
    print(f"median tilerseg pipeline: {med['pipeline_s']:.2f} s ({mpx(med['pipeline_s']):.1f} Mpx/s)")
    for m in methods:
        s = med[f"copy_{m}_s"]
        print(f"median copy ({m}):{' ' * (11 - len(m))}{s:.2f} s ({mpx(s):.1f} Mpx/s)")
    print(f"median of paired ratios (tilerseg / copy throughput): total "
          f"{med['ratio_total']:.3f}, pipeline {med['ratio_pipeline']:.3f}")
    ok_total = med["ratio_total"] >= TARGET
    ok_pipeline = med["ratio_pipeline"] >= TARGET
    print(f"target >= {TARGET:.2f}: total {'met' if ok_total else 'NOT met'}, "
          f"pipeline {'met' if ok_pipeline else 'NOT met'}")

    if args.json:
        record = {
            "benchmark": "io_ceiling", "command": [sys.executable, *sys.argv],
            "environment": environment(), "args": vars(args), "slide": str(slide),
            "pixels": pixels, "model": "Conv2d(1, 1, 1)",
            "plan": {"tile": list(plan.tile), "window": list(plan.window),
                     "grid": list(plan.grid), "tiles": len(plan)},
            "rounds": rounds, "median": med,
            "median_mpx_s": {k[:-2]: mpx(v) for k, v in med.items() if k.endswith("_s")},
            "target": TARGET, "met": {"total": ok_total, "pipeline": ok_pipeline},
        }
        write_json(args.json, record)
    return 0 if ok_total else 1


if __name__ == "__main__":
    sys.exit(main())

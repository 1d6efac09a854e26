"""Benchmark: ``segment_batch()`` over many small images against the bare model forward.

What it measures
----------------
``--count`` (500) synthetic membrane images of ``--side`` x ``--side`` (512 x 512) uint8
pixels, ``tilerseg.synthetic.membrane_image((side, side), seed=k)[0]`` for k = 0 ...
count - 1, are written once as plain TIFFs (``tifffile.imwrite``) into
``--workdir``/``batch-SIDE/img-NNNNN.tif`` and reused by later runs. The bundled model
(:func:`tilerseg.load_model`: the ISBI 2012 valid U-Net, depth 4, base 16; eval,
channels-last) segments them, in one process, along two paths timed in alternating order
for ``--repeats`` rounds:

(a) **batch**: ``segment_batch([folder], model, out_dir, tile=512, overwrite=True)`` with
    its defaults (the pipelined executor: on a 2-core machine 2 model workers x 1 torch
    thread), each image into ``out_dir/NAME.tilerseg.zarr`` (OME-Zarr, uint8
    probabilities). The whole call is timed: listing the folder, opening every TIFF, the
    work directory, manifest and completion record of each output, reading, normalising,
    the model, encoding, writing, each output's pyramid and metadata and the move into
    place. ``out_dir`` is deleted (untimed) before every round, so every round computes
    every image; every result's ``status`` must be ``"done"``.
(b) **bare forward**: the model on exactly the same input windows (``tilerseg.plan`` of
    one image: one tile of 512 from a 700 x 700 window; windows read with ``read_window``
    from each image in memory, mirror-filled, divided by 255, pre-built as float32
    channels-last tensors, as in ``bench_end_to_end.build_windows``), the forward only:
    torch with W Python threads each with ``torch.set_num_threads(T)`` (2 x 1 and 1 x 2
    on 2 cores), and OpenVINO with 1 and 2 streams when it is installed, each thread
    taking the next window from a shared counter (as the pipeline's model workers do).
    Every candidate is timed once before the rounds and the fastest is the reference of
    every round (``bench_end_to_end.bare_candidates``).

Throughput is images per second and output pixels (count x side^2) per second. The figure
of merit is the per-round (paired) ratio ``batch throughput / bare throughput = bare time
/ batch time``. **Target: median paired ratio >= 0.85.** The per-image overhead is
``(batch time - bare time) / count``, in ms (median over the rounds of the paired
differences). Before the rounds both paths are warmed up once, untimed, on the first two
images.

Memory: the pre-built windows take ``count x window^2 x 4`` bytes (500 x 700^2 x 4 =
980 MB at the defaults).

Run from the repository root, with the virtualenv active::

    python benchmarks/bench_batch.py                        # 500 images of 512^2, 3 rounds
    python benchmarks/bench_batch.py --json batch.json      # also save the figures

Options: ``--count``, ``--side``, ``--tile``, ``--repeats``, ``--workdir`` (default
``/tmp/tilerseg-bench``; the images there are reused), ``--json`` (see ``--help``). A run
costs ``2 x repeats + 2`` passes of the model over all the images (about 1.5 minutes each
at the defaults on 2 cores: some 15 minutes in all), plus writing the images the first
time. The exit status is 1 when the target fails or an image is not ``"done"``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

# the bare forward candidates (runtimes, thread layouts) are those of bench_end_to_end.py
from bench_end_to_end import (
    write_json,
    add_output_arguments,
    bare_candidates,
    build_windows,
    choose_fastest,
    environment,
    open_workdir,
)

import tilerseg

TARGET = 0.85
MIB = 1024**2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=500, help="number of images (default 500)")
    parser.add_argument("--side", type=int, default=512, help="image side in px (default 512)")
    parser.add_argument("--tile", type=int, default=512, help="output tile side (default 512)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed rounds of both paths (default 3)")
    add_output_arguments(parser)
    return parser.parse_args(argv)


def image_name(k: int) -> str:
    return f"img-{k:05d}.tif"


def make_images(workdir: Path, count: int, side: int) -> Path:
    """Write (or reuse) ``count`` membrane images of ``side``^2 as TIFFs; their folder.

    The folder holds exactly these images (stray TIFFs of an earlier, larger ``--count``
    are removed) so that ``segment_batch`` on the folder sees ``count`` images.
    """
    import tifffile

    from tilerseg.synthetic import membrane_image

    folder = workdir / f"batch-{side}"
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {image_name(k) for k in range(count)}
    for stray in folder.iterdir():
        if stray.name not in wanted:
            if stray.is_dir():
                shutil.rmtree(stray)
            else:
                stray.unlink()
    start = time.perf_counter()
    written = 0
    for k in range(count):
        path = folder / image_name(k)
        if path.exists():
            try:
                if tifffile.TiffFile(path).pages[0].shape == (side, side):
                    continue
            except (OSError, ValueError):
                pass
        partial = path.with_suffix(".partial")
        tifffile.imwrite(partial, membrane_image((side, side), seed=k)[0])
        partial.rename(path)
        written += 1
    if written:
        print(f"wrote {written} images of {side} x {side} uint8 into {folder} in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
    else:
        print(f"reusing {count} images of {side} x {side} in {folder}", flush=True)
    return folder


def load_windows(folder: Path, count: int, plan: tilerseg.TilePlan) -> list[torch.Tensor]:
    """The input windows of every image, in the order of the images (``build_windows``)."""
    import tifffile

    windows: list[torch.Tensor] = []
    for k in range(count):
        windows += build_windows(tifffile.imread(folder / image_name(k)), plan)
    return windows


def time_batch(inputs: list[str], model: torch.nn.Module, out_dir: Path, tile: int
               ) -> tuple[float, list[Any]]:
    """``segment_batch`` into an emptied ``out_dir``; (seconds of the call, results)."""
    shutil.rmtree(out_dir, ignore_errors=True)  # untimed: every round computes every image
    start = time.perf_counter()
    results = tilerseg.segment_batch(inputs, model, out_dir, tile=tile, overwrite=True)
    seconds = time.perf_counter() - start
    return seconds, results


def check_done(results: list[Any], count: int) -> dict[str, int]:
    """Counts of each status; fails loudly unless all ``count`` images are ``"done"``."""
    statuses: dict[str, int] = {}
    for r in results:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    if len(results) != count or statuses.get("done", 0) != count:
        failed = [f"{r.image}: {r.status} {r.error or ''}" for r in results if r.status != "done"]
        raise SystemExit(f"segment_batch: {len(results)} results, statuses {statuses}; "
                         + "; ".join(failed[:5]))
    return statuses


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = open_workdir(args.workdir)
    folder = make_images(workdir, args.count, args.side)
    out_dir = workdir / f"batch-out-{args.side}"
    warm_dir = workdir / "batch-warm-up"
    count = args.count
    pixels = count * args.side * args.side

    model = tilerseg.load_model()
    model = model.to(memory_format=torch.channels_last).eval()
    plan = tilerseg.plan((args.side, args.side), model, tile=args.tile)
    windows = load_windows(folder, count, plan)
    print(f"torch {torch.__version__}, {os.cpu_count()} cores; bundled model; {count} images "
          f"of {args.side}^2; plan per image: tile {plan.tile}, window {plan.window}, "
          f"{len(plan)} tile(s); windows in memory {sum(w.nbytes for w in windows) / MIB:.0f} MiB",
          flush=True)

    # warm-up, untimed: the first two images through each path
    warm = time_batch([str(folder / image_name(k)) for k in range(min(2, count))], model,
                      warm_dir, args.tile)
    check_done(warm[1], min(2, count))
    shutil.rmtree(warm_dir, ignore_errors=True)
    print(f"warm-up (two images): batch {warm[0]:.2f} s", flush=True)

    # the fastest bare forward of any runtime (torch thread layouts, OpenVINO streams)
    best, choice = choose_fastest(bare_candidates(model, plan.window, "fp32"), windows,
                                  pixels, count)

    rounds: list[dict[str, Any]] = []
    for r in range(args.repeats):
        if r % 2 == 0:  # alternate the order so that neither path always runs second
            batch, results = time_batch([str(folder)], model, out_dir, args.tile)
            bare = best.time(windows)
        else:
            bare = best.time(windows)
            batch, results = time_batch([str(folder)], model, out_dir, args.tile)
        statuses = check_done(results, count)
        per_image = [x.seconds for x in results]
        overhead = (batch - bare) / count
        rounds.append({"batch_s": batch, "bare_s": bare, "ratio": bare / batch,
                       "overhead_ms_per_image": overhead * 1e3, "statuses": statuses,
                       "first": "batch" if r % 2 == 0 else "bare",
                       "image_seconds_median": statistics.median(per_image),
                       "image_seconds_max": max(per_image)})
        print(f"round {r + 1}/{args.repeats} ({rounds[-1]['first']} first): batch {batch:.2f} s "
              f"({count / batch:.2f} images/s, {pixels / batch / 1e6:.3f} Mpx/s), bare "
              f"{bare:.2f} s ({count / bare:.2f} images/s, {pixels / bare / 1e6:.3f} Mpx/s), "
              f"ratio {bare / batch:.3f}, overhead {overhead * 1e3:.1f} ms/image; "
              f"statuses {statuses}", flush=True)
    shutil.rmtree(out_dir, ignore_errors=True)

    batch_med = statistics.median(x["batch_s"] for x in rounds)
    bare_med = statistics.median(x["bare_s"] for x in rounds)
    ratio_med = statistics.median(x["ratio"] for x in rounds)
    overhead_med = statistics.median(x["overhead_ms_per_image"] for x in rounds)
    ok = ratio_med >= TARGET
    print()
    header = (f"{'round':>5} {'batch s':>8} {'batch img/s':>12} {'batch Mpx/s':>12} "
              f"{'bare s':>8} {'bare img/s':>11} {'bare Mpx/s':>11} {'ratio':>6} "
              f"{'ms/image':>9}")
    print(header)
    print("-" * len(header))
    for i, x in enumerate(rounds, 1):
        print(f"{i:>5} {x['batch_s']:>8.2f} {count / x['batch_s']:>12.2f} "
              f"{pixels / x['batch_s'] / 1e6:>12.3f} {x['bare_s']:>8.2f} "
              f"{count / x['bare_s']:>11.2f} {pixels / x['bare_s'] / 1e6:>11.3f} "
              f"{x['ratio']:>6.3f} {x['overhead_ms_per_image']:>9.1f}")
    print(f"median batch: {batch_med:.2f} s ({count / batch_med:.2f} images/s, "
          f"{pixels / batch_med / 1e6:.3f} Mpx/s)")
    print(f"median bare ({best.name}): {bare_med:.2f} s ({count / bare_med:.2f} "
          f"images/s, {pixels / bare_med / 1e6:.3f} Mpx/s)")
    print(f"median per-image overhead (batch - bare) / count: {overhead_med:.1f} ms")
    print(f"median of paired ratios (batch / bare throughput): {ratio_med:.3f}")
    print(f"target >= {TARGET:.2f}: {'PASS' if ok else 'FAIL'}", flush=True)

    if args.json:
        record = {
            "benchmark": "batch", "command": [sys.executable, *sys.argv],
            "environment": environment(), "args": vars(args), "folder": str(folder),
            "images": count, "pixels": pixels,
            "plan": {"tile": list(plan.tile), "window": list(plan.window),
                     "grid": list(plan.grid), "tiles_per_image": len(plan)},
            "warm_up_s": warm[0], "bare_configs_s": choice, "reference_config": best.name,
            "rounds": rounds,
            "median": {"batch_s": batch_med, "bare_s": bare_med,
                       "batch_images_s": count / batch_med, "bare_images_s": count / bare_med,
                       "batch_mpx_s": pixels / batch_med / 1e6,
                       "bare_mpx_s": pixels / bare_med / 1e6, "paired_ratio": ratio_med,
                       "overhead_ms_per_image": overhead_med},
            "target": TARGET, "met": ok,
        }
        write_json(args.json, record)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

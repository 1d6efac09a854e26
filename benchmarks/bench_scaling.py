"""Benchmark 4: how ``segment_to_zarr()`` time grows with the image size.

What it measures
----------------
For each slide side N in ``--sizes`` (default 2048 4096 8192 16384), a seamless
synthetic membrane slide of N x N uint8 pixels is written once as a tiled (512 px),
zlib-compressed BigTIFF with :func:`tilerseg.synthetic.write_membrane_tiff` (seed 0) and
cached in ``--workdir`` (shared with the other benchmarks). Each slide is segmented with
``segment_to_zarr(slide, model, out, tile=1024, overwrite=True)`` (defaults otherwise:
uint8 probabilities, the pipelined executor, 2 model workers x 1 torch thread on 2
cores) by a valid-convolution U-Net of depth 4 and ``--base-channels`` (default 16,
``torch.manual_seed(0)``), ``--repeats`` times per size (default 1), sizes in increasing
order within each repeat. Recorded per run: the wall time of the whole call (pyramid
levels and metadata included) and the tile-pipeline time ``profile["wall"]`` from the
output's metadata.

With the median time per size, the exponent ``k`` of ``time ~ pixels^k`` is fitted by
least squares on ``log(time) = a + k log(pixels)`` (``numpy.polyfit``, degree 1), for
the total and for the pipeline. Linear scaling is ``k = 1``; overheads that do not grow
with the image pull ``k`` below 1, costs that grow faster than the image (e.g. memory
pressure, a pyramid that is more than linear) push it above. Target: ``k <= 1.05`` for
the total time. Mpx/s per size is printed as well.

The output of each run is deleted before the next (not timed), so no run pays for
removing an old output. Before the timed runs, one untimed run on a 1024^2 crop of the
smallest slide (one tile) takes one-time costs (lazy imports, oneDNN kernel selection
for the window shape) out of the smallest size's time; left in, they would lower ``k``.

Run from the repository root, with the virtualenv active::

    python benchmarks/bench_scaling.py                            # 2048 ... 16384, once each
    python benchmarks/bench_scaling.py --repeats 3 --json scaling.json

Options: ``--sizes``, ``--tile``, ``--base-channels``, ``--repeats``, ``--workdir``
(default ``/tmp/tilerseg-bench``), ``--json`` (see ``--help``). The time is dominated by
the largest size: 16384^2 is 256 tiles of the model per repeat.
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

import numpy as np
import tifffile
import torch
import zarr

# helpers shared with benchmark 1 (this directory is on sys.path when a script in it runs)
from bench_end_to_end import add_output_arguments, environment, open_workdir, profile_line, write_json
from bench_memory import make_slide
from torch import nn

import tilerseg

TARGET = 1.05
MODEL_SEED = 0
DEPTH = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192, 16384],
                        help="slide sides in px (default 2048 4096 8192 16384)")
    parser.add_argument("--tile", type=int, default=1024, help="output tile side (default 1024)")
    parser.add_argument("--base-channels", type=int, default=16,
                        help="U-Net base channels (default 16; depth is 4)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per size (default 1; the fit uses the median per size)")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    args.sizes = sorted(set(args.sizes))
    if len(args.sizes) < 2:
        parser.error("--sizes needs at least two different sizes for a fit")
    return args


def fit_exponent(pixels: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least-squares fit of ``log(seconds) = a + k log(pixels)``.

    Parameters
    ----------
    pixels, seconds : list
        One point per size.

    Returns
    -------
    k : float
        The exponent.
    a : float
        The intercept (natural logarithms).

    Examples
    --------
    >>> k, a = fit_exponent([100, 400, 1600], [1.0, 4.0, 16.0])
    >>> round(k, 6)
    1.0
    """
    k, a = np.polyfit(np.log(np.asarray(pixels, float)), np.log(np.asarray(seconds, float)), 1)
    return float(k), float(a)


def time_run(image: Any, model: nn.Module, out: Path, tile: int) -> dict[str, Any]:
    """One ``segment_to_zarr`` call into a fresh ``out``: total seconds and profile."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    tilerseg.segment_to_zarr(image, model, out, tile=tile, overwrite=True)
    total = time.perf_counter() - start
    profile = dict(zarr.open_group(os.fspath(out), mode="r").attrs["tilerseg"]["profile"])
    shutil.rmtree(out, ignore_errors=True)
    return {"total_s": total, "profile": profile}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = open_workdir(args.workdir)
    slides = {n: make_slide(workdir, n) for n in args.sizes}

    torch.manual_seed(MODEL_SEED)
    model = tilerseg.create_model("unet", depth=DEPTH, base_channels=args.base_channels)
    print(f"torch {torch.__version__}, {os.cpu_count()} cores; unet depth {DEPTH}, "
          f"base {args.base_channels} (seed {MODEL_SEED}); tile {args.tile}")
    for n in args.sizes:
        p = tilerseg.plan((n, n), model, tile=args.tile)
        print(f"  {n}^2: window {p.window}, grid {p.grid}, {len(p)} tiles")

    with tifffile.TiffFile(slides[args.sizes[0]]) as tif:
        crop = tif.pages[0].asarray()[: args.tile, : args.tile].copy()
    warm = time_run(crop, model, workdir / "scaling-warm-up.zarr", args.tile)
    print(f"warm-up (one tile): {warm['total_s']:.2f} s", flush=True)

    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in args.sizes}
    for r in range(args.repeats):
        for n in args.sizes:
            run = time_run(slides[n], model, workdir / f"scaling-{n}.zarr", args.tile)
            runs[n].append(run)
            px = n * n
            print(f"repeat {r + 1}/{args.repeats}, {n}^2: total {run['total_s']:.2f} s "
                  f"({px / run['total_s'] / 1e6:.3f} Mpx/s), pipeline "
                  f"{run['profile']['wall']:.2f} s ({px / run['profile']['wall'] / 1e6:.3f} Mpx/s)")
            print(f"  {profile_line(run['profile'])}", flush=True)

    pixels = [n * n for n in args.sizes]
    total = [statistics.median(x["total_s"] for x in runs[n]) for n in args.sizes]
    wall = [statistics.median(x["profile"]["wall"] for x in runs[n]) for n in args.sizes]
    k_total, a_total = fit_exponent(pixels, total)
    k_wall, a_wall = fit_exponent(pixels, wall)

    print()
    header = (f"{'size':>8} {'pixels':>13} {'tiles':>6} {'total s':>9} {'Mpx/s':>7} "
              f"{'pipeline s':>11} {'Mpx/s':>7} {'after s':>8}")
    print(header)
    print("-" * len(header))
    for n, px, t, w in zip(args.sizes, pixels, total, wall):
        after = statistics.median(x["total_s"] - x["profile"]["wall"] - x["profile"]["setup"]
                                  for x in runs[n])
        print(f"{f'{n}^2':>8} {px:>13,} {runs[n][0]['profile']['tiles']:>6} {t:>9.2f} "
              f"{px / t / 1e6:>7.3f} {w:>11.2f} {px / w / 1e6:>7.3f} {after:>8.2f}")
    print("(after = total - pipeline - setup: pyramid levels, metadata, opening the image)")
    print(f"fit log(time) = a + k log(pixels): total k = {k_total:.3f}, pipeline k = {k_wall:.3f}")
    ok = k_total <= TARGET
    print(f"target k <= {TARGET:.2f} (total): {'met' if ok else 'NOT met'}; "
          f"pipeline: {'met' if k_wall <= TARGET else 'NOT met'}")

    if args.json:
        record = {
            "benchmark": "scaling", "command": [sys.executable, *sys.argv],
            "environment": environment(), "args": vars(args),
            "runs": {str(n): runs[n] for n in args.sizes},
            "median": {str(n): {"pixels": px, "total_s": t, "pipeline_s": w,
                                "total_mpx_s": px / t / 1e6, "pipeline_mpx_s": px / w / 1e6}
                       for n, px, t, w in zip(args.sizes, pixels, total, wall)},
            "fit": {"total": {"k": k_total, "a": a_total},
                    "pipeline": {"k": k_wall, "a": a_wall}},
            "target": TARGET, "met": ok,
        }
        write_json(args.json, record)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: the CPU thread budget, W concurrent forward passes x T torch threads each.

What it measures
----------------
On the CPU, ``segment_to_zarr`` runs W model workers (Python threads), each with T torch
intra-op threads (default: ``cpu_budget()``, 2 x 1 on a 2-core machine, see
``tilerseg.engine.lazy.default_workers``). This benchmark times the alternatives for
(W, T) in (1, cores), (2, cores // 2) and (cores, 1) (duplicates dropped; ``--configs``
to choose others), with a valid-convolution U-Net of depth 4 and ``--base-channels``
(default 16, ``torch.manual_seed(0)``), eval mode, channels-last:

* **bare forward**: ``--count`` (default 8) input windows of ``--window`` px (default
  1212, the window of a 1024 tile; several sides may be given, e.g. ``--window 1212
  700``), uniform random float32 (seed 0) pre-built as channels-last tensors; W Python
  threads each set ``torch.set_num_threads(T)`` and run ``model(x)`` under
  ``torch.inference_mode()`` on the next window of a shared counter. Throughput is
  output pixels (``count x output side^2``) per second.
* **end to end**: ``segment_to_zarr(slide, model, out, tile=..., workers=W, threads=T,
  overwrite=True)`` on a ``--slide-size`` (default 4096) synthetic membrane slide (tiled
  BigTIFF, cached in ``--workdir`` and shared with the other benchmarks), with the
  output tile whose input window is ``--window`` (1024 for 1212, 512 for 700).
  Throughput is slide pixels per second, for the whole call and for the tile pipeline
  (``profile["wall"]``).

Each configuration is warmed up once; then, for ``--repeats`` rounds (default 3), every
configuration is timed once, in an order rotated each round so that none always runs
first on a shared machine. The table shows medians and each configuration's throughput
relative to the best one. The figures back the default (2 workers x 1 torch thread on 2
cores); there is no pass/fail target.

Run from the repository root, with the virtualenv active::

    python benchmarks/bench_threads.py                           # window 1212, 4096^2 slide
    python benchmarks/bench_threads.py --window 1212 700 --json threads.json

Options: ``--count``, ``--window``, ``--base-channels``, ``--repeats``, ``--configs``
(e.g. ``1x2 2x1``), ``--slide-size``, ``--no-segment`` (bare forward only),
``--workdir`` (default ``/tmp/tilerseg-bench``), ``--json`` (see ``--help``).
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
from bench_end_to_end import add_output_arguments, environment, time_bare, write_json
from bench_memory import make_slide
from torch import nn

import tilerseg

MODEL_SEED = 0
DATA_SEED = 0
DEPTH = 4


def parse_config(text: str) -> tuple[int, int]:
    """``"2x1"`` -> ``(2, 1)`` (Python threads, torch threads each)."""
    try:
        w, t = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WxT, e.g. 2x1") from None
    if w < 1 or t < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: both counts must be >= 1")
    return w, t


def default_configs(cores: int) -> list[tuple[int, int]]:
    """(1, cores), (2, cores // 2), (cores, 1), duplicates dropped.

    Examples
    --------
    >>> default_configs(2)
    [(1, 2), (2, 1)]
    >>> default_configs(8)
    [(1, 8), (2, 4), (8, 1)]
    """
    pairs = [(1, cores), (min(2, cores), max(1, cores // 2)), (cores, 1)]
    return list(dict.fromkeys(pairs))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=8,
                        help="input windows per bare-forward timing (default 8)")
    parser.add_argument("--window", type=int, nargs="+", default=[1212],
                        help="input window sides (default 1212; e.g. 1212 700)")
    parser.add_argument("--base-channels", type=int, default=16,
                        help="U-Net base channels (default 16; depth is 4)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed rounds over all configurations (default 3)")
    parser.add_argument("--configs", type=parse_config, nargs="+", default=None,
                        help="WxT pairs to time (default: 1xC, 2x(C//2), Cx1 for C cores)")
    parser.add_argument("--slide-size", type=int, default=4096,
                        help="side of the slide for the end-to-end runs (default 4096)")
    parser.add_argument("--no-segment", action="store_true",
                        help="time the bare forward only")
    add_output_arguments(parser)
    return parser.parse_args(argv)


def tile_for_window(geometry: tilerseg.ModelGeometry, window: int) -> int:
    """The output tile (a multiple of 16 where possible) whose input window is ``window``.

    Examples
    --------
    >>> g = tilerseg.model_geometry(tilerseg.create_model("unet", base_channels=1))
    >>> tile_for_window(g, 1212), tile_for_window(g, 700)
    (1024, 512)
    """
    out = geometry.output_size(window)  # raises for an inadmissible window
    for tile in (out // 16 * 16, out):
        if tile >= 1 and geometry.window_for_tile(tile) == window:
            return tile
    return out


def time_segment(image: Any, model: nn.Module, out: Path, tile: int, workers: int,
                 threads: int) -> dict[str, Any]:
    """One ``segment_to_zarr`` call with ``workers`` x ``threads`` into a fresh ``out``."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    tilerseg.segment_to_zarr(image, model, out, tile=tile, workers=workers, threads=threads,
                             overwrite=True)
    total = time.perf_counter() - start
    profile = dict(zarr.open_group(os.fspath(out), mode="r").attrs["tilerseg"]["profile"])
    shutil.rmtree(out, ignore_errors=True)
    return {"total_s": total, "profile": profile}


def rotated(items: list[Any], r: int) -> list[Any]:
    """``items`` rotated left by ``r``."""
    k = r % len(items)
    return items[k:] + items[:k]


def name(config: tuple[int, int]) -> str:
    return f"{config[0]}x{config[1]}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cores = os.cpu_count() or 1
    configs = list(dict.fromkeys(args.configs)) if args.configs else default_configs(cores)
    from tilerseg.engine.device import cpu_budget

    torch.manual_seed(MODEL_SEED)
    model = tilerseg.create_model("unet", depth=DEPTH, base_channels=args.base_channels)
    model = model.to(memory_format=torch.channels_last).eval()
    geometry = tilerseg.model_geometry(model)
    tiles = {w: tile_for_window(geometry, w) for w in args.window}  # checks the windows
    print(f"torch {torch.__version__}, {cores} cores; unet depth {DEPTH}, base "
          f"{args.base_channels} (seed {MODEL_SEED}); configurations (threads x torch threads): "
          f"{', '.join(name(c) for c in configs)}; segment_to_zarr default "
          f"{name(cpu_budget(None, None))}", flush=True)

    slide = None
    if not args.no_segment:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        slide = make_slide(workdir, args.slide_size)
        out = workdir / f"threads-{args.slide_size}.zarr"
        with tifffile.TiffFile(slide) as tif:
            first = tif.pages[0].asarray()

    rng = np.random.default_rng(DATA_SEED)
    results: dict[int, dict[str, dict[str, Any]]] = {}
    for window in args.window:
        out_side = geometry.output_size(window)
        bare_px = args.count * out_side * out_side
        windows = [torch.from_numpy(rng.random((1, 1, window, window), dtype=np.float32))
                   .contiguous(memory_format=torch.channels_last) for _ in range(args.count)]
        tile = tiles[window]
        print(f"\nwindow {window} -> output {out_side}: {args.count} windows "
              f"({bare_px / 1e6:.1f} Mpx out)"
              + ("" if slide is None else f"; segment_to_zarr tile {tile} on "
                 f"{args.slide_size}^2"), flush=True)

        for c in configs:  # warm-up
            time_bare(model, windows[: c[0]], *c)
        if slide is not None:
            crop = np.ascontiguousarray(first[:tile, :tile])
            time_segment(crop, model, out, tile, *configs[0])

        rows: dict[str, dict[str, Any]] = {name(c): {"bare_s": [], "segment": []}
                                           for c in configs}
        for r in range(args.repeats):
            for c in rotated(configs, r):
                seconds = time_bare(model, windows, *c)
                rows[name(c)]["bare_s"].append(seconds)
                print(f"round {r + 1}/{args.repeats}, bare {name(c)}: {seconds:.2f} s "
                      f"({bare_px / seconds / 1e6:.3f} Mpx/s)", flush=True)
            if slide is None:
                continue
            for c in rotated(configs, r):
                run = time_segment(slide, model, out, tile, *c)
                rows[name(c)]["segment"].append(run)
                px = args.slide_size**2
                print(f"round {r + 1}/{args.repeats}, segment_to_zarr {name(c)}: "
                      f"{run['total_s']:.2f} s ({px / run['total_s'] / 1e6:.3f} Mpx/s), "
                      f"pipeline {run['profile']['wall']:.2f} s, model_share "
                      f"{run['profile']['model_share']:.3f}", flush=True)

        for row in rows.values():
            row["bare_median_s"] = statistics.median(row["bare_s"])
            row["bare_mpx_s"] = bare_px / row["bare_median_s"] / 1e6
            if row["segment"]:
                px = args.slide_size**2
                row["segment_median_s"] = statistics.median(x["total_s"] for x in row["segment"])
                row["pipeline_median_s"] = statistics.median(x["profile"]["wall"]
                                                             for x in row["segment"])
                row["segment_mpx_s"] = px / row["segment_median_s"] / 1e6
                row["pipeline_mpx_s"] = px / row["pipeline_median_s"] / 1e6
        results[window] = rows

        best_bare = max(row["bare_mpx_s"] for row in rows.values())
        best_seg = max((row.get("segment_mpx_s", 0.0) for row in rows.values()), default=0.0)
        print()
        header = (f"{'W x T':>6} {'bare s':>8} {'bare Mpx/s':>11} {'rel':>5}"
                  + ("" if slide is None else f" {'e2e s':>8} {'e2e Mpx/s':>10} {'rel':>5} "
                     f"{'pipe Mpx/s':>11}"))
        print(f"window {window}, medians of {args.repeats} round(s):")
        print(header)
        print("-" * len(header))
        for c in configs:
            row = rows[name(c)]
            line = (f"{name(c):>6} {row['bare_median_s']:>8.2f} {row['bare_mpx_s']:>11.3f} "
                    f"{row['bare_mpx_s'] / best_bare:>5.2f}")
            if slide is not None:
                line += (f" {row['segment_median_s']:>8.2f} {row['segment_mpx_s']:>10.3f} "
                         f"{row['segment_mpx_s'] / best_seg:>5.2f} {row['pipeline_mpx_s']:>11.3f}")
            print(line)
        fastest = max(configs, key=lambda c: rows[name(c)]["bare_mpx_s"])
        print(f"fastest bare forward: {name(fastest)}"
              + ("" if slide is None else "; fastest end to end: "
                 + name(max(configs, key=lambda c: rows[name(c)]["segment_mpx_s"]))))
    if slide is not None:
        shutil.rmtree(out, ignore_errors=True)

    if args.json:
        record = {
            "benchmark": "threads", "command": [sys.executable, *sys.argv],
            "environment": environment(),
            "args": {**vars(args), "configs": [name(c) for c in configs]},
            "default": name(cpu_budget(None, None)),
            "tiles": {str(w): t for w, t in tiles.items()},
            "results": {str(w): rows for w, rows in results.items()},
        }
        write_json(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: ``segment_to_zarr()`` end to end against the bare forward, per architecture.

What it measures
----------------
For each registered architecture at equal width (``--base-channels``, default 16; depth
4 where the architecture has a depth; ``unet3d`` at its preset depth 3 with anisotropic
pooling; ``torch.manual_seed(0)``), the same pairing as ``bench_end_to_end.py``:

(a) **end to end**: ``segment_to_zarr(image, model, out, tile=T, dtype="uint8",
    overwrite=True, backend=B)`` on a synthetic image in memory: the seamless membrane
    slide of ``bench_memory.make_slide`` (``--size`` px square, uint8, seed 0) for the 2D
    architectures, and for ``unet3d`` a uint8 volume of ``--depth-planes`` x ``--size3d``
    x ``--size3d`` (numpy, seed 0, smoothed noise);
(b) **bare forward**: the fastest bare forward of any runtime (``bench_end_to_end``'s
    ``bare_candidates`` / ``choose_fastest``: torch in the pipeline's thread layouts and
    OpenVINO with 1 and 2 streams) on exactly the windows of ``tilerseg.plan`` of that
    image, pre-built in memory (divided by 255, channels-last).

Warm-up (untimed): one end-to-end call on a crop whose plan has the same window, and each
bare candidate on a few windows. Then ``--repeats`` rounds alternating which path runs
first; ``ratio = bare time / end-to-end time`` per round (= end-to-end throughput / bare
throughput), and the median of the paired ratios per architecture is printed with the
target >= 0.85.

Run from the repository root with the virtualenv active::

    python benchmarks/bench_architectures.py --size 2048 --repeats 3

Options: ``--size``, ``--tile`` (2D output tile, default 1024), ``--size3d``,
``--depth-planes``, ``--base-channels``, ``--repeats``, ``--backend`` (auto),
``--only NAME ...``, ``--workdir``, ``--json``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_end_to_end import (TARGET, EngineLog, add_output_arguments, bare_candidates,
                              choose_fastest, environment, open_workdir, time_end_to_end,
                              write_json)
from bench_memory import make_slide

import tilerseg
from tilerseg.engine import read_window
from tilerseg.engine.compute import memory_format

CONFIGS: dict[str, dict[str, Any]] = {
    "unet": {"depth": 4},
    "unet-keras": {"depth": 4},
    "unetpp": {"depth": 4},
    "fcn8s": {},
    "unet3d": {},  # depth 3, pooling [[1, 2, 2], [1, 2, 2], [2, 2, 2]]
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=2048, help="2D image side (default 2048)")
    parser.add_argument("--tile", type=int, default=1024, help="2D output tile (default 1024)")
    parser.add_argument("--size3d", type=int, default=256,
                        help="3D volume side in y and x (default 256)")
    parser.add_argument("--depth-planes", type=int, default=64,
                        help="3D volume planes (default 64)")
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="paired rounds (default 3)")
    parser.add_argument("--backend", choices=("auto", "torch", "openvino"), default="auto")
    parser.add_argument("--only", nargs="*", default=None, metavar="NAME",
                        help="architectures to run (default: all registered)")
    add_output_arguments(parser)
    return parser.parse_args(argv)


def volume(planes: int, side: int) -> np.ndarray:
    """A uint8 volume of smoothed noise (seed 0)."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    v = ndimage.gaussian_filter(rng.random((planes, side, side), dtype=np.float32), (1, 3, 3))
    v = (v - v.min()) / (v.max() - v.min())
    return (v * 255).astype(np.uint8)


def windows_of(image: np.ndarray, plan: tilerseg.TilePlan, ndim: int) -> list[torch.Tensor]:
    """Every input window of ``plan`` (/255, float32, channels-last) of ``image``."""
    fmt = memory_format(ndim)
    out = []
    for t in plan:
        w = read_window(image[None], t.read_start, plan.window).astype(np.float32) / 255
        out.append(torch.from_numpy(w[None]).contiguous(memory_format=fmt))
    return out


def run_one(name: str, image: np.ndarray, tile: Any, args: argparse.Namespace,
            workdir: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    model = tilerseg.create_model(name, base_channels=args.base_channels, **CONFIGS[name])
    g = tilerseg.model_geometry(model)
    model = model.to(memory_format=memory_format(g.ndim)).eval()
    plan = tilerseg.plan(image.shape, model, tile=tile)
    windows = windows_of(image, plan, g.ndim)
    pixels = int(np.prod(image.shape))
    print(f"\n== {name} {model.config}: halo {list(g.halo)}, step {list(g.step)}; image "
          f"{image.shape}, tile {plan.tile}, window {plan.window}, {len(plan)} tiles",
          flush=True)
    out = workdir / f"arch-{name}.zarr"
    log = EngineLog()
    with log.active():
        crop = np.ascontiguousarray(image[tuple(slice(0, min(n, 2 * t))
                                                for n, t in zip(image.shape, plan.tile))])
        assert tilerseg.plan(crop.shape, model, tile=plan.tile).window == plan.window
        time_end_to_end(crop, model, out, plan.tile, "fp32", args.backend)
        best, choice = choose_fastest(bare_candidates(model, tuple(plan.window), "fp32"),
                                      windows, pixels)
        rounds = []
        for r in range(args.repeats):
            if r % 2:
                bare = best.time(windows)
            log.take()
            total = time_end_to_end(image, model, out, plan.tile, "fp32", args.backend)[0]
            engine = log.engine(log.take())
            if not r % 2:
                bare = best.time(windows)
            rounds.append({"end_to_end_s": total, "bare_s": bare, "ratio": bare / total,
                           "engine": engine})
            print(f"round {r + 1}: end to end {total:.2f} s ({pixels / total / 1e6:.3f} "
                  f"Mpx/s, {engine}), bare {bare:.2f} s ({best.name}), ratio "
                  f"{bare / total:.3f}", flush=True)
        best.release()
    shutil.rmtree(out, ignore_errors=True)
    ratio = statistics.median(x["ratio"] for x in rounds)
    e2e = statistics.median(x["end_to_end_s"] for x in rounds)
    return {"config": model.config, "geometry": g.as_dict(), "image": list(image.shape),
            "tile": list(plan.tile), "window": list(plan.window), "tiles": len(plan),
            "bare_candidates_s": choice, "reference": best.name, "rounds": rounds,
            "median_ratio": ratio, "median_end_to_end_mpx_s": pixels / e2e / 1e6,
            "met": ratio >= TARGET}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = open_workdir(args.workdir)
    import tifffile

    slide = tifffile.imread(make_slide(workdir, args.size))
    names = args.only or tilerseg.list_models()
    results = {}
    for name in names:
        if name == "unet3d":
            image, tile = volume(args.depth_planes, args.size3d), None
        else:
            image, tile = slide, args.tile
        results[name] = run_one(name, image, tile, args, workdir)
    print(f"\nbase_channels {args.base_channels}, backend {args.backend}, {args.repeats} "
          f"paired rounds; target: median ratio >= {TARGET}")
    print(f"{'architecture':<12} {'image':>16} {'tile':>14} {'e2e Mpx/s':>10} "
          f"{'reference':>20} {'ratio':>6}")
    for name, r in results.items():
        print(f"{name:<12} {'x'.join(map(str, r['image'])):>16} "
              f"{'x'.join(map(str, r['tile'])):>14} {r['median_end_to_end_mpx_s']:>10.3f} "
              f"{r['reference']:>20} {r['median_ratio']:>6.3f}"
              f"{'' if r['met'] else '  (below target)'}")
    if args.json:
        write_json(args.json, {"benchmark": "architectures", "command": [sys.executable, *sys.argv],
                               "environment": environment(), "args": vars(args),
                               "results": results, "target": TARGET})
    return 0 if all(r["met"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

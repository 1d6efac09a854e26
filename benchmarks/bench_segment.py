"""Benchmark: tilerseg.segment() against the bare model forward on the same tiles.

What it measures
----------------
Wall-clock time of ``tilerseg.segment()`` on a random float32 image (default
2048 x 2048, fixed seed) with a valid-convolution U-Net (default depth 4, 16 base
channels) on the CPU, and, in the same process, the time of the bare model forward on
exactly the same input windows: every window pre-built as a channels-last tensor, the
model in channels-last format and eval mode, under ``torch.inference_mode()``, batched
as ``segment()`` batches them, running only ``model(x)`` (no window reads, no crop, no
softmax, no copy into the output). That bare forward is the ceiling for ``segment()``.

The figure of merit is ``ratio = bare time / segment time``; the target is
``ratio >= 0.90`` (``segment()`` adds at most ~10 % over the bare forward).

Each path is warmed up once (the first call includes one-time costs such as the
geometry probe), then for each repeat ``segment()`` and the bare forward are timed
back to back, in alternating order. The headline is the median of the per-repeat
ratios: each pair ran under the same machine load, so slow drift on a shared machine
cancels.

Run from the repository root::

    PYTHONPATH=. python benchmarks/bench_segment.py

Options: ``--size``, ``--tile``, ``--batch-size``, ``--repeats``, ``--base-channels``,
``--depth``, ``--threads`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch import nn

import tilerseg
from tilerseg.engine import read_window
from tilerseg.engine.device import default_batch_size
from tilerseg.geometry import TilePlan

TARGET = 0.90
DEVICE = "cpu"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time tilerseg.segment() against the bare model forward on the same tiles."
    )
    parser.add_argument("--size", type=int, default=2048, help="image side in pixels (square)")
    parser.add_argument("--tile", type=int, default=None,
                        help="output tile side (default: segment()'s default)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="tiles per forward (default: segment()'s default, 1 on the CPU)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each path")
    parser.add_argument("--base-channels", type=int, default=16, help="U-Net base channels")
    parser.add_argument("--depth", type=int, default=4, help="U-Net depth")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's default)")
    return parser.parse_args()


def build_batches(image: np.ndarray, tile_plan: TilePlan, batch_size: int) -> list[torch.Tensor]:
    """All input windows of the plan, batched in plan order, as channels-last tensors."""
    windows = [read_window(image[None], t.read_start, tile_plan.window) for t in tile_plan]
    batches = []
    for i in range(0, len(windows), batch_size):
        x = torch.from_numpy(np.stack(windows[i:i + batch_size]).astype(np.float32, copy=False))
        batches.append(x.contiguous(memory_format=torch.channels_last))
    return batches


def time_segment(image: np.ndarray, model: nn.Module, tile: int | None,
                 batch_size: int | None) -> float:
    """Seconds for one ``tilerseg.segment()`` call."""
    start = time.perf_counter()
    tilerseg.segment(image, model, tile=tile, batch_size=batch_size, device=DEVICE)
    return time.perf_counter() - start


def time_bare(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """Seconds for the bare forward over all pre-built batches."""
    start = time.perf_counter()
    with torch.inference_mode():
        for x in batches:
            model(x)
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    image = np.random.default_rng(0).random((args.size, args.size), dtype=np.float32)
    model = tilerseg.create_model("unet", depth=args.depth, base_channels=args.base_channels)
    model = model.to(memory_format=torch.channels_last).eval()

    tile_plan = tilerseg.plan(image.shape, model, args.tile, device=DEVICE)
    batch_size = (args.batch_size if args.batch_size is not None
                  else default_batch_size(torch.device(DEVICE)))
    batches = build_batches(image, tile_plan, batch_size)
    pixels = image.size

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {DEVICE}")
    print(f"image {image.shape} float32; unet depth {args.depth}, base {args.base_channels}")
    print(f"plan: tile {tile_plan.tile}, window {tile_plan.window}, grid {tile_plan.grid}, "
          f"{len(tile_plan)} tiles, batch size {batch_size} ({len(batches)} batches)")

    print("warm-up ...", flush=True)
    warm_segment = time_segment(image, model, args.tile, args.batch_size)
    warm_bare = time_bare(model, batches)
    print(f"warm-up: segment {warm_segment:.3f} s, bare {warm_bare:.3f} s")

    seg_times: list[float] = []
    bare_times: list[float] = []
    for r in range(args.repeats):
        if r % 2 == 0:  # alternate the order so that neither path always runs second
            seg = time_segment(image, model, args.tile, args.batch_size)
            bare = time_bare(model, batches)
        else:
            bare = time_bare(model, batches)
            seg = time_segment(image, model, args.tile, args.batch_size)
        seg_times.append(seg)
        bare_times.append(bare)
        print(f"repeat {r + 1}/{args.repeats}: segment {seg:.3f} s, bare {bare:.3f} s, "
              f"ratio {bare / seg:.3f}", flush=True)

    seg_med = statistics.median(seg_times)
    bare_med = statistics.median(bare_times)
    ratio = bare_med / seg_med
    ratio_med = statistics.median(b / s for b, s in zip(bare_times, seg_times))
    print(f"median segment: {seg_med:.3f} s ({pixels / seg_med / 1e6:.3f} Mpx/s)")
    print(f"median bare:    {bare_med:.3f} s ({pixels / bare_med / 1e6:.3f} Mpx/s)")
    print(f"ratio of medians (bare / segment): {ratio:.3f}")
    print(f"median of per-repeat ratios:       {ratio_med:.3f}  (headline: paired, so drift cancels)")
    print(f"target >= {TARGET:.2f}: {'met' if ratio_med >= TARGET else 'NOT met'}")


if __name__ == "__main__":
    main()

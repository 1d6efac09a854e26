"""Benchmark 1: ``segment_to_zarr()`` end to end against the bare model forward on its tiles.

What it measures
----------------
A seamless synthetic membrane slide of N x N uint8 pixels (default N = 8192) is written
once as a tiled (512 px), zlib-compressed BigTIFF with
:func:`tilerseg.synthetic.write_membrane_tiff` (seed 0) and cached in ``--workdir``. A
valid-convolution U-Net (depth 4, ``--base-channels`` 16, ``torch.manual_seed(0)``) then
segments it, in one process, along two paths timed in alternating order for
``--repeats`` rounds:

(a) **end to end**: ``segment_to_zarr(slide, model, out, tile=1024, dtype="uint8",
    overwrite=True)`` with its defaults (the pipelined executor; on a 2-core machine 2
    model workers x 1 torch thread). The time is the whole call: opening the TIFF,
    reading and decoding tiles, normalising, the model, softmax, cropping, uint8
    encoding, zstd compression, writing the chunks, the pyramid levels and the
    metadata. The run's profile (``attrs["tilerseg"]["profile"]`` of the output) is
    recorded too.
(b) **bare forward**: the model (eval, channels-last) on exactly the same input windows
    (``tilerseg.plan`` of the slide, windows read with ``read_window`` from the slide
    loaded in memory, divided by 255, pre-built as float32 channels-last tensors),
    ``model(x)`` only, under ``torch.inference_mode()``, run as the pipeline runs on
    the CPU: W Python threads, each with ``torch.set_num_threads(T)``, taking the next
    window from a shared counter. Both 2 x 1 and 1 x 2 (threads x torch threads, on
    2 cores; in general ``min(2, cores)`` x ``cores // 2`` and 1 x ``cores``) are timed
    once before the rounds; the faster is the reference used in every round.

Throughput is output pixels (N^2) per second for both paths, so the figure of merit,
``ratio = end-to-end throughput / bare throughput = bare time / end-to-end time``, is
how much of the model's own speed survives I/O, pre- and post-processing and the
pyramid. Target: the median of the per-round (paired) ratios >= 0.85.

The rounds alternate which path runs first, so neither always runs second on a shared
machine, and each pair ran under the same load. Before the rounds, both paths are warmed
up once on one tile (a 1024^2 crop of the slide in memory) so one-time costs (oneDNN
kernel selection for the window shape, lazy imports) fall outside the timings.

The time after the tiles is split from the profile: ``setup`` (everything before the
first tile: opening the image, the geometry probe, normalisation, creating the output and
the model workers, measured by ``segment_to_zarr``), ``wall`` (the tile pipeline) and
``commit`` (the remaining pyramid levels, final metadata and the move into place, timed
by wrapping ``OutputWriter.commit``). The line ``after tiles`` is
``total - wall - setup`` (= commit, plus anything left).

Memory: the pre-built windows take ``tiles x window^2 x 4`` bytes (64 x 1212^2 x 4 =
376 MB at 8192^2; 1.5 GB at 16384^2) plus the slide itself.

Run from the repository root, with the virtualenv active::

    python benchmarks/bench_end_to_end.py                          # 8192^2, 3 rounds
    python benchmarks/bench_end_to_end.py --json end_to_end.json   # also save the figures

Options: ``--size``, ``--tile``, ``--base-channels``, ``--repeats``, ``--workdir``
(default ``/tmp/tilerseg-bench``; slides there are reused), ``--json`` (see ``--help``).
A run costs ``2 x repeats + 2`` passes of the model over the whole slide (the rounds and
the choice of the reference), plus writing the slide the first time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# the cached slides are those of bench_memory.py (this directory is on sys.path)
from bench_memory import make_slide

import tilerseg
from tilerseg.engine import read_window
from tilerseg.io.writers import OutputWriter

TARGET = 0.85
MODEL_SEED = 0
DEPTH = 4
MIB = 1024**2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=8192, help="slide side in px (default 8192)")
    parser.add_argument("--tile", type=int, default=1024, help="output tile side (default 1024)")
    parser.add_argument("--base-channels", type=int, default=16,
                        help="U-Net base channels (default 16; depth is 4)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed rounds of both paths (default 3)")
    parser.add_argument("--workdir", default="/tmp/tilerseg-bench",
                        help="directory for the cached slide and the output "
                        "(default /tmp/tilerseg-bench)")
    parser.add_argument("--json", metavar="FILE", default=None,
                        help="also write the figures to FILE as JSON")
    return parser.parse_args(argv)


# -- inputs -------------------------------------------------------------------------------


def open_workdir(path: str) -> Path:
    """Create the scratch directory (if needed) and print it with the free disk space."""
    workdir = Path(path)
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"workdir {workdir}; free disk {shutil.disk_usage(workdir).free / 1024**3:.1f} GiB",
          flush=True)
    return workdir


def build_windows(image: np.ndarray, plan: tilerseg.TilePlan) -> list[torch.Tensor]:
    """Every input window of ``plan``, normalised (/255), as float32 channels-last tensors.

    Parameters
    ----------
    image : numpy.ndarray of uint8, shape (H, W)
        The slide, in memory.
    plan : TilePlan
        The tile plan ``segment_to_zarr`` uses for it.

    Returns
    -------
    list of torch.Tensor, each (1, 1, *plan.window)
    """
    image_cf = image[None]
    windows = []
    for t in plan:
        w = read_window(image_cf, t.read_start, plan.window).astype(np.float32) / np.float32(255)
        x = torch.from_numpy(w[None])
        windows.append(x.contiguous(memory_format=torch.channels_last))
    return windows


# -- the two paths ------------------------------------------------------------------------


class CommitTimer:
    """Times :meth:`OutputWriter.commit` (pyramid levels, final metadata, move into place).

    Used as a context manager, it wraps the method for the block and records the
    seconds of each call in :attr:`seconds`; behaviour is unchanged.
    """

    def __init__(self) -> None:
        self.seconds: list[float] = []

    @contextlib.contextmanager
    def active(self) -> Iterator[CommitTimer]:
        original = OutputWriter.commit

        def timed(writer: OutputWriter) -> Path:
            start = time.perf_counter()
            try:
                return original(writer)
            finally:
                self.seconds.append(time.perf_counter() - start)

        OutputWriter.commit = timed  # type: ignore[method-assign]
        try:
            yield self
        finally:
            OutputWriter.commit = original  # type: ignore[method-assign]


def time_end_to_end(image: Any, model: nn.Module, out: Path, tile: int
                    ) -> tuple[float, dict[str, Any], float]:
    """One ``segment_to_zarr`` call with the defaults.

    Returns
    -------
    seconds : float
        Wall time of the whole call.
    profile : dict
        ``attrs["tilerseg"]["profile"]`` of the output.
    commit : float
        Seconds of ``OutputWriter.commit`` (pyramid + metadata + move) within the call.
    """
    import zarr

    timer = CommitTimer()
    with timer.active():
        start = time.perf_counter()
        tilerseg.segment_to_zarr(image, model, out, tile=tile, dtype="uint8", overwrite=True)
        seconds = time.perf_counter() - start
    profile = dict(zarr.open_group(os.fspath(out), mode="r").attrs["tilerseg"]["profile"])
    return seconds, profile, sum(timer.seconds)


def time_bare(model: nn.Module, windows: list[torch.Tensor], workers: int,
              threads: int) -> float:
    """Seconds of the bare forward over ``windows`` with ``workers`` x ``threads``.

    Each of ``workers`` Python threads sets ``torch.set_num_threads(threads)`` and runs
    ``model(x)`` under ``torch.inference_mode()`` on the next window of a shared counter
    until none is left (as the pipeline's CPU workers take the next tile). The main
    thread's torch thread count is restored afterwards.

    Parameters
    ----------
    model : torch.nn.Module
        The model, eval mode, channels-last.
    windows : list of torch.Tensor
        Pre-built input windows.
    workers, threads : int
        Python threads and torch intra-op threads per Python thread.

    Returns
    -------
    float
    """
    lock = threading.Lock()
    order = iter(range(len(windows)))
    errors: list[BaseException] = []

    def work() -> None:
        try:
            torch.set_num_threads(threads)
            with torch.inference_mode():
                while True:
                    with lock:
                        i = next(order, None)
                    if i is None:
                        return
                    model(windows[i])
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller
            errors.append(err)

    previous = torch.get_num_threads()
    pool = [threading.Thread(target=work, name=f"bare-{k}") for k in range(workers)]
    start = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    seconds = time.perf_counter() - start
    torch.set_num_threads(previous)
    if errors:
        raise errors[0]
    return seconds


def thread_configs() -> list[tuple[int, int]]:
    """(Python threads, torch threads each): the pipeline's default split, then 1 x cores."""
    from tilerseg.engine.device import cpu_budget

    cores = os.cpu_count() or 1
    configs = [cpu_budget(None, None), (1, cores)]
    return list(dict.fromkeys(configs))


# -- reporting ----------------------------------------------------------------------------


def choose_reference(model: nn.Module, windows: list[torch.Tensor],
                     configs: list[tuple[int, int]], pixels: int, count: int | None = None
                     ) -> tuple[tuple[int, int], dict[str, float]]:
    """Time the bare forward once in each thread configuration; the fastest, and all times.

    ``count`` images (if given) are reported as images/s besides Mpx/s.
    """
    choice: dict[str, float] = {}
    for w, t in configs:
        seconds = time_bare(model, windows, w, t)
        choice[f"{w}x{t}"] = seconds
        images = f"{count / seconds:.2f} images/s, " if count else ""
        print(f"bare forward, {w} thread(s) x {t} torch thread(s): {seconds:.2f} s "
              f"({images}{pixels / seconds / 1e6:.3f} Mpx/s)", flush=True)
    best = min(configs, key=lambda c: choice[f"{c[0]}x{c[1]}"])
    print(f"reference: bare forward with {best[0]} x {best[1]}", flush=True)
    return best, choice


def profile_line(profile: dict[str, Any]) -> str:
    """One line: the pipeline's stage times from a run's profile."""
    return (f"pipeline wall {profile['wall']:.2f} s (setup {profile['setup']:.2f} s); busy: "
            f"read {profile['read']:.2f} s, compute {profile['compute']:.2f} s, "
            f"write {profile['write']:.2f} s; starved {profile['starved']:.2f} s, "
            f"blocked {profile['blocked']:.2f} s; model_share {profile['model_share']:.3f} "
            f"x {profile['compute_workers']} worker(s), {profile['tiles']} tiles")


def environment() -> dict[str, Any]:
    """Versions and core count, for the JSON record."""
    return {"python": platform.python_version(), "torch": torch.__version__,
            "tilerseg": tilerseg.__version__, "cores": os.cpu_count(),
            "machine": platform.machine(), "processor": platform.processor()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = open_workdir(args.workdir)
    slide = make_slide(workdir, args.size)
    out = workdir / f"end-to-end-{args.size}.zarr"
    pixels = args.size * args.size

    torch.manual_seed(MODEL_SEED)
    model = tilerseg.create_model("unet", depth=DEPTH, base_channels=args.base_channels)
    model = model.to(memory_format=torch.channels_last).eval()
    plan = tilerseg.plan((args.size, args.size), model, tile=args.tile)

    import tifffile

    image = tifffile.imread(slide)
    windows = build_windows(image, plan)
    print(f"torch {torch.__version__}, {os.cpu_count()} cores; unet depth {DEPTH}, "
          f"base {args.base_channels} (seed {MODEL_SEED})")
    print(f"plan: tile {plan.tile}, window {plan.window}, grid {plan.grid}, {len(plan)} tiles; "
          f"windows in memory {sum(w.nbytes for w in windows) / MIB:.0f} MiB", flush=True)

    # warm-up: one tile through each path
    crop = np.ascontiguousarray(image[: args.tile, : args.tile])
    warm = time_end_to_end(crop, model, workdir / "end-to-end-warm-up.zarr", args.tile)[0]
    configs = thread_configs()
    for w, t in configs:
        time_bare(model, windows[:max(1, w)], w, t)
    shutil.rmtree(workdir / "end-to-end-warm-up.zarr", ignore_errors=True)
    print(f"warm-up (one tile): end to end {warm:.2f} s", flush=True)

    best, choice = choose_reference(model, windows, configs, pixels)

    rounds: list[dict[str, Any]] = []
    for r in range(args.repeats):
        if r % 2 == 0:  # alternate the order so that neither path always runs second
            total, profile, commit = time_end_to_end(slide, model, out, args.tile)
            bare = time_bare(model, windows, *best)
        else:
            bare = time_bare(model, windows, *best)
            total, profile, commit = time_end_to_end(slide, model, out, args.tile)
        after = total - profile["wall"] - profile["setup"]
        rounds.append({"end_to_end_s": total, "bare_s": bare, "ratio": bare / total,
                       "after_tiles_s": after, "commit_s": commit,
                       "other_s": after - commit, "profile": profile})
        print(f"round {r + 1}/{args.repeats}: end to end {total:.2f} s "
              f"({pixels / total / 1e6:.3f} Mpx/s), bare {bare:.2f} s "
              f"({pixels / bare / 1e6:.3f} Mpx/s), ratio {bare / total:.3f}")
        print(f"  {profile_line(profile)}")
        print(f"  after tiles (total - wall - setup) {after:.2f} s = pyramid + metadata "
              f"(commit) {commit:.2f} s + open/probe/normalisation set-up {after - commit:.2f} s",
              flush=True)
    shutil.rmtree(out, ignore_errors=True)

    e2e_med = statistics.median(x["end_to_end_s"] for x in rounds)
    bare_med = statistics.median(x["bare_s"] for x in rounds)
    ratio_med = statistics.median(x["ratio"] for x in rounds)
    ok = ratio_med >= TARGET
    print()
    header = f"{'round':>5} {'e2e s':>8} {'e2e Mpx/s':>10} {'bare s':>8} {'bare Mpx/s':>11} " \
             f"{'ratio':>6} {'wall s':>7} {'after s':>8} {'model_share':>12}"
    print(header)
    print("-" * len(header))
    for i, x in enumerate(rounds, 1):
        print(f"{i:>5} {x['end_to_end_s']:>8.2f} {pixels / x['end_to_end_s'] / 1e6:>10.3f} "
              f"{x['bare_s']:>8.2f} {pixels / x['bare_s'] / 1e6:>11.3f} {x['ratio']:>6.3f} "
              f"{x['profile']['wall']:>7.2f} {x['after_tiles_s']:>8.2f} "
              f"{x['profile']['model_share']:>12.3f}")
    print(f"median end to end: {e2e_med:.2f} s ({pixels / e2e_med / 1e6:.3f} Mpx/s)")
    print(f"median bare ({best[0]} x {best[1]}): {bare_med:.2f} s "
          f"({pixels / bare_med / 1e6:.3f} Mpx/s)")
    print(f"median of paired ratios (end-to-end / bare throughput): {ratio_med:.3f}")
    print(f"target >= {TARGET:.2f}: {'met' if ok else 'NOT met'}")

    if args.json:
        record = {
            "benchmark": "end_to_end", "command": [sys.executable, *sys.argv],
            "environment": environment(), "args": vars(args),
            "slide": str(slide), "pixels": pixels,
            "plan": {"tile": list(plan.tile), "window": list(plan.window),
                     "grid": list(plan.grid), "tiles": len(plan)},
            "bare_configs_s": choice, "reference_config": list(best),
            "rounds": rounds,
            "median": {"end_to_end_s": e2e_med, "bare_s": bare_med,
                       "end_to_end_mpx_s": pixels / e2e_med / 1e6,
                       "bare_mpx_s": pixels / bare_med / 1e6, "paired_ratio": ratio_med},
            "target": TARGET, "met": ok,
        }
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: ``--cluster local:2`` (a ``dask.distributed`` LocalCluster) against the local
threaded executor, on the same cores.

What it measures
----------------
A seamless synthetic membrane slide of N x N uint8 pixels (default N = 8192) is written
once as a tiled (512 px), zlib-compressed BigTIFF with
:func:`tilerseg.synthetic.write_membrane_tiff` (seed 0) and cached in ``--workdir``
(``membrane-N.tif``, shared with the other benchmarks). The bundled model
(:func:`tilerseg.load_model`: the ISBI 2012 valid U-Net, depth 4, base 16) segments it
from the file, in one process, along two paths timed in alternating order for
``--repeats`` rounds:

(a) **local**: ``segment_to_zarr(slide, model, out, tile=512, overwrite=True)`` with its
    defaults (the pipelined executor: threads in this process; on a 2-core machine 2
    model workers x 1 torch thread);
(b) **cluster**: the same call with ``executor=client``, ``client`` being a
    ``distributed.Client`` on a ``LocalCluster`` of ``--workers`` (2) worker processes
    x 1 Dask thread on the loopback interface, started once before the rounds with
    ``tilerseg.engine.executors.cluster.connect(ClusterSpec("local", workers=2))``
    (what ``tilerseg run --cluster local:2`` does). Each worker process loads the model
    once, runs one long Dask task that claims tasks (up to 4 tiles each) and computes them
    through the same pipeline as the local run with ``cores // workers`` cores, reopens
    the TIFF itself and writes its chunks straight into the output; the client commits
    (pyramid, metadata). Whole processes, as users run them, are timed by
    ``bench_scale_out.py``.

Both times are the whole call. Throughput is output pixels (N^2) per second. The figure
of merit is the per-round (paired) ratio ``cluster throughput / local throughput =
local time / cluster time``: what a user gives up by running on a cluster of worker
processes instead of threads on the same cores. **Target: median paired ratio >= 0.85.**
The cluster's start-up (spawning the worker processes, importing, connecting) is timed
separately and is not part of the rounds; neither is its shutdown. Before the rounds
both paths are warmed up once, untimed, on a ``--warmup-size`` (2048) slide: 16 tiles,
4 tasks, so that both worker processes receive the model and select their kernels.

Each round also checks that the two outputs are identical: the level-0 arrays (uint8
probabilities) are compared with ``numpy.array_equal`` (untimed).

Peak memory per worker (``--rss-sizes``)
----------------------------------------
With ``--rss-sizes N1 N2 ...`` (e.g. ``4096 16384``), after the rounds and for each size,
a **fresh** LocalCluster of ``--workers`` processes is started, ``segment_to_zarr`` runs
on the N x N slide with a small fast model (``create_model("unet", depth=4,
base_channels=4)`` under ``torch.manual_seed(0)``) and tile ``--rss-tile`` (1024), and
each worker's peak resident set size is read in the worker itself with ``client.run``
(``VmHWM`` from ``/proc/self/status``: the kernel's high-water mark of that process,
exact, no polling). The table gives the peak per worker per size and the ratio of the
largest size's peak to the smallest size's (the maximum over workers of each).
**Target: ratio <= 1.3** (memory flat in the image size). ``--repeats 0`` skips the
throughput rounds and measures only the peaks.

Diagnostic: ``--no-malloc-trim``
--------------------------------
``distributed`` spawns its worker processes with ``MALLOC_TRIM_THRESHOLD_=65536`` in
their environment (dask config ``distributed.nanny.pre-spawn-environ``). Setting that
threshold explicitly also turns off glibc's dynamic mmap threshold, so every large
activation tensor of the U-Net is ``mmap``-ed, page-faulted in and ``munmap``-ed again at
each forward pass: on this 2-core machine one 700^2 forward with 1 torch thread took
0.47 s with the variable and 0.36-0.37 s without it, in a worker as in a plain process.
tilerseg's workers undo that setting themselves when they load the model (glibc
``mallopt``, see ``tilerseg.engine.executors.plugin.keep_freed_memory``).
``--no-malloc-trim`` also removes the variable from that setting for the clusters this
benchmark starts, to compare the two. The headline is the default (what ``tilerseg run
--cluster local:2`` does).

Run from the repository root, with the virtualenv active::

    python benchmarks/bench_cluster.py                                  # 8192^2, 3 rounds
    python benchmarks/bench_cluster.py --json cluster.json              # also save the figures
    python benchmarks/bench_cluster.py --rss-sizes 4096 16384 --repeats 1

Options: ``--size``, ``--tile``, ``--repeats``, ``--workers``, ``--warmup-size``,
``--rss-sizes``, ``--rss-tile``, ``--no-malloc-trim``, ``--workdir`` (default ``/tmp/tilerseg-bench``; slides
there are reused), ``--json`` (see ``--help``). A run costs ``2 x repeats`` passes of the
model over the slide plus the warm-ups (about 2 minutes per round at 8192^2 on 2
cores); ``--rss-sizes 4096 16384`` adds about 2 minutes. The exit status is 1 when a
target fails or two outputs differ. The entry point is guarded by ``if __name__ ==
"__main__":`` because the worker processes are spawned (they import this module).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# the cached slides are those of bench_memory.py (this directory is on sys.path)
from bench_end_to_end import add_output_arguments, open_workdir, write_json
from bench_memory import make_slide

TARGET = 0.85  # median paired ratio cluster / local throughput
MAX_RSS_RATIO = 1.3  # peak RSS per worker: largest size within 1.3x of the smallest
MODEL_SEED = 0
MIB = 1024**2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=8192, help="slide side in px (default 8192)")
    parser.add_argument("--tile", type=int, default=512, help="output tile side (default 512)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed rounds of both paths (default 3; 0: only --rss-sizes)")
    parser.add_argument("--workers", type=int, default=2,
                        help="worker processes of the LocalCluster (default 2)")
    parser.add_argument("--warmup-size", type=int, default=2048,
                        help="side of the warm-up slide (default 2048: 4 tasks of 4 tiles)")
    parser.add_argument("--rss-sizes", type=int, nargs="*", default=[],
                        help="also measure each worker's peak RSS on these slide sides, "
                        "a fresh cluster each (e.g. 4096 16384)")
    parser.add_argument("--rss-tile", type=int, default=1024,
                        help="output tile of the peak-RSS runs (default 1024)")
    parser.add_argument("--no-malloc-trim", action="store_true",
                        help="diagnostic: spawn the workers without the MALLOC_TRIM_THRESHOLD_ "
                        "that distributed sets by default (see the module docstring)")
    add_output_arguments(parser)
    return parser.parse_args(argv)


# -- runs -------------------------------------------------------------------------------


def time_run(slide: Path, model: Any, out: Path, tile: int, executor: Any = None
             ) -> tuple[float, dict[str, Any]]:
    """One ``segment_to_zarr`` call (whole call timed); its seconds and the output's profile."""
    import zarr

    import tilerseg

    start = time.perf_counter()
    tilerseg.segment_to_zarr(str(slide), model, out, tile=tile, overwrite=True,
                             executor=executor)
    seconds = time.perf_counter() - start
    profile = dict(zarr.open_group(os.fspath(out), mode="r").attrs["tilerseg"]["profile"])
    return seconds, profile


def same_level0(a: Path, b: Path) -> bool:
    """Whether the level-0 arrays of two outputs are identical (shape, dtype and values)."""
    import zarr

    x = zarr.open_group(os.fspath(a), mode="r")["0"]
    y = zarr.open_group(os.fspath(b), mode="r")["0"]
    return x.dtype == y.dtype and np.array_equal(x[...], y[...])


def peak_rss() -> int:
    """This process's peak resident set size in bytes (``VmHWM``; -1 without /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return -1


def worker_info() -> dict[str, Any]:
    """Run on a worker: its pid and torch threads (torch only if already imported)."""
    torch = sys.modules.get("torch")
    return {"pid": os.getpid(),
            "torch_threads": torch.get_num_threads() if torch is not None else None}


def start_cluster(workers: int, malloc_trim: bool = True) -> tuple[Any, Any, float]:
    """Enter ``connect(ClusterSpec("local", workers))``; (context, client, seconds).

    With ``malloc_trim=False`` the worker processes are spawned without the
    ``MALLOC_TRIM_THRESHOLD_`` that ``distributed`` puts in their environment by default
    (``distributed.nanny.pre-spawn-environ``); a diagnostic, not what users get.
    """
    import contextlib

    import dask
    import distributed  # noqa: F401 - loads distributed's configuration defaults

    from tilerseg.engine.executors.cluster import ClusterSpec, connect

    config: contextlib.AbstractContextManager = contextlib.nullcontext()
    if not malloc_trim:
        environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
        environ.pop("MALLOC_TRIM_THRESHOLD_", None)
        config = dask.config.set({"distributed.nanny.pre-spawn-environ": environ})
    start = time.perf_counter()
    context = connect(ClusterSpec("local", workers=workers))
    with config:
        client = context.__enter__()
    return context, client, time.perf_counter() - start


def worker_environ() -> dict[str, str | None]:
    """Run on a worker: the environment variables ``distributed`` sets before spawning it."""
    return {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS",
                                          "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


def stop_cluster(context: Any) -> float:
    """Close the client and the cluster; the seconds it took."""
    start = time.perf_counter()
    context.__exit__(None, None, None)
    return time.perf_counter() - start


def measure_rss(workdir: Path, sizes: list[int], tile: int, workers: int,
                malloc_trim: bool = True) -> list[dict[str, Any]]:
    """Peak RSS of each worker of a fresh LocalCluster per size, small model, tile ``tile``."""
    import torch

    import tilerseg

    torch.manual_seed(MODEL_SEED)
    small = tilerseg.create_model("unet", depth=4, base_channels=4)
    results = []
    for size in sizes:
        slide = make_slide(workdir, size)
        out = workdir / f"cluster-rss-{size}.zarr"
        context, client, startup = start_cluster(workers, malloc_trim)
        try:
            before = client.run(peak_rss)
            seconds, _ = time_run(slide, small, out, tile, executor=client)
            after = client.run(peak_rss)
            info = client.run(worker_info)
        finally:
            stop = stop_cluster(context)
        shutil.rmtree(out, ignore_errors=True)
        peaks = {addr: after[addr] for addr in sorted(after)}
        row = {"size": size, "pixels": size * size, "seconds": seconds,
               "startup_s": startup, "shutdown_s": stop,
               "peak_rss_before_bytes": {a: before.get(a) for a in peaks},
               "peak_rss_bytes": peaks, "workers": info,
               "max_peak_rss_bytes": max(peaks.values())}
        results.append(row)
        print(f"  {size}^2: {seconds:.1f} s ({size * size / seconds / 1e6:.2f} Mpx/s); "
              "peak RSS per worker "
              + ", ".join(f"{v / MIB:.0f} MiB" for v in peaks.values())
              + " (before the run: "
              + ", ".join(f"{row['peak_rss_before_bytes'][a] / MIB:.0f}" for a in peaks)
              + " MiB)", flush=True)
    return results


# -- reporting --------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    """Versions and core count, for the JSON record."""
    import dask
    import distributed
    import torch
    import zarr

    import tilerseg

    return {"python": platform.python_version(), "torch": torch.__version__,
            "dask": dask.__version__, "distributed": distributed.__version__,
            "zarr": zarr.__version__, "tilerseg": tilerseg.__version__,
            "cores": os.cpu_count(), "machine": platform.machine(),
            "processor": platform.processor()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import tilerseg

    workdir = open_workdir(args.workdir)
    record: dict[str, Any] = {"benchmark": "cluster", "command": [sys.executable, *sys.argv],
                              "environment": environment(), "args": vars(args)}
    ok = True

    if args.repeats > 0:
        slide = make_slide(workdir, args.size)
        warm_slide = make_slide(workdir, args.warmup_size)
        pixels = args.size * args.size
        model = tilerseg.load_model()
        plan = tilerseg.plan((args.size, args.size), model, tile=args.tile)
        print(f"{os.cpu_count()} cores; bundled model, tile {args.tile}: window {plan.window}, "
              f"grid {plan.grid}, {len(plan)} tiles", flush=True)
        out_local = workdir / f"cluster-local-{args.size}.zarr"
        out_cluster = workdir / f"cluster-dask-{args.size}.zarr"
        warm_local = workdir / "cluster-warm-local.zarr"
        warm_cluster = workdir / "cluster-warm-dask.zarr"

        context, client, startup = start_cluster(args.workers, not args.no_malloc_trim)
        try:
            environ = next(iter(client.run(worker_environ).values()))
            print(f"worker environment set by distributed: {environ}", flush=True)
            print(f"LocalCluster of {args.workers} worker process(es) started in "
                  f"{startup:.2f} s (not timed in the rounds)", flush=True)
            # warm-up, untimed: both paths once on a small slide
            warm_l = time_run(warm_slide, model, warm_local, args.tile)[0]
            warm_c = time_run(warm_slide, model, warm_cluster, args.tile, client)[0]
            workers = client.run(worker_info)
            print(f"warm-up ({args.warmup_size}^2): local {warm_l:.2f} s, cluster {warm_c:.2f} s; "
                  f"workers: " + ", ".join(f"pid {w['pid']} with {w['torch_threads']} torch "
                                          f"thread(s)" for w in workers.values()), flush=True)
            shutil.rmtree(warm_local, ignore_errors=True)
            shutil.rmtree(warm_cluster, ignore_errors=True)

            rounds: list[dict[str, Any]] = []
            for r in range(args.repeats):
                if r % 2 == 0:  # alternate the order so that neither path always runs second
                    local_s, local_p = time_run(slide, model, out_local, args.tile)
                    cluster_s, cluster_p = time_run(slide, model, out_cluster, args.tile, client)
                else:
                    cluster_s, cluster_p = time_run(slide, model, out_cluster, args.tile, client)
                    local_s, local_p = time_run(slide, model, out_local, args.tile)
                identical = same_level0(out_local, out_cluster)
                rounds.append({"local_s": local_s, "cluster_s": cluster_s,
                               "ratio": local_s / cluster_s, "identical": identical,
                               "first": "local" if r % 2 == 0 else "cluster",
                               "local_profile": local_p, "cluster_profile": cluster_p})
                print(f"round {r + 1}/{args.repeats} ({rounds[-1]['first']} first): local "
                      f"{local_s:.2f} s ({pixels / local_s / 1e6:.3f} Mpx/s), cluster "
                      f"{cluster_s:.2f} s ({pixels / cluster_s / 1e6:.3f} Mpx/s), ratio "
                      f"{local_s / cluster_s:.3f}; level 0 identical: {identical}", flush=True)
                print(f"  local: setup {local_p['setup']:.2f} s, pipeline {local_p['wall']:.2f} s, "
                      f"model_share {local_p['model_share']:.3f}; cluster: setup "
                      f"{cluster_p['setup']:.2f} s, tasks {cluster_p['wall']:.2f} s", flush=True)
        finally:
            shutdown = stop_cluster(context)
        shutil.rmtree(out_local, ignore_errors=True)
        shutil.rmtree(out_cluster, ignore_errors=True)

        local_med = statistics.median(x["local_s"] for x in rounds)
        cluster_med = statistics.median(x["cluster_s"] for x in rounds)
        ratio_med = statistics.median(x["ratio"] for x in rounds)
        identical_all = all(x["identical"] for x in rounds)
        met = ratio_med >= TARGET
        ok = ok and met and identical_all
        print()
        header = (f"{'round':>5} {'local s':>8} {'local Mpx/s':>12} {'cluster s':>10} "
                  f"{'cluster Mpx/s':>14} {'ratio':>6} {'identical':>10}")
        print(header)
        print("-" * len(header))
        for i, x in enumerate(rounds, 1):
            print(f"{i:>5} {x['local_s']:>8.2f} {pixels / x['local_s'] / 1e6:>12.3f} "
                  f"{x['cluster_s']:>10.2f} {pixels / x['cluster_s'] / 1e6:>14.3f} "
                  f"{x['ratio']:>6.3f} {x['identical']!s:>10}")
        print(f"median local: {local_med:.2f} s ({pixels / local_med / 1e6:.3f} Mpx/s)")
        print(f"median cluster (local:{args.workers}): {cluster_med:.2f} s "
              f"({pixels / cluster_med / 1e6:.3f} Mpx/s)")
        print(f"cluster start-up {startup:.2f} s, shutdown {shutdown:.2f} s (not in the rounds)")
        print(f"median of paired ratios (cluster / local throughput): {ratio_med:.3f}")
        print(f"target >= {TARGET:.2f}: {'PASS' if met else 'FAIL'}")
        print(f"outputs identical (level 0, numpy.array_equal) in every round: "
              f"{'PASS' if identical_all else 'FAIL'}", flush=True)
        record.update({
            "slide": str(slide), "pixels": pixels,
            "plan": {"tile": list(plan.tile), "window": list(plan.window),
                     "grid": list(plan.grid), "tiles": len(plan)},
            "cluster_startup_s": startup, "cluster_shutdown_s": shutdown,
            "warm_up_s": {"local": warm_l, "cluster": warm_c}, "workers": workers,
            "worker_environ": environ,
            "rounds": rounds,
            "median": {"local_s": local_med, "cluster_s": cluster_med,
                       "local_mpx_s": pixels / local_med / 1e6,
                       "cluster_mpx_s": pixels / cluster_med / 1e6,
                       "paired_ratio": ratio_med},
            "identical": identical_all, "target": TARGET, "met": met,
        })

    if args.rss_sizes:
        sizes = sorted(dict.fromkeys(args.rss_sizes))
        print(f"\npeak RSS per worker: a fresh LocalCluster of {args.workers} per size, "
              f"unet depth 4 base 4 (seed {MODEL_SEED}), tile {args.rss_tile}", flush=True)
        rss = measure_rss(workdir, sizes, args.rss_tile, args.workers, not args.no_malloc_trim)
        smallest, largest = rss[0], rss[-1]
        rss_ratio = largest["max_peak_rss_bytes"] / smallest["max_peak_rss_bytes"]
        rss_met = rss_ratio <= MAX_RSS_RATIO
        ok = ok and (rss_met or len(rss) < 2)
        print()
        names = [f"worker {k}" for k in range(args.workers)]
        header = (f"{'size':>8} {'wall s':>8} {'Mpx/s':>7} "
                  + " ".join(f"{n + ' MiB':>14}" for n in names) + f" {'max MiB':>8} {'ratio':>6}")
        print(header)
        print("-" * len(header))
        for row in rss:
            peaks = list(row["peak_rss_bytes"].values())
            ratio = row["max_peak_rss_bytes"] / smallest["max_peak_rss_bytes"]
            size_text = f"{row['size']}^2"
            print(f"{size_text:>8} "
                  f"{row['seconds']:>8.1f} {row['pixels'] / row['seconds'] / 1e6:>7.2f} "
                  + " ".join(f"{p / MIB:>14.0f}" for p in peaks)
                  + f" {row['max_peak_rss_bytes'] / MIB:>8.0f} {ratio:>6.2f}")
        if len(rss) >= 2:
            print(f"peak RSS per worker at {largest['size']}^2 / at {smallest['size']}^2: "
                  f"{rss_ratio:.2f}; target <= {MAX_RSS_RATIO}: {'PASS' if rss_met else 'FAIL'}",
                  flush=True)
        else:
            print("(one size only: no ratio)")
        record["rss"] = {"tile": args.rss_tile, "model": "unet depth 4 base 4, seed 0",
                         "sizes": rss, "ratio": rss_ratio if len(rss) >= 2 else None,
                         "target": MAX_RSS_RATIO, "met": rss_met if len(rss) >= 2 else None}

    if args.json:
        write_json(args.json, record)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: scale-out as users run it, in whole processes: ``--cluster local:2`` and
concurrent shards against one local run on the same cores, and the claims' bookkeeping.

What it measures
----------------
The slides are seamless synthetic membrane slides of N x N uint8 pixels, written once as
tiled (512 px) zlib BigTIFFs by :func:`tilerseg.synthetic.write_membrane_tiff` (seed 0) and
cached in ``--workdir`` (``membrane-N.tif``, shared with the other benchmarks). The model
is the bundled one (:func:`tilerseg.load_model`: the ISBI 2012 valid U-Net, depth 4, base
16), fp32, with the default backend (OpenVINO where installed), tile ``--tile`` (512).

1. **cluster** (``--sizes``, default 4096 and 8192): for each size, ``--repeats`` rounds of
   two whole processes, timed from the start of the process to its exit, in alternating
   order::

       python -m tilerseg run membrane-N.tif -o local.zarr --tile 512 --overwrite -q
       python -m tilerseg run membrane-N.tif -o cluster.zarr --tile 512 --overwrite -q --cluster local:2

   The figure of merit is the paired ratio ``local time / cluster time`` (the cluster's
   throughput as a fraction of the local run's), median over the rounds. Targets:
   **>= 0.85 at 4096^2 and >= 0.9 at 8192^2**. Each round checks that the two level-0
   arrays are identical.

2. **shards** (``--shard-size``, default 8192; ``--shards``, default 3): ``--repeats`` rounds
   of one local run (as above) and of ``--shards`` processes started at once on the same
   output with ``--shard I/N``, timed from the first start to the last exit. Ratio ``local /
   shards``, **target >= 0.85**. Output identical to the local run's.

3. **claims** (``--claim-tasks``, default 2450: the tasks of a 100,000 x 100,000 slide in
   1024-px tiles): the bookkeeping of one task without the model: claim it
   (:meth:`tilerseg.engine.workdir.WorkDir.claim`: a look for its record, an ``O_EXCL``
   create of the claim file and its JSON, a second look for the record), write its
   completion record (:meth:`~tilerseg.engine.workdir.WorkDir.mark_done`) and release the
   claim (read back, unlink), in a real work directory under ``--workdir``, in one process;
   the median of ``--repeats`` passes over all the tasks, per task and extrapolated to
   ``--claim-tasks`` tasks. The same with ``--claimers`` (3) processes claiming from one
   shared list at once (each task done once; the slowest process's loop, start-up
   excluded). Files touched per task are counted, for estimates on a shared filesystem
   (multiply by its metadata round trip).

Run from the repository root, with the virtualenv active::

    python benchmarks/bench_scale_out.py                        # all three parts
    python benchmarks/bench_scale_out.py --parts cluster --sizes 4096 --repeats 5
    python benchmarks/bench_scale_out.py --json scale-out.json

The exit status is 1 when a target is missed or two outputs differ. A full run takes about
12 minutes on 2 cores. The entry point is guarded by ``if __name__ == "__main__":``
(the claim processes are spawned).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_cluster import same_level0
from bench_end_to_end import add_output_arguments, open_workdir, write_json
from bench_memory import make_slide
from bench_resume import remove_output

TARGETS = {"cluster-4096": 0.85, "cluster-8192": 0.9, "shards": 0.85}
CLI = [sys.executable, "-m", "tilerseg", "run"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", default=["cluster", "shards", "claims"],
                        choices=["cluster", "shards", "claims"], help="what to measure")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192],
                        help="slide sides for the cluster part (default 4096 8192)")
    parser.add_argument("--shard-size", type=int, default=8192,
                        help="slide side for the shards part (default 8192)")
    parser.add_argument("--shards", type=int, default=3, help="shard processes (default 3)")
    parser.add_argument("--tile", type=int, default=512, help="output tile (default 512)")
    parser.add_argument("--workers", type=int, default=2,
                        help="worker processes of --cluster local:N (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--claim-tasks", type=int, default=2450,
                        help="tasks of the claims part (default 2450)")
    parser.add_argument("--claimers", type=int, default=3,
                        help="processes claiming at once in the claims part (default 3)")
    add_output_arguments(parser)
    return parser.parse_args(argv)


def run(command: list[str], cwd: Path) -> float:
    """Seconds from the start of a process to its exit (which must be 0)."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}): {done.stderr}")
    return seconds


def run_together(commands: list[list[str]], cwd: Path) -> float:
    """Seconds from starting all the processes at once to the last one's exit."""
    start = time.perf_counter()
    procs = [subprocess.Popen(c, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c in commands]
    outs = [p.communicate() for p in procs]
    seconds = time.perf_counter() - start
    for command, p, (_, err) in zip(commands, procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed ({p.returncode}): {err}")
    return seconds


def paired(rounds: list[dict[str, Any]], a: str, b: str) -> float:
    return statistics.median(r[a] / r[b] for r in rounds)


# -- 1. --cluster local:2 -----------------------------------------------------------------


def bench_cluster(workdir: Path, size: int, args: argparse.Namespace) -> dict[str, Any]:
    slide = make_slide(workdir, size)
    local, cluster = workdir / f"local-{size}.zarr", workdir / f"cluster-{size}.zarr"
    common = [str(slide), "--tile", str(args.tile), "--overwrite", "-q"]
    rounds = []
    for k in range(args.repeats):
        times = {}
        order = ["local", "cluster"] if k % 2 == 0 else ["cluster", "local"]
        for name in order:
            extra = ["--cluster", f"local:{args.workers}"] if name == "cluster" else []
            out = local if name == "local" else cluster
            times[name] = run([*CLI, *common, "-o", str(out), *extra], workdir)
        times["identical"] = same_level0(local, cluster)
        rounds.append(times)
        px = size * size / 1e6
        print(f"  {size}^2 round {k + 1}: local {times['local']:.2f} s "
              f"({px / times['local']:.2f} Mpx/s), cluster {times['cluster']:.2f} s "
              f"({px / times['cluster']:.2f} Mpx/s), ratio "
              f"{times['local'] / times['cluster']:.3f}, identical {times['identical']}",
              flush=True)
    remove_output(local)
    remove_output(cluster)
    ratio = paired(rounds, "local", "cluster")
    target = TARGETS.get(f"cluster-{size}", 0.85)
    return {"size": size, "rounds": rounds, "ratio": ratio, "target": target,
            "local_median_s": statistics.median(r["local"] for r in rounds),
            "cluster_median_s": statistics.median(r["cluster"] for r in rounds),
            "met": ratio >= target and all(r["identical"] for r in rounds)}


# -- 2. concurrent shards -------------------------------------------------------------------


def bench_shards(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    size, n = args.shard_size, args.shards
    slide = make_slide(workdir, size)
    local, sharded = workdir / f"local-{size}.zarr", workdir / f"shards-{size}.zarr"
    common = [str(slide), "--tile", str(args.tile), "-q"]
    rounds = []
    for k in range(args.repeats):
        times: dict[str, Any] = {}
        order = ["local", "shards"] if k % 2 == 0 else ["shards", "local"]
        for name in order:
            if name == "local":
                times["local"] = run([*CLI, *common, "-o", str(local), "--overwrite"], workdir)
            else:
                remove_output(sharded)
                times["shards"] = run_together(
                    [[*CLI, *common, "-o", str(sharded), "--shard", f"{i}/{n}"]
                     for i in range(n)], workdir)
        times["identical"] = same_level0(local, sharded)
        rounds.append(times)
        print(f"  {n} shards, {size}^2 round {k + 1}: local {times['local']:.2f} s, "
              f"shards {times['shards']:.2f} s, ratio {times['local'] / times['shards']:.3f}, "
              f"identical {times['identical']}", flush=True)
    remove_output(local)
    remove_output(sharded)
    ratio = paired(rounds, "local", "shards")
    return {"size": size, "shards": n, "rounds": rounds, "ratio": ratio,
            "target": TARGETS["shards"],
            "met": ratio >= TARGETS["shards"] and all(r["identical"] for r in rounds)}


# -- 3. the bookkeeping of claims -------------------------------------------------------------


def _work_dir(root: Path, tasks: int) -> Any:
    """A real work directory whose grid has ``tasks`` tasks (one row of tiles per task row)."""
    from tilerseg.engine.jobs import TaskGrid
    from tilerseg.engine.workdir import WorkDir

    remove_output(root)
    grid = TaskGrid((tasks, 4), (1, 4))
    manifest = {"format": "tilerseg-run", "format_version": 1, "config_hash": "bench",
                "output": str(root), "tasks": {"grid": list(grid.grid),
                                               "block": list(grid.block), "count": tasks}}
    work, _ = WorkDir.create(root.with_name(root.name + ".partial"), manifest,
                             lambda store: store.mkdir())
    return work


def _claim_all(path: str, ids: list[int], who: str) -> tuple[int, float]:
    """Claim, record and release every task of ``ids`` that nobody else has; (done, s)."""
    from tilerseg.engine.workdir import WorkDir

    work = WorkDir.open(Path(path))
    done = 0
    start = time.perf_counter()
    for k in ids:
        claim = work.claim(k, {"worker": who})
        if claim is None:
            continue
        work.mark_done(k, worker=who)
        claim.release()
        done += 1
    return done, time.perf_counter() - start


def bench_claims(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    n = args.claim_tasks
    one, many = [], []
    for _ in range(args.repeats):
        work = _work_dir(workdir / "claims.zarr", n)
        done, seconds = _claim_all(str(work.path), list(range(n)), "one")
        assert done == n and len(work.done()) == n
        one.append(seconds)
        work = _work_dir(workdir / "claims.zarr", n)
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(args.claimers) as pool:
            pool.starmap(_claim_all, [(str(work.path), [], "warm")] * args.claimers)
            results = pool.starmap(_claim_all, [(str(work.path), list(range(n)), f"p{i}")
                                                for i in range(args.claimers)])
        wall = max(s for _, s in results)  # each process's own loop (no start-up)
        assert sum(d for d, _ in results) == n and len(work.done()) == n  # each task once
        many.append(wall)
        print(f"  {n} tasks: one process {seconds:.3f} s ({1e3 * seconds / n:.3f} ms/task); "
              f"{args.claimers} processes at once {wall:.3f} s (tasks each: "
              f"{[d for d, _ in results]})", flush=True)
    remove_output(workdir / "claims.zarr")
    per_task = statistics.median(one) / n
    return {"tasks": n, "one_process_s": statistics.median(one),
            "per_task_ms": 1e3 * per_task, "claimers": args.claimers,
            "concurrent_s": statistics.median(many),
            "files_per_task": {"created": 2, "read": 1, "removed": 1, "looked_up": 3},
            "filesystem": _filesystem(workdir)}


def _filesystem(path: Path) -> str:
    try:
        out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True)
        return out.stdout.splitlines()[-1].split()[1]
    except (OSError, IndexError):
        return "?"


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = open_workdir(args.workdir)
    cpu = cpu_name()
    record: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(),
                              "date": time.strftime("%Y-%m-%d"), "tile": args.tile}
    print(f"{cpu}, {os.cpu_count()} cores", flush=True)
    ok = True
    if "cluster" in args.parts:
        print(f"--cluster local:{args.workers} against the local run (whole processes):")
        record["cluster"] = [bench_cluster(workdir, size, args) for size in args.sizes]
        for r in record["cluster"]:
            print(f"{r['size']}^2: median local {r['local_median_s']:.2f} s, cluster "
                  f"{r['cluster_median_s']:.2f} s, median paired ratio {r['ratio']:.3f} "
                  f"(target >= {r['target']}: {'met' if r['met'] else 'NOT met'})")
            ok &= r["met"]
    if "shards" in args.parts:
        print(f"{args.shards} concurrent shards against the local run (whole processes):")
        r = record["shards"] = bench_shards(workdir, args)
        print(f"median paired ratio {r['ratio']:.3f} (target >= {r['target']}: "
              f"{'met' if r['met'] else 'NOT met'})")
        ok &= r["met"]
    if "claims" in args.parts:
        print("claims: bookkeeping per task, no model:")
        r = record["claims"] = bench_claims(workdir, args)
        print(f"{r['per_task_ms']:.3f} ms per task on {r['filesystem']} "
              f"(one process; {r['tasks']} tasks: {r['one_process_s']:.2f} s); "
              f"{r['claimers']} processes at once: {r['concurrent_s']:.2f} s")
    if args.json:
        write_json(args.json, record)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

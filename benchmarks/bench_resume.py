"""Benchmark: resuming a killed ``tilerseg run``, and ``--resume`` on a finished output.

What it measures
----------------
A seamless synthetic membrane slide of N x N uint8 pixels (default N = 4096) is written
once as a tiled (512 px), zlib-compressed BigTIFF with
:func:`tilerseg.synthetic.write_membrane_tiff` (seed 0) and cached in ``--workdir``
(``membrane-N.tif``, shared with the other benchmarks). Everything runs through the
command line, each command in a fresh child process (``sys.executable -m tilerseg``),
with the bundled model (the default) and ``--tile 512``; times are wall-clock times of
the whole child process (interpreter start-up, imports and model loading included):

(a) **full**: an uninterrupted run into ``resume-full-N.zarr`` (removed first)::

        python -m tilerseg run membrane-N.tif -o resume-full-N.zarr --tile 512 --overwrite -q

(b) **killed, then resumed**: the same run into ``resume-killed-N.zarr`` (removed first,
    with its ``.partial`` folder), started without ``--resume``; the benchmark polls
    ``resume-killed-N.zarr.partial/done/`` (one completion record per finished task)
    every 10 ms and sends ``SIGKILL`` as soon as it holds at least half of the task
    count of ``manifest.json`` (``["tasks"]["count"]``). Then the resumed run is timed
    to completion::

        python -m tilerseg run membrane-N.tif -o resume-killed-N.zarr --tile 512 --resume -q

    The figure of merit is the paired ratio ``resumed time / full time`` (the resumed run
    should do only the missing half, plus start-up and the commit). **Target: median
    ratio <= 0.6.** The resumed output's level-0 array must equal the uninterrupted
    run's (``numpy.array_equal``, untimed); a difference fails the benchmark.

(a) and (b) are repeated ``--repeats`` times, alternating which goes first; medians are
reported. Before the rounds one untimed run on a small slide (``--warmup-size``, 1024)
warms the page cache of the interpreter, torch and the model file.

(c) **already complete**: ``--resume`` on the finished output of (a), with the same
parameters (``-q`` left out, so the message can be checked)::

        python -m tilerseg run membrane-N.tif -o resume-full-N.zarr --tile 512 --resume

    It must print ``... is already complete`` and exit 0 without importing torch. The
    wall time of the whole process, median of ``--complete-repeats`` (5). **Target: < 2 s.**
    The interpreter's bare start-up (``python -c pass``, median of 5) is printed beside it.

Run from the repository root, with the virtualenv active::

    python benchmarks/bench_resume.py                        # 4096^2, 3 rounds
    python benchmarks/bench_resume.py --json resume.json     # also save the figures

Options: ``--size``, ``--tile``, ``--repeats``, ``--complete-repeats``, ``--warmup-size``,
``--workdir`` (default ``/tmp/tilerseg-bench``; slides there are reused), ``--json`` (see
``--help``). A round costs about two passes of the model over the slide (one full, two
halves); about 2.5 minutes in all at 4096^2 on 2 cores. The exit status is 1 when a
target fails or the outputs differ.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# the cached slides are those of bench_memory.py (this directory is on sys.path)
from bench_end_to_end import add_output_arguments, open_workdir, write_json
from bench_memory import make_slide

RESUME_TARGET = 0.6  # median resumed / full time
COMPLETE_TARGET = 2.0  # seconds, --resume on a complete output
POLL_S = 0.01


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="slide side in px (default 4096)")
    parser.add_argument("--tile", type=int, default=512, help="output tile side (default 512)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of (a) full and (b) killed + resumed (default 3)")
    parser.add_argument("--complete-repeats", type=int, default=5,
                        help="runs of (c) --resume on the complete output (default 5)")
    parser.add_argument("--warmup-size", type=int, default=1024,
                        help="side of the untimed warm-up slide (default 1024)")
    add_output_arguments(parser)
    return parser.parse_args(argv)


# -- the command line -------------------------------------------------------------------


def command(slide: Path, out: Path, tile: int, *flags: str) -> list[str]:
    return [sys.executable, "-m", "tilerseg", "run", str(slide), "-o", str(out),
            "--tile", str(tile), *flags]


def partial(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def remove_output(out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(partial(out), ignore_errors=True)


def run_timed(cmd: list[str]) -> tuple[float, str]:
    """Run ``cmd`` to completion; (wall seconds of the process, its stdout). Fails loudly."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"command failed with status {proc.returncode}: {' '.join(cmd)}")
    return seconds, proc.stdout


def done_count(work: Path) -> int:
    try:
        return sum(1 for n in os.listdir(work / "done") if n.isdigit())
    except FileNotFoundError:
        return 0


def task_count(work: Path) -> int | None:
    try:
        manifest = json.loads((work / "manifest.json").read_text(encoding="utf-8"))
        return int(manifest["tasks"]["count"])
    except (OSError, ValueError, KeyError, TypeError):  # not there yet, or being written
        return None


def run_killed(cmd: list[str], out: Path) -> dict[str, Any]:
    """Start ``cmd``; SIGKILL it once half of its tasks are recorded as done."""
    work = partial(out)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    tasks = None
    try:
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read() if proc.stderr else ""
                raise SystemExit(f"the run to be killed ended by itself (status "
                                 f"{proc.returncode}) before half of its tasks were done:\n{err}")
            if tasks is None:
                tasks = task_count(work)
            if tasks is not None and done_count(work) >= tasks / 2:
                break
            time.sleep(POLL_S)
        seen = done_count(work)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
    killed_at = time.perf_counter() - start
    if proc.returncode != -signal.SIGKILL:
        raise SystemExit(f"the run was not killed by SIGKILL (status {proc.returncode})")
    return {"tasks": tasks, "done_seen": seen, "done_after_kill": done_count(work),
            "killed_after_s": killed_at}


def level0(out: Path) -> np.ndarray:
    import zarr

    return zarr.open_group(os.fspath(out), mode="r")["0"][...]


def environment() -> dict[str, Any]:
    """Versions and core count, for the JSON record (without importing torch)."""
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "torch": v("torch"), "zarr": v("zarr"),
            "tilerseg": v("tilerseg"), "cores": os.cpu_count(),
            "machine": platform.machine(), "processor": platform.processor()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = open_workdir(args.workdir)
    slide = make_slide(workdir, args.size)
    warm_slide = make_slide(workdir, args.warmup_size)
    pixels = args.size * args.size
    full_out = workdir / f"resume-full-{args.size}.zarr"
    killed_out = workdir / f"resume-killed-{args.size}.zarr"

    full_cmd = command(slide, full_out, args.tile, "--overwrite", "-q")
    start_cmd = command(slide, killed_out, args.tile, "-q")
    resume_cmd = command(slide, killed_out, args.tile, "--resume", "-q")
    complete_cmd = command(slide, full_out, args.tile, "--resume")
    for name, cmd in (("full", full_cmd), ("killed", start_cmd), ("resumed", resume_cmd),
                      ("complete", complete_cmd)):
        print(f"{name:>8}: $ {' '.join(cmd)}")

    # warm-up, untimed: one small run through the command line
    warm_out = workdir / "resume-warm-up.zarr"
    remove_output(warm_out)
    warm = run_timed(command(warm_slide, warm_out, args.tile, "-q"))[0]
    remove_output(warm_out)
    print(f"warm-up ({args.warmup_size}^2, untimed): {warm:.2f} s", flush=True)

    rounds: list[dict[str, Any]] = []
    for r in range(args.repeats):
        def full() -> float:
            remove_output(full_out)
            return run_timed(full_cmd)[0]

        def killed_and_resumed() -> tuple[dict[str, Any], float]:
            remove_output(killed_out)
            kill = run_killed(start_cmd, killed_out)
            return kill, run_timed(resume_cmd)[0]

        if r % 2 == 0:  # alternate the order so that neither path always runs second
            full_s = full()
            kill, resumed_s = killed_and_resumed()
        else:
            kill, resumed_s = killed_and_resumed()
            full_s = full()
        identical = bool(np.array_equal(level0(full_out), level0(killed_out)))
        row = {"full_s": full_s, "resumed_s": resumed_s, "ratio": resumed_s / full_s,
               "identical": identical, "first": "full" if r % 2 == 0 else "killed", **kill}
        rounds.append(row)
        print(f"round {r + 1}/{args.repeats} ({row['first']} first): full {full_s:.2f} s "
              f"({pixels / full_s / 1e6:.3f} Mpx/s); killed after {kill['killed_after_s']:.2f} s "
              f"with {kill['done_seen']}/{kill['tasks']} tasks seen done "
              f"({kill['done_after_kill']} recorded after the kill); resumed {resumed_s:.2f} s; "
              f"ratio {resumed_s / full_s:.3f}; level 0 identical: {identical}", flush=True)

    # (c) --resume on the complete output
    complete: list[float] = []
    messages = []
    for _ in range(args.complete_repeats):
        seconds, stdout = run_timed(complete_cmd)
        complete.append(seconds)
        messages.append(stdout.strip())
    said_complete = all("is already complete" in m for m in messages)
    bare_python = [run_timed([sys.executable, "-c", "pass"])[0] for _ in range(5)]
    print("--resume on the complete output: " + ", ".join(f"{s:.2f}" for s in complete)
          + f" s; output: {messages[0]!r}", flush=True)
    remove_output(full_out)
    remove_output(killed_out)

    full_med = statistics.median(x["full_s"] for x in rounds)
    resumed_med = statistics.median(x["resumed_s"] for x in rounds)
    ratio_med = statistics.median(x["ratio"] for x in rounds)
    killed_med = statistics.median(x["killed_after_s"] for x in rounds)
    complete_med = statistics.median(complete)
    identical_all = all(x["identical"] for x in rounds)
    resume_met = ratio_med <= RESUME_TARGET
    complete_met = complete_med < COMPLETE_TARGET and said_complete
    ok = resume_met and complete_met and identical_all

    print()
    header = (f"{'round':>5} {'full s':>8} {'killed at s':>12} {'done/tasks':>11} "
              f"{'resumed s':>10} {'ratio':>6} {'identical':>10}")
    print(header)
    print("-" * len(header))
    for i, x in enumerate(rounds, 1):
        done = f"{x['done_after_kill']}/{x['tasks']}"
        print(f"{i:>5} {x['full_s']:>8.2f} {x['killed_after_s']:>12.2f} {done:>11} "
              f"{x['resumed_s']:>10.2f} {x['ratio']:>6.3f} {x['identical']!s:>10}")
    print(f"median full run: {full_med:.2f} s ({pixels / full_med / 1e6:.3f} Mpx/s, "
          "process start-up included)")
    print(f"median killed-run time to the kill: {killed_med:.2f} s")
    print(f"median resumed run: {resumed_med:.2f} s")
    print(f"median of paired ratios (resumed / full): {ratio_med:.3f}; target <= "
          f"{RESUME_TARGET}: {'PASS' if resume_met else 'FAIL'}")
    print(f"resumed output identical to the uninterrupted one (level 0) in every round: "
          f"{'PASS' if identical_all else 'FAIL'}")
    print(f"--resume on a complete output: median {complete_med:.2f} s of "
          f"{len(complete)} (bare 'python -c pass': {statistics.median(bare_python):.2f} s); "
          f"said 'is already complete': {said_complete}; target < {COMPLETE_TARGET:.0f} s: "
          f"{'PASS' if complete_met else 'FAIL'}", flush=True)

    if args.json:
        record = {
            "benchmark": "resume", "command": [sys.executable, *sys.argv],
            "environment": environment(), "args": vars(args), "slide": str(slide),
            "pixels": pixels,
            "commands": {"full": full_cmd, "killed": start_cmd, "resumed": resume_cmd,
                         "complete": complete_cmd},
            "warm_up_s": warm, "rounds": rounds,
            "complete_s": complete, "complete_output": messages, "python_startup_s": bare_python,
            "median": {"full_s": full_med, "resumed_s": resumed_med, "paired_ratio": ratio_med,
                       "killed_after_s": killed_med, "complete_s": complete_med},
            "identical": identical_all,
            "targets": {"paired_ratio_max": RESUME_TARGET, "complete_s_max": COMPLETE_TARGET},
            "met": {"resume": resume_met, "complete": complete_met},
        }
        write_json(args.json, record)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

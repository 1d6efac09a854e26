"""Benchmark: many small images through the Python API and the command line.

What it measures
----------------
``--count`` (200) synthetic membrane images of ``--side`` x ``--side`` (512 x 512) uint8,
``tilerseg.synthetic.membrane_image((side, side), seed=k)[0]`` for k = 0 ... count - 1,
written once as TIFFs into ``--workdir``/``small/batch-SIDE/`` (``bench_batch.make_images``
in a folder of its own, so the 500-image folder of ``bench_batch.py`` is left alone) and
reused. The bundled model (:func:`tilerseg.load_model`) segments all of them along these
paths, with ``--precision`` (fp32) and ``--backend`` (auto: OpenVINO when installed), all
other options at their defaults (tile 512: one tile from a 700 px window per image):

``api-segment``
    ``tilerseg.segment(image, model, precision=P, backend=B)`` in a loop in this process,
    on the images already in memory (read untimed; float32 probabilities returned in
    memory, nothing written). Each call plans, builds its runner and sets up the runtime
    (for OpenVINO, a network compiled by an earlier call of this process is reused:
    tilerseg keeps a few per process; the log tells how long each set-up took).
``api-batch``
    ``tilerseg.segment_batch([folder], model, out_dir, overwrite=True, precision=P,
    backend=B)``: every TIFF into ``out_dir/NAME.tilerseg.zarr`` (uint8 probabilities with
    the pyramid); ``out_dir`` deleted (untimed) before each run; all statuses must be
    ``"done"``.
``cli-batch``
    ``python -m tilerseg batch FOLDER -o OUT_DIR -q`` (plus ``--precision`` /
    ``--backend`` when not the defaults) in a fresh process: interpreter start-up,
    imports, loading the model and all the images; whole-process wall time.
``cli-run`` (per process, not per batch)
    ``python -m tilerseg run IMG -o OUT.zarr --overwrite -q`` on single images, each a
    fresh process (``--singles`` per round, on images 0, 1, 2, ...), to show what one
    process costs beyond its image; ``python -m tilerseg --version`` (the interpreter
    and the command line without torch) is timed beside it.
``bare``
    The reference: the fastest bare forward of the same model on the same ``count``
    input windows (700 x 700, read with ``read_window``, mirror-filled, /255, pre-built)
    at the same precision, among torch 2 x 1 / 1 x 2 threads (autocast for bf16) and
    OpenVINO with 1 and 2 streams (``bench_end_to_end.bare_candidates``), each timed
    once before the rounds.

Every path is warmed up once, untimed, on 2 images first (the OpenVINO network for the
700 px window is converted and cached under ``$TILERSEG_CACHE_DIR/openvino`` then, if it
was not already). Then ``--repeats`` rounds run every path once, in an order rotated per
round. Reported per path: median seconds, ms per image, images/s, Mpx/s (output pixels
``count x side^2``) and the median of the paired ratios ``bare time / path time`` (the
share of the fastest bare forward's speed the path keeps; no pass/fail target). For
``cli-run``: the median process wall time and its excess over the bare forward's time
per image. For ``api-segment``, how often (and how long) the runtime was set up,
from tilerseg's log.

Run from the repository root, with the virtualenv active::

    python benchmarks/bench_small.py --json small.json
    python benchmarks/bench_small.py --count 20 --repeats 1          # a quick look

Options: ``--count`` (200), ``--side`` (512), ``--repeats`` (3), ``--singles`` (3 per
round), ``--precision`` (fp32), ``--backend`` (auto), ``--paths`` (all), ``--workdir``
(``/tmp/tilerseg-bench``), ``--json``. The pre-built windows take ``count x 700^2 x 4``
bytes (392 MB at the defaults).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_batch import check_done, image_name, load_windows, make_images
from bench_end_to_end import (
    write_json,
    add_output_arguments,
    EngineLog,
    bare_candidates,
    choose_fastest,
    environment,
    open_workdir,
)
from bench_peers import timed_process

import tilerseg

PATHS = ("api-segment", "api-batch", "cli-batch", "cli-run", "bare")
MIB = 1024**2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=200, help="number of images (default 200)")
    parser.add_argument("--side", type=int, default=512, help="image side in px (default 512)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--singles", type=int, default=3,
                        help="single-image `tilerseg run` processes per round (default 3)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--backend", choices=("auto", "torch", "openvino"), default="auto")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS),
                        help="paths to time (default all; bare is always the reference)")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if "bare" not in args.paths:
        args.paths.append("bare")
    return args


def cli_options(args: argparse.Namespace) -> list[str]:
    """The flags that differ from the command line's defaults."""
    out = []
    if args.precision != "fp32":
        out += ["--precision", args.precision]
    if args.backend != "auto":
        out += ["--backend", args.backend]
    return out


def run_process(command: list[str], log: Path) -> float:
    wall, _, code, text = timed_process(command, log)
    if code != 0:
        print(text[-3000:])
        raise SystemExit(f"command failed with status {code}: {' '.join(command)}")
    flagged = [line for line in text.splitlines() if "WARNING" in line or "eagerly" in line]
    for line in flagged:
        print(f"  {line}")
    return wall


def setup_stats(lines: list[str]) -> dict[str, Any]:
    """How often the runtime was set up in a stretch of tilerseg's log, and for how long."""
    compiled = [float(m.group(1)) for line in lines
                if (m := re.search(r"OpenVINO: compiled for .* in ([0-9.]+) s", line))]
    setups = [float(m.group(1)) for line in lines
              if (m := re.search(r"runs the model .*set up in ([0-9.]+) s", line))]
    return {"openvino_compiles": len(compiled), "openvino_compile_s": round(sum(compiled), 3),
            "runtime_setups": len(setups), "runtime_setup_s": round(sum(setups), 3)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = open_workdir(args.workdir)
    folder = make_images(workdir / "small", args.count, args.side)
    count = args.count
    pixels = count * args.side * args.side
    paths = [p for p in PATHS if p in args.paths]

    import tifffile

    from tilerseg.engine.backends import resolve_backend

    model = tilerseg.load_model().eval()
    plan = tilerseg.plan((args.side, args.side), model)
    images = [tifffile.imread(folder / image_name(k)) for k in range(count)]
    windows = load_windows(folder, count, plan)
    backend = resolve_backend(args.backend, "cpu")
    print(f"torch {torch.__version__}; bundled model; {count} images of {args.side}^2; plan per "
          f"image: tile {plan.tile}, window {plan.window}, {len(plan)} tile(s); precision "
          f"{args.precision}, backend {args.backend} (-> {backend}); windows in memory "
          f"{sum(w.nbytes for w in windows) / MIB:.0f} MiB", flush=True)

    out_api = workdir / "small-out-api"
    out_cli = workdir / "small-out-cli"
    out_single = workdir / "small-out-single.zarr"
    logs = workdir / "small-logs"
    logs.mkdir(exist_ok=True)
    warm_folder = workdir / "small" / "warm-up"
    warm_folder.mkdir(parents=True, exist_ok=True)
    for k in range(min(2, count)):
        shutil.copyfile(folder / image_name(k), warm_folder / image_name(k))
    opts = {"precision": args.precision, "backend": args.backend}
    extra = cli_options(args)
    cli_batch = [sys.executable, "-m", "tilerseg", "batch", str(folder), "-o", str(out_cli),
                 "-q", *extra]
    version = [sys.executable, "-m", "tilerseg", "--version"]

    def single(k: int) -> list[str]:
        return [sys.executable, "-m", "tilerseg", "run", str(folder / image_name(k % count)),
                "-o", str(out_single), "--overwrite", "-q", *extra]

    log = EngineLog()

    def api_segment(subset: list[np.ndarray]) -> tuple[float, dict[str, Any]]:
        log.take()
        start = time.perf_counter()
        for image in subset:
            tilerseg.segment(image, model, **opts)
        seconds = time.perf_counter() - start
        return seconds, setup_stats(log.take())

    def api_batch(inputs: list[str]) -> tuple[float, dict[str, Any]]:
        shutil.rmtree(out_api, ignore_errors=True)  # untimed: every run computes every image
        log.take()
        start = time.perf_counter()
        results = tilerseg.segment_batch(inputs, model, out_api, overwrite=True, **opts)
        seconds = time.perf_counter() - start
        lines = log.take()
        expected = sum(1 for _ in Path(inputs[0]).glob("*.tif"))
        statuses = check_done(results, expected)
        return seconds, {"statuses": statuses, "engine": EngineLog.engine(lines),
                         **setup_stats(lines)}

    def cli(command: list[str], name: str) -> float:
        shutil.rmtree(out_cli, ignore_errors=True)
        return run_process(command, logs / f"{name}.log")

    with log.active():
        # warm-up, untimed, on 2 images through every path
        print("warm-up (untimed, 2 images per path) ...", flush=True)
        warm: dict[str, Any] = {}
        if "api-segment" in paths:
            warm["api-segment"] = api_segment(images[:2])
        if "api-batch" in paths:
            warm["api-batch"] = api_batch([str(warm_folder)])
        if "cli-batch" in paths:
            warm["cli-batch"] = cli([sys.executable, "-m", "tilerseg", "batch", str(warm_folder),
                                     "-o", str(out_cli), "-q", *extra], "warm-cli-batch")
        if "cli-run" in paths:
            warm["cli-run"] = run_process(single(0), logs / "warm-cli-run.log")
            warm["version"] = run_process(version, logs / "warm-version.log")
        for key, value in warm.items():
            print(f"  {key}: {value if isinstance(value, float) else value[0]:.2f} s", flush=True)

        candidates = bare_candidates(model, tuple(plan.window), args.precision)
        best, choice = choose_fastest(candidates, windows, pixels, count)

        timed = [p for p in paths if p != "cli-run"]
        rounds: list[dict[str, Any]] = []
        singles: list[float] = []
        versions: list[float] = []
        for r in range(args.repeats):
            k = r % len(timed)
            order = timed[k:] + timed[:k]
            record: dict[str, Any] = {"order": order}
            for path in order:
                if path == "api-segment":
                    record["api-segment"], record["api-segment-setup"] = api_segment(images)
                elif path == "api-batch":
                    record["api-batch"], record["api-batch-info"] = api_batch([str(folder)])
                elif path == "cli-batch":
                    record["cli-batch"] = cli(cli_batch, f"cli-batch-{r + 1}")
                elif path == "bare":
                    record["bare"] = best.time(windows)
            if "cli-run" in paths:
                record["cli-run"] = [run_process(single(r * args.singles + j),
                                                 logs / f"cli-run-{r + 1}-{j}.log")
                                     for j in range(args.singles)]
                record["version"] = run_process(version, logs / "version.log")
                singles += record["cli-run"]
                versions.append(record["version"])
            rounds.append(record)
            bare = record["bare"]
            parts = []
            for path in timed:
                if path != "bare":
                    parts.append(f"{path} {record[path]:.2f} s (ratio {bare / record[path]:.3f})")
            text = ", ".join(parts)
            if "cli-run" in paths:
                text += (f"; cli-run {', '.join(f'{x:.2f}' for x in record['cli-run'])} s per "
                         f"process, --version {record['version']:.2f} s")
            print(f"round {r + 1}/{args.repeats} (order {', '.join(order)}): bare {bare:.2f} s; "
                  f"{text}", flush=True)
            if "api-segment-setup" in record:
                s = record["api-segment-setup"]
                print(f"  api-segment set up the runtime {s['runtime_setups']} time(s) "
                      f"({s['runtime_setup_s']:.2f} s in all, OpenVINO compile "
                      f"{s['openvino_compile_s']:.2f} s over {s['openvino_compiles']} "
                      f"compile(s))", flush=True)
    shutil.rmtree(out_api, ignore_errors=True)
    shutil.rmtree(out_cli, ignore_errors=True)
    shutil.rmtree(out_single, ignore_errors=True)

    bare_med = statistics.median(x["bare"] for x in rounds)
    summary: dict[str, dict[str, float]] = {}
    for path in timed:
        med = statistics.median(x[path] for x in rounds)
        ratio = statistics.median(x["bare"] / x[path] for x in rounds)
        summary[path] = {"seconds": med, "ms_per_image": med / count * 1e3,
                         "images_s": count / med, "mpx_s": pixels / med / 1e6,
                         "ratio_vs_bare": ratio}
    print()
    print(f"{count} images of {args.side}^2 ({pixels / 1e6:.1f} Mpx), precision "
          f"{args.precision}, backend {args.backend} (-> {backend}); bare reference "
          f"{best.name}; medians of {args.repeats} round(s)")
    header = (f"{'path':<12} {'seconds':>8} {'ms/image':>9} {'images/s':>9} {'Mpx/s':>7} "
              f"{'vs bare':>8}")
    print(header)
    print("-" * len(header))
    for path, s in summary.items():
        print(f"{path:<12} {s['seconds']:>8.2f} {s['ms_per_image']:>9.1f} {s['images_s']:>9.2f} "
              f"{s['mpx_s']:>7.3f} {s['ratio_vs_bare']:>8.3f}")
    per_image_bare = bare_med / count
    if singles:
        single_med = statistics.median(singles)
        version_med = statistics.median(versions)
        summary["cli-run"] = {"seconds_per_process": single_med,
                              "excess_over_bare_s": single_med - per_image_bare,
                              "version_s": version_med, "runs": singles}
        print(f"{'cli-run':<12} {single_med:>8.2f} {single_med * 1e3:>9.1f} "
              f"{1 / single_med:>9.2f} {args.side**2 / single_med / 1e6:>7.3f} "
              f"{per_image_bare / single_med:>8.3f}   (one image per fresh process, median of "
              f"{len(singles)})")
        print(f"one `tilerseg run` process costs {single_med:.2f} s for one image whose bare "
              f"forward takes {per_image_bare * 1e3:.0f} ms: {single_med - per_image_bare:.2f} s "
              f"of set-up per process (`tilerseg --version` alone: {version_med:.2f} s)")
    if "api-segment" in summary:
        s = rounds[-1]["api-segment-setup"]
        if s["runtime_setups"]:
            print(f"api-segment: the runtime was set up {s['runtime_setups']} times per "
                  f"{count} calls ({s['runtime_setup_s'] / count * 1e3:.0f} ms per call), "
                  f"OpenVINO compile {s['openvino_compile_s'] / max(1, count) * 1e3:.0f} ms "
                  f"per call")

    if args.json:
        record = {"benchmark": "small", "command": [sys.executable, *sys.argv],
                  "environment": environment(), "args": vars(args),
                  "backend_resolved": backend, "folder": str(folder), "images": count,
                  "pixels": pixels,
                  "plan": {"tile": list(plan.tile), "window": list(plan.window),
                           "tiles_per_image": len(plan)},
                  "commands": {"cli-batch": cli_batch, "cli-run": single(0),
                               "version": version},
                  "warm_up": {k: (v if isinstance(v, float) else v[0]) for k, v in warm.items()},
                  "bare_candidates_s": choice, "reference": best.name,
                  "rounds": rounds, "median": summary, "warnings": log.warnings}
        write_json(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())

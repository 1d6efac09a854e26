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
    overwrite=True, precision=P, backend=B)`` with its defaults otherwise (the pipelined
    executor; on a 2-core machine 2 model workers x 1 thread; ``backend="auto"`` is
    OpenVINO on the CPU when it is installed, with one infer request per worker). The
    time is the whole call: opening the TIFF, reading and decoding tiles, normalising,
    setting up the runtime (for OpenVINO, the network compiled by an earlier call of
    this process is reused), the model, softmax,
    cropping, uint8 encoding, zstd compression, writing the chunks, the pyramid levels
    and the metadata. The run's profile (``attrs["tilerseg"]["profile"]`` of the output)
    is recorded too, and the runtime that really ran (``Replica.engine``, read from
    tilerseg's log; a fallback to eager torch is reported).
(b) **bare forward**: the fastest bare forward *at the same precision* on exactly the
    same input windows (``tilerseg.plan`` of the slide, windows read with
    ``read_window`` from the slide loaded in memory, divided by 255, pre-built as
    float32 channels-last tensors), the model alone, driven as the pipeline drives it
    on the CPU: W Python threads taking the next window from a shared counter. The
    candidates, each timed once before the rounds (the fastest is the reference of
    every round):

    * torch, W x T: each of W threads sets ``torch.set_num_threads(T)`` and runs
      ``model(x)`` under ``torch.inference_mode()`` (and, for bf16,
      ``torch.autocast("cpu", dtype=torch.bfloat16)``), for 2 x 1 and 1 x 2 on 2 cores
      (in general ``cpu_budget()`` and 1 x ``cores``);
    * OpenVINO, when installed (whatever ``--backend`` is):
      ``tilerseg.engine.openvino_backend.openvino_forward(model, (1, 1, *window),
      precision, streams=S, threads=cores)`` for S = 1 and 2, driven by S Python threads
      (one infer request each; OpenVINO releases the GIL while it infers).

Throughput is output pixels (N^2) per second for both paths, so the figure of merit,
``ratio = end-to-end throughput / bare throughput = bare time / end-to-end time``, is
how much of the fastest available forward pass survives I/O, pre- and post-processing,
the choice of runtime and the pyramid. Target: the median of the per-round (paired)
ratios >= 0.85. The absolute Mpx/s of both paths are printed too; for bf16 the issue's
second target, >= 8 Mpx/s end to end on an AMX Xeon, is printed with whether this CPU has
AMX (it is not judged on a CPU without it).

The rounds alternate which path runs first, so neither always runs second on a shared
machine, and each pair ran under the same load. Caches are warm before the rounds: one
full untimed end-to-end call (``segment_to_zarr`` with the same precision and backend)
on a 2 x 2-tile crop of the slide in memory, whose plan has the full slide's window
shape (checked), so the OpenVINO conversion of the network for that shape (cached on
disk under ``$TILERSEG_CACHE_DIR/openvino``, with its check against eager torch), the
oneDNN kernel selection and lazy imports are not timed; every bare candidate also runs
untimed on a few windows first (OpenVINO's first inference is slow). tilerseg keeps the
last few compiled OpenVINO networks per process (keyed by weights, window, precision,
streams and threads), so the timed calls reuse the one the warm-up compiled, as a
user's repeated calls in one process do; the bare candidate with 2 streams on 2 cores
has the pipeline's key and runs that very network.

The time after the tiles is split from the profile: ``setup`` (everything before the
first tile: opening the image, the geometry probe, normalisation, creating the output and
the model workers, and setting up the runtime, for OpenVINO reading the cached network and
compiling it; measured by ``segment_to_zarr``), ``wall`` (the tile pipeline) and
``commit`` (the remaining pyramid levels, final metadata and the move into place, timed
by wrapping ``OutputWriter.commit``). The line ``after tiles`` is
``total - wall - setup`` (= commit, plus anything left).

Memory: the pre-built windows take ``tiles x window^2 x 4`` bytes (64 x 1212^2 x 4 =
376 MB at 8192^2; 1.5 GB at 16384^2) plus the slide itself.

Run from the repository root, with the virtualenv active::

    python benchmarks/bench_end_to_end.py                          # 8192^2, 3 rounds
    python benchmarks/bench_end_to_end.py --json end_to_end.json   # also save the figures

    python benchmarks/bench_end_to_end.py --precision bf16         # bf16, fastest runtime
    python benchmarks/bench_end_to_end.py --backend torch          # end to end with torch

Options: ``--size``, ``--tile``, ``--base-channels``, ``--repeats``, ``--precision``
(fp32), ``--backend`` (auto), ``--workdir``
(default ``/tmp/tilerseg-bench``; slides there are reused), ``--json`` (see ``--help``).
A run costs ``2 x repeats`` passes of the model over the whole slide (the rounds), plus
one per bare candidate (2 torch, 2 OpenVINO) to choose the reference, plus writing the
slide the first time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import re
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

# the cached slides are those of bench_memory.py (this directory is on sys.path)
from bench_memory import make_slide
from torch import nn

import tilerseg
from tilerseg.engine import read_window
from tilerseg.io.writers import OutputWriter

TARGET = 0.85
TARGET_AMX_BF16_MPX_S = 8.0  # the second target: bf16 end to end on an AMX Xeon
MODEL_SEED = 0
DEPTH = 4
MIB = 1024**2


def write_json(path: str, record: dict[str, Any]) -> None:
    """Write a benchmark's figures to ``path`` (its folder created) and say so."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {path}")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--workdir`` (cached inputs and outputs) and ``--json``, as every benchmark has."""
    parser.add_argument("--workdir", default="/tmp/tilerseg-bench",
                        help="directory for the cached inputs and the outputs "
                        "(default /tmp/tilerseg-bench)")
    parser.add_argument("--json", metavar="FILE", default=None,
                        help="also write the figures to FILE as JSON")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=8192, help="slide side in px (default 8192)")
    parser.add_argument("--tile", type=int, default=1024, help="output tile side (default 1024)")
    parser.add_argument("--base-channels", type=int, default=16,
                        help="U-Net base channels (default 16; depth is 4)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed rounds of both paths (default 3)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "int8"), default="fp32",
                        help="forward-pass precision of both paths (default fp32); int8 runs "
                        "the bundled model (trained: an untrained one fails the int8 check), "
                        "calibrated on a 2048^2 crop of the slide, written once to "
                        "WORKDIR/calibration-N/ and passed as calibration= to both paths")
    parser.add_argument("--backend", choices=("auto", "torch", "openvino"), default="auto",
                        help="runtime of the end-to-end path (default auto: OpenVINO when "
                        "installed); the bare reference is the fastest runtime whatever it is")
    add_output_arguments(parser)
    return parser.parse_args(argv)


# -- inputs -------------------------------------------------------------------------------


def calibration_folder(workdir: Path, slide: Path, size: int) -> Path:
    """``WORKDIR/calibration-N/``: a folder holding the slide's top-left 2048^2 as
    ``crop.tif`` (written once), the int8 calibration of the benchmarks."""
    import tifffile

    folder = workdir / f"calibration-{size}"
    if not (folder / "crop.tif").is_file():
        folder.mkdir(exist_ok=True)
        tifffile.imwrite(folder / "crop.tif", tifffile.imread(slide)[:2048, :2048])
    return folder


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


def time_end_to_end(image: Any, model: nn.Module, out: Path, tile: int,
                    precision: str = "fp32", backend: str = "auto",
                    calibration: Path | None = None
                    ) -> tuple[float, dict[str, Any], float]:
    """One ``segment_to_zarr`` call with the defaults (and ``precision``, ``backend``).

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
        tilerseg.segment_to_zarr(image, model, out, tile=tile, dtype="uint8", overwrite=True,
                                 precision=precision, backend=backend, calibration=calibration)
        seconds = time.perf_counter() - start
    profile = dict(zarr.open_group(os.fspath(out), mode="r").attrs["tilerseg"]["profile"])
    return seconds, profile, sum(timer.seconds)


def time_bare(model: nn.Module, windows: list[torch.Tensor], workers: int,
              threads: int, precision: str = "fp32") -> float:
    """Seconds of the bare forward over ``windows`` with ``workers`` x ``threads``.

    Each of ``workers`` Python threads sets ``torch.set_num_threads(threads)`` and runs
    ``model(x)`` under ``torch.inference_mode()`` (and, for ``precision="bf16"``, under
    ``torch.autocast("cpu", dtype=torch.bfloat16)``, entered in each thread: autocast is
    thread-local) on the next window of a shared counter until none is left (as the
    pipeline's CPU workers take the next tile). The main thread's torch thread count is
    restored afterwards.

    Parameters
    ----------
    model : torch.nn.Module
        The model, eval mode, channels-last.
    windows : list of torch.Tensor
        Pre-built input windows.
    workers, threads : int
        Python threads and torch intra-op threads per Python thread.
    precision : {"fp32", "bf16"}
        Autocast precision.

    Returns
    -------
    float
    """
    previous = torch.get_num_threads()

    def context() -> contextlib.AbstractContextManager:
        torch.set_num_threads(threads)
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        stack.enter_context(autocast(precision))
        return stack

    try:
        return drive(model, windows, workers, context)
    finally:
        torch.set_num_threads(previous)


def drive(call: Any, windows: list[torch.Tensor], workers: int,
          context: Any = contextlib.nullcontext) -> float:
    """Seconds of ``workers`` Python threads calling ``call(window)`` over ``windows``.

    Each thread enters ``context()`` once, then takes the next window of a shared counter
    until none is left (as the pipeline's CPU workers take the next tile). The first
    error of any thread is re-raised.
    """
    lock = threading.Lock()
    order = iter(range(len(windows)))
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with context():
                while True:
                    with lock:
                        i = next(order, None)
                    if i is None:
                        return
                    call(windows[i])
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller
            errors.append(err)

    pool = [threading.Thread(target=work, name=f"bare-{k}") for k in range(workers)]
    start = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    return seconds


def autocast(precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on the CPU for bf16, nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    raise ValueError(f"precision {precision!r}: fp32 or bf16")


def time_openvino(forward: Any, windows: list[torch.Tensor], streams: int) -> float:
    """Seconds of ``streams`` Python threads running an OpenVINO network over ``windows``.

    ``forward`` is a :class:`tilerseg.engine.openvino_backend.OpenVINOForward` (one
    infer request per stream); each thread takes the next window of a shared counter
    until none is left, as :func:`time_bare` does.
    """
    return drive(forward, windows, streams)


class BareCandidate:
    """One way to run the bare forward: a runtime, a precision and a thread layout.

    ``kind`` is ``"torch"`` (``workers`` x ``threads``, see :func:`time_bare`) or
    ``"openvino"`` (``workers`` = streams, each driven by one Python thread, ``threads``
    = OpenVINO's CPU threads in all, see :func:`time_openvino`). An OpenVINO network is
    converted (or read from the cache) and compiled on first use and kept.
    """

    def __init__(self, kind: str, model: nn.Module, window: tuple[int, ...], precision: str,
                 workers: int, threads: int, int8: dict[str, Any] | None = None) -> None:
        self.kind, self.model, self.window, self.precision = kind, model, window, precision
        self.workers, self.threads = workers, threads
        self.int8 = int8 or {}  # int8: the geometry and calibration of the run
        self.forward: Any = None
        self.details: dict[str, Any] = {}

    @property
    def name(self) -> str:
        if self.kind == "torch":
            return f"torch {self.workers}x{self.threads}"
        return f"openvino {self.workers} stream(s)"

    def describe(self) -> str:
        if self.kind == "torch":
            return (f"torch, {self.workers} thread(s) x {self.threads} torch thread(s), "
                    f"{self.precision}")
        extra = ""
        if self.details:
            extra = (f"; OpenVINO reports inference precision {self.details['ov_precision']}, "
                     f"{self.details['ov_streams']} stream(s)")
        return (f"OpenVINO, {self.workers} stream(s) x {self.workers} Python thread(s), "
                f"{self.threads} CPU thread(s) in all, {self.precision}{extra}")

    def build(self) -> None:
        if self.kind != "openvino" or self.forward is not None:
            return
        from tilerseg.engine.openvino_backend import openvino_forward

        start = time.perf_counter()
        self.forward = openvino_forward(self.model, (1, 1, *self.window), self.precision,
                                        streams=self.workers, threads=self.threads,
                                        **self.int8)
        self.details = {"ov_precision": self.forward.precision,
                        "ov_streams": self.forward.streams,
                        "build_s": round(time.perf_counter() - start, 3)}

    def time(self, windows: list[torch.Tensor]) -> float:
        """Seconds of the bare forward over ``windows``."""
        if self.kind == "torch":
            return time_bare(self.model, windows, self.workers, self.threads, self.precision)
        self.build()
        return time_openvino(self.forward, windows, self.workers)

    def release(self) -> None:
        """Drop a compiled OpenVINO network (its memory) unless it is the reference."""
        self.forward = None


def bare_candidates(model: nn.Module, window: tuple[int, ...], precision: str,
                    int8: dict[str, Any] | None = None) -> list[BareCandidate]:
    """The torch thread configurations (not for int8, which is OpenVINO's alone), and
    OpenVINO with 1 and 2 streams if installed."""
    from tilerseg.engine.backends import openvino_available
    from tilerseg.engine.cores import available_cores

    out = [] if precision == "int8" else [
        BareCandidate("torch", model, window, precision, w, t) for w, t in thread_configs()]
    if openvino_available():
        cores = available_cores()
        out += [BareCandidate("openvino", model, window, precision, s, cores, int8)
                for s in dict.fromkeys((1, min(2, cores)))]
    return out


def choose_fastest(candidates: list[BareCandidate], windows: list[torch.Tensor], pixels: int,
                   count: int | None = None) -> tuple[BareCandidate, dict[str, float]]:
    """Warm up every candidate, time each once on all ``windows``; the fastest and all times.

    The others' OpenVINO networks are released. ``count`` images (if given) are reported
    as images/s besides Mpx/s.
    """
    for c in candidates:  # untimed: conversion/compilation, first inferences
        c.build()
        c.time(windows[:max(2, c.workers)])
    times: dict[str, float] = {}
    for c in candidates:
        seconds = c.time(windows)
        times[c.name] = seconds
        images = f"{count / seconds:.2f} images/s, " if count else ""
        print(f"bare forward, {c.describe()}: {seconds:.2f} s "
              f"({images}{pixels / seconds / 1e6:.3f} Mpx/s)", flush=True)
    best = min(candidates, key=lambda c: times[c.name])
    for c in candidates:
        if c is not best:
            c.release()
    print(f"reference: the fastest bare forward, {best.name}", flush=True)
    return best, times


class EngineLog(logging.Handler):
    """Collects tilerseg's INFO log during a call: which runtime ran, and any warning.

    Warnings (a runtime that failed its check and fell back to eager torch) are printed
    at once. :meth:`engine` is the runtime of the last pipeline started (the local
    executor logs ``... with ENGINE, N writer(s)``).
    """

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.warnings: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.lines.append(f"{record.name}: {message}")
        if record.levelno >= logging.WARNING:
            self.warnings.append(message)
            print(f"  [{record.levelname} {record.name}] {message}", flush=True)

    @contextlib.contextmanager
    def active(self) -> Iterator[EngineLog]:
        logger = logging.getLogger("tilerseg")
        previous = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(self)
        try:
            yield self
        finally:
            logger.removeHandler(self)
            logger.setLevel(previous)

    def take(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines

    @staticmethod
    def engine(lines: list[str]) -> str | None:
        found = None
        for line in lines:
            m = re.search(r"compute worker\(s\) on .* with (\S+), \d+ writer", line)
            if m:
                found = m.group(1)
        return found

    @staticmethod
    def runtime_lines(lines: list[str]) -> list[str]:
        keys = ("runs the model", "OpenVINO: compiled", "OpenVINO: converted", "failed on",
                "changed the probabilities", "compute worker(s)")
        return [line for line in lines if any(k in line for k in keys)]


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
    """Versions, core count and the CPU's bf16 units, for the JSON record."""
    from tilerseg.engine.backends import cpu_features, openvino_available

    openvino_version = None
    if openvino_available():
        import openvino

        openvino_version = openvino.get_version()
    return {"python": platform.python_version(), "torch": torch.__version__,
            "tilerseg": tilerseg.__version__, "openvino": openvino_version,
            "cores": os.cpu_count(), "machine": platform.machine(),
            "processor": platform.processor(), "cpu_features": cpu_features(),
            "cache_dir": os.environ.get("TILERSEG_CACHE_DIR")}


def amx_line(mpx_s: float) -> tuple[str, bool | None]:
    """The bf16 second target (>= 8 Mpx/s end to end on an AMX Xeon), judged only with AMX."""
    from tilerseg.engine.backends import cpu_features

    features = cpu_features()
    head = (f"bf16 end to end {mpx_s:.3f} Mpx/s; second target >= {TARGET_AMX_BF16_MPX_S:g} "
            f"Mpx/s on an AMX Xeon: ")
    if features["amx_bf16"]:
        met = mpx_s >= TARGET_AMX_BF16_MPX_S
        return head + ("met" if met else "NOT met") + f" (this CPU has AMX, {os.cpu_count()} "\
            "cores)", met
    return head + (f"not judged here: this CPU has no AMX (avx512_bf16: "
                   f"{features['avx512_bf16']}, {os.cpu_count()} cores)"), None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = open_workdir(args.workdir)
    slide = make_slide(workdir, args.size)
    out = workdir / f"end-to-end-{args.size}.zarr"
    pixels = args.size * args.size

    torch.manual_seed(MODEL_SEED)
    if args.precision == "int8":  # an untrained network's near-0.5 probabilities fail the
        model = tilerseg.load_model()  # int8 check (labels flip): a trained one, the bundled
    else:
        model = tilerseg.create_model("unet", depth=DEPTH, base_channels=args.base_channels)
    model = model.to(memory_format=torch.channels_last).eval()
    plan = tilerseg.plan((args.size, args.size), model, tile=args.tile)

    import tifffile

    from tilerseg.engine.backends import cache_dir, resolve_backend

    image = tifffile.imread(slide)
    windows = build_windows(image, plan)
    backend = resolve_backend(args.backend, "cpu")
    print(f"torch {torch.__version__}, {os.cpu_count()} cores; "
          f"{'the bundled model (depth 4, base 16), ' if args.precision == 'int8' else ''}"
          f"unet depth {DEPTH}, "
          f"base {args.base_channels} (seed {MODEL_SEED}); precision {args.precision}, "
          f"backend {args.backend} (-> {backend}); cache {cache_dir()}")
    print(f"plan: tile {plan.tile}, window {plan.window}, grid {plan.grid}, {len(plan)} tiles; "
          f"windows in memory {sum(w.nbytes for w in windows) / MIB:.0f} MiB", flush=True)

    calibration, int8 = None, None
    if args.precision == "int8":  # one calibration for both paths, as a user's folder
        from tilerseg.engine.options import RunOptions
        from tilerseg.engine.prepare import prepare

        calibration = calibration_folder(workdir, slide, args.size)
        p = prepare(image[:64, :64], model, RunOptions(precision="int8",
                                                       calibration=str(calibration)))
        geometry, drawn = p.runner.calibration()
        int8 = {"geometry": geometry, "calibration": drawn}

    log = EngineLog()
    with log.active():
        # warm-up, untimed: one full end-to-end call on a crop with the slide's window shape
        side = min(args.size, 2 * args.tile)
        crop = np.ascontiguousarray(image[:side, :side])
        crop_plan = tilerseg.plan(crop.shape, model, tile=args.tile)
        if tuple(crop_plan.window) != tuple(plan.window):
            raise SystemExit(f"warm-up crop {crop.shape} has window {crop_plan.window}, "
                             f"not the slide's {plan.window}")
        warm_out = workdir / "end-to-end-warm-up.zarr"
        warm = time_end_to_end(crop, model, warm_out, args.tile, args.precision,
                               args.backend, calibration)[0]
        shutil.rmtree(warm_out, ignore_errors=True)
        warm_lines = log.take()
        warm_engine = log.engine(warm_lines)
        print(f"warm-up (one end-to-end call on a {side}^2 crop, {len(crop_plan)} tiles of "
              f"window {crop_plan.window}): {warm:.2f} s, runtime {warm_engine}", flush=True)
        for line in log.runtime_lines(warm_lines):
            print(f"  {line}")

        candidates = bare_candidates(model, tuple(plan.window), args.precision, int8)
        best, choice = choose_fastest(candidates, windows, pixels)

        rounds: list[dict[str, Any]] = []
        for r in range(args.repeats):
            if r % 2 == 0:  # alternate the order so that neither path always runs second
                log.take()
                total, profile, commit = time_end_to_end(slide, model, out, args.tile,
                                                         args.precision, args.backend,
                                                         calibration)
                lines = log.take()
                bare = best.time(windows)
            else:
                bare = best.time(windows)
                log.take()
                total, profile, commit = time_end_to_end(slide, model, out, args.tile,
                                                         args.precision, args.backend,
                                                         calibration)
                lines = log.take()
            engine = log.engine(lines)
            after = total - profile["wall"] - profile["setup"]
            rounds.append({"end_to_end_s": total, "bare_s": bare, "ratio": bare / total,
                           "after_tiles_s": after, "commit_s": commit,
                           "other_s": after - commit, "profile": profile, "engine": engine,
                           "runtime_log": log.runtime_lines(lines),
                           "first": "end_to_end" if r % 2 == 0 else "bare"})
            print(f"round {r + 1}/{args.repeats}: end to end {total:.2f} s "
                  f"({pixels / total / 1e6:.3f} Mpx/s, {engine}), bare {bare:.2f} s "
                  f"({pixels / bare / 1e6:.3f} Mpx/s, {best.name}), ratio {bare / total:.3f}")
            print(f"  {profile_line(profile)}")
            print(f"  after tiles (total - wall - setup) {after:.2f} s = pyramid + metadata "
                  f"(commit) {commit:.2f} s + other {after - commit:.2f} s", flush=True)
            for line in log.runtime_lines(lines):
                if "runs the model" in line or "compiled" in line:
                    print(f"  {line}")
            if backend != "torch" and engine != backend:
                print(f"  WARNING: {backend} was asked for but {engine} ran", flush=True)
    shutil.rmtree(out, ignore_errors=True)

    e2e_med = statistics.median(x["end_to_end_s"] for x in rounds)
    bare_med = statistics.median(x["bare_s"] for x in rounds)
    ratio_med = statistics.median(x["ratio"] for x in rounds)
    ok = ratio_med >= TARGET
    print()
    engines = ", ".join(sorted({str(x["engine"]) for x in rounds}))
    print(f"{args.size}^2 = {pixels / 1e6:.1f} Mpx, tile {args.tile}, precision {args.precision},"
          f" end to end with backend {args.backend} ({engines}), bare reference {best.name}")
    header = f"{'round':>5} {'e2e s':>8} {'e2e Mpx/s':>10} {'bare s':>8} {'bare Mpx/s':>11} " \
             f"{'ratio':>6} {'wall s':>7} {'setup s':>8} {'after s':>8} {'model_share':>12}"
    print(header)
    print("-" * len(header))
    for i, x in enumerate(rounds, 1):
        print(f"{i:>5} {x['end_to_end_s']:>8.2f} {pixels / x['end_to_end_s'] / 1e6:>10.3f} "
              f"{x['bare_s']:>8.2f} {pixels / x['bare_s'] / 1e6:>11.3f} {x['ratio']:>6.3f} "
              f"{x['profile']['wall']:>7.2f} {x['profile']['setup']:>8.2f} "
              f"{x['after_tiles_s']:>8.2f} {x['profile']['model_share']:>12.3f}")
    print(f"median end to end: {e2e_med:.2f} s ({pixels / e2e_med / 1e6:.3f} Mpx/s)")
    print(f"median bare ({best.name}): {bare_med:.2f} s ({pixels / bare_med / 1e6:.3f} Mpx/s)")
    print(f"median of paired ratios (end-to-end / fastest bare throughput): {ratio_med:.3f}")
    print(f"target >= {TARGET:.2f}: {'met' if ok else 'NOT met'}")
    amx_met = None
    if args.precision == "bf16":
        text, amx_met = amx_line(pixels / e2e_med / 1e6)
        print(text)

    if args.json:
        record = {
            "benchmark": "end_to_end", "command": [sys.executable, *sys.argv],
            "environment": environment(), "args": vars(args),
            "backend_resolved": backend, "slide": str(slide), "pixels": pixels,
            "plan": {"tile": list(plan.tile), "window": list(plan.window),
                     "grid": list(plan.grid), "tiles": len(plan)},
            "warm_up": {"crop": side, "seconds": warm, "engine": warm_engine,
                        "runtime_log": log.runtime_lines(warm_lines)},
            "bare_candidates_s": choice,
            "bare_candidates": {c.name: {"kind": c.kind, "workers": c.workers,
                                         "threads": c.threads, **c.details}
                                for c in candidates},
            "reference": best.name,
            "rounds": rounds,
            "median": {"end_to_end_s": e2e_med, "bare_s": bare_med,
                       "end_to_end_mpx_s": pixels / e2e_med / 1e6,
                       "bare_mpx_s": pixels / bare_med / 1e6, "paired_ratio": ratio_med},
            "target": TARGET, "met": ok,
            "target_amx_bf16_mpx_s": TARGET_AMX_BF16_MPX_S if args.precision == "bf16" else None,
            "met_amx_bf16": amx_met,
            "warnings": log.warnings,
        }
        write_json(args.json, record)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

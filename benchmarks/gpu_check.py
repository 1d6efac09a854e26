"""GPU check: run tilerseg's CUDA path for real and report one JSON document.

One prepared script for a machine with an NVIDIA GPU (H100/H200 class), meant to finish
within 5 minutes (``--budget``, default 280 s, plus a hard stop 15 s later). It prints
ONE JSON document on stdout (progress goes to stderr) and, with ``--json PATH``, also
writes it to PATH. Each check has its own status, ``pass``, ``fail`` or ``skipped``
(with a reason), its figures and its seconds; one failing check does not stop the
others. The exit status is 1 if any check failed, else 0.

Checks
------
a. ``a_fp32_exactness``: the bundled model (``model_from_spec(None)``) on a seeded
   random batch of 4 input windows (1212 px, the window of a 1024 tile), CUDA fp32 with
   TF32 off (``torch.backends.cuda.matmul.allow_tf32 = False``,
   ``torch.backends.cudnn.allow_tf32 = False``) against CPU fp32: the largest absolute
   probability difference must be <= 1e-4. Then a 1000 x 1300 synthetic membrane image
   (float32, /255) tiled on CUDA (tile 256, batch 5, so the last batch is partial) by
   ``tilerseg.segment`` and by ``segment_to_zarr`` (the pipelined executor, float32
   output), each against the one-shot CPU reference of DESIGN section 1 (whole image
   mirror-padded, one forward, cropped; written here as in ``tests/conftest.py``):
   <= 1e-4 as well.
b. ``b_precision_compile``: ``segment_to_zarr`` of a ``--b-size`` (4096) synthetic
   membrane image (float32 output, no pyramid) on ``cuda:0`` with precision fp32 (the
   reference, TF32 off), then bf16 and fp16 eager, then each with ``compile=True``
   (a cold compile after ``torch._dynamo.reset()``, started only while 90 s plus 60 s
   kept for check c are left): Mpx/s (whole call; tile pipeline; compute stage),
   whether the compiled model was really used (the replicas' ``.compiled``, observed
   by wrapping ``Replica.__init__``, and the records of the ``tilerseg.engine.compute``
   logger: the success line or the fallback warning, both kept in the report) and the
   deviation from fp32 (largest and mean absolute
   probability difference, fraction of pixels whose argmax class changes). A fallback
   to eager execution FAILS the check. Limits: mean deviation <= 1e-2 and changed
   labels <= 1%.
c. ``c_end_to_end``: a ``--size`` (16384) square synthetic uint8 membrane slide written
   as a tiled (512 px, zlib) BigTIFF, the same pixels as
   ``tilerseg.synthetic.write_membrane_tiff`` (seed 0), tiles made in parallel worker
   processes, then ``segment_to_zarr(slide, bundled model, out, device="cuda:0")`` with
   the defaults (fp32 with torch's default TF32 settings, uint8 output, pyramid, copy
   stream and pinned buffers in the replica): wall time, Mpx/s, the run's profile, the
   fraction of time the GPU was busy (``utilization.gpu`` sampled every 0.2 s during
   the call with pynvml if importable, else ``nvidia-smi``; the sampler is named),
   peak GPU memory (``max_memory_allocated`` / ``max_memory_reserved``), whether the
   input batches were pinned, and a sanity check of the output (shape, classes summing
   to 255 +- 1 on a 1024^2 corner).
d. ``d_two_gpus``: with 2 or more visible GPUs, ``segment_to_zarr(..., device="cuda")``
   (one replica per GPU) on the slide of c: Mpx/s against c's one-GPU figure, and the
   largest difference from c's output on a corner. Skipped with a reason otherwise.
e. ``e_cluster_worker``: the image of check a through a ``dask.distributed``
   ``LocalCluster`` of one worker process (the pipelined cluster worker) on the GPU,
   against a's one-shot CPU reference (<= 1e-4); the devices the worker recorded must
   include a GPU. Skipped without ``distributed``.

Check b also asks for ``precision="int8"``: int8 is OpenVINO's, on the CPU, and tilerseg
has no GPU int8 path (no TensorRT), so on a GPU the engine must refuse it with its one-line
error (reported as skipped, with the message); on the CPU (``--cpu-dry-run``) it runs and
its deviation from fp32 is reported.

Without CUDA (``torch.cuda.is_available()`` False) it prints a JSON document saying no
GPU is visible and exits 0. ``--cpu-dry-run`` runs checks a, b and c on the CPU at tiny
sizes (b: bf16 eager and compiled, fp16 eager; a refusal of a precision by the engine is
reported as skipped), to exercise this script's logic where there is no GPU.

Run from the repository root with the virtualenv active::

    python benchmarks/gpu_check.py --json gpu.json
    python benchmarks/gpu_check.py --size 8192 --budget 200      # smaller slide, less time
    python benchmarks/gpu_check.py --cpu-dry-run                 # no GPU needed

Imports: tilerseg, the standard library, numpy, torch, tifffile; pynvml (nvidia-ml-py)
when installed. Outputs go to a temporary directory, removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import multiprocessing
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

import tilerseg
from tilerseg.engine import compute as engine_compute
from tilerseg.models.checkpoint import model_from_spec
from tilerseg.synthetic import membrane_tile

# the one-shot reference of the tests (DESIGN section 1), independent of the engine
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.reference import one_shot_reference  # noqa: E402

EXACT = 1e-4  # DESIGN section 1: fp32 probabilities within 1e-4 of the one-shot reference
MEAN_DEVIATION = 1e-2  # b: mean |p - p_fp32| allowed under bf16 / fp16
LABEL_CHANGE = 1e-2  # b: fraction of pixels whose argmax class may change
TIFF_TILE = 512
SLIDE_SEED = 0
GRACE_S = 15.0  # the hard stop comes this long after --budget
MIB = 1024**2
COMPUTE_LOGGER = "tilerseg.engine.compute"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the JSON document to PATH")
    parser.add_argument("--size", type=int, default=16384,
                        help="side of the end-to-end slide of check c (default 16384)")
    parser.add_argument("--b-size", type=int, default=4096,
                        help="side of the image of check b (default 4096)")
    parser.add_argument("--budget", type=float, default=280.0,
                        help="seconds for the whole run (default 280); checks that would "
                        f"not fit are skipped; a hard stop follows {GRACE_S:.0f} s later")
    parser.add_argument("--procs", type=int, default=None,
                        help="worker processes making the synthetic slides (default: cores)")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run checks a, b and c on the CPU at tiny sizes (no GPU needed)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show tilerseg's INFO log on stderr (default: warnings)")
    args = parser.parse_args(argv)
    if args.size < 64 or args.b_size < 64:
        parser.error("--size and --b-size must be at least 64")
    return args


# -- reporting and the time guard ---------------------------------------------------------


class Skip(Exception):
    """A check (or part of one) that cannot run here; the message says why."""


class Context:
    """The run: arguments, device, the report being built, the clock, scratch space."""

    def __init__(self, args: argparse.Namespace, report: dict[str, Any]) -> None:
        self.args, self.report = args, report
        self.dry = bool(args.cpu_dry_run)
        self.start = time.monotonic()
        self.deadline = self.start + args.budget
        self.tmp = Path(tempfile.mkdtemp(prefix="tilerseg-gpu-check-"))
        self.device = "cpu" if self.dry else "cuda:0"
        self.current: str | None = None
        self.shared: dict[str, Any] = {}  # results one check hands to a later one
        self._pool: Any = None
        self._emitted = False
        self._emit_lock = threading.Lock()
        self.stream = json_stream()

    # time
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def require(self, seconds: float, what: str) -> None:
        """Raise :class:`Skip` unless ``seconds`` of the budget are left for ``what``."""
        left = self.remaining()
        if left < seconds:
            raise Skip(f"time budget: {max(0.0, left):.0f} s left of {self.args.budget:.0f} s, "
                       f"{what} needs about {seconds:.0f} s")

    def note(self, message: str) -> None:
        print(f"[gpu_check +{self.elapsed():6.1f} s] {message}", file=sys.stderr, flush=True)

    # synthetic data
    def pool(self) -> Any:
        """Worker processes for the synthetic slides (forkserver: nothing of CUDA forked)."""
        if self._pool is None:
            procs = self.args.procs or os.cpu_count() or 1
            self._pool = multiprocessing.get_context("forkserver").Pool(procs)
        return self._pool

    # output
    def emit(self) -> None:
        """Print the report (once) and write it to --json."""
        with self._emit_lock:
            if self._emitted:
                return
            self._emitted = True
            self.report["elapsed_s"] = round(self.elapsed(), 2)
            text = None
            for _ in range(5):  # another thread may be adding figures right now
                try:
                    text = json.dumps(self.report, indent=2, default=str)
                    break
                except RuntimeError:
                    time.sleep(0.05)
            if text is None:
                text = json.dumps({"ok": False, "error": "the report could not be serialised"})
            self.stream.write(text + "\n")
            self.stream.flush()
            if self.args.json:
                try:
                    Path(self.args.json).write_text(text + "\n")
                except OSError as err:
                    print(f"could not write {self.args.json}: {err}", file=sys.stderr)

    def cleanup(self) -> None:
        if self._pool is not None:
            with contextlib.suppress(Exception):
                self._pool.terminate()
            self._pool = None
        shutil.rmtree(self.tmp, ignore_errors=True)


def json_stream() -> Any:
    """A stream to the real stdout for the JSON, with file descriptor 1 pointed at stderr
    from now on, so that nothing else (compiler subprocesses, C libraries) lands in it."""
    try:
        sys.stdout.flush()
        stream = os.fdopen(os.dup(sys.stdout.fileno()), "w")
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
        return stream
    except (AttributeError, OSError, ValueError):  # no real descriptors (captured)
        return sys.stdout


def finish(report: dict[str, Any]) -> bool:
    """Fill the summary; True when no check failed."""
    states: dict[str, list[str]] = {"pass": [], "fail": [], "skipped": []}
    for name, entry in report["checks"].items():
        states.setdefault(entry.get("status", "fail"), []).append(name)
    report["summary"] = states
    report["ok"] = not states["fail"] and all(
        e.get("status") in ("pass", "skipped") for e in report["checks"].values())
    return report["ok"]


def hard_stop(ctx: Context, why: str) -> None:
    """Report what there is, remove the scratch space and leave at once (exit status 1)."""
    name = ctx.current
    if name is not None:
        entry = ctx.report["checks"].setdefault(name, {})
        entry["status"] = "fail"
        entry["error"] = f"stopped: {why}"
    ctx.report["stopped"] = why
    finish(ctx.report)
    ctx.report["ok"] = False
    ctx.emit()
    ctx.cleanup()
    os._exit(1)


def run_check(ctx: Context, name: str, fn: Callable[[Context, dict[str, Any]], list[str]]
              ) -> None:
    """Run one check into ``report["checks"][name]``: pass, fail (with the error) or skipped."""
    entry: dict[str, Any] = {"status": "running", "figures": {}}
    ctx.report["checks"][name] = entry
    ctx.current = name
    ctx.note(f"check {name}")
    start = time.monotonic()
    try:
        failures = fn(ctx, entry["figures"])
        entry["status"] = "fail" if failures else "pass"
        if failures:
            entry["failures"] = failures
    except Skip as why:
        entry["status"] = "skipped"
        entry["reason"] = str(why)
    except Exception as err:  # noqa: BLE001 - every check reports, whatever happens
        entry["status"] = "fail"
        entry["error"] = f"{type(err).__name__}: {err}"
        entry["traceback"] = traceback.format_exc().splitlines()[-12:]
    finally:
        entry["seconds"] = round(time.monotonic() - start, 2)
        ctx.current = None
        if torch.cuda.is_available():
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
    ctx.note(f"check {name}: {entry['status']} ({entry['seconds']:.1f} s)"
             + (f" - {entry.get('reason') or entry.get('error') or entry.get('failures')}"
                if entry["status"] != "pass" else ""))


# -- observing the engine -----------------------------------------------------------------


class LogCapture(logging.Handler):
    """Keeps the records of one logger (at INFO and above) as plain text."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[dict[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append({"level": record.levelname, "message": record.getMessage()})


@contextlib.contextmanager
def observe_engine() -> Iterator[dict[str, Any]]:
    """Watch the replicas the engine makes and what ``tilerseg.engine.compute`` logs.

    Yields a dict with ``replicas`` (every :class:`Replica` constructed in the block),
    ``batches`` / ``pinned`` (CUDA submits, and those whose host batch was already
    pinned) and ``log`` (the compute logger's records).
    """
    Replica = engine_compute.Replica
    seen: dict[str, Any] = {"replicas": [], "batches": 0, "pinned": 0, "log": []}
    init, submit = Replica.__init__, Replica.submit
    lock = threading.Lock()

    def wrapped_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        with lock:
            seen["replicas"].append(self)

    def wrapped_submit(self: Any, x: torch.Tensor, tiles: Any) -> Any:
        if self.device.type == "cuda":
            pinned = bool(x.is_pinned())
            with lock:
                seen["batches"] += 1
                seen["pinned"] += pinned
        return submit(self, x, tiles)

    handler = LogCapture()
    logger = logging.getLogger(COMPUTE_LOGGER)
    logger.addHandler(handler)
    Replica.__init__, Replica.submit = wrapped_init, wrapped_submit  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        Replica.__init__, Replica.submit = init, submit  # type: ignore[method-assign]
        logger.removeHandler(handler)
        seen["log"] = handler.records


def replica_state(r: Any) -> dict[str, Any]:
    """What a replica ended up doing (``engine`` where the Replica names its runtime)."""
    state = {"device": str(r.device), "precision": getattr(r, "precision", None),
             "compile_requested": bool(getattr(r, "compile_requested", False)),
             "compiled": bool(getattr(r, "compiled", False)),
             "asynchronous": bool(getattr(r, "asynchronous", False)),
             "copy_stream": getattr(r, "copy_stream", None) is not None}
    if hasattr(r, "engine"):
        state["engine"] = str(r.engine)
    return state


@contextlib.contextmanager
def tf32(enabled: bool | None) -> Iterator[dict[str, Any]]:
    """Set TF32 for matmuls and cuDNN convolutions in a block (None: leave torch's
    defaults), then restore; yields the settings in force."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if enabled is not None:
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield {"matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
               "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def gpu_memory(device: str) -> dict[str, float] | None:
    if not device.startswith("cuda"):
        return None
    return {"max_allocated_mib": round(torch.cuda.max_memory_allocated(device) / MIB, 1),
            "max_reserved_mib": round(torch.cuda.max_memory_reserved(device) / MIB, 1)}


def reset_gpu_memory(devices: list[str]) -> None:
    for d in devices:
        if d.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(d)


class GpuSampler:
    """``utilization.gpu`` of some GPUs every ``interval`` s, in a background thread.

    With pynvml (nvidia-ml-py) if it imports and initialises, else ``nvidia-smi``;
    GPUs are matched to torch's indices by UUID (index as a fallback).
    """

    def __init__(self, indices: list[int], interval: float = 0.2) -> None:
        self.indices, self.interval = indices, interval
        self.samples: list[list[float]] = []
        self.kind: str | None = None
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: Any = None
        self._handles: list[Any] = []
        self.uuids = [self._uuid(i) for i in indices]
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            self._nvml = pynvml
            for i, u in zip(indices, self.uuids):
                try:
                    self._handles.append(pynvml.nvmlDeviceGetHandleByUUID(u) if u
                                         else pynvml.nvmlDeviceGetHandleByIndex(i))
                except Exception:  # noqa: BLE001 - fall back to the index
                    self._handles.append(pynvml.nvmlDeviceGetHandleByIndex(i))
            self.kind = "pynvml"
        except Exception as err:  # noqa: BLE001 - not installed, or no NVML
            self._nvml = None
            self.error = f"pynvml: {type(err).__name__}: {err}"
            if shutil.which("nvidia-smi"):
                self.kind = "nvidia-smi"

    @staticmethod
    def _uuid(index: int) -> str | None:
        try:
            u = str(torch.cuda.get_device_properties(index).uuid)
        except Exception:  # noqa: BLE001
            return None
        return u if u.startswith(("GPU-", "MIG-")) else f"GPU-{u}"

    def _read(self) -> list[float] | None:
        if self.kind == "pynvml":
            return [float(self._nvml.nvmlDeviceGetUtilizationRates(h).gpu)
                    for h in self._handles]
        if self.kind == "nvidia-smi":
            text = subprocess.run(
                ["nvidia-smi", "--query-gpu=uuid,index,utilization.gpu",
                 "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=5, check=True).stdout
            rows = [[c.strip() for c in line.split(",")] for line in text.splitlines()
                    if line.strip()]
            by_uuid = {r[0]: float(r[2]) for r in rows if len(r) == 3}
            by_index = {int(r[1]): float(r[2]) for r in rows if len(r) == 3}
            return [by_uuid.get(u) if u in by_uuid else by_index.get(i, float("nan"))
                    for i, u in zip(self.indices, self.uuids)]
        return None

    def _loop(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                values = self._read()
                if values is not None:
                    self.samples.append(values)
            except Exception as err:  # noqa: BLE001 - keep sampling; say what failed
                self.error = f"{type(err).__name__}: {err}"
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - began)))

    def start(self) -> None:
        if self.kind is not None:
            self._thread = threading.Thread(target=self._loop, name="gpu-sampler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sampler": self.kind or "none (neither pynvml nor nvidia-smi)",
                               "interval_s": self.interval, "samples": len(self.samples),
                               "gpus": self.indices}
        if self.samples:
            values = np.array(self.samples, dtype=float)  # samples x GPUs, percent
            out["busy_fraction"] = [round(float(np.nanmean(v)) / 100, 3) for v in values.T]
            out["samples_busy_fraction"] = [round(float(np.mean(v > 0)), 3) for v in values.T]
        if self.error:
            out["sampler_note"] = self.error
        return out


@contextlib.contextmanager
def sampling(indices: list[int] | None) -> Iterator[GpuSampler | None]:
    """A running :class:`GpuSampler` of ``indices`` for a block (None: no sampling)."""
    if indices is None:
        yield None
        return
    sampler = GpuSampler(indices)
    sampler.start()
    try:
        yield sampler
    finally:
        sampler.stop()


# -- synthetic data -----------------------------------------------------------------------


def _slide_tile(job: tuple[int, int, int, int, int, bool]) -> Any:
    """One TIFF tile of the seamless membrane slide (as ``write_membrane_tiff`` makes it):
    zlib-compressed bytes, or the raw uint8 block."""
    r, c, tile, height, width, compress = job
    block = np.zeros((tile, tile), np.uint8)
    h, w = min(tile, height - r), min(tile, width - c)
    block[:h, :w] = membrane_tile((r, c), (h, w), seed=SLIDE_SEED)
    return zlib.compress(block.tobytes(), 6) if compress else block


def _tile_jobs(height: int, width: int, tile: int, compress: bool) -> list[tuple]:
    return [(r, c, tile, height, width, compress)
            for r in range(0, height, tile) for c in range(0, width, tile)]


def _map(ctx: Context, jobs: list[tuple]) -> Iterator[Any]:
    """The tiles of ``jobs`` in order, from the worker processes (serially if they fail)."""
    try:
        pool = ctx.pool()
    except Exception as err:  # noqa: BLE001 - a pool is an optimisation
        ctx.note(f"no worker processes ({type(err).__name__}: {err}); making tiles serially")
        return map(_slide_tile, jobs)
    return pool.imap(_slide_tile, jobs, chunksize=4)


def membrane_array(ctx: Context, size: int) -> np.ndarray:
    """A ``size`` x ``size`` uint8 membrane image in memory (the slide's top-left corner)."""
    image = np.empty((size, size), np.uint8)
    jobs = _tile_jobs(size, size, TIFF_TILE, compress=False)
    for (r, c, *_), block in zip(jobs, _map(ctx, jobs)):
        h, w = min(TIFF_TILE, size - r), min(TIFF_TILE, size - c)
        image[r:r + h, c:c + w] = block[:h, :w]
    return image


def write_slide(ctx: Context, path: Path, size: int, pixel_size: float = 0.5) -> Path:
    """Write the seamless membrane slide as a tiled zlib BigTIFF, tiles made in parallel.

    The pixels and tags are those of :func:`tilerseg.synthetic.write_membrane_tiff`
    (tile 512, seed 0, 0.5 um pixels); the tiles are compressed by the workers.
    """
    import tifffile

    jobs = _tile_jobs(size, size, TIFF_TILE, compress=True)
    tifffile.imwrite(
        path, _map(ctx, jobs), shape=(size, size), dtype=np.uint8,
        tile=(TIFF_TILE, TIFF_TILE), bigtiff=True, compression="zlib",
        resolution=(1e4 / pixel_size, 1e4 / pixel_size), resolutionunit="CENTIMETER",
    )
    return path


# -- shared helpers -----------------------------------------------------------------------


def bundled_model() -> torch.nn.Module:
    """The bundled default model (an untrained U-Net if none is installed), eval mode."""
    return model_from_spec(None).eval()




def read_output(path: Path, region: tuple[slice, ...] | None = None) -> np.ndarray:
    """Level 0 of a written store (probabilities), whole or ``region`` of its spatial axes."""
    source = tilerseg.open_image(path)
    key = (slice(None),) + (region or ())
    return np.asarray(source.data[key])


def run_attributes(path: Path) -> dict[str, Any]:
    """The ``tilerseg`` attributes of a written store (its profile, devices...)."""
    meta = json.loads((Path(path) / "zarr.json").read_text())
    return meta.get("attributes", {}).get("tilerseg", {})


def deviation(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Largest and mean absolute difference of two ``(classes, ...)`` probability arrays,
    and the fraction of pixels whose argmax class differs."""
    diff = np.abs(a - b)
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "label_change_fraction": float(np.mean(a.argmax(0) != b.argmax(0)))}


def dynamo_stats() -> dict[str, Any] | None:
    """torch._dynamo's counters of graphs compiled and frames captured (private API)."""
    try:
        from torch._dynamo.utils import counters

        return {k: dict(counters[k]) for k in ("stats", "frames") if counters.get(k)}
    except Exception:  # noqa: BLE001 - absent or changed in this torch
        return None


def mpx(pixels: int, seconds: float | None) -> float | None:
    return None if not seconds else round(pixels / seconds / 1e6, 3)


def torch_backend(device: str) -> dict[str, str]:
    """``backend="torch"`` on the CPU where the engine has other backends (OpenVINO), so
    that a dry run goes through torch as the CUDA path does; nothing otherwise."""
    fields = {f.name for f in dataclasses.fields(tilerseg.RunOptions)}
    return {"backend": "torch"} if device == "cpu" and "backend" in fields else {}


def timed_to_zarr(image: Any, out: Path, **options: Any) -> tuple[float, dict[str, Any],
                                                                   dict[str, Any]]:
    """``segment_to_zarr`` with the bundled model, observed; seconds, attributes, observed."""
    options = {**torch_backend(str(options.get("device", ""))), **options}
    model = bundled_model()
    with observe_engine() as seen:
        start = time.perf_counter()
        tilerseg.segment_to_zarr(image, model, out, overwrite=True, **options)
        seconds = time.perf_counter() - start
    return seconds, run_attributes(out), seen


# -- check a: fp32 exactness --------------------------------------------------------------


def check_a(ctx: Context, fig: dict[str, Any]) -> list[str]:
    """CUDA fp32 (TF32 off) against CPU fp32: bare forward, segment, segment_to_zarr."""
    failures: list[str] = []
    dev = ctx.device
    ctx.require(30, "check a")
    if ctx.dry:
        tile, batch, shape, tiled_tile, tiled_batch = 64, 2, (200, 260), 64, 3
    else:
        tile, batch, shape, tiled_tile, tiled_batch = 1024, 4, (1000, 1300), 256, 5
    cpu_model = bundled_model()
    g = tilerseg.model_geometry(cpu_model)
    fig["model"] = {"halo": list(g.halo), "step": list(g.step),
                    "classes": g.out_channels, "in_channels": g.in_channels}
    window = tuple(tilerseg.plan((tile, tile), cpu_model, tile=tile).window)
    fig["limit"] = EXACT

    with tf32(False) as flags:
        fig["tf32"] = flags
        # 1. a seeded random batch of windows, bare forward on both devices
        generator = torch.Generator().manual_seed(0)
        x = torch.rand((batch, g.in_channels, *window), generator=generator)
        with torch.inference_mode():
            expected = torch.softmax(cpu_model(x), dim=1)
            dev_model = copy.deepcopy(cpu_model).to(dev, memory_format=torch.channels_last)
            y = dev_model(x.to(dev).contiguous(memory_format=torch.channels_last))
            got = torch.softmax(y.float(), dim=1).cpu()
            d = float((got - expected).abs().max())
            fig["window_batch"] = {"shape": list(x.shape), "max_abs_diff": d}
            if dev.startswith("cuda"):  # for information: the same with TF32 allowed
                with tf32(True):
                    y = dev_model(x.to(dev).contiguous(memory_format=torch.channels_last))
                    tf = float((torch.softmax(y.float(), dim=1).cpu() - expected).abs().max())
                fig["window_batch"]["with_tf32_max_abs_diff"] = tf
                fig["window_batch"]["note"] = (
                    "with_tf32 is information only: torch allows TF32 in cuDNN convolutions "
                    "by default (see tf32_defaults), and the engine's fp32 inherits that")
        del dev_model, y
        if not d <= EXACT:
            failures.append(f"bare forward on {dev} differs from the CPU by {d:.2e} > {EXACT}")

        # 2. tiled through the engine (segment, then segment_to_zarr) vs one-shot on the CPU
        height, width = shape
        image = membrane_array(ctx, max(shape))[:height, :width]
        image_f = np.ascontiguousarray(image, dtype=np.float32) / np.float32(255)
        reference = one_shot_reference(image_f[None], copy.deepcopy(cpu_model))
        with observe_engine() as seen:
            probs = tilerseg.segment(image_f, copy.deepcopy(cpu_model), tile=tiled_tile,
                                     batch_size=tiled_batch, device=dev, normalize=False)
        d = float(np.abs(probs - reference).max())
        fig["segment"] = {"image": list(shape), "tile": tiled_tile, "batch_size": tiled_batch,
                          "max_abs_diff": d,
                          "replicas": [replica_state(r) for r in seen["replicas"]],
                          "cuda_batches": seen["batches"], "pinned_batches": seen["pinned"]}
        if not d <= EXACT:
            failures.append(f"segment(device={dev!r}) differs from the one-shot CPU reference "
                            f"by {d:.2e} > {EXACT}")

        out = ctx.tmp / "a.zarr"
        seconds, attrs, seen = timed_to_zarr(
            image_f, out, device=dev, tile=tiled_tile, batch_size=tiled_batch,
            normalize=False, dtype="float32", pyramid=False)
        probs = read_output(out)
        d = float(np.abs(probs - reference).max())
        fig["segment_to_zarr"] = {"max_abs_diff": d, "seconds": round(seconds, 2),
                                  "devices": attrs.get("devices"),
                                  "replicas": [replica_state(r) for r in seen["replicas"]],
                                  "cuda_batches": seen["batches"],
                                  "pinned_batches": seen["pinned"]}
        shutil.rmtree(out, ignore_errors=True)
        if not d <= EXACT:
            failures.append(f"segment_to_zarr(device={dev!r}) differs from the one-shot CPU "
                            f"reference by {d:.2e} > {EXACT}")
    ctx.shared["a"] = {"image": image_f, "reference": reference, "tile": tiled_tile}
    return failures


# -- check b: precisions and compilation --------------------------------------------------


def check_b(ctx: Context, fig: dict[str, Any]) -> list[str]:
    """bf16 / fp16, eager and compiled, through segment_to_zarr; deviation from fp32."""
    failures: list[str] = []
    dev = ctx.device
    size = min(ctx.args.b_size, 256) if ctx.dry else ctx.args.b_size
    tile = 64 if ctx.dry else None  # None: the engine's default for the device
    pixels = size * size
    ctx.require(20, "check b (fp32 reference)")
    image = membrane_array(ctx, size)
    fig["image"] = [size, size]
    fig["limits"] = {"mean_abs": MEAN_DEVIATION, "label_change_fraction": LABEL_CHANGE}
    if ctx.dry:
        variants = [("bf16", False), ("bf16", True), ("fp16", False)]
        fig["fp16_compiled"] = {"status": "skipped",
                                "reason": "--cpu-dry-run compiles bf16 only (CPU compile time)"}
    else:
        variants = [("bf16", False), ("fp16", False), ("bf16", True), ("fp16", True)]
    reserve = 0.0 if ctx.dry else 60.0  # leave time for check c
    runs: dict[str, Any] = {}
    fig["runs"] = runs

    def one(precision: str, compile_: bool) -> tuple[dict[str, Any], np.ndarray]:
        out = ctx.tmp / f"b-{precision}{'-compiled' if compile_ else ''}.zarr"
        if compile_:
            with contextlib.suppress(Exception):
                torch._dynamo.reset()  # a cold compile, attributed to this run
        if dev.startswith("cuda"):
            reset_gpu_memory([dev])
        seconds, attrs, seen = timed_to_zarr(
            image, out, device=dev, tile=tile, precision=precision, compile=compile_,
            dtype="float32", pyramid=False)
        profile = attrs.get("profile", {})
        run = {"seconds": round(seconds, 2), "mpx_s": mpx(pixels, seconds),
               "pipeline_mpx_s": mpx(pixels, profile.get("wall")),
               "compute_mpx_s": mpx(pixels, profile.get("compute")),
               "setup_s": profile.get("setup"), "profile": profile,
               "replicas": [replica_state(r) for r in seen["replicas"]],
               "log": seen["log"], "gpu_memory": gpu_memory(dev)}
        if compile_:
            run["dynamo"] = dynamo_stats()
        probs = read_output(out)
        shutil.rmtree(out, ignore_errors=True)
        return run, probs

    with tf32(False) as flags:
        fig["tf32"] = flags
        run, reference = one("fp32", False)
        runs["fp32"] = run
        for precision, compile_ in variants:
            name = f"{precision}{'_compiled' if compile_ else ''}"
            try:
                ctx.require(reserve + (90 if compile_ and not ctx.dry else 20),
                            f"{name} (leaving {reserve:.0f} s for later checks)")
                run, probs = one(precision, compile_)
            except Skip as why:
                runs[name] = {"status": "skipped", "reason": str(why)}
                continue
            except tilerseg.InvalidArgumentError as err:  # the engine refuses the precision
                if ctx.dry:
                    runs[name] = {"status": "skipped", "reason": f"refused by the engine: {err}"}
                else:
                    runs[name] = {"status": "fail", "error": f"refused by the engine: {err}"}
                    failures.append(f"{name}: refused by the engine: {err}")
                continue
            except Exception as err:  # noqa: BLE001 - the other variants still run
                runs[name] = {"status": "fail", "error": f"{type(err).__name__}: {err}",
                              "traceback": traceback.format_exc().splitlines()[-8:]}
                failures.append(f"{name}: {type(err).__name__}: {err}")
                continue
            runs[name] = run
            run["deviation_from_fp32"] = deviation(probs, reference)
            del probs
            problems = []
            if compile_:
                used = bool(run["replicas"]) and all(r["compiled"] for r in run["replicas"])
                logged = [r["message"] for r in run["log"]]
                run["compiled_used"] = used
                if not used:
                    why = next((m for m in logged if "torch.compile" in m), "no log record")
                    problems.append(f"compile=True fell back to eager execution ({why})")
            dv = run["deviation_from_fp32"]
            if not dv["mean_abs"] <= MEAN_DEVIATION:
                problems.append(f"mean deviation from fp32 {dv['mean_abs']:.2e} > "
                                f"{MEAN_DEVIATION}")
            if not dv["label_change_fraction"] <= LABEL_CHANGE:
                problems.append(f"labels changed on {dv['label_change_fraction']:.2%} of "
                                f"the pixels > {LABEL_CHANGE:.0%}")
            run["status"] = "fail" if problems else "pass"
            if problems:
                run["failures"] = problems
                failures.extend(f"{name}: {p}" for p in problems)
        # int8 is OpenVINO's, on the CPU: on a GPU the engine must refuse it in one line
        # (no TensorRT path); on the CPU (--cpu-dry-run) it runs like the others
        try:
            if ctx.dry:
                run, probs = one("int8", False)
                run["deviation_from_fp32"] = deviation(probs, reference)
                run["status"] = "pass"
                runs["int8"] = run
            else:
                one("int8", False)
                runs["int8"] = {"status": "fail", "error": "precision=int8 was not refused "
                                "on a GPU, where tilerseg has no int8 path"}
                failures.append(runs["int8"]["error"])
        except tilerseg.InvalidArgumentError as err:
            runs["int8"] = {"status": "skipped", "reason": f"refused by the engine: {err}"}
        except Exception as err:  # noqa: BLE001 - reported, the other checks still run
            runs["int8"] = {"status": "fail", "error": f"{type(err).__name__}: {err}"}
            failures.append(f"int8: {type(err).__name__}: {err}")
    if all(r.get("status") == "skipped" for k, r in runs.items() if k != "fp32"):
        failures.append("every bf16/fp16 variant was skipped")
    return failures


# -- check c: end to end ------------------------------------------------------------------


def check_c(ctx: Context, fig: dict[str, Any]) -> list[str]:
    """A tiled BigTIFF slide -> OME-Zarr with the defaults on one GPU."""
    failures: list[str] = []
    dev = ctx.device
    size = min(ctx.args.size, 512) if ctx.dry else ctx.args.size
    pixels = size * size
    # slide making (~0.2 s/Mpx of one core, in parallel) and the run (>= ~20 Mpx/s)
    ctx.require(20 + pixels / 1e6 * 0.2 / max(1, os.cpu_count() or 1) + pixels / 20e6,
                f"a {size}^2 slide end to end")
    slide = ctx.tmp / f"membrane-{size}.tif"
    start = time.perf_counter()
    write_slide(ctx, slide, size)
    fig["slide"] = {"size": [size, size], "tiff_tile": TIFF_TILE, "compression": "zlib",
                    "mib": round(slide.stat().st_size / MIB, 1),
                    "write_s": round(time.perf_counter() - start, 2)}
    import tifffile  # the first tile must be write_membrane_tiff's

    with tifffile.TiffFile(slide) as tif:
        first = tif.pages[0].asarray()[:TIFF_TILE, :TIFF_TILE]
    h = min(TIFF_TILE, size)
    if not np.array_equal(first[:h, :h], membrane_tile((0, 0), (h, h), seed=SLIDE_SEED)):
        failures.append("the slide's first tile is not write_membrane_tiff's")

    out = ctx.tmp / "c.zarr"
    cuda = dev.startswith("cuda")
    indices = [torch.device(dev).index or 0] if cuda else []
    with tf32(None) as flags:  # torch's defaults (as at start-up), as a user gets them
        fig["tf32"] = flags
        if cuda:
            reset_gpu_memory([dev])
        with sampling(indices if cuda else None) as sampler:
            seconds, attrs, seen = timed_to_zarr(str(slide), out, device=dev)
    profile = attrs.get("profile", {})
    fig.update({
        "device": dev, "options": "defaults (fp32, uint8 output, pyramid, tile and batch "
        "by device)", "seconds": round(seconds, 2), "mpx_s": mpx(pixels, seconds),
        "pipeline_mpx_s": mpx(pixels, profile.get("wall")), "profile": profile,
        "devices": attrs.get("devices"), "tile": attrs.get("tile"),
        "replicas": [replica_state(r) for r in seen["replicas"]],
        "cuda_batches": seen["batches"], "pinned_batches": seen["pinned"],
        "gpu_busy": sampler.summary() if sampler is not None else None,
        "gpu_memory": gpu_memory(dev),
    })
    if cuda:
        if seen["batches"] and seen["pinned"] != seen["batches"]:
            failures.append(f"{seen['batches'] - seen['pinned']} of {seen['batches']} host "
                            "batches were not pinned")
        if not all(r["copy_stream"] and r["asynchronous"] for r in fig["replicas"]):
            failures.append("a CUDA replica has no copy stream or is not asynchronous")
    # sanity of the output on a corner: shape, and two classes summing to 255 (uint8)
    corner = min(1024, size)
    region = (slice(0, corner), slice(0, corner))
    probs = read_output(out, region)
    shape = list(tilerseg.open_image(out).shape)
    total = probs.astype(np.int32).sum(axis=0)
    fig["output"] = {"shape": shape, "dtype": str(probs.dtype),
                     "corner_class_sum_range": [int(total.min()), int(total.max())],
                     "corner_mean_class0": round(float(probs[0].mean()) / 255, 4)}
    if shape[-2:] != [size, size]:
        failures.append(f"output shape {shape} does not end with {[size, size]}")
    if probs.shape[0] == 2 and not (254 <= total.min() and total.max() <= 256):
        failures.append(f"class probabilities do not sum to 255 (+-1): "
                        f"{int(total.min())}..{int(total.max())}")
    ctx.shared["c"] = {"slide": slide, "out": out, "mpx_s": fig["mpx_s"], "size": size,
                       "corner": probs}
    return failures


# -- check d: two GPUs --------------------------------------------------------------------


def check_d(ctx: Context, fig: dict[str, Any]) -> list[str]:
    """Every visible GPU (device="cuda", one replica each) against one."""
    if ctx.dry:
        raise Skip("needs CUDA (--cpu-dry-run)")
    count = torch.cuda.device_count()
    fig["gpus"] = count
    if count < 2:
        raise Skip(f"{count} GPU visible; two replicas need 2 or more")
    c = ctx.shared.get("c")
    if c is None:
        raise Skip("needs check c's slide and one-GPU figure (check c did not finish)")
    failures: list[str] = []
    size, pixels = c["size"], c["size"] ** 2
    ctx.require(15 + pixels / 20e6, f"a {size}^2 slide on {count} GPUs")
    out = ctx.tmp / "d.zarr"
    devices = [f"cuda:{k}" for k in range(count)]
    with tf32(None):
        reset_gpu_memory(devices)
        with sampling(list(range(count))) as sampler:
            seconds, attrs, seen = timed_to_zarr(str(c["slide"]), out, device="cuda")
    many = mpx(pixels, seconds)
    fig.update({"seconds": round(seconds, 2), "mpx_s": many, "one_gpu_mpx_s": c["mpx_s"],
                "speedup": round(many / c["mpx_s"], 3) if many and c["mpx_s"] else None,
                "profile": attrs.get("profile"), "devices": attrs.get("devices"),
                "replicas": [replica_state(r) for r in seen["replicas"]],
                "gpu_busy": sampler.summary() if sampler is not None else None,
                "gpu_memory": {d: gpu_memory(d) for d in devices}})
    corner = c["corner"].shape[-1]
    probs = read_output(out, (slice(0, corner), slice(0, corner)))
    fig["corner_max_diff_from_c_uint8"] = int(np.abs(probs.astype(np.int16)
                                                     - c["corner"].astype(np.int16)).max())
    used = {r["device"] for r in fig["replicas"]}
    if len(used) < 2:
        failures.append(f"device='cuda' made replicas on {sorted(used)} only")
    if fig["speedup"] is not None and fig["speedup"] < 1.2:
        fig["note"] = "two GPUs were less than 1.2x one GPU: I/O or the host is the limit"
    return failures


# -- check e: the pipelined cluster worker --------------------------------------------------


def check_e(ctx: Context, fig: dict[str, Any]) -> list[str]:
    """One dask.distributed worker process (the pipelined cluster worker) on the GPU, against
    check a's one-shot CPU reference of the same image."""
    a = ctx.shared.get("a")
    if a is None:
        raise Skip("needs check a's image and output (check a did not finish)")
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise Skip("dask.distributed is not installed (pip install 'tilerseg[cluster]')") \
            from None
    ctx.require(60, "a one-worker LocalCluster")
    out = ctx.tmp / "e.zarr"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        start = time.perf_counter()
        tilerseg.segment_to_zarr(a["image"], bundled_model(), out, device=ctx.device,
                                 tile=a["tile"], normalize=False, dtype="float32",
                                 pyramid=False, executor=client)
        seconds = time.perf_counter() - start
    attrs = run_attributes(out)
    probs = read_output(out)
    fig.update({"seconds": round(seconds, 2), "executor": attrs.get("executor"),
                "runtime": attrs.get("runtime"), "profile": attrs.get("profile"),
                "max_abs_diff": float(np.abs(probs - a["reference"]).max())})
    failures = []
    if not fig["max_abs_diff"] <= EXACT:
        failures.append(f"the cluster worker's output differs from the one-shot CPU "
                        f"reference by {fig['max_abs_diff']:.2e} > {EXACT}")
    workers = (attrs.get("profile") or {}).get("workers") or []
    devices = {str((w.get("runtime") or {}).get("device")) for w in workers}
    fig["worker_devices"] = sorted(devices)
    if not ctx.dry and not any(d.startswith("cuda") for d in devices):
        failures.append(f"the worker recorded devices {sorted(devices)}, not a GPU")
    return failures


# -- main ---------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "torch": torch.__version__, "tilerseg": tilerseg.__version__,
        "python": platform.python_version(), "cores": os.cpu_count(),
        "cuda_available": torch.cuda.is_available(),
        "tf32_defaults": {"matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                          "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32},
    }
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        env.update({
            "card": torch.cuda.get_device_name(0),
            "cards": [torch.cuda.get_device_name(k) for k in range(count)],
            "gpu_count": count, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "gpu_memory_mib": round(torch.cuda.get_device_properties(0).total_memory / MIB),
            "bf16_native": torch.cuda.is_bf16_supported(including_emulation=False),
        })
    else:
        env.update({"card": None, "gpu_count": 0})
    return env


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("tilerseg").setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if args.verbose else logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger("tilerseg").addHandler(console)

    report: dict[str, Any] = {"tool": "benchmarks/gpu_check.py",
                              "mode": "cpu-dry-run" if args.cpu_dry_run else "cuda",
                              **environment(), "args": vars(args), "checks": {}}
    if not args.cpu_dry_run and not torch.cuda.is_available():
        report.update({"mode": "no-gpu", "ok": True, "status": "no GPU is visible",
                       "message": "torch.cuda.is_available() is False: no GPU is visible "
                       "to this process, so nothing was checked (use --cpu-dry-run to "
                       "exercise the script on the CPU)"})
        ctx = Context(args, report)
        ctx.emit()
        ctx.cleanup()
        return 0

    ctx = Context(args, report)
    report["budget_s"] = args.budget
    report["tmp"] = str(ctx.tmp)
    watchdog = threading.Timer(args.budget + GRACE_S, hard_stop,
                               (ctx, f"hard time limit {args.budget + GRACE_S:.0f} s"))
    watchdog.daemon = True
    watchdog.start()
    with contextlib.suppress(ValueError):  # not in the main thread
        signal.signal(signal.SIGTERM, lambda *_: hard_stop(ctx, "SIGTERM"))
    checks = [("a_fp32_exactness", check_a), ("b_precision_compile", check_b),
              ("c_end_to_end", check_c), ("d_two_gpus", check_d),
              ("e_cluster_worker", check_e)]
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON alone
            for name, fn in checks:
                run_check(ctx, name, fn)
    finally:
        watchdog.cancel()
        ok = finish(report)
        ctx.emit()
        ctx.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Side-by-side benchmark: tilerseg against what users would otherwise pick.

What it measures
----------------
One synthetic EM-like image, ``--size`` x ``--size`` uint8 (default 4096), made with
:func:`tilerseg.synthetic.membrane_image` (seed 0), is segmented by:

``tilerseg``
    ``tilerseg.segment_to_zarr(slide.tif, valid_model, out, tile=512, dtype="float32",
    overwrite=True)`` (512 = the CPU default tile) with its default pipelined executor, on the image written once as a
    tiled (256 px), zlib-compressed BigTIFF. The whole call is timed: reading and
    decoding the TIFF, normalisation, the model, writing the OME-Zarr store, its pyramid
    and metadata (the end-to-end product).
``tilerseg-bf16``
    The same with ``precision="bf16"`` (opt-in; on CPUs with AMX or AVX-512 BF16 it is
    about twice as fast, at a deviation of about 1e-2 from the fp32 reference).
``monai`` and ``monai-cl``
    ``monai.inferers.sliding_window_inference`` with roi 512 x 512, overlap 0.25,
    ``mode="gaussian"``, ``sw_batch_size=4``, on the image scaled to [0, 1] float32
    (shape 1 x 1 x H x W), with a *same*-padded U-Net of the same architecture carrying
    the same weights (the two share parameter shapes), then a softmax over the class
    axis of the blended logits (as a MONAI user does). ``monai`` leaves the model in the
    default memory format; ``monai-cl`` puts the model and the input in
    ``torch.channels_last``. torch's default thread count.
``dask``
    A hand-rolled ``dask.array.map_overlap`` over the [0, 1] float32 image: chunks of
    ``--tile`` (512), ``depth=halo`` (92 for the depth-4 U-Net),
    ``boundary="reflect"``, ``trim=False``; each overlapped block goes through the valid
    model (channels_last, softmax) and yields an output chunk of the chunk's size.
    Computed with the threaded scheduler, 2 workers x 1 torch thread. Two details a
    user has to get right: a block of 512 + 2 x 92 = 696 px is *not* an admissible
    input side of a depth-4 valid U-Net (sides are 124 + 16 k), so torch's pooling
    silently floors and the output comes out short of the chunk; each block is therefore extended
    by reflection on its far sides to the next admissible side (700) and the output
    cropped to the chunk, which keeps every pooling grid on the one of the reference.
    And dask's ``"reflect"`` is numpy's ``"symmetric"`` (edge pixel repeated), not
    numpy's ``"reflect"``: the output deviates from the reference near the image
    border, and only there (see the interior column below).

The wall time of each method is that of the inference alone, from the uint8 image in
memory (or the TIFF file, for tilerseg) to float32 probabilities of all classes (in
memory, or in the store for tilerseg), scaling to [0, 1] included; creating the image,
writing the TIFF, loading the model and the checks below are not. Throughput is image
pixels / wall time. Each method runs in a fresh child process (this script re-invoked
with a hidden ``--method``), without warm-up, as a user would run it once on one image;
its peak RSS is the child's ``VmHWM`` (see :func:`peak_rss_bytes`) read right after the
inference (imports, the model and the input included; reading back and saving the output
for the checks excluded). With ``--repeats N`` every method runs N times, in an order rotated from
repeat to repeat, and the table shows medians.

Exactness: every child saves its class-1 (foreground) probability as float32 ``.npy``
in the work directory, and the parent compares it with a one-shot reference, the
whole-image forward of the corresponding model computed once in a child of its own
(float32, channels_last, ``torch.inference_mode()``, softmax): the valid model on the
image padded by ``halo`` with numpy ``mode="reflect"`` (extended by reflection on the
far sides to an admissible side, then cropped to H x W) for tilerseg and dask; the
same-padded model on the image itself for MONAI. The table gives the maximum absolute
difference over the whole image and over the interior, the pixels at least
``halo + step`` px (108) from the border: the receptive field of a valid U-Net output
pixel reaches ``halo`` px to each side plus up to ``step - 1`` px more on one side,
depending on its position in the pooling grid, so only pixels inside that band can see
how the image was extended. tilerseg should agree with its reference to float32 rounding (~1e-6); the
one-shot references at 4096^2 need several GiB of RAM and tens of seconds.

Model: the bundled depth-4, 16-channel valid U-Net trained on ISBI 2012 EM
(:func:`tilerseg.load_model`), else ``torch.manual_seed(0); create_model("unet",
base_channels=16)``; float32, eval mode.

Whole processes (``--mode process``)
-----------------------------------
The figures above time the inference alone inside each child. ``--mode process`` times
what a user waits for from the shell instead: the wall time of a fresh process from
``Popen`` to its exit, interpreter start-up, imports, loading the model, reading the
input and writing the output included, for

``tilerseg-run``
    ``python -m tilerseg run membrane-N.tif -o OUT.zarr --overwrite -q``: the command
    line with its default options (bundled model, tile 512 on the CPU, uint8
    probabilities with the pyramid, fp32, ``--backend auto``, which is OpenVINO on the
    CPU when it is installed, 2 workers).
``monai-process`` and ``monai-cl-process``
    this script re-invoked as a MONAI user's script would run: import numpy, tifffile,
    torch, MONAI and tilerseg (only for the model's class and bundled weights), build
    the same-padded twin of the bundled model, read the same TIFF with
    ``tifffile.imread``, scale to [0, 1], ``sliding_window_inference`` (roi ``--roi``,
    overlap 0.25, Gaussian, ``sw_batch_size=4``, torch's default threads), softmax, and
    save the probabilities of both classes as uint8 ``round(255 p)`` in a ``.npy`` (the
    content of tilerseg's default output, without its pyramid or compression). The
    ``-cl`` variant puts the model and input in channels-last.

Caches are warm before the timed runs, and this is part of the protocol: tilerseg is run
once, untimed, on the same image first, so its OpenVINO network for the 700 px window is
already converted and cached under ``$TILERSEG_CACHE_DIR/openvino`` (the first run on a
machine also converts it, a few seconds once); each MONAI variant is started once,
untimed, up to its imports and model (``--imports-only``), so neither side pays cold
file-system caches. Then every method runs ``--repeats`` times in rotated order. Peak
RSS is the child's ``ru_maxrss`` from ``os.wait4`` (the parent of this mode imports
neither torch nor tilerseg, so it is smaller than its children and the figure is the
child's own). **Target: tilerseg's throughput (image pixels / median process wall time)
>= 4.5x MONAI's** (default layout; the channels-last ratio is printed beside it). The
exactness checks are not part of this mode (see the default mode).

MONAI is a benchmark-only dependency, not one of tilerseg's. Install it into the
virtual environment (MONAI 1.6.1 needs torch >= 2.8 and numpy < 3, which torch 2.13 and
numpy 2.4 satisfy, so pip leaves them alone; ``--no-deps`` makes sure)::

    pip install monai --no-deps

Without it, the MONAI rows are skipped with the reason printed.

Usage, from the repository root with the virtualenv active::

    python benchmarks/bench_peers.py                              # 4096^2, 1 repeat
    python benchmarks/bench_peers.py --repeats 3 --json peers.json
    python benchmarks/bench_peers.py --size 1024 --methods tilerseg dask
    python benchmarks/bench_peers.py --mode process --repeats 3 --workdir /tmp/tilerseg-peers \
        --json peers-process.json

Options: ``--mode`` (``inference``, the default, or ``process``), ``--size`` (multiple of
16), ``--repeats``, ``--methods`` (of the chosen mode), ``--tile``
(tilerseg tile and dask chunk, 512), ``--roi`` (MONAI window, 512), ``--workdir``
(scratch directory; default a fresh temporary one, removed at the end unless ``--keep``;
an image of the right size already there is reused), ``--keep``, ``--json FILE``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MIB = 1024**2
GIB = 1024**3
SEED = 0
TIFF_TILE = 256
STEP = 16  # pooling step of the depth-4 U-Net: image sides must be multiples of it
MONAI_OVERLAP = 0.25
MONAI_BATCH = 4
DASK_WORKERS = 2

METHODS = ("tilerseg", "tilerseg-bf16", "monai", "monai-cl", "dask")
PROCESS_METHODS = ("tilerseg-run", "monai-process", "monai-cl-process")
PROCESS_TARGET = 4.5  # tilerseg run throughput / MONAI's, whole fresh processes
REFERENCES = ("oneshot-valid", "oneshot-same")
REFERENCE_OF = {"tilerseg": "oneshot-valid", "tilerseg-bf16": "oneshot-valid",
                "dask": "oneshot-valid",
                "monai": "oneshot-same", "monai-cl": "oneshot-same"}
DESCRIPTION = {
    "tilerseg": "segment_to_zarr, pipeline, TIFF -> zarr",
    "tilerseg-run": "tilerseg run, defaults, TIFF -> OME-Zarr",
    "monai-process": "script: TIFF -> SWI -> uint8 .npy",
    "monai-cl-process": "the same, channels_last",
    "tilerseg-bf16": "the same with precision='bf16' (opt-in)",
    "monai": "sliding_window_inference, default layout",
    "monai-cl": "sliding_window_inference, channels_last",
    "dask": f"map_overlap, {DASK_WORKERS} workers x 1 thread",
    "oneshot-valid": "valid model, whole image",
    "oneshot-same": "same-padded model, whole image",
}


# -- shared helpers ------------------------------------------------------------------------


def image_paths(workdir: Path, size: int) -> tuple[Path, Path]:
    stem = workdir / f"membrane-{size}-seed{SEED}"
    return stem.with_suffix(".npy"), stem.with_suffix(".tif")


def prob_path(workdir: Path, name: str) -> Path:
    return workdir / f"prob1-{name}.npy"


def result_path(workdir: Path, name: str) -> Path:
    return workdir / f"result-{name}.json"


def load_models() -> tuple[Any, Any, str]:
    """(valid model, same-padded model with the same weights, description), float32 eval."""
    import torch

    import tilerseg

    try:
        valid = tilerseg.load_model()
        source = "bundled ISBI 2012 U-Net"
    except (tilerseg.TilersegError, OSError) as exc:
        torch.manual_seed(0)
        valid = tilerseg.create_model("unet", base_channels=16)
        source = f"random weights, seed 0 (bundled model unavailable: {exc})"
    valid = valid.float().eval()
    same = tilerseg.create_model("unet", **{**valid.config, "padding": "same"})
    same.load_state_dict(valid.state_dict())
    same = same.float().eval()
    return valid, same, source


def scaled(image: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1], exactly as tilerseg's automatic normalisation."""
    return image.astype(np.float32) / np.float32(255.0)


def monai_status() -> str | None:
    """None when MONAI's sliding-window inferer imports, else the reason it does not."""
    try:
        from monai.inferers import sliding_window_inference  # noqa: F401
    except Exception as exc:  # noqa: BLE001 (ImportError, or anything MONAI raises)
        return f"{type(exc).__name__}: {exc}"
    return None


# -- the methods, each run in a child process ---------------------------------------------


def run_tilerseg(args: argparse.Namespace, workdir: Path,
                 precision: str = "fp32") -> tuple[float, Any]:
    import tilerseg
    from tilerseg.io.writers import open_output

    valid, _, _ = load_models()
    _, tif = image_paths(workdir, args.size)
    out = workdir / "out-tilerseg.zarr"
    start = time.perf_counter()
    tilerseg.segment_to_zarr(str(tif), valid, out, tile=args.tile, dtype="float32",
                             overwrite=True, precision=precision)
    wall = time.perf_counter() - start

    def foreground() -> np.ndarray:
        return np.asarray(open_output(out)["probabilities"][1], dtype=np.float32)

    return wall, foreground


def run_monai(args: argparse.Namespace, workdir: Path, channels_last: bool) -> tuple[float, Any]:
    import torch
    from monai.inferers import sliding_window_inference

    _, same, _ = load_models()
    npy, _ = image_paths(workdir, args.size)
    image = np.load(npy)
    if channels_last:
        same = same.to(memory_format=torch.channels_last)
    start = time.perf_counter()
    x = torch.from_numpy(scaled(image))[None, None]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        logits = sliding_window_inference(x, (args.roi, args.roi), MONAI_BATCH, same,
                                          overlap=MONAI_OVERLAP, mode="gaussian")
        probs = torch.softmax(logits, dim=1)
    wall = time.perf_counter() - start
    return wall, lambda: probs[0, 1].numpy()


def run_dask(args: argparse.Namespace, workdir: Path) -> tuple[float, Any]:
    import dask.array as da
    import torch

    import tilerseg

    valid, _, _ = load_models()
    valid = valid.to(memory_format=torch.channels_last)
    g = tilerseg.model_geometry(valid)
    halo = g.halo[0]
    npy, _ = image_paths(workdir, args.size)
    image = np.load(npy)
    torch.set_num_threads(1)

    def block_probs(block: np.ndarray) -> np.ndarray:
        # dask hands over the chunk plus `halo` on every side; extend the far sides to an
        # admissible input side (pooling would floor otherwise) and crop the extra output.
        out_shape = tuple(n - 2 * halo for n in block.shape)
        pads = [(0, g.admissible_input(n, a) - n) for a, n in enumerate(block.shape)]
        if any(p for _, p in pads):
            block = np.pad(block, pads, mode="reflect")
        x = torch.from_numpy(np.ascontiguousarray(block))[None, None]
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            logits = valid(x)[0, :, : out_shape[0], : out_shape[1]]
            return torch.softmax(logits, dim=0).numpy()

    start = time.perf_counter()
    x = da.from_array(scaled(image), chunks=args.tile)
    probs = da.map_overlap(
        block_probs, x, depth=halo, boundary="reflect", trim=False, new_axis=0,
        chunks=((g.out_channels,), *x.chunks), dtype=np.float32,
    )
    result = probs.compute(scheduler="threads", num_workers=DASK_WORKERS)
    wall = time.perf_counter() - start
    return wall, lambda: result[1]


def run_oneshot(args: argparse.Namespace, workdir: Path, valid_model: bool) -> tuple[float, Any]:
    import torch

    import tilerseg

    valid, same, _ = load_models()
    model = (valid if valid_model else same).to(memory_format=torch.channels_last)
    npy, _ = image_paths(workdir, args.size)
    image = scaled(np.load(npy))
    start = time.perf_counter()
    if valid_model:
        g = tilerseg.model_geometry(valid)
        h = g.halo[0]
        pads = [(h, g.admissible_input(n + 2 * h, a) - n - h) for a, n in enumerate(image.shape)]
        image = np.pad(image, pads, mode="reflect")
    x = torch.from_numpy(image)[None, None].contiguous(memory_format=torch.channels_last)
    del image
    with torch.inference_mode():
        logits = model(x)[0, :, : args.size, : args.size]
        del x
        probs = torch.softmax(logits, dim=0)
    wall = time.perf_counter() - start
    return wall, lambda: probs[1].numpy()


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started (exec).

    Read from ``VmHWM`` in ``/proc/self/status``, the high-water mark of this process's
    own address space. ``getrusage(RUSAGE_SELF).ru_maxrss`` is not used: Linux carries it
    over from the forked parent across ``execve``, so every child would report at least
    the parent's peak.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: KiB


def monai_process(args: argparse.Namespace, channels_last: bool) -> None:
    """A MONAI user's script, whole: imports, model, read the TIFF, infer, save uint8.

    Run in a fresh process and timed from outside (``--mode process``); it also writes
    its own stage times (seconds since this function started; the interpreter start-up
    and this script's own imports come before) to its result JSON. With
    ``--imports-only`` it stops after the imports and the model (the untimed warm-up).
    """
    begin = time.perf_counter()
    stages: dict[str, float] = {}
    import tifffile
    import torch
    from monai.inferers import sliding_window_inference

    stages["imports"] = time.perf_counter() - begin
    _, same, _ = load_models()
    if channels_last:
        same = same.to(memory_format=torch.channels_last)
    stages["model"] = time.perf_counter() - begin
    workdir = Path(args.workdir)
    name = args.method
    if not args.imports_only:
        _, tif = image_paths(workdir, args.size)
        image = tifffile.imread(tif)
        stages["read"] = time.perf_counter() - begin
        x = torch.from_numpy(scaled(image))[None, None]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            logits = sliding_window_inference(x, (args.roi, args.roi), MONAI_BATCH, same,
                                              overlap=MONAI_OVERLAP, mode="gaussian")
            probs = torch.softmax(logits, dim=1)[0]
        stages["inference"] = time.perf_counter() - begin
        encoded = np.rint(probs.numpy() * np.float32(255)).astype(np.uint8)
        np.save(workdir / f"out-{name}.npy", encoded)
        stages["write"] = time.perf_counter() - begin
    result_path(workdir, name).write_text(json.dumps(
        {"method": name, "stages_s": stages, "peak_rss_bytes": peak_rss_bytes(),
         "imports_only": bool(args.imports_only)}))


def child(args: argparse.Namespace) -> None:
    """Run one method, write its result JSON and its class-1 probabilities."""
    workdir = Path(args.workdir)
    name = args.method
    runners = {
        "tilerseg": lambda: run_tilerseg(args, workdir),
        "tilerseg-bf16": lambda: run_tilerseg(args, workdir, precision="bf16"),
        "monai": lambda: run_monai(args, workdir, channels_last=False),
        "monai-cl": lambda: run_monai(args, workdir, channels_last=True),
        "dask": lambda: run_dask(args, workdir),
        "oneshot-valid": lambda: run_oneshot(args, workdir, valid_model=True),
        "oneshot-same": lambda: run_oneshot(args, workdir, valid_model=False),
    }
    wall, foreground = runners[name]()
    peak = peak_rss_bytes()
    p1 = np.ascontiguousarray(foreground(), dtype=np.float32)
    if p1.shape != (args.size, args.size):
        raise SystemExit(f"{name}: output shape {p1.shape}, expected {(args.size,) * 2}")
    np.save(prob_path(workdir, name), p1)
    result_path(workdir, name).write_text(json.dumps(
        {"method": name, "wall_s": wall, "peak_rss_bytes": peak}))


# -- the parent ------------------------------------------------------------------------------


@dataclass
class Runs:
    name: str
    wall_s: list[float] = field(default_factory=list)
    peak_rss_bytes: list[int] = field(default_factory=list)
    max_dev: list[float] = field(default_factory=list)
    max_dev_interior: list[float] = field(default_factory=list)

    @property
    def wall(self) -> float:
        return statistics.median(self.wall_s)

    @property
    def peak(self) -> float:
        return statistics.median(self.peak_rss_bytes)


def make_workdir(args: argparse.Namespace) -> tuple[Path, bool]:
    """``--workdir`` (created), or a new temporary folder; and whether to remove it after."""
    if args.workdir is None:
        return Path(tempfile.mkdtemp(prefix="tilerseg-bench-peers-")), not args.keep
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir, False


def make_image(workdir: Path, size: int) -> tuple[Path, Path]:
    """Write (or reuse) the uint8 image as .npy and as a tiled zlib BigTIFF."""
    import tifffile

    npy, tif = image_paths(workdir, size)
    if npy.exists() and tif.exists():
        try:
            with tifffile.TiffFile(tif) as f:
                ok = f.pages[0].shape == (size, size)
            ok = ok and np.load(npy, mmap_mode="r").shape == (size, size)
        except (OSError, ValueError):
            ok = False
        if ok:
            print(f"reusing {npy.name} and {tif.name} in {workdir}", flush=True)
            return npy, tif
    from tilerseg.synthetic import membrane_image

    start = time.perf_counter()
    image, _ = membrane_image((size, size), seed=SEED)
    np.save(npy, image)
    tifffile.imwrite(tif, image, tile=(TIFF_TILE, TIFF_TILE), compression="zlib",
                     bigtiff=True)
    print(f"wrote {npy.name} and {tif.name} ({size} x {size} uint8, TIFF "
          f"{tif.stat().st_size / MIB:.1f} MiB) in {time.perf_counter() - start:.1f} s",
          flush=True)
    return npy, tif


def run_child(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Run ``name`` in a fresh interpreter; its result, plus the whole child's peak RSS."""
    import tilerseg

    command = [sys.executable, os.path.abspath(__file__), "--method", name,
               "--workdir", str(workdir), "--size", str(args.size), "--tile", str(args.tile),
               "--roi", str(args.roi)]
    env = dict(os.environ)
    root = str(Path(tilerseg.__file__).resolve().parent.parent)  # import the same tilerseg
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    result_path(workdir, name).unlink(missing_ok=True)
    process = subprocess.Popen(command, env=env)
    code = process.wait()
    if code != 0:
        raise SystemExit(f"{name} failed with status {code}: {' '.join(command)}")
    result = json.loads(result_path(workdir, name).read_text())
    return result


def deviations(workdir: Path, name: str, reference: str, border: int) -> tuple[float, float]:
    """Max |p1 - p1_ref| over the image and over pixels >= ``border`` px from its edge."""
    p = np.load(prob_path(workdir, name))
    ref = np.load(prob_path(workdir, reference))
    diff = np.abs(p.astype(np.float64) - ref)
    inner = diff[border:-border, border:-border] if 2 * border < min(diff.shape) else diff[:0]
    return float(diff.max()), float(inner.max()) if inner.size else float("nan")


def print_table(runs: dict[str, Runs], refs: dict[str, dict[str, Any]], pixels: int,
                border: int) -> None:
    header = (f"{'method':<13} {'what':<42} {'wall s':>8} {'Mpx/s':>7} {'peak RSS MiB':>13} "
              f"{'max|dp1|':>10} {f'>={border}px in':>11}  reference")
    print(header)
    print("-" * len(header))
    for name, r in runs.items():
        print(f"{name:<13} {DESCRIPTION[name]:<42} {r.wall:>8.2f} {pixels / r.wall / 1e6:>7.3f} "
              f"{r.peak / MIB:>13.0f} {max(r.max_dev):>10.2e} {max(r.max_dev_interior):>11.2e}"
              f"  {REFERENCE_OF[name]}")
    for name, ref in refs.items():
        print(f"{name:<13} {DESCRIPTION[name]:<42} {ref['wall_s']:>8.2f} "
              f"{pixels / ref['wall_s'] / 1e6:>7.3f} {ref['peak_rss_bytes'] / MIB:>13.0f} "
              f"{'-':>10} {'-':>11}  (reference, run once)")


def ratios(runs: dict[str, Runs]) -> dict[str, dict[str, float]]:
    """tilerseg's median throughput and peak RSS, each divided by every other method's."""
    if "tilerseg" not in runs:
        return {}
    t = runs["tilerseg"]
    return {name: {"throughput_tilerseg_over_other": r.wall / t.wall,
                   "peak_rss_tilerseg_over_other": t.peak / r.peak}
            for name, r in runs.items() if name != "tilerseg"}


# -- --mode process: whole fresh processes ----------------------------------------------------


def child_env() -> dict[str, str]:
    """The environment of a child: this checkout's tilerseg first on the path."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def timed_process(command: list[str], log: Path) -> tuple[float, int, int, str]:
    """Run ``command`` to its exit; (wall s, peak RSS bytes, exit status, its output).

    The wall time runs from ``Popen`` to the exit; the peak RSS is ``ru_maxrss`` of the
    child from ``os.wait4`` (the child's own, as long as this parent is smaller). stdout
    and stderr go to ``log``.
    """
    with open(log, "w") as out:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   env=child_env())
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
    process.returncode = code = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss * 1024, code, log.read_text(errors="replace")


def tilerseg_command(tif: Path, out: Path, verbose: bool = False) -> list[str]:
    """``tilerseg run`` with its default options (``-v`` only for the warm-up's log)."""
    return [sys.executable, "-m", "tilerseg", *(["-v"] if verbose else []), "run", str(tif),
            "-o", str(out), "--overwrite", "-q"]


def monai_command(name: str, args: argparse.Namespace, workdir: Path,
                  imports_only: bool = False) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--method", name, "--workdir",
            str(workdir), "--size", str(args.size), "--roi", str(args.roi),
            *(["--imports-only"] if imports_only else [])]


def runtime_lines(text: str) -> list[str]:
    """The lines of a tilerseg log that say which runtime ran, and any warning."""
    keys = ("runs the model", "OpenVINO:", "compute worker(s)", "WARNING", "eagerly")
    return [line for line in text.splitlines() if any(k in line for k in keys)]


def output_attrs(out: Path, key: str) -> dict[str, Any] | None:
    """``tilerseg/KEY`` (``profile``, ``runtime``) of an OME-Zarr output, from its
    ``zarr.json``; None where it is missing."""
    try:
        attrs = json.loads((out / "zarr.json").read_text())["attributes"]
        return dict(attrs["tilerseg"][key])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def main_process(args: argparse.Namespace) -> int:
    """``--mode process``: tilerseg run against a MONAI script, whole fresh processes."""
    from importlib.util import find_spec

    methods = [m for m in PROCESS_METHODS if m in args.methods]
    skipped: dict[str, str] = {}
    if find_spec("monai") is None:
        for m in ("monai-process", "monai-cl-process"):
            if m in methods:
                methods.remove(m)
                skipped[m] = "MONAI is not installed (pip install monai --no-deps)"
    workdir, remove = make_workdir(args)
    try:
        cache = os.environ.get("TILERSEG_CACHE_DIR")
        print(f"python {platform.python_version()}, torch {package_version('torch')}, "
              f"openvino {package_version('openvino')}, MONAI {package_version('monai')}, "
              f"{os.cpu_count()} CPUs; TILERSEG_CACHE_DIR={cache}")
        print(f"image: {args.size} x {args.size} uint8 membrane_image(seed={SEED}); whole "
              f"fresh processes; MONAI roi {args.roi}, overlap {MONAI_OVERLAP}, gaussian, "
              f"sw_batch_size {MONAI_BATCH}; workdir {workdir}", flush=True)
        _, tif = make_image(workdir, args.size)
        out = workdir / "out-tilerseg-run.zarr"
        logs = workdir / "logs"
        logs.mkdir(exist_ok=True)

        # warm caches, untimed: tilerseg once (converts and caches the OpenVINO network for
        # its window if not cached yet), each MONAI variant up to its imports and model
        warm: dict[str, Any] = {}
        if "tilerseg-run" in methods:
            shutil.rmtree(out, ignore_errors=True)
            command = tilerseg_command(tif, out, verbose=True)
            wall, _, code, text = timed_process(command, logs / "warm-tilerseg-run.log")
            if code != 0:
                print(text[-3000:])
                raise SystemExit(f"tilerseg run failed with status {code}: {' '.join(command)}")
            lines = runtime_lines(text)
            warm["tilerseg-run"] = {"wall_s": wall, "command": command, "log": lines}
            print(f"warm-up (untimed): {' '.join(command)}: {wall:.2f} s", flush=True)
            for line in lines:
                print(f"  {line}")
        for m in [m for m in methods if m != "tilerseg-run"]:
            command = monai_command(m, args, workdir, imports_only=True)
            wall, _, code, text = timed_process(command, logs / f"warm-{m}.log")
            if code != 0:
                methods.remove(m)
                skipped[m] = f"the MONAI script failed (status {code}): {text.strip()[-300:]}"
                continue
            warm[m] = {"wall_s": wall, "command": command}
            print(f"warm-up (untimed, imports and model only): {m}: {wall:.2f} s", flush=True)
        for m, why in skipped.items():
            print(f"skipping {m}: {why}")
        if not methods:
            print("nothing to run")
            return 1

        commands = {m: tilerseg_command(tif, out) if m == "tilerseg-run"
                    else monai_command(m, args, workdir) for m in methods}
        for m in methods:
            print(f"{m}: {' '.join(commands[m])}")
        pixels = args.size * args.size
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        warnings: list[str] = []
        for r in range(args.repeats):
            k = r % len(methods)  # rotate the order so no method always runs first
            for name in methods[k:] + methods[:k]:
                if name == "tilerseg-run":
                    shutil.rmtree(out, ignore_errors=True)  # untimed
                else:
                    result_path(workdir, name).unlink(missing_ok=True)
                wall, peak, code, text = timed_process(commands[name],
                                                       logs / f"{name}-{r + 1}.log")
                if code != 0:
                    print(text[-3000:])
                    raise SystemExit(f"{name} failed with status {code}: "
                                     f"{' '.join(commands[name])}")
                record: dict[str, Any] = {"wall_s": wall, "peak_rss_bytes": peak}
                if name == "tilerseg-run":
                    record["profile"] = output_attrs(out, "profile")
                    record["runtime"] = output_attrs(out, "runtime")  # what ran the model
                    flagged = [line for line in text.splitlines()
                               if "WARNING" in line or "eagerly" in line]
                    if flagged:
                        warnings += flagged
                        print("\n".join(f"  {line}" for line in flagged))
                else:
                    child = json.loads(result_path(workdir, name).read_text())
                    record["stages_s"] = child["stages_s"]
                    record["child_vmhwm_bytes"] = child["peak_rss_bytes"]
                runs[name].append(record)
                extra = ""
                if name == "tilerseg-run" and record["profile"]:
                    prof = record["profile"]
                    used = record["runtime"] or {}
                    extra = (f" ({used.get('engine', '?')}, {used.get('precision', '?')}); "
                             f"pipeline wall {prof['wall']:.2f} s, set-up {prof['setup']:.2f} s,"
                             f" model_share {prof['model_share']:.3f}, waited "
                             f"{prof['starved']:.2f} s for input, {prof['blocked']:.2f} s for "
                             f"the writers")
                elif "stages_s" in record:
                    st = record["stages_s"]
                    extra = "; " + ", ".join(f"{k} at {v:.2f} s" for k, v in st.items())
                print(f"repeat {r + 1}/{args.repeats} {name}: {wall:.2f} s "
                      f"({pixels / wall / 1e6:.3f} Mpx/s), peak RSS {peak / MIB:.0f} MiB"
                      f"{extra}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        for m in methods:
            if m != "tilerseg-run":
                (workdir / f"out-{m}.npy").unlink(missing_ok=True)

        medians = {m: statistics.median(x["wall_s"] for x in runs[m]) for m in methods}
        peaks = {m: statistics.median(x["peak_rss_bytes"] for x in runs[m]) for m in methods}
        print()
        print(f"{args.size} x {args.size} = {pixels / 1e6:.2f} Mpx; whole fresh processes "
              f"(start-up, imports, model, read, inference, write), medians of "
              f"{args.repeats}; caches warm (tilerseg's OpenVINO network converted by an "
              f"untimed run first)")
        header = (f"{'method':<17} {'what':<40} {'wall s':>8} {'Mpx/s':>7} "
                  f"{'peak RSS MiB':>13}  runs (s)")
        print(header)
        print("-" * len(header))
        for m in methods:
            walls = ", ".join(f"{x['wall_s']:.2f}" for x in runs[m])
            print(f"{m:<17} {DESCRIPTION[m]:<40} {medians[m]:>8.2f} "
                  f"{pixels / medians[m] / 1e6:>7.3f} {peaks[m] / MIB:>13.0f}  {walls}")
        ratios_: dict[str, float] = {}
        met = None
        if "tilerseg-run" in methods:
            for m in methods:
                if m != "tilerseg-run":
                    ratios_[m] = medians[m] / medians["tilerseg-run"]
                    print(f"tilerseg run / {m}: throughput x{ratios_[m]:.2f}, peak RSS "
                          f"x{peaks['tilerseg-run'] / peaks[m]:.2f}")
            if "monai-process" in ratios_:
                met = ratios_["monai-process"] >= PROCESS_TARGET
                print(f"target: >= {PROCESS_TARGET:g}x MONAI (default layout), whole "
                      f"processes: {'met' if met else 'NOT met'}")
        for m, why in skipped.items():
            print(f"({m} skipped: {why})")

        if args.json:
            report = {
                "benchmark": "bench_peers", "mode": "process",
                "command": [sys.executable, *sys.argv],
                "environment": {"python": platform.python_version(),
                                "torch": package_version("torch"),
                                "openvino": package_version("openvino"),
                                "monai": package_version("monai"),
                                "cpus": os.cpu_count(), "tilerseg_cache_dir": cache},
                "config": {"size": args.size, "pixels": pixels, "repeats": args.repeats,
                           "roi": args.roi, "overlap": MONAI_OVERLAP,
                           "sw_batch_size": MONAI_BATCH, "tiff_tile": TIFF_TILE,
                           "seed": SEED},
                "warm_up": warm,
                "commands": commands,
                "methods": {m: {"description": DESCRIPTION[m], "runs": runs[m],
                                "wall_s_median": medians[m],
                                "mpx_per_s_median": pixels / medians[m] / 1e6,
                                "peak_rss_bytes_median": peaks[m]} for m in methods},
                "throughput_tilerseg_over": ratios_,
                "target": PROCESS_TARGET, "met": met,
                "warnings": warnings, "skipped": skipped,
            }
            from bench_end_to_end import write_json  # not at import: MONAI's children

            write_json(args.json, report)
        return 0 if met in (True, None) else 1
    finally:
        if remove:
            shutil.rmtree(workdir, ignore_errors=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=4096,
                        help=f"image side in px, a multiple of {STEP} (default 4096)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each method, each in a fresh process (default 1)")
    parser.add_argument("--mode", choices=("inference", "process"), default="inference",
                        help="inference: time the inference inside each child (default); "
                        "process: time whole fresh processes (tilerseg run vs a MONAI "
                        "script), imports and set-up included")
    parser.add_argument("--methods", nargs="+", choices=METHODS + PROCESS_METHODS,
                        default=None,
                        help=f"methods to run (default: all of the mode: inference "
                        f"{', '.join(METHODS)}; process {', '.join(PROCESS_METHODS)})")
    parser.add_argument("--tile", type=int, default=512,
                        help="tilerseg output tile and dask chunk side (default 512, "
                        "tilerseg's CPU default)")
    parser.add_argument("--roi", type=int, default=512, help="MONAI window side (default 512)")
    parser.add_argument("--workdir", default=None,
                        help="scratch directory (default: a fresh temporary directory)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the scratch directory (always kept when --workdir is given)")
    parser.add_argument("--json", metavar="FILE", default=None,
                        help="also write the results as JSON to FILE")
    parser.add_argument("--method", choices=METHODS + REFERENCES + PROCESS_METHODS,
                        default=None,
                        help=argparse.SUPPRESS)  # internal: run one method in this process
    parser.add_argument("--imports-only", action="store_true",
                        help=argparse.SUPPRESS)  # internal: MONAI process warm-up
    args = parser.parse_args(argv)
    if args.size < 256 or args.size % STEP:
        parser.error(f"--size must be a multiple of {STEP} and at least 256")
    if args.tile < STEP or args.tile % STEP:
        parser.error(f"--tile must be a positive multiple of {STEP}")
    if args.roi < STEP or args.roi % STEP:
        parser.error(f"--roi must be a positive multiple of {STEP}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.method is not None and args.workdir is None:
        parser.error("--method needs --workdir")
    allowed = PROCESS_METHODS if args.mode == "process" else METHODS
    if args.methods is None:
        args.methods = list(allowed)
    elif args.method is None and any(m not in allowed for m in args.methods):
        parser.error(f"--mode {args.mode} runs {', '.join(allowed)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.method in PROCESS_METHODS:
        monai_process(args, channels_last=args.method == "monai-cl-process")
        return 0
    if args.method is not None:
        child(args)
        return 0
    if args.mode == "process":
        return main_process(args)

    import torch

    import tilerseg

    methods = [m for m in METHODS if m in args.methods]
    skipped: dict[str, str] = {}
    reason = monai_status()
    if reason is not None:
        for m in ("monai", "monai-cl"):
            if m in methods:
                methods.remove(m)
                skipped[m] = f"MONAI unavailable ({reason}); install with pip install monai --no-deps"
    for m, why in skipped.items():
        print(f"skipping {m}: {why}")
    if not methods:
        print("nothing to run")
        return 1

    workdir, remove = make_workdir(args)
    try:
        valid, _, source = load_models()
        geometry = tilerseg.model_geometry(valid)
        halo = geometry.halo[0]
        # pixels nearer the border than this may see the padding: the halo, plus up to
        # step - 1 px more on one side where the pooling phase widens the receptive field
        band = halo + geometry.step[0]
        pixels = args.size * args.size
        monai_version = None
        if reason is None:
            import monai

            monai_version = monai.__version__
        print(f"python {platform.python_version()}, torch {torch.__version__} "
              f"({torch.get_num_threads()} threads by default), {os.cpu_count()} CPUs, "
              f"MONAI {monai_version or 'not available'}")
        print(f"model: {source}; config {valid.config}; halo {halo}")
        print(f"image: {args.size} x {args.size} uint8 membrane_image(seed={SEED}); "
              f"tile/chunk {args.tile}, MONAI roi {args.roi}, overlap {MONAI_OVERLAP}, "
              f"gaussian, sw_batch_size {MONAI_BATCH}; workdir {workdir} "
              f"(free {shutil.disk_usage(workdir).free / GIB:.1f} GiB)", flush=True)
        make_image(workdir, args.size)

        refs: dict[str, dict[str, Any]] = {}
        for ref in sorted({REFERENCE_OF[m] for m in methods}):
            print(f"reference {ref} ...", flush=True)
            refs[ref] = run_child(ref, args, workdir)
            print(f"  {refs[ref]['wall_s']:.2f} s, peak RSS "
                  f"{refs[ref]['peak_rss_bytes'] / MIB:.0f} MiB", flush=True)

        runs = {m: Runs(m) for m in methods}
        for r in range(args.repeats):
            k = r % len(methods)  # rotate the order so no method always runs first
            for name in methods[k:] + methods[:k]:
                res = run_child(name, args, workdir)
                dev, dev_in = deviations(workdir, name, REFERENCE_OF[name], band)
                run = runs[name]
                run.wall_s.append(res["wall_s"])
                run.peak_rss_bytes.append(res["peak_rss_bytes"])
                run.max_dev.append(dev)
                run.max_dev_interior.append(dev_in)
                print(f"repeat {r + 1}/{args.repeats} {name}: {res['wall_s']:.2f} s, "
                      f"{pixels / res['wall_s'] / 1e6:.3f} Mpx/s, peak RSS "
                      f"{res['peak_rss_bytes'] / MIB:.0f} MiB, max|dp1| {dev:.2e}", flush=True)

        print()
        print(f"{args.size} x {args.size} = {pixels / 1e6:.2f} Mpx; medians of {args.repeats} "
              f"run(s) in fresh processes; max|dp1| = max |foreground probability - "
              f"reference| (worst run), also over pixels >= {band} px from the border")
        print_table(runs, refs, pixels, band)
        rat = ratios(runs)
        if rat:
            print()
            print("tilerseg / other (median throughput, median peak RSS):")
            for name, q in rat.items():
                print(f"  vs {name:<9} throughput x{q['throughput_tilerseg_over_other']:.2f}, "
                      f"peak RSS x{q['peak_rss_tilerseg_over_other']:.2f}")
        for m, why in skipped.items():
            print(f"({m} skipped: {why})")

        if args.json:
            report = {
                "benchmark": "bench_peers",
                "environment": {"python": platform.python_version(),
                                "torch": torch.__version__,
                                "torch_threads_default": torch.get_num_threads(),
                                "cpus": os.cpu_count(), "monai": monai_version,
                                "tilerseg": tilerseg.__version__},
                "config": {"size": args.size, "pixels": pixels, "repeats": args.repeats,
                           "tile": args.tile, "roi": args.roi, "overlap": MONAI_OVERLAP,
                           "sw_batch_size": MONAI_BATCH, "dask_workers": DASK_WORKERS,
                           "tiff_tile": TIFF_TILE, "seed": SEED, "model": source,
                           "model_config": valid.config, "halo": halo,
                           "interior_band_px": band},
                "methods": {
                    name: {"description": DESCRIPTION[name], "reference": REFERENCE_OF[name],
                           "wall_s": r.wall_s, "wall_s_median": r.wall,
                           "mpx_per_s_median": pixels / r.wall / 1e6,
                           "peak_rss_bytes": r.peak_rss_bytes,
                           "peak_rss_bytes_median": r.peak,
                           "max_abs_dev_p1": max(r.max_dev),
                           "max_abs_dev_p1_interior": max(r.max_dev_interior)}
                    for name, r in runs.items()},
                "references": {name: {"description": DESCRIPTION[name], **ref}
                               for name, ref in refs.items()},
                "tilerseg_ratios": rat,
                "skipped": skipped,
            }
            from bench_end_to_end import write_json  # not at import: MONAI's children

            write_json(args.json, report)
        return 0
    finally:
        if remove:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

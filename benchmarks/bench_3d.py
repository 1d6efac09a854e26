"""3D inference, whole processes: ``tilerseg run`` against MONAI's sliding window.

What it measures
----------------
One synthetic multi-modal MRI-like volume, ``--shape`` (default 128 x 256 x 256 voxels,
Z x Y x X) with ``--channels`` modalities (default 4), made by
:func:`tilerseg.synthetic.tumour_volume` (seed 0, spacing 1 mm), written once as a 4D
NIfTI file (``.nii``, X x Y x Z x C, int16, by nibabel; ``--format npy`` writes a
``(C, Z, Y, X)`` ``.npy`` instead). The model is the 3D U-Net preset
``create_model("unet3d", in_channels=C, num_classes=3, base_channels=--base-channels)``
(depth 3, anisotropic pooling (1,2,2), (1,2,2), (2,2,2)), trained briefly
(``tilerseg.train.train``: 4 epochs of 25 steps, bf16, on four other synthetic volumes of
32 x 128 x 128; about two minutes, once per work directory) so that its probabilities are
not saturated at 0 and 1, as an untrained 3D network's are, which would hide any
difference; its speed does not depend on the weights.

``tilerseg-run``
    ``python -m tilerseg run VOLUME --model valid.pt --normalize zscore --output
    probabilities --dtype float32 -o OUT.zarr --overwrite -q``: the command line with its
    default tile, backend (``auto``: OpenVINO on the CPU when installed) and workers; the
    valid-convolution model; per-channel z-score over the foreground.
``monai`` and ``monai-cl``
    this script re-invoked as a MONAI user's script: import numpy, nibabel, torch, MONAI
    and tilerseg (only for the model's class), build the *same*-padded twin of the model
    with the same weights, read the volume with nibabel (``get_fdata``, float32, to
    ``(C, Z, Y, X)``), z-score each channel over the voxels nonzero in any channel (as
    MONAI's ``NormalizeIntensity(nonzero=True, channel_wise=True)`` computes its
    statistics), ``sliding_window_inference`` (roi ``--roi``, overlap ``--overlap``,
    Gaussian blending, ``sw_batch_size=1``, torch's default threads), softmax, and save
    the float32 probabilities as ``.npy``. ``-cl`` puts model and input in
    ``channels_last_3d``.

Each method runs ``--repeats`` times in rotated order as a fresh process, timed from
``Popen`` to exit (interpreter, imports, model, reading, writing included); peak RSS is
the child's ``ru_maxrss`` from ``os.wait4``. tilerseg runs once untimed first (its
OpenVINO network is converted and cached), and each MONAI variant is started once to
warm the file-system caches. **Target: tilerseg's median process time <= MONAI's / 3**
(default layout; the channels-last ratio is printed too).

Exactness (after the timed runs): tilerseg's output against the one-shot reference of
the valid model (the whole volume, normalised with the statistics tilerseg recorded,
padded by reflection by the halo and to an admissible size, one forward pass, cropped);
MONAI's blended output against the same-padded model run once on the whole volume. The
largest and mean absolute probability differences and the share of voxels whose label
(argmax) differs are printed (tilerseg's should be float32 round-off; MONAI's shows its
blending seams).

``--tile`` and ``--run-args`` pass options to ``tilerseg run`` (e.g. ``--tile 64,64,64
--run-args "--workers 2 --threads 1"``, the default before 3D got its own), to compare
its tiles and workers (``--methods tilerseg-run --no-check``).

MONAI is a benchmark-only dependency (``pip install monai --no-deps``).

Usage, from the repository root with the virtualenv active::

    python benchmarks/bench_3d.py --repeats 3 --workdir /tmp/tilerseg-3d
    python benchmarks/bench_3d.py --shape 64,128,128 --repeats 1
    python benchmarks/bench_3d.py --methods tilerseg-run --no-check --workdir /tmp/tilerseg-3d \
        --tile 64,128,128 --run-args "--workers 2 --threads 1"
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SEED = 0
CLASSES = 3
TARGET = 3.0
METHODS = ("tilerseg-run", "monai", "monai-cl")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="128,256,256", help="Z,Y,X voxels")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--base-channels", type=int, default=16)
    p.add_argument("--roi", default="64,128,128", help="MONAI window Z,Y,X")
    p.add_argument("--overlap", type=float, default=0.25, help="MONAI overlap (its default)")
    p.add_argument("--format", choices=("nifti", "npy"), default="nifti")
    p.add_argument("--tile", default=None, help="tilerseg's --tile (default: its default)")
    p.add_argument("--run-args", default="", help="more options for tilerseg run, e.g. "
                   "'--workers 2 --threads 1'")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--workdir", default=None)
    p.add_argument("--no-check", action="store_true", help="skip the exactness check")
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.shape = tuple(int(v) for v in args.shape.split(","))
    args.roi = tuple(int(v) for v in args.roi.split(","))
    return args


def volume_path(workdir: Path, args: argparse.Namespace) -> Path:
    name = "x".join(map(str, args.shape)) + f"-c{args.channels}"
    return workdir / (f"volume-{name}.nii" if args.format == "nifti" else f"volume-{name}.npy")


def read_volume(path: Path) -> np.ndarray:
    """``(C, Z, Y, X)`` float32, as a MONAI user reads it (nibabel for NIfTI)."""
    if path.suffix == ".npy":
        return np.load(path).astype(np.float32)
    import nibabel

    data = nibabel.load(path).get_fdata(dtype=np.float32)  # X, Y, Z, C
    return np.ascontiguousarray(data.transpose(3, 2, 1, 0))


def make_inputs(workdir: Path, args: argparse.Namespace) -> Path:
    from tilerseg.synthetic import tumour_volume

    path = volume_path(workdir, args)
    if not path.exists():
        image, _ = tumour_volume(args.shape, spacing=(1.0, 1.0, 1.0), modalities=args.channels,
                                 seed=SEED)
        if args.format == "npy":
            np.save(path, image)
        else:
            import nibabel

            nibabel.save(nibabel.Nifti1Image(image.transpose(3, 2, 1, 0), np.eye(4)), path)
    if not (workdir / "valid.pt").exists():
        from tilerseg.train import Pair, TrainConfig, train

        pairs = [Pair(f"case{k}", *tumour_volume((32, 128, 128), (1.0, 1.0, 1.0),
                                                  modalities=args.channels, seed=100 + k))
                 for k in range(4)]
        pairs = [Pair(p.name, p.image, p.mask.astype(np.int64)) for p in pairs]
        config = TrainConfig(model={"name": "unet3d", "in_channels": args.channels,
                                    "num_classes": CLASSES, "base_channels": args.base_channels},
                             epochs=4, steps_per_epoch=25, precision="bf16", seed=SEED)
        train(pairs, workdir / "training", config)
        (workdir / "training" / "last.pt").rename(workdir / "valid.pt")
    return path


def same_model(workdir: Path) -> Any:
    import tilerseg

    valid = tilerseg.load_model(workdir / "valid.pt")
    same = tilerseg.create_model("unet3d", **{**valid.config, "padding": "same"})
    same.load_state_dict(valid.state_dict())
    return valid.eval(), same.eval()


def zscore(volume: np.ndarray) -> np.ndarray:
    """Per channel, over the voxels nonzero in any channel (MONAI: nonzero, channel-wise)."""
    mask = (volume != 0).any(axis=0)
    out = np.empty_like(volume)
    for c, channel in enumerate(volume):
        values = channel[mask]
        out[c] = (channel - values.mean()) / (values.std() or 1.0)
    return out


def monai_child(args: argparse.Namespace, workdir: Path, channels_last: bool,
                imports_only: bool) -> None:
    import torch
    from monai.inferers import sliding_window_inference

    _, model = same_model(workdir)
    if imports_only:
        return
    x = torch.from_numpy(zscore(read_volume(volume_path(workdir, args))))[None]
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        logits = sliding_window_inference(x, args.roi, 1, model, overlap=args.overlap,
                                          mode="gaussian")
        probs = torch.softmax(logits[0].float(), dim=0)
    np.save(workdir / f"{args.child}.npy", probs.numpy())


def run_child(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed (status {status})")
    return wall, usage.ru_maxrss * 1024


def commands(args: argparse.Namespace, workdir: Path, path: Path) -> dict[str, list[str]]:
    me = [sys.executable, __file__, "--workdir", str(workdir), "--shape",
          ",".join(map(str, args.shape)), "--channels", str(args.channels), "--roi",
          ",".join(map(str, args.roi)), "--overlap", str(args.overlap), "--format", args.format]
    return {
        "tilerseg-run": [sys.executable, "-m", "tilerseg", "run", str(path), "--model",
                         str(workdir / "valid.pt"), "--normalize", "zscore", "--output",
                         "probabilities", "--dtype", "float32", "-o",
                         str(workdir / "tilerseg.zarr"), "--overwrite", "-q"]
                        + (["--tile", args.tile] if args.tile else []) + args.run_args.split(),
        "monai": me + ["--child", "monai"],
        "monai-cl": me + ["--child", "monai-cl"],
    }


def one_shot_same(model: Any, volume: np.ndarray) -> np.ndarray:
    """The same-padded model's softmax over the whole volume in one pass."""
    import torch

    model = model.to(memory_format=torch.channels_last_3d)
    x = torch.from_numpy(np.ascontiguousarray(volume))[None].contiguous(
        memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        return torch.softmax(model(x)[0].float(), dim=0).numpy()


def check(args: argparse.Namespace, workdir: Path, path: Path, ran: list[str]
          ) -> dict[str, tuple[float, float, float]]:
    import zarr

    from tilerseg.io.writers import open_output
    from tilerseg.normalize import Normalization

    valid, same = same_model(workdir)
    volume = read_volume(path)
    found: dict[str, tuple[float, float, float]] = {}
    if "tilerseg-run" in ran:
        recorded = zarr.open_group(workdir / "tilerseg.zarr", mode="r").attrs["tilerseg"]
        norm = Normalization(**recorded["normalization"])
        from tests.reference import one_shot_reference  # DESIGN section 1, as the tests

        reference = one_shot_reference(norm(volume), valid)
        got = np.asarray(open_output(workdir / "tilerseg.zarr")["probabilities"][...])
        found["tilerseg-run"] = differences(got, reference)
        del reference, got
    monai = [m for m in ("monai", "monai-cl") if m in ran]
    if monai:
        reference = one_shot_same(same, zscore(volume))
        for m in monai:
            found[m] = differences(np.load(workdir / f"{m}.npy"), reference)
    return found


def differences(got: np.ndarray, reference: np.ndarray) -> tuple[float, float, float]:
    """Largest and mean absolute probability difference, and the share of voxels whose
    label (argmax) differs."""
    diff = np.abs(got - reference)
    labels = (got.argmax(axis=0) != reference.argmax(axis=0)).mean()
    return float(diff.max()), float(diff.mean()), float(labels)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        monai_child(args, Path(args.workdir), args.child.startswith("monai-cl"),
                    args.child.endswith("-imports"))
        return 0
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tilerseg-3d-"))
    workdir.mkdir(parents=True, exist_ok=True)
    path = make_inputs(workdir, args)
    cmds = commands(args, workdir, path)
    if "tilerseg-run" in args.methods:  # converts and caches the OpenVINO network once
        run_child(cmds["tilerseg-run"])
    for m in args.methods:
        if m != "tilerseg-run":
            run_child(cmds[m][:-1] + [m + "-imports"])
    times: dict[str, list[float]] = {m: [] for m in args.methods}
    peaks: dict[str, list[int]] = {m: [] for m in args.methods}
    for r in range(args.repeats):
        order = args.methods[r % len(args.methods):] + args.methods[: r % len(args.methods)]
        for m in order:
            wall, peak = run_child(cmds[m])
            times[m].append(wall)
            peaks[m].append(peak)
            print(f"repeat {r + 1} {m}: {wall:.2f} s, peak {peak / 2**20:.0f} MiB", flush=True)
    voxels = int(np.prod(args.shape))
    from bench_scale_out import cpu_name

    print(f"\n{cpu_name()}, {os.cpu_count()} cores; volume {args.shape} x {args.channels} "
          f"channels ({args.format}); unet3d base {args.base_channels}; tilerseg tile "
          f"{args.tile or 'default'} {args.run_args}; MONAI roi {args.roi} "
          f"overlap {args.overlap}")
    result: dict[str, Any] = {"shape": args.shape, "channels": args.channels,
                              "base_channels": args.base_channels, "roi": args.roi,
                              "overlap": args.overlap, "tile": args.tile,
                              "run_args": args.run_args, "cpu": cpu_name(),
                              "methods": {}}
    for m in args.methods:
        median = statistics.median(times[m])
        result["methods"][m] = {"seconds": times[m], "median_s": median,
                                "mvox_per_s": voxels / median / 1e6,
                                "peak_mib": max(peaks[m]) / 2**20}
        print(f"{m:<14} median {median:7.2f} s  {voxels / median / 1e6:6.3f} Mvox/s  "
              f"peak {max(peaks[m]) / 2**20:6.0f} MiB  ({', '.join(f'{t:.2f}' for t in times[m])})")
    if "tilerseg-run" in times:
        for m in ("monai", "monai-cl"):
            if m in times:
                ratio = statistics.median(times[m]) / statistics.median(times["tilerseg-run"])
                result[f"ratio_{m}"] = ratio
                print(f"tilerseg-run / {m}: {ratio:.2f}x faster"
                      + (f" (target >= {TARGET}x)" if m == "monai" else ""))
    if not args.no_check:
        result["max_abs_difference"] = check(args, workdir, path, args.methods)
        for m, d in result["max_abs_difference"].items():
            print(f"{m}: max |p - one-shot| = {d[0]:.2e}, mean {d[1]:.2e}, labels differ "
                  f"at {d[2]:.4%} of voxels")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.reference
    raise SystemExit(main())

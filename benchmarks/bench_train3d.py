"""3D training throughput on this CPU: voxels per second and peak memory, fp32 and bf16.

What it measures
----------------
``tilerseg.train.train`` (the loop ``tilerseg train --arch unet3d`` runs) on four
synthetic multi-modal volumes (:func:`tilerseg.synthetic.tumour_volume`, 48 x 160 x 160,
4 modalities, spacing 3 x 1 x 1 mm, seeds 0-3) with the command line's 3D defaults: the
``unet3d`` preset (depth 3, anisotropic pooling) with 16 base channels, the default
window (the smallest with an output of at least 16 x 64 x 64: 48 x 156 x 156 -> 16 x 68 x
68), 2 windows per step, Dice + cross-entropy with the weight map (spacing-aware), a third
of the windows centred on foreground, flips, rotations, grey values and elastic
deformation of a fifth of the windows, z-score normalisation, Adam. Each precision runs in
a fresh process for ``--epochs`` epochs of ``--steps`` steps (no validation); the first
epoch is a warm-up, and the throughput is the kept output voxels trained on
(steps x batch x output window voxels) over the later epochs' time, which the loop records
per epoch (sampling, augmentation, forward, backward and the optimiser step; not the
checkpoints). Peak RSS is the child's ``ru_maxrss`` (``os.wait4``). ``--repeats`` rounds
rotate the order of the precisions; the table shows medians and the bf16 / fp32 ratio of
each round's median.

Usage, from the repository root with the virtualenv active::

    python benchmarks/bench_train3d.py --repeats 3
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

import numpy as np

PRECISIONS = ("fp32", "bf16")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3, help="epochs per run, the first a warm-up")
    p.add_argument("--steps", type=int, default=8, help="steps per epoch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child(args: argparse.Namespace, workdir: Path) -> None:
    from tilerseg.synthetic import tumour_volume
    from tilerseg.train import Pair, TrainConfig, train

    pairs = []
    for k in range(4):
        image, labels = tumour_volume((48, 160, 160), (3.0, 1.0, 1.0), modalities=4, seed=k)
        pairs.append(Pair(f"case{k}", image, labels.astype(np.int64), (3000.0, 1000.0, 1000.0)))
    config = TrainConfig(model={"name": "unet3d", "in_channels": 4, "num_classes": 3,
                                "base_channels": 16},
                         epochs=args.epochs, steps_per_epoch=args.steps, batch_size=2,
                         precision=args.child, seed=0)
    out = workdir / f"run-{args.child}"
    result = train(pairs, out, config)
    training = json.loads((out / "state.json").read_text())
    import tilerseg

    info = tilerseg.load_model(out / "last.pt").metadata["training"]
    voxels = int(np.prod(info["output"])) * config.batch_size * config.steps_per_epoch
    seconds = [r["seconds"] for r in result["history"][1:]]
    (workdir / f"{args.child}.json").write_text(json.dumps(
        {"seconds": seconds, "voxels_per_epoch": voxels, "window": info["window"],
         "output": info["output"], "loss": training["history"][-1]["loss"]}))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args, Path(args.workdir))
        return 0
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tilerseg-train3d-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rates: dict[str, list[float]] = {p: [] for p in args.precisions}
    peaks: dict[str, list[int]] = {p: [] for p in args.precisions}
    ratios: list[float] = []
    shape = None
    for r in range(args.repeats):
        order = args.precisions[r % len(args.precisions):] + args.precisions[:r % len(args.precisions)]
        this: dict[str, float] = {}
        for precision in order:
            command = [sys.executable, __file__, "--child", precision, "--workdir", str(workdir),
                       "--epochs", str(args.epochs), "--steps", str(args.steps)]
            start = time.perf_counter()
            proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
            _, status, usage = os.wait4(proc.pid, 0)
            if status != 0:
                raise SystemExit(f"{' '.join(command)} failed (status {status})")
            found = json.loads((workdir / f"{precision}.json").read_text())
            rate = found["voxels_per_epoch"] * len(found["seconds"]) / sum(found["seconds"])
            rates[precision].append(rate)
            peaks[precision].append(usage.ru_maxrss * 1024)
            this[precision] = rate
            shape = (found["window"], found["output"])
            print(f"round {r + 1} {precision}: {rate / 1e3:.1f} k voxels/s, "
                  f"{np.mean(found['seconds']) / args.steps:.2f} s/step, peak "
                  f"{usage.ru_maxrss / 1024:.0f} MiB ({time.perf_counter() - start:.0f} s)",
                  flush=True)
        if {"fp32", "bf16"} <= set(this):
            ratios.append(this["bf16"] / this["fp32"])
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_scale_out import cpu_name

    print(f"\n{cpu_name()}, {os.cpu_count()} cores; unet3d base 16, window {shape[0]} -> "
          f"output {shape[1]}, batch 2")
    result = {"cpu": cpu_name(), "window": shape[0], "output": shape[1], "precisions": {}}
    for precision in args.precisions:
        median = statistics.median(rates[precision])
        result["precisions"][precision] = {"voxels_per_s": rates[precision],
                                           "median_voxels_per_s": median,
                                           "peak_mib": max(peaks[precision]) / 2**20}
        print(f"{precision}: median {median / 1e3:.1f} k output voxels/s "
              f"({', '.join(f'{v / 1e3:.1f}' for v in rates[precision])}), peak "
              f"{max(peaks[precision]) / 2**20:.0f} MiB")
    if ratios:
        result["bf16_over_fp32"] = statistics.median(ratios)
        print(f"bf16 / fp32: {statistics.median(ratios):.2f}x (median of the rounds' ratios)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

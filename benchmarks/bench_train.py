"""Benchmark: training steps per second on this CPU, fp32 / bf16, eager / torch.compile.

What it measures
----------------
The steps of ``tilerseg train`` (``tilerseg.train.train``): a batch from
``PatchSampler`` (tiles cut with the engine's mirror padding, the paper's weight map,
elastic deformation, flips, grey values) and one ``TrainStep`` (forward pass and
weighted loss under autocast, backward, Adam step; the very objects ``train()`` uses),
for fp32, bf16, fp32 + compile and bf16 + compile (``--configs`` to choose). The
architecture and recipe are those of the bundled model ``isbi2012-unet``, read from its
file (``load_model(...).config`` and the training config in its metadata: a valid U-Net
of depth 4, base 16, ``torch.manual_seed(0)``; 380 px windows, 2 per step, all
augmentations). The data are the ISBI 2012 training slices 00-19, as in
``docs/model-card.md`` (``--data``, default ``../shared/data/isbi2012``), or 20
synthetic 512 x 512 membrane images (``tilerseg.synthetic.membrane_image``, seeds
0-19) when that folder is absent. Every configuration draws the same batches (its own
sampler, seed 0).

Each configuration gets its own model and optimiser, is compiled if asked (timed:
``compile s``), and runs ``--warmup`` untimed steps. Then, for ``--repeats`` rounds,
every configuration runs one timed block of ``--steps`` steps, in an order rotated each
round, so that all see the same load on a shared machine. The table shows the median
steps/s over the blocks, the slowest and fastest block, and the speed relative to fp32
as the median of the per-round ratios (the fairest figure when other work competes for
the cores). The data part of a step (``PatchSampler.batch`` alone, the same for every
configuration) is timed too. The learning-rate schedule, progress and checkpoints of
``train()`` are not included.

Run from the repository root, with the virtualenv active::

    python benchmarks/bench_train.py                        # about 4 minutes on 2 cores
    python benchmarks/bench_train.py --steps 5 --repeats 3 --configs fp32 bf16
    python benchmarks/bench_train.py --configs fp32 bf16 --base-channels 32  # wider

The last line printed is one JSON object with every figure. Timings on a shared machine
are noisy: compare the configurations of one run, not runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import tilerseg
from tilerseg.engine.backends import cpu_features
from tilerseg.train import PatchSampler, TrainConfig, load_pairs
from tilerseg.train.data import Pair
from tilerseg.train.loop import TrainStep
from tilerseg.train.weights import class_weights, weight_map

CONFIGS = {
    "fp32": ("fp32", False),
    "bf16": ("bf16", False),
    "fp32+compile": ("fp32", True),
    "bf16+compile": ("bf16", True),
}
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "isbi2012"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="steps per timed block (10)")
    p.add_argument("--repeats", type=int, default=5, help="timed blocks per configuration (5)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (3)")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="ISBI 2012 folder with train/image and train/label (default: %(default)s)")
    p.add_argument("--model", default="isbi2012-unet",
                   help="model whose architecture and recipe to train (default: %(default)s)")
    p.add_argument("--base-channels", type=int, default=None, metavar="N",
                   help="train that architecture with N base channels instead (the cost of "
                   "a wider network)")
    args = p.parse_args(argv)
    if min(args.steps, args.repeats) < 1 or args.warmup < 0:
        p.error("--steps and --repeats must be >= 1, --warmup >= 0")
    return args


def training_pairs(data: Path) -> tuple[list[Pair], str]:
    """ISBI 2012 slices 00-19 (as the model card), or synthetic ones if absent."""
    images, labels = data / "train" / "image", data / "train" / "label"
    if images.is_dir() and labels.is_dir():
        return load_pairs(images, labels, select=list(range(20))), f"ISBI 2012 {data} 00-19"
    from tilerseg.synthetic import membrane_image

    pairs = []
    for k in range(20):
        image, mask = membrane_image((512, 512), seed=k)
        pairs.append(Pair(f"{k:02d}", image[None], (mask > 0).astype(np.int64)))
    return pairs, "synthetic membrane images 512 x 512, seeds 0-19"


def recipe(model_name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``TrainConfig.model`` and the other training settings of a (bundled) model."""
    model = tilerseg.load_model(model_name)
    arch = {"name": "unet", **model.config}
    trained = model.metadata.get("training", {}).get("config", {})
    keep = ("batch_size", "window", "optimizer", "lr", "momentum", "weight_map", "w0", "sigma",
            "elastic", "flips", "grey", "foreground_class")
    return arch, {k: trained[k] for k in keep if k in trained}


class Runner:
    """One configuration: its model, optimiser, train step and sampler."""

    def __init__(self, name: str, pairs: list[Pair], weights: list[np.ndarray] | None,
                 arch: dict[str, Any], config: TrainConfig, compile: bool) -> None:
        self.name = name
        torch.manual_seed(0)
        self.model = tilerseg.create_model(**arch).train()
        self.model.to(memory_format=torch.channels_last)
        lr = config.lr or (1e-3 if config.optimizer == "adam" else 1e-2)
        if config.optimizer == "adam":
            optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        else:
            optimizer = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=config.momentum)
        self.step = TrainStep(self.model, optimizer, config.precision)
        self.sampler = PatchSampler(pairs, weights, self.model, config.window or 380, config,
                                    np.random.default_rng(0))
        self.batch_size = config.batch_size
        start = time.perf_counter()
        if compile:
            self.step.compile(self.batch_size, self.sampler.window)
        self.compile_s = time.perf_counter() - start if compile else 0.0
        self.loss = float("nan")

    def run(self, steps: int) -> float:
        """``steps`` training steps; their rate in steps/s."""
        start = time.perf_counter()
        for _ in range(steps):
            self.loss = self.step(*self.sampler.batch(self.batch_size)).item()
        return steps / (time.perf_counter() - start)


def data_time(runner: Runner, count: int) -> float:
    """Median seconds of one step's data (``PatchSampler.batch``) alone."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        runner.sampler.batch(runner.batch_size)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    pairs, data = training_pairs(args.data)
    arch, settings = recipe(args.model)
    if args.base_channels is not None:
        arch = {**arch, "base_channels": args.base_channels}
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "tilerseg": tilerseg.__version__, "cores": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "bf16_native": cpu_features()["bf16"]}
    print(f"torch {env['torch']}, {env['cores']} cores ({env['torch_threads']} torch threads), "
          f"native bf16: {env['bf16_native']}")
    print(f"model {args.model}: {arch}; {settings}")
    print(f"data: {data}; {args.warmup} warm-up steps, then {args.repeats} blocks of "
          f"{args.steps} steps per configuration")
    base = TrainConfig(model=arch, **settings, seed=0)
    weights = None
    if base.weight_map:
        cw = class_weights([p.mask for p in pairs], 2)
        weights = [weight_map(p.mask, cw, base.foreground_class, base.w0, base.sigma)
                   for p in pairs]
    runners = []
    for name in args.configs:
        precision, compile = CONFIGS[name]
        config = dataclasses.replace(base, precision=precision, compile=compile)
        runners.append(r := Runner(name, pairs, weights, arch, config, compile))
        r.run(args.warmup)
        print(f"  {name}: ready" + (f" (compiled in {r.compile_s:.1f} s: {r.step.compiled})"
                                     if compile else ""), flush=True)
    blocks: dict[str, list[float]] = {r.name: [] for r in runners}
    for round_ in range(args.repeats):
        k = round_ % len(runners)
        for r in runners[k:] + runners[:k]:
            blocks[r.name].append(r.run(args.steps))
        print(f"  round {round_ + 1}: " + ", ".join(f"{n} {b[-1]:.3f}" for n, b in blocks.items()),
              flush=True)
    data_s = data_time(runners[0], args.steps)
    ref = blocks.get("fp32")
    results = {}
    for r in runners:
        b = blocks[r.name]
        ratio = statistics.median(x / y for x, y in zip(b, ref)) if ref else None
        results[r.name] = {"steps_per_s": statistics.median(b), "blocks": b, "vs_fp32": ratio,
                           "compile_s": r.compile_s, "compiled": r.step.compiled,
                           "last_loss": r.loss}
    print()
    print(f"{'config':<14} {'steps/s':>8} {'min':>7} {'max':>7} {'s/step':>7} {'x fp32':>7} "
          f"{'compile s':>9}")
    for name, r in results.items():
        ratio = "-" if r["vs_fp32"] is None else f"{r['vs_fp32']:.2f}"
        print(f"{name:<14} {r['steps_per_s']:>8.3f} {min(r['blocks']):>7.3f} "
              f"{max(r['blocks']):>7.3f} {1 / r['steps_per_s']:>7.3f} {ratio:>7} "
              f"{r['compile_s']:>9.1f}")
    print(f"data alone (tile sampling + augmentation, every config): {data_s:.3f} s/step")
    record = {"benchmark": "train", "env": env, "model": args.model, "arch": arch,
              "settings": settings, "data": data, "warmup": args.warmup, "steps": args.steps,
              "repeats": args.repeats, "data_s_per_step": data_s, "results": results}
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: training steps per second on this CPU, fp32 / bf16, eager / torch.compile.

What it measures
----------------
``tilerseg.train.train`` itself (the loop ``tilerseg train`` runs: tile sampling with the
engine's mirror padding, weight maps, elastic deformation, flips, grey values, forward,
weighted loss, backward, Adam step), once per configuration: fp32, bf16, fp32 + compile
and bf16 + compile (``--configs`` to choose). The architecture and recipe are those of
the bundled model ``isbi2012-unet``, read from its file (``load_model(...).config`` and
the training config in its metadata: a valid U-Net of depth 4, base 16; 380 px windows,
2 tiles per step, all augmentations on), with ``seed`` 0. The data are the ISBI 2012
training slices 00-19, as in ``docs/model-card.md`` (``--data``, default
``../shared/data/isbi2012``), or 20 synthetic 512 x 512 membrane images
(``tilerseg.synthetic.membrane_image``, seeds 0-19) when that folder is absent.

Each configuration runs one epoch of ``--warmup + --repeats x --steps`` steps; the end
of every step is taken from the ``progress`` callback. The first ``--warmup`` steps (at
least one) are dropped; the rest are cut into ``--repeats`` blocks of ``--steps`` steps.
The table shows the median of the blocks' steps/s, the slowest and fastest block, the
speed relative to fp32, and the "first step" latency: from calling ``train()`` to the end
of step 1 (weight maps, model set-up and, with compile, the compilation). The data part
of a step (``PatchSampler.batch``, the same for every configuration) is timed alone too,
to show how much of a step no precision can speed up.

Run from the repository root, with the virtualenv active::

    python benchmarks/bench_train.py                        # about 4 minutes on 2 cores
    python benchmarks/bench_train.py --steps 5 --repeats 3 --configs fp32 bf16

The last line printed is one JSON object with every figure. Timings on a shared machine
are noisy: compare configurations of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import tilerseg
from tilerseg.train import PatchSampler, TrainConfig, load_pairs, train
from tilerseg.train.data import Pair

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
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (>= 1; 3)")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="ISBI 2012 folder with train/image and train/label (default: %(default)s)")
    p.add_argument("--model", default="isbi2012-unet",
                   help="model whose architecture and recipe to train (default: %(default)s)")
    args = p.parse_args(argv)
    if min(args.steps, args.repeats, args.warmup) < 1:
        p.error("--steps, --repeats and --warmup must be >= 1")
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


def bf16_native() -> bool | None:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


def time_config(pairs: list[Pair], arch: dict[str, Any], settings: dict[str, Any],
                precision: str, compile: bool, args: argparse.Namespace) -> dict[str, Any]:
    total = args.warmup + args.repeats * args.steps
    config = TrainConfig(model=arch, **settings, epochs=1, steps_per_epoch=total, seed=0,
                         precision=precision, compile=compile)
    ends: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as out:
        called = time.perf_counter()
        result = train(pairs, out, config,
                       progress=lambda e, s, n, loss: ends.append(time.perf_counter()))
    losses = [r["loss"] for r in result["history"]]
    marks = ends[args.warmup - 1:]  # the end of the last warm-up step starts block 1
    blocks = [args.steps / (marks[(b + 1) * args.steps] - marks[b * args.steps])
              for b in range(args.repeats)]
    return {"precision": precision, "compile": compile, "compiled": result["compiled"],
            "steps_per_s": statistics.median(blocks), "blocks": blocks,
            "first_step_s": ends[0] - called, "loss": losses[-1]}


def time_data(pairs: list[Pair], arch: dict[str, Any], settings: dict[str, Any],
              args: argparse.Namespace) -> float:
    """Median seconds of one step's data (``PatchSampler.batch``) alone."""
    from tilerseg.train.weights import class_weights, weight_map

    config = TrainConfig(model=arch, **settings, seed=0)
    model = tilerseg.create_model(**arch)
    weights = None
    if config.weight_map:
        cw = class_weights([p.mask for p in pairs], 2)
        weights = [weight_map(p.mask, cw, config.foreground_class, config.w0, config.sigma)
                   for p in pairs]
    sampler = PatchSampler(pairs, weights, model, config.window or 380, config,
                           np.random.default_rng(0))
    times = []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        sampler.batch(config.batch_size)
        times.append(time.perf_counter() - start)
    return statistics.median(times[args.warmup:])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    pairs, data = training_pairs(args.data)
    arch, settings = recipe(args.model)
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "tilerseg": tilerseg.__version__, "cores": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "bf16_native": bf16_native()}
    print(f"torch {env['torch']}, {env['cores']} cores ({env['torch_threads']} torch threads), "
          f"native bf16: {env['bf16_native']}")
    print(f"model {args.model}: {arch}; {settings}")
    print(f"data: {data}; {args.warmup} warm-up steps, then {args.repeats} blocks of "
          f"{args.steps} steps per configuration")
    results = {}
    for name in args.configs:
        precision, compile = CONFIGS[name]
        results[name] = r = time_config(pairs, arch, settings, precision, compile, args)
        print(f"  {name}: {r['steps_per_s']:.3f} steps/s (blocks "
              f"{', '.join(f'{b:.3f}' for b in r['blocks'])})", flush=True)
    data_s = time_data(pairs, arch, settings, args)
    base = results.get("fp32", {}).get("steps_per_s")
    print()
    print(f"{'config':<14} {'steps/s':>8} {'min':>7} {'max':>7} {'x fp32':>7} {'s/step':>7} "
          f"{'first step s':>12} {'compiled':>8}")
    for name, r in results.items():
        ratio = f"{r['steps_per_s'] / base:.2f}" if base else "-"
        print(f"{name:<14} {r['steps_per_s']:>8.3f} {min(r['blocks']):>7.3f} "
              f"{max(r['blocks']):>7.3f} {ratio:>7} {1 / r['steps_per_s']:>7.3f} "
              f"{r['first_step_s']:>12.1f} {r['compiled']!s:>8}")
    print(f"data alone (tile sampling + augmentation, every config): {data_s:.3f} s/step")
    record = {"benchmark": "train", "env": env, "model": args.model, "arch": arch,
              "settings": settings, "data": data, "warmup": args.warmup, "steps": args.steps,
              "repeats": args.repeats, "data_s_per_step": data_s, "results": results}
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What bf16 (and OpenVINO) change in the output: probabilities, labels and ISBI scores.

What it measures
----------------
The bundled model (:func:`tilerseg.load_model`: the ISBI 2012 valid U-Net, depth 4, base
16; its tuned threshold ``metadata["threshold"]`` and foreground class) segments, with
:func:`tilerseg.segment` on the CPU (``tile=--tile``, default 512), two inputs:

``isbi``
    The ISBI 2012 validation slices 20-24 (512 x 512 uint8, ``train/image/20.png`` ...
    ``24.png`` and their labels, read with :func:`tilerseg.train.data.load_pairs`, as
    training does for its validation set) from ``--isbi`` (default
    ``../shared/data/isbi2012`` beside the repository; only read from there, never
    copied).
``synthetic``
    The seamless synthetic membrane slide of ``--synthetic-size`` (4096) px
    (:func:`tilerseg.synthetic.write_membrane_tiff`, seed 0, cached in ``--workdir`` as
    ``membrane-N.tif`` and shared with the other benchmarks), loaded in memory;
    ``--synthetic-crop`` segments only its top-left crop of that side.

with five runtimes: ``backend="torch", precision="fp32"`` (the reference: exact fp32),
``torch`` bf16 (``torch.autocast``), ``openvino`` fp32, ``openvino`` bf16
(``INFERENCE_PRECISION_HINT``) and ``openvino`` int8 (:mod:`tilerseg.engine.int8`:
calibrated on the 30 unlabelled ISBI challenge test slices ``test/*.png`` for ISBI, on the
image itself for the synthetic slide). For each of the last four against the reference:

* the largest and the mean absolute difference of the foreground probability (for a
  two-class softmax the same as over both classes);
* the fraction of label pixels that differ, labels by the model's
  :class:`tilerseg.labels.LabelPolicy` (``LabelPolicy.for_model``: foreground where its
  probability >= the tuned threshold);
* on ISBI, the ISBI-style scores of :func:`tilerseg.metrics.isbi_scores` (as training
  validates: the foreground probability of the 5 slices against ``mask ==
  foreground``; pixel error and adapted Rand error each at its best threshold of 0.05,
  0.10, ..., 0.95; cells grown by 32 px) and their change from the reference.

OpenVINO fp32 should agree with torch fp32 within 1e-4 (the check the engine itself
applies before it uses OpenVINO); the runtime that really ran is read from tilerseg's
log, and a fallback to eager torch is reported. The seconds of each call are printed for
orientation only (one call each, OpenVINO's conversion cached: not a timing benchmark).

Run from the repository root, with the virtualenv active::

    python benchmarks/bench_precision.py --json precision.json
    python benchmarks/bench_precision.py --synthetic-crop 2048      # faster

Options: ``--isbi``, ``--slices`` (20 21 22 23 24), ``--synthetic-size`` (4096),
``--synthetic-crop``, ``--tile`` (512), ``--workdir`` (``/tmp/tilerseg-bench``),
``--json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_end_to_end import EngineLog, add_output_arguments, environment, open_workdir, write_json
from bench_memory import make_slide

import tilerseg
from tilerseg.labels import LabelPolicy
from tilerseg.metrics import isbi_scores

CONFIGS = (("torch", "fp32"), ("torch", "bf16"), ("openvino", "fp32"), ("openvino", "bf16"),
           ("openvino", "int8"))
REFERENCE = ("torch", "fp32")
EXACT = 1e-4  # OpenVINO fp32 against torch fp32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_isbi = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012"
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--isbi", default=str(default_isbi),
                        help=f"ISBI 2012 folder (default {default_isbi})")
    parser.add_argument("--slices", type=int, nargs="+", default=[20, 21, 22, 23, 24],
                        help="training slices to use (default the validation slices 20-24)")
    parser.add_argument("--synthetic-size", type=int, default=4096,
                        help="synthetic slide side (default 4096; 0 to skip)")
    parser.add_argument("--synthetic-crop", type=int, default=None,
                        help="segment only the top-left crop of this side")
    parser.add_argument("--tile", type=int, default=512, help="output tile (default 512)")
    add_output_arguments(parser)
    return parser.parse_args(argv)


def name(config: tuple[str, str]) -> str:
    return f"{config[0]} {config[1]}"


def run(images: list[np.ndarray], model: torch.nn.Module, config: tuple[str, str], tile: int,
        log: EngineLog, calibration: Path | None = None
        ) -> tuple[list[np.ndarray], float, str, list[str]]:
    """Probabilities of every image with one runtime; (probs, seconds, engine, log lines).
    int8 is calibrated on ``calibration`` (a folder), else on each image itself."""
    backend, precision = config
    log.take()
    start = time.perf_counter()
    extra = {"calibration": calibration} if precision == "int8" else {}
    probs = [tilerseg.segment(image, model, tile=tile, device="cpu", backend=backend,
                              precision=precision, **extra) for image in images]
    seconds = time.perf_counter() - start
    lines = log.take()
    engine = "openvino" if any("openvino runs the model" in x for x in lines) else "torch"
    return probs, seconds, engine, [x for x in lines if "runs the model" in x
                                    or "eagerly" in x or "failed" in x]


def compare(probs: list[np.ndarray], ref: list[np.ndarray], policy: LabelPolicy
            ) -> dict[str, float]:
    """Largest and mean |difference| of the foreground probability; labels that differ."""
    largest, total, count, changed = 0.0, 0.0, 0, 0
    for p, r in zip(probs, ref):
        d = np.abs(policy.foreground_probability(p).astype(np.float64)
                   - policy.foreground_probability(r))
        largest = max(largest, float(d.max()))
        total += float(d.sum())
        count += d.size
        changed += int(np.count_nonzero(policy(p) != policy(r)))
    return {"max_abs_diff": largest, "mean_abs_diff": total / count,
            "labels_changed": changed / count, "labels_changed_pixels": changed,
            "pixels": count}


def isbi(probs: list[np.ndarray], masks: list[np.ndarray], policy: LabelPolicy
         ) -> dict[str, Any]:
    fg = np.stack([policy.foreground_probability(p) for p in probs])
    truth = np.stack([(m == policy.foreground).astype(np.uint8) for m in masks])
    return isbi_scores(np.clip(fg, 0, 1), truth)


def threshold(t: float | None) -> str:
    return "  -  " if t is None else f"{t:.2f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = tilerseg.load_model().eval()
    meta = getattr(model, "metadata", {}) or {}
    geometry = tilerseg.model_geometry(model)
    policy = LabelPolicy.for_model(geometry.out_channels, meta)
    print(f"torch {torch.__version__}; bundled model {model.config}; label policy {policy}; "
          f"recorded validation {meta.get('validation')}", flush=True)

    datasets: dict[str, dict[str, Any]] = {}
    isbi_dir = Path(args.isbi)
    if isbi_dir.is_dir():
        from tilerseg.train.data import load_pairs

        pairs = load_pairs(isbi_dir / "train" / "image", isbi_dir / "train" / "label",
                           geometry.out_channels, select=args.slices)
        datasets["isbi"] = {"images": [p.image for p in pairs], "masks": [p.mask for p in pairs],
                            "what": f"ISBI 2012 slices {', '.join(p.name for p in pairs)} "
                                    f"({pairs[0].image.shape[-1]}^2)",
                            "calibration": isbi_dir / "test"}
    else:
        print(f"skipping ISBI: {isbi_dir} is not a folder")
    if args.synthetic_size:
        import tifffile

        workdir = open_workdir(args.workdir)
        slide = make_slide(workdir, args.synthetic_size)
        image = tifffile.imread(slide)
        side = args.synthetic_crop or args.synthetic_size
        image = np.ascontiguousarray(image[:side, :side])
        datasets["synthetic"] = {"images": [image], "masks": None,
                                 "what": f"{slide.name}, {side}^2 crop"
                                 if side != args.synthetic_size else slide.name}

    results: dict[str, dict[str, Any]] = {}
    log = EngineLog()
    with log.active():
        for dname, data in datasets.items():
            print(f"\n{dname}: {data['what']}", flush=True)
            ref = None
            rows: dict[str, Any] = {}
            for config in CONFIGS:
                probs, seconds, engine, lines = run(data["images"], model, config, args.tile, log,
                                                    data.get("calibration"))
                pixels = sum(int(np.prod(im.shape[-2:])) for im in data["images"])
                row: dict[str, Any] = {"backend": config[0], "precision": config[1],
                                       "engine": engine, "seconds": seconds,
                                       "mpx_s": pixels / seconds / 1e6, "log": lines}
                if config == REFERENCE:
                    ref = probs
                assert ref is not None
                row.update(compare(probs, ref, policy))
                if data["masks"] is not None:
                    row["isbi"] = isbi(probs, data["masks"], policy)
                rows[name(config)] = row
                ran = "" if engine == config[0] else f" (asked {config[0]}: FELL BACK)"
                print(f"  {name(config)}: ran on {engine}{ran}, {seconds:.2f} s "
                      f"({row['mpx_s']:.2f} Mpx/s, one call each, not a timing); max|dp| "
                      f"{row['max_abs_diff']:.2e}, labels changed {row['labels_changed']:.2e}",
                      flush=True)
                for line in lines:
                    print(f"    {line}")
                del probs
            if "isbi" in rows[name(REFERENCE)]:
                base = rows[name(REFERENCE)]["isbi"]
                for row in rows.values():
                    row["pixel_error_change"] = row["isbi"]["pixel_error"] - base["pixel_error"]
                    row["rand_error_change"] = row["isbi"]["rand_error"] - base["rand_error"]
            results[dname] = {"what": data["what"], "rows": rows}

    print()
    print(f"against torch fp32; labels at the tuned threshold {policy.threshold} "
          f"(foreground class {policy.foreground}); ISBI errors at their best threshold")
    header = (f"{'data':<10} {'runtime':<14} {'ran':<9} {'max|dp|':>9} {'mean|dp|':>9} "
              f"{'labels chg':>11} {'pixel err (t)':>15} {'dpixel':>9} {'rand err (t)':>15} "
              f"{'drand':>9}")
    print(header)
    print("-" * len(header))
    ok = True
    for dname, res in results.items():
        for rname, row in res["rows"].items():
            cells = f"{'':>15} {'':>9} {'':>15} {'':>9}"
            if "isbi" in row:
                s = row["isbi"]
                cells = (f"{s['pixel_error']:>9.5f} ({threshold(s['pixel_threshold'])}) "
                         f"{row['pixel_error_change']:>+9.5f} "
                         f"{s['rand_error']:>9.5f} ({threshold(s['rand_threshold'])}) "
                         f"{row['rand_error_change']:>+9.5f}")
            print(f"{dname:<10} {rname:<14} {row['engine']:<9} {row['max_abs_diff']:>9.2e} "
                  f"{row['mean_abs_diff']:>9.2e} {row['labels_changed']:>11.2e} {cells}")
            if rname == "openvino fp32":
                exact = row["max_abs_diff"] <= EXACT and row["engine"] == "openvino"
                ok = ok and exact
    for dname, res in results.items():
        row = res["rows"].get("openvino fp32")
        if row:
            print(f"{dname}: OpenVINO fp32 vs torch fp32 max|dp| {row['max_abs_diff']:.2e} "
                  f"(<= {EXACT:g}: {'yes' if row['max_abs_diff'] <= EXACT else 'NO'})")

    if args.json:
        record = {"benchmark": "precision", "command": [sys.executable, *sys.argv],
                  "environment": environment(), "args": vars(args),
                  "policy": policy.as_dict(), "recorded_validation": meta.get("validation"),
                  "results": results, "exact_tolerance": EXACT, "openvino_fp32_exact": ok}
        write_json(args.json, record)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: ``tilerseg run`` in fp32, bf16 and int8, whole processes, and what int8 changes.

What it measures
----------------
The bundled model segments the synthetic membrane slide (``--size``, default 8192^2,
:func:`tilerseg.synthetic.write_membrane_tiff`, seed 0, cached in ``--workdir``) as users
run it, one whole process per run, the precisions in rotated order each round::

    python -m tilerseg run membrane-N.tif -o P.zarr --precision P --overwrite -q \
        [--calibration WORKDIR/calibration-N]          # int8 only

with the defaults otherwise (OpenVINO on the CPU, its 1024 px tile, uint8 probabilities).
int8 is calibrated on a folder holding one 2048^2 crop of the slide (written once), so
every round reads the same cached quantised network, as a user's repeated runs with one
calibration folder do; an untimed first run of each precision converts, quantises and
caches. Printed: each process's wall time, the medians, the median of the paired ratios
bf16 / int8 and fp32 / bf16 (how many times faster), and, against the fp32 output, the
fraction of pixels whose label differs (labels by the model's
:class:`tilerseg.labels.LabelPolicy` from the stored probabilities) and the mean
absolute difference of the stored foreground probability. The runtime that ran is read
from each output's metadata (``attrs["tilerseg"]["runtime"]``): a fall-back fails the
benchmark.

Targets (issue 20): int8 end to end >= 1.5x bf16; labels agreeing with fp32 on >= 99.5%
of the pixels.

Run from the repository root, with the virtualenv active::

    python benchmarks/bench_int8.py --size 8192 --repeats 3 --json int8.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_end_to_end import (add_output_arguments, calibration_folder, open_workdir,  # noqa: E402
                              write_json)
from bench_memory import make_slide  # noqa: E402
from bench_scale_out import CLI, cpu_name, paired, run  # noqa: E402

PRECISIONS = ("fp32", "bf16", "int8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=8192, help="slide side (default 8192)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (default 3)")
    add_output_arguments(parser)
    return parser.parse_args(argv)


def compare(path: Path, reference: Path) -> dict[str, float]:
    """Labels that differ and mean |difference| of the foreground probability."""
    import tilerseg
    from tilerseg.io.writers import decode_probabilities, open_output
    from tilerseg.labels import LabelPolicy

    model = tilerseg.load_model()
    a, b = open_output(path)["probabilities"], open_output(reference)["probabilities"]
    policy = LabelPolicy.for_model(a.shape[0], model.metadata)
    changed = total = 0
    deviation = 0.0
    step = 2048
    for y in range(0, a.shape[1], step):  # in bands: the slide need not fit in memory
        pa = decode_probabilities(a[:, y:y + step])
        pb = decode_probabilities(b[:, y:y + step])
        changed += int(np.count_nonzero(policy(pa) != policy(pb)))
        deviation += float(np.abs(policy.foreground_probability(pa)
                                  - policy.foreground_probability(pb)).sum(dtype=np.float64))
        total += pa[0].size
    return {"labels_changed": changed / total, "mean_abs_diff": deviation / total}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = open_workdir(args.workdir)
    slide = make_slide(workdir, args.size)
    calibration = calibration_folder(workdir, slide, args.size)
    outs = {p: workdir / f"precision-{p}-{args.size}.zarr" for p in PRECISIONS}
    commands = {p: [*CLI, str(slide), "-o", str(outs[p]), "--precision", p, "--overwrite",
                    "-q", *(["--calibration", str(calibration)] if p == "int8" else [])]
                for p in PRECISIONS}
    import zarr

    for p in PRECISIONS:  # converted, quantised and cached, untimed
        run(commands[p], workdir)
    print(f"{cpu_name()}; {args.size}^2, bundled model, whole processes", flush=True)
    rounds = []
    for k in range(args.repeats):
        order = PRECISIONS[k % 3:] + PRECISIONS[:k % 3]
        times = {p: run(commands[p], workdir) for p in order}
        for p in PRECISIONS:
            runtime = zarr.open_group(str(outs[p]), mode="r").attrs["tilerseg"]["runtime"]
            if runtime["precision"] != p or runtime["engine"] != "openvino":
                raise SystemExit(f"--precision {p} ran {runtime}: a fall-back")
        rounds.append(times)
        print(f"  round {k + 1}: " + ", ".join(f"{p} {times[p]:.2f} s" for p in PRECISIONS)
              + f"; bf16 / int8 {times['bf16'] / times['int8']:.3f}", flush=True)
    pixels = args.size ** 2
    result = {"cpu": cpu_name(), "date": time.strftime("%Y-%m-%d"), "size": args.size,
              "rounds": rounds,
              "median_s": {p: statistics.median(r[p] for r in rounds) for p in PRECISIONS},
              "int8_over_bf16": paired(rounds, "bf16", "int8"),
              "bf16_over_fp32": paired(rounds, "fp32", "bf16"),
              "against_fp32": {p: compare(outs[p], outs["fp32"]) for p in ("bf16", "int8")}}
    for p in PRECISIONS:
        s = result["median_s"][p]
        print(f"{p}: median {s:.2f} s ({pixels / s / 1e6:.2f} Mpx/s)")
    print(f"int8 is {result['int8_over_bf16']:.3f}x bf16, bf16 is {result['bf16_over_fp32']:.3f}x "
          "fp32 end to end (medians of paired rounds); target int8 >= 1.5x bf16: "
          f"{'met' if result['int8_over_bf16'] >= 1.5 else 'NOT met'}")
    for p, c in result["against_fp32"].items():
        print(f"{p} against fp32: labels agree on {1 - c['labels_changed']:.4%} of the pixels, "
              f"mean |dp| {c['mean_abs_diff']:.4f}")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

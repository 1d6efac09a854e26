"""Benchmark: OpenVINO against torch end to end, as users run it, in whole processes.

Each round runs, in alternating order, on the same synthetic slide (the bundled model,
fp32, each backend with its own default tile: 1024 px on OpenVINO, 512 px on torch)::

    python -m tilerseg run membrane-N.tif -o torch.zarr --backend torch --overwrite -q
    python -m tilerseg run membrane-N.tif -o openvino.zarr --backend openvino --overwrite -q

and prints each whole process's wall time, the medians and the median of the paired
ratios torch / OpenVINO (how many times faster OpenVINO is). The OpenVINO network is
converted and cached by an untimed first run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from bench_end_to_end import add_output_arguments, open_workdir, write_json
from bench_memory import make_slide
from bench_scale_out import CLI, cpu_name, paired, run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=8192, help="slide side (default 8192)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (default 3)")
    add_output_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = open_workdir(args.workdir)
    slide = make_slide(workdir, args.size)
    commands = {b: [*CLI, str(slide), "-o", str(workdir / f"{b}.zarr"), "--backend", b,
                    "--overwrite", "-q"] for b in ("torch", "openvino")}
    run(commands["openvino"], workdir)  # the network converted and cached, untimed
    rounds = []
    for k in range(args.repeats):
        order = ("torch", "openvino") if k % 2 == 0 else ("openvino", "torch")
        times = {b: run(commands[b], workdir) for b in order}
        rounds.append(times)
        print(f"  round {k + 1}: torch {times['torch']:.2f} s, OpenVINO "
              f"{times['openvino']:.2f} s, torch / OpenVINO {times['torch'] / times['openvino']:.3f}",
              flush=True)
    result = {"cpu": cpu_name(), "date": time.strftime("%Y-%m-%d"), "size": args.size,
              "rounds": rounds,
              "torch_median_s": statistics.median(r["torch"] for r in rounds),
              "openvino_median_s": statistics.median(r["openvino"] for r in rounds),
              "ratio": paired(rounds, "torch", "openvino")}
    print(f"{args.size}^2: median torch {result['torch_median_s']:.2f} s, OpenVINO "
          f"{result['openvino_median_s']:.2f} s; OpenVINO is {result['ratio']:.3f}x torch "
          "end to end (median of paired rounds)")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())

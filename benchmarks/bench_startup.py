"""Benchmark: what ``tilerseg run`` costs on a small image beyond ``import torch``.

What it measures
----------------
Two whole processes, alternating for ``--repeats`` (9) rounds::

    python -c "import torch"
    python -m tilerseg run small-512.tif -o small-512.zarr --overwrite -q

on a 512^2 synthetic membrane TIFF (:func:`tilerseg.synthetic.write_membrane_tiff`, seed 0,
written once into ``--workdir``), with the defaults (the bundled model on OpenVINO in fp32:
one tile, uint8 probabilities, pyramid, metadata, the work directory's bookkeeping). One
untimed run first converts and caches the OpenVINO network, so the timed runs read it
back, as every run after a user's first does. Printed: both medians and the median of the
paired differences (run minus ``import torch``): the start-up that is tilerseg's.

Target (issue 20): <= 1.0 s past ``import torch``.

Run from the repository root, with the virtualenv active::

    python benchmarks/bench_startup.py --json startup.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_end_to_end import add_output_arguments, open_workdir, write_json  # noqa: E402
from bench_scale_out import CLI, cpu_name, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=9, help="rounds (default 9)")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    workdir = open_workdir(args.workdir)
    image = workdir / "small-512.tif"
    if not image.is_file():
        from tilerseg.synthetic import write_membrane_tiff

        write_membrane_tiff(image, (512, 512))
    commands = {"import torch": [sys.executable, "-c", "import torch"],
                "tilerseg run": [*CLI, str(image), "-o", str(workdir / "small-512.zarr"),
                                 "--overwrite", "-q"]}
    run(commands["tilerseg run"], workdir)  # the network converted and cached, untimed
    rounds = []
    for k in range(args.repeats):
        order = list(commands) if k % 2 == 0 else list(commands)[::-1]
        rounds.append({name: run(commands[name], workdir) for name in order})
    difference = statistics.median(r["tilerseg run"] - r["import torch"] for r in rounds)
    result = {"cpu": cpu_name(), "date": time.strftime("%Y-%m-%d"), "rounds": rounds,
              "median_s": {n: statistics.median(r[n] for r in rounds) for n in commands},
              "past_import_torch_s": difference}
    print(f"{cpu_name()}; {args.repeats} rounds, whole processes")
    for name, seconds in result["median_s"].items():
        print(f"{name}: median {seconds:.2f} s")
    print(f"tilerseg run of a 512^2 image past import torch: {difference:.2f} s (median of "
          f"paired differences); target <= 1.0 s: {'met' if difference <= 1.0 else 'NOT met'}")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

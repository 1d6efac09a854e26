"""Instance labels: extra time over probabilities alone, and peak RSS against image size.

What it measures
----------------
For each slide size N (default 4096 and 16384), the seamless synthetic membrane slide of
:mod:`bench_memory` (tiled BigTIFF, written once and reused) is segmented by the command
line with the bundled model, in a fresh child process per run, three ways::

    python -m tilerseg run slide-N.tif -o out.zarr --tile 1024 --overwrite -q \\
        [--output instances [--instances split]]

- ``probabilities``: the default output;
- ``components``: ``--output instances`` (probabilities plus connected components);
- ``split``: ``--output instances --instances split`` (plus the seeded watershed).

Each round runs the three once, in a rotating order; the overhead of a mode is its wall
time over the probabilities run *of the same round*, minus one, and the table shows the
median over rounds. One untimed run first fills the model caches (OpenVINO's converted
network). Peak RSS is each child's ``VmHWM`` (see :mod:`bench_memory`); the
table shows the largest of the rounds and its ratio to the same mode at 4096^2.

Targets: instance overhead (components) <= 25 % at 16384^2; peak RSS at 16384^2 within
1.3x of 4096^2 (flat) for every mode.

Usage, from the repository root with the virtualenv active::

    python benchmarks/bench_instances.py --sizes 4096 16384 --repeats 2 \\
        --workdir /tmp/tilerseg-instances [--json results.json]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import zarr

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_end_to_end import write_json  # noqa: E402
from bench_memory import _WRAPPER, MIB, make_slide, measure  # noqa: E402

MODES = {
    "probabilities": [],
    "components": ["--output", "instances"],
    "split": ["--output", "instances", "--instances", "split"],
}
MAX_OVERHEAD = 0.25
MAX_RATIO = 1.3


def command(slide: Path, out: Path, tile: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-c", _WRAPPER, "run", str(slide), "-o", str(out), "--tile",
            str(tile), "--overwrite", "-q", *extra]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--repeats", type=int, default=2, help="rounds per size (default 2)")
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--workdir", default=None,
                        help="scratch directory (slides are reused; default: temporary)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tilerseg-bench-instances-"))
    workdir.mkdir(parents=True, exist_ok=True)
    record: dict = {"tile": args.tile, "sizes": {}}
    slides = {size: make_slide(workdir, size) for size in args.sizes}
    warm = command(slides[min(args.sizes)], workdir / "warm-up.zarr", args.tile,
                   MODES["split"])
    print("warm-up (fills the model caches, not timed)", flush=True)
    measure(warm)
    shutil.rmtree(workdir / "warm-up.zarr", ignore_errors=True)
    for size in args.sizes:
        slide = slides[size]
        walls = {m: [] for m in MODES}
        peaks = {m: [] for m in MODES}
        overheads = {m: [] for m in MODES if m != "probabilities"}
        objects: dict = {}
        names = list(MODES)
        for r in range(args.repeats):
            order = names[r % len(names):] + names[: r % len(names)]
            this = {}
            for mode in order:
                out = workdir / f"out-{size}-{mode}.zarr"
                cmd = command(slide, out, args.tile, MODES[mode])
                print("$ " + " ".join(cmd[3:]), flush=True)
                wall, peak = measure(cmd)
                this[mode] = wall
                walls[mode].append(wall)
                peaks[mode].append(peak)
                info = zarr.open_group(out, mode="r").attrs["tilerseg"].get("instances")
                objects[mode] = info
                print(f"  {size}^2 round {r + 1} {mode}: {wall:.1f} s, peak RSS "
                      f"{peak / MIB:.0f} MiB" + (f", {info}" if info else ""), flush=True)
                shutil.rmtree(out, ignore_errors=True)
            for mode in overheads:
                overheads[mode].append(this[mode] / this["probabilities"] - 1)
        record["sizes"][size] = {
            m: {"wall_s": walls[m], "peak_rss_mib": [p / MIB for p in peaks[m]],
                **({"overhead": overheads[m], "instances": objects[m]} if m in overheads
                   else {})} for m in MODES}
    print()
    print(f"{'size':>8} {'mode':>14} {'wall s':>8} {'Mpx/s':>7} {'overhead':>9} "
          f"{'peak MiB':>9} {'vs 4096':>8}")
    ok = True
    base = record["sizes"].get(4096)
    for size, modes in record["sizes"].items():
        for mode, values in modes.items():
            wall = statistics.median(values["wall_s"])
            peak = max(values["peak_rss_mib"])
            over = values.get("overhead")
            over_text = f"{statistics.median(over):+.1%}" if over else "-"
            ratio = peak / max(base[mode]["peak_rss_mib"]) if base else None
            ratio_text = f"{ratio:.2f}" if ratio is not None and size != 4096 else "-"
            if size >= 16384 and mode == "components" and over:
                ok = ok and statistics.median(over) <= MAX_OVERHEAD
            if ratio is not None and size != 4096:
                ok = ok and ratio <= MAX_RATIO
            print(f"{f'{size}^2':>8} {mode:>14} {wall:>8.1f} {size * size / wall / 1e6:>7.2f} "
                  f"{over_text:>9} {peak:>9.0f} {ratio_text:>8}")
    print(f"targets: components overhead at 16384^2 <= {MAX_OVERHEAD:.0%}; peak RSS within "
          f"{MAX_RATIO}x of 4096^2 for every mode")
    if args.json:
        write_json(args.json, record)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Peak memory (RSS) of the ``tilerseg run`` command line on large tiled BigTIFFs.

What it measures
----------------
For each slide size N (default 4096 and 16384), a seamless synthetic membrane slide of
N x N uint8 pixels is written as a tiled (512 px), zlib-compressed BigTIFF with
:func:`tilerseg.synthetic.write_membrane_tiff`, and the command line is run on it in a
fresh child process (through a three-line wrapper that also reports the peak)::

    python -m tilerseg run slide-N.tif -o out-N.zarr --model model.pt --tile 1024 --overwrite -q

with a small model: ``create_model("unet", depth=4, base_channels=4)`` under
``torch.manual_seed(0)``, saved once with :func:`tilerseg.save_model`. The child's peak
resident set size is the kernel's high-water mark of that child's own address space,
``VmHWM`` from ``/proc/self/status``, which the child prints as it exits, so it is exact
(no polling can miss a short peak) and isolated per run. (``ru_maxrss`` from ``os.wait4``
is not used: Linux carries it over from the forked parent across ``execve``, so it is
at least the parent's peak; it is kept as a fallback where ``/proc`` does not exist.) Wall
time and Mpx/s (input pixels / wall time, model loading and start-up included) are
recorded too.

Targets
-------
* peak RSS at 16384^2 <= 1.5 GiB;
* peak RSS at 16384^2 (and any larger size) within 1.3x of the 4096^2 figure: memory
  must not grow with the image.

Usage, from the repository root with the virtualenv active::

    python benchmarks/bench_memory.py                       # --sizes 4096 16384
    python benchmarks/bench_memory.py --sizes 32768 --workdir /tmp/tilerseg-mem --keep

Options: ``--sizes``, ``--repeats`` (per size; the table shows the maximum peak RSS and
the median wall time), ``--tile`` (output tile, 1024), ``--workdir`` (scratch directory;
default a fresh temporary one, removed at the end unless ``--keep``; slides of the right
size already there are reused, so reruns skip generation), ``--keep``, ``--reference-mib``
(the 4096^2 peak of an earlier run, for the ratio when 4096 is not among ``--sizes``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3
MIB = 1024**2
LIMIT_BYTES = int(1.5 * GIB)  # target: peak RSS at 16384^2 <= 1.5 GiB
MAX_RATIO = 1.3  # target: within 1.3x of the 4096^2 figure
REFERENCE_SIZE = 4096
LIMIT_SIZE = 16384
TIFF_TILE = 512
SLIDE_SEED = 0


@dataclass
class Result:
    size: int
    wall_s: list[float]
    peak_rss_bytes: list[int]

    @property
    def pixels(self) -> int:
        return self.size * self.size

    @property
    def wall(self) -> float:
        return statistics.median(self.wall_s)

    @property
    def peak(self) -> int:
        return max(self.peak_rss_bytes)


def make_model(path: Path) -> Path:
    """Write the small benchmark model (depth 4, base 4, seed 0) once."""
    if path.exists():
        return path
    import torch

    import tilerseg

    torch.manual_seed(0)
    tilerseg.save_model(tilerseg.create_model("unet", depth=4, base_channels=4), path)
    return path


def slide_path(workdir: Path, size: int) -> Path:
    return workdir / f"membrane-{size}.tif"


def make_slide(workdir: Path, size: int) -> Path:
    """Write (or reuse) an N x N synthetic membrane BigTIFF; prints what it did."""
    path = slide_path(workdir, size)
    if path.exists():
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                shape = tif.pages[0].shape
        except (OSError, ValueError):  # unreadable (tifffile.TiffFileError is a ValueError)
            shape = None
        if shape == (size, size):
            print(f"reusing {path} ({path.stat().st_size / MIB:.0f} MiB)", flush=True)
            return path
        path.unlink()
    from tilerseg.synthetic import write_membrane_tiff

    start = time.perf_counter()
    partial = path.with_suffix(".partial.tif")
    write_membrane_tiff(str(partial), (size, size), tile=TIFF_TILE, seed=SLIDE_SEED)
    partial.rename(path)
    print(f"wrote {path} ({size} x {size} uint8, {path.stat().st_size / MIB:.0f} MiB) "
          f"in {time.perf_counter() - start:.1f} s", flush=True)
    return path


# runs the command line, then reports the peak RSS of this process alone on stderr
_WRAPPER = (
    "import sys\n"
    "from tilerseg.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "try:\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            sys.stderr.write('tilerseg-bench VmHWM ' + line.split()[1] + '\\n')\n"
    "except OSError:\n"
    "    pass\n"
    "sys.exit(code)\n"
)


def run_command(slide: Path, out: Path, model: Path, tile: int) -> list[str]:
    return [sys.executable, "-c", _WRAPPER, "run", str(slide), "-o", str(out),
            "--model", str(model), "--tile", str(tile), "--overwrite", "-q"]


def measure(command: list[str]) -> tuple[float, int]:
    """Run ``command``; return (wall seconds, peak RSS bytes of exactly that child)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.stderr.write(stderr)
        raise SystemExit(f"command failed with status {process.returncode}: "
                         f"{' '.join(command)}")
    for line in stderr.splitlines():
        if line.startswith("tilerseg-bench VmHWM "):
            return wall, int(line.split()[-1]) * 1024  # kB
    return wall, usage.ru_maxrss * 1024  # no /proc: Linux-style kilobytes, an upper bound


def verdicts(result: Result, reference: Result | None) -> tuple[str, str, str]:
    """(ratio text, <=1.5 GiB verdict, <=1.3x verdict) for one row."""
    ratio = result.peak / reference.peak if reference is not None else None
    ratio_text = f"{ratio:.2f}" if ratio is not None else "-"
    if result.size >= LIMIT_SIZE:
        limit = "PASS" if result.peak <= LIMIT_BYTES else "FAIL"
    else:
        limit = "-"
    if ratio is None or result.size == REFERENCE_SIZE:
        growth = "-"
    else:
        growth = "PASS" if ratio <= MAX_RATIO else "FAIL"
    return ratio_text, limit, growth


def print_table(results: list[Result], reference: Result | None,
                reference_note: str = "") -> bool:
    """Print the results table; return True when every applicable target passes."""
    header = (f"{'size':>12} {'pixels':>14} {'wall s':>9} {'Mpx/s':>7} {'peak RSS MiB':>13} "
              f"{'ratio':>6} {'<=1.5GiB':>9} {'<=1.3x':>7}")
    print(header)
    print("-" * len(header))
    ok = True
    for r in results:
        ratio, limit, growth = verdicts(r, reference)
        ok = ok and "FAIL" not in (limit, growth)
        print(f"{f'{r.size}^2':>12} {r.pixels:>14,} {r.wall:>9.1f} {r.pixels / r.wall / 1e6:>7.2f} "
              f"{r.peak / MIB:>13.0f} {ratio:>6} {limit:>9} {growth:>7}")
    if reference_note:
        print(reference_note)
    print(f"targets: peak RSS at >= {LIMIT_SIZE}^2 <= {LIMIT_BYTES / MIB:.0f} MiB (1.5 GiB); "
          f"ratio to the {REFERENCE_SIZE}^2 peak <= {MAX_RATIO}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384],
                        help="slide sides in px (default: 4096 16384)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per size (default 1)")
    parser.add_argument("--tile", type=int, default=1024, help="output tile side (default 1024)")
    parser.add_argument("--workdir", default=None,
                        help="scratch directory for the model, slides and outputs "
                        "(default: a fresh temporary directory)")
    parser.add_argument("--reference-mib", type=float, default=None,
                        help=f"peak RSS of a separate {REFERENCE_SIZE}^2 run, in MiB, for the "
                        f"ratio when {REFERENCE_SIZE} is not among --sizes")
    parser.add_argument("--keep", action="store_true",
                        help="keep the scratch directory (always kept when --workdir is given)")
    args = parser.parse_args(argv)

    if args.workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="tilerseg-bench-memory-"))
        remove = not args.keep
    else:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        remove = False
    print(f"workdir {workdir}; free disk {shutil.disk_usage(workdir).free / GIB:.1f} GiB",
          flush=True)
    try:
        model = make_model(workdir / "unet-d4-b4.pt")
        results: list[Result] = []
        for size in args.sizes:
            slide = make_slide(workdir, size)
            out = workdir / f"out-{size}.zarr"
            command = run_command(slide, out, model, args.tile)
            print("$ " + " ".join(command), flush=True)
            walls: list[float] = []
            peaks: list[int] = []
            for i in range(args.repeats):
                wall, peak = measure(command)
                walls.append(wall)
                peaks.append(peak)
                print(f"  {size}^2 repeat {i + 1}/{args.repeats}: {wall:.1f} s, "
                      f"peak RSS {peak / MIB:.0f} MiB", flush=True)
            results.append(Result(size, walls, peaks))
            shutil.rmtree(out, ignore_errors=True)

        reference = next((r for r in results if r.size == REFERENCE_SIZE), None)
        note = ""
        if reference is None and args.reference_mib is not None:
            reference = Result(REFERENCE_SIZE, [float("nan")], [int(args.reference_mib * MIB)])
            note = (f"(ratio against --reference-mib {args.reference_mib:.0f}, the peak of a "
                    f"separate {REFERENCE_SIZE}^2 run)")
        elif reference is None:
            note = (f"(no {REFERENCE_SIZE}^2 run in this invocation: ratio and growth verdict "
                    "not computed; pass --reference-mib or include 4096 in --sizes)")
        print()
        ok = print_table(results, reference, note)
        return 0 if ok else 1
    finally:
        if remove:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: ``--skip-background`` on a slide that is mostly flat background.

What it measures
----------------
A ``--size`` x ``--size`` uint8 slide (default 4096) of flat background (value
``--background``, default 235, like glass in bright field) with a disc of synthetic
membrane texture ("tissue") covering about ``--tissue`` of its area (default 0.25), written
as a tiled (512 px) zlib BigTIFF pyramid (levels 2x, 4x, 8x as SubIFDs, as scanners write
them). ``segment_to_zarr`` (tile 512, depth-4 valid U-Net of ``--base-channels`` 16,
``torch.manual_seed(0)``, uint8 probabilities) runs on it with and without
``skip_background=True``, alternated for ``--repeats`` rounds in one process.

Reported: wall time of each, the speed-up, the number of tiles skipped, the decision's
source (the pyramid level), and the largest difference between the two outputs (uint8
steps): zero where the background is exactly flat, as here.

Run from the repository root, with the virtualenv active::

    python benchmarks/bench_background.py
    python benchmarks/bench_background.py --size 8192 --tissue 0.1 --json background.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
import zarr

import tilerseg
from tilerseg.synthetic import membrane_image


def make_slide(path: Path, size: int, tissue: float, background: int) -> None:
    """Flat background with a disc of membrane texture, as a tiled BigTIFF pyramid."""
    image = np.full((size, size), background, np.uint8)
    radius = int(size * np.sqrt(tissue / np.pi))
    texture = membrane_image((2 * radius, 2 * radius), seed=0)[0]
    yy, xx = np.mgrid[-radius:radius, -radius:radius]
    disc = yy**2 + xx**2 < radius**2
    c = size // 2
    region = image[c - radius:c + radius, c - radius:c + radius]
    region[disc] = texture[disc]
    levels = [image[:: 2**k, :: 2**k] for k in range(4)]
    options = {"photometric": "minisblack", "tile": (512, 512), "compression": "zlib"}
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(levels[0], subifds=len(levels) - 1, metadata={"axes": "YX"}, **options)
        for level in levels[1:]:
            tw.write(level, subfiletype=1, **options)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--tissue", type=float, default=0.25, help="tissue area fraction")
    parser.add_argument("--background", type=int, default=235)
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = tilerseg.create_model("unet", base_channels=args.base_channels)
    with tempfile.TemporaryDirectory() as tmp:
        slide = Path(tmp) / "slide.ome.tif"
        make_slide(slide, args.size, args.tissue, args.background)
        outs = {False: Path(tmp) / "full.zarr", True: Path(tmp) / "skip.zarr"}
        tilerseg.segment_to_zarr(np.zeros((512, 512), np.uint8), model, Path(tmp) / "w.zarr",
                                 tile=512)  # warm-up
        times: dict[bool, list[float]] = {False: [], True: []}
        for r in range(args.repeats):
            for skip in ((False, True) if r % 2 == 0 else (True, False)):
                start = time.perf_counter()
                tilerseg.segment_to_zarr(slide, model, outs[skip], tile=512, overwrite=True,
                                         skip_background=skip)
                times[skip].append(time.perf_counter() - start)
                print(f"round {r + 1}: skip_background={skip}: {times[skip][-1]:.2f} s",
                      flush=True)
        record = zarr.open_group(outs[True], mode="r").attrs["tilerseg"]["background"]
        full = zarr.open_group(outs[False], mode="r")["0"][:].astype(np.int16)
        skipped = zarr.open_group(outs[True], mode="r")["0"][:].astype(np.int16)
        deviation = int(np.abs(full - skipped).max())
    full_s, skip_s = statistics.median(times[False]), statistics.median(times[True])
    print(f"{args.size}^2 slide, tissue {args.tissue:.0%} of the area, background "
          f"{args.background}; tile 512")
    print(f"full run {full_s:.2f} s, skip_background {skip_s:.2f} s (medians of "
          f"{args.repeats}): x{full_s / skip_s:.2f}")
    print(f"skipped {record['skipped_chunks']} of {record['chunks']} tiles; decided from "
          f"{record['method']}; background value {record['value']}")
    print(f"max |full - skipped| = {deviation} (uint8 steps)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "full_s": times[False], "skip_s": times[True],
            "background": record, "max_uint8_deviation": deviation}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

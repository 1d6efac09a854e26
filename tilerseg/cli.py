"""The ``tilerseg`` command line: parse, configure logging and progress, call the API.

A user's mistake (a :class:`~tilerseg.errors.TilersegError`) becomes one line on stderr
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from . import __version__
from .errors import InvalidArgumentError, TilersegError

__all__ = ["main", "build_parser"]

EPILOG = """\
examples:
  tilerseg demo                          write a synthetic 4096 x 4096 slide and segment it
  tilerseg run slide.tif                 -> slide.tilerseg.zarr (probabilities, uint8)
  tilerseg run slide.ome.tif --level 1 --output both -o out.zarr --overwrite
  tilerseg run sections/ --model em.pt    a folder of 2D slices, segmented plane by plane
  tilerseg run stack.tif --model model3d.pt --tile 64
  tilerseg info slide.svs --tile 1024    shape, axes, levels, pixel size, plan, memory
"""


class ProgressBar:
    """A ``progress(done, total)`` callback drawing one updating line (tiles, tiles/s, ETA)."""

    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self.stream, self.enabled, self.start = stream, enabled, time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else 0.0
        filled = 30 * done // max(total, 1)
        self.stream.write(f"\r[{'#' * filled}{'-' * (30 - filled)}] {done}/{total} tiles  "
                          f"{rate:.2f} tiles/s  ETA {eta:.0f} s ")
        if done == total:
            self.stream.write("\n")
        self.stream.flush()


def _channels(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise InvalidArgumentError(f"--channel {text!r} must be comma-separated integers") from None


def _model(spec: str, warn: Callable[[str], None]) -> Any:
    """Load a model file, or build a registered architecture (untrained)."""
    import torch

    from .models import create_model, list_models, load_model

    if spec in list_models() and not os.path.exists(spec):
        torch.manual_seed(0)
        warn(f"model {spec!r} is an untrained architecture (random weights, seed 0); "
             "pass --model FILE.pt for meaningful results")
        return create_model(spec)
    return load_model(spec)


def _warn(message: str) -> None:
    print(f"tilerseg: warning: {message}", file=sys.stderr)


def _cmd_run(args: argparse.Namespace) -> int:
    from .engine.to_zarr import default_output_path, segment_to_zarr
    from .io import open_image

    image = open_image(args.image, level=args.level)  # input errors come first
    model = _model(args.model, _warn)
    bar = ProgressBar(sys.stderr, sys.stderr.isatty() and not args.quiet)
    start = time.perf_counter()
    path = segment_to_zarr(
        image, model, args.output_path or default_output_path(args.image), tile=args.tile,
        device=args.device,
        output=args.output, dtype=args.dtype, threshold=args.threshold, level=args.level,
        channel=_channels(args.channel), overwrite=args.overwrite, progress=bar,
        workers=args.workers, model_source=args.model, batch_size=args.batch_size,
    )
    if not args.quiet:
        print(f"wrote {path} in {time.perf_counter() - start:.1f} s")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import describe

    model = _model(args.model, lambda message: None)
    print(describe(args.image, model, tile=args.tile, level=args.level,
                   channel=_channels(args.channel), device=args.device))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from . import create_model, segment
    from .engine.to_zarr import segment_to_zarr
    from .io.writers import open_output
    from .synthetic import write_membrane_tiff

    folder = Path(args.directory)
    folder.mkdir(parents=True, exist_ok=True)
    slide = folder / "demo-slide.tif"
    start = time.perf_counter()
    write_membrane_tiff(str(slide), (args.size, args.size), seed=args.seed)
    print(f"wrote synthetic slide {slide} ({args.size} x {args.size} uint8, tiled BigTIFF) "
          f"in {time.perf_counter() - start:.1f} s")
    torch.manual_seed(args.seed)
    model = create_model("unet", base_channels=args.base_channels)
    bar = ProgressBar(sys.stderr, sys.stderr.isatty() and not args.quiet)
    start = time.perf_counter()
    out = segment_to_zarr(slide, model, folder / "demo-slide.tilerseg.zarr", tile=args.tile,
                          device=args.device, output="both", overwrite=True, progress=bar,
                          dtype="float32" if args.check else "uint8",
                          model_source=f"untrained unet, base {args.base_channels}")
    seconds = time.perf_counter() - start
    print(f"segmented it into {out} in {seconds:.1f} s ({args.size**2 / seconds / 1e6:.2f} Mpx/s) "
          "with an untrained U-Net (the pipeline, not a trained model)")
    if args.check:
        import tifffile

        written = np.asarray(open_output(out)["probabilities"][:])
        image = tifffile.imread(slide)
        other = 256 if (args.tile or 512) != 256 else 512
        in_memory = segment(image, model, tile=other, device=args.device)
        deviation = float(np.abs(written - in_memory).max())
        print(f"max |OME-Zarr output - in-memory run with {other}-px tiles| = {deviation:.2e} "
              "(contract: <= 1e-4)")
        if deviation > 1e-4:
            return 1
    return 0


def _add_common(p: argparse.ArgumentParser, model_default: str | None = "unet") -> None:
    p.add_argument("--model", default=model_default, metavar="NAME|PATH",
                   help="model file (.pt) or registered architecture name (default: %(default)s)")
    p.add_argument("--tile", type=int, default=None, metavar="N",
                   help="output tile side in px, a multiple of the pooling step "
                   "(default: 512 on CPU, 1024 on GPU)")
    p.add_argument("--level", type=int, default=0, metavar="N", help="input pyramid level (default 0)")
    p.add_argument("--channel", default=None, metavar="C[,C...]", help="input channels to use, e.g. 0 or 0,2")
    p.add_argument("--device", default="auto", metavar="DEVICE", help="auto, cpu, cuda, cuda:N or mps")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``tilerseg`` command."""
    parser = argparse.ArgumentParser(
        prog="tilerseg",
        description="Exact overlap-tile U-Net segmentation of images too large for memory.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tilerseg {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log progress (-v) or debug details (-vv) to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run", help="segment an image into an OME-Zarr store", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Segment IMAGE (TIFF/BigTIFF/OME-TIFF/SVS, Zarr/OME-Zarr, a folder or "
        "glob of TIFF slices, .npy, PNG/JPEG) tile by tile into an OME-Zarr (v0.5) store.")
    run.add_argument("image", help="image file, folder or glob")
    run.add_argument("-o", "--out", dest="output_path", default=None, metavar="OUT.zarr",
                     help="output .zarr (default: beside the input, NAME.tilerseg.zarr)")
    _add_common(run)
    run.add_argument("--batch-size", type=int, default=None, metavar="N", help="tiles per forward pass")
    run.add_argument("--output", choices=("probabilities", "labels", "both"),
                     default="probabilities", help="what to write (default: %(default)s)")
    run.add_argument("--dtype", choices=("uint8", "float16", "float32"), default="uint8",
                     help="probability storage type; uint8 = round(255 p) (default)")
    run.add_argument("--threshold", type=float, default=0.5, metavar="P",
                     help="foreground threshold for one-class labels (default 0.5)")
    run.add_argument("--workers", type=int, default=None, metavar="N", help="Dask threads (default 2)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing output")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    run.set_defaults(func=_cmd_run)

    info = sub.add_parser("info", help="describe an image and the tile plan for it",
                          description="Shape, axes, dtype, pyramid levels, pixel size, the "
                          "tile plan and estimates of peak memory and output size.")
    info.add_argument("image", help="image file, folder or glob")
    _add_common(info)
    info.set_defaults(func=_cmd_info)

    demo = sub.add_parser("demo", help="write a synthetic slide and segment it",
                          description="Write a synthetic EM-like membrane slide as a tiled "
                          "BigTIFF and segment it into OME-Zarr with an untrained U-Net.")
    demo.add_argument("--size", type=int, default=4096, help="slide side in px (4096)")
    demo.add_argument("--directory", default="tilerseg-demo",
                      help="where to write the slide and the output (./tilerseg-demo)")
    demo.add_argument("--tile", type=int, default=None, help="output tile side")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    demo.add_argument("--base-channels", type=int, default=8, help="U-Net width (8)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (0)")
    demo.add_argument("--check", action="store_true",
                      help="also segment in memory with other tiles and report the deviation")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=_cmd_demo)
    return parser


def _check_numbers(args: argparse.Namespace) -> None:
    for name in ("size", "batch_size", "workers", "base_channels"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise InvalidArgumentError(f"--{name.replace('_', '-')} {value} must be positive")
    if getattr(args, "level", 0) < 0:
        raise InvalidArgumentError(f"--level {args.level} must be >= 0")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        _check_numbers(args)
        return args.func(args)
    except TilersegError as exc:
        print(f"tilerseg: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permissions... not a user input error
        print(f"tilerseg: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tilerseg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

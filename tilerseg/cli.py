"""The ``tilerseg`` command line: parse, configure logging and progress, call the API.

A user's mistake (a :class:`~tilerseg.errors.TilersegError`) becomes one line on stderr
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

import numpy as np

from . import __version__
from .errors import TilersegError

__all__ = ["main"]

EPILOG = """\
examples:
  tilerseg demo                      segment a synthetic 1024 x 1024 membrane image
  tilerseg demo --size 2048 --tile 256 --check
                                     ... and prove the tiled result equals one-shot inference
"""


def _progress_printer(stream, enabled: bool):
    """A ``progress(done, total)`` callback drawing one updating line on a terminal."""
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if not enabled:
            return
        elapsed = time.perf_counter() - start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else 0.0
        width = 30
        bar = "#" * (width * done // total) + "-" * (width - width * done // total)
        stream.write(f"\r[{bar}] {done}/{total} tiles  {rate:.2f} tiles/s  ETA {eta:.0f} s")
        if done == total:
            stream.write("\n")
        stream.flush()

    return progress


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from . import create_model, model_geometry, plan, segment
    from .synthetic import membrane_image

    torch.manual_seed(args.seed)
    image, mask = membrane_image((args.size, args.size), seed=args.seed)
    model = create_model("unet", depth=4, base_channels=args.base_channels)
    geometry = model_geometry(model)
    tile_plan = plan(image.shape, model, args.tile, device=args.device)
    print(f"image {image.shape} {image.dtype} (synthetic membranes, seed {args.seed})")
    print(f"model: untrained U-Net, depth 4, base {args.base_channels}; halo {geometry.halo[0]} px, "
          f"admissible inputs {geometry.admissible_inputs(3)}...")
    print(f"plan: {len(tile_plan)} tiles of {tile_plan.tile} px from windows of "
          f"{tile_plan.window} px")
    progress = _progress_printer(sys.stderr, sys.stderr.isatty() and not args.quiet)
    start = time.perf_counter()
    probs = segment(image, model, tile=args.tile, batch_size=args.batch_size,
                    device=args.device, progress=progress)
    seconds = time.perf_counter() - start
    print(f"probabilities {probs.shape} {probs.dtype} in {seconds:.2f} s "
          f"({image.size / seconds / 1e6:.2f} Mpx/s)")
    if args.check:
        whole = int(np.ceil(args.size / geometry.step[0]) * geometry.step[0])
        reference = segment(image, model, tile=whole, device=args.device)
        deviation = float(np.abs(probs - reference).max())
        print(f"max |tiled - one-shot| = {deviation:.2e} (contract: <= 1e-4)")
        if deviation > 1e-4:
            return 1
    if args.output:
        np.save(args.output, probs)
        print(f"wrote {args.output}")
    return 0


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

    demo = sub.add_parser("demo", help="segment a synthetic membrane image",
                          description="Segment a synthetic EM-like membrane image with an "
                          "untrained U-Net and report the tiling and throughput.")
    demo.add_argument("--size", type=int, default=1024, help="image side in pixels (1024)")
    demo.add_argument("--tile", type=int, default=None,
                      help="output tile side, a multiple of 16 (default: device default)")
    demo.add_argument("--batch-size", type=int, default=None, help="tiles per forward pass")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    demo.add_argument("--base-channels", type=int, default=8, help="U-Net width (8)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (0)")
    demo.add_argument("--check", action="store_true",
                      help="also run one-shot inference and report the largest deviation")
    demo.add_argument("-o", "--output", help="save the probabilities as .npy")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "size", 1) < 1:
        print(f"tilerseg: error: --size {args.size} must be positive", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except TilersegError as exc:
        print(f"tilerseg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tilerseg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

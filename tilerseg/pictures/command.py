"""``tilerseg preview``: a PNG of a run's result over its input.

Only argparse is imported here; the drawing modules are imported when the command runs,
so ``tilerseg --version`` stays fast.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser"]

_EPILOG = """\
examples:
  tilerseg preview slide.tilerseg.zarr -o preview.png              whole slide, <= 2048 px
  tilerseg preview out.zarr -o crop.png --region 4096:5120,8192:9216   full-resolution crop
  tilerseg preview out.zarr -o p.png --show probabilities --class 0 --size 1024
  tilerseg preview stack.zarr -o plane.png --z 12                   one plane of a 3D output
"""


def _run(args: argparse.Namespace) -> int:
    from .draw import png_path, require_pillow, save_png
    from .previews import parse_region, render_preview

    require_pillow()
    png_path(args.out, "-o")
    region = parse_region(args.region) if args.region is not None else None
    result = render_preview(args.output, size=args.size, region=region, show=args.show,
                            class_index=args.class_index, z=args.z, image=args.image,
                            opacity=args.opacity, scale_bar=not args.no_scale_bar,
                            legend=not args.no_legend)
    save_png(result.picture, args.out)
    h, w = result.picture.shape[:2]
    source = "the result alone" if result.input_level is None else \
        f"input level {result.input_level}" + \
        (f" every {result.input_stride} px" if result.input_stride > 1 else "")
    print(f"wrote {args.out} ({w} x {h} px, {result.layer} from output level {result.level} "
          f"over {source})")
    for note in result.notes:
        if "drawn alone" not in note:  # those are logged as warnings already
            print(f"note: {note}")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``preview`` command on ``tilerseg``'s sub-command parsers.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        What ``ArgumentParser.add_subparsers`` returned.

    Returns
    -------
    argparse.ArgumentParser
        The ``preview`` parser; its ``func`` default runs the command and returns 0.

    Examples
    --------
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="tilerseg")
    >>> _ = add_parser(parser.add_subparsers(dest="command"))
    >>> args = parser.parse_args(["preview", "out.zarr", "-o", "p.png", "--size", "512"])
    >>> args.output, args.out, args.size, args.show
    ('out.zarr', 'p.png', 512, None)
    """
    p = subparsers.add_parser(
        "preview", help="draw a result over its input as a PNG",
        description="Draw the result in OUT.zarr over the input image: probabilities as a "
        "colour map, labels as class outlines, instance labels in distinct colours with "
        "outlines, and a scale bar from the pixel size. The finest output pyramid level "
        "whose picture fits --size is read, and nothing else; the input at its level of "
        "the same resolution (read strided where it has none). Needs Pillow "
        "(pip install \"tilerseg[plot]\").",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", metavar="OUT.zarr", help="a tilerseg output")
    p.add_argument("-o", "--out", required=True, metavar="PICTURE.png", help="PNG to write")
    p.add_argument("--size", type=int, default=2048, metavar="N",
                   help="longest side of the picture in px, at most (default: %(default)s)")
    p.add_argument("--region", default=None, metavar="Y0:Y1,X0:X1",
                   help="a crop in full-resolution rows and columns (read at full "
                   "resolution when it fits --size)")
    p.add_argument("--show", default=None, metavar="LAYER",
                   help="probabilities, labels or instances (default: instances if present, "
                   "else labels, else "
                   "probabilities)")
    p.add_argument("--class", dest="class_index", type=int, default=None, metavar="K",
                   help="the class whose probability is shown (default: the run's "
                   "foreground class)")
    p.add_argument("--z", type=int, default=None, metavar="Z",
                   help="the plane of a 3D output, full-resolution index (default: middle)")
    p.add_argument("--image", default=None, metavar="IMAGE",
                   help="the input to draw under the result (default: the run's input, "
                   "from the output's metadata)")
    p.add_argument("--opacity", type=float, default=0.6, metavar="A",
                   help="opacity of the result over the input (default: %(default)s)")
    p.add_argument("--no-scale-bar", action="store_true", help="no scale bar")
    p.add_argument("--no-legend", action="store_true", help="no legend")
    p.set_defaults(func=_run)
    return p

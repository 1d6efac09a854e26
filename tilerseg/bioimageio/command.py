"""``tilerseg export MODEL -o model.zip --format bioimageio``: the command line of
:func:`tilerseg.bioimageio.export_bioimageio`. Imports nothing heavy until it runs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "parse_normalize"]

FORMATS = ("bioimageio",)

_EPILOG = """\
examples:
  tilerseg export isbi2012-unet -o isbi.zip --format bioimageio --author "A. Author"
  tilerseg export run/best.pt -o model.zip --format bioimageio --license MIT
  tilerseg run slide.tif --model model.zip     run a bioimage.io package
"""


def _cmd_export(args: argparse.Namespace) -> int:
    from ..errors import InvalidArgumentError, OutputError

    out = Path(args.output)
    if args.format not in FORMATS:  # argparse checks the choices; kept for callers
        raise InvalidArgumentError(f"--format {args.format!r} must be one of "
                                   f"{', '.join(FORMATS)}")
    if out.exists() and not args.overwrite:
        raise OutputError(f"output '{out}' exists; pass --overwrite to replace it")
    if args.test_size is not None and args.test_size < 1:
        raise InvalidArgumentError(f"--test-size {args.test_size} must be positive")
    from ..models.checkpoint import model_from_spec
    from .export import export_bioimageio, validate_package

    normalize = parse_normalize(args.normalize) if args.normalize is not None else None
    model = model_from_spec(args.model)
    path = export_bioimageio(model, out, name=args.name, description=args.description,
                             authors=args.author, license=args.license, normalize=normalize,
                             test_size=args.test_size, cover=args.cover)
    status = validate_package(path)
    if not args.quiet:
        print(f"wrote {path} (bioimage.io model 0.5; bioimageio.spec validation: {status})")
    return 0


def parse_normalize(text: str) -> Any:
    """The ``normalize=`` value of ``--normalize TEXT``.

    ``auto``, ``none``, ``percentile``, ``percentile:LOW:HIGH`` and ``meanstd`` as they
    are; ``LOW,HIGH`` a fixed range; ``window:CENTRE,WIDTH`` or ``window:NAME`` a display
    window.

    Examples
    --------
    >>> parse_normalize("0,4095"), parse_normalize("window:40,400"), parse_normalize("auto")
    ((0.0, 4095.0), ('window', 40.0, 400.0), 'auto')
    """
    from ..errors import InvalidArgumentError

    if text.startswith("window:"):
        from ..normalize import parse_window

        return parse_window(text[len("window:"):])
    if "," in text:
        try:
            low, high = (float(v) for v in text.split(","))
        except ValueError:
            raise InvalidArgumentError(f"--normalize {text!r}: expected LOW,HIGH (two "
                                       "numbers)") from None
        return (low, high)
    return text


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``export`` command on ``tilerseg``'s sub-command parsers.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        What ``ArgumentParser.add_subparsers`` returned.

    Returns
    -------
    argparse.ArgumentParser
        The ``export`` parser; its ``func`` default runs the command and returns 0.

    Examples
    --------
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="tilerseg")
    >>> _ = add_parser(parser.add_subparsers(dest="command"))
    >>> args = parser.parse_args(["export", "m.pt", "-o", "m.zip", "--author", "A", "--author",
    ...                           "B"])
    >>> args.model, args.output, args.format, args.author
    ('m.pt', 'm.zip', 'bioimageio', ['A', 'B'])
    """
    p = subparsers.add_parser(
        "export", help="write a model as a bioimage.io model package",
        description="Write MODEL (a model file, a bundled model or an architecture name) as "
        "a bioimage.io model package (spec 0.5 zip: state-dict and TorchScript weights, "
        "sizes and halo from the model's geometry, its normalisation, test tensors, a "
        "cover and a README) and validate it with bioimageio.spec.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="model file (.pt), bundled model name or "
                   "architecture name")
    p.add_argument("-o", "--output", required=True, metavar="PATH.zip",
                   help="the package to write")
    p.add_argument("--format", default="bioimageio", choices=FORMATS,
                   help="package format (bioimageio)")
    p.add_argument("--name", default=None, help="the model's name (default: from the model)")
    p.add_argument("--description", default=None, help="one-paragraph description")
    p.add_argument("--author", action="append", default=None, metavar="NAME",
                   help="an author (repeat for several; default: tilerseg)")
    p.add_argument("--license", default=None, metavar="SPDX",
                   help="SPDX licence id (default: the model's, else CC-BY-4.0)")
    p.add_argument("--normalize", default=None, metavar="SPEC",
                   help="the input's normalisation: auto (8-bit, scaled by 1/255), none, "
                   "percentile[:LOW:HIGH], meanstd, LOW,HIGH or window:CENTRE,WIDTH|NAME "
                   "(default: the model's own; needed when it does not state one)")
    p.add_argument("--test-size", type=int, default=None, metavar="N",
                   help="side of the test input, rounded up to an admissible size")
    p.add_argument("--cover", default=None, metavar="IMAGE",
                   help="cover image (PNG/JPEG; default: test input and output side by side)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing package")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=_cmd_export)
    return p

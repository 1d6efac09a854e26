"""MkDocs hooks: the pages and figures the site generates from the code itself.

- ``cli-reference.md``: every command, argument and default of ``tilerseg``, read from
  :func:`tilerseg.cli.build_parser` (the parser the command line runs).
- ``api-reference.md``: mkdocstrings directives for the public names of ``tilerseg`` (and
  the public modules listed below), rendered from their docstrings.
- ``figures/*.png``: drawn by ``docs/gen_figures.py`` with the project's own plotting code,
  from a real run of the bundled model.

Build with ``mkdocs build --strict`` (warnings are errors).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.tilerseg")

ROOT = Path(__file__).resolve().parent.parent

API_SECTIONS: dict[str, list[str]] = {
    "Inference": ["segment", "segment_to_zarr", "segment_batch", "BatchResult", "RunOptions",
                  "status", "finalize", "plan"],
    "Images": ["open_image", "ImageSource"],
    "Models": ["create_model", "list_models", "register_model", "load_model", "save_model",
               "model_geometry", "UNet"],
    "Geometry": ["ModelGeometry", "TilePlan", "Tile"],
    "Errors": ["TilersegError", "InvalidImageError", "InvalidArgumentError",
               "InvalidModelError", "ModelNotFoundError", "ImageNotFoundError", "OutputError"],
}
"""The public names of ``tilerseg`` (its ``__all__``), by topic; a name of ``__all__``
missing here stops the build."""

API_MODULES: dict[str, list[str]] = {
    "Pictures": ["tilerseg.pictures.previews", "tilerseg.pictures.plan",
                 "tilerseg.pictures.draw"],
    "bioimage.io": ["tilerseg.bioimageio.export", "tilerseg.bioimageio.load"],
    "Normalisation": ["tilerseg.normalize"],
    "DICOM": ["tilerseg.io.dicom"],
    "Locations: local paths and URLs (universal-pathlib, fsspec)": ["tilerseg.io.remote"],
    "Training": ["tilerseg.train"],
    "Metrics": ["tilerseg.metrics"],
    "Instance labels (algorithm)": ["tilerseg.instances"],
    "Synthetic data": ["tilerseg.synthetic"],
}
"""Public modules documented whole (their ``__all__``)."""

_tmp: tempfile.TemporaryDirectory | None = None

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):<code>(~?)([^<]+)</code>")
"""A Sphinx cross-reference role of a numpydoc docstring as mkdocstrings renders it."""


def _table_cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _action_row(action: argparse.Action) -> str | None:
    if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
        return None
    if action.option_strings:
        names = ", ".join(f"`{o}`" for o in action.option_strings)
        if action.nargs != 0:
            metavar = action.metavar or (
                "{" + ",".join(map(str, action.choices)) + "}" if action.choices
                else action.dest.upper())
            names += f" `{metavar}`"
    else:
        names = f"`{action.metavar or action.dest}`"
    help_text = (action.help or "") % {"default": action.default, "prog": "tilerseg"} \
        if action.help else ""
    if action.choices and action.option_strings and "{" not in names:
        help_text += f" Choices: {', '.join(f'`{c}`' for c in action.choices)}."
    default = action.default
    shown = "" if default in (None, False, argparse.SUPPRESS) or action.nargs == 0 \
        else f"`{default}`"
    return f"| {names} | {_table_cell(help_text)} | {shown} |"


def cli_reference() -> str:
    """Markdown for every sub-command of the ``tilerseg`` parser."""
    from tilerseg.cli import build_parser

    parser = build_parser()
    lines = ["# Command-line reference", "",
             "Generated from the parser of the `tilerseg` command when this site is built; "
             "`tilerseg COMMAND --help` prints the same. The guide is [Command line](cli.md).",
             "", "```text", parser.format_usage().strip(), "```", ""]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    for name, command in sub.choices.items():
        lines += [f"## tilerseg {name}", "", helps.get(name) or "", ""]
        if command.description:
            lines += [" ".join(command.description.split()), ""]
        lines += ["```text", command.format_usage().strip(), "```", "",
                  "| argument | meaning | default |", "| --- | --- | --- |"]
        lines += [row for a in command._actions if (row := _action_row(a)) is not None]
        lines.append("")
    return "\n".join(lines)


def api_reference() -> str:
    """Markdown of mkdocstrings directives for the public API."""
    import tilerseg

    listed = {n for names in API_SECTIONS.values() for n in names}
    missing = sorted(set(tilerseg.__all__) - listed - {"__version__"})
    if missing:
        raise RuntimeError(f"docs/hooks.py API_SECTIONS lacks public names {missing}")
    lines = ["# API reference", "",
             "Generated from the docstrings when this site is built. Everything in the first "
             "sections is importable from `tilerseg`; the guide is [Python API](api.md).", ""]
    for section, names in API_SECTIONS.items():
        lines += [f"## {section}", ""]
        for name in names:
            obj = getattr(tilerseg, name)
            lines += [f"::: {obj.__module__}.{obj.__qualname__}", ""]
    for section, modules in API_MODULES.items():
        lines += [f"## {section}", ""]
        for module in modules:
            lines += [f"::: {module}", "    options:", "      show_root_heading: true",
                      "      heading_level: 3", ""]
    return "\n".join(lines)


def _figures(directory: Path) -> list[Path]:
    script = ROOT / "docs" / "gen_figures.py"
    if not script.exists():
        return []
    spec = importlib.util.spec_from_file_location("tilerseg_docs_figures", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return list(module.generate(directory))


def on_files(files: Files, config: Any) -> Files:
    """Add the generated pages and figures to the site."""
    global _tmp
    files.append(File.generated(config, "cli-reference.md", content=cli_reference()))
    files.append(File.generated(config, "api-reference.md", content=api_reference()))
    _tmp = tempfile.TemporaryDirectory(prefix="tilerseg-docs-")
    out = Path(_tmp.name)
    for path in _figures(out):
        files.append(File.generated(config, f"figures/{path.name}", abs_src_path=str(path)))
    return files


_TYPE_LITERAL = re.compile(r"(<code>[^<]*?)``([^<`]*?)``")
"""Inline literals (````(Y, X, 3)````) inside a rendered type, already shown as code."""


def on_page_content(html: str, **kwargs: Any) -> str:
    """Show the docstrings' Sphinx roles (``:func:`~a.b```) as code (``b``), and drop the
    double backticks of literals inside parameter and return types."""
    html = _ROLE.sub(lambda m: f"<code>{m[2].rsplit('.', 1)[-1] if m[1] else m[2]}</code>",
                     html)
    previous = None
    while previous != html:  # a type may hold several literals
        previous, html = html, _TYPE_LITERAL.sub(r"\1\2", html)
    return html


def on_post_build(config: Any) -> None:
    """Remove the figures' temporary folder."""
    global _tmp
    if _tmp is not None:
        _tmp.cleanup()
        _tmp = None

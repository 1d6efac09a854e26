"""bioimage.io model packages (spec 0.5) in and out: :func:`export_bioimageio` and
:func:`load_bioimageio`.

Needs the ``bioimageio`` extra (``pip install "tilerseg[bioimageio]"``), imported only
when a package is written or read. :func:`is_package` needs nothing.
"""

from __future__ import annotations

from .._lazy import attach

_LAZY = {"export_bioimageio": "export", "load_bioimageio": "load", "is_package": "load"}

__all__ = ["export_bioimageio", "load_bioimageio", "is_package"]

__getattr__, __dir__ = attach(__name__, _LAZY, globals())

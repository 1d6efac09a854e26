"""Pictures of results and of tile plans (needs Pillow: ``pip install "tilerseg[plot]"``).

* :func:`preview`: a run's result (probabilities, labels or instances) drawn over its
  input, reading only the pyramid level that fits the picture;
* :func:`plot_plan`: the tile plan of an image (write regions, read windows with their
  halo, the mirrored border);
* :func:`plot_tile`: one tile's geometry up close (window, halo, crop, pooling grid);
* :func:`save_png`: write a picture; :func:`save_plan`: draw a plan into a PNG file.

Submodules (:mod:`~tilerseg.pictures.previews`, :mod:`~tilerseg.pictures.plan`,
:mod:`~tilerseg.pictures.draw`) are imported when first used, so importing this package
costs nothing.
"""

from __future__ import annotations

from .._lazy import attach

__all__ = ["preview", "render_preview", "Preview", "plot_plan", "plot_tile", "save_plan",
           "save_png", "draw"]

__getattr__, __dir__ = attach(__name__, {
    "preview": "previews", "render_preview": "previews", "Preview": "previews",
    "plot_plan": "plan", "plot_tile": "plan", "save_plan": "plan", "save_png": "draw",
    "draw": "",
}, globals())

"""The sample-data contribution: the synthetic slide of ``tilerseg demo``.

Written once as a tiled BigTIFF into tilerseg's cache folder (see
:func:`tilerseg.engine.backends.cache_dir`) and opened lazily, with its pixel size.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from ._layers import LayerData

__all__ = ["DEMO_SIZE", "demo_slide", "demo_slide_path"]

DEMO_SIZE = 4096
"""Side of the demo slide in pixels, as ``tilerseg demo`` writes it."""

PIXEL_SIZE = 0.5
"""Micrometres per pixel of the demo slide."""


def demo_slide_path(size: int = DEMO_SIZE, seed: int = 0) -> Path:
    """The demo slide's file in the cache folder, written on first use.

    Parameters
    ----------
    size : int
        Side in pixels.
    seed : int
        Random seed of :func:`tilerseg.synthetic.write_membrane_tiff`.

    Returns
    -------
    pathlib.Path
    """
    from ..engine.backends import cache_dir
    from ..synthetic import write_membrane_tiff

    path = cache_dir() / "samples" / f"demo-slide-{size}-seed{seed}.tif"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
        try:
            write_membrane_tiff(str(partial), (size, size), pixel_size=PIXEL_SIZE, seed=seed)
            os.replace(partial, path)  # whole or not at all, also with several viewers
        finally:
            partial.unlink(missing_ok=True)
    return path


def demo_slide(size: int = DEMO_SIZE) -> list[LayerData]:
    """The demo slide as an image layer (read lazily from its TIFF), in micrometres.

    Parameters
    ----------
    size : int
        Side in pixels.

    Returns
    -------
    list of LayerData
    """
    from ..io.readers import open_image

    source = open_image(demo_slide_path(size))
    scale = tuple(source.pixel_size.get(a, 1.0) for a in source.axes)
    return [(source.data, {"name": "demo slide", "scale": scale,
                           "units": ("micrometer",) * len(scale),
                           "metadata": {"tilerseg": {"input": str(source.path)}}}, "image")]

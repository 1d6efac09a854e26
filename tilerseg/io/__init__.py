"""Image input: open any supported image lazily as an :class:`ImageSource`.

The names are imported when first used (the readers import zarr and tifffile), so that
modules needing only :mod:`tilerseg.io.formats` start fast.
"""

from __future__ import annotations

from tilerseg._lazy import attach

__all__ = ["ImageSource", "open_image", "sample_for_statistics"]

__getattr__, __dir__ = attach(__name__, {"open_image": "readers",
                                         "sample_for_statistics": "readers",
                                         "ImageSource": "source"}, globals())

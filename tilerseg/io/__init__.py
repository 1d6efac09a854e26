"""Image input: open any supported image lazily as an :class:`ImageSource`."""

from __future__ import annotations

from tilerseg.io.readers import open_image, sample_for_statistics
from tilerseg.io.source import ImageSource

__all__ = ["ImageSource", "open_image", "sample_for_statistics"]

"""The engine: where images, geometry and models meet."""

from .device import resolve_device
from .inference import plan, segment
from .windows import read_window

__all__ = ["segment", "plan", "read_window", "resolve_device"]

"""The engine: where images, geometry and models meet (names imported when first used)."""

from __future__ import annotations

from .._lazy import attach

_LAZY = {
    "segment": "inference", "segment_to_zarr": "to_zarr", "default_output_path": "jobs",
    "segment_batch": "batch", "BatchResult": "batch", "plan": "prepare",
    "read_window": "windows", "resolve_device": "device", "RunOptions": "options",
    "run_options": "options", "status": "finish", "finalize": "finish",
}

__all__ = ["segment", "segment_to_zarr", "default_output_path", "plan", "read_window",
           "resolve_device", "RunOptions", "run_options", "status", "finalize", "segment_batch",
           "BatchResult"]

__getattr__, __dir__ = attach(__name__, _LAZY, globals())

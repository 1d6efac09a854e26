"""The engine: where images, geometry and models meet (names imported when first used)."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "segment": "inference", "segment_to_zarr": "to_zarr", "default_output_path": "jobs",
    "segment_batch": "batch", "BatchResult": "batch", "plan": "prepare",
    "read_window": "windows", "resolve_device": "device", "RunOptions": "options",
    "run_options": "options", "status": "resume", "finalize": "resume",
}

__all__ = ["segment", "segment_to_zarr", "default_output_path", "plan", "read_window",
           "resolve_device", "RunOptions", "run_options", "status", "finalize", "segment_batch",
           "BatchResult"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'tilerseg.engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

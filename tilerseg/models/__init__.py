"""Models: the U-Net family, the registry, checkpoints and geometry probing.

Names are imported when first used (torch is imported with them).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "UNet": "unet", "create_model": "registry", "list_models": "registry",
    "register_model": "registry", "save_model": "checkpoint", "load_model": "checkpoint",
    "model_geometry": "probe",
}

__all__ = [
    "UNet",
    "create_model",
    "list_models",
    "register_model",
    "save_model",
    "load_model",
    "model_geometry",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'tilerseg.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

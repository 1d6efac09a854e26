"""Models: the U-Net family, the registry, checkpoints and geometry probing.

Names are imported when first used (torch is imported with them).
"""

from __future__ import annotations

from .._lazy import attach

_LAZY = {
    "UNet": "unet", "create_model": "registry", "list_models": "registry",
    "register_model": "registry", "save_model": "checkpoint", "load_model": "checkpoint",
    "model_geometry": "probe", "UNetPlusPlus": "unetpp", "FCN8s": "fcn",
}

__all__ = [
    "UNet",
    "UNetPlusPlus",
    "FCN8s",
    "create_model",
    "list_models",
    "register_model",
    "save_model",
    "load_model",
    "model_geometry",
]

__getattr__, __dir__ = attach(__name__, _LAZY, globals())

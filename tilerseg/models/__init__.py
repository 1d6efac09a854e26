"""Models: the U-Net family, the registry, checkpoints and geometry probing."""

from .checkpoint import load_model, save_model
from .probe import model_geometry
from .registry import create_model, list_models, register_model
from .unet import UNet

__all__ = [
    "UNet",
    "create_model",
    "list_models",
    "register_model",
    "save_model",
    "load_model",
    "model_geometry",
]

"""tilerseg: exact overlap-tile U-Net segmentation of images too large for memory.

The public names are imported when first used, so that commands which need no model
(``tilerseg status``, ``tilerseg run --resume`` on a finished output) start without
importing torch.

Examples
--------
>>> import numpy as np, tilerseg
>>> model = tilerseg.create_model("unet", base_channels=4)
>>> tilerseg.model_geometry(model).halo
(92, 92)
>>> probs = tilerseg.segment(np.zeros((64, 80), np.uint8), model, device="cpu")
>>> probs.shape
(2, 64, 80)
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

from ._lazy import attach
from .errors import (
    ImageNotFoundError,
    InvalidArgumentError,
    InvalidImageError,
    InvalidModelError,
    ModelNotFoundError,
    OutputError,
    TilersegError,
)

logging.getLogger(__name__).addHandler(logging.NullHandler())

_LAZY = {
    "segment": "engine", "segment_to_zarr": "engine", "segment_batch": "engine",
    "BatchResult": "engine", "RunOptions": "engine", "status": "engine",
    "finalize": "engine", "plan": "engine",
    "open_image": "io", "ImageSource": "io",
    "UNet": "models", "create_model": "models", "list_models": "models",
    "register_model": "models", "load_model": "models", "save_model": "models",
    "model_geometry": "models",
    "ModelGeometry": "geometry", "TilePlan": "geometry", "Tile": "geometry",
}
_SUBPACKAGES = ("engine", "io", "models", "train", "geometry", "labels", "metrics",
                "normalize", "synthetic", "evaluate", "info", "cli")

__all__ = [
    "__version__",
    "segment",
    "segment_to_zarr",
    "segment_batch",
    "BatchResult",
    "RunOptions",
    "status",
    "finalize",
    "open_image",
    "ImageSource",
    "plan",
    "UNet",
    "create_model",
    "list_models",
    "register_model",
    "load_model",
    "save_model",
    "model_geometry",
    "ModelGeometry",
    "TilePlan",
    "Tile",
    "TilersegError",
    "InvalidImageError",
    "InvalidArgumentError",
    "InvalidModelError",
    "ModelNotFoundError",
    "ImageNotFoundError",
    "OutputError",
]

__getattr__, __dir__ = attach(__name__, {**_LAZY, **dict.fromkeys(_SUBPACKAGES, "")},
                              globals())

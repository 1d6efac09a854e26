"""tilerseg: exact overlap-tile U-Net segmentation of images too large for memory.

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

from .engine import (
    BatchResult,
    RunOptions,
    finalize,
    plan,
    segment,
    segment_batch,
    segment_to_zarr,
    status,
)
from .errors import (
    InvalidArgumentError,
    InvalidImageError,
    InvalidModelError,
    ImageNotFoundError,
    ModelNotFoundError,
    OutputError,
    TilersegError,
)
from .geometry import ModelGeometry, Tile, TilePlan
from .io import ImageSource, open_image
from .models import (
    UNet,
    create_model,
    list_models,
    load_model,
    model_geometry,
    register_model,
    save_model,
)

logging.getLogger(__name__).addHandler(logging.NullHandler())

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

"""Training: image/mask pairs (2D) and volume/label pairs (3D), the paper's weight map and
augmentations, patch sampling with the engine's geometry, losses, the loop."""

from .data import Pair, load_pairs, mask_to_classes
from .loop import PatchSampler, TrainConfig, train

__all__ = ["Pair", "load_pairs", "mask_to_classes", "PatchSampler", "TrainConfig", "train"]

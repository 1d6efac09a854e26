"""Training: image/mask pairs, the paper's weight map and augmentations, the loop."""

from .data import Pair, load_pairs, mask_to_classes
from .loop import PatchSampler, TrainConfig, train

__all__ = ["Pair", "load_pairs", "mask_to_classes", "PatchSampler", "TrainConfig", "train"]

"""Running the model on tiles: read the window, normalise, forward, crop, activate."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InvalidImageError
from ..geometry import Tile, TilePlan
from ..normalize import Normalization
from .windows import read_window

__all__ = ["TileRunner"]


def _memory_format(ndim: int) -> torch.memory_format:
    return torch.channels_last if ndim == 2 else torch.channels_last_3d


def _activation(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over classes (axis 0), or a sigmoid for a single class."""
    logits = logits.float()
    return torch.sigmoid(logits) if logits.shape[0] == 1 else torch.softmax(logits, dim=0)


class TileRunner:
    """Computes the probabilities of tiles of one image with one model.

    Moves the model to ``device`` and channels-last format on construction (in place).
    Calls are thread-safe as long as the model is in eval mode, which the caller
    arranges: each call runs under its own ``torch.inference_mode()``.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    image : array-like, shape (C, *spatial)
        Source of the windows (numpy array or a lazy view).
    tile_plan : TilePlan
        The plan whose tiles will be asked for.
    norm : Normalization
        Global intensity map.
    device : torch.device
        Where the model runs.
    check_finite : bool
        Refuse windows with NaN or Inf (for lazily read float images, which are not
        scanned up front).
    per_plane : bool
        The plan has a leading axis of single planes (a 2D model on a z-stack, see
        :meth:`ModelGeometry.per_plane`): each window is fed as a 2D image.
    """

    def __init__(
        self,
        model: nn.Module,
        image: Any,
        tile_plan: TilePlan,
        norm: Normalization,
        device: torch.device,
        check_finite: bool = False,
        per_plane: bool = False,
    ) -> None:
        self.model, self.image, self.plan, self.norm = model, image, tile_plan, norm
        self.device, self.check_finite = device, check_finite
        self.per_plane = per_plane
        self.fmt = _memory_format(2 if self.per_plane else tile_plan.geometry.ndim)
        model.to(device=device, memory_format=self.fmt)

    def window(self, tile: Tile) -> np.ndarray:
        """The normalised float32 input window of ``tile``."""
        window = read_window(self.image, tile.read_start, self.plan.window)
        if self.check_finite and window.dtype.kind == "f" and not np.isfinite(window).all():
            region = ", ".join(f"{s.start}:{s.stop}" for s in tile.write)
            raise InvalidImageError(f"image contains NaN or Inf values (near [{region}])")
        return self.norm(window)

    def __call__(self, tiles: Sequence[Tile]) -> list[np.ndarray]:
        """Probabilities ``(num_classes, *write_shape)`` of each tile, as float32 numpy."""
        x = torch.from_numpy(np.stack([self.window(t) for t in tiles]))
        if self.device.type == "cuda":
            x = x.pin_memory()
        with torch.inference_mode():
            x = x.to(self.device, non_blocking=True)
            if self.per_plane:
                x = x[:, :, 0]
            y = self.model(x.contiguous(memory_format=self.fmt))
            if self.per_plane:
                y = y[:, :, None]
            return [
                _activation(y[i][(slice(None),) + t.crop]).cpu().numpy()
                for i, t in enumerate(tiles)
            ]

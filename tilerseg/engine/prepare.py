"""Normalising the arguments of a lazy run once: image, model, plan, normalisation."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InvalidArgumentError, InvalidImageError, InvalidModelError
from ..geometry import ModelGeometry, TilePlan, plan_tiles
from ..io.readers import open_image, sample_for_statistics
from ..io.source import ImageSource
from ..models.probe import model_geometry
from ..normalize import Normalization, NormalizeSpec, resolve_normalization
from .device import default_batch_size, default_tile, resolve_device, resolve_devices
from .runner import TileRunner
from .view import ChannelFirstView, model_view

__all__ = ["Prepared", "prepare", "plan", "is_lazy_input", "check_model", "check_batch_size"]

def is_lazy_input(image: Any) -> bool:
    """True for inputs read lazily: paths, :class:`ImageSource`, Dask and Zarr arrays."""
    if isinstance(image, (str, os.PathLike, ImageSource)):
        return True
    module = type(image).__module__
    return module.startswith(("dask.", "zarr."))


def check_model(model: Any) -> ModelGeometry:
    """The geometry of ``model``, or a clear error if it is not a model."""
    if not isinstance(model, nn.Module):
        raise InvalidModelError(
            f"model must be a torch.nn.Module (see tilerseg.create_model / load_model), "
            f"got {type(model).__name__}"
        )
    return model_geometry(model)


def plan(
    image_shape: Sequence[int],
    model: nn.Module | ModelGeometry,
    tile: int | Sequence[int] | None = None,
    device: str | torch.device = "cpu",
) -> TilePlan:
    """Plan the tiles :func:`segment` would use for an image, without running anything.

    Parameters
    ----------
    image_shape : sequence of int
        Spatial shape of the image (no channel axis).
    model : torch.nn.Module or ModelGeometry
        The model, or its geometry.
    tile : int or sequence of int, optional
        Output tile side; the device's default when None.
    device : str or torch.device
        Only used to choose the default tile.

    Returns
    -------
    TilePlan

    Examples
    --------
    >>> import tilerseg
    >>> p = tilerseg.plan((3000, 2000), tilerseg.create_model(base_channels=4), tile=1024)
    >>> p.grid, p.window
    ((3, 2), (1212, 1212))
    """
    geometry = model if isinstance(model, ModelGeometry) else check_model(model)
    if tile is None:
        tile = default_tile(geometry.ndim, resolve_device(device))
    return plan_tiles(image_shape, geometry, tile)


def check_batch_size(batch_size: int | None, device: torch.device) -> int:
    """A validated batch size, or the device's default."""
    if batch_size is None:
        return default_batch_size(device)
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size={batch_size!r} must be a positive integer")
    return int(batch_size)


@dataclass(frozen=True)
class Prepared:
    """Everything a lazy run needs, validated."""

    source: ImageSource
    view: ChannelFirstView
    geometry: ModelGeometry
    plan: TilePlan
    normalization: Normalization
    device: torch.device
    runner: TileRunner


def statistics_sample(source: ImageSource, view: ChannelFirstView) -> np.ndarray:
    """A small sample of the model's channels, for global percentiles.

    From the lowest pyramid level with at least 65,536 pixels, read whole if small, else
    as an evenly spread grid of chunk-sized blocks (see :func:`sample_for_statistics`).
    """
    sample = sample_for_statistics(source)
    return ChannelFirstView(sample, source.axes, view.spatial, view.channels)[:]


def prepare(
    image: Any,
    model: nn.Module,
    tile: int | Sequence[int] | None = None,
    device: str | torch.device = "auto",
    normalize: NormalizeSpec = "auto",
    *,
    level: int = 0,
    channel: Sequence[int] | None = None,
    precision: str = "fp32",
) -> Prepared:
    """Open ``image`` lazily and validate everything against ``model``.

    The model is put in eval mode (a lazy result may be computed at any later time) and
    moved to ``device`` (the first, for a list) in channels-last format. A 2D model given a z-stack segments it
    plane by plane (the plan then has a leading Z axis of single-plane tiles).
    """
    geometry = check_model(model)
    source = image if isinstance(image, ImageSource) else open_image(image, level=level)
    planes = geometry.ndim == 2 and dict(zip(source.axes, source.shape)).get("Z", 1) > 1
    view = model_view(source, 3 if planes else geometry.ndim, channel)
    if view.dtype != np.bool_ and view.dtype.kind not in "uif":
        raise InvalidImageError(
            f"image dtype {view.dtype} is not supported; expected a real numeric or boolean dtype"
        )
    if min(view.shape) == 0:
        raise InvalidImageError(f"image is empty, shape {view.shape}")
    if view.shape[0] != geometry.in_channels:
        raise InvalidImageError(
            f"image has {view.shape[0]} channel(s) (axes {source.axes!r}, shape "
            f"{source.shape}); the model takes {geometry.in_channels}"
        )
    dev = resolve_devices(device)[0]
    if planes:  # a 2D model on a z-stack: plane by plane
        flat = plan(view.shape[2:], geometry, tile, dev)
        geometry = geometry.per_plane()
        tile_plan = TilePlan(view.shape[1:], (1, *flat.tile), geometry)
    else:
        tile_plan = plan(view.shape[1:], geometry, tile, dev)
    norm = resolve_normalization(
        normalize, view.dtype, lambda: statistics_sample(source, view)
    )
    model.eval()
    runner = TileRunner(model, view, tile_plan, norm, dev, check_finite=view.dtype.kind == "f",
                        per_plane=planes, precision=precision)
    return Prepared(source, view, geometry, tile_plan, norm, dev, runner)

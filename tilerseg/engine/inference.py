"""Tiled inference on in-memory arrays: the overlap-tile strategy, exact by construction."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InvalidArgumentError, InvalidImageError, InvalidModelError
from ..geometry import ModelGeometry, Tile, TilePlan, plan_tiles
from ..models.probe import eval_mode, model_geometry
from ..normalize import Normalization, NormalizeSpec, resolve_normalization
from .device import default_batch_size, default_tile, resolve_device
from .windows import read_window

__all__ = ["segment", "plan"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""Called as ``progress(tiles_done, tiles_total)`` after every batch."""

_AXES = {2: "(Y, X) or (C, Y, X)", 3: "(Z, Y, X) or (C, Z, Y, X)"}


def _check_model(model: Any) -> ModelGeometry:
    if not isinstance(model, nn.Module):
        raise InvalidModelError(
            f"model must be a torch.nn.Module (see tilerseg.create_model / load_model), "
            f"got {type(model).__name__}"
        )
    return model_geometry(model)


def _channels_first(image: Any, geometry: ModelGeometry) -> np.ndarray:
    """Validate ``image`` and return it as ``(C, *spatial)`` without copying."""
    try:
        arr = np.asarray(image)
    except Exception as exc:
        raise InvalidImageError(f"image of type {type(image).__name__} is not an array: {exc}") from None
    nd = geometry.ndim
    if arr.dtype != np.bool_ and arr.dtype.kind not in "uif":
        raise InvalidImageError(
            f"image dtype {arr.dtype} is not supported; expected a real numeric or boolean dtype"
        )
    if arr.ndim not in (nd, nd + 1):
        raise InvalidImageError(
            f"image has {arr.ndim} dimensions, shape {arr.shape}; a {nd}D model expects "
            f"{_AXES.get(nd, f'{nd} or {nd + 1} dimensions')}"
        )
    if arr.size == 0:
        raise InvalidImageError(f"image is empty, shape {arr.shape}")
    if arr.ndim == nd:
        arr = arr[None]
    if arr.shape[0] != geometry.in_channels:
        raise InvalidImageError(
            f"image has {arr.shape[0]} channel(s), shape {arr.shape}; the model takes "
            f"{geometry.in_channels} (channels come first)"
        )
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InvalidImageError("image contains NaN or Inf values")
    return arr


def _check_batch_size(batch_size: int | None, device: torch.device) -> int:
    if batch_size is None:
        return default_batch_size(device)
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size={batch_size!r} must be a positive integer")
    return int(batch_size)


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
    geometry = model if isinstance(model, ModelGeometry) else _check_model(model)
    if tile is None:
        tile = default_tile(geometry.ndim, resolve_device(device))
    return plan_tiles(image_shape, geometry, tile)


def _batches(tiles: Iterable[Tile], size: int) -> Iterator[list[Tile]]:
    it = iter(tiles)
    while batch := list(islice(it, size)):
        yield batch


def _memory_format(ndim: int) -> torch.memory_format:
    return torch.channels_last if ndim == 2 else torch.channels_last_3d


def _activation(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over classes (axis 0), or a sigmoid for a single class."""
    logits = logits.float()
    return torch.sigmoid(logits) if logits.shape[0] == 1 else torch.softmax(logits, dim=0)


def segment(
    image: np.ndarray,
    model: nn.Module,
    tile: int | Sequence[int] | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    normalize: NormalizeSpec = "auto",
    progress: Progress | None = None,
) -> np.ndarray:
    """Segment an image with the overlap-tile strategy.

    The image is cut into output tiles of side ``tile`` on the model's pooling grid;
    each tile's input window carries the model's halo of context, mirror-filled past the
    image border. The result equals running the model once on the whole image padded by
    reflection (up to float round-off), whatever the tile size.

    The model is moved to ``device`` and converted to channels-last memory format in
    place (as ``nn.Module.to`` does), and run in eval mode under
    ``torch.inference_mode``; each module's training flag is restored afterwards.

    Parameters
    ----------
    image : numpy.ndarray, shape (Y, X) or (C, Y, X); (Z, Y, X) or (C, Z, Y, X) for 3D
        The image; channels first. Integer, boolean or float dtype.
    model : torch.nn.Module
        A fully convolutional model, e.g. from :func:`tilerseg.create_model` or
        :func:`tilerseg.load_model`.
    tile : int or sequence of int, optional
        Output tile side in pixels, a positive multiple of the model's pooling step
        (16 for a depth-4 U-Net). Default: 512 on the CPU, 1024 on a GPU (64 / 128 for
        3D), reduced to the image size where the image is smaller.
    batch_size : int, optional
        Tiles per forward pass. Default: 1 on the CPU, 4 on a GPU.
    device : str or torch.device
        ``"auto"`` (CUDA if available, else MPS, else CPU), ``"cpu"``, ``"cuda"``,
        ``"cuda:N"`` or ``"mps"``.
    normalize : bool, str or (float, float)
        Global intensity normalisation, see :func:`tilerseg.normalize.resolve_normalization`:
        by default integer images are scaled from their dtype range to [0, 1] and float
        images are used unchanged; ``False`` feeds values unchanged.
    progress : callable, optional
        Called as ``progress(tiles_done, tiles_total)`` after every batch.

    Returns
    -------
    numpy.ndarray of float32, shape (num_classes, *spatial)
        Class probabilities: softmax over classes, or a sigmoid when the model has one
        output channel.

    Examples
    --------
    >>> import numpy as np, tilerseg
    >>> model = tilerseg.create_model("unet", depth=2, base_channels=4)
    >>> image = np.random.default_rng(0).random((50, 70), dtype=np.float32)
    >>> probs = tilerseg.segment(image, model, tile=32, device="cpu")
    >>> probs.shape, probs.dtype
    ((2, 50, 70), dtype('float32'))
    >>> bool(np.allclose(probs.sum(axis=0), 1))
    True
    """
    geometry = _check_model(model)
    img = _channels_first(image, geometry)
    dev = resolve_device(device)
    batch = _check_batch_size(batch_size, dev)
    tile_plan = plan(img.shape[1:], geometry, tile, dev)
    norm = resolve_normalization(normalize, img, geometry.ndim)
    out = np.empty((geometry.out_channels,) + img.shape[1:], dtype=np.float32)
    log.info(
        "segmenting %s %s with %d tiles of %s (window %s), batch %d on %s, normalisation %s",
        img.shape, img.dtype, len(tile_plan), tile_plan.tile, tile_plan.window, batch, dev,
        norm.method,
    )
    start = time.perf_counter()
    _run(model, img, tile_plan, norm, dev, batch, out, progress)
    seconds = time.perf_counter() - start
    log.info("segmented %d px in %.2f s (%.2f Mpx/s)", img[0].size, seconds,
             img[0].size / seconds / 1e6)
    return out


def _run(
    model: nn.Module,
    image: np.ndarray,
    tile_plan: TilePlan,
    norm: Normalization,
    device: torch.device,
    batch_size: int,
    out: np.ndarray,
    progress: Progress | None,
) -> None:
    fmt = _memory_format(tile_plan.geometry.ndim)
    model.to(device=device, memory_format=fmt)
    done, total = 0, len(tile_plan)
    with eval_mode(model), torch.inference_mode():
        for tiles in _batches(tile_plan, batch_size):
            x = np.stack([norm(read_window(image, t.read_start, tile_plan.window)) for t in tiles])
            xt = torch.from_numpy(x)
            if device.type == "cuda":
                xt = xt.pin_memory()
            xt = xt.to(device, non_blocking=True).contiguous(memory_format=fmt)
            y = model(xt)
            for i, t in enumerate(tiles):
                probs = _activation(y[i][(slice(None),) + t.crop])
                out[(slice(None),) + t.write] = probs.cpu().numpy()
            done += len(tiles)
            if progress is not None:
                progress(done, total)

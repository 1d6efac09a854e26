"""Running the model on tiles: read the window, normalise, forward, crop, activate."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InvalidImageError
from ..geometry import Tile, TilePlan
from ..normalize import Normalization
from .compute import Replica
from .tta import View
from .windows import read_window

__all__ = ["TileRunner"]


class TileRunner:
    """Computes the probabilities of tiles of one image with one model.

    Reading and normalising windows (:meth:`load`) needs no model; :meth:`__call__`
    runs them through a :class:`~tilerseg.engine.compute.Replica` of the model, made on
    first use (which moves the model to ``device`` in channels-last format, in place).
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
    model_ndim : int, optional
        Spatial dimensions of the model, when it is less than the plan's: a 2D model on
        a z-stack, whose plan has a leading axis of single planes (see
        :meth:`ModelGeometry.per_plane`).
    precision : {"fp32", "bf16", "fp16", "int8"}
        Precision of the forward pass.
    compile : bool
        Run the model through :func:`torch.compile` (torch backend).
    backend : {"torch", "openvino"}
        The runtime (resolved by :func:`~tilerseg.engine.backends.resolve_backend`).
    calibration : callable, optional
        For int8: the model's geometry and calibration (see
        :class:`~tilerseg.engine.compute.Replica`).
    views : tuple of View, optional
        Test-time augmentation (see :class:`~tilerseg.engine.compute.Replica`).
    """

    def __init__(
        self,
        model: nn.Module,
        image: Any,
        tile_plan: TilePlan,
        norm: Normalization,
        device: torch.device,
        check_finite: bool = False,
        model_ndim: int | None = None,
        precision: str = "fp32",
        compile: bool = False,
        backend: str = "torch",
        calibration: Callable[[], tuple[Any, Any]] | None = None,
        views: Sequence[View] | None = None,
    ) -> None:
        self.model, self.image, self.plan, self.norm = model, image, tile_plan, norm
        self.calibration, self.views = calibration, views
        self.device, self.check_finite, self.precision = device, check_finite, precision
        self.compile, self.backend = compile, backend
        self.model_ndim = model_ndim or tile_plan.geometry.ndim
        self._replica: Replica | None = None
        self._lock = threading.Lock()

    @property
    def per_plane(self) -> bool:
        """Whether a 2D model runs plane by plane over a z-stack."""
        return self.model_ndim < self.plan.geometry.ndim

    @property
    def model_window(self) -> tuple[int, ...]:
        """The input window the model sees (without the plane axis of a z-stack)."""
        return self.plan.window[-self.model_ndim:]

    @property
    def made(self) -> bool:
        """Whether :attr:`replica` has been made (the model ran in this process)."""
        return self._replica is not None

    @property
    def replica(self) -> Replica:
        """The model on ``device``, made on first use."""
        with self._lock:
            if self._replica is None:
                self._replica = Replica(self.model, self.device, self.model_ndim,
                                        self.precision, self.compile, self.backend,
                                        self.calibration, views=self.views)
            return self._replica

    def window(self, tile: Tile, out: np.ndarray | None = None) -> np.ndarray:
        """The normalised float32 input window of ``tile`` (written into ``out`` if given)."""
        window = read_window(self.image, tile.read_start, self.plan.window)
        if self.check_finite and window.dtype.kind == "f" and not np.isfinite(window).all():
            region = ", ".join(f"{s.start}:{s.stop}" for s in tile.write)
            raise InvalidImageError(f"image contains NaN or Inf values (near [{region}])")
        return self.norm(window, out=out)

    def load(self, tiles: Sequence[Tile]) -> torch.Tensor:
        """The stacked normalised windows of ``tiles``, ``(B, C, *window)`` float32.

        In pinned (page-locked) memory when the model runs on CUDA, so the upload can be
        asynchronous.
        """
        shape = (len(tiles), self.image.shape[0], *self.plan.window)
        x = torch.empty(shape, dtype=torch.float32, pin_memory=self.device.type == "cuda")
        batch = x.numpy()
        for i, t in enumerate(tiles):
            self.window(t, out=batch[i])
        return x

    def __call__(self, tiles: Sequence[Tile]) -> list[np.ndarray]:
        """Probabilities ``(num_classes, *write_shape)`` of each tile, as float32 numpy."""
        return self.replica(self.load(tiles), tiles)

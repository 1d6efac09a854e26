"""Tiled inference on in-memory arrays: the overlap-tile strategy, exact by construction."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice

import dask.array as da
import numpy as np
import torch
from torch import nn

from ..geometry import Tile
from ..models.probe import eval_mode
from ..normalize import NormalizeSpec
from .lazy import lazy_probabilities
from .options import run_options
from .prepare import check_model, is_lazy_input, plan, prepare
from .runner import TileRunner

__all__ = ["segment", "plan"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""Called as ``progress(tiles_done, tiles_total)`` after every batch."""

def _batches(tiles: Iterable[Tile], size: int) -> Iterator[list[Tile]]:
    it = iter(tiles)
    while batch := list(islice(it, size)):
        yield batch


def segment(
    image: np.ndarray,
    model: nn.Module,
    tile: int | Sequence[int] | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    normalize: NormalizeSpec = "auto",
    progress: Progress | None = None,
    *,
    level: int = 0,
    channel: Sequence[int] | None = None,
    tta: bool | str = False,
    precision: str = "fp32",
    calibration: str | os.PathLike | None = None,
    backend: str = "auto",
    compile: bool = False,
) -> np.ndarray | da.Array:
    """Segment an image with the overlap-tile strategy.

    The image is cut into output tiles of side ``tile`` on the model's pooling grid;
    each tile's input window carries the model's halo of context, mirror-filled past the
    image border. The result equals running the model once on the whole image padded by
    reflection (up to float round-off), whatever the tile size.

    A numpy image is segmented now; a path, :class:`~tilerseg.ImageSource`, Dask or
    Zarr array is opened lazily and the result is a Dask array whose chunks are the
    output tiles: nothing is read or computed until it is (use
    :func:`tilerseg.segment_to_zarr` to write a large result with bounded memory).

    The model is moved to ``device`` and converted to channels-last memory format in
    place (as ``nn.Module.to`` does), and run in eval mode under
    ``torch.inference_mode``; for a numpy image each module's training flag is restored
    afterwards, for a lazy one the model stays in eval mode.

    Parameters
    ----------
    image : numpy.ndarray, path, ImageSource, dask or zarr array
        A numpy image is ``(Y, X)`` or ``(C, Y, X)`` (``(Z, Y, X)`` or ``(C, Z, Y, X)``
        for a 3D model), channels first; integer, boolean or float dtype. Paths and
        other arrays are opened by :func:`tilerseg.open_image`.
    model : torch.nn.Module
        A fully convolutional model, e.g. from :func:`tilerseg.create_model` or
        :func:`tilerseg.load_model`.
    tile : int or sequence of int, optional
        Output tile side in pixels, a positive multiple of the model's pooling step
        (16 for a depth-4 U-Net). Default: 512 on the CPU with torch, 1024 with OpenVINO
        and on a GPU (2D); 3D on the CPU the largest of 64 x 256 x 256, 64 x 128 x 128 and
        64 (Z, Y, X) whose window fits a memory budget for the model's width (see
        :func:`tilerseg.engine.device.default_tile`), 128 on GPUs; reduced to the image
        size where the image is smaller.
    batch_size : int, optional
        Tiles per forward pass. Default: 1 on the CPU, 4 on a GPU.
    device : str or torch.device
        ``"auto"`` (CUDA if available, else MPS, else CPU), ``"cpu"``, ``"cuda"``,
        ``"cuda:N"`` or ``"mps"``.
    normalize : bool, str or (float, float)
        Global intensity normalisation, see :func:`tilerseg.normalize.resolve_normalization`:
        by default integer images are scaled from their dtype range to [0, 1] and float
        images are used unchanged; ``False`` feeds values unchanged.
        ``("window", centre, width)``, ``("window", NAME)`` (a CT preset) or
        ``("window", "dicom")`` (the DICOM file's window) apply a clipped display window.
    progress : callable, optional
        Called as ``progress(tiles_done, tiles_total)`` after every batch (numpy input).
    level : int
        Pyramid level to segment (lazy input).
    channel : sequence of int, optional
        Input channels to feed the model, in order; all by default.
    tta : bool or {"dihedral", "flips"}
        Test-time augmentation: every window goes through the model in the 8 flips and
        quarter turns of the plane (``True`` or ``"dihedral"``; 8 flips in 3D) or the 4
        flips (``"flips"``), and the probabilities are averaged. It stays exact: the
        result equals the same average of one-shot inference on the transformed padded
        image (see :mod:`tilerseg.engine.tta`). 8 (or 4) times the model's work.
    precision : {"fp32", "bf16", "fp16", "int8"}
        Compute precision of the forward pass. ``"bf16"`` is several times faster on
        CPUs with bfloat16 units and on recent GPUs; it changes probabilities by a few
        hundredths at most (see docs/benchmarks.md). ``"int8"``: the model quantised
        with NNCF for OpenVINO on the CPU, calibrated and checked against float32 first
        (see :mod:`tilerseg.engine.int8`).
    calibration : path, optional
        With ``precision="int8"``: a folder of images to calibrate on (default: the
        image itself).
    backend : {"auto", "torch", "openvino"}
        The runtime of the forward pass: ``"auto"`` is OpenVINO on the CPU when it is
        installed, else torch (see :mod:`tilerseg.engine.backends`).
    compile : bool
        :func:`torch.compile` the model (torch backend), checked against eager first.

    Returns
    -------
    numpy.ndarray or dask.array.Array of float32, shape (num_classes, *spatial)
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
    options = run_options(tile=tile, batch_size=batch_size, device=device, normalize=normalize,
                          level=level, channel=channel, precision=precision,
                          calibration=calibration, backend=backend, compile=compile, tta=tta)
    if is_lazy_input(image):
        p = prepare(image, model, options)
        return lazy_probabilities(p.runner, p.batch_size)
    geometry = check_model(model)
    with eval_mode(model):
        p = prepare(image, model, options, geometry=geometry)
        out = np.empty((p.geometry.out_channels, *p.plan.image_shape), dtype=np.float32)
        log.info(
            "segmenting %s %s with %d tiles of %s (window %s), batch %d on %s, normalisation %s",
            p.view.shape, p.view.dtype, len(p.plan), p.plan.tile, p.plan.window, p.batch_size,
            p.device, p.normalization.method,
        )
        start = time.perf_counter()
        _run(p.runner, p.batch_size, out, progress)
    seconds = time.perf_counter() - start
    pixels = int(np.prod(p.plan.image_shape))
    log.info("segmented %d px in %.2f s (%.2f Mpx/s)", pixels, seconds, pixels / seconds / 1e6)
    return out


def _run(
    runner: TileRunner,
    batch_size: int,
    out: np.ndarray,
    progress: Progress | None,
) -> None:
    done, total = 0, len(runner.plan)
    for tiles in _batches(runner.plan, batch_size):
        for t, probs in zip(tiles, runner(tiles)):
            out[(slice(None),) + t.write] = probs
        done += len(tiles)
        if progress is not None:
            progress(done, total)

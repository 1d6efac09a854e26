"""Choosing the compute device and its defaults."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..errors import InvalidArgumentError
from .cores import available_cores

__all__ = ["resolve_device", "resolve_devices", "default_batch_size", "default_tile", "first_width",
           "default_workers", "cpu_budget", "torch_threads"]

log = logging.getLogger(__name__)

_EXPECTED = "expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn a device argument into an available ``torch.device``.

    Parameters
    ----------
    device : str or torch.device
        ``"auto"`` picks CUDA if available, then Apple's MPS, then the CPU.

    Returns
    -------
    torch.device

    Raises
    ------
    InvalidArgumentError
        Unknown device name, or a device this machine does not have.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if isinstance(device, str) and device.strip().lower() == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidArgumentError(f"device={device!r} is not a device; {_EXPECTED}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgumentError(f"device={device!r}: CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise InvalidArgumentError(
                f"device={device!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise InvalidArgumentError(f"device={device!r}: MPS is not available on this machine")
    elif dev.type != "cpu":
        raise InvalidArgumentError(f"device={device!r} is not supported; {_EXPECTED}")
    return dev


def default_batch_size(device: torch.device) -> int:
    """Tiles per forward: 1 on the CPU (batching measured slower there), 4 on accelerators."""
    return 1 if device.type == "cpu" else 4


TILES_3D_CPU = ((64, 256, 256), (64, 128, 128), (64, 64, 64))
"""The default output tiles of a 3D model on the CPU, largest first (Z, Y, X)."""

WINDOW_BUDGET_3D = 200_000_000
"""Voxels x channels of one first-layer feature map of a 3D window (800 MB in float32)
that the default tile on the CPU keeps below."""


def default_tile(ndim: int, device: torch.device, backend: str = "torch",
                 width: int | None = None, halo: tuple[int, ...] | None = None
                 ) -> tuple[int, ...]:
    """Default output tile, per axis.

    2D: 512 px on the CPU, 1024 on GPUs and on OpenVINO. On this project's reference CPU,
    output tiles of 516-772 px ran fastest for a depth-4 U-Net on torch; OpenVINO ran
    1.13x faster on 1024-px tiles (1212-px windows) than on 512-px ones
    (``benchmarks/bench_small.py`` and ``bench_end_to_end.py``), and accelerators prefer
    larger tiles.

    3D: 128 voxels on every axis on GPUs. On the CPU the largest of
    :data:`TILES_3D_CPU` whose window (the tile plus ``halo`` on each side) times
    ``width``, the model's first-layer channels, stays within
    :data:`WINDOW_BUDGET_3D` (64 x 128 x 128 where ``width`` or ``halo`` is unknown):
    in 3D the halo costs more (the ``unet3d`` preset's window around a 64-voxel cube
    holds 8.9 times its voxels), so larger tiles run faster, and the budget keeps the
    memory of wider models in bounds (figures: ``benchmarks/bench_3d.py --tile``,
    docs/benchmarks.md).

    Examples
    --------
    >>> default_tile(2, torch.device("cpu")), default_tile(2, torch.device("cpu"), "openvino")
    ((512, 512), (1024, 1024))
    >>> cpu = torch.device("cpu")
    >>> [default_tile(3, cpu, width=w, halo=(16, 44, 44)) for w in (16, 32, 64)]
    [(64, 256, 256), (64, 128, 128), (64, 64, 64)]
    """
    if ndim == 2:
        side = 1024 if device.type != "cpu" or backend == "openvino" else 512
        return (side, side)
    if device.type != "cpu":
        return (128,) * ndim
    if width is None or halo is None:
        return TILES_3D_CPU[1]
    for tile in TILES_3D_CPU:
        if math.prod(t + 2 * h for t, h in zip(tile, halo)) * width <= WINDOW_BUDGET_3D:
            return tile
    return TILES_3D_CPU[-1]


def first_width(model: Any) -> int | None:
    """The output channels of a model's first convolution.

    Parameters
    ----------
    model : torch.nn.Module
        Any model.

    Returns
    -------
    int or None
        The first ``Conv2d`` / ``Conv3d`` module's ``out_channels``; None if it has none.

    Examples
    --------
    >>> import tilerseg
    >>> first_width(tilerseg.create_model("unet3d", base_channels=16))
    16
    """
    modules = model.modules() if hasattr(model, "modules") else ()
    return next((int(m.out_channels) for m in modules
                 if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))), None)


def resolve_devices(device: str | torch.device | Sequence[str | torch.device] = "auto"
                    ) -> list[torch.device]:
    """The devices of one run: ``"cuda"`` means every visible GPU.

    Parameters
    ----------
    device : str, torch.device or sequence of them
        As for :func:`resolve_device`, plus ``"cuda"`` (all visible GPUs, one model
        replica each), a comma-separated list (``"cuda:0,cuda:2"``) or a sequence.
        ``"auto"`` picks all GPUs when there are any.

    Returns
    -------
    list of torch.device
        Without duplicates, in the order given.

    Examples
    --------
    >>> resolve_devices("cpu")
    [device(type='cpu')]
    """
    if isinstance(device, str) and "," in device:
        device = [d for d in device.split(",") if d.strip()]
    if isinstance(device, (list, tuple)):
        if not device:
            raise InvalidArgumentError("device list is empty")
        devices = [resolve_device(d) for d in device]
        devices = [torch.device("cuda", torch.cuda.current_device())
                   if d.type == "cuda" and d.index is None else d for d in devices]
        if len({d.type for d in devices}) > 1:
            raise InvalidArgumentError(f"device={device!r} mixes device types; use one type")
        return list(dict.fromkeys(devices))
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        return [torch.device("cuda", k) for k in range(torch.cuda.device_count())]
    return [dev]


def default_workers(device: torch.device, ndim: int = 2) -> int:
    """Concurrent model workers: two where there are 2+ cores (one per GPU elsewhere), but
    one with every core for a 3D model on the CPU.

    On the project's 2-core reference machine, two forward passes of a 2D U-Net with one
    torch thread each ran 8-20% faster than one pass with two threads
    (``benchmarks/bench_threads.py``); the 3D preset ran as fast in one pass with two
    threads as in two with one, at two thirds of the memory (``benchmarks/bench_3d.py``).
    """
    if device.type != "cpu":
        return 2
    return 1 if ndim == 3 else min(2, available_cores())


def cpu_budget(workers: int | None = None, threads: int | None = None,
               cores: int | None = None, ndim: int = 2) -> tuple[int, int]:
    """Split the cores between concurrent forward passes: ``(workers, torch threads each)``.

    Defaults: :func:`default_workers` workers for a model of ``ndim`` spatial axes (at
    most ``cores``), ``cores // workers``
    threads each, so ``workers * threads <= cores`` (no oversubscription); ``cores`` are by
    default those this process may use (:func:`~tilerseg.engine.cores.available_cores`).
    Explicit values are kept; an oversubscribed choice is logged.

    Examples
    --------
    >>> w, t = cpu_budget(1, 3)
    >>> (w, t)
    (1, 3)
    """
    cores = cores or available_cores()
    workers = workers or min(cores, default_workers(torch.device("cpu"), ndim))
    threads = threads or max(1, cores // workers)
    if workers * threads > cores:
        log.warning("%d workers x %d torch threads oversubscribe %d cores", workers, threads,
                    cores)
    return workers, threads


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Set torch's intra-op thread count for a block (None: leave it), then restore it."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)

"""One model replica on one device: precision, optional compilation, asynchronous batches.

A :class:`Replica` turns a host batch of normalised windows into the kept, activated
crops of its tiles. On CUDA a batch is uploaded on a separate copy stream (from pinned
memory, non-blocking) while the previous batch computes, and the results come back
through pinned buffers, so :meth:`Replica.submit` returns before the GPU is done and
:meth:`Replica.collect` waits. On the CPU both happen in :meth:`~Replica.submit`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InvalidArgumentError, NumericalError
from ..geometry import Tile

__all__ = ["PRECISIONS", "Replica", "resolve_precision", "memory_format", "replicate"]

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def memory_format(ndim: int) -> torch.memory_format:
    """The fastest layout for a ``ndim``-D convolutional model: channels-last."""
    return torch.channels_last if ndim == 2 else torch.channels_last_3d


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None for fp32).

    Parameters
    ----------
    precision : {"fp32", "bf16", "fp16"}
        Compute precision of the forward pass (activations stay float32).
    device : torch.device
        Where the model runs.

    Raises
    ------
    InvalidArgumentError
        Unknown precision, or one the device cannot compute in.

    Examples
    --------
    >>> resolve_precision("bf16", torch.device("cpu"))
    torch.bfloat16
    >>> resolve_precision("fp32", torch.device("cpu")) is None
    True
    """
    if precision not in PRECISIONS:
        raise InvalidArgumentError(
            f"precision={precision!r} must be one of {', '.join(PRECISIONS)}"
        )
    dtype = PRECISIONS[precision]
    if dtype is None:
        return None
    if device.type == "cuda":
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
            name = torch.cuda.get_device_name(device)
            raise InvalidArgumentError(
                f"precision=bf16: {name} has no native bfloat16; use fp16 or fp32"
            )
    elif not torch.amp.is_autocast_available(device.type):
        raise InvalidArgumentError(
            f"precision={precision}: autocast is not available on {device.type}; use fp32"
        )
    return dtype


def _activation(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over classes (axis 0 of one tile), or a sigmoid for a single class."""
    logits = logits.float()
    return torch.sigmoid(logits) if logits.shape[0] == 1 else torch.softmax(logits, dim=0)


@dataclass
class _Pending:
    tiles: Sequence[Tile]
    results: list[torch.Tensor]
    done: Any = None  # a CUDA event
    finite: torch.Tensor | None = None
    keep: list[Any] = field(default_factory=list)


class Replica:
    """A model on one device, ready to infer batches of tiles.

    Parameters
    ----------
    model : torch.nn.Module
        The model, in eval mode; moved to ``device`` in channels-last format (in place).
    device : torch.device
        Where it runs.
    ndim : int
        Spatial dimensions of the model (2 or 3). A batch with one more axis is a 2D
        model's batch of single planes of a z-stack: the singleton Z axis is dropped
        before the model and restored after.
    precision : {"fp32", "bf16", "fp16"}
        Autocast precision of the forward pass.
    compile : bool
        Wrap the model in :func:`torch.compile`; call :meth:`warm_up` to compile before
        the run (failures fall back to eager execution, logged).

    Notes
    -----
    Calls from several threads are safe on the CPU (the model is only read); a CUDA
    replica is driven by one thread.
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        ndim: int,
        precision: str = "fp32",
        compile: bool = False,
    ) -> None:
        self.device, self.ndim, self.precision = device, ndim, precision
        self.autocast_dtype = resolve_precision(precision, device)
        self.fmt = memory_format(ndim)
        self.model = model.to(device=device, memory_format=self.fmt)
        self.forward_model: Any = self.model
        self.compile_requested = compile
        self.compile_tried = False
        self.compiled = False
        cuda = device.type == "cuda"
        self.asynchronous = cuda  # submit() returns before the results are ready
        self.copy_stream = torch.cuda.Stream(device) if cuda else None
        self.compute_stream = torch.cuda.Stream(device) if cuda else None

    # -- set-up -----------------------------------------------------------------------

    def warm_up(self, window: Sequence[int], in_channels: int, batch_size: int) -> None:
        """Compile (if asked) and check the compiled model against eager execution.

        A compiler error, or compiled probabilities deviating by more than 1e-3 from
        eager ones on a seeded random batch, makes this replica run eagerly instead,
        with a warning: ``compile`` never changes the output silently.
        """
        if not self.compile_requested or self.compile_tried:
            return
        self.compile_tried = True  # a failed or rejected compile is not tried again
        generator = torch.Generator().manual_seed(0)
        shape = (batch_size, in_channels, *window)
        x = torch.rand(shape, generator=generator)
        try:
            compiled = torch.compile(self.model, dynamic=False)
            eager = self._probabilities(self.model, x)
            fast = self._probabilities(compiled, x)
        except Exception as err:  # noqa: BLE001 - compilers fail in many ways; fall back
            log.warning("torch.compile failed on %s (%s: %s); running eagerly",
                        self.device, type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            return
        deviation = float((eager - fast).abs().max())
        if not deviation <= 1e-3:
            log.warning("torch.compile changed the probabilities by %.2e on %s; running eagerly",
                        deviation, self.device)
            return
        self.forward_model, self.compiled = compiled, True
        log.info("compiled the model on %s (max deviation from eager %.1e)", self.device, deviation)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _probabilities(self, model: Any, x: torch.Tensor) -> torch.Tensor:
        """Activated whole outputs of a host batch (for the compile check)."""
        with torch.inference_mode():
            y = self._forward(x.to(self.device), model).float()
            y = torch.sigmoid(y) if y.shape[1] == 1 else torch.softmax(y, dim=1)
            return y.cpu()

    # -- inference --------------------------------------------------------------------

    def submit(self, x: torch.Tensor, tiles: Sequence[Tile]) -> _Pending:
        """Start inferring the host batch ``x`` (``(B, C, *window)`` float32) of ``tiles``."""
        with torch.inference_mode():
            if self.device.type == "cuda":
                with torch.cuda.device(self.device):
                    return self._submit_cuda(x, tiles)
            x = x.to(self.device)
            y = self._forward(x)
            results = [_activation(y[i][(slice(None),) + t.crop]).cpu()  # no-op on the CPU
                       for i, t in enumerate(tiles)]
            finite = None if self.autocast_dtype is None else torch.isfinite(y).all().cpu()
            return _Pending(tiles, results, finite=finite)

    def _forward(self, x: torch.Tensor, model: Any = None) -> torch.Tensor:
        """Logits of a device batch through ``model`` (default: the one in use)."""
        planes = x.dim() == self.ndim + 3  # (B, C, 1, Y, X): single planes of a z-stack
        if planes:
            x = x[:, :, 0]
        with self._autocast():
            y = (model or self.forward_model)(x.contiguous(memory_format=self.fmt))
        return y[:, :, None] if planes else y

    def _submit_cuda(self, x: torch.Tensor, tiles: Sequence[Tile]) -> _Pending:
        assert self.copy_stream is not None and self.compute_stream is not None
        if not x.is_pinned():
            x = x.pin_memory()
        with torch.cuda.stream(self.copy_stream):
            x_dev = x.to(self.device, non_blocking=True)
            uploaded = torch.cuda.Event()
            uploaded.record(self.copy_stream)
        with torch.cuda.stream(self.compute_stream):
            self.compute_stream.wait_event(uploaded)
            x_dev.record_stream(self.compute_stream)  # allocated on the copy stream
            y = self._forward(x_dev)
            results = []
            for i, t in enumerate(tiles):
                probs = _activation(y[i][(slice(None),) + t.crop])
                host = torch.empty(probs.shape, dtype=probs.dtype, pin_memory=True)
                host.copy_(probs, non_blocking=True)
                results.append(host)
            finite = None
            if self.autocast_dtype is not None:
                finite = torch.empty((), dtype=torch.bool, pin_memory=True)
                finite.copy_(torch.isfinite(y).all(), non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.compute_stream)
        return _Pending(tiles, results, done=done, finite=finite, keep=[x])

    def collect(self, pending: _Pending) -> list[np.ndarray]:
        """Wait for a submitted batch; its tiles' probabilities as float32 numpy arrays."""
        if pending.done is not None:
            pending.done.synchronize()
        if pending.finite is not None and not bool(pending.finite):
            region = ", ".join(f"{s.start}:{s.stop}" for s in pending.tiles[0].write)
            raise NumericalError(
                f"the model's output is not finite under precision={self.precision} (near "
                f"[{region}]); the activations overflow: use precision=fp32 (or bf16)"
            )
        return [r.numpy() for r in pending.results]

    def __call__(self, x: torch.Tensor, tiles: Sequence[Tile]) -> list[np.ndarray]:
        """Infer a host batch synchronously."""
        return self.collect(self.submit(x, tiles))


def replicate(
    model: nn.Module,
    devices: Sequence[torch.device],
    ndim: int,
    precision: str = "fp32",
    compile: bool = False,
) -> list[Replica]:
    """One :class:`Replica` per device; the first uses ``model`` itself, others copies."""
    replicas = []
    for k, dev in enumerate(devices):
        m = model if k == 0 else copy.deepcopy(model)
        replicas.append(Replica(m, dev, ndim, precision, compile))
    return replicas

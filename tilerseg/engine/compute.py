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
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import (InvalidArgumentError, InvalidImageError, NumericalError,
                      RuntimeFallbackError)
from ..geometry import Tile
from .tta import View

__all__ = ["PRECISIONS", "STRICT_RUNTIME", "Replica", "resolve_precision", "memory_format",
           "replicate", "strict_runtime"]

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
STRICT_RUNTIME = "TILERSEG_STRICT_RUNTIME"
"""Environment variable: ``1`` makes a faster runtime that fails its set-up or its check an
error (:class:`~tilerseg.errors.RuntimeFallbackError`) instead of a fall-back to eager
torch; inherited by shard and worker processes (the test suite sets it)."""


def strict_runtime() -> bool:
    """Whether falling back to eager torch is forbidden (see :data:`STRICT_RUNTIME`)."""
    return os.environ.get(STRICT_RUNTIME, "").strip().lower() in ("1", "true", "yes")


def memory_format(ndim: int) -> torch.memory_format:
    """The fastest layout for a ``ndim``-D convolutional model: channels-last."""
    return torch.channels_last if ndim == 2 else torch.channels_last_3d


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None for fp32).

    Parameters
    ----------
    precision : {"fp32", "bf16", "fp16", "int8"}
        Compute precision of the forward pass (activations stay float32); int8 is
        OpenVINO's alone (None: eager torch, its reference and fallback, is float32).
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
    if precision == "int8":  # OpenVINO's; eager torch, its reference, computes in float32
        if device.type != "cpu":
            raise InvalidArgumentError(
                f"precision=int8 runs on the CPU (OpenVINO), not on {device.type}")
        return None
    if precision not in PRECISIONS:
        raise InvalidArgumentError(
            f"precision={precision!r} must be one of {', '.join(PRECISIONS)}, int8"
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
    precision : {"fp32", "bf16", "fp16", "int8"}
        Autocast precision of the forward pass; ``"int8"``: the OpenVINO network
        quantised on ``calibration`` (eager torch in float32 is its check and fallback).
    compile : bool
        Run the torch model through :func:`torch.compile` (see :meth:`warm_up`).
    backend : {"torch", "openvino"}
        The runtime (resolved, see :mod:`tilerseg.engine.backends`); OpenVINO only on
        the CPU.
    calibration : callable, optional
        For int8: returns the model's geometry and the
        :class:`~tilerseg.engine.int8.Calibration` to quantise it on (called once, when
        the network is first needed).
    views : tuple of View, optional
        Test-time augmentation: each batch goes through the model in every view
        (:func:`tilerseg.engine.tta.views`), each output is put back and the tiles'
        probabilities are averaged. Default: the batch as it is.

    Attributes
    ----------
    engine : str
        What runs the forward pass after :meth:`warm_up`: ``"torch"`` (eager),
        ``"torch.compile"`` or ``"openvino"``.

    Notes
    -----
    Calls from several threads are safe on the CPU (the model is only read; an OpenVINO
    network has one infer request per calling thread); a CUDA replica is driven by one
    thread.
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        ndim: int,
        precision: str = "fp32",
        compile: bool = False,
        backend: str = "torch",
        calibration: Callable[[], tuple[Any, Any]] | None = None,
        views: Sequence[View] | None = None,
    ) -> None:
        self.device, self.ndim, self.precision = device, ndim, precision
        self.calibration = calibration
        self.views = tuple(views) if views else (View(ndim),)
        self.autocast_dtype = resolve_precision(precision, device)
        self.fmt = memory_format(ndim)
        self.model = model.to(device=device, memory_format=self.fmt)
        self.compile_requested = compile
        self.backend = backend
        self._engines: set[str] = set()  # what runs each input shape set up so far
        # per input shape (C, *window): the callable that runs it and its static batch
        self._runtimes: dict[tuple[int, ...], tuple[Any, int | None]] = {}
        self._setup: dict[str, Any] = {"batch_size": 1, "streams": 1, "threads": None}
        self._warm_lock = threading.Lock()
        cuda = device.type == "cuda"
        if cuda and self.autocast_dtype is None:
            # cuDNN convolutions default to TF32 (10-bit mantissas), which breaks the 1e-4
            # exactness of fp32; bf16/fp16 are the fast paths that trade precision. For the
            # rest of the process (torch's flags are global).
            log.info("fp32 on %s: TF32 turned off for cuDNN and matmuls (exact fp32)", device)
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.asynchronous = cuda  # submit() returns before the results are ready
        self.copy_stream = torch.cuda.Stream(device) if cuda else None
        self.compute_stream = torch.cuda.Stream(device) if cuda else None

    @property
    def engine(self) -> str:
        """What runs the forward pass: ``"torch"`` (eager), ``"torch.compile"``,
        ``"openvino"``, or several joined by ``+`` when input shapes differ in it."""
        return "+".join(sorted(self._engines)) or "torch"

    @property
    def runtime_precision(self) -> str:
        """The precision the model really runs in: the one asked for, except that int8
        falls back to eager torch in float32."""
        if self.precision == "int8" and "torch" in self._engines:  # (openvino+torch: both)
            return "int8+fp32" if "openvino" in self._engines else "fp32"
        return self.precision

    @property
    def int8(self) -> dict[str, Any] | None:
        """For a model running in int8: its calibration and the check of its network
        against float32 (see :mod:`tilerseg.engine.int8`); None otherwise."""
        checks = [getattr(m, "check", None) for m, _ in self._runtimes.values()]
        checks = [c for c in checks if c]
        if not checks or self.calibration is None:
            return None
        return {"calibration": self.calibration()[1].describe(), "check": checks[0]}

    @property
    def compiled(self) -> bool:
        """Whether something faster than eager torch runs every input shape set up."""
        return "torch" not in self.engine.split("+")

    # -- set-up -----------------------------------------------------------------------

    @property
    def wants_runtime(self) -> bool:
        """Whether a runtime faster than eager torch was asked for."""
        return self.backend == "openvino" or self.compile_requested

    def warm_up(self, window: Sequence[int], in_channels: int, batch_size: int,
                streams: int = 1, threads: int | None = None) -> None:
        """Build the faster runtime asked for, for one input shape, checked against eager.

        With ``backend="openvino"`` the model is converted (or read from the cache) and
        compiled for ``(batch_size, in_channels, *window)``; with ``compile=True`` it is
        compiled by :func:`torch.compile` for that shape (freezing the weights on the
        CPU). Either is used only if its probabilities on a seeded random batch agree
        with eager torch at the same precision: within 1e-4 in fp32, and in bf16/fp16
        within twice eager torch's own deviation from fp32 plus 1e-3. Otherwise (or on
        any error) the next candidate is tried, and in the end eager torch runs, with a
        warning: a faster runtime never changes the output silently.

        Each input shape is set up once; a batch of a shape not set up beforehand is
        set up when it first arrives, with the batch size, streams and threads of the
        first call. Smaller batches are padded to the set-up batch size, so the last
        partial batch runs the same graph.

        Parameters
        ----------
        window : sequence of int
            The model's input window.
        in_channels : int
            Its input channels.
        batch_size : int
            Windows per forward pass.
        streams : int
            Threads that will call the replica at once (OpenVINO infer requests).
        threads : int, optional
            CPU threads for OpenVINO in all.
        """
        key = (int(in_channels), *(int(w) for w in window))
        with self._warm_lock:
            if not self._runtimes:
                self._setup = {"batch_size": batch_size, "streams": streams, "threads": threads}
            if key in self._runtimes:
                return
            self._runtimes[key] = self._fastest((batch_size, *key), streams, threads)

    def _fastest(self, shape: tuple[int, ...], streams: int, threads: int | None
                 ) -> tuple[Any, int | None]:
        """The first candidate runtime that passes the check, else eager torch."""
        candidates = []
        if self.backend == "openvino":
            candidates.append("openvino")
            if self.compile_requested:
                log.warning("compile applies to the torch backend; OpenVINO compiles the "
                            "model itself (use backend=torch to torch.compile it)")
        if self.compile_requested and self.backend == "torch":
            candidates.append("torch.compile")
        if not candidates:
            return self.model, None
        x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
        reference: list[Any] = []  # (eager probabilities, tolerance), computed when needed
        failures: list[str] = []
        for engine in candidates:
            start = time.perf_counter()
            try:
                fast_model = self._build(engine, shape, streams, threads)
                deviation = getattr(fast_model, "verified", None)  # checked when cached
                check = getattr(fast_model, "check", None)  # int8's, on real windows
                if check is not None:
                    how = (f"int8, checked on {check['windows']} calibration windows: labels "
                           f"agree with float32 on {check['agreement']:.3%} of the pixels; "
                           "mean probability deviation")
                elif deviation is None:
                    if not reference:
                        reference.extend(self._reference(x))
                    fast = self._probabilities(fast_model, x, static_batch=shape[0])
                    deviation = float((reference[0] - fast).abs().max())
                    if not deviation <= reference[1]:
                        failures.append(f"{engine} changed the probabilities by "
                                        f"{deviation:.2e} (allowed {reference[1]:.1e}) on "
                                        f"{self.device}")
                        log.warning("%s; %s", failures[-1], self._fallback)
                        continue
                    if hasattr(fast_model, "verify"):
                        fast_model.verify(deviation)
                    how = "max deviation from eager torch"
                else:
                    how = "checked against eager torch when it was cached: max deviation"
            except (NumericalError, InvalidArgumentError, InvalidImageError):
                raise  # the model's or the input's, not the runtime's
            except Exception as err:  # noqa: BLE001 - runtimes fail in many ways
                first = str(err).splitlines()[0] if str(err) else ""
                failures.append(f"{engine} failed on {self.device} ({type(err).__name__}: "
                                f"{first[:300]})")
                log.warning("%s; %s", failures[-1], self._fallback)
                continue
            self._engines.add(engine)
            log.info("%s runs the model on %s for input %s in %s (set up in %.2f s; %s "
                     "%.1e)", engine, self.device, list(shape), self.precision,
                     time.perf_counter() - start, how, deviation)
            return fast_model, shape[0]
        if strict_runtime():
            raise RuntimeFallbackError(f"{'; '.join(failures)}; {STRICT_RUNTIME}=1 forbids "
                                       "running torch eagerly")
        self._engines.add("torch")
        return self.model, None

    @property
    def _fallback(self) -> str:
        return "running torch eagerly" + (" in float32" if self.precision == "int8" else "")

    def _reference(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Eager probabilities of the check batch ``x`` and the deviation allowed from them:
        1e-4 in fp32; in bf16/fp16 twice eager's own deviation from fp32, plus 1e-3.

        Raises
        ------
        NumericalError
            Eager torch itself is not finite on the check batch (fp16 overflow): no runtime
            can be checked, and none would help."""
        eager = self._probabilities(self.model, x)
        if not bool(torch.isfinite(eager).all()):
            raise NumericalError(
                f"the model's output is not finite under precision={self.precision} (eager "
                "torch on a random check batch); the activations overflow: use "
                "precision=fp32 (or bf16)")
        if self.autocast_dtype is None:
            return eager, 1e-4
        exact = self._probabilities(self.model, x, autocast=False)
        return eager, 2 * float((eager - exact).abs().max()) + 1e-3

    def _runtime(self, x: torch.Tensor) -> tuple[Any, int | None]:
        """The model to run the batch ``x`` with, and the batch size it was built for."""
        if not self.wants_runtime:
            return self.model, None
        key = tuple(int(s) for s in x.shape[1:])
        entry = self._runtimes.get(key)
        if entry is None:
            setup = self._setup
            self.warm_up(key[1:], key[0], max(setup["batch_size"], x.shape[0]),
                         setup["streams"], setup["threads"])
            entry = self._runtimes[key]
        return entry

    def _build(self, engine: str, shape: tuple[int, ...], streams: int,
               threads: int | None) -> Any:
        if engine == "openvino":
            from .openvino_backend import openvino_forward

            int8 = {}
            if self.precision == "int8":
                if self.calibration is None:
                    raise ValueError("int8 needs calibration windows")
                geometry, calibration = self.calibration()
                int8 = {"geometry": geometry, "calibration": calibration}
            return openvino_forward(self.model, shape, self.precision, streams, threads,
                                    **int8)
        from .backends import torch_compile_cache

        cache = torch_compile_cache()
        log.info("torch.compile: compiled kernels are cached in %s", cache)
        options = {"freezing": True} if self.device.type == "cpu" else None
        return torch.compile(self.model, dynamic=False, options=options)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _probabilities(self, model: Any, x: torch.Tensor, autocast: bool = True,
                       static_batch: int | None = None) -> torch.Tensor:
        """Activated whole outputs of a host batch (for the runtime check)."""
        with torch.inference_mode():
            y = self._forward(x.to(self.device), (model, static_batch), autocast).float()
            y = torch.sigmoid(y) if y.shape[1] == 1 else torch.softmax(y, dim=1)
            return y.cpu()

    # -- inference --------------------------------------------------------------------

    def submit(self, x: torch.Tensor, tiles: Sequence[Tile]) -> _Pending:
        """Start inferring the host batch ``x`` (``(B, C, *window)`` float32) of ``tiles``."""
        with torch.inference_mode():
            if self.device.type == "cuda":
                with torch.cuda.device(self.device):
                    return self._submit_cuda(x, tiles)
            crops, finite = self._tile_probabilities(x.to(self.device), tiles)
            results = [c.cpu() for c in crops]  # .cpu(): no-op on the CPU
            return _Pending(tiles, results, finite=finite)

    def _tile_probabilities(self, x: torch.Tensor, tiles: Sequence[Tile]
                            ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The probabilities of each tile's crop of the device batch ``x`` (the mean over
        :attr:`views`, each output put back before it is cropped) and, under autocast,
        whether the logits of what is written are all finite (a NaN or infinite logit
        makes their sum so: cheaper than testing every logit), else None."""
        total: list[torch.Tensor] = []
        sums = []
        for view in self.views:
            y = view.undo(self._forward(view.apply(x) if len(self.views) > 1 else x))
            logits = [y[i][(slice(None),) + t.crop] for i, t in enumerate(tiles)]
            if self.autocast_dtype is not None:
                sums.append(torch.stack([c.float().sum() for c in logits]).sum())
            crops = [_activation(c) for c in logits]
            total = crops if not total else [a + b for a, b in zip(total, crops)]
        if len(self.views) > 1:
            total = [t / len(self.views) for t in total]
        return total, (torch.isfinite(torch.stack(sums).sum()) if sums else None)

    def _forward(self, x: torch.Tensor, runtime: tuple[Any, int | None] | None = None,
                 autocast: bool = True) -> torch.Tensor:
        """Logits of a device batch through ``runtime`` (default: the one for its shape).

        ``runtime`` is ``(model, static batch size or None)``.
        """
        planes = x.dim() == self.ndim + 3  # (B, C, 1, Y, X): single planes of a z-stack
        if planes:
            x = x[:, :, 0]
        model, static_batch = self._runtime(x) if runtime is None else runtime
        n = x.shape[0]
        if static_batch is not None and n > static_batch:  # built for smaller batches
            parts = [self._forward(x[k:k + static_batch], (model, static_batch), autocast)
                     for k in range(0, n, static_batch)]
            y = torch.cat(parts)
            return y[:, :, None] if planes else y
        if static_batch is not None and n < static_batch:
            # the last partial batch runs through the same compiled graph, padded
            x = torch.cat([x, x.new_zeros((static_batch - n, *x.shape[1:]))])
        if isinstance(model, nn.Module):  # eager or compiled torch
            if static_batch is not None:
                # compiled graphs are guarded on the input's strides and dispatch keys:
                # always give them a tensor made here alike (for one input channel, NCHW
                # and channels-last are both "contiguous", with different strides)
                x = x.clone(memory_format=self.fmt)
            else:
                x = x.contiguous(memory_format=self.fmt)
            context = self._autocast() if autocast else contextlib.nullcontext()
        else:  # OpenVINO: its own precision, the plain layout
            context = contextlib.nullcontext()
        with context:
            y = model(x)[:n]
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
            crops, all_finite = self._tile_probabilities(x_dev, tiles)
            results = []
            for probs in crops:
                host = torch.empty(probs.shape, dtype=probs.dtype, pin_memory=True)
                host.copy_(probs, non_blocking=True)
                results.append(host)
            finite = None
            if self.autocast_dtype is not None:
                finite = torch.empty((), dtype=torch.bool, pin_memory=True)
                finite.copy_(all_finite, non_blocking=True)
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
    backend: str = "torch",
    views: Sequence[View] | None = None,
) -> list[Replica]:
    """One :class:`Replica` per device; the first uses ``model`` itself, others copies."""
    replicas = []
    for k, dev in enumerate(devices):
        m = model if k == 0 else copy.deepcopy(model)
        replicas.append(Replica(m, dev, ndim, precision, compile, backend, views=views))
    return replicas

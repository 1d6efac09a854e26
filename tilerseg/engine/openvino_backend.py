"""The model as an OpenVINO network: converted once, cached on disk, compiled per run.

:func:`openvino_forward` turns a torch module into a callable with the module's own
signature (a float32 batch in, logits out) that runs on OpenVINO's CPU plugin. The
conversion (``openvino.convert_model``, seconds for a U-Net) is paid once per weights
and input shape: the converted network is saved, in float32, under
``cache_dir()/openvino`` and read back by later runs in a fraction of a second.

The network has a static input shape (one batch of one window), so OpenVINO optimises
for exactly that; a smaller last batch is padded with zeros and its padding dropped
from the output. Several infer requests run at once on separate CPU streams, one per
compute thread of the pipeline, each driving its own request (OpenVINO releases the
GIL while it infers).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import logging
import os
import queue
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .backends import cache_dir

__all__ = ["OpenVINOForward", "openvino_forward", "converted_model_path"]

log = logging.getLogger(__name__)

_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}  # int8: the rest in f32
_KEEP = 4  # compiled networks kept in this process, most recently used first
_COMPILED: OrderedDict[tuple, OpenVINOForward] = OrderedDict()
_COMPILED_LOCK = threading.Lock()


def converted_model_path(model: nn.Module, input_shape: Sequence[int]) -> Path:
    """Where the converted network of ``model`` for ``input_shape`` is cached.

    The key is :func:`cache_key` of the model and the input shape; anything else gets its
    own file.
    """
    digest = cache_key(model, shape=[int(s) for s in input_shape])
    shape = "x".join(str(int(s)) for s in input_shape)
    return cache_dir() / "openvino" / f"{digest}-{shape}.xml"


def cache_key(model: nn.Module, **more: Any) -> str:
    """A cached network's key: the SHA-256 (24 hex digits) of the weights' digest, the
    model's code, class and configuration, the OpenVINO and tilerseg versions, and
    ``more`` (JSON values: the input shape, the calibration...)."""
    import openvino

    from .. import __version__
    from ..models.checkpoint import weights_digest

    key = json.dumps({
        "weights": weights_digest(model),
        "code": _code_digest(model),
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": getattr(model, "config", None),
        "openvino": openvino.get_version(),
        "tilerseg": __version__,
        **more,
    }, sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:24]


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """No gradients, and none of torch's own deprecation warnings that torch.export and
    OpenVINO's PyTorch frontend raise (they are not the user's to see)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated")
        warnings.filterwarnings("ignore", r"`?torch\.jit\.\w+`? is deprecated")
        yield


def save_network(network: Any, path: Path) -> None:
    """Save ``network`` (in float32) as ``path`` (.xml) and its .bin, atomically: the
    weights first, so a reader that sees the .xml also finds its .bin.

    Raises
    ------
    Exception
        What saving raised (OpenVINO raises RuntimeError, the file system OSError);
        nothing is left behind.
    """
    import openvino

    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.xml")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        openvino.save_model(network, str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".bin").unlink(missing_ok=True)
        raise


def _code_digest(model: nn.Module) -> str:
    """SHA-256 of the source files defining every module class in ``model`` (the bytecode
    of its ``forward`` where there is no file): a network converted from other code is not
    reused, even with the same weights and configuration. Whole files, read as bytes:
    ``inspect.getsource`` parses each module, 0.14 s of a run's start-up."""
    parts = []
    for cls in sorted({type(m) for m in model.modules()}, key=lambda c: c.__qualname__):
        parts.append(f"{cls.__module__}.{cls.__qualname__}")
        parts.append(_class_code(cls))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@functools.lru_cache(maxsize=256)
def _class_code(cls: type) -> str:
    try:
        with open(inspect.getsourcefile(cls) or "", "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except (OSError, TypeError):
        forward = getattr(cls, "forward", None)
        code = getattr(forward, "__code__", None)
        return code.co_code.hex() if code is not None else ""


def _convert(model: nn.Module, input_shape: tuple[int, ...]) -> Any:
    """The OpenVINO network of ``model`` for one input shape: through :func:`torch.export`
    (an ``ExportedProgram``, which OpenVINO converts), or, for a TorchScript network or a
    model torch.export cannot capture, as OpenVINO converts it itself (TorchScript as it
    is; a module by tracing it, whose deprecation warnings are not the user's to see)."""
    import openvino

    example = torch.zeros(input_shape)
    with quiet_export():
        if not isinstance(model, torch.jit.ScriptModule):
            try:
                program = torch.export.export(model, (example,))
            except Exception as err:  # noqa: BLE001 - what export cannot capture, traced
                log.info("OpenVINO: torch.export could not capture %s (%s: %s); converting "
                         "it by tracing", type(model).__name__, type(err).__name__,
                         (str(err).splitlines() or [""])[0][:200])
            else:
                return openvino.convert_model(program, input=[input_shape])
        return openvino.convert_model(model, example_input=example, input=[input_shape])


def _cached_network(core: Any, model: nn.Module, input_shape: tuple[int, ...]
                    ) -> tuple[Any, Path]:
    """The converted network (from the cache when there, else converted and saved; a new
    conversion drops the checks recorded for an older one) and its cache path."""

    path = converted_model_path(model, input_shape)
    if path.is_file() and path.with_suffix(".bin").is_file():
        try:
            network = core.read_model(str(path))
            log.debug("OpenVINO: read the converted model from %s", path)
            return network, path
        except Exception as err:  # noqa: BLE001 - a damaged cache entry is rebuilt
            log.warning("OpenVINO: cannot read the cached model %s (%s); converting again",
                        path, err)
    path.with_suffix(".json").unlink(missing_ok=True)  # checks of an older network
    start = time.perf_counter()
    network = _convert(model, input_shape)
    log.info("OpenVINO: converted the model for input %s in %.1f s",
             list(input_shape), time.perf_counter() - start)
    try:
        save_network(network, path)
        log.info("OpenVINO: cached the converted model in %s", path)
    except Exception as err:  # noqa: BLE001 - OpenVINO raises RuntimeError; the run goes on
        log.warning("OpenVINO: cannot cache the converted model in %s (%s); the next run "
                    "converts it again", path.parent, err)
    return network, path


class OpenVINOForward:
    """A compiled OpenVINO network called like the torch module it came from.

    Parameters
    ----------
    compiled : openvino.CompiledModel
        The network compiled for the CPU.
    input_shape : tuple of int
        Its static input shape ``(batch, channels, *window)``.
    requests : int
        Infer requests, one per thread that will call it at the same time.

    Attributes
    ----------
    verified : float or None
        The largest probability deviation from eager torch found by the check when this
        network was first used at this precision (recorded beside the cached network),
        or None if it has not been checked yet.

    Notes
    -----
    Thread-safe: each call takes a free infer request (waiting for one if all are in
    use) and returns it when its output has been copied out.
    """

    def __init__(self, compiled: Any, input_shape: tuple[int, ...], requests: int,
                 record: Path | None = None, precision: str = "fp32") -> None:
        self.compiled, self.input_shape = compiled, input_shape
        self.record, self.requested = record, precision
        self.verified: float | None = None
        if record is not None:
            try:
                checks = json.loads(record.read_text())
                value = checks.get(precision)
                self.verified = float(value) if isinstance(value, (int, float)) else None
            except (OSError, ValueError, AttributeError):
                pass
        self.precision = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()  # f32...
        self.check: dict[str, Any] | None = None  # int8: the check against float32
        self.streams = int(compiled.get_property("NUM_STREAMS"))
        self._free: queue.Queue = queue.Queue()
        for _ in range(max(1, requests)):
            request = compiled.create_infer_request()
            # First use of a tensor's numpy view initialises static state in OpenVINO's
            # bindings, which deadlocks when two threads do it at once (each holds what
            # the other waits for: the GIL and a C++ static guard); do it here, once.
            _ = request.get_input_tensor(0).data, request.get_output_tensor(0).data
            self._free.put(request)

    def path_exists(self) -> bool:
        """Whether the cached network this was compiled from is still on disk (a cache
        folder emptied by the user is a reason to build everything again)."""
        return self.record is not None and self.record.with_suffix(".xml").is_file()

    def verify(self, deviation: float) -> None:
        """Record that the check against eager torch passed with ``deviation``, so later
        runs that read this network from the cache need not check it again."""
        self.verified = deviation
        if self.record is None:
            return
        try:
            checks = json.loads(self.record.read_text()) if self.record.is_file() else {}
            checks[self.requested] = deviation
            tmp = self.record.with_name(f".{self.record.name}.{os.getpid()}")
            tmp.write_text(json.dumps(checks))
            os.replace(tmp, self.record)
        except (OSError, ValueError) as err:
            log.debug("OpenVINO: cannot record the check in %s (%s)", self.record, err)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the batch ``x`` (at most the compiled batch size)."""
        n, batch = x.shape[0], self.input_shape[0]
        if tuple(x.shape[1:]) != self.input_shape[1:] or n > batch:
            raise ValueError(f"OpenVINO network compiled for {list(self.input_shape)}, "
                             f"given a batch of shape {list(x.shape)}")
        data = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        if n < batch:  # the last partial batch: same graph, padding dropped below
            data = np.concatenate([data, np.zeros((batch - n, *data.shape[1:]), np.float32)])
        request = self._free.get()
        try:
            request.infer({0: data})
            out = np.array(request.get_output_tensor(0).data[:n], dtype=np.float32, copy=True)
        finally:
            self._free.put(request)
        return torch.from_numpy(out)


def openvino_forward(
    model: nn.Module,
    input_shape: Sequence[int],
    precision: str = "fp32",
    streams: int = 1,
    threads: int | None = None,
    *,
    geometry: Any = None,
    calibration: Any = None,
) -> OpenVINOForward:
    """Convert (or read from the cache) and compile ``model`` for OpenVINO's CPU plugin.

    Parameters
    ----------
    model : torch.nn.Module
        The model, in eval mode, on the CPU.
    input_shape : sequence of int
        ``(batch, channels, *window)`` of every call.
    precision : {"fp32", "bf16", "fp16", "int8"}
        Inference precision; bf16 uses the CPU's bfloat16 units (AVX-512 bf16, AMX) and
        is computed in float32 by OpenVINO on CPUs without them. int8 runs the network
        quantised on ``calibration`` (see :mod:`tilerseg.engine.int8`), its convolutions
        in 8-bit integers (an error if none is).
    streams : int
        CPU streams (infer requests running at once): one per calling thread.
    threads : int, optional
        CPU threads in all (split between the streams); OpenVINO's default otherwise.
    geometry, calibration : ModelGeometry, Calibration
        For int8: the model's geometry and the calibration to quantise it on.

    Returns
    -------
    OpenVINOForward
        Its ``verified`` is set if this network was checked at this precision when it
        was cached (see :meth:`OpenVINOForward.verify`); for int8 it is the check's mean
        probability deviation, and ``check`` holds the whole check.
    """
    import openvino

    shape = tuple(int(s) for s in input_shape)
    int8 = precision == "int8"
    if int8:
        from .int8 import network_path

        if calibration is None or geometry is None:
            raise ValueError("int8 needs the model's geometry and a calibration")
        path = network_path(model, calibration)
    else:
        path = converted_model_path(model, shape)
    key = (str(path), shape, precision, streams, threads)
    with _COMPILED_LOCK:
        forward = _COMPILED.get(key)
        if forward is not None and forward.path_exists():
            _COMPILED.move_to_end(key)
            return forward
    core = openvino.Core()
    check = None
    if int8:
        from .int8 import quantized_network

        network, check = quantized_network(model, geometry, calibration)
        network.reshape({0: shape})
    else:
        network, path = _cached_network(core, model, shape)
    config = {
        "INFERENCE_PRECISION_HINT": _HINTS[precision],
        "PERFORMANCE_HINT": "THROUGHPUT" if streams > 1 else "LATENCY",
        "NUM_STREAMS": str(streams),
    }
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    # OpenVINO pins its stream threads to cores counted from the first one, so the single
    # stream of each of two worker processes (or shards) on one machine land on the same
    # core: 0.077 s against 0.037 s per forward, two such processes at once on 2 cores;
    # a single process ran as fast unpinned (benchmarks in docs/benchmarks.md)
    config["ENABLE_CPU_PINNING"] = "NO"
    start = time.perf_counter()
    compiled = core.compile_model(network, "CPU", config)
    actual = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
    if actual != _HINTS[precision]:  # e.g. no bf16/fp16 units: OpenVINO picks another
        raise RuntimeError(f"OpenVINO computes this network in {actual} on this CPU, not "
                           f"in {_HINTS[precision]}")
    record = path.with_suffix(".json") if path.is_file() else None
    forward = OpenVINOForward(compiled, shape, streams, record, precision)
    if int8:
        from .int8 import int8_convolutions

        quantized, count = int8_convolutions(compiled)
        if not quantized:
            raise RuntimeError(f"OpenVINO runs none of the {count} convolutions in int8 on "
                               "this CPU")
        forward.precision = "int8"
        forward.check = {**check, "int8_convolutions": [quantized, count]}
        forward.verified = float(check["mean_deviation"])
    log.info("OpenVINO: compiled for %s, %s, %d stream(s), in %.2f s", list(shape),
             forward.precision, forward.streams, time.perf_counter() - start)
    if record is not None:  # reused by later calls in this process (e.g. one per image)
        with _COMPILED_LOCK:
            _COMPILED[key] = forward
            while len(_COMPILED) > _KEEP:
                _COMPILED.popitem(last=False)
    return forward

"""``tilerseg info``: what an image is and what segmenting it would take."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from .engine.device import default_workers
from .engine.options import run_options
from .engine.prepare import prepare
from .errors import InvalidImageError
from .io.readers import open_image
from .io.remote import PATHS
from .models.probe import eval_mode, meta_state

__all__ = ["describe", "activation_bytes", "describe_machine"]


def activation_bytes(model: nn.Module, window: Sequence[int], in_channels: int) -> int:
    """Bytes of every layer output of one forward pass on one window, in float32.

    Measured on the meta device (no memory used). Tensors are freed as the forward goes,
    so this is an upper bound on one tile's working memory.
    """
    total = 0

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * 4

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    state = meta_state(model)
    try:
        with torch.no_grad(), eval_mode(model):
            functional_call(model, state, (torch.empty((1, in_channels, *window), device="meta"),))
    finally:
        for h in handles:
            h.remove()
    return total


def _resident_bytes() -> int:
    """Peak resident memory of this process so far (libraries and model loaded)."""
    import sys

    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB else


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def describe(
    image: Any,
    model: nn.Module,
    *,
    tile: int | None = None,
    level: int = 0,
    channel: Sequence[int] | None = None,
    device: str = "auto",
) -> str:
    """A human-readable description of ``image`` and of the run that would segment it.

    Parameters
    ----------
    image : path or array
        Anything :func:`tilerseg.segment_to_zarr` accepts.
    model : torch.nn.Module
        The model the plan is for.
    tile, level, channel, device
        As for :func:`tilerseg.segment_to_zarr`.

    Returns
    -------
    str
        Several lines: source, shape, axes, dtype, levels, pixel size, tile plan, and
        estimates of peak memory and output size.
    """
    options = run_options(tile=tile, device=device, normalize="none", level=level,
                          channel=channel)
    try:
        p = prepare(image, model, options)
    except InvalidImageError as err:  # e.g. channels to pick: the image is still described
        source = open_image(image, level) if isinstance(image, PATHS) else None
        if source is None:
            raise
        return "\n".join([*_image_lines(source), f"run         refused as it is: {err}",
                          describe_machine()])
    s, g, plan = p.source, p.geometry, p.plan
    workers = default_workers(p.device, p.model_geometry.ndim)
    window_in = int(np.prod(plan.window)) * g.in_channels * 4
    model_window = p.runner.model_window  # without the plane axis of a z-stack
    scripted = any(isinstance(m, torch.jit.ScriptModule) for m in model.modules())
    per_tile = window_in + (0 if scripted  # a TorchScript network cannot be hooked
                            else activation_bytes(model, model_window, g.in_channels))
    params = sum(t.numel() * t.element_size() for t in model.parameters())
    baseline = _resident_bytes()
    pixels = int(np.prod(plan.image_shape))
    probs = pixels * g.out_channels * 4 / 3  # uint8 probabilities with the pyramid levels
    lines = [
        *_image_lines(s),
        f"model input {p.view.shape} (channels {p.view.channels})",
        f"geometry    halo {g.halo}, pooling step {g.step}, admissible sides "
        f"{g.admissible_inputs(3, axis=g.ndim - 1)}...",
        f"plan        {len(plan)} tiles of {plan.tile} in a {plan.grid} grid, "
        f"windows {plan.window}",
        f"memory      at most about {_size(baseline + workers * per_tile)} peak: this process "
        f"now {_size(baseline)} (libraries, model {_size(params)}) + {workers} tiles in "
        f"flight x {_size(per_tile)} "
        + ("(the input window only: a TorchScript network's layers are not measured)"
           if scripted else "(upper bound per tile)"),
        f"output      {_size(probs)} of uint8 probabilities with pyramid, before compression "
        f"({_size(pixels * 4 / 3)} more for labels)",
        describe_machine(),
    ]
    return "\n".join(lines)


def _image_lines(s: Any) -> list[str]:
    """What an opened image is: source, shape, axes, dtype, levels, pixel size."""
    pixel = ", ".join(f"{a} {v:g} um" for a, v in s.pixel_size.items()) or "unknown"
    levels = "; ".join(f"{k}: {tuple(shape)}" for k, shape in enumerate(s.levels or [s.shape]))
    return [f"source      {s.path or s.format} ({s.format})",
            f"shape       {s.shape}, axes {s.axes!r}, dtype {s.dtype}",
            f"levels      {levels} (using {s.level})",
            f"pixel size  {pixel}"]


def describe_machine() -> str:
    """What this machine offers the forward pass: GPUs, CPU bf16 units, runtimes.

    Returns
    -------
    str
        Lines starting ``compute``: the GPUs (and whether they compute bf16 natively),
        the CPU's cores, vector kernels and bfloat16 units, which runtime
        ``backend="auto"`` picks on the CPU, and its int8 units and whether int8 can run.
    """
    from .engine.backends import cpu_features, resolve_backend
    from .engine.cores import available_cores
    from .engine.int8 import int8_available

    f = cpu_features()
    lines = []
    if torch.cuda.is_available():
        for k in range(torch.cuda.device_count()):
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            lines.append(f"GPU {k}: {torch.cuda.get_device_name(k)}, bf16 "
                         f"{'native: --precision bf16 is the fast path' if bf16 else 'no: use fp16'}")
    units = [name for name, key in (("AVX-512 bf16", "avx512_bf16"), ("AMX", "amx_bf16"))
             if f[key]]
    bf16 = (f"bf16 units ({', '.join(units)}): --precision bf16 is the fast path" if units
            else "no bf16 units (bf16 would be emulated, slower than fp32)")
    runtime = ("OpenVINO installed: backend auto = openvino" if f["openvino"] else
               "OpenVINO not installed (pip install 'tilerseg[openvino]'): backend auto = "
               + resolve_backend("auto", "cpu"))
    lines.append(f"CPU: {available_cores()} core(s), {str(f['torch']).lower()} kernels, {bf16}")
    lines.append(runtime)
    units = [name for name, key in (("AVX-512 VNNI", "avx512_vnni"), ("AVX-VNNI", "avx_vnni"),
                                    ("AMX", "amx_int8")) if f[key]]
    have = f"int8 units ({', '.join(units)})" if units else "no int8 dot-product units"
    nncf = ("--precision int8 runs (NNCF installed)" if int8_available() else
            "pip install 'tilerseg[int8]' for --precision int8")
    lines.append(f"{have}: {nncf}")
    return "\n".join(("compute     " if k == 0 else "            ") + line
                     for k, line in enumerate(lines))

"""Derive a model's tiling geometry from the model itself, on the meta device.

The model is run on shape-only ``meta`` tensors of increasing side ``n`` (no memory, no
arithmetic, the real weights untouched). A forward pre-hook on every downsampling layer
(strided convolution or pooling) checks arithmetically that it divides its input
exactly: PyTorch pooling floors odd sizes silently, so a size that runs is not
necessarily admissible. The first admissible sides give the pooling step and the
smallest admissible input (walked further down per axis with the other axes fixed, for
models that pool some axes less than others); input minus output gives the shrink, hence the halo of a
valid-convolution model. The halo of a same-padded model (no shrink) is its receptive
field radius, measured on a positive linear surrogate (see :func:`receptive_field_radius`)
unless the model states it as ``model.halo``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import weakref
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn
from torch.func import functional_call

from ..errors import InvalidModelError
from ..geometry import ModelGeometry

__all__ = ["model_geometry", "eval_mode", "meta_state", "trust_geometry"]

log = logging.getLogger(__name__)

_CACHE: "weakref.WeakKeyDictionary[nn.Module, ModelGeometry]" = weakref.WeakKeyDictionary()
_DOWNSAMPLING = (
    nn.modules.conv._ConvNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._LPPoolNd,
)
_MAX_SIDE = 1 << 15
_AVERAGE_POOL = {nn.MaxPool1d: nn.AvgPool1d, nn.MaxPool2d: nn.AvgPool2d, nn.MaxPool3d: nn.AvgPool3d}


class _Result(NamedTuple):
    shape: tuple[int, ...]
    channels: int
    floored: tuple[bool, ...]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore each module's mode after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def meta_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Shape-only copies of the model's parameters and buffers, for ``functional_call``."""
    return {k: torch.empty_like(v, device="meta")
            for k, v in [*model.named_parameters(), *model.named_buffers()]}


def _per_axis(value: object, ndim: int) -> tuple[int, ...]:
    if isinstance(value, str):  # conv padding "valid"/"same"; "same" only exists for stride 1
        return (0,) * ndim
    if isinstance(value, int):
        return (value,) * ndim
    return tuple(int(v) for v in value)


def _spatial_contract(model: nn.Module) -> tuple[int, int]:
    """(ndim, in_channels) from the model's attributes or its first convolution."""
    ndim, cin = getattr(model, "ndim", None), getattr(model, "in_channels", None)
    if isinstance(ndim, int) and isinstance(cin, int):
        return ndim, cin
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return len(m.kernel_size), m.in_channels
    raise InvalidModelError(
        f"cannot derive a geometry for {type(model).__name__}: it has no convolution and "
        "no ndim / in_channels attributes"
    )


class _Floored(Exception):
    """Raised by the pooling hook to stop a forward that is already inadmissible."""


class _Prober:
    """Runs one model on meta tensors and records floored downsampling per axis."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.ndim, self.cin = _spatial_contract(model)
        self.state = meta_state(model)
        self.floored = [False] * self.ndim
        self.stop_when_floored = False
        self.runs: dict[int, _Result | None] = {}

    def _hook(self, module: nn.Module, args: tuple) -> None:
        if getattr(module, "transposed", False):
            return
        nd = self.ndim
        k = _per_axis(module.kernel_size, nd)
        s = _per_axis(module.stride if module.stride is not None else module.kernel_size, nd)
        p = _per_axis(getattr(module, "padding", 0), nd)
        d = _per_axis(getattr(module, "dilation", 1), nd)
        for a, size in enumerate(args[0].shape[-nd:]):
            if s[a] > 1 and (size + 2 * p[a] - d[a] * (k[a] - 1) - 1) % s[a]:
                self.floored[a] = True
        if self.stop_when_floored and all(self.floored):
            raise _Floored

    def run(self, n: int | tuple[int, ...], stop_when_floored: bool = False) -> _Result | None:
        """Output shape, output channels and per-axis flooring for side ``n`` on every
        axis (or the spatial shape ``n``).

        Returns None when the model cannot run on side ``n`` (too small for some layer),
        and, with ``stop_when_floored``, as soon as every axis has been floored.
        """
        self.floored = [False] * self.ndim
        self.stop_when_floored = stop_when_floored
        handles = [
            m.register_forward_pre_hook(self._hook)
            for m in self.model.modules()
            if isinstance(m, _DOWNSAMPLING)
        ]
        shape = (n,) * self.ndim if isinstance(n, int) else tuple(n)
        x = torch.empty((1, self.cin) + shape, device="meta")
        try:
            with torch.no_grad(), eval_mode(self.model):
                y = functional_call(self.model, self.state, (x,))
        except Exception:  # _Floored, or too small for some layer
            return None
        finally:
            for h in handles:
                h.remove()
        if not isinstance(y, torch.Tensor) or y.ndim != self.ndim + 2:
            raise InvalidModelError(
                f"{type(self.model).__name__} must return one tensor (N, C, *spatial) "
                f"with {self.ndim} spatial axes"
            )
        return _Result(tuple(y.shape[2:]), int(y.shape[1]), tuple(self.floored))

    def admissible(self, n: int, axis: int) -> _Result | None:
        """The run at side ``n`` if it is admissible on ``axis``, else None."""
        if n not in self.runs:  # inputs are isotropic: one run answers for every axis
            self.runs[n] = self.run(n, stop_when_floored=True)
        r = self.runs[n]
        return r if r is not None and not r.floored[axis] and r.shape[axis] >= 1 else None


def _probe(model: nn.Module) -> ModelGeometry:
    prober = _Prober(model)
    nd = prober.ndim
    n = 1  # the first power of two that runs to the end, floored or not
    while n <= _MAX_SIDE and prober.run(n) is None:
        n *= 2
    if n > _MAX_SIDE:
        raise InvalidModelError(
            f"{type(model).__name__} does not run on any input side up to {_MAX_SIDE}"
        )
    step, min_input, shrink, out_channels = [], [], [], 0
    for a in range(nd):
        # the next three admissible sides give the step and check it is regular
        found: list[tuple[int, _Result]] = []
        side = n
        while len(found) < 3 and side <= 8 * n:
            r = prober.admissible(side, a)
            if r is not None:
                found.append((side, r))
            side += 1
        if len(found) < 3:
            raise InvalidModelError(
                f"no admissible input sides found for {type(model).__name__} near {n}"
            )
        (n1, r1), (n2, r2), (n3, r3) = found
        k = n1 - r1.shape[a]
        if n3 - n2 != n2 - n1 or not k == n2 - r2.shape[a] == n3 - r3.shape[a] or k % 2:
            raise InvalidModelError(
                f"{type(model).__name__} has irregular size arithmetic on axis {a}: inputs "
                f"{n1}, {n2}, {n3} give outputs {r1.shape[a]}, {r2.shape[a]}, {r3.shape[a]}"
            )
        s = n2 - n1
        while n1 - s >= 1 and prober.admissible(n1 - s, a) is not None:
            n1 -= s  # walk down to the smallest admissible side
        step.append(s)
        min_input.append(n1)
        shrink.append(k)
        out_channels = r1.channels
    for a in range(nd):
        # an axis pooled less than the others (anisotropic pooling) admits sides too small
        # for the others: walk it further down with the others at their smallest sides
        while min_input[a] - step[a] >= 1:
            shape = list(min_input)
            shape[a] -= step[a]
            r = prober.run(tuple(shape))
            if (r is None or r.floored[a] or r.shape[a] < 1
                    or shape[a] - r.shape[a] != shrink[a]):
                break
            min_input[a] = shape[a]
    geometry = ModelGeometry(nd, prober.cin, out_channels, tuple(step), tuple(min_input),
                             tuple(shrink), tuple(k // 2 for k in shrink))
    if any(k == 0 for k in shrink):
        geometry = dataclasses.replace(geometry, halo=tuple(_same_padding_halo(model, geometry)))
    return geometry


def _same_padding_halo(model: nn.Module, geometry: ModelGeometry) -> list[int]:
    """Halo of a model whose output is as large as its input (same padding)."""
    stated = getattr(model, "halo", None)
    if stated is not None:
        return [max(h, s) for h, s in zip(geometry.halo, _per_axis(stated, geometry.ndim))]
    return [max(h, r) for h, r in zip(geometry.halo, receptive_field_radius(model, geometry))]


def _positive_surrogate(model: nn.Module) -> nn.Module:
    """A float64 CPU copy whose dependency support equals the model's receptive field.

    Every weight becomes ``1 / fan_in`` and every bias 0, batch norm becomes the
    identity and max pooling becomes average pooling. Fed a positive input, every
    activation is then positive, so ReLU-like layers pass everything, and the gradient
    of an output is positive exactly where that output depends on the input: no
    cancellation or dead unit can hide a dependency.
    """
    surrogate = copy.deepcopy(model).to(device="cpu", dtype=torch.float64)
    for module in list(surrogate.modules()):
        for name, child in module.named_children():
            if type(child) in _AVERAGE_POOL:
                pool = _AVERAGE_POOL[type(child)](child.kernel_size, child.stride, child.padding)
                setattr(module, name, pool)
    with torch.no_grad():
        for m in surrogate.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
                m.reset_running_stats()
            for name, p in m.named_parameters(recurse=False):
                if name == "weight" and p.ndim > 1:
                    p.fill_(1.0 / max(1, p[0].numel()))
                elif name == "weight":
                    p.fill_(1.0)
                else:
                    p.zero_()
    return surrogate.eval()


def receptive_field_radius(model: nn.Module, geometry: ModelGeometry) -> list[int]:
    """Measure, per axis, how far an output block's dependencies reach into the input.

    An output block of one pooling step, aligned on the pooling grid, is placed in the
    middle of an input long enough that its dependencies stay clear of the border; the
    gradient of its sum in :func:`_positive_surrogate` marks every input pixel it depends
    on. For a same-padded model the returned radius is the halo: zero padding cannot
    reach a kept pixel that has this much context.
    """
    with torch.enable_grad():  # also when called under no_grad
        return _radius(_positive_surrogate(model), model, geometry)


def _radius(surrogate: nn.Module, model: nn.Module, geometry: ModelGeometry) -> list[int]:
    nd, radius = geometry.ndim, []
    for axis in range(nd):
        side = max(8 * geometry.step[axis], geometry.min_input[axis])
        while True:
            side = geometry.admissible_input(side, axis)
            shape = [geometry.admissible_input(1, a) for a in range(nd)]
            shape[axis] = side
            x = torch.ones((1, geometry.in_channels, *shape), dtype=torch.float64,
                           requires_grad=True)
            y = surrogate(x)
            off = geometry.crop_offset(axis) - geometry.halo[axis]  # output index of input 0
            start = (side // 2 // geometry.step[axis]) * geometry.step[axis]
            block = [slice(None)] * y.ndim
            block[2 + axis] = slice(start + off, start + off + geometry.step[axis])
            (grad,) = torch.autograd.grad(y[tuple(block)].sum(), x)
            others = tuple(a for a in range(grad.ndim) if a != 2 + axis)
            support = torch.nonzero(grad.abs().amax(dim=others) > 0).flatten()
            lo, hi = int(support.min()), int(support.max())
            if lo > 0 and hi < side - 1:
                radius.append(max(start - lo, hi - (start + geometry.step[axis] - 1)))
                break
            if side > _MAX_SIDE:
                raise InvalidModelError(
                    f"the receptive field of {type(model).__name__} exceeds {_MAX_SIDE} px"
                )
            side *= 2
    return radius


def model_geometry(model: nn.Module) -> ModelGeometry:
    """The tiling geometry of a fully convolutional model, derived from the model.

    Parameters
    ----------
    model : torch.nn.Module
        A model taking ``(N, C, *spatial)``. Results are cached per model object.

    Returns
    -------
    ModelGeometry
        Pooling step, smallest admissible input, shrink and halo per axis, and the
        channel counts.

    Examples
    --------
    >>> from tilerseg import create_model
    >>> g = model_geometry(create_model("unet"))
    >>> g.step, g.halo, g.output_size(572), g.admissible_inputs(3)
    ((16, 16), (92, 92), 388, [188, 204, 220])
    """
    geometry = _CACHE.get(model)
    if geometry is None:
        geometry = _probe(model)
        _CACHE[model] = geometry
        log.debug("geometry of %s: %s", type(model).__name__, geometry)
    return geometry


def trust_geometry(model: nn.Module, geometry: ModelGeometry) -> bool:
    """Adopt a recorded geometry for ``model`` after a cheap check, instead of probing.

    Model files record their geometry when saved. On loading, two real forward passes
    at the two smallest admissible inputs (a few milliseconds for a U-Net: 188 and 204
    px give 4 and 20 px for the paper's network) must produce the recorded output sizes
    and channel count; then :func:`model_geometry` returns the record without the
    meta-device probe (which costs about a second per process, mostly importing sympy).

    Parameters
    ----------
    model : torch.nn.Module
        The model, on the CPU.
    geometry : ModelGeometry
        The recorded geometry.

    Returns
    -------
    bool
        Whether the record was adopted (False: the check failed, logged; the model will
        be probed as usual when its geometry is needed).
    """
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    try:
        with torch.no_grad(), eval_mode(model):
            for k in range(2):
                shape = tuple(m + k * s for m, s in zip(geometry.min_input, geometry.step))
                out = model(torch.zeros((1, geometry.in_channels, *shape), device=device))
                expected = (1, geometry.out_channels,
                            *(n - d for n, d in zip(shape, geometry.shrink)))
                if tuple(out.shape) != expected:
                    raise InvalidModelError(f"input {list(shape)} gave {list(out.shape)}, "
                                            f"expected {list(expected)}")
    except Exception as err:  # noqa: BLE001 - any failure means: probe instead
        log.warning("the model's recorded geometry does not hold (%s); probing it", err)
        return False
    _CACHE[model] = geometry
    return True

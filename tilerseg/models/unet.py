"""The U-Net family (Ronneberger et al. 2015), 2D and 3D, valid or same padding.

Geometry: with ``depth`` poolings of per-axis factors ``f[level][axis]`` the pooling step
on an axis is the product of its factors (``2**depth`` for the default isotropic 2x2
pooling); a valid model loses 4 px per level at that level's resolution on the way down,
at the bottom and on the way up (``12 * 2**depth - 8`` px for isotropic pooling, halo 92
for the paper's depth 4); a same-padded model keeps its input size and its halo is its
receptive-field radius.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidModelError

__all__ = ["UNet", "pool_factors", "he_init", "center_crop"]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INTERP = {2: "bilinear", 3: "trilinear"}


def center_crop(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Crop the spatial axes of ``x`` to ``shape`` around the centre."""
    index = [slice(None), slice(None)]
    for have, want in zip(x.shape[2:], shape):
        lo = (have - want) // 2
        index.append(slice(lo, lo + want))
    return x[tuple(index)]


class _ConvBlock(nn.Sequential):
    """Two 3x3 convolutions, each followed by optional batch norm and ReLU."""

    def __init__(self, ndim: int, cin: int, cout: int, padding: int, batch_norm: bool) -> None:
        layers: list[nn.Module] = []
        for c in (cin, cout):
            layers.append(_CONV[ndim](c, cout, 3, padding=padding, bias=not batch_norm))
            if batch_norm:
                layers.append(_NORM[ndim](cout))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class _Up(nn.Module):
    """Up-sample by ``factor`` per axis (2 by default) and change the channels.

    ``"transpose"`` is the paper's 2x2 up-convolution (kernel = stride = factor).
    ``"bilinear"`` interpolates with ``align_corners=False`` (translation-equivariant,
    unlike ``align_corners=True``) and then applies a 1x1 convolution; in valid mode the
    outermost ``factor // 2`` interpolated pixels on each side of every up-sampled axis,
    which interpolation clamps at the border, are cropped so the network stays free of
    border effects (1 px for a factor of 2, none on an axis with factor 1).
    """

    def __init__(self, ndim: int, cin: int, cout: int, mode: str, valid: bool,
                 factor: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.mode = _INTERP[ndim] if mode == "bilinear" else None
        self.valid = valid
        self.factor = tuple(factor) if factor is not None else (2,) * ndim
        if self.mode is None:
            self.conv = _CONV_T[ndim](cin, cout, self.factor, stride=self.factor)
        else:
            self.conv = _CONV[ndim](cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is None:
            return self.conv(x)
        x = F.interpolate(x, scale_factor=tuple(float(f) for f in self.factor), mode=self.mode,
                          align_corners=False)
        if self.valid:
            x = x[(slice(None), slice(None))
                  + tuple(slice(f // 2, x.shape[2 + a] - f // 2) for a, f in enumerate(self.factor))]
        return self.conv(x)


class UNet(nn.Module):
    """U-Net of Ronneberger et al. (2015) and its common variants.

    The default is the paper's network: depth 4, 64 base channels, valid 3x3
    convolutions, 2x2 max pooling and 2x2 up-convolutions, mapping a 572 x 572 input to
    a 388 x 388 output. The tiling geometry is derived from the module itself by
    :func:`tilerseg.models.model_geometry`.

    Parameters
    ----------
    in_channels : int
        Input channels.
    num_classes : int
        Output channels (logits). One class means a sigmoid output, more a softmax.
    depth : int
        Number of poolings (the pooling step is ``2**depth`` with the default ``pool``).
    base_channels : int
        Channels of the first level; each level doubles them.
    padding : {"valid", "same"}
        Valid convolutions (output smaller than input, no border effects) or zero-padded
        ones (output as large as input).
    batch_norm : bool
        Batch normalisation after every convolution.
    dropout : float
        Dropout probability at the end of the contracting path (0 disables it).
    up : {"transpose", "bilinear"}
        Up-sampling by transposed convolution or by interpolation plus a 1x1 convolution.
    ndim : {2, 3}
        Spatial dimensions: 2 for images, 3 for volumes.
    pool : int or list of list of int
        Pooling factor of every level on every axis (default 2: the paper's 2x2 pooling),
        or one list of ``ndim`` factors per level (``depth`` lists, top level first), e.g.
        ``[[1, 2, 2], [1, 2, 2], [2, 2, 2]]`` for a stack whose planes are further apart
        than its pixels. Up-sampling mirrors the pooling level by level. The pooling step
        on an axis is the product of its factors.

    Examples
    --------
    >>> import torch
    >>> net = UNet(base_channels=4)
    >>> net(torch.zeros(1, 1, 572, 572)).shape
    torch.Size([1, 2, 388, 388])
    """

    registry_name = "unet"

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        depth: int = 4,
        base_channels: int = 64,
        padding: str = "valid",
        batch_norm: bool = False,
        dropout: float = 0.0,
        up: str = "transpose",
        ndim: int = 2,
        pool: int | list[list[int]] = 2,
    ) -> None:
        super().__init__()
        check_family(in_channels=in_channels, num_classes=num_classes, depth=depth,
                     base_channels=base_channels, padding=padding, up=up, ndim=ndim,
                     batch_norm=batch_norm)
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise InvalidModelError(f"dropout={dropout!r} must be a number in [0, 1)")
        factors = pool_factors(pool, depth, ndim)
        self.config: dict[str, Any] = dict(
            in_channels=in_channels,
            num_classes=num_classes,
            depth=depth,
            base_channels=base_channels,
            padding=padding,
            batch_norm=batch_norm,
            dropout=float(dropout),
            up=up,
            ndim=ndim,
            pool=pool if isinstance(pool, int) else [list(f) for f in factors],
        )
        self.in_channels, self.num_classes, self.ndim = in_channels, num_classes, ndim
        self.depth = depth
        pad = 0 if padding == "valid" else 1
        widths = [base_channels * 2**level for level in range(depth + 1)]

        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.down.append(_ConvBlock(ndim, cin, w, pad, batch_norm))
            cin = w
        self.pool = nn.ModuleList(_POOL[ndim](f, stride=f) for f in factors)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.ModuleList()
        self.decode = nn.ModuleList()
        for w_low, w, f in zip(widths[:0:-1], widths[-2::-1], factors[::-1]):
            self.up.append(_Up(ndim, w_low, w, up, padding == "valid", f))
            self.decode.append(_ConvBlock(ndim, 2 * w, w, pad, batch_norm))
        self.head = _CONV[ndim](widths[0], num_classes, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He initialisation: weights ~ N(0, 2 / incoming connections), biases 0."""
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, in_channels, *spatial)`` to logits ``(N, num_classes, *spatial_out)``."""
        skips = []
        for block, pool in zip(self.down[:-1], self.pool):
            x = block(x)
            skips.append(x)
            x = pool(x)
        x = self.dropout(self.down[-1](x))
        for up, block, skip in zip(self.up, self.decode, reversed(skips)):
            x = up(x)
            x = block(torch.cat([center_crop(skip, x.shape[2:]), x], dim=1))
        return self.head(x)


def he_init(model: nn.Module) -> None:
    """He initialisation of every convolution of ``model``: weights ~ N(0, 2 / incoming
    connections), biases 0; batch norm to the identity."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            taps = math.prod(m.kernel_size)
            if m.transposed:  # each output receives taps / stride**ndim per input channel
                fan_in = m.in_channels * taps // math.prod(m.stride)
            else:
                fan_in = m.in_channels // m.groups * taps
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_in))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def pool_factors(pool: object, depth: int, ndim: int) -> list[tuple[int, ...]]:
    """Per-level, per-axis pooling factors of a ``pool`` argument (see :class:`UNet`).

    Raises
    ------
    InvalidModelError
        Not a positive integer, or not ``depth`` lists of ``ndim`` positive integers.

    Examples
    --------
    >>> pool_factors(2, 2, 2)
    [(2, 2), (2, 2)]
    >>> pool_factors([[1, 2, 2], [2, 2, 2]], 2, 3)
    [(1, 2, 2), (2, 2, 2)]
    """
    def positive(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if positive(pool):
        return [(int(pool),) * ndim for _ in range(depth)]
    if (isinstance(pool, (list, tuple)) and len(pool) == depth
            and all(isinstance(f, (list, tuple)) and len(f) == ndim and all(map(positive, f))
                    for f in pool)):
        return [tuple(int(v) for v in f) for f in pool]
    raise InvalidModelError(
        f"pool={pool!r} must be a positive integer or {depth} lists (one per level, "
        f"depth={depth}) of {ndim} positive integers"
    )


def check_family(*, in_channels: object, num_classes: object, depth: object,
                 base_channels: object, padding: object, up: object, ndim: object,
                 **flags: object) -> None:
    """Check the arguments the U-Net family shares (and boolean ``flags``), naming the
    first that is not usable (:class:`InvalidModelError`)."""
    _check_int("in_channels", in_channels, 1)
    _check_int("num_classes", num_classes, 1)
    _check_int("depth", depth, 1)
    _check_int("base_channels", base_channels, 1)
    _check_choice("padding", padding, ("valid", "same"))
    _check_choice("up", up, ("transpose", "bilinear"))
    _check_choice("ndim", ndim, (2, 3))
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise InvalidModelError(f"{name}={value!r} must be True or False")


def _check_int(name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise InvalidModelError(f"{name}={value!r} must be an integer >= {low}")


def _check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices or isinstance(value, bool):
        raise InvalidModelError(f"{name}={value!r} must be one of {', '.join(map(repr, choices))}")

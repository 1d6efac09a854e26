"""The U-Net family (Ronneberger et al. 2015), 2D and 3D, valid or same padding."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidModelError

__all__ = ["UNet"]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INTERP = {2: "bilinear", 3: "trilinear"}


def _center_crop(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
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
    """Double the resolution and halve the channels.

    ``"transpose"`` is the paper's 2x2 up-convolution. ``"bilinear"`` interpolates with
    ``align_corners=False`` (translation-equivariant, unlike ``align_corners=True``) and
    then applies a 1x1 convolution; in valid mode the outermost interpolated pixel on each
    side, which interpolation clamps at the border, is cropped so the network stays free
    of border effects.
    """

    def __init__(self, ndim: int, cin: int, cout: int, mode: str, valid: bool) -> None:
        super().__init__()
        self.mode = _INTERP[ndim] if mode == "bilinear" else None
        self.valid = valid
        if self.mode is None:
            self.conv = _CONV_T[ndim](cin, cout, 2, stride=2)
        else:
            self.conv = _CONV[ndim](cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is None:
            return self.conv(x)
        x = F.interpolate(x, scale_factor=2, mode=self.mode, align_corners=False)
        if self.valid:
            x = x[(slice(None), slice(None)) + (slice(1, -1),) * (x.ndim - 2)]
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
        Number of 2x2 poolings (the pooling step is ``2**depth``).
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
    ) -> None:
        super().__init__()
        _check_int("in_channels", in_channels, 1)
        _check_int("num_classes", num_classes, 1)
        _check_int("depth", depth, 1)
        _check_int("base_channels", base_channels, 1)
        _check_choice("padding", padding, ("valid", "same"))
        _check_choice("up", up, ("transpose", "bilinear"))
        _check_choice("ndim", ndim, (2, 3))
        if not isinstance(batch_norm, bool):
            raise InvalidModelError(f"batch_norm={batch_norm!r} must be True or False")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise InvalidModelError(f"dropout={dropout!r} must be a number in [0, 1)")
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
        self.pool = _POOL[ndim](2)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.ModuleList()
        self.decode = nn.ModuleList()
        for w_low, w in zip(widths[:0:-1], widths[-2::-1]):
            self.up.append(_Up(ndim, w_low, w, up, padding == "valid"))
            self.decode.append(_ConvBlock(ndim, 2 * w, w, pad, batch_norm))
        self.head = _CONV[ndim](widths[0], num_classes, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He initialisation: weights ~ N(0, 2 / incoming connections), biases 0."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                taps = math.prod(m.kernel_size)
                if m.transposed:  # each output receives one tap per input channel and stride
                    fan_in = m.in_channels * taps // math.prod(m.stride)
                else:
                    fan_in = m.in_channels // m.groups * taps
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_in))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, in_channels, *spatial)`` to logits ``(N, num_classes, *spatial_out)``."""
        skips = []
        for block in self.down[:-1]:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.dropout(self.down[-1](x))
        for up, block, skip in zip(self.up, self.decode, reversed(skips)):
            x = up(x)
            x = block(torch.cat([_center_crop(skip, x.shape[2:]), x], dim=1))
        return self.head(x)


def _check_int(name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise InvalidModelError(f"{name}={value!r} must be an integer >= {low}")


def _check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices or isinstance(value, bool):
        raise InvalidModelError(f"{name}={value!r} must be one of {', '.join(map(repr, choices))}")

"""FCN-8s (Long, Shelhamer and Darrell 2015, "Fully Convolutional Networks for Semantic
Segmentation") on a small VGG-like encoder, 2D.

Encoder: five stages, each ``convs_per_stage`` same-padded 3x3 convolutions with ReLU and
a 2x2 max pooling (widths ``b, 2b, 4b, 8b, 8b`` for ``base_channels = b``); then the
convolutionalised "fully connected" layers fc6 (``fc_kernel`` x ``fc_kernel``, same
padding) and fc7 (1x1), each with ReLU and dropout. 1x1 score layers read pool3, pool4
and fc7; the fc7 scores are up-sampled 2x and added to the pool4 scores, that sum
up-sampled 2x and added to the pool3 scores, and the result up-sampled 8x to the input
resolution. Each up-sampling is a transposed convolution with kernel ``2f``, stride
``f`` and padding ``f / 2`` (output exactly ``f`` times its input), initialised to
bilinear interpolation and learned.

Geometry: same padding, so the output is as large as the input; admissible input sides
are the multiples of the pooling step 32; the halo is the receptive-field radius of an
aligned 32-px output block, derived by :func:`tilerseg.model_geometry` (for the default
``convs_per_stage=2``, ``fc_kernel=7``: 190 px).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import InvalidModelError
from .unet import _check_int, he_init

__all__ = ["FCN8s"]


def _bilinear_(weight: torch.Tensor, factor: int) -> None:
    """Fill a transposed-convolution weight ``(C, C, 2f, 2f)`` with bilinear
    interpolation by ``factor`` from each channel to itself (zero across channels)."""
    size = weight.shape[-1]
    centre = factor - 0.5
    taps = 1 - (torch.arange(size, dtype=weight.dtype) - centre).abs() / factor
    kernel = taps[:, None] * taps[None, :]
    with torch.no_grad():
        weight.zero_()
        for c in range(min(weight.shape[0], weight.shape[1])):
            weight[c, c] = kernel


class FCN8s(nn.Module):
    """FCN-8s: a VGG-like encoder whose scores at strides 8, 16 and 32 are fused.

    Parameters
    ----------
    in_channels : int
        Input channels.
    num_classes : int
        Output channels (logits). One class means a sigmoid output.
    base_channels : int
        Channels of the first stage (stages: ``b, 2b, 4b, 8b, 8b``).
    convs_per_stage : int
        3x3 convolutions per encoder stage (VGG-16 has 2, 2, 3, 3, 3).
    fc_channels : int or None
        Channels of fc6 and fc7; default ``16 * base_channels``.
    fc_kernel : int
        Odd kernel side of fc6 (7 in the paper).
    dropout : float
        Dropout after fc6 and fc7 (0.5 in the paper).

    Examples
    --------
    >>> import torch
    >>> net = FCN8s(base_channels=2)
    >>> net(torch.zeros(1, 1, 64, 96)).shape
    torch.Size([1, 2, 64, 96])
    """

    registry_name = "fcn8s"

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        base_channels: int = 16,
        convs_per_stage: int = 2,
        fc_channels: int | None = None,
        fc_kernel: int = 7,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        _check_int("in_channels", in_channels, 1)
        _check_int("num_classes", num_classes, 1)
        _check_int("base_channels", base_channels, 1)
        _check_int("convs_per_stage", convs_per_stage, 1)
        if fc_channels is not None:
            _check_int("fc_channels", fc_channels, 1)
        _check_int("fc_kernel", fc_kernel, 1)
        if fc_kernel % 2 == 0:
            raise InvalidModelError(f"fc_kernel={fc_kernel!r} must be odd")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise InvalidModelError(f"dropout={dropout!r} must be a number in [0, 1)")
        fc = fc_channels or 16 * base_channels
        self.config: dict[str, Any] = dict(
            in_channels=in_channels, num_classes=num_classes, base_channels=base_channels,
            convs_per_stage=convs_per_stage, fc_channels=fc_channels, fc_kernel=fc_kernel,
            dropout=float(dropout),
        )
        self.in_channels, self.num_classes, self.ndim = in_channels, num_classes, 2
        widths = [base_channels * m for m in (1, 2, 4, 8, 8)]
        self.stages = nn.ModuleList()
        cin = in_channels
        for w in widths:
            layers: list[nn.Module] = []
            for _ in range(convs_per_stage):
                layers += [nn.Conv2d(cin, w, 3, padding=1), nn.ReLU(inplace=True)]
                cin = w
            layers.append(nn.MaxPool2d(2, stride=2))
            self.stages.append(nn.Sequential(*layers))
        drop = (lambda: nn.Dropout(dropout)) if dropout > 0 else nn.Identity
        self.fc = nn.Sequential(
            nn.Conv2d(cin, fc, fc_kernel, padding=fc_kernel // 2), nn.ReLU(inplace=True), drop(),
            nn.Conv2d(fc, fc, 1), nn.ReLU(inplace=True), drop(),
        )
        self.score_fr = nn.Conv2d(fc, num_classes, 1)
        self.score_pool4 = nn.Conv2d(widths[3], num_classes, 1)
        self.score_pool3 = nn.Conv2d(widths[2], num_classes, 1)
        self.upscore2 = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, padding=1)
        self.upscore_pool4 = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, padding=1)
        self.upscore8 = nn.ConvTranspose2d(num_classes, num_classes, 16, stride=8, padding=4)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He initialisation of the convolutions; the up-samplings start bilinear."""
        he_init(self)
        for up, factor in ((self.upscore2, 2), (self.upscore_pool4, 2), (self.upscore8, 8)):
            _bilinear_(up.weight, factor)
            nn.init.zeros_(up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, in_channels, H, W)`` to logits ``(N, num_classes, H, W)``."""
        pools = []
        for stage in self.stages:
            x = stage(x)
            pools.append(x)
        score = self.upscore2(self.score_fr(self.fc(x)))
        score = self.upscore_pool4(score + self.score_pool4(pools[3]))
        return self.upscore8(score + self.score_pool3(pools[2]))

"""U-Net++ (Zhou et al. 2018, "UNet++: A Nested U-Net Architecture for Medical Image
Segmentation"), 2D and 3D, valid or same padding, with deep supervision and pruning.

Node ``X(i, j)`` sits at level ``i`` (``i`` poolings below the input) and column ``j``:
``X(i, 0)`` is the encoder (two 3x3 convolutions after pooling ``X(i-1, 0)``), and for
``j >= 1`` ``X(i, j)`` is two 3x3 convolutions on the concatenation of ``X(i, 0), ...,
X(i, j-1)`` and the up-sampled ``X(i+1, j-1)``. A 1x1 head on each ``X(0, j)``,
``j = 1..depth``, gives the deeply supervised outputs.

Geometry: the output ``X(0, d)`` (``d`` = ``prune`` or ``depth``) is reached through the
chain ``X(d, 0) -> X(d-1, 1) -> ... -> X(0, d)``, which has the sizes of a U-Net of depth
``d``: pooling step ``2**d`` per axis (the product of the pooling factors with ``pool``),
and in valid mode the U-Net's shrink ``12 * 2**d - 8`` px and halo ``6 * 2**d - 4`` px;
every other node is larger than the chain's node at its level, so it is centre-cropped
before concatenation. Same-padded models keep their input size and their halo is their
receptive-field radius.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import InvalidModelError
from .unet import (_CONV, _POOL, _ConvBlock, _Up, center_crop, check_family,
                   he_init, pool_factors)

__all__ = ["UNetPlusPlus"]


class UNetPlusPlus(nn.Module):
    """U-Net++ with nested skip pathways, deep supervision and pruned inference.

    ``forward`` returns the logits of one head, ``X(0, prune)`` (default
    ``X(0, depth)``), computing only the nodes that head needs (``X(i, j)`` with
    ``i + j <= prune``). All modules exist whatever ``prune`` is, so the weights of a full
    model load into a pruned one: :meth:`pruned` makes such a copy.

    Parameters
    ----------
    in_channels : int
        Input channels.
    num_classes : int
        Output channels (logits) of every head. One class means a sigmoid output.
    depth : int
        Number of poolings of the full network (levels ``0..depth``).
    base_channels : int
        Channels of level 0; each level doubles them.
    padding : {"same", "valid"}
        Zero-padded 3x3 convolutions (the paper's; output as large as input) or valid
        ones, with centre-cropped skips as in the U-Net paper.
    batch_norm : bool
        Batch normalisation after every convolution.
    up : {"transpose", "bilinear"}
        Up-sampling as in :class:`tilerseg.UNet`.
    ndim : {2, 3}
        Spatial dimensions.
    pool : int or list of list of int
        Pooling factors, as in :class:`tilerseg.UNet`.
    prune : int or None
        Depth of the head ``forward`` computes (``1..depth``); None for ``depth``.
    deep_supervision : bool
        Whether training averages the losses of all heads (see
        :meth:`supervised_outputs`) instead of using the output of ``forward`` alone.

    Examples
    --------
    >>> import torch
    >>> net = UNetPlusPlus(depth=3, base_channels=2)
    >>> net(torch.zeros(1, 1, 64, 64)).shape
    torch.Size([1, 2, 64, 64])
    >>> [y.shape[-1] for y in net.supervised_outputs(torch.zeros(1, 1, 64, 64))]
    [64, 64, 64]
    >>> net.pruned(1)(torch.zeros(1, 1, 64, 64)).shape
    torch.Size([1, 2, 64, 64])
    """

    registry_name = "unetpp"

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        depth: int = 4,
        base_channels: int = 32,
        padding: str = "same",
        batch_norm: bool = False,
        up: str = "transpose",
        ndim: int = 2,
        pool: int | list[list[int]] = 2,
        prune: int | None = None,
        deep_supervision: bool = True,
    ) -> None:
        super().__init__()
        check_family(in_channels=in_channels, num_classes=num_classes, depth=depth,
                     base_channels=base_channels, padding=padding, up=up, ndim=ndim,
                     batch_norm=batch_norm, deep_supervision=deep_supervision)
        if prune is not None and (not isinstance(prune, int) or isinstance(prune, bool)
                                  or not 1 <= prune <= depth):
            raise InvalidModelError(
                f"prune={prune!r} must be None or an integer from 1 to depth={depth}")
        factors = pool_factors(pool, depth, ndim)
        self.config: dict[str, Any] = dict(
            in_channels=in_channels, num_classes=num_classes, depth=depth,
            base_channels=base_channels, padding=padding, batch_norm=batch_norm, up=up,
            ndim=ndim, pool=pool if isinstance(pool, int) else [list(f) for f in factors],
            prune=prune, deep_supervision=deep_supervision,
        )
        self.in_channels, self.num_classes, self.ndim = in_channels, num_classes, ndim
        self.depth, self.prune, self.deep_supervision = depth, prune, deep_supervision
        pad = 0 if padding == "valid" else 1
        widths = [base_channels * 2**level for level in range(depth + 1)]
        self.pool = nn.ModuleList(_POOL[ndim](f, stride=f) for f in factors)
        self.node = nn.ModuleDict()
        self.up = nn.ModuleDict()
        for i in range(depth + 1):
            cin = in_channels if i == 0 else widths[i - 1]
            self.node[f"{i}_0"] = _ConvBlock(ndim, cin, widths[i], pad, batch_norm)
        for j in range(1, depth + 1):
            for i in range(depth + 1 - j):
                self.up[f"{i}_{j}"] = _Up(ndim, widths[i + 1], widths[i], up,
                                          padding == "valid", factors[i])
                self.node[f"{i}_{j}"] = _ConvBlock(ndim, (j + 1) * widths[i], widths[i], pad,
                                                   batch_norm)
        self.heads = nn.ModuleList(_CONV[ndim](widths[0], num_classes, 1) for _ in range(depth))
        he_init(self)

    def _nodes(self, x: torch.Tensor, depth: int) -> dict[tuple[int, int], torch.Tensor]:
        """Every node ``X(i, j)`` with ``i + j <= depth``."""
        nodes: dict[tuple[int, int], torch.Tensor] = {}
        for i in range(depth + 1):
            x = self.node[f"{i}_0"](x if i == 0 else self.pool[i - 1](x))
            nodes[i, 0] = x
        for j in range(1, depth + 1):
            for i in range(depth + 1 - j):
                u = self.up[f"{i}_{j}"](nodes[i + 1, j - 1])
                parts = [center_crop(nodes[i, k], u.shape[2:]) for k in range(j)]
                nodes[i, j] = self.node[f"{i}_{j}"](torch.cat([*parts, u], dim=1))
        return nodes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes, *spatial_out)`` of head ``X(0, prune or depth)``."""
        d = self.prune or self.depth
        return self.heads[d - 1](self._nodes(x, d)[0, d])

    def supervised_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every head ``X(0, j)``, ``j = 1..prune or depth``, shallowest first.

        In valid mode shallower heads are larger (less shrink); training centre-crops
        each to the last one's size.
        """
        d = self.prune or self.depth
        nodes = self._nodes(x, d)
        return [self.heads[j - 1](nodes[0, j]) for j in range(1, d + 1)]

    def pruned(self, prune: int | None) -> UNetPlusPlus:
        """A copy with the same weights whose ``forward`` computes head ``X(0, prune)``.

        Examples
        --------
        >>> net = UNetPlusPlus(depth=3, base_channels=2)
        >>> small = net.pruned(2)
        >>> small.config["prune"], small.depth, len(small.state_dict()) == len(net.state_dict())
        (2, 3, True)
        """
        copy = type(self)(**{**self.config, "prune": prune})
        copy.load_state_dict(self.state_dict())
        source = next(self.parameters())
        copy.to(device=source.device, dtype=source.dtype)
        copy.registry_name = getattr(self, "registry_name", "unetpp")
        copy.train(self.training)
        return copy

"""Training losses: the U-Net paper's weighted cross-entropy, and soft Dice + cross-entropy
(nnU-Net's), for 2D and 3D logits alike."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError
from ..models.unet import center_crop

__all__ = ["LOSSES", "check_loss", "dice_ce_loss", "soft_dice_loss", "training_loss",
           "weighted_loss"]

LOSSES = ("ce", "dice+ce")
"""``"ce"``: the paper's pixel-weighted cross-entropy; ``"dice+ce"``: soft batch Dice over
the foreground classes plus that cross-entropy."""

Logits = torch.Tensor | Sequence[torch.Tensor]


def check_loss(loss: str) -> str:
    """``loss`` if it is one of :data:`LOSSES`, else an :class:`InvalidArgumentError`.

    Examples
    --------
    >>> check_loss("dice+ce")
    'dice+ce'
    """
    if loss not in LOSSES:
        raise InvalidArgumentError(f"loss={loss!r} is not known; expected one of "
                                   f"{', '.join(LOSSES)}")
    return loss


def weighted_loss(logits: Logits, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Pixel-weighted cross-entropy (softmax), or binary cross-entropy for one class.

    ``logits`` larger than ``target`` (a same-padded model's output) are centre-cropped
    to it; a list of logits (deep supervision) gives the mean of their losses, each
    centre-cropped to the target. ``weights`` of ones give the plain mean.
    """
    if isinstance(logits, (list, tuple)):
        return torch.stack([weighted_loss(x, target, weights) for x in logits]).mean()
    logits = center_crop(logits.float(), target.shape[1:])
    if logits.shape[1] == 1:
        per_pixel = F.binary_cross_entropy_with_logits(logits[:, 0], target.float(),
                                                       reduction="none")
    else:
        per_pixel = F.cross_entropy(logits, target, reduction="none")
    return (per_pixel * weights).sum() / weights.numel()


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5
                   ) -> torch.Tensor:
    """``1 -`` the mean soft Dice of the foreground classes, batch Dice as nnU-Net's.

    For each class ``c >= 1`` (class 1 through a sigmoid for one-channel logits)::

        dice_c = (2 sum(p_c t_c) + smooth) / (sum(p_c) + sum(t_c) + smooth)

    with the sums over the whole batch and every voxel (so a patch without the class
    does not count as a failure), ``p_c`` the softmax probability and ``t_c`` the one-hot
    target.

    Parameters
    ----------
    logits : torch.Tensor
        ``(B, K, *spatial)``, already cropped to ``target``.
    target : torch.Tensor
        ``(B, *spatial)`` int64 classes.
    smooth : float
        Added to numerator and denominator.

    Examples
    --------
    >>> logits = torch.tensor([[[0.0, 0.0]], [[0.0, 0.0]]]).reshape(1, 2, 1, 2)
    >>> round(float(soft_dice_loss(logits, torch.tensor([[[1, 1]]]), smooth=0)), 4)
    0.3333
    """
    logits = logits.float()
    if logits.shape[1] == 1:
        probs = torch.sigmoid(logits[:, 0])[:, None]
        onehot = (target == 1)[:, None].to(probs.dtype)
    else:
        probs = torch.softmax(logits, dim=1)[:, 1:]
        onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1)[:, 1:].to(probs.dtype)
    axes = [0, *range(2, probs.ndim)]
    intersection = (probs * onehot).sum(axes)
    denominator = probs.sum(axes) + onehot.sum(axes)
    dice = (2 * intersection + smooth) / (denominator + smooth)
    return 1 - dice.mean()


def dice_ce_loss(logits: Logits, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Soft batch Dice over the foreground classes (:func:`soft_dice_loss`) plus the
    (pixel-weighted) cross-entropy of :func:`weighted_loss`, with equal weights as
    nnU-Net; a list of logits (deep supervision) gives the mean over heads.

    Examples
    --------
    >>> logits = torch.zeros(1, 2, 1, 2)
    >>> y, w = torch.tensor([[[1, 1]]]), torch.ones(1, 1, 2)
    >>> round(float(dice_ce_loss(logits, y, w)), 4)  # 1 - 2/3 + log 2
    1.0265
    """
    if isinstance(logits, (list, tuple)):
        return torch.stack([dice_ce_loss(x, target, weights) for x in logits]).mean()
    cropped = center_crop(logits.float(), target.shape[1:])
    return soft_dice_loss(cropped, target) + weighted_loss(cropped, target, weights)


def training_loss(name: str, logits: Logits, target: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
    """The loss ``name`` (one of :data:`LOSSES`) of a batch."""
    if check_loss(name) == "ce":
        return weighted_loss(logits, target, weights)
    return dice_ce_loss(logits, target, weights)

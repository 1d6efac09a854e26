"""Validation during training: whole held-out images through the exact tiled engine."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import nn

from ..normalize import Normalization
from .data import Pair

__all__ = ["better", "validate_dice", "validate_pixels"]


def validate_pixels(model: nn.Module, pairs: Sequence[Pair], foreground: int,
                    norms: Sequence[Normalization] | None = None) -> dict[str, float]:
    """ISBI-style scores of 2D images: pixel and adapted Rand error of the
    ``foreground`` probability, each the best over thresholds, with the threshold."""
    from ..engine.inference import segment
    from ..metrics import isbi_scores

    # torch: the weights change every epoch, so a converted network would not be reused
    probs = [segment(p.image, model, tile=256, device="cpu", backend="torch",
                     normalize="auto" if norms is None else n)[foreground]
             for p, n in zip(pairs, norms or [None] * len(pairs))]
    truth = [(p.mask == foreground).astype(np.uint8) for p in pairs]
    scores = isbi_scores(np.stack(probs), np.stack(truth))
    return {k: float(scores[k]) for k in ("pixel_error", "pixel_threshold", "rand_error",
                                          "rand_threshold")}


def validate_dice(model: nn.Module, pairs: Sequence[Pair], norms: Sequence[Normalization],
                  tile: Sequence[int]) -> dict[str, float]:
    """Dice per class of whole volumes, segmented by :func:`tilerseg.segment` (torch,
    float32, exact tiling) with each volume's training normalisation and labelled by the
    most probable class; the volumes' voxels are pooled.

    Returns
    -------
    dict
        ``dice_1 ... dice_{K-1}`` (Dice of each foreground class; 1 where a class is in
        neither map) and ``mean_dice``, their mean.
    """
    from ..engine.inference import segment
    from ..metrics import iou_dice

    preds, truths = [], []
    classes = 2
    for pair, norm in zip(pairs, norms):
        probs = segment(pair.image, model, tile=tuple(tile), device="cpu", backend="torch",
                        normalize=norm)
        classes = max(2, probs.shape[0])
        labels = (probs[0] >= 0.5).astype(np.int64) if probs.shape[0] == 1 else probs.argmax(0)
        preds.append(labels.ravel())
        truths.append(pair.mask.ravel())
    scores = iou_dice(np.concatenate(preds), np.concatenate(truths), classes)
    out = {f"dice_{c}": float(scores[c]["dice"]) for c in range(1, classes)}
    out["mean_dice"] = float(np.mean(list(out.values())))
    return out


def better(record: dict[str, float], best: dict[str, float] | None) -> bool:
    """Whether an epoch's validation beats the best so far: a higher ``mean_dice`` (3D),
    or a lower ``pixel_error`` (2D).

    Examples
    --------
    >>> better({"mean_dice": 0.7}, {"mean_dice": 0.6}), better({"pixel_error": 0.2}, None)
    (True, True)
    """
    if best is None:
        return True
    if "mean_dice" in record:
        return "mean_dice" not in best or record["mean_dice"] > best["mean_dice"]
    return "pixel_error" in record and record["pixel_error"] < best.get("pixel_error", np.inf)

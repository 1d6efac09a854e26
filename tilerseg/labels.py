"""The label policy: how class probabilities become a label image. One place, numpy only.

A model with one output channel is a sigmoid: its foreground is ``p >= threshold``
(default 0.5). A model with several classes labels the argmax (ties go to the lower
class), unless a threshold is given for a two-class model: then its foreground class
(``model.metadata["foreground_class"]``, default 1) is labelled where its probability is
``>= threshold``. A model's tuned threshold (``model.metadata["threshold"]``) is the
default.

Examples
--------
>>> import numpy as np
>>> probs = np.array([[0.7, 0.4], [0.3, 0.6]], np.float32)[:, None, :]   # (C=2, Y=1, X=2)
>>> LabelPolicy(2)(probs).tolist()
[[0, 1]]
>>> LabelPolicy(2, threshold=0.65)(probs).tolist()
[[0, 0]]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InvalidArgumentError

__all__ = ["LabelPolicy", "label_dtype", "labels_from_probabilities"]


def label_dtype(num_classes: int) -> np.dtype:
    """Smallest unsigned dtype for labels of ``num_classes`` classes.

    Parameters
    ----------
    num_classes : int
        Number of classes.

    Returns
    -------
    numpy.dtype
        ``uint8`` up to 255 classes, ``uint16`` up to 65535, else ``uint32``.
    """
    if num_classes <= 255:
        return np.dtype(np.uint8)
    if num_classes <= 65535:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def labels_from_probabilities(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Label image from (C, *spatial) probabilities: argmax, or ``p >= threshold`` for one class.

    Parameters
    ----------
    probs : numpy.ndarray
        Float probabilities, classes on axis 0.
    threshold : float, default 0.5
        For a single class: the label is 1 where ``p >= threshold``, else 0.

    Returns
    -------
    numpy.ndarray
        Spatial label image: argmax over classes for more than one class (ties go to
        the lower class), in :func:`label_dtype` of the class count.
    """
    probs = np.asarray(probs)
    if probs.shape[0] == 1:
        return (probs[0] >= threshold).astype(np.uint8)
    return np.argmax(probs, axis=0).astype(label_dtype(probs.shape[0]))


@dataclass(frozen=True)
class LabelPolicy:
    """How the probabilities of a model with ``num_classes`` outputs become labels.

    Parameters
    ----------
    num_classes : int
        The model's output channels (1 for a sigmoid model).
    threshold : float, optional
        Foreground threshold in [0, 1]; None: 0.5 for one class, argmax for more.
    foreground : int
        The foreground class of a two-class model (for the threshold and
        :meth:`foreground_probability`); for one class, 1 means "the sigmoid output".
    """

    num_classes: int
    threshold: float | None = None
    foreground: int = 1

    def __post_init__(self) -> None:
        if self.threshold is not None:
            try:
                value = float(self.threshold)
            except (TypeError, ValueError):
                value = float("nan")
            if not 0.0 <= value <= 1.0:
                raise InvalidArgumentError(f"threshold={self.threshold!r} must be within [0, 1]")
            object.__setattr__(self, "threshold", value)
        if not 0 <= int(self.foreground) < max(2, int(self.num_classes)):
            raise InvalidArgumentError(
                f"foreground class {self.foreground} is not one of the model's classes")
        object.__setattr__(self, "foreground", int(self.foreground))

    @classmethod
    def for_model(cls, num_classes: int, metadata: dict[str, Any] | None,
                  threshold: float | None = None) -> LabelPolicy:
        """The policy of a model: ``threshold``, else its tuned one, and its foreground class."""
        metadata = metadata or {}
        if threshold is None:
            threshold = metadata.get("threshold")
        return cls(int(num_classes), threshold, int(metadata.get("foreground_class", 1)))

    @property
    def dtype(self) -> np.dtype:
        """The label image's dtype."""
        return label_dtype(self.num_classes)

    def __call__(self, probs: np.ndarray) -> np.ndarray:
        """The labels of ``(C, *spatial)`` probabilities, in :attr:`dtype`."""
        if self.threshold is not None and probs.shape[0] == 2:
            fg = self.foreground
            return np.where(probs[fg] >= self.threshold, fg, 1 - fg).astype(self.dtype)
        threshold = 0.5 if self.threshold is None else self.threshold
        return labels_from_probabilities(probs, threshold).astype(self.dtype, copy=False)

    def foreground_probability(self, probs: np.ndarray) -> np.ndarray:
        """The probability of the foreground class, ``(*spatial)``."""
        if probs.shape[0] == 1:
            return probs[0] if self.foreground == 1 else 1 - probs[0]
        return probs[self.foreground]

    def as_dict(self) -> dict[str, Any]:
        """Plain values, for metadata."""
        return {"threshold": self.threshold, "foreground": self.foreground}

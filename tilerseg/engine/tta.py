"""Test-time augmentation that keeps the tiling exact.

With ``tta="dihedral"`` every input window goes through the model in the 8 flips and
quarter turns of the (Y, X) plane (the dihedral group of the square), each output is turned
back, and the probabilities are averaged (nnU-Net mirrors the same way by default);
``tta="flips"`` uses the 4 flips of Y and X only (no turns: half the cost). In 3D both
are the 8 flips of Z, Y and X (no turns). Turns also need Y and X to have the same
geometry (pooling step, smallest input, shrink and halo); a model pooled differently along
them is only flipped, with a note in the log.

Why per window equals the whole image
-------------------------------------
The one-shot reference mirror-pads the image to an admissible extent ``L`` per axis
(``L = min_input + b * step``) and runs the model once; a tile's window starts at a
multiple ``s`` of the pooling step in that padded frame and is admissible itself
(``w = min_input + a * step``). Flipping the padded image maps the window to the one
starting at ``L - s - w = (b - a) * step - s``, again a multiple of the step: the flipped
window lies on the flipped image's pooling grid, so its output is the flipped image's
one-shot output there, and turned back it is the crop of "flip the padded image, run
once, flip back". A quarter turn swaps the axes; with the same geometry on both, the same
holds. So the tiled TTA output equals the mean, over the views, of one-shot inference on
the transformed padded image, transformed back (``tests/test_tta.py`` checks exactly
that), whatever the tile. Any admissible extent gives the same result: they differ by
multiples of the step.

Examples
--------
>>> from tilerseg.geometry import ModelGeometry
>>> g = ModelGeometry(2, 1, 2, step=(16, 16), min_input=(188, 188), shrink=(184, 184),
...                   halo=(92, 92))
>>> len(views("dihedral", g)), len(views("flips", g)), len(views(None, g))
(8, 4, 1)
>>> tta_mode(True), tta_mode(False)
('dihedral', None)
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgumentError
from ..geometry import ModelGeometry

if TYPE_CHECKING:  # options import this module: commands that need no model never load torch
    import torch

__all__ = ["TTA_MODES", "View", "tta_mode", "views"]

log = logging.getLogger(__name__)

TTA_MODES = ("dihedral", "flips")


def tta_mode(value: Any) -> str | None:
    """The TTA mode of an option value: ``True`` is ``"dihedral"``; ``False``/``None``
    none.

    Raises
    ------
    InvalidArgumentError
        Anything else than those and :data:`TTA_MODES`.
    """
    if value is None or value is False:
        return None
    if value is True:
        return "dihedral"
    if isinstance(value, str) and value in TTA_MODES:
        return value
    raise InvalidArgumentError(
        f"tta={value!r} must be True, False or one of {', '.join(TTA_MODES)}")


@dataclass(frozen=True)
class View:
    """One transform of a batch's trailing spatial axes: ``turns`` quarter turns of the
    last two axes (Y, X), then flips of the spatial axes in ``flips`` (0 is the first of
    the model's ``ndim`` spatial axes)."""

    ndim: int
    turns: int = 0
    flips: tuple[int, ...] = ()

    def _dims(self) -> list[int]:
        return [a - self.ndim for a in self.flips]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The view of ``x`` (``(B, C, ..., *spatial)``), contiguous."""
        if self.turns:
            x = x.rot90(self.turns, dims=(-2, -1))
        if self.flips:
            x = x.flip(dims=self._dims())
        return x.contiguous()

    def undo(self, y: torch.Tensor) -> torch.Tensor:
        """The model's output ``y`` of the view, put back in the original orientation."""
        if self.flips:
            y = y.flip(dims=self._dims())
        if self.turns:
            y = y.rot90(-self.turns, dims=(-2, -1))
        return y


def _same_in_plane(geometry: ModelGeometry) -> bool:
    """Whether Y and X have the same geometry (a quarter turn keeps the tiling exact)."""
    return all(getattr(geometry, f)[-2] == getattr(geometry, f)[-1]
               for f in ("step", "min_input", "shrink", "halo"))


def views(mode: str | None, geometry: ModelGeometry) -> tuple[View, ...]:
    """The views a window goes through (the identity alone without TTA).

    Parameters
    ----------
    mode : {"dihedral", "flips"} or None
    geometry : ModelGeometry
        The model's geometry (its ``ndim`` spatial axes).

    Returns
    -------
    tuple of View
        The identity first.
    """
    nd = geometry.ndim
    if mode is None:
        return (View(nd),)
    flips = tuple(View(nd, 0, f) for r in range(nd + 1)
                  for f in itertools.combinations(range(nd), r))
    if mode == "flips" or nd != 2:
        return flips
    if not _same_in_plane(geometry):
        log.info("tta=dihedral: the model's Y and X geometry differ (step %s, halo %s); "
                 "quarter turns would leave the pooling grid, so the windows are only "
                 "flipped (4 views)", geometry.step, geometry.halo)
        return flips
    return tuple(View(nd, k, f) for k in range(4) for f in ((), (1,)))

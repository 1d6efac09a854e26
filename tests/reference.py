"""The one-shot reference of DESIGN section 1, independent of the engine.

Its own module (no pytest import) so that benchmarks/gpu_check.py uses the same code.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

import tilerseg

__all__ = ["one_shot_reference", "one_shot_tta_reference"]


def _padded(image: np.ndarray, g: tilerseg.ModelGeometry) -> np.ndarray:
    """``image`` (C, *spatial) mirror-padded by the halo, its far sides extended (also by
    reflection) to an admissible size."""
    pads = [(0, 0)]
    for axis, n in enumerate(image.shape[1:]):
        size = n + 2 * g.halo[axis]
        while not g.is_admissible(size, axis):
            size += 1
        pads.append((g.halo[axis], size - n - g.halo[axis]))
    return np.pad(image, pads, mode="reflect")


def one_shot_reference(image: np.ndarray, model: torch.nn.Module,
                       precision: str = "fp32",
                       geometry: tilerseg.ModelGeometry | None = None,
                       run: Callable[[torch.Tensor], torch.Tensor] | None = None
                       ) -> np.ndarray:
    """The reference of DESIGN section 1, written independently of the engine.

    Pad the whole (C, *spatial) image by the halo with numpy ``mode="reflect"``, extend
    the far sides (also by reflection) to an admissible size, run the model once and
    crop to the image. ``image`` must already be normalised float32. ``precision="bf16"``
    runs the model under bfloat16 autocast; the activation is computed in float32.
    ``geometry`` (halo and admissible sizes) defaults to the engine's probe of the model;
    tests/test_architectures.py passes one derived without it (tests/closed_forms.py).
    ``run`` computes the logits of the padded batch instead of ``model`` (another runtime's
    network of it, e.g. the int8 one, which then sees the whole padded image at once).
    """
    g = tilerseg.model_geometry(model) if geometry is None else geometry
    padded = _padded(image, g)
    model = model.cpu().eval()
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    batch = torch.from_numpy(np.ascontiguousarray(padded))[None]
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        logits = (model if run is None else run)(batch)[0].float()
    crop = tuple(
        slice(g.crop_offset(a), g.crop_offset(a) + n) for a, n in enumerate(image.shape[1:])
    )
    logits = logits[(slice(None),) + crop]
    probs = torch.sigmoid(logits) if logits.shape[0] == 1 else torch.softmax(logits, dim=0)
    return probs.numpy()


def one_shot_tta_reference(image: np.ndarray, model: torch.nn.Module, mode: str
                           ) -> np.ndarray:
    """Test-time augmentation on the whole padded image, independently of the engine.

    Pad the image as :func:`one_shot_reference` does; for each view (``"dihedral"``: the
    quarter turns ``k`` of the last two axes, each without and with a flip of the last
    axis; ``"flips"``: every subset of the spatial axes flipped), transform the padded
    image with numpy, run the model once, transform the probabilities back; average them
    and crop to the image.
    """
    g = tilerseg.model_geometry(model)
    nd = image.ndim - 1
    padded = _padded(image, g)
    spatial = tuple(range(1, nd + 1))
    if mode == "dihedral" and nd == 2:
        views = [(k, (2,) if flip else ()) for k in range(4) for flip in (False, True)]
    else:  # every subset of the spatial axes flipped
        views = [(0, tuple(a for a, bit in zip(spatial, bits) if bit))
                 for bits in np.ndindex(*(2,) * nd)]
    model = model.cpu().eval()
    total = None
    for k, flips in views:
        x = np.flip(np.rot90(padded, k, axes=(-2, -1)), axis=flips)
        with torch.no_grad():
            logits = model(torch.from_numpy(np.ascontiguousarray(x))[None])[0].float()
        probs = (torch.sigmoid(logits) if logits.shape[0] == 1 else
                 torch.softmax(logits, dim=0)).numpy()
        probs = np.rot90(np.flip(probs, axis=flips), -k, axes=(-2, -1))
        total = probs if total is None else total + probs
    total = total / len(views)
    crop = tuple(slice(g.crop_offset(a), g.crop_offset(a) + n)
                 for a, n in enumerate(image.shape[1:]))
    return np.ascontiguousarray(total[(slice(None),) + crop])

"""Pixel-wise loss weights of the U-Net paper (Ronneberger et al. 2015, eq. 2).

.. math::

    w(x) = w_c(x) + w_0 \\exp\\left(-\\frac{(d_1(x) + d_2(x))^2}{2\\sigma^2}\\right)

``w_c`` balances the class frequencies (:func:`class_weights`, computed once over the
whole training set, never per image or per tile); the second term (:func:`border_weights`)
forces the network to learn the thin background gaps between touching objects. ``d1`` and
``d2`` are the Euclidean distances from a pixel to the nearest and the second-nearest
object, measured between pixel centres as :func:`scipy.ndimage.distance_transform_edt`
does: a background pixel next to an object is at distance 1.

Conventions (see :func:`border_weights` for the details):

* objects are the connected components of ``mask == foreground_class`` with face
  connectivity (4-connectivity in 2D, 6 in 3D), so cells separated by a one-pixel
  membrane that touch only diagonally stay separate objects;
* the border term is applied to background pixels only (pixels in no object), which is
  where the paper's figure 3d puts the high weights; object pixels get ``w_c`` only;
* the term is truncated to exactly 0 where it is below ``cutoff * w0`` (default
  ``1e-3``), and is exact (equal to the untruncated formula) everywhere else.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from ..errors import InvalidArgumentError

__all__ = ["border_cutoff_distance", "border_weights", "class_weights", "weight_map"]

log = logging.getLogger(__name__)


def _integer_mask(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return mask.astype(np.uint8)
    if not np.issubdtype(mask.dtype, np.integer):
        raise InvalidArgumentError(f"{name} must be an integer class map, got dtype {mask.dtype}")
    return mask


def _spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    """Per-axis voxel sides, checked (1 on every axis for None)."""
    if spacing is None:
        return (1.0,) * ndim
    values = tuple(float(v) for v in np.ravel(spacing))
    if len(values) != ndim or not all(math.isfinite(v) and v > 0 for v in values):
        raise InvalidArgumentError(
            f"spacing={tuple(spacing)} must be {ndim} positive numbers (one per axis)")
    return values


def class_weights(masks: Sequence[np.ndarray] | np.ndarray, num_classes: int) -> np.ndarray:
    """Per-class weights that balance the class frequencies of a training set.

    The weight of class ``c`` is proportional to ``1 / f_c``, where ``f_c`` is the
    fraction of all training pixels labelled ``c``, normalised so that the mean weight
    over all pixels (``sum_c f_c w_c``) is 1. With ``K`` classes present this is
    ``w_c = 1 / (K f_c)``. A class absent from every mask gets weight 0 and a warning.

    Parameters
    ----------
    masks : sequence of numpy.ndarray or numpy.ndarray
        Integer class maps with values in ``[0, num_classes)``; one array or a sequence
        of arrays (any shapes). Counted together, once, over the whole training set.
    num_classes : int
        Number of classes.

    Returns
    -------
    numpy.ndarray of float64, shape ``(num_classes,)``

    Raises
    ------
    InvalidArgumentError
        If ``num_classes < 1``, a mask is not integer or has a value outside
        ``[0, num_classes)``, or there are no pixels at all.

    Examples
    --------
    >>> mask = np.array([[0, 1, 1, 1]])
    >>> class_weights(mask, 2).tolist()
    [2.0, 0.6666666666666666]
    """
    num_classes = int(num_classes)
    if num_classes < 1:
        raise InvalidArgumentError(f"num_classes must be >= 1, got {num_classes}")
    if isinstance(masks, np.ndarray):
        masks = [masks]
    counts = np.zeros(num_classes, dtype=np.int64)
    for i, mask in enumerate(masks):
        mask = _integer_mask(mask, f"mask {i}")
        if mask.size == 0:
            continue
        low, high = int(mask.min()), int(mask.max())
        if low < 0 or high >= num_classes:
            raise InvalidArgumentError(
                f"mask {i} has values in [{low}, {high}], outside [0, {num_classes})"
            )
        counts += np.bincount(mask.ravel(), minlength=num_classes)[:num_classes]
    total = int(counts.sum())
    if total == 0:
        raise InvalidArgumentError("class_weights needs at least one pixel")
    present = counts > 0
    weights = np.zeros(num_classes, dtype=np.float64)
    weights[present] = total / (present.sum() * counts[present])
    absent = np.flatnonzero(~present).tolist()
    if absent:
        log.warning("classes %s are absent from every training mask; their weight is 0", absent)
    return weights


def border_cutoff_distance(sigma: float, cutoff: float) -> float:
    """Largest ``d1 + d2`` at which the border term is not truncated.

    The term ``w0 exp(-(d1 + d2)^2 / (2 sigma^2))`` is ``>= cutoff * w0`` exactly when
    ``d1 + d2 <= sigma * sqrt(2 ln(1 / cutoff))`` (infinite for ``cutoff == 0``).

    Examples
    --------
    >>> round(border_cutoff_distance(5.0, 1e-3), 3)
    18.585
    """
    if cutoff <= 0:
        return math.inf
    return float(sigma) * math.sqrt(2.0 * math.log(1.0 / float(cutoff)))


def border_weights(
    mask: np.ndarray,
    foreground_class: int = 1,
    w0: float = 10.0,
    sigma: float = 5.0,
    cutoff: float = 1e-3,
    spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """The separation term ``w0 exp(-(d1 + d2)^2 / (2 sigma^2))`` of the U-Net weight map.

    Objects are the connected components of ``mask == foreground_class`` with face
    connectivity (:func:`scipy.ndimage.label`'s default: 4-connectivity in 2D, 6 in 3D),
    the usual choice for cells separated by thin membranes: two cells whose only contact
    is a diagonal step through a one-pixel membrane remain two objects. ``d1`` and
    ``d2`` are the Euclidean distances (between pixel centres, as
    :func:`scipy.ndimage.distance_transform_edt` measures them) from a pixel to the
    nearest pixel of the nearest and of the second-nearest object.

    The term is applied to background pixels only (pixels that belong to no object):
    object pixels get 0, as in the paper's figure 3d, where the high weights sit in the
    thin gaps between touching cells. With fewer than two objects the term is 0
    everywhere.

    Truncation: the term is set to exactly 0 where it is below ``cutoff * w0``, that is
    where ``d1 + d2 > D = sigma sqrt(2 ln(1/cutoff))`` (``D = 18.6`` px for the
    defaults); everywhere else it is exact. This allows each object's distance transform
    to be computed only inside its bounding box grown by ``ceil(D)`` pixels: a pixel with
    ``d1 + d2 <= D`` has ``d1 <= d2 <= D``, so it lies inside the grown boxes of both its
    nearest objects, where their distances are exact; distances outside a box are treated
    as infinite, which can only overestimate ``d1 + d2``, so a truncated pixel is never
    given a non-zero value. ``cutoff=0`` disables the truncation (every object's
    distance transform then spans the whole image, which is much slower).

    Parameters
    ----------
    mask : numpy.ndarray
        Integer (or boolean) class map, any number of dimensions.
    foreground_class : int
        Class whose connected components are the objects.
    w0 : float
        Amplitude of the term (paper: 10).
    sigma : float
        Length scale in pixels (paper: about 5), ``> 0``.
    cutoff : float
        Relative truncation level in ``[0, 1)``; see above.
    spacing : sequence of float, optional
        Voxel side per axis (default 1 on every axis). Distances are measured in these
        units (:func:`scipy.ndimage.distance_transform_edt` ``sampling=``), and so is
        ``sigma``: a volume whose planes are 3 times further apart than its pixels has
        ``spacing=(3, 1, 1)``, and its border term is that of the same objects sampled
        isotropically.

    Returns
    -------
    numpy.ndarray of float32, shape ``mask.shape``

    Examples
    --------
    >>> mask = np.array([[1, 1, 0, 0, 1]])
    >>> w = border_weights(mask)
    >>> bool(np.isclose(w[0, 2], 10 * np.exp(-(1 + 2) ** 2 / 50)))
    True
    >>> w[0, [0, 1, 4]].tolist()
    [0.0, 0.0, 0.0]
    """
    mask = np.asarray(mask)
    if not sigma > 0:
        raise InvalidArgumentError(f"sigma must be > 0, got {sigma}")
    if not 0 <= cutoff < 1:
        raise InvalidArgumentError(f"cutoff must be in [0, 1), got {cutoff}")
    w0 = float(w0)
    sampling = _spacing(spacing, mask.ndim)
    out = np.zeros(mask.shape, dtype=np.float32)
    if mask.size == 0 or w0 == 0:
        return out
    labels, n_objects = ndimage.label(mask == foreground_class)
    if n_objects < 2:
        return out

    reach = border_cutoff_distance(sigma, cutoff)
    # the truncation reach in voxels along each axis
    margins = None if math.isinf(reach) else [math.ceil(reach / d) for d in sampling]
    d1 = np.full(mask.shape, np.inf)
    d2 = np.full(mask.shape, np.inf)
    full = tuple(slice(0, n) for n in mask.shape)
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if margins is not None:
            box = tuple(
                slice(max(0, s.start - m), min(n, s.stop + m))
                for s, n, m in zip(box, mask.shape, margins)
            )
        else:
            box = full
        # The object lies entirely inside its box, so the EDT of the crop is its exact
        # distance at every pixel of the box.
        dist = ndimage.distance_transform_edt(labels[box] != index, sampling=sampling)
        near, second = d1[box], d2[box]  # views: updated in place
        np.minimum(second, np.maximum(near, dist), out=second)
        np.minimum(near, dist, out=near)

    total = d1 + d2
    keep = (labels == 0) & (total <= reach)
    out[keep] = w0 * np.exp(-(total[keep] ** 2) / (2.0 * float(sigma) ** 2))
    return out


def weight_map(
    mask: np.ndarray,
    class_weight: np.ndarray,
    foreground_class: int = 1,
    w0: float = 10.0,
    sigma: float = 5.0,
    border: bool = True,
    cutoff: float = 1e-3,
    spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """The U-Net loss weight map ``class_weight[mask]`` + the border term.

    Parameters
    ----------
    mask : numpy.ndarray
        Integer (or boolean) class map with values in ``[0, len(class_weight))``.
    class_weight : numpy.ndarray
        Per-class weights, e.g. from :func:`class_weights` over the training set.
    foreground_class, w0, sigma, cutoff, spacing
        Passed to :func:`border_weights` (``sigma`` in the units of ``spacing``, pixels
        by default).
    border : bool
        Add the border (separation) term; ``False`` gives the class weights only.

    Returns
    -------
    numpy.ndarray of float32, shape ``mask.shape``

    Raises
    ------
    InvalidArgumentError
        If the mask is not integer or has a value without a class weight.

    Examples
    --------
    >>> w = weight_map(np.array([[0, 1, 1, 1]]), np.array([2.0, 2 / 3]))
    >>> w.dtype, bool(np.allclose(w, [[2, 2 / 3, 2 / 3, 2 / 3]]))
    (dtype('float32'), True)
    """
    mask = _integer_mask(mask)
    class_weight = np.asarray(class_weight, dtype=np.float64).ravel()
    if mask.size and (mask.min() < 0 or mask.max() >= class_weight.size):
        raise InvalidArgumentError(
            f"mask has values in [{mask.min()}, {mask.max()}] but only "
            f"{class_weight.size} class weights"
        )
    out = class_weight[mask].astype(np.float32)
    if border:
        out += border_weights(mask, foreground_class, w0, sigma, cutoff, spacing)
    return out

"""Segmentation metrics: pixel error, adapted Rand error (ISBI 2012), IoU, Dice and HD95.

Only numpy and scipy are used. :func:`adapted_rand_error` and :func:`expand_labels`
give the same results as ``skimage.metrics.adapted_rand_error`` and
``skimage.segmentation.expand_labels``.

:func:`isbi_scores` evaluates membrane-style EM segmentations the ISBI 2012 way: the
cell-interior probability is thresholded at several levels, the connected components
of the predicted interior (the predicted cells) are grown over the predicted membrane
and compared with the true cells by the foreground-restricted adapted Rand error; the
best pixel error and the best Rand error over the thresholds are reported.

Examples
--------
>>> import numpy as np
>>> true = np.array([[1, 1, 0, 2, 2]])
>>> adapted_rand_error(true, np.array([[1, 1, 1, 2, 2]]))
0.0
>>> adapted_rand_error(true, np.array([[1, 1, 1, 1, 1]]))
0.5
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import InvalidArgumentError, InvalidImageError

__all__ = [
    "DEFAULT_THRESHOLDS",
    "adapted_rand_error",
    "check_spacing",
    "expand_labels",
    "hd95",
    "iou_dice",
    "is_binary_255",
    "isbi_scores",
    "pixel_error",
    "volume_scores",
]

DEFAULT_THRESHOLDS: np.ndarray = np.round(np.arange(0.05, 0.951, 0.05), 2)
"""The thresholds tried by :func:`isbi_scores`: 0.05, 0.10, ..., 0.95."""


# -- validation helpers ---------------------------------------------------------------------


def _array(value: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(
            f"{name} of type {type(value).__name__} is not an array: {exc}"
        ) from None
    if arr.size == 0:
        raise InvalidArgumentError(f"{name} is empty, shape {arr.shape}")
    return arr


def _same_shape(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape != b.shape:
        raise InvalidArgumentError(f"{names} differ in shape: {a.shape} and {b.shape}")


def _integer_labels(value: Any, name: str) -> np.ndarray:
    arr = _array(value, name)
    if arr.dtype != np.bool_ and arr.dtype.kind not in "iu":
        raise InvalidArgumentError(f"{name} must hold integer labels, not dtype {arr.dtype}")
    return arr


def check_thresholds(thresholds: Any) -> np.ndarray:
    """Validate probability thresholds: a non-empty 1-D sequence of numbers in [0, 1].

    Parameters
    ----------
    thresholds : float or sequence of float
        The thresholds.

    Returns
    -------
    numpy.ndarray of float64, 1-D

    Raises
    ------
    InvalidArgumentError
        Empty, not numeric, not finite or outside [0, 1].

    Examples
    --------
    >>> check_thresholds([0.25, 0.5]).tolist()
    [0.25, 0.5]
    """
    try:
        arr = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"thresholds {thresholds!r} are not numbers") from None
    if arr.ndim != 1 or arr.size == 0:
        raise InvalidArgumentError(
            f"thresholds must be a non-empty 1-D sequence, got shape {arr.shape}"
        )
    if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
        raise InvalidArgumentError(f"thresholds must lie in [0, 1], got {arr.tolist()}")
    return arr


def check_distance(distance: Any) -> float:
    number = (int, float, np.integer, np.floating)
    if isinstance(distance, bool) or not isinstance(distance, number):
        raise InvalidArgumentError(f"expand distance {distance!r} is not a number")
    if not np.isfinite(distance) or distance < 0:
        raise InvalidArgumentError(f"expand distance {distance} must be a finite number >= 0")
    return float(distance)


# -- elementary metrics ---------------------------------------------------------------------


def pixel_error(pred: np.ndarray, true: np.ndarray) -> float:
    """Fraction of pixels whose values differ.

    Parameters
    ----------
    pred, true : numpy.ndarray
        Predicted and true label (or binary) images of the same shape.

    Returns
    -------
    float
        ``mean(pred != true)``, in [0, 1].

    Raises
    ------
    InvalidArgumentError
        The arrays are empty or differ in shape.

    Examples
    --------
    >>> pixel_error(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]))
    0.25
    """
    p, t = _array(pred, "prediction"), _array(true, "ground truth")
    _same_shape(p, t, "prediction and ground truth")
    return float(np.count_nonzero(p != t) / p.size)


def _compact(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels as indices 0..n-1 (kept as they are when already small and non-negative)."""
    if labels.dtype == np.bool_:
        return labels.astype(np.intp), 2
    low, high = int(labels.min()), int(labels.max())
    if low >= 0 and high <= 2 * labels.size:
        return labels.astype(np.intp, copy=False), high + 1
    values, inverse = np.unique(labels, return_inverse=True)
    return inverse.ravel(), len(values)


def adapted_rand_error(true_seg: np.ndarray, pred_seg: np.ndarray) -> float:
    """Adapted Rand error of a segmentation: 1 - F-score of the Rand index (ISBI 2012).

    Pixels labelled 0 in ``true_seg`` are ignored (foreground-restricted Rand index);
    label 0 in ``pred_seg`` is an ordinary segment. With ``n_ij`` the number of pixels
    of true segment ``i`` and predicted segment ``j`` (true label ``i != 0``), ``t_i``
    and ``s_j`` the row and column sums and ``n`` their total, the error is
    ``1 - sum(n_ij**2 - n_ij) / (0.5 * sum(t_i**2 - t_i) + 0.5 * sum(s_j**2 - s_j))``:
    the same value as ``skimage.metrics.adapted_rand_error(true_seg, pred_seg)[0]``,
    computed from a sparse contingency table.

    Parameters
    ----------
    true_seg : numpy.ndarray of int
        Ground-truth label image; 0 = ignored (e.g. membrane).
    pred_seg : numpy.ndarray of int
        Predicted label image, same shape.

    Returns
    -------
    float
        The error in [0, 1]; NaN when there are no pixel pairs to compare (e.g. no
        foreground in ``true_seg``), as scikit-image.

    Raises
    ------
    InvalidArgumentError
        Empty arrays, different shapes or non-integer labels.

    Examples
    --------
    Splitting a true segment in two halves costs a third:

    >>> true = np.array([[1, 1, 1, 1], [2, 2, 2, 2]])
    >>> round(adapted_rand_error(true, np.array([[1, 1, 3, 3], [2, 2, 2, 2]])), 4)
    0.2
    """
    t = _integer_labels(true_seg, "true segmentation")
    p = _integer_labels(pred_seg, "predicted segmentation")
    _same_shape(t, p, "true and predicted segmentations")
    keep = t.ravel() != 0
    t, p = t.ravel()[keep], p.ravel()[keep]
    n = t.size
    if n == 0:
        return float("nan")
    rows, n_rows = _compact(t)
    cols, n_cols = _compact(p)
    from scipy import sparse  # deferred: importing scipy costs CLI start-up time

    table = sparse.coo_matrix(
        (np.ones(n, dtype=np.float64), (rows, cols)), shape=(n_rows, n_cols)
    ).tocsr()
    table.sum_duplicates()
    counts = table.data
    sum_p2 = float(counts @ counts) - n
    true_sizes = np.asarray(table.sum(axis=1), dtype=np.float64).ravel()
    pred_sizes = np.asarray(table.sum(axis=0), dtype=np.float64).ravel()
    sum_t2 = float(true_sizes @ true_sizes) - n
    sum_s2 = float(pred_sizes @ pred_sizes) - n
    denominator = 0.5 * sum_t2 + 0.5 * sum_s2
    if denominator <= 0:
        return float("nan")
    return float(1.0 - sum_p2 / denominator)


def expand_labels(labels: np.ndarray, distance: float = 1) -> np.ndarray:
    """Grow labels into the background (0) by up to ``distance`` pixels, nearest label wins.

    Each background pixel within Euclidean distance ``distance`` of a labelled pixel
    takes that pixel's label; labels never overwrite one another. The nearest labelled
    pixel is the one :func:`scipy.ndimage.distance_transform_edt` returns, exactly as in
    ``skimage.segmentation.expand_labels`` (same result, ties included: a pixel
    equidistant from two labels takes the one scipy's transform picks).

    Parameters
    ----------
    labels : numpy.ndarray of int
        Label image, any number of dimensions; 0 is background.
    distance : float
        Maximum growth in pixels (>= 0).

    Returns
    -------
    numpy.ndarray
        The grown labels, same shape and dtype.

    Raises
    ------
    InvalidArgumentError
        Non-integer labels or a negative distance.

    Examples
    --------
    >>> expand_labels(np.array([0, 1, 0, 0, 0, 0, 2]), distance=1)
    array([1, 1, 1, 0, 0, 2, 2])
    >>> expand_labels(np.array([0, 1, 0, 0, 0, 0, 2]), distance=3)
    array([1, 1, 1, 1, 2, 2, 2])
    """
    arr = _integer_labels(labels, "labels")
    distance = check_distance(distance)
    background = arr == 0
    if background.all() or not background.any():
        return arr.copy()
    from scipy import ndimage

    dist, nearest = ndimage.distance_transform_edt(background, return_indices=True)
    out = arr.copy()
    grow = background & (dist <= distance)
    out[grow] = arr[tuple(index[grow] for index in nearest)]
    return out


def _confusion(pred: np.ndarray, true: np.ndarray, num_classes: int) -> np.ndarray:
    """``(K, K)`` int64 counts: rows true class, columns predicted class."""
    k = int(num_classes)
    flat = true.astype(np.int64, copy=False).ravel() * k + pred.astype(np.int64, copy=False).ravel()
    return np.bincount(flat, minlength=k * k).reshape(k, k)


def _class_scores(confusion: np.ndarray) -> dict[int, dict[str, float]]:
    """Per class IoU and Dice from a confusion matrix (1.0 for a class absent in both)."""
    scores = {}
    for c in range(confusion.shape[0]):
        both = int(confusion[c, c])
        true_count = int(confusion[c].sum())
        pred_count = int(confusion[:, c].sum())
        union = true_count + pred_count - both
        if union == 0:
            scores[c] = {"iou": 1.0, "dice": 1.0}
        else:
            scores[c] = {"iou": both / union, "dice": 2 * both / (true_count + pred_count)}
    return scores


def _check_classes(arr: np.ndarray, num_classes: int, name: str) -> None:
    low, high = int(arr.min()), int(arr.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise InvalidArgumentError(
            f"{name} holds class {bad}, outside 0..{num_classes - 1} for {num_classes} classes"
        )


def iou_dice(pred: np.ndarray, true: np.ndarray, num_classes: int) -> dict[int, dict[str, float]]:
    """Intersection over union and Dice coefficient of every class.

    Parameters
    ----------
    pred, true : numpy.ndarray of int
        Predicted and true class maps of the same shape, values in ``0..num_classes-1``.
    num_classes : int
        Number of classes (>= 1).

    Returns
    -------
    dict
        ``{class: {"iou": float, "dice": float}}`` for every class; a class absent from
        both maps scores 1.0 (nothing to find, nothing wrongly found).

    Raises
    ------
    InvalidArgumentError
        Different shapes, non-integer maps, a bad class count or values out of range.

    Examples
    --------
    >>> scores = iou_dice(np.array([0, 1, 1, 1]), np.array([0, 0, 1, 1]), 3)
    >>> scores[1]
    {'iou': 0.6666666666666666, 'dice': 0.8}
    >>> scores[2]
    {'iou': 1.0, 'dice': 1.0}
    """
    p = _integer_labels(pred, "prediction")
    t = _integer_labels(true, "ground truth")
    _same_shape(p, t, "prediction and ground truth")
    integer = isinstance(num_classes, (int, np.integer)) and not isinstance(num_classes, bool)
    if not integer or num_classes < 1:
        raise InvalidArgumentError(f"num_classes {num_classes!r} must be a positive integer")
    _check_classes(p, int(num_classes), "prediction")
    _check_classes(t, int(num_classes), "ground truth")
    return _class_scores(_confusion(p, t, int(num_classes)))


# -- surface distances (HD95) and per-class volume scores -----------------------------------


def check_spacing(spacing: Any, ndim: int) -> np.ndarray:
    """Validate a voxel spacing: ``ndim`` finite positive numbers (one number: isotropic).

    Parameters
    ----------
    spacing : float or sequence of float or None
        Voxel size along each axis, in the order of the array's axes (e.g. Z, Y, X);
        None means 1 along every axis.
    ndim : int
        Number of axes of the arrays it describes.

    Returns
    -------
    numpy.ndarray of float64, shape ``(ndim,)``

    Raises
    ------
    InvalidArgumentError
        Not numbers, the wrong number of values, or values that are not finite and > 0.

    Examples
    --------
    >>> check_spacing((3, 1, 1), 3).tolist()
    [3.0, 1.0, 1.0]
    >>> check_spacing(0.5, 2).tolist()
    [0.5, 0.5]
    """
    if spacing is None:
        return np.ones(ndim)
    try:
        arr = np.asarray(spacing, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"spacing {spacing!r} is not numbers") from None
    if arr.ndim == 0:
        arr = np.full(ndim, float(arr))
    if arr.shape != (ndim,):
        raise InvalidArgumentError(
            f"spacing {np.asarray(spacing).tolist()} has {arr.size} values; expected {ndim}, "
            "one per axis"
        )
    if not (np.isfinite(arr).all() and (arr > 0).all()):
        raise InvalidArgumentError(
            f"spacing {arr.tolist()} must hold finite numbers > 0 (the voxel size per axis)"
        )
    return arr


def _binary(value: Any, name: str) -> np.ndarray:
    arr = _array(value, name)
    if arr.dtype != np.bool_ and arr.dtype.kind not in "iu":
        raise InvalidArgumentError(f"{name} must be a binary mask, not dtype {arr.dtype}")
    return arr.astype(bool, copy=False)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (the image border is outside)."""
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, structure=_cross(mask.ndim), border_value=0)


def hd95(pred: np.ndarray, true: np.ndarray, spacing: Any = None) -> float:
    """95th-percentile Hausdorff distance between two binary masks (2D or 3D).

    The surface of a mask is its voxels with at least one face neighbour (the 4- or
    6-neighbourhood) outside the mask; voxels on the image border count as surface
    (outside the image is background). This is the surface of MONAI's ``get_mask_edges``
    and of medpy's ``hd95``: the mask XOR its erosion by the face-connected cross.
    For each surface voxel of one mask the Euclidean distance to the nearest surface
    voxel of the other is taken in physical units (``distance_transform_edt`` with
    ``sampling=spacing``); the result is the larger of the two directed 95th
    percentiles (linear interpolation): MONAI's definition
    (``compute_hausdorff_distance(..., percentile=95)``, also that of DeepMind's
    surface-distance ``compute_robust_hausdorff`` up to its surfel weights). medpy's
    ``hd95`` takes the 95th percentile of the union of both directed sets instead,
    which is never larger.

    Parameters
    ----------
    pred, true : numpy.ndarray of bool (or 0/1 integers)
        Predicted and true masks of the same shape, any number of dimensions.
    spacing : float or sequence of float, optional
        Voxel size per axis (e.g. Z, Y, X in mm); by default 1 (distances in voxels).

    Returns
    -------
    float
        The distance in the units of ``spacing``. 0.0 when both masks are empty
        (nothing to find, nothing wrongly found); ``inf`` when exactly one is empty
        (the distance to an empty surface is infinite), as MONAI.

    Raises
    ------
    InvalidArgumentError
        Empty arrays, different shapes, non-binary dtypes or a bad spacing.

    Examples
    --------
    Two one-voxel objects two slices apart, 3 mm slices:

    >>> a = np.zeros((4, 3, 3), bool)
    >>> b = a.copy()
    >>> a[0, 1, 1] = b[2, 1, 1] = True
    >>> hd95(a, b, spacing=(3.0, 1.0, 1.0))
    6.0
    >>> hd95(a, np.zeros_like(a)), hd95(a & False, a & False)
    (inf, 0.0)
    """
    p, t = _binary(pred, "prediction"), _binary(true, "ground truth")
    _same_shape(p, t, "prediction and ground truth")
    sampling = check_spacing(spacing, p.ndim)
    has_p, has_t = bool(p.any()), bool(t.any())
    if not (has_p or has_t):
        return 0.0
    if not (has_p and has_t):
        return float("inf")
    # Crop to the union's bounding box with a background margin of one voxel: the same
    # surfaces as the whole image, and every surface voxel (so every nearest one) inside.
    union = np.nonzero(p | t)
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in union)
    p = np.pad(p[box], 1)
    t = np.pad(t[box], 1)
    from scipy import ndimage

    surface_p, surface_t = _surface(p), _surface(t)
    to_t = ndimage.distance_transform_edt(~surface_t, sampling=sampling)[surface_p]
    to_p = ndimage.distance_transform_edt(~surface_p, sampling=sampling)[surface_t]
    return float(max(np.percentile(to_t, 95), np.percentile(to_p, 95)))


def check_regions(regions: Any, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Validate BraTS-style regions: names mapped to non-empty sets of foreground classes.

    Parameters
    ----------
    regions : mapping of str to sequence of int, or None
        E.g. ``{"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}``.
    num_classes : int
        Number of classes; region classes must lie in ``1..num_classes-1``.

    Returns
    -------
    dict of str to tuple of int
        The regions, classes sorted and unique (empty without regions).

    Raises
    ------
    InvalidArgumentError
        Not a mapping, an empty name or region, or a class out of range.

    Examples
    --------
    >>> check_regions({"WT": [2, 1]}, 3)
    {'WT': (1, 2)}
    """
    if regions is None:
        return {}
    if not isinstance(regions, dict):
        raise InvalidArgumentError(
            f"regions {regions!r} must map names to classes, e.g. {{'WT': (1, 2, 3)}}"
        )
    out = {}
    for name, classes in regions.items():
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"region name {name!r} must be a non-empty string")
        try:
            values = sorted({int(c) for c in np.atleast_1d(np.asarray(classes))})
        except (TypeError, ValueError):
            raise InvalidArgumentError(
                f"region {name} classes {classes!r} are not class numbers"
            ) from None
        if not values or values[0] < 1 or values[-1] >= num_classes:
            raise InvalidArgumentError(
                f"region {name} classes {values} must be foreground classes in "
                f"1..{num_classes - 1} for {num_classes} classes"
            )
        out[name] = tuple(values)
    return out


def volume_scores(
    pred: np.ndarray,
    true: np.ndarray,
    num_classes: int,
    spacing: Any = None,
    regions: dict[str, Sequence[int]] | None = None,
) -> dict[str, dict[Any, dict[str, float]]]:
    """Dice, IoU and HD95 of every foreground class (and region) of a 2D or 3D class map.

    The BraTS way: each foreground class ``1..num_classes-1`` (background, class 0, is
    left out) is scored as a binary mask, Dice and IoU from :func:`iou_dice`, HD95 from
    :func:`hd95`. A region (e.g. whole tumour ``{1, 2, 3}``) is the union of its
    classes, scored in the same way.

    Parameters
    ----------
    pred, true : numpy.ndarray of int
        Predicted and true class maps of the same shape, values in ``0..num_classes-1``.
    num_classes : int
        Number of classes (>= 2).
    spacing : float or sequence of float, optional
        Voxel size per axis (e.g. Z, Y, X in mm); HD95 is in its units (voxels without).
    regions : mapping of str to sequence of int, optional
        Named unions of foreground classes (see :func:`check_regions`).

    Returns
    -------
    dict
        ``"classes"``: ``{class: {"dice", "iou", "hd95"}}`` for every foreground class;
        ``"regions"``: ``{name: {"dice", "iou", "hd95"}}`` (empty without regions).
        A class absent from both maps has Dice and IoU 1.0 and HD95 0.0; one present
        in only one of them has Dice and IoU 0.0 and HD95 ``inf``.

    Raises
    ------
    InvalidArgumentError
        Different shapes, non-integer maps, values out of range, a bad class count,
        spacing or regions.

    Examples
    --------
    >>> true = np.zeros((3, 4, 4), np.uint8)
    >>> true[1, 1:3, 1:3] = 2
    >>> pred = true.copy()
    >>> pred[1, 1, 1] = 1
    >>> scores = volume_scores(pred, true, 3, spacing=(2.0, 0.5, 0.5), regions={"all": (1, 2)})
    >>> scores["classes"][2]["dice"], scores["classes"][1]["hd95"], scores["regions"]["all"]
    (0.8571428571428571, inf, {'iou': 1.0, 'dice': 1.0, 'hd95': 0.0})
    """
    integer = isinstance(num_classes, (int, np.integer)) and not isinstance(num_classes, bool)
    if not integer or num_classes < 2:
        raise InvalidArgumentError(f"num_classes {num_classes!r} must be an integer >= 2")
    k = int(num_classes)
    dice = iou_dice(pred, true, k)  # validates shapes, dtypes and class ranges
    p, t = np.asarray(pred), np.asarray(true)
    sampling = check_spacing(spacing, p.ndim)
    out: dict[str, dict[Any, dict[str, float]]] = {"classes": {}, "regions": {}}
    for c in range(1, k):
        out["classes"][c] = {**dice[c], "hd95": hd95(p == c, t == c, sampling)}
    for name, classes in check_regions(regions, k).items():
        in_p, in_t = np.isin(p, classes), np.isin(t, classes)
        both = iou_dice(in_p, in_t, 2)[1]
        out["regions"][name] = {**both, "hd95": hd95(in_p, in_t, sampling)}
    return out


# -- ISBI 2012 evaluation -------------------------------------------------------------------


def _cross(ndim: int) -> np.ndarray:
    """4-connectivity (face neighbours) structuring element."""
    from scipy import ndimage

    return ndimage.generate_binary_structure(ndim, 1)


def cells(interior: np.ndarray, expand_distance: float = 0) -> np.ndarray:
    """Connected components (4-connectivity) of a binary interior, grown by a distance.

    Parameters
    ----------
    interior : numpy.ndarray of bool
        Cell-interior mask (2D).
    expand_distance : float
        How far the cells grow over the background (0: not at all).

    Returns
    -------
    numpy.ndarray of int32
        Cell labels 1..n; 0 where no cell reaches.

    Examples
    --------
    >>> cells(np.array([[1, 1, 0, 0, 1]], bool), 1).tolist()
    [[1, 1, 1, 2, 2]]
    """
    from scipy import ndimage

    labels, _ = ndimage.label(np.asarray(interior, dtype=bool), structure=_cross(np.ndim(interior)))
    return expand_labels(labels, expand_distance) if expand_distance > 0 else labels


def slice_curves(
    probability: np.ndarray,
    true_interior: np.ndarray,
    thresholds: np.ndarray,
    expand_distance: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-threshold mismatch counts and adapted Rand errors of one 2D slice.

    Parameters
    ----------
    probability : numpy.ndarray of float, (Y, X)
        Cell-interior probability.
    true_interior : numpy.ndarray of bool, (Y, X)
        True cell interior.
    thresholds : numpy.ndarray
        Validated thresholds (see :func:`check_thresholds`).
    expand_distance : float
        How far predicted cells grow over the predicted membrane.

    Returns
    -------
    mismatches : numpy.ndarray of int64, (T,)
        Pixels where ``probability >= t`` differs from ``true_interior``.
    rand : numpy.ndarray of float64, (T,)
        Adapted Rand error of the grown predicted cells against the (not grown) true
        cells, true membrane ignored; NaN where undefined.
    """
    true_cells = cells(true_interior)
    mismatches = np.empty(len(thresholds), dtype=np.int64)
    rand = np.empty(len(thresholds), dtype=np.float64)
    for i, t in enumerate(thresholds):
        predicted = probability >= t
        mismatches[i] = np.count_nonzero(predicted != true_interior)
        rand[i] = adapted_rand_error(true_cells, cells(predicted, expand_distance))
    return mismatches, rand


def _best(values: np.ndarray, thresholds: np.ndarray) -> tuple[float, float | None]:
    """Smallest value and its threshold; ties go to the threshold closest to 0.5, then lower."""
    candidates = [
        (float(v), abs(float(t) - 0.5), float(t))
        for v, t in zip(values, thresholds)
        if not np.isnan(v)
    ]
    if not candidates:
        return float("nan"), None
    value, _, threshold = min(candidates)
    return value, threshold


def _mean_ignoring_nan(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """Mean along ``axis`` over non-NaN entries; NaN where all are NaN (no warning)."""
    valid = ~np.isnan(values)
    count = valid.sum(axis=axis)
    total = np.where(valid, values, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def summarise_curves(
    thresholds: np.ndarray, mismatches: np.ndarray, pixels: int, rand: np.ndarray
) -> dict[str, Any]:
    """Turn pooled per-threshold figures into the :func:`isbi_scores` dictionary.

    Parameters
    ----------
    thresholds : numpy.ndarray, (T,)
        The thresholds.
    mismatches : numpy.ndarray, (T,)
        Mismatching pixels at each threshold, summed over all slices.
    pixels : int
        Pixels of all slices.
    rand : numpy.ndarray, (S, T)
        Adapted Rand error of each slice at each threshold (averaged over slices,
        ignoring NaN).

    Returns
    -------
    dict
        See :func:`isbi_scores`.
    """
    pixel = np.asarray(mismatches, dtype=np.float64) / pixels
    rand_mean = _mean_ignoring_nan(np.asarray(rand, dtype=np.float64).reshape(-1, len(thresholds)))
    best_pixel, pixel_threshold = _best(pixel, thresholds)
    best_rand, rand_threshold = _best(rand_mean, thresholds)
    return {
        "pixel_error": best_pixel,
        "pixel_threshold": pixel_threshold,
        "rand_error": best_rand,
        "rand_threshold": rand_threshold,
        "slices": int(np.asarray(rand).reshape(-1, len(thresholds)).shape[0]),
        "per_threshold": [
            {"threshold": float(t), "pixel_error": float(pe), "rand_error": float(re)}
            for t, pe, re in zip(thresholds, pixel, rand_mean)
        ],
    }


def is_binary_255(values: Any) -> bool:
    """Whether a mask's values are all 0 or 255: an ISBI-style binary mask (255 is the
    foreground, class 1), as training and ``tilerseg eval`` read one.

    Examples
    --------
    >>> is_binary_255(np.array([0, 255])), is_binary_255(np.array([0, 1, 255]))
    (True, False)
    """
    return bool(np.isin(values, (0, 255)).all())


def binary_interior(mask: Any, name: str = "true mask") -> np.ndarray:
    """Boolean cell interior of an ISBI-style mask: 255 (or 1, or True) interior, 0 membrane.

    Parameters
    ----------
    mask : numpy.ndarray
        Values all in {0, 255}, or all in {0, 1}, or boolean.
    name : str
        What to call the mask in error messages.

    Returns
    -------
    numpy.ndarray of bool

    Raises
    ------
    InvalidImageError
        Other values (e.g. a multi-class map or mixed 1 and 255).

    Examples
    --------
    >>> binary_interior(np.array([0, 255, 255])).tolist()
    [False, True, True]
    """
    arr = np.asarray(mask)
    if arr.dtype == np.bool_:
        return arr
    if arr.dtype.kind not in "iuf":
        raise InvalidImageError(f"{name} has unsupported dtype {arr.dtype}")
    values = np.unique(arr)
    if np.isin(values, (0, 1)).all():
        return arr == 1
    if is_binary_255(values):
        return arr == 255
    shown = ", ".join(str(v) for v in values[:6].tolist()) + (", ..." if len(values) > 6 else "")
    raise InvalidImageError(
        f"{name} values ({shown}) are not understood; expected 0 = membrane and 255 (or 1) = "
        "cell interior"
    )


def isbi_scores(
    cell_probability: np.ndarray,
    true_mask: np.ndarray,
    thresholds: Sequence[float] | np.ndarray = DEFAULT_THRESHOLDS,
    expand_distance: int = 32,
) -> dict[str, Any]:
    """ISBI 2012-style scores of a cell-interior probability map against a binary mask.

    For each threshold ``t``, the predicted interior is ``cell_probability >= t``:

    * pixel error: the fraction of pixels where it differs from the true interior;
    * adapted Rand error (:func:`adapted_rand_error`): the predicted cells, connected
      components (4-connectivity) of the predicted interior grown over the predicted
      membrane by up to ``expand_distance`` pixels (:func:`expand_labels`), against the
      true cells, connected components (4-connectivity) of the true interior. The true
      cells are *not* grown: true membrane pixels keep label 0 and are ignored, which
      is the foreground-restricted Rand index of the ISBI 2012 challenge (borders
      carry no score: a prediction is not penalised for which cell a membrane pixel is
      given to, only for merging or splitting cells).

    A stack is scored slice by slice (the usual ISBI practice): the pixel error pools
    all pixels (with equal slice sizes, the mean of the slice errors) and the Rand error
    is the mean of the slice errors (slices where it is undefined, with no true
    interior pixel pairs, are left out). The best threshold of each measure is chosen
    independently; ties go to the threshold closest to 0.5.

    Parameters
    ----------
    cell_probability : numpy.ndarray of float, (Y, X) or (N, Y, X)
        Probability of cell interior, in [0, 1] (class 1 of the project's EM models).
    true_mask : numpy.ndarray, same shape
        255 (or 1, or True) = cell interior, 0 = membrane.
    thresholds : sequence of float
        Thresholds to try, in [0, 1]; by default 0.05, 0.10, ..., 0.95.
    expand_distance : int
        How far predicted cells grow over the predicted membrane, in pixels.

    Returns
    -------
    dict
        ``"pixel_error"`` and ``"pixel_threshold"``: best pixel error and its threshold;
        ``"rand_error"`` and ``"rand_threshold"``: best adapted Rand error and its
        threshold (NaN and None if undefined at every threshold); ``"slices"``: number
        of slices; ``"per_threshold"``: a list of ``{"threshold", "pixel_error",
        "rand_error"}`` in the order of ``thresholds``.

    Raises
    ------
    InvalidArgumentError
        Shapes differ or are not 2D/3D, probabilities are not finite values in [0, 1],
        or bad thresholds or distance.
    InvalidImageError
        The mask has values other than 0 and 255 (or 0 and 1).

    Examples
    --------
    >>> mask = np.zeros((8, 9), np.uint8)
    >>> mask[:, :4] = mask[:, 5:] = 255
    >>> scores = isbi_scores(mask / 255, mask, thresholds=[0.5])
    >>> scores["pixel_error"], scores["rand_error"], scores["rand_threshold"]
    (0.0, 0.0, 0.5)
    """
    prob = _array(cell_probability, "cell probability")
    truth = _array(true_mask, "true mask")
    _same_shape(prob, truth, "cell probability and true mask")
    if prob.ndim not in (2, 3):
        raise InvalidArgumentError(
            f"cell probability has shape {prob.shape}; expected (Y, X) or (N, Y, X)"
        )
    if prob.dtype == np.bool_ or prob.dtype.kind not in "iuf":
        raise InvalidArgumentError(f"cell probability has unsupported dtype {prob.dtype}")
    if not np.isfinite(prob).all():
        raise InvalidArgumentError("cell probability contains NaN or Inf values")
    if prob.min() < 0 or prob.max() > 1:
        raise InvalidArgumentError(
            f"cell probability must lie in [0, 1], got {float(prob.min())} to {float(prob.max())}"
        )
    ts = check_thresholds(thresholds)
    distance = check_distance(expand_distance)
    interior = binary_interior(truth)
    if prob.ndim == 2:
        prob, interior = prob[None], interior[None]
    mismatches = np.zeros(len(ts), dtype=np.int64)
    rand = np.empty((prob.shape[0], len(ts)))
    for s in range(prob.shape[0]):
        m, rand[s] = slice_curves(prob[s], interior[s], ts, distance)
        mismatches += m
    return summarise_curves(ts, mismatches, prob.size, rand)

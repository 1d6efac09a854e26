"""The U-Net paper's data augmentation: dihedral flips/rotations, smooth elastic
deformations and grey-value changes, each switchable.

Every geometric transform is applied identically to the image, its mask and its weight
map (the last two axes of each array), so they stay aligned. Arrays are ``(Y, X)`` or
``(C, Y, X)``; channels share one transform.

Borders: resampling past the array edges mirrors the array as numpy's
``np.pad(..., mode="reflect")`` does (the edge pixel is not repeated), which is the
convention of the rest of tilerseg. In :mod:`scipy.ndimage` that extension is called
``mode="mirror"``; scipy's ``mode="reflect"`` repeats the edge pixel (numpy's
``"symmetric"``), so this module uses ``"mirror"`` throughout.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from ..errors import InvalidArgumentError

__all__ = [
    "augment",
    "displacement_field",
    "elastic_deform",
    "flip_rotate",
    "grey_values",
    "warp",
]

# scipy.ndimage's name for numpy's "reflect" (edge pixel not repeated).
_MIRROR = "mirror"


def _spline_matrix(n: int, grid: int) -> np.ndarray:
    """``(n, grid)`` matrix evaluating the cubic interpolating spline through ``grid``
    evenly spaced nodes at ``n`` evenly spaced pixels, first and last node on the first
    and last pixel."""
    positions = np.linspace(0.0, grid - 1.0, n) if n > 1 else np.zeros(1)
    eye = np.eye(grid)
    return np.stack(
        [ndimage.map_coordinates(eye[j], [positions], order=3, mode=_MIRROR) for j in range(grid)],
        axis=1,
    )


def displacement_field(
    shape: Sequence[int], rng: np.random.Generator, grid: int = 3, sigma: float = 10.0
) -> np.ndarray:
    """A smooth random displacement field, as in the U-Net paper.

    Displacement vectors are drawn from ``N(0, sigma)`` (pixels, each component
    independently) at the nodes of a coarse ``grid x grid`` lattice whose corner nodes
    sit on the image's corner pixels (nodes evenly spaced, so edge nodes lie on the
    image's edges), and interpolated to every pixel by bicubic (tensor-product cubic
    B-spline, :func:`scipy.ndimage.map_coordinates` ``order=3``) interpolation through
    the node values. The field equals the drawn vector at every node.

    Parameters
    ----------
    shape : sequence of int
        ``(Y, X)``.
    rng : numpy.random.Generator
    grid : int
        Nodes per axis, ``>= 2``.
    sigma : float
        Standard deviation of the node displacements in pixels, ``>= 0``.

    Returns
    -------
    numpy.ndarray of float64, shape ``(2, Y, X)``
        Row and column displacements.
    """
    rows, cols = (int(n) for n in shape)
    grid = int(grid)
    if grid < 2:
        raise InvalidArgumentError(f"grid must be >= 2, got {grid}")
    if not sigma >= 0:
        raise InvalidArgumentError(f"sigma must be >= 0, got {sigma}")
    nodes = rng.normal(0.0, float(sigma), size=(2, grid, grid))
    by, bx = _spline_matrix(rows, grid), _spline_matrix(cols, grid)
    return np.einsum("yi,cij,xj->cyx", by, nodes, bx)


def _trailing_shape(arrays: Sequence[np.ndarray]) -> tuple[int, int]:
    shapes = {a.shape[-2:] for a in arrays}
    if any(a.ndim not in (2, 3) for a in arrays):
        raise InvalidArgumentError(
            f"arrays must be (Y, X) or (C, Y, X), got shapes {[a.shape for a in arrays]}"
        )
    if len(shapes) != 1:
        raise InvalidArgumentError(f"arrays must share their last two axes, got {sorted(shapes)}")
    return shapes.pop()


def elastic_deform(
    arrays: Sequence[np.ndarray],
    orders: Sequence[int],
    rng: np.random.Generator,
    grid: int = 3,
    sigma: float = 10.0,
) -> list[np.ndarray]:
    """Deform several aligned arrays with one smooth random displacement field.

    The field comes from :func:`displacement_field` and is applied by :func:`warp`:
    output pixel ``p`` takes the value of the input at ``p + field(p)``, resampled by
    :func:`scipy.ndimage.map_coordinates` with each array's own spline order and
    ``mode="mirror"`` (numpy's ``"reflect"``, see the module docstring) past the borders.

    Parameters
    ----------
    arrays : sequence of numpy.ndarray
        ``(Y, X)`` or ``(C, Y, X)`` arrays with the same last two axes.
    orders : sequence of int
        Spline order per array: 3 (bicubic) for images, 1 (bilinear) for weight maps,
        0 (nearest) for masks and labels.
    rng : numpy.random.Generator
    grid, sigma
        See :func:`displacement_field`.

    Returns
    -------
    list of numpy.ndarray
        Same shapes; float32 for ``order > 0``, the input dtype for ``order == 0``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> image, mask = np.zeros((2, 32, 32), np.float32), np.zeros((32, 32), np.uint8)
    >>> out = elastic_deform([image, mask], [3, 0], rng)
    >>> [(a.shape, a.dtype.name) for a in out]
    [((2, 32, 32), 'float32'), ((32, 32), 'uint8')]
    """
    arrays = [np.asarray(a) for a in arrays]
    if not arrays:
        return []
    field = displacement_field(_trailing_shape(arrays), rng, grid, sigma)
    return warp(arrays, orders, field)


def warp(
    arrays: Sequence[np.ndarray], orders: Sequence[int], field: np.ndarray
) -> list[np.ndarray]:
    """Resample aligned arrays with one displacement field.

    Output pixel ``p`` takes the input's value at ``p + field[:, p]``, interpolated by
    :func:`scipy.ndimage.map_coordinates` with each array's spline order; positions
    past the borders are mirrored as numpy's ``mode="reflect"`` does (scipy's
    ``mode="mirror"``).

    Parameters
    ----------
    arrays : sequence of numpy.ndarray
        ``(Y, X)`` or ``(C, Y, X)`` arrays with the same last two axes.
    orders : sequence of int
        Spline order (0 to 5) per array.
    field : numpy.ndarray
        ``(2, Y, X)`` row and column displacements in pixels.

    Returns
    -------
    list of numpy.ndarray
        Same shapes; float32 for ``order > 0``, the input dtype for ``order == 0``.

    Examples
    --------
    >>> a = np.arange(5.0)[:, None] * np.ones((1, 2))
    >>> shift = np.stack([np.full((5, 2), -2.0), np.zeros((5, 2))])
    >>> warp([a], [0], shift)[0][:, 0].tolist()  # numpy "reflect" past row 0
    [2.0, 1.0, 0.0, 1.0, 2.0]
    """
    arrays = [np.asarray(a) for a in arrays]
    orders = [int(o) for o in orders]
    if len(orders) != len(arrays):
        raise InvalidArgumentError(f"{len(arrays)} arrays but {len(orders)} orders")
    if any(not 0 <= o <= 5 for o in orders):
        raise InvalidArgumentError(f"spline orders must be in [0, 5], got {orders}")
    if not arrays:
        return []
    shape = _trailing_shape(arrays)
    field = np.asarray(field, dtype=np.float64)
    if field.shape != (2,) + shape:
        raise InvalidArgumentError(f"field must have shape {(2,) + shape}, got {field.shape}")
    coords = np.indices(shape, dtype=np.float64) + field
    out = []
    for array, order in zip(arrays, orders):
        planes = array.reshape((-1,) + shape)
        if order == 0:
            source = planes.view(np.uint8) if planes.dtype == bool else planes
            dtype = source.dtype
        else:
            source, dtype = planes, np.float32
        result = np.empty(planes.shape, dtype=dtype)
        for plane, target in zip(source, result):
            ndimage.map_coordinates(plane, coords, output=target, order=order, mode=_MIRROR)
        if order == 0 and array.dtype == bool:
            result = result.view(bool)
        out.append(result.reshape(array.shape))
    return out


def flip_rotate(arrays: Sequence[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """Apply one random dihedral transform (of 8) to all arrays' last two axes.

    A rotation by ``k * 90`` degrees (``k`` uniform in 0..3) optionally followed by a
    left-right flip; together these are the 8 symmetries of the square, each equally
    likely.

    Parameters
    ----------
    arrays : sequence of numpy.ndarray
        Arrays with at least two axes (rotations of non-square arrays swap the last two
        axes' lengths).
    rng : numpy.random.Generator

    Returns
    -------
    list of numpy.ndarray
        C-contiguous copies.
    """
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))
    out = []
    for a in arrays:
        a = np.rot90(np.asarray(a), k, axes=(-2, -1))
        if flip:
            a = a[..., ::-1]
        out.append(np.array(a, order="C", copy=True))
    return out


def grey_values(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness: float = 0.1,
    contrast: float = 0.2,
    gamma: float = 0.2,
) -> np.ndarray:
    """Random gamma, contrast and brightness change of a float image in about [0, 1].

    One set of parameters per call (per sample), shared by all channels::

        g = exp(U(-gamma, gamma))            # gamma, log-uniform around 1
        c = U(1 - contrast, 1 + contrast)    # contrast about the mean
        b = U(-brightness, brightness)       # brightness offset
        y = max(x, 0) ** g                   # (skipped when gamma == 0)
        out = (y - mean(y)) * c + mean(y) + b

    All parameters 0 give the identity.

    Parameters
    ----------
    image : numpy.ndarray
        Floating-point image, any shape.
    rng : numpy.random.Generator
    brightness, contrast, gamma : float
        Ranges of the random changes, ``>= 0``.

    Returns
    -------
    numpy.ndarray
        Same shape and dtype as ``image`` (a new array).

    Raises
    ------
    InvalidArgumentError
        If the image is not floating point or a range is negative.
    """
    image = np.asarray(image)
    if not np.issubdtype(image.dtype, np.floating):
        raise InvalidArgumentError(f"grey_values needs a float image, got dtype {image.dtype}")
    if min(brightness, contrast, gamma) < 0:
        raise InvalidArgumentError("brightness, contrast and gamma ranges must be >= 0")
    g = float(np.exp(rng.uniform(-gamma, gamma)))
    c = float(rng.uniform(1.0 - contrast, 1.0 + contrast))
    b = float(rng.uniform(-brightness, brightness))
    y = np.power(np.maximum(image, 0), g) if gamma > 0 else image.copy()
    mean = y.mean(dtype=np.float64) if y.size else 0.0
    out = (y - mean) * c + (mean + b)
    return out.astype(image.dtype, copy=False)


def augment(
    image: np.ndarray,
    mask: np.ndarray,
    weights: np.ndarray | None,
    rng: np.random.Generator,
    *,
    elastic: bool = True,
    flips: bool = True,
    grey: bool = True,
    grid: int = 3,
    sigma: float = 10.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The U-Net paper's augmentation of one training sample.

    In order: a random flip/rotation (:func:`flip_rotate`) of image, mask and weights;
    a random elastic deformation (:func:`elastic_deform`; image bicubic, mask nearest,
    weights bilinear); a random grey-value change (:func:`grey_values`) of the image.

    Parameters
    ----------
    image : numpy.ndarray
        ``(Y, X)`` or ``(C, Y, X)`` float image, about [0, 1].
    mask : numpy.ndarray
        ``(Y, X)`` integer class map.
    weights : numpy.ndarray or None
        ``(Y, X)`` weight map, or None.
    rng : numpy.random.Generator
    elastic, flips, grey : bool
        Switch each augmentation on or off.
    grid, sigma
        Elastic deformation parameters, see :func:`displacement_field`.

    Returns
    -------
    image, mask, weights
        Augmented copies (``weights`` None if it was None). The image is float32 after an
        elastic deformation and keeps its dtype otherwise.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> image, mask = np.random.default_rng(1).random((1, 16, 16)), np.zeros((16, 16), int)
    >>> out = augment(image, mask, None, rng)
    >>> out[0].shape, out[1].shape, out[2]
    ((1, 16, 16), (16, 16), None)
    """
    arrays = [np.asarray(image), np.asarray(mask)]
    orders = [3, 0]
    if weights is not None:
        arrays.append(np.asarray(weights))
        orders.append(1)
    if flips:
        arrays = flip_rotate(arrays, rng)
    if elastic:
        arrays = elastic_deform(arrays, orders, rng, grid=grid, sigma=sigma)
    elif not flips:
        arrays = [a.copy() for a in arrays]
    if grey:
        arrays[0] = grey_values(arrays[0], rng)
    image, mask = arrays[0], arrays[1]
    return image, mask, (arrays[2] if weights is not None else None)

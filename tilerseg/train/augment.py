"""The U-Net paper's data augmentation: dihedral flips/rotations, smooth elastic
deformations and grey-value changes, each switchable.

Every geometric transform is applied identically to the image, its mask and its weight
map (the last two axes of each array, three for volumes), so they stay aligned. Arrays
are ``(Y, X)`` or ``(C, Y, X)``, volumes ``(Z, Y, X)`` or ``(C, Z, Y, X)``; channels share
one transform.

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
    shape: Sequence[int], rng: np.random.Generator, grid: int = 3,
    sigma: float | Sequence[float] = 10.0,
) -> np.ndarray:
    """A smooth random displacement field, as in the U-Net paper, in 2D or 3D.

    Displacement vectors are drawn from ``N(0, sigma)`` (pixels, each component
    independently) at the nodes of a coarse ``grid x grid`` (``grid**3`` in 3D) lattice
    whose corner nodes sit on the image's corner pixels (nodes evenly spaced, so edge
    nodes lie on the image's edges), and interpolated to every pixel by cubic
    (tensor-product cubic B-spline, :func:`scipy.ndimage.map_coordinates` ``order=3``)
    interpolation through the node values. The field equals the drawn vector at every
    node.

    Parameters
    ----------
    shape : sequence of int
        ``(Y, X)`` or ``(Z, Y, X)``.
    rng : numpy.random.Generator
    grid : int
        Nodes per axis, ``>= 2``.
    sigma : float or sequence of float
        Standard deviation of the node displacements in pixels, ``>= 0``; one per axis
        for anisotropic data (e.g. ``(10 / 3, 10, 10)`` for planes 3 times further apart
        than the pixels: the same displacement in space).

    Returns
    -------
    numpy.ndarray of float64, shape ``(ndim, *shape)``
        Displacements along each axis (rows and columns in 2D).
    """
    shape = tuple(int(n) for n in shape)
    ndim, grid = len(shape), int(grid)
    if grid < 2:
        raise InvalidArgumentError(f"grid must be >= 2, got {grid}")
    sigmas = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (ndim,)) if np.ndim(
        sigma) else None
    if not (np.all(sigmas >= 0) if sigmas is not None else sigma >= 0):
        raise InvalidArgumentError(f"sigma must be >= 0, got {sigma}")
    if sigmas is None:
        nodes = rng.normal(0.0, float(sigma), size=(ndim,) + (grid,) * ndim)
    else:
        nodes = rng.normal(0.0, 1.0, size=(ndim,) + (grid,) * ndim)
        nodes *= sigmas.reshape((ndim,) + (1,) * ndim)
    field = nodes
    for axis, n in enumerate(shape):  # interpolate along each axis in turn
        field = np.moveaxis(np.tensordot(_spline_matrix(n, grid), field, axes=([1], [axis + 1])),
                            0, axis + 1)
    return field


def _trailing_shape(arrays: Sequence[np.ndarray], ndim: int = 2) -> tuple[int, ...]:
    shapes = {a.shape[-ndim:] for a in arrays}
    if any(a.ndim not in (ndim, ndim + 1) for a in arrays):
        axes = "(Y, X) or (C, Y, X)" if ndim == 2 else "(Z, Y, X) or (C, Z, Y, X)"
        raise InvalidArgumentError(
            f"arrays must be {axes}, got shapes {[a.shape for a in arrays]}"
        )
    if len(shapes) != 1:
        raise InvalidArgumentError(
            f"arrays must share their last {ndim} axes, got {sorted(shapes)}")
    return shapes.pop()


def elastic_deform(
    arrays: Sequence[np.ndarray],
    orders: Sequence[int],
    rng: np.random.Generator,
    grid: int = 3,
    sigma: float | Sequence[float] = 10.0,
    ndim: int = 2,
) -> list[np.ndarray]:
    """Deform several aligned arrays with one smooth random displacement field.

    The field comes from :func:`displacement_field` and is applied by :func:`warp`:
    output pixel ``p`` takes the value of the input at ``p + field(p)``, resampled by
    :func:`scipy.ndimage.map_coordinates` with each array's own spline order and
    ``mode="mirror"`` (numpy's ``"reflect"``, see the module docstring) past the borders.

    Parameters
    ----------
    arrays : sequence of numpy.ndarray
        ``(Y, X)`` or ``(C, Y, X)`` arrays with the same last two axes (``(Z, Y, X)`` or
        ``(C, Z, Y, X)`` with ``ndim=3``).
    orders : sequence of int
        Spline order per array: 3 (bicubic) for images, 1 (bilinear) for weight maps,
        0 (nearest) for masks and labels.
    rng : numpy.random.Generator
    grid, sigma
        See :func:`displacement_field`.
    ndim : {2, 3}
        Spatial axes (the last ``ndim`` of every array).

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
    field = displacement_field(_trailing_shape(arrays, ndim), rng, grid, sigma)
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
        ``(Y, X)`` or ``(C, Y, X)`` arrays with the same last two axes (with a 3D
        field: ``(Z, Y, X)`` or ``(C, Z, Y, X)``).
    orders : sequence of int
        Spline order (0 to 5) per array.
    field : numpy.ndarray
        ``(2, Y, X)`` row and column displacements in pixels, or ``(3, Z, Y, X)``.

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
    field = np.asarray(field, dtype=np.float64)
    ndim = field.shape[0] if field.ndim > 1 else 2
    shape = _trailing_shape(arrays, ndim)
    if field.shape != (ndim,) + shape:
        raise InvalidArgumentError(f"field must have shape {(ndim,) + shape}, got {field.shape}")
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


def flip_rotate(arrays: Sequence[np.ndarray], rng: np.random.Generator, ndim: int = 2,
                rotate: bool = True) -> list[np.ndarray]:
    """Apply one random flip/rotation to all arrays' last ``ndim`` axes.

    2D: one of the 8 symmetries of the square, each equally likely: a rotation by
    ``k * 90`` degrees (``k`` uniform in 0..3) optionally followed by a left-right flip.
    3D: a rotation by ``k * 90`` degrees in the (Y, X) plane (only with ``rotate``: a
    rotation would turn an axis into another, so it needs the same voxel side and
    window on Y and X), then a flip of each axis with probability 1/2. The Z axis is
    never rotated into another.

    Parameters
    ----------
    arrays : sequence of numpy.ndarray
        Arrays with at least ``ndim`` axes (rotations of non-square arrays swap the last
        two axes' lengths).
    rng : numpy.random.Generator
    ndim : {2, 3}
        Spatial axes (the last ``ndim``).
    rotate : bool
        Allow 90-degree rotations in the (Y, X) plane (always allowed in 2D).

    Returns
    -------
    list of numpy.ndarray
        C-contiguous copies.

    Examples
    --------
    >>> a = np.arange(8).reshape(2, 2, 2)
    >>> [b.shape for b in flip_rotate([a, a[None]], np.random.default_rng(0), ndim=3)]
    [(2, 2, 2), (1, 2, 2, 2)]
    """
    if ndim == 2:
        k = int(rng.integers(4))
        flips = [-1] if bool(rng.integers(2)) else []
    else:
        k = int(rng.integers(4)) if rotate else 0
        flips = [a - ndim for a in range(ndim) if rng.integers(2)]
    out = []
    for a in arrays:
        a = np.rot90(np.asarray(a), k, axes=(-2, -1))
        if flips:
            a = np.flip(a, axis=flips)
        out.append(np.array(a, order="C", copy=True))
    return out


def grey_values(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness: float = 0.1,
    contrast: float = 0.2,
    gamma: float = 0.2,
    per_channel: bool = False,
) -> np.ndarray:
    """Random gamma, contrast and brightness change of a float image in about [0, 1].

    One set of parameters per call (per sample), shared by all channels::

        g = exp(U(-gamma, gamma))            # gamma, log-uniform around 1
        c = U(1 - contrast, 1 + contrast)    # contrast about the mean
        b = U(-brightness, brightness)       # brightness offset
        y = max(x, 0) ** g                   # (skipped when gamma == 0)
        out = (y - mean(y)) * c + mean(y) + b

    All parameters 0 give the identity.

    With ``per_channel=True`` (multi-modal volumes) each channel (first axis) gets its
    own parameters, and the gamma acts on the channel's own range, ``lo + (hi - lo)
    ((x - lo) / (hi - lo)) ** g`` with ``lo, hi`` its minimum and maximum, so that
    z-scored values (negative ones included) keep their range.

    Parameters
    ----------
    image : numpy.ndarray
        Floating-point image, any shape (``(C, ...)`` with ``per_channel``).
    rng : numpy.random.Generator
    brightness, contrast, gamma : float
        Ranges of the random changes, ``>= 0``.
    per_channel : bool
        One change per channel, gamma over the channel's range (see above).

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
    if per_channel:
        return np.stack([_channel_grey(c, rng, brightness, contrast, gamma)
                         for c in image]) if len(image) else image.copy()
    g = float(np.exp(rng.uniform(-gamma, gamma)))
    c = float(rng.uniform(1.0 - contrast, 1.0 + contrast))
    b = float(rng.uniform(-brightness, brightness))
    y = np.power(np.maximum(image, 0), g) if gamma > 0 else image.copy()
    mean = y.mean(dtype=np.float64) if y.size else 0.0
    out = (y - mean) * c + (mean + b)
    return out.astype(image.dtype, copy=False)


def _channel_grey(x: np.ndarray, rng: np.random.Generator, brightness: float,
                  contrast: float, gamma: float) -> np.ndarray:
    """:func:`grey_values` of one channel, the gamma over its own range."""
    g = float(np.exp(rng.uniform(-gamma, gamma)))
    c = float(rng.uniform(1.0 - contrast, 1.0 + contrast))
    b = float(rng.uniform(-brightness, brightness))
    y = x.astype(np.float64)
    if gamma > 0 and x.size:
        lo, hi = float(y.min()), float(y.max())
        if hi > lo:
            y = lo + (hi - lo) * ((y - lo) / (hi - lo)) ** g
    mean = y.mean() if y.size else 0.0
    return ((y - mean) * c + (mean + b)).astype(x.dtype, copy=False)


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
    spacing: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The U-Net paper's augmentation of one training sample, 2D or 3D.

    In order: a random flip/rotation (:func:`flip_rotate`) of image, mask and weights;
    a random elastic deformation (:func:`elastic_deform`; image cubic in 2D and linear in
    3D, mask nearest, weights linear); a random grey-value change (:func:`grey_values`)
    of the image.

    The mask's dimensions say which: a ``(Z, Y, X)`` mask makes it 3D, where every axis
    may be flipped, the 90-degree rotations turn the (Y, X) plane only and only where Y
    and X have the same side and the same ``spacing``, the elastic displacements of an
    axis are ``sigma * min(spacing) / spacing[axis]`` voxels (the same in space), and
    the grey values change per channel.

    Parameters
    ----------
    image : numpy.ndarray
        ``(Y, X)`` or ``(C, Y, X)`` float image, about [0, 1] (3D: ``(C, Z, Y, X)``).
    mask : numpy.ndarray
        ``(Y, X)`` or ``(Z, Y, X)`` integer class map.
    weights : numpy.ndarray or None
        Weight map shaped like ``mask``, or None.
    rng : numpy.random.Generator
    elastic, flips, grey : bool
        Switch each augmentation on or off.
    grid, sigma
        Elastic deformation parameters, see :func:`displacement_field` (``sigma`` in
        pixels of the finest axis).
    spacing : sequence of float, optional
        Voxel side per spatial axis (default: the same on every axis).

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
    >>> volume, labels = np.zeros((2, 8, 16, 16), np.float32), np.zeros((8, 16, 16), int)
    >>> [a.shape for a in augment(volume, labels, None, rng, spacing=(3, 1, 1))[:2]]
    [(2, 8, 16, 16), (8, 16, 16)]
    """
    arrays = [np.asarray(image), np.asarray(mask)]
    ndim = arrays[1].ndim
    sides = np.ones(ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
    if sides.shape != (ndim,) or not np.all(sides > 0):
        raise InvalidArgumentError(
            f"spacing={spacing!r} must be {ndim} positive numbers (one per mask axis)")
    orders = [3, 0]
    if weights is not None:
        arrays.append(np.asarray(weights))
        orders.append(1)
    if flips:
        rotate = ndim == 2 or (arrays[1].shape[-1] == arrays[1].shape[-2]
                               and bool(np.isclose(sides[-1], sides[-2], rtol=1e-3)))
        arrays = flip_rotate(arrays, rng, ndim, rotate)
    if elastic:
        scale = sigma if ndim == 2 and spacing is None else sigma * sides.min() / sides
        if ndim == 3:
            orders[0] = 1  # trilinear: a cubic spline of a 3D window costs 4 times more
        arrays = elastic_deform(arrays, orders, rng, grid=grid, sigma=scale, ndim=ndim)
    elif not flips:
        arrays = [a.copy() for a in arrays]
    if grey:
        arrays[0] = grey_values(arrays[0], rng, per_channel=ndim == 3 and arrays[0].ndim > ndim)
    image, mask = arrays[0], arrays[1]
    return image, mask, (arrays[2] if weights is not None else None)

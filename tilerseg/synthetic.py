"""Synthetic EM-like membrane images with ground truth, for tests, benchmarks and demos.

Cells are the Voronoi regions of random seeds; their borders are drawn as dark
membranes on a textured bright interior, then blurred and made noisy. The mask follows
the ISBI 2012 convention: 255 for cell interior, 0 for membrane.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["membrane_image"]


def membrane_image(
    shape: Sequence[int] = (512, 512),
    cell_size: float = 40.0,
    membrane_width: int = 3,
    blur: float = 1.0,
    noise: float = 0.08,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Make a membrane image and its ground-truth mask.

    Parameters
    ----------
    shape : sequence of int
        Image shape, 2D (rows, columns) or 3D.
    cell_size : float
        Typical cell diameter in pixels.
    membrane_width : int
        Membrane thickness in pixels.
    blur : float
        Gaussian blur sigma in pixels applied to the image.
    noise : float
        Standard deviation of additive Gaussian noise (image range 0-1 before
        conversion).
    seed : int
        Random seed; the same seed gives the same image.

    Returns
    -------
    image : numpy.ndarray of uint8, shape ``shape``
    mask : numpy.ndarray of uint8, shape ``shape``
        255 inside cells, 0 on membranes.

    Examples
    --------
    >>> image, mask = membrane_image((64, 96), cell_size=20, seed=1)
    >>> image.shape, image.dtype, sorted(np.unique(mask).tolist())
    ((64, 96), dtype('uint8'), [0, 255])
    >>> bool(image[mask == 255].mean() > image[mask == 0].mean())
    True
    """
    shape = tuple(int(n) for n in shape)
    rng = np.random.default_rng(seed)
    n_cells = max(2, int(round(np.prod(shape) / cell_size ** len(shape))))
    seeds = np.zeros(shape, dtype=bool)
    seeds[tuple(rng.integers(0, n, n_cells) for n in shape)] = True
    _, nearest = ndimage.distance_transform_edt(~seeds, return_indices=True)
    labels = np.ravel_multi_index(tuple(nearest), shape)
    boundary = np.zeros(shape, dtype=bool)
    for axis in range(len(shape)):
        step = np.diff(labels, axis=axis) != 0
        lo = [slice(None)] * len(shape)
        hi = [slice(None)] * len(shape)
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        boundary[tuple(lo)] |= step
        boundary[tuple(hi)] |= step
    if membrane_width > 1:
        boundary = ndimage.binary_dilation(boundary, iterations=membrane_width // 2)
    texture = ndimage.gaussian_filter(rng.normal(0, 1, shape), 3)
    texture /= max(1e-6, np.abs(texture).max())
    image = np.where(boundary, 0.2, 0.7 + 0.1 * texture)
    if blur > 0:
        image = ndimage.gaussian_filter(image, blur)
    image = image + rng.normal(0, noise, shape)
    image = np.clip(image * 255, 0, 255).astype(np.uint8)
    mask = np.where(boundary, 0, 255).astype(np.uint8)
    return image, mask

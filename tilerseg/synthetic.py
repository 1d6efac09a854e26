"""Synthetic EM-like membrane images with ground truth, for tests, benchmarks and demos.

Cells are the Voronoi regions of random seeds; their borders are drawn as dark
membranes on a textured bright interior, then blurred and made noisy. The mask follows
the ISBI 2012 convention: 255 for cell interior, 0 for membrane.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["membrane_image", "membrane_tile", "tumour_volume", "write_membrane_tiff"]


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


def membrane_tile(
    origin: Sequence[int],
    shape: Sequence[int],
    cell_size: float = 40.0,
    membrane_width: float = 3.0,
    noise: float = 0.08,
    seed: int = 0,
) -> np.ndarray:
    """One tile of an unbounded, seamless 2D membrane image (uint8).

    Cell centres sit one per ``cell_size`` block of a global grid, jittered by a random
    generator seeded with the block's position, so any tile can be made on its own and
    neighbouring tiles join without seams: the way to make slides larger than memory.

    Parameters
    ----------
    origin : (int, int)
        Row and column of the tile's first pixel in the whole image.
    shape : (int, int)
        Tile shape.
    cell_size, membrane_width, noise, seed
        As for :func:`membrane_image`.

    Returns
    -------
    numpy.ndarray of uint8

    Examples
    --------
    Without noise, a tile equals the same region of a larger tile:

    >>> whole = membrane_tile((0, 0), (64, 64), seed=3, noise=0)
    >>> part = membrane_tile((16, 32), (32, 32), seed=3, noise=0)
    >>> bool((whole[16:48, 32:64] == part).all())
    True
    """
    (r0, c0), (h, w) = origin, shape
    rows = np.arange(r0, r0 + h, dtype=np.float32)
    cols = np.arange(c0, c0 + w, dtype=np.float32)
    block_r = np.floor(rows / cell_size).astype(np.int64)
    block_c = np.floor(cols / cell_size).astype(np.int64)
    b0, b1 = int(block_r[0]) - 2, int(block_c[0]) - 2
    n0, n1 = int(block_r[-1]) + 3 - b0, int(block_c[-1]) + 3 - b1
    centres = np.empty((2, n0, n1))
    for i in range(n0):
        for j in range(n1):
            key = [seed, (b0 + i) & 0xFFFFFFFF, (b1 + j) & 0xFFFFFFFF]
            centres[:, i, j] = (np.array([b0 + i, b1 + j]) + np.random.default_rng(key).random(2))
    centres *= cell_size
    centres = centres.astype(np.float32)
    best = np.full((2, h, w), np.inf, dtype=np.float32)
    for di in range(-1, 2):  # the nearest centres lie, but for rare corners, in the 3 x 3 blocks
        for dj in range(-1, 2):
            ci = (block_r - b0 + di)[:, None]
            cj = (block_c - b1 + dj)[None, :]
            d = np.hypot(rows[:, None] - centres[0][ci, cj], cols[None, :] - centres[1][ci, cj])
            closer = d < best[0]
            best[1] = np.where(closer, best[0], np.minimum(best[1], d))
            best[0] = np.where(closer, d, best[0])
    # distance to the bisector between the two nearest centres ~ (d2 - d1) / 2
    edge = (best[1] - best[0]) / 2
    image = 0.2 + 0.5 * np.clip(edge / membrane_width - 0.5, 0, 1)
    rng = np.random.default_rng([seed, 1 + (r0 & 0xFFFFFFFF), c0 & 0xFFFFFFFF])
    image = image + rng.normal(0, noise, (h, w))
    return np.clip(image * 255, 0, 255).astype(np.uint8)


def write_membrane_tiff(
    path: str,
    shape: Sequence[int] = (4096, 4096),
    tile: int = 256,
    pixel_size: float = 0.5,
    seed: int = 0,
    **kwargs: float,
) -> str:
    """Write a seamless synthetic membrane slide as a tiled BigTIFF, tile by tile.

    Memory stays at one tile whatever ``shape`` is. The pixel size (micrometres) is
    stored in the resolution tags.

    Parameters
    ----------
    path : str
        Destination ``.tif``.
    shape : (int, int)
        Slide shape.
    tile : int
        TIFF tile side (a multiple of 16).
    pixel_size : float
        Micrometres per pixel.
    seed : int
        Random seed.
    **kwargs
        Passed to :func:`membrane_tile` (``cell_size``, ``membrane_width``, ``noise``).

    Returns
    -------
    str
        ``path``.
    """
    import tifffile

    height, width = (int(n) for n in shape)

    def tiles():
        for r in range(0, height, tile):
            for c in range(0, width, tile):
                block = np.zeros((tile, tile), np.uint8)
                h, w = min(tile, height - r), min(tile, width - c)
                block[:h, :w] = membrane_tile((r, c), (h, w), seed=seed, **kwargs)
                yield block

    tifffile.imwrite(
        path, tiles(), shape=(height, width), dtype=np.uint8, tile=(tile, tile),
        bigtiff=True, compression="zlib", resolution=(1e4 / pixel_size, 1e4 / pixel_size),
        resolutionunit="CENTIMETER",
    )
    return path


# Mean intensity of (background brain, oedema, core) in each modality (T1, T1ce, T2, FLAIR),
# then each modality's scanner scale and offset: the classes differ in contrast from one
# modality to the next, and the raw values differ in range, as MRI's do.
_MODALITY_MEANS = np.array([[1.0, 0.8, 0.5], [1.0, 1.0, 1.8], [1.0, 1.7, 1.4],
                            [1.0, 1.9, 1.2]])
_MODALITY_SCALE = np.array([[400.0, 100.0], [900.0, -50.0], [250.0, 300.0], [600.0, 0.0]])


def _ellipsoid(shape: Sequence[int], spacing: Sequence[float], centre_mm: np.ndarray,
               radii_mm: np.ndarray) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    total = sum(((g * s - c) / r) ** 2 for g, s, c, r in zip(grid, spacing, centre_mm, radii_mm))
    return total <= 1.0


def tumour_volume(
    shape: Sequence[int] = (24, 64, 64),
    spacing: Sequence[float] = (3.0, 1.0, 1.0),
    modalities: int = 4,
    tumours: int = 2,
    noise: float = 0.08,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic multi-modal MRI-like volume with tumours, and its label map.

    A "brain" ellipsoid fills most of the volume (the background outside it is 0 in every
    modality, as in skull-stripped MRI); inside it, ``tumours`` smaller ellipsoids each
    have an oedema shell (label 1) around a core (label 2). Sizes are in millimetres, so
    objects are round in space whatever the (anisotropic) ``spacing``. Each class has its
    own contrast in each modality (the core is dark in the first, bright in the second;
    oedema is bright in the third and fourth), with a smooth bias field and noise, and
    each modality has its own intensity scale and offset: per-channel normalisation
    matters.

    Parameters
    ----------
    shape : (int, int, int)
        ``(Z, Y, X)`` voxels.
    spacing : (float, float, float)
        Voxel size in mm along Z, Y, X.
    modalities : int
        Channels, 1 to 4 (T1, T1ce, T2, FLAIR-like).
    tumours : int
        Tumours (each an oedema shell and a core).
    noise : float
        Noise standard deviation relative to the brain's mean intensity.
    seed : int
        Random seed; the same seed gives the same volume.

    Returns
    -------
    image : numpy.ndarray of int16, shape ``(modalities, Z, Y, X)``
    labels : numpy.ndarray of uint8, shape ``(Z, Y, X)``
        0 background (and healthy brain), 1 oedema, 2 core.

    Examples
    --------
    >>> image, labels = tumour_volume((16, 48, 48), seed=1)
    >>> image.shape, image.dtype, sorted(np.unique(labels).tolist())
    ((4, 16, 48, 48), dtype('int16'), [0, 1, 2])
    >>> bool((image[:, labels == 2].mean(axis=1)[1] > image[:, labels == 0].mean(axis=1)[1]))
    True
    """
    shape = tuple(int(n) for n in shape)
    spacing = np.asarray(spacing, dtype=float)
    if len(shape) != 3 or len(spacing) != 3:
        raise ValueError(f"shape {shape} and spacing {tuple(spacing)} must have 3 values (Z, Y, X)")
    if not 1 <= modalities <= len(_MODALITY_MEANS):
        raise ValueError(f"modalities={modalities} must be 1 to {len(_MODALITY_MEANS)}")
    rng = np.random.default_rng(seed)
    extent = np.asarray(shape) * spacing
    brain = _ellipsoid(shape, spacing, extent / 2, extent * 0.45)
    labels = np.zeros(shape, np.uint8)
    for _ in range(tumours):
        radius = min(extent) * rng.uniform(0.12, 0.2)
        centre = extent / 2 + rng.uniform(-0.2, 0.2, 3) * extent
        outer = radius * rng.uniform(0.8, 1.2, 3)
        labels[_ellipsoid(shape, spacing, centre, outer) & brain] = 1
        labels[_ellipsoid(shape, spacing, centre, outer * rng.uniform(0.45, 0.6)) & brain] = 2
    bias = ndimage.gaussian_filter(rng.normal(0, 1, shape), 8)
    bias = 1 + 0.1 * bias / max(1e-6, np.abs(bias).max())
    image = np.zeros((modalities, *shape), np.int16)
    for m in range(modalities):
        mean = _MODALITY_MEANS[m][labels]
        values = ndimage.gaussian_filter(mean * bias, 0.7) + rng.normal(0, noise, shape)
        scale, offset = _MODALITY_SCALE[m]
        image[m] = np.where(brain, np.clip(values * scale + offset, 1, 32767), 0).astype(np.int16)
    return image, labels

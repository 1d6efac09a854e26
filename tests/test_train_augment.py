"""Training augmentations: alignment of image, mask and weights; borders; reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from tilerseg.errors import InvalidArgumentError
from tilerseg.train.augment import (
    augment,
    displacement_field,
    elastic_deform,
    flip_rotate,
    grey_values,
    warp,
)


def labelled_blobs(shape=(96, 80), n=9, seed=0) -> np.ndarray:
    """Voronoi regions labelled 0..n-1 (uint8)."""
    rng = np.random.default_rng(seed)
    seeds = np.zeros(shape, bool)
    seeds[tuple(rng.integers(0, s, n) for s in shape)] = True
    _, (iy, ix) = ndimage.distance_transform_edt(~seeds, return_indices=True)
    _, labels = np.unique(iy * shape[1] + ix, return_inverse=True)
    return labels.reshape(shape).astype(np.uint8)


def test_elastic_keeps_image_and_mask_aligned():
    mask = labelled_blobs()
    image = np.stack([mask.astype(np.float32), 2 * mask.astype(np.float32)])  # (C, Y, X)
    weights = 1 + mask.astype(np.float32)
    img, msk, wts = elastic_deform([image, mask, weights], [3, 0, 1], np.random.default_rng(5))
    assert img.shape == image.shape and img.dtype == np.float32
    assert msk.shape == mask.shape and msk.dtype == np.uint8
    assert wts.dtype == np.float32
    # the deformation is real
    assert (msk != mask).mean() > 0.05
    # away from label edges, the deformed image and weights carry the deformed mask's labels
    interior = ndimage.minimum_filter(msk, 5) == ndimage.maximum_filter(msk, 5)
    assert interior.mean() > 0.5
    assert (np.rint(img[0]) == msk)[interior].mean() >= 0.99
    assert (np.rint(img[1] / 2) == msk)[interior].mean() >= 0.99
    assert (np.rint(wts - 1) == msk)[interior].mean() >= 0.99
    # and almost everywhere overall
    assert (np.rint(img[0]) == msk).mean() >= 0.95


def test_warp_follows_the_field_and_mirrors_like_numpy_reflect():
    rows, cols = 40, 30
    ramp = np.broadcast_to(np.arange(rows, dtype=np.float64)[:, None], (rows, cols)).copy()
    field = displacement_field((rows, cols), np.random.default_rng(1), sigma=3.0)
    (out,) = warp([ramp], [1], field)
    source = np.arange(rows)[:, None] + field[0]
    inside = (source >= 0) & (source <= rows - 1)
    np.testing.assert_allclose(out[inside], source[inside], atol=1e-4)
    # a constant shift by -3 rows equals numpy's reflect padding
    image = np.random.default_rng(2).random((rows, cols)).astype(np.float32)
    shift = np.stack([np.full((rows, cols), -3.0), np.zeros((rows, cols))])
    expected = np.pad(image, ((3, 0), (0, 0)), mode="reflect")[:rows]
    for order in (0, 1):
        np.testing.assert_array_equal(warp([image], [order], shift)[0], expected)


def test_displacement_field_nodes_on_corners_and_centre():
    sigma, grid = 4.0, 3
    field = displacement_field((65, 33), np.random.default_rng(7), grid=grid, sigma=sigma)
    nodes = np.random.default_rng(7).normal(0, sigma, (2, grid, grid))
    for (i, j), (y, x) in {
        (0, 0): (0, 0),
        (2, 2): (64, 32),
        (0, 2): (0, 32),
        (1, 1): (32, 16),
    }.items():
        np.testing.assert_allclose(field[:, y, x], nodes[:, i, j], atol=1e-9)
    # smooth: neighbouring pixels move by much less than a pixel apart
    assert np.abs(np.diff(field, axis=1)).max() < 1.0


def test_elastic_sigma_zero_is_identity():
    mask = labelled_blobs((40, 50))
    image = np.random.default_rng(0).random((40, 50)).astype(np.float32)
    img, msk = elastic_deform([image, mask], [3, 0], np.random.default_rng(0), sigma=0.0)
    np.testing.assert_array_equal(msk, mask)
    np.testing.assert_allclose(img, image, atol=1e-5)


def test_elastic_bool_and_reproducible():
    mask = labelled_blobs((48, 48)) > 4
    a = elastic_deform([mask], [0], np.random.default_rng(3))[0]
    b = elastic_deform([mask], [0], np.random.default_rng(3))[0]
    assert a.dtype == bool
    np.testing.assert_array_equal(a, b)


def test_flip_rotate_keeps_alignment_exactly_and_covers_dihedral_group():
    mask = labelled_blobs((24, 24))
    image = np.stack([mask * 1.0, mask * 3.0]).astype(np.float32)
    seen = set()
    for seed in range(40):
        img, msk = flip_rotate([image, mask], np.random.default_rng(seed))
        assert img.flags.c_contiguous and msk.flags.c_contiguous
        np.testing.assert_array_equal(img[0], msk)
        np.testing.assert_array_equal(img[1], 3.0 * msk)
        seen.add(msk.tobytes())
    assert len(seen) == 8
    # non-square: axes swap together
    img, msk = flip_rotate([np.zeros((1, 4, 6)), np.zeros((4, 6))], np.random.default_rng(1))
    assert img.shape[1:] == msk.shape


def test_flip_rotate_returns_copies():
    a = np.arange(12).reshape(3, 4)
    for seed in range(8):
        (b,) = flip_rotate([a], np.random.default_rng(seed))
        assert not np.shares_memory(a, b)


def test_grey_values():
    image = np.random.default_rng(0).random((2, 16, 16)).astype(np.float32)
    out = grey_values(image, np.random.default_rng(1))
    assert out.shape == image.shape and out.dtype == image.dtype
    assert not np.allclose(out, image)
    # monotone map, shared by the channels
    order = np.argsort(image.ravel())
    assert np.all(np.diff(out.ravel()[order]) >= -1e-6)
    np.testing.assert_allclose(
        grey_values(image, np.random.default_rng(1), 0, 0, 0), image, rtol=0, atol=1e-6
    )
    # negative values do not give NaN under gamma
    assert np.isfinite(grey_values(image - 0.5, np.random.default_rng(2))).all()
    with pytest.raises(InvalidArgumentError):
        grey_values(np.zeros((4, 4), np.uint8), np.random.default_rng(0))


def test_augment_composition_aligned_and_reproducible():
    mask = labelled_blobs((64, 64))
    image = (mask.astype(np.float32) / 10)[None]
    weights = 1 + mask.astype(np.float32)
    run = lambda seed, **kw: augment(image, mask, weights, np.random.default_rng(seed), **kw)
    a, b = run(4), run(4)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    img, msk, wts = a
    assert img.shape == image.shape and img.dtype == np.float32
    assert msk.dtype == mask.dtype and wts.dtype == np.float32
    assert not np.array_equal(run(5)[1], msk)
    interior = ndimage.minimum_filter(msk, 5) == ndimage.maximum_filter(msk, 5)
    assert (np.rint(wts - 1) == msk)[interior].mean() >= 0.99
    # flips only: exact alignment, untouched grey values
    img, msk, wts = run(6, elastic=False, grey=False)
    np.testing.assert_array_equal(img[0] * 10, msk.astype(np.float32))
    np.testing.assert_array_equal(wts, 1 + msk.astype(np.float32))
    # everything off: equal copies
    img, msk, wts = augment(
        image, mask, None, np.random.default_rng(0), elastic=False, flips=False, grey=False
    )
    assert wts is None
    np.testing.assert_array_equal(img, image)
    np.testing.assert_array_equal(msk, mask)
    assert not np.shares_memory(img, image)


def test_invalid_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(InvalidArgumentError):
        elastic_deform([np.zeros((4, 4))], [3, 0], rng)
    with pytest.raises(InvalidArgumentError):
        elastic_deform([np.zeros((4, 4)), np.zeros((4, 5))], [3, 0], rng)
    with pytest.raises(InvalidArgumentError):
        displacement_field((4, 4), rng, grid=1)

"""The U-Net weight map: class balance and the border (separation) term."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from scipy import ndimage

from tilerseg.errors import InvalidArgumentError
from tilerseg.synthetic import membrane_image
from tilerseg.train.weights import (
    border_cutoff_distance,
    border_weights,
    class_weights,
    weight_map,
)


def two_rectangles(gap: int, rows: int = 9, left: int = 6, right: int = 6, pad: int = 40):
    """Background ``pad`` columns, object, ``gap`` background columns, object, ``pad``."""
    mask = np.zeros((rows, pad + left + gap + right + pad), dtype=np.uint8)
    mask[:, pad : pad + left] = 1
    mask[:, pad + left + gap : pad + left + gap + right] = 1
    return mask, pad + left  # first gap column


def brute_force_border(mask, foreground_class=1, w0=10.0, sigma=5.0):
    """Every object's full-image EDT, sorted: the untruncated formula, background only."""
    labels, n = ndimage.label(mask == foreground_class)
    if n < 2:
        return np.zeros(mask.shape)
    dist = np.sort(
        np.stack([ndimage.distance_transform_edt(labels != i) for i in range(1, n + 1)]), 0
    )
    term = w0 * np.exp(-((dist[0] + dist[1]) ** 2) / (2 * sigma**2))
    return np.where(labels == 0, term, 0.0)


@pytest.mark.parametrize("gap", [1, 2, 5, 8])
def test_gap_pixels_hand_computed(gap):
    mask, first = two_rectangles(gap)
    cw = np.array([1.5, 0.75])
    w = weight_map(mask, cw)
    assert w.dtype == np.float32 and w.shape == mask.shape
    expected = cw[0] + 10 * np.exp(-((gap + 1) ** 2) / 50)
    for a in range(1, gap + 1):  # a = distance to the left object, gap + 1 - a to the right
        np.testing.assert_allclose(w[:, first + a - 1], expected, rtol=1e-6)
    # object pixels: class weight only
    np.testing.assert_array_equal(w[mask == 1], np.float32(0.75))


def test_single_gap_pixel_values():
    # gap of 3: d1 + d2 = 4 at all three gap pixels, 10 exp(-16/50)
    mask, first = two_rectangles(3)
    b = border_weights(mask)
    np.testing.assert_allclose(b[4, first : first + 3], 10 * np.exp(-16 / 50), rtol=1e-6)
    # one column left of the left object: d1 = 1, d2 = 1 + 6 + 3 = 10
    np.testing.assert_allclose(b[4, first - 7], 10 * np.exp(-(11**2) / 50), rtol=1e-6)


def test_far_pixels_get_class_weight_only():
    mask, _ = two_rectangles(4, pad=40)
    cw = np.array([2.0, 0.5])
    w = weight_map(mask, cw)
    reach = border_cutoff_distance(5.0, 1e-3)
    # column c < left object: d1 = pad - c, d2 = d1 + left + gap
    pad, left, gap = 40, 6, 4
    for c in range(pad):
        d1 = pad - c
        total = d1 + d1 + left + gap
        if total > reach:
            assert np.all(w[:, c] == np.float32(2.0))
        else:
            np.testing.assert_allclose(w[:, c], 2.0 + 10 * np.exp(-(total**2) / 50), rtol=1e-6)
    assert np.all(w[:, 0] == np.float32(2.0))


def test_border_term_off():
    mask, _ = two_rectangles(2)
    cw = np.array([1.0, 3.0])
    np.testing.assert_array_equal(weight_map(mask, cw, border=False), cw[mask].astype(np.float32))


def test_fewer_than_two_objects_no_border_term():
    mask = np.zeros((30, 30), np.uint8)
    assert not border_weights(mask).any()
    mask[5:20, 8:12] = 1
    assert not border_weights(mask).any()
    np.testing.assert_array_equal(
        weight_map(mask, np.array([1.0, 2.0])), np.where(mask == 1, 2.0, 1.0)
    )


def test_diagonal_contact_is_two_objects():
    # 4-connectivity: objects touching only at a corner stay separate
    mask = np.zeros((10, 10), np.uint8)
    mask[:5, :5] = 1
    mask[5:, 5:] = 1
    b = border_weights(mask)
    assert b[4, 5] > 0 and b[5, 4] > 0
    np.testing.assert_allclose(b[4, 5], 10 * np.exp(-4 / 50), rtol=1e-6)


def test_matches_brute_force_within_cutoff():
    _, mask = membrane_image((96, 112), cell_size=20, seed=3)
    mask = mask // 255
    reference = brute_force_border(mask)
    untruncated = border_weights(mask, cutoff=0)
    np.testing.assert_allclose(untruncated, reference, rtol=1e-6, atol=0)
    for cutoff in (1e-3, 1e-1):
        got = border_weights(mask, cutoff=cutoff)
        expected = np.where(reference >= cutoff * 10, reference, 0)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)


def test_other_foreground_class_and_parameters():
    mask, first = two_rectangles(3)
    mask = np.where(mask == 1, 2, 0).astype(np.int32)
    b = border_weights(mask, foreground_class=2, w0=4.0, sigma=2.0)
    np.testing.assert_allclose(b[0, first], 4 * np.exp(-16 / 8), rtol=1e-6)
    assert not border_weights(mask, foreground_class=1).any()


def test_class_weights_inverse_frequency():
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 2:] = 1  # 75% class 1
    w = class_weights(mask, 2)
    np.testing.assert_allclose(w[0] / w[1], 3.0)
    np.testing.assert_allclose(w[mask].mean(), 1.0)
    np.testing.assert_allclose(w, [2.0, 2 / 3])


def test_class_weights_global_over_masks():
    a = np.zeros((4, 4), np.uint8)
    b = np.ones((4, 12), np.uint8)  # together: 16 zeros, 48 ones
    w = class_weights([a, b], 2)
    np.testing.assert_allclose(w[0] / w[1], 3.0)
    pixels = np.concatenate([a.ravel(), b.ravel()])
    np.testing.assert_allclose(w[pixels].mean(), 1.0)


def test_class_weights_absent_class_warns(caplog):
    mask = np.array([[0, 0, 2, 2, 2, 2]])
    with caplog.at_level(logging.WARNING, logger="tilerseg.train.weights"):
        w = class_weights(mask, 3)
    assert w[1] == 0
    np.testing.assert_allclose(w[mask].mean(), 1.0)
    assert "absent" in caplog.text


def test_invalid_inputs():
    with pytest.raises(InvalidArgumentError):
        class_weights(np.array([[0, 3]]), 3)
    with pytest.raises(InvalidArgumentError):
        class_weights(np.array([[0.0, 1.0]]), 2)
    with pytest.raises(InvalidArgumentError):
        weight_map(np.array([[0, 2]]), np.array([1.0, 1.0]))
    with pytest.raises(InvalidArgumentError):
        border_weights(np.zeros((4, 4), int), sigma=0)


def test_membrane_512_runs():
    _, mask = membrane_image((512, 512), seed=0)
    classes = mask // 255
    cw = class_weights(classes, 2)
    w = weight_map(classes, cw)
    assert w.shape == (512, 512) and w.dtype == np.float32
    assert np.isfinite(w).all()
    # high weights sit on the membranes between cells, never inside them
    assert w[classes == 0].max() > cw[0] + 5
    np.testing.assert_array_equal(w[classes == 1], np.float32(cw[1]))

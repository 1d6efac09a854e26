"""3D metrics (HD95, per-class Dice, regions) and ``tilerseg eval`` on volumes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tilerseg.errors import InvalidArgumentError
from tilerseg.metrics import check_regions, check_spacing, hd95, iou_dice, volume_scores

# -- independent reference ------------------------------------------------------------------


def _brute_surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it or outside the image."""
    padded = np.pad(mask, 1)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    outside = np.zeros(mask.shape, bool)
    for axis in range(mask.ndim):
        for step in (-1, 1):
            outside |= ~np.roll(padded, step, axis=axis)[inner]
    return mask & outside


def _brute_hd95(pred: np.ndarray, true: np.ndarray, spacing: tuple[float, ...]) -> float:
    """The larger directed 95th percentile, from all pairs of surface points."""
    a = np.argwhere(_brute_surface(pred)) * np.asarray(spacing)
    b = np.argwhere(_brute_surface(true)) * np.asarray(spacing)
    pairs = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=-1))
    return float(max(np.percentile(pairs.min(axis=1), 95), np.percentile(pairs.min(axis=0), 95)))


def _random_mask(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    from scipy import ndimage

    noise = ndimage.gaussian_filter(rng.normal(size=shape), 1.0)
    return noise > np.quantile(noise, rng.uniform(0.6, 0.9))


# -- HD95 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 5])
def test_hd95_of_a_plane_shifted_along_z_is_the_shift_in_mm(k: int) -> None:
    # one-voxel-thick squares: every voxel is surface, its nearest partner k slices away
    pred = np.zeros((12, 9, 9), bool)
    true = pred.copy()
    pred[2, 2:7, 2:7] = True
    true[2 + k, 2:7, 2:7] = True
    assert hd95(pred, true, spacing=(3.0, 1.0, 1.0)) == pytest.approx(3.0 * k)
    assert hd95(true, pred, spacing=(3.0, 0.5, 0.5)) == pytest.approx(3.0 * k)
    assert hd95(pred, true) == pytest.approx(k)  # no spacing: voxels


def test_hd95_of_one_voxel_objects_and_identical_masks() -> None:
    pred = np.zeros((5, 6, 7), bool)
    true = pred.copy()
    pred[1, 2, 3] = True
    true[4, 0, 6] = True
    expected = math.sqrt((3 * 2.5) ** 2 + (2 * 0.8) ** 2 + (3 * 0.6) ** 2)
    assert hd95(pred, true, (2.5, 0.8, 0.6)) == pytest.approx(expected)
    cube = np.zeros((8, 8, 8), np.uint8)
    cube[2:6, 2:6, 2:6] = 1
    assert hd95(cube, cube, 2.0) == 0.0
    # a mask touching the image border: the border is surface, as with MONAI's padding
    full = np.ones((3, 4, 4), bool)
    assert hd95(full, full) == 0.0


def test_hd95_of_concentric_cubes_lies_between_face_and_corner_distances() -> None:
    big = np.zeros((20, 20, 20), bool)
    small = big.copy()
    big[2:18, 2:18, 2:18] = True  # faces 3 voxels beyond the small cube's
    small[5:15, 5:15, 5:15] = True
    value = hd95(big, small, (2.0, 1.0, 1.0))
    assert 3.0 <= value <= math.sqrt(6**2 + 3**2 + 3**2)
    assert value == pytest.approx(_brute_hd95(big, small, (2.0, 1.0, 1.0)))


def test_hd95_empty_cases() -> None:
    empty = np.zeros((4, 5, 6), bool)
    some = empty.copy()
    some[1, 1, 1] = True
    assert hd95(empty, empty) == 0.0
    assert hd95(some, empty) == math.inf
    assert hd95(empty, some, (1, 2, 3)) == math.inf


@pytest.mark.parametrize("seed", range(6))
def test_hd95_equals_brute_force_on_random_masks(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (6, 9, 8) if seed % 2 else (11, 13)
    spacing = tuple(rng.uniform(0.3, 3.0, len(shape)))
    pred, true = _random_mask(rng, shape), _random_mask(rng, shape)
    assert pred.any() and true.any()
    assert hd95(pred, true, spacing) == pytest.approx(_brute_hd95(pred, true, spacing), rel=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_hd95_agrees_with_monai(seed: int) -> None:
    monai_metrics = pytest.importorskip("monai.metrics")
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(100 + seed)
    shape = (10, 14, 12)
    spacing = (3.0, 0.9, 1.1)
    pred, true = _random_mask(rng, shape), _random_mask(rng, shape)

    def one_hot(mask: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.stack([~mask, mask])[None].astype(np.float32))

    reference = monai_metrics.compute_hausdorff_distance(
        one_hot(pred), one_hot(true), percentile=95, spacing=list(spacing)
    )
    assert hd95(pred, true, spacing) == pytest.approx(float(reference[0, 0]), rel=1e-5)


def test_hd95_and_spacing_reject_bad_input() -> None:
    mask = np.ones((3, 4, 4), bool)
    with pytest.raises(InvalidArgumentError, match="differ in shape"):
        hd95(mask, mask[:2])
    with pytest.raises(InvalidArgumentError, match="has 2 values; expected 3"):
        hd95(mask, mask, (1.0, 1.0))
    with pytest.raises(InvalidArgumentError, match="> 0"):
        hd95(mask, mask, (1.0, 0.0, 1.0))
    with pytest.raises(InvalidArgumentError, match="binary"):
        hd95(mask * 0.5, mask)
    with pytest.raises(InvalidArgumentError, match="not numbers"):
        check_spacing("a,b", 2)
    with pytest.raises(InvalidArgumentError, match="> 0"):
        check_spacing([-1, 1], 2)


# -- Dice per class and regions -------------------------------------------------------------


def test_volume_scores_by_hand() -> None:
    true = np.zeros((2, 3, 3), np.uint8)
    pred = true.copy()
    true[0, :2, :2] = 1  # 4 voxels of class 1
    true[1, 1, 1] = 2  # 1 voxel of class 2
    pred[0, :2, :1] = 1  # 2 of them found
    pred[0, 2, 2] = 1  # 1 wrongly
    pred[1, 1, 1] = 2
    scores = volume_scores(pred, true, 4, spacing=(5.0, 1.0, 1.0),
                           regions={"tumour": (1, 2), "three": [3]})
    assert set(scores["classes"]) == {1, 2, 3}
    assert scores["classes"][1]["dice"] == pytest.approx(2 * 2 / (4 + 3))
    assert scores["classes"][1]["iou"] == pytest.approx(2 / 5)
    assert scores["classes"][2] == {"iou": 1.0, "dice": 1.0, "hd95": 0.0}
    assert scores["classes"][3] == {"iou": 1.0, "dice": 1.0, "hd95": 0.0}  # absent in both
    tumour = scores["regions"]["tumour"]
    assert tumour["dice"] == pytest.approx(2 * 3 / (5 + 4))
    assert tumour["hd95"] == pytest.approx(_brute_hd95(
        np.isin(pred, (1, 2)), np.isin(true, (1, 2)), (5.0, 1.0, 1.0)))
    assert {c: s["dice"] for c, s in scores["classes"].items()} == {
        c: s["dice"] for c, s in iou_dice(pred, true, 4).items() if c > 0}


def test_volume_scores_reject_bad_input() -> None:
    labels = np.zeros((2, 3, 3), np.uint8)
    with pytest.raises(InvalidArgumentError, match="class 3, outside 0..2"):
        volume_scores(labels + 3, labels, 3)
    with pytest.raises(InvalidArgumentError, match="integer >= 2"):
        volume_scores(labels, labels, 1)
    with pytest.raises(InvalidArgumentError, match="region WT classes \\[0, 1\\]"):
        check_regions({"WT": (0, 1)}, 3)
    with pytest.raises(InvalidArgumentError, match="must map names"):
        check_regions([(1, 2)], 3)

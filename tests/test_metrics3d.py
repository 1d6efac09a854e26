"""3D metrics (HD95, per-class Dice, regions) and ``tilerseg eval`` on volumes."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tilerseg.errors import InvalidArgumentError, InvalidImageError, TilersegError
from tilerseg.evaluate import add_parser, evaluate, format_table, to_json
from tilerseg.metrics import check_regions, check_spacing, hd95, iou_dice, volume_scores
from tilerseg.synthetic import tumour_volume

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


# -- evaluate and ``tilerseg eval`` on volumes ----------------------------------------------

SPACING = (3.0, 1.0, 1.0)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tilerseg")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two synthetic tumour label volumes (0/1/2, mm spacing) and degraded predictions."""
    from scipy import ndimage

    d = tmp_path_factory.mktemp("eval3d")
    (d / "truth").mkdir()
    (d / "pred").mkdir()
    truths, preds, images = [], [], []
    for i, seed in enumerate((3, 4)):
        image, labels = tumour_volume((12, 40, 40), SPACING, modalities=1, seed=seed)
        pred = labels.copy()
        pred[ndimage.binary_erosion(labels == 2, iterations=1)] = 1  # shrink the core
        pred[:, :, :2] = 0
        if i == 1:
            pred[pred == 2] = 1  # no core predicted at all
        # the truth as an ImageJ TIFF stack recording its voxel size in mm
        tifffile.imwrite(d / "truth" / f"case{i}.tif", labels, imagej=True,
                         resolution=(1 / SPACING[2], 1 / SPACING[1]),
                         metadata={"spacing": SPACING[0], "unit": "mm", "axes": "ZYX"})
        np.save(d / "pred" / f"case{i}.npy", pred)
        truths.append(labels)
        preds.append(pred)
        images.append(image)
    return {"dir": d, "truths": truths, "preds": preds, "images": images}


def test_evaluate_label_volumes_per_class_and_region(volumes: dict) -> None:
    d = volumes["dir"]
    regions = {"tumour": (1, 2)}
    result = evaluate(None, d / "truth", labels=d / "pred", regions=regions)
    assert result["mode"] == "volume" and result["source"] == "labels"
    assert result["unit"] == "mm" and result["num_classes"] == 3
    assert result["regions"] == {"tumour": [1, 2]}
    for entry, pred, true in zip(result["per_image"], volumes["preds"], volumes["truths"]):
        assert entry["spacing"] == pytest.approx(list(SPACING))
        expected = volume_scores(pred, true, 3, SPACING, regions)
        assert entry["classes"] == expected["classes"]
        assert entry["regions"] == expected["regions"]
        assert entry["shape"] == [12, 40, 40]
    second = result["per_image"][1]["classes"][2]
    assert second["dice"] == 0.0 and second["hd95"] == math.inf  # core missed entirely
    overall = result["overall"]
    assert overall["images"] == 2
    first = result["per_image"][0]["classes"]
    assert overall["classes"][1]["dice"] == pytest.approx(
        (first[1]["dice"] + result["per_image"][1]["classes"][1]["dice"]) / 2)
    assert overall["classes"][2]["hd95"] == pytest.approx(first[2]["hd95"])  # inf left out
    assert overall["classes"][2]["hd95_images"] == 1
    # an explicit spacing (mm) overrides the masks'; finer than 0.1 mm reports µm
    halved = evaluate(None, d / "truth", labels=d / "pred", spacing=(1.5, 0.5, 0.5))
    assert halved["per_image"][0]["classes"][1]["hd95"] == pytest.approx(
        first[1]["hd95"] / 2)
    fine = evaluate(None, d / "truth", labels=d / "pred", spacing=(0.003, 0.001, 0.001))
    assert fine["unit"] == "um"
    assert fine["per_image"][0]["classes"][1]["hd95"] == pytest.approx(first[1]["hd95"])
    # arrays record no voxel size: distances in voxels
    plain = evaluate(None, volumes["truths"][0], labels=volumes["preds"][0])
    assert plain["unit"] == "voxel"
    assert plain["per_image"][0]["classes"][1]["hd95"] == pytest.approx(
        hd95(volumes["preds"][0] == 1, volumes["truths"][0] == 1))


def test_evaluate_3d_probabilities_and_a_3d_model(volumes: dict) -> None:
    import tilerseg
    import torch

    true = volumes["truths"][0]
    probs = np.stack([true == c for c in range(3)]).astype(np.float32)
    perfect = evaluate(None, true, probabilities=probs, volume=True, spacing=SPACING)
    assert perfect["source"] == "probabilities"
    assert all(s == {"iou": 1.0, "dice": 1.0, "hd95": 0.0}
               for s in perfect["per_image"][0]["classes"].values())
    # without volume=True the same probabilities get the 2D figures, as before
    flat = evaluate(None, true, probabilities=probs, thresholds=[0.5])
    assert "mode" not in flat and flat["overall"]["pixel_error"] == 0.0
    torch.manual_seed(0)
    model = tilerseg.create_model("unet3d", in_channels=1, num_classes=3, depth=2,
                                  base_channels=2).eval()
    result = evaluate(volumes["images"][0], true, model, device="cpu", spacing=SPACING)
    assert result["mode"] == "volume" and result["source"] == "model"
    predicted = tilerseg.segment(volumes["images"][0], model, device="cpu").argmax(axis=0)
    assert result["per_image"][0]["classes"] == volume_scores(predicted, true, 3, SPACING)[
        "classes"]


def test_eval_command_on_volumes(volumes: dict, tmp_path: Path,
                                 capsys: pytest.CaptureFixture) -> None:
    d = volumes["dir"]
    report = tmp_path / "scores.json"
    assert _cli(["eval", str(d / "truth"), "--labels", str(d / "pred"), "--region",
                 "WT=1,2", "--region", "core=2", "--json", str(report)]) == 0
    table = capsys.readouterr().out
    lines = table.splitlines()
    assert lines[0].split() == ["image", "Dice", "1", "Dice", "2", "Dice", "WT", "Dice", "core",
                                "HD95", "1", "[mm]", "HD95", "2", "[mm]", "HD95", "WT", "[mm]",
                                "HD95", "core", "[mm]"]
    assert lines[2].startswith("case0.npy") and lines[3].startswith("case1.npy")
    assert lines[5].startswith("mean") and "region WT: classes 1, 2" in table
    assert lines[3].split()[6] == "inf"  # case1: core missed
    saved = json.loads(report.read_text())
    direct = evaluate(None, d / "truth", labels=d / "pred", regions={"WT": (1, 2), "core": (2,)})
    assert saved == json.loads(to_json(direct))
    assert saved["per_image"][1]["classes"]["2"]["hd95"] is None  # inf is null in JSON
    assert saved["overall"]["regions"]["core"]["hd95_images"] == 1
    assert _cli(["eval", str(d / "truth" / "case0.tif"), "--labels",
                 str(d / "pred" / "case0.npy"), "--spacing", "6,2,2", "--json", "-"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["unit"] == "mm" and printed["per_image"][0]["spacing"] == [6.0, 2.0, 2.0]
    assert printed["per_image"][0]["classes"]["1"]["hd95"] == pytest.approx(
        2 * saved["per_image"][0]["classes"]["1"]["hd95"])
    assert "HD95" in format_table(direct)


def test_eval_command_on_volumes_rejects_bad_input(
    volumes: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from tilerseg.cli import main

    d = volumes["dir"]
    truth, pred = str(d / "truth" / "case0.tif"), str(d / "pred" / "case0.npy")
    np.save(tmp_path / "short.npy", volumes["preds"][0][:10])
    np.save(tmp_path / "seven.npy", np.where(volumes["preds"][0] > 0, 7, 0).astype(np.uint8))
    for argv, message in [
        ([truth, "--labels", str(tmp_path / "short.npy")], r"shape \(10, 40, 40\) but mask"),
        ([truth, "--labels", pred, "--spacing", "1,2,3,4"], "has 4 values; expected 3"),
        ([truth, "--labels", pred, "--spacing", "3,0,1"], "> 0"),
        ([truth, "--labels", pred, "--spacing", "3,x,1"], "comma-separated"),
        ([truth, "--labels", pred, "--classes", "2"], "not understood: expected class numbers 0..1"),
        ([truth, "--labels", str(tmp_path / "seven.npy"), "--classes", "3"], r"values \(0, 7\)"),
        ([truth, "--labels", pred, "--region", "WT=1,5"], "region WT classes"),
        ([truth, "--labels", pred, "--region", "WT"], "NAME=CLASS"),
        ([truth, "--labels", pred, "--probabilities", pred], "not both"),
    ]:
        with pytest.raises(TilersegError, match=message):
            _cli(["eval", *argv])
        assert main(["eval", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    with pytest.raises(InvalidImageError, match="not understood"):
        evaluate(None, volumes["truths"][0], labels=volumes["preds"][0], num_classes=2)
    with pytest.raises(InvalidArgumentError, match="records no voxel size"):
        evaluate(None, [d / "truth" / "case0.tif", volumes["truths"][1]],
                 labels=volumes["preds"])
    with pytest.raises(InvalidArgumentError, match="not with volume=False"):
        evaluate(None, volumes["truths"][0], labels=volumes["preds"][0], volume=False)


def test_evaluate_nifti_volumes_once_readable(volumes: dict, tmp_path: Path) -> None:
    nibabel = pytest.importorskip("nibabel")
    from tilerseg import open_image

    true, pred = volumes["truths"][0], volumes["preds"][0]
    affine = np.diag([SPACING[2], SPACING[1], SPACING[0], 1.0])  # NIfTI stores X, Y, Z
    for name, volume in (("truth.nii.gz", true), ("pred.nii.gz", pred)):
        nibabel.save(nibabel.Nifti1Image(volume.transpose(2, 1, 0), affine), tmp_path / name)
    source = open_image(tmp_path / "truth.nii.gz")
    assert source.pixel_size["Z"] == SPACING[0] * 1000  # mm -> um
    result = evaluate(None, tmp_path / "truth.nii.gz", labels=tmp_path / "pred.nii.gz")
    assert result["mode"] == "volume" and result["unit"] == "mm"
    assert result["per_image"][0]["spacing"] == pytest.approx(list(SPACING))
    expected = volume_scores(pred, true, 3, SPACING)["classes"]
    for c, scores in result["per_image"][0]["classes"].items():
        assert scores == pytest.approx(expected[c])
    # a NIfTI mask alone makes it a volume: probabilities get Dice and HD95 too
    probs = np.stack([pred == c for c in range(3)]).astype(np.float32)
    auto = evaluate(None, tmp_path / "truth.nii.gz", probabilities=probs)
    assert auto["mode"] == "volume" and auto["unit"] == "mm"
    assert auto["per_image"][0]["classes"][1] == pytest.approx(expected[1])

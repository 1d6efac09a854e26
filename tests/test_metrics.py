"""Metrics (pixel error, adapted Rand error, IoU/Dice, ISBI scores) and evaluation."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
import torch

import tilerseg
from tilerseg.errors import (
    ImageNotFoundError,
    InvalidArgumentError,
    InvalidImageError,
    OutputError,
    TilersegError,
)
from tilerseg.evaluate import add_parser, evaluate, format_table, to_json
from tilerseg.io.writers import open_output
from tilerseg.metrics import (
    DEFAULT_THRESHOLDS,
    adapted_rand_error,
    expand_labels,
    iou_dice,
    isbi_scores,
    pixel_error,
)
from tilerseg.synthetic import membrane_image


def _degraded(mask: np.ndarray, seed: int = 0) -> np.ndarray:
    """A poor interior probability: blurred, noisy, with a stretch of membrane erased."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    p = ndimage.gaussian_filter(mask / 255.0, 2) + rng.normal(0, 0.25, mask.shape)
    p[mask.shape[0] // 3 : mask.shape[0] // 2] = 0.9  # merges the cells it crosses
    return np.clip(p, 0, 1)


# -- adapted Rand error -------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_adapted_rand_error_matches_skimage_on_random_labels(seed: int) -> None:
    from skimage.metrics import adapted_rand_error as reference

    rng = np.random.default_rng(seed)
    shape = (23, 31) if seed % 2 else (5, 12, 9)
    true = rng.integers(0, 2 + seed, shape)
    test = rng.integers(0, 7, shape)
    assert abs(adapted_rand_error(true, test) - reference(true, test)[0]) <= 1e-12
    # correlated segmentations: cells vs cells with some labels merged and pixels moved
    true = np.cumsum(rng.random(shape) < 0.05).reshape(shape) % (40 + seed)
    test = np.where(rng.random(shape) < 0.1, rng.integers(0, 40, shape), true // 2)
    assert abs(adapted_rand_error(true, test) - reference(true, test)[0]) <= 1e-12


def test_adapted_rand_error_on_synthetic_cells_matches_skimage() -> None:
    from scipy import ndimage
    from skimage.metrics import adapted_rand_error as reference

    _, mask = membrane_image((96, 96), cell_size=20, seed=3)
    true = ndimage.label(mask == 255)[0]
    test = expand_labels(ndimage.label(_degraded(mask) >= 0.5)[0], 32)
    assert abs(adapted_rand_error(true, test) - reference(true, test)[0]) <= 1e-12


def test_adapted_rand_error_hand_cases() -> None:
    true = np.array([[1, 1, 1, 1], [2, 2, 2, 2]])
    assert adapted_rand_error(true, true) == 0.0
    assert adapted_rand_error(true, true + 10) == 0.0  # label values do not matter
    # splitting a 4-pixel segment into 2 + 2: pairs 4 of 12 + 12 -> F = 16 / 20
    split = np.array([[1, 1, 3, 3], [2, 2, 2, 2]])
    assert adapted_rand_error(true, split) == pytest.approx(0.2, abs=1e-15)
    # label 0 of the truth is ignored, label 0 of the prediction is a segment
    assert adapted_rand_error(np.where(split == 3, 0, true), np.zeros_like(true)) == pytest.approx(
        adapted_rand_error(np.array([1, 1, 2, 2, 2, 2]), np.zeros(6, int))
    )
    negative = np.array([[-5, -5, 7, 7], [2**40, 2**40, 2**40, 2**40]])
    assert adapted_rand_error(true, negative) == pytest.approx(0.2, abs=1e-15)
    assert np.isnan(adapted_rand_error(np.zeros((3, 3), int), np.ones((3, 3), int)))


def test_adapted_rand_error_rejects_bad_input() -> None:
    with pytest.raises(InvalidArgumentError, match="shape"):
        adapted_rand_error(np.ones((2, 3), int), np.ones((3, 2), int))
    with pytest.raises(InvalidArgumentError, match="integer labels"):
        adapted_rand_error(np.ones((2, 2)), np.ones((2, 2), int))
    with pytest.raises(InvalidArgumentError, match="empty"):
        adapted_rand_error(np.ones((0, 2), int), np.ones((0, 2), int))


# -- expand_labels --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("distance", [0, 1, 2.5, 6, 100])
def test_expand_labels_equals_skimage(seed: int, distance: float) -> None:
    """Equal everywhere, ties included: the same nearest pixel from the same EDT."""
    from skimage.segmentation import expand_labels as reference

    rng = np.random.default_rng(seed)
    shape = (40, 37) if seed < 3 else (9, 14, 11)
    density = (0.01, 0.05, 0.3, 0.02)[seed]
    labels = np.where(rng.random(shape) < density, rng.integers(1, 9, shape), 0).astype(np.int32)
    out = expand_labels(labels, distance)
    assert out.dtype == labels.dtype
    np.testing.assert_array_equal(out, reference(labels, distance))


def test_expand_labels_edge_cases() -> None:
    from skimage.segmentation import expand_labels as reference

    tied = np.array([0, 1, 0, 2, 0])  # the middle pixel is equidistant from 1 and 2
    np.testing.assert_array_equal(expand_labels(tied, 1), reference(tied, 1))
    np.testing.assert_array_equal(expand_labels(np.zeros((3, 4), int), 5), np.zeros((3, 4), int))
    full = np.arange(1, 13).reshape(3, 4)
    np.testing.assert_array_equal(expand_labels(full, 5), full)
    with pytest.raises(InvalidArgumentError, match=">= 0"):
        expand_labels(tied, -1)
    with pytest.raises(InvalidArgumentError, match="integer"):
        expand_labels(tied.astype(float), 1)


# -- pixel error, IoU, Dice ----------------------------------------------------------------


def test_pixel_error_counts_flips() -> None:
    rng = np.random.default_rng(1)
    true = rng.integers(0, 2, (30, 40))
    pred = true.copy()
    flip = rng.choice(true.size, 37, replace=False)
    pred.flat[flip] = 1 - pred.flat[flip]
    assert pixel_error(pred, true) == 37 / 1200
    assert pixel_error(true, true) == 0.0
    with pytest.raises(InvalidArgumentError, match="shape"):
        pixel_error(pred, true.T)


def test_iou_dice_by_hand() -> None:
    pred = np.array([[0, 1, 1], [2, 2, 0]])
    true = np.array([[0, 1, 0], [2, 1, 0]])
    scores = iou_dice(pred, true, 4)
    # class 0: pred {0,5}, true {0,2,5}; class 1: pred {1,2}, true {1,4}; class 2: {3,4} vs {3}
    assert scores[0] == {"iou": 2 / 3, "dice": 4 / 5}
    assert scores[1] == {"iou": 1 / 3, "dice": 2 / 4}
    assert scores[2] == {"iou": 1 / 2, "dice": 2 / 3}
    assert scores[3] == {"iou": 1.0, "dice": 1.0}  # absent in both
    assert iou_dice(np.ones((2, 2), int), np.zeros((2, 2), int), 2)[1] == {"iou": 0.0, "dice": 0.0}
    with pytest.raises(InvalidArgumentError, match="class 4"):
        iou_dice(pred + 2, true, 4)
    with pytest.raises(InvalidArgumentError, match="num_classes"):
        iou_dice(pred, true, 0)


# -- ISBI scores -----------------------------------------------------------------------------


def test_isbi_scores_of_the_truth_are_perfect_at_every_threshold() -> None:
    _, mask = membrane_image((64, 80), cell_size=16, seed=2)
    for truth in (mask, mask // 255, mask == 255):
        scores = isbi_scores(mask / 255.0, truth)
        assert len(scores["per_threshold"]) == len(DEFAULT_THRESHOLDS)
        assert all(r["pixel_error"] == 0 and r["rand_error"] == 0 for r in scores["per_threshold"])
        assert scores["pixel_error"] == scores["rand_error"] == 0.0
        assert scores["pixel_threshold"] == scores["rand_threshold"] == 0.5  # ties -> 0.5
        assert scores["slices"] == 1


def test_isbi_scores_of_a_degraded_prediction_are_worse() -> None:
    _, mask = membrane_image((64, 80), cell_size=16, seed=2)
    scores = isbi_scores(_degraded(mask), mask)
    assert 0 < scores["pixel_error"] < 0.5
    assert 0 < scores["rand_error"] <= 1
    best = min(r["rand_error"] for r in scores["per_threshold"])
    assert scores["rand_error"] == best
    assert scores["rand_threshold"] in DEFAULT_THRESHOLDS
    # a prediction that merges two cells is penalised by the Rand error only
    two = np.full((6, 9), 255, np.uint8)
    two[:, 4] = 0
    merged = isbi_scores(np.ones((6, 9)), two, thresholds=[0.5])
    assert merged["pixel_error"] == pytest.approx(6 / 54)
    assert merged["rand_error"] == pytest.approx(1 - 1104 / ((1104 + 2256) / 2))


def test_isbi_scores_average_the_slices_of_a_stack() -> None:
    masks = np.stack([membrane_image((48, 48), cell_size=16, seed=s)[1] for s in (4, 5)])
    probs = np.stack([masks[0] / 255.0, _degraded(masks[1], seed=1)])
    stack = isbi_scores(probs, masks, thresholds=[0.3, 0.5])
    first = isbi_scores(probs[0], masks[0], thresholds=[0.3, 0.5])
    second = isbi_scores(probs[1], masks[1], thresholds=[0.3, 0.5])
    assert stack["slices"] == 2
    for s, a, b in zip(stack["per_threshold"], first["per_threshold"], second["per_threshold"]):
        assert s["pixel_error"] == pytest.approx((a["pixel_error"] + b["pixel_error"]) / 2)
        assert s["rand_error"] == pytest.approx((a["rand_error"] + b["rand_error"]) / 2)


def test_isbi_scores_reject_bad_input() -> None:
    mask = np.full((8, 8), 255, np.uint8)
    with pytest.raises(InvalidImageError, match="not understood"):
        isbi_scores(np.ones((8, 8)), np.full((8, 8), 7, np.uint8))
    with pytest.raises(InvalidArgumentError, match=r"\[0, 1\]"):
        isbi_scores(np.full((8, 8), 2.0), mask)
    with pytest.raises(InvalidArgumentError, match="NaN"):
        isbi_scores(np.full((8, 8), np.nan), mask)
    with pytest.raises(InvalidArgumentError, match="shape"):
        isbi_scores(np.ones((8, 7)), mask)
    with pytest.raises(InvalidArgumentError, match="thresholds"):
        isbi_scores(np.ones((8, 8)), mask, thresholds=[0.5, 1.5])
    with pytest.raises(InvalidArgumentError, match="thresholds"):
        isbi_scores(np.ones((8, 8)), mask, thresholds=[])
    with pytest.raises(InvalidArgumentError, match="expand distance"):
        isbi_scores(np.ones((8, 8)), mask, expand_distance=-2)
    with pytest.raises(InvalidArgumentError, match=r"\(Y, X\)"):
        isbi_scores(np.ones((2, 2, 8, 8)), np.ones((2, 2, 8, 8), np.uint8))


# -- evaluate -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("eval")
    (d / "images").mkdir()
    (d / "masks").mkdir()
    pairs = [membrane_image((64, 64), cell_size=16, seed=s) for s in (7, 8)]
    for i, (image, mask) in enumerate(pairs):  # natural order: img2 before img10
        name = ("img2", "img10")[i]
        imagecodecs.imwrite(d / "images" / f"{name}.png", image)
        imagecodecs.imwrite(d / "masks" / f"{name}.png", mask)
    torch.manual_seed(0)
    model = tilerseg.create_model("unet", depth=2, base_channels=2).eval()
    tilerseg.save_model(model, d / "model.pt")
    return {"dir": d, "pairs": pairs, "model": model}


def _check_structure(result: dict, images: int) -> None:
    assert len(result["per_image"]) == images
    for entry in result["per_image"] + [result["overall"]]:
        assert 0 <= entry["pixel_error"] <= 1
        assert 0 <= entry["isbi"]["pixel_error"] <= entry["pixel_error"] + 1e-12
        assert 0 <= entry["isbi"]["rand_error"] <= 1
        assert set(entry["classes"]) == {0, 1}
        assert all(0 <= v <= 1 for s in entry["classes"].values() for v in s.values())
    assert result["overall"]["slices"] == sum(e["slices"] for e in result["per_image"])


def test_evaluate_a_model_on_png_folders(data: dict) -> None:
    d, model = data["dir"], data["model"]
    result = evaluate(d / "images", d / "masks", model, tile=64, device="cpu")
    _check_structure(result, 2)
    assert [e["name"] for e in result["per_image"]] == ["img2.png", "img10.png"]
    assert result["per_image"][0]["shape"] == [1, 64, 64]
    assert result["source"] == "model" and result["num_classes"] == 2
    # the same as scoring the probabilities of tilerseg.segment
    images = [image for image, _ in data["pairs"]]
    masks = [mask for _, mask in data["pairs"]]
    probs = [tilerseg.segment(image, model, tile=64, device="cpu") for image in images[::-1]]
    direct = evaluate(None, masks[::-1], probabilities=probs)
    assert direct["overall"] == result["overall"]
    first = isbi_scores(probs[1][1], masks[0])
    assert result["per_image"][0]["isbi"] == first
    argmax = probs[1].argmax(axis=0)
    assert result["per_image"][0]["pixel_error"] == pixel_error(argmax, masks[0] // 255)
    assert result["per_image"][0]["classes"] == iou_dice(argmax, masks[0] // 255, 2)
    # a stack (multi-page TIFF; masks as a 3-D array) is segmented and scored plane by plane
    tifffile.imwrite(d / "stack.tif", np.stack(images[::-1]))
    stack = evaluate(d / "stack.tif", np.stack(masks[::-1]), model, tile=64, device="cpu")
    assert stack["per_image"][0]["shape"] == [2, 64, 64]
    for key in ("pixel_error", "rand_error", "classes", "isbi"):
        assert stack["overall"][key] == result["overall"][key]


def test_evaluate_ome_zarr_probabilities(data: dict, tmp_path: Path) -> None:
    (image, mask), model = data["pairs"][0], data["model"]
    out = tilerseg.segment_to_zarr(image, model, tmp_path / "out.zarr", tile=32, device="cpu",
                                   dtype="float32")
    result = evaluate(None, mask, probabilities=out)
    _check_structure(result, 1)
    assert result["per_image"][0]["name"] == "out.zarr"
    stored = np.asarray(open_output(out)["probabilities"][:])
    assert evaluate(None, mask, probabilities=stored)["overall"] == result["overall"]
    in_memory = evaluate(None, mask, probabilities=tilerseg.segment(image, model, tile=32,
                                                                    device="cpu"))
    assert in_memory["overall"]["pixel_error"] == pytest.approx(
        result["overall"]["pixel_error"], abs=2 / mask.size)
    # a mask given as class numbers 0/1 scores the same as 0/255
    assert evaluate(None, mask // 255, probabilities=out)["overall"] == result["overall"]
    # a one-channel (sigmoid) probability map of class 1
    single = evaluate(None, mask, probabilities=stored[1])
    assert single["overall"]["isbi"] == result["overall"]["isbi"]
    background = evaluate(None, mask, probabilities=stored[0:1], foreground_class=0)
    assert background["overall"]["isbi"]["per_threshold"][0]["threshold"] == 0.05


def test_evaluate_perfect_probabilities_and_table(data: dict) -> None:
    masks = [mask for _, mask in data["pairs"]]
    probs = [np.stack([1 - m / 255.0, m / 255.0]) for m in masks]
    result = evaluate(None, masks, probabilities=probs)
    overall = result["overall"]
    assert overall["pixel_error"] == overall["rand_error"] == 0.0
    assert overall["isbi"]["pixel_error"] == overall["isbi"]["rand_error"] == 0.0
    assert overall["classes"] == {0: {"iou": 1.0, "dice": 1.0}, 1: {"iou": 1.0, "dice": 1.0}}
    table = format_table(result)
    assert "overall" in table and "#2" in table and "0.0000 @0.50" in table
    assert json.loads(to_json(result))["overall"]["classes"]["1"]["iou"] == 1.0


def test_evaluate_rejects_bad_input(data: dict, tmp_path: Path) -> None:
    d, model = data["dir"], data["model"]
    mask = data["pairs"][0][1]
    probs = np.stack([1 - mask / 255.0, mask / 255.0])
    with pytest.raises(InvalidArgumentError, match="2 images but 1 masks"):
        evaluate(d / "images", [mask], model, device="cpu")
    with pytest.raises(InvalidArgumentError, match="shape"):
        evaluate(None, mask[:, :60], probabilities=probs)
    with pytest.raises(ImageNotFoundError, match="does not exist"):
        evaluate(tmp_path / "missing.png", mask, model)
    with pytest.raises(ImageNotFoundError, match="no mask files"):
        evaluate(None, tmp_path, probabilities=probs)
    with pytest.raises(InvalidImageError, match="not understood"):
        evaluate(None, np.where(mask > 0, 7, 0).astype(np.uint8), probabilities=probs)
    with pytest.raises(InvalidImageError, match="not probabilities"):
        evaluate(None, mask, probabilities=probs * 3)
    with pytest.raises(InvalidArgumentError, match="not both"):
        evaluate(None, mask, model, probabilities=probs)
    with pytest.raises(InvalidArgumentError, match="model"):
        evaluate(None, mask)
    with pytest.raises(InvalidArgumentError, match="needs images"):
        evaluate(None, mask, model)
    with pytest.raises(InvalidArgumentError, match="foreground class 2"):
        evaluate(None, mask, probabilities=probs, foreground_class=2)
    with pytest.raises(OutputError):
        evaluate(None, d / "masks" / "img2.png", probabilities=d / "images" / "img2.png")
    labels_only = tilerseg.segment_to_zarr(mask, model, tmp_path / "labels.zarr", tile=32,
                                           device="cpu", output="labels")
    with pytest.raises(InvalidImageError, match="labels only"):
        evaluate(None, mask, probabilities=labels_only)


# -- command line ----------------------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tilerseg")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_eval_command(data: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    d = data["dir"]
    report = tmp_path / "scores.json"
    assert _cli(["eval", str(d / "images"), str(d / "masks"), "--model", str(d / "model.pt"),
                 "--tile", "64", "--device", "cpu", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "img10.png" in out and "overall" in out
    saved = json.loads(report.read_text())
    assert saved["overall"]["images"] == 2 and len(saved["thresholds"]) == 19
    out_zarr = tilerseg.segment_to_zarr(data["pairs"][0][0], data["model"], tmp_path / "p.zarr",
                                        tile=32, device="cpu")
    assert _cli(["eval", str(d / "masks" / "img2.png"), "--probabilities", str(out_zarr),
                 "--thresholds", "0.4,0.6", "--json", "-"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["thresholds"] == [0.4, 0.6] and printed["source"] == "probabilities"
    for argv, message in [
        (["eval", str(d / "masks")], "IMAGES and MASKS"),
        (["eval", "a", "b", "--probabilities", str(out_zarr)], "MASKS only"),
        (["eval", str(d / "masks"), "--probabilities", str(out_zarr), "--thresholds", "x"],
         "comma-separated"),
        (["eval", str(tmp_path / "nope"), str(d / "masks")], "does not exist"),
    ]:
        with pytest.raises(TilersegError, match=message):
            _cli(argv)

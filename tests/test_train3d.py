"""3D training: volume/label pairs, per-axis windows, foreground oversampling, the 3D weight
map, 3D augmentation, Dice + CE, and a 3D U-Net trained from the CLI."""

from __future__ import annotations

import json

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage

import tilerseg
from tilerseg import InvalidArgumentError, InvalidImageError, InvalidModelError
from tilerseg.synthetic import tumour_volume
from tilerseg.train import Pair, PatchSampler, TrainConfig, load_pairs, train
from tilerseg.train.augment import augment, displacement_field, flip_rotate
from tilerseg.train.losses import dice_ce_loss, soft_dice_loss
from tilerseg.train.sampling import training_window
from tilerseg.train.weights import border_weights

from .reference import one_shot_reference
from .test_train import _straight_and_resumed

TINY3D = {"name": "unet3d", "depth": 1, "base_channels": 2, "in_channels": 1,
          "num_classes": 3}


def _write_volumes(root: Path, count: int, shape=(24, 64, 64), spacing=(3.0, 1.0, 1.0),
                   seed: int = 0) -> tuple[Path, Path]:
    """Synthetic tumour volumes as OME-TIFF (C, Z, Y, X) with spacing in um, and labels."""
    images, labels = root / "imagesTr", root / "labelsTr"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for k in range(count):
        image, label = tumour_volume(shape, spacing, modalities=4, seed=seed + k)
        um = [1000 * s for s in spacing]
        tifffile.imwrite(images / f"CASE_{k:03d}_0000.ome.tif", image, metadata={
            "axes": "CZYX", "PhysicalSizeZ": um[0], "PhysicalSizeY": um[1],
            "PhysicalSizeX": um[2]})
        tifffile.imwrite(labels / f"CASE_{k:03d}.tif", label)
    return images, labels


# -- data ------------------------------------------------------------------------------------

def test_load_pairs_reads_volumes_with_spacing_and_nnunet_names(tmp_path: Path) -> None:
    images, labels = _write_volumes(tmp_path, 2, shape=(8, 32, 32))
    pairs = load_pairs(images, labels, num_classes=3, ndim=3)
    assert [p.name for p in pairs] == ["CASE_000", "CASE_001"]
    assert pairs[0].image.shape == (4, 8, 32, 32) and pairs[0].mask.shape == (8, 32, 32)
    assert pairs[0].spacing == (3000.0, 1000.0, 1000.0)
    assert pairs[0].relative_spacing() == (3.0, 1.0, 1.0)
    # a single-channel .npy volume (no axis metadata) is (Z, Y, X)
    np.save(tmp_path / "v.npy", np.zeros((8, 32, 32), np.int16))
    (tmp_path / "npy").mkdir()
    (tmp_path / "npy" / "a.npy").write_bytes((tmp_path / "v.npy").read_bytes())
    (tmp_path / "npyl").mkdir()
    np.save(tmp_path / "npyl" / "a.npy", np.zeros((8, 32, 32), np.uint8))
    (pair,) = load_pairs(tmp_path / "npy", tmp_path / "npyl", ndim=3)
    assert pair.image.shape == (1, 8, 32, 32) and pair.spacing is None


def test_load_pairs_reads_nnunet_nifti_cases(tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    affine[:3, 3] = [5.0, -3.0, 10.0]
    for k in range(2):
        labels = tumour_volume((8, 24, 20), (3, 1, 1), modalities=1, seed=k)[1]
        xyz = lambda a: np.ascontiguousarray(a.transpose(2, 1, 0))  # noqa: E731
        for c in range(2):
            nib.save(nib.Nifti1Image(xyz((labels * 10 + c).astype(np.int16)), affine),
                     tmp_path / "imagesTr" / f"BRATS_{k:03d}_{c:04d}.nii.gz")
        nib.save(nib.Nifti1Image(xyz(labels), affine), tmp_path / "labelsTr" / f"BRATS_{k:03d}.nii.gz")
    pairs = load_pairs(tmp_path / "imagesTr", tmp_path / "labelsTr", 3, ndim=3)
    assert [p.name for p in pairs] == ["BRATS_000", "BRATS_001"]
    for p in pairs:  # one multi-channel image per case, aligned with its labels
        assert p.image.shape == (2,) + p.mask.shape and p.spacing == (3000.0, 1000.0, 1000.0)
        for c in range(2):
            np.testing.assert_array_equal(p.image[c], p.mask * 10 + c)


def test_bad_volumes_are_refused(tmp_path: Path) -> None:
    images, labels = _write_volumes(tmp_path, 2, shape=(8, 32, 32))
    tifffile.imwrite(labels / "CASE_001.tif", np.zeros((8, 32, 30), np.uint8))
    with pytest.raises(InvalidImageError, match=r"has shape \(8, 32, 32\) but its mask"):
        load_pairs(images, labels, 3, ndim=3)
    tifffile.imwrite(labels / "CASE_001.tif", np.zeros((8, 32, 32), np.uint8))
    # volumes read for a 2D model: refused, naming the way out
    with pytest.raises(InvalidImageError, match="needs a 3D model"):
        load_pairs(images, labels, 3, ndim=2)
    # a 2D model given 3D pairs
    pairs = load_pairs(images, labels, 3, ndim=3)
    with pytest.raises(InvalidModelError, match="is 2D but CASE_000 is 3D"):
        train(pairs, tmp_path / "run", TrainConfig(model={"name": "unet", "depth": 1,
                                                          "in_channels": 4}))
    # volumes smaller than one training output
    config = TrainConfig(model={**TINY3D, "in_channels": 4}, window=[30, 30, 60], epochs=1)
    with pytest.raises(InvalidImageError, match="smaller than one training tile"):
        train(pairs, tmp_path / "run", config)
    assert not (tmp_path / "run" / "last.pt").exists()
    with pytest.raises(InvalidArgumentError, match="loss='focal' is not known"):
        TrainConfig(loss="focal")


def test_cli_refuses_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tilerseg.cli import main

    images, labels = _write_volumes(tmp_path, 2, shape=(8, 32, 32))
    tifffile.imwrite(labels / "CASE_001.tif", np.zeros((8, 32, 30), np.uint8))
    status = main(["train", "--arch", "unet3d", "--images", str(images), "--masks",
                   str(labels), "-o", str(tmp_path / "run"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert err[0].startswith("tilerseg: error: image CASE_001_0000.ome.tif has shape")
    status = main(["train", "--arch", "unet3d", "--images", str(images), "--masks",
                   str(labels), "-o", str(tmp_path / "run"), "--window", "1,2,3,4", "-q"])
    assert status == 2 and "--window '1,2,3,4' must be" in capsys.readouterr().err


# -- geometry --------------------------------------------------------------------------------

def test_per_axis_windows_are_admissible_for_anisotropic_pooling() -> None:
    model = tilerseg.create_model("unet3d", base_channels=2)  # pool (1,2,2),(1,2,2),(2,2,2)
    g = tilerseg.model_geometry(model)
    assert g.step == (2, 8, 8)
    for window in [None, 50, (20, 61, 100), (35, 93, 95)]:
        w = training_window(g, window)
        wanted = (w if window is None else
                  (window,) * 3 if isinstance(window, int) else window)
        for axis in range(3):
            assert g.is_admissible(w[axis], axis) and w[axis] >= wanted[axis]
            assert w[axis] - g.step[axis] < max(wanted[axis], g.min_input[axis])
    assert training_window(g, (35, 93, 95)) == (36, 100, 100)  # Z steps by 2, Y/X by 8
    out = [n - 2 * h for n, h in zip(training_window(g, None), g.halo)]
    assert 16 <= out[0] <= 32 and 64 <= min(out[1:]) and max(out[1:]) <= 96
    with pytest.raises(InvalidArgumentError, match="one positive side or 3"):
        training_window(g, (10, 10))


def test_sampler_windows_carry_their_labels(tmp_path: Path) -> None:
    """A label volume used as the image: the centre of every window is its label crop."""
    rng = np.random.default_rng(0)
    labels = ndimage.zoom(rng.integers(0, 3, (3, 4, 4)), (4, 10, 10), order=0)[:10, :37, :33]
    pair = Pair("v", labels[None].astype(np.float32), labels.astype(np.int64), (3.0, 1.0, 1.0))
    model = tilerseg.create_model(**TINY3D)
    config = TrainConfig(model=TINY3D, elastic=False, grey=False, normalize="none")
    sampler = PatchSampler([pair], None, model, (12, 24, 24), config, rng)
    h = sampler.halos
    for _ in range(20):
        x, y, w = sampler.sample()
        centre = x[0, h[0]:h[0] + y.shape[0], h[1]:h[1] + y.shape[1], h[2]:h[2] + y.shape[2]]
        np.testing.assert_array_equal(centre, y)
        assert x.shape[1:] == sampler.windows and (w == 1).all()


def test_foreground_sampling_oversamples_small_tumours() -> None:
    mask = np.zeros((20, 80, 80), np.int64)
    mask[8:11, 60:64, 10:14] = 1
    mask[2:4, 5:8, 70:74] = 2
    pair = Pair("v", mask[None].astype(np.float32), mask)
    model = tilerseg.create_model(**TINY3D)

    def share(foreground: float) -> float:
        config = TrainConfig(model=TINY3D, elastic=False, flips=False, grey=False,
                             normalize="none", foreground=foreground)
        sampler = PatchSampler([pair], None, model, (10, 24, 24), config,
                               np.random.default_rng(3))
        return float(np.mean([(sampler.sample()[1] > 0).any() for _ in range(300)]))

    uniform, oversampled, always = share(0.0), share(1 / 3), share(1.0)
    assert uniform < 0.1  # measured 0.05
    assert oversampled > uniform + 0.2 and always == 1.0


# -- weight map ------------------------------------------------------------------------------

def test_3d_weight_map_matches_brute_force_with_spacing() -> None:
    mask = np.zeros((5, 9, 12), np.int64)
    mask[1:3, 2:5, 1:4] = 1
    mask[2:5, 4:8, 7:10] = 1
    spacing, w0, sigma = (3.0, 1.0, 1.0), 10.0, 4.0
    got = border_weights(mask, 1, w0, sigma, cutoff=0, spacing=spacing)
    objects, n = ndimage.label(mask == 1)
    assert n == 2
    points = [np.argwhere(objects == k) * spacing for k in (1, 2)]
    expected = np.zeros(mask.shape)
    for voxel in itertools.product(*map(range, mask.shape)):
        if objects[voxel]:
            continue
        p = np.asarray(voxel) * spacing
        d = sorted(float(np.sqrt(((q - p) ** 2).sum(1)).min()) for q in points)
        expected[voxel] = w0 * math.exp(-(d[0] + d[1]) ** 2 / (2 * sigma ** 2))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # truncated: exact where kept, zero elsewhere; isotropic spacing gives another map
    cut = border_weights(mask, 1, w0, sigma, spacing=spacing)
    kept = expected >= 1e-3 * w0
    np.testing.assert_allclose(cut[kept], expected[kept], rtol=1e-5)
    assert (cut[~kept] == 0).all()
    assert not np.allclose(border_weights(mask, 1, w0, sigma, cutoff=0), got)


# -- augmentation ----------------------------------------------------------------------------

def _blobs3d(shape=(16, 40, 40), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndimage.zoom(rng.integers(0, 4, (4, 5, 5)), np.divide(shape, (4, 5, 5)),
                        order=0).astype(np.uint8)


def test_3d_flips_and_rotations_keep_labels_and_respect_anisotropy() -> None:
    labels = _blobs3d()
    seen_rot = False
    for seed in range(12):
        image, mask, weights = augment(labels[None].astype(np.float32), labels,
                                       labels.astype(np.float32), np.random.default_rng(seed),
                                       elastic=False, grey=False, spacing=(3, 1, 1))
        np.testing.assert_array_equal(image[0], mask)
        np.testing.assert_array_equal(weights, mask)
        flips = [np.flip(labels, axes) for axes in
                 [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]]
        plain = any(np.array_equal(mask, f) for f in flips)
        seen_rot |= not plain
    assert seen_rot  # Y and X alike: 90-degree rotations in the (Y, X) plane happen
    # Y and X with different spacing: never rotated, only flipped
    for seed in range(12):
        out = flip_rotate([labels], np.random.default_rng(seed), ndim=3, rotate=False)[0]
        assert any(np.array_equal(out, np.flip(labels, axes)) for n in range(4)
                   for axes in itertools.combinations(range(3), n))
        _, mask, _ = augment(labels[None].astype(np.float32), labels, None,
                             np.random.default_rng(seed), elastic=False, grey=False,
                             spacing=(1, 1, 2))
        assert any(np.array_equal(mask, np.flip(labels, axes)) for n in range(4)
                   for axes in itertools.combinations(range(3), n))


def test_3d_elastic_keeps_image_and_labels_aligned() -> None:
    labels = _blobs3d(seed=1)
    image = np.stack([labels, 2 * labels]).astype(np.float32)
    img, msk, _ = augment(image, labels, None, np.random.default_rng(4), flips=False,
                          grey=False, spacing=(3, 1, 1))
    assert (msk != labels).mean() > 0.02  # really deformed
    interior = ndimage.minimum_filter(msk, 3) == ndimage.maximum_filter(msk, 3)
    assert interior.mean() > 0.15
    assert (np.rint(img[0]) == msk)[interior].mean() >= 0.99
    assert (np.rint(img[1] / 2) == msk)[interior].mean() >= 0.99


def test_3d_displacements_are_scaled_by_the_spacing() -> None:
    shape, sigma = (9, 33, 33), np.array([10 / 3, 10.0, 10.0])
    field = displacement_field(shape, np.random.default_rng(2), grid=3, sigma=sigma)
    nodes = np.random.default_rng(2).normal(0, 1, (3, 3, 3, 3)) * sigma[:, None, None, None]
    for node, voxel in [((0, 0, 0), (0, 0, 0)), ((2, 1, 2), (8, 16, 32)),
                        ((1, 1, 1), (4, 16, 16))]:
        np.testing.assert_allclose(field[(slice(None), *voxel)], nodes[(slice(None), *node)],
                                   atol=1e-9)


def test_grey_values_per_channel_keep_zscored_ranges() -> None:
    from tilerseg.train.augment import grey_values

    x = np.random.default_rng(0).normal(0, 1, (3, 4, 8, 8)).astype(np.float32)
    x[1] *= 100
    y = grey_values(x, np.random.default_rng(1), per_channel=True)
    assert y.shape == x.shape and (y < 0).any()
    ratios = [y[c].std() / x[c].std() for c in range(3)]
    assert all(0.6 < r < 1.6 for r in ratios) and len(set(np.round(ratios, 6))) == 3


# -- loss ------------------------------------------------------------------------------------

def test_dice_ce_loss_closed_form() -> None:
    log2 = math.log(2)
    # voxel A: probabilities (1/4, 1/2, 1/4), class 1; voxel B: (1/4, 1/4, 1/2), class 2
    logits = torch.tensor([[0.0, 0.0], [log2, 0.0], [0.0, log2]]).reshape(1, 3, 1, 1, 2)
    target = torch.tensor([1, 2]).reshape(1, 1, 1, 2)
    # Dice of class 1 and 2: 2 (1/2) / (3/4 + 1) = 4/7 each; CE: -log(1/2) per voxel
    assert float(soft_dice_loss(logits, target, smooth=0)) == pytest.approx(3 / 7, abs=1e-6)
    loss = dice_ce_loss(logits, target, torch.ones(1, 1, 1, 2))
    assert float(loss) == pytest.approx(3 / 7 + log2, abs=1e-4)
    # weights scale the CE term only; deep supervision averages the heads
    loss2 = dice_ce_loss(logits, target, torch.full((1, 1, 1, 2), 2.0))
    assert float(loss2) == pytest.approx(3 / 7 + 2 * log2, abs=1e-4)
    assert float(dice_ce_loss([logits, logits], target, torch.ones(1, 1, 1, 2))) == \
        pytest.approx(float(loss), abs=1e-6)
    # perfect logits: loss near 0
    perfect = torch.tensor([[-20.0, -20.0], [20.0, -20.0], [-20.0, 20.0]]).reshape(1, 3, 1, 1, 2)
    assert float(dice_ce_loss(perfect, target, torch.ones(1, 1, 1, 2))) < 1e-6


def test_bf16_trains_conv3d_and_keeps_fp32_weights(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    mask = (ndimage.gaussian_filter(rng.random((12, 40, 40)), 3) > 0.5).astype(np.int64)
    pair = Pair("v", (mask + 0.3 * rng.random(mask.shape))[None].astype(np.float32), mask)
    model = {**TINY3D, "num_classes": 2}
    config = TrainConfig(model=model, epochs=1, steps_per_epoch=3, batch_size=1,
                         window=(14, 20, 20), precision="bf16", normalize="none")
    result = train([pair], tmp_path / "run", config, val_pairs=[pair])
    record = result["history"][0]
    assert np.isfinite(record["loss"]) and 0 <= record["mean_dice"] <= 1
    trained = tilerseg.load_model(tmp_path / "run" / "best.pt")
    assert all(v.dtype == torch.float32 for v in trained.state_dict().values())
    assert trained.metadata["normalize"] == "none"
    assert trained.metadata["training"]["loss"] == "dice+ce"


def test_3d_resume_continues_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    mask = ndimage.zoom(rng.integers(0, 3, (3, 4, 4)), (4, 10, 10), order=0).astype(np.int64)
    pairs = [Pair("v", (mask + rng.random(mask.shape))[None].astype(np.float32), mask,
                  (2.0, 1.0, 1.0))]
    config = TrainConfig(model=TINY3D, epochs=2, steps_per_epoch=3, batch_size=1,
                         window=(12, 24, 24), seed=5, normalize="none", elastic_p=0.5)
    _straight_and_resumed(pairs, tmp_path, config)


def test_unetpp_trains_in_3d_with_anisotropic_pooling(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    mask = ndimage.zoom(rng.integers(0, 2, (3, 4, 4)), (4, 12, 12), order=0).astype(np.int64)
    pair = Pair("v", (mask + rng.random(mask.shape))[None].astype(np.float32), mask)
    model = {"name": "unetpp", "ndim": 3, "depth": 2, "base_channels": 2, "padding": "valid",
             "pool": [[1, 2, 2], [2, 2, 2]]}
    config = TrainConfig(model=model, epochs=1, steps_per_epoch=2, batch_size=1,
                         window=(30, 48, 48), normalize="none")
    result = train([pair], tmp_path / "run", config, val_pairs=[pair])
    assert np.isfinite(result["history"][0]["loss"]) and "mean_dice" in result["best"]
    assert tilerseg.load_model(tmp_path / "run" / "best.pt").config["ndim"] == 3


# -- the headline: a 3D U-Net trained from the CLI ------------------------------------------

HEADLINE_DICE = 0.6
"""Floor of the validation mean Dice of labels 1 and 2 (see docs/training.md). This run
(6 epochs of 30 steps) reached 0.84-0.87 with other seeds (--seed 2 and 3, their own
volumes); 60 steps were not enough for some seeds (the small core class)."""


def _write_nifti_cases(root: Path, count: int, shape=(24, 64, 64), seed: int = 0
                       ) -> tuple[Path, Path]:
    """nnU-Net's layout, written by nibabel: imagesTr/CASE_00k_000m.nii.gz (one file per
    modality) and labelsTr/CASE_00k.nii.gz, 1 x 1 x 3 mm voxels under a rotated, translated
    affine (tests/nifti_files.py)."""
    from tests.nifti_files import write_case, write_nifti_file

    images, labels = root / "imagesTr", root / "labelsTr"
    labels.mkdir(parents=True)
    for k in range(count):
        image, label = tumour_volume(shape, (3.0, 1.0, 1.0), modalities=4, seed=seed + k)
        write_case(images, f"CASE_{k:03d}", image)
        write_nifti_file(labels / f"CASE_{k:03d}.nii.gz", label)
    return images, labels


def test_cli_trains_a_3d_unet_that_tiles_exactly(tmp_path: Path, capsys) -> None:
    """Multi-modal NIfTI cases in, a 3D U-Net trained from the command line, its tiled
    output exact, its NIfTI output in the input's space, scored by tilerseg eval."""
    pytest.importorskip("nibabel")
    import nibabel as nib

    from tilerseg.cli import main

    images, labels = _write_nifti_cases(tmp_path / "data", 6, seed=10)
    out = tmp_path / "run"
    status = main(["train", "--arch", "unet3d", "--depth", "2", "--base-channels", "8",
                   "--images", str(images), "--masks", str(labels), "--validation", "5",
                   "--window", "40,88,88", "--epochs", "6", "--steps", "30",
                   "--lr", "3e-3", "--precision", "bf16", "--seed", "0", "-o", str(out),
                   "-q"])
    assert status == 0, capsys.readouterr().err
    model = tilerseg.load_model(out / "best.pt")
    validation = model.metadata["validation"]
    assert validation["mean_dice"] >= HEADLINE_DICE, validation
    assert model.metadata["normalize"] == "zscore"
    assert model.metadata["training"]["spacing"]["CASE_000"] == [3000.0, 1000.0, 1000.0]
    # the trained model tiles exactly: two tile sizes against the one-shot reference
    case = str(images / "CASE_005")
    image = np.asarray(tilerseg.open_image(case).data[...])
    norm = tilerseg.normalize.resolve_normalization("zscore", image.dtype, lambda: image)
    reference = one_shot_reference(norm(image), model)
    for tile in [(8, 16, 24), (16, 32, 64)]:
        tiled = tilerseg.segment(image, model, tile=tile, device="cpu", backend="torch",
                                 normalize="zscore")
        assert np.abs(tiled - reference).max() <= 1e-4
    # tilerseg run writes the labels in the case's own space; tilerseg eval scores them
    seg = tmp_path / "CASE_005.nii.gz"
    assert main(["run", case, "--model", str(out / "best.pt"), "--tile", "16,32,64",
                 "--backend", "torch", "-o", str(seg), "-q"]) == 0
    first = nib.load(images / "CASE_005_0000.nii.gz")
    written = nib.load(seg)
    assert np.array_equal(written.affine, first.affine) and written.shape == first.shape
    assert np.array_equal(np.asarray(written.dataobj).transpose(2, 1, 0),
                          reference.argmax(axis=0))
    capsys.readouterr()
    assert main(["eval", str(labels / "CASE_005.nii.gz"), "--labels", str(seg),
                 "--json", "-"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["unit"] == "mm" and scores["per_image"][0]["spacing"] == [3.0, 1.0, 1.0]
    dice = [scores["per_image"][0]["classes"][k]["dice"] for k in ("1", "2")]
    assert abs(np.mean(dice) - validation["mean_dice"]) <= 1e-3  # what validation measured

"""Training: data loading, tiles with the engine's geometry, the loop, resume, errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import tilerseg
from tilerseg import ImageNotFoundError, InvalidArgumentError, InvalidImageError
from tilerseg.synthetic import membrane_image
from tilerseg.train import PatchSampler, TrainConfig, load_pairs, train

SMALL = {"name": "unet", "depth": 2, "base_channels": 4}


def _folders(root: Path, count: int = 3, shape: tuple[int, int] = (96, 96)) -> tuple[Path, Path]:
    images, masks = root / "images", root / "masks"
    images.mkdir()
    masks.mkdir()
    for k in range(count):
        image, mask = membrane_image(shape, cell_size=24, seed=k)
        tifffile.imwrite(images / f"{k:02d}.tif", image)
        tifffile.imwrite(masks / f"{k:02d}.tif", mask)
    return images, masks


def test_load_pairs_reads_binary_masks_as_classes(tmp_path: Path) -> None:
    pairs = load_pairs(*_folders(tmp_path))
    assert [p.name for p in pairs] == ["00", "01", "02"]
    assert pairs[0].image.shape == (1, 96, 96) and pairs[0].mask.dtype == np.int64
    assert set(np.unique(pairs[0].mask)) == {0, 1}
    assert len(load_pairs(tmp_path / "images", tmp_path / "masks", select=[2])) == 1


def test_sampler_pairs_each_window_with_the_labels_it_predicts(tmp_path: Path) -> None:
    pairs = load_pairs(*_folders(tmp_path))
    # an image that *is* its mask: the centre of every window must equal the label crop
    pairs = [type(p)(p.name, (p.mask * 255).astype(np.uint8)[None], p.mask) for p in pairs]
    model = tilerseg.create_model(**SMALL)
    config = TrainConfig(model=SMALL, elastic=False, flips=False, grey=False)
    sampler = PatchSampler(pairs, None, model, 60, config, np.random.default_rng(0))
    g = tilerseg.model_geometry(model)
    assert g.is_admissible(sampler.window) and sampler.out == sampler.window - 2 * g.halo[0]
    for _ in range(20):
        x, y, w = sampler.sample()
        h = sampler.halo
        centre = x[0, h : h + sampler.out, h : h + sampler.out]
        np.testing.assert_array_equal(centre, y.astype(np.float32))
        assert (w == 1).all()


def _fixed_batch_loss(model: torch.nn.Module, pairs: list, seed: int = 99) -> float:
    """The weighted loss of ``model`` on one fixed, unaugmented batch."""
    from tilerseg.train.loop import weighted_loss
    from tilerseg.train.weights import class_weights, weight_map

    cw = class_weights([p.mask for p in pairs], 2)
    weights = [weight_map(p.mask, cw) for p in pairs]
    config = TrainConfig(model=SMALL, elastic=False, flips=False, grey=False)
    sampler = PatchSampler(pairs, weights, model, 60, config, np.random.default_rng(seed))
    x, y, w = sampler.batch(8)
    with torch.no_grad():
        return float(weighted_loss(model.eval()(x), y, w))


def test_loss_falls_and_checkpoints_hold_the_tuned_threshold(tmp_path: Path) -> None:
    images, masks = _folders(tmp_path, count=4)
    pairs = load_pairs(images, masks)
    config = TrainConfig(model=SMALL, epochs=2, steps_per_epoch=25, batch_size=2, window=60,
                         seed=1, elastic=False, lr=1e-2)
    torch.manual_seed(config.seed)  # train() starts from this same initialisation
    before = _fixed_batch_loss(tilerseg.create_model(**SMALL), pairs[:3])
    steps: list[tuple[int, int]] = []
    result = train(pairs[:3], tmp_path / "run", config, val_pairs=pairs[3:],
                   progress=lambda e, s, n, loss: steps.append((e, s)))
    after = _fixed_batch_loss(tilerseg.load_model(tmp_path / "run" / "last.pt"), pairs[:3])
    assert len(steps) == 50 and after < 0.7 * before  # measured: 2.20 -> 0.96
    best = tilerseg.load_model(tmp_path / "run" / "best.pt")
    assert best.metadata["threshold"] == result["best"]["pixel_threshold"]
    assert 0 <= best.metadata["validation"]["pixel_error"] <= 1
    assert [r["epoch"] for r in result["history"]] == [1, 2]


def _straight_and_resumed(pairs, tmp_path: Path, config: TrainConfig) -> dict:
    """Train straight, and again interrupted in epoch 2 then resumed: both end alike.
    Returns the straight run's final weights."""
    train(pairs, tmp_path / "straight", config)

    def interrupt(epoch: int, step: int, steps: int, loss: float) -> None:
        if epoch == 2:
            raise KeyboardInterrupt  # killed during the second epoch

    with pytest.raises(KeyboardInterrupt):
        train(pairs, tmp_path / "resumed", config, progress=interrupt)
    train(pairs, tmp_path / "resumed", config, resume=True)
    a = tilerseg.load_model(tmp_path / "straight" / "last.pt").state_dict()
    b = tilerseg.load_model(tmp_path / "resumed" / "last.pt").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    return a


def test_resume_continues_exactly(tmp_path: Path) -> None:
    pairs = load_pairs(*_folders(tmp_path, count=2))
    config = TrainConfig(model=SMALL, epochs=2, steps_per_epoch=4, batch_size=1, window=60,
                         seed=3)
    _straight_and_resumed(pairs, tmp_path, config)
    state = json.loads((tmp_path / "resumed" / "state.json").read_text())
    assert state["epoch"] == 2 and len(state["history"]) == 2


def test_bad_training_input_fails_before_training(tmp_path: Path) -> None:
    images, masks = _folders(tmp_path, count=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageNotFoundError, match=r"holds no images \(TIFF, PNG"):
        load_pairs(empty, masks)
    with pytest.raises(ImageNotFoundError, match="does not exist"):
        load_pairs(tmp_path / "nope", masks)
    tifffile.imwrite(masks / "01.tif", np.zeros((80, 96), np.uint8))
    with pytest.raises(InvalidImageError, match=r"has shape \(96, 96\) but its mask"):
        load_pairs(images, masks)
    tifffile.imwrite(masks / "01.tif", np.full((96, 96), 7, np.uint8))
    with pytest.raises(InvalidImageError, match=r"values \[7\]; expected classes 0..1"):
        load_pairs(images, masks)
    tifffile.imwrite(masks / "01.tif", np.zeros((96, 96), np.uint8))
    tifffile.imwrite(images / "02.tif", np.zeros((96, 96), np.uint8))
    with pytest.raises(InvalidImageError, match="2 images .* but 3 masks|3 images .* but 2 masks"):
        tifffile.imwrite(masks / "02.tif", np.zeros((96, 96), np.uint8))
        (images / "02.tif").unlink()
        load_pairs(images, masks)
    pairs = load_pairs(*_folders(tmp_path / "small", count=1, shape=(40, 40))) if (
        (tmp_path / "small").mkdir() or True) else None
    with pytest.raises(InvalidImageError, match="smaller than one training tile"):
        train(pairs, tmp_path / "run", TrainConfig(model=SMALL, window=124, epochs=1))
    assert not (tmp_path / "run" / "last.pt").exists()


def _parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_bf16_training_learns_and_keeps_fp32_weights(tmp_path: Path) -> None:
    pairs = load_pairs(*_folders(tmp_path, count=3))
    config = TrainConfig(model=SMALL, epochs=1, steps_per_epoch=25, batch_size=2, window=60,
                         seed=1, elastic=False, lr=1e-2, precision="bf16")
    torch.manual_seed(config.seed)  # train() starts from this same initialisation
    initial = tilerseg.create_model(**SMALL)
    before, start = _fixed_batch_loss(initial, pairs), _parameters(initial)
    result = train(pairs, tmp_path / "run", config)
    assert np.isfinite(result["history"][0]["loss"]) and result["compiled"] is False
    model = tilerseg.load_model(tmp_path / "run" / "last.pt")
    weights = model.state_dict()
    assert all(v.dtype == torch.float32 for v in weights.values())
    assert all(not torch.equal(weights[k], start[k]) for k in start)  # every tensor trained
    assert _fixed_batch_loss(model, pairs) < 0.8 * before  # scored in fp32
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["config"]["precision"] == "bf16" and state["config"]["compile"] is False
    assert model.metadata["training"]["config"]["precision"] == "bf16"


def test_bf16_resume_continues_exactly(tmp_path: Path) -> None:
    pairs = load_pairs(*_folders(tmp_path, count=2))
    config = TrainConfig(model=SMALL, epochs=2, steps_per_epoch=3, batch_size=1, window=60,
                         seed=4, precision="bf16")
    a = _straight_and_resumed(pairs, tmp_path, config)
    # and bf16 really computed in bfloat16: the same run in fp32 ends elsewhere
    train(pairs, tmp_path / "fp32", TrainConfig(**{**vars(config), "precision": "fp32"}))
    c = tilerseg.load_model(tmp_path / "fp32" / "last.pt").state_dict()
    assert any(not torch.allclose(a[k], c[k], rtol=0, atol=1e-6) for k in a)


def test_fp16_is_refused_on_the_cpu(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images, masks = _folders(tmp_path, count=2)
    config = TrainConfig(model=SMALL, window=60, epochs=1, precision="fp16")
    with pytest.raises(InvalidArgumentError, match="precision=fp16 trains only on a CUDA GPU"):
        train(load_pairs(images, masks), tmp_path / "run", config)
    assert not (tmp_path / "run").exists()
    with pytest.raises(InvalidArgumentError, match="precision='fp64' must be one of"):
        TrainConfig(precision="fp64")

    from tilerseg.cli import main

    status = main(["train", "--images", str(images), "--masks", str(masks), "-o",
                   str(tmp_path / "cli"), "--precision", "fp16", "--window", "60", "-q"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.strip().splitlines() == [
        ("tilerseg: error: precision=fp16 trains only on a CUDA GPU (with a loss scaler); "
         "on the CPU use precision=bf16 or fp32")]


def test_compile_trains_through_torch_compile(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                              ) -> None:
    """A real compilation (no stubs): about 20 s on 2 cores."""
    import torch._dynamo

    pairs = load_pairs(*_folders(tmp_path, count=3))
    config = TrainConfig(model=SMALL, epochs=2, steps_per_epoch=3, batch_size=2, window=60,
                         seed=2, compile=True, precision="bf16")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with caplog.at_level(logging.INFO, logger="tilerseg"):
        result = train(pairs[:2], tmp_path / "run", config, val_pairs=pairs[2:])
    assert result["compiled"] is True
    assert any(r.message.startswith("compiled the model for training") for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # dynamo captured the model's graph once: no recompilation after validation (eval mode)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert all(np.isfinite(r["loss"]) for r in result["history"])
    model = tilerseg.load_model(tmp_path / "run" / "last.pt")  # the plain module's weights
    assert not any(k.startswith("_orig_mod.") for k in model.state_dict())
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["config"]["compile"] is True and state["epoch"] == 2


@pytest.mark.usefixtures("no_strict_runtime")
def test_compile_failure_falls_back_to_eager(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(model: torch.nn.Module, **kwargs: object) -> object:
        def run(*args: object) -> None:
            raise RuntimeError("no C++ compiler\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    pairs = load_pairs(*_folders(tmp_path, count=2))
    config = TrainConfig(model=SMALL, epochs=1, steps_per_epoch=2, batch_size=1, window=60,
                         compile=True)
    with caplog.at_level(logging.INFO, logger="tilerseg"):
        result = train(pairs, tmp_path / "run", config)
    assert result["compiled"] is False and len(result["history"]) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [("torch.compile failed for training (RuntimeError: no C++ compiler); "
                         "training eagerly")]


def test_bf16_without_bf16_units_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from tilerseg.engine import backends

    monkeypatch.setattr(backends, "cpu_features", lambda: {"bf16": False})
    pairs = load_pairs(*_folders(tmp_path, count=2))
    config = TrainConfig(model=SMALL, epochs=1, steps_per_epoch=1, batch_size=1, window=60,
                         precision="bf16")
    with caplog.at_level(logging.WARNING, logger="tilerseg"):
        train(pairs, tmp_path / "run", config)
    assert [r.getMessage() for r in caplog.records] == [
        ("precision=bf16 on a CPU without bfloat16 units (AVX-512 bf16, AMX): computed by "
         "emulation, likely slower than fp32")]


def test_init_starts_from_a_trained_models_weights(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    """--init: a warm start. The first step starts from the given model's weights (with a
    learning rate of 0 the trained model is that model), and a model of another layout is
    refused in one line before any training."""
    images, masks = _folders(tmp_path, count=2)
    torch.manual_seed(7)
    start = tilerseg.create_model(**SMALL)
    tilerseg.save_model(start, tmp_path / "start.pt")
    config = TrainConfig(model=SMALL, epochs=1, steps_per_epoch=2, batch_size=1, window=60,
                         seed=0, lr=1e-30, init=str(tmp_path / "start.pt"))
    train(load_pairs(images, masks), tmp_path / "run", config)
    trained = tilerseg.load_model(tmp_path / "run" / "last.pt").state_dict()
    assert all(torch.allclose(trained[k], v, rtol=0, atol=1e-20)
               for k, v in start.state_dict().items())
    torch.manual_seed(0)  # without --init: train()'s own initialisation, not start's
    train(load_pairs(images, masks), tmp_path / "fresh", TrainConfig(**{**vars(config),
                                                                        "init": None}))
    fresh = tilerseg.load_model(tmp_path / "fresh" / "last.pt").state_dict()
    assert not all(torch.allclose(fresh[k], v, rtol=0, atol=1e-20)
                   for k, v in start.state_dict().items())

    from tilerseg.cli import main

    status = main(["train", "--images", str(images), "--masks", str(masks), "-o",
                   str(tmp_path / "cli"), "--depth", "2", "--base-channels", "8", "--init",
                   str(tmp_path / "start.pt"), "--window", "60", "--epochs", "1", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert err[0].startswith(f"tilerseg: error: --init {tmp_path / 'start.pt'}: its model")
    assert not (tmp_path / "cli" / "last.pt").exists()
    same = tilerseg.create_model(**SMALL, padding="same")  # the same weight shapes
    tilerseg.save_model(same, tmp_path / "same.pt")
    with pytest.raises(tilerseg.InvalidModelError, match="is not the one trained here"):
        train(load_pairs(images, masks), tmp_path / "same",
              TrainConfig(**{**vars(config), "init": str(tmp_path / "same.pt")}))
    with pytest.raises(InvalidArgumentError, match="--init .* --resume continues one"):
        train(load_pairs(images, masks), tmp_path / "run", config, resume=True)

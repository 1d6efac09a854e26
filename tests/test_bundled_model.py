"""The bundled default model: loads without arguments, carries its contract, is used by default."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tilerseg
from tilerseg.cli import main
from tilerseg.io.writers import open_output
from tilerseg.models.checkpoint import DEFAULT_MODEL, bundled_models
from tilerseg.synthetic import membrane_image

ISBI = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012" / "train"


def test_default_model_loads_small_and_documented() -> None:
    path = bundled_models()[DEFAULT_MODEL]
    assert path.stat().st_size <= 10 * 2**20
    model = tilerseg.load_model()
    assert model.config["in_channels"] == 1 and model.config["num_classes"] == 2
    meta = model.metadata
    assert 0 < meta["threshold"] < 1 and meta["foreground_class"] == 1
    assert set(meta["validation"]) >= {"pixel_error", "rand_error"}
    assert tilerseg.model_geometry(model).halo == (92, 92)


def test_default_model_separates_synthetic_membranes() -> None:
    """A model trained on EM finds the dark membranes of the synthetic generator too."""
    image, mask = membrane_image((256, 256), cell_size=40, seed=5)
    cell = tilerseg.segment(image, tilerseg.load_model(), device="cpu")[1]
    inside, membrane = cell[mask == 255].mean(), cell[mask == 0].mean()
    assert inside > membrane + 0.3


def test_run_uses_the_default_model_and_its_threshold(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    image, _ = membrane_image((128, 96), cell_size=30, seed=2)
    np.save(tmp_path / "slide.npy", image)
    assert main(["run", str(tmp_path / "slide.npy"), "--output", "both", "--device", "cpu",
                 "-q"]) == 0
    assert "warning" not in capsys.readouterr().err
    out = open_output(tmp_path / "slide.tilerseg.zarr")
    threshold = tilerseg.load_model().metadata["threshold"]
    assert out["attributes"]["threshold"] == threshold
    probs = out["probabilities"][1].astype(np.float64) / 255
    labels = out["labels"][:]
    clear = np.abs(probs - threshold) > 1 / 255  # away from rounding at the threshold
    np.testing.assert_array_equal(labels[clear], (probs[clear] >= threshold)[...].astype(labels.dtype))


def test_models_command_lists_bundled_and_registered(capsys: pytest.CaptureFixture) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert f"* {DEFAULT_MODEL}" in out and "unet3d" in out and "halo 92" in out


@pytest.mark.slow
@pytest.mark.skipif(not ISBI.is_dir(), reason="ISBI 2012 data not beside the project")
def test_isbi_validation_figures_reproduce() -> None:
    """Slices 20-24, tiled at full resolution: the figures recorded with the model."""
    from tilerseg.evaluate import evaluate

    images = [str(ISBI / "image" / f"{k:02d}.png") for k in range(20, 25)]
    masks = [str(ISBI / "label" / f"{k:02d}.png") for k in range(20, 25)]
    model = tilerseg.load_model()
    result = evaluate(images, masks, model, device="cpu")["overall"]["isbi"]
    recorded = model.metadata["validation"]
    assert result["pixel_error"] == pytest.approx(recorded["pixel_error"], abs=2e-3)
    assert result["rand_error"] == pytest.approx(recorded["rand_error"], abs=5e-3)

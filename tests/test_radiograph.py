"""16-bit radiographs and display windows: a tiled uint16 TIFF segmented with ``--window C,W``
equals the model on the independently windowed image; window arguments are checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import tilerseg
from tests.reference import one_shot_reference
from tilerseg.cli import main
from tilerseg.errors import InvalidArgumentError
from tilerseg.io.writers import open_output
from tilerseg.normalize import WINDOW_PRESETS, Normalization, parse_window, resolve_normalization


def _radiograph(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A smooth 16-bit 'exposure' with bones (bright discs) and noise, using all 16 bits."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    image = 20000 + 15000 * np.sin(y / 97.0) * np.cos(x / 61.0)
    for cy, cx, r in rng.uniform((0, 0, 20), (shape[0], shape[1], 90), (12, 3)):
        image[(y - cy) ** 2 + (x - cx) ** 2 < r * r] += 25000
    image += rng.normal(0, 800, shape)
    return np.clip(image, 0, 65535).astype(np.uint16)


@pytest.mark.parametrize("shape", [
    (576, 448), pytest.param((4096, 3072), marks=pytest.mark.slow)])
def test_16_bit_radiograph_with_a_window_equals_the_windowed_reference(
        shape: tuple[int, int], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    image = _radiograph(shape, seed=0)
    assert image.min() == 0 or image.max() > 50000  # values beyond the window on both sides
    path = tmp_path / "chest.tif"
    tifffile.imwrite(path, image, tile=(256, 256), photometric="minisblack", compression="zlib")
    torch.manual_seed(0)
    model = tilerseg.create_model("unet", depth=2, base_channels=2)
    tilerseg.save_model(model, tmp_path / "model.pt")
    model = tilerseg.load_model(tmp_path / "model.pt")
    out = tmp_path / "chest.zarr"
    status = main(["run", str(path), "-o", str(out), "--model", str(tmp_path / "model.pt"),
                   "--window", "30000,24000", "--tile", "128", "--dtype", "float32",
                   "--device", "cpu", "--backend", "torch", "-q"])
    assert status == 0, capsys.readouterr().err
    windowed = np.clip((tifffile.imread(path).astype(np.float64) - 18000) / 24000, 0, 1)
    assert 0.05 < (windowed == 0).mean() + (windowed == 1).mean() < 0.95  # clipping matters
    expected = one_shot_reference(windowed.astype(np.float32)[None], model)
    got = open_output(out)["probabilities"][:]
    assert np.abs(got - expected).max() <= 1e-4
    assert open_output(out)["attributes"]["normalization"] == {
        "method": "window", "low": 18000.0, "high": 42000.0}


def test_window_clips_per_pixel_and_presets_are_hounsfield_windows() -> None:
    x = np.array([-2000, -1350, -600, 149, 150, 3000], np.int32)
    norm = resolve_normalization(("window", "lung"), x.dtype, lambda: None)
    assert norm == Normalization("window", -1350.0, 150.0)
    np.testing.assert_allclose(norm(x), [0, 0, 0.5, 1499 / 1500, 1, 1], rtol=0, atol=1e-6)
    # a tile's values do not depend on the other tiles: the same map, pixel by pixel
    np.testing.assert_array_equal(norm(x[:3]), norm(x)[:3])
    assert WINDOW_PRESETS["brain"] == (40.0, 80.0) and WINDOW_PRESETS["bone"] == (400.0, 1800.0)
    for name, (center, width) in WINDOW_PRESETS.items():
        got = resolve_normalization(parse_window(name), np.dtype(np.int16), lambda: None)
        assert (got.low, got.high) == (center - width / 2, center + width / 2)


@pytest.mark.parametrize("text", ["foo", "40", "40,0", "40,-5", "a,b", "1,2,3"])
def test_a_bad_window_is_one_line(text: str, tmp_path: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "x.tif"
    tifffile.imwrite(path, np.zeros((32, 32), np.uint16))
    status = main(["run", str(path), "--model", "unet", "--window", text, "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("tilerseg: error: ") and "window" in err
    assert not (tmp_path / "x.tilerseg.zarr").exists()
    with pytest.raises(InvalidArgumentError):
        parse_window(text)


def test_a_negative_window_centre_as_a_separate_argument(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "ct.tif"
    tifffile.imwrite(path, np.arange(-1024, 1024, dtype=np.int16).reshape(32, 64))
    torch.manual_seed(0)
    tilerseg.save_model(tilerseg.create_model("unet", depth=2, base_channels=2),
                        tmp_path / "model.pt")
    for how in (["--window", "-600,1500"], ["--window=-600,1500"]):
        out = tmp_path / f"out{len(how)}.zarr"
        status = main(["run", str(path), "-o", str(out), "--model", str(tmp_path / "model.pt"),
                       "--tile", "32",
                       *how, "--device", "cpu", "--backend", "torch", "-q"])
        assert status == 0, capsys.readouterr().err
        assert open_output(out)["attributes"]["normalization"] == {
            "method": "window", "low": -1350.0, "high": 150.0}
    # an option after --window is still an option, not its value
    with pytest.raises(SystemExit) as stop:
        main(["run", str(path), "--model", "unet", "--window", "--device", "cpu"])
    assert stop.value.code == 2
    assert "--window: expected one argument" in capsys.readouterr().err

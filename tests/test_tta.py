"""Exact test-time augmentation: tiled TTA equals TTA of one-shot inference on the whole
transformed padded image (tests/reference.py, written without the engine), in every path."""

from __future__ import annotations

import contextlib
import io
import logging

import numpy as np
import pytest
import tifffile
import torch
import zarr

import tilerseg
from tilerseg.cli import main
from tilerseg.engine.tta import views
from tilerseg.errors import InvalidArgumentError
from tilerseg.geometry import ModelGeometry
from tilerseg.synthetic import write_membrane_tiff

from .reference import one_shot_tta_reference

BACKENDS = ["torch", pytest.param("openvino", marks=pytest.mark.openvino)]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return tilerseg.create_model("unet", depth=2, base_channels=4)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """Odd sides, neither a multiple of the tile nor square."""
    return np.random.default_rng(1).random((1, 77, 101), dtype=np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["dihedral", "flips"])
def test_tiled_tta_equals_tta_of_the_padded_image(model, image, mode, backend):
    """Three tile shapes (one not square: its quarter-turned windows are another input
    shape, set up on its own) give the reference to float round-off, and TTA changes
    the output (it really ran)."""
    reference = one_shot_tta_reference(image, model, mode)
    for tile in (16, 48, (16, 32)):
        got = tilerseg.segment(image, model, tile=tile, device="cpu", normalize=False,
                               tta=mode, backend=backend)
        assert np.abs(got - reference).max() <= 1e-5, (tile, np.abs(got - reference).max())
    plain = tilerseg.segment(image, model, tile=16, device="cpu", normalize=False,
                             backend=backend)
    assert np.abs(plain - reference).max() > 1e-2


def test_3d_tta_flips_every_axis():
    """In 3D both modes are the 8 flips of Z, Y and X, on an anisotropically pooled model."""
    torch.manual_seed(2)
    model3 = tilerseg.create_model("unet3d", depth=2, base_channels=2)
    volume = np.random.default_rng(2).random((1, 9, 21, 19), dtype=np.float32)
    reference = one_shot_tta_reference(volume, model3, "flips")
    for mode in ("dihedral", "flips"):
        for tile in ((4, 8, 8), (8, 16, 8)):
            got = tilerseg.segment(volume, model3, tile=tile, device="cpu", normalize=False,
                                   tta=mode, backend="torch")
            assert np.abs(got - reference).max() <= 1e-5
    assert len(views("dihedral", tilerseg.model_geometry(model3))) == 8


def test_turns_only_where_y_and_x_share_the_geometry(caplog):
    square = ModelGeometry(2, 1, 2, step=(16, 16), min_input=(188, 188), shrink=(184, 184),
                           halo=(92, 92))
    assert [(v.turns, v.flips) for v in views("dihedral", square)] == [
        (k, f) for k in range(4) for f in ((), (1,))]
    assert [v.flips for v in views("flips", square)] == [(), (0,), (1,), (0, 1)]
    assert [(v.turns, v.flips) for v in views(None, square)] == [(0, ())]
    other = ModelGeometry(2, 1, 2, step=(4, 16), min_input=(44, 188), shrink=(40, 184),
                          halo=(20, 92))
    with caplog.at_level(logging.INFO, logger="tilerseg.engine.tta"):
        assert [v.turns for v in views("dihedral", other)] == [0, 0, 0, 0]
    assert "only flipped (4 views)" in caplog.text


def test_the_option_is_checked():
    with pytest.raises(InvalidArgumentError, match="tta='rot' must be True, False or one of"):
        tilerseg.RunOptions(tta="rot")
    assert tilerseg.RunOptions(tta=True).tta == "dihedral"
    assert tilerseg.RunOptions(tta=False).tta is None


def test_zarr_output_lazy_input_and_resume_keep_tta(model, tmp_path):
    """segment_to_zarr and a lazy (file) input give the numpy result; the run records the
    mode, and resuming it with another mode is refused in one line."""
    slide = write_membrane_tiff(str(tmp_path / "slide.tif"), (150, 130), tile=64, seed=4)
    pixels = tifffile.imread(slide)
    expected = tilerseg.segment(pixels, model, tile=32, device="cpu", tta="flips")
    lazy = tilerseg.segment(slide, model, tile=32, device="cpu", tta="flips").compute()
    assert np.abs(lazy - expected).max() <= 1e-6
    out = tilerseg.segment_to_zarr(slide, model, tmp_path / "o.zarr", tile=32,
                                   dtype="float32", tta="flips")
    root = zarr.open_group(out, mode="r")
    assert np.abs(root["0"][...] - expected).max() <= 1e-6
    assert root.attrs["tilerseg"]["manifest"]["options"]["tta"] == "flips"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(["run", slide, "--model", _saved(model, tmp_path), "--tile", "32",
                       "--dtype", "float32", "-o", str(out), "--resume", "--tta", "-q"])
    assert status == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and "tta" in lines[0], lines


def _saved(model: torch.nn.Module, tmp_path) -> str:
    path = tmp_path / "m.pt"
    if not path.exists():
        tilerseg.save_model(model, path)
    return str(path)


def test_cli_tta(model, tmp_path):
    """`tilerseg run --tta flips` writes what the API computes; a bad mode is one line,
    exit 2."""
    slide = write_membrane_tiff(str(tmp_path / "slide.tif"), (120, 100), tile=64, seed=5)
    pixels = tifffile.imread(slide)
    model_file = _saved(model, tmp_path)
    assert main(["run", slide, "--model", model_file, "--tile", "32", "--dtype", "float32",
                 "--tta", "flips", "-o", str(tmp_path / "cli.zarr"), "-q"]) == 0
    expected = tilerseg.segment(pixels, tilerseg.load_model(model_file), tile=32,
                                device="cpu", tta="flips")
    got = zarr.open_group(tmp_path / "cli.zarr", mode="r")["0"][...]
    assert np.abs(got - expected).max() <= 1e-6
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        assert main(["status", str(tmp_path / "cli.zarr")]) == 0
    assert ", tta flips" in shown.getvalue()  # why a resume without --tta flips is refused
    from tilerseg.evaluate import evaluate

    with pytest.raises(InvalidArgumentError, match="applies when a model segments"):
        evaluate(None, [slide], None, [str(tmp_path / "cli.zarr")], tta=True)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        main(["run", slide, "--model", model_file, "--tta", "turns", "-q"])
    assert exit_.value.code == 2
    assert "--tta: invalid choice: 'turns'" in err.getvalue()

"""RGB whole-slide images and 3-channel models: a tiled pyramidal RGB TIFF (YXS, as an SVS
stores it) segmented by a 3-channel U-Net equals the one-shot reference; a channel count
that does not fit the model is one clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import tilerseg
from tests.reference import one_shot_reference
from tilerseg.cli import main
from tilerseg.errors import InvalidImageError
from tilerseg.io.writers import open_output
from tilerseg.synthetic import membrane_image


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 3-level RGB pyramid (tiles 128, zlib) and its levels as tifffile reads them."""
    d = tmp_path_factory.mktemp("rgb")
    grey = membrane_image((400, 336), cell_size=24, seed=7)[0].astype(np.int32)
    rng = np.random.default_rng(7)
    rgb = np.stack([grey, 255 - grey, (grey // 2 + rng.integers(0, 60, grey.shape))], -1)
    rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    path = d / "slide.tif"
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        opts = dict(tile=(128, 128), photometric="rgb", compression="zlib")
        tif.write(rgb, subifds=2, **opts)
        for k in (1, 2):
            tif.write(rgb[:: 2**k, :: 2**k], subfiletype=1, **opts)
    with tifffile.TiffFile(path) as tif:
        levels = [level.asarray() for level in tif.series[0].levels]
    torch.manual_seed(0)
    rgb_model = tilerseg.create_model("unet", in_channels=3, depth=2, base_channels=2)
    grey_model = tilerseg.create_model("unet", depth=2, base_channels=2)
    tilerseg.save_model(rgb_model, d / "rgb.pt")
    tilerseg.save_model(grey_model, d / "grey.pt")
    return {"dir": d, "path": path, "levels": levels, "rgb_model": d / "rgb.pt",
            "grey_model": d / "grey.pt"}


@pytest.mark.parametrize("level", [0, 1])
def test_a_3_channel_model_on_an_rgb_pyramid_is_exact(slide: dict, tmp_path: Path,
                                                      level: int) -> None:
    image = tilerseg.open_image(slide["path"], level=level)
    assert image.axes == "YXS" and len(image.levels) == 3
    model = tilerseg.load_model(slide["rgb_model"])
    out = tilerseg.segment_to_zarr(slide["path"], model, tmp_path / "o.zarr", level=level,
                                   tile=64, dtype="float32", device="cpu", backend="torch")
    rgb = slide["levels"][level]
    expected = one_shot_reference((rgb.transpose(2, 0, 1) / np.float32(255)), model)
    got = open_output(out)["probabilities"][:]
    assert got.shape == expected.shape == (2, *rgb.shape[:2])
    assert np.abs(got - expected).max() <= 1e-4


def test_channel_picks_one_colour_for_a_1_channel_model(slide: dict, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "green.zarr"
    status = main(["run", str(slide["path"]), "-o", str(out), "--model", str(slide["grey_model"]),
                   "--channel", "1", "--tile", "64", "--dtype", "float32", "--device", "cpu",
                   "--backend", "torch", "-q"])
    assert status == 0, capsys.readouterr().err
    model = tilerseg.load_model(slide["grey_model"])
    green = slide["levels"][0][..., 1][None] / np.float32(255)
    assert np.abs(open_output(out)["probabilities"][:] - one_shot_reference(green, model)).max() \
        <= 1e-4


def test_channel_count_mismatch_is_one_line(slide: dict, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    status = main(["run", str(slide["path"]), "-o", str(tmp_path / "x.zarr"), "--model",
                   str(slide["grey_model"]), "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "image has 3 channel(s) (axes 'YXS'" in err and "the model takes 1" in err
    assert "--channel" in err
    grey = tmp_path / "grey.tif"
    tifffile.imwrite(grey, slide["levels"][0][..., 0])
    status = main(["run", str(grey), "--model", str(slide["rgb_model"]), "--device", "cpu",
                   "-q"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "image has 1 channel(s)" in err and "the model takes 3" in err
    status = main(["run", str(slide["path"]), "-o", str(tmp_path / "y.zarr"), "--model",
                   str(slide["rgb_model"]), "--channel", "0", "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "1 channel(s) selected with --channel / channel= of the image's 3" in err, err
    assert "image has 1" not in err and "the model takes 3" in err
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "grey.tilerseg.zarr").exists()
    assert not (tmp_path / "y.zarr").exists()
    with pytest.raises(InvalidImageError, match="the model takes 3"):
        tilerseg.segment(slide["levels"][0][..., 0], tilerseg.load_model(slide["rgb_model"]),
                         device="cpu")

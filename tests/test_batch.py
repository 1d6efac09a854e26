"""Many images with one model: tilerseg batch / segment_batch."""

from __future__ import annotations

import os

import imagecodecs
import numpy as np
import pytest
import tifffile
import torch
import zarr

import tilerseg
from tilerseg.cli import main
from tilerseg.errors import ImageNotFoundError, InvalidArgumentError
from tilerseg.synthetic import membrane_image

from .test_resume import assert_same_arrays


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("batch")
    images = d / "images"
    images.mkdir()
    tifffile.imwrite(images / "a.tif", membrane_image((200, 170), seed=1)[0])
    (images / "b.png").write_bytes(imagecodecs.png_encode(membrane_image((96, 130), seed=2)[0]))
    np.save(images / "c.npy", membrane_image((150, 150), seed=3)[0])
    (images / "d-corrupt.tif").write_bytes(b"II*\x00" + bytes(range(200)))
    (images / "notes.txt").write_text("not an image")
    torch.manual_seed(0)
    tilerseg.save_model(tilerseg.create_model("unet", depth=2, base_channels=4), d / "m.pt")
    return {"dir": d, "images": images, "model": d / "m.pt"}


def test_a_corrupt_file_fails_alone_and_a_rerun_skips_what_is_complete(folder, tmp_path,
                                                                         capsys):
    out = tmp_path / "out"
    args = ["batch", str(folder["images"]), "-o", str(out), "--model", str(folder["model"]),
            "--tile", "64", "--output", "both", "-q"]
    assert main(args) == 1
    table = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1] for line in table.splitlines()[1:-1]}
    assert rows == {"a.tif": "done", "b.png": "done", "c.npy": "done", "d-corrupt.tif": "failed"}
    assert "4 images" in table and "3 written" in table and "1 failed" in table
    assert "d-corrupt.tif" in table and "not a readable image" in table
    model = tilerseg.load_model(folder["model"])
    for name in ("a.tif", "b.png", "c.npy"):
        single = tilerseg.segment_to_zarr(folder["images"] / name, model,
                                          tmp_path / f"single-{name}.zarr", tile=64,
                                          output="both")
        written = out / tilerseg.engine.default_output_path(name).name
        assert_same_arrays(written, single)
    stamps = {p.name: zarr.open_group(p, mode="r").attrs["tilerseg"]["manifest"]["run_id"]
              for p in out.glob("*.zarr")}
    assert len(stamps) == 3 and not list(out.glob("*.partial"))
    assert main(args) == 1  # the corrupt file still fails; the rest is skipped
    table = capsys.readouterr().out
    assert "3 already complete" in table and "0 written" in table
    assert stamps == {p.name: zarr.open_group(p, mode="r").attrs["tilerseg"]["manifest"][
        "run_id"] for p in out.glob("*.zarr")}


def test_a_list_file_and_shards_cover_every_image_once(folder, tmp_path):
    listing = folder["dir"] / "list.txt"
    listing.write_text("# the good ones\nimages/a.tif\n\nimages/b.png\nimages/c.npy\n")
    model = tilerseg.load_model(folder["model"])
    done = []
    for i in range(2):
        results = tilerseg.segment_batch([listing], model, tmp_path / "out", tile=64,
                                         shard=(i, 2))
        assert all(r.status == "done" for r in results)
        done += [r.image for r in results]
    assert sorted(done) == sorted(str(folder["images"] / n) for n in ("a.tif", "b.png",
                                                                        "c.npy"))


def test_a_failing_image_mid_stream_does_not_stop_the_others(folder, tmp_path):
    """Non-finite input found while its tiles are read: that image fails, the rest finish."""
    bad = folder["dir"] / "nan.npy"
    image = np.random.default_rng(0).random((300, 300), dtype=np.float32)
    image[250, 250] = np.nan
    np.save(bad, image)
    model = tilerseg.load_model(folder["model"])
    claims = tmp_path / "nan.tilerseg.zarr.partial" / "claims"
    held_later = []

    def progress(finished, images):  # when the image after the bad one is done (the
        if finished == 2:              # failed one is told after the run)...
            held_later.extend(os.listdir(claims))

    results = tilerseg.segment_batch([folder["images"] / "a.tif", bad,
                                      folder["images"] / "c.npy"], model, tmp_path, tile=64,
                                     progress=progress)
    assert [r.status for r in results] == ["done", "failed", "done"]
    assert held_later == []  # ... the failed image's claims were given up already
    assert "NaN or Inf" in results[1].error
    # the tasks before the bad tile are kept for a resume (the pipeline holds at most a
    # few tiles in flight, so the first rows were recorded before row 3 was read)
    assert tilerseg.status(tmp_path / "nan.tilerseg.zarr")["done"] > 0
    # a bad first tile: nothing was recorded, so nothing is left behind
    image[250, 250], image[3, 3] = 0.5, np.nan
    np.save(bad, image)
    results = tilerseg.segment_batch(bad, model, tmp_path / "again", tile=64)
    assert [r.status for r in results] == ["failed"]
    assert not list((tmp_path / "again").iterdir())


def test_batch_errors(folder, tmp_path):
    model = tilerseg.load_model(folder["model"])
    twin = tmp_path / "twin"
    twin.mkdir()
    tifffile.imwrite(twin / "x.tif", np.zeros((50, 50), np.uint8))
    np.save(twin / "x.npy", np.zeros((50, 50), np.uint8))
    with pytest.raises(InvalidArgumentError, match="would both be written"):
        tilerseg.segment_batch([twin], model, tmp_path / "out")
    with pytest.raises(ImageNotFoundError, match="does not exist"):
        tilerseg.segment_batch([tmp_path / "nothing"], model, tmp_path / "out")

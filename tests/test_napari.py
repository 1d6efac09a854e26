"""The OME-Zarr output opens in napari: read with napari-ome-zarr's own reader.

``napari_get_reader`` is the hook napari calls when a user opens the store (File > Open, or
``napari out.zarr``); it returns the layer data napari then adds, without a viewer. The
references are the arrays read back with zarr and the TIFF's own resolution tags.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import zarr

from tilerseg import create_model, save_model
from tilerseg.cli import main
from tilerseg.synthetic import write_membrane_tiff

pytest.importorskip("napari_ome_zarr")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch

    folder = tmp_path_factory.mktemp("napari")
    slide = write_membrane_tiff(str(folder / "slide.tif"), (300, 260), tile=64,
                                pixel_size=0.5, seed=3)
    torch.manual_seed(0)
    save_model(create_model("unet", base_channels=2, depth=2), folder / "m.pt",
               metadata={"classes": ["membrane", "cell"]})
    outs = {}
    for output in ("both", "instances"):
        outs[output] = folder / f"{output}.zarr"
        assert main(["run", slide, "--model", str(folder / "m.pt"), "--tile", "96",
                     "--output", output, "-o", str(outs[output]), "-q"]) == 0
    return outs


def _layers(path: Path) -> list[tuple]:
    from napari_ome_zarr._reader import napari_get_reader

    reader = napari_get_reader(str(path))
    assert reader is not None
    with contextlib.redirect_stdout(io.StringIO()):  # the plugin prints the root attributes
        return reader()


def test_probabilities_open_as_an_image_layer_per_class(runs: dict[str, Path]) -> None:
    layers = _layers(runs["both"])
    assert [kind for _, _, kind in layers] == ["image", "labels"]
    data, meta, _ = layers[0]
    root = zarr.open_group(str(runs["both"]), mode="r")
    assert len(data) == 3  # every pyramid level, for napari's multiscale rendering
    for k, level in enumerate(data):
        np.testing.assert_array_equal(np.asarray(level), root[str(k)][:])
    assert meta["channel_axis"] == 0  # napari splits the classes into layers...
    assert meta["name"] == ["probabilities: membrane", "probabilities: cell"]  # the model's
    assert meta["contrast_limits"] == [[0, 255], [0, 255]]  # the stored uint8 range
    assert meta["axis_labels"] == ("y", "x")
    assert list(meta["scale"]) == [0.5, 0.5]  # micrometres, from the TIFF's tags
    assert meta["units"] == ("micrometer", "micrometer")


def test_labels_open_as_labels_layers(runs: dict[str, Path]) -> None:
    data, meta, kind = _layers(runs["both"])[1]
    assert kind == "labels" and meta["name"].endswith("segmentation")
    stored = zarr.open_group(str(runs["both"]), mode="r")["labels/segmentation"]
    for k, level in enumerate(data):
        np.testing.assert_array_equal(np.asarray(level), stored[str(k)][:])
    assert list(meta["scale"]) == [0.5, 0.5]
    assert meta["colormap"][0] == [0, 0, 0, 0]  # background transparent

    layers = _layers(runs["instances"])
    assert [kind for _, _, kind in layers] == ["image", "labels"]
    data, meta, _ = layers[1]
    assert meta["name"].endswith("instances")
    stored = zarr.open_group(str(runs["instances"]), mode="r")["labels/instances/0"][:]
    np.testing.assert_array_equal(np.asarray(data[0]), stored)
    assert stored.max() > 1  # several objects, each its own label value

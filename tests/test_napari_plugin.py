"""The napari plugin (tilerseg/napari): the dock widget, the view preview, the reader and
the sample data, in a real viewer (napari's ``make_napari_viewer``) under Qt's offscreen
platform.

napari's canvas needs OpenGL, which Qt's offscreen platform takes from an X display:
pytest-xvfb starts a virtual one (Debian's ``xvfb``) when none is set. The references
are :func:`tilerseg.segment_to_zarr` and ``tilerseg run`` on the same data, read back from
their stores.
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before Qt is first imported

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

import tilerseg
from tilerseg.cli import main
from tilerseg.errors import OutputError
from tilerseg.synthetic import membrane_image, write_membrane_tiff

SHAPE, TILE = (300, 260), 64
PLACE = {"scale": (0.5, 0.5), "translate": (10.0, 20.0)}
WAIT = 120_000  # ms: the runs take a second or two; a loaded machine may be slower


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A membrane image (in memory and as a TIFF), a tiny saved model, and the reference
    run of the model on the image."""
    import torch

    folder = tmp_path_factory.mktemp("napari-plugin")
    torch.manual_seed(0)
    model = tilerseg.create_model("unet", depth=2, base_channels=2)
    tilerseg.save_model(model, folder / "m.pt", metadata={"classes": ["membrane", "cell"]})
    image, _ = membrane_image(SHAPE, cell_size=30, seed=3)
    reference = tilerseg.segment_to_zarr(image, tilerseg.load_model(folder / "m.pt"),
                                         folder / "reference.zarr", tile=TILE, output="both")
    tif = write_membrane_tiff(str(folder / "slide.tif"), SHAPE, tile=64, pixel_size=0.5,
                              seed=5)
    return {"folder": folder, "model": str(folder / "m.pt"), "image": image,
            "reference": Path(reference), "tif": tif}


@pytest.fixture
def viewer(make_napari_viewer):
    """A viewer with tilerseg's manifest registered (installed through its entry point,
    or registered here from the source tree)."""
    from tilerseg.napari import register

    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        pytest.fail("napari's canvas needs OpenGL, which Qt's offscreen platform takes from "
                    "an X display: install Debian's xvfb (pytest-xvfb then starts one)")
    register()
    return make_napari_viewer()


def dock(viewer):
    """The Segment widget, docked as napari's Plugins menu docks it."""
    _, widget = viewer.window.add_plugin_dock_widget("tilerseg", "Segment")
    return widget


def store(path: Path) -> dict[str, np.ndarray]:
    """Every array of a store, level by level."""
    root = zarr.open_group(str(path), mode="r")
    out = {}
    for group in ("", "labels/segmentation/"):
        level = 0
        while f"{group}{level}" in root:
            out[f"{group}{level}"] = root[f"{group}{level}"][:]
            level += 1
    return out


def result_arrays(viewer, prefix: str) -> dict[str, np.ndarray]:
    """The result layers' levels, named as :func:`store` names the store's arrays."""
    out: dict[str, np.ndarray] = {}
    for k, name in enumerate(("membrane", "cell")):
        layer = viewer.layers[f"{prefix}probabilities: {name}"]
        for level, data in enumerate(layer.data):
            out.setdefault(str(level), [None, None])[k] = np.asarray(data)
    out = {key: np.stack(v) for key, v in out.items()}
    labels = viewer.layers[f"{prefix}segmentation"]
    for level, data in enumerate(labels.data):
        out[f"labels/segmentation/{level}"] = np.asarray(data)
    return out


def run_widget(qtbot, widget, out: Path, **fields) -> None:
    """Fill the form, click Run and wait for the run's end."""
    widget.tile_box.setValue(TILE)
    widget.output_box.setCurrentText("both")
    widget.out_edit.setText(str(out))
    for name, value in fields.items():
        getattr(widget, name).setText(value)
    widget.run_button.click()
    qtbot.waitUntil(lambda: widget._run_worker is None, timeout=WAIT)


@pytest.mark.parametrize("input_kind", ["array", "file"])
def test_the_widget_writes_what_tilerseg_run_writes_in_a_background_thread(
        viewer, qtbot, data, tmp_path, input_kind) -> None:
    """A numpy layer against segment_to_zarr on the same array; a layer napari read from
    a TIFF against ``tilerseg run`` on the file (which the widget then segments itself).
    The result layers are read from the store, with every pyramid level, and registered
    with the input layer's scale and translation."""
    if input_kind == "array":
        layer = viewer.add_image(data["image"], name="cells", **PLACE)
        reference = data["reference"]
    else:
        layer = viewer.open(data["tif"], plugin="napari")[0]
        layer.translate = PLACE["translate"]
        layer.scale = PLACE["scale"]
        reference = tmp_path / "cli.zarr"
        assert main(["run", data["tif"], "--model", data["model"], "--tile", str(TILE),
                     "--output", "both", "-o", str(reference), "-q"]) == 0
    widget = dock(viewer)
    widget.layer_box.setCurrentText(layer.name)
    ticks: list[int] = []
    widget.progressed.connect(lambda done, total: ticks.append(done))
    out = tmp_path / "widget.zarr"
    run_widget(qtbot, widget, out, model_edit=data["model"])

    assert widget.last_error is None, widget.last_error
    outcome = widget.last_outcome
    assert outcome is not None and not outcome.cancelled and outcome.out == out
    assert outcome.thread != threading.get_ident()  # not the Qt (test) thread
    assert ticks and max(ticks) == 25  # 5 x 5 tiles, reported to the GUI as they were written
    expected = store(reference)
    got = result_arrays(viewer, f"{layer.name}: ")
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    np.testing.assert_array_equal(store(out)["0"], expected["0"])
    for name in ("probabilities: membrane", "probabilities: cell", "segmentation"):
        result = viewer.layers[f"{layer.name}: {name}"]
        assert result.multiscale and tuple(result.scale) == PLACE["scale"]
        assert tuple(result.translate) == PLACE["translate"]
    assert viewer.layers[f"{layer.name}: segmentation"].colormap.map(np.array([0]))[0][3] == 0
    recorded = tilerseg.status(out)["manifest"]
    if input_kind == "file":  # segmented from the layer's own file
        assert recorded["input"]["path"] == os.path.abspath(data["tif"])


def test_cancel_keeps_a_partial_run_that_resume_completes(viewer, qtbot, data, tmp_path,
                                                          monkeypatch) -> None:
    """Cancel stops the run after the tiles in flight, leaving ``OUT.zarr.partial`` with
    some tasks recorded; Run again (Resume) computes the rest, and the output equals the
    uninterrupted run's."""
    from tilerseg.engine import tasks

    real = tasks.RunContext.write

    def slow(self, tile, probs):
        time.sleep(0.05)
        return real(self, tile, probs)

    monkeypatch.setattr(tasks.RunContext, "write", slow)
    viewer.add_image(data["image"], name="cells", **PLACE)
    widget = dock(viewer)
    out = tmp_path / "cancelled.zarr"
    widget.tile_box.setValue(TILE)
    widget.output_box.setCurrentText("both")
    widget.out_edit.setText(str(out))
    widget.model_edit.setText(data["model"])
    widget.run_button.click()

    def some_tasks_done() -> bool:
        try:
            return tilerseg.status(out)["done"] >= 1
        except OutputError:  # the work directory is not made yet
            return False

    qtbot.waitUntil(some_tasks_done, timeout=WAIT)
    assert widget.progress_bar.value() > 0
    widget.cancel_button.click()
    qtbot.waitUntil(lambda: widget._run_worker is None, timeout=WAIT)
    assert widget.last_error is None, widget.last_error
    state = tilerseg.status(out)
    assert not state["complete"] and 0 < state["done"] < state["tasks"]
    assert not out.exists() and "cancelled" in widget.status.text()
    assert "cells: probabilities: membrane" not in viewer.layers

    monkeypatch.setattr(tasks.RunContext, "write", real)
    ticks: list[int] = []
    widget.progressed.connect(lambda done, total: ticks.append(total))
    widget.run_button.click()  # Resume is on by default
    qtbot.waitUntil(lambda: widget._run_worker is None, timeout=WAIT)
    assert widget.last_error is None and not widget.last_outcome.cancelled
    assert ticks and ticks[-1] < 25  # only the tiles that were missing
    expected, got = store(data["reference"]), store(out)
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert "cells: probabilities: membrane" in viewer.layers


def test_the_view_preview_equals_the_full_runs_crop(viewer, qtbot, data) -> None:
    """Segment the view computes only the tiles under the view and shows them at once,
    placed where they lie; every pixel equals the full run's there."""
    layer = viewer.add_image(data["image"], name="cells", **PLACE)
    widget = dock(viewer)
    widget.tile_box.setValue(TILE)
    widget.output_box.setCurrentText("both")
    widget.model_edit.setText(data["model"])
    # the view: centred on pixel (150, 100), 2.5 screen pixels per pixel (zoom 5 per
    # world unit of 0.5 px): a canvas of some hundreds of pixels shows part of the image
    from tilerseg.napari._view import camera, visible_region

    camera(viewer).center = tuple(np.asarray(PLACE["translate"]) + np.asarray((150, 100)) * 0.5)
    camera(viewer).zoom = 10

    region = visible_region(viewer, layer)
    height, width = viewer.canvas.viewbox_size(viewer.layers)
    assert region is not None
    for s, n, centre in zip(region, (height, width), (150, 100)):
        expect = (max(0, centre - n / 10), centre + n / 10)  # n canvas px / 5 per image px
        assert abs(s.start - expect[0]) <= 1 and abs(min(s.stop, 300) - min(expect[1], 300)) <= 1

    widget.view_button.click()
    qtbot.waitUntil(lambda: "cells: preview: segmentation" in viewer.layers, timeout=WAIT)
    assert widget.last_error is None, widget.last_error
    expected = store(data["reference"])
    shown = viewer.layers["cells: preview: probabilities: membrane"]
    start = np.round((np.asarray(shown.translate) - PLACE["translate"]) / 0.5).astype(int)
    assert tuple(shown.scale) == PLACE["scale"]
    probs = np.stack([np.asarray(viewer.layers[f"cells: preview: probabilities: {c}"].data)
                      for c in ("membrane", "cell")])
    labels = np.asarray(viewer.layers["cells: preview: segmentation"].data)
    crop = tuple(slice(int(a), int(a) + n) for a, n in zip(start, labels.shape))
    assert all(c.start % TILE == 0 for c in crop)  # whole output tiles
    for c, s in zip(crop, region):  # covering the view
        assert c.start <= s.start and c.stop >= s.stop
    assert labels.size < np.prod(SHAPE)  # not the whole image
    np.testing.assert_array_equal(probs, expected["0"][(slice(None), *crop)])
    np.testing.assert_array_equal(labels, expected["labels/segmentation/0"][crop])


def test_the_reader_opens_a_tilerseg_output(viewer, data, tmp_path) -> None:
    """Lazily, with every level, the store's class names and colours and its pixel size;
    other Zarr stores are left to other readers."""
    from tilerseg.napari._reader import get_reader

    out = tmp_path / "slide.zarr"
    assert main(["run", data["tif"], "--model", data["model"], "--tile", str(TILE),
                 "--output", "instances", "-o", str(out), "-q"]) == 0
    layers = viewer.open(str(out), plugin="tilerseg")
    assert [layer.name for layer in layers] == [
        "probabilities: membrane", "probabilities: cell", "instances"]
    root = zarr.open_group(str(out), mode="r")
    levels = len(root.attrs["ome"]["multiscales"][0]["datasets"])
    for k, layer in enumerate(layers[:2]):
        assert layer.multiscale and len(layer.data) == levels > 1
        for level, array in enumerate(layer.data):
            np.testing.assert_array_equal(np.asarray(array), root[str(level)][k])
        assert tuple(layer.scale) == (0.5, 0.5)  # micrometres, from the TIFF's tags
        assert tuple(layer.contrast_limits) == (0, 255)
    assert layers[1].colormap.colors[-1][:3].tolist() == pytest.approx([31 / 255, 119 / 255,
                                                                        180 / 255])
    np.testing.assert_array_equal(np.asarray(layers[2].data[0]), root["labels/instances/0"][:])

    zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    assert get_reader(str(tmp_path / "other.zarr")) is None
    assert get_reader(data["tif"]) is None


def test_the_sample_data_is_the_demo_slide(viewer) -> None:
    """The slide of ``tilerseg demo`` (4096 x 4096, 0.5 um pixels), read lazily."""
    (layer,) = viewer.open_sample("tilerseg", "demo-slide")
    assert layer.name == "demo slide" and layer.data.shape == (4096, 4096)
    assert tuple(layer.scale) == (0.5, 0.5)
    from tilerseg.synthetic import membrane_tile

    np.testing.assert_array_equal(np.asarray(layer.data[1024:1280, 2048:2304]),
                                  membrane_tile((1024, 2048), (256, 256), seed=0))

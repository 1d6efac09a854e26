"""int8: the model quantised with NNCF for OpenVINO, calibrated, checked, cached; exact
tiling of the fixed quantised network; a loud fall-back when the check fails."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import tilerseg
from tests.conftest import one_shot_reference
from tilerseg.cli import main
from tilerseg.engine import int8, openvino_backend
from tilerseg.engine.options import RunOptions
from tilerseg.engine.prepare import prepare
from tilerseg.errors import RuntimeFallbackError
from tilerseg.io.writers import decode_probabilities, open_output
from tilerseg.labels import LabelPolicy
from tilerseg.synthetic import membrane_image

pytestmark = pytest.mark.openvino  # OpenVINO and NNCF are in the test extra: never skipped


@pytest.fixture(autouse=True)
def fewer_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """24 calibration and 4 check windows (300 and 16 for users): seconds, not minutes."""
    monkeypatch.setattr(int8, "CALIBRATION_WINDOWS", 24)
    monkeypatch.setattr(int8, "CHECK_WINDOWS", 4)
    openvino_backend._COMPILED.clear()  # each test starts as a new process would


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tilerseg.load_model().eval()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return membrane_image((600, 520), seed=3)[0]


def _folder(path: Path, seed: int) -> Path:
    path.mkdir()
    tifffile.imwrite(path / "a.tif", membrane_image((400, 400), seed=seed)[0])
    tifffile.imwrite(path / "b.tif", membrane_image((300, 500), seed=seed + 1)[0])
    return path


def test_int8_tiles_exactly_runs_in_int8_and_keeps_the_labels(
        tmp_path: Path, model: torch.nn.Module, image: np.ndarray,
        caplog: pytest.LogCaptureFixture) -> None:
    folder = _folder(tmp_path / "calibration", seed=7)
    with caplog.at_level(logging.INFO, logger="tilerseg"):
        tiled = {t: tilerseg.segment(image, model, tile=t, precision="int8",
                                     calibration=folder) for t in (128, 256)}
    assert "openvino runs the model on cpu for input [1, 1, 444, 444] in int8" in caplog.text
    forwards = [f for f in openvino_backend._COMPILED.values() if f.precision == "int8"]
    assert forwards and all(f.check["int8_convolutions"][0] == f.check["int8_convolutions"][1]
                            for f in forwards)  # every convolution in 8-bit integers

    # the one-shot reference: the same quantised network (fixed before the run: the
    # run's calibration, drawn again), on the whole padded image at once
    p = prepare(image, model, RunOptions(precision="int8", calibration=str(folder)))
    geometry, calibration = p.runner.calibration()
    normalised = p.normalization(image[None])

    def whole(x: torch.Tensor) -> torch.Tensor:
        forward = openvino_backend.openvino_forward(model, tuple(x.shape), "int8",
                                                    geometry=geometry, calibration=calibration)
        return forward(x)

    reference = one_shot_reference(normalised, model, run=whole)
    assert calibration.windows == [] and calibration.describe()["windows"] == 24  # released
    for t, probs in tiled.items():
        np.testing.assert_allclose(probs, reference, atol=1e-4, rtol=0, err_msg=f"tile {t}")

    fp32 = one_shot_reference(normalised, model)
    policy = LabelPolicy.for_model(2, model.metadata)
    assert (policy(tiled[256]) == policy(fp32)).mean() >= int8.MIN_AGREEMENT
    assert np.abs(tiled[256] - fp32).mean() <= int8.MAX_MEAN_DEVIATION


def test_int8_network_is_cached_per_calibration(tmp_path: Path, model: torch.nn.Module,
                                                image: np.ndarray,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import nncf

    calls = []
    quantize = nncf.quantize
    monkeypatch.setattr(nncf, "quantize", lambda *a, **k: calls.append(1) or quantize(*a, **k))
    first = _folder(tmp_path / "one", seed=1)
    a = tilerseg.segment(image, model, tile=256, precision="int8", calibration=first)
    openvino_backend._COMPILED.clear()
    b = tilerseg.segment(image, model, tile=512, precision="int8", calibration=first)
    assert len(calls) == 1  # read back from the cache, and the same network
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    tilerseg.segment(image, model, tile=256, precision="int8",
                     calibration=_folder(tmp_path / "two", seed=2))
    assert len(calls) == 2  # other calibration data, another network
    assert len(list((tilerseg.engine.backends.cache_dir() / "openvino").glob("int8-*.xml"))) >= 2


def test_output_records_the_calibration_and_the_check(tmp_path: Path, model: torch.nn.Module,
                                                      image: np.ndarray) -> None:
    out = tilerseg.segment_to_zarr(image, model, tmp_path / "o.zarr", tile=256,
                                   precision="int8")
    runtime = open_output(out)["attributes"]["runtime"]
    assert (runtime["engine"], runtime["precision"]) == ("openvino", "int8")
    assert runtime["int8"]["calibration"]["source"] == "the image"
    assert runtime["int8"]["calibration"]["windows"] == 24
    assert len(runtime["int8"]["calibration"]["sha256"]) == 64
    check = runtime["int8"]["check"]
    assert check["passed"] and check["agreement"] >= int8.MIN_AGREEMENT
    assert check["int8_convolutions"][0] > 0


def test_a_failed_check_falls_back_loudly_to_float32(tmp_path: Path, model: torch.nn.Module,
                                                     image: np.ndarray, no_strict_runtime,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(int8, "MIN_AGREEMENT", 1.01)  # no quantised network can pass
    with caplog.at_level(logging.WARNING, logger="tilerseg"):
        out = tilerseg.segment_to_zarr(image, model, tmp_path / "o.zarr", tile=256,
                                       precision="int8")
    assert "int8 changed the labels" in caplog.text
    assert "running torch eagerly in float32" in caplog.text
    o = open_output(out)
    assert (o["attributes"]["runtime"]["engine"], o["attributes"]["runtime"]["precision"]) \
        == ("torch", "fp32")
    fp32 = one_shot_reference(image[None].astype(np.float32) / 255, model)  # 8 bits: / 255
    np.testing.assert_allclose(decode_probabilities(o["probabilities"][:]), fp32,
                               atol=0.5 / 255 + 1e-4)


def test_a_failed_check_is_an_error_under_strict_runtime(model: torch.nn.Module,
                                                         image: np.ndarray,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    monkeypatch.setattr(int8, "MAX_MEAN_DEVIATION", -1.0)  # (the check is judged on use)
    with pytest.raises(RuntimeFallbackError, match="int8 changed the labels"):
        tilerseg.segment(image, model, tile=256, precision="int8")


@pytest.mark.parametrize("extra, message", [
    (["--calibration", "DIR"], "applies to precision='int8'"),
    (["--precision", "int8", "--calibration", "missing"], "does not exist or is not a folder"),
    (["--precision", "int8", "--calibration", "empty"], "holds no images"),
    (["--precision", "int8", "--calibration", "s3://bucket/calibration"], "a local folder"),
    (["--precision", "int8", "--backend", "torch"], "precision=int8 runs on OpenVINO"),
])  # fmt: skip
def test_bad_int8_requests_are_one_line_errors(tmp_path: Path, image: np.ndarray, extra, message,
                                               capsys: pytest.CaptureFixture) -> None:
    tifffile.imwrite(tmp_path / "x.tif", image)
    (tmp_path / "empty").mkdir()
    extra = [str(tmp_path / e) if e in ("missing", "empty", "DIR") else e for e in extra]
    code = main(["run", str(tmp_path / "x.tif"), "-o", str(tmp_path / "o.zarr"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o.zarr").exists()


def test_missing_nncf_is_a_one_line_error(tmp_path: Path, image: np.ndarray,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    tifffile.imwrite(tmp_path / "x.tif", image)
    monkeypatch.setattr(int8, "int8_available", lambda: False)
    code = main(["run", str(tmp_path / "x.tif"), "-o", str(tmp_path / "o.zarr"),
                 "--precision", "int8"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "pip install 'tilerseg[int8]'" in err


def test_int8_is_refused_off_the_cpu_and_without_a_calibration_folder(model, image) -> None:
    from tilerseg.engine.compute import resolve_precision

    with pytest.raises(tilerseg.InvalidArgumentError, match="int8 runs on the CPU"):
        resolve_precision("int8", torch.device("cuda"))
    with pytest.raises(tilerseg.InvalidArgumentError, match="must be a folder's path"):
        RunOptions(precision="int8", calibration=3)


def test_a_resumed_run_draws_the_calibration_of_the_first(tmp_path: Path) -> None:
    """A resumed run and a cluster worker prepare with the run's resolved normalisation;
    the calibration images are normalised the same way, so the windows (and the network)
    are the same: here 16-bit images, normalised by their own percentiles."""
    torch.manual_seed(0)
    model = tilerseg.create_model("unet", depth=2, base_channels=4).eval()
    rng = np.random.default_rng(0)
    folder = tmp_path / "calibration"
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", (rng.random((300, 300)) * 1000 + 1000).astype(np.uint16))
    image = (rng.random((200, 200)) * 60000).astype(np.uint16)
    fresh = prepare(image, model, RunOptions(precision="int8", calibration=str(folder)))
    assert fresh.normalization.method == "percentile"
    resumed = prepare(image, model, RunOptions(precision="int8", calibration=str(folder),
                                               normalize=fresh.normalization))
    a, b = fresh.runner.calibration()[1], resumed.runner.calibration()[1]
    assert a.digest == b.digest
    assert 0.2 < float(np.mean([w.mean() for w in a.windows])) < 0.8  # its own percentiles


def test_a_calibration_folder_is_drawn_once_then_known_by_its_files(
        tmp_path: Path, model: torch.nn.Module, image: np.ndarray,
        monkeypatch: pytest.MonkeyPatch) -> None:
    draws = []
    calibrate = int8.calibrate
    monkeypatch.setattr(int8, "calibrate", lambda *a, **k: draws.append(1) or calibrate(*a, **k))
    folder = _folder(tmp_path / "calibration", seed=11)
    first = tilerseg.segment(image, model, tile=256, precision="int8", calibration=folder)
    int8._KNOWN.clear()  # as another process: the record beside the networks
    second = tilerseg.segment(image, model, tile=256, precision="int8", calibration=folder)
    assert len(draws) == 1
    np.testing.assert_array_equal(first, second)
    for f in (tilerseg.engine.backends.cache_dir() / "openvino").glob("int8-*"):
        f.unlink()  # the networks gone: the windows are drawn again (and match the record)
    openvino_backend._COMPILED.clear()
    third = tilerseg.segment(image, model, tile=256, precision="int8", calibration=folder)
    assert len(draws) == 2
    np.testing.assert_array_equal(first, third)
    tifffile.imwrite(folder / "a.tif", membrane_image((400, 400), seed=99)[0])  # changed
    tilerseg.segment(image, model, tile=256, precision="int8", calibration=folder)
    assert len(draws) == 3

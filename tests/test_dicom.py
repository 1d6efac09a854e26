"""DICOM input: single-frame, multi-frame and series files written with pydicom's own
writer read with the right shape, axis and z order, spacing, rescale and window; runs on
them through the CLI; bad DICOM is one line on stderr and exit status 2."""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pydicom")

import tilerseg  # noqa: E402
from tests.dicom_files import rle_compress, write_dicom, write_series  # noqa: E402
from tests.reference import one_shot_reference  # noqa: E402
from tilerseg.cli import main  # noqa: E402
from tilerseg.errors import InvalidArgumentError, InvalidImageError  # noqa: E402
from tilerseg.io.writers import open_output  # noqa: E402


def _windowed(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """A DICOM viewer's linear window, written independently of tilerseg."""
    return np.clip((x.astype(np.float64) - (center - width / 2)) / width, 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dicom-model") / "model.pt"
    tilerseg.save_model(tilerseg.create_model("unet", depth=2, base_channels=2), path)
    return path


def _run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    status = main(args)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _one_error_line(status: int, err: str) -> str:
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tilerseg: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_single_frame_ct_with_spacing_rescale_and_window(tmp_path: Path) -> None:
    stored = np.random.default_rng(0).integers(0, 4096, (40, 50)).astype(np.uint16)
    path = write_dicom(tmp_path / "ct.dcm", stored, PixelSpacing=[0.5, 0.25],
                       RescaleSlope=1, RescaleIntercept=-1024,
                       WindowCenter=[40, -600], WindowWidth=[400, 1500])
    image = tilerseg.open_image(path)
    assert (image.format, image.axes, image.shape) == ("dicom", "YX", (40, 50))
    assert image.pixel_size == {"Y": 500.0, "X": 250.0}  # mm -> um, rows then columns
    assert image.window == (40.0, 400.0)  # the first of several windows
    assert image.dtype == np.int32  # integer rescale: Hounsfield units, exactly
    np.testing.assert_array_equal(image.data[:], stored.astype(np.int64) - 1024)
    np.testing.assert_array_equal(image.data[5:9, 7], stored[5:9, 7].astype(np.int64) - 1024)


def test_multi_frame_file_is_a_lazy_z_stack(tmp_path: Path, monkeypatch) -> None:
    import pydicom.pixels

    stored = np.random.default_rng(1).integers(-500, 500, (6, 20, 30)).astype(np.int16)
    path = write_dicom(tmp_path / "mf.dcm", stored, frames=True, ImagerPixelSpacing=[0.2, 0.2],
                       SpacingBetweenSlices=1.5, RescaleSlope=0.5, RescaleIntercept=2.25)
    calls = []
    real = pydicom.pixels.pixel_array
    monkeypatch.setattr(pydicom.pixels, "pixel_array",
                        lambda src, **kw: calls.append(kw.get("index")) or real(src, **kw))
    image = tilerseg.open_image(path)
    assert (image.format, image.axes, image.shape, image.dtype) == (
        "dicom", "ZYX", (6, 20, 30), np.float32)
    assert image.pixel_size == pytest.approx({"Z": 1500.0, "Y": 200.0, "X": 200.0})
    assert image.window is None
    assert set(calls) <= {0, 5}  # opening probes the first and last frames only
    np.testing.assert_array_equal(image.data[3, 2:5], stored[3, 2:5] * 0.5 + 2.25)
    assert set(calls) == {0, 3, 5}  # a plane is decoded when it is read
    np.testing.assert_array_equal(image.data[:], stored * 0.5 + 2.25)


def test_enhanced_multi_frame_functional_groups(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    def item(**tags) -> Dataset:
        ds = Dataset()
        for name, value in tags.items():
            setattr(ds, name, value)
        return ds

    stored = np.random.default_rng(8).integers(0, 1000, (3, 10, 12)).astype(np.uint16)
    shared = item(PixelMeasuresSequence=Sequence([item(PixelSpacing=[0.3, 0.4],
                                                       SliceThickness=5.0)]),
                  PlaneOrientationSequence=Sequence([item(
                      ImageOrientationPatient=[1, 0, 0, 0, 1, 0])]),
                  FrameVOILUTSequence=Sequence([item(WindowCenter=30, WindowWidth=300)]))
    per_frame = [item(PlanePositionSequence=Sequence([item(ImagePositionPatient=[0, 0, 2.0 * k])]),
                      PixelValueTransformationSequence=Sequence([item(
                          RescaleSlope=1 + k, RescaleIntercept=-100, RescaleType="HU")]))
                 for k in range(3)]
    path = write_dicom(tmp_path / "enhanced.dcm", stored, frames=True,
                       SharedFunctionalGroupsSequence=Sequence([shared]),
                       PerFrameFunctionalGroupsSequence=Sequence(per_frame))
    image = tilerseg.open_image(path)
    assert (image.axes, image.dtype, image.window) == ("ZYX", np.int32, (30.0, 300.0))
    assert image.pixel_size == pytest.approx({"Z": 2000.0, "Y": 300.0, "X": 400.0})
    expected = stored.astype(np.int64) * np.array([1, 2, 3])[:, None, None] - 100
    np.testing.assert_array_equal(image.data[:], expected)


def test_multi_frame_file_with_shuffled_frame_positions_is_ordered_lazily(
        tmp_path: Path, monkeypatch) -> None:
    import pydicom.pixels
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    def item(**tags) -> Dataset:
        ds = Dataset()
        for name, value in tags.items():
            setattr(ds, name, value)
        return ds

    z_mm = [4.0, 0.0, 6.0, 2.0]  # frame k lies at z_mm[k]: stored out of spatial order
    stored = np.random.default_rng(13).integers(0, 1000, (4, 10, 12)).astype(np.uint16)
    shared = item(PlaneOrientationSequence=Sequence([item(
        ImageOrientationPatient=[1, 0, 0, 0, 1, 0])]))
    per_frame = [item(PlanePositionSequence=Sequence([item(ImagePositionPatient=[5, 5, z])]),
                      PixelValueTransformationSequence=Sequence([item(
                          RescaleSlope=1 + k, RescaleIntercept=0)]))
                 for k, z in enumerate(z_mm)]
    path = write_dicom(tmp_path / "shuffled.dcm", stored, frames=True,
                       SharedFunctionalGroupsSequence=Sequence([shared]),
                       PerFrameFunctionalGroupsSequence=Sequence(per_frame))
    calls = []
    real = pydicom.pixels.pixel_array
    monkeypatch.setattr(pydicom.pixels, "pixel_array",
                        lambda src, **kw: calls.append(kw.get("index")) or real(src, **kw))
    image = tilerseg.open_image(path)
    assert (image.axes, image.shape) == ("ZYX", (4, 10, 12))
    assert image.pixel_size["Z"] == pytest.approx(2000.0)
    calls.clear()
    # plane 1 lies at z = 2 mm: stored frame 3, with frame 3's rescale slope (4)
    np.testing.assert_array_equal(image.data[1], stored[3].astype(np.int64) * 4)
    assert calls == [3]  # only that frame is decoded
    slopes = np.arange(1, 5)[:, None, None]
    spatial = np.argsort(z_mm)  # stored frames in spatial order: [1, 3, 0, 2]
    np.testing.assert_array_equal(image.data[:], (stored.astype(np.int64) * slopes)[spatial])


def test_series_in_shuffled_file_order_is_ordered_by_position(tmp_path: Path) -> None:
    volume = np.random.default_rng(2).integers(0, 3000, (5, 24, 16)).astype(np.uint16)
    order = [3, 0, 4, 1, 2]  # file f holds plane order[f]; names and InstanceNumber follow f
    centers = [100.0 + z for z in range(5)]
    folder = tmp_path / "series"
    folder.mkdir()
    for f, z in enumerate(order):
        write_dicom(folder / f"slice{f}.dcm", volume[z], series="1.2.826.0.1.5", InstanceNumber=f,
                    ImagePositionPatient=[-50.0, -40.0, 10.0 + 2.5 * z],
                    ImageOrientationPatient=[1, 0, 0, 0, 1, 0], PixelSpacing=[0.8, 0.6],
                    RescaleIntercept=-1024, RescaleSlope=1, WindowCenter=centers[z],
                    WindowWidth=350)
    image = tilerseg.open_image(folder)
    assert (image.format, image.axes, image.shape) == ("dicom-series", "ZYX", (5, 24, 16))
    np.testing.assert_array_equal(image.data[:], volume.astype(np.int64) - 1024)
    assert image.pixel_size == pytest.approx({"Z": 2500.0, "Y": 800.0, "X": 600.0})
    assert image.window == (100.0, 350.0)  # the first slice's, in z order


def test_series_positions_along_an_oblique_normal_and_instance_fallback(tmp_path: Path) -> None:
    volume = np.arange(4 * 8 * 9, dtype=np.uint8).reshape(4, 8, 9)
    # rows along x, columns along (0, cos, sin): the normal is (0, -sin, cos)
    c, s = np.cos(0.3), np.sin(0.3)
    for name in ("oblique", "instances"):
        (tmp_path / name).mkdir()
    for f, z in enumerate([2, 0, 3, 1]):
        write_dicom(tmp_path / "oblique" / f"{f}.dcm", volume[z], series="1.2.3",
                    InstanceNumber=4 - f, ImageOrientationPatient=[1, 0, 0, 0, c, s],
                    ImagePositionPatient=[0.0, -s * 3.0 * z + 7 * c, c * 3.0 * z + 7 * s])
        write_dicom(tmp_path / "instances" / f"{f}.dcm", volume[z], series="1.2.4",
                    InstanceNumber=z + 1)  # no positions: InstanceNumber orders them
    oblique = tilerseg.open_image(tmp_path / "oblique")
    np.testing.assert_array_equal(oblique.data[:], volume)
    assert oblique.pixel_size["Z"] == pytest.approx(3000.0)
    np.testing.assert_array_equal(tilerseg.open_image(tmp_path / "instances").data[:], volume)


def test_monochrome1_is_inverted_and_so_is_its_window(tmp_path: Path) -> None:
    stored = np.array([[0, 100, 4095], [2000, 3000, 4095]], np.uint16)
    stored = np.repeat(np.repeat(stored, 8, 0), 8, 1)
    path = write_dicom(tmp_path / "cr.dcm", stored, photometric="MONOCHROME1",
                       WindowCenter=1000, WindowWidth=1000)
    path_bits = path.read_bytes()
    assert b"MONOCHROME1" in path_bits
    import pydicom

    ds = pydicom.dcmread(path)
    ds.BitsStored, ds.HighBit = 12, 11
    ds.save_as(path)
    image = tilerseg.open_image(path)
    np.testing.assert_array_equal(image.data[:], 4095 - stored)
    assert image.window == (3095.0, 1000.0)
    norm = tilerseg.normalize.resolve_normalization(("window", "dicom"), image.dtype,
                                                    lambda: None, window=lambda: image.window)
    # what a viewer shows: the window on the stored values, then white for low values
    np.testing.assert_allclose(norm(image.data[:]), 1 - _windowed(stored, 1000, 1000),
                               atol=1e-6)


def test_rgb_dicom_is_yxs(tmp_path: Path) -> None:
    rgb = np.random.default_rng(3).integers(0, 256, (20, 12, 3)).astype(np.uint8)
    image = tilerseg.open_image(write_dicom(tmp_path / "rgb.dcm", rgb))
    assert (image.axes, image.shape, image.dtype) == ("YXS", (20, 12, 3), np.uint8)
    np.testing.assert_array_equal(image.data[:], rgb)


def test_run_on_a_series_through_the_cli(tmp_path: Path, model_file: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    volume = np.random.default_rng(4).integers(0, 2000, (3, 70, 60)).astype(np.uint16)
    write_series(tmp_path / "series", volume, [2, 0, 1], dz=1.25, PixelSpacing=[0.5, 0.4],
                 RescaleIntercept=-1024, RescaleSlope=1, WindowCenter=-200, WindowWidth=900)
    out = tmp_path / "out.zarr"
    status, printed, err = _run(
        ["run", str(tmp_path / "series"), "-o", str(out), "--model", str(model_file),
         "--tile", "32", "--window", "dicom", "--dtype", "float32", "--device", "cpu",
         "--backend", "torch", "-q"],
        capsys)
    assert status == 0, err
    result = tilerseg.open_image(out)
    assert result.pixel_size == pytest.approx({"Z": 1250.0, "Y": 500.0, "X": 400.0})
    assert open_output(out)["attributes"]["normalization"] == {
        "method": "window", "low": -650.0, "high": 250.0}
    probabilities = open_output(out)["probabilities"][:]
    model = tilerseg.load_model(model_file)
    hu = volume.astype(np.int64) - 1024
    for z in range(3):
        expected = one_shot_reference(_windowed(hu[z], -200, 900)[None], model)
        np.testing.assert_allclose(probabilities[:, z], expected, atol=1e-4)


def test_window_dicom_preset_and_explicit_match_numpy(tmp_path: Path) -> None:
    stored = np.random.default_rng(5).integers(0, 4096, (33, 41)).astype(np.uint16)
    path = write_dicom(tmp_path / "ct.dcm", stored, RescaleSlope=1, RescaleIntercept=-1024,
                       WindowCenter=60, WindowWidth=500)
    hu = stored.astype(np.int64) - 1024
    conv = torch.nn.Conv2d(1, 1, 1)  # p = sigmoid(x): the model input is read back exactly
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.zero_()
    for normalize, (center, width) in {("window", "dicom"): (60, 500),
                                       ("window", "lung"): (-600, 1500),
                                       ("window", "bone"): (400, 1800),
                                       ("window", -100.0, 300.0): (-100, 300)}.items():
        p = tilerseg.segment(str(path), conv, tile=16, normalize=normalize, device="cpu",
                             backend="torch")
        x = _windowed(hu, center, width)
        np.testing.assert_allclose(p[0], 1 / (1 + np.exp(-x)), atol=1e-6)


def test_window_dicom_without_tags_is_refused(tmp_path: Path, model_file: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    path = write_dicom(tmp_path / "plain.dcm", np.zeros((40, 40), np.uint16))
    status, _, err = _run(["run", str(path), "--model", str(model_file), "--tile", "32",
                           "--window", "dicom", "--device", "cpu", "--backend", "torch", "-q"],
                          capsys)
    line = _one_error_line(status, err)
    assert "WindowCenter/WindowWidth" in line and "has none" in line
    assert not (tmp_path / "plain.tilerseg.zarr").exists()
    with pytest.raises(InvalidArgumentError, match="has none"):
        tilerseg.segment(np.zeros((40, 40), np.uint16), tilerseg.load_model(model_file),
                         normalize=("window", "dicom"), tile=32, device="cpu",
                         backend="torch")


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = write_dicom(tmp_path / "good.dcm", np.ones((64, 64), np.uint16))
    data = good.read_bytes()
    (tmp_path / "truncated.dcm").write_bytes(data[:-500])
    (tmp_path / "header-only.dcm").write_bytes(data[:200])
    (tmp_path / "text.dcm").write_text("not an image at all\n" * 20)
    import pydicom

    ds = pydicom.dcmread(good)
    del ds.PixelData
    ds.save_as(tmp_path / "no-pixels.dcm")
    return {"truncated": (tmp_path / "truncated.dcm", "truncated file"),
            "header": (tmp_path / "header-only.dcm", "truncated"),
            "text": (tmp_path / "text.dcm", "not a DICOM file"),
            "no pixels": (tmp_path / "no-pixels.dcm", "no pixel data")}


def test_bad_dicom_is_one_line_and_exit_status_2(tmp_path: Path, model_file: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    for name, (path, reason) in _bad_files(tmp_path).items():
        status, _, err = _run(["run", str(path), "--model", str(model_file), "--tile", "32",
                               "--device", "cpu", "--backend", "torch", "-q"], capsys)
        line = _one_error_line(status, err)
        assert str(path) in line and reason in line, (name, line)
        with pytest.raises(InvalidImageError, match=reason):
            tilerseg.open_image(path)


def test_a_truncated_slice_inside_a_series_is_named(tmp_path: Path) -> None:
    volume = np.zeros((5, 30, 30), np.int16)
    paths = write_series(tmp_path / "s", volume, range(5))
    paths[2].write_bytes(paths[2].read_bytes()[:-100])
    with pytest.raises(InvalidImageError,
                       match=re.escape(f"{paths[2]} is not a readable image: truncated file")):
        tilerseg.open_image(tmp_path / "s")


def test_mixed_series_and_sizes_are_refused(tmp_path: Path) -> None:
    write_series(tmp_path / "mixed", np.zeros((2, 16, 16), np.uint16), [0, 1])
    write_dicom(tmp_path / "mixed" / "other.dcm", np.zeros((16, 16), np.uint16))
    with pytest.raises(InvalidImageError, match="holds 2 DICOM series"):
        tilerseg.open_image(tmp_path / "mixed")
    paths = write_series(tmp_path / "sizes", np.zeros((2, 16, 16), np.uint16), [0, 1])
    import pydicom

    series = pydicom.dcmread(paths[0]).SeriesInstanceUID
    write_dicom(tmp_path / "sizes" / "big.dcm", np.zeros((16, 20), np.uint16), series=series)
    with pytest.raises(InvalidImageError, match="DICOM files differ"):
        tilerseg.open_image(tmp_path / "sizes")


def test_without_pydicom_the_error_names_the_extra(tmp_path: Path, monkeypatch) -> None:
    path = write_dicom(tmp_path / "a.dcm", np.zeros((16, 16), np.uint16))
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(InvalidImageError, match=r'pip install "tilerseg\[dicom\]"'):
        tilerseg.open_image(path)


def test_resume_refuses_a_changed_window(tmp_path: Path, model_file: Path, monkeypatch,
                                         capsys: pytest.CaptureFixture) -> None:
    import tilerseg.engine.tasks as tasks

    stored = np.random.default_rng(6).integers(0, 4096, (96, 96)).astype(np.uint16)
    path = write_dicom(tmp_path / "ct.dcm", stored, RescaleSlope=1, RescaleIntercept=-1024,
                       WindowCenter=40, WindowWidth=400)
    out = tmp_path / "o.zarr"
    model = tilerseg.load_model(model_file)
    real = tasks.RunContext.write
    monkeypatch.setattr(tasks.RunContext, "write",
                        lambda self, tile, probs: (_ for _ in ()).throw(KeyboardInterrupt)
                        if tile.index == (2, 2) else real(self, tile, probs))
    with pytest.raises(KeyboardInterrupt):
        tilerseg.segment_to_zarr(path, model, out, tile=32, normalize=("window", "dicom"),
                                 device="cpu", backend="torch")
    monkeypatch.setattr(tasks.RunContext, "write", real)
    for changed in [("window", "lung"), ("window", 40.0, 500.0), "auto"]:
        with pytest.raises(InvalidArgumentError, match=r"other parameters: normalize \("):
            tilerseg.segment_to_zarr(path, model, out, tile=32, normalize=changed,
                                     device="cpu", backend="torch", resume=True)
    status = main(["run", str(path), "-o", str(out), "--model", str(model_file), "--tile", "32",
                   "--window", "bone", "--device", "cpu", "--backend", "torch", "--resume", "-q"])
    line = _one_error_line(status, capsys.readouterr().err)
    assert "other parameters: normalize (" in line
    # the same window given explicitly is the same run
    tilerseg.segment_to_zarr(path, model, out, tile=32, normalize=("window", 40, 400),
                             device="cpu", backend="torch", resume=True)
    expected = one_shot_reference(_windowed(stored.astype(np.int64) - 1024, 40, 400)[None],
                                  model)
    got = open_output(out)["probabilities"][:].astype(np.float32) / 255
    assert np.abs(got - expected).max() <= 0.5 / 255 + 1e-4


def test_compressed_dicom_decodes_or_names_the_missing_decoder(tmp_path: Path,
                                                               monkeypatch) -> None:
    import pydicom
    import pydicom.pixels
    from pydicom.uid import JPEGLSLossless, RLELossless

    stored = np.random.default_rng(9).integers(0, 4096, (3, 16, 24)).astype(np.uint16)
    path = write_dicom(tmp_path / "plain.dcm", stored, frames=True)
    ds = pydicom.dcmread(path)
    ds.compress(RLELossless, stored)  # pydicom's own RLE encoder
    ds.save_as(tmp_path / "rle.dcm")
    image = tilerseg.open_image(tmp_path / "rle.dcm")
    np.testing.assert_array_equal(image.data[1], stored[1])
    np.testing.assert_array_equal(image.data[:], stored)

    class Unavailable:
        is_available = False
        missing_dependencies = ["pylibjpeg - requires pylibjpeg>=2.0"]

    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.save_as(tmp_path / "jpegls.dcm")
    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: Unavailable())
    with pytest.raises(InvalidImageError, match=r"compressed DICOM \(JPEG-LS Lossless Image "
                       r"Compression\) needs a decoder that is not installed: pylibjpeg"):
        tilerseg.open_image(tmp_path / "jpegls.dcm")


def test_a_slice_failing_to_decode_during_a_run_is_one_line_with_the_reason(
        tmp_path: Path, model_file: Path, capsys: pytest.CaptureFixture) -> None:
    volume = np.random.default_rng(10).integers(0, 2000, (3, 40, 40)).astype(np.uint16)
    paths = write_series(tmp_path / "ser", volume, [0, 1, 2])
    rle_compress(paths[1], volume[1], segments=7)  # the RLE header claims 7 segments, not 2
    image = tilerseg.open_image(tmp_path / "ser")  # opening decodes the first and last only
    np.testing.assert_array_equal(image.data[2], volume[2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status, _, err = _run(["run", str(tmp_path / "ser"), "-o", str(tmp_path / "o.zarr"),
                               "--model", str(model_file), "--tile", "32", "--device", "cpu",
                               "--backend", "torch", "-q"], capsys)
    line = _one_error_line(status, err)
    assert line.startswith(f"tilerseg: error: {paths[1]} is not a readable image: cannot "
                           "decode pixel data ("), line
    assert "(7 vs. 2 segments)" in line, line  # pydicom's reason, not only its preamble
    assert not [w for w in caught if "pydicom" in w.filename], [str(w.message) for w in caught]


def test_a_pydicom_warning_while_decoding_is_one_line(tmp_path: Path, model_file: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    stored = np.random.default_rng(11).integers(0, 2000, (40, 40)).astype(np.uint16)
    path = rle_compress(write_dicom(tmp_path / "padded.dcm", stored), stored, extra_rows=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status, _, err = _run(["run", str(path), "-o", str(tmp_path / "o.zarr"), "--model",
                               str(model_file), "--tile", "32", "--device", "cpu",
                               "--backend", "torch", "-q"], capsys)
        np.testing.assert_array_equal(tilerseg.open_image(path).data[:], stored)
    assert status == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tilerseg: warning: {path}: "), err
    assert "non-conformant padding" in lines[0]
    assert not [w for w in caught if "pydicom" in w.filename], [str(w.message) for w in caught]


def test_a_series_folder_holding_a_zarr_output_is_still_the_series(
        tmp_path: Path, model_file: Path, capsys: pytest.CaptureFixture) -> None:
    volume = np.random.default_rng(12).integers(0, 2000, (3, 40, 40)).astype(np.uint16)
    write_series(tmp_path / "ser", volume, [1, 2, 0])
    out = tmp_path / "ser" / "lab.zarr"
    args = ["run", str(tmp_path / "ser"), "-o", str(out), "--output", "labels", "--model",
            str(model_file), "--tile", "32", "--device", "cpu", "--backend", "torch", "-q"]
    status, _, err = _run(args, capsys)
    assert status == 0, err
    first = open_output(out)["labels"][:]
    image = tilerseg.open_image(tmp_path / "ser")  # the folder now also holds one .zarr
    assert (image.format, image.shape) == ("dicom-series", (3, 40, 40))
    np.testing.assert_array_equal(image.data[:], volume)
    status, _, err = _run([*args, "--overwrite"], capsys)
    assert status == 0, err
    np.testing.assert_array_equal(open_output(out)["labels"][:], first)  # the same input


def test_batch_of_series_folders_segments_each_series_as_one_image(
        tmp_path: Path, model_file: Path, capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(7)
    volumes = {"p1": rng.integers(0, 2000, (3, 40, 36)).astype(np.uint16),
               "p2": rng.integers(0, 2000, (2, 36, 44)).astype(np.uint16)}
    write_series(tmp_path / "patients" / "p1", volumes["p1"], [1, 2, 0])  # IM0000...: no ext
    for path in write_series(tmp_path / "patients" / "p2", volumes["p2"], [0, 1]):
        path.rename(path.with_suffix(".dcm"))  # and .dcm files: still one series
    common = ["--model", str(model_file), "--tile", "32", "--device", "cpu",
              "--backend", "torch", "-q"]
    status, _, err = _run(["batch", str(tmp_path / "patients" / "p1") + "/",
                           str(tmp_path / "patients" / "p2") + "/",
                           "-o", str(tmp_path / "out")] + common, capsys)
    assert status == 0, err
    outputs = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.endswith(".zarr"))
    assert len(outputs) == 2, outputs
    for name, volume in volumes.items():
        (got,) = [p for p in outputs if p.startswith(name)]
        status, _, err = _run(["run", str(tmp_path / "patients" / name), "-o",
                               str(tmp_path / f"{name}.zarr")] + common, capsys)
        assert status == 0, err
        batched = open_output(tmp_path / "out" / got)["probabilities"]
        assert batched.shape[1:] == volume.shape
        np.testing.assert_array_equal(
            batched[:], open_output(tmp_path / f"{name}.zarr")["probabilities"][:])


def test_a_remote_dicom_file_is_refused_saying_dicom_is_read_locally(tmp_path: Path) -> None:
    fsspec = pytest.importorskip("fsspec")
    import uuid

    memory, prefix = fsspec.filesystem("memory"), f"/tilerseg-dicom-{uuid.uuid4().hex}"
    data = write_dicom(tmp_path / "one.dcm", np.zeros((8, 8), np.uint16)).read_bytes()
    try:
        for name in ("one.dcm", "IM0000"):
            memory.pipe_file(f"{prefix}/{name}", data)
            with pytest.raises(InvalidImageError, match="DICOM is read from local files only"):
                tilerseg.open_image(f"memory://{prefix}/{name}")
    finally:
        memory.rm(prefix, recursive=True)
    assert tilerseg.open_image((tmp_path / "one.dcm").as_uri()).shape == (8, 8)


# -- files written by other software: pydicom's own test files ---------------------------------


def _pydicom_file(name: str) -> str:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom ships {name}"
    return path


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm",
                                  "image_dfl.dcm"])
def test_pydicoms_own_single_files_open_with_pydicoms_values(name: str) -> None:
    """A preamble that starts like a TIFF (CT_small, MR_small), RLE, and a deflated data set
    (which pydicom.pixels.pixel_array(path) cannot inflate): pydicom's own array, rescaled."""
    import pydicom
    from pydicom.pixels import apply_rescale

    path = _pydicom_file(name)
    ds = pydicom.dcmread(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no raw warning reaches the user
        image = tilerseg.open_image(path)
    expected = apply_rescale(ds.pixel_array, ds)
    assert image.format == "dicom" and image.axes == "YX"
    np.testing.assert_array_equal(np.asarray(image.data[:]), expected)
    if "PixelSpacing" in ds:
        spacing = [float(v) * 1000 for v in ds.PixelSpacing]  # mm -> um
        assert [image.pixel_size["Y"], image.pixel_size["X"]] == pytest.approx(spacing)
    else:  # image_dfl.dcm states none
        assert image.pixel_size == {}


def test_a_12_bit_jpeg_extended_file_without_its_decoder_names_what_to_install() -> None:
    with pytest.raises(InvalidImageError, match=r"JPEG-lossy\.dcm is not a readable image: "
                       r"cannot decode pixel data \(.*\); other decoders of JPEG Extended "
                       r".*pylibjpeg-libjpeg"):
        np.asarray(tilerseg.open_image(_pydicom_file("JPEG-lossy.dcm")).data[:])


def test_an_rt_dose_grid_has_its_frame_offsets_as_z_spacing() -> None:
    import pydicom

    path = _pydicom_file("rtdose.dcm")
    offsets = [float(v) for v in pydicom.dcmread(path).GridFrameOffsetVector]
    image = tilerseg.open_image(path)
    assert image.axes == "ZYX" and image.shape[0] == len(offsets)
    assert image.pixel_size["Z"] == pytest.approx((offsets[1] - offsets[0]) * 1000)  # mm -> um


def test_an_ultrasound_cine_is_time_not_space() -> None:
    """examples_ybr_color.dcm: 30 frames whose FrameIncrementPointer is FrameTime."""
    with pytest.raises(InvalidImageError, match="has a time axis of length 30"):
        tilerseg.open_image(_pydicom_file("examples_ybr_color.dcm"))

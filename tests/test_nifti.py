"""NIfTI (.nii, .nii.gz) in and out: files written by nibabel itself, read back against
nibabel's own arrays; cases in nnU-Net naming; NIfTI output in the input's space; bad input
is one line and exit status 2."""

from __future__ import annotations

import logging
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

import tilerseg  # noqa: E402
from tilerseg.cli import main  # noqa: E402
from tilerseg.errors import InvalidImageError  # noqa: E402
from tilerseg.io import open_image  # noqa: E402
from tilerseg.io.formats import image_paths, strip_image_suffix  # noqa: E402
from tests.nifti_files import AFFINE, QFORM, tumour, write_case, write_nifti_file  # noqa: E402


def _nibabel_zyx(path: Path) -> np.ndarray:
    """nibabel's own (scaled) voxels of ``path`` in tilerseg's axis order."""
    data = np.asarray(nib.load(path).dataobj)
    return data.transpose(3, 2, 1, 0) if data.ndim == 4 else data.transpose(2, 1, 0)


@pytest.fixture(scope="module")
def volume() -> tuple[np.ndarray, np.ndarray]:
    return tumour((16, 48, 48), modalities=4, seed=3)


# ---------------------------------------------------------------------------- reading


@pytest.mark.parametrize("name, scaled, channels, nifti2", [
    ("t1.nii", False, False, False), ("t1.nii.gz", False, False, False),
    ("scaled.nii", True, False, False), ("scaled.nii.gz", True, False, False),
    ("brats.nii.gz", False, True, False), ("brats.nii", True, True, False),
    ("two.nii", False, False, True),
])
def test_read_equals_nibabels_arrays(tmp_path: Path, volume: tuple, name: str, scaled: bool,
                                     channels: bool, nifti2: bool) -> None:
    image = volume[0] if channels else volume[0][1]
    path = write_nifti_file(tmp_path / name, image, channels=channels, scaled=scaled,
                            nifti2=nifti2)
    source = open_image(path)
    expected = _nibabel_zyx(path)
    assert source.axes == ("CZYX" if channels else "ZYX")
    assert source.shape == expected.shape == image.shape
    assert source.format == "nifti"
    if scaled:
        assert nib.load(path).dataobj.slope != 1.0  # the file really is scaled
        assert source.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(source.data[...]), expected.astype(np.float32))
        np.testing.assert_allclose(np.asarray(source.data[...]),
                                   image.astype(np.float32) * 0.37 - 12.5, atol=0.01)
    else:
        assert source.dtype == np.int16
        np.testing.assert_array_equal(np.asarray(source.data[...]), expected)
        np.testing.assert_array_equal(np.asarray(source.data[...]), image)
    window = (slice(2, 9), slice(5, 30), slice(7, 41))
    key = ((slice(1, 3),) + window) if channels else window
    np.testing.assert_array_equal(np.asarray(source.data[key]),
                                  expected[key].astype(source.dtype))
    assert source.pixel_size == {"Z": 3000.0, "Y": 1000.0, "X": 1000.0}


def test_space_is_the_files_affine_codes_and_header(tmp_path: Path, volume: tuple) -> None:
    path = write_nifti_file(tmp_path / "t1.nii.gz", volume[0][0])
    space = open_image(path).space
    loaded = nib.load(path)
    assert np.array_equal(np.array(space.affine), loaded.affine)
    assert np.allclose(np.array(space.affine), AFFINE, atol=1e-5)  # the sform, not QFORM
    assert not np.allclose(np.array(space.affine), QFORM, atol=1e-3)
    assert (space.sform_code, space.qform_code) == (2, 1)
    assert space.header == loaded.header.binaryblock and space.header_format == "nifti1"
    assert space.axes == "XYZ" and space.shape == (48, 48, 16) and space.frame == "RAS"
    assert pickle.loads(pickle.dumps(space)) == space


@pytest.mark.parametrize("units, expected", [
    (("micron", "unknown"), {"Z": 3.0, "Y": 1.0, "X": 1.0}),
    (("meter", "unknown"), {"Z": 3e6, "Y": 1e6, "X": 1e6}),
    (("unknown", "unknown"), {"Z": 3000.0, "Y": 1000.0, "X": 1000.0}),  # taken as mm
])
def test_pixel_size_follows_the_spatial_unit(tmp_path: Path, volume: tuple, units: tuple,
                                              expected: dict) -> None:
    path = write_nifti_file(tmp_path / "t1.nii", volume[0][0], units=units)
    assert open_image(path).pixel_size == pytest.approx(expected)


def _mapped_kib(path: Path) -> int:
    """Resident KiB of this process's memory maps of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps", encoding="utf-8") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header line
                inside = line.rstrip().endswith(str(path))
            elif inside and first == "Rss:":
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's smaps")
def test_an_uncompressed_window_reads_only_its_pages(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    zyx = rng.integers(0, 4000, (48, 256, 256), dtype=np.int16)  # 6 MiB of voxels
    path = write_nifti_file(tmp_path / "big.nii", zyx)
    source = open_image(path)
    np.testing.assert_array_equal(np.asarray(source.data[3:5, 10:18, 20:28]),
                                  zyx[3:5, 10:18, 20:28])
    window_kib = _mapped_kib(path)
    assert window_kib < 1024, f"{window_kib} KiB of the file mapped for a 2x8x8 window"
    np.testing.assert_array_equal(np.asarray(source.data[...]), zyx)
    assert _mapped_kib(path) > 5 * 1024  # the measure sees a whole read


def test_a_gzipped_file_is_decompressed_once_and_pickles_without_voxels(
        tmp_path: Path, volume: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    from tilerseg.io import nifti

    import gzip
    from types import SimpleNamespace

    path = write_nifti_file(tmp_path / "t1.nii.gz", volume[0][0])
    opened = []
    monkeypatch.setattr(nifti, "gzip", SimpleNamespace(
        open=lambda *args, **kw: opened.append(args[0]) or gzip.open(*args, **kw)))
    source = open_image(path)
    for z in range(4):
        np.asarray(source.data[z, :5, :5])
    assert len(opened) == 1  # the voxels, decompressed once
    base = source.data.base
    assert isinstance(base, nifti.NiftiArray) and base.compressed
    assert len(pickle.dumps(base)) < 4096  # the path and header values, not the voxels
    np.testing.assert_array_equal(np.asarray(pickle.loads(pickle.dumps(source.data))[...]),
                                  volume[0][0])


def test_a_4d_axis_of_channels_and_a_5d_vector(tmp_path: Path, volume: tuple) -> None:
    image = volume[0]
    # SimpleITK-style header: a time unit with a step of 1 is not time
    path = write_nifti_file(tmp_path / "sitk.nii.gz", image, channels=True,
                            units=("mm", "sec"), step=1.0)
    source = open_image(path)
    assert source.axes == "CZYX"
    np.testing.assert_array_equal(np.asarray(source.data[...]), image)
    vector = image.transpose(3, 2, 1, 0)[:, :, :, None, :]  # (X, Y, Z, 1, C)
    nib.save(nib.Nifti1Image(vector, AFFINE), tmp_path / "vector.nii")
    source = open_image(tmp_path / "vector.nii")
    assert source.axes == "CZYX"
    np.testing.assert_array_equal(np.asarray(source.data[...]), image)


def test_a_time_series_is_refused_in_one_line(tmp_path: Path, volume: tuple) -> None:
    path = write_nifti_file(tmp_path / "bold.nii.gz", volume[0], channels=True,
                            units=("mm", "sec"), step=2.5)
    with pytest.raises(InvalidImageError, match="time series of 4 volumes") as err:
        open_image(path)
    assert "\n" not in str(err.value) and "CASE_0000.nii.gz" in str(err.value)


def test_a_2d_file_is_yx(tmp_path: Path) -> None:
    plane = np.arange(30 * 20, dtype=np.uint8).reshape(30, 20)  # (Y, X)
    nib.save(nib.Nifti1Image(plane.T[:, :, None], np.diag([0.5, 0.25, 2.0, 1.0])),
             tmp_path / "plane.nii")
    source = open_image(tmp_path / "plane.nii")
    assert source.axes == "YX" and source.pixel_size == {"Y": 250.0, "X": 500.0}
    np.testing.assert_array_equal(np.asarray(source.data[...]), plane)


def test_a_case_by_identifier_and_as_a_folder(tmp_path: Path, volume: tuple) -> None:
    image = volume[0]
    files = write_case(tmp_path / "imagesTr", "BRATS_001", image)
    write_case(tmp_path / "imagesTr", "BRATS_002", image[:, :, :40])
    expected = np.stack([_nibabel_zyx(f) for f in files])
    source = open_image(str(tmp_path / "imagesTr" / "BRATS_001"))
    assert source.axes == "CZYX" and source.format == "nifti-case"
    np.testing.assert_array_equal(np.asarray(source.data[...]), expected)
    np.testing.assert_array_equal(np.asarray(source.data[2, 3:7, :9, 4:]), expected[2, 3:7, :9, 4:])
    assert np.array_equal(np.array(source.space.affine), nib.load(files[0]).affine)
    assert source.pixel_size == {"Z": 3000.0, "Y": 1000.0, "X": 1000.0}
    single = tmp_path / "one"
    write_case(single, "BRATS_003", image[:2], ext=".nii")
    source = open_image(single)
    np.testing.assert_array_equal(np.asarray(source.data[...]), image[:2])
    with pytest.raises(InvalidImageError, match="holds 2 cases"):
        open_image(tmp_path / "imagesTr")


@pytest.mark.parametrize("problem, message", [
    ("gap", "has modality files 0000, 0002 but no 0001"),
    ("shape", "has shape (40, 48, 16) but"),
    ("affine", "differs from that of"),
])
def test_a_bad_case_is_refused(tmp_path: Path, volume: tuple, problem: str, message: str) -> None:
    image = volume[0][:3]
    folder = tmp_path / "imagesTs"
    if problem == "gap":
        write_case(folder, "C1", image[:2], indices=[0, 2])
    elif problem == "shape":
        write_case(folder, "C1", image[:2])
        write_nifti_file(folder / "C1_0002.nii.gz", image[2][:, :, :40])
    else:
        write_case(folder, "C1", image[:2])
        shifted = AFFINE.copy()
        shifted[0, 3] += 0.5
        write_nifti_file(folder / "C1_0002.nii.gz", image[2], affine=shifted)
    with pytest.raises(InvalidImageError, match=message.replace("(", r"\(").replace(")", r"\)")) \
            as err:
        open_image(str(folder / "C1"))
    assert "\n" not in str(err.value)
    if problem == "shape":
        assert "C1_0002.nii.gz" in str(err.value) and "C1_0000.nii.gz" in str(err.value)


def test_unreadable_files_are_one_line(tmp_path: Path, volume: tuple) -> None:
    whole = write_nifti_file(tmp_path / "whole.nii", volume[0][0]).read_bytes()
    (tmp_path / "cut.nii").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InvalidImageError, match=r"cut.nii is not a readable image: truncated"):
        open_image(tmp_path / "cut.nii")
    (tmp_path / "garbage.nii").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(InvalidImageError, match="garbage.nii is not a readable image"):
        open_image(tmp_path / "garbage.nii")
    bad = bytearray(whole)
    bad[70:72] = (9999).to_bytes(2, "little")  # datatype: no such code
    (tmp_path / "header.nii").write_bytes(bytes(bad))
    with pytest.raises(InvalidImageError, match="header.nii is not a readable image: data code"):
        open_image(tmp_path / "header.nii")
    gz = write_nifti_file(tmp_path / "whole.nii.gz", volume[0][0]).read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(InvalidImageError, match="cut.nii.gz is not a readable image") as err:
        open_image(tmp_path / "cut.nii.gz")  # the corner probe decompresses it
    assert "\n" not in str(err.value)


def test_nibabels_header_warnings_go_to_the_log(tmp_path: Path, volume: tuple,
                                                 caplog: pytest.LogCaptureFixture,
                                                 capfd: pytest.CaptureFixture) -> None:
    path = write_nifti_file(tmp_path / "t1.nii", volume[0][0])
    raw = bytearray(path.read_bytes())
    raw[80:84] = np.float32(-1.0).tobytes()  # pixdim[1] < 0: nibabel fixes it and says so
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="tilerseg.io.nifti"):
        source = open_image(path)
    assert source.pixel_size["X"] == 1000.0
    assert any("pixdim" in r.getMessage() for r in caplog.records)
    # nothing of nibabel's own on stderr (a command line's log handler may print ours)
    raw = [line for line in capfd.readouterr().err.splitlines()
           if "pixdim" in line and not line.startswith("tilerseg: warning: ")]
    assert raw == []


def test_without_nibabel_one_line_names_the_extra(tmp_path: Path, volume: tuple,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_nifti_file(tmp_path / "t1.nii", volume[0][0])
    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(InvalidImageError, match=r'pip install "tilerseg\[nifti\]"'):
        open_image(path)


def test_image_paths_lists_cases_and_label_files(tmp_path: Path, volume: tuple) -> None:
    image, labels = volume
    for case in ("BRATS_002", "BRATS_010", "BRATS_001"):
        write_case(tmp_path / "imagesTr", case, image[:2])
    assert image_paths(str(tmp_path / "imagesTr")) == [
        str(tmp_path / "imagesTr" / c) for c in ("BRATS_001", "BRATS_002", "BRATS_010")]
    (tmp_path / "labelsTr").mkdir()
    for case in ("BRATS_001", "BRATS_002"):
        write_nifti_file(tmp_path / "labelsTr" / f"{case}.nii.gz", labels)
    assert image_paths(str(tmp_path / "labelsTr")) == [
        str(tmp_path / "labelsTr" / f"BRATS_00{i}.nii.gz") for i in (1, 2)]
    assert strip_image_suffix("BRATS_001.nii.gz") == "BRATS_001"


# ---------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "unet3d.pt"
    tilerseg.save_model(tilerseg.create_model("unet3d", depth=2, base_channels=4,
                                              in_channels=4, num_classes=3), path)
    return path


@pytest.mark.parametrize("problem", ["time", "shapes", "header", "missing"])
def test_bad_input_is_one_line_and_exit_status_2(tmp_path: Path, volume: tuple,
                                                 model_file: Path, problem: str,
                                                 capsys: pytest.CaptureFixture) -> None:
    image = volume[0]
    if problem == "time":
        target = write_nifti_file(tmp_path / "bold.nii.gz", image, channels=True,
                                  units=("mm", "msec"), step=2000.0)
        expected = "time series"
    elif problem == "shapes":
        write_case(tmp_path, "C7", image[:3])
        write_nifti_file(tmp_path / "C7_0003.nii.gz", image[3][:8])
        target, expected = tmp_path / "C7", "shape (48, 48, 8) but"
    elif problem == "header":
        target = tmp_path / "garbage.nii.gz"
        target.write_bytes(b"\x1f\x8b" + bytes(range(200)))
        expected = "garbage.nii.gz is not a readable image"
    else:
        write_case(tmp_path, "C8", image, indices=[0, 1, 3, 4])
        target, expected = tmp_path / "C8", "but no 0002"
    status = main(["run", str(target), "-o", str(tmp_path / "seg.nii.gz"), "--model",
                   str(model_file), "--device", "cpu", "--tile", "16"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("tilerseg: ") and expected in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "seg.nii.gz").exists()


# ---------------------------------------------------------------------------- writing


@pytest.fixture(scope="module")
def model() -> Any:
    import torch

    torch.manual_seed(0)
    return tilerseg.create_model("unet3d", depth=2, base_channels=4, in_channels=4,
                                 num_classes=3).eval()


def _run(image: Any, model: Any, out: Path, **kw: Any) -> Path:
    return tilerseg.segment_to_zarr(image, model, out, tile=16, device="cpu", workers=1, **kw)


def test_nifti_output_is_in_the_inputs_space(tmp_path: Path, volume: tuple, model: Any) -> None:
    from tilerseg.io.writers import decode_probabilities, open_output

    source = write_nifti_file(tmp_path / "BRATS_001.nii.gz", volume[0], channels=True)
    out = _run(str(source), model, tmp_path / "seg.nii.gz", output="both", keep_zarr=True)
    assert out == tmp_path / "seg.nii.gz"
    store = tmp_path / "seg.nii.gz.zarr"
    assert not (tmp_path / "seg.nii.gz.zarr.partial").exists()
    given, written = nib.load(source), nib.load(out)
    assert np.array_equal(written.affine, given.affine)
    assert np.array_equal(written.header.get_sform(), given.header.get_sform())
    assert np.array_equal(written.header.get_qform(), given.header.get_qform())
    assert (int(written.header["sform_code"]), int(written.header["qform_code"])) == (2, 1)
    assert written.shape == given.shape[:3] == (48, 48, 16)
    assert written.get_data_dtype() == np.uint8 and written.dataobj.slope == 1.0
    assert written.dataobj.inter == 0.0
    assert written.header.get_zooms() == given.header.get_zooms()[:3]
    result = open_output(store)
    labels = np.asarray(result["labels"][...])
    np.testing.assert_array_equal(np.asarray(written.dataobj), labels.transpose(2, 1, 0))
    assert len(np.unique(labels)) > 1  # an untrained model still draws some boundary
    assert result["attributes"]["input"]["space"]["sform_code"] == 2
    probs = nib.load(tmp_path / "seg_probabilities.nii.gz")
    assert probs.shape == (48, 48, 16, 3) and probs.get_data_dtype() == np.float32
    assert np.array_equal(probs.affine, given.affine)
    np.testing.assert_array_equal(
        np.asarray(probs.dataobj),
        decode_probabilities(np.asarray(result["probabilities"][...])).transpose(3, 2, 1, 0))
    # the NIfTI made again later from the kept store is the same
    again = tilerseg.io.nifti.write_nifti(store, tmp_path / "again.nii")
    np.testing.assert_array_equal(np.asarray(nib.load(again).dataobj),
                                  np.asarray(written.dataobj))
    assert np.array_equal(nib.load(again).affine, given.affine)


def test_nifti_output_of_another_format_has_a_diagonal_affine(tmp_path: Path, volume: tuple,
                                                              model: Any) -> None:
    out = _run(volume[0].astype(np.float32), model, tmp_path / "seg.nii", output="labels")
    written = nib.load(out)
    assert written.shape == (48, 48, 16) and np.array_equal(written.affine, np.eye(4))
    assert not (tmp_path / "seg_probabilities.nii").exists()
    assert not (tmp_path / "seg.nii.zarr").exists()  # the store is removed


def test_an_interrupted_nifti_run_resumes(tmp_path: Path, volume: tuple, model: Any) -> None:
    source = write_nifti_file(tmp_path / "case.nii", volume[0], channels=True)
    out = tmp_path / "seg.nii.gz"

    def stop(done: int, total: int) -> None:
        if done > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(str(source), model, out, output="labels", progress=stop)
    assert not out.exists() and (tmp_path / "seg.nii.gz.zarr.partial").is_dir()
    _run(str(source), model, out, output="labels", resume=True)
    reference = _run(str(source), model, tmp_path / "reference.nii.gz", output="labels")
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj),
                                  np.asarray(nib.load(reference).dataobj))
    assert not (tmp_path / "seg.nii.gz.zarr.partial").exists()


def test_cli_nifti_output_of_a_case_and_overwrite(tmp_path: Path, volume: tuple,
                                                  model_file: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    files = write_case(tmp_path / "imagesTs", "BRATS_101", volume[0])
    out = tmp_path / "seg.nii.gz"
    args = ["run", str(tmp_path / "imagesTs" / "BRATS_101"), "-o", str(out), "--model",
            str(model_file), "--device", "cpu", "--tile", "16", "--workers", "1"]
    assert main(args) == 0  # a NIfTI output holds labels by default
    printed = capsys.readouterr().out
    assert f"wrote {out} in" in printed
    assert np.array_equal(nib.load(out).affine, nib.load(files[0]).affine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imagesTs", "seg.nii.gz"]
    both = tmp_path / "both.nii.gz"
    assert main(args[:3] + [str(both)] + args[4:] + ["--output", "both"]) == 0
    assert f"wrote {both} and {tmp_path / 'both_probabilities.nii.gz'}" in capsys.readouterr().out
    assert nib.load(tmp_path / "both_probabilities.nii.gz").shape == (48, 48, 16, 3)
    assert np.array_equal(np.asarray(nib.load(both).dataobj), np.asarray(nib.load(out).dataobj))
    before = out.read_bytes()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists; pass --overwrite" in err
    assert main(args + ["--resume"]) == 0
    assert "is already complete" in capsys.readouterr().out
    # a refused run with --overwrite leaves the existing output as it was
    bold = write_nifti_file(tmp_path / "bold.nii.gz", volume[0], channels=True,
                            units=("mm", "sec"), step=2.0)
    assert main(["run", str(bold), "-o", str(out), "--overwrite", "--model", str(model_file),
                 "--device", "cpu"]) == 2
    assert "time series" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_cli_batch_over_a_folder_of_cases(tmp_path: Path, volume: tuple, model_file: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    from tilerseg.io.writers import open_output

    for i, case in enumerate(("BRATS_001", "BRATS_002")):
        write_case(tmp_path / "imagesTr", case, tumour((16, 32, 48), seed=i)[0])
    status = main(["batch", str(tmp_path / "imagesTr"), "-o", str(tmp_path / "out"),
                   "--model", str(model_file), "--device", "cpu", "--tile", "16",
                   "--workers", "1", "--output", "labels"])
    table = capsys.readouterr().out
    assert status == 0, table
    assert "2 images" in table and "2 written" in table
    for case in ("BRATS_001", "BRATS_002"):
        result = open_output(tmp_path / "out" / f"{case}.tilerseg.zarr")
        assert result["labels"].shape == (16, 32, 48)
        assert result["attributes"]["input"]["format"] == "nifti-case"
        assert result["attributes"]["input"]["space"]["shape"] == [48, 32, 16]


def test_a_2d_nifti_file_gives_2d_labels_and_4d_probabilities(tmp_path: Path) -> None:
    import torch

    plane = np.random.default_rng(1).integers(0, 200, (40, 36), dtype=np.uint8)  # (Y, X)
    affine = np.diag([0.5, 0.25, 2.0, 1.0])
    affine[:3, 3] = (10.0, -5.0, 3.0)
    nib.save(nib.Nifti1Image(plane.T.copy(), affine), tmp_path / "plane.nii")
    torch.manual_seed(0)
    model2d = tilerseg.create_model("unet", depth=1, base_channels=2)
    out = tilerseg.segment_to_zarr(str(tmp_path / "plane.nii"), model2d, tmp_path / "seg.nii",
                                   output="both", workers=1, device="cpu", keep_zarr=True)
    written = nib.load(out)
    assert written.shape == (36, 40) and np.array_equal(written.affine, nib.load(
        tmp_path / "plane.nii").affine)
    from tilerseg.io.writers import open_output

    labels = np.asarray(open_output(tmp_path / "seg.nii.zarr")["labels"][...])
    np.testing.assert_array_equal(np.asarray(written.dataobj), labels.T)
    probs = nib.load(tmp_path / "seg_probabilities.nii")
    assert probs.shape == (36, 40, 1, 2)
    assert open_image(tmp_path / "seg_probabilities.nii").axes == "CYX"


def test_a_case_identity_is_its_modality_files(tmp_path: Path, volume: tuple) -> None:
    """What resume compares: a case (by identifier or as a folder) changes with its files."""
    from tilerseg.engine.jobs import path_identity

    files = write_case(tmp_path / "one", "BRATS_007", volume[0])
    by_name = path_identity(str(tmp_path / "one" / "BRATS_007"))
    by_folder = path_identity(str(tmp_path / "one"))
    assert by_name["files"] == by_folder["files"] == len(files)
    assert by_name["size"] == sum(f.stat().st_size for f in files)
    write_nifti_file(files[1], volume[0][1] + 1)
    os.utime(files[1], ns=(by_name["mtime_ns"] + 10**9,) * 2)
    later = path_identity(str(tmp_path / "one" / "BRATS_007"))
    assert later["mtime_ns"] > by_name["mtime_ns"]


def test_resume_of_a_finished_nifti_output_checks_its_run(tmp_path: Path, volume: tuple,
                                                          model: Any) -> None:
    """The run's manifest travels in the labels file: --resume says complete only for
    the same run, and refuses a file another run (or another tool) wrote."""
    from tilerseg.io.nifti import run_manifest

    path = write_nifti_file(tmp_path / "case.nii.gz", volume[0], channels=True)
    out = tmp_path / "seg.nii.gz"
    tilerseg.segment_to_zarr(str(path), model, out, output="labels", tile=(16, 16, 16),
                             workers=1, backend="torch")
    manifest = run_manifest(out)
    assert manifest is not None and manifest["options"]["output"] == "labels"
    before = out.read_bytes()
    assert tilerseg.segment_to_zarr(str(path), model, out, output="labels", resume=True,
                                    tile=(16, 16, 16), workers=1, backend="torch") == out
    with pytest.raises(tilerseg.OutputError, match="exists from another run"):
        tilerseg.segment_to_zarr(str(path), model, out, output="labels", resume=True,
                                 tile=(16, 16, 16), workers=1, backend="torch",
                                 threshold=0.9)
    foreign = tmp_path / "foreign.nii.gz"
    write_nifti_file(foreign, volume[1])
    with pytest.raises(tilerseg.OutputError, match="not written by a tilerseg run"):
        tilerseg.segment_to_zarr(str(path), model, foreign, output="labels", resume=True,
                                 tile=(16, 16, 16), workers=1, backend="torch")
    assert out.read_bytes() == before

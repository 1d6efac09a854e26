"""The command line: run, info and demo; bad input is one line on stderr and exit status 2."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import tilerseg
from tilerseg.cli import main
from tilerseg.io.writers import open_output
from tilerseg.synthetic import membrane_image


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    image = membrane_image((200, 150), cell_size=25, seed=1)[0]
    tifffile.imwrite(d / "slide.tif", image, tile=(64, 64))
    torch.manual_seed(0)
    tilerseg.save_model(tilerseg.create_model("unet", depth=3, base_channels=2), d / "model.pt")
    return {"dir": d, "slide": d / "slide.tif", "model": d / "model.pt"}


def _run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    status = main(args)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_run_writes_ome_zarr_beside_the_input(files: dict, capsys: pytest.CaptureFixture) -> None:
    status, out, err = _run(["run", str(files["slide"]), "--model", str(files["model"]),
                             "--tile", "64", "--output", "both", "--device", "cpu"], capsys)
    assert status == 0, err
    path = files["dir"] / "slide.tilerseg.zarr"
    assert f"wrote {path}" in out
    result = open_output(path)
    assert result["probabilities"].shape == (2, 200, 150) and result["labels"].shape == (200, 150)
    assert result["attributes"]["model"]["source"] == str(files["model"])
    status, _, err = _run(["run", str(files["slide"]), "--model", str(files["model"])], capsys)
    assert status == 2 and "exists; pass --overwrite" in err


def test_info_describes_image_and_plan(files: dict, capsys: pytest.CaptureFixture) -> None:
    status, out, _ = _run(["info", str(files["slide"]), "--model", str(files["model"]),
                           "--tile", "64", "--device", "cpu"], capsys)
    assert status == 0
    assert "shape       (200, 150), axes 'YX', dtype uint8" in out
    assert "12 tiles of (64, 64) in a (4, 3) grid" in out
    assert "memory" in out and "output" in out


def test_info_on_a_stack_of_sections(tmp_path: Path, files: dict,
                                     capsys: pytest.CaptureFixture) -> None:
    for z in range(3):
        tifffile.imwrite(tmp_path / f"s{z}.tif", membrane_image((70, 90), seed=z)[0])
    status, out, err = _run(["info", str(tmp_path), "--model", str(files["model"]),
                             "--tile", "64", "--device", "cpu"], capsys)
    assert status == 0, err
    assert "axes 'ZYX'" in out and "12 tiles of (1, 64, 64) in a (3, 2, 2) grid" in out


def test_demo_segments_a_synthetic_slide_exactly(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    status, out, err = _run(["demo", "--size", "300", "--tile", "64", "--base-channels", "2",
                             "--device", "cpu", "--check", "--directory", str(tmp_path), "-q"],
                            capsys)
    assert status == 0, err
    deviation = float(out.split("in-memory run with 256-px tiles| = ")[1].split()[0])
    assert deviation <= 1e-4
    assert (tmp_path / "demo-slide.tif").is_file()
    assert (tmp_path / "demo-slide.tilerseg.zarr").is_dir()


def _bad_inputs(d: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments after `run`, expected message fragment)."""
    (d / "empty.tif").write_bytes(b"")
    whole = (d / "slide.tif").read_bytes()
    (d / "truncated.tif").write_bytes(whole[: len(whole) // 3])
    (d / "text.tif").write_text("this is not an image\n")
    (d / "notes.txt").write_text("hello\n")
    np.save(d / "complex.npy", np.zeros((50, 50), np.complex64))
    np.save(d / "five.npy", np.zeros((2, 1, 3, 40, 40), np.uint8))
    np.save(d / "six.npy", np.zeros((1, 1, 1, 1, 40, 40), np.uint8))
    nan = np.zeros((50, 50), np.float32)
    nan[10, 10] = np.nan
    np.save(d / "nan.npy", nan)
    inf = np.zeros((50, 50), np.float32)
    inf[-1, -1] = np.inf
    np.save(d / "inf.npy", inf)
    np.save(d / "rgb.npy", np.zeros((3, 50, 50), np.uint8))
    (d / "corrupt.pt").write_bytes(np.random.default_rng(0).bytes(2000))
    torch.save({"weights": torch.zeros(2)}, d / "foreign.pt")
    (d / "evil.pt").write_bytes(pickle.dumps(_Payload(d / "pwned"), protocol=2))
    slide, model = str(d / "slide.tif"), ["--model", str(d / "model.pt")]
    return {
        "missing": ([str(d / "nope.tif"), *model], "does not exist"),
        "empty": ([str(d / "empty.tif"), *model], "empty.tif"),
        "truncated": ([str(d / "truncated.tif"), *model], "truncated.tif"),
        "text as tif": ([str(d / "text.tif"), *model], "text.tif"),
        "unknown extension": ([str(d / "notes.txt"), *model], "notes.txt"),
        "complex": ([str(d / "complex.npy"), *model], "complex64"),
        "five dims": ([str(d / "five.npy"), *model], "five.npy"),
        "six dims": ([str(d / "six.npy"), *model], "six.npy"),
        "nan": ([str(d / "nan.npy"), *model], "NaN or Inf"),
        "inf": ([str(d / "inf.npy"), *model], "NaN or Inf"),
        "channels": ([str(d / "rgb.npy"), *model], "3 channel(s)"),
        "model missing": ([slide, "--model", str(d / "none.pt")], "does not exist"),
        "model corrupt": ([slide, "--model", str(d / "corrupt.pt")], "not a tilerseg model"),
        "model foreign": ([slide, "--model", str(d / "foreign.pt")], "not a tilerseg model"),
        "model pickle": ([slide, "--model", str(d / "evil.pt")], "not a tilerseg model"),
        "model name": ([slide, "--model", "resnet"], "does not exist"),
        "tile": ([slide, *model, "--tile", "100"], "tile=100 is not admissible"),
        "negative tile": ([slide, *model, "--tile", "-16"], "--tile '-16' must be one positive"),
        "tile per axis": ([slide, *model, "--tile", "64,64,64"], "expected a positive integer or 2"),
        "device": ([slide, *model, "--device", "tpu"], "device='tpu'"),
        "channel": ([slide, *model, "--channel", "a"], "--channel"),
        "channel index": ([slide, *model, "--channel", "2"], "channel=[2] is not available"),
        "level": ([slide, *model, "--level", "3"], "level"),
        "batch": ([slide, *model, "--batch-size", "0"], "--batch-size 0"),
    }


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _digest(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_bad_input_is_one_line_exit_2_and_damages_nothing(
    files: dict, capsys: pytest.CaptureFixture
) -> None:
    d = files["dir"]
    existing = d / "existing.zarr"
    assert main(["run", str(files["slide"]), "--model", str(files["model"]), "-o", str(existing),
                 "--tile", "64", "-q"]) == 0
    before = _digest(existing)
    for name, (args, fragment) in _bad_inputs(d).items():
        status, _, err = _run(["run", *args, "-o", str(existing), "--overwrite", "-q"], capsys)
        assert status == 2, (name, err)
        assert err.startswith("tilerseg: error: ") and err.count("\n") == 1, (name, err)
        assert fragment in err, (name, err)
        assert "Traceback" not in err
    assert not (d / "pwned").exists()
    assert _digest(existing) == before
    assert not [p for p in d.iterdir() if ".partial" in p.name]


def test_output_problems(files: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["run", str(files["slide"]), "--model", str(files["model"]), "-q"]
    # a missing folder is made, as mkdir -p would
    assert _run([*args, "-o", str(tmp_path / "no" / "such" / "out.zarr")], capsys)[0] == 0
    assert (tmp_path / "no" / "such" / "out.zarr" / "zarr.json").is_file()
    (tmp_path / "file").write_text("not a folder")
    status, _, err = _run([*args, "-o", str(tmp_path / "file" / "out.zarr")], capsys)
    assert status == 2 and err.count("\n") == 1
    assert "output directory" in err and "file" in err


def test_info_describes_an_image_the_model_cannot_take_as_it_is(
        tmp_path: Path, files: dict, capsys: pytest.CaptureFixture) -> None:
    """Three channels for a one-channel model: info still describes the image, and says
    why a run would be refused (the check belongs to run)."""
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((3, 64, 64), np.uint8),
                     photometric="minisblack", metadata={"axes": "CYX"})
    status, out, err = _run(["info", str(tmp_path / "rgb.tif"), "--model", str(files["model"])],
                            capsys)
    assert status == 0 and err == ""
    assert "shape       (3, 64, 64), axes 'CYX'" in out
    assert "refused as it is: image has 3 channel(s)" in out and "--channel" in out


def test_a_corrupt_slice_of_a_folder_is_named_in_one_line(
        tmp_path: Path, files: dict, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "slices"
    folder.mkdir()
    for k in range(3):
        tifffile.imwrite(folder / f"s{k}.tif", np.full((100, 90), 10 * k, np.uint8))
    with open(folder / "s1.tif", "r+b") as f:  # the middle slice cut short after its header
        f.truncate(300)
    status, _, err = _run(["run", f"{folder}/", "-o", str(tmp_path / "o.zarr"), "--model",
                           str(files["model"]), "-q"], capsys)
    assert status == 2 and err.count("\n") == 1, err
    assert "s1.tif" in err and "is not a readable image" in err


def test_process_exit_status_and_single_line() -> None:
    result = subprocess.run([sys.executable, "-m", "tilerseg", "run", "/no/such/slide.tif"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("tilerseg: error: ") and result.stderr.count("\n") == 1


def test_a_plain_run_prints_no_python_warning(files: dict, tmp_path: Path) -> None:
    """A first run (the OpenVINO network converted, not read from a cache) with every
    warning shown once (``-W default``; an unclosed file's ResourceWarning aside): stderr
    stays empty, and the network really ran on OpenVINO (TILERSEG_STRICT_RUNTIME)."""
    import os

    env = {**os.environ, "TILERSEG_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-W", "default", "-W", "ignore::ResourceWarning", "-m", "tilerseg",
         "run", str(files["slide"]), "-o", str(tmp_path / "o.zarr"), "--model",
         str(files["model"]), "--backend", "openvino", "-q"],
        capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert list((tmp_path / "cache" / "openvino").glob("*.xml"))  # converted in this run
    attrs = open_output(tmp_path / "o.zarr")["attributes"]
    assert attrs["runtime"]["engine"] == "openvino"


def test_synthetic_membranes_are_reproducible() -> None:
    a, mask = membrane_image((40, 50), seed=7)
    b, _ = membrane_image((40, 50), seed=7)
    np.testing.assert_array_equal(a, b)
    assert 0.5 < (mask == 255).mean() < 0.95
    volume, vmask = membrane_image((8, 30, 30), cell_size=12, seed=1)
    assert volume.shape == vmask.shape == (8, 30, 30)


def test_progress_bar_draws_tiles_rate_and_eta() -> None:
    import io

    from tilerseg.cli import ProgressBar

    stream = io.StringIO()
    bar = ProgressBar(stream, enabled=True)
    bar(1, 4)
    bar(4, 4)
    text = stream.getvalue()
    assert "1/4 tiles" in text and "4/4 tiles" in text and "tiles/s" in text and "ETA" in text
    assert text.endswith("\n")
    quiet = io.StringIO()
    ProgressBar(quiet, enabled=False)(1, 4)
    assert quiet.getvalue() == ""


def test_train_and_eval_refuse_bad_input_in_one_line(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    status, _, err = _run(["train", "--images", str(tmp_path / "empty"), "--masks",
                           str(tmp_path / "empty"), "-o", str(tmp_path / "run")], capsys)
    assert status == 2 and err.startswith("tilerseg: error: ") and err.count("\n") == 1
    assert "holds no images (TIFF, PNG" in err and not (tmp_path / "run").exists()
    status, _, err = _run(["eval", str(tmp_path / "missing.png"), str(tmp_path / "m.png")], capsys)
    assert status == 2 and err.count("\n") == 1

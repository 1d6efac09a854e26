"""bioimage.io's reference runtime, bioimageio.core, on the packages tilerseg exports: its
blockwise prediction equals ``tilerseg run`` everywhere, it refuses images it could not
tile exactly, and its own test (``bioimageio test``) passes for both weight formats.

bioimageio.core pins bioimageio.spec and fails with pydantic 2.14, so it runs in a side
environment of its own (tests/envs.py) with the CPU build of torch. The packages' state-dict
architecture is a source file inside the package, so that environment holds no tilerseg.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tilerseg
from tilerseg.cli import main
from tilerseg.synthetic import membrane_image

from tests.envs import run_in, side_env

pytest.importorskip("bioimageio.spec")

from tilerseg.bioimageio import export_bioimageio  # noqa: E402
from tilerseg.bioimageio.sizes import block_sizes  # noqa: E402

CORE = ["bioimageio.core==0.11.0", "pydantic<2.14", "torch==2.13.0"]
"""The side environment: bioimageio.core (which brings bioimageio.spec 0.5.12), a pydantic
it works with, and the CPU torch the test environment has."""

TOL = 1e-4

_SCRIPT = r"""
import json, sys
import numpy as np
import torch
from bioimageio.core import create_prediction_pipeline, load_description, predict, test_model

torch.set_num_threads(1)  # small blocks: threads only wait for each other on a busy machine

result = {}
for package, image, n, refused in json.loads(sys.argv[1]):
    descr = load_description(package)
    entry = result[package] = {}
    for weights in ("pytorch_state_dict", "torchscript"):
        summary = test_model(descr, weight_format=weights)
        entry[weights] = [summary.status, [f"{d.name}: {d.errors[:1]}" for d in summary.details
                                           if d.status == "failed"]]
        pipeline = create_prediction_pipeline(descr, weight_format=weights)
        out = predict(model=pipeline, inputs=np.load(image), blocksize_parameter=n)  # loads it
        np.save(f"{image[:-4]}-{weights}.npy", out.members["output"].data.to_numpy())
    try:
        predict(model=descr, inputs=np.load(refused), blocksize_parameter=n)
    except ValueError as exc:
        entry["refused"] = str(exc).splitlines()[0]
print("RESULT " + json.dumps(result))
"""


def _run(image: np.ndarray, package: Path, out: Path) -> np.ndarray:
    """``tilerseg run IMAGE --model PACKAGE``: the class probabilities."""
    import zarr

    np.save(out.with_suffix(".npy"), image)
    assert main(["run", str(out.with_suffix(".npy")), "--model", str(package), "-o", str(out),
                 "--dtype", "float32", "--backend", "torch", "--device", "cpu", "-q"]) == 0
    return zarr.open_array(str(out / "0"), mode="r")[:]


def test_bioimageio_core_tiles_the_package_exactly(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    python = side_env("bioimageio-core", CORE)
    cases = []
    # (depth, image, blocksize parameter, an image side bioimageio.core must refuse)
    # depth 2: halo = context = 20, blocks 44 + 4 n; depth 3: context 44, but the window
    # of an inner region reaches 4 px further on the far side: halo 48, blocks 104 + 8 n
    for depth, shape, n, refused in [(2, (1500, 1100), 30, (1500, 1098)),
                                     (3, (392, 312), 10, (390, 312))]:
        torch.manual_seed(depth)
        model = tilerseg.create_model("unet", depth=depth, base_channels=2).eval()
        g = tilerseg.models.model_geometry(model)
        assert [s.halo for s in block_sizes(g)] == [{2: 20, 3: 48}[depth]] * 2
        package = export_bioimageio(model, tmp_path / f"unet{depth}.zip", normalize="auto")
        image = membrane_image(shape, cell_size=16, seed=depth)[0]
        np.save(tmp_path / f"image{depth}.npy", image)
        np.save(tmp_path / f"refused{depth}.npy", image[:refused[0], :refused[1]])
        cases.append((str(package), str(tmp_path / f"image{depth}.npy"), n,
                      str(tmp_path / f"refused{depth}.npy")))
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # no request leaves the machine
    output = run_in(python, _SCRIPT, json.dumps(cases))
    result = json.loads(output.splitlines()[-1].removeprefix("RESULT "))
    for depth, (package, image, _, _) in zip((2, 3), cases):
        expected = _run(np.load(image), Path(package), tmp_path / f"run{depth}.zarr")
        for weights in ("pytorch_state_dict", "torchscript"):
            status, failed = result[package][weights]
            assert status == "passed", failed
            got = np.load(f"{image[:-4]}-{weights}.npy")
            assert got.shape == (1, *expected.shape)
            assert np.abs(got[0] - expected).max() <= TOL, (depth, weights)
        # sides that are no multiple of the pooling step: its last block would leave the grid
        assert "does not map to axes" in result[package]["refused"]

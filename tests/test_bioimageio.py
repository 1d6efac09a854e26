"""bioimage.io packages: export validates with bioimageio.spec, import reproduces the model,
foreign packages (written with bioimageio.spec's own classes) are tiled as they declare or
refused in one line."""

from __future__ import annotations

import json
import logging
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tilerseg
from tilerseg.cli import main
from tilerseg.errors import InvalidModelError
from tilerseg.synthetic import membrane_image

pytest.importorskip("bioimageio.spec")

from bioimageio.spec import load_description, save_bioimageio_package  # noqa: E402
from bioimageio.spec.model import v0_5 as bio  # noqa: E402

from tilerseg.bioimageio import export_bioimageio, is_package, load_bioimageio  # noqa: E402
from tilerseg.bioimageio.export import validate_package  # noqa: E402
from tilerseg.bioimageio.load import PackagedNetwork  # noqa: E402
from tilerseg.bioimageio.sizes import block_sizes  # noqa: E402
from tilerseg.geometry import ModelGeometry  # noqa: E402

TOL = 1e-5


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any HTTP request bioimageio.spec made would go to a closed local port and fail."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                 "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)


def _image(shape: tuple[int, ...] = (150, 130), seed: int = 3) -> np.ndarray:
    return membrane_image(shape, cell_size=16, seed=seed)[0]


def _segment(image: np.ndarray, model: nn.Module, **kwargs) -> np.ndarray:
    return tilerseg.segment(image, model, backend="torch", device="cpu", **kwargs)


# -- export -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unet_package(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = tilerseg.create_model("unet", depth=2, base_channels=2).eval()
    model.metadata = {"normalize": "auto", "classes": ["membrane", "cell interior"],
                      "threshold": 0.4, "validation": {"pixel_error": 0.25},
                      "training": {"normalization": {"dtypes": ["uint8"], "method": "range",
                                                     "low": 0.0, "high": 255.0}}}
    path = tmp_path_factory.mktemp("pkg") / "unet.zip"
    return model, export_bioimageio(model, path, authors=["A. Author"], license="MIT")


def test_exported_valid_unet_validates_and_declares_its_geometry(unet_package) -> None:
    model, path = unet_package
    assert validate_package(path) == "valid-format"
    summary = load_description(str(path), perform_io_checks=True).validation_summary
    assert summary.status == "valid-format", summary.format()
    descr = load_description(str(path), perform_io_checks=False)
    g = tilerseg.models.model_geometry(model)
    sizes = block_sizes(g)
    (inp,), (out,) = descr.inputs, descr.outputs
    for a, axis in enumerate(inp.axes[2:]):  # blocks, each output as large as its block
        assert (axis.size.min, axis.size.step) == (sizes[a].min, g.step[a])
        assert out.axes[2 + a].size.offset == 0
        assert out.axes[2 + a].halo == sizes[a].halo >= g.halo[a]
        assert (sizes[a].min - 2 * sizes[a].halo) % g.step[a] == 0 == 2 * sizes[a].halo % g.step[a]
    assert inp.pad.mode == "reflect"  # blocks at the border are mirrored, as tilerseg does
    assert [str(p.id) for p in inp.preprocessing] == ["ensure_dtype", "scale_linear",
                                                      "ensure_dtype"]
    assert inp.preprocessing[1].kwargs.gain == pytest.approx(1 / 255)
    assert str(inp.data.type) == "uint8"
    assert [str(p.id) for p in out.postprocessing][0] == "softmax"
    assert [str(n) for n in out.axes[1].channel_names] == ["membrane", "cell_interior"]
    assert [a.name for a in descr.authors] == ["A. Author"] and descr.license == "MIT"
    assert descr.weights.torchscript.parent == "pytorch_state_dict"
    names = zipfile.ZipFile(path).namelist()
    assert {"cover.png", "README.md", "test_input.npy", "test_output.npy",
            "tilerseg_network.py"} <= set(names)
    readme = zipfile.ZipFile(path).read("README.md").decode()
    assert "## Validation" in readme and "pixel_error" in readme
    # the test input is an image mirror-padded by the halo, the test output's centre
    # tilerseg's result for that image
    x = np.load(zipfile.ZipFile(path).open("test_input.npy"))
    y = np.load(zipfile.ZipFile(path).open("test_output.npy"))
    assert x.shape[2:] == y.shape[2:]
    centre = tuple(slice(s.halo, n - s.halo) for s, n in zip(sizes, x.shape[2:]))
    image = x[0, 0][centre]
    np.testing.assert_array_equal(x[0, 0], np.pad(image, sizes[0].halo, mode="reflect"))
    np.testing.assert_allclose(y[0][(slice(None), *centre)], _segment(image, model), atol=TOL)


@pytest.mark.parametrize("weights", [None, "torchscript"])
def test_import_reproduces_the_original_model_tiled(unet_package, weights) -> None:
    model, path = unet_package
    loaded = load_bioimageio(path, weights=weights)
    if weights is None:  # tilerseg's own package: the architecture rebuilt exactly
        assert type(loaded) is type(model) and loaded.config == model.config
        assert loaded.metadata["threshold"] == 0.4
    else:
        assert isinstance(loaded, PackagedNetwork)  # the blocks the package declares
        g = tilerseg.models.model_geometry(model)
        sizes = block_sizes(g)
        assert tilerseg.models.model_geometry(loaded) == ModelGeometry(
            2, 1, 2, g.step, tuple(s.min for s in sizes), (0, 0), tuple(s.halo for s in sizes))
    image = _image()
    expected = _segment(image, model, tile=32)  # 5 x 5 tiles
    got = _segment(image, loaded, tile=32)
    assert np.abs(got - expected).max() <= TOL
    assert np.abs(_segment(image, loaded, tile=64) - expected).max() <= TOL


def test_a_package_of_the_plain_network_still_loads(unet_package, tmp_path: Path) -> None:
    """Packages tilerseg wrote before it wrapped its networks for blocks: the network's own
    state dict with ``create_model`` as the architecture, outputs cropped by the network."""
    import yaml

    model, path = unet_package
    g = tilerseg.models.model_geometry(model)
    folder = tmp_path / "old"
    zipfile.ZipFile(path).extractall(folder)
    rdf = yaml.safe_load((folder / "rdf.yaml").read_text())
    torch.save(model.state_dict(), folder / "weights.pt")
    rdf["weights"] = {"pytorch_state_dict": {
        "source": "weights.pt", "pytorch_version": rdf["weights"]["torchscript"]["pytorch_version"],
        "architecture": {"import_from": "tilerseg.models.registry", "callable": "create_model",
                         "kwargs": {"name": "unet", **model.config}}}}
    (inp,), (out,) = rdf["inputs"], rdf["outputs"]
    del inp["pad"]
    for a, (i, o) in enumerate(zip(inp["axes"][2:], out["axes"][2:])):
        i["size"]["min"] = g.min_input[a]
        o["size"]["offset"] = -g.shrink[a]
        del o["halo"]
    (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf))
    loaded = load_bioimageio(folder)
    assert type(loaded) is type(model) and loaded.config == model.config
    image = _image()
    assert np.abs(_segment(image, loaded, tile=32) - _segment(image, model)).max() <= TOL


class _MyUNet(tilerseg.UNet):
    """An architecture registered outside tilerseg: no source a package can carry."""


def test_a_model_registered_elsewhere_imports_its_architecture_from_tilerseg(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tilerseg.bioimageio.network import TiledNetwork
    from tilerseg.models import registry

    monkeypatch.setitem(registry._REGISTRY, "my-unet", lambda **config: _MyUNet(**config))
    torch.manual_seed(8)
    model = tilerseg.create_model("my-unet", depth=2, base_channels=2).eval()
    path = export_bioimageio(model, tmp_path / "my.zip", normalize="auto")
    assert validate_package(path) == "valid-format"
    assert "tilerseg_network.py" not in zipfile.ZipFile(path).namelist()
    entry = load_description(str(path), perform_io_checks=False).weights.pytorch_state_dict
    arch = entry.architecture
    assert (arch.import_from, str(arch.callable)) == ("tilerseg.bioimageio.network",
                                                      "TiledNetwork")
    network = TiledNetwork(**arch.kwargs)  # what bioimageio.core builds: the registered model
    network.load_state_dict(torch.load(zipfile.ZipFile(path).open("weights.pt")))
    assert type(network.network) is _MyUNet
    loaded = load_bioimageio(path)
    assert type(loaded) is _MyUNet and loaded.config == model.config
    image = _image()
    assert np.abs(_segment(image, loaded, tile=32) - _segment(image, model)).max() <= TOL


def test_same_padded_network_declares_its_halo_to_crop(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = tilerseg.create_model("unet-keras", depth=2, base_channels=2, dropout=0.0).eval()
    path = export_bioimageio(model, tmp_path / "keras.zip", test_size=48, normalize="auto")
    assert validate_package(path) == "valid-format"
    g = tilerseg.models.model_geometry(model)
    out = load_description(str(path), perform_io_checks=False).outputs[0]
    assert [str(p.id) for p in out.postprocessing][0] == "sigmoid"
    for a, axis in enumerate(out.axes[2:]):
        assert axis.size.offset == 0 and axis.halo == g.halo[a] > 0
    loaded = load_bioimageio(path, weights="torchscript")
    lg = tilerseg.models.model_geometry(loaded)
    assert (lg.halo, lg.step, lg.shrink) == (g.halo, g.step, g.shrink)
    image = _image((120, 100))
    expected = _segment(image, model, tile=32)
    assert np.abs(_segment(image, loaded, tile=32) - expected).max() <= TOL


def test_3d_model_exports_with_three_parameterized_axes(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = tilerseg.create_model("unet3d", depth=1, base_channels=2).eval()
    path = export_bioimageio(model, tmp_path / "u3d.zip", test_size=8, normalize="auto")
    assert validate_package(path) == "valid-format"
    g = tilerseg.models.model_geometry(model)
    inp = load_description(str(path), perform_io_checks=False).inputs[0]
    assert [str(a.id) for a in inp.axes[2:]] == ["z", "y", "x"]
    assert [(a.size.min, a.size.step) for a in inp.axes[2:]] == [(s.min, s.step)
                                                                   for s in block_sizes(g)]
    loaded = load_bioimageio(path, weights="torchscript")
    assert tilerseg.models.model_geometry(loaded).halo == tuple(s.halo for s in block_sizes(g))
    volume = membrane_image((20, 30, 26), cell_size=10, seed=1)[0]
    expected = _segment(volume, model, tile=8)
    for weights in (None, "torchscript"):
        got = _segment(volume, load_bioimageio(path, weights=weights), tile=16)
        assert np.abs(got - expected).max() <= TOL


@pytest.mark.parametrize("name, config", [
    ("unetpp", {"depth": 2, "base_channels": 2}),
    ("fcn8s", {"base_channels": 2, "fc_channels": 4, "dropout": 0.0})])
def test_unetpp_and_fcn8s_export_and_import_exactly(tmp_path: Path, name, config) -> None:
    torch.manual_seed(11)
    model = tilerseg.create_model(name, **config).eval()
    path = export_bioimageio(model, tmp_path / f"{name}.zip", normalize="auto")
    assert validate_package(path) == "valid-format"
    image = _image((97, 83))
    expected = _segment(image, model, tile=64)
    for weights in (None, "torchscript"):
        loaded = load_bioimageio(path, weights=weights)
        assert np.abs(_segment(image, loaded, tile=32) - expected).max() <= TOL


def test_bundled_model_exports_and_validates(tmp_path: Path) -> None:
    model = tilerseg.load_model()
    path = export_bioimageio(model, tmp_path / "isbi.zip")
    assert validate_package(path) == "valid-format"
    assert "pixel_error" in zipfile.ZipFile(path).read("README.md").decode()


# -- foreign packages, written with bioimageio.spec's own classes ------------------------------


class _Net(nn.Module):
    """Two 3x3 convolutions: ``pad=1`` keeps the size (radius 2), ``pad=0`` crops 2 px."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.a = nn.Conv2d(1, 3, 3, padding=pad)
        self.b = nn.Conv2d(3, 1, 3, padding=pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _foreign(tmp_path: Path, *, pad: int = 1, halo: int = 0, preprocessing=None,
             postprocessing=None, axes=None, name: str = "foreign.zip",
             weights=None, net=None, out_range=None) -> Path:
    """A package of :class:`_Net` (TorchScript) as another tool would write it."""
    net = (net or _Net(pad)).eval()
    side = 32
    x = np.random.default_rng(0).integers(0, 4096, (1, 1, side, side)).astype(np.float32)
    with torch.no_grad():
        y = torch.sigmoid(net(torch.from_numpy(x / 4096))).numpy()
    np.save(tmp_path / "in.npy", x if axes is None or len(axes) == 4 else x[:, None])
    np.save(tmp_path / "out.npy", y)
    torch.jit.save(torch.jit.script(net), str(tmp_path / "net.pt"))
    tensor = bio.TensorId("raw")
    in_axes = axes or [bio.BatchAxis(), bio.ChannelAxis(channel_names=[bio.Identifier("c")]),
                       *(bio.SpaceInputAxis(id=bio.AxisId(a),
                                            size=bio.ParameterizedSize(min=16, step=4))
                         for a in "yx")]
    out_axes = [bio.BatchAxis(), bio.ChannelAxis(channel_names=[bio.Identifier("fg")])]
    for a in "yx":
        ref = bio.SizeReference(tensor_id=tensor, axis_id=bio.AxisId(a), offset=4 * pad - 4)
        out_axes.append(bio.SpaceOutputAxisWithHalo(id=bio.AxisId(a), size=ref, halo=halo)
                        if halo else bio.SpaceOutputAxis(id=bio.AxisId(a), size=ref))
    if preprocessing is None:
        preprocessing = [bio.ScaleLinearDescr(kwargs=bio.ScaleLinearKwargs(gain=1 / 4096))]
    if postprocessing is None:
        postprocessing = [bio.SigmoidDescr()]
    descr = bio.ModelDescr(
        name="foreign net", description="two convolutions",
        authors=[bio.Author(name="Someone")], cite=[bio.CiteEntry(text="x", doi=bio.Doi(
            "10.1007/978-3-319-24574-4_28"))], license="MIT",
        documentation=bio.FileDescr(source=_readme(tmp_path)),
        inputs=[bio.InputTensorDescr(
            id=tensor, axes=in_axes, test_tensor=bio.FileDescr(source=tmp_path / "in.npy"),
            data=bio.IntervalOrRatioDataDescr(type="float32"), preprocessing=preprocessing)],
        outputs=[bio.OutputTensorDescr(
            id=bio.TensorId("prob"), axes=out_axes,
            test_tensor=bio.FileDescr(source=tmp_path / "out.npy"),
            data=bio.IntervalOrRatioDataDescr(type="float32", range=out_range or (None, None)),
            postprocessing=postprocessing)],
        weights=weights or bio.WeightsDescr(torchscript=bio.TorchscriptWeightsDescr(
            source=tmp_path / "net.pt", pytorch_version=bio.Version("2.0"))))
    return save_bioimageio_package(descr, output_path=tmp_path / name)


def _readme(tmp_path: Path) -> Path:
    path = tmp_path / "README.md"
    path.write_text("# foreign net\n\n## Validation\n\nnone\n")
    return path


def _reference(image: np.ndarray, low: float, high: float, pad: int, halo: int) -> np.ndarray:
    """The network once over the whole image, mirror-padded by ``halo`` (independent)."""
    net = _Net(pad).eval()
    x = (image.astype(np.float32) - np.float32(low)) / np.float32(high - low)
    context = halo + 2 * (1 - pad)  # what the network crops itself plus the halo to crop
    x = np.pad(x, context, mode="reflect")
    with torch.no_grad():
        y = torch.sigmoid(net(torch.from_numpy(x)[None, None]))[0, 0].numpy()
    crop = halo
    return y[crop:y.shape[0] - crop, crop:y.shape[1] - crop]


def test_foreign_package_without_halo_is_refused_with_an_explanation(tmp_path: Path,
                                                                     capsys) -> None:
    path = _foreign(tmp_path)
    assert is_package(path)
    with pytest.raises(InvalidModelError, match="declares no halo for axes y, x") as err:
        load_bioimageio(path)
    assert "could not be exact at their borders" in str(err.value)
    assert "halo=N" in str(err.value)
    image = np.random.default_rng(1).integers(0, 4096, (70, 60)).astype(np.uint16)
    np.save(tmp_path / "img.npy", image)
    assert main(["run", str(tmp_path / "img.npy"), "--model", str(path), "-o",
                 str(tmp_path / "out.zarr"), "-q"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tilerseg: error: ")
    assert "declares no halo" in lines[0]
    assert not (tmp_path / "out.zarr").exists()
    # given the context it needs (its receptive-field radius, 2), it is tiled exactly
    model = load_bioimageio(path, halo=2)
    got = _segment(image, model, tile=16)
    assert np.abs(got[0] - _reference(image, 0, 4096, pad=1, halo=2)[:70, :60]).max() <= TOL


def test_foreign_valid_package_with_scale_range_is_normalised_globally(tmp_path: Path,
                                                                       caplog) -> None:
    steps = [bio.ScaleRangeDescr(kwargs=bio.ScaleRangeKwargs(min_percentile=1,
                                                             max_percentile=99))]
    path = _foreign(tmp_path, pad=0, preprocessing=steps)
    assert load_description(str(path), perform_io_checks=True).validation_summary.status \
        == "valid-format"
    with caplog.at_level(logging.WARNING, logger="tilerseg.bioimageio"):
        model = load_bioimageio(path)
    assert "computes its statistics once over the image" in caplog.text
    assert model.metadata["normalize"] == "percentile:1:99"
    g = tilerseg.models.model_geometry(model)
    assert (g.shrink, g.halo, g.step) == ((4, 4), (2, 2), (4, 4))
    image = np.random.default_rng(2).integers(0, 4096, (90, 75)).astype(np.uint16)
    low, high = np.percentile(image, (1, 99))
    got = _segment(image, model, tile=16)
    explicit = _segment(image, model, tile=16, normalize=(float(low), float(high)))
    np.testing.assert_array_equal(got, explicit)
    assert np.abs(got[0] - _reference(image, low, high, pad=0, halo=0)).max() <= TOL


def test_foreign_package_runs_and_resumes_from_the_command_line(tmp_path: Path,
                                                                capsys) -> None:
    steps = [bio.ZeroMeanUnitVarianceDescr(kwargs=bio.ZeroMeanUnitVarianceKwargs())]
    path = _foreign(tmp_path, pad=0, preprocessing=steps)
    image = np.random.default_rng(3).integers(0, 4096, (80, 70)).astype(np.uint16)
    np.save(tmp_path / "img.npy", image)
    out = tmp_path / "out.zarr"
    args = ["run", str(tmp_path / "img.npy"), "--model", str(path), "-o", str(out),
            "--tile", "32", "--backend", "torch", "-q"]
    assert main(args) == 0
    attrs = json.loads((out / "zarr.json").read_text())["attributes"]["tilerseg"]
    norm = attrs["normalization"]
    assert norm["method"] == "meanstd"
    assert norm["low"] == pytest.approx(image.mean())
    assert norm["high"] - norm["low"] == pytest.approx(image.std())
    capsys.readouterr()
    assert main([*args[:-1], "--resume"]) == 0  # the same package: the same run
    assert "already complete" in capsys.readouterr().out
    assert main(["status", str(out)]) == 0
    assert re.search(r"^model +bioimage\.io package 'foreign net' [0-9a-f]{12} \(",
                     capsys.readouterr().out, re.M)


@pytest.mark.parametrize("case, message", [
    ("binarize", "postprocessing [binarize]"),
    ("clip", "preprocessing clip is not supported"),
    ("time", "of type time is not supported"),
    ("fixed", "tilerseg tiles inputs of a parameterized size"),
])
def test_unsupported_packages_are_refused_in_one_line(tmp_path: Path, capsys, case,
                                                      message) -> None:
    kwargs: dict = {}
    if case == "binarize":
        kwargs["postprocessing"] = [bio.BinarizeDescr(kwargs=bio.BinarizeKwargs(threshold=0.5))]
    elif case == "clip":
        kwargs["preprocessing"] = [bio.ClipDescr(kwargs=bio.ClipKwargs(min=0, max=1))]
    elif case == "time":
        kwargs["axes"] = [bio.BatchAxis(), bio.TimeInputAxis(size=1),
                          bio.ChannelAxis(channel_names=[bio.Identifier("c")]),
                          *(bio.SpaceInputAxis(id=bio.AxisId(a),
                                               size=bio.ParameterizedSize(min=16, step=4))
                            for a in "yx")]
    elif case == "fixed":
        kwargs["axes"] = [bio.BatchAxis(), bio.ChannelAxis(channel_names=[bio.Identifier("c")]),
                          *(bio.SpaceInputAxis(id=bio.AxisId(a), size=32) for a in "yx")]
    path = _foreign(tmp_path, pad=0, **kwargs)
    with pytest.raises(InvalidModelError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_bioimageio(path)
    np.save(tmp_path / "img.npy", np.zeros((40, 40), np.float32))
    assert main(["run", str(tmp_path / "img.npy"), "--model", str(path), "-o",
                 str(tmp_path / "o.zarr"), "-q"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tilerseg: error: ") and message in lines[0]


# -- command line -----------------------------------------------------------------------------


def test_cli_exports_a_model_file_that_runs_like_the_original(tmp_path: Path, capsys) -> None:
    torch.manual_seed(4)
    model = tilerseg.create_model("unet", depth=2, base_channels=2)
    tilerseg.save_model(model, tmp_path / "m.pt", metadata={"normalize": "auto"})
    package = tmp_path / "m.zip"
    assert main(["export", str(tmp_path / "m.pt"), "-o", str(package), "--format",
                 "bioimageio", "--author", "A", "--author", "B", "--license", "MIT",
                 "--name", "tiny unet", "--test-size", "50", "--normalize", "auto"]) == 0
    assert "bioimageio.spec validation: valid-format" in capsys.readouterr().out
    descr = load_description(str(package), perform_io_checks=False)
    assert descr.name == "tiny unet" and [a.name for a in descr.authors] == ["A", "B"]
    assert descr.inputs[0].test_tensor is not None
    assert main(["export", str(tmp_path / "m.pt"), "-o", str(package)]) == 2  # exists
    assert "exists" in capsys.readouterr().err
    image = _image((90, 100))
    np.save(tmp_path / "img.npy", image)
    for name, spec in (("a", tmp_path / "m.pt"), ("b", package)):
        assert main(["run", str(tmp_path / "img.npy"), "--model", str(spec), "-o",
                     str(tmp_path / f"{name}.zarr"), "--tile", "32", "--dtype", "float32",
                     "--backend", "torch", "-q"]) == 0
    import zarr

    a = zarr.open_array(str(tmp_path / "a.zarr" / "0"), mode="r")[:]
    b = zarr.open_array(str(tmp_path / "b.zarr" / "0"), mode="r")[:]
    assert np.abs(a - b).max() <= TOL


def _state_dict_weights(tmp_path: Path, import_from: str, callable_: str,
                        kwargs: dict) -> object:
    conv = nn.Conv2d(1, 1, 5)
    torch.manual_seed(6)
    nn.init.normal_(conv.weight)
    torch.save(conv.state_dict(), tmp_path / "sd.pt")
    return bio.WeightsDescr(pytorch_state_dict=bio.PytorchStateDictWeightsDescr(
        source=tmp_path / "sd.pt", pytorch_version=bio.Version("2.0"),
        architecture=bio.ArchitectureFromLibraryDescr(
            import_from=import_from, callable=bio.Identifier(callable_), kwargs=kwargs)))


def test_foreign_state_dict_of_a_library_module_runs_exactly(tmp_path: Path) -> None:
    weights = _state_dict_weights(tmp_path, "torch.nn", "Conv2d",
                                  {"in_channels": 1, "out_channels": 1, "kernel_size": 5})
    # one 5x5 convolution crops 4 px; the two-conv test tensors do not matter to tilerseg
    path = _foreign(tmp_path, pad=0, weights=weights, name="sd.zip")
    model = load_bioimageio(path)
    assert isinstance(model.network, nn.Conv2d)
    g = tilerseg.models.model_geometry(model)
    assert (g.shrink, g.halo) == ((4, 4), (2, 2))
    image = np.random.default_rng(4).integers(0, 4096, (50, 45)).astype(np.float32)
    conv = nn.Conv2d(1, 1, 5)
    conv.load_state_dict(torch.load(tmp_path / "sd.pt"))
    x = np.pad(image / np.float32(4096), 2, mode="reflect")
    with torch.no_grad():
        expected = torch.sigmoid(conv(torch.from_numpy(x)[None, None]))[0].numpy()
    assert np.abs(_segment(image, model, tile=16) - expected).max() <= TOL


def test_foreign_architecture_that_is_no_module_class_is_never_called(tmp_path: Path) -> None:
    marker = tmp_path / "called"
    weights = _state_dict_weights(tmp_path, "subprocess", "run",
                                  {"args": ["touch", str(marker)]})
    path = _foreign(tmp_path, pad=0, weights=weights, name="evil.zip")
    with pytest.raises(InvalidModelError, match="subprocess.run is not a torch.nn.Module class"):
        load_bioimageio(path)
    assert not marker.exists()


def test_foreign_network_with_its_own_sigmoid_keeps_its_probabilities(tmp_path: Path) -> None:
    net = nn.Sequential(_Net(0), nn.Sigmoid())
    path = _foreign(tmp_path, pad=0, net=net, postprocessing=[], out_range=(0.0, 1.0))
    model = load_bioimageio(path)
    image = np.random.default_rng(5).integers(0, 4096, (40, 36)).astype(np.float32)
    x = np.pad(image / np.float32(4096), 2, mode="reflect")
    with torch.no_grad():
        expected = net(torch.from_numpy(x)[None, None])[0].numpy()
    assert np.abs(_segment(image, model, tile=16) - expected).max() <= TOL
    # without the declared [0, 1] range its outputs could be anything: refused
    other = _foreign(tmp_path, pad=0, net=net, postprocessing=[], name="raw.zip")
    with pytest.raises(InvalidModelError, match=r"postprocessing \[none\] with 1 channel"):
        load_bioimageio(other)


_RDF_04 = """format_version: 0.4.10
type: model
name: v04 net
description: a package in format 0.4
authors: [{name: Someone}]
cite: [{text: x, doi: 10.1007/978-3-319-24574-4_28}]
license: MIT
documentation: README.md
timestamp: 2024-01-01T00:00:00
test_inputs: [in.npy]
test_outputs: [out.npy]
inputs:
  - name: raw
    axes: bcyx
    data_type: float32
    data_range: [-.inf, .inf]
    shape: {min: [1, 1, 16, 16], step: [0, 0, 4, 4]}
    preprocessing:
      - name: zero_mean_unit_variance
        kwargs: {mode: fixed, axes: xy, mean: 10.0, std: 2.0}
outputs:
  - name: prob
    axes: bcyx
    data_type: float32
    data_range: [0, 1]
    shape: {reference_tensor: raw, scale: [1, 1, 1, 1], offset: [0, 0, 0, 0]}
    halo: [0, 0, 2, 2]
    postprocessing:
      - name: sigmoid
weights:
  torchscript:
    source: net.pt
    pytorch_version: "2.0"
"""


def test_format_04_folder_with_fixed_statistics_and_halo(tmp_path: Path) -> None:
    net = _Net(1).eval()
    torch.jit.save(torch.jit.script(net), str(tmp_path / "net.pt"))
    x = np.random.default_rng(0).normal(10, 2, (1, 1, 32, 32)).astype(np.float32)
    with torch.no_grad():
        np.save(tmp_path / "out.npy", torch.sigmoid(net(torch.from_numpy((x - 10) / 2))).numpy())
    np.save(tmp_path / "in.npy", x)
    (tmp_path / "README.md").write_text("# v04 net\n")
    (tmp_path / "rdf.yaml").write_text(_RDF_04)
    assert load_description(str(tmp_path / "rdf.yaml"), perform_io_checks=True
                            ).validation_summary.status == "valid-format"
    assert is_package(tmp_path)
    model = load_bioimageio(tmp_path)  # the folder; converted to 0.5 by bioimageio.spec
    assert model.metadata["normalize"] == [10.0, 12.0]  # (x - 10) / 2
    assert tilerseg.models.model_geometry(model).halo == (2, 2)
    image = np.random.default_rng(1).normal(10, 2, (60, 50)).astype(np.float32)
    expected = _reference(image, 10, 12, pad=1, halo=2)
    assert np.abs(_segment(image, model, tile=16)[0] - expected).max() <= TOL


def test_without_the_extra_the_error_names_it(tmp_path: Path, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "bioimageio.spec", None)  # import fails
    with pytest.raises(InvalidModelError, match=r'pip install "tilerseg\[bioimageio\]"'):
        load_bioimageio(tmp_path / "rdf.yaml")
    with pytest.raises(InvalidModelError, match=r'pip install "tilerseg\[bioimageio\]"'):
        export_bioimageio(tilerseg.create_model(base_channels=2, depth=2), tmp_path / "m.zip",
                          normalize="auto")
    assert not (tmp_path / "m.zip").exists()


# -- review fixes -----------------------------------------------------------------------------


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tilerseg: error: "), lines
    return lines[0]


def _unpacked(package: Path, folder: Path) -> Path:
    with zipfile.ZipFile(package) as z:
        z.extractall(folder)
    return folder


@pytest.mark.parametrize("module", ["evil_arch", "this"])
def test_a_module_a_package_names_is_never_imported(tmp_path: Path, monkeypatch, capsys,
                                                    module) -> None:
    import sys

    build, marker = tmp_path / "build", tmp_path / "ran"
    build.mkdir()
    weights = _state_dict_weights(build, module, "Net", {})
    folder = _unpacked(_foreign(build, pad=0, weights=weights, name="evil.zip"), tmp_path / "pkg")
    (folder / "evil_arch.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nimport torch\nNet = torch.nn.Identity\n")
    monkeypatch.chdir(folder)  # the package's folder is the current one, and on sys.path
    monkeypatch.syspath_prepend(str(folder))
    was_imported = module in sys.modules
    with pytest.raises(InvalidModelError, match=f"{module}.Net is not a torch.nn.Module class "
                       "of torch or tilerseg") as err:
        load_bioimageio("rdf.yaml")
    assert "\n" not in str(err.value)
    np.save(tmp_path / "img.npy", np.zeros((40, 40), np.float32))
    assert main(["run", str(tmp_path / "img.npy"), "--model", "rdf.yaml", "-o",
                 str(tmp_path / "o.zarr"), "-q"]) == 2
    assert "is not a torch.nn.Module class" in _one_error_line(capsys)
    assert not marker.exists()
    assert (module in sys.modules) == was_imported


def test_only_modules_inside_torch_are_imported(tmp_path: Path) -> None:
    weights = _state_dict_weights(tmp_path, "torch.no_such_module", "Conv2d", {})
    path = _foreign(tmp_path, pad=0, weights=weights, name="sd.zip")
    with pytest.raises(InvalidModelError, match="no module torch.no_such_module"):
        load_bioimageio(path)


def _window_model() -> nn.Module:
    torch.manual_seed(7)
    model = tilerseg.create_model("unet", depth=2, base_channels=2).eval()
    model.metadata = {"normalize": ["window", 40, 400]}
    return model


def test_a_display_window_exports_as_scale_and_clip_and_imports_as_the_window(
        tmp_path: Path, capsys) -> None:
    model = _window_model()
    tilerseg.save_model(model, tmp_path / "win.pt", metadata=model.metadata)
    assert main(["export", str(tmp_path / "win.pt"), "-o", str(tmp_path / "win.zip"),
                 "-q"]) == 0
    path = tmp_path / "win.zip"
    inp = load_description(str(path), perform_io_checks=False).inputs[0]
    assert [str(p.id) for p in inp.preprocessing] == ["ensure_dtype", "scale_linear", "clip",
                                                      "ensure_dtype"]
    assert inp.preprocessing[1].kwargs.gain == pytest.approx(1 / 400)
    assert inp.preprocessing[1].kwargs.offset == pytest.approx(160 / 400)  # -(40 - 200) / 400
    assert (inp.preprocessing[2].kwargs.min, inp.preprocessing[2].kwargs.max) == (0, 1)
    loaded = load_bioimageio(path, weights="torchscript")
    assert loaded.metadata["normalize"] == pytest.approx(["window", 40.0, 400.0])
    image = np.random.default_rng(8).integers(-1000, 1000, (70, 60)).astype(np.int16)
    # the reference: the window applied by hand, the original model on the result as it is
    windowed = np.clip((image.astype(np.float32) + 160) / 400, 0, 1)
    expected = _segment(windowed, model, tile=64, normalize="none")
    for weights in (None, "torchscript"):
        got = _segment(image, load_bioimageio(path, weights=weights), tile=32)
        assert np.abs(got - expected).max() <= TOL


@pytest.mark.parametrize("normalize, message", [
    (("window", "dicom"), "the image's own window"),
    ("range", "normalize='range' scales by the image's dtype"),
    ("sometimes", "cannot be exported"),
])
def test_normalisations_a_package_cannot_state_are_refused(tmp_path: Path, normalize,
                                                           message) -> None:
    from tilerseg.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match=message.replace("(", r"\(")):
        export_bioimageio(_window_model(), tmp_path / "x.zip", normalize=normalize)
    assert not (tmp_path / "x.zip").exists()


@pytest.mark.parametrize("option, value, field", [
    ("--name", "ab", "name"), ("--license", "NOT-A-LICENSE", "license")])
def test_invalid_descriptive_fields_are_refused_in_one_line(tmp_path: Path, capsys, option,
                                                            value, field) -> None:
    from tilerseg.errors import InvalidArgumentError

    model = tilerseg.create_model("unet", depth=2, base_channels=2)
    tilerseg.save_model(model, tmp_path / "m.pt", metadata={"normalize": "none"})
    assert main(["export", str(tmp_path / "m.pt"), "-o", str(tmp_path / "m.zip"),
                 option, value]) == 2
    line = _one_error_line(capsys)
    assert f"{field} {value!r} is not accepted by bioimage.io" in line
    assert not (tmp_path / "m.zip").exists()
    model.metadata = {"normalize": "none", field: value}  # from the model's metadata too
    with pytest.raises(InvalidArgumentError, match=f"{field} {value!r} is not accepted"):
        export_bioimageio(model, tmp_path / "m.zip")


def test_auto_exports_as_8_bit_only_for_a_model_trained_on_8_bit_images(tmp_path: Path,
                                                                        capsys) -> None:
    import tifffile

    from tilerseg.errors import InvalidArgumentError
    from tilerseg.train import TrainConfig, load_pairs, train

    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    for k in range(2):
        image, mask = membrane_image((64, 64), cell_size=16, seed=k)
        tifffile.imwrite(tmp_path / "images" / f"{k}.tif", image)
        tifffile.imwrite(tmp_path / "masks" / f"{k}.tif", mask)
    pairs = load_pairs(tmp_path / "images", tmp_path / "masks")
    assert pairs[0].image.dtype == np.uint8
    wide = [type(p)(p.name, p.image.astype(np.uint16) * 257, p.mask) for p in pairs]
    config = TrainConfig(model={"name": "unet", "depth": 2, "base_channels": 2}, epochs=1,
                         steps_per_epoch=1, batch_size=1, window=44, elastic=False)
    for name, data in (("8bit", pairs), ("16bit", wide)):
        train(data, tmp_path / name, config)
    eight = tilerseg.load_model(tmp_path / "8bit" / "last.pt")
    assert eight.metadata["training"]["normalization"] == {
        "dtypes": ["uint8"], "method": "range", "low": 0.0, "high": 255.0}
    path = export_bioimageio(eight, tmp_path / "8.zip")
    assert str(load_description(str(path), perform_io_checks=False).inputs[0].data.type) \
        == "uint8"
    sixteen = tilerseg.load_model(tmp_path / "16bit" / "last.pt")
    assert sixteen.metadata["training"]["normalization"]["dtypes"] == ["uint16"]
    with pytest.raises(InvalidArgumentError, match="training data were uint16 images"):
        export_bioimageio(sixteen, tmp_path / "16.zip")
    args = ["export", str(tmp_path / "16bit" / "last.pt"), "-o", str(tmp_path / "16.zip")]
    assert main(args) == 2
    line = _one_error_line(capsys)
    assert "pass --normalize (CLI) / normalize= (Python): percentile" in line
    assert "window:CENTRE,WIDTH" in line and "8-bit" not in line and "auto (" not in line
    assert not (tmp_path / "16.zip").exists()
    assert main([*args, "--normalize", "percentile", "-q"]) == 0  # tilerseg's auto for uint16
    steps = load_description(str(tmp_path / "16.zip"), perform_io_checks=False
                             ).inputs[0].preprocessing
    assert [str(s.id) for s in steps] == ["ensure_dtype", "scale_range", "ensure_dtype"]
    # a model that records nothing of its training data is refused too
    with pytest.raises(InvalidArgumentError, match="states no normalisation"):
        export_bioimageio(tilerseg.create_model(base_channels=2, depth=2), tmp_path / "n.zip")
    # 8-bit (and so 'auto') is offered only for a model trained on 8-bit images
    stretched = tilerseg.create_model(base_channels=2, depth=2)
    stretched.metadata = {"normalize": "auto", "training": {"normalization": {
        "dtypes": ["uint8"], "method": "percentile", "low": 1.0, "high": 99.0}}}
    with pytest.raises(InvalidArgumentError, match=r"none or auto \(its 8-bit input"):
        export_bioimageio(stretched, tmp_path / "p.zip")


def test_bundled_model_records_its_8_bit_training_data() -> None:
    record = tilerseg.load_model().metadata["training"]["normalization"]
    assert record == {"dtypes": ["uint8"], "method": "range", "low": 0.0, "high": 255.0}


def test_an_image_of_another_dtype_than_a_fixed_scaled_package_declares_is_refused(
        unet_package, tmp_path: Path, capsys) -> None:
    from tilerseg.errors import InvalidImageError

    model, path = unet_package
    loaded = load_bioimageio(path, weights="torchscript")  # uint8, scale_linear 1/255
    image = _image((70, 60))
    assert np.abs(_segment(image, loaded, tile=32) - _segment(image, model, tile=32)).max() \
        <= TOL
    wide = image.astype(np.uint16) * 257
    with pytest.raises(InvalidImageError, match="the model takes uint8 images"):
        _segment(wide, loaded, tile=32)
    np.save(tmp_path / "img.npy", wide)
    assert main(["run", str(tmp_path / "img.npy"), "--model", str(path), "-o",
                 str(tmp_path / "o.zarr"), "-q"]) == 0  # rebuilt by tilerseg: its own "auto"
    with pytest.raises(InvalidImageError, match="this image is uint16"):
        _segment(wide, loaded, tile=32)
    # an explicit normalisation is the caller's: it runs
    assert _segment(wide, loaded, tile=32, normalize=(0, 65535)).shape == (2, 70, 60)


@pytest.mark.parametrize("axes", [["x"], ["y"], ["channel", "y"]])
@pytest.mark.parametrize("step", ["scale_range", "zero_mean_unit_variance"])
def test_statistics_over_only_some_spatial_axes_are_refused(tmp_path: Path, axes,
                                                            step) -> None:
    ids = [bio.AxisId(a) for a in axes]
    pre = (bio.ScaleRangeDescr(kwargs=bio.ScaleRangeKwargs(axes=ids)) if step == "scale_range"
           else bio.ZeroMeanUnitVarianceDescr(kwargs=bio.ZeroMeanUnitVarianceKwargs(axes=ids)))
    path = _foreign(tmp_path, pad=0, preprocessing=[pre])
    with pytest.raises(InvalidModelError, match=f"preprocessing {step} computes its statistics "
                       "over axes"):
        load_bioimageio(path)


def test_statistics_over_all_spatial_axes_are_accepted(tmp_path: Path) -> None:
    ids = [bio.AxisId(a) for a in ("channel", "y", "x")]
    pre = [bio.ScaleRangeDescr(kwargs=bio.ScaleRangeKwargs(axes=ids))]
    model = load_bioimageio(_foreign(tmp_path, pad=0, preprocessing=pre))
    assert model.metadata["normalize"] == "percentile:0:100"


class _BatchOne(nn.Module):
    """:class:`_Net` that refuses any batch but 1."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _Net(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != 1:
            raise RuntimeError("this network takes batch 1")
        return self.net(x)


def test_a_fixed_batch_size_is_kept_whatever_the_run_s_batch(tmp_path: Path) -> None:
    one = [bio.BatchAxis(size=1), bio.ChannelAxis(channel_names=[bio.Identifier("c")]),
           *(bio.SpaceInputAxis(id=bio.AxisId(a), size=bio.ParameterizedSize(min=16, step=4))
             for a in "yx")]
    path = _foreign(tmp_path, pad=0, net=_BatchOne(), axes=one)
    assert str(load_description(str(path), perform_io_checks=False).inputs[0].axes[0].size) \
        == "1"
    image = np.random.default_rng(9).integers(0, 4096, (100, 90)).astype(np.uint16)
    np.save(tmp_path / "img.npy", image)
    out = tmp_path / "o.zarr"
    assert main(["run", str(tmp_path / "img.npy"), "--model", str(path), "-o", str(out),
                 "--tile", "16", "--batch-size", "4", "--dtype", "float32", "--backend",
                 "torch", "-q"]) == 0
    import zarr

    got = zarr.open_array(str(out / "0"), mode="r")[:]
    assert np.abs(got[0] - _reference(image, 0, 4096, pad=0, halo=0)).max() <= TOL


def test_run_takes_the_halo_of_a_package_that_declares_none(tmp_path: Path, capsys) -> None:
    path = _foreign(tmp_path)  # same-padded, radius 2, no halo declared
    image = np.random.default_rng(10).integers(0, 4096, (70, 60)).astype(np.uint16)
    np.save(tmp_path / "img.npy", image)
    args = ["run", str(tmp_path / "img.npy"), "--model", str(path), "--tile", "16",
            "--dtype", "float32", "--backend", "torch", "-q"]
    assert main([*args, "-o", str(tmp_path / "a.zarr")]) == 2
    assert "tilerseg run/batch/info --halo N" in _one_error_line(capsys)
    info = ["info", str(tmp_path / "img.npy"), "--model", str(path), "--tile", "16"]
    assert main(info) == 2  # described and planned only with the halo, as it is run
    assert "declares no halo" in _one_error_line(capsys)
    assert main([*info, "--halo", "2"]) == 0
    assert re.search(r"^geometry +halo \(2, 2\)", capsys.readouterr().out, re.M)
    assert main([*args, "-o", str(tmp_path / "b.zarr"), "--halo", "2"]) == 0
    import zarr

    got = zarr.open_array(str(tmp_path / "b.zarr" / "0"), mode="r")[:]
    assert np.abs(got[0] - _reference(image, 0, 4096, pad=1, halo=2)[:70, :60]).max() <= TOL
    assert main(["run", str(tmp_path / "img.npy"), "--model", "unet", "--halo", "2", "-o",
                 str(tmp_path / "c.zarr"), "-q"]) == 2
    assert "applies only to a bioimage.io package" in _one_error_line(capsys)
    assert main([*args, "-o", str(tmp_path / "d.zarr"), "--halo", "two"]) == 2
    assert "--halo 'two' must be N or N,N[,N]" in _one_error_line(capsys)


def test_a_folder_with_a_named_bioimageio_yaml_is_a_package(unet_package, tmp_path: Path) -> None:
    _, path = unet_package
    folder = _unpacked(path, tmp_path / "pkg")
    yaml = next(n for n in ("rdf.yaml", "bioimageio.yaml") if (folder / n).exists())
    (folder / yaml).rename(folder / "unet.bioimageio.yaml")
    assert is_package(folder)
    assert load_bioimageio(folder, weights="torchscript").metadata["normalize"] == [0.0, 255.0]


def test_export_keeps_the_model_s_training_mode_and_no_negative_zero(tmp_path: Path) -> None:
    from tilerseg.bioimageio.processing import normalization_of

    model = tilerseg.create_model("unet", depth=2, base_channels=2, num_classes=3).train()
    model.metadata = {"classes": ["a b", "a_b", "a-b"]}  # alike once made identifiers
    path = export_bioimageio(model, tmp_path / "m.zip", normalize="none")
    assert model.training
    out = load_description(str(path), perform_io_checks=False).outputs[0]
    assert [str(n) for n in out.axes[1].channel_names] == ["a_b", "a_b_2", "a_b_3"]
    low, high = normalization_of([bio.ScaleLinearDescr(kwargs=bio.ScaleLinearKwargs(
        gain=0.5, offset=0.0))], 1, "m.zip")
    assert (low, high) == (0.0, 2.0) and np.copysign(1.0, low) == 1.0


def test_resume_and_shards_refuse_another_halo(tmp_path: Path, capsys) -> None:
    path = _foreign(tmp_path)  # no halo declared: --halo sets its geometry, not its weights
    image = np.random.default_rng(11).integers(0, 4096, (70, 60)).astype(np.uint16)
    np.save(tmp_path / "img.npy", image)
    args = ["run", str(tmp_path / "img.npy"), "--model", str(path), "--tile", "16",
            "--backend", "torch", "-q"]
    out = str(tmp_path / "a.zarr")
    assert main([*args, "-o", out, "--halo", "0"]) == 0
    capsys.readouterr()
    assert main([*args, "-o", out, "--halo", "2", "--resume"]) == 2
    line = _one_error_line(capsys)
    assert "other parameters: model halo ([0, 0] then, [2, 2] now)" in line
    assert main([*args, "-o", out, "--halo", "0", "--resume"]) == 0  # the same: complete
    shards = str(tmp_path / "s.zarr")
    assert main([*args, "-o", shards, "--halo", "0", "--shard", "0/2"]) == 0
    capsys.readouterr()
    assert main([*args, "-o", shards, "--halo", "2", "--shard", "1/2"]) == 2
    assert "model halo ([0, 0] then, [2, 2] now)" in _one_error_line(capsys)


def test_halo_is_refused_for_a_package_that_declares_its_context(unet_package, tmp_path: Path,
                                                                   capsys) -> None:
    _, exported = unet_package
    with pytest.raises(InvalidModelError, match="is a tilerseg export, which declares its own"):
        load_bioimageio(exported, halo=0)
    with pytest.raises(InvalidModelError, match="is a tilerseg export"):
        load_bioimageio(exported, weights="torchscript", halo=4)
    cropping = _foreign(tmp_path, pad=0, name="crop.zip")  # an offset on both axes
    with_halo = _foreign(tmp_path, halo=2, name="halo.zip")  # a halo on both axes
    image = np.random.default_rng(12).integers(0, 4096, (40, 30)).astype(np.uint16)
    np.save(tmp_path / "img.npy", image)
    for package in (exported, cropping, with_halo):
        assert main(["run", str(tmp_path / "img.npy"), "--model", str(package), "-o",
                     str(tmp_path / "o.zarr"), "--halo", "2", "-q"]) == 2
        line = _one_error_line(capsys)
        assert "--halo / halo= is only for a package that declares none" in line
        assert not (tmp_path / "o.zarr").exists()
    assert tilerseg.models.model_geometry(load_bioimageio(with_halo)).halo == (2, 2)

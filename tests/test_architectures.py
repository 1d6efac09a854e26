"""Every registered architecture: exact tiling against a reference whose geometry is
derived independently of the engine (tests/closed_forms.py), training, files, the CLI."""

from __future__ import annotations

import functools
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tilerseg
from tilerseg import InvalidModelError, create_model, list_models, model_geometry
from tilerseg.cli import main
from tilerseg.synthetic import membrane_image
from tilerseg.train import TrainConfig, train
from tilerseg.train.data import Pair
from tilerseg.train.loop import TrainStep, weighted_loss
from tests.closed_forms import expected_geometry
from tests.conftest import BACKENDS
from tests.reference import one_shot_reference

TOLERANCE = 1e-4
ANISO = [[1, 2, 2], [1, 2, 2], [2, 2, 2]]

# Configurations per registered architecture (widths tiny; base_channels is drawn per case
# from the third entry). A registered name missing here fails test_tiled_equals_reference.
GRID: dict[str, list[dict]] = {
    "unet": [
        dict(depth=2, padding="valid"),
        dict(depth=3, padding="valid", up="bilinear", batch_norm=True),
        dict(depth=4, padding="valid", num_classes=1),
        dict(depth=2, padding="same", up="bilinear"),
        dict(depth=3, padding="same", in_channels=2, num_classes=3),
        dict(depth=4, padding="same", batch_norm=True),
        dict(ndim=3, depth=3, pool=ANISO, padding="valid", up="bilinear"),
    ],
    "unet3d": [
        dict(padding="valid"),  # the preset: depth 3, pooling ANISO
        dict(padding="same"),
        dict(padding="valid", up="bilinear", batch_norm=True),
    ],
    "unet-keras": [
        dict(),  # depth 4, same, one class
        dict(depth=2),
        dict(depth=3, padding="valid", dropout=0.0),
    ],
    "unetpp": [
        dict(depth=2, padding="same"),
        dict(depth=3, padding="valid"),
        dict(depth=4, padding="same", up="bilinear", batch_norm=True),
        dict(depth=4, padding="valid", prune=2),
        dict(depth=3, padding="same", prune=1, num_classes=1),
        dict(ndim=3, depth=3, pool=ANISO, padding="valid"),
        dict(ndim=3, depth=3, pool=ANISO, padding="same", up="bilinear"),
    ],
    "fcn8s": [
        dict(),  # the paper's fc6 7x7, two convs per stage
        dict(convs_per_stage=1, fc_kernel=3, num_classes=3, in_channels=2),
    ],
}
WIDTHS = [2, 3, 4]


def _seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


@functools.lru_cache(maxsize=None)
def _model(name: str, index: int) -> torch.nn.Module:
    config = GRID[name][index]
    torch.manual_seed(_seed(name, index))
    model = create_model(name, base_channels=WIDTHS[index % 3], **config).eval()
    for m in model.modules():  # non-trivial running statistics where there are some
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model


@functools.lru_cache(maxsize=None)
def _independent_geometry(name: str, index: int) -> tilerseg.ModelGeometry:
    """The closed form, checked once per configuration against the engine's probe.

    Equality, also of the halo of same-padded models: the closed form's backward walk
    follows the exact interval each layer reads (floors of pooling and up-sampling
    included), and the probe measures the exact support of the same aligned block, so
    the two are the same number, not merely a bound and a value under it.
    """
    expected = expected_geometry(name, GRID[name][index])
    probed = model_geometry(_model(name, index))
    assert probed == expected, (name, GRID[name][index], probed, expected)
    return expected


@st.composite
def _cases(draw: st.DrawFn, name: str) -> tuple:
    index = draw(st.integers(0, len(GRID[name]) - 1))
    g = expected_geometry(name, GRID[name][index])
    if g.ndim == 2:
        shape = draw(st.one_of(
            st.tuples(st.just(1), st.integers(1, 90)),  # a 1 x N line
            st.tuples(st.integers(1, 90), st.just(1)),
            st.tuples(st.integers(1, 70), st.integers(1, 90)),
        ))
    else:
        shape = draw(st.tuples(st.integers(1, 7), st.integers(1, 18), st.integers(1, 18)))
    # tiles of 1-3 pooling steps per axis (many tiles), or one larger than the image;
    # 3D windows are costly: from 2 steps
    multiples = [1, 2, 3, 64] if g.ndim == 2 else [2, 3, 64]
    # at most 6 (2D) or 3 (3D) tiles per axis, so that small steps stay cheap
    most = 6 if g.ndim == 2 else 3
    tile = tuple(max(draw(st.sampled_from(multiples)), -(-n // (most * s))) * s
                 for n, s in zip(shape, g.step))
    return index, shape, tile, draw(st.integers(1, 3))


def _check(name: str, case: tuple, backend: str) -> None:
    index, shape, tile, batch = case
    geometry = _independent_geometry(name, index)
    model = _model(name, index)
    rng = np.random.default_rng(_seed(name, case))
    image = rng.random((geometry.in_channels, *shape), dtype=np.float32)
    tiled = tilerseg.segment(image, model, tile=tile, batch_size=batch, device="cpu",
                             normalize=False, backend=backend)
    reference = one_shot_reference(image, model, geometry=geometry)
    assert tiled.shape == reference.shape == (geometry.out_channels, *shape)
    assert np.abs(tiled - reference).max() <= TOLERANCE, (name, GRID[name][index], case)


_EXAMPLES = {"torch": 10, "openvino": 2}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list_models())
def test_tiled_equals_reference(name: str, backend: str) -> None:
    """Tiled output = one-shot reference with the closed-form geometry, for every
    registered architecture (OpenVINO converts a network per window: fewer cases)."""
    assert GRID.get(name), f"architecture {name!r} has no configurations in GRID"

    @settings(max_examples=_EXAMPLES[backend])
    @given(_cases(name))
    def check(case: tuple) -> None:
        _check(name, case, backend)

    check()


def test_every_configuration_matches_its_closed_form() -> None:
    """Also the configurations Hypothesis happened not to draw."""
    for name in list_models():
        for index in range(len(GRID[name])):
            _independent_geometry(name, index)


def test_closed_forms_of_the_papers() -> None:
    """Numbers stated in the papers and presets, independently of the walk's code paths."""
    unet = expected_geometry("unet", {})
    assert unet.shrink == (184, 184) and unet.min_input == (188, 188)  # 572 -> 388
    aniso = expected_geometry("unet3d", {})
    assert aniso.step == (2, 8, 8) and aniso.shrink == (32, 88, 88)
    assert expected_geometry("fcn8s", {}).step == (32, 32)
    pp = expected_geometry("unetpp", {"padding": "valid"})
    assert pp.shrink == unet.shrink and pp.step == unet.step  # X(0,4) chain = U-Net's path


# --- forward, backward, training, files ------------------------------------------------------


def _pairs(count: int = 2, side: int = 96) -> list[Pair]:
    pairs = []
    for k in range(count):
        image, mask = membrane_image((side, side), cell_size=24, seed=k)
        pairs.append(Pair(f"{k}", image[None], (mask > 0).astype(np.int64)))
    return pairs


TRAIN = {  # tiny configuration and training window per 2D architecture
    "unet": ({"depth": 2, "base_channels": 2}, 60),
    "unet-keras": ({"depth": 2, "base_channels": 2}, 64),
    "unetpp": ({"depth": 2, "base_channels": 2, "padding": "valid"}, 60),
    "fcn8s": ({"base_channels": 2, "fc_kernel": 3}, 288),  # halo 126: output 36
    "unet3d": None,  # 3D: trained step by step below; train() takes 2D pairs
}


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_and_training_steps(name: str, tmp_path: Path) -> None:
    assert name in TRAIN, f"architecture {name!r} has no training configuration"
    if TRAIN[name] is None:
        torch.manual_seed(0)
        model = create_model(name, base_channels=2)
        g = model_geometry(model)
        step = TrainStep(model, torch.optim.Adam(model.parameters(), lr=1e-2))
        x = torch.rand((1, 1, *g.min_input))
        out = tuple(n - k for n, k in zip(g.min_input, g.shrink))
        y = (torch.rand((1, *out)) > 0.5).long()
        losses = [float(step(x, y, torch.ones((1, *out)))) for _ in range(3)]
        assert all(np.isfinite(losses)) and losses[-1] < losses[0]
        # 3D models train on volumes (tests/test_train3d.py); 2D pairs are refused
        with pytest.raises(InvalidModelError, match=r"is 3D but 0 is 2D"):
            train(_pairs(1), tmp_path / "run", TrainConfig(model={"name": name}, epochs=1))
        return
    config, window = TRAIN[name]
    model = create_model(name, **config)
    g = model_geometry(model)
    x = torch.randn((2, 1, *[g.admissible_input(window, a) for a in range(2)]))
    model(x).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for n, p in model.named_parameters() if not n.startswith("heads."))
    result = train(_pairs(), tmp_path / "run",
                   TrainConfig(model={"name": name, **config}, epochs=1, steps_per_epoch=2,
                               batch_size=1, window=window, elastic=False))
    assert np.isfinite(result["history"][-1]["loss"])
    trained = tilerseg.load_model(tmp_path / "run" / "last.pt")
    assert trained.registry_name == name and trained.config == {**model.config}


def test_unetpp_deep_supervision_averages_every_head() -> None:
    torch.manual_seed(0)
    model = create_model("unetpp", depth=3, base_channels=2, padding="valid")
    heads = model.supervised_outputs(torch.rand(1, 1, 140, 140))
    assert [h.shape[-1] for h in heads] == [124, 100, 52]  # shrink 12 * 2**j - 8, j = 1..3
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0))
    x, y, w = torch.rand(1, 1, 140, 140), torch.randint(0, 2, (1, 52, 52)), torch.rand(1, 52, 52)
    expected = torch.stack([weighted_loss(h[..., c:c + 52, c:c + 52], y, w)
                            for h in model.supervised_outputs(x)
                            for c in [(h.shape[-1] - 52) // 2]]).mean()
    assert torch.allclose(step.loss(x, y, w), expected)
    step(x, y, w)
    assert all(head.weight.grad.abs().sum() > 0 for head in model.heads)
    plain = create_model("unetpp", depth=3, base_channels=2, padding="valid",
                         deep_supervision=False)
    TrainStep(plain, torch.optim.SGD(plain.parameters(), lr=0.0))(x, y, w)
    assert plain.heads[0].weight.grad is None and plain.heads[2].weight.grad is not None


def test_unetpp_pruning_keeps_the_weights() -> None:
    torch.manual_seed(1)
    full = create_model("unetpp", depth=3, base_channels=2).eval()
    x = torch.rand(1, 1, 32, 40)
    with torch.no_grad():
        heads = full.supervised_outputs(x)
        for d in (1, 2, 3):
            small = full.pruned(d)
            assert torch.equal(small(x), heads[d - 1]) and model_geometry(small).step == (2**d,) * 2
            loaded = create_model("unetpp", depth=3, base_channels=2, prune=d).eval()
            loaded.load_state_dict(full.state_dict())
            assert torch.equal(loaded(x), heads[d - 1])
    with pytest.raises(InvalidModelError, match=r"prune=4 must be None or an integer from 1 to "
                       r"depth=3"):
        create_model("unetpp", depth=3, prune=4)


def test_keras_preset_is_one_class_same_padded() -> None:
    model = create_model("unet-keras", base_channels=2)
    c = model.config
    assert (c["depth"], c["padding"], c["num_classes"], c["up"]) == (4, "same", 1, "transpose")
    assert c["dropout"] > 0
    logits, target = torch.randn(2, 1, 5, 5), torch.randint(0, 2, (2, 5, 5))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], target.float())
    assert torch.allclose(weighted_loss(logits, target, torch.ones(2, 5, 5)), bce)


@pytest.mark.parametrize("name", list_models())
def test_save_load_round_trip(name: str, tmp_path: Path) -> None:
    index = len(GRID[name]) - 1
    torch.manual_seed(_seed(name, "file"))  # fresh: segment() may change a model's layout
    model = create_model(name, base_channels=3, **GRID[name][index]).eval()
    loaded = tilerseg.load_model(tilerseg.save_model(model, tmp_path / "m.pt"))
    assert loaded.registry_name == name and loaded.config == model.config
    g = model_geometry(model)
    x = torch.rand((1, g.in_channels, *[m + s for m, s in zip(g.min_input, g.step)]))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_model_files_from_before_pool_load_as_isotropic(tmp_path: Path) -> None:
    """unet3d files written before ``pool`` existed (depth 4, 2x2x2 pooling) still load."""
    torch.manual_seed(2)
    old = create_model("unet3d", depth=2, base_channels=2, pool=2).eval()
    path = tilerseg.save_model(old, tmp_path / "old.pt")
    payload = torch.load(path, weights_only=True)
    del payload["config"]["pool"]
    payload.pop("geometry")  # as old files: probed on first use
    torch.save(payload, path)
    loaded = tilerseg.load_model(path)
    assert loaded.config["pool"] == 2 and model_geometry(loaded).step == (4, 4, 4)
    x = torch.rand(1, 1, 44, 44, 44)
    with torch.no_grad():
        assert torch.equal(loaded(x), old(x))


def test_bad_pool_and_foreign_options_are_one_line() -> None:
    with pytest.raises(InvalidModelError, match=r"^pool=\[\[1, 2\]\] must be a positive integer "
                       r"or 3 lists"):
        create_model("unet3d", depth=3, pool=[[1, 2]])
    with pytest.raises(InvalidModelError, match=r"^bad configuration for model 'fcn8s': it takes "
                       r"no argument depth=3$"):
        create_model("fcn8s", depth=3)


# --- command line ------------------------------------------------------------------------------


def test_models_command_lists_every_architecture_with_its_geometry(
        capsys: pytest.CaptureFixture) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in list_models():
        g = expected_geometry(name, {})
        line = next(row for row in out.splitlines() if row.split()[:1] == [name])
        assert f"halo {list(g.halo)}" in line and f"step {list(g.step)}" in line, line
        assert f"admissible inputs {g.admissible_inputs(3, 0)}" in line, line


def _folders(root: Path) -> tuple[Path, Path]:
    images, masks = root / "images", root / "masks"
    images.mkdir()
    masks.mkdir()
    for k in range(2):
        image, mask = membrane_image((96, 96), cell_size=24, seed=k)
        tifffile.imwrite(images / f"{k:02d}.tif", image)
        tifffile.imwrite(masks / f"{k:02d}.tif", mask)
    return images, masks


def test_train_command_takes_an_architecture(tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    images, masks = _folders(tmp_path)
    common = ["train", "--images", str(images), "--masks", str(masks), "--epochs", "1",
              "--steps", "2", "--batch-size", "1", "--no-elastic", "-q"]
    assert main([*common, "-o", str(tmp_path / "pp"), "--arch", "unetpp", "--depth", "2",
                 "--base-channels", "2", "--padding", "valid", "--window", "60"]) == 0
    model = tilerseg.load_model(tmp_path / "pp" / "best.pt")
    assert model.registry_name == "unetpp" and model.config["padding"] == "valid"
    assert model.config["depth"] == 2 and model.config["batch_norm"] is False
    assert main([*common, "-o", str(tmp_path / "k"), "--arch", "unet-keras",
                 "--base-channels", "2", "--window", "208"]) == 0
    keras = tilerseg.load_model(tmp_path / "k" / "best.pt")
    assert keras.config["depth"] == 4 and keras.config["num_classes"] == 1  # preset kept
    capsys.readouterr()
    assert main([*common, "-o", str(tmp_path / "f"), "--arch", "fcn8s", "--depth", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tilerseg: error: bad configuration for model 'fcn8s': it takes no "
                   "argument depth=3"]

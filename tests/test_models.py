"""The U-Net family, the registry, geometry probing and checkpoints."""

from __future__ import annotations

import logging
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tilerseg
from tilerseg import InvalidModelError, ModelNotFoundError, create_model, model_geometry

VARIANTS = [
    {},
    {"padding": "same"},
    {"batch_norm": True, "dropout": 0.5},
    {"up": "bilinear"},
    {"up": "bilinear", "padding": "same", "batch_norm": True},
]


def test_paper_network_maps_572_to_388() -> None:
    geometry = model_geometry(create_model("unet"))  # the paper's widths, probed on meta
    assert geometry.output_size(572) == 388
    assert geometry.halo == (92, 92) and geometry.step == (16, 16)
    assert (geometry.in_channels, geometry.out_channels) == (1, 2)
    narrow = create_model("unet", base_channels=2)
    with torch.no_grad():
        assert narrow(torch.zeros(1, 1, 572, 572)).shape == (1, 2, 388, 388)


def test_admissible_sides_are_16b_plus_124_for_depth_4() -> None:
    geometry = model_geometry(create_model("unet", base_channels=2))
    admissible = [n for n in range(100, 800) if geometry.is_admissible(n)]
    assert admissible == [16 * b + 124 for b in range(4, 43)]
    # PyTorch pools floor silently: 573 runs, but the probe knows it is not admissible
    with torch.no_grad():
        create_model("unet", base_channels=2)(torch.zeros(1, 1, 573, 573))
    assert not geometry.is_admissible(573)


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
def test_step_and_halo_follow_depth(depth: int) -> None:
    g = model_geometry(create_model("unet", depth=depth, base_channels=2))
    assert g.step == (2**depth,) * 2
    # two valid 3x3 convs lose 4 px per level, counted at input resolution, on the way
    # down (levels 0..d-1), at the bottom (level d) and on the way up (levels d-1..0)
    assert g.shrink == (12 * 2**depth - 8,) * 2
    assert g.halo == (6 * 2**depth - 4,) * 2


def test_same_padding_halo_is_the_receptive_field() -> None:
    """Input beyond the halo of an aligned output block cannot change it; input at the halo can."""
    torch.manual_seed(0)
    model = create_model("unet", depth=2, base_channels=2, padding="same").eval()
    g = model_geometry(model)
    assert g.shrink == (0, 0) and g.min_input == (4, 4)
    h, lo, hi = g.halo[0], 48, 52  # block rows [48, 52) on the pooling grid
    x = torch.rand(1, 1, 112, 16)
    with torch.no_grad():
        base = model(x)[..., lo:hi, :]

        def changed(row: int) -> bool:
            y = x.clone()
            y[..., row, :] += 10
            return not torch.equal(model(y)[..., lo:hi, :], base)

        assert not changed(lo - h - 1) and not changed(hi + h)
        assert changed(lo - h) or changed(hi - 1 + h)
    assert g.halo[0] >= model_geometry(create_model("unet", depth=2, base_channels=2)).halo[0]


def _all_configurations() -> list[tuple[str, dict]]:
    configs = []  # the U-Net family; every architecture: tests/test_architectures.py
    for name in ("unet", "unet3d", "unet-keras"):
        for variant in VARIANTS:
            configs.append((name, {"depth": 2, "base_channels": 2, **variant}))
    return configs


@pytest.mark.parametrize(("name", "config"), _all_configurations())
def test_forward_and_backward(name: str, config: dict) -> None:
    torch.manual_seed(0)
    model = create_model(name, in_channels=2, num_classes=3, **config)
    g = model_geometry(model)
    x = torch.randn((2, 2) + tuple(g.min_input))
    y = model(x)
    assert y.shape == (2, 3) + tuple(n - k for n, k in zip(g.min_input, g.shrink))
    y.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


def test_he_initialisation() -> None:
    torch.manual_seed(0)
    model = create_model("unet", base_channels=32, depth=2)
    conv = model.down[1][0]  # 32 -> 64 channels, 3x3: 288 incoming connections
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 288), rel=0.05)
    assert conv.bias.abs().max().item() == 0
    up = model.up[0].conv  # 2x2 stride-2 up-convolution: one tap per input channel
    assert up.weight.std().item() == pytest.approx(math.sqrt(2 / up.in_channels), rel=0.05)


def test_registry_errors() -> None:
    with pytest.raises(InvalidModelError, match="'nope' is not registered; known: fcn8s, unet"):
        create_model("nope")
    with pytest.raises(InvalidModelError,
                       match=r"^bad configuration for model 'unet': it takes no argument width=3$"):
        create_model("unet", width=3)
    with pytest.raises(InvalidModelError, match="padding='full'"):
        create_model("unet", padding="full")
    with pytest.raises(InvalidModelError, match="depth=0"):
        create_model("unet", depth=0)


def test_save_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = create_model("unet3d", depth=2, base_channels=2, batch_norm=True).eval()
    path = tilerseg.save_model(model, tmp_path / "m.pt", metadata={"threshold": 0.3})
    loaded = tilerseg.load_model(path)
    assert loaded.config == model.config and loaded.config["ndim"] == 3
    assert loaded.metadata == {"threshold": 0.3} and not loaded.training
    x = torch.randn(1, 1, 44, 44, 44)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private mode


def test_load_rejects_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        tilerseg.load_model(tmp_path / "missing.pt")
    assert issubclass(ModelNotFoundError, FileNotFoundError)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(InvalidModelError, match="is not a tilerseg model file"):
        tilerseg.load_model(junk)
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(3)}, plain)
    with pytest.raises(InvalidModelError, match="no tilerseg header"):
        tilerseg.load_model(plain)
    damaged = tmp_path / "damaged.pt"
    model = create_model("unet", depth=2, base_channels=2)
    tilerseg.save_model(model, damaged)
    payload = torch.load(damaged, weights_only=True)
    payload["state_dict"].pop("head.weight")
    torch.save(payload, damaged)
    with pytest.raises(InvalidModelError, match="damaged"):
        tilerseg.load_model(damaged)


class _Payload:
    """Pickles to a call that would create a marker file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_payload_never_runs(tmp_path: Path, legacy: bool) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if legacy:
        path.write_bytes(pickle.dumps({"format": "tilerseg-model", "x": _Payload(marker)}, protocol=2))
    else:
        torch.save({"format": "tilerseg-model", "x": _Payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(InvalidModelError, match="is not a tilerseg model file"):
        tilerseg.load_model(path)
    assert not marker.exists()


def test_save_refuses_unregistered_models(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError, match="only models built by create_model"):
        tilerseg.save_model(nn.Conv2d(1, 1, 3), tmp_path / "x.pt")


def test_probe_of_a_foreign_model() -> None:
    """Geometry comes from shapes alone, for any conv net."""
    net = nn.Sequential(
        nn.Conv2d(3, 8, 5), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3),
        nn.ConvTranspose2d(8, 8, 2, stride=2), nn.Conv2d(8, 4, 1),
    )
    g = model_geometry(net)  # n -> 2 * ((n - 4) / 2 - 2) = n - 8
    assert (g.in_channels, g.out_channels, g.step) == (3, 4, (2, 2))
    assert g.shrink == (8, 8) and g.halo == (4, 4) and g.min_input == (10, 10)
    encoder_only = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2))
    with pytest.raises(InvalidModelError, match="irregular size arithmetic"):
        model_geometry(encoder_only)
    same = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 5, padding=2))
    assert model_geometry(same).halo == (3, 3)  # measured receptive field radius
    stated = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1))
    stated.halo = 4
    assert model_geometry(stated).halo == (4, 4)


# --- geometry recorded in model files --------------------------------------------------------


def test_saved_geometry_is_trusted_without_probing(tmp_path, monkeypatch) -> None:
    from tilerseg.models import probe

    model = tilerseg.create_model("unet", depth=3, base_channels=2, padding="same")
    probed = tilerseg.model_geometry(model)
    path = tilerseg.save_model(model, tmp_path / "m.pt")
    assert torch.load(path, weights_only=True)["geometry"] == probed.as_dict()

    def no_probe(model):
        raise AssertionError("the meta-device probe ran")

    monkeypatch.setattr(probe, "_probe", no_probe)
    loaded = tilerseg.load_model(path)
    assert tilerseg.model_geometry(loaded) == probed


def test_wrong_recorded_geometry_is_probed_instead(tmp_path, caplog) -> None:
    model = tilerseg.create_model("unet", depth=2, base_channels=2)
    path = tilerseg.save_model(model, tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    truth = payload["geometry"]
    payload["geometry"] = {**truth, "min_input": [m + 8 for m in truth["min_input"]],
                           "shrink": [s + 4 for s in truth["shrink"]],
                           "halo": [h + 2 for h in truth["halo"]]}  # consistent, but wrong
    torch.save(payload, path)
    with caplog.at_level(logging.WARNING, logger="tilerseg"):
        loaded = tilerseg.load_model(path)
    assert "recorded geometry does not hold" in caplog.text
    assert tilerseg.model_geometry(loaded).as_dict() == truth


def test_bundled_model_records_its_geometry() -> None:
    from tilerseg.models.checkpoint import DEFAULT_MODEL, bundled_models

    payload = torch.load(bundled_models()[DEFAULT_MODEL], weights_only=True)
    assert payload["geometry"]["halo"] == [92, 92] and payload["geometry"]["step"] == [16, 16]

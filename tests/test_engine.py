"""Tiled inference equals the one-shot reference, and bad input is refused clearly."""

from __future__ import annotations

import functools


import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tilerseg
from tilerseg import InvalidArgumentError, InvalidImageError, InvalidModelError, TilersegError
from tests.conftest import BACKENDS, one_shot_reference

TOLERANCE = 1e-4


@functools.lru_cache(maxsize=None)
def _model(**config) -> torch.nn.Module:
    torch.manual_seed(sum(map(ord, repr(sorted(config.items())))))
    model = tilerseg.create_model(**config).eval()
    if config.get("batch_norm"):  # non-trivial running statistics
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model


def model(**config) -> torch.nn.Module:
    return _model(**{"name": "unet", **config})


@st.composite
def cases_2d(draw: st.DrawFn, padding: str) -> tuple:
    config = dict(
        depth=draw(st.integers(2, 4)),
        base_channels=draw(st.sampled_from([2, 4])),
        in_channels=draw(st.integers(1, 2)),
        num_classes=draw(st.integers(1, 3)),
        up=draw(st.sampled_from(["transpose", "bilinear"])),
        batch_norm=draw(st.booleans()),
        padding=padding,
    )
    shape = draw(
        st.one_of(
            st.tuples(st.just(1), st.integers(1, 90)),  # a 1 x N line
            st.tuples(st.integers(1, 90), st.just(1)),
            st.tuples(st.integers(1, 70), st.integers(1, 90)),
        )
    )
    step = 2 ** config["depth"]
    tile = draw(st.integers(1, 3)) * step  # small tiles: many tiles per image
    batch = draw(st.integers(1, 3))
    return config, shape, tile, batch


def _check_against_reference(config: dict, shape: tuple, tile, batch: int,
                             backend: str) -> None:
    net = model(**config)
    rng = np.random.default_rng(abs(hash((shape, tile, batch))) % 2**32)
    image = rng.random((config.get("in_channels", 1),) + shape, dtype=np.float32)
    tiled = tilerseg.segment(image, net, tile=tile, batch_size=batch, device="cpu",
                             normalize=False, backend=backend)
    reference = one_shot_reference(image, net)
    assert tiled.shape == reference.shape == (config.get("num_classes", 2),) + shape
    assert np.abs(tiled - reference).max() <= TOLERANCE


# Every case runs on each CPU runtime; OpenVINO converts a network per model and window
# (about a second each), so it draws fewer cases.
openvino = pytest.mark.openvino  # OpenVINO is in the test extra: never skipped


@settings(max_examples=40)
@given(cases_2d("valid"))
def test_tiling_invariance_valid(case: tuple) -> None:
    _check_against_reference(*case, "torch")


@openvino
@settings(max_examples=10)
@given(cases_2d("valid"))
def test_tiling_invariance_valid_openvino(case: tuple) -> None:
    _check_against_reference(*case, "openvino")


@settings(max_examples=25)
@given(cases_2d("same"))
def test_tiling_invariance_same_padding(case: tuple) -> None:
    _check_against_reference(*case, "torch")


@openvino
@settings(max_examples=6)
@given(cases_2d("same"))
def test_tiling_invariance_same_padding_openvino(case: tuple) -> None:
    _check_against_reference(*case, "openvino")


_CASES_3D = dict(
    shape=st.tuples(st.integers(1, 12), st.integers(1, 20), st.integers(1, 20)),
    tile=st.tuples(*[st.sampled_from([4, 8, 16])] * 3),
    batch=st.integers(1, 2),
    padding=st.sampled_from(["valid", "same"]),
)


def _check_3d(shape: tuple, tile: tuple, batch: int, padding: str, backend: str) -> None:
    config = dict(name="unet3d", depth=2, base_channels=2, padding=padding)
    _check_against_reference(config, shape, tile, batch, backend)


@settings(max_examples=10)
@given(**_CASES_3D)
def test_tiling_invariance_3d(shape: tuple, tile: tuple, batch: int, padding: str) -> None:
    _check_3d(shape, tile, batch, padding, "torch")


@openvino
@settings(max_examples=4)
@given(**_CASES_3D)
def test_tiling_invariance_3d_openvino(shape: tuple, tile: tuple, batch: int,
                                       padding: str) -> None:
    _check_3d(shape, tile, batch, padding, "openvino")


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_tiles_and_large_halo(small_model: torch.nn.Module, backend: str) -> None:
    """A 2-channel image much larger than the tile, with odd sizes."""
    image = np.random.default_rng(3).random((1, 157, 203), dtype=np.float32)
    reference = one_shot_reference(image, small_model)
    for tile, batch in [(8, 5), (24, 2), ((16, 64), 1), (1024, 1)]:
        tiled = tilerseg.segment(image[0], small_model, tile=tile, batch_size=batch,
                                 device="cpu", normalize=False, backend=backend)
        assert np.abs(tiled - reference).max() <= TOLERANCE, (tile, batch)


def test_a_window_off_the_pooling_grid_changes_the_output(small_model: torch.nn.Module) -> None:
    """Why tiles start at multiples of the pooling step (docs/geometry.md): the same output
    pixels computed from a window shifted by one pixel differ; shifted by a whole step,
    they do not."""
    g = tilerseg.model_geometry(small_model)
    step, n = g.step[0], g.min_input[0] + 2 * g.step[0]
    x = torch.rand(1, 1, n + step, n + step, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, one, whole = (torch.softmax(small_model(x[..., s:s + n, s:s + n]), 1)
                         for s in (0, 1, step))
    assert float((one[..., :-1, :-1] - a[..., 1:, 1:]).abs().max()) > 1e-3
    assert float((whole[..., :-step, :-step] - a[..., step:, step:]).abs().max()) <= 1e-5


def test_default_normalisation_is_global_dtype_range(small_model: torch.nn.Module) -> None:
    image = np.random.default_rng(4).integers(0, 256, (40, 60), dtype=np.uint8)
    scaled = image.astype(np.float32) / 255
    a = tilerseg.segment(image, small_model, tile=16, device="cpu")
    b = tilerseg.segment(scaled, small_model, tile=16, device="cpu", normalize=False)
    np.testing.assert_allclose(a, b, atol=1e-6)
    raw = tilerseg.segment(image, small_model, tile=16, device="cpu", normalize=False)
    assert np.abs(raw - a).max() > 1e-3  # False really feeds 0..255


def test_percentile_normalisation_is_global(small_model: torch.nn.Module) -> None:
    image = np.random.default_rng(5).normal(1000, 300, (50, 70)).astype(np.uint16)
    low, high = np.percentile(image, (1, 99.8))
    expected = one_shot_reference(((image - low) / (high - low)).astype(np.float32)[None],
                                  small_model)
    tiled = tilerseg.segment(image, small_model, tile=8, device="cpu", normalize="percentile")
    assert np.abs(tiled - expected).max() <= TOLERANCE
    fixed = tilerseg.segment(image, small_model, tile=8, device="cpu", normalize=(low, high))
    assert np.abs(fixed - expected).max() <= TOLERANCE


def test_probabilities_and_side_effects(small_model: torch.nn.Module) -> None:
    small_model.train()
    calls = []
    probs = tilerseg.segment(np.zeros((30, 30), np.float32), small_model, tile=16,
                             device="cpu", progress=lambda done, total: calls.append((done, total)))
    assert probs.dtype == np.float32 and np.allclose(probs.sum(0), 1, atol=1e-6)
    assert small_model.training  # mode restored
    small_model.eval()
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    one_class = model(depth=2, base_channels=2, num_classes=1)
    p = tilerseg.segment(np.zeros((9, 9)), one_class, device="cpu")
    assert p.shape == (1, 9, 9) and ((p > 0) & (p < 1)).all()


def test_plan_matches_segment_defaults(small_model: torch.nn.Module) -> None:
    plan = tilerseg.plan((3000, 100), small_model, device="cpu", backend="torch")
    assert plan.tile == (512, 104) and plan.grid == (6, 1)
    plan = tilerseg.plan((3000, 100), small_model, device="cpu", backend="openvino")
    assert plan.tile == (1024, 104) and plan.grid == (3, 1)  # larger tiles on OpenVINO
    assert tilerseg.plan((3000, 100), small_model, device="cpu").tile == (1024, 104)


@pytest.mark.parametrize(
    ("image", "pattern"),
    [
        (np.zeros(10), r"image has 1 dimensions.*\(Y, X\) or \(C, Y, X\)"),
        (np.zeros((1, 1, 10, 10)), r"image has 4 dimensions"),
        (np.zeros((3, 10, 10)), r"image has 3 channel\(s\).*takes 1"),
        (np.zeros((0, 10)), r"image is empty, shape \(0, 10\)"),
        (np.array([[0.0, np.nan]]), r"NaN or Inf"),
        (np.array([[0.0, np.inf]], np.float32), r"NaN or Inf"),
        (np.zeros((4, 4), np.complex64), r"dtype complex64 is not supported"),
        (np.array([["a", "b"]]), r"dtype <U1 is not supported"),
    ],
)
def test_bad_images(small_model: torch.nn.Module, image: np.ndarray, pattern: str) -> None:
    with pytest.raises(InvalidImageError, match=pattern):
        tilerseg.segment(image, small_model, device="cpu")


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"tile": 100}, r"tile=100 is not admissible.*multiples of the model's pooling step 8"),
        ({"tile": -16}, r"tile=-16 is not admissible"),
        ({"tile": (8, 8, 8)}, r"tile=\(8, 8, 8\) is not usable"),
        ({"device": "gpu0"}, r"device='gpu0' is not a device"),
        ({"device": "cuda:7"}, r"device='cuda:7'"),
        ({"batch_size": 0}, r"batch_size=0 must be a positive integer"),
        ({"normalize": "z-score"}, r"normalize='z-score' is not understood"),
        ({"normalize": (1.0, 1.0)}, r"must be finite with low < high"),
    ],
)
def test_bad_arguments(small_model: torch.nn.Module, kwargs: dict, pattern: str) -> None:
    kwargs = {"device": "cpu", **kwargs}
    with pytest.raises(InvalidArgumentError, match=pattern):
        tilerseg.segment(np.zeros((20, 20), np.uint8), small_model, **kwargs)


def test_cuda_unavailable_is_a_clear_error(small_model: torch.nn.Module) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(InvalidArgumentError, match="CUDA is not available"):
        tilerseg.segment(np.zeros((20, 20)), small_model, device="cuda")


def test_not_a_model() -> None:
    with pytest.raises(InvalidModelError, match="must be a torch.nn.Module"):
        tilerseg.segment(np.zeros((20, 20)), "unet")
    assert issubclass(InvalidModelError, TilersegError)


def test_channel_selection_and_sixteen_bit_default(small_model: torch.nn.Module) -> None:
    rng = np.random.default_rng(6)
    gray = rng.integers(0, 256, (40, 50), dtype=np.uint8)
    stacked = np.stack([255 - gray, gray])
    expected = tilerseg.segment(gray, small_model, tile=16, device="cpu")
    chosen = tilerseg.segment(stacked, small_model, tile=16, device="cpu", channel=[1])
    np.testing.assert_array_equal(chosen, expected)
    with pytest.raises(InvalidArgumentError, match=r"channel=\[2\] is not available"):
        tilerseg.segment(stacked, small_model, device="cpu", channel=[2])
    wide = (gray.astype(np.uint16) * 40 + 1000)
    low, high = np.percentile(wide, (1, 99.8))
    auto = tilerseg.segment(wide, small_model, tile=16, device="cpu")
    fixed = tilerseg.segment(wide, small_model, tile=16, device="cpu", normalize=(low, high))
    np.testing.assert_array_equal(auto, fixed)



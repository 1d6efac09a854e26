"""Runtimes of the forward pass: OpenVINO, torch.compile, bf16; each checked before use."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import tilerseg
from tests.conftest import BACKENDS, one_shot_reference
from tilerseg import InvalidArgumentError
from tilerseg.cli import main
from tilerseg.engine import backends
from tilerseg.engine.backends import cpu_features, resolve_backend
from tilerseg.engine.compute import Replica
from tilerseg.io.writers import open_output

openvino = pytest.mark.openvino  # OpenVINO is in the test extra: never skipped


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(5)
    return tilerseg.create_model("unet", depth=2, base_channels=4, num_classes=3).eval()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(11).random((1, 90, 130), dtype=np.float32)


def probabilities(path: Path) -> np.ndarray:
    return np.asarray(open_output(path)["probabilities"][:])


# --- choosing the runtime ------------------------------------------------------------------


def test_resolve_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_backend("torch", "cpu") == "torch"
    assert resolve_backend("auto", "cuda") == "torch"
    monkeypatch.setattr(backends, "openvino_available", lambda: True)
    assert resolve_backend("auto", "cpu") == "openvino"
    assert resolve_backend("auto", "cpu", compile=True) == "torch"  # compile means torch
    with pytest.raises(InvalidArgumentError, match="runs on the CPU, not on cuda"):
        resolve_backend("openvino", "cuda")
    with pytest.raises(InvalidArgumentError, match="backend='tensorrt' must be one of"):
        resolve_backend("tensorrt", "cpu")
    monkeypatch.setattr(backends, "openvino_available", lambda: False)
    assert resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(InvalidArgumentError, match=r"OpenVINO is not installed; pip install"):
        resolve_backend("openvino", "cpu")


def test_missing_openvino_is_a_one_line_cli_error(tmp_path: Path, image: np.ndarray,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    np.save(tmp_path / "x.npy", image[0])
    monkeypatch.setattr(backends, "openvino_available", lambda: False)
    code = main(["run", str(tmp_path / "x.npy"), "-o", str(tmp_path / "o.zarr"),
                 "--backend", "openvino"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "OpenVINO is not installed" in err
    assert not (tmp_path / "o.zarr").exists()


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.setenv("TILERSEG_CACHE_DIR", str(tmp_path / "c"))
    assert backends.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("TILERSEG_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert backends.cache_dir() == tmp_path / "xdg" / "tilerseg"


def test_cpu_features_are_reported(capsys: pytest.CaptureFixture) -> None:
    features = cpu_features()
    assert set(features) >= {"avx512", "avx512_bf16", "amx_bf16", "bf16", "torch", "openvino"}
    assert features["bf16"] == (features["avx512_bf16"] or features["amx_bf16"])
    assert features["int8"] == (features["avx512_vnni"] or features["avx_vnni"]
                                or features["amx_int8"])
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("compute     CPU: ") and "bf16" in out and "OpenVINO" in out
    assert "--precision int8 runs (NNCF installed)" in out  # NNCF is in the test extra


# --- OpenVINO ------------------------------------------------------------------------------


@openvino
def test_openvino_run_is_exact_and_converts_once(tmp_path: Path, model: torch.nn.Module,
                                                  image: np.ndarray,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    from tilerseg.engine import openvino_backend

    reference = one_shot_reference(image, model)
    for k in range(2):  # the second run reads the converted network from the cache
        openvino_backend._COMPILED.clear()  # as a new process would
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="tilerseg"):
            # 3 x 4 tiles in batches of 5: the last batch is partial, edge tiles mirrored
            out = tilerseg.segment_to_zarr(image, model, tmp_path / f"o{k}.zarr", tile=32,
                                           batch_size=5, dtype="float32", normalize=False,
                                           backend="openvino")
        assert np.abs(probabilities(out) - reference).max() <= 1e-4
        assert "openvino runs the model on cpu" in caplog.text
        converted = "OpenVINO: converted the model" in caplog.text
        assert converted == (k == 0), caplog.text
    assert "read the converted model" in caplog.text
    cached = list((backends.cache_dir() / "openvino").glob("*.xml"))
    assert cached and all(p.with_suffix(".bin").is_file() for p in cached)


@openvino
def test_openvino_threads_share_one_network(tmp_path: Path, model: torch.nn.Module,
                                            image: np.ndarray) -> None:
    """Two pipeline workers, two infer requests: the same output as one worker (up to the
    last bits: OpenVINO's kernels split their sums by its thread layout)."""
    one = tilerseg.segment_to_zarr(image, model, tmp_path / "1.zarr", tile=32,
                                   dtype="float32", normalize=False, backend="openvino",
                                   workers=1)
    two = tilerseg.segment_to_zarr(image, model, tmp_path / "2.zarr", tile=32,
                                   dtype="float32", normalize=False, backend="openvino",
                                   workers=2)
    np.testing.assert_allclose(probabilities(one), probabilities(two), rtol=0, atol=1e-6)


@openvino
@pytest.mark.usefixtures("no_strict_runtime")
def test_openvino_that_changes_the_output_is_not_used(
        monkeypatch: pytest.MonkeyPatch, model: torch.nn.Module, image: np.ndarray,
        caplog: pytest.LogCaptureFixture) -> None:
    from tilerseg.engine import openvino_backend

    real = openvino_backend.openvino_forward

    def scaled(*args, **kwargs):  # logits x 1.5: other probabilities
        forward = real(*args, **kwargs)
        return lambda x: forward(x) * 1.5

    monkeypatch.setattr(openvino_backend, "openvino_forward", scaled)
    with caplog.at_level(logging.WARNING, logger="tilerseg"):
        got = tilerseg.segment(image, model, tile=32, normalize=False, backend="openvino")
    assert "openvino changed the probabilities" in caplog.text
    assert "running torch eagerly" in caplog.text
    assert np.abs(got - one_shot_reference(image, model)).max() <= 1e-4


@openvino
@pytest.mark.usefixtures("no_strict_runtime")
def test_openvino_failure_falls_back_loudly(monkeypatch: pytest.MonkeyPatch,
                                            model: torch.nn.Module, image: np.ndarray,
                                            caplog: pytest.LogCaptureFixture) -> None:
    from tilerseg.engine import openvino_backend

    def broken(*args, **kwargs):
        raise RuntimeError("Exception from src/core: unsupported operation")

    monkeypatch.setattr(openvino_backend, "openvino_forward", broken)
    replica = Replica(model, torch.device("cpu"), 2, backend="openvino")
    with caplog.at_level(logging.WARNING, logger="tilerseg"):
        replica.warm_up((68, 68), 1, 1)
    assert replica.engine == "torch" and not replica.compiled
    assert "openvino failed on cpu (RuntimeError: Exception from src/core" in caplog.text


@openvino
def test_a_failing_runtime_is_an_error_under_strict_runtime(
        monkeypatch: pytest.MonkeyPatch, model: torch.nn.Module, image: np.ndarray) -> None:
    """TILERSEG_STRICT_RUNTIME=1 (set for the whole suite): no fall-back, one clear error."""
    from tilerseg.engine import openvino_backend
    from tilerseg.errors import RuntimeFallbackError

    def broken(*args, **kwargs):
        raise RuntimeError("Exception from src/core: unsupported operation")

    monkeypatch.setattr(openvino_backend, "openvino_forward", broken)
    assert os.environ.get("TILERSEG_STRICT_RUNTIME") == "1"
    with pytest.raises(RuntimeFallbackError, match=r"^openvino failed on cpu \(RuntimeError: "
                       r"Exception from src/core.*TILERSEG_STRICT_RUNTIME=1 forbids"):
        tilerseg.segment(image, model, tile=32, normalize=False, backend="openvino")


@openvino
def test_damaged_cache_entry_is_converted_again(model: torch.nn.Module,
                                                caplog: pytest.LogCaptureFixture) -> None:
    from tilerseg.engine.openvino_backend import converted_model_path, openvino_forward

    from tilerseg.engine import openvino_backend

    shape = (1, 1, 68, 68)
    first = openvino_forward(model, shape)
    assert openvino_forward(model, shape) is first  # compiled once per process
    path = converted_model_path(model, shape)
    path.write_text("<net>not a network")
    openvino_backend._COMPILED.clear()  # as a new process would
    with caplog.at_level(logging.INFO, logger="tilerseg"):
        forward = openvino_forward(model, shape)
    assert "converting again" in caplog.text and "cached the converted model" in caplog.text
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert float((forward(x) - model(x)).abs().max()) <= 1e-4


# --- torch.compile ---------------------------------------------------------------------------


def test_real_compile_is_used_without_new_graphs(tmp_path: Path, model: torch.nn.Module,
                                                 image: np.ndarray,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """torch.compile for real (no monkeypatching): one graph for every batch and tile."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    reference = one_shot_reference(image, model)
    with caplog.at_level(logging.INFO, logger="tilerseg"):
        # 12 tiles in batches of 5: two full batches and a partial one, edge tiles mirrored
        out = tilerseg.segment_to_zarr(image, model, tmp_path / "o.zarr", tile=32,
                                       batch_size=5, dtype="float32", normalize=False,
                                       backend="torch", compile=True)
    assert "torch.compile runs the model on cpu" in caplog.text, caplog.text
    assert np.abs(probabilities(out) - reference).max() <= 1e-4
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    cache = Path(backends.torch_compile_cache())
    assert cache.is_relative_to(backends.cache_dir()) and any(cache.rglob("*.py"))


# --- bf16 ------------------------------------------------------------------------------------


@pytest.mark.skipif(not cpu_features()["bf16"], reason="no bfloat16 units on this CPU")
@pytest.mark.parametrize("backend", BACKENDS)
def test_tiled_bf16_equals_one_shot_bf16(model: torch.nn.Module, image: np.ndarray,
                                         backend: str) -> None:
    """Tiling does not change bf16 results: 1e-4 on torch (the reference's own kernels);
    OpenVINO rounds differently from torch, so it is held to 2e-3 against torch's bf16
    one-shot and to 1e-4 against its own untiled result."""
    reference = one_shot_reference(image, model, "bf16")
    fp32 = one_shot_reference(image, model)
    untiled = tilerseg.segment(image, model, tile=1024, normalize=False, precision="bf16",
                               backend=backend)
    for tile in (16, 48):
        tiled = tilerseg.segment(image, model, tile=tile, batch_size=2, normalize=False,
                                 precision="bf16", backend=backend)
        assert np.abs(tiled - untiled).max() <= 1e-4, tile
        assert np.abs(tiled - reference).max() <= (1e-4 if backend == "torch" else 2e-3)
        # bf16 really computed in bf16: it differs from fp32, by at most a few hundredths
        assert 1e-4 < np.abs(tiled - fp32).max() < 0.1


_FIRST_USE = """
import sys, threading, torch, tilerseg
from tilerseg.engine.openvino_backend import openvino_forward
model = tilerseg.load_model(sys.argv[1])
forward = openvino_forward(model, (1, 1, 68, 68), streams=2, threads=2)  # from the cache
start = threading.Barrier(2)
def first_call():
    start.wait()
    forward(torch.zeros(1, 1, 68, 68))
threads = [threading.Thread(target=first_call) for _ in range(2)]
[t.start() for t in threads]
[t.join() for t in threads]
print("done")
"""


@openvino
def test_every_infer_request_has_its_tensor_views_taken_before_any_thread_uses_it(
        model: torch.nn.Module) -> None:
    """The deadlock fix, checked deterministically: the first numpy view of each request's
    input and output tensor (what deadlocks OpenVINO's bindings when two threads take it at
    once) is taken while the network is set up, in one thread."""
    import openvino

    from tilerseg.engine.openvino_backend import OpenVINOForward

    network = openvino.convert_model(model, example_input=torch.zeros(1, 1, 68, 68))
    compiled = openvino.Core().compile_model(network, "CPU")
    taken: list[tuple[int, str]] = []

    class Tensor:
        def __init__(self, tensor: object, what: tuple[int, str]) -> None:
            self.tensor, self.what = tensor, what

        @property
        def data(self) -> np.ndarray:
            taken.append(self.what)
            return self.tensor.data

    class Request:
        def __init__(self, request: object, number: int) -> None:
            self.request, self.number = request, number

        def get_input_tensor(self, i: int) -> Tensor:
            return Tensor(self.request.get_input_tensor(i), (self.number, "in"))

        def get_output_tensor(self, i: int) -> Tensor:
            return Tensor(self.request.get_output_tensor(i), (self.number, "out"))

    class Compiled:
        made = 0

        def get_property(self, name: str) -> object:
            return compiled.get_property(name)

        def create_infer_request(self) -> Request:
            Compiled.made += 1
            return Request(compiled.create_infer_request(), Compiled.made)

    OpenVINOForward(Compiled(), (1, 1, 68, 68), requests=3)
    assert sorted(taken) == [(k, w) for k in (1, 2, 3) for w in ("in", "out")]


@openvino
@pytest.mark.slow
def test_two_threads_using_a_cached_network_first_do_not_deadlock(tmp_path: Path,
                                                                     model: torch.nn.Module
                                                                     ) -> None:
    """The first numpy view of an OpenVINO tensor, taken by two threads at once, can
    deadlock OpenVINO's bindings; a network read from the cache skips the single-threaded
    check, so the pipeline's compute threads may be first. Without the fix 1 process in
    6-12 hung here, so 12 processes catch a regression more often than not.

    There is no deterministic reproduction: the hang needs two threads inside the same
    C++ static initialiser at once, which no Python-level hook can schedule; the test
    above checks the fix deterministically, this one (slow: 12 processes, ~75 s) the
    hang itself."""
    import subprocess
    import sys

    from tilerseg.engine.openvino_backend import openvino_forward

    path = tilerseg.save_model(model, tmp_path / "m.pt")
    openvino_forward(tilerseg.load_model(path), (1, 1, 68, 68))  # converted and cached
    runs = [subprocess.Popen([sys.executable, "-c", _FIRST_USE, str(path)],
                             stdout=subprocess.PIPE, text=True) for _ in range(12)]
    for run in runs:
        try:
            out, _ = run.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            run.kill()
            pytest.fail("two threads deadlocked on their first OpenVINO call")
        assert run.returncode == 0 and out.strip() == "done"


@openvino
def test_lazy_result_with_a_partial_batch_computed_first(model: torch.nn.Module) -> None:
    """Dask may run the last, partial batch first: the runtime is still built for full
    batches, and every block equals the one-shot reference."""
    import dask.array as da

    image = np.random.default_rng(4).random((1, 150, 118), dtype=np.float32)
    lazy = tilerseg.segment(da.from_array(image[0], chunks=64), model, tile=32, batch_size=4,
                            normalize=False, backend="openvino")
    reference = one_shot_reference(image, model)
    last = lazy.blocks[:, -1, -1].compute()  # 5 x 4 tiles in batches of 4: the 20th alone
    np.testing.assert_allclose(last, reference[:, 128:, 96:], rtol=0, atol=1e-4)
    assert np.abs(lazy.compute() - reference).max() <= 1e-4


@openvino
def test_other_model_code_gets_its_own_converted_network(model: torch.nn.Module) -> None:
    from tilerseg.engine.openvino_backend import converted_model_path
    from tilerseg.models.unet import UNet

    class Negated(UNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return -super().forward(x)

    other = Negated(**model.config)
    other.load_state_dict(model.state_dict())
    shape = (1, 1, 68, 68)
    assert converted_model_path(other, shape) != converted_model_path(model, shape)


@openvino
def test_openvino_refuses_a_precision_it_does_not_compute_in(model: torch.nn.Module) -> None:
    """fp16 runs in f16 where OpenVINO says this CPU computes FP16, and is refused elsewhere
    (OpenVINO would pick bf16 or f32 instead): one outcome, known from the CPU beforehand."""
    import openvino

    from tilerseg.engine.openvino_backend import openvino_forward

    if "FP16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        forward = openvino_forward(model, (1, 1, 68, 68), "fp16")
        assert forward.precision == "f16"
    else:
        with pytest.raises(RuntimeError, match="computes this network in .* not in f16"):
            openvino_forward(model, (1, 1, 68, 68), "fp16")

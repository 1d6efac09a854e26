"""Shared test helpers: Hypothesis settings and the one-shot reference."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import tilerseg
import tilerseg.engine.backends
from tilerseg.engine.compute import STRICT_RUNTIME
from tests.reference import one_shot_reference  # noqa: F401 - the tests import it from here

# Deterministic by default (fixed seeds); HYPOTHESIS_PROFILE=explore searches randomly.
settings.register_profile(
    "default",
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("explore", deadline=None, database=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

BACKENDS = ["torch", "openvino"]
"""The CPU runtimes every exactness test runs on (OpenVINO is in the test extra: without it
the OpenVINO cases fail, they are not left out)."""

# A runtime that a test asks for runs, or the test fails: no fall-back to eager torch in
# this process, its shards and its cluster workers (they inherit the environment). The
# tests of the fall-back itself unset it (``no_strict_runtime``).
os.environ[STRICT_RUNTIME] = "1"


@pytest.fixture
def no_strict_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    """Falling back to eager torch allowed, as it is for users by default."""
    monkeypatch.delenv(STRICT_RUNTIME)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Converted models and compiled kernels go to a folder of this test session."""
    os.environ["TILERSEG_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)




@pytest.fixture(scope="session")
def small_model() -> torch.nn.Module:
    """A depth-3, 4-channel valid U-Net with fixed weights."""
    torch.manual_seed(0)
    return tilerseg.create_model("unet", depth=3, base_channels=4).eval()

"""Shared test helpers: Hypothesis settings and the one-shot reference."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

import tilerseg
import tilerseg.engine.backends

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

BACKENDS = ["torch"] + (["openvino"] if tilerseg.engine.backends.openvino_available() else [])
"""The CPU runtimes every exactness test runs on (OpenVINO is in the test extra)."""


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Converted models and compiled kernels go to a folder of this test session."""
    os.environ["TILERSEG_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)


def one_shot_reference(image: np.ndarray, model: torch.nn.Module,
                       precision: str = "fp32") -> np.ndarray:
    """The reference of DESIGN section 1, written independently of the engine.

    Pad the whole (C, *spatial) image by the halo with numpy ``mode="reflect"``, extend
    the far sides (also by reflection) to an admissible size, run the model once and
    crop to the image. ``image`` must already be normalised float32. ``precision="bf16"``
    runs the model under bfloat16 autocast; the activation is computed in float32.
    """
    g = tilerseg.model_geometry(model)
    pads = [(0, 0)]
    for axis, n in enumerate(image.shape[1:]):
        size = n + 2 * g.halo[axis]
        while not g.is_admissible(size, axis):
            size += 1
        pads.append((g.halo[axis], size - n - g.halo[axis]))
    padded = np.pad(image, pads, mode="reflect")
    model = model.cpu().eval()
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        logits = model(torch.from_numpy(np.ascontiguousarray(padded))[None])[0].float()
    crop = tuple(
        slice(g.crop_offset(a), g.crop_offset(a) + n) for a, n in enumerate(image.shape[1:])
    )
    logits = logits[(slice(None),) + crop]
    probs = torch.sigmoid(logits) if logits.shape[0] == 1 else torch.softmax(logits, dim=0)
    return probs.numpy()


@pytest.fixture(scope="session")
def small_model() -> torch.nn.Module:
    """A depth-3, 4-channel valid U-Net with fixed weights."""
    torch.manual_seed(0)
    return tilerseg.create_model("unet", depth=3, base_channels=4).eval()

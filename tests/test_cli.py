"""The command line: a working demo, and one-line errors with exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tilerseg.cli import main
from tilerseg.synthetic import membrane_image


def test_demo_runs_and_checks_exactness(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "probs.npy"
    status = main(["demo", "--size", "100", "--tile", "32", "--base-channels", "2",
                   "--device", "cpu", "--check", "-o", str(out), "-q"])
    text = capsys.readouterr().out
    assert status == 0
    assert "16 tiles of (32, 32) px" in text
    deviation = float(text.split("max |tiled - one-shot| = ")[1].split()[0])
    assert deviation <= 1e-4
    assert np.load(out).shape == (2, 100, 100)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--tile", "100"], "tile=100 is not admissible"),
        (["demo", "--tile", "-16"], "tile=-16 is not admissible"),
        (["demo", "--device", "gpu"], "device='gpu' is not a device"),
        (["demo", "--size", "0"], "--size 0 must be positive"),
    ],
)
def test_errors_are_one_line_with_status_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    assert main([*args, "--base-channels", "2", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tilerseg: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_console_entry_point_runs_as_a_module() -> None:
    result = subprocess.run([sys.executable, "-m", "tilerseg", "--version"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout.startswith("tilerseg ")


def test_synthetic_membranes_are_reproducible() -> None:
    a, mask = membrane_image((40, 50), seed=7)
    b, _ = membrane_image((40, 50), seed=7)
    np.testing.assert_array_equal(a, b)
    assert 0.5 < (mask == 255).mean() < 0.95
    volume, vmask = membrane_image((8, 30, 30), cell_size=12, seed=1)
    assert volume.shape == vmask.shape == (8, 30, 30)

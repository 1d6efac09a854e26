"""The documentation says what the code does: its examples run, its figures are measured."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "docs" / "benchmarks.md"

FIGURE = re.compile(r"(?<![\w.\-^])(\d+(?:\.\d+)?(?:x|%| Mpx/s| MiB| GiB| s\b| ms\b)|0\.\d{2,3}\b)")
"""A quoted figure: a speed-up, a percentage, a throughput, a size, a time, a fraction."""

SETTINGS = {
    "docs/api.md": {"0.08"},  # membrane_image's noise parameter
    "docs/cli.md": {"10 s"},  # the claims' heartbeat
    "docs/hpc.md": {"10 s", "60 s"},  # the heartbeat, the commit's wait; NFS's acdirmax default
    "docs/model-card.md": {"0.10", "0.35", "0.65"},  # thresholds: the grid, the best ones
    "docs/training.md": {"0.10"},  # the threshold grid
}
"""Numbers that are settings, not measurements: they need no entry in benchmarks.md."""


def _prose(text: str) -> str:
    """``text`` without its fenced code blocks (sample output, commands), lines kept."""
    return re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", [p.relative_to(ROOT).as_posix() for p in _pages()
                                  if p != BENCHMARKS])
def test_every_quoted_figure_has_its_measurement_in_benchmarks_md(page: str) -> None:
    """Each figure quoted in a page appears in docs/benchmarks.md, which gives its command,
    date and machine (a figure rounded differently elsewhere is not the same figure)."""
    measured = BENCHMARKS.read_text(encoding="utf-8")
    text = _prose((ROOT / page).read_text(encoding="utf-8"))
    missing = [f"{page}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
               for m in FIGURE.finditer(text)
               if m.group(0) not in measured and m.group(0) not in SETTINGS.get(page, ())]
    assert not missing, "figures without a measurement in docs/benchmarks.md:\n" + \
        "\n".join(missing)


def test_the_readmes_python_example_runs_as_written(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's Python block, run as a user would paste it, in an empty folder."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    example = next(b for b in blocks if "tilerseg.load_model()" in b)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    exec(compile(example, "README.md", "exec"), namespace)  # noqa: S102 - our own docs
    assert namespace["probs"].shape == (2, 1500, 1000)
    assert (tmp_path / "slide.zarr" / "zarr.json").is_file()
    assert (tmp_path / "results" / "a.tilerseg.zarr" / "zarr.json").is_file()
    assert (tmp_path / "unet.pt").is_file()

"""Pure shape arithmetic: no model, no torch."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tilerseg.errors import InvalidArgumentError, InvalidModelError
from tilerseg.geometry import ModelGeometry, TilePlan, normalize_tile, plan_tiles, reflect_indices

PAPER = ModelGeometry(2, 1, 2, step=(16, 16), min_input=(188, 188), shrink=(184, 184),
                      halo=(92, 92))
MAX_SIDE = {1: 90, 2: 40, 3: 10}  # keeps the number of tiles small
SAME = ModelGeometry(2, 1, 2, step=(16, 16), min_input=(16, 16), shrink=(0, 0), halo=(92, 92))


@st.composite
def geometries(draw: st.DrawFn, ndim: int | None = None) -> ModelGeometry:
    nd = draw(st.integers(1, 3)) if ndim is None else ndim
    depth = draw(st.integers(0, 4))
    step = 2**depth
    halo = draw(st.integers(0, 40 if nd < 3 else 8))
    valid = draw(st.booleans())
    shrink = 2 * halo if valid else 0
    min_input = shrink + draw(st.integers(1, 3 * step)) if valid else step
    return ModelGeometry(nd, 1, 1, (step,) * nd, (min_input,) * nd, (shrink,) * nd, (halo,) * nd)


@given(start=st.integers(-300, 300), size=st.integers(0, 200), n=st.integers(1, 40))
def test_reflect_indices_match_numpy_pad(start: int, size: int, n: int) -> None:
    data = np.arange(n)
    pad = max(0, -start) + max(0, start + size - n) + 1
    padded = np.pad(data, pad, mode="reflect")
    expected = padded[start + pad : start + pad + size]
    np.testing.assert_array_equal(data[reflect_indices(start, size, n)], expected)


def test_paper_geometry_arithmetic() -> None:
    assert PAPER.output_size(572) == 388
    admissible = [n for n in range(100, 700) if PAPER.is_admissible(n)]
    assert admissible == [16 * b + 124 for b in range(4, 36)]
    assert PAPER.admissible_input(573) == 588
    assert PAPER.window_for_tile(1024) == 1212  # output 1028, keep 1024
    assert PAPER.output_size(1212) == 1028
    assert PAPER.crop_offset() == 0 and SAME.crop_offset() == 92
    with pytest.raises(InvalidArgumentError, match="188, 204, 220"):
        PAPER.output_size(570)


@given(geometries(), st.data())
def test_plan_partitions_the_image(g: ModelGeometry, data: st.DataObject) -> None:
    sides = st.integers(1, MAX_SIDE[g.ndim])
    shape = tuple(data.draw(st.lists(sides, min_size=g.ndim, max_size=g.ndim)))
    tile = data.draw(st.integers(1, 6)) * g.step[0]
    plan = plan_tiles(shape, g, tile)
    covered = np.zeros(shape, dtype=np.int32)
    for t in plan:
        covered[t.write] += 1
        for a in range(g.ndim):
            assert (t.read_start[a] + g.halo[a]) % g.step[a] == 0  # on the pooling grid
            assert t.write[a].stop - t.write[a].start == t.crop[a].stop - t.crop[a].start
            assert t.crop[a].stop <= g.output_size(plan.window[a], a)
            # the kept output pixels have their full halo inside the window
            first = t.write[a].start - t.read_start[a]
            assert first >= g.halo[a]
            assert plan.window[a] - (first + t.write[a].stop - t.write[a].start) >= g.halo[a]
    assert covered.min() == 1 and covered.max() == 1
    assert len(plan) == len(list(plan))


@given(geometries(), st.data())
def test_plan_read_crop_write_round_trip(g: ModelGeometry, data: st.DataObject) -> None:
    """An identity 'model' (output = input minus the shrink) reproduces the image."""
    from tilerseg.engine import read_window

    sides = st.integers(1, MAX_SIDE[g.ndim])
    shape = tuple(data.draw(st.lists(sides, min_size=g.ndim, max_size=g.ndim)))
    image = np.random.default_rng(0).random((2,) + shape)
    plan = plan_tiles(shape, g, data.draw(st.integers(1, 4)) * g.step[0])
    out = np.full_like(image, np.nan)
    for t in plan:
        window = read_window(image, t.read_start, plan.window)
        k = [s // 2 for s in g.shrink]
        output = window[(slice(None),) + tuple(slice(k[a], plan.window[a] - k[a]) for a in range(g.ndim))]
        out[(slice(None),) + t.write] = output[(slice(None),) + t.crop]
    np.testing.assert_array_equal(out, image)


def test_tile_validation_names_the_problem() -> None:
    with pytest.raises(InvalidArgumentError, match=r"tile=100 is not admissible.*multiples of .*16"):
        normalize_tile(100, PAPER, (500, 500))
    for bad in (0, -16, True, 16.0, "32", (16,), (16, 16, 16)):
        with pytest.raises(InvalidArgumentError, match="tile="):
            normalize_tile(bad, PAPER, (500, 500))
    assert normalize_tile((32, 512), PAPER, (500, 17)) == (32, 32)
    assert isinstance(InvalidArgumentError("x"), ValueError)


def test_inconsistent_geometry_is_rejected() -> None:
    with pytest.raises(InvalidModelError):
        ModelGeometry(2, 1, 2, (16, 16), (188, 188), (183, 183), (92, 92))  # odd shrink
    with pytest.raises(InvalidModelError):
        ModelGeometry(2, 1, 2, (16,), (188,), (184,), (92,))  # wrong length
    with pytest.raises(InvalidArgumentError):
        TilePlan((0, 10), (16, 16), PAPER)

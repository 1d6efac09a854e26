"""Each architecture's geometry from its paper's structure, independently of the engine.

An architecture is written down here a second time, per spatial axis, as a small graph
of one-dimensional operations (3x3 convolution, pooling by a factor, up-sampling, skip
concatenation, score addition), from the papers' descriptions and never by running a
module. Two walks over that graph give the geometry:

* sizes, forwards: the admissible input sides (no pooling floors, every node at least one
  pixel, skips at least as large as what they are concatenated with, added scores equal),
  hence the pooling step, the smallest admissible side and the shrink;
* dependencies, backwards: the input interval an aligned output block of one pooling step
  depends on, with the exact floor arithmetic of each pooling and up-sampling, hence the
  receptive-field radius (the halo of a same-padded model).

``expected_geometry(name, config)`` combines them into a :class:`tilerseg.ModelGeometry`
to compare with :func:`tilerseg.model_geometry`'s probe and to give the one-shot reference.
No pytest import: a plain helper module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from tilerseg.geometry import ModelGeometry

__all__ = ["ARCHITECTURES", "expected_geometry", "axis_graph"]

# The architectures' defaults as their papers / presets state them (not read from code).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "unet": dict(ndim=2, in_channels=1, num_classes=2, depth=4, padding="valid",
                 up="transpose", pool=2),
    "unet3d": dict(ndim=3, in_channels=1, num_classes=2, depth=3, padding="valid",
                   up="transpose", pool=None),  # None: in-plane pooling, then all axes
    "unet-keras": dict(ndim=2, in_channels=1, num_classes=1, depth=4, padding="same",
                       up="transpose", pool=2),
    "unetpp": dict(ndim=2, in_channels=1, num_classes=2, depth=4, padding="same",
                   up="transpose", pool=2, prune=None),
    "fcn8s": dict(ndim=2, in_channels=1, num_classes=2, convs_per_stage=2, fc_kernel=7),
}


@dataclass
class Graph:
    """A one-dimensional network: node ``k`` is ``(op, params, inputs)``; node 0 is the
    input and the last node the output."""

    nodes: list[tuple[str, dict, tuple[int, ...]]] = field(
        default_factory=lambda: [("input", {}, ())])

    def add(self, op: str, *inputs: int, **params: Any) -> int:
        self.nodes.append((op, params, inputs))
        return len(self.nodes) - 1

    def conv(self, x: int, k: int, same: bool) -> int:
        return self.add("conv", x, k=k, pad=(k - 1) // 2 if same else 0)


# --- the architectures, one axis at a time --------------------------------------------------


def _factors(cfg: dict, axis: int) -> list[int]:
    pool, depth, ndim = cfg["pool"], cfg["depth"], cfg["ndim"]
    if pool is None:  # unet3d's preset: (1, 2, 2) on every level but the deepest (2, 2, 2)
        pool = [[1, 2, 2]] * (depth - 1) + [[2, 2, 2]]
    if isinstance(pool, int):
        return [pool] * depth
    assert len(pool) == depth and all(len(f) == ndim for f in pool)
    return [f[axis] for f in pool]


def _up(g: Graph, x: int, f: int, cfg: dict) -> int:
    valid = cfg["padding"] == "valid"
    if cfg["up"] == "transpose":  # kernel = stride = factor
        return g.add("upconv", x, f=f, k=f, pad=0)
    return g.add("bilinear", x, f=f, crop=f // 2 if valid else 0)  # then a 1x1 conv


def _unet_axis(cfg: dict, axis: int) -> Graph:
    """Ronneberger et al. 2015: two 3x3 convs per level, pooling down, up-conv, skip."""
    g, same, f = Graph(), cfg["padding"] == "same", _factors(cfg, axis)
    x, skips = 0, []
    for level in range(cfg["depth"]):
        x = g.conv(g.conv(x, 3, same), 3, same)
        skips.append(x)
        x = g.add("pool", x, f=f[level])
    x = g.conv(g.conv(x, 3, same), 3, same)
    for level in reversed(range(cfg["depth"])):
        x = g.add("concat", skips[level], _up(g, x, f[level], cfg))
        x = g.conv(g.conv(x, 3, same), 3, same)
    return g


def _unetpp_axis(cfg: dict, axis: int) -> Graph:
    """Zhou et al. 2018: X(i,j) = H([X(i,0..j-1), U(X(i+1,j-1))]); output X(0, prune)."""
    g, same, f = Graph(), cfg["padding"] == "same", _factors(cfg, axis)
    d = cfg.get("prune") or cfg["depth"]
    node: dict[tuple[int, int], int] = {}
    x = 0
    for i in range(d + 1):
        if i:
            x = g.add("pool", x, f=f[i - 1])
        x = node[i, 0] = g.conv(g.conv(x, 3, same), 3, same)
    for j in range(1, d + 1):
        for i in range(d + 1 - j):
            u = _up(g, node[i + 1, j - 1], f[i], cfg)
            c = g.add("concat", *[node[i, k] for k in range(j)], u)
            node[i, j] = g.conv(g.conv(c, 3, same), 3, same)
    g.add("conv", node[0, d], k=1, pad=0)  # the head; the output is the last node
    return g


def _fcn8s_axis(cfg: dict, axis: int) -> Graph:
    """Long et al. 2015: VGG stages, fc6/fc7, scores at pool3/pool4/fc7, 2x, 2x, 8x."""
    g, x, pools = Graph(), 0, []
    for _ in range(5):
        for _ in range(cfg["convs_per_stage"]):
            x = g.conv(x, 3, True)
        x = g.add("pool", x, f=2)
        pools.append(x)
    x = g.conv(g.conv(x, cfg["fc_kernel"], True), 1, True)  # fc6, fc7; score_fr is 1x1
    x = g.add("upconv", x, f=2, k=4, pad=1)
    x = g.add("add", x, pools[3])  # + score_pool4 (1x1)
    x = g.add("upconv", x, f=2, k=4, pad=1)
    x = g.add("add", x, pools[2])  # + score_pool3 (1x1)
    g.add("upconv", x, f=8, k=16, pad=4)
    return g


_AXIS_GRAPHS = {"unet": _unet_axis, "unet3d": _unet_axis, "unet-keras": _unet_axis,
                "unetpp": _unetpp_axis, "fcn8s": _fcn8s_axis}


def axis_graph(name: str, config: dict, axis: int) -> Graph:
    """The one-dimensional graph of architecture ``name`` with ``config`` on ``axis``."""
    return _AXIS_GRAPHS[name]({**ARCHITECTURES[name], **config}, axis)


# --- the two walks -------------------------------------------------------------------------


def output_size(g: Graph, n: int) -> int | None:
    """Output side for input side ``n``, or None where ``n`` is not admissible."""
    size: list[int] = []
    for op, p, inputs in g.nodes:
        s = [size[k] for k in inputs]
        if op == "input":
            out = n
        elif op == "conv":
            out = s[0] + 2 * p["pad"] - p["k"] + 1
        elif op == "pool":
            if s[0] % p["f"]:
                return None  # PyTorch would floor: not admissible
            out = s[0] // p["f"]
        elif op == "upconv":
            out = (s[0] - 1) * p["f"] - 2 * p["pad"] + p["k"]
        elif op == "bilinear":
            out = s[0] * p["f"] - 2 * p["crop"]
        elif op == "concat":  # skips centre-cropped to the up-sampled branch (last)
            if any(v < s[-1] for v in s[:-1]):
                return None
            out = s[-1]
        elif op == "add":
            if len(set(s)) != 1:
                return None
            out = s[0]
        else:
            raise ValueError(op)
        if out < 1:
            return None
        size.append(out)
    return size[-1]


def dependency(g: Graph, lo: int, hi: int) -> tuple[int, int]:
    """Input interval that output pixels ``lo..hi`` depend on (same padding: every node
    of a same-padded network shares the input's coordinates at its own resolution)."""
    need: dict[int, tuple[int, int]] = {len(g.nodes) - 1: (lo, hi)}
    for k in range(len(g.nodes) - 1, 0, -1):
        if k not in need:
            continue
        op, p, inputs = g.nodes[k]
        a, b = need[k]
        if op == "conv":
            r = p["pad"]  # odd kernel, centred
            a, b = a - r, b + r
        elif op == "pool":  # output o reads inputs f*o .. f*o + f - 1
            a, b = p["f"] * a, p["f"] * b + p["f"] - 1
        elif op == "upconv":  # o = i*f - pad + t, 0 <= t < k
            f, pad, kk = p["f"], p["pad"], p["k"]
            a, b = -((kk - 1 - a - pad) // f), (b + pad) // f
        elif op == "bilinear":  # o (after the crop) samples source (o + crop + 1/2)/f - 1/2
            f, c = p["f"], p["crop"]
            xa = Fraction(2 * (a + c) + 1, 2 * f) - Fraction(1, 2)
            xb = Fraction(2 * (b + c) + 1, 2 * f) - Fraction(1, 2)
            a, b = math.floor(xa), math.ceil(xb)  # a tap of weight 0 reads nothing
        for i in inputs:
            old = need.get(i)
            need[i] = (a, b) if old is None else (min(old[0], a), max(old[1], b))
    return need[0]


def expected_geometry(name: str, config: dict) -> ModelGeometry:
    """The geometry of architecture ``name`` with ``config``, from :func:`axis_graph`.

    Valid models: halo = shrink / 2. Same-padded models: halo = the receptive-field
    radius of an aligned output block of one pooling step, by :func:`dependency`.
    """
    cfg = {**ARCHITECTURES[name], **config}
    step, min_input, shrink, halo = [], [], [], []
    for axis in range(cfg["ndim"]):
        g = axis_graph(name, config, axis)
        sides = []
        n = 1
        while len(sides) < 3:
            if output_size(g, n) is not None:
                sides.append(n)
            n += 1
            assert n < 1 << 14, f"no admissible sides for {name} {config}"
        s = sides[1] - sides[0]
        k = {m - output_size(g, m) for m in sides}
        assert sides[2] - sides[1] == s and len(k) == 1, (name, config, sides)
        step.append(s)
        min_input.append(sides[0])
        shrink.append(k.pop())
        if shrink[-1]:
            halo.append(shrink[-1] // 2)
        else:
            start = 1000 * s  # any block on the pooling grid
            a, b = dependency(g, start, start + s - 1)
            halo.append(max(start - a, b - (start + s - 1)))
    return ModelGeometry(cfg["ndim"], cfg["in_channels"], cfg["num_classes"], tuple(step),
                         tuple(min_input), tuple(shrink), tuple(halo))

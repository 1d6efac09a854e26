"""How a :class:`~tilerseg.geometry.ModelGeometry` maps onto a bioimage.io tensor's axes,
and back. Plain integer arithmetic; the bioimage.io classes are built by the callers.

The mapping, per spatial axis ``a`` of a model with pooling step ``s``, smallest
admissible input ``m``, shrink ``k`` (input minus output) and halo ``h``:

* the input axis has ``ParameterizedSize(min=M, step=s)``: the admissible sides
  ``M + n s``. ``M`` is ``m``, raised by whole steps where needed so that the output at
  ``M`` keeps at least one pixel after its halo is cropped (bioimage.io requires it);
* the output axis has ``SizeReference(input, a, offset=-k)``: output = input - k;
* the context the network does not crop itself, ``h - k / 2``, is the output axis's
  ``halo`` (bioimage.io: crop it from both sides of the output). A valid-convolution
  U-Net crops its own context (``h = k / 2``): no ``halo``, offset ``-2h``. A
  same-padded network (``k = 0``) has ``halo = h``, its receptive-field radius.

That is how a package of another network reads (:func:`axis_sizes`). tilerseg's own
packages hold the network wrapped to map blocks to outputs of their size
(:class:`tilerseg.bioimageio.network.TiledNetwork`), which bioimageio.core can tile: per
axis ``ParameterizedSize(min=2 H + I0, step=s)``, ``SizeReference(input, a, offset=0)``
and ``halo = H``, with ``2 H`` and ``I0`` multiples of ``s`` (:func:`block_halo`,
:func:`block_sizes`).

Back from a package: ``step = s``, ``min_input = M``, ``shrink = -offset`` and
``halo = -offset / 2 + halo``. Tiles are exact when their origins sit on the grid of
``step`` (the package's step is taken as the network's total downsampling factor) and the
halo covers the receptive field, as the package declares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InvalidModelError
from ..geometry import ModelGeometry

__all__ = ["AxisSizes", "axis_sizes", "block_halo", "block_sizes", "geometry_from_sizes",
           "SPATIAL_IDS"]

SPATIAL_IDS = {2: ("y", "x"), 3: ("z", "y", "x")}
"""bioimage.io axis ids of tilerseg's spatial axes (rows are ``y``), per dimensionality."""


@dataclass(frozen=True)
class AxisSizes:
    """One spatial axis as bioimage.io declares it.

    Attributes
    ----------
    id : str
        Axis id (``"z"``, ``"y"`` or ``"x"``).
    min, step : int
        The input's ``ParameterizedSize``.
    offset : int
        The output's ``SizeReference`` offset (minus the shrink).
    halo : int
        The output's halo to crop (0: none declared).
    """

    id: str
    min: int
    step: int
    offset: int
    halo: int


def axis_sizes(geometry: ModelGeometry) -> list[AxisSizes]:
    """The bioimage.io sizes of each spatial axis of ``geometry``.

    Parameters
    ----------
    geometry : ModelGeometry
        The model's geometry (2D or 3D).

    Returns
    -------
    list of AxisSizes
        In tilerseg's axis order (``z``, ``y``, ``x``).

    Raises
    ------
    InvalidModelError
        A geometry of other than 2 or 3 spatial axes.

    Examples
    --------
    The paper's valid U-Net (depth 4) crops its own context:

    >>> g = ModelGeometry(2, 1, 2, (16, 16), (188, 188), (184, 184), (92, 92))
    >>> axis_sizes(g)[0]
    AxisSizes(id='y', min=188, step=16, offset=-184, halo=0)

    A same-padded one (receptive-field radius 22) declares its halo; its smallest
    input is raised so that one pixel is left after cropping it:

    >>> g = ModelGeometry(2, 1, 1, (4, 4), (4, 4), (0, 0), (22, 22))
    >>> axis_sizes(g)[1]
    AxisSizes(id='x', min=48, step=4, offset=0, halo=22)
    """
    # the smallest input whose output keeps one pixel after the halo is cropped
    return [AxisSizes(axis_id, geometry.window_for_tile(1, a), geometry.step[a],
                      -geometry.shrink[a], geometry.crop_offset(a))
            for a, axis_id in _spatial_ids(geometry)]


def _spatial_ids(geometry: ModelGeometry) -> list[tuple[int, str]]:
    """``(axis, bioimage.io axis id)`` of each spatial axis of ``geometry``.

    Raises
    ------
    InvalidModelError
        A geometry of other than 2 or 3 spatial axes.
    """
    if geometry.ndim not in SPATIAL_IDS:
        raise InvalidModelError(
            f"a bioimage.io package needs a 2D or 3D model, not {geometry.ndim}D")
    return list(enumerate(SPATIAL_IDS[geometry.ndim]))


def block_halo(geometry: ModelGeometry, axis: int = 0) -> tuple[int, int]:
    """The output halo ``H`` and smallest inner region ``I0`` of blocks of ``geometry`` on
    ``axis`` (see :mod:`tilerseg.bioimageio.network`).

    ``I0`` is the smallest multiple of the step ``s`` whose window (``I0 + 2 h`` rounded up
    to an admissible side ``W``) the network runs on; ``H`` the smallest value with ``2 H``
    a multiple of ``s`` that covers the context ``h`` before the inner region and the
    ``W - I0 - h`` px after it (the same for every larger multiple of ``s``).

    Examples
    --------
    >>> g = ModelGeometry(2, 1, 2, (16, 16), (188, 188), (184, 184), (92, 92))
    >>> block_halo(g)  # the window of a 16 px region is 16 + 184 + 4 px
    (96, 16)
    >>> block_halo(ModelGeometry(2, 1, 2, (4, 4), (44, 44), (40, 40), (20, 20)))
    (20, 4)
    """
    s, m, h = geometry.step[axis], geometry.min_input[axis], geometry.halo[axis]
    inner = max(s, -(-(m - 2 * h) // s) * s)
    far = geometry.admissible_input(inner + 2 * h, axis) - inner - h
    unit = s // math.gcd(2, s)
    return -(-max(h, far) // unit) * unit, inner


def block_sizes(geometry: ModelGeometry) -> list[AxisSizes]:
    """The bioimage.io sizes of each spatial axis of ``geometry`` wrapped to map blocks to
    outputs of their size (what tilerseg's packages declare; see the module notes).

    Parameters
    ----------
    geometry : ModelGeometry
        The network's geometry (2D or 3D).

    Returns
    -------
    list of AxisSizes
        In tilerseg's axis order (``z``, ``y``, ``x``): ``min = 2 H + I0``, ``step = s``,
        ``offset = 0``, ``halo = H`` (see :func:`block_halo`).

    Raises
    ------
    InvalidModelError
        A geometry of other than 2 or 3 spatial axes.

    Examples
    --------
    The paper's valid U-Net (depth 4, context 92): a halo of 96, blocks of 208 + 16 n:

    >>> g = ModelGeometry(2, 1, 2, (16, 16), (188, 188), (184, 184), (92, 92))
    >>> block_sizes(g)[0]
    AxisSizes(id='y', min=208, step=16, offset=0, halo=96)
    """
    out = []
    for a, axis_id in _spatial_ids(geometry):
        halo, inner = block_halo(geometry, a)
        out.append(AxisSizes(axis_id, 2 * halo + inner, geometry.step[a], 0, halo))
    return out


def geometry_from_sizes(sizes: list[AxisSizes], in_channels: int,
                        out_channels: int) -> ModelGeometry:
    """The tiling geometry a package's declared sizes mean (see the module notes).

    Parameters
    ----------
    sizes : list of AxisSizes
        Per spatial axis, in the order the engine feeds them.
    in_channels, out_channels : int
        Channels of the input and output tensors.

    Returns
    -------
    ModelGeometry

    Raises
    ------
    InvalidModelError
        Sizes no tiling can use (an odd or negative shrink, an output of no pixel).

    Examples
    --------
    >>> s = [AxisSizes("y", 188, 16, -184, 0), AxisSizes("x", 188, 16, -184, 0)]
    >>> g = geometry_from_sizes(s, 1, 2)
    >>> g.halo, g.output_size(572)
    ((92, 92), 388)
    """
    shrink, halo = [], []
    for s in sizes:
        if s.offset > 0 or s.offset % 2:
            raise InvalidModelError(
                f"output axis {s.id!r} is input {s.offset:+d} px: tilerseg tiles networks "
                "whose output is as large as the input or smaller by the same number of px "
                "on both sides (an even offset <= 0)")
        shrink.append(-s.offset)
        halo.append(-s.offset // 2 + s.halo)
    return ModelGeometry(len(sizes), in_channels, out_channels,
                         tuple(s.step for s in sizes), tuple(s.min for s in sizes),
                         tuple(shrink), tuple(halo))

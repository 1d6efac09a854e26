"""The network a bioimage.io package holds: :class:`TiledNetwork`, a tilerseg network that
maps a block of the input to an output of the block's size, whose declared ``halo`` is to be
cropped. Blocks that overlap by the halo then stitch to tilerseg's exact result.

bioimageio.core (and consumers that follow it) tiles a package blockwise: per spatial
axis it cuts the image into inner regions of ``I = N - 2 H`` px (``N`` an admissible
block side, ``H`` the output's halo) starting at ``0, I, 2 I, ...`` (the last one moved
back to end at the image's border), reads each with ``H`` px more on both sides (padded
beyond the image in the input's ``pad`` mode, here numpy's ``reflect`` as tilerseg
does), runs the network and keeps the inner ``I`` px of its output. A network whose output
is smaller than its input, or that pools, cannot be run like that; this module wraps it:

1. of a block (image positions ``o - H .. o + I + H``, ``o`` the inner region's start),
   the network reads the window tilerseg reads for an output tile ``o .. o + I``: from
   ``o - h`` (``h`` its context, the halo of its geometry; the first ``H - h`` px are
   dropped), of the admissible side ``W`` tilerseg computes for ``I + 2 h`` (a pooling
   network needs a few more pixels on the far side than its context, to complete its
   last pooling cells: ``W - I - h`` of them);
2. of the network's output, the ``I`` px of positions ``o .. o + I`` are kept and ``H`` px
   of zeros are put on both sides: the output has the block's size.

The kept pixels are tilerseg's exactly when the window starts on the pooling grid of
tilerseg's one-pass reference (which starts at ``-h``), i.e. when ``o`` is a multiple of
the pooling step ``s``, and the block holds the whole window, ``H >= W - I - h``: the
package declares blocks ``N = 2 H + I0 + n s`` with ``2 H`` and ``I0`` multiples of ``s``
(so ``I`` is one), and bioimageio.core accepts an image only when its side is such an
``N``, a multiple of ``s`` (so is the last, moved-back region's start). A block of
another side still runs, its window filled up with zeros at the far end where it lacks
pixels (not exact there).

The module needs nothing but torch and tilerseg's architectures: a package carries it, with
the architectures' source, as one self-contained file (see :func:`architecture_source`).
"""

from __future__ import annotations

from typing import Any, List

import torch
import torch.nn.functional as F
from torch import nn

from ..models.fcn import FCN8s
from ..models.unet import UNet
from ..models.unetpp import UNetPlusPlus

__all__ = ["TiledNetwork", "architecture_source", "EMBEDDED"]

EMBEDDED = {"UNet": UNet, "UNetPlusPlus": UNetPlusPlus, "FCN8s": FCN8s}
"""The architectures a package's source file carries (by class name)."""


def _network(architecture: str, config: dict[str, Any]) -> nn.Module:
    """The network of a class name :data:`EMBEDDED` names, or of another registered name."""
    if architecture in EMBEDDED:
        return EMBEDDED[architecture](**config)
    from tilerseg.models.registry import create_model  # a model registered in tilerseg

    return create_model(architecture, **config)


class TiledNetwork(nn.Module):
    """A network that maps a block ``(N, C, *block)`` to logits ``(N, K, *block)``, whose
    outer ``halo`` px per side are zeros to be cropped (see the module notes).

    Parameters
    ----------
    architecture : str
        A class name of :data:`EMBEDDED` (``config`` are its keyword arguments), or a name
        registered in tilerseg's model registry.
    config : dict
        The network's configuration (``model.config``).
    halo : list of int
        Per spatial axis, the output's halo ``H``.
    context : list of int
        Per spatial axis, the network's context ``h`` (``H >= h``).
    crop : list of int
        Per spatial axis, where the first pixel with its full context lies in the
        network's output (``h - shrink / 2``: 0 for a valid network).
    step, min_input : list of int
        Per spatial axis, the network's admissible input sides ``min_input + n step``.
    network : torch.nn.Module, optional
        The network itself (then ``architecture`` and ``config`` only name it), e.g. a
        TorchScript trace of it.

    Examples
    --------
    >>> import torch, tilerseg
    >>> unet = tilerseg.create_model(depth=2, base_channels=2)
    >>> net = TiledNetwork("UNet", unet.config, [20, 20], [20, 20], [0, 0], [4, 4], [44, 44])
    >>> net(torch.zeros(1, 1, 84, 88)).shape
    torch.Size([1, 2, 84, 88])
    """

    def __init__(self, architecture: str, config: dict[str, Any], halo: List[int],
                 context: List[int], crop: List[int], step: List[int], min_input: List[int],
                 network: nn.Module | None = None) -> None:
        super().__init__()
        lists = [list(map(int, v)) for v in (halo, context, crop, step, min_input)]
        if len({len(v) for v in lists}) != 1 or any(h < c for h, c in zip(lists[0], lists[1])):
            raise ValueError(f"halo={halo}, context={context}, crop={crop}, step={step} and "
                             f"min_input={min_input} must have one entry per spatial axis, "
                             "each halo at least its context")
        self.network = network if network is not None else _network(architecture, dict(config))
        self.halo, context, self.crop, self.step, self.min_input = lists
        self.skip = [h - c for h, c in zip(self.halo, context)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the block ``x`` (see the class notes)."""
        ndim = len(self.halo)
        inner: List[int] = []
        fill: List[int] = []
        for a in range(ndim):
            n, m, s = x.shape[2 + a], self.min_input[a], self.step[a]
            inner.append(n - 2 * self.halo[a])
            want = inner[a] + 2 * (self.halo[a] - self.skip[a])  # inner region plus context
            window = m if want <= m else m + (want - m + s - 1) // s * s  # admissible
            have = min(window, n - self.skip[a])
            x = x.narrow(2 + a, self.skip[a], have)
            fill = [0, window - have] + fill  # F.pad lists the last axis first
        y = self.network(F.pad(x, fill))
        zeros: List[int] = []
        for a in range(ndim):
            y = y.narrow(2 + a, self.crop[a], inner[a])
            zeros = [self.halo[a], self.halo[a]] + zeros
        return F.pad(y, zeros)


def architecture_source() -> str:
    """One Python file holding tilerseg's architectures (:data:`EMBEDDED`) and
    :class:`TiledNetwork`: the modules' source with their imports of each other and of
    tilerseg removed, for a package's state-dict weights."""
    import ast
    import inspect

    from .. import errors
    from ..models import fcn, unet, unetpp
    from . import network

    parts = ['"""tilerseg\'s segmentation networks and the block wrapper of its bioimage.io\n'
             'packages (generated from tilerseg\'s source; needs only torch)."""\n\n'
             "from __future__ import annotations\n\n\n"
             "class InvalidModelError(ValueError):\n"
             f'    """{inspect.getdoc(errors.InvalidModelError).splitlines()[0]}"""\n']
    for module in (unet, unetpp, fcn, network):
        text = inspect.getsource(module)
        lines = text.splitlines()
        drop: set[int] = set()
        for node in ast.parse(text).body:
            if (isinstance(node, ast.ImportFrom) and (node.level > 0 or
                                                      node.module == "__future__")):
                drop.update(range(node.lineno - 1, node.end_lineno))
            elif (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                  and isinstance(node.value.value, str)) or (
                    isinstance(node, ast.Assign)
                    and any(getattr(t, "id", None) == "__all__" for t in node.targets)):
                drop.update(range(node.lineno - 1, node.end_lineno))  # docstring, __all__
            elif isinstance(node, ast.FunctionDef) and node.name == "architecture_source":
                drop.update(range(node.lineno - 1, node.end_lineno))
        kept = "\n".join(line for i, line in enumerate(lines) if i not in drop).strip()
        parts.append(f"\n\n# -- from {module.__name__} " + "-" * 40 + "\n\n" + kept + "\n")
    return "".join(parts)

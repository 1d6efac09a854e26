"""Read a bioimage.io model package as a tilerseg model: :func:`load_bioimageio`.

A package written by :func:`tilerseg.bioimageio.export_bioimageio` is rebuilt exactly:
the architecture from tilerseg's registry with the package's configuration, its
state-dict weights (the network's part of the block wrapper's, or the network's own in
packages written before the wrapper), its metadata and normalisation; its architecture
source file is not run. Any other package runs through its
TorchScript weights (or state-dict weights whose architecture is a ``torch.nn.Module``
class of ``torch`` or ``tilerseg``: no other module a package names is ever imported),
wrapped in a module that feeds it the axes it declares; its geometry comes
from its declared sizes and halo (see :mod:`tilerseg.bioimageio.sizes`) and its
normalisation from its preprocessing (see :mod:`tilerseg.bioimageio.processing`).

What cannot be run exactly is refused with one line naming it: several inputs or
outputs, time or index axes, fixed sizes, postprocessing other than a sigmoid/softmax,
per-channel statistics or statistics over some spatial axes only, weights other than
TorchScript / PyTorch state dicts, architectures outside ``torch`` and ``tilerseg``, and a
package that declares no halo (unless one is given).
"""

from __future__ import annotations

import io
import logging
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InvalidModelError, ModelNotFoundError
from ..normalize import NormalizeSpec
from .processing import activation_of, normalization_of
from .sizes import AxisSizes, axis_sizes, geometry_from_sizes

__all__ = ["load_bioimageio", "is_package", "require_spec", "PackagedNetwork"]

log = logging.getLogger(__name__)

_YAML_NAMES = ("rdf.yaml", "bioimageio.yaml")
_CANONICAL = "zyx"


def require_spec() -> None:
    """Import ``bioimageio.spec`` or raise a one-line error naming the extra."""
    try:
        import bioimageio.spec  # noqa: F401
    except ImportError:
        raise InvalidModelError(
            "bioimage.io packages need bioimageio.spec (pip install \"tilerseg[bioimageio]\")"
        ) from None


def _is_yaml_name(name: str) -> bool:
    return name in _YAML_NAMES or name.endswith(".bioimageio.yaml")


def _yaml_in(folder: Path) -> list[Path]:
    """The package descriptions in a folder: rdf.yaml, bioimageio.yaml, *.bioimageio.yaml."""
    return [*(folder / n for n in _YAML_NAMES if (folder / n).is_file()),
            *sorted(p for p in folder.glob("*.bioimageio.yaml") if p.is_file())]


def is_package(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a bioimage.io package: a ``.zip`` holding an ``rdf.yaml``,
    ``bioimageio.yaml`` or ``*.bioimageio.yaml``, such a file, or a folder holding one. Reads no more than the
    zip's directory; needs no extra.

    Examples
    --------
    >>> is_package("model.pt"), is_package("/nonexistent/rdf.yaml")
    (False, True)
    """
    p = Path(path)
    if _is_yaml_name(p.name):
        return True
    if p.is_dir():
        return bool(_yaml_in(p))
    if p.suffix.lower() == ".zip" and p.is_file():
        try:
            with zipfile.ZipFile(p) as z:
                return any(_is_yaml_name(n) for n in z.namelist())
        except (zipfile.BadZipFile, OSError):
            return False
    return False


def _description(path: str | os.PathLike, label: str) -> Any:
    """The package's model description, in the latest format (0.4 is converted)."""
    require_spec()
    from bioimageio.spec import InvalidDescr, load_model_description

    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(f"bioimage.io package {str(path)!r} does not exist")
    if p.is_dir():
        found = _yaml_in(p)
        if not found:
            raise InvalidModelError(f"{label} is a folder without an rdf.yaml, "
                                    "bioimageio.yaml or *.bioimageio.yaml: not a bioimage.io "
                                    "package")
        p = found[0]
    try:
        descr = load_model_description(str(p), format_version="latest",
                                       perform_io_checks=False)
    except Exception as exc:  # a non-model resource, unreadable YAML or zip
        raise InvalidModelError(f"{label} is not a bioimage.io model ({_reason(exc)})") from None
    if isinstance(descr, InvalidDescr) or not hasattr(descr, "inputs"):
        errors = [f"{'.'.join(map(str, e.loc))}: {e.msg}"
                  for e in descr.validation_summary.errors]
        raise InvalidModelError(f"{label} is not a valid bioimage.io model package "
                                f"({errors[0][:200] if errors else 'invalid'})")
    return descr


def _reason(exc: BaseException) -> str:
    """An exception's first line (at most 200 characters), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _read(source: Any) -> bytes:
    from bioimageio.spec.utils import get_reader

    return get_reader(source).read()


# -- the packaged network ---------------------------------------------------------------------


class PackagedNetwork(nn.Module):
    """A bioimage.io package's network with tilerseg's tensor contract.

    Takes ``(N, C, *spatial)`` float32 (spatial axes ``z, y, x`` as the engine feeds them),
    reorders it into the package's input axes, runs the network and returns
    ``(N, K, *spatial)`` logits for the engine's sigmoid/softmax.

    Parameters
    ----------
    network : torch.nn.Module
        The TorchScript module or the rebuilt state-dict module.
    input_axes, output_axes : sequence of str
        The package's axis kinds in order: ``"batch"``, ``"channel"`` or a spatial id.
    spatial : sequence of str
        The spatial ids in the engine's order.
    probability : bool
        The network outputs one channel in [0, 1]: returned as its logit.
    batch_size : int, optional
        The batch size the package fixes (e.g. ``BatchAxis(size=1)``): samples are then
        run that many at a time.
    """

    def __init__(self, network: nn.Module, input_axes: Sequence[str],
                 output_axes: Sequence[str], spatial: Sequence[str],
                 probability: bool = False, batch_size: int | None = None) -> None:
        super().__init__()
        self.network = network
        self.input_axes, self.output_axes = list(input_axes), list(output_axes)
        self.spatial, self.probability = list(spatial), probability
        self.batch_size = batch_size

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        """Run on ``x`` with axes ``[batch?] channel spatial`` as the package lacks."""
        src = (["batch"] if "batch" in self.input_axes else []) + ["channel", *self.spatial]
        if "channel" not in self.input_axes:
            x = x.squeeze(src.index("channel"))
            src.remove("channel")
        x = x.permute(*[src.index(a) for a in self.input_axes])
        y = self.network(x)
        dst = (["batch"] if "batch" in self.input_axes else []) + ["channel", *self.spatial]
        order = list(self.output_axes)
        if "channel" not in order:
            y, order = y.unsqueeze(0), ["channel", *order]
        if "batch" in self.input_axes and "batch" not in order:
            y, order = y.unsqueeze(0), ["batch", *order]
        return y.permute(*[order.index(a) for a in dst])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, K, *spatial)`` of ``x`` ``(N, C, *spatial)`` (see the class notes)."""
        if "batch" in self.input_axes and self.batch_size is not None:
            n, parts = self.batch_size, []  # a fixed batch size: that many samples a call
            for i in range(0, x.shape[0], n):
                part = x[i:i + n]
                short = n - part.shape[0]  # the last call filled up with its last sample
                full = torch.cat([part, part[-1:].expand(short, *part.shape[1:])])
                parts.append(self._one(full)[:part.shape[0]])
            y = torch.cat(parts)
        elif "batch" in self.input_axes:
            y = self._one(x)
        else:
            y = torch.stack([self._one(s) for s in x])
        if self.probability:
            y = torch.logit(y.float(), eps=1e-7)
        return y


# -- axes -------------------------------------------------------------------------------------


def _axis_kind(axis: Any) -> str:
    kind = str(axis.type)
    return kind if kind in ("batch", "channel") else str(axis.id)


def _input_axes(tensor: Any, label: str
                ) -> tuple[list[str], list[str], int, dict[str, Any], int | None]:
    """(axis kinds in order, spatial ids in engine order, channels, spatial axes by id,
    the fixed batch size or None)."""
    kinds, space, channels, batch = [], {}, 1, None
    for axis in tensor.axes:
        kind = str(axis.type)
        if kind == "batch":
            kinds.append("batch")
            batch = getattr(axis, "size", None)
        elif kind == "channel":
            kinds.append("channel")
            channels = len(axis.channel_names)
        elif kind == "space":
            kinds.append(str(axis.id))
            space[str(axis.id)] = axis
        else:
            raise InvalidModelError(
                f"{label}: input axis {str(axis.id)!r} of type {kind} is not supported "
                "(tilerseg feeds batch, channel and 2 or 3 spatial axes)")
    if len(space) not in (2, 3):
        raise InvalidModelError(f"{label}: the input has {len(space)} spatial axes; tilerseg "
                                "runs 2D and 3D networks")
    ids = list(space)
    if set(ids) <= set(_CANONICAL):
        ids.sort(key=_CANONICAL.index)
    return kinds, ids, channels, space, batch


def _sizes(inp: Any, out: Any, spatial: list[str], space: dict[str, Any],
           label: str) -> tuple[list[AxisSizes], list[str], int]:
    """Per spatial axis its sizes; the output's axis kinds and channels."""
    from bioimageio.spec.model import v0_5 as bio

    out_space, kinds, channels = {}, [], 1
    for axis in out.axes:
        kind = str(axis.type)
        if kind == "channel":
            channels = len(axis.channel_names)
        elif kind == "space":
            out_space[str(axis.id)] = axis
        elif kind != "batch":
            raise InvalidModelError(f"{label}: output axis {str(axis.id)!r} of type {kind} is "
                                    "not supported")
        kinds.append(_axis_kind(axis))
    if sorted(out_space) != sorted(spatial):
        raise InvalidModelError(f"{label}: output spatial axes {sorted(out_space)} differ from "
                                f"the input's {sorted(spatial)}")
    sizes = []
    for a in spatial:
        i, o = space[a], out_space[a]
        if not isinstance(i.size, bio.ParameterizedSize):
            raise InvalidModelError(
                f"{label}: input axis {a!r} has size {i.size!r}; tilerseg tiles inputs of a "
                "parameterized size (min + n * step)")
        ref = o.size
        if not (isinstance(ref, bio.SizeReference) and str(ref.tensor_id) == str(inp.id)
                and str(ref.axis_id) == a and float(i.scale) == float(o.scale)):
            raise InvalidModelError(
                f"{label}: output axis {a!r} has size {ref!r}; tilerseg needs it to reference "
                f"input axis {a!r} (input size plus an offset)")
        sizes.append(AxisSizes(a, int(i.size.min), int(i.size.step), int(ref.offset),
                               int(getattr(o, "halo", 0) or 0)))
    return sizes, kinds, channels


def _with_halo(sizes: list[AxisSizes], halo: int | Sequence[int] | None,
               label: str) -> list[AxisSizes]:
    """Sizes with a given halo; without one, a clear refusal where none is declared."""
    bare = [s.id for s in sizes if s.offset == 0 and s.halo == 0]
    if halo is None:
        if bare:
            raise InvalidModelError(
                f"{label} declares no halo for axes {', '.join(bare)} (its output is as large "
                "as its input, with no context to crop): tilerseg cannot know how far its "
                "receptive field reaches, so tiles of it could not be exact at their borders "
                "and it does not tile it; give the context it needs: tilerseg run/batch/info "
                "--halo N, or tilerseg.bioimageio.load_bioimageio(path, halo=N) (N px per "
                "side; 0 for a per-pixel network)")
        return sizes
    if not bare:
        raise InvalidModelError(
            f"{label} declares the context of every spatial axis itself (its halo or crop): "
            "--halo / halo= is only for a package that declares none; leave it out")
    values = [halo] * len(sizes) if isinstance(halo, int) else list(halo)
    if len(values) != len(sizes) or any(isinstance(h, bool) or not isinstance(h, int) or h < 0
                                        for h in values):
        raise InvalidModelError(f"halo={halo!r} must be an integer >= 0 or one per spatial "
                                f"axis ({len(sizes)})")
    # the halo per axis: the network's own crop (-offset / 2), or more where asked
    given = [AxisSizes(s.id, s.min, s.step, s.offset, max(s.halo, h + s.offset // 2, 0))
             for s, h in zip(sizes, values)]
    # axis_sizes' rule raises the smallest input until a pixel is left after the halo
    redone = axis_sizes(geometry_from_sizes(given, 1, 1))
    return [AxisSizes(s.id, r.min, s.step, s.offset, r.halo) for s, r in zip(given, redone)]


# -- networks ---------------------------------------------------------------------------------


def _tilerseg_export(descr: Any) -> str | None:
    """How tilerseg exported the package: ``"wrapped"`` (its state dict is the network
    wrapped for blocks, :class:`~tilerseg.bioimageio.network.TiledNetwork`), ``"plain"``
    (written before: the network's own state dict) or None (not by tilerseg)."""
    from .export import ARCHITECTURE, SOURCE
    from .network import TiledNetwork

    entry = descr.weights.pytorch_state_dict
    arch = getattr(entry, "architecture", None) if entry is not None else None
    if arch is None:
        return None
    if (getattr(arch, "import_from", None), str(arch.callable)) == ARCHITECTURE:
        return "plain"
    source = getattr(arch, "source", None)
    named = (str(source).replace("\\", "/").rsplit("/", 1)[-1] == SOURCE[0]
             if source is not None
             else getattr(arch, "import_from", None) == TiledNetwork.__module__)
    recorded = _recorded(descr)
    if (named and str(arch.callable) == SOURCE[1] and isinstance(recorded.get("architecture"), str)
            and isinstance(recorded.get("config"), dict)):
        return "wrapped"
    return None


def _tilerseg_model(descr: Any, label: str) -> nn.Module | None:
    """The tilerseg model of a package tilerseg exported (None for other packages)."""
    from ..geometry import ModelGeometry
    from ..models.probe import trust_geometry
    from ..models.registry import create_model, stored_config

    how = _tilerseg_export(descr)
    if how is None:
        return None
    entry = descr.weights.pytorch_state_dict
    if how == "plain":
        kwargs = dict(entry.architecture.kwargs)
        name = kwargs.pop("name", "unet")
    else:
        name, kwargs = _recorded(descr)["architecture"], dict(_recorded(descr)["config"])
    model = create_model(name, **stored_config(name, kwargs))
    try:
        state = torch.load(io.BytesIO(_read(entry)), map_location="cpu", weights_only=True)
        if how == "wrapped":  # the wrapper's state: the network's, under "network."
            state = {k[len("network."):]: v for k, v in state.items()
                     if k.startswith("network.")}
        model.load_state_dict(state, strict=True)
    except Exception as exc:
        raise InvalidModelError(f"{label}: its state-dict weights do not load "
                                f"({_reason(exc)})") from None
    model.eval()
    recorded = _recorded(descr)
    metadata = dict(recorded.get("metadata") or {})
    if "normalize" in recorded:
        metadata["normalize"] = recorded["normalize"]
    else:
        metadata["normalize"] = normalization_of(descr.inputs[0].preprocessing,
                                                 model.config.get("in_channels", 1), label)
    model.metadata = metadata
    if isinstance(recorded.get("geometry"), dict):
        try:
            trust_geometry(model, ModelGeometry.from_dict(recorded["geometry"]))
        except InvalidModelError:
            pass  # probed when first needed
    return model


def _recorded(descr: Any) -> dict[str, Any]:
    """What tilerseg recorded under the package's ``config: tilerseg:`` (empty if none)."""
    config = getattr(descr, "config", None)
    recorded = config.get("tilerseg") if isinstance(config, dict) else \
        getattr(config, "tilerseg", None)
    return recorded if isinstance(recorded, dict) else {}


_LIBRARIES = ("torch", "tilerseg")
"""The only packages whose modules a package's architecture may name (imported only after
they are found inside the installed package, never in the current or the package's folder)."""


def _library_class(module: str, name: str, where: str, label: str) -> type:
    """The ``torch.nn.Module`` class ``module.name`` of an allowed installed library.

    No module outside :data:`_LIBRARIES` is imported (its top-level code would run): the
    module is located with ``importlib.util.find_spec`` first and refused unless its file
    lies inside the installed library's own folder.
    """
    import importlib.util

    root = module.split(".")[0]
    refuse = (f"{label}: its architecture {where} is not a torch.nn.Module class of "
              f"{' or '.join(_LIBRARIES)}; tilerseg imports and calls no other code a "
              "package names")
    if root not in _LIBRARIES or not all(part.isidentifier() for part in module.split(".")):
        raise InvalidModelError(refuse)
    home = Path(importlib.import_module(root).__file__).resolve().parent
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    origin = getattr(spec, "origin", None)
    if spec is None or origin is None or not Path(origin).resolve().is_relative_to(home):
        raise InvalidModelError(f"{label}: its architecture {where} cannot be imported (no "
                                f"module {module} in the installed {root})")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise InvalidModelError(f"{label}: its architecture {where} cannot be imported "
                                f"({exc})") from None
    if not (isinstance(factory, type) and issubclass(factory, nn.Module)):
        raise InvalidModelError(refuse)
    return factory


def _network(descr: Any, weights: str | None, label: str) -> nn.Module:
    """The package's network: TorchScript, or state dict with a library architecture."""
    w = descr.weights
    order = [weights] if weights else ["torchscript", "pytorch_state_dict"]
    skipped = ""
    for kind in order:
        entry = getattr(w, kind, None)
        if entry is None:
            continue
        if kind == "torchscript":
            try:
                return torch.jit.load(io.BytesIO(_read(entry)), map_location="cpu").eval()
            except Exception as exc:
                raise InvalidModelError(f"{label}: its TorchScript weights do not load "
                                        f"({_reason(exc)})") from None
        arch = entry.architecture
        if not hasattr(arch, "import_from"):
            skipped = ("; its state-dict architecture is Python source in the package, which "
                       "tilerseg does not run")
            continue
        where = f"{arch.import_from}.{arch.callable}"
        factory = _library_class(str(arch.import_from), str(arch.callable), where, label)
        try:
            network = factory(**dict(arch.kwargs))
            state = torch.load(io.BytesIO(_read(entry)), map_location="cpu", weights_only=True)
            network.load_state_dict(state, strict=bool(getattr(entry, "strict", True)))
        except Exception as exc:
            raise InvalidModelError(f"{label}: its state-dict weights with {where} do not load "
                                    f"({_reason(exc)})") from None
        return network.eval()
    present = [k for k in ("keras_hdf5", "keras_v3", "onnx", "pytorch_state_dict",
                           "tensorflow_js", "tensorflow_saved_model_bundle", "torchscript")
               if getattr(w, k, None) is not None]
    wanted = f"{weights} weights" if weights else "TorchScript or PyTorch state-dict weights"
    raise InvalidModelError(f"{label} has no usable {wanted} (it has: {', '.join(present)})"
                            f"{skipped}; tilerseg runs TorchScript, and PyTorch state dicts "
                            "of torch.nn.Module classes of installed libraries")


def load_bioimageio(
    path: str | os.PathLike,
    *,
    weights: str | None = None,
    halo: int | Sequence[int] | None = None,
) -> nn.Module:
    """Load a bioimage.io model package (spec 0.5; 0.4 is converted) as a tilerseg model.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.zip`` package, its ``rdf.yaml`` / ``bioimageio.yaml`` /
        ``*.bioimageio.yaml``, or an unpacked folder.
    weights : {"torchscript", "pytorch_state_dict"}, optional
        Which weights to use. Default: a tilerseg package's state dict (rebuilt exactly),
        else TorchScript, else a state dict whose architecture is a ``torch.nn.Module``
        class of ``torch`` or ``tilerseg``.
    halo : int or sequence of int, optional
        Context (px per side) for a package that declares no halo: tiles are then exact
        when it covers the network's receptive field. Refused without it; refused with
        it for a package tilerseg exported or one that declares the context (halo or crop)
        of every spatial axis.

    Returns
    -------
    torch.nn.Module
        In eval mode, its geometry known to :func:`tilerseg.models.model_geometry`;
        ``model.metadata["normalize"]`` holds the package's normalisation, which runs use
        when ``normalize`` is left at ``"auto"``.

    Raises
    ------
    ModelNotFoundError
        The path does not exist.
    InvalidModelError
        Not a valid model package, or something tilerseg cannot run exactly (named).

    Examples
    --------
    >>> import os, tempfile, tilerseg
    >>> from tilerseg.bioimageio import export_bioimageio
    >>> path = export_bioimageio(tilerseg.create_model(base_channels=2, depth=2),
    ...                          os.path.join(tempfile.mkdtemp(), "unet.zip"), normalize="auto")
    >>> type(load_bioimageio(path)).__name__
    'UNet'
    >>> type(load_bioimageio(path, weights="torchscript")).__name__
    'PackagedNetwork'
    """
    label = repr(str(path))
    if weights not in (None, "torchscript", "pytorch_state_dict"):
        raise InvalidModelError(
            f"weights={weights!r} must be 'torchscript' or 'pytorch_state_dict'")
    descr = _description(path, label)
    if len(descr.inputs) != 1 or len(descr.outputs) != 1:
        raise InvalidModelError(
            f"{label} has {len(descr.inputs)} inputs and {len(descr.outputs)} outputs; tilerseg "
            "runs networks of one input and one output")
    if halo is not None and _tilerseg_export(descr):
        raise InvalidModelError(
            f"{label} is a tilerseg export, which declares its own context: --halo / halo= "
            "is only for a package that declares none; leave it out")
    if weights != "torchscript" and halo is None:
        model = _tilerseg_model(descr, label)
        if model is not None:
            log.info("loaded the tilerseg %s model of the bioimage.io package %s",
                     model.registry_name, path)
            return model
    return _generic(descr, weights, halo, label, path)


def _generic(descr: Any, weights: str | None, halo: int | Sequence[int] | None, label: str,
             path: str | os.PathLike) -> nn.Module:
    from ..models.probe import trust_geometry

    inp, out = descr.inputs[0], descr.outputs[0]
    in_kinds, spatial, cin, space, batch = _input_axes(inp, label)
    sizes, out_kinds, cout = _sizes(inp, out, spatial, space, label)
    sizes = _with_halo(sizes, halo, label)
    normalize: NormalizeSpec = normalization_of(inp.preprocessing, cin, label, spatial)
    data = out.data
    value_range = getattr(data, "range", None) or (None, None)
    in_unit = tuple(value_range) == (0.0, 1.0) or tuple(value_range) == (0, 1)
    activation = activation_of(out.postprocessing, cout, in_unit, label)
    geometry = geometry_from_sizes(sizes, cin, cout)
    network = _network(descr, weights, label)
    model = PackagedNetwork(network, in_kinds, out_kinds, spatial,
                            probability=activation == "probability", batch_size=batch).eval()
    names = [str(n) for a in out.axes if str(a.type) == "channel" for n in a.channel_names]
    model.metadata = {"normalize": list(normalize) if isinstance(normalize, tuple) else normalize,
                      "classes": names or [f"class{c}" for c in range(cout)],
                      "bioimageio": {"name": descr.name, "source": str(path)}}
    declared = str(getattr(inp.data, "type", "float32"))
    if isinstance(normalize, tuple) and declared.startswith(("uint", "int")):
        model.metadata["input_dtype"] = declared  # its fixed scale is meant for that type
    if not trust_geometry(model, geometry):
        raise InvalidModelError(
            f"{label}: its network does not produce the sizes it declares (input "
            f"{list(geometry.min_input)} should give output "
            f"{[m - k for m, k in zip(geometry.min_input, geometry.shrink)]}; see the log)")
    log.info("loaded the bioimage.io package %s (%s weights): geometry %s, normalisation %s",
             path, "TorchScript" if isinstance(network, torch.jit.ScriptModule) else "state-dict",
             geometry, normalize)
    return model

"""One-file model checkpoints: architecture name, configuration and weights.

The file is written by ``torch.save`` and read with ``torch.load(weights_only=True)``,
whose restricted unpickler only rebuilds tensors and plain containers: a file carrying
any other pickled object is rejected before that object can run.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InvalidArgumentError, InvalidModelError, ModelNotFoundError
from ..geometry import ModelGeometry
from .catalog import BUNDLED, DEFAULT_MODEL, bundled_models, file_identity
from .probe import model_geometry, trust_geometry
from .registry import create_model, list_models, stored_config

__all__ = ["save_model", "load_model", "model_from_spec", "model_to_bytes", "model_from_bytes",
           "weights_digest", "source_file", "file_identity", "bundled_models", "DEFAULT_MODEL",
           "BUNDLED"]

log = logging.getLogger(__name__)

FORMAT = "tilerseg-model"
FORMAT_VERSION = 1


def save_model(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    metadata: dict[str, Any] | None = None,
    half: bool = False,
) -> Path:
    """Save a registered model's architecture, configuration and weights to one file.

    The file is written to a temporary name beside ``path`` and renamed into place, so
    an existing file is never left half-written.

    Parameters
    ----------
    model : torch.nn.Module
        A model built by :func:`tilerseg.create_model` (or a :class:`tilerseg.UNet`).
    path : str or os.PathLike
        Destination file (conventionally ``*.pt``).
    metadata : dict, optional
        Plain values (str, int, float, bool, lists and dicts of them) stored alongside,
        e.g. the normalisation or a tuned threshold.
    half : bool
        Store floating-point weights as float16 (half the file size); they are cast back
        to the model's dtype on loading.

    Returns
    -------
    pathlib.Path
        The written path.

    Examples
    --------
    >>> import tempfile, os, tilerseg
    >>> d = tempfile.mkdtemp()
    >>> p = tilerseg.save_model(tilerseg.create_model(base_channels=2), os.path.join(d, "m.pt"))
    >>> tilerseg.load_model(p).config["base_channels"]
    2
    """
    payload = _payload(model, metadata, half)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("saved %s model to %s", payload["architecture"], path)
    return path


def load_model(path: str | os.PathLike | None = None) -> nn.Module:
    """Load a model saved by :func:`save_model`, on the CPU, in eval mode.

    Never executes code from the file: ``torch.load(weights_only=True)``.

    Parameters
    ----------
    path : str or os.PathLike, optional
        A tilerseg model file, or the name of a bundled model (see
        :func:`bundled_models`). Default: the bundled default model, a U-Net trained on
        the ISBI 2012 EM data (class 0 membrane, class 1 cell interior).

    Returns
    -------
    torch.nn.Module
        The model; ``model.metadata`` holds the saved metadata dict.

    Raises
    ------
    ModelNotFoundError
        The file does not exist.
    InvalidModelError
        The file is not a tilerseg model (corrupt, another format, or a pickle payload).
    """
    bundled = bundled_models()
    if path is None or (str(path) in bundled and not Path(path).exists()):
        name = DEFAULT_MODEL if path is None else str(path)
        if name not in bundled:
            raise ModelNotFoundError(f"the bundled model {name!r} is not installed")
        path = bundled[name]
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"model file {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign or corrupt files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidModelError(
            f"{str(path)!r} is not a tilerseg model file ({reason[:200]})"
        ) from None
    model = _from_payload(payload, repr(str(path)))
    model._tilerseg_file = (file_identity(path), weights_digest(model))
    log.info("loaded %s model from %s", payload["architecture"], path)
    return model


def source_file(model: nn.Module) -> dict[str, Any] | None:
    """The :func:`file_identity` of the file ``model`` was loaded from, if its weights are
    still those of the file (None otherwise, or if it was not loaded from a file)."""
    loaded = getattr(model, "_tilerseg_file", None)
    if loaded is None or weights_digest(model) != loaded[1]:
        return None
    return loaded[0]


def _state_key(model: nn.Module) -> Any:
    """Identity and version of every tensor of the model's state (changes when one does)."""
    try:
        return tuple((id(t), t.data_ptr(), t._version)
                     for t in model.state_dict(keep_vars=True).values())
    except RuntimeError:  # inference tensors have no version counter
        return None


def model_from_spec(spec: str | os.PathLike | None = None, *,
                    halo: str | int | Sequence[int] | None = None) -> nn.Module:
    """The model a command line names: a model file, a bundled model or an architecture.

    Parameters
    ----------
    spec : str or os.PathLike, optional
        A tilerseg model file, the name of a bundled model, or a registered architecture
        name (an untrained model with random weights from seed 0, logged as a warning),
        or a bioimage.io model package (``.zip``, ``rdf.yaml``/``bioimageio.yaml`` or an
        unpacked folder; see :func:`tilerseg.bioimageio.load_bioimageio`).
        Default: the bundled default model (an untrained U-Net if none is installed).
    halo : str, int or sequence of int, optional
        Only for a bioimage.io package: the context it needs, passed to
        :func:`~tilerseg.bioimageio.load_bioimageio` (``"N"`` or ``"N,N[,N]"`` as
        ``--halo`` gives it).

    Returns
    -------
    torch.nn.Module

    Raises
    ------
    InvalidArgumentError
        ``halo`` for a model that is not a bioimage.io package, or not integers.
    """
    if isinstance(halo, str):
        try:
            values = [int(v) for v in halo.split(",")]
        except ValueError:
            raise InvalidArgumentError(f"--halo {halo!r} must be N or N,N[,N] (px per "
                                       "side)") from None
        halo = values[0] if len(values) == 1 else values
    if halo is not None:
        from ..bioimageio.load import is_package

        if spec is None or not is_package(spec):
            raise InvalidArgumentError(
                "--halo (halo=) applies only to a bioimage.io package that declares no halo; "
                f"{'the default model' if spec is None else repr(str(spec))} is not one")
    if spec is None:
        if DEFAULT_MODEL in bundled_models():
            return load_model()
        spec = "unet"
    if str(spec) in list_models() and not os.path.exists(spec):
        torch.manual_seed(0)
        log.warning("model %r is an untrained architecture (random weights, seed 0); pass "
                    "--model FILE.pt for meaningful results", str(spec))
        return create_model(str(spec))
    from ..bioimageio.load import is_package  # reads no more than a zip's directory

    if is_package(spec):  # a bioimage.io package (.zip, rdf.yaml, folder)
        from ..bioimageio.load import load_bioimageio

        return load_bioimageio(spec, halo=halo)
    return load_model(spec)


def _payload(model: nn.Module, metadata: dict[str, Any] | None, half: bool) -> dict[str, Any]:
    """What a model file holds: format header, architecture, config, metadata, weights."""
    from .. import __version__

    name = getattr(model, "registry_name", None)
    config = getattr(model, "config", None)
    if not isinstance(name, str) or not isinstance(config, dict):
        raise InvalidModelError(
            f"cannot save {type(model).__name__}: only models built by create_model() "
            "(with registry_name and config) can be saved"
        )
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tilerseg_version": __version__,
        "architecture": name,
        "config": dict(config),
        "geometry": model_geometry(model).as_dict(),  # trusted on load after a check
        "metadata": dict(metadata or {}),
        "state_dict": {
            k: (v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu())
            .contiguous()
            for k, v in model.state_dict().items()
        },
    }


def _from_payload(payload: Any, label: str) -> nn.Module:
    """The model of a loaded payload, in eval mode, or a clear error naming ``label``."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InvalidModelError(f"{label} is not a tilerseg model file (no tilerseg header)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise InvalidModelError(
            f"{label} has model format version {payload.get('format_version')!r}; "
            f"this tilerseg reads version {FORMAT_VERSION}"
        )
    try:
        # files written before an argument existed left it out: their meaning filled in
        config = stored_config(payload["architecture"], payload["config"])
        model = create_model(payload["architecture"], **config)
        model.load_state_dict(payload["state_dict"], strict=True)
    except (KeyError, TypeError, RuntimeError, InvalidModelError) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise InvalidModelError(f"{label} is a damaged tilerseg model file ({reason[:200]})") from None
    model.metadata = dict(payload.get("metadata") or {})
    model.eval()
    recorded = payload.get("geometry")
    if isinstance(recorded, dict):  # older files have none: probed on first use
        try:
            trust_geometry(model, ModelGeometry.from_dict(recorded))
        except InvalidModelError as exc:
            log.warning("%s: ignoring its recorded geometry (%s)", label, exc)
    return model


def model_to_bytes(model: nn.Module) -> bytes:
    """The bytes of a model file of ``model`` (its metadata included), without a file.

    Used to ship a model to the worker processes of a cluster once per process.
    """
    buffer = io.BytesIO()
    torch.save(_payload(model, getattr(model, "metadata", None), half=False), buffer)
    return buffer.getvalue()


def model_from_bytes(data: bytes) -> nn.Module:
    """The model of :func:`model_to_bytes`; never executes code from the bytes."""
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InvalidModelError(f"model bytes are not a tilerseg model ({exc})") from None
    return _from_payload(payload, "model bytes")


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's architecture, configuration and every tensor of its state.

    Two models with the same digest compute the same function; a run records it so
    that it resumes only with the same weights. Cached on the model until a tensor of
    its state changes (torch's version counters).

    Examples
    --------
    >>> from tilerseg import create_model
    >>> a = create_model(base_channels=2)
    >>> weights_digest(a) == weights_digest(a), len(weights_digest(a))
    (True, 64)
    """
    state = model.state_dict()
    key = _state_key(model)
    cached = getattr(model, "_tilerseg_digest", None)
    if key is not None and cached is not None and cached[0] == key:
        return cached[1]
    h = hashlib.sha256()
    head = {"architecture": getattr(model, "registry_name", type(model).__name__),
            "config": getattr(model, "config", None)}
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest = h.hexdigest()
    if key is not None:
        try:
            model._tilerseg_digest = (key, digest)
        except AttributeError:
            pass
    return digest

"""Registry of model architectures: ``create_model(name, **config)``."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import InvalidModelError
from .fcn import FCN8s
from .unet import UNet
from .unetpp import UNetPlusPlus

__all__ = ["register_model", "create_model", "list_models", "stored_config"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_LEGACY: dict[str, dict[str, Any]] = {}


def register_model(
    name: str, legacy: dict[str, Any] | None = None
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model factory under ``name``.

    The factory takes keyword configuration and returns an ``nn.Module`` that has a
    ``config`` dict (the keyword arguments that rebuild it), so that
    :func:`tilerseg.save_model` can store it.

    Parameters
    ----------
    name : str
        The architecture's name.
    legacy : dict, optional
        Values that model files written before an argument existed meant by leaving it
        out (see :func:`stored_config`), e.g. ``{"pool": 2}``.

    Examples
    --------
    >>> @register_model("tiny-unet")
    ... def tiny_unet(**config):
    ...     return UNet(**{"depth": 2, "base_channels": 8, **config})
    >>> create_model("tiny-unet").config["depth"]
    2
    >>> _ = _REGISTRY.pop("tiny-unet")
    """

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise InvalidModelError(f"model name {name!r} is already registered")
        _REGISTRY[name] = factory
        _LEGACY[name] = dict(legacy or {})
        return factory

    return decorator


def list_models() -> list[str]:
    """Names of the registered model architectures, sorted."""
    return sorted(_REGISTRY)


def stored_config(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """The configuration that rebuilds a model file's model: ``config`` with the values
    that arguments added since the file was written had then (``legacy`` of
    :func:`register_model`) filled in where absent.

    Examples
    --------
    >>> stored_config("unet3d", {"depth": 4})
    {'pool': 2, 'depth': 4}
    """
    return {**_LEGACY.get(name, {}), **config}


def create_model(name: str = "unet", **config: Any) -> nn.Module:
    """Build a registered model with freshly initialised weights.

    Parameters
    ----------
    name : str
        Registered architecture (see :func:`list_models`): ``"unet"`` (the paper's
        network by default), ``"unet3d"`` (3D U-Net, depth 3, pooling in-plane before
        pooling all axes), ``"unet-keras"`` (the small same-padded one-class U-Net of the
        Keras tutorials), ``"unetpp"`` (U-Net++) or ``"fcn8s"`` (FCN-8s).
    **config
        Keyword arguments of the architecture, e.g. ``base_channels=16, depth=3``.

    Returns
    -------
    torch.nn.Module
        The model, with ``model.registry_name == name``.

    Examples
    --------
    >>> create_model("unet", base_channels=8).config["base_channels"]
    8
    """
    try:
        factory = _REGISTRY[name]
    except (KeyError, TypeError):
        raise InvalidModelError(
            f"model name {name!r} is not registered; known: {', '.join(list_models())}"
        ) from None
    try:
        model = factory(**config)
    except TypeError as exc:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        if unknown and unknown.group(1) in config:
            arg = unknown.group(1)
            raise InvalidModelError(
                f"bad configuration for model {name!r}: it takes no argument "
                f"{arg}={config[arg]!r}") from None
        raise InvalidModelError(f"bad configuration for model {name!r}: {exc}") from None
    model.registry_name = name
    return model


@register_model("unet", legacy={"pool": 2})
def _unet(**config: Any) -> nn.Module:
    return UNet(**config)


def anisotropic_pool(depth: int) -> list[list[int]]:
    """The ``unet3d`` preset's pooling: in-plane (1, 2, 2) on every level but the
    deepest, which pools all three axes (2, 2, 2).

    Examples
    --------
    >>> anisotropic_pool(3)
    [[1, 2, 2], [1, 2, 2], [2, 2, 2]]
    """
    return [[1, 2, 2] for _ in range(max(0, depth - 1))] + [[2, 2, 2]]


@register_model("unet3d", legacy={"pool": 2})
def _unet3d(**config: Any) -> nn.Module:
    pool = config.get("pool")
    depth = config.get("depth", len(pool) if isinstance(pool, (list, tuple)) else 3)
    if isinstance(depth, int) and not isinstance(depth, bool) and depth >= 1:
        config.setdefault("pool", anisotropic_pool(depth))
    return UNet(**{"ndim": 3, "depth": depth, **config})


@register_model("unet-keras")
def _unet_keras(**config: Any) -> nn.Module:
    return UNet(**{"depth": 4, "base_channels": 16, "padding": "same", "dropout": 0.1,
                   "num_classes": 1, "up": "transpose", **config})


@register_model("unetpp")
def _unetpp(**config: Any) -> nn.Module:
    return UNetPlusPlus(**config)


@register_model("fcn8s")
def _fcn8s(**config: Any) -> nn.Module:
    return FCN8s(**config)

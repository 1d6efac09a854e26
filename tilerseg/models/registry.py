"""Registry of model architectures: ``create_model(name, **config)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import InvalidModelError
from .unet import UNet

__all__ = ["register_model", "create_model", "list_models"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model factory under ``name``.

    The factory takes keyword configuration and returns an ``nn.Module`` that has a
    ``config`` dict (the keyword arguments that rebuild it), so that
    :func:`tilerseg.save_model` can store it.

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
        return factory

    return decorator


def list_models() -> list[str]:
    """Names of the registered model architectures, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str = "unet", **config: Any) -> nn.Module:
    """Build a registered model with freshly initialised weights.

    Parameters
    ----------
    name : str
        Registered architecture (see :func:`list_models`): ``"unet"`` (2D, the paper's
        network by default) or ``"unet3d"`` (the same for volumes).
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
        raise InvalidModelError(f"bad configuration for model {name!r}: {exc}") from None
    model.registry_name = name
    return model


@register_model("unet")
def _unet(**config: Any) -> nn.Module:
    return UNet(**config)


@register_model("unet3d")
def _unet3d(**config: Any) -> nn.Module:
    return UNet(**{"ndim": 3, **config})

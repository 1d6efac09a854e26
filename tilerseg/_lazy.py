"""Lazy package attributes (PEP 562), as scientific Python's ``lazy_loader.attach`` does:
a package names its public objects and the submodule of each, and a submodule is imported
only when one of its names is first used."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["attach"]


def attach(package: str, names: dict[str, str], namespace: dict[str, Any]
           ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``names`` maps an attribute to the
    submodule (relative to the package) that defines it; a name that is itself a
    submodule maps to ``""``. ``namespace`` is the package's ``globals()``, where each
    attribute is cached once imported."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(f".{names[name] or name}", package)
        value = module if not names[name] else getattr(module, name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__

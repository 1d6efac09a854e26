"""Where model files are: the bundled models, and the file a model name stands for.

Kept free of torch so that commands answering without a model (``tilerseg status``,
``tilerseg run --resume`` on a finished output) start quickly.
"""

from __future__ import annotations

import os
from pathlib import Path

from typing import Any

__all__ = ["BUNDLED", "DEFAULT_MODEL", "bundled_models", "model_file", "file_identity"]

BUNDLED = Path(__file__).parent / "bundled"
DEFAULT_MODEL = "isbi2012-unet"
"""Name of the bundled model that ``load_model()`` and ``tilerseg run`` use by default."""


def bundled_models() -> dict[str, Path]:
    """Names and files of the models shipped inside the package."""
    return {p.stem: p for p in sorted(BUNDLED.glob("*.pt"))}


def model_file(spec: str | os.PathLike | None) -> Path | None:
    """The file a model argument names (the default bundled model for None); None when it
    names no existing file (an architecture name, or a file that is missing)."""
    if spec is None:
        return bundled_models().get(DEFAULT_MODEL)
    path = Path(spec)
    if path.is_file():
        return path.resolve()
    bundled = bundled_models()
    return bundled.get(str(spec))


def file_identity(path: str | os.PathLike) -> dict[str, Any]:
    """A model file's absolute path, size and modification time."""
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}

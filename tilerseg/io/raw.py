"""What a format reader returns before axes are normalised: :class:`RawImage`, and the
small helpers every reader shares (error messages, units, axis guesses)."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tilerseg.errors import InvalidImageError
from tilerseg.io.source import ImageSpace

__all__ = ["RawImage", "expand_key", "guess_axes", "needs", "short_reason", "to_micrometres", "unreadable"]

_UM_PER_UNIT = {
    "m": 1e6, "meter": 1e6, "metre": 1e6, "cm": 1e4, "centimeter": 1e4, "centimetre": 1e4,
    "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3, "µm": 1.0, "μm": 1.0, "um": 1.0,
    "micron": 1.0, "micrometer": 1.0, "micrometre": 1.0, "nm": 1e-3, "nanometer": 1e-3,
    "nanometre": 1e-3, "pm": 1e-6, "picometer": 1e-6, "picometre": 1e-6, "å": 1e-4,
    "angstrom": 1e-4, "in": 25400.0, "inch": 25400.0,
}


@dataclass
class RawImage:
    """What a format reader found, before axes are normalised and a level is chosen.

    ``axes`` holds one name per dimension: a letter of ``"TCZYXS"`` or a descriptive
    name for anything else (dropped if of length 1, rejected otherwise).
    ``pixel_size`` is in micrometres at level 0, unless ``level_pixel_sizes`` gives it
    for every level. ``keep`` is kept alive with the arrays (e.g. an open TiffFile).
    ``window`` is the display window ``(centre, width)`` the file records (DICOM), if any.
    ``space`` is where the voxels lie in the world (NIfTI's affine and header), if known.
    """

    levels: list[Any]
    axes: list[str]
    format: str
    pixel_size: dict[str, float] = field(default_factory=dict)
    level_pixel_sizes: list[dict[str, float]] | None = None
    keep: Any = None
    window: tuple[float, float] | None = None
    space: ImageSpace | None = None


def unreadable(label: str, reason: str) -> InvalidImageError:
    """The one-line error ``"<label> is not a readable image: <reason>"`` (to raise)."""
    return InvalidImageError(f"{label} is not a readable image: {reason}")


def expand_key(key: Any, ndim: int) -> tuple[Any, ...]:
    """An index of a lazy image as ``ndim`` integers and slices (``...`` expanded, missing
    trailing axes whole), checked: what the format readers' lazy arrays take.

    Examples
    --------
    >>> expand_key((..., 2), 3)
    (slice(None, None, None), slice(None, None, None), 2)
    """
    key = key if isinstance(key, tuple) else (key,)
    if any(k is Ellipsis for k in key):
        at = next(i for i, k in enumerate(key) if k is Ellipsis)
        key = key[:at] + (slice(None),) * (ndim - len(key) + 1) + key[at + 1:]
    if len(key) > ndim:
        raise IndexError(f"too many indices ({len(key)}) for {ndim} dimensions")
    for k in key:
        if not isinstance(k, (slice, int, np.integer)) or isinstance(k, bool):
            raise TypeError(f"only integers, slices and ... can index an image, not {k!r}")
    return tuple(int(k) if isinstance(k, np.integer) else k for k in key) + (slice(None),) * (
        ndim - len(key)
    )


def needs(module: str, label: str, what: str, install: str) -> Any:
    """Import the optional ``module`` a reader needs, or raise the one-line error
    ``"<label>: reading <what> needs <package>: pip install <install>"``.

    Examples
    --------
    >>> needs("json", "a.txt", "JSON", "json").__name__
    'json'
    >>> needs("no_such_module", "a.xyz", "XYZ", '"tilerseg[xyz]"')
    Traceback (most recent call last):
    ...
    tilerseg.errors.InvalidImageError: a.xyz: reading XYZ needs no_such_module: pip install "tilerseg[xyz]"
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise InvalidImageError(f"{label}: reading {what} needs {module.split('.')[0]}: "
                                f"pip install {install}") from None


def short_reason(exc: BaseException) -> str:
    """An exception's message on one line (at most 200 characters), for errors.

    The first line, unless it only introduces the lines below it (it ends with ``:``, as in
    "exceptions were raised by all available plugins:"): then those lines, joined by
    ``"; "``.

    Examples
    --------
    >>> short_reason(ValueError("bad header\\nat offset 12"))
    'bad header'
    >>> short_reason(RuntimeError("all plugins failed:\\n  a: too short\\n  b: no codec"))
    'a: too short; b: no codec'
    """
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    if len(lines) > 1 and text.endswith(":"):
        text = "; ".join(lines[1:])
    return text if len(text) <= 200 else text[:197] + "..."


def to_micrometres(value: Any, unit: str | None) -> float | None:
    """Convert a length to micrometres.

    Parameters
    ----------
    value : float or str
        The length.
    unit : str or None
        Its unit: ``"µm"``, ``"um"``, ``"micron"``, ``"micrometer"``, ``"nm"``,
        ``"nanometer"``, ``"mm"``, ``"cm"``, ``"m"``, ``"Å"``, ``"inch"``... (any case).

    Returns
    -------
    float or None
        The length in micrometres; None if the unit is unknown or missing or the value
        is not a positive finite number.

    Examples
    --------
    >>> to_micrometres(250, "nanometer"), to_micrometres(1, "pixel")
    (0.25, None)
    """
    if unit is None:
        return None
    key = str(unit).strip().lower().replace("\\u00b5", "µ").replace("\xb5", "µ")
    factor = _UM_PER_UNIT.get(key) or _UM_PER_UNIT.get(key.rstrip("s"))
    try:
        size = float(value) * factor if factor else None
    except (TypeError, ValueError):
        return None
    return size if size is not None and np.isfinite(size) and size > 0 else None


def guess_axes(shape: Sequence[int], label: str) -> str:
    """Guess the axes of an array that has no axis metadata.

    Parameters
    ----------
    shape : sequence of int
        The array's shape.
    label : str
        What to name in the error message.

    Returns
    -------
    str
        ``"YX"``, ``"CYX"``, ``"CZYX"`` or ``"TCZYX"`` for 2 to 5 dimensions, but
        ``"YXS"`` for a 3-D shape like ``(rows, columns, 3 or 4)`` (RGB(A)).

    Raises
    ------
    InvalidImageError
        Fewer than 2 or more than 5 dimensions.
    """
    ndim = len(shape)
    if ndim == 3 and shape[-1] in (3, 4) and shape[0] > 4 and shape[1] > 4:
        return "YXS"
    guesses = {2: "YX", 3: "CYX", 4: "CZYX", 5: "TCZYX"}
    if ndim not in guesses:
        raise InvalidImageError(
            f"{label} has {ndim} dimensions (shape {tuple(shape)}); tilerseg reads 2 to 5 "
            "(YX, CYX, CZYX or TCZYX with T=1)"
        )
    return guesses[ndim]

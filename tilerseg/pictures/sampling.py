"""How a picture reads an image: which pyramid level, every how many pixels, which plane.

Used by both pictures, :func:`~tilerseg.pictures.preview` (the input under a result) and
:func:`~tilerseg.pictures.plot_plan` (the image under a plan).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["level_and_stride", "plane", "image_key"]


def level_and_stride(levels: Sequence[Sequence[int]], run_level: int, y: int,
                     wanted: float) -> tuple[int, int]:
    """The level to read for a picture ``wanted`` times coarser than ``run_level``, and
    every how many of its pixels to take.

    The coarsest level at least as fine as wanted (at or above ``run_level``), read every
    ``stride`` pixels where it is ``stride`` or more times finer than wanted.

    Parameters
    ----------
    levels : sequence of shapes
        The image's pyramid levels, finest first.
    run_level : int
        The level the run reads (downsampling is relative to it).
    y : int
        The index of the row axis in the shapes.
    wanted : float
        Downsampling wanted relative to ``run_level``.

    Returns
    -------
    (int, int)
        The level and the stride.

    Examples
    --------
    >>> level_and_stride([(1000,), (500,), (62,)], 0, 0, 8.0)   # level 1, every 4 px
    (1, 4)
    >>> level_and_stride([(1000,), (500,), (250,)], 0, 0, 4.0)
    (2, 1)
    """
    base = levels[run_level][y]
    factors = [base / s[y] for s in levels]
    finer = [j for j in range(len(levels)) if j >= run_level and factors[j] <= wanted * 1.01]
    j = max(finer, key=lambda i: factors[i]) if finer else run_level
    return j, max(1, int(wanted / factors[j] + 1e-9))


def plane(z: int | None, n: int, n0: int) -> int:
    """The plane of a level with ``n`` planes that full-resolution plane ``z`` (of ``n0``)
    falls in (0 where ``z`` is None).

    Examples
    --------
    >>> plane(5, 4, 8), plane(7, 8, 8), plane(None, 3, 3)
    (2, 7, 0)
    """
    return 0 if z is None else min(n - 1, z * n // max(n0, 1))


def image_key(axes: str, shape: Sequence[int], base: Sequence[int], z: int | None,
              rows: slice, cols: slice, channel: int) -> tuple[Any, ...]:
    """The index of one plane's ``rows`` and ``cols`` of one channel in a level of
    ``shape`` (``base``: the run's level), all RGB samples kept.

    Examples
    --------
    >>> image_key("CZYX", (3, 4, 50, 60), (3, 8, 100, 120), 5, slice(0, 9), slice(2, 5), 1)
    (1, 2, slice(0, 9, None), slice(2, 5, None))
    """
    key: list[Any] = []
    for a, letter in enumerate(axes):
        if letter == "C":
            key.append(channel)
        elif letter == "Z":
            key.append(plane(z, shape[a], base[a]))
        elif letter == "Y":
            key.append(rows)
        elif letter == "X":
            key.append(cols)
        else:  # S: RGB samples
            key.append(slice(None))
    return tuple(key)

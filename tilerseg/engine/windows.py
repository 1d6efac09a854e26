"""Mirror-windowed reads: a tile's input window, reflection-filled past the borders."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..geometry import reflect_indices

__all__ = ["read_window"]


def read_window(image: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """Read the window ``[start, start + size)`` of a channel-first image.

    Positions outside the image take the value of their mirror image (numpy
    ``mode="reflect"``, continued periodically for windows wider than the image), so the
    window equals the same region of ``np.pad(image, ..., mode="reflect")``. Only the
    in-bounds region the window needs is read from ``image``, which may therefore be any
    array supporting basic slicing.

    Parameters
    ----------
    image : array-like, shape (C, *spatial)
        The image.
    start : sequence of int
        Window origin per spatial axis, in image coordinates (may be negative).
    size : sequence of int
        Window side per spatial axis.

    Returns
    -------
    numpy.ndarray, shape (C, *size)
        A view of ``image`` when the window lies inside it, else a new array.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.arange(5)[None, None, :]          # (C=1, Y=1, X=5)
    >>> read_window(img, (0, -2), (1, 9))[0, 0].tolist()
    [2, 1, 0, 1, 2, 3, 4, 3, 2]
    """
    spatial = image.shape[1:]
    inside = all(0 <= s and s + n <= m for s, n, m in zip(start, size, spatial))
    if inside:
        return image[(slice(None),) + tuple(slice(s, s + n) for s, n in zip(start, size))]
    indices = [reflect_indices(s, n, m) for s, n, m in zip(start, size, spatial)]
    bounds = tuple(slice(int(i.min()), int(i.max()) + 1) for i in indices)
    block = np.asarray(image[(slice(None),) + bounds])
    for axis, (idx, b, s, n, m) in enumerate(zip(indices, bounds, start, size, spatial)):
        if not (0 <= s and s + n <= m):
            block = np.take(block, idx - b.start, axis=axis + 1)
    return block

"""A lazy channel-first view of an image, in the layout the model takes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError, InvalidImageError
from ..io.source import ImageSource

__all__ = ["ChannelFirstView", "model_view"]

_SPATIAL = {2: "YX", 3: "ZYX"}


class ChannelFirstView:
    """Read ``(C, *spatial)`` windows from an image stored with other axes.

    Slicing reorders axes, drops singleton T (and Z for a 2D model) and selects channels,
    reading only the requested region from the underlying lazy array.

    Parameters
    ----------
    data : ArrayLike
        The stored array.
    axes : str
        Its axes, letters from ``"TCZYXS"``.
    spatial : str
        The model's spatial axes, ``"YX"`` or ``"ZYX"``.
    channels : sequence of int, optional
        Channels (C or S axis) to keep, in order; all by default.

    Attributes
    ----------
    available : int
        How many channels the image has.
    """

    def __init__(
        self, data: Any, axes: str, spatial: str, channels: Sequence[int] | None = None
    ) -> None:
        self.data, self.axes, self.spatial = data, axes, spatial
        shape = dict(zip(axes, data.shape))
        missing = [a for a in spatial if a not in shape]
        if missing:
            raise InvalidImageError(
                f"image axes {axes!r} (shape {tuple(data.shape)}) lack {''.join(missing)!r} "
                f"needed by a {len(spatial)}D model"
            )
        extra = [a for a in axes if a not in spatial and a not in "CS" and shape[a] != 1]
        if extra:
            raise InvalidImageError(
                f"image axes {axes!r} have {extra[0]}={shape[extra[0]]}, which a "
                f"{len(spatial)}D model cannot take; pick one plane or use a 3D model"
            )
        channel_axes = [a for a in axes if a in "CS"]
        if len(channel_axes) == 2 and min(shape["C"], shape["S"]) > 1:
            raise InvalidImageError(f"image axes {axes!r} have both C and S channels")
        self.channel_axis = max(channel_axes, key=lambda a: shape[a]) if channel_axes else None
        count = shape[self.channel_axis] if self.channel_axis else 1
        self.available = count
        if channels is None:
            self.channels = list(range(count))
        else:
            self.channels = [int(c) for c in channels]
            bad = [c for c in self.channels if not 0 <= c < count]
            if bad or not self.channels:
                raise InvalidArgumentError(
                    f"channel={list(channels)!r} is not available; the image has {count} "
                    f"channel(s), 0..{count - 1}"
                )
        self.shape = (len(self.channels),) + tuple(shape[a] for a in spatial)
        self.dtype = np.dtype(data.dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key: tuple) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        channel_key, spatial_key = key[0], dict(zip(self.spatial, key[1:]))
        index, kept = [], []
        for a in self.axes:
            if a in spatial_key:
                index.append(spatial_key[a])
                kept.append(a)
            elif a == self.channel_axis:
                lo, hi = min(self.channels), max(self.channels) + 1
                index.append(slice(lo, hi))
                kept.append("c")
            else:  # singleton T, Z (2D model) or the unused channel-like axis
                index.append(0)
        block = np.asarray(self.data[tuple(index)])
        if "c" not in kept:
            block, kept = block[None], ["c", *kept]
        else:
            lo = min(self.channels)
            block = np.take(block, [c - lo for c in self.channels], axis=kept.index("c"))
        block = np.moveaxis(block, [kept.index(a) for a in ["c", *self.spatial]],
                            range(len(kept)))
        return block[channel_key]


def model_view(
    image: ImageSource, ndim: int, channels: Sequence[int] | None = None
) -> ChannelFirstView:
    """The ``(C, *spatial)`` view of ``image`` for a model with ``ndim`` spatial axes.

    Examples
    --------
    >>> import numpy as np
    >>> from tilerseg.io.source import ImageSource
    >>> rgb = np.zeros((30, 40, 3), np.uint8)
    >>> model_view(ImageSource(rgb, "YXS"), 2).shape
    (3, 30, 40)
    """
    return ChannelFirstView(image.data, image.axes, _SPATIAL[ndim], channels)

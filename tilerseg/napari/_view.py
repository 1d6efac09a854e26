"""Segment the view: the output tiles under the visible region, computed now.

:func:`tilerseg.segment` on a lazily read image is a Dask array whose chunks are the
output tiles of the same tile plan as :func:`tilerseg.segment_to_zarr` with the same
options; computing the chunks that the view touches runs the model on those tiles only,
each on its own window with the halo, as the full run does. Encoded as the store encodes
them (``round(255 p)`` for uint8) and turned into labels by the same rule, they are the
values the full run writes there.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from ..engine.options import RunOptions

__all__ = ["ViewPreview", "camera", "segment_region", "tile_bounds", "visible_region"]


@dataclass(frozen=True)
class ViewPreview:
    """The output of the tiles under a region.

    Attributes
    ----------
    start : tuple of int
        Where the arrays start in the image (pixels, spatial axes).
    probabilities : numpy.ndarray or None
        ``(classes, *spatial)`` in the store's dtype, when the run writes them (all
        outputs but ``labels``).
    labels : numpy.ndarray or None
        The label image, when the run writes one (``labels`` or ``both``).
    class_names : tuple of str
        One per class.
    """

    start: tuple[int, ...]
    probabilities: np.ndarray | None
    labels: np.ndarray | None
    class_names: tuple[str, ...]


def camera(viewer: Any) -> Any:
    """The viewer's camera (``viewer.scene.camera`` from napari 0.9, ``viewer.camera``
    before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


def visible_region(viewer: Any, layer: Any) -> tuple[slice, ...] | None:
    """The pixels of ``layer``'s level 0 that the canvas shows (2D view).

    From the camera's centre and zoom and the canvas size: the four corners of the
    canvas, mapped from world to data coordinates, bound the region.

    Parameters
    ----------
    viewer : napari.Viewer
    layer : napari.layers.Image
        A layer of two spatial axes (and RGB, if any).

    Returns
    -------
    tuple of slice or None
        ``(rows, columns)``; None when the view shows none of the layer.
    """
    height, width = viewer.canvas.viewbox_size(viewer.layers)
    zoom = camera(viewer).zoom
    centre = np.asarray(camera(viewer).center[-2:], float)
    half = np.array([height, width], float) / (2 * zoom)
    point = np.asarray(viewer.dims.point, float)
    displayed = list(viewer.dims.displayed)[-2:]
    corners = []
    for dy, dx in itertools.product((-1, 1), (-1, 1)):
        world = point.copy()
        world[displayed] = centre + half * (dy, dx)
        corners.append(np.asarray(layer.world_to_data(world), float)[-2:])
    lo, hi = np.min(corners, axis=0), np.max(corners, axis=0)
    shape = (layer.data[0] if layer.multiscale else layer.data).shape
    shape = shape[-3:-1] if layer.rgb else shape[-2:]
    start = np.clip(np.floor(lo).astype(int), 0, shape)
    stop = np.clip(np.ceil(hi).astype(int), 0, shape)
    if np.any(stop <= start):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))


def tile_bounds(chunks: tuple[tuple[int, ...], ...],
                region: tuple[slice, ...]) -> tuple[slice, ...]:
    """``region`` grown to the bounds of the chunks (output tiles) it touches.

    Parameters
    ----------
    chunks : tuple of tuple of int
        The chunk sizes along each spatial axis (Dask's ``.chunks``).
    region : tuple of slice

    Returns
    -------
    tuple of slice

    Examples
    --------
    >>> tile_bounds(((64, 64, 22), (64, 36)), (slice(70, 80), slice(0, 100)))
    (slice(64, 128, None), slice(0, 100, None))
    """
    out = []
    for sizes, s in zip(chunks, region):
        edges = np.concatenate([[0], np.cumsum(sizes)])
        first = int(np.searchsorted(edges, s.start, side="right") - 1)
        last = int(np.searchsorted(edges, s.stop, side="left"))
        out.append(slice(int(edges[first]), int(edges[last])))
    return tuple(out)


def segment_region(image: Any, model: nn.Module, region: tuple[slice, ...],
                   options: RunOptions) -> ViewPreview:
    """The output of the tiles that ``region`` touches, as the full run writes them.

    Parameters
    ----------
    image : str or ImageSource
        The input, as given to :func:`tilerseg.segment_to_zarr`.
    model : torch.nn.Module
    region : tuple of slice
        Spatial pixels of level 0.
    options : RunOptions
        The full run's options (tile, precision, backend, dtype, threshold, output...).

    Returns
    -------
    ViewPreview
        Covering the whole tiles that ``region`` touches.
    """
    from ..engine.inference import segment
    from ..engine.resume import class_names
    from ..io.writers import encode_probabilities
    from ..labels import LabelPolicy

    lazy = segment(image, model, tile=options.tile, batch_size=options.batch_size,
                   device=options.device, normalize=options.normalize, level=options.level,
                   channel=options.channel, precision=options.precision,
                   calibration=options.calibration, backend=options.backend,
                   compile=options.compile, tta=options.tta)
    bounds = tile_bounds(lazy.chunks[1:], region)
    probs = np.asarray(lazy[(slice(None), *bounds)].compute())
    labels = None
    if options.output in ("labels", "both"):
        policy = LabelPolicy.for_model(probs.shape[0], getattr(model, "metadata", None),
                                       options.threshold)
        labels = policy(probs)
    count = probs.shape[0]
    names = class_names(model, count) or tuple(f"class {k}" for k in range(count))
    stored = None if options.output == "labels" else encode_probabilities(probs, options.dtype)
    return ViewPreview(tuple(s.start for s in bounds), stored, labels, names)

"""What tilerseg segments for a napari image layer, and where the results go.

A layer read from a file that tilerseg opens with the same shape is segmented from that
file (its pixel size goes into the output, and ``tilerseg run --resume`` can continue the
run); any other layer is segmented from its data, level 0 of a multiscale layer, lazily
for Dask and Zarr arrays.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidImageError, TilersegError
from ..io.source import ImageSource

__all__ = ["default_output", "layer_axes", "layer_file", "layer_image", "spatial_placement"]

log = logging.getLogger(__name__)


def layer_axes(layer: Any) -> str:
    """The axes of an image layer's level-0 data: ``"YX"``, ``"ZYX"``, ``"YXS"`` (RGB)...

    Parameters
    ----------
    layer : napari.layers.Image

    Returns
    -------
    str

    Raises
    ------
    InvalidImageError
        The layer has more axes than a z-stack (time, or channels not split into layers).
    """
    ndim = len(_level0(layer).shape)
    spatial = ndim - 1 if layer.rgb else ndim
    if spatial not in (2, 3):
        raise InvalidImageError(
            f"layer {layer.name!r} has {spatial} non-colour axes; tilerseg segments 2D "
            "images and z-stacks (open a time point or a channel as its own layer)")
    return "ZYX"[-spatial:] + ("S" if layer.rgb else "")


def _level0(layer: Any) -> Any:
    return layer.data[0] if layer.multiscale else layer.data


def layer_file(layer: Any) -> str | None:
    """The file a layer was read from (napari's ``layer.source.path``, or the demo
    slide's), if any."""
    path = layer.source.path or (layer.metadata.get("tilerseg") or {}).get("input")
    return os.fspath(path) if path else None


def _pixel_size(layer: Any, axes: str) -> dict[str, float]:
    """The layer's scale in micrometres, for the axes whose unit is a length."""
    out: dict[str, float] = {}
    spatial = [a for a in axes if a != "S"]
    for axis, scale, unit in zip(spatial, layer.scale[-len(spatial):],
                                 layer.units[-len(spatial):]):
        try:
            out[axis] = float((scale * unit).to("micrometer").magnitude)
        except Exception as err:  # noqa: BLE001 - pint's DimensionalityError: not a length
            log.debug("axis %s of layer %r has no pixel size: %s", axis, layer.name, err)
    return out


def layer_image(layer: Any) -> str | ImageSource:
    """What :func:`tilerseg.segment_to_zarr` segments for ``layer``.

    Parameters
    ----------
    layer : napari.layers.Image

    Returns
    -------
    str or ImageSource
        The layer's file when tilerseg opens it with the layer's level-0 shape and axes;
        else the level-0 data with the layer's axes and, where its units are lengths, its
        pixel size.

    Raises
    ------
    InvalidImageError
        See :func:`layer_axes`.
    """
    axes = layer_axes(layer)
    data = _level0(layer)
    path = layer_file(layer)
    if path is not None:
        from ..io.readers import open_image

        try:
            opened = open_image(path)
        except TilersegError as err:
            log.info("segmenting the data of layer %r: its file is not read by tilerseg "
                     "(%s)", layer.name, err)
        else:
            if opened.shape == tuple(data.shape) and opened.axes == axes:
                return path
    kind = "array" if isinstance(data, np.ndarray) else "dask"
    return ImageSource(data, axes, pixel_size=_pixel_size(layer, axes), format=kind)


def spatial_placement(layer: Any) -> dict[str, tuple]:
    """The layer's ``scale``, ``translate`` and ``units`` on its spatial axes, to register
    the result layers with."""
    n = len(layer_axes(layer).replace("S", ""))
    return {"scale": tuple(float(s) for s in layer.scale[-n:]),
            "translate": tuple(float(t) for t in layer.translate[-n:]),
            "units": tuple(str(u) for u in layer.units[-n:])}


def default_output(layer: Any | None, file: str | None = None) -> Path:
    """Where the output goes by default: beside the input file (``slide.tif`` ->
    ``slide.tilerseg.zarr``), else ``LAYER-NAME.tilerseg.zarr`` in the working folder.

    Parameters
    ----------
    layer : napari.layers.Image, optional
    file : str, optional
        An input file chosen instead of a layer.

    Returns
    -------
    pathlib.Path
    """
    from ..engine.jobs import default_output_path

    path = file if file else (layer_file(layer) if layer is not None else None)
    if path:
        return default_output_path(path)
    name = re.sub(r"[^\w.-]+", "_", layer.name if layer is not None else "image").strip("._")
    return Path.cwd() / f"{name or 'image'}.tilerseg.zarr"

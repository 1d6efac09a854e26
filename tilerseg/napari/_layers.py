"""napari layers of a tilerseg output: one image layer per class of the probabilities and
one labels layer per label image, every pyramid level read lazily from the OME-Zarr store.

The names, colours and display windows are the store's own (``omero`` channels and
``image-label`` colours, see :mod:`tilerseg.io.writers`); the scale is the store's pixel
size unless the caller gives the input layer's.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np
import zarr

from ..io.writers import open_output

__all__ = ["LayerData", "class_colormap", "is_output", "output_layers"]

LayerData = tuple[Any, dict[str, Any], str]
"""napari's layer data tuple: ``(data, keyword arguments, layer type)``."""


def is_output(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a tilerseg OME-Zarr output (a store with ``tilerseg`` attributes).

    Parameters
    ----------
    path : str or os.PathLike
        A folder.

    Returns
    -------
    bool
    """
    if not os.path.isfile(os.path.join(os.fspath(path), "zarr.json")):
        return False
    try:
        group = zarr.open_group(os.fspath(path), mode="r", zarr_format=3)
    except (OSError, ValueError, TypeError, KeyError):
        return False
    attrs = dict(group.attrs)
    return "tilerseg" in attrs and "multiscales" in dict(attrs.get("ome", {}))


def class_colormap(color: str, name: str) -> Any:
    """A napari colormap from black to ``color`` (an ``RRGGBB`` hex string), ``"gray"`` for
    white, as napari-ome-zarr draws an ``omero`` channel.

    Parameters
    ----------
    color : str
        The channel's colour, e.g. ``"1F77B4"``.
    name : str
        The colormap's name.

    Returns
    -------
    napari.utils.Colormap or str
    """
    rgb = [int(color[k:k + 2], 16) / 255 for k in (0, 2, 4)]
    if rgb == [1.0, 1.0, 1.0]:
        return "gray"
    from napari.utils import Colormap

    return Colormap([[0.0, 0.0, 0.0, 1.0], [*rgb, 1.0]], name=name)


def _levels(group: zarr.Group) -> tuple[list[da.Array], dict[str, Any]]:
    """The levels of a multiscale group as Dask arrays, and its multiscale metadata."""
    multiscale = dict(group.attrs)["ome"]["multiscales"][0]
    levels = [da.from_zarr(group[d["path"]]) for d in multiscale["datasets"]]
    return levels, multiscale


def _placement(multiscale: dict[str, Any], scale: Sequence[float] | None,
               translate: Sequence[float] | None,
               units: Sequence[str] | None) -> dict[str, Any]:
    """``scale``, ``translate``, ``units`` and ``axis_labels`` of the spatial axes: the
    caller's, else the store's level-0 scale and units."""
    axes = multiscale["axes"]
    spatial = [k for k, a in enumerate(axes) if a.get("type") == "space"]
    out: dict[str, Any] = {"axis_labels": tuple(axes[k]["name"] for k in spatial)}
    if scale is None:
        stored = next(t["scale"] for t in multiscale["datasets"][0]["coordinateTransformations"]
                      if t["type"] == "scale")
        out["scale"] = tuple(float(stored[k]) for k in spatial)
        units = [axes[k].get("unit") for k in spatial]
        if all(units):
            out["units"] = tuple(units)
    else:
        out["scale"] = tuple(float(s) for s in scale)
    if units is not None:
        out["units"] = tuple(units)
    if translate is not None:
        out["translate"] = tuple(float(t) for t in translate)
    return out


def _data(levels: list[Any]) -> tuple[Any, bool]:
    """The layer data of ``levels``: the list for several levels, the array for one."""
    return (levels, True) if len(levels) > 1 else (levels[0], False)


def output_layers(path: str | os.PathLike, *, scale: Sequence[float] | None = None,
                  translate: Sequence[float] | None = None,
                  units: Sequence[str] | None = None, prefix: str = "") -> list[LayerData]:
    """The napari layers of a tilerseg output, read lazily.

    Parameters
    ----------
    path : str or os.PathLike
        The OME-Zarr output.
    scale, translate : sequence of float, optional
        The spatial scale and translation to register the layers with (an input layer's);
        default: the store's pixel size, no translation.
    units : sequence of str, optional
        The units of ``scale`` (default: the store's, micrometres where it has a pixel
        size).
    prefix : str
        Put before every layer's name.

    Returns
    -------
    list of LayerData
        An ``image`` layer per class (named ``probabilities: CLASS``, coloured as the
        store's channels, over the stored value range), then a ``labels`` layer per label
        image (``segmentation`` with the store's colours, ``instances``).

    Raises
    ------
    tilerseg.OutputError
        ``path`` is not an OME-Zarr output.
    """
    found = open_output(path)
    root = zarr.open_group(os.fspath(path), mode="r", zarr_format=3)
    source = {"tilerseg": {"output": os.fspath(path)}}
    layers: list[LayerData] = []
    if found["probabilities"] is not None:
        levels, multiscale = _levels(root)
        channels = dict(root.attrs)["ome"]["omero"]["channels"]
        place = _placement(multiscale, scale, translate, units)
        for k, channel in enumerate(channels):
            data, multi = _data([level[k] for level in levels])
            name = f"{prefix}{multiscale.get('name', 'probabilities')}: {channel['label']}"
            window = channel["window"]
            layers.append((data, {
                "name": name, "multiscale": multi, "metadata": source,
                "colormap": class_colormap(channel["color"], name),
                "contrast_limits": (window["start"], window["end"]),
                "blending": "translucent_no_depth" if k == 0 else "additive",
                "visible": bool(channel.get("active", True)), **place}, "image"))
    groups = ([root] if found["probabilities"] is None else
              [root[f"labels/{name}"] for name in dict(root["labels"].attrs)["ome"]["labels"]]
              if "labels" in root else [])
    for group in groups:
        levels, multiscale = _levels(group)
        data, multi = _data(levels)
        meta: dict[str, Any] = {
            "name": f"{prefix}{multiscale.get('name') or group.basename}",
            "multiscale": multi, "metadata": source,
            **_placement(multiscale, scale, translate, units)}
        colors = dict(group.attrs)["ome"]["image-label"].get("colors")
        if colors:
            meta["colormap"] = label_colormap(colors)
        layers.append((data, meta, "labels"))
    return layers


def label_colormap(colors: list[dict[str, Any]]) -> Any:
    """The napari colormap of an ``image-label``'s ``colors`` (value -> RGBA, 0-255).

    Parameters
    ----------
    colors : list of dict
        ``{"label-value": v, "rgba": [r, g, b, a]}`` entries.

    Returns
    -------
    napari.utils.DirectLabelColormap
    """
    from napari.utils import DirectLabelColormap

    mapping: dict[int | None, np.ndarray] = {
        int(c["label-value"]): np.asarray(c["rgba"], float) / 255 for c in colors}
    mapping[None] = np.zeros(4)  # values the store has no colour for: transparent
    return DirectLabelColormap(color_dict=mapping)


def preview_layers(preview: Any, *, scale: Sequence[float], translate: Sequence[float],
                   units: Sequence[str] | None = None, prefix: str = "") -> list[LayerData]:
    """The layers of a :class:`~tilerseg.napari._view.ViewPreview`, named, coloured and
    scaled as :func:`output_layers` shows the full run's output, placed where its tiles
    lie in the image.

    Parameters
    ----------
    preview : ViewPreview
    scale, translate : sequence of float
        The input layer's spatial scale and translation.
    units : sequence of str, optional
        The units of ``scale``.
    prefix : str
        Put before every layer's name.

    Returns
    -------
    list of LayerData
    """
    from ..io.writers import class_colors, label_colors

    scale = tuple(float(s) for s in scale)
    place = {"scale": scale, "translate": tuple(
        float(t) + s * o for t, s, o in zip(translate, scale, preview.start)),
        "metadata": {"tilerseg": {"preview": list(preview.start)}}}
    if units is not None:
        place["units"] = tuple(units)
    layers: list[LayerData] = []
    probs = preview.probabilities
    if probs is not None:
        top = 255 if probs.dtype == np.uint8 else 1.0
        colors = class_colors(len(preview.class_names))
        for k, name in enumerate(preview.class_names):
            full = f"{prefix}probabilities: {name}"
            layers.append((probs[k], {
                "name": full, "colormap": class_colormap(colors[k], full),
                "contrast_limits": (0, top),
                "blending": "translucent_no_depth" if k == 0 else "additive", **place},
                "image"))
    if preview.labels is not None:
        layers.append((preview.labels, {
            "name": f"{prefix}segmentation",
            "colormap": label_colormap(label_colors(len(preview.class_names))), **place},
            "labels"))
    return layers

"""Zarr readers: Zarr v2/v3 arrays and OME-Zarr images (NGFF v0.1 to v0.5)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import zarr

from tilerseg.errors import InvalidImageError, TilersegError
from tilerseg.io.raw import RawImage, guess_axes, short_reason, to_micrometres, unreadable

__all__ = ["read_zarr"]

_AXIS_NAMES = {
    "t": "T", "time": "T", "c": "C", "channel": "C", "ch": "C", "z": "Z", "y": "Y",
    "x": "X", "s": "S", "rgb": "S", "sample": "S",
}


def _dimension_names(array: zarr.Array) -> list[str] | None:
    """Axis letters from v3 ``dimension_names`` or xarray's ``_ARRAY_DIMENSIONS``."""
    names = getattr(array.metadata, "dimension_names", None)
    if not names:
        names = array.attrs.get("_ARRAY_DIMENSIONS")
    if not names or len(names) != array.ndim:
        return None
    letters = [_AXIS_NAMES.get(str(n).lower()) for n in names]
    return letters if all(letters) and len(set(letters)) == len(letters) else None


def _multiscales(attrs: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The OME-Zarr ``multiscales`` list (v0.5 under ``"ome"``, earlier at top level)."""
    ome = attrs.get("ome")
    found = ome.get("multiscales") if isinstance(ome, dict) else None
    return found or attrs.get("multiscales") or None


def _scale(transforms: Any, ndim: int) -> list[float]:
    """The product of the ``scale`` coordinate transformations (ones if none)."""
    scale = [1.0] * ndim
    for t in transforms or ():
        if isinstance(t, dict) and t.get("type") == "scale" and len(t.get("scale", ())) == ndim:
            scale = [a * float(b) for a, b in zip(scale, t["scale"])]
    return scale


def _ome_zarr(group: zarr.Group, multiscale: dict[str, Any], path: str) -> RawImage:
    """Levels, axes and per-level pixel sizes of one OME-Zarr multiscale image."""
    datasets = multiscale.get("datasets") or []
    if not datasets:
        raise unreadable(path, "OME-Zarr 'multiscales' lists no datasets")
    levels = []
    for dataset in datasets:
        node = group[str(dataset["path"])]
        if not isinstance(node, zarr.Array):
            raise unreadable(path, f"OME-Zarr dataset {dataset['path']!r} is not an array")
        levels.append(node)
    ndim = levels[0].ndim
    axes = multiscale.get("axes") or list("tczyx"[5 - ndim:] if ndim <= 5 else [])
    names, units = [], []
    for axis in axes:
        name = axis.get("name", "") if isinstance(axis, dict) else str(axis)
        names.append(_AXIS_NAMES.get(name.lower(), name))
        units.append(axis.get("unit") if isinstance(axis, dict) else None)
    if len(names) != ndim:
        raise unreadable(path, f"OME-Zarr axes {names} do not match the array shape")
    overall = _scale(multiscale.get("coordinateTransformations"), ndim)
    sizes = []
    for dataset in datasets:
        scale = _scale(dataset.get("coordinateTransformations"), ndim)
        level_sizes = {}
        for name, unit, a, b in zip(names, units, scale, overall):
            size = to_micrometres(a * b, unit) if name in ("Z", "Y", "X") else None
            if size is not None:
                level_sizes[name] = size
        sizes.append(level_sizes)
    return RawImage(levels, names, "ome-zarr", pixel_size=sizes[0], level_pixel_sizes=sizes)


def _group(group: zarr.Group, path: str) -> RawImage:
    """An OME-Zarr image group (or a bioformats2raw container of one)."""
    attrs = dict(group.attrs)
    multiscales = _multiscales(attrs)
    if multiscales:
        return _ome_zarr(group, multiscales[0], path)
    layout = attrs.get("bioformats2raw.layout") or (attrs.get("ome") or {}).get(
        "bioformats2raw.layout"
    )
    if layout and "0" in group:
        return _group(group["0"], path)
    arrays: Sequence[str] = sorted(group.array_keys())
    hint = f"; give the path of one of its arrays ({', '.join(arrays[:5])})" if arrays else ""
    raise InvalidImageError(f"{path} is a Zarr group without OME-Zarr 'multiscales'{hint}")


def read_zarr(path: str) -> RawImage:
    """Describe a Zarr array or OME-Zarr image directory, lazily.

    Parameters
    ----------
    path : str
        A Zarr v2/v3 array, or a group with OME-Zarr ``multiscales`` metadata (v0.4
        ``attrs["multiscales"]``, v0.5 ``attrs["ome"]["multiscales"]``).

    Returns
    -------
    RawImage
        For an array: axes from its dimension names where they are t/c/z/y/x, else
        guessed from its number of dimensions; format ``"zarr"``. For OME-Zarr: one array
        per dataset, axes from ``axes``, pixel sizes from the ``scale`` transformations
        where the axis has a known unit; format ``"ome-zarr"``.

    Raises
    ------
    InvalidImageError
        Unreadable metadata, or a group that is not an OME-Zarr image.
    """
    try:
        node = zarr.open(path, mode="r")
        if isinstance(node, zarr.Array):
            names = _dimension_names(node) or list(guess_axes(node.shape, path))
            return RawImage([node], names, "zarr")
        return _group(node, path)
    except TilersegError:
        raise
    except Exception as exc:
        raise unreadable(path, short_reason(exc)) from None

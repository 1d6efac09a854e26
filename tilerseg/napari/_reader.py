"""The reader contribution: napari opens a tilerseg output (File > Open, ``napari
out.zarr``) as the layers of :func:`~tilerseg.napari._layers.output_layers`.

Other OME-Zarr stores are left to the other readers (napari-ome-zarr).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ._layers import LayerData, is_output, output_layers

__all__ = ["get_reader", "read_output"]


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """napari's reader hook: :func:`read_output` for a tilerseg output, else None.

    Parameters
    ----------
    path : str or list of str
        What the user opened (one path, or several: all must be outputs).

    Returns
    -------
    callable or None
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or not all(is_output(p) for p in paths):
        return None
    return read_output


def read_output(path: str | list[str]) -> list[LayerData]:
    """The layers of one or several tilerseg outputs (see
    :func:`~tilerseg.napari._layers.output_layers`).

    Parameters
    ----------
    path : str or list of str

    Returns
    -------
    list of LayerData
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    return [layer for p in paths for layer in output_layers(os.fspath(p).rstrip("/"))]

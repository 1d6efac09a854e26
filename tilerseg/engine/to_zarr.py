"""Segment an image into an OME-Zarr store through Dask, with bounded memory."""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import torch
from torch import nn

from ..errors import InvalidArgumentError
from ..io.writers import OutputSpec, OutputWriter, encode_probabilities, labels_from_probabilities
from ..normalize import NormalizeSpec
from .lazy import TileProgress, lazy_probabilities, local_compute
from .prepare import Prepared, check_batch_size, prepare

__all__ = ["segment_to_zarr", "default_output_path"]

log = logging.getLogger(__name__)

OUTPUTS = ("probabilities", "labels", "both")
DTYPES = ("uint8", "float16", "float32")
_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".btf", ".svs", ".zarr",
             ".npy", ".png", ".jpg", ".jpeg")


def default_output_path(image: str | os.PathLike) -> Path:
    """``slide.tif`` -> ``slide.tilerseg.zarr`` beside the input (folders and globs too).

    Examples
    --------
    >>> default_output_path("/data/slide.ome.tif").as_posix()
    '/data/slide.tilerseg.zarr'
    >>> default_output_path("/data/stack/*.tif").as_posix()
    '/data/stack.tilerseg.zarr'
    """
    path = Path(os.fspath(image))
    if any(c in path.name for c in "*?["):  # a glob: name it after its folder
        path = path.parent
    name = path.name
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return path.with_name(f"{name}.tilerseg.zarr")


def _run_attributes(p: Prepared, model: nn.Module, output: str, dtype: str,
                    threshold: float, model_source: str | None) -> dict[str, Any]:
    from .. import __version__

    return {
        "version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "input": {"path": p.source.path, "format": p.source.format, "axes": p.source.axes,
                  "shape": list(p.source.shape), "level": p.source.level,
                  "channels": list(p.view.channels)},
        "model": {"source": model_source, "architecture": getattr(model, "registry_name", None),
                  "config": getattr(model, "config", None)},
        "geometry": {"halo": list(p.geometry.halo), "step": list(p.geometry.step)},
        "tile": list(p.plan.tile),
        "window": list(p.plan.window),
        "normalization": p.normalization.as_dict(),
        "output": output,
        "dtype": dtype if output != "labels" else None,
        "threshold": threshold,
        "device": str(p.device),
    }


def segment_to_zarr(
    image: Any,
    model: nn.Module,
    out: str | os.PathLike | None = None,
    *,
    tile: int | Sequence[int] | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    normalize: NormalizeSpec = "auto",
    output: str = "probabilities",
    dtype: str = "uint8",
    threshold: float | None = None,
    level: int = 0,
    channel: Sequence[int] | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
    model_source: str | None = None,
) -> Path:
    """Segment ``image`` tile by tile into an OME-Zarr (v0.5, Zarr v3) store.

    The image is read lazily, one mirror-filled window per output tile; every Dask task
    writes whole output chunks (chunk = tile), so memory is bounded by the tiles in
    flight, not by the image. The store is built under a temporary name and moved into
    place only when complete: a failed or refused run never touches an existing output.

    Parameters
    ----------
    image : path, ImageSource, numpy, Dask or Zarr array
        The image (see :func:`tilerseg.open_image` for the formats read).
    model : torch.nn.Module
        The model.
    out : path, optional
        Output store; default beside a path input, ``slide.tif`` -> ``slide.tilerseg.zarr``.
    tile, batch_size, device, normalize
        As for :func:`tilerseg.segment`.
    output : {"probabilities", "labels", "both"}
        What to write: class probabilities (root image), a label image (argmax, or
        ``p >= threshold`` for a one-class model) under ``labels/segmentation``, or both.
    dtype : {"uint8", "float16", "float32"}
        Storage type of the probabilities; uint8 stores ``round(255 p)``.
    threshold : float, optional
        Foreground threshold for the labels: a one-class model labels ``p >= threshold``,
        a two-class model labels its foreground class (``model.metadata
        ["foreground_class"]``, default 1) where its probability is ``>= threshold``.
        Default: the threshold tuned when the model was trained (``model.metadata
        ["threshold"]``), else 0.5 for one class and argmax for more.
    level : int
        Pyramid level of the input to segment.
    channel : sequence of int, optional
        Input channels to feed the model, in order.
    overwrite : bool
        Replace an existing output (only once the new one is complete).
    progress : callable, optional
        ``progress(tiles_done, tiles_total)``.
    workers : int, optional
        Dask threads (default 2 on 2+ cores; torch gets the remaining cores' share).
    model_source : str, optional
        Where the model came from (a file or a registry name), recorded in the metadata.

    Returns
    -------
    pathlib.Path
        The written store.
    """
    if output not in OUTPUTS:
        raise InvalidArgumentError(f"output={output!r} must be one of {', '.join(OUTPUTS)}")
    if dtype not in DTYPES:
        raise InvalidArgumentError(f"dtype={dtype!r} must be one of {', '.join(DTYPES)}")
    metadata = getattr(model, "metadata", None) or {}
    if threshold is None:
        threshold = metadata.get("threshold")
    if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
        raise InvalidArgumentError(f"threshold={threshold!r} must be within [0, 1]")
    foreground = int(metadata.get("foreground_class", 1))
    if out is None:
        if not isinstance(image, (str, os.PathLike)):
            raise InvalidArgumentError("out is required when the image is not a path")
        out = default_output_path(image)
    p = prepare(image, model, tile, device, normalize, level=level, channel=channel)
    spec = OutputSpec(
        spatial_axes=p.view.spatial,
        shape=p.plan.image_shape,
        chunks=p.plan.tile,
        num_classes=p.geometry.out_channels,
        probabilities=dtype if output in ("probabilities", "both") else None,
        labels=output in ("labels", "both"),
        pixel_size=dict(p.source.pixel_size),
        attributes=_run_attributes(p, model, output, dtype, threshold, model_source),
    )
    start = time.perf_counter()
    with OutputWriter(out, spec, overwrite=overwrite) as writer:
        probs = lazy_probabilities(p.runner, check_batch_size(batch_size, p.device))
        sources, targets = [], []
        if writer.probabilities is not None:
            sources.append(probs.map_blocks(encode_probabilities, dtype, dtype=np.dtype(dtype)))
            targets.append(writer.probabilities)
        if writer.labels is not None:
            labels = probs.map_blocks(_labels, threshold, foreground, writer.labels.dtype,
                                      drop_axis=0, dtype=writer.labels.dtype)
            sources.append(labels)
            targets.append(writer.labels)
        log.info("segmenting %s into %s: %d tiles of %s", p.source.path or p.source.format,
                 out, len(p.plan), p.plan.tile)
        with local_compute(p.device, workers):
            if progress is not None:
                with TileProgress(probs, progress):
                    da.store(sources, targets, lock=False)
            else:
                da.store(sources, targets, lock=False)
        path = writer.commit()
    seconds = time.perf_counter() - start
    pixels = int(np.prod(p.plan.image_shape))
    log.info("wrote %s in %.1f s (%.2f Mpx/s)", path, seconds, pixels / seconds / 1e6)
    return path


def _labels(probs: np.ndarray, threshold: float | None, foreground: int,
            dtype: np.dtype) -> np.ndarray:
    if threshold is not None and probs.shape[0] == 2:
        return np.where(probs[foreground] >= threshold, foreground, 1 - foreground).astype(dtype)
    return labels_from_probabilities(probs, 0.5 if threshold is None else threshold).astype(
        dtype, copy=False)

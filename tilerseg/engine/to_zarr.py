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
from ..geometry import Tile, TilePlan
from ..io.writers import OutputSpec, OutputWriter, encode_probabilities, labels_from_probabilities
from ..normalize import NormalizeSpec
from .background import find_background
from .compute import replicate
from .device import resolve_devices
from .lazy import TileProgress, cpu_budget, lazy_probabilities, local_compute, torch_threads
from .pipeline import Direct, StageTimes, run_pipeline
from .prepare import Prepared, check_batch_size, prepare
from .runner import TileRunner

__all__ = ["segment_to_zarr", "default_output_path"]

log = logging.getLogger(__name__)

OUTPUTS = ("probabilities", "labels", "both")
DTYPES = ("uint8", "float16", "float32")
EXECUTORS = ("pipeline", "dask")
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
    device: str | torch.device | Sequence[str | torch.device] = "auto",
    normalize: NormalizeSpec = "auto",
    output: str = "probabilities",
    dtype: str = "uint8",
    threshold: float | None = None,
    level: int = 0,
    channel: Sequence[int] | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
    threads: int | None = None,
    precision: str = "fp32",
    compile: bool = False,
    skip_background: bool = False,
    background_tolerance: float = 0.05,
    background_value: float | None = None,
    executor: str = "pipeline",
    pyramid: bool = True,
    model_source: str | None = None,
) -> Path:
    """Segment ``image`` tile by tile into an OME-Zarr (v0.5, Zarr v3) store.

    The image is read lazily, one mirror-filled window per output tile, and every output
    tile is one chunk of the store, so memory is bounded by the tiles in flight, not by
    the image. By default a pipelined executor overlaps reading, the model and writing
    through bounded queues (:mod:`tilerseg.engine.pipeline`). The store is built under a
    temporary name and moved into place only when complete: a failed or refused run
    never touches an existing output.

    Parameters
    ----------
    image : path, ImageSource, numpy, Dask or Zarr array
        The image (see :func:`tilerseg.open_image` for the formats read).
    model : torch.nn.Module
        The model.
    out : path, optional
        Output store; default beside a path input, ``slide.tif`` -> ``slide.tilerseg.zarr``.
    tile, batch_size, normalize
        As for :func:`tilerseg.segment`.
    device : str, torch.device or sequence
        ``"auto"``, ``"cpu"``, ``"cuda"`` (every visible GPU, one model replica each),
        ``"cuda:N"``, ``"cuda:0,cuda:1"`` or a sequence, ``"mps"``.
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
        Concurrent forward passes on the CPU (default 2 where there are 2+ cores:
        measured faster than one pass with all cores on a 2-core machine). On GPUs there
        is one per device. With ``executor="dask"``: the Dask threads.
    threads : int, optional
        Torch intra-op threads per CPU worker (default: cores // workers, so the cores
        are not oversubscribed).
    precision : {"fp32", "bf16", "fp16"}
        Autocast precision of the forward pass; a device that cannot compute in it is
        refused with an error, and a non-finite output (fp16 overflow) stops the run.
    compile : bool
        Compile the model with :func:`torch.compile` (checked against eager execution
        on a random batch first; falls back to eager execution with a warning).
    skip_background : bool
        Write tiles whose whole input window is flat background with the model's output
        on a constant background window, without running the model (see
        :func:`~tilerseg.engine.background.find_background`). Recorded in the metadata.
    background_tolerance, background_value : float
        The background test (model input units); the value defaults to the most common
        value of a low-resolution level.
    executor : {"pipeline", "dask"}
        The pipelined executor, or one Dask task per tile (or batch) through the local
        threaded scheduler.
    pyramid : bool
        Add lower-resolution levels, 2x each. The pipelined executor computes levels 1-2
        from each tile as it is written (their chunks are halved per level, so each tile
        is one chunk); deeper levels are built at the end from the level before.
    model_source : str, optional
        Where the model came from (a file or a registry name), recorded in the metadata.

    Returns
    -------
    pathlib.Path
        The written store. Timings of the run are stored under ``tilerseg/profile`` in
        its metadata.
    """
    start = time.perf_counter()
    if output not in OUTPUTS:
        raise InvalidArgumentError(f"output={output!r} must be one of {', '.join(OUTPUTS)}")
    if dtype not in DTYPES:
        raise InvalidArgumentError(f"dtype={dtype!r} must be one of {', '.join(DTYPES)}")
    if executor not in EXECUTORS:
        raise InvalidArgumentError(f"executor={executor!r} must be one of {', '.join(EXECUTORS)}")
    for name, value in (("workers", workers), ("threads", threads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise InvalidArgumentError(f"{name}={value!r} must be a positive integer")
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
    devices = resolve_devices(device)
    if executor == "dask" and (len(devices) > 1 or compile or skip_background):
        raise InvalidArgumentError(
            "several devices, compile and skip_background need executor='pipeline'")
    p = prepare(image, model, tile, devices, normalize, level=level, channel=channel,
                precision=precision)
    batch = check_batch_size(batch_size, p.device)
    attributes = _run_attributes(p, model, output, dtype, threshold, model_source)
    attributes.update(precision=precision, devices=[str(d) for d in devices],
                      executor=executor)
    spec = OutputSpec(
        spatial_axes=p.view.spatial,
        shape=p.plan.image_shape,
        chunks=p.plan.tile,
        num_classes=p.geometry.out_channels,
        probabilities=dtype if output in ("probabilities", "both") else None,
        labels=output in ("labels", "both"),
        pixel_size=dict(p.source.pixel_size),
        attributes=attributes,
        pyramid=pyramid,
        eager_levels=2 if executor == "pipeline" else 0,
    )
    with OutputWriter(out, spec, overwrite=overwrite) as writer:
        log.info("segmenting %s into %s: %d tiles of %s", p.source.path or p.source.format,
                 out, len(p.plan), p.plan.tile)
        encode = _Encoder(writer, dtype, threshold, foreground)
        if executor == "dask":
            times = _run_dask(p, writer, encode, batch, workers, progress)
            extra: dict[str, Any] = {}
        else:
            times, extra = _run_pipeline(
                p, writer, encode, batch, devices, workers, threads, compile,
                progress, skip_background, background_tolerance, background_value)
        setup = time.perf_counter() - start - times.wall
        profile = {**times.as_dict(), "setup": round(setup, 3)}
        writer.update_attributes(profile=profile, **extra)
        finishing = time.perf_counter()
        path = writer.commit()
    seconds = time.perf_counter() - start
    pixels = int(np.prod(p.plan.image_shape))
    log.info("wrote %s in %.1f s (%.2f Mpx/s; set-up %.1f s, tiles %.1f s, pyramid and "
             "metadata %.1f s)", path, seconds, pixels / seconds / 1e6, setup, times.wall,
             time.perf_counter() - finishing)
    return path


class _Encoder:
    """Encodes and writes one output tile (probabilities and/or labels)."""

    def __init__(self, writer: OutputWriter, dtype: str, threshold: float | None,
                 foreground: int) -> None:
        self.writer, self.dtype = writer, dtype
        self.threshold, self.foreground = threshold, foreground

    def probabilities(self, probs: np.ndarray) -> np.ndarray:
        return encode_probabilities(probs, self.dtype)

    def labels(self, probs: np.ndarray) -> np.ndarray:
        assert self.writer.labels is not None
        return _labels(probs, self.threshold, self.foreground, self.writer.labels.dtype)

    def __call__(self, tile: Tile, probs: np.ndarray) -> None:
        labels = self.labels(probs) if self.writer.labels is not None else None
        self.writer.write(tile.write, probs, labels=labels)


def _run_dask(p: Prepared, writer: OutputWriter, encode: _Encoder, batch: int,
              workers: int | None, progress: Callable[[int, int], None] | None) -> StageTimes:
    """One Dask task per tile (or batch of tiles), written with ``da.store``."""
    probs = lazy_probabilities(p.runner, batch)
    sources, targets = [], []
    if writer.probabilities is not None:
        sources.append(probs.map_blocks(encode.probabilities, dtype=writer.probabilities.dtype))
        targets.append(writer.probabilities)
    if writer.labels is not None:
        sources.append(probs.map_blocks(encode.labels, drop_axis=0, dtype=writer.labels.dtype))
        targets.append(writer.labels)
    start = time.perf_counter()
    with local_compute(p.device, workers) as n:
        if progress is not None:
            with TileProgress(probs, progress):
                da.store(sources, targets, lock=False)
        else:
            da.store(sources, targets, lock=False)
    return StageTimes(wall=time.perf_counter() - start, tiles=len(p.plan), compute_workers=n)


def _run_pipeline(
    p: Prepared, writer: OutputWriter, encode: _Encoder, batch: int,
    devices: list[torch.device], workers: int | None, threads: int | None, compile: bool,
    progress: Callable[[int, int], None] | None, skip_background: bool,
    tolerance: float, value: float | None,
) -> tuple[StageTimes, dict[str, Any]]:
    """Read, compute and write overlapped through bounded queues (see run_pipeline)."""
    runner = p.runner
    cpu = p.device.type == "cpu"
    if cpu:
        workers, threads = cpu_budget(workers, threads)
        replicas = [runner.replica] * workers
    else:
        replicas = [runner.replica] + replicate(
            runner.model, devices[1:], p.geometry.ndim, runner.replica.precision,
            runner.per_plane)
    for r in replicas:
        r.compile_requested = compile
    extra: dict[str, Any] = {}
    skip = np.zeros(p.plan.grid, dtype=bool)
    fill = None
    if skip_background:
        found = find_background(p.source, p.view, p.normalization, p.plan, tolerance, value)
        skip = found.skip
        extra["background"] = found.as_dict()
        if skip.any():
            fill = _fill(runner, p.plan, found.value)
    tiles = list(p.plan)
    run = [t for t in tiles if not skip[t.index]]
    jobs = [run[k:k + batch] for k in range(0, len(run), batch)]
    jobs += [[t] for t in tiles if skip[t.index]]

    def load(batch_tiles: Sequence[Tile]) -> Any:
        if skip[batch_tiles[0].index]:
            assert fill is not None
            return Direct([fill[(slice(None),) + tuple(slice(0, s.stop - s.start)
                                                       for s in t.write)]
                           for t in batch_tiles])
        return runner.load(batch_tiles)

    total = len(tiles)
    report = None if progress is None else (lambda done: progress(done, total))
    many = os.cpu_count() or 1
    # I/O threads mostly wait on the queues; decoding and compressing release the GIL
    readers = min(2, many) if cpu else max(2, min(8, many // (2 * len(replicas))))
    with torch_threads(threads if cpu else None):
        window = (p.plan.window[1:] if runner.per_plane else p.plan.window)
        for r in replicas[: 1 if cpu else None]:
            r.warm_up(window, p.geometry.in_channels, batch)
        log.info("pipeline: %d reader(s), %d compute worker(s) on %s%s, %d writer(s)",
                 readers, len(replicas), ", ".join(str(d) for d in devices),
                 f" x {torch.get_num_threads()} torch thread(s)" if cpu else "", readers)
        times = run_pipeline(jobs, load, replicas, encode, readers=readers, writers=readers,
                             progress=report)
    return times, extra


def _fill(runner: TileRunner, plan: TilePlan, value: list[float]) -> np.ndarray:
    """The model's probabilities for a full tile on a constant window of ``value``."""
    window = np.empty((plan.geometry.in_channels, *plan.window), np.float32)
    window[...] = np.asarray(value, np.float32).reshape(-1, *(1,) * len(plan.window))
    first = next(iter(plan))
    return runner.replica(torch.from_numpy(window[None]), [first])[0]


def _labels(probs: np.ndarray, threshold: float | None, foreground: int,
            dtype: np.dtype) -> np.ndarray:
    if threshold is not None and probs.shape[0] == 2:
        return np.where(probs[foreground] >= threshold, foreground, 1 - foreground).astype(dtype)
    return labels_from_probabilities(probs, 0.5 if threshold is None else threshold).astype(
        dtype, copy=False)

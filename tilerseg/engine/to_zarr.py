"""Segment an image into an OME-Zarr store (resumable, on any executor), or into NIfTI
through one."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from upath import UPath

from ..errors import InvalidArgumentError, OutputError, TilersegError
from ..io import remote
from ..io.formats import strip_image_suffix
from ..io.nifti import is_nifti_path, probabilities_path, run_manifest, write_nifti
from .executors import ShardExecutor, parse_shard, resolve_executor
from .executors.shard import Shard
from .jobs import default_output_path, read_final_manifest
from .options import RunOptions, run_options
from .pipeline import run_attributes
from .resume import Started, start
from .tasks import Work
from .workdir import WorkDir, remove_tree

__all__ = ["segment_to_zarr", "default_output_path", "nifti_store_path"]

OUTPUT_FORMATS = ("zarr", "nifti")

log = logging.getLogger(__name__)


def segment_to_zarr(
    image: Any,
    model: nn.Module,
    out: str | os.PathLike | None = None,
    options: RunOptions | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    executor: Any = None,
    shard: str | tuple[int, int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    model_source: str | None = None,
    output_format: str | None = None,
    keep_zarr: bool = False,
    **option_values: Any,
) -> UPath:
    """Segment ``image`` tile by tile into an OME-Zarr (v0.5, Zarr v3) store, resumably.

    The image is read lazily, one mirror-filled window per output tile, and every output
    tile is one chunk of the store, so memory is bounded by the tiles in flight, not by
    the image. The unfinished output lives in ``OUT.zarr.partial/`` beside ``out`` with a
    manifest of the run and a completion record per task (a block of tiles); it is moved
    to ``out`` only when complete, so a failed, interrupted or refused run never touches
    an existing output, and ``resume=True`` continues where a killed run stopped (see
    :mod:`tilerseg.engine.jobs` and :mod:`tilerseg.engine.resume`).

    Parameters
    ----------
    image : path, ImageSource, numpy, Dask or Zarr array
        The image (see :func:`tilerseg.open_image` for the formats read). Only paths can
        be sent to a cluster: its workers reopen the file themselves.
    model : torch.nn.Module
        The model.
    out : path or URL, optional
        Output store; default beside a path input, ``slide.tif`` -> ``slide.tilerseg.zarr``.
        An fsspec URL (``"s3://bucket/out.zarr"``, ``"memory://out.zarr"``) writes the
        store through fsspec: into a staging prefix beside it, moved into place when
        complete; ``resume``, ``shard`` and a cluster are then refused (they need local
        locks and renames). ``file://`` is a local path.
    options : RunOptions, optional
        The options below as one object (keywords override it).
    resume : bool
        Continue an unfinished run of ``out`` (same parameters, else an error naming the
        first that differs); start one if there is none; return at once if ``out`` is
        already complete with the same parameters.
    overwrite : bool
        Replace an existing output (only once the new one is complete), and start an
        unfinished run again instead of refusing.
    executor : None, "pipeline", "dask", distributed.Client or Executor
        How the tasks run: threads in this process (default), claiming pipelines on
        Dask's local threads, a ``dask.distributed`` cluster (one per worker process), or
        any :class:`~tilerseg.engine.executors.Executor`.
    shard : "I/N", (I, N), "auto" or Shard, optional
        Run as a shard of a job array: join the run (creating it if first) and claim
        tasks until none is left, with any number of other shards, in any order and at
        once (see :mod:`tilerseg.engine.claims`); ``"auto"`` names the shard after SLURM's
        array variables. Whoever records the last task commits.
    progress : callable, optional
        ``progress(tiles_done, tiles_total)`` over the tiles this call computes.
    model_source : str, optional
        Where the model came from (a file or a registry name), recorded in the metadata.
    output_format : {"zarr", "nifti"}, optional
        What to write; default by ``out``'s name: NIfTI for ``.nii`` / ``.nii.gz``, else
        OME-Zarr. ``"nifti"`` without ``out`` writes ``NAME.tilerseg.nii.gz`` beside the
        input. NIfTI output runs through an OME-Zarr store ``OUT.zarr`` beside it
        (``seg.nii.gz.zarr``, with its ``seg.nii.gz.zarr.partial/`` while unfinished, so
        ``resume`` works as for Zarr); once complete, the labels are written to ``out``
        and, when the output includes probabilities, the probabilities to
        ``NAME_probabilities.nii.gz`` (4-D float32, classes last), both in the input's
        space (see :func:`tilerseg.io.nifti.write_nifti`); then the store is removed.
        The labels are always written (``output="probabilities"`` writes both files);
        ``"instances"``, ``shard`` and remote outputs are refused. An existing NIfTI
        output is replaced only with ``overwrite``, and only by a complete file;
        ``resume`` returns at once when the files exist.
    keep_zarr : bool
        With NIfTI output: keep the OME-Zarr store (a multiscale image for viewers, and
        what :func:`~tilerseg.io.nifti.write_nifti` can convert again).
    **option_values
        Fields of :class:`~tilerseg.engine.options.RunOptions`:

        tile, batch_size, normalize
            As for :func:`tilerseg.segment`.
        device : str or sequence
            ``"auto"``, ``"cpu"``, ``"cuda"`` (every visible GPU, one model replica each),
            ``"cuda:N"``, ``"cuda:0,cuda:1"`` or a sequence, ``"mps"``. On a cluster each
            worker process uses one GPU where it has some.
        output : {"probabilities", "labels", "both"}
            Class probabilities (root image), a label image under
            ``labels/segmentation``, or both.
        dtype : {"uint8", "float16", "float32"}
            Storage type of the probabilities; uint8 stores ``round(255 p)``.
        threshold : float, optional
            Foreground threshold of the labels (see :mod:`tilerseg.labels`); default the
            model's tuned threshold, else 0.5 for one class and argmax for more.
        level : int
            Pyramid level of the input to segment.
        channel : sequence of int, optional
            Input channels to feed the model, in order.
        precision : {"fp32", "bf16", "fp16", "int8"}
            Precision of the forward pass; refused where the device cannot compute in
            it; a non-finite output (fp16 overflow) stops the run. ``"int8"``: the model
            quantised with NNCF for OpenVINO (see :mod:`tilerseg.engine.int8`).
        calibration : path, optional
            With int8: a folder of images to calibrate on (default: the image itself).
        compile : bool
            :func:`torch.compile` the model (checked against eager execution first; falls
            back to eager execution with a warning).
        skip_background, background_tolerance, background_value
            Fill tiles whose whole input window is flat background with the model's
            output on a constant background window, without running the model.
        pyramid : bool
            Add lower-resolution levels, 2x each (levels 1-2 written with each tile).
        workers, threads : int
            CPU model workers (default 2 where there are 2+ cores) and torch threads per
            worker (default cores / workers).
        tta : bool or {"dihedral", "flips"}
            Exact test-time augmentation of every window, as for :func:`tilerseg.segment`
            (recorded with the run: a resume keeps it).

    Returns
    -------
    upath.UPath
        The written store (also when it was already complete), or the NIfTI labels file:
        a local path (a
        :class:`pathlib.Path`), or a remote location (``str()`` of it is its URL).
        Timings are stored under ``tilerseg/profile`` in its metadata. A shard returns it
        even when other shards still have tasks to do (see :func:`tilerseg.status`).

    Raises
    ------
    TilersegError
        Bad input or arguments, an existing output, an unfinished run in the way.
    OSError
        The disk is full or the output unwritable; the unfinished run is kept.
    """
    begin = time.perf_counter()
    options = run_options(options, **option_values)
    if output_format not in (None,) + OUTPUT_FORMATS:
        raise InvalidArgumentError(f"output_format {output_format!r} is not one of "
                                   f"{', '.join(OUTPUT_FORMATS)}")
    if output_format == "nifti" and out is None:
        if not isinstance(image, remote.PATHS):
            raise InvalidArgumentError("out is required when the image is not a path")
        zarr_default = default_output_path(image)
        out = zarr_default.with_name(f"{strip_image_suffix(zarr_default.name)}.nii.gz")
    if out is not None and (output_format == "nifti" or (
            output_format is None and is_nifti_path(out))):
        return _segment_to_nifti(
            image, model, out, options, resume=resume, overwrite=overwrite,
            executor=executor, shard=shard, progress=progress, model_source=model_source,
            keep_zarr=keep_zarr)
    if output_format == "zarr" and out is not None and is_nifti_path(out):
        raise InvalidArgumentError(f"out {os.fspath(out)!r} names a NIfTI file but "
                                   "output_format is 'zarr'")
    if out is None:
        if not isinstance(image, remote.PATHS):
            raise InvalidArgumentError("out is required when the image is not a path")
        out = default_output_path(image)
    shard_at = parse_shard(shard)
    runner = resolve_executor(executor)
    if shard_at is not None:
        runner = ShardExecutor(shard_at, inner=runner)
    plan_device = runner.plan_device(options.device)
    out = remote.output_location(out)
    if not remote.is_local(out):
        remote.check_remote_run(out, resume=resume, shard=shard_at,
                                in_process=plan_device is None,
                                waits_for_all=runner.waits_for_all)
    started = start(image, model, out, options, resume=resume, overwrite=overwrite,
                    shard=shard_at, model_source=model_source, plan_device=plan_device)
    if started.complete:
        log.info("%s is already complete", started.out)
        return started.out
    with started:
        try:
            return _run(started, runner, shard_at, overwrite, progress, begin, plan_device)
        except TilersegError:
            if discardable(started, runner, shard_at):
                started.work.remove()
            raise
        finally:
            started.discard()  # a remote output's private run: never resumed


def discardable(started: Started, runner: Any, shard: Shard | None) -> bool:
    """Whether a run refused for its input (NaN, wrong channels...) leaves nothing worth
    resuming: this call made the work directory, no task of it was recorded, no sibling
    shard shares it, no other live process works on it, and every thread that could
    still write to it has stopped."""
    if not (started.created and shard is None and runner.waits_for_all
            and started.work.path.is_dir() and not started.work.done()):
        return False
    me = (socket.gethostname(), os.getpid())
    return all((h.host, h.pid) == me for h in started.work.running())


def _run(started: Started, runner: Any, shard: Shard | None, overwrite: bool,
         progress: Callable[[int, int], None] | None, begin: float,
         plan_device: str | None) -> UPath:
    work, ctx = started.work, started.context
    assert ctx is not None
    ids = work.missing()
    total = work.grid.tiles_of(ids)
    report = None if progress is None else (lambda done: progress(done, total))
    p = ctx.p
    log.info("segmenting %s into %s: %d of %d tasks to do (%d tiles of %s) with %s",
             p.source.path or p.source.format, started.out, len(ids), len(work.grid), total,
             p.plan.tile, runner.name)
    times = runner.run([Work(ctx, ids)], progress=report)
    setup = time.perf_counter() - begin - times.wall
    if not work.path.is_dir():
        log.info("%s was committed by another process", started.out)
        return started.out
    missing = work.missing()
    if missing:
        log.info("%s: %d of %d tasks remain for other processes", started.out, len(missing),
                 len(work.grid))
        return started.out
    devices = [str(d) for d in p.devices] if plan_device is None else [
        f"{plan_device} (cluster workers)"]

    def attributes(work: WorkDir) -> dict[str, Any]:
        """The run's profile, merged from every process's record, and what ran it."""
        out = run_attributes(work.worker_records(), times.wall, runner.name)
        out["profile"]["setup"] = round(setup, 3)
        out["devices"] = devices
        if p.options.skip_background:
            out["background"] = work.manifest["resolved"]["background"]
        return out

    finishing = time.perf_counter()
    started.release()  # before the commit: it waits for the others to leave
    if not work.commit(started.out, overwrite=overwrite, attributes=attributes,
                  writer=ctx.writer, mapper=runner.map):
        return started.out
    seconds = time.perf_counter() - begin
    pixels = int(np.prod(p.plan.image_shape))
    log.info("wrote %s in %.1f s (%.2f Mpx/s; set-up %.1f s, tiles %.1f s, pyramid and "
             "metadata %.1f s)", started.out, seconds, pixels / seconds / 1e6, setup,
             times.wall, time.perf_counter() - finishing)
    return started.out


def nifti_store_path(path: str | os.PathLike) -> Path:
    """The OME-Zarr store a NIfTI output is computed in: ``seg.nii.gz`` ->
    ``seg.nii.gz.zarr`` (its unfinished run: ``seg.nii.gz.zarr.partial``).

    Examples
    --------
    >>> nifti_store_path("/data/seg.nii.gz").as_posix()
    '/data/seg.nii.gz.zarr'
    """
    path = Path(os.fspath(path))
    return path.with_name(path.name + ".zarr")


def _segment_to_nifti(image: Any, model: nn.Module, out: str | os.PathLike,
                      options: RunOptions, *, resume: bool, overwrite: bool, executor: Any,
                      shard: Any, progress: Any, model_source: str | None,
                      keep_zarr: bool) -> Path:
    """NIfTI output: the run into ``OUT.zarr``, then :func:`write_nifti` (see
    :func:`segment_to_zarr`)."""
    text = os.fspath(out)
    if not remote.is_local(remote.output_location(text)):
        raise InvalidArgumentError(f"NIfTI output {text} must be a local file (write OME-Zarr "
                                   "to a URL instead)")
    target = Path(remote.local_path(text))
    if not is_nifti_path(target):
        raise InvalidArgumentError(f"NIfTI output {target} must end in .nii or .nii.gz")
    if shard is not None:
        raise InvalidArgumentError("shard is not available with NIfTI output: write OME-Zarr "
                                   "and convert it with tilerseg.io.nifti.write_nifti")
    if options.output == "instances":
        raise InvalidArgumentError("output 'instances' is not available with NIfTI output "
                                   "(labels, probabilities or both)")
    wants_probabilities = options.output in ("probabilities", "both")
    targets = [target] + ([Path(probabilities_path(target))] if wants_probabilities else [])
    existing = [t for t in targets if t.exists()]
    if options.output == "probabilities":
        options = run_options(options, output="both")
    if resume and not overwrite and len(existing) == len(targets):
        from .resume import run_differences

        manifest = run_manifest(target)
        changed = (["it was not written by a tilerseg run"] if manifest is None
                   else run_differences(manifest, image, model, options))
        if not changed:
            log.info("%s is already complete", target)
            return target
        raise OutputError(f"output '{target}' exists from another run: {changed[0]}; pass "
                          "--overwrite to replace it")
    if existing and not overwrite:
        raise OutputError(f"output '{existing[0]}' exists; pass --overwrite to replace it")
    store = nifti_store_path(target)
    written = segment_to_zarr(image, model, store, options, resume=resume, overwrite=overwrite,
                              executor=executor, progress=progress, model_source=model_source,
                              output_format="zarr")
    if read_final_manifest(Path(written)) is None:
        raise OutputError(f"the run of '{store}' did not complete; NIfTI output '{target}' "
                          "is not written")
    write_nifti(written, target, probabilities=wants_probabilities, overwrite=overwrite)
    if not keep_zarr:
        remove_tree(Path(written))
    return target

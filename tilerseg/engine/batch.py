"""Many images, one model: each to its own OME-Zarr output, through one stream of tasks.

The images are opened and planned one after the other as the executor asks for work, so
the model never waits for the next image and the local executor keeps every model worker
busy even when each image is a single tile. Every image is a resumable run of its own:
complete outputs are skipped, unfinished ones continued, and an image that fails
(unreadable, wrong channels, non-finite output...) is reported while the rest go on.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import InvalidArgumentError, OutputError, TilersegError
from ..io import remote
from ..io.formats import image_paths
from .executors import parse_shard, resolve_executor
from .options import RunOptions, run_options
from .pipeline import run_attributes
from .resume import Started, start
from .tasks import Work
from .jobs import default_output_path, read_final_manifest
from .to_zarr import discardable

__all__ = ["BatchResult", "batch_inputs", "segment_batch"]

log = logging.getLogger(__name__)


@dataclass
class BatchResult:
    """What happened to one image of a batch.

    Attributes
    ----------
    image : str
        The input.
    output : Path
        Its output.
    status : str
        ``"done"`` (written now), ``"complete"`` (already complete: skipped),
        ``"failed"``, or ``"pending"`` (not finished: the batch was interrupted, or the
        image is computed by another process).
    tiles : int
        Tiles written now.
    seconds : float
        From opening the image to committing its output.
    error : str or None
        The error of a failed image, one line.
    """

    image: str
    output: Path
    status: str = "pending"
    tiles: int = 0
    seconds: float = 0.0
    error: str | None = None
    _started: Started | None = field(default=None, repr=False)
    _begin: float = field(default=0.0, repr=False)


def batch_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The images a batch names: files, Zarr stores, folders, globs and lists of paths.

    A ``.txt`` file lists one path (or folder, or glob) per line; blank lines and lines
    starting with ``#`` are skipped, relative paths are relative to the list's folder.
    Folders give their image files and ``.zarr`` stores in natural order, except tilerseg
    outputs (``*.tilerseg.zarr``, so an output folder inside an input folder is not read
    back). Duplicates are dropped.

    Raises
    ------
    ImageNotFoundError
        A path that does not exist, a folder without images, a glob matching nothing.
    InvalidArgumentError
        A remote URL (``file://`` URLs are local paths).
    """
    if isinstance(inputs, (str, os.PathLike)):  # one path, not a sequence of characters
        inputs = [inputs]
    found: list[str] = []
    for entry in inputs:
        entry = remote.local_path(entry)
        if remote.is_url(entry):
            raise InvalidArgumentError(f"a batch reads local images, not {entry}; segment a "
                                       "remote image with 'tilerseg run URL -o OUT'")
        if entry.lower().endswith(".txt") and os.path.isfile(entry):
            base = os.path.dirname(os.path.abspath(entry))
            with open(entry, encoding="utf-8") as f:
                lines = [line.strip() for line in f]
            for line in lines:
                if line and not line.startswith("#"):
                    found += image_paths(os.path.join(base, line))
        else:
            found += image_paths(entry)
    return list(dict.fromkeys(os.path.abspath(p) for p in found
                              if not p.rstrip("/").endswith(".tilerseg.zarr")))


def _outputs(images: Sequence[str], out_dir: Path) -> list[Path]:
    outputs = [out_dir / default_output_path(image).name for image in images]
    seen: dict[Path, str] = {}
    for image, out in zip(images, outputs):
        if out in seen:
            raise InvalidArgumentError(
                f"{seen[out]} and {image} would both be written to {out}; rename one")
        seen[out] = image
    return outputs


def segment_batch(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    model: nn.Module,
    out_dir: str | os.PathLike,
    options: RunOptions | None = None,
    *,
    overwrite: bool = False,
    executor: Any = None,
    shard: str | tuple[int, int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    model_source: str | None = None,
    **option_values: Any,
) -> list[BatchResult]:
    """Segment many images with one model, each into ``OUT_DIR/NAME.tilerseg.zarr``.

    Parameters
    ----------
    inputs : path or sequence of paths
        Files, Zarr stores, folders, globs or ``.txt`` lists of them (see
        :func:`batch_inputs`).
    model : torch.nn.Module
        The model, loaded once.
    out_dir : path
        Where the outputs go (created if missing).
    options : RunOptions, optional
        As for :func:`tilerseg.segment_to_zarr` (keywords override it).
    overwrite : bool
        Replace complete outputs made with other parameters, and start unfinished ones
        again. Without it, complete outputs with the same parameters are skipped and
        unfinished ones continued (each image is run with ``resume=True``).
    executor : None, "pipeline", "dask", distributed.Client or Executor
        How the tasks run (see :func:`tilerseg.segment_to_zarr`).
    shard : "I/N", (I, N) or "auto", optional
        Do only every ``N``-th image, starting with image ``I`` (in input order; with
        ``"auto"``, the place of this job in its SLURM job array; outside an array every
        image). The tasks of each image are claimed, so shards that meet on one image
        share it.
    progress : callable, optional
        ``progress(images_finished, images)``.
    model_source : str, optional
        Recorded in every output's metadata.
    **option_values
        Fields of :class:`~tilerseg.engine.options.RunOptions`.

    Returns
    -------
    list of BatchResult
        One per image of this shard, in input order.
    """
    options = run_options(options, **option_values)
    images = batch_inputs(inputs)
    if not images:
        raise InvalidArgumentError("the batch names no images")
    if remote.is_remote(out_dir):
        raise InvalidArgumentError(
            f"a batch writes to a local output folder, not {out_dir}: each image is resumable, "
            "which a remote output cannot be")
    out_dir = Path(remote.local_path(out_dir))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create the output folder '{out_dir}': {err}") from None
    outputs = _outputs(images, out_dir)
    shard_at = parse_shard(shard)
    results = [BatchResult(image, out) for image, out in zip(images, outputs)]
    if shard_at is not None and shard_at.count is not None:
        results = results[shard_at.index::shard_at.count]
    runner = resolve_executor(executor)
    plan_device = runner.plan_device(options.device)
    lock = threading.Lock()
    finished = [0]
    by_work: dict[int, BatchResult] = {}

    def tell(result: BatchResult) -> None:
        with lock:
            finished[0] += 1
            done = finished[0]
        if progress is not None:
            progress(done, len(results))

    def fail(result: BatchResult, err: BaseException) -> None:
        result.status = "failed"
        result.error = str(err).splitlines()[0] if str(err) else type(err).__name__
        log.warning("%s failed: %s", result.image, result.error)
        tell(result)

    def finish(work: Work) -> None:
        result = by_work[id(work)]
        assert result._started is not None
        result._started.release()  # before the commit: it waits for the others to leave
        wall = time.perf_counter() - result._begin
        work.context.work.commit(
            result.output, overwrite=overwrite, writer=work.context.writer, mapper=runner.map,
            attributes=lambda w: {**run_attributes(w.worker_records(), wall, runner.name),
                                  "batch": True})
        # committed here or by another process working on it (which may still be at it)
        result.status = "done" if read_final_manifest(result.output) is not None else "pending"
        result.tiles = work.tiles
        result.seconds = round(time.perf_counter() - result._begin, 3)
        tell(result)

    def works() -> Any:
        for result in results:
            result._begin = time.perf_counter()
            try:
                started = start(result.image, model, result.output, options, resume=True,
                                overwrite=overwrite, model_source=model_source,
                                plan_device=plan_device)
            except Exception as err:  # noqa: BLE001 - this image fails, the others go on
                fail(result, err)
                continue
            if started.complete:
                result.status = "complete"
                tell(result)
                continue
            result._started = started
            work = Work(started.context, started.work.missing(), on_complete=finish)
            by_work[id(work)] = result
            yield work

    work_list: list[Work] = []

    def recorded() -> Any:
        for work in works():
            work_list.append(work)
            yield work

    try:
        runner.run(recorded(), isolate=True)
    finally:
        for work in work_list:
            result = by_work[id(work)]
            started = result._started
            if work.error is not None and result.status != "failed":
                fail(result, work.error)
                if isinstance(work.error, TilersegError) and started is not None \
                        and discardable(started, runner, None):
                    started.work.remove()
            if started is not None:
                started.release()
    return results

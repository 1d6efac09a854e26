"""Starting, resuming, joining and committing a run on its work directory.

:func:`start` decides what a run does with what it finds at ``OUT.zarr`` and
``OUT.zarr.partial`` (see :mod:`tilerseg.engine.jobs` for the layout):

==========================  ========================  ===================================
found                       plain run                 ``resume`` (or a shard)
==========================  ========================  ===================================
nothing                     start                     start
a finished output           refused (``overwrite``    already complete if the parameters
                            replaces it at commit)    are the same, else refused
an unfinished run           refused (``overwrite``    continued if the parameters are the
                            starts again)             same, else refused naming the first
                                                      parameter that differs
a live lock on it           refused, naming host and pid (shards of one job share it)
==========================  ========================  ===================================

:func:`commit` builds the remaining pyramid levels, marks the output complete, moves it
into place and removes the work directory, exactly once (under ``locks/commit.lock``).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from torch import nn

from ..errors import InvalidArgumentError, OutputError
from ..io.readers import open_image
from ..io.source import ImageSource
from ..io.writers import OutputSpec, OutputWriter, spec_from_dict, spec_to_dict
from ..labels import LabelPolicy
from ..models.checkpoint import source_file, weights_digest
from .background import find_background
from .jobs import (
    TaskGrid,
    WorkDir,
    build_manifest,
    differences,
    input_identity,
    read_final_manifest,
    remove_tree,
    work_path,
)
from .locks import FileLock, LockedError, live_locks
from .options import RunOptions
from .prepare import Prepared, is_lazy_input, prepare
from .tasks import RunContext, open_context

__all__ = ["Started", "start", "commit", "status", "finalize"]

log = logging.getLogger(__name__)


@dataclass
class Started:
    """A run ready to compute, or already complete.

    Attributes
    ----------
    out : Path
        The final output path.
    complete : bool
        The output is already complete with these parameters: nothing to do.
    context : RunContext or None
        The run as this process computes it.
    created : bool
        This run made the work directory (it removes it again if it is refused for
        its input or arguments before finishing).
    locks : list of FileLock
        Held until :meth:`release`.
    """

    out: Path
    complete: bool = False
    context: RunContext | None = None
    created: bool = False
    locks: list[FileLock] = field(default_factory=list)

    @property
    def work(self) -> WorkDir:
        assert self.context is not None
        return self.context.work

    def release(self) -> None:
        """Release the locks."""
        for lock in self.locks:
            lock.release()
        self.locks.clear()

    def __enter__(self) -> Started:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _check_parent(out: Path) -> None:
    parent = out.parent
    if not parent.is_dir():
        raise OutputError(f"output directory '{parent}' does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output directory '{parent}' is not writable")


def _lock(work: WorkDir, out: Path, shard: tuple[int, int] | None) -> list[FileLock]:
    """Take this run's lock on ``work``; refuse if another run (not a sibling shard) holds one."""
    def refuse(holder: Any) -> OutputError:
        return OutputError(f"another tilerseg run is writing '{out}': {holder.describe()}")

    if shard is None:
        lock = FileLock(work.locks / "run.lock", "run")
        others = "shard-*.lock"
    else:
        i, n = shard
        lock = FileLock(work.locks / f"shard-{i}-of-{n}.lock", "shard", {"shard": f"{i}/{n}"})
        others = "run.lock"
    try:
        lock.acquire()
    except LockedError as err:
        raise refuse(err.holder) from None
    except FileNotFoundError:
        raise OutputError(f"the unfinished run in '{work.path}' was removed meanwhile") from None
    live = live_locks(work.locks, others)
    if live:
        lock.release()
        raise refuse(live[0])
    return [lock]


def _source(image: Any, options: RunOptions) -> ImageSource | None:
    """The opened image (None for an in-memory numpy image, taken as it is)."""
    if isinstance(image, ImageSource):
        return image
    if is_lazy_input(image):
        return open_image(image, options.level)
    return None


def _manifest(p: Prepared, out: Path, identity: dict, digest: str, model_source: str | None,
              background: Any, spec: OutputSpec, grid: TaskGrid) -> dict[str, Any]:
    from .. import __version__

    resolved = {
        "tile": list(p.flat_tile), "plan_tile": list(p.plan.tile), "window": list(p.plan.window),
        "normalization": p.normalization.as_dict(), "labels": p.labels.as_dict(),
        "channels": list(p.view.channels), "available_channels": p.view.available,
        "background": background.as_dict() if background is not None else None,
    }
    model = {"digest": digest, "architecture": getattr(p.model, "registry_name", None),
             "config": getattr(p.model, "config", None), "source": model_source,
             "file": source_file(p.model)}
    return build_manifest(
        output=out, version=__version__, identity=identity, model=model,
        geometry=p.model_geometry, per_plane=p.per_plane,
        options=p.options.output_options(), resolved=resolved, spec=spec_to_dict(spec),
        grid=grid)


def _attributes(p: Prepared, model_source: str | None) -> dict[str, Any]:
    """The run parameters stored under ``attrs["tilerseg"]`` of the output."""
    from .. import __version__

    o = p.options
    return {
        "version": __version__,
        "input": {"path": p.source.path, "format": p.source.format, "axes": p.source.axes,
                  "shape": list(p.source.shape), "level": p.source.level,
                  "channels": list(p.view.channels)},
        "model": {"source": model_source, "architecture": getattr(p.model, "registry_name", None),
                  "config": getattr(p.model, "config", None)},
        "geometry": {"halo": list(p.geometry.halo), "step": list(p.geometry.step)},
        "tile": list(p.plan.tile), "window": list(p.plan.window),
        "normalization": p.normalization.as_dict(), "output": o.output,
        "dtype": o.dtype if o.output != "labels" else None,
        "threshold": p.labels.threshold, "precision": o.precision,
    }


def start(image: Any, model: nn.Module, out: Path, options: RunOptions, *,
          resume: bool = False, overwrite: bool = False, shard: tuple[int, int] | None = None,
          model_source: str | None = None) -> Started:
    """Decide what a run does with what it finds (see the module notes) and get it ready.

    Returns
    -------
    Started
        Holding this run's lock, or marked complete (nothing to do).

    Raises
    ------
    OutputError
        The output exists, an unfinished run is in the way, another run holds the lock.
    InvalidArgumentError
        An unfinished (or finished) run to continue was made with other parameters.
    """
    from .. import __version__

    out = Path(os.path.abspath(os.fspath(out)))
    _check_parent(out)
    joining = resume or shard is not None
    source = _source(image, options)
    identity = input_identity(image, source)
    digest = weights_digest(model)

    def diffs(manifest: dict[str, Any]) -> list[str]:
        labels = LabelPolicy.for_model(manifest["geometry"]["out_channels"],
                                       getattr(model, "metadata", None), options.threshold)
        return differences(manifest, options, version=__version__, digest=digest,
                           identity=identity, labels=labels.as_dict())

    wp = work_path(out)
    if os.path.lexists(out):
        final = read_final_manifest(out)
        if joining and final is not None:
            changed = diffs(final)
            if not changed:
                if wp.is_dir():  # left by a crash between the commit's rename and clean-up
                    try:
                        if WorkDir.open(wp).config_hash == final["config_hash"]:
                            WorkDir.open(wp).remove()
                    except OutputError:
                        pass
                return Started(out, complete=True)
            if not overwrite:
                raise OutputError(f"output '{out}' exists with other parameters: {changed[0]}; "
                                  "pass --overwrite to replace it")
        elif not overwrite:
            raise OutputError(f"output '{out}' exists; pass --overwrite to replace it")
    image_arg = source if source is not None else image
    path = source.path if source is not None else None
    if wp.exists():
        try:
            work: WorkDir | None = WorkDir.open(wp)
        except OutputError:
            if not overwrite:
                raise
            work = None
            remove_tree(wp)
        if work is not None:
            locks = _lock(work, out, shard)
            try:
                if joining:
                    changed = diffs(work.manifest)
                    if changed:
                        raise InvalidArgumentError(
                            f"the unfinished run in '{wp}' was made with other parameters: "
                            f"{changed[0]}; pass --overwrite to start again")
                    context = open_context(work, model, image_arg, options, path=path)
                    log.info("resuming %s: %d of %d tasks done", out, len(work.done()),
                             len(work.grid))
                    return Started(out, context=context, locks=locks)
                if not overwrite:
                    raise OutputError(
                        f"an unfinished run of '{out}' is in '{wp}' ({len(work.done())} of "
                        f"{len(work.grid)} tasks done); pass --resume to continue it or "
                        "--overwrite to start again")
                work.remove()  # --overwrite: start again
            except BaseException:
                for lock in locks:
                    lock.release()
                raise
            for lock in locks:
                lock.release()
    p = prepare(image_arg, model, options)
    background = None
    if options.skip_background:
        background = find_background(p.source, p.view, p.normalization, p.plan,
                                     options.background_tolerance, options.background_value)
    grid = TaskGrid.for_grid(p.plan.grid)
    spec = OutputSpec(
        spatial_axes=p.view.spatial, shape=p.plan.image_shape, chunks=p.plan.tile,
        num_classes=p.geometry.out_channels,
        probabilities=options.dtype if options.output in ("probabilities", "both") else None,
        labels=options.output in ("labels", "both"), pixel_size=dict(p.source.pixel_size),
        attributes=_attributes(p, model_source), pyramid=options.pyramid, eager_levels=2,
    )
    manifest = _manifest(p, out, identity, digest, model_source, background, spec, grid)
    work, created = WorkDir.create(
        wp, manifest, lambda staging: OutputWriter(out, spec, overwrite=True, staging=staging))
    locks = _lock(work, out, shard)
    try:
        if not created:  # another process (a sibling shard) made it meanwhile
            changed = diffs(work.manifest)
            if changed or not joining:
                raise OutputError(
                    f"another tilerseg run started '{out}' at the same time"
                    + (f" with other parameters: {changed[0]}" if changed else ""))
        writer = OutputWriter(out, spec, staging=work.store, existing=True)
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    skip = background.skip if background is not None else None
    value = background.value if background is not None else None
    context = RunContext(p, work, writer, skip, value, image=path)
    return Started(out, context=context, created=created, locks=locks)


def commit(work: WorkDir, out: Path, *, overwrite: bool = False,
           attributes: dict[str, Any] | None = None,
           writer: OutputWriter | None = None) -> bool:
    """Finish a run whose tasks are all recorded: pyramid, metadata, move, clean up.

    Exactly once among processes finishing at the same time: under the commit lock,
    and only if the output is still in the work directory.

    Parameters
    ----------
    work : WorkDir
        The run.
    out : Path
        The final output path.
    overwrite : bool
        Replace an existing output at ``out``.
    attributes : dict, optional
        Added to the output's ``tilerseg`` attributes (profile, executor...).
    writer : OutputWriter, optional
        The run's writer, already open on ``work.store`` (else one is opened).

    Returns
    -------
    bool
        True if this call committed, False if another process did.

    Raises
    ------
    OutputError
        Tasks are missing, or the output cannot be finished or moved (the work
        directory is kept: the commit can be retried).
    """
    lock = FileLock(work.locks / "commit.lock", "commit")
    try:
        lock.acquire()
    except (LockedError, FileNotFoundError):
        log.info("%s is being (or was) committed by another process", out)
        return False
    try:
        if not work.store.is_dir():
            return False
        missing = work.missing()
        if missing:
            raise OutputError(f"'{out}' cannot be finished: {len(missing)} of "
                              f"{len(work.grid)} tasks are not done (e.g. task {missing[0]})")
        if writer is None:
            writer = OutputWriter(out, spec_from_dict(work.manifest["spec"]), staging=work.store,
                                  existing=True)
        writer.overwrite = overwrite
        writer.update_attributes(manifest=work.manifest, config_hash=work.config_hash,
                                 committed_by=f"{socket.gethostname()}:{os.getpid()}",
                                 **(attributes or {}))
        writer.commit()
    finally:
        lock.release()
    work.remove()
    return True


def status(out: str | os.PathLike) -> dict[str, Any]:
    """Where a run stands: complete or not, tasks done, parameters, shards, locks.

    Parameters
    ----------
    out : path
        The output (``OUT.zarr``) or its work directory (``OUT.zarr.partial``).

    Returns
    -------
    dict
        ``output``, ``complete`` (bool), ``tasks`` and ``done`` (counts), ``manifest``,
        ``shards`` (records), ``running`` (live lock holders, described) and
        ``work`` (the work directory or None).

    Raises
    ------
    OutputError
        Neither a finished output nor an unfinished run is there.
    """
    out = Path(os.path.abspath(os.fspath(out)))
    if out.name.endswith(".partial"):
        out = out.with_name(out.name[: -len(".partial")])
    wp = work_path(out)
    final = read_final_manifest(out) if out.exists() else None
    if wp.is_dir():
        work = WorkDir.open(wp)
        count = len(work.grid)
        return {"output": str(out), "complete": False, "tasks": count, "done": len(work.done()),
                "manifest": work.manifest, "shards": work.shards(), "work": str(wp),
                "running": [h.describe() for h in live_locks(work.locks)],
                "finished_output_exists": final is not None}
    if final is not None:
        count = int(final["tasks"]["count"])
        return {"output": str(out), "complete": True, "tasks": count, "done": count,
                "manifest": final, "shards": [], "work": None, "running": []}
    if out.exists():
        raise OutputError(f"'{out}' is not a finished tilerseg output and has no unfinished run")
    raise OutputError(f"there is no output '{out}' and no unfinished run '{wp}'")


def finalize(out: str | os.PathLike, *, overwrite: bool = False) -> bool:
    """Commit a run whose tasks are all done (e.g. shards that finished without it).

    Returns
    -------
    bool
        True if this call committed; False if the output was already complete.
    """
    out = Path(os.path.abspath(os.fspath(out)))
    if out.name.endswith(".partial"):
        out = out.with_name(out.name[: -len(".partial")])
    wp = work_path(out)
    if not wp.is_dir():
        if read_final_manifest(out) is not None:
            return False
        raise OutputError(f"there is no unfinished run '{wp}' to finish")
    work = WorkDir.open(wp)
    running = [h for h in live_locks(work.locks) if h.kind != "commit"]
    if running:
        raise OutputError(f"'{out}' is still being computed: {running[0].describe()}")
    if os.path.lexists(out) and not overwrite:
        raise OutputError(f"output '{out}' exists; pass --overwrite to replace it")
    return commit(work, out, overwrite=overwrite, attributes={"executor": "finalize"})

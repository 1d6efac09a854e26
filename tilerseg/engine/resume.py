"""Starting, resuming and joining a run on its work directory.

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

With ``overwrite`` (and not as a shard), a finished output of other parameters is replaced
at the commit, and an unfinished run of other parameters (or, without ``resume``, any) is
started again. :func:`tilerseg.engine.finish.commit` finishes a run.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from torch import nn
from upath import UPath

from ..errors import InvalidArgumentError, OutputError
from ..io import remote
from ..io.readers import open_image
from ..io.source import ImageSource
from ..io.writers import OutputSpec, OutputWriter, check_output_folder, spec_to_dict
from ..labels import LabelPolicy
from ..models.checkpoint import source_file, weights_digest
from .background import find_background
from .jobs import TaskGrid, build_manifest, differences, input_identity, read_final_manifest
from .finish import clear_leftover, leftover
from .instances import check_table_format, create_provisional
from .executors.shard import Shard
from .locks import FileLock
from .options import RunOptions
from .prepare import Prepared, check_model, is_lazy_input, model_normalize, prepare
from .tasks import RunContext, open_context
from .workdir import WorkDir, remove_debris, remove_tree, work_path

__all__ = ["Started", "class_names", "start"]

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
    private : bool
        The work directory is this process's own, in the temporary folder (a remote
        output's): :meth:`discard` removes it, and the remote staging store, when the run
        ends, however it ends; except a finished store whose move into place failed or
        was refused (the writer's ``kept``): that one stays where the error says.
    """

    out: UPath
    complete: bool = False
    context: RunContext | None = None
    created: bool = False
    locks: list[FileLock] = field(default_factory=list)
    private: bool = False

    def discard(self) -> None:
        """Remove a private run's work directory and staging store (if still there and
        not kept)."""
        if self.private and self.context is not None:
            if not self.context.writer.kept:
                remote.remove(self.work.store, ignore_errors=True)
            self.work.remove()

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


def _lock(work: WorkDir, shard: Shard | None) -> list[FileLock]:
    """This process's lock on the run (a shard's names the shard)."""
    if shard is None:
        return [work.join("run")]
    return [work.join("shard", {"shard": shard.label})]


def _busy(work: WorkDir, out: UPath) -> OutputError | None:
    """The refusal to start ``work`` again (or to start another run on ``out``) while a
    live process works on it, naming that process; None when nobody does."""
    running = work.running()
    if not running:
        return None
    return OutputError(f"another tilerseg run is writing '{out}': {running[0].describe()}")


def _differences(manifest: dict[str, Any], model: nn.Module, options: RunOptions,
                 identity: dict[str, Any], digest: str) -> list[str]:
    from .. import __version__

    labels = LabelPolicy.for_model(manifest["geometry"]["out_channels"],
                                   getattr(model, "metadata", None), options.threshold)
    return differences(manifest, options, version=__version__, digest=digest,
                       identity=identity, labels=labels.as_dict(), geometry=check_model(model))


def run_differences(manifest: dict[str, Any], image: Any, model: nn.Module,
                    options: RunOptions) -> list[str]:
    """What would differ between the finished run ``manifest`` records and a run of
    ``model`` on ``image`` with ``options`` now (empty: the same run).

    Parameters
    ----------
    manifest : dict
        A finished run's manifest (e.g. kept in a NIfTI output's header extension).
    image, model, options
        As for :func:`start`.

    Returns
    -------
    list of str
        One line per difference (parameters, input, weights, tilerseg version...).
    """
    options = model_normalize(options, model)
    source = _source(image, options)
    return _differences(manifest, model, options, input_identity(image, source),
                        weights_digest(model))


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
    package = (getattr(p.model, "metadata", None) or {}).get("bioimageio")
    if isinstance(package, dict) and package.get("name"):
        model["package"] = str(package["name"])  # a bioimage.io package's own name
    return build_manifest(
        output=out, version=__version__, identity=identity, model=model,
        geometry=p.model_geometry, per_plane=p.per_plane,
        options=p.options.output_options(), resolved=resolved, spec=spec_to_dict(spec),
        grid=grid)


def class_names(model: nn.Module, count: int) -> tuple[str, ...]:
    """The model's class names (``metadata["classes"]``), one per output channel, or ()
    when it has none or not ``count`` of them (the output's channels are then unnamed)."""
    names = getattr(model, "metadata", None) or {}
    names = names.get("classes") if isinstance(names, dict) else None
    if not isinstance(names, (list, tuple)) or len(names) != count:
        return ()
    return tuple(str(n) for n in names)


def _attributes(p: Prepared, model_source: str | None) -> dict[str, Any]:
    """The run parameters stored under ``attrs["tilerseg"]`` of the output."""
    from .. import __version__

    o = p.options
    return {
        "version": __version__,
        "input": {"path": p.source.path, "format": p.source.format, "axes": p.source.axes,
                  "shape": list(p.source.shape), "level": p.source.level,
                  "channels": list(p.view.channels),
                  "space": p.source.space.to_dict() if p.source.space is not None else None},
        "model": {"source": model_source, "architecture": getattr(p.model, "registry_name", None),
                  "config": getattr(p.model, "config", None)},
        "geometry": {"halo": list(p.geometry.halo), "step": list(p.geometry.step)},
        "tile": list(p.plan.tile), "window": list(p.plan.window),
        "normalization": p.normalization.as_dict(), "output": o.output,
        "dtype": o.dtype if o.output != "labels" else None,
        "threshold": p.labels.threshold, "precision": o.precision,
    }


def start(image: Any, model: nn.Module, out: Path, options: RunOptions, *,
          resume: bool = False, overwrite: bool = False, shard: Shard | None = None,
          model_source: str | None = None, plan_device: str | None = None) -> Started:
    """Decide what a run does with what it finds (see the module notes) and get it ready.

    Parameters
    ----------
    image : path, ImageSource, numpy, Dask or Zarr array
        The input.
    model : torch.nn.Module
        The model.
    out : Path or str
        The final output path, or a URL (see :mod:`tilerseg.io.remote`; the caller
        refuses what a remote output cannot do: see
        :func:`~tilerseg.io.remote.check_remote_run`).
    options : RunOptions
        The run's options.
    resume : bool
        Continue an unfinished run, also while other processes work on it (its tasks are
        claimed, see :mod:`tilerseg.engine.claims`), or find the output complete.
    overwrite : bool
        Replace a finished output of another run; start an unfinished run again (never
        for a shard, and never while a live process works on it).
    shard : Shard, optional
        This process is a shard of a job array: it joins the run as ``resume`` does.
    model_source : str, optional
        Recorded in the metadata.
    plan_device : str, optional
        Where the model will run when that is not this process (a cluster's workers):
        this process then prepares the run on the CPU and takes the default tile of
        ``plan_device``.

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
    options = model_normalize(options, model)  # the model's own normalisation, if it states one
    out = remote.output_location(out)
    private = not remote.is_local(out)  # bookkeeping in a private local folder, no resume
    check_output_folder(out)
    if options.output == "instances":
        check_table_format(options.object_table)
    if not private:
        remove_debris(out)
    joining = resume or shard is not None
    # on a cluster this process only plans (on the CPU); the workers run the model
    local = options if plan_device is None else options.replace(device="cpu")
    source = _source(image, options)
    identity = input_identity(image, source)
    digest = weights_digest(model)
    image_arg = source if source is not None else image
    path = identity.get("path")  # absolute: workers may run elsewhere

    def diffs(manifest: dict[str, Any]) -> list[str]:
        return _differences(manifest, model, options, identity, digest)

    wp = work_path(out) if not private else Path(
        tempfile.gettempdir()) / f"tilerseg-{uuid.uuid4().hex}.partial"
    def complete_now() -> bool:
        """Whether ``out`` is a finished run of the same parameters (then a joining run has
        nothing to do); refuses an existing output it may not replace."""
        if not remote.exists(out):
            return False
        final = read_final_manifest(out)
        if joining and final is not None:
            changed = diffs(final)
            if not changed:
                left = leftover(out, final)  # a crash between the commit's rename and clean-up
                if left is not None:
                    clear_leftover(left, out)
                return True
            if not overwrite:
                raise OutputError(f"output '{out}' exists with other parameters: {changed[0]}; "
                                  "pass --overwrite to replace it")
        elif not overwrite:
            raise OutputError(f"output '{out}' exists; pass --overwrite to replace it")
        return False

    if complete_now():
        return Started(out, complete=True)
    for _ in range(2):  # a second pass when another process created the run meanwhile
        if wp.exists():
            try:
                joined = _join(wp, out, shard, joining, overwrite, diffs)
            except OutputError:
                if joining and not wp.exists() and complete_now():  # committed meanwhile
                    return Started(out, complete=True)
                raise
            if joined is not None:
                work, locks = joined
                try:
                    context = open_context(work, model, image_arg, local, path=path)
                    context.p = dataclasses.replace(context.p, options=options)
                except OutputError:
                    for lock in locks:
                        lock.release()
                    if joining and not wp.exists() and complete_now():  # committed meanwhile
                        return Started(out, complete=True)
                    raise
                except BaseException:
                    for lock in locks:
                        lock.release()
                    raise
                log.info("resuming %s: %d of %d tasks done", out, len(work.done()),
                         len(work.grid))
                return Started(out, context=context, locks=locks)
        p = prepare(image_arg, model, local, tile_device=plan_device)
        background = None
        if options.skip_background:
            background = find_background(p.source, p.view, p.normalization, p.plan,
                                         options.background_tolerance, options.background_value)
        spec = OutputSpec(
            spatial_axes=p.view.spatial, shape=p.plan.image_shape, chunks=p.plan.tile,
            num_classes=p.geometry.out_channels,
            probabilities=(options.dtype if options.output in ("probabilities", "both", "instances")
                           else None),
            labels=options.output in ("labels", "both"), pixel_size=dict(p.source.pixel_size),
            attributes=_attributes(p, model_source), pyramid=options.pyramid, eager_levels=2,
            instances=options.output == "instances",
            class_names=class_names(model, p.geometry.out_channels),
        )
        grid = TaskGrid.for_grid(p.plan.grid)
        manifest = _manifest(p, out, identity, digest, model_source, background, spec, grid)
        if private:  # the store is written beside the remote output, moved at the commit
            manifest["store"] = str(out.with_name(remote.staging_name(out)))

        def make_store(staging: Path) -> None:
            OutputWriter(out, spec, overwrite=True, staging=manifest.get("store") or staging)
            if spec.instances:
                create_provisional(staging.parent, spec, options.instances)

        if joining and complete_now():  # committed (and cleaned up) while this one prepared
            return Started(out, complete=True)
        work, created = WorkDir.create(wp, manifest, make_store)
        if not created:
            continue  # join (or refuse) the run another process created, as recorded
        locks = _lock(work, shard)
        try:
            writer = OutputWriter(out, spec, staging=work.store, existing=True)
        except BaseException:
            for lock in locks:
                lock.release()
            if private:  # nobody can resume it: leave nothing behind
                remote.remove(work.store, ignore_errors=True)
                work.remove()
            raise
        skip = background.skip if background is not None else None
        value = background.value if background is not None else None
        context = RunContext(dataclasses.replace(p, options=options), work, writer, skip, value,
                             image=path)
        return Started(out, context=context, created=True, locks=locks, private=private)
    raise OutputError(f"the unfinished run in '{wp}' keeps changing; is another run "
                      "starting and removing it?")


def _join(wp: Path, out: Path, shard: Shard | None, joining: bool, overwrite: bool,
          diffs: Any) -> tuple[WorkDir, list[FileLock]] | None:
    """Lock the unfinished run in ``wp`` to continue it (with whoever else works on it), or
    clear it for a fresh start (None), or refuse; see the table in the module notes."""
    try:
        work = WorkDir.open(wp)
    except OutputError:
        if not overwrite or shard is not None:
            raise
        remove_tree(wp)
        return None
    changed = diffs(work.manifest)
    if joining and not changed:
        return work, _lock(work, shard)
    if shard is not None:
        raise InvalidArgumentError(
            f"the unfinished run in '{wp}' was made with other parameters: {changed[0]}; "
            "every shard of a run must be given the same options")
    busy = _busy(work, out)
    if busy is not None:
        raise busy
    if not overwrite:
        if joining:
            raise InvalidArgumentError(
                f"the unfinished run in '{wp}' was made with other parameters: "
                f"{changed[0]}; pass --overwrite to start again")
        raise OutputError(
            f"an unfinished run of '{out}' is in '{wp}' ({len(work.done())} of "
            f"{len(work.grid)} tasks done); pass --resume to continue it or --overwrite "
            "to start again")
    work.remove()  # --overwrite: start again
    return None

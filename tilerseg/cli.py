"""The ``tilerseg`` command line: parse, configure logging and progress, call the API.

A user's mistake (a :class:`~tilerseg.errors.TilersegError`) becomes one line on stderr
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from . import __version__
from .errors import InvalidArgumentError, TilersegError

__all__ = ["main", "build_parser"]

EPILOG = """\
examples:
  tilerseg demo                          write a synthetic 4096 x 4096 slide and segment it
  tilerseg train --images img/ --masks lbl/ --validation 20-24 -o run/
  tilerseg eval img/ lbl/ --model run/best.pt --json scores.json
  tilerseg models                        bundled models and architectures
  tilerseg run slide.tif                 -> slide.tilerseg.zarr (probabilities, uint8)
  tilerseg run slide.ome.tif --level 1 --output both -o out.zarr --overwrite
  tilerseg run sections/ --model em.pt    a folder of 2D slices, segmented plane by plane
  tilerseg run stack.tif --model model3d.pt --tile 64
  tilerseg info slide.svs --tile 1024    shape, axes, levels, pixel size, plan, memory
  tilerseg info slide.svs --plot plan.png              the tile plan drawn over the slide
  tilerseg preview slide.tilerseg.zarr -o preview.png  the result over the input, as a PNG
  tilerseg run slide.tif --resume        continue a killed run (or start; exit if complete)
  tilerseg run slide.tif --cluster local:4              4 worker processes on this machine
  tilerseg run slide.tif -o out.zarr --shard auto       one job of a SLURM job array
  tilerseg run slide.tif --cluster slurm --jobs 8 --cores 8 --memory 32GB --gpus-per-job 1
  tilerseg status slide.tilerseg.zarr    complete? missing tasks, claims, workers
  tilerseg batch slides/ -o results/     every image of a folder, one model load
  tilerseg export em.pt -o em.zip --format bioimageio   a bioimage.io package
  tilerseg run slide.tif --model em.zip  run a bioimage.io package (.zip, rdf.yaml, folder)
"""


class ProgressBar:
    """A ``progress(done, total)`` callback drawing one updating line (tiles, tiles/s, ETA)."""

    def __init__(self, stream: TextIO, enabled: bool, unit: str = "tiles") -> None:
        self.stream, self.enabled, self.start = stream, enabled, time.perf_counter()
        self.unit = unit

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else 0.0
        filled = 30 * done // max(total, 1)
        self.stream.write(f"\r[{'#' * filled}{'-' * (30 - filled)}] {done}/{total} {self.unit}  "
                          f"{rate:.2f} {self.unit}/s  ETA {eta:.0f} s ")
        if done == total:
            self.stream.write("\n")
        self.stream.flush()


def _channels(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise InvalidArgumentError(f"--channel {text!r} must be comma-separated integers") from None


def _cmd_models(args: argparse.Namespace) -> int:
    from .models import create_model, list_models, load_model, model_geometry
    from .models.checkpoint import DEFAULT_MODEL, bundled_models

    print("bundled models (tilerseg run --model NAME; * = default):")
    for name, path in bundled_models().items():
        model = load_model(path)
        g, meta = model_geometry(model), model.metadata
        scores = meta.get("validation", {})
        figures = ", ".join(f"{k} {v:.4g}" for k, v in scores.items())
        print(f"{'*' if name == DEFAULT_MODEL else ' '} {name:<20} {model.config} halo {g.halo[0]}, "
              f"step {g.step[0]}, threshold {meta.get('threshold')}; {figures}")
    if not bundled_models():
        print("  (none installed)")
    print("registered architectures (untrained; tilerseg.create_model(NAME), tilerseg train "
          "--arch NAME), geometry per axis at their defaults:")
    for name in list_models():
        model = create_model(name, base_channels=1)  # the geometry does not depend on width
        g, config = model_geometry(model), model.config
        shape = ", ".join(f"{k} {config[k]}" for k in ("depth", "padding", "pool")
                          if k in config)
        admissible = " x ".join(str(g.admissible_inputs(3, a)) for a in range(g.ndim))
        print(f"  {name:<11} {g.ndim}D ({shape or 'padding same'}): halo {list(g.halo)}, "
              f"step {list(g.step)}, admissible inputs {admissible} ...")
    return 0


def _tile(args: argparse.Namespace) -> int | list[int] | None:
    """``--tile``: one output side, or one per axis (Z,Y,X for a 3D model)."""
    return _sides(args.tile, "--tile", "1024 or 64,128,128")


def _output_defaults(path: str | None) -> tuple[str, str]:
    """``run``'s ``--output`` and ``--dtype`` when not given: for a NIfTI output labels
    (what MONAI and nnU-Net users keep) and, if probabilities are asked for, float32 (its
    probabilities file is float32: not rounded to 1/255 on the way); else probabilities
    as uint8."""
    from .io.nifti import is_nifti_path

    return ("labels", "float32") if path and is_nifti_path(path) else ("probabilities", "uint8")


def _run_options(args: argparse.Namespace) -> Any:
    """The RunOptions of ``tilerseg run`` / ``batch`` flags."""
    from .engine.options import run_options

    normalize: Any = args.normalize or "auto"
    if args.window is not None:
        from .normalize import parse_window

        if args.normalize is not None:
            raise InvalidArgumentError("--window and --normalize are two normalisations; "
                                       "give one")
        normalize = parse_window(args.window)
    defaults = _output_defaults(getattr(args, "output_path", None))  # batch has none
    return run_options(
        normalize=normalize,
        tile=_tile(args), batch_size=args.batch_size, device=args.device,
        output=args.output or defaults[0],
        dtype=args.dtype or defaults[1],
        threshold=args.threshold, level=args.level,
        channel=_channels(args.channel), precision=args.precision,
        calibration=args.calibration, compile=args.compile, backend=args.backend,
        skip_background=args.skip_background, background_tolerance=args.background_tolerance,
        background_value=args.background_value, pyramid=not args.no_pyramid,
        instances=args.instances, split_radius=args.split_radius,
        split_context=args.split_context, object_table=args.object_table,
        workers=args.workers, threads=args.threads, tta=args.tta)


def _cluster(args: argparse.Namespace) -> Any:
    """The cluster the flags ask for (None: this process)."""
    from .engine.executors.cluster import JobSpec, parse_cluster

    job = JobSpec(jobs=args.jobs, cores=args.cores, memory=args.memory, walltime=args.walltime,
                  gpus=args.gpus_per_job, queue=args.queue, account=args.account,
                  replacements=args.max_replacements)
    spec = parse_cluster(args.cluster, args.scheduler, job, worker_timeout=args.worker_timeout)
    if spec is not None and args.shard is not None:
        raise InvalidArgumentError("give --shard or a cluster (--cluster/--scheduler), not both")
    if args.job_script and (spec is None or spec.kind in ("local", "scheduler")):
        raise InvalidArgumentError("--job-script needs --cluster slurm, pbs or lsf")
    return spec


def _submits_jobs(spec: Any) -> bool:
    """Whether the cluster asked for submits batch jobs (SLURM, PBS, LSF)."""
    return spec is not None and spec.kind not in ("local", "scheduler")


def _model_before_jobs(args: argparse.Namespace, spec: Any) -> Any:
    """The model, loaded before a batch cluster submits its jobs (none are submitted for a
    model that does not load); None otherwise, to be loaded (and torch imported) while
    the other clusters start."""
    if not _submits_jobs(spec):
        return None
    from .models.checkpoint import model_from_spec

    return model_from_spec(args.model, halo=args.halo)


@contextlib.contextmanager
def _executor(spec: Any) -> Iterator[Callable[[], Any]]:
    """``executor()``: the executor on the asked-for cluster (None for this process's
    threads). The cluster starts in the background as the block begins (the caller loads
    its model meanwhile), ``executor()`` waits for it, and it is closed as the block ends."""
    if spec is None:
        yield lambda: None
        return
    from concurrent.futures import ThreadPoolExecutor

    from .engine.executors.cluster import connect, import_jobqueue

    if _submits_jobs(spec):
        import_jobqueue(spec.kind)  # here, in the main thread (it touches SIGINT)
    stack = contextlib.ExitStack()
    with ThreadPoolExecutor(1, thread_name_prefix="tilerseg-cluster-start") as pool:
        started = pool.submit(stack.enter_context, connect(spec))

        def executor() -> Any:
            from .engine.executors.dask import DaskExecutor

            return DaskExecutor(started.result(), worker_timeout=spec.worker_timeout,
                                replacements=spec.job.replacements)

        try:
            yield executor
        finally:
            try:
                started.result()  # a cluster still starting is closed once it has started
            except BaseException:  # noqa: BLE001 - its error was raised by executor()
                pass
            stack.close()


def _finished(path: Path) -> dict | None:
    """The ``tilerseg`` attributes of a complete output (None if it is not one)."""
    import zarr

    from .engine.jobs import read_final_manifest
    from .io.remote import exists

    if not exists(path) or read_final_manifest(path) is None:
        return None
    return dict(zarr.open_group(str(path), mode="r").attrs["tilerseg"])


def _quick_complete(out: Path, args: argparse.Namespace, options: Any) -> bool:
    """Whether ``out`` is already complete with these parameters, known without torch."""
    from .engine.jobs import quick_complete
    from .models.catalog import model_file

    if getattr(args, "halo", None) is not None:  # a package's geometry: known once loaded
        return False
    path = model_file(args.model)
    return path is not None and quick_complete(out, args.image, path, options, __version__)


def _cmd_run(args: argparse.Namespace) -> int:
    from .engine.jobs import default_output_path

    spec = _cluster(args)
    if args.job_script:  # needs no model
        from .engine.executors.cluster import job_script

        print(job_script(spec))
        return 0
    options = _run_options(args)
    from .io.remote import check_remote_run, is_local, output_location

    from .io.nifti import is_nifti_path

    out = output_location(args.output_path or default_output_path(args.image))
    nifti = is_nifti_path(str(out))
    if nifti and args.profile and not args.keep_zarr:
        from .errors import InvalidArgumentError

        raise InvalidArgumentError("--profile with a NIfTI output needs --keep-zarr (the "
                                   "profile is recorded in the OME-Zarr store)")
    if not is_local(out):  # before a cluster starts or a model loads
        check_remote_run(out, resume=args.resume, shard=args.shard, in_process=spec is None)
    if (args.resume or args.shard) and not nifti and _quick_complete(out, args, options):
        if not args.quiet:
            print(f"{out} is already complete")
        return 0
    from .io import open_image

    image = open_image(args.image, level=args.level)  # input errors come first
    model = _model_before_jobs(args, spec)
    start = time.perf_counter()
    try:
        with _executor(spec) as executor:  # other clusters start while torch is imported
            from .engine.finish import status
            from .engine.instances import table_path
            from .engine.to_zarr import segment_to_zarr
            from .models.checkpoint import model_from_spec

            if model is None:
                model = model_from_spec(args.model, halo=args.halo)
            before = _finished(out) if not nifti else _mtime(out)
            bar = ProgressBar(sys.stderr, sys.stderr.isatty() and not args.quiet)
            path = segment_to_zarr(image, model, out, options, resume=args.resume,
                                   overwrite=args.overwrite, executor=executor(),
                                   shard=args.shard, progress=bar, model_source=args.model,
                                   keep_zarr=args.keep_zarr)
    except KeyboardInterrupt as stop:
        from .engine.to_zarr import nifti_store_path
        from .engine.workdir import work_path

        kept = work_path(nifti_store_path(out) if nifti else out)
        note = f"; the unfinished run is kept in {kept} (--resume continues it)" \
            if kept.is_dir() else ""
        print(f"tilerseg: {_stopped(stop)}{note}", file=sys.stderr)
        return _stop_status(stop)
    seconds = time.perf_counter() - start
    if nifti:
        return _nifti_done(args, path, before, seconds, options)
    after = _finished(path)
    if before is not None and after is not None and \
            after["manifest"]["run_id"] == before["manifest"]["run_id"]:
        if not args.quiet:
            print(f"{path} is already complete")
        return 0
    if after is None or after.get("committed_by") != f"{socket.gethostname()}:{os.getpid()}":
        state = status(path)  # another process commits (or committed) the run
        if not args.quiet:
            who = f"shard {_shard_name(args.shard)}" if args.shard else str(path)
            print(f"{who}: done in {seconds:.1f} s; {state['done']} of {state['tasks']} tasks "
                  f"of {path} are done"
                  + (" (committed by another process)" if state["complete"] else
                     " (another process working on it commits it; 'tilerseg finalize' "
                     "does it by hand)"))
        return 0
    if not args.quiet:
        print(f"wrote {path} in {seconds:.1f} s")
        instances = after.get("instances")
        if instances:
            print(f"{instances['objects']} objects ({instances['mode']}) in "
                  f"{path}/labels/instances"
                  + (f", {instances['kept_whole']} kept whole (larger than --split-context)"
                     if instances.get("kept_whole") else "")
                  + (f"; table {table_path(path, options.object_table)}"
                     if options.object_table else ""))
    if args.profile:
        print(_profile_report(path, seconds))
    return 0


def _mtime(path: Any) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _nifti_done(args: argparse.Namespace, path: Path, before: int | None, seconds: float,
                options: Any) -> int:
    """The summary of a run with NIfTI output."""
    from .engine.to_zarr import nifti_store_path
    from .io.nifti import probabilities_path

    if before is not None and _mtime(path) == before:
        if not args.quiet:
            print(f"{path} is already complete")
        return 0
    if not args.quiet:
        extra = f" and {probabilities_path(path)}" \
            if options.output in ("probabilities", "both") else ""
        print(f"wrote {path}{extra} in {seconds:.1f} s")
    if args.profile:
        print(_profile_report(nifti_store_path(path), seconds))
    return 0


def _cmd_batch(args: argparse.Namespace) -> int:
    spec = _cluster(args)
    if args.job_script:
        from .engine.executors.cluster import job_script

        print(job_script(spec))
        return 0
    options = _run_options(args)
    model = _model_before_jobs(args, spec)
    start = time.perf_counter()
    with _executor(spec) as executor:  # other clusters start while torch is imported
        from .engine.batch import segment_batch
        from .models.checkpoint import model_from_spec

        if model is None:
            model = model_from_spec(args.model, halo=args.halo)
        bar = ProgressBar(sys.stderr, sys.stderr.isatty() and not args.quiet, unit="images")
        results = segment_batch(args.inputs, model, args.output_dir, options,
                                overwrite=args.overwrite, executor=executor(),
                                shard=args.shard, progress=bar, model_source=args.model)
    seconds = time.perf_counter() - start
    print(_batch_table(results, seconds))
    return 1 if any(r.status in ("failed", "pending") for r in results) else 0


def _batch_table(results: Sequence[Any], seconds: float) -> str:
    """The summary of a batch: one row per image, then the counts."""
    rows = [("image", "status", "tiles", "seconds", "output / error")]
    for r in results:
        rows.append((os.path.basename(r.image), r.status, str(r.tiles), f"{r.seconds:.2f}",
                     r.error if r.error else str(r.output)))
    widths = [max(len(row[k]) for row in rows) for k in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4]
             for row in rows]
    counts = {s: sum(r.status == s for r in results) for s in ("done", "complete", "failed")}
    lines.append(f"{len(results)} images in {seconds:.1f} s: {counts['done']} written, "
                 f"{counts['complete']} already complete, {counts['failed']} failed")
    return "\n".join(lines)


def _cmd_status(args: argparse.Namespace) -> int:
    from .engine.finish import status

    state = status(args.output)
    if args.json:
        print(json.dumps(state, indent=1, default=str))
        return 0
    print(_status_report(state))
    return 0


def _model_name(model: dict) -> str:
    """What a manifest's model is: its architecture, else its bioimage.io package."""
    if model.get("architecture"):
        return str(model["architecture"])
    if model.get("package"):
        return f"bioimage.io package {model['package']!r}"
    return "a network of no tilerseg architecture"


def _status_report(state: dict) -> str:
    m = state["manifest"]
    o, r = m["options"], m["resolved"]
    done, tasks = state["done"], state["tasks"]
    if state["complete"]:
        where = "complete"
    else:
        where = (f"unfinished: {done} of {tasks} tasks done ({100 * done / max(tasks, 1):.0f}%), "
                 f"in {state['work']}")
    source = m["input"].get("path") or f"an in-memory {m['input']['format']}"
    model = m["model"]
    lines = [
        f"output      {state['output']}",
        f"state       {where}",
        f"input       {source} ({m['input']['format']}, shape {tuple(m['input']['shape'])}, "
        f"{m['input']['dtype']}), level {o['level']}, channels {r['channels']}",
        f"model       {_model_name(model)} {model['digest'][:12]}"
        + (f" ({model['source']})" if model.get("source") else ""),
        f"parameters  tile {r['tile']}, output {o['output']} ({o['dtype']}), threshold "
        f"{r['labels']['threshold']}, precision {o['precision']}, pyramid "
        f"{'yes' if o['pyramid'] else 'no'}, normalisation {r['normalization']['method']}"
        f"{', background skipped' if o['skip_background'] else ''}"
        f"{', tta ' + o['tta'] if o.get('tta') else ''}",
        f"created     {m['created']} by tilerseg {m['tilerseg']}",
    ]
    if not state["complete"]:
        missing = state.get("missing", [])
        if missing:
            shown = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in missing[:12])
            more = f" (and {len(missing) - 12} more ranges)" if len(missing) > 12 else ""
            lines.append(f"missing     tasks {shown}{more}")
        for claim in state.get("claims", []):
            age = f"heartbeat {claim['heartbeat_s']:.0f} s ago"
            lines.append(f"claimed     task {claim['task']} by {claim['holder']}; {age}"
                         + (" (stale: another process will take it over)"
                            if claim["stale"] else ""))
    for holder in state.get("running", []):
        lines.append(f"running     {holder}")
    for worker in state.get("workers", []):
        what = f"shard {worker['shard']}" if worker.get("shard") else worker.get("worker")
        seconds = worker.get("end", 0) - worker.get("start", 0)
        lines.append(f"worked      {what} on {worker.get('host')}"
                     + (f" (SLURM job {worker['job']})" if worker.get("job") else "")
                     + f": {len(worker.get('tasks', []))} tasks, {worker.get('tiles', 0)} tiles"
                     + (f" in {seconds:.1f} s" if seconds > 0 else "")
                     + ("" if worker.get("times") else " (stopped)"))
    return "\n".join(lines)


def _cmd_finalize(args: argparse.Namespace) -> int:
    from .engine.finish import finalize

    if finalize(args.output, overwrite=args.overwrite):
        print(f"finished {args.output}")
    else:
        print(f"{args.output} is already complete")
    return 0


def _shard_name(text: str | None) -> str:
    """How a ``--shard`` value names the shard."""
    from .engine.executors.shard import parse_shard

    shard = parse_shard(text)
    return shard.label if shard else "-"


def _profile_report(path: Path, seconds: float) -> str:
    """Where the time of a finished run went, from its metadata (the stages summed over
    every process that computed tiles: this one, shards, a cluster's workers)."""
    import zarr

    attrs = zarr.open_group(str(path), mode="r").attrs["tilerseg"]
    t = attrs["profile"]
    tail = seconds - t["setup"] - t["wall"]
    used = attrs.get("runtime")
    runtime = f" ({used['engine']}, {used['precision']})" if used else ""
    processes = t.get("processes", 1)
    where = f" in {processes} processes" if processes > 1 else ""
    lines = [
        f"profile ({t['tiles']} tiles, {t['compute_workers']} model worker(s){where}, "
        f"{attrs.get('executor', 'pipeline')} executor):",
        f"  set-up (open, geometry, runtime)  {t['setup']:8.2f} s",
        f"  tiles (read -> model -> write)    {t['wall']:8.2f} s",
        f"    reading + normalising           {t['read']:8.2f} s busy",
        f"    model{runtime:<27}{t['compute']:8.2f} s busy "
        f"({100 * t['model_share']:.0f}% of the tiles' wall time x workers)",
        f"    writing (encode + compress)     {t['write']:8.2f} s busy",
        f"    model waited for input          {t['starved']:8.2f} s",
        f"    model waited for the writers    {t['blocked']:8.2f} s",
        f"  pyramid levels and metadata       {tail:8.2f} s",
        f"  total                             {seconds:8.2f} s",
    ]
    if processes > 1:
        for w in t.get("workers", []):
            engine = (w.get("runtime") or {}).get("engine", "?")
            wall = f"{w['wall']:.2f} s" if w.get("wall") is not None else "?"
            model = f", model {w['compute']:.2f} s busy" if w.get("compute") is not None else ""
            lines.append(f"  {w.get('worker')}: {w['tasks']} tasks, {w['tiles']} tiles in "
                         f"{wall}{model} ({engine})")
    background = attrs.get("background")
    if background:
        lines.append(f"  background: {background['skipped_chunks']} of {background['chunks']} "
                     f"tiles skipped ({background['method']})")
    return "\n".join(lines)


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import describe, describe_machine
    from .models.checkpoint import model_from_spec

    if args.plot:  # before the model loads: a missing extra or a bad path fails at once
        from .pictures.plan import check_plot_path

        check_plot_path(args.plot, args.image, args.plot_size)
    if args.image is None:
        print(describe_machine())
        return 0
    model = model_from_spec(args.model, halo=args.halo)
    print(describe(args.image, model, tile=_tile(args), level=args.level,
                   channel=_channels(args.channel), device=args.device))
    if args.plot:
        from .pictures.plan import save_plan

        path = save_plan(args.plot, args.image, model, tile=_tile(args), level=args.level,
                         channel=_channels(args.channel), device=args.device,
                         size=args.plot_size)
        print(f"picture     {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from . import create_model, load_model, segment
    from .engine.to_zarr import segment_to_zarr
    from .io.writers import open_output
    from .models.checkpoint import DEFAULT_MODEL, bundled_models, model_from_spec
    from .synthetic import write_membrane_tiff

    folder = Path(args.directory)
    folder.mkdir(parents=True, exist_ok=True)
    slide = folder / "demo-slide.tif"
    start = time.perf_counter()
    write_membrane_tiff(str(slide), (args.size, args.size), seed=args.seed)
    print(f"wrote synthetic slide {slide} ({args.size} x {args.size} uint8, tiled BigTIFF) "
          f"in {time.perf_counter() - start:.1f} s")
    if args.model is None and DEFAULT_MODEL in bundled_models():
        model, described = load_model(), f"the bundled model {DEFAULT_MODEL!r}"
    elif args.model is not None:
        model, described = model_from_spec(args.model), args.model
    else:
        torch.manual_seed(args.seed)
        model = create_model("unet", base_channels=args.base_channels)
        described = "an untrained U-Net (the pipeline, not a trained model)"
    bar = ProgressBar(sys.stderr, sys.stderr.isatty() and not args.quiet)
    start = time.perf_counter()
    out = segment_to_zarr(slide, model, folder / "demo-slide.tilerseg.zarr", tile=args.tile,
                          device=args.device, output="both", overwrite=True, progress=bar,
                          dtype="float32" if args.check else "uint8", model_source=described)
    seconds = time.perf_counter() - start
    print(f"segmented it into {out} in {seconds:.1f} s ({args.size**2 / seconds / 1e6:.2f} Mpx/s) "
          f"with {described}")
    if args.check:
        import tifffile

        written = np.asarray(open_output(out)["probabilities"][:])
        image = tifffile.imread(slide)
        other = 256 if (args.tile or 512) != 256 else 512
        in_memory = segment(image, model, tile=other, device=args.device)
        deviation = float(np.abs(written - in_memory).max())
        print(f"max |OME-Zarr output - in-memory run with {other}-px tiles| = {deviation:.2e} "
              "(contract: <= 1e-4)")
        if deviation > 1e-4:
            return 1
    return 0


def _indices(text: str | None, what: str) -> list[int] | None:
    """``"20-24"`` or ``"0,3,5-7"`` -> a list of indices."""
    if text is None:
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise InvalidArgumentError(f"{what} {text!r} must look like 20-24 or 0,3,5-7") from None
    return out


_TRAIN_DEFAULTS = {"unet": {"base_channels": 16}, "unet3d": {"base_channels": 16}}
"""``tilerseg train`` defaults that differ from the architecture's own (the paper's 64
channels are slow to train on a CPU)."""


def _sides(text: str | None, option: str, example: str) -> int | list[int] | None:
    """A size option (``--tile``, train's ``--window``): one side, or one per axis (Z,Y,X)."""
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2, 3) or min(values, default=0) < 1:
        raise InvalidArgumentError(
            f"{option} {text!r} must be one positive side or one per axis, e.g. {example}")
    return values[0] if len(values) == 1 else values


def _train_model(args: argparse.Namespace) -> dict:
    """The model arguments of ``tilerseg train``: the preset's, then what was given."""
    from .models.registry import anisotropic_pool

    given = {"depth": args.depth, "base_channels": args.base_channels, "dropout": args.dropout,
             "batch_norm": args.batch_norm, "padding": args.padding}
    model = {"name": args.arch, **_TRAIN_DEFAULTS.get(args.arch, {}),
             **{k: v for k, v in given.items() if v is not None}}
    if args.ndim == 3 and args.arch != "unet3d":
        model["ndim"] = 3
    if args.pool == "anisotropic":
        if args.arch != "unet3d" and args.ndim != 3:
            raise InvalidArgumentError("--pool anisotropic is for 3D models (--arch unet3d, "
                                       "or --ndim 3)")
        model["pool"] = anisotropic_pool(model.get("depth", 3 if args.arch == "unet3d" else 4))
    return model


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, load_pairs, train

    model = _train_model(args)
    window = _sides(args.window, "--window", "380 or 48,152,152")  # before any data is read
    if args.arch == "unet3d" and args.ndim == 2:
        raise InvalidArgumentError("--arch unet3d is the 3D U-Net; --ndim 2 asks for a 2D "
                                   "model (--arch unet)")
    ndim = 3 if args.arch == "unet3d" or args.ndim == 3 else 2
    # 3D: class maps may hold any classes; the model gets the data's channels and classes
    classes = args.classes or (2 if ndim == 2 else 256)
    held_out = _indices(args.validation, "--validation") or []
    everything = load_pairs(args.images, args.masks, classes, select=None, min_size=1,
                            ndim=ndim)
    train_idx = [k for k in range(len(everything)) if k not in held_out]
    if any(not 0 <= k < len(everything) for k in held_out) or not train_idx:
        raise InvalidArgumentError(
            f"--validation {args.validation} must name some, not all, of the "
            f"{len(everything)} pairs (0..{len(everything) - 1})")
    val_pairs = [everything[k] for k in held_out]
    if args.val_images or args.val_masks:
        if not (args.val_images and args.val_masks):
            raise InvalidArgumentError("--val-images and --val-masks go together")
        val_pairs += load_pairs(args.val_images, args.val_masks, classes, ndim=ndim)
    train_pairs = [everything[k] for k in train_idx]
    if ndim == 3:
        model.setdefault("in_channels", train_pairs[0].image.shape[0])
        model.setdefault("num_classes", args.classes or max(
            2, 1 + max(int(p.mask.max()) for p in [*train_pairs, *val_pairs])))
    config = TrainConfig(
        model=model,
        epochs=args.epochs, steps_per_epoch=args.steps, batch_size=args.batch_size,
        window=window, optimizer=args.optimizer, lr=args.lr,
        weight_map=not args.no_weight_map, elastic=not args.no_elastic,
        flips=not args.no_flips, grey=not args.no_grey, seed=args.seed,
        precision=args.precision, compile=args.compile, loss=args.loss,
        foreground=args.foreground, normalize=args.normalize, elastic_p=args.elastic_p,
        init=args.init,
    )

    def progress(epoch: int, step: int, steps: int, loss: float) -> None:
        if sys.stderr.isatty() and not args.quiet:
            sys.stderr.write(f"\repoch {epoch}/{args.epochs}  step {step}/{steps}  "
                             f"loss {loss:.4f} ")
            if step == steps:
                sys.stderr.write("\n")
            sys.stderr.flush()

    result = train(train_pairs, args.out, config, val_pairs=val_pairs, resume=args.resume,
                   progress=progress)
    for record in result["history"][-1:]:
        print("last epoch: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in record.items()))
    print(f"best model: {Path(args.out) / 'best.pt'}")
    return 0


def add_tta_flag(p: argparse.ArgumentParser) -> None:
    """``--tta [dihedral|flips]`` (see :mod:`tilerseg.engine.tta`)."""
    p.add_argument("--tta", nargs="?", const="dihedral", default=None,
                   choices=("dihedral", "flips"),
                   help="exact test-time augmentation: every window in the 8 flips and "
                   "quarter turns of the plane (--tta; 8 flips in 3D), or the 4 flips "
                   "(--tta flips), probabilities averaged; 8x (4x) the model's work")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="NAME|PATH",
                   help="model file (.pt), bioimage.io package (.zip, rdf.yaml or its folder), "
                   "bundled model or architecture name (default: the bundled ISBI 2012 EM "
                   "model)")
    p.add_argument("--tile", default=None, metavar="N|Z,Y,X",
                   help="output tile side in px (voxels in 3D), or one per axis, each a "
                   "multiple of its axis's pooling step (default: 2D 512 on the CPU with "
                   "torch, 1024 with OpenVINO and on GPUs; 3D on the CPU 64,256,256, 64,128,128 or 64 "
                   "by the model's width (a memory budget), 128 on GPUs)")
    p.add_argument("--level", type=int, default=0, metavar="N", help="input pyramid level (default 0)")
    p.add_argument("--channel", default=None, metavar="C[,C...]", help="input channels to use, e.g. 0 or 0,2")
    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help="auto, cpu, cuda (all visible GPUs), cuda:N, cuda:0,cuda:1 or mps")


def _add_halo(p: argparse.ArgumentParser) -> None:
    """``--halo`` (run, batch and info: the commands that tile a model)."""
    p.add_argument("--halo", default=None, metavar="N[,N...]",
                   help="context in px per side for a bioimage.io package that declares no "
                   "halo (one value, or one per spatial axis)")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """The options of a run (shared by run and batch)."""
    p.add_argument("--batch-size", type=int, default=None, metavar="N", help="tiles per forward pass")
    _add_halo(p)
    p.add_argument("--output", choices=("probabilities", "labels", "both", "instances"),
                   default=None, help="what to write: instances = the "
                   "probabilities and an instance label image, labels/instances "
                   "(default: probabilities; labels for a NIfTI output, -o OUT.nii.gz)")
    p.add_argument("--dtype", choices=("uint8", "float16", "float32"), default=None,
                   help="probability storage type; uint8 = round(255 p) (default; float32 "
                   "for a NIfTI output, whose probabilities file is float32)")
    p.add_argument("--threshold", type=float, default=None, metavar="P",
                   help="foreground probability threshold for labels (default: the "
                   "model's tuned threshold, else argmax / 0.5)")
    p.add_argument("--normalize", default=None, metavar="METHOD",
                   help="intensity normalisation: auto (default: the model's own where it "
                   "states one, else by dtype), none, range, percentile, percentile:LOW:HIGH, "
                   "meanstd, or zscore (per channel over the voxels nonzero in any channel, "
                   "nnU-Net's statistics for MRI); see also --window")
    p.add_argument("--window", default=None, metavar="dicom|NAME|C,W",
                   help="display-window normalisation: [C - W/2, C + W/2] maps to [0, 1], "
                   "values outside are clipped. dicom = the file's WindowCenter/WindowWidth; "
                   "NAME = a CT preset in Hounsfield units (lung, mediastinum, soft-tissue, "
                   "bone, brain, liver); C,W = centre and width, e.g. 40,400 (default: the "
                   "model's own normalisation where it states one, else by dtype: 8-bit by "
                   "range, wider integers by percentiles, floats unchanged)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16", "int8"), default="fp32",
                   help="forward-pass precision (default: %(default)s). bf16 is the fast "
                   "path on CPUs with bf16 units (see `tilerseg info`; 2.0x fp32 measured "
                   "on OpenVINO with AVX-512 bf16); probabilities moved by up to 0.15, 1 "
                   "label in 2000 changed (ISBI). int8: the model quantised with NNCF for "
                   "OpenVINO on the CPU (pip install 'tilerseg[int8]'), calibrated on the "
                   "image (or --calibration) and checked against fp32 before use. Refused "
                   "where the device cannot compute in it")
    p.add_argument("--calibration", metavar="DIR", default=None,
                   help="with --precision int8: calibrate on windows of the images in DIR "
                   "(default: of the image being segmented); cached per calibration data")
    p.add_argument("--backend", choices=("auto", "torch", "openvino"), default="auto",
                   help="runtime of the forward pass: auto = OpenVINO on the CPU when "
                   "installed (pip install 'tilerseg[openvino]'), else torch; checked "
                   "against torch first, falls back to it with a warning")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (torch backend: GPUs, or CPUs without "
                   "OpenVINO; kernels cached on disk; checked against eager first, falls "
                   "back to eager with a warning)")
    add_tta_flag(p)
    p.add_argument("--skip-background", action="store_true",
                   help="fill tiles whose whole input window is flat background with the "
                   "model's output on background, without running the model")
    p.add_argument("--background-tolerance", type=float, default=0.05, metavar="T",
                   help="largest deviation from the background value, in normalised "
                   "input units (default: %(default)s)")
    p.add_argument("--background-value", type=float, default=None, metavar="V",
                   help="background value in normalised input units (default: the most "
                   "common value of a low-resolution level)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="concurrent forward passes on the CPU, in each process that "
                   "computes (default 2, at most its cores)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads per CPU worker (default: the cores the process may "
                   "use, shared out: its affinity, SLURM_CPUS_PER_TASK, its host's share on "
                   "a cluster)")
    p.add_argument("--no-pyramid", action="store_true",
                   help="write full resolution only, no lower-resolution levels")
    g = p.add_argument_group("instances", "with --output instances (see docs/instances.md)")
    g.add_argument("--instances", choices=("components", "split"), default="components",
                   help="components: connected components of the foreground; split: "
                   "touching objects separated by a seeded watershed (default: %(default)s)")
    g.add_argument("--split-radius", type=int, default=3, metavar="R",
                   help="split: markers are the foreground eroded by a disc of radius R px "
                   "(default: %(default)s)")
    g.add_argument("--split-context", type=int, default=None, metavar="PX",
                   help="split: context read around each chunk; objects larger than this "
                   "are kept whole (default: 128 in 2D, 32 in 3D)")
    g.add_argument("--object-table", choices=("csv", "parquet"), default=None,
                   help="write a table of the objects (id, area, bounding box, centroid) "
                   "beside the output, e.g. slide.objects.csv")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output (once the new one is complete) and start "
                   "an unfinished run again")


def _add_scale_out(p: argparse.ArgumentParser, what: str) -> None:
    """Cluster, scheduler, shard and batch-job flags."""
    g = p.add_argument_group(
        "scale out", f"spread {what} over worker processes or machines (dask.distributed, "
        "dask-jobqueue) or over the jobs of a job array")
    g.add_argument("--cluster", default=None, metavar="local:N|slurm|pbs|lsf",
                   help="local:N starts N worker processes here; slurm, pbs or lsf submits "
                   "worker jobs (dask-jobqueue; its config file and the flags below)")
    g.add_argument("--scheduler", default=None, metavar="tcp://HOST:PORT",
                   help="use a running dask.distributed scheduler")
    g.add_argument("--shard", default=None, metavar="auto|I/N",
                   help="run as one job of a job array: join the output's run and claim its "
                   "tasks with any number of other shards (auto: named after SLURM's array "
                   "variables; I/N: named I/N); whoever records the last task commits")
    g.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="worker jobs to submit with --cluster slurm|pbs|lsf (default 1)")
    g.add_argument("--cores", type=int, default=None, metavar="N", help="cores per job")
    g.add_argument("--memory", default=None, metavar="SIZE", help="memory per job, e.g. 32GB")
    g.add_argument("--walltime", default=None, metavar="HH:MM:SS", help="time limit per job")
    g.add_argument("--gpus-per-job", type=int, default=0, metavar="N", help="GPUs per job")
    g.add_argument("--queue", default=None, metavar="NAME", help="partition or queue")
    g.add_argument("--account", default=None, metavar="NAME", help="account or project")
    g.add_argument("--max-replacements", type=int, default=None, metavar="N",
                   help="worker jobs that end (walltime, node failure, scancel) are replaced "
                   "by new ones, up to N in all (default twice --jobs)")
    g.add_argument("--worker-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="stop a cluster run (exit status 1, the unfinished run kept) when no "
                   "worker has been alive, or none has recorded or claimed a task, for this "
                   "long (default 300)")
    g.add_argument("--job-script", action="store_true",
                   help="print the job script that would start each worker, and exit")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``tilerseg`` command."""
    parser = argparse.ArgumentParser(
        prog="tilerseg",
        description="Exact overlap-tile U-Net segmentation of images too large for memory.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tilerseg {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log progress (-v) or debug details (-vv) to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run", help="segment an image into an OME-Zarr store", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Segment IMAGE (TIFF/BigTIFF/OME-TIFF/SVS, Zarr/OME-Zarr, a folder or "
        "glob of TIFF slices, DICOM (a file or a series folder), NIfTI (.nii, .nii.gz, or a "
        "case CASE of CASE_0000.nii.gz...), .npy, PNG/JPEG; a path or an fsspec URL) tile by "
        "tile into an OME-Zarr (v0.5) store, or into NIfTI (-o seg.nii.gz).")
    run.add_argument("image", help="image file, folder, glob or fsspec URL (s3://...)")
    run.add_argument("-o", "--out", dest="output_path", default=None, metavar="OUT.zarr",
                     help="output .zarr or fsspec URL (default: beside the input, "
                     "NAME.tilerseg.zarr); or a .nii / .nii.gz file: the labels in the "
                     "input's space (with probabilities in the output: also "
                     "NAME_probabilities.nii.gz), computed through OUT.zarr beside it")
    _add_common(run)
    _add_run_options(run)
    run.add_argument("--resume", action="store_true",
                     help="continue the unfinished run of this output (OUT.zarr.partial); "
                     "start one if there is none; exit at once if OUT is already complete "
                     "with the same parameters")
    run.add_argument("--profile", action="store_true",
                     help="report the time spent reading, in the model and writing")
    run.add_argument("--keep-zarr", action="store_true",
                     help="with a NIfTI output: keep the OME-Zarr store it was computed in "
                     "(OUT.nii.gz.zarr)")
    _add_scale_out(run, "the tasks of this image")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    run.set_defaults(func=_cmd_run)

    batch = sub.add_parser(
        "batch", help="segment many images, each into its own OME-Zarr store",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Segment every image of INPUT (files, Zarr stores, folders, globs, or "
        ".txt files listing them) with one model into OUTDIR/NAME.tilerseg.zarr. Complete "
        "outputs are skipped and unfinished ones continued, so a rerun does only what is "
        "missing; an image that fails is reported and the others go on. A summary table "
        "ends the run; the exit status is 1 if any image failed.")
    batch.add_argument("inputs", nargs="+", metavar="INPUT", help="images, folders, globs, lists")
    batch.add_argument("-o", "--out", dest="output_dir", required=True, metavar="OUTDIR",
                       help="folder for the outputs")
    _add_common(batch)
    _add_run_options(batch)
    _add_scale_out(batch, "the images")
    batch.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    batch.set_defaults(func=_cmd_batch)

    st = sub.add_parser("status", help="where a run stands: complete, tasks done, parameters",
                        description="Show whether OUT.zarr is complete or how many of its "
                        "tasks are done and which are missing, the run's parameters, who "
                        "holds which task's claim (and whether that claim is stale), the "
                        "processes working on it and what each process that computed tasks "
                        "did.")
    st.add_argument("output", metavar="OUT.zarr", help="the output (or its .partial folder)")
    st.add_argument("--json", action="store_true", help="everything, as JSON")
    st.set_defaults(func=_cmd_status)

    fin = sub.add_parser("finalize", help="commit a run whose tasks are all done",
                         description="Build the remaining pyramid levels of OUT.zarr, mark it "
                         "complete and move it into place (what the last shard of a job "
                         "array does by itself).")
    fin.add_argument("output", metavar="OUT.zarr", help="the output (or its .partial folder)")
    fin.add_argument("--overwrite", action="store_true", help="replace an existing output")
    fin.set_defaults(func=_cmd_finalize)

    info = sub.add_parser("info", help="describe an image and the tile plan for it",
                          description="Shape, axes, dtype, pyramid levels, pixel size, the "
                          "tile plan and estimates of peak memory and output size; and what "
                          "this machine computes fast (GPUs, CPU bf16 units, OpenVINO). "
                          "Without an image, only the latter.")
    info.add_argument("image", nargs="?", default=None,
                      help="image file, folder, glob or fsspec URL (s3://...)")
    _add_common(info)
    _add_halo(info)
    info.add_argument("--plot", default=None, metavar="PLAN.png",
                      help="also draw the tile plan over the image (needs tilerseg[plot])")
    info.add_argument("--plot-size", type=int, default=1024, metavar="N",
                      help="longest side of the --plot picture in px (default: %(default)s)")
    info.set_defaults(func=_cmd_info)

    tr = sub.add_parser("train", help="train a model (U-Net by default) on image/mask pairs",
                        description="Train an architecture (--arch, see tilerseg models) "
                        "with the U-Net paper's recipe (weight map, elastic deformation, "
                        "flips/rotations, grey values) on tiles cut with the engine's "
                        "geometry: 2D on image/mask pairs, 3D (--arch unet3d, or --ndim 3) "
                        "on volume/label pairs. Checkpoints best.pt / last.pt go to --out.")
    tr.add_argument("--images", required=True, help="folder of training images")
    tr.add_argument("--masks", required=True,
                    help="folder of masks (class maps, or 0/255), same names as the images")
    tr.add_argument("-o", "--out", required=True, help="checkpoint folder")
    tr.add_argument("--validation", default=None, metavar="I-J",
                    help="indices of pairs held out for validation, e.g. 20-24")
    tr.add_argument("--val-images", default=None, help="folder of validation images")
    tr.add_argument("--val-masks", default=None, help="folder of validation masks")
    tr.add_argument("--epochs", type=int, default=40)
    tr.add_argument("--steps", type=int, default=100, help="optimiser steps per epoch (100)")
    tr.add_argument("--batch-size", type=int, default=2)
    tr.add_argument("--window", default=None, metavar="N|Z,Y,X",
                    help="training input side, or one per axis, rounded up to admissible "
                    "(default 380, or twice the halo plus one pooling step where that is "
                    "more; 3D: the smallest window with a 16 x 64 x 64 output)")
    tr.add_argument("--arch", default="unet", metavar="NAME",
                    help="registered architecture: unet, unet-keras, unetpp, fcn8s, or "
                    "unet3d for volumes (default: %(default)s)")
    tr.add_argument("--ndim", type=int, choices=(2, 3), default=None,
                    help="3 trains a 3D model of --arch (unet, unetpp) on volumes "
                    "(implied by --arch unet3d)")
    tr.add_argument("--pool", choices=("2", "anisotropic"), default=None,
                    help="pooling of a 3D model: 2 on every axis, or anisotropic (in-plane "
                    "on every level but the deepest; unet3d's default)")
    tr.add_argument("--classes", type=int, default=None,
                    help="classes of the masks (default: 2 in 2D; in 3D the largest label "
                    "+ 1)")
    tr.add_argument("--depth", type=int, default=None,
                    help="poolings (default: the architecture's; 4 for unet)")
    tr.add_argument("--base-channels", type=int, default=None,
                    help="channels of the first level (default: 16 for unet, else the "
                    "architecture's)")
    tr.add_argument("--dropout", type=float, default=None,
                    help="dropout probability (default: the architecture's)")
    tr.add_argument("--batch-norm", action="store_true", default=None,
                    help="batch normalisation after every convolution")
    tr.add_argument("--padding", choices=("valid", "same"), default=None,
                    help="valid or zero-padded convolutions (default: the architecture's)")
    tr.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    tr.add_argument("--lr", type=float, default=None)
    tr.add_argument("--loss", choices=("ce", "dice+ce"), default=None,
                    help="weighted cross-entropy (2D default) or soft Dice + cross-entropy "
                    "(3D default)")
    tr.add_argument("--foreground", type=float, default=None, metavar="F",
                    help="share of tiles centred on a foreground voxel (default: 1/3 in 3D, "
                    "0 in 2D)")
    tr.add_argument("--normalize", default="auto", metavar="METHOD",
                    help="intensity normalisation, stated in the model for inference "
                    "(default auto: zscore in 3D, the engine's rule in 2D)")
    tr.add_argument("--elastic-p", type=float, default=None, metavar="P",
                    help="probability of elastic deformation per tile (default: 1 in 2D, "
                    "0.2 in 3D)")
    tr.add_argument("--no-weight-map", action="store_true")
    tr.add_argument("--no-elastic", action="store_true")
    tr.add_argument("--no-flips", action="store_true")
    tr.add_argument("--no-grey", action="store_true")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                    help="compute precision of the forward pass and loss (autocast; weights "
                    "stay float32): bf16 uses the CPU's bfloat16 units; fp16 needs a CUDA "
                    "GPU and is refused on the CPU (default: %(default)s)")
    tr.add_argument("--compile", action="store_true",
                    help="train through torch.compile (falls back to eager with a warning)")
    tr.add_argument("--resume", action="store_true", help="continue from --out/last.pt")
    tr.add_argument("--init", default=None, metavar="MODEL",
                    help="start from the weights of this model file (or bundled model's "
                         "name) instead of a random initialisation: same architecture")
    tr.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    tr.set_defaults(func=_cmd_train)

    from .evaluate import add_parser as add_eval_parser

    add_eval_parser(sub)
    from .bioimageio.command import add_parser as add_export_parser

    add_export_parser(sub)

    from .pictures.command import add_parser as add_preview_parser

    add_preview_parser(sub)

    models = sub.add_parser("models", help="list bundled models and architectures",
                            description="List the bundled (trained) models with their "
                            "geometry and validation figures, and the registered "
                            "architectures with their geometry per axis (halo, pooling "
                            "step, admissible input sides).")
    models.set_defaults(func=_cmd_models)

    demo = sub.add_parser("demo", help="write a synthetic slide and segment it",
                          description="Write a synthetic EM-like membrane slide as a tiled "
                          "BigTIFF and segment it into OME-Zarr with the bundled model.")
    demo.add_argument("--size", type=int, default=4096, help="slide side in px (4096)")
    demo.add_argument("--directory", default="tilerseg-demo",
                      help="where to write the slide and the output (./tilerseg-demo)")
    demo.add_argument("--tile", type=int, default=None, help="output tile side")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    demo.add_argument("--model", default=None, metavar="NAME|PATH",
                      help="model (default: the bundled ISBI 2012 model)")
    demo.add_argument("--base-channels", type=int, default=8,
                      help="width of the untrained U-Net used when no model is bundled (8)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (0)")
    demo.add_argument("--check", action="store_true",
                      help="also segment in memory with other tiles and report the deviation")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=_cmd_demo)
    return parser


def _check_numbers(args: argparse.Namespace) -> None:
    for name in ("size", "batch_size", "workers", "threads", "base_channels", "epochs", "steps",
                 "depth", "jobs", "cores"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise InvalidArgumentError(f"--{name.replace('_', '-')} {value} must be positive")
    if getattr(args, "gpus_per_job", 0) < 0:
        raise InvalidArgumentError(f"--gpus-per-job {args.gpus_per_job} must be >= 0")
    if getattr(args, "level", 0) < 0:
        raise InvalidArgumentError(f"--level {args.level} must be >= 0")


class _Formatter(logging.Formatter):
    """``tilerseg: warning: ...`` by default; logger names and levels with ``-v``."""

    def __init__(self, verbose: int) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s" if verbose else None)
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        if self.verbose:
            return super().format(record)
        return f"tilerseg: {record.levelname.lower()}: {record.getMessage()}"


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record is emitted."""

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def _configure_logging(verbose: int) -> None:
    """Log to stderr: warnings by default, tilerseg's progress with -v, everything with -vv
    (Dask's own INFO messages only then)."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _Stderr)), None)
    if handler is None:
        handler = _Stderr()
        root.addHandler(handler)
    handler.setFormatter(_Formatter(verbose))
    handler.setLevel(level)
    handler.filters = [lambda r: verbose >= 2 or r.levelno >= logging.WARNING
                       or r.name.startswith("tilerseg")]
    root.setLevel(level)


def _window_value(argv: list[str]) -> list[str]:
    """``--window -600,1500`` as ``--window=-600,1500``: argparse takes a value starting with
    ``-`` that is not one number for an option, and negative CT window centres are common."""
    out = []
    for arg in argv:
        if out and out[-1] == "--window" and arg.startswith("-") and "," in arg \
                and "--" not in out:
            try:
                [float(v) for v in arg.split(",")]
            except ValueError:
                pass
            else:
                out[-1] = f"--window={arg}"
                continue
        out.append(arg)
    return out


def run() -> None:
    """The ``tilerseg`` command: :func:`main`, then exit with its status (a signal that
    arrives while the process exits after a stop signal changes nothing)."""
    sys.exit(main(exiting=True))


def main(argv: Sequence[str] | None = None, *, exiting: bool = False) -> int:
    """Run the command line; returns the exit status.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments (default ``sys.argv[1:]``).
    exiting : bool
        The process exits when this returns: after a stop signal (SIGTERM, Ctrl-C), further
        ones are then ignored to the end, instead of restoring the previous handlers.
    """
    parser = build_parser()
    args = parser.parse_args(_window_value(sys.argv[1:] if argv is None else list(argv)))
    _configure_logging(args.verbose)
    if args.command is None:
        parser.print_help()
        return 2
    previous = _on_signals()
    try:
        _check_numbers(args)
        return args.func(args)
    except TilersegError as exc:
        print(f"tilerseg: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permissions... not a user input error
        print(f"tilerseg: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:
        print(f"tilerseg: {_stopped(stop)}", file=sys.stderr)
        return _stop_status(stop)
    finally:
        _restore_signals(previous, exiting)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch system's walltime or preemption, ``kill``): stop like Ctrl-C."""


_STOPPING = [0]  # stop signals received (SIGTERM, SIGINT) in this run


def _stop_signal(signum: int, frame: Any) -> None:
    """The first SIGTERM (or SIGINT) stops the run like Ctrl-C; a second one while it is
    stopping (``scancel`` sends SIGTERM twice in quick succession) is ignored, so the
    stopping run still finishes its clean-up (threads joined, claims and locks
    released) and exits with the first signal's status; a third one ends the process at
    once, with that status (for a clean-up that hangs)."""
    import signal

    _STOPPING[0] += 1
    if _STOPPING[0] == 1:
        raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
    if _STOPPING[0] >= 3:
        os._exit(128 + signum)


def _on_signals() -> dict[int, Any]:
    """Install the stop handler for SIGTERM and SIGINT (from the main thread only); the
    previous handlers."""
    import signal
    import threading

    _STOPPING[0] = 0
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.signal(signum, _stop_signal)
    return previous


def _restore_signals(previous: dict[int, Any], exiting: bool) -> None:
    """Put the previous handlers back; in a process that exits now after a stop signal,
    ignore further ones instead (a later signal would kill it with the default action, a
    signal rather than the first one's exit status)."""
    import signal

    for signum, handler in previous.items():
        signal.signal(signum, signal.SIG_IGN if exiting and _STOPPING[0] else handler)


def _stopped(stop: BaseException) -> str:
    return "terminated" if isinstance(stop, Terminated) else "interrupted"


def _stop_status(stop: BaseException) -> int:
    """128 + the signal: 143 for SIGTERM, 130 for Ctrl-C."""
    return 143 if isinstance(stop, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())

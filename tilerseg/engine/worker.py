"""What a worker process keeps between runs, and the loop a Dask task runs in it.

A run reaches a worker as plain data (:class:`~tilerseg.engine.jobs.RunRef`). The process
finds the model in :data:`_MODELS` (put there once per process: by
:class:`~tilerseg.engine.executors.plugin.ModelPlugin` on a cluster worker, or by the
client itself for Dask's local threads) and the run's :class:`RunContext` in a small
cache, rebuilt from the run's manifest on first use: the input is reopened by this
process, nothing live crosses a process boundary. :func:`run_claims` then claims the
runs' tasks and computes them through the same pipeline as a local run
(:func:`~tilerseg.engine.executors.local.run_pipelined`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import OutputError
from ..models.checkpoint import weights_digest
from .jobs import RunRef
from .options import RunOptions
from .tasks import RunContext, Work, open_context
from .workdir import WorkDir

__all__ = ["run_claims", "share_model", "forget_model", "set_cores"]

log = logging.getLogger(__name__)

_CACHE_SIZE = 8
_lock = threading.Lock()
_MODELS: dict[str, nn.Module] = {}
_CONTEXTS: OrderedDict[tuple[str, str], RunContext] = OrderedDict()
_OPTIONS: dict[str, RunOptions] = {}
_CORES: list[int | None] = [None]  # the cores this worker process may use (None: all)


def share_model(model: nn.Module, options: RunOptions | None = None) -> str:
    """Make ``model`` (and how to run it) available to runs joined in this process.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    options : RunOptions, optional
        How this process runs it (device, batch size, compile...).

    Returns
    -------
    str
        Its :func:`~tilerseg.models.checkpoint.weights_digest`, by which manifests name it.
    """
    digest = weights_digest(model)
    with _lock:
        _MODELS[digest] = model
        if options is not None:
            _OPTIONS[digest] = options
    return digest


def forget_model(digest: str) -> None:
    """Drop a model, and the runs opened with it, from this process."""
    with _lock:
        _MODELS.pop(digest, None)
        _OPTIONS.pop(digest, None)
        for key in [k for k, c in _CONTEXTS.items()
                    if c.work.manifest["model"]["digest"] == digest]:
            del _CONTEXTS[key]


def set_cores(cores: int | None) -> None:
    """The cores the pipelines of this process may use (a cluster worker's share of its
    host); None: all it may run on."""
    _CORES[0] = cores


def _context(ref: RunRef) -> RunContext:
    key = (ref.work, ref.config_hash)
    with _lock:
        context = _CONTEXTS.get(key)
        if context is not None:
            _CONTEXTS.move_to_end(key)
            return context
    work = WorkDir.open(Path(ref.work))
    if work.config_hash != ref.config_hash:
        raise OutputError(f"the run in '{ref.work}' is not the one this worker was sent "
                          f"(hash {work.config_hash[:12]}, sent {ref.config_hash[:12]})")
    digest = work.manifest["model"]["digest"]
    with _lock:
        model = _MODELS.get(digest)
        options = _OPTIONS.get(digest)
    if model is None:
        raise OutputError(f"the model {digest[:12]} of '{ref.output}' is not loaded in this "
                          f"worker process ({socket.gethostname()}, pid {os.getpid()})")
    if ref.image is None:
        raise OutputError(f"the image of '{ref.output}' is in another process's memory")
    recorded = work.manifest
    if (ref.image != recorded["input"].get("path") or ref.level != recorded["options"]["level"]
            or list(ref.channels) != recorded["resolved"]["channels"]):
        raise OutputError(f"the run of '{ref.output}' sent to this worker does not match its "
                          "manifest (image, level or channels)")
    context = open_context(work, model, ref.image, options, path=ref.image)
    with _lock:
        _CONTEXTS[key] = context
        while len(_CONTEXTS) > _CACHE_SIZE:
            _CONTEXTS.popitem(last=False)
    return context


def run_claims(runs: Sequence[RunRef], record: dict[str, Any] | None = None, *,
               isolate: bool = False, stop: str | None = None,
               contexts: Sequence[RunContext] | None = None,
               cores: int | None = None, workers: int | None = None,
               should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Join ``runs`` and compute their tasks, claiming them one at a time until every task
    is recorded (a cluster worker's loop; see :mod:`tilerseg.engine.claims`).

    Parameters
    ----------
    runs : sequence of RunRef
        The runs, in order.
    record : dict, optional
        Extra values for the claims and completion records.
    isolate : bool
        A run that fails is reported in the result and the others go on; else its error
        is raised.
    stop : str, optional
        The name of a ``distributed.Event``: once it is set (the client stopped), no task
        is claimed any more; the tasks in flight are finished and recorded.
    contexts : sequence of RunContext, optional
        The runs already opened in this process (Dask's local threads), instead of
        reopening them from ``runs``.
    cores : int, optional
        The cores this loop's pipeline may use (default: this worker process's share,
        see :func:`set_cores`).
    workers : int, optional
        Its model workers (default: the run's options).
    should_stop : callable, optional
        In this process: no task is claimed any more once it returns True (with ``stop``,
        either stops the loop).

    Returns
    -------
    dict
        ``worker`` (host:pid), ``job`` (``SLURM_JOB_ID``), ``times`` (the pipeline's
        :meth:`~tilerseg.engine.pipeline.StageTimes.as_dict`), ``runtime`` and, per run's
        work directory, ``runs[work] = {"tasks", "tiles", "error"}``.
    """
    from .executors.local import run_pipelined

    name = f"{socket.gethostname()}:{os.getpid()}"
    errors: dict[str, str] = {}
    works: list[Work] = []
    for k, ref in enumerate(runs):
        try:
            context = contexts[k] if contexts is not None else _context(ref)
        except Exception as err:  # noqa: BLE001 - this run fails, the others go on
            if not isolate:
                raise
            errors[ref.work] = _one_line(err)
            continue
        works.append(Work(context, context.work.missing()))
    stops = [check for check in (_stopped(stop), should_stop) if check is not None]
    times = run_pipelined(works, cores=cores or _CORES[0], workers=workers, isolate=isolate,
                          record=record, should_stop=lambda: any(c() for c in stops),
                          worker=name)
    result: dict[str, Any] = {"worker": name, "job": os.environ.get("SLURM_JOB_ID"),
                              "times": times.as_dict(), "runs": {}}
    for work in works:
        result["runs"][os.fspath(work.context.work.path)] = {
            "tasks": len(work.computed), "tiles": work.tiles,
            "error": _one_line(work.error) if work.error is not None else None,
            "error_type": type(work.error).__name__ if work.error is not None else None}
        if work.context.p.runner.made:
            replica = work.context.p.runner.replica
            result["runtime"] = {"engine": replica.engine, "precision": replica.runtime_precision}
    for path, error in errors.items():
        result["runs"][path] = {"tasks": 0, "tiles": 0, "error": error, "error_type": None}
    return result


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _stopped(name: str | None) -> Callable[[], bool] | None:
    """A check of the client's stop event, asked of the scheduler at most once a second.
    Only the event set stops the loop: when the scheduler cannot be asked, the loop goes
    on (what it computes is recorded; a worker whose scheduler is gone for good is ended
    by its nanny)."""
    if name is None:
        return None
    from distributed import Event, get_client

    event = Event(name, client=get_client())  # here: the pipeline's threads have no worker
    state = {"asked": 0.0, "set": False, "warned": False}

    def check() -> bool:
        now = time.monotonic()
        if not state["set"] and now - state["asked"] >= 1.0:
            state["asked"] = now
            try:
                state["set"] = bool(event.is_set())
            except Exception as err:  # noqa: BLE001 - asked again in a second
                if not state["warned"]:
                    log.warning("cannot ask the Dask scheduler whether to stop (%s: %s); "
                                "going on", type(err).__name__, err)
                    state["warned"] = True
        return bool(state["set"])

    return check

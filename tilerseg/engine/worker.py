"""What a worker process keeps between tasks, and the function a Dask task calls.

A task (:class:`~tilerseg.engine.jobs.Task`) is plain data. The process that runs it
finds the model in :data:`_MODELS` (put there once per process: by
:class:`~tilerseg.engine.executors.plugin.ModelPlugin` on a cluster worker, or by the
client itself for Dask's local threads) and the output's :class:`RunContext` in a
small cache, rebuilt from the run's manifest on first use: the input is reopened by
this process, nothing live crosses a process boundary.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import OutputError
from ..models.checkpoint import weights_digest
from .jobs import Task, WorkDir
from .options import RunOptions
from .tasks import RunContext, Work, open_context, run_tasks

__all__ = ["run_task", "share_model", "share_context", "forget_context", "forget_model",
           "one_task_at_a_time"]

log = logging.getLogger(__name__)

_CACHE_SIZE = 8
_lock = threading.Lock()
_MODELS: dict[str, nn.Module] = {}
_CONTEXTS: OrderedDict[tuple[str, str], RunContext] = OrderedDict()
_OPTIONS: dict[str, RunOptions] = {}
_SLOTS: threading.Semaphore | None = None  # tasks at once in this process (None: no limit)


def share_model(model: nn.Module, options: RunOptions | None = None) -> str:
    """Make ``model`` (and how to run it) available to tasks in this process.

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


def share_context(context: RunContext) -> None:
    """Let tasks in this process use an output already opened here (e.g. an in-memory image).

    Parameters
    ----------
    context : RunContext
        The output; the cache keeps the last few.
    """
    with _lock:
        _CONTEXTS[(os.fspath(context.work.path), context.work.config_hash)] = context
        while len(_CONTEXTS) > _CACHE_SIZE:
            _CONTEXTS.popitem(last=False)


def forget_context(context: RunContext) -> None:
    """Drop an output from this process's cache (its run is over)."""
    with _lock:
        _CONTEXTS.pop((os.fspath(context.work.path), context.work.config_hash), None)


def forget_model(digest: str) -> None:
    """Drop a model, and the outputs opened with it, from this process."""
    with _lock:
        _MODELS.pop(digest, None)
        _OPTIONS.pop(digest, None)
        for key in [k for k, c in _CONTEXTS.items()
                    if c.work.manifest["model"]["digest"] == digest]:
            del _CONTEXTS[key]


def one_task_at_a_time() -> None:
    """Run one task at a time in this process, whatever the threads of its Dask worker:
    each task's forward passes use all the torch threads (a worker with several Dask
    threads would otherwise oversubscribe the cores or share one GPU between tasks)."""
    global _SLOTS
    with _lock:
        if _SLOTS is None:
            _SLOTS = threading.Semaphore(1)


def _context(task: Task) -> RunContext:
    key = (task.work, task.config_hash)
    with _lock:
        context = _CONTEXTS.get(key)
        if context is not None:
            _CONTEXTS.move_to_end(key)
            return context
    work = WorkDir.open(Path(task.work))
    if work.config_hash != task.config_hash:
        raise OutputError(f"the run in '{task.work}' is not the one this task belongs to "
                          f"(hash {work.config_hash[:12]}, task {task.config_hash[:12]})")
    digest = work.manifest["model"]["digest"]
    with _lock:
        model = _MODELS.get(digest)
        options = _OPTIONS.get(digest)
    if model is None:
        raise OutputError(f"the model {digest[:12]} of '{task.output}' is not loaded in this "
                          f"worker process ({socket.gethostname()}, pid {os.getpid()})")
    if task.image is None:
        raise OutputError(f"the image of '{task.output}' is in another process's memory")
    recorded = work.manifest
    if (task.image != recorded["input"].get("path") or task.level != recorded["options"]["level"]
            or list(task.channels) != recorded["resolved"]["channels"]):
        raise OutputError(f"task {task.task_id} of '{task.output}' does not match its run's "
                          f"manifest (image, level or channels)")
    context = open_context(work, model, task.image, options, path=task.image)
    with _lock:
        _CONTEXTS[key] = context
        while len(_CONTEXTS) > _CACHE_SIZE:
            _CONTEXTS.popitem(last=False)
    return context


def run_task(task: Task, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compute, store and record one task; a few figures about it.

    Parameters
    ----------
    task : Task
        What to do.
    record : dict, optional
        Extra values for its completion record.

    Returns
    -------
    dict
        ``task_id``, ``tiles`` (written), ``computed`` (tiles the model ran on, not
        filled as background), ``seconds`` and ``worker`` (host:pid).
    """
    if _SLOTS is not None:
        with _SLOTS:
            return _run(task, record)
    return _run(task, record)


def _run(task: Task, record: dict[str, Any] | None) -> dict[str, Any]:
    context = _context(task)
    replica = context.p.runner.replica  # one compute thread: one stream, all the threads
    replica.warm_up(context.p.runner.model_window, context.p.geometry.in_channels,
                    context.p.batch_size, streams=1, threads=torch.get_num_threads())
    work = Work(context, [task.task_id])
    times = run_tasks([work], [replica], record=record)
    return {"task_id": task.task_id, "tiles": work.tiles, "computed": times.tiles,
            "seconds": round(times.wall, 3),
            "worker": f"{socket.gethostname()}:{os.getpid()}"}

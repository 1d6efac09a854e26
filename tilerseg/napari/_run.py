"""One run of the widget, Qt-free: load the model, :func:`tilerseg.segment_to_zarr` with
a progress callback that can stop it.

A cancelled run ends as Ctrl-C ends ``tilerseg run``: the tiles written so far stay in
``OUT.zarr.partial/`` and a run with ``resume=True`` (the widget's *Resume*, or
``tilerseg run --resume``) computes only the rest.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..engine.options import RunOptions

__all__ = ["RunCancelled", "RunOutcome", "RunRequest", "load_model_spec", "run_request"]

log = logging.getLogger(__name__)

_models: dict[Any, nn.Module] = {}
_models_lock = threading.Lock()


class RunCancelled(Exception):
    """The user cancelled the run; its partial output is kept for ``resume=True``.

    Not a :class:`tilerseg.TilersegError`: those remove a work directory that holds no
    finished task, as for a run refused for its input, while a cancelled run is kept.
    """


@dataclass(frozen=True)
class RunRequest:
    """What to segment, with what, and where.

    Attributes
    ----------
    image : str or ImageSource
        The input (see :func:`~tilerseg.napari._input.layer_image`).
    model : str or None
        A model file (``.pt``), a bioimage.io package, a bundled model's name; None for
        the bundled default model.
    out : pathlib.Path
        The OME-Zarr output.
    options : RunOptions
        The run's options.
    resume : bool
        Continue an unfinished run of ``out``; return at once if it is complete.
    overwrite : bool
        Replace an existing output.
    """

    image: Any
    model: str | None
    out: Path
    options: RunOptions = field(default_factory=RunOptions)
    resume: bool = True
    overwrite: bool = False


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended.

    Attributes
    ----------
    out : pathlib.Path
        The output (complete) or the output the partial run will become.
    cancelled : bool
        Stopped by the user: ``OUT.zarr.partial/`` holds what was done.
    seconds : float
        Wall time of the call.
    thread : int
        The :func:`threading.get_ident` of the thread that ran it.
    """

    out: Path
    cancelled: bool
    seconds: float
    thread: int


def load_model_spec(spec: str | None) -> nn.Module:
    """The model ``spec`` names (see :func:`tilerseg.models.checkpoint.model_from_spec`),
    loaded once per file version and kept for the next runs.

    Parameters
    ----------
    spec : str or None
        A model file, a bioimage.io package, a bundled model's name; None or empty for
        the bundled default model.

    Returns
    -------
    torch.nn.Module
    """
    from ..models.checkpoint import model_from_spec

    spec = spec or None
    key: Any = spec
    if spec is not None and os.path.exists(spec):
        stat = os.stat(spec)
        key = (os.path.abspath(spec), stat.st_size, stat.st_mtime_ns)
    with _models_lock:
        if key not in _models:
            _models[key] = model_from_spec(spec)
        return _models[key]


def run_request(request: RunRequest, *, should_stop: Callable[[], bool] = lambda: False,
                progress: Callable[[int, int], None] | None = None) -> RunOutcome:
    """Run ``request``, stopping after the tile in flight once ``should_stop()`` is True.

    Parameters
    ----------
    request : RunRequest
    should_stop : callable
        Polled before the run and after every tile written.
    progress : callable, optional
        ``progress(tiles_done, tiles_total)`` of the tiles this call computes.

    Returns
    -------
    RunOutcome

    Raises
    ------
    tilerseg.TilersegError
        Bad input, model or options; an output in the way.
    """
    from ..engine.to_zarr import segment_to_zarr

    start = time.perf_counter()

    def outcome(cancelled: bool) -> RunOutcome:
        return RunOutcome(Path(request.out), cancelled, time.perf_counter() - start,
                          threading.get_ident())

    def report(done: int, total: int) -> None:
        if should_stop():
            raise RunCancelled
        if progress is not None:
            progress(done, total)

    if should_stop():
        return outcome(True)
    model = load_model_spec(request.model)
    try:
        segment_to_zarr(request.image, model, request.out, request.options,
                        resume=request.resume, overwrite=request.overwrite, progress=report,
                        model_source=request.model or "the bundled default model")
    except RunCancelled:
        log.info("cancelled; the partial run of %s is kept for resume", request.out)
        return outcome(True)
    return outcome(False)

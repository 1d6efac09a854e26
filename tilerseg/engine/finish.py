"""Finishing a run by hand, clearing what a killed commit left, telling where a run stands.

The commit itself is :meth:`~tilerseg.engine.workdir.WorkDir.commit`.

Free of torch: ``tilerseg status`` and ``tilerseg finalize`` need no model.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from upath import UPath

from ..errors import OutputError
from ..io import remote
from .instances import InstanceRun, place_tables
from .jobs import read_final_manifest
from .workdir import WorkDir, work_path

__all__ = ["status", "finalize", "leftover", "clear_leftover"]

log = logging.getLogger(__name__)


def leftover(out: Path, final: dict[str, Any] | None) -> WorkDir | None:
    """The work directory of the run that made the finished output ``out``, left behind by a
    process killed between the commit's rename and its clean-up (None if there is none,
    or if it belongs to another run or is held by a live process)."""
    wp = work_path(out)
    if final is None or not wp.is_dir():
        return None
    try:
        work = WorkDir.open(wp)
    except OutputError:
        return None
    if work.manifest.get("run_id") != final.get("run_id") or work.running():
        return None
    return work


def clear_leftover(work: WorkDir, out: Path) -> None:
    """Finish the clean-up of a commit killed after its move (see :func:`leftover`):
    place the object table still in the work directory, then remove the directory."""
    instances = InstanceRun.of(work.path, work.manifest)
    if instances is not None and instances.table and \
            (instances.path / f"objects.{instances.table}").exists():
        place_tables(instances, out, replacing=False)
    work.remove()


def status(out: str | os.PathLike) -> dict[str, Any]:
    """Where a run stands: complete or not, which tasks are missing, who works on it.

    Parameters
    ----------
    out : path or URL
        The output (``OUT.zarr``) or its work directory (``OUT.zarr.partial``); a remote
        output (a URL) is either finished or not there.

    Returns
    -------
    dict
        ``output``, ``complete`` (bool), ``tasks`` and ``done`` (counts), ``missing``
        (the task numbers without a record, as ``[first, last]`` ranges), ``claims`` (per
        claimed task: its holder, whether the holder is stale, seconds since its last
        heartbeat), ``workers`` (what each process that computed tasks recorded),
        ``running`` (live processes, described), ``manifest`` and ``work`` (the work
        directory or None).

    Raises
    ------
    OutputError
        Neither a finished output nor an unfinished run is there.
    """
    out = _output_path(out)
    wp = work_path(out) if remote.is_local(out) else None  # a remote one is never unfinished
    final = read_final_manifest(out) if remote.exists(out) else None
    if wp is not None and wp.is_dir() and leftover(out, final) is None:
        work = WorkDir.open(wp)
        done = work.done()
        now = time.time()
        claims = [{"task": task, "holder": h.describe(), "host": h.host, "pid": h.pid,
                   "job": h.job, "stale": h.stale, "heartbeat_s": round(now - h.touched, 1),
                   **h.info} for task, h in sorted(work.claims().items()) if task not in done]
        return {"output": str(out), "complete": False, "tasks": len(work.grid),
                "done": len(done), "missing": _ranges(k for k in range(len(work.grid))
                                                      if k not in done),
                "claims": claims, "workers": work.worker_records(),
                "manifest": work.manifest, "work": str(wp),
                "running": [h.describe() for h in work.running()],
                "finished_output_exists": final is not None}
    if final is not None:
        count = int(final["tasks"]["count"])
        return {"output": str(out), "complete": True, "tasks": count, "done": count,
                "missing": [], "claims": [], "workers": [], "manifest": final, "work": None,
                "running": []}
    if remote.exists(out):
        raise OutputError(f"'{out}' is not a finished tilerseg output and has no unfinished run")
    raise OutputError(f"there is no output '{out}'" + (f" and no unfinished run '{wp}'" if wp
                                                       else ""))


def _ranges(numbers: Iterable[int]) -> list[list[int]]:
    """Consecutive numbers as ``[first, last]`` ranges.

    Examples
    --------
    >>> _ranges([0, 1, 2, 5, 7, 8])
    [[0, 2], [5, 5], [7, 8]]
    """
    out: list[list[int]] = []
    for n in numbers:
        if out and out[-1][1] == n - 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return out


def finalize(out: str | os.PathLike, *, overwrite: bool = False) -> bool:
    """Commit a run whose tasks are all done (e.g. shards that finished without it).

    Parameters
    ----------
    out : path
        The output (``OUT.zarr``) or its work directory (``OUT.zarr.partial``).
    overwrite : bool
        Replace an existing output of another run at ``out``.

    Returns
    -------
    bool
        True if this call committed; False if the output was already complete (a leftover
        work directory of its own commit is then removed).

    Raises
    ------
    OutputError
        Nothing to finish, tasks missing, a run still holds it, or ``out`` exists
        without ``overwrite``.
    """
    out = _output_path(out)
    if not remote.is_local(out):
        raise OutputError(f"'{out}' is remote: a remote output has no unfinished runs to finish")
    wp = work_path(out)
    final = read_final_manifest(out) if out.exists() else None
    left = leftover(out, final)
    if left is not None:
        clear_leftover(left, out)
        return False
    if not wp.is_dir():
        if final is not None:
            return False
        raise OutputError(f"there is no unfinished run '{wp}' to finish")
    work = WorkDir.open(wp)
    running = work.running()
    if running:
        raise OutputError(f"'{out}' is still being computed or committed: "
                          f"{running[0].describe()}")
    if os.path.lexists(out) and not overwrite:
        raise OutputError(f"output '{out}' exists; pass --overwrite to replace it")
    return work.commit(out, overwrite=overwrite, attributes={"executor": "finalize"})


def _output_path(out: str | os.PathLike) -> UPath:
    """The location of ``OUT.zarr``, also when given ``OUT.zarr.partial`` (locally)."""
    out = remote.output_location(out)
    if remote.is_local(out) and out.name.endswith(".partial"):
        out = out.with_name(out.name[: -len(".partial")])
    return out

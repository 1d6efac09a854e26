"""Shards: jobs of a job array (or any processes) that join one run and share its tasks.

A shard needs to know nothing of the others: it joins the run's work directory (creating it
if it is the first) and claims tasks until none is left (see :mod:`tilerseg.engine.claims`),
so any number of shards, started at once or one after the other, resubmitted or late,
cover the run exactly once between them; the one that records the last task commits. The
shard's index and count (``--shard I/N`` or a SLURM job array's variables) only name it in
its records, and give ``tilerseg batch`` its share of the images.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import InvalidArgumentError

if TYPE_CHECKING:
    from ..pipeline import StageTimes
    from ..tasks import Work

__all__ = ["Shard", "ShardExecutor", "parse_shard"]


@dataclass(frozen=True)
class Shard:
    """One process of a job array (or any process joining a run as a shard).

    Attributes
    ----------
    label : str
        How its records name it: ``"I/N"``, SLURM's ``JOBID_TASKID``, or ``"auto"``.
    index, count : int or None
        Its place in the array, where known (``tilerseg batch`` gives shard ``I`` of
        ``N`` every ``N``-th image).
    """

    label: str
    index: int | None = None
    count: int | None = None


def parse_shard(text: str | tuple[int, int] | Shard | None,
                environ: dict[str, str] | None = None) -> Shard | None:
    """``"I/N"`` (0 <= I < N) or ``"auto"`` as a :class:`Shard` (None: not a shard).

    With ``"auto"`` in a SLURM job array, ``I`` is ``(SLURM_ARRAY_TASK_ID -
    SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP`` and ``N`` is ``SLURM_ARRAY_TASK_COUNT``,
    so ``--array=1-8``, ``--array=0-7`` and ``--array=0-14:2`` all give 0..7; outside an
    array (or with an array given as a list, ``--array=1,3,8``) it has no index: a run's
    shard needs none, it claims its tasks.

    Examples
    --------
    >>> parse_shard("2/3")
    Shard(label='2/3', index=2, count=3)
    >>> parse_shard("auto", {"SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "5",
    ...                      "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "8"})
    Shard(label='77_5', index=4, count=8)
    >>> parse_shard("auto", {})
    Shard(label='auto', index=None, count=None)
    """
    if text is None or isinstance(text, Shard):
        return text
    if isinstance(text, tuple):
        i, n = text
    elif text == "auto":
        return _from_array(os.environ if environ is None else environ)
    else:
        try:
            i, n = (int(v) for v in str(text).split("/"))
        except ValueError:
            raise InvalidArgumentError(
                f"shard {text!r} must look like I/N (e.g. 0/4) or be 'auto'") from None
    if not (n >= 1 and 0 <= i < n):
        raise InvalidArgumentError(f"shard {i}/{n} needs 0 <= I < N")
    return Shard(f"{i}/{n}", int(i), int(n))


def _from_array(env: Any) -> Shard:
    task, job = env.get("SLURM_ARRAY_TASK_ID"), env.get("SLURM_ARRAY_JOB_ID")
    label = f"{job}_{task}" if task and job else env.get("SLURM_JOB_ID") or "auto"
    try:
        index = int(task)
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        step = int(env.get("SLURM_ARRAY_TASK_STEP", "1")) or 1
    except (KeyError, TypeError, ValueError):
        return Shard(label)
    place = (index - first) // step
    return Shard(label, place, count) if 0 <= place < count else Shard(label)


class ShardExecutor:
    """A shard of a run: ``inner`` claims and runs tasks, its records name the shard.

    Parameters
    ----------
    shard : Shard
        Which shard this process is.
    inner : Executor
        What runs the tasks (the local executor by default).
    """

    def __init__(self, shard: Shard, inner: Any = None) -> None:
        from .local import LocalExecutor

        self.shard = shard
        self.inner = inner or LocalExecutor()
        self.name = f"shard {shard.label}"
        self.waits_for_all = self.inner.waits_for_all

    def plan_device(self, requested: str | tuple[str, ...]) -> str | None:
        """The inner executor's."""
        return self.inner.plan_device(requested)

    def map(self, fn: Callable[..., Any], items: list) -> list:
        """The inner executor's."""
        return self.inner.map(fn, items)

    def run(self, works: Iterable[Work], *, progress: Callable[[int], None] | None = None,
            isolate: bool = False, record: dict | None = None) -> StageTimes:
        """Run the tasks through the inner executor; claims and records name the shard."""
        record = {**(record or {}), "shard": self.shard.label}
        return self.inner.run(works, progress=progress, isolate=isolate, record=record)

"""One shard of a job array: a disjoint, deterministic share of a run's tasks.

Shard ``I`` of ``N`` (0-based) does the tasks whose number is ``I`` modulo ``N``, so
``N`` jobs that know nothing of each other (a SLURM job array) cover the run exactly
once between them, in any order and at the same time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ...errors import InvalidArgumentError

if TYPE_CHECKING:
    from ..pipeline import StageTimes
    from ..tasks import Work

__all__ = ["ShardExecutor", "parse_shard"]


def parse_shard(text: str | tuple[int, int] | None,
                environ: dict[str, str] | None = None) -> tuple[int, int] | None:
    """``"I/N"`` (0 <= I < N) or ``"auto"`` (from a SLURM job array) as ``(I, N)``.

    With ``"auto"``, ``I`` is ``(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) /
    SLURM_ARRAY_TASK_STEP`` and ``N`` is ``SLURM_ARRAY_TASK_COUNT``, so ``--array=1-8``,
    ``--array=0-7`` and ``--array=0-14:2`` all work (a list such as ``--array=1,3,8`` does
    not: give ``--shard I/N`` from the job script instead).

    Examples
    --------
    >>> parse_shard("2/3")
    (2, 3)
    >>> parse_shard("auto", {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1",
    ...                      "SLURM_ARRAY_TASK_COUNT": "8"})
    (4, 8)
    """
    if text is None or isinstance(text, tuple):
        shard = text
    elif text == "auto":
        env = os.environ if environ is None else environ
        try:
            task = int(env["SLURM_ARRAY_TASK_ID"])
            count = int(env["SLURM_ARRAY_TASK_COUNT"])
            first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            step = int(env.get("SLURM_ARRAY_TASK_STEP", "1")) or 1
        except (KeyError, ValueError):
            raise InvalidArgumentError(
                "--shard auto needs SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT (run it "
                "as a SLURM job array, or give --shard I/N)") from None
        shard = ((task - first) // step, count)
    else:
        try:
            i, n = (int(v) for v in str(text).split("/"))
        except ValueError:
            raise InvalidArgumentError(
                f"shard {text!r} must look like I/N (e.g. 0/4) or be 'auto'") from None
        shard = (i, n)
    if shard is not None and not (shard[1] >= 1 and 0 <= shard[0] < shard[1]):
        raise InvalidArgumentError(f"shard {shard[0]}/{shard[1]} needs 0 <= I < N")
    return shard


class ShardExecutor:
    """The share ``index`` of ``count`` of the tasks, run by ``inner``.

    Parameters
    ----------
    index, count : int
        This shard and the number of shards (0 <= index < count).
    inner : Executor
        What runs the share (the local executor by default).
    """

    def __init__(self, index: int, count: int, inner: Any = None) -> None:
        from .local import LocalExecutor

        self.index, self.count = parse_shard((index, count))  # type: ignore[misc]
        self.inner = inner or LocalExecutor()
        self.name = f"shard {self.index}/{self.count}"
        self.waits_for_all = self.inner.waits_for_all

    def select(self, task_ids: Sequence[int]) -> list[int]:
        """The tasks numbered ``index`` modulo ``count``."""
        return [k for k in task_ids if k % self.count == self.index]

    def plan_device(self, requested: str | tuple[str, ...]) -> str | None:
        """The inner executor's."""
        return self.inner.plan_device(requested)

    def map(self, fn: Callable[..., Any], items: list) -> list:
        """The inner executor's."""
        return self.inner.map(fn, items)

    def run(self, works: Iterable[Work], *, progress: Callable[[int], None] | None = None,
            isolate: bool = False, record: dict | None = None) -> StageTimes:
        """Run the share through the inner executor; records name the shard."""
        record = {**(record or {}), "shard": f"{self.index}/{self.count}"}
        return self.inner.run(works, progress=progress, isolate=isolate, record=record)

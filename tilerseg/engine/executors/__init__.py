"""How tasks run: one protocol, several executors.

An executor takes :class:`~tilerseg.engine.tasks.Work` (the missing tasks of one or more
outputs), computes and stores them, writes each task's completion record and calls each
work's ``on_complete`` when all its tasks are recorded:

- :class:`LocalExecutor`: threads in this process (the pipelined executor);
- :class:`DaskExecutor`: one claiming pipeline per worker process of a
  ``dask.distributed`` cluster (each loads the model once and reopens the input
  itself), or per thread on Dask's local threads;
- :class:`ShardExecutor`: one job of a job array, run by another executor.

Whatever the executor, the processes that compute claim their tasks one at a time (see
:mod:`tilerseg.engine.claims`) and run them through one pipeline
(:func:`~tilerseg.engine.executors.local.run_pipelined`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..._lazy import attach
from ...errors import InvalidArgumentError
from .shard import parse_shard

if TYPE_CHECKING:
    from ..pipeline import StageTimes
    from ..tasks import Work

__all__ = ["Executor", "LocalExecutor", "DaskExecutor", "ShardExecutor", "resolve_executor",
           "parse_shard"]


@runtime_checkable
class Executor(Protocol):
    """What every executor implements."""

    name: str
    waits_for_all: bool
    """Whether every thread that could write to the output has stopped when :meth:`run`
    returns or raises (so a refused run may be removed at once)."""

    def plan_device(self, requested: str | tuple[str, ...]) -> str | None:
        """Where the model runs when not in this process (a cluster's workers), for the
        default tile; None when it runs here."""

    def run(self, works: Iterable[Work], *, progress: Callable[[int], None] | None = None,
            isolate: bool = False, record: dict | None = None) -> StageTimes:
        """Run the tasks of ``works``; ``progress(tiles_written)``; ``record``: extra
        values for the completion records; see :func:`~tilerseg.engine.tasks.run_tasks`."""

    def map(self, fn: Callable[..., Any], items: list) -> list:
        """``[fn(*item) for item in items]`` where this executor runs work (plain
        functions of plain data: the instance passes after the tiles)."""


# the executors import torch: only when used
__getattr__, __dir__ = attach(__name__, {"LocalExecutor": "local", "DaskExecutor": "dask",
                                         "ShardExecutor": "shard"}, globals())


def resolve_executor(executor: Any = None) -> Executor:
    """An executor from what a caller passed.

    Parameters
    ----------
    executor : None, str, distributed.Client or Executor
        None, ``"pipeline"`` or ``"local"``: :class:`LocalExecutor`; ``"dask"``: pipelines
        on Dask's local threads; a ``distributed.Client``: its cluster; an
        :class:`Executor` (``name``, ``waits_for_all``, ``plan_device``, ``run``,
        ``map``): itself.

    Examples
    --------
    >>> resolve_executor().name, resolve_executor("dask").name
    ('pipeline', 'dask')
    """
    if executor is None or executor in ("pipeline", "local"):
        from .local import LocalExecutor

        return LocalExecutor()
    from .dask import DaskExecutor  # dask itself: only for these (0.11 s of start-up)

    if executor == "dask":
        return DaskExecutor()
    if type(executor).__name__ == "Client" and type(executor).__module__.startswith("distributed"):
        return DaskExecutor(executor)
    if isinstance(executor, Executor):
        return executor
    raise InvalidArgumentError(
        f"executor={executor!r} is not understood; expected 'pipeline', 'dask', a "
        "distributed.Client or an executor")

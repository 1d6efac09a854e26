"""The ``dask.distributed`` worker plugin that loads a run's model once per worker process.

Imported only where ``distributed`` is installed (on the client when a cluster is used,
and on the workers, which unpickle the plugin).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from distributed import WorkerPlugin

__all__ = ["ModelPlugin", "worker_device"]

log = logging.getLogger(__name__)


def worker_device(name: Any, requested: str | tuple[str, ...]) -> str | tuple[str, ...]:
    """The device a worker process uses: one GPU per worker where there are GPUs.

    ``"auto"`` and ``"cuda"`` pick GPU ``k mod count``, ``k`` being the last number in
    the worker's name (LocalCluster names workers 0, 1...; a dask-jobqueue job with one
    process has its own GPUs, so ``k`` is irrelevant there); the CPU without GPUs.
    Anything else is used as given.

    Examples
    --------
    >>> worker_device("SLURMCluster-3", "cpu")
    'cpu'
    """
    if requested not in ("auto", "cuda"):
        return requested
    import torch

    if not torch.cuda.is_available():
        return "cpu" if requested == "auto" else requested
    numbers = re.findall(r"\d+", str(name))
    k = int(numbers[-1]) if numbers else 0
    return f"cuda:{k % torch.cuda.device_count()}"


def _cores() -> int:
    """The cores this process may run on (its CPU affinity: a batch job's allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class ModelPlugin(WorkerPlugin):
    """Loads a model on every worker process (and on workers that join later).

    Parameters
    ----------
    data : bytes
        The model file's bytes (:func:`~tilerseg.models.checkpoint.model_to_bytes`).
    options : dict
        How to run it: RunOptions fields (device, batch_size, compile...).
    threads : int, optional
        Torch intra-op threads per worker process; by default the cores the process may
        use shared among the worker processes on its host (``per_host``), so they do not
        oversubscribe it. Each worker process runs one task at a time, however many Dask
        threads it has.
    per_host : dict of str to int, optional
        Worker processes per host when the plugin was registered.
    """

    def __init__(self, data: bytes, options: dict[str, Any], threads: int | None,
                 per_host: dict[str, int] | None = None) -> None:
        self.data, self.options, self.threads = data, dict(options), threads
        self.per_host = dict(per_host or {})

    def setup(self, worker: Any) -> None:
        import torch

        from ...models.checkpoint import model_from_bytes
        from ..options import run_options
        from ..worker import one_task_at_a_time, share_model

        host = str(getattr(worker, "address", "")).rsplit(":", 1)[0].split("://")[-1]
        sharing = max(1, self.per_host.get(host, 1))
        torch.set_num_threads(self.threads or max(1, _cores() // sharing))
        one_task_at_a_time()
        options = run_options(**{**self.options, "device": worker_device(
            getattr(worker, "name", 0), self.options.get("device", "auto"))})
        digest = share_model(model_from_bytes(self.data), options)
        log.info("worker %s (pid %d): model %s on %s, %d torch thread(s)",
                 getattr(worker, "name", "?"), os.getpid(), digest[:12], options.device,
                 torch.get_num_threads())

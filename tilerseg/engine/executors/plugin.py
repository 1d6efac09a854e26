"""The ``dask.distributed`` worker plugin that loads a run's model once per worker process.

Imported only where ``distributed`` is installed (on the client when a cluster is used,
and on the workers, which unpickle the plugin).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import re
from typing import Any

from distributed import WorkerPlugin

from ..cores import available_cores

__all__ = ["ModelPlugin", "worker_device", "host_of", "cuda_available", "keep_freed_memory"]

log = logging.getLogger(__name__)


def worker_device(name: Any, requested: str | tuple[str, ...]) -> str | tuple[str, ...]:
    """The device a worker process uses: one GPU per worker where there are GPUs.

    ``"auto"`` and ``"cuda"`` pick GPU ``k mod count``, ``k`` being the last number in
    the worker's name (LocalCluster names workers 0, 1...; a dask-jobqueue job with one
    process has its own GPUs, so ``k`` is irrelevant there); the CPU without GPUs.
    Anything else is used as given.

    Parameters
    ----------
    name : any
        The worker's name.
    requested : str or tuple of str
        The run's device option.

    Returns
    -------
    str or tuple of str

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


def keep_freed_memory() -> bool:
    """Undo ``MALLOC_TRIM_THRESHOLD_``, which dask.distributed's nanny sets for its workers
    (config ``distributed.nanny.pre-spawn-environ``), for this process; True if it did.

    With that variable glibc hands every freed block above 64 KiB back to the system and
    serves every allocation above 128 KiB with a fresh ``mmap``, so each forward pass
    page-faults all its activation buffers again: the bundled model ran at 0.70 of the
    local executor's throughput on 2 cores (``benchmarks/bench_cluster.py``). The
    thresholds are set back to what glibc's own adaptive rule reaches on this work (32 MiB
    for ``mmap``, twice that for trimming).
    """
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8  # glibc's <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)
                    and libc.mallopt(m_trim_threshold, 64 << 20)
                    and libc.mallopt(m_arena_max, 4))
    except (OSError, AttributeError):  # not glibc
        return False


def cuda_available() -> bool:
    """Whether this process sees a CUDA GPU (run on the workers by the client)."""
    import torch

    return bool(torch.cuda.is_available())


def host_of(address: str) -> str:
    """The host of a Dask address: ``tcp://10.0.0.5:40123`` -> ``10.0.0.5``."""
    return str(address).rsplit(":", 1)[0].split("://")[-1]


class ModelPlugin(WorkerPlugin):
    """Loads a model on every worker process (and on workers that join later).

    Parameters
    ----------
    data : bytes
        The model file's bytes (:func:`~tilerseg.models.checkpoint.model_to_bytes`).
    options : dict
        How to run it: RunOptions fields (device, batch_size, compile...).
    per_host : dict of str to int, optional
        Worker processes per host when the plugin was registered.
    """

    def __init__(self, data: bytes, options: dict[str, Any],
                 per_host: dict[str, int] | None = None) -> None:
        self.data, self.options = data, dict(options)
        self.per_host = dict(per_host or {})

    def setup(self, worker: Any) -> None:
        import torch

        from ...models.checkpoint import model_from_bytes
        from ..options import run_options
        from ..worker import set_cores, share_model

        keep_freed_memory()
        sharing = max(1, self.per_host.get(host_of(getattr(worker, "address", "")), 1))
        cores = max(1, available_cores() // sharing)
        torch.set_num_threads(cores)
        set_cores(cores)
        options = run_options(**{**self.options, "device": worker_device(
            getattr(worker, "name", 0), self.options.get("device", "auto"))})
        self.digest = share_model(model_from_bytes(self.data), options)
        digest = self.digest
        log.info("worker %s (pid %d): model %s on %s, %d torch thread(s)",
                 getattr(worker, "name", "?"), os.getpid(), digest[:12], options.device,
                 torch.get_num_threads())

    def teardown(self, worker: Any) -> None:
        from ..worker import forget_model

        digest = getattr(self, "digest", None)
        if digest is not None:
            forget_model(digest)

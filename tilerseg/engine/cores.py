"""How many CPU cores this process may use (torch-free)."""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["available_cores"]


def available_cores(environ: Mapping[str, str] | None = None) -> int:
    """The cores this process may use: its CPU affinity where the system has one (a batch
    job's allocation, a ``taskset``), else every core of the machine; inside a SLURM job
    at most the job's ``SLURM_CPUS_PER_TASK`` (which SLURM sets when the job asks for
    ``--cpus-per-task``; sites whose SLURM does not pin tasks to their cores leave the
    affinity at every core of the node).

    Parameters
    ----------
    environ : mapping, optional
        The environment to read (default ``os.environ``).

    Examples
    --------
    >>> available_cores() >= 1
    True
    >>> available_cores({"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "1"})
    1
    """
    env = os.environ if environ is None else environ
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this system (macOS, Windows)
        cores = os.cpu_count() or 1
    booked = env.get("SLURM_CPUS_PER_TASK", "") if env.get("SLURM_JOB_ID") else ""
    if booked.isdigit() and int(booked) > 0:
        cores = min(cores, int(booked))
    return max(1, cores)

"""Side environments for checks by other tools that cannot share the test environment.

Some readers and runtimes pin versions the project's own environment cannot hold beside
its other test tools (bioimageio.core pins bioimageio.spec and breaks with newer pydantic;
iohub 0.3 needs zarr 2). A test that checks tilerseg's files with one of them runs it in
a virtual environment of its own, built here once per set of requirements and kept under
``$TILERSEG_TEST_ENVS`` (default ``~/.cache/tilerseg/test-envs``) for later runs. A build
that fails (no network, a package gone) fails the test: it never skips.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["side_env", "run_in"]


def _root() -> Path:
    default = Path.home() / ".cache" / "tilerseg" / "test-envs"
    return Path(os.environ.get("TILERSEG_TEST_ENVS", default))


def side_env(name: str, requirements: list[str], timeout: float = 1200) -> Path:
    """The Python executable of a virtual environment holding ``requirements``.

    Built on first use (``python -m venv`` and ``pip install``), then reused; a lock file
    keeps two test processes from building the same one at once.

    Parameters
    ----------
    name : str
        A short name for the folder, e.g. ``"bioimageio-core"``.
    requirements : list of str
        What ``pip install`` is given (requirement specifiers or paths).
    timeout : float
        Seconds the install may take.

    Returns
    -------
    Path
        The environment's ``bin/python``.
    """
    key = hashlib.sha256("\n".join([sys.version, *requirements]).encode()).hexdigest()[:12]
    root = _root()
    root.mkdir(parents=True, exist_ok=True)
    env = root / f"{name}-{key}"
    python = env / "bin" / "python"
    with open(root / f"{name}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (env / ".complete").exists():
            shutil.rmtree(env, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
            install = subprocess.run(
                [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                 *requirements], capture_output=True, text=True, timeout=timeout)
            if install.returncode != 0:
                raise RuntimeError(f"could not build the {name} environment:\n"
                                   f"{install.stdout[-2000:]}\n{install.stderr[-4000:]}")
            (env / ".complete").touch()
    return python


def run_in(python: Path, code: str, *args: str, timeout: float = 600) -> str:
    """Run ``code`` with ``python`` (``args`` as ``sys.argv[1:]``); its standard output.

    Raises
    ------
    AssertionError
        The script failed: its output and error, so the test shows why.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([str(python), "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert done.returncode == 0, f"{python} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done.stdout

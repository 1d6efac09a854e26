"""Which runtime executes the model, where its caches live, and what the CPU offers.

Two runtimes execute a model's forward pass:

``"torch"``
    PyTorch, eagerly or through :func:`torch.compile` (``compile=True``). The only
    choice on GPUs.
``"openvino"``
    Intel's OpenVINO runtime, on the CPU (``pip install "tilerseg[openvino]"``). The
    model is converted once per weights and input shape and kept in the cache folder;
    it computes in float32 or, on CPUs with bfloat16 units, in bfloat16.

``"auto"`` picks OpenVINO on the CPU when it is installed (and ``compile=True`` was not
asked for, which means torch.compile), else torch. Whatever is
picked is checked against eager torch on a seeded batch before use (see
:meth:`tilerseg.engine.compute.Replica.warm_up`), and a failure falls back to eager
torch with a warning.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

from ..errors import InvalidArgumentError

__all__ = ["BACKENDS", "resolve_backend", "openvino_available", "cache_dir",
           "torch_compile_cache", "cpu_features"]

BACKENDS = ("auto", "torch", "openvino")


def openvino_available() -> bool:
    """Whether the OpenVINO runtime is installed (without importing it)."""
    return importlib.util.find_spec("openvino") is not None


def resolve_backend(backend: str, device_type: str, compile: bool = False) -> str:
    """The runtime ``backend`` means on a device of type ``device_type``.

    Parameters
    ----------
    backend : {"auto", "torch", "openvino"}
    device_type : str
        ``"cpu"``, ``"cuda"`` or ``"mps"``.
    compile : bool
        Whether :func:`torch.compile` was asked for: ``"auto"`` then means torch.

    Returns
    -------
    {"torch", "openvino"}

    Raises
    ------
    InvalidArgumentError
        Unknown backend, OpenVINO asked for on a GPU, or OpenVINO not installed.

    Examples
    --------
    >>> resolve_backend("torch", "cpu")
    'torch'
    >>> resolve_backend("auto", "cuda")
    'torch'
    """
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"backend={backend!r} must be one of {', '.join(BACKENDS)}")
    if backend == "auto":
        cpu = device_type == "cpu" and not compile
        return "openvino" if cpu and openvino_available() else "torch"
    if backend == "openvino":
        if device_type != "cpu":
            raise InvalidArgumentError(
                f"backend=openvino runs on the CPU, not on {device_type}; use backend=torch")
        if not openvino_available():
            raise InvalidArgumentError(
                "backend=openvino: OpenVINO is not installed; pip install 'tilerseg[openvino]'")
    return backend


def cache_dir() -> Path:
    """The folder of tilerseg's caches (converted models, compiled kernels).

    ``$TILERSEG_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/tilerseg``, else
    ``~/.cache/tilerseg``. Created on first use by whoever writes into it; everything in
    it can be deleted at any time.
    """
    explicit = os.environ.get("TILERSEG_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "tilerseg"


def torch_compile_cache() -> Path:
    """Point torch's on-disk compile caches at ``cache_dir()/torchinductor``.

    Inductor keeps compiled graphs and kernels in ``$TORCHINDUCTOR_CACHE_DIR``, by
    default a folder under the system's temporary directory that does not survive a
    reboot; tilerseg keeps them with its other caches so that a second run loads instead
    of compiling. A ``TORCHINDUCTOR_CACHE_DIR`` set by the user is respected (torch
    itself fills in its default when it first needs the folder; that one is replaced).

    Returns
    -------
    pathlib.Path
        The folder in use.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not current or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "torchinductor")
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


@functools.lru_cache(maxsize=1)
def cpu_features() -> dict[str, bool | str]:
    """What this CPU offers for inference: vector units, bfloat16, AMX.

    Returns
    -------
    dict
        ``avx512`` / ``avx512_bf16`` / ``amx_bf16`` / ``avx512_vnni`` / ``avx_vnni`` /
        ``amx_int8`` (flags of ``/proc/cpuinfo``, False where it cannot be read), ``bf16``
        (whether bfloat16 is computed natively: AVX-512 bf16 or AMX), ``int8`` (whether
        8-bit integer dot products are: VNNI or AMX), ``torch`` (the vector ISA torch's
        kernels use) and ``openvino`` (installed or not).
    """
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    import torch  # deferred: `tilerseg info --help` and friends need no torch

    out: dict[str, bool | str] = {
        "avx512": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "avx_vnni": "avx_vnni" in flags,
        "amx_int8": "amx_int8" in flags,
        "torch": torch.backends.cpu.get_cpu_capability(),
        "openvino": openvino_available(),
    }
    out["bf16"] = bool(out["avx512_bf16"] or out["amx_bf16"])
    out["int8"] = bool(out["avx512_vnni"] or out["avx_vnni"] or out["amx_int8"])
    return out

"""Exceptions raised by tilerseg.

Every error a user can cause is a :class:`TilersegError`. Subclasses also inherit the
matching built-in exception (``ValueError``, ``FileNotFoundError``) so that generic
``except ValueError`` code keeps working. The command-line interface turns any
``TilersegError`` into one line on stderr and exit status 2.
"""

from __future__ import annotations

__all__ = [
    "TilersegError",
    "InvalidImageError",
    "InvalidArgumentError",
    "InvalidModelError",
    "ModelNotFoundError",
    "ImageNotFoundError",
    "OutputError",
    "NumericalError",
    "ClusterError",
    "RuntimeFallbackError",
]


class TilersegError(Exception):
    """Base class of every error caused by user input or configuration."""


class InvalidImageError(TilersegError, ValueError):
    """The image has the wrong shape, dtype, channel count or non-finite values."""


class InvalidArgumentError(TilersegError, ValueError):
    """An argument (tile size, device, batch size, normalisation...) is not usable."""


class InvalidModelError(TilersegError, ValueError):
    """A model, model name, model configuration or model file is not usable."""


class ModelNotFoundError(InvalidModelError, FileNotFoundError):
    """A model file does not exist."""


class ImageNotFoundError(InvalidImageError, FileNotFoundError):
    """An image file, folder or glob does not exist or matches nothing."""


class OutputError(TilersegError, ValueError):
    """The output path exists (without overwrite) or cannot be created or written."""


class NumericalError(TilersegError, ArithmeticError):
    """The model's output is not finite (NaN or Inf), e.g. fp16 activations overflowing."""


class RuntimeFallbackError(TilersegError, RuntimeError):
    """A faster runtime that was asked for (OpenVINO, ``torch.compile``) failed its set-up
    or its check against eager torch while ``TILERSEG_STRICT_RUNTIME=1`` forbids falling
    back to eager torch."""


class ClusterError(OSError):
    """The cluster failed a task for reasons of its own (a worker killed too many times, a
    lost connection): not a user error, so not a :class:`TilersegError`."""

"""The engine: where images, geometry and models meet."""

from .batch import BatchResult, segment_batch
from .device import resolve_device
from .inference import segment
from .options import RunOptions, run_options
from .prepare import plan
from .resume import finalize, status
from .to_zarr import default_output_path, segment_to_zarr
from .windows import read_window

__all__ = ["segment", "segment_to_zarr", "default_output_path", "plan", "read_window",
           "resolve_device", "RunOptions", "run_options", "status", "finalize", "segment_batch",
           "BatchResult"]

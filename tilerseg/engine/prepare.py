"""The one path from arguments to a run: image, model, plan and normalisation, validated.

Every way of segmenting (in memory, lazily, into Zarr, on a cluster worker) calls
:func:`prepare` with validated :class:`~tilerseg.engine.options.RunOptions`; it opens the
image (a numpy array is taken as it is), checks it against the model, plans the tiles
and resolves the global normalisation once.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InvalidArgumentError, InvalidImageError, InvalidModelError
from ..geometry import ModelGeometry, TilePlan, plan_tiles
from ..io.readers import open_image, sample_for_statistics
from ..io.remote import PATHS
from ..io.source import ImageSource
from ..labels import LabelPolicy
from ..models.probe import model_geometry
from ..normalize import Normalization, NormalizeSpec, resolve_normalization
from .backends import resolve_backend
from .compute import resolve_precision
from .device import (default_batch_size, default_tile, first_width, resolve_device,
                     resolve_devices)
from .options import RunOptions, run_options
from .runner import TileRunner
from .tta import views
from .view import ChannelFirstView, model_view

__all__ = ["Prepared", "prepare", "plan", "is_lazy_input", "check_model", "statistics_sample",
           "model_normalize"]

_AXES = {2: "(Y, X) or (C, Y, X)", 3: "(Z, Y, X) or (C, Z, Y, X)"}


def is_lazy_input(image: Any) -> bool:
    """True for inputs read lazily: paths, :class:`ImageSource`, Dask and Zarr arrays."""
    if isinstance(image, (*PATHS, ImageSource)):
        return True
    module = type(image).__module__
    return module.startswith(("dask.", "zarr."))


def check_model(model: Any) -> ModelGeometry:
    """The geometry of ``model``, or a clear error if it is not a model."""
    _check_module(model)
    return model_geometry(model)


def model_normalize(options: RunOptions, model: Any) -> RunOptions:
    """``options`` with the model's own normalisation where ``normalize`` is ``"auto"``.

    ``"auto"`` (the default; ``True`` alike) means the model's own normalisation where it
    states one, else by the image's dtype; any other value is the caller's and wins. A
    model states it as ``model.metadata["normalize"]`` (any ``normalize=`` value, e.g. the
    fixed range or the statistics a bioimage.io package declares); ``"auto"`` (what
    trained tilerseg models record) changes nothing.

    Examples
    --------
    >>> import tilerseg
    >>> m = tilerseg.create_model(base_channels=2)
    >>> m.metadata = {"normalize": [0.0, 4095.0]}
    >>> model_normalize(run_options(), m).normalize
    (0.0, 4095.0)
    >>> model_normalize(run_options(normalize="none"), m).normalize
    'none'
    """
    metadata = getattr(model, "metadata", None)
    stated = metadata.get("normalize") if isinstance(metadata, dict) else None
    if stated is None or stated == "auto" or stated is True:
        return options
    if options.normalize == "auto" or options.normalize is True:
        return options.replace(normalize=stated)
    return options


def _check_input_dtype(model: Any, normalize: Any, dtype: np.dtype) -> None:
    """Refuse an image of another dtype than the one a model's fixed scaling is meant for
    (``model.metadata["input_dtype"]``, e.g. a bioimage.io package's uint8 input) when the
    run uses that scaling (``model.metadata["normalize"]``)."""
    metadata = getattr(model, "metadata", None)
    if not isinstance(metadata, dict) or metadata.get("input_dtype") is None:
        return
    declared, stated = metadata["input_dtype"], metadata.get("normalize")
    if not (isinstance(normalize, (tuple, list)) and isinstance(stated, (tuple, list))
            and list(normalize) == list(stated)):
        return  # another normalisation: the caller's
    if np.dtype(dtype) != np.dtype(declared):
        raise InvalidImageError(
            f"the model takes {declared} images (its normalisation {metadata.get('normalize')} "
            f"is a fixed scaling meant for {declared}); this image is {np.dtype(dtype)}: "
            f"convert it to {declared}, or give the normalisation explicitly (normalize=; "
            "--window on the command line)")


def _check_module(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise InvalidModelError(
            f"model must be a torch.nn.Module (see tilerseg.create_model / load_model), "
            f"got {type(model).__name__}"
        )


def plan(
    image_shape: Sequence[int],
    model: nn.Module | ModelGeometry,
    tile: int | Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    backend: str = "auto",
    *,
    width: int | None = None,
) -> TilePlan:
    """Plan the tiles :func:`segment` would use for an image, without running anything.

    Parameters
    ----------
    image_shape : sequence of int
        Spatial shape of the image (no channel axis).
    model : torch.nn.Module or ModelGeometry
        The model, or its geometry.
    tile : int or sequence of int, optional
        Output tile side; the device's default when None.
    device : str or torch.device
        Only used to choose the default tile.
    backend : {"auto", "torch", "openvino"}
        The runtime; also only used to choose the default tile.
    width : int, optional
        The model's first-layer channels, for a 3D model's default tile on the CPU (see
        :func:`tilerseg.engine.device.default_tile`); found in ``model`` when it is a
        module.

    Returns
    -------
    TilePlan

    Examples
    --------
    >>> import tilerseg
    >>> p = tilerseg.plan((3000, 2000), tilerseg.create_model(base_channels=4), tile=1024)
    >>> p.grid, p.window
    ((3, 2), (1212, 1212))
    """
    geometry = model if isinstance(model, ModelGeometry) else check_model(model)
    if tile is None:
        kind = device if isinstance(device, torch.device) else resolve_device(device)
        if width is None and not isinstance(model, ModelGeometry):
            width = first_width(model)
        sides = default_tile(geometry.ndim, kind, resolve_backend(backend, kind.type), width,
                             geometry.halo)
        tile = tuple(-(-n // s) * s for n, s in zip(sides, geometry.step))  # on the grid
    return plan_tiles(image_shape, geometry, tile)


def _array_source(image: Any, geometry: ModelGeometry) -> ImageSource:
    """An in-memory image ``(*spatial)`` or ``(C, *spatial)`` as a channel-first source."""
    try:
        arr = np.asarray(image)
    except Exception as exc:
        raise InvalidImageError(
            f"image of type {type(image).__name__} is not an array: {exc}") from None
    nd = geometry.ndim
    if arr.dtype != np.bool_ and arr.dtype.kind not in "uif":
        raise InvalidImageError(
            f"image dtype {arr.dtype} is not supported; expected a real numeric or boolean dtype"
        )
    if arr.ndim not in (nd, nd + 1):
        raise InvalidImageError(
            f"image has {arr.ndim} dimensions, shape {arr.shape}; a {nd}D model expects "
            f"{_AXES.get(nd, f'{nd} or {nd + 1} dimensions')}"
        )
    if arr.size == 0:
        raise InvalidImageError(f"image is empty, shape {arr.shape}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InvalidImageError("image contains NaN or Inf values")
    if arr.ndim == nd:
        arr = arr[None]
    return ImageSource(arr, "C" + "ZYX"[-nd:])


def statistics_sample(source: ImageSource, view: ChannelFirstView) -> np.ndarray:
    """A small sample of the model's channels, for global percentiles.

    From the lowest pyramid level with at least 65,536 pixels, read whole if small, else
    as an evenly spread grid of chunk-sized blocks (see :func:`sample_for_statistics`).
    """
    sample = sample_for_statistics(source)
    return ChannelFirstView(sample, source.axes, view.spatial, view.channels)[:]


def slabs(view: ChannelFirstView, values: int = 1 << 24) -> Iterator[np.ndarray]:
    """The whole of ``view``, ``(C, *spatial)``, in slabs along its first spatial axis of
    at most about ``values`` values each: for statistics computed from every voxel (the
    z-score normalisation) at the memory of one slab."""
    per_plane = max(1, math.prod(view.shape) // view.shape[1])
    step = max(1, values // per_plane)
    for start in range(0, view.shape[1], step):
        yield view[:, start:start + step]


@dataclass(frozen=True)
class Prepared:
    """Everything a run needs, validated.

    Attributes
    ----------
    source : ImageSource
        The opened image.
    view : ChannelFirstView
        The model's ``(C, *spatial)`` view of it.
    geometry : ModelGeometry
        The run's geometry: the model's, with a leading pass-through axis when a 2D
        model segments a z-stack plane by plane.
    model_geometry : ModelGeometry
        The model's own geometry.
    plan : TilePlan
        The tiles.
    normalization : Normalization
        The global intensity map.
    devices : tuple of torch.device
        Where the model runs (one replica per device).
    options : RunOptions
        The options, as given.
    labels : LabelPolicy
        How probabilities become labels.
    runner : TileRunner
        Reads and normalises windows; runs them on the first device.
    """

    source: ImageSource
    view: ChannelFirstView
    geometry: ModelGeometry
    model_geometry: ModelGeometry
    plan: TilePlan
    normalization: Normalization
    devices: tuple[torch.device, ...]
    options: RunOptions
    labels: LabelPolicy
    runner: TileRunner

    @property
    def device(self) -> torch.device:
        """The first device."""
        return self.devices[0]

    @property
    def model(self) -> nn.Module:
        return self.runner.model

    @property
    def per_plane(self) -> bool:
        """A 2D model segments a z-stack plane by plane."""
        return self.runner.per_plane

    @property
    def batch_size(self) -> int:
        """Tiles per forward pass: the option, or the device's default."""
        return self.options.batch_size or default_batch_size(self.device)

    @property
    def flat_tile(self) -> tuple[int, ...]:
        """The tile in the model's own axes (without the plane axis of a z-stack)."""
        return self.plan.tile[-self.model_geometry.ndim:]


def prepare(image: Any, model: nn.Module, options: RunOptions | None = None, *,
            geometry: ModelGeometry | None = None,
            tile_device: str | None = None) -> Prepared:
    """Open ``image`` lazily (a numpy image as it is) and validate it against ``model``.

    Parameters
    ----------
    image : path, ImageSource, numpy, Dask or Zarr array
        The image; numpy arrays are ``(*spatial)`` or ``(C, *spatial)`` for the model's
        spatial dimensions, other inputs are opened by :func:`tilerseg.open_image`.
    model : torch.nn.Module
        The model; put in eval mode (a lazy result may be computed at any later time).
        It is moved to the first device (channels-last) when it first runs.
    options : RunOptions, optional
        The run's options (defaults otherwise).
    geometry : ModelGeometry, optional
        The model's geometry when already known (recorded by the run being resumed):
        the model is then not probed.
    tile_device : str, optional
        The kind of device whose default tile to use when ``options.tile`` is None (e.g.
        ``"cuda"`` for a cluster's GPU workers); by default the run's first device.

    Returns
    -------
    Prepared
    """
    options = model_normalize(run_options(options), model)
    if geometry is None:
        geometry = check_model(model)
    else:
        _check_module(model)
    if is_lazy_input(image):
        source = image if isinstance(image, ImageSource) else open_image(image, options.level)
    else:
        source = _array_source(image, geometry)
    planes = geometry.ndim == 2 and dict(zip(source.axes, source.shape)).get("Z", 1) > 1
    view = model_view(source, 3 if planes else geometry.ndim, options.channel)
    if view.dtype != np.bool_ and view.dtype.kind not in "uif":
        raise InvalidImageError(
            f"image dtype {view.dtype} is not supported; expected a real numeric or boolean dtype"
        )
    if min(view.shape) == 0:
        raise InvalidImageError(f"image is empty, shape {view.shape}")
    _check_input_dtype(model, options.normalize, view.dtype)
    if view.shape[0] != geometry.in_channels:
        hint = ("; pick the model's channel(s) with --channel / channel=" if view.shape[0] >
                geometry.in_channels else "")
        has = f"image has {view.shape[0]} channel(s)"
        if options.channel is not None:
            total = model_view(source, 3 if planes else geometry.ndim, None).shape[0]
            has = (f"{view.shape[0]} channel(s) selected with --channel / channel= of the "
                   f"image's {total}")
        raise InvalidImageError(
            f"{has} (axes {source.axes!r}, shape "
            f"{source.shape}); the model takes {geometry.in_channels}{hint}"
        )
    devices = tuple(resolve_devices(options.device))
    dev = devices[0]
    tile_dev = torch.device(tile_device) if tile_device is not None else dev
    backend = resolve_backend(options.backend, dev.type, options.compile)
    tile_backend = resolve_backend(options.backend, tile_dev.type, options.compile)
    if planes:  # a 2D model on a z-stack: plane by plane
        flat = plan(view.shape[2:], geometry, options.tile, tile_dev, tile_backend)
        run_geometry = geometry.per_plane()
        tile_plan = TilePlan(view.shape[1:], (1, *flat.tile), run_geometry)
    else:
        run_geometry = geometry
        tile_plan = plan(view.shape[1:], geometry, options.tile, tile_dev, tile_backend,
                         width=first_width(model))
    exact = options.normalize == "zscore"  # from every voxel, slab by slab
    norm = resolve_normalization(
        options.normalize, view.dtype,
        lambda: slabs(view) if exact else statistics_sample(source, view),
        window=lambda: source.window,
    )
    labels = LabelPolicy.for_model(geometry.out_channels, getattr(model, "metadata", None),
                                   options.threshold)
    model.eval()
    resolve_precision(options.precision, dev)  # refuse one the device lacks, before any work
    calibration = None
    if options.precision == "int8":
        calibration = _int8_calibration(model, geometry, (view, norm, planes), options,
                                        backend, norm)
    runner = TileRunner(model, view, tile_plan, norm, dev, check_finite=view.dtype.kind == "f",
                        model_ndim=geometry.ndim, precision=options.precision,
                        compile=options.compile, backend=backend, calibration=calibration,
                        views=views(options.tta, geometry))
    return Prepared(source, view, run_geometry, geometry, tile_plan, norm, devices, options,
                    labels, runner)


def _int8_calibration(model: nn.Module, geometry: ModelGeometry, image: tuple[Any, Any, bool],
                      options: RunOptions, backend: str, norm: Normalization
                      ) -> Callable[[], tuple[ModelGeometry, Any]]:
    """Check that int8 can run, and return what draws its calibration when first needed:
    windows of ``image`` (view, normalisation, plane by plane), or of the images in
    ``options.calibration``, each normalised by :func:`_calibration_normalization` of the
    run's resolved ``norm`` (which a resumed run and a cluster worker know too: they draw
    the same windows, so find the same network)."""
    from .int8 import calibrate, int8_available, known_calibration

    if backend != "openvino":
        raise InvalidArgumentError(
            "precision=int8 runs on OpenVINO: use backend=openvino (or auto, on the CPU with "
            "OpenVINO installed: pip install 'tilerseg[openvino]')")
    if not int8_available():
        raise InvalidArgumentError("precision=int8 needs NNCF: pip install 'tilerseg[int8]'")
    files: list[Path] = []
    if options.calibration is not None:
        folder = Path(options.calibration)
        if not folder.is_dir():
            raise InvalidArgumentError(f"calibration folder '{folder}' does not exist or is "
                                       "not a folder")
        files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
        if not files:
            raise InvalidArgumentError(f"calibration folder '{folder}' holds no images")

    plain = options.replace(precision="fp32", calibration=None,
                            normalize=_calibration_normalization(norm))

    def draw() -> Any:
        readers = []
        for f in files:
            p = prepare(f, model, plain, geometry=geometry)
            readers.append((p.view, p.normalization, p.per_plane))
        return calibrate(readers, geometry, str(options.calibration))

    @functools.cache  # (called under the replica's set-up lock: once)
    def provide() -> tuple[ModelGeometry, Any]:
        if not files:
            return geometry, calibrate([image], geometry, "the image")
        return geometry, known_calibration(files, repr((plain, geometry)), draw)

    return provide


def _calibration_normalization(norm: Normalization) -> NormalizeSpec | Normalization:
    """How a calibration image is normalised, from the run's resolved normalisation: by the
    same method, resolved again for each image where the method depends on the image (its
    dtype's range, its percentiles, its mean and deviation), else by the same map (a
    window, an explicit range, none)."""
    method = norm.method
    if method in ("range", "meanstd", "zscore") or method.startswith("percentile"):
        return method
    return norm

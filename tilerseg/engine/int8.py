"""int8 on the CPU: the model quantised after training with NNCF for OpenVINO, checked.

``precision="int8"`` runs an OpenVINO network whose convolutions compute in 8-bit
integers (AVX-512 VNNI, AMX on recent Xeons). It is made once per model and calibration
data, and cached:

1. **Calibration windows.** :data:`CALIBRATION_WINDOWS` windows of the model's input size
   for a :data:`CALIBRATION_TILE` px output tile, at seeded random positions, read and
   normalised exactly as the run reads its tiles: from the image being segmented, or from
   the images of a calibration folder (``--calibration DIR``, each normalised as a run of it
   would be). :data:`CHECK_WINDOWS` more windows, drawn with another seed, are kept for
   the check. The calibration's identity is the SHA-256 of all these windows' values.
2. **Quantisation.** The model is exported with :func:`torch.export` with symbolic input
   sizes (on its pooling grid), converted by OpenVINO (one network for every input size),
   and quantised by ``nncf.quantize`` on the calibration windows (NNCF's defaults: 8-bit
   weights per channel and activations per tensor, fast bias correction). Its parameters
   are then fixed: every window of every run computes the same function, so tiling stays
   exact and the one-shot reference is the same network reshaped to the whole image.
3. **The check.** On the check windows the int8 network's probabilities are compared with
   eager torch in float32: the labels (the model's :class:`~tilerseg.labels.LabelPolicy`)
   must agree on at least :data:`MIN_AGREEMENT` of the pixels and the mean absolute
   probability deviation must stay within :data:`MAX_MEAN_DEVIATION`. A network that
   fails is not used: the run falls back to eager torch in float32, with a warning (an
   error under ``TILERSEG_STRICT_RUNTIME=1``), as any runtime that fails its check does.
4. **The cache.** The network (``int8-KEY.xml/.bin``) and its check (``.json``) are
   saved under ``cache_dir()/openvino``; the key covers the weights, the model's code and
   configuration, the calibration's identity and the NNCF, OpenVINO and tilerseg versions.

NNCF is the optional extra ``int8`` (``pip install "tilerseg[int8]"``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InvalidArgumentError
from ..geometry import ModelGeometry
from ..labels import LabelPolicy
from .backends import cache_dir, cpu_features
from .openvino_backend import cache_key, quiet_export, save_network
from .workdir import write_json
from .windows import read_window

__all__ = ["CALIBRATION_TILE", "CALIBRATION_WINDOWS", "CHECK_WINDOWS", "Calibration",
           "Int8CheckError", "MAX_MEAN_DEVIATION", "MIN_AGREEMENT", "calibrate",
           "int8_available", "int8_convolutions", "known_calibration", "quantized_network"]

log = logging.getLogger(__name__)

CALIBRATION_WINDOWS = 300
"""Windows the quantisation is calibrated on (fewer where they are large, see
:data:`CALIBRATION_VALUES`)."""

CALIBRATION_VALUES = 32_000_000
"""At most this many input values in all calibration windows (300 2D windows of 316^2
take 30 million; 3D windows are counted down to fit)."""

CHECK_WINDOWS = 16
"""Other windows the quantised network is checked on against float32."""

CALIBRATION_TILE = {2: 128, 3: 32}
"""Output side of a calibration window, per model dimension (its input adds the halo)."""

MIN_AGREEMENT = 0.99
"""Least fraction of check pixels whose int8 label equals the float32 label."""

MAX_MEAN_DEVIATION = 0.01
"""Largest mean absolute deviation of the int8 probabilities from float32."""

_SEED, _CHECK_SEED = 0, 1


class Int8CheckError(RuntimeError):
    """The quantised network's outputs differ from float32 beyond the check's bounds."""


def int8_available() -> bool:
    """Whether NNCF (the optional extra ``int8``) is installed."""
    return importlib.util.find_spec("nncf") is not None


class Calibration:
    """The windows a model is quantised on and checked on.

    Parameters
    ----------
    windows : list of numpy.ndarray
        ``(C, *window)`` float32 calibration windows, normalised.
    check : list of numpy.ndarray
        Other windows of the same sources, for the check.
    source : str
        Where they come from (``"the image"`` or the calibration folder).
    digest, counts : optional
        For a calibration drawn before (see :func:`known_calibration`): its digest and
        window counts, the windows left out.
    draw : callable, optional
        Draws the windows again (returns a Calibration) when they are needed and absent.

    Attributes
    ----------
    digest : str
        SHA-256 of every window's values, in order: the calibration's identity.
    """

    def __init__(self, windows: list[np.ndarray], check: list[np.ndarray], source: str, *,
                 digest: str | None = None, counts: tuple[int, int] | None = None,
                 draw: Callable[[], Calibration] | None = None) -> None:
        self.windows, self.check, self.source, self._draw = list(windows), list(check), \
            source, draw
        if digest is None:
            h = hashlib.sha256()
            for w in [*self.windows, *self.check]:
                h.update(str(w.shape).encode())
                h.update(np.ascontiguousarray(w, dtype=np.float32).tobytes())
            digest, counts = h.hexdigest(), (len(self.windows), len(self.check))
        self.digest = digest
        self._counts = counts or (0, 0)

    def describe(self) -> dict[str, Any]:
        """What a run records of its calibration."""
        return {"source": self.source, "windows": self._counts[0],
                "check_windows": self._counts[1], "sha256": self.digest}

    def release(self) -> None:
        """Drop the windows (kept: the digest and the counts) once the network is made or
        found: a run holds on to its calibration, and 3D windows are large."""
        self.windows, self.check = [], []

    def ensure_windows(self) -> None:
        """Have the windows, drawn again where they were released or never drawn.

        Raises
        ------
        RuntimeError
            They cannot be drawn again, or they are not those of :attr:`digest` any more
            (the calibration images changed).
        """
        if self.windows:
            return
        if self._draw is None:
            raise RuntimeError("the calibration windows were released before quantising")
        fresh = self._draw()
        if fresh.digest != self.digest:
            raise RuntimeError(f"the calibration images of {self.source} changed while their "
                               "record was kept")
        self.windows, self.check = fresh.windows, fresh.check


_KNOWN: dict[str, dict[str, Any]] = {}  # folder fingerprint -> Calibration.describe()
_KNOWN_LOCK = threading.Lock()


def known_calibration(files: Sequence[Path], settings: str,
                      draw: Callable[[], Calibration]) -> Calibration:
    """The calibration of a folder's ``files``, drawn once: the windows are drawn and
    hashed on first use and the digest recorded (in this process, and as
    ``calibration-KEY.json`` beside the cached networks), keyed by the files' paths, sizes
    and modification times, ``settings`` (how they are read and normalised) and what
    :func:`calibrate` draws. Later runs get the digest without reading the files (their
    windows are drawn again only if a network must be made: :meth:`Calibration.ensure_windows`).
    Saves 0.42 s per run of a 2D model, and per image of a batch."""
    from .. import __version__

    stats = [(os.fspath(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = hashlib.sha256(json.dumps({
        "files": stats, "settings": settings, "windows": CALIBRATION_WINDOWS,
        "values": CALIBRATION_VALUES, "check": CHECK_WINDOWS, "tile": CALIBRATION_TILE,
        "seeds": [_SEED, _CHECK_SEED], "tilerseg": __version__}, sort_keys=True,
        default=str).encode()).hexdigest()[:24]
    record = cache_dir() / "openvino" / f"calibration-{key}.json"
    with _KNOWN_LOCK:
        info = _KNOWN.get(key)
    if info is None:
        try:
            info = json.loads(record.read_text())
        except (OSError, ValueError):
            info = None
    if info is not None:
        return Calibration([], [], info["source"], digest=info["sha256"],
                           counts=(info["windows"], info["check_windows"]), draw=draw)
    calibration = draw()
    calibration._draw = draw
    info = calibration.describe()
    with _KNOWN_LOCK:
        _KNOWN[key] = info
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        write_json(record, info)
    except OSError as err:
        log.debug("int8: cannot record the calibration in %s (%s)", record, err)
    return calibration


Reader = tuple[Any, Callable[..., np.ndarray], bool]
"""An image to draw windows from: (channel-first view, normalisation, plane by plane)."""


def calibrate(readers: Sequence[Reader], geometry: ModelGeometry, source: str,
              count: int | None = None, check: int | None = None) -> Calibration:
    """Draw the calibration and check windows from ``readers``.

    Parameters
    ----------
    readers : sequence of (view, normalization, per_plane)
        The images: a channel-first array-like view ``(C, *spatial)``, the normalisation
        its run applies, and whether a 2D model runs plane by plane over its first
        spatial axis. Windows are spread over them in turn.
    geometry : ModelGeometry
        The model's own geometry.
    source : str
        Where the images come from, for the record.
    count, check : int, optional
        Calibration and check windows (default :data:`CALIBRATION_WINDOWS`, fewer where
        they would exceed :data:`CALIBRATION_VALUES`, and :data:`CHECK_WINDOWS`).

    Returns
    -------
    Calibration
    """
    tile = CALIBRATION_TILE.get(geometry.ndim, 32)
    window = tuple(geometry.window_for_tile(tile, a) for a in range(geometry.ndim))
    if count is None:
        fits = CALIBRATION_VALUES // (math.prod(window) * geometry.in_channels)
        count = max(1, min(CALIBRATION_WINDOWS, fits))
    check = CHECK_WINDOWS if check is None else check
    return Calibration(_draw(readers, window, count, _SEED),
                       _draw(readers, window, check, _CHECK_SEED), source)


def _draw(readers: Sequence[Reader], window: tuple[int, ...], count: int,
          seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(count):
        view, norm, per_plane = readers[k % len(readers)]
        spatial = tuple(int(n) for n in view.shape[1:])
        size = ((1,) if per_plane else ()) + window
        start = [int(rng.integers(0, max(1, n - s + 1))) for n, s in zip(spatial, size)]
        block = norm(read_window(view, start, size))
        out.append(block[:, 0] if per_plane else block)
    return out


# -- the network ---------------------------------------------------------------------------

def _dynamic_network(model: nn.Module, geometry: ModelGeometry, channels: int) -> Any:
    """The model as one OpenVINO network for every admissible input size: exported with
    symbolic sizes ``step * k + min_input`` per axis, its crops made quantisable."""
    import openvino

    if isinstance(model, torch.jit.ScriptModule):
        raise InvalidArgumentError("int8 needs a torch module (torch.export); a TorchScript "
                                   "model cannot be quantised here")
    sizes, dims = [], {}
    for a in range(geometry.ndim):
        k = torch.export.Dim(f"k{a}", min=0, max=4096)
        dims[2 + a] = geometry.step[a] * k + geometry.min_input[a]
        sizes.append(geometry.min_input[a] + 8 * geometry.step[a])  # k = 0, 1 specialise
    example = torch.zeros((1, channels, *sizes))
    with quiet_export():
        program = torch.export.export(model, (example,), dynamic_shapes=(dims,))
        network = openvino.convert_model(program)
    _slices_to_strided(network)
    return network


def _slices_to_strided(network: Any) -> int:
    """Replace each ``Slice`` over trailing axes with unit steps (the U-Net's crops of its
    skip connections) by the equivalent ``StridedSlice``.

    NNCF moves a quantiser through ``StridedSlice`` but not through ``Slice`` (which
    torch.export's crops become), so otherwise the feature map before every crop stays
    float32 and is quantised twice: measured 79 ms against 60 ms per 1212^2 window of
    the bundled model on an AMX Xeon. Returns the number replaced.
    """
    from openvino import opset13 as ops

    replaced = 0
    for node in list(network.get_ordered_ops()):
        if node.get_type_name() != "Slice" or node.get_input_size() < 5:
            continue
        data, start, stop, step, axes = (node.input_value(i) for i in range(5))
        if step.get_node().get_type_name() != "Constant" or \
                axes.get_node().get_type_name() != "Constant":
            continue
        rank = data.get_partial_shape().rank.get_length()
        axes_ = [int(a) % rank for a in axes.get_node().get_data().ravel()]
        if any(int(s) != 1 for s in step.get_node().get_data().ravel()) or \
                axes_ != list(range(rank - len(axes_), rank)):
            continue
        lead = ops.constant(np.zeros(rank - len(axes_), np.int64))
        begin = ops.concat([lead, ops.convert(start, "i64")], 0)
        end = ops.concat([lead, ops.convert(stop, "i64")], 0)
        mask = [1] * (rank - len(axes_)) + [0] * len(axes_)
        new = ops.strided_slice(data, begin, end, ops.constant(np.ones(rank, np.int64)),
                                begin_mask=mask, end_mask=mask)
        new.set_friendly_name(node.get_friendly_name())
        node.output(0).replace(new.output(0))
        replaced += 1
    network.validate_nodes_and_infer_types()
    return replaced


def network_path(model: nn.Module, calibration: Calibration) -> Path:
    """Where the quantised network of ``model`` for ``calibration`` is cached: its key
    adds the calibration's digest, the NNCF version and the CPU's int8 instruction sets
    (int8 kernels differ between them: a network is checked on each kind)."""
    import nncf

    features = cpu_features()
    isa = sorted(k for k in ("avx512", "avx512_vnni", "avx_vnni", "amx_int8") if features[k])
    key = cache_key(model, calibration=calibration.digest, nncf=nncf.__version__, cpu=isa)
    return cache_dir() / "openvino" / f"int8-{key}.xml"


def quantized_network(model: nn.Module, geometry: ModelGeometry,
                      calibration: Calibration) -> tuple[Any, dict[str, Any]]:
    """The int8 network of ``model`` (any input size; reshape it before compiling) and its
    check, from the cache or made now (see the module docstring).

    Raises
    ------
    Int8CheckError
        The network fails the check (now, or when it was made).
    """
    import openvino

    core = openvino.Core()
    path = network_path(model, calibration)
    record = path.with_suffix(".json")
    if path.is_file() and path.with_suffix(".bin").is_file() and record.is_file():
        try:
            network, check = core.read_model(str(path)), json.loads(record.read_text())
            log.debug("int8: read the quantised network from %s", path)
        except (OSError, ValueError, RuntimeError) as err:
            log.warning("int8: cannot read the cached network %s (%s); quantising again",
                        path, err)
        else:
            calibration.release()
            return network, _passed(check)
    network, check = _quantize(model, geometry, calibration)  # cached even if it fails
    calibration.release()
    try:
        save_network(network, path)
        write_json(record, check)
        log.info("int8: cached the quantised network in %s", path)
    except Exception as err:  # noqa: BLE001 - OpenVINO raises RuntimeError; the run goes on
        log.warning("int8: cannot cache the quantised network in %s (%s)", path.parent, err)
    return network, _passed(check)


def _passed(check: dict[str, Any]) -> dict[str, Any]:
    """``check`` with ``passed`` judged by today's bounds, or Int8CheckError."""
    check = {**check, "passed": bool(check["agreement"] >= MIN_AGREEMENT
                                     and check["mean_deviation"] <= MAX_MEAN_DEVIATION)}
    if not check["passed"]:
        raise Int8CheckError(
            f"int8 changed the labels of {1 - check['agreement']:.2%} of the check pixels "
            f"(at most {1 - MIN_AGREEMENT:.0%} allowed) and the probabilities by "
            f"{check['mean_deviation']:.4f} on average (at most {MAX_MEAN_DEVIATION} allowed)")
    return check


def _quantize(model: nn.Module, geometry: ModelGeometry, calibration: Calibration
              ) -> tuple[Any, dict[str, Any]]:
    import nncf

    calibration.ensure_windows()
    start = time.perf_counter()
    channels = calibration.windows[0].shape[0]
    network = _dynamic_network(model, geometry, channels)
    shape = (1, *calibration.windows[0].shape)
    network.reshape({0: shape})
    data = nncf.Dataset([w[None] for w in calibration.windows])
    # NNCF's INFO lines are not the user's (nncf.set_log_level would also lower the level
    # of every handler attached to its logger, whoever put them there)
    logging.getLogger("nncf").setLevel(logging.WARNING)
    shown = io.StringIO()  # NNCF's progress bars: the library logs, it does not print
    with contextlib.redirect_stdout(shown), contextlib.redirect_stderr(shown):
        quantized = nncf.quantize(network, data, subset_size=len(calibration.windows))
    log.debug("NNCF: %s", shown.getvalue().strip())
    log.info("int8: quantised the model on %d calibration windows of %s in %.1f s",
             len(calibration.windows), list(shape[2:]), time.perf_counter() - start)
    check = _check(model, quantized, shape, calibration)
    log.info("int8: on %d check windows the labels agree with float32 on %.3f%% of the "
             "pixels, probabilities deviate by %.4f on average (%.3f at most)",
             len(calibration.check), 100 * check["agreement"], check["mean_deviation"],
             check["max_deviation"])
    return quantized, check


def _activate(logits: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def _check(model: nn.Module, quantized: Any, shape: tuple[int, ...],
           calibration: Calibration) -> dict[str, Any]:
    """Compare the quantised network with eager float32 torch on the check windows."""
    import openvino

    compiled = openvino.Core().compile_model(quantized, "CPU",
                                             {"INFERENCE_PRECISION_HINT": "f32"})
    policy = LabelPolicy.for_model(int(compiled.output(0).get_partial_shape()[1].get_length()),
                                   getattr(model, "metadata", None))
    agree = total = elements = 0
    deviation_sum, deviation_max = 0.0, 0.0
    device = next(model.parameters()).device
    for window in calibration.check:
        x = torch.from_numpy(np.ascontiguousarray(window[None], dtype=np.float32))
        with torch.inference_mode():
            ref = _activate(model(x.to(device)).float().cpu())[0].numpy()
        got = _activate(torch.from_numpy(compiled({0: x.numpy()})[0]))[0].numpy()
        diff = np.abs(got - ref)
        deviation_sum += float(diff.sum(dtype=np.float64))
        elements += diff.size
        deviation_max = max(deviation_max, float(diff.max()))
        labels_ref, labels_got = policy(ref), policy(got)
        agree += int((labels_ref == labels_got).sum())
        total += labels_ref.size
    return {"agreement": agree / total, "mean_deviation": deviation_sum / elements,
            "max_deviation": deviation_max, "windows": len(calibration.check)}


def int8_convolutions(compiled: Any) -> tuple[int, int]:
    """How many of a compiled network's convolutions run in 8-bit integers, of how many
    (read from OpenVINO's runtime graph: what the CPU plugin really executes)."""
    kinds = ("Convolution", "Deconvolution")
    count = quantized = 0
    for node in compiled.get_runtime_model().get_ops():
        info = node.get_rt_info()
        if info["layerType"].astype(str) in kinds:
            count += 1
            quantized += info["runtimePrecision"].astype(str) in ("i8", "u8")
    return quantized, count

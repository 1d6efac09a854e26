"""Training with the U-Net paper's recipe, on tiles cut with the engine's geometry."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..engine.compute import (PRECISIONS, STRICT_RUNTIME, memory_format, resolve_precision,
                              strict_runtime)
from ..errors import (InvalidArgumentError, InvalidImageError, InvalidModelError,
                      RuntimeFallbackError)
from ..models import create_model, load_model, model_geometry, save_model
from ..normalize import Normalization
from .data import Pair
from .losses import check_loss, training_loss, weighted_loss
from .sampling import (DEFAULT_OUTPUT_3D, PatchSampler, one_side, pair_normalization,
                       training_normalize, training_window)
from .validation import better, validate_dice, validate_pixels
from .weights import class_weights, weight_map

__all__ = ["PatchSampler", "TrainConfig", "TrainStep", "train", "training_precision",
           "weighted_loss"]

log = logging.getLogger(__name__)

TrainProgress = Callable[[int, int, int, float], None]
"""``progress(epoch, step, steps_per_epoch, running_loss)``."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored with the checkpoints).

    Attributes
    ----------
    model : dict
        ``create_model`` arguments, e.g. ``{"name": "unet", "base_channels": 16}``.
    epochs, steps_per_epoch, batch_size : int
        Length of the run; one step is one optimiser update on ``batch_size`` tiles.
    window : int, sequence of int or None
        Training input side, one for all axes or one per axis (Z, Y, X for volumes),
        rounded up to admissible sizes per axis (:func:`~tilerseg.train.sampling.training_window`);
        default in 2D: the smallest admissible side of at least 380 px (output 196 px for
        a depth-4 valid U-Net), or of twice the halo plus one pooling step where that is
        more (FCN-8s); in 3D: the smallest admissible window with an output of at least
        16 x 64 x 64.
    optimizer : {"adam", "sgd"}
        Adam, or SGD with the paper's momentum 0.99.
    lr : float or None
        Learning rate; default 1e-3 for Adam, 1e-2 for SGD. Decays by cosine to 5% of it.
    weight_map, w0, sigma : bool, float, float
        The paper's weight map (class balance + border term) and its parameters; in 3D
        distances are measured with the voxel spacing, ``sigma`` in units of the finest
        voxel side.
    loss : {"ce", "dice+ce"} or None
        The paper's weighted cross-entropy, or soft batch Dice over the foreground
        classes plus that cross-entropy (nnU-Net's); default ``"ce"`` in 2D and
        ``"dice+ce"`` in 3D.
    foreground : float or None
        Share of training tiles centred on a random voxel of a random foreground class of
        their volume (nnU-Net's oversampling), in [0, 1]; default 1/3 in 3D, 0 in 2D.
    normalize : str, (float, float) or bool
        Intensity normalisation of the training images, computed once per image
        (:func:`tilerseg.normalize.resolve_normalization`) and stated in the saved
        models' metadata so that inference normalises alike. ``"auto"`` (default) is the
        engine's automatic rule in 2D and ``"zscore"`` in 3D (per channel, over each
        volume's foreground, as nnU-Net normalises MRI).
    elastic, flips, grey : bool
        Augmentations: elastic deformation (3 x 3 grid, 10 px; 3 x 3 x 3 in 3D, the Z
        displacement scaled by the spacing), flips and 90-degree rotations (in 3D: every
        axis flipped, rotations in the (Y, X) plane only where Y and X agree), grey-value
        changes (per channel in 3D).
    elastic_p : float or None
        Probability that a tile is deformed elastically, in [0, 1]; default 1 in 2D (the
        paper) and 0.2 in 3D (nnU-Net's per-sample probability; a 3D deformation costs
        more than the training step of a small model on 2 cores).
    seed : int
        Seed of numpy and torch: the same config gives the same run.
    precision : {"fp32", "bf16", "fp16"}
        Compute precision of the forward pass and loss (``torch.autocast``); weights,
        gradients and optimiser state stay float32 and the saved models are float32.
        ``"bf16"`` uses the CPU's bfloat16 units (or a CUDA GPU with native bfloat16);
        ``"fp16"`` needs a CUDA GPU (it trains with a loss scaler) and is refused on the
        CPU. Validation runs in float32.
    compile : bool
        Train through ``torch.compile(model, dynamic=False)`` (training windows have one
        shape); compiled before the first step, falling back to eager execution with a
        warning if compilation fails.
    init : str or None
        A model file (or a bundled model's name) whose weights start the training instead
        of the random initialisation (a warm start, e.g. a longer schedule for a trained
        model); its architecture and configuration must be ``model``'s.
    """

    model: dict[str, Any] = field(default_factory=lambda: {"name": "unet", "base_channels": 16})
    epochs: int = 40
    steps_per_epoch: int = 100
    batch_size: int = 2
    window: int | list[int] | None = None
    optimizer: str = "adam"
    lr: float | None = None
    momentum: float = 0.99
    weight_map: bool = True
    w0: float = 10.0
    sigma: float = 5.0
    elastic: bool = True
    flips: bool = True
    grey: bool = True
    seed: int = 0
    foreground_class: int = 1
    precision: str = "fp32"
    compile: bool = False
    loss: str | None = None
    foreground: float | None = None
    normalize: Any = "auto"
    elastic_p: float | None = None
    init: str | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "steps_per_epoch", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidArgumentError(f"{name}={value!r} must be a positive integer")
        if self.optimizer not in ("adam", "sgd"):
            raise InvalidArgumentError(f"optimizer={self.optimizer!r} must be 'adam' or 'sgd'")
        if self.lr is not None and not self.lr > 0:
            raise InvalidArgumentError(f"lr={self.lr!r} must be positive")
        if self.precision not in PRECISIONS:
            raise InvalidArgumentError(
                f"precision={self.precision!r} must be one of {', '.join(PRECISIONS)}")
        if not isinstance(self.compile, bool):
            raise InvalidArgumentError(f"compile={self.compile!r} must be True or False")
        if self.loss is not None:
            check_loss(self.loss)
        if self.foreground is not None and not (
                isinstance(self.foreground, (int, float)) and 0 <= self.foreground <= 1):
            raise InvalidArgumentError(
                f"foreground={self.foreground!r} must be a fraction in [0, 1]")
        if self.elastic_p is not None and not (
                isinstance(self.elastic_p, (int, float)) and 0 <= self.elastic_p <= 1):
            raise InvalidArgumentError(
                f"elastic_p={self.elastic_p!r} must be a probability in [0, 1]")
        if isinstance(self.window, tuple):  # JSON-friendly (state.json, metadata)
            self.window = list(self.window)
        if isinstance(self.normalize, tuple):
            self.normalize = list(self.normalize)


def training_normalization(norms: Sequence[Normalization],
                           pairs: Sequence[Pair]) -> dict[str, Any]:
    """What the training images' ``"auto"`` normalisation was, for the model's metadata:
    their dtypes and the resolved method, with ``low``/``high`` where it was the same
    fixed range for all (``range`` 0..255 for 8-bit images, ``none`` for float ones).

    Examples
    --------
    >>> import numpy as np
    >>> from types import SimpleNamespace as P
    >>> n = Normalization("range", 0.0, 255.0)
    >>> training_normalization([n, n], [P(image=np.zeros(1, np.uint8))] * 2)
    {'dtypes': ['uint8'], 'method': 'range', 'low': 0.0, 'high': 255.0}
    """
    methods = sorted({n.method for n in norms})
    out: dict[str, Any] = {"dtypes": sorted({str(p.image.dtype) for p in pairs}),
                           "method": methods[0] if len(methods) == 1 else methods}
    ranges = {(n.low, n.high) for n in norms}
    if methods in (["range"], ["none"]) and len(ranges) == 1:
        out["low"], out["high"] = next(iter(ranges))
    return out


def training_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for training in ``precision`` on ``device`` (None for fp32).

    The engine's rule (:func:`tilerseg.engine.compute.resolve_precision`: bf16 on CUDA
    needs native bfloat16), plus: fp16 trains only on CUDA, where a loss scaler keeps
    its small gradients from underflowing.

    Raises
    ------
    InvalidArgumentError
        Unknown precision, one the device cannot compute in, or fp16 off CUDA.

    Examples
    --------
    >>> training_precision("bf16", torch.device("cpu"))
    torch.bfloat16
    >>> training_precision("fp32", torch.device("cpu")) is None
    True
    """
    dtype = resolve_precision(precision, device)
    if dtype == torch.float16 and device.type != "cuda":
        raise InvalidArgumentError(
            f"precision=fp16 trains only on a CUDA GPU (with a loss scaler); on the "
            f"{device.type.upper()} use precision=bf16 or fp32")
    return dtype


class TrainStep:
    """One optimiser step of :func:`train`: forward pass and loss under autocast, backward
    (through a loss scaler for fp16), optimiser step; optionally through ``torch.compile``.

    Parameters
    ----------
    model : torch.nn.Module
        The model, in training mode and its memory format; its weights stay float32.
    optimizer : torch.optim.Optimizer
        The optimiser of ``model``'s parameters.
    precision : {"fp32", "bf16", "fp16"}
        Autocast precision, see :func:`training_precision`.
    device : torch.device
        Where ``model`` is (default: the CPU).
    loss : {"ce", "dice+ce"}
        The loss (:func:`tilerseg.train.losses.training_loss`).

    Attributes
    ----------
    net : callable
        What the forward pass runs through: ``model`` (or, for a model with
        ``deep_supervision`` and ``supervised_outputs``, a wrapper returning every head's
        logits, whose losses are averaged), or its compiled wrapper after a successful
        :meth:`compile`.
    compiled : bool
        Whether the steps run through ``torch.compile``.
    scaler : torch.amp.GradScaler
        The loss scaler; enabled only for fp16 (its state goes into the checkpoints).

    Examples
    --------
    >>> import torch, tilerseg
    >>> model = tilerseg.create_model("unet", depth=2, base_channels=4)
    >>> step = TrainStep(model, torch.optim.Adam(model.parameters()), "bf16")
    >>> x, y, w = torch.rand(1, 1, 60, 60), torch.zeros(1, 20, 20, dtype=torch.long), torch.ones(1, 20, 20)
    >>> loss = step(x, y, w)
    >>> loss.dtype, next(model.parameters()).dtype
    (torch.float32, torch.float32)
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 precision: str = "fp32", device: torch.device | None = None,
                 loss: str = "ce") -> None:
        self.model, self.optimizer, self.precision = model, optimizer, precision
        self.loss_name = check_loss(loss)
        self.device = torch.device("cpu") if device is None else device
        self.dtype = training_precision(precision, self.device)
        if self.dtype == torch.bfloat16 and self.device.type == "cpu":
            from ..engine.backends import cpu_features

            if not cpu_features()["bf16"]:
                log.warning("precision=bf16 on a CPU without bfloat16 units (AVX-512 bf16, "
                            "AMX): computed by emulation, likely slower than fp32")
        self.fmt = memory_format(model_geometry(model).ndim)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        # deep supervision (U-Net++): the loss averages every head's
        self.forward_module: nn.Module = (
            _Supervised(model) if getattr(model, "deep_supervision", False)
            and hasattr(model, "supervised_outputs") else model)
        self.net: Any = self.forward_module
        self.compiled = False

    def loss(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
             net: Any = None) -> torch.Tensor:
        """The weighted loss of a batch through ``net`` (default :attr:`net`), with graph."""
        net = self.net if net is None else net  # never `net or ...`: a compiled module has no len()
        context = (contextlib.nullcontext() if self.dtype is None
                   else torch.autocast(self.device.type, dtype=self.dtype))
        with context:
            logits = net(x.contiguous(memory_format=self.fmt))
            return training_loss(self.loss_name, logits, y, w)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """One step on the batch ``x`` ``(B, C, *window)``, ``y``, ``w`` ``(B, *out)``; its loss."""
        loss = self.loss(x, y, w)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()

    def compile(self, batch_size: int, window: int | Sequence[int]) -> bool:
        """Wrap the model in ``torch.compile(dynamic=False)`` and compile it now.

        One trial forward and backward pass on a seeded random batch of the training
        shape compiles both graphs; it leaves no trace (the torch random state, the
        model's buffers and its gradients are restored; the optimiser does not step).
        Compiled kernels are cached on disk with inference's
        (:func:`tilerseg.engine.backends.torch_compile_cache`), so a later start, e.g. a
        resumed run, loads more than it compiles. If compilation fails, the steps stay
        eager and a warning names the error. Returns :attr:`compiled`.
        """
        from ..engine.backends import torch_compile_cache

        model = self.model
        g = model_geometry(model)
        sides = (window,) * g.ndim if isinstance(window, int) else tuple(window)
        out = tuple(n - 2 * h for n, h in zip(sides, g.halo))
        generator = torch.Generator().manual_seed(0)
        x = torch.rand((batch_size, g.in_channels, *sides), generator=generator)
        y = torch.zeros((batch_size, *out), dtype=torch.int64)
        w = torch.ones((batch_size, *out))
        start = time.perf_counter()
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        try:
            log.info("torch.compile: compiled kernels are cached in %s", torch_compile_cache())
            with torch.random.fork_rng(devices=[]):
                wrapped = torch.compile(self.forward_module, dynamic=False)
                self.loss(x, y, w, net=wrapped).backward()
        except Exception as err:  # noqa: BLE001 - compilers fail in many ways; fall back
            first = str(err).splitlines()[0] if str(err) else ""
            if strict_runtime():
                raise RuntimeFallbackError(
                    f"torch.compile failed for training ({type(err).__name__}: {first}); "
                    f"{STRICT_RUNTIME}=1 forbids training eagerly") from err
            log.warning("torch.compile failed for training (%s: %s); training eagerly",
                        type(err).__name__, first)
            return False
        finally:
            with torch.no_grad():
                for name, b in model.named_buffers():
                    b.copy_(buffers[name])
            for p in model.parameters():
                p.grad = None
        self.net, self.compiled = wrapped, True
        log.info("compiled the model for training with torch.compile in %.1f s",
                 time.perf_counter() - start)
        return True


class _Supervised(nn.Module):
    """``model.supervised_outputs`` as a module's forward (so that it compiles)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.supervised_outputs(x)


def _save_state(out: Path, optimizer: torch.optim.Optimizer, schedule: Any,
                scaler: torch.amp.GradScaler, state: dict[str, Any]) -> None:
    torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict(), "torch_rng": torch.get_rng_state()},
               out / "optimizer.pt")
    (out / "state.json").write_text(json.dumps(state, indent=1))


def _warm_start(model: nn.Module, init: str) -> None:
    """Load the weights of the model file ``init`` into ``model`` (same architecture).

    Raises
    ------
    InvalidModelError
        ``init`` is another architecture or configuration.
    """
    start = load_model(init)

    def layout(m: nn.Module) -> tuple[Any, ...]:
        """Architecture, configuration (but dropout, which only training uses) and the
        weights' names and shapes."""
        config = {k: v for k, v in (getattr(m, "config", None) or {}).items()
                  if k != "dropout"}
        return (getattr(m, "registry_name", type(m).__name__), sorted(config.items()),
                *((k, tuple(v.shape)) for k, v in m.state_dict().items()))

    if layout(start) != layout(model):
        raise InvalidModelError(
            f"--init {init}: its model ({getattr(start, 'registry_name', '?')} "
            f"{getattr(start, 'config', {})}) is not the one trained here "
            f"({getattr(model, 'registry_name', '?')} {getattr(model, 'config', {})}); give "
            "the same --arch, --depth, --base-channels...")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v
                           for k, v in start.state_dict().items()})
    log.info("training starts from the weights of %s", init)


def train(
    train_pairs: Sequence[Pair],
    out_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    *,
    val_pairs: Sequence[Pair] = (),
    resume: bool = False,
    progress: TrainProgress | None = None,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train a model with the U-Net paper's recipe; checkpoints go to ``out_dir``.

    Trains 2D models on image/mask pairs and 3D models (e.g. ``unet3d``) on
    volume/label pairs alike; the model's dimensions must be the data's.

    Writes ``last.pt`` (after every epoch), ``best.pt`` (lowest validation pixel error in
    2D, highest mean foreground Dice in 3D, or the last if there is no validation set), ``optimizer.pt`` and ``state.json``
    (epoch, history, random state) so that ``resume=True`` continues exactly.

    Parameters
    ----------
    train_pairs : sequence of Pair
        Training images and class maps (see :func:`tilerseg.train.load_pairs`).
    out_dir : path
        Checkpoint folder (created).
    config : TrainConfig
        The run's settings.
    val_pairs : sequence of Pair
        Held-out images, segmented whole by the tiled engine after every epoch. 2D:
        ISBI-style pixel and Rand error, best over thresholds (the tuned threshold is
        stored with the model); 3D: Dice per foreground class and their mean
        (:func:`tilerseg.train.validation.validate_dice`).
    resume : bool
        Continue from ``out_dir``'s last checkpoint.
    progress : callable, optional
        ``progress(epoch, step, steps_per_epoch, running_loss)`` after every step.
    metadata : dict, optional
        Extra plain values stored with the model files.

    Returns
    -------
    dict
        ``{"history": [...per epoch...], "best": {...}, "compiled": bool}``; ``compiled``
        says whether the steps of this call ran through ``torch.compile``.
    """
    config = config or TrainConfig()
    device = torch.device("cpu")  # training runs on the CPU
    training_precision(config.precision, device)  # refused before any work
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    if resume and config.init is not None:
        raise InvalidArgumentError(
            f"--init {config.init} starts a new run and --resume continues one in {out}; "
            "give one")
    if resume:
        model = load_model(out / "last.pt")
        model.train()
        state = json.loads((out / "state.json").read_text())
    else:
        model = create_model(**{"name": "unet", **config.model})
        if config.init is not None:
            _warm_start(model, config.init)
        state = {"epoch": 0, "history": [], "best": None, "config": dataclasses.asdict(config)}
    g = model_geometry(model)
    ndim = g.ndim
    for pair in [*train_pairs, *val_pairs]:
        if pair.ndim != ndim:
            raise InvalidModelError(
                f"model {config.model.get('name', 'unet')!r} is {ndim}D but {pair.name} is "
                f"{pair.ndim}D (mask {pair.mask.shape}); train a {pair.ndim}D model "
                f"({'--arch unet3d' if pair.ndim == 3 else '--arch unet'}) or give "
                f"{ndim}D data")
        if pair.image.shape[0] != g.in_channels:
            raise InvalidImageError(
                f"image {pair.name} has {pair.image.shape[0]} channels but the model takes "
                f"{g.in_channels}; set the model's in_channels")
    loss_name = config.loss or ("dice+ce" if ndim == 3 else "ce")
    normalize = training_normalize(config.normalize, ndim)
    norms = [pair_normalization(p, normalize) for p in train_pairs]
    val_norms = [pair_normalization(p, normalize) for p in val_pairs]
    num_classes = g.out_channels
    classes = max(2, num_classes)
    for pair in [*train_pairs, *val_pairs]:
        if int(pair.mask.max(initial=0)) >= classes:
            raise InvalidImageError(
                f"mask of {pair.name} has class {int(pair.mask.max())} but the model has "
                f"{classes} classes; set the model's num_classes")
    weights = None
    if config.weight_map:
        cw = class_weights([p.mask for p in train_pairs], classes)
        weights = [weight_map(p.mask, cw, config.foreground_class, config.w0, config.sigma,
                              spacing=p.relative_spacing() if ndim == 3 else None)
                   for p in train_pairs]
    windows = training_window(g, config.window)
    outs = tuple(w - 2 * h for w, h in zip(windows, g.halo))
    if min(outs) < 1:
        least = tuple(g.admissible_input(2 * h + 1, a) for a, h in enumerate(g.halo))
        raise InvalidArgumentError(
            f"window={config.window} leaves no output for this model (halo "
            f"{one_side(g.halo)} px on each side); use a window of at least {one_side(least)}")
    sampler = PatchSampler(train_pairs, weights, model, windows, config, rng, norms=norms)
    for pair in [*train_pairs, *val_pairs]:
        if any(n < o for n, o in zip(pair.mask.shape, outs)):
            raise InvalidImageError(
                f"image {pair.name} is {pair.mask.shape}, smaller than one training tile "
                f"({sampler.out} px output from {sampler.window} px windows); use a smaller "
                "--window"
            )
    lr = config.lr or (1e-3 if config.optimizer == "adam" else 1e-2)
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=config.momentum)
    total_steps = config.epochs * config.steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))
    )
    if resume:
        saved = torch.load(out / "optimizer.pt", weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["torch_rng"])
        schedule.load_state_dict(saved["schedule"])
        rng.bit_generator.state = state["numpy_rng"]
    model.to(memory_format=memory_format(ndim))
    step_once = TrainStep(model, optimizer, config.precision, device, loss=loss_name)
    if resume and saved.get("scaler"):  # fp16's loss scale (an empty dict when disabled)
        step_once.scaler.load_state_dict(saved["scaler"])
    if config.compile and state["epoch"] < config.epochs:
        step_once.compile(config.batch_size, sampler.windows)
    compiled = step_once.compiled
    info: dict[str, Any] = {"window": sampler.window, "output": sampler.out,
                            "train_images": len(train_pairs), "val_images": len(val_pairs)}
    info["normalization"] = training_normalization(sampler.norms, train_pairs)
    if ndim == 3:
        info.update(loss=loss_name, foreground=sampler.foreground,
                    spacing={p.name: None if p.spacing is None else list(p.spacing)
                             for p in train_pairs})
    # validation tiles (no gradients): the training output, or 16 x 64 x 64 where that is
    # more, rounded down to the pooling grid
    val_tile = tuple(max(s, o - o % s) for o, s in zip(
        (max(o, d) for o, d in zip(outs, DEFAULT_OUTPUT_3D)), g.step))
    log.info("training %s on %d tiles of %s px per step (%s%s): %s", config.model,
             config.batch_size, sampler.window, config.precision,
             ", compiled" if compiled else "", info)
    for epoch in range(state["epoch"], config.epochs):
        model.train()
        start, running = time.perf_counter(), None
        for step in range(config.steps_per_epoch):
            loss = step_once(*sampler.batch(config.batch_size))
            schedule.step()
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            if progress is not None:
                progress(epoch + 1, step + 1, config.steps_per_epoch, running)
        record = {"epoch": epoch + 1, "loss": running, "seconds": time.perf_counter() - start,
                  "lr": schedule.get_last_lr()[0]}
        if val_pairs:
            model.eval()
            if ndim == 3:
                record.update(validate_dice(model, val_pairs, val_norms, val_tile))
            else:
                record.update(validate_pixels(model, val_pairs, config.foreground_class,
                                              val_norms))
        state["history"].append(record)
        state["epoch"] = epoch + 1
        state["numpy_rng"] = rng.bit_generator.state
        meta = {**(metadata or {}), "normalize": normalize,
                "foreground_class": config.foreground_class,
                "training": {**info, "epochs": epoch + 1, "config": dataclasses.asdict(config)}}
        if "pixel_threshold" in record:
            meta["threshold"] = record["pixel_threshold"]
            meta["validation"] = {k: record[k] for k in ("pixel_error", "pixel_threshold",
                                                         "rand_error", "rand_threshold")}
        if "mean_dice" in record:
            meta["validation"] = {k: v for k, v in record.items() if k.endswith("dice")
                                  or k.startswith("dice_")}
        save_model(model, out / "last.pt", metadata=meta)
        if better(record, state["best"]) or not val_pairs:
            state["best"] = record
            save_model(model, out / "best.pt", metadata=meta)
        _save_state(out, optimizer, schedule, step_once.scaler, state)
        log.info("epoch %d: %s", epoch + 1, record)
    return {"history": state["history"], "best": state["best"], "compiled": compiled}

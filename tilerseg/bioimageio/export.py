"""Write a tilerseg model as a bioimage.io model package (spec 0.5): :func:`export_bioimageio`.

The package holds the network wrapped to map a block of the input to an output of the
block's size with the context as the output's ``halo``
(:class:`~tilerseg.bioimageio.network.TiledNetwork`), so that bioimageio.core can run it
blockwise with tilerseg's exact result: its PyTorch state dict with the architecture as one
self-contained source file, and TorchScript weights of the same wrapper; the tensors' axes
and sizes from the model's geometry (see :func:`tilerseg.bioimageio.sizes.block_sizes`),
mirror padding (``reflect``) for the input, tilerseg's normalisation as fixed
preprocessing and its sigmoid/softmax as postprocessing (see
:mod:`tilerseg.bioimageio.processing`), a test input and output, a cover image and a
README.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InvalidArgumentError, InvalidModelError
from ..geometry import ModelGeometry
from ..normalize import NormalizeSpec, resolve_normalization
from .load import require_spec
from .processing import _affine, exportable, input_dtype, preprocessing_steps
from .network import EMBEDDED, TiledNetwork, architecture_source
from .sizes import AxisSizes, block_sizes

__all__ = ["export_bioimageio", "validate_package", "CITATIONS"]

log = logging.getLogger(__name__)

_UNET = ("Ronneberger, O., Fischer, P., Brox, T. (2015). U-Net: Convolutional Networks for "
         "Biomedical Image Segmentation. MICCAI 2015.", "10.1007/978-3-319-24574-4_28")
CITATIONS = {
    "unet": [_UNET],
    "unet-keras": [_UNET],
    "unet3d": [_UNET, ("Cicek, O., Abdulkadir, A., Lienkamp, S. S., Brox, T., Ronneberger, O. "
                       "(2016). 3D U-Net: Learning Dense Volumetric Segmentation from Sparse "
                       "Annotation. MICCAI 2016.", "10.1007/978-3-319-46723-8_49")],
    "unetpp": [_UNET, ("Zhou, Z., Rahman Siddiquee, M. M., Tajbakhsh, N., Liang, J. (2018). "
                       "UNet++: A Nested U-Net Architecture for Medical Image Segmentation. "
                       "DLMIA 2018.", "10.1007/978-3-030-00889-5_1")],
    "fcn8s": [_UNET, ("Long, J., Shelhamer, E., Darrell, T. (2015). Fully Convolutional "
                      "Networks for Semantic Segmentation. CVPR 2015.",
                      "10.1109/CVPR.2015.7298965")],
}
"""The papers a package of each architecture cites (text, DOI)."""

ARCHITECTURE = ("tilerseg.models.registry", "create_model")
"""Where the state-dict weights' architecture of packages written by tilerseg before it
wrapped them (:data:`SOURCE`) was imported from (module, callable)."""

SOURCE = ("tilerseg_network.py", "TiledNetwork")
"""The state-dict weights' architecture: the package's source file and its callable (for a
model registered outside tilerseg's own architectures, ``TiledNetwork`` is imported from
``tilerseg.bioimageio.network`` instead)."""


def _plain(value: Any) -> Any:
    """JSON/YAML plain values (tuples as lists, numpy scalars as numbers)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _test_image(geometry: ModelGeometry, sizes: list[AxisSizes], side: int | None,
                normalize: NormalizeSpec) -> np.ndarray:
    """The test input ``(1, C, *spatial)``: a synthetic membrane image of sides that are
    multiples of the steps, mirror-padded by the halo (an admissible block; its output's
    centre is tilerseg's result for the image)."""
    from ..synthetic import membrane_image

    shape = [-(-max(side or 64, s.step) // s.step) * s.step for s in sizes]
    image, _ = membrane_image(tuple(shape), cell_size=max(8.0, min(shape) / 4), seed=0)
    fixed = _affine(normalize)
    if input_dtype(normalize) == "uint8":
        x = image
    else:
        scale = np.float32(image) / 255
        if fixed is not None:
            low, high = fixed
            scale = np.float32(low) + scale * np.float32(high - low)
        x = scale.astype(np.float32)
    x = np.repeat(x[None, None], geometry.in_channels, axis=1)
    padded = np.pad(x, [(0, 0), (0, 0), *((s.halo, s.halo) for s in sizes)], mode="reflect")
    return np.ascontiguousarray(padded)


def _probabilities(model: nn.Module, x: np.ndarray, normalize: NormalizeSpec) -> np.ndarray:
    """What ``model`` (the wrapped network) gives for the test input: normalised, logits,
    sigmoid/softmax."""
    spec = (0.0, 255.0) if input_dtype(normalize) == "uint8" else normalize
    norm = resolve_normalization(spec, x.dtype, lambda: x)
    with torch.no_grad():
        y = model(torch.from_numpy(norm(x)))
        y = torch.sigmoid(y) if y.shape[1] == 1 else torch.softmax(y, dim=1)
    return y.numpy().astype(np.float32)


def _wrapped(model: nn.Module, geometry: ModelGeometry, sizes: list[AxisSizes],
             network: nn.Module | None = None) -> tuple[TiledNetwork, dict[str, Any]]:
    """``model`` (or ``network``, e.g. its trace) as the package's network, and the
    keyword arguments that rebuild it."""
    embedded = type(model).__name__
    kwargs = _plain({
        "architecture": embedded if EMBEDDED.get(embedded) is type(model) else
        model.registry_name, "config": model.config,
        "halo": [s.halo for s in sizes], "context": list(geometry.halo),
        "crop": [geometry.crop_offset(a) for a in range(geometry.ndim)],
        "step": list(geometry.step), "min_input": list(geometry.min_input)})
    return TiledNetwork(**kwargs, network=network if network is not None else model), kwargs


def _torchscript(model: nn.Module, geometry: ModelGeometry, sizes: list[AxisSizes],
                 block: tuple[int, ...], path: Path) -> None:
    """Trace the network, wrap the trace and script the wrapper; check the trace at a
    second, larger admissible size and the scripted wrapper against the wrapped network
    at two block sizes."""
    def rand(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.rand(1, geometry.in_channels, *shape,
                          generator=torch.Generator().manual_seed(0))

    def check(expected: torch.Tensor, got: torch.Tensor, what: str) -> None:
        if expected.shape != got.shape or not torch.allclose(expected, got, atol=1e-5,
                                                             rtol=0):
            raise InvalidModelError(
                f"the TorchScript {what} of {type(model).__name__} does not reproduce it at "
                f"input {tuple(got.shape[2:])}; it cannot be exported")

    window = tuple(geometry.admissible_input(n - 2 * (s.halo - h), a)
                   for a, (n, s, h) in enumerate(zip(block, sizes, geometry.halo)))
    wrapper, _ = _wrapped(model, geometry, sizes)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings
        traced = torch.jit.trace(model, rand(window), check_trace=False)
        bigger = rand(tuple(n + s.step for n, s in zip(window, sizes)))
        check(model(bigger), traced(bigger), "trace")
        scripted = torch.jit.script(_wrapped(model, geometry, sizes, traced)[0])
        for shape in (block, tuple(n + s.step for n, s in zip(block, sizes))):
            check(wrapper(rand(shape)), scripted(rand(shape)), "wrapper")
        torch.jit.save(scripted, str(path))


def _check_source(model: nn.Module, source: Path, kwargs: dict[str, Any],
                  x: torch.Tensor) -> None:
    """The package's architecture file, run as it stands, rebuilds the wrapped network."""
    module = types.ModuleType("tilerseg_package_network")
    try:
        exec(compile(source.read_text(), str(source), "exec"), module.__dict__)
        rebuilt = getattr(module, SOURCE[1])(**kwargs).eval()
        rebuilt.network.load_state_dict(model.state_dict(), strict=True)
        with torch.no_grad():
            same = torch.allclose(rebuilt(x), TiledNetwork(**kwargs, network=model)(x),
                                  atol=1e-6, rtol=0)
    except Exception as exc:  # noqa: BLE001 - any failure means the file cannot be shipped
        raise InvalidModelError(f"the architecture source written for {type(model).__name__} "
                                f"does not rebuild it ({exc})") from None
    if not same:
        raise InvalidModelError(f"the architecture source written for {type(model).__name__} "
                                "does not reproduce it; it cannot be exported")


def _cover(x: np.ndarray, y: np.ndarray, halo: tuple[int, ...], foreground: int,
           path: Path) -> None:
    """Input and foreground probability side by side (the output's centre, without the
    halo, and the input there)."""
    import imageio.v3 as iio

    crop = tuple(slice(h, n - h) for h, n in zip(halo, x.shape[2:]))
    image = x[0, 0][crop].astype(np.float64)
    prob = y[0, min(foreground, y.shape[1] - 1)][crop].astype(np.float64)
    while image.ndim > 2:  # a volume: its middle plane
        image, prob = image[image.shape[0] // 2], prob[prob.shape[0] // 2]
    low, high = float(image.min()), float(image.max())
    grey = (image - low) / (high - low) if high > low else np.zeros_like(image)
    both = np.concatenate([grey, prob], axis=1)
    iio.imwrite(path, np.round(np.clip(both, 0, 1) * 255).astype(np.uint8))


def _readme(name: str, description: str, architecture: str, config: dict,
            geometry: ModelGeometry, sizes: list[AxisSizes], normalize: NormalizeSpec,
            metadata: dict, classes: list[str]) -> str:
    """The package's documentation (Markdown)."""
    axes = ", ".join(s.id for s in sizes)
    lines = [
        f"# {name}", "", description, "",
        "Exported by tilerseg. It is a fully convolutional network: it runs on blocks of any "
        "admissible size, and blocks that overlap by the halo give exactly the result of one "
        "pass over the whole image.", "",
        "## Architecture", "",
        f"`{architecture}` of tilerseg, configuration:", "",
        "```", *(f"{k}: {v}" for k, v in config.items()), "```", "",
        f"The state-dict weights' architecture is `{SOURCE[1]}` in `{SOURCE[0]}` (in this "
        "package; it needs only torch): the network wrapped to map a block of the input to "
        "an output of the block's size whose outer halo is to be cropped. The TorchScript "
        "weights are the same wrapper around a trace of the network, checked at a second "
        "size.", "",
        "## Inputs and outputs", "",
        f"Input `input`: batch, {geometry.in_channels} channel(s), spatial axes {axes}. "
        f"Output `output`: batch, {geometry.out_channels} channel(s) "
        f"({', '.join(classes)}), the same spatial axes and sizes.", "",
        "| axis | admissible block sides | halo to crop | network context |",
        "|---|---|---|---|",
        *(f"| {s.id} | {s.min} + n * {s.step} | {s.halo} | {h} |"
          for s, h in zip(sizes, geometry.halo)),
        "",
        "## Tiling it exactly", "",
        "Blocks of an admissible side `N` whose inner regions (`N` minus the halo on both "
        "sides) start at multiples of the step "
        f"({', '.join(str(s.step) for s in sizes)} px on axes {axes}), read with the halo "
        "around them, mirror-padded (numpy `mode='reflect'`, as the input's `pad` declares) "
        "beyond the image, give outputs whose inner regions are exactly the result of one "
        "pass over the whole mirror-padded image. bioimageio.core's blockwise prediction "
        "(`predict(..., blocksize_parameter=n)`) cuts such blocks from an image whose sides "
        "are admissible block sides (so multiples of the step); it refuses other images. "
        "The halo covers the network's context and puts every block's window on the "
        "network's pooling grid; the halo of each output holds zero logits. "
        "`tilerseg run IMAGE --model THIS.zip` tiles images of any size.", "",
        "## Normalisation and outputs", "",
    ]
    if input_dtype(normalize) == "uint8":
        lines.append("8-bit input, scaled by 1/255 (`scale_linear`), as in training.")
    elif isinstance(normalize, tuple) and normalize[0] == "window":
        lines.append(f"A display window of centre {normalize[1]:g} and width {normalize[2]:g}: "
                     "values in it map to 0..1 (`scale_linear`), values outside are clipped "
                     "(`clip`).")
    elif isinstance(normalize, (tuple, list)):
        lines.append(f"Input values {normalize[0]:g}..{normalize[1]:g} map to 0..1 "
                     "(`scale_linear`).")
    elif normalize in (None, False, "none"):
        lines.append("Input used as it is (float32).")
    else:
        lines.append(f"Input normalised by global statistics ({normalize}): tilerseg computes "
                     "them once over the whole image.")
    lines += ["", "The output is class probabilities: "
              + ("a sigmoid of the network's one channel." if geometry.out_channels == 1 else
                 "a softmax over the channels of the network's logits."), ""]
    training = metadata.get("training") if isinstance(metadata.get("training"), dict) else None
    if metadata.get("data") or training:
        lines += ["## Training", ""]
        if metadata.get("data"):
            lines.append(f"Data: {metadata['data']}.")
        if training:
            lines.append(f"{training.get('epochs', '?')} epochs, window "
                         f"{training.get('window', '?')} px.")
        lines.append("")
    validation = metadata.get("validation")
    lines += ["## Validation", ""]
    if isinstance(validation, dict) and validation:
        lines += ["Figures on the validation images, from the model's metadata:", "",
                  "| figure | value |", "|---|---|",
                  *(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                    for k, v in validation.items()), ""]
    else:
        lines += ["The model's metadata records no validation figures.", ""]
    lines += ["The test output is what tilerseg computes for the test input.", ""]
    if metadata.get("threshold") is not None:
        lines += [f"Foreground threshold tuned on validation: {metadata['threshold']}.", ""]
    return "\n".join(lines) + "\n"


def _stated_normalization(metadata: dict) -> NormalizeSpec:
    """The model's own normalisation, for a package: ``"auto"`` only where its training
    data are recorded as 8-bit (what ``"auto"`` is exported as)."""
    stated = metadata.get("normalize")
    if stated is not None and stated != "auto" and stated is not True:
        return stated
    training = metadata.get("training")
    record = training.get("normalization") if isinstance(training, dict) else None
    if isinstance(record, dict) and record.get("dtypes") == ["uint8"] \
            and record.get("method") == "range":
        return "auto"
    what = ("states no normalisation" if stated is None else
            "states normalize='auto' (normalised by the images' dtype) but "
            + ("its training data were " + ", ".join(map(str, record.get("dtypes") or ["?"]))
               + " images" if isinstance(record, dict) else "does not record its training "
               "data's dtype"))
    eight_bit = isinstance(record, dict) and "uint8" in (record.get("dtypes") or [])
    raise InvalidArgumentError(
        f"the model {what}, so the package's input cannot be stated; pass --normalize "
        "(CLI) / normalize= (Python): percentile[:LOW:HIGH], meanstd, LOW,HIGH / (low, high), "
        "window:CENTRE,WIDTH / ('window', centre, width), none"
        + (" or auto (its 8-bit input scaled by 1/255)" if eight_bit else ""))


def export_bioimageio(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    name: str | None = None,
    description: str | None = None,
    authors: list[str] | None = None,
    license: str | None = None,
    normalize: NormalizeSpec = None,
    test_size: int | None = None,
    cover: str | os.PathLike | None = None,
    tags: list[str] | None = None,
) -> Path:
    """Write ``model`` as a bioimage.io model package (spec 0.5, a ``.zip``).

    Parameters
    ----------
    model : torch.nn.Module
        A model built by :func:`tilerseg.create_model` or loaded by
        :func:`tilerseg.load_model` (it needs ``registry_name`` and ``config``).
    path : str or os.PathLike
        The package to write (conventionally ``*.zip``); replaced if it exists.
    name, description : str, optional
        Default: from the architecture and the model's metadata.
    authors : list of str, optional
        Author names (default: ``["tilerseg"]``).
    license : str, optional
        SPDX licence id; default the model's metadata ``license``, else ``"CC-BY-4.0"``.
    normalize : "auto", "none", "percentile", "percentile:LOW:HIGH", "meanstd", (low, high) or ("window", centre, width), optional
        The input normalisation; ``"auto"`` is exported as 8-bit input scaled by 1/255.
        Default the model's metadata ``normalize``, where it is ``"auto"`` only if the
        model's training data are recorded as 8-bit (``metadata["training"]
        ["normalization"]``, written by :func:`tilerseg.train.train`; the bundled model
        has it): otherwise ``normalize`` must be given.
    test_size : int, optional
        Side of the test input (rounded up to an admissible size; default 64 or the
        smallest admissible).
    cover : str or os.PathLike, optional
        A PNG/JPEG cover; default input and output of the test side by side.
    tags : list of str, optional
        Extra tags.

    Returns
    -------
    pathlib.Path
        The written package; it validates with ``bioimageio.spec`` (see
        :func:`validate_package`).

    Raises
    ------
    InvalidModelError
        A model that is not registered, or whose trace differs from it.
    InvalidArgumentError
        An unusable option (name, licence, test size, cover, a normalisation a package
        cannot state), or no ``normalize`` where the model does not say what it saw.

    Examples
    --------
    >>> import os, tempfile, tilerseg
    >>> from tilerseg.bioimageio import export_bioimageio, load_bioimageio
    >>> model = tilerseg.create_model(base_channels=2, depth=2)
    >>> package = export_bioimageio(model, os.path.join(tempfile.mkdtemp(), "unet.zip"),
    ...                             normalize="auto")
    >>> validate_package(package)
    'valid-format'
    >>> load_bioimageio(package).config == model.config
    True
    """
    require_spec()
    from .. import __version__
    from ..models.probe import eval_mode, model_geometry

    architecture, config = getattr(model, "registry_name", None), getattr(model, "config", None)
    if not isinstance(architecture, str) or not isinstance(config, dict):
        raise InvalidModelError(
            f"cannot export {type(model).__name__}: only models built by create_model() or "
            "loaded by load_model() (with registry_name and config) can be exported")
    if test_size is not None and (isinstance(test_size, bool) or not isinstance(test_size, int)
                                  or test_size < 1):
        raise InvalidArgumentError(f"test_size={test_size!r} must be a positive integer")
    metadata = dict(getattr(model, "metadata", None) or {})
    if normalize is None:
        normalize = _stated_normalization(metadata)
    normalize = exportable(normalize)
    with eval_mode(model):
        geometry = model_geometry(model)
    sizes = block_sizes(geometry)
    classes = metadata.get("classes")
    if not (isinstance(classes, list) and len(classes) == geometry.out_channels):
        classes = [f"class{c}" for c in range(geometry.out_channels)]
    name = name or metadata.get("name") or f"tilerseg {architecture}"
    description = description or (
        f"A {geometry.ndim}D {architecture} segmentation network exported by tilerseg "
        f"{__version__}: {geometry.out_channels} class probabilities per pixel"
        + (f", trained on {metadata['data']}" if metadata.get("data") else "") + ".")
    license = license or metadata.get("license") or "CC-BY-4.0"
    out = Path(path)
    if out.is_dir():
        raise InvalidArgumentError(f"the package path {str(out)!r} is a folder")
    with eval_mode(model):
        _write(model, out, root_args=(architecture, config, geometry, sizes, classes, name,
                                      description, license, authors, normalize, metadata,
                                      test_size, cover, tags))
    log.info("wrote the bioimage.io package %s", out)
    return out


def _write(model: nn.Module, out: Path, root_args: tuple) -> None:
    """Write the package (see :func:`export_bioimageio`)."""
    from bioimageio.spec import ValidationContext, save_bioimageio_package
    from bioimageio.spec.model import v0_5 as bio
    from pydantic import ValidationError

    from .. import __version__

    (architecture, config, geometry, sizes, classes, name, description, license, authors,
     normalize, metadata, test_size, cover, tags) = root_args
    with tempfile.TemporaryDirectory(prefix="tilerseg-bioimageio-") as tmp:
        root = Path(tmp)
        x = _test_image(geometry, sizes, test_size, normalize)
        wrapper, kwargs = _wrapped(model, geometry, sizes)
        y = _probabilities(wrapper, x, normalize)
        np.save(root / "test_input.npy", x)
        np.save(root / "test_output.npy", y)
        torch.save({k: v.detach().cpu().contiguous() for k, v in wrapper.state_dict().items()},
                   root / "weights.pt")
        _torchscript(model, geometry, sizes, x.shape[2:], root / "weights_torchscript.pt")
        if kwargs["architecture"] in EMBEDDED:
            (root / SOURCE[0]).write_text(architecture_source())
            _check_source(model, root / SOURCE[0], kwargs,
                          torch.rand(1, geometry.in_channels, *x.shape[2:],
                                     generator=torch.Generator().manual_seed(1)))
            arch: Any = bio.ArchitectureFromFileDescr(
                source=root / SOURCE[0], callable=bio.Identifier(SOURCE[1]), kwargs=kwargs)
        else:  # registered outside tilerseg's architectures: it needs tilerseg and the model
            arch = bio.ArchitectureFromLibraryDescr(
                import_from=TiledNetwork.__module__, callable=bio.Identifier(SOURCE[1]),
                kwargs=kwargs)
        if cover is None:
            cover_path = root / "cover.png"
            _cover(x, y, tuple(s.halo for s in sizes), int(metadata.get("foreground_class", 1)),
                   cover_path)
        else:
            cover_path = Path(cover)
            if not cover_path.is_file() or cover_path.suffix.lower() not in (".png", ".jpg",
                                                                             ".jpeg", ".gif"):
                raise InvalidArgumentError(
                    f"cover={str(cover)!r} must be an existing PNG, JPEG or GIF file")
        (root / "README.md").write_text(_readme(name, description, architecture, config,
                                                geometry, sizes, normalize, metadata, classes))
        tensor = bio.TensorId("input")
        in_axes: list[Any] = [bio.BatchAxis(), bio.ChannelAxis(channel_names=[
            bio.Identifier(f"channel{c}") for c in range(geometry.in_channels)])]
        out_axes: list[Any] = [bio.BatchAxis(), bio.ChannelAxis(channel_names=[
            bio.Identifier(c) for c in _identifiers(classes)])]
        for s in sizes:
            in_axes.append(bio.SpaceInputAxis(
                id=bio.AxisId(s.id), size=bio.ParameterizedSize(min=s.min, step=s.step)))
            ref = bio.SizeReference(tensor_id=tensor, axis_id=bio.AxisId(s.id), offset=s.offset)
            out_axes.append(bio.SpaceOutputAxisWithHalo(id=bio.AxisId(s.id), size=ref, halo=s.halo)
                            if s.halo > 0 else bio.SpaceOutputAxis(id=bio.AxisId(s.id), size=ref))
        dtype = input_dtype(normalize)
        with ValidationContext(root=root, perform_io_checks=True), _one_line(ValidationError):
            inputs = [bio.InputTensorDescr(
                id=tensor, axes=in_axes, test_tensor=bio.FileDescr(source=root / "test_input.npy"),
                data=bio.IntervalOrRatioDataDescr(type=dtype),
                pad=bio.ReflectPadding(mode="reflect"),  # "mode" given: it is written out
                preprocessing=preprocessing_steps(normalize),
                description="image; " + ("8-bit" if dtype == "uint8" else "float32"))]
            post = (bio.SigmoidDescr() if geometry.out_channels == 1 else
                    bio.SoftmaxDescr(kwargs=bio.SoftmaxKwargs(axis=bio.AxisId("channel"))))
            outputs = [bio.OutputTensorDescr(
                id=bio.TensorId("output"), axes=out_axes,
                test_tensor=bio.FileDescr(source=root / "test_output.npy"),
                data=bio.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
                postprocessing=[post], description="class probabilities")]
            torch_version = bio.Version(torch.__version__.split("+")[0])
            weights = bio.WeightsDescr(
                pytorch_state_dict=bio.PytorchStateDictWeightsDescr(
                    source=root / "weights.pt", architecture=arch,
                    pytorch_version=torch_version),
                torchscript=bio.TorchscriptWeightsDescr(
                    source=root / "weights_torchscript.pt", pytorch_version=torch_version,
                    parent="pytorch_state_dict",
                    comment="the wrapper scripted around a trace of the network"))
            descr = bio.ModelDescr(
                name=name, description=description,
                authors=[bio.Author(name=a) for a in (authors or ["tilerseg"])],
                cite=[bio.CiteEntry(text=t, doi=bio.Doi(d))
                      for t, d in CITATIONS.get(architecture, [_UNET])],
                license=license,
                tags=["tilerseg", "segmentation", "unet" if "unet" in architecture else
                      architecture, f"{geometry.ndim}d", *(tags or [])],
                documentation=bio.FileDescr(source=root / "README.md"),
                covers=[bio.FileDescr(source=cover_path)],
                inputs=inputs, outputs=outputs, weights=weights,
                config={"tilerseg": _plain({
                    "version": __version__, "architecture": architecture, "config": config,
                    "geometry": geometry.as_dict(), "normalize": normalize,
                    "metadata": {k: v for k, v in metadata.items() if k != "normalize"}})})
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(f".{out.name}.partial")
        save_bioimageio_package(descr, output_path=partial)
        os.replace(partial, out)


@contextlib.contextmanager
def _one_line(validation_error: type) -> Iterator[None]:
    """bioimageio.spec's refusal of a field (name, licence...) as one InvalidArgumentError."""
    try:
        yield
    except validation_error as exc:
        first = exc.errors()[0] if exc.errors() else {}
        loc = first.get("loc") or (getattr(exc, "title", "the package"),)
        where = str(loc[0])  # the field (the rest names pydantic's validators)
        value = first.get("input")
        shown = f" {value!r}" if isinstance(value, (str, int, float)) else ""
        raise InvalidArgumentError(
            f"{where}{shown} is not accepted by bioimage.io: "
            f"{_shorten(str(first.get('msg', str(exc).splitlines()[0])))}") from None


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit].rsplit(",", 1)[0] + ", ..."


def _identifier(text: str) -> str:
    """A bioimage.io identifier (letters, digits, underscores) of a class name."""
    ident = "".join(c if c.isalnum() or c == "_" else "_" for c in str(text)).strip("_")
    return ident if ident and not ident[0].isdigit() else f"c_{ident}"


def _identifiers(names: list[str]) -> list[str]:
    """Distinct identifiers of class names (``_2``, ``_3``... added where they coincide).

    Examples
    --------
    >>> _identifiers(["a b", "a_b", "c"])
    ['a_b', 'a_b_2', 'c']
    """
    out: list[str] = []
    for name in names:
        ident, k = _identifier(name), 1
        while (ident if k == 1 else f"{ident}_{k}") in out:
            k += 1
        out.append(ident if k == 1 else f"{ident}_{k}")
    return out


def validate_package(path: str | os.PathLike) -> str:
    """Validate a bioimage.io package with ``bioimageio.spec``; return its status.

    Format validation with the files' checksums checked (``perform_io_checks``); it
    reads the package only, nothing from the network. The model itself is not run
    (that is ``bioimageio.core``'s test).

    Parameters
    ----------
    path : str or os.PathLike
        A ``.zip`` package, an unpacked folder or its ``rdf.yaml``/``bioimageio.yaml``.

    Returns
    -------
    str
        ``"valid-format"`` (or ``"passed"``).

    Raises
    ------
    InvalidModelError
        The package does not validate; the first error is named.

    Examples
    --------
    >>> import os, tempfile, tilerseg
    >>> model = tilerseg.create_model("unet-keras", base_channels=2, depth=2)
    >>> validate_package(export_bioimageio(model, os.path.join(tempfile.mkdtemp(), "k.zip"),
    ...                                    normalize="none"))
    'valid-format'
    """
    require_spec()
    from bioimageio.spec import load_description

    descr = load_description(str(path), perform_io_checks=True)
    summary = descr.validation_summary
    if summary.status not in ("valid-format", "passed"):
        errors = [f"{'.'.join(map(str, e.loc))}: {e.msg}" for e in summary.errors]
        raise InvalidModelError(f"{str(path)!r} is not a valid bioimage.io package ("
                                f"{errors[0] if errors else summary.status})")
    return str(summary.status)

"""tilerseg's one global normalisation and its output activation, as bioimage.io pre- and
postprocessing steps, and back.

tilerseg maps every tile by one affine ``(x - low) / (high - low)`` whose ``low, high``
are fixed or computed once from the whole image, and turns the network's logits into
probabilities by a sigmoid (one class) or a softmax over the classes. In bioimage.io:

==========================================  ==========================================
tilerseg                                    bioimage.io 0.5
==========================================  ==========================================
``(low, high)``, 8-bit ``"auto"``           ``scale_linear`` (gain ``1 / (high - low)``,
                                            offset ``-low / (high - low)``)
``("window", centre, width)``               ``scale_linear`` then ``clip`` to [0, 1]
``"percentile:LOW:HIGH"`` (global)          ``scale_range`` (statistics of the sample)
``"meanstd"`` (global)                      ``zero_mean_unit_variance``
sigmoid / softmax of the logits             ``sigmoid`` / ``softmax`` postprocessing
==========================================  ==========================================

A package's statistics steps are computed per sample by bioimage.io; tilerseg computes
them once over the whole image (the image is the sample) so that every tile is mapped
alike, and says so in a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError, InvalidModelError
from ..normalize import _PERCENTILES, NormalizeSpec, _percentile_pair, resolve_normalization

__all__ = ["preprocessing_steps", "input_dtype", "normalization_of", "activation_of",
           "exportable"]

log = logging.getLogger(__name__)


def _is_window(normalize: NormalizeSpec) -> bool:
    return isinstance(normalize, (tuple, list)) and len(normalize) > 0 \
        and normalize[0] == "window"


def exportable(normalize: NormalizeSpec) -> NormalizeSpec:
    """``normalize`` in the form a package can state, checked; a display window as
    ``("window", centre, width)``.

    Raises
    ------
    InvalidArgumentError
        A value tilerseg does not understand, or one a package cannot state: the image's
        own DICOM window, and ``"range"`` (its scale depends on the image's dtype).

    Examples
    --------
    >>> exportable(["window", "soft-tissue"]), exportable([0, 4095])
    (('window', 40.0, 400.0), (0.0, 4095.0))
    """
    if isinstance(normalize, list):
        normalize = tuple(normalize)
    if _is_window(normalize):
        if len(normalize) == 2 and str(normalize[1]).lower() == "dicom":
            raise InvalidArgumentError(
                "normalize=('window', 'dicom') is the image's own window, which a package "
                "cannot state; give its centre and width, ('window', CENTRE, WIDTH)")
        n = resolve_normalization(normalize, np.dtype(np.float32), lambda: None)
        return ("window", (n.low + n.high) / 2, n.high - n.low)
    if normalize == "range":
        raise InvalidArgumentError(
            "normalize='range' scales by the image's dtype (1/255 for uint8, 1/65535 for "
            "uint16), which a package cannot state; give the range, e.g. (0, 255), or 'auto' "
            "for 8-bit input")
    if isinstance(normalize, tuple) and len(normalize) == 2:
        n = resolve_normalization(normalize, np.dtype(np.float32), lambda: None)
        return (n.low, n.high)
    if normalize in (None, False, True, "none", "auto", "percentile", "meanstd") or (
            isinstance(normalize, str) and normalize.startswith("percentile:")):
        if isinstance(normalize, str) and normalize.startswith("percentile:"):
            _percentile_pair(normalize)  # checked
        return normalize
    raise InvalidArgumentError(f"normalize={normalize!r} cannot be exported (expected 'auto', "
                               "'none', 'percentile', 'percentile:LOW:HIGH', 'meanstd', "
                               "(low, high) or ('window', CENTRE, WIDTH))")


def _affine(normalize: NormalizeSpec) -> tuple[float, float] | None:
    """(low, high) of a fixed normalisation or window; None for none; 8-bit for ``"auto"``."""
    if normalize is None or normalize is False or normalize == "none":
        return None
    if normalize is True or normalize == "auto":
        return (0.0, 255.0)  # what tilerseg's "auto" does with 8-bit input
    if _is_window(normalize) and len(normalize) == 3:
        centre, width = float(normalize[1]), float(normalize[2])
        return centre - width / 2, centre + width / 2
    if isinstance(normalize, (tuple, list)) and len(normalize) == 2:
        return float(normalize[0]), float(normalize[1])
    return None


def input_dtype(normalize: NormalizeSpec) -> str:
    """The input tensor's data type: ``uint8`` for tilerseg's 8-bit ``"auto"``, else
    ``float32``.

    Examples
    --------
    >>> input_dtype("auto"), input_dtype((0.0, 4095.0))
    ('uint8', 'float32')
    """
    return "uint8" if normalize is True or normalize == "auto" else "float32"


def preprocessing_steps(normalize: NormalizeSpec) -> list[Any]:
    """The bioimage.io preprocessing of tilerseg's normalisation ``normalize``.

    Parameters
    ----------
    normalize : "auto", "none", "percentile", "percentile:LOW:HIGH", "meanstd", (low, high) or ("window", centre, width)
        ``"auto"`` means 8-bit input scaled by 1/255 (what tilerseg does with 8-bit
        images). A window is scaled, then clipped to [0, 1].

    Returns
    -------
    list
        ``EnsureDtypeDescr`` (float32), the scaling step if any, ``EnsureDtypeDescr``
        (float32).

    Raises
    ------
    InvalidModelError
        A normalisation bioimage.io cannot state.

    Examples
    --------
    >>> [str(step.id) for step in preprocessing_steps("percentile")]
    ['ensure_dtype', 'scale_range', 'ensure_dtype']
    """
    from bioimageio.spec.model import v0_5 as bio

    steps: list[Any] = [bio.EnsureDtypeDescr(kwargs=bio.EnsureDtypeKwargs(dtype="float32"))]
    fixed = _affine(normalize)
    if fixed is not None:
        low, high = fixed
        if not high > low:
            raise InvalidModelError(f"normalisation range {fixed} needs low < high")
        gain = 1.0 / (high - low)
        steps.append(bio.ScaleLinearDescr(kwargs=bio.ScaleLinearKwargs(gain=gain,
                                                                       offset=0.0 - low * gain)))
        if _is_window(normalize):
            steps.append(bio.ClipDescr(kwargs=bio.ClipKwargs(min=0.0, max=1.0)))
    elif normalize == "percentile" or (isinstance(normalize, str)
                                       and normalize.startswith("percentile:")):
        low_p, high_p = _PERCENTILES if normalize == "percentile" else \
            _percentile_pair(normalize)
        steps.append(bio.ScaleRangeDescr(kwargs=bio.ScaleRangeKwargs(
            min_percentile=low_p, max_percentile=high_p)))
    elif normalize == "meanstd":
        steps.append(bio.ZeroMeanUnitVarianceDescr(kwargs=bio.ZeroMeanUnitVarianceKwargs()))
    elif not (normalize is None or normalize is False or normalize == "none"):
        raise InvalidModelError(f"normalize={normalize!r} cannot be exported")
    steps.append(bio.EnsureDtypeDescr(kwargs=bio.EnsureDtypeKwargs(dtype="float32")))
    return steps  # bioimageio.spec would end it with the input's dtype otherwise


def _scalar(value: Any, what: str) -> float:
    """One number from a scalar or a per-channel list whose values are all equal."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise InvalidModelError(
                f"{what} differs between channels ({list(value)}); tilerseg normalises "
                "every channel alike")
        value = value[0]
    return float(value)


def _joint(kwargs: Any, in_channels: int, spatial: Sequence[str], name: str,
           label: str) -> None:
    """Refuse statistics per channel of a multi-channel input, or per line or plane."""
    axes = getattr(kwargs, "axes", None)
    named = [str(a) for a in axes] if axes is not None else None
    left = [a for a in spatial if named is not None and a not in named]
    if left:
        raise InvalidModelError(
            f"{label}: preprocessing {name} computes its statistics over axes {named} only, "
            f"separately along {', '.join(left)}; tilerseg normalises the whole image alike "
            "(supported: statistics over all spatial axes)")
    if axes is not None and in_channels > 1 and "channel" not in named:
        raise InvalidModelError(
            f"preprocessing {name} normalises each channel by its own statistics; tilerseg "
            "normalises every channel alike (supported: statistics over all channels, or "
            "one input channel)")


def normalization_of(steps: Sequence[Any], in_channels: int, label: str,
                     spatial: Sequence[str] = ()) -> NormalizeSpec:
    """The tilerseg ``normalize=`` value of a package's input preprocessing.

    Parameters
    ----------
    steps : sequence
        The input tensor's preprocessing descriptions (bioimage.io 0.5).
    in_channels : int
        Channels of the input (statistics per channel need one).
    label : str
        The package, for messages.
    spatial : sequence of str, optional
        The input's spatial axis ids: statistics must be computed over all of them.

    Returns
    -------
    "none", (low, high), ("window", centre, width), "percentile:LOW:HIGH" or "meanstd"

    Raises
    ------
    InvalidModelError
        A step that is not one global affine map (binarize, sigmoid...; a clip only to
        [0, 1] after a fixed scaling, a display window), statistics combined with further
        scaling, statistics over only some axes, or per-channel values.

    Examples
    --------
    >>> from bioimageio.spec.model import v0_5 as bio
    >>> normalization_of([bio.ScaleLinearDescr(kwargs=bio.ScaleLinearKwargs(
    ...     gain=0.5, offset=-1.0))], 1, "m.zip")  # 0.5 x - 1 = (x - 2) / (4 - 2)
    (2.0, 4.0)
    """
    gain, offset, stats, clipped = 1.0, 0.0, None, False
    for step in steps:
        name, kw = str(step.id), getattr(step, "kwargs", None)
        if clipped and name != "ensure_dtype":
            raise InvalidModelError(f"{label}: preprocessing {name} after clip is not supported")
        if name == "clip" and stats is None and (gain, offset) != (1.0, 0.0) \
                and (getattr(kw, "min", None), getattr(kw, "max", None)) == (0.0, 1.0):
            clipped = True  # a display window: scaled, then clipped to [0, 1]
            continue
        if name == "ensure_dtype":
            if (gain, offset) != (1.0, 0.0) or stats is not None:
                if not str(kw.dtype).startswith("float"):
                    raise InvalidModelError(
                        f"{label}: preprocessing ensure_dtype {kw.dtype} after scaling (a "
                        "rounding step) is not supported; tilerseg feeds float32")
            continue  # tilerseg feeds float32
        if stats is not None:
            raise InvalidModelError(
                f"{label}: preprocessing {name} after {stats.split(':')[0]} is not supported "
                "(tilerseg applies one global affine map)")
        if name == "scale_linear":
            g, o = _scalar(kw.gain, "scale_linear gain"), _scalar(kw.offset, "scale_linear offset")
            gain, offset = g * gain, g * offset + o
        elif name == "fixed_zero_mean_unit_variance":
            mean = _scalar(kw.mean, "fixed mean")
            std = _scalar(kw.std, "fixed std")
            gain, offset = gain / std, (offset - mean) / std
        elif name in ("scale_range", "zero_mean_unit_variance"):
            if (gain, offset) != (1.0, 0.0):
                raise InvalidModelError(
                    f"{label}: preprocessing {name} after a fixed scaling is not supported")
            _joint(kw, in_channels, spatial, name, label)
            if name == "scale_range":
                stats = f"percentile:{kw.min_percentile:g}:{kw.max_percentile:g}"
            else:
                stats = "meanstd"
            log.warning("%s: preprocessing %s depends on the whole sample; tilerseg computes "
                        "its statistics once over the image (the same for every tile, so tiles "
                        "stay exact) instead of per tile", label, name)
        else:
            raise InvalidModelError(
                f"{label}: preprocessing {name} is not supported (tilerseg applies one global "
                "affine map: scale_linear, fixed_zero_mean_unit_variance, scale_range, "
                "zero_mean_unit_variance; a clip to [0, 1] only after a fixed scaling)")
    if stats is not None:
        return stats
    if (gain, offset) == (1.0, 0.0):
        return "none"
    if gain <= 0:
        raise InvalidModelError(f"{label}: a preprocessing gain of {gain} (<= 0) is not supported")
    low = -offset / gain + 0.0  # + 0.0: no -0.0
    if clipped:
        return ("window", low + 0.5 / gain, 1.0 / gain)
    return (low, low + 1.0 / gain)


def activation_of(steps: Sequence[Any], out_channels: int, probability_range: bool,
                  label: str) -> str:
    """What a package's output postprocessing means to tilerseg's engine.

    The engine turns a network's logits into probabilities itself (sigmoid for one
    channel, softmax over several).

    Parameters
    ----------
    steps : sequence
        The output tensor's postprocessing descriptions.
    out_channels : int
        Output channels.
    probability_range : bool
        The output's data is declared within [0, 1].
    label : str
        The package, for messages.

    Returns
    -------
    {"logits", "probability"}
        ``"logits"``: the network's outputs are the logits of the package's declared
        sigmoid/softmax. ``"probability"``: one channel already in [0, 1] (no
        activation declared), fed to the engine as its logit.

    Raises
    ------
    InvalidModelError
        Postprocessing the engine cannot apply per pixel, or an output that is not a
        probability.

    Examples
    --------
    >>> from bioimageio.spec.model import v0_5 as bio
    >>> activation_of([bio.SoftmaxDescr()], 2, False, "m.zip")
    'logits'
    """
    names = [str(s.id) for s in steps if str(s.id) != "ensure_dtype"]
    if names == ["sigmoid"] and out_channels == 1:
        return "logits"
    if names == ["softmax"] and out_channels > 1:
        axis = str(getattr(steps[[str(s.id) for s in steps].index("softmax")].kwargs,
                           "axis", "channel"))
        if axis != "channel":
            raise InvalidModelError(f"{label}: a softmax over axis {axis!r} is not supported")
        return "logits"
    if not names and out_channels == 1 and probability_range:
        return "probability"
    what = ", ".join(names) if names else "none"
    raise InvalidModelError(
        f"{label}: output postprocessing [{what}] with {out_channels} channel(s) is not "
        "supported; tilerseg writes probabilities: a sigmoid of one channel or a softmax "
        "over several (declared as postprocessing), or one channel declared within [0, 1]")

"""Training data: image/mask pairs from folders, validated before any training starts."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ImageNotFoundError, InvalidImageError
from ..io.formats import is_image_file
from ..io.readers import open_image

__all__ = ["Pair", "load_pairs", "mask_to_classes"]

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Pair:
    """One training image ``(C, Y, X)`` and its class map ``(Y, X)`` (int64)."""

    name: str
    image: np.ndarray
    mask: np.ndarray


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _files(folder: str | os.PathLike, what: str) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageNotFoundError(f"{what} folder {str(folder)!r} does not exist")
    files = sorted((p for p in folder.iterdir() if is_image_file(p.name)),
                   key=_natural_key)
    if not files:
        raise ImageNotFoundError(f"{what} folder {str(folder)!r} holds no PNG, TIFF or .npy images")
    return files


def mask_to_classes(mask: np.ndarray, num_classes: int, name: str = "mask") -> np.ndarray:
    """A class map from a mask: integer classes ``0..num_classes-1``, or 0/255 binary.

    Examples
    --------
    >>> mask_to_classes(np.array([[0, 255]], np.uint8), 2).tolist()
    [[0, 1]]
    """
    values = np.unique(mask)
    if mask.dtype.kind not in "biu":
        raise InvalidImageError(f"{name} has dtype {mask.dtype}; masks must be integer class maps")
    if num_classes == 2 and set(values.tolist()) <= {0, 255} and 255 in values:
        return (mask == 255).astype(np.int64)
    if values.min() < 0 or values.max() >= num_classes:
        raise InvalidImageError(
            f"{name} has values {values[:8].tolist()}{'...' if len(values) > 8 else ''}; "
            f"expected classes 0..{num_classes - 1} (or 0/255 for two classes)"
        )
    return mask.astype(np.int64)


def _read(path: Path) -> tuple[np.ndarray, str]:
    src = open_image(path)
    return np.asarray(src.data[...]), src.axes


def load_pairs(
    images: str | os.PathLike,
    masks: str | os.PathLike,
    num_classes: int = 2,
    min_size: int = 1,
    select: Sequence[int] | None = None,
) -> list[Pair]:
    """Read image/mask pairs from two folders, matched by sorted (natural) file order.

    Parameters
    ----------
    images, masks : path
        Folders of PNG/TIFF/.npy files; the n-th image goes with the n-th mask, and
        their stems must agree when the counts do.
    num_classes : int
        Classes the masks may hold (0/255 masks are read as 0/1 for two classes).
    min_size : int
        Smallest allowed image side (one output tile).
    select : sequence of int, optional
        Indices of the pairs to keep (e.g. a training / validation split).

    Returns
    -------
    list of Pair
        Images as ``(C, Y, X)``, masks as int64 class maps.

    Raises
    ------
    ImageNotFoundError, InvalidImageError
        Missing or empty folders, different counts or names, shapes that differ between
        an image and its mask, unexpected mask values, images smaller than ``min_size``.
    """
    image_files, mask_files = _files(images, "image"), _files(masks, "mask")
    if len(image_files) != len(mask_files):
        raise InvalidImageError(
            f"{len(image_files)} images in {str(images)!r} but {len(mask_files)} masks in "
            f"{str(masks)!r}"
        )
    for i, m in zip(image_files, mask_files):
        if i.stem != m.stem:
            raise InvalidImageError(f"image {i.name} is paired with mask {m.name}: names differ")
    indices = range(len(image_files)) if select is None else select
    pairs = []
    for k in indices:
        image, axes = _read(image_files[k])
        mask, _ = _read(mask_files[k])
        if axes.endswith("S"):  # RGB(A) samples last -> channels first
            image = np.moveaxis(image, -1, 0)
        if image.ndim == 2:
            image = image[None]
        if mask.ndim != 2:
            raise InvalidImageError(f"mask {mask_files[k].name} has shape {mask.shape}; expected 2D")
        if image.shape[1:] != mask.shape:
            raise InvalidImageError(
                f"image {image_files[k].name} has shape {image.shape[1:]} but its mask "
                f"{mask_files[k].name} has {mask.shape}"
            )
        if min(mask.shape) < min_size:
            raise InvalidImageError(
                f"image {image_files[k].name} is {mask.shape}, smaller than one training "
                f"tile ({min_size} px)"
            )
        pairs.append(Pair(image_files[k].stem, image, mask_to_classes(mask, num_classes,
                                                                      mask_files[k].name)))
    log.info("loaded %d image/mask pairs from %s", len(pairs), images)
    return pairs

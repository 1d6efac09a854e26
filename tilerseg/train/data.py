"""Training data: image/mask pairs (2D) or volume/label pairs (3D) from folders, validated
before any training starts."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ImageNotFoundError, InvalidArgumentError, InvalidImageError
from ..metrics import is_binary_255
from ..io.formats import image_paths, strip_image_suffix
from ..io.readers import open_image

__all__ = ["Pair", "case_name", "load_pairs", "mask_to_classes", "same_case"]

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Pair:
    """One training image ``(C, Y, X)`` and its class map ``(Y, X)`` (int64), or a volume
    ``(C, Z, Y, X)`` and its class map ``(Z, Y, X)``.

    ``spacing`` is the voxel side per spatial axis (the image's ``pixel_size``, in
    micrometres; None where the file does not record it on every axis).
    """

    name: str
    image: np.ndarray
    mask: np.ndarray
    spacing: tuple[float, ...] | None = None

    @property
    def ndim(self) -> int:
        """Spatial dimensions (2 or 3)."""
        return self.mask.ndim

    def relative_spacing(self) -> tuple[float, ...]:
        """``spacing`` divided by its smallest value (1 on every axis where unknown): the
        voxel sides in units of the finest one.

        Examples
        --------
        >>> Pair("a", np.zeros((1, 2, 2, 2)), np.zeros((2, 2, 2), int), (3000.0, 1000.0, 1000.0)
        ...      ).relative_spacing()
        (3.0, 1.0, 1.0)
        """
        if self.spacing is None:
            return (1.0,) * self.ndim
        finest = min(self.spacing)
        return tuple(float(v) / finest for v in self.spacing)


_CHANNEL_SUFFIX = re.compile(r"_\d{4}$")
"""nnU-Net's channel suffix of an image file (``CASE_0000.nii.gz``)."""


def case_name(path: str | os.PathLike) -> str:
    """A file or folder name without its image extension (``.nii.gz`` included).

    Examples
    --------
    >>> case_name("labelsTr/BRATS_001.nii.gz"), case_name("img/07.ome.tif")
    ('BRATS_001', '07')
    """
    name = os.path.basename(os.fspath(path).rstrip("/\\"))
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return strip_image_suffix(name)


def same_case(image: str | os.PathLike, mask: str | os.PathLike) -> bool:
    """Whether an image and a mask are one case: the same :func:`case_name`, or the
    image's is the mask's with nnU-Net's channel suffix (``BRATS_001_0000.nii.gz``
    with ``BRATS_001.nii.gz``).

    Examples
    --------
    >>> same_case("imagesTr/BRATS_001_0000.nii.gz", "labelsTr/BRATS_001.nii.gz")
    True
    >>> same_case("img/07.tif", "masks/08.tif")
    False
    """
    a, b = case_name(image), case_name(mask)
    return a == b or _CHANNEL_SUFFIX.sub("", a) == b


def _files(folder: str | os.PathLike, what: str) -> list[str]:
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ImageNotFoundError(f"{what} folder {folder!r} does not exist")
    try:
        files = image_paths(folder, what)
    except ImageNotFoundError:
        files = []
    if not files:
        raise ImageNotFoundError(f"{what} folder {folder!r} holds no images (TIFF, PNG, JPEG, DICOM, NIfTI, .npy or .zarr)")
    return files


def mask_to_classes(mask: np.ndarray, num_classes: int, name: str = "mask") -> np.ndarray:
    """A class map from a mask: integer classes ``0..num_classes-1``, or 0/255 binary.

    A mask whose values are 0 and 255 only is binary (255 -> class 1) whatever
    ``num_classes`` is, as ``tilerseg eval`` reads it.

    Examples
    --------
    >>> mask_to_classes(np.array([[0, 255]], np.uint8), 2).tolist()
    [[0, 1]]
    """
    values = np.unique(mask)
    if mask.dtype.kind not in "biu":
        raise InvalidImageError(f"{name} has dtype {mask.dtype}; masks must be integer class maps")
    if is_binary_255(values):
        return (mask == 255).astype(np.int64)
    if values.min() < 0 or values.max() >= num_classes:
        raise InvalidImageError(
            f"{name} has values {values[:8].tolist()}{'...' if len(values) > 8 else ''}; "
            f"expected classes 0..{num_classes - 1} (or 0/255 for two classes)"
        )
    return mask.astype(np.int64)


def _read(path: str) -> tuple[np.ndarray, str, dict[str, float]]:
    src = open_image(path)
    return np.asarray(src.data[...]), src.axes, dict(src.pixel_size)


def _image_array(image: np.ndarray, axes: str, ndim: int, name: str) -> np.ndarray:
    """The image channel-first with ``ndim`` spatial axes."""
    if axes.endswith("S"):  # RGB(A) samples last -> channels first
        image = np.moveaxis(image, -1, 0)
        axes = "C" + axes[:-1]
    if image.ndim == ndim:  # no channel axis (a guessed "CYX" of a 3D .npy is a ZYX volume)
        return image[None]
    if image.ndim == ndim + 1 and (axes[0] == "C" or ndim == 3):
        return image
    kind = "(Y, X) or (C, Y, X)" if ndim == 2 else "(Z, Y, X) or (C, Z, Y, X)"
    hint = ("; a volume needs a 3D model (e.g. --arch unet3d)" if ndim == 2 and "Z" in axes
            else "")
    raise InvalidImageError(f"image {name} has axes {axes} and shape {image.shape}; "
                            f"expected {kind}{hint}")


def _spacing(sizes: dict[str, float], ndim: int) -> tuple[float, ...] | None:
    axes = "ZYX"[-ndim:]
    if all(sizes.get(a, 0) > 0 for a in axes):
        return tuple(float(sizes[a]) for a in axes)
    return None


def load_pairs(
    images: str | os.PathLike,
    masks: str | os.PathLike,
    num_classes: int = 2,
    min_size: int = 1,
    select: Sequence[int] | None = None,
    ndim: int = 2,
) -> list[Pair]:
    """Read image/mask pairs from two folders, matched by sorted (natural) name order.

    One rule pairs images with masks, 2D or 3D: the n-th image goes with the n-th mask,
    and they must be the same case (:func:`same_case`: equal names without extension,
    or nnU-Net's ``BRATS_001_0000.nii.gz`` with ``BRATS_001.nii.gz``); a pair is named
    after its mask. The folders are listed by
    :func:`tilerseg.io.formats.image_paths` and every image is read by
    :func:`tilerseg.open_image`, so any format they know works (TIFF and OME-TIFF
    stacks, .npy, Zarr, ...).

    Parameters
    ----------
    images, masks : path
        Folders of images and of masks (integer class maps, or 0/255).
    num_classes : int
        Classes the masks may hold (0/255 masks are read as 0/1 for two classes).
    min_size : int
        Smallest allowed image side (one output tile).
    select : sequence of int, optional
        Indices of the pairs to keep (e.g. a training / validation split).
    ndim : {2, 3}
        2 for images ``(C, Y, X)`` with masks ``(Y, X)``; 3 for volumes ``(C, Z, Y, X)``
        (or ``(Z, Y, X)``) with masks ``(Z, Y, X)``.

    Returns
    -------
    list of Pair
        Images channel first, masks as int64 class maps, the image's voxel spacing.

    Raises
    ------
    ImageNotFoundError, InvalidImageError
        Missing or empty folders, different counts or names, shapes that differ between
        an image and its mask, masks of the wrong dimensions, unexpected mask values,
        images smaller than ``min_size``.
    """
    if ndim not in (2, 3):
        raise InvalidArgumentError(f"ndim={ndim!r} must be 2 or 3")
    image_files, mask_files = _files(images, "image"), _files(masks, "mask")
    if len(image_files) != len(mask_files):
        raise InvalidImageError(
            f"{len(image_files)} images in {str(images)!r} but {len(mask_files)} masks in "
            f"{str(masks)!r}"
        )
    for i, m in zip(image_files, mask_files):
        if not same_case(i, m):
            raise InvalidImageError(f"image {os.path.basename(i)} is paired with mask "
                                    f"{os.path.basename(m)}: names differ")
    indices = range(len(image_files)) if select is None else select
    pairs = []
    for k in indices:
        iname, mname = os.path.basename(image_files[k]), os.path.basename(mask_files[k])
        image, axes, sizes = _read(image_files[k])
        mask, _, _ = _read(mask_files[k])
        image = _image_array(image, axes, ndim, iname)
        if mask.ndim != ndim:
            hint = ("; a volume needs a 3D model (e.g. --arch unet3d)" if ndim == 2
                    and mask.ndim == 3 else "")
            raise InvalidImageError(f"mask {mname} has shape {mask.shape}; expected "
                                    f"{ndim}D{hint}")
        if image.shape[1:] != mask.shape:
            raise InvalidImageError(
                f"image {iname} has shape {image.shape[1:]} but its mask "
                f"{mname} has {mask.shape}"
            )
        if min(mask.shape) < min_size:
            raise InvalidImageError(
                f"image {iname} is {mask.shape}, smaller than one training "
                f"tile ({min_size} px)"
            )
        pairs.append(Pair(case_name(mask_files[k]), image,
                          mask_to_classes(mask, num_classes, mname), _spacing(sizes, ndim)))
    log.info("loaded %d image/mask pairs from %s", len(pairs), images)
    return pairs

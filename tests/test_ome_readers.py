"""The OME-Zarr output read by other OME-Zarr readers, and where its pyramid levels lie.

Each reader opens every multiscale image of the outputs (the probabilities, the label
images under ``labels/``, a labels-only root) and must give back the arrays zarr reads
and the scales and translations the metadata states:

* ngff-zarr (``from_ngff_zarr``, with its JSON Schema validation of OME-NGFF 0.5);
* iohub 0.3 (``open_ome_zarr``: channel names from ``omero``, which it refuses without
  ``rdefs.defaultT`` / ``defaultZ``), in an environment of its own (:mod:`tests.envs`):
  iohub pins versions the test environment does not hold;
* ome-zarr-models and ome-zarr (napari-ome-zarr's reader) on the same outputs.

The level translations are checked against the downsampling itself: a probability level
averages blocks of level-0 pixels, so a ramp through it gives the centre of the pixels
each level pixel came from; a label level samples one level-0 pixel, which the level
pixel's physical centre must name.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

import tilerseg
from tests.envs import run_in, side_env
from tilerseg.io.writers import OutputSpec, OutputWriter
from tilerseg.synthetic import membrane_image

IOHUB = ["iohub==0.3.0a7"]
"""The last iohub 0.3 release that installs on Python 3.11 (0.3.0 and later need Python
3.12); it reads OME-NGFF 0.5 on Zarr v3 through zarr-python 3."""


def _tiff(path: Path, image: np.ndarray, spacing: float | None = None) -> Path:
    """An ImageJ TIFF of ``image`` with 0.5 um pixels (and ``spacing`` um between planes)."""
    meta = {"unit": "um", **({"spacing": spacing, "axes": "ZYX"} if spacing else {})}
    tifffile.imwrite(path, image, resolution=(2.0, 2.0), imagej=True, metadata=meta)
    return path


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Runs of a tiny U-Net: ``both``, ``instances`` and ``labels``, on a 2D image (tiles of
    256: level 1 is written tile by tile) and on a z-stack."""
    import torch

    folder = tmp_path_factory.mktemp("readers")
    torch.manual_seed(0)
    model = tilerseg.create_model("unet", depth=2, base_channels=2).eval()
    image = (membrane_image((520, 300), seed=1)[0] * 255).astype(np.uint8)
    stack = np.stack([membrane_image((70, 60), seed=s)[0] for s in range(5)])
    sources = {"2d": (_tiff(folder / "image.tif", image), 256),
               "3d": (_tiff(folder / "stack.tif", (stack * 255).astype(np.uint8), 3.0), 32)}
    outs = {}
    for name, (source, tile) in sources.items():
        for output in ("both", "instances", "labels"):
            out = folder / f"{name}-{output}.zarr"
            tilerseg.segment_to_zarr(source, model, out, tile=tile, output=output,
                                     backend="torch")
            outs[f"{name}-{output}"] = out
    return outs


def _images(out: Path) -> list[str]:
    """The multiscale images of an output: the root and each label image."""
    root = zarr.open_group(str(out), mode="r")
    names = root["labels"].attrs["ome"]["labels"] if "labels" in root else []
    return ["", *(f"labels/{n}" for n in names)]


def _transforms(ms: dict) -> list[tuple[list[float], list[float]]]:
    """(scale, translation) of every level of a ``multiscales`` entry."""
    out = []
    for d in ms["datasets"]:
        by_type = {t["type"]: t[t["type"]] for t in d["coordinateTransformations"]}
        out.append((by_type["scale"], by_type.get("translation", [0.0] * len(ms["axes"]))))
    return out


def _group(out: Path, image: str) -> zarr.Group:
    return zarr.open_group(str(out / image) if image else str(out), mode="r")


def test_metadata_of_the_probabilities(outputs: dict[str, Path]) -> None:
    """``omero``: a complete channel per class and the full ``rdefs``; the probability
    levels translated to the centre of the blocks they average, the label levels not."""
    for name, z in (("2d-both", 0), ("3d-both", 2)):
        ome = zarr.open_group(str(outputs[name]), mode="r").attrs["ome"]
        assert ome["omero"]["rdefs"] == {"defaultT": 0, "defaultZ": z, "model": "color"}
        for channel in ome["omero"]["channels"]:
            assert set(channel) == {"label", "color", "active", "coefficient", "family",
                                    "inverted", "window"}
            assert channel["window"] == {"min": 0, "max": 255, "start": 0, "end": 255}
    ms = zarr.open_group(str(outputs["3d-both"]), mode="r").attrs["ome"]["multiscales"][0]
    assert _transforms(ms) == [
        ([1.0, 3.0, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]),
        ([1.0, 6.0, 1.0, 1.0], [0.0, 1.5, 0.25, 0.25]),
        ([1.0, 12.0, 2.0, 2.0], [0.0, 4.5, 0.75, 0.75]),
    ]  # fmt: skip
    labels = _group(outputs["3d-both"], "labels/segmentation").attrs["ome"]["multiscales"][0]
    assert _transforms(labels) == [([3.0 * 2**k, 0.5 * 2**k, 0.5 * 2**k], [0.0] * 3)
                                   for k in range(3)]
    assert [d["coordinateTransformations"][0]["type"] for d in ms["datasets"]] == ["scale"] * 3


def test_label_images_share_the_chunking_of_the_probabilities(outputs: dict[str, Path]) -> None:
    """Segmentation and instance labels are chunked as the probabilities, level by level
    (tiles of 256: level 1 in the halved tiles it is written in)."""
    for name in ("2d-both", "2d-instances", "3d-both", "3d-instances"):
        root = zarr.open_group(str(outputs[name]), mode="r")
        levels = len(root.attrs["ome"]["multiscales"][0]["datasets"])
        (label,) = _images(outputs[name])[1:]
        for k in range(levels):
            assert root[f"{label}/{k}"].chunks == root[str(k)].chunks[1:], (name, k)
    root = zarr.open_group(str(outputs["2d-instances"]), mode="r")
    assert [root[f"labels/instances/{k}"].chunks for k in range(3)] == [
        (256, 256), (128, 128), (130, 75)]


def test_ngff_zarr_reads_every_multiscale(outputs: dict[str, Path]) -> None:
    """ngff-zarr validates each multiscale image against the OME-NGFF 0.5 JSON Schema (the
    strict one where ``colors`` are given) and reads the arrays, scales and translations."""
    import ngff_zarr

    for name, out in outputs.items():
        for image in _images(out):
            group = _group(out, image)
            ome = group.attrs["ome"]
            label = "image-label" in ome
            ngff_zarr.validate(dict(group.attrs), version="0.5", model="image", strict=True)
            if label:
                ngff_zarr.validate(dict(group.attrs), version="0.5", model="label",
                                   strict="colors" in ome["image-label"])
            ms = ngff_zarr.from_ngff_zarr(str(out / image), validate=True)
            expected = ome["multiscales"][0]
            axes = [a["name"] for a in expected["axes"]]
            assert len(ms.images) == len(expected["datasets"]), (name, image)
            for k, (level, (scale, shift)) in enumerate(zip(ms.images, _transforms(expected))):
                assert level.dims == tuple(axes)
                assert level.scale == dict(zip(axes, scale)), (name, image, k)
                assert level.translation == dict(zip(axes, shift)), (name, image, k)
                np.testing.assert_array_equal(np.asarray(level.data), group[str(k)][:])
            if "omero" in ome:
                assert [c.label for c in ms.metadata.omero.channels] == \
                    [c["label"] for c in ome["omero"]["channels"]]


_IOHUB_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from iohub import open_ome_zarr

    store, images, folder = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    report = {}
    for n, image in enumerate(images):
        pos = open_ome_zarr(f"{store}/{image}" if image else store, mode="r")
        meta = getattr(pos, "metadata", None)  # not set when iohub found it invalid
        assert meta is not None, f"iohub found no valid metadata in {image or 'the root'}"
        keys = [d.path for d in meta.multiscales[0].datasets]
        for key in keys:
            np.save(f"{folder}/{n}-{key}.npy", pos[key].numpy())
        rdefs = meta.omero.rdefs.model_dump(by_alias=True) if meta.omero else None
        report[image] = {
            "version": pos.version, "channels": pos.channel_names, "rdefs": rdefs,
            "axes": pos.axis_names,
            "levels": [[pos.get_effective_scale(k), pos.get_effective_translation(k)]
                       for k in keys],
        }
    print(json.dumps(report))
""")


def test_iohub_reads_every_multiscale(outputs: dict[str, Path], tmp_path: Path) -> None:
    """iohub 0.3 opens the outputs' images and label images: channel names, display
    settings, the arrays, scales and translations are those tilerseg wrote."""
    python = side_env("iohub", IOHUB)
    for name, out in outputs.items():
        images = _images(out)
        folder = tmp_path / name
        folder.mkdir()
        report = json.loads(run_in(python, _IOHUB_SCRIPT, str(out), json.dumps(images),
                                   str(folder)).splitlines()[-1])
        for n, image in enumerate(images):
            group = _group(out, image)
            ome = group.attrs["ome"]
            got = report[image]
            assert got["version"] == "0.5"
            assert got["axes"] == [a["name"] for a in ome["multiscales"][0]["axes"]]
            if "omero" in ome:
                assert got["channels"] == [c["label"] for c in ome["omero"]["channels"]]
                assert got["rdefs"] == {**ome["omero"]["rdefs"], "projection": "normal"}
            else:  # a label image: no channel axis, iohub numbers the one it pads
                assert got["channels"] == [0] and got["rdefs"] is None
            assert got["levels"] == [list(t) for t in _transforms(ome["multiscales"][0])]
            for k in range(len(got["levels"])):
                np.testing.assert_array_equal(np.load(folder / f"{n}-{k}.npy"),
                                              group[str(k)][:])


def test_ome_zarr_readers_on_the_new_metadata(outputs: dict[str, Path]) -> None:
    """ome-zarr-models validates every image and label image; ome-zarr's reader (the one
    napari-ome-zarr uses) finds the channel names and each level's transformations."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel

    for name, out in outputs.items():
        for image in _images(out):
            group = _group(out, image)
            Image.from_zarr(group)
            if "image-label" in group.attrs["ome"]:
                ImageLabel.from_zarr(group)
        nodes = list(Reader(parse_url(str(out)))())
        ome = zarr.open_group(str(out), mode="r").attrs["ome"]
        expected = [d["coordinateTransformations"] for d in ome["multiscales"][0]["datasets"]]
        assert nodes[0].metadata["coordinateTransformations"] == expected, name
        if "omero" in ome:
            assert nodes[0].metadata["channel_names"] == ["class 0", "class 1"]


def test_label_levels_of_a_run_hold_the_pixel_their_centre_names(
        outputs: dict[str, Path]) -> None:
    """Every pixel of a label level (segmentation, instances) is the level-0 pixel at its
    physical centre."""
    for out in outputs.values():
        for image in _images(out):
            group = _group(out, image)
            ms = group.attrs["ome"]["multiscales"][0]
            if ms["type"] != "nearest":
                continue
            _check_nearest(group, _transforms(ms))


def _centres(shape: tuple[int, ...], scale: list[float], shift: list[float]) -> list:
    """Physical centre of every pixel index along each axis."""
    return [np.arange(n) * s + t for n, s, t in zip(shape, scale, shift)]


def _check_nearest(group: zarr.Group, transforms: list) -> None:
    base = group["0"][:]
    (s0, t0) = transforms[0]
    for k, (scale, shift) in enumerate(transforms):
        level = group[str(k)][:]
        index = []
        for c, s, t in zip(_centres(level.shape, scale, shift), s0, t0):
            j = (c - t) / s
            np.testing.assert_allclose(j, np.round(j), atol=1e-9)  # on a level-0 centre
            index.append(np.round(j).astype(int))
        np.testing.assert_array_equal(level, base[np.ix_(*index)], err_msg=f"level {k}")


@pytest.mark.parametrize("case", ["2d", "3d"])
def test_level_translations_put_each_pixel_at_the_centre_of_its_block(
        tmp_path: Path, case: str) -> None:
    """Probability levels: channel ``a`` holds the level-0 coordinate along axis ``a``
    (scaled into [0, 1]); the block means of the pyramid then hold the centre of the
    level-0 pixels each level pixel came from, which must be its physical centre by the
    metadata; only the last pixel along a side that ``2**k`` does not divide (a partial
    block) lies nearer the start, by at most half a block. Label levels: the level-0 pixel
    at the centre."""
    if case == "2d":  # tiles of 256: level 1 written tile by tile, level 2 at the commit
        axes, shape, chunks, size = "YX", (601, 519), (256, 256), {"Y": 0.5, "X": 0.25}
    else:
        axes, shape, chunks, size = "ZYX", (7, 45, 38), (4, 16, 16), {"Z": 2.0, "X": 0.3}
    nd = len(shape)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) / (n - 1) for n in shape],
                        indexing="ij")
    ramps = np.stack(grids).astype(np.float32)
    labels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    spec = OutputSpec(axes, shape, chunks, nd, "float32", True, pixel_size=size,
                      eager_levels=2)
    with OutputWriter(tmp_path / "o.zarr", spec) as writer:
        assert writer.eager == (1 if case == "2d" else 0)
        for start in np.ndindex(*[-(-n // c) for n, c in zip(shape, chunks)]):
            region = tuple(slice(i * c, min((i + 1) * c, n))
                           for i, c, n in zip(start, chunks, shape))
            writer.write(region, ramps[(slice(None), *region)], labels=labels[region])
        out = writer.commit()
    root = zarr.open_group(str(out), mode="r")
    transforms = _transforms(root.attrs["ome"]["multiscales"][0])
    assert len(transforms) == 3
    s0 = transforms[0][0][1:]
    for k, (scale, shift) in enumerate(transforms):
        level = root[str(k)][:]
        for a in range(nd):
            centre = _centres(level.shape[1:], scale[1:], shift[1:])[a]
            # the mean of the level-0 centres the level pixel came from, in micrometres
            came_from = level[a] * np.float64(shape[a] - 1) * s0[a]
            came_from = np.moveaxis(came_from, a, -1)
            short = centre - came_from  # broadcast along axis a
            tol = 1e-5 * s0[a] * shape[a]
            full = slice(None, -1) if shape[a] % 2**k else slice(None)
            np.testing.assert_allclose(short[..., full], 0.0, atol=tol,
                                       err_msg=f"level {k}, axis {axes[a]}")
            half_block = s0[a] * (2**k - 1) / 2
            assert np.all(short[..., -1] >= -tol) and np.all(short[..., -1] <= half_block + tol)
    _check_nearest(root["labels/segmentation"],
                   _transforms(root["labels/segmentation"].attrs["ome"]["multiscales"][0]))

"""OME-Zarr writer: encoding, labels, pyramid, atomic commit/abort, OME-NGFF 0.5 validity."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from tilerseg.errors import InvalidArgumentError, OutputError
from tilerseg.io.pyramid import level_shapes
from tilerseg.io.writers import (
    OutputSpec,
    OutputWriter,
    decode_probabilities,
    encode_probabilities,
    label_dtype,
    labels_from_probabilities,
    open_output,
)

TOL = {"uint8": 0.5 / 255 + 1e-6, "float16": 5e-4, "float32": 0.0}


def _probs(shape: tuple[int, ...], classes: int, seed: int = 0) -> np.ndarray:
    """Random float32 probabilities (softmax-like for >1 class)."""
    p = np.random.default_rng(seed).random((classes, *shape), dtype=np.float32)
    return p / p.sum(axis=0, keepdims=True) if classes > 1 else p


def _spec(**kw) -> OutputSpec:
    base = {
        "spatial_axes": "YX", "shape": (40, 30), "chunks": (16, 16), "num_classes": 2,
        "probabilities": "uint8", "labels": True, "pixel_size": {"Y": 0.5, "X": 0.25},
        "attributes": {"model": "unet", "tile": [16, 16]},
    }  # fmt: skip
    base.update(kw)
    return OutputSpec(**base)


def _write(path: Path, spec: OutputSpec, probs: np.ndarray, **kw) -> Path:
    with OutputWriter(path, spec, **kw) as w:
        w.write((slice(None),) * len(spec.shape), probs)
        return w.commit()


def _tree_hash(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def _mean2(x: np.ndarray, spatial: int) -> np.ndarray:
    """Reference 2x block mean of the last ``spatial`` axes (partial blocks: real pixels)."""
    for axis in range(x.ndim - spatial, x.ndim):
        n = x.shape[axis]
        even = np.take(x, range(0, n, 2), axis=axis)
        odd = np.take(x, range(1, n, 2), axis=axis)
        if odd.shape[axis] < even.shape[axis]:  # last block has one pixel
            odd = np.concatenate([odd, np.take(even, [-1], axis=axis)], axis=axis)
        x = (even + odd) / 2
    return x


# -- encoding and labels ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["uint8", "float16", "float32"])
def test_encode_decode_round_trip(dtype: str) -> None:
    p = _probs((50, 60), 3)
    stored = encode_probabilities(p, dtype)
    assert stored.dtype == np.dtype(dtype)
    back = decode_probabilities(stored)
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, p, atol=TOL[dtype], rtol=0)
    assert encode_probabilities(np.array([0.0, 1.0, 1.5, -1]), "uint8").tolist() == [0, 255, 255, 0]


def test_encode_rejects_unknown_dtype() -> None:
    with pytest.raises(InvalidArgumentError):
        encode_probabilities(np.zeros(3), "int16")


def test_labels_from_probabilities() -> None:
    p = _probs((20, 20), 4, seed=1)
    lab = labels_from_probabilities(p)
    assert lab.dtype == np.uint8
    np.testing.assert_array_equal(lab, np.argmax(p, axis=0))
    one = np.array([[[0.2, 0.5, 0.7]]], np.float32)
    assert labels_from_probabilities(one).tolist() == [[0, 1, 1]]
    assert labels_from_probabilities(one, threshold=0.6).tolist() == [[0, 0, 1]]
    assert label_dtype(255) == np.uint8 and label_dtype(256) == np.uint16
    assert label_dtype(70000) == np.uint32


# -- round trip through the writer ------------------------------------------------------


@pytest.mark.parametrize("dtype", ["uint8", "float16", "float32"])
def test_round_trip(tmp_path: Path, dtype: str) -> None:
    p = _probs((40, 30), 2)
    out = _write(tmp_path / "out.zarr", _spec(probabilities=dtype), p)
    assert out == tmp_path / "out.zarr"
    o = open_output(out)
    assert o["probabilities"].dtype == np.dtype(dtype)
    assert o["probabilities"].shape == (2, 40, 30) and o["probabilities"].chunks == (2, 16, 16)
    np.testing.assert_allclose(decode_probabilities(o["probabilities"][:]), p, atol=TOL[dtype])
    np.testing.assert_array_equal(o["labels"][:], np.argmax(p, axis=0))
    assert o["labels"].chunks == (16, 16)
    assert o["attributes"]["complete"] is True
    assert ("probability_scale" in o["attributes"]) == (dtype == "uint8")
    assert sorted(os.listdir(tmp_path)) == ["out.zarr"]


def test_single_class_threshold_labels(tmp_path: Path) -> None:
    p = _probs((40, 30), 1)
    with OutputWriter(tmp_path / "o.zarr", _spec(num_classes=1)) as w:
        w.write((slice(0, 40), slice(0, 30)), p, threshold=0.3)
        w.commit()
    o = open_output(tmp_path / "o.zarr")
    np.testing.assert_array_equal(o["labels"][:], (p[0] >= 0.3).astype(np.uint8))


def test_many_classes_use_wider_labels(tmp_path: Path) -> None:
    w = OutputWriter(tmp_path / "o.zarr", _spec(num_classes=300, probabilities=None))
    assert w.labels.dtype == np.uint16
    w.abort()


# -- pyramid ----------------------------------------------------------------------------


def test_pyramid_odd_sizes(tmp_path: Path) -> None:
    p = _probs((1000, 777), 2, seed=2)
    spec = _spec(shape=(1000, 777), chunks=(256, 256))
    out = _write(tmp_path / "big.zarr", spec, p)
    shapes = [(1000, 777), (500, 389), (250, 195)]
    assert level_shapes((1000, 777), (256, 256)) == shapes
    root = zarr.open_group(out, mode="r")
    lab = root["labels/segmentation"]
    for k, shape in enumerate(shapes):
        assert root[str(k)].shape == (2, *shape)
        assert root[str(k)].chunks == (2, *(min(256, n) for n in shape))
        assert lab[str(k)].shape == shape
    assert open_output(out)["levels"] == 3
    datasets = root.attrs["ome"]["multiscales"][0]["datasets"]
    assert [d["coordinateTransformations"][0]["scale"] for d in datasets] == [
        [1.0, 0.5, 0.25], [1.0, 1.0, 0.5], [1.0, 2.0, 1.0],
    ]  # fmt: skip
    for k in (1, 2):
        prev = decode_probabilities(root[str(k - 1)][:])
        np.testing.assert_allclose(
            decode_probabilities(root[str(k)][:]), _mean2(prev, 2), atol=0.5 / 255 + 1e-6
        )
        np.testing.assert_array_equal(lab[str(k)][:], lab[str(k - 1)][:][::2, ::2])


def test_small_image_has_one_level(tmp_path: Path) -> None:
    out = _write(tmp_path / "s.zarr", _spec(shape=(10, 12), chunks=(256, 256)), _probs((10, 12), 2))
    o = open_output(out)
    assert o["levels"] == 1 and o["probabilities"].chunks == (2, 10, 12)


def test_3d_output(tmp_path: Path) -> None:
    from ome_zarr_models.v05.image import Image

    p = _probs((21, 40, 33), 3, seed=3)
    spec = _spec(
        spatial_axes="ZYX", shape=(21, 40, 33), chunks=(8, 16, 16), num_classes=3,
        probabilities="float32", pixel_size={"Z": 2.0},
    )  # fmt: skip
    out = _write(tmp_path / "vol.zarr", spec, p)
    root = zarr.open_group(out, mode="r")
    ms = root.attrs["ome"]["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "z", "y", "x"]
    assert [a.get("unit") for a in ms["axes"]] == [None, "micrometer", None, None]
    assert [root[str(k)].shape for k in range(len(ms["datasets"]))] == [
        (3, 21, 40, 33), (3, 11, 20, 17), (3, 6, 10, 9),
    ]  # fmt: skip
    np.testing.assert_allclose(root["1"][:], _mean2(p, 3), atol=1e-6)
    assert root["labels/segmentation/1"].shape == (11, 20, 17)
    Image.from_zarr(zarr.open_group(out, mode="r"))


# -- metadata and independent readers ---------------------------------------------------


def test_attributes_complete_only_after_commit(tmp_path: Path) -> None:
    w = OutputWriter(tmp_path / "o.zarr", _spec(attributes={"model": "x", "n": np.int64(3)}))
    (partial,) = tmp_path.glob(".o.zarr.partial-*")
    assert not (tmp_path / "o.zarr").exists()
    expected = {"model": "x", "n": 3, "probability_scale": 1 / 255}
    assert open_output(partial)["attributes"] == {**expected, "complete": False}
    w.commit()
    assert open_output(tmp_path / "o.zarr")["attributes"] == {**expected, "complete": True}


def test_valid_ome_zarr_with_labels(tmp_path: Path) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v05.image import Image

    out = _write(tmp_path / "o.zarr", _spec(shape=(100, 70), chunks=(32, 32)), _probs((100, 70), 2))
    image = Image.from_zarr(zarr.open_group(out, mode="r"))
    assert len(image.datasets[0]) == 3
    assert image.labels is not None and image.labels.label_paths == ["segmentation"]
    label = image.labels.get_image_labels_group("segmentation")
    assert label.attributes.ome.image_label.source.image == "../../"

    nodes = list(Reader(parse_url(str(out)))())
    specs = [sorted(type(s).__name__ for s in n.specs) for n in nodes]
    assert specs == [["Multiscales", "OMERO"], ["Labels"], ["Label", "Multiscales"]]
    assert [d.shape for d in nodes[0].data] == [(2, 100, 70), (2, 50, 35), (2, 25, 18)]
    # the display settings viewers use: a named channel per class, the stored range
    assert nodes[0].metadata["channel_names"] == ["class 0", "class 1"]
    assert nodes[0].metadata["contrast_limits"] == [[0, 255], [0, 255]]
    assert [d.shape for d in nodes[2].data] == [(100, 70), (50, 35), (25, 18)]


def test_class_names_name_the_channels_for_viewers(tmp_path: Path) -> None:
    from tilerseg.io.writers import spec_from_dict, spec_to_dict

    spec = _spec(class_names=("membrane", "cell interior"))
    out = _write(tmp_path / "o.zarr", spec, _probs((40, 30), 2))
    channels = zarr.open_group(out, mode="r").attrs["ome"]["omero"]["channels"]
    assert [c["label"] for c in channels] == ["membrane", "cell interior"]
    assert spec_from_dict(spec_to_dict(spec)) == spec
    older = spec_to_dict(_spec())  # a manifest written before the names were recorded
    del older["class_names"]
    assert spec_from_dict(older).class_names == ()
    # names that do not fit the channels are not used
    out = _write(tmp_path / "p.zarr", _spec(class_names=("one",)), _probs((40, 30), 2))
    channels = zarr.open_group(out, mode="r").attrs["ome"]["omero"]["channels"]
    assert [c["label"] for c in channels] == ["class 0", "class 1"]


def test_labels_only_root_is_label_image(tmp_path: Path) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel

    p = _probs((100, 70), 3)
    out = _write(
        tmp_path / "l.zarr", _spec(shape=(100, 70), chunks=(32, 32), probabilities=None), p
    )
    o = open_output(out)
    assert o["probabilities"] is None and o["levels"] == 3
    np.testing.assert_array_equal(o["labels"][:], np.argmax(p, axis=0))
    group = zarr.open_group(out, mode="r")
    Image.from_zarr(group)
    assert ImageLabel.from_zarr(group).attributes.ome.image_label is not None
    (node,) = list(Reader(parse_url(str(out)))())
    assert sorted(type(s).__name__ for s in node.specs) == ["Label", "Multiscales"]
    assert [d.shape for d in node.data] == [(100, 70), (50, 35), (25, 18)]


# -- atomicity and errors ---------------------------------------------------------------


def test_overwrite_refused_and_existing_untouched(tmp_path: Path) -> None:
    out = _write(tmp_path / "o.zarr", _spec(), _probs((40, 30), 2))
    before = _tree_hash(out)
    with pytest.raises(OutputError, match="exists; pass --overwrite"):
        OutputWriter(out, _spec(attributes={"run": 2}))
    assert _tree_hash(out) == before
    assert sorted(os.listdir(tmp_path)) == ["o.zarr"]


def test_overwrite_replaces_only_at_commit(tmp_path: Path) -> None:
    out = _write(tmp_path / "o.zarr", _spec(), _probs((40, 30), 2))
    before = _tree_hash(out)
    new = _probs((20, 10), 2, seed=5)
    w = OutputWriter(out, _spec(shape=(20, 10), attributes={"run": 2}), overwrite=True)
    w.write((slice(None), slice(None)), new)
    assert _tree_hash(out) == before
    assert w.commit() == out
    o = open_output(out)
    assert o["attributes"]["run"] == 2 and o["probabilities"].shape == (2, 20, 10)
    np.testing.assert_allclose(decode_probabilities(o["probabilities"][:]), new, atol=TOL["uint8"])
    assert sorted(os.listdir(tmp_path)) == ["o.zarr"]


def test_abort_leaves_nothing(tmp_path: Path) -> None:
    w = OutputWriter(tmp_path / "o.zarr", _spec())
    w.write((slice(0, 16), slice(0, 16)), _probs((16, 16), 2))
    w.abort()
    assert os.listdir(tmp_path) == []
    with pytest.raises(OutputError):
        w.commit()
    with pytest.raises(RuntimeError, match="boom"), OutputWriter(tmp_path / "o.zarr", _spec()):
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_abort_keeps_existing_output(tmp_path: Path) -> None:
    out = _write(tmp_path / "o.zarr", _spec(), _probs((40, 30), 2))
    before = _tree_hash(out)
    OutputWriter(out, _spec(), overwrite=True).abort()
    assert _tree_hash(out) == before and os.listdir(tmp_path) == ["o.zarr"]


def test_missing_parent_is_made_and_a_file_in_the_way_refused(tmp_path: Path) -> None:
    OutputWriter(tmp_path / "nope" / "deeper" / "o.zarr", _spec()).abort()
    assert (tmp_path / "nope" / "deeper").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="output directory .*file.* is not a folder"):
        OutputWriter(tmp_path / "file" / "o.zarr", _spec())


def test_invalid_spec(tmp_path: Path) -> None:
    for bad in (
        _spec(spatial_axes="XY"),
        _spec(chunks=(16,)),
        _spec(probabilities="int8"),
        _spec(probabilities=None, labels=False),
        _spec(num_classes=0),
        _spec(attributes={"f": object()}),
    ):
        with pytest.raises(InvalidArgumentError):
            OutputWriter(tmp_path / "o.zarr", bad)
    assert os.listdir(tmp_path) == []


def test_open_output_rejects_non_output(tmp_path: Path) -> None:
    with pytest.raises(OutputError):
        open_output(tmp_path / "missing.zarr")
    zarr.open_group(tmp_path / "plain.zarr", mode="w", zarr_format=3)
    with pytest.raises(OutputError):
        open_output(tmp_path / "plain.zarr")

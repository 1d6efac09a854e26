"""Lazy inputs, Dask output and OME-Zarr writing give the in-memory result."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile
import torch
import zarr

import tilerseg
from tilerseg import InvalidImageError, OutputError
from tilerseg.io.writers import decode_probabilities, open_output
from tilerseg.synthetic import membrane_image

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return membrane_image((300, 230), cell_size=25, seed=2)[0]


@pytest.fixture(scope="module")
def reference(image: np.ndarray, small_model: torch.nn.Module) -> np.ndarray:
    return tilerseg.segment(image, small_model, tile=64, device="cpu")


def _ome_pyramid(path: Path, image: np.ndarray) -> None:
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        options = dict(tile=(64, 64), photometric="minisblack",
                       metadata={"axes": "YX", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25})
        tif.write(image, subifds=1, **options)
        tif.write(image[::2, ::2], subfiletype=1, tile=(64, 64), photometric="minisblack")


def test_every_input_form_gives_the_same_probabilities(
    tmp_path: Path, image: np.ndarray, small_model: torch.nn.Module, reference: np.ndarray
) -> None:
    tifffile.imwrite(tmp_path / "tiled.tif", image, tile=(64, 64), bigtiff=True)
    tifffile.imwrite(tmp_path / "striped.tif", image)
    _ome_pyramid(tmp_path / "pyramid.ome.tif", image)
    zarr.create_array(tmp_path / "image.zarr", data=image, chunks=(100, 100), zarr_format=3)
    np.save(tmp_path / "image.npy", image)
    inputs = {
        "tiled TIFF": tmp_path / "tiled.tif",
        "striped TIFF": str(tmp_path / "striped.tif"),
        "OME-TIFF level 0": tmp_path / "pyramid.ome.tif",
        "Zarr path": tmp_path / "image.zarr",
        "npy": tmp_path / "image.npy",
        "dask array": da.from_array(image, chunks=(128, 128)),
        "zarr array": zarr.open_array(tmp_path / "image.zarr", mode="r"),
    }
    for name, source in inputs.items():
        lazy = tilerseg.segment(source, small_model, tile=64, device="cpu")
        assert isinstance(lazy, da.Array), name
        assert lazy.chunksize == (2, 64, 64), name
        assert np.abs(lazy.compute() - reference).max() <= TOLERANCE, name


def test_pyramid_level_is_the_same_as_the_downsampled_array(
    tmp_path: Path, image: np.ndarray, small_model: torch.nn.Module
) -> None:
    _ome_pyramid(tmp_path / "pyramid.ome.tif", image)
    level1 = tilerseg.segment(tmp_path / "pyramid.ome.tif", small_model, tile=32, device="cpu",
                              level=1).compute()
    expected = tilerseg.segment(image[::2, ::2], small_model, tile=32, device="cpu")
    assert np.abs(level1 - expected).max() <= TOLERANCE


class _Counting(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.calls, self.ndim, self.in_channels = inner, 0, 2, 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += not x.is_meta  # geometry probing runs on the meta device
        return self.inner(x)


def test_lazy_result_computes_nothing_until_asked(
    image: np.ndarray, small_model: torch.nn.Module
) -> None:
    model = _Counting(small_model)  # counts torch forwards: the torch runtime
    lazy = tilerseg.segment(da.from_array(image), model, tile=64, device="cpu",
                            backend="torch")
    assert model.calls == 0
    lazy[:, :64, :64].compute()
    assert model.calls == 1  # one tile, not the image


@pytest.mark.parametrize("dtype", ["uint8", "float16", "float32"])
def test_segment_to_zarr_matches_in_memory(
    tmp_path: Path, image: np.ndarray, small_model: torch.nn.Module, reference: np.ndarray,
    dtype: str,
) -> None:
    tifffile.imwrite(tmp_path / "slide.tif", image, tile=(64, 64), resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER")
    calls = []
    out = tilerseg.segment_to_zarr(tmp_path / "slide.tif", small_model, tile=64, device="cpu",
                                   output="both", dtype=dtype, batch_size=2,
                                   progress=lambda d, t: calls.append((d, t)))
    assert out == tmp_path / "slide.tilerseg.zarr"
    result = open_output(out)
    stored = result["probabilities"]
    assert stored.dtype == np.dtype(dtype) and stored.chunks == (2, 64, 64)
    tolerance = {"uint8": 0.5 / 255 + 1e-6, "float16": 1e-3, "float32": TOLERANCE}[dtype]
    assert np.abs(decode_probabilities(stored[:]) - reference).max() <= tolerance
    np.testing.assert_array_equal(result["labels"][:], reference.argmax(0))
    attrs = result["attributes"]
    assert attrs["complete"] and attrs["tile"] == [64, 64]
    assert attrs["normalization"] == {"method": "range", "low": 0.0, "high": 255.0}
    assert result["levels"] >= 2
    assert calls[-1] == (20, 20) and len(calls) == 20
    group = zarr.open_group(out, mode="r")
    scale = group.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    assert scale[0]["scale"][1:] == pytest.approx([0.5, 0.5])  # pixel size carried over
    from ome_zarr_models.v05.image import Image  # an independent OME-NGFF 0.5 validator

    validated = Image.from_zarr(group)
    assert validated.labels is not None and validated.labels.label_paths == ["segmentation"]


def test_sixteen_bit_images_use_global_percentiles(tmp_path: Path,
                                                   small_model: torch.nn.Module) -> None:
    rng = np.random.default_rng(0)
    image = (rng.normal(3000, 500, (120, 90))).clip(0, 65535).astype(np.uint16)
    tifffile.imwrite(tmp_path / "xray.tif", image)
    out = tilerseg.segment_to_zarr(tmp_path / "xray.tif", small_model, tmp_path / "o.zarr",
                                   tile=32, device="cpu", dtype="float32")
    norm = open_output(out)["attributes"]["normalization"]
    low, high = np.percentile(image, (1, 99.8))
    assert norm["method"] == "percentile" and norm["low"] == pytest.approx(low)
    expected = tilerseg.segment(image, small_model, tile=32, device="cpu",
                                normalize=(low, high))
    assert np.abs(open_output(out)["probabilities"][:] - expected).max() <= TOLERANCE


def test_channels_are_selected_lazily(tmp_path: Path, image: np.ndarray,
                                      small_model: torch.nn.Module, reference: np.ndarray) -> None:
    rgb = np.stack([image // 2, image, 255 - image], axis=-1)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb", tile=(64, 64))
    got = tilerseg.segment(tmp_path / "rgb.tif", small_model, tile=64, device="cpu", channel=[1])
    assert np.abs(got.compute() - reference).max() <= TOLERANCE
    with pytest.raises(InvalidImageError, match=r"3 channel\(s\).*takes 1"):
        tilerseg.segment(tmp_path / "rgb.tif", small_model, device="cpu")


def _tree_digest(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_failed_runs_leave_existing_output_untouched(
    tmp_path: Path, image: np.ndarray, small_model: torch.nn.Module
) -> None:
    out = tmp_path / "out.zarr"
    tilerseg.segment_to_zarr(image, small_model, out, tile=64, device="cpu")
    before = _tree_digest(out)
    with pytest.raises(OutputError, match="exists"):
        tilerseg.segment_to_zarr(image, small_model, out, tile=64, device="cpu")
    bad = np.concatenate([image] * 4).astype(np.float32)  # 1200 rows: 19 rows of tasks
    bad[1150, 200] = np.nan  # in the last row of tiles: found only when it is read
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(InvalidImageError, match="NaN or Inf"):
        tilerseg.segment_to_zarr(tmp_path / "nan.npy", small_model, out, tile=64, device="cpu",
                                 overwrite=True)
    assert _tree_digest(out) == before
    # the tiles before the bad one were recorded: kept, resumable, beside the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.npy", "out.zarr",
                                                          "out.zarr.partial"]
    assert 0 < tilerseg.status(out)["done"] < tilerseg.status(out)["tasks"]


def test_local_compute_restores_torch_threads(image: np.ndarray,
                                              small_model: torch.nn.Module, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    tilerseg.segment_to_zarr(image, small_model, tmp_path / "o.zarr", tile=64, device="cpu",
                             workers=2)
    assert torch.get_num_threads() == threads


def test_two_d_model_segments_a_z_stack_plane_by_plane(
    tmp_path: Path, small_model: torch.nn.Module
) -> None:
    planes = [membrane_image((90, 70), cell_size=20, seed=s)[0] for s in range(3)]
    folder = tmp_path / "stack"
    folder.mkdir()
    for z, plane in enumerate(planes):
        tifffile.imwrite(folder / f"slice_{z:02d}.tif", plane)
    out = tilerseg.segment_to_zarr(folder, small_model, tile=32, device="cpu", dtype="float32",
                                   output="both")
    assert out == tmp_path / "stack.tilerseg.zarr"
    result = open_output(out)
    assert result["probabilities"].shape == (2, 3, 90, 70)
    assert result["probabilities"].chunks == (2, 1, 32, 32)
    for z, plane in enumerate(planes):
        expected = tilerseg.segment(plane, small_model, tile=32, device="cpu")
        assert np.abs(result["probabilities"][:, z] - expected).max() <= TOLERANCE

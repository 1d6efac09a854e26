"""Tests of tilerseg.io.readers: every format read lazily and exactly, every error clear."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr

from tilerseg.errors import ImageNotFoundError, InvalidArgumentError, InvalidImageError
from tilerseg.io import ImageSource, open_image, sample_for_statistics
from tilerseg.io.readers import LazyView
from tilerseg.synthetic import membrane_image

MINISBLACK = {"photometric": "minisblack"}


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return membrane_image((256, 192), cell_size=24, seed=3)[0]


@pytest.fixture(scope="module")
def stack() -> np.ndarray:
    return membrane_image((4, 64, 80), cell_size=16, seed=5)[0]


def read_all(source: ImageSource) -> np.ndarray:
    return np.asarray(source.data[(slice(None),) * len(source.shape)])


def write_ome_pyramid(path, data: np.ndarray, metadata: dict, n_levels: int = 3) -> list:
    levels = [data[..., :: 2**k, :: 2**k] for k in range(n_levels)]
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(levels[0], tile=(64, 64), subifds=n_levels - 1, metadata=metadata, **MINISBLACK)
        for level in levels[1:]:
            tw.write(level, tile=(64, 64), subfiletype=1, **MINISBLACK)
    return levels


# --- TIFF ---------------------------------------------------------------------------


@pytest.mark.parametrize("tile", [(64, 64), None])
def test_tiff_tiled_and_striped(tmp_path, image, tile):
    path = tmp_path / "image.tif"
    tifffile.imwrite(path, image, bigtiff=True, tile=tile, **MINISBLACK)
    src = open_image(path)
    assert isinstance(src.data, zarr.Array)  # lazy, not numpy
    assert (src.axes, src.shape, src.levels, src.format) == ("YX", image.shape, (image.shape,), "tiff")
    assert src.path == str(path) and src.pixel_size == {} and src.dtype == np.uint8
    np.testing.assert_array_equal(src.data[10:70, 100:190], image[10:70, 100:190])
    np.testing.assert_array_equal(read_all(src), image)


def test_tiff_resolution_in_centimetres(tmp_path, image):
    path = tmp_path / "res.tif"
    tifffile.imwrite(path, image, resolution=(2e4, 4e4), resolutionunit="CENTIMETER")
    assert open_image(path).pixel_size == pytest.approx({"X": 0.5, "Y": 0.25})


def test_tiff_ignores_screen_dpi(tmp_path, image):
    path = tmp_path / "dpi.tif"
    tifffile.imwrite(path, image, resolution=(72, 72), resolutionunit="INCH")
    assert open_image(path).pixel_size == {}


def test_tiff_multipage_is_a_z_stack(tmp_path, stack):
    path = tmp_path / "pages.tif"
    tifffile.imwrite(path, stack, **MINISBLACK)
    src = open_image(path)
    assert src.axes == "ZYX"
    np.testing.assert_array_equal(src.data[2], stack[2])


def test_ome_tiff_pyramid(tmp_path, image):
    data = np.stack([image, 255 - image])
    metadata = {"axes": "CYX", "PhysicalSizeX": 500, "PhysicalSizeXUnit": "nm",
                "PhysicalSizeY": 0.25}
    levels = write_ome_pyramid(tmp_path / "pyr.ome.tif", data, metadata)
    src = open_image(tmp_path / "pyr.ome.tif")
    assert (src.format, src.axes, src.level) == ("ome-tiff", "CYX", 0)
    assert src.levels == tuple(lv.shape for lv in levels)
    assert src.pixel_size == pytest.approx({"X": 0.5, "Y": 0.25})
    assert isinstance(src.data, zarr.Array) and len(src.level_data) == 3
    np.testing.assert_array_equal(src.data[1, 5:50, 7:9], data[1, 5:50, 7:9])
    low = open_image(tmp_path / "pyr.ome.tif", level=2)
    assert low.shape == levels[2].shape and low.level == 2
    assert low.pixel_size == pytest.approx({"X": 2.0, "Y": 1.0})
    np.testing.assert_array_equal(read_all(low), levels[2])


def test_ome_tiff_zstack_is_reordered_lazily(tmp_path, stack):
    data = np.stack([stack, stack // 2], axis=1)  # ZCYX, OME's usual order
    path = tmp_path / "z.ome.tif"
    tifffile.imwrite(path, data, metadata={"axes": "ZCYX", "PhysicalSizeZ": 2.0,
                                           "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5},
                     **MINISBLACK)
    src = open_image(path)
    assert src.axes == "CZYX" and src.shape == (2, 4, 64, 80)
    assert isinstance(src.data, LazyView)
    assert src.pixel_size == pytest.approx({"Z": 2.0, "Y": 0.5, "X": 0.5})
    expected = data.transpose(1, 0, 2, 3)
    np.testing.assert_array_equal(src.data[:, 1:3, 10:20, 5], expected[:, 1:3, 10:20, 5])
    np.testing.assert_array_equal(src.data[1, ..., ::3], expected[1, ..., ::3])
    np.testing.assert_array_equal(np.asarray(src.data), expected)


def test_imagej_hyperstack(tmp_path, stack):
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, stack, imagej=True, resolution=(4.0, 4.0),
                     metadata={"axes": "ZYX", "spacing": 1.5, "unit": "micron"})
    src = open_image(path)
    assert (src.axes, src.format) == ("ZYX", "tiff")
    assert src.pixel_size == pytest.approx({"Z": 1.5, "Y": 0.25, "X": 0.25})
    np.testing.assert_array_equal(read_all(src), stack)


def test_svs(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    path = tmp_path / "slide.svs"
    with tifffile.TiffWriter(path) as tw:
        description = "Aperio Image Library Fake\n256x256 |AppMag = 20|MPP = 0.4990"
        tw.write(rgb, tile=(64, 64), photometric="rgb", description=description, metadata=None)
        tw.write(rgb[::4, ::4], photometric="rgb", metadata=None)  # thumbnail
        tw.write(rgb[::2, ::2], tile=(64, 64), photometric="rgb", metadata=None)
    src = open_image(path, level=1)
    assert (src.format, src.axes, src.levels) == ("svs", "YXS", ((256, 256, 3), (128, 128, 3)))
    assert src.pixel_size == pytest.approx({"Y": 0.998, "X": 0.998})
    np.testing.assert_array_equal(read_all(src), rgb[::2, ::2])


# --- folders and globs of slices -----------------------------------------------------


def test_folder_of_slices_sorted_naturally(tmp_path, stack):
    folder = tmp_path / "slices"
    folder.mkdir()
    for i in range(len(stack)):  # names 2 < 10 only in natural order
        tifffile.imwrite(folder / f"s_{[2, 10, 11, 100][i]}.tif", stack[i])
    (folder / "notes.txt").write_text("not a slice")
    src = open_image(folder)
    assert (src.format, src.axes, src.shape) == ("tiff-sequence", "ZYX", stack.shape)
    assert isinstance(src.data, zarr.Array)
    np.testing.assert_array_equal(src.data[1:3, 5:9], stack[1:3, 5:9])
    glob_src = open_image(str(folder / "s_1*.tif"))
    assert glob_src.shape == (3, 64, 80)
    np.testing.assert_array_equal(read_all(glob_src), stack[1:])


def test_folder_with_one_zarr(tmp_path, image):
    zarr.create_array(tmp_path / "only.zarr", data=image, chunks=(64, 64))
    src = open_image(tmp_path)
    assert src.format == "zarr"
    np.testing.assert_array_equal(read_all(src), image)


# --- Zarr and OME-Zarr ---------------------------------------------------------------


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_zarr_array(tmp_path, image, zarr_format):
    data = np.stack([image, image // 3])
    zarr.create_array(tmp_path / "a.zarr", data=data, chunks=(1, 64, 64), zarr_format=zarr_format)
    src = open_image(tmp_path / "a.zarr")
    assert (src.format, src.axes, src.shape) == ("zarr", "CYX", data.shape)
    assert isinstance(src.data, zarr.Array)
    np.testing.assert_array_equal(src.data[1, 60:130], data[1, 60:130])


def test_zarr_v3_dimension_names(tmp_path, stack):
    array = zarr.create_array(tmp_path / "d.zarr", shape=stack.shape, dtype=stack.dtype,
                              chunks=(1, 32, 32), dimension_names=["z", "y", "x"])
    array[:] = stack
    assert open_image(tmp_path / "d.zarr").axes == "ZYX"


def write_ome_zarr(path, levels, axes, scales, zarr_format, version="0.4"):
    group = zarr.open_group(path, mode="w", zarr_format=zarr_format)
    for k, level in enumerate(levels):
        group.create_array(str(k), data=level, chunks=(1,) * (level.ndim - 2) + (32, 32))
    datasets = [{"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": s}]}
                for k, s in enumerate(scales)]
    multiscales = [{"version": version, "axes": axes, "datasets": datasets}]
    if version == "0.5":
        group.attrs["ome"] = {"version": version, "multiscales": multiscales}
    else:
        group.attrs["multiscales"] = multiscales


@pytest.mark.parametrize(("zarr_format", "version"), [(2, "0.4"), (3, "0.5")])
def test_ome_zarr(tmp_path, image, zarr_format, version):
    data = np.stack([image, 255 - image])
    levels = [data, data[:, ::2, ::2]]
    axes = [{"name": "c", "type": "channel"},
            {"name": "y", "type": "space", "unit": "nanometer"},
            {"name": "x", "type": "space", "unit": "micrometer"}]
    write_ome_zarr(tmp_path / "img.zarr", levels, axes, [[1, 250, 0.25], [1, 500, 0.5]],
                   zarr_format, version)
    src = open_image(tmp_path / "img.zarr", level=1)
    assert (src.format, src.axes, src.levels) == ("ome-zarr", "CYX", (data.shape, levels[1].shape))
    assert src.pixel_size == pytest.approx({"Y": 0.5, "X": 0.5})
    assert open_image(tmp_path / "img.zarr").pixel_size == pytest.approx({"Y": 0.25, "X": 0.25})
    np.testing.assert_array_equal(read_all(src), levels[1])


def test_ome_zarr_5d_with_one_time_point(tmp_path, stack):
    data = stack[None, None]  # TCZYX, T=1, C=1
    axes = [{"name": n, "type": "space", "unit": "micrometer"} for n in "tczyx"]
    write_ome_zarr(tmp_path / "t.zarr", [data], axes, [[1, 1, 2, 0.5, 0.5]], 2)
    src = open_image(tmp_path / "t.zarr")
    assert (src.axes, src.shape) == ("CZYX", (1, *stack.shape))
    assert src.pixel_size == pytest.approx({"Z": 2.0, "Y": 0.5, "X": 0.5})
    np.testing.assert_array_equal(src.data[0, 3, 10:20], stack[3, 10:20])


# --- npy, PNG, JPEG, arrays --------------------------------------------------------


def test_npy_is_memory_mapped(tmp_path, stack):
    np.save(tmp_path / "s.npy", stack)
    src = open_image(tmp_path / "s.npy")
    assert isinstance(src.data, np.memmap) and src.format == "npy" and src.axes == "CYX"
    np.testing.assert_array_equal(read_all(src), stack)


def test_png_and_jpeg(tmp_path, image):
    imagecodecs = pytest.importorskip("imagecodecs")  # optional dependency (extra "io")
    imagecodecs.imwrite(tmp_path / "g.png", image)
    rgb = np.stack([image, image, 255 - image], axis=-1)
    imagecodecs.imwrite(tmp_path / "c.png", rgb)
    imagecodecs.imwrite(tmp_path / "c.jpg", rgb)
    gray = open_image(tmp_path / "g.png")
    assert (gray.format, gray.axes) == ("png", "YX")
    np.testing.assert_array_equal(read_all(gray), image)
    color = open_image(tmp_path / "c.png")
    assert color.axes == "YXS"
    np.testing.assert_array_equal(read_all(color), rgb)
    jpeg = open_image(tmp_path / "c.jpg")
    assert (jpeg.format, jpeg.axes, jpeg.shape) == ("jpeg", "YXS", rgb.shape)


def test_arrays(image, stack):
    assert open_image(image).axes == "YX"
    src = open_image(stack)
    assert (src.axes, src.format, src.path) == ("CYX", "array", None)
    assert open_image(stack[None]).axes == "CZYX"
    five = open_image(stack[None, None])
    assert (five.axes, five.shape) == ("CZYX", (1, *stack.shape))
    lazy = open_image(da.from_array(stack, chunks=(1, 32, 32)))
    assert lazy.format == "dask" and lazy.axes == "CYX"
    z = zarr.create_array(zarr.storage.MemoryStore(), data=stack)
    assert open_image(z).format == "zarr"
    assert open_image(np.zeros((64, 64, 3), np.uint8)).axes == "YXS"
    with pytest.raises(InvalidArgumentError, match="available levels: 0"):
        open_image(image, level=1)


def test_lazy_view_indexing_matches_numpy(stack):
    base = stack[None, :, None].repeat(2, axis=0)  # (2, Z, 1, Y, X)
    view = LazyView(zarr.create_array(zarr.storage.MemoryStore(), data=base), {2: 0}, [1, 0, 3, 4])
    expected = base[:, :, 0].transpose(1, 0, 2, 3)
    assert view.shape == expected.shape and view.dtype == expected.dtype
    for key in [(0,), (slice(1, 3), 1), (Ellipsis, 5), (2, Ellipsis, slice(None, None, 7)),
                (np.int64(-1), 0, -1, slice(3, 9)), (slice(None), slice(None), 4)]:
        np.testing.assert_array_equal(view[key], expected[key])


def test_sample_for_statistics(tmp_path, image):
    big = np.tile(image, (3, 3))  # (768, 576); level 1 has 110592 pixels, level 2 27648
    levels = write_ome_pyramid(tmp_path / "s.ome.tif", big, {"axes": "YX"}, n_levels=3)
    src = open_image(tmp_path / "s.ome.tif")
    sample = sample_for_statistics(src)
    assert sample.shape == levels[1].shape  # smallest level with >= 65536 pixels
    np.testing.assert_array_equal(sample, levels[1])
    array = np.random.default_rng(1).integers(0, 60000, (2, 1024, 1024), dtype=np.uint16)
    sample = sample_for_statistics(open_image(array), max_pixels=1 << 18)
    assert sample.shape[0] == 2 and sample.size <= 1 << 18 and sample.size >= 1 << 16
    assert np.isin(sample[0, :5, :5], array[0]).all()


# --- errors --------------------------------------------------------------------------


def test_missing_paths(tmp_path):
    with pytest.raises(ImageNotFoundError, match="does not exist"):
        open_image(tmp_path / "missing.tif")
    with pytest.raises(ImageNotFoundError, match="does not exist"):
        open_image(tmp_path / "no_folder")
    with pytest.raises(ImageNotFoundError, match="matches no files"):
        open_image(str(tmp_path / "*.tif"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageNotFoundError, match="contains no TIFF slices"):
        open_image(tmp_path / "empty")


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("empty.tif", b"", "empty file"),
        ("text.tif", b"hello, this is text\n" * 10, "not a TIFF file"),
        ("garbage.tif", bytes(range(256)) * 4, "not a TIFF file"),
        ("header.tif", b"II*\0\x08\0\0\0\x05", "is not a readable image"),
        ("image.xyz", b"some bytes", "unknown image format"),
        ("garbage.npy", b"\x93NUMPY nonsense", "is not a readable image"),
        ("garbage.png", b"\x89PNG\r\n\x1a\n" + bytes(50), "not a readable image|imagecodecs"),
    ],
)
def test_unreadable_files(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InvalidImageError, match=fragment) as info:
        open_image(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


@pytest.mark.parametrize("tile", [(64, 64), None])
def test_truncated_tiff(tmp_path, image, tile):
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, image, tile=tile, **MINISBLACK)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(InvalidImageError, match="truncated"):
        open_image(path)


def test_corrupt_pixel_data_found_at_open(tmp_path, image):
    path = tmp_path / "corrupt.tif"
    tifffile.imwrite(path, image, tile=(64, 64), compression="zlib", **MINISBLACK)
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages.first.dataoffsets[0]
    data = bytearray(path.read_bytes())
    data[offset : offset + 16] = bytes(16)
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidImageError, match="cannot read pixel data"):
        open_image(path)


def test_level_out_of_range(tmp_path, image):
    write_ome_pyramid(tmp_path / "p.ome.tif", image, {"axes": "YX"}, n_levels=2)
    with pytest.raises(InvalidArgumentError, match=r"level 2 .*available levels: 0 to 1"):
        open_image(tmp_path / "p.ome.tif", level=2)
    with pytest.raises(InvalidArgumentError, match="level -1"):
        open_image(tmp_path / "p.ome.tif", level=-1)


def test_unsupported_dtypes_and_dimensions(tmp_path):
    np.save(tmp_path / "c.npy", np.zeros((8, 8), np.complex64))
    with pytest.raises(InvalidImageError, match="unsupported dtype complex64"):
        open_image(tmp_path / "c.npy")
    with pytest.raises(InvalidImageError, match="unsupported dtype object"):
        open_image(np.empty((8, 8), dtype=object))
    with pytest.raises(InvalidImageError, match="6 dimensions"):
        open_image(np.zeros((1, 1, 1, 1, 8, 8), np.uint8))
    with pytest.raises(InvalidImageError, match="1 dimensions"):
        open_image(np.zeros(8, np.uint8))


def test_time_series_rejected(tmp_path, stack):
    path = tmp_path / "t.tif"
    tifffile.imwrite(path, stack, imagej=True, metadata={"axes": "TYX"})
    with pytest.raises(InvalidImageError, match="time axis of length 4"):
        open_image(path)
    with pytest.raises(InvalidImageError, match="time axis of length 2"):
        open_image(np.zeros((2, 1, 1, 8, 8), np.uint8))


def test_zarr_group_without_multiscales(tmp_path):
    group = zarr.open_group(tmp_path / "g.zarr", mode="w")
    group.create_array("raw", shape=(8, 8), dtype="u1")
    with pytest.raises(InvalidImageError, match="without OME-Zarr 'multiscales'.*raw"):
        open_image(tmp_path / "g.zarr")


def test_slices_of_different_shapes(tmp_path, stack):
    for i, shape in enumerate([(64, 80), (64, 80), (32, 32)]):
        tifffile.imwrite(tmp_path / f"s{i}.tif", stack[0][: shape[0], : shape[1]])
    with pytest.raises(InvalidImageError, match="slices differ"):
        open_image(tmp_path)


def test_glob_of_mixed_files(tmp_path, image):
    tifffile.imwrite(tmp_path / "a.tif", image)
    np.save(tmp_path / "a.npy", image)
    with pytest.raises(InvalidImageError, match="not all TIFF slices"):
        open_image(str(tmp_path / "a.*"))


def test_unknown_source_type():
    with pytest.raises(InvalidArgumentError, match="cannot open an image from a dict"):
        open_image({"not": "an image"})

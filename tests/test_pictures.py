"""Pictures of results and of tile plans: from real runs, the right size, reading only the
level they need (chunk reads counted at the zarr store), touching objects in different
colours, the plan's write regions, one-line CLI errors."""

from __future__ import annotations

import logging
import shutil
import sys

import numpy as np
import pytest
import tifffile
import torch
import zarr
from PIL import Image
from scipy import ndimage
from torch import nn
from zarr.storage import LocalStore

import tilerseg
from tilerseg.cli import main
from tilerseg.errors import InvalidArgumentError, OutputError
from tilerseg.pictures import draw, plot_plan, plot_tile, preview, render_preview, save_png
from tilerseg.pictures.plan import GRID_COLOR, MIRROR_TINT, WINDOW_COLORS
from tilerseg.synthetic import membrane_image

SHAPE, CHUNK, PIXEL = (320, 256), 32, 0.5


class PerPixel(nn.Module):
    """A real per-pixel model (one 1x1 convolution): foreground ``sigmoid(12 (x - 0.3))``."""

    def __init__(self) -> None:
        super().__init__()
        self.in_channels = 1
        self.conv = nn.Conv2d(1, 1, 1)
        with torch.no_grad():
            self.conv.weight.fill_(12.0)
            self.conv.bias.fill_(-12.0 * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def write_ome_zarr(path, image: np.ndarray, levels: int = 3) -> None:
    """An OME-Zarr (v0.5) pyramid written with zarr: each level every other pixel."""
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    datasets = []
    for k in range(levels):
        data = image[:: 2**k, :: 2**k]
        root.create_array(str(k), data=data, chunks=(CHUNK, CHUNK), dimension_names=("y", "x"))
        datasets.append({"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": [PIXEL * 2**k, PIXEL * 2**k]}]})
    root.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": "y", "type": "space", "unit": "micrometer"},
                 {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": datasets}]}


class ChunkReads:
    """Every chunk key read from a local zarr store (metadata excluded), by store root."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.keys: list[tuple[str, str]] = []
        original = LocalStore.get

        async def get(store, key, *args, **kwargs):
            if "/c/" in key or key.startswith("c/"):
                self.keys.append((str(store.root), key))
            return await original(store, key, *args, **kwargs)

        monkeypatch.setattr(LocalStore, "get", get)

    def of(self, root) -> set[str]:
        return {k for r, k in self.keys if r.rstrip("/").endswith(str(root).rstrip("/"))}


@pytest.fixture(scope="module")
def run(tmp_path_factory, small_model):
    """A run of the small U-Net on a pyramidal OME-Zarr input (3 levels), with labels."""
    folder = tmp_path_factory.mktemp("run")
    image, _ = membrane_image(SHAPE, cell_size=24, seed=3)
    write_ome_zarr(folder / "in.ome.zarr", image)
    out = tilerseg.segment_to_zarr(folder / "in.ome.zarr", small_model, folder / "out.zarr",
                                   tile=CHUNK, output="both", backend="torch", device="cpu")
    return folder, out


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    """A run with instance labels (split) of two overlapping discs and a few blobs."""
    folder = tmp_path_factory.mktemp("objects")
    yy, xx = np.indices((96, 128))
    image = np.zeros((96, 128), np.float32)
    for cy, cx, r in ((40, 40, 20), (40, 67, 20), (78, 105, 10), (15, 110, 8)):
        image = np.maximum(image, np.clip(1 - np.hypot(yy - cy, xx - cx) / r, 0, 1))
    write_ome_zarr(folder / "in.ome.zarr", image, levels=1)
    out = tilerseg.segment_to_zarr(folder / "in.ome.zarr", PerPixel(), folder / "o.zarr",
                                   tile=CHUNK, output="instances", instances="split",
                                   split_radius=7, backend="torch", normalize=False)
    return folder, out


# --- preview --------------------------------------------------------------------------------


@pytest.mark.parametrize("size, level, shape", [
    (2048, 0, (320, 256)), (200, 1, (160, 128)), (100, 2, (80, 64)), (50, 3, (40, 32))])
def test_preview_reads_only_the_level_that_fits(run, monkeypatch, size, level, shape):
    folder, out = run
    reads = ChunkReads(monkeypatch)
    result = render_preview(out, size=size, show="labels")
    assert result.picture.shape == (*shape, 3) and result.picture.dtype == np.uint8
    assert result.level == level
    # the output: exactly the chunks of that level of the shown layer
    expected = {f"labels/segmentation/{level}/c/{i}/{j}" for i in range(-(-shape[0] // CHUNK))
                for j in range(-(-shape[1] // CHUNK))}
    assert reads.of(out) == expected
    # the input: only its level of the same resolution (level 2, strided, for level 3)
    read_in = reads.of(folder / "in.ome.zarr")
    assert read_in and {k.split("/")[0] for k in read_in} == {str(min(level, 2))}
    assert result.input_level == min(level, 2) and result.input_stride == (2 if level == 3 else 1)


def test_preview_reads_only_the_level_it_needs_of_an_ome_tiff_pyramid(tmp_path, monkeypatch):
    from tifffile.zarr import ZarrTiffStore

    image, _ = membrane_image(SHAPE, cell_size=24, seed=4)
    with tifffile.TiffWriter(tmp_path / "in.ome.tif") as tif:  # levels as SubIFDs
        tif.write(image, subifds=2, tile=(CHUNK, CHUNK),
                  metadata={"axes": "YX", "PhysicalSizeX": PIXEL, "PhysicalSizeY": PIXEL})
        for k in (1, 2):
            tif.write(image[:: 2**k, :: 2**k], subfiletype=1, tile=(CHUNK, CHUNK))
    out = tilerseg.segment_to_zarr(tmp_path / "in.ome.tif", PerPixel(), tmp_path / "o.zarr",
                                   tile=CHUNK, output="labels", backend="torch")
    shapes: list[tuple[int, ...]] = []
    original = ZarrTiffStore.get

    async def get(store, key, *args, **kwargs):
        if not key.endswith(("zarr.json", ".zarray", ".zattrs", ".zgroup")):
            shapes.append(tuple(store._data[0].shape))  # the level this store reads
        return await original(store, key, *args, **kwargs)

    monkeypatch.setattr(ZarrTiffStore, "get", get)
    for size, level, read in ((100, 2, (80, 64)), (200, 1, (160, 128)), (50, 3, (80, 64)),
                              (2048, 0, (320, 256))):
        shapes.clear()
        result = render_preview(out, size=size)
        assert result.level == level and result.picture.shape[:2] == (-(-320 // 2**level),
                                                                       -(-256 // 2**level))
        assert shapes and set(shapes) == {read}, (size, set(shapes))


def test_preview_region_reads_the_overlapping_full_resolution_chunks(run, monkeypatch):
    folder, out = run
    reads = ChunkReads(monkeypatch)
    result = render_preview(out, region=((40, 100), (33, 90)), show="probabilities")
    assert result.picture.shape == (60, 57, 3) and result.level == 0
    assert reads.of(out) == {f"0/c/0/{i}/{j}" for i in (1, 2, 3) for j in (1, 2)}
    assert {k.split("/")[0] for k in reads.of(folder / "in.ome.zarr")} == {"0"}
    # a region larger than --size is read at the level where it fits
    reads.keys.clear()
    result = render_preview(out, size=64, region=((0, 256), (0, 128)), show="probabilities")
    assert result.level == 2 and result.picture.shape == (64, 32, 3)
    assert {k.split("/")[0] for k in reads.of(out)} == {"2"}


def test_preview_draws_probabilities_over_the_input(run):
    folder, out = run
    picture = preview(out, show="probabilities", class_index=1, legend=False, scale_bar=False)
    stored = np.asarray(tilerseg.io.writers.open_output(out)["probabilities"][1])
    assert stored.dtype == np.uint8  # probability k / 255
    image = zarr.open_array(str(folder / "in.ome.zarr" / "0"), mode="r")[:]
    assert image.dtype == np.uint8  # drawn as its own grey level
    # the reference: matplotlib's viridis at 0, 1/4, 1/2, 3/4 and 1 (#440154, #3b528b,
    # #21918c, #5ec962, #fde725), each pixel the input's grey * (1 - a) + colour * a with
    # a = 0.6 p; exact where p is one of those values, interpolated (within 21) elsewhere
    known = np.array([0, 64, 128, 192, 255])
    colours = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98),
                        (253, 231, 37)], float)
    colour = np.stack([np.interp(stored, known, colours[:, c]) for c in range(3)], axis=-1)
    a = 0.6 * stored[..., None] / 255.0
    expected = image[..., None] * (1 - a) + colour * a
    error = np.abs(picture.astype(float) - expected)
    at_known = np.isin(stored, known[1:4])
    assert at_known.sum() > 100
    assert error[at_known].max() <= 3
    assert error.max() <= 0.6 * 21 + 1


def test_preview_scale_bar_is_a_round_length_of_the_pixel_size(run):
    _, out = run
    plain = preview(out, show="labels", legend=False, scale_bar=False)
    barred = preview(out, show="labels", legend=False)
    white = np.all(barred == 255, axis=-1) & ~np.all(plain == 255, axis=-1)
    rows = np.nonzero(white.sum(axis=1) > 10)[0]
    length = white[rows[-1]].sum()  # the bar's last row: no text there
    # 0.5 um pixels, 256 px wide: at most 20% of 128 um -> 20 um = 40 px
    assert draw.nice_length(0.2 * 256 * PIXEL) == 20 and length in (40, 41)


def test_touching_objects_get_different_colours(objects):
    _, out = objects
    instances = tilerseg.io.writers.open_output(out)["instances"][:]
    a, b = instances[40, 40], instances[40, 67]
    assert a and b and a != b  # the split separated the two discs...
    boundary = ndimage.binary_dilation(instances == a) & (instances == b)
    assert boundary.any()  # ...which touch
    picture = preview(out, legend=False, scale_bar=False)
    assert picture.shape == (96, 128, 3)
    colour_a, colour_b = picture[40, 36].astype(int), picture[40, 71].astype(int)
    assert np.abs(colour_a - colour_b).sum() > 60
    # every touching pair differs, also on a crowded Voronoi tiling
    cells = ndimage.label(membrane_image((200, 200), cell_size=12, seed=1)[1])[0]
    nearest = ndimage.distance_transform_edt(cells == 0, return_indices=True)[1]
    labels = cells[tuple(nearest)]  # the membranes filled by the nearest cell: cells touch
    n = len(draw.INSTANCE_PALETTE)
    ids, colours = draw.instance_colors(labels)
    lut = np.zeros((labels.max() + 1, 3), int)
    lut[ids] = colours
    for x, y in ((labels[1:], labels[:-1]), (labels[:, 1:], labels[:, :-1])):
        touch = (x != y) & (x > 0) & (y > 0)
        assert touch.sum() > 500
        clash = (x[touch] * 7) % n == (y[touch] * 7) % n  # their colours before the fix-up
        assert clash.any()
        assert (lut[x[touch]] != lut[y[touch]]).any(axis=1).all()


def test_preview_of_a_z_stack_draws_one_plane(tmp_path):
    stack = np.stack([membrane_image((64, 80), cell_size=16, seed=z)[0] for z in range(5)])
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    out = tilerseg.segment_to_zarr(tmp_path / "stack.tif", PerPixel(), tmp_path / "o.zarr",
                                   tile=CHUNK,
                                   output="both", backend="torch")
    middle = render_preview(out, show="labels", legend=False)
    assert middle.picture.shape == (64, 80, 3)
    other = render_preview(out, show="labels", legend=False, z=0)
    assert not np.array_equal(middle.picture, other.picture)
    with pytest.raises(InvalidArgumentError, match="plane"):
        render_preview(out, z=5)


def test_preview_without_its_input_draws_the_result_alone(run, tmp_path, caplog):
    folder, out = run
    copy = tmp_path / "in.ome.zarr"
    shutil.copytree(folder / "in.ome.zarr", copy)
    moved = tilerseg.segment_to_zarr(copy, PerPixel(), tmp_path / "o.zarr", tile=CHUNK,
                                     output="labels", backend="torch")
    shutil.rmtree(copy)
    with caplog.at_level(logging.WARNING, logger="tilerseg"):
        result = render_preview(moved, size=100)
    assert result.picture.shape == (80, 64, 3) and result.input_level is None
    assert any("gone" in r.getMessage() for r in caplog.records)


def test_preview_finds_an_input_given_by_a_relative_path_from_elsewhere(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    np.save(tmp_path / "a" / "img.npy", membrane_image((64, 64), seed=1)[0])
    monkeypatch.chdir(tmp_path / "a")
    out = tilerseg.segment_to_zarr("img.npy", PerPixel(), tmp_path / "o.zarr", tile=CHUNK,
                                   output="labels", backend="torch")
    monkeypatch.chdir(tmp_path)
    assert render_preview(out).input_level == 0


def test_preview_refuses_what_it_cannot_draw(run, tmp_path):
    folder, out = run
    with pytest.raises(OutputError, match="not a tilerseg output"):
        preview(folder / "in.ome.zarr")
    with pytest.raises(OutputError):
        preview(tmp_path / "missing.zarr")
    with pytest.raises(InvalidArgumentError, match="not inside"):
        preview(out, region=((0, 400), (0, 10)))
    with pytest.raises(InvalidArgumentError, match="not a layer"):
        preview(out, show="outlines")
    with pytest.raises(InvalidArgumentError, match="has no instances"):
        preview(out, show="instances")
    with pytest.raises(InvalidArgumentError, match="classes"):
        preview(out, show="probabilities", class_index=2)
    np.save(tmp_path / "other.npy", np.zeros((100, 100), np.uint8))
    with pytest.raises(tilerseg.TilersegError, match="the output is 320 x 256"):
        preview(out, image=tmp_path / "other.npy")


def test_cli_preview_writes_the_png_and_errors_are_one_line(run, tmp_path, capsys):
    folder, out = run
    png = tmp_path / "p.png"
    assert main(["preview", str(out), "-o", str(png), "--size", "100"]) == 0
    assert "output level 2" in capsys.readouterr().out
    assert Image.open(png).size == (64, 80)  # (width, height)
    assert main(["preview", str(out), "-o", str(png), "--region", "0:64,0:32"]) == 0
    assert Image.open(png).size == (32, 64)
    bad = [
        ["preview", str(folder / "in.ome.zarr"), "-o", str(png)],  # not a tilerseg output
        ["preview", str(out), "-o", str(png), "--region", "0:999,0:10"],
        ["preview", str(out), "-o", str(png), "--region", "nonsense"],
        ["preview", str(out), "-o", str(png), "--show", "bogus"],
        ["preview", str(out), "-o", str(tmp_path / "p.jpg")],
        ["preview", str(out), "-o", str(png), "--size", "0"],
    ]
    for argv in bad:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("tilerseg: error: ") and err.count("\n") == 1, err


def test_a_missing_pillow_is_one_line_naming_the_extra(run, tmp_path, monkeypatch, capsys):
    _, out = run
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL now raises ImportError
    with pytest.raises(InvalidArgumentError, match=r"tilerseg\[plot\]"):
        preview(out)
    assert main(["preview", str(out), "-o", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "tilerseg[plot]"' in err
    assert main(["info", "x.tif", "--plot", str(tmp_path / "plan.png")]) == 2
    assert "tilerseg[plot]" in capsys.readouterr().err


# --- the plan -------------------------------------------------------------------------------


def runs(mask: np.ndarray) -> int:
    """Number of runs of True in a 1-D mask."""
    return int(np.count_nonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])) == 1))


@pytest.mark.parametrize("shape, tile, size", [((700, 500), 64, 600), ((300, 900), 128, 450)])
def test_plan_picture_shows_every_write_region(small_model, shape, tile, size):
    image = np.full(shape, 128, np.uint8)
    picture = plot_plan(image, small_model, tile=tile, size=size, windows=0, legend=False,
                        device="cpu")
    plan = tilerseg.plan(shape, small_model, tile=tile)
    assert max(picture.shape[:2]) == size
    grid = np.all(picture == GRID_COLOR, axis=-1)
    # borders between and around the write regions: grid + 1 lines on each axis
    assert runs(grid[grid.shape[0] // 2 + 1]) == plan.grid[1] + 1
    assert runs(grid[:, grid.shape[1] // 2 + 1]) == plan.grid[0] + 1
    # the mirrored border is shaded outside the image only
    tinted = np.all(picture == MIRROR_TINT, axis=-1)
    rows, cols = np.nonzero(grid)
    inside = np.zeros_like(tinted)
    inside[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
    assert tinted[~inside].mean() > 0.1 and not tinted[inside].any()


def test_plan_picture_draws_a_few_read_windows_of_a_huge_plan(small_model):
    """100 000 tiles: every n-th border, three windows, a fraction of a second."""
    big = zarr.create_array(store={}, shape=(20000, 20000), chunks=(2048, 2048), dtype="uint8",
                            fill_value=100)
    picture = plot_plan(big, small_model, tile=64, size=512, device="cpu")
    assert max(picture.shape[:2]) == 512
    for colour in WINDOW_COLORS[:3]:
        assert np.all(picture == colour, axis=-1).any()
    assert not np.all(picture == WINDOW_COLORS[3], axis=-1).any()


def test_tile_picture_places_window_crop_and_grid_origin(small_model):
    g = tilerseg.model_geometry(small_model)
    h, step = g.halo[0], g.step[0]
    window = g.window_for_tile(64)
    picture = plot_tile(np.zeros((200, 200), np.uint8), small_model, tile=64, size=400,
                        legend=False)
    scale = 400 / (window + 2 * step)  # the window and a pooling step of margin each side

    def box(colour):
        rows, cols = np.nonzero(np.all(picture == colour, axis=-1))
        return rows.min(), rows.max(), cols.min(), cols.max()

    lo, hi = round(step * scale), round((step + window) * scale) - 1
    assert box((255, 64, 64)) == (lo, hi, lo, hi)  # the input window
    lo, hi = round((step + h) * scale), round((step + h + 64) * scale) - 1
    r0, r1, c0, c1 = box(GRID_COLOR)  # the output crop, h inside the window
    assert (r1, c1) == (hi, hi)  # its top and left lie under the image's edge (2 px wide)
    assert lo <= r0 <= lo + 2 and lo <= c0 <= lo + 2
    assert np.all(picture[lo, lo + 10:hi - 10] == 255)  # the image's edge, white
    r0, r1, c0, c1 = box((64, 255, 64))  # the pooling grid's origin: the window's corner
    centre = round(step * scale)
    assert r0 < centre < r1 and c0 < centre < c1


def test_cli_info_plot(tmp_path, capsys):
    image, _ = membrane_image((300, 200), seed=0)
    np.save(tmp_path / "img.npy", image)
    png = tmp_path / "plan.png"
    assert main(["info", str(tmp_path / "img.npy"), "--model", "unet", "--tile", "64",
                 "--device", "cpu", "--plot", str(png), "--plot-size", "300"]) == 0
    assert f"picture     {png}" in capsys.readouterr().out
    assert max(Image.open(png).size) == 300
    for argv in (["info", "--plot", str(png)],
                 ["info", str(tmp_path / "img.npy"), "--plot", str(tmp_path / "plan.gif")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("tilerseg: error: ") and err.count("\n") == 1


def test_save_png_round_trips(tmp_path):
    picture = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    save_png(picture, tmp_path / "x.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "x.png")), picture)
    with pytest.raises(InvalidArgumentError, match=".png"):
        save_png(picture, tmp_path / "x.jpg")


# --- the bundled model and the documentation's figures ---------------------------------------


def test_preview_of_a_bundled_model_run_colours_the_cells_over_the_grey_slide(tmp_path):
    image, mask = membrane_image((384, 384), seed=2)
    np.save(tmp_path / "slide.npy", image)
    out = tilerseg.segment_to_zarr(tmp_path / "slide.npy", tilerseg.load_model(),
                                   tmp_path / "o.zarr", tile=384, output="instances",
                                   backend="torch", device="cpu")
    result = render_preview(out, legend=False, scale_bar=False)
    assert result.layer == "instances" and result.input_level == 0
    picture = result.picture.astype(int)
    assert picture.shape == (384, 384, 3)
    instances = tilerseg.io.writers.open_output(out)["instances"][:]
    assert instances.max() > 20  # the cells were found
    colour = picture.max(axis=-1) - picture.min(axis=-1)  # 0 for grey
    assert np.median(colour[instances > 0]) > 60  # cells are coloured
    assert np.median(colour[instances == 0]) < 10  # membranes show the grey slide
    np.testing.assert_array_equal(result.picture[instances == 0],
                                  draw.grey(image)[instances == 0])


@pytest.mark.slow  # 3.5 to 6.5 s measured; the bundled model's preview is tested above
def test_the_documentation_figures_are_generated(tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "docs" / "gen_figures.py"
    spec = importlib.util.spec_from_file_location("gen_figures", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    paths = module.generate(tmp_path / "figures")
    assert [p.name for p in paths] == ["geometry.png", "plan.png", "preview.png",
                                       "instances.png"]
    assert Image.open(paths[0]).size == (800, 800)
    assert max(Image.open(paths[1]).size) == 900
    assert Image.open(paths[2]).size == (768, 1024)
    assert Image.open(paths[3]).size == (512, 384)


# --- review fixes ----------------------------------------------------------------------------


def test_preview_of_a_coarse_level_of_a_z_stack_draws_the_input_plane_of_the_result(
        tmp_path, monkeypatch):
    """The output halves Z: plane 1 of level 1 stands for plane 2 (labels: nearest) or the
    mean of planes 2 and 3 (probabilities); the input and the legend follow it."""
    stack = np.zeros((8, 160, 256), np.uint8)
    for z in range(8):
        stack[z, :, 32 * z:32 * z + 32] = 255  # plane z: bright columns 32z to 32z + 31
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    out = tilerseg.segment_to_zarr(tmp_path / "stack.tif", PerPixel(), tmp_path / "o.zarr",
                                   tile=CHUNK, output="both", backend="torch")
    legends: list[list[str]] = []
    original = draw.draw_text

    def spy(picture, lines, **kwargs):
        legends.append(list(lines))
        return original(picture, lines, **kwargs)

    monkeypatch.setattr(draw, "draw_text", spy)

    def bright_columns(picture):
        return set(np.nonzero(picture[..., 0].min(axis=0) > 128)[0].tolist())

    def labelled_columns(result):
        return set(np.nonzero((result.picture != 0).any(axis=(0, 2)))[0].tolist())

    # level 0: plane 3 everywhere (columns 96 to 127)
    fine = render_preview(out, size=2048, z=3, show="labels", legend=False, scale_bar=False)
    assert fine.level == 0 and labelled_columns(fine) == set(range(96, 128))
    # level 1 (columns halved): the labels of plane 2 are columns 32 to 47...
    coarse = render_preview(out, size=128, z=3, show="labels", legend=False, scale_bar=False)
    assert coarse.level == 1 and coarse.picture.shape == (80, 128, 3)
    assert labelled_columns(coarse) == set(range(32, 48))
    # ...and the input drawn under them is plane 2 too (opacity 0: the input alone)
    under = render_preview(out, size=128, z=3, show="probabilities", opacity=0,
                           legend=False, scale_bar=False)
    assert bright_columns(under.picture) == set(range(32, 48))
    legends.clear()
    render_preview(out, size=128, z=3, show="labels", scale_bar=False)
    assert "z 2" in legends[0][1] and "z 3" not in legends[0][1]
    legends.clear()
    render_preview(out, size=128, z=3, show="probabilities", scale_bar=False)
    assert "mean of planes 2 to 3" in legends[0][1]


def test_preview_refuses_an_explicit_image_that_does_not_exist(run, tmp_path, capsys):
    _, out = run
    missing = tmp_path / "nonexist.tif"
    with pytest.raises(tilerseg.errors.ImageNotFoundError, match="nonexist.tif"):
        render_preview(out, image=missing)
    png = tmp_path / "e.png"
    assert main(["preview", str(out), "-o", str(png), "--image", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tilerseg: error: ") and err.count("\n") == 1
    assert not png.exists()


@pytest.fixture(scope="module")
def plain_tiff_run(tmp_path_factory):
    """A run on a 300 x 1000 TIFF without a pyramid (probabilities)."""
    folder = tmp_path_factory.mktemp("plain")
    image = np.random.default_rng(5).integers(0, 256, (300, 1000), dtype=np.uint8)
    tifffile.imwrite(folder / "in.tif", image, photometric="minisblack")
    return tilerseg.segment_to_zarr(folder / "in.tif", PerPixel(), folder / "o.zarr",
                                    tile=64, output="probabilities", backend="torch")


@pytest.mark.parametrize("region", [((40, 100), (32, 90)), ((41, 101), (33, 91)),
                                    ((3, 299), (1, 999)), ((101, 141), (5, 63))])
def test_preview_region_of_a_strided_input_is_the_crop_of_the_whole_preview(plain_tiff_run,
                                                                            region):
    """A TIFF without a pyramid, read every other pixel at output level 1: a region's
    picture is the crop of the whole picture at any offset, odd ones included."""
    out = plain_tiff_run
    options = dict(size=500, show="probabilities", legend=False, scale_bar=False)
    whole = render_preview(out, **options)
    assert whole.level == 1 and whole.input_stride == 2
    # level-1 pixel i stands for full-resolution pixels 2i and 2i + 1
    (y0, y1), (x0, x1) = region
    crop = whole.picture[y0 // 2:-(-y1 // 2), x0 // 2:-(-x1 // 2)]
    fits_at_level_1 = max(crop.shape[:2])
    part = render_preview(out, region=region, **{**options, "size": fits_at_level_1})
    assert part.level == 1 and part.input_stride == 2
    np.testing.assert_array_equal(part.picture, crop)


@pytest.mark.parametrize("stack, size", [(False, 200), (True, 300), (False, 64)])
def test_plan_legend_lies_inside_small_pictures(small_model, tmp_path, caplog, stack, size):
    if stack:
        tifffile.imwrite(tmp_path / "s.tif", np.zeros((6, 100, 120), np.uint8),
                         photometric="minisblack")
        image = tmp_path / "s.tif"
    else:
        image = np.zeros((60, 50), np.uint8)
    with caplog.at_level(logging.INFO, logger="tilerseg"):
        drawn = plot_plan(image, small_model, tile=32, size=size, device="cpu")
    bare = plot_plan(image, small_model, tile=32, size=size, device="cpu", legend=False)
    legend = (drawn != bare).any(axis=-1)
    if not legend.any():  # too small for any legend: said so
        assert any("legend" in r.getMessage() for r in caplog.records)
        return
    rows, cols = np.nonzero(legend)
    h, w = drawn.shape[:2]
    assert rows.min() > 0 and cols.min() > 0 and rows.max() < h - 1 and cols.max() < w - 1


def test_cli_info_plot_size_is_checked_before_anything_is_printed(tmp_path, capsys):
    np.save(tmp_path / "img.npy", np.zeros((64, 64), np.uint8))
    png = tmp_path / "plan.png"
    assert main(["info", str(tmp_path / "img.npy"), "--model", "unet", "--device", "cpu",
                 "--plot", str(png), "--plot-size", "10"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("tilerseg: error: --plot-size 10 ")
    assert captured.err.count("\n") == 1 and not png.exists()


# --- URLs -----------------------------------------------------------------------------------


def test_cli_preview_of_file_urls_draws_the_input(run, tmp_path, capsys):
    folder, out = run
    png, local = tmp_path / "url.png", tmp_path / "local.png"
    assert main(["preview", str(out), "-o", str(local), "--size", "100"]) == 0
    assert main(["preview", out.as_uri(), "-o", str(png), "--size", "100",
                 "--image", (folder / "in.ome.zarr").as_uri()]) == 0, capsys.readouterr().err
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(local)))


def test_preview_of_a_memory_output_of_a_memory_input_draws_the_input(tmp_path, caplog):
    import uuid

    import fsspec

    memory, prefix = fsspec.filesystem("memory"), f"/tilerseg-preview-{uuid.uuid4().hex}"
    image = membrane_image((96, 80), cell_size=24, seed=4)[0]
    try:
        write_ome_zarr(f"memory://{prefix}/in.ome.zarr", image, levels=1)
        write_ome_zarr(tmp_path / "in.ome.zarr", image, levels=1)
        url = tilerseg.segment_to_zarr(f"memory://{prefix}/in.ome.zarr", PerPixel(),
                                       f"memory://{prefix}/o.zarr", tile=CHUNK,
                                       output="labels", backend="torch")
        local = tilerseg.segment_to_zarr(tmp_path / "in.ome.zarr", PerPixel(),
                                         tmp_path / "o.zarr", tile=CHUNK, output="labels",
                                         backend="torch")
        with caplog.at_level(logging.WARNING, logger="tilerseg"):
            got = render_preview(url, size=100)
        assert not [r for r in caplog.records if "drawn alone" in r.getMessage()]
        assert got.input_level == 0
        assert np.array_equal(got.picture, render_preview(local, size=100).picture)
        assert np.array_equal(preview(url, size=100), got.picture)
    finally:
        if memory.exists(prefix):
            memory.rm(prefix, recursive=True)

"""Instance labels across chunks: the same partition as whole-image scipy, resumable,
on a cluster. References are computed here with scipy on the whole image."""

from __future__ import annotations

import csv
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from torch import nn

import tilerseg
from tilerseg.cli import main
from tilerseg.engine.instances import InstanceRun
from tilerseg.engine.workdir import work_path
from tilerseg.errors import InvalidArgumentError
from tilerseg.instances import IdMap, face_pairs, id_dtype, label_chunk, span_of
from tilerseg.io.writers import decode_probabilities, open_output

from .test_resume import assert_same_arrays, done_count, kill_when

THRESHOLD = 0.5


class Passthrough(nn.Module):
    """A per-pixel model: foreground probability ``sigmoid(12 (x - 0.3))``."""

    def __init__(self, ndim: int) -> None:
        super().__init__()
        self.ndim, self.in_channels = ndim, 1
        self.conv = (nn.Conv2d if ndim == 2 else nn.Conv3d)(1, 1, 1)
        with torch.no_grad():
            self.conv.weight.fill_(12.0)
            self.conv.bias.fill_(-12.0 * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def blobs(shape: tuple[int, ...], count: int, seed: int, radius=(4, 9)) -> np.ndarray:
    """Cones of random radius at random centres (max over cones), float32 in [0, 1]:
    touching cones make touching objects with a saddle between them."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=np.float32)
    image = np.zeros(shape, np.float32)
    for _ in range(count):
        centre = [rng.uniform(0, n) for n in shape]
        r = rng.uniform(*radius)
        d = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))
        image = np.maximum(image, np.clip(1 - d / r, 0, 1))
    return image


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label images are one partition up to a renumbering (0 kept as 0)."""
    if not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a.ravel(), b.ravel()], axis=1), axis=0)
    return len(pairs) == len(np.unique(pairs[:, 0])) == len(np.unique(pairs[:, 1]))


def stored_probability(out) -> np.ndarray:
    return decode_probabilities(open_output(out)["probabilities"][:])[0]


def disc(radius: int, ndim: int) -> np.ndarray:
    grid = np.indices((2 * radius + 1,) * ndim) - radius
    return np.sqrt((grid**2).sum(axis=0)) <= radius


def reference_split(p: np.ndarray, radius: int) -> np.ndarray:
    """The documented split on the whole image: markers = components of the foreground
    eroded by a disc; a component with one marker is that object, one with several is
    flooded from them (watershed of 1 - p on its bounding box, outside it the top of the
    relief); components without a marker stay whole (id offset by the marker count)."""
    fg = p >= THRESHOLD
    comps, _ = ndimage.label(fg)
    seeds, m = ndimage.label(ndimage.binary_erosion(fg, disc(radius, p.ndim), border_value=0))
    relief = np.rint((1 - p) * 65534).astype(np.uint16)
    out = np.where(fg, comps + m, 0)
    for k, box in enumerate(ndimage.find_objects(comps), start=1):
        inside = comps[box] == k
        marks = np.unique(seeds[box][inside & (seeds[box] > 0)])
        if len(marks) == 1:
            out[box][inside] = marks[0]
        elif len(marks) > 1:
            local = np.where(inside, seeds[box], 0)
            values, compact = np.unique(local, return_inverse=True)
            flooded = ndimage.watershed_ift(np.where(inside, relief[box], 65535).astype(np.uint16),
                                            compact.reshape(local.shape).astype(np.int32))
            out[box][inside] = values[flooded][inside]
    return out


def crossing(labels: np.ndarray, chunk: int) -> tuple[int, int]:
    """Objects crossing a chunk border on some axis, and on every axis (a corner)."""
    some = every = 0
    for box in ndimage.find_objects(labels):
        if box is None:
            continue
        cuts = [s.start // chunk != (s.stop - 1) // chunk for s in box]
        some += any(cuts)
        every += all(cuts)
    return some, every


# --- the algorithm on its own ----------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 9), st.integers(1, 9),
       st.floats(0.3, 0.7), st.integers(0, 2**16))
def test_chunked_labels_equal_whole_image_labels(h, w, ch, cw, density, seed):
    mask = np.random.default_rng(seed).random((h, w)) < density
    grid = (-(-h // ch), -(-w // cw))
    span = span_of((ch, cw))
    labels, counts = np.zeros((h, w), np.uint64), []
    for k, (i, j) in enumerate(np.ndindex(*grid)):
        region = (slice(i * ch, (i + 1) * ch), slice(j * cw, (j + 1) * cw))
        labels[region], n = label_chunk(mask[region], k, span)
        counts.append(n)
    pairs = [face_pairs(labels[i * ch - 1, :], labels[i * ch, :]) for i in range(1, grid[0])]
    pairs += [face_pairs(labels[:, j * cw - 1], labels[:, j * cw]) for j in range(1, grid[1])]
    ids = IdMap.build(counts, pairs, span)
    final = ids.lookup(labels)
    reference, n = ndimage.label(mask)
    assert same_partition(final, reference)
    assert ids.count == n and (final.max(initial=0) == n)  # compact: 1..n


def test_id_dtype_grows_with_the_count():
    assert id_dtype(2**32 - 1) == np.uint32 and id_dtype(2**32) == np.uint64


# --- through the engine ------------------------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
def test_components_equal_scipy_label_across_chunk_borders_and_corners(tmp_path, ndim):
    shape, tile, count = ((150, 133), 32, 60) if ndim == 2 else ((30, 41, 37), 16, 40)
    image = blobs(shape, count, seed=ndim, radius=(4, 9) if ndim == 2 else (3, 6))
    out = tilerseg.segment_to_zarr(image, Passthrough(ndim), tmp_path / "o.zarr", tile=tile,
                                   output="instances", normalize=False, backend="torch",
                                   object_table="csv")
    result = open_output(out)
    instances = result["instances"][:]
    reference, n = ndimage.label(stored_probability(out) >= THRESHOLD)
    some, corners = crossing(reference, tile)
    assert n > 10 and some > 5 and corners > 0  # objects cross borders and corners
    assert same_partition(instances, reference)
    assert instances.dtype == np.uint32 and instances.max() == n  # unique, compact ids
    assert result["attributes"]["instances"]["objects"] == n
    # the pyramid takes every other pixel
    level1 = zarr.open_array(out / "labels" / "instances" / "1", mode="r")[:]
    np.testing.assert_array_equal(level1, instances[(slice(None, None, 2),) * ndim])
    labels_meta = zarr.open_group(out / "labels", mode="r").attrs["ome"]
    assert labels_meta["labels"] == ["instances"]
    meta = zarr.open_group(out / "labels" / "instances", mode="r").attrs["ome"]
    assert meta["multiscales"][0]["type"] == "nearest" and "image-label" in meta
    # the object table, against scipy on the whole image
    with open(tmp_path / "o.objects.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n
    axes = "zyx"[-ndim:]
    for row in rows[:: max(1, n // 12)]:
        k = int(row["label"])
        mask = instances == k
        assert int(row["area"]) == mask.sum()
        box = ndimage.find_objects(mask.astype(np.uint8))[0]
        centre = ndimage.center_of_mass(mask)
        for a, letter in enumerate(axes):
            assert int(row[f"bbox_min_{letter}"]) == box[a].start
            assert int(row[f"bbox_max_{letter}"]) == box[a].stop
            assert float(row[f"centroid_{letter}"]) == pytest.approx(centre[a], abs=1e-3)


def test_a_z_stack_segmented_plane_by_plane_has_3d_objects(tmp_path):
    """A 2D model on a z-stack: objects connect across planes (face connectivity in 3D)."""
    image = (blobs((6, 70, 60), 20, seed=1, radius=(3, 6)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "stack.tif", image, photometric="minisblack")
    out = tilerseg.segment_to_zarr(tmp_path / "stack.tif", Passthrough(2), tmp_path / "o.zarr",
                                   tile=32, output="instances", backend="torch")
    instances = open_output(out)["instances"]
    assert instances.chunks == (1, 32, 32)
    reference, n = ndimage.label(stored_probability(out) >= THRESHOLD)
    planes = sum(len(np.unique(reference[z])) - 1 for z in range(6))
    assert n > 5 and planes > n  # objects span planes
    assert same_partition(instances[:], reference)


@pytest.mark.parametrize("ndim", [2, 3])
def test_split_equals_the_same_watershed_on_the_whole_image(tmp_path, ndim):
    # windows (chunk + context) smaller than the image on y and x: the context rule works
    shape, tile, count, context = (((160, 140), 32, 70, 40) if ndim == 2 else
                                   ((24, 72, 72), 16, 90, 20))
    image = blobs(shape, count, seed=10 + ndim if ndim == 2 else 0,
                  radius=(4, 9) if ndim == 2 else (3, 6))
    assert all(tile + 2 * context < n for n in shape[-2:])
    radius = 2
    out = tilerseg.segment_to_zarr(image, Passthrough(ndim), tmp_path / "o.zarr", tile=tile,
                                   output="instances", instances="split", split_radius=radius,
                                   split_context=context, normalize=False, backend="torch")
    instances = open_output(out)["instances"][:]
    p = stored_probability(out)
    reference = reference_split(p, radius)
    components, n = ndimage.label(p >= THRESHOLD)
    assert len(np.unique(reference)) - 1 > n  # touching objects were split
    assert crossing(reference, tile)[0] > 5
    assert open_output(out)["attributes"]["instances"]["kept_whole"] == 0
    assert same_partition(instances, reference)


def test_split_keeps_objects_larger_than_the_context_whole(tmp_path):
    image = blobs((96, 96), 12, seed=3)
    image[10:80, 40:46] = 1.0  # a long bar joining several blobs: 70 px > context 32
    out = tilerseg.segment_to_zarr(image, Passthrough(2), tmp_path / "o.zarr", tile=32,
                                   output="instances", instances="split", split_radius=2,
                                   split_context=32, normalize=False, backend="torch")
    result = open_output(out)
    instances = result["instances"][:]
    components, _ = ndimage.label(stored_probability(out) >= THRESHOLD)
    bar = components[45, 42]
    assert result["attributes"]["instances"]["kept_whole"] >= 1
    assert len(np.unique(instances[components == bar])) == 1  # kept whole, one id
    # every object is inside one component: the split never merges components
    pairs = np.unique(np.stack([instances.ravel(), components.ravel()], 1), axis=0)
    assert len(np.unique(pairs[:, 0])) == len(pairs)


def test_instance_options_are_checked(tmp_path):
    image = blobs((40, 40), 3, seed=0)
    for bad in (dict(instances="watershed"), dict(split_radius=-1), dict(split_context=0),
                dict(object_table="xlsx")):
        with pytest.raises(InvalidArgumentError):
            tilerseg.segment_to_zarr(image, Passthrough(2), tmp_path / "x.zarr",
                                     output="instances", normalize=False, **bad)
    for ignored in (dict(instances="split"), dict(object_table="csv"), dict(split_radius=1)):
        with pytest.raises(InvalidArgumentError, match="needs output='instances'"):
            tilerseg.segment_to_zarr(image, Passthrough(2), tmp_path / "x.zarr",
                                     output="both", normalize=False, **ignored)
    assert not (tmp_path / "x.zarr").exists()


def test_ids_beyond_uint32_are_written_as_uint64(tmp_path, monkeypatch):
    """The dtype follows the id count (here forced, as 2**32 objects cannot be drawn)."""
    import tilerseg.engine.instances as engine_instances

    monkeypatch.setattr(engine_instances, "id_dtype", lambda count: np.dtype(np.uint64))
    image = blobs((100, 90), 20, seed=6)
    out = tilerseg.segment_to_zarr(image, Passthrough(2), tmp_path / "o.zarr", tile=32,
                                   output="instances", object_table="csv", normalize=False,
                                   backend="torch")
    instances = open_output(out)["instances"]
    assert instances.dtype == np.uint64
    assert zarr.open_array(out / "labels" / "instances" / "1", mode="r").dtype == np.uint64
    reference, n = ndimage.label(stored_probability(out) >= THRESHOLD)
    assert same_partition(instances[:], reference)


def test_overwriting_removes_the_old_outputs_table(tmp_path):
    pytest.importorskip("pyarrow")
    image = blobs((64, 64), 8, seed=2)
    options = dict(tile=32, normalize=False, backend="torch")
    out = tmp_path / "o.zarr"
    tilerseg.segment_to_zarr(image, Passthrough(2), out, output="instances",
                             object_table="csv", **options)
    assert (tmp_path / "o.objects.csv").is_file()
    tilerseg.segment_to_zarr(image, Passthrough(2), out, output="instances",
                             object_table="parquet", overwrite=True, **options)
    assert (tmp_path / "o.objects.parquet").is_file()
    assert not (tmp_path / "o.objects.csv").exists()
    tilerseg.segment_to_zarr(image, Passthrough(2), out, overwrite=True, **options)
    assert not list(tmp_path.glob("o.objects.*"))


def test_parquet_table_equals_the_csv_table(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    image = blobs((64, 64), 10, seed=4)
    for fmt in ("csv", "parquet"):
        tilerseg.segment_to_zarr(image, Passthrough(2), tmp_path / f"{fmt}.zarr", tile=32,
                                 output="instances", object_table=fmt, normalize=False,
                                 backend="torch")
    table = pq.read_table(tmp_path / "parquet.objects.parquet").to_pydict()
    with open(tmp_path / "csv.objects.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert table["label"] == [int(r["label"]) for r in rows] and len(rows) > 3
    assert table["area"] == [int(r["area"]) for r in rows]


# --- resume and cluster -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A slide and a small saved U-Net whose foreground is speckled: many objects."""
    d = tmp_path_factory.mktemp("instances")
    image = (blobs((320, 288), 90, seed=7) * 255).astype(np.uint8)
    tifffile.imwrite(d / "slide.tif", image, tile=(64, 64), photometric="minisblack")
    torch.manual_seed(0)
    model = tilerseg.create_model("unet", depth=2, base_channels=4, num_classes=1,
                                  padding="same")
    tilerseg.save_model(model, d / "model.pt")
    args = ["--model", str(d / "model.pt"), "--tile", "32", "--output", "instances",
            "--backend", "torch", "-q"]
    return {"dir": d, "tif": d / "slide.tif", "model": d / "model.pt", "args": args}


def run_cli(saved, out, *extra) -> int:
    return main(["run", str(saved["tif"]), "-o", str(out), *saved["args"], *extra])


@pytest.mark.parametrize("mode", ["components", "split"])
def test_a_failure_in_the_instance_passes_resumes_to_the_same_output(saved, tmp_path,
                                                                     monkeypatch, mode):
    reference = tmp_path / "reference.zarr"
    assert run_cli(saved, reference, "--instances", mode) == 0
    out = tmp_path / "out.zarr"
    calls = []
    real = InstanceRun.final_pass

    def crash(self, chunk, maps):
        calls.append(chunk)
        if len(calls) == 7:
            raise OSError(5, "simulated I/O error")
        return real(self, chunk, maps)

    monkeypatch.setattr(InstanceRun, "final_pass", crash)
    assert run_cli(saved, out, "--instances", mode) == 1
    assert not out.exists() and work_path(out).is_dir()
    monkeypatch.setattr(InstanceRun, "final_pass", real)
    assert run_cli(saved, out, "--instances", mode, "--resume") == 0
    assert_same_arrays(out, reference)
    instances = open_output(out)["instances"][:]
    assert instances.max() > 50


# the command line, with every marker pass made 20 ms slower so that a kill lands in it
SLOW_MARKERS = (
    "import sys, time\n"
    "from tilerseg.engine.instances import InstanceRun\n"
    "real = InstanceRun.marker_pass\n"
    "def slow(self, chunk):\n"
    "    time.sleep(0.02)\n"
    "    return real(self, chunk)\n"
    "InstanceRun.marker_pass = slow\n"
    "from tilerseg.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def kill_at_files(process: subprocess.Popen, folder, target: int) -> bool:
    """SIGKILL ``process`` once ``folder`` holds ``target`` files (False: it ended first)."""
    while len(list(folder.glob("*.npz"))) < target:
        if process.poll() is not None:
            return False
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    return True


def test_killed_run_with_instances_resumes_to_the_same_output(saved, tmp_path):
    """A real CLI process SIGKILLed while computing tiles, the resumed one SIGKILLed in
    the instance passes, then resumed to the end: identical to one run, table included."""
    flags = ["--instances", "split", "--object-table", "csv"]
    reference = tmp_path / "reference.zarr"
    assert run_cli(saved, reference, *flags) == 0
    out = tmp_path / "killed.zarr"
    command = [sys.executable, "-c", SLOW_MARKERS, "run", str(saved["tif"]), "-o", str(out),
               *saved["args"], *flags, "--resume"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert kill_when(process, out, 8, signal.SIGKILL, random.Random(2)), process.stderr.read()
    assert 0 < done_count(out) and not out.exists()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    markers = work_path(out) / "instances" / "markers"
    assert kill_at_files(process, markers, 20), process.stderr.read()
    assert not out.exists() and 20 <= len(list(markers.glob("*.npz"))) < 90
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert_same_arrays(out, reference)
    assert (tmp_path / "killed.objects.csv").read_text() == \
        (tmp_path / "reference.objects.csv").read_text()


def test_instances_on_a_local_cluster_equal_the_local_run(saved, tmp_path):
    pytest.importorskip("distributed")
    from distributed import get_task_stream

    from tilerseg.engine.executors.cluster import ClusterSpec, connect

    model = tilerseg.load_model(saved["model"])
    options = dict(tile=32, output="instances", instances="split", backend="torch")
    local = tilerseg.segment_to_zarr(saved["tif"], model, tmp_path / "local.zarr", **options)
    with connect(ClusterSpec("local", workers=2)) as client:
        with get_task_stream(client) as stream:
            remote = tilerseg.segment_to_zarr(saved["tif"], model, tmp_path / "remote.zarr",
                                              executor=client, **options)
    assert_same_arrays(local, remote)
    passes = [t for t in stream.data if str(t["key"]).startswith("run_chunk")]
    assert len(passes) == 2 * 10 * 9  # markers and final ids, every chunk, on the workers
    assert len({t["worker"] for t in passes}) == 2
    attrs = zarr.open_group(remote, mode="r").attrs["tilerseg"]
    assert attrs["executor"] == "dask.distributed" and attrs["instances"]["objects"] > 50


def test_cli_prints_the_objects_and_refuses_bad_instance_flags(saved, tmp_path, capsys):
    out = tmp_path / "cli.zarr"
    args = [a for a in saved["args"] if a != "-q"]
    assert main(["run", str(saved["tif"]), "-o", str(out), *args, "--object-table", "csv"]) == 0
    printed = capsys.readouterr().out
    assert "objects (components)" in printed and "cli.objects.csv" in printed
    assert (tmp_path / "cli.objects.csv").is_file()
    assert main(["run", str(saved["tif"]), "-o", str(tmp_path / "bad.zarr"), *saved["args"],
                 "--split-radius", "-2"]) == 2
    assert "split_radius" in capsys.readouterr().err


def test_a_batch_writes_instances_for_every_image(tmp_path):
    for k in range(2):
        image = (blobs((70, 64), 12, seed=20 + k) * 255).astype(np.uint8)
        tifffile.imwrite(tmp_path / f"img{k}.tif", image, photometric="minisblack")
    results = tilerseg.segment_batch([tmp_path / "img0.tif", tmp_path / "img1.tif"],
                                     Passthrough(2), tmp_path / "out", tile=32,
                                     output="instances", object_table="csv", backend="torch")
    assert [r.status for r in results] == ["done", "done"]
    for r in results:
        reference, n = ndimage.label(stored_probability(r.output) >= THRESHOLD)
        assert n > 3 and same_partition(open_output(r.output)["instances"][:], reference)
        assert sum(1 for _ in open(r.output.with_name(
            r.output.name[: -len(".zarr")] + ".objects.csv"))) == n + 1


def test_the_instance_output_validates_and_reads_as_a_labels_layer(tmp_path):
    """ome-zarr-models validates it; ome-zarr's reader (napari-ome-zarr's) finds the
    instances as a label image with its pyramid."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v05.image import Image

    out = tilerseg.segment_to_zarr(blobs((100, 90), 15, seed=8), Passthrough(2),
                                   tmp_path / "o.zarr", tile=32, output="instances",
                                   normalize=False, backend="torch")
    image = Image.from_zarr(zarr.open_group(out, mode="r"))
    assert image.labels is not None and image.labels.label_paths == ["instances"]
    label = image.labels.get_image_labels_group("instances")
    assert label.attributes.ome.image_label.source.image == "../../"
    nodes = list(Reader(parse_url(str(out)))())
    specs = [sorted(type(s).__name__ for s in n.specs) for n in nodes]
    assert specs == [["Multiscales", "OMERO"], ["Labels"], ["Label", "Multiscales"]]
    assert [d.shape for d in nodes[2].data] == [(100, 90), (50, 45), (25, 23)]
    assert nodes[2].data[0].dtype == np.uint32

"""Remote inputs and outputs through fsspec URLs (``memory://``, ``file://``): the same
output as local files, lazy TIFF reads, one-line errors, existing outputs untouched."""

from __future__ import annotations

import io
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import tifffile
import torch
import zarr
from fsspec.implementations.memory import MemoryFileSystem

import tilerseg
from tilerseg import open_image, segment_to_zarr
from tilerseg.cli import main
from tilerseg.errors import (ImageNotFoundError, InvalidArgumentError, InvalidImageError,
                             OutputError)
from tilerseg.io.writers import open_output
from tilerseg.synthetic import membrane_image

MEMORY = fsspec.filesystem("memory")


@pytest.fixture
def prefix() -> Any:
    """A fresh folder of the in-memory filesystem, removed afterwards."""
    name = f"/tilerseg-test-{uuid.uuid4().hex}"
    yield name
    if MEMORY.exists(name):
        MEMORY.rm(name, recursive=True)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return membrane_image((150, 130), cell_size=25, seed=3)[0]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("remote") / "model.pt"
    tilerseg.save_model(tilerseg.create_model("unet", depth=3, base_channels=2), path)
    return path


def _tiff_bytes(image: np.ndarray, **kw: Any) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, image, **kw)
    return buffer.getvalue()


def _write_ome_zarr(store: str, image: np.ndarray) -> None:
    """A two-level OME-Zarr v0.5 image (0.5 µm pixels), written by zarr itself."""
    group = zarr.open_group(store, mode="w", zarr_format=3)
    datasets = []
    for k, level in enumerate([image, image[::2, ::2]]):
        array = group.create_array(str(k), shape=level.shape, chunks=(64, 64),
                                   dtype=level.dtype, dimension_names=("y", "x"))
        array[...] = level
        datasets.append({"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": [0.5 * 2**k, 0.5 * 2**k]}]})
    axes = [{"name": a, "type": "space", "unit": "micrometer"} for a in "yx"]
    group.attrs["ome"] = {"version": "0.5",
                          "multiscales": [{"axes": axes, "datasets": datasets}]}


def _arrays(group: zarr.Group, prefix: str = "") -> dict[str, np.ndarray]:
    """Every array of a store, by path."""
    out = {}
    for name, node in group.members():
        if isinstance(node, zarr.Array):
            out[prefix + name] = node[...]
        else:
            out.update(_arrays(node, f"{prefix}{name}/"))
    return out


def _ome(group: zarr.Group, prefix: str = "") -> dict[str, Any]:
    """The ``ome`` attributes (multiscales, labels, image-label) of every group."""
    out = {prefix: group.attrs.get("ome")}
    for name, node in group.members():
        if isinstance(node, zarr.Group):
            out.update(_ome(node, f"{prefix}{name}/"))
    return out


def assert_same_store(got: str, expected: str) -> None:
    a = zarr.open_group(got, mode="r", zarr_format=3)
    b = zarr.open_group(expected, mode="r", zarr_format=3)
    arrays_a, arrays_b = _arrays(a), _arrays(b)
    assert sorted(arrays_a) == sorted(arrays_b)
    for name, value in arrays_b.items():
        assert arrays_a[name].dtype == value.dtype, name
        np.testing.assert_array_equal(arrays_a[name], value, err_msg=name)
    assert _ome(a) == _ome(b)
    assert a.attrs["tilerseg"]["complete"] is True


def _memory_files(prefix: str) -> dict[str, bytes]:
    return {p: MEMORY.cat_file(p) for p in MEMORY.find(prefix)}


# -- inputs -----------------------------------------------------------------------------------


def test_memory_ome_zarr_input_gives_the_local_output(tmp_path: Path, prefix: str,
                                                      image: np.ndarray,
                                                      small_model: torch.nn.Module) -> None:
    url = f"memory://{prefix}/in.ome.zarr"
    _write_ome_zarr(url, image)
    _write_ome_zarr(str(tmp_path / "in.ome.zarr"), image)
    got, expected = open_image(url, level=0), open_image(tmp_path / "in.ome.zarr")
    assert (got.format, got.axes, got.levels, got.pixel_size, got.path) == (
        "ome-zarr", "YX", expected.levels, {"Y": 0.5, "X": 0.5}, url)
    np.testing.assert_array_equal(np.asarray(open_image(url, level=1).data[...]),
                                  image[::2, ::2])
    segment_to_zarr(url, small_model, tmp_path / "remote.zarr", tile=64, output="both")
    segment_to_zarr(tmp_path / "in.ome.zarr", small_model, tmp_path / "local.zarr", tile=64,
                    output="both")
    assert_same_store(str(tmp_path / "remote.zarr"), str(tmp_path / "local.zarr"))
    manifest = zarr.open_group(str(tmp_path / "remote.zarr"), mode="r").attrs["tilerseg"][
        "manifest"]
    assert manifest["input"]["path"] == url and manifest["input"]["files"] == 3


def test_memory_tiff_input_gives_the_local_output(tmp_path: Path, prefix: str,
                                                  image: np.ndarray,
                                                  small_model: torch.nn.Module) -> None:
    data = _tiff_bytes(image, tile=(64, 64), compression="zlib", resolution=(2.0, 4.0),
                       resolutionunit=tifffile.RESUNIT.MICROMETER)
    MEMORY.pipe_file(f"{prefix}/in.tif", data)
    (tmp_path / "in.tif").write_bytes(data)
    url = f"memory://{prefix}/in.tif"
    got, expected = open_image(url), open_image(tmp_path / "in.tif")
    assert (got.format, got.axes, got.shape, got.pixel_size) == (
        expected.format, expected.axes, expected.shape, expected.pixel_size)
    assert got.pixel_size == {"Y": 0.25, "X": 0.5}
    segment_to_zarr(url, small_model, tmp_path / "remote.zarr", tile=64)
    segment_to_zarr(tmp_path / "in.tif", small_model, tmp_path / "local.zarr", tile=64)
    assert_same_store(str(tmp_path / "remote.zarr"), str(tmp_path / "local.zarr"))
    info = zarr.open_group(str(tmp_path / "remote.zarr"), mode="r").attrs["tilerseg"]
    assert info["input"]["path"] == url
    assert info["manifest"]["input"]["path"] == url
    assert info["manifest"]["input"]["size"] == len(data)
    # the URL's identity is stable: resuming finds the output complete, computes nothing
    segment_to_zarr(url, small_model, tmp_path / "remote.zarr", tile=64, resume=True)
    again = zarr.open_group(str(tmp_path / "remote.zarr"), mode="r").attrs["tilerseg"]
    assert again["manifest"]["run_id"] == info["manifest"]["run_id"]


class CountingMemoryFileSystem(MemoryFileSystem):
    """The in-memory filesystem, counting the bytes read from its files."""

    protocol = ("countingmemory",)
    read_bytes = 0

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        return super()._strip_protocol(path.removeprefix("countingmemory://"))

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        f = super()._open(path, mode, **kwargs)
        if "r" in mode:
            plain = f.read

            def read(size: int = -1) -> bytes:
                data = plain(size)
                CountingMemoryFileSystem.read_bytes += len(data)
                return data

            f.read = read
        return f


def test_remote_tiff_reads_only_the_tiles_a_read_needs(prefix: str) -> None:
    fsspec.register_implementation("countingmemory", CountingMemoryFileSystem, clobber=True)
    image = np.random.default_rng(0).integers(0, 255, (1024, 1024), dtype=np.uint8)
    data = _tiff_bytes(image, tile=(64, 64))  # 256 tiles of 4 KiB, uncompressed
    MEMORY.pipe_file(f"{prefix}/big.tif", data)
    source = open_image(f"countingmemory://{prefix}/big.tif")
    opened = CountingMemoryFileSystem.read_bytes
    assert 0 < opened < 16384  # the header, the tile tables and two pixels
    CountingMemoryFileSystem.read_bytes = 0
    np.testing.assert_array_equal(source.data[130:190, 260:320], image[130:190, 260:320])
    assert 64 * 64 <= CountingMemoryFileSystem.read_bytes <= 2 * 64 * 64  # one tile
    assert len(data) > 250 * CountingMemoryFileSystem.read_bytes


def test_missing_and_unknown_remote_inputs_are_one_line_errors(prefix: str) -> None:
    with pytest.raises(ImageNotFoundError, match=r"^image memory://.*/none\.tif does not exist$"):
        open_image(f"memory://{prefix}/none.tif")
    with pytest.raises(InvalidArgumentError, match="unknown URL protocol 'nosuchfs'"):
        open_image("nosuchfs://bucket/slide.tif")


def test_file_urls_are_local_paths(tmp_path: Path, image: np.ndarray) -> None:
    tifffile.imwrite(tmp_path / "in.tif", image, tile=(64, 64))
    source = open_image((tmp_path / "in.tif").as_uri())
    assert source.path == str(tmp_path / "in.tif") and source.format == "tiff"


# -- outputs ----------------------------------------------------------------------------------


def test_memory_output_equals_a_local_run(tmp_path: Path, prefix: str, image: np.ndarray,
                                          small_model: torch.nn.Module) -> None:
    url = f"memory://{prefix}/out.zarr"
    got = segment_to_zarr(image, small_model, url, tile=64, output="both")
    segment_to_zarr(image, small_model, tmp_path / "local.zarr", tile=64, output="both")
    assert got == url
    assert_same_store(url, str(tmp_path / "local.zarr"))
    assert len(zarr.open_group(url, mode="r").attrs["ome"]["multiscales"][0]["datasets"]) == 3
    # only the output is left: no staging prefix, no local work directory
    assert {p.split("/")[2] for p in MEMORY.find(prefix)} == {"out.zarr"}
    assert open_output(url)["labels"].shape == image.shape


def test_memory_instances_and_object_table_equal_a_local_run(
        tmp_path: Path, prefix: str, image: np.ndarray,
        small_model: torch.nn.Module) -> None:
    url = f"memory://{prefix}/out.zarr"
    options = {"tile": 64, "output": "instances", "instances": "split", "object_table": "csv"}
    segment_to_zarr(image, small_model, url, **options)
    segment_to_zarr(image, small_model, tmp_path / "local.zarr", **options)
    assert_same_store(url, str(tmp_path / "local.zarr"))
    assert zarr.open_group(url, mode="r").attrs["tilerseg"]["instances"]["objects"] > 0
    assert MEMORY.cat_file(f"{prefix}/out.objects.csv") == (
        tmp_path / "local.objects.csv").read_bytes()
    assert {p.split("/")[2] for p in MEMORY.find(prefix)} == {"out.zarr", "out.objects.csv"}


def test_an_existing_memory_output_is_untouched_without_overwrite(
        prefix: str, image: np.ndarray, small_model: torch.nn.Module) -> None:
    url = f"memory://{prefix}/out.zarr"
    segment_to_zarr(image, small_model, url, tile=64, output="labels")
    before = _memory_files(prefix)
    with pytest.raises(OutputError, match="exists; pass --overwrite"):
        segment_to_zarr(image, small_model, url, tile=64)
    assert _memory_files(prefix) == before
    segment_to_zarr(image, small_model, url, tile=64, output="probabilities", overwrite=True)
    after = zarr.open_group(url, mode="r")
    assert after.attrs["tilerseg"]["output"] == "probabilities" and "labels" not in after
    assert {p.split("/")[2] for p in MEMORY.find(prefix)} == {"out.zarr"}


def test_a_failed_remote_run_leaves_the_old_output_and_no_debris(
        prefix: str, image: np.ndarray, small_model: torch.nn.Module) -> None:
    url = f"memory://{prefix}/out.zarr"
    segment_to_zarr(image, small_model, url, tile=64)
    before = _memory_files(prefix)
    bad = np.random.default_rng(0).random((150, 130)).astype(np.float32)
    bad[100, 120] = np.nan  # found while the tiles are computed
    broken = zarr.create_array(f"memory://{prefix}-in/in.zarr", shape=bad.shape, chunks=(64, 64),
                               dtype=bad.dtype)
    broken[...] = bad
    temporary = set(os.listdir(tempfile.gettempdir()))
    try:
        with pytest.raises(InvalidImageError, match="NaN"):
            segment_to_zarr(f"memory://{prefix}-in/in.zarr", small_model, url, tile=64,
                            overwrite=True)
    finally:
        MEMORY.rm(f"{prefix}-in", recursive=True)
    assert _memory_files(prefix) == before  # no staging prefix, the old output as it was
    assert not [n for n in set(os.listdir(tempfile.gettempdir())) - temporary
                if n.startswith("tilerseg-") and n.endswith(".partial")]


@pytest.mark.parametrize("kwargs, refused", [
    ({"resume": True}, "--resume"), ({"shard": "1/2"}, "--shard"),
    ({"executor": "client", "device": "cpu"}, "a cluster"),
])
def test_unsafe_combinations_with_a_remote_output_are_refused(
        prefix: str, image: np.ndarray, small_model: torch.nn.Module, kwargs: dict,
        refused: str) -> None:
    if kwargs.get("executor") == "client":  # refused before the client is ever used
        from tilerseg.engine.executors.dask import DaskExecutor

        kwargs = {**kwargs, "executor": DaskExecutor(client=object())}
    with pytest.raises(InvalidArgumentError, match=f"^{refused} is not supported with a remote"):
        segment_to_zarr(image, small_model, f"memory://{prefix}/out.zarr", tile=64, **kwargs)
    assert not MEMORY.exists(prefix)


# -- command line -----------------------------------------------------------------------------


def _cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    status = main(args)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_cli_run_with_file_urls_equals_a_local_run(tmp_path: Path, image: np.ndarray,
                                                   model_file: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    tifffile.imwrite(tmp_path / "in.tif", image, tile=(64, 64))
    common = ["--model", str(model_file), "--tile", "64", "--output", "both", "--device", "cpu",
              "-q"]
    status, _, err = _cli(["run", (tmp_path / "in.tif").as_uri(), "-o",
                           (tmp_path / "out.zarr").as_uri(), *common], capsys)
    assert status == 0, err
    status, _, err = _cli(["run", str(tmp_path / "in.tif"), "-o", str(tmp_path / "ref.zarr"),
                           *common], capsys)
    assert status == 0, err
    assert_same_store(str(tmp_path / "out.zarr"), str(tmp_path / "ref.zarr"))
    status, out, err = _cli(["run", (tmp_path / "in.tif").as_uri(), "-o",
                             (tmp_path / "out.zarr").as_uri(), "--resume", *common[:-1]], capsys)
    assert status == 0 and "is already complete" in out, err  # file:// resumes like a path


def _missing_protocol() -> str | None:
    """A protocol fsspec knows whose implementation package is not installed here."""
    for name in ("gs", "abfs", "sftp", "hf", "oci", "webdav", "box"):
        try:
            fsspec.get_filesystem_class(name)
        except ImportError:
            return name
        except ValueError:
            continue
    return None


def test_cli_errors_are_one_line_with_status_2(prefix: str, image: np.ndarray,
                                               model_file: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    MEMORY.pipe_file(f"{prefix}/in.tif", _tiff_bytes(image, tile=(64, 64)))
    url = f"memory://{prefix}/in.tif"
    common = ["--model", str(model_file), "--tile", "64", "--device", "cpu", "-q"]
    cases = [
        ([f"memory://{prefix}/none.tif", "-o", f"memory://{prefix}/o.zarr"], "does not exist"),
        (["nosuchfs://bucket/in.tif", "-o", f"memory://{prefix}/o.zarr"],
         "unknown URL protocol 'nosuchfs'"),
        ([url, "-o", "nosuchfs://bucket/o.zarr"], "unknown URL protocol 'nosuchfs'"),
        ([url], "has no default output"),
        ([url, "-o", f"memory://{prefix}/o.zarr", "--resume"], "--resume is not supported"),
        ([url, "-o", f"memory://{prefix}/o.zarr", "--shard", "1/2"], "--shard is not supported"),
        ([url, "-o", f"memory://{prefix}/o.zarr", "--cluster", "local:1"],
         "a cluster is not supported"),
    ]
    missing = _missing_protocol()
    if missing is not None:
        cases.append(([f"{missing}://bucket/in.tif", "-o", f"memory://{prefix}/o.zarr"],
                      f"the '{missing}' protocol needs a package that is not installed"))
    for args, message in cases:
        status, _, err = _cli(["run", *args, *common], capsys)
        assert status == 2, (args, err)
        assert err.startswith("tilerseg: error: ") and message in err, (args, err)
        assert err.count("\n") == 1, err
    assert MEMORY.find(prefix) == [f"{prefix}/in.tif"]


def test_cli_leaves_an_existing_memory_output_alone(prefix: str, image: np.ndarray,
                                                    model_file: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    url = f"memory://{prefix}/out.zarr"
    group = zarr.open_group(url, mode="w", zarr_format=3)  # someone else's store
    group.create_array("data", shape=(4,), dtype="u1")[...] = [1, 2, 3, 4]
    MEMORY.pipe_file(f"{prefix}/in.tif", _tiff_bytes(image, tile=(64, 64)))
    before = _memory_files(prefix)
    status, _, err = _cli(["run", f"memory://{prefix}/in.tif", "-o", url, "--model",
                           str(model_file), "--tile", "64", "--device", "cpu", "-q"], capsys)
    assert status == 2 and "exists; pass --overwrite to replace it" in err
    assert _memory_files(prefix) == before


def test_status_of_a_remote_output_and_what_batch_and_finalize_refuse(
        prefix: str, image: np.ndarray, small_model: torch.nn.Module, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    url = f"memory://{prefix}/out.zarr"
    segment_to_zarr(image, small_model, url, tile=64)
    tifffile.imwrite(tmp_path / "in.tif", image)
    status, out, err = _cli(["status", url], capsys)
    assert status == 0 and "state       complete" in out, err
    for args, message in [
        (["status", f"memory://{prefix}/none.zarr"], "there is no output"),
        (["finalize", url], "a remote output has no unfinished runs"),
        (["batch", f"memory://{prefix}/in.tif", "-o", str(tmp_path)], "a batch reads local"),
        (["batch", str(tmp_path), "-o", f"memory://{prefix}/outs"], "a batch writes to a local"),
    ]:
        status, _, err = _cli(args, capsys)
        assert status == 2 and err.count("\n") == 1 and message in err, (args, err)


def test_s3_through_a_local_moto_server(tmp_path: Path, image: np.ndarray,
                                        small_model: torch.nn.Module,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same on a real object-store protocol: s3fs against moto's S3 server on loopback
    (listings cached by one client, prefixes copied key by key); skipped without them."""
    pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        monkeypatch.setitem(fsspec.config.conf, "s3",
                            {"client_kwargs": {"endpoint_url": f"http://{host}:{port}"}})
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("bucket")
        data = _tiff_bytes(image, tile=(64, 64))
        fs.pipe_file("bucket/in.tif", data)
        (tmp_path / "in.tif").write_bytes(data)
        options = {"tile": 64, "output": "instances", "object_table": "csv"}
        segment_to_zarr("s3://bucket/in.tif", small_model, "s3://bucket/out.zarr", **options)
        segment_to_zarr(tmp_path / "in.tif", small_model, tmp_path / "local.zarr", **options)
        assert_same_store("s3://bucket/out.zarr", str(tmp_path / "local.zarr"))
        fs.invalidate_cache()
        table = (tmp_path / "local.objects.csv").read_bytes()
        assert fs.cat_file("bucket/out.objects.csv") == table
        assert sorted(fs.ls("bucket")) == ["bucket/in.tif", "bucket/out.objects.csv",
                                           "bucket/out.zarr"]
        before = {p: fs.cat_file(p) for p in fs.find("bucket/out.zarr")}
        with pytest.raises(OutputError, match="exists; pass --overwrite"):
            segment_to_zarr("s3://bucket/in.tif", small_model, "s3://bucket/out.zarr", tile=64)
        fs.invalidate_cache()
        assert {p: fs.cat_file(p) for p in fs.find("bucket/out.zarr")} == before
        segment_to_zarr("s3://bucket/in.tif", small_model, "s3://bucket/out.zarr", tile=64,
                        overwrite=True)
        fs.invalidate_cache()
        assert sorted(fs.ls("bucket")) == ["bucket/in.tif", "bucket/out.zarr"]
        assert zarr.open_group("s3://bucket/out.zarr", mode="r").attrs["tilerseg"][
            "output"] == "probabilities"
    finally:
        server.stop()

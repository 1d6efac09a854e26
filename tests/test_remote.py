"""Remote inputs and outputs through fsspec URLs (``memory://``, ``file://``): the same
output as local files, lazy TIFF reads, one-line errors, existing outputs untouched."""

from __future__ import annotations

import io
import os
import tempfile
import uuid
import warnings
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


def _named(url: str) -> str:
    """A memory URL as universal-pathlib names it: ``memory:///a/b`` is ``memory://a/b``."""
    return url.replace("memory:///", "memory://", 1)


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
    assert str(got) == _named(url) and not isinstance(got, Path)  # a remote location
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
    (listings cached by one client, prefixes copied key by key). Both are in the test extra:
    without them this fails, it is not skipped."""
    import moto.server as server_module
    import s3fs  # noqa: F401 - the protocol under test
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
        # s3fs copies a list of objects concurrently: one chunk's copy fails
        import s3fs

        before = {p: fs.cat_file(p) for p in fs.find("bucket/out.zarr")}
        plain = s3fs.S3FileSystem._cp_file

        async def copy(self: Any, path1: str, path2: str, **kw: Any) -> Any:
            if ".out.zarr.partial-" in path1 and path2.endswith("/out.zarr/0/c/0/0/0"):
                raise OSError("simulated failure of one object copy")
            return await plain(self, path1, path2, **kw)

        monkeypatch.setattr(s3fs.S3FileSystem, "_cp_file", copy)
        with pytest.raises(OutputError, match="simulated failure of one object") as info:
            segment_to_zarr("s3://bucket/in.tif", small_model, "s3://bucket/out.zarr",
                            tile=64, output="both", overwrite=True)
        monkeypatch.setattr(s3fs.S3FileSystem, "_cp_file", plain)
        fs.invalidate_cache()
        assert {p: fs.cat_file(p) for p in fs.find("bucket/out.zarr")} == before
        staging = _staging_in(str(info.value))
        assert open_output(staging)["labels"] is not None
        assert len(fs.ls("bucket")) == 3  # in.tif, out.zarr and the kept staging prefix
    finally:
        server.stop()


# -- failures while moving a remote output into place -----------------------------------------


def _failing_copy(monkeypatch: pytest.MonkeyPatch, target: str, after: int,
                  error: BaseException) -> None:
    """Make the in-memory filesystem copy a list of files in reverse order, file by file
    (as a filesystem copying concurrently may: the root ``zarr.json`` first), and raise
    ``error`` once, after ``after`` files copied into ``target`` (a path without
    protocol)."""
    plain = MemoryFileSystem.copy
    copied = [0]

    def copy(self: MemoryFileSystem, path1: Any, path2: Any, **kw: Any) -> Any:
        pairs = list(zip(path1, path2)) if isinstance(path1, list) else [(path1, path2)]
        for a, b in reversed(pairs):
            if b.startswith(target + "/"):
                copied[0] += 1
                if copied[0] == after + 1:  # once
                    raise error
            plain(self, a, b, **kw)

    monkeypatch.setattr(MemoryFileSystem, "copy", copy)


def _staging_in(message: str) -> str:
    """The staging store an error message says the new output is (kept) in."""
    import re

    found = re.search(r"the new output is (?:kept )?in '([^']+)'", message)
    assert found is not None, message
    return found.group(1)


def test_a_failed_move_leaves_no_output_and_keeps_the_finished_store(
        prefix: str, image: np.ndarray, small_model: torch.nn.Module, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The root zarr.json is copied last and a failed copy is cleared: no output that
    says "complete" without its chunks; the finished store stays where the message says."""
    url = f"memory://{prefix}/out.zarr"
    _failing_copy(monkeypatch, f"{prefix}/out.zarr", 5, OSError("simulated copy failure"))
    with pytest.raises(OutputError, match="cannot move output into .*simulated") as info:
        segment_to_zarr(image, small_model, url, tile=64, output="both")
    monkeypatch.undo()
    assert not MEMORY.exists(f"{prefix}/out.zarr")
    staging = _staging_in(str(info.value))
    assert staging.startswith(_named(f"memory://{prefix}/.out.zarr.partial-"))
    segment_to_zarr(image, small_model, tmp_path / "local.zarr", tile=64, output="both")
    assert_same_store(staging, str(tmp_path / "local.zarr"))
    assert {p.split("/")[2] for p in MEMORY.find(prefix)} == {staging.rsplit("/", 1)[1]}


@pytest.mark.parametrize("error, raised", [
    (OSError("simulated network failure"), OutputError), (KeyboardInterrupt(), KeyboardInterrupt),
])
def test_overwrite_restores_the_old_output_exactly_when_the_move_fails(
        prefix: str, image: np.ndarray, small_model: torch.nn.Module,
        monkeypatch: pytest.MonkeyPatch, error: BaseException, raised: type) -> None:
    url = f"memory://{prefix}/out.zarr"
    segment_to_zarr(image, small_model, url, tile=64, output="probabilities")
    before = _memory_files(prefix)
    _failing_copy(monkeypatch, f"{prefix}/out.zarr", 7, error)
    with pytest.raises(raised):
        segment_to_zarr(image, small_model, url, tile=64, output="both", overwrite=True)
    monkeypatch.undo()
    after = _memory_files(prefix)
    assert {k: v for k, v in after.items() if k.startswith(f"{prefix}/out.zarr/")} == before
    names = {p.split("/")[2] for p in after}
    assert len(names) == 2 and names - {"out.zarr"} == {
        n for n in names if n.startswith(".out.zarr.partial-")}  # no .old- left
    kept = f"memory://{prefix}/{(names - {'out.zarr'}).pop()}"
    assert open_output(kept)["labels"] is not None  # the new run's finished store


def test_an_object_table_stays_with_its_output_when_the_move_fails(
        prefix: str, image: np.ndarray, small_model: torch.nn.Module,
        monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"memory://{prefix}/out.zarr"
    options = {"tile": 64, "output": "instances", "object_table": "csv"}
    segment_to_zarr(image, small_model, url, **options)
    before = _memory_files(prefix)
    _failing_copy(monkeypatch, f"{prefix}/out.zarr", 3, OSError("simulated failure"))
    with pytest.raises(OutputError, match="cannot move output"):
        segment_to_zarr(image, small_model, url, overwrite=True, threshold=0.3, **options)
    monkeypatch.undo()
    after = _memory_files(prefix)
    assert {k: v for k, v in after.items() if "/.out.zarr.partial-" not in k} == before


def test_an_output_appearing_meanwhile_is_refused_and_the_new_one_kept(
        prefix: str, image: np.ndarray, small_model: torch.nn.Module) -> None:
    url = f"memory://{prefix}/out.zarr"

    def progress(done: int, total: int) -> None:
        if not MEMORY.exists(f"{prefix}/out.zarr"):  # another process writes it meanwhile
            zarr.open_group(url, mode="w", zarr_format=3).attrs["someone"] = "else"

    with pytest.raises(OutputError, match="exists; pass --overwrite") as info:
        segment_to_zarr(image, small_model, url, tile=64, progress=progress)
    staging = _staging_in(str(info.value))
    assert open_output(staging)["attributes"]["complete"] is True
    assert dict(zarr.open_group(url, mode="r").attrs) == {"someone": "else"}


def test_upath_locations_are_taken_as_the_paths_and_urls_they_name(
        tmp_path: Path, prefix: str, image: np.ndarray, small_model: torch.nn.Module) -> None:
    """universal-pathlib's objects in, the same run as with strings; the output's location out."""
    from upath import UPath

    MEMORY.pipe_file(f"{prefix}/in.tif", _tiff_bytes(image, tile=(64, 64)))
    url = f"memory://{prefix}/out.zarr"
    got = segment_to_zarr(UPath(f"memory://{prefix}/in.tif"), small_model, UPath(url), tile=64)
    local = segment_to_zarr(image, small_model, UPath(tmp_path / "local.zarr"), tile=64)
    assert isinstance(got, UPath) and not isinstance(got, Path) and str(got) == _named(url)
    assert isinstance(local, Path) and local == tmp_path / "local.zarr"
    assert_same_store(url, str(local))
    assert open_output(url)["attributes"]["manifest"]["input"]["path"] == \
        _named(f"memory://{prefix}/in.tif")


def test_a_committed_remote_output_names_no_staging_store(
        prefix: str, image: np.ndarray, small_model: torch.nn.Module) -> None:
    url = f"memory://{prefix}/out.zarr"
    segment_to_zarr(image, small_model, url, tile=64)
    manifest = open_output(url)["attributes"]["manifest"]
    assert "store" not in manifest and manifest["output"] == _named(url)


def test_move_copies_the_root_metadata_last_and_clears_the_target_when_interrupted(
        prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from tilerseg.io import remote

    for name in ("zarr.json", "0/zarr.json", "0/c/0/0", "0/c/0/1"):
        MEMORY.pipe_file(f"{prefix}/src/{name}", name.encode())
    order: list[str] = []
    plain = MemoryFileSystem.copy

    def copy(self: MemoryFileSystem, path1: Any, path2: Any, **kw: Any) -> Any:
        order.extend(reversed(path2))  # a concurrent copy: any order within one call
        return plain(self, path1, path2, **kw)

    monkeypatch.setattr(MemoryFileSystem, "copy", copy)
    remote.move(f"memory://{prefix}/src", f"memory://{prefix}/dst")
    assert order[-1] == f"{prefix}/dst/zarr.json" and len(order) == 4
    assert not MEMORY.exists(f"{prefix}/src")
    assert MEMORY.cat_file(f"{prefix}/dst/0/c/0/1") == b"0/c/0/1"
    _failing_copy(monkeypatch, f"{prefix}/moved", 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        remote.move(f"memory://{prefix}/dst", f"memory://{prefix}/moved")
    assert not MEMORY.exists(f"{prefix}/moved") and len(MEMORY.find(f"{prefix}/dst")) == 4


# -- what a remote output cannot do, and filesystems that fail ----------------------------------


def test_the_dask_executor_is_refused_with_a_remote_output(
        prefix: str, image: np.ndarray, small_model: torch.nn.Module) -> None:
    """Dask keeps running tasks after one fails: the staging store could not be removed."""
    with pytest.raises(InvalidArgumentError, match=r"^an executor that does not wait for all "
                       r"its tasks \(dask\) is not supported with a remote output"):
        segment_to_zarr(image, small_model, f"memory://{prefix}/out.zarr", tile=64,
                        executor="dask")
    assert not MEMORY.exists(prefix)


class BrokenFileSystem(MemoryFileSystem):
    """A filesystem whose every look-up fails as an object store without credentials
    does (with its own exception class, not an OSError)."""

    protocol = ("brokenfs",)

    class NoCredentialsError(Exception):
        pass

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise self.NoCredentialsError("Unable to locate credentials")

    exists = info = ls = find = isdir = isfile = rm = copy = put_file = _open = _fail


class PickyFileSystem(MemoryFileSystem):
    """A filesystem that cannot be made from a URL alone (as github:// needs arguments)."""

    protocol = ("pickyfs",)

    def __init__(self, org: str, repo: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)


def test_filesystem_failures_are_one_line_errors_with_status_2(
        prefix: str, image: np.ndarray, model_file: Path,
        capsys: pytest.CaptureFixture) -> None:
    from tilerseg.io import remote

    fsspec.register_implementation("brokenfs", BrokenFileSystem, clobber=True)
    fsspec.register_implementation("pickyfs", PickyFileSystem, clobber=True)
    MEMORY.pipe_file(f"{prefix}/in.tif", _tiff_bytes(image, tile=(64, 64)))
    common = ["--model", str(model_file), "--tile", "64", "--device", "cpu", "-q"]
    for args, message in [
        (["run", f"memory://{prefix}/in.tif", "-o", "brokenfs://b/out.zarr", *common],
         "cannot reach 'brokenfs://b/out.zarr': NoCredentialsError: Unable to locate"),
        (["status", "brokenfs://b/out.zarr"], "'brokenfs://b/out.zarr': NoCredentialsError"),
        (["run", "brokenfs://b/in.tif", "-o", f"memory://{prefix}/o.zarr", *common],
         "brokenfs://b/in.tif is not a readable image: Unable to locate credentials"),
        (["run", f"memory://{prefix}/in.tif", "-o", "pickyfs://b/out.zarr", *common],
         "pickyfs://b/out.zarr: cannot use this URL (TypeError: "),
    ]:
        status, _, err = _cli(args, capsys)
        assert status == 2, (args, err)
        assert err.startswith("tilerseg: error: ") and message in err, (args, err)
        assert err.count("\n") == 1, err
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no raw Python warning for a protocol upath lacks
        assert str(remote.location("brokenfs://b/x")) == "brokenfs://b/x"
    for call in (lambda: remote.remove("brokenfs://b/x"), lambda: remote.exists("brokenfs://b/x"),
                 lambda: remote.move("brokenfs://b/x", "brokenfs://b/y")):
        with pytest.raises(OutputError, match="'brokenfs://b/x': NoCredentialsError"):
            call()
    with pytest.raises(InvalidImageError, match="NoCredentialsError"):
        remote.identity("brokenfs://b/in.tif")


def test_relative_file_urls_and_chained_output_urls_are_refused(prefix: str, image: np.ndarray,
                                                               model_file: Path,
                                                               capsys: pytest.CaptureFixture
                                                               ) -> None:
    from tilerseg.io import remote

    with pytest.raises(InvalidArgumentError, match="a file:// URL needs an absolute path"):
        remote.local_path("file://out.zarr")  # fsspec: relative to the working directory
    with pytest.raises(InvalidArgumentError, match="a chained URL cannot be an output"):
        remote.output_location("simplecache::file:///tmp/out.zarr")
    assert remote.output_location("file:///tmp/out.zarr") == Path("/tmp/out.zarr")
    from upath import UPath

    local = remote.output_location(UPath("file:///tmp/out.zarr"))  # a UPath of file:// too
    assert remote.is_local(local) and local == Path("/tmp/out.zarr")
    for output, message in [("file://o.zarr", "a file:// URL needs an absolute path"),
                            (f"simplecache::memory://{prefix}/o.zarr", "a chained URL")]:
        status, _, err = _cli(["run", f"memory://{prefix}/none.tif", "-o", output, "--model",
                               str(model_file), "--device", "cpu", "-q"], capsys)
        assert status == 2 and message in err and err.count("\n") == 1, err


# -- HTTP inputs --------------------------------------------------------------------------------


class _RangeServer:
    """A local HTTP server of one folder answering HEAD and ranged GETs, counting the
    bytes of file contents it sends."""

    def __init__(self, root: Path) -> None:
        import http.server
        import threading

        server = self
        self.sent = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _file(self) -> Path | None:
                path = root / self.path.lstrip("/")
                return path if path.is_file() else None

            def do_HEAD(self) -> None:
                path = self._file()
                self.send_response(200 if path else 404)
                self.send_header("Content-Length", str(path.stat().st_size if path else 0))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()

            def do_GET(self) -> None:
                path = self._file()
                if path is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                size = path.stat().st_size
                start, end = 0, size - 1
                ranged = self.headers.get("Range")
                if ranged:
                    first, _, last = ranged.removeprefix("bytes=").partition("-")
                    start, end = int(first), min(int(last) if last else size - 1, size - 1)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(end - start + 1))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                with open(path, "rb") as f:
                    f.seek(start)
                    data = f.read(end - start + 1)
                try:
                    for k in range(0, len(data), 65536):
                        self.wfile.write(data[k:k + 65536])
                        server.sent += len(data[k:k + 65536])
                except OSError:  # the client hung up
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_an_https_tiff_is_opened_without_downloading_it(tmp_path: Path) -> None:
    import aiohttp  # noqa: F401 - fsspec's HTTP filesystem (in the test extra)
    image = np.random.default_rng(0).integers(0, 255, (2048, 2048), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "big.tif", image, tile=(256, 256))
    size = (tmp_path / "big.tif").stat().st_size
    server = _RangeServer(tmp_path)
    try:
        from tilerseg.io import remote

        source = open_image(f"{server.url}/big.tif")
        opened = server.sent
        assert source.shape == image.shape and 0 < opened < size / 8, (opened, size)
        np.testing.assert_array_equal(source.data[300:400, 600:700], image[300:400, 600:700])
        server.sent = 0
        identity = remote.identity(f"{server.url}/big.tif")
        assert identity["size"] == size and server.sent < size / 8, server.sent
    finally:
        server.close()


def test_an_http_zarr_store_is_still_recognised(tmp_path: Path, image: np.ndarray) -> None:
    import aiohttp  # noqa: F401 - fsspec's HTTP filesystem (in the test extra)
    _write_ome_zarr(str(tmp_path / "in.ome.zarr"), image)
    server = _RangeServer(tmp_path)
    try:
        source = open_image(f"{server.url}/in.ome.zarr")
        assert source.format == "ome-zarr"
        np.testing.assert_array_equal(np.asarray(source.data[...]), image)
    finally:
        server.close()


def test_a_table_left_by_a_commit_killed_after_its_move_is_placed_by_resume(
        tmp_path: Path, image: np.ndarray, small_model: torch.nn.Module,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables are placed after the move: a process killed in between leaves the table in
    the work directory, and --resume (finding the output complete) places it."""
    from tilerseg.engine import instances

    options = {"tile": 64, "output": "instances", "object_table": "csv"}
    segment_to_zarr(image, small_model, tmp_path / "reference.zarr", **options)
    plain = instances.place_tables

    def killed(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(instances, "place_tables", killed)
    with pytest.raises(KeyboardInterrupt):
        segment_to_zarr(image, small_model, tmp_path / "out.zarr", **options)
    monkeypatch.setattr(instances, "place_tables", plain)
    assert open_output(tmp_path / "out.zarr")["attributes"]["complete"] is True
    assert not (tmp_path / "out.objects.csv").exists()
    assert (tmp_path / "out.zarr.partial" / "instances" / "objects.csv").is_file()
    segment_to_zarr(image, small_model, tmp_path / "out.zarr", resume=True, **options)
    assert (tmp_path / "out.objects.csv").read_bytes() == (
        tmp_path / "reference.objects.csv").read_bytes()
    assert not (tmp_path / "out.zarr.partial").exists()

"""The pipelined executor: same output as the simple paths, bounded, and failing promptly."""

from __future__ import annotations

import errno
import logging
import threading
import time

import numpy as np
import pytest
import tifffile
import torch
import zarr

import tilerseg
from tilerseg.cli import main
from tilerseg.engine.background import decode_skipped
from tilerseg.engine.compute import Replica, replicate, resolve_precision
from tilerseg.engine.device import resolve_devices
from tilerseg.engine.jobs import input_identity
from tilerseg.engine.pipeline import Direct, run_pipeline
from tilerseg.engine.options import RunOptions
from tilerseg.engine.prepare import prepare
from tilerseg.errors import InvalidArgumentError, NumericalError, OutputError
from tilerseg.io.writers import OutputSpec, OutputWriter, open_output
from tilerseg.synthetic import membrane_image

from .test_io_readers import write_ome_pyramid

MINISBLACK = {"photometric": "minisblack"}


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return membrane_image((300, 260), cell_size=24, seed=7)[0]


def probabilities(path) -> np.ndarray:
    return np.asarray(open_output(path)["probabilities"][:])


def finishes(fn, seconds: float = 30.0):
    """Run ``fn`` in a thread; fail the test if it has not returned within ``seconds``."""
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - inspected by the test
            outcome["error"] = err

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s (hung on a queue?)"
    return outcome


# --- the executor itself ----------------------------------------------------------------


class Doubler:
    """A compute worker: results are the inputs doubled; optionally fails on one batch."""

    def __init__(self, fail_on: int | None = None, delay: float = 0.0) -> None:
        self.fail_on, self.delay = fail_on, delay

    def submit(self, data, batch):
        if self.fail_on in batch:
            raise RuntimeError(f"model failed on item {self.fail_on}")
        time.sleep(self.delay)
        return [2 * d for d in data]

    def collect(self, pending):
        return pending


def test_pipeline_writes_every_item_once():
    batches = [list(range(k, min(k + 3, 50))) for k in range(0, 50, 3)]
    written: dict = {}
    lock = threading.Lock()

    def write(item, result):
        with lock:
            assert item not in written
            written[item] = result

    times = run_pipeline(batches, lambda b: list(b), [Doubler(), Doubler()], write,
                         readers=2, writers=2)
    assert written == {k: 2 * k for k in range(50)}
    assert times.tiles == 50 and times.batches == len(batches)


def test_pipeline_direct_results_skip_compute():
    written = {}
    run_pipeline([[0, 1], [2]], lambda b: Direct(["fill"] * len(b)) if b[0] == 2 else list(b),
                 [Doubler()], written.__setitem__)
    assert written == {0: 0, 1: 2, 2: "fill"}


def test_pipeline_back_pressure_bounds_items_in_flight():
    """With a slow writer, readers stop at the queue bounds instead of reading ahead."""
    state = {"read": 0, "written": 0, "most": 0}
    lock = threading.Lock()

    def load(batch):
        with lock:
            state["read"] += len(batch)
            state["most"] = max(state["most"], state["read"] - state["written"])
        return list(batch)

    def write(item, result):
        time.sleep(0.01)
        with lock:
            state["written"] += 1

    run_pipeline([[k] for k in range(60)], load, [Doubler()], write, depth=2)
    # inbox 2 + outbox 2 + one in each of reader, worker and writer, plus one being put
    assert state["written"] == 60
    assert state["most"] <= 8


@pytest.mark.parametrize("stage", ["read", "compute", "write"])
def test_pipeline_failure_stops_every_stage(stage):
    calls = {"write": 0}

    def load(batch):
        if stage == "read" and 7 in batch:
            raise OSError("bad TIFF tile")
        return list(batch)

    def write(item, result):
        calls["write"] += 1
        if stage == "write" and item == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        time.sleep(0.001)

    workers = [Doubler(fail_on=9 if stage == "compute" else None) for _ in range(2)]
    outcome = finishes(lambda: run_pipeline([[k] for k in range(1000)], load, workers, write,
                                            readers=2, writers=2))
    err = outcome["error"]
    expected = {"read": "bad TIFF tile", "compute": "model failed", "write": "No space"}[stage]
    assert expected in str(err)
    assert calls["write"] < 100  # stopped promptly, not after the whole stream


def test_pipeline_interrupt_is_re_raised():
    """Ctrl-C (or any BaseException) in a stage stops the run and reaches the caller."""
    def write(item, result):
        if item == 3:
            raise KeyboardInterrupt
    outcome = finishes(lambda: run_pipeline([[k] for k in range(1000)], list, [Doubler()],
                                            write))
    assert isinstance(outcome["error"], KeyboardInterrupt)


# --- segment_to_zarr: same output, every path ------------------------------------------


def test_pipelined_output_identical_to_simple_paths(tmp_path, image, small_model):
    path = tmp_path / "image.tif"
    tifffile.imwrite(path, image, tile=(64, 64), **MINISBLACK)
    kwargs = dict(tile=64, dtype="float32", output="both", device="cpu")
    piped = tilerseg.segment_to_zarr(path, small_model, tmp_path / "p.zarr", batch_size=3,
                                     **kwargs)
    simple = tilerseg.segment_to_zarr(path, small_model, tmp_path / "d.zarr", batch_size=3,
                                      executor="dask", **kwargs)
    memory = tilerseg.segment(image, small_model, tile=64, batch_size=3)
    np.testing.assert_array_equal(probabilities(piped), probabilities(simple))
    np.testing.assert_array_equal(open_output(piped)["labels"][:], open_output(simple)["labels"][:])
    # in memory torch runs 2 threads, not 1 per worker: the same to the last bits or so
    np.testing.assert_allclose(probabilities(piped), memory, rtol=0, atol=1e-6)
    attrs = zarr.open_group(piped, mode="r").attrs["tilerseg"]
    profile = attrs["profile"]
    assert profile["tiles"] == len(tilerseg.plan(image.shape, small_model, tile=64))
    assert 0 < profile["compute"] and 0 < profile["wall"] and attrs["executor"] == "pipeline"
    # Dask's threads: one claiming pipeline per model worker, each with one of them
    again = tilerseg.segment_to_zarr(path, small_model, tmp_path / "w.zarr", batch_size=3,
                                     executor="dask", workers=2, threads=1, **kwargs)
    profile = zarr.open_group(again, mode="r").attrs["tilerseg"]["profile"]
    assert profile["compute_workers"] == 2 and profile["processes"] == 2, profile
    np.testing.assert_array_equal(probabilities(again), probabilities(piped))


@pytest.mark.parametrize("workers,threads", [(1, 1), (1, 2), (3, 1)])
def test_cpu_budget_does_not_change_the_output(tmp_path, image, small_model, workers, threads):
    ref = tilerseg.segment(image, small_model, tile=64)
    out = tilerseg.segment_to_zarr(image, small_model, tmp_path / "o.zarr", tile=64,
                                   dtype="float32", workers=workers, threads=threads)
    np.testing.assert_allclose(probabilities(out), ref, rtol=0, atol=1e-6)
    assert torch.get_num_threads() == max(1, min(2, __import__("os").cpu_count() or 1))


def test_separate_replicas_give_the_same_output(image, small_model):
    """The multi-device path (one model copy per device), exercised with CPU copies."""
    p = prepare(image, small_model, RunOptions(tile=64, device="cpu", backend="torch"))
    replicas = replicate(small_model, [torch.device("cpu")] * 3, 2)
    assert len({id(r.model) for r in replicas}) == 3
    out = {}
    run_pipeline([[t] for t in p.plan], p.runner.load, replicas,
                 lambda t, r: out.__setitem__(t.index, r))
    for t in p.plan:
        np.testing.assert_array_equal(out[t.index], p.runner([t])[0])


# --- failures end to end ------------------------------------------------------------------


class FailingRead:
    """An array that raises after some reads (a corrupt tile deep inside a slide)."""

    def __init__(self, data: np.ndarray, after: int) -> None:
        self.data, self.after, self.reads = data, after, 0
        self.shape, self.dtype, self.ndim = data.shape, data.dtype, data.ndim

    def __getitem__(self, key):
        self.reads += 1
        if self.reads > self.after:
            time.sleep(0.5)  # the tiles read before are stored meanwhile
            raise OSError("TIFF tile 17 is corrupt")
        return self.data[key]

    def __dask_tokenize__(self):  # its identity is its data's (a file that reads again)
        return input_identity(self.data)["sha256"]


def digest(path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


@pytest.fixture
def existing(tmp_path, image, small_model):
    out = tilerseg.segment_to_zarr(image, small_model, tmp_path / "out.zarr", tile=64)
    return out, digest(out)


def test_reader_failure_stops_the_run_and_keeps_it_resumable(existing, image, small_model):
    out, before = existing
    source = tilerseg.open_image(image)
    failing = FailingRead(image, after=16)
    broken = type(source)(**{**source.__dict__, "data": failing})
    outcome = finishes(lambda: tilerseg.segment_to_zarr(
        broken, small_model, out, tile=64, overwrite=True, normalize=(0, 255)))
    assert "TIFF tile 17 is corrupt" in str(outcome["error"])
    assert digest(out) == before
    state = tilerseg.status(out)
    assert not state["complete"] and 0 < state["done"] < state["tasks"]
    failing.after = 10**9  # the file reads again: the run resumes and replaces the output
    tilerseg.segment_to_zarr(broken, small_model, out, tile=64, overwrite=True, resume=True,
                             normalize=(0, 255))
    np.testing.assert_array_equal(probabilities(out), np.asarray(
        zarr.open_array(_copy_of(before, out.parent / "before.zarr"), path="0", mode="r")))
    assert not [p for p in out.parent.iterdir() if ".partial" in p.name]


def _copy_of(files: dict, path):
    """Write a digest's files back out as a directory (to read the old output again)."""
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


class Exploding(torch.nn.Module):
    """A model whose forward fails on real data after a few calls (meta probing works)."""

    def __init__(self, inner: torch.nn.Module, after: int) -> None:
        super().__init__()
        self.inner, self.after, self.calls = inner, after, 0

    def forward(self, x):
        if x.device.type != "meta":
            self.calls += 1
            if self.calls > self.after:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return self.inner(x)


def test_model_failure_stops_the_run(existing, image, small_model):
    out, before = existing
    outcome = finishes(lambda: tilerseg.segment_to_zarr(  # torch: forward runs per batch
        image, Exploding(small_model, after=3), out, tile=64, overwrite=True, backend="torch"))
    assert "illegal memory access" in str(outcome["error"])
    assert digest(out) == before


def test_disk_full_stops_the_run(existing, image, small_model, monkeypatch, capsys, tmp_path):
    out, before = existing
    import tilerseg.io.writers as writers

    real, calls = writers.encode_probabilities, {"n": 0}

    def full(probs, dtype):
        calls["n"] += 1
        if calls["n"] > 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(probs, dtype)

    monkeypatch.setattr(writers, "encode_probabilities", full)
    outcome = finishes(lambda: tilerseg.segment_to_zarr(image, small_model, out, tile=64,
                                                       overwrite=True))
    assert isinstance(outcome["error"], OSError) and "No space" in str(outcome["error"])
    assert calls["n"] < 20
    assert digest(out) == before
    # the CLI: one line, exit status 1 (not a user error), output untouched
    np.save(tmp_path / "img.npy", image)
    calls["n"] = 0
    code = main(["run", str(tmp_path / "img.npy"), "-o", str(out), "--overwrite", "--tile",
                 "64", "--model", "unet", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("tilerseg: error:") and "No space" in err[-1]
    assert digest(out) == before


# --- precision and compilation -------------------------------------------------------------


def test_bf16_on_cpu_is_close_and_recorded(tmp_path, image, small_model):
    ref = tilerseg.segment(image, small_model, tile=64)
    out = tilerseg.segment_to_zarr(image, small_model, tmp_path / "o.zarr", tile=64,
                                   dtype="float32", precision="bf16")
    got = probabilities(out)
    assert 0 < np.abs(got - ref).max() < 0.05  # really computed in bfloat16
    assert zarr.open_group(out, mode="r").attrs["tilerseg"]["precision"] == "bf16"


def test_precision_errors(tmp_path, image, small_model, monkeypatch):
    with pytest.raises(InvalidArgumentError, match="precision='fp8'"):
        tilerseg.segment_to_zarr(image, small_model, tmp_path / "o.zarr", precision="fp8")
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)
    with pytest.raises(InvalidArgumentError, match="autocast is not available on cpu"):
        resolve_precision("bf16", torch.device("cpu"))
    assert not (tmp_path / "o.zarr").exists()


@pytest.mark.parametrize("classes", [2, 1])  # softmax, and a sigmoid (finite at +-inf)
def test_fp16_overflow_is_an_error_not_a_silent_nan(tmp_path, image, classes):
    torch.manual_seed(0)
    model = tilerseg.create_model("unet", depth=2, base_channels=4, num_classes=classes).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(40.0)  # activations far beyond float16's 65504
    ref = tilerseg.segment(image, model, tile=64)
    assert np.isfinite(ref).all()
    with pytest.raises(NumericalError, match="not finite under precision=fp16"):
        tilerseg.segment_to_zarr(image, model, tmp_path / "o.zarr", tile=64, precision="fp16")
    assert not (tmp_path / "o.zarr").exists()


@pytest.mark.usefixtures("no_strict_runtime")
def test_compile_failure_falls_back_to_eager(tmp_path, image, small_model, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken)
    ref = tilerseg.segment(image, small_model, tile=64)
    with caplog.at_level(logging.WARNING, logger="tilerseg"):
        out = tilerseg.segment_to_zarr(image, small_model, tmp_path / "o.zarr", tile=64,
                                       dtype="float32", compile=True)
    assert "torch.compile failed" in caplog.text and "running torch eagerly" in caplog.text
    np.testing.assert_allclose(probabilities(out), ref, rtol=0, atol=1e-6)


@pytest.mark.usefixtures("no_strict_runtime")
def test_compile_that_changes_the_output_is_not_used(image, small_model, monkeypatch, caplog):
    monkeypatch.setattr(torch, "compile", lambda model, **kw: (lambda x: model(x) * 3.0))
    replica = Replica(small_model, torch.device("cpu"), 2, compile=True)
    with caplog.at_level(logging.WARNING, logger="tilerseg"):
        replica.warm_up((148, 148), 1, 1)
    assert not replica.compiled and replica.engine == "torch"
    assert "changed the probabilities" in caplog.text


# --- devices ------------------------------------------------------------------------------


def test_resolve_devices():
    cpu = torch.device("cpu")
    assert resolve_devices("cpu") == [cpu]
    assert resolve_devices("cpu,cpu") == [cpu]
    assert resolve_devices(["cpu"]) == [cpu]
    with pytest.raises(InvalidArgumentError, match="empty"):
        resolve_devices([])
    if not torch.cuda.is_available():
        with pytest.raises(InvalidArgumentError, match="CUDA is not available"):
            resolve_devices("cuda")
        with pytest.raises(InvalidArgumentError, match="CUDA is not available"):
            resolve_devices("cuda:0,cuda:1")


# --- background skipping -------------------------------------------------------------------


def island(shape=(640, 576), value=0) -> np.ndarray:
    """Flat background with a textured island in one corner region."""
    img = np.full(shape, value, np.uint8)
    img[40:200, 60:230] = membrane_image((160, 170), cell_size=20, seed=2)[0]
    return img


@pytest.mark.parametrize("executor", ["pipeline", "dask"])
def test_skip_background_equals_full_run_on_flat_background(tmp_path, small_model, executor):
    img = island()
    full = tilerseg.segment_to_zarr(img, small_model, tmp_path / "full.zarr", tile=64,
                                    dtype="float32", output="both")
    skipped = tilerseg.segment_to_zarr(img, small_model, tmp_path / "skip.zarr", tile=64,
                                       dtype="float32", output="both", skip_background=True,
                                       executor=executor)
    np.testing.assert_array_equal(probabilities(skipped), probabilities(full))
    np.testing.assert_array_equal(open_output(skipped)["labels"][:],
                                  open_output(full)["labels"][:])
    record = zarr.open_group(skipped, mode="r").attrs["tilerseg"]["background"]
    mask = decode_skipped(record)
    grid = tilerseg.plan(img.shape, small_model, tile=64).grid
    assert mask.shape == grid and record["skipped_chunks"] == mask.sum()
    assert 0.5 * mask.size < mask.sum() < mask.size  # most tiles skipped, not all
    assert not mask[1, 1] and mask[-1, -1]  # the island is run, the far corner is not
    assert record["value"] == [0.0]
    assert zarr.open_group(skipped, mode="r").attrs["tilerseg"]["profile"]["tiles"] == (
        mask.size - mask.sum())


def test_skip_background_from_a_pyramid_level(tmp_path, small_model):
    img = island((1024, 1024), value=230)
    write_ome_pyramid(tmp_path / "slide.ome.tif", img, {"axes": "YX"}, n_levels=4)
    out = tilerseg.segment_to_zarr(tmp_path / "slide.ome.tif", small_model,
                                   tmp_path / "o.zarr", tile=128, skip_background=True)
    record = zarr.open_group(out, mode="r").attrs["tilerseg"]["background"]
    assert record["method"] == "pyramid level 3 (128x128)"  # the coarsest level
    assert abs(record["value"][0] - 230 / 255) < 1e-3
    mask = decode_skipped(record)
    assert not mask[0, 0] and not mask[1, 1] and mask[-1, -1]


def test_all_background_runs_no_tile(tmp_path, small_model):
    img = np.full((300, 260), 17, np.uint8)
    full = tilerseg.segment_to_zarr(img, small_model, tmp_path / "f.zarr", tile=64,
                                    dtype="float32")
    out = tilerseg.segment_to_zarr(img, small_model, tmp_path / "s.zarr", tile=64,
                                   dtype="float32", skip_background=True)
    attrs = zarr.open_group(out, mode="r").attrs["tilerseg"]
    assert attrs["background"]["skipped_chunks"] == attrs["background"]["chunks"]
    assert attrs["profile"]["tiles"] == 0
    np.testing.assert_array_equal(probabilities(out), probabilities(full))


def test_noisy_background_within_tolerance_is_skipped(tmp_path, small_model):
    rng = np.random.default_rng(0)
    img = (island(value=200).astype(np.int16) + np.where(island(value=200) == 200,
           rng.integers(-3, 4, (640, 576)), 0)).astype(np.uint8)
    plan_grid = tilerseg.plan(img.shape, small_model, tile=64).grid
    strict = tilerseg.segment_to_zarr(img, small_model, tmp_path / "a.zarr", tile=64,
                                      skip_background=True, background_tolerance=0.0)
    loose = tilerseg.segment_to_zarr(img, small_model, tmp_path / "b.zarr", tile=64,
                                     skip_background=True)
    count = [zarr.open_group(p, mode="r").attrs["tilerseg"]["background"]["skipped_chunks"]
             for p in (strict, loose)]
    assert count[0] == 0 and count[1] > np.prod(plan_grid) // 2
    ref = probabilities(tilerseg.segment_to_zarr(img, small_model, tmp_path / "c.zarr",
                                                 tile=64))
    # the fill is the output on the background value: close to the run on noisy glass
    assert np.abs(probabilities(loose).astype(int) - ref.astype(int)).max() <= 40


def test_skip_background_argument_errors(tmp_path, small_model, capsys):
    img = island()
    with pytest.raises(InvalidArgumentError, match="tolerance"):
        tilerseg.segment_to_zarr(img, small_model, tmp_path / "o.zarr", tile=64,
                                 skip_background=True, background_tolerance=-1)
    np.save(tmp_path / "img.npy", img)
    code = main(["run", str(tmp_path / "img.npy"), "--model", "unet", "--tile", "64",
                 "--skip-background", "--background-tolerance", "nan", "-q"])
    assert code == 2 and "tolerance" in capsys.readouterr().err


# --- CLI --------------------------------------------------------------------------------------


def test_cli_profile_and_options(tmp_path, capsys):
    img = island()
    np.save(tmp_path / "img.npy", img)
    code = main(["run", str(tmp_path / "img.npy"), "--model", "unet", "--tile", "128",
                 "--profile", "--precision", "bf16", "--skip-background", "--workers", "1",
                 "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0
    for line in ("reading + normalising", "model", "writing", "pyramid levels", "background:"):
        assert line in out
    code = main(["run", str(tmp_path / "img.npy"), "--model", "unet", "--threads", "0"])
    assert code == 2 and "--threads 0 must be positive" in capsys.readouterr().err
    code = main(["run", str(tmp_path / "img.npy"), "--model", "unet", "--device", "cpu,cuda"])
    assert code == 2 and "tilerseg: error:" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_pyramid_levels_written_with_the_tiles(tmp_path, small_model, dtype):
    """Levels 1-2 come from the tiles as they are written; they match a commit-time build
    from the stored level 0, and every executor writes the same bytes."""
    img = membrane_image((1100, 1000), cell_size=24, seed=4)[0]
    kwargs = dict(tile=512, dtype=dtype, output="both")
    piped = tilerseg.segment_to_zarr(img, small_model, tmp_path / "p.zarr", **kwargs)
    tasked = tilerseg.segment_to_zarr(img, small_model, tmp_path / "d.zarr", executor="dask",
                                      **kwargs)
    a, b = zarr.open_group(piped, mode="r"), zarr.open_group(tasked, mode="r")
    assert sorted(a.array_keys()) == sorted(b.array_keys()) == ["0", "1", "2"]
    assert a["1"].chunks == (2, 256, 256) and a["2"].chunks == (2, 128, 128)
    for k in ("0", "1", "2", "labels/segmentation/0", "labels/segmentation/2"):
        np.testing.assert_array_equal(a[k][:], b[k][:])
    # the same level 0 through a writer that builds every level at commit
    spec = OutputSpec("YX", img.shape, (512, 512), 2, dtype, True, eager_levels=0)
    with OutputWriter(tmp_path / "c.zarr", spec) as w:
        w.probabilities[:] = a["0"][:]
        w.labels[:] = a["labels/segmentation/0"][:]
        c = zarr.open_group(w.commit(), mode="r")
    assert c["1"].chunks == (2, 512, 500)
    tolerance = 0 if dtype == "float32" else 1  # uint8: from floats vs from stored values
    for k in ("1", "2"):
        diff = np.abs(a[k][:].astype(np.float64) - c[k][:].astype(np.float64)).max()
        assert diff <= tolerance
        np.testing.assert_array_equal(a[f"labels/segmentation/{k}"][:],
                                      c[f"labels/segmentation/{k}"][:])
    assert a.attrs["ome"]["multiscales"] == c.attrs["ome"]["multiscales"]


def test_no_pyramid(tmp_path, small_model, capsys):
    np.save(tmp_path / "img.npy", island())
    out = tmp_path / "o.zarr"
    assert main(["run", str(tmp_path / "img.npy"), "--model", "unet", "--tile", "64", "-o",
                 str(out), "--no-pyramid", "-q"]) == 0
    root = zarr.open_group(out, mode="r")
    assert [d["path"] for d in root.attrs["ome"]["multiscales"][0]["datasets"]] == ["0"]
    assert sorted(root.array_keys()) == ["0"]


def test_output_error_types_unchanged(tmp_path, image, small_model):
    out = tilerseg.segment_to_zarr(image, small_model, tmp_path / "o.zarr", tile=64)
    with pytest.raises(OutputError, match="exists"):
        tilerseg.segment_to_zarr(image, small_model, out, tile=64)

"""Surviving crashes: the work directory, completion records, resume, locks and commit."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr

import tilerseg
from tilerseg.cli import main
from tilerseg.engine.jobs import TaskGrid
from tilerseg.engine.workdir import WorkDir, work_path
from tilerseg.engine.locks import FileLock, live_locks, read_lock
from tilerseg.errors import InvalidArgumentError, OutputError
from tilerseg.synthetic import membrane_image

CLI = [sys.executable, "-m", "tilerseg"]


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 1024 x 768 tiled TIFF, a small saved model and the reference output of one run."""
    d = tmp_path_factory.mktemp("resume")
    image = membrane_image((1024, 768), cell_size=24, seed=5)[0]
    tifffile.imwrite(d / "slide.tif", image, tile=(128, 128), photometric="minisblack")
    torch.manual_seed(0)
    model = tilerseg.create_model("unet", depth=2, base_channels=4)
    tilerseg.save_model(model, d / "model.pt")
    model = tilerseg.load_model(d / "model.pt")
    args = ["--model", str(d / "model.pt"), "--tile", "64", "--output", "both", "-q"]
    assert main(["run", str(d / "slide.tif"), "-o", str(d / "reference.zarr"), *args]) == 0
    return {"dir": d, "tif": d / "slide.tif", "image": image, "model": model,
            "model_file": d / "model.pt", "args": args, "reference": d / "reference.zarr"}


def arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of every level of an output."""
    root = zarr.open_group(path, mode="r")
    out = {}

    def walk(group, prefix=""):
        for name, array in group.arrays():
            out[prefix + name] = array[:]
        for name, sub in group.groups():
            walk(sub, f"{prefix}{name}/")

    walk(root)
    return out


def assert_same_arrays(a: Path, b: Path) -> None:
    x, y = arrays(a), arrays(b)
    assert sorted(x) == sorted(y) and len(x) >= 2
    for key in x:
        np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def done_count(out: Path) -> int:
    try:
        return len(os.listdir(work_path(out) / "done"))
    except FileNotFoundError:
        return 0


def wait_for(condition, timeout: float, what: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


def hold_last_task(out: Path, timeout: float = 120) -> FileLock:
    """Claim the run's last task from this process, as a live shard elsewhere would."""
    wait_for(lambda: (work_path(out) / "manifest.json").exists(), timeout, "the run to start")
    work = WorkDir.open(work_path(out))
    last = len(work.grid) - 1
    claim = work.claim(last, {"shard": "held by the test"})
    assert claim is not None, "the last task was claimed before the test could hold it"
    return claim


def kill_when(process: subprocess.Popen, out: Path, target: int, sig: int,
              rng: random.Random, again: float | None = None) -> bool:
    """Send ``sig`` once ``target`` tasks are recorded (plus a random pause), and once more
    ``again`` seconds later if given; False if the process finished first."""
    while done_count(out) < target:
        if process.poll() is not None:
            return False
        time.sleep(0.005)
    time.sleep(rng.uniform(0, 0.05))
    process.send_signal(sig)
    if again is not None:
        time.sleep(again)
        if process.poll() is None:
            process.send_signal(sig)
    process.wait(timeout=60)
    return True


# --- tasks and the work directory ------------------------------------------------------------


def test_task_grid_partitions_the_tiles():
    grid = TaskGrid.for_grid((5, 11), tiles_per_task=4)
    seen = [t for k in range(len(grid)) for t in grid.tiles(k)]
    assert sorted(seen) == [(i, j) for i in range(5) for j in range(11)]
    assert all(grid.task_of(t) == k for k in range(len(grid)) for t in grid.tiles(k))
    assert grid.block == (1, 4) and len(grid) == 15


def test_killed_run_resumes_to_the_same_bytes(slide, tmp_path):
    """A real CLI process SIGKILLed at 5 random moments, each resumed run killed again,
    then resumed to the end: every array of every level equals an uninterrupted run."""
    out = tmp_path / "killed.zarr"
    rng = random.Random(1)
    command = [*CLI, "run", str(slide["tif"]), "-o", str(out), *slide["args"], "--resume"]
    total = len(TaskGrid.for_grid((16, 12)))
    kills = 0
    for k in range(5):
        target = min(total - 1, done_count(out) + rng.randint(1, total // 8))
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert kill_when(process, out, target, signal.SIGKILL, rng), process.stderr.read()
        assert process.returncode == -signal.SIGKILL
        kills += 1
        assert not out.exists() and work_path(out).is_dir()
    assert kills == 5 and 0 < done_count(out) < total
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert not work_path(out).exists()
    assert_same_arrays(out, slide["reference"])
    resumed = subprocess.run([c for c in command if c != "-q"], capture_output=True,
                             text=True, timeout=60)
    assert resumed.returncode == 0 and "already complete" in resumed.stdout


@pytest.mark.parametrize("sig,code,again", [(signal.SIGINT, 130, None),
                                            (signal.SIGTERM, 143, None),
                                            (signal.SIGTERM, 143, 0.05),  # as scancel does
                                            (signal.SIGINT, 130, 0.05)])
def test_a_signal_keeps_the_existing_output_and_the_partial_run(slide, tmp_path, sig, code,
                                                                again):
    out = tmp_path / "out.zarr"
    assert main(["run", str(slide["tif"]), "-o", str(out), "--model", str(slide["model_file"]),
                 "--tile", "128", "-q"]) == 0  # an existing output, other parameters
    before = files(out)
    command = [*CLI, "run", str(slide["tif"]), "-o", str(out), *slide["args"], "--overwrite"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert kill_when(process, out, 5, sig, random.Random(2), again)
    err = process.stderr.read()
    assert process.returncode == code, err  # not 134 (SIGABRT) after a second signal
    assert ("interrupted" if code == 130 else "terminated") in err
    assert "Traceback" not in err and "--resume" in err and err.count("\n") == 1
    assert not live_locks(work_path(out) / "locks")  # released on the way out
    assert files(out) == before
    assert 5 <= done_count(out) < 48
    assert main(["run", str(slide["tif"]), "-o", str(out), *slide["args"], "--overwrite",
                 "--resume"]) == 0
    assert_same_arrays(out, slide["reference"])


# --- resume through the API -----------------------------------------------------------------


def run(slide, out, **kwargs):
    options = dict(tile=64, output="both", device="cpu")
    options.update(kwargs)
    return tilerseg.segment_to_zarr(slide["tif"], slide["model"], out, **options)


def test_crash_between_data_and_record_redoes_the_task(slide, tmp_path, monkeypatch):
    out = tmp_path / "o.zarr"
    real = WorkDir.mark_done
    victim = 7

    def crash(self, task_id, **info):
        if task_id == victim:
            raise OSError(errno.EIO, "the node crashed")  # the chunks are stored, no record
        return real(self, task_id, **info)

    monkeypatch.setattr(WorkDir, "mark_done", crash)
    with pytest.raises(OSError, match="node crashed"):
        run(slide, out)
    monkeypatch.setattr(WorkDir, "mark_done", real)
    work = WorkDir.open(work_path(out))
    assert victim not in work.done()
    # damage the task's level-0 chunks: only a recomputation can repair them
    tiles = work.grid.tiles(victim)
    for i, j in tiles:
        chunk = work.store / "0" / "c" / "0" / str(i) / str(j)
        assert chunk.is_file()
        chunk.write_bytes(b"garbage")
    run(slide, out, resume=True)
    assert_same_arrays(out, slide["reference"])


def test_resume_refuses_a_changed_parameter_naming_it(slide, tmp_path, monkeypatch):
    out = tmp_path / "o.zarr"
    import tilerseg.engine.tasks as tasks

    real, calls = tasks.RunContext.write, {"n": 0}

    def stop(self, tile, probs):
        calls["n"] += 1
        if calls["n"] > 20:
            raise KeyboardInterrupt
        return real(self, tile, probs)

    monkeypatch.setattr(tasks.RunContext, "write", stop)
    with pytest.raises(KeyboardInterrupt):
        run(slide, out)
    monkeypatch.setattr(tasks.RunContext, "write", real)
    cases = {"tile": dict(tile=128), "dtype": dict(dtype="float16"),
             "output": dict(output="labels"), "threshold": dict(threshold=0.3),
             "precision": dict(precision="bf16"), "normalize": dict(normalize=(0, 100)),
             "pyramid": dict(pyramid=False)}
    for name, change in cases.items():
        with pytest.raises(InvalidArgumentError, match=rf"other parameters: {name} \("):
            run(slide, out, resume=True, **change)
    other = tilerseg.create_model("unet", depth=2, base_channels=4)
    with pytest.raises(InvalidArgumentError, match="model weights"):
        tilerseg.segment_to_zarr(slide["tif"], other, out, tile=64, output="both", resume=True)
    # without --resume the partial run is neither reused nor deleted
    with pytest.raises(OutputError, match="pass --resume to continue it or --overwrite"):
        run(slide, out)
    assert work_path(out).is_dir()
    # how it is computed may change (other threads round otherwise: within one uint8 step)
    run(slide, out, resume=True, batch_size=2, workers=1, threads=2)
    got, ref = arrays(out), arrays(slide["reference"])
    assert np.abs(got["0"].astype(int) - ref["0"].astype(int)).max() <= 1
    assert (got["labels/segmentation/0"] != ref["labels/segmentation/0"]).mean() < 1e-4


def test_a_resumed_run_writes_the_chunks_of_an_uninterrupted_one_byte_for_byte(slide, tmp_path):
    """What README.md promises: every chunk file (and every array's metadata) is the same
    bytes; only the root zarr.json differs (the run's id, its profile)."""
    out = tmp_path / "o.zarr"

    def stop_once_a_task_is_recorded(done, total):
        if done_count(out) > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(slide, out, progress=stop_once_a_task_is_recorded)
    assert 0 < done_count(out) < len(WorkDir.open(work_path(out)).grid)  # a partial run
    run(slide, out, resume=True)
    got, ref = files(out), files(slide["reference"])
    assert got.keys() == ref.keys()
    assert [name for name in got if got[name] != ref[name]] == ["zarr.json"]


def test_resume_of_a_complete_output_returns_at_once(slide, tmp_path, monkeypatch):
    """Without planning the image or opening the run (nothing to compute); how long it
    takes is measured by benchmarks/bench_resume.py, not here."""
    import tilerseg.engine.resume as resume

    out = tmp_path / "o.zarr"
    run(slide, out)
    before = files(out)
    with monkeypatch.context() as m:
        for name in ("prepare", "open_context"):
            m.setattr(resume, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} was called"))
        assert run(slide, out, resume=True) == out
    assert files(out) == before
    with pytest.raises(OutputError, match="exists with other parameters: tile"):
        run(slide, out, resume=True, tile=128)
    with pytest.raises(OutputError, match="exists; pass --overwrite"):
        run(slide, out)
    assert files(out) == before


def test_overwrite_starts_an_unfinished_run_again(slide, tmp_path, monkeypatch):
    out = tmp_path / "o.zarr"
    import tilerseg.engine.tasks as tasks

    real = tasks.RunContext.write
    monkeypatch.setattr(tasks.RunContext, "write",
                        lambda self, tile, probs: (_ for _ in ()).throw(KeyboardInterrupt)
                        if tile.index == (3, 3) else real(self, tile, probs))
    with pytest.raises(KeyboardInterrupt):
        run(slide, out, tile=128)
    monkeypatch.setattr(tasks.RunContext, "write", real)
    run(slide, out, overwrite=True)  # other parameters, from scratch
    assert_same_arrays(out, slide["reference"])


def test_disk_full_in_the_store_is_one_line_and_resumable(slide, tmp_path, monkeypatch, capsys):
    """ENOSPC raised by the file system while chunks are written (the writer puts whole
    chunks into the store itself, tilerseg/io/chunks.py)."""
    out = tmp_path / "o.zarr"
    run(slide, out, tile=128)  # an existing output, other parameters
    before = files(out)
    real, calls = Path.write_bytes, {"n": 0}

    def full(self, data):
        if "/c/" in self.as_posix():
            calls["n"] += 1
            if calls["n"] > 60:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    code = main(["run", str(slide["tif"]), "-o", str(out), *slide["args"], "--overwrite"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "No space left on device" in err[0]
    assert err[0].startswith("tilerseg: error:")
    assert files(out) == before
    assert 0 < tilerseg.status(out)["done"] < tilerseg.status(out)["tasks"]
    monkeypatch.setattr(Path, "write_bytes", real)
    assert main(["run", str(slide["tif"]), "-o", str(out), *slide["args"], "--overwrite",
                 "--resume"]) == 0
    assert_same_arrays(out, slide["reference"])


def test_failure_at_commit_keeps_everything_resumable(slide, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o.zarr"
    run(slide, out, tile=128)
    before = files(out)
    import tilerseg.io.writers as writers

    def broken(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writers, "downsample", broken)  # the pyramid levels built at commit
    code = main(["run", str(slide["tif"]), "-o", str(out), *slide["args"], "--overwrite"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "No space left" in err[0], err
    assert files(out) == before
    state = tilerseg.status(out)
    assert state["done"] == state["tasks"] and not state["complete"]
    monkeypatch.undo()
    assert main(["run", str(slide["tif"]), "-o", str(out), *slide["args"], "--overwrite",
                 "--resume"]) == 0
    assert_same_arrays(out, slide["reference"])


# --- two runs at once ------------------------------------------------------------------------


def test_a_second_run_on_the_same_output_refuses(slide, tmp_path, capsys):
    """A plain second run (or --overwrite) must not start the run again under the first."""
    out = tmp_path / "o.zarr"
    command = [*CLI, "run", str(slide["tif"]), "-o", str(out), *slide["args"]]
    first = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        while done_count(out) < 2:
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.01)
        for extra in ([], ["--overwrite"]):
            code = main(["run", str(slide["tif"]), "-o", str(out), *slide["args"], *extra])
            err = capsys.readouterr().err
            assert code == 2 and "another tilerseg run is writing" in err, (extra, err)
            assert f"pid {first.pid}" in err and os.uname().nodename in err
    finally:
        assert first.wait(timeout=300) == 0
    assert_same_arrays(out, slide["reference"])


def test_two_resumed_runs_share_the_tasks_and_commit_once(slide, tmp_path):
    """Two --resume processes at once on one output: they claim tasks, no task is computed
    by both, the output is committed once and equals one run."""
    out = tmp_path / "o.zarr"
    command = [*CLI, "run", str(slide["tif"]), "-o", str(out), *slide["args"], "--resume"]
    runs = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for run in runs:
        assert run.wait(timeout=300) == 0, run.stderr.read()
    assert_same_arrays(out, slide["reference"])
    attrs = zarr.open_group(out, mode="r").attrs["tilerseg"]
    workers = attrs["profile"]["workers"]
    assert {w["worker"] for w in workers} <= {f"{os.uname().nodename}:{r.pid}" for r in runs}
    assert sum(w["tasks"] for w in workers) == attrs["manifest"]["tasks"]["count"], workers
    assert attrs["committed_by"] in {f"{os.uname().nodename}:{r.pid}" for r in runs}


def test_stale_locks_are_detected(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / "run.lock"
    path.write_text(json.dumps({"kind": "run", "host": os.uname().nodename, "pid": dead.pid,
                                "ticks": None, "since": "then", "info": {}}))
    assert read_lock(path).stale and live_locks(tmp_path) == []
    with FileLock(path, "run") as lock:  # taken over
        assert read_lock(path).pid == os.getpid() and lock.held
    # a lock from another host is stale only once its heartbeat stopped long ago
    path.write_text(json.dumps({"kind": "run", "host": "elsewhere", "pid": 1, "ticks": None,
                                "since": "then", "info": {}}))
    assert not read_lock(path).stale
    os.utime(path, (time.time() - 3600, time.time() - 3600))
    assert read_lock(path).stale


def test_status_and_finalize_through_the_cli(slide, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o.zarr"
    assert main(["status", str(out)]) == 2
    assert "no output" in capsys.readouterr().err
    args = [a for a in slide["args"] if a != "-q"]
    import tilerseg.engine.tasks as tasks

    real = tasks.RunContext.write
    monkeypatch.setattr(tasks.RunContext, "write", lambda self, tile, probs: (
        _ for _ in ()).throw(KeyboardInterrupt) if tile.index == (8, 0) else real(self, tile, probs))
    assert main(["run", str(slide["tif"]), "-o", str(out), *args, "--shard", "0/2"]) == 130
    capsys.readouterr()
    monkeypatch.setattr(tasks.RunContext, "write", real)
    work = WorkDir.open(work_path(out))
    done, missing = len(work.done()), work.missing()
    assert 0 < done < 48 and 24 in missing  # task 24 holds tile (8, 0)
    # a claim left by a process that is gone, and one held by a live process
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for task, pid in ((missing[0], gone.pid), (missing[-1], alive.pid)):
            (work.claims_dir / str(task)).write_text(json.dumps({
                "kind": "claim", "host": os.uname().nodename, "pid": pid, "ticks": None,
                "since": "then", "token": "t", "info": {"shard": "9/9"}}))
        assert main(["status", str(out)]) == 0
        text = capsys.readouterr().out
        assert f"unfinished: {done} of 48 tasks done" in text, text
        assert f"missing     tasks {missing[0]}-" in text or \
            f"missing     tasks {missing[0]}," in text, text
        assert f"claimed     task {missing[0]} by claim (shard 9/9)" in text and "stale" in \
            text.split(f"claimed     task {missing[0]}")[1].splitlines()[0]
        live_line = text.split(f"claimed     task {missing[-1]}")[1].splitlines()[0]
        assert f"pid {alive.pid}" in live_line and "stale" not in live_line, text
        assert f"running     claim (shard 9/9) on host {os.uname().nodename}, pid {alive.pid}" \
            in text
        assert "worked      shard 0/2" in text  # the interrupted shard's record
        state = json.loads(main(["status", str(out), "--json"]) == 0 and
                           capsys.readouterr().out)
        assert state["missing"][0][0] == missing[0] and state["done"] == done
        assert main(["finalize", str(out)]) == 2
        assert "still being computed" in capsys.readouterr().err
    finally:
        alive.kill()
        alive.wait()
    assert main(["finalize", str(out)]) == 2  # its holder is gone now: tasks are missing
    assert f"{48 - done} of 48 tasks are not done" in capsys.readouterr().err
    assert main(["run", str(slide["tif"]), "-o", str(out), *args, "--shard", "1/2"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert main(["status", str(out), "--json"]) == 0
    state = json.loads(capsys.readouterr().out)
    assert state["complete"] and state["done"] == 48
    assert_same_arrays(out, slide["reference"])


def test_resume_of_a_complete_output_needs_no_torch(slide, tmp_path):
    """The requeued job's common case is answered from file metadata alone."""
    out = tmp_path / "o.zarr"
    args = ["run", str(slide["tif"]), "-o", str(out), *slide["args"]]
    assert main(args) == 0
    probe = ("import sys; from tilerseg.cli import main; code = main({!r}); "
             "print(code, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe.format([*args, "--resume"])],
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["0", "False"], result.stderr
    # a changed parameter is not answered from the metadata: it is refused as usual
    result = subprocess.run([sys.executable, "-c", probe.format(
        [*args, "--resume", "--dtype", "float32"])], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["2", "True"] and "dtype" in result.stderr
    # a touched model file (same weights) takes the slow way to the same answer
    os.utime(slide["model_file"])
    result = subprocess.run([sys.executable, "-c", probe.format([*args, "--resume"])],
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["0", "True"], result.stderr


def test_status_needs_no_torch(slide, tmp_path):
    out = tmp_path / "o.zarr"
    assert main(["run", str(slide["tif"]), "-o", str(out), *slide["args"]]) == 0
    probe = ("import sys; from tilerseg.cli import main; code = main(['status', {!r}]); "
             "print(code, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe.format(str(out))], capture_output=True,
                            text=True, timeout=60)
    assert result.stdout.split()[-2:] == ["0", "False"], result.stderr
    assert "state       complete" in result.stdout


def test_overwrite_with_resume_starts_a_changed_run_again(slide, tmp_path, monkeypatch):
    out = tmp_path / "o.zarr"
    import tilerseg.engine.tasks as tasks

    real = tasks.RunContext.write
    monkeypatch.setattr(tasks.RunContext, "write", lambda self, tile, probs: (
        _ for _ in ()).throw(KeyboardInterrupt) if tile.index == (2, 2) else real(self, tile, probs))
    with pytest.raises(KeyboardInterrupt):
        run(slide, out, tile=128)
    monkeypatch.setattr(tasks.RunContext, "write", real)
    with pytest.raises(InvalidArgumentError, match="pass --overwrite to start again"):
        run(slide, out, resume=True)
    run(slide, out, resume=True, overwrite=True)
    assert_same_arrays(out, slide["reference"])


def test_a_lock_taken_over_is_not_released_by_its_old_holder(tmp_path):
    path = tmp_path / "run.lock"
    old = FileLock(path, "run", heartbeat=False).acquire()
    path.write_text(json.dumps({"kind": "run", "host": "elsewhere", "pid": 7, "ticks": None,
                                "token": "the-new-holder", "since": "now", "info": {}}))
    old.release()
    assert read_lock(path).token == "the-new-holder"


def test_a_requeued_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    path = tmp_path / "shard-0-of-4.lock"
    path.write_text(json.dumps({"kind": "shard", "host": "node17", "pid": 4242, "ticks": None,
                                "token": "t", "job": "987654", "since": "then", "info": {}}))
    assert not read_lock(path).stale  # another host, touched just now
    monkeypatch.setenv("SLURM_JOB_ID", "987654")  # the same run of the same job: another
    assert not read_lock(path).stale              # node of a multi-node job, alive
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the job, requeued onto this node
    assert read_lock(path).stale
    with FileLock(path, "shard"):
        assert read_lock(path).pid == os.getpid()


def test_a_complete_output_does_not_remove_another_unfinished_run(slide, tmp_path, monkeypatch):
    """--resume on a complete output leaves an unfinished --overwrite run of it alone."""
    out = tmp_path / "o.zarr"
    run(slide, out)
    import tilerseg.engine.tasks as tasks

    real = tasks.RunContext.write
    monkeypatch.setattr(tasks.RunContext, "write", lambda self, tile, probs: (
        _ for _ in ()).throw(KeyboardInterrupt) if tile.index == (2, 2) else real(self, tile, probs))
    with pytest.raises(KeyboardInterrupt):
        run(slide, out, overwrite=True)  # the same parameters, recomputed: killed
    monkeypatch.setattr(tasks.RunContext, "write", real)
    run(slide, out, resume=True)  # already complete
    assert work_path(out).is_dir()

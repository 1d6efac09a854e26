"""Claimed tasks: a task held by a live process is waited for, never computed twice; a claim
whose holder is gone is taken over; records and claims are consistent after any run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import zarr

import tilerseg
from tilerseg.engine.claims import TaskClaims
from tilerseg.engine.workdir import WorkDir, work_path
from tilerseg.engine.locks import _start_ticks, read_lock

from .test_resume import assert_same_arrays, slide  # noqa: F401 - the fixture


def interrupted(slide, out, monkeypatch, at=(4, 0)):  # noqa: F811
    """An unfinished run of ``out``: the first run stopped at tile ``at``."""
    import tilerseg.engine.tasks as tasks

    real = tasks.RunContext.write
    monkeypatch.setattr(tasks.RunContext, "write", lambda self, tile, probs: (
        _ for _ in ()).throw(KeyboardInterrupt) if tile.index == at else real(self, tile, probs))
    with pytest.raises(KeyboardInterrupt):
        run(slide, out)
    monkeypatch.setattr(tasks.RunContext, "write", real)
    return WorkDir.open(work_path(out))


def run(slide, out, **kwargs):  # noqa: F811
    return tilerseg.segment_to_zarr(slide["tif"], slide["model"], out, tile=64, output="both",
                                    **kwargs)


def claim_as(work: WorkDir, task: int, pid: int) -> None:
    """A claim on ``task`` held by process ``pid`` of this host."""
    (work.claims_dir / str(task)).write_text(json.dumps({
        "kind": "claim", "host": os.uname().nodename, "pid": pid, "ticks": _start_ticks(pid),
        "token": "elsewhere", "since": "now", "info": {"shard": "other"}}))


def record_of(out, task) -> dict:
    return json.loads((work_path(out) / "done" / str(task)).read_text())


def test_a_task_held_by_a_live_process_is_waited_for_then_taken_over(slide, tmp_path,  # noqa: F811
                                                                     monkeypatch):
    out = tmp_path / "o.zarr"
    work = interrupted(slide, out, monkeypatch)
    held = work.missing()[0]
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    claim_as(work, held, holder.pid)
    assert not read_lock(work.claims_dir / str(held)).stale
    result: list = []
    runner = threading.Thread(target=lambda: result.append(run(slide, out, resume=True)))
    try:
        runner.start()
        deadline = time.monotonic() + 120
        while len(work.done()) < len(work.grid) - 1:  # every task but the held one
            assert time.monotonic() < deadline and runner.is_alive()
            time.sleep(0.05)
        time.sleep(2.5)  # a few looks at the held task
        assert runner.is_alive() and not work.is_done(held)  # waits, does not compute it
    finally:
        holder.kill()
        holder.wait()
    runner.join(timeout=120)  # the holder is gone: its claim is stale, taken over
    assert result == [out]
    assert_same_arrays(out, slide["reference"])
    workers = zarr.open_group(out, mode="r").attrs["tilerseg"]["profile"]["workers"]
    assert sum(w["tasks"] for w in workers) == len(work.grid)


def test_a_claim_of_a_process_that_is_gone_is_taken_over_at_once(slide, tmp_path,  # noqa: F811
                                                                  monkeypatch):
    out = tmp_path / "o.zarr"
    work = interrupted(slide, out, monkeypatch)
    held = work.missing()[0]
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    claim_as(work, held, gone.pid)
    assert read_lock(work.claims_dir / str(held)).stale
    start = time.monotonic()
    run(slide, out, resume=True)
    assert time.monotonic() - start < 60
    assert_same_arrays(out, slide["reference"])


def test_a_task_recorded_by_its_holder_is_not_computed_again(slide, tmp_path,  # noqa: F811
                                                           monkeypatch):
    """While this process waits for a task another live process holds, the holder records
    it: this process takes the record as it is (and never computes the task)."""
    out = tmp_path / "o.zarr"
    work = interrupted(slide, out, monkeypatch)
    held = work.missing()[-1]
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    claim_as(work, held, holder.pid)
    record = {"host": "elsewhere", "pid": holder.pid, "time": 0.0}
    try:
        runner = threading.Thread(target=run, args=(slide, out), kwargs={"resume": True})
        runner.start()
        while len(work.done()) < len(work.grid) - 1:
            assert runner.is_alive()
            time.sleep(0.05)
        (work.done_dir / str(held)).write_text(json.dumps(record))  # the holder's record
        (work.claims_dir / str(held)).unlink()  # ... and it lets its claim go
        runner.join(timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert not runner.is_alive()
    workers = zarr.open_group(out, mode="r").attrs["tilerseg"]["profile"]["workers"]
    assert sum(w["tasks"] for w in workers) == len(work.grid) - 1  # all but the held one


def test_claims_are_tried_in_order_and_released(tmp_path, slide, monkeypatch):  # noqa: F811
    out = tmp_path / "o.zarr"
    work = interrupted(slide, out, monkeypatch)
    missing = work.missing()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        claim_as(work, missing[1], other.pid)
        claims = TaskClaims(work, missing, {"shard": "test"})
        got = list(claims.claimable())
        assert got == [k for k in missing if k != missing[1]]  # in order, the held one not
        assert claims.elsewhere == [missing[1]] and claims.held == got
        holder = read_lock(work.claims_dir / str(got[0]))
        assert holder.pid == os.getpid() and holder.info == {"shard": "test"}
        claims.release(got[0])
        assert not (work.claims_dir / str(got[0])).exists()
        claims.release_all()
        assert sorted(os.listdir(work.claims_dir)) == [str(missing[1])]
    finally:
        other.kill()
        other.wait()
    waited = list(claims.wait(poll=0.05))  # the holder is gone: its task is taken over
    assert waited == [missing[1]] and claims.held == [missing[1]]
    claims.release_all()


def test_a_claim_taken_over_is_no_longer_owned(slide, tmp_path, monkeypatch):  # noqa: F811
    """A process presumed dead (its claim taken over) sees it before writing a tile."""
    out = tmp_path / "o.zarr"
    work = interrupted(slide, out, monkeypatch)
    task = work.missing()[0]
    claims = TaskClaims(work, [task])
    assert list(claims.claimable()) == [task] and claims.owns(task)
    path = work.claims_dir / str(task)
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "token": "another process", "pid": 1}))
    assert not claims.owns(task)
    claims.release_all()
    assert json.loads(path.read_text())["token"] == "another process"  # not removed


def test_a_commit_does_not_wait_forever_for_a_process_still_holding_a_lock(
        slide, tmp_path, monkeypatch):  # noqa: F811
    """Every task recorded, another live process still holds its lock (it is about to leave,
    or stuck): the commit waits a little for it, then commits anyway; nobody leaves the
    run uncommitted."""
    import tilerseg.engine.workdir as workdir

    out = tmp_path / "o.zarr"
    interrupted(slide, out, monkeypatch)
    monkeypatch.setattr(workdir, "LEAVE_WAIT", 0.5)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        locks = work_path(out) / "locks"
        (locks / "run-elsewhere.lock").write_text(json.dumps({
            "kind": "run", "host": os.uname().nodename, "pid": holder.pid,
            "ticks": _start_ticks(holder.pid), "token": "t", "since": "now", "info": {}}))
        run(slide, out, resume=True)
    finally:
        holder.kill()
        holder.wait()
    assert_same_arrays(out, slide["reference"])


def test_a_lock_file_is_not_left_empty_when_writing_it_fails(tmp_path, monkeypatch):
    import errno

    from tilerseg.engine.locks import FileLock

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", full)
    with pytest.raises(OSError, match="No space left"):
        FileLock(tmp_path / "a.lock", "run").acquire()
    assert not (tmp_path / "a.lock").exists()

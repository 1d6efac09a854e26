"""A real SLURM, started by the tests (see tests/slurm.py): job arrays of shards, scancel and
resubmission, dask-jobqueue worker jobs that are replaced when they end, and a client that
stops (never hangs) when its worker jobs die at their walltime.

Where a test needs the run to be unfinished at a given moment, the test process itself holds
the claim of one task (as a live shard elsewhere would): the SLURM jobs compute every other
task and wait for that one, so what is being checked does not depend on the machine's speed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tifffile
import torch
import zarr

import tilerseg
from tilerseg.engine.workdir import WorkDir, work_path
from tilerseg.synthetic import membrane_image

from .slurm import Slurm, missing
from .test_resume import assert_same_arrays, done_count, hold_last_task, wait_for

pytest.importorskip("dask_jobqueue")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    why = missing()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{why}; CI must run the SLURM tests (.ci/run installs it)")
        pytest.skip(why)
    cluster = Slurm(tmp_path_factory.mktemp("slurm")).start()
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)  # for dask-jobqueue's sbatch calls
    try:
        yield cluster
    finally:
        cluster.stop()
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiled slide, a saved model and the output of a local run (the reference)."""
    d = tmp_path_factory.mktemp("slurm-data")
    image = membrane_image((1024, 1024), cell_size=24, seed=21)[0]
    tifffile.imwrite(d / "slide.tif", image, tile=(128, 128), photometric="minisblack")
    torch.manual_seed(0)
    tilerseg.save_model(tilerseg.create_model("unet", depth=3, base_channels=8),
                        d / "model.pt")
    args = ["--model", str(d / "model.pt"), "--tile", "64", "--output", "both"]
    reference = d / "reference.zarr"
    done = subprocess.run([sys.executable, "-m", "tilerseg", "run", str(d / "slide.tif"), "-o",
                           str(reference), *args, "-q"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return {"tif": d / "slide.tif", "args": args, "reference": reference}


def command(data: dict, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tilerseg", "run", str(data["tif"]), "-o", str(out),
            *data["args"], *extra]


def array_script(data: dict, out: Path, folder: Path) -> str:
    """A job array's script: one shard per array task; its exit status in a file (bash
    survives scancel's SIGTERM with the trap, and writes what tilerseg returned)."""
    run = " ".join(f"'{a}'" for a in command(data, out, "--shard", "auto", "-q"))
    return ("#!/bin/bash\ntrap 'echo got SIGTERM' TERM\n"
            f"{run}\n"
            f"echo $? > {folder}/status-${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}\n")


def statuses(folder: Path, job: str) -> dict[str, int]:
    return {p.name.split("-", 1)[1]: int(p.read_text().strip())
            for p in folder.glob(f"status-{job}_*")}


def test_a_job_array_of_shards_equals_a_local_run(slurm, data, tmp_path):
    out = tmp_path / "o.zarr"
    job = slurm.sbatch(array_script(data, out, tmp_path), "--array=0-2", "--cpus-per-task=1",
                       "--mem=1G", f"--output={tmp_path}/%A_%a.log", cwd=tmp_path)
    jobs = slurm.wait(job, timeout=600)
    assert sorted(jobs) == [f"{job}_{i}" for i in range(3)], jobs
    assert all(j["JobState"] == "COMPLETED" and j["ExitCode"] == "0:0" for j in jobs.values())
    assert statuses(tmp_path, job) == {f"{job}_{i}": 0 for i in range(3)}
    assert_same_arrays(out, data["reference"])
    attrs = zarr.open_group(out, mode="r").attrs["tilerseg"]
    assert attrs["executor"] in {f"shard {job}_{i}" for i in range(3)}  # committed once
    workers = attrs["profile"]["workers"]
    assert {w["shard"] for w in workers} <= {f"{job}_{i}" for i in range(3)}
    assert {w["job"] for w in workers} <= {j["JobId"] for j in jobs.values()}  # ran in SLURM
    assert sum(w["tasks"] for w in workers) == attrs["manifest"]["tasks"]["count"]


def test_scancel_exits_143_and_one_resubmitted_index_finishes(slurm, data, tmp_path):
    """scancel mid-run: every running shard exits 143 (SLURM sends SIGTERM twice); then
    ``sbatch --array=1`` alone finishes the output without redoing what was recorded."""
    out = tmp_path / "o.zarr"
    script = array_script(data, out, tmp_path)
    options = ["--cpus-per-task=1", "--mem=1G", f"--output={tmp_path}/%A_%a.log"]
    job = slurm.sbatch(script, "--array=0-2", *options, cwd=tmp_path)
    held = hold_last_task(out)
    wait_for(lambda: done_count(out) >= 4, 300, "tasks to be recorded")
    slurm.run("scancel", job)
    jobs = slurm.wait(job, timeout=120)
    codes = statuses(tmp_path, job)
    assert codes and set(codes.values()) == {143}, (codes, jobs)
    for log in tmp_path.glob(f"{job}_*.log"):
        text = log.read_text()
        assert "terminate called" not in text and "Traceback" not in text, text
    held.release()  # the holder gave its task up
    work = WorkDir.open(work_path(out))
    before = len(work.done())
    assert before < len(work.grid)
    again = slurm.sbatch(script, "--array=1", *options, cwd=tmp_path)
    jobs = slurm.wait(again, timeout=600)
    assert [j["JobState"] for j in jobs.values()] == ["COMPLETED"]
    assert statuses(tmp_path, again) == {f"{again}_1": 0}
    assert_same_arrays(out, data["reference"])
    workers = zarr.open_group(out, mode="r").attrs["tilerseg"]["profile"]["workers"]
    resubmitted = [w for w in workers if w["shard"] == f"{again}_1"]
    assert len(resubmitted) == 1 and resubmitted[0]["tasks"] == len(work.grid) - before


def jobs_named(slurm: Slurm, name: str = "dask-worker") -> dict[str, str]:
    """``{job id: state}`` of the jobs of that name SLURM knows (finished ones too)."""
    out = slurm.run("squeue", "-h", "-t", "all", "-n", name, "-o", "%i %T")
    return dict(line.split() for line in out.splitlines())


def test_cluster_slurm_replaces_ended_jobs_and_equals_a_local_run(slurm, data, tmp_path):
    """--cluster slurm --jobs 2: both worker jobs are cancelled mid-run; they are replaced,
    the run finishes, equal to a local run, and its tiles were computed in SLURM jobs."""
    out = tmp_path / "o.zarr"
    before = set(jobs_named(slurm))
    client = subprocess.Popen(
        command(data, out, "--cluster", "slurm", "--jobs", "2", "--cores", "1", "--memory",
                "1GB", "--walltime", "00:10:00"),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=slurm.env)
    try:
        held = hold_last_task(out)
        wait_for(lambda: done_count(out) >= len(WorkDir.open(work_path(out)).grid) - 1, 300,
                 "every task but the held one")
        first = {j for j, s in jobs_named(slurm).items() if j not in before and s == "RUNNING"}
        assert len(first) == 2, jobs_named(slurm)
        slurm.run("scancel", *first)
        wait_for(lambda: len(set(jobs_named(slurm)) - before - first) >= 2, 120,
                 "two replacement jobs")
        held.release()
        code = client.wait(timeout=300)
        err = client.stderr.read()
        assert code == 0, err
        assert err.count("ended (cancelled); starting a replacement") == 2, err
    finally:
        if client.poll() is None:
            client.kill()
    assert_same_arrays(out, data["reference"])
    attrs = zarr.open_group(out, mode="r").attrs["tilerseg"]
    assert attrs["executor"] == "dask.distributed"
    ours = set(jobs_named(slurm)) - before
    replacements = ours - first
    ran = {w["job"] for w in attrs["profile"]["workers"]}
    assert ran and ran <= ours and ran & replacements, (ran, first, replacements)


def test_worker_jobs_at_their_walltime_end_the_client_and_resume_completes(slurm, data,
                                                                          tmp_path):
    """All worker jobs reach a 1-minute walltime with no replacement allowed: the client
    stops within minutes with one line naming the cause (exit 1, the run kept), and
    --resume completes it, equal to a local run."""
    out = tmp_path / "o.zarr"
    started = time.monotonic()
    client = subprocess.Popen(
        command(data, out, "--cluster", "slurm", "--jobs", "2", "--cores", "1", "--memory",
                "1GB", "--walltime", "00:01:00", "--max-replacements", "0"),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=slurm.env)
    try:
        held = hold_last_task(out)
        code = client.wait(timeout=400)
    finally:
        if client.poll() is None:
            client.kill()
    err = client.stderr.read().strip().splitlines()
    assert code == 1, err
    assert time.monotonic() - started < 400
    # each job's end is told as it happens; then one error line naming the cause
    assert err[-1].startswith("tilerseg: error: all 2 worker jobs ended (2 time limit)"), err
    assert "--resume" in err[-1] and "Traceback" not in "\n".join(err)
    assert all(line.startswith("tilerseg: warning: cluster: worker job ") and
               "ended (time limit)" in line for line in err[:-1]) and len(err) == 3, err
    assert work_path(out).is_dir() and not out.exists()
    held.release()
    done = subprocess.run(command(data, out, "--resume", "-q"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert_same_arrays(out, data["reference"])

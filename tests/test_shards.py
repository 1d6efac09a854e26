"""Job arrays without a scheduler: shards of one output, in any order and at once."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import torch
import zarr

import tilerseg
from tilerseg.engine.executors.shard import Shard, parse_shard
from tilerseg.engine.workdir import work_path
from tilerseg.errors import InvalidArgumentError, InvalidImageError

from .test_resume import CLI, assert_same_arrays, slide  # noqa: F401 - the fixture


def test_one_shard_does_every_task_it_can_claim(slide, tmp_path):  # noqa: F811
    """A shard is not a fixed share: alone, it computes every task and commits; a shard
    started on the complete output does nothing."""
    out = tmp_path / "o.zarr"
    tilerseg.segment_to_zarr(slide["tif"], slide["model"], out, tile=64, output="both",
                             shard=(1, 3))
    attrs = zarr.open_group(out, mode="r").attrs["tilerseg"]
    assert attrs["executor"] == "shard 1/3"
    assert [w["shard"] for w in attrs["profile"]["workers"]] == ["1/3"]
    assert attrs["profile"]["workers"][0]["tasks"] == attrs["manifest"]["tasks"]["count"]
    assert not work_path(out).exists()
    assert_same_arrays(out, slide["reference"])
    before = attrs["manifest"]["run_id"]
    tilerseg.segment_to_zarr(slide["tif"], slide["model"], out, tile=64, output="both",
                             shard=(0, 3))
    assert zarr.open_group(out, mode="r").attrs["tilerseg"]["manifest"]["run_id"] == before


def test_concurrent_shard_processes_commit_exactly_once(slide, tmp_path):  # noqa: F811
    out = tmp_path / "o.zarr"
    args = [a for a in slide["args"] if a != "-q"]
    processes = [
        subprocess.Popen([*CLI, "run", str(slide["tif"]), "-o", str(out), *args, "--shard",
                          "auto"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "SLURM_ARRAY_JOB_ID": "77",
                              "SLURM_ARRAY_TASK_ID": str(i + 1), "SLURM_ARRAY_TASK_MIN": "1",
                              "SLURM_ARRAY_TASK_COUNT": "3"})
        for i in range(3)
    ]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], [e for _, e in outputs]
    wrote = [o for o, _ in outputs if o.startswith("wrote ")]
    assert len(wrote) == 1, outputs  # committed exactly once
    assert all(o.startswith("shard 77_") and ": done" in o for o, _ in outputs
               if not o.startswith("wrote ")), outputs
    assert_same_arrays(out, slide["reference"])
    committer = processes[[o for o, _ in outputs].index(wrote[0])]
    attrs = zarr.open_group(out, mode="r").attrs["tilerseg"]
    assert attrs["committed_by"].endswith(f":{committer.pid}")
    workers = attrs["profile"]["workers"]  # every process that computed left its record
    assert {w["shard"] for w in workers} <= {"77_1", "77_2", "77_3"}
    assert sum(w["tasks"] for w in workers) == attrs["manifest"]["tasks"]["count"], workers


def test_shard_arguments():
    assert parse_shard("0/1") == Shard("0/1", 0, 1)
    for bad in ("3/3", "-1/2", "1", "a/b", "1/0"):
        with pytest.raises(InvalidArgumentError, match="shard"):
            parse_shard(bad)
    assert parse_shard("auto", {}) == Shard("auto")  # outside an array: joins all the same
    assert parse_shard("auto", {"SLURM_JOB_ID": "5"}) == Shard("5")
    # an array given as a list (--array=1,3,8): the task id is outside MIN..MIN+COUNT
    assert parse_shard("auto", {"SLURM_ARRAY_JOB_ID": "9", "SLURM_ARRAY_TASK_ID": "8",
                                "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "3"}
                       ) == Shard("9_8")


def test_finalize_commits_what_shards_left(slide, tmp_path, monkeypatch):  # noqa: F811
    """A shard killed after its last task but before the commit: finalize finishes it."""
    out = tmp_path / "o.zarr"
    from tilerseg.engine.workdir import WorkDir

    real = WorkDir.commit
    monkeypatch.setattr(WorkDir, "commit", lambda *a, **k: (_ for _ in ()).throw(
        KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        tilerseg.segment_to_zarr(slide["tif"], slide["model"], out, tile=64, output="both",
                                 shard=(0, 2))
    monkeypatch.setattr(WorkDir, "commit", real)
    state = tilerseg.status(out)
    assert state["done"] == state["tasks"] and not state["complete"] and not state["running"]
    assert tilerseg.finalize(out) is True
    assert tilerseg.finalize(out) is False  # already complete
    assert_same_arrays(out, slide["reference"])


def test_a_shard_without_a_tile_joins_the_recorded_one(slide, tmp_path,  # noqa: F811
                                                       monkeypatch):
    out = tmp_path / "o.zarr"
    import tilerseg.engine.tasks as tasks

    real = tasks.RunContext.write
    monkeypatch.setattr(tasks.RunContext, "write", lambda self, tile, probs: (
        _ for _ in ()).throw(KeyboardInterrupt) if tile.index == (6, 0) else real(self, tile, probs))
    with pytest.raises(KeyboardInterrupt):
        tilerseg.segment_to_zarr(slide["tif"], slide["model"], out, tile=64, output="both",
                                 shard=(0, 2))
    monkeypatch.setattr(tasks.RunContext, "write", real)
    assert 0 < tilerseg.status(out)["done"] < tilerseg.status(out)["tasks"]
    tilerseg.segment_to_zarr(slide["tif"], slide["model"], out, output="both", shard=(1, 2))
    assert_same_arrays(out, slide["reference"])


def test_a_failing_shard_leaves_the_shared_run_alone(tmp_path):
    """A shard refused for its input (NaN in one task) does not remove the run its
    siblings work on, even when it created it; what it recorded stays."""
    image = np.random.default_rng(1).random((256, 256), dtype=np.float32)
    image[255, 255] = np.nan  # in the last task only
    path = tmp_path / "img.npy"
    np.save(path, image)
    torch.manual_seed(0)
    model = tilerseg.create_model("unet", depth=2, base_channels=2)
    out = tmp_path / "o.zarr"
    with pytest.raises(InvalidImageError, match="NaN"):
        tilerseg.segment_to_zarr(path, model, out, tile=64, shard=(1, 2))
    assert work_path(out).is_dir()
    state = tilerseg.status(out)
    assert state["missing"][-1][1] == state["tasks"] - 1  # the task with the NaN
    assert not state["claims"]  # released on the way out: others may take them at once
    with pytest.raises(InvalidImageError, match="NaN"):  # a sibling meets the same NaN
        tilerseg.segment_to_zarr(path, model, out, tile=64, shard=(0, 2))
    assert work_path(out).is_dir()

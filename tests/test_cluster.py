"""dask.distributed: a real LocalCluster of worker processes on loopback, and dask-jobqueue."""

from __future__ import annotations

import io
import os
import pickle
import signal
import time

import numpy as np
import pytest
import tifffile
import torch
import zarr

import tilerseg
from tilerseg.engine.executors.cluster import ClusterSpec, JobSpec, connect, job_script
from tilerseg.engine.workdir import WorkDir, work_path
from tilerseg.errors import InvalidArgumentError
from tilerseg.synthetic import membrane_image

from .test_resume import assert_same_arrays, done_count, hold_last_task

pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client():
    """Two worker processes with one thread each, like the local default (2 x 1 thread)."""
    with connect(ClusterSpec("local", workers=2)) as c:
        yield c


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("cluster")
    image = membrane_image((600, 520), cell_size=24, seed=9)[0]
    tifffile.imwrite(d / "slide.tif", image, tile=(128, 128), photometric="minisblack")
    stack = membrane_image((3, 200, 180), cell_size=20, seed=4)[0]
    tifffile.imwrite(d / "stack.tif", stack, photometric="minisblack")  # ZYX: plane by plane
    rgb = np.stack([image, 255 - image, image // 2], axis=0)
    tifffile.imwrite(d / "channels.tif", rgb, photometric="minisblack",
                     metadata={"axes": "CYX"})
    torch.manual_seed(0)
    one = tilerseg.create_model("unet", depth=3, base_channels=4)
    two = tilerseg.create_model("unet", depth=3, base_channels=4, in_channels=2, num_classes=1)
    return {"dir": d, "one": one, "two": two}


CASES = {
    "2D, probabilities and labels": ("slide.tif", "one", dict(output="both")),
    "z-stack, 2D model": ("stack.tif", "one", dict(output="both", dtype="float32")),
    "channels 0 and 2, labels": ("channels.tif", "two", dict(output="labels", channel=(0, 2))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cluster_output_identical_to_local(client, data, tmp_path, case):
    name, model, options = CASES[case]
    image, model = data["dir"] / name, data[model]
    local = tilerseg.segment_to_zarr(image, model, tmp_path / "local.zarr", tile=64, **options)
    remote = tilerseg.segment_to_zarr(image, model, tmp_path / "remote.zarr", tile=64,
                                      executor=client, **options)
    assert_same_arrays(local, remote)
    attrs = zarr.open_group(remote, mode="r").attrs["tilerseg"]
    assert attrs["executor"] == "dask.distributed"
    # the tiles were computed in the workers (not here), each through its own pipeline,
    # whose stage times reached the output's profile
    pids = {f"{os.uname().nodename}:{pid}" for pid in client.run(os.getpid).values()}
    profile = attrs["profile"]
    assert {w["worker"] for w in profile["workers"]} <= pids
    assert sum(w["tasks"] for w in profile["workers"]) == attrs["manifest"]["tasks"]["count"]
    assert profile["compute"] > 0 and profile["read"] > 0 and profile["write"] > 0
    assert profile["compute_workers"] == len(profile["workers"])
    assert all(w["runtime"]["engine"] == attrs["runtime"]["engine"] for w in profile["workers"])


def test_tta_runs_on_the_cluster_workers(client, data, tmp_path):
    """The TTA mode travels with the run: the workers write the TTA output (equal to this
    process's), not the plain one."""
    path = data["dir"] / "slide.tif"
    out = tilerseg.segment_to_zarr(path, data["one"], tmp_path / "r.zarr", tile=64,
                                   dtype="float32", tta="flips", executor=client)
    got = zarr.open_group(out, mode="r")["0"][...]
    pixels = tifffile.imread(path)
    local = tilerseg.segment(pixels, data["one"], tile=64, device="cpu", tta="flips")
    plain = tilerseg.segment(pixels, data["one"], tile=64, device="cpu")
    assert np.abs(got - local).max() <= 1e-5 and np.abs(got - plain).max() > 1e-3


def test_a_run_is_sent_as_small_plain_data(data, tmp_path):
    """What crosses to a worker: a few hundred bytes, no model, no open file."""
    out = tmp_path / "o.zarr"
    with pytest.raises(KeyboardInterrupt):
        tilerseg.segment_to_zarr(data["dir"] / "slide.tif", data["one"], out, tile=64,
                                 progress=lambda done, total: (_ for _ in ()).throw(
                                     KeyboardInterrupt))
    work = WorkDir.open(work_path(out))
    ref = work.ref(str(data["dir"] / "slide.tif"), 0, (0,))

    class OnlyRunRef(pickle.Unpickler):  # the payload names no class but RunRef itself
        def find_class(self, module, name):
            assert (module, name) == ("tilerseg.engine.jobs", "RunRef"), (module, name)
            return super().find_class(module, name)

    payload = pickle.dumps(ref)
    assert len(payload) < 1024
    assert OnlyRunRef(io.BytesIO(payload)).load() == ref
    assert {type(v) for v in vars(ref).values()} <= {str, int, tuple}


def test_a_batch_spreads_over_the_cluster(client, data, tmp_path):
    results = tilerseg.segment_batch(
        [data["dir"] / "slide.tif", data["dir"] / "stack.tif"], data["one"], tmp_path / "out",
        tile=64, executor=client)
    assert [r.status for r in results] == ["done", "done"]
    pids = {f"{os.uname().nodename}:{pid}" for pid in client.run(os.getpid).values()}
    for r in results:
        single = tilerseg.segment_to_zarr(r.image, data["one"], tmp_path / "single.zarr",
                                          tile=64, overwrite=True)
        assert_same_arrays(r.output, single)
        # computed by the cluster's worker processes, not here
        attrs = zarr.open_group(r.output, mode="r").attrs["tilerseg"]
        assert attrs["executor"] == "dask.distributed"
        workers = attrs["profile"]["workers"]
        assert workers and {w["worker"] for w in workers} <= pids
        assert sum(w["tasks"] for w in workers) == attrs["manifest"]["tasks"]["count"]
        assert all(w["runtime"]["engine"] == attrs["runtime"]["engine"] for w in workers)


def test_in_memory_images_and_foreign_models_get_clear_errors(client, data, tmp_path):
    with pytest.raises(InvalidArgumentError, match="in-memory image cannot be sent"):
        tilerseg.segment_to_zarr(np.zeros((100, 100), np.uint8), data["one"],
                                 tmp_path / "a.zarr", tile=64, executor=client)

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    with pytest.raises(InvalidArgumentError, match="needs a model from tilerseg.create_model"):
        tilerseg.segment_to_zarr(data["dir"] / "slide.tif", Wrapped(data["one"]),
                                 tmp_path / "b.zarr", tile=64, executor=client)


def test_a_killed_worker_costs_only_its_tasks(client, data, tmp_path):
    """SIGKILL one worker process mid-run: Dask reruns its tasks, the output is the same."""
    image = membrane_image((1536, 1536), cell_size=24, seed=11)[0]
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, image, tile=(256, 256), photometric="minisblack")
    local = tilerseg.segment_to_zarr(path, data["one"], tmp_path / "local.zarr", tile=64)
    pids = list(client.run(os.getpid).values())
    out = tmp_path / "remote.zarr"
    killed = []

    def progress(done, total):
        if not killed and done_count(out) >= 20:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(time.time())

    tilerseg.segment_to_zarr(path, data["one"], out, tile=64, executor=client,
                             progress=progress)
    assert killed and pids[0] not in client.run(os.getpid).values()
    assert_same_arrays(local, out)


def _bare_workers(address: str, n: int) -> list:
    """``n`` worker processes of the scheduler at ``address`` with no nanny (a killed one
    stays dead), one thread each."""
    import subprocess
    import sys

    return [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address,
                              "--no-nanny", "--nthreads", "1", "--no-dashboard"],
                             stderr=subprocess.DEVNULL) for _ in range(n)]


def test_a_cluster_with_no_worker_left_stops_the_run(data, tmp_path):
    """Every worker of a running scheduler dies mid-run (SIGKILL, no nanny to restart them):
    the run stops with a ClusterError after the worker timeout instead of waiting forever;
    the unfinished run is kept and a local --resume completes it, equal to a local run."""
    from distributed import Client, LocalCluster

    from tilerseg.engine.executors.dask import DaskExecutor
    from tilerseg.errors import ClusterError

    image = membrane_image((1024, 1024), cell_size=24, seed=12)[0]
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, image, tile=(256, 256), photometric="minisblack")
    out = tmp_path / "o.zarr"
    with LocalCluster(n_workers=0, processes=True, host="127.0.0.1",
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        workers = _bare_workers(cluster.scheduler_address, 2)
        held, killed = [], []
        try:
            client.wait_for_workers(2, timeout=60)

            def progress(done, total):
                # the first report comes before the workers' loops are sent: this process
                # then holds the last task, so the run cannot finish before the kill
                if not held:
                    held.append(hold_last_task(out))
                elif not killed and done_count(out) >= 2:
                    for w in workers:
                        w.kill()
                        w.wait()  # reaped: a zombie would still look alive to the claims
                    killed.append(time.monotonic())

            with pytest.raises(ClusterError, match="no Dask worker has been alive for 3 s"):
                tilerseg.segment_to_zarr(path, data["one"], out, tile=64, progress=progress,
                                         executor=DaskExecutor(client, worker_timeout=3))
            assert killed and time.monotonic() - killed[0] < 60
        finally:
            for w in workers:
                w.kill()
                w.wait()
            for claim in held:
                claim.release()
    assert work_path(out).is_dir() and 0 < done_count(out) < 64
    tilerseg.segment_to_zarr(path, data["one"], out, tile=64, resume=True)
    assert_same_arrays(out, tilerseg.segment_to_zarr(path, data["one"], tmp_path / "l.zarr",
                                                     tile=64))


def test_an_instance_pass_with_no_worker_left_stops():
    """The instance pass maps its chunks over the cluster (DaskExecutor.map): when every
    worker dies meanwhile it stops with a ClusterError after the worker timeout instead of
    waiting forever for them to come back."""
    import threading

    from distributed import Client, LocalCluster

    from tilerseg.engine.executors.dask import DaskExecutor
    from tilerseg.errors import ClusterError

    with LocalCluster(n_workers=0, processes=True, host="127.0.0.1",
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        workers = _bare_workers(cluster.scheduler_address, 2)
        try:
            client.wait_for_workers(2, timeout=60)
            assert DaskExecutor(client).map(pow, [(2, 3), (3, 2)]) == [8, 9]
            killer = threading.Timer(1.0, lambda: [w.kill() for w in workers])
            killer.start()
            start = time.monotonic()
            with pytest.raises(ClusterError, match="no Dask worker has been alive for 2 s"):
                DaskExecutor(client, worker_timeout=2).map(time.sleep, [(600,), (600,)])
            assert time.monotonic() - start < 60
            killer.join()
        finally:
            for w in workers:
                w.kill()
                w.wait()


def _do_nothing(*args, **kwargs):
    """Stands in for a worker's loop that is stuck: it never claims a task."""
    time.sleep(3600)


def _stick(module_name: str) -> None:
    import importlib

    setattr(importlib.import_module(module_name), "run_claims", _do_nothing)


def test_live_workers_that_compute_nothing_stop_the_run(data, tmp_path):
    """Workers alive but stuck (their loops never claim a task, as deadlocked workers):
    the run stops after the worker timeout with one line naming it, never a hang."""
    from distributed import Client, LocalCluster

    from tilerseg.engine.executors.dask import DaskExecutor
    from tilerseg.errors import ClusterError

    out = tmp_path / "o.zarr"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        client.run(_stick, "tilerseg.engine.worker")  # the loop the client sends, stuck
        start = time.monotonic()
        with pytest.raises(ClusterError, match="neither recorded nor claimed a task for 3 s"):
            tilerseg.segment_to_zarr(data["dir"] / "slide.tif", data["one"], out, tile=64,
                                     executor=DaskExecutor(client, worker_timeout=3))
        assert time.monotonic() - start < 60
    assert work_path(out).is_dir()


def test_jobqueue_script_carries_the_resources():
    pytest.importorskip("dask_jobqueue")
    spec = ClusterSpec("slurm", workers=4, job=JobSpec(
        jobs=4, cores=8, memory="32GB", walltime="04:00:00", gpus=1, queue="gpu",
        account="lab42"))
    script = job_script(spec)
    assert "#SBATCH --cpus-per-task=8" in script
    assert "#SBATCH --mem=30G" in script  # dask-jobqueue's GiB rounding of 32 GB
    assert "#SBATCH -t 04:00:00" in script
    assert "#SBATCH --gres=gpu:1" in script
    assert "#SBATCH -p gpu" in script and "#SBATCH -A lab42" in script
    assert "--nthreads 1" in script  # one claiming pipeline, with all the job's cores
    pbs = job_script(ClusterSpec("pbs", job=JobSpec(cores=4, memory="8GB", gpus=2)))
    assert "#PBS -l select=1:ncpus=4:mem=8GB:ngpus=2" in pbs
    lsf = job_script(ClusterSpec("lsf", job=JobSpec(cores=4, memory="8GB", gpus=1)))
    assert "#BSUB -n 4" in lsf and '#BSUB -gpu "num=1"' in lsf
    with pytest.raises(InvalidArgumentError, match="--cluster slurm"):
        job_script(ClusterSpec("slurm", job=JobSpec()))  # no cores or memory anywhere


def test_cli_cluster_flags(tmp_path, capsys):
    from tilerseg.cli import main

    assert main(["run", "x.tif", "--cluster", "slurm", "--cores", "4", "--memory", "8GB",
                 "--walltime", "01:00:00", "--gpus-per-job", "1", "--job-script"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --gres=gpu:1" in script and "#SBATCH -t 01:00:00" in script
    for args, message in [
        (["--cluster", "local:0"], "local:N with N >= 1"),
        (["--cluster", "kubernetes"], "not understood"),
        (["--scheduler", "localhost"], "tcp://HOST:PORT"),
        (["--cluster", "local:2", "--shard", "0/2"], "not both"),
        (["--job-script"], "--job-script needs"),
    ]:
        assert main(["run", "x.tif", *args]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.openvino
def test_int8_on_cluster_workers_equals_local(client, data, tmp_path):
    """Each worker draws the same calibration from the image, so finds the network the
    local run quantised (the cache folder is inherited) and computes the same int8 output."""
    model = tilerseg.load_model()
    image = data["dir"] / "slide.tif"
    local = tilerseg.segment_to_zarr(image, model, tmp_path / "local.zarr", tile=128,
                                     precision="int8")
    remote = tilerseg.segment_to_zarr(image, model, tmp_path / "remote.zarr", tile=128,
                                      precision="int8", executor=client)
    assert_same_arrays(local, remote)
    attrs = zarr.open_group(remote, mode="r").attrs["tilerseg"]
    assert attrs["executor"] == "dask.distributed"
    assert (attrs["runtime"]["engine"], attrs["runtime"]["precision"]) == ("openvino", "int8")
    assert all(w["runtime"]["precision"] == "int8" for w in attrs["profile"]["workers"])
    local_sha = zarr.open_group(local, mode="r").attrs["tilerseg"]["runtime"]["int8"]
    assert attrs["runtime"]["int8"]["calibration"] == local_sha["calibration"]

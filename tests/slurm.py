"""A real one-node SLURM for the tests: munge, slurmctld and slurmd started here, no systemd.

The daemons run from a folder of their own with a configuration naming this host
(``hostname -s``) with its cores and memory; the client commands (``sbatch``, ``squeue``,
``scancel``, ``scontrol``) find it through ``SLURM_CONF``, which the tests set in their own
environment (and so in every job and every dask-jobqueue worker they submit). It needs the
Debian packages ``slurm-wlm`` and ``munge`` and root (slurmd runs jobs as their users).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["Slurm", "missing"]

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol", "sinfo")


def missing() -> str | None:
    """Why a SLURM cannot be started here (None: it can)."""
    absent = [b for b in BINARIES if shutil.which(b) is None and
              not os.path.exists(f"/usr/sbin/{b}")]
    if absent:
        return f"SLURM is not installed ({', '.join(absent)} missing: apt-get install " \
               "slurm-wlm munge)"
    if os.geteuid() != 0:
        return "starting SLURM needs root"
    return None


def _which(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _memory_mib() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        total_kib = int(f.readline().split()[1])
    return total_kib // 1024 - 1024  # leave some for the system


class Slurm:
    """A one-node SLURM cluster (see the module notes).

    Parameters
    ----------
    root : Path
        Where its configuration, state, spool and logs go.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._daemons: list[subprocess.Popen] = []

    # -- start and stop ---------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> Slurm:
        self._munge()
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        root = self.root
        self.conf.write_text("\n".join([
            "ClusterName=tilerseg-test",
            f"SlurmctldHost={self.host}",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool",
            f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd.pid",
            f"SlurmctldLogFile={root}/slurmctld.log", f"SlurmdLogFile={root}/slurmd.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory",
            "ReturnToService=2", "SchedulerType=sched/backfill", "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "KillWait=5", "MinJobAge=600", "InactiveLimit=0", "OverTimeLimit=0",
            "DefMemPerCPU=1024",
            f"NodeName={self.host} CPUs={self.cpus} RealMemory={_memory_mib()} State=UNKNOWN",
            f"PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
            ""]))
        for daemon in ("slurmctld", "slurmd"):
            log = open(self.root / f"{daemon}.out", "ab")  # noqa: SIM115 - kept open by it
            self._daemons.append(subprocess.Popen(
                [_which(daemon), "-D", "-f", str(self.conf)], stdout=log,
                stderr=subprocess.STDOUT, env=self.env, start_new_session=True))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-n", self.host, "-o", "%T", check=False).strip()
            if state.startswith("idle"):
                return self
            for d in self._daemons:
                if d.poll() is not None:
                    raise RuntimeError(f"a SLURM daemon ended at start-up: {self.logs()}")
            time.sleep(0.5)
        raise RuntimeError(f"the SLURM node is not idle after {timeout:.0f} s: {self.logs()}")

    def _munge(self) -> None:
        """Start munged (as the munge user) unless one answers already."""
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return
        user = pwd.getpwnam("munge")
        for folder in ("/run/munge", "/var/lib/munge", "/var/log/munge", "/etc/munge"):
            os.makedirs(folder, exist_ok=True)
            os.chown(folder, user.pw_uid, user.pw_gid)
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chown(key, user.pw_uid, user.pw_gid)
        os.chmod(key, 0o400)
        subprocess.run(["runuser", "-u", "munge", "--", _which("munged")], check=True)
        deadline = time.monotonic() + 10
        while subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("munged does not answer")
            time.sleep(0.1)

    def stop(self) -> None:
        """Cancel every job, then stop the daemons."""
        self.run("scancel", "--full", "-u", "root", check=False)
        for d in reversed(self._daemons):
            d.terminate()
        for d in self._daemons:
            try:
                d.wait(timeout=20)
            except subprocess.TimeoutExpired:
                d.kill()
                d.wait()

    def logs(self) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out"):
            path = self.root / name
            if path.exists():
                out.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace")
                                                       .splitlines()[-20:]))
        return "\n".join(out)

    # -- commands ---------------------------------------------------------------------

    def run(self, *command: str, check: bool = True, timeout: float = 60) -> str:
        """A SLURM command's standard output."""
        done = subprocess.run([_which(command[0]), *command[1:]], capture_output=True,
                              text=True, env=self.env, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()}")
        return done.stdout

    def sbatch(self, script: str, *options: str, cwd: Path) -> str:
        """Submit ``script`` (text); the job id (``--parsable``)."""
        path = Path(cwd) / f"job-{time.monotonic_ns()}.sh"
        path.write_text(script)
        return self.run("sbatch", "--parsable", f"--chdir={cwd}", *options,
                        str(path)).strip().split(";")[0]

    def jobs(self, *job_ids: str) -> dict[str, dict[str, str]]:
        """``{job id: scontrol's fields}`` (array tasks as ``JOBID_TASK``), finished jobs too
        (for ``MinJobAge``)."""
        out = {}
        for job in job_ids:
            text = self.run("scontrol", "-o", "show", "job", job, check=False)
            for line in text.splitlines():
                fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
                if "ArrayTaskId" in fields and "ArrayJobId" in fields:
                    out[f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}"] = fields
                elif "JobId" in fields:
                    out[fields["JobId"]] = fields
        return out

    def wait(self, *job_ids: str, timeout: float = 300) -> dict[str, dict[str, str]]:
        """Wait until the jobs (and all their array tasks) have ended; their fields."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.jobs(*job_ids)
            if jobs and all(j.get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING",
                                                        "COMPLETING", "REQUEUED")
                            for j in jobs.values()):
                return jobs
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs {job_ids} did not end: "
                                   f"{ {k: v.get('JobState') for k, v in jobs.items()} }")
            time.sleep(0.5)

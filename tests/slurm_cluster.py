"""The real Slurm clusters that .ci/start-slurm.sh starts, for tests of `submit.sh --backend slurm`.

- one node: the cluster "ci", the default configuration (/etc/slurm/slurm.conf);
- two nodes: the cluster "ci2", nodes n1 and n2 on this one machine, used through
  ``SLURM_CONF=/etc/slurm-two-node/slurm.conf`` (``SLURM_TWO_NODE_CONF`` names another file).

The fixtures ``slurm`` and ``two_node_slurm`` (conftest.py) give a ``SlurmCluster``; a test runs
submit.sh on it with ``cluster.launch(env, JOB_ID, GPUS, NODES)`` and gets a ``SlurmLaunch``:
the instance, the Slurm job id, the daemons' state files, the client, ``shutdown()``. The daemons
run in a PID namespace each (``namespace_python``), as every daemon of the tests does; jobs a test
launched are cancelled when it ends, whatever happened.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SUBMIT = REPO / "submit.sh"
CLIENT = REPO / "client.sh"
TWO_NODE_CONF = Path(os.environ.get("SLURM_TWO_NODE_CONF", "/etc/slurm-two-node/slurm.conf"))
UP_STATES = {"idle", "mix", "alloc", "comp"}
ACTIVE_JOB_STATES = {"PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED"}


def namespace_python(folder: Path) -> Path:
    """A stand-in for PYTHON that runs the daemon as PID 1 of a new PID namespace (it can only
    see and signal its own processes); its exit status is the daemon's."""
    wrapper = folder / "python-in-namespace"
    wrapper.write_text(f"#!/bin/sh\nexec unshare --pid --fork --mount-proc --kill-child "
                       f"{sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    return wrapper


def read_fields(path: Path) -> dict[str, str]:
    fields = {}
    for line in path.read_text().split("\n"):
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value
    return fields


def _words(text: str) -> dict[str, str]:
    return dict(word.split("=", 1) for word in text.split() if "=" in word)


@dataclasses.dataclass
class SlurmCluster:
    """One of the CI clusters: ``conf`` is its slurm.conf (None: Slurm's default), ``nodes`` how
    many nodes it has."""

    name: str
    conf: Path | None
    nodes: int
    launched: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def one_node(cls) -> SlurmCluster:
        return cls("one-node", None, 1)

    @classmethod
    def two_node(cls) -> SlurmCluster:
        return cls("two-node", TWO_NODE_CONF, 2)

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) pointed at this cluster."""
        env = {k: v for k, v in (os.environ if base is None else base).items()
               if k != "SLURM_CONF"}
        if self.conf is not None:
            env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, *argv: str, timeout: float = 20) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), env=self.env(), capture_output=True, text=True,
                              timeout=timeout)

    def problem(self) -> str | None:
        """Why this cluster cannot run a job here, or None when it can."""
        for program in ("sbatch", "sinfo", "scontrol", "srun", "scancel", "unshare"):
            if shutil.which(program) is None:
                return f"{program} is not installed"
        if self.conf is not None and not self.conf.is_file():
            return f"{self.conf} does not exist"
        try:
            probe = self.run("sinfo", "-h", "-N", "-o", "%N %t", timeout=10)
        except subprocess.TimeoutExpired:
            return "sinfo timed out"
        if probe.returncode != 0:
            return f"sinfo failed: {probe.stderr.strip()}"
        up = {line.split()[0] for line in probe.stdout.splitlines()
              if len(line.split()) == 2 and line.split()[1] in UP_STATES}
        if len(up) < self.nodes:
            return f"{len(up)} of {self.nodes} node(s) up (sinfo: {probe.stdout.split()})"
        return None

    def require(self) -> None:
        """Skip the test when the cluster is not usable; fail it instead with REQUIRE_SLURM=1."""
        problem = self.problem()
        if problem is None:
            return
        start = f"bash .ci/start-slurm.sh {'both' if self.conf else 'one-node'}"
        if os.environ.get("REQUIRE_SLURM") == "1":
            pytest.fail(f"REQUIRE_SLURM=1 but the {self.name} Slurm is not usable: {problem} "
                        f"(run: {start})")
        pytest.skip(f"the {self.name} Slurm is not usable: {problem} (run: {start}; "
                    "REQUIRE_SLURM=1 makes this a failure)")

    def job(self, job: str) -> dict[str, str]:
        show = self.run("scontrol", "show", "job", "-o", job)
        assert show.returncode == 0, show.stderr
        return _words(show.stdout)

    def node(self, name: str) -> dict[str, str]:
        show = self.run("scontrol", "show", "node", "-o", name)
        assert show.returncode == 0, show.stderr
        return _words(show.stdout)

    def wait_ended(self, job: str, timeout: float = 60) -> str:
        """The job's final state, once it has one."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.job(job)["JobState"]
            if state not in ACTIVE_JOB_STATES:
                return state
            assert time.monotonic() < deadline, f"Slurm job {job} still {state}"
            time.sleep(0.5)

    def launch(self, env: dict[str, str], job_id: str, gpus: str = "0", nodes: str = "1",
               *flags: str) -> SlurmLaunch:
        """Run ``submit.sh --backend slurm FLAGS JOB_ID GPUS NODES`` on this cluster with ``env``
        (which names QUEUE_ROOT); the launch, once sbatch accepted it."""
        env = self.env(env)
        run = subprocess.run([str(SUBMIT), "--backend", "slurm", *flags, job_id, gpus, nodes],
                             env=env, capture_output=True, text=True, timeout=60,
                             stdin=subprocess.DEVNULL)
        found = re.search(r"^Submitted Slurm job ([0-9]+) ", run.stdout, re.M)
        if found:
            self.launched.append(found.group(1))
        assert run.returncode == 0 and found, (run.stdout, run.stderr)
        instance = Path(env["QUEUE_ROOT"]) / job_id
        return SlurmLaunch(self, instance, found.group(1), env, run)

    def cancel_all(self) -> None:
        for job in self.launched:
            subprocess.run(["scancel", job], env=self.env(), capture_output=True, timeout=20)


@dataclasses.dataclass
class SlurmLaunch:
    """A daemon job that submit.sh launched on a cluster."""

    cluster: SlurmCluster
    instance: Path
    slurm_id: str
    env: dict[str, str]
    submit: subprocess.CompletedProcess

    def state(self, rank: int) -> dict[str, str]:
        """Node ``rank``'s state file, or {} while there is none."""
        try:
            return read_fields(self.instance / "nodes" / f"node-{rank}.state")
        except FileNotFoundError:
            return {}

    def wait_daemons(self, timeout: float = 90) -> list[dict[str, str]]:
        """The state of every node's daemon once all of them run (fresh heartbeats)."""
        def running() -> list[dict[str, str]] | None:
            states = [self.state(rank) for rank in range(int(self.submit_nodes))]
            fresh = all(s.get("status") == "running"
                        and abs(float(s.get("heartbeat") or 0) - time.time()) < 60
                        for s in states)
            return states if fresh else None

        deadline = time.monotonic() + timeout
        while (states := running()) is None:
            job = self.cluster.job(self.slurm_id)
            assert job["JobState"] in ACTIVE_JOB_STATES, (job["JobState"], self.daemon_log())
            assert time.monotonic() < deadline, (f"the daemons of Slurm job {self.slurm_id} "
                                                 f"are not all up:\n{self.daemon_log()}")
            time.sleep(0.2)
        return states

    @property
    def submit_nodes(self) -> str:
        return read_fields(self.instance / "job_id.txt")["nodes"]

    def daemon_log(self) -> str:
        path = self.instance / "daemon.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def client(self, *words: str, check: bool = True) -> subprocess.CompletedProcess:
        """A client.sh command (``gpu_submit FILE``, ``gpu_status``) for this instance."""
        env = dict(self.env, QUEUE_ROOT=str(self.instance.parent), JOB_ID=self.instance.name)
        run = subprocess.run(["bash", "-c", 'source "$0" && "$@"', str(CLIENT), *words],
                             env=env, cwd=self.instance.parent, capture_output=True, text=True,
                             timeout=60)
        assert run.returncode == 0 or not check, (words, run.stdout, run.stderr)
        return run

    def shutdown(self, timeout: float = 60) -> str:
        """gpu_shutdown, then the job's final Slurm state once it has ended."""
        self.client("gpu_shutdown")
        return self.cluster.wait_ended(self.slurm_id, timeout)

"""Shared test helpers: the real daemon, always inside its own PID namespace.

A daemon may kill Python processes (``gpu_stop``), so every test daemon runs under
``unshare --pid --fork --mount-proc``: it can only see and signal processes of its own test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from slurm_cluster import SlurmCluster

REPO = Path(__file__).resolve().parent.parent
DAEMON = REPO / "perpetual_motion.py"
sys.path.insert(0, str(REPO))

UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]


def namespaces_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run([*UNSHARE, "true"], capture_output=True)
    return probe.returncode == 0


def nvml_works_here() -> bool:
    """True on a machine with an NVIDIA driver that NVML can talk to."""
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:  # noqa: BLE001 - any failure means no usable GPU
        return False


needs_namespace = pytest.mark.skipif(not namespaces_available(),
                                     reason="needs unshare --pid (root)")


@contextmanager
def namespace_shell(script: str, log: Path) -> Iterator[subprocess.Popen]:
    """Run a bash script as PID 1 of a new PID namespace (output to ``log``); killed at exit."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([*UNSHARE, "bash", "-c", script], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()  # --kill-child takes the namespace down with it
            proc.wait()


class FakeClock:
    """Simulated time for a daemon run in the test's process, starting at the real time
    (commands carry real send times)."""

    def __init__(self, start: float | None = None):
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def run_until(daemon, clock: FakeClock, predicate, limit: float = 30.0) -> None:
    """Tick a daemon in simulated time until ``predicate()``; real task processes get real
    time to end between ticks."""
    deadline = clock.now + limit
    while not predicate():
        assert clock.now < deadline, "condition not reached in simulated time"
        daemon.tick()
        clock.sleep(0.1)
        time.sleep(0.01)


def command_line(process: psutil.Process) -> list[str]:
    """``process``'s arguments; none for a process that has ended, zombie or gone.

    A short-lived child (a ``touch``, a ``setsid``) can end between listing the children and
    reading its arguments: it is then no match for anything, never an error.
    """
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def process_state(process: psutil.Process) -> str:
    """``process``'s status (``psutil.STATUS_ZOMBIE`` for one not reaped yet); "gone" once
    it has been reaped, even between listing it and asking."""
    try:
        return process.status()
    except psutil.NoSuchProcess:
        return "gone"


def process_name(process: psutil.Process) -> str:
    """``process``'s name, a zombie's too; "" once it has been reaped."""
    try:
        return process.name()
    except psutil.NoSuchProcess:
        return ""


def is_live(process: psutil.Process) -> bool:
    """Whether ``process`` still runs: neither reaped nor a zombie."""
    return process_state(process) not in ("gone", psutil.STATUS_ZOMBIE)


def read_fields(path: Path) -> dict[str, str]:
    fields = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value
    return fields


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class DaemonHandle:
    """A daemon started by ``start_daemon``; ``proc`` is the ``unshare`` process around it."""

    def __init__(self, proc: subprocess.Popen, queue_root: Path, job_id: str, node_rank: int,
                 log_path: Path, started: float):
        self.proc = proc
        self.queue_root = queue_root
        self.job_id = job_id
        self.node_rank = node_rank
        self.log_path = log_path
        self.started = started

    @property
    def instance(self) -> Path:
        return self.queue_root / self.job_id

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def state(self) -> dict[str, str]:
        path = self.instance / "nodes" / f"node-{self.node_rank}.state"
        try:
            return read_fields(path)
        except FileNotFoundError:
            return {}

    def alive(self) -> bool:
        state = self.state()
        # A state file from before this launch is an earlier daemon's, maybe killed a moment
        # ago: it must not pass for this one's.
        return (state.get("status") == "running" and "[INFO] Queue: " in self.output()
                and float(state.get("started") or 0) >= self.started)

    def wait_alive(self, timeout: float = 15.0) -> DaemonHandle:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited early ({self.proc.returncode}):\n"
                                     f"{self.output()}")
            return self.alive()
        wait_for(ready, timeout, what=f"daemon {self.job_id} to start")
        return self

    def daemon_process(self) -> psutil.Process | None:
        """The daemon's Python process, seen from outside its namespace."""
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                args = command_line(child)
                if any(arg.endswith("perpetual_motion.py") for arg in args) \
                        and "--fence-keeper" not in args:
                    return child
        except psutil.NoSuchProcess:
            pass
        return None

    def signal(self, sig: int) -> None:
        process = self.daemon_process()
        assert process is not None, "the daemon process is gone"
        process.send_signal(sig)

    def wait_exit(self, timeout: float = 20.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"daemon did not exit within {timeout} s:\n"
                                 f"{self.output()}") from exc

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM to the daemon (a graceful shutdown); its exit code."""
        if self.proc.poll() is None:
            process = self.daemon_process()
            if process is not None:
                process.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # --kill-child takes the namespace down with it
            self.proc.wait(10)


@pytest.fixture(autouse=True)
def no_task_left_behind(tmp_path: Path) -> Iterator[None]:
    """Tasks of daemons that a test runs in its own process (in simulated time) are ended when
    the test ends, passed or failed: every process whose QUEUE_DIR lies under its tmp_path."""
    yield
    mine = str(tmp_path).encode()
    for proc in psutil.process_iter():
        try:
            with open(f"/proc/{proc.pid}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        for item in environ.split(b"\0"):
            if item.startswith(b"QUEUE_DIR=") and item[len(b"QUEUE_DIR="):].startswith(mine):
                with contextlib.suppress(psutil.Error):
                    proc.kill()
                break


@pytest.fixture
def queue_root(tmp_path: Path) -> Path:
    root = tmp_path / "queue root"  # a space, on purpose
    root.mkdir()
    return root


@pytest.fixture
def start_daemon(tmp_path: Path):
    """Start real daemons in PID namespaces; all are stopped when the test ends.

    ``start_daemon(queue_root, job_id, *extra_args, env=None, node_rank=0)``; the daemon gets a
    short poll interval, keep-alive off (unless ``keepalive=True``) and a short stop grace unless
    ``extra_args`` say otherwise.
    """
    handles: list[DaemonHandle] = []

    def start(queue_root: Path, job_id: str, *extra: str, env: dict[str, str] | None = None,
              node_rank: int = 0, wait: bool = True, keepalive: bool = False) -> DaemonHandle:
        log_path = tmp_path / f"daemon-{job_id}-{node_rank}-{len(handles)}.log"
        args = [sys.executable, str(DAEMON), "--job-id", job_id, "--queue-root", str(queue_root),
                "--poll-interval", "0.1", "--stop-grace", "2", *extra]
        if not keepalive:
            args.append("--no-keepalive")
        if "--node-rank" not in extra and node_rank:
            args += ["--node-rank", str(node_rank)]
        full_env = dict(os.environ, PYTHONUNBUFFERED="1")
        full_env.update(env or {})
        launched = time.time()  # this daemon's state file says it started later than this
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([*UNSHARE, *args], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=full_env, cwd=tmp_path)
        handle = DaemonHandle(proc, queue_root, job_id, node_rank, log_path, launched)
        handles.append(handle)
        if wait:
            handle.wait_alive()
        return handle

    yield start
    for handle in handles:
        if handle.proc.poll() is None:
            try:
                handle.stop(timeout=15)
            except AssertionError:
                handle.kill()


@pytest.fixture
def slurm():
    """The one-node CI Slurm (a ``SlurmCluster``, tests/slurm_cluster.py). Skipped when it is not
    usable, a failure with REQUIRE_SLURM=1; the jobs a test launched are cancelled after it."""
    cluster = SlurmCluster.one_node()
    cluster.require()
    yield cluster
    cluster.cancel_all()


@pytest.fixture
def two_node_slurm():
    """The two-node CI Slurm (nodes n1 and n2 on this machine, ``bash .ci/start-slurm.sh
    both``): run submit.sh there with ``two_node_slurm.launch(env, JOB_ID, GPUS, "2")``.
    Skipped when it is not usable, a failure with REQUIRE_SLURM=1; the jobs a test launched
    are cancelled after it."""
    cluster = SlurmCluster.two_node()
    cluster.require()
    yield cluster
    cluster.cancel_all()

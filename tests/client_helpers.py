"""Helpers of the client's tests: real bash and zsh processes that source client.sh, queue
folders built by hand exactly as docs/protocol.md says a daemon leaves them, and clean-up that
leaves no process behind even when a test fails (or runs under ``nohup``, SIGINT ignored)."""

from __future__ import annotations

import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from conftest import REPO, UNSHARE, wait_for

CLIENT = REPO / "client.sh"
SHELL_ARGV = {"bash": ["bash", "--norc", "--noprofile", "-c"], "zsh": ["zsh", "-f", "-c"]}
SHELLS = [pytest.param(name, marks=pytest.mark.skipif(shutil.which(name) is None,
                                                      reason=f"{name} is not installed"))
          for name in SHELL_ARGV]
INSTALLED = [name for name in SHELL_ARGV if shutil.which(name)]
ID_RE = re.compile(r"^([0-9]{3})-([0-9]{8}_[0-9]{6}_[0-9]{9})-([0-9a-f]{8})"
                   r"-([A-Za-z0-9._-]{1,80})$")
EPOCH = 1_800_000_000.0  # fixed times for records built by hand
STRICT = {  # the caller's strictest options, as a careful user's script sets them
    "bash": "set -euo pipefail\n",
    "zsh": "setopt nounset errexit pipefail\n",
}


@dataclass
class Result:
    rc: int
    out: str
    err: str


def shell_env(root: Path, job_id: str | None, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("JOB_ID", "QUEUE_ROOT", "GPU_REPLY_TIMEOUT", "SUBMIT_CONF")}
    env.update(CLIENT=str(CLIENT), QUEUE_ROOT=str(root), HOME=str(home), TZ="UTC")
    if job_id is not None:
        env["JOB_ID"] = job_id
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def default_sigint() -> None:
    """In a child: SIGINT and SIGHUP as a terminal's shell has them, whatever pytest inherited
    (``nohup pytest &`` starts it with both ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


class Shell:
    """Runs scripts in a fresh ``bash``/``zsh`` that has sourced client.sh."""

    def __init__(self, name: str, root: Path, home: Path, cwd: Path, client: Path = CLIENT):
        self.name, self.root, self.home, self.cwd, self.client = name, root, home, cwd, client

    def argv(self, script: str, source: bool = True) -> list[str]:
        return [*SHELL_ARGV[self.name], ('source "$CLIENT"\n' if source else "") + script]

    def env(self, job_id: str | None = "exp1", **extra: str) -> dict[str, str]:
        return shell_env(self.root, job_id, self.home, CLIENT=str(self.client), **extra)

    def run(self, script: str, job_id: str | None = "exp1", cwd: Path | None = None,
            source: bool = True, timeout: float = 60, **extra: str) -> Result:
        """Run to its end; on a timeout, everything it started is ended too (the commands run
        in subshells and background jobs that outlive a killed shell)."""
        proc = subprocess.Popen(self.argv(script, source), env=self.env(job_id, **extra),
                                cwd=cwd or self.cwd, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            end_session(proc)
            proc.communicate()
            raise
        return Result(proc.returncode, out, err)

    def popen(self, script: str, job_id: str | None = "exp1", **kwargs) -> subprocess.Popen:
        """A shell in its own session (``end_session`` ends it and all it started)."""
        kwargs.setdefault("preexec_fn", default_sigint)
        return subprocess.Popen(self.argv(script), env=self.env(job_id), cwd=self.cwd,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, **kwargs)


def session_members(sid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getsid(proc.pid) == sid:
                found.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return found


def end_session(proc: subprocess.Popen | None, sid: int | None = None) -> list[str]:
    """SIGKILL to every process of the session ``proc`` leads; what was still there."""
    sid = sid if sid is not None else proc.pid
    left = []
    for member in session_members(sid):
        try:
            left.append(" ".join(member.cmdline()) or member.name())
            member.kill()
        except psutil.Error:
            pass
    if proc is not None:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
    return left


def submitted_id(result: Result) -> str:
    assert result.rc == 0, result.err
    match = re.fullmatch(r"Submitted (\S+)\n", result.out)
    assert match, result.out
    assert ID_RE.match(match.group(1)), match.group(1)
    return match.group(1)


def tree(path: Path) -> dict[str, bytes | None]:
    """Every file (with its content) and folder under path: to show that nothing was written."""
    found: dict[str, bytes | None] = {}
    for p in sorted(path.rglob("*")):
        found[str(p.relative_to(path))] = p.read_bytes() if p.is_file() else None
    return found


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def write_fields(path: Path, fields: dict[str, object], mtime: float | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k}={v}\n" for k, v in fields.items()))
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def tid(n: int, name: str, priority: str = "500", rand: str | None = None) -> str:
    return f"{priority}-20270115_0800{n % 60:02d}_{n:09d}-{rand or f'{n:08x}'}-{name}"


def local_minute(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch))  # tests run with TZ=UTC


def make_instance(root: Path, job_id: str = "exp1") -> Path:
    inst = root / job_id
    for folder in ("pending", "running", "done", "failed", "records", "logs", "commands",
                   "replies", "nodes", ".staging"):
        (inst / folder).mkdir(parents=True, exist_ok=True)
    (inst / "control.json").write_text(f'{{"protocol": 1, "job_id": "{job_id}"}}\n')
    return inst


def own_identity() -> dict[str, str]:
    """host, boot_id and pid_ns as a daemon on this host and in this PID namespace writes them."""
    return {"host": socket.gethostname(),
            "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
            "pid_ns": os.readlink("/proc/self/ns/pid")}


# A queue folder built by hand #####################################################################


@dataclass
class Sample:
    inst: Path
    now: float
    running: str
    pending: list[str]
    done: list[str]
    failed: list[str]


def start_of_a_second() -> float:
    """The time, taken early in a second: the client reads whole seconds (``date +%s``), so the
    ages and times it prints for a sample built now stay exact for most of a second."""
    now = time.time()
    if now % 1 > 0.2:
        time.sleep(1.0 - now % 1)
        now = time.time()
    return now


def build_sample(root: Path, job_id: str = "exp1", alive: bool = True) -> Sample:
    """An instance as a daemon of protocol 1 leaves it: a node state, one running, three pending
    (one put there by hand), four ended and one cancelled."""
    now = start_of_a_second()
    inst = make_instance(root, job_id)
    write_fields(inst / "nodes" / "node-0.state", {
        "protocol": 1, "job_id": job_id, "node_rank": 0, "num_nodes": 1, "host": "node-a",
        "pid": 4242, "status": "running", "started": f"{now - 3600:.3f}",
        # 23h00m left, for half a minute
        "shutdown": f"{now + 23 * 3600 + 30:.3f}",
        "heartbeat": f"{now - (2 if alive else 600):.3f}",
        "poll_interval": 1, "keepalive": "on", "gpu_count": 2,
        "gpu.0.name": "NVIDIA H200", "gpu.0.util": 75, "gpu.0.mem_used_mib": 80000,
        "gpu.0.mem_total_mib": 143771, "gpu.0.state": "holding", "gpu.0.reason": "",
        "gpu.0.tile": 4096, "gpu.0.duty": "0.85",
        "gpu.1.name": "NVIDIA H200", "gpu.1.util": 3, "gpu.1.mem_used_mib": 1000,
        "gpu.1.mem_total_mib": 143771, "gpu.1.state": "yielded", "gpu.1.reason": "queue task",
        "gpu.1.tile": "", "gpu.1.duty": "",
    })
    running = tid(1, "train.sh")
    (inst / "running" / running).write_text("sleep 1000\n")
    write_fields(inst / "records" / f"{running}.run",
                 {"id": running, "host": "node-a", "node_rank": 0,
                  "started": f"{now - 7205:.3f}"})
    (inst / "logs" / f"{running}.log").write_text("[perpetual-motion] task: x\nepoch 1\n")
    pending = [tid(2, "eval.sh", "001"), tid(3, "train.sh"), "zz_manual.sh"]
    for name in pending:
        (inst / "pending" / name).write_text("echo next\n")
    ended = now - 3 * 86400 - 100
    done = [tid(4, "prep.py"), tid(5, "train.sh")]
    failed = [tid(6, "train.sh"), tid(7, "bad.sh")]
    results = [  # oldest first
        (done[0], {"state": "done", "exit_code": 0, "signal": "", "duration": "12.400"}),
        (failed[1], {"state": "failed", "exit_code": 3, "signal": "", "duration": "0.250"}),
        (done[1], {"state": "done", "exit_code": 0, "signal": "", "duration": "3725.000"}),
        (failed[0], {"state": "stopped", "exit_code": "", "signal": 15, "duration": "75.000"}),
    ]
    for n, (task, fields) in enumerate(results):
        folder = "done" if task in done else "failed"
        (inst / folder / task).write_text("echo old\n")
        write_fields(inst / "records" / f"{task}.result",
                     {"id": task, **fields, "reason": "x", "ended": f"{ended + n:.3f}",
                      "node_rank": 0, "gpus": ""}, mtime=ended + n)
        log = inst / "logs" / f"{task}.log"
        log.write_text(f"log of {task}\n" + "x" * 100 * n)
        os.utime(log, (ended + n, ended + n))
    cancelled = tid(8, "never.sh")
    (inst / "failed" / cancelled).write_text("echo never\n")
    write_fields(inst / "records" / f"{cancelled}.result",
                 {"id": cancelled, "state": "cancelled", "exit_code": "", "signal": "",
                  "started": "", "duration": "", "ended": f"{ended + 10:.3f}"}, mtime=ended + 10)
    failed.append(cancelled)
    return Sample(inst, now, running, pending, done, failed)


def submit_record(inst: Path, task: str, mtime: float | None = None, **fields: object) -> None:
    """A submit record as the client writes it (protocol v2 keys), with ``fields`` over it."""
    name = task.split("-", 3)[3] if ID_RE.match(task) else task
    record: dict[str, object] = {
        "id": task, "name": name, "display_name": "", "priority": task[:3], "source": "",
        "command": f"python {name}", "cwd": "/work/me", "gpus": "all", "nodes": 1, "after": "",
        "argc": 0, "retry_of": "", "submitted": EPOCH, "submitted_by": "me@login-1"}
    record.update(fields)
    write_fields(inst / "records" / f"{task}.submit", record, mtime)


@dataclass
class V2:
    inst: Path
    now: float
    a: str  # running on node 0, GPUs 0 and 1 (named "sweep-a")
    b: str  # running on node 0, GPU 2
    g: str  # a gang: rank 0 on node 1 (GPUs 0,1), rank 1 on node 0 (GPU 3)
    c: str  # pending, -g 4: the one node 0 waits with
    e: str  # pending, after a
    f: str  # done on node 1
    h: str  # failed gang


def build_v2(root: Path, job_id: str = "exp1") -> V2:
    """An instance of two nodes exactly as daemons of protocol 2 leave it: tasks side by side on
    disjoint GPUs, a gang across both nodes, a waiting reason, and per GPU who holds it."""
    now = start_of_a_second()
    inst = make_instance(root, job_id)
    a, b, g = tid(11, "sweep.py", rand="a1b2c3d4"), tid(12, "sweep.py", rand="a1b29999"), \
        tid(13, "train.py", rand="0000aaaa")
    c, e = tid(14, "big.py", "100"), tid(15, "eval.py")
    f, h = tid(16, "prep.sh"), tid(17, "dist.py")
    submit_record(inst, a, display_name="sweep-a", gpus=2, command="python sweep.py --lr 0.1")
    submit_record(inst, b, gpus=1, command="python sweep.py --lr 0.2")
    submit_record(inst, g, gpus=2, nodes=2, command="torchrun train.py")
    submit_record(inst, c, gpus=4, command="python big.py")
    submit_record(inst, e, gpus=1, after=a, command="python eval.py")
    submit_record(inst, f, gpus=0, source="/work/me/prep.sh", command="", argc=2,
                  **{"arg.0": "--fast", "arg.1": "a b"})
    submit_record(inst, h, gpus=1, nodes=2, command="torchrun dist.py")
    for task in (a, b, g):
        (inst / "running" / task).write_text("echo\n")
    for task in (c, e):
        (inst / "pending" / task).write_text("echo\n")
    (inst / "done" / f).write_text("echo\n")
    (inst / "failed" / h).write_text("echo\n")
    write_fields(inst / "records" / f"{a}.run", {"id": a, "host": "node-a", "node_rank": 0,
                                                 "gpus": "0,1", "started": now - 65})
    write_fields(inst / "records" / f"{b}.run", {"id": b, "host": "node-a", "node_rank": 0,
                                                 "gpus": "2", "started": now - 30})
    write_fields(inst / "records" / f"{g}.gang", {"id": g, "nnodes": 2, "nodes": "1,0",
                                                  "gpus": 2, "placed": now - 600})
    for rank, (node, host, gpus) in enumerate(((1, "node-b", "0,1"), (0, "node-a", "3"))):
        write_fields(inst / "records" / f"{g}.rank{rank}.run",
                     {"id": g, "rank": rank, "host": host, "node_rank": node, "gpus": gpus,
                      "started": now - 590})
        (inst / "logs" / f"{g}.rank{rank}.log").write_text(f"rank {rank} line 1\nrank {rank} "
                                                           "line 2\n")
    for task in (a, b):
        (inst / "logs" / f"{task}.log").write_text(f"log of {task}\n")
    write_fields(inst / "records" / f"{f}.result", {
        "id": f, "state": "done", "exit_code": 0, "signal": "", "reason": "exit status 0",
        "started": now - 4000, "ended": now - 3900, "duration": "100.0", "host": "node-b",
        "node_rank": 1, "attempt": 1, "gpus": ""}, mtime=now - 3900)
    write_fields(inst / "records" / f"{h}.result", {
        "id": h, "state": "failed", "exit_code": 1, "signal": "", "reason": "rank 1 failed",
        "started": now - 3000, "ended": now - 2950, "duration": "50.0", "host": "node-a",
        "node_rank": 0, "attempt": 1, "gpus": "0", "nodes": "0,1",
        "rank.0.state": "stopped", "rank.1.state": "failed", "rank.1.exit_code": 1},
        mtime=now - 2950)
    (inst / "logs" / f"{h}.rank0.log").write_text("h rank 0\n")
    (inst / "logs" / f"{h}.rank1.log").write_text("h rank 1\nTraceback\n")

    def node(rank: int, host: str, running: list[tuple[str, str, float, str]],
             gpus: list[tuple[str, str, str]], free: int, waiting: tuple[str, str] | None):
        fields: dict[str, object] = {
            "protocol": 2, "job_id": job_id, "node_rank": rank, "num_nodes": 2, "host": host,
            "pid": 100 + rank, "boot_id": "b", "pid_ns": "pid:[1]", "node_addr": host,
            "status": "running", "started": now - 3600, "shutdown": now + 20 * 3600,
            "heartbeat": now - 1, "poll_interval": 1, "kill_scope": "task", "keepalive": "on",
            "running_count": len(running), "cpu_slots": 1, "cpu_running": 0,
            "gpus_free": free, "gpu_count": len(gpus),
            "waiting.id": waiting[0] if waiting else "",
            "waiting.reason": waiting[1] if waiting else "",
            "current_task": running[0][0] if running else "", "current_task_started": ""}
        for k, (task, held, started, gang_rank) in enumerate(running):
            fields.update({f"running.{k}.id": task, f"running.{k}.gpus": held,
                           f"running.{k}.started": started, f"running.{k}.pid": 1000 + k,
                           f"running.{k}.rank": gang_rank})
        for i, (task, state, reason) in enumerate(gpus):
            fields.update({f"gpu.{i}.index": i, f"gpu.{i}.name": "NVIDIA H200",
                           f"gpu.{i}.uuid": f"GPU-{rank}{i}", f"gpu.{i}.task": task,
                           f"gpu.{i}.util": 90 if task else 75, f"gpu.{i}.mem_used_mib": 70000,
                           f"gpu.{i}.mem_total_mib": 143771, f"gpu.{i}.state": state,
                           f"gpu.{i}.reason": reason, f"gpu.{i}.tile": "" if task else 4096,
                           f"gpu.{i}.duty": "" if task else "0.8"})
        write_fields(inst / "nodes" / f"node-{rank}.state", fields)

    node(0, "node-a", [(a, "0,1", now - 65, ""), (b, "2", now - 30, ""), (g, "3", now - 590, "1")],
         [(a, "yielded", "queue task"), (a, "filling", ""), (b, "yielded", "queue task"),
          (g, "yielded", "queue task")], 0, (c, "waiting for 4 GPUs, 0 free"))
    node(1, "node-b", [(g, "0,1", now - 590, "0")],
         [(g, "yielded", "queue task"), (g, "yielded", "queue task")], 0, None)
    return V2(inst, now, a, b, g, c, e, f, h)


def run_on_a_full_disk(sh: Shell, script: str, after: Path, job_id: str = "exp1") -> Result:
    """Run script (client.sh sourced) with the instance job_id of sh.root copied onto a full
    file system: a small tmpfs, mounted in a mount namespace of the script's own (it goes when
    the script ends, whatever happens); QUEUE_ROOT is that file system, and ``$QUEUE_ROOT/fill``
    is what fills it. The instance as the script left it is copied to ``after``."""
    full = after.parent / f"{after.name}.mount"
    full.mkdir()
    wrapper = ('mount -t tmpfs -o size=256k tmpfs "$FULL" || exit 99\n'
               'cp -a "$SRC" "$FULL/" || exit 98\n'
               'head -c 4M /dev/zero > "$FULL/fill" 2>/dev/null\n'
               '"$@" > "$FULL.out" 2> "$FULL.err"; echo "$?" > "$FULL.rc"\n'
               'cp -a "$FULL/$JOB" "$AFTER"\n')
    env = sh.env(job_id, QUEUE_ROOT=str(full), FULL=str(full), SRC=str(sh.root / job_id),
                 JOB=job_id, AFTER=str(after))
    proc = subprocess.run([*UNSHARE, "bash", "-c", wrapper, "wrapper", *sh.argv(script)],
                          env=env, cwd=sh.cwd, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=120)
    if proc.returncode == 99:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr}")
    assert proc.returncode == 0, proc.stderr
    return Result(int(Path(f"{full}.rc").read_text()), Path(f"{full}.out").read_text(),
                  Path(f"{full}.err").read_text())


# An interactive shell on a terminal ###############################################################


class Terminal:
    """An interactive shell on a pseudo-terminal, driven like a person would. Its signals are a
    terminal's (SIGINT not ignored, whatever pytest inherited); ``close`` ends its whole
    session: the shell and whatever it started."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the shell
            try:
                default_sigint()
                os.chdir(cwd)
                os.execvpe(argv[0], argv, env)
            finally:
                os._exit(127)
        self.buffer = b""

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def expect(self, pattern: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern.encode(), self.buffer)
            if match:
                self.buffer = self.buffer[match.end():]
                return match.group(0).decode()
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{pattern!r} not seen; the terminal shows {self.buffer!r}")
            ready, _, _ = select.select([self.fd], [], [], min(left, 0.1))
            if ready:
                try:
                    self.buffer += os.read(self.fd, 65536)
                except OSError:
                    pass

    def close(self) -> list[str]:
        left = end_session(None, sid=self.pid)
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)
        os.close(self.fd)
        return left


INTERACTIVE = {"bash": ["bash", "--norc", "--noprofile", "-i"], "zsh": ["zsh", "-f", "-i"]}


# Against the real daemon ##########################################################################


def wait_finished(inst: Path, task: str, timeout: float = 20.0) -> str:
    def where():
        for folder in ("done", "failed"):
            if (inst / folder / task).exists() and (inst / "records" / f"{task}.result").exists():
                return folder
        return None
    return wait_for(where, timeout, what=f"{task} to finish")


def wait_running(inst: Path, task: str, timeout: float = 20.0) -> None:
    wait_for(lambda: (inst / "running" / task).exists()
             and (inst / "records" / f"{task}.run").exists(), timeout, what=f"{task} to start")


def make_shell(name: str, tmp_path: Path) -> Shell:
    """The shell of the ``sh`` fixture every client test module defines (bash, then zsh)."""
    root = tmp_path / "queue root"  # a space, on purpose
    root.mkdir(parents=True, exist_ok=True)
    work = tmp_path / "work dir"
    work.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    return Shell(name, root, home, work)

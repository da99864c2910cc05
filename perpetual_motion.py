#!/usr/bin/env python3
"""Perpetual Motion (永动机): keep a cluster job's GPUs busy and run a task queue beside them.

The daemon runs on a compute node, one per node of a cluster job:

    python perpetual_motion.py --job-id train-exp1 [--queue-root DIR]

It keeps every idle GPU of the node in the utilisation band below (keep-alive), and runs the
task scripts that clients drop into ``<queue-root>/<job-id>/pending/`` one after another, moving
them through ``running/`` to ``done/`` or ``failed/`` and writing their output to ``logs/``.
The layout of that folder is the contract in ``docs/protocol.md``. Edit the constants below to
change the defaults; the command-line flags override them (``--help`` lists them).
"""

from __future__ import annotations

__version__ = "0.1.0"

import argparse
import dataclasses
import datetime
import enum
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import select
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

# Settings (edit these) #####################################################################

GPU_UTIL_THRESHOLD = 50  # % below which keep-alive steps its load up fast
GPU_UTIL_TARGET = 70  # % lower edge of the target band
GPU_UTIL_HIGH = 85  # % above which keep-alive backs off, leaving the GPU to real work
MEMORY_USAGE_TARGET = 0.6  # share of each GPU's memory that keep-alive holds while the GPU is idle
AUTO_SHUTDOWN_HOURS = 24  # the daemon exits this many hours after it started

DEFAULT_QUEUE_DIRNAME = "gpu_queue"  # queue root is $QUEUE_ROOT, else ~/gpu_queue
POLL_INTERVAL = 1.0  # seconds between looks at pending/ and commands/
STOP_GRACE_SECONDS = 10.0  # seconds between SIGTERM and SIGKILL when a task is stopped
HEARTBEAT_SECONDS = 5.0  # the node's state file is rewritten at least this often
HEARTBEAT_STALE_SECONDS = 60.0  # a daemon whose heartbeat is older than this is dead
KILL_SCOPE = "user-python"  # after a stop: "user-python", "task" (task processes only) or "none"
KEEPALIVE = True  # False runs the queue alone
DEFAULT_PRIORITY = 500  # priority given to tasks dropped into pending/ by hand
RELEASE_TIMEOUT_SECONDS = 30.0  # longest wait for keep-alive to free the GPUs before a task
STAGING_MAX_AGE_SECONDS = 86400.0  # leftover staging files and old replies are removed after this
WARNING_REPEAT_SECONDS = 60.0  # the same warning is logged at most once per this many seconds
COMMAND_CLOCK_SKEW_SECONDS = 30.0  # commands sent longer than this before the start are stale

PROTOCOL_VERSION = 1
JOB_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")
TASK_ID_RE = re.compile(r"^[0-9]{3}-[0-9]{8}_[0-9]{6}_[0-9]{9}-[0-9a-f]{8}-[A-Za-z0-9._-]{1,80}$")
MARKER_VAR = "PERPETUAL_MOTION_TASK"  # every process of a task inherits MARKER_VAR=<job>/<id>
KILL_SCOPES = ("user-python", "task", "none")
EXIT_USAGE = 2  # bad arguments, bad JOB_ID
EXIT_ALREADY_RUNNING = 3  # a live daemon holds this instance and node
QUEUE_DIRS = ("pending", "running", "done", "failed", "records", "logs", "commands", "replies",
              "nodes", ".staging")
LOG = logging.getLogger("perpetual_motion")

# Records ####################################################################################


def now_text(epoch: float) -> str:
    """A time for people: local time to the second."""
    return datetime.datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S")


def parse_fields(text: str) -> dict[str, str]:
    """Parse ``key=value`` lines; raise ValueError on a line that is neither that nor blank."""
    fields: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[a-z0-9_.]+", key):
            raise ValueError(f"line {number} is not key=value: {line[:60]!r}")
        fields[key] = value
    return fields


def format_fields(fields: dict[str, object]) -> str:
    lines = []
    for key, value in fields.items():
        text = "" if value is None else str(value)
        lines.append(f"{key}={text.replace(chr(10), ' ')}")
    return "\n".join(lines) + "\n"


def as_float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


class TaskState(enum.Enum):
    DONE = "done"
    FAILED = "failed"
    STOPPED = "stopped"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"

    @property
    def folder(self) -> str:
        return "done" if self is TaskState.DONE else "failed"


@dataclasses.dataclass(frozen=True)
class Submission:
    """What the client recorded at submit time (``records/<id>.submit``); all optional."""

    cwd: str = ""
    source: str = ""
    command: str = ""
    submitted_by: str = ""

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> Submission:
        return cls(cwd=fields.get("cwd", ""), source=fields.get("source", ""),
                   command=fields.get("command", ""), submitted_by=fields.get("submitted_by", ""))


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """How a task ended (``records/<id>.result``)."""

    task_id: str
    state: TaskState
    reason: str
    started: float | None
    ended: float
    host: str
    node_rank: int
    exit_code: int | None = None
    signal: int | None = None
    attempt: int = 1

    def fields(self) -> dict[str, object]:
        duration = "" if self.started is None else f"{self.ended - self.started:.3f}"
        return {
            "id": self.task_id, "state": self.state.value,
            "exit_code": "" if self.exit_code is None else self.exit_code,
            "signal": "" if self.signal is None else self.signal,
            "reason": self.reason,
            "started": "" if self.started is None else f"{self.started:.3f}",
            "ended": f"{self.ended:.3f}", "duration": duration,
            "host": self.host, "node_rank": self.node_rank, "attempt": self.attempt,
        }


@dataclasses.dataclass(frozen=True)
class Identity:
    """Who a daemon is: enough to tell, on the same host, whether it still runs."""

    host: str
    pid: int
    boot_id: str
    pid_ns: str

    @classmethod
    def here(cls) -> Identity:
        try:
            boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            boot_id = ""
        try:
            pid_ns = os.readlink("/proc/self/ns/pid")
        except OSError:
            pid_ns = ""
        return cls(socket.gethostname(), os.getpid(), boot_id, pid_ns)

    def same_machine_view(self, fields: dict[str, str]) -> bool:
        """True when ``fields`` were written from this host, boot and PID namespace."""
        return (bool(self.boot_id) and fields.get("host") == self.host
                and fields.get("boot_id") == self.boot_id and fields.get("pid_ns") == self.pid_ns)


@dataclasses.dataclass(frozen=True)
class Config:
    """The daemon's settings after the command line has been read."""

    job_id: str
    queue_root: Path
    poll_interval: float = POLL_INTERVAL
    hours: float = AUTO_SHUTDOWN_HOURS
    keepalive: bool = KEEPALIVE
    kill_scope: str = KILL_SCOPE
    stop_grace: float = STOP_GRACE_SECONDS
    node_rank: int = 0
    num_nodes: int = 1
    force: bool = False

    @property
    def instance(self) -> Path:
        return self.queue_root / self.job_id


class ThrottledLog:
    """Log a repeated warning at most once per ``WARNING_REPEAT_SECONDS`` per key."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.last: dict[str, float] = {}

    def warning(self, key: str, message: str, *args: object, **kwargs) -> None:
        now = self.clock()
        if now - self.last.get(key, -1e18) >= WARNING_REPEAT_SECONDS:
            self.last[key] = now
            LOG.warning(message, *args, **kwargs)


# Queue folder ###############################################################################


def valid_job_id(job_id: str) -> bool:
    return bool(JOB_ID_RE.fullmatch(job_id or ""))


def default_queue_root() -> Path:
    env = os.environ.get("QUEUE_ROOT")
    return Path(env) if env else Path.home() / DEFAULT_QUEUE_DIRNAME


def unique_name() -> str:
    """``<UTC time>_<nanoseconds>-<8 hex>``: unique across hosts, sorts by time."""
    ns = time.time_ns()
    stamp = time.strftime("%Y%m%d_%H%M%S", time.gmtime(ns // 1_000_000_000))
    return f"{stamp}_{ns % 1_000_000_000:09d}-{secrets.token_hex(4)}"


def task_id_for(name: str, priority: int = DEFAULT_PRIORITY) -> str:
    """A task id for a file dropped into pending/ by hand (the client names its own)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[-80:] or "task"
    return f"{priority:03d}-{unique_name()}-{safe}"


def short_name(task_id: str) -> str:
    """The ``name`` part of a task id (``train.sh``), or the id itself for other names."""
    return task_id.split("-", 3)[3] if TASK_ID_RE.fullmatch(task_id) else task_id


class QueueFolder:
    """The one place that knows the layout of ``<root>/<JOB_ID>/`` (docs/protocol.md)."""

    def __init__(self, instance: Path):
        self.root = instance

    def dir(self, name: str) -> Path:
        return self.root / name

    def create(self, job_id: str) -> None:
        for name in QUEUE_DIRS:
            self.dir(name).mkdir(parents=True, exist_ok=True)
        if not (self.root / "control.json").exists():
            marker = {"protocol": PROTOCOL_VERSION, "job_id": job_id}
            self.publish(self.root / "control.json", json.dumps(marker, indent=2) + "\n")

    def publish(self, target: Path, text: str) -> None:
        """Write ``text`` to ``target`` the Maildir way: staged, fsynced, closed, renamed."""
        staged = self.dir(".staging") / f".{unique_name()}.{target.name[:60]}"
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                os.write(fd, text.encode())
                os.fsync(fd)
            finally:
                os.close(fd)  # AFS and NFS report a full disk or quota here
            os.rename(staged, target)
        except BaseException:
            with _suppress_oserror():
                os.unlink(staged)
            raise

    def read_fields(self, path: Path) -> dict[str, str] | None:
        """A record's fields; None when it is missing; ValueError/OSError when it is bad."""
        try:
            return parse_fields(path.read_text(errors="replace"))
        except FileNotFoundError:
            return None

    def names(self, folder: str) -> list[str]:
        """Published entries of a folder in run order (dot-names are staging, never listed)."""
        try:
            with os.scandir(self.dir(folder)) as entries:
                return sorted(e.name for e in entries if not e.name.startswith("."))
        except FileNotFoundError:
            return []

    def record(self, task_id: str, kind: str) -> Path:
        return self.dir("records") / f"{task_id}.{kind}"

    def remove_old(self, folder: str, now: float, max_age: float) -> int:
        removed = 0
        try:
            with os.scandir(self.dir(folder)) as entries:
                for entry in entries:
                    try:
                        if entry.is_file() and now - entry.stat().st_mtime > max_age:
                            os.unlink(entry.path)
                            removed += 1
                    except OSError:
                        continue
        except OSError:
            pass
        return removed


class _suppress_oserror:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, value, traceback) -> bool:
        return kind is not None and issubclass(kind, OSError)


# Processes ##################################################################################


def _proc_environ(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _own_pids() -> Iterator[int]:
    """PIDs of this user's processes (other users' are never touched)."""
    uid = os.getuid()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    yield int(entry.name)
            except OSError:
                continue


def marked_pids(marker_prefix: str) -> list[int]:
    """This user's processes whose environment carries ``MARKER_VAR=<marker_prefix>...``."""
    needle = f"{MARKER_VAR}={marker_prefix}".encode()
    found = []
    for pid in _own_pids():
        if pid == os.getpid():
            continue
        for item in _proc_environ(pid).split(b"\0"):
            if item.startswith(needle):
                found.append(pid)
                break
    return found


def terminate(pids: Iterable[int], grace: float) -> int:
    """SIGTERM ``pids``, SIGKILL what is left after ``grace``; return how many were signalled."""
    import psutil

    procs = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            proc.terminate()
            procs.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    _, alive = psutil.wait_procs(procs, timeout=max(grace, 0.0))
    for proc in alive:
        with _suppress_psutil():
            proc.kill()
    psutil.wait_procs(alive, timeout=2.0)
    return len(procs)


class _suppress_psutil:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, value, traceback) -> bool:
        import psutil

        return kind is not None and issubclass(kind, (psutil.Error, OSError))


def signal_group(pgid: int, sig: int) -> bool:
    """Signal a whole process group; False when it is already gone."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return False


def _is_python(proc) -> bool:
    pattern = re.compile(r"python[0-9.]*")
    try:
        names = [proc.name()]
        cmdline = proc.cmdline()
        if cmdline:
            names.append(os.path.basename(cmdline[0]))
        try:
            names.append(os.path.basename(proc.exe()))
        except Exception:  # noqa: BLE001 - exe() is often unreadable; the name is enough
            pass
    except Exception:  # noqa: BLE001 - the process may be gone
        return False
    return any(pattern.fullmatch(name or "") for name in names)


def python_pids_to_kill(job_id: str, scope: str) -> list[int]:
    """The processes that ``gpu_stop`` kills after a stop, by ``scope`` (docs/protocol.md)."""
    import psutil

    if scope == "none":
        return []
    if scope == "task":
        return marked_pids(f"{job_id}/")
    me = psutil.Process()
    keep = {me.pid} | {p.pid for p in me.parents()}
    uid = os.getuid()
    victims = []
    for proc in psutil.process_iter():
        try:
            if proc.pid in keep or proc.uids().real != uid or not _is_python(proc):
                continue
            in_task = f"{MARKER_VAR}=".encode() in _proc_environ(proc.pid)
            if not in_task and any(a.endswith("perpetual_motion.py") for a in proc.cmdline()):
                continue  # our keep-alive workers and other instances' daemons
            victims.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return victims


def reap_orphans(keep: int | None) -> None:
    """Reap exited children that are not ``keep`` (the task, which Popen reaps itself).

    Only needed when the daemon is PID 1 of a container or namespace: orphans of tasks are
    re-parented to it and would stay zombies.
    """
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or info.si_pid == keep:
            return
        try:
            os.waitpid(info.si_pid, os.WNOHANG)
        except ChildProcessError:
            return


def pid_is_daemon(pid: int) -> bool:
    """True when ``pid`` runs on this host and looks like a daemon of ours."""
    import psutil

    if pid == os.getpid():
        return False
    try:
        return any(arg.endswith("perpetual_motion.py") for arg in psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


# Task runner ################################################################################


@dataclasses.dataclass
class RunningTask:
    """The task this daemon runs now (mutable: the stop state changes while it runs)."""

    task_id: str
    proc: subprocess.Popen
    started: float
    log_path: Path
    attempt: int = 1
    stop_state: TaskState | None = None  # STOPPED or INTERRUPTED once a stop was asked for
    stop_reason: str = ""
    kill_at: float | None = None  # when SIGKILL follows the SIGTERM


def task_command(path: Path) -> list[str] | str:
    """How a task file runs, by its name; a string is the reason it cannot run."""
    if path.name.endswith(".sh"):
        return ["bash", str(path)]
    if path.name.endswith(".py"):
        return [sys.executable, str(path)]
    if not os.access(path, os.X_OK):
        return "not executable (name it *.sh or *.py, or chmod +x it)"
    return [str(path)]


class TaskRunner:
    """Claims, starts, stops and finishes tasks through the queue folder (docs/protocol.md)."""

    def __init__(self, config: Config, folder: QueueFolder, identity: Identity,
                 clock: Callable[[], float], throttled: ThrottledLog):
        self.config = config
        self.folder = folder
        self.identity = identity
        self.clock = clock
        self.throttled = throttled
        self.current: RunningTask | None = None
        self.unfinished: list[tuple[TaskResult, str]] = []  # results not yet published

    # -- claiming --------------------------------------------------------------------------

    def claim_next(self) -> str | None:
        """Rename the first pending task into running/; its id, or None when none is left."""
        for name in self.folder.names("pending"):
            source = self.folder.dir("pending") / name
            try:
                if not source.is_file():
                    self.throttled.warning(f"notfile:{name}", "[pending] skipping %s: not a "
                                           "regular file", name)
                    continue
            except OSError as exc:
                self.throttled.warning(f"stat:{name}", "[pending] skipping %s: %s", name, exc)
                continue
            task_id = name if TASK_ID_RE.fullmatch(name) else task_id_for(name)
            target = self.folder.dir("running") / task_id
            try:
                os.rename(source, target)
            except FileNotFoundError:
                if target.exists():  # NFS replayed a rename that had succeeded
                    return task_id
                continue  # someone else took it (cancelled meanwhile)
            except OSError as exc:
                self.throttled.warning("claim", "cannot claim %s: %s", name, exc)
                return None
            return task_id
        return None

    # -- starting --------------------------------------------------------------------------

    def start(self, task_id: str) -> RunningTask | None:
        """Start a claimed task; None when it could not start (then it is already finished)."""
        path = self.folder.dir("running") / task_id
        now = self.clock()
        submission = self._submission(task_id)
        cwd = submission.cwd or str(Path.home())
        command = task_command(path)
        log_path = self.folder.dir("logs") / f"{task_id}.log"
        env = self._environment(task_id, log_path)
        try:
            log = open(log_path, "ab", buffering=0)  # noqa: SIM115 - the with below closes it
        except OSError as exc:
            LOG.error("cannot open the log of %s (%s): back to pending", task_id, exc)
            self._unclaim(task_id)
            return None
        with log:
            header = [f"task: {task_id}", f"job: {self.config.job_id}",
                      f"host: {self.identity.host}  node: {self.config.node_rank}",
                      f"command: {shlex.join(command) if isinstance(command, list) else path}",
                      f"cwd: {cwd}", f"started: {now_text(now)}"]
            if submission.submitted_by:
                header.insert(2, f"submitted by: {submission.submitted_by}")
            self._log_lines(log, header)
            reason = message = ""  # why the task cannot run, short and for people
            if isinstance(command, str):
                reason = message = command
            elif not os.path.isdir(cwd):
                reason = "missing-cwd"
                message = f"the working directory {cwd} does not exist on this node"
            proc = None
            if not reason:
                try:
                    proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, close_fds=True)
                except OSError as exc:
                    reason = message = f"cannot start: {exc.strerror or exc}"
            if proc is None:
                self._log_lines(log, [f"not run: {message}"])
                self._finish(TaskResult(task_id, TaskState.FAILED, reason, now, self.clock(),
                                        self.identity.host, self.config.node_rank))
                return None
        run_fields = {"id": task_id, "host": self.identity.host,
                      "node_rank": self.config.node_rank, "pid": proc.pid, "pgid": proc.pid,
                      "boot_id": self.identity.boot_id, "pid_ns": self.identity.pid_ns,
                      "started": f"{now:.3f}", "started_at": now_text(now),
                      "command": shlex.join(command), "cwd": cwd, "attempt": 1}
        try:
            self.folder.publish(self.folder.record(task_id, "run"), format_fields(run_fields))
        except OSError as exc:
            self.throttled.warning("runrecord", "cannot write the run record of %s: %s",
                                   task_id, exc)
        LOG.info("Task started: %s (pid %d)", task_id, proc.pid)
        self.current = RunningTask(task_id, proc, now, log_path)
        return self.current

    def _submission(self, task_id: str) -> Submission:
        try:
            fields = self.folder.read_fields(self.folder.record(task_id, "submit"))
        except (OSError, ValueError) as exc:
            self.throttled.warning(f"submit:{task_id}", "ignoring the bad submit record of %s:"
                                   " %s", task_id, exc)
            return Submission()
        return Submission.from_fields(fields) if fields else Submission()

    def _environment(self, task_id: str, log_path: Path) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "JOB_ID": self.config.job_id, "TASK_NAME": task_id,
            "TASK_SHORT_NAME": short_name(task_id),
            "QUEUE_ROOT": str(self.config.queue_root), "QUEUE_DIR": str(self.folder.root),
            "TASK_LOG": str(log_path), "NODE_RANK": str(self.config.node_rank),
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID", MARKER_VAR: f"{self.config.job_id}/{task_id}",
        })
        return env

    def _unclaim(self, task_id: str) -> None:
        with _suppress_oserror():
            os.rename(self.folder.dir("running") / task_id, self.folder.dir("pending") / task_id)

    @staticmethod
    def _log_lines(log, lines: list[str]) -> None:
        try:
            log.write("".join(f"[perpetual-motion] {line}\n" for line in lines).encode())
        except OSError:
            pass  # a full disk must not stop the task from being recorded

    # -- stopping --------------------------------------------------------------------------

    def stop(self, state: TaskState, reason: str, hard: bool = False) -> None:
        """Ask the running task to stop: SIGTERM to its group now, SIGKILL after the grace."""
        task = self.current
        if task is None:
            return
        if task.stop_state is None:
            task.stop_state, task.stop_reason = state, reason
        if hard or task.kill_at is None:
            sig = signal.SIGKILL if hard else signal.SIGTERM
            signal_group(task.proc.pid, sig)
            task.kill_at = self.clock() + (0.0 if hard else self.config.stop_grace)
            LOG.info("Stopping %s (%s): %s", task.task_id, reason, signal.Signals(sig).name)

    # -- polling and finishing -------------------------------------------------------------

    def poll(self) -> TaskResult | None:
        """Check the running task; finish it when it has ended. Its result, or None."""
        self.retry_unfinished()
        task = self.current
        if task is None:
            return None
        code = task.proc.poll()
        if code is None:
            if task.kill_at is not None and self.clock() >= task.kill_at:
                signal_group(task.proc.pid, signal.SIGKILL)
                task.kill_at = self.clock() + 3600  # once is enough
            return None
        self.current = None
        ended = self.clock()
        # What the task left behind: its process group, and whatever carries its marker.
        signal_group(task.proc.pid, signal.SIGTERM)
        leftovers = terminate(marked_pids(f"{self.config.job_id}/{task.task_id}"),
                              self.config.stop_grace)
        signal_group(task.proc.pid, signal.SIGKILL)
        exit_code, signum = (None, -code) if code < 0 else (code, None)
        if task.stop_state is not None:
            state, reason = task.stop_state, task.stop_reason
        elif code == 0:
            state, reason = TaskState.DONE, "exit status 0"
        else:
            state = TaskState.FAILED
            reason = (f"exit status {code}" if signum is None
                      else f"killed by signal {signum} ({signal.Signals(signum).name})")
        duration = ended - task.started
        if signum is None:
            footer = f"exited with status {code} after {duration:.1f} s"
        else:
            footer = f"killed by signal {signum} ({signal.Signals(signum).name}) after " \
                     f"{duration:.1f} s"
        if task.stop_state is not None:
            footer += f": {reason}"
        lines = [footer]
        if leftovers:
            lines.insert(0, f"ended {leftovers} leftover process(es) of the task")
        try:
            with open(task.log_path, "ab", buffering=0) as log:
                self._log_lines(log, lines)
        except OSError:
            pass
        result = TaskResult(task.task_id, state, reason, task.started, ended, self.identity.host,
                            self.config.node_rank, exit_code, signum, task.attempt)
        LOG.info("Task ended: %s: %s (%s)", task.task_id, state.value, reason)
        self._finish(result)
        return result

    def _finish(self, result: TaskResult, source: str = "running") -> None:
        self.unfinished.append((result, source))
        self.retry_unfinished()

    def retry_unfinished(self) -> None:
        """Publish results and moves that failed before (a full disk): nothing is lost."""
        while self.unfinished:
            result, source = self.unfinished[0]
            try:
                self.publish_result(result, source)
            except OSError as exc:
                self.throttled.warning("finish", "cannot record the end of %s (will retry): %s",
                                       result.task_id, exc)
                return
            self.unfinished.pop(0)

    def publish_result(self, result: TaskResult, source: str = "running") -> None:
        """Write the result, then move the task from ``source`` to done/ or failed/."""
        self.folder.publish(self.folder.record(result.task_id, "result"),
                            format_fields(result.fields()))
        try:
            os.rename(self.folder.dir(source) / result.task_id,
                      self.folder.dir(result.state.folder) / result.task_id)
        except FileNotFoundError:
            pass  # moved already (a retry after a lost reply)

    # -- cancelling and recovery -----------------------------------------------------------

    def cancel_pending(self, name: str) -> bool:
        """Move a pending task to failed/ as cancelled; False when it is not pending (any more)."""
        if name.startswith(".") or "/" in name:
            return False
        try:
            os.rename(self.folder.dir("pending") / name, self.folder.dir("failed") / name)
        except FileNotFoundError:
            return False
        except OSError as exc:
            LOG.warning("cannot cancel %s: %s", name, exc)
            return False
        now = self.clock()
        result = TaskResult(name, TaskState.CANCELLED, "cancelled by user", None, now,
                            self.identity.host, self.config.node_rank)
        try:
            self.folder.publish(self.folder.record(name, "result"), format_fields(result.fields()))
        except OSError as exc:
            LOG.warning("cancelled %s but cannot write its result: %s", name, exc)
        LOG.info("Task cancelled: %s", name)
        return True

    def recover(self) -> None:
        """Finish every task that a dead daemon left in running/ (docs/protocol.md)."""
        for task_id in self.folder.names("running"):
            try:
                old = self.folder.read_fields(self.folder.record(task_id, "result"))
            except (OSError, ValueError):
                old = None
            if old and old.get("state") in {s.value for s in TaskState}:
                folder = TaskState(old["state"]).folder
                with _suppress_oserror():
                    os.rename(self.folder.dir("running") / task_id,
                              self.folder.dir(folder) / task_id)
                LOG.info("Recovered %s: moved to %s/ as its result says", task_id, folder)
                continue
            try:
                run = self.folder.read_fields(self.folder.record(task_id, "run")) or {}
            except (OSError, ValueError):
                run = {}
            killed = terminate(marked_pids(f"{self.config.job_id}/{task_id}"),
                               self.config.stop_grace)
            started = as_float(run.get("started"))
            now = self.clock()
            result = TaskResult(task_id, TaskState.INTERRUPTED, "daemon died", started, now,
                                run.get("host") or self.identity.host, self.config.node_rank,
                                attempt=int(run.get("attempt") or 1)
                                if (run.get("attempt") or "1").isdigit() else 1)
            log_note = f"interrupted: the daemon died; {killed} orphaned process(es) ended"
            try:
                with open(self.folder.dir("logs") / f"{task_id}.log", "ab", buffering=0) as log:
                    self._log_lines(log, [log_note])
            except OSError:
                pass
            self._finish(result)
            LOG.warning("Task %s was interrupted by the daemon's death: moved to failed/ "
                        "(%d orphaned process(es) ended)", task_id, killed)


# Keep-alive #################################################################################


class KeepAlive:
    """The seam between the daemon loop and the GPUs.

    This base class is keep-alive switched off: the queue runs, the GPUs are left alone.
    """

    def describe(self) -> str:
        """``on``, or ``off: <why>``, for the state file."""
        return "off: disabled"

    def start(self) -> None:
        """Start holding the idle GPUs."""

    def tick(self, now: float, task_running: bool) -> None:
        """One turn of the daemon loop: react to the GPUs' state."""

    def release(self, timeout: float) -> bool:
        """Free every GPU for a queue task; True once the memory is free, within ``timeout``."""
        return True

    def task_finished(self) -> None:
        """The queue task has ended: the GPUs may be taken again."""

    def gpu_fields(self) -> dict[str, str]:
        """Per-GPU keys for the state file (``gpu_count``, ``gpu.<i>.util``, ...)."""
        return {"gpu_count": "0"}

    def stop(self) -> None:
        """Stop every worker and free the GPUs."""


def make_keepalive(enabled: bool, log: logging.Logger, node_label: str = "") -> KeepAlive:
    """The keep-alive engine for this node, or keep-alive off with the reason."""
    if not enabled:
        return KeepAlive()
    log.warning("keep-alive is off: this build has no GPU engine yet")
    return KeepAlive()


def worker_main(argv: list[str]) -> int:
    """Entry of a keep-alive worker process (``perpetual_motion.py --worker ...``)."""
    print("no keep-alive worker in this build", file=sys.stderr)
    return 2


# Daemon loop ################################################################################


def node_from_environment(env: dict[str, str]) -> tuple[int, int]:
    """(node rank, node count) from the variables that SCO ACP, torchrun or Slurm set."""
    for rank_var, count_var in (("SENSECORE_PYTORCH_NODE_RANK", "SENSECORE_PYTORCH_NNODES"),
                                ("RANK", "WORLD_SIZE"), ("SLURM_NODEID", "SLURM_NNODES")):
        rank, count = env.get(rank_var, ""), env.get(count_var, "")
        if rank.isdigit():
            return int(rank), int(count) if count.isdigit() and int(count) > 0 else 1
    return 0, 1


class SignalWaiter:
    """Sleeps until a timeout, a signal or a child's exit, whichever comes first.

    Signal handlers only record what arrived; the loop acts on it.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self.read_fd, write_fd = os.pipe()
        for fd in (self.read_fd, write_fd):
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        signal.set_wakeup_fd(write_fd)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._record)
        signal.signal(signal.SIGCHLD, lambda *_: None)

    def _record(self, signum: int, frame: object) -> None:
        self.received.append(signum)

    def sleep(self, seconds: float) -> None:
        try:
            select.select([self.read_fd], [], [], max(seconds, 0.0))
            os.read(self.read_fd, 4096)
        except (BlockingIOError, InterruptedError):
            pass


class Daemon:
    """The main loop: heartbeat, commands, the queue, keep-alive; one tick at a time."""

    def __init__(self, config: Config, keepalive: KeepAlive | None = None,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep,
                 identity: Identity | None = None):
        self.config = config
        self.keepalive = keepalive or KeepAlive()
        self.clock = clock
        self.sleep = sleep
        self.identity = identity or Identity.here()
        self.folder = QueueFolder(config.instance)
        self.throttled = ThrottledLog(clock)
        self.runner = TaskRunner(config, self.folder, self.identity, clock, self.throttled)
        self.started = clock()
        self.shutdown_at = self.started + config.hours * 3600
        self.stopping = ""  # why the daemon is shutting down, once it is
        self.kill_python_after_task = False
        self.finished = False
        self.signals_seen = 0
        self.last_state_write = -1e18
        self.state_dirty = True
        self.last_housekeeping = self.started
        self.last_leader_check = self.started

    # -- start-up --------------------------------------------------------------------------

    def live_owner(self) -> str | None:
        """A description of the live daemon that holds this instance and node, or None."""
        path = self.folder.dir("nodes") / f"node-{self.config.node_rank}.state"
        try:
            fields = self.folder.read_fields(path)
        except (OSError, ValueError) as exc:
            LOG.warning("ignoring the unreadable state file %s: %s", path, exc)
            return None
        if not fields or fields.get("status") == "stopped":
            return None
        who = f"pid {fields.get('pid', '?')} on {fields.get('host', '?')}"
        if self.identity.same_machine_view(fields):
            pid = fields.get("pid", "")
            return who if pid.isdigit() and pid_is_daemon(int(pid)) else None
        heartbeat = as_float(fields.get("heartbeat"))
        if heartbeat is None:
            return None
        age = self.clock() - heartbeat
        return f"{who}, heartbeat {age:.0f} s ago" if age < HEARTBEAT_STALE_SECONDS else None

    def start(self) -> int | None:
        """Prepare the instance; an exit code when the daemon must not run."""
        self.folder.create(self.config.job_id)
        owner = self.live_owner()
        if owner and not self.config.force:
            LOG.error("a daemon for %s (node %d) is already running: %s. Stop it with "
                      "gpu_shutdown, or start with --force if it is really gone.",
                      self.config.job_id, self.config.node_rank, owner)
            return EXIT_ALREADY_RUNNING
        self.write_state()
        if self.is_leader:
            self.runner.recover()
        self.housekeeping()
        hours = self.config.hours
        LOG.info("Started at: %s", now_text(self.started))
        LOG.info("Auto-shutdown at: %s (%sh)", now_text(self.shutdown_at),
                 f"{hours:g}")
        LOG.info("Queue: %s (node %d of %d%s)", self.folder.root, self.config.node_rank,
                 self.config.num_nodes, "" if self.is_leader else ", keep-alive only")
        self.keepalive.start()
        LOG.info("Keep-alive: %s", self.keepalive.describe())
        self.write_state()
        return None

    @property
    def is_leader(self) -> bool:
        return self.config.node_rank == 0

    # -- the loop --------------------------------------------------------------------------

    def run(self, waiter: SignalWaiter | None = None) -> int:
        code = self.start()
        if code is not None:
            return code
        try:
            while not self.finished:
                if waiter is not None:
                    while waiter.received:
                        self.on_signal(signal.Signals(waiter.received.pop(0)).name)
                self.tick()
                if not self.finished:
                    self.sleep(self.wait_time())
        finally:
            self.close()
        return 0

    def wait_time(self) -> float:
        wait = self.config.poll_interval
        task = self.runner.current
        if task is not None and task.kill_at is not None:
            wait = min(wait, task.kill_at - self.clock())
        if not self.stopping:
            wait = min(wait, self.shutdown_at - self.clock())
        return max(wait, 0.0)

    def tick(self) -> None:
        """One turn of the loop. Nothing that a bad file or a failed call raises escapes."""
        try:
            self._tick()
        except Exception:  # noqa: BLE001 - the daemon never dies of one bad turn
            self.throttled.warning("tick", "unexpected error in the daemon loop (it goes on)",
                                   exc_info=True)

    def _tick(self) -> None:
        now = self.clock()
        if not self.stopping and now >= self.shutdown_at:
            self.begin_shutdown(f"auto-shutdown after {self.config.hours:g}h")
        if self.is_leader:
            self.handle_commands()
            self.run_queue()
        elif now - self.last_leader_check >= HEARTBEAT_SECONDS:
            self.last_leader_check = now
            self.follow_leader()
        self.keepalive.tick(now, self.runner.current is not None)
        if self.identity.pid == 1:
            current = self.runner.current
            reap_orphans(current.proc.pid if current else None)
        if self.stopping and self.runner.current is None:
            self.finished = True
            return
        if self.state_dirty or now - self.last_state_write >= HEARTBEAT_SECONDS:
            self.write_state()
        if now - self.last_housekeeping >= 3600:
            self.housekeeping()

    def run_queue(self) -> None:
        before = self.runner.current
        if before is not None:
            if self.runner.poll() is None:
                return
            self.state_dirty = True
            self.keepalive.task_finished()
        else:
            self.runner.retry_unfinished()
        if self.kill_python_after_task:
            self.kill_python()
        while not self.stopping and self.runner.current is None:
            task_id = self.runner.claim_next()
            if task_id is None:
                return
            self.state_dirty = True
            if not self.keepalive.release(RELEASE_TIMEOUT_SECONDS):
                LOG.warning("keep-alive did not free the GPUs within %.0f s; starting %s anyway",
                            RELEASE_TIMEOUT_SECONDS, task_id)
            if self.runner.start(task_id) is None:
                self.keepalive.task_finished()

    def kill_python(self) -> None:
        self.kill_python_after_task = False
        pids = python_pids_to_kill(self.config.job_id, self.config.kill_scope)
        if pids:
            count = terminate(pids, self.config.stop_grace)
            LOG.info("Ended %d other Python process(es) (scope %s)", count, self.config.kill_scope)

    # -- commands --------------------------------------------------------------------------

    def handle_commands(self) -> None:
        for name in self.folder.names("commands"):
            if not name.endswith(".cmd"):
                continue
            path = self.folder.dir("commands") / name
            try:
                fields = self.folder.read_fields(path)
                if fields is None:
                    continue
                reply = self.execute(fields)
            except (OSError, ValueError, UnicodeError) as exc:
                self.throttled.warning(f"cmd:{name}", "bad command file %s: %s", name, exc)
                reply = {"action": "", "task": "", "result": "error",
                         "message": f"unreadable command: {exc}"}
            reply["handled"] = f"{self.clock():.3f}"
            try:
                self.folder.publish(self.folder.dir("replies") / f"{name[:-4]}.reply",
                                    format_fields(reply))
                os.unlink(path)
            except OSError as exc:
                self.throttled.warning("reply", "cannot answer command %s: %s", name, exc)
                return

    def execute(self, fields: dict[str, str]) -> dict[str, object]:
        action, task_id = fields.get("action", ""), fields.get("task", "")
        reply: dict[str, object] = {"action": action, "task": task_id}
        current = self.runner.current
        sent = as_float(fields.get("sent"))
        if sent is not None and sent < self.started - COMMAND_CLOCK_SKEW_SECONDS:
            # Left over from an earlier daemon: a stale shutdown must not end this one.
            reply.update(result="error", message="sent before this daemon started; ignored")
            return reply
        if action == "stop":
            if not task_id:
                raise ValueError("stop without a task")
            if self.runner.cancel_pending(task_id):
                reply.update(result="cancelled", message="removed from pending")
            elif current is not None and current.task_id == task_id:
                self.runner.stop(TaskState.STOPPED, "stopped by user")
                self.kill_python_after_task = True
                self.state_dirty = True
                reply.update(result="stopped", message=f"SIGTERM sent, SIGKILL after "
                                                       f"{self.config.stop_grace:g} s")
            else:
                reply.update(result="not_found", message="neither pending nor running")
        elif action == "stop_all":
            cancelled = sum(self.runner.cancel_pending(n) for n in self.folder.names("pending"))
            stopped = ""
            if current is not None:
                self.runner.stop(TaskState.STOPPED, "stopped by user (all)")
                stopped = current.task_id
            self.kill_python_after_task = True
            self.state_dirty = True
            reply.update(result="ok", cancelled_count=cancelled, stopped=stopped,
                         message=f"{cancelled} cancelled, "
                                 f"{'1 stopped' if stopped else 'none running'}")
        elif action == "shutdown":
            self.begin_shutdown(f"shutdown asked by {fields.get('sent_by') or 'a client'}")
            reply.update(result="accepted", message="the daemon is shutting down")
        else:
            raise ValueError(f"unknown action {action!r}")
        return reply

    # -- shutdown --------------------------------------------------------------------------

    def on_signal(self, name: str) -> None:
        self.signals_seen += 1
        if self.signals_seen == 1:
            self.begin_shutdown(f"{name} received")
        else:
            LOG.info("%s received again: killing the running task now", name)
            self.runner.stop(TaskState.INTERRUPTED, "daemon shutdown", hard=True)

    def begin_shutdown(self, reason: str) -> None:
        if self.stopping:
            return
        self.stopping = reason
        self.state_dirty = True
        LOG.info("Shutting down: %s", reason)
        self.runner.stop(TaskState.INTERRUPTED, "daemon shutdown")

    def follow_leader(self) -> None:
        """A node other than 0 ends when node 0 has stopped after this node started."""
        try:
            fields = self.folder.read_fields(self.folder.dir("nodes") / "node-0.state") or {}
        except (OSError, ValueError):
            return
        stopped = as_float(fields.get("stopped"))
        if fields.get("status") == "stopped" and stopped is not None and stopped > self.started:
            self.begin_shutdown("node 0 has stopped")

    def close(self) -> None:
        self.keepalive.stop()
        self.runner.retry_unfinished()
        self.write_state(stopped=True)
        LOG.info("Stopped: %s", self.stopping or "loop ended")

    # -- state -----------------------------------------------------------------------------

    def write_state(self, stopped: bool = False) -> None:
        now = self.clock()
        task = self.runner.current
        status = "stopped" if stopped else "stopping" if self.stopping else "running"
        fields: dict[str, object] = {
            "protocol": PROTOCOL_VERSION, "job_id": self.config.job_id,
            "node_rank": self.config.node_rank, "num_nodes": self.config.num_nodes,
            "host": self.identity.host, "pid": self.identity.pid,
            "boot_id": self.identity.boot_id, "pid_ns": self.identity.pid_ns,
            "status": status, "started": f"{self.started:.3f}",
            "started_at": now_text(self.started), "shutdown": f"{self.shutdown_at:.3f}",
            "shutdown_at": now_text(self.shutdown_at), "heartbeat": f"{now:.3f}",
            "poll_interval": f"{self.config.poll_interval:g}",
            "current_task": task.task_id if task else "",
            "current_task_started": f"{task.started:.3f}" if task else "",
            "keepalive": self.keepalive.describe(),
        }
        try:
            fields.update(self.keepalive.gpu_fields())
        except Exception:  # noqa: BLE001 - a GPU query must not stop the heartbeat
            self.throttled.warning("gpufields", "cannot read the GPU state", exc_info=True)
        if stopped:
            fields.update(stopped=f"{now:.3f}", stopped_at=now_text(now),
                          stop_reason=self.stopping)
        try:
            self.folder.publish(self.folder.dir("nodes") / f"node-{self.config.node_rank}.state",
                                format_fields(fields))
            self.last_state_write = now
            self.state_dirty = False
        except OSError as exc:
            hint = " (an expired AFS token? renew it with aklog/krenew)" \
                if exc.errno == errno.EACCES else ""
            self.throttled.warning("state", "cannot write the heartbeat: %s%s", exc, hint)

    def housekeeping(self) -> None:
        now = self.clock()
        self.last_housekeeping = now
        self.folder.remove_old(".staging", now, STAGING_MAX_AGE_SECONDS)
        self.folder.remove_old("replies", now, STAGING_MAX_AGE_SECONDS)


# Command line ###############################################################################


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="perpetual_motion.py",
        description="Keep this node's GPUs busy and run the task queue of one instance "
                    "(<queue-root>/<job-id>/, see docs/protocol.md).")
    parser.add_argument("--job-id", default=os.environ.get("JOB_ID") or "default",
                        help="the instance: letters, digits, '.', '_', '-' (at most 64); "
                             "default $JOB_ID, else 'default'")
    parser.add_argument("--queue-root", type=Path, default=None,
                        help="folder that holds the instances; default $QUEUE_ROOT, "
                             f"else ~/{DEFAULT_QUEUE_DIRNAME}")
    parser.add_argument("--poll-interval", type=float, default=POLL_INTERVAL,
                        help=f"seconds between looks at pending/ (default {POLL_INTERVAL:g})")
    parser.add_argument("--hours", type=float, default=AUTO_SHUTDOWN_HOURS,
                        help=f"exit after this many hours (default {AUTO_SHUTDOWN_HOURS})")
    parser.add_argument("--no-keepalive", action="store_true",
                        help="run the queue only; leave the GPUs alone")
    parser.add_argument("--kill-scope", choices=KILL_SCOPES, default=KILL_SCOPE,
                        help="what a stop kills besides the task: every Python process of "
                             "this user but the daemon (user-python), only processes of "
                             f"tasks (task), or nothing (none); default {KILL_SCOPE}")
    parser.add_argument("--stop-grace", type=float, default=STOP_GRACE_SECONDS,
                        help="seconds from SIGTERM to SIGKILL when a task is stopped "
                             f"(default {STOP_GRACE_SECONDS:g})")
    parser.add_argument("--node-rank", type=int, default=None,
                        help="this node's rank; default from SENSECORE_PYTORCH_NODE_RANK, "
                             "RANK or SLURM_NODEID, else 0")
    parser.add_argument("--num-nodes", type=int, default=None,
                        help="nodes in the job; default from SENSECORE_PYTORCH_NNODES, "
                             "WORLD_SIZE or SLURM_NNODES, else 1")
    parser.add_argument("--force", action="store_true",
                        help="start even if the state file says a daemon is alive")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> Config | str:
    """The Config, or a message saying what is wrong with the arguments."""
    if not valid_job_id(args.job_id):
        return (f"invalid JOB_ID {args.job_id!r}: use 1-64 letters, digits, '.', '_' or '-', "
                "not starting with '.' or '-'")
    if not args.poll_interval > 0:
        return "--poll-interval must be positive"
    if not args.hours > 0:
        return "--hours must be positive"
    if args.stop_grace < 0:
        return "--stop-grace must not be negative"
    rank, count = node_from_environment(dict(os.environ))
    rank = rank if args.node_rank is None else args.node_rank
    count = count if args.num_nodes is None else args.num_nodes
    if rank < 0 or count < 1 or rank >= count:
        return f"node rank {rank} does not fit {count} node(s)"
    root = args.queue_root or default_queue_root()
    return Config(job_id=args.job_id, queue_root=root.expanduser().absolute(),
                  poll_interval=args.poll_interval, hours=args.hours,
                  keepalive=KEEPALIVE and not args.no_keepalive, kill_scope=args.kill_scope,
                  stop_grace=args.stop_grace, node_rank=rank, num_nodes=count, force=args.force)


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s",
                                           "%Y-%m-%d %H:%M:%S"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1:])
    config = config_from_args(parse_args(argv))
    setup_logging()
    if isinstance(config, str):
        LOG.error("%s", config)
        return EXIT_USAGE
    try:
        config.queue_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        LOG.error("cannot create the queue root %s: %s", config.queue_root, exc)
        return 1
    waiter = SignalWaiter()
    label = f"node {config.node_rank}" if config.num_nodes > 1 else ""
    daemon = Daemon(config, make_keepalive(config.keepalive, LOG, label), sleep=waiter.sleep)
    return daemon.run(waiter)


if __name__ == "__main__":
    sys.exit(main())

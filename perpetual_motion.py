#!/usr/bin/env python3
"""Perpetual Motion (永动机): keep a cluster job's GPUs busy and run a task queue beside them.

The daemon runs on a compute node, one per node of a cluster job:

    python perpetual_motion.py --job-id train-exp1 [--queue-root DIR]

It keeps every idle GPU of the node in the utilisation band below (keep-alive), and runs the
task scripts that clients drop into ``<queue-root>/<job-id>/pending/``, in priority order, each
on the GPUs it asks for (side by side when they fit, across nodes when it asks for several),
moving them through ``running/`` to ``done/`` or ``failed/`` and writing their output to
``logs/``.
The layout of that folder is the contract in ``docs/protocol.md``. Edit the constants below to
change the defaults; the command-line flags override them (``--help`` lists them).

The banner sections below, in this order, and where each decision is made:

- Settings: the constants a user edits, each with a one-line comment.
- Records: the plain records passed between sections (``Request``, ``Submission``,
  ``TaskResult``, ``Config``, ``Identity``). The node's GPUs: which GPUs tasks are given, by
  which numbers (``discover_gpus``, ``Inventory``, ``GpuInfo``).
- Queue folder: the folder's layout, every move of a task between its folders, and what in it
  may be trusted (``QueueFolder``, over ``QueueFiles``). The finished tasks' summary that
  gpu_status shows (``History``).
- Processes: which processes are a task's, and how they are ended (``leftover_pids``,
  ``python_pids_to_kill``, ``terminate``, ``signal_group``).
- Placement: on which GPUs a task starts (``plan_starts``) and on which nodes
  (``choose_gang_nodes``). One queue pass, a pure plan from a frozen ``PassSnapshot``: the run
  order, and why each task waits or fails (``plan_pass``, ``gang_nodes``,
  ``dependency_blocker``).
- Task runner: starting, stopping and polling the tasks this node runs (``TaskRunner``); their
  ends published (``TaskEnds``); a pass's plan carried out (``PassApplier``); the callback after
  each task (``Callbacks``).
- Tasks across nodes: the ranks of a task that spans nodes, and which nodes are alive
  (``Gangs``, ``Liveness``, ``NodeView``). The queue pass of each poll: snapshot, plan, apply
  (``Scheduler``).
- Keep-alive: whether each GPU no task holds is held, filled beside a task or left to foreign
  work (``GpuKeepAlive``, ``Workers``, ``DutyController``, ``foreign_work``), through the NVML
  seam (``Nvml``); how each GPU fares (``GpuMeasures``); the worker process on the GPU's side
  (``run_worker_loop``); ``--self-test`` (``self_test``).
- Node claim and commands: which daemon holds a node (``NodeClaim``); ending its tasks when it
  cannot write its heartbeat (``SelfFence``); the clients' commands (``Commands``).
- Daemon loop: one tick at a time (``Daemon``); its start-up, yielding and shut-down
  (``DaemonLifecycle``); the state file and the beat (``DaemonState``).
- Command line: the flags and ``main()``.
"""

from __future__ import annotations

__version__ = "0.1.0"

import argparse
import collections
import contextlib
import ctypes
import dataclasses
import datetime
import enum
import errno
import fcntl
import functools
import grp
import importlib.util
import json
import logging
import math
import os
import pwd
import re
import secrets
import select
import shlex
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

# Settings (edit these) #####################################################################

GPU_UTIL_THRESHOLD = 50  # % below which keep-alive steps its load up fast
GPU_UTIL_TARGET = 70  # % lower edge of the target band
GPU_UTIL_HIGH = 85  # % above which keep-alive backs off, leaving the GPU to real work
MEMORY_USAGE_TARGET = 0.6  # share of each GPU's memory that keep-alive holds while the GPU is idle
AUTO_SHUTDOWN_HOURS = 24  # the daemon exits this many hours after it started

DEFAULT_QUEUE_DIRNAME = "gpu_queue"  # queue root is $QUEUE_ROOT, else ~/gpu_queue
POLL_INTERVAL = 0.5  # seconds between looks at pending/ and commands/ (inotify wakes it sooner)
STOP_GRACE_SECONDS = 10.0  # seconds between SIGTERM and SIGKILL when a task is stopped
HEARTBEAT_SECONDS = 5.0  # the node's state file is rewritten at least this often
HEARTBEAT_STALE_SECONDS = 60.0  # a daemon whose heartbeat stood still this long is dead
HEARTBEAT_LATE_SECONDS = 3 * HEARTBEAT_SECONDS  # an older heartbeat: the daemon is not responding
SELF_FENCE_SECONDS = 40.0  # a daemon that cannot write its heartbeat this long ends its tasks
KILL_SCOPE = "auto"  # after a stop: "user-python", "task", "none", or "auto" (by where it runs)
KEEPALIVE = True  # False runs the queue alone
MAX_CPU_TASKS = 1  # tasks that ask for no GPU (-g 0) running at once on a node
BACKFILL_LIMIT_SECONDS = 600.0  # a task waiting for GPUs this long stops later tasks jumping it
GANG_FAIL_GRACE_SECONDS = 5.0  # after one rank of a task failed, the others get this long to end
# how long a new daemon watches an unreachable owner's heartbeat: as long as node 0 waits to take
# a node for dead, so that an owner that lives but cannot beat has fenced its tasks by then
TAKEOVER_WATCH_SECONDS = HEARTBEAT_STALE_SECONDS
# hosts' clocks may differ by up to this: an owner elsewhere is taken for gone without that watch
# only when its heartbeat is older than this plus HEARTBEAT_STALE_SECONDS on this host's clock
CLOCK_SKEW_LIMIT_SECONDS = 3600.0
KEEP_FINISHED_DAYS = 30  # node 0 removes finished tasks this many days old, once a day (0: never)
AUTO_SHUTDOWN_HARD_HOURS = None  # hours after which running tasks are stopped too (None: never)
DEFAULT_PRIORITY = 500  # priority given to tasks dropped into pending/ by hand
RELEASE_TIMEOUT_SECONDS = 30.0  # longest wait for keep-alive to free the GPUs before a task
# starts (at most 40: a claimed task not started 45 s after its claim is let go, and queued again)
STAGING_MAX_AGE_SECONDS = 86400.0  # leftover staging files and old replies are removed after this
WARNING_REPEAT_SECONDS = 60.0  # the same warning is logged at most once per this many seconds
MIN_WAIT_SECONDS = 0.02  # the loop never spins faster than this
COMMAND_CLOCK_SKEW_SECONDS = 30.0  # commands sent longer than this before the start are stale
CALLBACK_EXIT_WAIT_SECONDS = 10.0  # how long an exiting daemon waits for running callbacks
CLEANUP_GRACE_SECONDS = 10.0  # longest wait for leftovers of a task to exit before SIGKILL
KILL_WAIT_SECONDS = 2.0  # after a SIGKILL, how long the daemon waits for the processes to go
BEAT_BYTES = 128  # size of a node's beat file, rewritten in place
MAX_RECORD_BYTES = 4 * 1024 * 1024  # a record, command or state file larger than this is corrupt
MAX_HOURS = 24 * 365  # --hours beyond this is refused
MAX_TASK_ARGS = 4096  # a submit record with more script arguments is corrupt
TASK_CALLBACK = ""  # bash command run after each task ends (PM_TASK_* set), e.g. a chat webhook
CALLBACK_TIMEOUT_SECONDS = 60.0  # a callback still running after this is killed
MASTER_PORTS = (20000, 29499)  # MASTER_PORT range: below the ephemeral ports, short of 29500
PORT_REUSE_SECONDS = 3600.0  # a MASTER_PORT is not given to another task within this time
MAX_SKIPPED_SHOWN = 20  # skipped queue entries the state file names
SHARED_QUEUE = False  # True: the queue folder may be group-writable: the group can run code as you
SUMMARY_RECENT = 50  # finished tasks the summary lists (the newest ends), for gpu_status
SUMMARY_REFRESH_SECONDS = 60.0  # node 0 lists done/, failed/ and logs/ at least this often
SUMMARY_SETTLE_SECONDS = 0.05  # a folder changed this recently may change again in the same tick
OVERRIDE_FORGET_SECONDS = 60.0  # held/ and priority/ entries of tasks gone this long are removed
SUMMARY_BATCH = 1000  # finished tasks the summary takes in per turn (the first one reads them all)

# Keep-alive tuning (docs/keepalive.md explains each one)
KEEPALIVE_PERIOD = 0.025  # s, a worker's duty cycle: busy for duty x period, then idle
KEEPALIVE_TILE_MS = 4.0  # ms, length of one matmul tile, calibrated on each GPU
KEEPALIVE_MAX_IN_FLIGHT = 6  # tiles queued on a GPU at once: a stop waits for at most these
KEEPALIVE_START_DUTY = 0.75  # share of each period a new worker keeps the GPU busy
KEEPALIVE_UTIL_WINDOW = 1.5  # s of NVML utilisation samples that the controller averages
KEEPALIVE_HOLDOFF_SECONDS = 60.0  # s a GPU must stay free of foreign work before it is taken again
KEEPALIVE_HOLDOFF_MIN_SECONDS = 15.0  # the same after brief work: as long as it lasted, this least
KEEPALIVE_HEADROOM = 0.1  # share of each GPU's memory that keep-alive always leaves free
KEEPALIVE_FOREIGN_MEMORY_MIB = 256  # growth of memory not ours (MiB) that counts as foreign work
KEEPALIVE_FOREIGN_UTIL = 5  # % SM utilisation of a process not ours that counts as foreign work
KEEPALIVE_IDLE_MEMORY_MIB = 1536  # MiB a GPU may show used with nothing on it (the driver's share)
KEEPALIVE_FILLER = True  # during a queue task, top up GPUs that the task leaves idle
KEEPALIVE_FILLER_AFTER_SECONDS = 60.0  # s below GPU_UTIL_THRESHOLD during a task before filling
KEEPALIVE_FILLER_MIB = 1024  # MiB of matmul tiles the filler may use (it holds no ballast)
KEEPALIVE_RESUME_AFTER_TASK = 5.0  # s after a queue task ends before the GPUs are taken again
KEEPALIVE_RESTART_SECONDS = 5.0  # wait before restarting a crashed worker; doubles per crash
KEEPALIVE_RESTART_MAX_SECONDS = 300.0  # longest wait between restarts of a crashing worker
KEEPALIVE_ASSUME_DEFAULT_COMPUTE_MODE = False  # True: hold GPUs whose compute mode NVML can't read
KEEPALIVE_RISK_SECONDS = 180.0  # s a GPU may sit below the band before it is flagged at risk

MIB = 1024 * 1024
GIB = 1024 * MIB

PROTOCOL_VERSION = 2
JOB_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# set by the daemon for every task (TaskRunner._environment): a submit record cannot set them
TASK_VARS = frozenset({
    "JOB_ID", "TASK_NAME", "TASK_SHORT_NAME", "QUEUE_ROOT", "QUEUE_DIR", "TASK_LOG",
    "CUDA_DEVICE_ORDER", "CUDA_VISIBLE_DEVICES", "PM_GPUS", "TASK_GPUS", "PM_NODE_RANK",
    "NODE_RANK", "NNODES", "MASTER_ADDR", "MASTER_PORT", "PERPETUAL_MOTION_TASK"})
TASK_ID_RE = re.compile(r"^[0-9]{3}-[0-9]{8}_[0-9]{6}_[0-9]{9}-[0-9a-f]{8}-[A-Za-z0-9._-]{1,80}$")
RECORD_NAME_RE = re.compile(
    r"(.+)\.(submit|run|result|stop|gang|retried|rank[0-9]+\.(?:ready|run|result))")
LOG_NAME_RE = re.compile(r"(.+?)(?:\.rank[0-9]+)?\.log")
NO_INOTIFY_VAR = "PERPETUAL_MOTION_NO_INOTIFY"  # set: the daemon polls only, inotify unused
MARKER_VAR = "PERPETUAL_MOTION_TASK"  # every process of a task inherits MARKER_VAR=<job>/<id>
CALLBACK_VAR = "PERPETUAL_MOTION_CALLBACK"  # a task callback and all it starts: <job>/<id>
RESERVED_VARS = TASK_VARS | {CALLBACK_VAR}  # no submit record sets them (a callback is never swept)
KILL_SCOPES = ("auto", "user-python", "task", "none")
EXIT_FAILURE = 1  # the daemon cannot run: no psutil, an unwritable queue folder
EXIT_USAGE = 2  # bad arguments, bad JOB_ID
EXIT_ALREADY_RUNNING = 3  # a live daemon holds this instance and node
NAME_MAX = 255  # bytes in a file name (Linux's file systems, AFS and NFS alike)
QUEUE_DIRS = ("pending", "running", "done", "failed", "records", "logs", "commands", "replies",
              "nodes", "held", "priority", "names", ".staging")
DAEMON_PROCESS_NAME = "pm-daemon"  # every daemon and keep-alive worker names itself (prctl)
WORKER_PROCESS_NAME = "pm-worker"
FENCE_PROCESS_NAME = "pm-fence"  # the daemon's fence keeper (FenceKeeper)
LOG = logging.getLogger("perpetual_motion")

# Records ####################################################################################


def now_text(epoch: float) -> str:
    """A time for people: local time to the second (the number itself for a time no calendar
    holds: one read from a record may be ``1e300``)."""
    try:
        return datetime.datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, ValueError, OSError):
        return f"{epoch:.3f}"


def parse_fields(text: str) -> dict[str, str]:
    r"""Parse ``key=value`` lines; raise ValueError on a line that is neither that nor blank.

    Lines end at ``\n`` only: a value keeps every other character (``\r``, ``\f``, ``\x1c``,
    ``\x85``, U+2028 ...), where ``str.splitlines()`` would cut it.
    """
    fields: dict[str, str] = {}
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip(" \t\r") or line.startswith("#"):
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


_ASCII_FLOAT_RE = re.compile(
    r"[+-]?(?:[0-9]{1,30}(?:\.[0-9]{0,30})?|\.[0-9]{1,30})(?:[eE][+-]?[0-9]{1,3})?")


def as_float(value: str | None) -> float | None:
    """A finite decimal number written in ASCII (``12``, ``-1.5``, ``1e3``), else None: ``nan``,
    ``inf``, ``1e999`` and non-ASCII digits are no numbers (a ``sent=nan`` is no time)."""
    if value is None or not _ASCII_FLOAT_RE.fullmatch(value):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def error_text(exc: BaseException) -> str:
    """An error in a few words: ``No space left on device``, not ``[Errno 28] ...: 'path'``."""
    return getattr(exc, "strerror", None) or str(exc)


class TaskState(enum.Enum):
    DONE = "done"
    FAILED = "failed"
    STOPPED = "stopped"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"
    TIMEOUT = "timeout"  # stopped at the time limit it was submitted with

    @property
    def folder(self) -> str:
        return "done" if self is TaskState.DONE else "failed"


def duration_text(seconds: float) -> str:
    """A time limit for people: ``45s``, ``30m``, ``1h30m``, ``2d``, ``1d12h``."""
    rest, text = int(seconds), ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            text += f"{rest // size}{unit}"
            rest %= size
    return text or "0s"


def ascii_int(text: str | None, limit: int = 10**9) -> int | None:
    """A whole number written in ASCII digits (``str.isdigit`` accepts ``²``), or None."""
    if not text or not (text.isascii() and text.isdigit()) or len(text) > len(str(limit)):
        return None
    value = int(text)
    return value if value <= limit else None


@dataclasses.dataclass(frozen=True)
class Request:
    """What a task asks for: GPUs on each of its nodes and nodes; None means all of them."""

    gpus: int | None = None
    nodes: int | None = 1

    @classmethod
    def parse(cls, gpus: str = "", nodes: str = "") -> Request:
        """From the submit record's ``gpus`` and ``nodes``; ValueError when they are neither a
        whole number nor ``all``."""
        return cls(gpus=_count(gpus, "gpus", 0, default=None),
                   nodes=_count(nodes, "nodes", 1, default=1))

    @property
    def gang(self) -> bool:
        """True for a task that spans nodes (or may: ``nodes=all``)."""
        return self.nodes is None or self.nodes > 1

    def gpu_text(self) -> str:
        if self.gpus is None:
            return "all GPUs"
        return "no GPU" if self.gpus == 0 else f"{self.gpus} GPU{'s' if self.gpus > 1 else ''}"


def _count(text: str, key: str, minimum: int, default: int | None) -> int | None:
    text = text.strip()
    if text == "":
        return default
    if text == "all":
        return None
    value = ascii_int(text, limit=1_000_000)
    if value is None or value < minimum:
        raise ValueError(f"{key}={text[:20]!r} is neither 'all' nor a whole number from {minimum}")
    return value


@dataclasses.dataclass(frozen=True)
class Submission:
    """What the client recorded at submit time (``records/<id>.submit``); all optional.

    ``problem`` says why a record that exists could not be read: its task must not run (it
    would run in another directory, with other arguments).
    """

    cwd: str = ""
    source: str = ""
    command: str = ""
    submitted_by: str = ""
    display_name: str = ""
    request: Request = Request()
    after: tuple[str, ...] = ()  # ids that must have finished ``done`` first
    args: tuple[str, ...] = ()  # arguments to the script
    retry_of: str = ""
    time_limit: int | None = None  # seconds it may run before it is stopped as ``timeout``
    env: tuple[tuple[str, str], ...] = ()  # variables set for the task (gpu_submit -e)

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> Submission:
        """ValueError when a key that changes how the task runs cannot be read."""
        argc = _count(fields.get("argc", ""), "argc", 0, default=0)
        if argc is None or argc > MAX_TASK_ARGS:
            raise ValueError(f"argc={fields.get('argc')!r} is not a count of arguments")
        try:
            args = tuple(fields[f"arg.{i}"] for i in range(argc))
        except KeyError as exc:
            raise ValueError(f"argument {exc.args[0]} is missing") from None
        for i, arg in enumerate(args):
            if "\0" in arg:  # no argument of a process can hold one
                raise ValueError(f"arg.{i} holds a NUL byte")
        if "\0" in fields.get("cwd", ""):
            raise ValueError("cwd holds a NUL byte")
        envc = _count(fields.get("envc", ""), "envc", 0, default=0)
        if envc is None or envc > MAX_TASK_ARGS:
            raise ValueError(f"envc={fields.get('envc')!r} is not a count of variables")
        env = []
        for i in range(envc):
            name, sep, value = fields.get(f"env.{i}", "").partition("=")
            if not sep or not ENV_NAME_RE.fullmatch(name) or name in RESERVED_VARS:
                raise ValueError(f"env.{i} is not NAME=VALUE of a variable a task may set")
            if "\0" in value:
                raise ValueError(f"env.{i} holds a NUL byte")
            env.append((name, value))
        limit = fields.get("time_limit", "")
        time_limit = ascii_int(limit, limit=MAX_HOURS * 3600) if limit else None
        if limit and not time_limit:
            raise ValueError(f"time_limit={limit[:20]!r} is not a number of seconds")
        return cls(cwd=fields.get("cwd", ""), source=fields.get("source", ""),
                   command=fields.get("command", ""), submitted_by=fields.get("submitted_by", ""),
                   display_name=fields.get("display_name", ""),
                   request=Request.parse(fields.get("gpus", ""), fields.get("nodes", "")),
                   after=tuple(fields.get("after", "").split()), args=args,
                   retry_of=fields.get("retry_of", ""), time_limit=time_limit,
                   env=tuple(env))


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """How a task ended (``records/<id>.result``), or one rank of it (``.rank<R>.result``)."""

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
    gpus: str = ""  # the GPU numbers it had
    rank: int | None = None  # for one rank of a task that spans nodes
    extra: tuple[tuple[str, str], ...] = ()  # more keys: the ranks of a task that spans nodes
    found: float | None = None  # when an end that no daemon saw was found (``ended``: unseen_end)

    def fields(self) -> dict[str, object]:
        duration = "" if self.started is None else f"{self.ended - self.started:.3f}"
        fields: dict[str, object] = {
            "id": self.task_id, "state": self.state.value,
            "exit_code": "" if self.exit_code is None else self.exit_code,
            "signal": "" if self.signal is None else self.signal,
            "reason": self.reason,
            "started": "" if self.started is None else f"{self.started:.3f}",
            "ended": f"{self.ended:.3f}", "duration": duration,
            "host": self.host, "node_rank": self.node_rank, "attempt": self.attempt,
            "gpus": self.gpus,
        }
        if self.found is not None:
            fields["found"] = f"{self.found:.3f}"
        if self.rank is not None:
            fields["rank"] = self.rank
        fields.update(self.extra)
        return fields


def unseen_end(started: float | None, found: float, *known: float | None) -> float:
    """When a task ended whose end no daemon saw (its daemon died, or was suspended while its
    fence killed it; docs/protocol.md, Recovery): the last moment it is known to have run,
    the latest of ``known`` (its daemon's last beat or look at it, its log's last write),
    never before it started; ``found``, when its end was found, where nothing is known."""
    times = [t for t in known if t is not None]
    if not times:
        return found
    return max(times) if started is None else max(*times, started)


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
    gpus: int | tuple[int, ...] | None = None  # --gpus: a count or GPU numbers; None: NVML's
    node_addr: str = ""  # --node-addr: how other nodes reach this one; "": the host name
    callback: str = TASK_CALLBACK  # --callback: run after each task ends ("": none)
    shared: bool = SHARED_QUEUE  # --shared-queue: the group may write the queue folder
    launch: str = ""  # --launch: names the launch that started the job's daemons ("": unknown)

    def __post_init__(self) -> None:
        # the scope in force, resolved once: "auto" says where the daemon runs
        object.__setattr__(self, "kill_scope", resolve_kill_scope(self.kill_scope, os.environ))

    @property
    def instance(self) -> Path:
        return self.queue_root / self.job_id


class Throttle:
    """Whether a repeated message is said now: at most once per ``every`` seconds per key (or
    once only), on the clock given."""

    def __init__(self, every: float = WARNING_REPEAT_SECONDS,
                 timefunc: Callable[[], float] = time.monotonic):
        self.every = every
        self.timefunc = timefunc
        self._last: dict[str, float] = {}

    def __call__(self, key: str, every: float | None = None, once: bool = False) -> bool:
        now = self.timefunc()
        last = self._last.get(key)
        if last is not None and (once or now - last < (self.every if every is None else every)):
            return False
        self._last[key] = now
        return True


class ThrottledLog:
    """Log a repeated warning at most once per ``WARNING_REPEAT_SECONDS`` per key."""

    def __init__(self, clock: Callable[[], float]):
        self.throttle = Throttle(WARNING_REPEAT_SECONDS, clock)

    def warning(self, key: str, message: str, *args: object, **kwargs) -> None:
        if self.throttle(key):
            LOG.warning(message, *args, **kwargs)


# Records: the node's GPUs ###################################################################
#
# The inventory: the GPUs that this node's tasks are given, in the order of ``gpu.<i>`` in the
# state file. NVML finds them (within CUDA_VISIBLE_DEVICES, MIG devices left out); ``--gpus``
# restricts them, or declares slots where there is no NVML (the scheduler then runs without a
# GPU, and keep-alive stays off). Each GPU is named to tasks by its CUDA number: its place among
# the GPUs this process can open, in PCI bus order (tasks get CUDA_DEVICE_ORDER=PCI_BUS_ID).


@dataclasses.dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML numbers it (PCI bus order)."""

    index: int
    uuid: str
    name: str
    memory_total: int  # bytes
    mig: bool = False
    cuda_index: int | None = None  # its number in CUDA_VISIBLE_DEVICES (PCI_BUS_ID order)
    declared: bool = False  # a slot declared with --gpus where there is no NVML

    @property
    def number(self) -> int:
        """The number tasks see it by: its CUDA number, else NVML's index."""
        return self.index if self.cuda_index is None else self.cuda_index


@dataclasses.dataclass(frozen=True)
class Inventory:
    """The node's GPUs, with the NVML seam that found them (None: declared, or none at all)."""

    gpus: tuple[GpuInfo, ...]
    nvml: object | None = None
    why: str = ""  # why NVML is not in use, for keep-alive's "off: ..."
    nvml_error: str = ""  # why NVML could not start ("" when it did, or was not asked)
    kernel_gpus: int = 0  # NVIDIA GPUs the kernel shows, counted where NVML could not start

    @classmethod
    def declare(cls, numbers: Iterable[int], why: str = "declared slots", nvml_error: str = "",
                kernel_gpus: int = 0) -> Inventory:
        """Slots declared with ``--gpus`` where there is no NVML: nothing to hold or watch."""
        return cls(tuple(GpuInfo(n, "", "declared slot", 0, cuda_index=n, declared=True)
                         for n in numbers), None, why, nvml_error, kernel_gpus)

    @property
    def blind(self) -> bool:
        """NVML could not start on a node whose kernel shows NVIDIA GPUs: they are there, and
        keep-alive can neither hold nor watch them."""
        return bool(self.nvml_error and self.kernel_gpus)

    def numbers(self, positions: Iterable[int]) -> str:
        """``CUDA_VISIBLE_DEVICES`` for the GPUs at ``positions``: ``0,2``."""
        return ",".join(str(self.gpus[i].number) for i in sorted(positions))

    def all_numbers(self) -> str:
        """``CUDA_VISIBLE_DEVICES`` of every GPU here: ``0,1,2``."""
        return self.numbers(range(len(self.gpus)))


_MAX_GPUS = 1024  # GPUs of a node at most: what other nodes and the client read from a state file


def parse_gpu_list(text: str) -> int | tuple[int, ...]:
    """``--gpus``: a count (``4``) or a list of GPU numbers (``0,2,5``); ValueError if neither."""
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isascii() and p.isdigit() for p in parts):
        raise ValueError(f"--gpus takes a count or a list of GPU numbers, not {text!r}")
    numbers = tuple(int(p) for p in parts)
    if len(numbers) == 1 and "," not in text:
        if numbers[0] > _MAX_GPUS:
            raise ValueError(f"--gpus: a node has at most {_MAX_GPUS} GPUs, not {text!r}")
        return numbers[0]
    if max(numbers) >= _MAX_GPUS:
        raise ValueError(f"--gpus: GPU numbers go from 0 to {_MAX_GPUS - 1}, not {text!r}")
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"--gpus names a GPU twice: {text!r}")
    return numbers


def _visible_gpus(gpus: list[GpuInfo], visible: str | None) -> list[GpuInfo]:
    """The GPUs that CUDA_VISIBLE_DEVICES leaves to us: UUIDs (or their prefixes) or CUDA
    numbers; like CUDA, the list ends at the first entry that matches none."""
    if visible is None:
        return gpus
    chosen = []
    for entry in (e.strip() for e in visible.split(",")):
        if entry.isascii() and entry.isdigit():
            match = [g for g in gpus if g.number == int(entry)]
        elif entry.startswith(("GPU-", "MIG-")):
            match = [g for g in gpus if g.uuid.startswith(entry)]
            if entry.startswith("MIG-"):
                return chosen  # MIG instances: skipped
        else:
            match = []
        if len(match) != 1:
            break
        chosen.append(match[0])
    return chosen


def kernel_gpus(root: Path = Path("/")) -> int:
    """How many NVIDIA GPUs the kernel shows, NVML aside: the driver's entries under
    /proc/driver/nvidia/gpus (one per PCI device; a container gets its own), else the device
    files /dev/nvidia<N> (a GPU proxy's sandbox may have only these); 0 where neither is."""
    try:
        return len(list((root / "proc/driver/nvidia/gpus").iterdir()))
    except OSError:
        pass
    try:
        return sum(1 for p in (root / "dev").iterdir() if re.fullmatch(r"nvidia\d+", p.name))
    except OSError:
        return 0


def discover_gpus(declared: int | tuple[int, ...] | None, log: logging.Logger,
                  env: Mapping[str, str] = os.environ,
                  open_nvml: Callable[[logging.Logger], object] | None = None,
                  kernel: Callable[[], int] = kernel_gpus) -> Inventory:
    """The node's GPUs; ValueError when ``--gpus`` asks for GPUs that are not there."""
    if declared == 0 or declared == ():  # a daemon for CPU tasks: the node's GPUs are not its own
        return Inventory.declare((), "no GPUs (--gpus 0)")
    error, seen = "", 0
    try:
        nvml = (open_nvml or Nvml.open)(log)
        found = nvml.gpus()
    except NvmlUnavailable as exc:
        nvml, found, why, error = None, [], str(exc), str(exc)
        seen = kernel()
        if seen:  # a driver fault, not a node without GPUs: say what is left unwatched
            error = f"NVML cannot start ({exc.__cause__ or exc})"
            why = (f"{error}, though the kernel shows {seen} NVIDIA GPU(s): neither held nor "
                   "watched (NVML is asked again every minute)")
    else:
        why = ""
        # CUDA numbers the GPUs it can open; a GPU NVML cannot query (another job's, under
        # cgroups) is not among them. With CUDA_DEVICE_ORDER=PCI_BUS_ID the order is NVML's.
        # The default, FASTEST_FIRST, puts faster models first: on a node of one model that is
        # the PCI bus order too, on a mixed node it may not be. Workers and tasks are given
        # PCI_BUS_ID (workers also the UUID), so only numbers in our own CUDA_VISIBLE_DEVICES
        # can be read otherwise than the process that set them meant.
        found = [dataclasses.replace(g, cuda_index=n) for n, g in enumerate(found)]
        order = env.get("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
        visible = env.get("CUDA_VISIBLE_DEVICES")
        numeric = visible is not None and any(e.strip().isdigit() for e in visible.split(","))
        if numeric and order != "PCI_BUS_ID" and len({g.name for g in found}) > 1:
            log.warning("CUDA_VISIBLE_DEVICES=%s is read in PCI bus order (as nvidia-smi "
                        "numbers GPUs), but CUDA_DEVICE_ORDER=%s may number this node's mixed "
                        "GPU models otherwise: set CUDA_DEVICE_ORDER=PCI_BUS_ID or use UUIDs",
                        visible, order)
        found = _visible_gpus(found, visible)
        for gpu in found:
            if gpu.mig:
                log.info("GPU %d (%s) is in MIG mode: left out", gpu.index, gpu.name)
        found = [g for g in found if not g.mig]
        if not found:
            why = "no GPU visible" if visible is None or visible.strip() not in ("", "-1") \
                else "CUDA_VISIBLE_DEVICES is empty"
    if declared is None:
        return Inventory(tuple(found), nvml, why, error, seen)
    if nvml is None or not found:
        numbers = range(declared) if isinstance(declared, int) else declared
        if why and not seen:
            log.info("GPUs declared with --gpus: %s", why)
        return Inventory.declare(numbers, f"declared slots: {why}" if seen else
                                 "declared slots (no NVML)" if nvml is None
                                 else "declared slots (no GPU visible)", error, seen)
    if isinstance(declared, int):
        if declared > len(found):
            raise ValueError(f"--gpus {declared}: this node has {len(found)} GPU(s)")
        return Inventory(tuple(found[:declared]), nvml, why)
    by_number = {g.number: g for g in found}
    missing = [n for n in declared if n not in by_number]
    if missing:
        raise ValueError(f"--gpus names GPU(s) {missing} that are not here (there are "
                         f"{', '.join(str(n) for n in sorted(by_number))})")
    return Inventory(tuple(by_number[n] for n in declared), nvml, why)


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
    """A task id for a file dropped into pending/ by hand (the client names its own). Like the
    client, it works on bytes: a character outside ``A-Za-z0-9._-`` becomes one ``_`` per byte."""
    raw = name.encode("utf-8", "surrogateescape")
    safe = re.sub(rb"[^A-Za-z0-9._-]", b"_", raw).decode("ascii")[-80:] or "task"
    return f"{priority:03d}-{unique_name()}-{safe}"


def short_name(task_id: str) -> str:
    """The ``name`` part of a task id (``train.sh``), or the id itself for other names."""
    return task_id.split("-", 3)[3] if TASK_ID_RE.fullmatch(task_id) else task_id


def user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"


class NotOwned(OSError):
    """A queue file of another user where only the daemon's user (or root) may write: never
    read (a record of someone else could run the daemon's user's tasks elsewhere, with other
    arguments or variables)."""


class NotRegularFile(OSError):
    """A queue file that is a symbolic link, FIFO, directory, socket or device: never opened
    (a FIFO blocks a reader for ever; a link could lead the daemon to anybody's file)."""


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a device"


def regular_file(path: Path) -> bool:
    """True when ``path`` itself (not a link's target) is a regular file."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def exists(path: Path) -> bool:
    """``path.exists()``, but False for a name too long to be a file's (an id in a record, or
    an entry put there by hand, that ``<id>.result`` cannot be named after): no such file is
    there. Other errors are raised, as they prove nothing."""
    try:
        return path.exists()
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            return False
        raise


def open_regular(path: Path, flags: int, mode: int = 0o600,
                 owners: Callable[[int], bool] | None = None) -> int:
    """Open a queue file as a descriptor, never following a symbolic link and never blocking on
    a FIFO: a regular file's descriptor, else NotRegularFile (or the OSError of the open), or
    NotOwned when ``owners`` says no to its owner."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.ENODEV, errno.EOPNOTSUPP):
            try:
                mode = os.lstat(path).st_mode
            except OSError:
                raise exc from None
            if not stat.S_ISREG(mode):
                raise NotRegularFile(errno.EINVAL, f"{_kind(mode)}, not a regular file",
                                     str(path)) from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(errno.EINVAL, f"{_kind(info.st_mode)}, not a regular file",
                                 str(path))
        if owners is not None and not owners(info.st_uid):
            raise NotOwned(errno.EPERM, f"owned by {user_name(info.st_uid)}, not by the "
                           "daemon's user", str(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


_LISTING_REUSE_SECONDS = 5.0  # longest a folder's listing is reused while its stat stands still


class QueueFiles:
    """The files of one instance folder ``<root>/<JOB_ID>/``, read and written safely: its
    folders made, files published the Maildir way, records read, entries listed.

    It never follows a symbolic link and never opens a FIFO or a device inside the folder:
    whoever can write ``pending/`` can run code as the daemon's user, but must get no more.
    As ssh's StrictModes, it trusts a folder only when no other user can write it (its group
    neither, unless ``shared``), and a file only when the daemon's user (or root) owns it
    (anybody of the group, when ``shared``). What it creates only the owner can read, unless
    ``shared``: then the group reads files and writes folders.
    """

    def __init__(self, instance: Path, shared: bool = False):
        self.root = instance
        self.shared = shared
        self.uid = os.geteuid()
        self.file_mode = 0o640 if shared else 0o600
        self.skipped: set[str] = set()  # entries not regular files, warned about once each
        self.refused: dict[str, dict[str, str]] = {}  # folder -> entry -> why it is skipped
        # folder -> (its stat before it was last listed, when, what files() found)
        self.listed: dict[str, tuple[tuple[int, ...], float, list[str]]] = {}
        self.monotonic: Callable[[], float] = time.monotonic  # (the age of those listings)
        self.last_pending: PendingQueue | None = None  # pending/ as read_pass last read it

    def trusted(self, uid: int) -> bool:
        """Whether a file owned by ``uid`` may be read as a task, record or command."""
        return self.shared or uid in (self.uid, 0)

    def unsafe(self) -> str | None:
        """Why the instance cannot be trusted (a folder of it that another user owns or may
        write, where tasks, records or commands lie), or None. A stat per folder: cheap."""
        me = user_name(self.uid)
        for path in (self.root, *(self.dir(name) for name in QUEUE_DIRS)):
            try:
                info = os.lstat(path)
                if path == self.root and stat.S_ISLNK(info.st_mode):
                    # The instance may be a link (to another file system, say), of its own
                    # user's: one that another user made, they can point elsewhere later.
                    if info.st_uid not in (self.uid, 0):
                        return (f"{path} is a symbolic link owned by "
                                f"{user_name(info.st_uid)}, not by {me}: its owner could "
                                "point it elsewhere; use a folder of your own")
                    info = os.stat(path)
            except OSError:
                continue  # missing: created again (or its folder is missing)
            if stat.S_ISLNK(info.st_mode):  # (its target may be anybody's)
                return f"{path} is a symbolic link, not a folder of the instance"
            if not stat.S_ISDIR(info.st_mode):
                continue  # a file where a folder belongs holds nothing: it cannot be listed
            if info.st_uid not in (self.uid, 0):
                return (f"{path} is owned by {user_name(info.st_uid)}, not by {me}: whoever "
                        f"owns it can run code as {me}; use a folder of your own")
            mode = stat.S_IMODE(info.st_mode)
            if mode & stat.S_IWOTH:
                return (f"{path} is writable by every user (mode {mode:04o}): anyone could "
                        f"run code as {me}; chmod o-w it")
            if mode & stat.S_IWGRP and not self.shared:
                return (f"{path} is writable by the group {group_name(info.st_gid)} (mode "
                        f"{mode:04o}): everyone in it could run code as {me}; chmod g-w it, "
                        "or let the group share the queue (--shared-queue)")
        return None

    def trusted_file(self, path: Path) -> bool:
        """Whether ``path`` is a regular file that the daemon may trust (``trusted``)."""
        try:
            info = os.lstat(path)
        except OSError:
            return False
        return stat.S_ISREG(info.st_mode) and self.trusted(info.st_uid)

    def skipped_entries(self) -> list[str]:
        """``<folder>/<name>: why`` of every entry skipped in the last look at its folder."""
        return [f"{folder}/{name}: {why}" for folder, entries in sorted(self.refused.items())
                for name, why in sorted(entries.items())]

    def dir(self, name: str) -> Path:
        return self.root / name

    def create(self, job_id: str) -> None:
        """Create the folders and control.json, and check that a file can be written there;
        OSError when not (a full disk, a quota, a read-only mount)."""
        self.ensure(strict=True)
        if not (self.root / "control.json").exists():
            marker = {"protocol": PROTOCOL_VERSION, "job_id": job_id}
            self.publish(self.root / "control.json", json.dumps(marker, indent=2) + "\n")
        self.check_writable()

    def check_writable(self) -> None:
        """Write, fsync, close and remove a small file in ``.staging/``; OSError when one of
        them fails (AFS and NFS report a full disk or quota only at close)."""
        probe = self.dir(".staging") / f".probe-{unique_name()}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                os.write(fd, b"probe\n" * 16)
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(probe)

    def ensure(self, strict: bool = False) -> list[str]:
        """Create the queue folders that are missing (deleted by hand, say); their names. A
        folder that cannot be created is left for later, unless ``strict`` (at the start)."""
        made = []
        for name in QUEUE_DIRS:
            if not self.dir(name).is_dir():
                try:
                    for folder in (self.root, self.dir(name)):
                        if not folder.is_dir():
                            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
                            if self.shared:  # the group writes, and new files are the group's
                                os.chmod(folder, 0o2770)
                except OSError:
                    if strict:
                        raise
                    continue
                made.append(name)
        return made

    def publish(self, target: Path, text: str, durable: bool = True,
                still: Callable[[], bool] = lambda: True) -> bool:
        """Write ``text`` to ``target`` the Maildir way: staged, fsynced, closed, renamed.
        ``durable=False`` skips the fsync, for files rewritten every few seconds anyway.
        ``still()`` is asked once the file is written, just before the rename: when it says
        False (the write took long on stalled storage, and what it was for is void now),
        nothing is published and the result is False."""
        staged = self.dir(".staging") / f".{unique_name()}.{target.name[:60]}"
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self.file_mode)
        try:
            try:
                data = memoryview(text.encode("utf-8", "surrogateescape"))  # bytes as read
                while data:
                    data = data[os.write(fd, data):]
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)  # AFS and NFS report a full disk or quota here
            if not still():
                os.unlink(staged)
                return False
            os.rename(staged, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(staged)
            raise
        return True

    def beat_path(self, rank: int) -> Path:
        return self.dir("nodes") / f"node-{rank}.beat"

    def state_path(self, rank: int) -> Path:
        """``nodes/node-<rank>.state``: what the daemon of that node publishes."""
        return self.dir("nodes") / f"node-{rank}.state"

    def write_beat(self, rank: int, text: str) -> None:
        """Rewrite a node's beat file in place: the same BEAT_BYTES bytes over the old ones,
        which needs no new block, so the beat goes on when the disk is full. Created (the
        Maildir way) only when it is missing or not BEAT_BYTES long."""
        data = text.encode().ljust(BEAT_BYTES)
        if len(data) > BEAT_BYTES:
            raise ValueError("a beat is longer than BEAT_BYTES")
        path = self.beat_path(rank)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError) and regular_file(path):
                raise
            # missing, or a link, FIFO or socket at its name: replaced (a folder cannot be)
            self.publish(path, data.decode(), durable=False)
            return
        try:
            info = os.fstat(fd)
            in_place = stat.S_ISREG(info.st_mode) and info.st_size == BEAT_BYTES
            if in_place:
                os.pwrite(fd, data, 0)
        finally:
            os.close(fd)  # AFS and NFS report a failed write here
        if not in_place:
            self.publish(path, data.decode(), durable=False)

    def read_beat(self, rank: int) -> str:
        """A node's beat file as it is now ("" when it is missing or unreadable)."""
        try:
            fd = open_regular(self.beat_path(rank), os.O_RDONLY)
        except OSError:
            return ""
        try:
            return os.read(fd, BEAT_BYTES).decode(errors="replace").strip()
        except OSError:
            return ""
        finally:
            os.close(fd)

    def read_fields(self, path: Path) -> dict[str, str] | None:
        """A record's fields; None when it is missing; ValueError/OSError when it is bad (too
        large, not key=value, or not a regular file: NotRegularFile)."""
        try:
            fd = open_regular(path, os.O_RDONLY, owners=self.trusted)
        except FileNotFoundError:
            return None
        with open(fd, "rb") as f:
            data = f.read(MAX_RECORD_BYTES + 1)
        if len(data) > MAX_RECORD_BYTES:
            raise ValueError(f"larger than {MAX_RECORD_BYTES} bytes")
        return parse_fields(data.decode("utf-8", "surrogateescape"))  # every byte kept

    def open_log(self, path: Path):
        """A task's log, opened to append (created when missing); OSError when it cannot be,
        NotRegularFile when a link, FIFO or directory sits at its name."""
        fd = open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, self.file_mode,
                          owners=self.trusted)
        return open(fd, "ab", buffering=0)

    def names(self, folder: str, missing_ok: bool = True) -> list[str]:
        """Published entries of a folder in run order (dot-names are staging, never listed).

        A missing folder reads as empty, unless ``missing_ok`` is False (then it is no proof
        that the folder holds nothing); any other OSError is raised for the caller to report.
        """
        try:
            with os.scandir(self.dir(folder)) as entries:
                return sorted(e.name for e in entries if not e.name.startswith("."))
        except FileNotFoundError:
            if not missing_ok:
                raise
            return []

    def files(self, folder: str) -> list[str]:
        """Like names(), but only regular files the daemon's user owns (``trusted``): a link,
        FIFO, directory or device in the folder, or a file of another user, is skipped, with
        one warning for each (tasks and commands are files), and reported (``refused``).

        A folder whose own stat (modification and change times, inode) is as it was before
        it was last listed, less than ``_LISTING_REUSE_SECONDS`` ago, has the same entries:
        that listing is given again, and a pending/ of thousands of tasks costs a stat, not
        thousands, per poll. (A file system that keeps times in whole seconds may change a
        folder twice within one: such a change shows within that many seconds.)"""
        try:
            info = os.stat(self.dir(folder))
            key: tuple[int, ...] | None = (info.st_dev, info.st_ino, info.st_mtime_ns,
                                           info.st_ctime_ns)
        except OSError:
            key = None
        last = self.listed.pop(folder, None)
        now = self.monotonic()
        if key is not None and last is not None and last[0] == key \
                and now - last[1] < _LISTING_REUSE_SECONDS:
            self.listed[folder] = last
            return list(last[2])
        found = []
        self.refused[folder] = {}
        try:
            with os.scandir(self.dir(folder)) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    try:
                        info = entry.stat(follow_symlinks=False)
                        if stat.S_ISREG(info.st_mode) and self.trusted(info.st_uid):
                            found.append(entry.name)
                            continue
                        why = f"{_kind(info.st_mode)}, not a regular file" \
                            if not stat.S_ISREG(info.st_mode) else \
                            f"owned by {user_name(info.st_uid)}, not by the daemon's user"
                    except FileNotFoundError:
                        continue
                    except OSError as exc:
                        why = error_text(exc)
                    self.skip(folder, entry.name, why)
        except FileNotFoundError:
            return []
        found.sort()
        if key is not None:
            self.listed[folder] = (key, now, found)
        return list(found)

    def skip(self, folder: str, name: str, why: str) -> None:
        """An entry of ``folder`` that is left where it is, untouched: reported in the state
        file (``refused``, until the folder is listed again) and warned about once."""
        self.refused.setdefault(folder, {})[name] = why
        if f"{folder}/{name}" not in self.skipped:
            self.skipped.add(f"{folder}/{name}")
            LOG.warning("[%s] skipping %s: %s", folder, name, why)

    def open_dir(self, folder: str) -> int:
        """A descriptor of a folder of the instance, never through a symbolic link: what is
        removed through it is removed there, whatever the folder's path comes to name.
        OSError when it cannot be opened (missing, a link)."""
        return os.open(self.dir(folder), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)

    def remove_old(self, folder: str, now: float, max_age: float) -> int:
        """Remove the files of ``folder`` older than ``max_age``; how many."""
        removed = 0
        try:
            fd = self.open_dir(folder)
        except OSError:
            return 0
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    try:
                        if entry.is_file(follow_symlinks=False) and \
                                now - entry.stat(follow_symlinks=False).st_mtime > max_age:
                            os.unlink(entry.name, dir_fd=fd)
                            removed += 1
                    except OSError:
                        continue
        except OSError:
            pass
        finally:
            os.close(fd)
        return removed


class QueueFolder(QueueFiles):
    """The one place that knows the layout of ``<root>/<JOB_ID>/`` (docs/protocol.md): over
    its files (QueueFiles), the records of a task, its moves between folders, what a pass
    of the queue reads, and the removal of finished tasks."""

    def record(self, task_id: str, kind: str, rank: int | None = None) -> Path:
        """``records/<id>.<kind>``, or ``records/<id>.rank<R>.<kind>`` for one rank."""
        middle = "" if rank is None else f"rank{rank}."
        return self.dir("records") / f"{task_id}.{middle}{kind}"

    def publish_stop(self, task_id: str, reason: str, sent_by: str, now: float) -> None:
        """Publish ``records/<id>.stop`` (once): whichever node runs the task stops it."""
        path = self.record(task_id, "stop")
        if not path.exists():
            self.publish(path, format_fields({"id": task_id, "reason": reason,
                                              "sent_by": sent_by, "time": f"{now:.3f}"}))

    def stop_reason(self, task_id: str) -> str | None:
        """The reason in ``records/<id>.stop``, or None when there is none (a stop record that
        cannot be read is still a stop)."""
        try:
            fields = self.read_fields(self.record(task_id, "stop"))
        except (OSError, ValueError):
            return "stopped by user"
        return None if fields is None else (fields.get("reason") or "stopped by user")

    def drained(self, rank: int | None = None) -> str | None:
        """Why the instance (``drain``), or node ``rank`` of it (``drain.node-<rank>``), is
        drained by gpu_drain: its tasks go on and nothing new starts there; None when it is not.
        A drain file that cannot be read still drains."""
        try:
            fields = self.read_fields(self.root / ("drain" if rank is None else
                                                   f"drain.node-{rank}"))
        except (OSError, ValueError):
            return "drained"
        if fields is None:
            return None
        by, reason = fields.get("by", ""), fields.get("reason", "")
        return "drained" + (f" by {by}" if by else "") + (f": {reason}" if reason else "")

    def log(self, task_id: str, rank: int | None = None) -> Path:
        return self.dir("logs") / (f"{task_id}.log" if rank is None else
                                   f"{task_id}.rank{rank}.log")

    def log_written(self, task_id: str, rank: int | None = None) -> float | None:
        """When a task's (or rank's) log was last written, on the clock of the daemon that ran
        it: the log's modification time (the storage's clock) less how far ahead that clock
        was when the daemon published the run record (its own modification time against its
        ``started``). None when it cannot be told."""
        run_path = self.record(task_id, "run", rank)
        try:
            run = self.read_fields(run_path) or {}
            published = os.stat(run_path, follow_symlinks=False).st_mtime
            log = os.stat(self.log(task_id, rank), follow_symlinks=False)
        except (OSError, ValueError):
            return None
        started = as_float(run.get("started"))
        if started is None or not stat.S_ISREG(log.st_mode):
            return None
        return log.st_mtime - (published - started)

    def last_beat(self, rank: int, daemon: str) -> float | None:
        """When the daemon whose ``started`` is ``daemon`` last beat on node ``rank``, on its
        clock: the later of its state file's ``heartbeat`` and its beat file's ``time``, each
        while it still names that daemon; None when neither does (or cannot be read)."""
        times = []
        with contextlib.suppress(OSError, ValueError):
            state = self.read_fields(self.state_path(rank)) or {}
            if state.get("started") == daemon:
                times.append(as_float(state.get("heartbeat")))
        with contextlib.suppress(ValueError):
            beat = parse_fields(self.read_beat(rank))
            if beat.get("started") == daemon:
                times.append(as_float(beat.get("time")))
        known = [t for t in times if t is not None]
        return max(known) if known else None

    def has_result(self, task_id: str) -> bool:
        return exists(self.record(task_id, "result"))

    def in_finished(self, task_id: str) -> bool:
        """Whether the task is in done/ or failed/: its end is recorded, by whichever daemon."""
        return any(exists(self.dir(folder) / task_id) for folder in ("done", "failed"))

    def id_for(self, name: str) -> str:
        """The id a pending entry runs (or is cancelled) under: its name when that is a client
        id of no other task (without a result, and in none of running/, done/ and failed/);
        else a fresh id with its priority and name, so that a hand-dropped ``train.sh``, a
        finished task renamed back or a copy of a running one never collides with an earlier
        run (a claim under the id of a running task would replace it in running/)."""
        if TASK_ID_RE.fullmatch(name) and not self.has_result(name) \
                and not (self.dir("running") / name).exists() and not self.in_finished(name):
            return name
        priority = ascii_int(name[:3])
        return task_id_for(short_name(name), DEFAULT_PRIORITY if priority is None else priority)

    # -- a task's moves between folders (docs/protocol.md, Claim and run) --------------------

    def claim(self, name: str) -> str:
        """Rename ``pending/<name>`` into running/ under its id (``id_for``); the id. OSError
        when it cannot be (FileNotFoundError: another claimant took it, or it was cancelled)."""
        task_id = self.id_for(name)
        os.rename(self.dir("pending") / name, self.dir("running") / task_id)
        return task_id

    def unclaim(self, task_id: str) -> None:
        """Put a claimed task that has not started back into pending/; OSError when not."""
        os.rename(self.dir("running") / task_id, self.dir("pending") / task_id)

    def cancel(self, name: str) -> str:
        """Move ``pending/<name>`` to failed/ under its id (never an existing task's); the id.
        OSError when it cannot be (FileNotFoundError: it is not pending any more)."""
        task_id = self.id_for(name)
        os.rename(self.dir("pending") / name, self.dir("failed") / task_id)
        return task_id

    def finish(self, task_id: str, source: str, folder: str) -> None:
        """Move a task from ``source`` (running/, or pending/ for one that never started) to
        its end's folder (done/ or failed/); OSError when not (FileNotFoundError: not there)."""
        os.rename(self.dir(source) / task_id, self.dir(folder) / task_id)

    def remove_record(self, task_id: str, kind: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.record(task_id, kind))

    # -- what a pass of the queue reads ----------------------------------------------------

    def is_held(self, name: str) -> bool:
        """Whether ``held/<name>`` holds the task (gpu_hold; another user's holds nothing)."""
        return self.trusted_file(self.dir("held") / name)

    def has_task(self, task_id: str) -> bool:
        """Whether a task is anywhere in the queue, looked for so that a task moving on
        meanwhile (claimed, finished, on another node) cannot escape: its submit record, which
        never moves, then the folders in the order a task passes them, then its result."""
        if exists(self.record(task_id, "submit")):
            return True
        for folder in ("pending", "running", "done", "failed"):
            if exists(self.dir(folder) / task_id):
                return True
        return exists(self.record(task_id, "result"))

    def submission(self, name: str) -> Submission | str:
        """A pending task's submit record (none: a Submission of defaults), or why it cannot
        be read."""
        try:
            fields = self.read_fields(self.record(name, "submit"))
            return Submission.from_fields(fields) if fields else Submission()
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                return Submission()  # (a name too long for a record has none)
            return f"unreadable submit record: {error_text(exc)}"
        except (ValueError, UnicodeError) as exc:
            return f"unreadable submit record: {error_text(exc)}"

    def priorities(self, pending: Collection[str]) -> dict[str, dict[str, str]]:
        """``priority/<id>`` of the pending tasks that have one (gpu_priority)."""
        found = {}
        for name in self.files("priority"):
            if name in pending:
                try:
                    found[name] = self.read_fields(self.dir("priority") / name) or {}
                except (OSError, ValueError):
                    continue
        return found

    def read_pass(self, node: PassSnapshot, running: Collection[str],
                  requests: dict[str, Submission | str],
                  results: dict[str, str]) -> PassSnapshot:
        """One pass's snapshot: ``node`` (what the node knows: the time, its load, the node
        views, its own drain) with the queue added: pending/ and each task's submit record,
        held/, priority/, the state of each task a pending task comes after (its result's; or
        queued, when it has none yet and is in ``running`` or anywhere in the queue), and for
        node 0, when a pending task spans nodes, the drains of the other nodes. ``requests``
        and ``results`` are the caller's caches of what never changes once published, by
        pending name and by id; ``requests`` is kept to the pending tasks."""
        names = self.files("pending")
        queue = self.last_pending
        # (the caller drops a name from ``requests`` to have its record read again)
        if queue is None or queue.names != names or len(requests) != len(names):
            queue = self.last_pending = PendingQueue.read(names, requests, self.submission)
        held = frozenset(self.files("held"))  # (another user's entry holds nothing)
        priority = self.priorities(queue.listed)
        present = queue.listed | set(running)
        found: dict[str, str] = {}
        queued: set[str] = set()
        for dep in queue.after:
            if dep not in results:
                try:
                    fields = self.read_fields(self.record(dep, "result"))
                except (OSError, ValueError):
                    fields = None
                if fields is not None:
                    results[dep] = fields.get("state", "?")
            if dep in results:
                found[dep] = results[dep]
            elif dep in present or self.has_task(dep):
                queued.add(dep)
        drains = dict(node.node_drains)
        if node.leader and queue.gang:
            for rank in range(node.num_nodes):
                why = None if rank == node.node_rank else self.drained(rank)
                if why is not None:
                    drains[rank] = why
        return dataclasses.replace(node, pending=queue.pending, held=held, priority=priority,
                                   results=found, queued=frozenset(queued), node_drains=drains)

    def named_by_pending(self) -> set[str]:
        """The ids that pending tasks name in ``after``: their results must stay."""
        named: set[str] = set()
        for name in self.files("pending"):
            try:
                fields = self.read_fields(self.record(name, "submit")) or {}
            except (OSError, ValueError, UnicodeError):
                continue
            named.update(fields.get("after", "").split())
        return named

    def remove_finished(self, before: float) -> list[str]:
        """Remove the finished tasks that ended before ``before`` (when their result was
        published, else the file's own time, as gpu_clean judges) and that no pending task
        names in ``after``: the file in done/ or failed/, then every record and log of each one
        removed. Their ids."""
        removed: set[str] = set()
        needed = self.named_by_pending()
        fds: dict[str, int] = {}
        try:
            for folder in ("done", "failed", "records", "logs"):
                with contextlib.suppress(FileNotFoundError):  # (a link: nothing is removed)
                    fds[folder] = self.open_dir(folder)
            for folder in ("done", "failed"):
                for task_id in self.names(folder) if folder in fds else []:
                    if task_id in needed:
                        continue
                    try:
                        try:
                            ended = os.lstat(f"{task_id}.result",
                                             dir_fd=fds["records"]).st_mtime
                        except (FileNotFoundError, KeyError):
                            ended = os.lstat(task_id, dir_fd=fds[folder]).st_mtime
                        if ended < before:  # (gone already: renamed back into pending/, say)
                            os.unlink(task_id, dir_fd=fds[folder])
                            removed.add(task_id)
                    except OSError:
                        continue
            for folder, pattern in (("records", RECORD_NAME_RE), ("logs", LOG_NAME_RE)):
                for name in self.names(folder) if removed and folder in fds else []:
                    match = pattern.fullmatch(name)
                    if match and match.group(1) in removed:
                        with contextlib.suppress(OSError):
                            os.unlink(name, dir_fd=fds[folder])
        except OSError:
            pass
        finally:
            for fd in fds.values():
                os.close(fd)
        return sorted(removed)


# Finished tasks: the summary ###############################################################


@dataclasses.dataclass(frozen=True)
class Finished:
    """A finished task as the summary knows it: its folder, when it ended, the names it has."""
    task_id: str
    folder: str
    ended: float
    keys: tuple[str, ...]


def name_keys(task_id: str, display: str) -> tuple[str, ...]:
    """The names a task is looked up by (docs/protocol.md, Naming a task): its name part, that
    without its extension, and its --name; those that can be a file name in names/."""
    short = short_name(task_id)
    keys = dict.fromkeys((short, short.rpartition(".")[0] if "." in short else short, display))
    return tuple(k for k in keys if k and not k.startswith(".") and "/" not in k
                 and "\n" not in k and "\0" not in k and len(os.fsencode(k)) <= 200)


def name_bucket(key: str) -> str:
    """The file in names/ that lists the tasks of name ``key``: the last two bytes of the name
    without its extension, each one outside ``A-Za-z0-9_-`` as ``_`` (so ``train.sh`` and
    ``train`` share ``in``); a shell finds it without starting a process."""
    stem = key.rpartition(".")[0] if "." in key else key
    return re.sub(rb"[^A-Za-z0-9_-]", b"_", os.fsencode(stem)[-2:]).decode()


def start_order(name: str, priority: Mapping[str, dict[str, str]]) -> tuple:
    """Where a pending entry stands in the run order: by its priority (the id's, unless
    ``priority/<id>`` gives another), then by its id; those put on top (``priority=top``) first,
    the one put there last first; a name put there by hand has DEFAULT_PRIORITY."""
    fields = priority.get(name)
    value = fields.get("priority", "") if fields else ""
    if value == "top":
        return (0, -(as_float(fields.get("time")) or 0.0), 0, name)
    number = ascii_int(value, 999) if value else None
    if not TASK_ID_RE.fullmatch(name):  # put there by hand: after the client ids of its priority
        return (1, 0.0, DEFAULT_PRIORITY if number is None else number, "~" + name)
    return (1, 0.0, int(name[:3]) if number is None else number, name[4:])


def run_order_key(task_id: str) -> tuple[int, str]:
    """Submitted first, first: by the time in a client id; other names after them."""
    return (0, task_id[4:]) if TASK_ID_RE.fullmatch(task_id) else (1, task_id)


class History:
    """Node 0's cache of the finished tasks: ``summary`` and ``names/`` (docs/protocol.md,
    The summary), so that the client reads a few small files however long the history is.

    The folders stay the truth. Each listing notes the modification times of done/, failed/ and
    logs/ taken before it, and the summary publishes them: a reader trusts the summary only while
    the folders still have those times. A folder that changed within ``SUMMARY_SETTLE_SECONDS``
    of the listing may change again within the same clock tick, unseen: its time is then left
    empty (the summary is not trusted) and the folder is listed again on the next turn.
    """

    FOLDERS = ("done", "failed", "logs")

    def __init__(self, folder: QueueFolder, clock: Callable[[], float] = time.time):
        self.folder = folder
        self.clock = clock
        self.stamps: dict[str, str] = {}  # folder -> modification time at the last listing
        self.settled = False
        self.listed_at = -math.inf
        self.tasks: dict[str, Finished] = {}
        self.logs = 0
        self.by_bucket: dict[str, set[tuple[str, str]]] = {}  # bucket -> (name, id)
        self.published: dict[str, str] | None = None  # names/ as written; None: not read yet
        self.backlog: list[tuple[str, str]] = []  # finished tasks listed, not taken in yet
        self.unpublished: set[str] = set()  # buckets of names/ to write again

    def _stamp(self, name: str) -> tuple[str, float]:
        try:
            ns = os.stat(self.folder.dir(name)).st_mtime_ns
        except OSError:
            return "", math.inf
        return f"{ns // 10**9}.{ns % 10**9:09d}", ns / 1e9

    def _finished(self, task_id: str, folder: str) -> Finished:
        try:
            ended = os.lstat(self.folder.record(task_id, "result")).st_mtime
        except OSError:
            try:
                ended = os.lstat(self.folder.dir(folder) / task_id).st_mtime
            except OSError:
                ended = 0.0
        try:
            display = (self.folder.read_fields(self.folder.record(task_id, "submit"))
                       or {}).get("display_name", "")
        except (OSError, ValueError):
            display = ""
        return Finished(task_id, folder, ended, name_keys(task_id, display))

    def refresh(self) -> bool:
        """List the folders again when they changed (or every SUMMARY_REFRESH_SECONDS) and
        publish what differs; whether it listed."""
        now = self.clock()
        if self.backlog:  # the first listing of a long history, taken in by parts
            for task_id, name in self.backlog[:SUMMARY_BATCH]:
                self._add(task_id, name)
            del self.backlog[:SUMMARY_BATCH]
            return True
        stamped = {name: self._stamp(name) for name in self.FOLDERS}
        stamps = {name: text for name, (text, _) in stamped.items()}
        if stamps == self.stamps and self.settled \
                and now - self.listed_at < SUMMARY_REFRESH_SECONDS:
            return False
        current = {task_id: name for name in ("done", "failed")
                   for task_id in self.folder.names(name)}
        self.logs = len(self.folder.names("logs"))
        for task_id in [t for t in self.tasks if current.get(t) != self.tasks[t].folder]:
            for key in self.tasks.pop(task_id).keys:
                self.by_bucket[name_bucket(key)].discard((key, task_id))
                self.unpublished.add(name_bucket(key))
        new = [(task_id, name) for task_id, name in current.items() if task_id not in self.tasks]
        for task_id, name in new[:SUMMARY_BATCH]:
            self._add(task_id, name)
        if len(new) > SUMMARY_BATCH:  # the rest on the next turns, then a listing again; until
            self.backlog = new[SUMMARY_BATCH:]  # then names/ stays as it was
            self.stamps = {}
            return True
        self._publish_names()
        # a time with no fraction of a second: a file system that keeps whole seconds
        self.settled = all(now - mtime >= (SUMMARY_SETTLE_SECONDS if mtime % 1 else 1.0)
                           for _, mtime in stamped.values())
        self.stamps = stamps
        self.listed_at = now
        # names/ too: a bucket lost or added by hand shows in its time
        published = {**stamps, "names": self._stamp("names")[0]} if self.settled else {}
        self._publish_summary(now, published)
        return True

    def _add(self, task_id: str, folder: str) -> None:
        task = self.tasks[task_id] = self._finished(task_id, folder)
        for key in task.keys:
            self.by_bucket.setdefault(name_bucket(key), set()).add((key, task_id))
            self.unpublished.add(name_bucket(key))

    def _names_text(self, bucket: str) -> str:
        entries = sorted(self.by_bucket.get(bucket, ()), key=lambda e: (e[0], run_order_key(e[1])))
        return "".join(f"{key}/{self.tasks[t].folder}/{t}\n" for key, t in entries)

    def _publish_names(self) -> None:
        changed, self.unpublished = self.unpublished, set()
        names = self.folder.dir("names")
        names.mkdir(exist_ok=True)
        if self.published is None:  # the first listing: names/ as an earlier daemon left it
            self.published = {}
            for bucket in self.folder.names("names"):
                try:
                    with open(open_regular(names / bucket, os.O_RDONLY), "rb") as f:
                        self.published[bucket] = os.fsdecode(f.read())
                except (OSError, ValueError):
                    self.published[bucket] = ""
            changed = changed | set(self.published)
        try:
            self._write_buckets(names, changed)
        except OSError:
            self.unpublished |= changed  # written again on the next turn
            raise

    def _write_buckets(self, names: Path, changed: set[str]) -> None:
        assert self.published is not None
        for bucket in sorted(changed):
            text = self._names_text(bucket)
            if self.published.get(bucket) == text:
                continue
            if text:
                self.folder.publish(names / bucket, text)
                self.published[bucket] = text
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(names / bucket)
                self.published.pop(bucket, None)
            if not self.by_bucket.get(bucket):
                self.by_bucket.pop(bucket, None)

    def _publish_summary(self, now: float, stamps: Mapping[str, str]) -> None:
        recent = sorted(self.tasks.values(), key=lambda t: (t.ended, t.task_id),
                        reverse=True)[:SUMMARY_RECENT]
        counts = collections.Counter(t.folder for t in self.tasks.values())
        fields: dict[str, object] = {
            "protocol": PROTOCOL_VERSION, "written": f"{now:.3f}",
            **{f"{name}_mtime": stamps.get(name, "") for name in (*self.FOLDERS, "names")},
            "done": counts["done"], "failed": counts["failed"], "logs": self.logs,
            "ended_count": len(recent),
            **{f"ended.{k}": f"{t.folder}/{t.task_id}" for k, t in enumerate(recent)},
        }
        self.folder.publish(self.folder.root / "summary", format_fields(fields), durable=False)


# Processes ##################################################################################

_PR_SET_NAME = 15
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _prctl(option: int, arg) -> bool:
    """prctl(2) through ctypes; False where it fails or does not exist (not Linux)."""
    libc = _libc()
    zero = ctypes.c_ulong(0)
    try:
        return libc is not None and libc.prctl(option, arg, zero, zero, zero) == 0
    except (AttributeError, ctypes.ArgumentError, OSError):
        return False


def set_process_name(name: str) -> bool:
    """Name this process (``/proc/<pid>/comm``, what ``ps`` and ``top`` show), as daemons and
    keep-alive workers do at start: they are recognised by it, however they were started (the
    file, ``python -m perpetual_motion``, the ``perpetual-motion`` script). Does nothing where
    prctl fails."""
    return _prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]))


def process_name(pid: int) -> str:
    """A process's name (its ``comm``), or "" when it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().decode(errors="replace").rstrip("\n")
    except OSError:
        return ""


def become_subreaper() -> bool:
    """Make this process a child subreaper: a descendant whose parent ends (a task's child
    started with ``setsid``, even under ``env -i``) becomes this process's child instead of
    init's, so it can be found, ended and reaped. False where prctl fails."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(1))


def is_subreaper() -> bool:
    """True when this process is a child subreaper (become_subreaper() succeeded)."""
    value = ctypes.c_int(0)
    return _prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(value)) and value.value != 0


def _proc_environ(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _task_marker(environ: bytes) -> str | None:
    """The value of MARKER_VAR in a process's environment (``<job>/<id>``), or None."""
    needle = f"{MARKER_VAR}=".encode()
    for item in environ.split(b"\0"):
        if item.startswith(needle):
            return item[len(needle):].decode(errors="replace")
    return None


def _is_ours(pid: int, environ: bytes) -> bool:
    """A daemon, its fence keeper, a keep-alive worker or a task callback of Perpetual Motion
    (of any instance): by its process name, or by the variable a worker or keeper (that has not
    named itself yet) or a callback, and all it starts, carry."""
    return process_name(pid) in (DAEMON_PROCESS_NAME, WORKER_PROCESS_NAME,
                                 FENCE_PROCESS_NAME) or (
        (b"PERPETUAL_MOTION_WORKER=" in environ or CALLBACK_VAR.encode() + b"=" in environ)
        and _task_marker(environ) is None)


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


def marked_pids(marker: str) -> list[int]:
    """This user's processes whose environment carries ``MARKER_VAR=<marker>``, exactly: the
    marker of a task whose id begins with this task's id (``<id>.sh``) is another task's."""
    needle = f"{MARKER_VAR}={marker}".encode()
    return [pid for pid in _own_pids()
            if pid != os.getpid() and needle in _proc_environ(pid).split(b"\0")]


def task_of(pid: int) -> str | None:
    """The id of the task whose marker a process carries (``<job>/<id>``), or None."""
    marker = _task_marker(_proc_environ(pid))
    if marker is None:
        return None
    return marker.partition("/")[2] or None


def predecessor_pids(folder: Path, job_id: str, node_rank: int) -> list[int]:
    """This user's processes of tasks that a daemon of this instance and node started (their
    marker ``<job>/...``, ``QUEUE_DIR`` and ``PM_NODE_RANK``): at the start of a daemon, what a
    predecessor that died left running. Daemons and keep-alive workers are never among them."""
    needle = f"{MARKER_VAR}={job_id}/".encode()
    wanted = {f"PM_NODE_RANK={node_rank}".encode(), f"QUEUE_DIR={folder}".encode()}
    found = []
    for pid in _own_pids():
        if pid == os.getpid() or process_name(pid) in (DAEMON_PROCESS_NAME,
                                                       WORKER_PROCESS_NAME):
            continue
        items = _proc_environ(pid).split(b"\0")
        if wanted <= set(items) and any(item.startswith(needle) for item in items):
            found.append(pid)
    return sorted(found)


def send_sigterm(pids: Iterable[int]) -> list:
    """SIGTERM ``pids``; the psutil.Process of each one signalled."""
    import psutil

    procs = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            proc.terminate()
            procs.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return procs


def terminate(pids: Iterable[int], grace: float) -> int:
    """SIGTERM ``pids``, SIGKILL what is left after ``grace``; return how many were signalled."""
    import psutil

    procs = send_sigterm(pids)
    _, alive = psutil.wait_procs(procs, timeout=max(grace, 0.0))
    for proc in alive:
        with contextlib.suppress(psutil.Error, OSError):
            proc.kill()
    psutil.wait_procs(alive, timeout=KILL_WAIT_SECONDS)
    return len(procs)


def signal_name(number: int) -> str:
    """``SIGTERM`` for 15; real-time and unknown signals too (``SIG40``)."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"


def signal_group(pgid: int, sig: int) -> bool:
    """Signal a whole process group; False when it is already gone."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return False


def signal_task_group(pgid: int, leader_start: int, sig: int) -> bool:
    """Signal the process group that a task's main process (PID ``pgid``, started at
    ``leader_start``: ``_start_time``'s clock ticks) leads, only while that number can still be
    the group's; False when it is not signalled. The kernel gives the number of an ended
    process to a new one only once no process has it as its PID, process group or session:
    while the leader is there (a zombie too) or gone with its group not yet empty, the group is
    the task's. Another process under that PID (another start time) means that the group had
    ended and its number went to someone else, who may lead a group of its own (a task started
    since, a user's shell job): that group is left alone."""
    holder = _start_time(pgid)
    if holder != -1 and holder != leader_start:
        return False
    return signal_group(pgid, sig)


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


def python_pids_to_kill(job_id: str, scope: str, spare: Iterable[int] = (),
                        task_id: str = "") -> list[int]:
    """The processes that a stop of ``task_id`` ends besides the task, by ``scope``
    (docs/protocol.md); ``spare`` are the keep-alive workers. Processes of every other task
    (they carry another task's marker) are never among them."""
    import psutil

    if scope == "none":
        return []
    if scope == "task":
        return marked_pids(f"{job_id}/{task_id}") if task_id else []
    me = psutil.Process()
    # PID 1 too, which the daemon need not descend from (a shell entered into a container with
    # docker exec): a container's init that handles SIGTERM takes the container down with it
    keep = {me.pid, 1} | {p.pid for p in me.parents()} | set(spare)
    uid = os.getuid()
    own_marker = f"{MARKER_VAR}={job_id}/{task_id}".encode()
    victims = []
    for proc in psutil.process_iter():
        try:
            if proc.pid in keep or proc.uids().real != uid or not _is_python(proc):
                continue
            environ = _proc_environ(proc.pid)
            if _is_ours(proc.pid, environ):
                continue  # keep-alive workers and daemons (of other instances too)
            marked = f"{MARKER_VAR}=".encode() in environ
            if marked and own_marker not in environ.split(b"\0"):
                continue  # a process of another task: that task's own business
            victims.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return victims


def leftover_pids(marker: str, others: Collection[str] = (), spare: Collection[int] = (),
                  session: int | None = None,
                  lineage: Collection[tuple[int, int]] = ()) -> tuple[list[int], list[int]]:
    """What a task whose main process has ended left running, to be ended with it, and the
    orphans that are left alone for want of proof that they are the task's.

    A process is taken only with proof that it is the task's (docs/protocol.md): it carries the
    task's marker (``MARKER_VAR=<marker>``, ``<job>/<id>``) or the marker of another task of
    the job that no longer runs (not in ``others``), it is in the task's own session
    (``session``), or it was seen below the task's main process while the task ran
    (``lineage``: ``(pid, start time)`` pairs, so a reused PID proves nothing). When this
    daemon is a child subreaper (or PID 1) it adopts every orphan below it, and a container's
    PID 1 adopts every orphan of the container: a user's ``nohup`` job, another user's process,
    a callback's child. An orphan without proof, and all below it, is left alone and returned
    second. ``spare`` are the main processes of running tasks.
    """
    me = os.getpid()
    if me != 1 and not is_subreaper():
        return sorted(pid for pid in _own_pids()
                      if pid != me and _task_marker(_proc_environ(pid)) == marker), []
    job = marker.partition("/")[0] + "/"
    uid = os.getuid()
    seen = set(lineage)

    def proof(pid: int, environ: bytes) -> bool | None:
        """True: the task's; False: another running task's or ours; None: no proof."""
        found = _task_marker(environ)
        if found in others:
            return False
        if (pid, _start_time(pid)) in seen:
            return True
        if _uid(pid) != uid:
            return None
        if found is not None and (found == marker or found.startswith(job)):
            return True
        if session is not None and _session(pid) == session:
            return True
        return None

    taken, left = set(), set()
    for orphan in _children(me):
        environ = _proc_environ(orphan)
        if orphan in spare or _is_ours(orphan, environ):
            continue  # the main process of a running task, a keep-alive worker, a callback
        # Below a process, what it started is as much the task's as the process is, unless it
        # names another running task by its marker.
        todo = [(orphan, proof(orphan, environ))]
        while todo:
            pid, verdict = todo.pop()
            if _process_state(pid) in ("Z", ""):
                continue
            if verdict is True:
                taken.add(pid)
            elif verdict is None:
                left.add(pid)
            for child in _children(pid):
                mine = proof(child, _proc_environ(child))
                todo.append((child, False if mine is False else (mine or verdict)))
    return sorted(taken), sorted(left)


def foreign_proc() -> str:
    """Why /proc is not this process's PID namespace's, or "" when it is: a namespace made
    without a /proc of its own (``unshare --pid --fork`` without ``--mount-proc``) sees the
    processes of the namespace above under their numbers there. Every proof that a process
    is a task's is read through /proc, and every signal goes by this namespace's numbers, so a
    daemon must not run there. ``NSpid`` in /proc/self/status lists this process's PID in each
    namespace from /proc's down to its own: one number, its own PID, when they are the same."""
    try:
        with open("/proc/self/status", "rb") as f:
            nspid = next((line.split()[1:] for line in f if line.startswith(b"NSpid:")), None)
    except OSError as exc:
        if not os.path.exists("/proc/1"):
            return ""  # no /proc at all: nothing is found through it
        return f"this process is not among the processes /proc shows ({error_text(exc)})"
    if nspid is None:  # Linux before 4.1
        try:
            nspid = [os.readlink("/proc/self").encode()]
        except OSError:
            return ""
    if nspid != [str(os.getpid()).encode()]:
        return (f"/proc shows the processes of another PID namespace (this process is pid "
                f"{nspid[0].decode(errors='replace')} there, {os.getpid()} in its own)")
    return ""


def _uid(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def _stat_fields(pid: int) -> list[bytes]:
    """The fields of ``/proc/<pid>/stat`` after the name (the state is the first); [] when
    the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _session(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[3]) if len(fields) > 3 else None


def _start_time(pid: int) -> int:
    """When a process started (clock ticks after boot): with its PID, names it uniquely."""
    fields = _stat_fields(pid)
    return int(fields[19]) if len(fields) > 19 else -1


def lineage_of(pid: int) -> set[tuple[int, int]]:
    """``(pid, start time)`` of a process and every process below it now."""
    return {(p, _start_time(p)) for p in _subtree(pid)}


def process_table() -> dict[int, tuple[int, int]]:
    """Every process: its parent and start time (``pid -> (ppid, start)``), one read each."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if len(fields) > 19:
                table[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return table


def lineages(roots: Collection[int], table: Mapping[int, tuple[int, int]]
             ) -> dict[int, set[tuple[int, int]]]:
    """``(pid, start time)`` of each root and every process below it, from one table."""
    below: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        below.setdefault(ppid, []).append(pid)
    found = {}
    for root in roots:
        tree, todo = set(), [root]
        while todo:
            pid = todo.pop()
            if pid in table:
                tree.add((pid, table[pid][1]))
            todo += below.get(pid, [])
        found[root] = tree
    return found


def describe_pids(pids: Iterable[int]) -> str:
    """``123 (sleep, user 65534), ...`` for a log line."""
    return ", ".join(f"{pid} ({process_name(pid) or '?'}, user {_uid(pid)})" for pid in pids)


@functools.cache
def _children_files() -> bool:
    """True where the kernel lists children in ``/proc/<pid>/task/<tid>/children``."""
    return os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def _children(pid: int) -> list[int]:
    """The children of a process: one small read per thread where the kernel offers the list,
    else from every process's parent."""
    if not _children_files():
        import psutil

        try:
            return [c.pid for c in psutil.Process(pid).children()]
        except psutil.Error:
            return []
    found: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                found += [int(word) for word in f.read().split()]
    except OSError:
        pass  # gone meanwhile
    return found


def _subtree(pid: int) -> list[int]:
    """A process and all below it."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += _children(current)
    return tree


def _process_state(pid: int) -> str:
    """The state letter of a process (``R``, ``S``, ``Z`` ...), or "" when it is gone."""
    fields = _stat_fields(pid)
    return fields[0].decode() if fields else ""


def reap_orphans(keep: set[int]) -> None:
    """Reap exited children that are not in ``keep`` (the task and the keep-alive workers,
    which their Popen objects reap).

    Needed when the daemon is a child subreaper or PID 1 of a container or namespace: orphans
    of tasks are re-parented to it and would stay zombies.
    """
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or info.si_pid in keep:
            return
        try:
            os.waitpid(info.si_pid, os.WNOHANG)
        except ChildProcessError:
            return


def pid_is_daemon(pid: int) -> bool:
    """True when ``pid`` runs on this host and is a daemon of ours (by its process name,
    whatever command line started it)."""
    return pid != os.getpid() and process_name(pid) == DAEMON_PROCESS_NAME


def process_started(pid: int) -> float | None:
    """When a process started, in epoch seconds (to about a second), or None."""
    ticks = _start_time(pid)
    try:
        with open("/proc/stat", "rb") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK") if ticks >= 0 else None
    except (OSError, StopIteration, ValueError, IndexError):
        return None


PID_REUSE_SLACK_SECONDS = 10.0  # a process started this much after a state's start is not its


def pid_is_owner(pid: int, started: float | None) -> bool:
    """True when ``pid`` is the daemon that wrote a state file with ``started``: a daemon of
    ours that started no later than that (one that started after it reuses a dead daemon's PID,
    a daemon of another instance say)."""
    if not pid_is_daemon(pid):
        return False
    began = process_started(pid)
    return started is None or began is None or began <= started + PID_REUSE_SLACK_SECONDS


# Placement ##################################################################################
#
# Which task starts on this node, with which GPUs: a pure function of plain records (the node's
# resources, the pending tasks in run order), so that its rules are tested on tables of cases.
# The runner carries the decision out.


@dataclasses.dataclass(frozen=True)
class NodeLoad:
    """What is in use on a node: GPUs (inventory positions) held by tasks or set aside for
    gangs, CPU task slots, and the tasks that asked for GPUs."""

    total: int  # GPUs in the inventory
    taken: frozenset[int] = frozenset()
    cpu_running: int = 0
    gpu_tasks: int = 0  # running (or starting) tasks that asked for GPUs, all or some
    cpu_slots: int = MAX_CPU_TASKS

    @property
    def free(self) -> list[int]:
        return [i for i in range(self.total) if i not in self.taken]

    def fit(self, gpus: int | None) -> tuple[int, ...] | None:
        """The GPUs a task asking for ``gpus`` (None: all) would get now, or None."""
        if gpus == 0:
            return () if self.cpu_running < self.cpu_slots else None
        if gpus is None:
            return tuple(range(self.total)) if self.gpu_tasks == 0 and not self.taken else None
        free = self.free
        return tuple(free[:gpus]) if len(free) >= gpus and gpus <= self.total else None

    def plus(self, gpus: int | None, given: Iterable[int]) -> NodeLoad:
        """The load with one more task that asked for ``gpus`` and was given ``given``."""
        if gpus == 0:
            return dataclasses.replace(self, cpu_running=self.cpu_running + 1)
        return dataclasses.replace(self, taken=self.taken | frozenset(given),
                                   gpu_tasks=self.gpu_tasks + 1)

    def wait_reason(self, gpus: int | None) -> str:
        if gpus == 0:
            return f"waiting for a CPU slot ({self.cpu_running} of {self.cpu_slots} in use)"
        free = len(self.free)
        if gpus is None:
            if self.total == 0:
                return "waiting for the node (a task that takes it whole runs)"
            return f"waiting for all {self.total} GPUs, {free} free"
        return f"waiting for {gpus} GPU{'s' if gpus > 1 else ''}, {free} free"


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A pending task that may start on this node, in run order."""

    task_id: str
    gpus: int | None  # None: all of the node's GPUs
    blocked_since: float | None = None  # since when this node has found it waiting for GPUs


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to start now, and what the first task that cannot start waits for."""

    starts: tuple[tuple[str, tuple[int, ...]], ...]
    waiting: tuple[str, str] | None  # (task id, why)
    blocked: tuple[str, ...]  # tasks that wait for GPUs (for their blocked_since)
    held_for: str | None = None  # the task the node keeps its GPUs for, past the backfill limit
    reasons: tuple[tuple[str, str], ...] = ()  # (task id, why) of every candidate not started


def plan_starts(candidates: Iterable[Candidate], load: NodeLoad, now: float,
                backfill_limit: float = BACKFILL_LIMIT_SECONDS) -> Plan:
    """Start, in run order, every candidate that fits. A later task may start while an earlier
    one waits for GPUs (backfilling), until the earliest such task has waited ``backfill_limit``:
    from then on no other GPU task starts before it, so the node drains for it and no task
    waits for ever. CPU tasks (``gpus=0``) never wait for GPU tasks, nor they for them."""
    starts: list[tuple[str, tuple[int, ...]]] = []
    blocked: list[str] = []
    waiting: tuple[str, str] | None = None
    held_for: str | None = None
    reasons: list[tuple[str, str]] = []
    for candidate in candidates:
        if held_for is not None and candidate.gpus != 0:
            reasons.append((candidate.task_id, f"the node keeps its GPUs for {held_for}, which "
                            f"has waited {backfill_limit:g} s"))
            continue
        given = load.fit(candidate.gpus)
        if given is None:
            reasons.append((candidate.task_id, load.wait_reason(candidate.gpus)))
            if waiting is None:
                waiting = reasons[-1]
            if candidate.gpus != 0:
                blocked.append(candidate.task_id)
                since = candidate.blocked_since
                if since is not None and now - since >= backfill_limit:
                    held_for = candidate.task_id
            continue
        starts.append((candidate.task_id, given))
        load = load.plus(candidate.gpus, given)
    return Plan(tuple(starts), waiting, tuple(blocked), held_for, tuple(reasons))


def dependency_cycles(after: Mapping[str, Iterable[str]]) -> dict[str, str]:
    """The pending tasks that wait for themselves through ``after`` (A after B after A, or A
    after A), each with the reason it is cancelled: ``dependency cycle: A -> B -> A``. A task
    that only waits for a task of a cycle is not in it (it is cancelled once that one is)."""
    found: dict[str, str] = {}
    state: dict[str, int] = {}  # 1: on the path being followed, 2: done
    for start in after:
        if start in state:
            continue
        path: list[str] = []
        stack = [(start, iter(after[start]))]
        state[start] = 1
        path.append(start)
        while stack:
            node, deps = stack[-1]
            dep = next(deps, None)
            if dep is None:
                stack.pop()
                path.pop()
                state[node] = 2
            elif dep not in after or state.get(dep) == 2:
                continue
            elif state.get(dep) == 1:
                cycle = path[path.index(dep):]
                why = "dependency cycle: " + " -> ".join([*cycle, dep])
                for member in cycle:
                    found.setdefault(member, why)
            else:
                state[dep] = 1
                path.append(dep)
                stack.append((dep, iter(after[dep])))
    return found


def never_fits(request: Request, node_gpus: Iterable[int], num_nodes: int) -> str:
    """Why no node of the instance can ever run ``request`` (``node_gpus``: the GPU counts of
    the nodes known), or ""."""
    counts = list(node_gpus)
    if request.nodes is not None and request.nodes > num_nodes:
        return (f"it asks for {request.nodes} nodes; the instance has {num_nodes}")
    if request.gpus and counts and request.gpus > max(counts):
        if max(counts) == 0:
            return (f"it asks for {request.gpu_text()}; no node here has a GPU (a daemon "
                    "without NVML can declare slots: --gpus N)")
        return f"it asks for {request.gpu_text()}; nodes here have at most {max(counts)}"
    return ""


def choose_gang_nodes(nodes: int, gpus: int | None, free: Mapping[int, int],
                      total: Mapping[int, int]) -> tuple[int, ...] | None:
    """The nodes of a task that spans ``nodes`` nodes, in rank order, among the live nodes
    (``free`` and ``total`` GPUs of each, by node rank); None when too few can hold it. The
    nodes with the most free GPUs are taken first (node 0 first on a tie); ranks follow the
    node order, so rank 0 is on the lowest node."""
    able = [n for n in free if gpus is None or gpus <= total.get(n, 0)]
    if len(able) < nodes:
        return None
    chosen = sorted(able, key=lambda n: (-free[n], n))[:nodes]
    return tuple(sorted(chosen))


# Placement: one queue pass ##################################################################
#
# A pass of the queue reads one frozen snapshot (QueueFolder.read_pass), asks ``plan_pass`` what
# to do with it, and carries the plan out (PassApplier, beside the task runner). The planner
# opens no file, starts no process and reads no clock: every "why does it wait?" is a function
# of the snapshot.


@dataclasses.dataclass(frozen=True)
class PendingTask:
    """An entry of pending/ with its submit record, or why that cannot be read (it must not
    run: it would run in another directory, with other arguments)."""

    name: str
    submission: Submission | str


@dataclasses.dataclass(frozen=True)
class PendingQueue:
    """pending/ as listed, with each entry's submit record; what a pass reads of it again
    only when the listing changed (QueueFolder.read_pass)."""

    names: list[str]
    pending: tuple[PendingTask, ...]
    listed: frozenset[str]
    after: tuple[str, ...]  # the ids that the tasks come after, sorted
    gang: bool  # a task spans nodes

    @classmethod
    def read(cls, names: list[str], requests: dict[str, Submission | str],
             submission: Callable[[str], Submission | str]) -> PendingQueue:
        """The entries ``names`` with their records: ``requests`` (the caller's cache, kept to
        the entries listed), else ``submission(name)``."""
        listed = frozenset(names)
        for name in [n for n in requests if n not in listed]:
            del requests[name]
        pending = tuple(PendingTask(name, requests[name] if name in requests else
                                    requests.setdefault(name, submission(name)))
                        for name in names)
        subs = [t.submission for t in pending if isinstance(t.submission, Submission)]
        return cls(names, pending, listed, tuple(sorted({d for sub in subs for d in sub.after})),
                   any(sub.request.gang for sub in subs))


@dataclasses.dataclass(frozen=True)
class PassSnapshot:
    """What one pass of the queue knows, read once at its start (QueueFolder.read_pass)."""

    now: float
    load: NodeLoad  # what this node's tasks and the ranks set aside on it use
    pending: tuple[PendingTask, ...] = ()  # as listed; plan_pass puts them in run order
    held: frozenset[str] = frozenset()  # entries of held/ (gpu_hold)
    priority: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)
    results: Mapping[str, str] = dataclasses.field(default_factory=dict)  # ``after`` id -> state
    queued: frozenset[str] = frozenset()  # ``after`` ids without a result that are in the queue
    node_rank: int = 0
    num_nodes: int = 1
    views: Mapping[int, NodeView] = dataclasses.field(default_factory=dict)  # by node rank
    drained: str | None = None  # why the instance is drained (gpu_drain), or None
    node_drains: Mapping[int, str] = dataclasses.field(default_factory=dict)  # rank -> why
    blocked_since: Mapping[str, float] = dataclasses.field(default_factory=dict)
    backoff_until: float = -1e18  # this node claims nothing before then (Scheduler.back_off)
    may_start: bool = True  # False while the daemon shuts down or drains for auto-shutdown
    backfill_limit: float = BACKFILL_LIMIT_SECONDS

    @property
    def leader(self) -> bool:
        return self.node_rank == 0


@dataclasses.dataclass(frozen=True)
class PassPlan:
    """What one pass does (``plan_pass``). Names are pending/ entries; GPUs are positions in
    the node's inventory; nodes are node ranks, in the order of the task's ranks."""

    order: tuple[str, ...] = ()  # the pending tasks in run order
    starts: tuple[tuple[str, tuple[int, ...]], ...] = ()  # claimed here, on these GPUs
    fails: tuple[tuple[str, str], ...] = ()  # node 0 fails them: they can never run
    cancels: tuple[tuple[str, str], ...] = ()  # node 0 cancels them: their dependency
    gangs: tuple[tuple[str, tuple[int, ...]], ...] = ()  # node 0 places them on these nodes
    waiting: tuple[str, str] | None = None  # the first task that waits, why (the state file's)
    reasons: Mapping[str, str] = dataclasses.field(default_factory=dict)  # each one left, why
    blocked_since: Mapping[str, float] = dataclasses.field(default_factory=dict)
    candidates: tuple[Candidate, ...] = ()  # placed again when a claim is lost (PassApplier)


def dependency_blocker(after: Iterable[str], results: Mapping[str, str],
                       queued: Collection[str]) -> str:
    """"" when every task it comes after has finished done; ``waiting for <id>`` while one
    has not finished (``queued``); else why it can never start (docs/protocol.md)."""
    for dep in after:
        state = results.get(dep)
        if state is None:
            if dep in queued:
                return f"waiting for {dep}"
            return f"dependency {dep} not found"
        if state != TaskState.DONE.value:
            return f"dependency {dep} {state}"
    return ""


def gang_nodes(request: Request, snapshot: PassSnapshot) -> tuple[int, ...] | str:
    """The nodes, in rank order, on which node 0 places a task that spans nodes: live nodes
    that run and are not drained; or what it waits for."""
    nodes = snapshot.num_nodes if request.nodes is None else request.nodes
    live = {r: v for r, v in snapshot.views.items() if v.alive and v.status == "running"}
    drained = {r for r in live if r in snapshot.node_drains}
    live = {r: v for r, v in live.items() if r not in drained}
    chosen = choose_gang_nodes(nodes, request.gpus, {r: v.gpus_free for r, v in live.items()},
                               {r: v.gpu_count for r, v in live.items()})
    if chosen is None:
        return (f"waiting for {nodes} nodes, {len(live)} alive"
                + (f" and {len(drained)} drained" if drained else ""))
    return chosen


def plan_pass(snapshot: PassSnapshot) -> PassPlan:
    """One pass of the queue on one node (docs/protocol.md, "Which task starts where"): the
    pending tasks in run order; node 0 fails what can never run and cancels what waits for a
    failed, cancelled or missing dependency or for itself; a held task, and one that waits for
    a dependency, is passed over; node 0 places what spans nodes (while no task across nodes
    before it waits for nodes: a task that waits for a dependency holds nothing up, as in
    Slurm); the rest is placed on this node by ``plan_starts``. A drain, or a node that backs
    off, starts nothing; nothing starts while the daemon shuts down."""
    order = tuple(sorted((t.name for t in snapshot.pending),
                         key=lambda name: start_order(name, snapshot.priority)))
    if not snapshot.may_start:
        why = "nothing new starts on this node: its daemon is shutting down"
        return PassPlan(order, reasons=dict.fromkeys(order, why),
                        blocked_since=dict(snapshot.blocked_since))
    subs = {t.name: t.submission for t in snapshot.pending}
    leader = snapshot.leader
    queued = set(snapshot.queued) | set(order)
    results = dict(snapshot.results)  # with the ends node 0 plans in this pass
    counts = [snapshot.load.total]
    if snapshot.num_nodes > 1:
        counts += [v.gpu_count for v in snapshot.views.values()
                   if v.rank != snapshot.node_rank and v.token]
    cycles = dependency_cycles({n: s.after for n in order
                                if isinstance(s := subs[n], Submission)})
    fails: list[tuple[str, str]] = []
    cancels: list[tuple[str, str]] = []
    gangs: list[tuple[str, tuple[int, ...]]] = []
    reasons: dict[str, str] = {}
    candidates: list[Candidate] = []
    waiting: tuple[str, str] | None = None  # the first that waits for a dependency or nodes
    queue_ahead: str = ""  # the first that waits for nodes: no task across nodes passes it

    def end(name: str, why: str, state: TaskState) -> None:
        """Node 0 fails (or cancels) the task, and its dependants after it in the run order
        see that in this very pass; another node passes over it."""
        failed = state is TaskState.FAILED
        if not leader:
            reasons[name] = f"{why} (node 0 {'fails' if failed else 'cancels'} it)"
            return
        (fails if failed else cancels).append((name, why))
        if TASK_ID_RE.fullmatch(name):  # (a name put there by hand ends under a fresh id)
            results.setdefault(name, state.value)

    for name in order:
        sub = subs[name]
        if name in snapshot.held:
            reasons[name] = "held (gpu_release lets it start)"
            continue
        why = sub if isinstance(sub, str) else never_fits(sub.request, counts,
                                                            snapshot.num_nodes)
        if why:
            end(name, why, TaskState.FAILED)
            continue
        if name in cycles:
            end(name, cycles[name], TaskState.CANCELLED)
            continue
        blocker = dependency_blocker(sub.after, results, queued)
        if blocker.startswith("waiting"):
            waiting = waiting or (name, blocker)
            reasons[name] = blocker
            continue
        if blocker:
            end(name, blocker, TaskState.CANCELLED)
            continue
        if sub.request.gang:
            if not leader:
                reasons[name] = "it spans nodes: node 0 places it"
            elif snapshot.drained:
                reasons[name] = f"the queue is {snapshot.drained} (gpu_resume)"
            elif queue_ahead:
                reasons[name] = f"not placed while {queue_ahead} waits before it"
            elif isinstance(nodes := gang_nodes(sub.request, snapshot), str):
                waiting, reasons[name] = waiting or (name, nodes), nodes
                queue_ahead = name
            else:
                gangs.append((name, nodes))
            continue
        if sub.request.gpus is not None and sub.request.gpus > snapshot.load.total:
            reasons[name] = (f"it asks for {sub.request.gpu_text()}, this node has "
                             f"{snapshot.load.total}: for a node with more")
            continue
        candidates.append(Candidate(name, sub.request.gpus, snapshot.blocked_since.get(name)))
    placed = plan_starts(candidates, snapshot.load, snapshot.now, snapshot.backfill_limit)
    reasons.update(placed.reasons)
    blocked_since = {n: snapshot.blocked_since.get(n, snapshot.now) for n in placed.blocked}
    if not waiting or (placed.waiting and order.index(placed.waiting[0])
                       < order.index(waiting[0])):
        waiting = placed.waiting  # the earlier of the two
    starts = placed.starts
    rank = snapshot.node_rank
    node_drained = snapshot.node_drains.get(rank)
    if snapshot.drained or node_drained:
        why = (f"the queue is {snapshot.drained} (gpu_resume)" if snapshot.drained else
               f"node {rank} is {node_drained} (gpu_resume --node {rank})")
        first = next((n for n in order if isinstance(subs[n], Submission)), None)
        waiting = (first, why) if first else None
        reasons.update((c.task_id, why) for c in candidates)
        starts = ()
    elif starts and snapshot.now < snapshot.backoff_until:
        why = (f"this node could not prepare a task: it claims nothing for "
               f"{snapshot.backoff_until - snapshot.now:.0f} s")
        reasons.update((name, why) for name, _ in starts)
        starts = ()
    return PassPlan(order, starts, tuple(fails), tuple(cancels), tuple(gangs), waiting,
                    reasons, blocked_since, tuple(candidates))


# Task runner ################################################################################


_END_UNSEEN_SECONDS = 10.0  # s between the loop's last look at a running task and the look that
# found it ended, beyond which its end counts as unseen (its result gets ``found``)
# Node 0 puts a claimed task without a .run record back into pending/ once it has seen it so for
# _UNSTARTED_CLAIM_SECONDS (its claimer died): HEARTBEAT_STALE_SECONDS, and 60 s more, since a
# record made on another host may stay unseen here that long (NFS caches a lookup that found
# nothing until the folder's attributes expire, acdirmax). A claimer that has not written the
# record by _CLAIM_START_SECONDS after its claim (its loop stalled on storage, its GPUs slow to be
# freed) lets the task go instead of starting it; one whose record was written later than
# _CLAIM_PROVE_SECONDS after the claim starts the task only while it is still in running/.
# (RELEASE_TIMEOUT_SECONDS stays below _CLAIM_START_SECONDS.)
_UNSTARTED_CLAIM_SECONDS = HEARTBEAT_STALE_SECONDS + 60.0
_CLAIM_START_SECONDS = HEARTBEAT_STALE_SECONDS - 15.0
_CLAIM_PROVE_SECONDS = HEARTBEAT_STALE_SECONDS - 25.0


@dataclasses.dataclass
class RunningTask:
    """A task, or one rank of a task that spans nodes, that this daemon runs (mutable: its
    process starts once keep-alive has freed its GPUs, and its stop state changes)."""

    task_id: str
    submission: Submission
    gpus: tuple[int, ...]  # positions in the node's inventory
    claimed: float
    rank: int | None = None  # its rank, for a task that spans nodes
    nnodes: int = 1
    rendezvous: tuple[str, int] | None = None  # MASTER_ADDR and MASTER_PORT of a gang
    proc: subprocess.Popen | None = None  # None until its GPUs are free
    started: float | None = None
    log_path: Path | None = None
    gpu_text: str = ""  # its GPU numbers as tasks see them: "0,3"
    attempt: int = 1
    stop_state: TaskState | None = None  # STOPPED or INTERRUPTED once a stop was asked for
    stop_reason: str = ""
    kill_at: float | None = None  # when SIGKILL follows the SIGTERM
    hard: bool = False  # stopped with SIGKILL at once: what it leaves gets no grace either
    sweep: bool = False  # a user stopped it: end other Python processes once it has ended
    # (pid, start time) of every process seen below its main process: proof that an orphan
    # the daemon adopts is this task's (leftover_pids)
    lineage: set[tuple[int, int]] = dataclasses.field(default_factory=set)
    leftovers: Leftovers | None = None  # once its main process has ended
    seen: float | None = None  # when a turn of the loop last saw its main process run
    fenced: bool = False  # killed by the fence while this daemon could not look: its end unseen
    leader_start: int = -1  # when its main process started (_start_time): the proof that a
    # process group of its PID's number is still its own (signal_task_group)

    @property
    def key(self) -> tuple[str, int | None]:
        return self.task_id, self.rank

    @property
    def label(self) -> str:
        return self.task_id if self.rank is None else f"{self.task_id} (rank {self.rank})"


@dataclasses.dataclass
class Leftovers:
    """What a task's main process left running when it ended, and their countdown: SIGTERM
    sent, SIGKILL at ``kill_at`` to those still there, then ``KILL_WAIT_SECONDS`` for them
    to be gone. Checked at each turn of the loop; nothing waits."""

    ended: float  # when the main process was seen ended
    procs: list  # psutil.Process of each one still there
    count: int  # how many were signalled
    kill_at: float
    killed: bool = False

    def remain(self, now: float) -> bool:
        """True while the countdown goes on; those that have ended are reaped."""
        import psutil

        if self.procs:
            _, self.procs = psutil.wait_procs(self.procs, timeout=0)
        if not self.procs or (self.killed and now >= self.kill_at):
            return False  # (a process that outlives SIGKILL is not waited for longer)
        if now < self.kill_at:
            return True
        for proc in self.procs:
            with contextlib.suppress(psutil.Error, OSError):
                proc.kill()
        self.killed, self.kill_at = True, now + KILL_WAIT_SECONDS
        return True


@dataclasses.dataclass
class Unfinished:
    """The end of a task not yet published (a full disk, a folder away for a moment): its
    result, the folder it is moved from, whether the result is written; since when the task
    has been missing from that folder, with no other end of it on record."""

    result: TaskResult
    source: str
    published: bool = False
    missing_since: float | None = None


@dataclasses.dataclass
class Interrupting:
    """A task (or rank) whose daemon died, being finished as interrupted: what of it still
    runs here has had SIGTERM, and its end is published once ``leftovers`` is over."""

    task_id: str
    run: dict[str, str]  # its run record (empty when there is none)
    reason: str
    rank: int | None
    leftovers: Leftovers


class NodeTrouble(Exception):
    """A task cannot be prepared for a reason of the node, not of the task (no log file, no
    space): it goes back to pending/ and is tried again later."""


_NODE_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.ENOSPC, errno.EDQUOT, errno.EMFILE,
                errno.ENFILE, errno.EROFS, errno.EIO, errno.EACCES, errno.ENOMEM}


def task_command(path: Path, args: Iterable[str] = ()) -> list[str] | str:
    """How a task file runs, by its name; a string is the reason it cannot run."""
    if not regular_file(path):
        return "not a regular file (a symbolic link is never followed)"
    if path.name.endswith(".sh"):
        return ["bash", str(path), *args]
    if path.name.endswith(".py"):
        return [sys.executable, str(path), *args]
    if not os.access(path, os.X_OK):
        return "not executable (name it *.sh or *.py, or chmod +x it)"
    return [str(path), *args]


def port_is_free(port: int) -> bool:
    """Whether a TCP port can be bound on this host now (a connection lingering on it counts)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


@dataclasses.dataclass
class PortPicker:
    """MASTER_PORTs for the tasks of this daemon.

    A port is taken from MASTER_PORTS, below the kernel's ephemeral ports: a port that merely
    tested free there cannot be handed to an outgoing connection before the task binds it, as
    one from ``bind(("", 0))`` can. The search starts at a place drawn from the task's id, so
    that tasks spread over the range, and skips the ports this daemon gave out within
    PORT_REUSE_SECONDS: two tasks started in one turn never get the same one."""

    first: int = MASTER_PORTS[0]
    last: int = MASTER_PORTS[1]
    given: dict[int, float] = dataclasses.field(default_factory=dict)

    def pick(self, seed: str, now: float, is_free: Callable[[int], bool] = port_is_free) -> int:
        self.given = {p: t for p, t in self.given.items() if now - t < PORT_REUSE_SECONDS}
        span = self.last - self.first + 1
        start = zlib.crc32(seed.encode()) % span
        for step in range(span):
            port = self.first + (start + step) % span
            if port not in self.given and is_free(port):
                self.given[port] = now
                return port
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # the range is full
            sock.bind(("", 0))
            return sock.getsockname()[1]


class TaskRunner:
    """Starts, stops and finishes the tasks this daemon runs, through the queue folder
    (docs/protocol.md). Which task starts, and on which GPUs, is decided before (Placement)."""

    def __init__(self, config: Config, folder: QueueFolder, identity: Identity,
                 clock: Callable[[], float], throttled: ThrottledLog,
                 inventory: Inventory | None = None, token: str = ""):
        self.config = config
        self.folder = folder
        self.identity = identity
        self.clock = clock
        self.throttled = throttled
        self.inventory = inventory or Inventory(())
        self.token = token  # the daemon's ``started``: names its claims in .run records
        self.ports = PortPicker()
        self.tasks: dict[tuple[str, int | None], RunningTask] = {}
        self.left_alone: set[tuple[int, int]] = set()  # orphans without proof, logged once
        self.ends = TaskEnds(config, folder, identity, clock, throttled)

    # -- claiming --------------------------------------------------------------------------

    def claim(self, name: str) -> str | None:
        """Rename ``pending/<name>`` into running/ under its id; the id, or None when another
        claimant took it (or it cannot be claimed: then once a warning)."""
        try:
            task_id = self.folder.claim(name)
        except FileNotFoundError:
            if not self.folder.dir("running").is_dir():
                self.folder.ensure()
                self.throttled.warning("running-dir", "running/ was missing: created again")
            return None  # someone else took it (or cancelled it meanwhile)
        except OSError as exc:
            self.throttled.warning(f"claim:{name}", "[pending] skipping %s: cannot claim it: "
                                   "%s", name, exc)
            return None
        return task_id

    def unclaim(self, task_id: str) -> None:
        with contextlib.suppress(OSError):
            self.folder.unclaim(task_id)

    def add(self, task: RunningTask) -> RunningTask:
        task.gpu_text = self.inventory.numbers(task.gpus)
        self.tasks[task.key] = task
        return task

    # -- starting --------------------------------------------------------------------------

    def start(self, task: RunningTask) -> bool:
        """Start the process of a task whose GPUs are free. False when it cannot run (then it
        is finished already); NodeTrouble when the node cannot prepare it."""
        path = self.folder.dir("running") / task.task_id
        now = self.clock()
        sub = task.submission
        cwd = sub.cwd or str(Path.home())
        command = task_command(path, sub.args)
        log_path = self.folder.log(task.task_id, task.rank)
        try:
            log = self.folder.open_log(log_path)  # the with below closes it
        except OSError as exc:
            if exc.errno in _NODE_ERRNOS:
                raise NodeTrouble(f"cannot open its log {log_path.name}: "
                                  f"{exc.strerror or exc}") from exc
            LOG.error("cannot open the log of %s: %s", task.label, exc)
            self._fail_unstarted(task, f"cannot open its log: {exc.strerror or exc}", now)
            return False
        task.log_path = log_path
        with log:
            where = f"host: {self.identity.host}  node: {self.config.node_rank}"
            if task.rank is not None:
                where += f"  rank: {task.rank} of {task.nnodes}"
            header = [f"task: {task.task_id}", f"job: {self.config.job_id}", where,
                      f"gpus: {task.gpu_text or '-'}",
                      f"command: {shlex.join(command) if isinstance(command, list) else path}",
                      f"cwd: {cwd}", f"started: {now_text(now)}"]
            if sub.submitted_by:
                header.insert(2, f"submitted by: {sub.submitted_by}")
            self.log_lines(log, header)
            reason = message = ""  # why the task cannot run, short and for people
            if isinstance(command, str):
                reason = message = command
            elif not os.path.isdir(cwd):
                reason = "missing-cwd"
                message = f"the working directory {cwd} does not exist on this node"
            proc = None
            if not reason:
                # Recorded before it starts (docs/protocol.md, Claim and run): a task running
                # without its record would be taken for never started, and run again
                try:
                    self._publish_run(task, now, command, cwd, None)
                except OSError as exc:
                    if exc.errno == errno.EISDIR:  # a folder where the record belongs
                        LOG.error("cannot write the run record of %s: %s", task.label, exc)
                        reason = f"cannot write its run record: {exc.strerror or exc}"
                        self.log_lines(log, [f"not run: {reason}"])
                        self._fail_unstarted(task, reason, now)
                        return False
                    self.log_lines(log, [f"not run: cannot write its run record "
                                         f"({exc.strerror or exc}): back to pending"])
                    raise NodeTrouble(f"cannot write the run record of {task.label}: "
                                      f"{exc.strerror or exc}") from exc
                if not self._claim_holds(task):
                    self.log_lines(log, ["not run: put back into pending/ while this node "
                                         "prepared it (node 0 took its claim for a dead one's)"])
                    return False
                try:
                    proc = subprocess.Popen(command, cwd=cwd, env=self._environment(task),
                                            stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            close_fds=True)
                except (OSError, ValueError) as exc:  # ValueError: a NUL byte
                    reason = message = f"cannot start: {error_text(exc)}"
            if proc is None:
                self.log_lines(log, [f"not run: {message}"])
                self._fail_unstarted(task, reason, now)
                return False
        task.proc, task.started = proc, now
        task.leader_start = _start_time(proc.pid)  # (not reaped yet: this very process)
        try:  # again with its pid; without it, the record still says where it runs
            self._publish_run(task, now, command, cwd, proc.pid)
        except OSError as exc:
            self.throttled.warning("runrecord", "cannot write the pid into the run record of "
                                   "%s: %s", task.label, exc)
        LOG.info("Task started: %s (pid %d, GPUs %s)", task.label, proc.pid,
                 task.gpu_text or "none")
        return True

    def _claim_holds(self, task: RunningTask) -> bool:
        """After its .run record is written: whether the task may start here. A record written
        late after the claim may have come after node 0 put the task back into pending/ (it
        found no record for _UNSTARTED_CLAIM_SECONDS): then the task is another claimant's to
        run, and this node drops it and its record (if the record is still its own)."""
        waited = self.clock() - task.claimed
        if task.rank is not None or waited < _CLAIM_PROVE_SECONDS \
                or os.path.lexists(self.folder.dir("running") / task.task_id):
            return True
        LOG.error("%s was put back into pending/ while this node prepared it (%.0f s after its "
                  "claim): not started here", task.label, waited)
        with contextlib.suppress(OSError, ValueError):
            run = self.folder.read_fields(self.folder.record(task.task_id, "run"))
            if run is not None and run.get("daemon") == self.token \
                    and run.get("host") == self.identity.host and not run.get("pid"):
                self.folder.remove_record(task.task_id, "run")
        self.tasks.pop(task.key, None)
        return False

    def _publish_run(self, task: RunningTask, now: float, command: list[str], cwd: str,
                     pid: int | None) -> None:
        """Publish ``records/<id>.run`` (or a rank's): where and when the task runs, under
        whose claim; its ``pid`` and ``pgid`` once it has started. OSError when it cannot."""
        fields: dict[str, object] = {
            "id": task.task_id, "host": self.identity.host,
            "node_rank": self.config.node_rank, "daemon": self.token,
            "pid": "" if pid is None else pid, "pgid": "" if pid is None else pid,
            "boot_id": self.identity.boot_id, "pid_ns": self.identity.pid_ns,
            "started": f"{now:.3f}", "started_at": now_text(now),
            "command": shlex.join(command), "cwd": cwd, "gpus": task.gpu_text,
            "attempt": task.attempt}
        if task.rank is not None:
            fields["rank"] = task.rank
        self.folder.publish(self.folder.record(task.task_id, "run", task.rank),
                            format_fields(fields))

    def _environment(self, task: RunningTask) -> dict[str, str]:
        env = {**os.environ, **dict(task.submission.env)}  # what the daemon sets comes after
        addr, port = task.rendezvous or ("127.0.0.1",
                                         self.ports.pick(task.task_id, self.clock()))
        env.update({
            "JOB_ID": self.config.job_id, "TASK_NAME": task.task_id,
            "TASK_SHORT_NAME": short_name(task.task_id),
            "QUEUE_ROOT": str(self.config.queue_root), "QUEUE_DIR": str(self.folder.root),
            "TASK_LOG": str(self.folder.log(task.task_id, task.rank)),
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": task.gpu_text,
            "PM_GPUS": task.gpu_text, "TASK_GPUS": task.gpu_text,
            "PM_NODE_RANK": str(self.config.node_rank),
            "NODE_RANK": str(task.rank or 0), "NNODES": str(task.nnodes),
            "MASTER_ADDR": addr, "MASTER_PORT": str(port),
            MARKER_VAR: f"{self.config.job_id}/{task.task_id}",
        })
        return env

    def _fail_unstarted(self, task: RunningTask, reason: str, now: float) -> None:
        self.tasks.pop(task.key, None)
        self.finish(self.result_of(task, TaskState.FAILED, reason, now, now))

    @staticmethod
    def log_lines(log, lines: list[str]) -> None:
        try:
            log.write("".join(f"[perpetual-motion] {line}\n" for line in lines).encode(
                "utf-8", "surrogateescape"))
        except OSError:
            pass  # a full disk must not stop the task from being recorded

    # -- stopping --------------------------------------------------------------------------

    def stop(self, task: RunningTask, state: TaskState, reason: str, hard: bool = False) -> None:
        """Ask a task to stop: SIGTERM to its group now, SIGKILL after the grace. A task whose
        process has already exited ends as it ended: the stop comes too late to be its cause.
        A hard stop leaves no grace to what the task leaves either (end_leftovers)."""
        task.hard = task.hard or hard
        if task.proc is not None and task.proc.poll() is not None:
            if hard and task.leftovers is not None:  # what it left gets SIGKILL now
                task.leftovers.kill_at = min(task.leftovers.kill_at, self.clock())
            return
        if task.stop_state is None:
            task.stop_state, task.stop_reason = state, reason
        if task.proc is None:
            return  # not started: it ends before its process starts
        if hard or task.kill_at is None:
            sig = signal.SIGKILL if hard else signal.SIGTERM
            self.signal_group(task, sig)
            task.kill_at = self.clock() + (0.0 if hard else self.config.stop_grace)
            LOG.info("Stopping %s (%s): %s", task.label, reason, signal_name(sig))

    def kill(self, task: RunningTask) -> None:
        """SIGKILL to all that runs of a task whose end another daemon records: its process
        group, and every process with its marker (a child that left the group with
        ``setsid``), so that nothing of it outlives its recorded end on this node."""
        self.signal_group(task, signal.SIGKILL)
        for pid in marked_pids(f"{self.config.job_id}/{task.task_id}"):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    @staticmethod
    def signal_group(task: RunningTask, sig: int) -> bool:
        """Signal a started task's process group, while its number is still the group's: a
        main process that has been reaped (its leftovers counted down, say) no longer keeps
        the number from going to another process (signal_task_group)."""
        if task.proc.returncode is None:  # not reaped: the number is its own, whatever /proc says
            return signal_group(task.proc.pid, sig)
        return signal_task_group(task.proc.pid, task.leader_start, sig)

    # -- polling and finishing -------------------------------------------------------------

    def poll(self) -> list[tuple[RunningTask, TaskResult]]:
        """Finish every task whose process has ended; those tasks, with their results."""
        self.retry_unfinished()
        self.ends.end_interrupted()
        ended = []
        table = process_table() if self.tasks and self.tasks_of_orphans() else {}
        trees = lineages([t.proc.pid for t in self.tasks.values() if t.proc], table)
        for task in list(self.tasks.values()):
            if task.proc is None:
                continue
            code = task.proc.poll()
            if code is None:
                task.seen = self.clock()
                if table:  # what it started so far, without what has ended since
                    task.lineage = {seen for seen in task.lineage
                                    if table.get(seen[0], (0, -1))[1] == seen[1]}
                    task.lineage |= trees[task.proc.pid]
                if task.kill_at is not None and self.clock() >= task.kill_at:
                    self.signal_group(task, signal.SIGKILL)
                    task.kill_at = self.clock() + 3600  # once is enough
                continue
            if self.leftovers_remain(task):
                continue
            ended.append((task, self._ended(task, code)))
        return ended

    def leftovers_remain(self, task: RunningTask) -> bool:
        """For a task whose main process has ended: True while what it left running is being
        ended (the countdown starts at the first call), False once the task can be finished."""
        try:
            if task.leftovers is None:
                task.leftovers = self.end_leftovers(task)
            return task.leftovers.remain(self.clock())
        except Exception:  # noqa: BLE001 - the task must be recorded whatever happens here
            LOG.exception("cannot end what %s left running", task.label)
            return False

    def _ended(self, task: RunningTask, code: int) -> TaskResult:
        ended = task.leftovers.ended if task.leftovers is not None else self.clock()
        leftovers = task.leftovers.count if task.leftovers is not None else 0
        found = None
        # killed by the fence, or ended while the loop could not look (the daemon suspended,
        # its loop stuck in a write): it ended when it was last known to run, not when found
        last_look = task.seen if task.seen is not None else task.started
        if task.fenced or (last_look is not None and ended - last_look > _END_UNSEEN_SECONDS):
            found, ended = ended, unseen_end(task.started, ended, task.seen,
                                             self.folder.log_written(task.task_id, task.rank))
        self.signal_group(task, signal.SIGKILL)  # whatever is left of its group
        self.tasks.pop(task.key, None)
        exit_code, signum = (None, -code) if code < 0 else (code, None)
        if task.stop_state is not None:
            state, reason = task.stop_state, task.stop_reason
        elif code == 0:
            state, reason = TaskState.DONE, "exit status 0"
        else:
            state = TaskState.FAILED
            reason = (f"exit status {code}" if signum is None
                      else f"killed by signal {signum} ({signal_name(signum)})")
        started = task.started if task.started is not None else ended
        duration = ended - started
        if signum is None:
            footer = f"exited with status {code} after {duration:.1f} s"
        else:
            footer = f"killed by signal {signum} ({signal_name(signum)}) after {duration:.1f} s"
        if task.stop_state is not None:
            footer += f": {reason}"
        lines = [footer]
        if leftovers:
            lines.insert(0, f"ended {leftovers} leftover process(es) of the task")
        try:
            with self.folder.open_log(self.folder.log(task.task_id, task.rank)) as log:
                self.log_lines(log, lines)
        except OSError:
            pass
        result = self.result_of(task, state, reason, started, ended, exit_code, signum, found)
        LOG.info("Task ended: %s: %s (%s)", task.label, state.value, reason)
        self.finish(result)
        return result

    def result_of(self, task: RunningTask, state: TaskState, reason: str, started: float | None,
                  ended: float, exit_code: int | None = None, signum: int | None = None,
                  found: float | None = None) -> TaskResult:
        return TaskResult(task.task_id, state, reason, started, ended, self.identity.host,
                          self.config.node_rank, exit_code, signum, task.attempt, task.gpu_text,
                          task.rank, found=found)

    @staticmethod
    def tasks_of_orphans() -> bool:
        """True where this daemon adopts orphans (a subreaper or PID 1): only there is the
        lineage of its tasks needed to know whose they are."""
        return os.getpid() == 1 or is_subreaper()

    def end_leftovers(self, task: RunningTask) -> Leftovers:
        """Start ending what a finished task left behind: SIGTERM to its process group, and to
        whatever carries its marker (even after ``setsid``); their countdown."""
        now = self.clock()
        self.signal_group(task, signal.SIGTERM)
        others = {f"{self.config.job_id}/{t.task_id}" for t in self.tasks.values()
                  if t.task_id != task.task_id}
        spare = {t.proc.pid for t in self.tasks.values() if t.proc is not None}
        left, alone = leftover_pids(f"{self.config.job_id}/{task.task_id}", others, spare,
                                    task.proc.pid, task.lineage)
        new = [pid for pid in alone if (pid, _start_time(pid)) not in self.left_alone]
        if new:
            self.left_alone |= {(pid, _start_time(pid)) for pid in new}
            LOG.warning("Left alone %d process(es) that the daemon adopted but nothing proves "
                        "to be a task's (docs/protocol.md, Start): %s", len(new),
                        describe_pids(new))
        procs = send_sigterm(left)
        grace = 0.0 if task.hard else min(self.config.stop_grace, CLEANUP_GRACE_SECONDS)
        return Leftovers(now, procs, len(procs), now + grace)

    # -- ends of tasks, published by TaskEnds ----------------------------------------------

    @property
    def unfinished(self) -> list[Unfinished]:
        return self.ends.unfinished

    def finish(self, result: TaskResult, source: str = "running") -> None:
        self.ends.finish(result, source)

    def retry_unfinished(self) -> None:
        self.ends.retry_unfinished()

    def cancel_pending(self, name: str, reason: str = "cancelled by user") -> str | None:
        return self.ends.cancel_pending(name, reason)

    def recover(self, owned_elsewhere: Callable[[dict[str, str]], bool]) -> None:
        self.ends.recover(owned_elsewhere)

    def interrupt(self, task_id: str, run: dict[str, str], reason: str,
                  rank: int | None = None) -> None:
        self.ends.interrupt(task_id, run, reason, rank)


class TaskEnds:
    """The end of each task, published (docs/protocol.md, Finish): its result written, then the
    task moved to done/ or failed/, retried on each poll until it is (a full disk loses
    nothing); a pending task cancelled; and the tasks a dead daemon left, finished as
    interrupted (Recovery)."""

    log_lines = staticmethod(TaskRunner.log_lines)

    def __init__(self, config: Config, folder: QueueFolder, identity: Identity,
                 clock: Callable[[], float], throttled: ThrottledLog):
        self.config = config
        self.folder = folder
        self.identity = identity
        self.clock = clock
        self.throttled = throttled
        self.unfinished: list[Unfinished] = []  # ends not published yet, oldest first
        # tasks of dead daemons whose processes here are being ended, by (id, rank)
        self.interrupting: dict[tuple[str, int | None], Interrupting] = {}
        # the last beat of the daemon this one replaced on its node, by its ``started`` (its
        # state file names this daemon since); and when this daemon's start ended what tasks
        # of it still ran here, by task id: when those tasks last ran (unseen_end)
        self.last_beats: dict[str, float] = {}
        self.ran_until: dict[str, float] = {}
        self.ended: Callable[[TaskResult], None] = lambda result: None  # a task's result is out
        # False once another daemon holds this node: it records this daemon's tasks, not this one
        self.may_record: Callable[[], bool] = lambda: True

    def finish(self, result: TaskResult, source: str = "running") -> None:
        self.unfinished.append(Unfinished(result, source))
        self.retry_unfinished()

    def retry_unfinished(self) -> None:
        """Publish results and moves that failed before (a full disk): nothing is lost. Each
        is tried on its own: one that cannot be published (a folder sits where its result
        belongs) keeps no other task's end from being recorded."""
        for entry in list(self.unfinished):
            try:
                self.publish_result(entry)
            except OSError as exc:
                if self.folder.ensure():
                    self.throttled.warning("dirs", "queue folders were missing: created again")
                self.throttled.warning(f"finish:{entry.result.task_id}", "cannot record the end "
                                       "of %s (will retry): %s", entry.result.task_id, exc)
                continue
            self.unfinished[:] = [e for e in self.unfinished if e is not entry]

    def publish_result(self, entry: Unfinished) -> None:
        """Write the result, then move the task from ``source`` to done/ or failed/; the
        result only while no other daemon has recorded this run's end (docs/protocol.md,
        Finish). A task missing from ``source`` with no such end on record is waited for
        (OSError: retried) up to HEARTBEAT_STALE_SECONDS, then its result is written all the
        same: a folder away for a moment loses no end."""
        result, source = entry.result, entry.source
        if result.rank is not None:  # one rank of a gang: node 0 finishes the task
            kind = self.folder.record(result.task_id, "result", result.rank)

            def open_rank() -> bool:
                return (self.folder.dir("running") / result.task_id).exists() \
                    and not kind.exists()
            if not (open_rank() and self.folder.publish(kind, format_fields(result.fields()),
                                                        still=open_rank)):
                LOG.warning("%s rank %d: the task was finished meanwhile; its end is not "
                            "recorded", result.task_id, result.rank)
            return
        if not entry.published:
            if not self.may_record():
                LOG.warning("%s ended after another daemon took this node over: its end is "
                            "left to that daemon", result.task_id)
                return
            here = (self.folder.dir(source) / result.task_id).exists()

            def elsewhere() -> bool:
                return self._finished_elsewhere(result) or (
                    not here and self.folder.in_finished(result.task_id))
            if elsewhere():
                LOG.warning("%s was finished by another daemon meanwhile (it took this node "
                            "over); its end here is not recorded", result.task_id)
                return
            if not here:
                now = self.clock()
                if entry.missing_since is None:
                    entry.missing_since = now
                if now - entry.missing_since < HEARTBEAT_STALE_SECONDS:
                    raise FileNotFoundError(errno.ENOENT, f"{source}/ has it no more, and no "
                                            "other end of it is on record", result.task_id)
            # asked again once the result is written: a write that hung on stalled storage
            # comes back after another daemon may have recorded this run's end meanwhile
            if not self.folder.publish(self.folder.record(result.task_id, "result"),
                                       format_fields(result.fields()),
                                       still=lambda: not self._finished_elsewhere(result)):
                LOG.warning("%s was finished by another daemon while its end was written here "
                            "(this node was taken for dead); its end here is not recorded",
                            result.task_id)
                return
            entry.published = True
            self.ended(result)
        try:
            self.folder.finish(result.task_id, source, result.state.folder)
        except FileNotFoundError:
            if not self.folder.dir(result.state.folder).is_dir():
                raise
            # else moved already (a retry after a lost reply)

    def _finished_elsewhere(self, result: TaskResult) -> bool:
        """True when this very run of the task has a result already: another daemon's (one
        with another start is an earlier run's, stale, and is replaced)."""
        try:
            old = self.folder.read_fields(self.folder.record(result.task_id, "result"))
        except (OSError, ValueError):
            return False
        if old is None:
            return False
        started = "" if result.started is None else f"{result.started:.3f}"
        return old.get("started", "") == started

    def cancel_pending(self, name: str, reason: str = "cancelled by user") -> str | None:
        """Move a pending task to failed/ as cancelled; its id, or None when it is not pending
        (any more). The destination is never an existing task's (docs/protocol.md)."""
        if name.startswith(".") or "/" in name or not regular_file(self.folder.dir("pending")
                                                                   / name):
            return None  # (a link, FIFO or folder in pending/ is no task: it stays)
        try:
            try:
                task_id = self.folder.cancel(name)
            except FileNotFoundError:
                if not os.path.lexists(self.folder.dir("pending") / name):
                    return None  # claimed or cancelled meanwhile
                made = self.folder.ensure()  # failed/ was missing (removed by hand)
                if made:
                    LOG.warning("queue folders were missing: created again (%s)",
                                ", ".join(made))
                task_id = self.folder.cancel(name)
        except FileNotFoundError:
            return None
        except OSError as exc:
            LOG.warning("cannot cancel %s: %s", name, exc)
            return None
        now = self.clock()
        result = TaskResult(task_id, TaskState.CANCELLED, reason, None, now,
                            self.identity.host, self.config.node_rank)
        try:
            self.folder.publish(self.folder.record(task_id, "result"),
                                format_fields(result.fields()))
        except OSError as exc:
            LOG.warning("cancelled %s but cannot write its result: %s", task_id, exc)
        LOG.info("Task cancelled: %s (%s)", task_id, reason)
        self.ended(result)
        return task_id

    def remember_predecessor(self) -> None:
        """Note when the daemon that held this node last beat, before this daemon's first
        beat replaces its state and beat files: its tasks ended no earlier (Recovery)."""
        try:
            fields = self.folder.read_fields(self.folder.state_path(self.config.node_rank))
        except (OSError, ValueError):
            return
        daemon = (fields or {}).get("started", "")
        beat = self.folder.last_beat(self.config.node_rank, daemon) if daemon else None
        if beat is not None:
            self.last_beats[daemon] = beat

    def last_beat(self, run: Mapping[str, str]) -> float | None:
        """When the daemon that claimed a run (its record's ``daemon``) last beat, on its
        clock; None when that is not known any more."""
        daemon, node = run.get("daemon", ""), ascii_int(run.get("node_rank"))
        if not daemon or node is None:
            return None
        if daemon in self.last_beats:
            return self.last_beats[daemon]
        return self.folder.last_beat(node, daemon)

    def recover(self, owned_elsewhere: Callable[[dict[str, str]], bool]) -> None:
        """Finish the tasks of this node that a dead daemon left in running/: those whose run
        record names this node (docs/protocol.md, Recovery). ``owned_elsewhere(run)`` is True
        for a run record whose claim is another node's (it is left alone)."""
        for task_id in self.folder.names("running"):
            try:
                run = self.folder.read_fields(self.folder.record(task_id, "run"))
            except (OSError, ValueError):
                run = None
            if run is not None and owned_elsewhere(run):
                continue
            try:
                old = self.folder.read_fields(self.folder.record(task_id, "result"))
            except (OSError, ValueError):
                old = None
            # A result counts only if it is this run's (not one left by an earlier run).
            if old and old.get("state") in {s.value for s in TaskState} and (
                    run is None or old.get("started") == run.get("started")):
                folder = TaskState(old["state"]).folder
                with contextlib.suppress(OSError):
                    self.folder.finish(task_id, "running", folder)
                LOG.info("Recovered %s: moved to %s/ as its result says", task_id, folder)
                continue
            if run is not None:
                self.interrupt(task_id, run, "daemon died")

    def interrupt(self, task_id: str, run: dict[str, str], reason: str,
                  rank: int | None = None) -> None:
        """Finish a task (or rank) whose daemon died: when it ran in this very host, boot and
        PID namespace, what is left of it gets SIGTERM now and SIGKILL after the stop grace, by
        a countdown that each turn checks (``end_interrupted``): the loop, and with it the
        heartbeat, never waits for them. Once they are gone, it is noted in its log and
        published interrupted. A task already being interrupted is left to its countdown."""
        key = (task_id, rank)
        if key in self.interrupting:
            return
        procs = []
        if self.identity.same_machine_view(run) or (run and not run.get("host")):
            procs = send_sigterm(marked_pids(f"{self.config.job_id}/{task_id}"))
        now = self.clock()
        self.interrupting[key] = Interrupting(task_id, dict(run), reason, rank, Leftovers(
            now, procs, len(procs), now + self.config.stop_grace))
        self.end_interrupted()

    def end_interrupted(self) -> None:
        """Publish, as interrupted, the tasks of dead daemons whose processes here are gone
        (or were SIGKILLed ``KILL_WAIT_SECONDS`` ago); the others' countdowns go on."""
        for key, entry in list(self.interrupting.items()):
            try:
                if entry.leftovers.remain(self.clock()):
                    continue
            except Exception:  # noqa: BLE001 - the task must be recorded whatever happens here
                LOG.exception("cannot end what is left of %s", entry.task_id)
            del self.interrupting[key]
            self._publish_interrupted(entry)

    def _publish_interrupted(self, entry: Interrupting) -> None:
        """Publish the end of a task (or rank) whose daemon died: ``ended`` when it last ran
        as far as is known (its processes ended here now, or at this daemon's start; else its
        daemon's last beat or its log's last write), ``found`` now (docs/protocol.md)."""
        task_id, run, reason, rank = entry.task_id, entry.run, entry.reason, entry.rank
        killed = entry.leftovers.count
        started = as_float(run.get("started"))
        now = self.clock()
        ended = unseen_end(started, now, now if killed else self.ran_until.get(task_id),
                           self.last_beat(run), self.folder.log_written(task_id, rank))
        node = ascii_int(run.get("node_rank"))
        result = TaskResult(task_id, TaskState.INTERRUPTED, reason, started, ended,
                            run.get("host") or self.identity.host,
                            self.config.node_rank if node is None else node,
                            attempt=ascii_int(run.get("attempt")) or 1,
                            gpus=run.get("gpus", ""), rank=rank, found=now)
        line = f"interrupted: {reason}; {killed} orphaned process(es) ended"
        if ended != now:
            line += f"; last known to run at {now_text(ended)}"
        try:
            with self.folder.open_log(self.folder.log(task_id, rank)) as log:
                self.log_lines(log, [line])
        except OSError:
            pass
        self.finish(result)
        LOG.warning("Task %s was interrupted (%s): finished as interrupted (%d orphaned "
                    "process(es) ended)", task_id if rank is None else f"{task_id} rank {rank}",
                    reason, killed)


class PassApplier:
    """Carries out the plan of a queue pass (``plan_pass``) on this node: node 0 fails,
    cancels and places tasks that span nodes, in run order; then the tasks that start are
    claimed and handed to ``begin``. Every move of a task is one of the queue folder's
    transitions (claim, unclaim, cancel), through the runner where it has one."""

    def __init__(self, config: Config, folder: QueueFolder, runner: TaskRunner, gangs: Gangs,
                 clock: Callable[[], float], throttled: ThrottledLog,
                 begin: Callable[[RunningTask], None], owns_node: Callable[[], bool],
                 load: Callable[[], NodeLoad], backing_off: Callable[[float], bool]):
        self.config = config
        self.folder = folder
        self.runner = runner
        self.gangs = gangs
        self.clock = clock
        self.throttled = throttled
        self.begin = begin
        self.owns_node = owns_node
        self.load = load  # what the node's tasks use now
        self.backing_off = backing_off  # True while the node claims nothing (after a failure)

    def apply(self, plan: PassPlan, snapshot: PassSnapshot, running: list[str]) -> set[str]:
        """Carry ``plan`` out; the pending names begun here (``running`` gains the ids of the
        tasks placed across nodes)."""
        if not (plan.fails or plan.cancels or plan.gangs or plan.starts):
            return set()
        subs = {t.name: t.submission for t in snapshot.pending}
        fails, cancels, gangs = dict(plan.fails), dict(plan.cancels), dict(plan.gangs)
        for name in plan.order:
            if name in fails:
                self.fail(name, fails[name])
            elif name in cancels:
                self.runner.cancel_pending(name, cancels[name])
            elif name in gangs:
                self.place(name, subs[name], gangs[name], running)
        return self.start(plan, subs, snapshot.now, snapshot.backfill_limit)

    def fail(self, name: str, why: str) -> None:
        """Node 0 fails a pending task that can never run, at once, with the reason."""
        try:
            task_id = self.folder.claim(name)
        except OSError:
            return
        now = self.clock()
        LOG.warning("Task %s cannot run: %s", task_id, why)
        try:
            with self.folder.open_log(self.folder.log(task_id)) as log:
                self.runner.log_lines(log, [f"task: {task_id}", f"not run: {why}"])
        except OSError:
            pass
        self.runner.finish(TaskResult(task_id, TaskState.FAILED, why, None, now,
                                      self.runner.identity.host, self.config.node_rank))

    def place(self, name: str, sub: Submission, nodes: tuple[int, ...],
              running: list[str]) -> None:
        """Node 0 places a task that spans nodes: its placement is published, then the task
        claimed; a claim lost takes the placement back."""
        task_id = self.folder.id_for(name)
        plan = GangPlan(task_id, nodes, sub.request.gpus, f"{self.clock():.6f}")
        try:
            self.folder.publish(self.folder.record(task_id, "gang"), format_fields(plan.fields()))
        except OSError as exc:
            self.throttled.warning(f"place:{name}", "cannot place %s: %s", name, exc)
            return
        if not self.owns_node() or self.runner.claim(name) != task_id:
            self.folder.remove_record(task_id, "gang")
            return
        self.gangs.plans[task_id] = plan
        running.append(task_id)
        LOG.info("Task %s placed on nodes %s (ranks 0..%d)", task_id,
                 ",".join(str(n) for n in nodes), len(nodes) - 1)

    def start(self, plan: PassPlan, subs: Mapping[str, Submission | str], now: float,
              backfill_limit: float) -> set[str]:
        """Claim and begin the tasks that start here, in order. An entry that cannot be
        claimed (another node took it) or was held meanwhile is left; what was planned behind
        it is placed again on the node's load as it is then."""
        begun: set[str] = set()
        if not plan.starts or not self.owns_node():
            return begun
        starts, candidates = plan.starts, list(plan.candidates)
        while starts:
            lost = set()
            for name, gpus in starts:
                task_id = self.runner.claim(name)
                if task_id is None:
                    lost.add(name)  # another node took it, or it cannot be claimed
                    break
                if self.folder.is_held(name):
                    # held while it was being claimed: gpu_hold saw it still pending, so it
                    # must not start; back it goes
                    self.runner.unclaim(task_id)
                    lost.add(name)
                    break
                begun.add(name)
                self.begin(RunningTask(task_id, subs[name], gpus, now))
                if self.backing_off(now):
                    return begun
            if not lost:
                return begun
            candidates = [c for c in candidates if c.task_id not in lost
                          and c.task_id not in begun]
            starts = plan_starts(candidates, self.load(), now, backfill_limit).starts
        return begun


class Callbacks:
    """The user's callback (``TASK_CALLBACK``, ``--callback``), run with bash once for each
    task whose end this daemon records, as pueue's callback: in its own session, with the end
    of the task in ``PM_TASK_*``, its output in the daemon's. The loop never waits for it; one
    still running after ``CALLBACK_TIMEOUT_SECONDS`` is killed."""

    def __init__(self, command: str, folder: QueueFolder, job_id: str,
                 clock: Callable[[], float], throttled: ThrottledLog):
        self.command = command
        self.folder = folder
        self.job_id = job_id
        self.clock = clock
        self.throttled = throttled
        self.running: list[tuple[subprocess.Popen, float, str]] = []  # process, deadline, task

    def task_ended(self, result: TaskResult) -> None:
        if not self.command:
            return
        end = {key: "" if value is None else str(value) for key, value in result.fields().items()}
        logs = [self.folder.log(result.task_id), self.folder.log(result.task_id, 0)]
        log = next((str(path) for path in logs if path.exists()), "")  # "": it never ran
        env = {**os.environ, "PM_JOB_ID": self.job_id, "PM_TASK_ID": result.task_id,
               "PM_TASK_NAME": short_name(result.task_id), "PM_TASK_STATE": end["state"],
               "PM_TASK_EXIT_CODE": end["exit_code"], "PM_TASK_SIGNAL": end["signal"],
               "PM_TASK_REASON": end["reason"], "PM_TASK_DURATION": end["duration"],
               "PM_TASK_HOST": end["host"], "PM_TASK_LOG": log,
               CALLBACK_VAR: f"{self.job_id}/{result.task_id}"}  # no sweep or clean-up ends it
        try:
            proc = subprocess.Popen(["bash", "-c", self.command], env=env, cwd=self.folder.root,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            self.throttled.warning("callback", "cannot run the callback: %s", exc)
            return
        self.running.append((proc, self.clock() + CALLBACK_TIMEOUT_SECONDS, result.task_id))

    def poll(self) -> None:
        """Reap the callbacks that ended (saying which failed), kill the ones past their time."""
        for entry in list(self.running):
            proc, deadline, task_id = entry
            code = proc.poll()
            if code is None and self.clock() >= deadline:
                signal_group(proc.pid, signal.SIGKILL)
                LOG.warning("The callback for %s ran past %g s: killed", task_id,
                            CALLBACK_TIMEOUT_SECONDS)
                proc.wait()
            elif code is None:
                continue
            elif code:
                LOG.warning("The callback for %s failed (exit status %d)", task_id, code)
            self.running.remove(entry)

    def pids(self) -> set[int]:
        return {proc.pid for proc, _, _ in self.running}


# Tasks across nodes #########################################################################
#
# A task with ``nodes=N`` runs on N nodes at once, one rank on each, as ``srun`` starts a step
# inside an allocation (docs/protocol.md, "Tasks that span nodes"). Node 0 places it and watches
# it; every chosen node sets GPUs aside for its rank, says when it is ready, and starts the rank
# once every rank is ready.


class Liveness:
    """Whether other nodes' daemons live, judged as Slurm's controller judges its nodes: by
    whether their heartbeat advances, timed on this daemon's own monotonic clock. A node's
    pulse (its beat file and its state file's ``heartbeat``) that has not changed for
    HEARTBEAT_STALE_SECONDS of this clock is dead; the times in it are never compared with this
    host's clock, so a clock ahead cannot keep a dead node alive and one behind cannot kill a
    live one. A node seen for the first time has the full stale time to show that it beats."""

    def __init__(self, monotonic: Callable[[], float]):
        self.monotonic = monotonic
        self.seen: dict[int, tuple[str, float]] = {}  # rank -> its pulse, when it last changed

    def advancing(self, rank: int, pulse: str) -> bool:
        now = self.monotonic()
        last = self.seen.get(rank)
        if last is None or last[0] != pulse:
            self.seen[rank] = (pulse, now)
            return True
        return now - last[1] < HEARTBEAT_STALE_SECONDS


@dataclasses.dataclass(frozen=True)
class NodeView:
    """A node of the instance as its state file shows it."""

    rank: int
    alive: bool
    known: bool = True  # False: its state file could not be read just now (judge nothing)
    token: str = ""  # its daemon's ``started``
    host: str = ""
    gpu_count: int = 0
    gpus_free: int = 0
    status: str = ""

    @classmethod
    def read(cls, folder: QueueFolder, rank: int, liveness: Liveness) -> NodeView:
        try:
            fields = folder.read_fields(folder.state_path(rank)) or {}
        except (OSError, ValueError):
            return cls(rank, alive=False, known=False)
        pulse = f"{fields.get('started')} {fields.get('heartbeat')} {folder.read_beat(rank)}"
        alive = (fields.get("status") not in ("stopped", None)
                 and liveness.advancing(rank, pulse))
        return cls(rank, alive, True, fields.get("started", ""), fields.get("host", ""),
                   ascii_int(fields.get("gpu_count"), 1024) or 0,
                   ascii_int(fields.get("gpus_free"), 1024) or 0, fields.get("status", ""))


@dataclasses.dataclass(frozen=True)
class GangPlan:
    """Where the ranks of a task that spans nodes run (``records/<id>.gang``)."""

    task_id: str
    nodes: tuple[int, ...]  # the node of each rank, in rank order
    gpus: int | None  # GPUs of each rank; None: all of its node's
    placed: str  # names this placement; .ready records quote it

    @property
    def nnodes(self) -> int:
        return len(self.nodes)

    def fields(self) -> dict[str, object]:
        return {"id": self.task_id, "nnodes": self.nnodes,
                "nodes": ",".join(str(n) for n in self.nodes),
                "gpus": "all" if self.gpus is None else self.gpus, "placed": self.placed}

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> GangPlan:
        nodes = tuple(ascii_int(n, 4096) for n in fields.get("nodes", "").split(","))
        if not nodes or None in nodes or len(set(nodes)) != len(nodes):
            raise ValueError(f"bad nodes={fields.get('nodes')!r}")
        request = Request.parse(fields.get("gpus", ""))
        return cls(fields.get("id", ""), nodes, request.gpus, fields.get("placed", ""))


@dataclasses.dataclass
class GangSeat:
    """This node's rank of a placed task, from its reservation to its start."""

    plan: GangPlan
    rank: int
    submission: Submission
    reserved: tuple[int, ...] = ()  # GPUs set aside for it
    ready: bool = False
    master: tuple[str, int] | None = None  # rank 0: the address and port it announced

    @property
    def task_id(self) -> str:
        return self.plan.task_id


class Gangs:
    """The tasks across nodes that concern this node: its seats (every node), and the watch
    over all of them (node 0)."""

    def __init__(self, config: Config, folder: QueueFolder, runner: TaskRunner,
                 clock: Callable[[], float], throttled: ThrottledLog, node_addr: str):
        self.config = config
        self.folder = folder
        self.runner = runner
        self.clock = clock
        self.throttled = throttled
        self.node_addr = node_addr
        self.plans: dict[str, GangPlan | None] = {}  # by id in running/; None: not a gang
        self.seats: dict[str, GangSeat] = {}
        self.rank_results: dict[tuple[str, int], dict[str, str]] = {}
        self.failed_seen: dict[str, float] = {}  # node 0: when a rank's failure was first seen

    # -- every node ------------------------------------------------------------------------

    def discover(self, running: list[str]) -> None:
        """Learn the placements of the tasks in running/ (published before their claim, so a
        task without one is no gang) and take a seat for each rank placed on this node."""
        present = set(running)
        for task_id in running:
            if task_id not in self.plans:
                self.plans[task_id] = self._read_plan(task_id)
        for task_id in [t for t in self.plans if t not in present]:
            del self.plans[task_id]
            self.failed_seen.pop(task_id, None)
            self.seats.pop(task_id, None)
        for key in [k for k in self.rank_results if k[0] not in present]:
            del self.rank_results[key]
        me = self.config.node_rank
        for task_id, plan in self.plans.items():
            if plan is None or me not in plan.nodes or task_id in self.seats:
                continue
            rank = plan.nodes.index(me)
            if (task_id, rank) in self.runner.tasks or \
                    self.folder.record(task_id, "result", rank).exists():
                continue  # started here, or ended
            run = self._rank_record(task_id, rank, "run")
            if run is not None:
                if run.get("daemon") != self.runner.token:  # an earlier daemon's: it died
                    self.runner.interrupt(task_id, run, "daemon died", rank=rank)
                continue
            self.seats[task_id] = GangSeat(plan, rank, self._submission(task_id))

    def _read_plan(self, task_id: str) -> GangPlan | None:
        try:
            fields = self.folder.read_fields(self.folder.record(task_id, "gang"))
            return GangPlan.from_fields(fields) if fields else None
        except (OSError, ValueError) as exc:
            self.throttled.warning(f"gang:{task_id}", "unreadable placement of %s: %s",
                                   task_id, exc)
            return None

    def _submission(self, task_id: str) -> Submission:
        try:
            fields = self.folder.read_fields(self.folder.record(task_id, "submit")) or {}
            return Submission.from_fields(fields)
        except (OSError, ValueError):
            return Submission()

    def _rank_record(self, task_id: str, rank: int, kind: str) -> dict[str, str] | None:
        try:
            return self.folder.read_fields(self.folder.record(task_id, kind, rank))
        except (OSError, ValueError):
            return None

    def reserved(self) -> set[int]:
        return {gpu for seat in self.seats.values() for gpu in seat.reserved}

    def reservations(self) -> dict[int, str]:
        """The GPUs set aside for ranks that have not started yet, with the task's id."""
        return {gpu: seat.task_id for seat in self.seats.values() for gpu in seat.reserved}

    def holds_node(self) -> int:
        """Seats that count as GPU tasks (they keep tasks that take the node whole out)."""
        return sum(1 for seat in self.seats.values() if seat.plan.gpus != 0)

    def cpu_seats(self) -> int:
        return sum(1 for seat in self.seats.values() if seat.plan.gpus == 0)

    def tick_seats(self, load: NodeLoad, stopped: Callable[[str], str | None],
                   begin: Callable[[RunningTask], None], may_start: bool) -> None:
        """Reserve, announce and start this node's ranks. ``load`` is the node without the
        seats; ``stopped(id)`` the reason of a stop record, or None; ``begin(task)`` starts a
        rank as any task (keep-alive frees its GPUs first)."""
        for task_id in sorted(self.seats):
            seat = self.seats[task_id]
            reason = stopped(task_id) or ("" if may_start else "its node is shutting down")
            if reason:
                del self.seats[task_id]
                self._end_unstarted(seat, TaskState.STOPPED if stopped(task_id)
                                    else TaskState.INTERRUPTED, reason)
                continue
            if not seat.ready:
                others = dataclasses.replace(load, taken=load.taken - set(seat.reserved))
                seat.reserved = self._reserve(seat, others)
                if self._complete(seat, others):
                    self._announce(seat)
            if seat.ready and self._all_ready(seat):
                del self.seats[task_id]
                addr, port = self._master(seat)
                task = RunningTask(task_id, seat.submission, seat.reserved, self.clock(),
                                   rank=seat.rank, nnodes=seat.plan.nnodes,
                                   rendezvous=(addr, port))
                begin(task)
            load = dataclasses.replace(load, taken=load.taken | set(seat.reserved))

    def _reserve(self, seat: GangSeat, load: NodeLoad) -> tuple[int, ...]:
        need = load.total if seat.plan.gpus is None else seat.plan.gpus
        have = list(seat.reserved)
        for gpu in load.free:
            if len(have) >= need:
                break
            if gpu not in have:
                have.append(gpu)
        return tuple(sorted(have))

    @staticmethod
    def _complete(seat: GangSeat, load: NodeLoad) -> bool:
        if seat.plan.gpus == 0:
            return load.cpu_running < load.cpu_slots
        if seat.plan.gpus is None:
            return len(seat.reserved) == load.total and load.gpu_tasks == 0
        return len(seat.reserved) == seat.plan.gpus

    def _announce(self, seat: GangSeat) -> None:
        fields: dict[str, object] = {
            "id": seat.task_id, "rank": seat.rank, "node_rank": self.config.node_rank,
            "host": self.runner.identity.host, "placed": seat.plan.placed,
            "gpus": self.runner.inventory.numbers(seat.reserved), "time": f"{self.clock():.3f}"}
        if seat.rank == 0:
            seat.master = (self.node_addr, self.runner.ports.pick(seat.task_id, self.clock()))
            fields.update(master_addr=seat.master[0], master_port=seat.master[1])
        try:
            self.folder.publish(self.folder.record(seat.task_id, "ready", seat.rank),
                                format_fields(fields))
        except OSError as exc:
            self.throttled.warning(f"ready:{seat.task_id}", "cannot announce rank %d of %s: %s",
                                   seat.rank, seat.task_id, exc)
            return
        seat.ready = True
        LOG.info("%s rank %d: ready on GPUs %s; waiting for the other ranks", seat.task_id,
                 seat.rank, fields["gpus"] or "none")

    def _all_ready(self, seat: GangSeat) -> bool:
        for rank in range(seat.plan.nnodes):
            if rank == seat.rank:
                continue
            fields = self._rank_record(seat.task_id, rank, "ready")
            if not fields or fields.get("placed") != seat.plan.placed:
                return False
        return True

    def _master(self, seat: GangSeat) -> tuple[str, int]:
        if seat.master is not None:
            return seat.master
        fields = self._rank_record(seat.task_id, 0, "ready") or {}
        return fields.get("master_addr", "127.0.0.1"), ascii_int(fields.get("master_port")) or 0

    def _end_unstarted(self, seat: GangSeat, state: TaskState, reason: str) -> None:
        now = self.clock()
        result = TaskResult(seat.task_id, state, f"{reason} (before it started)", None, now,
                            self.runner.identity.host, self.config.node_rank, rank=seat.rank)
        self.runner.finish(result)

    # -- node 0: the watch -----------------------------------------------------------------

    def watch(self, views: Mapping[int, NodeView], stop: Callable[[str, str], None]) -> None:
        """Finish gangs whose ranks have all ended; stop the others of a gang one of whose
        ranks failed or whose node died; put back a gang none of whose ranks could start."""
        now = self.clock()
        for task_id, plan in list(self.plans.items()):
            if plan is None:
                continue
            ends = {}
            for rank in range(plan.nnodes):
                if (task_id, rank) not in self.rank_results:
                    fields = self._rank_record(task_id, rank, "result")
                    if fields:
                        self.rank_results[(task_id, rank)] = fields
                if (task_id, rank) in self.rank_results:
                    ends[rank] = self.rank_results[(task_id, rank)]
            if len(ends) == plan.nnodes:
                self._finish_gang(plan, ends)
                continue
            if self._requeue_if_dead_before_start(plan, views):
                continue
            for rank in range(plan.nnodes):
                if rank in ends:
                    continue
                node = plan.nodes[rank]
                view = views.get(node)
                if view is not None and not view.known:
                    continue
                run = self._rank_record(task_id, rank, "run")
                gone = view is None or not view.alive or (
                    run is not None and run.get("daemon", "") != view.token)
                if gone:
                    self.runner.interrupt(task_id, run or {}, f"node {node}'s daemon died",
                                          rank=rank)
                    stop(task_id, f"rank {rank} lost: node {node}'s daemon died")
            failed = [(r, e) for r, e in sorted(ends.items()) if e.get("state") != "done"]
            if failed:
                first = self.failed_seen.setdefault(task_id, now)
                rank, end = failed[0]
                if now - first >= GANG_FAIL_GRACE_SECONDS:
                    stop(task_id, f"rank {rank} failed ({end.get('reason', '?')})")

    def _requeue_if_dead_before_start(self, plan: GangPlan, views: Mapping[int, NodeView]) -> bool:
        dead = [n for n in plan.nodes if not (views.get(n) and views[n].alive)
                and (views.get(n) is None or views[n].known)]
        if not dead:
            return False
        started = any(self._rank_record(plan.task_id, r, "run") for r in range(plan.nnodes))
        if started:
            return False
        try:
            self.folder.unclaim(plan.task_id)
        except OSError:
            return False
        LOG.warning("%s: node %s died before every rank was ready: back to pending",
                    plan.task_id, ",".join(str(n) for n in dead))
        self.plans.pop(plan.task_id, None)
        self.seats.pop(plan.task_id, None)
        return True

    def _finish_gang(self, plan: GangPlan, ends: dict[int, dict[str, str]]) -> None:
        extra: list[tuple[str, str]] = [("nodes", ",".join(str(n) for n in plan.nodes))]
        for rank, end in sorted(ends.items()):
            for key in ("state", "exit_code", "signal", "reason", "node_rank", "host", "gpus"):
                name = "node" if key == "node_rank" else key
                extra.append((f"rank.{rank}.{name}", end.get(key, "")))
        bad = [(r, e) for r, e in sorted(ends.items()) if e.get("state") != "done"]
        stop = self.folder.stop_reason(plan.task_id)
        order = ("timeout", "failed", "interrupted", "stopped", "cancelled")
        bad.sort(key=lambda r_e: (order.index(r_e[1].get("state")) if r_e[1].get("state")
                                  in order else len(order), r_e[0]))
        cause_rank, cause = bad[0] if bad else (None, {})  # the rank that ended it
        if not bad:
            state, reason = TaskState.DONE, f"all {plan.nnodes} ranks exited 0"
        elif stop and stop.startswith("stopped by user"):
            state, reason = TaskState.STOPPED, stop
        else:
            state = {"interrupted": TaskState.INTERRUPTED, "timeout": TaskState.TIMEOUT}.get(
                cause.get("state", ""), TaskState.FAILED)
            reason = f"rank {cause_rank}: {cause.get('reason', '')}"
        first_bad = cause or ends[0]
        starts = [v for v in (as_float(e.get("started")) for e in ends.values()) if v is not None]
        stops = [v for v in (as_float(e.get("ended")) for e in ends.values()) if v is not None]
        # the task's end was seen unless no rank's was (their nodes died): then it is found too
        found = [as_float(e.get("found")) for e in ends.values()]
        lead = ends.get(0, {})
        lead_node = ascii_int(lead.get("node_rank"))
        result = TaskResult(plan.task_id, state, reason, min(starts) if starts else None,
                            max(stops) if stops else self.clock(), lead.get("host", ""),
                            plan.nodes[0] if lead_node is None else lead_node,
                            ascii_int(first_bad.get("exit_code")), ascii_int(first_bad.get(
                                "signal")), gpus=lead.get("gpus", ""), extra=tuple(extra),
                            found=None if None in found else max(found))
        LOG.info("Task ended: %s: %s (%s)", plan.task_id, state.value, reason)
        self.runner.finish(result)
        self.plans.pop(plan.task_id, None)



# Tasks across nodes: the queue pass #########################################################


class Scheduler:
    """The queue pass of one node, each poll (docs/protocol.md, "Which task starts where"):
    the gangs' seats and watch, then one snapshot of the queue (QueueFolder.read_pass), the
    plan for it (``plan_pass``) and the plan carried out (PassApplier). Node 0 also finishes
    the tasks of dead nodes."""

    def __init__(self, config: Config, folder: QueueFolder, runner: TaskRunner, gangs: Gangs,
                 inventory: Inventory, clock: Callable[[], float], throttled: ThrottledLog,
                 begin: Callable[[RunningTask], None], owns_node: Callable[[], bool]):
        self.config = config
        self.folder = folder
        self.runner = runner
        self.gangs = gangs
        self.inventory = inventory
        self.clock = clock
        self.throttled = throttled
        self.begin = begin
        self.owns_node = owns_node
        self.requests: dict[str, Submission | str] = {}  # pending name -> its record or why not
        self.results: dict[str, str] = {}  # task id -> its result's state, once known
        self.blocked_since: dict[str, float] = {}
        self.waiting: tuple[str, str] | None = None  # what the first stuck task waits for
        self.last_plan: tuple[PassSnapshot, PassPlan, float] | None = None  # (Scheduler.plan)
        self.unrecorded: dict[str, float] = {}  # node 0: running/ entries without a record
        self.overrides_gone: dict[tuple[str, str], float] = {}  # node 0: since when an entry
        # of held/ or priority/ (folder, id) has had no task in pending/
        self.views: dict[int, NodeView] = {}
        self.views_read = -1e18
        self.liveness = Liveness(clock)  # the daemon gives it its monotonic clock
        self.backoff_until = -1e18  # no claims before this: the node cannot prepare tasks
        self.backoff = 0.0
        self.last_sweep = -1e18
        self.applier = PassApplier(config, folder, runner, gangs, clock, throttled, begin,
                                   owns_node, self.load, lambda now: now < self.backoff_until)

    @property
    def is_leader(self) -> bool:
        return self.config.node_rank == 0

    def run(self, running: list[str], may_start: bool, drained: str | None = None,
            node_drained: str | None = None) -> None:
        """One pass: the gangs' seats and watch, then the pending tasks. A drained instance
        (``drained``, why) starts nothing new, a drained node (``node_drained``) starts nothing
        new itself; gangs placed before go on."""
        now = self.clock()
        self.gangs.discover(running)
        self.gangs.tick_seats(self.load(seats=False), self.folder.stop_reason, self.begin,
                              may_start)
        if self.is_leader:
            views = self.node_views()
            self.gangs.watch(views, lambda task_id, why: self.folder.publish_stop(
                task_id, why, f"node {self.config.node_rank}", self.clock()))
            if now - self.last_sweep >= HEARTBEAT_SECONDS:
                self.last_sweep = now
                self.sweep_running(running, views)
        snapshot = self.snapshot(now, running, may_start, drained, node_drained)
        if self.is_leader:
            self.forget_overrides([t.name for t in snapshot.pending], set(snapshot.held),
                                  snapshot.priority)
        plan = self.plan(snapshot)
        self.blocked_since = dict(plan.blocked_since)
        self.waiting = plan.waiting
        for name in self.applier.apply(plan, snapshot, running):
            self.requests.pop(name, None)  # (claimed: back in pending/, it is read again)

    def plan(self, snapshot: PassSnapshot) -> PassPlan:
        """``plan_pass`` of the snapshot; or the last pass's plan, when that plan changed
        nothing (no start, failure, cancel or placement), the snapshot is the same but for the
        time, and nothing that the time decides has come due (a task reaching the backfill
        limit, a back-off ending). A queue of thousands of waiting tasks is then planned once,
        not at every poll."""
        last = self.last_plan
        if (last is not None and snapshot.now < last[2]
                and dataclasses.replace(snapshot, now=0.0) == last[0]):
            return last[1]
        plan = plan_pass(snapshot)
        self.last_plan = None
        if not (plan.starts or plan.fails or plan.cancels or plan.gangs):
            due = min((since + snapshot.backfill_limit for since in plan.blocked_since.values()),
                      default=math.inf)
            if snapshot.backoff_until > snapshot.now:
                due = min(due, snapshot.backoff_until)
            # the next pass reads the blocked tasks' times from this plan
            same = dataclasses.replace(snapshot, now=0.0, blocked_since=plan.blocked_since)
            self.last_plan = (same, plan, due)
        return plan

    def snapshot(self, now: float, running: list[str], may_start: bool,
                 drained: str | None = None, node_drained: str | None = None) -> PassSnapshot:
        """What this pass knows: the node's own facts, and the queue read once."""
        rank = self.config.node_rank
        views = self.node_views() if self.is_leader or self.config.num_nodes > 1 else {}
        node = PassSnapshot(now=now, load=self.load(), node_rank=rank,
                            num_nodes=self.config.num_nodes, views=dict(views), drained=drained,
                            node_drains={rank: node_drained} if node_drained else {},
                            blocked_since=dict(self.blocked_since),
                            backoff_until=self.backoff_until, may_start=may_start)
        return self.folder.read_pass(node, running, self.requests, self.results)

    def forget_overrides(self, pending: list[str], held: set[str],
                         priority: Mapping[str, object]) -> None:
        """Node 0 removes ``held/<id>`` and ``priority/<id>`` of tasks that no pass has seen in
        pending/ for OVERRIDE_FORGET_SECONDS of its own clock (a task may be queued after
        pending/ was listed, or be out of it for a moment: claimed, and put back as held). The
        entry's file time is not compared with this clock: hosts' clocks differ."""
        waiting, now = set(pending), self.clock()
        gone = {}
        for folder, names in (("held", held), ("priority", self.folder.names("priority"))):
            for name in names:
                if name in waiting or name in priority:
                    continue
                since = gone[folder, name] = self.overrides_gone.get((folder, name), now)
                if now - since > OVERRIDE_FORGET_SECONDS:
                    with contextlib.suppress(OSError):
                        os.unlink(self.folder.dir(folder) / name)
        self.overrides_gone = gone

    def load(self, seats: bool = True) -> NodeLoad:
        """What this node's tasks (and, with ``seats``, its gangs' reservations) use now."""
        tasks = list(self.runner.tasks.values())
        taken = {gpu for task in tasks for gpu in task.gpus}
        cpu = sum(1 for task in tasks if task.submission.request.gpus == 0)
        gpu_tasks = sum(1 for task in tasks if task.submission.request.gpus != 0)
        if seats:
            taken |= self.gangs.reserved()
            cpu += self.gangs.cpu_seats()
            gpu_tasks += self.gangs.holds_node()
        return NodeLoad(len(self.inventory.gpus), frozenset(taken), cpu, gpu_tasks)

    def back_off(self, why: str) -> None:
        """The node cannot prepare tasks (no log file, no space): claim nothing for a while."""
        self.backoff = min(60.0, max(1.0, self.backoff * 2))
        self.backoff_until = self.clock() + self.backoff
        made = self.folder.ensure()
        self.throttled.warning("backoff", "this node cannot prepare tasks (%s)%s: the task goes "
                               "back to pending/; trying again with back-off", why,
                               f"; created again: {', '.join(made)}" if made else "")

    def node_views(self) -> dict[int, NodeView]:
        """Every node's state, read at most once per poll interval."""
        now = self.clock()
        if now - self.views_read >= min(self.config.poll_interval, HEARTBEAT_SECONDS):
            self.views = {r: NodeView.read(self.folder, r, self.liveness)
                          for r in range(self.config.num_nodes)}
            self.views_read = now
        return self.views

    def put_back_unstarted(self, task_id: str) -> None:
        """Put a claimed task that no .run record shows started back into pending/; should its
        claimer have written the record meanwhile (it was only slow), it goes back into
        running/ for that claimer to start (which starts it only while it is there)."""
        try:
            self.folder.unclaim(task_id)
        except OSError:
            return
        try:
            started = self.folder.read_fields(self.folder.record(task_id, "run")) is not None
        except (OSError, ValueError):
            started = True  # something is there: a record that cannot be read now
        if started:
            with contextlib.suppress(OSError):
                os.rename(self.folder.dir("pending") / task_id,
                          self.folder.dir("running") / task_id)
                LOG.warning("%s was claimed long ago, and its claimer has just recorded its "
                            "start: left in running/", task_id)
                return
        LOG.warning("%s was claimed but never started (its claimer died): back to pending",
                    task_id)

    def sweep_running(self, running: list[str], views: Mapping[int, NodeView]) -> None:
        """Node 0 finishes the tasks of a node whose daemon died and that no daemon took over,
        and puts back what a claimer left unstarted (docs/protocol.md, Recovery)."""
        now = self.clock()
        mine = {task.task_id for task in self.runner.tasks.values()}
        mine |= {entry.result.task_id for entry in self.runner.unfinished}
        seen = set()
        for task_id in running:
            if task_id in mine or self.gangs.plans.get(task_id) is not None:
                continue
            try:
                run = self.folder.read_fields(self.folder.record(task_id, "run"))
            except (OSError, ValueError):
                continue
            if run is None:
                seen.add(task_id)
                first = self.unrecorded.setdefault(task_id, now)
                if now - first >= _UNSTARTED_CLAIM_SECONDS:
                    self.put_back_unstarted(task_id)
                continue
            node = ascii_int(run.get("node_rank"))
            view = views.get(node) if node is not None else None
            if view is None or not view.known:
                continue  # a node this daemon does not know (or cannot read now)
            if node == self.config.node_rank:
                claimer_lives = run.get("daemon") == self.runner.token
            else:
                claimer_lives = view.alive and (view.token == run.get("daemon")
                                                or not run.get("daemon"))  # (version 1: none)
            if claimer_lives or self.folder.has_result(task_id):
                continue
            self.runner.interrupt(task_id, run, f"node {node}'s daemon died")
        self.unrecorded = {t: s for t, s in self.unrecorded.items() if t in seen}


# Keep-alive #################################################################################
#
# The daemon holds every idle GPU of the node in the band GPU_UTIL_TARGET..GPU_UTIL_HIGH and gives
# it up at once to real work. Two knobs are kept apart: the memory held (a ballast of
# MEMORY_USAGE_TARGET of the GPU, released on demand) and the compute grain (matmul tiles of about
# KEEPALIVE_TILE_MS in a KEEPALIVE_PERIOD duty cycle, so short that every NVML sample window sees
# the duty, and at most KEEPALIVE_MAX_IN_FLIGHT queued, so a stop waits for a few tiles at most).
# The daemon itself reads NVML only and never creates a CUDA context; one worker process per GPU
# (this file, run as ``perpetual_motion.py --worker <GPU UUID>``) holds the context, the ballast
# and the duty cycle. A GPU counts as occupied when it has processes, utilisation or memory that
# our worker does not explain: the process list alone misses jobs of other containers.
# docs/keepalive.md has the design and the measurements to make.

_DUTY_MIN = 0.05  # the controller never asks a worker for less (nor stops it for the bands)
_DUTY_MAX = 0.95  # nor for more
_GAIN_FAST = 0.8  # share of the error to the band's middle corrected per step below the threshold
_GAIN = 0.5  # the same, within reach of the band: no overshoot while the plant's gain is below 2
_MIN_STEP = 0.02  # smallest duty step outside the band
_DEAD_BAND = 3.0  # points either side of the band's middle within which the duty is held
_HOLD_WINDOW = 6.0  # s of samples averaged before a correction within the band (less noise)
_FILLER_START_DUTY = 0.5  # a filler starts gently: the task may come back to work any moment
_SETTLE_LAG = 0.3  # s from a duty change to the first utilisation sample that reflects it
_EXIT_GRACE = 3.0  # s a departed worker still counts as ours in NVML's lists
_KILL_GRACE = 0.5  # s from "stop" to SIGKILL for a worker that does not exit
_KILLED_LIMIT = 5.0  # s after SIGKILL a worker still there is stuck (in the driver, unkillable)
_NVML_FAIL_SECONDS = 10.0  # s of unanswered NVML queries after which a GPU is let go
_NVML_RETRY_SECONDS = 60.0  # s between two tries to start NVML, while it could not
_RELEASE_POLL = 0.01  # s between looks at the memory while release() waits
_CONTEXT_MIB = 600  # MiB a worker's CUDA context takes beside its tensors, where not measured
_CONTEXT_MAX_MIB = 1024  # a context measured larger than this includes somebody else's memory
_STABLE_SECONDS = 600.0  # a worker that held its GPU this long forgets earlier crashes
_BALLAST_CHUNK_MIB = 1024  # the ballast is allocated in pieces this big: keep what fits
_BALLAST_MIN_MIB = 64  # a piece smaller than this is not taken
_REPORT_SECONDS = 1.0  # a worker reports its measured busy share this often
_WATCH_SECONDS = 0.025  # s between a worker's own looks at the memory, between its tiles
_WATCH_PROCESSES_SECONDS = 0.1  # s between a worker's own looks at NVML's process list
_START_LIMIT = 120.0  # s a worker may take to become ready before it is killed
_SILENT_LIMIT = 10.0  # s without a report after which a ready worker is killed
_IDLE_UTIL_MAX = 10  # % utilisation of a GPU with nothing of ours on it that is somebody's work
_NVML_LOOKBACK = 1.5  # s of NVML's sample buffers read at the first query (older: not now)
_MODE_RECHECK_SECONDS = 10.0  # s between looks at the compute mode of a GPU that is held
_HISTORY_STEP = 10.0  # s per point of gpu.<i>.history
_HISTORY_POINTS = 60  # points in gpu.<i>.history: ten minutes
_RISK_MEAN_SECONDS = 60.0  # s whose mean utilisation must reach the band to end a reclaim risk
_WARN_EVERY = 300.0  # s between two warnings about the same failing NVML query
_SAMPLES_STALE = 3.0  # s without a new NVML sample after which NVML's 1-s rate stands in
_BAND_BUCKET = 60.0  # s per bucket of the band and held shares (gpu.<i>.band_10m, ...)
_BAND_BUCKETS = 60  # buckets kept: one hour
_BAND_WARN_SHARE = 0.9  # a held GPU whose samples sit in the band less than this over 10 min: warn
_YIELD_WARN_SECONDS = 1.0  # a yield that takes longer than this (detection to memory back): warn

EXIT_FOREIGN = 3  # a worker's exit status: it saw foreign work on its GPU and left
EXIT_SETUP = 4  # a worker's exit status: no device, or no memory for its tiles
EXIT_CANNOT_TEST = 2  # the self-test's exit status: it cannot test here (no GPU, a busy GPU)
COMPUTE_MODES = {0: "DEFAULT", 1: "EXCLUSIVE_THREAD", 2: "PROHIBITED", 3: "EXCLUSIVE_PROCESS"}


def reclaim_risk(label: str, low_since: float, now: float, util: float | None,
                 why: str) -> str:
    """What ``gpu.<i>.risk`` says of a GPU below the band since ``low_since``: "" until
    KEEPALIVE_RISK_SECONDS have passed, then ``GPU 3 idle 7 min (4%): <why>``."""
    idle = now - low_since
    if idle < KEEPALIVE_RISK_SECONDS:
        return ""
    shown = "unknown" if util is None else f"{util:.0f}%"
    return f"{label} idle {idle / 60:.0f} min ({shown}): {why}"


class KeepAlive:
    """The seam between the daemon loop and the GPUs.

    GPUs are named by their position in the node's inventory (``gpu.<i>`` in the state file).
    This base class is keep-alive switched off: the queue runs, the GPUs are left alone.
    ``why`` says why it is off, for the state file. Off, it still watches the real GPUs it is
    given (NVML's, not declared slots): one idle for KEEPALIVE_RISK_SECONDS is at risk of
    reclaim, marked in ``gpu.<i>.risk`` and warned about, as when keep-alive is on.
    """

    def __init__(self, why: str = "disabled", nvml=None, gpus: Sequence[GpuInfo] = (),
                 log: logging.Logger | None = None, blind_why: str = "") -> None:
        self.why = why
        self._nvml = nvml
        self._gpus = {i: gpu for i, gpu in enumerate(gpus) if not gpu.declared}
        # NVML could not start (why), yet the kernel shows NVIDIA GPUs: every GPU of the node
        # is left idle unseen, so each one without a task counts as at risk
        self.blind_why = blind_why
        self._slots = tuple(gpus)
        self._blind_since: float | None = None
        self.node_risk = ""  # the node's own risk, where its GPUs are not in the inventory
        self._log = log or LOG
        self._idle_since: dict[int, float] = {}
        self._risks: dict[int, str] = {}
        self._history: dict[int, UtilHistory] = collections.defaultdict(UtilHistory)
        self._now = 0.0  # the last tick's time: what the warnings are throttled by
        self._warned = Throttle(timefunc=lambda: self._now)
        self._daemon_now: float | None = None  # the daemon's last ``now``, which may step back

    def _watch_idle(self, now: float, busy: Mapping[int, str]) -> None:
        """Keep-alive off: a GPU of ours below the band (with a task on it, when NVML says
        so; without one, unless NVML shows it busy) for KEEPALIVE_RISK_SECONDS is at risk.
        NVML's 1-s rate is read each tick and judged, as with keep-alive on, on the mean of
        the last _RISK_MEAN_SECONDS."""
        if self._nvml is None:
            if self.blind_why:
                self._watch_blind(now, busy)
            return
        self._now = now
        for i, gpu in self._gpus.items():
            rate = self._nvml.util_rate(gpu)
            util = None
            if rate is not None:
                self._history[i].add(now, [rate])
                util = self._history[i].mean(now, _RISK_MEAN_SECONDS)
            if (util is not None and util >= GPU_UTIL_TARGET) or (util is None and i in busy):
                if self._risks.pop(i, ""):
                    self._log.info("GPU %d: back at work: no longer at risk", gpu.number)
                self._idle_since.pop(i, None)
                continue
            why = "a queue task leaves it idle" if i in busy else f"keep-alive off: {self.why}"
            risk = reclaim_risk(f"GPU {gpu.number}", self._idle_since.setdefault(i, now), now,
                                util, why)
            if not risk:
                continue
            self._risks[i] = risk
            if self._warned(f"risk/{i}", every=600.0):
                self._log.warning("At risk of reclaim: %s", self._risks[i])

    def _watch_blind(self, now: float, busy: Mapping[int, str]) -> None:
        """NVML could not start on a node with NVIDIA GPUs: a GPU without a queue task is
        neither held nor watched, and after KEEPALIVE_RISK_SECONDS it is at risk; on a node
        whose GPUs are not in the inventory at all (no ``--gpus``), the warning stands alone."""
        self._now = now
        self._blind_since = self._blind_since if self._blind_since is not None else now
        if not self._slots:
            minutes = (now - self._blind_since) / 60
            if minutes * 60 >= KEEPALIVE_RISK_SECONDS:
                self.node_risk = (f"every GPU of the node unwatched {minutes:.0f} min: "
                                  f"{self.blind_why}")
                if self._warned("risk/node", every=600.0):
                    self._log.warning("At risk of reclaim: %s", self.node_risk)
            return
        for i, gpu in enumerate(self._slots):
            if i in busy:
                self._risks.pop(i, None)
                self._idle_since.pop(i, None)
                continue
            since = self._idle_since.setdefault(i, now)
            if now - since < KEEPALIVE_RISK_SECONDS:
                continue
            minutes = (now - since) / 60
            self._risks[i] = f"GPU {gpu.number} unwatched {minutes:.0f} min: {self.blind_why}"
            if self._warned(f"risk/{i}", every=600.0):
                self._log.warning("At risk of reclaim: %s", self._risks[i])

    def describe(self) -> str:
        """``on``, or ``off: <why>``, for the state file."""
        return f"off: {self.why}"

    def start(self) -> None:
        """Start holding the idle GPUs."""

    def _steady(self, now: float) -> float:
        """The daemon's ``now`` (perhaps the wall clock) made steady: a step back (an NTP
        step, a VM resumed) counts as no time, so that an idle GPU's time below the band
        never goes negative and hides its risk until the clock catches up."""
        last, self._daemon_now = self._daemon_now, now
        if last is None:
            return now
        return self._now + max(0.0, now - last)

    def tick(self, now: float, busy: Mapping[int, str]) -> None:
        """One turn of the daemon loop: react to the GPUs' state. ``busy`` maps the GPUs that
        queue tasks hold to the task's id."""
        self._watch_idle(self._steady(now), busy)

    def release(self, gpus: Collection[int]) -> None:
        """Begin freeing ``gpus`` for a queue task: their workers stop."""

    def released(self, gpus: Collection[int]) -> bool:
        """True once the keep-alive memory of ``gpus`` is free (or could not be freed within
        RELEASE_TIMEOUT_SECONDS: then the worker is killed, with a warning)."""
        return True

    def task_finished(self, gpus: Collection[int]) -> None:
        """The queue task that held ``gpus`` has ended: they may be taken again."""

    def gpu_fields(self) -> dict[str, str]:
        """Per-GPU keys for the state file (``gpu.<i>.util``, ``gpu.<i>.state``, ...)."""
        watched = range(len(self._slots)) if self.blind_why else self._gpus
        return {f"gpu.{i}.risk": self._risks.get(i, "") for i in watched}

    def stop(self, why: str = "stopped") -> None:
        """Stop every worker and free the GPUs; ``why`` is what ``describe()`` says then."""

    def child_pids(self) -> set[int]:
        """PIDs of the worker processes (the daemon as PID 1 must not reap them itself)."""
        return set()


# Keep-alive: records and sizing #############################################################


class GpuState(enum.Enum):
    """What keep-alive does with one GPU (``gpu.<i>.state``)."""

    OFF = "off"  # not ours to hold: MIG, not started, stopped, or a crashed worker waiting
    STARTING = "starting"  # a worker is calibrating its tiles and taking its memory
    HOLDING = "holding"  # a worker holds the ballast and keeps utilisation in the band
    FILLING = "filling"  # during a queue task: a small worker tops an idle GPU up
    YIELDED = "yielded"  # left to real work (``gpu.<i>.reason`` says which)


class WorkerMode(enum.Enum):
    HOLD = "hold"  # ballast and duty cycle, leaves at the first sign of foreign work
    FILL = "fill"  # tiles only, beside a queue task


@dataclasses.dataclass(frozen=True)
class GpuProcess:
    """One compute process on a GPU; its pid may be from another PID namespace."""

    pid: int
    memory_used: int | None  # bytes; None when the driver does not say


@dataclasses.dataclass(frozen=True)
class Reading:
    """What one tick learned about one GPU; None where the NVML query failed."""

    samples: tuple[tuple[float, float], ...] | None  # new (NVML time in us, util %) samples
    memory_used: int | None  # bytes
    memory_total: int | None  # bytes
    processes: tuple[GpuProcess, ...] | None
    process_util: tuple[tuple[int, int], ...] | None  # new (pid, SM util %) samples

    @property
    def failed(self) -> bool:
        return self.memory_used is None and self.processes is None


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """How to start one worker."""

    mode: WorkerMode
    memory_mib: int  # memory the worker holds in all: tiles, then ballast up to this
    duty: float
    max_tile_mib: int = 0  # 0: no limit on the tiles' memory
    tile: int = 0  # tile size calibrated by an earlier worker on this GPU; 0: calibrate
    used_before_mib: int = 0  # memory used on the GPU when it was started; 0: unknown


def seed_matrix_size(memory_bytes: int, share: float = MEMORY_USAGE_TARGET) -> int:
    """The seed's N: three fp16 N x N matrices fill ``share`` of the memory, N rounded down
    to a multiple of 1024. Logged and documented only: one product of that size takes
    seconds, so keep-alive computes in small tiles instead."""
    return int(math.sqrt(share * memory_bytes / 6) / 1024) * 1024


def hold_mib(memory_total: int, memory_used: int) -> int:
    """Memory a worker should hold on a GPU: MEMORY_USAGE_TARGET of it, but only from free
    memory, leaving KEEPALIVE_HEADROOM free beside it and room for the worker's context."""
    target = MEMORY_USAGE_TARGET * memory_total
    free = memory_total - memory_used - KEEPALIVE_HEADROOM * memory_total - _CONTEXT_MIB * MIB
    return max(0, int(min(target, free) // MIB))


def band_step(util: float, duty: float) -> float:
    """The seed's bands as a step on the duty: below GPU_UTIL_THRESHOLD up fast, below
    GPU_UTIL_TARGET up, above GPU_UTIL_HIGH down. Within the band it aims at the band's middle,
    holding within _DEAD_BAND of it, so that single NVML samples, which scatter around the
    average, stay in the band too. Steps are a share of the distance to the middle, so they
    shrink as the middle nears and do not overshoot."""
    middle = (GPU_UTIL_TARGET + GPU_UTIL_HIGH) / 2
    if util < GPU_UTIL_THRESHOLD:
        step = _GAIN_FAST * (middle - util) / 100
    elif util < GPU_UTIL_TARGET:
        step = max(_MIN_STEP, _GAIN * (middle - util) / 100)
    elif util <= GPU_UTIL_HIGH:
        if abs(util - middle) <= _DEAD_BAND:
            return duty
        step = _GAIN * (middle - util) / 100
    else:
        step = -max(_MIN_STEP, _GAIN * (util - middle) / 100)
    return min(_DUTY_MAX, max(_DUTY_MIN, duty + step))


def parse_message(line: str) -> tuple[str, dict[str, str]]:
    """A worker's line ``verb key=value ...`` (``log`` lines keep their text under ``text``)."""
    verb, _, rest = line.strip().partition(" ")
    if verb == "log":
        level, _, text = rest.partition(" ")
        return verb, {"level": level, "text": text}
    fields = dict(word.partition("=")[::2] for word in rest.split())
    return verb, fields


# Keep-alive: the NVML seam ##################################################################


class NvmlUnavailable(Exception):
    """NVML cannot be used on this machine; the message says why."""


class Nvml:
    """Every NVML call keep-alive makes, each failure caught and logged (gpustat's way).

    Queries answer None when NVML fails, never raise. A simulated GPU for the tests
    implements the same methods (``tests/simgpu.py``). ``hide_processes`` is for the
    benchmark only: it hides the process lists, as NVML does for jobs of other containers.
    """

    def __init__(self, module, log: logging.Logger, *, hide_processes: bool = False,
                 clock: Callable[[], float] = time.time) -> None:
        self._nv = module
        self._log = log
        self.hide_processes = hide_processes
        self._clock = clock
        self._handles: dict[int, object] = {}
        self._sample_ts: dict[int, int] = {}
        self._putil_ts: dict[int, int] = {}
        self._no_samples: set[int] = set()
        self._no_putil: set[int] = set()
        self._throttle = Throttle(_WARN_EVERY)

    @classmethod
    def open(cls, log: logging.Logger, hide_processes: bool = False) -> Nvml:
        """Load and initialise NVML; NvmlUnavailable says why it cannot be."""
        try:
            import pynvml
        except ImportError as exc:
            raise NvmlUnavailable("nvidia-ml-py (module pynvml) is not installed") from exc
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
            raise NvmlUnavailable(f"NVML cannot start ({exc}): no NVIDIA driver here?") from exc
        return cls(pynvml, log, hide_processes=hide_processes)

    def close(self) -> None:
        try:
            self._nv.nvmlShutdown()
        except Exception:  # noqa: BLE001 - closing is best effort
            pass

    def _failed(self, what: str, index: int, exc: Exception) -> None:
        if self._throttle(f"{what}/{index}"):
            self._log.warning("NVML %s failed on GPU %d: %s", what, index, exc)

    def _handle(self, index: int):
        if index not in self._handles:
            self._handles[index] = self._nv.nvmlDeviceGetHandleByIndex(index)
        return self._handles[index]

    def _is_not_found(self, exc: Exception) -> bool:
        not_found = getattr(self._nv, "NVMLError_NotFound", None)
        return not_found is not None and isinstance(exc, not_found)

    def _since(self, seen: dict[int, int], index: int) -> int:
        """NVML time (us) after which samples are new. At the first query: now minus the
        look-back, not 0, which returns the driver's whole buffer, with samples of processes
        that ended long ago (a previous worker: a false yield). Again so when the last sample
        seen is ahead of the clock: NVML stamps samples with the wall clock, which stepped
        back (NTP, a VM resumed), and nothing would be new until it caught up."""
        now = self._clock()
        if index in seen and seen[index] <= (now + _NVML_LOOKBACK) * 1e6:
            return seen[index]
        return int((now - _NVML_LOOKBACK) * 1e6)

    def gpus(self) -> list[GpuInfo]:
        """Every GPU NVML sees, in NVML's order; raises NvmlUnavailable when it cannot say."""
        nv = self._nv
        try:
            count = nv.nvmlDeviceGetCount()
        except Exception as exc:
            raise NvmlUnavailable(f"NVML cannot count the GPUs ({exc})") from exc
        found = []
        for index in range(count):
            try:
                handle = self._handle(index)
                uuid = nv.nvmlDeviceGetUUID(handle)
                name = nv.nvmlDeviceGetName(handle)
                total = int(nv.nvmlDeviceGetMemoryInfo(handle).total)
            except Exception as exc:  # noqa: BLE001 - one bad GPU must not hide the others
                if isinstance(exc, getattr(nv, "NVMLError_NoPermission", ())):
                    # another job's GPU under cgroup device limits: CUDA cannot open it either
                    self._log.info("GPU %d is not ours to open (%s): left out", index, exc)
                else:
                    self._failed("device query", index, exc)
                continue
            try:
                mig = nv.nvmlDeviceGetMigMode(handle)[0] == nv.NVML_DEVICE_MIG_ENABLE
            except Exception:  # noqa: BLE001 - NotSupported: a GPU without MIG
                mig = False
            found.append(GpuInfo(index, _text(uuid), _text(name), total, mig))
        return found

    def memory(self, gpu: GpuInfo) -> tuple[int, int] | None:
        """(used, total) in bytes."""
        try:
            info = self._nv.nvmlDeviceGetMemoryInfo(self._handle(gpu.index))
            return int(info.used), int(info.total)
        except Exception as exc:  # noqa: BLE001 - every NVML query may fail alone
            self._failed("memory", gpu.index, exc)
            return None

    def util_samples(self, gpu: GpuInfo) -> list[tuple[float, float]] | None:
        """New utilisation samples (NVML time in us, percent) since the last call, from the
        driver's sample buffer: [] when nothing is new, None when the buffer does not answer
        (not supported here, or an error). The engine then reads ``util_rate``."""
        nv = self._nv
        if gpu.index in self._no_samples:
            return None
        try:
            last = self._since(self._sample_ts, gpu.index)
            _, raw = nv.nvmlDeviceGetSamples(self._handle(gpu.index),
                                             nv.NVML_GPU_UTILIZATION_SAMPLES, last)
        except Exception as exc:  # noqa: BLE001 - every NVML query may fail alone
            if self._is_not_found(exc):
                return []  # nothing new since the last sample (or none yet)
            if isinstance(exc, getattr(nv, "NVMLError_NotSupported", ())):
                self._no_samples.add(gpu.index)
                self._log.info("GPU %d has no utilisation sample buffer in NVML; its 1-s rate "
                               "stands in", gpu.index)
            else:
                self._failed("utilisation samples", gpu.index, exc)
            return None
        samples = [(float(s.timeStamp), float(s.sampleValue.uiVal)) for s in raw]
        samples = [s for s in samples if s[0] > last]
        if samples:
            self._sample_ts[gpu.index] = int(max(s[0] for s in samples))
        return samples

    def util_rate(self, gpu: GpuInfo) -> tuple[float, float] | None:
        """NVML's utilisation rate (its last sample period, about 1 s), stamped now on NVML's
        clock (wall-clock us); the next-best reading when the sample buffer gives nothing."""
        try:
            rate = self._nv.nvmlDeviceGetUtilizationRates(self._handle(gpu.index)).gpu
        except Exception as exc:  # noqa: BLE001 - every NVML query may fail alone
            self._failed("utilisation rate", gpu.index, exc)
            return None
        return self._clock() * 1e6, float(rate)

    def compute_processes(self, gpu: GpuInfo) -> list[GpuProcess] | None:
        if self.hide_processes:
            return []
        try:
            found = self._nv.nvmlDeviceGetComputeRunningProcesses(self._handle(gpu.index))
        except Exception as exc:  # noqa: BLE001 - every NVML query may fail alone
            self._failed("process list", gpu.index, exc)
            return None
        processes = []
        for p in found:
            used = getattr(p, "usedGpuMemory", None)
            processes.append(GpuProcess(int(p.pid), int(used) if used is not None else None))
        return processes

    def process_util(self, gpu: GpuInfo) -> list[tuple[int, int]] | None:
        """New (pid, SM util %) samples since the last call; None where not supported."""
        if gpu.index in self._no_putil:
            return None
        if self.hide_processes:
            return []
        try:
            last = self._since(self._putil_ts, gpu.index)
            raw = self._nv.nvmlDeviceGetProcessUtilization(self._handle(gpu.index), last)
        except Exception as exc:  # noqa: BLE001 - every NVML query may fail alone
            if self._is_not_found(exc):
                return []
            if isinstance(exc, getattr(self._nv, "NVMLError_NotSupported", ())):
                self._no_putil.add(gpu.index)
                self._log.info("GPU %d has no per-process utilisation in NVML; foreign work is "
                               "seen by its processes and memory", gpu.index)
                return None
            self._failed("per-process utilisation", gpu.index, exc)
            return None
        fresh = [s for s in raw if int(s.timeStamp) > last]
        if fresh:
            self._putil_ts[gpu.index] = max(int(s.timeStamp) for s in fresh)
        return [(int(s.pid), int(s.smUtil)) for s in fresh]

    def compute_mode(self, gpu: GpuInfo) -> int | None:
        """NVML's compute mode (COMPUTE_MODES), or None where it cannot say."""
        try:
            return int(self._nv.nvmlDeviceGetComputeMode(self._handle(gpu.index)))
        except Exception as exc:  # noqa: BLE001 - every NVML query may fail alone
            if not isinstance(exc, getattr(self._nv, "NVMLError_NotSupported", ())):
                self._failed("compute mode", gpu.index, exc)
            return None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# Keep-alive: the duty controller ############################################################


class UtilWindow:
    """Recent utilisation samples of one GPU, on NVML's own clock (microseconds). Samples age
    by the engine's clock too: a window that has had no new sample for _SAMPLES_STALE seconds
    is stale, and means nothing until fresh readings come (a sample buffer that stops
    delivering must not leave its last busy samples standing for ever). ``rated``: it holds
    NVML's 1-s rate, read while the buffer gave nothing."""

    def __init__(self, keep: float = 10.0) -> None:
        self.keep_us = keep * 1e6
        self.samples: collections.deque[tuple[float, float]] = collections.deque()
        self.fresh_at: float | None = None  # engine time of the last new reading
        self.rated = False

    def add(self, samples: Iterable[tuple[float, float]], now: float | None = None,
            rated: bool = False) -> None:
        samples = sorted(samples)
        if not samples:
            return
        # The rate's time stamps and the buffer's do not interleave; and new readings (NVML
        # gives none twice) that are all older than the newest held mean that the wall
        # clock stepped back: what is held is on the old clock, and would stand for now.
        if rated != self.rated or (self.samples and samples[-1][0] <= self.samples[-1][0]):
            self.samples.clear()
            self.rated = rated
        for sample in samples:
            if not self.samples or sample[0] > self.samples[-1][0]:
                self.samples.append(sample)
        while self.samples and self.samples[0][0] < self.samples[-1][0] - self.keep_us:
            self.samples.popleft()
        if now is not None:
            self.fresh_at = now

    def stale(self, now: float) -> bool:
        return self.fresh_at is None or now - self.fresh_at > _SAMPLES_STALE

    def age(self, now: float) -> float | None:
        return None if self.fresh_at is None else now - self.fresh_at

    @property
    def newest(self) -> float | None:
        return self.samples[-1][0] if self.samples else None

    def mean(self, seconds: float = KEEPALIVE_UTIL_WINDOW, after: float | None = None,
             now: float | None = None):
        """Mean of the last ``seconds`` of samples (only those later than ``after``), or None;
        None too when the window is stale at ``now`` (the engine's clock)."""
        if not self.samples or (now is not None and self.stale(now)):
            return None
        start = self.samples[-1][0] - seconds * 1e6
        if after is not None:
            start = max(start, after)
        values = [v for t, v in self.samples if t > start]
        return sum(values) / len(values) if values else None


class UtilHistory:
    """Utilisation of one GPU for gpu.<i>.history: the mean of each _HISTORY_STEP seconds,
    the last _HISTORY_POINTS of them. Samples count where NVML dated them (a backlog read
    after NVML failed falls where it belongs), moved onto the engine's clock by the age of
    the newest sample at the tick that read it."""

    def __init__(self) -> None:
        self.points: dict[int, list[float]] = {}  # step number: [sum, count]

    def add(self, now: float, samples: Collection[tuple[float, float]]) -> None:
        if not samples:
            return
        shift = now - max(t for t, _ in samples) / 1e6
        for t, value in samples:
            point = self.points.setdefault(math.floor((t / 1e6 + shift) / _HISTORY_STEP),
                                           [0.0, 0])
            point[0] += value
            point[1] += 1
        oldest = math.floor(now / _HISTORY_STEP) - _HISTORY_POINTS
        for step in [n for n in self.points if n <= oldest]:
            del self.points[step]

    def mean(self, now: float, seconds: float) -> float | None:
        """The mean of the samples of the last ``seconds`` (in whole steps, the current one
        too), or None when there are none."""
        first = math.floor((now - seconds) / _HISTORY_STEP)
        points = [point for step, point in self.points.items() if step >= first]
        count = sum(n for _, n in points)
        return sum(total for total, _ in points) / count if count else None

    def text(self, now: float) -> str:
        """Oldest first, comma-separated, the current step last; empty where nothing is known."""
        step = math.floor(now / _HISTORY_STEP)
        return ",".join(f"{self.points[n][0] / self.points[n][1]:.0f}" if n in self.points
                        else "" for n in range(step - _HISTORY_POINTS + 1, step + 1))


class DutyController:
    """Moves a worker's duty so that the GPU's averaged utilisation sits in the band.

    After a change it waits until a whole window of samples reflects the new duty
    (``_SETTLE_LAG`` + KEEPALIVE_UTIL_WINDOW on NVML's clock) before it judges again: acting
    on stale samples is what makes a controller oscillate. Within the band it corrects only
    on the mean of _HOLD_WINDOW seconds, so that noise does not move it about the middle.
    """

    def __init__(self, duty: float = KEEPALIVE_START_DUTY) -> None:
        self.duty = duty
        self.mark: float | None = None  # NVML time of the last change
        self.last_util: float | None = None
        self.judged_duty: float | None = None  # the duty in force while last_util was measured
        self.judged_at: float | None = None  # NVML time of the newest sample last_util saw

    def reset(self, window: UtilWindow, duty: float | None = None) -> None:
        """The worker starts (or restarts) applying ``duty`` now."""
        if duty is not None:
            self.duty = duty
        self.mark = window.newest if window.newest is not None else None

    def decide(self, window: UtilWindow) -> float | None:
        """The new duty, or None to keep the current one."""
        newest = window.newest
        if newest is None:
            return None
        if self.mark is None or self.mark > newest:  # (ahead: the wall clock stepped back)
            self.mark = newest
            return None
        start = self.mark + _SETTLE_LAG * 1e6
        if newest - start < KEEPALIVE_UTIL_WINDOW * 1e6:
            return None
        util = window.mean(KEEPALIVE_UTIL_WINDOW, after=start)
        if util is None:
            return None
        if GPU_UTIL_TARGET <= util <= GPU_UTIL_HIGH:
            if newest - start < _HOLD_WINDOW * 1e6:
                self.last_util, self.judged_duty, self.judged_at = util, self.duty, newest
                return None
            util = window.mean(_HOLD_WINDOW, after=start)
        self.last_util, self.judged_duty, self.judged_at = util, self.duty, newest
        duty = band_step(util, self.duty)
        if abs(duty - self.duty) < 1e-9:
            return None
        self.duty = duty
        self.mark = newest
        return duty

    @property
    def at_floor(self) -> bool:
        return self.duty <= _DUTY_MIN + 1e-9


# Keep-alive: worker processes, the daemon's side ############################################


class WorkerHandle(Protocol):
    """A running worker as the engine sees it; tests use a fake one."""

    pid: int

    def send(self, line: str) -> bool: ...

    def messages(self) -> list[str]: ...

    def exit_code(self) -> int | None: ...

    def stop(self) -> None: ...

    def kill(self) -> None: ...


def worker_command(args: list[str]) -> list[str]:
    """The command line of a worker: this very file, run with ``--worker``."""
    return [sys.executable, os.path.abspath(__file__), "--worker", *args]


def worker_args(gpu: GpuInfo, spec: WorkerSpec) -> list[str]:
    args = [gpu.uuid, "--mode", spec.mode.value, "--memory-mib", str(spec.memory_mib),
            "--duty", f"{spec.duty:.3f}"]
    if spec.max_tile_mib:
        args += ["--max-tile-mib", str(spec.max_tile_mib)]
    if spec.tile:
        args += ["--tile", str(spec.tile)]
    if spec.used_before_mib:
        args += ["--used-before-mib", str(spec.used_before_mib)]
    return args


class WorkerProcess:
    """A worker process: commands go down its stdin, reports come up its stdout.

    It runs in its own session so that signals meant for the daemon's terminal do not reach
    it, sees only its own GPU (``CUDA_VISIBLE_DEVICES=<UUID>``), and exits by itself when the
    daemon goes away (its stdin closes).
    """

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, start_new_session=True, close_fds=True)
        self.pid = self.proc.pid
        os.set_blocking(self.proc.stdout.fileno(), False)
        os.set_blocking(self.proc.stdin.fileno(), False)  # a hung worker must not block us
        self._buffer = b""

    def send(self, line: str) -> bool:
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def messages(self) -> list[str]:
        """Every whole line the worker wrote since the last call; never blocks."""
        chunks = []
        while True:
            try:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
            except (BlockingIOError, InterruptedError):
                break
            except (OSError, ValueError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        self._buffer += b"".join(chunks)
        *lines, self._buffer = self._buffer.split(b"\n")
        return [line.decode(errors="replace") for line in lines if line.strip()]

    def exit_code(self) -> int | None:
        return self.proc.poll()

    def stop(self) -> None:
        self.send("stop")
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    def kill(self) -> None:
        if self.proc.poll() is not None:
            return  # reaped: its pid may belong to somebody else by now
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # already gone
        self.proc.poll()


def spawn_worker(gpu: GpuInfo, spec: WorkerSpec, extra: Iterable[str] = ()) -> WorkerProcess:
    """Start the worker of one GPU: this file, selecting the GPU by UUID (``extra``: more
    worker options, for the benchmark)."""
    env = dict(os.environ)
    env.update({
        "CUDA_VISIBLE_DEVICES": gpu.uuid,
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "PERPETUAL_MOTION_WORKER": gpu.uuid,
        "OMP_NUM_THREADS": "1",
    })
    return WorkerProcess(worker_command(worker_args(gpu, spec) + list(extra)), env)


# Keep-alive: what the engine knows of each GPU ##############################################


@dataclasses.dataclass
class _Worker:
    """The engine's book-keeping for one running worker."""

    handle: WorkerHandle
    spec: WorkerSpec
    started: float
    memory_before: int | None  # bytes used on the GPU just before it started
    ready_at: float | None = None
    heard_at: float | None = None  # when it last reported anything
    tile: int | None = None
    tile_ms: float | None = None
    held_mib: int | None = None  # its tensors (torch's reserved memory), as it reports
    context_mib: int | None = None  # its CUDA context, as it measured it
    busy: float | None = None
    stop_at: float | None = None
    stop_reason: str = ""
    killed_for: str = ""  # why the engine killed it (a crash, for the backoff)
    killed_at: float | None = None  # when the engine first sent it SIGKILL
    exit_reason: str = ""
    exit_time: float | None = None  # the worker's wall clock when it left
    listed: bool = False  # NVML's process list has shown it under its own PID
    stuck_said: bool = False  # warned of as stuck in the driver (once per worker)

    @property
    def footprint(self) -> int:
        """Bytes of GPU memory it explains: what it holds and its context."""
        context = _CONTEXT_MIB if self.context_mib is None else self.context_mib
        return ((self.held_mib or 0) + context) * MIB


@dataclasses.dataclass
class YieldRecord:
    """One yield of a held GPU to foreign work: what was seen, by which signal, and how long
    from detection until the worker was gone and until its memory was back (s)."""

    at: float  # engine time of the detection
    what: str
    signal: str  # "process list", "per-process utilisation", "memory", "utilisation",
    # or "the worker's own watch"
    memory_limit: int | None = None  # bytes used at most once our memory is back
    pid: int | None = None  # the worker's PID, where NVML's process list showed it
    not_held_below: int | None = None  # bytes used below which our memory cannot be held
    used_at: int | None = None  # bytes used at the detection, our memory still held
    exit_after: float | None = None
    memory_after: float | None = None
    done: bool = False  # no longer followed

    def text(self) -> str:
        def sec(value: float | None) -> str:
            return "?" if value is None else f"{value:.2f} s"

        return (f"{self.what} (by {self.signal}): worker gone {sec(self.exit_after)}, "
                f"memory back {sec(self.memory_after)}")


class ShareMeter:
    """How a GPU fared, in buckets of _BAND_BUCKET seconds over the last _BAND_BUCKETS: NVML
    samples read while held, and how many of them were in the band; seconds seen, held, and
    kept busy (held, a queue task or foreign work)."""

    def __init__(self) -> None:
        self.buckets: dict[int, list[float]] = {}  # bucket: [in band, samples, seen, held]

    def _bucket(self, now: float) -> list[float]:
        key = math.floor(now / _BAND_BUCKET)
        if key not in self.buckets:
            self.buckets[key] = [0.0, 0.0, 0.0, 0.0]
            for old in [k for k in self.buckets if k <= key - _BAND_BUCKETS]:
                del self.buckets[old]
        return self.buckets[key]

    def samples(self, now: float, values: Iterable[float]) -> None:
        bucket = self._bucket(now)
        for value in values:
            bucket[0] += GPU_UTIL_TARGET <= value <= GPU_UTIL_HIGH
            bucket[1] += 1

    def time(self, now: float, seconds: float, held: bool) -> None:
        bucket = self._bucket(now)
        bucket[2] += seconds
        bucket[3] += seconds if held else 0.0

    def share(self, now: float, seconds: float, what: str) -> float | None:
        """``what``: "band" (of the samples read while held) or "held" (of the time seen)."""
        part, whole = (0, 1) if what == "band" else (3, 2)
        total = self.total(now, seconds, whole)
        return self.total(now, seconds, part) / total if total else None

    def total(self, now: float, seconds: float, column: int) -> float:
        first = math.floor((now - seconds) / _BAND_BUCKET)
        return sum(b[column] for k, b in self.buckets.items() if k > first)


@dataclasses.dataclass
class _Slot:
    """Everything the engine knows about one GPU."""

    gpu: GpuInfo
    state: GpuState = GpuState.OFF
    reason: str = "not started"
    worker: _Worker | None = None
    window: UtilWindow = dataclasses.field(default_factory=UtilWindow)
    history: UtilHistory = dataclasses.field(default_factory=UtilHistory)
    controller: DutyController = dataclasses.field(default_factory=DutyController)
    memory_used: int | None = None
    memory_before_tick: int | None = None  # memory_used as the tick before this one read it
    memory_total: int | None = None
    idle_used: int | None = None  # the least memory used seen with nothing of ours on the GPU
    tile: int | None = None  # the tile size a worker calibrated here, reused by the next
    last_exit: float | None = None
    foreign_at: float | None = None  # last tick that saw foreign work
    foreign_since: float | None = None  # first tick that saw it (since the GPU was last free)
    foreign_reason: str = ""
    crashes: int = 0
    restart_at: float | None = None
    resume_at: float | None = None
    low_since: float | None = None  # during a task: since when utilisation is below threshold
    nvml_failing_since: float | None = None
    release_below: int | None = None  # release() is done once memory used is at most this
    released_at: float | None = None  # when a queue task asked for the GPU (until it ends)
    release_done: bool = False  # its keep-alive memory is free since
    announced: bool = False
    notes: tuple[str, ...] = ()  # NVML readings that stand in for one that fails, and why
    util_note: str = ""  # which utilisation reading the window holds, when not the buffer's
    meter: ShareMeter = dataclasses.field(default_factory=ShareMeter)
    ticked_at: float | None = None
    last_yield: YieldRecord | None = None
    low_for: float | None = None  # since when utilisation sits below the band (reclaim risk)
    risk: str = ""  # the reclaim risk shown in gpu.<i>.risk, "" when none
    band_warned: bool = False
    pids_foreign: bool = False  # NVML lists our worker under another PID
    mode_asked_at: float | None = None  # when the compute mode of the held GPU was last read
    task_busy_at: float | None = None  # NVML time since which the filler's estimate of the
    # task's utilisation (without per-process figures) has stayed at the threshold

    @property
    def label(self) -> str:
        return f"GPU {self.gpu.index}"

    def set(self, state: GpuState, reason: str) -> None:
        self.state = state
        self.reason = reason


# Keep-alive: one GPU's readings and its worker ##############################################
#
# What NVML says of one GPU and what that tells of foreign work; the worker process that the
# engine (below) decides each GPU should have, carried out.


def read_gpu(gpu, slot: _Slot, now: float) -> Reading:
    """One GPU's NVML figures, kept in its slot (window, history, memory, failures). Each
    reading that fails falls back to the next best, and ``slot.notes`` says which stands in."""
    samples = read_utilisation(gpu, slot, now)
    memory = gpu.memory(slot.gpu)
    processes = gpu.compute_processes(slot.gpu)
    process_util = gpu.process_util(slot.gpu)
    reading = Reading(
        samples=tuple(samples) if samples is not None else None,
        memory_used=memory[0] if memory else None,
        memory_total=memory[1] if memory else None,
        processes=tuple(processes) if processes is not None else None,
        process_util=tuple(process_util) if process_util is not None else None,
    )
    slot.memory_before_tick = slot.memory_used
    if memory:
        slot.memory_used, slot.memory_total = memory
    if reading.failed:
        slot.nvml_failing_since = slot.nvml_failing_since or now
    else:
        slot.nvml_failing_since = None
    notes = [slot.util_note]
    if memory is None:
        notes.append("memory: NVML fails, the worker reads it through CUDA")
    if processes is None:
        notes.append("process list: NVML fails, memory and utilisation decide")
    # with nothing answering, "NVML not answering" (the engine's reason) says it all
    slot.notes = () if reading.failed else tuple(note for note in notes if note)
    return reading


def read_utilisation(gpu, slot: _Slot, now: float) -> list[tuple[float, float]] | None:
    """New utilisation samples into the slot's window: the sample buffer's; where it gives
    none for _SAMPLES_STALE seconds, or fails, NVML's 1-s rate, read every tick; where that
    fails too, nothing (the window empties: no stale figure decides)."""
    samples = gpu.util_samples(slot.gpu)
    if samples:
        slot.util_note = ""
    elif samples is None or slot.window.rated or slot.window.stale(now):
        if samples is None:
            why = "the sample buffer does not answer"
        elif slot.window.fresh_at is None or slot.window.rated:
            why = "the sample buffer gives no sample"
        else:
            why = f"no new sample for {slot.window.age(now):.0f} s"
        rate = gpu.util_rate(slot.gpu)
        if rate is None:
            slot.window = UtilWindow()
            slot.util_note = f"utilisation: none ({why}; the 1-s rate fails too)"
            return None
        slot.window.add([rate], now, rated=True)
        slot.history.add(now, [rate])
        slot.util_note = f"utilisation: NVML's 1-s rate ({why})"
        return [rate]
    if samples:
        slot.window.add(samples, now)
        slot.history.add(now, samples)
    return samples


def process_list_note(slot: _Slot, reading: Reading, now: float) -> str:
    """What NVML's process list is worth on this GPU, judged by our own worker: a worker that
    holds its memory yet is not listed at all means the list shows nothing (a sandbox's GPU
    proxy, say): that goes into the GPU's reason. One listed under another PID means another
    PID namespace, or a proxy that shows many processes as one (``pids_foreign``, logged
    once): processes are counted, never matched, and memory decides too."""
    worker = slot.worker
    if worker is None or worker.ready_at is None or worker.stop_at is not None \
            or reading.processes is None or reading.failed:
        return ""
    pids = {p.pid for p in reading.processes}
    if worker.handle.pid in pids:  # seen under its own PID: known at once, however young
        worker.listed, slot.pids_foreign = True, False
        return ""
    if now - worker.ready_at < 1.0:  # not seen yet: a young entry may come late
        return ""
    if not pids:
        return "process list: our worker is not listed (a sandbox?): memory decides"
    slot.pids_foreign, worker.listed = True, False
    return ""


def foreign_work(slot: _Slot, reading: Reading, now: float) -> str:
    """Why the GPU has work that is not ours on it, or "". Processes are counted, never
    matched by pid: pids differ between containers and even between NVML calls. And the
    process list misses other containers' jobs on current drivers, so memory that our
    worker does not explain counts too, and utilisation when nothing of ours runs."""
    worker = slot.worker
    ours = 0 if worker is None else 1
    # a worker that just exited may linger in NVML's lists for a moment; but after a yield
    # to foreign work, an extra entry is that work, not our worker
    lingering = slot.last_exit is not None and now - slot.last_exit < _EXIT_GRACE
    if lingering and slot.foreign_at is None:
        ours += 1
    if reading.processes is not None and len(reading.processes) > ours:
        others = len(reading.processes) - ours
        return "foreign process" if others == 1 else f"{others} foreign processes"
    if reading.process_util:
        active = {pid for pid, sm in reading.process_util if sm >= KEEPALIVE_FOREIGN_UTIL}
        if len(active) > ours:
            top = max(sm for _, sm in reading.process_util)
            return f"foreign utilisation {top}%"
    nothing_of_ours = worker is None and not lingering
    used = reading.memory_used
    if used is not None and nothing_of_ours:
        slot.idle_used = used if slot.idle_used is None else min(slot.idle_used, used)
    if nothing_of_ours:
        mine: int | None = 0
    elif worker is None or worker.stop_at is not None:
        mine = None  # going: its memory is on its way out
    elif worker.ready_at is None:  # setting up (it checks for itself meanwhile): at most
        mine = (worker.spec.memory_mib + _CONTEXT_MAX_MIB) * MIB
    else:
        mine = worker.footprint
    if used is not None and mine is not None and slot.idle_used is not None:
        # the driver's share: the least seen with nothing of ours on the GPU (a job that
        # was there all along does not pass for it: it is capped)
        floor = min(slot.idle_used, KEEPALIVE_IDLE_MEMORY_MIB * MIB)
        extra = used - floor - mine
        if extra > KEEPALIVE_FOREIGN_MEMORY_MIB * MIB:
            return f"foreign memory +{extra // MIB} MiB"
    return ""


def saw_foreign(slot: _Slot, now: float, reason: str) -> None:
    """Foreign work seen at ``now``: the hold-off counts from here, and its length from the
    first sight since the GPU was last free of it."""
    if slot.foreign_at is None:
        slot.foreign_since = now
    slot.foreign_at = now
    slot.foreign_reason = reason


def yield_signal(reason: str) -> str:
    """Which NVML reading a reason of ``foreign_work`` (or the controller) comes from."""
    if reason.startswith("foreign utilisation"):
        return "per-process utilisation"
    if reason.startswith("foreign memory"):
        return "memory"
    if "process" in reason:
        return "process list"
    return "utilisation"


def task_utilisation(worker: _Worker, reading: Reading) -> int | None:
    """The highest per-process SM utilisation on the GPU that is not the filler's own."""
    if not reading.process_util:
        return None
    top: dict[int, int] = {}
    for pid, sm in reading.process_util:
        top[pid] = max(top.get(pid, 0), sm)
    if worker.handle.pid in top:
        del top[worker.handle.pid]
    elif top:  # pids of another namespace: leave out the entry that looks like ours
        ours = 100 * (worker.busy if worker.busy is not None else worker.spec.duty)
        del top[min(top, key=lambda pid: abs(top[pid] - ours))]
    return max(top.values(), default=None)


def task_utilisation_beside(controller: DutyController) -> int | None:
    """Where NVML has no per-process figure for the task (not supported, or not sampled): its
    share of the time the filler leaves free, from the GPU's utilisation as the controller last
    judged it (on samples taken after its last change) less the filler's duty then; None
    before a judgement, or where the filler leaves too little time to tell."""
    util, ours = controller.last_util, controller.judged_duty
    if util is None or ours is None or ours > 0.9:
        return None
    return round(100 * max(0.0, util / 100 - ours) / (1.0 - ours))


def memory_back_below(slot: _Slot, worker: _Worker, used: int | None) -> int | None:
    """Memory used on the GPU at most once a leaving worker's memory is back: what was used
    before it started (and a margin), or ``used`` (while it still held its memory) less nine
    tenths of what it holds, whichever is more (a job that takes memory meanwhile must not
    hide our memory's return)."""
    limits = []
    if worker.memory_before is not None:
        limits.append(worker.memory_before + KEEPALIVE_FOREIGN_MEMORY_MIB * MIB)
    if worker.ready_at is not None and used is not None:
        limits.append(used - int(0.9 * worker.footprint))
    return max(limits) if limits else None


def memory_held_bounds(worker: _Worker, used: int | None) -> tuple[int | None, int | None]:
    """For a yield followed by memory alone: the memory used below which the leaving worker's
    memory cannot all be held (what was used before it, and nine tenths of what it holds),
    and ``used``, the memory used while it still held it: a job that takes more than that
    meanwhile hides whether ours is back."""
    below = None if worker.memory_before is None or worker.ready_at is None \
        else worker.memory_before + int(0.9 * worker.footprint)
    return below, used


class Workers:
    """The keep-alive worker of each GPU: started, stopped, heard, watched and reaped. Which
    worker a GPU should have is the engine's decision (GpuKeepAlive); this carries it out."""

    def __init__(self, nvml, spawn: Callable[[GpuInfo, WorkerSpec], WorkerHandle],
                 log: logging.Logger, prefix: str) -> None:
        self.nvml = nvml
        self.spawn = spawn
        self.log = log
        self.prefix = prefix

    def reap(self, slot: _Slot, now: float) -> None:
        """Read the worker's reports; notice when it has exited, and why."""
        worker = slot.worker
        if worker is None:
            return
        for line in worker.handle.messages():
            self._on_message(slot, worker, line, now)
        code = worker.handle.exit_code()
        if code is None:
            if worker.stop_at is not None and now - worker.stop_at >= _KILL_GRACE:
                self.kill(worker, now)
            if worker.killed_at is not None and now - worker.killed_at >= _KILLED_LIMIT:
                self._stuck(slot, worker)
            return
        for line in worker.handle.messages():
            self._on_message(slot, worker, line, now)
        slot.worker = None
        slot.last_exit = now
        lived = now - worker.started
        if worker.ready_at is not None and now - worker.ready_at >= _STABLE_SECONDS:
            slot.crashes = 0  # however it ended: it held its GPU long enough
        if worker.stop_at is not None:
            self.log.info("%s%s: keep-alive worker gone (%s) %.2f s after the stop",
                          self.prefix, slot.label, worker.stop_reason, now - worker.stop_at)
        elif not worker.killed_for and (code == EXIT_FOREIGN
                                        or worker.exit_reason.startswith("foreign")):
            # (its own exit line counts too: a daemon that reaps orphans as PID 1 may have
            # taken the exit status, which then reads 0)
            saw_foreign(slot, now, worker.exit_reason or "foreign work")
            slot.set(GpuState.YIELDED, slot.foreign_reason)
            self.log.info("%s%s: worker saw %s and left", self.prefix, slot.label,
                          slot.foreign_reason)
            if worker.ready_at is not None:  # it left as it saw it: timed from this tick
                slot.last_yield = YieldRecord(now, slot.foreign_reason,
                                              "the worker's own watch",
                                              memory_back_below(slot, worker,
                                                                slot.memory_before_tick),
                                              worker.handle.pid if worker.listed else None,
                                              *memory_held_bounds(worker,
                                                                  slot.memory_before_tick),
                                              exit_after=0.0)
        else:
            if code == EXIT_SETUP:
                slot.tile = None  # perhaps the tiles no longer fit: calibrate again
            slot.crashes += 1
            delay = self.backoff(slot, now)
            how = worker.killed_for or (f"exit status {code}" if code >= 0
                                        else f"signal {-code}")
            slot.set(GpuState.OFF, f"worker crashed ({how}); restart in {delay:.0f} s")
            self.log.warning("%s%s: keep-alive worker ended with %s after %.1f s "
                             "(crash %d); restarting in %.0f s", self.prefix, slot.label, how,
                             lived, slot.crashes, delay)

    def watchdog(self, slot: _Slot, now: float) -> None:
        """A worker that never gets ready, or stops reporting, is hung (a wedged driver call,
        a stopped process): it is killed, which frees its memory, and restarted with backoff."""
        worker = slot.worker
        if worker is None or worker.stop_at is not None or worker.killed_for:
            return
        if worker.ready_at is None and now - worker.started >= _START_LIMIT:
            worker.killed_for = f"not ready after {_START_LIMIT:.0f} s"
        elif worker.ready_at is not None and now - worker.heard_at >= _SILENT_LIMIT:
            # (before it is ready only the start limit counts: a worker may say a word and
            # then import torch for longer than this)
            worker.killed_for = f"silent for {now - worker.heard_at:.0f} s"
        else:
            return
        self.log.warning("%s%s: keep-alive worker %s: killed", self.prefix, slot.label,
                         worker.killed_for)
        self.kill(worker, now)

    def kill(self, worker: _Worker, now: float) -> None:
        """SIGKILL to a worker (again, where it is still there)."""
        if worker.killed_at is None:
            worker.killed_at = now
        worker.handle.kill()

    def _stuck(self, slot: _Slot, worker: _Worker) -> None:
        """A worker still there _KILLED_LIMIT after SIGKILL is stuck in the driver (a wedged
        CUDA call, a GPU that fell off the bus): the GPU idles, and no new worker can be
        started there while it holds the memory. Said, once; its memory counts as ours."""
        reason = (f"worker (pid {worker.handle.pid}) does not end after SIGKILL (stuck in the "
                  "driver?); its memory stays held")
        if not worker.stuck_said:  # (the GPU's reason may change meanwhile: a yield, a task)
            worker.stuck_said = True
            self.log.warning("%s%s: keep-alive %s", self.prefix, slot.label, reason)
        slot.set(GpuState.OFF, reason)

    def _on_message(self, slot: _Slot, worker: _Worker, line: str, now: float) -> None:
        worker.heard_at = now
        try:
            verb, fields = parse_message(line)
            if verb == "ready":
                worker.ready_at = now
                worker.tile = int(fields.get("tile", 0)) or None
                worker.tile_ms = float(fields.get("tile_ms", 0)) or None
                worker.held_mib = int(fields.get("held_mib", 0))
                if fields.get("context_mib", "").isdigit():
                    worker.context_mib = int(fields["context_mib"])
                if worker.spec.mode is WorkerMode.HOLD and worker.tile:
                    slot.tile = worker.tile
                slot.controller.reset(slot.window, worker.spec.duty)
                filling = worker.spec.mode is WorkerMode.FILL
                slot.set(GpuState.FILLING if filling else GpuState.HOLDING,
                          "task leaves the GPU idle" if filling else "")
                self.log.info("%s%s: %s: tiles of %d (%.1f ms), %d MiB held, context %s MiB, "
                              "duty %.2f", self.prefix, slot.label, slot.state.value,
                              worker.tile or 0, worker.tile_ms or 0.0, worker.held_mib,
                              worker.context_mib if worker.context_mib is not None else "?",
                              worker.spec.duty)
            elif verb == "stats":
                worker.busy = float(fields.get("busy", 0))
                worker.tile_ms = float(fields.get("tile_ms", 0)) or worker.tile_ms
            elif verb == "exit":
                worker.exit_reason = fields.get("reason", "").replace("-", " ")
                worker.exit_time = float(fields["t"]) if "t" in fields else None
            elif verb == "log":
                level = logging.getLevelName(fields["level"].upper())
                level = level if isinstance(level, int) else logging.INFO  # (a name of no level)
                self.log.log(level, "%s%s worker: %s", self.prefix, slot.label, fields["text"])
        except (ValueError, KeyError):
            self.log.debug("%s%s: unreadable worker line %r", self.prefix, slot.label, line)

    def start(self, slot: _Slot, now: float, spec: WorkerSpec, reading: Reading) -> None:
        mode = self.nvml.compute_mode(slot.gpu)
        if mode != 0 and not (mode is None and KEEPALIVE_ASSUME_DEFAULT_COMPUTE_MODE):
            # EXCLUSIVE_PROCESS: while our context exists, every other process's context
            # creation fails, so whoever comes next would crash instead of being yielded to.
            # A mode NVML cannot read may be that: not held, unless the setting says so.
            if mode is None:
                reason = ("compute mode unknown (NVML cannot read it): not held; "
                          "KEEPALIVE_ASSUME_DEFAULT_COMPUTE_MODE = True holds it")
            else:
                reason = f"compute mode {COMPUTE_MODES.get(mode, mode)}: skipped"
            if slot.reason != reason:
                self.log.warning("%s%s: %s (keep-alive needs DEFAULT)", self.prefix,
                                 slot.label, reason)
            slot.set(GpuState.OFF, reason)
            return
        if not slot.announced and spec.mode is WorkerMode.HOLD:
            total = slot.gpu.memory_total
            self.log.info("%s%s (%s, %.1f GiB): holding %.1f GiB; the seed's three %d x %d "
                          "fp16 matrices would take %.0f%% of it, but one product of that "
                          "size runs for seconds, so compute goes in ~%.0f ms tiles",
                          self.prefix, slot.label, slot.gpu.name, total / GIB,
                          spec.memory_mib / 1024, seed_matrix_size(total),
                          seed_matrix_size(total), MEMORY_USAGE_TARGET * 100, KEEPALIVE_TILE_MS)
            slot.announced = True
        if reading.memory_used is not None:
            spec = dataclasses.replace(spec, used_before_mib=reading.memory_used // MIB)
        try:
            handle = self.spawn(slot.gpu, spec)
        except Exception as exc:  # noqa: BLE001 - a failed start is retried like a crash
            slot.crashes += 1
            delay = self.backoff(slot, now)
            slot.set(GpuState.OFF, f"worker did not start; retry in {delay:.0f} s")
            self.log.warning("%s%s: keep-alive worker did not start (%s); retrying in %.0f s",
                             self.prefix, slot.label, exc, delay)
            return
        slot.worker = _Worker(handle, spec, now, reading.memory_used
                              if reading.memory_used is not None else slot.memory_used)
        slot.controller = DutyController(spec.duty)
        slot.set(GpuState.STARTING, "")

    def stop(self, slot: _Slot, now: float, reason: str) -> None:
        worker = slot.worker
        if worker is None or worker.stop_at is not None:
            return
        worker.stop_at = now
        worker.stop_reason = reason
        if worker.ready_at is None:
            self.kill(worker, now)  # still setting up: it reads no commands yet
        else:
            worker.handle.stop()
        slot.release_below = memory_back_below(slot, worker, slot.memory_used)

    def released(self, slot: _Slot, now: float) -> bool:
        """True when the slot's worker has exited and its memory is back."""
        self.reap(slot, now)
        if slot.worker is not None:
            return False
        if slot.release_below is None:
            return True
        memory = self.nvml.memory(slot.gpu)
        if memory is None:
            return True  # cannot see the memory; the process is gone
        slot.memory_used, slot.memory_total = memory
        if memory[0] <= slot.release_below:
            slot.release_below = None
            return True
        return False

    def abandon(self, slot: _Slot, now: float) -> None:
        """After an error: a worker we cannot watch must not hold the GPU. Kill it; it comes
        back after the crash backoff."""
        worker, slot.worker = slot.worker, None
        if worker is not None:
            try:
                worker.handle.kill()
            except Exception:  # noqa: BLE001 - best effort, it is dropped either way
                pass
            slot.last_exit = now
        slot.crashes += 1
        delay = self.backoff(slot, now)
        slot.set(GpuState.OFF, f"keep-alive error; retry in {delay:.0f} s")

    @staticmethod
    def backoff(slot: _Slot, now: float) -> float:
        """Schedule the restart after a crash: KEEPALIVE_RESTART_SECONDS, doubling per crash
        up to KEEPALIVE_RESTART_MAX_SECONDS. The doubling stops there: past a thousand
        crashes (days of a worker that cannot start) 2 ** n no longer fits a float."""
        doublings = min(slot.crashes - 1, 60)
        delay = min(KEEPALIVE_RESTART_MAX_SECONDS, KEEPALIVE_RESTART_SECONDS * 2 ** doublings)
        slot.restart_at = now + delay
        return delay


# Keep-alive: the engine #####################################################################


class GpuMeasures:
    """How each GPU fares under keep-alive, measured at the end of each tick: the band and held
    shares, how long the last yield took, the reclaim risk; and the ``gpu.<i>.*`` fields of
    the state file that report them with the GPU's state."""

    def __init__(self, slots: list[_Slot], log: logging.Logger, prefix: str,
                 throttle: Throttle, timefunc: Callable[[], float]) -> None:
        self.slots = slots
        self.log = log
        self.prefix = prefix
        self._throttle = throttle
        self.timefunc = timefunc

    def gpu_fields(self) -> dict[str, str]:
        fields = {}
        now = self.timefunc()
        for i, slot in enumerate(self.slots):
            util = slot.window.mean()
            worker = slot.worker
            ready = worker is not None and worker.ready_at is not None
            reason = "; ".join(part for part in (slot.reason, *slot.notes) if part)
            record = slot.last_yield
            fields.update({
                f"gpu.{i}.util": "" if util is None else f"{util:.0f}",
                f"gpu.{i}.mem_used_mib": _mib(slot.memory_used),
                f"gpu.{i}.mem_total_mib": _mib(slot.memory_total or slot.gpu.memory_total),
                f"gpu.{i}.state": slot.state.value,
                f"gpu.{i}.reason": reason,
                f"gpu.{i}.band_10m": _share(slot.meter.share(now, 600.0, "band")),
                f"gpu.{i}.band_1h": _share(slot.meter.share(now, 3600.0, "band")),
                f"gpu.{i}.held_10m": _share(slot.meter.share(now, 600.0, "held")),
                f"gpu.{i}.held_1h": _share(slot.meter.share(now, 3600.0, "held")),
                f"gpu.{i}.last_yield": "" if record is None else record.text(),
                f"gpu.{i}.last_yield_age": "" if record is None else f"{now - record.at:.0f}",
                f"gpu.{i}.risk": slot.risk,
                f"gpu.{i}.tile": str(worker.tile) if ready and worker.tile else "",
                f"gpu.{i}.duty": f"{slot.controller.duty:.2f}" if ready else "",
                f"gpu.{i}.held_mib": str(worker.held_mib) if ready and worker.held_mib else "",
                f"gpu.{i}.history": slot.history.text(now),
            })
        return fields

    def measure(self, slot: _Slot, now: float, reading: Reading, task_running: bool) -> None:
        worker = slot.worker
        held = worker is not None and worker.ready_at is not None and worker.stop_at is None \
            and worker.killed_at is None and worker.spec.mode is WorkerMode.HOLD  # (a filler
        # beside a queue task is not: the task has the GPU, and its samples are not judged)
        if slot.ticked_at is not None:
            slot.meter.time(now, min(now - slot.ticked_at, 5.0), held)
        slot.ticked_at = now
        if held and reading.samples and worker.spec.mode is WorkerMode.HOLD:
            slot.meter.samples(now, [value for _, value in reading.samples])
        band = slot.meter.share(now, 600.0, "band")
        held_for = slot.meter.total(now, 600.0, 3)  # s held in the last ten minutes
        if band is not None and band < _BAND_WARN_SHARE and held_for >= 300.0:
            if not slot.band_warned:
                self.log.warning("%s%s: only %.0f%% of NVML's samples in the band %d-%d%% "
                                 "over 10 min while held (%s)", self.prefix, slot.label,
                                 100 * band, GPU_UTIL_TARGET, GPU_UTIL_HIGH,
                                 "; ".join(slot.notes) or "no reading stands in")
                slot.band_warned = True
        elif band is not None and band >= _BAND_WARN_SHARE:
            slot.band_warned = False
        self._follow_yield(slot, now, reading)
        self.judge_risk(slot, now, task_running)

    def _follow_yield(self, slot: _Slot, now: float, reading: Reading) -> None:
        """Time the last yield: until its worker is gone, and until its memory is back (not
        followed past a minute: a job that grows meanwhile can hide our memory's return)."""
        record = slot.last_yield
        if record is None or record.done:
            return
        if record.exit_after is None:
            if slot.worker is not None:
                return
            record.exit_after = max(0.0, (slot.last_exit or now) - record.at)
        # Back: where the process list showed the worker under its PID, when its entry is
        # gone (the driver drops it with the context and its memory); else when memory used
        # is down to the limit, or below what ours alone would keep used. A job that takes
        # memory meanwhile can hide that: then it is not known ("?"), and not warned about.
        used = reading.memory_used
        hidden = False
        if record.pid is not None and reading.processes is not None:
            back = record.pid not in {p.pid for p in reading.processes}
        else:
            back = record.memory_limit is None or (used is not None and (
                used <= record.memory_limit
                or (record.not_held_below is not None and used < record.not_held_below)))
            # more used than while ours was held: a job fills the GPU, and whether ours is
            # back cannot be told by memory (not known, "?", rather than the job's end)
            hidden = not back and used is not None and record.used_at is not None \
                and used > record.used_at
        if back:
            record.memory_after = max(record.exit_after, now - record.at)
        elif now - record.at <= 60.0 and not hidden:
            return
        record.done = True
        took = max(record.exit_after, record.memory_after or 0.0)
        if took > _YIELD_WARN_SECONDS:
            self.log.warning("%s%s: yielding to %s took %.2f s (worker gone after %.2f s, "
                             "memory back after %s)", self.prefix, slot.label, record.what, took,
                             record.exit_after, "?" if record.memory_after is None
                             else f"{record.memory_after:.2f} s")

    def judge_risk(self, slot: _Slot, now: float, task_running: bool) -> None:
        """A GPU below the band for KEEPALIVE_RISK_SECONDS is at risk of being reclaimed as
        idle: marked in gpu.<i>.risk, and a WARNING (again every ten minutes while it lasts).
        It is judged on the mean of the last _RISK_MEAN_SECONDS: a short burst (a job of two
        seconds, a probe) does not make a GPU that idles between them safe."""
        util = None if slot.window.mean() is None else \
            slot.history.mean(now, _RISK_MEAN_SECONDS)
        if util is not None and util >= GPU_UTIL_TARGET:
            if slot.risk:
                self.log.info("%s%s: back at %.0f%% utilisation: no longer at risk",
                              self.prefix, slot.label, util)
            slot.low_for, slot.risk = None, ""
            return
        if slot.low_for is None:
            slot.low_for = now
        why = "a queue task leaves it idle" if task_running else (
            f"keep-alive {slot.state.value}" + (f": {slot.reason}" if slot.reason else ""))
        notes = "; ".join(slot.notes)
        risk = reclaim_risk(slot.label, slot.low_for, now, util,
                            why + (f"; {notes}" if notes else ""))
        if not risk:
            return
        slot.risk = risk
        if self._throttle(f"risk/{slot.gpu.index}", every=600.0):
            self.log.warning("%sAt risk of reclaim: %s", self.prefix, slot.risk)


class GpuKeepAlive(KeepAlive):
    """Keep-alive on: one worker per GPU, driven by ``tick()`` from the daemon loop. The engine
    decides, GPU by GPU, whether to hold it, fill beside a task, or leave it to foreign work;
    ``Workers`` starts and stops the processes.

    Every outside effect goes through a seam: ``nvml`` (the NVML calls), ``spawn`` (starting a
    worker process), ``timefunc`` and ``delayfunc`` (the clock and the sleep in ``stop``).
    """

    def __init__(self, nvml, gpus: list[GpuInfo], log: logging.Logger, *,
                 spawn: Callable[[GpuInfo, WorkerSpec], WorkerHandle] = spawn_worker,
                 timefunc: Callable[[], float] = time.monotonic,
                 delayfunc: Callable[[float], object] = time.sleep,
                 holdoff: float = KEEPALIVE_HOLDOFF_SECONDS,
                 filler: bool = KEEPALIVE_FILLER, node_label: str = "",
                 release_timeout: float = RELEASE_TIMEOUT_SECONDS) -> None:
        # once stopped (the auto-shutdown's drain), the GPUs are watched as with keep-alive off
        super().__init__("", nvml, gpus, log)
        self.release_timeout = release_timeout
        self.nvml = nvml
        self.log = log
        self.timefunc = timefunc
        self.delayfunc = delayfunc
        self.holdoff = holdoff
        self.filler = filler
        self.prefix = f"{node_label} " if node_label else ""
        self.slots = [_Slot(gpu) for gpu in gpus]
        self.workers = Workers(nvml, spawn, log, self.prefix)
        for slot in self.slots:
            if slot.gpu.mig:
                slot.reason = "MIG mode: skipped"
        self._started = False
        self._throttle = Throttle(_WARN_EVERY, timefunc)
        self.measures = GpuMeasures(self.slots, log, self.prefix, self._throttle, timefunc)

    # The seam the daemon calls

    def describe(self) -> str:
        return f"off: {self.why}" if self.why else "on"

    def child_pids(self) -> set[int]:
        return {slot.worker.handle.pid for slot in self.slots if slot.worker is not None}

    def start(self) -> None:
        self._started = True
        self.why = ""
        names = ", ".join(f"{s.gpu.index}: {s.gpu.name}" for s in self.slots if not s.gpu.mig)
        self.log.info("%sKeep-alive on for GPU %s", self.prefix, names)
        for slot in self.slots:
            if not slot.gpu.mig:
                slot.set(GpuState.OFF, "starting at the next tick")

    def tick(self, now: float, busy: Mapping[int, str]) -> None:
        """``now`` is the daemon's clock, which may be the wall clock. The engine keeps time by
        its own ``timefunc`` (monotonic), the one ``release()`` and ``task_finished()`` use."""
        if not self._started:
            if self.why:  # stopped: what is left idle is at risk all the same (timed by
                self._watch_idle(self.timefunc(), busy)  # the engine's own clock)
            return
        now = self.timefunc()
        for i, slot in enumerate(self.slots):
            task_running = i in busy or slot.released_at is not None
            try:
                self._tick_slot(slot, now, task_running)
            except Exception:  # noqa: BLE001 - one GPU's trouble must never stop the daemon
                if self._throttle(f"tick/{slot.gpu.index}"):
                    self.log.exception("%s%s: keep-alive error", self.prefix, slot.label)
                self.workers.abandon(slot, now)
                # a GPU whose every tick fails is idle all the same: it is judged on what
                # is known of its utilisation (nothing new: unknown), and flagged at risk
                with contextlib.suppress(Exception):
                    self.measures.judge_risk(slot, now, task_running)

    def release(self, gpus: Collection[int]) -> None:
        now = self.timefunc()
        for i in gpus:
            slot = self.slots[i]
            if slot.released_at is None:
                slot.released_at = now
                slot.release_done = False
            if slot.worker is not None:
                self.workers.stop(slot, now, "queue task")
            elif slot.last_exit is None or now - slot.last_exit >= _EXIT_GRACE:
                # nothing of ours is on the GPU, nor just left it: the limit of an earlier
                # stop (a yield, say) would hold the task back for a job's memory, not ours
                slot.release_below = None
            if not slot.gpu.mig:
                slot.set(GpuState.YIELDED, "queue task")

    def released(self, gpus: Collection[int]) -> bool:
        now = self.timefunc()
        waiting = []
        newly = []
        for i in gpus:
            slot = self.slots[i]
            if slot.release_done:
                continue
            try:
                done = self.workers.released(slot, now)
            except Exception:  # noqa: BLE001 - the task must start all the same
                self.log.exception("%s%s: error while releasing", self.prefix, slot.label)
                self.workers.abandon(slot, now)
                done = True
            begun = slot.released_at if slot.released_at is not None else now
            if not done and now - begun >= self.release_timeout:
                if slot.worker is not None:
                    self.workers.kill(slot.worker, now)
                slot.release_below = None
                self.log.warning("%s%s: keep-alive memory not released within %.1f s; "
                                 "starting the task anyway", self.prefix, slot.label,
                                 self.release_timeout)
                done = True
            if done:
                slot.release_done = True
                newly.append((slot, now - begun))
            else:
                waiting.append(slot)
        slow = [f"{s.label} {took:.2f} s" for s, took in newly if took > 0.05]
        if slow:
            self.log.info("%sReleased for the task: %s", self.prefix, ", ".join(slow))
        return not waiting

    def task_finished(self, gpus: Collection[int]) -> None:
        now = self.timefunc()
        for i in gpus:
            slot = self.slots[i]
            slot.released_at = None
            slot.release_done = False
            if slot.worker is not None:
                self.workers.stop(slot, now, "queue task ended")
            slot.resume_at = now + KEEPALIVE_RESUME_AFTER_TASK
            slot.foreign_at = slot.foreign_since = None
            slot.low_since = None

    def gpu_fields(self) -> dict[str, str]:
        fields = self.measures.gpu_fields()
        if self.why:
            fields.update(super().gpu_fields())
        return fields

    def stop(self, why: str = "stopped") -> None:
        self.why = why
        now = self.timefunc()
        for slot in self.slots:
            if slot.worker is not None:
                self.workers.stop(slot, now, "daemon stopping")
        deadline = now + 2.0
        while any(slot.worker is not None for slot in self.slots):
            now = self.timefunc()
            for slot in self.slots:
                if slot.worker is not None and now >= deadline:
                    self.workers.kill(slot.worker, now)
                self.workers.reap(slot, now)
            if now >= deadline + 1.0:
                break
            self.delayfunc(_RELEASE_POLL)
        for slot in self.slots:
            slot.set(GpuState.OFF, "stopped")
        self._started = False

    # One GPU, one tick

    def _tick_slot(self, slot: _Slot, now: float, task_running: bool) -> None:
        if slot.gpu.mig:
            slot.set(GpuState.OFF, "MIG mode: skipped")
            return
        reading = read_gpu(self.nvml, slot, now)
        self.workers.reap(slot, now)  # a worker that left is not judged by the list below
        note = process_list_note(slot, reading, now)
        if note:
            slot.notes += (note,)
        if slot.pids_foreign and self._throttle(f"pids/{slot.gpu.index}", once=True):
            self.log.info("%s%s: NVML lists our worker under another PID (another PID "
                          "namespace, or a GPU proxy that shows many processes as one): "
                          "processes are counted, and memory decides too", self.prefix,
                          slot.label)
        self.workers.watchdog(slot, now)
        if task_running:
            self._during_task(slot, now, reading)
        else:
            self._between_tasks(slot, now, reading)
        self.measures.measure(slot, now, reading, task_running)

    def _between_tasks(self, slot: _Slot, now: float, reading: Reading) -> None:
        if slot.resume_at is not None:
            if now < slot.resume_at:
                slot.set(GpuState.YIELDED, "queue task ended")
                return
            slot.resume_at = None
        worker = slot.worker
        if worker is not None and worker.spec.mode is WorkerMode.FILL:
            self.workers.stop(slot, now, "queue task ended")
        if (slot.nvml_failing_since is not None
                and now - slot.nvml_failing_since >= _NVML_FAIL_SECONDS):
            if slot.worker is not None and slot.worker.stop_at is None:
                self.workers.stop(slot, now, "NVML not answering")
                self.log.warning("%s%s: NVML has not answered for %.0f s: worker stopped, "
                                 "foreign work could not be seen", self.prefix, slot.label,
                                 now - slot.nvml_failing_since)
            slot.set(GpuState.YIELDED, "NVML not answering")
            return
        reason = foreign_work(slot, reading, now)
        if reason:
            self._yield(slot, now, reason)
            return
        worker = slot.worker
        if worker is not None:
            if worker.stop_at is None and worker.ready_at is not None \
                    and worker.killed_at is None and not self._mode_changed(slot, now):
                self._control(slot, worker, now)
            return
        if slot.restart_at is not None and now < slot.restart_at:
            return
        holdoff = self._holdoff(slot)
        if slot.foreign_at is not None and now - slot.foreign_at < holdoff:
            left = holdoff - (now - slot.foreign_at)
            slot.set(GpuState.YIELDED, f"{slot.foreign_reason}; hold-off {left:.0f} s")
            return
        if slot.foreign_at is not None:
            self.log.info("%s%s: free of foreign work for %.0f s: taking it again",
                          self.prefix, slot.label, holdoff)
            slot.foreign_at = slot.foreign_since = None
        slot.restart_at = None
        total, used = reading.memory_total, reading.memory_used
        total = total or slot.gpu.memory_total
        util = slot.window.mean()
        # Where NVML gives no utilisation at all (buffer and rate fail), the GPU is taken all
        # the same: the memory and the process list still show foreign work, and a GPU left
        # idle is what gets the job reclaimed (slot.notes say so in the GPU's reason).
        if util is not None and util >= _IDLE_UTIL_MAX:  # somebody computes: not ours
            self._yield(slot, now, f"GPU busy ({util:.0f}%) without us")
            return
        target = int(MEMORY_USAGE_TARGET * total // MIB)
        # Where NVML cannot read the memory, the worker can: it takes its ballast a piece
        # at a time, each within CUDA's live free memory less the headroom.
        memory = target if used is None else hold_mib(total, used)
        if memory < target:  # a worker never starts without room for its whole ballast
            reason = f"no room for the ballast ({memory} of {target} MiB)"
            if not slot.reason.startswith("no room"):
                self.log.warning("%s%s: %s: not held", self.prefix, slot.label, reason)
            slot.set(GpuState.OFF, reason)
            return
        spec = WorkerSpec(WorkerMode.HOLD, memory, KEEPALIVE_START_DUTY, tile=slot.tile or 0)
        self.workers.start(slot, now, spec, reading)

    def _mode_changed(self, slot: _Slot, now: float) -> bool:
        """A held GPU whose compute mode is no longer DEFAULT (set to EXCLUSIVE_PROCESS for a
        job meanwhile, say): while our context is there, every other process's context fails,
        so the worker goes, and the GPU is skipped as at a start. Asked every
        _MODE_RECHECK_SECONDS; a mode that cannot be read leaves the worker where it is."""
        if slot.mode_asked_at is not None and now - slot.mode_asked_at < _MODE_RECHECK_SECONDS:
            return False
        slot.mode_asked_at = now
        mode = self.nvml.compute_mode(slot.gpu)
        if mode is None or mode == 0:
            return False
        reason = f"compute mode {COMPUTE_MODES.get(mode, mode)}: skipped"
        self.log.warning("%s%s: %s (keep-alive needs DEFAULT): worker stopped", self.prefix,
                         slot.label, reason)
        self.workers.stop(slot, now, reason)
        slot.set(GpuState.OFF, reason)
        # asked again as a worker would start, once our own samples have left the window
        slot.restart_at = now + KEEPALIVE_RESTART_SECONDS
        return True

    def _holdoff(self, slot: _Slot) -> float:
        """How long the GPU must stay free of foreign work before it is taken again: as long
        as the work lasted, at least KEEPALIVE_HOLDOFF_MIN_SECONDS and at most the hold-off.
        A long job that ends may be followed by its next step, and gets the whole hold-off; a
        brief one (a probe, a health check every minute) would, with that, keep the GPU away
        for good and leave it idle until the cluster reclaims it."""
        if slot.foreign_at is None:
            return 0.0
        lasted = slot.foreign_at - (slot.foreign_since if slot.foreign_since is not None
                                    else slot.foreign_at)
        return min(self.holdoff, max(KEEPALIVE_HOLDOFF_MIN_SECONDS, lasted))

    def _yield(self, slot: _Slot, now: float, reason: str) -> None:
        """Foreign work is on the GPU: our worker goes, and the hold-off starts (again)."""
        if slot.foreign_at is None or slot.foreign_reason != reason:
            self.log.info("%s%s: %s: yielding", self.prefix, slot.label, reason)
        saw_foreign(slot, now, reason)
        if slot.worker is not None and slot.worker.stop_at is None:
            self._stop_for(slot, now, reason)
        slot.set(GpuState.YIELDED, reason)

    def _stop_for(self, slot: _Slot, now: float, reason: str) -> None:
        """Stop the worker for foreign work, and follow the yield (``slot.last_yield``)."""
        worker = slot.worker
        self.workers.stop(slot, now, reason)
        if worker is not None and worker.ready_at is not None:
            slot.last_yield = YieldRecord(now, reason, yield_signal(reason), slot.release_below,
                                          worker.handle.pid if worker.listed else None,
                                          *memory_held_bounds(worker, slot.memory_used))

    def _during_task(self, slot: _Slot, now: float, reading: Reading) -> None:
        worker = slot.worker
        if worker is not None and worker.spec.mode is WorkerMode.HOLD:
            self.workers.stop(slot, now, "queue task")
        util = slot.window.mean()
        if slot.worker is None:
            if util is not None and util < GPU_UTIL_THRESHOLD:
                slot.low_since = slot.low_since if slot.low_since is not None else now
            else:
                slot.low_since = None
        if not self.filler:
            slot.set(GpuState.YIELDED, "queue task")
            return
        worker = slot.worker
        total, used = reading.memory_total, reading.memory_used
        if worker is not None:
            if worker.stop_at is not None:
                return
            task_util = task_utilisation(worker, reading)
            if task_util is None:
                task_util = self._task_busy_beside(slot)
            if total and used is not None and total - used < KEEPALIVE_HEADROOM * total:
                self._stop_filler(slot, now, "the task needs the memory")
            elif task_util is not None and task_util >= GPU_UTIL_THRESHOLD:
                self._stop_filler(slot, now, f"the task is busy again ({task_util}%)")
            elif worker.ready_at is not None and worker.killed_at is None:
                self._control(slot, worker, now)
            return
        if slot.restart_at is not None and now < slot.restart_at:
            return
        need = (KEEPALIVE_FILLER_MIB + _CONTEXT_MIB) * MIB
        idle_long = slot.low_since is not None and now - slot.low_since >= \
            KEEPALIVE_FILLER_AFTER_SECONDS
        room = total is not None and used is not None and \
            total - used - need >= KEEPALIVE_HEADROOM * total
        if idle_long and room:
            fits = slot.tile is not None and 3 * slot.tile ** 2 * 2 <= KEEPALIVE_FILLER_MIB * MIB
            spec = WorkerSpec(WorkerMode.FILL, KEEPALIVE_FILLER_MIB, _FILLER_START_DUTY,
                              KEEPALIVE_FILLER_MIB, tile=slot.tile if fits else 0)
            self.workers.start(slot, now, spec, reading)
            if slot.worker is not None:  # (a compute mode that refuses it is said once, there)
                self.log.info("%s%s: the task has left it below %d%% for %.0f s: filling",
                              self.prefix, slot.label, GPU_UTIL_THRESHOLD, now - slot.low_since)
        elif slot.state is not GpuState.YIELDED or not slot.reason.startswith("queue task"):
            slot.set(GpuState.YIELDED, "queue task")

    @staticmethod
    def _task_busy_beside(slot: _Slot) -> int | None:
        """The task's utilisation estimated beside the filler (``task_utilisation_beside``),
        once it has stayed at GPU_UTIL_THRESHOLD or more over judgements a whole window apart:
        one judgement alone may straddle a duty change."""
        estimate = task_utilisation_beside(slot.controller)
        judged_at = slot.controller.judged_at
        if estimate is None or judged_at is None or estimate < GPU_UTIL_THRESHOLD:
            slot.task_busy_at = None
            return estimate
        if slot.task_busy_at is None or slot.task_busy_at > judged_at:
            slot.task_busy_at = judged_at
        return estimate if judged_at - slot.task_busy_at >= KEEPALIVE_UTIL_WINDOW * 1e6 \
            else None

    def _control(self, slot: _Slot, worker: _Worker, now: float) -> None:
        duty = slot.controller.decide(slot.window)
        if duty is not None:
            worker.handle.send(f"duty {duty:.3f}")
            self.log.debug("%s%s: utilisation %.0f%%: duty %.2f", self.prefix, slot.label,
                           slot.controller.last_util, duty)
            return
        util = slot.controller.last_util
        if util is not None and util > GPU_UTIL_HIGH and slot.controller.at_floor:
            if worker.spec.mode is WorkerMode.FILL:
                self._stop_filler(slot, now, "the task keeps the GPU busy")
            else:  # busy beyond what we do, by something NVML does not list
                saw_foreign(slot, now, f"GPU busy ({util:.0f}%) without us")
                self._stop_for(slot, now, slot.foreign_reason)
                slot.set(GpuState.YIELDED, slot.foreign_reason)

    def _stop_filler(self, slot: _Slot, now: float, reason: str) -> None:
        self.log.info("%s%s: %s: filler stopped", self.prefix, slot.label, reason)
        self.workers.stop(slot, now, reason)
        slot.low_since = None
        slot.set(GpuState.YIELDED, f"queue task ({reason})")


def _mib(value: int | None) -> str:
    return "" if value is None else str(value // MIB)


def _share(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"



def make_keepalive(enabled: bool, log: logging.Logger, inventory: Inventory,
                   node_label: str = "") -> KeepAlive:
    """The keep-alive engine for the inventory's GPUs, or keep-alive off with a reason. Never
    raises; when the GPUs cannot be used it says why in one warning."""
    def off(why: str) -> KeepAlive:  # the real GPUs are still watched for reclaim risk
        blind_why = inventory.nvml_error if inventory.blind and enabled else ""
        return KeepAlive(why, inventory.nvml, inventory.gpus, log, blind_why)

    if not enabled:  # the daemon says so at start, among its settings
        return off("disabled")
    try:
        why = inventory.why if inventory.nvml is None or not inventory.gpus else ""
        if not why and importlib.util.find_spec("torch") is None:
            why = "torch is not installed (the workers need it)"
        if why:
            log.warning("Keep-alive off: %s", why)
            return off(why)
        return GpuKeepAlive(inventory.nvml, list(inventory.gpus), log, node_label=node_label)
    except Exception as exc:  # noqa: BLE001 - keep-alive must never keep the queue from running
        log.warning("Keep-alive off: unexpected error: %s", exc)
        return off(f"error: {exc}")


# Keep-alive: the worker process, the GPU's side #############################################
#
# ``perpetual_motion.py --worker <GPU UUID> [options]``: started by the daemon, one per GPU, with
# CUDA_VISIBLE_DEVICES set to that UUID. It reads commands on stdin (``duty <0..1>``, ``stop``;
# end of input is a stop) and writes reports on stdout (``ready``, ``stats``, ``exit``, ``log``,
# as ``verb key=value ...`` lines). Leaving is os._exit(): the CUDA context and every byte of
# memory go with the process, at once.


class TorchTiles:
    """Square matmul tiles on one device, launched in groups, each group timed: with one pair
    of CUDA events on a GPU (kept for reuse, waited on with blocking sync, so the CPU sleeps),
    with the clock on the CPU (the tests). Once ``use_graphs()`` is called, a group of k tiles
    is one CUDA graph, launched by one call: on an H200 that halved the worker's CPU, as a
    launch costs the CPU more than the waits and the events."""

    def __init__(self, torch, n: int, device: str = "cuda", blocking: bool = True) -> None:
        self.torch = torch
        self.n = n
        self.cuda = device.startswith("cuda")
        # blocking sync puts a waiting thread to sleep, through CUDA's event thread; without
        # it the events are asked with query() and the worker sleeps between the asks
        self.blocking = blocking
        dtype = torch.float16 if self.cuda else torch.float32
        # randn, scaled: entries of the product stay near 1, far from fp16's maximum
        self.a = torch.randn(n, n, device=device, dtype=dtype)
        self.b = torch.randn(n, n, device=device, dtype=dtype) / math.sqrt(n)
        self.c = torch.empty_like(self.a)
        self.nbytes = 3 * self.a.numel() * self.a.element_size()
        self.pending: collections.deque = collections.deque()  # (count, start, end)
        self.events: list = []  # event pairs free for reuse
        self.graphs: dict[int, Any] | None = None  # tiles in a group: its graph
        self.graph_error = ""  # why graphs are not used, when capturing one failed
        self.estimate: float | None = None  # seconds per tile, a moving average

    @property
    def in_flight(self) -> int:
        return sum(count for count, _, _ in self.pending)

    def use_graphs(self, counts: range) -> bool:
        """Capture a graph for each group size in ``counts``; False (plain launches, and
        ``graph_error`` says why) where CUDA cannot."""
        if not self.cuda:
            return False
        self.graphs = {}
        return all(self._capture(count) is not None for count in counts)

    def _run(self, count: int) -> None:
        torch = self.torch
        if self.graphs is not None:
            graph = self.graphs.get(count)
            if graph is None:
                graph = self._capture(count)
            if graph is not None:
                graph.replay()
                return
        for _ in range(count):
            torch.mm(self.a, self.b, out=self.c)

    def _capture(self, count: int):
        """The graph of ``count`` tiles; None, and plain launches from now on, where CUDA
        cannot capture one (the error is kept for the worker's report)."""
        torch = self.torch
        try:
            torch.mm(self.a, self.b, out=self.c)  # cuBLAS set up outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(count):
                    torch.mm(self.a, self.b, out=self.c)
        except Exception as exc:  # noqa: BLE001 - plain launches do the same work
            self.graphs = None
            self.graph_error = f"{type(exc).__name__}: {exc}"[:200]
            return None
        self.graphs[count] = graph
        return graph

    def launch(self, count: int = 1) -> None:
        """Queue ``count`` tiles as one group."""
        if not self.cuda:
            begin = time.perf_counter()
            self._run(count)
            self.pending.append((count, time.perf_counter() - begin, None))
            return
        if self.events:
            start, end = self.events.pop()
        else:
            Event = self.torch.cuda.Event
            start, end = Event(enable_timing=True, blocking=self.blocking), \
                Event(enable_timing=True, blocking=self.blocking)
        start.record()
        self._run(count)
        end.record()
        self.pending.append((count, start, end))

    def wait_one(self) -> float:
        """Wait for the oldest group; its busy time in seconds."""
        count, start, end = self.pending.popleft()
        if self.cuda:
            if self.blocking:
                end.synchronize()
            else:
                while not end.query():
                    time.sleep(0.001)
            seconds = start.elapsed_time(end) / 1000
            self.events.append((start, end))
        else:
            seconds = start
        each = seconds / count
        self.estimate = each if self.estimate is None else 0.8 * self.estimate + 0.2 * each
        return seconds


def calibrate_tiles(make: Callable[[int], TorchTiles], target: float, n: int = 4096,
                    step: int = 1024, n_max: int = 32768, max_bytes: int = 0,
                    element_size: int = 2) -> TorchTiles:
    """Tiles whose product takes about ``target`` seconds on this device: time a size, scale
    it by the cube root of the ratio (the work grows as n^3), a few rounds."""
    def fits(size: int) -> bool:
        return not max_bytes or 3 * size * size * element_size <= max_bytes

    while n > step and not fits(n):
        n -= step
    tried: dict[int, float] = {}
    while True:
        tiles = make(n)
        for _ in range(2):  # the first products pay for library set-up
            tiles.launch()
            tiles.wait_one()
        times = []
        for _ in range(5):
            tiles.launch()
            times.append(tiles.wait_one())
        seconds = sorted(times)[len(times) // 2]
        tiles.estimate = seconds
        tried[n] = seconds
        scaled = n * (target / max(seconds, 1e-6)) ** (1 / 3)
        nxt = min(n_max, max(step, round(scaled / step) * step))
        while nxt > step and not fits(nxt):
            nxt -= step
        if nxt == n or nxt in tried or len(tried) >= 5:
            return tiles
        del tiles
        n = nxt


def run_worker_loop(tiles: TorchTiles, control, *, duty: float,
                    report: Callable[[str], object], period: float = KEEPALIVE_PERIOD,
                    watch: Callable[[], str] | None = None,
                    clock: Callable[[], float] = time.monotonic,
                    max_in_flight: int = KEEPALIVE_MAX_IN_FLIGHT,
                    watch_every: float = _WATCH_SECONDS, group: int = 0) -> int:
    """The duty cycle: each period, keep the device busy for ``duty`` x ``period`` with tiles
    (at most ``max_in_flight`` queued), launched at once at the period's start in groups of
    up to ``group`` (0: ``max_in_flight``), each group timed as one; the process sleeps,
    awake for commands, while they run and the device then idles until the period ends, and
    collects their times at the next period's start. Busy time is measured, and what one
    period over- or under-spends is carried to the next, so the share of busy time follows
    ``duty`` exactly on average. ``watch`` looks for foreign work every ``watch_every``
    seconds, whatever the period. Returns the exit status."""
    credit = 0.0  # busy seconds still to spend
    busy = 0.0
    since = clock()
    next_watch = since
    planned: collections.deque[float] = collections.deque()  # busy seconds of queued groups
    due: collections.deque[float] = collections.deque()  # when each should be done
    group = max(1, min(group or max_in_flight, max_in_flight))

    def obey(commands: list[str]) -> int | None:
        nonlocal duty
        for command in commands:
            verb, _, value = command.partition(" ")
            if verb == "duty":
                try:
                    duty = min(1.0, max(0.0, float(value)))
                except ValueError:
                    report(f"log WARNING bad command {command!r}")
            elif verb in ("stop", "eof"):
                report(f"exit reason={verb} t={time.time():.6f}")
                return 0
        return None

    def look() -> int | None:
        nonlocal next_watch
        if watch is None or clock() < next_watch:
            return None
        next_watch = clock() + watch_every
        reason = watch()
        if reason:  # leave at once: queued tiles die with the context
            report(f"exit reason={reason} t={time.time():.6f}")
            return EXIT_FOREIGN
        return None

    def finish_one() -> None:
        nonlocal credit, busy
        seconds = tiles.wait_one()
        planned.popleft()
        due.popleft()
        credit -= seconds
        busy += seconds

    def pause(until: float) -> int | None:
        """Sleep until ``until``, awake for commands and looking every ``watch_every``."""
        while True:
            now = clock()
            left = until - now
            if left <= 0:
                return None
            if watch is not None:
                left = min(left, max(0.0, next_watch - now))
            code = obey(control.poll(left))
            if code is None:
                code = look()
            if code is not None:
                return code

    while True:
        begin = clock()
        while tiles.in_flight:  # the last period's tiles: done by now, unless the GPU lags
            finish_one()
        estimate = tiles.estimate or period / 10
        credit = max(-period, min(credit + duty * period, duty * period + estimate))
        # the tiles that bring the credit nearest to nothing, as whole tiles
        count = max(0, math.floor((credit - sum(planned)) / estimate + 0.5))
        while count:
            code = obey(control.poll(0))
            if code is None:
                code = look()
            if code is not None:
                return code
            if tiles.in_flight >= max_in_flight:  # sleep until the oldest group is done
                code = pause(due[0])
                if code is not None:
                    return code
                finish_one()
            now = min(count, group, max_in_flight - tiles.in_flight)
            tiles.launch(now)
            planned.append(now * estimate)
            due.append(max(clock(), due[-1] if due else 0.0) + now * estimate)
            count -= now
            estimate = tiles.estimate or estimate
        # The tiles run while this process sleeps until the period ends: it waits on no
        # tile (each wait is a wake-up, and the wake-ups were most of a worker's CPU).
        code = look()
        if code is not None:
            return code
        now = clock()
        if now - since >= _REPORT_SECONDS:
            report(f"stats duty={duty:.3f} busy={busy / (now - since):.3f} "
                   f"tile_ms={estimate * 1000:.2f}")
            busy, since = 0.0, now
        code = pause(begin + period)
        if code is not None:
            return code


class StdinControl:
    """Commands from the daemon, one per line on a file descriptor; end of input is ``eof``."""

    def __init__(self, fd: int = 0) -> None:
        self.fd = fd
        self.buffer = b""
        self.eof = False

    def poll(self, timeout: float) -> list[str]:
        """The commands that arrived, waiting up to ``timeout`` seconds for the first."""
        if self.eof:
            return ["eof"]
        try:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        except InterruptedError:
            return []
        if not ready:
            return []
        data = os.read(self.fd, 4096)
        if not data:
            self.eof = True
            data = b"\neof\n"
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        return [line.decode(errors="replace").strip() for line in lines if line.strip()]


class ForeignWork(Exception):
    """A worker saw somebody else's work on its GPU while it set up; the message says what."""


class _NvmlWatch:
    """The worker's own look for foreign work: the fast path of the yield, which does not
    wait for the daemon's next tick. Foreign work is a second process on the GPU, or memory
    used beyond what was used before this worker made its context (``before``) and what it
    holds itself (``own``, bytes: its tensors and its context). Memory is read at every look
    (every _WATCH_SECONDS), the process list every _WATCH_PROCESSES_SECONDS: the list costs
    the driver more, and a job's context shows in the memory anyway. The two are asked
    apart: a process list that NVML refuses leaves the memory, and memory that NVML cannot
    read is read through CUDA (``cuda_used``, set once torch is there)."""

    def __init__(self, uuid: str, module=None, hide_processes: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if module is None:
            import pynvml as module

        module.nvmlInit()
        self.nv = module
        self.handle = module.nvmlDeviceGetHandleByUUID(uuid)
        self.hide_processes = hide_processes
        self.clock = clock
        self.cuda_used: Callable[[], int] | None = None
        self.calls = 0  # NVML queries made, for the benchmark
        # what is used that is not ours, taken again just before the context (``rebase``);
        # None while it cannot be read: NVML fails and there is no CUDA to ask yet
        self.before: int | None = None
        with contextlib.suppress(Exception):
            self.before = self.used()
        self.own = 0
        self.next_list = 0.0

    def used(self) -> int:
        self.calls += 1
        try:
            return int(self.nv.nvmlDeviceGetMemoryInfo(self.handle).used)
        except Exception:
            if self.cuda_used is None:
                raise
            return self.cuda_used()

    def rebase(self) -> None:
        """What is used now, before this worker's context exists, is not ours to explain."""
        self.before = self.used()

    def __call__(self) -> str:
        if not self.hide_processes and self.clock() >= self.next_list:
            self.next_list = self.clock() + _WATCH_PROCESSES_SECONDS
            self.calls += 1
            try:
                if len(self.nv.nvmlDeviceGetComputeRunningProcesses(self.handle)) > 1:
                    return "foreign-process"
            except Exception:  # noqa: BLE001 - the memory still tells
                pass
        try:
            used = self.used()
        except Exception:  # noqa: BLE001 - the daemon keeps watching too
            return ""
        if self.before is None:  # nothing to compare with yet: this is the baseline
            self.before = used
        elif used - self.before - self.own > KEEPALIVE_FOREIGN_MEMORY_MIB * MIB:
            return "foreign-memory"
        return ""


_report_fd: int | None = None  # a worker's own descriptor for its reports (else stdout's)


def report_on_own_descriptor() -> None:
    """In a worker process, before anything else runs: the reports keep the pipe to the
    daemon, on a descriptor of their own, and stdout becomes stderr (the daemon's log). A
    library that logs to stdout (cuBLASLt does, with CUBLASLT_LOG_LEVEL set) writes through a
    buffer of its own, which ends mid-line: in the same pipe its text would glue itself to
    the reports, and a ``ready`` lost so would have the worker killed as hung. A newline
    first ends what may have been written before."""
    global _report_fd
    try:
        fd = os.dup(1)
        os.dup2(2, 1)
        os.write(fd, b"\n")
    except OSError:
        return  # stdout stays the channel
    _report_fd = fd


def _report(line: str) -> None:
    """One line up to the daemon. It never blocks: when the daemon does not read (stalled on
    slow storage), the pipe fills and lines are dropped, rather than the duty cycle and the
    watch stopping. A line is short enough for the pipe to take whole or not at all."""
    data = (line[:2000] + "\n").encode(errors="replace")
    try:
        fd = sys.stdout.fileno() if _report_fd is None else _report_fd
        if os.get_blocking(fd):
            os.set_blocking(fd, False)
        os.write(fd, data)
    except (OSError, ValueError):
        pass  # full (dropped), or the daemon is gone: stdin's end of input will stop us


def _take_ballast(torch, memory_mib: int, headroom: float = KEEPALIVE_HEADROOM,
                  watch: _NvmlWatch | None = None, context: int = 0) -> tuple[list, int]:
    """Allocate up to ``memory_mib`` in all on the current GPU, a piece at a time. Before
    each piece, the live free memory is read: the ballast stops at free minus ``headroom``
    of the GPU, so a job that grows meanwhile is never pushed out of memory; and ``watch``
    (told what we hold, with our ``context``) raises ForeignWork when such a job appears."""
    chunks = []
    while True:
        reserved = torch.cuda.memory_reserved()
        want = memory_mib * MIB - reserved
        if want < _BALLAST_MIN_MIB * MIB:
            break
        if watch is not None:
            watch.own = reserved + context
            reason = watch()
            if reason:
                raise ForeignWork(reason)
        free, total = torch.cuda.mem_get_info()
        size = min(want, _BALLAST_CHUNK_MIB * MIB, int(free - headroom * total))
        if size < _BALLAST_MIN_MIB * MIB:
            _report(f"log WARNING only {reserved // MIB} MiB of {memory_mib} MiB taken: "
                    f"{free // MIB} MiB free, {headroom:.0%} of the GPU left free")
            break
        try:
            chunks.append(torch.empty(size, dtype=torch.uint8, device="cuda"))
        except torch.cuda.OutOfMemoryError:
            _report(f"log WARNING only {reserved // MIB} MiB of {memory_mib} MiB could be taken")
            break
    return chunks, torch.cuda.memory_reserved() // MIB


def setup_worker(torch, args: argparse.Namespace,
                 watch: _NvmlWatch | None) -> tuple[TorchTiles, list, int, int]:
    """Tiles, ballast, held MiB and context MiB of a worker on ``args.device``. The context
    is measured: memory used now, less what was used before (``watch.before``) and what
    torch holds. ForeignWork when somebody else's memory appeared meanwhile."""
    cuda = args.device.startswith("cuda")
    if cuda and args.mode == WorkerMode.FILL.value and args.memory_mib:
        # the filler stays within its share: beyond it an allocation fails in the filler,
        # not in the task beside it
        total = torch.cuda.mem_get_info()[1]
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_mib * MIB / total))
    element = 2 if cuda else 4
    if cuda and watch is not None:
        # The baseline is taken now, just before our context exists, not before torch was
        # imported: a job that started meanwhile (the import takes seconds) is no part of
        # our context, and what the daemon saw used at our start tells whether it came.
        def cuda_used() -> int:
            free, total = torch.cuda.mem_get_info()
            return int(total - free)

        watch.cuda_used = cuda_used
        watch.rebase()
        baseline = watch.before
        if args.used_before_mib and \
                baseline - args.used_before_mib * MIB > KEEPALIVE_FOREIGN_MEMORY_MIB * MIB:
            raise ForeignWork("foreign-memory")

    def make(n: int) -> TorchTiles:
        return TorchTiles(torch, n, args.device, blocking=not args.query_events)

    if args.tile:
        tiles = calibrate_tiles(make, args.tile_ms / 1000, n=args.tile, step=args.tile,
                                n_max=args.tile, element_size=element)
    else:
        tiles = calibrate_tiles(make, args.tile_ms / 1000, max_bytes=args.max_tile_mib * MIB,
                                element_size=element, n=4096 if cuda else 256,
                                step=1024 if cuda else 64, n_max=32768 if cuda else 4096)
    held = tiles.nbytes // MIB
    if not cuda:
        return tiles, [], held, 0
    if not args.no_graphs and \
            not tiles.use_graphs(range(1, KEEPALIVE_MAX_IN_FLIGHT + 1)):
        _report(f"log WARNING no CUDA graphs ({tiles.graph_error}): each tile is launched "
                "alone, which costs more CPU")
    torch.cuda.empty_cache()  # the sizes tried while calibrating
    context = _CONTEXT_MIB * MIB
    if watch is not None:
        measured = watch.used() - baseline - torch.cuda.memory_reserved()
        if measured > (_CONTEXT_MAX_MIB + KEEPALIVE_FOREIGN_MEMORY_MIB) * MIB:
            raise ForeignWork("foreign-memory")
        context = min(max(measured, 0), _CONTEXT_MAX_MIB * MIB)
        watch.own = torch.cuda.memory_reserved() + context
    ballast: list = []
    if args.mode == WorkerMode.HOLD.value:  # the filler holds its tiles only
        ballast, held = _take_ballast(torch, args.memory_mib, watch=watch, context=context)
        if watch is not None:
            watch.own = torch.cuda.memory_reserved() + context
    return tiles, ballast, held, context // MIB


def _worker_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="perpetual_motion.py --worker",
                                     description="Keep-alive worker of one GPU.")
    parser.add_argument("uuid", help="the GPU's UUID (also its CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--mode", choices=[m.value for m in WorkerMode], default="hold")
    parser.add_argument("--memory-mib", type=int, default=0, help="memory to hold in all")
    parser.add_argument("--duty", type=float, default=KEEPALIVE_START_DUTY)
    parser.add_argument("--period", type=float, default=KEEPALIVE_PERIOD)
    parser.add_argument("--tile", type=int, default=0, help="tile size; 0: calibrate")
    parser.add_argument("--tile-ms", type=float, default=KEEPALIVE_TILE_MS)
    parser.add_argument("--max-tile-mib", type=int, default=0)
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for the tests")
    parser.add_argument("--no-watch", action="store_true", help="leave foreign work to the daemon")
    parser.add_argument("--used-before-mib", type=int, default=0,
                        help="memory used on the GPU when the daemon started this worker")
    parser.add_argument("--hide-processes", action="store_true", help=argparse.SUPPRESS)
    # for bench/worker_cpu.py: tiles per timed group, no CUDA graphs, s between the looks,
    # events asked rather than waited on
    parser.add_argument("--group", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--no-graphs", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--watch-every", type=float, default=_WATCH_SECONDS,
                        help=argparse.SUPPRESS)
    parser.add_argument("--query-events", action="store_true", help=argparse.SUPPRESS)
    return parser


def _worker(argv: list[str]) -> int:
    args = _worker_parser().parse_args(argv)
    cuda = args.device.startswith("cuda")
    watch = None
    if cuda and args.mode == WorkerMode.HOLD.value and not args.no_watch:
        try:  # before torch: what is used before our context exists
            watch = _NvmlWatch(args.uuid, hide_processes=args.hide_processes)
        except Exception as exc:  # noqa: BLE001 - the daemon's check remains
            _report(f"log INFO no fast foreign-work check ({exc}); the daemon's remains")
    try:
        import torch
    except ImportError:
        _report("log ERROR torch is not installed")
        return EXIT_SETUP
    try:
        if cuda and not torch.cuda.is_available():
            _report("log ERROR CUDA is not available to the worker")
            return EXIT_SETUP
        if not cuda:
            torch.set_num_threads(1)
        tiles, ballast, held, context = setup_worker(torch, args, watch)
    except ForeignWork as exc:
        _report(f"exit reason={exc} t={time.time():.6f}")
        return EXIT_FOREIGN
    except Exception as exc:  # noqa: BLE001 - out of memory for the tiles, CUDA errors
        _report(f"log ERROR setup failed: {type(exc).__name__}: {exc}")
        return EXIT_SETUP
    _report(f"ready tile={tiles.n} tile_ms={(tiles.estimate or 0) * 1000:.2f} held_mib={held} "
            f"context_mib={context}")
    code = run_worker_loop(tiles, StdinControl(), duty=args.duty, report=_report,
                           period=args.period, watch=watch, group=args.group,
                           watch_every=args.watch_every)
    del ballast
    return code


def worker_main(argv: list[str], exit: Callable[[int], object] = os._exit) -> int:
    """Entry of ``perpetual_motion.py --worker ...`` (``argv`` without ``--worker``).
    It leaves through os._exit, so the CUDA context and the memory go at once."""
    try:
        code = _worker(argv)
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 2
    except BaseException as exc:  # noqa: BLE001 - reported, then the process ends
        _report(f"log ERROR worker failed: {type(exc).__name__}: {exc}")
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    exit(code)
    return code


# Keep-alive: the self-test ##################################################################
#
# ``perpetual_motion.py --self-test [--gpu I] [--seconds N] [--json]``: about a minute on one
# idle GPU of a real node, with the real engine and workers, as the daemon would run them. It
# reads what NVML offers here, holds the band and reads the share of NVML's samples in it, makes
# a probe of ours (a small torch job) come onto the held GPU, with the process list and without
# it, and times each yield, and measures the CPU. A table for people, JSON for scripts; exit 0
# when every target holds, 1 when one is missed, 2 when it cannot test here (no GPU, the GPU is
# busy). ``bench/run_on_gpu.sh`` runs it before its interference figures.

SELF_TEST_TARGETS = {  # figure: (target as text, check)
    "band_share": (">= 0.95", lambda v: v >= 0.95),
    "band_share_1s": (">= 0.95", lambda v: v >= 0.95),
    "yield_listed_s": ("<= 0.25", lambda v: v <= 0.25),
    "yield_hidden_s": ("<= 1.5", lambda v: v <= 1.5),
    "cpu_percent_of_core": ("<= 2", lambda v: v <= 2),
}
_SELF_TEST_HOLD_LIMIT = 120.0  # s a worker may take to hold the GPU (torch's import in a sandbox)
_SELF_TEST_PROBE_MIB = 1024  # MiB the probe takes beside its context
_SELF_TEST_PROBE_LIMIT = 90.0  # s a probe may take to import torch


class CannotTest(Exception):
    """The self-test cannot run here; the message says why."""


@dataclasses.dataclass
class SelfTestRig:
    """What the self-test acts through, so that it runs on a simulated node too: NVML, the
    worker spawner, ``probe(gpu)`` (a job of ours that comes onto the GPU: a handle with
    ``pid``, ``messages()``, ``send()``, ``stop()``, ``kill()``), ``hide(bool)`` (NVML's process
    list hidden from keep-alive, as for another container's job), the clock, the sleep, and
    ``cpu(pid)`` (CPU seconds of a process, None for this one; None where not measured)."""

    nvml: Any
    spawn: Callable[[GpuInfo, WorkerSpec], WorkerHandle]
    probe: Callable[[GpuInfo], Any]
    hide: Callable[[bool], object]
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], object] = time.sleep
    cpu: Callable[[int | None], float | None] = lambda pid: None


def real_rig() -> tuple[SelfTestRig, list[GpuInfo]]:
    """The rig of this node: NVML, real workers, probes that are this file's
    ``--self-test-probe``; CannotTest where there is no NVIDIA GPU to test."""
    try:
        nvml = Nvml.open(LOG)
        gpus = nvml.gpus()
    except NvmlUnavailable as exc:
        raise CannotTest(f"no NVIDIA GPU to test: {exc}") from exc
    if importlib.util.find_spec("torch") is None:
        raise CannotTest(f"torch is not installed in {sys.executable} (the workers need it)")
    daemons = running_daemons()
    if daemons:
        raise CannotTest(f"a daemon of Perpetual Motion runs on this node (pid "
                         f"{', '.join(map(str, daemons))}): it would start tasks and hold GPUs "
                         "meanwhile; stop it, or test another node")
    hidden = {"on": False}

    def spawn(gpu: GpuInfo, spec: WorkerSpec) -> WorkerHandle:
        return spawn_worker(gpu, spec, ["--hide-processes"] if hidden["on"] else [])

    def hide(on: bool) -> None:
        hidden["on"] = nvml.hide_processes = on

    def probe(gpu: GpuInfo) -> WorkerProcess:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu.uuid, CUDA_DEVICE_ORDER="PCI_BUS_ID")
        return WorkerProcess(worker_command([])[:2] + ["--self-test-probe", gpu.uuid], env)

    def cpu(pid: int | None) -> float | None:
        import psutil

        try:
            times = (psutil.Process(pid) if pid else psutil.Process()).cpu_times()
        except psutil.Error:
            return None
        return times.user + times.system

    return SelfTestRig(nvml, spawn, probe, hide, cpu=cpu), [g for g in gpus if not g.mig]


def running_daemons() -> list[int]:
    """PIDs of the daemons of Perpetual Motion that this process can see (by their name)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and \
                process_name(int(entry)) == DAEMON_PROCESS_NAME:
            found.append(int(entry))
    return sorted(found)


def self_test(rig: SelfTestRig, gpu: GpuInfo, seconds: float, log: logging.Logger) -> dict:
    """Run the self-test on ``gpu``; the report (``report["code"]``: the exit status)."""
    report: dict[str, Any] = {"gpu": gpu.name, "index": gpu.index, "seconds": seconds,
                              "figures": {}, "facts": {}}
    facts, figures = report["facts"], report["figures"]
    nvml = rig.nvml
    try:
        _self_test_idle(rig, gpu, facts)
        ka = GpuKeepAlive(nvml, [gpu], log, spawn=rig.spawn, timefunc=rig.clock,
                          delayfunc=rig.sleep, holdoff=2.0)
        ka.start()
        try:
            slot = ka.slots[0]
            _self_test_hold(rig, ka, slot)
            band = _self_test_band(rig, ka, slot, seconds)
            facts["readings_1s"] = band.pop("readings_1s")  # raw, for the record
            figures.update(band)
            facts["worker_context_mib"] = slot.worker.context_mib if slot.worker else None
            for hidden in (False, True):
                rig.hide(hidden)
                if hidden:  # a worker started with the list: a new one, which never looks
                    ka.release([0])
                    _self_test_until(rig, ka, lambda: ka.released([0]), 30.0, "released")
                    ka.task_finished([0])
                    slot.resume_at = None
                _self_test_hold(rig, ka, slot)
                figures.update(_self_test_yield(rig, ka, slot, gpu, hidden, facts))
            rig.hide(False)
        finally:
            ka.stop()
    except CannotTest as exc:
        report.update(code=EXIT_CANNOT_TEST, why=str(exc))
        return report
    report["targets"] = {name: {"value": figures.get(name), "target": target,
                                "met": None if figures.get(name) is None
                                else bool(check(figures[name]))}
                         for name, (target, check) in SELF_TEST_TARGETS.items()}
    missed = [n for n, t in report["targets"].items() if t["met"] is False]
    report.update(code=1 if missed else 0,
                  why=("missed: " + ", ".join(missed)) if missed else "every target holds")
    return report


def _self_test_idle(rig: SelfTestRig, gpu: GpuInfo, facts: dict) -> None:
    """The GPU must be idle, and what NVML offers on it is noted."""
    nvml = rig.nvml
    memory = nvml.memory(gpu)
    processes = nvml.compute_processes(gpu)
    if memory is None:
        raise CannotTest(f"NVML cannot read GPU {gpu.index}'s memory")
    if processes:
        raise CannotTest(f"GPU {gpu.index} is busy: {len(processes)} process(es) on it (a "
                         "daemon of ours, or somebody's job); test an idle GPU")
    if memory[0] > KEEPALIVE_IDLE_MEMORY_MIB * MIB:
        raise CannotTest(f"GPU {gpu.index} is busy: {memory[0] // MIB} MiB used")
    mode = nvml.compute_mode(gpu)
    facts["compute_mode"] = "unknown" if mode is None else COMPUTE_MODES.get(mode, str(mode))
    if mode not in (0, None) or (mode is None and not KEEPALIVE_ASSUME_DEFAULT_COMPUTE_MODE):
        raise CannotTest(f"GPU {gpu.index}'s compute mode is {facts['compute_mode']}: "
                         "keep-alive does not hold it")
    fresh, newest = 0, None
    nvml.util_samples(gpu)  # from now on
    for _ in range(6):
        rig.sleep(0.5)
        samples = nvml.util_samples(gpu)
        if samples:
            fresh += len(samples)
            newest = max(t for t, _ in samples)
    rate = nvml.util_rate(gpu)
    facts.update(
        samples_on_idle_per_s=fresh / 3.0,
        newest_sample_age_s=None if newest is None or rate is None
        else round((rate[0] - newest) / 1e6, 3),
        util_rate=None if rate is None else rate[1],
        per_process_util=nvml.process_util(gpu) is not None)
    if rate is not None and rate[1] >= _IDLE_UTIL_MAX:
        raise CannotTest(f"GPU {gpu.index} is busy: {rate[1]:.0f}% utilisation")


def _self_test_until(rig: SelfTestRig, ka: GpuKeepAlive, done: Callable[[], bool],
                     limit: float, what: str) -> float:
    began = rig.clock()
    while not done():
        if rig.clock() - began > limit:
            fields = ka.gpu_fields()
            raise CannotTest(f"keep-alive not {what} after {limit:.0f} s: "
                             f"{fields['gpu.0.state']} ({fields['gpu.0.reason']})")
        rig.sleep(0.05)
        ka.tick(rig.clock(), {})
    return rig.clock() - began


def _self_test_hold(rig: SelfTestRig, ka: GpuKeepAlive, slot: _Slot) -> None:
    _self_test_until(rig, ka, lambda: slot.state is GpuState.HOLDING, _SELF_TEST_HOLD_LIMIT,
                     "holding")


def _self_test_band(rig: SelfTestRig, ka: GpuKeepAlive, slot: _Slot, seconds: float) -> dict:
    """Held for ``seconds``: the share of NVML's samples in the band (the engine's own count)
    and of 1-s readings of NVML's rate; CPU of this process (the daemon's part) and the
    worker."""
    worker = slot.worker.handle.pid
    cpu0 = (rig.cpu(None), rig.cpu(worker), rig.clock())
    slot.meter = ShareMeter()
    readings, began = [], rig.clock()
    next_read = began + 1.0
    while rig.clock() - began < seconds:
        rig.sleep(min(POLL_INTERVAL, max(0.0, next_read - rig.clock())))
        ka.tick(rig.clock(), {})
        if rig.clock() >= next_read:
            rate = rig.nvml.util_rate(slot.gpu)
            if rate is not None:
                readings.append(rate[1])
            next_read += 1.0
        if slot.state is not GpuState.HOLDING:
            raise CannotTest(f"keep-alive let the GPU go while it was measured: {slot.reason}")
    wall = rig.clock() - cpu0[2]
    cpu1 = (rig.cpu(None), rig.cpu(worker))
    cpu = None if None in cpu0[:2] + cpu1 else \
        100 * ((cpu1[0] - cpu0[0]) + (cpu1[1] - cpu0[1])) / wall
    lo, hi = GPU_UTIL_TARGET, GPU_UTIL_HIGH
    return {"band_share": slot.meter.share(rig.clock(), seconds + _BAND_BUCKET, "band"),
            "band_share_1s": sum(lo <= r <= hi for r in readings) / len(readings)
            if readings else None,
            "band_mean_1s": sum(readings) / len(readings) if readings else None,
            "readings_1s": readings,
            "cpu_percent_of_core": cpu}


def _self_test_yield(rig: SelfTestRig, ka: GpuKeepAlive, slot: _Slot, gpu: GpuInfo,
                     hidden: bool, facts: dict) -> dict:
    """A probe comes onto the held GPU: from its context until our memory is back."""
    kind = "hidden" if hidden else "listed"
    probe = rig.probe(gpu)
    try:
        ready: list[bool] = []

        def probe_ready() -> bool:  # torch imported: what is timed is the GPU, not the import
            ready.extend(True for line in probe.messages() if line.startswith("ready"))
            return bool(ready)

        _self_test_until(rig, ka, probe_ready, _SELF_TEST_PROBE_LIMIT,
                         f"holding while the probe starts ({kind})")
        slot.last_yield = None  # this probe's yield, not the last one
        probe.send("go")
        context: dict[str, str] = {}

        def yielded() -> bool:
            for line in probe.messages():
                verb, fields = parse_message(line)
                if verb == "context":
                    context.update(fields)
            record = slot.last_yield
            return bool(context) and record is not None and record.done

        _self_test_until(rig, ka, yielded, 30.0, f"yielded to the probe ({kind})")
        record = slot.last_yield
        listed = None
        processes = rig.nvml.compute_processes(gpu)
        if processes is not None and not hidden:
            listed = int(context.get("pid", -1)) in {p.pid for p in processes}
        at = float(context["t"])
        back = None if record.memory_after is None else record.at + record.memory_after - at
        facts[f"probe_{kind}"] = {
            "context_mib": ascii_int(context.get("mib", "")),  # None: "-1", not known
            "threshold_mib": KEEPALIVE_FOREIGN_MEMORY_MIB, "listed": listed,
            "yield": record.text(),
            # below nothing: our memory was back before the probe's context was made
            "memory_back_after_context_s": None if back is None else round(back, 3)}
        return {f"yield_{kind}_s": None if back is None else round(max(0.0, back), 3)}
    finally:
        probe.stop()
        began = rig.clock()
        while probe.exit_code() is None and rig.clock() - began < 5.0:
            rig.sleep(0.05)
        probe.kill()


def self_test_probe(uuid: str) -> int:
    """``--self-test-probe UUID``: import torch, say ``ready``; at ``go`` make a context and
    say ``context pid= t= mib=`` (the monotonic clock, shared by the processes of a node; the
    memory NVML shows it took), take _SELF_TEST_PROBE_MIB and run matmuls until ``stop``."""
    import torch

    control = StdinControl()
    _report("ready")
    while True:
        commands = control.poll(1.0)
        if "go" in commands:
            break
        if any(c in ("stop", "eof") for c in commands):
            return 0
    before = None
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        before = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:  # noqa: BLE001 - the context's size is then not known
        handle = None
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    at = time.monotonic()
    _report(f"context pid={os.getpid()} t={at:.6f} mib={_probe_context_mib(handle, before)}")
    job = None
    a = torch.randn(1024, 1024, device="cuda", dtype=torch.float16)
    while not any(c in ("stop", "eof") for c in control.poll(0)):
        if job is None:
            try:
                job = torch.empty(_SELF_TEST_PROBE_MIB * MIB, dtype=torch.uint8, device="cuda")
            except torch.cuda.OutOfMemoryError:
                pass
        torch.mm(a, a)
        torch.cuda.synchronize()
    return 0


def _probe_context_mib(handle, before: int | None) -> int:
    """The probe's context in MiB: its own entry in NVML's process list, else the growth of
    used memory since ``before`` when that is not spoilt (keep-alive leaves meanwhile and
    frees far more); -1 when not known."""
    if handle is None:
        return -1
    import pynvml

    with contextlib.suppress(Exception):
        for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if process.pid == os.getpid() and isinstance(process.usedGpuMemory, int):
                return process.usedGpuMemory // MIB
    with contextlib.suppress(Exception):
        grown = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used) - (before or 0)
        if before is not None and grown >= 0:
            return grown // MIB
    return -1


def self_test_table(report: dict) -> str:
    """The report for people."""
    lines = [f"Self-test of GPU {report['index']} ({report['gpu']}):"]
    for key, value in report["facts"].items():
        lines.append(f"  {key:<24} {value}")
    for name, target in (report.get("targets") or {}).items():
        value = target["value"]
        shown = "not measured" if value is None else f"{value:.3f}".rstrip("0").rstrip(".")
        verdict = {True: "ok", False: "MISSED", None: "-"}[target["met"]]
        lines.append(f"  {name:<24} {shown:<14} target {target['target']:<8} {verdict}")
    lines.append(f"Result: {report['why']}")
    return "\n".join(lines)


def self_test_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="perpetual_motion.py --self-test",
                                     description="Check keep-alive on this node's GPU.")
    parser.add_argument("--gpu", type=int, default=0, help="position among the usable GPUs")
    parser.add_argument("--seconds", type=float, default=30.0, help="s the band is measured")
    parser.add_argument("--json", action="store_true", help="the report as JSON")
    args = parser.parse_args(argv)
    log = logging.getLogger("perpetual_motion.self_test")
    try:
        rig, gpus = real_rig()
        if not 0 <= args.gpu < len(gpus):
            raise CannotTest(f"no usable GPU {args.gpu} here ({len(gpus)} usable)")
    except CannotTest as exc:
        report = {"code": EXIT_CANNOT_TEST, "why": str(exc)}
        print(json.dumps(report) if args.json else f"self-test: cannot test here: {exc}")
        return EXIT_CANNOT_TEST
    report = self_test(rig, gpus[args.gpu], args.seconds, log)
    if args.json:
        print(json.dumps(report, default=str))
    elif report["code"] == EXIT_CANNOT_TEST:
        print(f"self-test: cannot test here: {report['why']}")
    else:
        print(self_test_table(report))
    return report["code"]


# Node claim and commands ####################################################################


class NodeClaim:
    """Which daemon holds a node of an instance: the one whose claim (its ``started``, host and
    pid) is in the node's state file (docs/protocol.md, "One daemon per node")."""

    def __init__(self, config: Config, folder: QueueFolder, identity: Identity,
                 started_text: str, clock: Callable[[], float],
                 sleep: Callable[[float], None], throttled: ThrottledLog):
        self.folder = folder
        self.identity = identity
        self.started_text = started_text
        self.clock = clock
        self.sleep = sleep
        self.throttled = throttled
        self.path = folder.state_path(config.node_rank)

    def read(self) -> dict[str, str] | None:
        try:
            return self.folder.read_fields(self.path)
        except (OSError, ValueError) as exc:
            self.throttled.warning("readstate", "ignoring the unreadable state file %s: %s",
                                   self.path, exc)
            return None

    def is_mine(self, fields: Mapping[str, str]) -> bool:
        """True when a state file was written by this very daemon."""
        return (fields.get("started"), fields.get("host"), fields.get("pid")) == \
            (self.started_text, self.identity.host, str(self.identity.pid))

    def other_holder(self) -> dict[str, str] | None:
        """The state file's fields when another daemon's claim is in it (one read), else None."""
        fields = self.read()
        if not fields or "started" not in fields or self.is_mine(fields):
            return None
        return fields

    def live_owner(self, interrupted: Callable[[], bool] = lambda: False) -> str | None:
        """A description of the live daemon that holds this instance and node, or None.

        On this host, boot and PID namespace the owner's pid is checked. Elsewhere its
        heartbeat is watched for TAKEOVER_WATCH_SECONDS: only a heartbeat that advances proves
        a live owner, and only one older than any difference of hosts' clocks
        (CLOCK_SKEW_LIMIT_SECONDS) proves a dead one without the watch: a clock five minutes
        ahead of the owner's sees its fresh heartbeat five minutes old."""
        fields = self.read()
        if not fields or fields.get("status") == "stopped" or self.is_mine(fields):
            return None
        who = f"pid {fields.get('pid', '?')} on {fields.get('host', '?')}"
        if self.identity.same_machine_view(fields):
            pid = ascii_int(fields.get("pid"))
            return who if pid is not None and pid_is_owner(
                pid, as_float(fields.get("started"))) else None
        first = as_float(fields.get("heartbeat"))
        if first is None or \
                self.clock() - first >= HEARTBEAT_STALE_SECONDS + CLOCK_SKEW_LIMIT_SECONDS:
            return None
        LOG.info("The state file names a daemon elsewhere (%s): watching its heartbeat for "
                 "%.0f s", who, TAKEOVER_WATCH_SECONDS)
        deadline = self.clock() + TAKEOVER_WATCH_SECONDS
        while self.clock() < deadline:
            self.sleep(min(1.0, max(deadline - self.clock(), MIN_WAIT_SECONDS)))
            if interrupted():
                return f"{who} (start interrupted by a signal)"
            now_fields = self.read() or {}
            if now_fields.get("started") != fields.get("started"):
                return f"{who}, replaced meanwhile" if now_fields.get("status") != "stopped" \
                    else None
            if now_fields.get("status") == "stopped":
                return None
            if now_fields.get("heartbeat") != fields.get("heartbeat"):
                return f"{who}, whose heartbeat advances"
        LOG.warning("The daemon named in the state file (%s) has not written its heartbeat for "
                    "%.0f s: it is gone; this daemon takes the node over", who,
                    TAKEOVER_WATCH_SECONDS)
        return None


class SelfFence:
    """A daemon that cannot keep its node's liveness current ends its own tasks before other
    nodes may declare it dead (docs/protocol.md, Fencing): once its beat has not been written
    for SELF_FENCE_SECONDS of its monotonic clock, every task's process group and every
    process with a task's marker get SIGKILL (a group only while its number is still the task's:
    signal_task_group). ``check()`` runs on each turn of the loop and,
    in a running daemon, on a thread of its own too: a loop stuck in a write to hung storage
    cannot fence, the thread can (it only reads /proc and sends signals)."""

    def __init__(self, monotonic: Callable[[], float], limit: float = SELF_FENCE_SECONDS):
        self.monotonic = monotonic
        self.limit = limit
        self.last_beat = monotonic()
        # the running tasks' process groups: (pgid, the start time of its leader, the task's
        # main process), so that a number that went to another process is not killed
        self.groups: frozenset[tuple[int, int]] = frozenset()
        self.markers: frozenset[str] = frozenset()  # and their markers (<job>/<id>)
        self.fenced_at: float | None = None  # when it last fenced (None: beating)
        self.killed: set[int] = set()  # the process groups it killed, until the loop saw them
        self.stop = threading.Event()

    def beat(self) -> None:
        self.last_beat = self.monotonic()
        self.fenced_at = None

    def lapsed(self) -> float:
        """Seconds since the last beat that was written."""
        return self.monotonic() - self.last_beat

    def check(self) -> bool:
        """Fence when the beat is late (again after each further limit); True when it did."""
        if self.lapsed() < self.limit or not (self.groups or self.markers):
            return False
        if self.fenced_at is not None and self.monotonic() - self.fenced_at < 1.0:
            return False
        self.fenced_at = self.monotonic()
        for pgid, leader_start in self.groups:
            self.killed.add(pgid)
            signal_task_group(pgid, leader_start, signal.SIGKILL)
        for marker in self.markers:
            for pid in marked_pids(marker):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        return True

    def watch(self) -> threading.Thread:
        def loop() -> None:
            late = False  # late at the last look too: the loop is stuck, not just resumed
            while not self.stop.wait(1.0):
                try:
                    was_late, late = late, self.lapsed() >= self.limit
                    if was_late and late and self.check():
                        LOG.error("No heartbeat written for %.0f s: this node's tasks were "
                                  "killed before other nodes may take it for dead",
                                  self.lapsed())
                except Exception:  # noqa: BLE001 - the watch must outlive one bad look
                    LOG.exception("the self-fencing watch failed once")
        thread = threading.Thread(target=loop, name="self-fence", daemon=True)
        thread.start()
        return thread


class FenceKeeper:
    """The self-fence in a process of its own (``--fence-keeper``), so that it fences a daemon
    that cannot: one suspended (SIGSTOP, a debugger, Ctrl-Z) or gone without ending its tasks
    (kill -9). The daemon tells it, one line each on a pipe, each beat it wrote (``beat``) and
    its tasks whenever they change (``tasks <pgid>:<start>,... <marker> ...``, ``<start>`` the
    start time of the group's leader, the task's main process); the keeper runs a
    SelfFence on its own clock with them. The daemon's end (the pipe's) leaves it watching the
    last tasks it was told of until they are fenced, or none are left. Lines that the pipe
    cannot take at once are dropped: the daemon never waits for its keeper."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.told = ""  # the last tasks line sent
        self.unsent = b""  # what the pipe did not take yet (a long line goes in pieces)
        self.mid_line = False  # the pipe has part of a line, whose rest begins ``unsent``

    @classmethod
    def spawn(cls) -> FenceKeeper | None:
        """Start the keeper; None (and a warning) when it cannot be."""
        env = {k: v for k, v in os.environ.items() if k != MARKER_VAR}
        env["PERPETUAL_MOTION_WORKER"] = "fence-keeper"  # ours, before it has named itself
        try:
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--fence-keeper"],
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env,
                                    start_new_session=True, close_fds=True)
        except OSError as exc:
            LOG.warning("cannot start the fence keeper (%s): a suspended daemon's tasks are "
                        "not fenced", exc)
            return None
        assert proc.stdin is not None
        os.set_blocking(proc.stdin.fileno(), False)
        return cls(proc)

    def tell(self, beat: bool, groups: Collection[tuple[int, int]],
             markers: Collection[str]) -> bool:
        """Send a beat and the tasks (when they changed); False once the keeper is gone."""
        line = (f"tasks {','.join(f'{pgid}:{start}' for pgid, start in sorted(groups)) or '-'}"
                f" {' '.join(sorted(markers))}")
        if line != self.told:
            self.told = line
            self.unsent += f"{line}\n".encode()
        if beat:
            self.unsent += b"beat\n"
        if len(self.unsent) > 1 << 16:  # it reads nothing (itself suspended?): the tasks
            # count, and beats to come; the rest of a line begun is sent first, whole
            rest = self.unsent.partition(b"\n")[0] + b"\n" if self.mid_line else b""
            self.unsent = rest + f"{line}\n".encode()
        assert self.proc.stdin is not None
        try:
            while self.unsent:
                sent = os.write(self.proc.stdin.fileno(), self.unsent)
                self.mid_line = not self.unsent[:sent].endswith(b"\n")
                self.unsent = self.unsent[sent:]
        except BlockingIOError:
            pass  # the rest at the next call
        except OSError:
            return False
        return self.proc.poll() is None

    def close(self) -> None:
        """The daemon ends: told no task is left, the keeper ends."""
        self.tell(False, (), ())
        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # type: ignore[union-attr]
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5.0)


def _told_group(text: str) -> tuple[int, int]:
    """``<pgid>:<start>`` of a keeper's tasks line; a start that is missing or no number is
    unknown (-1): that group is then killed only once no process holds its number."""
    pgid, _, start = text.partition(":")
    try:
        return int(pgid), int(start)
    except ValueError:
        return int(pgid), -1


def fence_keeper_main(control: StdinControl | None = None, fence: SelfFence | None = None,
                      sleep: Callable[[float], object] = time.sleep) -> int:
    """The keeper's loop (FenceKeeper): a look each second; it ends when the daemon has ended
    and no task of it is left to fence."""
    control = control or StdinControl()
    fence = fence or SelfFence(time.monotonic)
    ended = told = False
    while True:
        for line in [] if ended else control.poll(1.0):
            verb, _, rest = line.partition(" ")
            if verb == "beat":
                fence.beat()
                told = False
            elif verb == "tasks":
                groups, _, markers = rest.partition(" ")
                fence.groups = frozenset(_told_group(g) for g in groups.split(",")
                                         if g.partition(":")[0].isdigit())
                fence.markers = frozenset(markers.split())
            elif verb == "eof":
                ended = True
        if not (fence.groups or fence.markers) and ended:
            return 0
        if fence.check():  # again each second by the markers (their proof) while late
            fence.groups = frozenset()  # once: a process group's number may be reused
            if not told:
                told = True
                LOG.error("No heartbeat for %.0f s (the daemon %s): its tasks were killed "
                          "before other nodes may take the node for dead", fence.lapsed(),
                          "has ended" if ended else "is suspended or stuck")
            if ended:
                return 0
        if ended:
            sleep(1.0)


class Commands:
    """The commands clients publish in commands/, handled by node 0 (docs/protocol.md,
    "Commands"): each carried out once, answered in replies/."""

    def __init__(self, config: Config, folder: QueueFolder, runner: TaskRunner, gangs: Gangs,
                 clock: Callable[[], float], throttled: ThrottledLog, started: float,
                 shutdown: Callable[[str], None], changed: Callable[[], None],
                 sweep: Callable[[], None]):
        self.config = config
        self.folder = folder
        self.runner = runner
        self.gangs = gangs
        self.clock = clock
        self.throttled = throttled
        self.started = started
        self.started_text = f"{started:.3f}"
        self.shutdown = shutdown  # begins the daemon's shutdown, with the reason
        self.changed = changed  # the state file should say so at once
        self.sweep = sweep  # end the other Python processes (a stop_all with nothing running)
        self.answers: dict[str, dict[str, object]] = {}  # replies not yet published

    def handle(self) -> None:
        for name in self.folder.files("commands"):
            if not name.endswith(".cmd"):
                continue
            if len(os.fsencode(name)) - len(".cmd") + len(".reply") > NAME_MAX:
                # it could never be answered, so it would be carried out again at each start
                self.folder.skip("commands", name, "a name too long for its reply")
                continue
            path = self.folder.dir("commands") / name
            reply = self.answers.get(name)
            if reply is None:  # a command is carried out once, even if answering it fails
                try:
                    fields = self.folder.read_fields(path)
                    if fields is None or self.for_new_owner(fields):
                        continue
                    reply = self.execute(fields)
                except (OSError, ValueError, UnicodeError) as exc:
                    self.throttled.warning(f"cmd:{name}", "bad command file %s: %s", name, exc)
                    reply = {"action": "", "task": "", "result": "error",
                             "message": f"unreadable command: {exc}"}
                reply["handled"] = f"{self.clock():.3f}"
                self.answers[name] = reply
            try:
                self.folder.publish(self.folder.dir("replies") / f"{name[:-4]}.reply",
                                    format_fields(reply))
            except OSError as exc:
                # (replies/ or .staging/ missing: made again, and the answer kept for the next
                # poll; the command is not carried out twice)
                made = self.folder.ensure() if isinstance(exc, FileNotFoundError) else []
                self.throttled.warning(f"reply:{name}", "cannot answer command %s: %s%s", name,
                                       exc, f"; created again: {', '.join(made)}" if made else "")
                continue
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass  # the client withdrew it meanwhile; the reply tells it what happened
            except OSError as exc:
                self.throttled.warning(f"reply:{name}", "cannot answer command %s: %s", name,
                                       exc)
                continue
            del self.answers[name]

    def for_new_owner(self, fields: dict[str, str]) -> bool:
        """True for a command meant for the daemon whose claim is now in node 0's state file:
        one that took the node over, which this daemon has not seen yet (it yields at its next
        look). That daemon carries it out; this one leaves it where it is."""
        addressed = fields.get("daemon_started", "")
        if not addressed or addressed == self.started_text:
            return False
        try:
            state = self.folder.read_fields(self.folder.state_path(self.config.node_rank))
        except (OSError, ValueError):
            return False
        return bool(state) and state.get("started") == addressed

    def execute(self, fields: dict[str, str]) -> dict[str, object]:
        action, task_id = fields.get("action", ""), fields.get("task", "")
        reply: dict[str, object] = {"action": action, "task": task_id}
        addressed = fields.get("daemon_started", "")
        sent = as_float(fields.get("sent"))
        if fields.get("sent") and sent is None:
            raise ValueError(f"sent is not a time: {fields['sent'][:40]!r}")
        if (addressed and addressed != self.started_text) or (
                not addressed and sent is not None
                and sent < self.started - COMMAND_CLOCK_SKEW_SECONDS):
            # Meant for an earlier daemon: a stale shutdown must not end this one.
            reply.update(result="error", message="meant for an earlier daemon; ignored")
            return reply
        who = fields.get("sent_by") or "a client"
        if action == "stop":
            if not task_id or "/" in task_id or task_id.startswith("."):
                raise ValueError("stop without a task")
            if self.runner.cancel_pending(task_id):
                reply.update(result="cancelled", message="removed from pending")
            elif task_id in set(self.folder.names("running")):
                where = self.stop_running(task_id, "stopped by user", who)
                grace = f"SIGKILL after {self.config.stop_grace:g} s"
                reply.update(result="stopped", message=f"SIGTERM sent, {grace}" if not where
                             else f"stop sent to {where}: SIGTERM, {grace}")
            else:
                reply.update(result="not_found", message="neither pending nor running")
        elif action == "stop_all":
            cancelled = sum(bool(self.runner.cancel_pending(n))
                            for n in self.folder.files("pending"))
            stopped = []
            for task in self.folder.names("running"):
                try:  # (an entry whose name is too long for a record stops no other task)
                    if self.folder.has_result(task):
                        continue
                    self.stop_running(task, "stopped by user (all)", who)
                except OSError as exc:
                    self.throttled.warning(f"stop:{task}", "cannot stop %s: %s", task, exc)
                    continue
                stopped.append(task)
            if not stopped:
                self.sweep()
            reply.update(result="ok", cancelled_count=cancelled, stopped_count=len(stopped),
                         stopped=" ".join(stopped),
                         message=f"{cancelled} cancelled, {len(stopped) or 'none'} stopped")
        elif action == "shutdown":
            self.shutdown(f"shutdown asked by {who}")
            reply.update(result="accepted", message="the daemon is shutting down")
        else:
            raise ValueError(f"unknown action {action!r}")
        return reply

    def stop_running(self, task_id: str, reason: str, who: str) -> str:
        """Stop a task in running/ wherever it runs; where, for the reply ("" for here)."""
        self.folder.publish_stop(task_id, reason, who, self.clock())
        here = False
        for task in list(self.runner.tasks.values()):
            if task.task_id == task_id and task.stop_state is None:
                self.runner.stop(task, TaskState.STOPPED, reason)
                task.sweep = here = True
        self.changed()
        plan = self.gangs.plans.get(task_id)
        if plan is not None:
            return f"nodes {','.join(str(n) for n in plan.nodes)}"
        if here:
            return ""
        try:
            run = self.folder.read_fields(self.folder.record(task_id, "run")) or {}
        except (OSError, ValueError):
            run = {}
        return f"node {run.get('node_rank') or '?'}"


# Daemon loop ################################################################################


def node_from_environment(env: Mapping[str, str]) -> tuple[int, int]:
    """(node rank, node count) from the variables that SCO ACP, torchrun or Slurm set;
    ValueError when the first one that is set is not a number (``RANK=²``)."""
    for rank_var, count_var in (("SENSECORE_PYTORCH_NODE_RANK", "SENSECORE_PYTORCH_NNODES"),
                                ("RANK", "WORLD_SIZE"), ("SLURM_NODEID", "SLURM_NNODES")):
        rank_text, count_text = env.get(rank_var, ""), env.get(count_var, "")
        if not rank_text:
            continue
        rank, count = ascii_int(rank_text), ascii_int(count_text) if count_text else 1
        for name, text, value in ((rank_var, rank_text, rank), (count_var, count_text, count)):
            if value is None:
                raise ValueError(f"{name}={text[:40]!r} in the environment is not a whole "
                                 "number (ASCII digits); give --node-rank and --num-nodes")
        return rank, count if count > 0 else 1
    return 0, 1


def in_cluster_job(env: Mapping[str, str]) -> bool:
    """True inside a Slurm or SCO ACP job (or one that submit.sh launched for them)."""
    return bool(env.get("SLURM_JOB_ID") or env.get("ECP_JOB_NAME")
                or env.get("SENSECORE_PYTORCH_NNODES") or env.get("PM_CLUSTER_JOB"))


def resolve_kill_scope(scope: str, env: Mapping[str, str]) -> str:
    """``auto``: the seed's sweep of the user's Python processes on a cluster node, only the
    task's own processes elsewhere (a workstation's notebooks and editors are not ours)."""
    if scope != "auto":
        return scope
    return "user-python" if in_cluster_job(env) else "task"


class DirWatch:
    """inotify on the folders the daemon polls, where the kernel offers it: a new file wakes
    the loop at once. It sees only this host's changes; the poll stays for shared storage."""

    _IN_CREATE, _IN_MOVED_TO, _IN_NONBLOCK, _IN_CLOEXEC = 0x100, 0x80, 0o4000, 0o2000000

    def __init__(self) -> None:
        self.fd: int | None = None
        self._libc = _libc()
        if self._libc is None or os.environ.get(NO_INOTIFY_VAR):
            return  # (the variable: as on shared storage written from other hosts, for benches)
        try:
            fd = self._libc.inotify_init1(self._IN_NONBLOCK | self._IN_CLOEXEC)
        except AttributeError:
            return
        self.fd = fd if fd >= 0 else None

    def watch(self, folders: Iterable[Path]) -> None:
        if self.fd is None:
            return
        for folder in folders:
            self._libc.inotify_add_watch(self.fd, os.fsencode(folder),
                                         self._IN_CREATE | self._IN_MOVED_TO)

    def drain(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                while os.read(self.fd, 65536):
                    pass


class SignalWaiter:
    """Sleeps until a timeout, a signal, a child's exit or a new file in a watched folder,
    whichever comes first.

    Signal handlers only record what arrived; the loop acts on it.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self.read_fd, write_fd = os.pipe()
        for fd in (self.read_fd, write_fd):
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        signal.set_wakeup_fd(write_fd)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._record)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.dirs = DirWatch()

    def _record(self, signum: int, frame: object) -> None:
        self.received.append(signum)

    def sleep(self, seconds: float) -> None:
        fds = [self.read_fd] + ([self.dirs.fd] if self.dirs.fd is not None else [])
        try:
            select.select(fds, [], [], max(seconds, 0.0))
            os.read(self.read_fd, 4096)
        except (BlockingIOError, InterruptedError):
            pass
        self.dirs.drain()


class DaemonState:
    """The part of the Daemon that publishes this node's state file and beat (docs/protocol.md:
    it is their one writer) and keeps the queue folder tidy. Its attributes are the Daemon's."""

    # -- state -----------------------------------------------------------------------------

    def write_state(self, stopped: bool = False, force: bool = False) -> None:
        """Publish this node's state file, while this daemon owns it (docs/protocol.md)."""
        if self.displaced or (not force and not stopped and not self.owns_node()):
            return
        now = self.clock()
        tasks = sorted(self.runner.tasks.values(), key=lambda t: (t.task_id, t.rank or 0))
        status = "stopped" if stopped else "stopping" if self.stopping else \
            "draining" if self.draining else "running"
        load = self.scheduler.load()
        waiting = self.scheduler.waiting
        first = tasks[0] if tasks else None
        fields: dict[str, object] = {
            "protocol": PROTOCOL_VERSION, "job_id": self.config.job_id,
            "node_rank": self.config.node_rank, "num_nodes": self.config.num_nodes,
            "host": self.identity.host, "pid": self.identity.pid,
            "boot_id": self.identity.boot_id, "pid_ns": self.identity.pid_ns,
            "node_addr": self.gangs.node_addr,
            "status": status, "started": self.started_text, "launch": self.config.launch,
            "started_at": now_text(self.started), "shutdown": f"{self.shutdown_at:.3f}",
            "shutdown_at": now_text(self.shutdown_at), "heartbeat": f"{now:.3f}",
            "liveness.late_after": f"{HEARTBEAT_LATE_SECONDS:g}",
            "liveness.stale_after": f"{HEARTBEAT_STALE_SECONDS:g}",
            "poll_interval": f"{self.config.poll_interval:g}", "kill_scope": self.config.kill_scope,
            "keepalive": self.keepalive.describe(), "risk": self.keepalive.node_risk,
            "running_count": len(tasks),
            "current_task": first.task_id if first else "",
            "current_task_started": f"{first.started:.3f}" if first and first.started else "",
            "waiting.id": waiting[0] if waiting else "",
            "waiting.reason": waiting[1] if waiting else "",
            "cpu_slots": MAX_CPU_TASKS, "cpu_running": load.cpu_running,
            "gpus_free": len(load.free), "gpu_count": len(self.inventory.gpus),
            "refused": self.unsafe or "",
        }
        skipped = self.folder.skipped_entries()[:MAX_SKIPPED_SHOWN]
        fields["skipped_count"] = len(skipped)
        fields.update({f"skipped.{k}": entry for k, entry in enumerate(skipped)})
        for k, task in enumerate(tasks):
            fields.update({f"running.{k}.id": task.task_id, f"running.{k}.gpus": task.gpu_text,
                           f"running.{k}.started": f"{task.started:.3f}" if task.started else "",
                           f"running.{k}.pid": task.proc.pid if task.proc else "",
                           f"running.{k}.rank": "" if task.rank is None else task.rank})
        busy = self.busy_gpus()
        reserved = self.gangs.reservations()
        for i, gpu in enumerate(self.inventory.gpus):
            fields.update({f"gpu.{i}.index": gpu.number, f"gpu.{i}.name": gpu.name,
                           f"gpu.{i}.uuid": gpu.uuid, f"gpu.{i}.task": busy.get(i, ""),
                           f"gpu.{i}.reserved": "" if i in busy else reserved.get(i, ""),
                           f"gpu.{i}.state": "off",
                           f"gpu.{i}.reason": self.keepalive.why})
        try:
            fields.update(self.keepalive.gpu_fields())
        except Exception:  # noqa: BLE001 - a GPU query must not stop the heartbeat
            self.throttled.warning("gpufields", "cannot read the GPU state", exc_info=True)
        if stopped:
            fields.update(stopped=f"{now:.3f}", stopped_at=now_text(now),
                          stop_reason=self.stopping or self.draining)
        beat = self.write_beat()
        try:
            # the owner is read again once the file is written: a write that hung on stalled
            # storage may come back after another daemon took the node over meanwhile
            if self.folder.publish(self.claim.path, format_fields(fields), durable=False,
                                   still=lambda: force or self.claim.other_holder() is None):
                self.last_state_write = now
                self.state_dirty = False
                if not beat:  # (a folder where the beat file belongs): the state file is
                    self.fence.beat()  # a pulse too, so the storage is not hung
                    self.tell_keeper(beat=True)
            else:
                self.owns_node()  # (it yields)
        except OSError as exc:
            hint = " (an expired AFS token? renew it with aklog/krenew)" \
                if exc.errno == errno.EACCES else ""
            if self.folder.ensure():
                LOG.warning("queue folders were missing: created again")
            self.throttled.warning("state", "cannot write the heartbeat: %s%s", exc, hint)

    def write_beat(self) -> bool:
        """The node's beat: a count that advances, rewritten in place (docs/protocol.md);
        whether it was written."""
        self.beats += 1
        try:
            self.folder.write_beat(self.config.node_rank, format_fields(
                {"started": self.started_text, "beat": self.beats,
                 "time": f"{self.clock():.3f}"}))
        except OSError as exc:
            self.throttled.warning("beat", "cannot write the heartbeat (beat file): %s", exc)
            return False
        self.fence.beat()
        self.tell_keeper(beat=True)
        return True

    def tell_keeper(self, beat: bool) -> None:
        """Tell the fence keeper of a beat and of the tasks; start it again (once a minute at
        most) when it has ended."""
        if self.keeper is None or self.keeper.tell(beat, self.fence.groups, self.fence.markers):
            return
        now = self.clock()
        if now - self.keeper_started >= 60.0:
            self.keeper_started = now
            LOG.warning("The fence keeper ended (exit status %s): starting it again",
                        self.keeper.proc.poll())
            self.keeper = FenceKeeper.spawn() or self.keeper

    def housekeeping(self) -> None:
        now = self.clock()
        self.last_housekeeping = now
        made = self.folder.ensure()
        if made:
            LOG.warning("queue folders were missing: created again: %s", ", ".join(made))
        if self.folder.unsafe():  # a refused folder: nothing is removed from it either
            return
        self.folder.remove_old(".staging", now, STAGING_MAX_AGE_SECONDS)
        self.folder.remove_old("replies", now, STAGING_MAX_AGE_SECONDS)
        if self.is_leader and KEEP_FINISHED_DAYS and now - self.last_cleaning >= 86400:
            self.last_cleaning = now
            removed = self.folder.remove_finished(now - KEEP_FINISHED_DAYS * 86400)
            if removed:
                LOG.info("Removed %d finished task(s) older than %d days (KEEP_FINISHED_DAYS)",
                         len(removed), KEEP_FINISHED_DAYS)


class DaemonLifecycle(DaemonState):
    """The part of the Daemon that starts it (the folder checked, the node claimed, what
    predecessors left ended), yields the node to a daemon that took it over, and shuts it
    down (a signal, an auto-shutdown, node 0 stopping). Its attributes are the Daemon's."""

    # -- start-up --------------------------------------------------------------------------

    def start(self) -> int | None:
        """Prepare the instance; an exit code when the daemon must not run."""
        foreign = foreign_proc()
        if foreign:
            LOG.error("refusing to run: %s. Which processes are a task's is read there: mount "
                      "this PID namespace's own /proc (unshare --mount-proc; a container has "
                      "its own)", foreign)
            return EXIT_FAILURE
        for step in ("check", "create", "check"):  # (before anything is written into it)
            try:
                self.unsafe = self.folder.unsafe()
                if self.unsafe:
                    LOG.error("refusing the queue folder: %s", self.unsafe)
                    return EXIT_FAILURE
                if step == "create":
                    self.folder.create(self.config.job_id)
            except OSError as exc:
                LOG.error("cannot write to the queue folder %s: %s", self.folder.root, exc)
                return EXIT_FAILURE
        owner = None if self.config.force else self.claim.live_owner(
            lambda: self.waiter is not None and bool(self.waiter.received))
        if owner:
            LOG.error("a daemon for %s (node %d) is already running: %s. Stop it with "
                      "gpu_shutdown, or start with --force if it is really gone.",
                      self.config.job_id, self.config.node_rank, owner)
            return EXIT_ALREADY_RUNNING
        self.runner.ends.remember_predecessor()  # (before this daemon's beat replaces it)
        self.write_state(force=True)
        self.end_predecessors()
        self.runner.recover(lambda run: ascii_int(run.get("node_rank")) not in
                            (self.config.node_rank, None))
        self.housekeeping()
        LOG.info("Started at: %s", now_text(self.started))
        LOG.info("Auto-shutdown at: %s (%sh)", now_text(self.shutdown_at),
                 f"{self.config.hours:g}")
        self.keepalive.start()
        if self.keepalive.describe() == "on" or not self.config.keepalive:
            LOG.info("Keep-alive: %s", self.keepalive.describe())  # else it has warned why
        gpus = self.inventory.all_numbers() or "none"
        LOG.info("GPUs for tasks: %s; CPU task slots: %d; kill scope after a stop: %s",
                 gpus, MAX_CPU_TASKS, self.config.kill_scope)
        if self.config.callback:
            LOG.info("After each task: %s", self.config.callback)
        LOG.info("Queue: %s (node %d of %d)", self.folder.root, self.config.node_rank,
                 self.config.num_nodes)
        if getattr(self.waiter, "dirs", None) is not None:
            self.waiter.dirs.watch([self.folder.dir("pending"), self.folder.dir("commands")])
        self.write_state()
        return None

    def end_predecessors(self) -> None:
        """End what tasks of an earlier daemon of this node left running, before this daemon
        starts anything or counts a GPU free: they are recorded ended (by this daemon's
        recovery, or node 0's after the stale time), so none of them may run on."""
        pids = predecessor_pids(self.folder.root, self.config.job_id, self.config.node_rank)
        if pids:
            LOG.warning("Ending %d process(es) of tasks that an earlier daemon of this node left "
                        "running: %s", len(pids), describe_pids(pids))
            tasks = {task_of(pid) for pid in pids} - {None}
            terminate(pids, self.config.stop_grace)
            # those tasks ran until now: their ends are recorded so (Recovery)
            self.runner.ends.ran_until.update(dict.fromkeys(tasks, self.clock()))

    @property
    def is_leader(self) -> bool:
        return self.config.node_rank == 0

    # -- ownership -------------------------------------------------------------------------

    def owns_node(self) -> bool:
        """True while this daemon's claim is the one in its node's state file (one read);
        when another daemon's is there, this one yields (docs/protocol.md)."""
        if self.displaced:
            return False
        fields = self.claim.other_holder()
        if fields is None:
            return True
        self.yield_node(fields)
        return False

    def yield_node(self, fields: dict[str, str]) -> None:
        self.displaced = True
        LOG.error("another daemon holds this instance and node: pid %s on %s, started %s; "
                  "this one stops, and its tasks are left to that daemon",
                  fields.get("pid", "?"), fields.get("host", "?"), fields.get("started_at", "?"))
        self.stopping = self.stopping or "another daemon holds this instance"
        for task in list(self.runner.tasks.values()):
            self.runner.tasks.pop(task.key, None)
            if task.proc is None:
                if task.rank is None:
                    self.runner.unclaim(task.task_id)
            else:
                self.runner.kill(task)
            self.keepalive.task_finished(task.gpus)
        self.runner.unfinished.clear()

    # -- shutdown --------------------------------------------------------------------------

    def on_signal(self, name: str) -> None:
        self.signals_seen += 1
        if self.signals_seen == 1:
            self.begin_shutdown(f"{name} received")
        else:
            LOG.info("%s received again: killing the running tasks now", name)
            for task in list(self.runner.tasks.values()):
                self.runner.stop(task, TaskState.INTERRUPTED, "daemon shutdown", hard=True)
            for entry in self.runner.ends.interrupting.values():  # a dead daemon's, too
                entry.leftovers.kill_at = min(entry.leftovers.kill_at, self.clock())

    def begin_shutdown(self, reason: str) -> None:
        if self.stopping:
            return
        self.stopping = reason
        self.state_dirty = True
        LOG.info("Shutting down: %s", reason)
        for task in list(self.runner.tasks.values()):
            if task.proc is None and task.rank is None:  # its GPUs were being freed: requeue
                self.runner.tasks.pop(task.key, None)
                self.runner.unclaim(task.task_id)
                self.keepalive.task_finished(task.gpus)
            else:
                self.runner.stop(task, TaskState.INTERRUPTED, "daemon shutdown")

    def begin_drain(self, reason: str) -> None:
        """Auto-shutdown: start nothing new, stop keep-alive, let the running tasks end."""
        self.draining = reason
        self.state_dirty = True
        running = len(self.runner.tasks)
        LOG.info("Auto-shutdown: %s; %s", reason, f"waiting for {running} running task(s) to "
                 "end; nothing new starts" if running else "nothing runs")
        self.keepalive.stop(f"stopped for the auto-shutdown ({reason})")

    def follow_leader(self) -> None:
        """A node other than 0 ends when node 0 has stopped after this node started: at once
        after a shutdown, after its own tasks after an auto-shutdown. Where both name their
        launch (``--launch``), a node 0 of another launch is an earlier run's, whatever the
        clocks say: this launch's node 0 has not written its state yet. Without it, "after"
        is read on the clocks, as node 0's stop time against this node's start."""
        try:
            fields = self.folder.read_fields(self.folder.state_path(0)) or {}
        except (OSError, ValueError):
            return
        theirs = fields.get("launch", "")
        if self.config.launch and theirs and theirs != self.config.launch:
            return
        stopped = as_float(fields.get("stopped"))
        if fields.get("status") == "stopped" and stopped is not None and stopped > self.started:
            if fields.get("stop_reason", "").startswith("auto-shutdown"):
                if not self.draining:
                    self.begin_drain("node 0 reached its auto-shutdown")
            else:
                self.begin_shutdown("node 0 has stopped")

    def close(self) -> None:
        self.keepalive.stop()
        self.runner.retry_unfinished()
        self.write_state(stopped=True)
        deadline = self.clock() + CALLBACK_EXIT_WAIT_SECONDS  # the last tasks' callbacks
        while self.callbacks.running and self.clock() < deadline:
            self.callbacks.poll()
            self.sleep(MIN_WAIT_SECONDS)
        LOG.info("Stopped: %s", self.stopping or self.draining or "loop ended")


class Daemon(DaemonLifecycle):
    """The main loop: heartbeat, commands, the queue, keep-alive; one tick at a time. Its
    start-up, ownership and shut-down are DaemonLifecycle's, its state file DaemonState's."""

    def __init__(self, config: Config, keepalive: KeepAlive | None = None,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep,
                 identity: Identity | None = None, inventory: Inventory | None = None,
                 monotonic: Callable[[], float] | None = None,
                 open_nvml: Callable[[logging.Logger], object] | None = None,
                 engine: Callable[[Inventory], KeepAlive] | None = None):
        self.config = config
        self.keepalive = keepalive or KeepAlive()
        self.inventory = inventory or Inventory(())
        # while NVML could not start it is asked again (open_nvml); once it answers,
        # keep-alive is made for the GPUs it found (engine)
        self.open_nvml = open_nvml or Nvml.open
        label = f"node {config.node_rank}" if config.num_nodes > 1 else ""
        self.engine = engine or (lambda found: make_keepalive(True, LOG, found, label))
        self.clock = clock
        self.sleep = sleep
        # other nodes' liveness and this node's fence are timed on this clock, never on the
        # wall clock (hosts' clocks differ); simulated time drives both in tests
        self.monotonic = monotonic or (time.monotonic if clock is time.time else clock)
        self.fence = SelfFence(self.monotonic)
        self.beats = 0
        self.identity = identity or Identity.here()
        self.folder = QueueFolder(config.instance, config.shared)
        self.throttled = ThrottledLog(clock)
        self.started = clock()
        self.started_text = f"{self.started:.3f}"  # as published; names this daemon's claims
        self.claim = NodeClaim(config, self.folder, self.identity, self.started_text, clock,
                               sleep, self.throttled)
        self.runner = TaskRunner(config, self.folder, self.identity, clock, self.throttled,
                                 self.inventory, self.started_text)
        self.callbacks = Callbacks(config.callback, self.folder, config.job_id, clock,
                                   self.throttled)
        self.runner.ends.ended = self.callbacks.task_ended
        self.gangs = Gangs(config, self.folder, self.runner, clock, self.throttled,
                           config.node_addr or self.identity.host)
        self.scheduler = Scheduler(config, self.folder, self.runner, self.gangs, self.inventory,
                                   clock, self.throttled, self.begin, self.owns_node)
        self.scheduler.liveness = Liveness(self.monotonic)
        self.commands = Commands(config, self.folder, self.runner, self.gangs, clock,
                                 self.throttled, self.started, self.begin_shutdown,
                                 self.mark_changed, self.ask_sweep)
        self.shutdown_at = self.started + config.hours * 3600
        self.hard_at = (self.started + AUTO_SHUTDOWN_HARD_HOURS * 3600
                        if AUTO_SHUTDOWN_HARD_HOURS else None)
        self.stopping = ""  # why the daemon is shutting down, once it is
        self.draining = ""  # why it starts nothing new and ends when its tasks have ended
        # gpu_drain's, of the instance and of this node: nothing new starts, the daemon stays
        self.user_drain: tuple[str | None, str | None] = (None, None)
        self.sweep_now = False  # a stop_all with nothing running: end other Python processes
        self.sweeps: list[Leftovers] = []  # those sweeps' countdowns (SIGTERM, then SIGKILL)
        self.unsafe: str | None = None  # why the queue folder is not to be trusted now
        self.finished = False
        self.signals_seen = 0
        self.last_state_write = -1e18
        self.state_dirty = True
        self.last_housekeeping = self.started
        self.last_cleaning = -1e18
        self.last_leader_check = self.started
        self.waiter: SignalWaiter | None = None
        self.displaced = False  # another daemon owns this node's state file
        self.running_names: list[str] | None = []  # None: running/ could not be listed
        self.running_unlisted_since = 0.0  # since when it could not be
        self.runner.ends.may_record = lambda: (not self.displaced
                                               and self.claim.other_holder() is None)
        self.history = History(self.folder, clock)
        self.keeper: FenceKeeper | None = None  # started by run()
        self.keeper_started = 0.0
        self.nvml_asked = self.monotonic()

    # -- the loop --------------------------------------------------------------------------

    def run(self, waiter: SignalWaiter | None = None) -> int:
        self.waiter = waiter
        code = self.start()
        if code is not None:
            return code
        self.fence.watch()
        self.keeper = FenceKeeper.spawn()
        try:
            while not self.finished:
                self.tick()
                if not self.finished:
                    self.sleep(self.wait_time())
        finally:
            self.fence.stop.set()
            self.close()
            if self.keeper is not None and self.finished:  # (a crash leaves it the tasks)
                self.keeper.close()
        return 0

    def handle_signals(self) -> None:
        while self.waiter is not None and self.waiter.received:
            self.on_signal(signal_name(self.waiter.received.pop(0)))

    def wait_time(self) -> float:
        wait = self.config.poll_interval
        now = self.clock()
        for task in self.runner.tasks.values():
            if task.kill_at is not None:
                wait = min(wait, task.kill_at - now)
            if task.proc is None:
                wait = min(wait, MIN_WAIT_SECONDS * 2)  # its GPUs are being freed
        if not self.stopping and not self.draining:
            wait = min(wait, self.shutdown_at - now)
        return max(wait, MIN_WAIT_SECONDS)

    def tick(self) -> None:
        """One turn of the loop. Nothing that a bad file or a failed call raises escapes."""
        try:
            self._tick()
        except Exception:  # noqa: BLE001 - the daemon never dies of one bad turn
            self.throttled.warning("tick", "unexpected error in the daemon loop (it goes on)",
                                   exc_info=True)

    def _tick(self) -> None:
        # Each step on its own: one that fails (an unreadable folder, say) must not keep the
        # others (reaping tasks, keep-alive, the heartbeat) from running.
        self.handle_signals()
        now = self.clock()
        if not self.stopping and not self.draining and now >= self.shutdown_at:
            self.begin_drain(f"auto-shutdown after {self.config.hours:g}h")
        if not self.stopping and self.hard_at is not None and now >= self.hard_at:
            self.begin_shutdown(f"hard auto-shutdown after {AUTO_SHUTDOWN_HARD_HOURS:g}h")
        self._step("fence", self.self_fence)
        self._step("tasks", self.run_tasks)
        self._step("folder", self.check_folder)  # nothing is taken from an unsafe folder
        if self.is_leader and not self.displaced:
            if not self.unsafe:
                self._step("commands", self.commands.handle)
                self._step("summary", self.history.refresh)
        elif not self.is_leader and now - self.last_leader_check >= HEARTBEAT_SECONDS:
            self.last_leader_check = now
            self._step("leader", self.follow_leader)
        if not self.displaced and not self.unsafe and \
                self.fence.lapsed() < SELF_FENCE_SECONDS and self.owns_node():
            self._step("queue", self.run_queue)
        if self.inventory.nvml_error and self.config.keepalive and not self.stopping \
                and not self.draining:
            self._step("nvml", self.ask_nvml_again)
        self._step("keepalive", lambda: self.keepalive.tick(now, self.busy_gpus()))
        self._step("callbacks", self.callbacks.poll)
        self._step("sweeps", self.end_sweeps)
        if self.identity.pid == 1 or is_subreaper():
            reap_orphans(self.keepalive.child_pids() | self.runner_pids())
        if (self.stopping or self.draining or self.displaced) and not self.runner.tasks \
                and not self.runner.unfinished and not self.sweeps \
                and not self.runner.ends.interrupting:
            self.finished = True
            return
        self._step("fence tasks", self.fence_tasks)  # those started in this turn too
        if self.state_dirty or now - self.last_state_write >= HEARTBEAT_SECONDS:
            self.write_state()
        if now - self.last_housekeeping >= 3600:
            self._step("housekeeping", self.housekeeping)

    def ask_nvml_again(self) -> None:
        """NVML could not start, so keep-alive is off: ask it again every
        _NVML_RETRY_SECONDS. Once it answers with the GPUs this node was given (the same
        numbers, or any where it was given none), keep-alive starts on them; GPUs other than
        those are left to a restart of the daemon, and said so."""
        if self.monotonic() - self.nvml_asked < _NVML_RETRY_SECONDS:
            return
        self.nvml_asked = self.monotonic()
        try:
            nvml = self.open_nvml(LOG)
        except NvmlUnavailable:
            return
        try:
            found = discover_gpus(self.config.gpus, LOG, open_nvml=lambda log: nvml)
        except ValueError as exc:
            found, why = None, str(exc)
        else:
            why = found.why
            if not why and self.inventory.gpus and \
                    found.all_numbers() != self.inventory.all_numbers():
                why = (f"it shows GPU(s) {found.all_numbers()}, not those of this daemon's "
                       f"tasks ({self.inventory.all_numbers()})")
        if found is None or why:
            self.throttled.warning("nvml", "NVML answers now, but keep-alive stays off: %s; "
                                   "restart the daemon to hold the GPUs", why)
            return
        self.inventory = self.runner.inventory = self.scheduler.inventory = found
        self.keepalive.stop()
        self.keepalive = self.engine(found)
        self.keepalive.start()
        LOG.warning("NVML answers now: keep-alive %s for GPU(s) %s", self.keepalive.describe(),
                    found.all_numbers())
        self.state_dirty = True

    def self_fence(self) -> None:
        """Fence when the beat is late; the tasks it killed end as interrupted. A beat is
        tried first: a daemon whose loop was only slow beats again and fences nothing. One
        that could not beat for the fence's limit (it was suspended, say) has had its tasks
        fenced by its keeper meanwhile: they end as interrupted too."""
        lapsed = self.fence.lapsed()
        if not self.displaced and lapsed >= HEARTBEAT_SECONDS:
            self.write_beat()
        tasks = self.fence_tasks()
        if self.keeper is not None and lapsed >= self.fence.limit and tasks:
            LOG.error("No heartbeat for %.0f s (suspended?): this node's tasks are fenced (its "
                      "fence keeper has killed them, or they are killed now)", lapsed)
            self.fence.killed |= {pgid for pgid, _ in self.fence.groups}
        self.fence.check()
        why = f"self-fenced: this node could not write its heartbeat for {SELF_FENCE_SECONDS:g} s"
        for task in tasks:
            if task.proc.pid in self.fence.killed:  # by this turn's check or the watch thread
                self.fence.killed.discard(task.proc.pid)
                LOG.error("%s: %s", task.label, why)
                task.stop_state, task.stop_reason = TaskState.INTERRUPTED, why
                task.fenced = True
                self.runner.stop(task, TaskState.INTERRUPTED, why, hard=True)

    def fence_tasks(self) -> list[RunningTask]:
        """Give the fence, and its keeper, the tasks this daemon runs (those started); them."""
        tasks = [t for t in self.runner.tasks.values() if t.proc is not None]
        self.fence.groups = frozenset((t.proc.pid, t.leader_start) for t in tasks)
        self.fence.markers = frozenset(f"{self.config.job_id}/{t.task_id}" for t in tasks)
        self.tell_keeper(beat=False)
        return tasks

    def _step(self, name: str, step: Callable[[], object]) -> None:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - logged, and the loop goes on
            self.throttled.warning(f"step:{name}", "%s: %s (the daemon goes on)", name, exc,
                                   exc_info=not isinstance(exc, OSError))

    def check_folder(self) -> None:
        """The StrictModes check of every pass: while a folder of the instance is another
        user's or writable by others, no task or command is taken from it."""
        unsafe = self.folder.unsafe()
        if unsafe != self.unsafe:
            self.state_dirty = True
            if not unsafe:
                LOG.info("The queue folder is safe again: tasks and commands are taken again")
        self.unsafe = unsafe
        if unsafe:
            self.throttled.warning("unsafe", "refusing the queue folder: %s; no task or "
                                   "command is taken from it until that is fixed", unsafe)

    def runner_pids(self) -> set[int]:
        """The daemon's own children besides keep-alive's: tasks, callbacks, its keeper."""
        return ({t.proc.pid for t in self.runner.tasks.values() if t.proc is not None}
                | self.callbacks.pids() | ({self.keeper.proc.pid} if self.keeper else set()))

    def busy_gpus(self) -> dict[int, str]:
        """The GPUs that queue tasks (and gang ranks) hold, with the task's id."""
        return {gpu: task.task_id for task in self.runner.tasks.values() for gpu in task.gpus}

    # -- the tasks of this node ------------------------------------------------------------

    def run_tasks(self) -> None:
        """Finish what ended, start what keep-alive has freed, obey stop records, and let go
        of tasks that another daemon finished meanwhile."""
        for task, _ in self.runner.poll():
            self.task_ended(task)
        try:
            self.running_names = self.folder.names("running", missing_ok=False)
        except OSError as exc:
            # running/ is gone for a moment (an automount, shared storage that failed once): that
            # proves nothing about the tasks, so nothing is concluded from it this turn
            now = self.clock()
            if self.running_names is not None:
                self.running_unlisted_since = now
            self.running_names = None
            self.throttled.warning("list-running", "cannot list running/ (%s): the tasks go on, "
                                   "and no queue pass runs until it can be listed",
                                   error_text(exc))
            if isinstance(exc, FileNotFoundError) and \
                    now - self.running_unlisted_since >= HEARTBEAT_SECONDS:
                made = self.folder.ensure()  # gone for good (deleted by hand, say)
                if made:
                    LOG.warning("queue folders were missing: created again: %s", ", ".join(made))
        present = set(self.running_names or ())
        for task in list(self.runner.tasks.values()):
            if self.running_names is not None and task.task_id not in present and \
                    self.let_go(task):
                continue
            stop = self.folder.stop_reason(task.task_id)
            if stop is not None and task.stop_state is None:
                self.runner.stop(task, TaskState.STOPPED, stop)
                task.sweep = stop.startswith("stopped by user")
            limit = task.submission.time_limit
            if (limit is not None and task.started is not None and task.stop_state is None
                    and self.clock() - task.started >= limit):
                self.runner.stop(task, TaskState.TIMEOUT,
                                 f"time limit of {duration_text(limit)} reached")
            if task.proc is None and task.task_id in present:
                self.start_when_free(task)

    def let_go(self, task: RunningTask) -> bool:
        """For a task that has left running/: True when this daemon lets go of it, because
        another daemon finished it (its result is written, or it is in done/ or failed/: this
        node was taken for dead), or because its process never started here (it was put back
        into pending/). Otherwise it is kept: an entry missing from running/ alone proves
        nothing, and a task is never killed without proof."""
        finished = self.folder.has_result(task.task_id) or self.folder.in_finished(task.task_id)
        if not finished and task.proc is not None:
            self.throttled.warning(f"missing:{task.task_id}", "%s is missing from running/, but "
                                   "no daemon has recorded its end: it goes on here", task.label)
            return False
        self.runner.tasks.pop(task.key, None)
        if task.proc is not None:
            self.runner.kill(task)
            LOG.warning("%s was finished by another daemon (this node was taken for dead): its "
                        "processes here are ended and nothing is recorded", task.label)
        else:
            LOG.warning("%s left running/ before it started here: its GPUs are freed",
                        task.label)
        self.keepalive.task_finished(task.gpus)
        self.state_dirty = True
        return True

    def start_when_free(self, task: RunningTask) -> None:
        if task.stop_state is not None:
            self.runner.tasks.pop(task.key, None)
            now = self.clock()
            self.runner.finish(self.runner.result_of(task, task.stop_state,
                                                     f"{task.stop_reason} (before it started)",
                                                     None, now))
            self.keepalive.task_finished(task.gpus)
            self.state_dirty = True
            return
        waited = self.clock() - task.claimed
        if task.rank is None and waited >= _CLAIM_START_SECONDS:
            # node 0 takes such a claim for a dead daemon's and puts the task back into
            # pending/, perhaps already (another node may have claimed it since): this node
            # lets go of it, touching nothing in the folder, and leaves the put back to node 0
            self.runner.tasks.pop(task.key, None)
            self.keepalive.task_finished(task.gpus)
            LOG.warning("%s was claimed %.0f s ago and has not started (its GPUs not freed, or "
                        "this daemon stalled): let go, node 0 puts it back into pending/",
                        task.label, waited)
            self.state_dirty = True
            return
        if not self.keepalive.released(task.gpus):
            return
        try:
            ok = self.runner.start(task)
        except NodeTrouble as exc:
            self.runner.tasks.pop(task.key, None)
            self.keepalive.task_finished(task.gpus)
            if task.rank is None:
                self.runner.unclaim(task.task_id)
            else:
                self.runner.finish(self.runner.result_of(task, TaskState.FAILED, str(exc),
                                                         None, self.clock()))
            self.scheduler.back_off(str(exc))
            return
        if not ok:
            self.keepalive.task_finished(task.gpus)
        else:
            self.scheduler.backoff = 0.0
        self.state_dirty = True

    def task_ended(self, task: RunningTask) -> None:
        self.keepalive.task_finished(task.gpus)
        self.state_dirty = True
        if task.sweep:
            self.kill_python(task.task_id)

    def kill_python(self, task_id: str = "") -> None:
        """Begin ending the other Python processes of the kill scope: SIGTERM now, SIGKILL to
        what is left after the grace, by a countdown that each turn checks (``end_sweeps``);
        the loop never waits for them."""
        pids = python_pids_to_kill(self.config.job_id, self.config.kill_scope,
                                   spare=self.keepalive.child_pids() | self.runner_pids(),
                                   task_id=task_id)
        if pids:
            now = self.clock()
            procs = send_sigterm(pids)
            self.sweeps.append(Leftovers(now, procs, len(procs),
                                         now + min(self.config.stop_grace,
                                                   CLEANUP_GRACE_SECONDS)))

    def end_sweeps(self) -> None:
        for sweep in list(self.sweeps):
            if not sweep.remain(self.clock()):
                self.sweeps.remove(sweep)
                LOG.info("Ended %d other Python process(es) (scope %s)", sweep.count,
                         self.config.kill_scope)

    # -- the queue -------------------------------------------------------------------------

    def run_queue(self) -> None:
        """The scheduler's pass (docs/protocol.md), after a sweep a stop_all asked for."""
        if self.running_names is None:
            return  # running/ could not be listed: nothing is judged on a listing not made
        if self.sweep_now:
            self.sweep_now = False
            self.kill_python()
        drains = (self.folder.drained(), self.folder.drained(self.config.node_rank))
        for was, now, what in zip(self.user_drain, drains, ("The queue", "This node")):
            if now != was:
                LOG.info("%s", f"{what} is {now}: running tasks go on, nothing new starts"
                         if now else f"{what} is resumed: tasks start again")
                self.state_dirty = True
        self.user_drain = drains
        waiting = self.scheduler.waiting
        self.scheduler.run(self.running_names, may_start=not (self.stopping or self.draining),
                           drained=drains[0], node_drained=drains[1])
        if self.scheduler.waiting != waiting:  # gpu_status shows what the first task waits for
            self.state_dirty = True

    def begin(self, task: RunningTask) -> None:
        """A claimed task (or a gang rank) starts: keep-alive frees its GPUs first."""
        self.runner.add(task)
        self.keepalive.release(task.gpus)
        self.state_dirty = True
        self.start_when_free(task)

    # -- what commands change --------------------------------------------------------------

    def mark_changed(self) -> None:
        self.state_dirty = True

    def ask_sweep(self) -> None:
        self.sweep_now = True


# Command line ###############################################################################


def _finite_arg(text: str) -> float:
    value = as_float(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def _whole_arg(text: str) -> int:
    value = ascii_int(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    return value


def console_name(argv0: str) -> str:
    """The name the daemon was started by, for its usage line: ``perpetual-motion`` (the
    console script of ``pip install``), else ``perpetual_motion.py``."""
    return "perpetual-motion" if Path(argv0).name == "perpetual-motion" else "perpetual_motion.py"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=console_name(sys.argv[0]),
        description="Keep this node's GPUs busy and run the task queue of one instance "
                    "(<queue-root>/<job-id>/, see docs/protocol.md).")
    parser.add_argument("--job-id", default=os.environ.get("JOB_ID") or "default",
                        help="the instance: letters, digits, '.', '_', '-' (at most 64); "
                             "default $JOB_ID, else 'default'")
    parser.add_argument("--queue-root", type=Path, default=None,
                        help="folder that holds the instances; default $QUEUE_ROOT, "
                             f"else ~/{DEFAULT_QUEUE_DIRNAME}")
    parser.add_argument("--poll-interval", type=_finite_arg, default=POLL_INTERVAL,
                        help=f"seconds between looks at pending/ (default {POLL_INTERVAL:g})")
    parser.add_argument("--hours", type=_finite_arg, default=AUTO_SHUTDOWN_HOURS,
                        help=f"exit after this many hours (default {AUTO_SHUTDOWN_HOURS})")
    parser.add_argument("--no-keepalive", action="store_true",
                        help="run the queue only; leave the GPUs alone")
    parser.add_argument("--kill-scope", choices=KILL_SCOPES, default=KILL_SCOPE,
                        help="what a stop kills besides the task: every Python process of "
                             "this user but the daemon (user-python), only processes of "
                             f"tasks (task), or nothing (none); default {KILL_SCOPE}")
    parser.add_argument("--stop-grace", type=_finite_arg, default=STOP_GRACE_SECONDS,
                        help="seconds from SIGTERM to SIGKILL when a task is stopped "
                             f"(default {STOP_GRACE_SECONDS:g})")
    parser.add_argument("--node-rank", type=_whole_arg, default=None,
                        help="this node's rank; default from SENSECORE_PYTORCH_NODE_RANK, "
                             "RANK or SLURM_NODEID, else 0")
    parser.add_argument("--num-nodes", type=_whole_arg, default=None,
                        help="nodes in the job; default from SENSECORE_PYTORCH_NNODES, "
                             "WORLD_SIZE or SLURM_NNODES, else 1")
    parser.add_argument("--gpus", default=None, metavar="N|LIST",
                        help="the GPUs tasks may use: a count (4) or GPU numbers (0,2,5); "
                             "without NVML, declares that many slots (keep-alive stays off); "
                             "default every GPU NVML shows within CUDA_VISIBLE_DEVICES")
    parser.add_argument("--node-addr", default="",
                        help="the address other nodes of the job reach this one by (the "
                             "MASTER_ADDR of tasks across nodes whose rank 0 runs here); "
                             "default the host name")
    parser.add_argument("--callback", default=TASK_CALLBACK, metavar="CMD",
                        help="a bash command run after each task ends, with PM_TASK_ID, "
                             "PM_TASK_STATE, PM_TASK_EXIT_CODE, PM_TASK_LOG ... set "
                             "(default TASK_CALLBACK)")
    parser.add_argument("--shared-queue", action="store_true", default=SHARED_QUEUE,
                        help="accept a queue folder that the group may write, and tasks, "
                             "records and commands of its members: everyone in the group can "
                             "run code as you (default SHARED_QUEUE)")
    parser.add_argument("--launch", default="", metavar="ID",
                        help="names the launch that started this daemon, the same on every "
                             "node of the job (submit.sh sets it): a node other than 0 then "
                             "ends with its own launch's node 0 only, whatever the clocks say")
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
    if not 0 < args.hours <= MAX_HOURS:
        return f"--hours must be above 0 and at most {MAX_HOURS}"
    if args.stop_grace < 0:
        return "--stop-grace must not be negative"
    rank, count = args.node_rank, args.num_nodes
    if rank is None or count is None:  # flags win; only then does the environment count
        try:
            env_rank, env_count = node_from_environment(os.environ)
        except ValueError as exc:
            return str(exc)
        rank = env_rank if rank is None else rank
        count = env_count if count is None else count
    if rank < 0 or count < 1 or rank >= count:
        return f"node rank {rank} does not fit {count} node(s)"
    try:
        gpus = None if args.gpus is None else parse_gpu_list(args.gpus)
    except ValueError as exc:
        return str(exc)
    if args.launch and not valid_job_id(args.launch):
        return (f"invalid --launch {args.launch!r}: use 1-64 letters, digits, '.', '_' or '-', "
                "not starting with '.' or '-'")
    root = args.queue_root or default_queue_root()
    return Config(job_id=args.job_id, queue_root=root.expanduser().absolute(),
                  gpus=gpus, node_addr=args.node_addr, poll_interval=args.poll_interval,
                  hours=args.hours,
                  keepalive=KEEPALIVE and not args.no_keepalive, kill_scope=args.kill_scope,
                  stop_grace=args.stop_grace, node_rank=rank, num_nodes=count, force=args.force,
                  callback=args.callback, shared=args.shared_queue, launch=args.launch)


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s",
                                           "%Y-%m-%d %H:%M:%S"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        set_process_name(WORKER_PROCESS_NAME)
        report_on_own_descriptor()
        return worker_main(argv[1:])
    if argv[:1] == ["--fence-keeper"]:
        set_process_name(FENCE_PROCESS_NAME)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a terminal's or a stop's signals: the daemon's
        setup_logging()
        return fence_keeper_main()
    if argv[:1] == ["--self-test-probe"] and len(argv) == 2:
        return self_test_probe(argv[1])
    if argv[:1] == ["--self-test"]:
        setup_logging()
        return self_test_main(argv[1:])
    set_process_name(DAEMON_PROCESS_NAME)
    config = config_from_args(parse_args(argv))
    setup_logging()
    if isinstance(config, str):
        LOG.error("%s", config)
        return EXIT_USAGE
    if importlib.util.find_spec("psutil") is None:
        LOG.error("the Python package psutil is missing from %s: pip install psutil",
                  sys.executable)
        return EXIT_FAILURE
    try:
        config.queue_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        LOG.error("cannot create the queue root %s: %s", config.queue_root, exc)
        return EXIT_FAILURE
    try:
        inventory = discover_gpus(config.gpus, LOG)
    except ValueError as exc:
        LOG.error("%s", exc)
        return EXIT_USAGE
    become_subreaper()  # a task's escaped children stay the daemon's (docs/protocol.md)
    waiter = SignalWaiter()
    label = f"node {config.node_rank}" if config.num_nodes > 1 else ""
    keepalive = make_keepalive(config.keepalive, LOG, inventory, label)
    daemon = Daemon(config, keepalive, sleep=waiter.sleep, inventory=inventory)
    return daemon.run(waiter)


if __name__ == "__main__":
    sys.exit(main())

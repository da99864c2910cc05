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

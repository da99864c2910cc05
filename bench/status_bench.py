#!/usr/bin/env python3
"""Client benchmark: `gpu_status` and friends on an instance of many finished tasks. Prints JSON.

    python3 bench/status_bench.py [--finished 10000 100000] [--runs 7] [--pending 20]

The instance folder is built directly, as a long-lived daemon of protocol 2 would have left it:
every finished task has its submit, run and result records and its log, with the result records'
times spread over the past days; a live node state (its running task, and per GPU the task that
holds it), one running task and 20 pending tasks with submit records, and the summary and names/
that node 0's daemon keeps (written by its own code, `History`). Each command runs in a fresh
`bash -c` / `zsh -f -c` that sources client.sh, timed from outside (the shell's start-up
included). No daemon runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import perpetual_motion  # noqa: E402

CLIENT = REPO / "client.sh"
SHELLS = {"bash": ["bash", "--norc", "--noprofile", "-c"], "zsh": ["zsh", "-f", "-c"]}


def task_id(n: int, name: str = "train.sh", priority: int = 500, base: float = 1.8e9) -> str:
    stamp = time.strftime("%Y%m%d_%H%M%S", time.gmtime(base + n))
    return f"{priority:03d}-{stamp}_{n % 1_000_000_000:09d}-{n % 0xFFFFFFFF:08x}-{name}"


def write(path: Path, fields: dict[str, object], mtime: float | None = None) -> None:
    path.write_text("".join(f"{k}={v}\n" for k, v in fields.items()))
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def build_instance(root: Path, job_id: str, finished: int, now: float | None = None,
                   pending: int = 20, distinct: int | None = None) -> dict[str, list[str]]:
    """Build ``root/job_id`` with ``finished`` finished tasks (every 10th failed); the ids.

    ``distinct``: only the newest that many finished tasks get files of their own; the files of
    older ones are hard links to one file of each kind (ended before all the others). The folder
    lists and stats the same, and builds ten times faster (for the tests).
    """
    now = time.time() if now is None else now
    distinct = finished if distinct is None else distinct
    inst = root / job_id
    for folder in ("pending", "running", "done", "failed", "records", "logs", "commands",
                   "replies", "nodes", ".staging"):
        (inst / folder).mkdir(parents=True, exist_ok=True)
    (inst / "control.json").write_text(f'{{\n  "protocol": 1,\n  "job_id": "{job_id}"\n}}\n')
    ids: dict[str, list[str]] = {"done": [], "failed": [], "pending": [], "running": []}
    records = inst / "records"
    shared = inst / ".staging"  # the linked files live where no reader looks
    old = now - (finished + 1) * 10.0
    links = 50_000  # a file takes at most 65,000 links on ext4: a new one after each 50,000
    for kind in ("body", "submit", "run", "result", "log"):
        for k in range(max(finished - distinct, 0) // links + 1):
            write(shared / f"{kind}{k}", {"id": "old", "state": "done", "exit_code": 0,
                                          "duration": "5.000", "ended": f"{old:.3f}"}, mtime=old)
    for n in range(finished):
        tid = task_id(n, f"task{n}.sh")
        folder = "failed" if n % 10 == 9 else "done"
        ids[folder].append(tid)
        if n < finished - distinct:
            for kind, path in (("body", inst / folder / tid),
                               ("submit", records / f"{tid}.submit"),
                               ("run", records / f"{tid}.run"),
                               ("result", records / f"{tid}.result"),
                               ("log", inst / "logs" / f"{tid}.log")):
                os.link(shared / f"{kind}{n // links}", path)
            continue
        ended = now - (finished - n) * 10.0  # task n ended before task n+1
        (inst / folder / tid).write_text("echo hi\n")
        write(records / f"{tid}.submit", {"id": tid, "name": f"task{n}.sh", "priority": "500",
                                          "cwd": "/tmp", "submitted": f"{ended - 9:.3f}"})
        write(records / f"{tid}.run", {"id": tid, "host": "node-a", "started": f"{ended - 5:.3f}"})
        write(records / f"{tid}.result",
              {"id": tid, "state": folder, "exit_code": 1 if folder == "failed" else 0,
               "signal": "", "reason": "exit status", "started": f"{ended - 5:.3f}",
               "ended": f"{ended:.3f}", "duration": "5.000", "host": "node-a",
               "node_rank": 0, "attempt": 1}, mtime=ended)
        log = inst / "logs" / f"{tid}.log"
        log.write_text(f"[perpetual-motion] task: {tid}\nhi\n")
        os.utime(log, (ended, ended))
    running = task_id(finished, "running.sh")
    ids["running"].append(running)
    (inst / "running" / running).write_text("sleep 1000\n")
    write(records / f"{running}.run",
          {"id": running, "host": "node-a", "node_rank": 0, "gpus": "0,1",
           "started": f"{now - 65:.3f}"})
    write(records / f"{running}.submit", {"id": running, "name": "running.sh", "gpus": 2,
                                          "command": "python train.py --epochs 90"})
    for n in range(pending):
        tid = task_id(finished + 1 + n, f"next{n}.sh", priority=100 + n % 900)
        ids["pending"].append(tid)
        (inst / "pending" / tid).write_text("echo next\n")
        write(records / f"{tid}.submit", {"id": tid, "name": f"next{n}.sh", "gpus": 1,
                                          "nodes": 1, "command": f"python sweep.py --seed {n}",
                                          "cwd": "/tmp", "argc": 0})
    gpus = {}
    for i in range(8):
        gpus.update({f"gpu.{i}.index": i, f"gpu.{i}.name": "NVIDIA H200",
                     f"gpu.{i}.task": running if i < 2 else "", f"gpu.{i}.util": 75,
                     f"gpu.{i}.mem_used_mib": 80000, f"gpu.{i}.mem_total_mib": 143771,
                     f"gpu.{i}.state": "yielded" if i < 2 else "holding",
                     f"gpu.{i}.reason": "queue task" if i < 2 else ""})
    write(inst / "nodes" / "node-0.state", {
        "protocol": 2, "job_id": job_id, "node_rank": 0, "num_nodes": 1, "host": "node-a",
        "pid": 4242, "status": "running", "started": f"{now - 3600:.3f}",
        "shutdown": f"{now + 20 * 3600:.3f}", "heartbeat": f"{now - 1:.3f}",
        "poll_interval": 1, "kill_scope": "task", "running_count": 1,
        "running.0.id": running, "running.0.gpus": "0,1", "running.0.started": f"{now - 65:.3f}",
        "running.0.pid": 4343, "running.0.rank": "", "waiting.id": "", "waiting.reason": "",
        "cpu_slots": 1, "cpu_running": 0, "gpus_free": 0,
        "current_task": running, "current_task_started": f"{now - 65:.3f}",
        "keepalive": "on", "gpu_count": 8, **gpus})
    return ids


def summarise(inst: Path) -> None:
    """Write the summary and names/ of ``inst`` as node 0's daemon does (its own code)."""
    history = perpetual_motion.History(perpetual_motion.QueueFolder(inst),
                                       clock=lambda: time.time() + 10)  # the folders settled
    while history.refresh() and not (history.stamps and history.settled):
        pass


TARGETS = {10_000: 0.1, 100_000: 0.15}  # seconds, each command, shell start-up counted
COMMANDS = ("gpu_status", "gpu_status --json", "gpu_logs", "gpu_show task5000",
            "gpu_tail task5000")
OTHERS = ("gpu_list", "gpu_use", "_gpu_main complete gpu_show t")  # the last: Tab after gpu_show t


def time_command(shell: str, command: str, root: Path, job_id: str, runs: int) -> dict:
    argv = [*SHELLS[shell], f'source "$CLIENT" && {command} >/dev/null']
    env = dict(os.environ, CLIENT=str(CLIENT), QUEUE_ROOT=str(root), JOB_ID=job_id)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run(argv, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"{shell}: {command} failed ({proc.returncode}): {proc.stderr}")
    return {"median_s": round(statistics.median(times), 4), "best_s": round(min(times), 4),
            "worst_s": round(max(times), 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finished", type=int, nargs="+", default=[10_000, 100_000],
                        help="finished tasks, one instance each (10000 100000)")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per command (7)")
    parser.add_argument("--pending", type=int, default=20, help="pending tasks (20)")
    args = parser.parse_args(argv)
    shells = [name for name in SHELLS if shutil.which(name)]
    report: dict[str, object] = {
        "benchmark": "client commands on instances with a long history",
        "pending_tasks": args.pending, "gpus": 8, "runs": args.runs, "host": platform.node(),
        "cpus": os.cpu_count(), "machine": platform.machine(),
        "load_before": os.getloadavg(), "targets_s": TARGETS, "sizes": [],
    }
    for finished in args.finished:
        with tempfile.TemporaryDirectory(prefix="status-bench-") as tmp:
            root = Path(tmp)
            start = time.perf_counter()
            build_instance(root, "bench", finished, pending=args.pending)
            built = time.perf_counter() - start
            start = time.perf_counter()
            summarise(root / "bench")
            summarised = time.perf_counter() - start
            os.sync()  # time the reads, not the write-back of the files just made
            size: dict[str, object] = {"finished_tasks": finished, "build_s": round(built, 2),
                                       "summary_s": round(summarised, 2)}
            for shell in shells:
                size[shell] = {cmd: time_command(shell, cmd, root, "bench", args.runs)
                               for cmd in (*COMMANDS, *OTHERS)}
            limit = TARGETS.get(finished)
            size["within_target"] = None if limit is None else all(
                size[s][cmd]["median_s"] <= limit for s in shells for cmd in COMMANDS)
            report["sizes"].append(size)
    report["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

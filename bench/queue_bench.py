#!/usr/bin/env python3
"""Queue benchmark: submit-to-start latency, drain rate, idle CPU; nq beside it. Prints JSON.

    python3 bench/queue_bench.py [--samples 20] [--drain 500] [--slots 8] [--idle-seconds 30]
                                 [--waiting 1000 5000] [--parts latency,drain,idle,waiting,nq]

The daemon runs for real (keep-alive off, kill scope none) inside its own PID namespace when
``unshare`` allows it, on a temporary queue root, with ``--slots`` declared GPU slots
(``--gpus``). Tasks are published the way the client does. The drain queues one-GPU tasks, so
that up to ``--slots`` run at once. Where ``nq`` (leahneukirchen/nq) is installed, the same
trivial jobs go through it too, for comparison: it runs them one at a time, with no daemon.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from queue_files import submit  # noqa: E402

import perpetual_motion as pm  # noqa: E402


def start_daemon(root: Path, job_id: str, poll: float, log: Path, slots: int = 8,
                 inotify: bool = True) -> subprocess.Popen:
    args = [sys.executable, str(REPO / "perpetual_motion.py"), "--job-id", job_id,
            "--queue-root", str(root), "--poll-interval", str(poll), "--no-keepalive",
            "--kill-scope", "none", "--gpus", str(slots)]
    prefix = []
    if shutil.which("unshare") and subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", "true"],
            capture_output=True).returncode == 0:
        prefix = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
    env = dict(os.environ)
    if not inotify:
        env[pm.NO_INOTIFY_VAR] = "1"
    with open(log, "ab") as out:
        proc = subprocess.Popen(prefix + args, stdout=out, stderr=subprocess.STDOUT, env=env)
    state = root / job_id / "nodes" / "node-0.state"
    deadline = time.time() + 30
    while time.time() < deadline:
        if state.exists() and "[INFO] Queue: " in log.read_text():
            return proc
        time.sleep(0.05)
    raise SystemExit(f"daemon did not start:\n{log.read_text()}")


def daemon_process(proc: subprocess.Popen) -> psutil.Process:
    me = psutil.Process(proc.pid)
    for p in [me, *me.children(recursive=True)]:
        cmdline = p.cmdline()
        if "python" in os.path.basename(cmdline[0]) and str(REPO / "perpetual_motion.py") \
                in cmdline:
            return p
    raise SystemExit("daemon process not found")


def stop(proc: subprocess.Popen) -> None:
    try:
        daemon_process(proc).terminate()
        proc.wait(30)
    except (SystemExit, psutil.Error, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()


def wait_done(inst: Path, task_id: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while not (inst / "done" / task_id).exists():
        if time.time() > deadline:
            raise SystemExit(f"{task_id} did not finish")
        time.sleep(0.005)


def latency(root: Path, samples: int, poll: float, log: Path, inotify: bool = True) -> dict:
    """From publishing a task to its first line. With ``inotify`` the new file wakes the daemon
    (a client on the daemon's host); without, only the poll finds it (shared storage written
    from another host, where inotify sees nothing)."""
    job = "latency" if inotify else "latency-poll"
    inst = root / job
    proc = start_daemon(root, job, poll, log, inotify=inotify)
    delays = []
    try:
        for i in range(samples):
            time.sleep(random.uniform(0, poll))  # land anywhere in the poll cycle
            stamp = root / f"start-{i}"
            submitted = time.time()
            task_id = submit(inst, f"t{i}.sh", f"date +%s.%N > '{stamp}'\n")
            wait_done(inst, task_id)
            delays.append(float(stamp.read_text()) - submitted)
    finally:
        stop(proc)
    delays.sort()
    return {"poll_interval_s": poll, "inotify": inotify, "samples": samples,
            "p50_s": round(statistics.median(delays), 4),
            "p95_s": round(delays[min(len(delays) - 1, int(0.95 * len(delays)))], 4),
            "target_p50_s": 0.3}


def drain(root: Path, count: int, slots: int, log: Path, repeat: int) -> dict:
    """The median of ``repeat`` drains (fsync times on a VM's disk vary from run to run)."""
    runs = [drain_once(root, f"drain{i}", count, slots, log) for i in range(repeat)]
    rates = sorted(run["tasks_per_s"] for run in runs)
    return {"tasks": count, "slots": slots, "runs_tasks_per_s": [r["tasks_per_s"] for r in runs],
            "tasks_per_s": rates[len(rates) // 2], "target_tasks_per_s": 300}


def drain_once(root: Path, job: str, count: int, slots: int, log: Path) -> dict:
    inst = root / job
    ids = [submit(inst, f"d{i}.sh", "true\n", gpus=1) for i in range(count)]
    proc = start_daemon(root, job, pm.POLL_INTERVAL, log, slots)
    try:
        for task_id in ids:
            wait_done(inst, task_id, timeout=300)
    finally:
        stop(proc)
    results = [pm.parse_fields((inst / "records" / f"{t}.result").read_text()) for t in ids]
    first = min(float(r["started"]) for r in results)
    last = max(float(r["ended"]) for r in results)
    return {"seconds": round(last - first, 3), "tasks_per_s": round(count / (last - first), 1)}


def nq_figures(root: Path, samples: int, count: int) -> dict | None:
    """The same trivial jobs through nq: latency from ``nq`` to the job's first line, and the
    drain of ``count`` jobs queued at once (nq runs them one after another)."""
    if shutil.which("nq") is None:
        return None
    env = dict(os.environ, NQDIR=str(root / "nq-latency"))
    delays = []
    for i in range(samples):
        stamp = root / f"nq-start-{i}"
        submitted = time.time()
        subprocess.run(["nq", "-q", "sh", "-c", f"date +%s.%N > '{stamp}'"], env=env, check=True)
        subprocess.run(["nq", "-w"], env=env, check=True)
        delays.append(float(stamp.read_text()) - submitted)
    delays.sort()
    env["NQDIR"] = str(root / "nq-drain")
    t0 = time.time()
    for _ in range(count):
        subprocess.run(["nq", "-q", "true"], env=env, check=True)
    subprocess.run(["nq", "-w"], env=env, check=True)
    seconds = time.time() - t0
    return {"latency_p50_s": round(statistics.median(delays), 4),
            "latency_p95_s": round(delays[min(len(delays) - 1, int(0.95 * len(delays)))], 4),
            "drain_tasks": count, "drain_seconds": round(seconds, 3),
            "drain_tasks_per_s": round(count / seconds, 1),
            "note": "drain includes starting nq once per job; nq runs one job at a time"}


def cpu_seconds(pid: int) -> float:
    """CPU time of a process to the nanosecond (schedstat), not in 10 ms clock ticks."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def idle_cpu(root: Path, finished: int, seconds: float, log: Path) -> dict:
    inst = root / "idle"
    folder = pm.QueueFolder(inst)
    folder.create("idle")
    for i in range(finished):
        task_id = pm.task_id_for(f"old{i}.sh")
        (inst / "done" / task_id).write_text("true\n")
        (inst / "records" / f"{task_id}.result").write_text(f"id={task_id}\nstate=done\n")
    proc = start_daemon(root, "idle", pm.POLL_INTERVAL, log)
    try:
        daemon = daemon_process(proc)
        time.sleep(15)  # past start-up and the summary's first read of the finished tasks
        before = cpu_seconds(daemon.pid)
        t0 = time.time()
        time.sleep(seconds)
        used = cpu_seconds(daemon.pid) - before
        elapsed = time.time() - t0
    finally:
        stop(proc)
    return {"finished_tasks": finished, "seconds": round(elapsed, 1),
            "cpu_percent_of_one_core": round(100 * used / elapsed, 4), "target_percent": 1.0}


def waiting_cpu(root: Path, waiting: int, seconds: float, log: Path, slots: int) -> dict:
    """The daemon's CPU while ``waiting`` one-GPU tasks wait behind a task that holds all
    ``slots`` GPUs (a sweep queued on a busy node): the same queue at every poll."""
    job = f"waiting{waiting}"
    inst = root / job
    gate = root / f"{job}.gate"
    busy = submit(inst, "busy.sh", f"while [ ! -e '{gate}' ]; do sleep 0.5; done\n",
                  gpus=slots, priority=0)
    proc = start_daemon(root, job, pm.POLL_INTERVAL, log, slots)
    try:
        daemon = daemon_process(proc)
        deadline = time.time() + 30
        while not (inst / "running" / busy).exists():
            if time.time() > deadline:
                raise SystemExit("the busy task did not start")
            time.sleep(0.05)
        for i in range(waiting):
            submit(inst, f"w{i}.sh", "true\n", gpus=1)
        time.sleep(5)  # past reading their records
        before = cpu_seconds(daemon.pid)
        t0 = time.time()
        time.sleep(seconds)
        used = cpu_seconds(daemon.pid) - before
        elapsed = time.time() - t0
        left = len(os.listdir(inst / "pending"))
    finally:
        gate.touch()
        stop(proc)
    if left != waiting:
        raise SystemExit(f"{waiting - left} of the waiting tasks started")
    return {"waiting_tasks": waiting, "seconds": round(elapsed, 1),
            "cpu_percent_of_one_core": round(100 * used / elapsed, 4), "target_percent": 1.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--drain", type=int, default=500)
    parser.add_argument("--slots", type=int, default=8, help="declared GPU slots")
    parser.add_argument("--repeat", type=int, default=3, help="drains to take the median of")
    parser.add_argument("--idle-seconds", type=float, default=30)
    parser.add_argument("--finished", type=int, default=10_000)
    parser.add_argument("--waiting", type=int, nargs="+", default=[1000, 5000],
                        help="tasks waiting behind a busy node, for the CPU while they wait")
    parser.add_argument("--parts", default="latency,drain,idle,waiting,nq",
                        help="which figures to take (comma-separated)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    root = Path(tempfile.mkdtemp(prefix="pm-bench-"))
    try:
        log = root / "daemon.log"
        report: dict[str, object] = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
                       f"Python {platform.python_version()}",
        }
        if "latency" in parts:
            report["latency"] = latency(root, args.samples, pm.POLL_INTERVAL, log)
            report["latency_poll_only"] = latency(root, args.samples, pm.POLL_INTERVAL, log,
                                                  inotify=False)
        if "drain" in parts:
            report["drain"] = drain(root, args.drain, args.slots, log, args.repeat)
        if "idle" in parts:
            report["idle"] = idle_cpu(root, args.finished, args.idle_seconds, log)
        if "waiting" in parts:
            report["waiting"] = [waiting_cpu(root, n, args.idle_seconds, log, args.slots)
                                 for n in args.waiting]
        if "nq" in parts:
            report["nq"] = nq_figures(root, args.samples, args.drain)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Keep-alive benchmark on a real GPU: band, yield, interference, queue task, CPU. Prints JSON.

    python3 bench/keepalive_bench.py [--gpu 0] [--band-seconds 60] [--yields 3] [--holdoff 10]

This process plays the daemon: it reads NVML only and drives the real engine
(``perpetual_motion.GpuKeepAlive`` with its real workers) on one GPU, calling ``tick()`` every
``--poll`` seconds as the daemon does. Probes and the queue task are separate processes, run by
this same file with ``--child``. The GPU must be otherwise idle. Without CUDA or NVML it says so
and exits 2. Measured (the plan of the keep-alive notes):

1. band: NVML utilisation read once a second for ``--band-seconds`` with the GPU held: the share
   of readings in [GPU_UTIL_TARGET, GPU_UTIL_HIGH] and their mean;
2. yield: a probe notes the time just before it creates its CUDA context, then waits; a watcher
   thread polls NVML every 5 ms. Latencies from that time: the context seen by NVML, the
   worker's last kernel done, the worker gone from the process list, its memory freed;
3. interference: the same probe's matmul loop (timed with CUDA events) after the yield, against
   the probe alone before the daemon started;
4. queue task: release() at the claim, then a task process that allocates all it can: the delay
   from claim to its start, and its memory against what was free before the daemon started;
5. CPU: of this process (the daemon's part) and of the worker, during the band.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import perpetual_motion as pm  # noqa: E402

MIB = pm.MIB
GIB = pm.GIB
LOG = logging.getLogger("keepalive-bench")


# Child processes: the probe and the queue task ##############################################


def child_probe(args) -> int:
    """A job that starts on a held GPU: context first, a pause, then a timed matmul loop."""
    t0 = time.time()
    import torch

    device = args.device
    t_before_context = time.time()
    torch.empty(1, device=device)  # creates the CUDA context
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    emit({"t0": t0, "t_before_context": t_before_context, "t_context": time.time()})
    time.sleep(args.pause)
    n = args.n
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype) / n ** 0.5
    c = torch.empty_like(a)
    for _ in range(5):
        torch.mm(a, b, out=c)
    times = []
    wall0 = time.perf_counter()
    while time.perf_counter() - wall0 < args.seconds:
        if device.startswith("cuda"):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                torch.mm(a, b, out=c)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 10)
        else:
            begin = time.perf_counter()
            for _ in range(10):
                torch.mm(a, b, out=c)
            times.append((time.perf_counter() - begin) * 100)
    wall = time.perf_counter() - wall0
    emit({"n": n, "iterations": 10 * len(times), "ms_per_matmul_median": statistics.median(times),
          "ms_per_matmul_wall": wall * 1000 / (10 * len(times)),
          "tflops": 2 * n ** 3 / (statistics.median(times) / 1000) / 1e12})
    return 0


def child_task(args) -> int:
    """A queue task: note when it starts, then take all the GPU memory it can."""
    t_start = time.time()
    emit({"t_start": t_start})
    import torch

    device = args.device
    chunk = 256 * MIB
    chunks = []
    limit = args.max_gib * GIB if args.max_gib else None
    while limit is None or len(chunks) * chunk < limit:
        try:
            chunks.append(torch.empty(chunk, dtype=torch.uint8, device=device))
        except (torch.cuda.OutOfMemoryError, RuntimeError, MemoryError):
            break
    emit({"t_start": t_start, "allocated": len(chunks) * chunk, "t_done": time.time()})
    return 0


def emit(record: dict) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def run_child(kind: str, gpu_uuid: str, extra: list[str], timeout: float = 120,
              on_start=None) -> list[dict]:
    """Run a child of this file on one GPU; its JSON lines."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu_uuid, CUDA_DEVICE_ORDER="PCI_BUS_ID")
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", kind, *extra]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
    if on_start is not None:
        on_start(proc)
    out, _ = proc.communicate(timeout=timeout)
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child exited with status {proc.returncode}: {records}")
    return records


# The daemon's side ##########################################################################


class TeeHandle:
    """A worker handle that also keeps every line the worker wrote, with its arrival time."""

    def __init__(self, handle, lines: list) -> None:
        self.handle = handle
        self.pid = handle.pid
        self.lines = lines

    def send(self, line):
        return self.handle.send(line)

    def messages(self):
        found = self.handle.messages()
        now = time.time()
        self.lines.extend((now, line) for line in found)
        return found

    def exit_code(self):
        return self.handle.exit_code()

    def stop(self):
        self.handle.stop()

    def kill(self):
        self.handle.kill()


class Bench:
    def __init__(self, args) -> None:
        import pynvml

        self.args = args
        self.nv = pynvml
        self.nvml = pm.Nvml.open(LOG)
        gpus = self.nvml.gpus()
        self.gpu = next(g for g in gpus if g.index == args.gpu)
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(args.gpu)
        self.worker_lines: list = []
        self.handles: list[TeeHandle] = []
        self.ka = pm.GpuKeepAlive(self.nvml, [self.gpu], LOG, spawn=self.spawn,
                                  holdoff=args.holdoff, filler=False)
        self.last_tick = 0.0

    def spawn(self, gpu, spec):
        handle = TeeHandle(pm.spawn_worker(gpu, spec), self.worker_lines)
        self.handles.append(handle)
        return handle

    def used(self) -> int:
        return int(self.nv.nvmlDeviceGetMemoryInfo(self.handle).used)

    def free(self) -> int:
        return int(self.nv.nvmlDeviceGetMemoryInfo(self.handle).free)

    def processes(self) -> list:
        return list(self.nv.nvmlDeviceGetComputeRunningProcesses(self.handle))

    def tick(self, task_running: bool = False) -> None:
        now = time.monotonic()
        if now - self.last_tick >= self.args.poll:
            self.ka.tick(now, {0: "task"} if task_running else {})
            self.last_tick = now

    def run_for(self, seconds: float, until=None, step: float = 0.02) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.tick()
            if until is not None and until():
                return True
            time.sleep(step)
        return until is None

    def state(self) -> str:
        return self.ka.gpu_fields()["gpu.0.state"]

    def wait_holding(self, timeout: float = 120) -> float:
        began = time.monotonic()
        if not self.run_for(timeout, until=lambda: self.state() == "holding"):
            raise RuntimeError(f"the GPU was not held within {timeout} s: "
                               f"{self.ka.gpu_fields()}")
        return time.monotonic() - began

    def worker(self):
        slot = self.ka.slots[0]
        return slot.worker

    # 1. band and 5. CPU
    def band(self) -> dict:
        import psutil

        worker = self.worker()
        me, them = psutil.Process(), psutil.Process(worker.handle.pid)
        cpu0 = (sum(me.cpu_times()[:2]), sum(them.cpu_times()[:2]), time.monotonic())
        readings = []
        next_read = time.monotonic() + 1.0
        end = time.monotonic() + self.args.band_seconds
        while time.monotonic() < end:
            self.tick()
            if time.monotonic() >= next_read:
                readings.append(self.nv.nvmlDeviceGetUtilizationRates(self.handle).gpu)
                next_read += 1.0
            time.sleep(0.02)
        wall = time.monotonic() - cpu0[2]
        cpu1 = (sum(me.cpu_times()[:2]), sum(them.cpu_times()[:2]))
        lo, hi = pm.GPU_UTIL_TARGET, pm.GPU_UTIL_HIGH
        busy = [float(pm.parse_message(line)[1]["busy"]) for _, line in self.worker_lines
                if line.startswith("stats")]
        return {
            "seconds": self.args.band_seconds,
            "readings": readings,
            "share_in_band": sum(lo <= r <= hi for r in readings) / len(readings),
            "mean": statistics.fmean(readings),
            "min": min(readings), "max": max(readings),
            "worker_busy_mean_reported": statistics.fmean(busy[-self.args.band_seconds:])
            if busy else None,
            "duty_at_end": float(self.ka.gpu_fields()["gpu.0.duty"] or "nan"),
            "cpu_daemon_percent_of_core": 100 * (cpu1[0] - cpu0[0]) / wall,
            "cpu_worker_percent_of_core": 100 * (cpu1[1] - cpu0[1]) / wall,
        }

    # 2. yield and 3. interference
    def yield_once(self) -> dict:
        worker = self.worker()
        worker_pid = worker.handle.pid
        held = (worker.held_mib or 0) * MIB
        used_before = self.used()
        pids_before = [p.pid for p in self.processes()]
        seen: dict[str, float] = {}
        stop = threading.Event()

        def watch():
            # processes are counted, not matched by pid: pids differ between namespaces
            while not stop.is_set():
                now = time.time()
                try:
                    count = len(self.processes())
                    used = self.used()
                except Exception:  # noqa: BLE001 - a missed poll is retried
                    continue
                if count > len(pids_before):
                    seen.setdefault("context_seen", now)
                if "context_seen" in seen and count < len(pids_before) + 1:
                    seen.setdefault("worker_gone", now)
                # with nothing held (it never took memory), gone is freed
                freed = used <= used_before - 0.8 * held if held > 0 else "worker_gone" in seen
                if freed:
                    seen.setdefault("memory_freed", now)
                if len(seen) == 3:
                    return
                time.sleep(0.005)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        holder = {}
        thread = threading.Thread(target=lambda: holder.setdefault("records", run_child(
            "probe", self.gpu.uuid, ["--pause", "1.5", "--seconds", str(self.args.probe_seconds),
                                     "--n", str(self.args.probe_n)])), daemon=True)
        thread.start()
        while thread.is_alive():
            self.tick()
            time.sleep(0.02)
        stop.set()
        watcher.join(timeout=1)
        records = holder["records"]
        start, result = records[0], records[-1]
        exit_t = None
        for _, line in self.worker_lines:
            verb, fields = pm.parse_message(line)
            if verb == "exit" and float(fields.get("t", 0)) >= start["t0"]:
                exit_t = float(fields["t"])
                break
        base = start["t_before_context"]  # latencies count from the probe's context

        def since(t):
            return None if t is None else t - base

        return {
            "processes_before": len(pids_before),
            "worker_pid_matches_nvml": worker_pid in pids_before,
            "held_mib": held // MIB,
            "context_seen_s": since(seen.get("context_seen")),
            "last_kernel_done_s": since(exit_t),
            "worker_gone_s": since(seen.get("worker_gone")),
            "memory_freed_s": since(seen.get("memory_freed")),
            "memory_freed_after_context_seen_s": (seen["memory_freed"] - seen["context_seen"])
            if "memory_freed" in seen and "context_seen" in seen else None,
            "probe_context_creation_s": start["t_context"] - start["t_before_context"],
            "state_after": self.ka.gpu_fields()["gpu.0.reason"],
            "probe": result,
        }

    # 4. queue task
    def queue_task(self) -> dict:
        t_claim = time.time()
        self.ka.release([0])
        deadline = time.monotonic() + 30
        while not (released := self.ka.released([0])) and time.monotonic() < deadline:
            time.sleep(0.01)
        t_released = time.time()
        records = run_child("task", self.gpu.uuid, [])
        self.ka.tick(time.monotonic(), {0: "task"})
        self.ka.task_finished([0])
        return {"released": released, "release_s": t_released - t_claim,
                "claim_to_start_s": records[-1]["t_start"] - t_claim,
                "allocated_bytes": records[-1]["allocated"]}


def idle_check(nv, handle) -> list:
    return [p.pid for p in nv.nvmlDeviceGetComputeRunningProcesses(handle)]


def cuda_torch(uuid: str) -> str | None:
    """torch's version where it sees CUDA on the GPU, else None (asked in a child: this
    process, like the daemon, never touches CUDA)."""
    code = ("import torch, sys; ok = torch.cuda.is_available(); "
            "print(f'{torch.__version__} (CUDA {torch.version.cuda})'); sys.exit(0 if ok else 1)")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=uuid)
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, timeout=120,
                              capture_output=True, text=True)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def measure(args) -> dict:
    try:
        import psutil  # noqa: F401
        import pynvml  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"keepalive_bench: needs nvidia-ml-py and psutil ({exc})") from exc
    try:
        bench = Bench(args)
    except (pm.NvmlUnavailable, StopIteration) as exc:
        raise SystemExit(f"keepalive_bench: needs an NVIDIA GPU and driver ({exc!r})") from exc
    if bench.gpu.mig:
        raise SystemExit("keepalive_bench: the GPU is in MIG mode")
    torch_version = cuda_torch(bench.gpu.uuid)
    if torch_version is None:
        raise SystemExit("keepalive_bench: CUDA is not available to torch on this machine")
    nv, handle = bench.nv, bench.handle
    report: dict = {
        "bench": "keepalive",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": bench.gpu.name,
        "gpu_memory_mib": bench.gpu.memory_total // MIB,
        "driver": pm._text(nv.nvmlSystemGetDriverVersion()),
        "machine": f"{platform.node()}, {os.cpu_count()} cores, Python "
                   f"{platform.python_version()}",
        "torch": torch_version,
        "settings": {"poll_s": args.poll, "holdoff_s": args.holdoff,
                     "period_s": pm.KEEPALIVE_PERIOD, "tile_ms_target": pm.KEEPALIVE_TILE_MS,
                     "band": [pm.GPU_UTIL_TARGET, pm.GPU_UTIL_HIGH],
                     "memory_target": pm.MEMORY_USAGE_TARGET,
                     "seed_n": pm.seed_matrix_size(bench.gpu.memory_total)},
        "foreign_processes_at_start": idle_check(nv, handle),
    }
    if report["foreign_processes_at_start"]:
        LOG.warning("bench: the GPU is not idle: figures will not be clean")
    errors = report.setdefault("errors", [])
    out = output_path(args, bench.gpu.name, report["date"])

    def phase(name, fn):
        LOG.info("bench: %s", name)
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - record it, go on with the next phase
            LOG.exception("bench: %s failed", name)
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
            return None
        finally:
            if out is not None:  # what is measured so far survives a timeout
                out.write_text(json.dumps(report, indent=2) + "\n")

    # Before the daemon: what is free, what a task gets, how fast the probe runs alone.
    free_before = bench.free()
    report["free_before_daemon_mib"] = free_before // MIB
    alone_task = phase("task alone", lambda: run_child("task", bench.gpu.uuid, []))
    alone_probe = phase("probe alone", lambda: run_child(
        "probe", bench.gpu.uuid, ["--pause", "0", "--seconds", str(args.probe_seconds),
                                  "--n", str(args.probe_n)]))
    report["probe_alone"] = alone_probe[-1] if alone_probe else None

    bench.ka.start()
    try:
        report["time_to_hold_s"] = phase("hold", bench.wait_holding)
        worker = bench.worker()
        if worker is not None:
            report["tile"] = worker.tile
            report["tile_ms"] = worker.tile_ms
            report["held_mib"] = worker.held_mib
            report["memory_used_holding_mib"] = bench.used() // MIB
        phase("settle", lambda: bench.run_for(args.settle))
        report["band"] = phase("band", bench.band)
        yields = []
        for i in range(args.yields):
            if i and phase("hold again", bench.wait_holding) is None:
                break
            result = phase(f"yield {i + 1}", bench.yield_once)
            if result is not None:
                yields.append(result)
        report["yields"] = yields
        if yields and alone_probe:
            alone = alone_probe[-1]["ms_per_matmul_median"]
            beside = [y["probe"]["ms_per_matmul_median"] for y in yields]
            report["probe_slowdown"] = statistics.median(beside) / alone - 1
        if phase("hold for the task", bench.wait_holding) is not None:
            task = phase("queue task", bench.queue_task)
            if task:
                task["share_of_free_before_daemon"] = task["allocated_bytes"] / free_before
                if alone_task:
                    task["share_of_task_alone"] = (task["allocated_bytes"]
                                                   / alone_task[-1]["allocated"])
                report["queue_task"] = task
    finally:
        bench.ka.stop()
    report["summary"] = summary(report)
    if out is not None:
        out.write_text(json.dumps(report, indent=2) + "\n")
        LOG.info("bench: written to %s", out)
    return report


def output_path(args, gpu_name: str, date: str) -> Path | None:
    if args.out:
        return Path(args.out)
    if args.out_dir:
        slug = "".join(c if c.isalnum() else "-" for c in gpu_name).strip("-")
        slug = "-".join(part for part in slug.split("-") if part)
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        return Path(args.out_dir) / f"keepalive-{slug}-{date[:10]}.json"
    return None


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summary(report: dict) -> dict:
    """The figures the issue sets targets for, with the targets."""
    band = report.get("band") or {}
    yields = report.get("yields") or []
    task = report.get("queue_task") or {}
    freed = _median(y.get("memory_freed_after_context_seen_s") for y in yields)
    cpu = None
    if band:
        cpu = band["cpu_daemon_percent_of_core"] + band["cpu_worker_percent_of_core"]
    figures = {
        "band_share": (band.get("share_in_band"), ">= 0.9"),
        "band_mean": (band.get("mean"), "70-85"),
        "memory_freed_after_context_seen_s": (freed, "<= 0.5"),
        "memory_freed_after_probe_context_s": (
            _median(y.get("memory_freed_s") for y in yields), "<= 0.5"),
        "probe_slowdown": (report.get("probe_slowdown"), "<= 0.02"),
        "task_share_of_free_before_daemon": (task.get("share_of_free_before_daemon"),
                                              ">= 0.95"),
        "claim_to_start_s": (task.get("claim_to_start_s"), "small"),
        "cpu_percent_of_core_per_gpu": (cpu, "<= 3"),
    }
    checks = {
        "band_share": lambda v: v >= 0.9,
        "band_mean": lambda v: 70 <= v <= 85,
        "memory_freed_after_context_seen_s": lambda v: v <= 0.5,
        "memory_freed_after_probe_context_s": lambda v: v <= 0.5,
        "probe_slowdown": lambda v: v <= 0.02,
        "task_share_of_free_before_daemon": lambda v: v >= 0.95,
        "cpu_percent_of_core_per_gpu": lambda v: v <= 3,
    }
    out = {}
    for name, (value, target) in figures.items():
        met = None if value is None or name not in checks else bool(checks[name](value))
        out[name] = {"value": value, "target": target, "met": met}
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", type=int, default=0, help="NVML index of the GPU")
    parser.add_argument("--band-seconds", type=int, default=60)
    parser.add_argument("--settle", type=float, default=15.0, help="s held before the band")
    parser.add_argument("--yields", type=int, default=3, help="probe runs")
    parser.add_argument("--holdoff", type=float, default=10.0,
                        help="hold-off for this run (the daemon's is KEEPALIVE_HOLDOFF_SECONDS)")
    parser.add_argument("--poll", type=float, default=pm.POLL_INTERVAL)
    parser.add_argument("--probe-seconds", type=float, default=5.0)
    parser.add_argument("--probe-n", type=int, default=8192)
    parser.add_argument("--out", help="also write the JSON to this file")
    parser.add_argument("--out-dir", help="also write it to keepalive-<GPU>-<date>.json here")
    parser.add_argument("--child", choices=["probe", "task"], help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--pause", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=8192, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=5.0, help=argparse.SUPPRESS)
    parser.add_argument("--max-gib", type=float, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "probe":
        return child_probe(args)
    if args.child == "task":
        return child_task(args)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s [%(levelname)s] %(message)s")
    try:
        report = measure(args)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
"""Keep-alive benchmark on one real GPU: band, yield, interference, queue task, CPU. JSON out.

    bench/run_on_gpu.sh                    # installs what is missing, then runs this
    python3 bench/keepalive_bench.py [--gpu 0] [--out-dir DIR] [--preflight-only]

This process plays the daemon: it reads NVML only and drives the real engine
(``perpetual_motion.GpuKeepAlive`` with its real workers) on one GPU, calling ``tick()`` every
``--poll`` seconds as the daemon does. Probes and queue tasks are separate processes, run by this
same file with ``--child``; they import torch before they are told to go, so that what is timed
is the GPU, not the import. The GPU must be otherwise idle. The plan (``PLAN``, each phase with
its budget; under 6 minutes in all, cut short at ``--deadline``):

1. preflight: versions (driver, NVML, CUDA, torch), compute mode, MIG, the GPU idle, NVML's own
   sample timestamps (the real sample window), a tiny fp16 matmul on the device in a child (the
   kernels exist). Anything wrong stops the run here, with exit status 2;
2. alone: a probe (fp16 matmuls, every batch timestamped) and a queue task (takes all the
   memory it can) on the GPU alone, before keep-alive starts;
3. hold: keep-alive takes the GPU; a worker that crashes twice stops the run (exit status 3);
4. band: the self-test's own measurement (``perpetual_motion.py --self-test`` runs the same
   function): the share of NVML's samples in the band by the engine's count and of NVML's 1-s
   readings, for ``--band-seconds`` while held; beside it NVML's raw samples, and the CPU of
   this process and of the worker, from /proc;
5. yields: a probe starts on the held GPU, its work at once: how long until our memory is free
   and the probe's big allocation succeeds (counted from its first allocation), its throughput
   in its first second and the time until it runs at 99% of its speed alone. First with the
   process list, then with it hidden from our detection (``Nvml.hide_processes`` and the
   workers' ``--hide-processes``), as NVML hides jobs of other containers;
6. queue task: release() at the claim, then a task that takes all the memory it can, against
   the same task alone.

Everything it starts is killed when it ends, however it ends (SIGTERM included); the PIDs are
also written to ``children.pids`` beside the JSON. The JSON is rewritten after every phase, so a
run cut short keeps what it measured. Exit status: 0 the plan ran (the summary says which
targets were met), 2 it cannot run here, 3 it was cut short, 1 an unexpected error.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import perpetual_motion as pm  # noqa: E402

MIB = pm.MIB
GIB = pm.GIB
LOG = logging.getLogger("keepalive-bench")

# Settings ####################################################################################

PLAN = (  # phase, budget in seconds
    ("preflight", 25),
    ("alone", 35),
    ("hold", 45),
    ("band", 75),
    ("yields", 120),
    ("queue task", 30),
)
DEADLINE_SECONDS = sum(budget for _, budget in PLAN)  # 330: the plan's whole budget
PROBE_N = 8192  # matmul size of the probe (1.1 TFLOP per product)
PROBE_BATCH = 4  # products between two timestamps
PROBE_JOB_SHARE = 0.5  # memory the probe takes beside its matmuls: more than our ballast leaves
WATCH_POLL = 0.005  # s between two NVML readings of the yield watcher
CHILD_READY_SECONDS = 60.0  # longest wait for a child to import torch
CRASHES_TO_STOP = 2  # worker crashes that stop the run
EXIT_CANNOT_RUN = 2
EXIT_CUT_SHORT = 3

TARGETS = {  # summary figure: (target as text, check)
    "band_share_1s": (">= 0.95", lambda v: v >= 0.95),
    "band_mean": ("70-85", lambda v: 70 <= v <= 85),
    "memory_freed_listed_s": ("<= 0.25", lambda v: v <= 0.25),
    "memory_freed_hidden_s": ("<= 1.5", lambda v: v <= 1.5),
    "probe_first_second_of_alone_listed": (">= 0.90", lambda v: v >= 0.90),
    "probe_first_second_of_alone_hidden": (">= 0.90", lambda v: v >= 0.90),
    "probe_99_percent_after_listed_s": ("<= 2.0", lambda v: v <= 2.0),
    "probe_99_percent_after_hidden_s": ("<= 2.0", lambda v: v <= 2.0),
    "task_share_of_free_before_daemon": (">= 0.98", lambda v: v >= 0.98),
    "cpu_percent_of_core_per_gpu": ("<= 2", lambda v: v <= 2),
}


class CutShort(Exception):
    """The run stops before its plan is done; the message says why."""


# Child processes: preflight, probe, queue task ##############################################
#
# Each runs on the GPU named by CUDA_VISIBLE_DEVICES, writes JSON lines on stdout, and (probe,
# task) waits for a "go" line on stdin after importing torch; end of input ends it.


def emit(record: dict) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def wait_for_go() -> bool:
    return sys.stdin.readline().strip() == "go"


def child_preflight(args) -> int:
    began = time.time()
    import torch

    facts = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
             "import_s": time.time() - began, "cuda_available": torch.cuda.is_available()}
    if not facts["cuda_available"]:
        emit(facts)
        return 1
    t = time.time()
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    facts["context_s"] = time.time() - t
    facts["device"] = torch.cuda.get_device_name(0)
    facts["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    a = torch.randn(256, 256, device="cuda", dtype=torch.float16)
    c = a @ (a / 16)
    torch.cuda.synchronize()
    facts["matmul_ok"] = bool(torch.isfinite(c).all().item())
    free, total = torch.cuda.mem_get_info()
    facts.update(cuda_free_mib=free // MIB, cuda_total_mib=total // MIB)
    emit(facts)
    return 0 if facts["matmul_ok"] else 1


def child_probe(args) -> int:
    """A job that starts on the GPU: context, a small working set, then matmul batches at once;
    between two batches it tries to take its big share of memory until it gets it."""
    import torch

    emit({"ready": time.time()})
    if not wait_for_go():
        return 0
    t_go = time.time()
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    t_context = time.time()
    n = args.n
    t_first_alloc = time.time()
    a = torch.randn(n, n, device="cuda", dtype=torch.float16)
    b = torch.randn(n, n, device="cuda", dtype=torch.float16) / n ** 0.5
    c = torch.empty_like(a)
    allocations = [[time.time(), 3 * n * n * 2]]
    job, job_bytes, failures = None, int(args.job_gib * GIB), 0
    t_job = None
    batches = []
    t_work = time.time()
    while time.time() - t_work < args.seconds:
        if job is None and job_bytes:
            try:
                job = torch.empty(job_bytes, dtype=torch.uint8, device="cuda")
                t_job = time.time()
                allocations.append([t_job, job_bytes])
            except torch.cuda.OutOfMemoryError:
                failures += 1
        for _ in range(args.batch):
            torch.mm(a, b, out=c)
        torch.cuda.synchronize()
        batches.append(time.time())
    emit({"t_go": t_go, "t_context": t_context, "t_first_alloc": t_first_alloc,
          "t_work": t_work, "t_job_memory": t_job, "job_bytes": job_bytes,
          "job_failures": failures, "allocations": allocations, "n": n,
          "batch": args.batch, "batches": batches})
    return 0


def child_task(args) -> int:
    """A queue task: when told to go, take all the GPU memory it can."""
    import torch

    emit({"ready": time.time()})
    if not wait_for_go():
        return 0
    t_go = time.time()
    chunks, size = [], GIB
    while size >= 64 * MIB:
        try:
            chunks.append(torch.empty(size, dtype=torch.uint8, device="cuda"))
        except torch.cuda.OutOfMemoryError:
            size //= 2
    emit({"t_go": t_go, "allocated": sum(c.numel() for c in chunks), "t_done": time.time()})
    return 0


CHILDREN = {"preflight": child_preflight, "probe": child_probe, "task": child_task}


# Backends: what the plan runs on ############################################################


class Child:
    """A child process of this file: JSON lines out, "go" in, killed with its group."""

    def __init__(self, argv: list[str], env: dict[str, str], register: Callable[[int], None]):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, text=True, start_new_session=True)
        self.pid = self.proc.pid
        register(self.pid)
        self.records: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                try:
                    self.records.append(json.loads(line))
                except ValueError:
                    pass

    def ready(self, timeout: float, idle: Callable[[], object]) -> dict:
        deadline = time.monotonic() + timeout
        while not self.records:
            if self.proc.poll() is not None:
                raise RuntimeError(f"child exited with status {self.proc.returncode} "
                                   "before it was ready")
            if time.monotonic() > deadline:
                raise RuntimeError(f"child not ready within {timeout:.0f} s")
            idle()
        return self.records[0]

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float, idle: Callable[[], object]) -> list[dict]:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"child still running after {timeout:.0f} s: killed")
            idle()
        self._reader.join(timeout=5)
        if self.proc.returncode != 0:
            raise RuntimeError(f"child exited with status {self.proc.returncode}: "
                               f"{self.records[-1:]}")
        return self.records

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()


class GpuBackend:
    """One NVIDIA GPU: NVML, the real workers, children of this file."""

    def __init__(self, index: int, pids_file: Path | None) -> None:
        try:
            import pynvml
        except ImportError as exc:
            raise CutShort("needs nvidia-ml-py (import pynvml)") from exc
        try:
            self.nvml = pm.Nvml.open(LOG)
            gpus = {g.index: g for g in self.nvml.gpus()}
        except pm.NvmlUnavailable as exc:
            raise CutShort(f"needs an NVIDIA GPU and driver ({exc})") from exc
        if index not in gpus:
            raise CutShort(f"needs an NVIDIA GPU: NVML shows no GPU {index}")
        self.nv = pynvml
        self.gpu = gpus[index]
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.clock = time.monotonic
        self.hidden = False
        self.pids_file = pids_file
        self.children: list[int] = []

    def register(self, pid: int) -> None:
        self.children.append(pid)
        if self.pids_file is not None:
            self.pids_file.write_text("".join(f"{p}\n" for p in self.children))

    def spawn(self, gpu: pm.GpuInfo, spec: pm.WorkerSpec):
        worker = pm.spawn_worker(gpu, spec, ["--hide-processes"] if self.hidden else [])
        self.register(worker.pid)
        return worker

    def set_hidden(self, hidden: bool) -> None:
        self.hidden = hidden
        self.nvml.hide_processes = hidden

    def child(self, kind: str, options: list[str]) -> Child:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=self.gpu.uuid,
                   CUDA_DEVICE_ORDER="PCI_BUS_ID")
        argv = [sys.executable, str(Path(__file__).resolve()), "--child", kind, *options]
        return Child(argv, env, self.register)

    def memory(self) -> tuple[int, int]:
        info = self.nv.nvmlDeviceGetMemoryInfo(self.handle)
        return int(info.used), int(info.total)

    def process_count(self) -> int | None:
        """Compute processes NVML lists (None where it will not: some sandboxes)."""
        try:
            return len(self.nv.nvmlDeviceGetComputeRunningProcesses(self.handle))
        except self.nv.NVMLError:
            return None

    def util_rate(self) -> int | None:
        try:
            return int(self.nv.nvmlDeviceGetUtilizationRates(self.handle).gpu)
        except self.nv.NVMLError:
            return None

    def raw_samples(self, since_us: int = 0) -> list[tuple[int, float]]:
        nv = self.nv
        try:
            _, raw = nv.nvmlDeviceGetSamples(self.handle, nv.NVML_GPU_UTILIZATION_SAMPLES,
                                             since_us)
        except nv.NVMLError:  # NotFound: nothing new; NotSupported: no buffer here
            return []
        return [(int(s.timeStamp), float(s.sampleValue.uiVal)) for s in raw]

    def facts(self) -> dict:
        nv, h = self.nv, self.handle

        def ask(fn, *args):
            try:
                value = fn(*args)
            except Exception as exc:  # noqa: BLE001 - a fact NVML will not give is recorded so
                return f"error: {exc}"
            return pm._text(value) if isinstance(value, (bytes, str)) else value

        cuda = ask(nv.nvmlSystemGetCudaDriverVersion)
        return {
            "driver": ask(nv.nvmlSystemGetDriverVersion),
            "nvml": ask(nv.nvmlSystemGetNVMLVersion),
            "cuda_driver": f"{cuda // 1000}.{cuda % 1000 // 10}" if isinstance(cuda, int)
            else cuda,
            "compute_mode": self.nvml.compute_mode(self.gpu),
            "mig": self.gpu.mig,
            "power_limit_w": (lambda v: v / 1000 if isinstance(v, int) else v)(
                ask(nv.nvmlDeviceGetPowerManagementLimit, h)),
            "persistence_mode": ask(nv.nvmlDeviceGetPersistenceMode, h),
            "processes": self.process_count(),
        }

    def cpu_seconds(self, pid: int | None = None) -> float | None:
        """User and system CPU time of a process (this one by default), from /proc."""
        try:
            if pid is None:
                times = os.times()
                return times.user + times.system
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def close(self) -> None:
        self.nvml.close()


# The plan ###################################################################################


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


@dataclasses.dataclass
class Watcher:
    """NVML read every WATCH_POLL seconds in a thread while a probe starts: (wall time, memory
    used, process count)."""

    backend: object
    readings: list = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                used, _ = self.backend.memory()
            except Exception:  # noqa: BLE001 - a missed reading is just missed
                used = None
            if used is not None:
                self.readings.append((time.time(), used, self.backend.process_count()))
            self._stop.wait(WATCH_POLL)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


class Bench:
    def __init__(self, args, backend, report: dict, write: Callable[[], None]) -> None:
        self.args = args
        self.backend = backend
        self.report = report
        self.write = write
        self.worker_lines: list = []
        self.children: list[Child] = []
        self.ka = pm.GpuKeepAlive(backend.nvml, [backend.gpu], LOG, spawn=self.spawn,
                                  timefunc=backend.clock, holdoff=args.holdoff, filler=False)
        self.last_tick = -1e18
        self.began = time.monotonic()
        self.phase_end = self.began + DEADLINE_SECONDS

    # plumbing

    def spawn(self, gpu, spec):
        return TeeHandle(self.backend.spawn(gpu, spec), self.worker_lines)

    def child(self, kind: str, options: list[str]) -> Child:
        child = self.backend.child(kind, options)
        self.children.append(child)
        return child

    def tick(self) -> None:
        now = time.monotonic()
        if now - self.last_tick >= self.args.poll:
            self.ka.tick(now, {})
            self.last_tick = now

    def idle(self) -> None:
        """Between two looks at something: tick as the daemon would, keep to the budgets."""
        self.tick()
        if time.monotonic() > self.phase_end:
            raise CutShort("out of time")
        time.sleep(0.01)

    def slot(self):
        return self.ka.slots[0]

    def worker_tail(self, count: int = 20) -> list[str]:
        return [line for _, line in self.worker_lines[-count:]]

    def run_phase(self, name: str, budget: float, step: Callable[[], object]) -> None:
        left = self.began + self.args.deadline - time.monotonic()
        if left <= 1:
            raise CutShort(f"out of time before {name}")
        self.phase_end = time.monotonic() + min(budget, left)
        LOG.info("bench: %s (budget %.0f s)", name, min(budget, left))
        began = time.monotonic()
        try:
            step()
        finally:
            self.report["phases"][name] = round(time.monotonic() - began, 1)
            self.write()

    def wait_holding(self) -> float:
        """Until the worker holds the GPU; a crash loop or a GPU that keep-alive will not take
        stops the run."""
        began = time.monotonic()
        crashes, said = self.slot().crashes, ""
        while True:
            fields = self.ka.gpu_fields()
            state, reason = fields["gpu.0.state"], fields["gpu.0.reason"]
            if state == "holding":
                return time.monotonic() - began
            if self.slot().crashes - crashes >= CRASHES_TO_STOP:
                raise CutShort(f"the worker crashes: {reason}; its last lines: "
                               f"{self.worker_tail()}")
            if state == "off" and ("compute mode" in reason or "no room" in reason):
                raise CutShort(f"keep-alive does not take the GPU: {reason}")
            if state == "yielded" and self.slot().foreign_at is not None \
                    and "hold-off" not in reason and reason != said:
                LOG.info("bench: the GPU shows foreign work (%s)", reason)
                said = reason
            self.idle()

    # 1. preflight

    def preflight(self) -> None:
        facts = self.backend.facts()
        self.report["gpu_facts"] = facts
        used, total = self.backend.memory()
        facts["memory_used_mib"], facts["memory_total_mib"] = used // MIB, total // MIB
        samples = self.backend.raw_samples(0)
        stamps = sorted(t for t, _ in samples)
        gaps = [(b - a) / 1e6 for a, b in zip(stamps, stamps[1:]) if b > a]
        self.report["nvml_samples"] = {
            "count": len(samples), "period_s": statistics.median(gaps) if gaps else None,
            "first_timestamps_us": stamps[:12]}
        child = self.child("preflight", [])
        records = child.finish(min(45.0, self.phase_end - time.monotonic()), self.idle)
        self.report["torch_facts"] = records[-1] if records else None
        problems = []
        if facts.get("compute_mode") not in (None, 0):
            problems.append(f"compute mode {facts['compute_mode']} is not DEFAULT")
        if facts.get("mig"):
            problems.append("the GPU is in MIG mode")
        if facts.get("processes"):
            problems.append(f"the GPU is not idle: {facts['processes']} process(es) on it")
        if used > pm.KEEPALIVE_IDLE_MEMORY_MIB * MIB:
            problems.append(f"the GPU is not idle: {used // MIB} MiB used")
        torch_facts = self.report["torch_facts"] or {}
        if not torch_facts.get("matmul_ok"):
            problems.append(f"no fp16 matmul on the device: {torch_facts}")
        if problems:
            raise CutShort("preflight: " + "; ".join(problems))

    # 2. alone

    def alone(self) -> None:
        used, total = self.backend.memory()
        self.report["free_before_daemon_mib"] = (total - used) // MIB
        self.report["task_alone"] = self.run_task(release=False)
        probe = self.child("probe", self.probe_options())
        probe.ready(CHILD_READY_SECONDS, self.idle)
        probe.go()
        self.report["probe_alone"] = probe_figures(probe.finish(30, self.idle)[-1])

    def probe_options(self) -> list[str]:
        return ["--n", str(self.args.probe_n), "--batch", str(PROBE_BATCH),
                "--seconds", str(self.args.probe_seconds),
                "--job-gib", f"{PROBE_JOB_SHARE * self.backend.gpu.memory_total / GIB:.2f}"]

    def run_task(self, release: bool) -> dict:
        task = self.child("task", [])
        task.ready(CHILD_READY_SECONDS, self.idle)
        t_claim = time.time()
        if release:
            self.ka.release([0])
            while not self.ka.released([0]):
                self.idle()
        t_released = time.time()
        task.go()
        record = task.finish(60, self.idle)[-1]
        return {"release_s": t_released - t_claim, "allocated_mib": record["allocated"] // MIB,
                "allocate_s": record["t_done"] - record["t_go"]}

    # 3. hold

    def hold(self) -> None:
        self.ka.start()
        self.report["time_to_hold_s"] = self.wait_holding()
        worker = self.slot().worker
        self.report["worker"] = {"tile": worker.tile, "tile_ms": worker.tile_ms,
                                 "held_mib": worker.held_mib, "context_mib": worker.context_mib,
                                 "memory_used_mib": self.backend.memory()[0] // MIB}
        settle = time.monotonic() + self.args.settle
        while time.monotonic() < settle:
            self.idle()

    # 4. band

    def band(self) -> None:
        """The self-test's own measurement of the band (``perpetual_motion._self_test_band``:
        one code path for the check a user runs and this benchmark), with NVML's raw samples
        gathered once a second beside it and the CPU split into this process and the
        worker's."""
        pid = self.slot().worker.handle.pid
        raw_pairs: list[list] = []  # NVML's own samples
        gathered = {"us": int(time.time() * 1e6), "next": time.monotonic() + 1.0}

        def gather() -> None:
            fresh = [[t, v] for t, v in self.backend.raw_samples(gathered["us"])
                     if t > gathered["us"]]
            raw_pairs.extend(fresh)
            gathered["us"] = max([gathered["us"]] + [t for t, _ in fresh])

        def sleep(seconds: float) -> None:  # asleep between ticks: the CPU counts
            time.sleep(seconds)
            if time.monotonic() >= gathered["next"]:
                gather()
                gathered["next"] += 1.0

        rig = pm.SelfTestRig(self.backend.nvml, self.spawn, probe=None, hide=None,
                             clock=self.backend.clock, sleep=sleep,
                             cpu=self.backend.cpu_seconds)
        cpu0 = (self.backend.cpu_seconds(), self.backend.cpu_seconds(pid), time.monotonic())
        try:
            figures = pm._self_test_band(rig, self.ka, self.slot(), self.args.band_seconds)
        except pm.CannotTest as exc:
            raise CutShort(str(exc)) from exc
        wall = time.monotonic() - cpu0[2]
        cpu1 = (self.backend.cpu_seconds(), self.backend.cpu_seconds(pid))
        gather()
        raw = [v for _, v in raw_pairs]
        lo, hi = pm.GPU_UTIL_TARGET, pm.GPU_UTIL_HIGH

        def cpu(i):
            done = None in (cpu0[i], cpu1[i])
            return None if done else 100 * (cpu1[i] - cpu0[i]) / wall

        self.report["band"] = {
            "seconds": self.args.band_seconds, "readings_1s": figures["readings_1s"],
            "share_in_band_1s": figures["band_share_1s"], "mean": figures["band_mean_1s"],
            "share_in_band_engine": figures["band_share"],
            "raw_samples": len(raw),
            "share_in_band_raw": sum(lo <= v <= hi for v in raw) / len(raw) if raw else None,
            "raw_samples_us_value": raw_pairs,
            "raw_min": min(raw, default=None), "raw_max": max(raw, default=None),
            "duty_at_end": self.ka.gpu_fields()["gpu.0.duty"],
            "history": self.ka.gpu_fields()["gpu.0.history"],
            "cpu_daemon_percent_of_core": cpu(0), "cpu_worker_percent_of_core": cpu(1),
        }

    # 5. yields

    def yields(self) -> None:
        results = self.report["yields"] = []
        runs = [False] * self.args.yields + [True] * self.args.hidden_yields
        for hidden in runs:
            if hidden and not self.backend.hidden:
                self.backend.set_hidden(True)
                if self.slot().worker is not None:  # started with the list: a new one
                    self.ka.release([0])
                    while not self.ka.released([0]):
                        self.idle()
                    self.ka.task_finished([0])
            probe = self.child("probe", self.probe_options())  # it imports torch meanwhile
            self.wait_holding()
            probe.ready(CHILD_READY_SECONDS, self.idle)
            if self.slot().worker is None or self.slot().worker.stop_at is not None:
                self.wait_holding()
            results.append(self.yield_once(probe, hidden))
            self.write()
        self.backend.set_hidden(False)

    def yield_once(self, probe: Child, hidden: bool) -> dict:
        worker = self.slot().worker
        footprint = worker.footprint
        used_before, _ = self.backend.memory()
        exit_lines = len(self.worker_lines)
        watcher = Watcher(self.backend)
        try:
            probe.go()
            record = probe.finish(self.args.probe_seconds + 30, self.idle)[-1]
        finally:
            watcher.stop()
        exit_t = None
        for _, line in self.worker_lines[exit_lines:]:
            verb, fields = pm.parse_message(line)
            if verb == "exit" and "t" in fields:
                exit_t = float(fields["t"])
        freed = memory_freed_at(watcher.readings, record, used_before, footprint)
        base = record["t_first_alloc"]

        def since(t):
            return None if t is None else round(t - base, 4)

        figures = probe_figures(record, self.report.get("probe_alone"))
        return {
            "hidden": hidden, "worker_footprint_mib": footprint // MIB,
            "worker_left_s": since(exit_t), "memory_freed_s": since(freed),
            "job_memory_s": since(record["t_job_memory"]),
            "job_failures": record["job_failures"],
            "probe_context_s": round(record["t_context"] - record["t_go"], 4),
            "reason": self.slot().foreign_reason, **figures,
        }

    # 6. queue task

    def queue_task(self) -> None:
        self.wait_holding()
        task = self.run_task(release=True)
        alone = self.report.get("task_alone") or {}
        free = self.report.get("free_before_daemon_mib")
        task["share_of_free_before_daemon"] = task["allocated_mib"] / free if free else None
        if alone.get("allocated_mib"):
            task["share_of_task_alone"] = task["allocated_mib"] / alone["allocated_mib"]
        self.report["queue_task"] = task
        self.ka.task_finished([0])

    # the whole plan

    def run(self, preflight_only: bool = False) -> None:
        steps = {"preflight": self.preflight, "alone": self.alone, "hold": self.hold,
                 "band": self.band, "yields": self.yields, "queue task": self.queue_task}
        for name, budget in PLAN:
            self.run_phase(name, budget, steps[name])
            if preflight_only:
                return

    def close(self) -> None:
        for child in self.children:
            child.kill()
        try:
            self.ka.stop()
        finally:
            self.report["worker_lines"] = self.worker_tail(40)
            self.report["worker_log"] = [[round(t, 3), line] for t, line in self.worker_lines]


def probe_figures(record: dict, alone: dict | None = None) -> dict:
    """Throughput of a probe from its batch timestamps: products per second in its first
    second of work and once settled, and (against ``alone``) when it reached 99% of its speed
    alone, counted from its first allocation."""
    per_batch = record["batch"]
    batches = record["batches"]
    start = record["t_work"]
    first = per_batch * sum(1 for t in batches if t <= start + 1.0) / 1.0
    late = [t for t in batches if t > start + 1.0]
    steady = per_batch * (len(late) - 1) / (late[-1] - late[0]) if len(late) > 2 else None
    out = {"first_second_per_s": first, "steady_per_s": steady}
    if alone:
        reference = alone.get("steady_per_s")
        out["first_second_of_alone"] = first / alone["first_second_per_s"] \
            if alone.get("first_second_per_s") else None
        out["reached_99_percent_s"] = None
        if reference:
            window = 0.25  # the speed over the batches of the last quarter second
            for i, t in enumerate(batches):
                earlier = [u for u in batches[:i + 1] if u > t - window]
                if t - start < window or len(earlier) < 3:
                    continue
                if per_batch * (len(earlier) - 1) / (t - earlier[0]) >= 0.99 * reference:
                    out["reached_99_percent_s"] = round(t - record["t_first_alloc"], 4)
                    break
    return out


def memory_freed_at(readings: list, record: dict, used_before: int,
                    footprint: int) -> float | None:
    """When our worker's memory was gone, from the watcher's readings: memory used, less
    what the probe had allocated by then and its context (at most _CONTEXT_MAX_MIB), at most
    what was used before less 80% of our worker's footprint."""
    allocations = sorted(record.get("allocations", []))
    for t, used, _ in readings:
        if t < record["t_go"]:
            continue
        probe = sum(size for when, size in allocations if when <= t)
        if used - probe - pm._CONTEXT_MAX_MIB * MIB <= used_before - 0.8 * footprint:
            return t
    return None


# The report #################################################################################


def summary(report: dict) -> dict:
    """The figures the targets are set for, each with its target and whether it was met."""
    band = report.get("band") or {}
    yields = report.get("yields") or []
    task = report.get("queue_task") or {}

    def of_runs(key, hidden, pick=statistics.median):
        values = [y.get(key) for y in yields if y.get("hidden") == hidden]
        values = [v for v in values if v is not None]
        return pick(values) if values else None

    cpu = None
    if band.get("cpu_daemon_percent_of_core") is not None and \
            band.get("cpu_worker_percent_of_core") is not None:
        cpu = band["cpu_daemon_percent_of_core"] + band["cpu_worker_percent_of_core"]
    values = {
        "band_share_1s": band.get("share_in_band_1s"),
        "band_mean": band.get("mean"),
        "memory_freed_listed_s": of_runs("memory_freed_s", False),
        "memory_freed_hidden_s": of_runs("memory_freed_s", True),
        # the job's speed: the worst run of each kind, since a job meets one run, not a median
        "probe_first_second_of_alone_listed": of_runs("first_second_of_alone", False, min),
        "probe_first_second_of_alone_hidden": of_runs("first_second_of_alone", True, min),
        "probe_99_percent_after_listed_s": of_runs("reached_99_percent_s", False, max),
        "probe_99_percent_after_hidden_s": of_runs("reached_99_percent_s", True, max),
        "task_share_of_free_before_daemon": task.get("share_of_free_before_daemon"),
        "cpu_percent_of_core_per_gpu": cpu,
    }
    out = {}
    for name, (target, check) in TARGETS.items():
        value = values[name]
        out[name] = {"value": value, "target": target,
                     "met": None if value is None else bool(check(value))}
    return out


REPORT_KEYS = ("bench", "version", "date", "gpu", "gpu_memory_mib", "machine", "settings",
               "phases", "summary", "outcome")


def check_report(report: dict) -> list[str]:
    """What is missing or malformed in a report (empty: it is well formed)."""
    problems = [f"missing {key}" for key in REPORT_KEYS if key not in report]
    for name, figure in (report.get("summary") or {}).items():
        if set(figure) != {"value", "target", "met"}:
            problems.append(f"summary.{name} has keys {sorted(figure)}")
    if set(report.get("summary") or {}) != set(TARGETS):
        problems.append("summary does not name every target")
    outcome = report.get("outcome") or {}
    if outcome.get("status") not in ("done", "cut short", "cannot run"):
        problems.append(f"outcome.status is {outcome.get('status')!r}")
    for i, run in enumerate(report.get("yields") or []):
        for key in ("hidden", "memory_freed_s", "job_memory_s", "first_second_of_alone",
                    "reached_99_percent_s", "worker_left_s"):
            if key not in run:
                problems.append(f"yields[{i}] lacks {key}")
    return problems


def output_path(args, gpu_name: str, date: str) -> Path | None:
    if args.out:
        return Path(args.out)
    if args.out_dir:
        slug = "".join(c if c.isalnum() else "-" for c in gpu_name).strip("-")
        slug = "-".join(part for part in slug.split("-") if part)
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        return Path(args.out_dir) / f"keepalive-{slug}-{date[:10]}.json"
    return None


def new_report(args, gpu: pm.GpuInfo) -> dict:
    return {
        "bench": "keepalive", "version": pm.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": gpu.name, "gpu_memory_mib": gpu.memory_total // MIB,
        "machine": f"{platform.node()}, {os.cpu_count()} cores, Python "
                   f"{platform.python_version()}",
        "settings": {"poll_s": args.poll, "holdoff_s": args.holdoff,
                     "period_s": pm.KEEPALIVE_PERIOD, "tile_ms_target": pm.KEEPALIVE_TILE_MS,
                     "watch_s": pm._WATCH_SECONDS, "band": [pm.GPU_UTIL_TARGET, pm.GPU_UTIL_HIGH],
                     "memory_target": pm.MEMORY_USAGE_TARGET, "deadline_s": args.deadline,
                     "seed_n": pm.seed_matrix_size(gpu.memory_total)},
        "phases": {},
    }


def measure(args, backend) -> tuple[dict, int]:
    """Run the plan on ``backend``; the report and the exit status."""
    target = pm.MEMORY_USAGE_TARGET
    if args.memory_target is not None:  # what the engine's workers hold, for this run
        pm.MEMORY_USAGE_TARGET = args.memory_target
    try:
        return _measure(args, backend)
    finally:
        pm.MEMORY_USAGE_TARGET = target


def _measure(args, backend) -> tuple[dict, int]:
    report = new_report(args, backend.gpu)
    out = output_path(args, backend.gpu.name, report["date"])

    def write() -> None:
        report["summary"] = summary(report)
        if out is not None:  # atomically: a run cut short keeps its last whole report
            staged = out.with_name(f".{out.name}.tmp")
            staged.write_text(json.dumps(report, indent=2) + "\n")
            os.replace(staged, out)

    bench = Bench(args, backend, report, write)
    status, why = "done", ""
    try:
        bench.run(preflight_only=args.preflight_only)
    except CutShort as exc:
        status, why = ("cannot run" if "preflight" in str(exc) else "cut short"), str(exc)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - recorded, children killed
        LOG.exception("bench: stopped by an error")
        status, why = "cut short", f"{type(exc).__name__}: {exc}"
    finally:
        bench.close()
    report["outcome"] = {"status": status, "why": why,
                         "seconds": round(time.monotonic() - bench.began, 1)}
    write()
    if out is not None:
        LOG.info("bench: written to %s", out)
    code = {"done": 0, "cannot run": EXIT_CANNOT_RUN, "cut short": EXIT_CUT_SHORT}[status]
    return report, code


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", type=int, default=0, help="NVML index of the GPU (default 0)")
    parser.add_argument("--band-seconds", type=int, default=60)
    parser.add_argument("--settle", type=float, default=10.0, help="s held before the band")
    parser.add_argument("--yields", type=int, default=2, help="probes with the process list")
    parser.add_argument("--hidden-yields", type=int, default=2,
                        help="probes with the process list hidden from keep-alive")
    parser.add_argument("--holdoff", type=float, default=8.0,
                        help="hold-off for this run (the daemon's is KEEPALIVE_HOLDOFF_SECONDS)")
    parser.add_argument("--poll", type=float, default=pm.POLL_INTERVAL,
                        help="s between two ticks, as the daemon's poll interval")
    parser.add_argument("--probe-seconds", type=float, default=3.0)
    parser.add_argument("--probe-n", type=int, default=PROBE_N)
    parser.add_argument("--deadline", type=float, default=DEADLINE_SECONDS,
                        help="s the whole plan may take; it stops there, keeping what it has")
    parser.add_argument("--memory-target", type=float,
                        help="share of the GPU's memory a worker holds (default the daemon's "
                             "MEMORY_USAGE_TARGET): a small one tells what the size of what we "
                             "hold costs a job's first second beside a yield")
    parser.add_argument("--preflight-only", action="store_true", help="stop after the preflight")
    parser.add_argument("--out", help="write the JSON to this file too")
    parser.add_argument("--out-dir", help="write it to keepalive-<GPU>-<date>.json here too, "
                                          "and the children's PIDs to children.pids")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=PROBE_N, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=PROBE_BATCH, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=3.0, help=argparse.SUPPRESS)
    parser.add_argument("--job-gib", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("band_seconds", "yields", "hidden_yields", "probe_n"):
        if getattr(args, name) < (1 if name in ("band_seconds", "probe_n") else 0):
            parser.error(f"--{name.replace('_', '-')} is too small")
    if not (args.poll > 0 and args.deadline > 0 and args.holdoff >= 0):
        parser.error("--poll and --deadline must be positive, --holdoff not negative")
    if args.memory_target is not None and not 0 < args.memory_target <= pm.MEMORY_USAGE_TARGET:
        parser.error(f"--memory-target is a share above 0 and at most "
                     f"{pm.MEMORY_USAGE_TARGET} (MEMORY_USAGE_TARGET)")
    return args


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM (``timeout``): stop where we are; ``measure`` kills the children and writes."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.child:
        return CHILDREN[args.child](args)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s [%(levelname)s] %(message)s")
    signal.signal(signal.SIGTERM, _terminated)
    pids = Path(args.out_dir) / "children.pids" if args.out_dir else None
    if pids is not None:
        pids.parent.mkdir(parents=True, exist_ok=True)
    try:
        backend = GpuBackend(args.gpu, pids)
    except CutShort as exc:
        print(f"keepalive_bench: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    try:
        report, code = measure(args, backend)
    finally:
        backend.close()
    print(json.dumps(report, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

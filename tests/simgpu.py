"""A simulated node of GPUs behind keep-alive's seams, in simulated time.

``SimNode`` plays NVML (``node.nvml``: the methods of ``perpetual_motion.Nvml``), the worker
processes (``node.spawn``: fake ``WorkerHandle``s) and the clock (``node.time``/``node.sleep``).
Everything is a function of the simulated time: foreign processes and memory are scripted with
start and end times, a worker's memory, process entry and busy share follow from when it was
started, stopped or killed. Named scenarios (gpustat's way) build the usual nodes.
"""

from __future__ import annotations

import dataclasses
import math
import random

import perpetual_motion as pm

MIB = pm.MIB
GIB = pm.GIB
INF = math.inf


@dataclasses.dataclass
class SimProcess:
    """A process that is not ours: on the GPU from ``start`` to ``end``."""

    pid: int
    start: float
    end: float = INF
    memory: int = 2 * GIB
    util: float = 60.0  # % of the GPU's time it keeps a kernel running
    listed: bool = True  # False: invisible to the process list (another container, say)
    sampled: bool = True  # False: invisible to the per-process utilisation samples too

    def alive(self, t: float) -> bool:
        return self.start <= t < self.end


class SimGpu:
    def __init__(self, node: SimNode, index: int, total_gib: float = 80, mig: bool = False,
                 name: str = "Simulated H100") -> None:
        self.node = node
        self.info = pm.GpuInfo(index, f"GPU-sim-{index:04d}-0000", name, int(total_gib * GIB),
                               mig)
        self.reserved = 500 * MIB  # the driver's own share of "used"
        self.foreign: list[SimProcess] = []
        self.hidden: list[tuple[float, float, int]] = []  # (start, end, bytes) of unlisted memory
        self.workers: list[FakeWorker] = []
        self.gain = 1.0  # util = gain x our busy share + offset, then combined with others'
        self.offset = 0.0
        self.noise = 4.0  # standard deviation of one NVML sample, in points
        self.failing: tuple[float, float] | None = None  # NVML fails in [start, end)
        self.sample_t = node.now
        self.samples: list[tuple[float, float]] = []
        self.read_upto = -INF

    def nvml_ok(self) -> bool:
        return self.failing is None or not (self.failing[0] <= self.node.now < self.failing[1])

    def used(self, t: float) -> int:
        used = self.reserved
        used += sum(p.memory for p in self.foreign if p.alive(t))
        used += sum(size for start, end, size in self.hidden if start <= t < end)
        used += sum(w.memory(t) for w in self.workers)
        return min(used, self.info.memory_total)

    def util(self, t: float) -> float:
        ours = sum(w.busy(t) for w in self.workers)
        ours = min(1.0, max(0.0, self.gain * ours + self.offset / 100 * (ours > 0)))
        idle = 1.0 - ours
        for p in self.foreign:
            if p.alive(t):
                idle *= 1.0 - p.util / 100
        value = 100 * (1 - idle) + self.node.rng.gauss(0, self.noise)
        return float(round(min(100.0, max(0.0, value))))

    def generate(self) -> None:
        while self.sample_t + self.node.sample_period <= self.node.now + 1e-9:
            self.sample_t += self.node.sample_period
            self.samples.append((self.sample_t * 1e6, self.util(self.sample_t)))


class SimNvml:
    """The NVML seam of a simulated node (``perpetual_motion.Nvml``'s methods)."""

    def __init__(self, node: SimNode) -> None:
        self.node = node
        self.calls = 0

    def _gpu(self, info: pm.GpuInfo) -> SimGpu | None:
        self.calls += 1
        gpu = self.node.gpus[info.index]
        return gpu if gpu.nvml_ok() else None

    def gpus(self) -> list[pm.GpuInfo]:
        return [g.info for g in self.node.gpus]

    def memory(self, info):
        gpu = self._gpu(info)
        if gpu is None:
            return None
        return gpu.used(self.node.now), gpu.info.memory_total

    def util_samples(self, info):
        gpu = self._gpu(info)
        if gpu is None:
            return None
        gpu.generate()
        fresh = [s for s in gpu.samples if s[0] > gpu.read_upto]
        if fresh:
            gpu.read_upto = fresh[-1][0]
        return fresh

    def compute_processes(self, info):
        gpu = self._gpu(info)
        if gpu is None:
            return None
        t = self.node.now
        found = [pm.GpuProcess(p.pid, p.memory) for p in gpu.foreign if p.alive(t) and p.listed]
        found += [pm.GpuProcess(w.pid, w.memory(t)) for w in gpu.workers if w.listed(t)]
        return found

    def process_util(self, info):
        gpu = self._gpu(info)
        if gpu is None:
            return None
        t = self.node.now
        found = [(p.pid, int(p.util)) for p in gpu.foreign if p.alive(t) and p.sampled]
        found += [(w.pid, int(100 * w.busy(t))) for w in gpu.workers if w.listed(t)]
        return found


class FakeWorker:
    """A worker process as the engine sees it (``WorkerHandle``), on a simulated GPU."""

    context_delay = 0.2  # s from start to its entry in the process list
    alloc_delay = 0.5  # s from start to its memory being taken
    ready_delay = 1.0  # s from start to its ``ready`` report
    stop_delay = 0.03  # s from "stop" to its exit (about two tiles)
    free_delay = 0.02  # s from its exit to its memory and process entry being gone

    def __init__(self, node: SimNode, gpu: SimGpu, spec: pm.WorkerSpec, pid: int) -> None:
        self.node = node
        self.gpu = gpu
        self.spec = spec
        self.pid = pid
        self.started = node.now
        self.duties: list[tuple[float, float]] = [(self.ready_at, spec.duty)]
        self.stop_at: float | None = None
        self.kill_at: float | None = None
        self.crash_at: float | None = None
        self.crash_code = 1
        self.stuck = False  # ignores "stop"
        self.status_lost = False  # another waitpid() took its exit status: it reads 0
        self.watch = node.worker_watch and spec.mode is pm.WorkerMode.HOLD
        self.sent: list[tuple[float, str]] = []
        self.delivered: set[str] = set()
        self.next_stats = self.ready_at + 1.0

    @property
    def ready_at(self) -> float:
        return self.started + self.ready_delay

    def watch_exit(self) -> float:
        """When the worker's own check would see a foreign process (every period)."""
        if not self.watch:
            return INF
        period = pm.KEEPALIVE_PERIOD
        best = INF
        for p in self.gpu.foreign:
            if not p.listed:
                continue
            seen = max(p.start, self.ready_at)
            if seen >= p.end:
                continue
            k = math.ceil((seen - self.ready_at) / period)
            at = self.ready_at + k * period
            if at < p.end:
                best = min(best, at)
        return best

    def exit_time(self) -> tuple[float, int]:
        options = [(INF, 0)]
        if self.stop_at is not None and not self.stuck:
            options.append((self.stop_at + self.stop_delay, 0))
        if self.kill_at is not None:
            options.append((self.kill_at, -9))
        if self.crash_at is not None:
            options.append((self.crash_at, self.crash_code))
        options.append((self.watch_exit(), pm.EXIT_FOREIGN))
        return min(options)

    def memory(self, t: float) -> int:
        if t < self.started + self.alloc_delay or t >= self.exit_time()[0] + self.free_delay:
            return 0
        return self.spec.memory_mib * MIB + 500 * MIB

    def listed(self, t: float) -> bool:
        return self.started + self.context_delay <= t < self.exit_time()[0] + self.free_delay

    def busy(self, t: float) -> float:
        if t < self.ready_at + pm.KEEPALIVE_PERIOD or t >= self.exit_time()[0]:
            return 0.0
        duty = 0.0
        for when, value in self.duties:
            if when + pm.KEEPALIVE_PERIOD <= t:
                duty = value
        return duty

    # WorkerHandle

    def send(self, line: str) -> bool:
        now = self.node.now
        if now >= self.exit_time()[0]:
            return False
        self.sent.append((now, line))
        verb, _, value = line.partition(" ")
        if verb == "duty":
            self.duties.append((now, float(value)))
        elif verb == "stop" and self.stop_at is None:
            self.stop_at = now
        return True

    def messages(self) -> list[str]:
        now = self.node.now
        out = []
        end, code = self.exit_time()
        if now >= self.ready_at and self.ready_at < end and "ready" not in self.delivered:
            self.delivered.add("ready")
            out.append(f"ready tile=16384 tile_ms=10.00 held_mib={self.spec.memory_mib}")
        while self.next_stats <= min(now, end):
            out.append(f"stats duty={self.duty_now():.3f} busy={self.duty_now():.3f} "
                       "tile_ms=10.00")
            self.next_stats += 1.0
        if now >= end and "exit" not in self.delivered and code == pm.EXIT_FOREIGN:
            self.delivered.add("exit")
            out.append(f"exit reason=foreign-process t={end:.6f}")
        return out

    def duty_now(self) -> float:
        return self.duties[-1][1]

    def exit_code(self) -> int | None:
        end, code = self.exit_time()
        if self.node.now < end:
            return None
        return 0 if self.status_lost else code

    def stop(self) -> None:
        self.send("stop")

    def kill(self) -> None:
        if self.kill_at is None and self.node.now < self.exit_time()[0]:
            self.kill_at = self.node.now


class SimNode:
    """GPUs, clock and worker processes of one simulated node."""

    sample_period = 1 / 6  # s between NVML utilisation samples

    def __init__(self, gpus: int = 1, seed: int = 0, **gpu_options) -> None:
        self.now = 1000.0
        self.rng = random.Random(seed)
        self.gpus = [SimGpu(self, i, **gpu_options) for i in range(gpus)]
        self.nvml = SimNvml(self)
        self.workers: list[FakeWorker] = []
        self.next_pid = 4000
        self.worker_watch = False  # the workers' own fast check for foreign work
        self.spawn_error: Exception | None = None
        self.on_spawn = None  # called with each new FakeWorker (to script crashes)

    # clock seam
    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)

    # worker seam
    def spawn(self, info: pm.GpuInfo, spec: pm.WorkerSpec) -> FakeWorker:
        if self.spawn_error is not None:
            raise self.spawn_error
        gpu = self.gpus[info.index]
        worker = FakeWorker(self, gpu, spec, self.new_pid())
        gpu.workers.append(worker)
        self.workers.append(worker)
        if self.on_spawn is not None:
            self.on_spawn(worker)
        return worker

    def new_pid(self) -> int:
        self.next_pid += 1
        return self.next_pid

    # scripting
    def foreign(self, gpu: int = 0, start: float | None = None, **options) -> SimProcess:
        """A foreign process starting at ``start`` (default: now)."""
        process = SimProcess(self.new_pid(), self.now if start is None else start, **options)
        self.gpus[gpu].foreign.append(process)
        return process

    def workers_on(self, gpu: int = 0) -> list[FakeWorker]:
        return self.gpus[gpu].workers

    def live_workers(self, gpu: int = 0) -> list[FakeWorker]:
        return [w for w in self.gpus[gpu].workers if w.exit_code() is None]


def engine(node: SimNode, log, **options) -> pm.GpuKeepAlive:
    """The real engine on the simulated node."""
    return pm.GpuKeepAlive(node.nvml, node.nvml.gpus(), log, spawn=node.spawn,
                           timefunc=node.time, delayfunc=node.sleep, **options)


def run(node: SimNode, ka: pm.GpuKeepAlive, seconds: float, *, task_running: bool = False,
        poll: float = 0.1, each=None) -> None:
    """Tick the engine every ``poll`` seconds of simulated time."""
    steps = int(round(seconds / poll))
    busy = {i: "task" for i in range(len(ka.slots))} if task_running else {}
    for _ in range(steps):
        node.sleep(poll)
        ka.tick(node.time(), busy)
        if each is not None:
            each()


def release(node: SimNode, ka: pm.GpuKeepAlive, gpus=None, limit: float = 60.0) -> float:
    """Release ``gpus`` (default all) for a queue task, as the daemon does: ask, then look
    every 10 ms until they are free. The simulated seconds it took."""
    gpus = range(len(ka.slots)) if gpus is None else gpus
    begin = node.now
    ka.release(gpus)
    while not ka.released(gpus):
        assert node.now - begin < limit, "release never finished"
        node.sleep(0.01)
    return node.now - begin


def task_finished(ka: pm.GpuKeepAlive, gpus=None) -> None:
    ka.task_finished(range(len(ka.slots)) if gpus is None else gpus)


# Named scenarios


def scenario_idle_gpu(**options) -> SimNode:
    return SimNode(gpus=1, **options)


def scenario_two_idle_gpus(**options) -> SimNode:
    return SimNode(gpus=2, **options)


def scenario_foreign_process_appears(at: float = 30.0, **options) -> SimNode:
    node = SimNode(gpus=1, **options)
    node.foreign(0, start=node.now + at)
    return node


def scenario_foreign_memory_grows(at: float = 30.0, size: int = GIB, **options) -> SimNode:
    node = SimNode(gpus=1, **options)
    node.gpus[0].hidden.append((node.now + at, INF, size))
    return node


def scenario_mig_device(**options) -> SimNode:
    node = SimNode(gpus=2, **options)
    node.gpus[1].info = dataclasses.replace(node.gpus[1].info, mig=True)
    return node


def scenario_failing_one_gpu(start: float = 10.0, length: float = INF, **options) -> SimNode:
    node = SimNode(gpus=2, **options)
    node.gpus[1].failing = (node.now + start, node.now + start + length)
    return node

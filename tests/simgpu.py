"""A simulated node of GPUs behind keep-alive's seams, in simulated time.

``SimNode`` plays NVML (``node.nvml``: the methods of ``perpetual_motion.Nvml``), the worker
processes (``node.spawn``: fake ``WorkerHandle``s) and the clock (``node.time``/``node.sleep``).
Everything is a function of the simulated time: foreign processes and memory are scripted with
start and end times, a worker's memory, process entry and kernels follow from when it was
started, stopped or killed.

Utilisation is sampled as NVML does it: each sample is the share of its window ``[t - w, t]``
in which a kernel ran, computed over the kernels the workers actually run (one busy block of
``duty x period`` at the start of each period, periods a little late now and then, as a real
loop is; the tile on the device when a worker goes runs to its end). ``w`` is the product's
sample period (1/6 s to 1 s): the named scenarios ``scenario_nvml_window`` set it. Foreign
processes keep the GPU busy for ``util`` % of any window, independently of ours; where our
kernels run beside them the GPU time-slices, and ``SimGpu.progress`` gives what a foreign job
got (its first second beside a yield, against alone).

``SimTorch`` plays torch's CUDA side for the worker's own code (``setup_worker``,
``_take_ballast``) on one simulated device, with a pynvml stand-in that reads the same memory.
Named scenarios (gpustat's way) build the usual nodes.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import random
import types

import perpetual_motion as pm

MIB = pm.MIB
GIB = pm.GIB
INF = math.inf
CONTEXT = 500 * MIB  # what a fake worker's CUDA context takes


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
                 name: str = "Simulated H100", compute_mode: int = 0) -> None:
        self.node = node
        self.info = pm.GpuInfo(index, f"GPU-sim-{index:04d}-0000", name, int(total_gib * GIB),
                               mig)
        self.compute_mode = compute_mode
        self.reserved = 500 * MIB  # the driver's own share of "used"
        self.foreign: list[SimProcess] = []
        self.hidden: list[tuple[float, float, int]] = []  # (start, end, bytes) of unlisted memory
        self.workers: list[FakeWorker] = []
        self.gain = 1.0  # util = gain x our busy share + offset, then combined with others'
        self.offset = 0.0
        self.noise = node.noise  # standard deviation of one NVML sample, in points
        self.failing: tuple[float, float] | None = None  # NVML fails in [start, end)
        self.broken: set[str] = set()  # queries that fail alone: samples, rate, memory,
        # processes, putil, compute mode
        self.dry_from = INF  # from then on the sample buffer delivers nothing new
        self.one_pid: int | None = None  # a GPU proxy: every listed process shows as this pid
        self.buffer_seconds = 20.0  # how far back the driver's sample buffer reaches
        self.sample_t = node.now - 30.0  # the driver sampled before the daemon started
        self.samples: list[tuple[float, float]] = []
        self.read_upto = -INF

    def nvml_ok(self) -> bool:
        return self.failing is None or not (self.failing[0] <= self.node.now < self.failing[1])

    def others(self, t: float) -> int:
        """Memory used by everything but our workers."""
        used = self.reserved
        used += sum(p.memory for p in self.foreign if p.alive(t))
        used += sum(size for start, end, size in self.hidden if start <= t < end)
        return used

    def used(self, t: float) -> int:
        used = self.others(t) + sum(w.memory(t) for w in self.workers)
        return min(used, self.info.memory_total)

    def util(self, t: float) -> float:
        """One NVML sample taken at ``t``: the busy share of ``[t - window, t]``."""
        window = self.node.sample_period
        ours = min(1.0, sum(w.busy_share(t - window, t) for w in self.workers))
        ours = min(1.0, max(0.0, self.gain * ours + self.offset / 100 * (ours > 0)))
        idle = 1.0 - ours
        for p in self.foreign:
            if p.alive(t):
                idle *= 1.0 - p.util / 100
        value = 100 * (1 - idle) + self.node.rng.gauss(0, self.noise)
        return float(round(min(100.0, max(0.0, value))))

    def progress(self, process: SimProcess, a: float, b: float, step: float = 0.001) -> float:
        """GPU seconds a foreign ``process`` got in ``[a, b]``: its ``util`` share of the
        time, halved where our kernels ran beside it (the GPU time-slices between contexts,
        each getting half while both have work)."""
        got = 0.0
        t = max(a, process.start)
        end = min(b, process.end)
        while t < end:
            dt = min(step, end - t)
            ours = min(1.0, sum(w.busy_share(t, t + dt) for w in self.workers))
            got += process.util / 100 * dt * (1.0 - ours / 2)
            t += dt
        return got

    def generate(self) -> None:
        while self.sample_t + self.node.sample_period <= self.node.now + 1e-9:
            self.sample_t += self.node.sample_period
            self.samples.append((self.sample_t * 1e6, self.util(self.sample_t)))

    def buffered(self) -> list[tuple[float, float]]:
        """The driver's sample buffer: the last ``buffer_seconds`` of samples (none taken
        after ``dry_from``: a buffer that stopped delivering)."""
        self.generate()
        since = (self.node.now - self.buffer_seconds) * 1e6
        return [s for s in self.samples if since < s[0] <= self.dry_from * 1e6]


class SimNvml:
    """The NVML seam of a simulated node (``perpetual_motion.Nvml``'s methods)."""

    def __init__(self, node: SimNode) -> None:
        self.node = node
        self.calls = 0

    def _gpu(self, info: pm.GpuInfo, query: str = "") -> SimGpu | None:
        self.calls += 1
        gpu = self.node.gpus[info.index]
        return gpu if gpu.nvml_ok() and query not in gpu.broken else None

    def gpus(self) -> list[pm.GpuInfo]:
        return [g.info for g in self.node.gpus]

    def memory(self, info):
        gpu = self._gpu(info, "memory")
        if gpu is None:
            return None
        return gpu.used(self.node.now), gpu.info.memory_total

    def util_samples(self, info):
        gpu = self._gpu(info, "samples")
        if gpu is None:
            return None
        fresh = [s for s in gpu.buffered() if s[0] > gpu.read_upto]
        if fresh:
            gpu.read_upto = fresh[-1][0]
        return fresh

    def util_rate(self, info):
        """NVML's rate: the utilisation of the last sample period, stamped now."""
        gpu = self._gpu(info, "rate")
        if gpu is None:
            return None
        return self.node.now * 1e6, gpu.util(self.node.now)

    def compute_processes(self, info):
        gpu = self._gpu(info, "processes")
        if gpu is None:
            return None
        if self.node.hide_processes:
            return []
        t = self.node.now
        found = [pm.GpuProcess(p.pid, p.memory) for p in gpu.foreign if p.alive(t) and p.listed]
        found += [pm.GpuProcess(w.pid, w.memory(t)) for w in gpu.workers if w.listed(t)]
        if gpu.one_pid is not None and found:  # a proxy: one host process for them all
            return [pm.GpuProcess(gpu.one_pid, sum(p.memory_used or 0 for p in found))]
        return found

    def process_util(self, info):
        gpu = self._gpu(info, "putil")
        if gpu is None:
            return None
        if self.node.hide_processes:
            return []
        t = self.node.now
        window = self.node.sample_period
        found = [(p.pid, int(p.util)) for p in gpu.foreign if p.alive(t) and p.sampled]
        found += [(w.pid, int(100 * w.busy_share(t - window, t)))
                  for w in gpu.workers if w.listed(t)]
        return found

    def compute_mode(self, info):
        gpu = self._gpu(info, "compute mode")
        return None if gpu is None else gpu.compute_mode


class FakeWorker:
    """A worker process as the engine sees it (``WorkerHandle``), on a simulated GPU."""

    context_delay = 0.2  # s from start to its entry in the process list
    alloc_delay = 0.5  # s from start to its memory being taken
    ready_delay = 1.0  # s from start to its ``ready`` report
    stop_delay = 0.03  # s from "stop" to its exit (about two tiles)
    free_delay = 0.02  # s from its exit to its memory and process entry being gone
    drain = pm.KEEPALIVE_TILE_MS / 1000  # s a tile already on the device runs past the exit
    period_jitter = 0.001  # s a period may end late (the loop's own time, the scheduler)

    def __init__(self, node: SimNode, gpu: SimGpu, spec: pm.WorkerSpec, pid: int) -> None:
        self.node = node
        self.gpu = gpu
        self.spec = spec
        self.pid = pid
        self.started = node.now
        self.period = pm.KEEPALIVE_PERIOD
        self.watch_every = getattr(pm, "_WATCH_SECONDS", pm.KEEPALIVE_PERIOD)
        self.rng = random.Random(pid)
        self.duties: list[tuple[float, float]] = [(self.ready_at, spec.duty)]
        self.starts: list[float] = []  # start of each period run
        self.period_duty: list[float] = []  # and its duty
        self.stop_at: float | None = None
        self.kill_at: float | None = None
        self.crash_at: float | None = None
        self.silent_at = INF  # from then on it reports nothing (hung), but lives on
        self.hung_at = INF  # from then on it is stuck in a CUDA call: no kernel, no command read,
        # no report
        self.unkillable = False  # SIGKILL does not end it (a process stuck in the driver)
        self.crash_code = 1
        self.stuck = False  # ignores "stop"
        self.status_lost = False  # another waitpid() took its exit status: it reads 0
        self.watch = node.worker_watch and spec.mode is pm.WorkerMode.HOLD
        self.foreign_before = gpu.others(node.now)  # what its watch reads before its context
        self.sent: list[tuple[float, str]] = []
        self.delivered: set[str] = set()
        self.next_stats = self.ready_at + 1.0

    @property
    def ready_at(self) -> float:
        return self.started + self.ready_delay

    # what it does on the GPU

    def watch_exit(self) -> float:
        """When the worker's own check would see foreign work: a listed process or memory
        beyond what was there at its start, looked for every ``watch_every`` from ready on (a
        change during its setup is seen at ready at the latest)."""
        if not self.watch or self.ready_at == INF:
            return INF
        best = INF
        events = [p.start for p in self.gpu.foreign] + [h[0] for h in self.gpu.hidden]
        for start in events:
            k = math.ceil(max(0.0, start - self.ready_at) / self.watch_every - 1e-9)
            at = self.ready_at + k * self.watch_every
            if at < start:  # rounding: the look at the very start comes just after it
                at += self.watch_every
            if at < best and self._sees_foreign(at):
                best = at
        return best

    def _sees_foreign(self, t: float) -> bool:
        if not self.node.hide_processes and any(p.alive(t) and p.listed
                                                 for p in self.gpu.foreign):
            return True
        growth = self.gpu.others(t) - self.foreign_before
        return growth > pm.KEEPALIVE_FOREIGN_MEMORY_MIB * MIB

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
        return self.spec.memory_mib * MIB + CONTEXT

    def listed(self, t: float) -> bool:
        return self.started + self.context_delay <= t < self.exit_time()[0] + self.free_delay

    def _run_periods(self, until: float) -> None:
        """The periods begun before ``until``: each at the end of the last, a little late."""
        if not self.starts:
            if self.ready_at == INF:
                return
            self.starts.append(self.ready_at)
            self.period_duty.append(self.duty_at(self.ready_at))
        while self.starts[-1] < until:
            start = self.starts[-1] + self.period + self.rng.uniform(0, self.period_jitter)
            self.starts.append(start)
            self.period_duty.append(self.duty_at(start))

    def duty_at(self, t: float) -> float:
        """The duty of the last command before ``t`` (a period runs at the duty it began with)."""
        duty = 0.0
        for when, value in self.duties:
            if when <= t:
                duty = value
        return duty

    def busy_share(self, a: float, b: float) -> float:
        """Share of ``[a, b]`` in which its kernels ran (the tile on the device when the
        process went runs to its end: ``drain``)."""
        end = min(b, self.exit_time()[0] + self.drain, self.hung_at)
        if end <= a:
            return 0.0
        self._run_periods(end)
        i = max(0, bisect.bisect_right(self.starts, a) - 1)
        busy = 0.0
        while i < len(self.starts) and self.starts[i] < end:
            start, duty = self.starts[i], self.period_duty[i]
            busy += max(0.0, min(end, start + duty * self.period) - max(a, start))
            i += 1
        return busy / (b - a)

    # WorkerHandle

    def send(self, line: str) -> bool:
        now = self.node.now
        if now >= self.exit_time()[0]:
            return False
        self.sent.append((now, line))
        if now >= self.hung_at:
            return True  # the pipe takes it; the worker never reads it
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
        heard_until = min(now, end, self.silent_at, self.hung_at)
        if heard_until >= self.ready_at and self.ready_at < end and "ready" not in self.delivered:
            self.delivered.add("ready")
            out.append(f"ready tile={getattr(self.spec, 'tile', 0) or 16384} tile_ms=4.00 "
                       f"held_mib={self.spec.memory_mib} context_mib={CONTEXT // MIB}")
        while "ready" in self.delivered and self.next_stats <= heard_until:
            out.append(f"stats duty={self.duty_now():.3f} busy={self.duty_now():.3f} "
                       "tile_ms=4.00")
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
        if self.unkillable:
            return
        if self.kill_at is None and self.node.now < self.exit_time()[0]:
            self.kill_at = self.node.now


class SimNode:
    """GPUs, clock and worker processes of one simulated node."""

    def __init__(self, gpus: int = 1, seed: int = 0, window: float = 1 / 6, noise: float = 4.0,
                 **gpu_options) -> None:
        self.now = 1000.0
        self.rng = random.Random(seed)
        self.sample_period = window  # NVML's sample window, and the time between samples
        self.noise = noise
        self.gpus = [SimGpu(self, i, **gpu_options) for i in range(gpus)]
        self.nvml = SimNvml(self)
        self.workers: list[FakeWorker] = []
        self.next_pid = 4000
        self.worker_watch = False  # the workers' own fast check for foreign work
        self.hide_processes = False  # NVML lists no process (another container's view)
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


# torch's CUDA side, for the worker's own code ################################################


class OutOfMemoryError(RuntimeError):
    pass


class SimTensor:
    def __init__(self, device: SimTorch, n: int, shape: tuple[int, ...], dtype) -> None:
        self.device = device
        self.nbytes = n * dtype.itemsize
        self.shape = shape
        self.dtype = dtype
        device.allocated += self.nbytes

    def numel(self) -> int:
        return self.nbytes // self.dtype.itemsize

    def element_size(self) -> int:
        return self.dtype.itemsize

    def __truediv__(self, other) -> SimTensor:
        return self.device.empty(*self.shape, dtype=self.dtype)

    def __del__(self) -> None:
        self.device.allocated -= self.nbytes


class SimEvent:
    def __init__(self, device: SimTorch) -> None:
        self.device = device
        self.at = 0.0

    def record(self) -> None:
        self.at = self.device.gpu_time

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: SimEvent) -> float:
        return (end.at - self.at) * 1000


class SimTorch:
    """Just enough of torch for the worker's setup on one simulated device of ``total``
    bytes: a caching allocator (``memory_reserved``, ``empty_cache``), the per-process cap,
    live free memory, fp16 matmuls at ``flops``, timed by events. ``others()`` is what the
    rest of the GPU uses (the driver's share, other jobs), and may change between calls."""

    float16 = types.SimpleNamespace(itemsize=2)
    float32 = types.SimpleNamespace(itemsize=4)
    uint8 = types.SimpleNamespace(itemsize=1)

    def __init__(self, total: int = 80 * GIB, others=lambda: 500 * MIB, flops: float = 700e12,
                 context: int = CONTEXT) -> None:
        self.total = total
        self.others = others
        self.flops = flops
        self.context = context
        self.context_on = False
        self.allocated = 0
        self.reserved = 0
        self.limit: int | None = None
        self.gpu_time = 0.0
        self.allocations: list[tuple[int, int]] = []  # (bytes, free before)
        self.cuda = types.SimpleNamespace(
            is_available=lambda: True, mem_get_info=self.mem_get_info,
            memory_reserved=lambda: self.reserved, empty_cache=self.empty_cache,
            set_per_process_memory_fraction=self.set_fraction,
            OutOfMemoryError=OutOfMemoryError, Event=lambda **_: SimEvent(self))

    def used(self) -> int:
        """What NVML shows used on the device."""
        return self.others() + (self.context if self.context_on else 0) + self.reserved

    def mem_get_info(self) -> tuple[int, int]:
        self.context_on = True
        return max(0, self.total - self.used()), self.total

    def empty_cache(self) -> None:
        self.reserved = self.allocated

    def set_fraction(self, fraction: float) -> None:
        self.limit = int(fraction * self.total)

    def empty(self, *shape, dtype=None, device=None) -> SimTensor:
        self.context_on = True
        n = math.prod(shape)
        size = n * dtype.itemsize
        grow = max(0, self.allocated + size - self.reserved)
        free = self.total - self.used()
        if grow > free or (self.limit is not None and self.reserved + grow > self.limit):
            self.empty_cache()
            grow = max(0, self.allocated + size - self.reserved)
            free = self.total - self.used()
            if grow > free or (self.limit is not None and self.reserved + grow > self.limit):
                raise OutOfMemoryError(f"cannot take {size // MIB} MiB")
        self.allocations.append((size, free))
        self.reserved += grow
        return SimTensor(self, n, shape, dtype)

    def randn(self, *shape, device=None, dtype=None) -> SimTensor:
        return self.empty(*shape, dtype=dtype, device=device)

    def empty_like(self, tensor: SimTensor) -> SimTensor:
        return self.empty(*tensor.shape, dtype=tensor.dtype)

    def mm(self, a: SimTensor, b: SimTensor, out: SimTensor) -> SimTensor:
        n = a.shape[0]
        self.gpu_time += 2 * n ** 3 / self.flops
        return out

    def pynvml(self, processes=lambda: [object()], fail=()):
        """A pynvml stand-in that reads this device (for ``_NvmlWatch``). ``fail`` names the
        calls that raise."""
        def check(what):
            if what in fail:
                raise RuntimeError(f"{what} failed")

        def memory(handle):
            check("memory")
            return types.SimpleNamespace(used=self.used(), total=self.total)

        def listed(handle):
            check("processes")
            return processes()

        return types.SimpleNamespace(
            nvmlInit=lambda: None, nvmlDeviceGetHandleByUUID=lambda uuid: 0,
            nvmlDeviceGetMemoryInfo=memory, nvmlDeviceGetComputeRunningProcesses=listed)


# A worker's tiles and commands on a simulated clock ##########################################


class ClockedTiles:
    """Tiles of a fixed length on a simulated clock (what the duty accounting sees): each
    runs on the device from its launch or the end of the one before, whichever is later;
    waiting for one moves the clock to its end if that has not come yet."""

    def __init__(self, clock, seconds):
        self.clock = clock
        self.seconds = seconds
        self.n = 1
        self.estimate = seconds
        self.pending = []
        self.most_in_flight = 0
        self.device_free = 0.0
        self.runs = []  # (start, end) of every tile on the device
        self.waits = 0  # waits that found their tile still running (a wake-up)
        self.launches = 0  # calls that queued tiles (one each: a group)

    @property
    def in_flight(self):
        return sum(count for count, _ in self.pending)

    def launch(self, count=1):
        """``count`` tiles as one group, timed as one."""
        self.launches += 1
        for _ in range(count):
            start = max(self.clock.now, self.device_free)
            self.device_free = start + self.seconds
            self.runs.append((start, self.device_free))
        self.pending.append((count, self.device_free))
        self.most_in_flight = max(self.most_in_flight, self.in_flight)

    def wait_one(self):
        count, end = self.pending.pop(0)
        if end > self.clock.now:
            self.waits += 1
            self.clock.now = end  # the device's time, spent while the worker waits
        return count * self.seconds


class ClockedControl:
    """Commands at simulated times; waiting moves the simulated clock."""

    def __init__(self, clock, script):
        self.clock = clock
        self.script = sorted(script)

    def poll(self, timeout):
        due = [c for t, c in self.script if t <= self.clock.now]
        if due:
            self.script = self.script[len(due):]
            return due
        upcoming = self.script[0][0] if self.script else self.clock.now + timeout
        self.clock.now = min(self.clock.now + timeout, max(self.clock.now, upcoming))
        return []


# The self-test's rig on a simulated node ######################################################


class SimProbe:
    """The self-test's probe on a simulated GPU: ready at once; at ``go`` a process of ours
    with a context and a job's memory comes onto the GPU (listed unless the node hides the
    process list), until ``stop``."""

    def __init__(self, node: SimNode, gpu: pm.GpuInfo, context: int = 600 * MIB) -> None:
        self.node = node
        self.gpu = gpu
        self.context = context
        self.pid = node.new_pid()
        self.out = ["ready"]
        self.process: SimProcess | None = None
        self.stopped = False

    def messages(self) -> list[str]:
        out, self.out = self.out, []
        return out

    def send(self, line: str) -> bool:
        if line == "go" and self.process is None:
            self.process = SimProcess(self.pid, self.node.now, memory=self.context + GIB,
                                      util=60.0)
            self.node.gpus[self.gpu.index].foreign.append(self.process)
            self.out.append(f"context pid={self.pid} t={self.node.now:.6f} "
                            f"mib={self.context // MIB}")
        return True

    def stop(self) -> None:
        self.stopped = True
        if self.process is not None:
            self.process.end = self.node.now

    def exit_code(self) -> int | None:
        return 0 if self.stopped else None

    def kill(self) -> None:
        self.stop()


def self_test_rig(node: SimNode) -> pm.SelfTestRig:
    def hide(on: bool) -> None:
        node.hide_processes = on

    return pm.SelfTestRig(node.nvml, node.spawn, lambda gpu: SimProbe(node, gpu), hide,
                          clock=node.time, sleep=node.sleep)


# Named scenarios ##############################################################################


NVML_WINDOWS = {"window-1/6s": 1 / 6, "window-0.2s": 0.2, "window-1s": 1.0}


def scenario_idle_gpu(**options) -> SimNode:
    return SimNode(gpus=1, **options)


def scenario_nvml_window(name: str, **options) -> SimNode:
    """One idle GPU whose NVML samples cover ``NVML_WINDOWS[name]`` each; samples scatter
    only by what the kernels do (and by a point of rounding)."""
    options.setdefault("noise", 0.5)
    return SimNode(gpus=1, window=NVML_WINDOWS[name], **options)


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


def scenario_other_container_job(at: float = 0.0, size: int = 20 * GIB, util: float = 0.0,
                                 **options) -> SimNode:
    """A job of another container: NVML lists none of its processes and samples none of its
    utilisation per process; only its memory (and the GPU's utilisation) show it. ``at`` 0:
    it was there before the daemon started."""
    node = SimNode(gpus=1, **options)
    start = node.now + at if at > 0 else node.now - 60
    node.foreign(0, start=start, memory=size, util=util, listed=False, sampled=False)
    return node


def scenario_exclusive_process_gpu(**options) -> SimNode:
    """GPU 1 is in EXCLUSIVE_PROCESS compute mode."""
    node = SimNode(gpus=2, **options)
    node.gpus[1].compute_mode = 3
    return node


def scenario_mig_device(**options) -> SimNode:
    node = SimNode(gpus=2, **options)
    node.gpus[1].info = dataclasses.replace(node.gpus[1].info, mig=True)
    return node


def scenario_failing_one_gpu(start: float = 10.0, length: float = INF, **options) -> SimNode:
    node = SimNode(gpus=2, **options)
    node.gpus[1].failing = (node.now + start, node.now + start + length)
    return node

"""The keep-alive benchmark without a GPU: its arguments, its exit where there is no GPU, its
plan and budgets, and the whole plan on a simulated GPU in real time (``SimBackend``), down to
the JSON it writes and the processes it leaves (none)."""

from __future__ import annotations

import _thread
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import keepalive_bench as kb  # noqa: E402
import simgpu as sim  # noqa: E402
from conftest import nvml_works_here  # noqa: E402

import perpetual_motion as pm  # noqa: E402

MIB = pm.MIB
GIB = pm.GIB



# A simulated GPU in real time ###############################################################


class RealTimeNode(sim.SimNode):
    """A simulated node whose clock is the wall clock (so NVML's timestamps and the probes'
    are one time), and whose workers check for foreign work themselves."""

    @property
    def now(self) -> float:
        return time.time()

    @now.setter
    def now(self, value: float) -> None:
        pass  # the wall clock is not set

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))


class SimChild:
    """A child of the benchmark on the simulated GPU. It has a real process behind it (which
    does nothing), so that the tests see that every child is killed."""

    def __init__(self, backend: SimBackend, kind: str, options: list[str]) -> None:
        self.backend = backend
        self.kind = kind
        self.options = kb.parse_args(["--child", kind, *options])
        self.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                     start_new_session=True)
        self.pid = self.proc.pid
        backend.started.append(self.proc)
        self.t_go: float | None = None
        self.process: sim.SimProcess | None = None

    def ready(self, timeout, idle):
        until = time.time() + 0.2  # importing torch
        while time.time() < until:
            idle()
        return {"ready": time.time()}

    def go(self) -> None:
        self.t_go = time.time()
        if self.kind == "probe":  # its context shows 0.1 s later
            self.process = self.backend.node.foreign(0, start=self.t_go + 0.1, memory=500 * MIB,
                                                     util=95)

    def finish(self, timeout, idle):
        gpu = self.backend.node.gpus[0]
        if self.kind == "preflight":
            record = {"torch": "simulated", "cuda_available": True, "matmul_ok": True}
        elif self.kind == "task":
            used = gpu.used(time.time())
            record = {"t_go": self.t_go, "t_done": time.time() + 0.05,
                      "allocated": (gpu.info.memory_total - used) // (64 * MIB) * 64 * MIB}
        else:
            until = self.t_go + 0.1 + self.options.seconds
            while time.time() < until:
                idle()
            record = self.probe_record(gpu)
        self.kill()
        return [record]

    def probe_record(self, gpu: sim.SimGpu) -> dict:
        t_context = self.t_go + 0.1
        t_first = t_context + 0.01
        job = int(self.options.job_gib * GIB)
        gone = max([w.exit_time()[0] + w.free_delay for w in gpu.workers
                    if w.exit_time()[0] < sim.INF] or [t_first])
        t_job = t_first if gpu.used(t_first) + job <= gpu.info.memory_total else gone
        gpu.hidden.append((t_job, time.time(), job))
        batches, t = [], t_first + 0.01
        while t < t_first + 0.01 + self.options.seconds:
            ours = sum(w.busy_share(t - 0.01, t) for w in gpu.workers)
            t += 0.01 / max(0.05, 1.0 - ours)
            batches.append(t)
        self.process.end = time.time()
        return {"t_go": self.t_go, "t_context": t_context, "t_first_alloc": t_first,
                "t_work": t_first + 0.01, "t_job_memory": t_job, "job_bytes": job,
                "job_failures": 0, "allocations": [[t_first, 3 * 8192 ** 2 * 2], [t_job, job]],
                "n": 8192, "batch": self.options.batch, "batches": batches}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class SimBackend:
    """The benchmark's backend on one simulated GPU (``tests/simgpu.py``) in real time."""

    def __init__(self) -> None:
        self.node = RealTimeNode(gpus=1, noise=0.5)
        self.node.worker_watch = True
        self.nvml = self.node.nvml
        self.gpu = self.node.gpus[0].info
        self.clock = self.node.time
        self.hidden = False
        self.started: list[subprocess.Popen] = []

    def spawn(self, gpu, spec):
        return self.node.spawn(gpu, spec)

    def set_hidden(self, hidden: bool) -> None:
        self.hidden = self.node.hide_processes = hidden

    def child(self, kind: str, options: list[str]) -> SimChild:
        return SimChild(self, kind, options)

    def memory(self):
        gpu = self.node.gpus[0]
        return gpu.used(time.time()), gpu.info.memory_total

    def process_count(self) -> int:
        gpu, t = self.node.gpus[0], time.time()
        return sum(p.alive(t) for p in gpu.foreign) + sum(w.listed(t) for w in gpu.workers)

    def util_rate(self) -> int:
        samples = self.node.gpus[0].buffered()
        return int(samples[-1][1]) if samples else 0

    def raw_samples(self, since_us: int = 0):
        return [s for s in self.node.gpus[0].buffered() if s[0] > since_us]

    def facts(self) -> dict:
        return {"driver": "simulated", "compute_mode": self.node.gpus[0].compute_mode,
                "mig": False, "processes": self.process_count()}

    def cpu_seconds(self, pid=None):
        return None

    def close(self) -> None:
        pass


def quick_args(tmp_path: Path, *extra: str):
    return kb.parse_args(["--band-seconds", "2", "--settle", "0.5", "--yields", "1",
                          "--hidden-yields", "1", "--holdoff", "1", "--poll", "0.1",
                          "--probe-seconds", "1", "--deadline", "60",
                          "--out-dir", str(tmp_path), *extra])


@pytest.fixture
def quiet():
    logging.getLogger("keepalive-bench").setLevel(logging.WARNING)


def no_child_left(backend: SimBackend) -> bool:
    return all(proc.poll() is not None for proc in backend.started)


# Arguments, no GPU, the plan ################################################################


@pytest.mark.skipif(nvml_works_here(), reason="this machine has an NVIDIA driver")
def test_benchmark_without_a_gpu_says_so_and_exits_2(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "keepalive_bench.py"),
                           "--out-dir", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""
    assert "needs an NVIDIA GPU" in done.stderr


@pytest.mark.parametrize("argv", [["--band-seconds", "0"], ["--yields", "-1"], ["--poll", "0"],
                                  ["--deadline", "-5"], ["--no-such-flag"], ["--gpu", "x"]])
def test_benchmark_refuses_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        kb.parse_args(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_the_plan_fits_in_six_minutes():
    assert [name for name, _ in kb.PLAN] == ["preflight", "alone", "hold", "band", "yields",
                                            "queue task"]
    assert dict(kb.PLAN)["preflight"] <= 25
    assert kb.DEADLINE_SECONDS == sum(budget for _, budget in kb.PLAN) < 360
    assert kb.parse_args([]).deadline == kb.DEADLINE_SECONDS


def test_the_summary_checks_the_targets():
    report = {
        "band": {"share_in_band_1s": 0.97, "mean": 77.0, "cpu_daemon_percent_of_core": 0.5,
                 "cpu_worker_percent_of_core": 1.0},
        "yields": [{"hidden": False, "memory_freed_s": 0.1, "first_second_of_alone": 0.95,
                    "reached_99_percent_s": 0.4},
                   {"hidden": False, "memory_freed_s": 0.3, "first_second_of_alone": 0.85,
                    "reached_99_percent_s": None},
                   {"hidden": True, "memory_freed_s": 1.2, "first_second_of_alone": 0.91,
                    "reached_99_percent_s": 0.6}],
        "queue_task": {"share_of_free_before_daemon": 0.97},
    }
    summary = kb.summary(report)
    assert set(summary) == set(kb.TARGETS)
    assert summary["band_share_1s"]["met"] is True
    assert summary["memory_freed_listed_s"] == {"value": 0.2, "target": "<= 0.25", "met": True}
    assert summary["memory_freed_hidden_s"]["value"] == 1.2
    assert summary["probe_first_second_of_alone_listed"] == {"value": 0.85, "target": ">= 0.90",
                                                              "met": False}
    assert summary["probe_first_second_of_alone_hidden"]["value"] == 0.91
    assert summary["probe_99_percent_after_listed_s"]["value"] == 0.4
    assert summary["probe_99_percent_after_hidden_s"]["value"] == 0.6
    assert summary["task_share_of_free_before_daemon"]["met"] is False
    assert summary["cpu_percent_of_core_per_gpu"]["value"] == 1.5
    assert kb.summary({})["band_share_1s"] == {"value": None, "target": ">= 0.95", "met": None}


def test_probe_figures_from_batch_timestamps():
    alone = {"batch": 4, "t_work": 0.0, "t_first_alloc": 0.0,
             "batches": [0.01 * (i + 1) for i in range(300)]}  # 400 products a second
    figures = kb.probe_figures(alone)
    assert figures["first_second_per_s"] == 400 and abs(figures["steady_per_s"] - 400) < 1
    slow_start = dict(alone, batches=[0.02 * (i + 1) for i in range(25)]
                      + [0.5 + 0.01 * (i + 1) for i in range(250)])  # half speed for 0.5 s
    beside = kb.probe_figures(slow_start, figures)
    assert 0.7 < beside["first_second_of_alone"] < 0.8
    assert 0.7 <= beside["reached_99_percent_s"] <= 0.8


# The whole plan on a simulated GPU ##########################################################


def test_the_whole_plan_on_a_simulated_gpu(tmp_path, quiet):
    backend = SimBackend()
    began = time.monotonic()
    report, code = kb.measure(quick_args(tmp_path), backend)
    assert code == 0, report["outcome"]
    assert time.monotonic() - began < 40
    assert kb.check_report(report) == []
    assert report["outcome"]["status"] == "done"
    assert list(report["phases"]) == [name for name, _ in kb.PLAN]
    assert [y["hidden"] for y in report["yields"]] == [False, True]
    listed, hidden = report["yields"]
    assert "foreign process" in listed["reason"] and "foreign" in hidden["reason"]
    assert listed["memory_freed_s"] is not None and listed["memory_freed_s"] < 0.5
    assert hidden["memory_freed_s"] is not None
    assert report["band"]["share_in_band_1s"] is not None
    assert report["nvml_samples"]["period_s"] == pytest.approx(1 / 6, abs=0.01)
    assert report["queue_task"]["share_of_free_before_daemon"] > 0.9
    written = json.loads(next(tmp_path.glob("keepalive-*.json")).read_text())
    assert written["summary"] == json.loads(json.dumps(report["summary"]))
    assert no_child_left(backend)
    assert all(w.exit_code() is not None for w in backend.node.workers)


def test_a_memory_target_sets_what_the_workers_hold_for_the_run(tmp_path, quiet):
    default = kb.pm.MEMORY_USAGE_TARGET
    full, _ = kb.measure(quick_args(tmp_path), SimBackend())
    small, code = kb.measure(quick_args(tmp_path, "--memory-target", "0.05"), SimBackend())
    assert code == 0, small["outcome"]
    assert (full["settings"]["memory_target"], small["settings"]["memory_target"]) == (
        default, 0.05)
    assert default == kb.pm.MEMORY_USAGE_TARGET  # as it was: the run alone held less
    held = [[y["worker_footprint_mib"] for y in report["yields"]] for report in (full, small)]
    total = full["gpu_memory_mib"]
    assert all(mib > 0.5 * total for mib in held[0]), held
    assert all(0 < mib < 0.1 * total for mib in held[1]), held


@pytest.mark.parametrize("share", ["0", "x", "above"])
def test_a_memory_target_is_a_share_up_to_the_daemons(share, capsys):
    if share == "above":
        share = str(kb.pm.MEMORY_USAGE_TARGET + 0.05)
    with pytest.raises(SystemExit):
        kb.parse_args(["--memory-target", share])


def test_preflight_only_stops_after_the_preflight(tmp_path, quiet):
    backend = SimBackend()
    report, code = kb.measure(quick_args(tmp_path, "--preflight-only"), backend)
    assert code == 0 and list(report["phases"]) == ["preflight"]
    assert backend.node.workers == []


def test_a_gpu_that_is_not_idle_stops_the_run_at_the_preflight(tmp_path, quiet):
    backend = SimBackend()
    backend.node.foreign(0, start=time.time() - 10, memory=20 * GIB)
    report, code = kb.measure(quick_args(tmp_path), backend)
    assert code == kb.EXIT_CANNOT_RUN
    assert report["outcome"]["status"] == "cannot run"
    assert "not idle" in report["outcome"]["why"]
    assert list(report["phases"]) == ["preflight"] and no_child_left(backend)


def test_a_crashing_worker_stops_the_run_early(tmp_path, quiet, monkeypatch):
    monkeypatch.setattr(pm, "KEEPALIVE_RESTART_SECONDS", 0.2)
    backend = SimBackend()
    backend.node.on_spawn = lambda w: setattr(w, "crash_at", w.started + 0.3)
    began = time.monotonic()
    report, code = kb.measure(quick_args(tmp_path), backend)
    assert code == kb.EXIT_CUT_SHORT and time.monotonic() - began < 15
    assert "the worker crashes" in report["outcome"]["why"]
    assert "band" not in report["phases"]
    assert no_child_left(backend)
    assert kb.check_report(report) == []


def test_the_deadline_cuts_the_plan_and_keeps_what_it_measured(tmp_path, quiet):
    backend = SimBackend()
    report, code = kb.measure(quick_args(tmp_path, "--deadline", "4", "--band-seconds", "30"),
                              backend)
    assert code == kb.EXIT_CUT_SHORT and report["outcome"]["status"] == "cut short"
    assert "preflight" in report["phases"] and "yields" not in report["phases"]
    assert json.loads(next(tmp_path.glob("keepalive-*.json")).read_text())["outcome"]
    assert no_child_left(backend)
    assert all(w.exit_code() is not None for w in backend.node.workers)


def test_an_interrupted_run_kills_every_child(tmp_path, quiet):
    """What ``timeout`` does (SIGTERM, raised as KeyboardInterrupt by the handler)."""
    backend = SimBackend()
    timer = threading.Timer(3.0, _thread.interrupt_main)
    # interrupt_main() acts as SIGINT does: a run started with SIGINT ignored (nohup) must see it
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer.start()
    try:
        report, code = kb.measure(quick_args(tmp_path, "--band-seconds", "30"), backend)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert code == kb.EXIT_CUT_SHORT and "KeyboardInterrupt" in report["outcome"]["why"]
    assert no_child_left(backend)
    assert all(w.exit_code() is not None for w in backend.node.workers)
    with pytest.raises(KeyboardInterrupt):
        kb._terminated(15, None)


@pytest.mark.skipif(nvml_works_here(), reason="checks the behaviour without a GPU")
@pytest.mark.parametrize("what", ["preflight", "cpu", "ballast"])
def test_run_on_gpu_without_a_gpu_says_so(tmp_path, what):
    env = dict(os.environ, OUT=str(tmp_path))
    done = subprocess.run(["bash", str(REPO / "bench" / "run_on_gpu.sh"), what],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr
    assert "no NVIDIA GPU" in done.stderr


def test_run_on_gpu_names_what_it_can_run():
    done = subprocess.run(["bash", str(REPO / "bench" / "run_on_gpu.sh"), "bogus"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "usage: bench/run_on_gpu.sh [all|setup|preflight|cpu|ballast]" in done.stderr

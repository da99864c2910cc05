#!/usr/bin/env python3
"""CPU of one keep-alive worker on a real GPU, with its options varied: JSON out.

    python3 bench/worker_cpu.py [--gpu 0] [--seconds 20] [--out FILE]

Each variant starts the real worker (``perpetual_motion.py --worker``, as the daemon does) on
an idle GPU, waits until it is ready, then reads its CPU time from /proc over ``--seconds``,
with the CPU of each of its threads (the main thread runs the duty cycle; CUDA and NVML keep
threads of their own), and its own ``stats`` lines (busy share, tile time), and stops it. The
variants tell where the worker's CPU goes: the default (a period's tiles as one group, one CUDA
graph, one pair of CUDA events); without its own NVML watch (``--no-watch``); each tile
launched by its own call (``--no-graphs``), and timed alone too (``--group 1``, as before);
looks every 50 ms; events asked with query() instead of blocking sync; a longer duty period;
no tiles and no watch (the period's wake-up alone).
The GPU must be otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import perpetual_motion as pm  # noqa: E402

VARIANTS = {
    "default": [],
    "no-watch": ["--no-watch"],
    "no-graphs": ["--no-graphs"],  # each tile launched by its own call
    "tile-by-tile": ["--group", "1", "--no-graphs"],  # and each timed by its own events
    "watch-50ms": ["--watch-every", "0.05"],
    "query-events": ["--query-events"],  # no blocking sync: CUDA's event thread stays idle?
    "period-50ms": ["--period", "0.05"],
    "idle-no-watch": ["--duty", "0", "--no-watch"],  # the period's wake-up alone
}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of ``pid``, by name (the main thread as ``main``)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "stat").read_text()
        except OSError:
            continue
        name = "main" if task.name == str(pid) else text[text.index("(") + 1:text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        out[name] = out.get(name, 0.0) + seconds
    return out


def run_variant(gpu: pm.GpuInfo, extra: list[str], seconds: float, memory_mib: int) -> dict:
    spec = pm.WorkerSpec(pm.WorkerMode.HOLD, memory_mib, pm.KEEPALIVE_START_DUTY)
    worker = pm.spawn_worker(gpu, spec, extra)
    lines: list[str] = []
    began = time.monotonic()
    try:
        while not any(line.startswith("ready") for line in lines):
            if worker.exit_code() is not None or time.monotonic() - began > 90:
                return {"error": "not ready", "lines": lines[-10:]}
            lines += worker.messages()
            time.sleep(0.05)
        ready_s = time.monotonic() - began
        time.sleep(2.0)  # past the first stats
        cpu0, t0, threads0 = cpu_seconds(worker.pid), time.monotonic(), thread_cpu(worker.pid)
        mark = len(lines)
        while time.monotonic() - t0 < seconds:
            time.sleep(0.5)
            lines += worker.messages()
        cpu1, t1, threads1 = cpu_seconds(worker.pid), time.monotonic(), thread_cpu(worker.pid)
        stats = [pm.parse_message(line)[1] for line in lines[mark:] if line.startswith("stats")]
        return {"ready_s": round(ready_s, 2),
                "cpu_percent_of_core": round(100 * (cpu1 - cpu0) / (t1 - t0), 2),
                "threads_percent_of_core": {
                    name: round(100 * (seconds - threads0.get(name, 0.0)) / (t1 - t0), 2)
                    for name, seconds in threads1.items()},
                "busy": [float(s.get("busy", 0)) for s in stats],
                "tile_ms": [float(s.get("tile_ms", 0)) for s in stats][-3:],
                "ready_line": next(line for line in lines if line.startswith("ready"))}
    finally:
        worker.stop()
        deadline = time.monotonic() + 5
        while worker.exit_code() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if worker.exit_code() is None:
            worker.kill()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--memory-mib", type=int, default=8192)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    try:
        nvml = pm.Nvml.open(pm.logging.getLogger("worker-cpu"))
    except pm.NvmlUnavailable as exc:
        print(f"worker_cpu: {exc}", file=sys.stderr)
        return 2
    gpu = nvml.gpus()[args.gpu]
    report = {"gpu": gpu.name, "seconds": args.seconds, "memory_mib": args.memory_mib,
              "watch_s": pm._WATCH_SECONDS, "watch_processes_s": pm._WATCH_PROCESSES_SECONDS,
              "period_s": pm.KEEPALIVE_PERIOD, "variants": {}}
    for name, extra in VARIANTS.items():
        report["variants"][name] = run_variant(gpu, extra, args.seconds, args.memory_mib)
        text = json.dumps(report, indent=1)
        if args.out:
            Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
"""NVML queries per second per GPU that keep-alive makes, on the modelled NVML: JSON out.

    python3 bench/nvml_calls_bench.py [--gpus 8] [--seconds 120]

Two sides, each in simulated time, so the figure is a count, not a timing:

- the daemon: the real engine (``GpuKeepAlive``) on a simulated node (``tests/simgpu.py``)
  whose GPUs are held, ticked every POLL_INTERVAL; the simulated NVML counts every query;
- a worker: the real duty cycle (``run_worker_loop``) with its real NVML watch
  (``_NvmlWatch``) over a pynvml stand-in that counts the queries, tiles on a simulated clock.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import simgpu as sim  # noqa: E402

import perpetual_motion as pm  # noqa: E402


def daemon_side(gpus: int, seconds: float) -> dict:
    node = sim.SimNode(gpus=gpus)
    ka = sim.engine(node, logging.getLogger("nvml-calls"))
    ka.start()
    sim.run(node, ka, 20, poll=pm.POLL_INTERVAL)  # every GPU held
    held = [ka.gpu_fields()[f"gpu.{i}.state"] for i in range(gpus)]
    before = node.nvml.calls
    sim.run(node, ka, seconds, poll=pm.POLL_INTERVAL)
    ka.stop()
    return {"gpus": gpus, "held": held.count("holding"), "poll_s": pm.POLL_INTERVAL,
            "calls_per_gpu_per_s": round((node.nvml.calls - before) / seconds / gpus, 2)}


def worker_side(seconds: float) -> dict:
    clock = types.SimpleNamespace(now=0.0)
    device = sim.SimTorch()
    counts = {"processes": 0}

    def processes():
        counts["processes"] += 1
        return [object()]

    watch = pm._NvmlWatch("GPU-sim", module=device.pynvml(processes=processes),
                          clock=lambda: clock.now)
    watch.calls = 0
    tiles = sim.ClockedTiles(clock, pm.KEEPALIVE_TILE_MS / 1000)
    control = sim.ClockedControl(clock, [(seconds, "stop")])
    pm.run_worker_loop(tiles, control, duty=pm.KEEPALIVE_START_DUTY, report=lambda _: None,
                       watch=watch, clock=lambda: clock.now)
    return {"seconds": seconds, "watch_s": pm._WATCH_SECONDS,
            "watch_processes_s": pm._WATCH_PROCESSES_SECONDS,
            "calls_per_s": round(watch.calls / seconds, 2),
            "process_list_per_s": round(counts["processes"] / seconds, 2),
            "tiles_per_s": round(len(tiles.runs) / seconds, 1),
            "tile_waits_per_s": round(tiles.waits / seconds, 2)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=120.0)
    args = parser.parse_args(argv)
    report = {"bench": "nvml-calls", "version": pm.__version__,
              "daemon": daemon_side(args.gpus, args.seconds),
              "worker": worker_side(args.seconds)}
    report["per_gpu_per_s"] = round(report["daemon"]["calls_per_gpu_per_s"]
                                    + report["worker"]["calls_per_s"], 2)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
"""What NVML offers on this node, read off a real GPU: JSON out.

    python3 bench/nvml_facts.py [--gpu 0] [--out FILE]

The keep-alive decides from NVML alone, so each of its signals is checked here on the GPU as it
is: whether the utilisation sample buffer still delivers fresh samples on an idle GPU (and how
old its newest sample is), whether a process of ours shows in the compute process list under its
own PID (a GPU proxy such as gVisor's nvproxy may show another, or none), whether two of ours
show as two, per-process utilisation, compute mode, and how much memory one torch context takes
against what NVML says. Every reading is taken alone: one NVML error is recorded as the answer
to that question and the rest go on. The GPU should be idle; about 45 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MIB = 1024 * 1024


def child(seconds: float) -> int:
    """A probe: import torch, make a context, report, run matmuls for ``seconds``, report."""
    began = time.time()
    import torch

    imported = time.time()
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    context = time.time()
    free, total = torch.cuda.mem_get_info()
    print(json.dumps({"pid": os.getpid(), "import_s": imported - began,
                      "context_s": context - imported, "cuda_used_mib": (total - free) // MIB}),
          flush=True)
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    end, products = time.time() + seconds, 0
    while time.time() < end:
        for _ in range(8):
            torch.mm(a, a)
        torch.cuda.synchronize()
        products += 8
    print(json.dumps({"products": products, "seconds": seconds}), flush=True)
    return 0


class Reader:
    """NVML questions, each answered with its value or the error it raised."""

    def __init__(self, index: int) -> None:
        import pynvml as nv

        self.nv = nv
        nv.nvmlInit()
        self.handle = nv.nvmlDeviceGetHandleByIndex(index)

    def ask(self, name: str, *args):
        fn = getattr(self.nv, name, None)
        if fn is None:
            return {"error": f"{name} is not in this nvidia-ml-py"}
        try:
            return fn(*args)
        except self.nv.NVMLError as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}

    def samples(self, since_us: int) -> dict:
        got = self.ask("nvmlDeviceGetSamples", self.handle,
                       self.nv.NVML_GPU_UTILIZATION_SAMPLES, since_us)
        if isinstance(got, dict):
            return got
        values = [[int(s.timeStamp), int(s.sampleValue.uiVal)] for s in got[1]]
        newest = max((t for t, _ in values), default=None)
        return {"count": len(values), "values": values,
                "newest_age_s": None if newest is None else time.time() - newest / 1e6}

    def processes(self) -> list | dict:
        got = self.ask("nvmlDeviceGetComputeRunningProcesses", self.handle)
        if isinstance(got, dict):
            return got
        return [{"pid": p.pid, "used_mib": None if p.usedGpuMemory is None
                 else p.usedGpuMemory // MIB} for p in got]

    def process_util(self) -> list | dict:
        got = self.ask("nvmlDeviceGetProcessUtilization", self.handle, 0)
        if isinstance(got, dict):
            return got
        return [{"pid": p.pid, "sm": p.smUtil, "t": p.timeStamp} for p in got]

    def reading(self) -> dict:
        rates = self.ask("nvmlDeviceGetUtilizationRates", self.handle)
        memory = self.ask("nvmlDeviceGetMemoryInfo", self.handle)
        return {"t": time.time(),
                "util": rates if isinstance(rates, dict) else rates.gpu,
                "used_mib": memory if isinstance(memory, dict) else memory.used // MIB,
                "processes": self.processes(), "process_util": self.process_util()}


def idle_watch(nvml: Reader, seconds: float) -> list:
    """Once a second: the samples newer than the last seen, and the newest one's age."""
    rounds, last = [], int(time.time() * 1e6)
    for _ in range(int(seconds)):
        time.sleep(1.0)
        got = nvml.samples(last)
        if "values" in got:
            last = max([last] + [t for t, _ in got["values"]])
            got = {k: v for k, v in got.items() if k != "values"}
        rounds.append(got)
    return rounds


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", type=int, default=0)
    parser.add_argument("--out")
    parser.add_argument("--child", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        return child(args.child)
    try:
        nvml = Reader(args.gpu)
    except Exception as exc:  # noqa: BLE001 - no NVML here: say so, exit 2
        print(f"nvml_facts: NVML does not answer here: {exc}", file=sys.stderr)
        return 2
    nv, h = nvml.nv, nvml.handle
    facts: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "uname": " ".join(os.uname()), "our_pid": os.getpid()}
    for key, name, extra in (("driver", "nvmlSystemGetDriverVersion", ()),
                             ("nvml", "nvmlSystemGetNVMLVersion", ()),
                             ("cuda_driver", "nvmlSystemGetCudaDriverVersion", ()),
                             ("name", "nvmlDeviceGetName", (h,)),
                             ("compute_mode", "nvmlDeviceGetComputeMode", (h,)),
                             ("mig_mode", "nvmlDeviceGetMigMode", (h,)),
                             ("persistence", "nvmlDeviceGetPersistenceMode", (h,))):
        value = nvml.ask(name, *extra)
        facts[key] = value.decode() if isinstance(value, bytes) else value
    facts["idle_before"] = nvml.reading()
    facts["idle_samples_all"] = nvml.samples(0)
    facts["idle_watch"] = idle_watch(nvml, 5)
    env = dict(os.environ, CUDA_DEVICE_ORDER="PCI_BUS_ID", CUDA_VISIBLE_DEVICES=str(args.gpu))
    probes, busy = [], []
    try:
        for _ in range(2):  # the second starts while the first still runs
            probes.append(subprocess.Popen([sys.executable, __file__, "--child", "8"], env=env,
                                           stdout=subprocess.PIPE, text=True))
            line = probes[-1].stdout.readline()
            facts.setdefault("probe_ready", []).append(json.loads(line) if line else None)
            facts.setdefault("probe_spawned_pid", []).append(probes[-1].pid)
            for _ in range(8):
                busy.append(nvml.reading())
                time.sleep(0.25)
        while any(p.poll() is None for p in probes):
            busy.append(nvml.reading())
            time.sleep(0.25)
        facts["probe_done"] = [p.stdout.read() for p in probes]
    finally:
        for p in probes:
            p.kill()
            p.wait()
    facts["busy"] = busy
    facts["busy_samples_all"] = nvml.samples(0)
    facts["idle_after"] = nvml.reading()
    facts["idle_after_watch"] = idle_watch(nvml, 8)
    text = json.dumps(facts, indent=1, default=str)
    if args.out:
        with open(args.out, "w") as out:
            out.write(text + "\n")
    print(text)
    nv.nvmlShutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env bash
# Run the keep-alive benchmark on this machine's first GPU, from a bare machine on.
#
#   bench/run_on_gpu.sh [all|setup|preflight|cpu|ballast]    (default: all)
#
#   setup      a Python with torch (CUDA) and nvidia-ml-py: python3 when it has them, else a
#              virtual environment ($PM_BENCH_VENV, default ~/.cache/pm-bench-venv) with
#              torch==TORCH_VERSION from PyPI (CUDA 12.8 wheels: any driver from 525 on; the
#              newest torch wheels need driver 580). A few minutes; done once per machine.
#   preflight  setup, then the benchmark's preflight alone (~20 s): versions, compute mode,
#              MIG, the GPU idle, NVML's sample period, a tiny fp16 matmul on the device.
#   all        setup, then the self-test that users run (perpetual_motion.py --self-test: about
#              a minute), then the whole plan of the interference figures (the preflight first;
#              under 6 minutes).
#   cpu        setup, then where a worker's CPU goes (bench/worker_cpu.py: the worker with its
#              launch, watch and period varied, per thread; about 3 minutes).
#   ballast    setup, then yields beside a worker that holds 5% of the GPU's memory, then beside
#              one that holds MEMORY_USAGE_TARGET, 3 each with the process list: does the size of
#              what keep-alive holds cost a job its first second? (about 4 minutes)
#
# Output goes to $OUT when it is set, else to bench/results/: self-test.json and self-test.log,
# keepalive-<GPU>-<date>.json, keepalive-bench.log (its log), keepalive-bench.stdout, setup.log
# and children.pids (cpu: worker-cpu.json and worker-cpu.log; ballast: keepalive-ballast-0.05.*
# and keepalive-ballast-full.*: .json, .log, .stdout). The
# benchmark runs under a hard timeout, and every process it started is gone when this returns.
# Exit status: the benchmark's (0 done, 2 cannot run here, 3 cut short), 124 timed out.
set -euo pipefail

readonly TORCH_VERSION="2.9.1"
readonly PREFLIGHT_LIMIT_SECONDS=90  # the preflight itself takes about 20 s
readonly PLAN_LIMIT_SECONDS=400  # the plan stops itself at 330 s
readonly SELF_TEST_LIMIT_SECONDS=240  # the self-test takes about a minute
readonly CPU_LIMIT_SECONDS=300  # bench/worker_cpu.py takes about 3 minutes
readonly BALLAST_LIMIT_SECONDS=150  # each of the two runs stops itself at 120 s
readonly KILL_AFTER_SECONDS=15  # from SIGTERM to SIGKILL when the limit is reached

err() {
  echo "run_on_gpu: $*" >&2
}

# python_ok PYTHON: it imports torch with CUDA and pynvml
python_ok() {
  "$1" -c 'import sys, pynvml, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
    >/dev/null 2>&1
}

# pypi_reachable: PyPI answers within 3 s (never pip on a machine without a network)
pypi_reachable() {
  python3 -c 'import socket; socket.create_connection(("pypi.org", 443), timeout=3).close()' \
    >/dev/null 2>&1
}

# setup OUT_DIR: prints the Python to use
setup() {
  local out_dir="$1"
  local venv="${PM_BENCH_VENV:-${HOME:-/tmp}/.cache/pm-bench-venv}"
  if python_ok python3; then
    command -v python3
    return 0
  fi
  err "python3 ($(command -v python3)) cannot run the benchmark:"
  python3 -c 'import pynvml, torch; print("CUDA available:", torch.cuda.is_available())' >&2 || true
  if ! python_ok "${venv}/bin/python" && ! pypi_reachable; then
    err "and PyPI cannot be reached to install torch and nvidia-ml-py: install them into" \
      "python3, or set PM_BENCH_VENV to an environment that has them"
    return 2
  fi
  if [[ ! -x "${venv}/bin/python" ]]; then
    err "setting up ${venv} (torch ${TORCH_VERSION} from PyPI: a few minutes)"
    python3 -m venv "${venv}" >>"${out_dir}/setup.log" 2>&1 || {
      err "python3 -m venv failed (see ${out_dir}/setup.log)"
      return 2
    }
  fi
  if ! python_ok "${venv}/bin/python"; then
    "${venv}/bin/python" -m pip install --quiet --disable-pip-version-check \
      "torch==${TORCH_VERSION}" nvidia-ml-py >>"${out_dir}/setup.log" 2>&1 || {
      err "pip install failed (see ${out_dir}/setup.log)"
      return 2
    }
  fi
  if ! python_ok "${venv}/bin/python"; then
    err "torch sees no CUDA device even in ${venv}:"
    "${venv}/bin/python" -c 'import torch; print(torch.__version__, torch.version.cuda);
torch.zeros(1, device="cuda")' >&2 || true
    return 2
  fi
  echo "${venv}/bin/python"
}

# kill_leftovers OUT_DIR: the benchmark's children that outlived it (it was killed)
kill_leftovers() {
  local pids_file="$1/children.pids" pid
  [[ -f "${pids_file}" ]] || return 0
  while read -r pid; do
    [[ "${pid}" =~ ^[0-9]+$ ]] || continue
    if grep -qsE 'keepalive_bench|perpetual_motion' "/proc/${pid}/cmdline" 2>/dev/null; then
      err "killing leftover process ${pid}"
      kill -KILL -- "-${pid}" 2>/dev/null || kill -KILL "${pid}" 2>/dev/null || true
    fi
  done <"${pids_file}"
}

main() {
  local what="${1:-all}"
  case "${what}" in
    all | setup | preflight | cpu | ballast) ;;
    *)
      err "usage: bench/run_on_gpu.sh [all|setup|preflight|cpu|ballast]"
      return 2
      ;;
  esac
  cd "$(dirname "$0")/.."
  local out_dir="${OUT:-bench/results}"
  mkdir -p "${out_dir}"
  if ! compgen -G '/dev/nvidia[0-9]*' >/dev/null && ! nvidia-smi -L >/dev/null 2>&1; then
    err "no NVIDIA GPU here (no /dev/nvidia0, no nvidia-smi)"
    return 2
  fi
  nvidia-smi --query-gpu=index,name,driver_version,memory.used,memory.total,compute_mode \
    --format=csv >&2 2>/dev/null || err "nvidia-smi did not answer (the preflight asks NVML)"
  local python
  python="$(setup "${out_dir}")" || return 2
  err "python: ${python} ($("${python}" -c 'import torch; print(torch.__version__)'))"
  [[ "${what}" == setup ]] && return 0
  if [[ "${what}" == cpu ]]; then
    local status=0
    timeout --kill-after="${KILL_AFTER_SECONDS}" "${CPU_LIMIT_SECONDS}" \
      "${python}" bench/worker_cpu.py --seconds 15 --out "${out_dir}/worker-cpu.json" \
      >/dev/null 2>"${out_dir}/worker-cpu.log" || status=$?
    tail -n 5 "${out_dir}/worker-cpu.log" >&2 || true
    err "worker_cpu: exit status ${status}"
    return "${status}"
  fi
  if [[ "${what}" == ballast ]]; then
    local status=0 target name
    local -a args
    for target in 0.05 full; do
      name="${out_dir}/keepalive-ballast-${target}"
      args=(--gpu 0 --out-dir "${out_dir}" --out "${name}.json" --band-seconds 5 --settle 5
        --yields 3 --hidden-yields 0 --deadline 120)
      [[ "${target}" == full ]] || args+=(--memory-target "${target}")
      timeout --kill-after="${KILL_AFTER_SECONDS}" "${BALLAST_LIMIT_SECONDS}" \
        "${python}" bench/keepalive_bench.py "${args[@]}" >"${name}.stdout" 2>"${name}.log" \
        || status=$?
      kill_leftovers "${out_dir}"
      err "ballast ${target}: exit status ${status}"
      tail -n 3 "${name}.log" >&2 || true
    done
    return "${status}"
  fi
  local limit="${PLAN_LIMIT_SECONDS}" args=(--gpu 0 --out-dir "${out_dir}")
  if [[ "${what}" == preflight ]]; then
    limit="${PREFLIGHT_LIMIT_SECONDS}"
    args+=(--preflight-only)
  fi
  local status=0
  if [[ "${what}" == all ]]; then
    timeout --kill-after="${KILL_AFTER_SECONDS}" "${SELF_TEST_LIMIT_SECONDS}" \
      "${python}" perpetual_motion.py --self-test --json \
      >"${out_dir}/self-test.json" 2>"${out_dir}/self-test.log" || status=$?
    err "self-test: exit status ${status} ($(tail -c 300 "${out_dir}/self-test.json"))"
    status=0
  fi
  timeout --kill-after="${KILL_AFTER_SECONDS}" "${limit}" \
    "${python}" bench/keepalive_bench.py "${args[@]}" \
    >"${out_dir}/keepalive-bench.stdout" 2>"${out_dir}/keepalive-bench.log" || status=$?
  kill_leftovers "${out_dir}"
  tail -n 8 "${out_dir}/keepalive-bench.log" >&2 || true
  case "${status}" in
    0) ;;
    124 | 137) err "the benchmark ran out of time (${limit} s); what it measured is kept" ;;
    *) err "the benchmark ended with status ${status}" ;;
  esac
  ls -l "${out_dir}" >&2
  return "${status}"
}

main "$@"

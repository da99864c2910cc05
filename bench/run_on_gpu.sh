#!/usr/bin/env bash
# Run the keep-alive benchmark once on this machine's first GPU (about 4 minutes, 8 at most).
# The JSON goes to $OUT when it is set, else to bench/results/, as keepalive-<GPU>-<date>.json;
# the benchmark's log goes beside it. The GPU must be otherwise idle.
set -euo pipefail

readonly LIMIT_SECONDS=480  # well under the 9 minutes a device run may take

err() {
  echo "run_on_gpu: $*" >&2
}

main() {
  cd "$(dirname "$0")/.."
  local out_dir="${OUT:-bench/results}"
  mkdir -p "${out_dir}"
  if ! python3 -c 'import torch, pynvml, psutil' 2>/dev/null; then
    err "needs python3 with torch (a CUDA build), nvidia-ml-py and psutil"
    return 2
  fi
  nvidia-smi -L || err "nvidia-smi failed (the benchmark says whether NVML works)"
  local status=0
  timeout "${LIMIT_SECONDS}" python3 bench/keepalive_bench.py --gpu 0 --out-dir "${out_dir}" \
    >"${out_dir}/keepalive-bench.stdout" 2>"${out_dir}/keepalive-bench.log" || status=$?
  tail -n 5 "${out_dir}/keepalive-bench.log" >&2 || true
  if [[ ${status} -ne 0 ]]; then
    err "the benchmark ended with status ${status} (124: timed out; what it measured is kept)"
  fi
  ls -l "${out_dir}"
  return "${status}"
}

main "$@"

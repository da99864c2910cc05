#!/usr/bin/env bash
#
# Start Slurm clusters on this machine, for the tests of `submit.sh --backend slurm`:
#
#   bash .ci/start-slurm.sh [one-node|two-node|both]      (default: one-node)
#
# one-node  the cluster "ci": one node named after this host, /etc/slurm/slurm.conf, the default
#           ports (slurmctld 6817, slurmd 6818). sbatch, squeue and scontrol use it by default.
# two-node  the cluster "ci2": two nodes, n1 and n2, both on this host (two slurmd, each started
#           with -N and listening on its own port), in /etc/slurm-two-node/slurm.conf, with its
#           own slurmctld port, state, spool, pid and log files, so that it runs beside "ci".
#           Use it with SLURM_CONF=/etc/slurm-two-node/slurm.conf in the environment of sbatch,
#           squeue, scontrol and scancel (the jobs inherit it). Its job ids start at 500000.
# both      both of them.
#
# Installs nothing: it expects Debian's `slurm-wlm` and `munge` packages
# (apt-get install -y slurm-wlm munge). Runs as root. Safe to run again: what already works is
# left alone. For each cluster it
#   1. creates the munge key when it is missing and starts munged as user munge (shared);
#   2. writes the cluster's slurm.conf, unless a slurm.conf that this script did not write is
#      already there;
#   3. starts its slurmctld and slurmd(s), restarting them when the configuration changed;
#   4. waits until `sinfo` shows its nodes up, and prints what it did.
#
# Environment:
#   SLURM_CI_GPUS       GPUs to declare as GRES on the one-node cluster's node (default 0: no GRES
#                       at all); with N > 0 the node gets Gres=gpu:N backed by /dev/nvidia0..N-1.
#                       The two-node cluster declares none.
#   SLURM_CI_PARTITION  the partition's name, in both clusters (default: debug).
#   SLURM_CI_TIMEOUT    seconds to wait for the nodes (default: 60).

set -euo pipefail

readonly MARKER="# Written by .ci/start-slurm.sh (Perpetual Motion CI); it rewrites this file."
readonly MUNGE_KEY="/etc/munge/munge.key"
readonly LOG_DIR="/var/log/slurm"

# The one-node cluster.
readonly ONE_CONF="/etc/slurm/slurm.conf"
readonly ONE_GRES_CONF="/etc/slurm/gres.conf"
readonly ONE_CTLD_PID="/run/slurmctld.pid"
readonly ONE_SLURMD_PID="/run/slurmd.pid"

# The two-node cluster: its own folder, ports and files beside the one-node cluster's.
readonly TWO_CONF="/etc/slurm-two-node/slurm.conf"
readonly TWO_CTLD_PORT=6827
readonly TWO_CTLD_PID="/run/slurmctld-two-node.pid"
readonly TWO_NODES=(n1 n2)
readonly TWO_NODE_PORTS=(17001 17002)

NODE="$(hostname -s)"
readonly NODE
readonly PARTITION="${SLURM_CI_PARTITION:-debug}"
readonly GPUS="${SLURM_CI_GPUS:-0}"
readonly TIMEOUT="${SLURM_CI_TIMEOUT:-60}"

#######################################
# Prints a message to stderr.
#######################################
err() {
  echo "start-slurm: error: $*" >&2
}

#######################################
# Prints what the script does.
#######################################
say() {
  echo "start-slurm: $*"
}

#######################################
# Succeeds when the pid file names a running process whose command is $2.
# Arguments: pid file, command name.
#######################################
running_from_pidfile() {
  local pid
  pid="$(cat "$1" 2>/dev/null)" || return 1
  [[ "${pid}" =~ ^[0-9]+$ ]] || return 1
  [[ "$(cat "/proc/${pid}/comm" 2>/dev/null)" == "$2" ]]
}

#######################################
# Checks the programs this script needs.
#######################################
check_requirements() {
  if ((EUID != 0)); then
    err "run me as root (sudo bash $0)"
    exit 1
  fi
  local missing=() prog
  for prog in munged mungekey munge unmunge slurmctld slurmd sinfo scontrol runuser; do
    command -v "${prog}" >/dev/null || missing+=("${prog}")
  done
  if ((${#missing[@]} > 0)); then
    err "missing: ${missing[*]}; install them with: apt-get install -y slurm-wlm munge"
    exit 1
  fi
  if ! [[ "${GPUS}" =~ ^[0-9]+$ ]]; then
    err "SLURM_CI_GPUS must be a number, not '${GPUS}'"
    exit 1
  fi
}

#######################################
# Creates the munge key when missing and starts munged as user munge.
#######################################
start_munge() {
  if [[ ! -s "${MUNGE_KEY}" ]]; then
    mungekey --create --keyfile="${MUNGE_KEY}"
    chown munge:munge "${MUNGE_KEY}"
    chmod 0400 "${MUNGE_KEY}"
    say "created the munge key ${MUNGE_KEY}"
  fi
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "munged: already running"
    return
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
  runuser -u munge -- munged
  local i
  for ((i = 0; i < 50; i++)); do
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
      say "munged: started"
      return
    fi
    sleep 0.1
  done
  err "munged does not answer (see /var/log/munge/munged.log)"
  exit 1
}

#######################################
# Prints the first lines that both clusters' slurm.conf share.
#######################################
common_head() {
  cat <<EOF
SlurmctldHost=${NODE}(127.0.0.1)
AuthType=auth/munge
SlurmUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
EOF
}

#######################################
# Prints the later lines that both clusters' slurm.conf share.
#######################################
common_tail() {
  cat <<EOF
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=600
KillWait=10
EOF
}

#######################################
# Prints the one-node cluster's slurm.conf.
#######################################
one_node_conf() {
  local gres_types="" node_gres=""
  if ((GPUS > 0)); then
    gres_types="GresTypes=gpu"
    node_gres="Gres=gpu:${GPUS}"
  fi
  cat <<EOF
${MARKER}
ClusterName=ci
$(common_head)
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=${ONE_CTLD_PID}
SlurmdPidFile=${ONE_SLURMD_PID}
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
$(common_tail)
${gres_types}
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=$(nproc) ${node_gres} State=UNKNOWN
PartitionName=${PARTITION} Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

#######################################
# Prints the two-node cluster's slurm.conf: one NodeName line per node, each with its own port
# (slurmd refuses a port range), and per-node spool, pid and log files (%n: the node's name).
#######################################
two_node_conf() {
  cat <<EOF
${MARKER}
ClusterName=ci2
$(common_head)
SlurmctldPort=${TWO_CTLD_PORT}
FirstJobId=500000
StateSaveLocation=/var/spool/slurmctld-two-node
SlurmdSpoolDir=/var/spool/slurmd-%n
SlurmctldPidFile=${TWO_CTLD_PID}
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=${LOG_DIR}/slurmctld-two-node.log
SlurmdLogFile=${LOG_DIR}/slurmd-%n.log
$(common_tail)
EOF
  local i
  for i in "${!TWO_NODES[@]}"; do
    echo "NodeName=${TWO_NODES[i]} NodeHostname=${NODE} NodeAddr=127.0.0.1" \
      "Port=${TWO_NODE_PORTS[i]} CPUs=$(nproc) State=UNKNOWN"
  done
  local nodes
  nodes="$(IFS=,; echo "${TWO_NODES[*]}")"
  echo "PartitionName=${PARTITION} Nodes=${nodes} Default=YES MaxTime=INFINITE State=UP" \
    "OverSubscribe=YES"
}

#######################################
# Writes a slurm.conf unless someone else's is there. Succeeds when the file changed.
# Arguments: the file; its content comes on stdin.
#######################################
write_conf() {
  local wanted
  wanted="$(cat)"
  if [[ -e "$1" ]] && ! grep -qxF "${MARKER}" "$1"; then
    say "$1: not written by this script; left as it is"
    return 1
  fi
  if [[ -e "$1" && "$(cat "$1")" == "${wanted}" ]]; then
    say "$1: already up to date"
    return 1
  fi
  install -d "$(dirname -- "$1")"
  printf '%s\n' "${wanted}" >"$1.new"
  mv -f "$1.new" "$1"
  say "$1: written"
}

#######################################
# Writes the one-node cluster's gres.conf (or removes the one this script wrote).
#######################################
write_gres_conf() {
  if ((GPUS > 0)); then
    printf '%s\nName=gpu File=/dev/nvidia[0-%d]\n' "${MARKER}" "$((GPUS - 1))" >"${ONE_GRES_CONF}"
  elif [[ -e "${ONE_GRES_CONF}" ]] && grep -qxF "${MARKER}" "${ONE_GRES_CONF}"; then
    rm -f "${ONE_GRES_CONF}"
  fi
}

#######################################
# Succeeds when any of a cluster's daemons runs.
# Arguments: slurmctld's pid file, then slurmd's pid files.
#######################################
cluster_running() {
  running_from_pidfile "$1" slurmctld && return 0
  shift
  local pid_file
  for pid_file in "$@"; do
    running_from_pidfile "${pid_file}" slurmd && return 0
  done
  return 1
}

#######################################
# Stops a cluster's daemons (scontrol shutdown), so that a new configuration takes effect.
# Arguments: slurm.conf, slurmctld's pid file, slurmd's pid files.
#######################################
stop_cluster() {
  local conf="$1"
  shift
  cluster_running "$@" || return 0
  say "restarting the daemons of ${conf} for the new configuration"
  SLURM_CONF="${conf}" scontrol shutdown >/dev/null 2>&1 || true
  local i
  for ((i = 0; i < 100; i++)); do
    cluster_running "$@" || return 0
    sleep 0.1
  done
  err "the daemons of ${conf} did not stop after 'scontrol shutdown'"
  exit 1
}

#######################################
# Starts slurmctld of a cluster when it is not running.
# Arguments: slurm.conf, pid file, log file.
#######################################
start_slurmctld() {
  if running_from_pidfile "$2" slurmctld; then
    say "slurmctld ($1): already running"
  else
    slurmctld -f "$1"
    say "slurmctld ($1): started (log $3)"
  fi
}

#######################################
# Starts one slurmd of a cluster when it is not running.
# Arguments: slurm.conf, pid file, log file, node name (empty: the host's, from the conf).
#######################################
start_slurmd() {
  local -a name=()
  if [[ -n "$4" ]]; then
    name=(-N "$4")
  fi
  if running_from_pidfile "$2" slurmd; then
    say "slurmd ${4:-${NODE}} ($1): already running"
  else
    slurmd -f "$1" "${name[@]}"
    say "slurmd ${4:-${NODE}} ($1): started (log $3)"
  fi
}

#######################################
# Waits until sinfo shows a node up (idle, or running jobs); resumes it when it is down.
# Arguments: slurm.conf, node name.
#######################################
wait_for_node() {
  local state="" i resumed=0
  for ((i = 0; i < TIMEOUT * 2; i++)); do
    state="$(SLURM_CONF="$1" sinfo -h -N -n "$2" -o '%t' 2>/dev/null | head -n 1)" || state=""
    case "${state}" in
      idle | mix | alloc | comp)
        say "node $2 is ${state}"
        return
        ;;
      down* | drain* | drng*)
        if ((resumed == 0)); then
          SLURM_CONF="$1" scontrol update NodeName="$2" State=RESUME >/dev/null 2>&1 || true
          resumed=1
        fi
        ;;
    esac
    sleep 0.5
  done
  err "node $2 of $1 not up after ${TIMEOUT} s (state '${state}'); see ${LOG_DIR}/"
  tail -n 20 "${LOG_DIR}"/slurmctld*.log "${LOG_DIR}"/slurmd*.log >&2 || true
  exit 1
}

#######################################
# The one-node cluster "ci".
#######################################
one_node() {
  if one_node_conf | write_conf "${ONE_CONF}"; then
    write_gres_conf
    stop_cluster "${ONE_CONF}" "${ONE_CTLD_PID}" "${ONE_SLURMD_PID}"
  fi
  install -d -m 0755 /var/spool/slurmctld /var/spool/slurmd "${LOG_DIR}"
  start_slurmctld "${ONE_CONF}" "${ONE_CTLD_PID}" "${LOG_DIR}/slurmctld.log"
  start_slurmd "${ONE_CONF}" "${ONE_SLURMD_PID}" "${LOG_DIR}/slurmd.log" ""
  wait_for_node "${ONE_CONF}" "${NODE}"
  say "one-node cluster ci ready (node ${NODE}, CPUs=$(nproc), GPUs=${GPUS}, partition ${PARTITION})"
  SLURM_CONF="${ONE_CONF}" sinfo
}

#######################################
# The two-node cluster "ci2".
#######################################
two_node() {
  local -a pid_files=() node
  for node in "${TWO_NODES[@]}"; do
    pid_files+=("/run/slurmd-${node}.pid")
  done
  if two_node_conf | write_conf "${TWO_CONF}"; then
    stop_cluster "${TWO_CONF}" "${TWO_CTLD_PID}" "${pid_files[@]}"
  fi
  install -d -m 0755 /var/spool/slurmctld-two-node "${LOG_DIR}"
  for node in "${TWO_NODES[@]}"; do
    install -d -m 0755 "/var/spool/slurmd-${node}"
  done
  start_slurmctld "${TWO_CONF}" "${TWO_CTLD_PID}" "${LOG_DIR}/slurmctld-two-node.log"
  for node in "${TWO_NODES[@]}"; do
    start_slurmd "${TWO_CONF}" "/run/slurmd-${node}.pid" "${LOG_DIR}/slurmd-${node}.log" "${node}"
  done
  for node in "${TWO_NODES[@]}"; do
    wait_for_node "${TWO_CONF}" "${node}"
  done
  say "two-node cluster ci2 ready (nodes ${TWO_NODES[*]} on ${NODE}, partition ${PARTITION});" \
    "use it with SLURM_CONF=${TWO_CONF}"
  SLURM_CONF="${TWO_CONF}" sinfo
}

main() {
  local which="${1:-one-node}"
  case "${which}" in
    one-node | two-node | both) ;;
    *)
      err "unknown cluster '${which}': one-node, two-node or both"
      exit 2
      ;;
  esac
  check_requirements
  start_munge
  if [[ "${which}" != two-node ]]; then
    one_node
  fi
  if [[ "${which}" != one-node ]]; then
    two_node
  fi
}

main "$@"

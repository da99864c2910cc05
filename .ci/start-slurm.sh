#!/usr/bin/env bash
#
# Start a single-node Slurm cluster on this machine, for the tests of `submit.sh --backend slurm`.
#
# Installs nothing: it expects Debian's `slurm-wlm` and `munge` packages
# (apt-get install -y slurm-wlm munge). Runs as root. Safe to run again: what already works is
# left alone. It
#   1. creates the munge key when it is missing and starts munged as user munge;
#   2. writes /etc/slurm/slurm.conf (one node, this host, CPUs=$(nproc), one partition), unless a
#      slurm.conf that this script did not write is already there;
#   3. starts slurmctld and slurmd;
#   4. waits until `sinfo` shows the node up, and prints what it did.
#
# Environment:
#   SLURM_CI_GPUS       GPUs to declare as GRES on the node (default 0: no GRES at all); with N > 0
#                       the node gets Gres=gpu:N backed by /dev/nvidia0..N-1.
#   SLURM_CI_PARTITION  the partition's name (default: debug).
#   SLURM_CI_TIMEOUT    seconds to wait for the node (default: 60).

set -euo pipefail

readonly SLURM_CONF="/etc/slurm/slurm.conf"
readonly GRES_CONF="/etc/slurm/gres.conf"
readonly MUNGE_KEY="/etc/munge/munge.key"
readonly MARKER="# Written by .ci/start-slurm.sh (Perpetual Motion CI); it rewrites this file."
readonly SLURMCTLD_PID="/run/slurmctld.pid"
readonly SLURMD_PID="/run/slurmd.pid"
readonly LOG_DIR="/var/log/slurm"

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
# Prints the slurm.conf for this machine.
#######################################
slurm_conf() {
  local gres_types="" node_gres=""
  if ((GPUS > 0)); then
    gres_types="GresTypes=gpu"
    node_gres="Gres=gpu:${GPUS}"
  fi
  cat <<EOF
${MARKER}
ClusterName=ci
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
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=${SLURMCTLD_PID}
SlurmdPidFile=${SLURMD_PID}
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=600
KillWait=10
${gres_types}
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=$(nproc) ${node_gres} State=UNKNOWN
PartitionName=${PARTITION} Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

#######################################
# Writes slurm.conf (and gres.conf) unless someone else's slurm.conf is there.
# Globals: CONF_CHANGED, set to 1 when the configuration changed.
#######################################
write_conf() {
  if [[ -e "${SLURM_CONF}" ]] && ! grep -qxF "${MARKER}" "${SLURM_CONF}"; then
    say "${SLURM_CONF}: not written by this script; left as it is"
    return
  fi
  local wanted
  wanted="$(slurm_conf)"
  if [[ -e "${SLURM_CONF}" && "$(cat "${SLURM_CONF}")" == "${wanted}" ]]; then
    say "${SLURM_CONF}: already up to date"
    return
  fi
  install -d /etc/slurm
  printf '%s\n' "${wanted}" >"${SLURM_CONF}.new"
  mv -f "${SLURM_CONF}.new" "${SLURM_CONF}"
  if ((GPUS > 0)); then
    printf '%s\nName=gpu File=/dev/nvidia[0-%d]\n' "${MARKER}" "$((GPUS - 1))" >"${GRES_CONF}"
  elif [[ -e "${GRES_CONF}" ]] && grep -qxF "${MARKER}" "${GRES_CONF}"; then
    rm -f "${GRES_CONF}"
  fi
  say "${SLURM_CONF}: written (node ${NODE}, CPUs=$(nproc), GPUs=${GPUS}, partition ${PARTITION})"
  CONF_CHANGED=1
}

#######################################
# Stops the Slurm daemons this script started, so that a new configuration takes effect.
#######################################
stop_slurm() {
  if running_from_pidfile "${SLURMCTLD_PID}" slurmctld || running_from_pidfile "${SLURMD_PID}" slurmd
  then
    say "restarting slurmctld and slurmd for the new configuration"
    scontrol shutdown >/dev/null 2>&1 || true
    local i
    for ((i = 0; i < 100; i++)); do
      if ! running_from_pidfile "${SLURMCTLD_PID}" slurmctld \
        && ! running_from_pidfile "${SLURMD_PID}" slurmd; then
        return
      fi
      sleep 0.1
    done
    err "slurmctld or slurmd did not stop after 'scontrol shutdown'"
    exit 1
  fi
}

#######################################
# Starts slurmctld and slurmd when they are not running.
#######################################
start_slurm() {
  install -d -m 0755 /var/spool/slurmctld /var/spool/slurmd "${LOG_DIR}"
  if running_from_pidfile "${SLURMCTLD_PID}" slurmctld; then
    say "slurmctld: already running"
  else
    slurmctld
    say "slurmctld: started (log ${LOG_DIR}/slurmctld.log)"
  fi
  if running_from_pidfile "${SLURMD_PID}" slurmd; then
    say "slurmd: already running"
  else
    slurmd
    say "slurmd: started (log ${LOG_DIR}/slurmd.log)"
  fi
}

#######################################
# Waits until sinfo shows the node up (idle, or running jobs); resumes it when it is down.
#######################################
wait_for_node() {
  local state="" i resumed=0
  for ((i = 0; i < TIMEOUT * 2; i++)); do
    state="$(sinfo -h -N -n "${NODE}" -o '%t' 2>/dev/null | head -n 1)" || state=""
    case "${state}" in
      idle | mix | alloc | comp)
        say "node ${NODE} is ${state}; partition ${PARTITION} ready"
        sinfo
        return
        ;;
      down* | drain* | drng*)
        if ((resumed == 0)); then
          scontrol update NodeName="${NODE}" State=RESUME >/dev/null 2>&1 || true
          resumed=1
        fi
        ;;
    esac
    sleep 0.5
  done
  err "node ${NODE} not up after ${TIMEOUT} s (state '${state}'); see ${LOG_DIR}/"
  tail -n 20 "${LOG_DIR}/slurmctld.log" "${LOG_DIR}/slurmd.log" >&2 || true
  exit 1
}

main() {
  check_requirements
  start_munge
  CONF_CHANGED=0
  write_conf
  if ((CONF_CHANGED)); then
    stop_slurm
  fi
  start_slurm
  wait_for_node
}

main "$@"

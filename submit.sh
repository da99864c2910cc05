#!/usr/bin/env bash
#
# Launch the Perpetual Motion daemon (perpetual_motion.py) as a cluster job.
#
#   ./submit.sh [--backend sco|slurm|local] [--hours H] [--force] [--dry-run] <JOB_ID> [GPUS=2]
#               [NODES=1]
#
# Backends: `sco` (SCO ACP, `sco acp jobs create`; the default), `slurm` (`sbatch`, one daemon
# per node through `srun`) and `local` (this machine, in the background). The queue folder is
# <QUEUE_ROOT>/<JOB_ID>/ (docs/protocol.md); the cluster's job id is saved there in job_id.txt.
# Settings are below; override them in submit.conf beside this script or in the environment.
# `./submit.sh --help` says more.

set -euo pipefail

# Logical, not physical: a symlinked mount point (/mnt/afs -> ...) must stay as the nodes see it.
SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR
readonly PROG="submit.sh"

# Settings ##########################################################################################
# Each line: name, default, meaning. Override without editing this file: NAME=value lines in
# submit.conf beside this script (or the file $SUBMIT_CONF names), or the environment
# (`CONDA_ENV=torch ./submit.sh ...`). The environment wins over the file, the file over these.
# {GPUS} in SCO_WORKER_SPEC and GRES is replaced by the GPU count.

declare -a SETTING_NAMES=()
declare -A SETTING_DEFAULT=() SETTING_HELP=()

# Declares one setting.
setting() {
  SETTING_NAMES+=("$1")
  SETTING_DEFAULT["$1"]="$2"
  SETTING_HELP["$1"]="$3"
}

setting SUBMIT_BACKEND      "sco"       "sco, slurm or local (the flag --backend wins)"
setting CODE_DIR            "${SCRIPT_DIR}" "folder holding perpetual_motion.py, as the nodes see it"
setting QUEUE_ROOT          ""          "queue root on shared storage, the same path on the nodes; required for sco (slurm, local: \$HOME/gpu_queue)"
setting CONDA_PATH          ""          "conda activate script sourced on the node before the daemon starts (empty: none)"
setting CONDA_ENV           ""          "conda environment given to it"
setting PYTHON              "python3"   "Python interpreter that runs the daemon"
setting AUTO_SHUTDOWN_HOURS ""          "the daemon exits after this many hours (its --hours; the flag --hours wins); empty: AUTO_SHUTDOWN_HOURS in perpetual_motion.py"
setting DAEMON_ARGS         ""          "more flags for perpetual_motion.py, split at spaces (e.g. --kill-scope task)"
setting JOB_NAME_PREFIX     "ydj-"      "the job's display name is <prefix><JOB_ID>"
setting SCO_WORKSPACE       ""          "sco: --workspace-name (required)"
setting SCO_AEC2            ""          "sco: --aec2-name, the cluster (required)"
setting SCO_IMAGE           ""          "sco: --container-image-url (required)"
setting SCO_STORAGE_MOUNT   ""          "sco: --storage-mount, VOLUME:/path[,...] that holds QUEUE_ROOT and CODE_DIR (required; 'none' for no flag)"
setting SCO_WORKER_SPEC     "n6ls.iu.i40.{GPUS}" "sco: --worker-spec template"
setting SCO_PRIORITY        "normal"    "sco: --priority"
setting SCO_FRAMEWORK       "pytorch"   "sco: --training-framework"
setting SCO_PROFILE         ""          "sco: global --profile (empty: none)"
setting SCO_EXTRA_ARGS      ""          "sco: more flags for 'sco acp jobs create', split at spaces (e.g. --quota-type=spot)"
setting PARTITION           ""          "slurm: --partition (empty: the cluster's default)"
setting GRES                "gpu:{GPUS}" "slurm: --gres template (empty, or GPUS=0: no --gres)"
setting EXCLUSIVE           "1"         "slurm: 1: --exclusive, the whole node for the daemon and its tasks; 0: share the node"
setting CPUS_PER_NODE       ""          "slurm: --cpus-per-task of the one task per node (empty: every CPU with EXCLUSIVE=1, else the cluster's default)"
setting MEM_PER_NODE        ""          "slurm: --mem, e.g. 200G (empty: all the node's memory, --mem=0, with EXCLUSIVE=1, else the cluster's default)"
setting SBATCH_EXTRA_ARGS   ""          "slurm: more flags for sbatch, split at spaces (e.g. --account=proj)"
setting LOCAL_WAIT_SECONDS  "15"        "local: seconds to wait for the daemon's first heartbeat"

# Protocol constants (docs/protocol.md) #############################################################

readonly JOB_ID_RE='^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$'
readonly HEARTBEAT_STALE_SECONDS=60  # dead after this, where the daemon does not say (an old one)
readonly SLURM_TIME_MARGIN_MINUTES=5  # the Slurm time limit leaves the daemon this long to stop
readonly DAEMON_FILE="perpetual_motion.py"
readonly MAX_COUNT=1024  # GPUs per node and nodes at most (the daemon and the client take no more)

# Exit codes, as the daemon's: 2 for a bad argument or setting, 3 when a live daemon holds the job.
readonly EXIT_USAGE=2
readonly EXIT_ALIVE=3

# Filled in by main.
BACKEND=""
JOB_ID=""
GPUS=""
GPUS_GIVEN=""  # 1 when GPUS was on the command line
NODES=""
FORCE=0
DRY_RUN=0
HOURS_FLAG=""
LAUNCH_TIME=""
LAUNCH_ID=""  # names this launch to every daemon it starts (--launch)
INSTANCE=""
LAUNCHER=""
TMP_DIR=""

# Helpers ###########################################################################################

#######################################
# Prints an error to stderr.
#######################################
err() {
  echo "${PROG}: error: $*" >&2
}

#######################################
# Prints a note to stderr.
#######################################
note() {
  echo "${PROG}: $*" >&2
}

#######################################
# Prints an error and exits with the usage code.
#######################################
die_usage() {
  err "$*"
  echo "Run '${PROG} --help' for help." >&2
  exit "${EXIT_USAGE}"
}

#######################################
# Quotes a word for sh and bash: as it is when it is plain, in double quotes when it holds a
# single quote and nothing that double quotes expand, else in single quotes.
# Arguments: the word.
#######################################
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  elif [[ "$1" == *\'* && "$1" != *[\"\$\`\\!]* ]]; then
    printf '"%s"' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

#######################################
# Quotes every argument and joins them with spaces.
#######################################
quote_all() {
  local word sep=""
  for word in "$@"; do
    printf '%s' "${sep}"
    quote "${word}"
    sep=" "
  done
}

#######################################
# Prints the help.
#######################################
usage() {
  cat <<EOF
Usage: ${PROG} [options] <JOB_ID> [GPUS] [NODES]

Launch the Perpetual Motion daemon for the queue <QUEUE_ROOT>/<JOB_ID>/ as a cluster job.

  JOB_ID   1-64 characters of A-Z a-z 0-9 . _ -, not starting with . or -
  GPUS     GPUs per node (default 2; 0 allowed with slurm and local; at most 1024)
  NODES    nodes (default 1, at most 1024); every node runs a daemon, node 0 runs the queue

Options:
  -b, --backend B   sco (SCO ACP, default), slurm (sbatch + srun) or local (this machine)
  -H, --hours H     the daemon exits after H hours (AUTO_SHUTDOWN_HOURS; default: the
                    constant AUTO_SHUTDOWN_HOURS in perpetual_motion.py)
  -f, --force       launch even when a daemon of JOB_ID is alive (passes --force to it)
  -n, --dry-run     print what would be written and run; change nothing
  -h, --help        this help

Settings (environment > ${SUBMIT_CONF:-${SCRIPT_DIR}/submit.conf} > default):
EOF
  local name empty="''"
  for name in "${SETTING_NAMES[@]}"; do
    printf '  %s=%s\n      %s\n' "${name}" "${SETTING_DEFAULT[${name}]:-${empty}}" \
      "${SETTING_HELP[${name}]}"
  done
  cat <<EOF

Examples:
  ${PROG} train-exp1                   # SCO ACP, 2 GPUs, 1 node
  ${PROG} train-exp3 8 2               # SCO ACP, 8 GPUs on each of 2 nodes
  ${PROG} --backend slurm train-exp1 4 # Slurm, 4 GPUs (GRES gpu:4)
  ${PROG} --backend local laptop       # this machine, in the background

Exit status: 0 launched, 1 the backend failed or its program (sco, sbatch) is not on PATH, 2 bad
argument or setting, 3 a daemon of JOB_ID is alive (use the client's gpu_shutdown first, or
--force).
EOF
}

# Settings and arguments ############################################################################

#######################################
# Succeeds when the argument is a number of hours above 0 (ASCII digits, an optional fraction).
#######################################
is_hours() {
  [[ "$1" =~ ^([0-9]+[.]?[0-9]*|[.][0-9]+)$ ]] && awk -v h="$1" 'BEGIN { exit !(h > 0) }'
}

#######################################
# Prints the hours after which the daemon exits: AUTO_SHUTDOWN_HOURS when set for this launch,
# else the constant AUTO_SHUTDOWN_HOURS of perpetual_motion.py in CODE_DIR (what the daemon uses
# without --hours); prints nothing when that cannot be read.
#######################################
daemon_hours() {
  if [[ -n "${AUTO_SHUTDOWN_HOURS}" ]]; then
    printf '%s' "${AUTO_SHUTDOWN_HOURS}"
    return
  fi
  local value
  value="$(sed -n -E 's/^AUTO_SHUTDOWN_HOURS[[:space:]]*=[[:space:]]*([0-9.]+)[[:space:]]*(#.*)?$/\1/p' \
    "${CODE_DIR}/${DAEMON_FILE}" 2>/dev/null | head -n 1)" || value=""
  if is_hours "${value}"; then
    printf '%s' "${value}"
  fi
}

#######################################
# Applies the settings: defaults, then the settings file, then the environment.
# Globals: every setting named in SETTING_NAMES; SUBMIT_CONF.
#######################################
load_settings() {
  local -A from_env=()
  local name conf
  for name in "${SETTING_NAMES[@]}"; do
    if [[ -v "${name}" ]]; then
      from_env["${name}"]="${!name}"
    fi
    unset "${name}"
  done
  conf="${SUBMIT_CONF:-${SCRIPT_DIR}/submit.conf}"
  if [[ -n "${SUBMIT_CONF:-}" && ! -e "${conf}" ]]; then
    die_usage "SUBMIT_CONF names a file that does not exist: ${conf}"
  fi
  if [[ -e "${conf}" ]]; then
    # shellcheck source=/dev/null
    source "${conf}"
  fi
  for name in "${SETTING_NAMES[@]}"; do
    if [[ -v from_env["${name}"] ]]; then
      printf -v "${name}" '%s' "${from_env[${name}]}"
    elif [[ ! -v "${name}" ]]; then
      printf -v "${name}" '%s' "${SETTING_DEFAULT[${name}]}"
    fi
  done
}

#######################################
# Parses the command line.
# Globals: BACKEND, FORCE, DRY_RUN, HOURS_FLAG, JOB_ID, GPUS, GPUS_GIVEN, NODES.
#######################################
parse_args() {
  local -a positional=()
  while (($# > 0)); do
    case "$1" in
      -h | --help)
        usage
        exit 0
        ;;
      -b | --backend)
        (($# >= 2)) || die_usage "$1 needs a value: sco, slurm or local"
        BACKEND="$2"
        shift
        ;;
      --backend=*) BACKEND="${1#*=}" ;;
      -H | --hours)
        (($# >= 2)) || die_usage "$1 needs a value: a number of hours"
        HOURS_FLAG="$2"
        shift
        ;;
      --hours=*) HOURS_FLAG="${1#*=}" ;;
      -f | --force) FORCE=1 ;;
      -n | --dry-run) DRY_RUN=1 ;;
      --)
        shift
        positional+=("$@")
        break
        ;;
      -?*) die_usage "unknown option: $1" ;;
      *) positional+=("$1") ;;
    esac
    shift
  done
  if ((${#positional[@]} < 1 || ${#positional[@]} > 3)); then
    die_usage "expected <JOB_ID> [GPUS] [NODES], got ${#positional[@]} argument(s)"
  fi
  JOB_ID="${positional[0]}"
  GPUS="${positional[1]:-2}"
  GPUS_GIVEN="${positional[1]:+1}"
  NODES="${positional[2]:-1}"
}

#######################################
# Names the settings that still hold a placeholder of submit.conf.example: a warning on a dry
# run, else a refusal before anything is created.
# Globals: every setting named in SETTING_NAMES; DRY_RUN.
#######################################
check_placeholders() {
  local name
  local -a found=()
  for name in "${SETTING_NAMES[@]}"; do
    case "${!name}" in
      *YOUR_NAME* | *YOUR_TEAM* | *VOLUME_ID* | *registry.example.com*) found+=("${name}") ;;
    esac
  done
  ((${#found[@]} > 0)) || return 0
  err "these settings still hold a placeholder of submit.conf.example (YOUR_NAME, YOUR_TEAM," \
    "VOLUME_ID, registry.example.com): ${found[*]}; set them in" \
    "${SUBMIT_CONF:-${SCRIPT_DIR}/submit.conf} or in the environment"
  ((DRY_RUN)) || exit "${EXIT_USAGE}"
}

#######################################
# Refuses bad arguments and settings before anything is created.
# Globals: BACKEND, JOB_ID, GPUS, NODES, QUEUE_ROOT, CODE_DIR and the other settings.
#######################################
validate() {
  BACKEND="${BACKEND:-${SUBMIT_BACKEND}}"
  case "${BACKEND}" in
    sco | slurm | local) ;;
    *) die_usage "unknown backend '${BACKEND}': use sco, slurm or local" ;;
  esac
  [[ "${JOB_ID}" =~ ${JOB_ID_RE} ]] \
    || die_usage "bad JOB_ID '${JOB_ID}': 1-64 characters of A-Z a-z 0-9 . _ -, not starting with . or -"
  # at most 4 digits first: bash's arithmetic wraps longer numbers (2**64 + 1 is 1)
  if ! [[ "${GPUS}" =~ ^(0|[1-9][0-9]{0,3})$ ]] || ((GPUS > MAX_COUNT)); then
    die_usage "bad GPUS '${GPUS}': a whole number, at most ${MAX_COUNT}"
  fi
  if [[ "${GPUS}" == 0 && "${BACKEND}" == sco ]]; then
    die_usage "GPUS must be at least 1 on SCO ACP"
  fi
  if ! [[ "${NODES}" =~ ^[1-9][0-9]{0,3}$ ]] || ((NODES > MAX_COUNT)); then
    die_usage "bad NODES '${NODES}': a whole number, at least 1 and at most ${MAX_COUNT}"
  fi
  if [[ -n "${HOURS_FLAG}" ]]; then
    AUTO_SHUTDOWN_HOURS="${HOURS_FLAG}"
  fi
  if [[ -n "${AUTO_SHUTDOWN_HOURS}" ]] && ! is_hours "${AUTO_SHUTDOWN_HOURS}"; then
    die_usage "bad AUTO_SHUTDOWN_HOURS '${AUTO_SHUTDOWN_HOURS}': a number of hours above 0"
  fi
  [[ "${LOCAL_WAIT_SECONDS}" =~ ^[0-9]+$ ]] \
    || die_usage "bad LOCAL_WAIT_SECONDS '${LOCAL_WAIT_SECONDS}': a whole number"
  [[ "${JOB_NAME_PREFIX}" =~ ^[A-Za-z0-9._:-]*$ ]] \
    || die_usage "bad JOB_NAME_PREFIX '${JOB_NAME_PREFIX}': letters, digits, . : _ - only"
  [[ "${EXCLUSIVE}" =~ ^[01]$ ]] || die_usage "bad EXCLUSIVE '${EXCLUSIVE}': 1 or 0"
  [[ "${CPUS_PER_NODE}" =~ ^([1-9][0-9]*)?$ ]] \
    || die_usage "bad CPUS_PER_NODE '${CPUS_PER_NODE}': a whole number above 0, or empty"
  [[ "${MEM_PER_NODE}" =~ ^([0-9]+[KMGT]?)?$ ]] \
    || die_usage "bad MEM_PER_NODE '${MEM_PER_NODE}': a size such as 200G (K, M, G, T; no unit: MB), or empty"

  local -a missing=()
  if [[ "${BACKEND}" == sco ]]; then
    local name
    for name in QUEUE_ROOT SCO_WORKSPACE SCO_AEC2 SCO_IMAGE SCO_STORAGE_MOUNT SCO_WORKER_SPEC; do
      [[ -n "${!name}" ]] || missing+=("${name}")
    done
  elif [[ -z "${QUEUE_ROOT}" ]]; then
    QUEUE_ROOT="${HOME:?}/gpu_queue"
  fi
  [[ -n "${CODE_DIR}" ]] || missing+=(CODE_DIR)
  [[ -n "${PYTHON}" ]] || missing+=(PYTHON)
  if ((${#missing[@]} > 0)); then
    err "backend ${BACKEND} needs these settings, which are empty:"
    local name
    for name in "${missing[@]}"; do
      printf '  %-18s %s\n' "${name}" "${SETTING_HELP[${name}]}" >&2
    done
    echo "Set them in ${SUBMIT_CONF:-${SCRIPT_DIR}/submit.conf} (see submit.conf.example)" \
      "or in the environment." >&2
    exit "${EXIT_USAGE}"
  fi
  check_placeholders

  local path_name
  for path_name in QUEUE_ROOT CODE_DIR CONDA_PATH; do
    if [[ "${!path_name}" == *$'\n'* ]]; then
      die_usage "${path_name} contains a newline"
    fi
  done
  if [[ "${QUEUE_ROOT}" != /* || "${CODE_DIR}" != /* ]]; then
    if [[ "${BACKEND}" == sco ]]; then
      die_usage "QUEUE_ROOT and CODE_DIR must be absolute paths, as the workers see them"
    fi
    [[ "${QUEUE_ROOT}" == /* ]] || QUEUE_ROOT="${PWD}/${QUEUE_ROOT}"
    [[ "${CODE_DIR}" == /* ]] || CODE_DIR="${PWD}/${CODE_DIR}"
  fi
  if [[ ! -f "${CODE_DIR}/perpetual_motion.py" ]]; then
    if [[ "${BACKEND}" == local ]]; then
      die_usage "no perpetual_motion.py in CODE_DIR=${CODE_DIR}"
    fi
    note "warning: no perpetual_motion.py in CODE_DIR=${CODE_DIR} here; the nodes must see one"
  fi
  if [[ ! -d "${QUEUE_ROOT}" && ! -d "$(dirname -- "${QUEUE_ROOT}")" ]]; then
    local problem="neither QUEUE_ROOT=${QUEUE_ROOT} nor its parent exists here"
    if ((DRY_RUN)); then
      note "warning: ${problem}"
    else
      die_usage "${problem} (is the shared storage mounted on this machine?)"
    fi
  fi
  INSTANCE="${QUEUE_ROOT%/}/${JOB_ID}"
  LAUNCHER="${INSTANCE}/launch.sh"
}

#######################################
# Exits 1 when the backend's program is not on PATH, before anything is written (a dry run
# needs none).
#######################################
check_tool() {
  local tool hint
  case "${BACKEND}" in
    sco) tool=sco hint="install the SenseCore CLI, or use --backend slurm|local" ;;
    slurm) tool=sbatch hint="run this on a Slurm login node, or use --backend sco|local" ;;
    *) return 0 ;;
  esac
  if ((!DRY_RUN)) && ! command -v "${tool}" >/dev/null; then
    err "${tool} is not on PATH (${hint}); nothing was written"
    exit 1
  fi
}

# Queue folder ######################################################################################

#######################################
# Prints the value of one key of a key=value file (empty when absent).
# Arguments: file, key.
#######################################
read_key() {
  sed -n "/^$2=/{s///p;q;}" "$1" 2>/dev/null || true
}

#######################################
# Prints the whole seconds after which the daemon of a node state file is dead: what the daemon
# publishes (liveness.stale_after), or HEARTBEAT_STALE_SECONDS for a value that is missing or not
# a number of 1 s to a day.
# Arguments: the node state file.
#######################################
stale_after() {
  local value
  value="$(read_key "$1" 'liveness[.]stale_after')"
  if [[ "${value}" =~ ^([0-9]{1,5})([.][0-9]+)?$ ]] && ((10#${BASH_REMATCH[1]} >= 1)) \
    && ((10#${BASH_REMATCH[1]} <= 86400)); then
    echo "$((10#${BASH_REMATCH[1]}))"
  else
    echo "${HEARTBEAT_STALE_SECONDS}"
  fi
}

#######################################
# Refuses to launch when a daemon of the job is alive (fresh heartbeat, not stopped), unless
# forced. Warns about an earlier launch whose daemon has not started (still queued?).
#######################################
check_not_alive() {
  local state_file status heartbeat age stale alive=0 started last_start=0
  local -a seen=()
  for state_file in "${INSTANCE}"/nodes/node-*.state; do
    [[ -f "${state_file}" ]] || continue
    started="$(read_key "${state_file}" started)"
    if [[ "${started}" =~ ^[0-9]+([.][0-9]*)?$ ]] && ((${started%.*} > last_start)); then
      last_start="${started%.*}"
    fi
    status="$(read_key "${state_file}" status)"
    heartbeat="$(read_key "${state_file}" heartbeat)"
    [[ "${heartbeat}" =~ ^[0-9]+([.][0-9]*)?$ && "${status}" != stopped ]] || continue
    age="$(awk -v hb="${heartbeat}" -v now="$(date +%s)" 'BEGIN { printf "%d", now - hb }')"
    stale="$(stale_after "${state_file}")"
    if ((age < stale)); then
      alive=1
      seen+=("node $(read_key "${state_file}" node_rank) on $(read_key "${state_file}" host)
(pid $(read_key "${state_file}" pid), ${status}, heartbeat ${age} s ago)")
    fi
  done
  if ((alive)); then
    local who
    who="$(printf '%s; ' "${seen[@]}" | tr '\n' ' ')"
    who="${who%; }"
    if ((FORCE)); then
      note "warning: a daemon of ${JOB_ID} is alive: ${who}; launching anyway (--force)"
      return
    fi
    err "a daemon of ${JOB_ID} is alive: ${who}."
    echo "Stop it first (export JOB_ID=${JOB_ID}; gpu_shutdown), or launch anyway with --force." >&2
    exit "${EXIT_ALIVE}"
  fi
  local previous="${INSTANCE}/job_id.txt" submitted
  submitted="$(read_key "${previous}" submitted)"
  if [[ "${submitted}" =~ ^[0-9]+$ ]] && ((submitted > last_start)); then
    note "warning: the last launch of ${JOB_ID}, $(read_key "${previous}" backend) job" \
      "$(read_key "${previous}" cluster_job_id) of $(date -d "@${submitted}" '+%F %T')," \
      "has not started a daemon yet; if it is still queued, delete it, or it will start one too"
  fi
}

#######################################
# Prints a unique name, as docs/protocol.md has it: <UTC time>_<nanoseconds>-<8 hex digits>.
#######################################
unique_name() {
  printf '%s-%s' "$(date -u +%Y%m%d_%H%M%S_%N)" "$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')"
}

#######################################
# Publishes a file the protocol's way: written under .staging/, flushed, then renamed.
# Arguments: destination, mode; the content comes on stdin.
#######################################
publish() {
  local staged
  staged="${INSTANCE}/.staging/.$(unique_name)-$(basename -- "$1")"
  cat >"${staged}"
  chmod "$2" "${staged}"
  sync "${staged}"
  mv -f -- "${staged}" "$1"
}

#######################################
# Creates the instance folder (and the queue root when only it is missing).
#######################################
make_instance() {
  if [[ ! -d "${QUEUE_ROOT}" ]]; then
    mkdir -- "${QUEUE_ROOT}"
    note "created the queue root ${QUEUE_ROOT}"
  fi
  # only the user reads the instance (records hold -e values) or writes it (the daemon refuses a
  # folder that others may write), whatever the umask; --shared-queue teams chmod g+w it
  (umask 077 && mkdir -p -- "${INSTANCE}/.staging")
}

#######################################
# Saves the cluster's job id to job_id.txt.
# Arguments: cluster job id, more key=value lines.
#######################################
save_job_id() {
  local cluster_job_id="$1"
  shift
  {
    echo "backend=${BACKEND}"
    echo "cluster_job_id=${cluster_job_id}"
    echo "job_name=${JOB_NAME_PREFIX}${JOB_ID}"
    echo "job_id=${JOB_ID}"
    echo "gpus=${GPUS}"
    echo "nodes=${NODES}"
    echo "submitted=${LAUNCH_TIME}"
    echo "launch=${LAUNCH_ID}"
    echo "submitted_at=$(date '+%F %T %z')"
    echo "submitted_by=${USER:-$(id -un)}@$(hostname)"
    printf '%s\n' "$@"
  } | publish "${INSTANCE}/job_id.txt" 0644
}

# Launcher ##########################################################################################

#######################################
# Prints the daemon's command line (quoted), with its node rank named. The daemon would find the
# rank in the environment too, but a RANK, WORLD_SIZE, SLURM_* or SENSECORE_* variable that the
# user's shell exported (and sbatch or setsid passed on) must not make it another node.
#######################################
daemon_command() {
  local -a extra=()
  read -ra extra <<<"${DAEMON_ARGS}"
  if ((FORCE)); then
    extra+=(--force)
  fi
  quote_all "${PYTHON}" "${DAEMON_FILE}" --job-id "${JOB_ID}" --queue-root "${QUEUE_ROOT}" \
    --launch "${LAUNCH_ID}"
  # Without --hours the daemon's own constant rules, so that editing it takes effect.
  if [[ -n "${AUTO_SHUTDOWN_HOURS}" ]]; then
    printf ' --hours %s' "$(quote "${AUTO_SHUTDOWN_HOURS}")"
  fi
  # shellcheck disable=SC2016  # expanded by launch.sh on the node, not here
  case "${BACKEND}" in
    sco) printf ' %s' '"${node_flags[@]}"' ;;
    slurm) printf ' %s' '--node-rank "${SLURM_NODEID:-0}" --num-nodes "${SLURM_NNODES:-1}"' ;;
    local)
      # one daemon per rank on this machine, each started with PM_LOCAL_RANK
      printf ' %s' '--node-rank "${PM_LOCAL_RANK:-0}"' "--num-nodes ${NODES}"
      # the GPUs of this machine that tasks get (without NVML: that many declared slots)
      if [[ -n "${GPUS_GIVEN}" ]]; then printf ' --gpus %s' "${GPUS}"; fi ;;
  esac
  if ((${#extra[@]} > 0)); then
    printf ' %s' "$(quote_all "${extra[@]}")"
  fi
}

#######################################
# Prints launch.sh: what every node runs. Paths are quoted into it, so a command line that only
# names this file survives any path.
#######################################
launcher_script() {
  cat <<EOF
#!/usr/bin/env bash
# Written by submit.sh ($(date '+%F %T')) for the instance ${JOB_ID}, backend ${BACKEND}.
# Every node of the job runs this file; submit.sh rewrites it at each launch.
EOF
  if [[ -n "${CONDA_PATH}" ]]; then
    echo "source $(quote_all "${CONDA_PATH}" ${CONDA_ENV:+"${CONDA_ENV}"}) || exit 1"
  fi
  cat <<EOF
cd $(quote "${CODE_DIR}") || exit 1
export JOB_ID=$(quote "${JOB_ID}") QUEUE_ROOT=$(quote "${QUEUE_ROOT}") PYTHONUNBUFFERED=1
EOF
  if [[ "${BACKEND}" != local ]]; then
    # A cluster node: a stop also ends the user's other Python processes there (kill scope auto).
    echo "export PM_CLUSTER_JOB=${BACKEND}"
  fi
  if [[ "${BACKEND}" == sco ]]; then
    # shellcheck disable=SC2016  # expanded by launch.sh on the node, not here
    printf '%s\n' \
      '# SCO ACP gives each worker its rank; named here, a stray RANK or WORLD_SIZE cannot win.' \
      'node_flags=()' \
      'if [ -n "${SENSECORE_PYTORCH_NODE_RANK:-}" ]; then' \
      '  node_flags=(--node-rank "${SENSECORE_PYTORCH_NODE_RANK}"' \
      '    --num-nodes "${SENSECORE_PYTORCH_NNODES:-1}")' \
      'fi'
  fi
  echo "exec $(daemon_command)"
}

#######################################
# Writes launch.sh into the instance, or prints it on a dry run.
#######################################
write_launcher() {
  if ((DRY_RUN)); then
    echo "# ${LAUNCHER} would be:"
    launcher_script | sed 's/^/    /'
    return
  fi
  make_instance
  launcher_script | publish "${LAUNCHER}" 0755
}

#######################################
# Prints a command (quoted) on a dry run, else runs it.
#######################################
run_or_show() {
  if ((DRY_RUN)); then
    echo "# would run:"
    local word line="   "
    for word in "$@"; do
      if [[ "${word}" == -* && "${line}" != "   " ]]; then
        echo "${line} \\"
        line="     "
      fi
      line+=" $(quote "${word}")"
    done
    echo "${line}"
    return 0
  fi
  "$@"
}

#######################################
# Prints the client lines that fit every backend.
#######################################
print_client_hint() {
  cat <<EOF
  client:  export JOB_ID=$(quote "${JOB_ID}") QUEUE_ROOT=$(quote "${QUEUE_ROOT}"); source $(quote "${CODE_DIR}/client.sh"); gpu_status
EOF
}

# Backends ##########################################################################################

#######################################
# Prints the sco commands for a job.
# Arguments: pt- id, display name, --workspace-name=... flag.
#######################################
sco_commands() {
  local id="$1" name="$2" p="" w
  if [[ -n "${SCO_PROFILE}" ]]; then
    p="$(quote "--profile=${SCO_PROFILE}") "
  fi
  w="$(quote "$3")"
  cat <<EOF
  list:    sco ${p}acp jobs list ${w} | grep -e ${id} -e ${name}
  workers: sco ${p}acp jobs get-workers ${w} ${id}
  exec:    sco ${p}acp jobs exec ${w} --worker-name="\$(sco ${p}acp jobs get-workers ${w} ${id} | grep worker-0 | awk -F'|' '{print \$2}' | xargs)" ${id}
  logs:    sco ${p}acp jobs stream-logs ${w} --follow ${id}
  delete:  sco ${p}acp jobs delete ${w} ${id}
EOF
}

#######################################
# SCO ACP: `sco acp jobs create`, with a --command that runs launch.sh.
#######################################
launch_sco() {
  local -a global=() extra=() mounts=() cmd
  if [[ -n "${SCO_PROFILE}" ]]; then
    global=("--profile=${SCO_PROFILE}")
  fi
  if [[ "${SCO_STORAGE_MOUNT}" != none ]]; then
    mounts=("--storage-mount=${SCO_STORAGE_MOUNT}")
  fi
  read -ra extra <<<"${SCO_EXTRA_ARGS}"
  local spec="${SCO_WORKER_SPEC//\{GPUS\}/${GPUS}}"
  local name="${JOB_NAME_PREFIX}${JOB_ID}"
  local ws="--workspace-name=${SCO_WORKSPACE}"
  cmd=(sco "${global[@]}" acp jobs create
    "${ws}"
    "--aec2-name=${SCO_AEC2}"
    "--job-name=${name}"
    "--container-image-url=${SCO_IMAGE}"
    "--training-framework=${SCO_FRAMEWORK}"
    "--worker-nodes=${NODES}"
    "--worker-spec=${spec}"
    "--priority=${SCO_PRIORITY}"
    "${mounts[@]}"
    "${extra[@]}"
    "--command=bash $(quote "${LAUNCHER}")")

  write_launcher
  if ((DRY_RUN)); then
    run_or_show "${cmd[@]}"
    return
  fi

  local out="${TMP_DIR}/sco.out" errs="${TMP_DIR}/sco.err" status=0
  "${cmd[@]}" >"${out}" 2>"${errs}" </dev/null || status=$?
  # The id stands alone: not the "pt-run" of a display name such as ydj-opt-run or prompt-x.
  local pt_id
  pt_id="$(grep -oE '(^|[^A-Za-z0-9_-])pt-[a-z0-9]+' "${out}" | head -n 1 | sed 's/^.*pt-/pt-/')" \
    || true
  if [[ -z "${pt_id}" ]]; then
    if ((status != 0)); then
      err "sco acp jobs create failed (exit ${status}). It said:"
    else
      err "sco acp jobs create printed no pt- job id. It said:"
    fi
    sed 's/^/  /' "${out}" "${errs}" >&2
    echo "The command was: $(quote_all "${cmd[@]}")" >&2
    exit 1
  fi
  save_job_id "${pt_id}" "workspace=${SCO_WORKSPACE}" "aec2=${SCO_AEC2}" "profile=${SCO_PROFILE}"
  if ((status != 0)); then
    # The job may have been created before sco failed: keep its id, so that it can be deleted.
    err "sco acp jobs create failed (exit ${status}) after it printed the job id ${pt_id}. It said:"
    sed 's/^/  /' "${out}" "${errs}" >&2
    note "warning: the job ${pt_id} may exist all the same; it is saved in ${INSTANCE}/job_id.txt."
    echo "Check it, and delete it if it is there:" >&2
    sco_commands "${pt_id}" "${name}" "${ws}" >&2
    exit 1
  fi
  cat <<EOF
Submitted ${pt_id} (display name ${name}) to SCO ACP: ${NODES} node(s) of ${spec}.
Saved to ${INSTANCE}/job_id.txt. Commands (by the pt- id; the display name does not work):
$(sco_commands "${pt_id}" "${name}" "${ws}")
$(print_client_hint)
EOF
}

#######################################
# Slurm: sbatch a job whose script starts one daemon per node with srun.
#######################################
launch_slurm() {
  local -a extra=() node=() gres=() partition=() cmd
  read -ra extra <<<"${SBATCH_EXTRA_ARGS}"
  # Tasks run inside the job's allocation: on a cluster that confines jobs (cgroups), a job of
  # one CPU and the default memory would confine every training run too.
  if ((EXCLUSIVE)); then
    node+=(--exclusive)
  fi
  if [[ -n "${CPUS_PER_NODE}" ]]; then
    node+=("--cpus-per-task=${CPUS_PER_NODE}")
  fi
  if [[ -n "${MEM_PER_NODE}" ]]; then
    node+=("--mem=${MEM_PER_NODE}")
  elif ((EXCLUSIVE)); then
    node+=(--mem=0)  # --exclusive gives every CPU but only the memory asked for; 0: all of it
  fi
  if [[ -n "${GRES}" ]] && ((GPUS > 0)); then
    gres=("--gres=${GRES//\{GPUS\}/${GPUS}}")
  fi
  if [[ -n "${PARTITION}" ]]; then
    partition=("--partition=${PARTITION}")
  fi
  # The time limit follows the daemon's auto-shutdown (a few minutes more, so that it stops by
  # itself); when its constant cannot be read, the partition's default limit applies.
  local hours minutes limit_text="the partition's default" time_limit=()
  hours="$(daemon_hours)"
  if [[ -n "${hours}" ]]; then
    minutes="$(awk -v h="${hours}" -v m="${SLURM_TIME_MARGIN_MINUTES}" \
      'BEGIN { t = h * 60; printf "%d", (t == int(t) ? t : int(t) + 1) + m }')"
    time_limit=("--time=${minutes}")
    limit_text="${minutes} min"
  else
    note "warning: cannot read AUTO_SHUTDOWN_HOURS from ${CODE_DIR}/${DAEMON_FILE}; no --time" \
      "is given (the partition's default time limit applies). Set AUTO_SHUTDOWN_HOURS to choose."
  fi
  local name="${JOB_NAME_PREFIX}${JOB_ID}"
  # Not under logs/: the protocol keeps that folder for task logs. In Slurm's file names %
  # starts a pattern; %% is a plain %.
  local output="${INSTANCE}/daemon.log"
  output="${output//%/%%}"
  cmd=(sbatch --parsable
    "--job-name=${name}"
    "--nodes=${NODES}"
    --ntasks-per-node=1
    "${node[@]}"
    "${gres[@]}"
    "${partition[@]}"
    "${time_limit[@]}"
    "--chdir=${INSTANCE}"
    "--output=${output}"
    --open-mode=append
    "${extra[@]}"
    "--wrap=srun --ntasks-per-node=1 --kill-on-bad-exit=0 bash $(quote "${LAUNCHER}")")

  write_launcher
  if ((DRY_RUN)); then
    run_or_show "${cmd[@]}"
    return
  fi
  local out status=0
  out="$("${cmd[@]}" </dev/null 2>"${TMP_DIR}/sbatch.err")" || status=$?
  local slurm_id="${out%%;*}"
  if ((status != 0)) || ! [[ "${slurm_id}" =~ ^[0-9]+$ ]]; then
    err "sbatch failed (exit ${status}). It said:"
    printf '%s\n' "${out}" | sed 's/^/  /' >&2
    sed 's/^/  /' "${TMP_DIR}/sbatch.err" >&2
    echo "The command was: $(quote_all "${cmd[@]}")" >&2
    exit 1
  fi
  save_job_id "${slurm_id}"
  cat <<EOF
Submitted Slurm job ${slurm_id} (name ${name}, ${NODES} node(s), time limit ${limit_text}).
Saved to ${INSTANCE}/job_id.txt. Commands:
  status:  squeue -j ${slurm_id}
  log:     tail -f $(quote "${INSTANCE}/daemon.log")
  cancel:  scancel ${slurm_id}    (gpu_shutdown stops the daemon cleanly)
$(print_client_hint)
EOF
}

#######################################
# Stops the local daemon that this launch started and that did not come up: SIGTERM, then
# SIGKILL after a few seconds.
# Arguments: its pid.
#######################################
stop_local_daemon() {
  local i
  kill -TERM "$1" 2>/dev/null || return 0
  for ((i = 0; i < 50; i++)); do
    kill -0 "$1" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

#######################################
# Local: the daemon in the background on this machine, in its own session. job_id.txt is
# written once its heartbeat is seen: a daemon that did not start leaves no job behind.
#######################################
launch_local() {
  local log="${INSTANCE}/daemon.log"
  write_launcher
  if ((DRY_RUN)); then
    echo "# would run in the background, in its own session, appending to $(quote "${log}"),"
    echo "# for each rank R of 0..$((NODES - 1)):"
    echo "    PM_LOCAL_RANK=R setsid nohup bash $(quote "${LAUNCHER}")"
    return
  fi
  # This shell is no process-group leader's child with job control, so setsid runs in place
  # and $! is the daemon's pid (bash execs the daemon).
  local rank
  local -a pids=()
  for ((rank = 0; rank < NODES; rank++)); do
    PM_LOCAL_RANK="${rank}" setsid nohup bash "${LAUNCHER}" >>"${log}" 2>&1 </dev/null &
    pids+=("$!")
  done

  local i pid status
  for ((rank = 0; rank < NODES; rank++)); do
    pid="${pids[rank]}"
    local state_file="${INSTANCE}/nodes/node-${rank}.state" started=0
    for ((i = 0; i < LOCAL_WAIT_SECONDS * 10; i++)); do
      if ! kill -0 "${pid}" 2>/dev/null; then
        status=0
        wait "${pid}" || status=$?
        for pid in "${pids[@]}"; do stop_local_daemon "${pid}"; done
        err "the daemon exited at once (status ${status}); nothing was launched. The end of" \
          "${log}:"
        tail -n 15 "${log}" | sed 's/^/  /' >&2
        if tail -n 15 "${log}" | grep -q -e 'is missing from' -e 'No module named'; then
          err "the daemon ran with PYTHON=${PYTHON}: install the package into that Python, or" \
            "set PYTHON= in ${SUBMIT_CONF:-${SCRIPT_DIR}/submit.conf} to a Python that has it"
        fi
        exit "$((status == EXIT_ALIVE ? EXIT_ALIVE : 1))"
      fi
      if [[ "$(read_key "${state_file}" pid)" == "${pid}" \
        && "$(read_key "${state_file}" status)" == running ]]; then
        started=1
        break
      fi
      sleep 0.1
    done
    if ((!started)); then
      for pid in "${pids[@]}"; do stop_local_daemon "${pid}"; done
      err "no heartbeat from the daemon (pid ${pids[rank]}) within ${LOCAL_WAIT_SECONDS} s" \
        "(LOCAL_WAIT_SECONDS); it was stopped and nothing was launched. The end of ${log}:"
      tail -n 15 "${log}" | sed 's/^/  /' >&2
      exit 1
    fi
  done
  save_job_id "local-${pids[0]}" "pid=${pids[0]}" "pids=${pids[*]}" "host=$(hostname)"
  cat <<EOF
Started the daemon of ${JOB_ID} on this machine: pid ${pids[*]}, log $(quote "${log}").
Saved to ${INSTANCE}/job_id.txt. Stop it with gpu_shutdown (or: kill ${pids[*]}).
$(print_client_hint)
EOF
}

#######################################
# Removes the temporary folder.
#######################################
cleanup() {
  if [[ -n "${TMP_DIR}" ]]; then
    rm -rf -- "${TMP_DIR}"
  fi
}

main() {
  parse_args "$@"
  load_settings
  validate
  check_tool
  check_not_alive
  TMP_DIR="$(mktemp -d)"
  trap cleanup EXIT
  LAUNCH_TIME="$(date +%s)"  # before the launch: a daemon's start is never earlier
  LAUNCH_ID="${LAUNCH_TIME}-$$-${RANDOM}"
  if ((DRY_RUN)); then
    echo "# dry run: ${BACKEND}, JOB_ID=${JOB_ID}, GPUS=${GPUS}, NODES=${NODES};" \
      "queue ${INSTANCE}; nothing is written"
  fi
  "launch_${BACKEND}"
}

main "$@"

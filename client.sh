# shellcheck shell=bash
# client.sh: the Perpetual Motion client, sourced into bash (4.2+) or zsh (5+).
#
# Install: put this line in ~/.bashrc or ~/.zshrc (in zsh after compinit, for tab completion):
#
#     source /path/to/client.sh
#
# then `gpu_help` lists the commands. It needs only bash or zsh and coreutils (ls, sed, sort, date,
# head, tail, od, cp, mv, mkdir, dd): no Python on the login machine. It writes and reads the
# queue folder exactly as docs/protocol.md says, so it works from any host that mounts it.
#
# Settings, read at every call:
#   JOB_ID             the instance (one daemon and its queue); `gpu_use ID` sets it
#   QUEUE_ROOT         the queue root on shared storage; default $HOME/gpu_queue, as the daemon's
#   GPU_REPLY_TIMEOUT  seconds gpu_stop and gpu_shutdown wait for the daemon's reply (default 15)
#
# Every command runs in a subshell with its own options, so the user's `set -e`, `set -u`,
# `set -o pipefail`, aliases and zsh options neither break it nor are changed by it, and it leaves
# no variables behind (only `gpu_use ID` sets JOB_ID). Private helpers are named `_gpu_*`.
# Return codes: 0 success, 1 failure (no such task, no daemon, missing root, a write that
# failed), 2 bad usage (arguments, JOB_ID), 127 unknown command (gpu_help NAME).

# Aliases are expanded while a file is read: read this one without them (restored at the end).
if [ -n "${ZSH_VERSION-}" ]; then
  if [[ -o aliases ]]; then _gpu_restore_aliases='setopt aliases'; unsetopt aliases; fi
elif shopt -q expand_aliases 2>/dev/null; then
  _gpu_restore_aliases='shopt -s expand_aliases'; shopt -u expand_aliases
fi

# Public commands ###################################################################################

gpu_help() { _gpu_main help "$@"; }
gpu_list() { _gpu_main list "$@"; }
gpu_submit() { _gpu_main submit "$@"; }
gpu_run() { _gpu_main run "$@"; }
gpu_status() { _gpu_main status "$@"; }
gpu_logs() { _gpu_main logs "$@"; }
gpu_tail() { _gpu_main tail "$@"; }
gpu_stop() { _gpu_main stop "$@"; }
gpu_shutdown() { _gpu_main shutdown "$@"; }

# The one command that changes the user's shell: it runs in it, with nothing but the export.
gpu_use() {
  _gpu_main use "$@" || return
  if [ "$#" -eq 1 ]; then export JOB_ID="$1"; fi
}

# Every command runs in a subshell: options, variables, traps and `cd` stay inside it.
_gpu_main() ( _gpu_dispatch "$@" )

_gpu_dispatch() {  # _gpu_dispatch COMMAND ARGS...: set the subshell up, run _gpu_cmd_COMMAND
  # the user's ERR, DEBUG and RETURN traps are not for the client's own commands
  if [ -n "${ZSH_VERSION-}" ]; then
    trap - ZERR DEBUG
    emulate -R sh
  else
    trap - ERR DEBUG RETURN
    set +E +T
    shopt -u nocasematch nocaseglob failglob nullglob dotglob 2>/dev/null
    unset GLOBIGNORE
  fi
  set +e +u +x +v +C -f
  set +o pipefail 2>/dev/null
  IFS=' 	
'
  LC_ALL=C
  export LC_ALL
  unset QUOTING_STYLE CLICOLOR_FORCE LS_COLORS TIME_STYLE POSIXLY_CORRECT
  _gpu_nl='
'
  _gpu_keys=
  _gpu_cmd=$1
  shift
  "_gpu_cmd_$_gpu_cmd" "$@"
}

# Helpers ###########################################################################################

_gpu_err() {
  local IFS=' '
  printf 'gpu_%s: %s\n' "$_gpu_cmd" "$*" >&2
}

_gpu_usage() {  # _gpu_usage 'ARGS': the usage line of the current command; returns 2
  _gpu_err "usage: gpu_$_gpu_cmd${1:+ $1}"
  return 2
}

_gpu_valid_id() {  # protocol: ^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$
  case $1 in ''|[.-]*|*[!A-Za-z0-9._-]*) return 1 ;; esac
  [ "${#1}" -le 64 ]
}

_gpu_bad_id() {  # _gpu_bad_id ID: the message for an invalid JOB_ID; returns 2
  _gpu_err "'$1' is not a valid JOB_ID (1-64 of A-Z a-z 0-9 . _ -, not starting with . or -)"
  return 2
}

_gpu_root() {  # sets _gpu_r to the queue root; 1 when it does not exist
  _gpu_r=${QUEUE_ROOT:-${HOME-}/gpu_queue}
  [ -d "$_gpu_r" ] && return 0
  _gpu_err "the queue root $_gpu_r does not exist (shared storage not mounted? set QUEUE_ROOT)"
  return 1
}

_gpu_instance() {  # checks JOB_ID and the root; sets _gpu_q to the instance folder
  if [ -z "${JOB_ID-}" ]; then
    _gpu_err "JOB_ID is not set: choose an instance with gpu_use ID (gpu_list shows them)"
    return 2
  fi
  _gpu_valid_id "$JOB_ID" || { _gpu_bad_id "$JOB_ID"; return 2; }
  _gpu_root || return 1
  _gpu_q=$_gpu_r/$JOB_ID
}

_gpu_existing_instance() {  # as _gpu_instance, and the folder must exist
  _gpu_instance || return
  [ -d "$_gpu_q" ] && return 0
  _gpu_err "no instance $JOB_ID under $_gpu_r (gpu_list shows them)"
  return 1
}

_gpu_ls() {  # _gpu_ls DIR: published names in DIR (no dot-names) in run order, one a line
  command ls -1 -- "$1" 2>/dev/null
}

_gpu_count() {  # _gpu_count DIR: sets _gpu_n to the number of published names in DIR
  _gpu_n=$(_gpu_ls "$1" | command wc -l)
  _gpu_n=${_gpu_n//[!0-9]/}
}

_gpu_load() {  # _gpu_load FILE: a key=value file into _gpu_f_<key>; 1 when it cannot be read
  local line key IFS=' '
  # shellcheck disable=SC2086  # the names of the previous file's keys
  [ -z "$_gpu_keys" ] || unset $_gpu_keys
  _gpu_keys=
  [ -f "$1" ] && [ -r "$1" ] || return 1
  {
    while IFS= read -r line || [ -n "$line" ]; do
      key=${line%%=*}
      case $key in '' | *[!a-z0-9_.]* | "$line") continue ;; esac  # not a key=value line
      key=_gpu_f_${key//./_}
      eval "$key=\${line#*=}"
      _gpu_keys="$_gpu_keys $key"
    done < "$1"
  } 2>/dev/null
}

_gpu_field() {  # _gpu_field KEY: the loaded file's KEY into _gpu_val; 1 when absent
  eval "_gpu_val=\${_gpu_f_${1//./_}-}; [ -n \"\${_gpu_f_${1//./_}+set}\" ]"
}

_gpu_short() {  # _gpu_short ID: the name part of a client id (train.sh) into _gpu_s, else ID
  case $1 in
    [0-9][0-9][0-9]-[0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9]_[0-9][0-9][0-9][0-9][0-9][0-9]_[0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]-?*)
      _gpu_s=${1#*-*-*-} ;;
    *) _gpu_s=$1 ;;
  esac
}

_gpu_matches() {  # _gpu_matches ID NAME: does NAME name the task ID (id, name, name less .ext)?
  [ "$1" = "$2" ] && return 0
  _gpu_short "$1"
  [ "$_gpu_s" = "$2" ] || [ "${_gpu_s%.*}" = "$2" ]
}

_gpu_find() {  # _gpu_find NAME DIR...: "DIR/ID" lines of the matching tasks into _gpu_val
  local name=$1 dir id IFS=$_gpu_nl
  shift
  _gpu_val=
  for dir in "$@"; do
    for id in $(_gpu_ls "$_gpu_q/$dir"); do
      _gpu_matches "$id" "$name" && _gpu_val=$_gpu_val$dir/$id$_gpu_nl
    done
  done
  [ -n "$_gpu_val" ]
}

_gpu_check_name() {  # _gpu_check_name NAME: a task name cannot hold / or a newline
  case $1 in
    ''|*/*|*"$_gpu_nl"*|.*) _gpu_err "no such task: $1"; return 1 ;;
  esac
}

_gpu_now() { _gpu_t=$(command date +%s); }

_gpu_int() {  # _gpu_int VALUE: whole seconds of an epoch or a duration into _gpu_i; 1 if none
  _gpu_i=${1%%.*}
  case $_gpu_i in ''|*[!0-9]*) _gpu_i=0; return 1 ;; esac
  while [ "${#_gpu_i}" -gt 1 ] && [ "${_gpu_i#0}" != "$_gpu_i" ]; do _gpu_i=${_gpu_i#0}; done
}

_gpu_dur() {  # _gpu_dur SECONDS: 4.2s, 12m03s, 3h05m or 2d04h into _gpu_d; - when not a number
  local s m h f
  _gpu_int "$1" || { _gpu_d=-; return; }
  s=$_gpu_i
  if [ "$s" -lt 60 ]; then
    f=
    case $1 in *.[0-9]*) f=${1#*.}; f=.${f%"${f#?}"} ;; esac
    _gpu_d=$s${f}s
  elif [ "$s" -lt 3600 ]; then
    m=$((s / 60)); s=$((s % 60)); [ "$s" -lt 10 ] && s=0$s
    _gpu_d=${m}m${s}s
  elif [ "$s" -lt 86400 ]; then
    h=$((s / 3600)); m=$((s % 3600 / 60)); [ "$m" -lt 10 ] && m=0$m
    _gpu_d=${h}h${m}m
  else
    h=$((s % 86400 / 3600)); [ "$h" -lt 10 ] && h=0$h
    _gpu_d=$((s / 86400))d${h}h
  fi
}

_gpu_age() {  # _gpu_age EPOCH: how long ago (from _gpu_t) into _gpu_d; clock skew counts as 0
  _gpu_int "$1" || { _gpu_d=-; return; }
  if [ "$_gpu_t" -gt "$_gpu_i" ]; then _gpu_dur "$((_gpu_t - _gpu_i))"; else _gpu_d=0s; fi
}

_gpu_date() {  # _gpu_date EPOCH [FALLBACK]: local time, to the minute, for people
  _gpu_int "$1" || { printf '%s\n' "${2:--}"; return; }
  command date -d "@$_gpu_i" '+%Y-%m-%d %H:%M' 2>/dev/null \
    || command date -r "$_gpu_i" '+%Y-%m-%d %H:%M' 2>/dev/null || printf '%s\n' "${2:--}"
}

_gpu_node_alive() {  # on a loaded node state: 0 when alive (the protocol's liveness rule)
  _gpu_field status
  [ "$_gpu_val" = stopped ] && return 1
  _gpu_field heartbeat; _gpu_int "$_gpu_val" || return 1
  [ "$((_gpu_t - _gpu_i))" -lt 60 ]
}

_gpu_daemon_alive() {  # is node 0 of the instance alive? (it claims tasks and takes commands)
  _gpu_load "$_gpu_q/nodes/node-0.state" || return 1
  _gpu_now
  _gpu_node_alive
}

_gpu_node_files() {  # the node state files of the instance, by rank (node-2 before node-10)
  _gpu_ls "$_gpu_q/nodes" | command sed -n 's/^node-\([0-9][0-9]*\)\.state$/\1 &/p' \
    | command sort -n | command sed 's/^[0-9]* //'
}

_gpu_nodes() {  # "alive/known" nodes of the instance into _gpu_val (- when none has started)
  local node alive=0 known=0 expected=0 IFS=$_gpu_nl
  for node in $(_gpu_node_files); do
    _gpu_load "$_gpu_q/nodes/$node" || continue
    known=$((known + 1))
    _gpu_field num_nodes; _gpu_int "$_gpu_val" && [ "$_gpu_i" -gt "$expected" ] && expected=$_gpu_i
    _gpu_node_alive && alive=$((alive + 1))
  done
  [ "$expected" -gt "$known" ] && known=$expected  # nodes that have not written a state yet
  if [ "$known" -eq 0 ]; then _gpu_val=-; else _gpu_val=$alive/$known; fi
}

_gpu_whoami() {
  _gpu_who=${USER:-${LOGNAME:-$(command id -un 2>/dev/null)}}@${HOSTNAME:-${HOST:-$(command uname -n)}}
}

_gpu_unique() {  # a unique name (protocol): <UTC time>_<nanoseconds>-<8 hex>, into _gpu_u
  local now rand
  now=$(command date -u '+%Y%m%d_%H%M%S_%N %s.%N') || return 1
  rand=$(command od -An -N4 -tx1 /dev/urandom) || return 1
  rand=${rand//[!0-9a-f]/}
  case ${now%% *} in
    [0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9]_[0-9][0-9][0-9][0-9][0-9][0-9]_[0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9]) ;;
    *) _gpu_err "date does not print nanoseconds: the client needs GNU coreutils"; return 1 ;;
  esac
  [ "${#rand}" -eq 8 ] || { _gpu_err "cannot read /dev/urandom"; return 1; }
  _gpu_u=${now%% *}-$rand
  _gpu_epoch=${now#* }
}

_gpu_mv() {  # _gpu_mv SRC DST: rename; its error message into _gpu_msg
  _gpu_msg=$(command mv -f -- "$1" "$2" 2>&1) && return 0
  # NFS can answer ENOENT to a rename it has carried out (a retransmitted request)
  [ -e "$2" ] && [ ! -e "$1" ]
}

_gpu_write() {  # _gpu_write STAGED TEXT: write, fsync and close STAGED, each checked
  # dd reports a failed fsync or close, where AFS and NFS report a full disk or quota
  _gpu_msg=$(printf '%s' "$2" | command dd of="$1" conv=fsync status=none 2>&1)
}

_gpu_copy() {  # _gpu_copy FILE STAGED: copy FILE (with its mode bits), then fsync and close it
  _gpu_msg=$(command cp -- "$1" "$2" 2>&1 \
    && command dd if=/dev/null of="$2" conv=notrunc,fsync status=none 2>&1)
}

_gpu_failed() {  # _gpu_failed STAGED WHAT: remove STAGED, say WHAT failed and why; returns 1
  command rm -f -- "$1"
  _gpu_msg=${_gpu_msg%%"$_gpu_nl"*}
  _gpu_err "$2${_gpu_msg:+ ($_gpu_msg)}"
  return 1
}

_gpu_publish() {  # _gpu_publish STAGED TARGET: rename the flushed STAGED into place
  _gpu_mv "$1" "$2" || _gpu_failed "$1" "cannot publish $2"
}

_gpu_put() {  # _gpu_put TARGET TEXT: publish TEXT as the file TARGET (staged, then renamed)
  local staged=$_gpu_q/.staging/.$_gpu_u.${1##*/}
  _gpu_write "$staged" "$2" || { _gpu_failed "$staged" "cannot write $1"; return 1; }
  _gpu_publish "$staged" "$1"
}

_gpu_prepare() {  # _gpu_prepare DIR...: create the instance and DIRs for writing; _gpu_created
  local dir missing='' IFS=' '
  _gpu_created=
  [ -d "$_gpu_q" ] || _gpu_created=1
  for dir in .staging "$@"; do [ -d "$_gpu_q/$dir" ] || missing="$missing $dir"; done
  [ -z "$missing" ] && [ -f "$_gpu_q/control.json" ] && return 0
  for dir in $missing; do
    command mkdir -p -- "$_gpu_q/$dir" || { _gpu_err "cannot create $_gpu_q/$dir"; return 1; }
  done
  [ -f "$_gpu_q/control.json" ] && return 0
  _gpu_unique || return 1
  # the daemon writes the same marker; whoever comes second leaves the first one in place
  _gpu_write "$_gpu_q/.staging/.$_gpu_u.json" "{
  \"protocol\": 1,
  \"job_id\": \"$JOB_ID\"
}
" && command mv -n -- "$_gpu_q/.staging/.$_gpu_u.json" "$_gpu_q/control.json"
  command rm -f -- "$_gpu_q/.staging/.$_gpu_u.json"
}

_gpu_dead_note() {  # after a submit: say when no daemon will pick the task up soon
  local why
  if [ -n "$_gpu_created" ]; then
    why="created the instance $JOB_ID in $_gpu_r; no daemon is running for it yet"
  elif _gpu_daemon_alive; then
    _gpu_field status; [ "$_gpu_val" = stopping ] || return 0
    _gpu_err "the daemon of $JOB_ID is shutting down: the task waits in pending/ for the next" \
      "daemon"
    return 0
  elif [ -f "$_gpu_q/nodes/node-0.state" ]; then
    _gpu_field heartbeat; _gpu_age "$_gpu_val"
    why="no daemon is alive for $JOB_ID (last heartbeat $_gpu_d ago)"
  elif _gpu_load "$_gpu_q/job_id.txt" && _gpu_field cluster_job_id && [ -n "$_gpu_val" ]; then
    why="no daemon has started for $JOB_ID yet (its cluster job $_gpu_val may be waiting)"
  else
    why="no daemon has started for $JOB_ID yet"
  fi
  _gpu_err "$why: the task waits in pending/ until one starts"
}

_gpu_enqueue() {  # _gpu_enqueue NAME PRIORITY CWD SOURCE COMMAND FILE TEXT: publish one task
  local name=$1 prio=$2 id staged
  # a record is lines: the directory would end up in the record and in gpu_run's script
  case $PWD in
    *"$_gpu_nl"*) _gpu_err "the current directory's name has a newline: cd elsewhere"; return 2 ;;
  esac
  _gpu_prepare pending records || return 1
  _gpu_unique || return 1
  _gpu_whoami
  id=$prio-$_gpu_u-$name
  _gpu_put "$_gpu_q/records/$id.submit" "id=$id
name=$name
priority=$prio
source=$4
command=$5
cwd=$3
submitted=$_gpu_epoch
submitted_by=$_gpu_who
" || return 1
  staged=$_gpu_q/.staging/.$id
  if [ -n "$6" ]; then _gpu_copy "$6" "$staged"; else _gpu_write "$staged" "$7"; fi || {
    command rm -f -- "$_gpu_q/records/$id.submit"
    _gpu_failed "$staged" "cannot write the task into $_gpu_q/.staging"
    return 1
  }
  _gpu_publish "$staged" "$_gpu_q/pending/$id" \
    || { command rm -f -- "$_gpu_q/records/$id.submit"; return 1; }
  printf 'Submitted %s\n' "$id"
  _gpu_dead_note
}

_gpu_send() {  # _gpu_send ACTION [TASK]: publish a command; its reply will be replies/_gpu_u.reply
  local started=''
  _gpu_prepare commands || return 1
  _gpu_unique || return 1
  _gpu_whoami
  # addressed to the daemon that runs now: a later one refuses it
  _gpu_load "$_gpu_q/nodes/node-0.state" && _gpu_field started && started=$_gpu_val
  _gpu_put "$_gpu_q/commands/$_gpu_u.cmd" "action=$1
task=${2-}
daemon_started=$started
sent=$_gpu_epoch
sent_by=$_gpu_who
"
}

_gpu_timeout() {  # GPU_REPLY_TIMEOUT in tenths of a second into _gpu_wait
  _gpu_int "${GPU_REPLY_TIMEOUT:-15}" || _gpu_i=15
  _gpu_wait=$((_gpu_i * 10))
}

_gpu_reply() {  # _gpu_reply U: wait (sharing _gpu_wait) for replies/U.reply, then load it
  local reply=$_gpu_q/replies/$1.reply
  while [ ! -f "$reply" ]; do
    [ "$_gpu_wait" -le 0 ] && return 1
    command sleep 0.1
    _gpu_wait=$((_gpu_wait - 1))
  done
  _gpu_load "$reply"
  command rm -f -- "$reply"
}

_gpu_answer() {  # _gpu_answer U: the reply to command U, loaded; else withdraw U and return 1
  local cmd=$_gpu_q/commands/$1.cmd away=$_gpu_q/.staging/.$1.withdrawn
  _gpu_reply "$1" && return 0
  # an unanswered command must not wait for a later daemon: take it back
  if _gpu_mv "$cmd" "$away"; then
    command rm -f -- "$away"
    _gpu_wait=3  # unless the daemon read it just before: then its reply is on the way
    _gpu_reply "$1" && return 0
    _gpu_err "no reply from the daemon within ${GPU_REPLY_TIMEOUT:-15} s: the command is" \
      "withdrawn (commands/$1.cmd removed), so no daemon carries it out later; on NFS," \
      "try again with a larger GPU_REPLY_TIMEOUT"
  elif [ -e "$cmd" ]; then
    _gpu_err "no reply from the daemon within ${GPU_REPLY_TIMEOUT:-15} s, and commands/$1.cmd" \
      "cannot be removed (${_gpu_msg##*: }): the daemon carries it out when it reads it"
  else
    _gpu_wait=20  # the daemon has taken it: its reply follows
    _gpu_reply "$1" && return 0
    _gpu_err "the daemon took the command but sent no reply within" \
      "${GPU_REPLY_TIMEOUT:-15} s; gpu_status shows what happened"
  fi
  return 1
}

# Commands ##########################################################################################

_gpu_cmd_help() {
  if [ "$#" -gt 1 ]; then _gpu_usage '[COMMAND]'; return; fi
  local line topic=${1#gpu_} table="\
gpu_use [ID]|show the instance in use, or switch to ID
gpu_list|list the instances: daemon, times, queue sizes
gpu_submit FILE [PRIORITY]|queue a copy of FILE (*.sh: bash, *.py: python)
gpu_run 'CMD'|queue CMD, to run in the current directory
gpu_status|the daemon, GPUs, running, pending, recent tasks
gpu_logs [NAME]|list the logs, newest first; or print NAME's log
gpu_tail [NAME]|follow the running task's log (or NAME's); Ctrl-C
gpu_stop NAME|stop task NAME, or cancel it if it is pending
gpu_stop all|cancel every pending task, stop the running one
gpu_shutdown|ask the daemon to exit; how to delete its job
gpu_help [COMMAND]|this help"
  if [ -n "$topic" ]; then
    local found=
    while IFS= read -r line; do
      case ${line%%|*} in
        "gpu_$topic" | "gpu_$topic "*) printf '  %-26s  %s\n' "${line%%|*}" "${line#*|}"; found=1 ;;
      esac
    done <<EOF
$table
EOF
    [ -n "$found" ] && return 0
    _gpu_err "no command gpu_$topic (gpu_help lists them)"
    return 127
  fi
  printf 'Perpetual Motion client: a task queue for the GPUs of a cluster job.\n\n'
  while IFS= read -r line; do
    printf '  %-26s  %s\n' "${line%%|*}" "${line#*|}"
  done <<EOF
$table
EOF
  command cat <<EOF

NAME is a task id (500-20261129_041500_123456789-3f9a0c1d-train.sh), its name (train.sh)
or that without its extension (train); a stop acts on every pending or running task it names.
PRIORITY is 0-999, smaller runs first, first in first out within one (default 500).
Tasks may be queued before the daemon runs: they wait in pending/ until it starts.
A stop also ends the other Python processes of the daemon's user on the node, so the GPUs are
freed (the daemon's --kill-scope: user-python by default, task, none).

Settings: JOB_ID=${JOB_ID-} (the instance)
          QUEUE_ROOT=${QUEUE_ROOT:-${HOME-}/gpu_queue}
          GPU_REPLY_TIMEOUT=${GPU_REPLY_TIMEOUT:-15} (seconds to wait for the daemon's reply)
Return codes: 0 ok, 1 failed (no such task, no daemon, missing queue root, cannot write),
              2 bad usage (arguments, JOB_ID), 127 unknown command.
EOF
}

_gpu_summary() {  # one line about the instance in _gpu_q: its daemon and queue
  local daemon
  if [ ! -d "$_gpu_q" ]; then
    printf 'no folder yet under %s (no task queued, no daemon started)\n' "$_gpu_r"
    return
  fi
  _gpu_now
  if ! _gpu_load "$_gpu_q/nodes/node-0.state"; then
    daemon='no daemon has started yet'
  elif _gpu_node_alive; then
    daemon='daemon alive'
    _gpu_field status; [ "$_gpu_val" = stopping ] && daemon='daemon shutting down'
    _gpu_field host; daemon="$daemon on $_gpu_val"
    _gpu_field pid; daemon="$daemon (pid $_gpu_val"
    _gpu_field started; _gpu_age "$_gpu_val"; daemon="$daemon, up $_gpu_d)"
  else
    _gpu_field host; daemon="daemon not alive (last on ${_gpu_val:-?}"
    _gpu_field heartbeat; _gpu_age "$_gpu_val"; daemon="$daemon, heartbeat $_gpu_d ago)"
  fi
  _gpu_count "$_gpu_q/running"; daemon="$daemon; $_gpu_n running"
  _gpu_count "$_gpu_q/pending"; daemon="$daemon, $_gpu_n pending"
  _gpu_count "$_gpu_q/done"; daemon="$daemon, $_gpu_n done"
  _gpu_count "$_gpu_q/failed"; printf '%s, %s failed\n' "$daemon" "$_gpu_n"
}

_gpu_cmd_use() {
  if [ "$#" -gt 1 ]; then _gpu_usage '[ID]'; return; fi
  if [ "$#" -eq 1 ]; then
    _gpu_valid_id "$1" || { _gpu_bad_id "$1"; return 2; }
    JOB_ID=$1
    _gpu_root || return 0  # the switch is still made: the mount may come back
    _gpu_q=$_gpu_r/$JOB_ID
    printf 'Using %s: ' "$JOB_ID"
    _gpu_summary
    return 0
  fi
  if [ -z "${JOB_ID-}" ]; then
    _gpu_err "no instance in use (JOB_ID is not set): gpu_use ID switches to one," \
      "gpu_list shows them"
    return 2
  fi
  _gpu_instance || return
  printf '%s: ' "$JOB_ID"
  _gpu_summary
}

_gpu_cmd_list() {
  if [ "$#" -gt 0 ]; then _gpu_usage ''; return; fi
  _gpu_root || return 1
  local id ids='' width=6 IFS=$_gpu_nl mark daemon state nodes host started shutdown run pend
  local ndone failed job
  for id in $(_gpu_ls "$_gpu_r"); do
    _gpu_valid_id "$id" || continue
    [ -f "$_gpu_r/$id/control.json" ] || [ -f "$_gpu_r/$id/job_id.txt" ] \
      || [ -d "$_gpu_r/$id/pending" ] || [ -d "$_gpu_r/$id/nodes" ] || continue
    ids=$ids$id$_gpu_nl
    [ "${#id}" -gt "$width" ] && width=${#id}
  done
  if [ -z "$ids" ]; then
    printf 'No instances under %s (gpu_submit creates one; so does the daemon).\n' "$_gpu_r"
    return 0
  fi
  _gpu_now
  printf '  %-*s  %-9s %-5s  %-16s %-16s %-16s %4s %5s %5s %5s  %s\n' "$width" JOB_ID DAEMON \
    NODES HOST STARTED AUTO-SHUTDOWN RUN PEND DONE FAIL 'CLUSTER JOB'

  for id in $ids; do
    _gpu_q=$_gpu_r/$id
    mark=' '; [ "$id" = "${JOB_ID-}" ] && mark='*'
    host=- started=- shutdown=-
    if ! _gpu_load "$_gpu_q/nodes/node-0.state"; then
      daemon=none
    else
      _gpu_field status; state=$_gpu_val
      if _gpu_node_alive; then
        if [ "$state" = stopping ]; then daemon=stopping; else daemon=alive; fi
      elif [ "$state" = stopped ]; then
        daemon=stopped
      else
        daemon=dead
      fi
      _gpu_field host; host=${_gpu_val:--}
      _gpu_field started
      started=$(_gpu_date "$_gpu_val")
      _gpu_field shutdown; shutdown=$(_gpu_date "$_gpu_val")
    fi
    _gpu_nodes; nodes=$_gpu_val
    _gpu_count "$_gpu_q/running"; run=$_gpu_n
    _gpu_count "$_gpu_q/pending"; pend=$_gpu_n
    _gpu_count "$_gpu_q/done"; ndone=$_gpu_n
    _gpu_count "$_gpu_q/failed"; failed=$_gpu_n
    job=-
    _gpu_load "$_gpu_q/job_id.txt" && _gpu_field cluster_job_id && job=${_gpu_val:--}
    printf '%s %-*s  %-9s %-5s  %-16s %-16s %-16s %4s %5s %5s %5s  %s\n' "$mark" "$width" \
      "$id" "$daemon" "$nodes" "$host" "$started" "$shutdown" "$run" "$pend" "$ndone" "$failed" \
      "$job"
  done
}

_gpu_priority() {  # _gpu_priority TEXT: 0-999 as three digits into _gpu_p; 2 when it is not
  case $1 in
    '' | *[!0-9]* | ????*)
      _gpu_err "PRIORITY must be a number from 0 to 999 (smaller runs first): '$1'"
      return 2 ;;
  esac
  _gpu_p=$1
  while [ "${#_gpu_p}" -lt 3 ]; do _gpu_p=0$_gpu_p; done
}

_gpu_safe_name() {  # _gpu_safe_name TEXT: characters outside A-Za-z0-9._- become _ (into _gpu_s)
  _gpu_s=${1//[!A-Za-z0-9._-]/_}
}

_gpu_cmd_submit() {
  if [ "$#" -lt 1 ] || [ "$#" -gt 2 ]; then _gpu_usage 'FILE [PRIORITY]'; return; fi
  local file=$1 source name dir cwd cmdline=''
  _gpu_priority "${2-500}" || return 2
  case $file in
    '') _gpu_usage 'FILE [PRIORITY]'; return ;;
    *"$_gpu_nl"*) _gpu_err "a file name with a newline cannot be queued"; return 2 ;;
  esac
  if [ -d "$file" ]; then _gpu_err "$file is a directory, not a script"; return 2; fi
  if [ ! -e "$file" ]; then _gpu_err "no such file: $file"; return 2; fi
  if [ ! -f "$file" ]; then _gpu_err "$file is not a regular file"; return 2; fi
  if [ ! -r "$file" ]; then _gpu_err "cannot read $file"; return 2; fi
  _gpu_instance || return
  case $file in /*) source=$file ;; *) source=$PWD/$file ;; esac
  _gpu_short "${file##*/}"  # a resubmitted task (gpu_submit failed/<id>) keeps its name
  _gpu_safe_name "$_gpu_s"
  name=$_gpu_s
  [ "${#name}" -gt 80 ] && name=${name:$((${#name} - 80))}  # keep the end: the extension
  cwd=$PWD
  # a finished task runs again where it was first submitted (gpu_run's script relies on that)
  dir=${source%/*}
  case ${dir##*/} in
    done | failed)
      if _gpu_load "${dir%/*}/records/${source##*/}.submit" && _gpu_field cwd \
        && [ -n "$_gpu_val" ]; then
        cwd=$_gpu_val
        _gpu_field command; cmdline=$_gpu_val
        [ "$#" -eq 1 ] && _gpu_field priority && _gpu_priority "$_gpu_val" 2>/dev/null
        _gpu_err "resubmitting ${source##*/} as first submitted: it runs in $cwd," \
          "at priority $_gpu_p"
      fi ;;
  esac
  _gpu_enqueue "$name" "$_gpu_p" "$cwd" "$source" "$cmdline" "$file" ""
}

_gpu_cmd_run() {
  local cmd="$*" words
  case $cmd in
    *[![:space:]]*) ;;
    *) _gpu_usage "'COMMAND'"; return ;;
  esac
  case $cmd in
    *"$_gpu_nl"*)
      _gpu_err "the command has a newline: put it in a script and use gpu_submit"
      return 2 ;;
  esac
  _gpu_instance || return
  _gpu_safe_name "$cmd"
  words=$_gpu_s
  while :; do
    case $words in *__*) words=${words//__/_} ;; *) break ;; esac
  done
  words=${words#_}
  words=${words:0:73}
  words=${words%_}
  _gpu_whoami
  _gpu_enqueue "run_${words:-command}.sh" 500 "$PWD" "" "$cmd" "" "#!/usr/bin/env bash
# queued with gpu_run by $_gpu_who from $PWD
$cmd
"
}

_gpu_show_nodes() {  # the daemon part of gpu_status
  local state node rank gpus i line up
  local IFS=$_gpu_nl
  state=$(_gpu_node_files)
  if [ -z "$state" ]; then
    printf 'Daemon:   none has started for this instance yet; tasks wait in pending/\n'
    return
  fi
  for node in $state; do
    _gpu_load "$_gpu_q/nodes/$node" || continue
    rank=${node#node-}; rank=${rank%.state}
    _gpu_field num_nodes
    if [ "${_gpu_val:-1}" = 1 ] && [ "$rank" = 0 ]; then line='Daemon:   '; else
      line="Node $rank:   "; fi
    if _gpu_node_alive; then
      _gpu_field status; line="${line}alive"
      [ "$_gpu_val" = stopping ] && line="$line (shutting down)"
      up=1
    else
      _gpu_field status
      if [ "$_gpu_val" = stopped ]; then
        _gpu_field stopped; line="${line}stopped $(_gpu_date "$_gpu_val")"
        _gpu_field stop_reason; [ -n "$_gpu_val" ] && line="$line ($_gpu_val)"
      else
        line="${line}NOT ALIVE (no heartbeat for over 60 s)"
      fi
      up=
    fi
    _gpu_field host; line="$line on ${_gpu_val:-?}"
    _gpu_field pid; line="$line, pid ${_gpu_val:-?}"
    printf '%s\n' "$line"
    _gpu_field started; printf '          started %s' "$(_gpu_date "$_gpu_val")"
    if [ -n "$up" ]; then
      _gpu_field shutdown; printf ', auto-shutdown at %s' "$(_gpu_date "$_gpu_val")"
    fi
    _gpu_field heartbeat; _gpu_age "$_gpu_val"; printf ', heartbeat %s ago\n' "$_gpu_d"
    _gpu_field keepalive; [ -n "$_gpu_val" ] && printf '          keep-alive: %s\n' "$_gpu_val"
    _gpu_field gpu_count; gpus=$_gpu_val
    _gpu_int "$gpus" || gpus=0
    i=0
    while [ "$i" -lt "$gpus" ]; do
      _gpu_field "gpu.$i.name"; line="          GPU $i ${_gpu_val:-?}"
      _gpu_field "gpu.$i.util"; line="$line  util ${_gpu_val:--}%"
      _gpu_field "gpu.$i.mem_used_mib"; line="$line  mem ${_gpu_val:--}"
      _gpu_field "gpu.$i.mem_total_mib"; line="$line/${_gpu_val:--} MiB"
      _gpu_field "gpu.$i.state"; [ -n "$_gpu_val" ] && line="$line  keep-alive $_gpu_val"
      _gpu_field "gpu.$i.reason"; [ -n "$_gpu_val" ] && line="$line ($_gpu_val)"
      _gpu_field "gpu.$i.tile"; [ -n "$_gpu_val" ] && line="$line  tile $_gpu_val"
      _gpu_field "gpu.$i.duty"; [ -n "$_gpu_val" ] && line="$line  duty $_gpu_val"
      printf '%s\n' "$line"
      i=$((i + 1))
    done
  done
}

_gpu_cmd_status() {
  if [ "$#" -gt 0 ]; then _gpu_usage ''; return; fi
  _gpu_existing_instance || return
  local IFS=$_gpu_nl id list n shown prio line alive='' running=0 pending=0 ndone failed
  printf 'Instance: %s (%s)\n' "$JOB_ID" "$_gpu_q"
  _gpu_now
  _gpu_show_nodes
  _gpu_daemon_alive && alive=1

  for id in $(_gpu_ls "$_gpu_q/running"); do
    running=$((running + 1))
    line="Running:  $id"
    if _gpu_load "$_gpu_q/records/$id.run"; then
      _gpu_field started; _gpu_age "$_gpu_val"; line="$line, for $_gpu_d"
      _gpu_field host; [ -n "$_gpu_val" ] && line="$line on $_gpu_val"
    fi
    [ -z "$alive" ] && line="$line (its daemon is not alive: a new daemon marks it interrupted)"
    printf '%s\n' "$line"
  done
  [ "$running" -eq 0 ] && printf 'Running:  nothing\n'

  list=$(_gpu_ls "$_gpu_q/pending")
  for id in $list; do pending=$((pending + 1)); done
  if [ "$pending" -eq 0 ]; then
    printf 'Pending:  none\n'
  else
    printf 'Pending:  %s, in run order:\n' "$pending"
    shown=0
    for id in $list; do
      [ "$shown" -ge 20 ] && { printf '          ... and %s more\n' "$((pending - shown))"; break; }
      case $id in [0-9][0-9][0-9]-*) prio=${id%%-*} ;; *) prio=--- ;; esac
      printf '          %s  %s\n' "$prio" "$id"
      shown=$((shown + 1))
    done
  fi

  # the tasks that ended last wrote their logs last: list logs/ by time (never records/, three
  # times larger, nor an argument list, which ARG_MAX limits) and read only the first results
  list=$(command ls -1t -- "$_gpu_q/logs" 2>/dev/null | command head -n 15)
  shown=0
  for id in $list; do
    [ "$shown" -lt 10 ] || break
    id=${id%.log}
    _gpu_load "$_gpu_q/records/$id.result" || continue  # still running
    [ "$shown" -eq 0 ] && printf 'Recent:   STATE        EXIT  DURATION  ENDED       TASK\n'
    shown=$((shown + 1))
    _gpu_field state; line=$_gpu_val
    _gpu_field exit_code; n=$_gpu_val
    [ -z "$n" ] && { _gpu_field signal; n=${_gpu_val:+sig$_gpu_val}; }
    _gpu_field duration; _gpu_dur "$_gpu_val"
    printf '          %-11s %5s  %8s' "$line" "${n:--}" "$_gpu_d"
    _gpu_field ended; _gpu_age "$_gpu_val"
    printf '  %-10s  %s\n' "$_gpu_d ago" "$id"
  done
  _gpu_count "$_gpu_q/done"; ndone=$_gpu_n
  _gpu_count "$_gpu_q/failed"; failed=$_gpu_n
  printf 'Totals:   %s running, %s pending, %s done, %s failed or stopped\n' \
    "$running" "$pending" "$ndone" "$failed"
}

_gpu_newest_log() {  # _gpu_newest_log NAME: the id of NAME's newest log into _gpu_id
  local id IFS=$_gpu_nl
  for id in $(command ls -1t -- "$_gpu_q/logs" 2>/dev/null); do
    case $id in *.log) ;; *) continue ;; esac
    id=${id%.log}
    _gpu_matches "$id" "$1" && { _gpu_id=$id; return 0; }
  done
  return 1
}

_gpu_no_log() {  # _gpu_no_log NAME: why NAME has no log; returns 1
  if _gpu_find "$1" pending; then
    _gpu_err "task $1 is still pending: it has no log yet (gpu_tail $1 waits for it)"
  elif _gpu_find "$1" failed 'done'; then
    _gpu_err "task $1 has no log: it never ran (cancelled)"
  else
    _gpu_err "no such task: $1 (gpu_logs lists the logs)"
  fi
  return 1
}

_gpu_cmd_logs() {
  if [ "$#" -gt 1 ]; then _gpu_usage '[NAME|--all]'; return; fi
  _gpu_existing_instance || return
  if [ "$#" -eq 1 ] && [ "$1" != --all ]; then
    _gpu_check_name "$1" || return 1
    _gpu_newest_log "$1" || { _gpu_no_log "$1"; return 1; }
    command cat -- "$_gpu_q/logs/$_gpu_id.log"
    return
  fi
  local perms size day time name total shown=0 limit=20 running
  _gpu_count "$_gpu_q/logs"; total=$_gpu_n
  if [ "$total" -eq 0 ]; then
    printf 'No logs yet in %s/logs\n' "$_gpu_q"
    return 0
  fi
  [ "$#" -eq 1 ] && limit=$total
  running=$_gpu_nl$(_gpu_ls "$_gpu_q/running")$_gpu_nl
  printf '%6s  %-16s  %s\n' SIZE MODIFIED TASK
  while IFS=' ' read -r perms _ size day time name; do
    case $perms in total) continue ;; esac
    case $name in *.log) name=${name%.log} ;; *) continue ;; esac
    case $running in *"$_gpu_nl$name$_gpu_nl"*) name="$name (running)" ;; esac
    printf '%6s  %-16s  %s\n' "$size" "$day $time" "$name"
    shown=$((shown + 1))
  done <<EOF
$(command ls -goth --time-style='+%Y-%m-%d %H:%M' -- "$_gpu_q/logs" 2>/dev/null \
    | command head -n "$((limit + 1))")
EOF
  [ "$shown" -lt "$total" ] && printf '(the newest %s of %s logs; gpu_logs --all lists all)\n' \
    "$shown" "$total"
  return 0
}

_gpu_cmd_tail() {
  if [ "$#" -gt 1 ]; then _gpu_usage '[NAME]'; return; fi
  _gpu_existing_instance || return
  local id=
  if [ "$#" -eq 0 ]; then
    id=$(_gpu_ls "$_gpu_q/running" | command head -n 1)
    if [ -z "$id" ]; then
      _gpu_err "no task is running in $JOB_ID; gpu_tail NAME follows a given task"
      return 1
    fi
  else
    _gpu_check_name "$1" || return 1
    if _gpu_find "$1" running; then
      id=${_gpu_val%%"$_gpu_nl"*}
    elif _gpu_newest_log "$1"; then
      id=$_gpu_id
    elif _gpu_find "$1" pending; then
      id=${_gpu_val%%"$_gpu_nl"*}; id=${id#pending/}
      _gpu_short "$id"
      if [ "$_gpu_s" = "$id" ]; then
        _gpu_err "task $id was put into pending/ by hand: its log is named when it starts"
        return 1
      fi
      _gpu_err "task $id is pending: waiting for it to start"
    else
      _gpu_no_log "$1"; return 1
    fi
    id=${id#running/}
  fi
  _gpu_err "following $_gpu_q/logs/$id.log (Ctrl-C to stop)"
  command tail -n 40 -F -- "$_gpu_q/logs/$id.log"
}

_gpu_cancel_here() {  # _gpu_cancel_here ID: cancel a pending task without a daemon (protocol)
  # never over an earlier task of that name (one put into pending/ by hand twice)
  [ -e "$_gpu_q/failed/$1" ] && return 2
  _gpu_mv "$_gpu_q/pending/$1" "$_gpu_q/failed/$1" || return 1
  _gpu_unique || return 0
  _gpu_whoami
  _gpu_put "$_gpu_q/records/$1.result" "id=$1
state=cancelled
exit_code=
signal=
reason=cancelled by user (no daemon alive; by $_gpu_who)
started=
ended=$_gpu_epoch
duration=
host=${_gpu_who#*@}
node_rank=
attempt=1
"
  return 0
}

_gpu_stop_offline() {  # _gpu_stop_offline NAME MATCHES: gpu_stop when no daemon is alive
  local entry IFS=$_gpu_nl rc=0 count=0
  _gpu_prepare failed records || return 1
  for entry in $2; do
    case $entry in
      pending/*)
        _gpu_cancel_here "${entry#pending/}"
        case $? in
          0) printf 'cancelled %s (it was pending)\n' "${entry#pending/}"
            count=$((count + 1)) ;;
          2) _gpu_err "${entry#pending/} is not cancelled: failed/${entry#pending/} exists" \
              "already (rename or remove one of them)"; rc=1 ;;
          *) _gpu_err "${entry#pending/} left pending/ meanwhile (a daemon took it?)"; rc=1 ;;
        esac ;;
      running/*)
        _gpu_err "${entry#running/} is in running/ but its daemon is not alive: a new" \
          "daemon marks it interrupted (and ends what is left of it on that host)"
        rc=1 ;;
    esac
  done
  [ "$1" = all ] && printf 'cancelled %s pending task(s)\n' "$count"
  return "$rc"
}

_gpu_cmd_stop() {
  if [ "$#" -ne 1 ]; then _gpu_usage 'NAME|all'; return; fi
  _gpu_existing_instance || return
  local name=$1 matches entry sent='' u count rc=0 IFS=$_gpu_nl
  if [ "$name" = all ]; then
    matches=$(_gpu_ls "$_gpu_q/pending" | command sed 's|^|pending/|'
      _gpu_ls "$_gpu_q/running" | command sed 's|^|running/|')
  else
    _gpu_check_name "$name" || return 1
    if ! _gpu_find "$name" pending running; then
      if _gpu_find "$name" 'done' failed; then
        _gpu_err "task $name is no longer pending or running: it has finished"
      else
        _gpu_err "no such task: $name (gpu_status lists the tasks)"
      fi
      return 1
    fi
    matches=$_gpu_val
  fi
  if ! _gpu_daemon_alive; then
    _gpu_err "no daemon is alive for $JOB_ID: only pending tasks can be cancelled"
    _gpu_stop_offline "$name" "$matches"
    return
  fi
  if [ "$name" = all ]; then
    _gpu_send stop_all || return 1
    sent=$_gpu_u
  else
    for entry in $matches; do
      _gpu_send stop "${entry#*/}" || return 1
      sent=$sent$_gpu_u$_gpu_nl
    done
  fi
  _gpu_timeout
  for u in $sent; do
    _gpu_answer "$u" || { rc=1; continue; }
    _gpu_field result
    case $_gpu_val in
      stopped) _gpu_field task; printf 'stopped %s' "$_gpu_val"
        _gpu_field message; printf ' (%s)\n' "$_gpu_val" ;;
      cancelled) _gpu_field task; printf 'cancelled %s (it was pending)\n' "$_gpu_val" ;;
      not_found) _gpu_field task
        _gpu_err "$_gpu_val is neither pending nor running any more (it has just finished)"
        rc=1 ;;
      ok) _gpu_field cancelled_count; count=${_gpu_val:-0}
        printf 'cancelled %s pending task(s)\n' "$count"
        _gpu_field stopped
        if [ -n "$_gpu_val" ]; then
          printf 'stopped %s\n' "$_gpu_val"
        elif [ "$count" = 0 ]; then  # nothing to stop, yet the GPUs are freed all the same
          printf 'no task was running; the daemon still ends the other Python processes of its\n'
          printf 'user on the node (its --kill-scope), to free the GPUs\n'
        else
          printf 'no task was running\n'
        fi ;;
      *) _gpu_field message; _gpu_err "the daemon answered: ${_gpu_val:-an error}"; rc=1 ;;
    esac
  done
  return "$rc"
}

_gpu_cluster_job() {  # print the cluster job from job_id.txt and how to delete it
  local backend job extra
  if ! _gpu_load "$_gpu_q/job_id.txt"; then
    printf 'No job_id.txt in %s: the daemon was not started with submit.sh.\n' "$_gpu_q"
    printf 'If it runs as a cluster job, delete that job to release the GPUs.\n'
    return 0
  fi
  _gpu_field backend; backend=$_gpu_val
  _gpu_field cluster_job_id; job=$_gpu_val
  printf 'Cluster job: %s (%s)\n' "${job:-unknown}" "${backend:-unknown backend}"
  case $backend in
    sco)
      _gpu_field profile; extra=${_gpu_val:+--profile=$_gpu_val }
      _gpu_field workspace
      printf 'Delete it to release the GPUs:\n  sco %sacp jobs delete --workspace-name=%s %s\n' \
        "$extra" "${_gpu_val:-WORKSPACE}" "$job" ;;
    slurm) printf 'Delete it to release the GPUs:\n  scancel %s\n' "$job" ;;
    local)
      _gpu_field host; extra=${_gpu_val:+ (on $_gpu_val)}
      _gpu_field pid; [ -n "$_gpu_val" ] || _gpu_val=${job#local-}
      printf 'It ends with the daemon; if it does not%s:\n  kill %s\n' "$extra" "$_gpu_val" ;;
  esac
  return 0
}

_gpu_cmd_shutdown() {
  if [ "$#" -gt 0 ]; then _gpu_usage ''; return; fi
  _gpu_existing_instance || return
  local rc=0
  if ! _gpu_daemon_alive; then
    _gpu_err "no daemon is alive for $JOB_ID: nothing to shut down"
    rc=1
  else
    _gpu_send shutdown || return 1
    _gpu_timeout
    if ! _gpu_answer "$_gpu_u"; then
      rc=1
    elif _gpu_field result && [ "$_gpu_val" = accepted ]; then
      printf 'The daemon of %s is shutting down: it stops the running task and exits;\n' "$JOB_ID"
      printf 'pending tasks stay queued for the next daemon.\n'
    else
      _gpu_field message; _gpu_err "the daemon answered: ${_gpu_val:-an error}"
      rc=1
    fi
  fi
  _gpu_cluster_job
  return "$rc"
}

_gpu_cmd_complete() {  # _gpu_cmd_complete COMMAND WORD: completion candidates, one a line
  local what=${1#gpu_} word=${2-} id IFS=$_gpu_nl
  _gpu_root 2>/dev/null || return 0
  if [ "$what" = use ]; then
    for id in $(_gpu_ls "$_gpu_r"); do
      _gpu_valid_id "$id" && [ -d "$_gpu_r/$id" ] && printf '%s\n' "$id"
    done
    return 0
  fi
  _gpu_valid_id "${JOB_ID-}" || return 0
  _gpu_q=$_gpu_r/$JOB_ID
  {
    [ "$what" = stop ] && printf 'all\n'
    for id in $(_gpu_ls "$_gpu_q/running"; _gpu_ls "$_gpu_q/pending"); do
      printf '%s\n' "$id"
      _gpu_short "$id"; printf '%s\n' "$_gpu_s"
    done
    if [ "$what" != stop ]; then
      for id in $(_gpu_ls "$_gpu_q/logs"); do
        id=${id%.log}
        case $word in [0-9]*) printf '%s\n' "$id" ;; esac
        _gpu_short "$id"; printf '%s\n' "$_gpu_s"
      done
    fi
  } | command sort -u
}

# Tab completion ####################################################################################

_gpu_complete_bash() {
  local line
  COMPREPLY=()
  [ "${COMP_CWORD-0}" -eq 1 ] || return 0
  while IFS= read -r line; do
    case $line in "${COMP_WORDS[1]-}"*) COMPREPLY+=("$line") ;; esac
  done < <(_gpu_main complete "${COMP_WORDS[0]-}" "${COMP_WORDS[1]-}")
}

_gpu_complete_zsh() {
  emulate -L zsh  # the user's options (ksh_arrays, ...) stay out of this function
  local line
  local -a items
  while IFS= read -r line; do items+=("$line"); done \
    < <(_gpu_main complete "${words[1]-}" "${PREFIX-}")
  compadd -a items
}

if [ -n "${ZSH_VERSION-}" ]; then
  if command -v compdef >/dev/null 2>&1; then
    compdef _gpu_complete_zsh gpu_stop gpu_logs gpu_tail gpu_use
  fi
elif command -v complete >/dev/null 2>&1; then
  complete -F _gpu_complete_bash gpu_stop gpu_logs gpu_tail gpu_use
fi

if [ -n "${_gpu_restore_aliases-}" ]; then eval "$_gpu_restore_aliases"; fi
unset _gpu_restore_aliases

# shellcheck shell=bash
# client.sh: the Perpetual Motion client, sourced into bash (4.2+) or zsh (5+).
#
# Install: put this line in ~/.bashrc or ~/.zshrc (in zsh after compinit, for tab completion):
#
#     source /path/to/client.sh
#
# then `gpu_help` lists the commands and `gpu_COMMAND --help` explains one. It needs only bash or
# zsh, coreutils (ls, sed, sort, date, head, tail, od, cp, mv, mkdir, dd, wc), find, xargs, grep
# and awk (POSIX): no Python and no jq on the login machine. It writes and reads the queue folder
# exactly as docs/protocol.md says, so it works from any host that mounts it.
#
# Settings, read at every call:
#   JOB_ID             the instance (one daemon and its queue); `gpu_use ID` sets it
#   QUEUE_ROOT         the queue root on shared storage; when it is not set, the QUEUE_ROOT= line of
#                      submit.conf beside this file (or of the file $SUBMIT_CONF names), read as
#                      text and never run; else $HOME/gpu_queue, as the daemon's default
#   GPU_REPLY_TIMEOUT  seconds gpu_stop and gpu_shutdown wait for the daemon's reply (default 15,
#                      at most 86400)
#
# Every command runs in a subshell with its own options, so the user's `set -e`, `set -u`,
# `set -o pipefail`, aliases and zsh options neither break it nor are changed by it, and it leaves
# no variables behind (only `gpu_use ID` sets JOB_ID). Private helpers are named `_gpu_*`.
# Return codes: 0 success, 1 failure (no such task, no daemon, missing root, a write that
# failed), 2 bad usage (options, arguments, JOB_ID), 124 gpu_wait timed out, 127 unknown command
# (gpu_help NAME); gpu_wait and gpu_tail return the exit code of the task they waited for.
# Whatever comes from the queue folder (task names, records, state files) is printed with its
# control characters escaped (\e, \x07), so no file can drive the terminal.

# Aliases are expanded while a file is read: read this one without them (restored at the end).
# In zsh also without warn_create_global and warn_nested_var, which would warn of the names this
# file sets while it is read (and unsets) when a plugin manager sources it from a function, and
# without csh_junkie_quotes, under which a quoted text of several lines does not parse.
if [ -n "${ZSH_VERSION-}" ]; then
  typeset -g _gpu_restore_options=':'  # typeset -g: no warning
  [[ ! -o aliases ]] || typeset -g _gpu_restore_options="$_gpu_restore_options; setopt aliases"
  [[ ! -o warn_create_global ]] \
    || typeset -g _gpu_restore_options="$_gpu_restore_options; setopt warn_create_global"
  [[ ! -o csh_junkie_quotes ]] \
    || typeset -g _gpu_restore_options="$_gpu_restore_options; setopt csh_junkie_quotes"
  if [[ -o warn_nested_var ]] 2>/dev/null; then  # zsh 5.3 and later
    typeset -g _gpu_restore_options="$_gpu_restore_options; setopt warn_nested_var"
    unsetopt warn_nested_var
  fi
  unsetopt aliases warn_create_global csh_junkie_quotes
elif shopt -q expand_aliases 2>/dev/null; then
  _gpu_restore_options='shopt -s expand_aliases'; shopt -u expand_aliases
fi

# Where this file is, for the submit.conf beside it: kept in a function, not in a variable.
if [ -n "${ZSH_VERSION-}" ]; then
  # shellcheck disable=SC2016  # zsh's own syntax, kept from bash's parser
  eval '_gpu_here=${(%):-%x}'
else
  _gpu_here=${BASH_SOURCE[0]-}
fi
case $_gpu_here in */*) _gpu_here=${_gpu_here%/*} ;; *) _gpu_here=. ;; esac
# (cd's output, of CDPATH or of a zsh chpwd hook, is no part of the path)
_gpu_here=$(CDPATH='' builtin cd -- "${_gpu_here:-/}" >/dev/null 2>&1 && builtin pwd -P) \
  || _gpu_here=''
_gpu_here=${_gpu_here//\'/\'\\\'\'}
eval "_gpu_client_dir() { _gpu_dir='$_gpu_here'; }"
unset _gpu_here

# Public commands ###################################################################################

gpu_help() { _gpu_main help "$@"; }
gpu_list() { _gpu_main list "$@"; }
gpu_submit() { _gpu_main submit "$@"; }
gpu_run() { _gpu_main run "$@"; }
gpu_status() { _gpu_main status "$@"; }
gpu_show() { _gpu_main show "$@"; }
gpu_logs() { _gpu_main logs "$@"; }
gpu_tail() { _gpu_main tail "$@"; }
gpu_wait() { _gpu_main wait "$@"; }
gpu_retry() { _gpu_main retry "$@"; }
gpu_hold() { _gpu_main hold "$@"; }
gpu_release() { _gpu_main release "$@"; }
gpu_priority() { _gpu_main priority "$@"; }
gpu_stop() { _gpu_main stop "$@"; }
gpu_clean() { _gpu_main clean "$@"; }
gpu_drain() { _gpu_main drain "$@"; }
gpu_resume() { _gpu_main resume "$@"; }
gpu_shutdown() { _gpu_main shutdown "$@"; }

# The one command that changes the user's shell: the subshell checks everything, then the
# instance it named is exported here (the only argument that is not an option).
gpu_use() {
  _gpu_main use "$@" || return
  local _gpu_arg _gpu_id='' _gpu_dd=''
  for _gpu_arg in "$@"; do
    if [ -n "$_gpu_dd" ]; then _gpu_id=$_gpu_arg; continue; fi
    case $_gpu_arg in
      --) _gpu_dd=1 ;;
      -h | --help) return 0 ;;
      -*) ;;
      *) _gpu_id=$_gpu_arg ;;
    esac
  done
  if [ -n "$_gpu_id" ]; then export JOB_ID="$_gpu_id"; fi
}

_gpu_command_list() {  # the commands into _gpu_commands, in the order gpu_help lists them and
  # completion offers them; each is a function gpu_<command> above, completed as below
  _gpu_commands="use list submit run status show logs tail wait retry hold release priority \
stop clean drain resume shutdown help"
}

# Every command runs in a subshell: options, variables, traps and `cd` stay inside it.
_gpu_main() ( _gpu_dispatch "$@" )

_gpu_dispatch() {  # _gpu_dispatch COMMAND ARGS...: set the subshell up, run _gpu_cmd_COMMAND
  # the user's ERR, DEBUG and RETURN traps are not for the client's own commands
  if [ -n "${ZSH_VERSION-}" ]; then
    trap - ZERR DEBUG
    emulate -R sh
    setopt no_multibyte  # patterns and lengths work on bytes, as bash's do under LC_ALL=C
  else
    trap - ERR DEBUG RETURN
    set +E +T
    shopt -u nocasematch nocaseglob failglob nullglob dotglob 2>/dev/null
    unset GLOBIGNORE
  fi
  set +e +u +x +v +C -f
  set +o pipefail 2>/dev/null
  # Ctrl-C ends the command whatever child it waits for (bash goes on when a child survives
  # it); bash keeps a SIGINT ignored that was ignored when it started (nohup)
  trap 'exit 130' INT
  IFS=' 	
'
  LC_ALL=C
  export LC_ALL
  umask 077  # what the client writes (records hold -e values) only the user reads (a subshell)
  unset QUOTING_STYLE CLICOLOR_FORCE LS_COLORS TIME_STYLE POSIXLY_CORRECT GREP_OPTIONS
  _gpu_nl='
'
  _gpu_fs=$'\037'  # separates the fields of a table row (escaped text never holds it)
  # bytes for patterns: C1 controls are \302\200-\302\237 in UTF-8; lead and continuation bytes
  _gpu_c2=$'\302' _gpu_b80=$'\200' _gpu_b9f=$'\237' _gpu_bbf=$'\277' _gpu_bff=$'\377'
  _gpu_bdf=$'\337' _gpu_be0=$'\340' _gpu_bef=$'\357' _gpu_bf0=$'\360' _gpu_bf4=$'\364'
  # and those that tell East Asian wide characters (_gpu_cols)
  _gpu_be2=$'\342' _gpu_be3=$'\343' _gpu_be9=$'\351' _gpu_bea=$'\352' _gpu_beb=$'\353'
  _gpu_bec=$'\354' _gpu_bed=$'\355' _gpu_b8c=$'\214' _gpu_b9b=$'\233' _gpu_b9e=$'\236'
  _gpu_ba0=$'\240' _gpu_ba4=$'\244' _gpu_ba6=$'\246' _gpu_ba7=$'\247' _gpu_bb0=$'\260'
  _gpu_bba=$'\272' _gpu_bbc=$'\274' _gpu_bbd=$'\275'
  _gpu_blank='                                                                                '
  _gpu_blank=$_gpu_blank$_gpu_blank  # 160 spaces, for _gpu_pad
  _gpu_command_list
  _gpu_keys='' _gpu_sum=''
  _gpu_cmd=$1
  shift
  "_gpu_cmd_$_gpu_cmd" "$@"
}

# Output ############################################################################################

_gpu_esc() {  # _gpu_esc TEXT: TEXT with control characters escaped (\e, \t, \x07, \u009b): _gpu_e
  _gpu_e=$1
  # shellcheck disable=SC2101  # [:cntrl:] is inside the bracket expression
  case $1 in *[[:cntrl:]$_gpu_c2]*) ;; *) return 0 ;; esac
  local rest=$1 head c n
  _gpu_e=''
  while :; do
    # shellcheck disable=SC2295  # the bytes are a pattern on purpose
    head=${rest%%[[:cntrl:]$_gpu_c2]*}
    _gpu_e=$_gpu_e$head
    rest=${rest#"$head"}
    [ -n "$rest" ] || return 0
    c=${rest%"${rest#?}"}
    rest=${rest#?}
    case $c in
      "$_gpu_c2")
        n=${rest%"${rest#?}"}
        case $n in
          [$_gpu_b80-$_gpu_b9f]) rest=${rest#?}; _gpu_e=$_gpu_e'\u00'$(printf '%02x' "'$n") ;;
          *) _gpu_e=$_gpu_e$c ;;
        esac ;;
      $'\033') _gpu_e=$_gpu_e'\e' ;;
      $'\t') _gpu_e=$_gpu_e'\t' ;;
      "$_gpu_nl") _gpu_e=$_gpu_e'\n' ;;
      $'\r') _gpu_e=$_gpu_e'\r' ;;
      *) _gpu_e=$_gpu_e'\x'$(printf '%02x' "'$c") ;;
    esac
  done
}

_gpu_say() {  # _gpu_say TEXT...: one line to stdout, its control characters escaped
  local IFS=' '
  _gpu_esc "$*"
  printf '%s\n' "$_gpu_e"
}

_gpu_err() {  # _gpu_err TEXT...: a message of the current command to stderr
  local IFS=' '
  _gpu_esc "gpu_$_gpu_cmd: $*"
  printf '%s\n' "$_gpu_e" >&2
}

_gpu_cols() {  # _gpu_cols TEXT: the terminal columns of TEXT (UTF-8) into _gpu_cw; East Asian
  # wide characters take two: CJK, kana, Hangul, fullwidth forms, most emoji (as wcwidth says)
  local t=$1 chars
  # shellcheck disable=SC2295  # the bytes are a pattern on purpose
  chars=${t//[$_gpu_b80-$_gpu_bbf]/}  # one byte left of each character
  case $chars in *[$_gpu_be2-$_gpu_bf4]*) ;; *) _gpu_cw=${#chars}; return 0 ;; esac
  # the first bytes of each wide character become one \377 (never in UTF-8); those are counted
  t=${t//${_gpu_be2}[$_gpu_bba-$_gpu_bbf]/$_gpu_bff}  # U+2E80-2FFF CJK radicals
  t=${t//[$_gpu_be3-$_gpu_be9]/$_gpu_bff}  # U+3000-9FFF CJK symbols, kana, ideographs
  t=${t//${_gpu_bea}[$_gpu_bb0-$_gpu_bbf]/$_gpu_bff}  # U+AC00-D7AF Hangul syllables
  t=${t//[$_gpu_beb$_gpu_bec]/$_gpu_bff}
  t=${t//${_gpu_bed}[$_gpu_b80-$_gpu_b9e]/$_gpu_bff}
  t=${t//$_gpu_bef$_gpu_bbc/$_gpu_bff}  # U+FF00-FF60 fullwidth forms
  t=${t//$_gpu_bef${_gpu_bbd}[$_gpu_b80-$_gpu_ba0]/$_gpu_bff}
  t=${t//$_gpu_bef${_gpu_bbf}[$_gpu_ba0-$_gpu_ba6]/$_gpu_bff}  # U+FFE0-FFE6 fullwidth signs
  t=${t//$_gpu_bf0${_gpu_b9f}[$_gpu_b8c-$_gpu_b9b]/$_gpu_bff}  # U+1F300-1F6FF pictographs
  t=${t//$_gpu_bf0${_gpu_b9f}[$_gpu_ba4-$_gpu_ba7]/$_gpu_bff}  # U+1F900-1F9FF
  t=${t//${_gpu_bf0}[$_gpu_ba0-$_gpu_bbf]/$_gpu_bff}  # U+20000-3FFFF CJK extensions
  t=${t//[!$_gpu_bff]/}
  _gpu_cw=$((${#chars} + ${#t}))
}

_gpu_whole_chars() {  # _gpu_whole_chars TEXT: TEXT less a UTF-8 sequence cut short at its end
  _gpu_c=$1
  # shellcheck disable=SC2295  # the bytes are a pattern on purpose
  local tail=${_gpu_c##*[!$_gpu_b80-$_gpu_bbf]}  # trailing continuation bytes
  local lead=${_gpu_c%"$tail"}
  lead=${lead#"${lead%?}"}
  case $lead in
    [$_gpu_c2-$_gpu_bdf]) [ "${#tail}" -ge 1 ] || _gpu_c=${_gpu_c%?} ;;
    [$_gpu_be0-$_gpu_bef]) [ "${#tail}" -ge 2 ] || _gpu_c=${_gpu_c%"$lead$tail"} ;;
    [$_gpu_bf0-$_gpu_bf4]) [ "${#tail}" -ge 3 ] || _gpu_c=${_gpu_c%"$lead$tail"} ;;
  esac
}

_gpu_cut() { _gpu_fit "$1" "$2" head; }  # _gpu_cut TEXT WIDTH: TEXT in WIDTH columns, …
_gpu_cut_left() { _gpu_fit "$1" "$2" tail; }  # _gpu_cut_left TEXT WIDTH: …TEXT's end

_gpu_cut_middle() {  # _gpu_cut_middle TEXT WIDTH: TEXT, else its start…its end in WIDTH columns
  # (the end no wider than the start: a name's seed, extension or :id part stays), into _gpu_c
  _gpu_c=$1
  [ "${#1}" -le "$2" ] && return 0
  _gpu_cols "$1"
  [ "$_gpu_cw" -le "$2" ] && return 0
  if [ "$2" -lt 3 ]; then _gpu_cut "$1" "$2"; return; fi
  local head tail=$((($2 - 1) / 2))
  _gpu_fit "$1" "$(($2 - tail))" head; head=${_gpu_c%…}  # its start, in WIDTH-1-tail columns
  _gpu_cols "$head"
  _gpu_fit "$1" "$(($2 - _gpu_cw))" tail  # its end, in the columns the start left
  _gpu_c=$head$_gpu_c
}

_gpu_fit() {  # _gpu_fit TEXT WIDTH head|tail: TEXT, else its longest head (tail) in whole
  # characters that fits WIDTH columns with "…" (one column, never read as a full stop), into
  # _gpu_c
  _gpu_c=$1
  [ "${#1}" -le "$2" ] && return 0  # no character takes more columns than it has bytes
  _gpu_cols "$1"
  [ "$_gpu_cw" -le "$2" ] && return 0
  local want=$(($2 - 1)) dots=… n best='' part more
  if [ "$2" -le 1 ]; then want=$2 dots=''; fi
  n=$want
  while [ "$n" -le "${#1}" ]; do  # longer parts until one more character would not fit
    if [ "$3" = head ]; then
      _gpu_whole_chars "${1:0:$n}"
      part=$_gpu_c
    else
      part=${1:$((${#1} - n))}
      # shellcheck disable=SC2295  # the bytes are a pattern on purpose
      part=${part#"${part%%[!$_gpu_b80-$_gpu_bbf]*}"}  # no half character at the start
    fi
    _gpu_cols "$part"
    [ "$_gpu_cw" -le "$want" ] || break
    best=$part
    [ "$_gpu_cw" -lt "$want" ] || break
    # a byte more is at most a column more, but a wide character needs three bytes for two
    more=$((${#part} + want - _gpu_cw))
    if [ "$more" -gt "$n" ]; then n=$more; else n=$((n + 1)); fi
  done
  if [ "$3" = head ]; then _gpu_c=$best$dots; else _gpu_c=$dots$best; fi
}

_gpu_pad() {  # _gpu_pad TEXT WIDTH: TEXT and spaces to make WIDTH columns, into _gpu_pd
  _gpu_cols "$1"
  _gpu_pd=$1
  [ "$_gpu_cw" -ge "$2" ] || _gpu_pd=$1${_gpu_blank:0:$(($2 - _gpu_cw))}
}

_gpu_line() {  # _gpu_line TEXT...: one line of gpu_status, escaped, cut to 100 columns unless -l
  local IFS=' '
  _gpu_esc "$*"
  if [ -z "${_gpu_o_long-}" ]; then _gpu_cut "$_gpu_e" 100; _gpu_e=$_gpu_c; fi
  printf '%s\n' "$_gpu_e"
}

_gpu_js() {  # _gpu_js TEXT: TEXT as a JSON string into _gpu_j (invalid UTF-8 becomes U+FFFD)
  # shellcheck disable=SC2101  # [:cntrl:] is inside the bracket expression
  case $1 in *[[:cntrl:]\"\\$_gpu_b80-$_gpu_bff]*) ;; *) _gpu_j=\"$1\"; return 0 ;; esac
  local rest=$1 head c b seq n out=''
  while :; do
    # shellcheck disable=SC2295  # the bytes are a pattern on purpose
    head=${rest%%[[:cntrl:]\"\\$_gpu_b80-$_gpu_bff]*}
    out=$out$head
    rest=${rest#"$head"}
    [ -n "$rest" ] || break
    c=${rest%"${rest#?}"}
    rest=${rest#?}
    case $c in
      \") out=$out'\"' ;;
      \\) out=$out\\\\ ;;
      [[:cntrl:]]) out=$out'\u00'$(printf '%02x' "'$c") ;;
      *)
        case $c in
          [$_gpu_c2-$_gpu_bdf]) n=1 ;;
          [$_gpu_be0-$_gpu_bef]) n=2 ;;
          [$_gpu_bf0-$_gpu_bf4]) n=3 ;;
          *) n=0 ;;
        esac
        seq=$c
        while [ "$n" -gt 0 ]; do
          b=${rest%"${rest#?}"}
          case $b in [$_gpu_b80-$_gpu_bbf]) ;; *) break ;; esac
          seq=$seq$b
          rest=${rest#?}
          n=$((n - 1))
        done
        if [ "$n" -eq 0 ] && [ "${#seq}" -gt 1 ]; then out=$out$seq; else out=$out'\ufffd'; fi ;;
    esac
  done
  _gpu_j=\"$out\"
}

_gpu_jn() {  # _gpu_jn TEXT: TEXT as a JSON number when it is one (ASCII digits), else null
  local whole frac=''
  case $1 in '' | *[!0-9.]* | .* | *. | *.*.*) _gpu_j=null; return 1 ;; esac
  whole=${1%%.*}
  case $1 in *.*) frac=.${1#*.} ;; esac
  while [ "${#whole}" -gt 1 ] && [ "${whole#0}" != "$whole" ]; do whole=${whole#0}; done
  _gpu_j=$whole$frac
}

_gpu_jseries() {  # _gpu_jseries TEXT: comma-separated values as a JSON list, null where empty
  local IFS=, out='' n=0
  # shellcheck disable=SC2086  # split on the commas (the dispatcher turned globbing off)
  set -- $1
  while [ "$#" -gt 0 ] && [ "$n" -lt 1024 ]; do
    _gpu_jn "$1"
    out=$out${out:+, }$_gpu_j
    n=$((n + 1))
    shift
  done
  _gpu_j="[$out]"
}

# Names and numbers #################################################################################

_gpu_usage() {  # _gpu_usage: the usage line of the current command; returns 2
  _gpu_spec "$_gpu_cmd"
  _gpu_err "usage: gpu_$_gpu_cmd${_gpu_sp_use:+ $_gpu_sp_use} (gpu_$_gpu_cmd --help)"
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

_gpu_is_id() {  # _gpu_is_id NAME: is NAME a client task id (protocol: Task ids and run order)?
  case $1 in
    [0-9][0-9][0-9]-[0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9]_[0-9][0-9][0-9][0-9][0-9][0-9]_[0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]-?*)
      case ${1#*-*-*-} in *[!A-Za-z0-9._-]*) return 1 ;; esac
      [ "${#1}" -le 122 ]; return ;;
  esac
  return 1
}

_gpu_short() {  # _gpu_short ID: the name part of a client id (train.sh) into _gpu_s, else ID
  if _gpu_is_id "$1"; then _gpu_s=${1#*-*-*-}; else _gpu_s=$1; fi
}

_gpu_awk_ids() {  # _gpu_is_id, _gpu_short and _gpu_rand as awk functions (is_id, short,
  # random_part) for the client's awk programs, into _gpu_aw
  _gpu_aw='
  function is_id(id) { return length(id) <= 122 && id ~ ID && substr(id, 40) !~ /[^A-Za-z0-9._-]/ }
  function short(id) { return is_id(id) ? substr(id, 40) : id }  # the name starts at byte 40
  function random_part(id) { return is_id(id) ? substr(id, 31, 8) : "" }
  BEGIN {
    d = "[0-9]"; h = "[0-9a-f]"
    ID = "^" d d d "-" d d d d d d d d "_" d d d d d d "_" d d d d d d d d d "-" h h h h h h h h
    ID = ID "-."
  }
'
}

_gpu_rand() {  # _gpu_rand ID: the 8 random hex digits of a client id into _gpu_s, else empty
  _gpu_s=''
  _gpu_is_id "$1" || return 1
  _gpu_s=${1#*-*-}
  _gpu_s=${_gpu_s%%-*}
}

_gpu_safe_name() {  # _gpu_safe_name TEXT: characters outside A-Za-z0-9._- become _ (into _gpu_s)
  _gpu_s=${1//[!A-Za-z0-9._-]/_}
}

_gpu_int() {  # _gpu_int VALUE: whole seconds of an epoch or a duration into _gpu_i; 1 if none
  _gpu_i=${1%%.*}
  case $_gpu_i in ''|*[!0-9]*|???????????????*) _gpu_i=0; return 1 ;; esac
  while [ "${#_gpu_i}" -gt 1 ] && [ "${_gpu_i#0}" != "$_gpu_i" ]; do _gpu_i=${_gpu_i#0}; done
}

_gpu_whole() {  # _gpu_whole TEXT MAX: a whole number 0..MAX (ASCII digits) into _gpu_i; 1 if not
  case $1 in ''|*[!0-9]*) return 1 ;; esac
  _gpu_int "$1" || return 1
  [ "$_gpu_i" -le "$2" ]
}

_gpu_bounded() {  # _gpu_bounded VALUE: a count read from a file, 0..1024, into _gpu_i
  case $1 in
    '' | *[!0-9]*) _gpu_i=0 ;;
    ?????*) _gpu_i=1024 ;;
    *) _gpu_int "$1"; [ "$_gpu_i" -le 1024 ] || _gpu_i=1024 ;;
  esac
}

_gpu_now() {  # the time (epoch, whole seconds) into _gpu_t: the shell's clock, else date
  if [ -z "${ZSH_VERSION-}" ]; then printf -v _gpu_t '%(%s)T' -1; return; fi
  if zmodload zsh/datetime 2>/dev/null; then _gpu_t=$EPOCHSECONDS; return; fi
  _gpu_t=$(command date +%s)
}

_gpu_cd() {  # _gpu_cd DIR: cd -P into DIR (in a subshell): never through CDPATH, the user's cd
  # function, or with the output of a zsh chpwd hook
  CDPATH='' builtin cd -P -- "$1" >/dev/null 2>&1 || return
}

_gpu_sleep() {  # _gpu_sleep SECONDS: a pause that Ctrl-C always ends (see _gpu_bg)
  command sleep "$1" &
  wait "$!"
}

_gpu_bg() {  # _gpu_bg FUNCTION ARGS...: run a loop that waits for the queue as a background job
  # and wait for it: its return code. Bash takes a Ctrl-C for handled when the foreground child
  # it waits for ends normally (one that was just exiting), and goes on; the wait builtin
  # returns at once for a trapped signal, and the trap ends the job. The loop ends too when the
  # shell that ran the command is gone (_gpu_shell_lives), which no trap here can see.
  _gpu_caller
  "$@" &
  _gpu_job=$!
  trap 'kill "$_gpu_job" 2>/dev/null; exit 130' INT
  trap 'kill "$_gpu_job" 2>/dev/null; exit 129' HUP
  trap 'kill "$_gpu_job" 2>/dev/null; exit 143' TERM
  wait "$_gpu_job"
}

_gpu_caller() {  # in the command's subshell: its PID into _gpu_sub and its parent's, the shell
  # that ran the command, into _gpu_parent; both empty without /proc, and when that shell runs
  # the command itself (zsh -c does so for its last command: the traps of _gpu_bg are its own)
  local stat IFS=' '
  _gpu_sub='' _gpu_parent=''
  { IFS= read -r stat < /proc/self/stat; } 2>/dev/null || return 0
  # shellcheck disable=SC2086  # the PID, then the fields after the name (state, parent, ...)
  set -- ${stat%% (*} ${stat##*) }
  [ "$#" -ge 3 ] && [ "$1" != "$$" ] || return 0
  _gpu_sub=$1 _gpu_parent=$3
}

_gpu_shell_lives() {  # is the shell that ran the command (_gpu_caller) still there? A SIGTERM or
  # SIGHUP sent to that shell alone (a job's script, a shell whose parent ends it) ends it and
  # none of its children: the command's subshell, orphaned, gets another parent. Its loops look
  # here between two polls, and end (1) when it is gone; unknown (no /proc) counts as there
  local stat IFS=' '
  [ -n "${_gpu_sub-}" ] || return 0
  { IFS= read -r stat < "/proc/$_gpu_sub/stat"; } 2>/dev/null || return 1  # the subshell is gone
  # shellcheck disable=SC2086  # the fields after the name
  set -- ${stat##*) }
  [ "${2-}" = "$_gpu_parent" ]
}

_gpu_dur() {  # _gpu_dur SECONDS: 4.2s, 12m03s, 3h05m or 2d04h into _gpu_d; - when not a number
  local s m h f
  _gpu_int "$1" || { _gpu_d=-; return; }
  s=$_gpu_i
  if [ "$s" -lt 60 ]; then
    f=''
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
  _gpu_minute "$@"
  printf '%s\n' "$_gpu_dt"
}

_gpu_minute() {  # _gpu_minute EPOCH [FALLBACK]: _gpu_date's text into _gpu_dt
  _gpu_dt=${2:--}
  _gpu_int "$1" || return 0
  if [ -z "${ZSH_VERSION-}" ]; then printf -v _gpu_dt '%(%Y-%m-%d %H:%M)T' "$_gpu_i"; return; fi
  if zmodload zsh/datetime 2>/dev/null; then strftime -s _gpu_dt '%Y-%m-%d %H:%M' "$_gpu_i"
    return; fi
  _gpu_dt=$(command date -d "@$_gpu_i" '+%Y-%m-%d %H:%M' 2>/dev/null \
    || command date -r "$_gpu_i" '+%Y-%m-%d %H:%M' 2>/dev/null) || _gpu_dt=${2:--}
}

_gpu_shquote() {  # _gpu_shquote WORD: WORD as the shell would need it typed, into _gpu_w
  case $1 in
    '') _gpu_w="''" ;;
    *[!A-Za-z0-9_./:=,+@%^-]*) _gpu_w="'${1//\'/\'\\\'\'}'" ;;
    *) _gpu_w=$1 ;;
  esac
}

# Files #############################################################################################

_gpu_ls() {  # _gpu_ls DIR: _gpu_list_names's names on stdout
  _gpu_list_names "$1"
  printf '%s' "$_gpu_v"
}

_gpu_list_names() {  # _gpu_list_names DIR: published names in DIR (no dot-names) in run order,
  # one a line, into _gpu_v; a newline in a name shows as ? (protocol: one entry is one task,
  # whatever its name holds). The shell's own glob, sorted in the C locale as sort(1) would: no
  # process to start (a link is not followed, as find(1) does not); find(1) and sort(1) for a
  # history
  _gpu_v=''
  [ -d "$1" ] && [ ! -L "$1" ] || return 0
  local dir="$1"
  case ${dir##*/} in
    done | failed | logs | records | names) set -- many ;;  # a history
    *)
      set +f  # the dispatcher's noglob, for the one pattern
      set -- "$dir"/*
      set -f
      [ "$#" -eq 1 ] && [ ! -e "$1" ] && [ ! -L "$1" ] && return 0 ;;
  esac
  if [ "$#" -eq 1 ] && [ "$1" = many ] || [ "$#" -gt 2000 ]; then
    # many names: the shell's work on each costs more than these three processes
    _gpu_v=$(command find "$dir" -mindepth 1 -maxdepth 1 ! -name '.*' -printf '%f\0' \
      2>/dev/null | command sort -z | command tr '\n\0' '?\n')
    _gpu_v=${_gpu_v:+$_gpu_v$_gpu_nl}
    return 0
  fi
  set -- "${@##*/}"
  printf -v _gpu_v '%s\n' "${@//$_gpu_nl/?}"
}

_gpu_no_entries() {  # _gpu_no_entries DIR: has DIR no published name (or is it not there)?
  [ -d "$1" ] || return 0
  set +f  # the dispatcher's noglob, for the one pattern
  set -- "$1"/*
  set -f
  [ "$#" -eq 1 ] && [ ! -e "$1" ] && [ ! -L "$1" ]
}

_gpu_holding() {  # _gpu_holding LIST TEXT: the lines of LIST that may hold TEXT, into _gpu_v:
  # all of a short LIST; of a long one, those that hold it (one grep, not a test a line)
  _gpu_lines "$1"
  if [ "$_gpu_n" -le 64 ]; then _gpu_v=$1; return; fi
  _gpu_v=$(printf '%s' "$1" | LC_ALL=C command grep -F -e "$2")
}

_gpu_minus() {  # _gpu_minus LIST LINES: the lines of LIST that are none of LINES, in
  # their order, into _gpu_v (a few LINES in a short LIST: the shell's patterns; else one awk)
  local line list=$_gpu_nl$1 IFS=$_gpu_nl
  _gpu_v=$1
  [ -n "$1" ] && [ -n "${2//$_gpu_nl/}" ] || return 0
  _gpu_lines "$1"; line=$_gpu_n
  _gpu_lines "$2"
  # (a pattern a line of LINES goes over all of LIST: one awk is cheaper beyond a few of them)
  if [ "$_gpu_n" -gt 64 ] || [ $((_gpu_n * line)) -gt 20000 ]; then
    line=${2#"$_gpu_nl"}; line=${line%"$_gpu_nl"}
    list=${line//[!"$_gpu_nl"]/}  # the lines awk counts, empty ones too
    _gpu_v=$(printf '%s\n%s\n%s' "$((${#list} + 1))" "$line" "$1" | command awk '
      NR == 1 { n = $0 + 1; next }
      NR <= n { drop[$0] = 1; next }
      !($0 in drop)')
    _gpu_v=${_gpu_v:+$_gpu_v$_gpu_nl}
    return 0
  fi
  for line in $2; do
    case $list in
      *"$_gpu_nl$line$_gpu_nl"*) list=${list/"$_gpu_nl$line$_gpu_nl"/$_gpu_nl} ;;
    esac
  done
  _gpu_v=${list#"$_gpu_nl"}
}

_gpu_lines() {  # _gpu_lines LIST: the number of lines of LIST, none empty, into _gpu_n
  local IFS=$_gpu_nl
  # shellcheck disable=SC2086  # the lines (the dispatcher's noglob is on)
  set -- $1
  _gpu_n=$#
}

_gpu_count() {  # _gpu_count DIR: sets _gpu_n to the number of published names in DIR
  _gpu_n=0
  [ -d "$1" ] && [ ! -L "$1" ] || return 0
  set +f  # the dispatcher's noglob, for the one pattern
  set -- "$1"/*
  set -f
  [ "$#" -eq 1 ] && [ ! -e "$1" ] && [ ! -L "$1" ] && return 0
  _gpu_n=$#
}

_gpu_load() {  # _gpu_load FILE: a key=value file into _gpu_f_<key>; 1 when it cannot be read
  local line head key n=0 IFS=' '
  # shellcheck disable=SC2086  # the names of the previous file's keys
  [ -z "$_gpu_keys" ] || unset $_gpu_keys
  _gpu_keys='' _gpu_big=''
  if [ -n "${_gpu_pre_on-}" ] && [ -n "${_gpu_pre[$1]+set}" ]; then  # read by _gpu_preload
    eval "${_gpu_pre[$1]}"
    return 0
  fi
  # a regular file only (a FIFO would block), of at most MAX_RECORD_BYTES (4 MiB; protocol:
  # a larger one is corrupt, and a sparse one would take hours: _gpu_big=1); at most 20000
  # lines (a state file of 1024 GPUs)
  _gpu_head "$1" 4194304 || return 1
  IFS=$_gpu_nl
  for line in $_gpu_text; do
    [ "$n" -lt 20000 ] || break
    n=$((n + 1))
    # the key from the line's start: a pattern on a line of megabytes takes quadratic time
    head=${line:0:128} key=${head%%=*}
    case $key in '' | *[!a-z0-9_.]* | "$head") continue ;; esac  # not a key=value line
    eval "_gpu_f_${key//./_}=\${line:$((${#key} + 1))}"
    _gpu_keys="$_gpu_keys _gpu_f_${key//./_}"
  done
  _gpu_text=''
}

_gpu_head() {  # _gpu_head FILE MAX: FILE into _gpu_text, its NUL bytes dropped (as read(1) drops
  # them), read by the shell (no process but for a file that holds a NUL, in bash); 1 when FILE
  # is not a regular file it may read (a FIFO would block), or when it holds more than MAX bytes
  # (then _gpu_big=1: never read further, a sparse file of a TiB takes no time)
  local nul more=$(($2 + 1)) IFS
  _gpu_text='' _gpu_big=''
  [ -f "$1" ] && [ -r "$1" ] || return 1
  if [ -n "${ZSH_VERSION-}" ]; then
    { IFS= read -r -u 0 -k "$more" _gpu_text; } 2>/dev/null < "$1"
    if [ "${#_gpu_text}" -gt "$2" ]; then _gpu_big=1 _gpu_text=''; return 1; fi
    printf -v nul '\0'  # (zsh's $'\0' is empty)
    case $_gpu_text in *"$nul"*)  # split on them and joined (${x//"$nul"/} takes quadratic time)
      IFS=$nul
      # shellcheck disable=SC2086  # split on the NUL bytes (the dispatcher turned globbing off)
      set -- $_gpu_text
      IFS=''
      _gpu_text="$*" ;;
    esac
  elif { IFS= read -r -d '' -n "$more" _gpu_text; } 2>/dev/null < "$1"; then
    if [ "${#_gpu_text}" -gt "$2" ]; then _gpu_big=1 _gpu_text=''; return 1; fi
    # it stopped at a NUL byte (bash's read drops them, and does not count them)
    nul=$(command stat -L -c %s -- "$1" 2>/dev/null)
    case $nul in '' | *[!0-9]*) nul=0 ;; esac
    if [ "${#nul}" -gt 15 ] || [ "$nul" -gt "$2" ]; then _gpu_big=1 _gpu_text=''; return 1; fi
    _gpu_text=$(command head -c "$2" -- "$1" 2>/dev/null | command tr -d '\000')
  fi
  return 0
}

_gpu_preload() {  # _gpu_preload ITEM...: files and tasks read by one awk into _gpu_pre (an
  # associative array of the caller's, _gpu_pre_on set). An ITEM is a FILE, which _gpu_load
  # then takes from there (the assignments its own loop would make; a file awk cannot give as
  # that loop reads it, one that holds a NUL byte, or all when awk failed, is left to _gpu_load),
  # or tasks (_gpu_task), from their records, held/, and for running tasks the node states' view
  # (those among the ITEMs, else all): <fs>DIR/ID lines, or <fs>DIR and a line of each ID in
  # DIR; as _gpu_pre_want (the awk below) asks. For json, the tasks' JSON lists go into
  # _gpu_pre_json instead (_gpu_status_json)
  local f line out files tasks='' prio='' held='' logs='' running='' given=''
  local want=${_gpu_pre_want-} IFS=$_gpu_nl
  local -a fl st
  _gpu_no_entries "$_gpu_q/priority" || prio=1  # gpu_priority's files are there
  _gpu_no_entries "$_gpu_q/held" || held=1
  [ "$want" != json ] || logs=1
  _gpu_pre_json=''
  # the tasks go to awk as they are, a section of lines each: the shell does nothing a task (a
  # loop over 5,000 pending tasks took seconds)
  for f in "$@"; do
    case $f in
      "$_gpu_fs"?*)
        case $_gpu_q in *"$_gpu_nl"* | *"$_gpu_fs"*) want=''; continue ;; esac  # (none is read)
        f=${f#?} line=${f%%"$_gpu_nl"*}
        case $line in
          */*) line='' ;;  # DIR/ID lines
          *) f=${f#"$line"} ;;  # DIR, then its ids
        esac
        case $line in running) running=1 ;; '') case $f in running/*) running=1 ;; esac ;; esac
        tasks=$tasks/$_gpu_fs$line$_gpu_fs$_gpu_q/$_gpu_nl$f$_gpu_nl ;;
      *"$_gpu_nl"* | *"$_gpu_fs"* | -) ;;  # one name a line
      "$_gpu_q"/nodes/*)  # a node state: what its daemon runs, too
        given=1; [ -f "$f" ] && [ -r "$f" ] && fl+=("N$_gpu_fs$f") ;;
      *) [ -f "$f" ] && [ -r "$f" ] && fl+=("F$_gpu_fs$f") ;;
    esac
  done
  if [ -n "$running" ] && [ -z "$given" ]; then  # where a running task runs: the node states
    local _gpu_states
    _gpu_node_list
    for f in $_gpu_states; do
      [ -f "$_gpu_q/nodes/$f" ] && fl+=("N$_gpu_fs$_gpu_q/nodes/$f")
    done
  fi
  files=${fl[*]-}  # (one a line: IFS is a newline)
  files=${files:+$files$_gpu_nl}
  [ -n "$files$tasks" ] || return 0
  # the awk: input lines S<fs>SIZE<fs>TYPE<fs>FILE (a file that is there: one is read only when
  # it is a regular file, a record only of at most 4 MiB), then F|N<fs>FILE (a file, a node
  # state), then the sections of tasks: /<fs>DIR<fs>INSTANCE/ (no id holds a slash), then a line
  # an ID (DIR/ID when DIR is empty). Out for F and N "FILE<fs>assignments", for a task
  # "T<fs>DIR/ID<fs>" and what _gpu_pre_want asks for: the assignments of _gpu_t_* (newlines as
  # $'\n'), "row" its row of gpu_status (_gpu_status_row); for "json", one last line "J<fs>",
  # the lists of gpu_status --json, their newlines as <rs> (\036); for "files" the files of the
  # tasks to stat, one a line.
  # It is the one reading of a task's records, and the one writing of a task's row and JSON.
  # shellcheck disable=SC2016  # $_gpu_keys is for the eval of the output
  local prog='
  function lit(v,   out, i) {  # v in single quotes, for eval
    out = ""
    while ((i = index(v, sq)) > 0) {
      out = out substr(v, 1, i - 1) sq "\"" sq "\"" sq; v = substr(v, i + 1)
    }
    return sq out v sq
  }
  function read(file, show,   line, got, lines, eq, key, value, bad, n, i, assign) {  # a file
    if (file in BIG) return  # (left to _gpu_load, which tells it)
    n = 0; lines = 0; bad = 0
    while (lines < 20000 && (got = (getline line < file)) > 0) {
      lines++
      if (line ~ /\000/) { bad = 1; gsub(/\000/, "", line) }
      eq = index(line, "=")
      key = substr(line, 1, eq - 1)
      if (eq < 2 || key ~ /[^a-z0-9_.]/) continue
      if (index(key, ".")) gsub(/\./, "_", key)
      value = substr(line, eq + 1)
      V[file, key] = value
      if (show) assign[++n] = "_gpu_f_" key "=" lit(value) " _gpu_keys=$_gpu_keys" sq " _gpu_f_" \
        key sq " "
    }
    close(file)
    if (got < 0) return
    got_file[file] = 1
    if (!show || bad) return
    printf "%s\037", file
    for (i = 1; i <= n; i++) printf "%s", assign[i]
    printf "\n"
  }
  function node(file,   rank, n, k, id, before_) {  # the running.<k> of a node state into RM
    rank = file; sub(/.*\/node-/, "", rank); sub(/\.state$/, "", rank)
    n = bounded(get(file, "running_count"))
    for (k = 0; k < n; k++) {
      id = get(file, "running_" k "_id")
      if (id == "") continue
      before_ = (id in RM) ? RM[id] "\n" : ""  # (mawk makes RM[id] before the right side)
      RM[id] = before_ rank "\037" get(file, "running_" k "_gpus") "\037" \
        get(file, "running_" k "_started") "\037" get(file, "running_" k "_rank")
    }
  }
  function has(f) { return f in got_file }
  function record(f) {  # a record of a task, read when it is a regular file: is it there?
    if (!(f in tried)) { tried[f] = 1; if (f in REG) read(f, 0) }
    return f in got_file
  }
  function get(f, k) { return ((f, k) in V) ? V[f, k] : "" }
  function int_of(v) {  # _gpu_int: whole seconds, "" when none
    sub(/\..*/, "", v)
    if (v == "" || v ~ /[^0-9]/ || length(v) >= 15) return ""
    sub(/^0+/, "", v)
    return v == "" ? "0" : v
  }
  function whole(v, max) {  # _gpu_whole: 0..max, "" when not
    if (v == "" || v ~ /[^0-9]/) return ""
    v = int_of(v)
    return (v != "" && v + 0 <= max) ? v : ""
  }
  function bounded(v) {  # _gpu_bounded
    if (v == "" || v ~ /[^0-9]/) return 0
    if (length(v) >= 5) return 1024
    v = int_of(v) + 0
    return v > 1024 ? 1024 : v
  }
  function shquote(w,   out, i) {  # _gpu_shquote
    if (w == "") return sq sq
    if (w !~ /[^A-Za-z0-9_.\/:=,+@%^-]/) return w
    out = ""
    while ((i = index(w, sq)) > 0) {
      out = out substr(w, 1, i - 1) sq "\\" sq sq; w = substr(w, i + 1)
    }
    return sq out w sq
  }
  function set(name, value) { R[name] = value; if (want == "") TV[name] = lit(value) }
  function setlines(name, list,   part, n, i, out) {  # a list of lines (one a line)
    R[name] = list
    if (want != "") return  # (the quoted form is for _gpu_task alone)
    n = split(list, part, "\n")
    out = n ? lit(part[1]) : sq sq
    for (i = 2; i <= n; i++) out = out "$" sq "\\n" sq lit(part[i])
    R[name] = list; TV[name] = out
  }
  function running(id,   part, n, i, e, nodes, k, t, gpus, started) {  # as the daemons say
    n = split(RM[id], part, "\n"); gpus = ""; started = ""
    for (i = 1; i <= n; i++) {
      split(part[i], e, "\037")
      if (e[4] == "") e[4] = 0
      part[i] = e[4] ":" e[1]
      if (e[4] == "0") { gpus = e[2]; started = e[3] }  # of rank 0
    }
    for (i = 2; i <= n; i++)  # sort -n: by the rank, then the line
      for (k = i; k > 1 && before(part[k], part[k - 1]); k--) {
        t = part[k]; part[k] = part[k - 1]; part[k - 1] = t
      }
    nodes = ""
    for (i = 1; i <= n; i++) {
      t = part[i]; sub(/^[0-9]*:/, "", t); nodes = nodes (i > 1 ? "," : "") t
    }
    set("state", "running"); set("node", nodes)
    if (gpus != "") set("gpus", gpus)
    if (started != "") set("started", started)
  }
  function js(v,   out, n, i, c, b, k, seq) {  # _gpu_js: v as a JSON string
    if (v !~ /[\001-\037\177"\\\200-\377]/) return "\"" v "\""
    out = ""; n = length(v); i = 1
    while (i <= n) {
      c = substr(v, i++, 1); b = ORD[c]
      if (c == "\"" || c == "\\") out = out "\\" c
      else if (b < 32 || b == 127) out = out sprintf("\\u%04x", b)
      else if (b < 128) out = out c
      else {
        k = (b >= 194 && b <= 223) ? 1 : (b >= 224 && b <= 239) ? 2 : (b >= 240 && b <= 244) ? 3 : 0
        seq = c
        while (k > 0 && i <= n && ORD[c = substr(v, i, 1)] >= 128 && ORD[c] <= 191) {
          seq = seq c; i++; k--
        }
        out = out ((k == 0 && length(seq) > 1) ? seq : "\\ufffd")
      }
    }
    return "\"" out "\""
  }
  function jstr(v) { return v == "" ? "null" : js(v) }
  function jn(v,   w, f, i) {  # _gpu_jn: v as a JSON number, else null
    if (v == "" || v ~ /[^0-9.]/ || v ~ /^\./ || v ~ /\.$/ || v ~ /\..*\./) return "null"
    w = v; f = ""
    if ((i = index(v, ".")) > 0) { w = substr(v, 1, i - 1); f = substr(v, i) }
    sub(/^0+/, "", w)
    return (w == "" ? "0" : w) f
  }
  function jlist(v,   part, n, i, out, j) {  # "0,3" as [0, 3]
    n = split(v, part, ","); out = ""
    for (i = 1; i <= n; i++) if ((j = jn(part[i])) != "null") out = out (out == "" ? "" : ", ") j
    return "[" out "]"
  }
  function jcount(v,   j) {  # a count of a request: "all", a number, else a string
    if (v == "all") return "\"all\""
    return (j = jn(v)) == "null" ? js(v) : j
  }
  function json(   out, part, n, i, list) {  # the task as JSON, but its "log" (and the braces)
    out = "\"id\": " js(R["id"]) ", \"name\": " js(R["name"]) ", \"display_name\": " \
      jstr(R["display"]) ", \"shown_name\": " js(R["display"] == "" ? R["name"] : R["display"])
    out = out ", \"priority\": " (R["prio"] == "top" ? "\"top\"" : jn(R["prio"])) ", \"state\": " \
      js(R["state"]) ", \"command\": " jstr(R["command"]) ", \"source\": " jstr(R["source"])
    n = R["argc"] ? split(R["argv"], part, "\n") : 0; list = ""
    if (R["argc"] && n == 0) { n = 1; part[1] = "" }
    for (i = 1; i <= n; i++) list = list (i > 1 ? ", " : "") js(part[i])
    out = out ", \"args\": [" list "], \"cwd\": " jstr(R["cwd"]) ", \"request\": {\"gpus\": " \
      jcount(R["gpus_req"]) ", \"nodes\": " jcount(R["nodes_req"]) ", \"time_limit\": " \
      jn(R["time_req"]) "}"
    n = split(R["after"], part, " "); list = ""
    for (i = 1; i <= n; i++) list = list (i > 1 ? ", " : "") js(part[i])
    out = out ", \"after\": [" list "]"
    n = split(R["env"], part, "\n"); list = ""
    for (i = 1; i <= n; i++) {
      list = list (i > 1 ? ", " : "") js(substr(part[i], 1, index(part[i], "=") - 1)) ": " \
        js(substr(part[i], index(part[i], "=") + 1))
    }
    out = out ", \"env\": {" list "}, \"retry_of\": " jstr(R["retry_of"]) ", \"submitted\": " \
      jn(R["submitted"]) ", \"submitted_by\": " jstr(R["by"]) ", \"nodes\": " \
      (R["node"] == "" ? "null" : jlist(R["node"])) ", \"host\": " jstr(R["host"])
    out = out ", \"gpus\": " (R["state"] == "pending" || R["state"] == "starting" ? "null" : \
      jlist(R["gpus"])) ", \"started\": " jn(R["started"]) ", \"ended\": " jn(R["ended"]) \
      ", \"found\": " jn(R["found"]) ", \"duration\": " jn(R["duration"]) ", \"exit_code\": " \
      jn(R["exit"]) ", \"signal\": " jn(R["signal"]) ", \"reason\": " jstr(R["reason"])
    return out
  }
  function esc(v,   out, n, i, c, b) {  # _gpu_esc: control characters escaped
    if (v !~ /[\001-\037\177\302]/) return v
    out = ""; n = length(v)
    for (i = 1; i <= n; i++) {
      c = substr(v, i, 1); b = ORD[c]
      if (b == 194 && i < n && ORD[substr(v, i + 1, 1)] >= 128 && ORD[substr(v, i + 1, 1)] <= 159)
        out = out sprintf("\\u00%02x", ORD[substr(v, ++i, 1)])
      else if (b == 27) out = out "\\e"
      else if (b == 9) out = out "\\t"
      else if (b == 10) out = out "\\n"
      else if (b == 13) out = out "\\r"
      else if (b < 32 || b == 127) out = out sprintf("\\x%02x", b)
      else out = out c
    }
    return out
  }
  function ranges(v,   part, n, i, x, out, first, last) {  # 0,1,2,5 as 0-2,5
    if (v ~ /[^0-9,]/) return v
    n = split(v, part, ","); out = ""; first = ""; last = ""
    for (i = 1; i <= n + 1; i++) {
      x = i <= n ? int_of(part[i]) : ""
      if (x != "" && last != "" && x + 0 == last + 1) { last = x; continue }
      if (first != "") out = out (out == "" ? "" : ",") (first == last ? first : first "-" last)
      first = x; last = x
    }
    return out
  }
  function dur(v,   s, m, h) {  # _gpu_dur: 4.2s, 12m03s, 3h05m or 2d04h; - when not a number
    if ((s = int_of(v)) == "") return "-"
    s += 0
    if (s < 60) return s (v ~ /\.[0-9]/ ? "." substr(v, index(v, ".") + 1, 1) : "") "s"
    if (s < 3600) { m = s % 60; return int(s / 60) "m" (m < 10 ? "0" : "") m "s" }
    if (s < 86400) { m = int(s % 3600 / 60); return int(s / 3600) "h" (m < 10 ? "0" : "") m "m" }
    h = int(s % 86400 / 3600)
    return sprintf("%d", s / 86400) "d" (h < 10 ? "0" : "") h "h"
  }
  function age(t,   i) {  # _gpu_age: how long ago; clock skew counts as 0
    if ((i = int_of(t)) == "") return "-"
    return now + 0 > i + 0 ? dur(sprintf("%d", now - i)) : "0s"
  }
  function row(   state, where, gpus, time, code) {  # the task as a row of gpu_status
    state = R["state"]; where = R["node"]; gpus = R["gpus"]; time = ""; code = ""
    if (state == "pending" || state == "held") {
      gpus = R["gpus_req"] == "0" ? "cpu" : R["gpus_req"]
      where = R["nodes_req"] == "1" ? "" : "x" R["nodes_req"]
    } else {
      gpus = gpus == "" ? "-" : ranges(gpus)
      if (state == "running" || state == "starting") {
        if (R["started"] != "") time = age(R["started"])
      } else {
        if (R["ended"] != "") time = age(R["ended"]) " ago"
        code = R["exit"] != "" ? R["exit"] : R["signal"] != "" ? "sig" R["signal"] : "-"
      }
    }
    return esc(R["id"]) FS esc(R["display"] == "" ? R["name"] : R["display"]) FS \
      (R["prio"] == "" ? "---" : R["prio"]) FS state FS esc(where) FS esc(gpus) FS time FS code \
      FS esc(R["cmdline"])
  }
  function before(a, b) { return (a + 0 < b + 0) || (a + 0 == b + 0 && a < b) }
  function task(dir, id, inst,   sub_, f, p, name, i, n, env, argv, args, src, cmd, nodes, lg) {
    # one by one: gawk 5.2 aborted (double free) on this array cleared whole
    for (i = 1; i <= NFIELDS; i++) R[FIELD[i]] = ""
    if (want == "") for (i = 1; i <= NFIELDS; i++) TV[FIELD[i]] = sq sq
    set("id", id); set("dir", dir); set("state", dir); set("name", id); set("gpus_req", "all")
    set("nodes_req", 1); set("argc", 0); set("cmdline", id)
    p = id; if ((i = index(id, "-")) > 0) p = substr(id, 1, i - 1)
    set("prio", p ~ /^[0-9][0-9][0-9]$/ ? p : "")
    set("name", name = short(id))
    sub_ = inst "records/" id ".submit"
    if (record(sub_)) {
      set("record", 1)
      set("display", get(sub_, "display_name")); set("source", src = get(sub_, "source"))
      set("command", cmd = get(sub_, "command")); set("cwd", get(sub_, "cwd"))
      f = get(sub_, "gpus"); set("gpus_req", f == "" ? "all" : f)
      f = get(sub_, "nodes"); set("nodes_req", f == "" ? 1 : f)
      set("time_req", whole(get(sub_, "time_limit"), 31536000))
      env = ""; n = bounded(get(sub_, "envc"))
      for (i = 0; i < n; i++) {
        f = get(sub_, "env_" i)
        if (index(substr(f, 2), "=") > 0) env = env (env == "" ? "" : "\n") f
      }
      setlines("env", env)
      set("after", get(sub_, "after")); set("retry_of", get(sub_, "retry_of"))
      set("submitted", get(sub_, "submitted")); set("by", get(sub_, "submitted_by"))
      args = ""; argv = ""; n = bounded(get(sub_, "argc"))
      for (i = 0; i < n; i++) {
        f = get(sub_, "arg_" i)
        args = args " " shquote(f); argv = argv (i ? "\n" : "") f
      }
      set("args", args); setlines("argv", argv); set("argc", n)
    } else {
      src = ""; cmd = ""
    }
    if (cmd == "") { f = src; sub(/.*\//, "", f); cmd = (f == "" ? name : f) args }
    set("cmdline", cmd)
    if (dir == "running") {
      set("state", "starting")
      nodes = ""
      f = inst "records/" id ".gang"
      if (record(f)) { nodes = get(f, "nodes"); set("node", nodes) }
      f = inst "records/" id ".run"
      if (!record(f)) f = inst "records/" id ".rank0.run"
      if (record(f)) {
        set("state", "running")
        if (nodes == "") set("node", get(f, "node_rank"))
        set("host", get(f, "host")); set("gpus", get(f, "gpus"))
        set("started", get(f, "started")); set("attempt", get(f, "attempt"))
      }
      if (id in RM) running(id)  # the view of the daemons, from their state files
    } else if (dir == "pending") {
      if ((inst "held/" id) in THERE) set("state", "held")
      f = inst "priority/" id
      record(f)
      p = get(f, "priority")
      if (p == "top") set("prio", p)  # else a number as the daemon reads it: 7, 042, 500
      else if (p ~ /^[0-9][0-9]?[0-9]?$/) set("prio", sprintf("%03d", p + 0))
    } else if (dir == "done" || dir == "failed") {
      f = inst "records/" id ".result"
      if (record(f)) {
        p = get(f, "state"); set("state", p == "" ? dir : p)
        set("exit", get(f, "exit_code")); set("signal", get(f, "signal"))
        set("reason", get(f, "reason")); set("started", get(f, "started"))
        set("ended", get(f, "ended")); set("duration", get(f, "duration"))
        set("found", get(f, "found"))
        set("host", get(f, "host")); set("node", get(f, "node_rank"))
        set("gpus", get(f, "gpus")); set("attempt", get(f, "attempt"))
        nodes = get(f, "nodes")
        if (nodes != "") set("node", nodes)
      }
    }
    if (want == "json") {  # into its list, with its log
      f = inst "logs/" id; lg = (f ".log") in REG ? js(f ".log") : \
        (f ".rank0.log") in REG ? js(f ".rank0.log") : "null"
      list(dir)
      printf "%s  {%s, \"log\": %s}", (items++ ? "," : "") RS_, json(), lg
      return
    }
    printf "T\037%s/%s\037", dir, id
    if (want == "row") print row()
    else {
      for (i = 1; i <= NSET; i++) printf " _gpu_t_%s=%s", FIELD[i], TV[FIELD[i]]
      printf "\n"
    }
  }
  function list(dir,   k) {  # --json: end the lists before the one of DIR (running, pending,
    # else recent), begin the lists up to it; the first begins the last line of the output
    k = dir == "running" ? 1 : dir == "pending" ? 2 : 3
    while (LISTS < k) {
      printf "%s\"%s\": [", LISTS ? "]," RS_ " " : "J" FS, LIST[++LISTS]
      items = 0
    }
  }
  function files(dir, id, inst,   r) {  # the files task ID may have, for stat to look at
    if (!index(id, "/") && !index(id, FS)) {
      r = inst "records/" id
      print r ".submit"
      if (dir == "running") { print r ".gang"; print r ".run"; print r ".rank0.run" }
      else if (dir == "done" || dir == "failed") print r ".result"
      else if (dir == "pending") {
        if (held) print inst "held/" id
        if (prio) print inst "priority/" id
      }
    }
    if (logs) { print inst "logs/" id ".log"; print inst "logs/" id ".rank0.log" }
  }
  function lost(dir, id, inst,   f, lg) {  # a task awk cannot read (its id holds the field
    # separator or a slash): for --json, what its id says, as _gpu_task_json does without awk
    if (want != "json") return
    f = inst "logs/" id; lg = (f ".log") in REG ? js(f ".log") : \
      (f ".rank0.log") in REG ? js(f ".rank0.log") : "null"
    list(dir)
    printf "%s  {\"id\": %s, \"state\": %s, \"log\": %s}", (items++ ? "," : "") RS_, js(id), \
      js(dir), lg
  }
  BEGIN {
    split("running pending recent", LIST, " "); RS_ = "\036"
    NFIELDS = split("state prio display source command cwd gpus_req nodes_req after args" \
      " retry_of submitted by record time_req env node host gpus started ended duration found" \
      " exit signal reason attempt id dir name argv argc cmdline", FIELD, " ")
    NSET = NFIELDS - 6  # the _gpu_t_* that _gpu_task sets; the rest: its row and JSON
    for (i = 1; i < 256; i++) ORD[sprintf("%c", i)] = i
  }
  $1 == "/" && NF == 3 { SECTION = 1; DIR = $2; INST = $3; next }
  SECTION {  # a task
    if ($0 == "") next
    if (DIR != "") { dir = DIR; id = $0 }
    else { dir = $0; sub(/\/.*/, "", dir); id = substr($0, length(dir) + 2) }
    if (want == "files") files(dir, id, INST)
    else if (index(id, "/") || index(id, FS)) lost(dir, id, INST)
    else task(dir, id, INST)
    next
  }
  want == "files" { if ($1 == "F" || $1 == "N") print substr($0, 3); next }
  $1 == "S" {
    f = substr($0, length($2) + length($3) + 5)
    THERE[f] = 1
    if ($3 ~ /^regular/) REG[f] = 1
    if ($2 + 0 > 4194304) BIG[f] = 1
  }
  $1 == "F" { read(substr($0, 3), 1) }
  $1 == "N" { read(substr($0, 3), 1); node(substr($0, 3)) }
  END { if (want == "json") { list(""); printf "]\n" } }
'
  _gpu_awk_ids
  # which files are there, what they are (a FIFO would block) and their sizes: awk names them,
  # stat looks; the instance first, which is there (a stat that does not say so cannot be used:
  # BSD's; then the shell looks at each)
  out=$({ printf '%s\n' "$_gpu_q"; printf '%s' "$files$tasks" | command awk -F "$_gpu_fs" \
    -v want=files -v held="$held" -v prio="$prio" -v logs="$logs" "$_gpu_aw$prog" 2>/dev/null
    } | command xargs -d '\n' -r stat -L -c "S$_gpu_fs%s$_gpu_fs%F$_gpu_fs%n" -- 2>/dev/null)
  line=${out%%"$_gpu_nl"*}
  if [ "${line##*"$_gpu_fs"}" != "$_gpu_q" ]; then
    for f in $(printf '%s' "$files$tasks" | command awk -F "$_gpu_fs" -v want=files \
      -v held="$held" -v prio="$prio" -v logs="$logs" "$_gpu_aw$prog" 2>/dev/null); do
      if [ -f "$f" ]; then st+=("S${_gpu_fs}0${_gpu_fs}regular file$_gpu_fs$f")
      elif [ -e "$f" ]; then st+=("S${_gpu_fs}0$_gpu_fs-$_gpu_fs$f"); fi
    done
    out=${st[*]-}
  fi
  out=$(printf '%s\n%s' "$out" "$files$tasks" | command awk -F "$_gpu_fs" -v sq="'" \
    -v want="$want" -v now="${_gpu_t-0}" "$_gpu_aw$prog" 2>/dev/null) || return 0
  for f in $out; do
    case $f in
      T"$_gpu_fs"*) f=${f#??}; _gpu_pre[$_gpu_fs${f%%"$_gpu_fs"*}]=${f#*"$_gpu_fs"} ;;
      J"$_gpu_fs"*) _gpu_pre_json=${f#??} ;;  # the last line
      *) _gpu_pre[${f%%"$_gpu_fs"*}]=${f#*"$_gpu_fs"} ;;
    esac
  done
  _gpu_pre_on=1
}

_gpu_field() {  # _gpu_field KEY: the loaded file's KEY into _gpu_val; 1 when absent
  eval "_gpu_val=\${_gpu_f_${1//./_}-}; [ -n \"\${_gpu_f_${1//./_}+set}\" ]"
}

_gpu_cache() {  # the daemon's summary (docs/protocol.md) into _gpu_sum_*, once per command;
  # 1 when there is none or the folders changed since it was written: then list the folders
  case $_gpu_sum in ok) return 0 ;; no) return 1 ;; esac
  _gpu_sum=no
  _gpu_cache_load
  [ "$_gpu_sum" = ok ]
}

_gpu_cache_load() {  # _gpu_cache's work: _gpu_sum=ok when the summary holds. Read at once, its
  # lines taken in as _gpu_load takes them (at most 20000) with no eval, ended.<k> in the order
  # the daemon writes them
  local text line n=0 k=0 ended='' dm='' fm='' lm='' nm='' nd='' nf='' nl='' count='' stamps
  local IFS=$_gpu_nl
  [ -f "$_gpu_q/summary" ] && [ -r "$_gpu_q/summary" ] || return 1
  IFS= read -r -d '' text < "$_gpu_q/summary" 2>/dev/null
  for line in $text; do
    [ "$n" -lt 20000 ] || break
    n=$((n + 1))
    case $line in
      ended."$k"=*) ended=$ended${line#*=}$_gpu_nl; k=$((k + 1)) ;;
      done_mtime=*) dm=${line#*=} ;;
      failed_mtime=*) fm=${line#*=} ;;
      logs_mtime=*) lm=${line#*=} ;;
      names_mtime=*) nm=${line#*=} ;;
      'done'=*) nd=${line#*=} ;;
      failed=*) nf=${line#*=} ;;
      logs=*) nl=${line#*=} ;;
      ended_count=*) count=${line#*=} ;;
    esac
  done
  [ -n "$dm" ] && [ -n "$fm" ] && [ -n "$lm" ] && [ -n "$nm" ] || return 1
  stamps=$(command stat -c %.9Y -- "$_gpu_q/done" "$_gpu_q/failed" "$_gpu_q/logs" \
    "$_gpu_q/names" 2>/dev/null) || return 1
  [ "$stamps" = "$dm$_gpu_nl$fm$_gpu_nl$lm$_gpu_nl$nm" ] || return 1
  _gpu_whole "$nd" 999999999 || return 1; _gpu_sum_done=$_gpu_i
  _gpu_whole "$nf" 999999999 || return 1; _gpu_sum_failed=$_gpu_i
  _gpu_whole "$nl" 999999999 || return 1; _gpu_sum_logs=$_gpu_i
  _gpu_whole "$count" 10000 && [ "$_gpu_i" -eq "$k" ] || return 1
  _gpu_sum_nended=$k _gpu_sum_ended=$ended
  _gpu_sum=ok
}

_gpu_key_ok() {  # _gpu_key_ok NAME: can NAME be a file name in names/ (as the daemon writes)?
  case $1 in '' | .* | */* | *"$_gpu_nl"*) return 1 ;; esac
  [ "${#1}" -le 200 ]
}

_gpu_bucket() {  # _gpu_bucket NAME: the file in names/ that lists NAME's tasks into _gpu_s: the
  # last two bytes of NAME without its extension, each one outside A-Za-z0-9_- as _
  _gpu_s=${1%.*}
  [ "${#_gpu_s}" -le 2 ] || _gpu_s=${_gpu_s:$((${#_gpu_s} - 2))}
  _gpu_s=${_gpu_s//[!A-Za-z0-9_-]/_}
}

_gpu_task_logs() {  # _gpu_task_logs ID [RANK|all]: names in logs/ of task ID's log into _gpu_tl,
  # one a line: its own (rank 0's for a task that spans nodes) when RANK is empty, rank RANK's,
  # or all of them; found by name, never by listing logs/
  local r=0 n=0
  _gpu_tl=''
  case ${2-} in
    '')
      if [ -e "$_gpu_q/logs/$1.log" ]; then _gpu_tl=$1.log$_gpu_nl
      elif [ -e "$_gpu_q/logs/$1.rank0.log" ]; then _gpu_tl=$1.rank0.log$_gpu_nl; fi ;;
    all)
      [ -e "$_gpu_q/logs/$1.log" ] && _gpu_tl=$1.log$_gpu_nl
      # the ranks of its gang record, and any after them
      if _gpu_load "$_gpu_q/records/$1.gang" && _gpu_field nnodes; then
        _gpu_bounded "$_gpu_val"; n=$_gpu_i
      fi
      while [ "$r" -lt 1024 ]; do
        if [ -e "$_gpu_q/logs/$1.rank$r.log" ]; then _gpu_tl=$_gpu_tl$1.rank$r.log$_gpu_nl
        elif [ "$r" -ge "$n" ]; then break; fi
        r=$((r + 1))
      done ;;
    *) [ -e "$_gpu_q/logs/$1.rank$2.log" ] && _gpu_tl=$1.rank$2.log$_gpu_nl ;;
  esac
  return 0
}

_gpu_conf_root() {  # QUEUE_ROOT from submit.conf into _gpu_val: 1 when none, 2 when unusable
  local conf line value='' raw='' found='' n=0
  _gpu_client_dir
  conf=${SUBMIT_CONF:-$_gpu_dir/submit.conf}
  [ -n "${SUBMIT_CONF-}" ] || [ -n "$_gpu_dir" ] || return 1
  [ -f "$conf" ] && [ -r "$conf" ] || return 1
  # submit.sh sources this file; the client only reads the last QUEUE_ROOT= line
  while [ "$n" -lt 10000 ] && { IFS= read -r line || [ -n "$line" ]; }; do
    n=$((n + 1))
    line=${line#"${line%%[![:space:]]*}"}
    case $line in export[[:space:]]*) line=${line#export}; line=${line#"${line%%[![:space:]]*}"} ;;
    esac
    case $line in QUEUE_ROOT=*) value=${line#QUEUE_ROOT=}; found=1 ;; esac
  done < "$conf"
  [ -n "$found" ] || return 1
  raw=$value
  case $value in
    \"*) line=${value#\"}
      case $line in *\"*) value=${line%%\"*} ;; *) value=$value\"; line= ;; esac ;;
    \'*) line=${value#\'}
      case $line in *\'*) _gpu_val=${line%%\'*}; return 0 ;; *) line= ;; esac ;;
    *) value=${value%%[[:space:]]*} ;;
  esac
  case $value in \~ | \~/*) value=\$HOME${value#\~} ;; esac
  value=${value//\$\{HOME\}/\$HOME}
  value=${value//\$\{USER\}/\$USER}
  _gpu_val=$value
  case $value in *\$HOME*) _gpu_val=${_gpu_val//\$HOME/${HOME-}} ;; esac
  case $value in *\$USER*) _gpu_val=${_gpu_val//\$USER/${USER:-${LOGNAME-}}} ;; esac
  case $_gpu_val in
    *[\$\`\\\"\'\(\)\;\&\|\<\>]*)
      _gpu_err "$conf sets QUEUE_ROOT to $raw, which the client does not evaluate (it reads" \
        "the file, it does not run it): export QUEUE_ROOT instead"
      return 2 ;;
  esac
  [ -n "$_gpu_val" ] || return 1
}

_gpu_root_value() {  # the queue root into _gpu_r, and " (from FILE)" into _gpu_from when
  # submit.conf named it; 1 when submit.conf names one the client cannot read (said)
  _gpu_from=''
  if [ -n "${QUEUE_ROOT-}" ]; then _gpu_r=$QUEUE_ROOT; return 0; fi
  _gpu_conf_root
  case $? in
    0) _gpu_r=$_gpu_val; _gpu_from=" (from ${SUBMIT_CONF:-$_gpu_dir/submit.conf})" ;;
    2) _gpu_r=''; return 1 ;;
    *) _gpu_r=${HOME-}/gpu_queue ;;
  esac
}

_gpu_root() {  # sets _gpu_r to the queue root; 1 when it does not exist
  _gpu_root_value || return 1
  [ -d "$_gpu_r" ] && return 0
  if [ -e "$_gpu_r" ]; then
    _gpu_err "the queue root $_gpu_r$_gpu_from is not a folder (set QUEUE_ROOT, or the" \
      "QUEUE_ROOT= line of submit.conf beside client.sh)"
    return 1
  fi
  _gpu_err "the queue root $_gpu_r$_gpu_from does not exist (shared storage not mounted? set" \
    "QUEUE_ROOT, or the QUEUE_ROOT= line of submit.conf beside client.sh)"
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
  # a command that writes (records hold -e values) writes only into folders the daemon would
  # trust: the user's (or root's), no link; one the user shares with the group on purpose (the
  # daemon's --shared-queue) the group reads and writes too. A command that only reads skips
  # the look, a process
  case $_gpu_cmd in status | show | logs | tail | wait | use | list | help) return 0 ;; esac
  set -- "$_gpu_q"
  # the instance may be a link of the user's own (to another file system), as the daemon takes
  # it; one another user made is refused below (its owner could point it elsewhere)
  if [ -L "$_gpu_q" ] && [ -n "$(command find "$_gpu_q" -maxdepth 0 \( -uid "$EUID" -o -uid 0 \) \
    2>/dev/null)" ]; then
    set -- "$_gpu_q/"
  fi
  local dir
  for dir in pending running 'done' failed records logs commands replies nodes held priority \
    names .staging; do
    set -- "$@" "$_gpu_q/$dir"
  done
  _gpu_own_folders "$@" || return 1
  [ -z "$_gpu_gw" ] || umask 007
}

_gpu_own_folders() {  # _gpu_own_folders DIR...: are the DIRs that exist folders the client may
  # write and remove in, as the daemon trusts them (docs/protocol.md, "Who may write it")? Each
  # must be a folder, not a symbolic link, owned by the user (or root, or SHARED_QUEUE_OWNER: a
  # colleague who shares the queue with the group on purpose) and not writable by every user;
  # else it says why and returns 1. _gpu_gw=1 when the first DIR is group-writable
  local line kind uid mode name IFS=$_gpu_nl
  _gpu_gw=''
  for line in $(command find "$@" -maxdepth 0 -printf '%y %U %m %u %p\n' 2>/dev/null); do
    kind=${line%% *} line=${line#* }
    uid=${line%% *} line=${line#* }
    mode=${line%% *} line=${line#* }
    name=${line%% *} line=${line#* }
    case $kind in
      l) _gpu_err "$line is a symbolic link, not a folder of the instance: the client neither" \
           "writes nor removes anything through it"; return 1 ;;
      d) ;;
      *) continue ;;
    esac
    [ "${#mode}" -ge 4 ] || mode=0$mode
    if [ "$uid" != "$EUID" ] && [ "$uid" != 0 ] && [ "$name" != "${SHARED_QUEUE_OWNER-}" ]; then
      _gpu_err "$line is owned by $name, not by you: the client writes only into folders of" \
        "your own (or root's), as the daemon trusts only those; use an instance of your own," \
        "or, if $name shares this queue with your group on purpose (--shared-queue)," \
        "SHARED_QUEUE_OWNER=$name"
      return 1
    fi
    case $mode in *[2367])
      _gpu_err "$line is writable by every user (mode $mode): the daemon refuses it, and the" \
        "client writes nothing there; chmod o-w it"
      return 1 ;;
    esac
    if [ "$line" = "$1" ]; then case $mode in *[2367]?) _gpu_gw=1 ;; esac; fi
  done
}

_gpu_existing_instance() {  # as _gpu_instance, and the folder must exist
  _gpu_instance || return
  [ -d "$_gpu_q" ] && return 0
  _gpu_err "no instance $JOB_ID under $_gpu_r (gpu_list shows them)"
  return 1
}

_gpu_is_instance() {  # _gpu_is_instance DIR: does DIR look like an instance folder?
  [ -f "$1/control.json" ] || [ -f "$1/job_id.txt" ] || [ -d "$1/pending" ] || [ -d "$1/nodes" ]
}

_gpu_instances() {  # the instances under the root, one a line
  local id IFS=$_gpu_nl
  for id in $(_gpu_ls "$_gpu_r"); do
    _gpu_valid_id "$id" && _gpu_is_instance "$_gpu_r/$id" && printf '%s\n' "$id"
  done
}

# Daemons ###########################################################################################

_gpu_node_files() {  # _gpu_node_list's files on stdout
  local _gpu_states
  _gpu_node_list
  printf '%s' "$_gpu_states"
}

_gpu_node_list() {  # the node state files of the instance, by rank (node-2 before node-10), one
  # a line, into _gpu_states
  local name rank found='' IFS=$_gpu_nl
  _gpu_list_names "$_gpu_q/nodes"
  for name in $_gpu_v; do
    case $name in node-*.state) ;; *) continue ;; esac
    rank=${name#node-}; rank=${rank%.state}
    case $rank in '' | *[!0-9]* | ??????????*) continue ;; esac
    found=$found$rank' '$name$_gpu_nl
  done
  case $found in
    *"$_gpu_nl"?*)  # more than one: sorted by rank
      _gpu_states=$(printf '%s' "$found" | command sort -n | command head -n 1024 \
        | command sed 's/^[0-9]* //') ;;
    *) _gpu_states=${found#* } ;;
  esac
}

_gpu_own_host() {  # on a loaded node state: does that daemon run on this host, boot, PID space?
  local mine=''
  _gpu_field host; [ "$_gpu_val" = "${HOSTNAME:-${HOST:-$(command uname -n)}}" ] || return 1
  _gpu_field boot_id; [ -n "$_gpu_val" ] || return 1
  { IFS= read -r mine < /proc/sys/kernel/random/boot_id; } 2>/dev/null
  [ "$_gpu_val" = "$mine" ] || return 1
  _gpu_field pid_ns; [ -n "$_gpu_val" ] || return 1
  [ "$_gpu_val" = "$(command readlink /proc/self/ns/pid 2>/dev/null)" ]
}

_gpu_liveness_times() {  # on a loaded node state: the heartbeat ages (whole seconds) after
  # which its daemon is not responding (_gpu_late) and dead (_gpu_stale), as the daemon publishes
  # them (docs/protocol.md); 15 and 60 for a state without them or with values not sane
  local late
  _gpu_late=15 _gpu_stale=60
  _gpu_field liveness.late_after; _gpu_seconds "$_gpu_val" || return 0
  late=$_gpu_i
  _gpu_field liveness.stale_after; _gpu_seconds "$_gpu_val" || return 0
  [ "$_gpu_i" -gt "$late" ] || return 0
  _gpu_late=$late _gpu_stale=$_gpu_i
}

_gpu_seconds() {  # _gpu_seconds VALUE: a published time of 1 s to a day (digits, a decimal
  # fraction) in whole seconds into _gpu_i; 1 when VALUE is not one
  case $1 in '' | .* | *. | *.*.* | *[!0-9.]*) return 1 ;; esac
  _gpu_whole "${1%.*}" 86400 && [ "$_gpu_i" -ge 1 ]
}

_gpu_liveness() {  # on a loaded node state: _gpu_live (alive, stopping, draining, late, dead,
  # stopped; protocol: "alive" and "not responding") and, unless alive, _gpu_why and _gpu_cause
  local pid comm='' protocol args age
  _gpu_why='' _gpu_cause=''
  _gpu_liveness_times
  _gpu_field status
  if [ "$_gpu_val" = stopped ]; then _gpu_live=stopped; return; fi
  _gpu_live=$_gpu_val
  case $_gpu_live in stopping | draining) ;; *) _gpu_live=alive ;; esac
  _gpu_field heartbeat
  if ! _gpu_int "$_gpu_val"; then
    _gpu_live=dead _gpu_why='no heartbeat' _gpu_cause='its state file is damaged'
    return
  fi
  if _gpu_own_host; then  # the daemon of this very host: its process says more than its file
    _gpu_field pid; pid=$_gpu_val
    _gpu_field protocol; protocol=$_gpu_val
    if _gpu_whole "$pid" 99999999 && [ -d "/proc/$_gpu_i" ]; then
      { IFS= read -r comm < "/proc/$_gpu_i/comm"; } 2>/dev/null
      case $protocol in
        [2-9] | [1-9][0-9]*) ;;
        *)  # a daemon before protocol 2 does not name its process: its command line says it
          args=$(command tr '\0' ' ' < "/proc/$_gpu_i/cmdline" 2>/dev/null)
          case $args in *perpetual_motion* | *perpetual-motion*) comm=pm-daemon ;; esac ;;
      esac
      if [ "$comm" != pm-daemon ]; then
        _gpu_live=dead _gpu_why="pid $pid is now another program ($comm)"
        _gpu_cause='the daemon died and its pid was reused'
        return
      fi
      _gpu_proc "$_gpu_i"
      _gpu_field started; _gpu_int "$_gpu_val"
      if [ -n "$_gpu_pstart" ] && [ "$_gpu_pstart" -gt $((_gpu_i + 10)) ]; then
        _gpu_live=dead _gpu_why="pid $pid is now a daemon that started later"
        _gpu_cause='the daemon died and its pid was reused (by a daemon of another instance?)'
        return
      fi
      _gpu_pulse
      if [ "$_gpu_t" -gt $((_gpu_i + _gpu_late)) ]; then  # its process runs: never dead, late
        _gpu_dur $((_gpu_t - _gpu_i))
        _gpu_live=late
        case $_gpu_pstate in
          T | t)
            _gpu_why="stopped, no heartbeat for $_gpu_d"
            _gpu_cause="SIGSTOP or Ctrl-Z: kill -CONT $pid resumes it (kill -9 $pid ends it)" ;;
          *)
            _gpu_why="runs, but no heartbeat for $_gpu_d"
            _gpu_cause="hung (on the shared storage?): kill -9 $pid ends it; then start it again" ;;
        esac
        return
      fi
    else
      _gpu_live=dead _gpu_why="its process (pid $pid) is gone"
      _gpu_cause='it was killed (kill -9, the OOM killer) or crashed; see its daemon.log'
      return
    fi
  fi
  _gpu_pulse
  [ "$_gpu_t" -gt "$_gpu_i" ] || return 0  # a heartbeat from the future: clocks differ
  age=$((_gpu_t - _gpu_i))
  _gpu_dur "$age"
  if [ "$age" -ge "$_gpu_stale" ]; then
    _gpu_live=dead _gpu_why="no heartbeat for $_gpu_d"
    _gpu_cause='the daemon or its node died, or its cluster job ended'
  elif [ "$age" -gt "$_gpu_late" ]; then
    _gpu_live=late _gpu_why="its heartbeat is $_gpu_d old"
    _gpu_cause='the daemon is stopped or hung, the shared storage stalls, or its node died'
  fi
}

_gpu_pulse() {  # the loaded node state's last sign of life into _gpu_i: its heartbeat, or the
  # time in its beat file when that is later (a full disk stops the state file, not the beat)
  local line rank beat='' heartbeat file IFS=$_gpu_nl
  _gpu_field heartbeat; _gpu_int "$_gpu_val"; heartbeat=$_gpu_i
  _gpu_field node_rank; rank=$_gpu_val
  case $rank in '' | *[!0-9]*) ;; *)
    # its BEAT_BYTES (128), as the daemon writes it: never through a link, never a FIFO
    file=$_gpu_q/nodes/node-$rank.beat
    if [ ! -L "$file" ] && _gpu_head "$file" 128; then
      for line in $_gpu_text; do
        case $line in time=*) beat=${line#time=} ;; esac
      done
    fi ;;
  esac
  if _gpu_int "$beat" && [ "$_gpu_i" -gt "$heartbeat" ]; then return 0; fi
  _gpu_i=$heartbeat
}

_gpu_proc() {  # _gpu_proc PID: its state letter into _gpu_pstate and when it started (epoch
  # seconds) into _gpu_pstart; both empty when unknown
  local stat key value btime='' tck IFS=' '
  _gpu_pstate='' _gpu_pstart=''
  { IFS= read -r stat < "/proc/$1/stat"; } 2>/dev/null || return 0
  # shellcheck disable=SC2086  # the fields after the name, split on spaces
  set -- ${stat##*) }
  [ "$#" -ge 20 ] || return 0
  _gpu_pstate=$1
  {
    while read -r key value; do
      if [ "$key" = btime ]; then btime=$value; break; fi
    done < /proc/stat
  } 2>/dev/null
  tck=$(command getconf CLK_TCK 2>/dev/null) || tck=100
  case $btime$tck${20} in *[!0-9]*) return 0 ;; esac
  [ -n "$btime" ] || return 0
  _gpu_pstart=$((btime + ${20} / tck))
}

_gpu_daemon_state() {  # node 0's liveness (it claims tasks and takes commands) into _gpu_live
  _gpu_now
  if ! _gpu_load "$_gpu_q/nodes/node-0.state"; then _gpu_live=none; return 1; fi
  _gpu_liveness
}

_gpu_daemon_alive() {  # is node 0 alive or at least not known to be dead?
  _gpu_daemon_state || return 1
  case $_gpu_live in dead | stopped) return 1 ;; esac
}

_gpu_nodes() {  # "alive/known" nodes of the instance into _gpu_val (- when none has started)
  local node alive=0 known=0 expected=0 IFS=$_gpu_nl
  for node in $(_gpu_node_files); do
    _gpu_load "$_gpu_q/nodes/$node" || continue
    known=$((known + 1))
    _gpu_field num_nodes; _gpu_bounded "$_gpu_val"
    [ "$_gpu_i" -gt "$expected" ] && expected=$_gpu_i
    _gpu_liveness
    case $_gpu_live in dead | stopped) ;; *) alive=$((alive + 1)) ;; esac
  done
  [ "$expected" -gt "$known" ] && known=$expected  # nodes that have not written a state yet
  if [ "$known" -eq 0 ]; then _gpu_val=-; else _gpu_val=$alive/$known; fi
}

_gpu_inventory() {  # the largest gpu_count and num_nodes of the nodes (empty: not known yet)
  local node IFS=$_gpu_nl
  _gpu_max_gpus='' _gpu_max_nodes=''
  for node in $(_gpu_node_files); do
    _gpu_load "$_gpu_q/nodes/$node" || continue
    if _gpu_field gpu_count && _gpu_whole "$_gpu_val" 999999999; then
      _gpu_bounded "$_gpu_i"
      [ "$_gpu_i" -ge "${_gpu_max_gpus:-0}" ] && _gpu_max_gpus=$_gpu_i
    fi
    if _gpu_field num_nodes && _gpu_whole "$_gpu_val" 999999999; then
      _gpu_bounded "$_gpu_i"
      [ "$_gpu_i" -ge "${_gpu_max_nodes:-0}" ] && _gpu_max_nodes=$_gpu_i
    fi
  done
  if [ -z "$_gpu_max_nodes" ] && _gpu_load "$_gpu_q/job_id.txt" && _gpu_field nodes \
    && _gpu_whole "$_gpu_val" 1024 && [ "$_gpu_i" -gt 0 ]; then
    _gpu_max_nodes=$_gpu_i
  fi
  return 0
}

# Writing ###########################################################################################

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
  _gpu_created=''
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
  \"protocol\": 2,
  \"job_id\": \"$JOB_ID\"
}
" && command mv -n -- "$_gpu_q/.staging/.$_gpu_u.json" "$_gpu_q/control.json"
  command rm -f -- "$_gpu_q/.staging/.$_gpu_u.json"
}

_gpu_unprepare() {  # after a first task that could not be queued: remove the instance folder
  # _gpu_prepare created, as far as it is empty (a daemon that started there meanwhile keeps it)
  [ -n "$_gpu_created" ] || return 0
  command rmdir -- "$_gpu_q/.staging" "$_gpu_q/pending" "$_gpu_q/records" "$_gpu_q" 2>/dev/null
  return 0
}

# Options ###########################################################################################
# Each command's arguments, what it does, and its options, one a line: SHORT|LONG|ARG|VAR|HELP
# (SHORT may be empty, ARG is empty for a flag, VAR ends in + when the option may be repeated).
# The one parser, the help and the completion all read them from here.

_gpu_spec() {  # _gpu_spec COMMAND: _gpu_sp_use, _gpu_sp_what, _gpu_sp_opts and _gpu_sp_more
  # what a task asks for (gpu_retry may ask again), then how it is ordered and named
  local request="-p|--priority|PRIO|prio|run order: 0 to 999, smaller first (default 500)
-g|--gpus|N|gpus|GPUs on each node: 0 (CPU only) to the node's count, or all (default)
-n|--nodes|N|nodes|nodes to run on at once, one rank each: 1 (default) to all of them
-t|--time|LIMIT|time|stop it after LIMIT of running (state timeout): 90s, 30m, 2h, 1:30:00
-e|--env|NAME=VALUE|env+|set NAME in the task's environment (repeatable)"
  local placing="|--after|NAME|after+|start after NAME ended with exit 0 (repeatable); if it did \
not, cancel
|--name|NAME|name|the name gpu_status shows (default: the script's)"
  local json='|--json||json|one JSON document (schema: docs/protocol.md, "The client'"'"'s JSON")'
  _gpu_sp_opts='' _gpu_sp_more=''
  case $1 in
    use) _gpu_sp_use='[--new] [ID]'
      _gpu_sp_what='show the instance in use, or switch to ID'
      _gpu_sp_opts='|--new||new|switch to an instance that does not exist yet'
      _gpu_sp_more="\
An instance is one daemon and its queue, <QUEUE_ROOT>/<ID>/. gpu_use ID of an instance that does
not exist lists the ones that do; gpu_use --new ID switches to a new one (the first gpu_submit
creates its folder; the daemon runs its tasks when it starts)." ;;
    list) _gpu_sp_use='[--json]'
      _gpu_sp_what='the instances: daemon, nodes, uptime, queue sizes'
      _gpu_sp_opts=$json ;;
    submit) _gpu_sp_use='[OPTIONS] FILE [PRIORITY] [-- ARGS...]'
      _gpu_sp_what='queue a copy of FILE, to run with ARGS where you are'
      _gpu_sp_opts="$request
$placing"
      _gpu_sp_more="\
*.sh runs with bash, *.py with the daemon's Python, any other file must be executable. PRIORITY
after FILE is -p. The copy runs, in the directory you submit from: editing FILE later changes
nothing. gpu_submit \$QUEUE_ROOT/\$JOB_ID/failed/<id> runs a finished task again where it was
first submitted (gpu_retry NAME does the same by name)." ;;
    run) _gpu_sp_use="[OPTIONS] [--] 'CMD'"
      _gpu_sp_what='queue a shell command, to run where you are'
      _gpu_sp_opts="$request
$placing"
      _gpu_sp_more="\
Options come first: the first word that is not an option starts the command (after --, even one
that starts with -). The words are joined with spaces into one line that bash reads (as pueue add
does): quote a word that holds a space twice, gpu_run \"python a.py --tag 'my run'\". The task is
named run_<words>.sh." ;;
    status) _gpu_sp_use='[-l] [-r N] [-w] [--json]'
      _gpu_sp_what='daemons, GPUs, running, pending and recent tasks'
      _gpu_sp_opts="-l|--long||long|full task ids and whole commands (lines wider than 100)
-r|--recent|N|recent|how many finished tasks to list (default 10)
-w|--watch||watch|show it again every 2 s on a cleared screen, until Ctrl-C
$json"
      _gpu_sp_more="\
Tasks are shown by name (--name, else the script's), with :<hex> from their id when two share
one: any command takes that form as NAME." ;;
    show) _gpu_sp_use='NAME'
      _gpu_sp_what='one task: command, directory, request, placement, exit' ;;
    logs) _gpu_sp_use='[-n N] [--rank R] [-a] [PATTERN]'
      _gpu_sp_what="list the logs, newest first; or print PATTERN's newest"
      _gpu_sp_opts="-n|--lines|N|lines|print only the last N lines
|--rank|R|rank|the log of rank R of a task that spans nodes (default 0)
-a|--all||all|list every log, not only the newest 20"
      _gpu_sp_more="\
PATTERN is a task NAME, else any part of a task id (gpu_logs run_echo). When it stands for
several tasks, the log written last is printed, and stderr says whose." ;;
    tail) _gpu_sp_use='[-n N] [--rank R] [NAME]'
      _gpu_sp_what="follow a task's log until it ends; return its exit code"
      _gpu_sp_opts="-n|--lines|N|lines|start with the last N lines (default 40)
|--rank|R|rank|the log of rank R of a task that spans nodes (default 0)"
      _gpu_sp_more="\
Without NAME: the running task whose log moved last, else the newest log. A NAME of several
tasks: the newest running one, else the pending one that starts first, else the log written last
(stderr says which). A pending task is waited for. Ctrl-C stops following, as does the end of
the shell; the task goes on." ;;
    wait) _gpu_sp_use='[--timeout S] NAME...'
      _gpu_sp_what='wait until tasks end; 0 when all are done'
      _gpu_sp_opts='|--timeout|S|timeout|give up after S seconds (return code 124)'
      _gpu_sp_more="\
NAME stands for every pending and running task it names, else for its newest finished one. The
return code is 0 when every task is done, else the exit code of the first task (in the order
given) that did not succeed, 1 when it had none (stopped, cancelled, interrupted)." ;;
    retry) _gpu_sp_use='[OPTIONS] NAME...|--failed'
      _gpu_sp_what='queue finished tasks again: command, directory, request'
      _gpu_sp_opts="$request
|--failed||failed|every failed or interrupted task that was not queued again yet"
      _gpu_sp_more="\
NAME stands for its newest finished task; each NAME is checked before anything is queued. A retry
keeps the task's own priority, GPUs, nodes, time limit and variables (not the defaults above);
options change them, -t none drops the time limit. --failed leaves out the tasks that were
stopped or cancelled, and those retried before." ;;
    hold) _gpu_sp_use='NAME...'
      _gpu_sp_what='keep pending tasks from starting until gpu_release'
      _gpu_sp_more="\
NAME holds every pending task it names; each NAME is checked first. A held task stays in pending/,
keeps its place and its dependants wait for it; gpu_status shows it as held. A task that starts
while it is being held is named, and is not held." ;;
    release) _gpu_sp_use='NAME...'
      _gpu_sp_what='let held tasks start again'
      _gpu_sp_more="\
NAME releases every held pending task it names; each NAME is checked first." ;;
    priority) _gpu_sp_use='NAME PRIORITY|top'
      _gpu_sp_what='change the priority of pending tasks; top: put them first'
      _gpu_sp_more="\
PRIORITY is 0-999, smaller runs first (gpu_submit -p); top puts the tasks NAME names before every
other pending task (the last one put on top runs first). Their ids stay the same, so --after and
every name still find them." ;;
    stop) _gpu_sp_use='NAME...|all'
      _gpu_sp_what='stop tasks, or cancel them if pending; all: every task'
      _gpu_sp_more="\
NAME stops every pending or running task it names. With several NAMEs, each is checked first:
one that names no pending or running task stops nothing. After a stop the daemon also ends the other
Python processes of its user on the node, so the GPUs are freed (its --kill-scope, which
gpu_status shows)." ;;
    clean) _gpu_sp_use='[--older-than DAYS] [--keep N] [--dry-run]'
      _gpu_sp_what="delete finished tasks' scripts, records and logs"
      _gpu_sp_opts="|--older-than|DAYS|older|only tasks that ended more than DAYS ago
|--keep|N|keep|keep the newest N finished tasks
|--dry-run||dry|print what would be removed, remove nothing"
      _gpu_sp_more="\
Pending and running tasks are never touched. Without options every finished task goes." ;;
    drain) _gpu_sp_use='[--node RANK]... [REASON]'
      _gpu_sp_what='start nothing new until gpu_resume; running tasks go on'
      _gpu_sp_opts='|--node|RANK|node+|drain only node RANK (as gpu_status numbers them)'
      _gpu_sp_more="\
Every node of the instance (with --node, only that node) stops starting tasks: running ones end as
they would, keep-alive goes on holding the idle GPUs, and tasks can still be queued; a drained
node gets no rank of a task that spans nodes. No daemon needs to run for it." ;;
    resume) _gpu_sp_use='[--node RANK]...'
      _gpu_sp_what='start tasks again after gpu_drain'
      _gpu_sp_opts='|--node|RANK|node+|resume node RANK after gpu_drain --node RANK' ;;
    shutdown) _gpu_sp_use=''
      _gpu_sp_what='ask the daemon to exit; how to delete its cluster job' ;;
    help) _gpu_sp_use='[COMMAND]'
      _gpu_sp_what='this help, or the help of COMMAND' ;;
    *) _gpu_sp_use='' _gpu_sp_what=''; return 1 ;;
  esac
}

_gpu_parse() {  # _gpu_parse MODE ARGS...: the current command's options into _gpu_o_<VAR>, the
  # other arguments into the array _gpu_args and, after --, into _gpu_rest (MODE split) or
  # _gpu_args (any); MODE first stops at the first argument that is not an option (gpu_run).
  # Returns 1 with _gpu_rc 0 after --help, 2 after an error (said).
  local mode=$1 arg opt val has line found short long name var IFS=$_gpu_nl
  shift
  _gpu_args=()
  _gpu_rest=()
  _gpu_rc=2
  _gpu_spec "$_gpu_cmd"
  for line in $_gpu_sp_opts; do
    var=${line#*|*|*|}; var=${var%%|*}
    eval "_gpu_o_${var%+}="
  done
  while [ "$#" -gt 0 ]; do
    arg=$1
    shift
    case $arg in
      --)
        if [ "$mode" = split ]; then _gpu_rest=("$@"); else _gpu_args+=("$@"); fi
        break ;;
      -h | --help) _gpu_help_of "$_gpu_cmd"; _gpu_rc=0; return 1 ;;
      --?*=*) opt=${arg%%=*} val=${arg#*=} has=1 ;;
      --?*) opt=$arg val='' has='' ;;
      -?*) opt=${arg%"${arg#??}"} val=${arg#??} has=${arg#??} ;;
      *)
        _gpu_args+=("$arg")
        if [ "$mode" = first ]; then _gpu_args+=("$@"); break; fi
        continue ;;
    esac
    found=''
    for line in $_gpu_sp_opts; do
      short=${line%%|*} long=${line#*|}; long=${long%%|*}
      if [ "$opt" = "$long" ] || { [ -n "$short" ] && [ "$opt" = "$short" ]; }; then
        found=$line; break
      fi
    done
    if [ -z "$found" ]; then
      if [ "$_gpu_cmd" = submit ] && [ "${#_gpu_args[@]}" -gt 0 ] && [ "${opt#--}" != "$opt" ]
      then  # meant for the script
        _gpu_shquote "${_gpu_args[0]}"
        _gpu_err "unknown option $opt: arguments for the script go after --, as in" \
          "gpu_submit $_gpu_w -- $opt ..."
      else
        _gpu_err "unknown option $opt (gpu_$_gpu_cmd --help lists the options)"
      fi
      return 1
    fi
    name=${found#*|*|}; name=${name%%|*}
    var=${found#*|*|*|}; var=${var%%|*}
    # shellcheck disable=SC2034  # val is read by the evals below
    if [ -z "$name" ]; then
      if [ -n "$has" ]; then _gpu_err "option $opt takes no value: '$arg'"; return 1; fi
      val=1
    elif [ -z "$has" ]; then
      if [ "$#" -eq 0 ]; then _gpu_err "option $opt needs a value ($name)"; return 1; fi
      val=$1
      shift
    fi
    if [ -z "$val" ]; then _gpu_err "option $opt needs a value ($name)"; return 1; fi
    case $var in
      *+)
        case $val in
          *"$_gpu_nl"*) _gpu_err "option $opt: a value with a newline cannot be recorded"
            return 1 ;;
        esac
        var=${var%+}; eval "_gpu_o_$var=\${_gpu_o_$var}\${_gpu_o_$var:+\$_gpu_nl}\$val" ;;
      *) eval "_gpu_o_$var=\$val" ;;
    esac
  done
  _gpu_rc=0
}

_gpu_help_of() {  # _gpu_help_of COMMAND: the full help of one command
  local line short long name help
  _gpu_spec "$1" || return 1
  printf 'usage: gpu_%s%s\n  %s\n\n' "$1" "${_gpu_sp_use:+ $_gpu_sp_use}" "$_gpu_sp_what"
  printf 'options:\n'
  while IFS= read -r line; do
    [ -n "$line" ] || continue
    short=${line%%|*} long=${line#*|}; long=${long%%|*}
    name=${line#*|*|}; name=${name%%|*}
    help=${line##*|}
    printf '  %-22s %s\n' "${short:+$short, }$long${name:+ $name}" "$help"
  done <<EOF
$_gpu_sp_opts
-h|--help|||this help
EOF
  [ -z "$_gpu_sp_more" ] || printf '\n%s\n' "$_gpu_sp_more"
}

# Tasks #############################################################################################

_gpu_check_name() {  # _gpu_check_name NAME: a task name cannot hold / or a newline, and is a
  # file name (at most 255 bytes, and its records' names too)
  case $1 in
    ''|*/*|*"$_gpu_nl"*|.*) _gpu_err "no such task: $1"; return 1 ;;
  esac
  [ "${#1}" -le 240 ] && return 0
  _gpu_err "a task name has at most 240 bytes (a file name, with .submit, has at most 255): $1"
  return 2
}

_gpu_split_name() {  # _gpu_split_name NAME: train.sh:3f9a into _gpu_base (train.sh), _gpu_hex
  _gpu_base=$1 _gpu_hex=''
  case $1 in
    ?*:[0-9a-f]*)
      _gpu_hex=${1##*:}
      case $_gpu_hex in *[!0-9a-f]* | ?????????*) _gpu_hex= ;; *) _gpu_base=${1%:*} ;; esac ;;
  esac
}

_gpu_hex_ok() {  # _gpu_hex_ok ID: does ID's random part start with _gpu_hex (or is there none)?
  [ -z "$_gpu_hex" ] && return 0
  _gpu_rand "$1" && [ "${_gpu_s#"$_gpu_hex"}" != "$_gpu_s" ]
}

_gpu_matches() {  # _gpu_matches ID: does the split NAME (_gpu_base, _gpu_hex) name task ID?
  _gpu_short "$1"
  { [ "$_gpu_s" = "$_gpu_base" ] || [ "${_gpu_s%.*}" = "$_gpu_base" ]; } && _gpu_hex_ok "$1"
}

_gpu_display_ids() {  # the ids whose submit record has display_name=_gpu_base, one a line
  local file id  # (not "path": zsh ties that name to PATH)
  [ -n "$_gpu_base" ] && [ -d "$_gpu_q/records" ] || return 0
  command grep -rlxF --include='*.submit' -e "display_name=$_gpu_base" -- "$_gpu_q/records" \
    2>/dev/null | while IFS= read -r file; do
    id=${file##*/}
    id=${id%.submit}
    _gpu_hex_ok "$id" && printf '%s\n' "$id"
  done
}

_gpu_find() {  # _gpu_find NAME DIR...: "DIR/ID" lines of the tasks NAME names into _gpu_val
  local name=$1 dir id='' IFS=$_gpu_nl
  shift
  _gpu_val=''
  _gpu_split_name "$name"
  for dir in "$@"; do case $dir in 'done' | failed) id=1 ;; esac; done
  # pending/ and running/ are short: listed; done/ and failed/ through names/ while it holds
  if [ -z "$id" ] || { _gpu_key_ok "$_gpu_base" && _gpu_cache; }; then
    _gpu_find_indexed "$name" "$@"; return
  fi
  for dir in "$@"; do
    _gpu_list_names "$_gpu_q/$dir"
    _gpu_holding "$_gpu_v" "$_gpu_base"
    for id in $_gpu_v; do
      if [ "$id" = "$name" ] || _gpu_matches "$id"; then _gpu_val=$_gpu_val$dir/$id$_gpu_nl; fi
    done
  done
  [ -n "$_gpu_val" ] && return 0
  for id in $(_gpu_display_ids); do  # a name given with --name
    for dir in "$@"; do
      [ -e "$_gpu_q/$dir/$id" ] && _gpu_val=$_gpu_val$dir/$id$_gpu_nl
    done
  done
  [ -n "$_gpu_val" ]
}

_gpu_find_indexed() {  # _gpu_find_indexed NAME DIR...: _gpu_find, the finished tasks looked up
  # in names/ (only while the summary holds), the others listed
  local name=$1 dir id line dirs=' ' listed='' small='' display='' IFS=$_gpu_nl
  local -a records
  shift
  _gpu_val=''
  for dir in "$@"; do
    case $dir in
      'done' | failed)
        dirs="$dirs$dir "
        [ -e "$_gpu_q/$dir/$name" ] && _gpu_val=$_gpu_val$dir/$name$_gpu_nl ;;
      *)
        _gpu_list_names "$_gpu_q/$dir"
        listed=$listed$dir$_gpu_nl small=$small$_gpu_v
        _gpu_holding "$_gpu_v" "$_gpu_base"
        for id in $_gpu_v; do
          if [ "$id" = "$name" ] || _gpu_matches "$id"; then _gpu_val=$_gpu_val$dir/$id$_gpu_nl
          fi
        done ;;
    esac
  done
  _gpu_bucket "$_gpu_base"
  if [ "$dirs" != ' ' ] && [ -f "$_gpu_q/names/$_gpu_s" ]; then
    for line in $(command grep -F -e "$_gpu_base/" -- "$_gpu_q/names/$_gpu_s" 2>/dev/null \
      | command tail -n 1000); do
      case $line in "$_gpu_base"/*) line=${line#"$_gpu_base"/} ;; *) continue ;; esac
      case $dirs in *" ${line%%/*} "*) ;; *) continue ;; esac
      id=${line#*/}
      case $id in '' | */*) continue ;; esac
      [ -e "$_gpu_q/$line" ] || continue
      case $_gpu_nl$_gpu_val in *"$_gpu_nl$line$_gpu_nl"*) continue ;; esac
      _gpu_short "$id"
      if [ "$_gpu_s" = "$_gpu_base" ] || [ "${_gpu_s%.*}" = "$_gpu_base" ]; then
        _gpu_hex_ok "$id" && _gpu_val=$_gpu_val$line$_gpu_nl
      else
        _gpu_hex_ok "$id" && display=$display$line$_gpu_nl  # its --name
      fi
    done
  fi
  [ -n "$_gpu_val" ] && return 0
  records=()  # (an array: a string grown a file at a time is copied whole each time)
  for id in $small; do  # regular files only: grep would block on a FIFO
    line=$_gpu_q/records/$id.submit
    [ -f "$line" ] && [ ! -L "$line" ] && records+=("$line")
  done
  if [ "${#records[@]}" -gt 0 ]; then  # a --name of a pending or running task
    # shellcheck disable=SC2013  # one file a line (the dispatcher turned globbing off)
    for id in $(printf '%s\0' "${records[@]}" \
      | command xargs -0 grep -lxF -e "display_name=$_gpu_base" -- 2>/dev/null); do
      id=${id##*/}; id=${id%.submit}
      _gpu_hex_ok "$id" || continue
      for dir in $listed; do
        [ -e "$_gpu_q/$dir/$id" ] && display=$display$dir/$id$_gpu_nl
      done
    done
  fi
  _gpu_val=$display
  [ -n "$_gpu_val" ]
}

_gpu_newest() {  # _gpu_newest LINES: of "DIR/ID" lines, the task submitted last, into _gpu_pick
  local line id IFS=$_gpu_nl
  _gpu_pick=$(for line in $1; do
    id=${line#*/}
    if _gpu_is_id "$id"; then printf '%s %s\n' "${id#???-}" "$line"; else printf '~ %s\n' "$line"
    fi
  done | command sort | command tail -n 1)
  _gpu_pick=${_gpu_pick#* }
}

_gpu_down_nodes() {  # the ranks of the nodes whose daemon is dead or stopped into _gpu_down
  # (" 0 3 "): their running tasks are orphaned
  local node IFS=$_gpu_nl
  _gpu_down=' '
  for node in ${_gpu_states-$(_gpu_node_files)}; do
    _gpu_load "$_gpu_q/nodes/$node" || continue
    node=${node#node-}; node=${node%.state}
    _gpu_liveness
    case $_gpu_live in dead | stopped) _gpu_down="$_gpu_down$node " ;; esac
  done
}

_gpu_task() {  # _gpu_task DIR ID: what is known of the task ID in DIR into _gpu_t_*, as
  # _gpu_preload reads it
  local key=$_gpu_fs$1/$2
  local -A _gpu_pre
  local _gpu_pre_on='' _gpu_pre_want='' _gpu_pre_json=''
  _gpu_preload "$key"
  if [ -n "$_gpu_pre_on" ] && [ -n "${_gpu_pre[$key]+set}" ]; then
    eval "${_gpu_pre[$key]}"  # every _gpu_t_*
  else  # awk failed: what its id says
    _gpu_t_state=$1 _gpu_t_prio='' _gpu_t_display='' _gpu_t_source='' _gpu_t_command=''
    _gpu_t_cwd='' _gpu_t_gpus_req=all _gpu_t_nodes_req=1 _gpu_t_after='' _gpu_t_args=''
    _gpu_t_retry_of='' _gpu_t_submitted='' _gpu_t_by='' _gpu_t_record='' _gpu_t_time_req=''
    _gpu_t_env='' _gpu_t_node='' _gpu_t_host='' _gpu_t_gpus='' _gpu_t_started=''
    _gpu_t_ended='' _gpu_t_duration='' _gpu_t_found='' _gpu_t_exit='' _gpu_t_signal=''
    _gpu_t_reason='' _gpu_t_attempt=''
  fi
}

_gpu_exit_of() {  # _gpu_exit_of ID: the return code of gpu_wait and gpu_tail for the ended task
  # (0 done; its exit code; 1 when it had none) into _gpu_rcode; 1 when it has no result yet
  _gpu_rcode=1
  _gpu_load "$_gpu_q/records/$1.result" || return 1
  _gpu_field state
  if [ "$_gpu_val" = 'done' ]; then _gpu_rcode=0; return 0; fi
  _gpu_field exit_code
  _gpu_whole "$_gpu_val" 255 && [ "$_gpu_i" -gt 0 ] && _gpu_rcode=$_gpu_i
  return 0
}

_gpu_renamed() {  # _gpu_renamed ID: will the daemon claim pending/ID under a fresh id? (a name
  # put there by hand, or a finished task renamed back: protocol "Task ids and run order")
  ! _gpu_is_id "$1" || [ -e "$_gpu_q/records/$1.result" ]
}

_gpu_fresh_name() {  # _gpu_fresh_name NAME: the name part of the fresh id NAME gets (_gpu_s)
  _gpu_short "$1"
  _gpu_safe_name "$_gpu_s"
  [ "${#_gpu_s}" -gt 80 ] && _gpu_s=${_gpu_s:$((${#_gpu_s} - 80))}
  _gpu_s=${_gpu_s:-task}
}

_gpu_siblings() {  # _gpu_siblings NAME: ids of that short name in running, failed and done
  local dir id IFS=$_gpu_nl
  for dir in running failed 'done'; do
    for id in $(_gpu_ls "$_gpu_q/$dir"); do
      _gpu_short "$id"
      [ "$_gpu_s" = "$1" ] && printf '%s/%s\n' "$dir" "$id"
    done
  done
}

_gpu_snapshot() {  # _gpu_snapshot ID: the siblings of the fresh id that ID will get
  _gpu_fresh_name "$1"
  _gpu_siblings "$_gpu_s"
}

_gpu_track() {  # _gpu_track ID: follow a pending task that gets a fresh id when it leaves
  # pending/: its siblings now into _gpu_snap; 1 (and the fresh id into _gpu_id) when it has left
  # pending/ already, so that the fresh id may be among them: the newest one is taken
  _gpu_snap=$(_gpu_snapshot "$1")$_gpu_nl
  [ -e "$_gpu_q/pending/$1" ] && return 0
  _gpu_newest "$_gpu_snap"
  _gpu_id=${_gpu_pick#*/}
  [ -n "$_gpu_id" ] || _gpu_id=$1
  return 1
}

_gpu_follow_rename() {  # _gpu_follow_rename ID SNAPSHOT: the fresh id that ID left pending/
  # under (one not in SNAPSHOT, the siblings before) into _gpu_id; 1 while there is none
  local line IFS=$_gpu_nl
  _gpu_fresh_name "$1"
  for line in $(_gpu_siblings "$_gpu_s"); do
    case $_gpu_nl$2$_gpu_nl in *"$_gpu_nl$line$_gpu_nl"*) continue ;; esac
    _gpu_id=${line#*/}
    return 0
  done
  return 1
}

# Commands: the instance ############################################################################

_gpu_cmd_help() {
  _gpu_parse any "$@" || return "$_gpu_rc"
  set -- "${_gpu_args[@]}"
  if [ "$#" -gt 1 ]; then _gpu_usage; return; fi
  local c line topic=${1#gpu_} IFS=" $_gpu_nl"
  if [ -n "$topic" ]; then
    if [ "$topic" = complete ] || ! _gpu_spec "$topic"; then
      _gpu_err "no command gpu_$topic (gpu_help lists them)"
      return 127
    fi
    _gpu_help_of "$topic"
    return 0
  fi
  printf 'Perpetual Motion client: a task queue for the GPUs of a cluster job.\n\n'
  for c in $_gpu_commands; do
    _gpu_spec "$c"
    line="gpu_$c${_gpu_sp_use:+ $_gpu_sp_use}"
    if [ "${#line}" -gt 34 ]; then
      printf '  %s\n  %-34s  %s\n' "$line" '' "$_gpu_sp_what"
    else
      printf '  %-34s  %s\n' "$line" "$_gpu_sp_what"
    fi
  done
  _gpu_root_value
  command cat <<'EOF'

NAME is a task id (500-20261129_041500_123456789-3f9a0c1d-train.sh), its name (train.sh), that
without its extension (train), or the name given with --name; when two tasks share a name,
gpu_status adds :<hex> from the id (train.sh:3f9a), and every command takes that form too.
Every command answers --help. Tasks may be queued before the daemon runs: they wait in pending/.

EOF
  _gpu_say "Settings: JOB_ID=${JOB_ID-} (the instance)"
  _gpu_say "          QUEUE_ROOT=$_gpu_r$_gpu_from"
  _gpu_say "          GPU_REPLY_TIMEOUT=${GPU_REPLY_TIMEOUT:-15} (seconds to wait for a reply)"
  command cat <<'EOF'
Return codes: 0 ok, 1 failed (no such task, no daemon, missing queue root, cannot write),
              2 bad usage (options, arguments, JOB_ID), 124 gpu_wait timed out, 127 unknown
              command; gpu_wait and gpu_tail return the exit code of the task.
EOF
}

_gpu_summary() {  # one line about the instance in _gpu_q: its daemon and queue
  local daemon
  if [ ! -d "$_gpu_q" ]; then
    _gpu_say "no folder yet under $_gpu_r (no task queued, no daemon started)"
    return
  fi
  if ! _gpu_daemon_state; then
    daemon='no daemon has started yet'
  else
    _gpu_field host; daemon="daemon $_gpu_live on ${_gpu_val:-?}"
    case $_gpu_live in
      alive | stopping | draining)
        [ "$_gpu_live" = stopping ] && daemon="daemon shutting down on $_gpu_val"
        _gpu_field pid; daemon="$daemon (pid $_gpu_val"
        _gpu_field started; _gpu_age "$_gpu_val"; daemon="$daemon, up $_gpu_d)" ;;
      late) daemon="daemon NOT RESPONDING on $_gpu_val ($_gpu_why)" ;;
      dead) daemon="daemon DEAD on $_gpu_val ($_gpu_why)" ;;
      stopped) _gpu_field stopped; daemon="daemon stopped $(_gpu_date "$_gpu_val") on $_gpu_val"
        ;;
    esac
  fi
  _gpu_count "$_gpu_q/running"; daemon="$daemon; $_gpu_n running"
  _gpu_count "$_gpu_q/pending"; daemon="$daemon, $_gpu_n pending"
  _gpu_sum=''
  if _gpu_cache; then  # the summary, while it holds: no listing of a long history
    _gpu_say "$daemon, $_gpu_sum_done done, $_gpu_sum_failed failed"
    return
  fi
  _gpu_count "$_gpu_q/done"; daemon="$daemon, $_gpu_n done"
  _gpu_count "$_gpu_q/failed"; _gpu_say "$daemon, $_gpu_n failed"
}

_gpu_cmd_use() {
  _gpu_parse any "$@" || return "$_gpu_rc"
  set -- "${_gpu_args[@]}"
  if [ "$#" -gt 1 ]; then _gpu_usage; return; fi
  local list
  if [ "$#" -eq 1 ]; then
    _gpu_valid_id "$1" || { _gpu_bad_id "$1"; return 2; }
    if ! _gpu_root; then
      [ -n "$_gpu_o_new" ] || return 1
      _gpu_err "switched to $1 all the same (--new)"
      return 0
    fi
    _gpu_q=$_gpu_r/$1
    if [ -z "$_gpu_o_new" ] && ! { [ -d "$_gpu_q" ] && _gpu_is_instance "$_gpu_q"; }; then
      list=$(_gpu_instances | command head -n 20 | command paste -sd' ' -)
      if [ -n "$list" ]; then list="the instances there: $list"; else list='there is none yet'; fi
      _gpu_err "no instance $1 under $_gpu_r; $list; gpu_use --new $1 switches to a new one"
      return 1
    fi
    JOB_ID=$1
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
  _gpu_parse any "$@" || return "$_gpu_rc"
  if [ "${#_gpu_args[@]}" -gt 0 ]; then _gpu_usage; return; fi
  _gpu_root || return 1
  local id ids width=6 IFS=$_gpu_nl mark daemon nodes host up left run pend ndone failed job
  local line sep=''
  ids=$(_gpu_instances)
  _gpu_now
  if [ -n "$_gpu_o_json" ]; then
    _gpu_js "$_gpu_r"; printf '{"schema": 1, "queue_root": %s, "instances": [' "$_gpu_j"
  elif [ -z "$ids" ]; then
    _gpu_say "No instances under $_gpu_r (gpu_submit creates one; so does the daemon)."
    return 0
  fi
  for id in $ids; do [ "${#id}" -gt "$width" ] && width=${#id}; done
  [ "$width" -gt 18 ] && width=18
  [ -n "$_gpu_o_json" ] || printf '  %-*s  %-8s %-5s  %-10s %6s %6s  %4s %5s %5s %5s  %s\n' \
    "$width" JOB_ID DAEMON NODES HOST UP LEFT RUN PEND DONE FAIL 'CLUSTER JOB'
  for id in $ids; do
    _gpu_q=$_gpu_r/$id
    mark=' '; [ "$id" = "${JOB_ID-}" ] && mark='*'
    host='' up='' left='' daemon=none
    if _gpu_load "$_gpu_q/nodes/node-0.state"; then
      _gpu_liveness; daemon=$_gpu_live
      _gpu_field host; host=$_gpu_val
      case $daemon in
        alive | stopping | draining | late)
          _gpu_field started; _gpu_age "$_gpu_val"; up=$_gpu_d
          _gpu_field shutdown
          if _gpu_int "$_gpu_val" && [ "$_gpu_i" -gt "$_gpu_t" ]; then
            _gpu_dur "$((_gpu_i - _gpu_t))"; left=$_gpu_d
          fi ;;
      esac
    fi
    _gpu_nodes; nodes=$_gpu_val
    _gpu_count "$_gpu_q/running"; run=$_gpu_n
    _gpu_count "$_gpu_q/pending"; pend=$_gpu_n
    _gpu_sum=''  # this instance's summary, while it holds: no listing of a long history
    if _gpu_cache; then
      ndone=$_gpu_sum_done failed=$_gpu_sum_failed
    else
      _gpu_count "$_gpu_q/done"; ndone=$_gpu_n
      _gpu_count "$_gpu_q/failed"; failed=$_gpu_n
    fi
    job=''
    _gpu_load "$_gpu_q/job_id.txt" && _gpu_field cluster_job_id && job=$_gpu_val
    if [ -n "$_gpu_o_json" ]; then
      [ "$daemon" = late ] && daemon=not_responding
      printf '%s\n  {"job_id": "%s", "in_use": %s, "daemon": "%s", ' "$sep" "$id" \
        "$([ "$mark" = '*' ] && echo true || echo false)" "$daemon"
      sep=,
      case $nodes in
        -) printf '"nodes_alive": 0, "nodes": 0, ' ;;
        *) printf '"nodes_alive": %s, "nodes": %s, ' "${nodes%/*}" "${nodes#*/}" ;;
      esac
      _gpu_js "$host"; [ -n "$host" ] || _gpu_j=null; printf '"host": %s, ' "$_gpu_j"
      printf '"counts": {"running": %s, "pending": %s, "done": %s, "failed": %s}, ' "$run" \
        "$pend" "$ndone" "$failed"
      _gpu_js "$job"; [ -n "$job" ] || _gpu_j=null; printf '"cluster_job_id": %s}' "$_gpu_j"
      continue
    fi
    # printf pads bytes: what is cut (… is 3 bytes) is padded to its columns here
    _gpu_cut_middle "$id" "$width"; [ "$_gpu_c" = "$id" ] || { _gpu_pad "$_gpu_c" "$width"
      id=$_gpu_pd; }
    host=${host:--}
    _gpu_cut "$host" 10; [ "$_gpu_c" = "$host" ] || { _gpu_pad "$_gpu_c" 10; host=$_gpu_pd; }
    line=$(printf '%s %-*s  %-8s %-5s  %-10s %6s %6s  %4s %5s %5s %5s  ' "$mark" "$width" "$id" \
      "$daemon" "$nodes" "$host" "${up:--}" "${left:--}" "$run" "$pend" "$ndone" "$failed")
    _gpu_cols "$line"; _gpu_esc "${job:--}"; _gpu_cut "$_gpu_e" "$((100 - _gpu_cw))"
    _gpu_say "$line$_gpu_c"
  done
  if [ -n "$_gpu_o_json" ]; then printf '%s]}\n' "${sep:+$_gpu_nl}"; fi
  return 0
}

# Commands: queueing ################################################################################

_gpu_priority() {  # _gpu_priority TEXT: 0-999 as three digits into _gpu_p; 2 when it is not
  case $1 in
    '' | *[!0-9]* | ????*)
      _gpu_err "PRIORITY must be a number from 0 to 999 (smaller runs first): '$1'"
      return 2 ;;
  esac
  _gpu_p=$1
  while [ "${#_gpu_p}" -lt 3 ]; do _gpu_p=0$_gpu_p; done
}

_gpu_request() {  # _gpu_request GPUS NODES TIME ENV: -g, -n and -t (else GPUS, NODES and TIME,
  # else all, 1 and none), checked (the first two against the nodes' state files), into
  # _gpu_rq_gpus, _gpu_rq_nodes and _gpu_rq_time (seconds, empty for none), and the variables of
  # ENV (NAME=VALUE lines) with those of -e set over them into _gpu_rq_env; 2 when invalid
  local gpus=${_gpu_o_gpus:-${1:-all}} nodes=${_gpu_o_nodes:-${2:-1}} time=${_gpu_o_time:-${3-}}
  local most line name IFS=$_gpu_nl
  local daemon_sets=" JOB_ID TASK_NAME TASK_SHORT_NAME QUEUE_ROOT QUEUE_DIR TASK_LOG \
CUDA_DEVICE_ORDER CUDA_VISIBLE_DEVICES PM_GPUS TASK_GPUS PM_NODE_RANK NODE_RANK NNODES MASTER_ADDR \
MASTER_PORT PERPETUAL_MOTION_TASK PERPETUAL_MOTION_CALLBACK "  # docs/protocol.md: env.<i>
  _gpu_rq_time='' _gpu_rq_env=${4-}
  most=0
  # shellcheck disable=SC2154  # _gpu_parse sets the _gpu_o_* variables
  for line in $_gpu_o_env; do most=$((most + 1)); done
  if [ "$most" -gt 4096 ]; then  # the daemon fails a record with more (MAX_TASK_ARGS)
    _gpu_err "-e: at most 4096 variables, not $most"
    return 2
  fi
  for line in $_gpu_o_env; do
    name=${line%%=*}
    case $line in
      *=*) ;;
      *) _gpu_err "-e wants NAME=VALUE, not '$line'"; return 2 ;;
    esac
    case $name in
      '' | [0-9]* | *[!A-Za-z0-9_]*)
        _gpu_err "-e: '$name' is not a variable name (letters, digits, _; not a digit first)"
        return 2 ;;
    esac
    [ "${#name}" -le 128 ] || { _gpu_err "-e: a variable name of at most 128 bytes"; return 2; }
    case $daemon_sets in
      *" $name "*) _gpu_err "-e $name: the daemon sets it for every task (GPUs: -g)"; return 2 ;;
    esac
    _gpu_rq_env=$(printf '%s\n' "$_gpu_rq_env" | command grep -v -e "^$name=" -e '^$' || :)
    _gpu_rq_env=$_gpu_rq_env${_gpu_rq_env:+$_gpu_nl}$line
  done
  most=0
  for line in $_gpu_rq_env; do most=$((most + 1)); done
  [ "$most" -le 4096 ] || { _gpu_err "-e: at most 4096 variables, not $most"; return 2; }
  case $time in
    '' | none) ;;
    *)
      if ! _gpu_duration "$time"; then
        _gpu_err "-t wants a time limit from 1s to 365d, such as 90s, 30m, 2h, 1d12h or 1:30:00" \
          "(H:M:S), or none, not '$time'"
        return 2
      fi
      _gpu_rq_time=$_gpu_i ;;
  esac
  _gpu_inventory
  if [ "$gpus" != all ]; then
    most=${_gpu_max_gpus:-1024}
    if ! _gpu_whole "$gpus" 999999999; then
      _gpu_err "-g wants a number of GPUs from 0 to $most, or all, not '$gpus'"
      return 2
    elif [ "$_gpu_i" -gt "$most" ]; then
      if [ -n "$_gpu_max_gpus" ]; then
        _gpu_err "-g $gpus: the nodes of $JOB_ID have at most $most GPUs (-g all takes every GPU" \
          "of a node, -g 0 none)"
      else
        _gpu_err "-g wants a number of GPUs from 0 to $most, or all, not '$gpus'"
      fi
      return 2
    fi
    gpus=$_gpu_i
  fi
  if [ "$nodes" != all ]; then
    most=${_gpu_max_nodes:-1024}
    if ! _gpu_whole "$nodes" 999999999 || [ "$_gpu_i" -lt 1 ]; then
      _gpu_err "-n wants a number of nodes from 1 to $most, or all, not '$nodes'"
      return 2
    elif [ "$_gpu_i" -gt "$most" ]; then
      if [ -n "$_gpu_max_nodes" ]; then
        _gpu_err "-n $nodes: $JOB_ID has $most node(s) (-n all runs on every one)"
      else
        _gpu_err "-n wants a number of nodes from 1 to $most, or all, not '$nodes'"
      fi
      return 2
    fi
    nodes=$_gpu_i
  fi
  _gpu_rq_gpus=$gpus _gpu_rq_nodes=$nodes
}

_gpu_duration() {  # _gpu_duration TEXT: a time limit, in seconds into _gpu_i: 90s, 30m, 2h,
  # 1d12h, 1h30m, or as Slurm writes it M:S, H:M:S, D-H, D-H:M, D-H:M:S; 1 when it is none of these
  # (a bare number too: Slurm reads minutes where others read seconds) or not 1s to 365 days. Units
  # come once each, largest first; every number but the first is below its unit's next (1h1h,
  # 1h90m and 1:99:99 are no time limits)
  local text=$1 n unit days='' total=0 count=0 h=0 m=0 sec=0 last=99999999999 first=1
  case $text in '' | *[!0-9smhd:-]*) return 1 ;; esac
  case $text in
    *[smhd]*)
      case $text in *[:-]*) return 1 ;; esac
      while [ -n "$text" ]; do
        n=${text%%[smhd]*}
        case $n in '' | *[!0-9]* | ??????????*) return 1 ;; esac
        text=${text#"$n"}
        unit=${text%"${text#?}"}; text=${text#?}
        case $unit in s) unit=1 ;; m) unit=60 ;; h) unit=3600 ;; d) unit=86400 ;; *) return 1 ;; esac
        [ "$unit" -lt "$last" ] || return 1
        _gpu_int "$n"
        [ -n "$first" ] || [ $((_gpu_i * unit)) -lt "$last" ] || return 1
        total=$((total + _gpu_i * unit)) last=$unit first=''
      done ;;
    *)
      case $text in
        *-*) days=${text%%-*}; text=${text#*-}
          case $days in '' | *[!0-9]* | ??????????*) return 1 ;; esac ;;
      esac
      while :; do  # the last three numbers into h, m and sec
        n=${text%%:*}
        case $n in '' | *[!0-9]* | ??????????*) return 1 ;; esac
        _gpu_int "$n"; h=$m m=$sec sec=$_gpu_i count=$((count + 1))
        case $text in *:*) text=${text#*:} ;; *) break ;; esac
      done
      # below 60 (hours below 24), but for the first number of M:S and H:M:S
      [ "$sec" -lt 60 ] || { [ -z "$days" ] && [ "$count" -eq 1 ]; } || return 1
      [ "$m" -lt 60 ] || [ "$count" -eq 2 ] || return 1
      if [ -n "$days" ]; then
        [ "$count" -ne 1 ] || [ "$sec" -lt 24 ] || return 1
        [ "$count" -ne 2 ] || [ "$m" -lt 24 ] || return 1
        [ "$h" -lt 24 ] || return 1
        _gpu_int "$days"; total=$((_gpu_i * 86400))
        case $count in
          1) total=$((total + sec * 3600)) ;;
          2) total=$((total + m * 3600 + sec * 60)) ;;
          3) total=$((total + h * 3600 + m * 60 + sec)) ;;
          *) return 1 ;;
        esac
      else
        case $count in
          2) total=$((m * 60 + sec)) ;;
          3) total=$((h * 3600 + m * 60 + sec)) ;;
          *) return 1 ;;
        esac
      fi ;;
  esac
  [ "$total" -ge 1 ] && [ "$total" -le 31536000 ] || return 1
  _gpu_i=$total
}

_gpu_check_display() {  # _gpu_check_display NAME: a name for --name; 2 when it cannot be one
  case $1 in
    '' | *[[:cntrl:]]* | [.-]* | */* | *:*)
      _gpu_err "--name wants a name without control characters, / or :, not starting with . or" \
        "-: '$1'"
      return 2 ;;
  esac
  [ "${#1}" -le 80 ] && return 0
  _gpu_err "--name: at most 80 bytes: '$1'"
  return 2
}

_gpu_resolve_after() {  # the tasks --after names, as ids, into _gpu_after; 1 when one is unknown
  local name line id state IFS=$_gpu_nl
  _gpu_after=''
  # shellcheck disable=SC2154  # _gpu_parse sets the _gpu_o_* variables
  for name in $_gpu_o_after; do
    case $name in
      '' | */* | *"$_gpu_nl"* | .*) _gpu_err "--after $name: no such task"; return 1 ;;
    esac
    if _gpu_find "$name" pending running; then
      for line in $_gpu_val; do
        id=${line#*/}
        if [ "${line%%/*}" = pending ] && _gpu_renamed "$id"; then
          _gpu_err "--after $name: $id gets its id only when it starts (it was put into" \
            "pending/ by hand or renamed back): name another task, or wait for it to start"
          return 1
        fi
        case " $_gpu_after " in *" $id "*) ;; *) _gpu_after=$_gpu_after${_gpu_after:+ }$id ;; esac
      done
    elif _gpu_find "$name" 'done' failed; then
      _gpu_newest "$_gpu_val"
      id=${_gpu_pick#*/}
      if ! _gpu_is_id "$id"; then
        _gpu_err "--after $name: $id has no task id (it was cancelled before it started)"
        return 1
      fi
      case " $_gpu_after " in *" $id "*) ;; *) _gpu_after=$_gpu_after${_gpu_after:+ }$id ;; esac
      _gpu_load "$_gpu_q/records/$id.result" && _gpu_field state && state=$_gpu_val
      [ "${state:-done}" = 'done' ] || _gpu_err "note: $id ended $state: the daemon cancels the" \
        "new task when it comes to it"
    else
      _gpu_err "--after $name: no such task (gpu_status lists the tasks)"
      return 1
    fi
  done
}

_gpu_request_keys() {  # _gpu_request_keys DISPLAY RETRY_OF ARGS...: the submit record's keys
  # for the checked request (_gpu_rq_*, _gpu_after) and the script's arguments into _gpu_x
  local i=0 arg IFS=$_gpu_nl
  _gpu_x="display_name=$1${_gpu_nl}gpus=$_gpu_rq_gpus${_gpu_nl}nodes=$_gpu_rq_nodes"
  _gpu_x="$_gpu_x${_gpu_nl}time_limit=$_gpu_rq_time"
  for arg in $_gpu_rq_env; do
    _gpu_x="$_gpu_x${_gpu_nl}env.$i=$arg"
    i=$((i + 1))
  done
  _gpu_x="$_gpu_x${_gpu_nl}envc=$i"
  i=0
  _gpu_x="$_gpu_x${_gpu_nl}after=$_gpu_after${_gpu_nl}argc=$(($# - 2))"
  _gpu_x="$_gpu_x${_gpu_nl}retry_of=$2"
  shift 2
  for arg in "$@"; do
    _gpu_x="$_gpu_x${_gpu_nl}arg.$i=$arg"
    i=$((i + 1))
  done
}

_gpu_record_env() {  # the variables of the loaded submit record (envc, env.<i>) as NAME=VALUE
  # lines into _gpu_env
  local i=0
  _gpu_env=''
  _gpu_field envc; _gpu_bounded "$_gpu_val"
  while [ "$i" -lt "$_gpu_i" ]; do
    _gpu_field "env.$i"
    case $_gpu_val in ?*=*) _gpu_env=$_gpu_env${_gpu_env:+$_gpu_nl}$_gpu_val ;; esac
    i=$((i + 1))
  done
}

_gpu_check_args() {  # _gpu_check_args ARGS...: a script's arguments fit in a record (protocol)
  local arg
  if [ "$#" -gt 1024 ]; then _gpu_err "at most 1024 arguments"; return 2; fi
  for arg in "$@"; do
    case $arg in
      *"$_gpu_nl"*) _gpu_err "an argument holds a newline, which a record cannot: '$arg'"
        return 2 ;;
    esac
  done
}

_gpu_dead_note() {  # after a submit: say when no daemon will pick the task up soon
  local why
  if [ -n "$_gpu_created" ]; then
    why="created the instance $JOB_ID in $_gpu_r; no daemon is running for it yet"
  elif _gpu_daemon_state; then
    case $_gpu_live in
      alive | draining) return 0 ;;
      stopping)
        _gpu_err "the daemon of $JOB_ID is shutting down: the task waits in pending/ for the next" \
          "daemon"
        return 0 ;;
      late)
        _gpu_err "the daemon of $JOB_ID is not responding ($_gpu_why; likely $_gpu_cause): the" \
          "task waits in pending/"
        return 0 ;;
      stopped) why="the daemon of $JOB_ID has stopped" ;;
      *) why="no daemon is alive for $JOB_ID ($_gpu_why)" ;;
    esac
  elif _gpu_load "$_gpu_q/job_id.txt" && _gpu_field cluster_job_id && [ -n "$_gpu_val" ]; then
    why="no daemon has started for $JOB_ID yet (its cluster job $_gpu_val may be waiting)"
  else
    why="no daemon has started for $JOB_ID yet"
  fi
  _gpu_err "$why: the task waits in pending/ until one starts"
}

_gpu_enqueue() {  # _gpu_enqueue NAME PRIORITY CWD SOURCE COMMAND FILE TEXT: publish one task
  # (a copy of FILE, else TEXT) with the keys of _gpu_x in its record
  local name=$1 prio=$2 id staged
  # a record is lines: the directory would end up in the record and in gpu_run's script
  case $3 in
    *"$_gpu_nl"*) _gpu_err "the current directory's name has a newline: cd elsewhere"; return 2 ;;
  esac
  _gpu_prepare pending records || { _gpu_unprepare; return 1; }
  _gpu_unique || { _gpu_unprepare; return 1; }
  _gpu_whoami
  id=$prio-$_gpu_u-$name
  _gpu_put "$_gpu_q/records/$id.submit" "id=$id
name=$name
priority=$prio
source=$4
command=$5
cwd=$3
$_gpu_x
submitted=$_gpu_epoch
submitted_by=$_gpu_who
" || { _gpu_unprepare; return 1; }
  staged=$_gpu_q/.staging/.$id
  if [ -n "$6" ]; then _gpu_copy "$6" "$staged"; else _gpu_write "$staged" "$7"; fi || {
    command rm -f -- "$_gpu_q/records/$id.submit"
    _gpu_failed "$staged" "cannot write the task into $_gpu_q/.staging"
    _gpu_unprepare
    return 1
  }
  _gpu_publish "$staged" "$_gpu_q/pending/$id" \
    || { command rm -f -- "$_gpu_q/records/$id.submit"; _gpu_unprepare; return 1; }
  printf 'Submitted %s\n' "$id"
  _gpu_dead_note
}

_gpu_cmd_submit() {
  _gpu_parse split "$@" || return "$_gpu_rc"
  set -- "${_gpu_args[@]}"
  if [ "$#" -lt 1 ] || [ "$#" -gt 2 ]; then _gpu_usage; return; fi
  local file=$1 source base name dir cwd=$PWD cmdline='' gpus='' nodes='' time='' env=''
  local display=$_gpu_o_name
  local retry_of='' i=0
  if [ "$#" -eq 2 ] && [ -n "$_gpu_o_prio" ]; then
    _gpu_err "two priorities: -p $_gpu_o_prio and $2"
    return 2
  fi
  _gpu_priority "${2:-${_gpu_o_prio:-500}}" || return 2
  case $file in
    '') _gpu_usage; return ;;
    *"$_gpu_nl"*) _gpu_err "a file name with a newline cannot be queued"; return 2 ;;
  esac
  if [ -d "$file" ]; then _gpu_err "$file is a directory, not a script"; return 2; fi
  if [ ! -e "$file" ]; then _gpu_err "no such file: $file"; return 2; fi
  if [ ! -f "$file" ]; then _gpu_err "$file is not a regular file"; return 2; fi
  if [ ! -r "$file" ]; then _gpu_err "cannot read $file"; return 2; fi
  _gpu_short "${file##*/}"  # a resubmitted task (gpu_submit failed/<id>) keeps its name
  base=$_gpu_s
  _gpu_safe_name "$base"
  name=$_gpu_s
  [ "${#name}" -gt 80 ] && name=${name:$((${#name} - 80))}  # keep the end: the extension
  case $name in
    *.sh | *.py) ;;
    *)
      if [ ! -x "$file" ]; then
        _gpu_err "$file cannot run: the daemon runs *.sh with bash, *.py with Python, and any" \
          "other file only when it is executable (chmod +x)"
        return 2
      fi ;;
  esac
  [ -z "$display" ] || _gpu_check_display "$display" || return 2
  _gpu_check_args "${_gpu_rest[@]}" || return 2
  _gpu_instance || return
  case $file in /*) source=$file ;; *) source=$PWD/$file ;; esac
  # a finished task runs again where it was first submitted, with its request and arguments
  dir=${source%/*}
  case ${dir##*/} in
    done | failed)
      if _gpu_load "${dir%/*}/records/${source##*/}.submit" && _gpu_field cwd \
        && [ -n "$_gpu_val" ]; then
        cwd=$_gpu_val
        _gpu_field command; cmdline=$_gpu_val
        _gpu_field gpus; gpus=$_gpu_val
        _gpu_field nodes; nodes=$_gpu_val
        _gpu_field time_limit; time=${_gpu_val:+${_gpu_val}s}
        _gpu_record_env; env=$_gpu_env
        [ -n "$display" ] || { _gpu_field display_name; display=$_gpu_val; }
        if [ "${#_gpu_rest[@]}" -eq 0 ]; then
          _gpu_field argc; _gpu_bounded "$_gpu_val"
          while [ "$i" -lt "$_gpu_i" ]; do
            _gpu_field "arg.$i"; _gpu_rest+=("$_gpu_val"); i=$((i + 1))
          done
        fi
        if [ -z "${2-}$_gpu_o_prio" ] && _gpu_field priority; then
          _gpu_priority "$_gpu_val" 2>/dev/null
        fi
        retry_of=${source##*/}
        _gpu_err "resubmitting ${source##*/} as first submitted: it runs in $cwd," \
          "at priority $_gpu_p"
      fi ;;
  esac
  # a file name the task name cannot hold ('my train.sh', 训练.sh) names the task as --name
  # does, exactly: my_train.sh and ______.sh would not find it, or would find others too
  if [ -z "$display" ] && [ "$base" != "$name" ] && _gpu_check_display "$base" 2>/dev/null; then
    display=$base
  fi
  _gpu_request "$gpus" "$nodes" "$time" "$env" || return 2
  _gpu_resolve_after || return 1
  _gpu_request_keys "$display" "$retry_of" "${_gpu_rest[@]}"
  _gpu_enqueue "$name" "$_gpu_p" "$cwd" "$source" "$cmdline" "$file" ""
}

_gpu_cmd_run() {
  _gpu_parse first "$@" || return "$_gpu_rc"
  local cmd words IFS=' '
  cmd="${_gpu_args[*]}"
  case $cmd in
    *[![:space:]]*) ;;
    *) _gpu_usage; return ;;
  esac
  case $cmd in
    *"$_gpu_nl"*)
      _gpu_err "the command has a newline: put it in a script and use gpu_submit"
      return 2 ;;
  esac
  _gpu_priority "${_gpu_o_prio:-500}" || return 2
  [ -z "$_gpu_o_name" ] || _gpu_check_display "$_gpu_o_name" || return 2
  _gpu_instance || return
  _gpu_request || return 2
  _gpu_resolve_after || return 1
  _gpu_safe_name "$cmd"
  words=$_gpu_s
  while :; do
    case $words in *__*) words=${words//__/_} ;; *) break ;; esac
  done
  words=${words#_}
  words=${words:0:73}
  words=${words%_}
  _gpu_whoami
  _gpu_request_keys "$_gpu_o_name" ''
  _gpu_enqueue "run_${words:-command}.sh" "$_gpu_p" "$PWD" "" "$cmd" "" "#!/usr/bin/env bash
# queued with gpu_run by $_gpu_who from $PWD
$cmd
"
}

_gpu_cmd_retry() {
  _gpu_parse any "$@" || return "$_gpu_rc"
  set -- "${_gpu_args[@]}"
  if [ "$#" -eq 0 ] && [ -z "$_gpu_o_failed" ]; then _gpu_usage; return; fi
  if [ "$#" -gt 0 ] && [ -n "$_gpu_o_failed" ]; then
    _gpu_err "--failed takes no NAME"; return 2
  fi
  _gpu_existing_instance || return
  _gpu_priority "${_gpu_o_prio:-500}" || return 2  # checked once, before anything is queued
  local name picks='' pick retried count=0 skipped=0 rc IFS=$_gpu_nl
  if [ -n "$_gpu_o_failed" ]; then
    # the tasks already queued again, as their copies' submit records say
    retried=$(command find "$_gpu_q/records" -maxdepth 1 -type f -name '*.submit' \
      -exec grep -h '^retry_of=.' {} + 2>/dev/null | command sed 's/^retry_of=//')
    for name in $(_gpu_ls "$_gpu_q/failed"); do
      case $_gpu_nl$retried$_gpu_nl in *"$_gpu_nl$name$_gpu_nl"*) continue ;; esac
      [ ! -e "$_gpu_q/records/$name.retried" ] || continue
      _gpu_load "$_gpu_q/records/$name.result" || _gpu_keys=''
      _gpu_field state
      case $_gpu_val in
        stopped | cancelled) skipped=$((skipped + 1)) ;;
        *) picks=$picks"failed/$name$_gpu_nl" ;;
      esac
    done
    [ "$skipped" -eq 0 ] || _gpu_err "left out $skipped stopped or cancelled task(s)"
    if [ -z "$picks" ]; then _gpu_say "no failed task to retry"; return 0; fi
  else
    for name in "$@"; do  # every name is checked before anything is queued
      _gpu_check_name "$name" || return
      if ! _gpu_find "$name" 'done' failed; then
        rc=1
        if _gpu_find "$name" pending running; then
          _gpu_err "task $name has not finished yet (gpu_wait $name waits for it)"
        else  # it may have ended between the two looks: looked for again (the summary too)
          _gpu_sum=''
          if _gpu_find "$name" 'done' failed; then rc=0
          else _gpu_err "no such task: $name (gpu_status lists the tasks)"; fi
        fi
        if [ "$rc" -ne 0 ]; then
          [ "$#" -eq 1 ] || _gpu_err "nothing was queued"
          return 1
        fi
      fi
      _gpu_newest "$_gpu_val"
      picks=$picks$_gpu_pick$_gpu_nl
    done
  fi
  for pick in $picks; do
    _gpu_retry_one "${pick%%/*}" "${pick#*/}" "$_gpu_o_failed"
    rc=$?
    case $rc in
      0) count=$((count + 1)) ;;
      3) ;;  # another gpu_retry --failed queues it
      4) [ -n "$_gpu_o_failed" ] || return 1 ;;  # removed meanwhile: no longer a failed task
      *) return "$rc" ;;
    esac
  done
  [ "$count" -eq 1 ] || _gpu_say "queued $count task(s) again"
}

_gpu_retry_one() {  # _gpu_retry_one DIR ID [CLAIM]: queue the finished task DIR/ID again;
  # with CLAIM, only after taking its records/ID.retried (3: another retry took it)
  local dir=$1 old=$2 cwd name i=0 IFS=' '
  local -a args
  _gpu_retry_gone "$dir" "$old" && return 4
  # the script to queue again is copied: only the file the daemon moved there, never through a
  # link (another member of a shared queue could point it at a file of yours) or from a FIFO
  if [ -h "$_gpu_q/$dir/$old" ] || [ ! -f "$_gpu_q/$dir/$old" ]; then
    _gpu_err "$dir/$old is not a regular file (a link, say): a finished task is the file the" \
      "daemon moved there; not queued again"
    return 1
  fi
  _gpu_task "$dir" "$old"
  _gpu_priority "${_gpu_o_prio:-${_gpu_t_prio:-500}}" || return 2
  _gpu_request "$_gpu_t_gpus_req" "$_gpu_t_nodes_req" \
    "${_gpu_t_time_req:+${_gpu_t_time_req}s}" "$_gpu_t_env" || return 2
  args=()
  if _gpu_load "$_gpu_q/records/$old.submit"; then
    _gpu_field argc; _gpu_bounded "$_gpu_val"
    while [ "$i" -lt "$_gpu_i" ]; do _gpu_field "arg.$i"; args+=("$_gpu_val"); i=$((i + 1)); done
  fi
  cwd=${_gpu_t_cwd:-$PWD}
  _gpu_fresh_name "$old"
  name=$_gpu_s
  _gpu_after=''
  _gpu_request_keys "$_gpu_t_display" "$old" "${args[@]}"
  if [ -n "${3-}" ]; then _gpu_claim_retry "$old" "$name" || return; fi
  if ! _gpu_enqueue "$name" "$_gpu_p" "$cwd" "$_gpu_t_source" "$_gpu_t_command" \
      "$_gpu_q/$dir/$old" ""; then
    [ -z "${3-}" ] || command rm -f -- "$_gpu_q/records/$old.retried"
    _gpu_retry_gone "$dir" "$old" && return 4
    return 1
  fi
  _gpu_err "a retry of $old: it runs in $cwd, at priority $_gpu_p"
}

_gpu_retry_gone() {  # _gpu_retry_gone DIR ID: has the finished task left DIR since it was
  # listed (gpu_clean removed it, say)? Said when so
  [ ! -e "$_gpu_q/$1/$2" ] && [ ! -h "$_gpu_q/$1/$2" ] || return 1
  _gpu_err "$2 is no longer in $1/ (removed meanwhile): not queued again"
}

_gpu_claim_retry() {  # _gpu_claim_retry ID NAME: create records/ID.retried, saying NAME, only
  # if it does not exist (O_EXCL, as noclobber opens): of several gpu_retry --failed at once,
  # exactly one queues ID again (3 for the others). 1 when it cannot be written (a full disk, a
  # read-only file system): said, and no claim is left behind to keep ID from a later retry
  local file=$_gpu_q/records/$1.retried
  if ! _gpu_msg=$(command dd of="$file" conv=excl status=none </dev/null 2>&1); then
    if [ -e "$file" ] || [ -L "$file" ]; then return 3; fi
    _gpu_msg=${_gpu_msg%%"$_gpu_nl"*}
    _gpu_err "cannot create $file: $1 is not queued again${_gpu_msg:+ ($_gpu_msg)}"
    return 1
  fi
  _gpu_write "$file" "id=$1
retry=$2
" && return 0
  _gpu_failed "$file" "cannot write $file: $1 is not queued again"
}

# Commands: reading the queue #######################################################################

_gpu_name_of() {  # _gpu_name_of ID: the short name gpu_status shows for ID into _gpu_s
  local line IFS=$_gpu_nl
  for line in $_gpu_names; do
    case $line in "$1$_gpu_fs"*) _gpu_s=${line#*"$_gpu_fs"}; return 0 ;; esac
  done
  _gpu_short "$1"
  _gpu_esc "$_gpu_s"; _gpu_s=$_gpu_e
}

_gpu_spark() {  # _gpu_spark HISTORY: gpu.<i>.history (one value per 10 s, oldest first) as 20
  # glyphs into _gpu_sp, each the mean of 30 s, oldest left; . where nothing is known
  local IFS=, value slot=0 sum=0 known=0 level
  # shellcheck disable=SC2086  # split on the commas (the dispatcher turned globbing off)
  set -- $1
  while [ "$#" -gt 60 ]; do shift; done
  _gpu_sp=
  while [ "$slot" -lt 60 ]; do
    if [ "$slot" -ge $((60 - $#)) ]; then
      value=$1; shift
      if _gpu_whole "$value" 100; then sum=$((sum + _gpu_i)); known=$((known + 1)); fi
    fi
    slot=$((slot + 1))
    [ $((slot % 3)) -eq 0 ] || continue
    if [ "$known" -eq 0 ]; then _gpu_sp=$_gpu_sp.
    else
      level=$((sum * 8 / (known * 101)))
      case $level in
        0) _gpu_sp=$_gpu_sp▁ ;; 1) _gpu_sp=$_gpu_sp▂ ;; 2) _gpu_sp=$_gpu_sp▃ ;;
        3) _gpu_sp=$_gpu_sp▄ ;; 4) _gpu_sp=$_gpu_sp▅ ;; 5) _gpu_sp=$_gpu_sp▆ ;;
        6) _gpu_sp=$_gpu_sp▇ ;; *) _gpu_sp=$_gpu_sp█ ;;
      esac
    fi
    sum=0; known=0
  done
}

_gpu_pct() {  # _gpu_pct SHARE: a share (0.000 to 1.000) as a whole percentage into _gpu_pc
  case $1 in
    1.000) _gpu_pc=100% ;;
    0.[0-9][0-9][0-9]) _gpu_pc=$(((10#${1#0.} + 5) / 10))% ;;
    *) return 1 ;;
  esac
}

_gpu_gpu_keys() {  # _gpu_gpu_keys I: the loaded node state's gpu.I.<key> into _gpu_g_<key>
  # (empty when absent), all by one eval
  local key code=''
  for key in index name uuid task state reason last_yield risk util mem_used_mib mem_total_mib \
    held_mib tile duty band_10m band_1h held_10m held_1h last_yield_age history reserved; do
    code="$code _gpu_g_$key=\${_gpu_f_gpu_$1_$key-}"
  done
  eval "$code"
}

# shellcheck disable=SC2154  # _gpu_gpu_keys sets the _gpu_g_* variables
_gpu_keepalive_figures() {  # how keep-alive fares on the loaded GPU (_gpu_gpu_keys: band and
  # held shares, the last yield), one line of gpu_status when known
  local figs=''
  if _gpu_pct "$_gpu_g_band_10m"; then
    figs="in band $_gpu_pc"
    ! _gpu_pct "$_gpu_g_band_1h" || figs="$figs (1 h: $_gpu_pc)"
  fi
  if _gpu_pct "$_gpu_g_held_10m"; then
    figs="$figs${figs:+, }held $_gpu_pc"
    ! _gpu_pct "$_gpu_g_held_1h" || figs="$figs (1 h: $_gpu_pc)"
  fi
  if [ -n "$_gpu_g_last_yield" ]; then
    _gpu_dur "$_gpu_g_last_yield_age"
    figs="$figs${figs:+; }last yield $_gpu_d ago: $_gpu_g_last_yield"
  fi
  [ -z "$figs" ] || _gpu_line "               $figs"
}

# shellcheck disable=SC2154  # _gpu_gpu_keys sets the _gpu_g_* variables
_gpu_show_nodes() {  # the daemons part of gpu_status
  local state node rank count i line label host pid what slots spark drain
  local IFS=$_gpu_nl
  state=${_gpu_states-$(_gpu_node_files)}
  if [ -z "$state" ]; then
    _gpu_line 'Daemon:   none has started for this instance yet; tasks wait in pending/'
    return
  fi
  for node in $state; do
    rank=${node#node-}; rank=${rank%.state}
    drain=''; ! _gpu_drain_note "$rank" || drain="$_gpu_val (gpu_resume --node $rank)"
    label="Node $rank:          "; label=${label:0:10}
    if ! _gpu_load "$_gpu_q/nodes/$node"; then
      [ -z "$_gpu_big" ] || _gpu_line "${label}its state file nodes/$node is larger than 4 MiB:" \
        "corrupt, not read"
      continue
    fi
    _gpu_field num_nodes
    if [ "${_gpu_val:-1}" = 1 ] && [ "$rank" = 0 ]; then label='Daemon:   '; fi
    _gpu_liveness
    _gpu_field host; host=${_gpu_val:-?}
    _gpu_field pid; pid=${_gpu_val:-?}
    case $_gpu_live in
      alive) line="alive on $host, pid $pid" ;;
      stopping) line="alive (shutting down) on $host, pid $pid" ;;
      draining)
        line="alive (auto-shutdown: running tasks end, nothing new starts) on $host, pid $pid" ;;
      late) line="NOT RESPONDING on $host, pid $pid: $_gpu_why" ;;
      dead) line="DEAD on $host, pid $pid: $_gpu_why" ;;
      stopped)
        _gpu_field stopped; _gpu_minute "$_gpu_val"; line="stopped $_gpu_dt"
        _gpu_field stop_reason; [ -n "$_gpu_val" ] && line="$line ($_gpu_val)"
        line="$line on $host, pid $pid" ;;
    esac
    _gpu_line "$label$line"
    [ -z "$_gpu_cause" ] || _gpu_line "          likely: $_gpu_cause"
    [ -z "$drain" ] || _gpu_line "          $drain"
    _gpu_field started; _gpu_minute "$_gpu_val"; line="          started $_gpu_dt"
    case $_gpu_live in
      alive | stopping | draining | late)
        _gpu_field shutdown; _gpu_minute "$_gpu_val"; line="$line, auto-shutdown at $_gpu_dt" ;;
    esac
    _gpu_field heartbeat; _gpu_age "$_gpu_val"; _gpu_line "$line, heartbeat $_gpu_d ago"
    _gpu_field gpu_count; _gpu_bounded "$_gpu_val"; count=$_gpu_i
    line=''
    _gpu_field keepalive && [ -n "$_gpu_val" ] && line="keep-alive $_gpu_val"
    _gpu_field kill_scope && [ -n "$_gpu_val" ] && line="$line${line:+, }kill scope $_gpu_val"
    if _gpu_field gpus_free && _gpu_whole "$_gpu_val" 999999999; then
      line="$line${line:+, }$_gpu_i of $count GPUs free"
    fi
    if _gpu_field cpu_slots && slots=$_gpu_val && _gpu_field cpu_running \
      && [ -n "$slots" ]; then
      line="$line${line:+, }CPU tasks $_gpu_val of $slots"
    fi
    [ -z "$line" ] || _gpu_line "          $line"
    # a node whose GPUs keep-alive cannot see at all (NVML fails, no --gpus)
    ! _gpu_field risk || [ -z "$_gpu_val" ] || _gpu_line "          !! AT RISK OF RECLAIM: $_gpu_val"
    spark=
    [ "$count" -gt 0 ] && _gpu_field gpu.0.history && spark=1
    if [ "$count" -gt 0 ] && [ -n "$spark" ]; then
      _gpu_line '          GPU  MODEL               UTIL LAST 10 MIN            MEMORY (MiB)  TASK OR KEEP-ALIVE'
    elif [ "$count" -gt 0 ]; then
      _gpu_line '          GPU  MODEL               UTIL   MEMORY (MiB)  TASK OR KEEP-ALIVE'
    fi
    i=0
    while [ "$i" -lt "$count" ]; do
      _gpu_gpu_keys "$i"
      _gpu_esc "${_gpu_g_name:-?}"; _gpu_cut "$_gpu_e" 19; what=$_gpu_c
      [ "$what" = "$_gpu_e" ] || { _gpu_pad "$what" 19; what=$_gpu_pd; }  # … is 3 bytes
      printf -v line '%-4s %-19s %4s' "${_gpu_g_index:-$i}" "$what" \
        "${_gpu_g_util:--}${_gpu_g_util:+%}"
      if [ -n "$spark" ]; then _gpu_spark "$_gpu_g_history"; line="$line $_gpu_sp"; fi
      printf -v what '%13s' "${_gpu_g_mem_used_mib:--}/${_gpu_g_mem_total_mib:--}"
      line="$line  $what"
      if [ -n "$_gpu_g_task" ]; then
        _gpu_name_of "$_gpu_g_task"; what=$_gpu_s
        [ "$_gpu_g_state" != filling ] || what="$what (keep-alive filling)"
      else
        what="keep-alive ${_gpu_g_state:-?}"
        if [ -n "$_gpu_g_reserved" ]; then  # for a gang's rank
          _gpu_name_of "$_gpu_g_reserved"
          what="reserved for $_gpu_s, keep-alive ${_gpu_g_state:-?}"
        fi
        [ -z "$_gpu_g_reason" ] || what="$what ($_gpu_g_reason)"
        [ -z "$_gpu_g_tile" ] || what="$what, tile $_gpu_g_tile"
        [ -z "$_gpu_g_duty" ] || what="$what, duty $_gpu_g_duty"
      fi
      _gpu_line "          $line  $what"
      _gpu_keepalive_figures
      [ -z "$_gpu_g_risk" ] || _gpu_line "          !! AT RISK OF RECLAIM: $_gpu_g_risk"
      i=$((i + 1))
    done
    if _gpu_field waiting.id && [ -n "$_gpu_val" ]; then
      _gpu_name_of "$_gpu_val"; what=$_gpu_s
      _gpu_field waiting.reason
      _gpu_line "          next:     $what: ${_gpu_val:-waiting}"
    fi
    if _gpu_field refused && [ -n "$_gpu_val" ]; then  # the daemon's StrictModes check
      _gpu_line "          REFUSED:  $_gpu_val; no task or command is taken"
    fi
    _gpu_field skipped_count; _gpu_bounded "$_gpu_val"; count=$_gpu_i i=0
    while [ "$i" -lt "$count" ]; do
      _gpu_field "skipped.$i"
      _gpu_line "          skipped:  $_gpu_val"
      i=$((i + 1))
    done
  done
}

_gpu_recent() {  # _gpu_recent N: "DIR/ID" of the N tasks that ended last, newest first, one a
  # line, into _gpu_v
  local line n=0 IFS=$_gpu_nl
  _gpu_v=''
  [ "$1" -gt 0 ] || return 0
  if _gpu_cache && { [ "$1" -le "$_gpu_sum_nended" ] \
    || [ "$_gpu_sum_nended" -ge $((_gpu_sum_done + _gpu_sum_failed)) ]; }; then
    for line in $_gpu_sum_ended; do  # as the daemon found them (docs/protocol.md, summary)
      case $line in 'done'/?* | failed/?*) ;; *) continue ;; esac
      case ${line#*/} in */*) continue ;; esac
      [ -e "$_gpu_q/$line" ] || continue
      _gpu_v=$_gpu_v$line$_gpu_nl
      n=$((n + 1))
      [ "$n" -lt "$1" ] || break
    done
    return 0
  fi
  _gpu_v=$(_gpu_recent_results "$1")
  _gpu_v=${_gpu_v:+$_gpu_v$_gpu_nl}
}

_gpu_recent_results() {  # _gpu_recent_results N: _gpu_recent's lines from records/ on stdout,
  # with no summary to read them from
  local line id n=0 IFS=$_gpu_nl
  # a result is published when its task ends: the newest results are the newest ends
  for line in $(command find "$_gpu_q/records" -maxdepth 1 -name '*.result' -printf '%T@ %f\n' \
    2>/dev/null | command sort -rn | command head -n "$(($1 * 2 + 10))"); do
    id=${line#* }; id=${id%.result}
    case $id in *.rank[0-9]*) case ${id##*.rank} in *[!0-9]*) ;; *) continue ;; esac ;; esac
    if [ -e "$_gpu_q/done/$id" ]; then printf 'done/%s\n' "$id"
    elif [ -e "$_gpu_q/failed/$id" ]; then printf 'failed/%s\n' "$id"
    else continue; fi
    n=$((n + 1))
    [ "$n" -lt "$1" ] || break
  done
}

_gpu_finished_counts() {  # the tasks in done/ into _gpu_n, in failed/ into _gpu_nf
  if _gpu_cache; then _gpu_n=$_gpu_sum_done _gpu_nf=$_gpu_sum_failed; return; fi
  _gpu_count "$_gpu_q/failed"; _gpu_nf=$_gpu_n
  _gpu_count "$_gpu_q/done"
}

_gpu_short_names() {  # the name each row of _gpu_rows is shown by into _gpu_names: the user's
  # name, and when rows share it, :<the shortest unique start of the id's random part, >= 4>
  local row id base rest seen='' shared='' IFS=$_gpu_nl
  _gpu_names=''
  for row in $_gpu_rows; do
    id=${row%%"$_gpu_fs"*}; rest=${row#*"$_gpu_fs"}; base=${rest%%"$_gpu_fs"*}
    if [ -n "$_gpu_o_long" ]; then _gpu_esc "$id"; base=$_gpu_e
    else
      case $seen in *"$_gpu_nl$base$_gpu_fs"*) shared=1 ;; esac
      seen=$seen$_gpu_nl$base$_gpu_fs
    fi
    _gpu_names=$_gpu_names$id$_gpu_fs$base$_gpu_nl
  done
  [ -n "$shared" ] || return 0
  # rows share a name: one pass of awk tells them apart
  _gpu_awk_ids
  rest=$(printf '%s' "$_gpu_names" | command awk -F "$_gpu_fs" "$_gpu_aw"'
    function clashes(i, j, len) {  # another row of the same name (whose random part starts alike)
      return id[j] != id[i] && base[j] == base[i] \
        && (len == 0 || (hex[j] != "" && substr(hex[j], 1, len) == substr(hex[i], 1, len)))
    }
    { id[NR] = $1; base[NR] = $2; hex[NR] = random_part($1) }
    END {
      for (i = 1; i <= NR; i++) {
        name = base[i]
        shared = 0
        for (j = 1; j <= NR; j++) if (clashes(i, j, 0)) shared = 1
        if (shared && hex[i] != "") {
          for (len = 4; len < 8; len++) {
            hit = 0
            for (j = 1; j <= NR; j++) if (clashes(i, j, len)) hit = 1
            if (!hit) break
          }
          name = name ":" substr(hex[i], 1, len)
        }
        print id[i] FS name
      }
    }') && _gpu_names=$rest$_gpu_nl
}

_gpu_print_rows() {  # the task table of gpu_status, from _gpu_rows and _gpu_names (row by row)
  local row base width=4 line names=$_gpu_names ascii='' IFS=$_gpu_nl
  # a table of ASCII only (most are) takes a column a byte: no character is counted
  case $_gpu_rows$_gpu_names in *[$_gpu_b80-$_gpu_bff]*) ;; *) ascii=1 ;; esac
  for row in $_gpu_names; do
    row=${row#*"$_gpu_fs"}
    if [ -n "$ascii" ]; then _gpu_cw=${#row}; else _gpu_cols "$row"; fi
    [ "$_gpu_cw" -gt "$width" ] && width=$_gpu_cw
  done
  [ -n "$_gpu_o_long" ] || [ "$width" -le 24 ] || width=24
  printf '%-*s %4s %-11s %-4s %-7s %10s %5s  %s\n' "$width" TASK PRIO STATE NODE GPUS TIME EXIT \
    COMMAND
  for row in $_gpu_rows; do
    IFS=$_gpu_fs
    # shellcheck disable=SC2086  # the fields (id base prio state node gpus time code cmd)
    set -- $row$_gpu_fs
    IFS=$_gpu_nl
    base=${names%%"$_gpu_nl"*}; names=${names#*"$_gpu_nl"}; base=${base#*"$_gpu_fs"}
    if [ -z "$_gpu_o_long" ]; then
      _gpu_cut_middle "$base" "$width"; base=$_gpu_c
      # printf pads bytes: what is cut (… is 3 bytes) is padded to its columns here
      if [ "${#5}" -gt 4 ]; then
        _gpu_cut "$5" 4; [ "$_gpu_c" = "$5" ] || { _gpu_pad "$_gpu_c" 4; set -- "$1" "$2" "$3" \
          "$4" "$_gpu_pd" "$6" "$7" "$8" "$9"; }
      fi
      if [ "${#6}" -gt 7 ]; then
        _gpu_cut "$6" 7; [ "$_gpu_c" = "$6" ] || { _gpu_pad "$_gpu_c" 7; set -- "$1" "$2" "$3" \
          "$4" "$5" "$_gpu_pd" "$7" "$8" "$9"; }
      fi
    fi
    if [ -n "$ascii" ] && [ "$base" = "${base#*…}" ]; then
      printf -v line '%-*s %4s %-11s %-4s %-7s %10s %5s  ' "$width" "$base" "$3" "$4" "$5" "$6" \
        "$7" "$8"
      _gpu_cw=${#line}
    else
      _gpu_pad "$base" "$width"
      printf -v line '%s %4s %-11s %-4s %-7s %10s %5s  ' "$_gpu_pd" "$3" "$4" "$5" "$6" "$7" "$8"
      _gpu_cols "$line"
    fi
    row=$9
    if [ -z "$_gpu_o_long" ] && [ "${#row}" -gt "$((100 - _gpu_cw))" ]; then
      _gpu_cut "$row" "$((100 - _gpu_cw))"; row=$_gpu_c
    fi
    printf '%s%s\n' "$line" "$row"
  done
}

_gpu_cmd_status() {
  _gpu_parse any "$@" || return "$_gpu_rc"
  if [ "${#_gpu_args[@]}" -gt 0 ]; then _gpu_usage; return; fi
  local recent=10
  if [ -n "$_gpu_o_recent" ]; then
    _gpu_whole "$_gpu_o_recent" 10000 || {
      _gpu_err "-r wants a number of tasks from 0 to 10000, not '$_gpu_o_recent'"; return 2; }
    recent=$_gpu_i
  fi
  if [ -n "$_gpu_o_watch" ] && [ -n "$_gpu_o_json" ]; then
    _gpu_err "--watch and --json do not go together"; return 2
  fi
  _gpu_existing_instance || return
  if [ -n "$_gpu_o_watch" ]; then _gpu_bg _gpu_status_watch "$recent"; return; fi
  _gpu_status_text "$recent"
}

_gpu_status_watch() {  # _gpu_status_watch RECENT: gpu_status --watch, until Ctrl-C (a job)
  local frame clear=''
  [ ! -t 1 ] || clear=$(printf '\033[H\033[2J')
  while :; do
    frame=$(_gpu_status_text "$1" 2>&1)
    printf '%sgpu_status of %s, every 2 s (Ctrl-C ends)   %s\n\n%s\n' "$clear" "$JOB_ID" \
      "$(command date '+%Y-%m-%d %H:%M:%S')" "$frame"
    [ -n "$clear" ] || printf '\n'
    _gpu_sleep 2
    _gpu_shell_lives || return 1
  done
}

_gpu_status_text() {  # _gpu_status_text RECENT: gpu_status (--json too) of the checked instance
  local recent=$1 IFS=$_gpu_nl line id pending=0 shown=0 running=0 ndone failed
  # what it shows is listed first, and the files of all of it read at once (_gpu_preload)
  local _gpu_states _gpu_running _gpu_pending _gpu_ended _gpu_pre_on='' _gpu_pre_want=row
  local _gpu_pre_json=''
  local -A _gpu_pre
  _gpu_now
  _gpu_node_list
  # listed in the order a task passes the folders, so that one the daemon moves meanwhile is
  # listed at least once (pending/, then running/, then the summary's look at done/ and
  # failed/), and shown only where it was listed last
  _gpu_pending_list; _gpu_pending=$_gpu_v
  _gpu_list_names "$_gpu_q/running"; _gpu_running=$_gpu_v
  _gpu_recent "$recent"; _gpu_ended=$_gpu_v
  line=''
  if [ -n "$_gpu_ended" ] && [ -n "$_gpu_running$_gpu_pending" ]; then
    line=$_gpu_nl$_gpu_ended
    line=${line//"${_gpu_nl}done/"/$_gpu_nl}; line=${line//"${_gpu_nl}failed/"/$_gpu_nl}
    _gpu_minus "$_gpu_running" "$line"; _gpu_running=$_gpu_v
  fi
  _gpu_minus "$_gpu_pending" "$_gpu_running${line#"$_gpu_nl"}"; _gpu_pending=$_gpu_v
  [ -z "$_gpu_o_json" ] || _gpu_pre_want=json
  _gpu_status_preload
  if [ -n "$_gpu_o_json" ]; then _gpu_status_json; return; fi
  _gpu_down_nodes
  _gpu_rows='' _gpu_orphans=''
  for id in $_gpu_running; do
    running=$((running + 1))
    _gpu_status_row running "$id"
  done
  _gpu_lines "$_gpu_pending"; pending=$_gpu_n
  for id in $_gpu_pending; do
    [ "$shown" -lt 20 ] || [ -n "$_gpu_o_long" ] || break
    shown=$((shown + 1))
    _gpu_status_row pending "$id"
  done
  for line in $_gpu_ended; do
    _gpu_status_row "${line%%/*}" "${line#*/}"
  done
  _gpu_short_names
  _gpu_esc "$_gpu_q"; _gpu_cut_left "$_gpu_e" "$((100 - 13 - ${#JOB_ID}))"
  printf 'Instance: %s (%s)\n' "$JOB_ID" "$_gpu_c"
  _gpu_show_nodes
  if _gpu_drain_note; then
    _gpu_line "Queue:    $_gpu_val (gpu_resume)"
  fi
  _gpu_finished_counts; ndone=$_gpu_n failed=$_gpu_nf
  if [ -n "$_gpu_rows" ]; then _gpu_print_rows
  elif [ $((ndone + failed)) -eq 0 ]; then printf 'Tasks:    none\n'
  elif [ "$recent" -eq 0 ]; then  # there are finished tasks, only none was asked for
    printf 'Tasks:    none running or pending (-r 0: %s finished not listed)\n' \
      "$((ndone + failed))"
  else printf 'Tasks:    none running or pending\n'; fi
  [ "$shown" -ge "$pending" ] \
    || printf '          ... and %s more pending (gpu_status -l lists them all)\n' \
      "$((pending - shown))"
  [ -z "$_gpu_orphans" ] \
    || printf 'orphaned: its daemon is not alive; a new daemon marks it interrupted\n'
  printf 'Totals:   %s running, %s pending, %s done, %s failed, stopped or cancelled\n' \
    "$running" "$pending" "$ndone" "$failed"
}

_gpu_status_row() {  # _gpu_status_row DIR ID: the task's row of gpu_status, as _gpu_preload
  # wrote it (id, name, priority, state, node, GPUs, time, exit, command; escaped), into _gpu_rows;
  # a running task whose node's daemon is down is orphaned
  local row=${_gpu_pre[$_gpu_fs$1/$2]-} IFS=$_gpu_fs
  if [ -z "$row" ]; then  # awk failed: what its id says
    _gpu_esc "$2"; row=$_gpu_e$_gpu_fs$_gpu_e$_gpu_fs---$_gpu_fs$1$_gpu_fs$_gpu_fs-$_gpu_fs$_gpu_fs
    row=$row$_gpu_fs$_gpu_e
  fi
  if [ "$1" = running ]; then
    # shellcheck disable=SC2086  # the fields
    set -- $row$_gpu_fs
    case "$_gpu_down" in
      *" ${5:-0} "*)
        row=$1$_gpu_fs$2$_gpu_fs$3${_gpu_fs}orphaned$_gpu_fs$5$_gpu_fs$6$_gpu_fs$7$_gpu_fs$8
        row=$row$_gpu_fs$9 _gpu_orphans=1 ;;
    esac
  fi
  _gpu_rows=$_gpu_rows$row$_gpu_nl
}

_gpu_status_preload() {  # the node states and tasks gpu_status shows, of what _gpu_status_text
  # listed, read at once (_gpu_preload): as many as the table shows, gpu_status --json all
  local node id shown=0 pending='' items=() IFS=$_gpu_nl
  for node in $_gpu_states; do items+=("$_gpu_q/nodes/$node"); done
  [ -z "$_gpu_running" ] || items+=("${_gpu_fs}running$_gpu_nl$_gpu_running")
  if [ -n "$_gpu_o_long$_gpu_o_json" ]; then
    pending=$_gpu_pending
  else
    for id in $_gpu_pending; do
      [ "$shown" -lt 20 ] || break
      shown=$((shown + 1))
      pending=$pending$id$_gpu_nl
    done
  fi
  [ -z "$pending" ] || items+=("${_gpu_fs}pending$_gpu_nl$pending")
  [ -z "$_gpu_ended" ] || items+=("$_gpu_fs$_gpu_ended")
  _gpu_preload "${items[@]}"
}

_gpu_jstr() {  # _gpu_jstr TEXT: a JSON string, null when TEXT is empty, into _gpu_j
  if [ -n "$1" ]; then _gpu_js "$1"; else _gpu_j=null; fi
}

_gpu_task_json() {  # _gpu_task_json DIR ID: the task as one JSON object on stdout when awk
  # failed (_gpu_preload writes them all): what its id says, and its log
  local json log=null
  _gpu_js "$2"; json="\"id\": $_gpu_j"
  _gpu_js "$1"; json="$json, \"state\": $_gpu_j"
  if [ -f "$_gpu_q/logs/$2.log" ]; then _gpu_js "$_gpu_q/logs/$2.log"; log=$_gpu_j
  elif [ -f "$_gpu_q/logs/$2.rank0.log" ]; then _gpu_js "$_gpu_q/logs/$2.rank0.log"; log=$_gpu_j; fi
  printf '{%s, "log": %s}' "$json" "$log"
}

_gpu_node_json() {  # _gpu_node_json RANK DRAIN: the loaded node state as one JSON object on
  # stdout, with DRAIN (_gpu_drain_json's) as its drain
  local out i key count live IFS=' '
  _gpu_liveness
  live=$_gpu_live; [ "$live" = late ] && live=not_responding
  out="{\"rank\": $1, \"drain\": $2"
  _gpu_field host; _gpu_jstr "$_gpu_val"; out="$out, \"host\": $_gpu_j"
  _gpu_field pid; _gpu_jn "$_gpu_val"; out="$out, \"pid\": $_gpu_j"
  _gpu_field status; _gpu_jstr "$_gpu_val"; out="$out, \"status\": $_gpu_j"
  out="$out, \"liveness\": \"$live\""
  _gpu_jstr "$_gpu_why"; out="$out, \"why\": $_gpu_j"
  for i in heartbeat started shutdown stopped; do
    _gpu_field "$i"; _gpu_jn "$_gpu_val"; out="$out, \"$i\": $_gpu_j"
  done
  for i in stop_reason keepalive risk kill_scope node_addr; do
    _gpu_field "$i"; _gpu_jstr "$_gpu_val"; out="$out, \"$i\": $_gpu_j"
  done
  for i in num_nodes gpus_free cpu_slots cpu_running; do
    _gpu_field "$i"; _gpu_jn "$_gpu_val"; out="$out, \"$i\": $_gpu_j"
  done
  _gpu_field gpu_count; _gpu_bounded "$_gpu_val"; count=$_gpu_i
  out="$out, \"gpu_count\": $count"
  if _gpu_field waiting.id && [ -n "$_gpu_val" ]; then
    _gpu_js "$_gpu_val"; out="$out, \"waiting\": {\"id\": $_gpu_j"
    _gpu_field waiting.reason; _gpu_jstr "$_gpu_val"; out="$out, \"reason\": $_gpu_j}"
  else
    out="$out, \"waiting\": null"
  fi
  printf '%s, "gpus": [' "$out"
  i=0
  while [ "$i" -lt "$count" ]; do
    _gpu_gpu_keys "$i"
    _gpu_jn "${_gpu_g_index:-$i}"; out="{\"index\": $_gpu_j"
    for key in name uuid task state reason last_yield risk; do
      eval "_gpu_jstr \"\$_gpu_g_$key\""; out="$out, \"$key\": $_gpu_j"
    done
    for key in util mem_used_mib mem_total_mib held_mib tile duty band_10m band_1h held_10m \
      held_1h last_yield_age; do
      eval "_gpu_jn \"\$_gpu_g_$key\""; out="$out, \"$key\": $_gpu_j"
    done
    _gpu_jseries "$_gpu_g_history"; out="$out, \"history\": $_gpu_j"
    [ "$i" -eq 0 ] || printf ', '
    printf '%s}' "$out"
    i=$((i + 1))
  done
  printf ']}'
}

_gpu_drain_json() {  # _gpu_drain_json [RANK]: the drain of the instance (of node RANK) as JSON,
  # {"by", "reason", "time"} or null, into _gpu_dj
  _gpu_dj=null
  _gpu_drain_note "$@" || return 0
  _gpu_jstr "$_gpu_dr_by"; _gpu_dj="{\"by\": $_gpu_j"
  _gpu_jstr "$_gpu_dr_reason"; _gpu_dj="$_gpu_dj, \"reason\": $_gpu_j"
  _gpu_dj="$_gpu_dj, \"time\": ${_gpu_dr_time:-null}}"
}

_gpu_status_json() {  # gpu_status --json (docs/protocol.md) of what _gpu_status_text listed
  local node rank id line sep IFS=$_gpu_nl running=0 pending=0
  _gpu_js "$JOB_ID"; printf '{"schema": 1, "job_id": %s' "$_gpu_j"
  _gpu_js "$_gpu_q"; printf ', "queue_dir": %s, "time": %s' "$_gpu_j" "$_gpu_t"
  _gpu_drain_json; printf ', "drain": %s,\n "nodes": [' "$_gpu_dj"
  sep=''
  for node in $_gpu_states; do
    rank=${node#node-}; rank=${rank%.state}
    _gpu_drain_json "$rank"
    _gpu_load "$_gpu_q/nodes/$node" || continue
    printf '%s\n  ' "$sep"; sep=,
    _gpu_node_json "$rank" "$_gpu_dj"
  done
  if [ -n "$_gpu_pre_json" ]; then  # the lists, as _gpu_preload's awk wrote them
    printf '],\n '
    printf '%s' "$_gpu_pre_json" | command tr '\036' '\n'
    _gpu_lines "$_gpu_running"; running=$_gpu_n
    _gpu_lines "$_gpu_pending"; pending=$_gpu_n
    _gpu_finished_counts
    printf ',\n "counts": {"running": %s, "pending": %s, "done": %s, "failed": %s}}\n' \
      "$running" "$pending" "$_gpu_n" "$_gpu_nf"
    return
  fi
  printf '],\n "running": ['
  sep=''
  for id in $_gpu_running; do
    running=$((running + 1))
    printf '%s\n  ' "$sep"; sep=,
    _gpu_task_json running "$id"
  done
  printf '],\n "pending": ['
  sep=''
  for id in $_gpu_pending; do
    pending=$((pending + 1))
    printf '%s\n  ' "$sep"; sep=,
    _gpu_task_json pending "$id"
  done
  printf '],\n "recent": ['
  sep=''
  for line in $_gpu_ended; do
    printf '%s\n  ' "$sep"; sep=,
    _gpu_task_json "${line%%/*}" "${line#*/}"
  done
  _gpu_finished_counts
  printf '],\n "counts": {"running": %s, "pending": %s, "done": %s, "failed": %s}}\n' \
    "$running" "$pending" "$_gpu_n" "$_gpu_nf"
}

_gpu_cmd_show() {
  _gpu_parse any "$@" || return "$_gpu_rc"
  set -- "${_gpu_args[@]}"
  if [ "$#" -ne 1 ]; then _gpu_usage; return; fi
  _gpu_existing_instance || return
  _gpu_check_name "$1" || return
  local dir id line what others IFS=$_gpu_nl
  if ! _gpu_find "$1" pending running 'done' failed; then
    _gpu_err "no such task: $1 (gpu_status lists the tasks)"
    return 1
  fi
  others=$_gpu_val
  _gpu_newest "$_gpu_val"
  dir=${_gpu_pick%%/*} id=${_gpu_pick#*/}
  _gpu_now
  _gpu_task "$dir" "$id"
  _gpu_say "Task:       $id"
  [ -z "$_gpu_t_display" ] || _gpu_say "Name:       $_gpu_t_display"
  case $_gpu_t_state in
    running) _gpu_age "$_gpu_t_started"; what="running for $_gpu_d"
      if [ -n "$_gpu_t_time_req" ] && _gpu_int "$_gpu_t_started"; then
        _gpu_dur "$((_gpu_i + _gpu_t_time_req > _gpu_t ? _gpu_i + _gpu_t_time_req - _gpu_t : 0))"
        what="$what ($_gpu_d left of its time limit)"
      fi ;;
    starting) what='starting (claimed: its GPUs are being freed, or its nodes made ready)' ;;
    pending) what=pending
      if _gpu_renamed "$id"; then what="$what (gets a fresh id when it starts)"; fi ;;
    *) what=$_gpu_t_state${_gpu_t_reason:+ ($_gpu_t_reason)} ;;
  esac
  _gpu_say "State:      $what"
  if [ -n "$_gpu_t_command" ]; then
    _gpu_say "Command:    $_gpu_t_command"
  else
    _gpu_say "Script:     ${_gpu_t_source:-$id (put into pending/ by hand)}"
    [ -z "$_gpu_t_args" ] || _gpu_say "Arguments: $_gpu_t_args"
  fi
  what="(the home directory of the daemon: no submit record)"
  _gpu_say "Directory:  ${_gpu_t_cwd:-$what}"
  if [ -n "$_gpu_t_record" ]; then
    _gpu_say "Submitted:  $(_gpu_date "$_gpu_t_submitted") by ${_gpu_t_by:-?}"
  fi
  what="${_gpu_t_gpus_req} GPU(s)"
  case $_gpu_t_gpus_req in
    all) what='all GPUs' ;;
    0) what='no GPU (CPU only)' ;;
    1) what='1 GPU' ;;
  esac
  case $_gpu_t_nodes_req in 1) what="$what of one node" ;; all) what="$what on every node" ;;
    *) what="$what on each of $_gpu_t_nodes_req nodes" ;; esac
  if [ -n "$_gpu_t_time_req" ]; then _gpu_dur "$_gpu_t_time_req"; what="$what, for $_gpu_d"; fi
  _gpu_say "Priority:   ${_gpu_t_prio:-500}; asks for $what"
  what='Env:       '
  for line in $_gpu_t_env; do _gpu_say "$what $line"; what='           '; done
  if [ -n "$_gpu_t_after" ]; then
    what=''
    for line in $(printf '%s\n' "$_gpu_t_after" | command tr ' ' '\n'); do
      if _gpu_load "$_gpu_q/records/$line.result" && _gpu_field state; then
        what="$what$line ($_gpu_val)$_gpu_nl"
      else
        what="$what$line (not finished)$_gpu_nl"
      fi
    done
    for line in $what; do _gpu_say "After:      $line"; done
  fi
  [ -z "$_gpu_t_retry_of" ] || _gpu_say "Retry of:   $_gpu_t_retry_of"
  if [ -n "$_gpu_t_node$_gpu_t_host$_gpu_t_gpus" ]; then
    what="node ${_gpu_t_node:-?}${_gpu_t_host:+ ($_gpu_t_host)}"
    if [ -n "$_gpu_t_gpus" ]; then what="$what, GPUs $_gpu_t_gpus"; else what="$what, no GPU"; fi
    _gpu_say "Placement:  $what"
  fi
  [ -z "$_gpu_t_started" ] || _gpu_say "Started:    $(_gpu_date "$_gpu_t_started")"
  if [ -n "$_gpu_t_ended" ]; then
    _gpu_dur "$_gpu_t_duration"
    what="$(_gpu_date "$_gpu_t_ended")${_gpu_t_duration:+, after $_gpu_d}"
    # an end no daemon saw: when it last ran, as far as is known (docs/protocol.md, Recovery)
    [ -z "$_gpu_t_found" ] || what="$what (last known to run; found $(_gpu_date "$_gpu_t_found"))"
    _gpu_say "Ended:      $what"
  fi
  if [ -n "$_gpu_t_exit" ]; then
    _gpu_say "Exit:       exit code $_gpu_t_exit"
  elif [ -n "$_gpu_t_signal" ]; then
    _gpu_say "Exit:       killed by signal $_gpu_t_signal"
  fi
  [ -z "$_gpu_t_attempt" ] || [ "$_gpu_t_attempt" = 1 ] || _gpu_say "Attempt:    $_gpu_t_attempt"
  _gpu_task_logs "$id" all
  for line in $_gpu_tl; do _gpu_say "Log:        $_gpu_q/logs/$line"; done
  _gpu_lines "$others"; _gpu_named=$_gpu_n
  _gpu_which "$1" 'the one submitted last'
  return 0
}

_gpu_which() {  # _gpu_which NAME WHICH: when NAME names several tasks (_gpu_named), say which
  # one the command took (WHICH)
  [ "$_gpu_named" -le 1 ] || _gpu_err "$1 names $_gpu_named tasks; this is $2" \
    "(gpu_status lists them)"
}

_gpu_which_log() {  # _gpu_which_log PATTERN: _gpu_which for the log _gpu_log_of found
  if [ "$_gpu_by" = part ]; then
    [ "$_gpu_named" -le 1 ] || _gpu_err "$1 is in the ids of $_gpu_named logs; this is the" \
      "log of $_gpu_id, written last (gpu_logs lists the logs)"
  else
    _gpu_which "$1" "the log of $_gpu_id, written last"
  fi
}

_gpu_log_rank() {  # _gpu_log_rank FILE WANT: the task id of log FILE into _gpu_id when it is
  # the log of rank WANT (empty: the task's own log, rank 0's for a task that spans nodes)
  local r=''
  _gpu_id=${1%.log}
  case $_gpu_id in
    *.rank[0-9]*)
      r=${_gpu_id##*.rank}
      case $r in *[!0-9]*) r= ;; *) _gpu_id=${_gpu_id%.rank*} ;; esac ;;
  esac
  case $2 in
    '' | 0) [ -z "$r" ] || [ "$r" = 0 ] ;;
    *) [ "$r" = "$2" ] ;;
  esac
}

_gpu_log_of() {  # _gpu_log_of PATTERN RANK: the newest log PATTERN names (a task NAME, else any
  # part of an id) into _gpu_log, its task into _gpu_id; 1 when there is none. How it was found
  # into _gpu_by (name or part), and into _gpu_named how many tasks the NAME names (those whose
  # logs' ids hold the part)
  local f sub='' subs=0 ids line files='' IFS=$_gpu_nl
  _gpu_split_name "$1"
  _gpu_by=name _gpu_named=0
  if _gpu_key_ok "$_gpu_base" && _gpu_cache && _gpu_find "$1" pending running 'done' failed
  then  # the tasks NAME names, found without listing logs/: the newest of their logs
    _gpu_lines "$_gpu_val"; _gpu_named=$_gpu_n
    for line in $_gpu_val; do
      _gpu_task_logs "${line#*/}" "$2"
      files=$files$_gpu_tl
    done
    if [ -n "$files" ]; then
      # shellcheck disable=SC2086  # one name a line (the dispatcher turned globbing off)
      f=$(_gpu_cd "$_gpu_q/logs" && command ls -1t -- $files 2>/dev/null \
        | command head -n 1)
      if [ -n "$f" ]; then
        _gpu_log_rank "$f" "$2"
        _gpu_log=$_gpu_q/logs/$f
        return 0
      fi
    fi
  fi
  # only the logs whose names hold the name can match (grep is faster than the shell)
  for f in $(command ls -1t -- "$_gpu_q/logs" 2>/dev/null | command grep -F -e "$_gpu_base"); do
    case $f in *.log) ;; *) continue ;; esac
    _gpu_log_rank "$f" "$2" || continue
    if [ "$_gpu_id" = "$1" ] || _gpu_matches "$_gpu_id"; then
      _gpu_log=$_gpu_q/logs/$f
      _gpu_named_count "$1"
      return 0
    fi
    case $_gpu_id in *"$1"*) subs=$((subs + 1)); [ -n "$sub" ] || sub=$f ;; esac
  done
  ids=$_gpu_nl$(_gpu_display_ids)$_gpu_nl
  if [ "$ids" != "$_gpu_nl$_gpu_nl" ]; then
    for f in $(command ls -1t -- "$_gpu_q/logs" 2>/dev/null); do
      case $f in *.log) ;; *) continue ;; esac
      _gpu_log_rank "$f" "$2" || continue
      case $ids in
        *"$_gpu_nl$_gpu_id$_gpu_nl"*) _gpu_log=$_gpu_q/logs/$f; _gpu_named_count "$1"; return 0 ;;
      esac
    done
  fi
  [ -n "$sub" ] || return 1
  _gpu_log_rank "$sub" "$2"
  _gpu_log=$_gpu_q/logs/$sub
  _gpu_by=part _gpu_named=$subs
}

_gpu_named_count() {  # _gpu_named_count NAME: how many tasks NAME names into _gpu_named
  local _gpu_val
  _gpu_find "$1" pending running 'done' failed
  _gpu_lines "$_gpu_val"; _gpu_named=$_gpu_n
}

_gpu_no_log() {  # _gpu_no_log NAME RANK: why NAME has no log; returns 1. 0 when the task
  # started since _gpu_log_of looked and its log is there now (set as _gpu_log_of sets it)
  _gpu_sum=''  # the summary is looked at again: a task may have ended since
  if [ -n "$2" ] && _gpu_log_of "$1" ''; then
    _gpu_err "task $_gpu_id has no log of rank $2 (gpu_show $1 says where it ran)"
  elif _gpu_find "$1" pending; then
    _gpu_err "task $1 is still pending: it has no log yet (gpu_tail $1 waits for it)"
  elif _gpu_find "$1" running failed 'done' && _gpu_log_of "$1" "$2"; then
    return 0
  elif _gpu_find "$1" running; then
    _gpu_err "task $1 is starting: it has no log yet (gpu_tail $1 follows it)"
  elif _gpu_find "$1" failed 'done'; then
    _gpu_err "task $1 has no log: it never ran (cancelled)"
  else
    _gpu_err "no such task: $1 (gpu_logs lists the logs)"
  fi
  return 1
}

_gpu_lines_opt() {  # -n N of gpu_logs and gpu_tail into _gpu_lines (DEFAULT when not given)
  _gpu_lines=${_gpu_o_lines:-$1}
  [ -z "$_gpu_lines" ] && return 0
  _gpu_whole "$_gpu_lines" 999999999 && { _gpu_lines=$_gpu_i; return 0; }
  _gpu_err "-n wants a number of lines, not '$_gpu_o_lines'"
  return 2
}

_gpu_rank_opt() {  # --rank R into _gpu_rank (empty when not given)
  _gpu_rank=''
  [ -z "$_gpu_o_rank" ] && return 0
  _gpu_whole "$_gpu_o_rank" 1023 && { _gpu_rank=$_gpu_i; return 0; }
  _gpu_err "--rank wants a rank from 0 to 1023, not '$_gpu_o_rank'"
  return 2
}

_gpu_cmd_logs() {
  _gpu_parse any "$@" || return "$_gpu_rc"
  set -- "${_gpu_args[@]}"
  if [ "$#" -gt 1 ]; then _gpu_usage; return; fi
  _gpu_lines_opt '' || return 2
  _gpu_rank_opt || return 2
  _gpu_existing_instance || return
  if [ "$#" -eq 1 ]; then
    _gpu_check_name "$1" || return
    _gpu_log_of "$1" "$_gpu_rank" || _gpu_no_log "$1" "$_gpu_rank" || return 1
    _gpu_plain_log "$_gpu_log" || return 1
    if [ -n "$_gpu_lines" ]; then command tail -n "$_gpu_lines" -- "$_gpu_log"
    else command cat -- "$_gpu_log"; fi
    set -- "$1" "$?"
    _gpu_which_log "$1"
    return "$2"
  fi
  local perms size day time name total shown=0 limit=20 running r files='' id IFS=$_gpu_nl
  if [ -z "$_gpu_o_all" ] && _gpu_cache; then
    # the newest logs are those of the running tasks and of the tasks that ended last
    total=$_gpu_sum_logs
    for id in $(_gpu_ls "$_gpu_q/running") $_gpu_sum_ended; do
      _gpu_task_logs "${id#*/}" all
      files=$files$_gpu_tl
    done
  else
    _gpu_count "$_gpu_q/logs"; total=$_gpu_n
  fi
  if [ "$total" -eq 0 ]; then
    _gpu_say "No logs yet in $_gpu_q/logs"
    return 0
  fi
  [ -z "$_gpu_o_all" ] || limit=$total
  [ -n "$files" ] || files=.  # the whole folder
  # shellcheck disable=SC2086  # one name a line (the dispatcher turned globbing off)
  files=$(_gpu_cd "$_gpu_q/logs" && command ls -goth --time-style='+%Y-%m-%d %H:%M' \
    -- $files 2>/dev/null | command head -n "$((limit + 1))")
  running=$_gpu_nl$(_gpu_ls "$_gpu_q/running")$_gpu_nl
  printf '%6s  %-16s  %s\n' SIZE MODIFIED TASK
  while IFS=' ' read -r perms _ size day time name; do
    case $perms in total) continue ;; esac
    case $name in *.log) ;; *) continue ;; esac
    name=${name%.log} r=''
    case $name in
      *.rank[0-9]*)
        r=${name##*.rank}
        case $r in *[!0-9]*) r= ;; *) name=${name%.rank*} ;; esac ;;
    esac
    case $running in *"$_gpu_nl$name$_gpu_nl"*) r="$r${r:+, }running" ;; esac
    case $r in [0-9]*) name="$name (rank $r)" ;; ?*) name="$name ($r)" ;; esac
    _gpu_say "$(printf '%6s  %-16s  %s' "$size" "$day $time" "$name")"
    shown=$((shown + 1))
  done <<EOF
$files
EOF
  [ "$shown" -lt "$total" ] && printf '(the newest %s of %s logs; gpu_logs --all lists all)\n' \
    "$shown" "$total"
  return 0
}

_gpu_plain_log() {  # _gpu_plain_log LOG: is LOG a regular file, no symbolic link? Else says so
  # (as the daemon, the client never reads through a link in the queue folder: it could show
  # anybody's file; nor a FIFO, which blocks)
  if [ -h "$1" ]; then
    _gpu_err "$1 is a symbolic link: not followed (a log is a file the daemon writes)"
    return 1
  elif [ -e "$1" ] && [ ! -f "$1" ]; then
    _gpu_err "$1 is not a regular file: not read"
    return 1
  fi
}

_gpu_bytes() {  # _gpu_bytes FILE OFFSET COUNT: COUNT bytes of FILE from OFFSET on stdout
  # (not dd: it catches SIGINT, and a child that exits normally after Ctrl-C makes bash go on)
  command tail -c "+$(($2 + 1))" -- "$1" 2>/dev/null | command head -c "$3"
}

_gpu_follow() {  # _gpu_follow ID LOG LINES: print the last LINES lines of LOG, then whatever is
  # appended, until task ID has a result (the footer is written before it); its return code
  local off=0 size start first=1 ended='' what
  _gpu_plain_log "$2" || return 1
  while :; do
    [ -f "$_gpu_q/records/$1.result" ] && ended=1
    if [ -f "$2" ] && [ ! -h "$2" ]; then
      size=$(command wc -c < "$2" 2>/dev/null)
      size=${size//[!0-9]/}
      size=${size:-0}
      if [ -n "$first" ]; then
        first=''
        start=0
        [ "$size" -gt 65536 ] && start=$((size - 65536))
        [ "$size" -le "$start" ] || _gpu_bytes "$2" "$start" "$((size - start))" \
          | command tail -n "$3"
        off=$size
      elif [ "$size" -gt "$off" ]; then
        _gpu_bytes "$2" "$off" "$((size - off))"
        off=$size
      elif [ "$size" -lt "$off" ]; then
        off=$size  # rewritten from the start
      fi
    fi
    [ -z "$ended" ] || break
    command sleep 0.5
    _gpu_shell_lives || return 1
  done
  _gpu_exit_of "$1"
  _gpu_field state; what=$_gpu_val
  _gpu_field reason
  _gpu_err "$1 ended: ${what:-?}${_gpu_val:+ ($_gpu_val)}"
  return "$_gpu_rcode"
}

_gpu_wait_pending() {  # _gpu_wait_pending ID: wait until pending task ID starts or ends; its id
  # then (a fresh one when the daemon renamed it) into _gpu_id
  local snap='' tries=0
  _gpu_err "task $1 is pending: waiting for it to start"
  if _gpu_renamed "$1"; then
    _gpu_track "$1" || return 0
    snap=$_gpu_snap
  fi
  while [ -e "$_gpu_q/pending/$1" ]; do
    command sleep 0.5
    _gpu_shell_lives || return 1
  done
  _gpu_id=$1
  [ -n "$snap" ] || return 0
  while ! _gpu_follow_rename "$1" "$snap"; do
    tries=$((tries + 1))
    if [ "$tries" -gt 20 ]; then _gpu_err "task $1 left pending/ and cannot be found"; return 1
    fi
    command sleep 0.5
    _gpu_shell_lives || return 1
  done
}

_gpu_cmd_tail() {
  _gpu_parse any "$@" || return "$_gpu_rc"
  set -- "${_gpu_args[@]}"
  if [ "$#" -gt 1 ]; then _gpu_usage; return; fi
  _gpu_lines_opt 40 || return 2
  _gpu_rank_opt || return 2
  _gpu_existing_instance || return
  local id='' f pending='' IFS=$_gpu_nl
  if [ "$#" -eq 0 ]; then
    # the running task whose log moved last, else the newest log
    for f in $(command ls -1t -- "$_gpu_q/logs" 2>/dev/null); do
      case $f in *.log) ;; *) continue ;; esac
      _gpu_log_rank "$f" "$_gpu_rank" || continue
      [ -n "$id" ] || id=$_gpu_id
      [ -e "$_gpu_q/running/$_gpu_id" ] && { id=$_gpu_id; break; }
    done
    if [ -z "$id" ]; then
      _gpu_err "no task of $JOB_ID has a log yet; gpu_tail NAME waits for a given task"
      return 1
    fi
  else
    _gpu_check_name "$1" || return
    # pending/ before running/: a task claimed meanwhile is seen in one of them
    if _gpu_find "$1" pending running; then
      case $_gpu_val in
        *running/*)
          _gpu_newest "$(printf '%s' "$_gpu_val" | command grep '^running/')"
          id=${_gpu_pick#*/} f='the newest running one' ;;
        *) id=${_gpu_val%%"$_gpu_nl"*}; id=${id#*/} pending=1
          f='the pending one that starts first' ;;
      esac
      _gpu_named_count "$1"
      _gpu_which "$1" "$f"
    elif _gpu_log_of "$1" "$_gpu_rank"; then
      id=$_gpu_id
      _gpu_which_log "$1"
    elif [ -z "$_gpu_rank" ] && _gpu_find "$1" failed 'done'; then
      _gpu_newest "$_gpu_val"; id=${_gpu_pick#*/}  # it ended without a log (cancelled)
      _gpu_lines "$_gpu_val"; _gpu_named=$_gpu_n
      _gpu_which "$1" 'the one submitted last'
    elif _gpu_no_log "$1" "$_gpu_rank"; then  # it started meanwhile: its log is there now
      id=$_gpu_id
      _gpu_which_log "$1"
    else
      return 1
    fi
  fi
  _gpu_bg _gpu_tail_task "$id" "$pending"
}

_gpu_tail_task() {  # _gpu_tail_task ID PENDING: gpu_tail of task ID (still pending, if PENDING)
  local id=$1 log
  if [ -n "$2" ]; then
    _gpu_wait_pending "$id" || return 1
    id=$_gpu_id
  fi
  # rank 0 of a task on one node is the task itself, as for gpu_logs (_gpu_log_rank)
  if [ -n "$_gpu_rank" ] && [ "$_gpu_rank" != 0 ]; then log=$_gpu_q/logs/$id.rank$_gpu_rank.log
  elif [ -f "$_gpu_q/logs/$id.rank0.log" ] || [ -f "$_gpu_q/records/$id.gang" ]; then
    log=$_gpu_q/logs/$id.rank0.log
  else
    log=$_gpu_q/logs/$id.log
  fi
  _gpu_err "following $log (Ctrl-C to stop)"
  _gpu_follow "$id" "$log" "$_gpu_lines"
}

_gpu_ms() {  # the time in milliseconds into _gpu_ms
  _gpu_ms=$(command date +%s%3N)
}

_gpu_cmd_wait() {
  _gpu_parse any "$@" || return "$_gpu_rc"
  set -- "${_gpu_args[@]}"
  if [ "$#" -lt 1 ]; then _gpu_usage; return; fi
  local name line id n deadline='' whole frac IFS=$_gpu_nl
  local -a ids snaps codes misses
  if [ -n "$_gpu_o_timeout" ]; then
    case $_gpu_o_timeout in
      '' | *[!0-9.]* | .* | *. | *.*.*)
        _gpu_err "--timeout wants seconds, not '$_gpu_o_timeout'"; return 2 ;;
    esac
    whole=${_gpu_o_timeout%%.*} frac=000
    case $_gpu_o_timeout in *.*) frac=${_gpu_o_timeout#*.}000 ;; esac
    _gpu_whole "$whole" 99999999 || { _gpu_err "--timeout: too long"; return 2; }
    whole=$_gpu_i
    _gpu_int "${frac:0:3}"
    _gpu_ms
    deadline=$((_gpu_ms + whole * 1000 + _gpu_i))
  fi
  _gpu_existing_instance || return
  ids=() snaps=() codes=() misses=()
  for name in "$@"; do
    _gpu_check_name "$name" || return
    if _gpu_find "$name" pending running; then
      :
    elif _gpu_find "$name" 'done' failed; then
      _gpu_newest "$_gpu_val"; _gpu_val=$_gpu_pick
    else
      _gpu_err "no such task: $name (gpu_status lists the tasks)"
      return 1
    fi
    for line in $_gpu_val; do
      id=${line#*/}
      if [ "${line%%/*}" = pending ] && _gpu_renamed "$id"; then
        if _gpu_track "$id"; then line=$_gpu_snap; else id=$_gpu_id line=''; fi
      else
        line=''
      fi
      case "$_gpu_nl${ids[*]}$_gpu_nl" in *"$_gpu_nl$id$_gpu_nl"*) continue ;; esac
      ids+=("$id") codes+=('') misses+=(0) snaps+=("$line")
    done
  done
  n=${#ids[@]}
  _gpu_bg _gpu_wait_loop
}

_gpu_wait_loop() {  # the loop of gpu_wait, on the arrays of _gpu_cmd_wait
  local left i id line rc=0
  while :; do
    left=0 i=0
    while [ "$i" -lt "$n" ]; do
      id=${ids[i]}
      if [ -n "${codes[i]}" ]; then i=$((i + 1)); continue; fi
      if [ -n "${snaps[i]}" ]; then  # it will get a fresh id when it leaves pending/
        if [ -e "$_gpu_q/pending/$id" ]; then left=$((left + 1)); i=$((i + 1)); continue; fi
        if _gpu_follow_rename "$id" "${snaps[i]}"; then
          ids[i]=$_gpu_id snaps[i]='' id=$_gpu_id
          case "$_gpu_nl${ids[*]}$_gpu_nl" in
            *"$_gpu_nl$id$_gpu_nl"*"$_gpu_nl$id$_gpu_nl"*)  # named twice: waited for once
              codes[i]=- i=$((i + 1)); continue ;;
          esac
        fi
      fi
      if [ -z "${snaps[i]}" ] && _gpu_exit_of "$id"; then
        codes[i]=$_gpu_rcode
        _gpu_field state; line=$_gpu_val
        _gpu_field reason; _gpu_say "$id: ${line:-?}${_gpu_val:+ ($_gpu_val)}"
      elif [ -e "$_gpu_q/pending/$id" ] || [ -e "$_gpu_q/running/$id" ]; then
        left=$((left + 1)) misses[i]=0
      elif [ "${misses[i]}" -lt 10 ]; then  # between two folders, or its result on the way
        left=$((left + 1)) misses[i]=$((misses[i] + 1))
      else
        codes[i]=1
        _gpu_err "$id is gone (neither queued nor finished any more)"
      fi
      i=$((i + 1))
    done
    [ "$left" -gt 0 ] || break
    if [ -n "$deadline" ]; then
      _gpu_ms
      if [ "$_gpu_ms" -ge "$deadline" ]; then
        i=0 line=''
        while [ "$i" -lt "$n" ]; do
          [ -n "${codes[i]}" ] || line="$line ${ids[i]}"
          i=$((i + 1))
        done
        _gpu_err "timed out after $_gpu_o_timeout s; still waiting for:$line"
        return 124
      fi
    fi
    command sleep 0.5
    _gpu_shell_lives || return 1
  done
  i=0
  while [ "$i" -lt "$n" ]; do
    case ${codes[i]} in 0 | -) ;; *) rc=${codes[i]}; break ;; esac
    i=$((i + 1))
  done
  return "$rc"
}

# Commands: holding and ordering pending tasks #####################################################

_gpu_pending_of() {  # _gpu_pending_of NAME...: the pending tasks the NAMEs name, as ids, into
  # _gpu_ids (one a line); 1 with a message when one names none, or a task that gets a fresh id
  local name line id IFS=$_gpu_nl
  _gpu_ids=''
  for name in "$@"; do
    _gpu_check_name "$name" || return 1
    if ! _gpu_find "$name" pending; then
      if _gpu_find "$name" running; then _gpu_err "task $name has started already"
      elif _gpu_find "$name" 'done' failed; then _gpu_err "task $name has finished"
      else _gpu_err "no such task: $name (gpu_status lists the tasks)"; fi
      [ "$#" -eq 1 ] || _gpu_err "nothing was changed"
      return 1
    fi
    for line in $_gpu_val; do
      id=${line#*/}
      if _gpu_renamed "$id"; then
        _gpu_err "$id gets its id only when it starts (it was put into pending/ by hand or" \
          "renamed back): it cannot be held or given a priority"
        return 1
      fi
      case $_gpu_nl$_gpu_ids in *"$_gpu_nl$id$_gpu_nl"*) ;; *) _gpu_ids=$_gpu_ids$id$_gpu_nl ;; esac
    done
  done
}

_gpu_cmd_hold() {
  _gpu_parse any "$@" || return "$_gpu_rc"
  set -- "${_gpu_args[@]}"
  if [ "$#" -eq 0 ]; then _gpu_usage; return; fi
  _gpu_existing_instance || return
  _gpu_pending_of "$@" || return 1
  local id rc=0 IFS=$_gpu_nl
  _gpu_prepare held || return 1
  _gpu_whoami
  _gpu_now
  for id in $_gpu_ids; do
    _gpu_unique || return 1
    _gpu_put "$_gpu_q/held/$id" "by=$_gpu_who${_gpu_nl}time=$_gpu_t$_gpu_nl" || return 1
    # the daemon claims a task, then looks for its hold: a task still pending now never starts
    if [ -e "$_gpu_q/pending/$id" ]; then
      _gpu_say "held $id"
    else
      command rm -f -- "$_gpu_q/held/$id"
      _gpu_err "task $id started before it could be held"
      rc=1
    fi
  done
  return "$rc"
}

_gpu_cmd_release() {
  _gpu_parse any "$@" || return "$_gpu_rc"
  set -- "${_gpu_args[@]}"
  if [ "$#" -eq 0 ]; then _gpu_usage; return; fi
  _gpu_existing_instance || return
  _gpu_pending_of "$@" || return 1
  local id IFS=$_gpu_nl
  for id in $_gpu_ids; do
    if [ ! -e "$_gpu_q/held/$id" ]; then _gpu_say "$id is not held"; continue; fi
    command rm -f -- "$_gpu_q/held/$id"
    if [ -e "$_gpu_q/held/$id" ]; then _gpu_err "cannot remove $_gpu_q/held/$id"; return 1; fi
    _gpu_say "released $id"
  done
}

_gpu_cmd_priority() {
  _gpu_parse any "$@" || return "$_gpu_rc"
  set -- "${_gpu_args[@]}"
  if [ "$#" -ne 2 ]; then _gpu_usage; return; fi
  local id text now IFS=$_gpu_nl
  if [ "$2" = top ]; then text=top; else _gpu_priority "$2" || return 2; text=$_gpu_p; fi
  _gpu_existing_instance || return
  _gpu_pending_of "$1" || return 1
  _gpu_prepare priority || return 1
  _gpu_whoami
  now=$(command date +%s.%N)
  for id in $_gpu_ids; do
    _gpu_unique || return 1
    _gpu_put "$_gpu_q/priority/$id" \
      "priority=$text${_gpu_nl}by=$_gpu_who${_gpu_nl}time=$now$_gpu_nl" || return 1
    # claimed meanwhile, it has started: the entry stays (node 0 forgets it), and would order
    # the task again were the task put back into pending/
    if [ ! -e "$_gpu_q/pending/$id" ]; then
      _gpu_err "task $id started before its priority was set"
      return 1
    fi
    _gpu_say "priority of $id: $text"
  done
}

_gpu_pending_list() {  # the pending tasks in the order they start (docs/protocol.md), one a
  # line, into _gpu_v
  local id rest='' IFS=$_gpu_nl
  _gpu_list_names "$_gpu_q/pending"
  # the ids' byte order when no priority/ entry nor a name put there by hand changes it
  _gpu_lines "$_gpu_v"
  if [ "$_gpu_n" -le 64 ]; then
    for id in $_gpu_v; do _gpu_is_id "$id" || { rest=1; break; }; done
  elif printf '%s' "$_gpu_v" | LC_ALL=C command grep -qvE \
      '^[0-9]{3}-[0-9]{8}_[0-9]{6}_[0-9]{9}-[0-9a-f]{8}-[A-Za-z0-9._-]{1,83}$'; then
    rest=1  # (one grep for a long queue: a call of _gpu_is_id a name took 0.3 s for 5,000)
  fi
  if [ -z "$rest" ] && _gpu_no_entries "$_gpu_q/priority"; then return; fi
  _gpu_v=$(_gpu_sorted_pending "$_gpu_v")
  _gpu_v=${_gpu_v:+$_gpu_v$_gpu_nl}
}

_gpu_sorted_pending() {  # _gpu_sorted_pending LIST: the pending tasks of LIST in run order, when
  # priority/ entries or names put there by hand change the ids' byte order. The shell reads the
  # priority/ entries (a few); one awk gives every task its sort key (a queue of thousands)
  local entry name list=$1 entries='' n=0 IFS=$_gpu_nl
  set +f  # the dispatcher's noglob, for the one pattern
  set -- "$_gpu_q/priority"/*
  set -f
  for entry in "$@"; do
    name=${entry##*/}
    case $name in *"$_gpu_nl"*) continue ;; esac  # no line of LIST is this name
    if ! { [ -f "$entry" ] && _gpu_load "$entry" && _gpu_field priority; }; then continue; fi
    if [ "$_gpu_val" = top ]; then
      _gpu_field time
      entries=$entries${_gpu_nl}top$_gpu_fs${_gpu_val//$_gpu_fs/_}$_gpu_fs$name
    elif [ "${#_gpu_val}" -le 3 ] && _gpu_whole "$_gpu_val" 999; then  # as the daemon: 7, 042
      case $_gpu_i in ?) _gpu_i=00$_gpu_i ;; ??) _gpu_i=0$_gpu_i ;; esac  # (no process a task)
      entries=$entries${_gpu_nl}number$_gpu_fs$_gpu_i$_gpu_fs$name
    else continue
    fi
    n=$((n + 1))
  done
  _gpu_awk_ids
  printf '%s\n' "${entries#"$_gpu_nl"}" "$list" | command awk -v n="$n" -v fs="$_gpu_fs" "$_gpu_aw"'
    function seconds(text) {  # as the daemon reads a time: a finite decimal number, else 0
      if (length(text) > 70 || text !~ /^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?$/)
        return 0
      text += 0
      return (text > 1e308 || text < -1e308) ? 0 : sprintf("%.17g", text)
    }
    NR <= n {  # kind, value, name of a priority/ entry
      i = index($0, fs); kind = substr($0, 1, i - 1); rest = substr($0, i + 1)
      i = index(rest, fs); entry[substr(rest, i + 1)] = kind fs substr(rest, 1, i - 1)
      next
    }
    $0 != "" {  # as the daemon orders them (start_order): class, time put on top (the last
      # first), priority, then the id without its priority; a name put there by hand has
      # DEFAULT_PRIORITY and comes after the client ids of its priority
      id = $0; key = ""
      flat = id; gsub(fs, "_", flat)
      rest = is_id(id) ? substr(id, 5) : "~" flat
      if (id in entry) {
        i = index(entry[id], fs); kind = substr(entry[id], 1, i - 1)
        value = substr(entry[id], i + 1)
        key = kind == "top" ? "0" fs seconds(value) fs "000" fs flat : "1" fs "0" fs value fs rest
      }
      if (key == "") key = "1" fs "0" fs (is_id(id) ? substr(id, 1, 3) : "500") fs rest
      print key fs id
    }' | command sort -t "$_gpu_fs" -k1,1 -k2,2gr -k3,3 -k4,4 | command cut -d "$_gpu_fs" -f5-
}

# Commands: stopping and cleaning ###################################################################

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

_gpu_timeout() {  # GPU_REPLY_TIMEOUT in tenths of a second into _gpu_wait; 2 if it is no
  # number of seconds (checked before a command is sent: none is sent then)
  if ! _gpu_whole "${GPU_REPLY_TIMEOUT:-15}" 86400; then
    _gpu_err "GPU_REPLY_TIMEOUT wants whole seconds from 0 to 86400, not '$GPU_REPLY_TIMEOUT'"
    return 2
  fi
  _gpu_wait=$((_gpu_i * 10))
}

_gpu_reply() {  # _gpu_reply U: wait (sharing _gpu_wait) for replies/U.reply, then load it
  local reply=$_gpu_q/replies/$1.reply
  while [ ! -f "$reply" ]; do
    [ "$_gpu_wait" -le 0 ] && return 1
    _gpu_sleep 0.1
    _gpu_wait=$((_gpu_wait - 1))
  done
  _gpu_load "$reply"
  command rm -f -- "$reply"
}

_gpu_silence() {  # why the daemon did not answer, into _gpu_msg: its state, else NFS
  if _gpu_daemon_state && { [ "$_gpu_live" = late ] || [ "$_gpu_live" = dead ]; }; then
    _gpu_msg="the daemon of $JOB_ID is not responding ($_gpu_why; likely $_gpu_cause)"
  else
    _gpu_msg='on NFS, try again with a larger GPU_REPLY_TIMEOUT'
  fi
}

_gpu_answer() {  # _gpu_answer U: the reply to command U, loaded; else withdraw U and return 1
  local cmd=$_gpu_q/commands/$1.cmd away=$_gpu_q/.staging/.$1.withdrawn
  _gpu_reply "$1" && return 0
  # an unanswered command must not wait for a later daemon: take it back
  if _gpu_mv "$cmd" "$away"; then
    command rm -f -- "$away"
    _gpu_wait=3  # unless the daemon read it just before: then its reply is on the way
    _gpu_reply "$1" && return 0
    _gpu_silence
    _gpu_err "no reply from the daemon within ${GPU_REPLY_TIMEOUT:-15} s: the command is" \
      "withdrawn (commands/$1.cmd removed), so no daemon carries it out later; $_gpu_msg"
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

_gpu_cancel_here() {  # _gpu_cancel_here NAME: cancel pending/NAME without a daemon (protocol
  # "Finish"): it becomes failed/<id> (a fresh id unless NAME is a client id without a result),
  # never over an existing file; the id into _gpu_id. 2 when failed/<id> exists, 1 when NAME
  # left pending/ meanwhile, 3 when it cannot be renamed (why into _gpu_msg), 4 when its result
  # cannot be written (said): then it is put back, still pending, else 5 (left in failed/)
  local name=$1 prio
  _gpu_id=$name
  if _gpu_renamed "$name"; then
    _gpu_unique || return 1
    prio=${name%"${name#???}"}
    case $prio in [0-9][0-9][0-9]) ;; *) prio=500 ;; esac
    _gpu_fresh_name "$name"
    _gpu_id=$prio-$_gpu_u-$_gpu_s
  fi
  [ -e "$_gpu_q/failed/$_gpu_id" ] && return 2
  _gpu_msg=$(command mv -n -- "$_gpu_q/pending/$name" "$_gpu_q/failed/$_gpu_id" 2>&1)
  if [ -e "$_gpu_q/pending/$name" ]; then
    [ -e "$_gpu_q/failed/$_gpu_id" ] && return 2
    return 3
  fi
  [ -e "$_gpu_q/failed/$_gpu_id" ] || return 1  # a daemon took it meanwhile
  _gpu_unique || return 0
  _gpu_whoami
  _gpu_put "$_gpu_q/records/$_gpu_id.result" "id=$_gpu_id
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
" && return 0
  # without its result it would read as failed (and gpu_retry --failed would queue it again)
  command mv -n -- "$_gpu_q/failed/$_gpu_id" "$_gpu_q/pending/$name" 2>/dev/null
  [ -e "$_gpu_q/pending/$name" ] && [ ! -e "$_gpu_q/failed/$_gpu_id" ] && return 4
  return 5
}

_gpu_stop_offline() {  # _gpu_stop_offline NAME MATCHES: gpu_stop when no daemon is alive
  local entry name IFS=$_gpu_nl rc=0 count=0
  _gpu_prepare failed records || return 1
  for entry in $2; do
    name=${entry#*/}
    case $entry in
      pending/*)
        _gpu_cancel_here "$name"
        case $? in
          0) if [ "$_gpu_id" = "$name" ]; then _gpu_say "cancelled $name (it was pending)"
            else _gpu_say "cancelled $name as $_gpu_id (it was pending)"; fi
            count=$((count + 1)) ;;
          2) _gpu_err "$name is not cancelled: failed/$_gpu_id exists already (rename or" \
              "remove one of them)"; rc=1 ;;
          3) _gpu_err "cannot cancel $name: it stays pending (${_gpu_msg%%"$_gpu_nl"*})"; rc=1 ;;
          4) _gpu_err "$name is not cancelled: it stays pending"; rc=1 ;;
          5) _gpu_err "$name is in failed/$_gpu_id without a result (it reads as failed):" \
              "move it back into pending/ or remove it"; rc=1 ;;
          *) _gpu_err "$name left pending/ meanwhile (a daemon took it?)"; rc=1 ;;
        esac ;;
      running/*)
        if _gpu_stop_direct "$name"; then
          _gpu_say "stopped $name (the stop went straight to $_gpu_where: SIGTERM, then SIGKILL)"
        else
          _gpu_err "$name is in running/ but its daemon is not alive: a new daemon marks it" \
            "interrupted (and ends what is left of it on that host)"
          rc=1
        fi ;;
    esac
  done
  [ "$1" = all ] && printf 'cancelled %s pending task(s)\n' "$count"
  return "$rc"
}

_gpu_stop_direct() {  # _gpu_stop_direct ID: node 0 is down, so publish the running task's stop
  # record as node 0 would; whichever live node runs it obeys (docs/protocol.md). Its nodes into
  # _gpu_where; 1 when none of them is alive
  local id=$1 nodes='' rank alive='' IFS=,
  if _gpu_load "$_gpu_q/records/$id.gang" && _gpu_field nodes; then nodes=$_gpu_val
  elif _gpu_load "$_gpu_q/records/$id.run" && _gpu_field node_rank; then nodes=$_gpu_val
  fi
  [ -n "$nodes" ] || return 1  # not started: its claimer is not known
  for rank in $nodes; do
    _gpu_whole "$rank" 1023 || continue
    _gpu_load "$_gpu_q/nodes/node-$_gpu_i.state" || continue
    _gpu_liveness
    case $_gpu_live in dead | stopped) ;; *) alive=1 ;; esac
  done
  [ -n "$alive" ] || return 1
  case $nodes in *,*) _gpu_where="nodes $nodes" ;; *) _gpu_where="node $nodes" ;; esac
  [ ! -e "$_gpu_q/records/$id.stop" ] || return 0  # asked already: a record is never rewritten
  _gpu_whoami
  _gpu_put "$_gpu_q/records/$id.stop" "id=$id
reason=stopped by user
sent_by=$_gpu_who
time=$_gpu_epoch
"
}

_gpu_cmd_stop() {
  _gpu_parse any "$@" || return "$_gpu_rc"
  set -- "${_gpu_args[@]}"
  if [ "$#" -eq 0 ]; then _gpu_usage; return; fi
  _gpu_existing_instance || return
  local name=$1 matches='' running='' entry sent='' u count rc=0 IFS=$_gpu_nl
  if [ "$#" -gt 1 ]; then
    for name in "$@"; do
      [ "$name" != all ] || { _gpu_err "'all' stands alone: gpu_stop all"; return 2; }
    done
    name=$1
  fi
  if [ "$name" = all ]; then
    for entry in $(_gpu_ls "$_gpu_q/pending"); do  # a task is a file: links, FIFOs, folders stay
      [ -f "$_gpu_q/pending/$entry" ] && [ ! -h "$_gpu_q/pending/$entry" ] \
        && matches=${matches}pending/$entry$_gpu_nl
    done
    matches=$matches$(_gpu_ls "$_gpu_q/running" | command sed 's|^|running/|')
  else
    for name in "$@"; do  # every name is checked before anything is asked
      _gpu_check_name "$name" || return
      if ! _gpu_find "$name" pending running; then
        if _gpu_find "$name" 'done' failed; then
          _gpu_err "task $name is no longer pending or running: it has finished"
        else
          _gpu_err "no such task: $name (gpu_status lists the tasks)"
        fi
        [ "$#" -eq 1 ] || _gpu_err "nothing was stopped"
        return 1
      fi
      for entry in $_gpu_val; do  # two names may name one task: it is asked for once
        case $_gpu_nl$matches$running in *"$_gpu_nl$entry$_gpu_nl"*) continue ;; esac
        case $entry in
          running/*) running=$running$entry$_gpu_nl ;;
          *) matches=$matches$entry$_gpu_nl ;;
        esac
      done
    done
    # the pending ones first: a slot that a stop frees must not start one of them meanwhile
    matches=$matches$running name=$1
  fi
  if ! _gpu_daemon_alive; then
    _gpu_nodes
    count=${_gpu_val%%/*}
    _gpu_daemon_state || :  # node 0's liveness again: _gpu_nodes read every node's
    if [ "$count" != 0 ] && [ "$count" != - ]; then  # node 0 is down, not all of them
      _gpu_err "node 0 of $JOB_ID, which takes the commands, is not alive" \
        "(${_gpu_why:-$_gpu_live}): pending tasks are cancelled here, and running ones are" \
        "stopped through their stop records"
    else
      case $_gpu_live in
        stopped) _gpu_err "the daemon of $JOB_ID has stopped: only pending tasks can be cancelled" ;;
        dead) _gpu_err "no daemon is alive for $JOB_ID ($_gpu_why; likely $_gpu_cause): only" \
          "pending tasks can be cancelled" ;;
        *) _gpu_err "no daemon is alive for $JOB_ID: only pending tasks can be cancelled" ;;
      esac
    fi
    _gpu_stop_offline "$name" "$matches"
    return
  fi
  _gpu_timeout || return
  [ "$_gpu_live" != late ] || _gpu_err "the daemon of $JOB_ID is not responding ($_gpu_why;" \
    "likely $_gpu_cause): asking it all the same"
  if [ "$name" = all ]; then
    _gpu_send stop_all || return 1
    sent=$_gpu_u
  else
    for entry in $matches; do
      _gpu_send stop "${entry#*/}" || return 1
      sent=$sent$_gpu_u$_gpu_nl
    done
  fi
  for u in $sent; do
    _gpu_answer "$u" || { rc=1; continue; }
    _gpu_field result
    case $_gpu_val in
      stopped) _gpu_field task; u=$_gpu_val
        _gpu_field message; _gpu_say "stopped $u ($_gpu_val)" ;;
      cancelled) _gpu_field task; _gpu_say "cancelled $_gpu_val (it was pending)" ;;
      not_found) _gpu_field task
        _gpu_err "$_gpu_val is neither pending nor running any more (it has just finished)"
        rc=1 ;;
      ok) _gpu_field cancelled_count; count=${_gpu_val:-0}
        _gpu_say "cancelled $count pending task(s)"
        _gpu_field stopped
        if [ -n "$_gpu_val" ]; then
          _gpu_say "stopped $_gpu_val"
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

_gpu_cmd_clean() {
  _gpu_parse any "$@" || return "$_gpu_rc"
  if [ "${#_gpu_args[@]}" -gt 0 ]; then _gpu_usage; return; fi
  local keep=0 older=0 whole frac line end dir id n=0 kept=0 stage list moved='' total=0
  local needed waited=0 real IFS=$_gpu_nl
  if [ -n "$_gpu_o_keep" ]; then
    _gpu_whole "$_gpu_o_keep" 99999999 || {
      _gpu_err "--keep wants a number of tasks, not '$_gpu_o_keep'"; return 2; }
    keep=$_gpu_i
  fi
  if [ -n "$_gpu_o_older" ]; then
    case $_gpu_o_older in
      '' | *[!0-9.]* | .* | *. | *.*.*)
        _gpu_err "--older-than wants a number of days, not '$_gpu_o_older'"; return 2 ;;
    esac
    whole=${_gpu_o_older%%.*} frac=00000
    case $_gpu_o_older in *.*) frac=${_gpu_o_older#*.}00000 ;; esac
    _gpu_whole "$whole" 100000 || { _gpu_err "--older-than: too many days"; return 2; }
    whole=$_gpu_i
    _gpu_int "${frac:0:5}"
    older=$((whole * 86400 + _gpu_i * 86400 / 100000))
  fi
  # _gpu_instance checked that no folder is a link; it removes by names from inside each
  # folder (_gpu_in_folder), so that one swapped for a link since leads nothing elsewhere
  _gpu_existing_instance || return
  _gpu_now
  # every finished task with the time it ended (its result's, else its own), newest first
  list=$({
    command find "$_gpu_q/records" -maxdepth 1 -type f -name '*.result' -printf '%f/R/%T@\n' \
      2>/dev/null | command sed 's|\.result/R/|/R/|'
    command find "$_gpu_q/done" "$_gpu_q/failed" -maxdepth 1 -type f -printf '%f/T/%T@/%h\n' \
      2>/dev/null
  } | command sort -t/ -k1,1 -k2,2 | {
    id='' end=''
    while IFS=/ read -r line kind when dir; do
      if [ "$kind" = R ]; then id=$line end=$when; continue; fi
      [ "$id" = "$line" ] || end=$when
      printf '%s %s/%s\n' "${end%%.*}" "${dir##*/}" "$line"
    done
  } | command sort -rn)
  # the results that pending tasks wait for (--after) stay: their ids, one a line
  needed=$_gpu_nl$(for id in $(_gpu_ls "$_gpu_q/pending"); do
    line=$_gpu_q/records/$id.submit
    if [ -f "$line" ] && [ ! -L "$line" ]; then  # (sed would block on a FIFO)
      command sed -n 's/^after=//p' "$line" 2>/dev/null
    fi
  done | command tr ' ' '\n')$_gpu_nl
  stage=''
  for line in $list; do
    total=$((total + 1))
    end=${line%% *} line=${line#* }
    case $needed in
      *"$_gpu_nl${line#*/}$_gpu_nl"*) waited=$((waited + 1)); continue ;;
    esac
    if [ "$kept" -lt "$keep" ]; then kept=$((kept + 1)); continue; fi
    [ "$older" -eq 0 ] || [ "$end" -le "$((_gpu_t - older))" ] || { kept=$((kept + 1)); continue; }
    moved=$moved$end' '$line$_gpu_nl
  done
  [ "$waited" -eq 0 ] || _gpu_err "kept $waited finished task(s) that pending tasks wait for (--after)"
  if [ -z "$moved" ]; then
    _gpu_say "nothing to remove: $total finished task(s) in $JOB_ID, all kept"
    return 0
  fi
  if [ -z "$_gpu_o_dry" ]; then
    # out of done/ and failed/ first, in one move: then records and logs; a task renamed
    # meanwhile (back into pending/) is not moved, and keeps its records
    _gpu_prepare || return 1
    _gpu_unique || return 1
    real=$(_gpu_cd "$_gpu_q" && builtin pwd -P) || { _gpu_err "cannot enter $_gpu_q"; return 1; }
    stage=$real/.staging/.clean-$_gpu_u
    command mkdir -- "$stage" || { _gpu_err "cannot create $stage"; return 1; }
    for dir in 'done' failed; do
      for line in $moved; do
        line=${line#* }
        [ "${line%%/*}" != "$dir" ] || printf '%s\0' "${line#*/}"
      done | _gpu_in_folder "$real" "$dir" mv -t "$stage" -- 2>/dev/null
    done
  fi
  for line in $moved; do
    end=${line%% *} line=${line#* } id=${line#*/}
    if [ -n "$stage" ]; then [ -e "$stage/$id" ] || continue; fi
    n=$((n + 1))
    _gpu_age "$end"
    if [ -n "$stage" ]; then _gpu_say "removed $line (ended $_gpu_d ago)"
    else _gpu_say "would remove $line (ended $_gpu_d ago)"; fi
  done
  if [ -n "$stage" ]; then
    list=$_gpu_nl$(_gpu_ls "$stage")$_gpu_nl
    for dir in records logs; do
      {
        for id in $(_gpu_ls "$stage"); do
          if [ "$dir" = logs ]; then printf '%s\0' "$id.log"; continue; fi
          for line in submit run result stop gang retried; do printf '%s\0' "$id.$line"; done
        done
        for line in $(command find "$_gpu_q/$dir" -maxdepth 1 -type f -name '*.rank[0-9]*' \
          -printf '%f\n' 2>/dev/null); do
          id=${line%.rank[0-9]*}
          case $list in *"$_gpu_nl$id$_gpu_nl"*) printf '%s\0' "$line" ;; esac
        done
      } | _gpu_in_folder "$real" "$dir" rm -f --
    done
    command rm -rf -- "$stage"
    _gpu_say "removed $n finished task(s) of $JOB_ID; kept $((total - n))"
  else
    _gpu_say "would remove $n finished task(s) of $JOB_ID; keep $kept"
  fi
}

_gpu_in_folder() {  # _gpu_in_folder REAL DIR CMD...: CMD on the NUL-separated names that
  # come in, run by xargs from inside the instance's folder DIR, entered with cd -P, when it is
  # REAL/DIR itself (REAL: the instance's own path): a folder swapped for a link since the
  # check leads nothing elsewhere, and once inside, a swap no longer matters
  local real=$1 dir=$2
  shift 2
  (
    _gpu_cd "$_gpu_q/$dir" && [ "$PWD" = "$real/$dir" ] || exit 1
    command xargs -0 -r "$@"
  )
}

_gpu_cluster_job() {  # print the cluster job from job_id.txt and how to delete it
  local backend job extra
  if ! _gpu_load "$_gpu_q/job_id.txt"; then
    _gpu_say "No job_id.txt in $_gpu_q: the daemon was not started with submit.sh."
    printf 'If it runs as a cluster job, delete that job to release the GPUs.\n'
    return 0
  fi
  _gpu_field backend; backend=$_gpu_val
  _gpu_field cluster_job_id; job=$_gpu_val
  _gpu_say "Cluster job: ${job:-unknown} (${backend:-unknown backend})"
  case $backend in
    sco)
      _gpu_field profile; extra=${_gpu_val:+--profile=$_gpu_val }
      _gpu_field workspace
      printf 'Delete it to release the GPUs:\n'
      _gpu_say "  sco ${extra}acp jobs delete --workspace-name=${_gpu_val:-WORKSPACE} $job" ;;
    slurm) printf 'Delete it to release the GPUs:\n'; _gpu_say "  scancel $job" ;;
    local)
      _gpu_field host; extra=${_gpu_val:+ (on $_gpu_val)}
      _gpu_field pid; [ -n "$_gpu_val" ] || _gpu_val=${job#local-}
      _gpu_say "It ends with the daemon; if it does not$extra:"
      _gpu_say "  kill $_gpu_val" ;;
  esac
  return 0
}

_gpu_cmd_drain() {
  _gpu_parse any "$@" || return "$_gpu_rc"
  local reason rank IFS=' '
  reason="${_gpu_args[*]}"
  case $reason in *"$_gpu_nl"*) _gpu_err "the reason must be one line"; return 2 ;; esac
  _gpu_existing_instance || return
  _gpu_drain_ranks || return
  _gpu_prepare || return 1
  _gpu_unique || return 1
  _gpu_whoami
  for rank in ${_gpu_ranks:--}; do
    _gpu_put "$_gpu_q/drain${rank#-}" "by=$_gpu_who
reason=$reason
time=$_gpu_epoch
" || return 1
    if [ "$rank" = - ]; then
      _gpu_say "drained $JOB_ID: running tasks go on, nothing new starts until gpu_resume"
    else
      _gpu_say "drained node ${rank#.node-} of $JOB_ID: its running tasks go on, it starts \
nothing new until gpu_resume --node ${rank#.node-}"
    fi
  done
}

_gpu_cmd_resume() {
  _gpu_parse any "$@" || return "$_gpu_rc"
  if [ "${#_gpu_args[@]}" -gt 0 ]; then _gpu_usage; return; fi
  local rank what IFS=' '
  _gpu_existing_instance || return
  _gpu_drain_ranks || return
  for rank in ${_gpu_ranks:--}; do
    what=$JOB_ID; [ "$rank" = - ] || what="node ${rank#.node-} of $JOB_ID"
    if [ ! -e "$_gpu_q/drain${rank#-}" ] && [ ! -L "$_gpu_q/drain${rank#-}" ]; then
      _gpu_say "$what is not drained"
      continue
    fi
    command rm -f -- "$_gpu_q/drain${rank#-}" 2>/dev/null
    if [ -e "$_gpu_q/drain${rank#-}" ] || [ -L "$_gpu_q/drain${rank#-}" ]; then
      _gpu_err "cannot remove $_gpu_q/drain${rank#-}: $what stays drained"
      return 1
    fi
    _gpu_say "resumed $what: tasks start again"
  done
}

_gpu_drain_ranks() {  # the --node ranks of gpu_drain and gpu_resume, checked, into _gpu_ranks
  # (" .node-0 .node-3", the suffixes of their drain files; empty without --node)
  local rank IFS=$_gpu_nl
  _gpu_ranks=''
  # shellcheck disable=SC2154  # _gpu_parse sets the _gpu_o_* variables
  for rank in $_gpu_o_node; do
    if ! _gpu_whole "$rank" 1023 || [ ! -e "$_gpu_q/nodes/node-$_gpu_i.state" ]; then
      _gpu_esc "$rank"
      _gpu_err "$JOB_ID has no node '$_gpu_e' (gpu_status lists its nodes; none until a daemon \
started)"
      return 2
    fi
    case "$_gpu_ranks " in *" .node-$_gpu_i "*) ;; *) _gpu_ranks="$_gpu_ranks .node-$_gpu_i" ;; esac
  done
}

_gpu_drain_note() {  # _gpu_drain_note [RANK]: is the instance (node RANK) drained? its by,
  # reason and time into _gpu_dr_*, and one line about it into _gpu_val
  local file=$_gpu_q/drain${1:+.node-$1}
  _gpu_val='' _gpu_dr_by='' _gpu_dr_reason='' _gpu_dr_time=''
  [ -e "$file" ] || [ -L "$file" ] || return 1
  if [ -f "$file" ] && [ ! -L "$file" ] && _gpu_load "$file"; then
    _gpu_field by; _gpu_dr_by=$_gpu_val  # as written: _gpu_line escapes what it prints
    _gpu_field reason; _gpu_dr_reason=$_gpu_val
    _gpu_field time; _gpu_int "${_gpu_val%%.*}" && _gpu_dr_time=$_gpu_i
  fi
  _gpu_val="drained${_gpu_dr_by:+ by $_gpu_dr_by}"
  [ -z "$_gpu_dr_time" ] || _gpu_val="$_gpu_val since $(_gpu_date "$_gpu_dr_time")"
  _gpu_val="$_gpu_val${_gpu_dr_reason:+: $_gpu_dr_reason}"
}

_gpu_cmd_shutdown() {
  _gpu_parse any "$@" || return "$_gpu_rc"
  if [ "${#_gpu_args[@]}" -gt 0 ]; then _gpu_usage; return; fi
  _gpu_existing_instance || return
  local rc=0
  if ! _gpu_daemon_alive; then
    _gpu_err "no daemon is alive for $JOB_ID${_gpu_why:+ ($_gpu_why)}: nothing to shut down"
    rc=1
  else
    _gpu_timeout || return
    _gpu_send shutdown || return 1
    if ! _gpu_answer "$_gpu_u"; then
      rc=1
    elif _gpu_field result && [ "$_gpu_val" = accepted ]; then
      printf 'The daemon of %s is shutting down: it stops the running tasks and exits;\n' \
        "$JOB_ID"
      printf 'pending tasks stay queued for the next daemon.\n'
    else
      _gpu_field message; _gpu_err "the daemon answered: ${_gpu_val:-an error}"
      rc=1
    fi
  fi
  _gpu_cluster_job
  return "$rc"
}

# Tab completion ####################################################################################

_gpu_cmd_complete() {  # _gpu_cmd_complete COMMAND WORD WORDS...: candidates for WORD, one a
  # line; WORDS are the words between the command and WORD
  local what=${1#gpu_} word=${2-} line short long name positional=0 takes='' id
  local IFS=$_gpu_nl
  shift 2
  _gpu_spec "$what" || return 0
  for line in "$@"; do  # how many arguments are there before WORD, and is WORD an option's?
    if [ -n "$takes" ]; then takes=''; continue; fi
    case $line in
      --) positional=$((positional + 100)) ;;
      -?*)
        for short in $_gpu_sp_opts; do
          long=${short#*|}; long=${long%%|*}; name=${short#*|*|}; name=${name%%|*}
          short=${short%%|*}
          if [ "$line" = "$long" ] || { [ -n "$short" ] && [ "$line" = "$short" ]; }; then
            [ -z "$name" ] || takes=$line
          fi
        done ;;
      *) positional=$((positional + 1)) ;;
    esac
  done
  if [ -n "$takes" ]; then
    case $takes in
      --after) what='wait' ;;
      -g | --gpus) printf 'all\n'; return 0 ;;
      -n | --nodes) [ "$what" = logs ] || [ "$what" = tail ] || printf 'all\n'; return 0 ;;
      *) return 0 ;;
    esac
  else
    case $word in
      -*)
        { for line in $_gpu_sp_opts '-h|--help'; do
            short=${line%%|*} long=${line#*|}; long=${long%%|*}
            [ -z "$short" ] || printf '%s\n' "$short"
            printf '%s\n' "$long"
          done; } | command sort -u
        return 0 ;;
    esac
    case $what in
      help) [ "$positional" -eq 0 ] || return 0
        IFS=" $_gpu_nl"
        # shellcheck disable=SC2086  # one word a command (globbing is off)
        printf '%s\n' $_gpu_commands
        return 0 ;;
      use) [ "$positional" -eq 0 ] || return 0 ;;
      show | logs | tail) [ "$positional" -eq 0 ] || return 0 ;;
      wait | stop | retry | hold | release) ;;
      priority)  # NAME PRIORITY|top
        case $positional in 0) ;; 1) printf 'top\n'; return 0 ;; *) return 0 ;; esac ;;
      *) return 0 ;;
    esac
  fi
  _gpu_root_value 2>/dev/null && [ -d "$_gpu_r" ] || return 0
  if [ "$what" = use ]; then
    _gpu_instances
    return 0
  fi
  _gpu_valid_id "${JOB_ID-}" || return 0
  _gpu_q=$_gpu_r/$JOB_ID
  _gpu_awk_ids  # each id and its name; by awk: a long history has as many
  local with_ids=''
  case $word in [0-9]*) with_ids=1 ;; esac  # a word that starts as an id does: ids of the logs
  {
    [ "$what" = stop ] && [ "$positional" -eq 0 ] && printf 'all\n'
    {
      # gpu_retry takes ended tasks only: those in done/ and failed/
      case $what in hold | release | priority | retry) ;; *) _gpu_ls "$_gpu_q/running" ;; esac
      case $what in retry) _gpu_ls "$_gpu_q/done"; _gpu_ls "$_gpu_q/failed" ;;
        *) _gpu_ls "$_gpu_q/pending" ;; esac
    } | command awk "$_gpu_aw"'{ print; print short($0) }'
    case $what in
      stop | hold | release | priority | retry) ;;
      *)  # the tasks of the logs (a log of rank N is its task's: _gpu_log_rank)
        _gpu_ls "$_gpu_q/logs" | command awk -v ids="$with_ids" "$_gpu_aw"'
          {
            id = $0; sub(/\.log$/, "", id)
            if ((i = match(id, /\.rank[0-9]*$/)) > 0) id = substr(id, 1, i - 1)
            if (ids != "") print id
            print short(id)
          }' ;;
    esac
  } | command sort -u
}

_gpu_complete_bash() {
  local line
  COMPREPLY=()
  while IFS= read -r line; do
    case $line in "${COMP_WORDS[COMP_CWORD]-}"*) COMPREPLY+=("$line") ;; esac
  done < <(_gpu_main complete "${COMP_WORDS[0]-}" "${COMP_WORDS[COMP_CWORD]-}" \
    "${COMP_WORDS[@]:1:COMP_CWORD-1}")
}

_gpu_complete_zsh() {
  emulate -L zsh  # the user's options (ksh_arrays, ...) stay out of this function
  local line
  local -a items
  while IFS= read -r line; do items+=("$line"); done \
    < <(_gpu_main complete "${words[1]-}" "${PREFIX-}" "${words[@]:1:$((CURRENT - 2))}")
  if (( ${#items} )); then
    compadd -a items
  elif [[ ${words[1]-} = gpu_submit ]]; then
    _files
  fi
}

# every command of the list (its words are plain names); a file may follow gpu_submit and gpu_run
_gpu_command_list
_gpu_here="gpu_${_gpu_commands// / gpu_}"
if [ -n "${ZSH_VERSION-}" ]; then
  if command -v compdef >/dev/null 2>&1; then
    eval "compdef _gpu_complete_zsh $_gpu_here"
  fi
elif command -v complete >/dev/null 2>&1; then
  eval "complete -F _gpu_complete_bash $_gpu_here"
  complete -o default -F _gpu_complete_bash gpu_submit gpu_run
fi
unset _gpu_here _gpu_commands

if [ -n "${_gpu_restore_options-}" ]; then eval "$_gpu_restore_options"; fi
unset _gpu_restore_options

"""The client's commands from one list: every public command is completed in bash and zsh, and
gpu_help offers and lists each; gpu_retry takes exactly the options of what a task asks for
(priority, GPUs, nodes, time, environment) and --failed, never how it is ordered or named."""

from __future__ import annotations

import re

import pytest
from client_helpers import SHELLS, Shell, build_sample, make_shell

RETRY_OPTIONS = ["--env", "--failed", "--gpus", "--help", "--nodes", "--priority", "--time", "-e",
                 "-g", "-h", "-n", "-p", "-t"]


@pytest.fixture(params=SHELLS)
def sh(request, tmp_path) -> Shell:
    return make_shell(request.param, tmp_path)


PUBLIC = {  # the public functions, then the commands completion knows and gpu_help's
    "bash": r"""
declare -F | command sed -n 's/^declare -f \(gpu_[a-z_]*\)$/\1/p' | command sort | xargs echo
for f in $(declare -F | command sed -n 's/^declare -f \(gpu_[a-z_]*\)$/\1/p'); do
  complete -p "$f" | command sed 's/.* -F \([^ ]*\) .*/\1/'
done | command sort -u | xargs echo
c() { COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _gpu_complete_bash
      echo "${COMPREPLY[*]}"; }
c gpu_help ''
""",
    "zsh": r"""
print -r -- ${(o)${(k)functions[(I)gpu_*]}}
for f in ${(k)functions[(I)gpu_*]}; do print -r -- $_comps[$f]; done | sort -u | xargs echo
compadd() { print -r -- "${(P)2}"; }
c() { words=("$@"); CURRENT=$#; PREFIX=${words[CURRENT]}; _gpu_complete_zsh; }
c gpu_help ''
""",
}


def test_completion_offers_every_command(sh):
    build_sample(sh.root)
    prelude = "autoload -Uz compinit && compinit -u -D\n" if sh.name == "zsh" else ""
    res = sh.run(prelude + 'source "$CLIENT"\n' + PUBLIC[sh.name], source=False)
    assert res.rc == 0, res.err
    functions, completers, offered = res.out.splitlines()
    commands = functions.split()
    assert len(commands) == 19 and "gpu_help" in commands and "gpu_retry" in commands
    assert completers == f"_gpu_complete_{sh.name}"  # each one completed, by the client
    assert sorted(offered.split()) == sorted(c.removeprefix("gpu_") for c in commands)
    listed = re.findall(r"^  (gpu_\w+)", sh.run("gpu_help").out, re.M)
    assert sorted(listed) == commands
    assert listed == [f"gpu_{c}" for c in offered.split()]  # in one order


def test_retry_accepts_exactly_its_options(sh):
    s = build_sample(sh.root)
    help_text = sh.run("gpu_retry --help").out
    shown = sorted({word for line in help_text.splitlines() if line.startswith("  -")
                    for word in re.findall(r"(?<![\w-])(--?[a-z]+)", line.split("  ")[1])})
    assert shown == RETRY_OPTIONS, help_text
    script = {
        "bash": "c() { COMP_WORDS=(\"$@\"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); "
                "_gpu_complete_bash; echo \"${COMPREPLY[*]}\"; }\nc gpu_retry -\n",
        "zsh": "compadd() { print -r -- \"${(P)2}\"; }\nc() { words=(\"$@\"); CURRENT=$#; "
               "PREFIX=${words[CURRENT]}; _gpu_complete_zsh; }\nc gpu_retry -\n",
    }[sh.name]
    assert sh.run(script).out.split() == RETRY_OPTIONS
    for refused in ("--after prep.py", "--name other", "-l", "--json"):
        res = sh.run(f"gpu_retry {refused} prep.py; echo \"rc=$?\"")
        assert res.out.endswith("rc=1\n") or res.out.endswith("rc=2\n"), (refused, res)
        assert "unknown option" in res.err, (refused, res.err)
    assert sorted(p.name for p in (s.inst / "pending").iterdir()) == sorted(s.pending)
    res = sh.run("gpu_retry -p 7 -g 0 -n 1 -t 1h -e A=b prep.py")
    assert res.rc == 0, res.err
    assert re.fullmatch(r"Submitted 007-\S+-prep\.py\n", res.out), res.out


def test_retry_completes_the_ended_tasks_only(sh):
    """gpu_retry takes a task that ended (done or failed): completion offers those, never a
    pending or running one, which it would refuse."""
    inst = sh.root / "exp1"
    for folder in ("pending", "running", "done", "failed", "logs"):
        (inst / folder).mkdir(parents=True, exist_ok=True)
    ids = {state: f"500-20260101_00000{n}_000000000-0000000{n}-{state}.sh"
           for n, state in enumerate(("pending", "running", "done", "failed"), start=1)}
    for state, task_id in ids.items():
        (inst / state / task_id).write_text("echo\n")
        (inst / "logs" / f"{task_id}.log").write_text("")
    res = sh.run("_gpu_main complete gpu_retry ''; echo end")
    assert res.rc == 0, res.err
    assert res.out == "\n".join(sorted([ids["done"], ids["failed"], "done.sh", "failed.sh"])) \
        + "\nend\n"


def test_logs_of_every_rank_complete_as_their_task(sh):
    """A task across nodes has a log a rank (ID.rank<N>.log): completion offers its name, and
    its id to a word that starts as an id does, once whatever the ranks; another file in logs/
    is offered as it is named."""
    inst = sh.root / "exp1"
    for folder in ("pending", "running", "done", "failed", "logs"):
        (inst / folder).mkdir(parents=True, exist_ok=True)
    gang = "500-20260101_000001_000000000-00000001-dist.py"
    for rank in (0, 1, 12):
        (inst / "logs" / f"{gang}.rank{rank}.log").write_text("")
    (inst / "logs" / "by-hand.txt").write_text("")
    res = sh.run("_gpu_main complete gpu_tail 5; echo; _gpu_main complete gpu_show d; echo end")
    assert res.rc == 0, res.err
    assert res.out == f"{gang}\nby-hand.txt\ndist.py\n\nby-hand.txt\ndist.py\nend\n", res.out

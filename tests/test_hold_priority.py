"""Holding pending tasks (gpu_hold, gpu_release) and changing their priority (gpu_priority):
the order they start in, their dependants, and a start that races with the change."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
from client_helpers import INSTALLED, SHELLS, Shell, make_shell, submitted_id, wait_finished
from conftest import REPO, UNSHARE, needs_namespace, read_fields

import perpetual_motion as pm

sys.path.insert(0, str(REPO / "bench"))
from status_bench import summarise  # noqa: E402


@pytest.fixture(params=SHELLS)
def sh(request, tmp_path) -> Shell:
    return make_shell(request.param, tmp_path)


def task(n: int, priority: str = "500", name: str = "t.sh") -> str:
    return f"{priority}-20270101_000000_{n:09d}-0000000{n % 10}-{name}"


def test_start_order_takes_the_priority_overrides():
    a, b, c = task(1), task(2), task(3, "100")
    pending = [c, a, b, "by-hand.sh"]
    assert sorted(pending, key=lambda n: pm.start_order(n, {})) == [c, a, b, "by-hand.sh"]
    overrides = {b: {"priority": "050"}, a: {"priority": "top", "time": "10.5"},
                 "by-hand.sh": {"priority": "top", "time": "11"}}
    # the last one put on top first; then priorities (the override's, else the id's)
    assert sorted(pending, key=lambda n: pm.start_order(n, overrides)) == [
        "by-hand.sh", a, b, c]
    # put there by hand: DEFAULT_PRIORITY, after the client ids of it, before larger numbers
    late = task(4, "600")
    assert sorted([late, "by-hand.sh", b, c], key=lambda n: pm.start_order(n, {})) == [
        c, b, "by-hand.sh", late]
    bad = {b: {"priority": "high"}}  # unreadable: the id's own priority
    assert sorted([a, b], key=lambda n: pm.start_order(n, bad)) == [a, b]


def pending_rows(out: str) -> list[tuple[str, str, str]]:
    return re.findall(r"^(\S+) +(\S+) (pending|held) ", out, re.M)


def test_hold_release_and_priority_complete_the_pending_tasks(sh):
    """Tab completion: gpu_hold, gpu_release and gpu_priority offer the pending tasks (ids and
    names), never a running or finished one; gpu_priority's second word is "top"."""
    inst = sh.root / "exp1"
    for folder in ("pending", "running", "done", "logs"):
        (inst / folder).mkdir(parents=True, exist_ok=True)
    first, second = task(1), task(2, "100", "u.sh")
    for name in (first, second):
        (inst / "pending" / name).write_text("echo\n")
    (inst / "running" / task(3, name="run.sh")).write_text("echo\n")
    (inst / "done" / task(4, name="old.sh")).write_text("echo\n")
    (inst / "logs" / f"{task(4, name='old.sh')}.log").write_text("old\n")
    res = sh.run("for c in gpu_hold gpu_release gpu_priority; do _gpu_main complete $c ''; "
                 "echo; done; _gpu_main complete gpu_priority t.sh ''; "
                 "_gpu_main complete gpu_priority t.sh 5 ''; echo end")
    assert res.rc == 0, res.err
    offered = "\n".join(sorted([first, second, "t.sh", "u.sh"]))
    assert res.out == f"{offered}\n\n" * 3 + "top\nend\n"


def test_hold_release_and_priority_from_the_client(sh):
    ids = [submitted_id(sh.run(f"gpu_run --name job{n} 'echo {n}'")) for n in range(3)]
    inst = sh.root / "exp1"
    res = sh.run("gpu_hold job1")
    assert (res.rc, res.out, res.err) == (0, f"held {ids[1]}\n", "")
    assert read_fields(inst / "held" / ids[1])["by"]
    assert pending_rows(sh.run("gpu_status").out) == [
        ("job0", "500", "pending"), ("job1", "500", "held"), ("job2", "500", "pending")]
    assert '"state": "held"' in sh.run("gpu_status --json").out
    res = sh.run("gpu_priority job2 100 && gpu_priority job1 top")
    assert res.rc == 0, res.err
    assert res.out == f"priority of {ids[2]}: 100\npriority of {ids[1]}: top\n"
    assert pending_rows(sh.run("gpu_status").out) == [
        ("job1", "top", "held"), ("job2", "100", "pending"), ("job0", "500", "pending")]
    assert sorted(os.listdir(inst / "pending")) == ids  # the ids stay as they were
    res = sh.run("gpu_release job1; gpu_release job1")
    assert res.out == f"released {ids[1]}\n{ids[1]} is not held\n"
    assert not (inst / "held" / ids[1]).exists()
    before = {p: p.read_bytes() for p in inst.rglob("*") if p.is_file()}
    for script, rc, err in (
            ("gpu_hold job0 nosuch", 1, "gpu_hold: no such task: nosuch (gpu_status lists the "
                                        "tasks)\ngpu_hold: nothing was changed\n"),
            ("gpu_priority job0 1000", 2, "gpu_priority: PRIORITY must be a number from 0 to 999 "
                                          "(smaller runs first): '1000'\n"),
            ("gpu_priority job0", 2, None), ("gpu_hold", 2, None)):
        res = sh.run(script)
        assert res.rc == rc, (script, res)
        if err is not None:
            assert res.err == err
    assert {p: p.read_bytes() for p in inst.rglob("*") if p.is_file()} == before


def test_a_priority_given_as_the_task_starts_says_it_started(sh):
    """The daemon claims the task just as gpu_priority publishes its priority: the priority no
    longer changes anything, and gpu_priority says the task started, as gpu_hold does."""
    ids = [submitted_id(sh.run(f"gpu_run --name job{n} 'echo {n}'")) for n in range(2)]
    inst = sh.root / "exp1"
    (inst / "running").mkdir(exist_ok=True)
    copy = ("functions[_gpu_put_real]=$functions[_gpu_put]" if sh.name == "zsh"
            else 'eval "$(declare -f _gpu_put | sed 1s/_gpu_put/_gpu_put_real/)"')
    res = sh.run(f"""{copy}
_gpu_put() {{  # the daemon claims job1 as its priority is published
  _gpu_put_real "$@" || return
  case $1 in */priority/*) command mv "$Q/pending/${{1##*/}}" "$Q/running/${{1##*/}}" ;; esac
}}
gpu_priority job1 top
""", Q=str(inst))
    assert (res.rc, res.out) == (1, ""), res
    assert res.err == f"gpu_priority: task {ids[1]} started before its priority was set\n"
    res = sh.run("gpu_priority job0 top")
    assert (res.rc, res.out) == (0, f"priority of {ids[0]}: top\n"), res


@needs_namespace
@pytest.mark.parametrize("shell", INSTALLED)
def test_a_held_task_waits_with_its_dependants_and_a_new_priority_orders_the_starts(
        shell, tmp_path, start_daemon):
    sh = make_shell(shell, tmp_path)
    inst = sh.root / "exp1"
    first = submitted_id(sh.run("gpu_run --name first 'echo first'"))
    after = submitted_id(sh.run("gpu_run --name after --after first 'echo after'"))
    others = [submitted_id(sh.run(f"gpu_run --name other{n} 'echo {n}'")) for n in range(3)]
    assert sh.run("gpu_hold first && gpu_priority other2 top && gpu_priority other1 400").rc == 0
    start_daemon(sh.root, "exp1")
    for tid in others:
        assert wait_finished(inst, tid) == "done"
    started = {tid: float(read_fields(inst / "records" / f"{tid}.result")["started"])
               for tid in others}
    assert sorted(others, key=started.get) == [others[2], others[1], others[0]]
    time.sleep(1)  # the daemon had its turns: the held task and its dependant still wait
    assert sorted(os.listdir(inst / "pending")) == sorted([first, after])
    assert sh.run("gpu_release first").rc == 0
    assert wait_finished(inst, first) == "done"
    assert wait_finished(inst, after) == "done"  # its dependency still named by its id


@needs_namespace
def test_holds_and_priorities_racing_with_starts_never_lose_or_repeat_a_task(
        tmp_path, start_daemon):
    sh = make_shell(INSTALLED[0], tmp_path)
    inst = sh.root / "exp1"
    ids = [submitted_id(sh.run(f"gpu_run --name race{n} 'echo {n}'")) for n in range(24)]
    start_daemon(sh.root, "exp1", "--gpus", "4")
    churn = "; ".join(f"gpu_hold race{n}; gpu_priority race{n} top; gpu_release race{n}"
                      for n in range(24))
    res = sh.run(f"{churn}; {churn}; true", timeout=120)
    assert res.rc == 0
    assert sh.run("for n in $(seq 0 23); do gpu_release race$n; done; true").rc == 0
    for tid in ids:
        wait_finished(inst, tid, timeout=60)
    assert sorted(os.listdir(inst / "done")) == sorted(ids)
    for tid in ids:  # each one ran once
        log = (inst / "logs" / f"{tid}.log").read_text()
        assert log.count("[perpetual-motion] task: ") == 1, log
        assert read_fields(inst / "records" / f"{tid}.result").get("attempt", "1") == "1"
    assert not (inst / "running").exists() or os.listdir(inst / "running") == []


def test_help_lists_the_new_commands(sh):
    res = sh.run("gpu_help")
    for command in ("gpu_hold", "gpu_release", "gpu_priority"):
        assert re.search(rf"^ *{command} ", res.out, re.M), res.out
    assert sh.run("gpu_priority --help").out.startswith("usage: gpu_priority NAME PRIORITY|top")


def test_a_task_put_into_pending_by_hand_has_the_default_priority(sh):
    ids = [submitted_id(sh.run(f"gpu_run -p {p} --name p{p} 'echo {p}'")) for p in (600, 500)]
    (sh.root / "exp1" / "pending" / "by-hand.sh").write_text("echo by hand\n")
    assert [row[0] for row in pending_rows(sh.run("gpu_status").out)] == [
        "p500", "by-hand.sh", "p600"]
    assert ids[0].startswith("600-")



@pytest.mark.parametrize("by_hand", ["by-hand.sh", ""])
def test_a_long_queue_is_shown_in_run_order(sh, by_hand):
    """A queue of a hundred tasks (looked over at once, not id by id): in the ids' order, and
    with a name put there by hand among them, that one after the tasks of priority 500."""
    inst = sh.root / "exp1"
    for folder in ("pending", "running", "done", "logs"):
        (inst / folder).mkdir(parents=True, exist_ok=True)
    ids = [task(n, "600" if n % 2 else "500", f"t{n}.sh") for n in range(100)]
    for name in [*ids, *([by_hand] if by_hand else [])]:
        (inst / "pending" / name).write_text("true\n")
    res = sh.run("gpu_status -l")
    rows = [re.sub(r"^[0-9]{3}-[0-9_]{25}-[0-9a-f]{8}-", "", row[0])
            for row in pending_rows(res.out)]
    shown = [f"t{n}.sh" for n in range(0, 100, 2)] + ([by_hand] if by_hand else []) \
        + [f"t{n}.sh" for n in range(1, 100, 2)]
    assert rows == shown, res.out
    assert f"Totals:   0 running, {len(shown)} pending" in res.out
    res = sh.run("gpu_status")
    assert f"... and {len(shown) - 20} more pending" in res.out, res.out



def test_the_client_shows_a_long_queue_with_priority_entries_in_the_daemons_order(sh):
    """Two hundred pending tasks and priority/ entries of every kind (on top at times that
    sort apart only as numbers, a number for a client id and for a name put there by hand, a
    priority that is no number, a time that is none, a FIFO, an entry of a task gone): the
    client lists them in the order the daemon starts them (``start_order``)."""
    inst = sh.root / "exp1"
    for folder in ("pending", "running", "done", "logs", "priority"):
        (inst / folder).mkdir(parents=True, exist_ok=True)
    ids = [task(n, ("500", "600", "100")[n % 3], f"t{n}.sh") for n in range(200)]
    by_hand = ["by-hand.sh", "hand2.sh", "zz.sh"]
    for name in [*ids, *by_hand]:
        (inst / "pending" / name).write_text("true\n")
    entries = {
        ids[150]: "priority=top\ntime=99.5\n",  # before 100.25 as text, after it as a number
        ids[151]: "priority=top\ntime=100.25\n",
        "zz.sh": "priority=top\ntime=1e1\n",
        ids[152]: "priority=top\ntime=soon\n",  # no time: put on top at 0
        ids[7]: "priority=042\n",
        "hand2.sh": "priority=50\n",  # a name put there by hand takes its number too
        ids[8]: "priority=high\n",  # no number: the id's own priority
        ids[9]: "priority=1000\n",
        ids[11]: "priority=0050\n",  # four digits: no number, as for the daemon
        ids[12]: "priority=7\n",
        task(999, "100", "gone.sh"): "priority=0\n",
    }
    for name, text in entries.items():
        (inst / "priority" / name).write_text(text)
    os.mkfifo(inst / "priority" / ids[10])  # never read: it would block
    overrides = pm.QueueFolder(inst).priorities(set(ids) | set(by_hand))
    expected = sorted([*ids, *by_hand], key=lambda name: pm.start_order(name, overrides))
    assert expected[:4] == [ids[151], ids[150], "zz.sh", ids[152]]  # (the daemon's order)
    res = sh.run("gpu_status -l")
    assert res.rc == 0, res.err
    shown = [row[0] for row in pending_rows(res.out)]
    assert shown == expected, res.out
    prio = {row[0]: row[1] for row in pending_rows(res.out)}
    assert (prio[ids[12]], prio[ids[11]], prio["hand2.sh"], prio[ids[150]]) == (
        "007", "100", "050", "top")


@pytest.mark.parametrize("summary", [False, True])
def test_a_task_of_a_long_queue_is_found_by_its_name_or_the_name_it_was_given(sh, summary):
    """In a queue of a hundred tasks (looked over with one grep, not id by id) a task is
    found by its script's name, with or without the extension, and by its --name: with the
    summary of finished tasks that node 0 keeps, and without."""
    inst = sh.root / "exp1"
    for folder in ("pending", "running", "done", "failed", "logs", "records", ".staging"):
        (inst / folder).mkdir(parents=True, exist_ok=True)
    ids = [task(n, "500", f"t{n}.sh") for n in range(100)]
    for name in ids:
        (inst / "pending" / name).write_text(f"echo {name}\n")
    named = task(100, "500", "x.sh")
    (inst / "pending" / named).write_text("echo named\n")
    (inst / "records" / f"{named}.submit").write_text(
        f"id={named}\nname=x.sh\ndisplay_name=my run\n")
    if summary:
        summarise(inst)
        assert (inst / "names").is_dir()
    for asked, found in (("t42.sh", ids[42]), ("t7", ids[7]), ("my run", named)):
        res = sh.run(f"gpu_show '{asked}'")
        assert res.rc == 0 and found in res.out, (asked, res.out, res.err)
    res = sh.run("gpu_show t100.sh")
    assert res.rc == 1 and "no such task" in res.err


HELD_WHILE_CLAIMED = """\
import json, os, sys, time
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
from pathlib import Path
from queue_files import finished, submit
from test_daemon_unit import FakeClock, make_daemon
import perpetual_motion as pm
root = Path({root!r})
clock = FakeClock(time.time() + 300)  # node 0's clock is five minutes ahead of the storage's
daemon = make_daemon(root, clock, num_nodes=2)
assert daemon.start() is None
inst = root / "unit"
held = submit(inst, "held.sh", "true\\n", gpus=0)
(inst / "held" / held).write_text("by=tester@test\\ntime=0\\n")
os.rename(inst / "pending" / held, inst / "running" / held)  # node 1 claims it, sees the hold
for _ in range(30):
    daemon.tick(); clock.sleep(0.1)
os.rename(inst / "running" / held, inst / "pending" / held)  # ... and puts it back
for _ in range(30):
    daemon.tick(); clock.sleep(0.1); time.sleep(0.01)
facts = {{"hold": (inst / "held" / held).exists(), "pending": (inst / "pending" / held).exists(),
          "ran": finished(inst, held)}}
if facts["pending"]:  # gone for a minute of node 0's own clock: forgotten
    os.rename(inst / "pending" / held, inst / "failed" / held)
    for _ in range(int(pm.OVERRIDE_FORGET_SECONDS / 0.5) + 5):
        daemon.tick(); clock.sleep(0.5)
    facts["forgotten"] = not (inst / "held" / held).exists()
print(json.dumps(facts))
"""


@needs_namespace
def test_a_hold_outlives_a_moment_out_of_pending_whatever_node_0s_clock(tmp_path):
    """Node 0 forgets the hold of a task that has left pending/ for a minute. A minute judged by
    the hold file's time against node 0's clock was no minute when that clock was ahead: the
    hold went the moment its task was claimed by another node (which put it back, held), and
    the held task then ran."""
    script = HELD_WHILE_CLAIMED.format(repo=str(REPO), tests=str(REPO / "tests"),
                                       root=str(tmp_path))
    run = subprocess.run([*UNSHARE, sys.executable, "-c", script], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    facts = json.loads(run.stdout.splitlines()[-1])
    assert facts == {"hold": True, "pending": True, "ran": None, "forgotten": True}, facts

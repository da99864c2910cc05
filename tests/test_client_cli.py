"""The client's commands and options, in real bash and zsh: one parser for every command,
--help, unknown options, --, refusing early, gpu_wait, gpu_retry, gpu_show, gpu_clean, gpu_logs
PATTERN and -n, gpu_tail returning with the task's exit code, -g and -n checked against the
nodes, --rank; and, with the real daemon, dependencies, tasks side by side on GPUs, script
arguments, the ranks of a gang and a newcomer's sweep.

Most tests build the queue folder by hand; the ones marked ``e2e`` and the last section run the
real daemon in its own PID namespace, with the caller's strictest options (``set -euo pipefail``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import sys
import time

import psutil
import pytest
from client_helpers import (
    CLIENT,
    ID_RE,
    INSTALLED,
    SHELLS,
    STRICT,
    Shell,
    build_sample,
    build_v2,
    end_session,
    listing,
    make_instance,
    make_shell,
    run_on_a_full_disk,
    session_members,
    submit_record,
    submitted_id,
    tid,
    tree,
    wait_finished,
    write_fields,
)
from conftest import DAEMON, REPO, namespace_shell, needs_namespace, read_fields, wait_for

COMMANDS = ["use", "list", "submit", "run", "status", "show", "logs", "tail", "wait", "retry",
            "hold", "release", "priority", "stop", "clean", "shutdown", "help"]


@pytest.fixture(params=SHELLS)
def sh(request, tmp_path) -> Shell:
    return make_shell(request.param, tmp_path)


def finish(proc, timeout: float = 10.0) -> tuple[str, str]:
    """The rest of the output of a shell that ends by itself (communicate() would lose what a
    readline() has buffered already)."""
    proc.wait(timeout)
    return proc.stdout.read(), proc.stderr.read()


# One parser: --help, unknown options, -- #########################################################


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_answers_help_and_refuses_an_unknown_option(sh, command):
    s = build_sample(sh.root)
    (sh.cwd / "job.sh").write_text("echo hi\n")
    before = tree(sh.root.parent)
    for flag in ("--help", "-h"):
        res = sh.run(f"gpu_{command} {flag}; echo \"rc=$?\"")
        assert res.err == "" and res.out.endswith("rc=0\n")
        assert res.out.startswith(f"usage: gpu_{command}"), res.out
        assert "\n  -h, --help             this help\n" in res.out
    res = sh.run(f"gpu_{command} --bogus job.sh; echo \"rc=$?\"")
    assert (res.out, res.err) == ("rc=2\n", f"gpu_{command}: unknown option --bogus (gpu_{command}"
                                            " --help lists the options)\n")
    res = sh.run(f"gpu_{command} -Z; echo \"rc=$?\"")
    assert res.out == "rc=2\n" and "unknown option -Z" in res.err
    assert tree(sh.root.parent) == before  # nothing written, nothing queued
    assert s.inst.exists()


def test_an_option_that_needs_a_value_or_takes_none_says_so(sh):
    build_sample(sh.root)
    res = sh.run("gpu_submit -p; echo \"rc=$?\"; gpu_status --json=yes; echo \"rc=$?\"; "
                 "gpu_logs --lines; echo \"rc=$?\"")
    assert res.out == "rc=2\nrc=2\nrc=2\n"
    assert res.err == ("gpu_submit: option -p needs a value (PRIO)\n"
                       "gpu_status: option --json takes no value: '--json=yes'\n"
                       "gpu_logs: option --lines needs a value (N)\n")


def test_gpu_run_never_queues_an_option_by_accident(sh):
    make_instance(sh.root)
    res = sh.run("gpu_run --help >/dev/null; gpu_run -x echo hi; echo \"rc=$?\"")
    assert res.out == "rc=2\n" and listing(sh.root / "exp1" / "pending") == []
    task = submitted_id(sh.run("gpu_run -p 1 echo hi"))
    assert task.startswith("001-") and task.endswith("-run_echo_hi.sh")
    task = submitted_id(sh.run("gpu_run -- -x --weird 'a b'"))
    record = read_fields(sh.root / "exp1" / "records" / f"{task}.submit")
    assert record["command"] == "-x --weird a b"  # one line, as its help says
    assert "The words are joined with spaces into one line that bash reads" in sh.run(
        "gpu_run --help").out
    # options come first: after the first word everything is the command's
    task = submitted_id(sh.run("gpu_run --name lr1 -g 0 --priority=7 python a.py --lr 1 -p 2"))
    record = read_fields(sh.root / "exp1" / "records" / f"{task}.submit")
    assert (record["command"], record["display_name"], record["gpus"], record["priority"]) == (
        "python a.py --lr 1 -p 2", "lr1", "0", "007")


def test_submit_takes_options_and_script_arguments(sh):
    make_instance(sh.root)
    (sh.cwd / "job.sh").write_text("echo hi\n")
    res = sh.run("gpu_submit -p 7 -g 2 -n 1 --name sweep-1 job.sh -- --lr '0.1 x' '' \"it's\"")
    task = submitted_id(res)
    assert task.startswith("007-") and task.endswith("-job.sh")
    record = read_fields(sh.root / "exp1" / "records" / f"{task}.submit")
    assert {k: record[k] for k in ("priority", "gpus", "nodes", "display_name", "argc", "arg.0",
                                   "arg.1", "arg.2", "arg.3", "after", "retry_of")} == {
        "priority": "007", "gpus": "2", "nodes": "1", "display_name": "sweep-1", "argc": "4",
        "arg.0": "--lr", "arg.1": "0.1 x", "arg.2": "", "arg.3": "it's", "after": "",
        "retry_of": ""}
    assert submitted_id(sh.run("gpu_submit --priority=9 job.sh 2>/dev/null")).startswith("009-")
    assert submitted_id(sh.run("gpu_submit job.sh 12 2>/dev/null")).startswith("012-")  # the seed's
    before = tree(sh.root)
    res = sh.run("gpu_submit -p 6 job.sh 5; echo \"rc=$?\"")
    assert (res.out, res.err) == ("rc=2\n", "gpu_submit: two priorities: -p 6 and 5\n")
    res = sh.run("gpu_submit job.sh -- $'two\\nlines'; echo \"rc=$?\"")
    assert (res.out, res.err) == ("rc=2\n", "gpu_submit: an argument holds a newline, which a "
                                            "record cannot: 'two\\nlines'\n")
    res = sh.run("gpu_submit --name 'a/b' job.sh; echo \"rc=$?\"")
    assert res.out == "rc=2\n" and res.err.startswith("gpu_submit: --name wants a name without ")
    assert tree(sh.root) == before


def test_a_script_is_found_by_its_own_file_name_when_the_task_name_cannot_hold_it(sh):
    """A task name keeps A-Z a-z 0-9 . _ - only: 'my train.sh' is queued as my_train.sh and
    训练.sh as ______.sh (as 学习.sh is). The file's own name is the task's name too, exactly,
    so the name the user typed finds it and no other."""
    make_instance(sh.root)
    for name in ("my train.sh", "训练.sh", "学习.sh", "it's.sh", "-x y.sh"):
        (sh.cwd / name).write_text("echo hi\n")
    ids = {name: submitted_id(sh.run(f"gpu_submit {shlex.quote(prefix + name)}"))
           for name, prefix in (("my train.sh", ""), ("训练.sh", ""), ("学习.sh", ""),
                                ("it's.sh", ""), ("-x y.sh", "./"))}
    assert ids["训练.sh"].endswith("-______.sh") and ids["学习.sh"].endswith("-______.sh")
    records = {name: read_fields(sh.root / "exp1" / "records" / f"{task}.submit")
               for name, task in ids.items()}
    assert {name: r["display_name"] for name, r in records.items()} == {
        "my train.sh": "my train.sh", "训练.sh": "训练.sh", "学习.sh": "学习.sh",
        "it's.sh": "it's.sh", "-x y.sh": ""}  # --name takes no leading -: no name of its own
    res = sh.run("gpu_show 'my train.sh'")
    assert res.rc == 0 and res.out.startswith(f"Task:       {ids['my train.sh']}\n"), res.err
    res = sh.run("gpu_stop 训练.sh")
    assert (res.rc, res.out) == (0, f"cancelled {ids['训练.sh']} (it was pending)\n"), res.err
    assert sorted(listing(sh.root / "exp1" / "pending")) == sorted(
        task for name, task in ids.items() if name != "训练.sh")
    status = sh.run("gpu_status").out
    assert "学习.sh" in status and "it's.sh" in status and "______" not in status
    res = sh.run("gpu_submit --name mine 'my train.sh'")  # --name wins
    assert read_fields(sh.root / "exp1" / "records" / f"{submitted_id(res)}.submit")[
        "display_name"] == "mine"


def test_a_file_that_cannot_run_is_refused_at_submit_time(sh):
    make_instance(sh.root)
    notes = sh.cwd / "notes.txt"
    notes.write_text("just notes\n")
    before = tree(sh.root)
    res = sh.run("gpu_submit notes.txt; echo \"rc=$?\"")
    assert (res.out, res.err) == ("rc=2\n", "gpu_submit: notes.txt cannot run: the daemon runs "
                                            "*.sh with bash, *.py with Python, and any other file "
                                            "only when it is executable (chmod +x)\n")
    assert tree(sh.root) == before
    notes.chmod(0o755)
    assert submitted_id(sh.run("gpu_submit notes.txt")).endswith("-notes.txt")
    (sh.cwd / "plain.py").write_text("print(1)\n")  # *.py needs no x bit: Python runs it
    assert submitted_id(sh.run("gpu_submit plain.py")).endswith("-plain.py")


@pytest.mark.parametrize("options,rc,message", [
    ("-g 9", 2, "gpu_submit: -g 9: the nodes of exp1 have at most 8 GPUs (-g all takes every GPU "
                "of a node, -g 0 none)\n"),
    ("-g -1", 2, "gpu_submit: -g wants a number of GPUs from 0 to 8, or all, not '-1'\n"),
    ("-g x", 2, "gpu_submit: -g wants a number of GPUs from 0 to 8, or all, not 'x'\n"),
    ("-g 1.5", 2, "gpu_submit: -g wants a number of GPUs from 0 to 8, or all, not '1.5'\n"),
    ("-g ²", 2, "gpu_submit: -g wants a number of GPUs from 0 to 8, or all, not '²'\n"),
    ("-n 3", 2, "gpu_submit: -n 3: exp1 has 2 node(s) (-n all runs on every one)\n"),
    ("-n 0", 2, "gpu_submit: -n wants a number of nodes from 1 to 2, or all, not '0'\n"),
    ("-n two", 2, "gpu_submit: -n wants a number of nodes from 1 to 2, or all, not 'two'\n"),
    ("-g 8", 0, ""), ("-g 0", 0, ""), ("-g all", 0, ""), ("-g 08", 0, ""), ("-n 2", 0, ""),
    ("-n all -g 1", 0, ""), ("--gpus=3 --nodes=1", 0, ""),
])
def test_gpu_and_node_requests_are_checked_against_the_nodes(sh, options, rc, message):
    inst = make_instance(sh.root)
    for rank, count in ((0, 8), (1, 4)):  # the largest node counts
        write_fields(inst / "nodes" / f"node-{rank}.state", {
            "protocol": 2, "node_rank": rank, "num_nodes": 2, "gpu_count": count,
            "status": "running", "heartbeat": time.time(), "host": "h", "pid": 1})
    (sh.cwd / "job.sh").write_text("echo\n")
    before = tree(sh.root)
    for command in (f"gpu_submit {options} job.sh", f"gpu_run {options} echo hi"):
        res = sh.run(command + "; echo \"rc=$?\"")
        if rc:
            name = command.split()[0]
            assert (res.out, res.err) == (f"rc={rc}\n", message.replace("gpu_submit", name))
            assert tree(sh.root) == before
        else:
            task = submitted_id(Result_of(res))
            record = read_fields(inst / "records" / f"{task}.submit")
            given = dict(re.findall(r"--?(\w)\w*[= ](\w+)", options))
            assert record["gpus"] == str(int(given["g"]) if given.get("g", "all") != "all"
                                         else "all")
            assert record["nodes"] == given.get("n", "1")


def Result_of(res):  # noqa: N802 - the output of "...; echo rc=$?" as a plain result
    out = res.out.rsplit("rc=", 1)[0]
    return type(res)(int(res.out.rsplit("rc=", 1)[1]), out, res.err)


def test_requests_are_free_before_any_daemon_has_told_its_gpus(sh):
    make_instance(sh.root)
    (sh.cwd / "job.sh").write_text("echo\n")
    record = read_fields(sh.root / "exp1" / "records" / (submitted_id(
        sh.run("gpu_submit -g 16 -n 4 job.sh 2>/dev/null")) + ".submit"))
    assert (record["gpus"], record["nodes"]) == ("16", "4")
    res = sh.run("gpu_submit -g 2000 job.sh; echo \"rc=$?\"")
    assert (res.out, res.err) == ("rc=2\n", "gpu_submit: -g wants a number of GPUs from 0 to "
                                            "1024, or all, not '2000'\n")
    write_fields(sh.root / "exp1" / "job_id.txt", {"backend": "slurm", "nodes": 2})
    res = sh.run("gpu_run -n 3 echo; echo \"rc=$?\"")
    assert res.err == "gpu_run: -n 3: exp1 has 2 node(s) (-n all runs on every one)\n"


def test_after_is_resolved_to_task_ids_when_the_task_is_queued(sh):
    s = build_sample(sh.root)
    (sh.cwd / "job.sh").write_text("echo\n")
    res = sh.run("gpu_submit --after train --after prep --after eval.sh job.sh")
    task = submitted_id(res)
    after = read_fields(s.inst / "records" / f"{task}.submit")["after"].split()
    # every pending and running task a name names; else its newest finished one
    assert after == [s.pending[1], s.running, s.done[0], s.pending[0]]
    res = sh.run("gpu_run --after bad echo")
    task = submitted_id(res)
    assert read_fields(s.inst / "records" / f"{task}.submit")["after"] == s.failed[1]
    assert res.err == (f"gpu_run: note: {s.failed[1]} ended failed: the daemon cancels the new "
                       "task when it comes to it\n")
    before = tree(sh.root)
    res = sh.run("gpu_submit --after nosuch job.sh; echo \"rc=$?\"")
    assert (res.out, res.err) == ("rc=1\n", "gpu_submit: --after nosuch: no such task (gpu_status "
                                            "lists the tasks)\n")
    res = sh.run("gpu_run --after zz_manual echo; echo \"rc=$?\"")
    assert res.out == "rc=1\n" and res.err.startswith(
        "gpu_run: --after zz_manual: zz_manual.sh gets its id only when it starts")
    res = sh.run("gpu_run --after '' echo; echo \"rc=$?\"")
    assert (res.out, res.err) == ("rc=2\n", "gpu_run: option --after needs a value (NAME)\n")
    assert tree(sh.root) == before


# gpu_wait #########################################################################################


def test_wait_returns_at_once_for_a_finished_task_and_times_out_on_a_pending_one(sh):
    s = build_sample(sh.root)
    res = sh.run(STRICT[sh.name] + "rc=0; gpu_wait bad prep || rc=$?; echo \"rc=$rc\"\n"
                 "gpu_wait prep; echo \"rc=$?\"; rc=0; gpu_wait never || rc=$?; echo \"rc=$rc\"\n"
                 "rc=0; gpu_wait train.sh:00000006 || rc=$?; echo \"rc=$rc\"")
    assert res.out == (f"{s.failed[1]}: failed (x)\n{s.done[0]}: done (x)\nrc=3\n"
                       f"{s.done[0]}: done (x)\nrc=0\n{s.failed[2]}: cancelled\nrc=1\n"
                       f"{s.failed[0]}: stopped (x)\nrc=1\n"), res.err
    start = time.monotonic()
    res = sh.run("gpu_wait --timeout 1.5 eval; echo \"rc=$?\"")
    assert 1.4 < time.monotonic() - start < 10
    assert (res.out, res.err) == ("rc=124\n", "gpu_wait: timed out after 1.5 s; still waiting "
                                              f"for: {s.pending[0]}\n")
    res = sh.run("gpu_wait nosuch; echo \"rc=$?\"; gpu_wait --timeout soon eval; echo \"rc=$?\"")
    assert res.out == "rc=1\nrc=2\n"
    assert res.err == ("gpu_wait: no such task: nosuch (gpu_status lists the tasks)\n"
                       "gpu_wait: --timeout wants seconds, not 'soon'\n")


def test_wait_follows_a_pending_task_to_its_end(sh):
    s = build_sample(sh.root)
    task = s.pending[0]
    proc = sh.popen(STRICT[sh.name] + "rc=0; gpu_wait eval || rc=$?; echo \"rc=$rc\"")
    try:
        time.sleep(1)
        assert proc.poll() is None  # still waiting
        (s.inst / "pending" / task).rename(s.inst / "running" / task)
        time.sleep(0.7)
        write_fields(s.inst / "records" / f"{task}.result", {"id": task, "state": "failed",
                                                             "exit_code": 42, "reason": "exit 42"})
        (s.inst / "running" / task).rename(s.inst / "failed" / task)
        out, err = proc.communicate(timeout=10)
    finally:
        left = end_session(proc)
    assert (out, err, left) == (f"{task}: failed (exit 42)\nrc=42\n", "", [])


@needs_namespace
@pytest.mark.parametrize("shell", SHELLS)
def test_e2e_wait_returns_each_tasks_exit_code(shell, start_daemon, tmp_path):
    sh = make_shell(shell, tmp_path)
    inst = sh.root / "exp1"
    start_daemon(sh.root, "exp1", "--kill-scope", "task")
    (sh.cwd / "three.sh").write_text("sleep 0.5; exit 3\n")
    (sh.cwd / "ok.sh").write_text("sleep 0.5\n")
    ids = [submitted_id(sh.run(f"gpu_submit {n}.sh")) for n in ("three", "ok")]
    (inst / "pending" / "hand.sh").write_text("exit 4\n")  # gets a fresh id when claimed
    script = STRICT[shell] + """
rc=0; gpu_wait ok || rc=$?; echo "ok rc=$rc"
rc=0; gpu_wait ok three || rc=$?; echo "both rc=$rc"
rc=0; gpu_wait hand || rc=$?; echo "hand rc=$rc"
gpu_run sleep 60 >/dev/null 2>&1
rc=0; gpu_wait --timeout 1 run_sleep_60 >/dev/null 2>&1 || rc=$?; echo "timeout rc=$rc"
gpu_stop run_sleep_60 >/dev/null
rc=0; gpu_wait run_sleep_60 || rc=$?; echo "stopped rc=$rc"
"""
    res = sh.run(script, timeout=120)
    assert res.rc == 0, res.err
    lines = res.out.splitlines()
    assert lines[:4] == [f"{ids[1]}: done (exit status 0)", "ok rc=0", f"{ids[1]}: done (exit "
                         "status 0)", f"{ids[0]}: failed (exit status 3)"]
    assert lines[4] == "both rc=3"
    hand = re.fullmatch(r"(\S+): failed \(exit status 4\)", lines[5])
    assert hand and ID_RE.match(hand.group(1)).group(4) == "hand.sh"
    assert lines[6:8] == ["hand rc=4", "timeout rc=124"]
    assert re.fullmatch(r"\S+-run_sleep_60.sh: stopped \(stopped by user\)", lines[8])
    assert lines[9:] == ["stopped rc=1"]


# gpu_tail #########################################################################################


@needs_namespace
@pytest.mark.parametrize("shell", SHELLS)
def test_e2e_tail_returns_with_the_tasks_exit_code_after_its_footer(shell, start_daemon,
                                                                     tmp_path):
    sh = make_shell(shell, tmp_path)
    inst = sh.root / "exp1"
    start_daemon(sh.root, "exp1", "--kill-scope", "task")
    (sh.cwd / "five.sh").write_text("echo one; sleep 1; echo two; exit 5\n")
    task = submitted_id(sh.run("gpu_submit five.sh"))
    res = sh.run(STRICT[shell] + "rc=0; gpu_tail five || rc=$?; echo \"rc=$rc\"", timeout=60)
    lines = res.out.splitlines()
    assert "one" in lines and "two" in lines
    assert lines[-2].startswith("[perpetual-motion] exited with status 5 after ")
    assert lines[-1] == "rc=5"
    assert res.err.endswith(f"gpu_tail: {task} ended: failed (exit status 5)\n")
    assert wait_finished(inst, task) == "failed"
    res = sh.run("gpu_tail -n 1 five; echo \"rc=$?\"")  # a finished task: its end, at once
    assert res.out.splitlines()[-2:] == [lines[-2], "rc=5"]


def test_tail_with_sigint_ignored_returns_when_the_task_ends_and_leaves_nothing(sh):
    """As under ``nohup ... &``: SIGINT (and SIGHUP) ignored. The follow must end by itself."""
    s = build_sample(sh.root)

    def ignore_sigint():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    proc = sh.popen("gpu_tail train; echo \"rc=$?\"", preexec_fn=ignore_sigint)
    try:
        assert proc.stdout.readline() == "[perpetual-motion] task: x\n"
        assert proc.stdout.readline() == "epoch 1\n"
        log = s.inst / "logs" / f"{s.running}.log"
        with log.open("a") as out:
            out.write("[perpetual-motion] exited with status 0 after 7200.0 s\n")
        write_fields(s.inst / "records" / f"{s.running}.result", {"id": s.running,
                                                                  "state": "done",
                                                                  "exit_code": 0})
        out, err = finish(proc)
    finally:
        left = end_session(proc)
    assert left == []
    assert out == "[perpetual-motion] exited with status 0 after 7200.0 s\nrc=0\n"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["TERM", "HUP"])
@pytest.mark.parametrize("command", ["gpu_tail train", "gpu_tail eval", "gpu_wait train",
                                     "gpu_status --watch"])
def test_following_and_waiting_end_when_their_shell_is_killed(sh, command, signum):
    """A shell (a job's script, a terminal's shell that its parent ends) killed with SIGTERM or
    SIGHUP alone: what it followed or waited for ends with it, and nothing is left polling."""
    build_sample(sh.root)  # train runs, eval is pending: neither ends

    def living() -> list[str]:  # orphans are reaped by PID 1, which may take its time
        found = []
        for member in session_members(proc.pid):
            try:
                if member.status() != psutil.STATUS_ZOMBIE:
                    found.append(" ".join(member.cmdline()))
            except psutil.Error:
                pass
        return found

    proc = sh.popen(f"{command}; echo \"rc=$?\"")
    try:
        # the shell, the command's subshell, its loop (and a sleep of the loop)
        wait_for(lambda: len(living()) >= 3, 10, what=f"{command} to poll")
        time.sleep(0.5)
        os.kill(proc.pid, signum)
        proc.wait(10)  # bash dies of the signal; zsh exits 1 after SIGHUP
        wait_for(lambda: not living(), 5, what=f"{command} to end with its shell")
    finally:
        end_session(proc)


def test_tail_without_a_name_follows_the_running_task_else_the_newest_log(sh):
    s = build_sample(sh.root)
    proc = sh.popen("gpu_tail -n 1")
    try:
        assert proc.stdout.readline() == "epoch 1\n"
    finally:
        end_session(proc)
    (s.inst / "running" / s.running).rename(s.inst / "failed" / s.running)
    write_fields(s.inst / "records" / f"{s.running}.result", {"id": s.running,
                                                              "state": "interrupted"})
    res = sh.run("gpu_tail; echo \"rc=$?\"")
    assert res.out == "[perpetual-motion] task: x\nepoch 1\nrc=1\n"
    assert res.err.endswith(f"gpu_tail: {s.running} ended: interrupted\n")


def test_tail_and_logs_take_a_rank(sh):
    v = build_v2(sh.root)
    assert sh.run("gpu_logs dist").out == "h rank 0\n"
    assert sh.run("gpu_logs --rank 1 dist").out == "h rank 1\nTraceback\n"
    assert sh.run("gpu_logs --rank=1 -n 1 dist").out == "Traceback\n"
    res = sh.run("gpu_logs --rank 3 dist; echo \"rc=$?\"; gpu_logs --rank x dist; echo \"rc=$?\"")
    assert res.out == "rc=1\nrc=2\n"
    assert res.err == (f"gpu_logs: task {v.h} has no log of rank 3 (gpu_show dist says where it "
                       "ran)\ngpu_logs: --rank wants a rank from 0 to 1023, not 'x'\n")
    res = sh.run("gpu_tail --rank 1 dist; echo \"rc=$?\"")  # ended: its last lines at once
    assert res.out == "h rank 1\nTraceback\nrc=1\n"
    proc = sh.popen("gpu_tail --rank 1 train; echo \"rc=$?\"")
    try:
        assert proc.stdout.readline() == "rank 1 line 1\n"
        assert proc.stdout.readline() == "rank 1 line 2\n"
        write_fields(v.inst / "records" / f"{v.g}.result", {"id": v.g, "state": "done"})
        out, err = finish(proc)
    finally:
        end_session(proc)
    assert out == "rc=0\n"
    assert err.startswith(f"gpu_tail: following {v.inst}/logs/{v.g}.rank1.log (Ctrl-C to stop)\n")


def test_tail_of_rank_0_of_a_task_on_one_node_follows_its_log(sh):
    """--rank 0 is the default made explicit: for a task on one node, its own log."""
    s = build_sample(sh.root)
    proc = sh.popen("gpu_tail --rank 0 -n 1 train; echo \"rc=$?\"")
    try:
        time.sleep(1)
        write_fields(s.inst / "records" / f"{s.running}.result", {"id": s.running,
                                                                  "state": "done"})
        out, err = finish(proc)
    finally:
        end_session(proc)
    assert out == "epoch 1\nrc=0\n"
    assert f"gpu_tail: following {s.inst}/logs/{s.running}.log (Ctrl-C to stop)\n" in err


# gpu_logs #########################################################################################


def test_logs_matches_any_part_of_an_id_and_prints_the_last_lines(sh):
    s = build_sample(sh.root)
    runs = [tid(20, "run_echo_hello.sh"), tid(21, "run_echo_world.sh")]
    for n, task in enumerate(runs):
        log = s.inst / "logs" / f"{task}.log"
        log.write_text(f"line 1\nline 2\n{task}\n")
        os.utime(log, (time.time() + n, time.time() + n))
    assert sh.run("gpu_logs run_echo").out.endswith(f"{runs[1]}\n")  # the newest match
    assert sh.run("gpu_logs echo_hel").out.endswith(f"{runs[0]}\n")
    assert sh.run("gpu_logs -n 2 hello").out == f"line 2\n{runs[0]}\n"
    assert sh.run("gpu_logs -n 0 hello").out == ""
    assert sh.run("gpu_logs 00000005").out == f"log of {s.done[1]}\n" + "x" * 200
    # a whole name wins over a part of an id: "train" is train.sh, not pretrain.sh
    pre = tid(22, "pretrain.sh")
    log = s.inst / "logs" / f"{pre}.log"
    log.write_text("pre\n")
    os.utime(log, (time.time() + 10, time.time() + 10))
    assert sh.run("gpu_logs train").out == "[perpetual-motion] task: x\nepoch 1\n"
    res = sh.run("gpu_logs -n x train; echo \"rc=$?\"")
    assert (res.out, res.err) == ("rc=2\n", "gpu_logs: -n wants a number of lines, not 'x'\n")


def test_logs_of_a_task_that_starts_as_it_looks_is_its_log_or_says_it_is_starting(sh):
    """The daemon claims a pending task just after gpu_logs found no log for it: one that ran
    at once has its log printed (not "it never ran (cancelled)"), one that is starting is said
    to be starting (not "no such task")."""
    inst = make_instance(sh.root)
    quick, slow = tid(1, "quick.sh"), tid(2, "slow.sh")
    for task in (quick, slow):
        submit_record(inst, task)
        (inst / "pending" / task).write_text("echo hi\n")
    copy = ("functions[_gpu_log_of_real]=$functions[_gpu_log_of]" if sh.name == "zsh"
            else 'eval "$(declare -f _gpu_log_of | sed 1s/_gpu_log_of/_gpu_log_of_real/)"')
    script = f"""{copy}
_gpu_log_of() {{  # the daemon claims the task just after the first look for its log
  _gpu_log_of_real "$@" && return
  [ -e "$Q/pending/$1" ] || return 1
  if [ "$1" = {quick} ]; then  # ... and runs it at once
    printf 'hi\\n' > "$Q/logs/$1.log"
    printf 'id=%s\\nstate=done\\nexit_code=0\\n' "$1" > "$Q/records/$1.result"
    command mv "$Q/pending/$1" "$Q/done/$1"
  else
    command mv "$Q/pending/$1" "$Q/running/$1"
  fi
  return 1
}}
"""
    res = sh.run(script + f"gpu_logs {quick}", Q=str(inst))
    assert (res.rc, res.out, res.err) == (0, "hi\n", ""), res
    res = sh.run(script + f"gpu_logs {slow}", Q=str(inst))
    assert (res.rc, res.out) == (1, ""), res
    assert res.err == f"gpu_logs: task {slow} is starting: it has no log yet (gpu_tail {slow} " \
        "follows it)\n"


@pytest.mark.parametrize("summary", [False, True], ids=["folders", "summary"])
def test_logs_and_tail_say_which_of_the_tasks_a_name_names_they_took(sh, summary):
    s = build_sample(sh.root)
    runs = [tid(20, "run_echo_hello.sh"), tid(21, "run_echo_world.sh")]
    for n, task in enumerate(runs):
        log = s.inst / "logs" / f"{task}.log"
        log.write_text(f"{task}\n")
        os.utime(log, (s.now - 60 + n, s.now - 60 + n))
    if summary:  # the finished tasks looked up in names/, as while a daemon runs
        sys.path.insert(0, str(REPO / "bench"))
        from status_bench import summarise
        summarise(s.inst)
        assert (s.inst / "summary").exists()
    several = "train names {} tasks; this is {} (gpu_status lists them)\n"
    res = sh.run("gpu_show train >/dev/null")
    assert res.err == "gpu_show: " + several.format(4, "the one submitted last")
    res = sh.run("gpu_logs train")  # the newest log: the running task's
    assert (res.rc, res.out) == (0, "[perpetual-motion] task: x\nepoch 1\n")
    assert res.err == "gpu_logs: " + several.format(4, f"the log of {s.running}, written last")
    for one in ("prep", "train.sh:00000005", s.failed[0]):
        assert sh.run(f"gpu_logs -n 1 {one}").err == ""
    res = sh.run("gpu_logs run_echo")  # a part of two ids
    assert res.out == f"{runs[1]}\n"
    assert res.err == (f"gpu_logs: run_echo is in the ids of 2 logs; this is the log of {runs[1]}, "
                       "written last (gpu_logs lists the logs)\n")
    assert sh.run("gpu_logs echo_hel").err == ""

    write_fields(s.inst / "records" / f"{s.running}.result", {"id": s.running, "state": "done"})
    res = sh.run("gpu_tail -n 1 train")  # ended: its last line at once
    assert (res.rc, res.out) == (0, "epoch 1\n")
    assert res.err.startswith("gpu_tail: " + several.format(4, "the newest running one")
                              + f"gpu_tail: following {s.inst}/logs/{s.running}.log"), res.err
    (s.inst / "running" / s.running).unlink()  # it ended (it is done below)
    proc = sh.popen("gpu_tail train")  # pending: waited for
    try:
        assert proc.stderr.readline() == "gpu_tail: " + several.format(
            3, "the pending one that starts first")
        assert proc.stderr.readline() == (f"gpu_tail: task {s.pending[1]} is pending: waiting for "
                                          "it to start\n")
    finally:
        end_session(proc)
    (s.inst / "pending" / s.pending[1]).unlink()
    (s.inst / "done" / s.running).write_text("sleep 1000\n")
    if summary:
        summarise(s.inst)
    res = sh.run("gpu_tail -n 1 train")  # all finished: the log written last
    assert (res.rc, res.out) == (0, "epoch 1\n")
    assert res.err.startswith("gpu_tail: " + several.format(
        3, f"the log of {s.running}, written last") + "gpu_tail: following "), res.err
    assert sh.run(f"gpu_tail -n 1 {s.done[1]}").err.startswith("gpu_tail: following ")


def test_names_given_with_name_name_the_task(sh):
    v = build_v2(sh.root)
    assert sh.run("gpu_logs sweep-a").out == f"log of {v.a}\n"
    assert sh.run("gpu_show sweep-a | head -2").out == f"Task:       {v.a}\nName:       sweep-a\n"
    assert sh.run("gpu_wait --timeout 0.1 sweep-a 2>&1; echo \"rc=$?\"").out.endswith("rc=124\n")


# gpu_show #########################################################################################


def test_show_prints_everything_about_one_task(sh):
    v = build_v2(sh.root)
    out = sh.run("gpu_show sweep-a").out.splitlines()
    assert out[:3] == [f"Task:       {v.a}", "Name:       sweep-a", "State:      running for "
                       "1m05s"] or out[2] == "State:      running for 1m06s"
    assert out[3:] == [
        "Command:    python sweep.py --lr 0.1", "Directory:  /work/me",
        f"Submitted:  {time.strftime('%Y-%m-%d %H:%M', time.localtime(1_800_000_000))} by "
        "me@login-1", "Priority:   500; asks for 2 GPU(s) of one node",
        "Placement:  node 0 (node-a), GPUs 0,1", f"Started:    {local(v.now - 65)}",
        f"Log:        {v.inst}/logs/{v.a}.log"]
    out = sh.run("gpu_show prep").out.splitlines()
    assert out[1:6] == ["State:      done (exit status 0)", "Script:     /work/me/prep.sh",
                        "Arguments:  --fast 'a b'", "Directory:  /work/me",
                        out[5]]
    assert "Priority:   500; asks for no GPU (CPU only) of one node" in out
    assert "Placement:  node 1 (node-b), no GPU" in out
    assert "Ended:      " + local(v.now - 3900) + ", after 1m40s" in out
    assert "Exit:       exit code 0" in out
    out = sh.run("gpu_show dist").out.splitlines()
    assert "State:      failed (rank 1 failed)" in out
    assert "Priority:   500; asks for 1 GPU on each of 2 nodes" in out
    assert f"Log:        {v.inst}/logs/{v.h}.rank0.log" in out
    assert f"Log:        {v.inst}/logs/{v.h}.rank1.log" in out
    out = sh.run("gpu_show eval").out.splitlines()
    assert out[1] == "State:      pending"
    assert f"After:      {v.a} (not finished)" in out
    res = sh.run("gpu_show nosuch; echo \"rc=$?\"")
    assert (res.out, res.err) == ("rc=1\n", "gpu_show: no such task: nosuch (gpu_status lists the "
                                            "tasks)\n")


def test_show_and_json_tell_an_end_no_daemon_saw_from_one_seen(sh):
    """A task whose daemon died ended when it last ran (``ended``), and was found so later
    (``found``): gpu_show says both, the JSON has both; a result without ``found`` (every end
    seen, and every result of a daemon before it) reads as before."""
    v = build_v2(sh.root)
    lost = tid(18, "lost.sh")
    submit_record(v.inst, lost, gpus=1, command="python lost.py")
    (v.inst / "failed" / lost).write_text("echo\n")
    write_fields(v.inst / "records" / f"{lost}.result", {
        "id": lost, "state": "interrupted", "exit_code": "", "signal": "",
        "reason": "daemon died", "started": v.now - 7200, "ended": v.now - 6600,
        "duration": "600.000", "found": v.now - 5040, "host": "node-a", "node_rank": 0,
        "attempt": 1, "gpus": "1"}, mtime=v.now - 5040)
    out = sh.run("gpu_show lost").out.splitlines()
    assert "State:      interrupted (daemon died)" in out
    assert f"Ended:      {local(v.now - 6600)}, after 10m00s (last known to run; found " \
        f"{local(v.now - 5040)})" in out, out
    assert f"Ended:      {local(v.now - 3900)}, after 1m40s" in \
        sh.run("gpu_show prep").out.splitlines()
    recent = {t["id"]: t for t in json.loads(sh.run("gpu_status --json").out)["recent"]}
    assert (recent[lost]["ended"], recent[lost]["found"], recent[lost]["duration"]) == (
        pytest.approx(v.now - 6600, abs=0.01), pytest.approx(v.now - 5040, abs=0.01), 600.0)
    assert (recent[v.f]["found"], recent[v.f]["duration"]) == (None, 100.0)
    [row] = [line for line in sh.run("gpu_status").out.splitlines() if line.startswith("lost")]
    assert row.split()[2:7] == ["interrupted", "0", "1", "1h50m", "ago"], row  # since it ended


def local(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch))


# gpu_retry ########################################################################################


def test_retry_queues_a_finished_task_again_as_it_was(sh):
    v = build_v2(sh.root)
    (v.inst / "failed" / v.h).write_text("torchrun dist.py\n")
    submit_record(v.inst, v.h, gpus=1, nodes=2, command="torchrun dist.py", display_name="dist",
                  cwd="/work/me/run", argc=1, **{"arg.0": "--resume"})
    res = sh.run("gpu_retry dist")
    task = submitted_id(res)
    assert task.startswith("500-") and task.endswith("-dist.py") and task != v.h
    assert res.err == f"gpu_retry: a retry of {v.h}: it runs in /work/me/run, at priority 500\n"
    old = read_fields(v.inst / "records" / f"{v.h}.submit")
    new = read_fields(v.inst / "records" / f"{task}.submit")
    for key in ("name", "display_name", "priority", "source", "command", "cwd", "gpus", "nodes",
                "argc", "arg.0"):
        assert new[key] == old[key], key
    assert (new["retry_of"], new["after"], new["id"]) == (v.h, "", task)
    assert (v.inst / "pending" / task).read_text() == "torchrun dist.py\n"
    task = submitted_id(sh.run("gpu_retry -p 7 -g 2 -n 1 dist 2>/dev/null"))
    new = read_fields(v.inst / "records" / f"{task}.submit")
    assert (new["priority"], new["gpus"], new["nodes"], task[:4]) == ("007", "2", "1", "007-")
    before = tree(sh.root)
    res = sh.run("gpu_retry sweep-a; echo \"rc=$?\"; gpu_retry nosuch; echo \"rc=$?\"; "
                 "gpu_retry -g 9 prep; echo \"rc=$?\"")
    assert res.out == "rc=1\nrc=1\nrc=2\n"
    assert res.err == ("gpu_retry: task sweep-a has not finished yet (gpu_wait sweep-a waits for "
                       "it)\ngpu_retry: no such task: nosuch (gpu_status lists the tasks)\n"
                       "gpu_retry: -g 9: the nodes of exp1 have at most 4 GPUs (-g all takes "
                       "every GPU of a node, -g 0 none)\n")
    assert tree(sh.root) == before


def test_a_time_limit_is_recorded_shown_and_kept_by_a_retry(sh):
    v = build_v2(sh.root)
    (sh.cwd / "job.sh").write_text("echo\n")
    for limit, seconds in (("90s", 90), ("1h30m", 5400), ("1:30:00", 5400), ("2-12", 216000),
                           ("45:00", 2700)):
        task = submitted_id(sh.run(f"gpu_submit -t {limit} job.sh"))
        assert read_fields(v.inst / "records" / f"{task}.submit")["time_limit"] == str(seconds)
    assert read_fields(v.inst / "records" / f"{task}.submit")["time_limit"] == "2700"
    assert "; asks for all GPUs of one node, for 45m00s" in sh.run(f"gpu_show {task}").out
    doc = json.loads(sh.run("gpu_status --json").out)
    [mine] = [t for t in doc["pending"] if t["id"] == task]
    assert mine["request"] == {"gpus": "all", "nodes": 1, "time_limit": 2700}
    assert read_fields(v.inst / "records" / f"{submitted_id(sh.run('gpu_run echo'))}.submit")[
        "time_limit"] == ""
    submit_record(v.inst, v.h, command="python train.py", time_limit=7200)
    (v.inst / "failed" / v.h).write_text("python train.py\n")
    again = submitted_id(sh.run(f"gpu_retry {v.h} 2>/dev/null"))
    assert read_fields(v.inst / "records" / f"{again}.submit")["time_limit"] == "7200"
    again = submitted_id(sh.run(f"gpu_retry -t 4h {v.h} 2>/dev/null"))
    assert read_fields(v.inst / "records" / f"{again}.submit")["time_limit"] == "14400"
    again = submitted_id(sh.run(f"gpu_retry -t none {v.h} 2>/dev/null"))
    assert read_fields(v.inst / "records" / f"{again}.submit")["time_limit"] == ""
    before = tree(sh.root)
    res = sh.run("gpu_run -t '' echo; echo \"rc=$?\"")
    assert (res.out, res.err) == ("rc=2\n", "gpu_run: option -t needs a value (LIMIT)\n")
    for bad in ("90", "0s", "1h30", "366d", "1:2:3:4", "soon"):
        res = sh.run(f"gpu_run -t {bad} echo; echo \"rc=$?\"")
        assert res.out == "rc=2\n" and res.err.startswith(
            "gpu_run: -t wants a time limit from 1s to 365d, such as 90s, 30m, 2h, 1d12h or "
            "1:30:00 (H:M:S), or none, not "), (bad, res.err)
    assert tree(sh.root) == before


def test_variables_given_with_e_are_recorded_shown_and_kept_by_a_retry(sh):
    v = build_v2(sh.root)
    (sh.cwd / "job.sh").write_text("echo\n")
    task = submitted_id(sh.run("gpu_submit -e WANDB_MODE=offline --env 'NOTE=a b=c' "
                               "-e WANDB_MODE=disabled job.sh"))
    record = read_fields(v.inst / "records" / f"{task}.submit")
    assert (record["envc"], record["env.0"], record["env.1"]) == (
        "2", "NOTE=a b=c", "WANDB_MODE=disabled")  # the last -e of a name wins
    out = sh.run(f"gpu_show {task}").out
    assert "\nEnv:        NOTE=a b=c\n            WANDB_MODE=disabled\n" in out
    [mine] = [t for t in json.loads(sh.run("gpu_status --json").out)["pending"]
              if t["id"] == task]
    assert mine["env"] == {"NOTE": "a b=c", "WANDB_MODE": "disabled"}
    assert read_fields(v.inst / "records" / f"{submitted_id(sh.run('gpu_run echo'))}.submit")[
        "envc"] == "0"
    submit_record(v.inst, v.h, command="python train.py", envc=2, **{
        "env.0": "A=1", "env.1": "B=2"})
    (v.inst / "failed" / v.h).write_text("python train.py\n")
    again = submitted_id(sh.run(f"gpu_retry -e B=3 -e C=4 {v.h} 2>/dev/null"))
    record = read_fields(v.inst / "records" / f"{again}.submit")
    assert [record[f"env.{i}"] for i in range(int(record["envc"]))] == ["A=1", "B=3", "C=4"]
    again = submitted_id(sh.run(f"gpu_submit '{v.inst}/failed/{v.h}' 2>/dev/null"))
    record = read_fields(v.inst / "records" / f"{again}.submit")
    assert [record[f"env.{i}"] for i in range(int(record["envc"]))] == ["A=1", "B=2"]
    before = tree(sh.root)
    for bad, why in (("NOEQUALS", "-e wants NAME=VALUE, not 'NOEQUALS'"),
                     ("1A=x", "-e: '1A' is not a variable name (letters, digits, _; not a digit "
                              "first)"),
                     ("=x", "-e: '' is not a variable name (letters, digits, _; not a digit "
                            "first)"),
                     ("CUDA_VISIBLE_DEVICES=3", "-e CUDA_VISIBLE_DEVICES: the daemon sets it for "
                                                "every task (GPUs: -g)"),
                     ("MASTER_PORT=1", "-e MASTER_PORT: the daemon sets it for every task "
                                       "(GPUs: -g)")):
        res = sh.run(f"gpu_run -e '{bad}' echo; echo \"rc=$?\"")
        assert (res.out, res.err) == ("rc=2\n", f"gpu_run: {why}\n"), bad
    res = sh.run("gpu_run -e \"$(printf 'A=1\\nB=2')\" echo; echo \"rc=$?\"")
    assert (res.out, res.err) == ("rc=2\n", "gpu_run: option -e: a value with a newline cannot be "
                                            "recorded\n")
    assert tree(sh.root) == before


def test_retry_of_several_names_and_of_every_failed_task(sh):
    inst = make_instance(sh.root)
    ids = {}
    for n, (name, folder, state) in enumerate([
            ("ok", "done", "done"), ("oom", "failed", "failed"), ("lost", "failed", "interrupted"),
            ("halt", "failed", "stopped"), ("nope", "failed", "cancelled")]):
        ids[name] = tid(n, f"{name}.sh")
        (inst / folder / ids[name]).write_text(f"echo {name}\n")
        submit_record(inst, ids[name], command=f"echo {name}")
        write_fields(inst / "records" / f"{ids[name]}.result", {"id": ids[name], "state": state})
    before = tree(sh.root)
    res = sh.run("gpu_retry ok nosuch; echo \"rc=$?\"; gpu_retry --failed ok; echo \"rc=$?\"")
    assert res.out == "rc=1\nrc=2\n"
    assert res.err == ("gpu_retry: no such task: nosuch (gpu_status lists the tasks)\n"
                       "gpu_retry: nothing was queued\n"
                       "gpu_retry: --failed takes no NAME\n")
    assert tree(sh.root) == before
    res = sh.run("gpu_retry ok oom")
    lines = res.out.splitlines()
    assert res.rc == 0 and len(lines) == 3 and lines[2] == "queued 2 task(s) again", res.out
    again = [line.split()[1] for line in lines[:2]]
    assert [read_fields(inst / "records" / f"{t}.submit")["retry_of"] for t in again] == \
        [ids["ok"], ids["oom"]]
    res = sh.run("gpu_retry --failed")  # oom was queued again already; halt and nope were meant
    assert res.rc == 0, res.err
    assert res.err.startswith("gpu_retry: left out 2 stopped or cancelled task(s)\n")
    task = submitted_id(res)
    assert read_fields(inst / "records" / f"{task}.submit")["retry_of"] == ids["lost"]
    assert sorted(listing(inst / "pending")) == sorted([*again, task])
    res = sh.run("gpu_retry --failed")
    assert (res.rc, res.out) == (0, "no failed task to retry\n")
    assert len(listing(inst / "pending")) == 3


@needs_namespace
def test_retry_failed_on_a_full_disk_says_so_and_leaves_no_claim_behind(sh, tmp_path):
    """A claim (records/ID.retried) that cannot be written is no claim: once there is room,
    gpu_retry --failed queues the task."""
    s = build_sample(sh.root)
    after = tmp_path / "after"
    res = run_on_a_full_disk(sh, "gpu_retry --failed; echo \"rc=$?\"\n"
                                 "command ls \"$QUEUE_ROOT/exp1/records\" | command grep -c "
                                 "retried\n"
                                 "command rm -f \"$QUEUE_ROOT/fill\"\n"
                                 "gpu_retry --failed 2>/dev/null | command sed 's/-.*-/-ID-/'",
                             after)
    assert res.out == "rc=1\n0\nSubmitted 500-ID-bad.sh\n", res.err
    err = res.err.splitlines()
    assert err[0] == "gpu_retry: left out 2 stopped or cancelled task(s)"
    assert err[1].startswith(f"gpu_retry: cannot write {tmp_path}/after.mount/exp1/records/"
                             f"{s.failed[1]}.retried: {s.failed[1]} is not queued again (dd: ")
    assert err[1].endswith("No space left on device)") and len(err) == 2, res.err
    assert listing(after / "records").count(f"{s.failed[1]}.retried") == 1


def test_retry_failed_from_three_shells_at_once_queues_each_task_once(sh, tmp_path):
    inst = make_instance(sh.root)
    failed = [tid(n, f"oom{n}.sh") for n in range(6)]
    for task in failed:
        (inst / "failed" / task).write_text("echo oom\n")
        submit_record(inst, task, command="echo oom")
        write_fields(inst / "records" / f"{task}.result", {"id": task, "state": "failed"})
    go = tmp_path / "go"
    shells = [sh.popen(f"while [ ! -e '{go}' ]; do sleep 0.01; done; gpu_retry --failed")
              for _ in range(3)]
    try:
        time.sleep(0.3)  # all three are waiting: they start together
        go.touch()
        for proc in shells:
            proc.communicate(timeout=60)
            assert proc.returncode == 0
    finally:
        for proc in shells:
            end_session(proc)
    again = [read_fields(inst / "records" / f"{t}.submit")["retry_of"]
             for t in listing(inst / "pending")]
    assert sorted(again) == sorted(failed)  # each once
    res = sh.run("gpu_retry --failed")
    assert (res.rc, res.out) == (0, "no failed task to retry\n")


def test_retry_of_a_task_that_ends_as_it_is_looked_for_queues_it_again(sh):
    """The task was running when gpu_retry looked among the finished ones, and had finished when
    it looked among the pending and running ones: it is queued again, not 'no such task'."""
    inst = make_instance(sh.root)
    task = tid(1, "ends.sh")
    submit_record(inst, task, command="")
    (inst / "running" / task).write_text("exit 1\n")
    copy = ("functions[_gpu_find_real]=$functions[_gpu_find]" if sh.name == "zsh"
            else 'eval "$(declare -f _gpu_find | sed 1s/_gpu_find/_gpu_find_real/)"')
    res = sh.run(f"""{copy}
_gpu_find() {{  # the task ends just after the first look among the finished tasks
  _gpu_find_real "$@" && return
  if [ "$2" = done ] && [ -e "$Q/running/{task}" ]; then
    printf 'id={task}\\nstate=failed\\nexit_code=1\\n' > "$Q/records/{task}.result"
    command mv "$Q/running/{task}" "$Q/failed/{task}"
  fi
  return 1
}}
gpu_retry ends
""", Q=str(inst))
    assert res.rc == 0, res
    assert [read_fields(inst / "records" / f"{t}.submit")["retry_of"]
            for t in listing(inst / "pending")] == [task]


def test_retry_failed_beside_a_clean_says_which_task_was_removed_and_retries_the_others(sh):
    """gpu_clean removes failed tasks while gpu_retry --failed queues them again: one removed
    after the listing (before or after its claim) is said to be gone, not called a link, and
    the others are queued all the same."""
    inst = make_instance(sh.root)
    gone, late, kept = tid(1, "gone.sh"), tid(2, "late.sh"), tid(3, "kept.sh")
    for task in (gone, late, kept):
        (inst / "failed" / task).write_text("exit 1\n")
        submit_record(inst, task, command="")
        write_fields(inst / "records" / f"{task}.result", {"id": task, "state": "failed"})
    copy = ("functions[_gpu_{0}_real]=$functions[_gpu_{0}]" if sh.name == "zsh"
            else 'eval "$(declare -f _gpu_{0} | sed 1s/_gpu_{0}/_gpu_{0}_real/)"')
    res = sh.run(f"""{copy.format("retry_one")}
{copy.format("claim_retry")}
_gpu_retry_one() {{  # gpu_clean takes {gone} away once gpu_retry has listed it
  [ "$2" != {gone} ] || command rm -f "$Q/failed/$2" "$Q/records/$2.submit"
  _gpu_retry_one_real "$@"
}}
_gpu_claim_retry() {{  # and {late} once it has claimed it
  _gpu_claim_retry_real "$@" || return
  [ "$1" != {late} ] || command rm -f "$Q/failed/$1" "$Q/records/$1.submit"
}}
gpu_retry --failed
""", Q=str(inst))
    assert res.rc == 0, res.err
    assert "link" not in res.err
    assert f"gpu_retry: {gone} is no longer in failed/ (removed meanwhile): not queued again\n" \
        in res.err
    assert f"gpu_retry: {late} is no longer in failed/ (removed meanwhile): not queued again\n" \
        in res.err
    again = [read_fields(inst / "records" / f"{t}.submit")["retry_of"]
             for t in listing(inst / "pending")]
    assert again == [kept]
    assert not (inst / "records" / f"{late}.retried").exists()


# gpu_clean ########################################################################################


def test_clean_keeps_what_a_pending_task_waits_for(sh):
    inst = make_instance(sh.root)
    now = time.time()
    needed, other, waiting = tid(1, "needed.sh"), tid(2, "other.sh"), tid(3, "waiting.sh")
    for task in (needed, other):
        (inst / "done" / task).write_text("true\n")
        submit_record(inst, task)
        write_fields(inst / "records" / f"{task}.result", {"id": task, "state": "done"},
                     mtime=now - 40 * 86400)
    (inst / "pending" / waiting).write_text("true\n")
    submit_record(inst, waiting, after=f"{tid(9, 'gone.sh')} {needed}")
    res = sh.run("gpu_clean")
    assert res.rc == 0, res.err
    assert res.out.splitlines()[-1] == "removed 1 finished task(s) of exp1; kept 1"
    assert res.err == "gpu_clean: kept 1 finished task(s) that pending tasks wait for (--after)\n"
    assert listing(inst / "done") == [needed]
    assert (inst / "records" / f"{needed}.result").exists()


def test_clean_removes_finished_tasks_only_and_says_what(sh):
    v = build_v2(sh.root)
    now = time.time()
    old = []
    for n, days in enumerate((40, 35, 10)):
        task = tid(40 + n, f"old{n}.sh")
        folder = "done" if n else "failed"
        (v.inst / folder / task).write_text("echo\n")
        submit_record(v.inst, task)
        write_fields(v.inst / "records" / f"{task}.run", {"id": task})
        write_fields(v.inst / "records" / f"{task}.result", {"id": task, "state": folder},
                     mtime=now - days * 86400)
        (v.inst / "logs" / f"{task}.log").write_text("log\n")
        old.append(f"{folder}/{task}")
    before = tree(sh.root)
    res = sh.run("gpu_clean --dry-run --older-than 30")
    assert res.out.splitlines() == [f"would remove {old[1]} (ended 35d00h ago)",
                                    f"would remove {old[0]} (ended 40d00h ago)",
                                    "would remove 2 finished task(s) of exp1; keep 3"], res.err
    assert tree(sh.root) == before
    res = sh.run("gpu_clean --older-than 30")
    assert res.out.splitlines() == [f"removed {old[1]} (ended 35d00h ago)",
                                    f"removed {old[0]} (ended 40d00h ago)",
                                    "removed 2 finished task(s) of exp1; kept 3"], res.err
    for entry in old[:2]:
        task = entry.split("/")[1]
        assert not (v.inst / entry).exists()
        assert [p for p in (v.inst / "records").iterdir() if p.name.startswith(task)] == []
        assert not (v.inst / "logs" / f"{task}.log").exists()
    assert listing(v.inst / ".staging") == []
    res = sh.run("gpu_clean --keep 1")  # the newest one stays: the one that ended last
    assert res.out.splitlines()[-1] == "removed 2 finished task(s) of exp1; kept 1"
    assert listing(v.inst / "done") + listing(v.inst / "failed") == [v.h]
    assert (v.inst / "logs" / f"{v.h}.rank0.log").exists()  # kept with its task
    res = sh.run("gpu_clean")
    assert res.out.splitlines()[-1] == "removed 1 finished task(s) of exp1; kept 0"
    assert not any(p.name.startswith(v.h) for p in (v.inst / "logs").iterdir())
    assert not any(p.name.startswith(v.h) for p in (v.inst / "records").iterdir())
    # pending and running tasks, with their records and logs, are never touched
    assert listing(v.inst / "running") == sorted([v.a, v.b, v.g])
    assert listing(v.inst / "pending") == [v.c, v.e]
    for task in (v.a, v.b, v.g, v.c, v.e):
        assert (v.inst / "records" / f"{task}.submit").exists()
    assert (v.inst / "logs" / f"{v.g}.rank1.log").exists()
    assert sh.run("gpu_clean").out == "nothing to remove: 0 finished task(s) in exp1, all kept\n"
    res = sh.run("gpu_clean --older-than x; echo \"rc=$?\"; gpu_clean --keep -1; echo \"rc=$?\"")
    assert res.out == "rc=2\nrc=2\n"


# Against the real daemon, one task at a time ###################################################


@needs_namespace
@pytest.mark.parametrize("shell", SHELLS)
def test_e2e_a_day_with_the_daemon(shell, start_daemon, tmp_path):
    """The commands against the real daemon, one task at a time (what needs its scheduler is
    in the last section), with the caller's strictest options."""
    sh = make_shell(shell, tmp_path)
    inst = sh.root / "exp1"
    start_daemon(sh.root, "exp1", "--kill-scope", "task")
    (sh.cwd / "prep.sh").write_text('echo "prep in $PWD"\n')
    (sh.cwd / "flaky.sh").write_text('[ -f fixed ] || { echo broken; exit 6; }\n')
    script = STRICT[shell] + """
gpu_submit --name prep -p 100 prep.sh >/dev/null
gpu_submit --name flaky --after prep flaky.sh >/dev/null
gpu_run -p 900 -x printf hi 2>/dev/null || echo "an option is no command: $?"
gpu_run -p 900 --name pf -- echo -x- >/dev/null
rc=0; gpu_wait prep flaky >/dev/null || rc=$?; echo "wait rc=$rc"
gpu_show flaky | sed -n 's/^State: *//p'
touch fixed  # where the task runs: the directory it was submitted from
gpu_retry flaky 2>/dev/null | sed 's/ .*//'
rc=0; gpu_tail flaky > tail.out 2>/dev/null || rc=$?; echo "tail rc=$rc"
rc=0; gpu_wait pf >/dev/null || rc=$?; echo "printf rc=$rc"
gpu_logs -n 2 pf | head -1
gpu_status --json > status.json
gpu_list --json > list.json
gpu_status | sed -n 's/^Totals: *//p'
gpu_clean --keep 1 | tail -1
"""
    res = sh.run(script, timeout=120)
    assert res.rc == 0, res.err
    assert res.out.splitlines() == [
        "an option is no command: 2",
        "wait rc=6",
        "failed (exit status 6)",
        "Submitted",
        "tail rc=0",
        "printf rc=0",
        "-x-",
        "0 running, 0 pending, 3 done, 1 failed, stopped or cancelled",
        "removed 3 finished task(s) of exp1; kept 1",
    ], res.err
    assert len(listing(inst / "done")) + len(listing(inst / "failed")) == 1  # the newest end
    assert (sh.cwd / "tail.out").read_text().splitlines()[-1].startswith(
        "[perpetual-motion] exited with status 0 after ")
    doc = json.loads((sh.cwd / "status.json").read_text())
    by_name = {(t["display_name"], t["state"]) for t in doc["recent"]}
    assert by_name == {("prep", "done"), ("flaky", "failed"), ("flaky", "done"), ("pf", "done")}
    retried = [t for t in doc["recent"] if t["retry_of"]]
    assert len(retried) == 1 and retried[0]["cwd"] == str(sh.cwd)
    listed = json.loads((sh.cwd / "list.json").read_text())["instances"]
    assert [(i["job_id"], i["daemon"], i["counts"]["done"]) for i in listed] == [
        ("exp1", "alive", 3)]
    assert listing(inst / "pending") == [] and listing(inst / "running") == []


@needs_namespace
def test_e2e_a_task_is_shown_by_the_name_given_with_name(start_daemon, tmp_path):
    """The daemon runs the task with the submit keys (arguments, GPUs, nodes and dependencies
    are tested in the last section), and the client shows the task by its --name."""
    sh = make_shell("bash", tmp_path)
    inst = sh.root / "exp1"
    (sh.cwd / "a.sh").write_text('echo "a ran"\n')
    first = submitted_id(sh.run("gpu_submit -p 1 --name first a.sh 2>/dev/null"))
    start_daemon(sh.root, "exp1")
    assert wait_finished(inst, first) == "done"
    out = sh.run("gpu_status").out
    assert re.search(r"^first +001 done +0 +- +\S+ ago +0  a.sh$", out, re.M), out
    assert "a ran" in sh.run("gpu_logs first").out

# The client with the real daemon: dependencies, GPUs side by side, arguments, gangs ##########
#
# What needs the daemon to honour the submit keys (``gpus``, ``nodes``, ``after``,
# ``argc``/``arg.<i>``) and to publish ``running.<k>.*``, ``waiting.*`` and ``gpu.<i>.task``,
# end to end, each daemon in its own PID namespace.


def running_ids(inst) -> list[str]:
    return sorted(p.name for p in (inst / "running").iterdir())


@needs_namespace
def test_after_starts_a_task_when_its_dependency_is_done_and_cancels_it_when_it_failed(
        start_daemon, tmp_path):
    sh = make_shell("bash", tmp_path)
    inst = sh.root / "exp1"
    start_daemon(sh.root, "exp1", "--gpus", "2", "--kill-scope", "task")
    first = submitted_id(sh.run("gpu_run -g 0 --name first 'sleep 1; echo first'"))
    then = submitted_id(sh.run("gpu_run -g 0 --after first 'echo then'"))
    bad = submitted_id(sh.run("gpu_run -g 0 --name bad 'exit 2'"))
    never = submitted_id(sh.run("gpu_run -g 0 --after bad 'echo never'"))
    res = sh.run("gpu_wait first bad run_echo_then run_echo_never; echo \"rc=$?\"", timeout=60)
    assert res.out.splitlines()[-1] == "rc=2"  # bad's exit code: the first that failed
    assert read_fields(inst / "records" / f"{then}.result")["state"] == "done"
    assert float(read_fields(inst / "records" / f"{then}.run")["started"]) >= \
        float(read_fields(inst / "records" / f"{first}.result")["ended"])
    cancelled = read_fields(inst / "records" / f"{never}.result")
    assert (cancelled["state"], cancelled["reason"]) == ("cancelled", f"dependency {bad} failed")
    assert not (inst / "logs" / f"{never}.log").exists()


@needs_namespace
def test_gpus_of_parallel_tasks_are_shown_per_task_and_per_gpu(start_daemon, tmp_path):
    sh = make_shell("bash", tmp_path)
    inst = sh.root / "exp1"
    start_daemon(sh.root, "exp1", "--gpus", "4", "--kill-scope", "task")
    ids = [submitted_id(sh.run(f"gpu_run -g 1 --name s{n} 'sleep 60'")) for n in range(4)]
    big = submitted_id(sh.run("gpu_run -g 3 --name big 'echo big'"))
    wait_for(lambda: running_ids(inst) == sorted(ids), 30, what="four one-GPU tasks")

    def status_ready():
        out = sh.run("gpu_status").out
        return out if "next:     big: waiting for 3 GPUs, 0 free" in out else None

    out = wait_for(status_ready, 20, what="the waiting reason")
    rows = dict(re.findall(r"^(s\d) +500 running +0 +(\d) ", out, re.M))
    assert sorted(rows) == ["s0", "s1", "s2", "s3"] and sorted(rows.values()) == list("0123")
    for name, gpu in rows.items():
        assert re.search(rf"^          {gpu} +declared slot .*  {name}$", out, re.M), out
    assert re.search(r"^big +500 pending +3 ", out, re.M)
    doc = json.loads(sh.run("gpu_status --json").out)
    assert sorted(t["gpus"][0] for t in doc["running"]) == [0, 1, 2, 3]
    assert doc["nodes"][0]["waiting"] == {"id": big, "reason": "waiting for 3 GPUs, 0 free"}
    assert {g["task"] for g in doc["nodes"][0]["gpus"]} == set(ids)
    assert sh.run("gpu_stop all").rc == 0  # stops the running ones, cancels the pending one
    for task in ids:
        assert wait_finished(inst, task, 30) == "failed"
        assert read_fields(inst / "records" / f"{task}.result")["state"] == "stopped"
    assert wait_finished(inst, big, 30) == "failed"
    assert read_fields(inst / "records" / f"{big}.result")["state"] == "cancelled"


@pytest.mark.parametrize("shell", INSTALLED)
def test_wait_on_tasks_that_run_side_by_side(shell, start_daemon, tmp_path):
    sh = make_shell(shell, tmp_path)
    inst = sh.root / "exp1"
    start_daemon(sh.root, "exp1", "--gpus", "2")
    a = submitted_id(sh.run("gpu_run -g 1 --name a 'sleep 2'"))
    b = submitted_id(sh.run("gpu_run -g 1 --name b 'sleep 2; exit 7'"))
    res = sh.run(STRICT[shell] + "rc=0; gpu_wait a b || rc=$?; echo \"rc=$rc\"", timeout=60)
    assert res.out.splitlines()[-1] == "rc=7"
    runs = [read_fields(inst / "records" / f"{t}.run") for t in (a, b)]
    ends = [read_fields(inst / "records" / f"{t}.result") for t in (a, b)]
    assert float(runs[1]["started"]) < float(ends[0]["ended"])  # side by side
    assert {runs[0]["gpus"], runs[1]["gpus"]} == {"0", "1"}


@needs_namespace
def test_script_arguments_reach_the_script_and_a_retry_keeps_them(start_daemon, tmp_path):
    sh = make_shell("bash", tmp_path)
    inst = sh.root / "exp1"
    start_daemon(sh.root, "exp1", "--gpus", "1")
    (sh.cwd / "args.sh").write_text('for a in "$@"; do echo "[$a]"; done; exit 3\n')
    task = submitted_id(sh.run("gpu_submit --name args args.sh -- --lr '0.1 x' '' \"it's\""))
    assert wait_finished(inst, task) == "failed"
    expected = "[--lr]\n[0.1 x]\n[]\n[it's]\n"
    assert expected in sh.run("gpu_logs args").out
    again = submitted_id(sh.run("gpu_retry args 2>/dev/null"))
    assert wait_finished(inst, again) == "failed"
    assert expected in sh.run(f"gpu_logs {again}").out
    assert sh.run("gpu_show args").out.splitlines()[0] == f"Task:       {again}"


@needs_namespace
def test_logs_and_tail_of_each_rank_of_a_gang(start_daemon, tmp_path):
    sh = make_shell("bash", tmp_path)
    inst = sh.root / "exp1"
    start_daemon(sh.root, "exp1", "--node-rank", "0", "--num-nodes", "2", "--gpus", "1")
    start_daemon(sh.root, "exp1", "--node-rank", "1", "--num-nodes", "2", "--gpus", "1",
                 node_rank=1)
    task = submitted_id(sh.run("gpu_run -n 2 -g 1 --name gang "
                               "'echo \"rank $NODE_RANK of $NNODES\"; sleep 2'"))

    def both_running():
        out = sh.run("gpu_status").out
        return out if re.search(r"^gang +500 running +[01],[01] ", out, re.M) else None

    wait_for(both_running, 30, what="the gang on both nodes")
    res = sh.run("gpu_tail --rank 1 gang; echo \"rc=$?\"", timeout=60)
    assert "rank 1 of 2" in res.out and res.out.endswith("rc=0\n")
    assert wait_finished(inst, task) == "done"
    assert "rank 0 of 2" in sh.run("gpu_logs gang").out
    assert "rank 1 of 2" in sh.run("gpu_logs --rank 1 gang").out
    assert "Log:        " in sh.run("gpu_show gang").out


@needs_namespace
def test_a_daemon_is_known_alive_and_dead_by_its_process_name(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    script = f"""
{shlex.quote(sys.executable)} {DAEMON} --job-id exp1 --queue-root {root} \\
    --poll-interval 0.1 --no-keepalive \\
    > {tmp_path}/daemon.log 2>&1 &
daemon=$!
for _ in $(seq 100); do [ -f {root}/exp1/nodes/node-0.state ] && break; sleep 0.1; done
sleep 0.5
export QUEUE_ROOT={root} JOB_ID=exp1
source {CLIENT}
cat /proc/$daemon/comm
gpu_status | sed -n 2p
kill -9 "$daemon"; wait "$daemon"
gpu_status | sed -n 2p
"""
    log = tmp_path / "out.log"
    with namespace_shell(script, log) as proc:
        proc.wait(60)
    lines = [line for line in log.read_text().splitlines() if "Killed" not in line]
    assert lines[0] == "pm-daemon"
    assert re.fullmatch(r"Daemon:   alive on \S+, pid \d+", lines[1]), lines
    assert re.fullmatch(r"Daemon:   DEAD on \S+, pid \d+: its process \(pid \d+\) is gone",
                        lines[2]), lines


@needs_namespace
def test_a_sweep_waited_for_retried_cleaned_and_read_as_json(start_daemon, tmp_path):
    """A newcomer's day, from the README: a sweep, wait for it, retry what failed, clean up,
    script against --json; in every installed shell, with strict options."""
    for shell in INSTALLED:
        sh = make_shell(shell, tmp_path / shell)
        start_daemon(sh.root, "exp1", "--gpus", "2", "--kill-scope", "task")
        (sh.cwd / "train.py").write_text("import sys\nlr = float(sys.argv[2])\nprint('lr', lr)\n"
                                         "sys.exit(1 if lr > 0.5 else 0)\n")
        script = STRICT[shell] + """
for lr in 0.1 0.2 0.9; do gpu_submit -g 1 --name "lr$lr" train.py -- --lr "$lr" >/dev/null; done
rc=0; gpu_wait train.py >/dev/null || rc=$?; echo "sweep rc=$rc"
gpu_retry lr0.9 >/dev/null 2>&1
rc=0; gpu_wait lr0.9 >/dev/null || rc=$?; echo "retry rc=$rc"
gpu_status --json > status.json
gpu_clean > /dev/null; gpu_status | tail -1
"""
        res = sh.run(script, timeout=120)
        assert res.out.splitlines() == [
            "sweep rc=1", "retry rc=1",
            "Totals:   0 running, 0 pending, 0 done, 0 failed, stopped or cancelled"], res.err
        doc = json.loads((sh.cwd / "status.json").read_text())
        assert sorted((t["display_name"], t["state"], t["args"][1]) for t in doc["recent"]) == [
            ("lr0.1", "done", "0.1"), ("lr0.2", "done", "0.2"), ("lr0.9", "failed", "0.9"),
            ("lr0.9", "failed", "0.9")]
        assert sum(1 for t in doc["recent"] if t["retry_of"]) == 1
        assert all(ID_RE.match(t["id"]) for t in doc["recent"])

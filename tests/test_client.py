"""client.sh, sourced into real bash and zsh processes.

The first part needs no daemon: it checks what the client writes (docs/protocol.md) and what it
prints for queue folders built by hand. The second part runs against the real daemon, always in
its own PID namespace (the ``start_daemon`` fixture of conftest.py), since a stop makes the daemon
kill Python processes. The commands and their options are in test_client_cli.py (with what
needs the daemon's scheduler: dependencies, GPUs, gangs), what gpu_status shows in
test_client_status.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from client_helpers import (
    CLIENT,
    EPOCH,
    ID_RE,
    INTERACTIVE,
    SHELL_ARGV,
    SHELLS,
    Result,
    Shell,
    Terminal,
    build_sample,
    end_session,
    listing,
    local_minute,
    make_instance,
    make_shell,
    run_on_a_full_disk,
    session_members,
    shell_env,
    submitted_id,
    tid,
    tree,
    wait_finished,
    wait_running,
    write_fields,
)
from conftest import REPO, UNSHARE, needs_namespace, read_fields, wait_for

sys.path.insert(0, str(REPO / "bench"))
from status_bench import build_instance  # noqa: E402


@pytest.fixture(params=SHELLS)
def sh(request, tmp_path) -> Shell:
    return make_shell(request.param, tmp_path)

# Submitting #######################################################################################


def test_submit_publishes_a_copy_with_its_record(sh):
    script = sh.cwd / "train.sh"
    script.write_text("echo original\n")
    script.chmod(0o755)
    before = time.time()
    res = sh.run("gpu_submit train.sh")
    task = submitted_id(res)
    assert res.err == (f"gpu_submit: created the instance exp1 in {sh.root}; no daemon is running "
                       "for it yet: the task waits in pending/ until one starts\n")
    prio, stamp, _, name = ID_RE.match(task).groups()
    assert (prio, name) == ("500", "train.sh")
    assert abs(time.mktime(time.strptime(stamp[:15], "%Y%m%d_%H%M%S")) - time.timezone
               - before) < 5
    inst = sh.root / "exp1"
    script.write_text("echo edited later\n")
    copy = inst / "pending" / task
    assert copy.read_text() == "echo original\n"
    assert stat.S_IMODE(copy.stat().st_mode) == 0o700  # the user's bits kept, umask 077
    record = read_fields(inst / "records" / f"{task}.submit")
    assert float(record.pop("submitted")) == pytest.approx(before, abs=5)
    assert record.pop("submitted_by").endswith("@" + os.uname().nodename)
    assert record == {"id": task, "name": "train.sh", "display_name": "", "priority": "500",
                      "source": str(script), "command": "", "cwd": str(sh.cwd), "gpus": "all",
                      "nodes": "1", "after": "", "argc": "0", "retry_of": "",
                      "time_limit": "", "envc": "0"}
    assert json.loads((inst / "control.json").read_text()) == {"protocol": 2, "job_id": "exp1"}
    assert listing(inst / ".staging") == []
    assert listing(inst) == [".staging", "control.json", "pending", "records"]


def test_priority_orders_the_queue_and_ties_are_first_in_first_out(sh):
    for name in ("a.sh", "b.sh", "c.sh", "d.sh"):
        (sh.cwd / name).write_text(f"echo {name}\n")
    ids = [submitted_id(sh.run(f"gpu_submit {name} {prio}"))
           for name, prio in (("a.sh", "500"), ("b.sh", "7"), ("c.sh", ""), ("d.sh", "007"))]
    assert [i[:3] for i in ids] == ["500", "007", "500", "007"]
    order = listing(sh.root / "exp1" / "pending")  # the daemon's run order: byte order of ids
    assert order == [ids[1], ids[3], ids[0], ids[2]]


def test_the_same_script_twice_gives_two_tasks(sh):
    (sh.cwd / "train.sh").write_text("echo hi\n")
    res = sh.run("gpu_submit train.sh; gpu_submit train.sh")
    assert res.rc == 0
    ids = re.findall(r"^Submitted (\S+)$", res.out, re.M)
    assert len(ids) == 2 and ids[0] != ids[1]
    assert listing(sh.root / "exp1" / "pending") == sorted(ids)
    assert res.err.splitlines()[1] == ("gpu_submit: no daemon has started for exp1 yet: the task "
                                       "waits in pending/ until one starts")


def test_submit_says_why_no_daemon_will_run_the_task_yet(sh):
    (sh.cwd / "job.sh").write_text("echo hi\n")
    build_sample(sh.root, alive=False)
    res = sh.run("gpu_submit job.sh")
    assert re.fullmatch(r"gpu_submit: no daemon is alive for exp1 \(no heartbeat for 10m0\ds\): "
                        r"the task waits in pending/ until one starts\n", res.err), res.err
    waiting = sh.root / "waiting"
    waiting.mkdir()  # what submit.sh leaves while the cluster job waits for GPUs
    write_fields(waiting / "job_id.txt", {"backend": "sco", "cluster_job_id": "pt-abc123"})
    res = sh.run("gpu_submit job.sh", job_id="waiting")
    assert res.err == ("gpu_submit: no daemon has started for waiting yet (its cluster job "
                       "pt-abc123 may be waiting): the task waits in pending/ until one starts\n")


def test_resubmitting_a_failed_task_keeps_its_name(sh):
    sample = build_sample(sh.root)
    old = sample.failed[1]
    task = submitted_id(sh.run(f"gpu_submit '{sample.inst}/failed/{old}' 20"))
    assert task.startswith("020-") and task.endswith("-bad.sh")


def test_resubmitting_a_finished_task_runs_it_where_it_was_first_submitted(sh):
    s = build_sample(sh.root)
    origin = sh.root.parent / "origin dir"
    origin.mkdir()
    for task, prio in ((s.failed[1], "007"), (s.done[0], "120")):
        write_fields(s.inst / "records" / f"{task}.submit", {
            "id": task, "name": task.split("-")[-1], "priority": prio, "source": "",
            "command": "python prep.py", "cwd": origin, "submitted": EPOCH,
            "submitted_by": "me@there"})
    res = sh.run(f"gpu_submit '{s.inst}/failed/{s.failed[1]}'")
    task = submitted_id(res)
    assert task.startswith("007-") and task.endswith("-bad.sh")  # its priority, its name
    assert res.err == (f"gpu_submit: resubmitting {s.failed[1]} as first submitted: it runs in "
                       f"{origin}, at priority 007\n")
    record = read_fields(s.inst / "records" / f"{task}.submit")
    assert (record["cwd"], record["source"], record["command"]) == (
        str(origin), f"{s.inst}/failed/{s.failed[1]}", "python prep.py")
    # from inside the instance, done/ alike; a priority given on the command line wins
    res = sh.run(f"gpu_submit done/{s.done[0]} 20", cwd=s.inst)
    task = submitted_id(res)
    assert task.startswith("020-") and task.endswith("-prep.py")
    assert res.err == (f"gpu_submit: resubmitting {s.done[0]} as first submitted: it runs in "
                       f"{origin}, at priority 020\n")
    assert read_fields(s.inst / "records" / f"{task}.submit")["cwd"] == str(origin)


def test_submitting_to_a_daemon_that_shuts_down_says_the_task_waits(sh):
    s = build_sample(sh.root)
    state = s.inst / "nodes" / "node-0.state"
    state.write_text(state.read_text().replace("status=running", "status=stopping"))
    res = sh.run("gpu_run 'echo hi'")
    submitted_id(res)
    assert res.err == ("gpu_run: the daemon of exp1 is shutting down: the task waits in pending/ "
                       "for the next daemon\n")


@pytest.mark.parametrize("script", ["gpu_run 'echo hi'", "gpu_submit ../job.sh"])
def test_a_directory_name_with_a_newline_is_refused(sh, script):
    (sh.cwd / "job.sh").write_text("echo hi\n")
    odd = sh.cwd / "two\nlines"
    odd.mkdir()
    (sh.root / "exp1" / "pending").mkdir(parents=True)
    before = tree(sh.root.parent)
    res = sh.run(script + "\necho \"rc=$?\"", cwd=odd)
    assert (res.out, res.err) == ("rc=2\n", f"{script.split()[0]}: the current directory's name "
                                            "has a newline: cd elsewhere\n")
    assert tree(sh.root.parent) == before


def fake_tool(folder: Path, name: str, body: str) -> None:
    """A stand-in for a coreutils command, first on PATH: body runs, then the real one."""
    folder.mkdir(exist_ok=True)
    tool = folder / name
    tool.write_text(f"#!/bin/sh\n{body}\nexec {shutil.which(name)} \"$@\"\n")
    tool.chmod(0o755)


@pytest.mark.parametrize("script,fail_on,message", [
    ("gpu_submit job.sh", ".submit ", r"cannot write {inst}/records/\S+\.submit"),
    ("gpu_submit job.sh", "if=/dev/null", r"cannot write the task into {inst}/\.staging"),
    ("gpu_run 'echo hi'", "run_echo_hi.sh ", r"cannot write the task into {inst}/\.staging"),
], ids=["record", "copy", "gpu_run"])
def test_a_write_that_fails_at_flush_or_close_publishes_nothing(sh, tmp_path, script, fail_on,
                                                                 message):
    """AFS and NFS report a full quota only at fsync or close: dd reports both."""
    (sh.cwd / "job.sh").write_text("echo hi\n")
    inst = sh.root / "exp1"
    fake_tool(tmp_path / "bin", "dd", 'case "$* " in *"$FAIL_ON"*)\n'
              '  echo "dd: closing output file: Disk quota exceeded" >&2; exit 1 ;; esac')
    res = sh.run(script + "\necho \"rc=$?\"", FAIL_ON=fail_on,
                 PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    assert res.out == "rc=1\n"
    name = script.split()[0]
    assert re.fullmatch(rf"{name}: {message.format(inst=re.escape(str(inst)))} \(dd: closing "
                        r"output file: Disk quota exceeded\)\n", res.err), res.err
    assert (listing(inst / "pending"), listing(inst / "records")) == ([], [])
    assert listing(inst / ".staging") == []


def test_a_first_task_that_cannot_be_written_leaves_no_instance_behind(sh, tmp_path):
    """A submit to an instance that does not exist yet creates it; when the task cannot be
    written (a full disk) the folder goes too, and gpu_list shows no instance that never was.
    An instance that existed stays."""
    (sh.cwd / "job.sh").write_text("echo hi\n")
    fake_tool(tmp_path / "bin", "dd", 'case "$*" in *of=*)\n'
              '  echo "dd: error writing: No space left on device" >&2; exit 1 ;; esac')
    path = f"{tmp_path / 'bin'}:{os.environ['PATH']}"
    res = sh.run("gpu_submit job.sh; echo \"rc=$?\"; gpu_run 'echo hi'; echo \"rc=$?\"",
                 PATH=path)
    assert res.out == "rc=1\nrc=1\n", res.err
    assert res.err.count("No space left on device") == 2, res.err
    assert listing(sh.root) == []
    make_instance(sh.root)
    before = tree(sh.root)
    assert sh.run("gpu_submit job.sh", PATH=path).rc == 1
    assert tree(sh.root) == before


def test_a_rename_that_nfs_reports_failed_but_did_counts_as_done(sh, tmp_path):
    (sh.cwd / "job.sh").write_text("echo hi\n")
    # the rename happens, then the answer is lost: a retransmitted request finds no source
    fake_tool(tmp_path / "bin", "mv", f'{shutil.which("mv")} "$@" || exit\n'
              'echo "mv: cannot move: No such file or directory" >&2; exit 1')
    res = sh.run("gpu_submit job.sh", PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    task = submitted_id(res)
    inst = sh.root / "exp1"
    assert listing(inst / "pending") == [task]
    assert listing(inst / "records") == [f"{task}.submit"]
    assert listing(inst / ".staging") == []


def test_gpu_run_queues_a_script_of_the_command(sh):
    res = sh.run("gpu_run 'python train.py --epochs 10'")
    task = submitted_id(res)
    assert ID_RE.match(task).group(4) == "run_python_train.py_--epochs_10.sh"
    inst = sh.root / "exp1"
    body = (inst / "pending" / task).read_text().splitlines()
    assert body[0] == "#!/usr/bin/env bash"
    assert body[1].startswith("# queued with gpu_run by ") and body[1].endswith(f"from {sh.cwd}")
    assert body[2:] == ["python train.py --epochs 10"]
    record = read_fields(inst / "records" / f"{task}.submit")
    assert (record["name"], record["priority"], record["source"], record["command"],
            record["cwd"]) == ("run_python_train.py_--epochs_10.sh", "500", "",
                               "python train.py --epochs 10", str(sh.cwd))


@pytest.mark.parametrize("command,name", [
    ("echo hi", "run_echo_hi.sh"),
    ("  CUDA_VISIBLE_DEVICES=0,1 swift sft --model 'Qwen/Qwen2.5-7B'  ",
     "run_CUDA_VISIBLE_DEVICES_0_1_swift_sft_--model_Qwen_Qwen2.5-7B.sh"),
    ("cd /data && ./run.sh | tee log.txt", "run_cd_data_._run.sh_tee_log.txt.sh"),
    ("x" * 200, "run_" + "x" * 73 + ".sh"),
    ("'$'", "run_command.sh"),
])
def test_gpu_run_names_the_task_from_the_command(sh, command, name):
    quoted = command.replace("'", "'\\''")
    task = submitted_id(sh.run(f"gpu_run '{quoted}'"))
    assert ID_RE.match(task).group(4) == name
    assert len(name) <= 80


def test_gpu_run_joins_unquoted_words(sh):
    task = submitted_id(sh.run("gpu_run python train.py --lr 1e-4"))
    assert task.endswith("-run_python_train.py_--lr_1e-4.sh")
    body = (sh.root / "exp1" / "pending" / task).read_text()
    assert body.endswith("\npython train.py --lr 1e-4\n")


def test_file_names_are_made_safe_and_keep_their_extension(sh):
    odd = sh.cwd / "my train (v2)+é.sh"
    odd.write_text("echo\n")
    long = sh.cwd / ("L" * 120 + ".py")
    long.write_text("print()\n")
    first = submitted_id(sh.run(f"gpu_submit '{odd.name}'"))
    second = submitted_id(sh.run(f"gpu_submit {long.name}"))
    assert ID_RE.match(first).group(4) == "my_train__v2____.sh"  # ")+é": é is two bytes
    assert ID_RE.match(second).group(4) == "L" * 77 + ".py"


BAD_INPUTS = [  # (script, rc, the message on stderr)
    ("gpu_submit missing.sh", 2, "gpu_submit: no such file: missing.sh\n"),
    ("gpu_submit subdir", 2, "gpu_submit: subdir is a directory, not a script\n"),
    ("gpu_submit /dev/null", 2, "gpu_submit: /dev/null is not a regular file\n"),
    ("gpu_submit job.sh high", 2,
     "gpu_submit: PRIORITY must be a number from 0 to 999 (smaller runs first): 'high'\n"),
    ("gpu_submit job.sh 1000", 2,
     "gpu_submit: PRIORITY must be a number from 0 to 999 (smaller runs first): '1000'\n"),
    ("gpu_submit job.sh -1", 2,
     "gpu_submit: unknown option -1 (gpu_submit --help lists the options)\n"),
    ("gpu_submit", 2, "gpu_submit: usage: gpu_submit [OPTIONS] FILE [PRIORITY] [-- ARGS...] "
     "(gpu_submit --help)\n"),
    ("gpu_submit job.sh 1 2", 2, "gpu_submit: usage: gpu_submit [OPTIONS] FILE [PRIORITY] "
     "[-- ARGS...] (gpu_submit --help)\n"),
    ("gpu_run", 2, "gpu_run: usage: gpu_run [OPTIONS] [--] 'CMD' (gpu_run --help)\n"),
    ("gpu_run '  '", 2, "gpu_run: usage: gpu_run [OPTIONS] [--] 'CMD' (gpu_run --help)\n"),
    ("gpu_run 'echo a\necho b'", 2,
     "gpu_run: the command has a newline: put it in a script and use gpu_submit\n"),
    ("JOB_ID=../x gpu_submit job.sh", 2,
     "gpu_submit: '../x' is not a valid JOB_ID (1-64 of A-Z a-z 0-9 . _ -, not starting with "
     ". or -)\n"),
    ("JOB_ID=../x gpu_run 'echo hi'", 2,
     "gpu_run: '../x' is not a valid JOB_ID (1-64 of A-Z a-z 0-9 . _ -, not starting with "
     ". or -)\n"),
    ("JOB_ID=a/b gpu_status", 2,
     "gpu_status: 'a/b' is not a valid JOB_ID (1-64 of A-Z a-z 0-9 . _ -, not starting with "
     ". or -)\n"),
    ("JOB_ID=.hidden gpu_stop all", 2,
     "gpu_stop: '.hidden' is not a valid JOB_ID (1-64 of A-Z a-z 0-9 . _ -, not starting with "
     ". or -)\n"),
    ("JOB_ID=" + "x" * 65 + " gpu_logs", 2,
     "gpu_logs: '" + "x" * 65 + "' is not a valid JOB_ID (1-64 of A-Z a-z 0-9 . _ -, not "
     "starting with . or -)\n"),
    ("unset JOB_ID; gpu_submit job.sh", 2,
     "gpu_submit: JOB_ID is not set: choose an instance with gpu_use ID (gpu_list shows them)\n"),
    ("JOB_ID= gpu_run 'echo hi'", 2,
     "gpu_run: JOB_ID is not set: choose an instance with gpu_use ID (gpu_list shows them)\n"),
    ("QUEUE_ROOT=$QUEUE_ROOT/typo gpu_submit job.sh", 1,
     "gpu_submit: the queue root {root}/typo does not exist (shared storage not mounted? set "
     "QUEUE_ROOT, or the QUEUE_ROOT= line of submit.conf beside client.sh)\n"),
    ("QUEUE_ROOT=$QUEUE_ROOT/typo gpu_list", 1,
     "gpu_list: the queue root {root}/typo does not exist (shared storage not mounted? set "
     "QUEUE_ROOT, or the QUEUE_ROOT= line of submit.conf beside client.sh)\n"),
    ("QUEUE_ROOT=$PWD/job.sh gpu_status", 1,
     "gpu_status: the queue root {cwd}/job.sh is not a folder (set QUEUE_ROOT, or the "
     "QUEUE_ROOT= line of submit.conf beside client.sh)\n"),
    ("gpu_stop nosuch", 1, "gpu_stop: no such task: nosuch (gpu_status lists the tasks)\n"),
    ("gpu_submit job.sh --lr 1", 2, "gpu_submit: unknown option --lr: arguments for the script "
     "go after --, as in gpu_submit job.sh -- --lr ...\n"),
    ("gpu_submit --lr 1 job.sh", 2, "gpu_submit: unknown option --lr (gpu_submit --help lists "
     "the options)\n"),
    ("gpu_stop ../pending/x", 1, "gpu_stop: no such task: ../pending/x\n"),
    ("gpu_stop", 2, "gpu_stop: usage: gpu_stop NAME...|all (gpu_stop --help)\n"),
    ("gpu_logs nosuch", 1, "gpu_logs: no such task: nosuch (gpu_logs lists the logs)\n"),
    ("gpu_tail nosuch", 1, "gpu_logs: no such task: nosuch (gpu_logs lists the logs)\n"
     .replace("gpu_logs:", "gpu_tail:")),
    ("gpu_tail", 1, "gpu_tail: no task of exp1 has a log yet; gpu_tail NAME waits for a given "
     "task\n"),
    ("JOB_ID=other gpu_status", 1, "gpu_status: no instance other under {root} (gpu_list shows "
     "them)\n"),
    ("gpu_status extra", 2, "gpu_status: usage: gpu_status [-l] [-r N] [-w] [--json] (gpu_status "
     "--help)\n"),
    ("gpu_use a b", 2, "gpu_use: usage: gpu_use [--new] [ID] (gpu_use --help)\n"),
    ("gpu_use ../x", 2, "gpu_use: '../x' is not a valid JOB_ID (1-64 of A-Z a-z 0-9 . _ -, not "
     "starting with . or -)\n"),
    ("gpu_help nope", 127, "gpu_help: no command gpu_nope (gpu_help lists them)\n"),
]


@pytest.mark.parametrize("script,rc,message", BAD_INPUTS, ids=[b[0][:40] for b in BAD_INPUTS])
def test_bad_input_is_refused_with_a_message_and_nothing_written(sh, script, rc, message):
    (sh.cwd / "job.sh").write_text("echo hi\n")
    (sh.cwd / "subdir").mkdir()
    (sh.root / "exp1" / "pending").mkdir(parents=True)  # an instance without tasks
    top = sh.root.parent
    before = tree(top)
    res = sh.run(script + "\necho \"rc=$?\"")
    assert (res.out, res.err) == (f"rc={rc}\n", message.format(root=sh.root, cwd=sh.cwd))
    assert tree(top) == before


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to run the shell as another user")
def test_an_unreadable_file_is_refused(sh, tmp_path):
    secret = sh.cwd / "secret.sh"
    secret.write_text("echo secret\n")
    secret.chmod(0o600)
    for path in (tmp_path, sh.cwd, sh.root, sh.home):
        path.chmod(0o777)
    before = tree(sh.root)
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            *sh.argv("gpu_submit secret.sh; echo \"rc=$?\"")]
    proc = subprocess.run(argv, env=sh.env(), cwd=sh.cwd, capture_output=True, text=True)
    assert (proc.stdout, proc.stderr) == ("rc=2\n", "gpu_submit: cannot read secret.sh\n")
    assert tree(sh.root) == before


def test_fifty_concurrent_gpu_run_publish_fifty_tasks(tmp_path):
    shells = [name for name in SHELL_ARGV if shutil.which(name)]
    root = tmp_path / "root"
    root.mkdir()
    procs = []
    for n in range(50):
        shell = Shell(shells[n % len(shells)], root, tmp_path, tmp_path)
        procs.append(shell.popen(f"gpu_run 'echo task-{n}'"))
    ids = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        ids.append(submitted_id(Result(0, out, err)))
    inst = root / "exp1"
    assert len(set(ids)) == 50
    assert listing(inst / "pending") == sorted(ids)
    assert listing(inst / "records") == sorted(f"{i}.submit" for i in ids)
    bodies = sorted((inst / "pending" / i).read_text().splitlines()[-1] for i in ids)
    assert bodies == sorted(f"echo task-{n}" for n in range(50))
    assert listing(inst / ".staging") == []


# Reading the queue ################################################################################


@pytest.fixture(scope="module")
def big_instance(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("big") / "queue root"
    build_instance(root, "big", 10_000, distinct=100)  # bench/status_bench.py: all distinct
    build_instance(root, "small", 10, distinct=10)  # the same running and pending tasks
    return root


def processes_started(shell: str, env: dict[str, str], script: str) -> int:
    """How many processes ``script`` starts in ``shell``: PIDs count up from 1 in a new PID
    namespace, so the PID of a last ``sh`` tells."""
    argv = [*UNSHARE, *SHELL_ARGV[shell], f'{script}; sh -c \'echo "$$"\'; true']
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.split()[-1]) - 2  # the shell is 1, the last sh is not counted


@needs_namespace
@pytest.mark.parametrize("shell", SHELLS)
def test_status_costs_no_process_per_finished_task(shell, big_instance, tmp_path):
    """gpu_status over 10,000 finished tasks starts as many processes as over 10: its cost does
    not grow with the history (the seconds it takes are bench/status_bench.py's)."""
    env = shell_env(big_instance, "big", tmp_path)
    proc = subprocess.run([*SHELL_ARGV[shell], 'source "$CLIENT"; gpu_status'], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert ("Totals:   1 running, 20 pending, 9000 done, 1000 failed, stopped or cancelled"
            in proc.stdout)
    recent = re.findall(r"^(\S+) +500 (?:done|failed) ", proc.stdout, re.M)
    assert recent == [f"task{n}.sh" for n in range(9999, 9989, -1)]
    script = 'source "$CLIENT"; gpu_status >/dev/null'
    big = processes_started(shell, env, script)
    small = processes_started(shell, shell_env(big_instance, "small", tmp_path), script)
    assert big == small < 200, (big, small)


def test_use_shows_and_switches_the_instance(sh):
    build_sample(sh.root)
    build_sample(sh.root, "exp2")
    res = sh.run("gpu_use; gpu_use exp2; echo \"JOB_ID=$JOB_ID\"; gpu_use")
    assert res.rc == 0, res.err
    assert res.out == (
        "exp1: daemon alive on node-a (pid 4242, up 1h00m); 1 running, 3 pending, 2 done, "
        "3 failed\n"
        "Using exp2: daemon alive on node-a (pid 4242, up 1h00m); 1 running, 3 pending, 2 done, "
        "3 failed\n"
        "JOB_ID=exp2\n"
        "exp2: daemon alive on node-a (pid 4242, up 1h00m); 1 running, 3 pending, 2 done, "
        "3 failed\n")
    res = sh.run("gpu_use '../x'; echo \"rc=$? JOB_ID=$JOB_ID\"")
    assert res.out == "rc=2 JOB_ID=exp1\n"
    res = sh.run("gpu_use; echo \"rc=$?\"", job_id=None)
    assert res.out == "rc=2\n"  # like every other command without JOB_ID
    assert res.err == ("gpu_use: no instance in use (JOB_ID is not set): gpu_use ID switches to "
                       "one, gpu_list shows them\n")


def test_use_of_an_instance_that_does_not_exist_refuses_unless_new(sh):
    build_sample(sh.root)
    build_sample(sh.root, "exp2")
    (sh.root / "not an instance").mkdir()
    before = tree(sh.root)
    res = sh.run("gpu_use nosuch; echo \"rc=$? JOB_ID=$JOB_ID\"")
    assert (res.out, res.err) == ("rc=1 JOB_ID=exp1\n", f"gpu_use: no instance nosuch under "
                                  f"{sh.root}; the instances there: exp1 exp2; gpu_use --new "
                                  "nosuch switches to a new one\n")
    assert tree(sh.root) == before  # and nothing was created
    res = sh.run("gpu_use --new fresh; echo \"rc=$? JOB_ID=$JOB_ID\"; gpu_use")
    assert res.out == (f"Using fresh: no folder yet under {sh.root} (no task queued, no daemon "
                       f"started)\nrc=0 JOB_ID=fresh\nfresh: no folder yet under {sh.root} (no "
                       "task queued, no daemon started)\n"), res.err
    res = sh.run("gpu_use -- exp2 >/dev/null; echo \"JOB_ID=$JOB_ID\"; gpu_use --help >/dev/null; "
                 "echo \"JOB_ID=$JOB_ID\"")
    assert res.out == "JOB_ID=exp2\nJOB_ID=exp2\n"
    empty = sh.root.parent / "empty root"
    empty.mkdir()
    res = sh.run("gpu_use nosuch; echo \"rc=$? JOB_ID=$JOB_ID\"", QUEUE_ROOT=str(empty))
    assert res.err == (f"gpu_use: no instance nosuch under {empty}; there is none yet; gpu_use "
                       "--new nosuch switches to a new one\n")
    res = sh.run("gpu_use x; echo \"rc=$? JOB_ID=$JOB_ID\"", QUEUE_ROOT=str(empty / "gone"))
    assert res.out == "rc=1 JOB_ID=exp1\n"  # a missing root: nothing can be checked


def test_use_exports_job_id_to_child_processes(sh):
    res = sh.run("gpu_use --new other >/dev/null; sh -c 'echo \"child sees $JOB_ID\"'",
                 job_id=None)
    assert res.out == "child sees other\n"


def test_logs_lists_newest_first_and_shows_a_tasks_newest_log(sh):
    s = build_sample(sh.root)
    res = sh.run("gpu_logs")
    assert res.rc == 0, res.err
    rows = res.out.splitlines()
    assert rows[0] == "  SIZE  MODIFIED          TASK"
    names = [row.split()[-1] if not row.endswith("(running)") else row.split()[-2]
             for row in rows[1:]]
    assert names == [s.running, s.failed[0], s.done[1], s.failed[1], s.done[0]]
    assert rows[1].endswith(f"{s.running} (running)")
    assert re.fullmatch(rf" +\d+  {local_minute(s.now - 3 * 86400 - 97)}  {s.failed[0]}",
                        rows[2]), rows[2]
    # train.sh names three tasks: the newest log is the running one's; by id, the old one
    assert sh.run("gpu_logs train").out == "[perpetual-motion] task: x\nepoch 1\n"
    assert sh.run("gpu_logs train.sh").out == "[perpetual-motion] task: x\nepoch 1\n"
    assert sh.run(f"gpu_logs {s.done[1]}").out == f"log of {s.done[1]}\n" + "x" * 200
    assert sh.run("gpu_logs prep").out == f"log of {s.done[0]}\n"
    res = sh.run("gpu_logs eval; echo \"rc=$?\"")
    assert res.out == "rc=1\n"
    assert res.err == ("gpu_logs: task eval is still pending: it has no log yet (gpu_tail eval "
                       "waits for it)\n")
    res = sh.run("gpu_logs never.sh; echo \"rc=$?\"")
    assert (res.out, res.err) == ("rc=1\n", "gpu_logs: task never.sh has no log: it never ran "
                                            "(cancelled)\n")


def test_logs_shows_the_newest_twenty_unless_all(sh):
    logs = sh.root / "exp1" / "logs"
    logs.mkdir(parents=True)
    for n in range(25):
        log = logs / f"{tid(n, 'job.sh')}.log"
        log.write_text("x" * n)
        os.utime(log, (EPOCH + n, EPOCH + n))
    rows = sh.run("gpu_logs").out.splitlines()
    assert len(rows) == 22
    assert rows[1] == f"    24  {local_minute(EPOCH)}  {tid(24, 'job.sh')}"
    assert rows[-1] == "(the newest 20 of 25 logs; gpu_logs --all lists all)"
    assert len(sh.run("gpu_logs --all").out.splitlines()) == 26


# Stopping and shutting down #######################################################################


DEAD_STOP = (r"gpu_stop: no daemon is alive for exp1 \(no heartbeat for 10m0\ds; likely the "
             r"daemon or its node died, or its cluster job ended\): only pending tasks can be "
             r"cancelled\n")


def test_stop_without_a_live_daemon_cancels_pending_tasks_itself(sh):
    s = build_sample(sh.root, alive=False)
    res = sh.run("gpu_stop train; echo \"rc=$?\"")
    assert res.out == f"cancelled {s.pending[1]} (it was pending)\nrc=1\n"
    assert re.fullmatch(
        DEAD_STOP +
        f"gpu_stop: {s.running} is in running/ but its daemon is not alive: a new daemon marks "
        "it interrupted \\(and ends what is left of it on that host\\)\n", res.err), res.err
    assert (s.inst / "failed" / s.pending[1]).exists()
    assert (s.inst / "running" / s.running).exists()
    result = read_fields(s.inst / "records" / f"{s.pending[1]}.result")
    assert float(result.pop("ended")) == pytest.approx(time.time(), abs=10)
    assert result.pop("reason").startswith("cancelled by user (no daemon alive; by ")
    assert result == {"id": s.pending[1], "state": "cancelled", "exit_code": "", "signal": "",
                      "started": "", "duration": "", "host": os.uname().nodename,
                      "node_rank": "", "attempt": "1"}
    res = sh.run("gpu_stop zz_manual; echo \"rc=$?\"")
    fresh = re.fullmatch(r"cancelled zz_manual.sh as (\S+) \(it was pending\)\nrc=0\n", res.out)
    assert fresh and ID_RE.match(fresh.group(1)).group(1, 4) == ("500", "zz_manual.sh"), res.out
    assert read_fields(s.inst / "records" / f"{fresh.group(1)}.result")["state"] == "cancelled"
    assert listing(s.inst / "failed").count(fresh.group(1)) == 1
    res = sh.run("gpu_stop all; echo \"rc=$?\"")
    assert res.out == (f"cancelled {s.pending[0]} (it was pending)\n"
                       "cancelled 1 pending task(s)\nrc=1\n")
    assert listing(s.inst / "pending") == []
    assert listing(s.inst / "commands") == []  # nothing left for a daemon that starts later
    res = sh.run("gpu_stop bad; echo \"rc=$?\"")
    assert (res.out, res.err) == ("rc=1\n", "gpu_stop: task bad is no longer pending or running: "
                                            "it has finished\n")


@needs_namespace
def test_a_cancel_without_a_daemon_on_a_full_disk_leaves_the_task_pending(sh, tmp_path):
    """Without its result a cancelled task would read as failed, and gpu_retry --failed would
    queue it again: on a full disk the cancel fails, says so, and the task stays pending."""
    s = build_sample(sh.root, alive=False)
    after = tmp_path / "after"
    res = run_on_a_full_disk(sh, "gpu_stop eval zz_manual; echo \"rc=$?\"\n"
                                 "command rm -f \"$QUEUE_ROOT/fill\"\n"
                                 "gpu_stop eval >/dev/null 2>&1; echo \"rc=$?\"", after)
    assert res.out == "rc=1\nrc=0\n", res.err
    lines = res.err.splitlines()
    assert lines[0].startswith("gpu_stop: no daemon is alive for exp1 "), res.err
    assert "No space left on device" in lines[1] and "No space left on device" in lines[3]
    assert lines[2] == f"gpu_stop: {s.pending[0]} is not cancelled: it stays pending"
    assert lines[4] == "gpu_stop: zz_manual.sh is not cancelled: it stays pending"
    assert listing(after / "pending") == sorted(s.pending[1:])  # eval, cancelled with room
    assert listing(after / "failed") == sorted([*s.failed, s.pending[0]])
    assert read_fields(after / "records" / f"{s.pending[0]}.result")["state"] == "cancelled"
    assert listing(after / ".staging") == []


def test_a_cancel_that_cannot_move_the_task_says_why(sh, tmp_path):
    s = build_sample(sh.root, alive=False)
    fake_tool(tmp_path / "bin", "mv", 'echo "mv: cannot move: Read-only file system" >&2; exit 1')
    res = sh.run("gpu_stop eval; echo \"rc=$?\"", PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    assert res.out == "rc=1\n"
    assert res.err.splitlines()[1:] == [
        f"gpu_stop: cannot cancel {s.pending[0]}: it stays pending (mv: cannot move: Read-only "
        "file system)"], res.err
    assert listing(s.inst / "pending") == sorted(s.pending)


def test_stop_of_several_names_without_a_live_daemon(sh):
    s = build_sample(sh.root, alive=False)
    before = {d: listing(s.inst / d) for d in ("pending", "running", "failed", "records")}
    res = sh.run("gpu_stop eval nosuch; echo \"rc=$?\"")
    assert res.out == "rc=1\n"
    assert res.err == ("gpu_stop: no such task: nosuch (gpu_status lists the tasks)\n"
                       "gpu_stop: nothing was stopped\n")
    assert {d: listing(s.inst / d) for d in before} == before
    res = sh.run("gpu_stop eval eval.sh; echo \"rc=$?\"")  # one task, named twice
    assert res.out == f"cancelled {s.pending[0]} (it was pending)\nrc=0\n"
    assert listing(s.inst / "pending") == sorted(s.pending[1:])


def test_an_offline_cancel_never_replaces_an_earlier_task_of_that_name(sh):
    """protocol "Finish": a name that is no client id, or one that has a result already (a
    finished task renamed back into pending/), is cancelled under a fresh id."""
    s = build_sample(sh.root, alive=False)
    (s.inst / "failed" / "zz_manual.sh").write_text("echo the first one\n")
    again = s.failed[1]  # failed with exit 3; its script renamed back into pending/
    (s.inst / "failed" / again).rename(s.inst / "pending" / again)
    result_before = (s.inst / "records" / f"{again}.result").read_bytes()
    res = sh.run("gpu_stop zz_manual; gpu_stop bad; echo \"rc=$?\"")
    first, second = re.findall(r"^cancelled \S+ as (\S+) \(it was pending\)$", res.out, re.M)
    assert res.out.endswith("rc=0\n") and re.fullmatch(f"({DEAD_STOP}){{2}}",
                                                        res.err), res.err
    assert ID_RE.match(first).group(1, 4) == ("500", "zz_manual.sh")
    assert ID_RE.match(second).group(1, 4) == ("500", "bad.sh") and second != again
    assert (s.inst / "failed" / "zz_manual.sh").read_text() == "echo the first one\n"
    assert (s.inst / "failed" / first).read_text() == "echo next\n"
    assert (s.inst / "records" / f"{again}.result").read_bytes() == result_before
    assert not (s.inst / "records" / "zz_manual.sh.result").exists()
    for task in (first, second):
        assert read_fields(s.inst / "records" / f"{task}.result")["state"] == "cancelled"
    assert listing(s.inst / "pending") == s.pending[:2]


def test_a_task_queued_before_any_daemon_can_be_cancelled(sh):
    (sh.cwd / "train.sh").write_text("echo hi\n")
    task = submitted_id(sh.run("gpu_submit train.sh"))
    inst = sh.root / "exp1"
    res = sh.run("gpu_stop train; echo \"rc=$?\"")
    assert (res.out, res.err) == (
        f"cancelled {task} (it was pending)\nrc=0\n",
        "gpu_stop: no daemon is alive for exp1: only pending tasks can be cancelled\n")
    assert listing(inst) == [".staging", "control.json", "failed", "pending", "records"]
    assert listing(inst / "failed") == [task]
    assert read_fields(inst / "records" / f"{task}.result")["state"] == "cancelled"
    assert ("Totals:   0 running, 0 pending, 0 done, 1 failed, stopped or cancelled"
            in sh.run("gpu_status").out)


def test_tail_of_a_pending_task_waits_for_it_and_returns_with_its_exit_code(sh):
    s = build_sample(sh.root)
    tail = sh.popen("gpu_tail eval; echo \"rc=$?\"")
    try:
        time.sleep(0.5)
        task = s.pending[0]
        (s.inst / "pending" / task).rename(s.inst / "running" / task)  # the daemon claims it
        log = s.inst / "logs" / f"{task}.log"
        log.write_text("[perpetual-motion] task: eval\n")
        assert tail.stdout.readline() == "[perpetual-motion] task: eval\n"
        with log.open("a") as out:
            out.write("[perpetual-motion] exited with status 7 after 1.0 s\n")
        write_fields(s.inst / "records" / f"{task}.result",
                     {"id": task, "state": "failed", "exit_code": 7, "reason": "exit status 7"})
        out, err = tail.communicate(timeout=10)
    finally:
        left = end_session(tail)
    assert left == []  # it ended by itself, and left nothing behind
    assert out == "[perpetual-motion] exited with status 7 after 1.0 s\nrc=7\n"
    assert err == (f"gpu_tail: task {task} is pending: waiting for it to start\n"
                   f"gpu_tail: following {s.inst}/logs/{task}.log (Ctrl-C to stop)\n"
                   f"gpu_tail: {task} ended: failed (exit status 7)\n")


class FakeDaemon(threading.Thread):
    """Node 0's command handling, by hand: it records every command it sees, takes it (removes
    it) and answers with the fields ``answer(fields)`` returns (no reply when None). Without
    ``answer`` it leaves the commands where they are: a daemon that has not seen them yet."""

    def __init__(self, inst: Path, answer=None):
        super().__init__(daemon=True)
        self.inst, self.answer = inst, answer
        self.seen: dict[str, dict[str, str]] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            for path in sorted((self.inst / "commands").glob("*.cmd")):
                if path.name in self.seen:
                    continue
                try:
                    self.seen[path.name] = read_fields(path)
                except FileNotFoundError:  # withdrawn meanwhile
                    continue
                if self.answer is None:
                    continue
                reply = self.answer(self.seen[path.name])
                if reply is not None:
                    staged = self.inst / ".staging" / f".{path.stem}.reply"
                    write_fields(staged, {**reply, "handled": time.time()})
                    staged.rename(self.inst / "replies" / f"{path.stem}.reply")
                path.unlink()

    def __enter__(self) -> FakeDaemon:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.join(5)


def test_a_command_without_a_reply_is_withdrawn(sh):
    s = build_sample(sh.root)  # looks alive, but nobody answers
    start = time.monotonic()
    with FakeDaemon(s.inst) as watcher:
        res = sh.run("gpu_stop eval; echo \"rc=$?\"", GPU_REPLY_TIMEOUT="1")
    assert 1 <= time.monotonic() - start < 10
    [(name, fields)] = watcher.seen.items()  # what the daemon would have read
    assert re.fullmatch(r"[0-9]{8}_[0-9]{6}_[0-9]{9}-[0-9a-f]{8}\.cmd", name)
    assert res.out == "rc=1\n"
    assert res.err == ("gpu_stop: no reply from the daemon within 1 s: the command is withdrawn "
                       f"(commands/{name} removed), so no daemon carries it out later; on NFS, "
                       "try again with a larger GPU_REPLY_TIMEOUT\n")
    assert listing(s.inst / "commands") == []  # a later daemon finds nothing to carry out
    assert listing(s.inst / ".staging") == []
    assert float(fields.pop("sent")) == pytest.approx(time.time(), abs=10)
    assert fields.pop("sent_by").endswith("@" + os.uname().nodename)
    started = read_fields(s.inst / "nodes" / "node-0.state")["started"]
    assert fields == {"action": "stop", "task": s.pending[0], "daemon_started": started}


@pytest.mark.parametrize("value", ["abc", "-1", "2.5", "1e3", "99999999"])
def test_a_reply_timeout_that_is_no_number_of_seconds_is_refused_before_asking(sh, value):
    """GPU_REPLY_TIMEOUT=abc waited 15 s and then said 'no reply within abc s'."""
    s = build_sample(sh.root)
    before = tree(s.inst)
    for command in ("gpu_stop eval", "gpu_stop all", "gpu_shutdown"):
        start = time.monotonic()
        res = sh.run(f"{command}; echo \"rc=$?\"", GPU_REPLY_TIMEOUT=value)
        assert time.monotonic() - start < 5
        name = command.split()[0]
        assert (res.out, res.err) == ("rc=2\n", f"{name}: GPU_REPLY_TIMEOUT wants whole seconds "
                                                 f"from 0 to 86400, not '{value}'\n")
        assert tree(s.inst) == before  # no command was sent


def test_a_command_the_daemon_took_without_answering_is_reported(tmp_path):
    shell = Shell("bash", tmp_path / "root", tmp_path, tmp_path)
    s = build_sample(shell.root)
    with FakeDaemon(s.inst, answer=lambda fields: None):
        res = shell.run("gpu_shutdown; echo \"rc=$?\"", GPU_REPLY_TIMEOUT="1")
    assert res.out.splitlines()[-1] == "rc=1"
    assert res.err == ("gpu_shutdown: the daemon took the command but sent no reply within 1 s; "
                       "gpu_status shows what happened\n")


def test_every_command_names_the_daemon_it_is_meant_for(sh):
    s = build_sample(sh.root)
    state = s.inst / "nodes" / "node-0.state"
    started = "1799996400.250"  # copied verbatim, not as a number: "1799996400.25" differs
    state.write_text(re.sub(r"^started=.*$", f"started={started}", state.read_text(), flags=re.M))

    def answer(fields):
        action = fields["action"]
        if action == "stop":
            return {"action": action, "task": fields["task"], "result": "cancelled"}
        if action == "stop_all":
            return {"action": action, "task": "", "result": "ok", "cancelled_count": 0,
                    "stopped": ""}
        return {"action": action, "task": "", "result": "accepted"}

    with FakeDaemon(s.inst, answer) as daemon:
        res = sh.run("gpu_stop eval; gpu_stop all; gpu_shutdown")
    assert res.rc == 0, res.err
    assert [(f["action"], f["daemon_started"]) for f in daemon.seen.values()] == [
        ("stop", started), ("stop_all", started), ("shutdown", started)]
    assert listing(s.inst / "replies") == []


@pytest.mark.parametrize("backend,lines", [
    ("sco", ["Cluster job: pt-abc123 (sco)", "Delete it to release the GPUs:",
             "  sco acp jobs delete --workspace-name=share-space pt-abc123"]),
    ("sco+profile", ["Cluster job: pt-abc123 (sco)", "Delete it to release the GPUs:",
                     "  sco --profile=lab acp jobs delete --workspace-name=share-space pt-abc123"]),
    ("slurm", ["Cluster job: 4711 (slurm)", "Delete it to release the GPUs:", "  scancel 4711"]),
    ("local", ["Cluster job: local-999 (local)", "It ends with the daemon; if it does not:",
               "  kill 999"]),
    ("local+host", ["Cluster job: local-999 (local)",
                    "It ends with the daemon; if it does not (on login-3):", "  kill 999"]),
    (None, ["No job_id.txt in {inst}: the daemon was not started with submit.sh.",
            "If it runs as a cluster job, delete that job to release the GPUs."]),
])
def test_shutdown_prints_the_cluster_job_and_how_to_delete_it(sh, backend, lines):
    s = build_sample(sh.root, alive=False)
    job = {"sco": "pt-abc123", "slurm": "4711", "local": "local-999"}  # +variant: one more key
    if backend:
        fields = {"backend": backend.split("+")[0], "cluster_job_id": job[backend.split("+")[0]],
                  "job_name": "ydj-exp1", "workspace": "share-space", "pid": 999}
        if backend.endswith("+profile"):
            fields["profile"] = "lab"
        if backend.endswith("+host"):
            fields["host"] = "login-3"
        write_fields(s.inst / "job_id.txt", fields)
    res = sh.run("gpu_shutdown; echo \"rc=$?\"")
    assert re.fullmatch(r"gpu_shutdown: no daemon is alive for exp1 \(no heartbeat for "
                        r"10m0\ds\): nothing to shut down\n", res.err), res.err
    assert res.out.splitlines() == [line.format(inst=s.inst) for line in lines] + ["rc=1"]
    assert listing(s.inst / "commands") == []


# The library in the user's shell ##################################################################


COMMANDS = ["use", "list", "submit", "run", "status", "show", "logs", "tail", "wait", "retry",
            "hold", "release", "priority", "stop", "clean", "drain", "resume", "shutdown", "help"]


def test_help_lists_every_command(sh):
    res = sh.run("gpu_help")
    assert res.rc == 0 and res.err == ""
    for command in ("gpu_use [--new] [ID]", "gpu_list [--json]",
                    "gpu_submit [OPTIONS] FILE [PRIORITY] [-- ARGS...]",
                    "gpu_run [OPTIONS] [--] 'CMD'", "gpu_status [-l] [-r N] [-w] [--json]",
                    "gpu_show NAME", "gpu_logs [-n N] [--rank R] [-a] [PATTERN]",
                    "gpu_tail [-n N] [--rank R] [NAME]", "gpu_wait [--timeout S] NAME...",
                    "gpu_retry [OPTIONS] NAME...|--failed", "gpu_hold NAME...",
                    "gpu_release NAME...", "gpu_priority NAME PRIORITY|top",
                    "gpu_stop NAME...|all",
                    "gpu_clean [--older-than DAYS] [--keep N] [--dry-run]",
                    "gpu_drain [--node RANK]... [REASON]",
                    "gpu_resume [--node RANK]...", "gpu_shutdown", "gpu_help [COMMAND]"):
        assert re.search(rf"^  {re.escape(command)}( +\S|$)", res.out, re.M), command
    assert [f"gpu_{c}" for c in COMMANDS] == re.findall(r"^  (gpu_\w+)", res.out, re.M)
    assert "Return codes: 0 ok, 1 failed" in res.out
    assert "QUEUE_ROOT=" + str(sh.root) in res.out
    assert max(len(line) for line in res.out.splitlines()) <= 100
    submit = sh.run("gpu_help submit")
    assert submit.out.splitlines()[:4] == [
        "usage: gpu_submit [OPTIONS] FILE [PRIORITY] [-- ARGS...]",
        "  queue a copy of FILE, to run with ARGS where you are", "", "options:"]
    for option in ("-p, --priority PRIO", "-g, --gpus N", "-n, --nodes N", "--after NAME",
                   "--name NAME", "-h, --help"):
        assert re.search(rf"^  {re.escape(option)} +\S", submit.out, re.M), option
    assert sh.run("gpu_help gpu_stop").out == sh.run("gpu_stop --help").out


@pytest.mark.parametrize("command", ["gpu_list x", "gpu_status x", "gpu_shutdown x",
                                     "gpu_logs a b", "gpu_tail a b", "gpu_stop",
                                     "gpu_help a b", "gpu_show", "gpu_show a b", "gpu_wait",
                                     "gpu_retry", "gpu_clean x"])
def test_extra_arguments_are_usage_errors(sh, command):
    res = sh.run(command + "\necho \"rc=$?\"")
    assert res.out == "rc=2\n"
    name = command.split()[0]
    assert res.err.startswith(f"{name}: usage: {name}")
    assert res.err.endswith(f" ({name} --help)\n")


STRICT = {
    "bash": "set -euo pipefail\nopts() { set +o; shopt -p; }\n",
    "zsh": "setopt nounset errexit pipefail\nopts() { setopt; }\n",
}


def test_sourcing_and_commands_under_strict_options(sh):
    (sh.cwd / "job.sh").write_text("echo hi\n")
    build_sample(sh.root)
    script = STRICT[sh.name] + """
opts > "$HOME/before"
source "$CLIENT"
gpu_help >/dev/null
gpu_submit job.sh 010 >/dev/null 2>&1
gpu_run 'echo hi' >/dev/null 2>&1
gpu_status >/dev/null
gpu_list >/dev/null
gpu_logs >/dev/null
gpu_logs train >/dev/null
gpu_use >/dev/null
gpu_use exp1 >/dev/null
gpu_status --json >/dev/null
gpu_list --json >/dev/null
gpu_show train >/dev/null 2>&1
gpu_wait prep >/dev/null
gpu_tail prep >/dev/null 2>&1
gpu_clean --dry-run >/dev/null
gpu_tail bad >/dev/null 2>&1 || echo "tail of a failed task: $?"
gpu_wait bad >/dev/null || echo "wait of a failed task: $?"
gpu_retry bad >/dev/null 2>&1
if gpu_stop nosuch 2>/dev/null; then echo "stop of nothing succeeded"; fi
gpu_submit missing.sh 2>/dev/null || echo "missing: $?"
JOB_ID='../x' gpu_status 2>/dev/null || echo "bad id: $?"
opts > "$HOME/after"
cmp -s "$HOME/before" "$HOME/after" && echo "options kept"
echo "survived"
"""
    res = sh.run(script, source=False)
    assert (res.rc, res.out) == (0, "tail of a failed task: 3\nwait of a failed task: 3\n"
                                    "missing: 2\nbad id: 2\noptions kept\nsurvived\n"), res.err


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_options_that_change_how_code_reads_neither_break_nor_warn(tmp_path):
    """A zsh user's hygiene options (warn_create_global warns of every global a function
    creates) and those that change words, quotes and arrays: sourcing is silent, from a function as
    plugin managers source, and the commands work."""
    sh = make_shell("zsh", tmp_path)
    (sh.cwd / "job.sh").write_text("echo hi\n")
    build_sample(sh.root)
    script = """
setopt warn_create_global warn_nested_var ksh_arrays no_clobber sh_word_split extended_glob \
  glob_subst rc_quotes csh_junkie_quotes nounset err_return pipefail
setopt > "$HOME/before"
source "$CLIENT"
load() { source "$CLIENT"; }
load
in_a_function() { gpu_use exp1; }
in_a_function >/dev/null
gpu_submit job.sh >/dev/null
gpu_status >/dev/null
gpu_show prep >/dev/null
gpu_list >/dev/null
setopt > "$HOME/after"
cmp -s "$HOME/before" "$HOME/after" && echo "options kept"
"""
    res = sh.run(script, source=False)
    assert (res.rc, res.out, res.err) == (0, "options kept\n", "")


TRAPS = {  # the user's traps write one line each time they run
    "bash": "set -ET\ntrap 'echo ERR >> \"$HOME/traps\"' ERR\n"
            "trap 'echo DEBUG >> \"$HOME/traps\"' DEBUG\n"
            "trap 'echo RETURN >> \"$HOME/traps\"' RETURN\n",
    "zsh": "TRAPZERR() { echo ERR >> \"$HOME/traps\"; }\n"
           "trap 'echo DEBUG >> \"$HOME/traps\"' DEBUG\n",
}


def test_the_users_err_debug_and_return_traps_stay_out_of_the_commands(sh):
    (sh.cwd / "job.sh").write_text("echo hi\n")
    build_sample(sh.root)
    script = 'source "$CLIENT"\n' + TRAPS[sh.name] + """
gpu_status >/dev/null; gpu_list >/dev/null; gpu_submit job.sh >/dev/null 2>&1
gpu_logs train >/dev/null; gpu_show prep >/dev/null; gpu_wait prep >/dev/null
trap - DEBUG
"""
    res = sh.run(script, source=False)
    assert res.rc == 0, res.err
    fired = (sh.home / "traps").read_text().splitlines()
    # they run on the way into the subshell, not for every command inside (hundreds of times)
    assert "ERR" not in fired  # every call succeeds: its own failed tests are no errors
    assert len(fired) <= 7 * 15, fired  # seven commands


LEAK_CHECK = {
    "bash": r"""
snapshot() {
  declare -p | grep -Ev '^declare -[-a-zA-Z]* (_|BASH_.*|BASHPID|PIPESTATUS|RANDOM|SRANDOM'\
'|SECONDS|LINENO|EPOCHSECONDS|EPOCHREALTIME|FUNCNAME|OLDPWD)='
  declare -F; alias; trap -p; set +o; shopt -p
}
""",
    "zsh": r"""
snapshot() {
  local name
  for name in ${(ko)parameters}; do
    case ${parameters[$name]} in *special*|*local*) continue ;; esac
    typeset -p $name
  done
  print -l ${(ko)functions}; alias; alias -g; trap; setopt
}
""",
}


def test_nothing_leaks_into_the_shell_but_job_id_and_the_functions(sh):
    (sh.cwd / "job.sh").write_text("echo hi\n")
    build_sample(sh.root)
    script = LEAK_CHECK[sh.name] + r"""
snapshot >/dev/null  # zsh loads some modules' parameters on first sight
snapshot > "$HOME/before"
source "$CLIENT"
gpu_help >/dev/null; gpu_submit job.sh 2>/dev/null; gpu_run 'echo x' 2>/dev/null
gpu_status >/dev/null; gpu_list >/dev/null; gpu_logs >/dev/null; gpu_logs train >/dev/null
gpu_stop nosuch 2>/dev/null; gpu_stop eval 2>/dev/null; gpu_shutdown >/dev/null 2>&1
gpu_status --json >/dev/null; gpu_list --json >/dev/null; gpu_show prep >/dev/null
gpu_wait prep >/dev/null; gpu_tail prep >/dev/null 2>&1; gpu_clean --dry-run >/dev/null
gpu_retry bad >/dev/null 2>&1; gpu_run -p 1 -g all --name n -- -x >/dev/null 2>&1
gpu_use --new x1 >/dev/null
snapshot > "$HOME/after"
"""
    res = sh.run(script, job_id="exp1", source=False, GPU_REPLY_TIMEOUT="0")
    assert res.rc == 0, res.err
    before = (sh.home / "before").read_text().splitlines()
    after = (sh.home / "after").read_text().splitlines()
    added = [line for line in after if line not in before]
    removed = [line for line in before if line not in after and "JOB_ID" not in line]
    assert removed == []
    job_id = [line for line in added if "JOB_ID" in line]
    others = [line for line in added if "JOB_ID" not in line]
    assert len(job_id) <= 2 and "x1" in job_id[-1]
    functions = [name.removeprefix("declare -f ") for name in others]
    assert functions and all(re.fullmatch(r"_?gpu_\w+", name) for name in functions), others


def test_user_aliases_and_functions_do_not_change_the_commands(sh):
    (sh.cwd / "job.sh").write_text("echo hi\n")
    s = build_sample(sh.root, alive=False)
    prelude = {
        "bash": "shopt -s expand_aliases\n",
        "zsh": "alias -g L='| less' G='| grep x' H='| head -1' N='>/dev/null'\n",
    }[sh.name]
    script = prelude + """
alias ls='ls -F --color=always' rm='rm -i' cp='cp -i' mv='mv -i' sort='sort -r' cat='echo CAT'
alias sed='sed --posix' head='echo HEAD' date='echo DATE' local='echo LOCAL' printf='echo P'
wc() { echo 12345; }
tail() { echo TAIL; }
source "$CLIENT"
gpu_submit job.sh 001 | command sed 's/-[0-9_]*-[0-9a-f]*-/-ID-/'
gpu_status | command sed -n 's/^Totals: *//p'
gpu_stop eval 2>/dev/null
gpu_logs prep
alias ls
"""
    if sh.name == "bash":
        script += "shopt -q expand_aliases && echo 'aliases still on'\n"
    else:
        script += "[[ -o aliases ]] && echo 'aliases still on'\n"
    res = sh.run(script, source=False)
    assert res.out == (
        "Submitted 001-ID-job.sh\n"
        "1 running, 4 pending, 2 done, 3 failed, stopped or cancelled\n"
        f"cancelled {s.pending[0]} (it was pending)\n"
        f"log of {s.done[0]}\n"
        + ("alias ls='ls -F --color=always'\n" if sh.name == "bash"
           else "ls='ls -F --color=always'\n")
        + "aliases still on\n"), res.err


CD_PRINTS = {  # a user's shell where cd prints where it went
    "bash": 'cd() { builtin cd "$@" && echo "now in $PWD"; }\n',
    "zsh": 'chpwd() { echo "now in $PWD"; }\n',
}


def test_a_cd_that_prints_changes_neither_the_client_folder_nor_clean(sh, tmp_path):
    """The user's cd function (bash) or chpwd hook (zsh) prints on every cd: the client still
    finds the submit.conf beside it, and gpu_clean removes the tasks it says it removes."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    shutil.copy(CLIENT, checkout / "client.sh")
    (checkout / "submit.conf").write_text(f"QUEUE_ROOT='{sh.root}'\n")
    s = build_sample(sh.root)
    sh = Shell(sh.name, sh.root, sh.home, sh.cwd, client=checkout / "client.sh")
    script = CD_PRINTS[sh.name] + """
source "$CLIENT"
gpu_status | command head -n 1
gpu_clean --keep 1
"""
    res = sh.run(script, source=False, QUEUE_ROOT=None)
    assert res.rc == 0, res.err
    lines = res.out.splitlines()
    assert lines[0] == f"Instance: exp1 ({s.inst})", res.out
    assert lines[-1] == "removed 4 finished task(s) of exp1; kept 1", res.out
    assert "now in" not in res.out
    assert listing(s.inst / "done") + listing(s.inst / "failed") == [s.failed[2]]
    assert listing(s.inst / ".staging") == []


def test_bash_completes_commands_options_task_names_and_instances(tmp_path):
    shell = Shell("bash", tmp_path / "root", tmp_path, tmp_path)
    s = build_sample(shell.root)
    build_sample(shell.root, "exp2")
    script = """
complete -p gpu_stop gpu_logs gpu_tail gpu_use gpu_wait gpu_show gpu_retry gpu_submit gpu_help
c() { COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _gpu_complete_bash
      echo "$* -> ${COMPREPLY[*]}"; }
c gpu_stop ""
c gpu_stop tr
c gpu_logs pr
c gpu_tail 500-20270115_080004
c gpu_use ex
c gpu_stop train.sh ""
c gpu_wait train.sh ev
c gpu_show pr
c gpu_submit --a
c gpu_submit -g ""
c gpu_run --after ev
c gpu_logs --rank ""
c gpu_help st
c gpu_status -
"""
    res = shell.run(script)
    assert res.rc == 0, res.err
    assert res.out.splitlines() == [
        "complete -F _gpu_complete_bash gpu_stop",
        "complete -F _gpu_complete_bash gpu_logs",
        "complete -F _gpu_complete_bash gpu_tail",
        "complete -F _gpu_complete_bash gpu_use",
        "complete -F _gpu_complete_bash gpu_wait",
        "complete -F _gpu_complete_bash gpu_show",
        "complete -F _gpu_complete_bash gpu_retry",
        "complete -o default -F _gpu_complete_bash gpu_submit",
        "complete -F _gpu_complete_bash gpu_help",
        f"gpu_stop  -> {s.pending[0]} {s.running} {s.pending[1]} all eval.sh train.sh "
        "zz_manual.sh",
        "gpu_stop tr -> train.sh",
        "gpu_logs pr -> prep.py",
        f"gpu_tail 500-20270115_080004 -> {s.done[0]}",
        "gpu_use ex -> exp1 exp2",
        f"gpu_stop train.sh  -> {s.pending[0]} {s.running} {s.pending[1]} eval.sh train.sh "
        "zz_manual.sh",  # several names: the next one, never "all"
        "gpu_wait train.sh ev -> eval.sh",
        "gpu_show pr -> prep.py",
        "gpu_submit --a -> --after",
        "gpu_submit -g  -> all",
        "gpu_run --after ev -> eval.sh",
        "gpu_logs --rank  -> ",
        "gpu_help st -> status stop",
        "gpu_status - -> --help --json --long --recent --watch -h -l -r -w",
    ]


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completes_commands_options_task_names_and_instances(tmp_path):
    shell = Shell("zsh", tmp_path / "root", tmp_path, tmp_path)
    s = build_sample(shell.root)
    script = """
autoload -Uz compinit && compinit -u -D
source "$CLIENT"
print -r -- "$_comps[gpu_stop] $_comps[gpu_wait] $_comps[gpu_clean] $_comps[gpu_use]"
compadd() { print -r -- "${(P)2}"; }
_files() { print -r -- FILES; }
c() { words=("$@"); CURRENT=$#; PREFIX=${words[CURRENT]}; _gpu_complete_zsh; }
c gpu_stop ''
c gpu_use ''
c gpu_wait train.sh ''
c gpu_clean --
c gpu_submit ''
c gpu_submit -p 5 --name x ''
"""
    res = shell.run(script, source=False)
    assert res.rc == 0, res.err
    assert res.out.splitlines() == [
        "_gpu_complete_zsh _gpu_complete_zsh _gpu_complete_zsh _gpu_complete_zsh",
        f"{s.pending[0]} {s.running} {s.pending[1]} all eval.sh train.sh zz_manual.sh",
        "exp1",
        f"{s.pending[0]} {s.running} {s.pending[1]} bad.sh eval.sh prep.py train.sh zz_manual.sh",
        "--dry-run --help --keep --older-than -h",
        "FILES",
        "FILES",
    ]


def test_shellcheck_is_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    res = subprocess.run(["shellcheck", "-s", "bash", str(CLIENT)], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout


@pytest.mark.parametrize("shell", SHELLS)
def test_the_file_parses_and_sources_silently(shell, tmp_path):
    check = subprocess.run([shell, "-n", str(CLIENT)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    res = subprocess.run([*SHELL_ARGV[shell], 'source "$CLIENT"; echo "rc=$?"'],
                         env=shell_env(tmp_path / "none", None, tmp_path), capture_output=True,
                         text=True)
    assert (res.stdout, res.stderr) == ("rc=0\n", "")


# Following a log in an interactive shell ##########################################################


def test_tail_follows_live_and_ctrl_c_returns_to_the_shell(sh):
    s = build_sample(sh.root)
    log = s.inst / "logs" / f"{s.running}.log"
    env = sh.env(PS1="$ ", PROMPT="$ ", TERM="dumb")
    term = Terminal(INTERACTIVE[sh.name], env, sh.cwd)
    try:
        term.send('source "$CLIENT"; gpu_tail\r')
        term.expect("epoch 1")
        with log.open("a") as out:
            out.write("epoch 2\n")
        term.expect("epoch 2")
        term.send("\x03")
        term.send("echo back $((6 * 7)) in $JOB_ID\r")
        term.expect("back 42 in exp1")
        # what Ctrl-C ended is gone (a moment to be reaped): the shell alone is left
        wait_for(lambda: len(session_members(term.pid)) == 1, 5, what="gpu_tail to be gone")
    finally:
        term.close()


# Against the real daemon ##########################################################################


@needs_namespace
def test_e2e_queue_before_the_daemon_then_run_inspect_and_list(sh, start_daemon):
    (sh.cwd / "train.sh").write_text('echo "ran in $PWD as $TASK_SHORT_NAME"\nexit 3\n')
    first = submitted_id(sh.run("gpu_submit train.sh"))
    second = submitted_id(sh.run("gpu_run 'echo hello from gpu_run'"))
    daemon = start_daemon(sh.root, "exp1")
    inst = sh.root / "exp1"
    assert wait_finished(inst, first) == "failed"
    assert wait_finished(inst, second) == "done"
    log = sh.run("gpu_logs train").out.splitlines()
    assert log[0] == f"[perpetual-motion] task: {first}"
    assert f"ran in {sh.cwd} as train.sh" in log
    assert log[-1].startswith("[perpetual-motion] exited with status 3 after ")
    assert "hello from gpu_run" in sh.run("gpu_logs run_echo_hello_from_gpu_run").out
    status = sh.run("gpu_status")
    assert status.rc == 0, status.err
    pid = daemon.state()["pid"]
    assert f"\nDaemon:   alive on {os.uname().nodename}, pid {pid}\n" in status.out
    assert re.search(r"^train.sh +500 failed +0 +- +\S+ ago +3  train.sh$", status.out, re.M)
    assert re.search(r"^run_echo_hel…_gpu_run\.sh +500 done +0 +- +\S+ ago +0  echo hello "
                     r"from gpu_run$", status.out, re.M), status.out
    assert status.out.endswith("Totals:   0 running, 0 pending, 1 done, 1 failed, stopped or "
                               "cancelled\n")
    listed = sh.run("gpu_list").out.splitlines()[1]
    assert re.match(rf"\* exp1 +alive +1/1 +{re.escape(os.uname().nodename[:8])}", listed)
    assert sh.run("gpu_submit train.sh").err == ""  # a live daemon: no note


@needs_namespace
def test_e2e_stop_running_pending_finished_and_unknown(sh, start_daemon):
    inst = sh.root / "exp1"
    start_daemon(sh.root, "exp1", "--kill-scope", "task")
    (sh.cwd / "train.sh").write_text("echo started; sleep 60\n")
    first = submitted_id(sh.run("gpu_submit train.sh 100"))
    second = submitted_id(sh.run("gpu_submit train.sh 200"))
    wait_running(inst, first)
    res = sh.run(f"gpu_stop {second}")  # named by id: the pending one
    assert (res.rc, res.out, res.err) == (0, f"cancelled {second} (it was pending)\n", "")
    res = sh.run("gpu_stop train")  # now it names only the running one
    assert (res.rc, res.err) == (0, "")
    assert res.out == f"stopped {first} (SIGTERM sent, SIGKILL after 2 s)\n"
    assert wait_finished(inst, first) == "failed"
    assert read_fields(inst / "records" / f"{first}.result")["state"] == "stopped"
    assert read_fields(inst / "records" / f"{second}.result")["state"] == "cancelled"
    assert "killed by signal 15 (SIGTERM)" in sh.run(f"gpu_logs {first}").out
    res = sh.run("gpu_stop train.sh; echo \"rc=$?\"")
    assert (res.out, res.err) == ("rc=1\n", "gpu_stop: task train.sh is no longer pending or "
                                            "running: it has finished\n")
    assert listing(inst / "replies") == []
    wait_for(lambda: listing(inst / "commands") == [], 5, what="the daemon to drop the commands")


@needs_namespace
def test_e2e_stop_several_names_checks_them_all_first(sh, start_daemon):
    inst = sh.root / "exp1"
    start_daemon(sh.root, "exp1", "--kill-scope", "task")
    (sh.cwd / "train.sh").write_text("echo started; sleep 60\n")
    ids = {n: submitted_id(sh.run(f"gpu_submit --name {n} train.sh {p}"))
           for n, p in (("one", 100), ("two", 200), ("three", 300))}
    wait_running(inst, ids["one"])
    before = {d: listing(inst / d) for d in ("pending", "running", "commands")}
    res = sh.run("gpu_stop one nosuch two")
    assert (res.rc, res.out) == (1, "")
    assert res.err == ("gpu_stop: no such task: nosuch (gpu_status lists the tasks)\n"
                       "gpu_stop: nothing was stopped\n")
    res = sh.run("gpu_stop two all")
    assert (res.rc, res.out, res.err) == (2, "", "gpu_stop: 'all' stands alone: gpu_stop all\n")
    assert {d: listing(inst / d) for d in before} == before  # nothing asked, nothing changed
    res = sh.run("gpu_stop one two two")  # a task named twice is stopped once
    assert (res.rc, res.err) == (0, "")
    # the pending one first: the slot the running one frees must not start it meanwhile
    assert res.out == (f"cancelled {ids['two']} (it was pending)\n"
                       f"stopped {ids['one']} (SIGTERM sent, SIGKILL after 2 s)\n")
    assert wait_finished(inst, ids["one"]) == "failed"
    assert read_fields(inst / "records" / f"{ids['two']}.result")["state"] == "cancelled"
    wait_running(inst, ids["three"])  # the queue goes on
    assert sh.run("gpu_stop three").rc == 0


@needs_namespace
def test_e2e_a_task_past_its_time_limit_ends_as_timeout(sh, start_daemon):
    inst = sh.root / "exp1"
    start_daemon(sh.root, "exp1", "--gpus", "2", "--kill-scope", "task")
    task = submitted_id(sh.run("gpu_run -g 1 -t 2s 'echo begun; sleep 60'"))
    hour = submitted_id(sh.run("gpu_run -g 1 -t 1h 'sleep 60'"))
    wait_running(inst, hour)
    assert re.search(r"^State: +running for \S+ \((59m[0-9]{2}s|1h00m) left of its time limit\)$",
                     sh.run(f"gpu_show {hour}").out, re.M)
    assert sh.run(f"gpu_stop {hour}").rc == 0
    res = sh.run(f"gpu_wait {task}; echo \"rc=$?\"")
    assert res.out.endswith("rc=1\n")
    assert read_fields(inst / "records" / f"{task}.result")["state"] == "timeout"
    assert (inst / "failed" / task).exists()
    assert "State:      timeout (time limit of 2s reached)\n" in sh.run(f"gpu_show {task}").out
    assert re.search(r"\btimeout\b", sh.run("gpu_status").out)


def two_nodes(sh, start_daemon, gpus: int) -> tuple[list, Path]:
    """Both daemons of a two-node exp1, alive, and a gate that long.sh waits for."""
    nodes = [start_daemon(sh.root, "exp1", "--gpus", str(gpus), "--num-nodes", "2",
                          node_rank=rank, wait=False) for rank in (0, 1)]
    for node in nodes:
        node.wait_alive()
    gate = sh.cwd / "gate"
    (sh.cwd / "long.sh").write_text(f"while [ ! -e '{gate}' ]; do sleep 0.05; done\n")
    return nodes, gate


@needs_namespace
def test_e2e_drain_holds_new_tasks_on_every_node_until_resume(sh, start_daemon):
    inst = sh.root / "exp1"
    nodes, gate = two_nodes(sh, start_daemon, gpus=2)
    first = submitted_id(sh.run("gpu_submit -g 1 long.sh"))
    wait_running(inst, first)
    res = sh.run("gpu_drain maintenance at noon")
    assert (res.rc, res.err) == (0, "")
    assert res.out == "drained exp1: running tasks go on, nothing new starts until gpu_resume\n"
    quick = [submitted_id(sh.run(f"gpu_run -g 1 'echo {n}'")) for n in range(3)]  # 3 GPUs free
    time.sleep(1.5)  # fifteen polls of each daemon
    assert all((inst / "pending" / task).exists() for task in quick)
    status = sh.run("gpu_status").out
    assert re.search(r"^Queue:    drained by \S+ since [-0-9]+ [0-9:]+: maintenance at noon "
                     r"\(gpu_resume\)$", status, re.M), status
    assert re.search(r"^ +next: +\S+: the queue is drained by \S+: maintenance at noon "
                     r"\(gpu_resume\)$", status, re.M), status
    gate.touch()
    assert wait_finished(inst, first) == "done"  # the running task ends as it would
    time.sleep(0.5)
    assert all((inst / "pending" / task).exists() for task in quick)
    assert nodes[0].proc.poll() is None and nodes[1].proc.poll() is None  # no shutdown
    assert sh.run("gpu_resume").out == "resumed exp1: tasks start again\n"
    for task in quick:
        assert wait_finished(inst, task) == "done"
    assert sh.run("gpu_resume").out == "exp1 is not drained\n"


@needs_namespace
def test_e2e_a_drained_node_starts_nothing_while_the_other_goes_on(sh, start_daemon):
    inst = sh.root / "exp1"
    _, gate = two_nodes(sh, start_daemon, gpus=1)
    for bad in ("--node 2", "--node x", "--node ''", "--node"):
        res = sh.run(f"gpu_drain {bad} reason; echo \"rc=$?\"")
        assert res.out == "rc=2\n" and res.err, (bad, res.err)
    assert not list(inst.glob("drain*"))
    res = sh.run("gpu_drain --node 1 bad GPU fan")
    assert (res.rc, res.err) == (0, "")
    assert res.out == ("drained node 1 of exp1: its running tasks go on, it starts nothing new "
                       "until gpu_resume --node 1\n")
    tasks = [submitted_id(sh.run("gpu_submit -g 1 long.sh")) for _ in range(2)]
    wait_running(inst, tasks[0])
    time.sleep(1.5)  # fifteen polls of node 1
    assert (inst / "pending" / tasks[1]).exists()
    assert read_fields(inst / "records" / f"{tasks[0]}.run")["node_rank"] == "0"
    status = sh.run("gpu_status").out
    assert re.search(r"^Node 1: .*\n +drained by \S+ since [-0-9]+ [0-9:]+: bad GPU fan "
                     r"\(gpu_resume --node 1\)$", status, re.M), status
    assert "Queue:" not in status
    doc = json.loads(sh.run("gpu_status --json").out)
    assert doc["drain"] is None and doc["nodes"][0]["drain"] is None
    assert doc["nodes"][1]["drain"]["reason"] == "bad GPU fan"
    assert sh.run("gpu_resume").out == "exp1 is not drained\n"
    assert (inst / "pending" / tasks[1]).exists()
    assert sh.run("gpu_resume --node 1").out == "resumed node 1 of exp1: tasks start again\n"
    wait_running(inst, tasks[1])
    assert read_fields(inst / "records" / f"{tasks[1]}.run")["node_rank"] == "1"
    gate.touch()
    for task in tasks:
        assert wait_finished(inst, task) == "done"
    assert sh.run("gpu_resume --node 1").out == "node 1 of exp1 is not drained\n"


@needs_namespace
def test_e2e_with_node_0_dead_a_stop_goes_straight_to_the_node_that_runs_the_task(
        sh, start_daemon):
    inst = sh.root / "exp1"
    nodes, gate = two_nodes(sh, start_daemon, gpus=1)
    assert sh.run("gpu_drain --node 0").rc == 0  # so that the task runs on node 1
    task = submitted_id(sh.run("gpu_submit -g 1 long.sh"))
    wait_running(inst, task)
    assert read_fields(inst / "records" / f"{task}.run")["node_rank"] == "1"
    nodes[0].kill()  # and its heartbeat is two minutes old: dead to every client
    state = read_fields(inst / "nodes" / "node-0.state")
    write_fields(inst / "nodes" / "node-0.state", {**state, "heartbeat": time.time() - 120})
    (inst / "nodes" / "node-0.beat").unlink()  # its beat file says when it beat last, too
    waiting = submitted_id(sh.run("gpu_run -g 1 'echo never' 2>/dev/null"))  # node 1 is busy
    res = sh.run(f"gpu_stop {waiting} {task}")
    assert res.rc == 0, res.err
    assert re.fullmatch(r"gpu_stop: node 0 of exp1, which takes the commands, is not alive \(no "
                        r"heartbeat for 2m0[0-9]s\): pending tasks are cancelled here, and "
                        r"running ones are stopped through their stop records\n", res.err), res.err
    assert res.out == (f"cancelled {waiting} (it was pending)\nstopped {task} (the stop went "
                       "straight to node 1: SIGTERM, then SIGKILL)\n")
    assert wait_finished(inst, task) == "failed"
    result = read_fields(inst / "records" / f"{task}.result")
    assert (result["state"], result["reason"]) == ("stopped", "stopped by user")
    assert not gate.exists() and nodes[1].proc.poll() is None


@needs_namespace
def test_e2e_stop_all_and_shutdown(sh, start_daemon):
    inst = sh.root / "exp1"
    daemon = start_daemon(sh.root, "exp1", "--kill-scope", "task")
    write_fields(inst / "job_id.txt", {"backend": "local", "cluster_job_id": "local-31337",
                                       "pid": 31337})
    (sh.cwd / "long.sh").write_text("sleep 60\n")
    running = submitted_id(sh.run("gpu_submit long.sh 000"))
    wait_running(inst, running)
    pending = [submitted_id(sh.run(f"gpu_run 'echo {n}'")) for n in range(3)]
    res = sh.run("gpu_stop all")
    assert (res.rc, res.err) == (0, "")
    assert res.out == f"cancelled 3 pending task(s)\nstopped {running}\n"
    assert wait_finished(inst, running) == "failed"
    assert all((inst / "failed" / p).exists() for p in pending)
    res = sh.run("gpu_stop all")  # nothing queued: the daemon still frees the GPUs
    assert (res.rc, res.err) == (0, "")
    assert res.out == ("cancelled 0 pending task(s)\n"
                       "no task was running; the daemon still ends the other Python processes of "
                       "its\nuser on the node (its --kill-scope), to free the GPUs\n")
    res = sh.run("gpu_shutdown")
    assert (res.rc, res.err) == (0, "")
    assert res.out.splitlines() == [
        "The daemon of exp1 is shutting down: it stops the running tasks and exits;",
        "pending tasks stay queued for the next daemon.",
        "Cluster job: local-31337 (local)",
        "It ends with the daemon; if it does not:",
        "  kill 31337",
    ]
    assert daemon.wait_exit() == 0
    assert daemon.state()["status"] == "stopped"
    assert sh.run("gpu_status").out.splitlines()[1].startswith("Daemon:   stopped ")


@needs_namespace
def test_e2e_the_same_script_twice_runs_twice_and_each_is_named(start_daemon, tmp_path):
    shell = Shell("bash", tmp_path / "root", tmp_path, tmp_path)
    shell.root.mkdir()
    (tmp_path / "train.sh").write_text('echo "run of $TASK_NAME"\n')
    ids = [submitted_id(shell.run("gpu_submit train.sh")) for _ in range(2)]
    inst = shell.root / "exp1"
    start_daemon(shell.root, "exp1")
    for task in ids:
        assert wait_finished(inst, task) == "done"
        assert f"run of {task}\n" in shell.run(f"gpu_logs {task}").out
        res = shell.run(f"gpu_stop {task}; echo \"rc=$?\"")
        assert res.out == "rc=1\n" and "it has finished" in res.err
    assert f"run of {ids[1]}\n" in shell.run("gpu_logs train").out  # the newest


@needs_namespace
def test_e2e_fifty_concurrent_gpu_run_each_run_once(start_daemon, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    ran = tmp_path / "ran.txt"
    start_daemon(root, "exp1", "--kill-scope", "none")
    shells = [name for name in SHELL_ARGV if shutil.which(name)]
    procs = [Shell(shells[n % len(shells)], root, tmp_path, tmp_path)
             .popen(f"gpu_run 'echo \"$TASK_NAME\" >> \"{ran}\"'") for n in range(50)]
    ids = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        ids.append(submitted_id(Result(proc.returncode, out, err)))
    inst = root / "exp1"
    wait_for(lambda: len(listing(inst / "done")) == 50, 60, what="50 tasks to run")
    assert sorted(ran.read_text().splitlines()) == sorted(ids)  # each one, once
    assert listing(inst / "failed") == [] and listing(inst / "pending") == []


@needs_namespace
def test_e2e_ten_concurrent_stops_are_all_honoured(start_daemon, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    inst = root / "exp1"
    start_daemon(root, "exp1", "--kill-scope", "none")
    shell = Shell("bash", root, tmp_path, tmp_path)
    (tmp_path / "block.sh").write_text("sleep 60\n")
    blocker = submitted_id(shell.run("gpu_submit block.sh 000"))
    wait_running(inst, blocker)
    for n in range(10):
        (tmp_path / f"job{n}.sh").write_text("echo should not run\n")
    ids = [submitted_id(shell.run(f"gpu_submit job{n}.sh")) for n in range(10)]
    shells = [name for name in SHELL_ARGV if shutil.which(name)]
    procs = [Shell(shells[n % len(shells)], root, tmp_path, tmp_path).popen(f"gpu_stop job{n}")
             for n in range(10)]
    for n, proc in enumerate(procs):
        out, err = proc.communicate(timeout=60)
        assert (proc.returncode, out, err) == (0, f"cancelled {ids[n]} (it was pending)\n", "")
    for task in ids:
        assert (inst / "failed" / task).exists()
        assert read_fields(inst / "records" / f"{task}.result")["state"] == "cancelled"
    assert (inst / "running" / blocker).exists()
    assert shell.run("gpu_stop block").out.startswith(f"stopped {blocker} ")


@needs_namespace
def test_e2e_tail_follows_the_running_task_by_default(start_daemon, tmp_path):
    shell = Shell("zsh" if shutil.which("zsh") else "bash", tmp_path / "root", tmp_path,
                  tmp_path)
    shell.root.mkdir()
    inst = shell.root / "exp1"
    start_daemon(shell.root, "exp1", "--kill-scope", "none")
    (tmp_path / "ticker.sh").write_text("for i in 1 2 3 4 5 6 7 8 9; do echo tick $i; sleep 0.3;"
                                        " done; sleep 30\n")
    task = submitted_id(shell.run("gpu_submit ticker.sh"))
    wait_running(inst, task)
    tail = shell.popen("gpu_tail")
    try:
        seen = []
        deadline = time.monotonic() + 20
        while "tick 9" not in seen and time.monotonic() < deadline:
            seen.append(tail.stdout.readline().strip())
        assert seen[0] == f"[perpetual-motion] task: {task}"
        assert "tick 9" in seen  # printed after gpu_tail started: it follows
        shell.run(f"gpu_stop {task}")
        out, err = tail.communicate(timeout=20)  # it returns when the task ends
    finally:
        left = end_session(tail)
    assert left == []
    assert tail.returncode == 1  # stopped: no exit code of its own
    assert "[perpetual-motion] killed by signal 15 (SIGTERM) after " in out
    assert err.startswith(f"gpu_tail: following {inst}/logs/{task}.log (Ctrl-C ")
    assert err.endswith(f"gpu_tail: {task} ended: stopped (stopped by user)\n")

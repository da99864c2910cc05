"""Every byte of the queue folder is data: names that are not UTF-8, hold a newline, or records
that hold a NUL byte or Latin-1 bytes never stop the daemon's loop or heartbeat, and what a
client wrote is what the task gets, byte for byte.

In simulated time where nothing blocks; the client in real bash and zsh.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from client_helpers import SHELLS, Shell, make_instance, make_shell
from conftest import run_until
from queue_files import finished, result, submit
from test_daemon_unit import started_daemon

import perpetual_motion as pm


@pytest.fixture(params=SHELLS)
def sh(request, tmp_path) -> Shell:
    return make_shell(request.param, tmp_path)


def raw_fields(path: Path) -> dict[bytes, bytes]:
    """A record's keys and values as the bytes in the file."""
    fields = {}
    for line in path.read_bytes().split(b"\n"):
        key, sep, value = line.partition(b"=")
        if sep:
            fields[key] = value
    return fields


def publish_bytes(instance: Path, folder: str, name: bytes, data: bytes) -> None:
    staged = os.path.join(os.fsencode(instance / ".staging"), b"." + name)
    with open(staged, "wb") as f:
        f.write(data)
    os.rename(staged, os.path.join(os.fsencode(instance / folder), name))


def hold(tmp_path: Path) -> tuple[str, Path]:
    """A task body that runs until the file it names exists; the body and that file."""
    go = tmp_path / "go"
    return f"while [ ! -e '{go}' ]; do sleep 0.02; done\n", go


# No byte stops the daemon ####################################################################


def test_a_name_that_is_not_utf8_neither_stops_the_heartbeat_nor_hides_from_a_stop(tmp_path):
    daemon, clock, inst = started_daemon(tmp_path)
    body, go = hold(tmp_path)
    first = submit(inst, "first.sh", body, priority=1)
    run_until(daemon, clock, lambda: (inst / "records" / f"{first}.run").exists())
    publish_bytes(inst, "pending", b"\xff-latin.sh", b"echo latin\n")
    for _ in range(3 * int(pm.HEARTBEAT_SECONDS / 0.1)):  # three heartbeats behind the task
        daemon.tick()
        clock.sleep(0.1)
    state = raw_fields(inst / "nodes" / "node-0.state")
    assert clock.now - float(state[b"heartbeat"]) <= pm.HEARTBEAT_SECONDS + 0.2
    assert state[b"waiting.id"] == b"\xff-latin.sh"

    # a stop names it by its bytes, and finds it
    publish_bytes(inst, "commands", b"stop.cmd",
                  b"action=stop\ntask=\xff-latin.sh\nsent=%.3f\n" % time.time())
    run_until(daemon, clock, lambda: (inst / "replies" / "stop.reply").exists())
    reply = raw_fields(inst / "replies" / "stop.reply")
    assert (reply[b"result"], reply[b"task"]) == (b"cancelled", b"\xff-latin.sh")
    assert os.listdir(inst / "pending") == []
    [cancelled] = os.listdir(inst / "failed")
    assert cancelled.endswith("-_-latin.sh") and result(inst, cancelled)["state"] == "cancelled"
    go.touch()
    run_until(daemon, clock, lambda: finished(inst, first) == "done")


def test_a_name_that_is_not_utf8_runs_under_an_ascii_id(tmp_path):
    daemon, clock, inst = started_daemon(tmp_path)
    publish_bytes(inst, "pending", b"\xff-latin.sh", b"echo latin\n")
    run_until(daemon, clock, lambda: os.listdir(inst / "done"))
    [task] = os.listdir(inst / "done")
    assert task.endswith("-_-latin.sh") and result(inst, task)["state"] == "done"
    assert b"latin\n" in (inst / "logs" / f"{task}.log").read_bytes()


@pytest.mark.parametrize("key, value", [("arg.0", "a\0b"), ("env.0", "NAME=a\0b"),
                                        ("cwd", "/tmp\0/x")])
def test_a_nul_byte_in_a_record_fails_its_task_once_and_frees_the_slot(tmp_path, key, value):
    daemon, clock, inst = started_daemon(tmp_path)
    ran = tmp_path / "ran"
    extra = {"argc": "1", "arg.0": "x"} if key == "arg.0" else {"envc": "1"} \
        if key == "env.0" else {}
    fields = {"cwd": str(tmp_path), **extra, key: value}
    bad = submit(inst, "bad.sh", f"touch '{ran}'\n", priority=1, **fields)
    after = submit(inst, "after.sh", "true\n", priority=2, cwd=str(tmp_path))
    run_until(daemon, clock, lambda: finished(inst, after) == "done")
    for _ in range(10):
        daemon.tick()
        clock.sleep(0.1)
    assert finished(inst, bad) == "failed" and not ran.exists()
    assert result(inst, bad)["reason"] == \
        f"unreadable submit record: {key} holds a NUL byte"
    assert (inst / "logs" / f"{bad}.log").read_text().count("not run:") == 1


def test_a_name_with_a_newline_is_one_task(tmp_path):
    daemon, clock, inst = started_daemon(tmp_path)
    publish_bytes(inst, "pending", b"new\nline.sh", b"echo once\n")
    run_until(daemon, clock, lambda: os.listdir(inst / "done"))
    [task] = os.listdir(inst / "done")
    assert task.endswith("-new_line.sh")
    assert (inst / "logs" / f"{task}.log").read_text().count("once") == 1


def test_the_client_lists_and_counts_a_name_with_a_newline_once(sh):
    inst = make_instance(sh.root)
    (inst / "pending" / "new\nline.sh").write_text("echo\n")
    (inst / "pending" / "plain.sh").write_text("echo\n")
    res = sh.run("gpu_status; gpu_list")
    assert res.rc == 0, res.err
    rows = [line for line in res.out.splitlines() if " pending " in line]
    assert [row.split()[0] for row in rows] == ["new?line.sh", "plain.sh"], res.out
    assert "Totals:   0 running, 2 pending, 0 done, 0 failed" in res.out
    document = json.loads(sh.run("gpu_status --json").out)
    assert document["counts"]["pending"] == 2 and len(document["pending"]) == 2


# Only files are tasks #########################################################################


def odd_entries(inst: Path, tmp_path: Path) -> list[str]:
    """A folder, a symbolic link and a FIFO in pending/; their names."""
    target = tmp_path / "target.sh"
    target.write_text("echo\n")
    (inst / "pending" / "folder.sh").mkdir()
    (inst / "pending" / "link.sh").symlink_to(target)
    os.mkfifo(inst / "pending" / "fifo.sh")
    return ["fifo.sh", "folder.sh", "link.sh"]


def test_stop_all_leaves_folders_links_and_fifos_in_pending(tmp_path):
    daemon, clock, inst = started_daemon(tmp_path)
    odd = odd_entries(inst, tmp_path)
    publish_bytes(inst, "commands", b"all.cmd", b"action=stop_all\nsent=%.3f\n" % time.time())
    run_until(daemon, clock, lambda: (inst / "replies" / "all.reply").exists())
    reply = pm.parse_fields((inst / "replies" / "all.reply").read_text())
    assert reply["cancelled_count"] == "0", reply
    assert sorted(os.listdir(inst / "pending")) == odd
    assert os.listdir(inst / "failed") == []


def test_stop_all_without_a_daemon_leaves_folders_links_and_fifos_in_pending(sh, tmp_path):
    inst = make_instance(sh.root)
    odd = odd_entries(inst, tmp_path)
    (inst / "pending" / "task.sh").write_text("echo\n")
    res = sh.run("gpu_stop all")
    assert "cancelled 1 pending task(s)" in res.out, (res.out, res.err)
    assert sorted(os.listdir(inst / "pending")) == odd
    [cancelled] = os.listdir(inst / "failed")
    assert cancelled.endswith("-task.sh")


def test_a_fifo_where_a_pending_task_s_submit_record_belongs_never_blocks_the_client(sh):
    """Finding a task by its --name reads the submit records of pending and running tasks, and
    gpu_clean those of pending tasks (for --after): a FIFO there (someone else's task in a
    shared queue) is not read, so gpu_hold, gpu_wait --timeout, gpu_stop and gpu_clean end."""
    inst = make_instance(sh.root)
    mine = sh.run("gpu_run --name lr0.1 'sleep 1'")
    assert mine.rc == 0, mine.err
    theirs = "500-20261204_231500_123456789-3f9a0c1d-theirs.sh"
    (inst / "pending" / theirs).write_text("true\n")
    os.mkfifo(inst / "records" / f"{theirs}.submit")
    res = sh.run("gpu_hold lr0.1; echo \"hold=$?\"; gpu_wait --timeout 1 lr0.1; "
                 "echo \"wait=$?\"; gpu_clean --dry-run; echo \"clean=$?\"; gpu_release lr0.1; "
                 "gpu_stop lr0.1; echo \"stop=$?\"", timeout=30)
    assert "hold=0\nwait=124\n" in res.out and "clean=0\n" in res.out, (res.out, res.err)
    assert "stop=0\n" in res.out, (res.out, res.err)
    assert (inst / "pending" / theirs).exists()
    assert os.listdir(inst / "failed") == [mine.out.split()[-1]]  # cancelled


# Every byte carried exactly ####################################################################


def test_latin1_bytes_in_the_directory_arguments_and_variables_reach_the_task(sh):
    """Paths and values are bytes: a directory, an argument and a -e value in Latin-1 (not
    UTF-8) reach the task exactly as the client's shell had them."""
    from test_daemon_unit import FakeClock, make_daemon

    latin = b"caf\xe9-\xff"
    work = os.path.join(os.fsencode(sh.cwd), latin)
    os.mkdir(work)
    out = os.fsencode(sh.cwd) + b"/seen"
    script = os.path.join(work, b"show.py")
    with open(script, "w") as f:
        f.write(f"import os, sys\nout = open({out!r}, 'wb')\n"
                "for value in (os.getcwdb(), os.fsencode(sys.argv[1]), os.environb[b'LATIN']):\n"
                "    out.write(value + b'|')\n")
    res = sh.run("cd \"$(printf 'caf\\351-\\377')\" && "
                 "gpu_submit -e \"LATIN=$(printf 'v\\351')\" show.py -- \"$(printf 'a\\351')\"")
    assert res.rc == 0, res.err
    clock = FakeClock()
    daemon = make_daemon(sh.root, clock, job_id="exp1")
    assert daemon.start() is None
    inst = sh.root / "exp1"
    task = res.out.split()[-1]
    run_until(daemon, clock, lambda: finished(inst, task))
    assert finished(inst, task) == "done", (inst / "logs" / f"{task}.log").read_bytes()
    with open(out, "rb") as f:
        assert f.read() == work + b"|a\xe9|v\xe9|"
    assert b"cwd: " + work + b"\n" in (inst / "logs" / f"{task}.log").read_bytes()
    assert raw_fields(inst / "records" / f"{task}.run")[b"cwd"] == work

"""The daemon under hostile input and odd machines: it is recognised whatever started it, queue
files that are links, FIFOs or directories neither block nor leak, numbers are ASCII and
finite, records keep every character but the newline, a full disk at start is an error, and a
task's escaped children end with it.

In simulated time where nothing blocks; real daemons in PID namespaces where something could.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from conftest import (
    DAEMON,
    REPO,
    UNSHARE,
    command_line,
    namespace_shell,
    needs_namespace,
    process_state,
    read_fields,
    wait_for,
)
from queue_files import command, finished, result, submit
from test_daemon_unit import FakeClock, make_daemon, run_until, started_daemon

import perpetual_motion as pm

FAST = "--poll-interval 0.1 --no-keepalive --stop-grace 1"


def write_record(path: Path, fields: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pm.format_fields(fields).encode())


def warnings_about(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and text in r.getMessage()]


def namespace_processes(proc: subprocess.Popen) -> list[psutil.Process]:
    """Every process inside the namespace whose ``unshare`` is ``proc``."""
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def console_script(tmp_path: Path) -> Path:
    """The ``perpetual-motion`` script, as pip writes it for the project's entry point."""
    script = tmp_path / "bin" / "perpetual-motion"
    script.parent.mkdir(exist_ok=True)
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import re
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from perpetual_motion import main
        if __name__ == "__main__":
            sys.argv[0] = re.sub(r"(-script\\.pyw|\\.exe)?$", "", sys.argv[0])
            sys.exit(main())
        """))
    script.chmod(0o755)
    return script


def start_line(way: str, tmp_path: Path, job_id: str, queue_root: Path, extra: str = "") -> str:
    """A bash command line that starts a daemon the way ``way`` says."""
    args = f"--job-id {job_id} --queue-root '{queue_root}' {FAST} {extra}"
    if way == "console-script":
        return f"'{console_script(tmp_path)}' {args}"
    if way == "module":
        return f"PYTHONPATH='{REPO}' {sys.executable} -m perpetual_motion {args}"
    return f"{sys.executable} '{DAEMON}' {args}"


def wait_running_line(queue_root: Path, job_id: str) -> str:
    """Bash: wait until the instance's node 0 says it runs (at most 20 s)."""
    state = queue_root / job_id / "nodes" / "node-0.state"
    return (f"for i in $(seq 200); do grep -qx status=running '{state}' 2>/dev/null && break; "
            f"sleep 0.1; done")


# Item 3: daemons and workers are known by their process name ###################################


@needs_namespace
def test_daemons_and_workers_name_themselves(queue_root, start_daemon):
    daemon = start_daemon(queue_root, "named")
    assert daemon.daemon_process().name() == "pm-daemon"
    argv = pm.worker_command(["cpu-test", "--device", "cpu", "--tile", "64", "--period", "0.05"])
    worker = pm.WorkerProcess(argv, dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 60
        while not any(line.startswith("ready") for line in lines):
            assert worker.exit_code() is None and time.monotonic() < deadline, lines
            time.sleep(0.05)
            lines += worker.messages()
        assert pm.process_name(worker.pid) == "pm-worker"
    finally:
        worker.kill()
    assert pm.process_name(2 ** 22 + 7) == ""  # no such process


@needs_namespace
@pytest.mark.parametrize("first, second", [("console-script", "module"),
                                           ("module", "console-script"),
                                           ("console-script", "file")])
def test_a_second_daemon_refuses_however_either_was_started(queue_root, tmp_path, first,
                                                            second):
    log = tmp_path / "ns.log"
    script = "\n".join([
        f"{start_line(first, tmp_path, 'twice', queue_root)} & first=$!",
        wait_running_line(queue_root, "twice"),
        # A second one that would start ends by itself soon after: the test cannot hang.
        f"{start_line(second, tmp_path, 'twice', queue_root, '--hours 0.0005')}",
        "echo second-exit=$?",
        "kill -0 $first && echo first-alive",
    ])
    with namespace_shell(script, log) as proc:
        wait_for(lambda: "second-exit=" in log.read_text() or proc.poll() is not None, 40,
                 what="the second daemon to exit")
        wait_for(lambda: proc.poll() is not None, 10, what="the script to end")
    text = log.read_text()
    assert "second-exit=3" in text, text
    assert "already running" in text and "first-alive" in text


@needs_namespace
def test_the_python_sweep_of_another_instance_spares_daemons_started_any_way(queue_root,
                                                                           tmp_path):
    log = tmp_path / "ns.log"
    sweeper = queue_root / "sweeper"
    script = "\n".join([
        f"{start_line('console-script', tmp_path, 'keep1', queue_root)} & a=$!",
        f"{start_line('module', tmp_path, 'keep2', queue_root)} & b=$!",
        f"{sys.executable} -c 'import time; time.sleep(120)' & stray=$!",
        wait_running_line(queue_root, "keep1"),
        wait_running_line(queue_root, "keep2"),
        f"{start_line('file', tmp_path, 'sweeper', queue_root, '--kill-scope user-python')}",
        "for p in a b stray; do kill -0 ${!p} 2>/dev/null && echo $p-alive || echo $p-gone; done",
        "kill $a $b; wait $a $b",
    ])
    with namespace_shell(script, log) as proc:
        state = sweeper / "nodes" / "node-0.state"
        wait_for(lambda: state.exists() and read_fields(state).get("status") == "running", 30,
                 what="the sweeping daemon")
        command(sweeper, "stop_all")
        wait_for(lambda: "Ended " in log.read_text() or proc.poll() is not None, 20,
                 what="the sweep")
        command(sweeper, "shutdown")
        wait_for(lambda: proc.poll() is not None, 30, what="the script to end")
    text = log.read_text()
    assert "Ended 1 other Python process(es)" in text, text
    assert "a-alive" in text and "b-alive" in text and "stray-gone" in text, text


# Item 6 and 13: links, FIFOs and directories in the queue folder ################################


def test_a_directory_named_cmd_gets_no_reply_and_one_warning(tmp_path, caplog):
    daemon, clock, inst = started_daemon(tmp_path)
    (inst / "commands" / "d.cmd").mkdir()
    for _ in range(5):
        daemon.tick()
        clock.sleep(0.1)
    assert not (inst / "replies" / "d.reply").exists()
    assert len(warnings_about(caplog, "d.cmd")) == 1
    assert (inst / "commands" / "d.cmd").is_dir()


def test_a_command_too_long_to_be_answered_is_skipped_not_carried_out_at_each_start(tmp_path,
                                                                                   caplog):
    daemon, clock, inst = started_daemon(tmp_path)
    name = "x" * 251 + ".cmd"  # its reply, x...x.reply, would be 257 bytes long
    (inst / "commands" / name).write_text("action=shutdown\n")  # (no time: for any daemon)
    for _ in range(5):
        daemon.tick()
        clock.sleep(0.1)
    assert not daemon.stopping and (inst / "commands" / name).exists()
    assert os.listdir(inst / "replies") == []
    assert len(warnings_about(caplog, "a name too long for its reply")) == 1
    daemon.write_state(force=True)
    assert read_fields(inst / "nodes" / "node-0.state")["skipped.0"] == \
        f"commands/{name}: a name too long for its reply"


def test_a_command_is_carried_out_once_while_the_replies_folder_is_missing(tmp_path):
    daemon, clock, inst = started_daemon(tmp_path)
    (inst / "replies").rmdir()  # removed by hand, say
    name = command(inst, "stop_all")
    for _ in range(5):
        daemon.tick()
        clock.sleep(0.1)
    later = submit(inst, "later.sh", "true\n")  # queued after the stop_all was carried out
    run_until(daemon, clock, lambda: finished(inst, later))
    assert finished(inst, later) == "done"
    answer = read_fields(inst / "replies" / f"{name}.reply")
    assert (answer["result"], answer["cancelled_count"]) == ("ok", "0")
    assert not (inst / "commands" / f"{name}.cmd").exists()


def test_a_pending_task_is_cancelled_while_the_failed_folder_is_missing(tmp_path):
    """failed/ removed by hand: a stop of a pending (held) task creates it again and cancels
    the task, instead of answering that no such task exists and letting it run later."""
    daemon, clock, inst = started_daemon(tmp_path)
    task = submit(inst, "t.sh", "true\n")
    (inst / "held").mkdir(exist_ok=True)
    (inst / "held" / task).write_text("by=tester@test\n")
    daemon.tick()
    (inst / "failed").rmdir()
    name = command(inst, "stop", task)
    run_until(daemon, clock, lambda: (inst / "replies" / f"{name}.reply").exists())
    answer = read_fields(inst / "replies" / f"{name}.reply")
    assert answer["result"] == "cancelled", answer
    assert finished(inst, task) == "failed" and result(inst, task)["state"] == "cancelled"


def test_stop_all_stops_the_running_tasks_beside_a_name_too_long_for_a_record(tmp_path):
    daemon, clock, inst = started_daemon(tmp_path)
    task = submit(inst, "t.sh", "sleep 30\n")
    run_until(daemon, clock, lambda: daemon.runner.tasks)
    (inst / "running" / ("0" * 255)).write_text("put there by hand\n")  # sorts first
    name = command(inst, "stop_all")
    run_until(daemon, clock, lambda: (inst / "replies" / f"{name}.reply").exists())
    answer = read_fields(inst / "replies" / f"{name}.reply")
    assert (answer["result"], answer["stopped"]) == ("ok", task)
    run_until(daemon, clock, lambda: finished(inst, task))
    assert result(inst, task)["state"] == "stopped"


def test_a_dependency_too_long_for_a_file_name_cancels_its_task_and_holds_up_no_other(tmp_path):
    daemon, clock, inst = started_daemon(tmp_path)
    unknown = "x" * 300  # written by hand: no file can be named after it
    waits = submit(inst, "waits.sh", "true\n", priority=900, after=(unknown,))
    first = submit(inst, "first.sh", "true\n", priority=1)
    run_until(daemon, clock, lambda: finished(inst, first) and finished(inst, waits))
    assert finished(inst, first) == "done"
    assert result(inst, waits)["reason"] == f"dependency {unknown} not found"


def test_links_in_the_queue_folder_are_never_followed(tmp_path, caplog):
    daemon, clock, inst = started_daemon(tmp_path)
    secret = tmp_path / "secret"
    secret.write_text("TOPSECRET line one\nTOPSECRET line two\n")
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched\n")
    ran = tmp_path / "ran"

    (inst / "pending" / "x.sh").symlink_to(secret)
    (inst / "commands" / "x.cmd").symlink_to(secret)
    logged = submit(inst, "logged.sh", f"echo output; touch '{ran}.logged'\n", priority=1)
    (inst / "logs" / f"{logged}.log").symlink_to(victim)
    recorded = submit(inst, "recorded.sh", f"touch '{ran}.recorded'\n", priority=2)
    (inst / "records" / f"{recorded}.submit").symlink_to(secret)
    after = submit(inst, "after.sh", "true\n", priority=900)
    run_until(daemon, clock, lambda: (inst / "done" / after).exists())
    for _ in range(3):
        daemon.tick()

    assert os.listdir(inst / "pending") == ["x.sh"]  # never run, and left where it is
    assert victim.read_text() == "untouched\n"
    assert not Path(f"{ran}.logged").exists() and not Path(f"{ran}.recorded").exists()
    assert result(inst, logged)["reason"] == \
        "cannot open its log: a symbolic link, not a regular file"
    assert result(inst, recorded)["reason"] == \
        "unreadable submit record: a symbolic link, not a regular file"
    assert not (inst / "replies" / "x.reply").exists()
    for folder in ("logs", "replies", "records", "done", "failed"):
        for path in (inst / folder).iterdir():
            if not path.is_symlink():
                assert "TOPSECRET" not in path.read_text(errors="replace"), path
    assert len(warnings_about(caplog, "x.sh")) == 1
    assert len(warnings_about(caplog, "x.cmd")) == 1


def test_a_folder_where_a_result_belongs_keeps_no_other_task_s_end_from_being_recorded(
        tmp_path, caplog):
    daemon, clock, inst = started_daemon(tmp_path)
    go = tmp_path / "go"
    blocked = submit(inst, "blocked.sh", f"while [ ! -e '{go}' ]; do sleep 0.02; done\n",
                     priority=1)
    run_until(daemon, clock, lambda: (inst / "records" / f"{blocked}.run").exists())
    (inst / "records" / f"{blocked}.result").mkdir()  # made while it runs
    go.touch()
    run_until(daemon, clock, lambda: not daemon.runner.tasks)
    later = submit(inst, "later.sh", "true\n", priority=2)
    run_until(daemon, clock, lambda: finished(inst, later) == "done")
    assert result(inst, later)["state"] == "done"
    assert os.listdir(inst / "running") == [blocked]  # its end waits, and is not lost
    assert warnings_about(caplog, f"cannot record the end of {blocked}")
    (inst / "records" / f"{blocked}.result").rmdir()
    run_until(daemon, clock, lambda: finished(inst, blocked) == "done")


def test_a_folder_where_a_run_record_belongs_fails_that_task_and_the_queue_goes_on(tmp_path):
    daemon, clock, inst = started_daemon(tmp_path)
    ran = tmp_path / "ran"
    bad = submit(inst, "bad.sh", f"touch '{ran}'\n", priority=1)
    (inst / "records" / f"{bad}.run").mkdir()
    after = submit(inst, "after.sh", "true\n", priority=2)
    run_until(daemon, clock, lambda: finished(inst, after) == "done")
    assert finished(inst, bad) == "failed" and not ran.exists()
    assert result(inst, bad)["reason"] == "cannot write its run record: Is a directory"
    assert (inst / "logs" / f"{bad}.log").read_text().count("not run:") == 1


@pytest.mark.parametrize("kind", ["directory", "FIFO", "link"])
def test_an_odd_entry_where_the_beat_file_belongs_never_fences_the_tasks(tmp_path, kind):
    daemon, clock, inst = started_daemon(tmp_path)
    go = tmp_path / "go"
    task = submit(inst, "t.sh", f"while [ ! -e '{go}' ]; do sleep 0.02; done\n")
    run_until(daemon, clock, lambda: daemon.runner.tasks)
    beat = inst / "nodes" / "node-0.beat"
    beat.unlink()
    {"directory": beat.mkdir, "FIFO": lambda: os.mkfifo(beat),
     "link": lambda: beat.symlink_to(tmp_path / "elsewhere")}[kind]()
    for _ in range(int(2 * pm.SELF_FENCE_SECONDS / 0.1)):
        daemon.tick()
        clock.sleep(0.1)
    go.touch()
    run_until(daemon, clock, lambda: finished(inst, task))
    assert result(inst, task)["state"] == "done"
    assert not (tmp_path / "elsewhere").exists()


@needs_namespace
def test_fifos_in_the_queue_folder_never_block_the_daemon(queue_root, start_daemon):
    inst = queue_root / "fifo"
    for folder in ("commands", "nodes", "logs", "records"):
        (inst / folder).mkdir(parents=True)
    os.mkfifo(inst / "nodes" / "node-0.state")
    os.mkfifo(inst / "commands" / "x.cmd")
    recorded = submit(inst, "recorded.sh", "true\n", priority=1, cwd="/")
    (inst / "records" / f"{recorded}.submit").unlink()
    os.mkfifo(inst / "records" / f"{recorded}.submit")
    logged = submit(inst, "logged.sh", "true\n", priority=2)
    os.mkfifo(inst / "logs" / f"{logged}.log")
    after = submit(inst, "after.sh", "true\n", priority=900)

    daemon = start_daemon(queue_root, "fifo", wait=False)
    state = inst / "nodes" / "node-0.state"  # read only once it is a file: a FIFO would block
    wait_for(lambda: daemon.proc.poll() is None and state.is_file() and not state.is_symlink()
             and pm.regular_file(state), 15, what="the daemon to replace the FIFO")
    daemon.wait_alive()
    wait_for(lambda: finished(inst, after) == "done", 15, what="the queue to go on")
    assert result(inst, recorded)["reason"] == \
        "unreadable submit record: a FIFO, not a regular file"
    assert result(inst, logged)["reason"] == "cannot open its log: a FIFO, not a regular file"
    time.sleep(0.5)  # a few more polls
    assert not (inst / "replies" / "x.reply").exists()
    assert daemon.output().count("skipping x.cmd: a FIFO, not a regular file") == 1
    assert daemon.stop() == 0  # SIGTERM is heard


# Item 7: numbers are ASCII digits, and finite ################################################


def test_a_task_named_with_unicode_digits_does_not_stall_the_queue(tmp_path):
    daemon, clock, inst = started_daemon(tmp_path)
    (inst / "pending" / "²²²-sup.sh").write_text("true\n")
    (inst / "pending" / "³-after.sh").write_text("true\n")
    run_until(daemon, clock, lambda: len(os.listdir(inst / "done")) == 2)
    assert sorted(name[:4] for name in os.listdir(inst / "done")) == ["500-", "500-"]


def test_unicode_digits_in_records_and_state_files_do_not_crash_a_start(tmp_path):
    clock = FakeClock()
    inst = tmp_path / "unit"
    pm.QueueFolder(inst).create("unit")
    here = pm.Identity.here()
    write_record(inst / "nodes" / "node-0.state", {
        "status": "running", "host": here.host, "boot_id": here.boot_id,
        "pid_ns": here.pid_ns, "pid": "²", "heartbeat": f"{clock.now:.3f}"})
    orphan = pm.task_id_for("orphan.sh")
    (inst / "running" / orphan).write_text("true\n")
    write_record(inst / "records" / f"{orphan}.run", {"started": "1", "attempt": "²"})
    assert make_daemon(tmp_path, clock).start() is None
    assert result(inst, orphan)["attempt"] == "1"


def test_a_command_sent_at_nan_is_not_carried_out(tmp_path):
    daemon, clock, inst = started_daemon(tmp_path)
    (inst / "commands" / "a.cmd").write_text("action=shutdown\nsent=nan\n")
    daemon.tick()
    answer = pm.parse_fields((inst / "replies" / "a.reply").read_text())
    assert answer["result"] == "error" and "sent is not a time" in answer["message"]
    assert not daemon.stopping


@pytest.mark.parametrize("argv", [
    ["--stop-grace", "nan"], ["--stop-grace", "inf"], ["--poll-interval", "inf"],
    ["--hours", "nan"], ["--hours", "١"], ["--node-rank", "٣", "--num-nodes", "4"],
    ["--num-nodes", "²"],
])
def test_bad_numbers_on_the_command_line_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        config = pm.config_from_args(pm.parse_args(["--job-id", "ok", *argv]))
        if isinstance(config, str):  # refused with a message, but later than it should
            raise SystemExit(0)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "not a finite number" in err or "not a whole number" in err


@needs_namespace
@pytest.mark.parametrize("variables, bad", [({"RANK": "²", "WORLD_SIZE": "2"}, "RANK"),
                                            ({"SLURM_NODEID": "1", "SLURM_NNODES": "٢"},
                                             "SLURM_NNODES")])
def test_a_rank_in_unicode_digits_exits_2_with_a_message(queue_root, variables, bad):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SENSECORE_")) and k not in ("RANK", "WORLD_SIZE")}
    run = subprocess.run([*UNSHARE, sys.executable, str(DAEMON), "--job-id", "ranked",
                          "--queue-root", str(queue_root), "--no-keepalive"],
                         env=dict(env, **variables), capture_output=True, text=True, timeout=30)
    assert run.returncode == 2, run.stderr
    assert f"{bad}={variables[bad]!r} in the environment is not a whole number" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (queue_root / "ranked").exists()
    # Flags win over the environment: a bad RANK does not matter then.
    config = pm.config_from_args(pm.parse_args(["--node-rank", "0", "--num-nodes", "1"]))
    assert isinstance(config, pm.Config)


def test_numbers_are_ascii_and_finite():
    assert [pm.ascii_int(v) for v in ("0", "17", "²", "٣", " 7", "+7", "1_0", "", None)] == \
        [0, 17, None, None, None, None, None, None, None]
    assert [pm.as_float(v) for v in ("1", "-1.5", "1e3", ".5", "nan", "inf", "-inf", "1e999",
                                     "١", "1_0", "")] == \
        [1.0, -1.5, 1000.0, 0.5, None, None, None, None, None, None, None]


# Item 8: records end at \n only; an unreadable submit record fails its task ####################

ODD = "\r\f\x1c\x1d\x1e\x85\u2028\u2029"


def test_values_keep_every_character_but_the_newline():
    fields = {"command": f"echo a{ODD}b", "cwd": f"/tmp/x{ODD}y", "after": "z"}
    assert pm.parse_fields(pm.format_fields(fields)) == fields


def test_a_task_runs_in_a_directory_with_odd_characters_and_with_a_long_command(tmp_path):
    daemon, clock, inst = started_daemon(tmp_path)
    odd_dir = tmp_path / f"dir{ODD}end"
    odd_dir.mkdir()
    out = tmp_path / "cwd.txt"
    body = f"import os; open({str(out)!r}, 'a').write(os.getcwd() + '|')\n"
    odd = submit(inst, "odd.py", body, cwd=str(odd_dir))
    record = inst / "records" / f"{odd}.submit"
    write_record(record, dict(pm.parse_fields(record.read_bytes().decode()), command=f"run {ODD}"))
    long = submit(inst, "long.py", body, cwd=str(tmp_path))
    record = inst / "records" / f"{long}.submit"
    write_record(record, dict(pm.parse_fields(record.read_bytes().decode()), command="x" * 200_000))
    run_until(daemon, clock, lambda: finished(inst, odd) and finished(inst, long))
    assert out.read_bytes().decode() == f"{odd_dir}|{tmp_path}|"


@pytest.mark.parametrize("content", [b"cwd=/\nthis is not key=value\n", b"\xff" * 10,
                                     b"cwd=/\n" + b"#" * (pm.MAX_RECORD_BYTES + 1)])
def test_a_task_whose_submit_record_cannot_be_read_fails_and_never_runs(tmp_path, content):
    daemon, clock, inst = started_daemon(tmp_path)
    ran = tmp_path / "ran"
    task = submit(inst, "t.sh", f"touch '{ran}'\n", cwd=str(tmp_path))
    (inst / "records" / f"{task}.submit").write_bytes(content)
    run_until(daemon, clock, lambda: finished(inst, task))
    assert finished(inst, task) == "failed"
    assert result(inst, task)["reason"].startswith("unreadable submit record: ")
    assert not ran.exists()
    assert "not run: unreadable submit record" in (inst / "logs" / f"{task}.log").read_text()


# Item 10: a full disk or a read-only queue at start ###########################################


@needs_namespace
def test_a_full_or_read_only_queue_at_start_is_an_error_not_a_traceback(tmp_path):
    full, read_only = tmp_path / "full", tmp_path / "ro"
    full.mkdir()
    read_only.mkdir()
    daemon = f"{sys.executable} '{DAEMON}' --job-id exp {FAST} --queue-root"
    script = "\n".join([
        f"mount -t tmpfs -o size=64k tmpfs '{full}' || exit 99",
        f"mkdir '{full}/root'; head -c 1M /dev/zero > '{full}/fill' 2>/dev/null",
        f"{daemon} '{full}/root'; echo full-exit=$?",
        f"mount -t tmpfs tmpfs '{read_only}' && mkdir '{read_only}/root' || exit 99",
        f"mount -o remount,ro '{read_only}' || exit 99",
        f"{daemon} '{read_only}/root'; echo ro-exit=$?",
    ])
    log = tmp_path / "ns.log"
    with namespace_shell(script, log) as proc:
        proc.wait(60)
    text = log.read_text()
    if proc.returncode == 99:
        pytest.skip(f"cannot mount a tmpfs here: {text}")
    assert "full-exit=1" in text and "ro-exit=1" in text, text
    assert "Traceback" not in text, text
    assert text.count("[ERROR] cannot write to the queue folder") == 2, text
    assert "No space left on device" in text and "Read-only file system" in text


# Item 12: the daemon is a child subreaper #####################################################


@needs_namespace
def test_a_child_that_escaped_with_env_i_and_setsid_ends_with_its_task(queue_root, tmp_path):
    """The daemon is not PID 1 here (bash is), so only a subreaper gets the orphans."""
    inst = queue_root / "reaper"
    ready, go = tmp_path / "ready", tmp_path / "go"
    task = submit(inst, "escape.sh", textwrap.dedent(f"""\
        sh -c 'env -i setsid sleep 0.3 &'
        env -i setsid sleep 317 &
        touch '{ready}'
        while [ ! -e '{go}' ]; do sleep 0.1; done
        """))
    log = tmp_path / "ns.log"
    script = f"{sys.executable} '{DAEMON}' --job-id reaper --queue-root '{queue_root}' {FAST} " \
             f"--kill-scope none & wait $!"
    with namespace_shell(script, log) as proc:
        wait_for(ready.exists, 20, what="the task to start")

        def daemon() -> psutil.Process:
            [found] = [p for p in namespace_processes(proc) if str(DAEMON) in command_line(p)
                       and "--fence-keeper" not in command_line(p)]  # (the daemon's keeper)
            return found

        def escaped() -> list[psutil.Process]:
            return [p for p in namespace_processes(proc)
                    if command_line(p) == ["sleep", "317"]]

        assert len(escaped()) == 1
        time.sleep(1.0)  # the short orphan has ended by now: it is reaped, not left a zombie
        wait_for(lambda: not [c for c in daemon().children()
                              if process_state(c) == psutil.STATUS_ZOMBIE], 5, what="no zombie")
        go.touch()
        wait_for(lambda: finished(inst, task), 20, what="the task to end")
        wait_for(lambda: escaped() == [], 5, what="the escaped child to end")
        assert "ended 1 leftover process(es)" in (inst / "logs" / f"{task}.log").read_text()
        command(inst, "shutdown")
        proc.wait(20)


def test_an_orphan_is_taken_for_a_task_only_with_proof(tmp_path):
    """The rule for several tasks on a node, with this process as the subreaper: an orphan
    with another running task's marker is spared; one with the ending task's marker or a
    finished task's is taken, and so is one seen below the task (its lineage); one without a
    marker and without lineage is left alone."""
    script = textwrap.dedent(f"""\
        import os, subprocess, sys, time
        sys.path.insert(0, {str(REPO)!r})
        import perpetual_motion as pm
        assert pm.become_subreaper()
        base = {{k: v for k, v in os.environ.items() if k != pm.MARKER_VAR}}
        def orphan(marker, tag):
            env = dict(base, **({{pm.MARKER_VAR: marker}} if marker else {{}}))
            # the shell ends at once: its sleep becomes this process's child
            subprocess.run(["bash", "-c", f"exec -a {{tag}} sleep 60 >/dev/null 2>&1 &"],
                           env=env, check=True)
        orphan("j/ending", "ending"); orphan("j/other", "other"); orphan("", "stranger")
        orphan("j/finished", "finished"); orphan("", "seen"); orphan("k/ending", "alien")
        time.sleep(0.3)
        tags = {{p.pid: open(f"/proc/{{p.pid}}/cmdline", "rb").read().split(b"\\0")[0].decode()
                for p in __import__("psutil").Process().children()}}
        [seen] = [pid for pid, tag in tags.items() if tag == "seen"]
        taken, left = pm.leftover_pids("j/ending", others={{"j/other"}},
                                       lineage=pm.lineage_of(seen))
        print(*sorted(tags[p] for p in taken), "|", *sorted(tags[p] for p in left))
        """)
    run = subprocess.run([*UNSHARE, sys.executable, "-c", script], capture_output=True,
                         text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["ending", "finished", "seen", "|", "alien", "stranger"]


MISSING_RUNNING = textwrap.dedent("""\
    import json, os, sys, time
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    from pathlib import Path
    from conftest import run_until
    from queue_files import finished, result, submit
    from test_daemon_unit import FakeClock, started_daemon
    import perpetual_motion as pm
    daemon, clock, inst = started_daemon(Path({root!r}))
    go = Path({root!r}) / "go"
    facts = {{}}

    def task_running(task):
        entry = daemon.runner.tasks.get((task, None))
        return entry is not None and entry.proc is not None and entry.proc.poll() is None

    def ticks(n):
        for _ in range(n):
            daemon.tick()
            clock.sleep(0.1)
            time.sleep(0.01)

    # running/ is away for a moment (renamed away and back, as an automount or a failing
    # shared storage can make it look): the task runs on and is recorded when it ends
    task = submit(inst, "waits.sh", f"while [ ! -e {{go}} ]; do sleep 0.05; done\\n")
    run_until(daemon, clock, lambda: task_running(task))
    os.rename(inst / "running", inst / "running.away")
    ticks(5)
    facts["runs_while_away"] = task_running(task)
    facts["count_while_away"] = pm.parse_fields(
        (inst / "nodes" / "node-0.state").read_text())["running_count"]
    os.rename(inst / "running.away", inst / "running")
    ticks(5)
    facts["runs_after"] = task_running(task)
    go.touch()
    run_until(daemon, clock, lambda: finished(inst, task))
    facts["end"] = [finished(inst, task), (result(inst, task) or {{}}).get("state")]
    go.unlink()

    # another daemon finished it (this node was taken for dead): its result and failed/ say so
    other = submit(inst, "other.sh", f"while [ ! -e {{go}} ]; do sleep 0.05; done\\n")
    run_until(daemon, clock, lambda: task_running(other))
    proc = daemon.runner.tasks[(other, None)].proc
    (inst / "records" / f"{{other}}.result").write_text(pm.format_fields(
        {{"id": other, "state": "interrupted", "reason": "node 0's daemon died"}}))
    os.rename(inst / "running" / other, inst / "failed" / other)
    ticks(3)
    facts["other_let_go"] = (other, None) not in daemon.runner.tasks
    facts["other_killed"] = proc.wait(5) in (-9, 0)  # (0: reaped by the daemon, PID 1 here)
    facts["other_gone"] = not os.path.exists(f"/proc/{{proc.pid}}")
    facts["other_reason"] = result(inst, other)["reason"]

    # a task that ends while running/ is away: its end is recorded once running/ is back
    ends = submit(inst, "ends.sh", f"while [ ! -e {{go}} ]; do sleep 0.05; done\\n")
    run_until(daemon, clock, lambda: task_running(ends))
    os.rename(inst / "running", inst / "running.away")
    go.touch()
    ticks(20)
    os.rename(inst / "running.away", inst / "running")
    run_until(daemon, clock, lambda: finished(inst, ends))
    facts["ended_away"] = [finished(inst, ends), (result(inst, ends) or {{}}).get("state")]
    go.unlink()

    # running/ deleted for good: created again once it has been missing for a heartbeat period
    os.rmdir(inst / "running")
    ticks(int(pm.HEARTBEAT_SECONDS / 0.1) + 5)
    facts["made_again"] = (inst / "running").is_dir()
    print(json.dumps(facts))
    """)


@needs_namespace
def test_a_running_folder_missing_for_a_moment_kills_nothing(tmp_path):
    """running/ that cannot be listed for a moment proves nothing: every task was SIGKILLed
    as "finished by another daemon", with no result, and stayed in running/ for ever. A task
    is let go only when another daemon's end of it is on record, and one that ends meanwhile is
    recorded once running/ is back."""
    script = MISSING_RUNNING.format(repo=str(REPO), tests=str(Path(__file__).parent),
                                    root=str(tmp_path))
    run = subprocess.run([*UNSHARE, sys.executable, "-c", script], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    facts = json.loads(run.stdout.splitlines()[-1])
    assert facts["runs_while_away"] and facts["runs_after"], facts
    assert facts["count_while_away"] == "1", facts
    assert facts["end"] == ["done", "done"], facts
    assert facts["other_let_go"] and facts["other_killed"] and facts["other_gone"], facts
    assert facts["other_reason"] == "node 0's daemon died", facts  # its record stands
    assert facts["ended_away"] == ["done", "done"], facts
    assert facts["made_again"], facts

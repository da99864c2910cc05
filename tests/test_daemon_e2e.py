"""The real daemon as a process, each in its own PID namespace, on a temporary queue root."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from conftest import (
    DAEMON,
    UNSHARE,
    command_line,
    is_live,
    namespace_shell,
    needs_namespace,
    nvml_works_here,
    process_name,
    read_fields,
    wait_for,
)
from queue_files import command, finished, result, submit

import perpetual_motion as pm

pytestmark = needs_namespace


def reply(instance: Path, name: str, timeout: float = 10.0) -> dict[str, str]:
    path = instance / "replies" / f"{name}.reply"
    wait_for(path.exists, timeout, what=f"reply {name}")
    return read_fields(path)


def wait_finished(instance: Path, task_id: str, timeout: float = 15.0) -> str:
    return wait_for(lambda: finished(instance, task_id), timeout, what=f"{task_id} to finish")


def test_bad_job_id_is_refused_and_nothing_is_created(queue_root):
    for bad in ("../x", "a/b", "", ".x", "-x"):
        run = subprocess.run([*UNSHARE, sys.executable, str(DAEMON), f"--job-id={bad}",
                              "--queue-root", str(queue_root / "new"), "--no-keepalive"],
                             capture_output=True, text=True, timeout=30)
        assert run.returncode == 2, (bad, run.stderr)
        assert "invalid JOB_ID" in run.stderr
    assert not (queue_root / "new").exists()
    assert not (queue_root.parent / "x").exists()


def test_help_explains_every_option():
    run = subprocess.run([*UNSHARE, sys.executable, str(DAEMON), "--help"], capture_output=True,
                         text=True)
    assert run.returncode == 0
    for flag in ("--job-id", "--queue-root", "--poll-interval", "--hours", "--no-keepalive",
                 "--kill-scope", "--stop-grace", "--node-rank", "--num-nodes", "--callback",
                 "--force"):
        assert flag in run.stdout


def test_start_banner_tasks_in_order_environment_and_logs(queue_root, start_daemon, tmp_path):
    inst = queue_root / "exp1"
    workdir = tmp_path / "work dir"
    workdir.mkdir()
    out = tmp_path / "out.txt"
    ids = [
        submit(inst, "second.sh", f"echo second >> '{out}'\n", priority=500),
        submit(inst, "first.py", f"open({str(out)!r}, 'a').write('first\\n')\n", priority=1),
        submit(inst, "env.sh", textwrap.dedent(f"""\
            echo "$JOB_ID|$TASK_SHORT_NAME|$CUDA_DEVICE_ORDER|$PWD|$NODE_RANK" >> '{out}'
            echo "marker=$PERPETUAL_MOTION_TASK"
            exit 7
            """), priority=900, cwd=str(workdir)),
    ]
    daemon = start_daemon(queue_root, "exp1")
    output = daemon.output()
    assert "[INFO] Started at: " in output and "[INFO] Auto-shutdown at: " in output
    assert "(24h)" in output
    for task_id in ids:
        wait_finished(inst, task_id)
    lines = out.read_text().splitlines()
    assert lines == ["first", "second", f"exp1|env.sh|PCI_BUS_ID|{workdir}|0"]
    assert finished(inst, ids[2]) == "failed"
    res = result(inst, ids[2])
    assert (res["state"], res["exit_code"], res["signal"]) == ("failed", "7", "")
    log = (inst / "logs" / f"{ids[2]}.log").read_text()
    assert log.startswith(f"[perpetual-motion] task: {ids[2]}\n")
    assert f"marker=exp1/{ids[2]}\n" in log
    assert log.rstrip().splitlines()[-1].startswith("[perpetual-motion] exited with status 7")
    assert daemon.stop() == 0
    state = daemon.state()
    assert state["status"] == "stopped" and state["current_task"] == ""


def test_a_second_daemon_for_a_live_instance_refuses(queue_root, start_daemon):
    start_daemon(queue_root, "solo")
    second = start_daemon(queue_root, "solo", wait=False)
    assert second.wait_exit() == 3
    assert "already running" in second.output()


def test_stop_kills_the_whole_task_tree_even_what_escaped_the_group(queue_root, start_daemon,
                                                                   tmp_path):
    inst = queue_root / "stopper"
    daemon = start_daemon(queue_root, "stopper", "--kill-scope", "task")
    ready = tmp_path / "ready"
    task = submit(inst, "tree.sh", textwrap.dedent(f"""\
        sleep 60 &
        sleep 61 &
        setsid nohup sleep 62 >/dev/null 2>&1 &
        touch '{ready}'
        wait
        """))
    wait_for(ready.exists, 10, what="task to start its children")
    inside = daemon.daemon_process()
    sleepers = lambda: [p for p in inside.parent().children(recursive=True)  # noqa: E731
                        if process_name(p) == "sleep"]  # zombies too: they are not reaped yet
    wait_for(lambda: len(sleepers()) == 3, 5, what="three sleepers")
    name = command(inst, "stop", task)
    assert reply(inst, name)["result"] == "stopped"
    wait_finished(inst, task)
    res = result(inst, task)
    assert (res["state"], res["signal"], res["reason"]) == ("stopped", "15", "stopped by user")
    wait_for(lambda: sleepers() == [], 3, what="every sleeper to be gone and reaped")
    log = (inst / "logs" / f"{task}.log").read_text()
    assert "killed by signal 15 (SIGTERM)" in log and "stopped by user" in log


def test_a_task_that_ignores_sigterm_is_killed_after_the_grace(queue_root, start_daemon, tmp_path):
    inst = queue_root / "stubborn"
    start_daemon(queue_root, "stubborn", "--stop-grace", "1", "--kill-scope", "none")
    ready = tmp_path / "ready"
    task = submit(inst, "stubborn.sh", f"trap '' TERM; touch '{ready}'; sleep 60 & wait; "
                                       f"sleep 60\n")
    wait_for(ready.exists, 10)
    t0 = time.monotonic()
    command(inst, "stop", task)
    wait_finished(inst, task)
    assert 0.8 < time.monotonic() - t0 < 6
    assert result(inst, task)["signal"] == "9"


@pytest.mark.parametrize("scope,stray", [("user-python", "stray-gone"), ("task", "stray-alive")])
def test_stop_all_cancels_pending_stops_running_and_kills_other_python(queue_root, tmp_path,
                                                                       scope, stray):
    """The seed's `gpu_stop all`, with a stray Python process beside the daemon."""
    inst = queue_root / "all"
    ready = tmp_path / "ready"
    running = submit(inst, "run.sh", f"touch '{ready}'; sleep 60\n", priority=1)
    queued = [submit(inst, f"q{i}.sh", "true\n") for i in range(3)]
    log = tmp_path / "daemon.log"
    script = (f"{sys.executable} -c 'import time; time.sleep(120)' & stray=$!; "
              f"{sys.executable} {DAEMON} --job-id all --queue-root '{queue_root}' "
              f"--poll-interval 0.1 --no-keepalive --stop-grace 1 --kill-scope {scope} & "
              f"wait $!; echo daemon-exit=$?; "
              f"if kill -0 $stray 2>/dev/null; then echo stray-alive; else echo stray-gone; fi")
    with namespace_shell(script, log) as proc:
        wait_for(ready.exists, 15, what="running task")
        name = command(inst, "stop_all")
        answer = reply(inst, name)
        assert (answer["result"], answer["cancelled_count"], answer["stopped"]) == \
            ("ok", "3", running)
        wait_finished(inst, running)
        for task_id in queued:
            assert finished(inst, task_id) == "failed"
            assert result(inst, task_id)["state"] == "cancelled"
        if scope == "user-python":
            wait_for(lambda: "Ended 1 other Python" in log.read_text(), 10, what="python kill")
        command(inst, "shutdown")
        proc.wait(20)
        text = log.read_text()
        assert "daemon-exit=0" in text and stray in text


def test_shutdown_keeps_pending_and_fails_the_running_task_as_interrupted(queue_root,
                                                                         start_daemon, tmp_path):
    inst = queue_root / "down"
    daemon = start_daemon(queue_root, "down")
    ready = tmp_path / "ready"
    running = submit(inst, "long.sh", f"touch '{ready}'; sleep 60\n", priority=1)
    wait_for(ready.exists, 10)
    later = submit(inst, "later.sh", "true\n")
    name = command(inst, "shutdown")
    assert reply(inst, name)["result"] == "accepted"
    assert daemon.wait_exit() == 0
    assert (inst / "pending" / later).exists()
    res = result(inst, running)
    assert (res["state"], res["reason"]) == ("interrupted", "daemon shutdown")
    assert finished(inst, running) == "failed"
    assert daemon.state()["status"] == "stopped"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_shut_down_gracefully(queue_root, start_daemon, sig):
    daemon = start_daemon(queue_root, "sig")
    daemon.signal(sig)
    assert daemon.wait_exit() == 0
    assert f"Shutting down: {signal.Signals(sig).name} received" in daemon.output()


def test_the_callback_of_the_last_task_runs_even_as_the_daemon_exits(queue_root, start_daemon,
                                                                      tmp_path):
    out = tmp_path / "told"
    daemon = start_daemon(queue_root, "cb", "--callback",
                          f'sleep 1; echo "$PM_TASK_NAME $PM_TASK_STATE" >> "{out}"')
    task = submit(queue_root / "cb", "last.sh", "true\n")
    assert wait_for(lambda: finished(queue_root / "cb", task), 20, what=task) == "done"
    assert daemon.stop() == 0  # at once: the callback still sleeps
    assert out.read_text() == "last.sh done\n"


def test_a_callback_outlives_the_clean_up_after_the_next_task(queue_root, start_daemon,
                                                              tmp_path):
    """The daemon ends what a task leaves behind among its own children: never a callback."""
    out, inst = tmp_path / "told", queue_root / "cb2"
    start_daemon(queue_root, "cb2", "--callback", f'sleep 4; echo "$PM_TASK_NAME" >> "{out}"')
    first = submit(inst, "first.sh", "true\n")
    assert wait_for(lambda: finished(inst, first), 20, what=first) == "done"
    second = submit(inst, "second.sh", "true\n")  # ends while the first callback sleeps
    assert wait_for(lambda: finished(inst, second), 20, what=second) == "done"
    wait_for(lambda: out.exists() and sorted(out.read_text().split()) == ["first.sh",
                                                                           "second.sh"],
             15, what="both callbacks")


def test_auto_shutdown_after_a_fraction_of_an_hour(queue_root, start_daemon):
    t0 = time.monotonic()
    daemon = start_daemon(queue_root, "brief", "--hours", "0.0005")
    assert daemon.wait_exit(20) == 0
    assert 1.0 < time.monotonic() - t0 < 15
    assert "Auto-shutdown: auto-shutdown after" in daemon.output()


def test_sigkill_mid_task_then_restart_recovers_and_kills_the_orphans(queue_root, tmp_path):
    """The seed's story: the daemon dies, is started again with the same JOB_ID."""
    inst = queue_root / "crash"
    ready = tmp_path / "ready"
    out = tmp_path / "after.txt"
    victim = submit(inst, "victim.sh", f"setsid sleep 300 & touch '{ready}'; sleep 300\n",
                    priority=1)
    after = submit(inst, "after.sh", f"echo ran >> '{out}'\n")
    log = tmp_path / "ns.log"
    args = f"--job-id crash --queue-root '{queue_root}' --poll-interval 0.1 --no-keepalive"
    script = (f"{sys.executable} {DAEMON} {args} & wait $!; echo first-exit=$?; "
              f"{sys.executable} {DAEMON} {args} --hours 0.001; echo second-exit=$?")
    with namespace_shell(script, log) as proc:
        wait_for(ready.exists, 15, what="victim task")
        def inside(program: str) -> list[psutil.Process]:
            return [p for p in psutil.Process(proc.pid).children(recursive=True)
                    if program in command_line(p)[:2]
                    and "--fence-keeper" not in command_line(p)]  # (the daemon's keeper)

        daemons = inside(str(DAEMON))
        assert len(daemons) == 1
        # The detached sleep may still be ``setsid`` for a moment after the task's ready file.
        sleeps_before = wait_for(lambda: len(inside("sleep")) == 2 and inside("sleep"), 10,
                                 what="the task's two sleeps")
        daemons[0].kill()
        wait_for(lambda: "first-exit=137" in log.read_text(), 10)
        wait_finished(inst, after, 20)
        assert out.read_text() == "ran\n"
        res = result(inst, victim)
        assert (res["state"], res["reason"]) == ("interrupted", "daemon died")
        assert finished(inst, victim) == "failed"
        assert not any(is_live(p) for p in sleeps_before)
        assert "orphaned process(es) ended" in (inst / "logs" / f"{victim}.log").read_text()
        proc.wait(20)
        assert "second-exit=0" in log.read_text()


def test_tasks_of_a_daemon_killed_and_started_again_later_end_when_they_last_ran(
        queue_root, start_daemon):
    """kill -9 takes the daemon down with its PID namespace (it is its PID 1), and its tasks
    with it. The daemon started for the node later records them interrupted, ended when they
    were last known to run (its predecessor's last beat, or a task's last line in its log),
    not at the restart; and found at the restart."""
    inst = queue_root / "later"
    first = start_daemon(queue_root, "later", "--gpus", "2")
    chatty = submit(inst, "chatty.sh", "while :; do echo tick; sleep 0.1; done\n", gpus=1)
    quiet = submit(inst, "quiet.sh", "sleep 300\n", gpus=1)
    log = inst / "logs" / f"{chatty}.log"
    wait_for(lambda: (inst / "records" / f"{quiet}.run").exists() and log.exists()
             and "tick" in log.read_text(), 15, what="both tasks to run")
    time.sleep(1.0)
    first.signal(signal.SIGKILL)
    killed = time.time()
    first.wait_exit()
    time.sleep(3.0)
    restarted = time.time()
    start_daemon(queue_root, "later", "--gpus", "2", "--force")
    res = {task: wait_finished(inst, task) and result(inst, task) for task in (chatty, quiet)}
    assert killed - 1.0 <= float(res[chatty]["ended"]) <= killed + 0.5  # its last line
    assert killed - pm.HEARTBEAT_SECONDS - 1.0 <= float(res[quiet]["ended"]) <= killed + 0.5
    for task, end in res.items():
        assert (finished(inst, task), end["state"], end["reason"]) == \
            ("failed", "interrupted", "daemon died")
        assert float(end["duration"]) == pytest.approx(
            float(end["ended"]) - float(end["started"]), abs=0.01)
        assert float(end["found"]) >= restarted


def test_corrupt_files_are_logged_and_skipped(queue_root, start_daemon):
    inst = queue_root / "dirty"
    inst.mkdir()
    for folder in ("records", "commands", "nodes", "pending"):
        (inst / folder).mkdir()
    (inst / "nodes" / "node-0.state").write_bytes(b"\x00\x01garbage")
    task = submit(inst, "t.sh", "true\n", cwd="/")
    (inst / "records" / f"{task}.submit").write_bytes(b"\xff\xfe\x00 not key value")
    (inst / "commands" / "x.cmd").write_bytes(b"\x00\x00\x00")
    (inst / "pending" / "subdir").mkdir()
    daemon = start_daemon(queue_root, "dirty")
    # A submit record that exists but cannot be read fails its task: it must not run in
    # another directory than the one it was submitted from.
    assert wait_finished(inst, task) == "failed"
    assert result(inst, task)["reason"].startswith("unreadable submit record: line 1 ")
    assert read_fields(inst / "replies" / "x.reply")["result"] == "error"
    assert daemon.proc.poll() is None
    assert "[WARNING]" in daemon.output()


@pytest.mark.parametrize("started", ["1e300", "-1e300"])
def test_a_run_record_with_a_time_no_calendar_holds_does_not_stop_a_start(queue_root,
                                                                          start_daemon, started):
    inst = queue_root / "far"
    for folder in ("running", "records", "logs"):
        (inst / folder).mkdir(parents=True)
    task = pm.task_id_for("t.sh")
    (inst / "running" / task).write_text("true\n")
    (inst / "records" / f"{task}.run").write_text(pm.format_fields(
        {"id": task, "node_rank": "0", "host": "elsewhere", "started": started}))
    (inst / "logs" / f"{task}.log").write_text("it printed\n")  # so it is known to have run
    daemon = start_daemon(queue_root, "far")
    assert wait_finished(inst, task) == "failed"
    assert result(inst, task)["state"] == "interrupted"
    assert "Traceback" not in daemon.output()


def test_ten_concurrent_stop_commands_are_all_honoured(queue_root, start_daemon):
    inst = queue_root / "many"
    blocker = submit(inst, "block.sh", "sleep 60\n", priority=0)
    tasks = [submit(inst, f"t{i}.sh", "true\n") for i in range(10)]
    start_daemon(queue_root, "many", "--kill-scope", "none")
    wait_for(lambda: (inst / "running" / blocker).exists(), 10)
    senders = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""\
        import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
        sys.path.insert(0, {str(DAEMON.parent)!r})
        from queue_files import command; from pathlib import Path
        print(command(Path({str(inst)!r}), "stop", {t!r}))
        """)], stdout=subprocess.PIPE, text=True) for t in tasks]
    names = [s.communicate(timeout=30)[0].strip() for s in senders]
    assert len(set(names)) == 10
    for name in names:
        assert reply(inst, name)["result"] == "cancelled"
    assert sorted(os.listdir(inst / "failed")) == sorted(tasks)
    assert (inst / "running" / blocker).exists()



@pytest.mark.skipif(nvml_works_here(), reason="checks the behaviour without a GPU")
def test_without_a_gpu_keepalive_is_off_with_one_warning_and_the_queue_runs(queue_root,
                                                                            start_daemon):
    inst = queue_root / "nogpu"
    daemon = start_daemon(queue_root, "nogpu", keepalive=True)
    task = submit(inst, "t.sh", "true\n")
    assert wait_finished(inst, task) == "done"
    warnings = [line for line in daemon.output().splitlines() if "[WARNING]" in line]
    assert len(warnings) == 1 and "Keep-alive off" in warnings[0], warnings
    assert daemon.state()["keepalive"].startswith("off: ")
    assert daemon.state()["gpu_count"] == "0"

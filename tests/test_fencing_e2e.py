"""Fencing, end to end: a daemon ends only processes it can prove are a task's, and records a
task ended only when nothing of it runs. Real daemons, each PID 1 of its own PID namespace (as
a container whose entrypoint execs the daemon), on one queue folder."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
from conftest import DAEMON, command_line, is_live, namespace_shell, needs_namespace, wait_for
from queue_files import command, finished, result, submit

import perpetual_motion as pm

FAST = "--poll-interval 0.1 --no-keepalive --stop-grace 1 --gpus 1"

pytestmark = needs_namespace


def in_namespace(daemon, script: str) -> None:
    """Run ``script`` with sh inside the daemon's PID namespace, in a session of its own; what
    it starts in the background and leaves becomes an orphan of the daemon (its PID 1)."""
    pid = daemon.daemon_process().pid
    subprocess.run(["nsenter", "-t", str(pid), "-p", "-m", "--", "setsid", "sh", "-c", script],
                   check=True, timeout=30, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def processes(daemon, *args: str) -> list[psutil.Process]:
    """The processes of the daemon's namespace whose command line is ``args``."""
    root = psutil.Process(daemon.proc.pid)
    return [p for p in root.children(recursive=True) if command_line(p) == list(args)]


def test_pid_1_leaves_orphans_that_are_no_tasks_alone_and_says_so(queue_root, start_daemon):
    inst = queue_root / "init"
    daemon = start_daemon(queue_root, "init")
    # a user's nohup job, a process that is not Python, a process of another user
    in_namespace(daemon, "nohup sleep 311 >/dev/null 2>&1 & "
                         "perl -e 'sleep 312' >/dev/null 2>&1 & "
                         "setpriv --reuid=nobody --regid=nogroup --clear-groups sleep 313 &")
    strangers = [("sleep", "311"), ("perl", "-e", "sleep 312"), ("sleep", "313")]
    wait_for(lambda: all(processes(daemon, *args) for args in strangers), 10,
             what="the three orphans")
    [adopted] = processes(daemon, "sleep", "311")
    assert adopted.ppid() != daemon.proc.pid  # the daemon adopted them (PID 1)
    for n in range(2):
        task = submit(inst, f"quick{n}.sh", "echo quick\n")
        assert wait_for(lambda t=task: finished(inst, t), 15, what="the quick task") == "done"
        assert "leftover" not in (inst / "logs" / f"{task}.log").read_text()
    for args in strangers:
        [proc] = processes(daemon, *args)
        assert is_live(proc), args
    output = daemon.output()
    assert output.count("Left alone 3 process(es)") == 1, output  # once, not at every task
    assert "(sleep, user 65534)" in output and "(perl, user 0)" in output


def test_a_callbacks_child_under_env_i_outlives_the_next_task(queue_root, start_daemon):
    inst = queue_root / "cb"
    daemon = start_daemon(queue_root, "cb", "--callback",
                          "env -i sleep 314 >/dev/null 2>&1 &")
    first = submit(inst, "first.sh", "true\n")
    wait_for(lambda: finished(inst, first), 15, what="the first task")
    wait_for(lambda: processes(daemon, "sleep", "314"), 10, what="the callback's child")
    second = submit(inst, "second.sh", "true\n", priority=100)
    wait_for(lambda: finished(inst, second), 15, what="the second task")
    # the callback of the second task starts another sleep 314; the first one still lives
    wait_for(lambda: len(processes(daemon, "sleep", "314")) == 2, 10,
             what="both callbacks' children")
    assert all(is_live(p) for p in processes(daemon, "sleep", "314"))


def test_a_restarted_daemon_ends_what_its_predecessors_tasks_left_before_starting(
        queue_root, tmp_path):
    """The daemon is not PID 1 here (bash is): killed, it leaves its task running. Node 0 has
    recorded that task interrupted meanwhile; the next daemon of the node must end it before
    it gives its GPU to another task."""
    inst = queue_root / "again"
    restart, oldpid, seen = tmp_path / "restart", tmp_path / "oldpid", tmp_path / "seen"
    daemon = f"{sys.executable} '{DAEMON}' --job-id again --queue-root '{queue_root}' {FAST}"
    script = (f"{daemon} & while [ ! -e '{restart}' ]; do sleep 0.05; done; "
              f"{daemon} & wait $!")
    old = submit(inst, "old.sh", f"echo $$ > '{oldpid}'; sleep 300\n", gpus=1)
    with namespace_shell(script, tmp_path / "ns.log") as shell:
        wait_for(lambda: oldpid.exists() and oldpid.read_text().strip(), 20,
                 what="the first task")

        def daemons() -> list[psutil.Process]:
            return [p for p in psutil.Process(shell.pid).children(recursive=True)
                    if command_line(p)[:2] == [sys.executable, str(DAEMON)]
                    and "--fence-keeper" not in command_line(p)]

        [first] = daemons()
        first.kill()
        first.wait(10)
        [task] = [p for p in psutil.Process(shell.pid).children(recursive=True)
                  if command_line(p) == ["sleep", "300"]]
        # node 0 finished it as interrupted, as it does once the node's heartbeat is stale
        (inst / "records" / f"{old}.result").write_text(
            pm.format_fields({"id": old, "state": "interrupted",
                              "reason": "node 0's daemon died"}))
        (inst / "running" / old).rename(inst / "failed" / old)
        new = submit(inst, "new.sh", f"kill -0 $(cat '{oldpid}') 2>/dev/null && "
                                     f"echo alive > '{seen}' || echo gone > '{seen}'\n", gpus=1)
        restart.touch()
        assert wait_for(lambda: finished(inst, new), 30, what="the new task") == "done"
        assert seen.read_text() == "gone\n"
        assert not is_live(task)
        assert result(inst, old)["reason"] == "node 0's daemon died"  # its record stands
        [second] = daemons()
        second.terminate()
        shell.wait(20)
    assert "process(es) of tasks that an earlier daemon of this node left running" in \
        (tmp_path / "ns.log").read_text()


def test_a_suspended_daemons_tasks_are_fenced_before_the_node_may_be_taken_for_dead(
        queue_root, start_daemon, tmp_path):
    """A daemon stopped (SIGSTOP, a debugger, Ctrl-Z) writes no heartbeat, and its own fence
    is stopped with it: its fence keeper, a process of its own, kills its tasks once the beat
    is SELF_FENCE_SECONDS late, before another node may take the node for dead and record
    them ended. Resumed, the daemon records them interrupted, ended when it last saw them run
    (before it was stopped), found once it was resumed."""
    inst = queue_root / "sus"
    ticks = tmp_path / "ticks"
    daemon = start_daemon(queue_root, "sus")

    def the_keeper() -> psutil.Process | None:  # (it starts a moment after the daemon is up)
        found = [p for p in psutil.Process(daemon.proc.pid).children(recursive=True)
                 if "--fence-keeper" in command_line(p)]
        return found[0] if len(found) == 1 else None

    keeper = wait_for(the_keeper, 10, what="the fence keeper")
    wait_for(lambda: keeper.name() == pm.FENCE_PROCESS_NAME, 10, what="the keeper's name")
    task = submit(inst, "t.sh", f"while :; do date +%s.%N >> '{ticks}'; sleep 0.2; done\n")
    wait_for(lambda: ticks.exists(), 15, what="the task to run")
    daemon.signal(signal.SIGSTOP)
    stopped, stopped_at = time.monotonic(), time.time()
    try:
        def quiet() -> bool:
            size = ticks.stat().st_size
            time.sleep(1.0)
            return ticks.stat().st_size == size
        wait_for(quiet, pm.SELF_FENCE_SECONDS + 15, what="the task to be fenced")
        fenced = time.monotonic() - stopped
        assert pm.SELF_FENCE_SECONDS - 1 <= fenced < pm.HEARTBEAT_STALE_SECONDS, fenced
    finally:
        resumed_at = time.time()
        daemon.signal(signal.SIGCONT)
    assert wait_for(lambda: finished(inst, task), 15, what="the task's end") == "failed"
    res = result(inst, task)
    assert res["state"] == "interrupted" and res["reason"].startswith("self-fenced"), res
    assert stopped_at - 1.0 <= float(res["ended"]) <= stopped_at + 0.001, res
    assert float(res["found"]) >= resumed_at, res
    daemon.stop()
    assert not keeper.is_running(), "the keeper outlived its daemon"


def test_a_task_finished_by_another_daemon_ends_here_with_what_left_its_group(
        queue_root, start_daemon):
    """Node 0 took this node for dead and recorded its task interrupted (storage that node 0
    could not read it through, say) while the task ran on here. The daemon, seeing that end,
    must end all of the task here, also a child that left its process group with setsid:
    killing the group alone left that child running on the GPU after the task's end."""
    inst = queue_root / "letgo"
    daemon = start_daemon(queue_root, "letgo", "--gpus", "1")
    task = submit(inst, "t.sh", "setsid sleep 321 & while :; do sleep 0.2; done\n", gpus=1)
    wait_for(lambda: processes(daemon, "sleep", "321"), 15, what="the escaped child")
    [child] = processes(daemon, "sleep", "321")
    (inst / "records" / f"{task}.result").write_text(pm.format_fields(
        {"id": task, "state": "interrupted", "reason": "node 1's daemon died"}))
    (inst / "running" / task).rename(inst / "failed" / task)
    wait_for(lambda: "was finished by another daemon" in daemon.output(), 15,
             what="the daemon to let go of the task")
    wait_for(lambda: not is_live(child), 5, what="the escaped child to end")
    assert result(inst, task)["reason"] == "node 1's daemon died"  # its record stands


def test_a_displaced_daemon_ends_what_left_its_tasks_groups(queue_root, tmp_path):
    """Another daemon took the node (its claim is in the state file): this one publishes
    nothing and ends its tasks, also a child that left a task's group with setsid. The new
    owner ended what it could see at its start, before this task began: nobody else ends it.
    The daemon is not PID 1 here (bash is), so its namespace outlives it."""
    inst = queue_root / "yield"
    daemon = f"{sys.executable} '{DAEMON}' --job-id yield --queue-root '{queue_root}' {FAST}"
    task = submit(inst, "t.sh", "setsid sleep 322 & while :; do sleep 0.2; done\n", gpus=1)
    with namespace_shell(f"{daemon} & wait $!; sleep 300", tmp_path / "ns.log") as shell:
        def sleeper() -> list[psutil.Process]:
            return [p for p in psutil.Process(shell.pid).children(recursive=True)
                    if command_line(p) == ["sleep", "322"]]
        wait_for(sleeper, 20, what="the escaped child")
        [child] = sleeper()
        state = inst / "nodes" / "node-0.state"
        fields = pm.parse_fields(state.read_text())
        fields.update(started=f"{time.time():.3f}", pid="4242", host="elsewhere")
        staged = inst / ".staging" / "claim"
        staged.write_text(pm.format_fields(fields))
        staged.rename(state)
        wait_for(lambda: "another daemon holds this instance and node" in
                 (tmp_path / "ns.log").read_text(), 15, what="the daemon to yield")
        wait_for(lambda: not is_live(child), 5, what="the escaped child to end")
        assert task in {p.name for p in (inst / "running").iterdir()}  # left to the new owner
        assert result(inst, task) is None


def test_a_daemon_whose_clock_is_ahead_does_not_take_a_live_node_over(queue_root, start_daemon,
                                                                       tmp_path):
    """A second daemon for the same node starts in another container (a job launched twice, or
    requeued) on a host whose clock is five minutes ahead: the owner's fresh heartbeat looks
    five minutes old there. It must watch the heartbeat advance and refuse (exit 3), not take
    the node over at once, record the owner's running task interrupted and end it."""
    inst = queue_root / "skew"
    skewed = tmp_path / "skewed"
    skewed.mkdir()
    (skewed / "sitecustomize.py").write_text(
        "import time\n_time = time.time\ntime.time = lambda: _time() + 300.0\n")
    owner = start_daemon(queue_root, "skew")
    ticks = tmp_path / "ticks"
    task = submit(inst, "t.sh", f"while :; do date +%s.%N >> '{ticks}'; sleep 0.2; done\n")
    wait_for(lambda: ticks.exists(), 15, what="the task to run")
    second = start_daemon(queue_root, "skew", env={"PYTHONPATH": str(skewed)}, wait=False)
    wait_for(lambda: second.proc.poll() is not None or "[INFO] Queue: " in second.output(),
             pm.TAKEOVER_WATCH_SECONDS + 15, what="the second daemon to refuse or start")
    assert second.wait_exit() == pm.EXIT_ALREADY_RUNNING, second.output()
    assert "whose heartbeat advances" in second.output()
    size = ticks.stat().st_size
    wait_for(lambda: ticks.stat().st_size > size, 5, what="the task to go on")
    assert owner.proc.poll() is None and result(inst, task) is None
    assert task in {p.name for p in (inst / "running").iterdir()}


def test_stopping_a_task_ends_no_task_whose_id_begins_with_its_id(queue_root, start_daemon,
                                                                  tmp_path):
    """A file put into pending/ by hand may be named like a client id that extends another
    task's (``<id>.sh``, a copy of a task's file): it is that name's own task. A stop of the
    first task ends what carries the first task's marker, and only that: a marker that merely
    begins with it is another task's."""
    inst = queue_root / "prefix"
    daemon = start_daemon(queue_root, "prefix", "--gpus", "2", "--kill-scope", "task")
    first = submit(inst, "t.sh", "sleep 331 & wait\n", gpus=1)
    wait_for(lambda: processes(daemon, "sleep", "331"), 15, what="the first task")
    second = f"{first}.sh"
    (inst / "records" / f"{second}.submit").write_text(pm.format_fields({"gpus": 1}))
    staged = inst / ".staging" / "copy"
    staged.write_text("sleep 332 & wait\n")
    staged.rename(inst / "pending" / second)
    wait_for(lambda: processes(daemon, "sleep", "332"), 15, what="the second task")
    [other] = processes(daemon, "sleep", "332")
    name = command(inst, "stop", first)
    wait_for(lambda: (inst / "replies" / f"{name}.reply").exists(), 15, what="the reply")
    assert wait_for(lambda: finished(inst, first), 15, what="the stop") == "failed"
    time.sleep(3)  # the stop's sweep of the task's processes (SIGTERM, then SIGKILL) is over
    assert is_live(other), "a stop ended another task's process"
    assert finished(inst, second) is None

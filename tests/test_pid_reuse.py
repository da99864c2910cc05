"""A task's process group is signalled by its number only while that number can be nobody
else's: once the daemon has reaped a task's main process, the group's number is free as soon as
the group is empty, and the kernel may give it to a new process that leads a group of its own
(another task, a user's shell job). In simulated time, in a PID namespace of the test's own,
where ``/proc/sys/kernel/ns_last_pid`` hands the freed number to a stranger on purpose."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO, UNSHARE, needs_namespace

pytestmark = needs_namespace

# A daemon on simulated time, stop grace 3 s; ``take_pid(pid)`` starts ``sleep 600`` as the
# leader of a session of its own under that very PID (a stranger to every task)
PRELUDE = textwrap.dedent("""\
    import json, os, subprocess, sys, time
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    from pathlib import Path
    import psutil
    from conftest import FakeClock, command_line
    from queue_files import finished, result, submit
    import perpetual_motion as pm
    root = Path({root!r})
    clock = FakeClock()
    config = pm.Config(job_id="reuse", queue_root=root, poll_interval=0.1, hours=1.0,
                       keepalive=False, kill_scope="none", stop_grace=3.0)
    daemon = pm.Daemon(config, clock=clock, sleep=clock.sleep,
                       inventory=pm.Inventory.declare(range(3)))
    assert daemon.start() is None
    inst = root / "reuse"

    def take_pid(pid):
        for _ in range(50):
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(pid - 1))
            proc = subprocess.Popen(["sleep", "600"], start_new_session=True)
            if proc.pid == pid:
                return psutil.Process(pid)
            proc.kill()
            proc.wait()
        raise SystemExit(f"pid {{pid}} could not be taken")

    def alive(proc):
        try:
            return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    """)

# Each task leaves a child in a session of its own that ignores SIGTERM, and its main process
# ends: the daemon reaps it and counts that child down (SIGKILL after the grace). Meanwhile the
# task's group is empty and its number goes to a stranger. Then the task ends by itself, or
# node 0 records it ended meanwhile (this node was taken for dead): either way the daemon
# SIGKILLs "whatever is left of its group".
LEFTOVER = PRELUDE + textwrap.dedent("""\
    (root / "leftover.py").write_text(
        "import os, signal, sys, time\\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
        "open(sys.argv[1], 'w').write(str(os.getpid()))\\n"
        "time.sleep(600)\\n")
    facts = {{}}
    for case in ("ends", "finished_elsewhere"):
        pidfile = root / f"{{case}}.pid"
        task = submit(inst, f"{{case}}.sh",
                      f"setsid {{sys.executable}} {{root}}/leftover.py {{pidfile}} &\\n"
                      f"while [ ! -s {{pidfile}} ]; do sleep 0.05; done\\n")
        stranger, start = None, clock.now
        while (task, None) in daemon.runner.tasks or finished(inst, task) is None:
            assert clock.now - start < 60, "the task did not end"
            daemon.tick()
            running = daemon.runner.tasks.get((task, None))
            if stranger is None and running is not None and running.proc is not None \\
                    and running.proc.poll() is not None:  # reaped: its group is empty
                stranger = take_pid(running.proc.pid)
                left = psutil.Process(int(pidfile.read_text()))
                if case == "finished_elsewhere":  # as node 0 does once the node looks dead
                    (inst / "records" / f"{{task}}.result").write_text(pm.format_fields(
                        {{"id": task, "state": "interrupted", "reason": "node 0's daemon died"}}))
                    (inst / "running" / task).rename(inst / "failed" / task)
            clock.sleep(0.1)
            time.sleep(0.01)
        time.sleep(0.5)  # (a SIGKILL takes a moment)
        facts[case] = {{"stranger_alive": alive(stranger), "leftover_alive": alive(left),
                        "state": finished(inst, task)}}
        if alive(stranger):
            stranger.kill()
    print(json.dumps(facts))
    """)


def scenario(script: str, root: Path) -> dict:
    text = script.format(repo=str(REPO), tests=str(Path(__file__).parent), root=str(root))
    run = subprocess.run([*UNSHARE, sys.executable, "-c", text], capture_output=True,
                         text=True, timeout=300)
    if "could not be taken" in run.stderr or "ns_last_pid" in run.stderr:
        pytest.skip("cannot choose the next PID here (/proc/sys/kernel/ns_last_pid)")
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


def test_a_group_whose_number_went_to_another_process_is_not_signalled(tmp_path):
    """The daemon SIGKILLed a task's group by number after its countdown, when the task ended
    and when another daemon had recorded it ended: by then the number may lead another group,
    and that group got the SIGKILL."""
    root = tmp_path / "shared"
    root.mkdir()
    facts = scenario(LEFTOVER, root)
    assert facts["ends"] == {"stranger_alive": True, "leftover_alive": False,
                             "state": "done"}, facts
    assert facts["finished_elsewhere"] == {"stranger_alive": True, "leftover_alive": False,
                                           "state": "failed"}, facts


# The daemon runs three tasks and tells its fence keeper of them (here a pipe the test reads as
# the keeper would), then dies (kill -9): its pipe ends. Meanwhile the main process of two of
# them ends and is reaped (by init, here the test): one task leaves nothing, and its number goes
# to a stranger that leads a group of its own; the other leaves a child without its marker in
# its group. The third still runs, with a child without its marker. The keeper fences what it
# was told of once the beat is SELF_FENCE_SECONDS late (on a simulated clock).
KEEPER = PRELUDE + textwrap.dedent("""\
    import types
    read, write = os.pipe()
    os.set_blocking(write, False)
    daemon.keeper = pm.FenceKeeper(types.SimpleNamespace(stdin=os.fdopen(write, "wb"),
                                                         poll=lambda: None, pid=-1))
    gate = root / "gate"
    wait = f"while [ ! -e {{gate}} ]; do sleep 0.05; done\\n"
    unmarked = "env -u PERPETUAL_MOTION_TASK sleep"
    ends = submit(inst, "ends.sh", wait, gpus=1)
    leaves = submit(inst, "leaves.sh", f"{{unmarked}} 601 &\\n{{wait}}", gpus=1)
    runs = submit(inst, "runs.sh", f"{{unmarked}} 602 & wait\\n", gpus=1)

    def sleeper(seconds):
        found = [p for p in psutil.process_iter() if command_line(p) == ["sleep", seconds]]
        return found[0] if found else None

    start = clock.now
    while len([t for t in daemon.runner.tasks.values() if t.proc is not None]) < 3 \\
            or not sleeper("601") or not sleeper("602"):
        assert clock.now - start < 60, "the tasks did not start"
        daemon.tick()
        clock.sleep(0.1)
        time.sleep(0.01)
    daemon.tick()  # the keeper is told of all three
    left, child = sleeper("601"), sleeper("602")
    daemon.keeper.proc.stdin.close()  # the daemon dies
    gate.touch()
    ended = daemon.runner.tasks[(ends, None)].proc
    for task_id in (ends, leaves):
        daemon.runner.tasks[(task_id, None)].proc.wait(10)  # reaped, as init reaps an orphan
    stranger = take_pid(ended.pid)
    keeper_clock = FakeClock(0.0)
    code = pm.fence_keeper_main(pm.StdinControl(read), pm.SelfFence(keeper_clock),
                                sleep=keeper_clock.sleep)
    task = psutil.Process(daemon.runner.tasks[(runs, None)].proc.pid)
    until = time.monotonic() + 5  # (a SIGKILL takes a moment)
    while (alive(task) or alive(child) or alive(left)) and time.monotonic() < until:
        time.sleep(0.05)
    print(json.dumps({{"code": code, "fenced_after": keeper_clock.now,
                      "stranger_alive": alive(stranger), "task_alive": alive(task),
                      "child_alive": alive(child), "left_alive": alive(left)}}))
    for proc in (stranger, task, child, left):
        if alive(proc):
            proc.kill()
    """)


def test_the_fence_keeper_signals_no_group_whose_number_went_to_another_process(tmp_path):
    """The keeper killed each process group it was told of by its number alone: a task that
    ended while its daemon could not beat (the daemon gone, its orphans reaped by init) left a
    number that the kernel may give to another group's leader, which the keeper then killed.
    The groups that are still the tasks' it fences as before."""
    root = tmp_path / "shared"
    root.mkdir()
    facts = scenario(KEEPER, root)
    assert facts["code"] == 0 and facts["fenced_after"] >= 40.0, facts
    assert facts["stranger_alive"], facts
    # a running task's group, and a group whose leader has ended but that still has members
    assert not facts["task_alive"] and not facts["child_alive"], facts
    assert not facts["left_alive"], facts

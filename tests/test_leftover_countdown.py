"""What a finished task left running is ended by a countdown, as a stopped task is: SIGTERM
when its main process ends, SIGKILL once the grace has passed on the daemon's clock, checked at
each turn of the loop; the loop never waits for them. In simulated time, the daemon in its own
PID namespace (it ends processes)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import REPO, UNSHARE, needs_namespace

# A daemon on simulated time, its stop grace 5 s: the start of each script below
DAEMON = textwrap.dedent("""\
    import json, os, subprocess, sys, time
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    from pathlib import Path
    from conftest import FakeClock
    from queue_files import finished, result, submit
    import perpetual_motion as pm
    root = Path({root!r})
    clock = FakeClock()
    config = pm.Config(job_id={job!r}, queue_root=root, poll_interval=0.1, hours=1.0,
                       keepalive=False, kill_scope={scope!r}, stop_grace=5.0)
    daemon = pm.Daemon(config, clock=clock, sleep=clock.sleep)
    assert daemon.start() is None
    """)

SCRIPT = DAEMON + textwrap.dedent("""\
    inst = root / "left"
    facts = {{}}

    def alive(pidfile):
        try:
            stat = open(f"/proc/{{int(pidfile.read_text())}}/stat").read()
        except FileNotFoundError:
            return False
        return stat.rpartition(")")[2].split()[0] != "Z"  # a zombie has ended

    for case, child in [("ignores", "trap '' TERM; "), ("obeys", ""), ("hard", "trap '' TERM; ")]:
        pidfile = root / f"{{case}}.pid"
        task = submit(inst, f"{{case}}.sh",
                      f"setsid bash -c \\"{{child}}echo \\\\$\\\\$ > {{pidfile}}; "
                      "while :; do sleep 0.05; done\\" &\\n"
                      f"while [ ! -s {{pidfile}} ]; do sleep 0.05; done\\n")
        longest, start = 0.0, clock.now
        ended_at = None
        while finished(inst, task) is None and clock.now - start < 60:
            before = time.monotonic()
            daemon.tick()
            longest = max(longest, time.monotonic() - before)
            running = daemon.runner.tasks.get((task, None))
            if ended_at is None and running is not None and running.proc is not None \\
                    and running.proc.poll() is not None:  # its main process has ended
                ended_at = clock.now
                facts[case + "_alive_at_end"] = alive(pidfile)
                if case == "hard":  # as a second Ctrl-C: SIGKILL now, for its leftovers too
                    daemon.runner.stop(running, pm.TaskState.INTERRUPTED, "x", hard=True)
            if ended_at is not None and clock.now - ended_at < 4.5:
                facts[case + "_left_running"] = alive(pidfile)
            clock.sleep(0.1)
            time.sleep(0.01)
        ended_at = clock.now if ended_at is None else ended_at  # (never seen running)
        res = result(inst, task)
        facts[case] = {{"state": finished(inst, task), "longest_tick": longest,
                       "countdown": clock.now - ended_at,
                       "recorded_end": float(res["ended"]) - ended_at,
                       "gone": not alive(pidfile),
                       "log": (inst / "logs" / f"{{task}}.log").read_text()}}
    print(json.dumps(facts))
    """)


def facts_of(tmp_path: Path, template: str, **fields) -> dict:
    """Run ``template`` (a daemon on simulated time, formatted with ``fields``) in a PID
    namespace of its own, over a shared folder under ``tmp_path``; what it printed last."""
    root = tmp_path / "shared"
    root.mkdir()
    script = template.format(repo=str(REPO), tests=str(Path(__file__).parent), root=str(root),
                             **{k: v.format(root=root) for k, v in fields.items()})
    run = subprocess.run([*UNSHARE, sys.executable, "-c", script], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


@needs_namespace
def test_leftovers_end_by_a_countdown_on_the_daemons_clock(tmp_path):
    facts = facts_of(tmp_path, SCRIPT, job="left", scope="none")
    ignores, obeys = facts["ignores"], facts["obeys"]
    # a leftover that ignores SIGTERM: the loop goes on, SIGKILL comes after the grace (5 s)
    assert ignores["longest_tick"] < 2.0, ignores
    assert facts.get("ignores_alive_at_end") and facts.get("ignores_left_running"), facts
    assert 5.0 <= ignores["countdown"] < 8.0, ignores
    assert ignores["state"] == "done" and ignores["gone"], ignores
    assert re.search(r"ended [12] leftover process\(es\) of the task", ignores["log"])
    assert abs(ignores["recorded_end"]) < 0.5  # when its main process ended, not later
    # one that obeys SIGTERM ends the countdown at once
    assert obeys["countdown"] < 1.0 and obeys["state"] == "done" and obeys["gone"], obeys
    assert re.search(r"ended [12] leftover process\(es\) of the task", obeys["log"])
    hard = facts["hard"]
    assert hard["countdown"] < 3.0 and hard["state"] == "done" and hard["gone"], hard


SWEEP = DAEMON + textwrap.dedent("""\
    pidfile = root / "stray.pid"
    stray = subprocess.Popen([sys.executable, "-c",
                              "import os, signal, time; signal.signal(signal.SIGTERM, "
                              "signal.SIG_IGN); open({pidfile!r}, 'w').write(str(os.getpid()));"
                              " time.sleep(600)"])
    while not pidfile.exists() or not pidfile.read_text():
        time.sleep(0.05)
    daemon.ask_sweep()  # as a gpu_stop all with nothing running
    longest, start, alive_at = 0.0, clock.now, {{}}
    while stray.poll() is None and clock.now - start < 30:
        before = time.monotonic()
        daemon.tick()
        longest = max(longest, time.monotonic() - before)
        alive_at[round(clock.now - start, 1)] = stray.poll() is None
        clock.sleep(0.1)
        time.sleep(0.01)
    gone_after = clock.now - start
    for _ in range(20):  # the countdown's end is seen at the next turns
        daemon.tick()
        clock.sleep(0.1)
    print(json.dumps({{"longest_tick": longest, "gone_after": gone_after,
                      "alive_at_4": alive_at.get(4.0), "sweeps_left": len(daemon.sweeps)}}))
    """)


@needs_namespace
def test_a_sweep_of_other_python_processes_ends_by_a_countdown(tmp_path):
    """gpu_stop's sweep of the user's other Python processes: SIGTERM, then SIGKILL once the
    grace has passed on the daemon's clock; the loop goes on meanwhile (it waited in real time,
    up to 10 s, with no heartbeat)."""
    facts = facts_of(tmp_path, SWEEP, job="sweep", scope="user-python",
                     pidfile="{root}/stray.pid")
    assert facts["longest_tick"] < 2.0, facts
    assert facts["alive_at_4"] is True, facts  # it ignores SIGTERM: alive within the grace
    assert 5.0 <= facts["gone_after"] < 8.0, facts
    assert facts["sweeps_left"] == 0, facts


HARD = DAEMON + textwrap.dedent("""\
    inst = root / "hard"
    pidfile = root / "child.pid"
    task = submit(inst, "t.sh", f"setsid bash -c \\"trap '' TERM; echo \\\\$\\\\$ > {{pidfile}}; "
                                "while :; do sleep 0.05; done\\" &\\n"
                                "trap '' TERM; while :; do sleep 0.05; done\\n")
    start = clock.now
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert clock.now - start < 30, "the task did not start"
        daemon.tick()
        clock.sleep(0.1)
        time.sleep(0.01)
    child = int(pidfile.read_text())
    daemon.on_signal("SIGTERM")  # a shutdown: SIGTERM, which both ignore
    daemon.tick()
    daemon.on_signal("SIGINT")  # again: killing the running tasks now
    second = clock.now
    while finished(inst, task) is None and clock.now - second < 30:
        daemon.tick()
        clock.sleep(0.1)
        time.sleep(0.01)
    print(json.dumps({{"ended_after": clock.now - second, "state": finished(inst, task),
                      "child_gone": not os.path.exists(f"/proc/{{child}}")
                      or open(f"/proc/{{child}}/stat").read().rpartition(")")[2].split()[0]
                      == "Z"}}))
    """)


@needs_namespace
def test_a_second_signal_kills_what_a_task_left_without_a_new_grace(tmp_path):
    """A second SIGINT (or SIGTERM) kills the running tasks now: their groups got SIGKILL, but
    what left a task's group (a child that called setsid) got SIGTERM only once the task's main
    process had died, and the whole grace again before its SIGKILL."""
    facts = facts_of(tmp_path, HARD, job="hard", scope="none")
    assert facts["state"] == "failed" and facts["child_gone"], facts
    assert facts["ended_after"] < 3.0, facts  # at most KILL_WAIT_SECONDS, not the 5 s grace

"""Tasks that ask for GPUs, end to end: the real daemon with four declared GPU slots
(``--gpus 4``), each in its own PID namespace."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
from conftest import DAEMON, UNSHARE, command_line, needs_namespace, read_fields, wait_for
from queue_files import command, finished, result, submit

import perpetual_motion as pm

pytestmark = needs_namespace


def started(inst: Path, task_id: str) -> bool:
    return (inst / "records" / f"{task_id}.run").exists()


def gated(gate: Path, out: Path) -> str:
    """A task that records what it was given, then waits for ``gate``."""
    return textwrap.dedent(f"""\
        echo "$TASK_SHORT_NAME|$CUDA_VISIBLE_DEVICES|$PM_GPUS|$TASK_GPUS|$CUDA_DEVICE_ORDER" \\
            >> '{out}'
        while [ ! -e '{gate}' ]; do sleep 0.05; done
        """)


def lines(out: Path) -> dict[str, list[str]]:
    if not out.exists():
        return {}
    return {line.split("|")[0]: line.split("|")[1:] for line in out.read_text().splitlines()}


def test_four_one_gpu_tasks_run_at_once_on_four_devices(queue_root, start_daemon, tmp_path):
    inst = queue_root / "four"
    gate, out = tmp_path / "gate", tmp_path / "out"
    ids = [submit(inst, f"t{i}.sh", gated(gate, out), gpus=1) for i in range(4)]
    daemon = start_daemon(queue_root, "four", "--gpus", "4", keepalive=True)
    wait_for(lambda: len(lines(out)) == 4, 15, what="four tasks at once")
    given = lines(out)
    assert sorted(v[0] for v in given.values()) == ["0", "1", "2", "3"]
    assert all(v[0] == v[1] == v[2] and v[3] == "PCI_BUS_ID" for v in given.values())
    # the tasks run before the daemon's next state write shows them
    wait_for(lambda: read_fields(inst / "nodes" / "node-0.state").get("running_count") == "4",
             10, what="the state file to show the four tasks")
    state = read_fields(inst / "nodes" / "node-0.state")
    assert state["gpu_count"] == "4"
    assert state["keepalive"].startswith("off: declared slots")
    assert {state[f"gpu.{i}.task"] for i in range(4)} == set(ids)
    gate.write_text("")
    for task_id in ids:
        wait_for(lambda t=task_id: finished(inst, t), 15, what=task_id)
        assert result(inst, task_id)["state"] == "done"
    assert daemon.stop() == 0


def test_pairs_share_the_node_a_whole_node_task_runs_alone_and_three_waits_for_two(
        queue_root, start_daemon, tmp_path):
    inst = queue_root / "mix"
    out = tmp_path / "out"
    gates = {name: tmp_path / f"gate-{name}" for name in ("whole", "pair", "one", "three")}
    whole = submit(inst, "whole.sh", gated(gates["whole"], out), priority=100)  # no -g
    pairs = [submit(inst, f"pair{i}.sh", gated(gates["pair"], out), gpus=2, priority=200)
             for i in range(2)]
    start_daemon(queue_root, "mix", "--gpus", "4")
    wait_for(lambda: "whole.sh" in lines(out), 15, what="the whole-node task")
    assert lines(out)["whole.sh"][0] == "0,1,2,3"
    assert not any(started(inst, p) for p in pairs)  # it runs alone
    gates["whole"].write_text("")
    wait_for(lambda: all(f"pair{i}.sh" in lines(out) for i in range(2)), 15, what="two pairs")
    assert sorted(lines(out)[f"pair{i}.sh"][0] for i in range(2)) == ["0,1", "2,3"]
    gates["pair"].write_text("")
    ones = [submit(inst, f"one{i}.sh", gated(gates["one"], out), gpus=1, priority=300)
            for i in range(2)]
    wait_for(lambda: all(started(inst, o) for o in ones), 15, what="two one-GPU tasks")
    three = submit(inst, "three.sh", gated(gates["three"], out), gpus=3, priority=400)
    wait_for(lambda: read_fields(inst / "nodes" / "node-0.state").get("waiting.reason")
             == "waiting for 3 GPUs, 2 free", 15, what="the waiting reason")
    assert not started(inst, three)
    gates["one"].write_text("")
    wait_for(lambda: "three.sh" in lines(out), 15, what="the three-GPU task")
    assert len(lines(out)["three.sh"][0].split(",")) == 3
    gates["three"].write_text("")
    wait_for(lambda: finished(inst, three), 15, what="three")
    assert all(result(inst, t)["state"] == "done" for t in [whole, *pairs, *ones, three])


PYTHON_TASK = textwrap.dedent("""\
    {python} -c 'import time; open("{out}/" + __import__("os").environ["TASK_SHORT_NAME"], "w")
    time.sleep(120)'
    """)


def test_stopping_one_of_four_leaves_the_other_three_and_their_python_alive(
        queue_root, start_daemon, tmp_path):
    inst = queue_root / "sweep"
    out = tmp_path / "pids"
    out.mkdir()
    body = PYTHON_TASK.format(python=sys.executable, out=out)
    # the third one also leaves a Python process without its marker behind, as a training
    # launcher's worker that escaped the task can
    stray = (f"env -i setsid {sys.executable} -c 'import time; time.sleep(120)' stray-marker "
             "</dev/null >/dev/null 2>&1 &\n")
    ids = [submit(inst, f"p{i}.sh", (stray if i == 2 else "") + body, gpus=1) for i in range(4)]
    # the seed's sweep of the user's Python processes, as on a cluster node
    daemon = start_daemon(queue_root, "sweep", "--gpus", "4", "--kill-scope", "user-python")
    wait_for(lambda: len(os.listdir(out)) == 4, 20, what="four Python tasks")
    root = psutil.Process(daemon.proc.pid)

    def task_pythons() -> dict[str, int]:
        found = {}
        for proc in root.children(recursive=True):
            try:
                env = proc.environ()
                if "python" in proc.name() and "PERPETUAL_MOTION_TASK" in env:
                    found[env["TASK_NAME"]] = proc.pid
            except psutil.Error:
                continue
        return found

    def strays() -> list[int]:
        return [p.pid for p in root.children(recursive=True)
                if "stray-marker" in " ".join(command_line(p))]

    before = wait_for(lambda: len(task_pythons()) == 4 and task_pythons(), 10,
                      what="the tasks' Python processes")
    wait_for(strays, 10, what="the stray Python process")
    name = command(inst, "stop", ids[2])
    wait_for(lambda: finished(inst, ids[2]), 20, what="the stopped task")
    wait_for(lambda: (inst / "replies" / f"{name}.reply").exists(), 10, what="the reply")
    wait_for(lambda: not strays(), 20, what="the sweep to end the stray Python process")
    after = task_pythons()
    assert set(after) == {ids[0], ids[1], ids[3]}
    assert all(after[t] == before[t] for t in after)
    assert all(not started(inst, t) or not finished(inst, t) for t in (ids[0], ids[1], ids[3]))
    assert result(inst, ids[2])["state"] == "stopped"


def test_a_restart_after_kill_9_with_four_running_interrupts_them_and_keeps_the_queue(
        queue_root, start_daemon, tmp_path):
    inst = queue_root / "crash"
    gate, out = tmp_path / "gate", tmp_path / "out"
    running = [submit(inst, f"r{i}.sh", gated(gate, out), gpus=1, priority=100)
               for i in range(4)]
    waiting = [submit(inst, f"w{i}.sh", "true\n", gpus=1, priority=900) for i in range(3)]
    daemon = start_daemon(queue_root, "crash", "--gpus", "4")
    wait_for(lambda: all(started(inst, t) for t in running), 15, what="four running")
    # Held open, the dead namespace keeps its inode number: the next namespace cannot reuse it
    # and pass for the same one (the new daemon would then check the old PID, not the heartbeat).
    old_namespace = os.open(f"/proc/{daemon.daemon_process().pid}/ns/pid", os.O_RDONLY)
    try:
        daemon.signal(signal.SIGKILL)  # PID 1 of its namespace: its tasks go with it
        killed = time.time()
        daemon.wait_exit()
        assert all((inst / "pending" / t).exists() for t in waiting)
        # its heartbeat is fresh but stands still: the new daemon (another PID namespace, as a
        # container restarted by the platform) watches it as long as a node is taken for dead
        # after, then takes over
        again = start_daemon(queue_root, "crash", "--gpus", "4", wait=False).wait_alive(
            pm.TAKEOVER_WATCH_SECONDS + 25)
    finally:
        os.close(old_namespace)
    assert "takes the node over" in again.output()
    for task_id in running:
        assert wait_for(lambda t=task_id: finished(inst, t), 15, what=task_id) == "failed"
        res = result(inst, task_id)
        assert (res["state"], res["reason"]) == ("interrupted", "daemon died")
        # they ended with their daemon (its last beat), found a minute later
        assert killed - pm.HEARTBEAT_SECONDS - 1.0 <= float(res["ended"]) <= killed + 0.001, res
        assert float(res["found"]) >= killed + pm.TAKEOVER_WATCH_SECONDS, res
    for task_id in waiting:
        assert wait_for(lambda t=task_id: finished(inst, t), 15, what=task_id) == "done"
    assert again.stop() == 0


def test_bad_gpu_declarations_are_refused(queue_root):
    for bad in ("x", "-1", "1,,2", "2,2", "nan", "²"):
        run = subprocess.run([*UNSHARE, sys.executable, str(DAEMON), "--job-id", "bad",
                              "--queue-root", str(queue_root), "--no-keepalive", "--gpus", bad],
                             capture_output=True, text=True, timeout=30)
        assert run.returncode == 2, (bad, run.stderr)
        assert "--gpus" in run.stderr

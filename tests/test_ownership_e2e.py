"""One owner per node, end to end: two real daemons for one node, each in its own PID
namespace (as two containers, or a container and its restart)."""

from __future__ import annotations

import signal
import time

from conftest import needs_namespace, read_fields, wait_for
from queue_files import finished, result, submit

pytestmark = needs_namespace


def test_a_stopped_daemon_taken_for_dead_yields_and_records_nothing_over_the_new_owner(
        queue_root, start_daemon, tmp_path):
    inst = queue_root / "own"
    gate = tmp_path / "gate"
    long = submit(inst, "long.sh", f"while [ ! -e '{gate}' ]; do sleep 0.05; done\n",
                  priority=100)
    first = start_daemon(queue_root, "own")
    wait_for(lambda: (inst / "records" / f"{long}.run").exists(), 10, what="the long task")
    first.signal(signal.SIGSTOP)  # stopped (a hung node); it will be taken for dead
    second = start_daemon(queue_root, "own", "--force")
    assert wait_for(lambda: finished(inst, long), 15, what="recovery") == "failed"
    interrupted = (inst / "records" / f"{long}.result").read_text()
    assert result(inst, long)["state"] == "interrupted"
    quick = [submit(inst, f"q{i}.sh", "true\n", priority=500) for i in range(20)]
    gate.write_text("")  # the first daemon's task would now end with status 0
    first.signal(signal.SIGCONT)
    assert first.wait_exit(15) == 0
    assert "another daemon holds this instance" in first.output()
    for task_id in quick:
        assert wait_for(lambda t=task_id: finished(inst, t), 20, what=task_id) == "done"
    assert (inst / "records" / f"{long}.result").read_text() == interrupted  # not overwritten
    assert not (inst / "done" / long).exists()
    state = read_fields(inst / "nodes" / "node-0.state")
    assert state["started"] == read_fields(inst / "nodes" / "node-0.state")["started"]
    assert second.alive()


def test_two_daemons_on_a_busy_queue_run_every_task_once(queue_root, start_daemon, tmp_path):
    inst = queue_root / "busy"
    out = tmp_path / "runs"
    out.mkdir()
    ids = [submit(inst, f"t{i}.sh", f"echo $$ >> '{out}'/\"$TASK_NAME\"; sleep 0.05\n")
           for i in range(60)]
    first = start_daemon(queue_root, "busy")
    time.sleep(0.5)  # the queue is moving: the first daemon writes its state all the time
    second = start_daemon(queue_root, "busy", "--force")  # a rival beside a live daemon
    assert first.wait_exit(15) == 0  # it yields within a poll or two, though busy
    assert "another daemon holds this instance" in first.output()
    for task_id in ids:
        wait_for(lambda t=task_id: finished(inst, t), 30, what=task_id)
    runs = {t: (out / t).read_text().split() if (out / t).exists() else [] for t in ids}
    assert all(len(v) <= 1 for v in runs.values()), runs  # nothing ran twice
    states = {t: result(inst, t)["state"] for t in ids}
    assert set(states.values()) <= {"done", "interrupted"}
    assert all((states[t] == "done") == (len(runs[t]) == 1) or states[t] == "interrupted"
               for t in ids)
    assert second.alive()

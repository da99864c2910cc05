"""The client against a daemon of protocol 2: what needs the daemon to honour the new submit keys
(``gpus``, ``nodes``, ``after``, ``argc``/``arg.<i>``) and to publish ``running.<k>.*``,
``waiting.*`` and ``gpu.<i>.task``, end to end, in PID namespaces.

These tests are skipped until ``perpetual_motion.PROTOCOL_VERSION`` is 2 or more; the client's
side of each is tested against state files written by hand in test_client_status.py and
test_client_cli.py.
"""

from __future__ import annotations

import json
import re
import shlex
import sys

import pytest
from client_helpers import (
    CLIENT,
    ID_RE,
    INSTALLED,
    STRICT,
    make_shell,
    submitted_id,
    wait_finished,
)
from conftest import DAEMON, namespace_shell, needs_namespace, read_fields, wait_for

import perpetual_motion

DAEMON_V2 = getattr(perpetual_motion, "PROTOCOL_VERSION", 1) >= 2
pytestmark = [pytest.mark.skipif(not DAEMON_V2, reason="needs a daemon of protocol 2 (the "
                                                       "GPU, gang and dependency scheduler)"),
              needs_namespace]


def running_ids(inst) -> list[str]:
    return sorted(p.name for p in (inst / "running").iterdir())


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


def test_a_v2_daemon_is_known_alive_and_dead_by_its_process_name(tmp_path):
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

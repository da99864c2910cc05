"""An instance of two nodes: two real daemons (ranks 0 and 1) on one queue, each in its own PID
namespace, as two containers of a cluster job. Tasks on either node, and tasks across both."""

from __future__ import annotations

import os
import signal
import socket
import textwrap
import time
from pathlib import Path

from conftest import needs_namespace, read_fields, wait_for
from queue_files import command, finished, result, submit

import perpetual_motion as pm

pytestmark = needs_namespace


def two_nodes(start_daemon, queue_root: Path, job: str, gpus: str = "2", *extra: str):
    nodes = [start_daemon(queue_root, job, "--gpus", gpus, "--num-nodes", "2", *extra,
                          node_rank=rank, wait=False) for rank in (0, 1)]
    return [node.wait_alive() for node in nodes]


ENV_TASK = textwrap.dedent("""\
    echo "$NODE_RANK $NNODES $MASTER_ADDR $MASTER_PORT $PM_NODE_RANK $CUDA_VISIBLE_DEVICES" \\
        > "{out}/rank$NODE_RANK"
    while [ ! -e '{gate}' ]; do sleep 0.05; done
    """)


def test_a_task_across_two_nodes_gets_the_rendezvous_on_both_ranks(queue_root, start_daemon,
                                                                  tmp_path):
    inst = queue_root / "gang"
    out, gate = tmp_path / "out", tmp_path / "gate"
    out.mkdir()
    nodes = two_nodes(start_daemon, queue_root, "gang")
    task = submit(inst, "ddp.sh", ENV_TASK.format(out=out, gate=gate), gpus=1, nodes=2)
    wait_for(lambda: len(os.listdir(out)) == 2, 20, what="both ranks to start")
    ranks = [(out / f"rank{r}").read_text().split() for r in (0, 1)]
    assert [r[0] for r in ranks] == ["0", "1"] and {r[1] for r in ranks} == {"2"}
    assert ranks[0][2] == ranks[1][2] == socket.gethostname()  # rank 0's node's address
    assert ranks[0][3] == ranks[1][3] and 0 < int(ranks[0][3]) < 65536  # one port
    assert [r[4] for r in ranks] == ["0", "1"]  # one rank on each node
    assert [r[5] for r in ranks] == ["0", "0"]  # the request (one GPU) on each node
    plan = read_fields(inst / "records" / f"{task}.gang")
    assert (plan["nnodes"], plan["nodes"]) == ("2", "0,1")
    for rank in (0, 1):  # the ranks run before their daemons' next state writes show them
        path = inst / "nodes" / f"node-{rank}.state"
        wait_for(lambda p=path: read_fields(p).get("running.0.id") == task, 10,
                 what=f"node {rank}'s state to show its rank")
        state = read_fields(path)
        assert state["running.0.rank"] == str(rank)
    gate.write_text("")
    assert wait_for(lambda: finished(inst, task), 20, what="the task") == "done"
    res = result(inst, task)
    assert (res["state"], res["nodes"], res["rank.0.state"], res["rank.1.state"]) == \
        ("done", "0,1", "done", "done")
    for rank in (0, 1):
        log = (inst / "logs" / f"{task}.rank{rank}.log").read_text()
        assert f"rank: {rank} of 2" in log and "exited with status 0" in log
    assert all(node.stop() == 0 for node in nodes)


def test_a_failing_rank_stops_the_other_and_fails_the_task(queue_root, start_daemon, tmp_path):
    inst = queue_root / "bad"
    out, gate = tmp_path / "out", tmp_path / "gate"
    out.mkdir()
    two_nodes(start_daemon, queue_root, "bad")
    body = ENV_TASK.format(out=out, gate=gate)
    body = body.replace("while", 'if [ "$NODE_RANK" = 1 ]; then sleep 0.5; exit 3; fi\nwhile')
    task = submit(inst, "ddp.sh", body, gpus=2, nodes="all")  # rank 0 would wait for ever
    assert wait_for(lambda: finished(inst, task), 30, what="the task to fail") == "failed"
    res = result(inst, task)
    assert res["state"] == "failed" and res["reason"].startswith("rank 1: exit status 3")
    assert (res["rank.1.exit_code"], res["exit_code"]) == ("3", "3")
    assert read_fields(inst / "records" / f"{task}.stop")["reason"].startswith("rank 1 failed")


def test_a_gang_rank_whose_node_dies_fails_the_task_and_loses_nothing(queue_root, start_daemon,
                                                                      tmp_path):
    inst = queue_root / "dies"
    out, gate = tmp_path / "out", tmp_path / "gate"
    out.mkdir()
    nodes = two_nodes(start_daemon, queue_root, "dies")
    task = submit(inst, "ddp.sh", ENV_TASK.format(out=out, gate=gate), gpus=1, nodes=2,
                  priority=100)
    later = [submit(inst, f"later{i}.sh", "true\n", gpus=1, priority=900) for i in range(3)]
    wait_for(lambda: len(os.listdir(out)) == 2, 20, what="both ranks to start")
    nodes[1].signal(signal.SIGKILL)  # node 1's daemon (and its namespace) dies
    killed = time.time()
    nodes[1].wait_exit()
    t0 = time.monotonic()
    assert wait_for(lambda: finished(inst, task), 90, what="the task to fail") == "failed"
    assert time.monotonic() - t0 < 60 + 15  # the stale-heartbeat time, and a poll or two
    res = result(inst, task)
    assert (res["rank.1.state"], res["rank.1.reason"]) == ("interrupted", "node 1's daemon died")
    assert res["rank.0.state"] == "stopped"
    assert (res["state"], res["reason"]) == ("interrupted", "rank 1: node 1's daemon died")
    rank_1 = read_fields(inst / "records" / f"{task}.rank1.result")  # ended at its last beat
    assert killed - pm.HEARTBEAT_SECONDS - 1.0 <= float(rank_1["ended"]) <= killed + 0.001, rank_1
    assert float(rank_1["found"]) >= killed + pm.HEARTBEAT_STALE_SECONDS - pm.HEARTBEAT_SECONDS
    for task_id in later:  # the queue goes on, on node 0
        assert wait_for(lambda t=task_id: finished(inst, t), 20, what=task_id) == "done"


def test_two_hundred_one_gpu_tasks_on_two_nodes_each_run_exactly_once(queue_root, start_daemon,
                                                                      tmp_path):
    inst = queue_root / "many"
    out = tmp_path / "out"
    out.mkdir()
    ids = [submit(inst, f"t{i}.sh", f'echo "$PM_NODE_RANK" >> \'{out}\'/"$TASK_NAME"\n',
                  gpus=1) for i in range(200)]
    two_nodes(start_daemon, queue_root, "many", "4")
    for task_id in ids:
        assert wait_for(lambda t=task_id: finished(inst, t), 60, what=task_id) == "done"
    runs = {task_id: (out / task_id).read_text().split() for task_id in ids}
    assert all(len(nodes) == 1 for nodes in runs.values())  # exactly once
    per_node = {n: sum(1 for v in runs.values() if v == [n]) for n in ("0", "1")}
    assert per_node["0"] > 0 and per_node["1"] > 0, per_node
    assert len(list((inst / "records").glob("*.run"))) == 200


def test_a_stop_reaches_a_task_on_the_other_node(queue_root, start_daemon, tmp_path):
    inst = queue_root / "remote"
    gate = tmp_path / "gate"
    nodes = two_nodes(start_daemon, queue_root, "remote", "1")
    first = submit(inst, "a.sh", f"while [ ! -e '{gate}' ]; do sleep 0.05; done\n", gpus=1)
    second = submit(inst, "b.sh", f"while [ ! -e '{gate}' ]; do sleep 0.05; done\n", gpus=1)
    wait_for(lambda: all((inst / "records" / f"{t}.run").exists() for t in (first, second)), 20,
             what="both tasks, one on each node")
    on_node = {read_fields(inst / "records" / f"{t}.run")["node_rank"]: t for t in (first, second)}
    assert set(on_node) == {"0", "1"}
    name = command(inst, "stop", on_node["1"])
    assert wait_for(lambda: finished(inst, on_node["1"]), 20, what="the remote stop") == "failed"
    reply = read_fields(inst / "replies" / f"{name}.reply")
    assert reply["result"] == "stopped" and "node 1" in reply["message"]
    assert result(inst, on_node["1"])["state"] == "stopped"
    assert not finished(inst, on_node["0"])
    gate.write_text("")
    assert all(node.stop() == 0 for node in nodes)

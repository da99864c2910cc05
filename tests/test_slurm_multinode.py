"""A job of two nodes on a real two-node Slurm (.ci/start-slurm.sh both): `submit.sh --backend
slurm exp 0 2`, then a task across both nodes that runs a real torch.distributed all-reduce over
gloo with torchrun, single-node tasks spread over both nodes, and gpu_shutdown."""

from __future__ import annotations

import os
import sys
import textwrap
import time

from conftest import wait_for
from queue_files import finished, result, submit
from slurm_cluster import namespace_python, read_fields
from test_submit import TEST_DAEMON_ARGS, base_env

ALL_REDUCE = textwrap.dedent("""\
    import os

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    n = dist.get_world_size()
    print(f"rank {dist.get_rank()} of {n} node {os.environ['NODE_RANK']}: sum {value.item():g}")
    assert value.item() == n * (n + 1) / 2, value
    dist.destroy_process_group()
    """)


def test_a_torchrun_all_reduce_across_two_slurm_nodes_and_tasks_on_both(tmp_path,
                                                                         two_node_slurm):
    root = tmp_path / "queue root"
    root.mkdir()
    env = base_env(tmp_path, QUEUE_ROOT=str(root), DAEMON_ARGS=TEST_DAEMON_ARGS,
                   AUTO_SHUTDOWN_HOURS="0.5", PYTHON=str(namespace_python(tmp_path)))
    launch = two_node_slurm.launch(env, f"dist-{os.getpid()}", "0", "2")
    states = launch.wait_daemons()
    assert [s["node_rank"] for s in states] == ["0", "1"]
    inst = launch.instance

    script = tmp_path / "all_reduce.py"
    script.write_text(ALL_REDUCE)
    # the line of the README: torchrun needs nothing but the variables every rank gets
    gang = submit(inst, "ddp.sh", textwrap.dedent(f"""\
        exec {sys.executable} -m torch.distributed.run --nnodes "$NNODES" \\
            --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" \\
            --master_port "$MASTER_PORT" --nproc_per_node 1 '{script}'
        """), nodes=2, cwd=str(tmp_path))
    assert wait_for(lambda: finished(inst, gang), 120, what="the all-reduce") == "done", \
        [(inst / "logs" / f"{gang}.rank{r}.log").read_text() for r in (0, 1)]
    res = result(inst, gang)
    assert (res["state"], res["nodes"]) == ("done", "0,1")
    for rank in (0, 1):
        log = (inst / "logs" / f"{gang}.rank{rank}.log").read_text()
        assert f"rank {rank} of 2 node {rank}: sum 3\n" in log, log
        run = read_fields(inst / "records" / f"{gang}.rank{rank}.run")
        assert run["node_rank"] == str(rank)

    # single-node tasks go to whichever node has room: each node runs one at a time here
    tasks = [submit(inst, f"t{i}.sh", "sleep 1\n") for i in range(4)]
    for task_id in tasks:
        assert wait_for(lambda t=task_id: finished(inst, t), 60, what=task_id) == "done"
    nodes = {read_fields(inst / "records" / f"{t}.run")["node_rank"] for t in tasks}
    assert nodes == {"0", "1"}

    t0 = time.monotonic()
    assert launch.shutdown() == "COMPLETED"
    assert time.monotonic() - t0 < 60
    assert [launch.state(rank)["status"] for rank in (0, 1)] == ["stopped", "stopped"]

"""Tasks that ask for GPUs, share a node, wait for each other: the daemon in simulated time on
declared GPU slots, with real task processes."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from conftest import FakeClock, run_until
from queue_files import command, finished, submit

import perpetual_motion as pm


def make_daemon(root: Path, clock: FakeClock, gpus: int = 4, job_id: str = "sched",
                **overrides) -> pm.Daemon:
    settings = dict(job_id=job_id, queue_root=root, poll_interval=0.1, hours=1.0,
                    keepalive=False, kill_scope="none", stop_grace=0.5)
    settings.update(overrides)
    return pm.Daemon(pm.Config(**settings), clock=clock, sleep=clock.sleep,
                     inventory=pm.Inventory.declare(range(gpus)))


@pytest.fixture
def node(tmp_path):
    clock = FakeClock()
    daemon = make_daemon(tmp_path, clock)
    assert daemon.start() is None
    yield daemon, clock, tmp_path / "sched"
    for task in list(daemon.runner.tasks.values()):
        if task.proc is not None and task.proc.poll() is None:
            pm.signal_group(task.proc.pid, 9)
            task.proc.wait()


def fields(path: Path) -> dict[str, str]:
    return pm.parse_fields(path.read_text())


def state(inst: Path) -> dict[str, str]:
    return fields(inst / "nodes" / "node-0.state")


def result(inst: Path, task_id: str) -> dict[str, str]:
    return fields(inst / "records" / f"{task_id}.result")


def gate_script(gate: Path, out: Path) -> str:
    """A task that records its GPUs, then waits until ``gate`` exists."""
    return (f'echo "$TASK_SHORT_NAME $CUDA_VISIBLE_DEVICES $PM_GPUS $TASK_GPUS" >> \'{out}\'\n'
            f"while [ ! -e '{gate}' ]; do sleep 0.02; done\n")


def running_ids(daemon) -> set[str]:
    return {t.task_id for t in daemon.runner.tasks.values() if t.proc is not None}


def test_one_gpu_tasks_run_side_by_side_on_distinct_gpus(node, tmp_path):
    daemon, clock, inst = node
    gate, out = tmp_path / "gate", tmp_path / "out"
    ids = [submit(inst, f"t{i}.sh", gate_script(gate, out), gpus=1) for i in range(5)]
    run_until(daemon, clock, lambda: len(running_ids(daemon)) == 4)
    run_until(daemon, clock, lambda: out.exists() and len(out.read_text().splitlines()) == 4)
    seen = {line.split()[0]: line.split()[1:] for line in out.read_text().splitlines()}
    assert sorted(seen) == ["t0.sh", "t1.sh", "t2.sh", "t3.sh"]
    assert sorted(v[0] for v in seen.values()) == ["0", "1", "2", "3"]
    assert all(len(set(v)) == 1 for v in seen.values())  # the three variables agree
    daemon.write_state()
    st = state(inst)
    assert st["running_count"] == "4" and st["gpus_free"] == "0"
    assert {st[f"gpu.{i}.task"] for i in range(4)} == set(ids[:4])
    assert (st["waiting.id"], st["waiting.reason"]) == (ids[4], "waiting for 1 GPU, 0 free")
    assert (inst / "pending" / ids[4]).exists()
    gate.write_text("")
    run_until(daemon, clock, lambda: all((inst / "done" / i).exists() for i in ids))
    assert [result(inst, i)["gpus"] for i in ids[:4]] == ["0", "1", "2", "3"]


def test_a_three_gpu_task_waits_while_two_gpus_are_busy_then_starts(node, tmp_path):
    daemon, clock, inst = node
    gate, out = tmp_path / "gate", tmp_path / "out"
    busy = [submit(inst, f"busy{i}.sh", gate_script(gate, out), gpus=1, priority=1)
            for i in range(2)]
    run_until(daemon, clock, lambda: len(running_ids(daemon)) == 2)
    three = submit(inst, "three.sh", gate_script(tmp_path / "never", out), gpus=3)
    for _ in range(5):
        daemon.tick()
    daemon.write_state()
    assert (state(inst)["waiting.id"], state(inst)["waiting.reason"]) == \
        (three, "waiting for 3 GPUs, 2 free")
    assert (inst / "pending" / three).exists()
    gate.write_text("")
    run_until(daemon, clock, lambda: three in running_ids(daemon))
    # one busy task's end is enough; the other may not have been seen to end yet
    still = [b for b in busy if not (inst / "done" / b).exists()]
    assert len(still) <= 1
    held = {g for b in still for g in daemon.runner.tasks[(b, None)].gpu_text.split(",")}
    given = daemon.runner.tasks[(three, None)].gpu_text.split(",")
    assert len(given) == 3 and not held & set(given)


def test_a_task_without_a_request_runs_alone_and_two_gpu_tasks_share(node, tmp_path):
    daemon, clock, inst = node
    gate, out = tmp_path / "gate", tmp_path / "out"
    whole = submit(inst, "whole.sh", gate_script(gate, out), priority=1)  # no -g: all GPUs
    pair = [submit(inst, f"pair{i}.sh", gate_script(tmp_path / "gate2", out), gpus=2)
            for i in range(2)]
    run_until(daemon, clock, lambda: running_ids(daemon) == {whole})
    for _ in range(5):
        daemon.tick()
    assert running_ids(daemon) == {whole}
    assert daemon.runner.tasks[(whole, None)].gpu_text == "0,1,2,3"
    gate.write_text("")
    run_until(daemon, clock, lambda: running_ids(daemon) == set(pair))
    assert sorted(daemon.runner.tasks[(p, None)].gpu_text for p in pair) == ["0,1", "2,3"]
    (tmp_path / "gate2").write_text("")
    run_until(daemon, clock, lambda: not daemon.runner.tasks)


def test_cpu_tasks_run_beside_gpu_tasks_one_at_a_time(node, tmp_path):
    daemon, clock, inst = node
    gate, out = tmp_path / "gate", tmp_path / "out"
    whole = submit(inst, "whole.sh", gate_script(gate, out))
    cpus = [submit(inst, f"cpu{i}.sh", gate_script(gate, out), gpus=0) for i in range(2)]
    run_until(daemon, clock, lambda: running_ids(daemon) == {whole, cpus[0]})
    for _ in range(5):
        daemon.tick()
    assert running_ids(daemon) == {whole, cpus[0]}  # MAX_CPU_TASKS is 1
    assert daemon.runner.tasks[(cpus[0], None)].gpu_text == ""
    gate.write_text("")
    run_until(daemon, clock, lambda: (inst / "done" / cpus[1]).exists())


def test_a_request_that_can_never_fit_fails_at_once_and_does_not_block(node, tmp_path):
    daemon, clock, inst = node
    nine = submit(inst, "nine.sh", "true\n", gpus=9, priority=1)
    bad = submit(inst, "bad.sh", "true\n", gpus="x", priority=2)
    ok = submit(inst, "ok.sh", "true\n", gpus=1)
    run_until(daemon, clock, lambda: (inst / "done" / ok).exists())
    assert (inst / "failed" / nine).exists() and (inst / "failed" / bad).exists()
    assert result(inst, nine)["reason"] == "it asks for 9 GPUs; nodes here have at most 4"
    assert result(inst, bad)["reason"].startswith("unreadable submit record: gpus='x'")
    assert "not run: it asks for 9 GPUs" in (inst / "logs" / f"{nine}.log").read_text()


def test_after_waits_for_success_and_cancels_on_failure(node, tmp_path):
    daemon, clock, inst = node
    gate, out = tmp_path / "gate", tmp_path / "out"
    train = submit(inst, "train.sh", gate_script(gate, out), gpus=1)
    evaluate = submit(inst, "eval.sh", f"echo eval >> '{out}'\n", gpus=1, after=(train,))
    broken = submit(inst, "broken.sh", "exit 3\n", gpus=1)
    report = submit(inst, "report.sh", f"echo report >> '{out}'\n", gpus=0, after=(broken,))
    ghost = submit(inst, "ghost.sh", "true\n", after=("500-nosuchtask",))
    run_until(daemon, clock, lambda: (inst / "failed" / report).exists())
    assert result(inst, report)["state"] == "cancelled"
    assert result(inst, report)["reason"] == f"dependency {broken} failed"
    assert result(inst, ghost)["reason"] == "dependency 500-nosuchtask not found"
    daemon.write_state()
    assert (state(inst)["waiting.id"], state(inst)["waiting.reason"]) == \
        (evaluate, f"waiting for {train}")
    assert (inst / "pending" / evaluate).exists()  # a free GPU, but it waits for train
    gate.write_text("")
    run_until(daemon, clock, lambda: (inst / "done" / evaluate).exists())
    assert out.read_text().splitlines()[-1] == "eval"


def name_after(inst: Path, task_id: str, *after: str) -> None:
    """Rewrite a task's ``after`` by hand (a cycle cannot be submitted otherwise)."""
    path = inst / "records" / f"{task_id}.submit"
    record = fields(path)
    record["after"] = " ".join(after)
    path.write_text(pm.format_fields(record))


def test_dependency_cycles_are_cancelled_with_the_cycle(node, tmp_path):
    daemon, clock, inst = node
    first = submit(inst, "a.sh", "true\n", after=("placeholder",))
    second = submit(inst, "b.sh", "true\n", after=(first,))
    itself = submit(inst, "self.sh", "true\n", after=("placeholder",))
    behind = submit(inst, "c.sh", "true\n", after=(first,))  # waits for the cycle, not in it
    name_after(inst, first, second)
    name_after(inst, itself, itself)
    run_until(daemon, clock, lambda: all((inst / "failed" / t).exists()
                                         for t in (first, second, itself, behind)))
    cycle = f"dependency cycle: {first} -> {second} -> {first}"
    assert (result(inst, first)["state"], result(inst, first)["reason"]) == ("cancelled", cycle)
    assert result(inst, second)["reason"] == cycle
    assert result(inst, itself)["reason"] == f"dependency cycle: {itself} -> {itself}"
    assert result(inst, behind)["reason"] == f"dependency {first} cancelled"


def test_dependency_cycles_table():
    assert pm.dependency_cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"], "e": []}) == {
        t: "dependency cycle: a -> b -> c -> a" for t in "abc"}
    assert pm.dependency_cycles({"a": ["a", "x"], "b": ["x"]}) == {
        "a": "dependency cycle: a -> a"}
    assert pm.dependency_cycles({"a": ["b"], "b": ["c"]}) == {}


def test_a_dependency_claimed_between_two_listings_is_not_taken_for_missing(node, tmp_path):
    daemon, clock, inst = node
    first = submit(inst, "first.sh", "true\n")
    second = submit(inst, "second.sh", "true\n", after=(first,))
    # another node claims the first task after this node listed running/ and before it lists
    # pending/: neither listing has it, and it has no result yet
    os.rename(inst / "pending" / first, inst / "running" / first)
    daemon.scheduler.run([], may_start=True)
    assert (inst / "pending" / second).exists()
    assert not (inst / "records" / f"{second}.result").exists()
    assert daemon.scheduler.waiting == (second, f"waiting for {first}")


def test_a_pass_reads_the_queue_once_into_its_snapshot(tmp_path):
    inst = tmp_path / "snap"
    folder = pm.QueueFolder(inst)
    folder.create("snap")
    finished, moving = submit(inst, "finished.sh", "true\n"), submit(inst, "moving.sh", "true\n")
    os.rename(inst / "pending" / finished, inst / "done" / finished)
    (inst / "records" / f"{finished}.result").write_text(f"id={finished}\nstate=done\n")
    os.rename(inst / "pending" / moving, inst / "running" / moving)  # not in the listing given
    waits = submit(inst, "waits.sh", "true\n", gpus=1, after=(finished, moving, "500-nosuch"))
    bad = submit(inst, "bad.sh", "true\n", gpus="x")
    gang = submit(inst, "gang.sh", "true\n", nodes=2)
    (inst / "held" / waits).write_text("by=me\n")
    (inst / "priority" / bad).write_text("priority=top\ntime=1\n")
    (inst / "drain.node-1").write_text("by=me\nreason=\ntime=1\n")
    node = pm.PassSnapshot(now=5.0, load=pm.NodeLoad(4), num_nodes=2)
    requests: dict = {"left-pending.sh": pm.Submission()}
    results: dict = {}
    snapshot = folder.read_pass(node, [], requests, results)
    subs = {task.name: task.submission for task in snapshot.pending}
    assert sorted(subs) == sorted([waits, bad, gang])
    assert subs[waits].after == (finished, moving, "500-nosuch")
    assert subs[waits].request == pm.Request(1, 1) and subs[gang].request == pm.Request(None, 2)
    assert subs[bad].startswith("unreadable submit record: gpus='x'")
    assert snapshot.held == {waits} and snapshot.priority == {bad: {"priority": "top",
                                                                    "time": "1"}}
    assert (snapshot.results, snapshot.queued) == ({finished: "done"}, {moving})
    assert snapshot.node_drains == {1: "drained by me"}  # node 0: a task spans nodes
    assert (snapshot.now, snapshot.load, snapshot.num_nodes) == (5.0, pm.NodeLoad(4), 2)
    assert set(requests) == set(subs) and results == {finished: "done"}  # the caches


def test_finished_tasks_that_pending_tasks_wait_for_are_kept(tmp_path):
    inst = tmp_path / "keep"
    needed = submit(inst, "needed.sh", "true\n")
    other = submit(inst, "other.sh", "true\n")
    running = submit(inst, "running.sh", "true\n")
    waiting = submit(inst, "waiting.sh", "true\n", after=(needed, running))
    for folder in ("done", "running"):
        (inst / folder).mkdir(exist_ok=True)
    for task in (needed, other):
        os.rename(inst / "pending" / task, inst / "done" / task)
        (inst / "records" / f"{task}.result").write_text(f"id={task}\nstate=done\n")
        old = time.time() - 40 * 86400
        os.utime(inst / "records" / f"{task}.result", (old, old))
    os.rename(inst / "pending" / running, inst / "running" / running)
    removed = pm.QueueFolder(inst).remove_finished(time.time() - 30 * 86400)
    assert removed == [other]
    assert (inst / "done" / needed).exists() and (inst / "records" / f"{needed}.result").exists()
    assert (inst / "pending" / waiting).exists()


def test_script_arguments_reach_the_script(node, tmp_path):
    daemon, clock, inst = node
    out = tmp_path / "out"
    args = ("--lr", "0.1", "two words", "tab\there", "quote'\"", "")
    task = submit(inst, "args.sh", f'printf "[%s]" "$@" > \'{out}\'\n', args=args)
    run_until(daemon, clock, lambda: (inst / "done" / task).exists())
    assert out.read_text() == "".join(f"[{a}]" for a in args)


def test_stopping_one_of_four_leaves_the_others_running(node, tmp_path):
    daemon, clock, inst = node
    gate, out = tmp_path / "gate", tmp_path / "out"
    ids = [submit(inst, f"t{i}.sh", gate_script(gate, out), gpus=1) for i in range(4)]
    run_until(daemon, clock, lambda: len(running_ids(daemon)) == 4)
    name = command(inst, "stop", ids[1])
    run_until(daemon, clock, lambda: (inst / "failed" / ids[1]).exists())
    assert fields(inst / "replies" / f"{name}.reply")["result"] == "stopped"
    assert result(inst, ids[1])["state"] == "stopped"
    assert running_ids(daemon) == {ids[0], ids[2], ids[3]}
    assert all(daemon.runner.tasks[(i, None)].proc.poll() is None for i in ids[::2])
    gate.write_text("")
    run_until(daemon, clock, lambda: all((inst / "done" / i).exists() for i in ids[::2] + ids[3:]))


def test_a_stop_that_comes_after_the_task_exited_records_how_it_ended(node, tmp_path):
    daemon, clock, inst = node
    for attempt in range(5):
        task = submit(inst, f"quick{attempt}.sh", "exit 0\n", gpus=1)
        run_until(daemon, clock, lambda t=task: running_ids(daemon) == {t})
        proc = daemon.runner.tasks[(task, None)].proc
        while proc.poll() is None:  # it has exited, and the daemon has not reaped it yet
            time.sleep(0.01)
        daemon.runner.tasks[(task, None)].proc = proc  # (poll() reaped it: the same object)
        command(inst, "stop", task)
        run_until(daemon, clock, lambda t=task: (inst / "done" / t).exists()
                  or (inst / "failed" / t).exists())
        assert result(inst, task)["state"] == "done", attempt


def test_a_stop_of_a_task_whose_gpus_are_being_freed_ends_it_unstarted(tmp_path):
    clock = FakeClock()

    class SlowRelease(pm.KeepAlive):
        def released(self, gpus) -> bool:
            return False

    config = pm.Config(job_id="sched", queue_root=tmp_path, poll_interval=0.1, keepalive=False,
                       kill_scope="none")
    daemon = pm.Daemon(config, SlowRelease(), clock=clock, sleep=clock.sleep,
                       inventory=pm.Inventory.declare(range(2)))
    daemon.start()
    inst = tmp_path / "sched"
    task = submit(inst, "t.sh", "true\n", gpus=1)
    daemon.tick()
    assert (inst / "running" / task).exists() and not (inst / "logs" / f"{task}.log").exists()
    command(inst, "stop", task)
    run_until(daemon, clock, lambda: (inst / "failed" / task).exists())
    assert result(inst, task)["state"] == "stopped"
    assert "before it started" in result(inst, task)["reason"]


def test_a_deleted_logs_folder_sends_tasks_back_to_pending_not_to_failed(node, tmp_path, caplog):
    daemon, clock, inst = node
    (inst / "logs").rmdir()
    (inst / "logs").write_text("in the way\n")  # so that it cannot simply be created again
    ids = [submit(inst, f"t{i}.sh", "true\n", gpus=1) for i in range(3)]
    with caplog.at_level("WARNING"):
        for _ in range(20):
            daemon.tick()
            clock.sleep(0.1)
    assert os.listdir(inst / "failed") == [] and os.listdir(inst / "done") == []
    assert sorted(os.listdir(inst / "pending")) == sorted(ids)
    assert "cannot prepare tasks" in caplog.text
    assert len([r for r in caplog.records if "cannot prepare" in r.message]) == 1
    (inst / "logs").unlink()
    run_until(daemon, clock, lambda: all((inst / "done" / i).exists() for i in ids), limit=120)


def test_missing_queue_folders_are_created_again(node, tmp_path):
    daemon, clock, inst = node
    for folder in ("running", "done", "records"):
        (inst / folder).rmdir()
    task = submit(inst, "t.sh", "true\n", gpus=1)
    run_until(daemon, clock, lambda: (inst / "done" / task).exists())
    assert result(inst, task)["state"] == "done"


def test_cancelling_never_overwrites_an_earlier_task(node, tmp_path):
    daemon, clock, inst = node
    gate = tmp_path / "gate"
    blocker = submit(inst, "block.sh", f"while [ ! -e '{gate}' ]; do sleep 0.02; done\n")
    run_until(daemon, clock, lambda: running_ids(daemon) == {blocker})
    ids = []
    for text in ("first\n", "second\n"):
        (inst / "pending" / "train.sh").write_text(text)  # a hand-dropped task, twice
        name = command(inst, "stop", "train.sh")
        daemon.tick()
        assert fields(inst / "replies" / f"{name}.reply")["result"] == "cancelled"
        [new] = set(os.listdir(inst / "failed")) - set(ids)
        ids.append(new)
    assert [(inst / "failed" / i).read_text() for i in ids] == ["first\n", "second\n"]
    assert all(result(inst, i)["state"] == "cancelled" for i in ids)
    # a finished task renamed back into pending/ and cancelled keeps its first result
    gate.write_text("")
    run_until(daemon, clock, lambda: (inst / "done" / blocker).exists())
    os.rename(inst / "done" / blocker, inst / "pending" / blocker)
    (tmp_path / "gate").unlink()
    daemon.runner.tasks.clear()
    name = command(inst, "stop", blocker)
    daemon.tick()
    assert fields(inst / "replies" / f"{name}.reply")["result"] == "cancelled"
    assert result(inst, blocker)["state"] == "done"


def test_finished_tasks_older_than_keep_finished_days_are_removed(node, tmp_path):
    daemon, clock, inst = node
    old, new = (submit(inst, f"{n}.sh", "true\n", gpus=1) for n in ("old", "new"))
    run_until(daemon, clock, lambda: all((inst / "done" / t).exists() for t in (old, new)))
    gate = tmp_path / "gate"
    running = submit(inst, "running.sh", f"while [ ! -e '{gate}' ]; do sleep 0.02; done\n")
    waiting = submit(inst, "waiting.sh", "true\n", after=(running,))
    run_until(daemon, clock, lambda: running in running_ids(daemon))
    long_ago = time.time() - 31 * 86400  # its result was published 31 days ago
    os.utime(inst / "records" / f"{old}.result", (long_ago, long_ago))
    clock.sleep(pm.HEARTBEAT_SECONDS)
    daemon.housekeeping()
    assert (inst / "done" / old).exists()  # once a day: it ran at the start
    daemon.last_cleaning -= 86400
    daemon.housekeeping()
    assert not (inst / "done" / old).exists() and (inst / "done" / new).exists()
    assert not list((inst / "records").glob(f"{old}.*"))
    assert not (inst / "logs" / f"{old}.log").exists()
    assert (inst / "pending" / waiting).exists() and (inst / "running" / running).exists()
    gate.write_text("")
    run_until(daemon, clock, lambda: (inst / "done" / waiting).exists())


def test_node_0_finishes_the_tasks_of_a_node_whose_daemon_died(tmp_path):
    clock = FakeClock()
    daemon = make_daemon(tmp_path, clock, num_nodes=2)
    daemon.start()
    inst = tmp_path / "sched"
    task = pm.task_id_for("lost.sh")
    (inst / "running" / task).write_text("true\n")
    (inst / "records" / f"{task}.run").write_text(
        f"node_rank=1\nhost=elsewhere\ndaemon=123.000\nstarted={clock.now - 100:.3f}\n")
    node1 = (f"status=running\nnode_rank=1\nhost=elsewhere\npid=7\nstarted=123.000\n"
             f"heartbeat={clock.now:.3f}\n")
    (inst / "nodes" / "node-1.state").write_text(node1)
    for _ in range(3):
        daemon.tick()
        clock.sleep(pm.HEARTBEAT_SECONDS)
    assert (inst / "running" / task).exists()  # its node lives
    clock.sleep(pm.HEARTBEAT_STALE_SECONDS)
    run_until(daemon, clock, lambda: (inst / "failed" / task).exists())
    assert (result(inst, task)["state"], result(inst, task)["reason"]) == \
        ("interrupted", "node 1's daemon died")


def test_a_claim_whose_claimer_died_before_starting_it_goes_back_to_pending(node):
    daemon, clock, inst = node
    task = pm.task_id_for("orphan.sh")
    (inst / "running" / task).write_text("true\n")  # claimed, never started, no record
    daemon.tick()
    assert (inst / "running" / task).exists()
    clock.sleep(pm._UNSTARTED_CLAIM_SECONDS + pm.HEARTBEAT_SECONDS)
    run_until(daemon, clock, lambda: (inst / "done" / task).exists(), limit=120)


def test_a_daemon_displaced_by_a_takeover_leaves_the_end_of_its_task_to_the_new_owner(
        node, tmp_path):
    """The new owner has written its state file and ends the old daemon's task (SIGTERM)
    before it records it interrupted; the old daemon sees its task end first."""
    daemon, clock, inst = node
    task = submit(inst, "t.sh", "while :; do sleep 0.05; done\n", gpus=1)
    run_until(daemon, clock, lambda: running_ids(daemon) == {task})
    successor = make_daemon(tmp_path, clock, force=True)
    successor.write_state(force=True)
    proc = daemon.runner.tasks[(task, None)].proc
    pm.signal_group(proc.pid, 15)
    proc.wait(5)
    daemon.tick()
    assert not (inst / "records" / f"{task}.result").exists()
    assert (inst / "running" / task).exists()
    assert successor.start() is None
    run_until(successor, clock, lambda: finished(inst, task))
    assert (result(inst, task)["state"], result(inst, task)["reason"]) == \
        ("interrupted", "daemon died")


def test_a_task_finished_by_another_daemon_is_not_recorded_twice(node, tmp_path):
    """This daemon was stopped and taken for dead; the new owner failed its task as
    interrupted. When this one goes on, it must not publish done over that."""
    daemon, clock, inst = node
    gate = tmp_path / "gate"
    task = submit(inst, "t.sh", f"while [ ! -e '{gate}' ]; do sleep 0.02; done\n", gpus=1)
    run_until(daemon, clock, lambda: running_ids(daemon) == {task})
    interrupted = "id=x\nstate=interrupted\nreason=daemon died\n"
    (inst / "records" / f"{task}.result").write_text(interrupted)
    os.rename(inst / "running" / task, inst / "failed" / task)
    proc = daemon.runner.tasks[(task, None)].proc
    daemon.tick()
    assert not daemon.runner.tasks and proc.wait(5) != 0  # its processes here are ended
    run_until(daemon, clock, lambda: not daemon.runner.unfinished)
    assert (inst / "records" / f"{task}.result").read_text() == interrupted
    assert not (inst / "done" / task).exists()


@pytest.mark.parametrize("env,scope", [
    ({}, "task"), ({"SLURM_JOB_ID": "42"}, "user-python"),
    ({"ECP_JOB_NAME": "pt-x"}, "user-python"), ({"PM_CLUSTER_JOB": "sco"}, "user-python"),
])
def test_the_default_kill_scope_depends_on_where_the_daemon_runs(env, scope):
    assert pm.resolve_kill_scope("auto", env) == scope
    assert pm.resolve_kill_scope("none", env) == "none"


def test_a_task_past_its_time_limit_is_stopped_as_timeout(node, tmp_path):
    daemon, clock, inst = node
    gate, out = tmp_path / "gate", tmp_path / "out"
    slow = submit(inst, "slow.sh", gate_script(gate, out), gpus=1, time_limit=1830)
    quick = submit(inst, "quick.sh", "true\n", gpus=1, time_limit=1830)
    run_until(daemon, clock, lambda: slow in running_ids(daemon)
              and (inst / "done" / quick).exists())
    [task] = [t for t in daemon.runner.tasks.values() if t.task_id == slow]
    clock.sleep(task.started + 1829 - clock.now)
    for _ in range(5):
        daemon.tick()
    assert slow in running_ids(daemon)  # a second short of its limit
    clock.sleep(1)
    run_until(daemon, clock, lambda: (inst / "failed" / slow).exists())
    assert (result(inst, slow)["state"], result(inst, slow)["reason"]) == (
        "timeout", "time limit of 30m30s reached")
    assert "time limit of 30m30s reached" in (inst / "logs" / f"{slow}.log").read_text()
    bad = submit(inst, "bad.sh", "true\n", gpus=1, time_limit="0")
    run_until(daemon, clock, lambda: (inst / "failed" / bad).exists())
    assert "time_limit='0' is not a number of seconds" in result(inst, bad)["reason"]


def test_the_callback_runs_once_for_each_task_that_ends_with_its_end_in_its_environment(
        tmp_path, caplog):
    clock, out = FakeClock(), tmp_path / "callbacks"
    hook = (f'printf "%s|%s|%s|%s|%s|%s\\n" "$PM_TASK_NAME" "$PM_TASK_STATE" '
            f'"$PM_TASK_EXIT_CODE" "$PM_TASK_REASON" "$PM_TASK_LOG" "$PM_JOB_ID" >> "{out}"; '
            f'case $PM_TASK_NAME in bad.sh) exit 4 ;; esac')
    daemon = make_daemon(tmp_path, clock, callback=hook)
    assert daemon.start() is None
    inst = tmp_path / "sched"
    ok = submit(inst, "ok.sh", "true\n", gpus=1)
    bad = submit(inst, "bad.sh", "exit 3\n", gpus=1)
    run_until(daemon, clock, lambda: out.exists() and len(out.read_text().splitlines()) == 2)
    submit(inst, "gone.sh", "true\n", gpus=1, after=(bad,))  # cancelled: bad failed
    run_until(daemon, clock, lambda: len(out.read_text().splitlines()) == 3)
    lines = sorted(out.read_text().splitlines())
    assert lines == sorted([
        f"ok.sh|done|0|exit status 0|{inst}/logs/{ok}.log|sched",
        f"bad.sh|failed|3|exit status 3|{inst}/logs/{bad}.log|sched",
        f"gone.sh|cancelled||dependency {bad} failed||sched"])  # no log: it never ran
    run_until(daemon, clock, lambda: not daemon.callbacks.running)
    assert f"The callback for {bad} failed (exit status 4)" in caplog.text

    daemon.callbacks.command = "sleep 600"  # the same daemon, with a slow callback now
    slow = submit(inst, "slow.sh", "true\n", gpus=1)
    run_until(daemon, clock, lambda: daemon.callbacks.running)
    [(proc, _, task_id)] = daemon.callbacks.running
    assert task_id == slow and proc.poll() is None
    clock.sleep(pm.CALLBACK_TIMEOUT_SECONDS)
    daemon.tick()
    assert proc.poll() is not None and not daemon.callbacks.running
    assert f"The callback for {slow} ran past 60 s: killed" in caplog.text


def test_a_task_gets_the_variables_of_its_record_but_never_those_the_daemon_sets(node, tmp_path):
    daemon, clock, inst = node
    out = tmp_path / "env"
    task = submit(inst, "env.sh", f"env > '{out}'\n", gpus=1, envc=2,
                  **{"env.0": "HF_HOME=/data/hf cache", "env.1": "NOTE=a=b"})
    run_until(daemon, clock, lambda: (inst / "done" / task).exists())
    env = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
    assert (env["HF_HOME"], env["NOTE"]) == ("/data/hf cache", "a=b")
    assert set(env) >= pm.TASK_VARS  # every variable the daemon sets, which no record may set
    client = (Path(pm.__file__).parent / "client.sh").read_text()  # gpu_submit -e refuses them
    assert set(re.search(r'daemon_sets="([^"]*)"', client)[1].replace("\\\n", " ").split()) \
        == pm.RESERVED_VARS
    bad = submit(inst, "bad.sh", "true\n", gpus=1, envc=1, **{"env.0": "CUDA_VISIBLE_DEVICES=7"})
    run_until(daemon, clock, lambda: (inst / "failed" / bad).exists())
    assert "env.0 is not NAME=VALUE of a variable a task may set" in result(inst, bad)["reason"]


def test_a_copy_of_a_running_task_put_into_pending_runs_under_a_new_id(node, tmp_path):
    """A task runs at most once under its id. A copy of ``running/<id>`` dropped into
    ``pending/<id>`` (a hand-made "run it again") is a new task under a fresh id; the first
    run goes on, keeps its GPU, and is recorded when it ends."""
    daemon, clock, inst = node
    out = tmp_path / "runs"
    first = submit(inst, "long.sh", f"echo run >> '{out}'; sleep 1\n", gpus=1)
    run_until(daemon, clock, lambda: (first, None) in daemon.runner.tasks)
    gpus = daemon.runner.tasks[(first, None)].gpus
    (inst / ".staging" / "copy").write_bytes((inst / "running" / first).read_bytes())
    os.rename(inst / ".staging" / "copy", inst / "pending" / first)
    run_until(daemon, clock, lambda: len(daemon.runner.tasks) == 2)
    [second] = [key[0] for key in daemon.runner.tasks if key[0] != first]
    assert second.endswith("-long.sh") and daemon.runner.tasks[(first, None)].gpus == gpus
    assert not set(daemon.runner.tasks[(second, None)].gpus) & set(gpus)
    run_until(daemon, clock, lambda: not daemon.runner.tasks)
    assert sorted(os.listdir(inst / "done")) == sorted([first, second])
    assert out.read_text() == "run\nrun\n"
    for task in (first, second):
        assert fields(inst / "records" / f"{task}.result")["state"] == "done"


# Drain: running tasks go on, nothing new starts ##################################################


def test_a_drained_queue_lets_running_tasks_end_and_starts_nothing_until_resumed(node, tmp_path):
    daemon, clock, inst = node
    gate, out = tmp_path / "gate", tmp_path / "out"
    first = submit(inst, "first.sh", gate_script(gate, out), gpus=1, priority=1)
    run_until(daemon, clock, lambda: first in running_ids(daemon))
    (inst / "drain").write_text("by=me@login-1\nreason=driver update\ntime=1\n")
    later = [submit(inst, f"later{i}.sh", "true\n", gpus=1) for i in range(2)]
    for _ in range(10):
        daemon.tick()
    assert running_ids(daemon) == {first}  # three GPUs free, and nothing starts
    assert all((inst / "pending" / t).exists() for t in later)
    daemon.write_state()
    assert (state(inst)["waiting.id"], state(inst)["waiting.reason"]) == (
        later[0], "the queue is drained by me@login-1: driver update (gpu_resume)")
    gate.write_text("")
    run_until(daemon, clock, lambda: (inst / "done" / first).exists())  # the running one ends
    for _ in range(10):
        daemon.tick()
    assert all((inst / "pending" / t).exists() for t in later)
    assert not daemon.finished  # a drain is no shutdown: the daemon stays, keep-alive too
    (inst / "drain").unlink()
    run_until(daemon, clock, lambda: all((inst / "done" / t).exists() for t in later))


def test_a_drained_node_starts_nothing_while_the_others_go_on(tmp_path):
    clock = FakeClock()
    nodes = [make_daemon(tmp_path, clock, num_nodes=2, node_rank=rank) for rank in (0, 1)]
    for daemon in nodes:
        assert daemon.start() is None
    inst = tmp_path / "sched"
    (inst / "drain.node-0").write_text("by=me@login-1\nreason=bad GPU 3\ntime=1\n")
    one = submit(inst, "one.sh", "true\n", gpus=1)
    for _ in range(5):
        nodes[0].tick()
        clock.sleep(0.1)
    assert (inst / "pending" / one).exists()
    nodes[0].write_state()
    assert (state(inst)["waiting.id"], state(inst)["waiting.reason"]) == (
        one, "node 0 is drained by me@login-1: bad GPU 3 (gpu_resume --node 0)")
    run_until(nodes[1], clock, lambda: (inst / "done" / one).exists())
    assert fields(inst / "records" / f"{one}.run")["node_rank"] == "1"

    (inst / "drain.node-0").unlink()
    (inst / "drain.node-1").write_text("by=me@login-1\nreason=\ntime=1\n")
    gang = submit(inst, "gang.sh", "true\n", nodes=2, gpus=1)
    for _ in range(5):
        for daemon in nodes:
            daemon.tick()
            daemon.write_state()
        clock.sleep(0.1)
    assert (inst / "pending" / gang).exists()  # node 0 places no rank on a drained node
    assert (state(inst)["waiting.id"], state(inst)["waiting.reason"]) == (
        gang, "waiting for 2 nodes, 1 alive and 1 drained")
    (inst / "drain.node-1").unlink()
    for _ in range(5):
        for daemon in nodes:
            daemon.tick()
        clock.sleep(0.1)
    assert not (inst / "pending" / gang).exists()
    assert fields(inst / "records" / f"{gang}.gang")["nodes"] == "0,1"
    for daemon in nodes:
        for task in list(daemon.runner.tasks.values()):
            if task.proc is not None and task.proc.poll() is None:
                pm.signal_group(task.proc.pid, 9)
                task.proc.wait()


def test_an_unreadable_drain_file_still_drains(node, tmp_path):
    daemon, clock, inst = node
    (inst / "drain").mkdir()  # not a regular file: read as a drain all the same
    task = submit(inst, "t.sh", "true\n", gpus=1)
    for _ in range(10):
        daemon.tick()
    assert (inst / "pending" / task).exists()
    (inst / "drain").rmdir()
    run_until(daemon, clock, lambda: (inst / "done" / task).exists())


def test_a_waiting_queue_is_planned_again_only_when_something_changed(node, tmp_path,
                                                                      monkeypatch):
    """A queue that only waits is not planned at every poll; but each plan the scheduler
    acts on is the one plan_pass gives for that moment: when a task reaches the backfill
    limit with nothing else changed, and when the queue changes."""
    daemon, clock, inst = node
    gate = tmp_path / "gate"
    plan_pass, planned = pm.plan_pass, []
    monkeypatch.setattr(pm, "plan_pass", lambda snap: planned.append(snap) or plan_pass(snap))
    plan, stale = daemon.scheduler.plan, []

    def checked(snapshot):  # (the daemon's tick would catch an assertion here)
        got = plan(snapshot)
        if got != plan_pass(snapshot):
            stale.append(snapshot.now)
        return got

    monkeypatch.setattr(daemon.scheduler, "plan", checked)
    ids = [submit(inst, f"t{i}.sh", gate_script(gate, tmp_path / "out"), gpus=1)
           for i in range(4)]
    run_until(daemon, clock, lambda: len(running_ids(daemon)) == 4)
    whole = submit(inst, "whole.sh", "true\n", gpus=4)
    after = submit(inst, "after.sh", "true\n", gpus=1)
    run_until(daemon, clock, lambda: daemon.scheduler.waiting is not None
              and daemon.scheduler.waiting[0] == whole)
    planned.clear()
    for _ in range(50):
        daemon.tick()
        clock.sleep(0.1)
    assert len(planned) <= 2  # (the second pass takes in the times the first gave)
    reasons = daemon.scheduler.last_plan[1].reasons
    assert reasons[after] == "waiting for 1 GPU, 0 free"
    clock.sleep(pm.BACKFILL_LIMIT_SECONDS)
    daemon.tick()
    reasons = daemon.scheduler.last_plan[1].reasons
    assert reasons[after].startswith(f"the node keeps its GPUs for {whole}")
    late = submit(inst, "late.sh", "true\n", gpus=0)
    run_until(daemon, clock, lambda: finished(inst, late))
    gate.write_text("")
    run_until(daemon, clock, lambda: all(finished(inst, t) for t in [*ids, whole, after]))
    assert stale == []

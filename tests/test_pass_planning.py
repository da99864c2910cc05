"""One pass of the queue, planned: ``plan_pass`` as tables of cases. Each row is a snapshot of
the queue and the node (simulated time, no files, no processes) and what the pass does with it:
the tasks it starts and on which GPUs, those node 0 fails or cancels, those it places across
nodes, and why each of the others waits."""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import os
import time

import pytest

import perpetual_motion as pm

NOW = 1_800_000_000.0
ALL = None  # a request for every GPU of the node


def client_id(n: int, label: str, priority: int = 500) -> str:
    """A client id submitted n-th (the time in it orders tasks of one priority)."""
    return f"{priority:03d}-20270101_000000_{n:09d}-{n:08x}-{label}.sh"


ID = {label: client_id(n, label) for n, label in enumerate("abcdefg")}
ID["urgent"] = client_id(7, "urgent", priority=100)  # submitted last, of a higher priority
ID["gone"] = client_id(8, "gone")  # named by a dependant, found nowhere
LABEL = {task_id: label for label, task_id in ID.items()}


def t(label: str, gpus: int | None = ALL, nodes: int | None = 1, after: str = "",
      unreadable: str = "") -> pm.PendingTask:
    """A pending task: its GPUs and nodes per rank, the labels it comes after."""
    sub = unreadable or pm.Submission(request=pm.Request(gpus, nodes),
                                      after=tuple(ID[dep] for dep in after.split()))
    return pm.PendingTask(ID[label], sub)


def view(rank: int, gpus: int, free: int, alive: bool = True,
         status: str = "running") -> pm.NodeView:
    return pm.NodeView(rank, alive, True, f"token-{rank}", f"host-{rank}", gpus, free, status)


def snap(*tasks: pm.PendingTask, gpus: int = 4, taken=(), cpu: int = 0, held=(),
         priority=None, results=None, queued=(), rank: int = 0, nodes: int = 1, views=(),
         drained: str | None = None, node_drains=None, blocked=None,
         backoff_until: float = -1e18, may_start: bool = True) -> pm.PassSnapshot:
    """A snapshot at NOW, by labels: ``taken`` GPUs of this node are held by one GPU task."""
    load = pm.NodeLoad(gpus, frozenset(taken), cpu, 1 if taken else 0)
    return pm.PassSnapshot(
        now=NOW, load=load, pending=tasks, held=frozenset(ID[x] for x in held),
        priority={ID[x]: fields for x, fields in (priority or {}).items()},
        results={ID[x]: state for x, state in (results or {}).items()},
        queued=frozenset(ID[x] for x in queued), node_rank=rank, num_nodes=nodes,
        views={v.rank: v for v in views}, drained=drained, node_drains=node_drains or {},
        blocked_since={ID[x]: since for x, since in (blocked or {}).items()},
        backoff_until=backoff_until, may_start=may_start)


def labelled(text: str) -> str:
    for task_id, label in LABEL.items():
        text = text.replace(task_id, label)
    return text


def outcome(plan: pm.PassPlan) -> dict[str, object]:
    """The plan by labels: what starts where, fails, is cancelled, is placed, and waits."""
    return {
        "starts": {LABEL[name]: gpus for name, gpus in plan.starts},
        "fails": {LABEL[name]: why for name, why in plan.fails},
        "cancels": {LABEL[name]: labelled(why) for name, why in plan.cancels},
        "gangs": {LABEL[name]: nodes for name, nodes in plan.gangs},
        "waiting": plan.waiting and (LABEL[plan.waiting[0]], labelled(plan.waiting[1])),
        "reasons": {LABEL[name]: labelled(why) for name, why in plan.reasons.items()},
    }


def row(case: str, snapshot: pm.PassSnapshot, **expected: object):
    """A case: the snapshot, and the parts of the outcome that are not empty."""
    full = {"starts": {}, "fails": {}, "cancels": {}, "gangs": {}, "waiting": None,
            "reasons": {}}
    full.update(expected)
    return pytest.param(snapshot, full, id=case)


ONE_FREE = "waiting for 1 GPU, 0 free"
TWO_NODES = (view(0, 4, 4), view(1, 4, 4))

ORDER = [
    row("first in, first out among tasks of one priority",
        snap(t("a", 1), t("b", 1), t("c", 1), gpus=2),
        starts={"a": (0,), "b": (1,)}, waiting=("c", ONE_FREE), reasons={"c": ONE_FREE}),
    row("a higher priority starts first, though submitted last",
        snap(t("a", 1), t("urgent", 1), gpus=1),
        starts={"urgent": (0,)}, waiting=("a", ONE_FREE), reasons={"a": ONE_FREE}),
    row("a task put on top starts before a higher priority",
        snap(t("a", 1), t("b", 1), t("urgent", 1), gpus=1,
             priority={"b": {"priority": "top", "time": "5"}}),
        starts={"b": (0,)}, waiting=("urgent", ONE_FREE),
        reasons={"urgent": ONE_FREE, "a": ONE_FREE}),
    row("a priority set lower lets a later task go first",
        snap(t("a", 1), t("b", 1), gpus=1, priority={"a": {"priority": "900"}}),
        starts={"b": (0,)}, waiting=("a", ONE_FREE), reasons={"a": ONE_FREE}),
]

GPUS = [
    row("one-GPU tasks get the lowest free GPUs",
        snap(t("a", 1), t("b", 2), gpus=4, taken={0, 2}),
        starts={"a": (1,)}, waiting=("b", "waiting for 2 GPUs, 1 free"),
        reasons={"b": "waiting for 2 GPUs, 1 free"}),
    row("a larger task waits while a smaller one backfills",
        snap(t("a", 3), t("b", 1), gpus=4, taken={0, 1}),
        starts={"b": (2,)}, waiting=("a", "waiting for 3 GPUs, 2 free"),
        reasons={"a": "waiting for 3 GPUs, 2 free"}),
    row("a task without a request waits for the whole node",
        snap(t("a", ALL), t("b", 2), gpus=4, taken={3}),
        starts={"b": (0, 1)}, waiting=("a", "waiting for all 4 GPUs, 3 free"),
        reasons={"a": "waiting for all 4 GPUs, 3 free"}),
    row("a task without a request takes every GPU of an idle node",
        snap(t("a", ALL), t("b", 1), gpus=2),
        starts={"a": (0, 1)}, waiting=("b", ONE_FREE), reasons={"b": ONE_FREE}),
    row("more GPUs than any node has: node 0 fails it at once, and it blocks nothing",
        snap(t("a", 9), t("b", 1), gpus=4),
        starts={"b": (0,)}, fails={"a": "it asks for 9 GPUs; nodes here have at most 4"}),
    row("more GPUs than this node has, fewer than another: left for that node",
        snap(t("a", 8), t("b", 1), gpus=4, nodes=2, views=(view(0, 4, 4), view(1, 8, 8))),
        starts={"b": (0,)},
        reasons={"a": "it asks for 8 GPUs, this node has 4: for a node with more"}),
    row("this node counts the GPUs it has, not those its state file showed",
        snap(t("a", 8), rank=1, nodes=2, views=(view(0, 4, 4), view(1, 8, 8))),
        reasons={"a": "it asks for 8 GPUs; nodes here have at most 4 (node 0 fails it)"}),
    row("a GPU on a node without one: it fails with how to declare slots",
        snap(t("a", 1), gpus=0),
        fails={"a": "it asks for 1 GPU; no node here has a GPU (a daemon without NVML can "
                    "declare slots: --gpus N)"}),
    row("an unreadable submit record fails the task",
        snap(t("a", unreadable="unreadable submit record: gpus='x' is neither 'all' nor a "
                               "whole number from 0"), t("b", 1)),
        starts={"b": (0,)}, fails={"a": "unreadable submit record: gpus='x' is neither 'all' "
                                        "nor a whole number from 0"}),
]

CPU = [
    row("CPU tasks run beside a full node, one at a time",
        snap(t("a", 0), t("b", 0), t("c", 1), gpus=2, taken={0, 1}),
        starts={"a": ()}, waiting=("b", "waiting for a CPU slot (1 of 1 in use)"),
        reasons={"b": "waiting for a CPU slot (1 of 1 in use)", "c": ONE_FREE}),
    row("a CPU task waits for the CPU slot, not for GPUs",
        snap(t("a", 0), t("b", 1), gpus=2, cpu=1),
        starts={"b": (0,)}, waiting=("a", "waiting for a CPU slot (1 of 1 in use)"),
        reasons={"a": "waiting for a CPU slot (1 of 1 in use)"}),
]

DEPENDENCIES = [
    row("a dependency that finished done lets it start",
        snap(t("b", 1, after="a"), results={"a": "done"}), starts={"b": (0,)}),
    row("a dependency that has not finished: it waits, GPUs free or not",
        snap(t("b", 1, after="a"), queued={"a"}),
        waiting=("b", "waiting for a"), reasons={"b": "waiting for a"}),
    row("a dependency still pending: it waits",
        snap(t("a", 1), t("b", 1, after="a")),
        starts={"a": (0,)}, waiting=("b", "waiting for a"), reasons={"b": "waiting for a"}),
    row("a failed dependency cancels it",
        snap(t("b", 1, after="a"), results={"a": "failed"}),
        cancels={"b": "dependency a failed"}),
    row("a cancelled dependency cancels it",
        snap(t("b", 1, after="a"), results={"a": "cancelled"}),
        cancels={"b": "dependency a cancelled"}),
    row("an interrupted dependency cancels it",
        snap(t("b", 1, after="a"), results={"a": "interrupted"}),
        cancels={"b": "dependency a interrupted"}),
    row("a dependency found nowhere cancels it",
        snap(t("b", 1, after="gone")), cancels={"b": "dependency gone not found"}),
    row("the first dependency that is not done says why",
        snap(t("c", 1, after="a gone b"), results={"a": "done", "b": "failed"}),
        cancels={"c": "dependency gone not found"}),
    row("a cycle is cancelled with the cycle, and a task behind it as its dependency was",
        snap(t("a", after="b"), t("b", after="a"), t("c", after="a")),
        cancels={"a": "dependency cycle: a -> b -> a", "b": "dependency cycle: a -> b -> a",
                 "c": "dependency a cancelled"}),
    row("a task that comes after itself",
        snap(t("a", after="a"), t("b", 1)),
        starts={"b": (0,)}, cancels={"a": "dependency cycle: a -> a"}),
    row("a task failed in this pass cancels its dependants after it in this pass",
        snap(t("a", 9), t("b", 1, after="a")),
        fails={"a": "it asks for 9 GPUs; nodes here have at most 4"},
        cancels={"b": "dependency a failed"}),
    row("a dependant before it in the run order waits for the next pass",
        snap(t("a", 9), t("urgent", 1, after="a")),
        fails={"a": "it asks for 9 GPUs; nodes here have at most 4"},
        waiting=("urgent", "waiting for a"), reasons={"urgent": "waiting for a"}),
    row("the first task that waits is named, a dependency's wait or a GPU wait",
        snap(t("a", 2), t("b", 1, after="gone"), gpus=2, taken={0}, queued={"gone"}),
        waiting=("a", "waiting for 2 GPUs, 1 free"),
        reasons={"a": "waiting for 2 GPUs, 1 free", "b": "waiting for gone"}),
    row("on another node, what node 0 ends is only passed over",
        snap(t("a", 9), t("b", 1, after="gone"), t("c", 1, after="d"), t("d", after="c"),
             rank=1, nodes=2, views=TWO_NODES),
        reasons={"a": "it asks for 9 GPUs; nodes here have at most 4 (node 0 fails it)",
                 "b": "dependency gone not found (node 0 cancels it)",
                 "c": "dependency cycle: c -> d -> c (node 0 cancels it)",
                 "d": "dependency cycle: c -> d -> c (node 0 cancels it)"}),
]

HELD = [
    row("a held task waits, its dependants with it; the others start",
        snap(t("a", 1), t("b", 1, after="a"), t("c", 1), held={"a"}),
        starts={"c": (0,)}, waiting=("b", "waiting for a"),
        reasons={"a": "held (gpu_release lets it start)", "b": "waiting for a"}),
    row("a held task is not failed, even when it can never run",
        snap(t("a", 9), held={"a"}), reasons={"a": "held (gpu_release lets it start)"}),
]

DRAINS = [
    row("a drained queue starts nothing; node 0 still fails what can never run",
        snap(t("a", 1), t("b", 9), drained="drained by me@login: driver update"),
        fails={"b": "it asks for 9 GPUs; nodes here have at most 4"},
        waiting=("a", "the queue is drained by me@login: driver update (gpu_resume)"),
        reasons={"a": "the queue is drained by me@login: driver update (gpu_resume)"}),
    row("a drained node starts nothing itself",
        snap(t("a", 1), t("b", 1, after="gone"), queued={"gone"},
             node_drains={0: "drained by me@login"}),
        waiting=("a", "node 0 is drained by me@login (gpu_resume --node 0)"),
        reasons={"a": "node 0 is drained by me@login (gpu_resume --node 0)",
                 "b": "waiting for gone"}),
    row("another node's drain does not stop this one",
        snap(t("a", 1), rank=1, nodes=2, views=TWO_NODES, node_drains={0: "drained"}),
        starts={"a": (0,)}),
]

GANGS = [
    row("node 0 places a task that spans nodes",
        snap(t("a", 1, nodes=2), nodes=2, views=TWO_NODES), gangs={"a": (0, 1)}),
    row("nodes=all spans every node",
        snap(t("a", 1, nodes=None), nodes=2, views=TWO_NODES), gangs={"a": (0, 1)}),
    row("the nodes with the most free GPUs are taken",
        snap(t("a", 2, nodes=2), nodes=3, views=(view(0, 4, 1), view(1, 4, 4), view(2, 4, 3))),
        gangs={"a": (1, 2)}),
    row("only nodes with enough GPUs are taken",
        snap(t("a", 8, nodes=2), nodes=3, views=(view(0, 4, 4), view(1, 8, 8), view(2, 8, 8))),
        gangs={"a": (1, 2)}),
    row("a dead node is no place for a rank",
        snap(t("a", 1, nodes=2), nodes=2, views=(view(0, 4, 4), view(1, 4, 4, alive=False))),
        waiting=("a", "waiting for 2 nodes, 1 alive"),
        reasons={"a": "waiting for 2 nodes, 1 alive"}),
    row("a node that stops is no place for a rank",
        snap(t("a", 1, nodes=2), nodes=2, views=(view(0, 4, 4), view(1, 4, 4, status="stopping"))),
        waiting=("a", "waiting for 2 nodes, 1 alive"),
        reasons={"a": "waiting for 2 nodes, 1 alive"}),
    row("a drained node is no place for a rank",
        snap(t("a", 1, nodes=2), nodes=2, views=TWO_NODES, node_drains={1: "drained"}),
        waiting=("a", "waiting for 2 nodes, 1 alive and 1 drained"),
        reasons={"a": "waiting for 2 nodes, 1 alive and 1 drained"}),
    row("more nodes than the instance has: it fails",
        snap(t("a", 1, nodes=3), nodes=2, views=TWO_NODES),
        fails={"a": "it asks for 3 nodes; the instance has 2"}),
    row("on a drained queue nothing is placed",
        snap(t("a", 1, nodes=2), nodes=2, views=TWO_NODES, drained="drained"),
        waiting=("a", "the queue is drained (gpu_resume)"),
        reasons={"a": "the queue is drained (gpu_resume)"}),
    row("only node 0 places",
        snap(t("a", 1, nodes=2), t("b", 1), rank=1, nodes=2, views=TWO_NODES),
        starts={"b": (0,)}, reasons={"a": "it spans nodes: node 0 places it"}),
    row("a task that waits for a dependency holds no task across nodes up",
        snap(t("a", 1, after="gone"), t("b", 1, nodes=2), queued={"gone"},
             nodes=2, views=TWO_NODES),
        gangs={"b": (0, 1)}, waiting=("a", "waiting for gone"),
        reasons={"a": "waiting for gone"}),
    row("a task across nodes is not placed while one before it waits for nodes",
        snap(t("a", 1, nodes=3), t("b", 1, nodes=2), t("c", 1), nodes=3,
             views=TWO_NODES),
        starts={"c": (0,)}, waiting=("a", "waiting for 3 nodes, 2 alive"),
        reasons={"a": "waiting for 3 nodes, 2 alive", "b": "not placed while a waits before it"}),
    row("tasks on one node go on beside a task across nodes that waits",
        snap(t("a", 1, nodes=2), t("b", 1), nodes=2, views=(view(0, 4, 4),)),
        starts={"b": (0,)}, waiting=("a", "waiting for 2 nodes, 1 alive"),
        reasons={"a": "waiting for 2 nodes, 1 alive"}),
]

TIME = [
    row("a node that backs off claims nothing until then",
        snap(t("a", 1), t("b", 2), gpus=2, backoff_until=NOW + 5),
        waiting=("b", "waiting for 2 GPUs, 1 free"),
        reasons={"a": "this node could not prepare a task: it claims nothing for 5 s",
                 "b": "waiting for 2 GPUs, 1 free"}),
    row("the back-off over, it claims again",
        snap(t("a", 1), gpus=2, backoff_until=NOW), starts={"a": (0,)}),
    row("a task waiting for GPUs past the backfill limit keeps the GPUs; CPU work goes on",
        snap(t("a", 3), t("b", 1), t("c", 0), gpus=4, taken={0, 1},
             blocked={"a": NOW - pm.BACKFILL_LIMIT_SECONDS}),
        starts={"c": ()}, waiting=("a", "waiting for 3 GPUs, 2 free"),
        reasons={"a": "waiting for 3 GPUs, 2 free",
                 "b": "the node keeps its GPUs for a, which has waited 600 s"}),
    row("a second short of the backfill limit, later tasks still backfill",
        snap(t("a", 3), t("b", 1), t("c", 0), gpus=4, taken={0, 1},
             blocked={"a": NOW - pm.BACKFILL_LIMIT_SECONDS + 1}),
        starts={"b": (2,), "c": ()}, waiting=("a", "waiting for 3 GPUs, 2 free"),
        reasons={"a": "waiting for 3 GPUs, 2 free"}),
    row("a daemon that shuts down starts, fails and cancels nothing",
        snap(t("a", 1), t("b", 9), t("c", after="gone"), may_start=False),
        reasons={x: "nothing new starts on this node: its daemon is shutting down"
                 for x in "abc"}),
]


@pytest.mark.parametrize("snapshot,expected", ORDER + GPUS + CPU + DEPENDENCIES + HELD + DRAINS
                         + GANGS + TIME)
def test_a_pass(snapshot, expected):
    assert outcome(pm.plan_pass(snapshot)) == expected


def test_the_time_a_task_has_waited_for_gpus_is_kept_across_passes():
    node = dict(gpus=4, taken={0, 1})
    first = pm.plan_pass(snap(t("a", 3), t("b", 4), t("c", 1), **node))
    assert first.blocked_since == {ID["a"]: NOW, ID["b"]: NOW}
    later = pm.plan_pass(dataclasses.replace(
        snap(t("a", 3), t("c", 1), **node), now=NOW + 30, blocked_since=first.blocked_since))
    assert later.blocked_since == {ID["a"]: NOW}  # b left pending/, a keeps its time
    stopping = pm.plan_pass(dataclasses.replace(
        snap(t("a", 3), may_start=False, **node), blocked_since=first.blocked_since))
    assert stopping.blocked_since == first.blocked_since


def test_the_plan_keeps_the_run_order_and_what_may_be_placed_again_after_a_lost_claim():
    plan = pm.plan_pass(snap(t("a", 1), t("b", 1), t("c", 1), t("urgent", 1), gpus=2,
                             blocked={"c": NOW - 10}))
    assert [LABEL[n] for n in plan.order] == ["urgent", "a", "b", "c"]
    assert [(LABEL[c.task_id], c.gpus, c.blocked_since) for c in plan.candidates] == [
        ("urgent", 1, None), ("a", 1, None), ("b", 1, None), ("c", 1, NOW - 10)]


@contextlib.contextmanager
def no_clock_no_files(monkeypatch):
    """Every clock and file call the planner could make raises while it runs."""
    def refuse(*args, **kwargs):
        raise AssertionError("plan_pass read a clock, a file or a process")

    with monkeypatch.context() as patch:
        for module, names in ((time, ("time", "monotonic", "sleep")),
                              (os, ("stat", "lstat", "open", "rename", "unlink", "scandir",
                                    "listdir", "kill", "getpid")),
                              (builtins, ("open",))):
            for name in names:
                patch.setattr(module, name, refuse)
        yield


def test_the_planner_reads_no_clock_and_no_file(monkeypatch):
    snapshot = snap(t("a", 1), t("b", 9), t("c", after="gone"), t("d", 1, nodes=2),
                    t("e", 1, after="a"), t("f", after="f"), held={"a"}, nodes=2,
                    views=TWO_NODES, blocked={"e": NOW - 700})
    expected = outcome(pm.plan_pass(snapshot))
    with no_clock_no_files(monkeypatch):
        plan = pm.plan_pass(snapshot)
    assert outcome(plan) == expected and plan.gangs == ((ID["d"], (0, 1)),)

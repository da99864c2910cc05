"""Placement, the pure core: which task starts on a node, with which GPUs, as tables of cases."""

from __future__ import annotations

import pytest

import perpetual_motion as pm

ALL = None  # a request for every GPU of the node


def load(total=8, taken=(), cpu=0, gpu_tasks=None, slots=1):
    if gpu_tasks is None:
        gpu_tasks = 1 if taken else 0
    return pm.NodeLoad(total, frozenset(taken), cpu, gpu_tasks, slots)


@pytest.mark.parametrize("node,gpus,given", [
    (load(), 1, (0,)),
    (load(), 3, (0, 1, 2)),
    (load(taken={0, 2}), 2, (1, 3)),  # the lowest free ones
    (load(taken={0, 1, 2, 3, 4, 5, 6}), 2, None),
    (load(), 9, None),  # more than the node has
    (load(), ALL, tuple(range(8))),
    (load(taken={3}), ALL, None),  # a GPU task runs: "all" waits
    (load(total=0), ALL, ()),  # a node without GPUs still runs "all" tasks, one at a time
    (load(total=0, gpu_tasks=1), ALL, None),
    (load(total=0), 1, None),
    (load(cpu=0), 0, ()),  # CPU tasks hold no GPU ...
    (load(cpu=1), 0, None),  # ... at most MAX_CPU_TASKS of them
    (load(taken=range(8), cpu=0), 0, ()),  # and run beside GPU tasks
    (load(cpu=1, slots=2), 0, ()),
])
def test_what_fits_a_node(node, gpus, given):
    assert node.fit(gpus) == given


def test_wait_reasons_say_what_is_missing():
    assert load(taken={0, 1}).wait_reason(8) == "waiting for 8 GPUs, 6 free"
    assert load(total=4, taken={0, 1}).wait_reason(ALL) == "waiting for all 4 GPUs, 2 free"
    assert load(total=4, taken={0, 1}).wait_reason(1) == "waiting for 1 GPU, 2 free"
    assert load(cpu=1).wait_reason(0) == "waiting for a CPU slot (1 of 1 in use)"
    assert "takes it whole" in load(total=0, gpu_tasks=1).wait_reason(ALL)


def cands(*specs, blocked=None):
    blocked = blocked or {}
    return [pm.Candidate(name, gpus, blocked.get(name)) for name, gpus in specs]


def test_four_one_gpu_tasks_share_a_four_gpu_node_on_distinct_gpus():
    plan = pm.plan_starts(cands(("a", 1), ("b", 1), ("c", 1), ("d", 1), ("e", 1)),
                          load(total=4), now=0)
    assert plan.starts == (("a", (0,)), ("b", (1,)), ("c", (2,)), ("d", (3,)))
    assert plan.waiting == ("e", "waiting for 1 GPU, 0 free")


def test_a_task_without_request_runs_alone_and_waits_for_the_whole_node():
    plan = pm.plan_starts(cands(("all", ALL), ("one", 1)), load(total=4), now=0)
    assert plan.starts == (("all", (0, 1, 2, 3)),)
    plan = pm.plan_starts(cands(("all", ALL), ("one", 1)), load(total=4, taken={2}), now=0)
    assert plan.waiting == ("all", "waiting for all 4 GPUs, 3 free")
    assert plan.starts == (("one", (0,)),)  # backfilled meanwhile


def test_cpu_tasks_run_beside_gpu_tasks_and_do_not_wait_for_them():
    plan = pm.plan_starts(cands(("big", 4), ("cpu", 0), ("cpu2", 0)), load(total=4, taken={0}),
                          now=0)
    assert plan.starts == (("cpu", ()),)
    assert plan.waiting == ("big", "waiting for 4 GPUs, 3 free")


def test_backfill_stops_once_the_first_waiting_task_waited_past_the_limit():
    node = load(total=4, taken={0, 1})
    specs = (("three", 3), ("one", 1), ("cpu", 0))
    early = pm.plan_starts(cands(*specs, blocked={"three": 0.0}), node, now=10.0,
                           backfill_limit=600)
    assert [s[0] for s in early.starts] == ["one", "cpu"] and early.held_for is None
    late = pm.plan_starts(cands(*specs, blocked={"three": 0.0}), node, now=600.0,
                          backfill_limit=600)
    assert [s[0] for s in late.starts] == ["cpu"]  # GPUs drain for "three"; CPU work goes on
    assert late.held_for == "three" and late.blocked == ("three",)
    freed = pm.plan_starts(cands(*specs, blocked={"three": 0.0}), load(total=4), now=900.0,
                           backfill_limit=600)
    assert freed.starts[0] == ("three", (0, 1, 2))


def test_order_is_kept_among_tasks_that_fit():
    plan = pm.plan_starts(cands(("x", 2), ("y", 2), ("z", 1)), load(total=4), now=0)
    assert plan.starts == (("x", (0, 1)), ("y", (2, 3)))


@pytest.mark.parametrize("gpus,nodes,counts,num,why", [
    ("9", "", [8, 8], 2, "it asks for 9 GPUs; nodes here have at most 8"),
    ("8", "", [8], 1, ""),
    ("", "3", [8, 8], 2, "it asks for 3 nodes; the instance has 2"),
    ("1", "2", [8, 8], 2, ""),
    ("0", "all", [0], 1, ""),
    ("1", "", [0], 1, "it asks for 1 GPU; no node here has a GPU (a daemon without NVML can "
                      "declare slots: --gpus N)"),
])
def test_requests_that_can_never_fit(gpus, nodes, counts, num, why):
    assert pm.never_fits(pm.Request.parse(gpus, nodes), counts, num) == why


@pytest.mark.parametrize("text,value", [("", None), ("all", None), ("0", 0), ("8", 8)])
def test_gpu_requests_parse(text, value):
    assert pm.Request.parse(text).gpus == value


@pytest.mark.parametrize("bad", ["-1", "x", "1.5", "²", "nan", "1e3", " 2 3"])
def test_bad_gpu_requests_are_refused(bad):
    with pytest.raises(ValueError):
        pm.Request.parse(bad)


def test_gang_nodes_prefer_free_gpus_and_number_ranks_by_node():
    free = {0: 2, 1: 8, 2: 8}
    total = {0: 8, 1: 8, 2: 8}
    assert pm.choose_gang_nodes(2, 4, free, total) == (1, 2)
    assert pm.choose_gang_nodes(3, 4, free, total) == (0, 1, 2)
    assert pm.choose_gang_nodes(4, 4, free, total) is None
    assert pm.choose_gang_nodes(2, 16, free, total) is None
    assert pm.choose_gang_nodes(2, None, {0: 0, 1: 0}, {0: 0, 1: 0}) == (0, 1)

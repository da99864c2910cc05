"""Liveness across nodes: two daemons (ranks 0 and 1) on one queue folder in simulated time,
each with its own clock. A node lives while its heartbeat advances on the observer's own
clock; a full disk does not stop the heartbeat; a node that cannot write it ends its own tasks
before the others may take it for dead."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
from conftest import REPO, UNSHARE, FakeClock, needs_namespace
from queue_files import finished, result, submit

import perpetual_motion as pm

LOOP = "while :; do sleep 0.05; done\n"


def node(root: Path, clock: FakeClock, rank: int, host: str, stop_grace: float = 0.5,
         gpus: tuple[int, ...] = (0,), launch: str = "") -> pm.Daemon:
    config = pm.Config(job_id="two", queue_root=root, poll_interval=0.1, hours=10.0,
                       keepalive=False, kill_scope="none", stop_grace=stop_grace, num_nodes=2,
                       node_rank=rank, launch=launch)
    here = pm.Identity.here()
    daemon = pm.Daemon(config, clock=clock, sleep=clock.sleep,
                       identity=pm.Identity(host, here.pid, here.boot_id, here.pid_ns),
                       inventory=pm.Inventory.declare(list(gpus)))
    assert daemon.start() is None
    return daemon


def tick(daemons, clocks, seconds: float, step: float = 0.5) -> None:
    for _ in range(int(seconds / step)):
        for daemon in daemons:
            daemon.tick()
        for clock in clocks:
            clock.sleep(step)


def on_node_1(tmp_path: Path, skew: float):
    """Node 1 (its clock ``skew`` s off) runs a task; node 0 has started after it."""
    inst = tmp_path / "two"
    clock0, clock1 = FakeClock(), FakeClock()
    clock1.now += skew
    one = node(tmp_path, clock1, 1, "host-one")
    task = submit(inst, "t.sh", LOOP, gpus=1)
    tick([one], [clock0, clock1], 2)
    assert {t.task_id for t in one.runner.tasks.values()} == {task}
    zero = node(tmp_path, clock0, 0, "host-zero")
    return inst, task, zero, one, clock0, clock1


@pytest.mark.parametrize("skew", [3600.0, -3600.0])
def test_a_skewed_clock_neither_kills_a_live_node_nor_keeps_a_dead_one(tmp_path, skew):
    inst, task, zero, one, clock0, clock1 = on_node_1(tmp_path, skew)
    tick([zero, one], [clock0, clock1], 2 * pm.HEARTBEAT_STALE_SECONDS)
    assert (inst / "running" / task).exists()  # it beats: alive, whatever its clock says
    proc = one.runner.tasks[(task, None)].proc
    assert proc.poll() is None
    # node 1's daemon dies (it ticks no more); its task is ended here, as by its PID namespace
    proc.kill()
    proc.wait()
    tick([zero], [clock0], pm.HEARTBEAT_STALE_SECONDS - 5)
    assert (inst / "running" / task).exists()
    tick([zero], [clock0], 10 + pm.HEARTBEAT_SECONDS)
    assert finished(inst, task) == "failed"
    assert (result(inst, task)["state"], result(inst, task)["reason"]) == \
        ("interrupted", "node 1's daemon died")


def stop(daemons, clocks) -> None:
    """Shut ``daemons`` down as gpu_shutdown does, tick them until they end, and close them."""
    for daemon in daemons:
        daemon.begin_shutdown("gpu_shutdown")
    for _ in range(40):
        tick([d for d in daemons if not d.finished], clocks, 0.5)
    assert all(d.finished for d in daemons)
    for daemon in daemons:
        daemon.close()


def test_a_node_whose_clock_is_behind_follows_its_own_launchs_node_0(tmp_path):
    """A relaunch a minute after a clean shutdown, node 1 up before node 0: node 1, its clock
    5 minutes behind node 0's, read the earlier run's stop as later than its own start and
    exited at once ("node 0 has stopped"), leaving the new job without it."""
    clock0, clock1 = FakeClock(), FakeClock()
    clock1.now -= 300
    first = [node(tmp_path, clock0, 0, "host-zero", launch="100-1-1"),
             node(tmp_path, clock1, 1, "host-one", launch="100-1-1")]
    tick(first, [clock0, clock1], 5)
    stop(first[:1], [clock0, clock1])
    tick(first[1:], [clock0, clock1], pm.HEARTBEAT_SECONDS + 1)
    assert first[1].stopping == "node 0 has stopped"  # its own launch's node 0
    stop(first[1:], [clock0, clock1])
    for clock in (clock0, clock1):
        clock.sleep(60)
    one = node(tmp_path, clock1, 1, "host-one", launch="160-2-2")
    tick([one], [clock0, clock1], 3 * pm.HEARTBEAT_SECONDS)
    assert not one.stopping and not one.draining  # node 0's stop was the earlier launch's
    zero = node(tmp_path, clock0, 0, "host-zero", launch="160-2-2")
    task = submit(tmp_path / "two", "t.sh", "exit 0\n", gpus=1)
    tick([zero, one], [clock0, clock1], 3 * pm.HEARTBEAT_SECONDS)
    assert finished(tmp_path / "two", task) == "done" and not one.stopping
    stop([zero], [clock0, clock1])
    tick([one], [clock0, clock1], pm.HEARTBEAT_SECONDS + 1)
    assert one.stopping == "node 0 has stopped"
    stop([one], [clock0, clock1])


@pytest.mark.parametrize("skew", [0.0, 3600.0, -3600.0])
def test_node_0_records_a_dead_nodes_task_ended_at_that_nodes_last_beat(tmp_path, skew):
    """Node 1's daemon dies; node 0 records its task interrupted a minute later. The task
    ended, as far as anyone knows, at node 1's last beat, on node 1's clock as its start is
    (its duration is right whatever the clocks); when node 0 found it is ``found``, on node
    0's clock."""
    inst, task, zero, one, clock0, clock1 = on_node_1(tmp_path, skew)
    tick([zero, one], [clock0, clock1], 30)
    proc = one.runner.tasks[(task, None)].proc
    proc.kill()  # node 1's daemon dies (it ticks no more); its task with it
    proc.wait()
    died = clock0.now
    state = pm.parse_fields((inst / "nodes" / "node-1.state").read_text())
    beat = pm.parse_fields((inst / "nodes" / "node-1.beat").read_text())
    last_beat = max(float(state["heartbeat"]), float(beat["time"]))
    started = float(pm.parse_fields((inst / "records" / f"{task}.run").read_text())["started"])
    tick([zero], [clock0], pm.HEARTBEAT_STALE_SECONDS + 2 * pm.HEARTBEAT_SECONDS)
    res = result(inst, task)
    assert (res["state"], res["reason"]) == ("interrupted", "node 1's daemon died")
    assert float(res["ended"]) == pytest.approx(last_beat, abs=0.01)
    assert float(res["duration"]) == pytest.approx(last_beat - started, abs=0.01)
    assert 30 <= float(res["duration"]) <= 32
    assert died + pm.HEARTBEAT_STALE_SECONDS - pm.HEARTBEAT_SECONDS - 1 \
        <= float(res["found"]) <= clock0.now + 0.001  # once node 0 took node 1 for dead


STORAGE = textwrap.dedent("""\
    import json, os, subprocess, sys, time
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    from conftest import FakeClock
    from queue_files import submit
    from test_liveness import node, tick, LOOP
    import perpetual_motion as pm
    root = __import__("pathlib").Path({root!r})
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", root], check=True)
    inst = os.path.join(root, "two")
    clock0, clock1 = FakeClock(), FakeClock()
    one = node(root, clock1, 1, "host-one")
    task = submit(root / "two", "t.sh", LOOP, gpus=1)
    tick([one], [clock0, clock1], 2)
    zero = node(root, clock0, 0, "host-zero")
    tick([zero, one], [clock0, clock1], 5)
    proc = one.runner.tasks[(task, None)].proc
    facts = {{}}
    # the folder is full for 75 s: nothing new can be written, the beat goes on in place
    fd = os.open(root / "fill", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"x" * 4096)
    except OSError:
        os.close(fd)
    tick([zero, one], [clock0, clock1], 75)
    os.unlink(os.path.join(root, "fill"))
    tick([zero, one], [clock0, clock1], 10)
    facts["after_full"] = [proc.poll() is None, os.path.exists(f"{{inst}}/running/{{task}}"),
                           os.path.exists(f"{{inst}}/records/{{task}}.result")]
    # nodes/ read-only: node 1 cannot beat; it must end its task before node 0 takes it for
    # dead
    nodes = f"{{inst}}/nodes"
    subprocess.run(["mount", "--bind", nodes, nodes], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", nodes], check=True)
    start = clock1.now
    while proc.poll() is None and clock1.now - start < 120:
        tick([zero, one], [clock0, clock1], 0.5)
    facts["fenced_after"] = clock1.now - start
    subprocess.run(["umount", nodes], check=True)
    tick([zero, one], [clock0, clock1], 10)
    with open(f"{{inst}}/records/{{task}}.result") as f:
        res = pm.parse_fields(f.read())
    facts["result"] = [res["state"], res["reason"]]
    facts["failed"] = os.path.exists(f"{{inst}}/failed/{{task}}")
    print(json.dumps(facts))
    """)


def scenario(template: str, root: Path, **more: str) -> tuple[dict, str]:
    """Run a scenario script (``template``, formatted with the repository, the tests and
    ``root``) in a PID namespace of its own; the facts it prints last, and its stderr's end."""
    script = template.format(repo=str(REPO), tests=str(Path(__file__).parent), root=str(root),
                             **more)
    run = subprocess.run([*UNSHARE, sys.executable, "-c", script], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1]), run.stderr[-3000:]


@needs_namespace
def test_a_full_disk_loses_nothing_and_a_node_that_cannot_beat_fences_itself(tmp_path):
    root = tmp_path / "shared"
    root.mkdir()
    facts, err = scenario(STORAGE, root)
    assert facts["after_full"] == [True, True, False], err
    fenced = facts["fenced_after"]  # the last beat came up to a heartbeat period before
    assert pm.SELF_FENCE_SECONDS - pm.HEARTBEAT_SECONDS <= fenced < pm.HEARTBEAT_STALE_SECONDS
    assert facts["result"][0] == "interrupted" and facts["failed"]


UNRECORDED = textwrap.dedent("""\
    import json, os, subprocess, sys
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    from conftest import FakeClock
    from queue_files import submit
    from test_liveness import node, tick
    root = __import__("pathlib").Path({root!r})
    runs = {runs!r}
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", root], check=True)
    inst = root / "two"
    clock0, clock1 = FakeClock(), FakeClock()
    one = node(root, clock1, 1, "host-one")
    zero = node(root, clock0, 0, "host-zero")
    task = submit(inst, "t.sh", f"echo run >> {{runs}}; while :; do sleep 0.05; done\\n", gpus=1)
    fd = os.open(root / "fill", os.O_WRONLY | os.O_CREAT)  # the folder is full
    try:
        while True:
            os.write(fd, b"x" * 4096)
    except OSError:
        os.close(fd)
    tick([one], [clock0, clock1], 2)  # node 1 claims the task, and cannot record its run
    tick([zero, one], [clock0, clock1], 135)  # node 0 would take it for never started
    os.unlink(root / "fill")
    tick([zero, one], [clock0, clock1], 70)  # (a node backs off up to 60 s)
    with open(runs) as f:
        count = len(f.read().splitlines())
    where = [d for d in ("pending", "running", "done", "failed") if (inst / d / task).exists()]
    print(json.dumps({{"runs": count, "where": where}}))
    """)


@needs_namespace
def test_a_task_whose_run_cannot_be_recorded_does_not_start_and_runs_once_later(tmp_path):
    """The run record is written before the task starts (docs/protocol.md, Claim and run):
    a node that cannot write it (a full disk) puts the task back rather than run it
    unrecorded, which another node would take for never started and run a second time."""
    root = tmp_path / "shared"
    root.mkdir()
    runs = tmp_path / "runs"
    runs.touch()
    facts, err = scenario(UNRECORDED, root, runs=str(runs))
    assert facts == {"runs": 1, "where": ["running"]}, err



class PipeClosed(Exception):
    pass


class KeeperPipe:
    """What the fence keeper reads, in simulated time: ``lines`` as (time, line), each read at
    the look after its time; the pipe's end (the daemon's) at ``end``, or at ``cut`` the test
    ends the keeper (it would watch a suspended daemon for ever)."""

    def __init__(self, clock: FakeClock, lines: list[tuple[float, str]], end: float | None,
                 cut: float = 200.0):
        self.clock, self.lines, self.end, self.cut = clock, lines, end, cut

    def poll(self, timeout: float) -> list[str]:
        self.clock.sleep(timeout)
        if self.clock.now >= self.cut:
            raise PipeClosed
        due = [line for at, line in self.lines if at <= self.clock.now]
        self.lines = [(at, line) for at, line in self.lines if at > self.clock.now]
        if self.end is not None and self.clock.now >= self.end:
            due.append("eof")
        return due


class RecordingFence(pm.SelfFence):
    def __init__(self, clock):
        super().__init__(clock)
        self.fenced: list[float] = []

    def check(self) -> bool:
        did = super().check()
        if did:
            self.fenced.append(self.monotonic())
        return did


@pytest.mark.parametrize("daemon_ends", [False, True])
def test_the_fence_keeper_kills_the_tasks_once_the_beat_is_late(daemon_ends, caplog):
    """The daemon beats every 5 s, then no more (suspended; or gone, its pipe ended): the
    keeper kills the task it was told of once the last beat is SELF_FENCE_SECONDS old, not
    before, says so once, and ends once the daemon has ended."""
    clock = FakeClock(0.0)
    task = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        lines = [(0.0, f"tasks {task.pid}:{pm._start_time(task.pid)} job/500-x-t.sh"),
                 *((float(t), "beat") for t in range(0, 30, 5))]
        pipe = KeeperPipe(clock, lines, 27.0 if daemon_ends else None)
        fence = RecordingFence(clock)
        if daemon_ends:
            assert pm.fence_keeper_main(pipe, fence, sleep=clock.sleep) == 0
        else:
            with pytest.raises(PipeClosed):
                pm.fence_keeper_main(pipe, fence, sleep=clock.sleep)
        assert task.wait(5) == -9
        last_beat = 25.0
        assert last_beat + pm.SELF_FENCE_SECONDS <= fence.fenced[0] \
            <= last_beat + pm.SELF_FENCE_SECONDS + 1.5
        assert caplog.text.count("its tasks were killed") == 1
    finally:
        if task.poll() is None:
            task.kill()
            task.wait()


def test_the_fence_keeper_of_a_daemon_that_ended_without_tasks_ends_at_once():
    clock = FakeClock(0.0)
    pipe = KeeperPipe(clock, [(0.0, "tasks - "), (0.5, "beat")], end=3.0)
    assert pm.fence_keeper_main(pipe, pm.SelfFence(clock), sleep=clock.sleep) == 0
    assert clock.now <= 4.0


class TellingKeeper:
    """A fence keeper that takes what the daemon tells it; the test does its kill."""

    proc = types.SimpleNamespace(poll=lambda: None)

    def tell(self, beat, groups, markers) -> bool:
        return True

    def close(self) -> None:
        pass


def test_a_task_fenced_while_its_daemon_was_suspended_ended_when_last_seen(tmp_path):
    """The daemon is suspended (SIGSTOP) for 26 minutes; its fence keeper kills its task
    SELF_FENCE_SECONDS after its last beat. Resumed, the daemon records the task interrupted
    (self-fenced), ended when it last saw it run, not when it was resumed; found then."""
    inst = tmp_path / "two"
    clock = FakeClock()
    zero = node(tmp_path, clock, 0, "host-zero")
    zero.keeper = TellingKeeper()
    task = submit(inst, "t.sh", LOOP, gpus=1)
    tick([zero], [clock], 10)
    entry = zero.runner.tasks[(task, None)]
    assert entry.proc.poll() is None
    last_seen = clock.now - 0.5  # its last turn
    suspended = clock.now
    clock.sleep(pm.SELF_FENCE_SECONDS)
    pm.signal_group(entry.proc.pid, 9)  # the keeper fences it
    entry.proc.wait()
    clock.sleep(26 * 60 - pm.SELF_FENCE_SECONDS)
    resumed = clock.now
    tick([zero], [clock], 2)
    res = result(inst, task)
    assert (res["state"], res["reason"]) == (
        "interrupted", f"self-fenced: this node could not write its heartbeat for "
                       f"{pm.SELF_FENCE_SECONDS:g} s")
    assert last_seen - 0.001 <= float(res["ended"]) <= suspended + 0.001  # (ms in records)
    assert resumed - 0.001 <= float(res["found"]) <= resumed + 2
    assert float(res["duration"]) < 11


def test_a_task_that_ended_while_its_daemon_was_suspended_ended_when_last_seen(tmp_path):
    """The daemon is suspended for 30 s (less than SELF_FENCE_SECONDS: nothing is fenced), and
    its task exits meanwhile, with status 0. Resumed, the daemon records it done, ended when it
    last saw it run (its end was not seen), found when resumed: not a run 30 s longer."""
    inst = tmp_path / "two"
    clock = FakeClock()
    zero = node(tmp_path, clock, 0, "host-zero")
    zero.keeper = TellingKeeper()
    go = tmp_path / "go"
    task = submit(inst, "t.sh", f"while [ ! -e '{go}' ]; do sleep 0.05; done\n", gpus=1)
    tick([zero], [clock], 10)
    entry = zero.runner.tasks[(task, None)]
    assert entry.proc.poll() is None
    last_seen = clock.now - 0.5  # its last turn
    suspended = clock.now
    clock.sleep(30)
    go.touch()
    entry.proc.wait()
    resumed = clock.now
    tick([zero], [clock], 2)
    res = result(inst, task)
    assert (res["state"], res["reason"]) == ("done", "exit status 0")
    assert last_seen - 0.001 <= float(res["ended"]) <= suspended + 0.001, res
    assert resumed - 0.001 <= float(res["found"]) <= resumed + 2, res
    assert float(res["duration"]) < 11
    # a task whose end the loop saw at once has no ``found``
    quick = submit(inst, "q.sh", "exit 3\n", gpus=1)
    tick([zero], [clock], 5)
    res = result(inst, quick)
    assert (res["state"], res["reason"], res.get("found")) == ("failed", "exit status 3", None)


def test_a_claim_its_node_cannot_start_in_time_is_let_go_and_the_task_runs_once(tmp_path):
    """Node 1 claims a task whose GPUs it cannot get freed (its loop stalled, say). Node 0
    takes a claim without a .run record for _UNSTARTED_CLAIM_SECONDS for a dead daemon's and
    puts the task back: node 1 lets it go before that, without a record, so the task is never
    started by node 1 after node 0 has given it to another node, and it runs once."""
    inst = tmp_path / "two"
    ran = tmp_path / "ran"
    clock0, clock1 = FakeClock(), FakeClock()
    one = node(tmp_path, clock1, 1, "host-one")
    one.keepalive.released = lambda gpus: False  # its GPUs are never freed
    task = submit(inst, "t.sh", f"echo ran >> '{ran}'\n", gpus=1)
    tick([one], [clock0, clock1], 2)
    assert {t.task_id for t in one.runner.tasks.values()} == {task}
    zero = node(tmp_path, clock0, 0, "host-zero")
    tick([zero, one], [clock0, clock1], pm._CLAIM_START_SECONDS)
    assert one.runner.tasks == {}  # let go, and nothing written
    assert (inst / "running" / task).exists() and not (inst / "records" / f"{task}.run").exists()
    del one.keepalive.released  # (freed now: either node may run it)
    tick([zero, one], [clock0, clock1], pm._UNSTARTED_CLAIM_SECONDS + 5)
    assert finished(inst, task) == "done"
    assert ran.read_text() == "ran\n"


def test_a_claim_put_back_while_its_run_record_was_written_is_not_started(tmp_path):
    """Node 1's write of the .run record hangs (stalled storage) long after its claim, and
    node 0 puts the task back into pending/ meanwhile: node 1 does not start it, takes back its
    record, and the task runs once, on the node that claims it next."""
    inst = tmp_path / "two"
    ran = tmp_path / "ran"
    clock0, clock1 = FakeClock(), FakeClock()
    one = node(tmp_path, clock1, 1, "host-one")
    zero = node(tmp_path, clock0, 0, "host-zero")
    publish = one.runner._publish_run

    def stalled(task, *args):
        clock1.sleep(pm.HEARTBEAT_STALE_SECONDS)
        zero.scheduler.put_back_unstarted(task.task_id)  # node 0 has seen no record for that long
        assert (inst / "pending" / task.task_id).exists()
        publish(task, *args)
        one.runner._publish_run = publish

    one.runner._publish_run = stalled
    task = submit(inst, "t.sh", f"echo ran >> '{ran}'\n", gpus=1)
    tick([one], [clock0, clock1], 0.5)  # one turn
    assert one.runner._publish_run is publish  # (node 1 claimed it)
    assert one.runner.tasks == {} and (inst / "pending" / task).exists()
    assert not (inst / "records" / f"{task}.run").exists()
    tick([zero, one], [clock0, clock1], 5)
    assert finished(inst, task) == "done"
    assert ran.read_text() == "ran\n"


def test_node_0_leaves_a_claim_whose_start_is_recorded_as_it_puts_it_back(tmp_path):
    """The claimer's .run record comes just after node 0 looked for it: node 0, having put the
    task back into pending/, finds the record and returns the task to running/."""
    inst = tmp_path / "two"
    clock0 = FakeClock()
    zero = node(tmp_path, clock0, 0, "host-zero")
    task = submit(inst, "t.sh", "true\n", gpus=1)
    (inst / "pending" / task).rename(inst / "running" / task)
    (inst / "records" / f"{task}.run").write_text(f"id={task}\nnode_rank=1\ndaemon=1\n")
    zero.scheduler.put_back_unstarted(task)
    assert (inst / "running" / task).exists() and not (inst / "pending" / task).exists()
    (inst / "records" / f"{task}.run").unlink()
    zero.scheduler.put_back_unstarted(task)
    assert (inst / "pending" / task).exists()


# Node 1 dies with two tasks that outlive SIGTERM (a checkpointing handler) on the same host,
# as the local backend runs nodes: node 0 ends them, with a stop grace of 5 s
SLOW_TO_END = textwrap.dedent("""\
    import json, os, sys, time
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    from pathlib import Path
    from conftest import FakeClock
    from queue_files import finished, result, submit
    from test_liveness import node, tick
    import perpetual_motion as pm
    root = Path({root!r})
    inst = root / "two"

    def alive(pid):
        try:
            stat = open(f"/proc/{{pid}}/stat").read()
        except FileNotFoundError:
            return False
        return stat.rpartition(")")[2].split()[0] != "Z"  # a zombie has ended

    clock0, clock1 = FakeClock(), FakeClock()
    one = node(root, clock1, 1, "host-a", stop_grace=5.0, gpus=(0, 1))
    theirs = [submit(inst, f"slow{{n}}.sh", "trap 'echo saving' TERM; while :; do sleep 0.05; "
                     "done\\n", gpus=1) for n in range(2)]
    tick([one], [clock0, clock1], 2)
    pids = [one.runner.tasks[(t, None)].proc.pid for t in theirs]
    # node 1's daemon dies (it ticks no more); its tasks run on
    zero = node(root, clock0, 0, "host-a", stop_grace=5.0)
    mine = submit(inst, "mine.sh", "while :; do sleep 0.05; done\\n", gpus=1)
    longest, dead_at, alive_in_grace = 0.0, None, []
    start = clock0.now
    while not all(finished(inst, t) for t in theirs) and clock0.now - start < 150:
        before = time.monotonic()
        zero.tick()
        longest = max(longest, time.monotonic() - before)
        view = zero.scheduler.views.get(1)
        if dead_at is None and view is not None and not view.alive:
            dead_at = clock0.now
        if dead_at is not None and clock0.now - dead_at < 4.0:
            alive_in_grace.append(all(alive(pid) for pid in pids))
        clock0.sleep(0.1)
        time.sleep(0.01)
    own = zero.runner.tasks.get((mine, None))
    print(json.dumps({{
        "longest_tick": longest,
        "alive_in_grace": bool(alive_in_grace) and all(alive_in_grace),
        "gone": not any(alive(pid) for pid in pids),
        "ends": [[finished(inst, t), (result(inst, t) or {{}}).get("state"),
                  (result(inst, t) or {{}}).get("reason"),
                  float((result(inst, t) or {{}}).get("ended") or 0) - (dead_at or 0)]
                 for t in theirs],
        "logs": [(inst / "logs" / f"{{t}}.log").read_text() for t in theirs],
        "mine_runs": own is not None and own.proc is not None and own.proc.poll() is None,
        "mine_stop": own.stop_reason if own is not None else "gone",
    }}))
    """)


@needs_namespace
def test_node_0_goes_on_beating_while_a_dead_nodes_tasks_get_their_grace(tmp_path):
    """The loop never waits out the stop grace of a dead node's tasks (it did, for each task in
    turn, and wrote no heartbeat meanwhile: a grace of 40 s or more, or a few tasks, made
    node 0 fence itself and kill its own healthy task). They get SIGTERM, SIGKILL once the
    grace has passed on node 0's clock, and are recorded interrupted once they are gone."""
    root = tmp_path / "shared"
    root.mkdir()
    facts, err = scenario(SLOW_TO_END, root)
    assert facts["longest_tick"] < 2.0, facts
    assert facts["alive_in_grace"] and facts["gone"], facts
    for folder, state, reason, ended_after_death in facts["ends"]:
        assert (folder, state, reason) == ("failed", "interrupted", "node 1's daemon died")
        assert 5.0 <= ended_after_death < 10.0, facts  # once the grace was over, not before
    for log in facts["logs"]:
        assert "saving" in log and "interrupted: node 1's daemon died; " in log, log
    assert facts["mine_runs"] and not facts["mine_stop"], facts  # node 0's own task runs on


def test_the_daemon_never_waits_for_its_keeper_and_sends_it_whole_lines():
    """A keeper that reads nothing for long (suspended itself) neither blocks the daemon nor
    gets a broken line: what the pipe cannot take waits, the oldest dropped first, but never
    the rest of a line the pipe has begun."""
    read, write = os.pipe()
    fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 4096)
    proc = types.SimpleNamespace(stdin=os.fdopen(write, "wb"), poll=lambda: None)
    os.set_blocking(write, False)
    keeper = pm.FenceKeeper(proc)
    told = set()
    for n in range(400):  # long lines: many tasks
        markers = {f"job/500-20261204_000000_{n:09d}-{k:08x}-t.sh" for k in range(30)}
        groups = {(1000 + n, 7), (2000 + n, 8)}
        assert keeper.tell(n % 3 == 0, groups, markers)
        told.add(f"tasks {1000 + n}:7,{2000 + n}:8 {' '.join(sorted(markers))}")
    got = b""
    os.set_blocking(read, False)
    for _ in range(100):  # the keeper reads, the daemon tells on
        with contextlib.suppress(BlockingIOError):
            got += os.read(read, 1 << 16)
        keeper.tell(False, groups, markers)
    lines = got.decode().splitlines()
    assert lines and all(line == "beat" or line in told for line in lines), \
        [line[:60] for line in lines if line != "beat" and line not in told][:3]
    assert lines[-1].startswith("tasks 1399:7,2399:8 ")  # the tasks as they are now, in the end
    proc.stdin.close()
    os.close(read)


STALLED_RESULT = textwrap.dedent("""\
    import json, os, sys
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    from pathlib import Path
    from conftest import FakeClock
    from queue_files import finished, result, submit
    from test_liveness import node, tick
    root = Path({root!r})
    inst = root / "two"
    gate = root / "gate"
    clock0, clock1 = FakeClock(), FakeClock()
    one = node(root, clock1, 1, "host-one")
    zero = node(root, clock0, 0, "host-zero")
    task = submit(inst, "t.sh", f"while [ ! -e {{gate}} ]; do sleep 0.05; done\\n", gpus=1)
    tick([one, zero], [clock0, clock1], 2)
    assert (task, None) in one.runner.tasks
    fsync = os.fsync

    def stalling_fsync(fd):
        # the shared storage stalls while node 1 writes the task's result: node 1 hangs in
        # the write for 70 s, node 0 goes on and takes node 1 for dead meanwhile
        if os.readlink(f"/proc/self/fd/{{fd}}").endswith(f"{{task}}.result"):
            os.fsync = fsync
            tick([zero], [clock0], 70)
        fsync(fd)

    os.fsync = stalling_fsync
    gate.touch()
    for _ in range(100):
        tick([one], [clock1], 0.5)
        if finished(inst, task) and os.fsync is fsync:
            break
    tick([zero, one], [clock0, clock1], 3)
    print(json.dumps({{"where": finished(inst, task), "result": result(inst, task),
                       "stalled": os.fsync is fsync}}))
    """)


@needs_namespace
def test_a_result_written_through_a_stall_does_not_replace_node_0s(tmp_path):
    """Node 1's task ends; writing its result hangs on stalled storage for longer than node 0
    waits before it takes node 1 for dead and records the task interrupted. When the write goes
    through, node 1 must not put its result over node 0's: the task was recorded twice, its
    result said done while it lay in failed/."""
    facts, err = scenario(STALLED_RESULT, tmp_path)
    assert facts["stalled"], facts
    assert facts["where"] == "failed", facts
    assert (facts["result"]["state"], facts["result"]["reason"]) == \
        ("interrupted", "node 1's daemon died"), facts


STALLED_STATE = textwrap.dedent("""\
    import json, os, sys
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    from pathlib import Path
    from conftest import FakeClock
    from queue_files import submit
    from test_liveness import LOOP, node, tick
    import perpetual_motion as pm
    root = Path({root!r})
    inst = root / "two"
    clock_a, clock_b = FakeClock(), FakeClock()
    old = node(root, clock_a, 1, "host-one")
    close = os.close
    new = []

    def stalling_close(fd):
        # the shared storage stalls while the old daemon writes its state file: it hangs in
        # the write; a new daemon for the node, in another container, takes the node over
        # meanwhile (its heartbeat stood still) and runs a task
        if os.readlink(f"/proc/self/fd/{{fd}}").endswith(".node-1.state") and not new:
            os.close = close
            new.append(node(root, clock_b, 1, "host-two"))
            task = submit(inst, "t.sh", LOOP, gpus=1)
            tick(new, [clock_b], 2)
            new.append(task)
        close(fd)

    os.close = stalling_close
    old.write_state()  # its check of the owner comes before the write that hangs
    assert new, "no stall"
    new, task = new
    tick([old, new], [clock_a, clock_b], 3)
    state = pm.parse_fields((inst / "nodes" / "node-1.state").read_text())
    entry = new.runner.tasks.get((task, None))
    print(json.dumps({{"owner": state["host"], "old_displaced": old.displaced,
                       "new_displaced": new.displaced,
                       "runs": entry is not None and entry.proc.poll() is None}}))
    """)


@needs_namespace
def test_a_state_written_through_a_stall_does_not_take_the_node_back(tmp_path):
    """A daemon's state file write hangs on stalled storage; a new daemon of the node takes it
    over meanwhile and starts a task. When the old write goes through it must not put the old
    daemon's claim back over the new owner's: the new owner yielded, and its task was killed."""
    facts, err = scenario(STALLED_STATE, tmp_path)
    assert facts == {"owner": "host-two", "old_displaced": True, "new_displaced": False,
                     "runs": True}, facts


COMMAND_AT_TAKEOVER = textwrap.dedent("""\
    import json, os, sys
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    from pathlib import Path
    from conftest import FakeClock
    from queue_files import submit
    from test_liveness import node, tick
    import perpetual_motion as pm
    root = Path({root!r})
    inst = root / "two"
    clock_a, clock_b = FakeClock(), FakeClock()
    clock_b.now += 5  # (its start comes later)
    old = node(root, clock_a, 0, "host-one")
    (inst / "drain").write_text("by=t\\nreason=t\\ntime=0\\n")  # nothing starts meanwhile
    task = submit(inst, "t.sh", "true\\n", gpus=1)
    new = node(root, clock_b, 0, "host-two")  # the old one stood still for the watch
    # the client addresses the node's daemon as the state file names it: the new one
    (inst / "commands" / "stop.cmd").write_text(pm.format_fields({{
        "action": "stop", "task": task, "sent": f"{{clock_b.now:.3f}}", "sent_by": "t@t",
        "daemon_started": new.started_text}}))
    tick([old], [clock_a], 0.5)  # the old one's next turn, before it has seen the new claim
    tick([old, new], [clock_a, clock_b], 2)
    reply = pm.parse_fields((inst / "replies" / "stop.reply").read_text())
    print(json.dumps({{"result": reply.get("result"), "old_displaced": old.displaced,
                       "cancelled": (inst / "failed" / task).exists()}}))
    """)


@needs_namespace
def test_a_command_for_the_daemon_that_took_node_0_over_is_left_to_it(tmp_path):
    """A new daemon took node 0 over; a client sends it a stop. The old daemon, in its turn
    before it sees the new claim, must leave the command to the daemon it is meant for: it
    answered it "meant for an earlier daemon" and removed it, and the task was never stopped."""
    facts, err = scenario(COMMAND_AT_TAKEOVER, tmp_path)
    assert facts == {"result": "cancelled", "old_displaced": True, "cancelled": True}, facts

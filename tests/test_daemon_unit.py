"""The daemon's pieces, imported as a module, in simulated time where time matters."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from conftest import FakeClock, run_until
from queue_files import command, submit

import perpetual_motion as pm


def make_daemon(root: Path, clock: FakeClock, job_id: str = "unit",
                identity: pm.Identity | None = None, **overrides) -> pm.Daemon:
    config = pm.Config(job_id=job_id, queue_root=root, poll_interval=0.1, hours=1.0,
                       keepalive=False, kill_scope="none", stop_grace=0.5, **overrides)
    return pm.Daemon(config, clock=clock, sleep=clock.sleep, identity=identity)


def started_daemon(tmp_path: Path) -> tuple[pm.Daemon, FakeClock, Path]:
    """A daemon in simulated time, started on ``tmp_path``; with its clock and instance."""
    clock = FakeClock()
    daemon = make_daemon(tmp_path, clock)
    assert daemon.start() is None
    return daemon, clock, tmp_path / "unit"


# Records and names ############################################################################


def test_fields_round_trip_and_reject_garbage():
    fields = {"id": "x", "cwd": "/a b/c=d", "empty": ""}
    assert pm.parse_fields(pm.format_fields(fields)) == fields
    with pytest.raises(ValueError):
        pm.parse_fields("id=x\nthis is not a record\n")
    with pytest.raises(ValueError):
        pm.parse_fields("Bad Key=1\n")


@pytest.mark.parametrize("job_id,ok", [
    ("train-exp1", True), ("a", True), ("A.b_c-9", True), ("x" * 64, True),
    ("", False), ("../x", False), ("a/b", False), (".hidden", False), ("-x", False),
    ("x" * 65, False), ("sp ace", False), ("é", False),
])
def test_job_id_rule(job_id, ok):
    assert pm.valid_job_id(job_id) is ok


def test_task_ids_sort_by_priority_then_time():
    ids = [pm.task_id_for("b.sh", 500), pm.task_id_for("a.sh", 500), pm.task_id_for("c", 1)]
    assert all(pm.TASK_ID_RE.fullmatch(i) for i in ids)
    assert sorted(ids) == [ids[2], ids[0], ids[1]]
    assert pm.short_name(ids[0]) == "b.sh"
    assert pm.short_name("train.sh") == "train.sh"
    assert pm.task_id_for("we ird/name.sh").endswith("-we_ird_name.sh")


def test_node_rank_from_environment_in_order_of_preference():
    assert pm.node_from_environment({}) == (0, 1)
    assert pm.node_from_environment({"SLURM_NODEID": "1", "SLURM_NNODES": "2"}) == (1, 2)
    assert pm.node_from_environment({"RANK": "2", "WORLD_SIZE": "4", "SLURM_NODEID": "1"}) == (2, 4)
    env = {"SENSECORE_PYTORCH_NODE_RANK": "3", "SENSECORE_PYTORCH_NNODES": "4", "RANK": "0"}
    assert pm.node_from_environment(env) == (3, 4)


def test_bad_arguments_are_refused_with_a_message():
    assert "invalid JOB_ID" in pm.config_from_args(pm.parse_args(["--job-id", "../x"]))
    assert "--hours must be above 0" in pm.config_from_args(pm.parse_args(["--hours", "0"]))
    assert "at most" in pm.config_from_args(pm.parse_args(["--hours", "1e9"]))
    assert "does not fit" in pm.config_from_args(
        pm.parse_args(["--node-rank", "2", "--num-nodes", "2"]))
    assert "invalid --launch" in pm.config_from_args(pm.parse_args(["--launch", "a b\n"]))
    config = pm.config_from_args(pm.parse_args(["--job-id", "ok", "--hours", "0.002",
                                                "--launch", "1733380000-42-7"]))
    assert config.hours == 0.002 and config.launch == "1733380000-42-7"


def test_publish_is_atomic_and_leaves_no_staging(tmp_path):
    folder = pm.QueueFolder(tmp_path / "inst")
    folder.create("inst")
    target = folder.dir("nodes") / "node-0.state"
    folder.publish(target, "a=1\n")
    folder.publish(target, "a=2\n")
    assert target.read_text() == "a=2\n"
    assert os.listdir(folder.dir(".staging")) == []
    marker = json.loads((folder.root / "control.json").read_text())
    assert marker == {"protocol": pm.PROTOCOL_VERSION, "job_id": "inst"}


def test_master_ports_are_free_distinct_and_never_ephemeral():
    picker = pm.PortPicker()
    ports = [picker.pick("same-seed", 0.0) for _ in range(50)]
    assert len(set(ports)) == 50  # tasks started in one turn never share a port
    assert all(pm.MASTER_PORTS[0] <= port <= pm.MASTER_PORTS[1] for port in ports)
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    if ephemeral.exists():
        assert pm.MASTER_PORTS[1] < int(ephemeral.read_text().split()[0])
    spread = {pm.PortPicker().pick(f"task-{n}", 0.0) for n in range(20)}
    assert len(spread) == 20  # other tasks start elsewhere in the range
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        first = pm.PortPicker().pick("seed", 0.0)  # where "seed" starts
        taken.bind(("", first))
        taken.listen()
        assert pm.PortPicker().pick("seed", 0.0) != first  # a port in use is passed over
    assert picker.pick("same-seed", pm.PORT_REUSE_SECONDS + 1) == ports[0]  # given again later
    full = pm.PortPicker(first=20000, last=20001)
    assert full.pick("x", 0.0, is_free=lambda port: False) > pm.MASTER_PORTS[1]  # the kernel's


# The daemon in simulated time ##################################################################


def test_auto_shutdown_happens_at_the_configured_hour(tmp_path):
    clock = FakeClock()
    daemon = make_daemon(tmp_path, clock)
    assert daemon.start() is None
    clock.sleep(3599)
    daemon.tick()
    assert not daemon.finished
    clock.sleep(1.5)
    daemon.tick()
    assert daemon.finished and "auto-shutdown" in daemon.draining


def test_auto_shutdown_lets_the_running_task_end_and_starts_nothing_new(tmp_path):
    clock = FakeClock()
    daemon = make_daemon(tmp_path, clock)
    assert daemon.start() is None
    inst = tmp_path / "unit"
    gate = tmp_path / "gate"
    long = submit(inst, "long.sh", f"while [ ! -e '{gate}' ]; do sleep 0.05; done\n")
    run_until(daemon, clock, lambda: daemon.runner.tasks)
    later = submit(inst, "later.sh", "true\n")
    clock.sleep(3600)
    daemon.tick()
    assert daemon.draining and not daemon.finished
    state = pm.parse_fields((inst / "nodes" / "node-0.state").read_text())
    assert state["status"] == "draining"
    for _ in range(5):
        daemon.tick()
        time.sleep(0.02)
    assert (inst / "running" / long).exists() and (inst / "pending" / later).exists()
    gate.write_text("")
    run_until(daemon, clock, lambda: daemon.finished)
    assert pm.parse_fields((inst / "records" / f"{long}.result").read_text())["state"] == "done"
    assert (inst / "pending" / later).exists()


def test_tasks_run_in_name_order_and_hidden_or_odd_entries_are_skipped(tmp_path):
    daemon, clock, inst = started_daemon(tmp_path)
    out = tmp_path / "order.txt"
    late = submit(inst, "late.sh", f"echo late >> '{out}'\n", priority=900)
    early = submit(inst, "early.sh", f"echo early >> '{out}'\n", priority=100)
    (inst / "pending" / ".staging-file.sh").write_text(f"echo hidden >> '{out}'\n")
    (inst / "pending" / "a-directory").mkdir()
    run_until(daemon, clock, lambda: (inst / "done" / late).exists())
    assert out.read_text() == "early\nlate\n"
    assert (inst / "done" / early).exists()
    assert (inst / "pending" / ".staging-file.sh").exists()
    assert (inst / "pending" / "a-directory").is_dir()


def test_commands_cancel_pending_and_bad_commands_get_an_error_reply(tmp_path):
    daemon, clock, inst = started_daemon(tmp_path)
    blocker = submit(inst, "block.sh", "sleep 30\n", priority=1)
    run_until(daemon, clock, lambda: daemon.runner.tasks)
    queued = submit(inst, "queued.sh", "true\n")
    cancel = command(inst, "stop", queued)
    missing = command(inst, "stop", "500-nope")
    (inst / "commands" / "zz-garbage.cmd").write_bytes(b"\xff\xfe not a record \x00\n")
    unknown = command(inst, "explode")
    daemon.tick()
    reply = {n: pm.parse_fields((inst / "replies" / f"{n}.reply").read_text())
             for n in (cancel, missing, unknown, "zz-garbage")}
    assert reply[cancel]["result"] == "cancelled"
    assert reply[missing]["result"] == "not_found"
    assert reply[unknown]["result"] == "error"
    assert reply["zz-garbage"]["result"] == "error"
    assert os.listdir(inst / "commands") == []
    assert (inst / "failed" / queued).exists()
    result = pm.parse_fields((inst / "records" / f"{queued}.result").read_text())
    assert result["state"] == "cancelled"
    stop = command(inst, "stop", blocker)
    run_until(daemon, clock, lambda: (inst / "failed" / blocker).exists())
    assert pm.parse_fields((inst / "replies" / f"{stop}.reply").read_text())["result"] == "stopped"
    result = pm.parse_fields((inst / "records" / f"{blocker}.result").read_text())
    assert (result["state"], result["signal"]) == ("stopped", "15")


ELSEWHERE = pm.Identity("other-host", 4242, "boot", "pid:[1]")  # a daemon on another host


class TickingClock(FakeClock):
    """Simulated time in which another daemon keeps ticking while this one sleeps."""

    def __init__(self, other: pm.Daemon | None = None):
        super().__init__()
        self.other = other

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        if self.other is not None:
            self.other.tick()


def test_an_owner_elsewhere_whose_heartbeat_advances_keeps_the_node(tmp_path):
    clock = TickingClock()
    first = make_daemon(tmp_path, clock, identity=ELSEWHERE)
    first.start()
    clock.other = first
    second = make_daemon(tmp_path, clock)
    before = clock.now
    assert second.start() == pm.EXIT_ALREADY_RUNNING
    assert clock.now - before < pm.TAKEOVER_WATCH_SECONDS  # as soon as it saw it advance


def test_a_restart_after_a_crash_elsewhere_takes_over_once_the_heartbeat_stands_still(
        tmp_path, caplog):
    """A container restarted after kill -9: the old heartbeat is fresh but never advances."""
    clock = FakeClock()
    first = make_daemon(tmp_path, clock, identity=ELSEWHERE)
    first.start()  # then it dies: it never writes again
    second = make_daemon(tmp_path, clock)
    before = clock.now
    with caplog.at_level("WARNING"):
        assert second.start() is None
    assert clock.now - before == pytest.approx(pm.TAKEOVER_WATCH_SECONDS, abs=1.5)
    assert "takes the node over" in caplog.text
    state = pm.parse_fields((tmp_path / "unit" / "nodes" / "node-0.state").read_text())
    assert state["started"] == second.started_text


def test_a_takeover_waits_until_an_owner_that_cannot_beat_has_fenced_its_tasks(tmp_path,
                                                                                monkeypatch):
    """An owner elsewhere whose storage stalls lives on and cannot beat: it kills its tasks
    after SELF_FENCE_SECONDS. A new daemon of the node in another container, which cannot
    see the owner's processes, must not take the node over (and count its GPUs free, and
    record its tasks ended) before then."""
    clock = TickingClock()
    first = make_daemon(tmp_path, clock, identity=ELSEWHERE)
    assert first.start() is None
    inst = tmp_path / "unit"
    task = submit(inst, "t.sh", "while :; do sleep 0.05; done\n")
    run_until(first, clock, lambda: (task, None) in first.runner.tasks)
    proc = first.runner.tasks[(task, None)].proc

    def stalled(*args, **kwargs):
        raise OSError(5, "Input/output error")

    first.folder.write_beat = stalled  # the storage stalls: no beat, no state
    first.write_state = lambda *args, **kwargs: None
    clock.other = first  # it goes on (its fence with it) while the new daemon watches
    for unseen in ("predecessor_pids", "marked_pids"):  # (another PID namespace)
        monkeypatch.setattr(pm, unseen, lambda *args, **kwargs: [])
    second = make_daemon(tmp_path, clock)
    try:
        assert second.start() is None  # it takes over in the end
        assert proc.poll() is not None, "taken over while the task of the owner still ran"
    finally:
        if proc.poll() is None:
            pm.signal_group(proc.pid, 9)
        proc.wait()


def test_a_heartbeat_from_the_future_does_not_block_a_new_daemon(tmp_path):
    clock = FakeClock()
    ahead = FakeClock(clock.now + 3600)  # its clock is an hour ahead
    first = make_daemon(tmp_path, ahead, identity=ELSEWHERE)
    first.start()
    second = make_daemon(tmp_path, clock)
    before = clock.now
    assert second.start() is None
    assert clock.now - before < pm.TAKEOVER_WATCH_SECONDS + 1.5


def test_a_stale_heartbeat_elsewhere_is_taken_over_at_once(tmp_path):
    """Older than any difference of hosts' clocks: no watch. A younger one that looks stale
    here may come from a host whose clock is behind: it is watched."""
    clock = FakeClock()
    first = make_daemon(tmp_path, clock, identity=ELSEWHERE)
    first.start()
    clock.sleep(pm.HEARTBEAT_STALE_SECONDS + 1)
    before = clock.now
    assert make_daemon(tmp_path, clock).start() is None
    assert clock.now - before == pytest.approx(pm.TAKEOVER_WATCH_SECONDS, abs=1.5)
    first = make_daemon(tmp_path, clock, identity=ELSEWHERE)
    first.start()
    clock.sleep(pm.HEARTBEAT_STALE_SECONDS + pm.CLOCK_SKEW_LIMIT_SECONDS + 1)
    second = make_daemon(tmp_path, clock)
    before = clock.now
    assert second.start() is None and clock.now == before


def test_same_host_owner_is_judged_by_its_pid_not_by_the_heartbeat(tmp_path):
    clock = FakeClock()
    here = pm.Identity.here()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        first = make_daemon(tmp_path, clock,
                            identity=pm.Identity(here.host, sleeper.pid, here.boot_id, here.pid_ns))
        first.start()
        # The recorded PID runs, but it is no daemon: the instance is free at once.
        assert make_daemon(tmp_path, clock).claim.live_owner() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_pid_now_of_a_later_daemon_does_not_hold_the_node(tmp_path):
    """The state file is two hours old; its PID now belongs to a daemon (of another instance)
    that started long after it: the node is free."""
    clock = FakeClock(time.time() - 7200)
    here = pm.Identity.here()
    named = ("import sys, time; sys.path.insert(0, sys.argv[1]); import perpetual_motion as pm;"
             " pm.set_process_name(pm.DAEMON_PROCESS_NAME); print(flush=True); time.sleep(60)")
    later = subprocess.Popen([sys.executable, "-c", named, str(pm.__file__).rsplit("/", 1)[0]],
                             stdout=subprocess.PIPE)
    try:
        later.stdout.readline()
        assert pm.pid_is_daemon(later.pid)
        first = make_daemon(tmp_path, clock,
                            identity=pm.Identity(here.host, later.pid, here.boot_id, here.pid_ns))
        first.start()
        clock.now = time.time()
        assert make_daemon(tmp_path, clock).claim.live_owner() is None
        # the daemon that wrote the state file itself is its owner
        state = tmp_path / "unit" / "nodes" / "node-0.state"
        record = pm.parse_fields(state.read_text())
        record["started"] = f"{time.time():.3f}"
        state.write_text(pm.format_fields(record))
        assert make_daemon(tmp_path, clock).claim.live_owner() is not None
    finally:
        later.kill()
        later.wait()


def test_recovery_finishes_a_half_done_move_and_fails_an_orphan_as_interrupted(tmp_path):
    clock = FakeClock()
    inst = tmp_path / "unit"
    folder = pm.QueueFolder(inst)
    folder.create("unit")
    half = pm.task_id_for("half.sh")
    orphan = pm.task_id_for("orphan.sh")
    for task_id in (half, orphan):
        (inst / "running" / task_id).write_text("true\n")
    (inst / "records" / f"{half}.result").write_text("id=x\nstate=done\n")
    (inst / "records" / f"{orphan}.run").write_text(f"started={clock.now - 10}\nattempt=1\n")
    daemon = make_daemon(tmp_path, clock)
    assert daemon.start() is None
    assert (inst / "done" / half).exists()
    assert (inst / "failed" / orphan).exists()
    result = pm.parse_fields((inst / "records" / f"{orphan}.result").read_text())
    assert (result["state"], result["reason"]) == ("interrupted", "daemon died")
    assert float(result["duration"]) == pytest.approx(10.0)


def dead_predecessor(inst: Path, task: str, last_beat: float, log_written: float | None,
                     where: dict[str, object]) -> None:
    """Node 0's daemon (``where``: its host, boot and PID namespace) ran ``task`` for 10 minutes
    and died at ``last_beat``: its state file was last replaced 4 s before its last beat (which
    the beat file holds); the task's log was last written at ``log_written`` (None: none)."""
    daemon = f"{last_beat - 3600:.3f}"
    run = inst / "records" / f"{task}.run"
    run.write_text(pm.format_fields({"id": task, **where, "node_rank": 0, "daemon": daemon,
                                     "started": f"{last_beat - 600:.3f}", "attempt": 1}))
    os.utime(run, (last_beat - 600, last_beat - 600))  # (the storage's clock is the daemon's)
    (inst / "running" / task).write_text("true\n")
    (inst / "nodes" / "node-0.state").write_text(pm.format_fields({
        "protocol": 2, "job_id": "unit", "node_rank": 0, **where, "pid": 2**22 + 7,
        "status": "running", "started": daemon, "heartbeat": f"{last_beat - 4:.3f}"}))
    (inst / "nodes" / "node-0.beat").write_text(pm.format_fields(
        {"started": daemon, "beat": 99, "time": f"{last_beat:.3f}"}).ljust(pm.BEAT_BYTES))
    if log_written is not None:
        log = inst / "logs" / f"{task}.log"
        log.write_text("[perpetual-motion] task: x\nepoch 7\n")
        os.utime(log, (log_written, log_written))


@pytest.mark.parametrize("log_after_beat, ended_after_beat", [
    (None, 0.0),  # no log: the last beat
    (-100.0, 0.0),  # a log last written before it: the last beat still
    (30.0, 30.0),  # the task wrote on after its daemon's last beat (until its fence)
])
def test_a_task_whose_daemon_died_ended_when_it_was_last_known_to_run(
        tmp_path, log_after_beat, ended_after_beat):
    """The daemon was killed (-9) and a daemon came back for the node 26 minutes later: the
    task it ran is recorded interrupted, ended when it was last known to run (the dead
    daemon's last beat, or its log's last write when later), not when it was found; and when
    it was found."""
    clock = FakeClock()
    inst = tmp_path / "unit"
    pm.QueueFolder(inst).create("unit")
    task = pm.task_id_for("lost.sh")
    last_beat = clock.now - 26 * 60
    dead_predecessor(inst, task, last_beat,
                     None if log_after_beat is None else last_beat + log_after_beat,
                     {"host": "elsewhere"})
    daemon = make_daemon(tmp_path, clock)
    assert daemon.start() is None  # (it watches the old heartbeat stand still, then takes over)
    res = pm.parse_fields((inst / "records" / f"{task}.result").read_text())
    assert (res["state"], res["reason"]) == ("interrupted", "daemon died")
    assert float(res["ended"]) == pytest.approx(last_beat + ended_after_beat, abs=0.01)
    assert float(res["duration"]) == pytest.approx(600 + ended_after_beat, abs=0.01)
    assert float(res["found"]) >= last_beat + 26 * 60  # when this daemon recorded it
    assert float(res["found"]) == pytest.approx(clock.now, abs=1)


def test_a_task_that_ran_on_until_the_next_daemon_ended_it_ended_then(tmp_path):
    """The daemon was killed (-9) but its task ran on here (the daemon was not PID 1 of its
    namespace, and its fence keeper had not fenced it yet): the next daemon of the node ends
    it at its start; the task ran until then, not only until its daemon's last beat."""
    clock = FakeClock()
    inst = tmp_path / "unit"
    pm.QueueFolder(inst).create("unit")
    task = pm.task_id_for("lost.sh")
    last_beat = clock.now - 30
    here = pm.Identity.here()
    dead_predecessor(inst, task, last_beat, None,
                     {"host": here.host, "boot_id": here.boot_id, "pid_ns": here.pid_ns})
    env = dict(os.environ, **{pm.MARKER_VAR: f"unit/{task}", "QUEUE_DIR": str(inst),
                              "PM_NODE_RANK": "0"})
    left = subprocess.Popen(["sleep", "300"], env=env, start_new_session=True)
    try:
        assert make_daemon(tmp_path, clock).start() is None  # (its owner is gone: at once)
        assert left.wait(5) is not None
    finally:
        if left.poll() is None:
            left.kill()
            left.wait()
    res = pm.parse_fields((inst / "records" / f"{task}.result").read_text())
    assert (res["state"], res["reason"]) == ("interrupted", "daemon died")
    assert float(res["ended"]) == pytest.approx(clock.now, abs=1)  # not its last beat's
    assert float(res["duration"]) == pytest.approx(630, abs=1)
    assert float(res["ended"]) <= float(res["found"]) == pytest.approx(clock.now, abs=1)
    assert os.listdir(inst / "running") == []


def test_a_full_disk_at_finish_is_retried_and_nothing_is_lost(tmp_path, monkeypatch):
    daemon, clock, inst = started_daemon(tmp_path)
    task = submit(inst, "t.sh", "true\n")
    real_publish = pm.QueueFolder.publish
    failures = {"left": 3}

    def flaky(self, target, text, **options):
        if target.name.endswith(".result") and failures["left"]:
            failures["left"] -= 1
            raise OSError(28, "No space left on device")
        return real_publish(self, target, text, **options)

    monkeypatch.setattr(pm.QueueFolder, "publish", flaky)
    run_until(daemon, clock, lambda: (inst / "done" / task).exists())
    assert failures["left"] == 0
    assert pm.parse_fields((inst / "records" / f"{task}.result").read_text())["state"] == "done"


def test_missing_cwd_and_non_executable_tasks_fail_with_a_reason(tmp_path):
    daemon, clock, inst = started_daemon(tmp_path)
    gone = submit(inst, "gone.sh", "true\n", cwd=str(tmp_path / "no-such-dir"))
    plain = submit(inst, "plain.bin", "true\n")
    run_until(daemon, clock, lambda: (inst / "failed" / plain).exists())
    assert (inst / "failed" / gone).exists()
    assert pm.parse_fields((inst / "records" / f"{gone}.result").read_text())["reason"] \
        == "missing-cwd"
    assert "not executable" in (inst / "logs" / f"{plain}.log").read_text()


def test_a_command_left_over_from_an_earlier_daemon_is_not_carried_out(tmp_path):
    clock = FakeClock()
    inst = tmp_path / "unit"
    pm.QueueFolder(inst).create("unit")
    (inst / "commands" / "old.cmd").write_text(
        f"action=shutdown\nsent={clock.now - 3600:.3f}\n")
    daemon = make_daemon(tmp_path, clock)
    daemon.start()
    daemon.tick()
    answer = pm.parse_fields((inst / "replies" / "old.reply").read_text())
    assert answer["result"] == "error" and "earlier daemon" in answer["message"]
    assert not daemon.stopping
    command(inst, "shutdown")
    daemon.tick()
    assert daemon.stopping


def test_a_command_addressed_to_another_daemon_start_is_not_carried_out(tmp_path):
    clock = FakeClock()
    inst = tmp_path / "unit"
    daemon = make_daemon(tmp_path, clock)
    daemon.start()
    state = pm.parse_fields((inst / "nodes" / "node-0.state").read_text())
    (inst / "commands" / "a.cmd").write_text(
        f"action=shutdown\nsent={clock.now:.3f}\ndaemon_started=1700000000.000\n")
    daemon.tick()
    assert pm.parse_fields((inst / "replies" / "a.reply").read_text())["result"] == "error"
    assert not daemon.stopping
    (inst / "commands" / "b.cmd").write_text(
        f"action=shutdown\nsent={clock.now:.3f}\ndaemon_started={state['started']}\n")
    daemon.tick()
    assert pm.parse_fields((inst / "replies" / "b.reply").read_text())["result"] == "accepted"
    assert daemon.stopping


# What a careful review found ####################################################################


def test_a_task_killed_by_a_real_time_signal_is_recorded(tmp_path):
    daemon, clock, inst = started_daemon(tmp_path)
    rt = submit(inst, "rt.sh", "kill -40 $$\n")
    after = submit(inst, "after.sh", "true\n")
    run_until(daemon, clock, lambda: (inst / "done" / after).exists())
    result = pm.parse_fields((inst / "records" / f"{rt}.result").read_text())
    assert (result["state"], result["signal"]) == ("failed", "40")
    assert "killed by signal 40 (SIG" in (inst / "logs" / f"{rt}.log").read_text()


def test_a_log_that_cannot_be_opened_fails_its_task_and_the_queue_goes_on(tmp_path):
    daemon, clock, inst = started_daemon(tmp_path)
    blocked = submit(inst, "blocked.sh", "true\n", priority=1)
    (inst / "logs" / f"{blocked}.log").mkdir()
    after = submit(inst, "after.sh", "true\n")
    run_until(daemon, clock, lambda: (inst / "done" / after).exists())
    assert (inst / "failed" / blocked).exists()
    result = pm.parse_fields((inst / "records" / f"{blocked}.result").read_text())
    assert result["reason"].startswith("cannot open its log")


def test_an_unlistable_commands_folder_does_not_stop_the_queue_or_the_heartbeat(tmp_path):
    daemon, clock, inst = started_daemon(tmp_path)
    (inst / "commands").rmdir()
    (inst / "commands").write_text("not a folder\n")
    task = submit(inst, "t.sh", "true\n")
    run_until(daemon, clock, lambda: (inst / "done" / task).exists())
    clock.sleep(pm.HEARTBEAT_SECONDS + 1)
    daemon.tick()
    state = pm.parse_fields((inst / "nodes" / "node-0.state").read_text())
    assert float(state["heartbeat"]) == pytest.approx(clock.now, abs=0.5)


def test_a_finished_task_renamed_back_into_pending_runs_under_a_new_id(tmp_path):
    daemon, clock, inst = started_daemon(tmp_path)
    out = tmp_path / "runs"
    first = submit(inst, "again.sh", f"echo run >> '{out}'; exit 1\n")
    run_until(daemon, clock, lambda: (inst / "failed" / first).exists())
    os.rename(inst / "failed" / first, inst / "pending" / first)
    run_until(daemon, clock, lambda: os.listdir(inst / "failed") not in ([], [first]))
    [second] = os.listdir(inst / "failed")
    assert second.endswith("-again.sh") and second.startswith("500-")
    assert out.read_text() == "run\nrun\n"
    assert pm.parse_fields((inst / "records" / f"{first}.result").read_text())["started"] != \
        pm.parse_fields((inst / "records" / f"{second}.result").read_text())["started"]


def test_a_stale_result_does_not_hide_an_interrupted_run_at_recovery(tmp_path):
    clock = FakeClock()
    inst = tmp_path / "unit"
    pm.QueueFolder(inst).create("unit")
    task = pm.task_id_for("x.sh")
    (inst / "running" / task).write_text("true\n")
    (inst / "records" / f"{task}.result").write_text("state=done\nstarted=100.000\n")
    (inst / "records" / f"{task}.run").write_text("started=200.000\n")
    make_daemon(tmp_path, clock).start()
    assert (inst / "failed" / task).exists()
    assert pm.parse_fields((inst / "records" / f"{task}.result").read_text())["state"] \
        == "interrupted"


class SignalDuringRelease(pm.KeepAlive):
    """A keep-alive whose release takes long enough for a SIGTERM to arrive."""

    def __init__(self, waiter):
        super().__init__()
        self.waiter = waiter

    def release(self, gpus) -> None:
        self.waiter.received.append(15)

    def released(self, gpus) -> bool:
        return False


def test_a_shutdown_during_the_release_leaves_the_task_pending(tmp_path):
    clock = FakeClock()
    waiter = type("Waiter", (), {"received": []})()
    config = pm.Config(job_id="unit", queue_root=tmp_path, poll_interval=0.1, keepalive=False,
                       kill_scope="none")
    daemon = pm.Daemon(config, SignalDuringRelease(waiter), clock=clock, sleep=clock.sleep)
    daemon.waiter = waiter
    daemon.start()
    task = submit(tmp_path / "unit", "t.sh", "true\n")
    daemon.tick()  # claimed; keep-alive frees the GPUs, and a SIGTERM comes meanwhile
    assert (tmp_path / "unit" / "running" / task).exists()
    daemon.tick()
    assert daemon.stopping and (tmp_path / "unit" / "pending" / task).exists()
    daemon.tick()
    assert daemon.finished


def test_a_command_is_carried_out_once_even_if_its_reply_cannot_be_written(tmp_path,
                                                                          monkeypatch):
    daemon, clock, inst = started_daemon(tmp_path)
    first = command(inst, "stop_all")
    second = command(inst, "stop", "500-nope")
    real_publish = pm.QueueFolder.publish
    failures = {"left": 2}

    def flaky(self, target, text, **options):
        if target.name == f"{first}.reply" and failures["left"]:
            failures["left"] -= 1
            raise OSError(28, "No space left on device")
        return real_publish(self, target, text, **options)

    monkeypatch.setattr(pm.QueueFolder, "publish", flaky)
    executed = []
    real_execute = daemon.commands.execute
    monkeypatch.setattr(daemon.commands, "execute", lambda f: executed.append(f["action"])
                        or real_execute(f))
    daemon.tick()
    assert (inst / "replies" / f"{second}.reply").exists()  # not blocked by the first
    daemon.tick()
    daemon.tick()
    assert (inst / "replies" / f"{first}.reply").exists()
    assert executed == ["stop_all", "stop"]


def test_an_entry_that_cannot_be_claimed_does_not_block_the_queue(tmp_path, monkeypatch):
    daemon, clock, inst = started_daemon(tmp_path)
    stuck = submit(inst, "stuck.sh", "true\n", priority=1)
    claim = daemon.runner.folder.claim

    def refuse(name: str) -> str:  # its rename fails (a file system that refuses it)
        if name == stuck:
            raise PermissionError(errno.EACCES, "Permission denied")
        return claim(name)

    monkeypatch.setattr(daemon.runner.folder, "claim", refuse)
    after = submit(inst, "after.sh", "true\n")
    run_until(daemon, clock, lambda: (inst / "done" / after).exists())
    assert (inst / "pending" / stuck).exists()


def test_kill_python_spares_keepalive_workers_by_pid_and_by_environment():
    plain = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                              env=dict(os.environ, PERPETUAL_MOTION_WORKER="GPU-x"))
    try:
        time.sleep(0.2)
        listed = pm.python_pids_to_kill("unit", "user-python")  # listed only, never killed
        assert plain.pid in listed and worker.pid not in listed
        assert plain.pid not in pm.python_pids_to_kill("unit", "user-python",
                                                       spare={plain.pid})
        assert pm.python_pids_to_kill("unit", "none") == []
    finally:
        for proc in (plain, worker):
            proc.kill()
            proc.wait()


def rival_state(inst: Path, started: float, now: float) -> str:
    text = (f"status=running\nhost=other-host\npid=77\nstarted={started:.3f}\n"
            f"started_at=then\nheartbeat={now:.3f}\n")
    (inst / "nodes" / "node-0.state").write_text(text)
    return text


def test_a_daemon_that_finds_another_claim_in_its_state_file_yields_within_one_poll(tmp_path):
    """Two daemons for one node (started at once, or one taken for dead and replaced): the one
    whose claim is in the state file keeps the node, whichever started first."""
    for offset in (-1, +1):
        root = tmp_path / f"case{offset}"
        daemon, clock, inst = started_daemon(root)
        gate = root / "gate"
        task = submit(inst, "t.sh", f"while [ ! -e '{gate}' ]; do sleep 0.05; done\n")
        run_until(daemon, clock, lambda d=daemon: d.runner.tasks)
        text = rival_state(inst, daemon.started + offset, clock.now)
        queued = submit(inst, "queued.sh", "true\n")
        daemon.tick()  # one poll: the claim before it reads the state file
        assert daemon.displaced and daemon.stopping == "another daemon holds this instance"
        assert (inst / "pending" / queued).exists()  # nothing more is claimed
        run_until(daemon, clock, lambda d=daemon: d.finished)
        daemon.close()
        assert (inst / "nodes" / "node-0.state").read_text() == text  # left to the other
        assert (inst / "running" / task).exists()  # its end is the owner's to record
        assert not (inst / "records" / f"{task}.result").exists()


def test_the_state_file_names_the_gang_a_gpu_is_set_aside_for():
    gangs = pm.Gangs.__new__(pm.Gangs)
    plan = pm.GangPlan("500-20270101_000000_000000001-00000001-g.sh", (0, 1), 1, "p")
    gangs.seats = {plan.task_id: pm.GangSeat(plan, 0, pm.Submission(), reserved=(2,))}
    assert gangs.reservations() == {2: plan.task_id}


@pytest.mark.parametrize("rank_0_found, found", [(None, None), (205.0, 210.0)])
def test_a_gang_is_found_ended_only_when_no_daemon_saw_any_of_its_ranks_end(rank_0_found, found):
    """Both nodes of a gang died: its end is when its ranks last ran, found when the last of
    them was. One rank whose end its daemon saw (stopped, say) makes the gang's end seen."""
    gangs = pm.Gangs.__new__(pm.Gangs)
    results: list[pm.TaskResult] = []
    gangs.runner = types.SimpleNamespace(finish=results.append)
    gangs.folder = types.SimpleNamespace(stop_reason=lambda task_id: None)
    gangs.plans, gangs.clock = {}, lambda: 300.0
    plan = pm.GangPlan("500-20270101_000000_000000001-00000001-g.sh", (1, 2), 1, "p")
    ends = {0: {"state": "interrupted", "reason": "node 1's daemon died", "started": "100",
                "ended": "150", "found": "" if rank_0_found is None else str(rank_0_found)},
            1: {"state": "interrupted", "reason": "node 2's daemon died", "started": "101",
                "ended": "160", "found": "210"}}
    if rank_0_found is None:
        ends[0].update(state="stopped", reason="rank 1 lost: node 2's daemon died")
    gangs._finish_gang(plan, ends)
    [res] = results
    assert (res.state, res.started, res.ended, res.found) == (
        pm.TaskState.INTERRUPTED, 100.0, 160.0, found)
    assert ("found" in res.fields()) is (found is not None)

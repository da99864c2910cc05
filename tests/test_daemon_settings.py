"""Settings with one owner each: the kill scope is resolved once, in the daemon's Config, and
what the state file and the stop sweep use is that; one throttle says when a repeated warning is
said again, for the daemon's log and keep-alive's alike. In simulated time."""

from __future__ import annotations

import logging

import pytest
from conftest import FakeClock

import perpetual_motion as pm

CLUSTER_VARIABLES = ("SLURM_JOB_ID", "ECP_JOB_NAME", "SENSECORE_PYTORCH_NNODES", "PM_CLUSTER_JOB")


@pytest.mark.parametrize("cluster, scope, resolved", [
    (False, "auto", "task"),
    (True, "auto", "user-python"),
    (True, "task", "task"),
    (False, "user-python", "user-python"),
    (True, "none", "none"),
])
def test_the_kill_scope_is_resolved_once_in_the_config(monkeypatch, tmp_path, cluster, scope,
                                                         resolved):
    for name in CLUSTER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    if cluster:
        monkeypatch.setenv("PM_CLUSTER_JOB", "slurm")
    config = pm.Config(job_id="unit", queue_root=tmp_path, kill_scope=scope, keepalive=False)
    assert config.kill_scope == resolved
    monkeypatch.delenv("PM_CLUSTER_JOB", raising=False)  # a later look changes nothing
    again = pm.dataclasses.replace(config, poll_interval=0.2)
    assert again.kill_scope == resolved
    if resolved == "user-python":
        return  # a daemon that may end the user's Python processes runs in a PID namespace only
    clock = FakeClock()
    daemon = pm.Daemon(config, clock=clock, sleep=clock.sleep)
    assert not hasattr(daemon, "kill_scope")  # no second copy to drift
    assert daemon.start() is None
    state = pm.parse_fields((tmp_path / "unit" / "nodes" / "node-0.state").read_text())
    assert state["kill_scope"] == daemon.config.kill_scope


def test_a_repeated_warning_is_said_once_per_period_per_key():
    clock = FakeClock(1000.0)
    throttle = pm.Throttle(60.0, clock)
    assert throttle("a") and not throttle("a") and throttle("b")
    clock.sleep(59.9)
    assert not throttle("a")
    clock.sleep(0.1)
    assert throttle("a") and not throttle("a")
    assert not throttle("b", every=600.0)
    clock.sleep(600.0)
    assert throttle("b", every=600.0)
    assert throttle("c", once=True)
    clock.sleep(10 ** 6)
    assert not throttle("c", once=True)


def test_the_log_and_keepalive_share_one_throttle(caplog):
    clock = FakeClock(1000.0)
    log = pm.ThrottledLog(clock)
    assert isinstance(log.throttle, pm.Throttle)
    assert log.throttle.every == pm.WARNING_REPEAT_SECONDS
    with caplog.at_level(logging.WARNING, logger=pm.LOG.name):
        for _ in range(3):
            log.warning("disk", "cannot write: %s", "full")
            clock.sleep(pm.WARNING_REPEAT_SECONDS / 2)
    assert [r.getMessage() for r in caplog.records] == ["cannot write: full"] * 2
    assert not hasattr(pm, "_Throttle")  # keep-alive's warnings go through the same class


@pytest.mark.parametrize("gpus", ["99999999999999999999", "1025", "0,1,1024"])
def test_a_gpu_count_or_number_past_what_a_node_can_have_is_refused(tmp_path, gpus):
    """``--gpus 99999999999999999999`` (a count pasted twice, say) would declare that many
    slots: the daemon never came up, and took the machine's memory trying."""
    args = pm.parse_args(["--job-id", "unit", "--queue-root", str(tmp_path), "--gpus", gpus])
    message = pm.config_from_args(args)
    assert isinstance(message, str) and "--gpus" in message and "1024" in message
    assert not (tmp_path / "unit").exists()


@pytest.mark.parametrize("gpus, parsed", [("0", 0), ("1024", 1024), ("0,2,1023", (0, 2, 1023))])
def test_gpu_counts_and_numbers_a_node_can_have_are_taken(gpus, parsed):
    assert pm.parse_gpu_list(gpus) == parsed


def test_keepalive_switched_off_is_said_once_at_start(tmp_path, caplog):
    """--no-keepalive logged 'Keep-alive off: disabled' and then 'Keep-alive: off: disabled'."""
    clock = FakeClock()
    config = pm.Config(job_id="unit", queue_root=tmp_path, keepalive=False, kill_scope="task")
    with caplog.at_level(logging.INFO, logger=pm.LOG.name):
        # as main() does: the engine first, then the daemon with it
        keepalive = pm.make_keepalive(config.keepalive, pm.LOG, pm.Inventory.declare([]))
        daemon = pm.Daemon(config, clock=clock, sleep=clock.sleep, keepalive=keepalive)
        assert daemon.start() is None
    said = [r.getMessage() for r in caplog.records if "eep-alive" in r.getMessage()]
    assert said == ["Keep-alive: off: disabled"]

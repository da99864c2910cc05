"""The liveness times are one fact: the daemon publishes them in its node state file
(``liveness.late_after``, ``liveness.stale_after``), and the client (bash and zsh) and submit.sh
judge a daemon by them; a state file without them, or with values that are not sane, gets the
defaults."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from client_helpers import SHELLS, Shell, build_sample, make_instance, make_shell
from conftest import REPO, FakeClock

import perpetual_motion as pm


@pytest.fixture(params=SHELLS)
def sh(request, tmp_path) -> Shell:
    return make_shell(request.param, tmp_path)


def daemon_line(sh: Shell) -> str:
    res = sh.run("gpu_status")
    assert res.rc == 0, res.err
    return res.out.splitlines()[1]


def test_the_client_judges_by_the_times_a_daemon_publishes(sh, monkeypatch):
    """A daemon whose constants were edited: the client calls it late and dead by its times,
    not by the defaults (15 s and 60 s)."""
    monkeypatch.setattr(pm, "HEARTBEAT_LATE_SECONDS", 100.0)
    monkeypatch.setattr(pm, "HEARTBEAT_STALE_SECONDS", 300.0)
    clock = FakeClock(time.time() - 200)
    config = pm.Config(job_id="exp1", queue_root=sh.root, poll_interval=0.1, hours=10.0,
                       keepalive=False, kill_scope="none")
    here = pm.Identity.here()
    daemon = pm.Daemon(config, clock=clock, sleep=clock.sleep,
                       identity=pm.Identity("elsewhere", here.pid, here.boot_id, here.pid_ns),
                       inventory=pm.Inventory.declare([0]))
    assert daemon.start() is None
    fields = pm.parse_fields((sh.root / "exp1" / "nodes" / "node-0.state").read_text())
    assert (fields["liveness.late_after"], fields["liveness.stale_after"]) == ("100", "300")
    beat = sh.root / "exp1" / "nodes" / "node-0.beat"

    def written(age: float) -> None:
        clock.now = time.time() - age
        daemon.write_state(force=True)
        beat.unlink()  # the state file's heartbeat alone

    written(200)  # the defaults would call it dead
    assert re.fullmatch(r"Daemon:   NOT RESPONDING on elsewhere, pid \d+: its heartbeat is "
                        r"3m2\ds old", daemon_line(sh))
    written(50)  # the defaults would call it not responding
    assert re.fullmatch(r"Daemon:   alive on elsewhere, pid \d+", daemon_line(sh))
    written(400)
    assert re.fullmatch(r"Daemon:   DEAD on elsewhere, pid \d+: no heartbeat for 6m4\ds",
                        daemon_line(sh))


LATE = r"Daemon:   NOT RESPONDING on node-a, pid 4242: its heartbeat is 2\ds old"


@pytest.mark.parametrize("late, stale, expected", [
    (None, None, LATE),  # a daemon from before the times: the defaults
    ("30", "120", r"Daemon:   alive on node-a, pid 4242"),
    ("5", "18.5", r"Daemon:   DEAD on node-a, pid 4242: no heartbeat for 2\ds"),
    ("abc", "60", LATE),
    ("0", "60", LATE),
    ("-5", "60", LATE),
    ("1e9", "60", LATE),
    ("99999999", "999999999", LATE),
    ("1.5.2", "60", LATE),
    (".5", "60", LATE),
    ("30", "", LATE),
    ("30", "30", LATE),  # never dead before late
    ("30 ", "120", LATE),
])
def test_a_state_without_sane_times_gets_the_defaults(sh, late, stale, expected):
    s = build_sample(sh.root)
    state = s.inst / "nodes" / "node-0.state"
    text = re.sub(r"^heartbeat=.*$", f"heartbeat={s.now - 20:.3f}", state.read_text(), flags=re.M)
    if late is not None:
        text += f"liveness.late_after={late}\nliveness.stale_after={stale}\n"
    state.write_text(text)
    assert re.fullmatch(expected, daemon_line(sh))


# submit.sh ######################################################################################


def launch(tmp_path: Path, age: float, stale: str | None) -> subprocess.CompletedProcess:
    """submit.sh --dry-run for an instance whose node 0 beat ``age`` s ago."""
    root = tmp_path / "root"
    inst = make_instance(root)
    text = (f"protocol=2\njob_id=exp1\nnode_rank=0\nhost=elsewhere\npid=4242\nstatus=running\n"
            f"heartbeat={time.time() - age:.3f}\n")
    if stale is not None:
        text += f"liveness.late_after=15\nliveness.stale_after={stale}\n"
    (inst / "nodes" / "node-0.state").write_text(text)
    conf = tmp_path / "empty.conf"
    conf.touch()
    env = {k: v for k, v in os.environ.items() if k != "JOB_ID"}
    env.update(QUEUE_ROOT=str(root), SUBMIT_CONF=str(conf), PYTHON=sys.executable)
    return subprocess.run([str(REPO / "submit.sh"), "--backend", "local", "--dry-run", "exp1"],
                          env=env, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("age, stale, alive", [
    (120, "300", True),  # the default would take it for dead
    (30, "10", False),  # the default would take it for alive
    (30, None, True),  # a daemon from before the times: 60 s
    (90, None, False),
    (30, "abc", True),
    (30, "0", True),
    (30, "1e3", True),
    (30, "9999999", True),
])
def test_submit_refuses_a_live_daemon_by_its_published_time(tmp_path, age, stale, alive):
    run = launch(tmp_path, age, stale)
    if alive:
        assert run.returncode == 3, run.stderr
        assert "a daemon of exp1 is alive" in run.stderr
    else:
        assert run.returncode == 0, run.stderr
        assert "is alive" not in run.stderr

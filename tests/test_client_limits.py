"""The client refuses at once, with the limit in its message, what the daemon would refuse or
fail later: variables the daemon reserves, more variables than a record may hold, time limits
that are no times, and task names longer than a file name allows. Nothing is written then."""

from __future__ import annotations

import time

import pytest
from client_helpers import SHELLS, Shell, build_v2, make_shell, submitted_id, tree
from conftest import read_fields

import perpetual_motion as pm


@pytest.fixture(params=SHELLS)
def sh(request, tmp_path) -> Shell:
    return make_shell(request.param, tmp_path)


def test_every_variable_the_daemon_reserves_is_refused_by_the_client(sh):
    build_v2(sh.root)
    before = tree(sh.root)
    for name in sorted(pm.RESERVED_VARS):
        res = sh.run(f"gpu_run -e {name}=x echo; echo \"rc=$?\"")
        assert (res.out, res.err) == (
            "rc=2\n", f"gpu_run: -e {name}: the daemon sets it for every task (GPUs: -g)\n"), name
    assert tree(sh.root) == before
    assert "PERPETUAL_MOTION_CALLBACK" in pm.RESERVED_VARS
    with pytest.raises(ValueError, match="env.0 is not NAME=VALUE"):
        pm.Submission.from_fields({"envc": "1", "env.0": "PERPETUAL_MOTION_CALLBACK=x"})


def test_more_variables_than_a_record_holds_are_refused_at_once(sh):
    v = build_v2(sh.root)
    before = tree(sh.root)
    options = " ".join(f"-e V{i}=x" for i in range(pm.MAX_TASK_ARGS + 1))
    began = time.monotonic()
    res = sh.run(f"gpu_run {options} echo; echo \"rc=$?\"")
    assert time.monotonic() - began < 10
    assert (res.out, res.err) == ("rc=2\n", "gpu_run: -e: at most 4096 variables, not 4097\n")
    assert tree(sh.root) == before
    options = " ".join(f"-e V{i}=x" for i in range(50))
    task = submitted_id(sh.run(f"gpu_run {options} echo"))
    assert read_fields(v.inst / "records" / f"{task}.submit")["envc"] == "50"


@pytest.mark.parametrize("bad", ["1:99:99", "1h1h", "1:60:00", "99:60", "1h90m", "1m1h",
                                 "1d24h", "1-24", "1-1:60", "2-25:00:00"])
def test_time_limits_that_are_no_times_are_refused(sh, bad):
    build_v2(sh.root)
    before = tree(sh.root)
    res = sh.run(f"gpu_run -t {bad} echo; echo \"rc=$?\"")
    assert res.out == "rc=2\n" and res.err.startswith(
        "gpu_run: -t wants a time limit from 1s to 365d, such as 90s, 30m, 2h, 1d12h or "
        "1:30:00 (H:M:S), or none, not "), (bad, res.err)
    assert tree(sh.root) == before


def test_time_limits_in_every_form_are_still_read(sh):
    v = build_v2(sh.root)
    for limit, seconds in (("90m", 5400), ("1d23h59m59s", 172799), ("99:59", 5999),
                           ("100:59:59", 363599), ("1-23", 169200), ("1-23:59", 172740),
                           ("1-23:59:59", 172799), ("2h30s", 7230)):
        task = submitted_id(sh.run(f"gpu_run -t {limit} echo"))
        assert read_fields(v.inst / "records" / f"{task}.submit")["time_limit"] == str(seconds)


def test_a_task_name_longer_than_a_file_name_allows_is_refused_with_the_limit(sh):
    build_v2(sh.root)
    name = "n" * 255
    for command in ("gpu_stop", "gpu_show", "gpu_wait", "gpu_logs", "gpu_tail"):
        res = sh.run(f"{command} {name}; echo \"rc=$?\"")
        assert res.out == "rc=2\n", (command, res.out, res.err)
        assert res.err == f"{command}: a task name has at most 240 bytes (a file name, with " \
                          f".submit, has at most 255): {name}\n", command


def test_a_state_file_or_record_larger_than_4_mib_is_corrupt_and_never_read(sh):
    """docs/protocol.md: a record, command or state file over MAX_RECORD_BYTES (4 MiB) is
    corrupt. A sparse file of a TiB (no disk used) would take the client hours to read: it is
    skipped at once, and gpu_status says so for a node's state file."""
    v = build_v2(sh.root)
    for path in (v.inst / "nodes" / "node-1.state", v.inst / "records" / f"{v.c}.submit"):
        with open(path, "r+b") as f:
            f.truncate(1 << 40)  # its lines, then NUL bytes up to a TiB
    started = time.monotonic()
    res = sh.run("gpu_list; gpu_list --json > /dev/null; gpu_status; gpu_status --json > /dev/null;"
                 " gpu_show big.py; gpu_use exp1", timeout=60)
    assert res.rc == 0, res.err
    assert time.monotonic() - started < 30
    assert "Node 1:   its state file nodes/node-1.state is larger than 4 MiB: corrupt, not read\n" \
        in res.out, res.out
    assert "Node 0:   alive on node-a, pid 100\n" in res.out, res.out
    assert f"Task:       {v.c}\n" in res.out, res.out  # shown by what its id says

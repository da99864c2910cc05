"""The summary of finished tasks that node 0's daemon keeps (docs/protocol.md, The summary):
the client reads a few small files however long the history is, and a summary that is lost or
out of date never hides a task, since the folders stay the truth."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from client_helpers import SHELL_ARGV, SHELLS, Shell, shell_env, submitted_id, wait_finished
from conftest import REPO, needs_namespace, read_fields, wait_for

import perpetual_motion as pm

sys.path.insert(0, str(REPO / "bench"))
from status_bench import build_instance, summarise, task_id  # noqa: E402

needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
COMMANDS = ("gpu_status", "gpu_status --json", "gpu_logs", "gpu_show {name}", "gpu_tail {name}")


@pytest.fixture(scope="module")
def histories(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("histories") / "queue root"
    build_instance(root, "big", 10_000, distinct=100)
    build_instance(root, "small", 10, distinct=10)  # the same running and pending tasks
    summarise(root / "big")
    summarise(root / "small")
    return root


def work(shell: str, env: dict[str, str], script: str, trace: Path) -> tuple[int, int, int]:
    """What ``script`` costs in ``shell``: processes started, and files opened and directory
    reads (getdents64 calls) in the queue folder, counted by strace."""
    argv = ["strace", "-f", "-qq", "-y", "-e", "trace=openat,getdents64,execve", "-o", str(trace),
            *SHELL_ARGV[shell], f"source \"$CLIENT\"; {script} >/dev/null 2>&1; true"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    root = env["QUEUE_ROOT"]
    lines = trace.read_text().splitlines()
    pids = {line.split()[0] for line in lines}
    opened = sum(1 for line in lines if "openat(" in line and root in line and "= -1" not in line)
    listed = sum(1 for line in lines if "getdents64(" in line and root in line)
    return len(pids), opened, listed


@needs_strace
@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("command", COMMANDS)
def test_reading_commands_cost_the_same_over_10000_finished_tasks_as_over_10(
        shell, command, histories, tmp_path):
    """Each reading command starts as many processes, opens as many files and reads directories
    as often over 10,000 finished tasks as over 10 (the seconds are bench/status_bench.py's)."""
    big = work(shell, shell_env(histories, "big", tmp_path), command.format(name="task9995"),
               tmp_path / "big.trace")
    small = work(shell, shell_env(histories, "small", tmp_path), command.format(name="task5"),
                 tmp_path / "small.trace")
    assert big == small, (big, small)


@needs_strace
@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("command", ("gpu_list", "gpu_list --json", "gpu_use exp1"))
def test_the_list_of_instances_costs_the_same_over_10000_finished_tasks_as_over_10(
        shell, command, tmp_path_factory, tmp_path):
    """gpu_list and gpu_use count an instance's finished tasks from its summary while that
    holds."""
    costs = []
    for finished in (10_000, 10):
        root = tmp_path_factory.mktemp(f"list{finished}") / "queue root"
        build_instance(root, "exp1", finished, distinct=10)
        summarise(root / "exp1")
        costs.append(work(shell, shell_env(root, "exp1", tmp_path), command,
                          tmp_path / f"{finished}.trace"))
    assert costs[0] == costs[1], costs


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tables") / "queue root"
    build_instance(root, "short", 1, pending=1)  # 3 rows: running, pending, ended
    build_instance(root, "long", 40, pending=25)  # 31 rows: 20 of the pending, 10 ended
    for name in ("short", "long"):
        summarise(root / name)
    return root


@needs_strace
@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("command", ("gpu_status", "gpu_status --json", "gpu_status -l"))
def test_status_starts_as_many_processes_for_31_rows_as_for_3(shell, command, tables, tmp_path):
    """gpu_status reads the records of all the rows it shows at once and formats them in the
    shell: no process (not even a subshell) per row."""
    def processes(job_id: str) -> int:
        trace = tmp_path / f"{job_id}.trace"
        argv = ["strace", "-f", "-qq", "-e", "trace=%process", "-o", str(trace),
                *SHELL_ARGV[shell], f"source \"$CLIENT\"; {command} >/dev/null 2>&1; true"]
        proc = subprocess.run(argv, env=shell_env(tables, job_id, tmp_path), capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return len({line.split()[0] for line in trace.read_text().splitlines()})

    assert processes("long") == processes("short")


@needs_strace
@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("command", ("gpu_status", "gpu_status --json", "gpu_status -l"))
def test_status_leaves_every_file_of_a_row_to_stat_and_awk(shell, command, tables, tmp_path):
    """The shell itself looks at no file of a task (its records, held/, priority/, its log):
    stat and awk take those of all the rows at once, so a long queue costs the shell no work a
    task (gpu_status --json took about 0.5 ms a pending task, 10 s and more for 5,000)."""
    def looks(job_id: str) -> int:
        trace = tmp_path / f"{job_id}.trace"
        argv = ["strace", "-f", "-qq", "-e", "trace=execve,%%stat,access,faccessat,faccessat2,"
                "open,openat", "-o", str(trace),
                *SHELL_ARGV[shell], f"source \"$CLIENT\"; {command} >/dev/null 2>&1; true"]
        proc = subprocess.run(argv, env=shell_env(tables, job_id, tmp_path), capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        others, count = set(), 0  # the processes that run another program (stat, awk, ...)
        for line in trace.read_text().splitlines():
            pid, call = line.split(None, 1)
            if call.startswith("execve("):
                if "= 0" in call and not re.match(r'execve\("[^"]*/(bash|zsh)"', call):
                    others.add(pid)
            elif pid not in others and re.search(r"/(records|logs|held|priority)/", call):
                count += 1
        return count

    assert looks("long") == looks("short") == 0


def test_the_summary_counts_the_finished_tasks_and_names_them(tmp_path):
    inst = tmp_path / "root" / "exp1"
    build_instance(inst.parent, "exp1", 30)
    named = task_id(7, "task7.sh")
    (inst / "records" / f"{named}.submit").write_text(f"id={named}\ndisplay_name=my run\n")
    history = pm.History(pm.QueueFolder(inst), clock=lambda: time.time() + 10)
    assert history.refresh()
    summary = read_fields(inst / "summary")
    assert (summary["done"], summary["failed"], summary["logs"]) == ("27", "3", "30")
    assert summary["ended_count"] == "30"
    assert summary["ended.0"] == f"failed/{task_id(29, 'task29.sh')}"
    assert summary["ended.1"] == f"done/{task_id(28, 'task28.sh')}"
    for folder in ("done", "failed", "logs", "names"):
        ns = os.stat(inst / folder).st_mtime_ns
        assert summary[f"{folder}_mtime"] == f"{ns // 10**9}.{ns % 10**9:09d}"
    # by the name, the name without its extension and the --name, in the bucket of the last two
    # bytes of the name without its extension
    five = task_id(5, "task5.sh")
    assert (inst / "names" / "k5").read_text() == f"task5/done/{five}\ntask5.sh/done/{five}\n"
    assert f"my run/done/{named}\n" in (inst / "names" / "un").read_text()
    assert not history.refresh()  # nothing changed: nothing listed, nothing written
    # a task removed (gpu_clean) leaves the summary and its bucket
    for path in (inst / "done" / five, inst / "logs" / f"{five}.log"):
        path.unlink()
    assert history.refresh()
    summary = read_fields(inst / "summary")
    assert (summary["done"], summary["logs"]) == ("26", "29")
    assert not (inst / "names" / "k5").exists()


def test_a_folder_that_just_changed_is_not_vouched_for(tmp_path):
    """A change in the same clock tick as the listing would leave the folder's time as it was:
    the summary then publishes no times (readers list the folders), and lists them again."""
    inst = tmp_path / "root" / "exp1"
    build_instance(inst.parent, "exp1", 5)
    os.utime(inst / "done")
    changed = os.stat(inst / "done").st_mtime
    history = pm.History(pm.QueueFolder(inst), clock=lambda: changed + 0.001)
    assert history.refresh()
    assert read_fields(inst / "summary")["done_mtime"] == ""
    history.clock = lambda: changed + 5
    assert history.refresh()  # listed again, though no time changed
    assert read_fields(inst / "summary")["done_mtime"] != ""


def late_task(inst: Path, name: str) -> str:
    """A task that ended after the summary was written, put into failed/ by hand."""
    tid = task_id(99_999, name)
    (inst / "failed" / tid).write_text("exit 3\n")
    (inst / "logs" / f"{tid}.log").write_text(f"[perpetual-motion] task: {tid}\nlate line\n")
    (inst / "records" / f"{tid}.result").write_text(
        f"id={tid}\nstate=failed\nexit_code=3\nreason=exit status\nended={time.time():.3f}\n")
    return tid


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("lost", ["stale", "no summary", "no bucket"])
def test_a_stale_or_lost_summary_never_hides_a_task(shell, lost, tmp_path):
    root = tmp_path / "root"
    inst = root / "exp1"
    build_instance(root, "exp1", 40, distinct=40)
    summarise(inst)
    sh = Shell(shell, root, tmp_path, tmp_path)
    if lost == "stale":
        tid = late_task(inst, "late.sh")
    elif lost == "no summary":
        tid = late_task(inst, "late.sh")
        (inst / "summary").unlink()
    else:  # the summary is current, but a bucket of names/ was removed by hand
        tid = task_id(12, "task12.sh")
        (inst / "names" / "12").unlink()
    name = tid.split("-", 3)[3].removesuffix(".sh")
    status = sh.run("gpu_status")
    assert status.rc == 0, status.err
    if lost != "no bucket":
        assert re.search(rf"^{name}.sh +500 failed ", status.out, re.M), status.out
        assert "Totals:   1 running, 20 pending, 36 done, 5 failed" in status.out
        assert '"failed": 5' in sh.run("gpu_status --json").out
        assert tid in sh.run("gpu_logs").out.splitlines()[1]  # the newest log
    show = sh.run(f"gpu_show {name}")
    assert show.rc == 0, show.err
    assert show.out.startswith(f"Task:       {tid}\n")
    assert f"Log:        {inst}/logs/{tid}.log\n" in show.out
    tail = sh.run(f"gpu_tail {name}")
    assert tid in tail.out
    assert sh.run(f"gpu_logs {name}").out.startswith(f"[perpetual-motion] task: {tid}\n")


@needs_namespace
@pytest.mark.parametrize("shell", SHELLS)
def test_the_daemon_keeps_the_summary_as_tasks_end(shell, tmp_path, start_daemon):
    root = tmp_path / "root"
    root.mkdir()
    sh = Shell(shell, root, tmp_path, tmp_path)
    start_daemon(root, "exp1")
    inst = root / "exp1"
    for command in ("gpu_run --name first-run 'echo one'", "gpu_run 'echo two; exit 4'"):
        wait_finished(inst, submitted_id(sh.run(command)))

    def summarised():
        try:
            fields = read_fields(inst / "summary")
        except FileNotFoundError:
            return None
        return fields if (fields.get("done"), fields.get("failed")) == ("1", "1") \
            and fields.get("done_mtime") else None
    summary = wait_for(summarised, 20, what="the summary of two ended tasks")
    assert summary["ended.0"].startswith("failed/") and summary["ended.1"].startswith("done/")
    show = sh.run("gpu_show first-run")
    assert show.rc == 0, show.err
    assert "Name:       first-run\n" in show.out
    assert "Totals:   0 running, 0 pending, 1 done, 1 failed" in sh.run("gpu_status").out

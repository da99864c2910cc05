"""Who may put code in front of the daemon: as ssh's StrictModes, the daemon refuses a queue
folder that another user owns or may write (its group too, unless the queue is shared on
purpose), skips and reports files of other users, and creates what it writes readable by its
user alone; the client does the same for what it writes, and never reads a log through a link.

A real second Unix user (made with ``useradd``, acting through ``runuser``) plays the colleague
who writes into a shared storage. The queues lie in a folder that user can reach, removed after
each test; the user account is kept for later runs.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from client_helpers import SHELLS, Shell, make_instance, tree
from conftest import FakeClock, run_until
from queue_files import command, finished, result, submit
from test_daemon_unit import make_daemon

import perpetual_motion as pm

OTHER = "pm-colleague"

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("useradd") and shutil.which("runuser")),
    reason="needs root, useradd and runuser for a second user")


@pytest.fixture(scope="session")
def other() -> pwd.struct_passwd:
    """The second user (created when missing; a parallel run may have made it meanwhile)."""
    try:
        return pwd.getpwnam(OTHER)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/bash", OTHER],
                       capture_output=True)
    return pwd.getpwnam(OTHER)


@pytest.fixture
def place() -> Iterator[Path]:
    """A folder every user can reach (pytest's own are its user's alone); removed after."""
    path = Path(tempfile.mkdtemp(prefix="pm-permissions-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def as_other(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", OTHER, "--", "bash", "-c", script],
                          capture_output=True, text=True, cwd="/", timeout=30)


def give(path: Path, user: pwd.struct_passwd) -> None:
    os.chown(path, user.pw_uid, user.pw_gid, follow_symlinks=False)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def start(root: Path, **overrides) -> tuple[pm.Daemon, FakeClock, int | None]:
    clock = FakeClock()
    daemon = make_daemon(root, clock, **overrides)
    return daemon, clock, daemon.start()


def refusals(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records
                     if r.getMessage().startswith("refusing the queue folder"))


# Folders: refused at the start and on every pass ##############################################


@needs_root
def test_an_instance_that_another_user_made_and_anyone_may_write_is_refused(place, other,
                                                                            caplog):
    root = place / "shared root"
    root.mkdir()
    root.chmod(0o1777)  # a shared storage's top: everybody makes folders in it
    ran = place / "ran"
    made = as_other(f"umask 0; mkdir -p '{root}/unit/pending' && "
                    f"echo 'touch {ran}' > '{root}/unit/pending/evil.sh'")
    assert made.returncode == 0, made.stderr
    daemon, clock, code = start(root)
    assert code == pm.EXIT_FAILURE
    assert f"{root / 'unit'} is owned by {OTHER} (uid {other.pw_uid}), not by root (uid 0)" \
        in refusals(caplog)
    assert not ran.exists() and not (root / "unit" / "nodes").exists()  # nothing written


@needs_root
@pytest.mark.parametrize("folder", ["", "pending", "records", "commands", ".staging"])
def test_a_folder_of_the_instance_that_anyone_may_write_is_refused_at_start(place, folder,
                                                                            caplog):
    pm.QueueFolder(place / "unit").create("unit")
    (place / "unit" / folder).chmod(0o777)
    assert start(place)[2] == pm.EXIT_FAILURE
    assert f"{place / 'unit' / folder} is writable by every user (mode 0777)" \
        in refusals(caplog)


@needs_root
def test_a_group_writable_queue_is_refused_unless_the_queue_is_shared(place, other, caplog):
    inst = place / "unit"
    pm.QueueFolder(inst).create("unit")
    (inst / "pending").chmod(0o770)
    assert start(place)[2] == pm.EXIT_FAILURE
    assert "writable by the group root (mode 0770): everyone in it could run code as root " \
           "(uid 0); chmod g-w it, or let the group share the queue (--shared-queue)" \
        in refusals(caplog)
    # shared on purpose: the group's tasks run
    daemon, clock, code = start(place, shared=True)
    assert code is None
    theirs = submit(inst, "theirs.sh", "true\n")
    give(inst / "pending" / theirs, other)
    run_until(daemon, clock, lambda: finished(inst, theirs) == "done")


@needs_root
def test_a_folder_opened_to_others_while_the_daemon_runs_stops_the_queue_until_closed(place):
    daemon, clock, code = start(place)
    assert code is None
    inst = place / "unit"
    (inst / "pending").chmod(0o777)
    task = submit(inst, "t.sh", "true\n")
    name = command(inst, "shutdown")
    for _ in range(20):
        daemon.tick()
        clock.sleep(0.1)
    assert (inst / "pending" / task).exists() and not daemon.stopping
    assert not (inst / "replies" / f"{name}.reply").exists()
    state = pm.parse_fields((inst / "nodes" / "node-0.state").read_text())
    assert state["refused"].startswith(f"{inst / 'pending'} is writable by every user")
    out = Shell("bash", place, place, place).run("gpu_status -l", job_id="unit").out
    assert f"          REFUSED:  {inst / 'pending'} is writable by every user (mode 0777): " \
           "anyone could run code as root (uid 0); chmod o-w it; no task or command is taken\n" \
        in out, out
    (inst / "commands" / f"{name}.cmd").unlink()
    (inst / "pending").chmod(0o700)
    run_until(daemon, clock, lambda: finished(inst, task) == "done")
    assert pm.parse_fields((inst / "nodes" / "node-0.state").read_text())["refused"] == ""


@needs_root
def test_an_instance_that_is_another_users_link_is_refused_and_ones_own_is_followed(place, other,
                                                                                   caplog):
    """In a queue root where everybody makes folders, a colleague's link named as the
    instance, pointing at a folder of the user's, is refused: they could point it elsewhere
    later. A link of the user's own (the instance on another file system) is followed."""
    root = place / "shared root"
    root.mkdir()
    root.chmod(0o1777)
    mine = place / "mine"
    mine.mkdir(mode=0o700)
    made = as_other(f"ln -s '{mine}' '{root}/unit'")
    assert made.returncode == 0, made.stderr
    assert start(root)[2] == pm.EXIT_FAILURE
    assert f"{root / 'unit'} is a symbolic link owned by {OTHER} (uid {other.pw_uid}), not by " \
        "root (uid 0): its owner could point it elsewhere" in refusals(caplog)
    assert os.listdir(mine) == []  # nothing written
    (root / "unit").unlink()
    (root / "unit").symlink_to(mine)
    daemon, clock, code = start(root)
    assert code is None
    task = submit(root / "unit", "t.sh", "true\n")
    run_until(daemon, clock, lambda: finished(root / "unit", task) == "done")
    assert (mine / "done" / task).exists()


@needs_root
@pytest.mark.parametrize("folder", ["replies", ".staging", "done", "logs"])
def test_housekeeping_never_removes_through_a_folder_that_is_a_link(place, folder, caplog):
    """A folder of the instance replaced by a link (to a folder of the user's, say) is
    refused, and the daemon's hourly removal of old replies, staging files and finished
    tasks removes nothing through it, neither while it is refused nor through a link put
    there after the check."""
    daemon, clock, code = start(place)
    assert code is None
    inst = place / "unit"
    outside = place / "outside"
    outside.mkdir()
    week_old = clock.now - 7 * 86400
    for name in ("data.csv", f"{pm.task_id_for('old.sh')}", "x.log"):
        (outside / name).write_text("keep\n")
        os.utime(outside / name, (week_old, week_old))
    shutil.rmtree(inst / folder)
    (inst / folder).symlink_to(outside)
    clock.sleep(3600 * 24 + 1)
    daemon.tick()  # the pass that refuses it, and the hour's housekeeping
    assert f"{inst / folder} is a symbolic link" in refusals(caplog)
    daemon.housekeeping()
    daemon.folder.remove_old(folder, clock.now, 3600)  # as if the link came after the check
    daemon.folder.remove_finished(clock.now)
    assert len(os.listdir(outside)) == 3, os.listdir(outside)


# Files of another user: skipped and reported ##################################################


@needs_root
def test_tasks_commands_and_records_of_another_user_are_skipped_and_reported(place, other):
    daemon, clock, code = start(place)
    assert code is None
    inst = place / "unit"
    ran = place / "ran"
    evil = submit(inst, "evil.sh", f"touch '{ran}.evil'\n", priority=1)
    give(inst / "pending" / evil, other)
    name = command(inst, "shutdown")
    give(inst / "commands" / f"{name}.cmd", other)
    mine = submit(inst, "mine.sh", f"touch '{ran}.mine'\n", priority=2, cwd=str(place))
    give(inst / "records" / f"{mine}.submit", other)  # it could run mine elsewhere, otherwise
    after = submit(inst, "after.sh", "true\n", priority=3)
    run_until(daemon, clock, lambda: finished(inst, after) == "done")
    daemon.write_state()
    assert not daemon.stopping and not Path(f"{ran}.evil").exists()
    assert (inst / "pending" / evil).exists() and (inst / "commands" / f"{name}.cmd").exists()
    assert finished(inst, mine) == "failed" and not Path(f"{ran}.mine").exists()
    owner = f"owned by {OTHER} (uid {other.pw_uid}), not by the daemon's user"
    assert result(inst, mine)["reason"] == f"unreadable submit record: {owner}"
    state = pm.parse_fields((inst / "nodes" / "node-0.state").read_text())
    assert state["skipped_count"] == "2"
    assert [state["skipped.0"], state["skipped.1"]] == [f"commands/{name}.cmd: {owner}",
                                                        f"pending/{evil}: {owner}"]
    out = Shell("bash", place, place, place).run("gpu_status -l", job_id="unit").out
    assert f"          skipped:  pending/{evil}: {owner}\n" in out, out


@needs_root
def test_holds_and_priorities_of_another_user_count_for_nothing(place, other):
    daemon, clock, code = start(place)
    assert code is None
    inst = place / "unit"
    first = submit(inst, "first.sh", "true\n", priority=1)
    second = submit(inst, "second.sh", "true\n", priority=2)
    for folder, name, text in (("held", first, ""), ("priority", second, "priority=0\n")):
        (inst / folder).mkdir(exist_ok=True)
        (inst / folder / name).write_text(text)
        give(inst / folder / name, other)
    run_until(daemon, clock, lambda: finished(inst, first) == "done"
              and finished(inst, second) == "done")
    assert result(inst, first)["ended"] <= result(inst, second)["started"]  # the order stood
    daemon.write_state()
    state = pm.parse_fields((inst / "nodes" / "node-0.state").read_text())
    skipped = [state[f"skipped.{i}"] for i in range(int(state["skipped_count"]))]
    assert any(entry.startswith(f"held/{first}: owned by {OTHER}") for entry in skipped), state


# What is written: readable by its owner alone ################################################


@needs_root
def test_records_and_logs_are_readable_by_their_owner_alone(place, other):
    work = place / "work"
    work.mkdir()
    (work / "job.sh").write_text("echo hello\n")
    sh = Shell("bash", place, place, work)
    res = sh.run("umask 022; gpu_submit -e WANDB_API_KEY=s3cret job.sh")
    assert res.rc == 0, res.err
    task = res.out.split()[-1]
    daemon, clock, code = start(place, job_id="exp1")
    assert code is None
    inst = place / "exp1"
    run_until(daemon, clock, lambda: finished(inst, task) == "done")
    assert mode(inst) == 0o700
    for folder in pm.QUEUE_DIRS:
        assert mode(inst / folder) & 0o077 == 0, folder
    for path in [*(inst / "records").iterdir(), *(inst / "logs").iterdir(),
                 inst / "nodes" / "node-0.state", inst / "control.json"]:
        assert mode(path) & 0o077 == 0, path
    peek = as_other(f"cat '{inst}/records/{task}.submit'")
    assert peek.returncode != 0 and "s3cret" not in peek.stdout
    (inst / "pending").chmod(0o755)  # even where a folder lets others look
    peek = as_other(f"cat '{inst}/records/{task}.submit'")
    assert peek.returncode != 0 and "s3cret" not in peek.stdout


def test_submit_sh_makes_the_instance_for_its_owner_alone_whatever_the_umask(tmp_path):
    from test_submit import SCO_SETTINGS, base_env, make_code_dir, run_submit

    root = tmp_path / "queue root"
    root.mkdir()
    env = base_env(tmp_path, QUEUE_ROOT=str(root),
                   CODE_DIR=str(make_code_dir(tmp_path, real_daemon=False)), **SCO_SETTINGS)
    old = os.umask(0o002)  # a login node's usual umask: the group may write what it makes
    try:
        run = run_submit(env, "exp1", "8", "1")
    finally:
        os.umask(old)
    assert run.returncode == 0, run.stderr
    assert (mode(root / "exp1"), mode(root / "exp1" / ".staging")) == (0o700, 0o700)


@needs_root
def test_a_shared_queue_is_made_for_the_group(place):
    daemon, clock, code = start(place, shared=True)
    assert code is None
    inst = place / "unit"
    assert mode(inst / "pending") == 0o2770
    task = submit(inst, "t.sh", "true\n")
    run_until(daemon, clock, lambda: finished(inst, task) == "done")
    assert mode(inst / "records" / f"{task}.result") == 0o640


# The client #################################################################################


def instance_and_secret(tmp_path: Path, shell: str = "bash") -> tuple[Shell, Path, Path, str]:
    """A client shell, a bare instance of its, a file of the user's to keep, a task id."""
    sh = Shell(shell, tmp_path / "root", tmp_path, tmp_path)
    inst = sh.root / "exp1"
    for folder in ("pending", "running", "done", "failed", "records", "logs", "nodes"):
        (inst / folder).mkdir(parents=True)
    secret = tmp_path / "secret"
    secret.write_text("TOPSECRET\n")
    return sh, inst, secret, f"500-{pm.unique_name()}-t.sh"


def test_gpu_logs_and_gpu_tail_never_follow_a_log_that_is_a_link(tmp_path):
    sh, inst, secret, task = instance_and_secret(tmp_path)
    (inst / "done" / task).write_text("true\n")
    (inst / "records" / f"{task}.result").write_text(f"id={task}\nstate=done\n")
    (inst / "logs" / f"{task}.log").symlink_to(secret)
    for script in (f"gpu_logs {task}", f"gpu_tail {task}"):
        res = sh.run(f"{script}; echo \"rc=$?\"", timeout=20)
        assert "TOPSECRET" not in res.out + res.err, script
        assert res.out.endswith("rc=1\n"), (script, res.out, res.err)
        assert f"{inst}/logs/{task}.log is a symbolic link: not followed" in res.err, script


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("how", ["name", "--failed"])
def test_gpu_retry_never_copies_a_finished_task_that_is_a_link(tmp_path, shell, how):
    """A link in done/ or failed/ (another member of a shared queue can make one) was copied by
    gpu_retry into pending/: the file it pointed at, a private key say, became a task that the
    group could read, and that the daemon would run."""
    sh, inst, secret, task = instance_and_secret(tmp_path, shell)
    folder = "done" if how == "name" else "failed"
    (inst / folder / task).symlink_to(secret)
    (inst / "records" / f"{task}.result").write_text(
        f"id={task}\nstate={'done' if how == 'name' else 'failed'}\n")
    res = sh.run(f"gpu_retry {task if how == 'name' else '--failed'}; echo \"rc=$?\"",
                 timeout=20)
    assert res.out.endswith("rc=1\n"), (res.out, res.err)
    assert f"{folder}/{task} is not a regular file (a link, say)" in res.err
    assert tree(inst / "pending") == {} and not list((inst / "records").glob("*.submit"))


def shared_instance(root: Path, other: pwd.struct_passwd) -> Path:
    """An instance of the user's that the colleague's group writes (--shared-queue's modes)."""
    inst = make_instance(root)
    for path in (inst, *inst.iterdir()):
        if path.is_dir():
            os.chown(path, 0, other.pw_gid)
            path.chmod(0o2770)
    return inst


@needs_root
@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("folder", ["logs", "records"])
def test_gpu_clean_removes_nothing_through_a_folder_swapped_for_a_link(place, other, shell,
                                                                        folder):
    inst = shared_instance(place, other)
    victim = place / "victim"
    victim.mkdir()
    (victim / "notes.log").write_text("my notes\n")
    (victim / "notes.result").write_text("state=done\n")
    swapped = as_other(f"cd '{inst}' && mv {folder} .{folder}-old && ln -s '{victim}' {folder} "
                       "&& echo true > done/notes && touch -d '40 days ago' done/notes")
    assert swapped.returncode == 0, swapped.stderr
    res = Shell(shell, place, place, place).run("gpu_clean --older-than 7")
    assert res.rc == 1, (res.out, res.err)
    assert f"gpu_clean: {inst / folder} is a symbolic link, not a folder of the instance" \
        in res.err, res.err
    assert sorted(os.listdir(victim)) == ["notes.log", "notes.result"]
    assert (inst / "done" / "notes").exists()


@needs_root
@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("how", ["made", "linked"])
def test_the_client_writes_nothing_into_an_instance_another_user_made_or_linked(place, other,
                                                                              shell, how):
    """In a queue root where everybody makes folders, a colleague makes (or links to a folder
    of the user's) the instance the user is about to queue into: the client refuses it, before
    it writes anything (its records hold the -e values), as the daemon would refuse it."""
    root = place / "shared root"
    root.mkdir()
    root.chmod(0o1777)
    mine = place / "mine"
    mine.mkdir(mode=0o700)
    target = "mkdir exp1 && chmod 2777 exp1" if how == "made" else f"ln -s '{mine}' exp1"
    made = as_other(f"cd '{root}' && {target}")
    assert made.returncode == 0, made.stderr
    work = place / "work"
    work.mkdir()
    (work / "train.sh").write_text("echo train\n")
    before = {**tree(root), **tree(mine)}
    res = Shell(shell, root, place, work).run(
        "umask 022; gpu_submit -e WANDB_API_KEY=s3cret train.sh; echo \"rc=$?\"; "
        "gpu_run 'echo hi'; gpu_hold all; gpu_stop all; gpu_drain; gpu_clean; echo \"rc=$?\"")
    assert res.out == "rc=1\nrc=1\n", (res.out, res.err)
    why = (f"is owned by {OTHER}, not by you: the client writes only into folders of your own "
           "(or root's)" if how == "made" else
           "is a symbolic link, not a folder of the instance")
    assert res.err.startswith(f"gpu_submit: {root / 'exp1'} {why}"), res.err
    assert {**tree(root), **tree(mine)} == before  # nothing written


@needs_root
@pytest.mark.parametrize("shell", SHELLS)
def test_a_folder_of_another_user_inside_the_user_s_instance_is_refused_too(place, other, shell):
    inst = shared_instance(place, other)
    made = as_other(f"cd '{inst}' && mv records .records-old && mkdir -m 2777 records")
    assert made.returncode == 0, made.stderr
    res = Shell(shell, place, place, place).run("gpu_run -e KEY=s3cret 'echo hi'")
    assert res.rc == 1 and f"{inst / 'records'} is owned by {OTHER}, not by you" in res.err, \
        res.err
    assert os.listdir(inst / "records") == [] and os.listdir(inst / "pending") == []


@needs_root
@pytest.mark.parametrize("shell", SHELLS)
def test_an_instance_the_user_shares_with_the_group_is_written_for_the_group(place, other,
                                                                            shell):
    inst = shared_instance(place, other)
    res = Shell(shell, place, place, place).run("umask 077; gpu_run 'echo hi'")
    assert res.rc == 0, res.err
    [record] = os.listdir(inst / "records")
    assert mode(inst / "records" / record) == 0o660


@needs_root
@pytest.mark.parametrize("shell", SHELLS)
def test_a_colleagues_queue_shared_on_purpose_takes_tasks_once_its_owner_is_named(place, other,
                                                                                  shell):
    """A member of the group queues into a colleague's shared instance (--shared-queue) only
    after naming its owner (SHARED_QUEUE_OWNER): from the folder alone the client cannot tell
    it from one made to catch what it writes. Then it writes for the group."""
    inst = shared_instance(place, other)
    for path in (inst, *inst.iterdir()):
        os.chown(path, other.pw_uid, other.pw_gid)
    sh = Shell(shell, place, place, place)
    refused = sh.run("gpu_run -e KEY=s3cret 'echo hi'")
    assert refused.rc == 1 and f"if {OTHER} shares this queue with your group on purpose " \
        f"(--shared-queue), SHARED_QUEUE_OWNER={OTHER}" in refused.err, refused.err
    assert os.listdir(inst / "records") == []
    res = sh.run("umask 077; gpu_run -e KEY=s3cret 'echo hi'", SHARED_QUEUE_OWNER=OTHER)
    assert res.rc == 0, res.err
    [record] = os.listdir(inst / "records")
    assert mode(inst / "records" / record) == 0o660


@needs_root
@pytest.mark.parametrize("shell", SHELLS)
def test_an_instance_that_is_the_users_own_link_takes_tasks(place, shell):
    """The instance may be a link of the user's own (to another file system), as the daemon
    takes it: the client writes through it."""
    elsewhere = make_instance(place / "elsewhere")
    root = place / "root"
    root.mkdir()
    (root / "exp1").symlink_to(elsewhere)
    res = Shell(shell, root, place, place).run("gpu_run 'echo hi'")
    assert res.rc == 0, res.err
    assert len(os.listdir(elsewhere / "pending")) == 1


@needs_root
@pytest.mark.parametrize("shell", SHELLS)
def test_gpu_clean_removes_nothing_through_a_folder_swapped_after_its_check(place, shell):
    """A folder swapped for a link between gpu_clean's check and its removal (here by the
    first xargs it runs, the worst moment) does not lead the removal elsewhere: it removes by
    names from inside each folder, which it entered and found to be the instance's own."""
    inst = make_instance(place)
    old = "500-20261001_000000_000000000-00000000-notes.sh"
    (inst / "done" / old).write_text("true\n")
    (inst / "records" / f"{old}.result").write_text(f"id={old}\nstate=done\n")
    (inst / "logs" / f"{old}.log").write_text("its log\n")
    for path in (inst / "done" / old, inst / "records" / f"{old}.result"):
        os.utime(path, (0, 0))
    victim = place / "victim"
    victim.mkdir()
    for name in (f"{old}.result", f"{old}.log"):
        (victim / name).write_text("mine\n")
    bin_dir = place / "bin"
    bin_dir.mkdir()
    (bin_dir / "xargs").write_text(f"""#!/bin/bash
if [ ! -e '{place}/swapped' ]; then
  touch '{place}/swapped'
  for d in records logs; do mv '{inst}'/$d '{inst}'/.$d-old; ln -s '{victim}' '{inst}'/$d; done
fi
exec {shutil.which("xargs")} "$@"
""")
    (bin_dir / "xargs").chmod(0o755)
    res = Shell(shell, place, place, place).run(
        "gpu_clean --older-than 7", PATH=f"{bin_dir}:{os.environ['PATH']}")
    assert (place / "swapped").exists(), (res.out, res.err)
    assert sorted(os.listdir(victim)) == sorted([f"{old}.result", f"{old}.log"]), res.err
    assert not (inst / "done" / old).exists()  # the task itself is removed


@needs_root
def test_a_listing_is_reused_only_while_its_folder_stands_still_and_for_seconds(place, other):
    """pending/ listed again at every poll costs a stat per task: while the folder's own
    stat stands still its listing is reused, but each change shows at once, and what changed
    only inside a file (its owner) shows within seconds."""
    folder = pm.QueueFolder(place / "unit")
    folder.create("unit")
    clock = FakeClock(1000.0)
    folder.monotonic = clock
    first = submit(place / "unit", "a.sh", "true\n")
    assert folder.files("pending") == [first]
    second = submit(place / "unit", "b.sh", "true\n")
    assert folder.files("pending") == sorted([first, second])  # a new entry: at once
    give(place / "unit" / "pending" / second, other)  # (the folder's stat stands still)
    clock.sleep(pm._LISTING_REUSE_SECONDS - 0.5)
    assert folder.files("pending") == sorted([first, second])
    assert folder.refused["pending"] == {}
    clock.sleep(1.0)
    assert folder.files("pending") == [first]
    assert second in folder.refused["pending"]
    os.unlink(place / "unit" / "pending" / first)
    assert folder.files("pending") == []  # an entry gone: at once

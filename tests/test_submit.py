"""submit.sh: arguments, settings, and its three backends.

- sco: a recording stand-in `sco` (tests/fake_sco/sco) first on PATH; the command it was given
  is then run the way SCO ACP runs it on each worker, with a stand-in Python or the real daemon.
- local: submit.sh itself runs inside a PID namespace, with the daemon it starts.
- slurm: the real Slurm clusters that .ci/start-slurm.sh starts, one node and two nodes on this
  machine (tests/slurm_cluster.py); the daemons run in PID namespaces there too. Skipped when a
  cluster is not usable, unless REQUIRE_SLURM=1 (CI), which makes that a failure.
- multi-node: two daemons of one instance, node ranks 0 and 1, each in its own PID namespace.

Tasks are submitted and the daemons shut down with client.sh (gpu_submit, gpu_shutdown).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, UNSHARE, needs_namespace, read_fields, wait_for
from slurm_cluster import namespace_python

SUBMIT = REPO / "submit.sh"
CLIENT = REPO / "client.sh"
FAKE_SCO_DIR = REPO / "tests" / "fake_sco"

# The daemon of every test: fast, keep-alive off, and it kills nothing but its tasks.
TEST_DAEMON_ARGS = "--poll-interval 0.1 --no-keepalive --stop-grace 2 --kill-scope task"

SCO_SETTINGS = {
    "SCO_WORKSPACE": "ws-1",
    "SCO_AEC2": "cluster-1",
    "SCO_IMAGE": "registry.example/pm:1",
    "SCO_STORAGE_MOUNT": "vol-1:/mnt/afs",
}

# Variables from which the daemon could take a node rank; none may leak in from outside.
RANK_VARIABLES = ("SENSECORE_PYTORCH_NODE_RANK", "SENSECORE_PYTORCH_NNODES", "RANK",
                  "WORLD_SIZE", "SLURM_NODEID", "SLURM_NNODES", "SLURM_JOB_ID")


# Helpers ###################################################################################


def base_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """An environment with no settings of the user's, the fake sco first on PATH, and
    ``settings`` on top."""
    env = {key: value for key, value in os.environ.items()
           if key not in RANK_VARIABLES and key != "QUEUE_ROOT"}
    conf = tmp_path / "empty.conf"
    conf.touch()
    env.update(SUBMIT_CONF=str(conf), PATH=f"{FAKE_SCO_DIR}{os.pathsep}{env['PATH']}",
               FAKE_SCO_RECORD=str(tmp_path / "sco-calls.jsonl"), PYTHON=sys.executable,
               PYTHONUNBUFFERED="1")
    env.update(settings)
    return env


def run_submit(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(SUBMIT), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def sco_calls(env: dict[str, str]) -> list[list[str]]:
    record = Path(env["FAKE_SCO_RECORD"])
    if not record.exists():
        return []
    return [json.loads(line)["argv"] for line in record.read_text().splitlines()]


def option(argv: list[str], name: str) -> str:
    """The value of ``--name=value`` in argv."""
    values = [arg.split("=", 1)[1] for arg in argv if arg.startswith(f"--{name}=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def write_state(instance: Path, rank: int, status: str, heartbeat: float) -> None:
    nodes = instance / "nodes"
    nodes.mkdir(parents=True, exist_ok=True)
    (nodes / f"node-{rank}.state").write_text(
        f"protocol=1\njob_id={instance.name}\nnode_rank={rank}\nhost=elsewhere\npid=4242\n"
        f"status={status}\nheartbeat={heartbeat:.3f}\n")


def make_code_dir(parent: Path, real_daemon: bool) -> Path:
    """A CODE_DIR with spaces and quotes in its path, holding perpetual_motion.py."""
    code = parent / "code dir's \"copy\" $HOME"
    code.mkdir()
    if real_daemon:
        shutil.copy(REPO / "perpetual_motion.py", code / "perpetual_motion.py")
    else:
        (code / "perpetual_motion.py").write_text("raise SystemExit('not this one')\n")
    return code


def make_recording_python(parent: Path, seen: Path) -> Path:
    """A stand-in Python that writes what it was run with to ``seen`` (JSON)."""
    fake_python = parent / "fake python"
    fake_python.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, sys
        json.dump({{"argv": sys.argv[1:], "cwd": os.getcwd(),
                   "conda": os.environ.get("FAKE_CONDA_ENV"),
                   "env": [os.environ.get("JOB_ID"), os.environ.get("QUEUE_ROOT")]}},
                  open({str(seen)!r}, "w"))
        """))
    fake_python.chmod(0o755)
    return fake_python


def path_without(parent: Path, *programs: str) -> str:
    """A PATH with every program of this one but ``programs`` (links in one folder)."""
    folder = parent / f"bin-without-{'-'.join(programs)}"
    folder.mkdir()
    for directory in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            link = folder / entry.name
            if entry.name not in programs and not link.is_symlink():
                link.symlink_to(entry.path)
    return str(folder)


def make_conda(parent: Path) -> Path:
    """A stand-in conda activate script: it exports the environment name it was given."""
    activate = parent / "conda root" / "bin" / "activate"
    activate.parent.mkdir(parents=True)
    activate.write_text('export FAKE_CONDA_ENV="$1"\n')
    return activate


def client_env(env: dict[str, str], queue_root: Path, job_id: str) -> dict[str, str]:
    return dict(env, QUEUE_ROOT=str(queue_root), JOB_ID=job_id)


def client(env: dict[str, str], *words: str, cwd: Path) -> subprocess.CompletedProcess:
    """Runs a client.sh command (gpu_submit FILE, gpu_shutdown) in a fresh bash."""
    run = subprocess.run(["bash", "-c", 'source "$0" && "$@"', str(CLIENT), *words], env=env,
                         cwd=cwd, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, (words, run.stdout, run.stderr)
    return run


def submit_task(instance: Path, env: dict[str, str], script: Path) -> str:
    """Submits a task with gpu_submit; the name to look for in done/."""
    client(client_env(env, instance.parent, instance.name), "gpu_submit", str(script),
           cwd=script.parent)
    return script.name


def shutdown(instance: Path, env: dict[str, str]) -> None:
    """Shuts the daemon down with gpu_shutdown."""
    client(client_env(env, instance.parent, instance.name), "gpu_shutdown", cwd=instance.parent)


def done_task(instance: Path, name: str) -> Path | None:
    """The task whose id ends with ``-<name>`` once it is in done/."""
    found = sorted((instance / "done").glob(f"*-{name}")) if (instance / "done").is_dir() else []
    return found[0] if found else None


def failed_tasks(instance: Path) -> list[str]:
    folder = instance / "failed"
    return sorted(path.name for path in folder.iterdir()) if folder.is_dir() else []


def running_state(instance: Path, rank: int) -> dict[str, str]:
    path = instance / "nodes" / f"node-{rank}.state"
    try:
        state = read_fields(path)
    except FileNotFoundError:
        return {}
    return state if state.get("status") == "running" else {}


# Command line and settings ##################################################################


def test_help_lists_options_and_every_setting(tmp_path):
    run = run_submit(base_env(tmp_path), "--help")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("Usage: submit.sh [options] <JOB_ID> [GPUS] [NODES]")
    for word in ("--backend", "--hours", "--force", "--dry-run", "CODE_DIR=", "QUEUE_ROOT=",
                 "CONDA_PATH=",
                 "CONDA_ENV=", "SCO_WORKSPACE=", "SCO_AEC2=", "SCO_IMAGE=",
                 "SCO_WORKER_SPEC=n6ls.iu.i40.{GPUS}", "SCO_PRIORITY=normal",
                 "SCO_STORAGE_MOUNT=", "JOB_NAME_PREFIX=ydj-", "PARTITION=", "GRES=gpu:{GPUS}",
                 "EXCLUSIVE=1", "CPUS_PER_NODE=", "MEM_PER_NODE=", "DAEMON_ARGS=",
                 "AUTO_SHUTDOWN_HOURS=''"):
        assert word in run.stdout, word


@pytest.mark.parametrize("args, message", [
    ([], "expected <JOB_ID>"),
    (["a", "2", "1", "extra"], "expected <JOB_ID>"),
    (["-x"], "unknown option"),
    (["--", ".hidden"], "bad JOB_ID"),
    (["--", "-dash"], "bad JOB_ID"),
    (["a b"], "bad JOB_ID"),
    (["a/b"], "bad JOB_ID"),
    (["x" * 65], "bad JOB_ID"),
    (["ok", "two"], "bad GPUS"),
    (["ok", "-1"], "unknown option"),
    (["ok", "02"], "bad GPUS"),
    (["ok", "0"], "GPUS must be at least 1"),
    (["ok", "2", "0"], "bad NODES"),
    (["ok", "2", "1.5"], "bad NODES"),
    # past what a job can have: bash's arithmetic wraps such numbers (2**64 + 1 nodes is 1)
    (["ok", "1025"], "bad GPUS"),
    (["ok", "99999999999999999999"], "bad GPUS"),
    (["ok", "2", "1025"], "bad NODES"),
    (["ok", "2", "18446744073709551617"], "bad NODES"),
    (["--backend", "pbs", "ok"], "unknown backend"),
])
def test_bad_arguments_exit_2_before_anything_happens(tmp_path, args, message):
    root = tmp_path / "root"
    root.mkdir()
    env = base_env(tmp_path, QUEUE_ROOT=str(root), **SCO_SETTINGS)
    run = run_submit(env, *args)
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert message in run.stderr
    assert list(root.iterdir()) == []
    assert sco_calls(env) == []


@pytest.mark.parametrize("setting, value", [
    ("EXCLUSIVE", "yes"), ("CPUS_PER_NODE", "0"), ("CPUS_PER_NODE", "8c"),
    ("MEM_PER_NODE", "200GB"),
])
def test_bad_slurm_resources_are_refused(tmp_path, setting, value):
    env = base_env(tmp_path, QUEUE_ROOT=str(tmp_path), **{setting: value})
    run = run_submit(env, "--backend", "slurm", "ok")
    assert run.returncode == 2
    assert f"bad {setting} '{value}'" in run.stderr


@pytest.mark.parametrize("hours, flag", [("0", False), ("nan", True), ("²", True),
                                         ("inf", False), ("-1", True)])
def test_bad_hours_is_refused(tmp_path, hours, flag):
    env = base_env(tmp_path, QUEUE_ROOT=str(tmp_path), **SCO_SETTINGS)
    if flag:
        run = run_submit(env, f"--hours={hours}", "ok")
    else:
        run = run_submit(dict(env, AUTO_SHUTDOWN_HOURS=hours), "ok")
    assert run.returncode == 2
    assert f"bad AUTO_SHUTDOWN_HOURS '{hours}'" in run.stderr
    assert sco_calls(env) == []


def test_hours_are_passed_only_when_set_for_the_launch(tmp_path):
    """Without AUTO_SHUTDOWN_HOURS the daemon's own constant rules (the seed's FAQ: edit it in
    perpetual_motion.py); set in the settings file, the environment or by --hours, it is passed
    on, and the flag wins."""
    code = make_code_dir(tmp_path, real_daemon=False)
    seen = tmp_path / "seen.json"
    conf = tmp_path / "hours.conf"
    env = base_env(tmp_path, QUEUE_ROOT=str(tmp_path), CODE_DIR=str(code),
                   PYTHON=str(make_recording_python(tmp_path, seen)), **SCO_SETTINGS)

    def daemon_argv(*args: str, **settings: str) -> list[str]:
        launch = dict(env, **settings)
        run = run_submit(launch, *args, "exp1")
        assert run.returncode == 0, run.stderr
        worker = subprocess.run(["sh", "-c", option(sco_calls(launch)[-1], "command")], cwd="/",
                                capture_output=True, text=True, timeout=30, env=base_env(tmp_path))
        assert worker.returncode == 0, worker.stderr
        return json.loads(seen.read_text())["argv"]

    assert "--hours" not in daemon_argv()
    conf.write_text("AUTO_SHUTDOWN_HOURS=48\n")
    assert daemon_argv(SUBMIT_CONF=str(conf))[-2:] == ["--hours", "48"]
    assert "--hours" not in daemon_argv(SUBMIT_CONF=str(conf), AUTO_SHUTDOWN_HOURS="")
    assert daemon_argv(AUTO_SHUTDOWN_HOURS="2.5")[-2:] == ["--hours", "2.5"]
    assert daemon_argv("--hours", "6", AUTO_SHUTDOWN_HOURS="2.5")[-2:] == ["--hours", "6"]


def test_missing_sco_settings_are_listed(tmp_path):
    run = run_submit(base_env(tmp_path, SCO_AEC2="cluster-1"), "exp1")
    assert run.returncode == 2
    listed = [line.split()[0] for line in run.stderr.splitlines() if line.startswith("  ")]
    assert listed == ["QUEUE_ROOT", "SCO_WORKSPACE", "SCO_IMAGE", "SCO_STORAGE_MOUNT"]
    assert "submit.conf" in run.stderr


@pytest.mark.parametrize("backend, program", [("sco", "sco"), ("slurm", "sbatch")])
def test_a_missing_backend_program_exits_1_before_anything_is_written(tmp_path, backend, program):
    root = tmp_path / "root"
    root.mkdir()
    env = base_env(tmp_path, QUEUE_ROOT=str(root), **SCO_SETTINGS)
    env["PATH"] = path_without(tmp_path, program)
    run = run_submit(env, "--backend", backend, "exp1")
    assert run.returncode == 1, (run.stdout, run.stderr)
    assert f"{program} is not on PATH" in run.stderr
    assert list(root.iterdir()) == []
    # A dry run needs no program.
    assert run_submit(env, "--dry-run", "--backend", backend, "exp1").returncode == 0


def test_environment_beats_settings_file_beats_defaults(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    conf = tmp_path / "my.conf"
    conf.write_text(textwrap.dedent(f"""\
        QUEUE_ROOT={str(root)!r}
        SCO_WORKSPACE=from-file
        SCO_AEC2=cluster-from-file
        SCO_IMAGE=image-from-file
        SCO_STORAGE_MOUNT=vol:/mnt/afs
        SCO_PRIORITY=HIGH
        SCO_WORKER_SPEC=N6lS.Iu.I80.{{GPUS}}
        JOB_NAME_PREFIX=pm-
        """))
    env = base_env(tmp_path, SUBMIT_CONF=str(conf), SCO_WORKSPACE="from-env", SCO_IMAGE="")
    run = run_submit(env, "exp1", "4")
    assert run.returncode == 2, run.stderr  # SCO_IMAGE="" in the environment wins: missing
    assert "SCO_IMAGE" in run.stderr
    del env["SCO_IMAGE"]
    run = run_submit(env, "exp1", "4")
    assert run.returncode == 0, run.stderr
    [argv] = sco_calls(env)
    assert option(argv, "workspace-name") == "from-env"
    assert option(argv, "aec2-name") == "cluster-from-file"
    assert option(argv, "priority") == "HIGH"
    assert option(argv, "worker-spec") == "N6lS.Iu.I80.4"
    assert option(argv, "job-name") == "pm-exp1"
    assert option(argv, "training-framework") == "pytorch"  # the default


def test_the_example_settings_launch_the_originals_sco_job(tmp_path):
    """submit.conf.example, copied as it is, gives the original tool's SCO ACP job: workspace
    share-space, cluster share-cluster, the volume at /mnt/afs, n6ls.iu.i40.<GPUS>, ydj-<JOB_ID>,
    and a worker command of its shape (conda, cd CODE_DIR, the daemon)."""
    example = REPO / "submit.conf.example"
    conf = tmp_path / "submit.conf"
    shutil.copy(example, conf)
    env = base_env(tmp_path, SUBMIT_CONF=str(conf))
    del env["PYTHON"]  # the example's (submit.sh's default): python3
    run = run_submit(env, "--dry-run", "exp1")
    assert run.returncode == 0, run.stderr
    for flag in ("--workspace-name=share-space", "--aec2-name=share-cluster",
                 "--job-name=ydj-exp1", "--worker-spec=n6ls.iu.i40.2", "--priority=normal",
                 "--training-framework=pytorch", "--storage-mount=VOLUME_ID:/mnt/afs",
                 "'--command=bash /mnt/afs/YOUR_NAME/gpu_queue/exp1/launch.sh'"):
        assert f" {flag}" in run.stdout, (flag, run.stdout)
    launcher = [line.strip() for line in run.stdout.splitlines()]
    assert "source /mnt/afs/YOUR_NAME/software/conda/bin/activate swift || exit 1" in launcher
    assert f"cd {REPO} || exit 1" in launcher  # CODE_DIR's default: where submit.sh is
    placeholders = (
        "submit.sh: error: these settings still hold a placeholder of submit.conf.example "
        "(YOUR_NAME, YOUR_TEAM, VOLUME_ID, registry.example.com): QUEUE_ROOT CONDA_PATH "
        f"SCO_IMAGE SCO_STORAGE_MOUNT; set them in {conf} or in the environment\n")
    assert run.stderr.startswith(placeholders)
    # a launch, not a dry run, is refused before anything is written or sco is called
    launch = run_submit(env, "exp1")
    assert (launch.returncode, launch.stderr) == (2, placeholders)
    assert not (tmp_path / "sco-calls.jsonl").exists()
    assert [line for line in launcher if re.fullmatch(
        "exec python3 perpetual_motion.py --job-id exp1 --queue-root "
        r'/mnt/afs/YOUR_NAME/gpu_queue --launch [0-9]+-[0-9]+-[0-9]+ "\$\{node_flags\[@\]\}"',
        line)], launcher
    # Every name in it, set or commented out, is a setting of submit.sh.
    names = {line.lstrip("#").split("=", 1)[0] for line in example.read_text().splitlines()
             if "=" in line and line.lstrip("#")[:1].isupper()}
    help_text = run_submit(env, "--help").stdout
    assert names and all(f"  {name}=" in help_text for name in names), names


# sco #######################################################################################


def test_sco_argv_job_id_file_and_printed_commands(tmp_path):
    root = tmp_path / "queue root"
    root.mkdir()
    code = make_code_dir(tmp_path, real_daemon=False)
    env = base_env(tmp_path, QUEUE_ROOT=str(root), CODE_DIR=str(code), **SCO_SETTINGS)
    run = run_submit(env, "exp1", "8", "2")
    assert run.returncode == 0, run.stderr

    launcher = root / "exp1" / "launch.sh"
    assert sco_calls(env) == [[
        "acp", "jobs", "create",
        "--workspace-name=ws-1",
        "--aec2-name=cluster-1",
        "--job-name=ydj-exp1",
        "--container-image-url=registry.example/pm:1",
        "--training-framework=pytorch",
        "--worker-nodes=2",
        "--worker-spec=n6ls.iu.i40.8",
        "--priority=normal",
        "--storage-mount=vol-1:/mnt/afs",
        f"--command=bash '{launcher}'",
    ]]
    fields = read_fields(root / "exp1" / "job_id.txt")
    assert fields["backend"] == "sco"
    assert fields["cluster_job_id"] == "pt-abc123"
    assert fields["job_name"] == "ydj-exp1"
    assert fields["workspace"] == "ws-1"
    assert (fields["gpus"], fields["nodes"]) == ("8", "2")
    assert abs(float(fields["submitted"]) - time.time()) < 60
    assert list((root / "exp1" / ".staging").iterdir()) == []  # published, nothing left over

    assert "Submitted pt-abc123" in run.stdout
    assert "sco acp jobs delete --workspace-name=ws-1 pt-abc123" in run.stdout
    assert "sco acp jobs list --workspace-name=ws-1" in run.stdout
    assert "sco acp jobs get-workers --workspace-name=ws-1 pt-abc123" in run.stdout
    exec_line = next(line for line in run.stdout.splitlines() if "jobs exec" in line)
    assert exec_line.strip().startswith("exec:    sco acp jobs exec --workspace-name=ws-1")
    assert exec_line.endswith(" pt-abc123")


def test_sco_worker_command_survives_quoting(tmp_path):
    """Run the recorded --command as a worker would (sh -c) with a Python stand-in: it gets
    the daemon's exact arguments, in CODE_DIR, after conda was sourced."""
    root = tmp_path / "queue 'root'"
    root.mkdir()
    code = make_code_dir(tmp_path, real_daemon=False)
    activate = make_conda(tmp_path)
    seen = tmp_path / "seen.json"
    fake_python = make_recording_python(tmp_path, seen)
    env = base_env(tmp_path, QUEUE_ROOT=str(root), CODE_DIR=str(code), CONDA_PATH=str(activate),
                   CONDA_ENV="torch env", PYTHON=str(fake_python), AUTO_SHUTDOWN_HOURS="1.5",
                   DAEMON_ARGS="--kill-scope task  --poll-interval 2", **SCO_SETTINGS)
    run = run_submit(env, "exp1")
    assert run.returncode == 0, run.stderr
    [argv] = sco_calls(env)
    worker_command = option(argv, "command")
    assert option(argv, "worker-spec") == "n6ls.iu.i40.2"  # the default GPUS
    assert option(argv, "worker-nodes") == "1"

    worker = subprocess.run(["sh", "-c", worker_command], cwd="/", capture_output=True, text=True,
                            timeout=30, env=base_env(tmp_path))
    assert worker.returncode == 0, worker.stderr
    got = json.loads(seen.read_text())
    launch = got["argv"][6]
    assert got["argv"] == ["perpetual_motion.py", "--job-id", "exp1", "--queue-root", str(root),
                           "--launch", launch,
                           "--hours", "1.5", "--kill-scope", "task", "--poll-interval", "2"]
    # every node of the launch gets the name that job_id.txt records; a relaunch another
    assert f"launch={launch}\n" in (root / "exp1" / "job_id.txt").read_text()
    assert re.fullmatch(r"[0-9]+-[0-9]+-[0-9]+", launch)
    assert got["cwd"] == str(code)
    assert got["conda"] == "torch env"
    assert got["env"] == ["exp1", str(root)]


def test_sco_worker_names_the_sensecore_rank_over_a_stray_rank(tmp_path):
    """On a worker, SENSECORE_PYTORCH_NODE_RANK/NNODES become --node-rank/--num-nodes, so a
    RANK or WORLD_SIZE in the image's environment cannot win; without them the daemon's own
    fallback (RANK, ...) stays."""
    code = make_code_dir(tmp_path, real_daemon=False)
    seen = tmp_path / "seen.json"
    env = base_env(tmp_path, QUEUE_ROOT=str(tmp_path), CODE_DIR=str(code),
                   PYTHON=str(make_recording_python(tmp_path, seen)), **SCO_SETTINGS)
    run = run_submit(env, "exp1", "8", "2")
    assert run.returncode == 0, run.stderr
    [argv] = sco_calls(env)
    worker_command = option(argv, "command")

    def worker_argv(**variables: str) -> list[str]:
        worker = subprocess.run(["sh", "-c", worker_command], cwd="/", capture_output=True,
                                text=True, timeout=30, env=dict(base_env(tmp_path), **variables))
        assert worker.returncode == 0, worker.stderr
        return json.loads(seen.read_text())["argv"]

    got = worker_argv(SENSECORE_PYTORCH_NODE_RANK="1", SENSECORE_PYTORCH_NNODES="2", RANK="0",
                      WORLD_SIZE="16")
    assert got[-4:] == ["--node-rank", "1", "--num-nodes", "2"]
    assert "--node-rank" not in worker_argv(RANK="1", WORLD_SIZE="2")


def test_sco_failure_shows_the_cause_from_stdout(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    env = base_env(tmp_path, QUEUE_ROOT=str(root), FAKE_SCO_MODE="quota", **SCO_SETTINGS)
    run = run_submit(env, "exp1", "8")
    assert run.returncode == 1
    assert "sco acp jobs create failed (exit 1)" in run.stderr
    assert "MEMBER_QUOTA_EXCEEDED" in run.stderr
    assert 'Error: component "acp" exited with error' in run.stderr
    assert not (root / "exp1" / "job_id.txt").exists()
    assert len(sco_calls(env)) == 1


def test_sco_output_without_a_job_id_is_an_error(tmp_path):
    env = base_env(tmp_path, QUEUE_ROOT=str(tmp_path), FAKE_SCO_MODE="noid", **SCO_SETTINGS)
    run = run_submit(env, "exp1")
    assert run.returncode == 1
    assert "printed no pt- job id" in run.stderr and "request accepted" in run.stderr
    assert not (tmp_path / "exp1" / "job_id.txt").exists()


def test_sco_job_id_is_the_word_pt_not_pt_inside_a_word(tmp_path):
    """The display name ydj-opt-run and the word prompt-x come first in the output; the id
    is the pt- word that stands alone."""
    env = base_env(tmp_path, QUEUE_ROOT=str(tmp_path), FAKE_SCO_MODE="chatty", **SCO_SETTINGS)
    run = run_submit(env, "opt-run")
    assert run.returncode == 0, run.stderr
    assert read_fields(tmp_path / "opt-run" / "job_id.txt")["cluster_job_id"] == "pt-abc123"
    assert "Submitted pt-abc123 (display name ydj-opt-run)" in run.stdout


def test_sco_failure_after_printing_a_job_id_records_the_job(tmp_path):
    """sco failed, but only after it printed a job id: the job may exist, so it is saved (for
    gpu_shutdown and the next launch's warning) and the delete command is shown."""
    env = base_env(tmp_path, QUEUE_ROOT=str(tmp_path), FAKE_SCO_MODE="late-failure",
                   **SCO_SETTINGS)
    run = run_submit(env, "exp1")
    assert run.returncode == 1
    assert "sco acp jobs create failed (exit 1) after it printed the job id pt-abc123" in run.stderr
    assert 'Error: component "acp" exited with error' in run.stderr
    assert "the job pt-abc123 may exist" in run.stderr
    assert "sco acp jobs delete --workspace-name=ws-1 pt-abc123" in run.stderr
    fields = read_fields(tmp_path / "exp1" / "job_id.txt")
    assert (fields["backend"], fields["cluster_job_id"]) == ("sco", "pt-abc123")


def test_sco_profile_extra_flags_and_no_mount(tmp_path):
    env = base_env(tmp_path, QUEUE_ROOT=str(tmp_path), SCO_PROFILE="prod",
                   SCO_EXTRA_ARGS="--quota-type=spot --retry-times 2", FAKE_SCO_JOB_ID="pt-9z8y",
                   **dict(SCO_SETTINGS, SCO_STORAGE_MOUNT="none"))
    run = run_submit(env, "exp1", "1")
    assert run.returncode == 0, run.stderr
    [argv] = sco_calls(env)
    assert argv[:4] == ["--profile=prod", "acp", "jobs", "create"]
    assert not any(arg.startswith("--storage-mount") for arg in argv)
    assert argv[-4:-1] == ["--quota-type=spot", "--retry-times", "2"]
    fields = read_fields(tmp_path / "exp1" / "job_id.txt")
    assert (fields["cluster_job_id"], fields["profile"]) == ("pt-9z8y", "prod")
    assert "sco --profile=prod acp jobs delete --workspace-name=ws-1 pt-9z8y" in run.stdout


def test_gpu_shutdown_prints_the_delete_command_with_the_profile(tmp_path):
    """submit.sh records the profile in job_id.txt; the client's gpu_shutdown (no daemon alive)
    prints the job's delete command with it."""
    env = base_env(tmp_path, QUEUE_ROOT=str(tmp_path), SCO_PROFILE="prod",
                   FAKE_SCO_JOB_ID="pt-9z8y", **SCO_SETTINGS)
    assert run_submit(env, "exp1").returncode == 0
    shutdown = subprocess.run(["bash", "-c", 'source "$0" && gpu_shutdown', str(CLIENT)],
                              env=client_env(env, tmp_path, "exp1"), cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
    assert shutdown.returncode == 1, shutdown.stderr  # nothing to shut down
    assert "no daemon is alive for exp1" in shutdown.stderr
    assert "sco --profile=prod acp jobs delete --workspace-name=ws-1 pt-9z8y" in shutdown.stdout


def test_dry_run_writes_and_runs_nothing(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    env = base_env(tmp_path, QUEUE_ROOT=str(root), **SCO_SETTINGS)
    run = run_submit(env, "--dry-run", "exp1", "4", "2")
    assert run.returncode == 0, run.stderr
    assert list(root.iterdir()) == []
    assert sco_calls(env) == []
    assert "sco acp jobs create" in run.stdout
    assert "--worker-spec=n6ls.iu.i40.4" in run.stdout
    assert "exec " in run.stdout and "perpetual_motion.py --job-id exp1" in run.stdout


# A live daemon ############################################################################


@pytest.mark.parametrize("status, age, launched", [
    ("running", 5, False),
    ("stopping", 5, False),
    ("stopped", 5, True),
    ("running", 120, True),
])
def test_refuses_a_job_whose_daemon_is_alive(tmp_path, status, age, launched):
    root = tmp_path / "root"
    write_state(root / "exp1", 1, status, time.time() - age)
    env = base_env(tmp_path, QUEUE_ROOT=str(root), **SCO_SETTINGS)
    run = run_submit(env, "exp1")
    if launched:
        assert run.returncode == 0, run.stderr
        assert len(sco_calls(env)) == 1
    else:
        assert run.returncode == 3
        assert "a daemon of exp1 is alive: node 1 on elsewhere (pid 4242" in run.stderr
        assert "--force" in run.stderr
        assert sco_calls(env) == []


def test_force_launches_anyway_and_forces_the_daemon(tmp_path):
    root = tmp_path / "root"
    write_state(root / "exp1", 0, "running", time.time())
    env = base_env(tmp_path, QUEUE_ROOT=str(root), **SCO_SETTINGS)
    run = run_submit(env, "--force", "exp1")
    assert run.returncode == 0, run.stderr
    assert len(sco_calls(env)) == 1
    assert "launching anyway" in run.stderr
    launcher = (root / "exp1" / "launch.sh").read_text()
    assert launcher.rstrip().endswith(" --force")
    assert "export PM_CLUSTER_JOB=sco\n" in launcher


def test_warns_when_the_last_launch_never_started_a_daemon(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    env = base_env(tmp_path, QUEUE_ROOT=str(root), **SCO_SETTINGS)
    first = run_submit(env, "exp1")
    assert first.returncode == 0 and "has not started" not in first.stderr
    again = run_submit(dict(env, FAKE_SCO_JOB_ID="pt-second"), "exp1")
    assert again.returncode == 0
    assert "the last launch of exp1, sco job pt-abc123 of " in again.stderr
    assert "has not started a daemon yet" in again.stderr
    assert read_fields(root / "exp1" / "job_id.txt")["cluster_job_id"] == "pt-second"
    # Its daemon ran (and stopped) since: nothing to warn about.
    state = root / "exp1" / "nodes" / "node-0.state"
    write_state(root / "exp1", 0, "stopped", time.time())
    state.write_text(state.read_text() + f"started={time.time() + 1:.3f}\n")
    third = run_submit(env, "exp1")
    assert third.returncode == 0 and "has not started" not in third.stderr


# slurm, without Slurm: a recording sbatch #####################################################


def test_slurm_sbatch_arguments(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "sbatch.json"
    (bin_dir / "sbatch").write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, sys
        json.dump(sys.argv[1:], open({str(record)!r}, "w"))
        print("4242;cluster-a")
        """))
    (bin_dir / "sbatch").chmod(0o755)
    root = tmp_path / "queue root"
    root.mkdir()
    env = base_env(tmp_path, QUEUE_ROOT=str(root), AUTO_SHUTDOWN_HOURS="1.5",
                   PARTITION="gpu", GRES="gpu:a100:{GPUS}", SBATCH_EXTRA_ARGS="--account=proj",
                   JOB_NAME_PREFIX="pm-")
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    run = run_submit(env, "--backend", "slurm", "exp1", "4", "3")
    assert run.returncode == 0, run.stderr
    instance = root / "exp1"
    assert json.loads(record.read_text()) == [
        "--parsable", "--job-name=pm-exp1", "--nodes=3", "--ntasks-per-node=1",
        "--exclusive", "--mem=0",  # the whole node, all its memory too: the tasks run in the job
        "--gres=gpu:a100:4", "--partition=gpu", "--time=95", f"--chdir={instance}",
        f"--output={instance}/daemon.log", "--open-mode=append", "--account=proj",
        f"--wrap=srun --ntasks-per-node=1 --kill-on-bad-exit=0 bash '{instance}/launch.sh'",
    ]
    fields = read_fields(instance / "job_id.txt")
    assert (fields["backend"], fields["cluster_job_id"], fields["job_name"]) == (
        "slurm", "4242", "pm-exp1")
    launcher = (instance / "launch.sh").read_text()
    assert '--node-rank "${SLURM_NODEID:-0}" --num-nodes "${SLURM_NNODES:-1}"' in launcher
    assert "export PM_CLUSTER_JOB=slurm\n" in launcher  # a cluster node: kill scope auto

    # Without AUTO_SHUTDOWN_HOURS the time limit follows the daemon's own constant.
    code = make_code_dir(tmp_path, real_daemon=True)
    daemon_file = code / "perpetual_motion.py"
    daemon_file.write_text(daemon_file.read_text().replace(
        "\nAUTO_SHUTDOWN_HOURS = 24  #", "\nAUTO_SHUTDOWN_HOURS = 48  #", 1))
    no_hours = {k: v for k, v in env.items() if k != "AUTO_SHUTDOWN_HOURS"}
    run = run_submit(dict(no_hours, CODE_DIR=str(code)), "--backend", "slurm", "exp5")
    assert run.returncode == 0, run.stderr
    assert "--time=2885" in json.loads(record.read_text())  # 48 h and 5 minutes
    assert "--hours" not in (root / "exp5" / "launch.sh").read_text()
    daemon_file.write_text("AUTO_SHUTDOWN_HOURS = 24 * 2\n")  # not a plain number: no --time
    run = run_submit(dict(no_hours, CODE_DIR=str(code)), "--backend", "slurm", "exp6")
    assert run.returncode == 0, run.stderr
    assert "cannot read AUTO_SHUTDOWN_HOURS" in run.stderr
    assert not any(arg.startswith("--time") for arg in json.loads(record.read_text()))

    env.update(GRES="gpu:{GPUS}", PARTITION="")  # GPUS=0: no --gres at all
    assert run_submit(env, "--backend", "slurm", "exp2", "0").returncode == 0
    argv = json.loads(record.read_text())
    assert not any(arg.startswith(("--gres", "--partition")) for arg in argv)

    env.update(CPUS_PER_NODE="16", MEM_PER_NODE="200G")
    assert run_submit(env, "--backend", "slurm", "exp3").returncode == 0
    argv = json.loads(record.read_text())
    assert argv[4:8] == ["--exclusive", "--cpus-per-task=16", "--mem=200G", "--gres=gpu:2"]
    env.update(EXCLUSIVE="0", CPUS_PER_NODE="", MEM_PER_NODE="")  # the cluster's defaults
    assert run_submit(env, "--backend", "slurm", "exp4").returncode == 0
    argv = json.loads(record.read_text())
    assert argv[4] == "--gres=gpu:2"
    assert not any(arg.startswith(("--exclusive", "--cpus-per-task", "--mem")) for arg in argv)


# local ####################################################################################


@needs_namespace
def test_local_backend_runs_a_task_and_shuts_down(tmp_path):
    root = tmp_path / "queue root"
    root.mkdir()
    instance = root / "local1"
    # Rank variables left in the user's shell (by a torchrun, an srun, a worker) must not make
    # the local daemon another node than 0.
    env = base_env(tmp_path, QUEUE_ROOT=str(root), DAEMON_ARGS=TEST_DAEMON_ARGS, RANK="1",
                   WORLD_SIZE="2", SLURM_NODEID="1", SLURM_NNODES="2",
                   SENSECORE_PYTORCH_NODE_RANK="1", SENSECORE_PYTORCH_NNODES="2")
    # submit.sh and the daemon it starts share one PID namespace, which lives as long as the
    # daemon: the bash around them waits for the daemon's pid to go.
    wrapper = textwrap.dedent("""\
        "$0" --backend local local1 0 || exit
        pid=$(sed -n 's/^pid=//p' "$QUEUE_ROOT/local1/job_id.txt")
        while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
        """)
    out = tmp_path / "submit.out"
    with open(out, "wb") as sink:
        proc = subprocess.Popen([*UNSHARE, "bash", "-c", wrapper, str(SUBMIT)], env=env,
                                stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: "Started the daemon of local1" in out.read_text() or proc.poll(),
                 30, what="submit.sh --backend local")
        assert proc.poll() is None, out.read_text()
        fields = read_fields(instance / "job_id.txt")
        assert fields["backend"] == "local"
        assert fields["cluster_job_id"] == f"local-{fields['pid']}"
        state = running_state(instance, 0)
        assert (state["pid"], state["node_rank"], state["num_nodes"]) == (fields["pid"], "0", "1")
        assert "PM_CLUSTER_JOB" not in (instance / "launch.sh").read_text()  # a workstation

        task = tmp_path / "hello.sh"
        task.write_text('echo "hello from $TASK_SHORT_NAME on node $NODE_RANK"\n')
        name = submit_task(instance, env, task)
        done = wait_for(lambda: done_task(instance, name), 20, what="the task to finish")
        log = (instance / "logs" / f"{done.name}.log").read_text()
        assert "hello from hello.sh on node 0" in log

        shutdown(instance, env)
        assert proc.wait(30) == 0, out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()  # --kill-child takes the namespace down
            proc.wait(10)
    assert read_fields(instance / "nodes" / "node-0.state")["status"] == "stopped"
    assert "Stopped" in (instance / "daemon.log").read_text()


@needs_namespace
def test_local_backend_reports_a_daemon_that_exits_at_once(tmp_path):
    env = base_env(tmp_path, QUEUE_ROOT=str(tmp_path), DAEMON_ARGS="--no-such-flag")
    run = subprocess.run([*UNSHARE, str(SUBMIT), "--backend", "local", "broken", "0"], env=env,
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert run.returncode == 1
    assert "the daemon exited at once (status 2)" in run.stderr
    assert "unrecognized arguments: --no-such-flag" in run.stderr
    # Nothing was launched: no job to record, and none for the next launch to warn about.
    assert not (tmp_path / "broken" / "job_id.txt").exists()
    again = run_submit(dict(env, DAEMON_ARGS=""), "--dry-run", "--backend", "local", "broken", "0")
    assert again.returncode == 0, again.stderr
    assert "has not started" not in again.stderr


@needs_namespace
def test_local_backend_says_how_to_choose_a_python_that_has_the_packages(tmp_path):
    """A Python without psutil (a fresh virtual environment): the daemon cannot start, and
    submit.sh says to set PYTHON= in submit.conf."""
    venv = tmp_path / "bare venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    assert subprocess.run([str(python), "-c", "import psutil"], capture_output=True).returncode
    env = base_env(tmp_path, QUEUE_ROOT=str(tmp_path), PYTHON=str(python))
    run = subprocess.run([*UNSHARE, str(SUBMIT), "--backend", "local", "bare", "0"], env=env,
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert run.returncode == 1
    assert "the Python package psutil is missing" in run.stderr
    assert (f"submit.sh: error: the daemon ran with PYTHON={python}: install the package into "
            f"that Python, or set PYTHON= in {tmp_path}/empty.conf to a Python that has it\n"
            in run.stderr), run.stderr
    assert not (tmp_path / "bare" / "job_id.txt").exists()


@needs_namespace
def test_local_backend_stops_a_daemon_without_a_heartbeat_and_records_nothing(tmp_path):
    """A "daemon" that never writes a heartbeat: submit.sh stops it after LOCAL_WAIT_SECONDS,
    exits 1, and writes no job_id.txt."""
    code = make_code_dir(tmp_path, real_daemon=False)
    pid_file = tmp_path / "silent.pid"
    silent = tmp_path / "silent python"
    silent.write_text(f"#!/bin/sh\necho $$ > '{pid_file}'\nexec sleep 120\n")
    silent.chmod(0o755)
    env = base_env(tmp_path, QUEUE_ROOT=str(tmp_path), CODE_DIR=str(code), PYTHON=str(silent),
                   LOCAL_WAIT_SECONDS="1")
    script = ('"$0" --backend local silent 0; echo "submit-exit=$?"; '
              f'if kill -0 "$(cat \'{pid_file}\')" 2>/dev/null; then echo alive; '
              'else echo stopped; fi')
    run = subprocess.run([*UNSHARE, "bash", "-c", script, str(SUBMIT)], env=env,
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert "submit-exit=1" in run.stdout and "stopped" in run.stdout, (run.stdout, run.stderr)
    assert "no heartbeat from the daemon" in run.stderr
    assert not (tmp_path / "silent" / "job_id.txt").exists()


@needs_namespace
def test_editing_auto_shutdown_hours_in_the_daemon_takes_effect_under_submit(tmp_path):
    """The seed's FAQ: edit AUTO_SHUTDOWN_HOURS in perpetual_motion.py to change when the
    daemon exits. Launched by submit.sh (local backend), the edited value rules."""
    code = make_code_dir(tmp_path, real_daemon=True)
    daemon_file = code / "perpetual_motion.py"
    daemon_file.write_text(daemon_file.read_text().replace(
        "\nAUTO_SHUTDOWN_HOURS = 24  #", "\nAUTO_SHUTDOWN_HOURS = 0.0005  #", 1))
    env = base_env(tmp_path, QUEUE_ROOT=str(tmp_path), CODE_DIR=str(code),
                   DAEMON_ARGS=TEST_DAEMON_ARGS)
    wrapper = textwrap.dedent("""\
        "$0" --backend local brief 0 || exit
        pid=$(sed -n 's/^pid=//p' "$QUEUE_ROOT/brief/job_id.txt")
        while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
        """)
    run = subprocess.run([*UNSHARE, "bash", "-c", wrapper, str(SUBMIT)], env=env,
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, (run.stdout, run.stderr)
    log = (tmp_path / "brief" / "daemon.log").read_text()
    assert "(0.0005h)" in log and "Auto-shutdown: auto-shutdown after 0.0005h" in log, log


# Multi-node ###############################################################################


@needs_namespace
def test_two_nodes_one_queue_tasks_run_once_on_any_node(tmp_path):
    """The worker command that sco was given, run on two "nodes" (PID namespaces) with the
    ranks SCO ACP gives them: node 0 runs every task once, both publish heartbeats, and node 1
    exits after node 0 shuts down."""
    root = tmp_path / "queue root"
    root.mkdir()
    instance = root / "multi"
    code = make_code_dir(tmp_path, real_daemon=True)
    activate = make_conda(tmp_path)
    env = base_env(tmp_path, QUEUE_ROOT=str(root), CODE_DIR=str(code), CONDA_PATH=str(activate),
                   CONDA_ENV="pm", DAEMON_ARGS=TEST_DAEMON_ARGS, **SCO_SETTINGS)
    run = run_submit(env, "multi", "8", "2")
    assert run.returncode == 0, run.stderr
    [argv] = sco_calls(env)
    assert option(argv, "worker-nodes") == "2"
    worker_command = option(argv, "command")

    nodes: list[subprocess.Popen] = []
    try:
        for rank in (0, 1):
            node_env = dict(base_env(tmp_path), SENSECORE_PYTORCH_NODE_RANK=str(rank),
                            SENSECORE_PYTORCH_NNODES="2")
            with open(tmp_path / f"node-{rank}.out", "wb") as sink:
                nodes.append(subprocess.Popen([*UNSHARE, "sh", "-c", worker_command], cwd="/",
                                              env=node_env, stdout=sink,
                                              stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL))
        states = wait_for(lambda: all(running_state(instance, r) for r in (0, 1))
                          and [running_state(instance, r) for r in (0, 1)], 30,
                          what="both nodes' heartbeats")
        for rank, state in enumerate(states):
            assert (state["node_rank"], state["num_nodes"]) == (str(rank), "2")
            assert abs(float(state["heartbeat"]) - time.time()) < 60
        assert states[0]["pid_ns"] != states[1]["pid_ns"]
        status = client(client_env(env, root, "multi"), "gpu_status", cwd=tmp_path).stdout
        assert "Node 0" in status and "Node 1" in status, status

        names = []
        for i in range(4):
            task = tmp_path / f"task{i}.sh"
            task.write_text(f'echo "task {i} node=$PM_NODE_RANK conda=$FAKE_CONDA_ENV"\n')
            names.append(submit_task(instance, env, task))
        done = [wait_for(lambda n=n: done_task(instance, n), 30, what=f"{n} done") for n in names]
        assert failed_tasks(instance) == []
        for i, path in enumerate(done):  # on whichever node took it, once
            run_record = read_fields(instance / "records" / f"{path.name}.run")
            result = read_fields(instance / "records" / f"{path.name}.result")
            node = run_record["node_rank"]
            assert node in ("0", "1") and result["node_rank"] == node
            log = (instance / "logs" / f"{path.name}.log").read_text()
            assert log.count(f"task {i} node={node} conda=pm\n") == 1
        assert len(list((instance / "records").glob("*.run"))) == 4  # each task ran once

        shutdown(instance, env)
        assert nodes[0].wait(30) == 0, (tmp_path / "node-0.out").read_text()
        assert nodes[1].wait(60) == 0, (tmp_path / "node-1.out").read_text()
    finally:
        for proc in nodes:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    for rank in (0, 1):
        assert read_fields(instance / "nodes" / f"node-{rank}.state")["status"] == "stopped"


# ShellCheck ###############################################################################


def test_scripts_are_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    run = subprocess.run(["shellcheck", "-x", "submit.sh", ".ci/start-slurm.sh",
                          "submit.conf.example"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


# slurm, for real ##########################################################################


def test_slurm_backend_runs_a_task_and_the_job_ends(tmp_path, slurm):
    root = tmp_path / "queue root"
    root.mkdir()
    job_id = f"slurm-{os.getpid()}"
    # The daemon runs as PID 1 of its own PID namespace inside the job, as in every test.
    env = base_env(tmp_path, QUEUE_ROOT=str(root), DAEMON_ARGS=TEST_DAEMON_ARGS,
                   AUTO_SHUTDOWN_HOURS="0.5", PYTHON=str(namespace_python(tmp_path)))
    launch = slurm.launch(env, job_id, "0")
    fields = read_fields(launch.instance / "job_id.txt")
    slurm_id = launch.slurm_id
    assert (fields["backend"], fields["cluster_job_id"], fields["job_name"]) == (
        "slurm", slurm_id, f"ydj-{job_id}")
    job = slurm.job(slurm_id)
    assert (job["JobName"], job["NumNodes"].split("-")[0], job["TimeLimit"]) == (
        f"ydj-{job_id}", "1", "00:35:00")
    assert "gres" not in job.get("TresPerNode", "")

    [state] = launch.wait_daemons()
    assert (state["node_rank"], state["num_nodes"]) == ("0", "1")
    # The whole node (EXCLUSIVE=1): every CPU and all its memory, not 1 CPU.
    job = slurm.job(slurm_id)
    node = slurm.node(job["NodeList"])
    assert (job["OverSubscribe"], job["NumCPUs"], job["MinMemoryNode"]) == (
        "NO", node["CPUTot"], "0")

    task = tmp_path / "in_slurm.sh"
    task.write_text('echo "job=$SLURM_JOB_ID node=$NODE_RANK"\n')
    launch.client("gpu_submit", str(task))
    done = wait_for(lambda: done_task(launch.instance, task.name), 30, what="the task to finish")
    assert f"job={slurm_id} node=0" in (launch.instance / "logs" / f"{done.name}.log").read_text()

    assert launch.shutdown() == "COMPLETED"
    assert launch.state(0)["status"] == "stopped"
    assert "Stopped" in launch.daemon_log()


def test_slurm_two_nodes_bring_up_a_daemon_on_each_and_gpu_shutdown_ends_the_job(tmp_path,
                                                                                 two_node_slurm):
    """`submit.sh --backend slurm exp 0 2` on the two-node cluster: one daemon per Slurm node,
    ranks 0 and 1 from SLURM_NODEID, both alive; gpu_shutdown ends both and the job."""
    root = tmp_path / "queue root"
    root.mkdir()
    env = base_env(tmp_path, QUEUE_ROOT=str(root), DAEMON_ARGS=TEST_DAEMON_ARGS,
                   AUTO_SHUTDOWN_HOURS="0.5", PYTHON=str(namespace_python(tmp_path)))
    launch = two_node_slurm.launch(env, f"exp-{os.getpid()}", "0", "2")
    job = two_node_slurm.job(launch.slurm_id)
    assert (job["NumNodes"].split("-")[0], job["TimeLimit"]) == ("2", "00:35:00")

    states = launch.wait_daemons()
    assert [(s["node_rank"], s["num_nodes"]) for s in states] == [("0", "2"), ("1", "2")]
    assert states[0]["pid_ns"] != states[1]["pid_ns"]  # each in its own namespace
    # Both "nodes" share this host: the Slurm node of each daemon is in its environment.
    nodes = []
    for rank in (0, 1):
        [daemon] = [p for p in psutil.process_iter(["name", "environ"])
                    if p.info["name"] == "pm-daemon" and (p.info["environ"] or {}).get(
                        "SLURM_JOB_ID") == launch.slurm_id
                    and p.info["environ"].get("SLURM_NODEID") == str(rank)]
        nodes.append(daemon.info["environ"]["SLURMD_NODENAME"])
    assert nodes == ["n1", "n2"]
    status = launch.client("gpu_status").stdout
    assert "Node 0" in status and "Node 1" in status, status

    assert launch.shutdown() == "COMPLETED"
    assert [launch.state(rank)["status"] for rank in (0, 1)] == ["stopped", "stopped"]


def test_local_backend_gives_the_daemon_the_gpu_count_it_was_given(tmp_path):
    env = base_env(tmp_path, QUEUE_ROOT=str(tmp_path))
    run = run_submit(env, "--dry-run", "--backend", "local", "exp1", "4")
    assert run.returncode == 0, run.stderr
    assert ' --node-rank "${PM_LOCAL_RANK:-0}" --num-nodes 1 --gpus 4' in run.stdout, run.stdout
    run = run_submit(env, "--dry-run", "--backend", "local", "exp1")
    assert run.returncode == 0, run.stderr
    assert "--gpus" not in run.stdout  # without a count: every GPU the daemon finds


@needs_namespace
def test_local_backend_with_nodes_starts_a_daemon_per_rank(tmp_path):
    """NODES=2 on one machine: ranks 0 and 1 on one queue folder, a rehearsal of a two-node job
    (a task across both nodes runs, and gpu_shutdown ends both)."""
    root = tmp_path / "queue root"
    root.mkdir()
    instance = root / "pair"
    env = base_env(tmp_path, QUEUE_ROOT=str(root), DAEMON_ARGS=TEST_DAEMON_ARGS)
    wrapper = textwrap.dedent("""\
        "$0" --backend local pair 2 2 || exit
        for pid in $(sed -n 's/^pids=//p' "$QUEUE_ROOT/pair/job_id.txt"); do
          while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
        done
        """)
    out = tmp_path / "submit.out"
    with open(out, "wb") as sink:
        proc = subprocess.Popen([*UNSHARE, "bash", "-c", wrapper, str(SUBMIT)], env=env,
                                stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: "Started the daemon of pair" in out.read_text() or proc.poll(),
                 60, what="submit.sh --backend local pair 2 2")
        assert proc.poll() is None, out.read_text()
        fields = read_fields(instance / "job_id.txt")
        pids = fields["pids"].split()
        assert len(pids) == 2 and fields["pid"] == pids[0]
        for rank in (0, 1):
            state = wait_for(lambda rank=rank: running_state(instance, rank), 20,
                             what=f"node {rank}")
            assert (state["pid"], state["num_nodes"], state["gpu_count"]) == (
                pids[rank], "2", "2")
        cenv = client_env(env, root, "pair")
        client(cenv, "gpu_run", "-n", "2", "-g", "1", 'echo "rank $NODE_RANK of $NNODES"',
               cwd=tmp_path)
        done = wait_for(lambda: done_task(instance, "run_echo_rank_NODE_RANK_of_NNODES_.sh")
                        or done_task(instance, "*"), 40, what="the task across both ranks")
        logs = "".join(p.read_text() for p in (instance / "logs").glob(f"{done.name}.rank*.log"))
        assert "rank 0 of 2" in logs and "rank 1 of 2" in logs
        shutdown(instance, env)
        assert proc.wait(60) == 0, out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

"""Which processes the sweep of a stop spares (kill scope ``user-python``): the daemon's own,
its ancestors, other tasks', and the PID 1 of its namespace, which the daemon need not descend
from (a shell entered into a container with ``docker exec``, ``kubectl exec``, ``nsenter``)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
from conftest import REPO, UNSHARE, command_line, needs_namespace, wait_for

pytestmark = needs_namespace

# A container's init in Python that shuts the container down on SIGTERM (as a Jupyter server,
# supervisord or an entrypoint that handles SIGTERM do): it notes the signal and exits, and the
# kernel then ends every process of its namespace
INIT = textwrap.dedent("""\
    import signal, sys, time
    def down(*_):
        open(sys.argv[1], "w").write("TERM")
        sys.exit(0)
    signal.signal(signal.SIGTERM, down)
    time.sleep(300)
    """)

# A daemon on simulated time, entered into that namespace: a gpu_stop all with nothing running
# sweeps the user's other Python processes, a stray one among them
SWEEP = textwrap.dedent("""\
    import json, os, subprocess, sys, time
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    from pathlib import Path
    from conftest import FakeClock
    import perpetual_motion as pm
    root = Path({root!r})
    clock = FakeClock()
    config = pm.Config(job_id="sweep", queue_root=root, poll_interval=0.1, hours=1.0,
                       keepalive=False, kill_scope="user-python", stop_grace=1.0)
    daemon = pm.Daemon(config, clock=clock, sleep=clock.sleep)
    assert daemon.start() is None
    stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    time.sleep(0.5)
    daemon.ask_sweep()
    for _ in range(40):
        daemon.tick()
        clock.sleep(0.1)
        time.sleep(0.01)
    print(json.dumps({{"ppid": os.getppid(), "stray_ended": stray.poll() is not None}}))
    """)


def test_the_sweep_spares_the_pid_1_of_its_namespace(tmp_path):
    """The sweep spared the daemon's ancestors, and PID 1 only as one of them: from a shell
    entered into a container, a Python init got its SIGTERM, and the container went down with
    the daemon and all its tasks."""
    flag = tmp_path / "init-got-sigterm"
    root = tmp_path / "shared"
    root.mkdir()
    outer = subprocess.Popen([*UNSHARE, sys.executable, "-c", INIT, str(flag)])
    try:
        def init() -> psutil.Process | None:
            found = [p for p in psutil.Process(outer.pid).children()
                     if command_line(p)[:2] == [sys.executable, "-c"]]
            return found[0] if found else None

        pid = wait_for(init, 10, what="the namespace's init").pid
        script = SWEEP.format(repo=str(REPO), tests=str(Path(__file__).parent),
                              root=str(root))
        run = subprocess.run(["nsenter", "-t", str(pid), "-p", "-m", "--", sys.executable,
                              "-c", script], capture_output=True, text=True, timeout=120)
        assert not flag.exists(), "the sweep sent SIGTERM to the namespace's PID 1"
        assert run.returncode == 0, run.stderr[-3000:]
        facts = json.loads(run.stdout.splitlines()[-1])
        assert facts["ppid"] == 0, facts  # (the daemon does not descend from PID 1)
        assert facts["stray_ended"], facts  # the sweep did end the stray Python process
        assert outer.poll() is None
    finally:
        outer.kill()  # --kill-child takes the namespace down with it
        outer.wait()


def test_a_daemon_whose_proc_is_another_namespaces_refuses_to_start(tmp_path):
    """A PID namespace without its own /proc (``unshare --pid --fork`` without
    ``--mount-proc``): /proc shows the processes of the namespace above, under their numbers
    there. Every proof the daemon has (markers, sessions, start times, children) is read
    through /proc, and every signal goes by its own namespace's numbers: a task's leftover that
    carried its marker ran on after the task was recorded done, and a number read in /proc
    names another process in the daemon's namespace. Here the namespace above is the test's
    own, so nothing outside it can be touched."""
    queue_root = tmp_path / "queue"
    queue_root.mkdir()
    log = tmp_path / "daemon.log"
    inner = ["unshare", "--pid", "--fork", sys.executable, str(REPO / "perpetual_motion.py"),
             "--job-id", "nest", "--queue-root", str(queue_root), "--poll-interval", "0.1",
             "--no-keepalive"]
    with open(log, "wb") as out:
        run = subprocess.run([*UNSHARE, "timeout", "20", *inner], stdout=out,
                             stderr=subprocess.STDOUT, timeout=60)
    text = log.read_text()
    assert run.returncode == 1, text
    assert "/proc shows the processes of another PID namespace" in text, text
    assert not (queue_root / "nest" / "nodes" / "node-0.state").exists()

"""What the client shows: gpu_status, gpu_list and their --json, in real bash and zsh.

Queue folders are built by hand exactly as docs/protocol.md says daemons leave them: one of
protocol 1 (the daemon of this branch) and one of protocol 2 (tasks side by side on disjoint GPUs,
a gang across two nodes, a waiting reason). The liveness tests also run a real daemon, in its own
PID namespace, with the client beside it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import psutil
import pytest
from client_helpers import (
    CLIENT,
    INTERACTIVE,
    SHELLS,
    Shell,
    Terminal,
    build_sample,
    build_v2,
    local_minute,
    make_instance,
    make_shell,
    own_identity,
    session_members,
    submit_record,
    submitted_id,
    tid,
    tree,
    write_fields,
)
from conftest import DAEMON, namespace_shell, needs_namespace, wait_for

ESCAPES = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]|\xc2[\x80-\x9f]")  # all but \t, \n; and C1


@pytest.fixture(params=SHELLS)
def sh(request, tmp_path) -> Shell:
    return make_shell(request.param, tmp_path)


def width(line: str) -> int:
    """Terminal columns of ``line``: East Asian wide and fullwidth characters take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in line)


def columns(text: str) -> int:
    return max((width(line) for line in text.splitlines()), default=0)


# gpu_status ######################################################################################


def test_status_of_a_protocol_1_instance(sh):
    s = build_sample(sh.root)
    res = sh.run("gpu_status")
    assert res.rc == 0 and res.err == ""
    lines = res.out.splitlines()
    assert re.fullmatch(rf"          started {local_minute(s.now - 3600)}, auto-shutdown at "
                        rf"{local_minute(s.now + 23 * 3600 + 30)}, heartbeat [2-9]\.?\d?s ago",
                        lines[2]), lines[2]
    assert lines[:2] + lines[3:] == [
        f"Instance: exp1 ({s.inst})",
        "Daemon:   alive on node-a, pid 4242",
        "          keep-alive on",
        "          GPU  MODEL               UTIL   MEMORY (MiB)  TASK OR KEEP-ALIVE",
        "          0    NVIDIA H200          75%   80000/143771  keep-alive holding, tile 4096, "
        "duty 0.85",
        "          1    NVIDIA H200           3%    1000/143771  keep-alive yielded (queue task)",
        "TASK              PRIO STATE       NODE GPUS          TIME  EXIT  COMMAND",
        "train.sh:00000001  500 running     0    -            2h00m        train.sh",
        "eval.sh            001 pending          all                       eval.sh",
        "train.sh:00000003  500 pending          all                       train.sh",
        "zz_manual.sh       --- pending          all                       zz_manual.sh",
        "never.sh           500 cancelled        -        3d00h ago     -  never.sh",
        "train.sh:00000006  500 stopped     0    -        3d00h ago sig15  train.sh",
        "train.sh:00000005  500 done        0    -        3d00h ago     0  train.sh",
        "bad.sh             500 failed      0    -        3d00h ago     3  bad.sh",
        "prep.py            500 done        0    -        3d00h ago     0  prep.py",
        "Totals:   1 running, 3 pending, 2 done, 3 failed, stopped or cancelled",
    ]
    assert sh.run("gpu_status -r 2").out.count(" ago ") == 2
    assert " ago " not in sh.run("gpu_status --recent=0").out


def test_status_r_0_never_says_there_are_no_tasks_when_finished_ones_exist(sh):
    s = build_sample(sh.root)
    (s.inst / "running" / s.running).unlink()
    for task in s.pending:
        (s.inst / "pending" / task).unlink()
    res = sh.run("gpu_status -r 0")
    assert res.rc == 0 and res.err == ""
    assert res.out.splitlines()[-2:] == [
        "Tasks:    none running or pending (-r 0: 5 finished not listed)",
        "Totals:   0 running, 0 pending, 2 done, 3 failed, stopped or cancelled",
    ]
    assert sh.run("gpu_status").out.count(" ago ") == 5  # the default lists them
    for result in (s.inst / "records").glob("*.result"):  # ended, no telling when
        result.unlink()
    assert sh.run("gpu_status").out.splitlines()[-2] == "Tasks:    none running or pending"
    for folder in ("done", "failed"):
        for task in (s.inst / folder).iterdir():
            task.unlink()
    assert sh.run("gpu_status -r 0").out.splitlines()[-2:] == [
        "Tasks:    none",
        "Totals:   0 running, 0 pending, 0 done, 0 failed, stopped or cancelled",
    ]


def test_status_watch_redraws_every_two_seconds_until_ctrl_c(sh):
    s = build_sample(sh.root)
    res = sh.run("gpu_status -w --json; echo \"rc=$?\"")
    assert (res.out, res.err) == ("rc=2\n", "gpu_status: --watch and --json do not go together\n")
    term = Terminal(INTERACTIVE[sh.name], sh.env(PS1="$ ", PROMPT="$ ", TERM="dumb"), sh.cwd)
    try:
        term.send('source "$CLIENT"; gpu_status --watch\r')
        term.expect(r"\x1b\[H\x1b\[2Jgpu_status of exp1, every 2 s \(Ctrl-C ends\) ")
        term.expect(r"Totals:   1 running, 3 pending, ")
        (s.inst / "pending" / tid(90, "new.sh")).write_text("echo\n")
        term.expect(r"\x1b\[H\x1b\[2Jgpu_status of exp1", timeout=5)  # the next frame
        term.expect(r"new\.sh +500 pending")
        term.expect(r"Totals:   1 running, 4 pending, ")
        term.send("\x03")
        term.send("echo back $((6 * 7))\r")
        term.expect("back 42")
        wait_for(lambda: len(session_members(term.pid)) == 1, 5, what="the watch to be gone")
    finally:
        term.close()


def test_status_shows_what_runs_where_from_the_state_of_protocol_2(sh):
    v = build_v2(sh.root)
    res = sh.run("gpu_status")
    assert res.rc == 0 and res.err == ""
    lines = [line for line in res.out.splitlines() if not line.startswith("          started ")]
    assert lines == [
        f"Instance: exp1 ({v.inst})",
        "Node 0:   alive on node-a, pid 100",
        "          keep-alive on, kill scope task, 0 of 4 GPUs free, CPU tasks 0 of 1",
        "          GPU  MODEL               UTIL   MEMORY (MiB)  TASK OR KEEP-ALIVE",
        "          0    NVIDIA H200          90%   70000/143771  sweep-a",
        "          1    NVIDIA H200          90%   70000/143771  sweep-a (keep-alive filling)",
        "          2    NVIDIA H200          90%   70000/143771  sweep.py",
        "          3    NVIDIA H200          90%   70000/143771  train.py",
        "          next:     big.py: waiting for 4 GPUs, 0 free",
        "Node 1:   alive on node-b, pid 101",
        "          keep-alive on, kill scope task, 0 of 2 GPUs free, CPU tasks 0 of 1",
        "          GPU  MODEL               UTIL   MEMORY (MiB)  TASK OR KEEP-ALIVE",
        "          0    NVIDIA H200          90%   70000/143771  train.py",
        "          1    NVIDIA H200          90%   70000/143771  train.py",
        "TASK     PRIO STATE       NODE GPUS          TIME  EXIT  COMMAND",
        "sweep-a   500 running     0    0-1          1m05s        python sweep.py --lr 0.1",
        "sweep.py  500 running     0    2              30s        python sweep.py --lr 0.2",
        "train.py  500 running     1,0  0-1          9m50s        torchrun train.py",
        "big.py    100 pending          4                         python big.py",
        "eval.py   500 pending          1                         python eval.py",
        "dist.py   500 failed      0,1  0       49m10s ago     1  torchrun dist.py",
        "prep.sh   500 done        1    -        1h05m ago     0  prep.sh --fast 'a b'",
        "Totals:   3 running, 2 pending, 1 done, 1 failed, stopped or cancelled",
    ], res.out


def test_status_draws_each_gpus_utilisation_history_as_a_sparkline(sh):
    """gpu.<i>.history (one value per 10 s, oldest first): 20 glyphs of 30 s each."""
    v = build_v2(sh.root)
    state = v.inst / "nodes" / "node-1.state"
    history = ",".join([""] * 30 + ["0"] * 15 + ["100"] * 15)
    steady = ",".join(["75"] * 70)  # more than ten minutes: the oldest are left out
    state.write_text(state.read_text() + f"gpu.0.history={history}\ngpu.1.history={steady}\n")
    res = sh.run("gpu_status")
    assert res.rc == 0 and res.err == "", res.err
    lines = res.out.splitlines()
    start = lines.index("Node 1:   alive on node-b, pid 101")
    assert lines[start + 3:start + 6] == [
        "          GPU  MODEL               UTIL LAST 10 MIN            MEMORY (MiB)  "
        "TASK OR KEEP-ALIVE",
        "          0    NVIDIA H200          90% ..........▁▁▁▁▁█████   70000/143771  train.py",
        "          1    NVIDIA H200          90% ▆▆▆▆▆▆▆▆▆▆▆▆▆▆▆▆▆▆▆▆   70000/143771  train.py",
    ], res.out
    assert columns(res.out) <= 100
    doc = json.loads(sh.run("gpu_status --json").out)
    gpus = doc["nodes"][1]["gpus"]
    assert gpus[0]["history"] == [None] * 30 + [0] * 15 + [100] * 15
    assert gpus[1]["history"] == [75] * 70 and doc["nodes"][0]["gpus"][0]["history"] == []


def test_status_shows_how_keepalive_fares_and_a_gpu_at_risk_loudly(sh):
    """Band and held shares, the last yield and the reclaim risk of each GPU, as the daemon
    publishes them (gpu.<i>.band_10m ... risk), in a line of their own, and in --json."""
    v = build_v2(sh.root)
    state = v.inst / "nodes" / "node-1.state"
    risk = "GPU 1 idle 7 min (3%): keep-alive off: compute mode EXCLUSIVE_PROCESS: skipped"
    yielded = ("foreign process (by process list): worker gone 0.10 s, memory back 0.15 s")
    fields = {"gpu.0.band_10m": "0.987", "gpu.0.band_1h": "1.000", "gpu.0.held_10m": "0.500",
              "gpu.0.held_1h": "0.955", "gpu.0.last_yield": yielded,
              "gpu.0.last_yield_age": "125", "gpu.1.held_10m": "0.000", "gpu.1.risk": risk}
    state.write_text(state.read_text() + "".join(f"{k}={v}\n" for k, v in fields.items()))
    res = sh.run("gpu_status")
    assert res.rc == 0 and res.err == "", res.err
    lines = res.out.splitlines()
    start = lines.index("Node 1:   alive on node-b, pid 101")
    assert lines[start + 5:start + 9] == [
        "               in band 99% (1 h: 100%), held 50% (1 h: 96%); last yield 2m05s ago: "
        "foreign process …",
        "          1    NVIDIA H200          90%   70000/143771  train.py",
        "               held 0%",
        "          !! AT RISK OF RECLAIM: GPU 1 idle 7 min (3%): keep-alive off: compute mode "
        "EXCLUSIVE_PROC…",
    ], res.out
    assert f"          !! AT RISK OF RECLAIM: {risk}" in sh.run("gpu_status -l").out
    assert yielded in sh.run("gpu_status -l").out
    gpus = json.loads(sh.run("gpu_status --json").out)["nodes"][1]["gpus"]
    assert {k: gpus[0][k] for k in ("band_10m", "band_1h", "held_10m", "held_1h", "last_yield",
                                    "last_yield_age", "risk")} == {
        "band_10m": 0.987, "band_1h": 1.0, "held_10m": 0.5, "held_1h": 0.955,
        "last_yield": yielded, "last_yield_age": 125, "risk": None}
    assert gpus[1]["risk"] == risk and gpus[1]["band_10m"] is None


def test_status_shows_a_node_whose_gpus_keepalive_cannot_see_at_risk(sh):
    """NVML that cannot start on a node whose kernel shows GPUs, and no --gpus: no GPU row can
    carry the risk, so the node's own `risk` says it, as loudly."""
    v = build_v2(sh.root)
    state = v.inst / "nodes" / "node-1.state"
    risk = ("every GPU of the node unwatched 7 min: NVML cannot start (Driver/library version "
            "mismatch)")
    state.write_text(state.read_text() + f"risk={risk}\n")
    res = sh.run("gpu_status -l")
    assert res.rc == 0 and res.err == "", res.err
    lines = res.out.splitlines()
    node_1 = lines[lines.index("Node 1:   alive on node-b, pid 101"):]
    assert f"          !! AT RISK OF RECLAIM: {risk}" in node_1[:4], res.out
    assert sum("AT RISK" in line for line in lines) == 1
    assert columns(sh.run("gpu_status").out) <= 100
    nodes = json.loads(sh.run("gpu_status --json").out)["nodes"]
    assert nodes[1]["risk"] == risk and not nodes[0]["risk"]


WIDE_TEXTS = ["plain ascii text", "训练模型的名字", "한국어 이름", "ｆｕｌｌ ｗｉｄｔｈ",
              "ひらがな カタカナ", "😀 rocket 🚀 x", "混合 mixed テキスト 42", "▁▂▃▄▅▆▇█ narrow",
              "é ü ñ ç", "𠀀𠀁 ext-B", "a中b文c字d"]


def test_text_is_cut_and_padded_by_the_columns_it_takes_on_a_terminal(sh):
    probe = """
_gpu_cmd_probe() {
  _gpu_cols "$1"; printf 'cols %s\\n' "$_gpu_cw"
  _gpu_cut "$1" "$2"; printf 'cut %s|\\n' "$_gpu_c"
  _gpu_cut_left "$1" "$2"; printf 'left %s|\\n' "$_gpu_c"
  _gpu_cut_middle "$1" "$2"; printf 'middle %s|\\n' "$_gpu_c"
  _gpu_pad "$1" "$2"; printf 'pad %s|\\n' "$_gpu_pd"
}
"""
    for text in WIDE_TEXTS:
        for limit in (1, 2, 3, 5, 8, 13, 40):
            res = sh.run(f"{probe}\n_gpu_main probe '{text}' {limit}")
            assert res.rc == 0, res.err
            got = dict(line.split(" ", 1) for line in res.out.splitlines())
            assert int(got["cols"]) == width(text), text
            cut, left, middle = got["cut"][:-1], got["left"][:-1], got["middle"][:-1]
            pad = got["pad"][:-1]
            assert pad.rstrip(" ") == text and width(pad) == max(width(text), limit)
            if width(text) <= limit:
                assert cut == left == middle == text
                continue
            dots = "…" if limit > 1 else ""
            assert cut.endswith(dots) and text.startswith(cut[:len(cut) - len(dots)])
            assert left.startswith(dots) and text.endswith(left[len(dots):])
            if limit >= 3:  # a start and an end, the end no wider than the start
                start, end = middle.split("…")
                assert text.startswith(start) and text.endswith(end), (text, middle)
                if width(text) == len(text):  # one column a character: halves, the start ahead
                    assert 1 <= width(end) <= width(start) <= width(end) + 1, (text, middle)
            else:
                assert middle == cut
            for kept in (cut, left, middle):  # no wider than asked, short of it by less than a char
                assert limit - 1 <= width(kept) <= limit, (text, limit, kept)


def test_a_long_name_is_cut_in_the_middle_and_no_cut_reads_as_a_full_stop(sh):
    """A name keeps its start and its end (the seed, the extension); a cut shows as one "…",
    never as ".." after a word (the keep-alive reason of a node without a driver)."""
    inst = make_instance(sh.root)
    task = tid(1, "very-long-experiment-name-with-many-parts-seed3.sh")
    submit_record(inst, task, gpus=1, command="python train.py --seed 3")
    (inst / "pending" / task).write_text("echo\n")
    reason = "off: NVML cannot start (NVML Shared Library Not Found): no NVIDIA driver here?"
    write_fields(inst / "nodes" / "node-0.state", {
        "protocol": 2, "node_rank": 0, "num_nodes": 1, "host": "node-a", "pid": 1,
        "status": "running", "heartbeat": time.time(), "started": time.time(),
        "keepalive": reason, "kill_scope": "task", "gpu_count": 0, "gpus_free": 0,
        "cpu_slots": 1, "cpu_running": 0})
    res = sh.run("gpu_status")
    assert res.rc == 0, res.err
    lines = res.out.splitlines()
    assert f"          keep-alive {reason}…" in lines, res.out  # 100 columns, the rest cut
    assert not [line for line in lines if line.endswith("..")], res.out
    assert re.search(r"^very-long-ex…ts-seed3\.sh +500 pending ", res.out, re.M), res.out
    assert f"keep-alive {reason}, kill scope task" in sh.run("gpu_status -l").out


def test_status_fits_in_100_columns_and_long_shows_whole_ids_and_commands(sh):
    inst = make_instance(sh.root)
    long_name = "an_experiment_with_a_rather_long_descriptive_name_lr0.001_bs512.py"
    command = "python train.py " + " ".join(f"--option{n}=value{n}" for n in range(20))
    tasks = [tid(n, long_name, rand=f"{n:04d}beef") for n in range(3)]
    tasks.append(tid(9, "中文名字.sh"))  # a name the client would not write, put there by hand
    for task in tasks:
        submit_record(inst, task, command=command + " 中文参数" * 10)
        (inst / "pending" / task).write_text("echo\n")
    write_fields(inst / "nodes" / "node-0.state", {
        "protocol": 2, "node_rank": 0, "num_nodes": 1, "host": "h" * 80, "pid": 1,
        "status": "running", "heartbeat": time.time(), "started": time.time(),
        "keepalive": "off: " + "no GPU " * 30, "gpu_count": 1, "gpu.0.name": "N" * 60,
        "gpu.0.state": "yielded", "gpu.0.reason": "foreign process " * 10})
    res = sh.run("gpu_status; gpu_list")
    assert res.rc == 0, res.err
    assert columns(res.out) <= 100, res.out
    rows = [line for line in res.out.splitlines() if " pending " in line]
    names = [row.split()[0] for row in rows]
    # cut in the middle: the start and the end (the :id part) stay
    assert names[:3] == ["an_experimen…512.py:0000", "an_experimen…512.py:0001",
                         "an_experimen…512.py:0002"]
    assert names[3].startswith("500-") and "…" in names[3] and names[3].endswith("名字.sh")
    assert all(row.endswith("…") and width(row) >= 99 for row in rows)  # the width is used
    # the columns line up on the screen, whatever the characters take
    assert len({width(row[:row.index(" 500 pending ")]) for row in rows}) == 1
    long = sh.run("gpu_status -l").out
    for task in tasks:
        assert re.search(rf"^{re.escape(task)} +500 pending .*  {re.escape(command)}"
                         rf"( 中文参数){{10}}$", long, re.M), task
    assert columns(long) > 100


def test_two_tasks_of_one_name_are_told_apart_by_the_shortest_unique_part_of_their_ids(sh):
    inst = make_instance(sh.root)
    tasks = [tid(1, "x.sh", rand="abcd1234"), tid(2, "x.sh", rand="abcd9999"),
             tid(3, "x.sh", rand="12345678"), tid(4, "y.sh")]
    for task in tasks:
        (inst / "pending" / task).write_text("echo\n")
    out = sh.run("gpu_status").out
    assert re.findall(r"^(\S+) +500 pending", out, re.M) == ["x.sh:abcd1", "x.sh:abcd9",
                                                            "x.sh:1234", "y.sh"]
    res = sh.run("gpu_show x.sh:abcd9 | head -1; gpu_show x:1234 | head -1; gpu_stop x.sh:abcd1")
    assert res.out.splitlines() == [f"Task:       {tasks[1]}", f"Task:       {tasks[2]}",
                                    f"cancelled {tasks[0]} (it was pending)"], res.err


def test_status_says_when_no_daemon_runs_a_stopped_one_and_a_dead_one(sh):
    s = build_sample(sh.root, alive=False)
    out = sh.run("gpu_status").out.splitlines()
    assert re.fullmatch(r"Daemon:   DEAD on node-a, pid 4242: no heartbeat for 10m0\ds", out[1])
    assert out[2] == "          likely: the daemon or its node died, or its cluster job ended"
    assert re.fullmatch(rf"          started {local_minute(s.now - 3600)}, heartbeat 10m0\ds ago",
                        out[3]), out[3]
    assert "train.sh:00000001  500 orphaned    0    -            2h00m        train.sh" in out
    assert out[-2] == "orphaned: its daemon is not alive; a new daemon marks it interrupted"
    state = s.inst / "nodes" / "node-0.state"
    state.write_text(state.read_text() + f"status=stopped\nstopped={s.now - 60}\n"
                     "stop_reason=shutdown asked by me@here\n")
    out = sh.run("gpu_status").out.splitlines()
    assert out[1] == (f"Daemon:   stopped {local_minute(s.now - 60)} (shutdown asked by "
                      "me@here) on node-a, pid 4242")
    shutil.rmtree(s.inst / "nodes")
    out = sh.run("gpu_status").out.splitlines()
    assert out[1] == "Daemon:   none has started for this instance yet; tasks wait in pending/"


def test_status_and_list_show_every_node_of_a_multi_node_instance(sh):
    s = build_sample(sh.root)

    def node(rank: int, alive: bool = True, num_nodes: int = 2) -> None:
        write_fields(s.inst / "nodes" / f"node-{rank}.state", {
            "node_rank": rank, "num_nodes": num_nodes, "host": f"node-{rank}", "pid": 10 + rank,
            "status": "running", "heartbeat": s.now - (1 if alive else 600),
            "started": s.now - 60, "shutdown": s.now + 60, "gpu_count": 0})

    node(0)
    node(1, alive=False)
    out = sh.run("gpu_status").out
    assert "\nNode 0:   alive on node-0, pid 10\n" in out
    assert re.search(r"\nNode 1:   DEAD on node-1, pid 11: no heartbeat for 10m0\ds\n", out)
    assert sh.run("gpu_list").out.splitlines()[1].startswith("* exp1    alive    1/2    node-0  ")
    for rank in (0, 1, 2, 10):  # ranks in numeric order; the nodes that wrote no state count
        node(rank, num_nodes=12)
    out = sh.run("gpu_status").out
    assert re.findall(r"^Node (\d+):", out, re.M) == ["0", "1", "2", "10"]
    assert sh.run("gpu_list").out.splitlines()[1].startswith("* exp1    alive    4/12   node-0 ")


def test_a_node_whose_disk_is_full_is_alive_by_its_beat_file(sh):
    """The state file cannot be replaced on a full disk; the beat file, rewritten in place,
    still says when the daemon beat last."""
    s = build_sample(sh.root)
    state = s.inst / "nodes" / "node-0.state"
    state.write_text(re.sub(r"^heartbeat=.*$", f"heartbeat={s.now - 600:.3f}", state.read_text(),
                            flags=re.M) + "node_rank=0\n")
    assert re.search(r"\nDaemon:   DEAD on node-a, pid 4242: no heartbeat for 10m0\ds\n",
                     sh.run("gpu_status").out)
    beat = s.inst / "nodes" / "node-0.beat"
    beat.write_text(f"started=1.000\nbeat=42\ntime={time.time():.3f}\n".ljust(128))
    assert "\nDaemon:   alive on node-a, pid 4242\n" in sh.run("gpu_status").out
    beat.write_text(f"started=1.000\nbeat=43\ntime={s.now - 900:.3f}\n".ljust(128))  # older
    assert "DEAD on node-a, pid 4242: no heartbeat for 10m0" in sh.run("gpu_status").out


def test_a_beat_file_that_is_a_fifo_or_a_link_never_blocks_the_client(sh, tmp_path):
    """Every command that judges a daemon's liveness reads its beat file: a FIFO there (or a
    link to one) would block it for ever; it is not read, and the state file's heartbeat
    counts."""
    v2 = build_v2(sh.root)
    os.mkfifo(v2.inst / "nodes" / "node-0.beat")
    os.mkfifo(tmp_path / "elsewhere")
    (v2.inst / "nodes" / "node-1.beat").symlink_to(tmp_path / "elsewhere")
    res = sh.run("gpu_list; gpu_list --json > /dev/null; gpu_use exp1; gpu_status", timeout=30)
    assert res.rc == 0, res.err
    assert re.search(r"^\* exp1 +alive +2/2 ", res.out, re.M), res.out
    assert "Node 0:   alive on node-a, pid 100\n" in res.out, res.out


def test_a_daemon_that_shuts_down_is_shown_stopping(sh):
    s = build_sample(sh.root)
    state = s.inst / "nodes" / "node-0.state"
    state.write_text(state.read_text().replace("status=running", "status=stopping"))
    assert sh.run("gpu_list").out.splitlines()[1].startswith("* exp1    stopping 1/1    node-a ")
    assert sh.run("gpu_use").out == ("exp1: daemon shutting down on node-a (pid 4242, up 1h00m); "
                                     "1 running, 3 pending, 2 done, 3 failed\n")
    assert sh.run("gpu_status").out.splitlines()[1] == ("Daemon:   alive (shutting down) on "
                                                        "node-a, pid 4242")


# gpu_list ########################################################################################


def test_list_shows_every_instance_with_its_daemon_and_counts_in_100_columns(sh):
    s = build_sample(sh.root)
    write_fields(s.inst / "job_id.txt", {"backend": "sco", "cluster_job_id": "pt-abc123"})
    (sh.root / "queued-only" / "pending").mkdir(parents=True)
    (sh.root / "queued-only" / "pending" / "a.sh").write_text("")
    (sh.root / "launched" / ".staging").mkdir(parents=True)  # as submit.sh leaves it
    write_fields(sh.root / "launched" / "job_id.txt", {"backend": "slurm", "cluster_job_id": 7})
    (sh.root / "not an instance").mkdir()
    (sh.root / "no-instance").mkdir()
    (sh.root / "stray-file").write_text("")
    build_sample(sh.root, "older", alive=False)
    late = build_sample(sh.root, "a-very-long-instance-name-of-40-characters")
    state = late.inst / "nodes" / "node-0.state"
    state.write_text(state.read_text().replace(f"heartbeat={late.now - 2:.3f}",
                                               f"heartbeat={late.now - 30:.3f}"))
    res = sh.run("gpu_list")
    assert res.rc == 0, res.err
    assert res.out == (
        "  JOB_ID              DAEMON   NODES  HOST           UP   LEFT   RUN  PEND  DONE  FAIL"
        "  CLUSTER JOB\n"
        "  a-very-lo…aracters  late     1/1    node-a      1h00m 23h00m     1     3     2     3"
        "  -\n"
        "* exp1                alive    1/1    node-a      1h00m 23h00m     1     3     2     3"
        "  pt-abc123\n"
        "  launched            none     -      -               -      -     0     0     0     0"
        "  7\n"
        "  older               dead     0/1    node-a          -      -     1     3     2     3"
        "  -\n"
        "  queued-only         none     -      -               -      -     0     1     0     0"
        "  -\n"), res.out
    assert columns(res.out) <= 100
    empty = sh.root.parent / "empty root"
    empty.mkdir()
    res = sh.run("gpu_list", QUEUE_ROOT=str(empty))
    assert res.out == f"No instances under {empty} (gpu_submit creates one; so does the daemon).\n"


def test_list_json(sh):
    s = build_sample(sh.root)
    write_fields(s.inst / "job_id.txt", {"backend": "sco", "cluster_job_id": "pt-abc123"})
    build_sample(sh.root, "older", alive=False)
    res = sh.run("gpu_list --json")
    assert res.rc == 0, res.err
    doc = json.loads(res.out)
    assert doc == {"schema": 1, "queue_root": str(sh.root), "instances": [
        {"job_id": "exp1", "in_use": True, "daemon": "alive", "nodes_alive": 1, "nodes": 1,
         "host": "node-a", "counts": {"running": 1, "pending": 3, "done": 2, "failed": 3},
         "cluster_job_id": "pt-abc123"},
        {"job_id": "older", "in_use": False, "daemon": "dead", "nodes_alive": 0, "nodes": 1,
         "host": "node-a", "counts": {"running": 1, "pending": 3, "done": 2, "failed": 3},
         "cluster_job_id": None}]}
    empty = sh.root.parent / "empty"
    empty.mkdir()
    assert json.loads(sh.run("gpu_list --json", QUEUE_ROOT=str(empty)).out) == {
        "schema": 1, "queue_root": str(empty), "instances": []}


# gpu_status --json ###############################################################################


def test_status_json_of_protocol_2(sh):
    v = build_v2(sh.root)
    res = sh.run("gpu_status --json")
    assert res.rc == 0 and res.err == ""
    doc = json.loads(res.out)
    assert (doc["schema"], doc["job_id"], doc["queue_dir"]) == (1, "exp1", str(v.inst))
    assert abs(doc["time"] - time.time()) < 10
    assert [n["rank"] for n in doc["nodes"]] == [0, 1]
    node0 = doc["nodes"][0]
    assert {k: node0[k] for k in ("host", "pid", "status", "liveness", "why", "kill_scope",
                                  "gpus_free", "gpu_count", "num_nodes", "waiting")} == {
        "host": "node-a", "pid": 100, "status": "running", "liveness": "alive", "why": None,
        "kill_scope": "task", "gpus_free": 0, "gpu_count": 4, "num_nodes": 2,
        "waiting": {"id": v.c, "reason": "waiting for 4 GPUs, 0 free"}}
    assert [(g["index"], g["task"], g["state"]) for g in node0["gpus"]] == [
        (0, v.a, "yielded"), (1, v.a, "filling"), (2, v.b, "yielded"), (3, v.g, "yielded")]
    assert node0["gpus"][0]["mem_total_mib"] == 143771
    running = {t["id"]: t for t in doc["running"]}
    assert list(running) == [v.a, v.b, v.g]
    assert {k: running[v.a][k] for k in ("name", "display_name", "priority", "state", "command",
                                         "cwd", "request", "nodes", "gpus", "host")} == {
        "name": "sweep.py", "display_name": "sweep-a", "priority": 500, "state": "running",
        "command": "python sweep.py --lr 0.1", "cwd": "/work/me",
        "request": {"gpus": 2, "nodes": 1, "time_limit": None}, "nodes": [0], "gpus": [0, 1],
        "host": "node-a"}
    assert (running[v.g]["nodes"], running[v.g]["gpus"]) == ([1, 0], [0, 1])
    assert running[v.g]["log"] == str(v.inst / "logs" / f"{v.g}.rank0.log")
    assert running[v.a]["started"] == pytest.approx(v.now - 65, abs=0.01)
    assert [t["id"] for t in doc["pending"]] == [v.c, v.e]  # in run order
    assert doc["pending"][1]["after"] == [v.a]
    assert (doc["pending"][0]["gpus"], doc["pending"][0]["request"]) == (
        None, {"gpus": 4, "nodes": 1, "time_limit": None})
    assert [t["id"] for t in doc["recent"]] == [v.h, v.f]
    # the name gpu_status shows: the --name, else the name part (never null)
    assert running[v.a]["shown_name"] == "sweep-a"
    assert all(t["shown_name"] == (t["display_name"] or t["name"])
               for t in [*doc["running"], *doc["pending"], *doc["recent"]])
    done = doc["recent"][1]
    assert {k: done[k] for k in ("state", "exit_code", "signal", "source", "args", "duration",
                                 "gpus", "nodes")} == {
        "state": "done", "exit_code": 0, "signal": None, "source": "/work/me/prep.sh",
        "args": ["--fast", "a b"], "duration": 100.0, "gpus": [], "nodes": [1]}
    assert doc["recent"][0]["reason"] == "rank 1 failed"
    assert doc["counts"] == {"running": 3, "pending": 2, "done": 1, "failed": 1}
    assert json.loads(sh.run("gpu_status --json -r 1").out)["recent"][0]["id"] == v.h


def test_status_json_of_protocol_1_and_of_an_instance_without_daemon(sh):
    s = build_sample(sh.root)
    doc = json.loads(sh.run("gpu_status --json").out)
    assert doc["nodes"][0]["gpus"][0] == {
        "index": 0, "name": "NVIDIA H200", "uuid": None, "task": None, "state": "holding",
        "reason": None, "util": 75, "mem_used_mib": 80000, "mem_total_mib": 143771,
        "held_mib": None, "tile": 4096, "duty": 0.85, "history": [], "last_yield": None,
        "risk": None, "band_10m": None, "band_1h": None, "held_10m": None, "held_1h": None,
        "last_yield_age": None}
    assert [t["id"] for t in doc["running"]] == [s.running]
    assert [t["id"] for t in doc["pending"]] == s.pending
    assert [t["state"] for t in doc["recent"]] == ["cancelled", "stopped", "done", "failed",
                                                   "done"]
    fresh = make_instance(sh.root, "fresh")
    doc = json.loads(sh.run("gpu_status --json", job_id="fresh").out)
    assert (doc["nodes"], doc["running"], doc["pending"], doc["recent"]) == ([], [], [], [])
    assert doc["queue_dir"] == str(fresh)


# Whatever comes from a file is printed escaped ###################################################

HOSTILE = "\x1b]0;pwned\x07\x1b[2J\x9b31m\u009bx\x7f.sh"


def test_control_characters_from_files_are_printed_escaped(sh):
    s = build_sample(sh.root)
    (s.inst / "pending" / HOSTILE).write_text("echo\n")
    cancelled = tid(30, "c.sh")
    (s.inst / "failed" / cancelled).write_text("echo\n")
    write_fields(s.inst / "records" / f"{cancelled}.result",
                 {"id": cancelled, "state": "cancelled", "reason": "\x1b[31mred\x1b[0m",
                  "ended": time.time()}, mtime=time.time())
    submit_record(s.inst, s.pending[0], command="echo \x1b[1mbold\x1b[0m\ttab",
                  display_name="\x1b[5mblink")
    state = s.inst / "nodes" / "node-0.state"
    state.write_text(state.read_text().replace("host=node-a", "host=\x1b[2Jnode-a")
                     .replace("gpu.1.reason=queue task", "gpu.1.reason=\x07bell\x9b"))
    write_fields(s.inst / "job_id.txt", {"cluster_job_id": "\x1b]8;;http://x\x07link"})
    res = sh.run("gpu_status; gpu_status -l; gpu_list; gpu_show blink 2>&1; gpu_logs; "
                 f"gpu_stop '{HOSTILE}' 2>&1; gpu_use; gpu_show c.sh")
    assert res.rc == 0, res.err
    assert not ESCAPES.search(res.out), res.out
    assert "\\e]0;pwned\\x07\\e[2J" in res.out
    assert "\\e[5mblink" in res.out and "echo \\e[1mbold\\e[0m\\ttab" in res.out
    assert "\\e[2Jnode-a" in res.out and "\\x07bell" in res.out
    assert "\\e[31mred\\e[0m" in res.out and "\\e]8;;http://x\\x07link" in res.out
    assert "\\u009b" in res.out
    # in JSON the values are exact (and stay UTF-8): a script gets what the files hold
    doc = json.loads(sh.run("gpu_status --json").out)
    assert doc["nodes"][0]["host"] == "\x1b[2Jnode-a"
    assert doc["nodes"][0]["gpus"][1]["reason"] == "\x07bell\x9b"
    assert {t["display_name"] for t in doc["pending"]} >= {"\x1b[5mblink"}


def test_fifos_where_records_belong_never_block_the_client(sh):
    """A FIFO where a record, a priority file, a node state or the summary belongs (the folder is
    shared, and a FIFO's open blocks) is never read: each command ends and shows the task by
    what the other files say."""
    v2 = build_v2(sh.root)
    inst = v2.inst
    (inst / "records" / f"{v2.c}.submit").unlink()
    os.mkfifo(inst / "records" / f"{v2.c}.submit")
    (inst / "records" / f"{v2.f}.result").unlink()
    os.mkfifo(inst / "records" / f"{v2.f}.result")
    (inst / "records" / f"{v2.a}.run").unlink()
    os.mkfifo(inst / "records" / f"{v2.a}.run")
    (inst / "priority").mkdir(exist_ok=True)
    os.mkfifo(inst / "priority" / v2.e)
    (inst / "nodes" / "node-1.state").unlink()
    os.mkfifo(inst / "nodes" / "node-1.state")
    os.mkfifo(inst / "summary")
    res = sh.run("gpu_status; gpu_status --json > json.out; gpu_show big.py; gpu_show prep.sh; "
                 "gpu_show sweep-a", timeout=30)
    assert res.rc == 0, res.err
    assert re.search(r"^big\.py +100 pending +", res.out, re.M), res.out
    assert re.search(r"^prep\.sh +500 done +- +- +prep\.sh --fast 'a b'$", res.out, re.M), res.out
    assert re.search(r"^eval\.py +500 pending ", res.out, re.M), res.out
    assert "Task:       " + v2.f in res.out and "Task:       " + v2.a in res.out
    doc = json.loads((sh.cwd / "json.out").read_text())
    assert {t["id"] for t in doc["pending"]} == {v2.c, v2.e}
    assert next(t for t in doc["running"] if t["id"] == v2.a)["state"] == "running"


def test_json_stays_valid_with_names_that_are_not_utf8(sh):
    s = build_sample(sh.root)
    odd = os.fsencode(s.inst / "pending") + b"/caf\xe9 \xff\xfe\xc3.sh"
    with open(odd, "wb") as out:
        out.write(b"echo\n")
    for command in ("gpu_status --json", "gpu_list --json"):
        proc = subprocess.run(sh.argv(command), env=sh.env(), cwd=sh.cwd, capture_output=True)
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout.decode("utf-8"))  # strict UTF-8
    doc = json.loads(subprocess.run(sh.argv("gpu_status --json"), env=sh.env(), cwd=sh.cwd,
                                    capture_output=True).stdout.decode("utf-8"))
    assert "caf\ufffd \ufffd\ufffd\ufffd.sh" in [t["id"] for t in doc["pending"]]


AWKS = {"mawk": ["mawk"], "gawk": ["gawk"], "busybox": ["busybox", "awk"]}
AGES = re.compile(r"\b\d+(?:\.\d)?s\b|\b\d+m\d\ds\b|\b\d+h\d\dm\b|\b\d+d\d\dh\b")


@pytest.mark.parametrize("awk", ["gawk", "busybox"])
def test_every_awk_reads_and_writes_the_tasks_alike(tmp_path, awk):
    """The client's awk programs (the one reading of a task's records, its row and its JSON) give
    the same table, JSON and gpu_show with gawk (most clusters' awk) and BusyBox awk as with mawk
    (Debian's), on tasks of every kind: a gang across nodes, an orphan, odd bytes, arguments."""
    for name in ("mawk", AWKS[awk][0]):
        if shutil.which(name) is None:
            pytest.skip(f"{name} is not installed (.ci/run installs it)")
    sh = make_shell("bash", tmp_path)
    v2 = build_v2(sh.root)
    inst = v2.inst
    (inst / "pending" / HOSTILE).write_text("echo\n")
    odd = tid(40, "odd.sh")
    (inst / "pending" / odd).write_text("echo\n")
    submit_record(inst, odd, display_name="caf\xe9 \u4e2d\u6587 \x9b", argc=3,
                  **{"arg.0": "it's", "arg.1": "", "arg.2": "\x1b[1m"}, envc=2,
                  **{"env.0": "LR=0.1", "env.1": 'Q="x\\y"'}, time_limit=3600)
    (inst / "held").mkdir(exist_ok=True)
    (inst / "held" / odd).write_text("")
    (inst / "priority").mkdir(exist_ok=True)
    write_fields(inst / "priority" / odd, {"priority": "top", "time": time.time()})
    killed = tid(41, "killed.sh")
    (inst / "failed" / killed).write_text("echo\n")
    write_fields(inst / "records" / f"{killed}.result",
                 {"id": killed, "state": "stopped", "signal": 9, "gpus": "0,1,2,5,7",
                  "ended": time.time() - 7200, "duration": "3.25"}, mtime=time.time())
    orphan = tid(42, "orphan.sh")  # runs on node 1, whose daemon stopped
    (inst / "running" / orphan).write_text("echo\n")
    write_fields(inst / "records" / f"{orphan}.run", {"id": orphan, "host": "node-b",
                                                      "node_rank": 1, "gpus": "5",
                                                      "started": time.time() - 100})
    state = inst / "nodes" / "node-1.state"
    state.write_text(state.read_text().replace("status=running", "status=stopped"))
    dirs = {}
    for name, argv in AWKS.items():
        folder = tmp_path / f"awk-{name}"
        folder.mkdir()
        (folder / "awk").write_text(f"#!/bin/sh\nexec {shlex.join(argv)} \"$@\"\n")
        (folder / "awk").chmod(0o755)
        dirs[name] = folder
    script = "gpu_status; gpu_status -l; gpu_show train.py; gpu_show dist.py; gpu_show killed.sh"

    def shown(name: str) -> tuple[str, dict]:
        path = f"{dirs[name]}:{os.environ['PATH']}"
        text = sh.run(script, PATH=path)
        assert text.rc == 0, text.err
        doc = json.loads(sh.run("gpu_status --json", PATH=path).out)
        del doc["time"]
        return AGES.sub("<age>", text.out), doc

    text, doc = shown("mawk")
    assert "sweep-a" in text and "\\u009b" in text and "killed.sh" in text  # read from records
    assert "0-2,5,7" in text and "sig9" in text and re.search(r"orphan\.sh +500 orphaned", text)
    held = next(t for t in doc["pending"] if t["id"] == odd)
    assert held["args"] == ["it's", "", "\x1b[1m"] and held["env"] == {"LR": "0.1", "Q": '"x\\y"'}
    assert held["state"] == "held" and held["priority"] == "top"
    assert (text, doc) == shown(awk)


def test_counts_read_from_files_are_bounded(sh):
    inst = make_instance(sh.root)
    task = tid(1, "x.sh")
    (inst / "running" / task).write_text("echo\n")
    submit_record(inst, task, argc=999999999)
    write_fields(inst / "nodes" / "node-0.state", {
        "protocol": 2, "node_rank": 0, "num_nodes": 999999999999, "host": "h", "pid": 1,
        "status": "running", "heartbeat": time.time(), "started": time.time(),
        "gpu_count": 999999999, "running_count": 999999999, "gpus_free": "²"})
    res = sh.run("gpu_status; gpu_list; gpu_status --json > /dev/null", timeout=120)
    assert res.rc == 0, res.err
    assert len(re.findall(r"^          \d+ +\?", res.out, re.M)) == 1024
    assert "of 999999999 GPUs" not in res.out and "² of" not in res.out
    assert "1/1024" in res.out  # num_nodes bounded too


# Honest liveness ##################################################################################


def test_a_daemon_whose_heartbeat_is_late_is_not_responding(sh):
    s = build_sample(sh.root)
    state = s.inst / "nodes" / "node-0.state"
    state.write_text(re.sub(r"^heartbeat=.*$", f"heartbeat={s.now - 20:.3f}", state.read_text(),
                            flags=re.M))
    out = sh.run("gpu_status").out.splitlines()
    assert re.fullmatch(r"Daemon:   NOT RESPONDING on node-a, pid 4242: its heartbeat is 2\ds old",
                        out[1]), out[1]
    assert out[2] == ("          likely: the daemon is stopped or hung, the shared storage stalls, "
                      "or its node died")
    assert sh.run("gpu_list").out.splitlines()[1].startswith("* exp1    late     1/1    node-a ")
    (sh.cwd / "job.sh").write_text("echo\n")
    res = sh.run("gpu_submit job.sh")
    submitted_id(res)
    assert re.fullmatch(r"gpu_submit: the daemon of exp1 is not responding \(its heartbeat is 2\ds "
                        r"old; likely the daemon is stopped or hung, the shared storage stalls, or "
                        r"its node died\): the task waits in pending/\n", res.err), res.err
    res = sh.run("gpu_stop eval; echo \"rc=$?\"", GPU_REPLY_TIMEOUT="1")
    assert res.out == "rc=1\n"
    assert "on NFS" not in res.err and "likely the daemon is stopped or hung" in res.err
    assert re.search(r"no reply from the daemon within 1 s: the command is withdrawn \(commands/"
                     r"\S+ removed\), so no daemon carries it out later; the daemon of exp1 is "
                     r"not responding \(its heartbeat is 2\ds old;", res.err), res.err


def pm_daemon_process(tmp_path: Path) -> subprocess.Popen:
    """A live process whose name is pm-daemon, as a daemon of protocol 2 names itself."""
    exe = tmp_path / "pm-daemon"
    shutil.copy(shutil.which("sleep"), exe)
    return subprocess.Popen([str(exe), "600"])


def test_a_daemon_on_this_host_is_judged_by_its_process(sh, tmp_path):
    s = build_sample(sh.root)  # its heartbeat is fresh
    state = s.inst / "nodes" / "node-0.state"
    gone = subprocess.Popen(["true"])
    gone.wait()
    fields = own_identity()
    text = state.read_text().replace("protocol=1", "protocol=2").replace("host=node-a",
                                                                        f"host={fields['host']}")
    state.write_text(text + f"boot_id={fields['boot_id']}\npid_ns={fields['pid_ns']}\n")

    def with_pid(pid: int) -> None:
        state.write_text(re.sub(r"^pid=.*$", f"pid={pid}", state.read_text(), flags=re.M))

    with_pid(gone.pid)
    host = fields["host"]
    out = sh.run("gpu_status").out.splitlines()
    assert out[1] == (f"Daemon:   DEAD on {host}, pid {gone.pid}: its process (pid {gone.pid}) "
                      "is gone")
    assert out[2] == ("          likely: it was killed (kill -9, the OOM killer) or crashed; see "
                      "its daemon.log")
    assert sh.run("gpu_list").out.splitlines()[1].startswith("* exp1    dead ")
    res = sh.run("gpu_stop eval; echo \"rc=$?\"", GPU_REPLY_TIMEOUT="1")
    assert res.out == f"cancelled {s.pending[0]} (it was pending)\nrc=0\n"  # at once, offline
    assert res.err == (f"gpu_stop: no daemon is alive for exp1 (its process (pid {gone.pid}) is "
                       "gone; likely it was killed (kill -9, the OOM killer) or crashed; see its "
                       "daemon.log): only pending tasks can be cancelled\n")
    other = subprocess.Popen(["sleep", "600"])
    daemon = pm_daemon_process(tmp_path)
    try:
        with_pid(other.pid)
        assert sh.run("gpu_status").out.splitlines()[1] == (
            f"Daemon:   DEAD on {host}, pid {other.pid}: pid {other.pid} is now another program "
            "(sleep)")
        with_pid(daemon.pid)  # a daemon that started an hour after this state file
        assert sh.run("gpu_status").out.splitlines()[1:3] == [
            f"Daemon:   DEAD on {host}, pid {daemon.pid}: pid {daemon.pid} is now a daemon "
            "that started later",
            "          likely: the daemon died and its pid was reused (by a daemon of another "
            "instance?)"]
        state.write_text(re.sub(r"^started=.*$", f"started={time.time():.3f}",
                                state.read_text(), flags=re.M))
        assert sh.run("gpu_status").out.splitlines()[1] == (f"Daemon:   alive on {host}, pid "
                                                            f"{daemon.pid}")
        # its heartbeat ten minutes old, its process stopped: not responding, and what to do
        state.write_text(re.sub(r"^heartbeat=.*$", f"heartbeat={time.time() - 600:.3f}",
                                state.read_text(), flags=re.M))
        daemon.send_signal(signal.SIGSTOP)
        wait_for(lambda: psutil.Process(daemon.pid).status() == psutil.STATUS_STOPPED, 5,
                 what="the stopped process")
        # (the age is in whole seconds: a second may pass on a loaded machine)
        lines = sh.run("gpu_status").out.splitlines()
        late = rf"Daemon:   NOT RESPONDING on {re.escape(host)}, pid {daemon.pid}: "
        assert re.fullmatch(late + r"stopped, no heartbeat for 10m0\ds", lines[1]), lines
        assert lines[2] == (f"          likely: SIGSTOP or Ctrl-Z: kill -CONT {daemon.pid} "
                            f"resumes it (kill -9 {daemon.pid} ends it)")
        daemon.send_signal(signal.SIGCONT)
        lines = sh.run("gpu_status").out.splitlines()
        assert re.fullmatch(late + r"runs, but no heartbeat for 10m0\ds", lines[1]), lines
        assert lines[2] == (f"          likely: hung (on the shared storage?): kill -9 "
                            f"{daemon.pid} ends it; then start it again")
    finally:
        for proc in (other, daemon):
            proc.kill()
            proc.wait()


@needs_namespace
def test_e2e_a_daemon_killed_with_9_is_dead_at_once_on_its_host(tmp_path):
    """The client beside a real daemon, in one PID namespace: after kill -9 the status says so
    at once (its heartbeat is fresh for a minute), and gpu_stop does not blame NFS."""
    root = tmp_path / "root"
    root.mkdir()
    script = f"""
set -u
{shlex.quote(sys.executable)} {DAEMON} --job-id exp1 --queue-root {root} \\
    --poll-interval 0.1 --no-keepalive \\
    --kill-scope task > {tmp_path}/daemon.log 2>&1 &
daemon=$!
for _ in $(seq 100); do [ -f {root}/exp1/nodes/node-0.state ] && break; sleep 0.1; done
export QUEUE_ROOT={root} JOB_ID=exp1 GPU_REPLY_TIMEOUT=2
source {CLIENT}
gpu_run 'sleep 60' > /dev/null 2>&1
for _ in $(seq 100); do [ -n "$(ls {root}/exp1/running)" ] && break; sleep 0.1; done
gpu_run 'echo later' > /dev/null 2>&1
gpu_status | sed -n 2p
kill -9 "$daemon"; wait "$daemon"
gpu_status
gpu_stop run_echo_later; echo "stop rc=$?"
gpu_stop run_sleep_60; echo "stop rc=$?"
"""
    log = tmp_path / "out.log"
    with namespace_shell(script, log) as proc:
        proc.wait(60)
    out = log.read_text()
    assert re.search(r"^Daemon:   alive on \S+, pid \d+$", out, re.M), out
    assert re.search(r"^Daemon:   DEAD on \S+, pid \d+: its process \(pid \d+\) is gone$", out,
                     re.M), out
    assert "likely: it was killed (kill -9, the OOM killer) or crashed" in out
    assert re.search(r"^run_sleep_60.sh +500 orphaned ", out, re.M), out
    assert re.search(r"^cancelled \S+-run_echo_later.sh \(it was pending\)\nstop rc=0$", out,
                     re.M), out
    assert "is in running/ but its daemon is not alive" in out
    assert "NFS" not in out and "no reply" not in out


# QUEUE_ROOT from submit.conf ######################################################################


@pytest.fixture
def client_copy(tmp_path) -> Path:
    """client.sh in a folder of its own, where a submit.conf can lie beside it."""
    folder = tmp_path / "checkout"
    folder.mkdir()
    shutil.copy(CLIENT, folder / "client.sh")
    return folder


@pytest.mark.parametrize("line", [
    'QUEUE_ROOT="{root}"', "QUEUE_ROOT='{root}'", "export QUEUE_ROOT={root}  # the AFS one",
    '  QUEUE_ROOT="$HOME/{rel}"', "QUEUE_ROOT=${{HOME}}/{rel}", "QUEUE_ROOT=~/{rel}"])
@pytest.mark.parametrize("shell", SHELLS)
def test_queue_root_comes_from_submit_conf_beside_the_client(shell, client_copy, tmp_path, line):
    home = tmp_path / "home"
    root = home / "q"
    root.mkdir(parents=True)
    build_sample(root)
    (client_copy / "submit.conf").write_text("#QUEUE_ROOT=/nowhere\nCONDA_ENV=x\n"
                                             + line.format(root=root, rel="q") + "\n")
    sh = Shell(shell, root, home, tmp_path, client=client_copy / "client.sh")
    res = sh.run("gpu_status | head -1; gpu_help | grep QUEUE_ROOT=", QUEUE_ROOT=None)
    assert res.out == (f"Instance: exp1 ({root}/exp1)\n          QUEUE_ROOT={root} (from "
                       f"{client_copy}/submit.conf)\n"), res.err
    other = tmp_path / "other"
    other.mkdir()
    assert sh.run("gpu_list", QUEUE_ROOT=str(other)).out.startswith("No instances under "
                                                                     f"{other} ")  # env wins


@pytest.mark.parametrize("shell", SHELLS)
def test_submit_conf_is_read_never_run(shell, client_copy, tmp_path):
    marker = tmp_path / "ran"
    (client_copy / "submit.conf").write_text(f"touch {marker}\nQUEUE_ROOT=$(touch {marker})/q\n")
    sh = Shell(shell, tmp_path, tmp_path, tmp_path, client=client_copy / "client.sh")
    before = tree(tmp_path)
    res = sh.run("gpu_status; echo \"rc=$?\"", QUEUE_ROOT=None)
    assert res.out == "rc=1\n"
    assert res.err == (f"gpu_status: {client_copy}/submit.conf sets QUEUE_ROOT to $(touch "
                       f"{marker})/q, which the client does not evaluate (it reads the file, it "
                       "does not run it): export QUEUE_ROOT instead\n")
    assert not marker.exists() and tree(tmp_path) == before
    (client_copy / "submit.conf").write_text("CONDA_ENV=x\n")  # no QUEUE_ROOT: the default
    res = sh.run("gpu_status; echo \"rc=$?\"", QUEUE_ROOT=None)
    assert res.err.startswith(f"gpu_status: the queue root {tmp_path}/gpu_queue does not exist ")


def test_e2e_json_is_written_by_the_shell_alone(sh, tmp_path):
    """No Python, no jq on the login node: gpu_status --json with a PATH of coreutils only."""
    build_v2(sh.root)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("ls", "sed", "sort", "date", "head", "tail", "wc", "find", "grep", "paste",
                 "cat", "od", "tr", "readlink", "uname", "id", "sleep", "mv", "cp", "rm", "dd",
                 "mkdir", "xargs"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    argv = sh.argv("gpu_status --json; gpu_list --json")
    argv[0] = shutil.which(argv[0])  # the shell itself by its full path
    proc = subprocess.run(argv, env=sh.env(PATH=str(bin_dir)), cwd=sh.cwd, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.split("\n{", 1)
    assert json.loads(first)["counts"]["running"] == 3  # parsed with Python's json
    assert json.loads("{" + second)["instances"][0]["job_id"] == "exp1"


def test_a_gpu_set_aside_for_a_waiting_rank_says_for_which_task(sh):
    v = build_v2(sh.root)
    state = v.inst / "nodes" / "node-0.state"
    text = state.read_text().replace("gpu.3.task=", "gpu.3.reserved=", 1)
    state.write_text(text)
    res = sh.run("gpu_status")
    assert res.rc == 0, res.err
    assert re.search(r"^ +3 .* reserved for \S+, keep-alive \S+", res.out, re.M), res.out
    assert not re.search(r"^ +3 .*  keep-alive \S+ *$", res.out, re.M)



def test_status_shows_each_task_once_while_the_daemon_claims_and_finishes_tasks(sh):
    """A task claimed (pending -> running) and another finished (running -> done) while
    gpu_status lists the folders: each is shown once, where it is after the move, never twice
    and never not at all. The move happens just after the first of the two listings, whichever
    gpu_status makes first."""
    inst = make_instance(sh.root)
    claimed, finished, waiting = tid(1, "claimed.sh"), tid(2, "finished.sh"), tid(3, "later.sh")
    for task in (claimed, waiting):
        submit_record(inst, task)
        (inst / "pending" / task).write_text("true\n")
    submit_record(inst, finished)
    (inst / "running" / finished).write_text("true\n")
    copy = ("functions[_gpu_list_names_real]=$functions[_gpu_list_names]" if sh.name == "zsh"
            else 'eval "$(declare -f _gpu_list_names | sed 1s/_names/_names_real/)"')
    script = f"""{copy}
_gpu_list_names() {{
  _gpu_list_names_real "$1"
  case ${{1##*/}}:${{moved-}} in
    pending: | running:)
      moved=1
      command mv "$Q/pending/{claimed}" "$Q/running/{claimed}"
      printf 'id={finished}\\nstate=done\\nexit_code=0\\nended=1800000001\\n' \\
        > "$Q/records/{finished}.result"
      command mv "$Q/running/{finished}" "$Q/done/{finished}" ;;
  esac
}}
gpu_status --json -r 100
"""
    res = sh.run(script, Q=str(inst))
    assert res.rc == 0 and res.err == "", res.err
    doc = json.loads(res.out)
    shown = {key: [t["id"] for t in doc[key]] for key in ("running", "pending", "recent")}
    assert shown == {"running": [claimed], "pending": [waiting], "recent": [finished]}
    assert doc["counts"] == {"running": 1, "pending": 1, "done": 1, "failed": 0}

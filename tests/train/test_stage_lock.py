"""One training run per stage folder (issue 16, item 2): a second process is refused at once, naming the
holder (host, pid, start time); the lock goes with its holder, kill -9 included; a run of several ranks
holds it once (rank 0), and a refusal reaches every rank; in-process runs release it when they end."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_bind_loopback import DEEPSPEED, Running, env_for

from _train_world import TRAIN_PY, child_env, free_port, run_train
from toollmm.core.config import load_config
from toollmm.train.lock import LOCK_FILE, StageLock, StageLockedError

HOLDER = """
import sys, time
from toollmm.train.lock import StageLock
StageLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def start_holder(stage_dir: Path) -> subprocess.Popen:
    """Another process holding the lock through the API (what rank 0 of a run does)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(stage_dir)], stdout=subprocess.PIPE, text=True, env=child_env()
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def kill9(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_second_process_refused_naming_holder_and_kill9_leaves_no_stale_lock(tmp_path):
    stage = tmp_path / "run" / "stage_1"
    holder = start_holder(stage)
    try:
        t0 = time.monotonic()
        with pytest.raises(StageLockedError) as e:
            StageLock(stage).acquire()
        msg = str(e.value)
        assert time.monotonic() - t0 < 2  # refused at once, not after waiting
        assert f"host {socket.gethostname()}, pid {holder.pid}, started 20" in msg and str(stage) in msg
        info = json.loads((stage / LOCK_FILE).read_text())
        assert info["pid"] == holder.pid and info["host"] == socket.gethostname()
    finally:
        kill9(holder)
    with StageLock(stage) as lock:  # no stale lock after kill -9: the kernel dropped it with the process
        assert lock.held
    StageLock(stage).acquire().release()  # and released again


FORKING_HOLDER = """
import os, sys, time
from toollmm.train.lock import StageLock
StageLock(sys.argv[1]).acquire()
child = os.fork()
if child == 0:  # like a DataLoader worker: inherits the open lock file, outlives a killed parent
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
time.sleep(600)
"""


def test_lock_dies_with_its_holder_not_with_forked_children(tmp_path):
    """A forked child (a DataLoader worker) must not keep a killed run's lock alive."""
    stage = tmp_path / "stage_2"
    holder = subprocess.Popen(
        [sys.executable, "-c", FORKING_HOLDER, str(stage)], stdout=subprocess.PIPE, text=True, env=child_env()
    )
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(StageLockedError, match=f"pid {holder.pid}"):
            StageLock(stage).acquire()
        kill9(holder)
        os.kill(child, 0)  # the child still runs...
        StageLock(stage).acquire().release()  # ...and the lock is free
    finally:
        kill9(holder)
        os.kill(child, signal.SIGKILL)


def test_train_py_refuses_a_held_stage_folder_and_changes_nothing(tmp_path):
    """The real entry point: exit 2, one line naming the holder; nothing written into the folder."""
    stage = tmp_path / "out" / "r" / "stage_1"
    holder = start_holder(stage)
    try:
        log = tmp_path / "train.log"
        code = run_train(["--stage", "1", f"run.output_root={tmp_path / 'out'}", "run.name=r"], log, 300)
        text = log.read_text()
        assert code == 2, text[-3000:]
        assert f"pid {holder.pid}" in text and "in use by another training run" in text
        assert "Traceback" not in text
        assert sorted(p.name for p in stage.iterdir()) == [LOCK_FILE]
        assert json.loads((stage / LOCK_FILE).read_text())["pid"] == holder.pid  # its content untouched
    finally:
        kill9(holder)


@pytest.mark.slow  # two ranks through the DeepSpeed launcher (~10-20 s on 2 cores)
def test_ranks_hold_the_lock_once_and_a_refusal_reaches_every_rank(tmp_path):
    """Two ranks (DeepSpeed launcher, gloo): both get in (only rank 0 locks: rank 1 locking too would
    refuse its own run); a second two-rank run on the same folder is refused on BOTH ranks, naming the
    first run's rank 0, and exits (no rank left waiting); once the first ends the folder is free."""
    stage = tmp_path / "stage_3"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()

    def launch(sub: str) -> Running:
        cmd = [str(DEEPSPEED), "--master_port", str(free_port()), "--num_gpus", "2"]
        return Running(tmp_path / sub, cmd, 2, env_for(), extra=[str(stage)])

    first = launch("a")
    try:
        a0, a1 = first.reports()
        assert a0["locked"] and a1["locked"], (a0, a1)
        second = launch("b")
        try:
            b0, b1 = second.reports()
            for rep in (b0, b1):
                assert f"pid {a0['pid']}" in rep["refused"], rep
        finally:
            second.finish()
        with pytest.raises(StageLockedError, match=f"pid {a0['pid']}"):
            StageLock(stage).acquire()
    finally:
        first.finish()
    StageLock(stage).acquire().release()


def test_in_process_run_releases_the_lock_when_it_fails(tmp_path):
    """``run_stage`` in-process (tests, notebooks): the lock is held during the run and released when it
    ends, here by an error raised inside it (stage 2 without a stage 1 to start from)."""
    from toollmm.train.loop import run_stage, stage_dir_of

    loaded = load_config(stage=2, overrides=[f"run.output_root={tmp_path}", "run.name=r"])
    stage = stage_dir_of(loaded.config)
    with pytest.raises(ValueError, match="holds no finished stage 1"):
        run_stage(loaded)
    assert (stage / LOCK_FILE).is_file()  # it was taken...
    StageLock(stage).acquire().release()  # ...and released (same process, another open file: refused if held)
    holder = start_holder(stage)
    try:  # and in-process run_stage is refused too when another process holds it
        with pytest.raises(StageLockedError, match=f"pid {holder.pid}"):
            run_stage(loaded)
    finally:
        kill9(holder)


@pytest.mark.slow  # two real training runs on the tiny world (~1-2 min on 2 cores)
def test_two_real_runs_on_one_stage_folder(train_world, tmp_path):
    """``code/train.py`` twice on one stage folder: the second is refused while the first trains (its
    metrics untouched); after ``kill -9`` of the first, a new run goes ahead and finishes."""
    args = train_world.args(1, "locked", "train.max_steps=100000", init_from=None)
    stage = train_world.stage_dir("locked", 1)
    with open(tmp_path / "first.log", "w") as f:
        first = subprocess.Popen(
            [sys.executable, str(TRAIN_PY), *args], stdout=f, stderr=subprocess.STDOUT, env=child_env()
        )
    try:
        deadline = time.monotonic() + 300
        while not any('"step"' in x for x in _lines(stage / "metrics.jsonl")):
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(0.2)
        code = run_train(args, tmp_path / "second.log", 300)
        text = (tmp_path / "second.log").read_text()
        assert code == 2 and f"pid {first.pid}" in text, text[-3000:]
        assert first.poll() is None  # the first run goes on
    finally:
        kill9(first)
    code = run_train([*args, "train.max_steps=2"], tmp_path / "third.log", 600)
    assert code == 0, (tmp_path / "third.log").read_text()[-3000:]
    assert (stage / "stage.json").is_file()


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []

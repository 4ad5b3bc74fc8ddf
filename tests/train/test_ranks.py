"""Two real ranks (gloo): every rank takes the same number of steps even when one rank's data is all bad."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from _datastream import make_source

HERE = Path(__file__).parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_take_equal_steps_when_one_ranks_data_is_all_bad(tmp_path, tiny_tokenizer_dir):
    path = make_source(tmp_path, 24)
    lines = path.read_text().splitlines()
    for k in range(1, 24, 2):  # shuffle off: rank 1 gets every odd line; break each one in some way
        lines[k] = ["{not json", lines[k].replace('"messages"', '"messagez"')][k % 4 == 1]
    path.write_text("\n".join(lines) + "\n")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE / "_rank_worker.py"),
                str(path),
                str(tiny_tokenizer_dir),
                str(tmp_path / f"r{r}.json"),
            ],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    try:
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    r0, r1 = (json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2))
    assert r0["steps"] == r1["steps"] == 2 * 6  # 12 planned samples per rank / micro-batch 2, two epochs
    assert r1["ids"] == [] and r1["padding_batches"] == 12 and sum(r1["skipped"].values()) == 24
    assert r1["skipped"] == {"malformed_json": 12, "unknown_key": 12}
    assert sorted(set(r0["ids"])) == [f"syn-{i:05d}" for i in range(0, 24, 2)] and r0["padding_batches"] == 0
    assert r0["synced"] == r1["synced"] and min(r0["synced"]) > 0  # the all_reduce saw rank 0's real tokens

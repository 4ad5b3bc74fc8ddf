"""One rank of a real process group, started by tests/train/test_bind_loopback.py and tests/train/test_stage_lock.py.

    python tests/_dist_worker.py OUT GO [HOLD_DIR]

Joins the group through ``toollmm.train.ds.init_distributed`` (what ``code/train.py`` runs), makes one
all_reduce, then writes ``OUT`` (``RANK`` in it replaced by the rank): this process's listening TCP sockets,
MASTER_PORT and the socket-interface variables; with ``HOLD_DIR``, also whether ``hold_stage`` (the
training run's stage lock) let it in, or the refusal. It then waits (holding the lock, if it got it) until
the file ``GO`` exists, so the test can look at the running process.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import psutil
import torch

from toollmm.core.paths import ensure_torch_extensions_dir
from toollmm.train.ds import init_distributed, rendezvous_port, shutdown_distributed


def listening() -> list[list]:
    conns = psutil.Process().net_connections(kind="inet")
    return sorted({(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN})


def report_and_wait(report: dict, out: str, go: str) -> None:
    Path(out.replace("RANK", str(report["rank"]))).write_text(json.dumps(report))
    deadline = time.monotonic() + 120
    while not Path(go).exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def main(out: str, go: str, hold: str | None) -> None:
    ensure_torch_extensions_dir()
    rank, _, world = init_distributed()
    t = torch.ones(1)
    torch.distributed.all_reduce(t)
    report = {
        "rank": rank,
        "pid": os.getpid(),
        "world": world,
        "sum": t.item(),
        "port": rendezvous_port(),
        "listening": listening(),
        "ifnames": {k: os.environ.get(k) for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")},
    }
    if hold is None:
        report_and_wait(report, out, go)
    else:
        from toollmm.train.lock import StageLockedError, hold_stage  # only here: old code has no lock

        try:
            with hold_stage(hold, rank):
                report_and_wait({**report, "locked": True}, out, go)
        except StageLockedError as e:
            report_and_wait({**report, "refused": str(e)}, out, go)
    shutdown_distributed()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the DeepSpeed launcher adds it
    main(args[0], args[1], args[2] if len(args) > 2 else None)

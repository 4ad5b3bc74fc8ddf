"""Training's listening sockets (issue 16, item 4), read from real running process groups: a one-node run
listens on loopback only (the rendezvous store and gloo's own sockets), through the launcher-less single
process and through the DeepSpeed launcher with two ranks; a MASTER_ADDR naming one of this host's
interfaces (a multi-node run) binds that address only. torch's env:// rendezvous bound ``*:MASTER_PORT``."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from _train_world import child_env, free_port
from toollmm.core.paths import REPO_ROOT

HERE = Path(__file__).parents[1]
WORKER = HERE / "_dist_worker.py"
DEEPSPEED = REPO_ROOT / ".venv" / "bin" / "deepspeed"
IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def host_address() -> tuple[str, str] | None:
    """(interface, IPv4 address) of one of this host's non-loopback interfaces, if it has one."""
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback:
                return name, a.address
    return None


def loopback_interface() -> str:
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == "127.0.0.1" for a in addrs):
            return name
    raise AssertionError("no loopback interface")


def env_for(**extra: str) -> dict:
    env = child_env(**extra)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env["PYTHONPATH"]])
    for k in IFNAME_VARS:  # a run earlier in this test process may have set them
        if k not in extra:
            env.pop(k, None)
    return env


class Running:
    """Worker processes of one group; ``reports()`` waits for every rank's report while they run."""

    def __init__(self, tmp: Path, cmd: list[str], ranks: int, env: dict, extra: list[str] = ()):
        self.tmp, self.ranks, self.go = tmp, ranks, tmp / "go"
        self.log = tmp / "log.txt"
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(
                [*cmd, str(WORKER), str(tmp / "rRANK.json"), str(self.go), *extra],
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def reports(self, timeout: float = 240) -> list[dict]:
        paths = [self.tmp / f"r{r}.json" for r in range(self.ranks)]
        deadline = time.monotonic() + timeout
        while not all(p.is_file() for p in paths):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"worker ended or hung:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.1)
        time.sleep(0.1)  # let the writer close the file
        return [json.loads(p.read_text()) for p in paths]

    def finish(self) -> None:
        self.go.touch()
        try:
            code = self.proc.wait(timeout=60)
        finally:
            self.stop()
        assert code == 0, self.log.read_text()[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()


def refused(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=5):
            return False
    except ConnectionRefusedError:
        return True


def test_one_process_without_launcher_listens_on_loopback_only(tmp_path):
    run = Running(tmp_path, [sys.executable], 1, env_for())  # no MASTER_*: what code/train.py alone does
    try:
        (rep,) = run.reports()
        port = rep["port"]
        assert rep["sum"] == 1.0
        assert [port] == [p for ip, p in rep["listening"] if p == port]  # the store listens...
        assert {ip for ip, _ in rep["listening"]} == {"127.0.0.1"}, rep  # ...and every socket on loopback
        assert rep["ifnames"] == dict.fromkeys(IFNAME_VARS, loopback_interface())
        other = host_address()
        if other is not None:  # from another address of this host: nobody listens there
            assert refused(other[1], port)
        assert not refused("127.0.0.1", port)
    finally:
        run.finish()


@pytest.mark.slow  # two ranks through the DeepSpeed launcher (~10-20 s on 2 cores)
def test_two_ranks_through_the_deepspeed_launcher_listen_on_loopback_only(tmp_path):
    port = free_port()
    cmd = [str(DEEPSPEED), "--master_port", str(port), "--num_gpus", "2"]
    run = Running(tmp_path, cmd, 2, env_for())
    try:
        r0, r1 = run.reports()
        assert r0["sum"] == r1["sum"] == 2.0 and r0["port"] == r1["port"] == port
        assert (("127.0.0.1", port)) in map(tuple, r0["listening"])  # rank 0 serves the store
        assert port not in [p for _, p in r1["listening"]]
        for rep in (r0, r1):
            assert rep["listening"] and {ip for ip, _ in rep["listening"]} == {"127.0.0.1"}, rep
        other = host_address()
        if other is not None:
            assert refused(other[1], port)
    finally:
        run.finish()


def test_master_addr_of_a_host_interface_binds_that_address_only(tmp_path):
    other = host_address()
    if other is None:
        pytest.skip("this host has no non-loopback IPv4 address")
    iface, address = other
    port = free_port()
    env = env_for(MASTER_ADDR=address, MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    run = Running(tmp_path, [sys.executable], 1, env)
    try:
        (rep,) = run.reports()
        assert rep["port"] == port and (address, port) in map(tuple, rep["listening"])
        assert {ip for ip, _ in rep["listening"]} == {address}, rep  # gloo follows the same interface
        assert rep["ifnames"]["GLOO_SOCKET_IFNAME"] == iface and rep["ifnames"]["NCCL_SOCKET_IFNAME"] is None
        assert refused("127.0.0.1", port)  # not the wildcard address
    finally:
        run.finish()

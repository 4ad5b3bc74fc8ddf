"""The process group's listening sockets, bound to the one address the ranks use, never to every interface.

torch's ``env://`` rendezvous starts rank 0's TCPStore server on the wildcard address (``*:MASTER_PORT``,
IPv4 and IPv6), whatever ``MASTER_ADDR`` says: anyone who can reach the host can talk to the store that
coordinates the run. Here rank 0 binds the listening socket itself and hands it to the TCPStore
(``master_listen_fd``, torch's supported way to choose the server socket):

* ``MASTER_ADDR`` is a loopback address (one node: ``scripts/train.sh`` and the DeepSpeed launcher on one
  host pass 127.0.0.1, a launcher-less process gets it by default): the store listens on loopback only, and
  so do the backends' own sockets (``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` default to the loopback
  interface);
* any other ``MASTER_ADDR`` (several nodes: the hostfile's first host): the store listens on that address
  only (rank 0 runs on the host that owns it), and gloo's sockets default to the interface that routes to
  it. NCCL picks its own interface per address (never the wildcard); set ``NCCL_SOCKET_IFNAME`` to choose.

Variables the user set are never overridden. Under torchrun's agent store (``TORCHELASTIC_USE_AGENT_STORE``)
the agent owns the store and torch's own rendezvous is used unchanged.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
from datetime import timedelta

log = logging.getLogger(__name__)


def _resolve(host: str) -> tuple[int, str]:
    """(address family, numeric address) of ``host``, the first answer getaddrinfo gives (as clients see it)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise RuntimeError(f"MASTER_ADDR={host!r} does not resolve: {e}") from None
    family, _, _, _, addr = infos[0]
    return family, addr[0]


def is_loopback(host: str) -> bool:
    """True when ``host`` (name or address) resolves to a loopback address: a one-node run."""
    return ipaddress.ip_address(_resolve(host)[1].split("%")[0]).is_loopback


def interface_of(address: str) -> str | None:
    """The name of the network interface that holds ``address`` (None if no interface does)."""
    import psutil

    want = ipaddress.ip_address(address.split("%")[0])
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    if ipaddress.ip_address(a.address.split("%")[0]) == want:
                        return name
                except ValueError:
                    continue
    return None


def local_address_towards(host: str, port: int) -> str:
    """This host's address on the route to ``host`` (a UDP connect sends nothing; it only picks a route)."""
    family, addr = _resolve(host)
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((addr, port or 9))
        return s.getsockname()[0]


def set_socket_interfaces(master_addr: str, port: int) -> dict[str, str]:
    """Default ``GLOO_SOCKET_IFNAME`` (and, on one node, ``NCCL_SOCKET_IFNAME``) to the interface the run
    uses; returns what was set. Values already in the environment win."""
    single = is_loopback(master_addr)
    iface = interface_of(_resolve(master_addr)[1] if single else local_address_towards(master_addr, port))
    if iface is None:
        return {}
    names = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if single else ("GLOO_SOCKET_IFNAME",)
    out = {k: iface for k in names if not os.environ.get(k)}
    os.environ.update(out)
    return out


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host`` (not the wildcard) and ``port`` (0: a free port)."""
    family, addr = _resolve(host)
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's own server does
        s.bind((addr, port))
        s.listen(socket.SOMAXCONN)
    except OSError as e:
        s.close()
        hint = " (rank 0 must run on the host MASTER_ADDR names)" if e.errno == errno.EADDRNOTAVAIL else ""
        raise RuntimeError(f"cannot listen on MASTER_ADDR={host} ({addr}) port {port}: {e}{hint}") from None
    return s


def create_store(rank: int, world: int, timeout: timedelta):
    """The run's TCPStore: rank 0 serves it on ``MASTER_ADDR``'s address only; the other ranks connect.
    ``MASTER_PORT=0`` (one process, no launcher) takes a free port and writes it back into the environment."""
    from torch.distributed import TCPStore

    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    use_libuv = os.environ.get("USE_LIBUV", "1") == "1"
    fd = None
    if rank == 0:
        sock = listen_socket(host, port)
        port = sock.getsockname()[1]
        os.environ["MASTER_PORT"] = str(port)
        fd = sock.detach()  # the store's server owns (and closes) it from here on
    store = TCPStore(
        host_name=host,
        port=port,
        world_size=world,
        is_master=rank == 0,
        timeout=timeout,
        multi_tenant=True,
        master_listen_fd=fd,
        use_libuv=use_libuv,
    )
    if rank == 0:
        log.info("rendezvous store on %s:%d (not the wildcard address)", host, port)
    return store


def init_process_group(backend: str, rank: int, world: int, local_rank: int, timeout: timedelta) -> None:
    """``torch.distributed.init_process_group`` over :func:`create_store` (``env://`` semantics:
    ``MASTER_ADDR``, ``MASTER_PORT``), with the backends' sockets on the same interface."""
    import torch
    import torch.distributed as dist

    master = os.environ["MASTER_ADDR"]
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun's agent serves the store
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
        return
    chosen = set_socket_interfaces(master, int(os.environ["MASTER_PORT"]))
    if chosen and rank == 0:
        log.info("backend sockets on %s", chosen)
    kwargs = {}
    if backend == "nccl" and world != 1:  # as DeepSpeed does: bind the device to the group
        kwargs["device_id"] = torch.device("cuda", local_rank)
    store = create_store(rank, world, timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout, **kwargs)

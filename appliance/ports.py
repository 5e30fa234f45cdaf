"""TCP ports on this host: whether one can be bound, and who listens on it.

A replica server's port is chosen when the replica is placed and kept, but any program may
take it later (another daemon on the host, any listener). Starting a server then fails with
the cause named (:func:`holder`), and the node moves the replica to a free port instead of
wedging the volume (appliance/node/controller.py).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from pathlib import Path

PROC = Path("/proc")
LISTEN = "0A"  # the state column of /proc/net/tcp for a listening socket


def bindable(host: str, port: int) -> bool:
    """Whether *port* on *host* can be bound now (as a listener with SO_REUSEADDR would)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _listening_sockets(ports: Iterable[int]) -> dict[str, int]:
    """The socket inodes listening on TCP *ports* (IPv4 or IPv6), each with its port."""
    wanted = set(ports)
    found: dict[str, int] = {}
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == LISTEN:
                port = int(fields[1].rsplit(":", 1)[1], 16)
                if port in wanted:
                    found[fields[9]] = port
    return found


def _owners(sockets: dict[str, int]) -> dict[int, set[int]]:
    """The processes holding each of *sockets* (inode: port), by port: one pass over /proc;
    processes this user cannot look into are not seen."""
    targets = {f"socket:[{inode}]": port for inode, port in sockets.items()}
    found: dict[int, set[int]] = {}
    if not targets:
        return found
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            descriptors = list((entry / "fd").iterdir())
        except OSError:
            continue
        for fd in descriptors:
            try:
                port = targets.get(str(fd.readlink()))
            except OSError:
                continue
            if port is not None:
                found.setdefault(port, set()).add(int(entry.name))
    return found


def listeners(ports: Iterable[int]) -> dict[int, set[int]]:
    """The processes listening on each of *ports*; ports nobody here listens on are left
    out."""
    return _owners(_listening_sockets(ports))


def describe(pid: int) -> str:
    """``process PID (NAME)``."""
    try:
        name = (PROC / str(pid) / "comm").read_text().strip()
    except OSError:
        name = "gone"
    return f"process {pid} ({name})"


def holder(port: int) -> str:
    """Who listens on TCP *port* on this host: ``process PID (NAME)``, or a description
    when it cannot be told (another network namespace, a process gone meanwhile)."""
    sockets = _listening_sockets([port])
    if not sockets:
        return "another program (not listening now: the port may be held without a listener)"
    pids = _owners(sockets).get(port)
    return describe(min(pids)) if pids else "a program this node cannot see"

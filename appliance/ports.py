"""TCP ports on this host: whether one can be bound, and who listens on it.

A replica server's port is chosen when the replica is placed and kept, but any program may
take it later (another daemon on the host, any listener). Starting a server then fails with
the cause named (:func:`holder`), and the node moves the replica to a free port instead of
wedging the volume (appliance/node/controller.py).
"""

from __future__ import annotations

import socket
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


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == LISTEN and \
                    int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def holder(port: int) -> str:
    """Who listens on TCP *port* on this host: ``process PID (NAME)``, or a description
    when it cannot be told (another network namespace, a process gone meanwhile)."""
    inodes = _listening_inodes(port)
    if not inodes:
        return "another program (not listening now: the port may be held without a listener)"
    targets = {f"socket:[{inode}]" for inode in inodes}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            descriptors = list((entry / "fd").iterdir())
        except OSError:
            continue
        for fd in descriptors:
            try:
                if str(fd.readlink()) in targets:
                    name = (entry / "comm").read_text().strip()
                    return f"process {entry.name} ({name})"
            except OSError:
                continue
    return "a program this node cannot see"

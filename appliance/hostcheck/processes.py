"""Processes on this host, read from /proc: by name, by the TCP ports they listen on, and
which are the appliance's own (its node daemon, replica servers and engines)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

PROC = Path("/proc")
ENGINE_PLUGIN = "appliance/nbd/plugin.py"  # the script an engine's nbdkit runs
LISTEN = "0A"  # the state column of /proc/net/tcp for a listening socket


def pids() -> list[int]:
    return [int(entry.name) for entry in PROC.iterdir() if entry.name.isdigit()]


def name_of(pid: int) -> str:
    """The process's name (``comm``, at most 15 characters), or "" once it is gone."""
    try:
        return (PROC / str(pid) / "comm").read_text().strip()
    except OSError:
        return ""


def running_names() -> set[str]:
    """The names of the processes running now."""
    return {name_of(pid) for pid in pids()} - {""}


def command_line(pid: int) -> list[str]:
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def appliance_role(pid: int) -> str | None:
    """What process *pid* is to the appliance: "the node daemon", "a replica server", "an
    engine", or None when it is another program."""
    argv = command_line(pid)
    if any(arg.endswith(ENGINE_PLUGIN) for arg in argv):
        return "an engine"
    for index, word in enumerate(argv):
        program = Path(word).name == "appliance" or (
            word == "appliance" and index > 0 and argv[index - 1] == "-m")
        if program:
            rest = argv[index + 1:]
            if rest[:1] == ["serve"]:
                return "the node daemon"
            if rest[:2] == ["replica", "serve"]:
                return "a replica server"
            return None
    return None


def listening_sockets(ports: Iterable[int]) -> dict[str, int]:
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


def listeners(ports: Iterable[int]) -> dict[int, set[int]]:
    """The processes listening on each of *ports* (one pass over /proc, where
    :func:`appliance.ports.holder` makes one per port). Ports nobody here listens on are
    left out; processes this user cannot look into are not seen."""
    sockets = {f"socket:[{inode}]": port for inode, port in listening_sockets(ports).items()}
    found: dict[int, set[int]] = {}
    if not sockets:
        return found
    for pid in pids():
        try:
            descriptors = list((PROC / str(pid) / "fd").iterdir())
        except OSError:
            continue
        for fd in descriptors:
            try:
                port = sockets.get(str(fd.readlink()))
            except OSError:
                continue
            if port is not None:
                found.setdefault(port, set()).add(pid)
    return found


def describe(pid: int) -> str:
    """``process PID (NAME)``, as :func:`appliance.ports.holder` names a process."""
    return f"process {pid} ({name_of(pid) or 'gone'})"

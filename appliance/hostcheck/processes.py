"""Processes on this host, read from /proc: by name, and which are the appliance's own
(its node daemon, replica servers and engines). Who listens on a port:
:mod:`appliance.ports`."""

from __future__ import annotations

from pathlib import Path

PROC = Path("/proc")
ENGINE_PLUGIN = "appliance/nbd/plugin.py"  # the script an engine's nbdkit runs


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

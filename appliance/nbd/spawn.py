"""Starting a long-lived server process detached from the one that starts it.

nbdkit asks the kernel for SIGTERM when its parent dies (PR_SET_PDEATHSIG, set at start-up
even without --exit-with-parent in the build this project runs on), so a child of a
short-lived CLI dies with it. :func:`spawn_daemon` therefore forks twice: the intermediate
child starts a new session, forks the server and exits, and the server waits until it has
been reparented (to init, or to the service manager that reaps orphans) before it execs.
Whatever it then ties itself to lives as long as the machine or the service manager.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

REPARENT_TIMEOUT = 10.0


def spawn_daemon(command: list[str], env: dict[str, str], log_path: Path) -> int:
    """Run *command* in its own session, detached, output appended to *log_path*; return
    its pid (the command execs in that process, so the pid is the server's)."""
    read_end, write_end = os.pipe()
    intermediate = os.fork()
    if intermediate == 0:  # pragma: no cover - runs in the forked children
        _detach(command, env, log_path, read_end, write_end)
    os.close(write_end)
    os.waitpid(intermediate, 0)
    with os.fdopen(read_end, "rb") as pipe:
        text = pipe.read().decode().strip()
    if not text.isdigit():
        raise OSError(f"could not start {command[0]}")
    return int(text)


def _detach(command: list[str], env: dict[str, str], log_path: Path, read_end: int,
            write_end: int) -> None:  # pragma: no cover - runs in the forked children
    try:
        os.close(read_end)
        os.setsid()
        intermediate = os.getpid()
        server = os.fork()
        if server:
            os.write(write_end, f"{server}\n".encode())
            os._exit(0)
        os.close(write_end)
        deadline = time.monotonic() + REPARENT_TIMEOUT
        while os.getppid() == intermediate and time.monotonic() < deadline:
            time.sleep(0.001)
        null = os.open(os.devnull, os.O_RDONLY)
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        # Nothing else of the starter's survives the exec: inheritable descriptors (a
        # daemon's listening socket) would otherwise stay open in the server for its life.
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        os.execvpe(command[0], command, env)  # noqa: S606 - no shell wanted
    except BaseException:
        os._exit(127)

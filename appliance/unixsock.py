"""Unix-domain sockets at any path depth.

A socket address holds at most 107 bytes of path, and replica directories on a deep data
directory exceed it.  A longer path is reached through the directory's descriptor:
``/proc/self/fd/N/NAME`` resolves to the same file and is short.  The socket file is
created (or found) at its real location either way.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

# sun_path is 108 bytes including the terminating NUL
MAX_PATH = 107


@contextlib.contextmanager
def short_path(path: str | Path) -> Iterator[str]:
    """A path no longer than a socket address allows, valid inside the block."""
    text = os.fspath(path)
    if len(os.fsencode(text)) <= MAX_PATH:
        yield text
        return
    directory, name = os.path.split(text)
    fd = os.open(directory or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


def bind(sock: socket.socket, path: str | Path) -> None:
    with short_path(path) as address:
        sock.bind(address)


def connect(sock: socket.socket, path: str | Path) -> None:
    with short_path(path) as address:
        sock.connect(address)


def listening(path: str | Path) -> bool:
    """Whether a process accepts connections on the socket at *path* (a socket file that
    a dead process left is no listener)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connect(probe, path)
    except OSError:
        return False
    finally:
        probe.close()
    return True

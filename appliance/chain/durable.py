"""Durable file updates: write-temp, fsync, rename, fsync directory (DESIGN invariant 6).

Also the crash points used by the crash-injection tests: :func:`crashpoint` is called after
every durable step of a metadata-changing operation. It does nothing unless a test installs a
hook (in a child process it then kills), so the tests can stop an operation after any step.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

from appliance.chain.format import TEMP_SUFFIX

_hook: Callable[[str], None] | None = None


def set_crash_hook(hook: Callable[[str], None] | None) -> None:
    """Install *hook* to be called with the label of every crash point (tests only)."""
    global _hook  # noqa: PLW0603 - a process-wide test switch
    _hook = hook


def crashpoint(label: str) -> None:
    if _hook is not None:
        _hook(label)


def write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """``pwrite`` every byte of *data* at *offset*, looping over short writes."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(f"pwrite wrote {written} bytes")
        view = view[written:]
        offset += written


def atomic_replace(dir_fd: int, name: str, data: bytes, mode: int = 0o644) -> None:
    """Replace *name* in the directory *dir_fd* with *data*, atomically and durably.

    After a crash at any point the file holds either its old or its new contents.
    """
    temp = name + TEMP_SUFFIX
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode,
                 dir_fd=dir_fd)
    try:
        write_all(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    crashpoint(f"replace:{name}:temp-written")
    os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)


def create_sparse(dir_fd: int, name: str, size: int) -> int:
    """Create *name* as an empty sparse file of *size* bytes, durably; return an O_RDWR fd."""
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
        os.fsync(dir_fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def unlink_durably(dir_fd: int, *names: str) -> None:
    """Remove *names* (missing ones are fine) and make the removal durable."""
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)
    os.fsync(dir_fd)

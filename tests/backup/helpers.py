"""Helpers of the backup tests through the CLI: an object of a file target that a reader
waits on (a job held in the middle, as by a hung server), the CLI run at a terminal, and
a volume with data written through its device."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pty
import select
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.harness import APPLIANCE, Node, wait_for


class HeldObject:
    """An object of a file target replaced by a FIFO: a job that reads it waits there
    until :meth:`release` gives it the object's bytes and puts the file back."""

    def __init__(self, path: Path, scratch: Path) -> None:
        self.path = path
        self.staged = scratch / f"held-{path.name}"  # on the same file system, outside
        self.staged.write_bytes(path.read_bytes())
        self.fd: int | None = None
        path.unlink()
        os.mkfifo(path, 0o600)

    def _writer(self) -> bool:
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: nobody reads it yet
                raise
            return False
        return True

    def wait_reader(self, timeout: float = 120) -> None:
        """Return once a reader waits on the object (the job is held)."""
        if self.fd is None:
            wait_for(self._writer, timeout, f"a job to read {self.path}", interval=0.05)

    def release(self) -> None:
        """Put the object back as a file, then give the waiting reader its bytes."""
        self.wait_reader()
        assert self.fd is not None
        data = memoryview(self.staged.read_bytes())
        os.replace(self.staged, self.path)  # later readers read the file
        os.set_blocking(self.fd, True)
        try:
            while data:
                data = data[os.write(self.fd, data):]
        finally:
            os.close(self.fd)
            self.fd = None

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)


def in_terminal(*args: str | Path, timeout: float = 300) -> tuple[int, str]:
    """Run ``appliance ARGS`` with a pseudo-terminal as stdin, stdout and stderr; its exit
    status and everything it wrote."""
    primary, secondary = pty.openpty()
    process = subprocess.Popen([APPLIANCE, *map(str, args)], stdin=secondary,
                               stdout=secondary, stderr=secondary, start_new_session=True)
    os.close(secondary)
    output = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"appliance {args} did not end in {timeout} s: "
                                     f"{output.decode(errors='replace')}")
            ready, _, _ = select.select([primary], [], [], left)
            if not ready:
                continue
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the program closed the terminal
                break
            if not chunk:
                break
            output += chunk
        status = process.wait(timeout=60)
    finally:
        os.close(primary)
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)
    return status, output.decode(errors="replace")


def write_volume(node: Node, volume: str, offset: int, data: bytes) -> None:
    """Write *data* at *offset* of the detached *volume* through its device."""
    device = node.cli("volume", "attach", volume).stdout.strip()
    with open(device, "r+b") as block:
        block.seek(offset)
        block.write(data)
        os.fsync(block.fileno())
    node.cli("volume", "detach", volume)


def cli_json(node: Node, *args: str) -> Any:
    return json.loads(node.cli(*args, "-o", "json").stdout)

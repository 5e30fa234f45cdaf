"""Fault injection parts for the reliability tests: a delaying TCP proxy, small disks that
fill up, and a disk whose I/O fails on demand. All are real: kernel filesystems on loop
devices, nbdkit's C error filter, TCP through a relay."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tests.harness import wait_for


class DelayProxy:
    """Relays TCP to *upstream*, holding every chunk for *delay* seconds each way."""

    def __init__(self, upstream: tuple[str, int], delay: float) -> None:
        self.upstream = upstream
        self.delay = delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.address = self.listener.getsockname()[:2]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        with client, socket.create_connection(self.upstream) as server:
            back = threading.Thread(target=self._pump, args=(server, client), daemon=True)
            back.start()
            self._pump(client, server)
            back.join()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(1 << 20):
                time.sleep(self.delay)
                target.sendall(chunk)
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.listener.close()


@contextlib.contextmanager
def small_disk(root: Path, name: str, size_mib: int) -> Iterator[Path]:
    """A mounted ext4 filesystem of *size_mib* MiB on a loop device."""
    image, mount = root / f"{name}.img", root / name
    with open(image, "wb") as file:
        file.truncate(size_mib << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    mount.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


class FaultyDisk:
    """ext4 on a loop device on a FUSE file served by ``nbdkit file --filter=error``:
    every I/O of the disk fails with EIO while :attr:`trigger` exists. Between
    :meth:`pause` and :meth:`resume` (nbdkit's pause filter) every I/O of the disk waits."""

    def __init__(self, root: Path, size_mib: int) -> None:
        self.root = root
        self.trigger = root / "fail-now"
        self.backing = root / "faulty-backing.img"
        with open(self.backing, "wb") as file:
            file.truncate(size_mib << 20)
        self.socket = root / "faulty.sock"
        self.fuse = root / "faulty-fuse"
        self.fuse.mkdir()
        self.mount = root / "faulty"
        self.mount.mkdir()
        self.pause_control = root / "faulty-pause.sock"
        self.nbdkit = subprocess.Popen(
            ["nbdkit", "-f", "-U", str(self.socket), "--filter=pause", "--filter=error",
             "file", str(self.backing), "error=EIO", "error-rate=100%",
             f"error-file={self.trigger}", f"pause-control={self.pause_control}"],
            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.socket.exists, 30, "nbdkit's socket")
        self.nbdfuse = subprocess.Popen(["nbdfuse", str(self.fuse / "disk"), "--unix",
                                         str(self.socket)], stdin=subprocess.DEVNULL)
        wait_for((self.fuse / "disk").exists, 30, "the nbdfuse file")
        self.loop = subprocess.run(["losetup", "--find", "--show", str(self.fuse / "disk")],
                                   capture_output=True, text=True, check=True).stdout.strip()
        subprocess.run(["mkfs.ext4", "-q", self.loop], check=True)
        subprocess.run(["mount", "-o", "errors=continue", self.loop, str(self.mount)],
                       check=True)

    def fail(self) -> None:
        self.trigger.touch()
        # Reads must reach the disk: drop the page cache of its files.
        subprocess.run(["sh", "-c", "echo 1 > /proc/sys/vm/drop_caches"], check=True)

    def heal(self) -> None:
        self.trigger.unlink(missing_ok=True)

    def pause(self) -> None:
        """Hold every later I/O of the disk (returns once the I/O in progress is done)."""
        self._control(b"p")

    def resume(self) -> None:
        self._control(b"r")

    def _control(self, command: bytes) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as control:
            control.settimeout(60)
            control.connect(str(self.pause_control))
            control.sendall(command)
            assert control.recv(1) == command.upper(), "the pause filter did not answer"

    def close(self) -> None:
        self.heal()
        subprocess.run(["umount", "-l", str(self.mount)], check=False)
        subprocess.run(["losetup", "-d", self.loop], check=False)
        subprocess.run(["fusermount3", "-u", str(self.fuse)], check=False)
        for process in (self.nbdfuse, self.nbdkit):
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)

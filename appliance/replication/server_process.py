"""Running a replica server: a listener, a serving thread, a clean stop."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from types import TracebackType

from appliance import unixsock
from appliance.chain import Replica
from appliance.errors import InvalidArgument
from appliance.replication.server import ReplicaServer

UNIX_SOCKET = "server.sock"


def open_unix_listener(path: Path) -> socket.socket:
    """The replica's unix socket, for engines on the same host (mode 0600)."""
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        unixsock.bind(listener, path)
    finally:
        os.umask(old_umask)
    listener.listen(128)
    return listener


def open_listener(address: tuple[str, int]) -> socket.socket:
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(128)
    except OSError as exc:
        listener.close()
        raise InvalidArgument(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return listener


class RunningServer:
    """A replica server on its own thread: ``with RunningServer(dir, addr, secret) as s:``.

    The replica is opened on entry (so a busy or damaged replica fails here) and closed,
    flushed, after the server stopped."""

    def __init__(self, directory: str | Path, address: tuple[str, int], secret: bytes) -> None:
        self.replica = Replica.open(directory)
        self.unix_path = (Path(directory) / UNIX_SOCKET).resolve()
        try:
            self.listener = open_listener(address)
            self.unix_listener = open_unix_listener(self.unix_path)
        except BaseException:
            self.replica.close()
            raise
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self.server = ReplicaServer(self.replica, secret, unix_path=str(self.unix_path))
        self.stop_event = threading.Event()
        self._stopped = False
        self.threads = [threading.Thread(target=self.server.serve,
                                         args=(listener, self.stop_event),
                                         name="replica-server", daemon=True)
                        for listener in (self.listener, self.unix_listener)]
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        """Stop serving and close the replica (flushed). Safe to call more than once, and
        after something else set :attr:`stop_event` (a signal handler)."""
        if self._stopped:
            return
        self._stopped = True
        self.stop_event.set()
        for listener in (self.listener, self.unix_listener):
            with contextlib.suppress(OSError):  # wakes the thread blocked in accept()
                listener.shutdown(socket.SHUT_RDWR)
        for thread in self.threads:
            thread.join()
        self.listener.close()
        self.unix_listener.close()
        self.unix_path.unlink(missing_ok=True)
        self.server.close()
        self.replica.close()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()


def serve_forever(directory: Path, address: tuple[str, int], secret: bytes,
                  pid_file: Path | None = None) -> None:
    """Serve the replica in *directory* until SIGTERM or SIGINT (the foreground server)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with RunningServer(directory, address, secret) as running:
        if pid_file is not None:
            pid_file.write_text(f"{os.getpid()}\n")
        stop = running.stop_event
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, lambda *_: stop.set())
        logging.getLogger(__name__).info("serving replica %s on %s:%d", directory,
                                         *running.address)
        while not stop.wait(1.0):
            pass

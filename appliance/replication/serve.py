"""Running a replica server: a listener, a serving thread, a clean stop."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from types import TracebackType

from appliance.chain import Replica
from appliance.errors import InvalidArgument
from appliance.replication.server import ReplicaServer

ACCEPT_POLL = 0.2  # how often the accept loop looks at its stop flag


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
    listener.settimeout(ACCEPT_POLL)
    return listener


class RunningServer:
    """A replica server on its own thread: ``with RunningServer(dir, addr, secret) as s:``.

    The replica is opened on entry (so a busy or damaged replica fails here) and closed,
    flushed, after the server stopped."""

    def __init__(self, directory: str | Path, address: tuple[str, int], secret: bytes) -> None:
        self.replica = Replica.open(directory)
        try:
            self.listener = open_listener(address)
        except BaseException:
            self.replica.close()
            raise
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self.server = ReplicaServer(self.replica, secret)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.server.serve,
                                       args=(self.listener, self.stop_event),
                                       name="replica-server", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.stop_event.is_set():
            return
        self.stop_event.set()
        self.thread.join()
        self.listener.close()
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

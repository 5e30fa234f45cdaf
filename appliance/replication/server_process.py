"""Running a replica server: its listeners, its accepting threads, a clean stop, and the
lending of its replica to the engine on this host (docs/local-fast-path.md)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

from appliance import unixsock
from appliance.chain import Replica
from appliance.errors import Busy, InvalidArgument
from appliance.replication import protocol as proto
from appliance.replication.protocol import Request
from appliance.replication.server import ReplicaServer, peer_name
from appliance.replication.session import Session

UNIX_SOCKET = "server.sock"
REOPEN_TIMEOUT = 60.0  # seconds a server waits for a returned replica's lock
PASS_TIMEOUT = 10.0  # seconds a server waits to pass a connection to the engine
log = logging.getLogger(__name__)


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


class Lend:
    """The replica lent to the engine at the other end of *sock*: connections accepted
    meanwhile are passed to it (one byte, the socket's descriptor attached)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        proto.set_timeout(sock, PASS_TIMEOUT)  # a hung engine does not hold the server
        self.ready = threading.Event()  # the engine has the replica: pass connections
        self.ended = threading.Event()  # pass nothing more
        self.back = threading.Event()  # the server serves the replica again (or stopped)
        self._send_lock = threading.Lock()

    def pass_connection(self, conn: socket.socket) -> bool:
        """Hand *conn* to the engine; False if the lend has ended."""
        if not self.ready.wait(REOPEN_TIMEOUT):
            return False
        try:
            with self._send_lock:
                if self.ended.is_set():
                    return False
                socket.send_fds(self.sock, [b"C"], [conn.fileno()])
        except OSError:
            return False
        conn.close()  # the engine has its own descriptor of it now
        return True

    def hold(self) -> None:
        """Wait until the engine gives the replica back: it closes the connection (or
        dies, which closes it too)."""
        with contextlib.suppress(OSError):
            while True:
                try:
                    if not self.sock.recv(64):
                        break  # the engine sends nothing: end of stream is the return
                except OSError as exc:
                    if not proto.timed_out(exc):
                        raise

    def end(self) -> None:
        with self._send_lock:
            self.ended.set()
        self.ready.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class RunningServer:
    """A replica server on its own threads: ``with RunningServer(dir, addr, secret) as s:``.

    The replica is opened on entry (so a busy or damaged replica fails here) and closed,
    flushed, after the server stopped. While it is lent to the engine on this host, the
    server holds neither the replica nor its lock, and passes each connection it accepts to
    that engine, which serves it; when the engine gives the replica back (or dies), the
    server opens it again and serves it itself."""

    def __init__(self, directory: str | Path, address: tuple[str, int], secret: bytes) -> None:
        self.directory = Path(directory).resolve()
        # while lent: the replica as it was before (closed)
        self.replica = Replica.open(self.directory)
        self.unix_path = self.directory / UNIX_SOCKET
        try:
            self.listener = open_listener(address)
            self.unix_listener = open_unix_listener(self.unix_path)
        except BaseException:
            self.replica.close()
            raise
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self._secret = secret
        self.server = self._new_server(self.replica)
        self.stop_event = threading.Event()
        self._stopped = False
        self._state_lock = threading.Lock()
        self._lend: Lend | None = None
        self.threads = [threading.Thread(target=self._accept, args=(listener,),
                                         name="replica-server", daemon=True)
                        for listener in (self.listener, self.unix_listener)]
        for thread in self.threads:
            thread.start()

    def _new_server(self, replica: Replica) -> ReplicaServer:
        return ReplicaServer(replica, self._secret, unix_path=str(self.unix_path),
                             lender=self._lend_replica)

    @property
    def lent(self) -> bool:
        return self._lend is not None

    def _accept(self, listener: socket.socket) -> None:
        while not self.stop_event.is_set():
            try:
                sock, peer = listener.accept()
            except OSError as exc:
                if self.stop_event.is_set():
                    break
                log.error("accept failed: %s", exc)
                continue
            self._dispatch(sock, peer_name(peer))
        self.server.close_sessions()

    def _dispatch(self, sock: socket.socket, peer: str) -> None:
        while True:
            with self._state_lock:
                lend, server = self._lend, self.server
            if lend is None:
                server.start_connection(sock, peer)
                return
            if lend.pass_connection(sock):
                return
            # the lend ended while the connection waited: serve it once the replica is back
            if not lend.back.wait(REOPEN_TIMEOUT) or self.stop_event.is_set():
                sock.close()
                return

    def _lend_replica(self, session: Session, request: Request) -> None:
        """Lend the replica to the engine of *session* (a writer of the current
        registration, on the unix socket): serve nothing more, close the replica, answer
        with its directory, then pass connections to the engine until it gives the replica
        back; then open it again."""
        with self._state_lock:
            if self._lend is not None or self.stop_event.is_set():
                session.reply_error(request, Busy("the replica is lent already"))
                return
            lend = self._lend = Lend(session.sock)
            server, replica = self.server, self.replica
        try:
            server.retire(keep=session)
            replica.close()  # flushed; releases the directory's lock
            session.reply(request, [proto.encode_json({"path": str(self.directory)})])
        except BaseException:
            lend.end()
            self._take_back(lend)
            raise
        log.info("replica lent to the engine of %s", session.peer)
        lend.ready.set()
        lend.hold()
        lend.end()
        self._take_back(lend)

    def _take_back(self, lend: Lend) -> None:
        """Open the replica again after a lend and serve it (the engine that had it may
        still be exiting: its lock is waited for)."""
        deadline = time.monotonic() + REOPEN_TIMEOUT
        replica: Replica | None = None
        while not self.stop_event.is_set():
            try:
                replica = Replica.open(self.directory)
                break
            except Busy:
                if time.monotonic() > deadline:
                    log.error("the replica was not given back within %.0f s: stopping",
                              REOPEN_TIMEOUT)
                    self.stop_event.set()
                    break
                time.sleep(0.05)
            except Exception:
                log.exception("cannot open the replica given back: stopping")
                self.stop_event.set()
                break
        with self._state_lock:
            if replica is not None and not self.stop_event.is_set():
                self.replica, self.server = replica, self._new_server(replica)
                log.info("replica given back: serving it again")
            elif replica is not None:
                replica.close()
            self._lend = None
        lend.back.set()

    def stop(self) -> None:
        """Stop serving and close the replica (flushed). Safe to call more than once, and
        after something else set :attr:`stop_event` (a signal handler). A lent replica
        stays with its engine, which gives it back when it sees this server gone."""
        if self._stopped:
            return
        self._stopped = True
        self.stop_event.set()
        for listener in (self.listener, self.unix_listener):
            with contextlib.suppress(OSError):  # wakes the thread blocked in accept()
                listener.shutdown(socket.SHUT_RDWR)
        for thread in self.threads:
            thread.join()
        with self._state_lock:
            lend = self._lend
        if lend is not None:
            lend.end()
            lend.back.wait(REOPEN_TIMEOUT)
        self.listener.close()
        self.unix_listener.close()
        self.unix_path.unlink(missing_ok=True)
        self.server.close()
        self.replica.close()  # nothing to do if it is closed (lent)

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

"""The replica server: serves one replica over the replica protocol.

One thread per connection reads requests. Data requests (read, write, zero, unmap, extents)
run inline on that thread, so a connection's data requests complete in order and without a
thread hand-off; control requests (flush, snapshot, checksums, purge...) run on a small pool
and may complete out of order. Replies are written under a per-connection lock.

Every request of a writer session is checked against the current registration (generation
and attach token): a request from a stale engine, or from a connection that a newer
attachment of the same engine replaced, is refused and its connection closed (DESIGN
invariant 4).

The same class serves a replica lent to an engine (docs/local-fast-path.md), inside the
engine's process: connections are handed to it with :meth:`ReplicaServer.start_connection`,
and :meth:`ReplicaServer.retire` ends every session and waits for the work in flight, so
that the replica can be closed and handed on.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import logging
import os
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from appliance.chain import BLOCK_SIZE, Replica
from appliance.errors import (
    ApplianceError,
    FailedPrecondition,
    InvalidArgument,
    ProtocolError,
    StaleSession,
    StorageIOError,
)
from appliance.replication import dataops, rebuild_job, replica_ops
from appliance.replication import protocol as proto
from appliance.replication.protocol import FLAG_REPORT_ZEROS, Op, Request, Role
from appliance.replication.session import Parts, Session

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
JOB_STOP_TIMEOUT = 60.0  # seconds a stopping server waits for its rebuild job to stop
RETIRE_TIMEOUT = 60.0  # seconds a retiring server waits for each connection's thread

#: called with the session and its LEND request: lends the replica, answers, and returns
#: when the lend has ended (the session is over then)
Lender = Callable[[Session, Request], None]
#: called when a writer other than the registered one asks to register; True makes the
#: server refuse it for now (EAGAIN: the replica is being handed back to its own server)
Yielder = Callable[[], bool]


class ReplicaServer:
    def __init__(self, replica: Replica, secret: bytes, *, workers: int = 4,
                 unix_path: str | None = None, lender: Lender | None = None,
                 yield_to: Yielder | None = None) -> None:
        self.replica = replica
        self.unix_path = unix_path
        self.secret = secret
        self._lender = lender
        self._yield_to = yield_to
        self._registration_lock = threading.Lock()
        self._writer: tuple[int, int] | None = None
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="control")
        self._sessions: set[Session] = set()
        self._sessions_lock = threading.Lock()
        self._threads: set[threading.Thread] = set()  # one per connection, under the lock
        self._retired = False
        self.rebuild = rebuild_job.RebuildSlot(replica, secret)
        self._inline: dict[int, Callable[[Session, Request, memoryview], Parts]] = {
            Op.READ: self._read, Op.WRITE: self._write, Op.WRITE_ZEROES: self._write_zeroes,
            Op.ZERO_EXACT: self._zero_exact, Op.UNMAP: self._unmap, Op.PING: self._ping,
            Op.EXTENTS: self._extents, Op.STATUS: self._status,
            Op.READ_LAYER: self._read_layer, Op.LAYER_EXTENTS: self._layer_extents,
            Op.REBUILD_STATUS: self._rebuild_status,
        }
        self._control: dict[int, Callable[[Session, Request, bytes], Parts]] = {
            **replica_ops.handlers(replica), **self.rebuild.handlers()}

    # -- connections ------------------------------------------------------------------------

    def serve(self, listener: socket.socket, stop: threading.Event) -> None:
        """Accept connections until *stop* is set (and the listener shut down, which wakes
        a blocked accept)."""
        while not stop.is_set():
            try:
                sock, peer = listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if stop.is_set():
                    break
                log.error("accept failed: %s", exc)
                continue
            self.start_connection(sock, peer_name(peer))
        self.close_sessions()

    def start_connection(self, sock: socket.socket, peer: str) -> None:
        """Serve the connection *sock* (accepted, or handed over) on a thread of its own."""
        thread = threading.Thread(target=self._connection, args=(sock, peer),
                                  name=f"conn-{peer}", daemon=True)
        with self._sessions_lock:
            if self._retired:
                sock.close()
                return
            self._threads.add(thread)
        thread.start()

    def close(self) -> None:
        """Stop the work left running (a rebuild job, control operations) before the
        replica is closed under it."""
        self.rebuild.stop(JOB_STOP_TIMEOUT)
        self._pool.shutdown(wait=True)

    def close_sessions(self, keep: Session | None = None) -> None:
        with self._sessions_lock:
            sessions = [session for session in self._sessions if session is not keep]
        for session in sessions:
            with contextlib.suppress(OSError):  # wakes its thread, blocked in recv()
                session.sock.shutdown(socket.SHUT_RDWR)

    @property
    def idle_rebuild(self) -> bool:
        """True unless a rebuild job is running into this replica."""
        status = self.rebuild.status()
        return status is None or status["state"] != "running"

    def retire(self, keep: Session | None = None) -> None:
        """Serve nothing more: refuse new connections, end every session but *keep*, stop
        the rebuild job and the control operations, and wait until no thread touches the
        replica any more (so that it can be closed and handed on)."""
        with self._sessions_lock:
            self._retired = True
            threads = [t for t in self._threads if t is not threading.current_thread()]
        self.close_sessions(keep)
        self.close()
        for thread in threads:
            thread.join(RETIRE_TIMEOUT)
            if thread.is_alive():
                raise StorageIOError(f"a connection's thread ({thread.name}) still works on "
                                     f"the replica after {RETIRE_TIMEOUT:.0f} s")

    def register(self, generation: int, token: int) -> None:
        """Make (*generation*, *token*) the current writer (a server in an engine's process
        starts with its engine registered)."""
        if self._register(Role.WRITER, generation, token):
            raise StaleSession(f"generation {generation} is older than "
                               f"{self.replica.generation}")

    @property
    def writer(self) -> tuple[int, int] | None:
        """The registered writer: (generation, attach token)."""
        return self._writer

    def _connection(self, sock: socket.socket, peer: str) -> None:
        try:
            if sock.family != socket.AF_UNIX:
                proto.tune_socket(sock)
            sock.settimeout(HANDSHAKE_TIMEOUT)
            session = self._handshake(sock, peer)
            if session is None:
                return
            sock.settimeout(None)  # idle engines are fine; keepalive finds dead ones
            with self._sessions_lock:
                if self._retired:
                    return
                self._sessions.add(session)
            try:
                self._serve_session(session)
            finally:
                session.ended.set()
                with self._sessions_lock:
                    self._sessions.discard(session)
        except proto.ConnectionClosed:
            pass  # the client closed it
        except (ConnectionError, TimeoutError) as exc:
            log.info("connection from %s ended: %s", peer, exc)
        except ApplianceError as exc:  # a malformed message: the stream cannot be trusted
            log.warning("closed the connection from %s: %s", peer, exc)
        except OSError as exc:
            if exc.errno != errno.EBADF:  # closed by close_sessions()
                log.error("connection from %s failed: %s", peer, exc)
        except Exception:
            log.exception("connection from %s failed", peer)
        finally:
            sock.close()
            with self._sessions_lock:
                self._threads.discard(threading.current_thread())

    def _handshake(self, sock: socket.socket, peer: str) -> Session | None:
        server_nonce = os.urandom(proto.NONCE_SIZE)
        sock.sendall(proto.HELLO.pack(proto.HELLO_MAGIC, proto.VERSION, 0, server_nonce))
        auth = bytearray(proto.AUTH.size)
        proto.recv_exact(sock, memoryview(auth))
        client_nonce, role, generation, token, proof = proto.AUTH.unpack(auth)
        expected = proto.client_proof(self.secret, server_nonce, client_nonce, role,
                                      generation, token)
        replica_id = proto.replica_id_bytes(self.replica.replica_id)
        if not hmac.compare_digest(proof, expected) or role not in (Role.WRITER, Role.READER):
            log.warning("refused a connection from %s: authentication failed", peer)
            sock.sendall(proto.WELCOME.pack(errno.EACCES, bytes(32), 0, 0, 0, bytes(16)))
            return None
        status = self._register(Role(role), generation, token)
        replica = self.replica
        if status == errno.ESTALE:
            log.warning("refused a writer from %s: generation %d is older than %d", peer,
                        generation, replica.generation)
        elif status:
            log.info("asked a writer from %s to retry: the replica is being handed back to "
                     "its server", peer)
        fields = (status, replica.generation, replica.revision, replica.size, replica_id)
        sock.sendall(proto.WELCOME.pack(status, proto.server_proof(
            self.secret, client_nonce, server_nonce, *fields), *fields[1:]))
        if status:
            return None
        log.info("%s session from %s (generation %d)", Role(role).name.lower(), peer,
                 generation)
        return Session(sock, peer, Role(role), generation, token)

    def _register(self, role: Role, generation: int, token: int) -> int:
        if role != Role.WRITER:
            return 0
        with self._registration_lock:
            if generation < self.replica.generation:
                return errno.ESTALE
            replacing = self._writer not in (None, (generation, token))
            if generation > self.replica.generation:
                self.replica.set_generation(generation)
            if self._writer != (generation, token):
                self.rebuild.cancel()  # it belonged to the session being replaced
            self._writer = (generation, token)
            # A lent replica goes back to its server (registered as the newcomer's, with its
            # generation: the engine it was lent to is fenced there too): retry meanwhile.
            if replacing and self._yield_to is not None and self._yield_to():
                return errno.EAGAIN
        return 0

    def _serve_session(self, session: Session) -> None:
        reader = proto.BufferedReader(session.sock)
        size = proto.REQUEST.size
        while True:
            request = proto.decode_request(reader.read(size))
            payload = reader.read(request.payload_length)
            if session.role == Role.WRITER and session.key != self._writer:
                session.reply_error(request, StaleSession(
                    "a newer engine session owns this replica"))
                log.info("closed a connection from %s of a replaced writer (generation %d)",
                         session.peer, session.key[0])
                return  # fenced: close the connection
            if session.role == Role.READER and request.op not in proto.READER_OPS:
                session.reply_error(request, InvalidArgument(
                    f"operation {request.op} needs a writer session"))
                continue
            if request.op == Op.LEND:
                if self._lend(session, request):
                    return  # the lend has ended, and with it the session
                continue
            inline = self._inline.get(request.op)
            if inline is not None:
                self._run_inline(session, request, inline, payload)
            elif request.op in self._control:
                try:
                    self._pool.submit(self._run_control, session, request, bytes(payload))
                except RuntimeError:
                    log.info("closed the connection from %s: the server is stopping",
                             session.peer)
                    return
            else:
                session.reply_error(request, ProtocolError(f"unknown operation {request.op}"))

    def _lend(self, session: Session, request: Request) -> bool:
        """Lend the replica to the session's engine (True), or refuse (False)."""
        if self._lender is None:
            session.reply_error(request, FailedPrecondition(
                "this replica server cannot lend its replica"))
            return False
        if session.sock.family != socket.AF_UNIX:
            session.reply_error(request, FailedPrecondition(
                "a replica is lent only through its server's unix socket"))
            return False
        if not self.idle_rebuild:
            session.reply_error(request, FailedPrecondition(
                "the replica is being rebuilt; it is lent only when in sync"))
            return False
        self._lender(session, request)
        return True

    def _run_inline(self, session: Session, request: Request,
                    handler: Callable[[Session, Request, memoryview], Parts],
                    payload: memoryview) -> None:
        try:
            parts = handler(session, request, payload)
        except ApplianceError as exc:
            session.reply_error(request, exc)
            return
        session.reply(request, parts)

    def _run_control(self, session: Session, request: Request, payload: bytes) -> None:
        try:
            try:
                parts = self._control[request.op](session, request, payload)
            except ApplianceError as exc:
                session.reply_error(request, exc)
                return
            except Exception as exc:
                log.exception("operation %d failed", request.op)
                session.reply_error(request, ProtocolError(f"internal error: {exc}"))
                return
            session.reply(request, parts)
        except OSError:
            pass  # the connection went away; its thread notices

    # -- data operations --------------------------------------------------------------------

    def _read(self, session: Session, request: Request, payload: memoryview) -> Parts:
        data = session.view(request.length)
        self.replica.readinto(data, request.offset)
        return [data]

    def _write(self, session: Session, request: Request, payload: memoryview) -> Parts:
        dataops.write(self.replica, request.offset, request.flags, payload)
        return []

    def _write_zeroes(self, session: Session, request: Request, payload: memoryview) -> Parts:
        explicit = dataops.write_zeroes(self.replica, request.offset, request.length,
                                        request.flags)
        return [explicit] if request.flags & FLAG_REPORT_ZEROS else []

    def _zero_exact(self, session: Session, request: Request, payload: memoryview) -> Parts:
        dataops.zero_exact(self.replica, request.offset, request.length, request.flags,
                           payload)
        return []

    def _unmap(self, session: Session, request: Request, payload: memoryview) -> Parts:
        dataops.unmap(self.replica, request.offset, request.length)
        return []

    def _ping(self, session: Session, request: Request, payload: memoryview) -> Parts:
        return []

    def _extents(self, session: Session, request: Request, payload: memoryview) -> Parts:
        extents = self.replica.extents(request.offset, request.length)
        return [proto.encode_extents([(x.offset, x.length, x.allocated) for x in extents])]

    def _status(self, session: Session, request: Request, payload: memoryview) -> Parts:
        return [proto.encode_json(self.status())]

    def status(self) -> dict[str, Any]:
        replica = self.replica
        return {"replica_id": replica.replica_id, "size": replica.size,
                "revision": replica.revision, "generation": replica.generation,
                "volume_record": replica.volume_record(),
                "snapshots": [x.name for x in replica.layers()
                              if x.name is not None and not x.removed],
                "unix_socket": self.unix_path,
                "head_parent": next(x.parent for x in replica.layers() if x.name is None)}

    def _read_layer(self, session: Session, request: Request, payload: memoryview) -> Parts:
        name = bytes(payload).decode()
        data = session.view(request.length)
        self.replica.read_layer(name, data, request.offset)
        return [data]

    def _layer_extents(self, session: Session, request: Request, payload: memoryview) -> Parts:
        name = bytes(payload).decode()
        runs = [(x.offset // BLOCK_SIZE, (x.offset + x.length) // BLOCK_SIZE)
                for x in self.replica.layer_extents(name)]
        return [proto.encode_runs(runs)]

    def _rebuild_status(self, session: Session, request: Request, payload: memoryview) -> Parts:
        return [proto.encode_json(self.rebuild.status())]




def peer_name(peer: Any) -> str:
    """How logs name the peer of a connection (an accepted socket's address)."""
    return proto.format_address(peer[:2]) if isinstance(peer, tuple) and peer else "unix"

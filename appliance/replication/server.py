"""The replica server: serves one replica over the replica protocol.

One thread per connection reads requests. Data requests (read, write, zero, unmap, extents)
run inline on that thread, so a connection's data requests complete in order and without a
thread hand-off; control requests (flush, snapshot, checksums, purge...) run on a small pool
and may complete out of order. Replies are written under a per-connection lock.

Every request of a writer session is checked against the current registration (generation
and attach token): a request from a stale engine, or from a connection that a newer
attachment of the same engine replaced, is refused and its connection closed (DESIGN
invariant 4).
"""

from __future__ import annotations

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
from appliance.errors import ApplianceError, InvalidArgument, ProtocolError, StaleSession
from appliance.replication import protocol as proto
from appliance.replication import rebuild_job, replica_ops
from appliance.replication.protocol import FLAG_FUA, FLAG_REPORT_ZEROS, Op, Request, Role
from appliance.replication.session import Parts, Session

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
JOB_STOP_TIMEOUT = 60.0  # seconds a stopping server waits for its rebuild job to stop


class ReplicaServer:
    def __init__(self, replica: Replica, secret: bytes, *, workers: int = 4,
                 unix_path: str | None = None) -> None:
        self.replica = replica
        self.unix_path = unix_path
        self.secret = secret
        self._registration_lock = threading.Lock()
        self._writer: tuple[int, int] | None = None
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="control")
        self._sessions: set[Session] = set()
        self._sessions_lock = threading.Lock()
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
            name = proto.format_address(peer[:2]) if isinstance(peer, tuple) else "unix"
            threading.Thread(target=self._connection, args=(sock, name),
                             name=f"conn-{name}", daemon=True).start()
        self.close_sessions()

    def close(self) -> None:
        """Stop the work left running (a rebuild job, control operations) before the
        replica is closed under it."""
        self.rebuild.stop(JOB_STOP_TIMEOUT)
        self._pool.shutdown(wait=True)

    def close_sessions(self) -> None:
        with self._sessions_lock:
            for session in list(self._sessions):
                session.sock.close()

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
                self._sessions.add(session)
            try:
                self._serve_session(session)
            finally:
                with self._sessions_lock:
                    self._sessions.discard(session)
        except (proto.ConnectionClosed, ConnectionError, TimeoutError):
            pass
        except ApplianceError as exc:  # a malformed message: the stream cannot be trusted
            log.warning("closed the connection from %s: %s", peer, exc)
        except OSError as exc:
            if exc.errno != errno.EBADF:  # closed by close_sessions()
                log.error("connection from %s failed: %s", peer, exc)
        except Exception:
            log.exception("connection from %s failed", peer)
        finally:
            sock.close()

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
        if status:
            log.warning("refused a writer from %s: generation %d is older than %d", peer,
                        generation, replica.generation)
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
            if generation > self.replica.generation:
                self.replica.set_generation(generation)
            if self._writer != (generation, token):
                self.rebuild.cancel()  # it belonged to the session being replaced
            self._writer = (generation, token)
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
                return  # fenced: close the connection
            if session.role == Role.READER and request.op not in proto.READER_OPS:
                session.reply_error(request, InvalidArgument(
                    f"operation {request.op} needs a writer session"))
                continue
            inline = self._inline.get(request.op)
            if inline is not None:
                self._run_inline(session, request, inline, payload)
            elif request.op in self._control:
                try:
                    self._pool.submit(self._run_control, session, request, bytes(payload))
                except RuntimeError:
                    return  # the server is stopping
            else:
                session.reply_error(request, ProtocolError(f"unknown operation {request.op}"))

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
        self.replica.write(payload, request.offset)
        if request.flags & FLAG_FUA:
            self.replica.flush()
        return []

    def _write_zeroes(self, session: Session, request: Request, payload: memoryview) -> Parts:
        explicit = self.replica.write_zeroes(request.offset, request.length)
        if request.flags & FLAG_FUA:
            self.replica.flush()
        return [proto.encode_runs(explicit)] if request.flags & FLAG_REPORT_ZEROS else []

    def _zero_exact(self, session: Session, request: Request, payload: memoryview) -> Parts:
        first, last = request.offset, request.offset + request.length  # in blocks
        self.replica.zero_exact(first, last, proto.decode_runs(payload))
        if request.flags & FLAG_FUA:
            self.replica.flush()
        return []

    def _unmap(self, session: Session, request: Request, payload: memoryview) -> Parts:
        self.replica.unmap(request.offset, request.length)
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



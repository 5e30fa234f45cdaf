"""A client connection to a replica server.

:class:`ReplicaConnection` is one authenticated TCP connection, one request at a time:
:meth:`call` sends a request and waits for its reply (control operations, probes, rebuild
sources). :class:`Pipeline` shares one such connection among many threads with many requests
in flight: the engine's data path. Every wait is bounded by a timeout kept by the kernel
(:func:`protocol.set_timeout`); any failure of the connection closes it and raises
:class:`~appliance.errors.Unavailable` (or the error the replica reported).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hmac
import os
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

from appliance import unixsock
from appliance.defaults import REPLICA_TIMEOUT
from appliance.errors import ApplianceError, AuthenticationFailed, ProtocolError, Unavailable
from appliance.replication import protocol as proto
from appliance.replication.protocol import (
    FLAG_FUA,
    FLAG_REPORT_ZEROS,
    Op,
    Response,
    Role,
    Welcome,
)

RETRY_INTERVAL = 0.05  # seconds between handshakes a replica asked to retry


class RetryLater(Unavailable):
    """The replica asked the client to connect again shortly."""


class ReplicaConnection:
    def __init__(self, address: tuple[str, int], secret: bytes, *, role: Role = Role.READER,
                 generation: int = 0, token: int = 0, timeout: float = REPLICA_TIMEOUT,
                 unix_path: str | None = None) -> None:
        """Connect to the replica server at *address*, or through its unix socket
        *unix_path* when the server is on this host."""
        self.address = address
        self.name = proto.format_address(address)
        self.timeout = timeout
        self._next_id = 1
        self._header = bytearray(proto.RESPONSE.size)
        # A replica lent to an engine asks a new writer to retry (EAGAIN) while it is being
        # handed back to its own server (docs/local-fast-path.md): retried within *timeout*.
        # Once told to retry, a connection closed during the hand-back is retried too.
        deadline = time.monotonic() + timeout
        handing_back = False
        while True:
            try:
                self.welcome = self._connect(secret, role, generation, token, unix_path)
                return
            except Unavailable as exc:
                handing_back = handing_back or isinstance(exc, RetryLater)
                if not handing_back:
                    raise
                if time.monotonic() > deadline:
                    raise Unavailable(f"replica {self.name}: still being handed back to its "
                                      f"server after {timeout:.0f} s") from None
                time.sleep(RETRY_INTERVAL)

    def _connect(self, secret: bytes, role: Role, generation: int, token: int,
                 unix_path: str | None) -> Welcome:
        try:
            if unix_path:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(self.timeout)
                try:
                    unixsock.connect(self.sock, unix_path)
                except OSError:
                    self.sock.close()
                    raise
            else:
                self.sock = socket.create_connection(self.address, timeout=self.timeout)
        except OSError as exc:
            raise Unavailable(f"replica {self.name}: cannot connect ({_reason(exc)})") from exc
        try:
            proto.set_timeout(self.sock, self.timeout)
            if not unix_path:
                proto.tune_socket(self.sock)
            return self._handshake(secret, role, generation, token)
        except BaseException:
            self.sock.close()
            raise

    def _handshake(self, secret: bytes, role: Role, generation: int, token: int) -> Welcome:
        try:
            hello = bytearray(proto.HELLO.size)
            proto.recv_exact(self.sock, memoryview(hello))
            magic, version, _reserved, server_nonce = proto.HELLO.unpack(hello)
            if magic != proto.HELLO_MAGIC or version != proto.VERSION:
                raise ProtocolError(f"replica {self.name}: not a replica server of protocol "
                                    f"version {proto.VERSION}")
            client_nonce = os.urandom(proto.NONCE_SIZE)
            proof = proto.client_proof(secret, server_nonce, client_nonce, role, generation,
                                       token)
            self.sock.sendall(proto.AUTH.pack(client_nonce, role, generation, token, proof))
            data = bytearray(proto.WELCOME.size)
            proto.recv_exact(self.sock, memoryview(data))
        except OSError as exc:
            raise Unavailable(f"replica {self.name}: handshake failed ({_reason(exc)})") \
                from exc
        welcome = proto.decode_welcome(bytes(data))
        expected = proto.server_proof(secret, client_nonce, server_nonce, welcome.status,
                                      welcome.generation, welcome.revision, welcome.size,
                                      proto.replica_id_bytes(welcome.replica_id))
        if welcome.status == errno.EACCES and welcome.proof == bytes(32):
            raise AuthenticationFailed(f"replica {self.name} refused the secret")
        if not hmac.compare_digest(welcome.proof, expected):
            raise AuthenticationFailed(f"replica {self.name} could not prove it holds the "
                                       "secret")
        if welcome.status == errno.EAGAIN:
            raise RetryLater(f"replica {self.name} asked to retry")
        if welcome.status:
            raise proto.error_from_code(welcome.status, f"replica {self.name} refused the "
                                        f"session (its generation is {welcome.generation})")
        return welcome

    # -- requests ---------------------------------------------------------------------------

    def send(self, op: int, offset: int = 0, length: int = 0, flags: int = 0,
             payload: bytes | memoryview = b"") -> int:
        """Send a request; return its id."""
        request_id = self._next_id
        self._next_id += 1
        header = proto.encode_request(op, request_id, offset, length, flags, len(payload))
        try:
            proto.send_parts(self.sock, [header, payload] if payload else [header])
        except OSError as exc:
            raise self._broken(exc) from exc
        return request_id

    def receive(self, into: memoryview | None = None) -> tuple[Response, bytes]:
        """Wait for the next reply. Its payload goes into *into* when given (and must fill
        it exactly), else it is returned. A reported error is raised."""
        try:
            proto.recv_exact(self.sock, memoryview(self._header))
            response = proto.decode_response(self._header)
            if response.error:
                message = bytearray(response.payload_length)
                proto.recv_exact(self.sock, memoryview(message))
                raise proto.error_from_code(response.error,
                                            f"replica {self.name}: {message.decode()}")
            if into is not None:
                if response.payload_length != len(into):
                    raise ProtocolError(f"replica {self.name} sent {response.payload_length} "
                                        f"bytes where {len(into)} were expected")
                proto.recv_exact(self.sock, into)
                return response, b""
            payload = bytearray(response.payload_length)
            proto.recv_exact(self.sock, memoryview(payload))
            return response, bytes(payload)
        except ApplianceError as exc:
            if not isinstance(exc, (Unavailable, ProtocolError)):
                raise
            self.close()
            raise
        except OSError as exc:
            raise self._broken(exc) from exc

    def call(self, op: int, offset: int = 0, length: int = 0, flags: int = 0,
             payload: bytes | memoryview = b"", into: memoryview | None = None,
             timeout: float | None = None) -> bytes:
        """Send one request and wait for its reply (*timeout* overrides the connection's,
        for control operations that take long)."""
        if timeout is not None:
            proto.set_timeout(self.sock, timeout)
        try:
            request_id = self.send(op, offset, length, flags, payload)
            response, data = self.receive(into)
        finally:
            if timeout is not None and self.sock.fileno() >= 0:
                proto.set_timeout(self.sock, self.timeout)
        if response.id != request_id:
            self.close()
            raise ProtocolError(f"replica {self.name} answered request {response.id}, "
                                f"not {request_id}")
        return data

    def _broken(self, exc: OSError) -> Unavailable:
        self.close()
        return Unavailable(f"replica {self.name}: {_reason(exc)}")

    def close(self) -> None:
        self.sock.close()

    @property
    def closed(self) -> bool:
        return self.sock.fileno() < 0

    # -- operations -------------------------------------------------------------------------

    def read(self, buf: memoryview, offset: int) -> None:
        """READ into *buf* (the engine's reads go through its :class:`Pipeline`)."""
        self.call(Op.READ, offset, len(buf), into=buf)

    def write(self, data: bytes | memoryview, offset: int, *, fua: bool = False) -> None:
        self.call(Op.WRITE, offset, len(data), FLAG_FUA if fua else 0, data)

    def write_zeroes(self, offset: int, length: int, *, fua: bool = False,
                     report: bool = False) -> list[tuple[int, int]]:
        flags = (FLAG_FUA if fua else 0) | (FLAG_REPORT_ZEROS if report else 0)
        return proto.decode_runs(self.call(Op.WRITE_ZEROES, offset, length, flags))

    def zero_exact(self, first: int, last: int, explicit: list[tuple[int, int]], *,
                   fua: bool = False) -> None:
        self.call(Op.ZERO_EXACT, first, last - first, FLAG_FUA if fua else 0,
                  proto.encode_runs(explicit))

    def unmap(self, offset: int, length: int) -> None:
        self.call(Op.UNMAP, offset, length)

    def flush(self) -> None:
        self.call(Op.FLUSH)

    def ping(self) -> None:
        self.call(Op.PING)

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return proto.decode_extents(self.call(Op.EXTENTS, offset, length))

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = proto.decode_json(self.call(Op.STATUS))
        return result

    def snapshot(self, name: str, *, labels: Mapping[str, str] | None = None,
                 user_created: bool = True, timeout: float | None = None) -> None:
        self.call(Op.SNAPSHOT, payload=proto.encode_json(
            {"name": name, "labels": dict(labels or {}), "user_created": user_created}),
            timeout=timeout)

    def remove_snapshot(self, name: str) -> None:
        self.call(Op.REMOVE_SNAPSHOT, payload=proto.encode_json({"name": name}))

    def purge(self, *, timeout: float | None = None) -> dict[str, int]:
        result: dict[str, int] = proto.decode_json(self.call(Op.PURGE, timeout=timeout))
        return result

    def expand(self, size: int) -> None:
        self.call(Op.EXPAND, size)

    def revert(self, name: str) -> None:
        self.call(Op.REVERT, payload=proto.encode_json({"name": name}))

    def layers(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = proto.decode_json(self.call(Op.LAYERS))
        return result

    def set_volume_record(self, record: Mapping[str, Any]) -> None:
        self.call(Op.SET_VOLUME_RECORD, payload=proto.encode_json(dict(record)))

    def checksum(self, layer: str | None, *, chunks: bool = False,
                 timeout: float | None = None) -> dict[str, Any]:
        result: dict[str, Any] = proto.decode_json(self.call(
            Op.CHECKSUM, payload=proto.encode_json({"layer": layer, "chunks": chunks}),
            timeout=timeout))
        return result

    def set_revision(self, revision: int) -> None:
        self.call(Op.SET_REVISION, revision)

    def scrub_layer(self, layer: str, rate: int, *, timeout: float | None = None
                    ) -> dict[str, Any]:
        """Verify snapshot *layer* against its checksums, reading at most *rate* bytes per
        second (0: no limit): ``{"digest", "chunks": {number: hex}, "damaged": [number]}``."""
        result: dict[str, Any] = proto.decode_json(self.call(
            Op.SCRUB_LAYER, payload=proto.encode_json({"layer": layer, "rate": rate}),
            timeout=timeout))
        return result

    def repair_chunk(self, layer: str, number: int, bitmap: int, data: bytes) -> None:
        """Rewrite chunk *number* of snapshot *layer* with a good copy (its allocation
        *bitmap* and allocated bytes); refused unless it matches the replica's checksum."""
        header = proto.encode_json({"layer": layer, "bitmap": format(bitmap, "x")})
        self.call(Op.REPAIR_CHUNK, number, payload=header + b"\n" + data, timeout=120)

    def read_layer(self, name: str, buf: memoryview, offset: int) -> None:
        self.call(Op.READ_LAYER, offset, len(buf), payload=name.encode(), into=buf)

    def layer_extents(self, name: str) -> list[tuple[int, int]]:
        return proto.decode_runs(self.call(Op.LAYER_EXTENTS, payload=name.encode()))

    def __enter__(self) -> ReplicaConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Slot:
    """One request in flight on a :class:`Pipeline`."""

    __slots__ = ("data", "deadline", "done", "error", "into", "wake")

    def __init__(self, into: memoryview | None, deadline: float) -> None:
        self.into = into
        self.deadline = deadline  # time.monotonic() by which its reply must have come
        self.data = b""
        self.error: ApplianceError | None = None
        self.done = False
        # Released to wake the request's thread: its reply came, or it may receive next.
        # A wake may come twice (both), so releasing an unlocked one is fine.
        self.wake = threading.Lock()
        self.wake.acquire()

    def signal(self) -> None:
        with contextlib.suppress(RuntimeError):  # already signalled
            self.wake.release()


class Pipeline:
    """Many requests in flight on one connection, from many threads: the engine's data path
    to one replica (docs/performance.md). The server serves a connection's data requests in
    order, on one thread, so one connection per replica keeps the replica's work on one
    thread instead of one per engine thread fighting over its interpreter lock.

    Replies are matched to requests by id. There is no receiving thread: a thread waiting
    for its reply that finds nobody receiving becomes the receiver, reads replies (a read of
    the socket often brings several) and hands each to its request, until its own has come;
    then it wakes a waiting thread to receive next. So a reply usually reaches its thread
    without a hand-off. A connection that fails, or a reply that does not come within the
    connection's timeout (or the longer one given to a request: a flush may write back
    much data), fails every request in flight and the pipeline (make a new one).

    The interpreter lock makes each step on the shared dict and deque atomic; the order of
    the steps (a waiter registers, then checks for a receiver; a receiver steps down, then
    wakes a waiter) makes sure a reply that came is always received by someone.
    """

    def __init__(self, conn: ReplicaConnection) -> None:
        self.conn = conn
        self.name = conn.name
        self._sock = conn.sock
        self._timeout = conn.timeout
        self._reader = proto.BufferedReader(conn.sock, 256 << 10)
        self._send_lock = threading.Lock()
        self._receiving = threading.Lock()  # held by the thread that receives
        self._slots: dict[int, Slot] = {}
        self._waiters: collections.deque[Slot] = collections.deque()
        self._next_id = 1
        self.failure: ApplianceError | None = None

    @property
    def broken(self) -> bool:
        return self.failure is not None

    def submit(self, op: int, offset: int = 0, length: int = 0, flags: int = 0,
               payload: bytes | memoryview = b"", into: memoryview | None = None, *,
               timeout: float | None = None) -> Slot:
        """Send a request; :meth:`wait` for its reply (whose payload goes into *into* when
        given, which it must fill exactly) for at most *timeout* seconds (by default the
        connection's timeout)."""
        slot = Slot(into, time.monotonic() + (timeout or self._timeout))
        with self._send_lock:
            if self.failure is not None:
                raise self.failure
            request_id = self._next_id
            self._next_id = request_id + 1
            self._slots[request_id] = slot
            header = proto.encode_request(op, request_id, offset, length, flags, len(payload))
            try:
                proto.send_parts(self._sock, [header, payload] if payload else [header])
                return slot
            except OSError as exc:
                failure = Unavailable(f"replica {self.name}: {_reason(exc)}")
        raise self._fail(failure)

    def wait(self, slot: Slot) -> bytes:
        """The reply's payload (empty when it went into the request's buffer); the error the
        replica reported, or the failure of the connection, is raised."""
        receiving = self._receiving
        while not slot.done:
            if receiving.acquire(blocking=False):
                self._lead(slot)
                break
            self._waiters.append(slot)
            if slot.done or not receiving.locked():
                continue  # it came meanwhile, or nobody receives now: try again
            remaining = slot.deadline - time.monotonic()
            if remaining > 0 and slot.wake.acquire(timeout=remaining):
                continue  # its reply came, or it may receive next
            # Its time is up while another thread receives. Its thread may have been held
            # elsewhere (sending to another replica) while the reply came: receive, and
            # fail the connection only if the reply is not there either.
            if receiving.acquire(timeout=self._timeout):
                self._lead(slot)
            elif not slot.done:
                self._fail(Unavailable(f"replica {self.name}: timed out"))
            break
        if slot.error is not None:
            raise slot.error
        return slot.data

    def call(self, op: int, offset: int = 0, length: int = 0, flags: int = 0,
             payload: bytes | memoryview = b"", into: memoryview | None = None, *,
             timeout: float | None = None) -> bytes:
        return self.wait(self.submit(op, offset, length, flags, payload, into,
                                     timeout=timeout))

    def _lead(self, slot: Slot) -> None:
        """Receive (the caller holds the receiving lock) until *slot* is done."""
        try:
            self._receive_until(slot)
        finally:
            self._receiving.release()
            self._wake_next()

    def _wake_next(self) -> None:
        """Wake a thread still waiting for its reply: it receives next."""
        waiters = self._waiters
        while waiters:
            try:
                slot = waiters.popleft()
            except IndexError:
                return
            if not slot.done:
                slot.signal()
                return

    def _read(self, count: int) -> memoryview:
        """*count* bytes of the stream. The socket's (kernel) timeout ends a wait for more
        only when a request in flight is overdue: a flush may take longer than the
        connection's timeout, and what was read so far stays in the buffer."""
        while True:
            try:
                return self._reader.read(count)
            except OSError as exc:
                if not proto.timed_out(exc):
                    raise
                now = time.monotonic()
                if any(slot.deadline <= now for slot in list(self._slots.values())):
                    raise
                if self.failure is not None:
                    raise self.failure from None

    def _receive_until(self, mine: Slot) -> None:
        slots = self._slots
        slot: Slot | None = None  # taken from the table, not yet done
        try:
            while not mine.done:
                response = proto.decode_response(self._read(proto.RESPONSE.size))
                slot = slots.pop(response.id, None)
                payload = self._read(response.payload_length)
                if slot is None:
                    raise ProtocolError(f"replica {self.name} answered request "
                                        f"{response.id}, which is not in flight")
                if response.error:
                    slot.error = proto.error_from_code(
                        response.error,
                        f"replica {self.name}: {bytes(payload).decode(errors='replace')}")
                elif slot.into is not None:
                    if len(payload) != len(slot.into):
                        raise ProtocolError(f"replica {self.name} sent {len(payload)} bytes "
                                            f"where {len(slot.into)} were expected")
                    slot.into[:] = payload
                else:
                    slot.data = bytes(payload)
                slot.done = True
                if slot is not mine:
                    slot.signal()
                slot = None
        except ApplianceError as exc:
            failure = self._fail(exc)
        except OSError as exc:
            failure = self._fail(Unavailable(f"replica {self.name}: {_reason(exc)}"))
        else:
            return
        # The request whose reply was being read is no longer in the table: fail it here.
        for orphan in (slot, mine):
            if orphan is not None and not orphan.done:
                orphan.error = failure
                orphan.done = True
                orphan.signal()

    def _fail(self, exc: ApplianceError) -> ApplianceError:
        """Fail the pipeline and every request in flight with *exc*; return it."""
        with self._send_lock:
            if self.failure is None:
                self.failure = exc
            failure = self.failure
            slots, self._slots = list(self._slots.values()), {}
        with contextlib.suppress(OSError):  # wakes a receiver blocked on the socket
            self._sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()
        for slot in slots:
            if not slot.done:
                slot.error = failure
                slot.done = True
                slot.signal()
        return failure

    def close(self, reason: str = "closed") -> None:
        self._fail(Unavailable(f"replica {self.name}: {reason}"))


def _reason(exc: OSError) -> str:
    if proto.timed_out(exc):
        return "timed out"
    return exc.strerror or str(exc)

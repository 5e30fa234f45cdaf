"""The replica protocol, version 1: framing, message types, handshake, error codes.

docs/replica-protocol.md is the specification; this module is its executable form and has
no I/O of its own beyond the two socket helpers at the end.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import socket
import struct
import uuid
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from appliance import errors
from appliance.errors import ApplianceError, InvalidArgument, ProtocolError, Unavailable

VERSION = 1
HELLO_MAGIC = b"APLREP01"
REQUEST_MAGIC = 0x5251  # "RQ"
RESPONSE_MAGIC = 0x5253  # "RS"
MAX_PAYLOAD = 32 << 20  # the largest NBD request, and the largest block of data per message
NONCE_SIZE = 32

#: magic, op, flags, request id, offset, length, payload length
REQUEST = struct.Struct(">HHIQQII")
#: magic, op, error code, request id, payload length, reserved
RESPONSE = struct.Struct(">HHIQII")
#: magic, version, reserved, server nonce
HELLO = struct.Struct(">8sHH32s")
#: client nonce, role, reserved, generation, attach token, client proof
AUTH = struct.Struct(">32sB7xQQ32s")
#: status (an error code, 0 when accepted), server proof, generation, revision, size, replica id
WELCOME = struct.Struct(">I32sQQQ16s")
#: a run of blocks or bytes: start, end (exclusive)
RUN = struct.Struct(">QQ")
#: an extent: offset, length, flags (EXTENT_ZERO when it reads as zeros)
EXTENT = struct.Struct(">QQI")
EXTENT_ZERO = 1


class Op(IntEnum):
    # data: handled inline, in order, by the connection's thread
    READ = 1
    WRITE = 2
    WRITE_ZEROES = 3
    UNMAP = 4
    FLUSH = 5
    PING = 6
    EXTENTS = 7
    ZERO_EXACT = 8
    # control: may complete out of order
    STATUS = 16
    SNAPSHOT = 17
    REMOVE_SNAPSHOT = 18
    PURGE = 19
    EXPAND = 20
    REVERT = 21
    LAYERS = 22
    SET_VOLUME_RECORD = 23
    CHECKSUM = 24
    READ_LAYER = 25
    LAYER_EXTENTS = 26
    REBUILD = 27
    REBUILD_STATUS = 28
    SET_REVISION = 29
    LEND = 30  # lend the replica to the engine on this host (docs/local-fast-path.md)
    SCRUB_LAYER = 31  # verify a snapshot layer against its checksums
    REPAIR_CHUNK = 32  # rewrite a damaged chunk of a snapshot layer with a good copy


class Role(IntEnum):
    WRITER = 1  # an engine: may change the replica; fenced by generation and attach token
    READER = 2  # status and immutable snapshot layers only (rebuild sources, inspection)


#: operations a reader may use
READER_OPS = frozenset({Op.PING, Op.STATUS, Op.LAYERS, Op.CHECKSUM, Op.READ_LAYER,
                        Op.LAYER_EXTENTS, Op.SCRUB_LAYER, Op.REPAIR_CHUNK})

FLAG_FUA = 1  # WRITE, WRITE_ZEROES, ZERO_EXACT: durable before the reply
FLAG_REPORT_ZEROS = 2  # WRITE_ZEROES: reply with the block runs written as explicit zeros


@dataclass(frozen=True)
class Request:
    op: int
    flags: int
    id: int
    offset: int
    length: int
    payload_length: int


@dataclass(frozen=True)
class Response:
    op: int
    error: int
    id: int
    payload_length: int


@dataclass(frozen=True)
class Welcome:
    status: int
    proof: bytes
    generation: int
    revision: int
    size: int
    replica_id: str


def encode_request(op: int, request_id: int, offset: int = 0, length: int = 0, flags: int = 0,
                   payload_length: int = 0) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, op, flags, request_id, offset, length, payload_length)


def decode_request(header: bytes | bytearray | memoryview) -> Request:
    magic, op, flags, request_id, offset, length, payload_length = REQUEST.unpack(header)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {magic:#06x}")
    if payload_length > MAX_PAYLOAD or (length > MAX_PAYLOAD and op == Op.READ):
        raise ProtocolError(f"request of {max(payload_length, length)} bytes is larger than "
                            f"{MAX_PAYLOAD}")
    return Request(op, flags, request_id, offset, length, payload_length)


def encode_response(op: int, request_id: int, error: int = 0, payload_length: int = 0) -> bytes:
    return RESPONSE.pack(RESPONSE_MAGIC, op, error, request_id, payload_length, 0)


def decode_response(header: bytes | bytearray | memoryview) -> Response:
    magic, op, error, request_id, payload_length, _reserved = RESPONSE.unpack(header)
    if magic != RESPONSE_MAGIC:
        raise ProtocolError(f"bad response magic {magic:#06x}")
    if payload_length > MAX_PAYLOAD:
        raise ProtocolError(f"response of {payload_length} bytes is larger than {MAX_PAYLOAD}")
    return Response(op, error, request_id, payload_length)


# -- payloads -----------------------------------------------------------------------------


def encode_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def decode_json(payload: bytes | bytearray | memoryview) -> Any:
    try:
        return json.loads(bytes(payload))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"malformed JSON payload: {exc}") from exc


def json_object(payload: bytes | bytearray | memoryview) -> dict[str, Any]:
    value = decode_json(payload)
    if not isinstance(value, dict):
        raise InvalidArgument("the request payload must be a JSON object")
    return value


def encode_runs(runs: list[tuple[int, int]]) -> bytes:
    return b"".join(RUN.pack(start, end) for start, end in runs)


def decode_runs(payload: bytes | bytearray | memoryview) -> list[tuple[int, int]]:
    if len(payload) % RUN.size:
        raise ProtocolError(f"a run list of {len(payload)} bytes")
    runs = list(RUN.iter_unpack(payload))
    if any(start >= end for start, end in runs):
        raise ProtocolError("an empty or inverted run")
    return runs


def encode_extents(extents: list[tuple[int, int, bool]]) -> bytes:
    return b"".join(EXTENT.pack(offset, length, 0 if allocated else EXTENT_ZERO)
                    for offset, length, allocated in extents)


def decode_extents(payload: bytes | bytearray | memoryview) -> list[tuple[int, int, bool]]:
    if len(payload) % EXTENT.size:
        raise ProtocolError(f"an extent list of {len(payload)} bytes")
    return [(offset, length, not flags & EXTENT_ZERO)
            for offset, length, flags in EXTENT.iter_unpack(payload)]


# -- the handshake ------------------------------------------------------------------------

_CLIENT_CONTEXT = b"appliance-replica/1 client"
_SERVER_CONTEXT = b"appliance-replica/1 server"
_AUTH_FIELDS = struct.Struct(">BQQ")
_WELCOME_FIELDS = struct.Struct(">IQQQ16s")


def client_proof(secret: bytes, server_nonce: bytes, client_nonce: bytes, role: int,
                 generation: int, token: int) -> bytes:
    """HMAC-SHA256 proving the client holds the secret, bound to both nonces and to the
    session it asks for (so a recorded proof cannot be replayed or redirected)."""
    message = (_CLIENT_CONTEXT + server_nonce + client_nonce +
               _AUTH_FIELDS.pack(role, generation, token))
    return hmac.new(secret, message, hashlib.sha256).digest()


def server_proof(secret: bytes, client_nonce: bytes, server_nonce: bytes, status: int,
                 generation: int, revision: int, size: int, replica_id: bytes) -> bytes:
    """HMAC-SHA256 proving the server holds the secret, bound to the nonces and to every
    field of its welcome."""
    message = (_SERVER_CONTEXT + client_nonce + server_nonce +
               _WELCOME_FIELDS.pack(status, generation, revision, size, replica_id))
    return hmac.new(secret, message, hashlib.sha256).digest()


def replica_id_bytes(replica_id: str) -> bytes:
    return uuid.UUID(replica_id).bytes


def decode_welcome(data: bytes) -> Welcome:
    status, proof, generation, revision, size, rid = WELCOME.unpack(data)
    return Welcome(status, proof, generation, revision, size, str(uuid.UUID(bytes=rid)))


# -- error codes --------------------------------------------------------------------------

#: Error codes on the wire are errno values; damaged data has its own (EUCLEAN) so that the
#: peer can tell it from an I/O error.
_CODE_TO_ERROR: dict[int, type[ApplianceError]] = {
    errno.ENOSPC: errors.NoSpace,
    errno.EDQUOT: errors.NoSpace,
    errno.ENOENT: errors.NotFound,
    errno.EEXIST: errors.AlreadyExists,
    errno.EINVAL: errors.InvalidArgument,
    errno.EBUSY: errors.FailedPrecondition,
    errno.EROFS: errors.ReadOnly,
    errno.EFBIG: errors.LimitExceeded,
    errno.ESTALE: errors.StaleSession,
    errno.EACCES: errors.AuthenticationFailed,
    errno.EUCLEAN: errors.Corruption,
    errno.EPROTO: errors.ProtocolError,
    errno.EIO: errors.StorageIOError,
}


def error_code(exc: ApplianceError) -> int:
    if isinstance(exc, errors.Corruption):
        return errno.EUCLEAN
    if isinstance(exc, ProtocolError):
        return errno.EPROTO
    return exc.errno or errno.EIO


def error_from_code(code: int, message: str) -> ApplianceError:
    error = _CODE_TO_ERROR.get(code, errors.StorageIOError)(message)
    if isinstance(error, errors.StorageIOError):
        error.errno = code
    return error


# -- sockets ------------------------------------------------------------------------------


class ConnectionClosed(Unavailable):
    """The peer closed the connection."""


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill *view* from *sock*; raise :class:`ConnectionClosed` at end of stream."""
    while view:
        count = sock.recv_into(view)
        if not count:
            raise ConnectionClosed("the connection was closed by the peer")
        view = view[count:]


class BufferedReader:
    """Reads a socket in large chunks: a message's header and payload (and often the next
    message) arrive in one system call. A returned view is valid until the next read."""

    def __init__(self, sock: socket.socket, size: int = 1 << 20) -> None:
        self.sock = sock
        self._buffer = bytearray(size)
        self._view = memoryview(self._buffer)
        self._start = self._end = 0

    def read(self, count: int) -> memoryview:
        if self._end - self._start < count:
            self._fill(count)
        view = self._view[self._start: self._start + count]
        self._start += count
        return view

    def _fill(self, count: int) -> None:
        pending = self._end - self._start
        if self._start + count > len(self._buffer):  # make room: move what is left to the front
            if count > len(self._buffer):
                self._buffer = bytearray(max(count, 2 * len(self._buffer)))
                self._buffer[:pending] = self._view[self._start: self._end]
                self._view = memoryview(self._buffer)
            else:
                self._view[:pending] = self._view[self._start: self._end]
            self._start, self._end = 0, pending
        while self._end - self._start < count:
            received = self.sock.recv_into(self._view[self._end:])
            if not received:
                raise ConnectionClosed("the connection was closed by the peer")
            self._end += received


def send_parts(sock: socket.socket, parts: list[bytes | memoryview]) -> None:
    """Send every byte of *parts* (gathered, one system call when possible)."""
    total = sum(len(part) for part in parts)
    sent = sock.sendmsg(parts)
    if sent == total:
        return
    remaining = b"".join(bytes(part) for part in parts)[sent:]
    sock.sendall(remaining)


def set_timeout(sock: socket.socket, seconds: float) -> None:
    """Bound every send and receive on *sock* by *seconds*, in the kernel (``SO_RCVTIMEO``,
    ``SO_SNDTIMEO``). The socket stays in blocking mode, so each call is one system call:
    a Python-level timeout would add a ``poll()`` and a cycle of the interpreter lock before
    every send and receive. A call that times out raises an OSError that :func:`timed_out`
    recognises."""
    sock.settimeout(None)
    whole = int(seconds)
    value = struct.pack("@ll", whole, int((seconds - whole) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


def timed_out(exc: OSError) -> bool:
    """True when *exc* is the end of a wait: a Python timeout, or a kernel one
    (:func:`set_timeout`), which blocking calls report as EAGAIN."""
    return isinstance(exc, TimeoutError) or exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK)


def tune_socket(sock: socket.socket) -> None:
    """Low latency, and dead peers noticed within about half a minute."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) to a (host, port) pair."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"invalid address {text!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def format_address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

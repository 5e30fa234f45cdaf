"""One authenticated connection to a replica server, and the shape of the handlers that
serve its requests (the server and its operation modules share these)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

from appliance.errors import ApplianceError
from appliance.replication import protocol as proto
from appliance.replication.protocol import Request, Role

Parts = list[bytes | memoryview]
Handler = Callable[["Session", Request, bytes], Parts]


class Session:
    """One authenticated connection."""

    def __init__(self, sock: socket.socket, peer: str, role: Role, generation: int,
                 token: int) -> None:
        self.sock = sock
        self.peer = peer
        self.role = role
        self.key = (generation, token)
        self.send_lock = threading.Lock()
        self.buffer = bytearray(1 << 20)
        self.ended = threading.Event()  # set when the connection is over (long work stops)

    def view(self, size: int) -> memoryview:
        if len(self.buffer) < size:
            self.buffer = bytearray(size)
        return memoryview(self.buffer)[:size]

    def reply(self, request: Request, parts: Parts | None = None, error: int = 0) -> None:
        parts = parts or []
        length = sum(len(part) for part in parts)
        header = proto.encode_response(request.op, request.id, error, length)
        with self.send_lock:
            proto.send_parts(self.sock, [header, *parts])

    def reply_error(self, request: Request, exc: ApplianceError) -> None:
        self.reply(request, [str(exc).encode()], proto.error_code(exc))

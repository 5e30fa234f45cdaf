"""The engine's control socket: a unix socket speaking one JSON object per line.

Request: ``{"op": NAME, ...arguments}``. Reply: ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": {"code": CODE, "message": TEXT}}``. The socket file is created mode
0600 in a directory the caller chose: only its owner (root) can use it, which is how the
socket is authenticated. Specified in docs/engine-control.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance import unixsock
from appliance.errors import ApplianceError, InvalidArgument, Unavailable, error_class

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20
Handler = Callable[[dict[str, Any]], Any]


class ControlServer:
    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        old_umask = os.umask(0o177)
        try:
            unixsock.bind(self._sock, path)
        finally:
            os.umask(old_umask)
        path.chmod(0o600)
        self._sock.listen(16)
        self._thread = threading.Thread(target=self._accept, name="control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):  # wakes the thread blocked in accept()
            self._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join()
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._stop.is_set():
                    return
                raise
            threading.Thread(target=self._serve, args=(conn,), daemon=True,
                             name="control-conn").start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as stream:
            while line := stream.readline(MAX_LINE):
                reply = self._handle(line)
                stream.write(json.dumps(reply).encode() + b"\n")
                stream.flush()

    def _handle(self, line: bytes) -> dict[str, Any]:
        try:
            try:
                request = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise InvalidArgument(f"malformed control request: {exc}") from exc
            if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                raise InvalidArgument("a control request is an object with an 'op'")
            handler = self.handlers.get(request["op"])
            if handler is None:
                raise InvalidArgument(f"unknown control operation {request['op']!r}")
            return {"ok": True, "result": handler(request)}
        except ApplianceError as exc:
            return {"ok": False, "error": {"code": exc.code, "message": exc.message}}
        except Exception as exc:
            log.exception("control request failed")
            return {"ok": False, "error": {"code": "failed", "message": f"internal error: {exc}"}}


def call(path: str | Path, op: str, *, timeout: float = 60.0, **arguments: Any) -> Any:
    """Send one control request to the engine at *path* and return its result."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            unixsock.connect(sock, path)
        except FileNotFoundError:
            raise Unavailable(f"no engine control socket at {path}") from None
        except OSError as exc:
            raise Unavailable(f"engine control socket {path}: {exc.strerror}") from exc
        with sock.makefile("rwb") as stream:
            stream.write(json.dumps({"op": op, **arguments}).encode() + b"\n")
            stream.flush()
            line = stream.readline(MAX_LINE)
    except TimeoutError as exc:
        raise Unavailable(f"engine control socket {path}: no answer in {timeout} s") from exc
    finally:
        sock.close()
    if not line:
        raise Unavailable(f"engine control socket {path} closed the connection")
    reply = json.loads(line)
    if not reply.get("ok"):
        error = reply.get("error", {})
        raise error_class(error.get("code", "failed"))(error.get("message", "failed"))
    return reply.get("result")

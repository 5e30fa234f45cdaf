"""The CSI plugin's gRPC server: the services of its mode on a unix socket, and the one
place where the project's errors become gRPC status codes (``grpc_status`` of each class).

Every call is logged with its method and ids, never with its secrets or whole request."""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from appliance import unixsock
from appliance.csi.backend import Appliance
from appliance.csi.config import PluginConfig
from appliance.csi.controller import Controller
from appliance.csi.identity import Identity
from appliance.csi.inflight import InFlight
from appliance.csi.node import Node
from appliance.csi.proto import csi_pb2_grpc as csi_grpc
from appliance.errors import AddressInUse, ApplianceError, InvalidArgument

log = logging.getLogger("appliance.csi")
MODES = ("controller", "node", "all")
_IDS = ("volume_id", "source_volume_id", "snapshot_id", "node_id", "name")


def socket_path(endpoint: str) -> Path:
    """The path of a ``unix:///PATH`` (or ``unix:PATH``) endpoint."""
    for prefix in ("unix://", "unix:"):
        if endpoint.startswith(prefix) and len(endpoint) > len(prefix):
            path = endpoint[len(prefix):]
            if path.startswith("/"):
                return Path(path)
    raise InvalidArgument(f"endpoint {endpoint!r} is not unix:///ABSOLUTE/PATH (the CSI "
                          "plugin listens on a unix socket, as kubelet and the sidecars "
                          "expect)")


def _claim(path: Path) -> None:
    """Make room for the socket: a stale one is removed, a live one or a file is not."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return
    if not stat.S_ISSOCK(mode):
        raise AddressInUse(f"{path} exists and is not a socket: give another endpoint")
    if unixsock.listening(path):
        raise AddressInUse(f"another process serves {path}: stop it, or give another "
                           "endpoint")
    path.unlink()  # nobody listens: left by a plugin that died


def _ids(request: Any) -> str:
    found = []
    for field in _IDS:
        value = getattr(request, field, "")
        if isinstance(value, str) and value:
            found.append(f"{field}={value}")
    return " ".join(found)


class Errors(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """The project's errors as gRPC status codes; anything else is a bug (INTERNAL, with
    its traceback in the log)."""

    def intercept_service(self, continuation: Callable[[Any], Any],
                          details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            ids = _ids(request)
            try:
                reply = inner(request, context)
            except ApplianceError as exc:
                code = getattr(grpc.StatusCode, exc.grpc_status)
                log.info("%s %s: %s %s", method, ids, code.name, exc.message)
                context.abort(code, exc.message)
            except Exception:
                log.exception("%s %s failed", method, ids)
                context.abort(grpc.StatusCode.INTERNAL, f"{method} failed: a bug in the CSI "
                              "plugin (its log has the traceback)")
            log.info("%s %s: ok", method, ids)
            return reply

        return grpc.unary_unary_rpc_method_handler(
            call, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


def build(appliance: Appliance, config: PluginConfig, mode: str,
          workers: int = 8) -> grpc.Server:
    """The server with the services of *mode* (not started)."""
    if mode not in MODES:
        raise InvalidArgument(f"mode {mode!r}: use one of {', '.join(MODES)}")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers,
                                                    thread_name_prefix="csi"),
                         interceptors=[Errors()])
    inflight = InFlight()  # shared: a volume's controller and node calls exclude each other
    csi_grpc.add_IdentityServicer_to_server(  # type: ignore[no-untyped-call]
        Identity(appliance), server)
    if mode in ("controller", "all"):
        csi_grpc.add_ControllerServicer_to_server(  # type: ignore[no-untyped-call]
            Controller(appliance, config, inflight), server)
    if mode in ("node", "all"):
        csi_grpc.add_NodeServicer_to_server(  # type: ignore[no-untyped-call]
            Node(appliance, config, inflight), server)
    return server


def serve(appliance: Appliance, config: PluginConfig, endpoint: str, mode: str,
          stop: threading.Event) -> None:
    """Serve until *stop* is set; the socket is removed on the way out."""
    path = socket_path(endpoint)
    _claim(path)
    server = build(appliance, config, mode)
    old = os.umask(0o077)  # the socket is its owner's (root's): its mode guards it
    try:
        server.add_insecure_port(f"unix://{path}")
        server.start()
    finally:
        os.umask(old)
    path.chmod(0o600)  # whenever gRPC made it
    log.info("CSI plugin (%s) serving node %s on %s", mode, config.node_id, path)
    try:
        stop.wait()
    finally:
        server.stop(grace=5).wait()
        path.unlink(missing_ok=True)

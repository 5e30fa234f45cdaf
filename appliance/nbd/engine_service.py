"""The engine service inside the nbdkit process: the engine, its control socket, and the
optional TCP listener (a second nbdkit, C only, forwarding TLS-PSK NBD to the unix socket;
nbdkit listens on one kind of socket only)."""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.defaults import WITNESS_WAIT
from appliance.errors import InvalidArgument, Unavailable
from appliance.nbd import threadstate
from appliance.nbd.settings import EngineSettings
from appliance.nbd.witness import HttpWitness
from appliance.replication import protocol as proto
from appliance.replication.engine import Engine, EngineConfig
from appliance.replication.engine_control import ControlServer
from appliance.secrets import read_secret_file, write_secret_file

log = logging.getLogger(__name__)

FORWARDER_READY_TIMEOUT = 30.0


class EngineService:
    def __init__(self, settings: EngineSettings, shutdown: Callable[[], None]) -> None:
        self.settings = settings
        self._shutdown = shutdown
        self.engine = Engine(EngineConfig(
            settings.volume, settings.replicas, read_secret_file(settings.secret_file),
            timeout=settings.timeout, salvage=settings.salvage,
            salvage_from=settings.salvage_from,
            rebuild_bandwidth=settings.rebuild_bandwidth,
            local_fast_path=settings.local_fast_path,
            witness=HttpWitness(settings.witness, settings.witness_token_file, settings.volume,
                                WITNESS_WAIT)
            if settings.witness and settings.witness_token_file else None))
        self.control: ControlServer | None = None
        self.forwarder: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.engine.start()
        self.control = ControlServer(self.settings.control, {
            "status": self._status, "add-replica": self._add_replica,
            "remove-replica": self._remove_replica, "snapshot": self._snapshot,
            "snapshots": lambda request: self.engine.snapshots(),
            "remove-snapshot": lambda request: self.engine.remove_snapshot(
                self._name(request)),
            "purge": lambda request: self.engine.purge(),
            "expand": self._expand, "stop": self._stop})
        self.control.start()
        if self.settings.listen:
            self.forwarder = self._start_forwarder()

    def _start_forwarder(self) -> subprocess.Popen[bytes]:
        settings = self.settings
        assert settings.listen is not None
        psk = settings.psk_file or settings.control.with_name(settings.control.name + ".psk")
        if not psk.exists():
            write_secret_file(psk, b"appliance:" + os.urandom(32).hex().encode() + b"\n")
        host, port = settings.listen
        ready = self._listener_pid_file()
        ready.unlink(missing_ok=True)
        # nbdkit writes its pid file only once it accepts connections: the engine counts
        # as started after that, so a client never races the listener.
        command = ["nbdkit", "--exit-with-parent", "-f", "-i", host, "-p", str(port),
                   "-P", str(ready), "--tls=require", f"--tls-psk={psk}", "nbd",
                   f"socket={settings.socket}"]
        log.info("serving NBD over TLS-PSK on %s (key file %s)",
                 proto.format_address(settings.listen), psk)
        forwarder = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + FORWARDER_READY_TIMEOUT
        while not ready.exists():
            if forwarder.poll() is not None:
                raise Unavailable(f"the NBD listener on {proto.format_address(settings.listen)} "
                                  f"exited with status {forwarder.returncode}; see the engine log")
            if time.monotonic() > deadline:
                forwarder.kill()
                raise Unavailable(f"the NBD listener on {proto.format_address(settings.listen)} "
                                  f"did not start in {FORWARDER_READY_TIMEOUT:.0f} s")
            time.sleep(0.02)
        return forwarder

    def _listener_pid_file(self) -> Path:
        control = self.settings.control
        return control.with_name(control.name + ".listen.pid")

    def stop(self) -> None:
        if self.control is not None:
            self.control.stop()
        if self.forwarder is not None:
            self.forwarder.terminate()
            self.forwarder.wait(timeout=10)
            self._listener_pid_file().unlink(missing_ok=True)
        self.engine.close()

    # -- control operations -----------------------------------------------------------------

    def _status(self, request: dict[str, Any]) -> dict[str, Any]:
        status = self.engine.status()
        status.update(socket=str(self.settings.socket), control=str(self.settings.control),
                      pid=os.getpid(), threads_pinned=threadstate.pinned(),
                      listen=proto.format_address(self.settings.listen)
                      if self.settings.listen else None)
        return status

    @staticmethod
    def _address(request: dict[str, Any]) -> tuple[str, int]:
        address = request.get("address")
        if not isinstance(address, str):
            raise InvalidArgument("'address' must be HOST:PORT")
        return proto.parse_address(address)

    def _add_replica(self, request: dict[str, Any]) -> None:
        self.engine.add_replica(self._address(request), discard=request.get("discard") is True)

    def _remove_replica(self, request: dict[str, Any]) -> None:
        self.engine.remove_replica(self._address(request))

    def _snapshot(self, request: dict[str, Any]) -> None:
        labels = request.get("labels") or {}
        if not isinstance(labels, dict):
            raise InvalidArgument("'labels' must be an object")
        self.engine.snapshot(str(request.get("name", "")), labels=labels)

    @staticmethod
    def _name(request: dict[str, Any]) -> str:
        name = request.get("name")
        if not isinstance(name, str):
            raise InvalidArgument("'name' must be a snapshot name")
        return name

    def _expand(self, request: dict[str, Any]) -> None:
        size = request.get("size")
        if not isinstance(size, int) or isinstance(size, bool):
            raise InvalidArgument("'size' must be a number of bytes")
        self.engine.expand(size)

    def _stop(self, request: dict[str, Any]) -> None:
        # Reply first; nbdkit then stops serving and calls the plugin's cleanup().
        threading.Timer(0.05, self._shutdown).start()

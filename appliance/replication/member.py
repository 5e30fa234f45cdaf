"""One replica as the engine sees it: its mode, its pool of connections, its counters."""

from __future__ import annotations

import socket
import threading
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from appliance.errors import ApplianceError, FailedPrecondition, Unavailable
from appliance.replication import protocol as proto
from appliance.replication.client import Pipeline, ReplicaConnection
from appliance.replication.local import LentReplica, LocalPipeline
from appliance.replication.lockorder import Lock
from appliance.replication.protocol import Role


def is_local_address(host: str) -> bool:
    """True when *host* is an address of this machine (in this network namespace)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
    except OSError:
        return False
    return True


class Mode(StrEnum):
    RW = "RW"  # in sync: receives writes, serves reads
    WO = "WO"  # rebuilding: receives writes, serves no reads
    ERR = "ERR"  # failed or not yet in sync: receives nothing


class Member:
    """A replica of the volume. The data path (reads, writes, zeroes, trims, flushes) shares
    one pipelined connection (:meth:`pipeline`); other requests take a pooled connection
    and give it back (:meth:`acquire`, :meth:`release`); a broken one is dropped."""

    def __init__(self, address: tuple[str, int], secret: bytes, timeout: float, *,
                 lock: Lock | None = None) -> None:
        """*lock* guards the pool (the engine passes one that checks the lock order)."""
        self.address = address
        self.name = proto.format_address(address)
        self.replica_id = ""
        self.mode = Mode.ERR
        self.reason = "not connected"
        self.local = is_local_address(address[0])
        self.unix_path: str | None = None  # the server's unix socket, when it is local
        self._secret = secret
        self.timeout = timeout
        self._generation = 0
        self._token = 0
        self._idle: list[ReplicaConnection] = []
        self._pipeline: Pipeline | None = None  # the data path's connection
        self.lent: LentReplica | None = None  # the replica, lent by its server to us
        self._lock: Lock = threading.Lock() if lock is None else lock
        self.rebuild: dict[str, Any] | None = None
        self.kept: Mapping[str, Any] | None = None  # a diverged branch a salvage kept
        # "reads" and "writes" are counted under the engine's stats lock, "errors" (by
        # leave) under the roster's lock
        self.stats = {"reads": 0, "writes": 0, "errors": 0}

    def session(self, generation: int, token: int) -> None:
        """Use writer sessions of this generation and attach token from now on."""
        self.give_back("a new session")
        with self._lock:
            self._generation, self._token = generation, token
            idle, self._idle = self._idle, []
            pipeline, self._pipeline = self._pipeline, None
        for conn in idle:
            conn.close()
        if pipeline is not None:
            pipeline.close("replaced by a new session")

    def connect(self, *, role: Role = Role.WRITER, timeout: float | None = None) -> \
            ReplicaConnection:
        return ReplicaConnection(self.address, self._secret, role=role,
                                 generation=self._generation if role == Role.WRITER else 0,
                                 token=self._token, timeout=timeout or self.timeout,
                                 unix_path=self.unix_path)

    def learn_unix_socket(self, path: str | None) -> None:
        """Use the server's unix socket from now on if it is on this host and answers."""
        if not (self.local and path):
            return
        try:
            ReplicaConnection(self.address, self._secret, timeout=self.timeout,
                              unix_path=path).close()
        except ApplianceError:
            return  # the same address on another host, or in another mount namespace
        self.unix_path = path

    def borrow(self, timeout: float) -> None:
        """Have the replica's server (on this host) lend it to us: serve it in this process
        from now on (docs/local-fast-path.md). Raises if the server refuses."""
        if not (self.local and self.unix_path):
            raise FailedPrecondition(f"replica {self.name} is not on this host")
        self.close_connections()  # the server ends its sessions when it lends
        conn = self.connect(timeout=timeout)
        try:
            lent = LentReplica(self.name, conn, self._secret, (self._generation, self._token),
                               self.unix_path, timeout)
        except BaseException:
            conn.close()
            raise
        with self._lock:
            self.lent = lent

    def give_back(self, reason: str) -> None:
        """Give a lent replica back to its server (which serves it again)."""
        with self._lock:
            lent, self.lent = self.lent, None
        if lent is not None:
            lent.give_back(reason)
            self.close_connections()  # they were served by the lent replica's server

    def pipeline(self) -> Pipeline | LocalPipeline:
        """The data path: the lent replica itself, or one connection per replica, shared by
        every thread, many requests in flight (made on first use, and again after it
        failed)."""
        lent = self.lent
        if lent is not None and not lent.given_back:
            return lent.pipeline
        pipeline = self._pipeline
        if pipeline is not None and not pipeline.broken:
            return pipeline
        with self._lock:
            if self._pipeline is not None and not self._pipeline.broken:
                return self._pipeline
            if self.mode == Mode.ERR:
                raise Unavailable(f"replica {self.name} is out of service ({self.reason})")
            self._pipeline = Pipeline(self.connect())
            return self._pipeline

    def acquire(self) -> ReplicaConnection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        if self.mode == Mode.ERR:
            raise Unavailable(f"replica {self.name} is out of service ({self.reason})")
        return self.connect()

    def release(self, conn: ReplicaConnection) -> None:
        if conn.closed:
            return
        with self._lock:
            if self.mode != Mode.ERR:
                self._idle.append(conn)
                return
        conn.close()

    def leave(self) -> None:
        """It left service (the roster marked it ERR): count it, give it back if it was
        lent, drop its connections."""
        self.stats["errors"] += 1
        self.give_back("it left service")
        self.close_connections()

    def close_connections(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
            pipeline, self._pipeline = self._pipeline, None
        for conn in idle:
            conn.close()
        if pipeline is not None:
            pipeline.close("out of service")

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"address": self.name, "mode": str(self.mode),
                                "replica_id": self.replica_id, **self.stats}
        if self.mode == Mode.ERR:
            info["reason"] = self.reason
        if self.lent is not None and not self.lent.given_back:
            info["lent"] = True
        if self.rebuild is not None:
            info["rebuild"] = dict(self.rebuild)
        if self.kept is not None:
            info["diverged"] = dict(self.kept)
        return info

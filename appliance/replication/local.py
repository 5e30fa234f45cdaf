"""The local fast path: a replica on the engine's host, lent to the engine by its server and
served in the engine's process (docs/local-fast-path.md).

The engine asks the replica's server, over a writer session on the server's unix socket, to
lend it the replica (``LEND``). The server ends its sessions, waits for the work in flight,
closes the replica (releasing the directory's lock) and answers with its directory; the
engine opens it (taking the lock). From then on the server passes every connection it
accepts to the engine over the lend connection, and the engine serves them with the same
:class:`~appliance.replication.server.ReplicaServer` code, in its own process: other engines,
rebuilds and backups reach the replica as before. The engine's own data path calls the
replica directly (:class:`LocalPipeline`).

The lend lasts as long as the lend connection. The engine gives the replica back (ends its
local I/O, serves nothing more, closes the replica, closes the connection) when it stops,
when the replica leaves service, when its server goes away, and when a newer engine asks to
register as the replica's writer: that engine is told to retry (EAGAIN) while the replica
goes back to its server, which then registers it; the old engine is fenced from the moment
the newcomer asked. An engine that dies gives the replica back too: the kernel releases its
lock and closes the connection, and the server opens the replica again. The replica keeps no
acknowledged state in the engine's memory (the chain's index is rebuilt from the files at
open), so an engine crash loses what a replica server crash loses: nothing acknowledged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading

from appliance.chain import Replica
from appliance.errors import (
    ApplianceError,
    ProtocolError,
    StaleSession,
    StorageIOError,
    Unavailable,
)
from appliance.replication import dataops
from appliance.replication import protocol as proto
from appliance.replication.client import ReplicaConnection, Slot
from appliance.replication.protocol import FLAG_REPORT_ZEROS, Op
from appliance.replication.server import ReplicaServer, peer_name

log = logging.getLogger(__name__)

DRAIN_TIMEOUT = 60.0  # seconds a give-back waits for the local I/O in flight


class LentReplica:
    """A replica its server lent to this engine: open in this process, and served to
    everyone else from here until it is given back."""

    def __init__(self, name: str, conn: ReplicaConnection, secret: bytes,
                 key: tuple[int, int], unix_path: str | None, timeout: float) -> None:
        """Borrow the replica behind *conn* (a writer session of registration *key* on its
        server's unix socket); raise if the server refuses or the replica cannot be
        opened here (the server then takes it back)."""
        self.name = name
        self._conn = conn
        reply = json.loads(conn.call(Op.LEND, timeout=timeout))
        try:
            self.replica = Replica.open(str(reply["path"]))
        except BaseException:
            conn.close()  # the server takes the replica back
            raise
        try:
            self._serve(secret, key, unix_path)
        except BaseException:
            self.replica.close()
            conn.close()
            raise

    def _serve(self, secret: bytes, key: tuple[int, int], unix_path: str | None) -> None:
        # a plain lock and an event (a Condition's Python-level methods cost 14 % of a
        # local read's interpreter time)
        self._lock = threading.Lock()
        self._drained = threading.Event()  # set once ending and no local request runs
        self._active = 0  # local requests executing
        self._fenced = False  # a newer engine asked for the replica
        self._ending = False  # being given back: no new local request
        self._given_back = threading.Event()
        self._give_back_lock = threading.Lock()
        self.server = ReplicaServer(self.replica, secret, unix_path=unix_path,
                                    yield_to=self._yield)
        self.server.register(*key)
        self.pipeline = LocalPipeline(self)
        self._receiver = threading.Thread(target=self._receive, name=f"lent-{self.name}",
                                          daemon=True)
        self._receiver.start()

    @property
    def given_back(self) -> bool:
        return self._given_back.is_set()

    # -- local requests ---------------------------------------------------------------------

    def execute(self, op: int, offset: int, length: int, flags: int,
                payload: bytes | memoryview, into: memoryview | None) -> bytes:
        """One data request on the replica, on the calling thread."""
        with self._lock:
            if self._fenced:
                raise StaleSession(f"replica {self.name}: a newer engine owns it")
            if self._ending:
                raise Unavailable(f"replica {self.name}: given back to its server")
            self._active += 1
        try:
            return self._execute(op, offset, length, flags, payload, into)
        except OSError as exc:
            raise StorageIOError(f"replica {self.name}: {exc.strerror or exc}") from exc
        except ApplianceError:
            raise
        except Exception as exc:  # a bug must fail this replica, not leave it behind
            log.exception("replica %s: local request failed", self.name)
            raise StorageIOError(f"replica {self.name}: internal error: {exc}") from exc
        finally:
            self._done()

    def _done(self) -> None:
        with self._lock:
            self._active -= 1
            if self._ending and not self._active:
                self._drained.set()

    def _execute(self, op: int, offset: int, length: int, flags: int,
                 payload: bytes | memoryview, into: memoryview | None) -> bytes:
        replica = self.replica
        if op == Op.READ:
            if into is not None:
                replica.readinto(into, offset)
                return b""
            buf = bytearray(length)
            replica.readinto(buf, offset)
            return bytes(buf)
        if op == Op.WRITE:
            dataops.write(replica, offset, flags, payload)
        elif op == Op.WRITE_ZEROES:
            explicit = dataops.write_zeroes(replica, offset, length, flags)
            return explicit if flags & FLAG_REPORT_ZEROS else b""
        elif op == Op.ZERO_EXACT:
            dataops.zero_exact(replica, offset, length, flags, payload)
        elif op == Op.UNMAP:
            dataops.unmap(replica, offset, length)
        elif op == Op.FLUSH:
            replica.flush()
        elif op != Op.PING:
            raise ProtocolError(f"operation {op} is not a data operation")
        return b""

    # -- connections passed by the server ---------------------------------------------------

    def _receive(self) -> None:
        sock = self._conn.sock
        proto.set_timeout(sock, 0)  # held for the engine's life: no timeout
        reason = "its server closed the lend"
        try:
            while True:
                message, fds, _flags, _address = socket.recv_fds(sock, 1, 1)
                if not message:
                    break
                for fd in fds:
                    conn = socket.socket(fileno=fd)
                    try:
                        peer = peer_name(conn.getpeername())
                    except OSError:
                        conn.close()
                        continue
                    self.server.start_connection(conn, peer)
        except OSError as exc:
            reason = f"the lend connection failed ({exc.strerror or exc})"
        if not self._ending:
            log.warning("replica %s: %s; giving the replica back", self.name, reason)
        self.give_back(reason)

    def _yield(self) -> bool:
        """A newer engine asks to register (the server's hook): fence this engine's local
        I/O now, give the replica back, and have the newcomer retry meanwhile."""
        with self._lock:
            self._fenced = True
        log.warning("replica %s: a newer engine asks for it; giving it back", self.name)
        threading.Thread(target=self.give_back, args=("a newer engine asked for it",),
                         name=f"give-back-{self.name}", daemon=True).start()
        return True

    # -- giving back ------------------------------------------------------------------------

    def give_back(self, reason: str) -> None:
        """End the local I/O (waiting for what is in flight), serve nothing more, close the
        replica and the lend connection: its server opens it again. Idempotent."""
        with self._give_back_lock:
            if self._given_back.is_set():
                return
            with self._lock:
                self._ending = True
                if not self._active:
                    self._drained.set()
            if not self._drained.wait(DRAIN_TIMEOUT):
                # A request is stuck in the kernel (a hung disk): closing the replica under
                # it could reuse its descriptors. Keep it (and its lock): the server cannot
                # open it, and other engines see it unreachable.
                log.error("replica %s: local I/O still in flight after %.0f s; it is not "
                          "given back", self.name, DRAIN_TIMEOUT)
                return
            try:
                self.server.retire()
            except ApplianceError as exc:
                log.error("replica %s: %s; it is not given back", self.name, exc)
                return
            try:
                self.replica.close()  # closed even when its last flush fails
            except ApplianceError as exc:
                log.warning("replica %s: closing it failed: %s", self.name, exc)
            finally:
                with contextlib.suppress(OSError):
                    self._conn.sock.shutdown(socket.SHUT_RDWR)
                self._conn.close()
                self._given_back.set()
            log.info("replica %s given back to its server (%s)", self.name, reason)


class LocalPipeline:
    """The data path to a lent replica: the interface of
    :class:`~appliance.replication.client.Pipeline`, each request executed on the calling
    thread (in :meth:`submit`, so a fan-out submits it after the remote ones)."""

    def __init__(self, lent: LentReplica) -> None:
        self._lent = lent
        self.name = lent.name

    @property
    def broken(self) -> bool:
        return self._lent.given_back

    def submit(self, op: int, offset: int = 0, length: int = 0, flags: int = 0,
               payload: bytes | memoryview = b"", into: memoryview | None = None, *,
               timeout: float | None = None) -> Slot:
        slot = Slot(into, 0.0)
        try:
            slot.data = self._lent.execute(op, offset, length, flags, payload, into)
        except ApplianceError as exc:
            slot.error = exc
        slot.done = True
        return slot

    def wait(self, slot: Slot) -> bytes:
        if slot.error is not None:
            raise slot.error
        return slot.data

    def call(self, op: int, offset: int = 0, length: int = 0, flags: int = 0,
             payload: bytes | memoryview = b"", into: memoryview | None = None, *,
             timeout: float | None = None) -> bytes:
        return self._lent.execute(op, offset, length, flags, payload, into)

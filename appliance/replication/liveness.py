"""Liveness: an idle engine finds a replica that died, hung or was cut off within seconds
(docs/engine-control.md, "Liveness").

A replica that serves I/O shows its failure by itself: the request fails or times out, and
the replica leaves service. A replica that serves nothing (the volume is idle, or only reads,
which go to the local replica) would stay RW, and the volume "healthy", until the next
request it gets; and a fenced-off engine serving reads from the replica beside it would
never learn that it lost the others (docs/membership.md, "The witness"). So every interval
the engine pings each replica in service (RW and WO) that served nothing since the last
look, over its data connection, the one the next write would use; a replica that does not
answer within the data
timeout, or answers with an error (a newer engine owns it), leaves service exactly as it
would on a failed write: through the roster, its reason naming the ping. The node daemon
then rebuilds it as any failed replica.

* **Only the silent**: a replica that served a read or a write since the last look is not
  pinged; the data path pays nothing more (the counts are the engine's statistics).
* **Bounded**: one ping waits at most the data timeout; a dead replica is out of service
  within ``2 * interval + timeout`` seconds of its death.
* **The same failure path as I/O**: a replica the ping fails leaves under the roster's
  lock, with the same records, branch and publication rules (docs/membership.md), so a
  ping racing a write's failure on the same replica is one failure, whichever comes first.
* A replica lent to the engine (docs/local-fast-path.md) is pinged in the engine's process:
  its data does not depend on its server while it is lent; when the server goes, the lend
  ends and the next ping reaches the server over the network (and fails).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from appliance.errors import ApplianceError, Unavailable
from appliance.replication.member import Member
from appliance.replication.protocol import Op

log = logging.getLogger(__name__)

#: how the reason of a replica the ping took out of service begins
PING_FAILED = "the liveness ping failed"


class Liveness:
    """The engine's liveness thread (see the module). *targets* gives the replicas in
    service, *fail* takes a replica out of service (durably, before it returns); *closed* is
    set when the engine stops."""

    def __init__(self, volume: str, interval: float, *,
                 targets: Callable[[], Sequence[Member]],
                 fail: Callable[[Member, ApplianceError], None],
                 closed: threading.Event) -> None:
        self.volume = volume
        self.interval = interval
        self._targets = targets
        self._fail = fail
        self._closed = closed
        self.rounds = 0  # rounds of pings sent (each to every replica in service)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start pinging (nothing when the interval is 0: liveness is off)."""
        if self.interval <= 0:
            return
        self._thread = threading.Thread(target=self._run, name="liveness", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Wait (at most *timeout* seconds) for the thread, once *closed* is set: a ping
        under way ends, and so does a failure it found, before the engine records its
        clean stop."""
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return
        thread.join(timeout)
        if thread.is_alive():
            log.warning("volume %s: the liveness thread did not stop within %.0f s",
                        self.volume, timeout)

    def status(self) -> dict[str, Any]:
        return {"interval": self.interval, "rounds": self.rounds}

    def _run(self) -> None:
        interval = self.interval
        served: dict[int, int] = {}  # id(member) -> what it had served at the last look
        while not self._closed.wait(interval):
            for member in self._targets():
                if self._closed.is_set():
                    return
                count = member.stats["reads"] + member.stats["writes"]
                if served.get(id(member)) != count:
                    served[id(member)] = count  # it answered I/O since: it is alive
                    if count:
                        continue
                try:
                    self.check(member)
                except Exception:  # a bug: said loudly, and liveness goes on
                    log.exception("volume %s: the liveness check of %s failed", self.volume,
                                  member.name)
            self.rounds += 1

    def check(self, member: Member) -> None:
        """Ping *member* over its data connection; take it out of service if that fails."""
        try:
            member.pipeline().call(Op.PING)
        except ApplianceError as exc:
            if self._closed.is_set():
                return  # stopping: its connections are being closed under it
            self._fail(member, Unavailable(f"{PING_FAILED}: {exc}"))

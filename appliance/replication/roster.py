"""The engine's roster, its member set: which replica is in which mode, who takes writes and
who serves reads, and the membership records that make each change durable before the
engine acts on it (docs/membership.md, "Running"). The engine and its rebuilds change modes
only through it (:meth:`Roster.fail`, :meth:`Roster.begin_rebuild`, :meth:`Roster.promote`).

Pure logic over *seats* (the engine's :class:`~appliance.replication.member.Member`, or a
simulated replica in the model-based tests) and one injected action, *store*, which makes a
record durable on one replica or raises :class:`~appliance.errors.ApplianceError`.

The rules it keeps:

* a record names exactly the RW replicas, and is written to the RW replicas first, then to
  the WO ones; a replica that cannot take it leaves (and a record without it follows);
* a record never names no member: when the last RW replica fails, nothing is written and the
  volume is faulted with its last good record intact where the data is;
* a WO replica becomes RW only once every RW replica durably names it a member;
* whenever an RW replica leaves, a new branch begins (the one that left stays on the old);
* who takes writes (:attr:`Roster.targets`) and serves reads (:attr:`Roster.readers`) is
  published only after the record describing it is durable, so a write sent to the new set
  is never acknowledged before that; writes still aimed at a replica that left fail on it
  and wait for this lock;
* with a witness (a clustered volume: docs/membership.md, "The witness"), the record of a
  smaller RW set is written only once the witness names it; when it refuses or cannot be
  reached the engine is **fenced**: nothing is written, no replica serves, every request
  fails. A larger set (a promotion) that the witness does not take leaves the replica WO.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from appliance.errors import ApplianceError, Conflict, Unavailable
from appliance.replication import membership
from appliance.replication.lockorder import Lock
from appliance.replication.member import Mode
from appliance.replication.membership import Branch, Decision, Record
from appliance.replication.witness import Witness, Witnessed

log = logging.getLogger(__name__)


class Seat(Protocol):
    """What the roster needs of a replica."""

    name: str
    replica_id: str
    mode: Mode
    reason: str
    kept: Mapping[str, Any] | None
    local: bool  # on this host: preferred for reads

    def leave(self) -> None:
        """Called when the replica leaves service: drop its connections."""


Store = Callable[[Any, dict[str, Any]], None]


class Roster:
    def __init__(self, volume: str, seats: list[Any], store: Store, *,
                 clock: Callable[[], str] = membership.now,
                 make_id: Callable[[], str] = membership.new_branch_id,
                 lock: Lock | None = None, witness: Witness | None = None) -> None:
        self.volume = volume
        self.seats = seats  # shared with the engine, which adds and removes replicas
        self.store = store
        self._clock = clock
        self._make_id = make_id
        # Guards modes and records; reentrant: a failure found while writing a record
        # fails the replica under the same lock.
        self.lock: Lock = threading.RLock() if lock is None else lock
        # Published together once the record describing them is durable; read without the
        # lock (a tuple is replaced whole) by the data path.
        self.targets: tuple[Any, ...] = ()  # RW and WO: writes go here
        self.readers: tuple[Any, ...] = ()  # RW, local ones first: reads come from here
        self.epoch = 0
        self.generation = 0
        self.history: tuple[Branch, ...] = ()
        self.salvage: Mapping[str, Any] | None = None
        self.closing = False
        self._clean = False
        self.witness = witness
        self.witnessed = Witnessed(0)  # what the witness last durably named (with a witness)
        self.fenced = ""  # why the engine serves no more (with a witness): see _fence

    @property
    def branch(self) -> str:
        return self.history[-1].id if self.history else ""

    def serving(self) -> list[Any]:
        """The RW replicas."""
        return [s for s in self.seats if s.mode == Mode.RW]

    def in_service(self) -> list[Any]:
        """The RW and WO replicas (those that take writes)."""
        return [s for s in self.seats if s.mode in (Mode.RW, Mode.WO)]

    def rebuilding(self) -> bool:
        """True while a replica is WO."""
        return any(s.mode == Mode.WO for s in self.seats)

    def _publish(self) -> None:
        """Publish the targets and readers of the current modes (the record describing
        them is durable, or no record can be written); none once fenced."""
        if self.fenced:
            self.targets, self.readers = (), ()
            return
        self.targets = tuple(self.in_service())
        self.readers = tuple(sorted(self.serving(), key=lambda s: not s.local))

    # -- start and stop ---------------------------------------------------------------------

    def start(self, decision: Decision, witnessed: Witnessed | None = None) -> None:
        """Take the modes *decision* chose and make them durable on the RW replicas
        (*witnessed*: what the engine claimed the witness with, naming those replicas)."""
        by_name = {seat.name: seat for seat in self.seats}
        with self.lock:
            if witnessed is not None:
                self.witnessed = witnessed
            self.generation, self.epoch = decision.generation, decision.epoch
            self.history = decision.history
            self.salvage = decision.salvage or decision.previous_salvage
            for probe in decision.rw:
                seat = by_name[probe.name]
                seat.replica_id, seat.mode, seat.reason = probe.replica_id, Mode.RW, ""
            for probe in decision.stale:
                seat = by_name[probe.name]
                seat.replica_id, seat.reason = probe.replica_id, "behind: needs a rebuild"
            for probe in decision.diverged:
                seat = by_name[probe.name]
                seat.replica_id = probe.replica_id
                seat.kept = {"branch": probe.branch, "since": probe.describe_branch()}
                seat.reason = f"diverged: holds {probe.describe_branch()}; kept, not rebuilt"
            for probe in decision.unreachable:
                by_name[probe.name].reason = f"unreachable at start: {probe.error}"
            if not self._commit():
                raise Unavailable(f"volume {self.volume}: no replica could take the "
                                  "membership record")

    def stop_clean(self) -> bool:
        """Record a clean stop (the caller drained and flushed every write); False if no
        replica is in service to record it."""
        with self.lock:
            self.closing = True
            self._clean = True
            return self._commit()

    # -- changes ----------------------------------------------------------------------------

    def fail(self, seat: Any, exc: ApplianceError) -> None:
        """Take *seat* out of service and make that durable before returning."""
        with self.lock:
            if seat.mode == Mode.ERR:
                return
            was_rw = seat.mode == Mode.RW
            self._leave(seat, exc)
            if not was_rw:  # a WO replica is no member: no record changes
                self._publish()
                return
            self._branch(f"replica {seat.name} left: {exc}")
            self._commit()

    def begin_rebuild(self, seat: Any) -> bool:
        """Put *seat* (out of service) in WO mode: from now on it takes every write. False
        when it could not take the record (it is out of service again) or the engine is
        stopping."""
        with self.lock:
            if seat.mode == Mode.WO:  # a retried rebuild: it still takes every write
                return not (self.closing or self.fenced)
            if self.closing or self.fenced or seat.mode != Mode.ERR or not self.serving():
                return False
            seat.mode, seat.reason, seat.kept = Mode.WO, "", None
            self._commit()
            return bool(seat.mode == Mode.WO)

    def promote(self, seat: Any) -> bool:
        """Make WO *seat* (proven equal) RW: every RW replica durably names it a member
        before it is one. False when that could not be done (it stays WO, or left)."""
        with self.lock:
            if self.closing or self.fenced or seat.mode != Mode.WO:
                return False
            self._commit(promoting=seat)
            return bool(seat.mode == Mode.RW)

    # -- records ----------------------------------------------------------------------------

    def record(self, members: list[Any]) -> Record:
        return Record(self.volume, self.epoch, tuple(s.replica_id for s in members),
                      self._clean, self.history, self.salvage,
                      {s.replica_id: s.name for s in members})

    def _commit(self, promoting: Any = None) -> bool:
        """Write the record of the current modes: RW replicas first, then WO ones. Returns
        False (and writes nothing) when no replica is in RW mode."""
        while True:
            rw = self.serving()
            if not rw:
                self._publish()
                return False
            members = [*rw, promoting] if promoting is not None else rw
            if not self._witness(members, promoting):
                if self.fenced:
                    self._publish()
                    return False
                promoting = None  # it left: the record is written without it
                continue
            self.epoch += 1
            document = self.record(members).to_dict()
            left = self._write(rw, document)
            if left is not None:
                self._branch(f"replica {left.name} left: {left.reason}")
                continue
            self._write([s for s in self.seats if s.mode == Mode.WO], document)
            if promoting is not None:
                if promoting.mode != Mode.WO:  # it could not take the record: rewrite
                    promoting = None
                    continue
                promoting.mode = Mode.RW
            self._publish()
            return True

    def _witness(self, members: list[Any], promoting: Any) -> bool:
        """Have the witness (if any) name *members* before a record does. False when it
        did not: the engine is fenced (the set was not larger, or the witness named another
        engine), or *promoting*, which only the larger set would name, leaves service (to
        be rebuilt again later)."""
        if self.witness is None or self.fenced:
            return not self.fenced
        ids = frozenset(s.replica_id for s in members)
        if ids == self.witnessed.members:
            return True
        try:
            revision = self.witness.record(self.witnessed.revision, self.generation, ids)
        except Conflict as exc:  # another engine wrote it: this one is stale
            self._fence(exc)
            return False
        except ApplianceError as exc:
            if promoting is not None and ids > self.witnessed.members:
                self._leave(promoting, Unavailable(f"the witness could not name it ({exc}); "
                                                   "it is rebuilt again later"))
            else:
                self._fence(exc)
            return False
        self.witnessed = Witnessed(revision, self.generation, ids)
        return True

    def _fence(self, exc: ApplianceError) -> None:
        self.fenced = (f"the witness did not take the new member set ({exc}): another "
                       "engine may own the volume")
        log.error("volume %s: fenced: %s; every request fails from now on", self.volume,
                  self.fenced)
        self._publish()

    def _write(self, seats: list[Any], document: dict[str, Any]) -> Any:
        """Store *document* on each of *seats*; the first RW one that fails leaves and is
        returned (the rest are not written); WO ones that fail leave."""
        for seat in seats:
            try:
                self.store(seat, document)
            except ApplianceError as exc:
                was_rw = seat.mode == Mode.RW
                self._leave(seat, exc)
                if was_rw:
                    return seat
        return None

    def _leave(self, seat: Any, exc: ApplianceError) -> None:
        seat.mode, seat.reason = Mode.ERR, str(exc)
        seat.leave()
        log.warning("volume %s: replica %s failed (%s); %d replica(s) remain in service",
                    self.volume, seat.name, exc, len(self.serving()))

    def _branch(self, cause: str) -> None:
        new = Branch(self._make_id(), self._clock(), self.generation, cause)
        self.history = (*self.history, new)[-membership.MAX_HISTORY:]

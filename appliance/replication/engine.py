"""The engine: one volume served from N replicas (DESIGN "The data path", invariants 1-5, 7).

* **Writes** (and write-zeroes, unmap) go to every RW and WO replica in parallel: sent to
  all, then every reply awaited. A write is acknowledged only when every such replica has
  it; a replica that fails or times out leaves RW mode, and the new membership record is
  durable on the others, before the write is acknowledged (invariant 1). When every RW
  replica is full the write fails with ENOSPC and nobody leaves (the store guarantees that
  nothing of a failed write landed).
* **Reads** come from RW replicas only (invariant 2), a local one first, else in turn; a
  replica that fails a read leaves RW mode and the read is retried on another.
* **Alignment**: partial blocks are read-modify-written here, so replicas only see whole
  blocks and never depend on their own lower layers (which a rebuilding one does not have).
* **Overlapping writes** are serialized by block range, so every replica applies them in
  the same order. **Snapshots** stop new writes, wait for those in flight, snapshot every
  replica, and resume (invariant 5).
* **Rebuild** (:mod:`appliance.replication.rebuild`) brings a replica in as WO and makes it
  RW only after it is proven equal (invariant 3).
* **Liveness** (:mod:`appliance.replication.liveness`): while no I/O completes, the replicas
  in service are pinged every few seconds; one that does not answer leaves service as it
  would on a failed write.
* **Locks** are taken in one order (docs/engine-locks.md), checked when
  ``APPLIANCE_LOCK_CHECK=1`` (:mod:`appliance.replication.lockorder`).
"""

from __future__ import annotations

import bisect
import itertools
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from appliance.chain.access import AccessLock
from appliance.chain.format import BLOCK_SIZE, block_span, check_name, split_blocks
from appliance.defaults import (
    CONTROL_TIMEOUT,
    FLUSH_TIMEOUT,
    MONITOR_INTERVAL,
    REPLICA_TIMEOUT,
)
from appliance.errors import (
    AlreadyExists,
    ApplianceError,
    Conflict,
    Corruption,
    FailedPrecondition,
    InvalidArgument,
    NoSpace,
    NotFound,
    StorageIOError,
)
from appliance.replication import fanout, membership, rebuild
from appliance.replication import protocol as proto
from appliance.replication.liveness import Liveness
from appliance.replication.lockorder import Locks, Rank
from appliance.replication.member import Member, Mode
from appliance.replication.protocol import FLAG_FUA, FLAG_REPORT_ZEROS, Op
from appliance.replication.roster import Roster
from appliance.replication.witness import Witness, Witnessed

log = logging.getLogger(__name__)
HISTORY_SHOWN = 10  # branches of the history that the status shows
REBUILD_LOCK_WAIT = 5.0  # seconds a structure change waits for a rebuild's last steps
SERVED = {"read": "reads", "write": "writes"}  # the member's count of each kind of I/O
#: the engine's counters of each kind of I/O: operations, bytes
COUNTERS = {kind: (f"{kind}_ops", f"{kind}_bytes") for kind in SERVED}
#: upper bounds (seconds) of the latency histogram buckets of reads and writes
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class EngineConfig:
    volume: str
    replicas: tuple[tuple[str, int], ...]
    secret: bytes = field(repr=False)
    timeout: float = REPLICA_TIMEOUT
    salvage: bool = False  # accept the best reachable member when a member is unreachable
    salvage_from: tuple[str, int] | None = None  # the operator's choice: serve this replica
    rebuild_bandwidth: int = 0  # bytes per second, 0 for no limit
    control_timeout: float = CONTROL_TIMEOUT  # snapshots, checksums: long operations
    flush_timeout: float = FLUSH_TIMEOUT  # flushes and FUA writes
    monitor_interval: float = MONITOR_INTERVAL  # idle pings of the replicas (0: off)
    local_fast_path: bool = False  # serve a replica on this host in-process (lent)
    #: the volume's witness in a cluster (docs/membership.md, "The witness"); None alone
    witness: Witness | None = field(default=None, repr=False, compare=False)


Outcome = tuple[list[tuple[Member, bytes]], list[tuple[Member, ApplianceError]]]


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        check_name(config.volume, "volume name")
        if not config.replicas:
            raise InvalidArgument("a volume needs at least one replica")
        self.config = config
        self.volume = config.volume
        # Plain locks, or ones that check the lock order (decided once, here).
        self._locks = Locks.from_environment()
        self.members = [self._new_member(address) for address in dict.fromkeys(config.replicas)]
        self.size = 0
        self.generation = 0
        self._io = self._locks.access(AccessLock())
        # The member set: modes and membership records; it publishes who takes writes and
        # serves reads (roster.targets, roster.readers) only once the record describing
        # them is durable.
        self.roster = Roster(self.volume, self.members, self._store_record,
                             lock=self._locks.lock(Rank.ROSTER, threading.RLock()),
                             witness=config.witness)
        self.started: dict[str, Any] = {}  # what the start decided (engine status)
        self._lent_member: Member | None = None  # the replica lent to us (local fast path)
        self._turn = itertools.count()
        self._rebuilds: dict[str, threading.Thread] = {}  # changed under roster.lock
        # One rebuild at a time: each takes a snapshot on the replicas in service and its
        # target, which another target in the middle of its own rebuild would miss.
        self.rebuild_lock = self._locks.lock(Rank.REBUILD, threading.Lock())
        self._closed = threading.Event()
        # Guards the counters below and every member's "reads" and "writes" counts.
        self._stats_lock = self._locks.lock(Rank.STATS, threading.Lock())
        # latency histograms: counts per bucket of LATENCY_BUCKETS (the last: above all)
        self.latency = {kind: [0] * (len(LATENCY_BUCKETS) + 1) for kind in ("read", "write")}
        self.latency_sum = {"read": 0.0, "write": 0.0}
        self.stats = {"read_ops": 0, "read_bytes": 0, "write_ops": 0, "write_bytes": 0,
                      "flush_ops": 0, "errors": 0}
        self._rebuild_context = rebuild.RebuildContext(
            self.volume, self.roster, self.rebuild_lock, self._io.exclusive, self._call,
            self._snapshot_in_service, lambda: self.size, self._closed, config.timeout,
            config.control_timeout, config.rebuild_bandwidth)
        self.liveness = Liveness(self.volume, config.monitor_interval,
                                 targets=lambda: self.roster.targets,
                                 fail=self._fail,
                                 closed=self._closed)

    def _new_member(self, address: tuple[str, int]) -> Member:
        return Member(address, self.config.secret, self.config.timeout,
                      lock=self._locks.lock(Rank.MEMBER, threading.Lock()))

    # -- start and stop ---------------------------------------------------------------------

    def start(self) -> None:
        """Probe every replica, decide (membership.decide), take over every reachable
        replica with a new generation, make the decision durable, and start rebuilding the
        replicas that are behind. Diverged replicas a salvage kept are left untouched.
        A clustered volume's engine reads its witness first and claims it before it takes
        over any replica (docs/membership.md, "The witness")."""
        witness = self.config.witness
        seen = witness.read() if witness is not None else None
        probes = [self._probe(member) for member in self.members]
        chosen = self.config.salvage_from
        decision = membership.decide(
            self.volume, probes, salvage=self.config.salvage,
            salvage_from=proto.format_address(chosen) if chosen else None,
            witnessed=seen.members if seen else frozenset(),
            generation_floor=seen.generation if seen else 0)
        by_name = {member.name: member for member in self.members}
        self.generation = decision.generation
        claimed = None
        if witness is not None and seen is not None:
            members = frozenset(p.replica_id for p in decision.rw)
            try:
                revision = witness.record(seen.revision, decision.generation, members)
            except Conflict as exc:
                raise Conflict(f"volume {self.volume}: another engine changed the volume's "
                               f"witness while this one started ({exc}); start again") from exc
            claimed = Witnessed(revision, decision.generation, members)
        for member in self.members:
            member.session(self.generation, int.from_bytes(os.urandom(8), "big"))
        # Take over every reachable replica before anything else: its server then refuses
        # the previous engine, which might otherwise still write to one we do not serve.
        for probe in [*decision.rw, *decision.stale, *decision.diverged]:
            by_name[probe.name].connect().close()
        self.size = decision.rw[0].size
        self.roster.start(decision, claimed)
        if self.config.local_fast_path:
            self._borrow_local()
        self.started = {"rw": [p.name for p in decision.rw],
                        "behind": [p.name for p in decision.stale],
                        "kept": [p.name for p in decision.diverged],
                        "unreachable": [p.name for p in decision.unreachable],
                        "new_branch": decision.branched, "salvaged": decision.salvaged}
        if decision.salvage is not None:
            log.warning("volume %s salvaged from %s; given up: %s", self.volume,
                        decision.salvage["from"], describe_given_up(decision.salvage))
        log.info("volume %s started: generation %d, branch %s, RW %s, behind %s, kept %s, "
                 "unreachable %s", self.volume, self.generation, self.roster.branch[:8],
                 self.started["rw"], self.started["behind"], self.started["kept"],
                 self.started["unreachable"])
        for probe in decision.stale:
            self._start_rebuild(by_name[probe.name])
        self.liveness.start()

    def _borrow_local(self) -> None:
        """Have the server of one replica in service on this host lend it to the engine
        (docs/local-fast-path.md); without one, or when it refuses, every replica stays
        behind its server."""
        for member in self.roster.readers:
            if not (member.local and member.unix_path):
                continue
            try:
                member.borrow(self.config.control_timeout)
            except ApplianceError as exc:
                log.warning("volume %s: replica %s stays behind its server: %s", self.volume,
                            member.name, exc)
                continue
            log.info("volume %s: replica %s is served in the engine's process (lent by "
                     "its server)", self.volume, member.name)
            self._lent_member = member
            return

    def _probe(self, member: Member) -> membership.Probe:
        try:
            with member.connect(role=proto.Role.READER) as conn:
                status = conn.status()
        except ApplianceError as exc:
            return membership.Probe(member.name, False, error=str(exc))
        member.learn_unix_socket(status.get("unix_socket"))
        try:
            record = membership.Record.from_dict(status["volume_record"]) \
                if status["volume_record"] else None
        except Corruption as exc:
            raise Corruption(f"replica {member.name}: {exc}") from exc
        return membership.Probe(
            member.name, True, status["replica_id"], status["size"], status["revision"],
            status["generation"], record, tuple(status["snapshots"]))

    def close(self) -> None:
        """Stop cleanly: drain writes, flush every replica, record a clean stop."""
        if self._closed.is_set():
            return
        self._closed.set()
        # A ping under way, and a failure it found, end before the clean stop is recorded.
        self.liveness.stop(self.config.timeout * (len(self.members) + 1))
        with self._io.exclusive():
            if self.roster.readers:
                try:
                    self._flush_all()
                    if not self.roster.stop_clean():
                        log.warning("volume %s: the clean stop was not recorded: no replica "
                                    "in service", self.volume)
                except ApplianceError as exc:
                    log.warning("volume %s: the clean stop was not recorded: %s",
                                self.volume, exc)
            with self.roster.lock:
                self.roster.closing = True
                rebuilds = list(self._rebuilds.values())
        for thread in rebuilds:
            thread.join(timeout=self.config.timeout)
        for member in self.members:
            member.give_back("the engine stopped")
            member.close_connections()

    # -- membership -------------------------------------------------------------------------

    def _store_record(self, member: Member, record: dict[str, Any]) -> None:
        self._call(member, lambda conn: conn.set_volume_record(record))

    def _fail(self, member: Member, exc: ApplianceError) -> None:
        """Take *member* out of service and make that durable before returning."""
        self.roster.fail(member, exc)

    def _call(self, member: Member, action: Any, *, control: bool = False,
              timeout: float | None = None) -> Any:
        """Run *action* on a pooled connection to *member*, or on a connection of its own
        bounded by *timeout* (the control timeout by default) when *control*."""
        conn = member.connect(timeout=timeout or self.config.control_timeout) if control \
            else member.acquire()
        try:
            result = action(conn)
        finally:
            if control:
                conn.close()
            else:
                member.release(conn)
        return result

    # -- fan-out ----------------------------------------------------------------------------

    def _fan_out(self, targets: tuple[Member, ...], op: int, offset: int = 0, length: int = 0,
                 flags: int = 0, payload: bytes | memoryview = b"") -> Outcome:
        """Send the request to every target, then wait for every reply (a flush and a FUA
        request within the flush timeout, the rest within the data timeout)."""
        sent = []
        failures: list[tuple[Member, ApplianceError]] = []
        timeout = self.config.flush_timeout if op == Op.FLUSH or flags & FLAG_FUA else None
        lent = self._lent_member
        if lent is not None and len(targets) > 1 and lent in targets:
            # a lent replica's request runs on this thread: send the others' first
            targets = (*[m for m in targets if m is not lent], lent)
        for member in targets:
            try:
                pipeline = member.pipeline()
                sent.append((member, pipeline, pipeline.submit(op, offset, length, flags,
                                                               payload, timeout=timeout)))
            except ApplianceError as exc:
                failures.append((member, exc))
        results: list[tuple[Member, bytes]] = []
        for member, pipeline, slot in sent:
            try:
                results.append((member, pipeline.wait(slot)))
            except ApplianceError as exc:
                failures.append((member, exc))
        return results, failures

    def _settle(self, what: str, outcome: Outcome) -> list[tuple[Member, bytes]]:
        results, failures = outcome
        if failures:
            rw_ok = any(m.mode == Mode.RW for m, _ in results)
            rw_failures = [e for m, e in failures if m.mode == Mode.RW]
            if not rw_ok and rw_failures and all(isinstance(e, NoSpace) for e in rw_failures):
                for member, exc in failures:
                    if member.mode == Mode.WO:
                        self._fail(member, exc)
                self._count("errors")
                raise NoSpace(f"volume {self.volume}: {what} failed: every replica is full")
            for member, exc in failures:
                self._fail(member, exc)
        if self.roster.fenced:  # the failures could not be recorded: nothing is acknowledged
            self._count("errors")
            raise StorageIOError(f"volume {self.volume}: {what} failed: the engine is fenced: "
                                 f"{self.roster.fenced}")
        if not any(m.mode == Mode.RW for m, _ in results):
            self._count("errors")
            reasons = "; ".join(str(e) for _, e in failures) or "no replica in service"
            raise StorageIOError(f"volume {self.volume}: {what} failed on every replica "
                                 f"({reasons})")
        return results

    def _observe(self, kind: str, started: float, length: int,
                 served: list[tuple[Member, bytes]]) -> None:
        """Count one completed read or write of *length* bytes begun at *started*, and
        served by the members of *served*."""
        now = time.perf_counter()
        elapsed = now - started
        bucket = bisect.bisect_left(LATENCY_BUCKETS, elapsed)
        count = SERVED[kind]
        ops, volume = COUNTERS[kind]
        stats = self.stats
        with self._stats_lock:
            stats[ops] += 1
            stats[volume] += length
            self.latency[kind][bucket] += 1
            self.latency_sum[kind] += elapsed
            for member, _ in served:
                member.stats[count] += 1

    def _count(self, key: str, amount: int = 1, *more: tuple[str, int]) -> None:
        with self._stats_lock:
            self.stats[key] += amount
            for other, value in more:
                self.stats[other] += value

    # -- the data path ----------------------------------------------------------------------

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidArgument(f"range offset {offset} length {length} is outside the "
                                  f"volume of {self.size} bytes")

    def read(self, buf: memoryview, offset: int) -> None:
        self._check(offset, len(buf))
        started = time.perf_counter()
        while True:
            readers = self.roster.readers
            if not readers:
                self._count("errors")
                raise StorageIOError(f"volume {self.volume}: no replica in service")
            member = readers[0] if readers[0].local else \
                readers[next(self._turn) % len(readers)]
            try:
                member.pipeline().call(Op.READ, offset, len(buf), into=buf)
            except InvalidArgument:
                raise
            except ApplianceError as exc:
                self._fail(member, exc)
                continue  # retried on the next replica
            self._observe("read", started, len(buf), [(member, b"")])
            return

    def write(self, data: memoryview, offset: int, *, fua: bool = False) -> None:
        self._check(offset, len(data))
        started = time.perf_counter()
        length = len(data)
        first, last = block_span(offset, len(data))
        token = self._io.acquire_range(first, last)
        try:
            if offset % BLOCK_SIZE or len(data) % BLOCK_SIZE:
                data, offset = self._widen(data, offset)
            written = self._settle("write", self._fan_out(
                self.roster.targets, Op.WRITE, offset, len(data), FLAG_FUA if fua else 0, data))
        finally:
            self._io.release_range(token)
        self._observe("write", started, length, written)

    def _widen(self, data: memoryview, offset: int) -> tuple[memoryview, int]:
        """Whole blocks around *data*: the edge blocks read from a replica, *data* laid over
        them (the caller holds the block range)."""
        first, last = block_span(offset, len(data))
        whole = memoryview(bytearray((last - first) * BLOCK_SIZE))
        self.read(whole[:BLOCK_SIZE], first * BLOCK_SIZE)
        if last - first > 1:
            self.read(whole[-BLOCK_SIZE:], (last - 1) * BLOCK_SIZE)
        start = offset - first * BLOCK_SIZE
        whole[start: start + len(data)] = data
        return whole, first * BLOCK_SIZE

    def zero(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Make the range read as zeros (space is returned where possible)."""
        self._check(offset, length)
        if not length:
            return
        first, last = block_span(offset, length)
        pieces, whole_first, whole_last = split_blocks(offset, offset + length)
        token = self._io.acquire_range(first, last)
        try:
            for start, end in pieces:  # partial blocks: written whole, zeros laid over them
                data, at = self._widen(memoryview(bytes(end - start)), start)
                self._settle("write zeroes", self._fan_out(
                    self.roster.targets, Op.WRITE, at, len(data), FLAG_FUA if fua else 0, data))
            if whole_first < whole_last:
                self._zero_blocks(whole_first, whole_last, fua)
        finally:
            self._io.release_range(token)
        self._count("write_ops")

    def _zero_blocks(self, first: int, last: int, fua: bool) -> None:
        flags = FLAG_FUA if fua else 0
        targets = self.roster.targets
        rebuilding = tuple(m for m in targets if m.mode == Mode.WO)
        offset, length = first * BLOCK_SIZE, (last - first) * BLOCK_SIZE
        if not rebuilding:
            self._settle("write zeroes", self._fan_out(targets, Op.WRITE_ZEROES, offset,
                                                       length, flags))
            return
        # A rebuilding replica lacks the lower layers that decide between holes and written
        # zeros: it repeats what an RW replica decided.
        rw = tuple(m for m in targets if m.mode == Mode.RW)
        results = self._settle("write zeroes", self._fan_out(
            rw, Op.WRITE_ZEROES, offset, length, flags | FLAG_REPORT_ZEROS))
        explicit = proto.decode_runs(results[0][1])
        _, failures = self._fan_out(rebuilding, Op.ZERO_EXACT, first, last - first, flags,
                                    proto.encode_runs(explicit))
        for member, exc in failures:
            self._fail(member, exc)

    def trim(self, offset: int, length: int) -> None:
        self._check(offset, length)
        first, last = block_span(offset, length)
        token = self._io.acquire_range(first, last)
        try:
            self._settle("trim", self._fan_out(self.roster.targets, Op.UNMAP, offset, length))
        finally:
            self._io.release_range(token)

    def flush(self) -> None:
        self._flush_all()
        self._count("flush_ops")

    def _flush_all(self) -> None:
        self._settle("flush", self._fan_out(self.roster.targets, Op.FLUSH))

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        self._check(offset, length)
        while True:
            readers = self.roster.readers
            if not readers:
                raise StorageIOError(f"volume {self.volume}: no replica in service")
            try:
                result: list[tuple[int, int, bool]] = self._call(
                    readers[0], lambda conn: conn.extents(offset, length))
            except ApplianceError as exc:
                self._fail(readers[0], exc)
                continue
            return result

    # -- control ----------------------------------------------------------------------------

    def snapshot(self, name: str, *, labels: Mapping[str, str] | None = None,
                 user_created: bool = True) -> None:
        """Snapshot every replica at the same point: no write in flight, none admitted."""
        check_name(name)
        with self._io.exclusive():
            if self.roster.rebuilding():
                raise FailedPrecondition(f"volume {self.volume}: a rebuild is in progress; "
                                         "snapshot when it is done")
            self._snapshot_locked(self.roster.targets, name, labels, user_created,
                                  self.config.control_timeout)

    def _snapshot_in_service(self, name: str) -> None:
        """A rebuild's snapshot of the RW members (writes are paused: each is bounded by
        the data timeout)."""
        self._snapshot_locked(self.roster.readers, name, None, False, self.config.timeout)

    def _snapshot_locked(self, members: tuple[Member, ...], name: str,
                         labels: Mapping[str, str] | None, user_created: bool,
                         timeout: float) -> None:
        fanout.apply_to_each(
            f"volume {self.volume}: snapshot {name!r}", members,
            lambda member: self._call(member, lambda conn: conn.snapshot(
                name, labels=labels, user_created=user_created), control=True,
                timeout=timeout),
            refusals=(AlreadyExists, InvalidArgument), demote=self._fail)

    def snapshots(self) -> list[dict[str, Any]]:
        """The layers of the volume (snapshots and the head), from a replica in service."""
        for member in self.roster.readers:
            try:
                layers: list[dict[str, Any]] = self._call(member, lambda conn: conn.layers(),
                                                          control=True)
                return layers
            except ApplianceError as exc:
                self._fail(member, exc)
        raise StorageIOError(f"volume {self.volume}: no replica in service to list snapshots")

    def remove_snapshot(self, name: str) -> None:
        """Mark snapshot *name* removed on every replica (``purge`` reclaims its space)."""
        check_name(name)
        self._on_every_replica(f"remove snapshot {name!r}",
                               lambda conn: conn.remove_snapshot(name), pause_io=False)

    def purge(self) -> dict[str, int]:
        """Reclaim removed snapshots on every replica while I/O continues."""
        results = self._on_every_replica("purge", lambda conn: conn.purge(), pause_io=False)
        return {key: max(int(r.get(key, 0)) for r in results) for key in results[0]} \
            if results and results[0] else {}

    def expand(self, size: int) -> None:
        """Grow the volume to *size* bytes on every replica, I/O paused; new NBD
        connections see the new size."""
        if size % BLOCK_SIZE or size <= 0:
            raise InvalidArgument(f"invalid size {size}: a positive multiple of {BLOCK_SIZE}")
        if size < self.size:
            raise InvalidArgument(f"cannot shrink volume {self.volume} from {self.size} to "
                                  f"{size} bytes: volumes only grow")
        if size == self.size:
            return
        self._on_every_replica(f"expand to {size} bytes", lambda conn: conn.expand(size),
                               pause_io=True)
        self.size = size
        log.info("volume %s expanded to %d bytes", self.volume, size)

    def _on_every_replica(self, what: str, action: Any, *, pause_io: bool) -> list[Any]:
        """Change the structure of every replica in service: one at a time, never during a
        rebuild (whose snapshot the change could invalidate), with I/O paused when the
        change affects what clients see. A replica that fails leaves service; the change
        fails only if it failed everywhere, or was refused before anything changed."""
        busy = FailedPrecondition(f"volume {self.volume}: a rebuild is in progress; {what} "
                                  "when it is done")
        if self.roster.rebuilding():
            raise busy
        # No replica is rebuilding: wait briefly for one that is finishing (or starting).
        if not self.rebuild_lock.acquire(timeout=REBUILD_LOCK_WAIT):
            raise busy
        try:
            if self.roster.rebuilding():  # one started meanwhile
                raise busy
            if pause_io:
                with self._io.exclusive():
                    return self._each_target(what, action)
            return self._each_target(what, action)
        finally:
            self.rebuild_lock.release()

    def _each_target(self, what: str, action: Any) -> list[Any]:
        done = fanout.apply_to_each(
            f"volume {self.volume}: {what}", self.roster.targets,
            lambda member: self._call(member, action, control=True),
            refusals=(AlreadyExists, InvalidArgument, NotFound, FailedPrecondition),
            demote=self._fail)
        return [result for _, result in done]

    def add_replica(self, address: tuple[str, int], *, discard: bool = False) -> None:
        """Bring a replica (new, or one that failed) in: WO, rebuilt, verified, then RW.
        A replica holding a diverged branch (kept by a salvage, or found on a branch this
        volume's history does not contain when it comes back) is only taken when *discard*
        says its data may go."""
        if not discard:
            self._refuse_another_branch(address)
        with self.roster.lock:
            member = next((m for m in self.members if m.address == address), None)
            if member is not None and (member.mode != Mode.ERR or member.name in self._rebuilds):
                raise AlreadyExists(f"replica {member.name} is already in volume "
                                    f"{self.volume} ({member.mode})")
            if member is not None and member.kept is not None and not discard:
                raise FailedPrecondition(
                    f"replica {member.name} holds a diverged branch that a salvage kept "
                    f"({member.kept['since']}); rebuilding it discards that data: add it "
                    "with --discard once it is no longer needed")
            if member is None:
                member = self._new_member(address)
                self.members.append(member)
            member.session(self.generation, int.from_bytes(os.urandom(8), "big"))
            # Registered before the lock is released: a second call for the same replica
            # finds this rebuild and is refused.
            self._start_rebuild(member)

    def _refuse_another_branch(self, address: tuple[str, int]) -> None:
        """Refuse (and keep) a replica that holds a branch outside the volume's history:
        one that was away when a salvage gave it up may hold acknowledged writes."""
        member = next((m for m in self.members if m.address == address), None)
        probe = self._probe(member or self._new_member(address))
        if not probe.reachable or not membership.holds_another_branch(probe,
                                                                      self.roster.history):
            return  # new, behind, or unreachable (its rebuild finds out)
        since = probe.describe_branch()
        if member is not None:
            with self.roster.lock:
                if member.mode == Mode.ERR:
                    member.kept = {"branch": probe.branch, "since": since}
                    member.reason = f"diverged: holds {since}; kept, not rebuilt"
        raise FailedPrecondition(
            f"replica {proto.format_address(address)} holds {since}, a branch volume "
            f"{self.volume}'s history does not contain: it may hold acknowledged writes the "
            "volume lacks, so it is kept, not rebuilt; add it with --discard once it is no "
            "longer needed")

    def remove_replica(self, address: tuple[str, int]) -> None:
        with self.roster.lock:
            member = next((m for m in self.members if m.address == address), None)
            if member is None:
                raise NotFound(f"replica {proto.format_address(address)} is not in volume "
                               f"{self.volume}")
            if member.mode == Mode.RW and len(self.roster.readers) == 1:
                raise FailedPrecondition(f"replica {member.name} is the last one in service "
                                         f"of volume {self.volume}")
            self._fail(member, FailedPrecondition("removed by the operator"))
            self.members.remove(member)

    def _start_rebuild(self, member: Member) -> None:
        with self.roster.lock:
            thread = threading.Thread(target=self._run_rebuild, args=(member,),
                                      name=f"rebuild-{member.name}", daemon=True)
            self._rebuilds[member.name] = thread
            thread.start()

    def _run_rebuild(self, member: Member) -> None:
        try:
            rebuild.rebuild_member(self._rebuild_context, member)
        except Exception:
            log.exception("volume %s: rebuild of %s failed", self.volume, member.name)
        finally:
            with self.roster.lock:
                self._rebuilds.pop(member.name, None)

    def wait_rebuilds(self, timeout: float) -> bool:
        """Wait until no rebuild runs; False if one still runs after *timeout* seconds."""
        with self.roster.lock:
            rebuilds = list(self._rebuilds.values())
        for thread in rebuilds:
            thread.join(timeout)
        return not self._rebuilds

    def status(self) -> dict[str, Any]:
        rw = sum(1 for m in self.members if m.mode == Mode.RW)
        state = "faulted" if not rw else "healthy" if rw == len(self.members) else "degraded"
        with self._stats_lock:
            stats: dict[str, Any] = dict(self.stats)
            stats["latency"] = {kind: {"buckets": list(LATENCY_BUCKETS),
                                       "counts": list(counts),
                                       "sum": self.latency_sum[kind]}
                                for kind, counts in self.latency.items()}
        roster = self.roster
        return {"volume": self.volume, "size": self.size, "generation": self.generation,
                "epoch": roster.epoch, "branch": roster.branch,
                "history": [b.to_dict() for b in roster.history[-HISTORY_SHOWN:]],
                "salvage": dict(roster.salvage) if roster.salvage else None,
                "started": dict(self.started),
                "state": "faulted" if roster.fenced else state, "fenced": roster.fenced or None,
                "replicas": [m.describe() for m in self.members], "io": stats,
                "liveness": self.liveness.status()}


def describe_given_up(salvage: Mapping[str, Any]) -> str:
    """One line naming what a salvage gave up."""
    items = salvage.get("given_up") or []
    if not items:
        return "nothing known"
    return "; ".join(f"{item.get('replica') or item.get('replica_id')}: {item.get('why')}"
                     for item in items)

"""Rebuilding a replica online (DESIGN "Rebuild", invariant 3).

The engine (:func:`rebuild_member`):

1. stops writes for a moment, takes a system snapshot ``rebuild-…`` on every RW replica and
   on the target, gives the target the source's revision, and puts the target in WO mode:
   from then on it receives every live write into its new head;
2. asks the target's server to rebuild from a source replica (:class:`RebuildJob`, which
   pulls directly from the source's server): every snapshot layer up to and including the
   rebuild snapshot is compared by checksum; equal ones are kept, the others are built as
   staged layers (starting from a local copy of a same-named layer, then fetching only the
   1 MiB chunks that differ, or fetching every allocated block) and verified; then the tree
   below the target's head is replaced in one step;
3. stops writes again, checks that target and source now list the same layers with the same
   checksums and that their heads (which took the same writes) have the same checksum, and
   only then makes the target RW. Any failure restarts the procedure, with another source if
   the source failed; the target is never RW before this check passed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from appliance.chain import checksum as checksums
from appliance.chain.format import BLOCK_SIZE
from appliance.chain.staging import LayerSpec, StagedLayer, install_layers, stage_layer
from appliance.defaults import REPLICA_TIMEOUT
from appliance.errors import ApplianceError, FailedPrecondition, InvalidArgument, StorageIOError
from appliance.replication import protocol as proto
from appliance.replication.client import ReplicaConnection
from appliance.replication.member import Member, Mode
from appliance.replication.protocol import Op, Request, Role

if TYPE_CHECKING:
    from appliance.replication.engine import Engine
    from appliance.replication.server import Parts, ReplicaServer, Session

log = logging.getLogger(__name__)

PREFIX = "rebuild-"  # the names of the system snapshots rebuilds take
PIECE = 4 << 20  # bytes per READ_LAYER request
IN_FLIGHT = 4  # READ_LAYER requests kept in flight
ATTEMPTS = 5
POLL = 0.1


# -- the target's side ----------------------------------------------------------------------


class RebuildJob:
    """Runs in the target's server: makes its snapshot layers equal to the source's."""

    def __init__(self, server: ReplicaServer, source: tuple[str, int], snapshot: str,
                 bandwidth: int, secret: bytes, timeout: float) -> None:
        self.server = server
        self.replica = server.replica
        self.source = source
        self.snapshot = snapshot
        self.bandwidth = bandwidth
        self._secret = secret
        self.timeout = timeout
        self.state = "running"
        self.error = ""
        self.copied = 0
        self.total = 0
        self.kept = 0
        self.staged_count = 0
        self._cancel = threading.Event()
        self._staged: list[StagedLayer] = []
        self._started = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="rebuild-job", daemon=True)

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "error": self.error, "copied_bytes": self.copied,
                "total_bytes": self.total, "kept_layers": self.kept,
                "copied_layers": self.staged_count, "source": proto.format_address(self.source),
                "seconds": round(time.monotonic() - self._started, 3)}

    def cancel(self) -> None:
        self._cancel.set()

    def _run(self) -> None:
        try:
            with ReplicaConnection(self.source, self._secret, role=Role.READER,
                                   timeout=self.timeout) as source:
                self._rebuild(source)
            self.state = "done"
            log.info("rebuilt from %s: %d layers kept, %d copied, %d bytes fetched",
                     proto.format_address(self.source), self.kept, self.staged_count,
                     self.copied)
        except Exception as exc:
            for staged in self._staged:
                staged.discard()
            self.state = "cancelled" if self._cancel.is_set() else "failed"
            self.error = str(exc)
            if not isinstance(exc, ApplianceError):
                log.exception("rebuild from %s failed", proto.format_address(self.source))
            else:
                log.warning("rebuild from %s failed: %s", proto.format_address(self.source),
                            exc)

    def _check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise FailedPrecondition("the rebuild was cancelled: a newer session took over")

    def _rebuild(self, source: ReplicaConnection) -> None:
        layers = [x for x in source.layers() if x["name"] is not None]
        names = [x["name"] for x in layers]
        if self.snapshot not in names:
            raise InvalidArgument(f"the source has no snapshot {self.snapshot!r}")
        own = {x.name: x for x in self.replica.layers() if x.name is not None}
        specs, sources = [], {}
        for info in layers:
            self._check_cancelled()
            spec = LayerSpec(info["name"], info["parent"], info["size"], info["created"],
                             info["user_created"], info["labels"], info["removed"])
            wanted = source.checksum(spec.name, chunks=True, timeout=self.timeout * 100)
            if not spec.removed:
                spec = LayerSpec(**{**spec.__dict__, "checksum": wanted["digest"]})
            sources[spec.name] = self._layer(source, spec, wanted, own.get(spec.name))
            specs.append(spec)
        self._check_cancelled()
        install_layers(self.replica, specs, sources, self.snapshot, source.welcome.size)
        self._staged.clear()

    def _layer(self, source: ReplicaConnection, spec: LayerSpec, wanted: dict[str, Any],
               own: Any) -> int | StagedLayer:
        wanted_chunks = {int(n): bytes.fromhex(d) for n, d in wanted["chunks"].items()}
        if own is not None and own.size == spec.size:
            have = self.replica.layer_checksum(spec.name)
            if have.digest == wanted["digest"]:
                self.kept += 1
                return next(x.id for x in self.replica.meta.layers.values()
                            if x.name == spec.name)
            staged = self._stage(spec.size, copy_of=spec.name)
            differing = checksums.differing_chunks(
                have, checksums.LayerChecksum(spec.size, wanted_chunks))
            ranges = checksums.chunk_ranges(differing, spec.size)
            for offset, length in ranges:
                staged.punch(offset, length)
        else:
            staged = self._stage(spec.size)
            ranges = [(0, spec.size)]
        runs = _clip(source.layer_extents(spec.name), ranges)
        self.total += sum(end - start for start, end in runs)
        self._fetch(source, spec.name, runs, staged)
        if staged.checksum().digest != wanted["digest"]:
            raise StorageIOError(f"the copy of layer {spec.name!r} does not match the source")
        self.staged_count += 1
        return staged

    def _stage(self, size: int, copy_of: str | None = None) -> StagedLayer:
        staged = stage_layer(self.replica, size, copy_of=copy_of)
        self._staged.append(staged)
        return staged

    def _fetch(self, source: ReplicaConnection, name: str, runs: list[tuple[int, int]],
               staged: StagedLayer) -> None:
        """Copy byte ranges *runs* of layer *name*, several requests in flight."""
        pieces = [(start, min(PIECE, end - start)) for begin, end in runs
                  for start in range(begin, end, PIECE)]
        buffers = [memoryview(bytearray(PIECE)) for _ in range(IN_FLIGHT)]
        in_flight: list[tuple[int, int, memoryview]] = []
        for index, (offset, length) in enumerate(pieces):
            buffer = buffers[index % IN_FLIGHT][:length]
            source.send(Op.READ_LAYER, offset, length, payload=name.encode())
            in_flight.append((offset, length, buffer))
            if len(in_flight) == IN_FLIGHT:
                self._land(source, staged, *in_flight.pop(0))
        for item in in_flight:
            self._land(source, staged, *item)

    def _land(self, source: ReplicaConnection, staged: StagedLayer, offset: int, length: int,
              buffer: memoryview) -> None:
        self._check_cancelled()
        source.receive(into=buffer)
        staged.write(buffer, offset)
        self.copied += length
        if self.bandwidth:
            ahead = self.copied / self.bandwidth - (time.monotonic() - self._started)
            if ahead > 0:
                self._cancel.wait(ahead)


def _clip(blocks: list[tuple[int, int]], ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Byte runs of the block runs *blocks* that fall inside the byte *ranges*."""
    result = []
    for first, last in blocks:
        for offset, length in ranges:
            start, end = max(first * BLOCK_SIZE, offset), min(last * BLOCK_SIZE, offset + length)
            if start < end:
                result.append((start, end))
    return sorted(result)


def handlers(server: ReplicaServer) -> dict[int, Any]:
    def rebuild(session: Session, request: Request, payload: bytes) -> Parts:
        document = proto.json_object(payload)
        job = server.rebuild
        if job is not None and job.state == "running":
            raise FailedPrecondition("a rebuild is already running on this replica")
        job = RebuildJob(server, proto.parse_address(str(document.get("source", ""))),
                         str(document.get("snapshot", "")), int(document.get("bandwidth", 0)),
                         server.secret, float(document.get("timeout", REPLICA_TIMEOUT)))
        server.rebuild = job
        job.thread.start()
        return []

    return {Op.REBUILD: rebuild}


# -- the engine's side ----------------------------------------------------------------------


class TargetFailed(StorageIOError):
    """The replica being rebuilt failed: retrying cannot help until it is back."""


def rebuild_member(engine: Engine, member: Member) -> None:
    """Bring *member* from out of service (or new) to RW, proven equal (see the module)."""
    created: list[str] = []
    member.rebuild = {"state": "queued"}
    with engine.rebuild_lock:
        try:
            _rebuild(engine, member, created)
        finally:
            _remove_snapshots(engine, created)


def _rebuild(engine: Engine, member: Member, created: list[str]) -> None:
    for attempt in range(1, ATTEMPTS + 1):
        if engine._closed.is_set() or member not in engine.members:
            return
        try:
            _attempt(engine, member, created)
        except TargetFailed as exc:
            log.warning("volume %s: rebuild of %s stopped: %s", engine.volume,
                        member.name, exc)
            member.rebuild = {**(member.rebuild or {}), "state": "failed",
                              "error": str(exc)}
            return
        except ApplianceError as exc:
            log.warning("volume %s: rebuild of %s, attempt %d failed: %s", engine.volume,
                        member.name, attempt, exc)
            continue
        log.info("volume %s: replica %s rebuilt and in service", engine.volume,
                 member.name)
        return
    if member.mode == Mode.WO:
        engine.roster.fail(member, StorageIOError(f"rebuild gave up after {ATTEMPTS} attempts"))


def _attempt(engine: Engine, member: Member, created: list[str]) -> None:
    rw = engine.roster.serving()
    if not rw:
        raise StorageIOError("no replica in service to rebuild from")
    source = sorted(rw, key=lambda m: not m.local)[0]
    name = f"{PREFIX}{os.urandom(4).hex()}"
    member.rebuild = {"state": "starting", "source": source.name}
    with engine._io.exclusive():
        _retire_leftovers(engine)
        try:
            with member.connect(timeout=engine.config.control_timeout) as target:
                status = target.status()
                if status["size"] > engine.size:
                    raise TargetFailed(f"replica {member.name} is larger than the volume")
                if status["size"] < engine.size:
                    target.expand(engine.size)
                member.replica_id = status["replica_id"]
                target.snapshot(name, user_created=False)
            member.learn_unix_socket(status.get("unix_socket"))
        except TargetFailed:
            raise
        except ApplianceError as exc:
            if member.mode == Mode.WO:
                engine._fail(member, exc)
            raise TargetFailed(f"replica {member.name}: {exc}") from exc
        engine._snapshot_locked(engine._readers, name, None, False)
        created.append(name)
        revision = engine._call(source, lambda conn: conn.status()["revision"])
        engine._call(member, lambda conn: conn.set_revision(revision), control=True)
        if not engine.roster.begin_rebuild(member):
            raise TargetFailed(f"replica {member.name} could not start rebuilding: "
                               f"{member.reason or 'the engine is stopping'}")
    _run_job(engine, member, source, name)
    with engine._io.exclusive():
        if member.mode != Mode.WO:
            raise TargetFailed(f"replica {member.name}: {member.reason}")
        problem = _compare(engine, source, member)
        if problem:
            raise StorageIOError(f"verification failed: {problem}")
        # The rebuild snapshot goes before the replica serves, so that a healthy volume has
        # no rebuild left to finish (and every replica lists the same live snapshots).
        _retire(engine, [name])
        created.remove(name)
    _purge(engine)
    if not engine.roster.promote(member):
        raise TargetFailed(f"replica {member.name} could not be made RW: "
                           f"{member.reason or 'the engine is stopping'}")
    member.rebuild = {**(member.rebuild or {}), "state": "done"}


def _run_job(engine: Engine, member: Member, source: Member, name: str) -> None:
    request = {"source": source.name, "snapshot": name, "bandwidth":
               engine.config.rebuild_bandwidth, "timeout": engine.config.timeout}
    engine._call(member, lambda conn: conn.call(Op.REBUILD, payload=proto.encode_json(request)),
                 control=True)
    last_progress, last_copied = time.monotonic(), -1
    with member.connect(timeout=engine.config.timeout) as conn:
        while True:
            if member.mode != Mode.WO:
                raise TargetFailed(f"replica {member.name}: {member.reason}")
            status = proto.decode_json(conn.call(Op.REBUILD_STATUS)) or {}
            member.rebuild = status
            if status.get("state") == "done":
                return
            if status.get("state") in ("failed", "cancelled"):
                raise StorageIOError(f"the rebuild job stopped: {status.get('error')}")
            if status.get("copied_bytes") != last_copied:
                last_progress, last_copied = time.monotonic(), status.get("copied_bytes", 0)
            elif time.monotonic() - last_progress > engine.config.timeout * 30:
                raise StorageIOError("the rebuild job made no progress")
            if engine._closed.wait(POLL):
                raise FailedPrecondition("the engine is stopping")


def _compare(engine: Engine, source: Member, target: Member) -> str:
    """An empty string when target and source have the same layers with the same
    checksums and identical heads (writes are stopped while this runs)."""
    timeout = engine.config.control_timeout

    def describe(member: Member) -> list[tuple[Any, ...]]:
        with member.connect(timeout=timeout) as conn:
            layers = [x for x in conn.layers() if x["name"] is not None]
            digests = [conn.checksum(x["name"], timeout=timeout)["digest"] for x in layers]
            head = conn.checksum(None, timeout=timeout)["digest"]
            size = conn.status()["size"]
        return [(x["name"], x["parent"], x["removed"], d) for x, d in zip(layers, digests,
                                                                           strict=True)] + \
            [("(head)", head, size)]

    want, have = describe(source), describe(target)
    if want == have:
        return ""
    diff = [f"{w} != {h}" for w, h in zip(want, have, strict=False) if w != h]
    return f"{len(diff)} difference(s), first: {diff[0] if diff else 'the layer count'}"


def _remove_snapshots(engine: Engine, names: list[str]) -> None:
    """Mark the snapshots of failed rebuild attempts removed on every replica in service,
    and purge."""
    if names:
        _retire(engine, names)
        _purge(engine)


def _in_service(engine: Engine) -> list[Member]:
    return [m for m in engine.members if m.mode in (Mode.RW, Mode.WO)]


def _retire(engine: Engine, names: list[str]) -> None:
    """Mark rebuild snapshots *names* removed on every replica in service (a metadata
    change; purge then reclaims them)."""
    for member in _in_service(engine):
        try:
            with member.connect(timeout=engine.config.control_timeout) as conn:
                live = {x["name"] for x in conn.layers() if not x["removed"]}
                for name in names:
                    if name in live:
                        conn.remove_snapshot(name)
        except ApplianceError as exc:
            log.warning("volume %s: could not remove rebuild snapshots from %s: %s",
                        engine.volume, member.name, exc)


def _retire_leftovers(engine: Engine) -> None:
    """Rebuild snapshots an engine that died in a rebuild left behind: removed before the
    next rebuild (which then copies them as removed layers, and purges them)."""
    names: set[str] = set()
    for member in engine.roster.serving():
        try:
            with member.connect(timeout=engine.config.control_timeout) as conn:
                names.update(x["name"] for x in conn.layers() if x["name"] and
                             x["name"].startswith(PREFIX) and not x["user_created"] and
                             not x["removed"])
        except ApplianceError:
            continue  # a replica that fails is found by the rebuild's own steps
    if names:
        log.info("volume %s: removing %d rebuild snapshot(s) left by an earlier engine",
                 engine.volume, len(names))
        _retire(engine, sorted(names))


def _purge(engine: Engine) -> None:
    """Reclaim removed snapshots on every replica in service while I/O goes on."""
    for member in _in_service(engine):
        try:
            with member.connect(timeout=engine.config.control_timeout) as conn:
                conn.purge(timeout=engine.config.control_timeout)
        except ApplianceError as exc:
            log.warning("volume %s: could not purge %s: %s", engine.volume, member.name, exc)

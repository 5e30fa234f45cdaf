"""The replica server's half of a rebuild: the job that makes this replica's snapshot layers
equal to a source replica's, pulling directly from the source's server, and the REBUILD
operation that starts it (docs/replica-protocol.md, "Rebuild"; the engine's half, which
decides when and verifies the result, is :mod:`appliance.replication.rebuild`).

Every snapshot layer up to and including the rebuild snapshot is compared by checksum; equal
ones are kept, the others are built as staged layers (starting from a local copy of a
same-named layer, then fetching only the 1 MiB chunks that differ, or fetching every
allocated block) and verified; then the tree below the target's head is replaced in one
step.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from appliance.chain import Replica
from appliance.chain import checksum as checksums
from appliance.chain.format import BLOCK_SIZE
from appliance.chain.staging import LayerSpec, StagedLayer
from appliance.defaults import REPLICA_TIMEOUT
from appliance.errors import ApplianceError, FailedPrecondition, InvalidArgument, StorageIOError
from appliance.replication import protocol as proto
from appliance.replication.client import ReplicaConnection
from appliance.replication.protocol import Op, Request, Role
from appliance.replication.session import Handler, Parts, Session

log = logging.getLogger(__name__)

PIECE = 4 << 20  # bytes per READ_LAYER request
IN_FLIGHT = 4  # READ_LAYER requests kept in flight


class RebuildJob:
    """Runs in the target's server: makes its snapshot layers equal to the source's."""

    def __init__(self, replica: Replica, source: tuple[str, int], snapshot: str,
                 bandwidth: int, secret: bytes, timeout: float) -> None:
        self.replica = replica
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
        self.replica.install_layers(specs, sources, self.snapshot, source.welcome.size)
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
        staged = self.replica.stage_layer(size, copy_of=copy_of)
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


class RebuildSlot:
    """The one rebuild job a replica server runs at a time, and the REBUILD operation that
    starts it."""

    def __init__(self, replica: Replica, secret: bytes) -> None:
        self.replica = replica
        self._secret = secret
        self._lock = threading.Lock()
        self._job: RebuildJob | None = None

    def start(self, document: dict[str, Any]) -> None:
        with self._lock:
            if self._job is not None and self._job.state == "running":
                raise FailedPrecondition("a rebuild is already running on this replica")
            job = RebuildJob(self.replica, proto.parse_address(str(document.get("source", ""))),
                             str(document.get("snapshot", "")),
                             int(document.get("bandwidth", 0)), self._secret,
                             float(document.get("timeout", REPLICA_TIMEOUT)))
            self._job = job
            job.thread.start()

    def status(self) -> dict[str, Any] | None:
        job = self._job
        return job.status() if job is not None else None

    def cancel(self) -> None:
        job = self._job
        if job is not None:
            job.cancel()

    def stop(self, timeout: float) -> None:
        """Cancel the job and wait up to *timeout* seconds for its thread to end."""
        job = self._job
        if job is not None:
            job.cancel()
            if job.thread.is_alive():
                job.thread.join(timeout=timeout)

    def handlers(self) -> dict[int, Handler]:
        def rebuild(session: Session, request: Request, payload: bytes) -> Parts:
            self.start(proto.json_object(payload))
            return []

        return {Op.REBUILD: rebuild}

"""Scrub: find bit rot in a volume's snapshot layers, on every replica, and mend it from a
replica whose copy verifies (docs/scrub.md).

Every immutable, kept snapshot layer of every replica is read again and compared with the
chunk checksums that replica stores for it (a layer without checksums gets them now: its
first scrub can only find replicas that disagree). A chunk whose data no longer matches is
**damaged** on that replica; it is rewritten from another replica whose own copy of the
chunk verifies *and* whose stored digest of it is the same, and the damaged replica checks
the copy against its own checksum before it writes a byte and again after. A chunk with no
such copy anywhere is **lost**, reported with its range and left as it is: nothing is ever
written that the checksums do not vouch for.

Replicas are reached through :class:`Peer`: a replica directory opened here (a detached
volume) or a replica server in service (an attached one, over a reader session).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from appliance.chain import Replica
from appliance.chain.checksum import BLOCKS_PER_CHUNK, CHUNK_SIZE
from appliance.chain.format import BLOCK_SIZE
from appliance.errors import ApplianceError, Cancelled
from appliance.pace import Pace
from appliance.replication.client import ReplicaConnection

log = logging.getLogger(__name__)


@dataclass
class LayerScan:
    chunks: dict[int, str]  # stored digest of each chunk with data, hex
    damaged: list[int]  # chunks whose data no longer matches


class Peer(Protocol):
    name: str

    def snapshots(self) -> list[dict[str, Any]]:
        """The layers (as ``Layer.as_dict``)."""

    def scan(self, layer: str, rate: int) -> LayerScan: ...

    def read_chunk(self, layer: str, number: int, size: int) -> tuple[int, bytes]:
        """Allocation bitmap and allocated bytes of chunk *number* of *layer*."""

    def repair(self, layer: str, number: int, bitmap: int, data: bytes) -> None: ...


class LocalPeer:
    """A replica directory opened by this process (the volume is detached)."""

    def __init__(self, name: str, replica: Replica, stop: Any = None) -> None:
        self.name = name
        self.replica = replica
        self.stop = stop

    def snapshots(self) -> list[dict[str, Any]]:
        return [layer.as_dict() for layer in self.replica.layers()]

    def scan(self, layer: str, rate: int) -> LayerScan:
        stored, damaged = self.replica.scrub_layer(layer, Pace(rate, self.stop))
        return LayerScan({n: d.hex() for n, d in stored.chunks.items()}, damaged)

    def read_chunk(self, layer: str, number: int, size: int) -> tuple[int, bytes]:
        return self.replica.read_chunk(layer, number)

    def repair(self, layer: str, number: int, bitmap: int, data: bytes) -> None:
        self.replica.repair_chunk(layer, number, bitmap, data)


class RemotePeer:
    """A replica server in service, over a reader session."""

    def __init__(self, name: str, connection: ReplicaConnection) -> None:
        self.name = name
        self.connection = connection
        self._extents: dict[str, list[tuple[int, int]]] = {}

    def snapshots(self) -> list[dict[str, Any]]:
        return self.connection.layers()

    def scan(self, layer: str, rate: int) -> LayerScan:
        size = max((x["size"] for x in self.snapshots() if x["name"] == layer), default=0)
        timeout = 120 + (2 * size / rate if rate else size / (50 << 20))
        answer = self.connection.scrub_layer(layer, rate, timeout=timeout)
        return LayerScan({int(n): d for n, d in answer["chunks"].items()},
                         [int(n) for n in answer["damaged"]])

    def read_chunk(self, layer: str, number: int, size: int) -> tuple[int, bytes]:
        if layer not in self._extents:
            self._extents[layer] = self.connection.layer_extents(layer)
        base = number * BLOCKS_PER_CHUNK
        end = min(base + BLOCKS_PER_CHUNK, -(-size // BLOCK_SIZE))
        bitmap, data = 0, bytearray()
        for run_first, run_last in self._extents[layer]:
            first, last = max(run_first, base), min(run_last, end)
            if first >= last:
                continue
            bitmap |= ((1 << (last - first)) - 1) << (first - base)
            piece = memoryview(bytearray((last - first) * BLOCK_SIZE))
            self.connection.read_layer(layer, piece, first * BLOCK_SIZE)
            data += piece
        return bitmap, bytes(data)

    def repair(self, layer: str, number: int, bitmap: int, data: bytes) -> None:
        self.connection.repair_chunk(layer, number, bitmap, data)


@dataclass
class Finding:
    snapshot: str
    replica: str
    offset: int  # bytes, in the volume (and the layer)
    length: int
    result: str  # repaired, lost, unrepaired (a good copy exists, the rewrite failed)
    source: str = ""  # the replica the good copy came from
    message: str = ""


@dataclass
class ScrubReport:
    replicas: list[str]
    snapshots: list[str] = field(default_factory=list)
    scanned_bytes: int = 0
    findings: list[Finding] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what could not be checked
    skipped: list[str] = field(default_factory=list)  # replicas not in service, not read

    def count(self, result: str) -> int:
        return sum(1 for f in self.findings if f.result == result)

    @property
    def lost(self) -> list[Finding]:
        return [f for f in self.findings if f.result == "lost"]

    def as_dict(self) -> dict[str, Any]:
        return {"replicas": self.replicas, "snapshots": self.snapshots,
                "scanned_bytes": self.scanned_bytes,
                "findings": [f.__dict__ for f in self.findings], "problems": self.problems,
                "skipped": self.skipped,
                "repaired": self.count("repaired"), "lost": self.count("lost"),
                "unrepaired": self.count("unrepaired")}

    def summary(self) -> str:
        text = (f"{len(self.snapshots)} snapshot(s) on {len(self.replicas)} replica(s): "
                + (", ".join(f"{self.count(r)} range(s) {r}"
                             for r in ("repaired", "lost", "unrepaired") if self.count(r))
                   or "no damage"))
        if self.lost:
            text += "; lost: " + "; ".join(
                f"snapshot {f.snapshot} bytes {f.offset}-{f.offset + f.length - 1}"
                for f in self.lost[:5]) + (" ..." if len(self.lost) > 5 else "")
        if self.problems:
            text += "; problems: " + "; ".join(self.problems)
        if self.skipped:
            text += "; replicas not in service, not read: " + ", ".join(self.skipped)
        return text


def scrub(peers: Sequence[Peer], rate: int, *,
          stop: Callable[[], bool] = lambda: False,
          progress: Callable[[int, int], None] = lambda done, total: None) -> ScrubReport:
    """Scrub the snapshot layers every one of *peers* holds, reading at most *rate* bytes
    per second on each (0: no limit); see the module."""
    report = ScrubReport([p.name for p in peers])
    listings = {p.name: {x["name"]: x for x in p.snapshots() if x["name"]} for p in peers}
    first = listings[peers[0].name]
    names = [n for n, x in first.items() if not x["removed"]]
    for peer in peers[1:]:
        missing = [n for n in names if n not in listings[peer.name]]
        if missing:
            report.problems.append(f"replica {peer.name} lacks snapshot(s) "
                                   f"{', '.join(missing)}")
    total = sum(int(first[n]["allocated"]) for n in names) * len(peers)
    for name in names:
        if stop():
            raise Cancelled("the scrub was cancelled")
        holders = [p for p in peers if name in listings[p.name]
                   and not listings[p.name][name]["removed"]]
        scans: dict[str, LayerScan] = {}
        for peer in holders:
            try:
                scans[peer.name] = peer.scan(name, rate)
            except Cancelled:
                raise
            except (ApplianceError, OSError) as exc:  # an unreadable layer: not checked
                report.problems.append(f"snapshot {name} on replica {peer.name}: {exc}")
            report.scanned_bytes += int(listings[peer.name][name]["allocated"])
            progress(report.scanned_bytes, total)
        report.snapshots.append(name)
        size = int(first[name]["size"])
        _mend(name, size, [p for p in holders if p.name in scans], scans, report)
        _disagreements(name, size, scans, report)
    return report


def _range(number: int, size: int) -> tuple[int, int]:
    start = number * CHUNK_SIZE
    return start, min(start + CHUNK_SIZE, size) - start


def _mend(name: str, size: int, holders: list[Peer], scans: dict[str, LayerScan],
          report: ScrubReport) -> None:
    for peer in holders:
        for number in scans[peer.name].damaged:
            offset, length = _range(number, size)
            expected = scans[peer.name].chunks.get(number)
            if expected is None:
                log.error("snapshot %s of replica %s: bytes %d-%d hold blocks its checksum "
                          "says the layer does not: unrepaired", name, peer.name, offset,
                          offset + length - 1)
                report.findings.append(Finding(
                    name, peer.name, offset, length, "unrepaired",
                    message="it holds blocks its checksum says the layer does not: replace "
                            "this replica (it is rebuilt from a healthy one)"))
                continue
            sources = [q for q in holders if q is not peer
                       and number not in scans[q.name].damaged
                       and scans[q.name].chunks.get(number) == expected]
            if not sources:
                log.error("snapshot %s of replica %s: bytes %d-%d damaged on every replica "
                          "that has them: lost", name, peer.name, offset, offset + length - 1)
                report.findings.append(Finding(
                    name, peer.name, offset, length, "lost",
                    message="no replica holds a copy that verifies"))
                continue
            finding = Finding(name, peer.name, offset, length, "unrepaired")
            for source in sources:
                try:
                    bitmap, data = source.read_chunk(name, number, size)
                    peer.repair(name, number, bitmap, data)
                except ApplianceError as exc:
                    finding.message = f"from {source.name}: {exc}"
                    continue
                finding.result, finding.source, finding.message = "repaired", source.name, ""
                break
            level = logging.WARNING if finding.result == "repaired" else logging.ERROR
            log.log(level, "snapshot %s of replica %s: bytes %d-%d were damaged: %s%s", name,
                    peer.name, offset, offset + length - 1, finding.result,
                    f" from {finding.source}" if finding.source else f" ({finding.message})")
            report.findings.append(finding)


def _disagreements(name: str, size: int, scans: dict[str, LayerScan],
                   report: ScrubReport) -> None:
    """Chunks whose stored digests differ between replicas that each verify against
    their own: one of them was damaged before its checksum was first computed. Reported,
    not mended: which copy is right cannot be told from the checksums."""
    numbers = set().union(*(set(s.chunks) for s in scans.values())) if scans else set()
    for number in sorted(numbers):
        digests = {s.chunks.get(number) for s in scans.values() if number not in s.damaged}
        if len(digests) > 1:
            offset, length = _range(number, size)
            report.problems.append(
                f"snapshot {name} bytes {offset}-{offset + length - 1} differ between "
                "replicas whose checksums were taken after they did: rebuild the replicas "
                "you do not trust")

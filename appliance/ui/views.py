"""What the pages show, made from the API's answers: pure functions, no I/O.

Storage follows the scheduler's own rules (appliance/control/scheduler.py): a disk takes
replicas whose sizes add up to ``over_provisioning_percentage`` of its capacity less its
reserved space; what is scheduled beyond its capacity less reserved is over-provisioned.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from appliance.units import format_size

# the classes the dashboard counts volumes in, in the order it shows them
VOLUME_CLASSES = ("healthy", "degraded", "faulted", "detached", "other")
SORT_KEYS = ("name", "state", "robustness", "size", "replicas", "node", "created")


def volume_class(volume: dict[str, Any]) -> str:
    """healthy, degraded or faulted (attached, by robustness), detached, or other
    (creating, attaching, detaching, deleting, ...)."""
    state = volume.get("state")
    if state == "detached":
        return "detached"
    if state == "attached":
        robustness = volume.get("robustness")
        if robustness in ("healthy", "degraded"):
            return str(robustness)
        return "faulted"
    if state == "faulted":
        return "faulted"
    return "other"


@dataclass
class Storage:
    """One disk's space, as the scheduler sees it (bytes)."""

    name: str
    node: str
    path: str
    capacity: int
    available: int
    reserved: int
    scheduled: int
    limit: int  # what the sizes of its replicas may add up to
    allow_scheduling: bool = True
    eviction_requested: bool = False
    tags: list[str] = field(default_factory=list)
    replicas: int = 0

    @property
    def used(self) -> int:
        return max(self.capacity - self.available, 0)

    @property
    def takes_replicas(self) -> bool:
        """Whether the scheduler puts new replicas here."""
        return self.allow_scheduling and not self.eviction_requested

    @property
    def schedulable(self) -> int:
        return max(self.limit - self.scheduled, 0) if self.takes_replicas else 0

    @property
    def over_provisioned(self) -> int:
        return max(self.scheduled - max(self.capacity - self.reserved, 0), 0)

    def percent(self, value: int) -> float:
        return min(100.0, 100.0 * value / self.capacity) if self.capacity else 0.0


def storage(disks: list[dict[str, Any]], settings: dict[str, Any],
            default_node: str) -> list[Storage]:
    percentage = int(settings.get("over_provisioning_percentage", 100))
    rows = []
    for disk in disks:
        capacity = int(disk.get("capacity") or 0)
        reserved = int(disk.get("storage_reserved") or 0)
        rows.append(Storage(
            name=disk["name"], node=disk.get("node") or default_node, path=disk["path"],
            capacity=capacity, available=int(disk.get("available") or 0), reserved=reserved,
            scheduled=int(disk.get("scheduled") or 0),
            limit=max(capacity - reserved, 0) * percentage // 100,
            allow_scheduling=bool(disk.get("allow_scheduling", True)),
            eviction_requested=bool(disk.get("eviction_requested")),
            tags=list(disk.get("tags") or []), replicas=len(disk.get("replicas") or [])))
    return sorted(rows, key=lambda s: (s.node, s.name))


def storage_totals(rows: list[Storage]) -> dict[str, int]:
    return {key: sum(getattr(r, key) for r in rows)
            for key in ("capacity", "used", "reserved", "scheduled", "schedulable",
                        "over_provisioned")}


def node_counts(nodes: list[dict[str, Any]]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for node in nodes:  # a cordoned node is alive: state "cordoned" (nodes.py)
        counts["down" if node.get("state") == "down" else "ready"] += 1
        if node.get("cordoned"):
            counts["cordoned"] += 1
    return {key: counts[key] for key in ("ready", "down", "cordoned")}


def volume_counts(volumes: list[dict[str, Any]]) -> dict[str, int]:
    counts = Counter(volume_class(v) for v in volumes)
    return {key: counts[key] for key in VOLUME_CLASSES}


def rebuilds(volume: dict[str, Any]) -> list[dict[str, Any]]:
    """The replicas of an attached volume being rebuilt: name, node, done (0..1 or None)."""
    found = []
    for replica in volume.get("replica_list") or []:
        if replica.get("mode") != "WO":
            continue
        progress = replica.get("rebuild") or {}
        total = progress.get("total_bytes") or 0
        found.append({"volume": volume["name"], "replica": replica["name"],
                      "node": replica.get("node", ""),
                      "done": progress.get("copied_bytes", 0) / total if total else None})
    return found


def filter_sort(volumes: list[dict[str, Any]], query: str, kind: str, sort: str,
                descending: bool) -> list[dict[str, Any]]:
    """Volumes whose name, node, label or state contain *query*, of class *kind* (any
    when empty), sorted by *sort*."""
    words = query.lower().split()

    def matches(volume: dict[str, Any]) -> bool:
        text = " ".join([volume["name"], str(volume.get("state")), str(volume.get("robustness")),
                         str(volume.get("node") or ""), str(volume.get("access_mode") or ""),
                         *(f"{k}={v}" for k, v in (volume.get("labels") or {}).items())]).lower()
        return all(word in text for word in words)

    chosen = [v for v in volumes if matches(v) and (not kind or volume_class(v) == kind)]
    key = sort if sort in SORT_KEYS else "name"
    known = sorted((v for v in chosen if v.get(key) is not None),
                   key=lambda v: (v[key], v["name"]), reverse=descending)
    unknown = sorted((v for v in chosen if v.get(key) is None), key=lambda v: v["name"])
    return known + unknown  # whichever the direction, volumes without the value last


@dataclass
class SnapshotNode:
    name: str | None  # None: the head
    info: dict[str, Any]
    children: list[SnapshotNode] = field(default_factory=list)

    @property
    def is_head(self) -> bool:
        return self.name is None


def snapshot_tree(snapshots: list[dict[str, Any]]) -> list[SnapshotNode]:
    """The chain as a forest (a revert leaves the newer snapshots on a branch of their
    own); children oldest first, the head (name None) last among its siblings."""
    nodes = [SnapshotNode(s.get("name"), s) for s in snapshots]
    by_name = {n.name: n for n in nodes if n.name is not None}
    roots: list[SnapshotNode] = []
    for node in nodes:
        parent_name = node.info.get("parent")
        parent = by_name.get(str(parent_name)) if parent_name else None
        (parent.children if parent is not None else roots).append(node)
    return roots


def io_figures(io: dict[str, Any] | None, previous: tuple[float, dict[str, Any]] | None,
               now: float) -> dict[str, Any] | None:
    """An engine's I/O: totals, rates since *previous* (when it is 0.5 to 120 s old),
    and per kind the mean and the 50th and 99th percentile latency (the upper bound of the
    bucket it falls in; None above the last bound)."""
    if not io:
        return None
    figures: dict[str, Any] = {key: io.get(key, 0) for key in (
        "read_bytes", "read_ops", "write_bytes", "write_ops", "flush_ops", "errors")}
    figures["rates"] = None
    if previous is not None and 0.5 <= now - previous[0] <= 120:
        elapsed = now - previous[0]
        figures["rates"] = {key: max(io.get(key, 0) - previous[1].get(key, 0), 0) / elapsed
                            for key in ("read_bytes", "read_ops", "write_bytes", "write_ops")}
    latency: dict[str, dict[str, float | None] | None] = {}
    for kind, observed in (io.get("latency") or {}).items():
        counts = list(observed.get("counts") or [])
        total = sum(counts)
        if not total:
            latency[kind] = None
            continue
        latency[kind] = {"mean": observed.get("sum", 0.0) / total,
                         "p50": _quantile(observed["buckets"], counts, total, 0.50),
                         "p99": _quantile(observed["buckets"], counts, total, 0.99)}
    figures["latency"] = latency
    return figures


def _quantile(bounds: list[float], counts: list[int], total: int, q: float) -> float | None:
    seen = 0
    for index, count in enumerate(counts):
        seen += count
        if seen >= q * total:
            return bounds[index] if index < len(bounds) else None
    return None


def last_backups(backups: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per volume, its newest complete backup."""
    newest: dict[str, dict[str, Any]] = {}
    for backup in backups:
        if backup.get("state") != "complete":
            continue
        held = newest.get(backup["volume"])
        if held is None or str(backup.get("created")) > str(held.get("created")):
            newest[backup["volume"]] = backup
    return newest


# -- how values are written ---------------------------------------------------------------

def size(value: Any) -> str:
    return "" if value is None else format_size(int(value))


def size_input(value: Any) -> str:
    """*value* bytes as a size field shows it: exact and parseable (10G, 1536M, 4K, or
    bytes); empty for 0."""
    size = int(value or 0)
    if not size:
        return ""
    for suffix, unit in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


def rate(value: float) -> str:
    return f"{format_size(int(value))}/s"


def duration(seconds: float | None) -> str:
    """A latency: µs, ms or s."""
    if seconds is None:
        return "—"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def ago(text: str | None, now: float | None = None) -> str:
    """'5 s ago', '3 min ago', '2 h ago', '4 d ago'."""
    when = parse_time(text)
    if when is None:
        return ""
    seconds = max((now if now is not None else time.time()) - when.timestamp(), 0)
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{int(seconds // length)} {unit} ago"
    return f"{int(seconds)} s ago"

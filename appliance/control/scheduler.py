"""Replica placement: which disks a volume's new replicas go to.

Pure: it sees disks with their capacity, free space and the size already scheduled on
them, and answers with disk names or an error that says why each disk was refused. Rules:

* a disk takes new replicas only if scheduling is allowed on it and it carries every tag
  the volume asks for;
* the sizes scheduled on a disk (thin: what replicas may grow to) stay within
  ``over_provisioning_percentage`` of its capacity minus its reserved space;
* its free space stays above ``minimal_available_percentage`` of its capacity plus its
  reserved space;
* at most one replica of a volume per disk, unless ``replica_soft_anti_affinity`` lets a
  disk take a second one when no other disk can;
* in a cluster, at most one replica of a volume per node (``replica_node_soft_anti_affinity``
  relaxes it the same way), on nodes that are ready (not down, not cordoned) and carry
  every node tag the volume asks for;
* among the eligible, a disk in a zone (a node label) that holds none of the volume's
  replicas goes first, then one on a node that holds none, then the disk with the most
  free space (spreading load).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from appliance.control.objects import Settings
from appliance.errors import FailedPrecondition
from appliance.units import format_size, format_size_exact


@dataclass(frozen=True)
class DiskState:
    name: str
    capacity: int
    available: int
    scheduled: int  # sum of the sizes of the replicas already on it
    reserved: int = 0
    tags: tuple[str, ...] = ()
    allow_scheduling: bool = True
    problem: str = ""  # why its usage is unknown (it then takes no replica)
    evicting: bool = False  # its replicas are being moved away
    node: str = ""  # "" in single-node mode
    zone: str = ""
    node_tags: tuple[str, ...] = ()
    node_problem: str = ""  # why its node takes no new replica (down, cordoned)


def refusal(disk: DiskState, size: int, tags: list[str], settings: Settings) -> str:
    """Why *disk* cannot take a replica of *size* bytes, or an empty string."""
    if disk.problem or disk.evicting or not disk.allow_scheduling:
        return disk.problem or ("its replicas are being evicted" if disk.evicting
                                else "scheduling is disabled")
    missing = sorted(set(tags) - set(disk.tags))
    if missing:
        return f"lacks tag(s) {', '.join(missing)}"
    limit = (disk.capacity - disk.reserved) * settings.over_provisioning_percentage // 100
    if disk.scheduled + size > limit:
        return (f"{format_size(disk.scheduled + size)} would be scheduled, over its limit of "
                f"{format_size(limit)} (over_provisioning_percentage "
                f"{settings.over_provisioning_percentage}% of its capacity"
                + (f" less {format_size(disk.reserved)} reserved" if disk.reserved else "")
                + ")")
    floor = disk.capacity * settings.minimal_available_percentage // 100 + disk.reserved
    if disk.available < floor:
        return (f"only {format_size(disk.available)} free, under its minimum of "
                f"{format_size(floor)} (minimal_available_percentage "
                f"{settings.minimal_available_percentage}%"
                + (f" plus {format_size(disk.reserved)} reserved" if disk.reserved else "")
                + ")")
    return ""


def place(size: int, count: int, disks: list[DiskState], taken: list[str], tags: list[str],
          settings: Settings, *, node_tags: list[str] | None = None,
          taken_nodes: list[str] | None = None, taken_zones: list[str] | None = None
          ) -> list[str]:
    """Disks for *count* new replicas of *size* bytes; *taken* lists the disks already
    holding a replica of the volume (one entry per replica), *taken_nodes* and
    *taken_zones* their nodes and zones."""
    states = {disk.name: disk for disk in disks}
    chosen: list[str] = []
    nodes, zones = [n for n in taken_nodes or [] if n], [z for z in taken_zones or [] if z]
    reasons: dict[str, str] = {}

    def why_not(disk: DiskState, used: list[str], *, soft_disk: bool, soft_node: bool) -> str:
        why = disk.node_problem or refusal(disk, size, tags, settings)
        missing = sorted(set(node_tags or []) - set(disk.node_tags))
        if not why and missing:
            why = f"its node {disk.node} lacks tag(s) {', '.join(missing)}"
        if not why and not soft_disk and disk.name in used:
            why = "already holds a replica of this volume"
        if not why and not soft_node and disk.node and disk.node in nodes:
            why = f"its node {disk.node} already holds a replica of this volume"
        return why

    def order(disk: DiskState) -> tuple[bool, bool, int]:
        return (bool(disk.zone) and disk.zone in zones, bool(disk.node) and disk.node in nodes,
                -disk.available)

    for _ in range(count):
        used = taken + chosen
        eligible = []
        for disk in states.values():
            why = why_not(disk, used, soft_disk=False, soft_node=False)
            if why:
                reasons[disk.name] = why
            else:
                eligible.append(disk)
        soft_node = settings.replica_node_soft_anti_affinity
        for soft_disk in (False, True):  # relaxed as far as the settings allow, in order
            if not eligible and (soft_node or soft_disk) and \
                    (soft_disk <= settings.replica_soft_anti_affinity):
                eligible = [d for d in states.values()
                            if not why_not(d, used, soft_disk=soft_disk, soft_node=soft_node)]
        best = min(eligible, key=order, default=None)
        if best is None:
            detail = "; ".join(f"{name}: {why}" for name, why in sorted(reasons.items()))
            hint = ""
            if "over_provisioning_percentage" in detail:
                hint = (". Volumes are thin: to schedule more than a disk holds, raise "
                        "over_provisioning_percentage ('appliance settings set "
                        "over_provisioning_percentage 200'), or add disks")
            elif "node" in detail and "already holds a replica" in detail:
                hint = (". Each replica needs a node of its own: add nodes, ask for fewer "
                        "replicas, or set replica_node_soft_anti_affinity")
            elif "already holds a replica" in detail:
                hint = (". Each replica needs a disk of its own: add disks, ask for fewer "
                        "replicas, or set replica_soft_anti_affinity")
            raise FailedPrecondition(f"cannot place {count} replica(s) of "
                                     f"{format_size_exact(size)} ({len(chosen)} placed): "
                                     + (detail or "no disks") + hint)
        chosen.append(best.name)
        if best.node:
            nodes.append(best.node)
        if best.zone:
            zones.append(best.zone)
        states[best.name] = replace(best, scheduled=best.scheduled + size)
    return chosen

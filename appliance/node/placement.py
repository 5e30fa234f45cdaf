"""Replica placement on this node: what each disk holds and has free, which disk and port a
new replica gets, and whether a volume may grow. The rules themselves are pure
(:mod:`appliance.control.scheduler`); this module gathers what they need from the store
and the file systems, without ever blocking the daemon's event loop.

A disk's capacity and free space come from ``statfs``, which blocks for as long as the
file system does not answer (a dead NFS server, a hung FUSE daemon, a failing drive). So
each disk is asked in a worker thread of its own, one question at a time, for at most
``statfs_timeout`` seconds: a disk that does not answer by then is reported with unknown
usage and takes no new replicas, and its thread is abandoned (it is never waited for
again: until it returns, the disk is reported unknown at once). Ports are probed by
binding, in a worker thread too.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import trio

from appliance import ports
from appliance.control.objects import Disk, Node, NodeAlive, ReplicaRecord, Settings, Volume
from appliance.control.scheduler import DiskState, place, refusal
from appliance.control.store import StateStore
from appliance.errors import FailedPrecondition
from appliance.node.config import NodeConfig
from appliance.units import format_size

log = logging.getLogger(__name__)
STATFS_TIMEOUT = 3.0  # seconds a disk's file system has to say how full it is
REPORT_AGE = 120.0  # seconds: an older usage report of a remote disk is not trusted
NOT_ANSWERING = "its file system does not answer (statfs)"


@dataclass(frozen=True)
class DiskUsage:
    capacity: int  # bytes
    available: int  # bytes free for unprivileged users


def statfs(path: str) -> DiskUsage | None:
    """Blocking: the usage of the file system holding *path*; None if it cannot be read."""
    try:
        stat = os.statvfs(path)
    except OSError:
        return None
    return DiskUsage(stat.f_blocks * stat.f_frsize, stat.f_bavail * stat.f_frsize)


def disk_state(disk: Disk, usage: DiskUsage | None, replicas: Iterable[ReplicaRecord],
               volumes: Mapping[str, Volume], problem: str = "",
               node: Node | None = None) -> DiskState:
    """What the scheduler knows of *disk*: its *usage* (None: unknown, so that it takes
    no replica), the sizes of the *replicas* placed on it, and its *node* (in a cluster)."""
    state = DiskState(disk.name, 0, 0, 0, allow_scheduling=False, problem=problem)
    if usage is not None:
        scheduled = sum(volumes[r.volume].size for r in replicas
                        if r.disk == disk.name and r.volume in volumes)
        state = DiskState(disk.name, usage.capacity, usage.available, scheduled,
                          disk.storage_reserved, tuple(disk.tags), disk.allow_scheduling,
                          problem=problem, evicting=disk.eviction_requested)
    if node is None:
        return state
    return replace(state, node=node.name, zone=node.zone, node_tags=tuple(node.tags))


def free_port(host: str, candidates: Iterable[int], used: set[int]) -> int | None:
    """Blocking: the first of *candidates* not in *used* that *host* can bind now."""
    return next((port for port in candidates
                 if port not in used and ports.bindable(host, port)), None)


async def load_settings(store: StateStore) -> Settings:
    """The node settings (the defaults until someone changes one)."""
    entry = await store.get(Settings.key_of("global"))
    return Settings.from_dict(entry.value) if entry else Settings()


class Placement:
    """Disk usage, replica placement and capacity checks (see the module). ``lock`` is
    held by whoever places replicas or grows a volume, so that two decisions never count
    on the same free space."""

    def __init__(self, store: StateStore, config: NodeConfig, *,
                 statfs_timeout: float = STATFS_TIMEOUT) -> None:
        self.store = store
        self.config = config
        self.statfs_timeout = statfs_timeout
        self.lock = trio.Lock()
        # per disk path, one statfs at a time (a hung one holds it: no second thread)
        self._limiters: dict[str, trio.CapacityLimiter] = {}
        self._hung: set[str] = set()  # paths whose last statfs did not answer in time

    # -- disk usage -----------------------------------------------------------------------

    async def usage(self, path: str) -> tuple[DiskUsage | None, str]:
        """The usage of the disk at *path*, or None and why, within ``statfs_timeout``."""
        limiter = self._limiters.setdefault(path, trio.CapacityLimiter(1))
        if path in self._hung:
            if limiter.borrowed_tokens:  # its thread is still blocked: do not wait again
                return None, NOT_ANSWERING
            self._hung.discard(path)
        with trio.move_on_after(self.statfs_timeout):
            usage = await trio.to_thread.run_sync(statfs, path, limiter=limiter,
                                                  abandon_on_cancel=True)
            return usage, ""
        if path not in self._hung:
            log.warning("disk %s: %s within %g s; it takes no new replicas until it does",
                        path, NOT_ANSWERING, self.statfs_timeout)
        self._hung.add(path)
        return None, NOT_ANSWERING

    def mine(self, node: str) -> bool:
        """Whether a disk, replica or engine on *node* is this node's to look after."""
        return not self.config.clustered or node == self.config.node_name

    async def disk_usage(self, disk: Disk) -> tuple[DiskUsage | None, str]:
        """The usage of *disk*: asked of its file system here, or as its node reported it."""
        if self.mine(disk.node):
            return await self.usage(disk.path)
        if not disk.reported or time.time() - disk.reported > REPORT_AGE:
            return None, f"node {disk.node} has not reported its usage lately"
        return DiskUsage(disk.capacity, disk.available), ""

    async def nodes(self) -> tuple[dict[str, Node], set[str]]:
        """The nodes of the cluster by name, and the names of those alive."""
        nodes = {n.name: n for n in (Node.from_dict(e.value)
                                     for e in (await self.store.list(Node.PREFIX))[0])}
        alive = {NodeAlive.from_dict(e.value).name
                 for e in (await self.store.list(NodeAlive.PREFIX))[0]}
        return nodes, alive

    async def disk_states(self, disks: list[Disk], replicas: list[ReplicaRecord],
                          volumes: Mapping[str, Volume]) -> dict[str, DiskState]:
        """Every disk's state by name, the disks asked side by side."""
        usages: dict[str, tuple[DiskUsage | None, str]] = {}

        async def ask(disk: Disk) -> None:
            usages[disk.name] = await self.disk_usage(disk)

        async with trio.open_nursery() as nursery:
            for disk in disks:
                nursery.start_soon(ask, disk)
        nodes, alive = await self.nodes() if self.config.clustered else ({}, set())
        states = {}
        for disk in disks:
            usage, problem = usages[disk.name]
            node = nodes.get(disk.node)
            state = disk_state(disk, usage, replicas, volumes, problem, node)
            if self.config.clustered:
                if node is None:
                    state = replace(state, node_problem=f"its node {disk.node} is not "
                                    "registered")
                elif node.name not in alive:
                    state = replace(state, node_problem=f"its node {node.name} is down")
                elif node.cordoned:
                    state = replace(state, node_problem=f"its node {node.name} is cordoned")
            states[disk.name] = state
        return states

    async def _inventory(self) -> tuple[list[Disk], list[ReplicaRecord], dict[str, Volume]]:
        disks = [Disk.from_dict(e.value) for e in (await self.store.list(Disk.PREFIX))[0]]
        replicas = [ReplicaRecord.from_dict(e.value)
                    for e in (await self.store.list(ReplicaRecord.PREFIX))[0]]
        volumes = {v.name: v for v in (Volume.from_dict(e.value)
                                       for e in (await self.store.list(Volume.PREFIX))[0])}
        return disks, replicas, volumes

    # -- placement ------------------------------------------------------------------------

    async def plan_replicas(self, volume: Volume, existing: list[ReplicaRecord],
                            count: int, *, on_node: str | None = None) -> list[ReplicaRecord]:
        """New replica objects for *count* more replicas of *volume* (not stored yet), on
        the disks of node *on_node* only when given; raises FailedPrecondition naming why
        each disk was refused. Hold ``lock``."""
        disks, all_replicas, volumes = await self._inventory()
        volumes[volume.name] = volume
        states = await self.disk_states(disks, all_replicas, volumes)
        if volume.data_locality == "strict-local" and volume.node:
            on_node = volume.node
        if on_node is not None:
            states = {name: state for name, state in states.items() if state.node == on_node}
            if not states:
                raise FailedPrecondition(f"node {on_node} has no disk for a replica of volume "
                                         f"{volume.name}")
        nodes, _ = await self.nodes() if self.config.clustered else ({}, set())
        chosen = place(volume.size, count, list(states.values()), [r.disk for r in existing],
                       volume.disk_tags, await load_settings(self.store),
                       node_tags=volume.node_tags,
                       taken_nodes=[r.node for r in existing],
                       taken_zones=[nodes[r.node].zone for r in existing if r.node in nodes])
        by_name = {d.name: d for d in disks}
        planned: list[ReplicaRecord] = []
        for disk_name in chosen:
            disk = by_name[disk_name]
            used_ports = {r.port for r in all_replicas + planned if r.node == disk.node}
            port = await self._port(disk.node, used_ports)
            name = f"{volume.name}-{uuid.uuid4().hex[:8]}"
            host = nodes[disk.node].address if disk.node in nodes else ""
            planned.append(ReplicaRecord(name, volume.name, disk_name,
                                         str(Path(disk.path) / "replicas" / name),
                                         port, node=disk.node, host=host))
        return planned

    async def _port(self, node: str, used: set[int]) -> int:
        """A replica server port on *node*: one this node can bind now, or (another node's)
        the first not assigned there (that node moves it if another program holds it)."""
        if self.mine(node):
            port = await trio.to_thread.run_sync(free_port, self.config.replica_address,
                                                 self.config.replica_ports, used)
        else:
            port = next((p for p in self.config.replica_ports if p not in used), None)
        if port is None:
            raise FailedPrecondition("no free replica server port in the configured range"
                                     + (f" on node {node}" if node else ""))
        return port

    async def move_port(self, replica: ReplicaRecord) -> ReplicaRecord:
        """Give *replica* another free port and store it. Hold ``lock``."""
        _, all_replicas, _ = await self._inventory()
        used = {r.port for r in all_replicas if r.node == replica.node}
        port = await trio.to_thread.run_sync(free_port, self.config.replica_address,
                                             self.config.replica_ports, used)
        if port is None:
            raise FailedPrecondition(f"port {replica.port} of replica {replica.name} is "
                                     "taken, and no other port of the configured range is "
                                     "free")
        entry = await self.store.update(replica.key, lambda value: {**value, "port": port})
        if entry is None:
            raise FailedPrecondition(f"replica {replica.name} is gone")
        return ReplicaRecord.from_dict(entry.value)

    async def place(self, volume: Volume, existing: list[ReplicaRecord],
                    count: int) -> list[ReplicaRecord]:
        """Plan *count* more replicas of *volume* and store them. Hold ``lock``."""
        replicas = await self.plan_replicas(volume, existing, count)
        for replica in replicas:
            await self.store.put(replica.key, replica.to_dict(), expect=0)
            log.info("volume %s: replica %s placed on disk %s", volume.name, replica.name,
                     replica.disk)
        return replicas

    async def check_capacity(self, grown: Volume, replicas: list[ReplicaRecord]) -> None:
        """Refuse growing a volume to ``grown.size`` when a disk of its replicas would be
        scheduled beyond its limits. Hold ``lock``."""
        entry = await self.store.get(grown.key)
        current = Volume.from_dict(entry.value).size if entry else grown.size
        disk_list, all_replicas, volumes = await self._inventory()
        disks = {d.name: d for d in disk_list}
        settings = await load_settings(self.store)
        present = sorted({r.disk for r in replicas if r.disk in disks})
        states = await self.disk_states([disks[name] for name in present], all_replicas,
                                        volumes)
        for replica in replicas:
            disk = disks.get(replica.disk)
            if disk is None:
                raise FailedPrecondition(f"disk {replica.disk} of replica {replica.name} is "
                                         "gone")
            why = refusal(states[disk.name], grown.size - current, [], settings)
            if why:
                raise FailedPrecondition(f"cannot expand volume {grown.name} to "
                                         f"{format_size(grown.size)}: disk {disk.name}: {why}")

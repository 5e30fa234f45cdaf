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
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import trio

from appliance import ports
from appliance.control.objects import Disk, ReplicaRecord, Settings, Volume
from appliance.control.scheduler import DiskState, place, refusal
from appliance.control.store import StateStore
from appliance.errors import FailedPrecondition
from appliance.node.config import NodeConfig
from appliance.units import format_size

log = logging.getLogger(__name__)
STATFS_TIMEOUT = 3.0  # seconds a disk's file system has to say how full it is
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
               volumes: Mapping[str, Volume], problem: str = "") -> DiskState:
    """What the scheduler knows of *disk*: its *usage* (None: unknown, so that it takes
    no replica), and the sizes of the *replicas* placed on it."""
    if usage is None:
        return DiskState(disk.name, 0, 0, 0, allow_scheduling=False, problem=problem)
    scheduled = sum(volumes[r.volume].size for r in replicas
                    if r.disk == disk.name and r.volume in volumes)
    return DiskState(disk.name, usage.capacity, usage.available, scheduled,
                     disk.storage_reserved, tuple(disk.tags), disk.allow_scheduling,
                     evicting=disk.eviction_requested)


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

    async def disk_states(self, disks: list[Disk], replicas: list[ReplicaRecord],
                          volumes: Mapping[str, Volume]) -> dict[str, DiskState]:
        """Every disk's state by name, the disks asked side by side."""
        usages: dict[str, tuple[DiskUsage | None, str]] = {}

        async def ask(disk: Disk) -> None:
            usages[disk.name] = await self.usage(disk.path)

        async with trio.open_nursery() as nursery:
            for disk in disks:
                nursery.start_soon(ask, disk)
        states = {}
        for disk in disks:
            usage, problem = usages[disk.name]
            states[disk.name] = disk_state(disk, usage, replicas, volumes, problem)
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
                            count: int) -> list[ReplicaRecord]:
        """New replica objects for *count* more replicas of *volume* (not stored yet);
        raises FailedPrecondition naming why each disk was refused. Hold ``lock``."""
        disks, all_replicas, volumes = await self._inventory()
        volumes[volume.name] = volume
        states = await self.disk_states(disks, all_replicas, volumes)
        chosen = place(volume.size, count, list(states.values()), [r.disk for r in existing],
                       volume.disk_tags, await load_settings(self.store))
        used_ports = {r.port for r in all_replicas}
        by_name = {d.name: d for d in disks}
        planned = []
        for disk_name in chosen:
            port = await trio.to_thread.run_sync(free_port, self.config.replica_address,
                                                 self.config.replica_ports, used_ports)
            if port is None:
                raise FailedPrecondition("no free replica server port in the configured range")
            used_ports.add(port)
            name = f"{volume.name}-{uuid.uuid4().hex[:8]}"
            planned.append(ReplicaRecord(name, volume.name, disk_name,
                                         str(Path(by_name[disk_name].path) / "replicas" / name),
                                         port))
        return planned

    async def move_port(self, replica: ReplicaRecord) -> ReplicaRecord:
        """Give *replica* another free port and store it. Hold ``lock``."""
        _, all_replicas, _ = await self._inventory()
        used = {r.port for r in all_replicas}
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

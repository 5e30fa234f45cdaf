"""Evicting a disk (``disk update NAME --evict``): the controller moves the replicas on it
to other disks, volume by volume. Mixed into :class:`~appliance.node.controller.Controller`.

* An attached volume gets a new replica on another disk for each replica leaving, placed
  like any other and rebuilt online by its engine; once enough replicas off the evicted
  disks serve (RW), the leaving ones leave the engine, their records and their disk.
* A detached volume's leaving replica is copied (a job beside the passes; the volume waits
  meanwhile): the new replica is recorded first, so its place and port are reserved, with
  ``evicting_from`` naming the one it replaces; the directory is copied under a temporary
  name and renamed once complete and durable; then the record takes the replica's id and
  drops ``evicting_from``; only then does the old replica go.

A replica with ``evicting_from`` set is never taken for a complete copy. After a crash:
a target still marked is copied or rebuilt again; a finished one (same replica id as a
leaving replica, unmarked) makes the leaving one go at once; a target whose source stopped
leaving (``--no-evict``) is removed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from appliance.control.objects import ReplicaRecord, Volume
from appliance.control.store import StateStore
from appliance.errors import ApplianceError, FailedPrecondition
from appliance.node.config import NodeConfig
from appliance.node.events import EventLog
from appliance.node.lineage import one_line
from appliance.node.placement import Placement
from appliance.node.supervisor import Supervisor
from appliance.node.work import run_job

log = logging.getLogger(__name__)
T = TypeVar("T")
MOVE_RETRY = 30.0  # seconds before a move that failed is tried again


class Eviction:
    """The controller's work on replicas of evicted disks (see the module)."""

    store: StateStore
    supervisor: Supervisor
    config: NodeConfig
    events: EventLog
    placement: Placement
    _evicting: set[str]  # the disks being evicted (read at each pass)
    moving: set[str]  # detached volumes whose replicas are being copied
    _settled: dict[str, Any]
    _jobs: trio.Nursery | None
    # per volume, the last failure of a move: (message, when); tried again after MOVE_RETRY
    _move_failed: dict[str, tuple[str, float]]

    if TYPE_CHECKING:  # provided by the Controller
        async def thread(self, function: Callable[..., T], *args: Any) -> T: ...
        def poke(self) -> None: ...
        async def _status(self, name: str, **changes: Any) -> None: ...
        async def _create_dir(self, replica: ReplicaRecord, size: int) -> None: ...
        async def replicas_of(self, volume: str) -> list[ReplicaRecord]: ...
        def _note(self, volume: str, topic: str, message: str) -> bool: ...

    def _leaving(self, replicas: list[ReplicaRecord]) -> list[ReplicaRecord]:
        return [r for r in replicas if r.disk in self._evicting and not r.evicting_from]

    def _address(self, replica: ReplicaRecord) -> str:
        return replica.address(self.config.replica_address)

    async def _finish_moves(self, volume: Volume, replicas: list[ReplicaRecord], *,
                            attached: bool) -> list[ReplicaRecord]:
        """Settle what a crash interrupted: a leaving replica whose copy is complete (an
        unmarked replica with its id) goes; a target whose source no longer leaves goes.
        The replicas that remain."""
        by_name = {r.name: r for r in replicas}
        gone: set[str] = set()
        for old in self._leaving(replicas):
            if old.replica_id and any(r.replica_id == old.replica_id and r.name != old.name
                                      and not r.evicting_from for r in replicas):
                await self._drop_replica(volume, old, engine=attached)
                gone.add(old.name)
        for target in [r for r in replicas if r.evicting_from]:
            source = by_name.get(target.evicting_from)
            if source is not None and source.name not in gone and \
                    source.disk not in self._evicting:
                await self._drop_replica(volume, target, engine=attached,
                                         why="its eviction was called off")
                gone.add(target.name)
        return [r for r in replicas if r.name not in gone]

    async def _evict_online(self, volume: Volume, replicas: list[ReplicaRecord],
                            status: dict[str, Any], unservable: set[str]) -> None:
        """Replicas of an attached volume on evicted disks: new ones placed elsewhere and
        rebuilt; the leaving ones go once enough replicas off those disks serve."""
        replicas = await self._finish_moves(volume, replicas, attached=True)
        modes = {r["address"]: r["mode"] for r in status["replicas"]}
        targets = [r for r in replicas if r.evicting_from]
        leaving = self._leaving(replicas)
        staying = [r for r in replicas if r.disk not in self._evicting]
        serving = [r for r in staying if modes.get(self._address(r)) == "RW"]
        if len(serving) >= volume.replicas or not leaving:
            for target in targets:
                if modes.get(self._address(target)) == "RW":  # rebuilt: complete
                    await self.store.update(target.key, lambda value: {
                        **value, "evicting_from": ""})
            if leaving:
                for old in leaving:
                    await self._drop_replica(volume, old, engine=True)
                await self._status(volume.name, message="")
            return
        for target in targets:  # a copy a crash interrupted: rebuilt from an empty replica
            if target.name in unservable:
                await self._create_dir(target, volume.size)
        missing = volume.replicas - len(staying)
        if missing <= 0:
            return  # placed already: being rebuilt
        async with self.placement.lock:
            try:
                placed = await self.placement.plan_replicas(volume, replicas, missing)
            except FailedPrecondition as exc:
                if self._note(volume.name, "evict", str(exc)):
                    log.warning("volume %s: replicas cannot be evicted: %s", volume.name, exc)
                    await self._status(volume.name, message=f"eviction waits: {exc}")
                return
            placed = [replace(new, evicting_from=old.name)
                      for new, old in zip(placed, leaving, strict=False)]
            for new in placed:
                await self.store.put(new.key, new.to_dict(), expect=0)
        for new in placed:
            await self._create_dir(new, volume.size)
        await self.events.record(volume.name, "eviction-started", "; ".join(
            f"replica {new.evicting_from} leaves its disk: {new.name} on {new.disk} is "
            "rebuilt in its place" for new in placed))

    async def _drop_replica(self, volume: Volume, replica: ReplicaRecord, *, engine: bool,
                            why: str = "") -> None:
        """Remove a replica: from its engine, its record, its server and its data."""
        sup = self.supervisor
        if engine:
            try:
                await self.thread(partial(sup.engine_call, volume.name, "remove-replica",
                                          address=self._address(replica)))
            except ApplianceError as exc:  # gone from the engine already, or no engine
                log.info("volume %s: replica %s not removed from its engine: %s",
                         volume.name, replica.name, exc)
        await self.store.delete(replica.key)
        await self.thread(sup.stop_replica, replica)
        await self.thread(sup.delete_replica_dir, replica)
        await self.events.record(volume.name, "replica-evicted" if not why else
                                 "replica-removed", f"replica {replica.name} left disk "
                                 f"{replica.disk}" + (f": {why}" if why else ""))

    async def _start_moves(self, volume: Volume, replicas: list[ReplicaRecord]) -> None:
        """For a detached volume: settle interrupted moves, and copy the replicas on
        evicted disks elsewhere in a job (the volume waits meanwhile)."""
        replicas = await self._finish_moves(volume, replicas, attached=False)
        if not self._leaving(replicas) and not any(r.evicting_from for r in replicas):
            return
        failed = self._move_failed.get(volume.name)
        if failed and trio.current_time() - failed[1] < MOVE_RETRY:
            return
        if self._jobs is not None and volume.name not in self.moving:
            self.moving.add(volume.name)
            self._jobs.start_soon(self._move_replicas, volume)

    async def _move_replicas(self, volume: Volume) -> None:
        try:
            current = await self.replicas_of(volume.name)
            for target in [r for r in current if r.evicting_from]:  # a copy interrupted
                source = next((r for r in current if r.name == target.evicting_from), None)
                if source is not None:
                    await self._move(volume, source, target)
            for old in self._leaving(await self.replicas_of(volume.name)):
                current = await self.replicas_of(volume.name)
                async with self.placement.lock:
                    others = [r for r in current if r.name != old.name]
                    [target] = await self.placement.plan_replicas(volume, others, 1)
                    target = replace(target, evicting_from=old.name)
                    await self.store.put(target.key, target.to_dict(), expect=0)
                await self._move(volume, old, target)
            await self._status(volume.name, message="")
            self._move_failed.pop(volume.name, None)
        except Exception as exc:
            before = self._move_failed.get(volume.name, ("", 0.0))[0]
            self._move_failed[volume.name] = (str(exc), trio.current_time())
            if not isinstance(exc, ApplianceError):
                log.exception("volume %s: moving replicas failed", volume.name)
            elif str(exc) != before:
                log.warning("volume %s: replicas cannot be evicted (tried again every %.0f s): "
                            "%s", volume.name, MOVE_RETRY, exc)
            await self._status(volume.name, message=f"eviction waits: {one_line(str(exc))}")
        else:
            self.poke()  # what moved may change other volumes' placement
        finally:
            self.moving.discard(volume.name)
            self._settled.pop(volume.name, None)

    async def _move(self, volume: Volume, old: ReplicaRecord, target: ReplicaRecord) -> None:
        """Copy replica *old* into *target*'s place, then let *target* be the replica."""
        log.info("volume %s: moving replica %s from disk %s to %s on disk %s", volume.name,
                 old.name, old.disk, target.name, target.disk)
        await run_job(self.supervisor.copy_replica_dir, old, target)
        await self.store.update(target.key, lambda value: {
            **value, "replica_id": old.replica_id, "evicting_from": ""})
        await self._drop_replica(volume, old, engine=False)

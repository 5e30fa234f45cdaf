"""What the node's API offers, independent of HTTP: validate, change the store, let the
controller act. The REST API (api.py), and later the CSI plugin, call this."""

from __future__ import annotations

import os
import re
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from appliance.chain.directory import probe_filesystem
from appliance.control.objects import Disk, Replica, Settings, Volume, check_tags
from appliance.control.store import StateStore
from appliance.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from appliance.node.controller import Controller, disk_state

_DISK_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class NodeService:
    def __init__(self, store: StateStore, controller: Controller) -> None:
        self.store = store
        self.controller = controller

    # -- disks --------------------------------------------------------------------------

    async def add_disk(self, path: str, tags: list[str]) -> dict[str, Any]:
        tags = check_tags(tags)
        if not path.startswith("/"):
            raise InvalidArgument(f"disk path {path!r} must be absolute")
        directory = Path(path)
        if not directory.is_dir():
            raise NotFound(f"disk path {path} is not a directory")
        await trio.to_thread.run_sync(self._probe, directory)
        name = _DISK_NAME.sub("-", str(directory.resolve()).strip("/")) or "root"
        for disk in await self._disks():
            if Path(disk.path).resolve() == directory.resolve():
                raise AlreadyExists(f"disk {path} is already added (as {disk.name})")
        disk = Disk(name, str(directory.resolve()), tags)
        await self.store.put(disk.key, disk.to_dict(), expect=0)
        self.controller.poke()
        return await self._disk_info(disk)

    @staticmethod
    def _probe(directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            probe_filesystem(fd, directory)
        finally:
            os.close(fd)

    async def _disks(self) -> list[Disk]:
        entries, _ = await self.store.list(Disk.PREFIX)
        return [Disk.from_dict(e.value) for e in entries]

    async def _disk_info(self, disk: Disk) -> dict[str, Any]:
        replicas = [Replica.from_dict(e.value) for e in (await self.store.list(Replica.PREFIX))[0]]
        volumes = {v.name: v for v in await self._volumes()}
        state = disk_state(disk, replicas, volumes)
        return {**disk.to_dict(), "capacity": state.capacity, "available": state.available,
                "scheduled": state.scheduled,
                "replicas": sorted(r.name for r in replicas if r.disk == disk.name)}

    async def list_disks(self) -> list[dict[str, Any]]:
        return [await self._disk_info(disk) for disk in await self._disks()]

    # -- volumes ------------------------------------------------------------------------

    async def _volumes(self) -> list[Volume]:
        entries, _ = await self.store.list(Volume.PREFIX)
        return [Volume.from_dict(e.value) for e in entries]

    async def _volume(self, name: str) -> tuple[Volume, int]:
        entry = await self.store.get(Volume.key_of(name))
        if entry is None:
            raise NotFound(f"volume {name!r} does not exist")
        return Volume.from_dict(entry.value), entry.revision

    async def create_volume(self, name: str, size: int, replicas: int,
                            disk_tags: list[str], labels: dict[str, str]) -> dict[str, Any]:
        volume = Volume(name, size, replicas, datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                        disk_tags=disk_tags, labels=labels).validate()
        if not await self._disks():
            raise FailedPrecondition("no disks: add one with 'appliance disk add PATH'")
        if await self.store.get(volume.key) is not None:
            raise AlreadyExists(f"volume {name!r} already exists")
        async with self.controller.placement:  # no other placement in between
            planned = await self.controller.plan_replicas(volume, [], replicas)
            try:
                await self.store.put(volume.key, volume.to_dict(), expect=0)
            except FailedPrecondition:
                raise AlreadyExists(f"volume {name!r} already exists") from None
            for replica in planned:
                await self.store.put(replica.key, replica.to_dict(), expect=0)
        self.controller.poke()
        return await self.show_volume(name)

    async def list_volumes(self) -> list[dict[str, Any]]:
        return [await self._describe(v) for v in await self._volumes()]

    async def show_volume(self, name: str) -> dict[str, Any]:
        volume, _ = await self._volume(name)
        return await self._describe(volume)

    async def _describe(self, volume: Volume) -> dict[str, Any]:
        replicas = await self.controller.replicas_of(volume.name)
        info = volume.to_dict()
        info["replica_list"] = [{"name": r.name, "disk": r.disk, "port": r.port,
                                 "directory": r.directory} for r in replicas]
        return info

    async def _change(self, name: str, **changes: Any) -> dict[str, Any]:
        for _ in range(10):
            volume, revision = await self._volume(name)
            if volume.deleting:
                raise FailedPrecondition(f"volume {name!r} is being deleted")
            updated = replace(volume, **changes)
            try:
                await self.store.put(updated.key, updated.to_dict(), expect=revision)
            except FailedPrecondition:
                continue
            self.controller.poke()
            return await self._describe(updated)
        raise FailedPrecondition(f"volume {name!r} keeps changing; try again")

    async def attach(self, name: str) -> dict[str, Any]:
        return await self._change(name, attached=True)

    async def detach(self, name: str) -> dict[str, Any]:
        return await self._change(name, attached=False)

    async def delete_volume(self, name: str) -> None:
        await self._change(name, deleting=True, attached=False)

    # -- settings -----------------------------------------------------------------------

    async def settings(self) -> dict[str, Any]:
        return (await self.controller.settings()).to_dict()

    async def update_settings(self, changes: dict[str, Any]) -> dict[str, Any]:
        current = await self.controller.settings()
        unknown = sorted(set(changes) - set(current.to_dict()) | ({"name"} & set(changes)))
        if unknown:
            raise InvalidArgument(f"unknown setting {unknown[0]!r}")
        try:
            updated = replace(current, **changes).validate()
        except TypeError as exc:
            raise InvalidArgument(str(exc)) from exc
        await self.store.put(Settings.key_of("global"), updated.to_dict())
        self.controller.poke()
        return updated.to_dict()

"""Standby (disaster-recovery) volumes (docs/dr-volumes.md): a volume that follows the
backups of a backup volume on the target, usually one that another cluster writes.

It is made by restoring the newest backup (as ``backup restore`` does). Then, every
``standby_poll_interval`` seconds and when a backup of that volume completes here, the
newest complete backup is applied **incrementally**: only the blocks whose ids differ from
the backup it holds are fetched (verified) and written, blocks gone from the backup are
zeroed. An update is recorded (``applying``) before it writes anything; one interrupted is
done again at the next look (writing a block twice is harmless; when the backup it was
applying is gone, the newest is applied in full). A standby cannot be attached or expanded;
``volume activate`` applies the newest backup and makes it a normal volume.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from appliance.backup import format as bfmt
from appliance.backup.jobs import apply_backup
from appliance.chain import Replica
from appliance.chain.format import check_name
from appliance.control.objects import Volume
from appliance.control.store import StateStore
from appliance.errors import ApplianceError, FailedPrecondition, NotFound
from appliance.node import volumeops
from appliance.node.backups import BackupTarget
from appliance.node.placement import load_settings
from appliance.node.service import NodeService
from appliance.node.work import run_job

log = logging.getLogger(__name__)
TICK = 5.0  # seconds between looks at the settings and for new standbys


def _point(manifest: bfmt.Manifest) -> str:
    """When the data of *manifest* was as it holds it: its snapshot's time."""
    return manifest.snapshot_created or manifest.created


class StandbyService:
    def __init__(self, store: StateStore, service: NodeService, target: BackupTarget) -> None:
        self.store = store
        self.service = service
        self.target = target
        self.events = service.controller.events
        self._wake = trio.Event()
        self._locks: dict[str, trio.Lock] = {}

    def notice(self) -> None:
        """A backup completed: look for new backups now."""
        self._wake.set()

    # -- creating and activating --------------------------------------------------------------

    async def create(self, name: str, backup_volume: str, replicas: int,
                     disk_tags: list[str], labels: dict[str, str]) -> dict[str, Any]:
        check_name(backup_volume, "backup volume name")
        target = await self.target.settings()
        newest = await trio.to_thread.run_sync(self._newest, target, backup_volume)
        if newest is None:
            raise NotFound(f"backup volume {backup_volume!r} has no complete backup on the "
                           "target ('appliance backup list' shows them)")
        if (newest.key_id or None) != (target.get("key_id") or None):
            raise FailedPrecondition(
                f"the backups of {backup_volume} are " + (
                    f"encrypted with key {newest.key_id}" if newest.key_id else
                    "not encrypted") + "; the target's key is " +
                (target.get("key_id") or "not set"))
        return await self.service.create_volume(
            name, newest.size, replicas, disk_tags, labels, {"backup": newest.id},
            standby_of=backup_volume)

    def _newest(self, target: dict[str, Any], backup_volume: str) -> bfmt.Manifest | None:
        with self.target.open_store(target) as store:
            manifests, _ = store.manifests(backup_volume)
        return max(manifests, key=lambda m: (m.created, m.completed, m.id), default=None)

    async def activate(self, name: str) -> dict[str, Any]:
        volume = await self._volume(name)
        if not volume.standby_of:
            raise FailedPrecondition(f"volume {name!r} is not a standby volume (only a volume "
                                     "made with 'volume create --standby' is activated)")
        if volume.state != "detached":
            raise FailedPrecondition(f"standby volume {name!r} is {volume.state} (its first "
                                     "restore runs): activate it when it is detached")
        async with self._lock(name):
            volume = await self._volume(name)
            if not volume.standby_of:
                raise FailedPrecondition(f"volume {name!r} was activated meanwhile")
            await self._follow(volume, raise_errors=True)

            def change(value: dict[str, Any]) -> dict[str, Any]:
                standby = dict(value.get("standby") or {})
                standby["activated"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                return {**value, "standby_of": "", "standby": standby}

            await self.store.update(Volume.key_of(name), change)
        held = (await self._volume(name)).standby or {}
        await self.events.record(name, "activated",
                                 f"a normal volume now, holding backup {held.get('last_backup')}"
                                 f" of {volume.standby_of}")
        return await self.service.show_volume(name)

    async def _volume(self, name: str) -> Volume:
        entry = await self.store.get(Volume.key_of(name))
        if entry is None:
            raise NotFound(f"volume {name!r} does not exist")
        return Volume.from_dict(entry.value)

    def _lock(self, name: str) -> trio.Lock:
        return self._locks.setdefault(name, trio.Lock())

    # -- following ----------------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Look at each standby every ``standby_poll_interval`` seconds (the setting is read
        again every few seconds, so a change takes effect at once), at once after its
        first restore, and whenever :meth:`notice` is called."""
        task_status.started()
        looked: dict[str, float] = {}  # when each standby was last looked at (monotonic)
        while True:
            interval = 60.0
            woken = self._wake.is_set()
            self._wake = trio.Event()
            try:
                interval = (await load_settings(self.store)).standby_poll_interval
                entries, _ = await self.store.list(Volume.PREFIX)
                for entry in entries:
                    volume = Volume.from_dict(entry.value)
                    if not volume.standby_of or volume.state != "detached" or \
                            volume.deleting or volume.attached:
                        continue
                    last = looked.get(volume.name)
                    if woken or last is None or time.monotonic() - last >= interval:
                        looked[volume.name] = time.monotonic()
                        async with self._lock(volume.name):
                            await self._follow(await self._volume(volume.name))
            except ApplianceError as exc:  # the store: the next look tries again
                log.warning("standby volumes: %s", exc)
            except Exception:  # a bug: the daemon stays up, the next look tries again
                log.exception("standby volumes")
            with trio.move_on_after(min(interval, TICK)):
                await self._wake.wait()

    async def _follow(self, volume: Volume, *, raise_errors: bool = False) -> None:
        """Apply the newest backup of the standby's backup volume if it holds another."""
        status = dict(volume.standby or {})
        held = status.get("last_backup") or (volume.source or {}).get("backup")
        try:
            target = await self.target.settings()
            newest, base = await trio.to_thread.run_sync(
                self._plan, target, volume.standby_of, held, status.get("applying"))
            if newest is None or (newest.id == held and not status.get("applying")):
                if newest is not None and held and not status.get("last_backup"):
                    await self._set(volume.name, {"backup_volume": volume.standby_of,
                                                  "last_backup": newest.id,
                                                  "last_backup_created": newest.created,
                                                  "recovery_point": _point(newest),
                                                  "error": ""})
                return
            await self._set(volume.name, {**status, "backup_volume": volume.standby_of,
                                          "applying": newest.id})
            replicas = await self.service.controller.replicas_of(volume.name)
            started = time.monotonic()
            blocks, fetched = await run_job(self._apply_blocking, target, base, newest,
                                            volume.name, [Path(r.directory) for r in replicas])
            seconds = time.monotonic() - started
            if newest.size != volume.size:
                await self.service.controller.set_size(volume.name, newest.size)
        except ApplianceError as exc:
            message = f"applying the newest backup of {volume.standby_of} failed: {exc}"
            if status.get("error") != message:
                log.warning("standby volume %s: %s", volume.name, message)
                await self._set(volume.name, {**status, "error": message})
                await self.events.record(volume.name, "standby-failed", message)
            if raise_errors:
                raise
            return
        await self._set(volume.name, {
            "backup_volume": volume.standby_of, "last_backup": newest.id,
            "last_backup_created": newest.created, "recovery_point": _point(newest),
            "applying": None, "error": "",
            "applied": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "last_update": {"from": base.id if base else None, "blocks": blocks,
                            "bytes_fetched": fetched, "seconds": round(seconds, 3)}})
        await self.events.record(
            volume.name, "standby-updated",
            f"backup {newest.id} applied" + (f" over {base.id}" if base else " in full")
            + f": {blocks} block(s), {fetched} bytes fetched in {seconds:.1f} s")

    def _plan(self, target: dict[str, Any], backup_volume: str, held: str | None,
              applying: str | None) -> tuple[bfmt.Manifest | None, bfmt.Manifest | None]:
        """The newest backup, and the backup the replicas can be taken to hold (None:
        apply in full: the backup they hold is gone, or an update to another one was cut
        short)."""
        with self.target.open_store(target) as store:
            manifests, _ = store.manifests(backup_volume)
        by_id = {m.id: m for m in manifests}
        newest = max(manifests, key=lambda m: (m.created, m.completed, m.id), default=None)
        if newest is None:
            return None, None
        if applying and applying != newest.id:
            return newest, None
        return newest, by_id.get(held) if held else None

    def _apply_blocking(self, target: dict[str, Any], base: bfmt.Manifest | None,
                        new: bfmt.Manifest, volume: str, directories: list[Path], *,
                        cancel: threading.Event) -> tuple[int, int]:
        with self.target.open_store(target) as store, contextlib.ExitStack() as stack:
            opened = [stack.enter_context(Replica.open(d)) for d in directories]
            result = apply_backup(store, base, new, opened, cancel=cancel)
            volumeops.mark_equal(volume, opened, f"standby: backup {new.id} applied")
            return result

    async def _set(self, name: str, standby: dict[str, Any]) -> None:
        await self.store.update(Volume.key_of(name),
                                lambda value: {**value, "standby": standby})

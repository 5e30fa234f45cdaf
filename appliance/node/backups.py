"""Backups on a node: the backup target, backup jobs, listing, restore into a new volume,
deletion and verification. The API (api.py) calls this; the work runs in worker threads,
which a cancellation reaches (node/work.py): a stop of the daemon cancels a running backup,
which then writes no manifest and is reported cancelled (node/backupjobs.py).

The target's URL is kept in the state store; its credentials and encryption key are kept
in DATA_DIR/secrets (mode 0600), never in the store, the log or an error message. A target
is kept only once a probe object was written, listed, read back and deleted on it.

A backup that does not complete leaves no snapshot it took itself (one the operator named
stays), and its record (``failed`` or ``cancelled``, listed with the error) goes with
``backup delete``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import trio

from appliance.backup import format as fmt
from appliance.backup.access import CREDENTIALS_FILE, KEY_FILE, open_backup_store
from appliance.backup.image import SnapshotImage
from appliance.backup.jobs import BackupOptions, create_backup, restore_backup
from appliance.backup.keys import BackupKey
from appliance.backup.store import BackupStore
from appliance.backup.targets import TargetSpec, open_target, parse_target
from appliance.chain import Replica
from appliance.chain.format import check_labels, check_name
from appliance.control.objects import ReplicaRecord
from appliance.control.store import StateStore
from appliance.errors import ApplianceError, FailedPrecondition, InvalidArgument, NotFound
from appliance.node import volumeops
from appliance.node.backupjobs import INTERRUPTED, BackupJobs, Job
from appliance.node.placement import load_settings
from appliance.node.service import NodeService
from appliance.node.work import run_job
from appliance.replication import protocol as proto
from appliance.replication.client import ReplicaConnection
from appliance.replication.protocol import Role
from appliance.secrets import read_secret_file, write_secret_file

log = logging.getLogger(__name__)
TARGET_KEY = "/backup/target"  # not under /settings/: it is not a Settings record


class BackupTarget:
    """The backup target: its URL in the state store, its credentials and key in the
    secrets directory; opens the backup store on it, and restores a backup into a new
    volume's replicas (the controller's restorer)."""

    def __init__(self, store: StateStore, secrets_dir: Path) -> None:
        self.store = store
        self.secrets_dir = secrets_dir

    @property
    def credentials_file(self) -> Path:
        return self.secrets_dir / CREDENTIALS_FILE

    @property
    def key_file(self) -> Path:
        return self.secrets_dir / KEY_FILE

    async def set_target(self, url: str, credentials: str | None,
                         encryption_key: str | None) -> dict[str, Any]:
        """Check the target (parse, reach, prove it writable, read the credentials and
        key), then keep it; when it cannot be used, nothing changes."""
        spec = parse_target(url)
        key = None
        if encryption_key is not None:
            try:
                key = BackupKey.from_bytes(bytes.fromhex(encryption_key.strip()))
            except ValueError:
                raise InvalidArgument("the encryption key must be 32 bytes, given as 64 hex "
                                      "digits") from None
        if credentials is None and spec.scheme == "s3":
            raise InvalidArgument(f"backup target {spec.url} needs credentials "
                                  "(--credentials FILE)")
        secret = encryption_key.strip().encode() if encryption_key is not None else None
        previous = (await self.show_target())["url"]
        try:
            await trio.to_thread.run_sync(self._check_and_keep, spec, credentials, secret)
        except ApplianceError as exc:
            raise type(exc)(f"{exc.message}; nothing changed: the backup target " + (
                f"stays {previous}" if previous else "stays unset")) from exc
        await self.store.put(TARGET_KEY, {"url": url, "credentials": credentials is not None,
                                          "key_id": key.key_id if key else None})
        return await self.show_target()

    def _check_and_keep(self, spec: TargetSpec, credentials: str | None,
                        key: bytes | None) -> None:
        """Blocking: reach the target with *credentials* (staged in a file) and probe it,
        then keep them and *key* in the secrets directory (written and synced: files, not
        store)."""
        staged: Path | None = None
        try:
            if credentials is not None:
                staged = self.secrets_dir / f".staged-credentials-{time.monotonic_ns()}"
                write_secret_file(staged, credentials.encode())
            with open_target(spec, staged) as target:
                BackupStore(target).probe()
            self._replace_secret(self.credentials_file, staged)
            staged = None
            self._replace_secret(self.key_file, key)
        finally:
            if staged is not None:
                staged.unlink(missing_ok=True)

    @staticmethod
    def _replace_secret(path: Path, source: Path | bytes | None) -> None:
        path.unlink(missing_ok=True)
        if isinstance(source, Path):
            source.rename(path)
        elif source is not None:
            write_secret_file(path, source)

    async def unset_target(self) -> str | None:
        """Forget the target, its credentials and key; its URL (None when none was set)."""
        entry = await self.store.get(TARGET_KEY)
        if entry is None:
            return None
        await self.store.delete(TARGET_KEY)
        for secret in (self.credentials_file, self.key_file):
            await trio.to_thread.run_sync(self._replace_secret, secret, None)
        return str(entry.value["url"])

    async def show_target(self) -> dict[str, Any]:
        entry = await self.store.get(TARGET_KEY)
        if entry is None:
            return {"url": None, "credentials": False, "encrypted": False, "key_id": None}
        value = entry.value
        return {"url": value["url"], "credentials": value["credentials"],
                "encrypted": value["key_id"] is not None, "key_id": value["key_id"]}

    async def settings(self) -> dict[str, Any]:
        """The target as kept in the store; FailedPrecondition when none is set."""
        entry = await self.store.get(TARGET_KEY)
        if entry is None:
            raise FailedPrecondition("no backup target: set one with 'appliance backup-target "
                                     "set URL'")
        return entry.value

    @contextlib.contextmanager
    def open_store(self, value: dict[str, Any]) -> Iterator[BackupStore]:
        """Blocking: the backup store on the target *value* (from :meth:`settings`)."""
        with open_backup_store(value, self.secrets_dir) as store:
            yield store

    async def restore_into(self, backup_id: str, volume: str, replicas: list[ReplicaRecord],
                           progress: Callable[[int, int], None]) -> int:
        """Write backup *backup_id* into the new volume's replica directories (in a worker
        thread that a cancellation stops between blocks); return the bytes written."""
        target = await self.settings()
        return await run_job(self._restore_blocking, target, backup_id, volume, replicas,
                             progress)

    def _restore_blocking(self, target: dict[str, Any], backup_id: str, volume: str,
                          replicas: list[ReplicaRecord], progress: Callable[[int, int], None],
                          *, cancel: threading.Event) -> int:
        with self.open_store(target) as store:
            manifest = store.find(backup_id)
            with contextlib.ExitStack() as stack:
                opened = [stack.enter_context(Replica.open(Path(r.directory)))
                          for r in replicas]
                written = restore_backup(store, manifest, opened, cancel=cancel,
                                         progress=progress)
                volumeops.mark_equal(volume, opened, "restored from a backup")
                return written


class BackupService:
    """Backup jobs, listing, showing, deleting and verifying backups, restores."""

    def __init__(self, store: StateStore, service: NodeService, target: BackupTarget,
                 jobs: BackupJobs) -> None:
        self.store = store
        self.service = service  # volumes, snapshots
        self.supervisor = service.controller.supervisor
        self.target = target
        self.jobs = jobs
        self._nursery: trio.Nursery | None = None
        self.completed: Callable[[], None] = lambda: None  # a backup completed (standbys)
        # held while the target changes, and while a backup or restore that uses it starts
        # (until it shows as running): the target is never unset under a starting job
        self._target_lock = trio.Lock()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run backup jobs until cancelled (which cancels them: see :meth:`_run_backup`)."""
        await self.jobs.load()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def set_target(self, url: str, credentials: str | None,
                         encryption_key: str | None) -> dict[str, Any]:
        async with self._target_lock:
            return await self.target.set_target(url, credentials, encryption_key)

    async def unset_target(self) -> dict[str, Any]:
        """Forget the target; refused while a backup or a restore uses it."""
        async with self._target_lock:
            running = self.jobs.in_progress()
            if running:
                raise FailedPrecondition(
                    f"backup {running[0].id} of volume {running[0].volume} is running: unset "
                    "the backup target when it is done (or cancel it: appliance backup "
                    f"delete {running[0].id})")
            restoring = [v for v in await self.service.list_volumes()
                         if v["state"] == "creating" and (v["source"] or {}).get("backup")]
            if restoring:
                raise FailedPrecondition(
                    f"volume {restoring[0]['name']} is being restored from backup "
                    f"{restoring[0]['source']['backup']}: unset the backup target when it is "
                    "done")
            url = await self.target.unset_target()
        return {"status": "unset" if url else "not-set", "url": url}

    async def show_target(self) -> dict[str, Any]:
        return await self.target.show_target()

    # -- backups --------------------------------------------------------------------------

    async def create(self, volume: str, snapshot: str | None,
                     labels: dict[str, str]) -> dict[str, Any]:
        check_labels(labels)
        async with self._target_lock:
            target = await self.target.settings()
            info = await self.service.show_volume(volume)
            own = snapshot is None
            if snapshot is None:
                snapshot = "backup-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + \
                    f"-{time.monotonic_ns() % 1000:03d}"
                await self.service.create_snapshot(volume, snapshot, {"backup": "true"})
            else:
                check_name(snapshot, "snapshot name")
                if not any(s["name"] == snapshot and not s["removed"]
                           for s in await self.service.list_snapshots(volume)):
                    raise NotFound(f"snapshot {snapshot!r} of volume {volume!r} does not "
                                   "exist")
            job = Job(fmt.new_backup_id(), volume, snapshot, time.time(), own_snapshot=own,
                      labels=dict(labels))
            await self.jobs.start(job)
        assert self._nursery is not None
        self._nursery.start_soon(self._run_backup, job, target, labels, info)
        return self._job_info(job)

    async def _run_backup(self, job: Job, target: dict[str, Any], labels: dict[str, str],
                          volume: dict[str, Any]) -> None:
        """Run *job*; a cancellation of this task (the daemon stops) cancels the job too:
        it ends at its next block, with no manifest written, and is recorded cancelled."""
        def progress(done: int, total: int) -> None:
            job.done, job.total = done, total

        settings = await load_settings(self.store)
        options = BackupOptions(compression=settings.backup_compression,
                                block_size=settings.backup_block_size, labels=labels,
                                progress=progress)
        try:
            job.manifest = await run_job(self._backup_blocking, job, target, options, volume,
                                         cancel=job.cancel)
        except trio.Cancelled:
            job.state, job.error = "cancelled", INTERRUPTED
            log.info("backup %s of volume %s cancelled: the daemon stops", job.id, job.volume)
            raise
        except ApplianceError as exc:
            job.state, job.error = ("cancelled" if job.cancel.is_set() else "failed"), str(exc)
            log.warning("backup %s of volume %s failed: %s", job.id, job.volume, exc)
            await self._drop_own_snapshot(job)
        except Exception as exc:  # a bug: the job fails, the daemon stays up
            job.state, job.error = "failed", f"internal error: {exc}"
            log.exception("backup %s of volume %s failed", job.id, job.volume)
            await self._drop_own_snapshot(job)
        else:
            job.state = "complete"
            self.completed()
        finally:
            with trio.CancelScope(shield=True):  # recorded even when the daemon stops
                await self.jobs.finish(job)
                await self.service.controller.events.record(
                    job.volume, f"backup-{job.state}",
                    f"backup {job.id} of snapshot {job.snapshot}"
                    + (f": {job.error}" if job.state != "complete" and job.error else ""))

    async def _drop_own_snapshot(self, job: Job) -> None:
        """Remove the snapshot that *job*, which did not complete, took itself: nothing
        would use it (a snapshot the operator named stays). Marked removed, as by
        ``snapshot delete``; the next purge reclaims its space."""
        if not job.own_snapshot:
            return
        try:
            await self.service.delete_snapshot(job.volume, job.snapshot)
        except NotFound:
            return  # gone with its volume
        except ApplianceError as exc:
            log.warning("backup %s: cannot remove its snapshot %s of volume %s: %s", job.id,
                        job.snapshot, job.volume, exc)
            job.error += (f"; its snapshot {job.snapshot} could not be removed ({exc}): "
                          f"appliance snapshot delete {job.volume} {job.snapshot}")
        else:
            log.info("backup %s of volume %s did not complete: its snapshot %s is removed",
                     job.id, job.volume, job.snapshot)

    def _backup_blocking(self, job: Job, target: dict[str, Any], options: BackupOptions,
                         volume: dict[str, Any], *, cancel: threading.Event) -> fmt.Manifest:
        options.cancel = cancel
        with self.target.open_store(target) as store, self._source(volume) as source:
            return create_backup(store, job.volume, SnapshotImage(source, job.snapshot),
                                 options, job.id)

    @contextlib.contextmanager
    def _source(self, volume: dict[str, Any]) -> Iterator[Any]:
        """The volume's layers: from a replica server in service when it is attached, else
        from its replica directories."""
        name = volume["name"]
        status = self.supervisor.engine_status(name) if volume["state"] == "attached" else None
        if status is not None:
            address = next((r["address"] for r in status["replicas"] if r["mode"] == "RW"),
                           None)
            if address is None:
                raise FailedPrecondition(f"volume {name} has no replica in service")
            with ReplicaConnection(proto.parse_address(address), read_secret_file(
                    self.supervisor.secret_file(name)), role=Role.READER,
                    timeout=120) as connection:
                yield connection
            return
        with volumeops.local_source([Path(r["directory"]) for r in volume["replica_list"]]) \
                as local:
            yield local

    @staticmethod
    def _manifest_info(manifest: fmt.Manifest) -> dict[str, Any]:
        return {"id": manifest.id, "volume": manifest.volume, "snapshot": manifest.snapshot,
                "created": manifest.created, "completed": manifest.completed,
                "size": manifest.size, "data_bytes": manifest.data_bytes,
                "uploaded_bytes": manifest.stats.get("uploaded_bytes"),
                "state": "complete", "labels": manifest.labels,
                "block_size": manifest.block_size, "compression": manifest.compression,
                "encrypted": manifest.key_id is not None, "key_id": manifest.key_id,
                "base": manifest.base,
                "blocks": len(manifest.blocks), "stats": manifest.stats}

    def _job_info(self, job: Job) -> dict[str, Any]:
        if job.manifest is not None:
            return {**self._manifest_info(job.manifest), "progress": 1.0}
        return {"id": job.id, "volume": job.volume, "snapshot": job.snapshot,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(job.started)),
                "size": None, "data_bytes": None, "uploaded_bytes": None,
                "state": job.state, "error": job.error or None, "labels": job.labels,
                "progress": job.done / job.total if job.total else 0.0}

    async def list_backups(self, volume: str | None) -> dict[str, Any]:
        """Complete backups on the target, and this node's jobs that are not (yet)."""
        if volume is not None:
            check_name(volume, "volume name")
        target = await self.target.settings()
        backups, problems = await trio.to_thread.run_sync(self._list_blocking, target, volume)
        listed = {b["id"] for b in backups}
        backups += [self._job_info(j) for j in self.jobs.all()
                    if j.id not in listed and (volume is None or j.volume == volume)
                    and j.state != "complete"]
        return {"backups": backups, "problems": problems}

    def _list_blocking(self, target: dict[str, Any], volume: str | None,
                       ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
        backups: list[dict[str, Any]] = []
        problems: list[dict[str, str]] = []
        with self.target.open_store(target) as store:
            if volume is None:
                volumes, stray = store.volumes()
                problems += [{"object": p.name, "problem": p.reason} for p in stray]
            else:
                volumes = [volume]
            for name in volumes:
                manifests, damaged = store.manifests(name)
                backups += [self._manifest_info(m) for m in manifests]
                problems += [{"object": p.name, "problem": p.reason} for p in damaged]
        return backups, problems

    async def show(self, backup_id: str) -> dict[str, Any]:
        fmt.check_backup_id(backup_id)
        job = self.jobs.get(backup_id)
        if job is not None and job.state != "complete":
            return self._job_info(job)
        target = await self.target.settings()
        manifest = await trio.to_thread.run_sync(self._find, target, backup_id)
        return self._manifest_info(manifest)

    def _find(self, target: dict[str, Any], backup_id: str) -> fmt.Manifest:
        with self.target.open_store(target) as store:
            return store.find(backup_id)

    async def delete(self, backup_id: str) -> dict[str, Any]:
        """Delete a complete backup and the blocks only it used; cancel a running one; and
        forget one that failed or was cancelled (the blocks it stored, which no manifest
        lists, go with the next deletion of a backup of its volume)."""
        fmt.check_backup_id(backup_id)
        job = self.jobs.get(backup_id)
        if job is not None and job.state == "in-progress":
            job.cancel.set()
            return {"status": "cancelling"}
        mount = await self.service.mounted_at(backup=backup_id)
        if mount is not None:
            raise FailedPrecondition(f"backup {backup_id} is mounted at {mount.path} on node "
                                     f"{mount.node}: unmount it first ('appliance backup "
                                     f"umount {mount.path}')")
        target = await self.target.settings()
        if job is not None and job.state != "complete" and \
                not await trio.to_thread.run_sync(self._on_target, target, backup_id):
            await self.jobs.forget(backup_id)
            return {"status": "deleted", "blocks_removed": 0}

        def blocking() -> tuple[str, int]:
            with self.target.open_store(target) as store:
                manifest = store.find(backup_id)
                return manifest.volume, store.delete_backup(manifest.volume, backup_id)

        volume, removed = await trio.to_thread.run_sync(blocking)
        await self.jobs.forget(backup_id)
        await self.service.controller.events.record(
            volume, "backup-deleted", f"backup {backup_id} ({removed} block(s) only it used "
            "removed)")
        return {"status": "deleted", "blocks_removed": removed}

    def _on_target(self, target: dict[str, Any], backup_id: str) -> bool:
        """Whether backup *backup_id* has a manifest on the target (a job recorded as not
        complete may have written it just before the daemon stopped)."""
        if not target.get("url"):
            return False
        try:
            with self.target.open_store(target) as store:
                store.find(backup_id)
        except NotFound:
            return False
        return True

    async def verify(self, backup_id: str | None, volume: str | None) -> dict[str, Any]:
        target = await self.target.settings()

        def blocking() -> dict[str, Any]:
            with self.target.open_store(target) as store:
                listing: list[Any] = []
                if backup_id is not None:
                    manifests = [store.find(fmt.check_backup_id(backup_id))]
                else:
                    assert volume is not None
                    store.open_volume(check_name(volume, "volume name"))
                    manifests, listing = store.manifests(volume)
                problems = [{"object": p.name, "problem": p.reason} for p in listing]
                for manifest in manifests:
                    problems += [{"object": p.name, "problem": p.reason, "backup": manifest.id}
                                 for p in store.verify(manifest)]
                return {"backups": [m.id for m in manifests], "problems": problems,
                        "ok": not problems}

        return await trio.to_thread.run_sync(blocking)

    async def restore(self, backup_id: str, name: str, replicas: int | None, *,
                      labels: dict[str, str] | None = None,
                      disk_tags: list[str] | None = None) -> dict[str, Any]:
        manifest_info = await self.show(backup_id)
        if manifest_info["state"] != "complete":
            raise FailedPrecondition(f"backup {backup_id} is {manifest_info['state']}")
        async with self._target_lock:  # the target stays until the volume is restoring
            have = (await self.target.settings()).get("key_id")
            if manifest_info["key_id"] != have:  # refused before a volume is made
                raise FailedPrecondition(
                    f"backup {backup_id} is encrypted with key {manifest_info['key_id']}; "
                    + (f"the target's key is {have}" if have else "the target has no key")
                    if manifest_info["key_id"] else
                    f"backup {backup_id} is not encrypted; the target has a key ({have})")
            created: dict[str, Any] = await self.service.create_volume(
                name, manifest_info["size"], replicas or 2, disk_tags or [], labels or {},
                {"backup": backup_id})
        return created

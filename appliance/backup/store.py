"""A backup store: the format (format.py) and block codec (codec.py) on a target
(targets/). What backups, restores, deletion and verification share: the volume record,
manifests, blocks, locks. Blocking; thread-safe where noted."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from appliance.backup import format as fmt
from appliance.backup.codec import BlockCodec, BlockDamaged
from appliance.backup.keys import BackupKey
from appliance.backup.targets.base import ObjectStore
from appliance.errors import (
    ApplianceError,
    Busy,
    Corruption,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    StorageIOError,
)

log = logging.getLogger(__name__)
LEASE = 60.0  # seconds a lock lives unless renewed
RENEW = 15.0


def now_text() -> str:
    """UTC time with microseconds: backups of one volume sort by when they completed."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _live(lock: fmt.Lock) -> bool:
    """A lock holds until it expires, or until its holder is known dead: a process of this
    host that no longer exists (a killed deleter need not block others for a lease)."""
    if lock.expires <= time.time():
        return False
    host, _, pid = lock.owner.rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    return True


@dataclass(frozen=True)
class Problem:
    """A damaged or stray item found while listing; listings report and keep going."""

    name: str
    reason: str


class BackupStore:
    def __init__(self, target: ObjectStore, key: BackupKey | None = None) -> None:
        self.target = target
        self.key = key

    def probe(self) -> None:
        """Prove that the target can hold backups: write an object, find it listed, read it
        back, delete it. Raises the target's error, or StorageIOError naming the step that
        went wrong; the probe object does not stay."""
        name = fmt.new_probe_name()
        data = os.urandom(32)
        self.target.put(name, data)
        try:
            if name not in set(self.target.list(f"{fmt.PROBES}/")):
                raise StorageIOError(f"backup target {self.target.url}: {name} was written "
                                     "but is not listed")
            if self.target.get(name) != data:
                raise StorageIOError(f"backup target {self.target.url}: {name} reads back "
                                     "other bytes than were written")
        except ApplianceError:
            with contextlib.suppress(ApplianceError):
                self.target.delete(name)
            raise
        self.target.delete(name)

    # -- the volume record ----------------------------------------------------------------

    def volume_record(self, volume: str) -> fmt.VolumeRecord | None:
        name = fmt.volume_record_name(volume)
        try:
            data = self.target.get(name)
        except NotFound:
            return None
        return fmt.VolumeRecord.decode(data, f"backup volume record {name}")

    def open_volume(self, volume: str, *, block_size: int | None = None,
                    create: bool = False) -> fmt.VolumeRecord:
        """The record of backup volume *volume*, checked against this store's key (and
        created with *block_size* when *create* and it does not exist yet)."""
        record = self.volume_record(volume)
        key_id = self.key.key_id if self.key else None
        if record is None:
            if not create:
                raise NotFound(f"no backups of volume {volume!r} in {self.target.url}")
            if not self.target.exists(fmt.FORMAT_OBJECT):
                self.target.put(fmt.FORMAT_OBJECT,
                                b'{"format": "appliance-backup", "version": 1}')
            record = fmt.VolumeRecord(volume, now_text(),
                                      fmt.check_block_size(block_size or
                                                           fmt.DEFAULT_BLOCK_SIZE),
                                      "hmac-sha256" if self.key else "sha256", key_id)
            self.target.put(fmt.volume_record_name(volume), record.encode())
            return record
        if record.key_id != key_id:
            if record.key_id is None:
                raise FailedPrecondition(f"the backups of volume {volume!r} are not "
                                         "encrypted; use the target without a key")
            if key_id is None:
                raise FailedPrecondition(f"the backups of volume {volume!r} are encrypted "
                                         f"with key {record.key_id}; give that key")
            raise FailedPrecondition(f"the backups of volume {volume!r} are encrypted with "
                                     f"key {record.key_id}; the key given is {key_id}")
        return record  # its block size stays what the first backup chose

    def codec(self, compression: str = "lz4") -> BlockCodec:
        return BlockCodec(compression, self.key)

    # -- listing --------------------------------------------------------------------------

    def volumes(self) -> tuple[list[str], list[Problem]]:
        names, problems = set(), []
        for name in self.target.list(f"{fmt.ROOT}/volumes/"):
            parts = name.split("/")
            if len(parts) >= 5 and parts[4] == "volume.json" and len(parts) == 5:
                try:
                    if fmt.volume_dir(parts[3]) == "/".join(parts[:4]):
                        names.add(parts[3])
                        continue
                except InvalidArgument:
                    pass
                problems.append(Problem(name, "a volume record in the wrong place"))
        return sorted(names), problems

    def manifests(self, volume: str) -> tuple[list[fmt.Manifest], list[Problem]]:
        """Every complete backup of *volume*, oldest first, and what could not be read."""
        found, problems = [], []
        prefix = f"{fmt.volume_dir(volume)}/backups/"
        for name in sorted(self.target.list(prefix)):
            stem = name[len(prefix):].removesuffix(".json")
            try:
                fmt.check_backup_id(stem)
                if not name.endswith(".json") or "/" in stem:
                    raise InvalidArgument("not a manifest name")
            except InvalidArgument:
                problems.append(Problem(name, "a stray object among the manifests"))
                continue
            try:
                manifest = fmt.Manifest.decode(self.target.get(name), f"manifest {name}")
            except (Corruption, NotFound) as exc:
                problems.append(Problem(name, str(exc)))
                continue
            except ApplianceError as exc:
                problems.append(Problem(name, f"cannot be read: {exc}"))
                continue
            if manifest.id != stem or manifest.volume != volume:
                problems.append(Problem(name, "names another backup or volume"))
                continue
            found.append(manifest)
        found.sort(key=lambda m: (m.completed, m.id))
        return found, problems

    def manifest(self, volume: str, backup_id: str) -> fmt.Manifest:
        name = fmt.manifest_name(volume, backup_id)
        try:
            data = self.target.get(name)
        except NotFound:
            raise NotFound(f"backup {backup_id} of volume {volume!r} does not exist") from None
        manifest = fmt.Manifest.decode(data, f"manifest {name}")
        if manifest.id != backup_id or manifest.volume != volume:
            raise Corruption(f"manifest {name} names another backup or volume")
        return manifest

    def find(self, backup_id: str) -> fmt.Manifest:
        """The backup with *backup_id*, whichever volume it belongs to."""
        fmt.check_backup_id(backup_id)
        volumes, _ = self.volumes()
        for volume in volumes:
            with contextlib.suppress(NotFound):
                return self.manifest(volume, backup_id)
        raise NotFound(f"backup {backup_id} does not exist in {self.target.url}")

    # -- blocks ---------------------------------------------------------------------------

    def block_ids(self, volume: str) -> tuple[set[str], list[Problem]]:
        ids, problems = set(), []
        for name in self.target.list(f"{fmt.volume_dir(volume)}/blocks/"):
            block_id = fmt.block_id_of(name)
            if block_id is None:
                problems.append(Problem(name, "a stray object among the blocks"))
            else:
                ids.add(block_id)
        return ids, problems

    def put_block(self, volume: str, block_id: str, data: bytes) -> None:
        self.target.put(fmt.block_name(volume, block_id), data)

    def get_block(self, volume: str, block_id: str, codec: BlockCodec) -> bytes:
        """The verified plaintext of a block; NotFound or BlockDamaged name it."""
        try:
            data = self.target.get(fmt.block_name(volume, block_id))
        except NotFound:
            raise NotFound(f"block {block_id} of volume {volume!r} is missing from "
                           f"{self.target.url}") from None
        return codec.decode(block_id, data)

    # -- locks ----------------------------------------------------------------------------

    def locks(self, volume: str) -> list[fmt.Lock]:
        found = []
        for name in self.target.list(f"{fmt.volume_dir(volume)}/locks/"):
            with contextlib.suppress(NotFound, Corruption):
                found.append(fmt.Lock.decode(self.target.get(name), f"lock {name}"))
        return found

    @contextlib.contextmanager
    def lock(self, volume: str, kind: str) -> Iterator[fmt.Lock]:
        """Hold a lock of *kind* on *volume*, renewed in the background; raise Busy when
        a conflicting live lock exists (docs/backup-format.md, "Locks")."""
        lock = fmt.Lock(fmt.new_lock_id(), kind, f"{socket.gethostname()}:{os.getpid()}",
                        time.time(), time.time() + LEASE)
        name = fmt.lock_name(volume, lock.id)
        self.target.put(name, lock.encode())
        stop = threading.Event()
        try:
            others = [x for x in self.locks(volume) if x.id != lock.id and _live(x)]
            conflicting = others if kind == "delete" else \
                [x for x in others if x.kind == "delete"]
            if conflicting:
                raise Busy(f"backup volume {volume!r} is busy: a {conflicting[0].kind} by "
                           f"{conflicting[0].owner} holds it; try again later")
            renewer = threading.Thread(target=self._renew, args=(name, lock, stop),
                                       name=f"lease-{lock.id}", daemon=True)
            renewer.start()
            yield lock
        finally:
            stop.set()
            with contextlib.suppress(ApplianceError):
                self.target.delete(name)

    def _renew(self, name: str, lock: fmt.Lock, stop: threading.Event) -> None:
        while not stop.wait(RENEW):
            renewed = fmt.Lock(lock.id, lock.kind, lock.owner, lock.created,
                               time.time() + LEASE)
            try:
                self.target.put(name, renewed.encode())
            except ApplianceError as exc:
                log.warning("cannot renew backup lock %s: %s", name, exc)

    # -- deletion and garbage collection --------------------------------------------------

    def delete_backup(self, volume: str, backup_id: str) -> int:
        """Delete a backup, then the blocks no remaining backup uses; return how many
        blocks were deleted. Idempotent: run again after an interruption, it finishes."""
        with self.lock(volume, "delete"):
            self.target.delete(fmt.manifest_name(volume, backup_id))
            return self._collect(volume)

    def collect_garbage(self, volume: str) -> int:
        with self.lock(volume, "delete"):
            return self._collect(volume)

    def _collect(self, volume: str) -> int:
        manifests, problems = self.manifests(volume)
        if problems:
            raise FailedPrecondition(
                f"backup volume {volume!r} has unreadable manifests ({problems[0].name}: "
                f"{problems[0].reason}); garbage collection would not know which blocks "
                "they use: repair or delete them first")
        used = {block_id for m in manifests for _, block_id in m.blocks}
        stored, _ = self.block_ids(volume)
        unused = stored - used
        for block_id in unused:
            self.target.delete(fmt.block_name(volume, block_id))
        return len(unused)

    # -- verification ---------------------------------------------------------------------

    def verify(self, manifest: fmt.Manifest) -> list[Problem]:
        """Read and check every block of a backup; the damaged and missing ones."""
        codec = self.codec(manifest.compression)
        problems = []
        for block_id in sorted({b for _, b in manifest.blocks}):
            try:
                self.get_block(manifest.volume, block_id, codec)
            except (NotFound, BlockDamaged) as exc:
                problems.append(Problem(fmt.block_name(manifest.volume, block_id), str(exc)))
        return problems

"""Backup and restore: the work itself, blocking, with parallel hashing, compression,
encryption and transfers, bounded memory, progress and cancellation.

Backup (invariant 8): under a ``backup`` lock, choose the base (the newest complete backup
of the volume whose snapshot still exists: only the blocks that changed since it are
read; without one every block with data is read and hashed), upload the blocks the store
lacks, and write the manifest last. Restore: download, verify and write every block of a
manifest into the new volume's replicas; a missing or damaged block fails the restore and
names it.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from appliance.backup import format as fmt
from appliance.backup.codec import BlockCodec
from appliance.backup.image import SnapshotImage
from appliance.backup.store import BackupStore, now_text
from appliance.chain.format import BLOCK_SIZE, check_labels
from appliance.chain.replica import Replica
from appliance.errors import Cancelled, FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]


@dataclass
class BackupOptions:
    compression: str = "lz4"
    block_size: int | None = None  # for a new backup volume; fixed afterwards
    labels: dict[str, str] = field(default_factory=dict)
    workers: int = 4
    cancel: threading.Event = field(default_factory=threading.Event)
    progress: Progress = field(default=lambda done, total: None)


@dataclass
class _Counters:
    read_bytes: int = 0
    uploaded_bytes: int = 0
    new_blocks: int = 0
    done: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _bounded(executor: concurrent.futures.Executor, items: Iterator[Any],
              work: Callable[[Any], Any], limit: int) -> Iterator[Any]:
    """Results of work(item) for every item, at most *limit* in flight (bounded memory);
    in completion order."""
    pending: set[concurrent.futures.Future[Any]] = set()
    for item in items:
        pending.add(executor.submit(work, item))
        if len(pending) >= limit:
            done, pending = concurrent.futures.wait(
                pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                yield future.result()
    for future in concurrent.futures.as_completed(pending):
        yield future.result()


def create_backup(store: BackupStore, volume: str, image: SnapshotImage,
                  options: BackupOptions, backup_id: str | None = None) -> fmt.Manifest:
    """Back up snapshot *image* of *volume*; return its manifest (written last)."""
    backup_id = fmt.check_backup_id(backup_id or fmt.new_backup_id())
    check_labels(options.labels)
    record = store.open_volume(volume, block_size=options.block_size, create=True)
    block_size = record.block_size
    codec = store.codec(options.compression)
    started = now_text()
    with store.lock(volume, "backup"):
        base, changed = _choose_base(store, volume, image, block_size)
        known, _ = store.block_ids(volume)
        inherited, to_read = _plan(image, block_size, base, changed)
        counters = _Counters()
        total = len(to_read)
        options.progress(0, total)
        reader_lock = threading.Lock()
        uploaded: set[str] = set()

        def one(index: int) -> tuple[int, str | None]:
            if options.cancel.is_set():
                raise Cancelled(f"backup {backup_id} of volume {volume} was cancelled")
            offset = index * block_size
            buffer = memoryview(bytearray(min(block_size, image.size - offset)))
            with reader_lock:  # one reader: sources are not thread-safe
                image.read(buffer, offset)
            block_id = None
            if np.frombuffer(buffer, dtype=np.uint64).any():  # all-zero blocks: not stored
                block_id = codec.block_id(buffer)
                with counters.lock:
                    fresh = block_id not in known and block_id not in uploaded
                    uploaded.add(block_id)
                if fresh:
                    encoded = codec.encode(buffer, block_id)
                    store.put_block(volume, block_id, encoded.data)
                    with counters.lock:
                        counters.uploaded_bytes += len(encoded.data)
                        counters.new_blocks += 1
            with counters.lock:
                counters.read_bytes += len(buffer)
                counters.done += 1
                done = counters.done
            options.progress(done, total)
            return index, block_id

        blocks = dict(inherited)
        with concurrent.futures.ThreadPoolExecutor(options.workers,
                                                   thread_name_prefix="backup") as pool:
            for index, block_id in _bounded(pool, iter(to_read), one, 2 * options.workers):
                if block_id is not None:
                    blocks[index] = block_id
        if options.cancel.is_set():
            raise Cancelled(f"backup {backup_id} of volume {volume} was cancelled")
        manifest = fmt.Manifest(
            id=backup_id, volume=volume, snapshot=image.snapshot,
            snapshot_created=image.created, created=started, completed=now_text(),
            size=image.size, block_size=block_size, compression=options.compression,
            key_id=record.key_id, hash=record.hash, blocks=sorted(blocks.items()),
            labels=dict(options.labels), base=base[0].id if base else None,
            stats={"blocks": len(blocks), "new_blocks": counters.new_blocks,
                   "read_bytes": counters.read_bytes,
                   "uploaded_bytes": counters.uploaded_bytes})
        store.target.put(fmt.manifest_name(volume, backup_id), manifest.encode())
        log.info("backup %s of volume %s (snapshot %s) complete: %d blocks, %d new, %d bytes "
                 "uploaded%s", backup_id, volume, image.snapshot, len(blocks),
                 counters.new_blocks, counters.uploaded_bytes,
                 f", incremental from {base[0].id}" if base else "")
        return manifest


def _plan(image: SnapshotImage, block_size: int,
          base: tuple[fmt.Manifest, dict[int, str]] | None,
          changed: Any) -> tuple[dict[int, str], list[int]]:
    """Which blocks keep the base's id (unchanged since it) and which must be read."""
    inherited: dict[int, str] = {}
    to_read: list[int] = []
    base_last = -1
    if base is not None and base[0].size % block_size and base[0].size != image.size:
        base_last = base[0].size // block_size  # shorter in the base than now: re-read
    for index in range(-(-image.size // block_size)):
        offset = index * block_size
        length = min(block_size, image.size - offset)
        if base is not None and index != base_last and \
                not changed[offset // BLOCK_SIZE:-(-(offset + length) // BLOCK_SIZE)].any():
            if index in base[1]:
                inherited[index] = base[1][index]
            continue  # unchanged: the base's block, or zeros
        if image.has_data(offset, length):
            to_read.append(index)
    return inherited, to_read


def _choose_base(store: BackupStore, volume: str, image: SnapshotImage, block_size: int,
                 ) -> tuple[tuple[fmt.Manifest, dict[int, str]] | None, Any]:
    manifests, _ = store.manifests(volume)
    for manifest in reversed(manifests):
        if manifest.block_size != block_size or manifest.size > image.size:
            continue
        changed = image.changed_since(manifest.snapshot)
        if changed is not None:
            return (manifest, dict(manifest.blocks)), changed
    return None, None


# -- restore -----------------------------------------------------------------------------


def fetch_block(store: BackupStore, manifest: fmt.Manifest, codec: BlockCodec, index: int,
                block_id: str) -> bytes:
    """Block *index* of backup *manifest*: fetched, verified by the codec, and checked to
    be as long as that block of the volume."""
    data = store.get_block(manifest.volume, block_id, codec)
    expected = min(manifest.block_size, manifest.size - index * manifest.block_size)
    if len(data) != expected:
        raise FailedPrecondition(f"block {block_id} holds {len(data)} bytes; block "
                                 f"{index} of backup {manifest.id} is {expected}")
    return data


def restore_backup(store: BackupStore, manifest: fmt.Manifest, targets: list[Replica], *,
                   workers: int = 4, cancel: threading.Event | None = None,
                   progress: Progress = lambda done, total: None) -> int:
    """Write the backup into the new, empty replicas *targets*; return the bytes written
    (per replica). Blocks not in the manifest are zeros and are not written."""
    cancel = cancel or threading.Event()
    if not targets:
        raise InvalidArgument("a restore needs at least one replica to write to")
    for replica in targets:
        if replica.size < manifest.size:
            replica.expand(manifest.size)
        elif replica.size > manifest.size:
            raise FailedPrecondition(f"replica {replica.path} is larger than the backup")
    codec = BlockCodec(manifest.compression, store.key)
    if (manifest.key_id or None) != (store.key.key_id if store.key else None):
        raise FailedPrecondition(
            f"backup {manifest.id} is encrypted with key {manifest.key_id}; "
            + (f"the key given is {store.key.key_id}" if store.key else "give that key")
            if manifest.key_id else f"backup {manifest.id} is not encrypted; use the "
            "target without a key")
    total = len(manifest.blocks)
    progress(0, total)
    written = 0

    def fetch(entry: tuple[int, str]) -> tuple[int, bytes]:
        if cancel.is_set():
            raise Cancelled(f"the restore of backup {manifest.id} was cancelled")
        index, block_id = entry
        return index, fetch_block(store, manifest, codec, index, block_id)

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="restore") as pool:
        for done, (index, data) in enumerate(
                _bounded(pool, iter(manifest.blocks), fetch, 2 * workers), start=1):
            for replica in targets:
                replica.write(data, index * manifest.block_size)
            written += len(data)
            progress(done, total)
    for replica in targets:
        replica.flush()
    log.info("restored backup %s: %d bytes in %.1f s", manifest.id, written,
             time.monotonic() - started)
    return written


def changed_blocks(base: fmt.Manifest | None, new: fmt.Manifest) -> list[int]:
    """The block indexes whose content differs between backups *base* and *new* of the same
    backup volume (ids name content, so equal ids are equal blocks), in order: every block
    of *new* (and every block of *base* it lacks, now zeros) when *base* is None or has
    another block size."""
    ours = dict(new.blocks)
    if base is None or base.block_size != new.block_size:
        count = -(-new.size // new.block_size)
        return list(range(count))
    theirs = dict(base.blocks)
    count = -(-max(new.size, base.size) // new.block_size)
    return [i for i in sorted(set(ours) | set(theirs))
            if i < count and ours.get(i) != theirs.get(i)]


def apply_backup(store: BackupStore, base: fmt.Manifest | None, new: fmt.Manifest,
                 targets: list[Replica], *, workers: int = 4,
                 cancel: threading.Event | None = None,
                 progress: Progress = lambda done, total: None) -> tuple[int, int]:
    """Make the replicas *targets*, which hold backup *base* (or anything, when None), hold
    backup *new*: only the blocks that differ are written (those of *new* fetched and
    verified, the others zeroed). Idempotent: run again after an interruption, it ends in
    the same place. Returns (blocks written, bytes fetched)."""
    cancel = cancel or threading.Event()
    codec = BlockCodec(new.compression, store.key)
    if (new.key_id or None) != (store.key.key_id if store.key else None):
        raise FailedPrecondition(f"backup {new.id} is encrypted with key {new.key_id}; the "
                                 "target's key is " + (store.key.key_id if store.key
                                                       else "not set"))
    for replica in targets:
        if replica.size < new.size:
            replica.expand(new.size)
    indexes = changed_blocks(base, new)
    blocks = dict(new.blocks)
    fetched = 0

    def fetch(index: int) -> tuple[int, bytes | None]:
        if cancel.is_set():
            raise Cancelled(f"applying backup {new.id} was cancelled")
        block_id = blocks.get(index)
        if block_id is None:
            return index, None
        return index, fetch_block(store, new, codec, index, block_id)

    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="apply") as pool:
        for done, (index, data) in enumerate(
                _bounded(pool, iter(indexes), fetch, 2 * workers), start=1):
            offset = index * new.block_size
            for replica in targets:
                if data is None:
                    length = min(new.block_size, replica.size - offset)
                    if length > 0:
                        replica.write_zeroes(offset, length)
                else:
                    replica.write(data, offset)
            fetched += len(data or b"")
            progress(done, len(indexes))
    for replica in targets:
        replica.flush()
    return len(indexes), fetched

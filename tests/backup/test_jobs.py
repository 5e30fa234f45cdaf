"""Backup and restore on real replica directories and real targets (a directory, and S3
over HTTP): full and incremental backups restore exactly; only changed blocks are read and
only new blocks uploaded; encryption, damage, deletion and garbage collection."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.backup import format as fmt
from appliance.backup.codec import BlockDamaged
from appliance.backup.image import SnapshotImage
from appliance.backup.jobs import BackupOptions, create_backup, restore_backup
from appliance.backup.keys import BackupKey
from appliance.backup.store import BackupStore
from appliance.backup.targets.base import ObjectStore
from appliance.chain import Replica
from appliance.chain.source import LocalSource
from appliance.errors import Busy, Cancelled, FailedPrecondition, NotFound

MiB = 1 << 20
SIZE = 24 * MiB
BLOCK = 1 * MiB  # small blocks keep the tests quick; the format allows 64 KiB to 64 MiB


@pytest.fixture
def replica(tmp_path: Path) -> Iterator[Replica]:
    opened = Replica.create(tmp_path / "source", SIZE)
    try:
        yield opened
    finally:
        opened.close()


def snapshot_bytes(replica: Replica, name: str) -> bytes:
    with replica.open_snapshot(name) as reader:
        return reader.read(0, reader.size)


def restored(store: BackupStore, manifest: fmt.Manifest, directory: Path) -> bytes:
    target = Replica.create(directory, 4096)
    try:
        restore_backup(store, manifest, [target])
        return target.read(0, target.size)
    finally:
        target.close()


def back_up(store: BackupStore, replica: Replica, snapshot: str,
            **options: object) -> fmt.Manifest:
    return create_backup(store, "vol", SnapshotImage(LocalSource(replica), snapshot),
                         BackupOptions(block_size=BLOCK, **options))  # type: ignore[arg-type]


def test_full_and_incremental_restore_exactly(target: ObjectStore, replica: Replica,
                                              tmp_path: Path) -> None:
    store = BackupStore(target)
    replica.write(os.urandom(5 * MiB), 2 * MiB)
    replica.write(b"text " * (MiB // 5) + b"x", 12 * MiB)  # compressible, unaligned end
    replica.snapshot("s0")
    manifests = [back_up(store, replica, "s0")]
    assert manifests[0].base is None and manifests[0].stats["new_blocks"] >= 6
    for round_ in range(1, 4):
        replica.write(os.urandom(64 << 10), (round_ * 3 + 1) * MiB + 8192)  # one block
        replica.write(bytes(MiB), 2 * MiB)  # zeros over data (from round 1 on: no change)
        replica.snapshot(f"s{round_}")
        manifest = back_up(store, replica, f"s{round_}")
        assert manifest.base == manifests[-1].id
        assert manifest.stats["read_bytes"] <= 2 * BLOCK, manifest.stats  # changed only
        assert manifest.stats["uploaded_bytes"] <= BLOCK + 4096, manifest.stats
        manifests.append(manifest)
    for index, manifest in enumerate(manifests):
        expected = snapshot_bytes(replica, f"s{index}")
        assert hashlib.sha256(restored(store, manifest, tmp_path / f"r{index}")).digest() \
            == hashlib.sha256(expected).digest()
    listed, problems = store.manifests("vol")
    assert [m.id for m in listed] == [m.id for m in manifests] and not problems


def test_unchanged_data_is_never_uploaded_twice(target: ObjectStore, replica: Replica) -> None:
    store = BackupStore(target)
    data = os.urandom(4 * MiB)
    replica.write(data, 0)
    replica.snapshot("a")
    first = back_up(store, replica, "a")
    replica.write(data, 8 * MiB)  # the same blocks again, elsewhere
    replica.snapshot("b")
    second = back_up(store, replica, "b")
    assert second.stats["new_blocks"] == 0 and second.stats["uploaded_bytes"] == 0
    assert first.stats["uploaded_bytes"] > 0
    replica.remove_snapshot("a")  # the base is gone: found again by hashing
    replica.snapshot("c")
    third = back_up(store, replica, "c")
    assert third.base == second.id and third.stats["uploaded_bytes"] == 0


def test_encryption_and_wrong_key(target: ObjectStore, replica: Replica,
                                  tmp_path: Path) -> None:
    key = BackupKey.from_bytes(os.urandom(32))
    store = BackupStore(target, key)
    secret = b"very secret words " * 60000
    replica.write(secret, 0)
    replica.snapshot("s")
    manifest = back_up(store, replica, "s", compression="zstd")
    assert manifest.key_id == key.key_id
    for name in target.list(""):
        assert b"very secret words" not in target.get(name)
    assert restored(store, manifest, tmp_path / "ok") == snapshot_bytes(replica, "s")
    wrong = BackupStore(target, BackupKey.from_bytes(os.urandom(32)))
    with pytest.raises(FailedPrecondition, match=f"encrypted with key {key.key_id}"):
        restored(wrong, manifest, tmp_path / "wrong")
    with pytest.raises(FailedPrecondition, match="encrypted with key"):
        back_up(wrong, replica, "s")
    with pytest.raises(FailedPrecondition, match="give that key"):
        restored(BackupStore(target), manifest, tmp_path / "none")


def test_damaged_or_missing_block_fails_the_restore(target: ObjectStore, replica: Replica,
                                                    tmp_path: Path) -> None:
    store = BackupStore(target)
    replica.write(os.urandom(3 * MiB), 0)
    replica.snapshot("s")
    manifest = back_up(store, replica, "s")
    victim = manifest.blocks[1][1]
    name = fmt.block_name("vol", victim)
    data = bytearray(target.get(name))
    data[len(data) // 2] ^= 0xFF
    target.put(name, bytes(data))
    with pytest.raises(BlockDamaged, match=victim):
        restored(store, manifest, tmp_path / "damaged")
    assert [p.name for p in store.verify(manifest)] == [name]
    target.delete(name)
    with pytest.raises(NotFound, match=victim):
        restored(store, manifest, tmp_path / "missing")


def test_delete_and_garbage_collection(target: ObjectStore, replica: Replica,
                                       tmp_path: Path) -> None:
    store = BackupStore(target)
    replica.write(os.urandom(4 * MiB), 0)
    replica.snapshot("s1")
    first = back_up(store, replica, "s1")
    replica.write(os.urandom(MiB), 0)
    replica.snapshot("s2")
    second = back_up(store, replica, "s2")
    before, _ = store.block_ids("vol")
    assert store.delete_backup("vol", first.id) == 1  # only its block 0 is unused now
    assert restored(store, second, tmp_path / "r2") == snapshot_bytes(replica, "s2")
    assert len(store.block_ids("vol")[0]) == len(before) - 1
    assert store.collect_garbage("vol") == 0  # idempotent
    with pytest.raises(NotFound):
        store.manifest("vol", first.id)


def test_delete_waits_for_backups_and_is_resumable(target: ObjectStore,
                                                   replica: Replica) -> None:
    """Row 16 at the store: a delete refuses while a backup holds its lock; a delete
    killed after removing the manifest is finished by the next collection."""
    store = BackupStore(target)
    replica.write(os.urandom(2 * MiB), 0)
    replica.snapshot("s1")
    first = back_up(store, replica, "s1")
    with store.lock("vol", "backup"), pytest.raises(Busy, match="busy"):
        store.delete_backup("vol", first.id)
    assert store.manifest("vol", first.id)  # nothing deleted
    target.delete(fmt.manifest_name("vol", first.id))  # a deleter killed right here
    assert store.collect_garbage("vol") == 2
    assert store.block_ids("vol")[0] == set()


def test_listing_keeps_going_past_damage(target: ObjectStore, replica: Replica) -> None:
    store = BackupStore(target)
    replica.write(os.urandom(MiB), 0)
    replica.snapshot("s")
    good = back_up(store, replica, "s")
    backups = f"{fmt.volume_dir('vol')}/backups"
    target.put(f"{backups}/backup-00000000000000aa.json", b"{not json")
    target.put(f"{backups}/backup-00000000000000bb.json", b"")
    target.put(f"{backups}/backup-00000000000000cc.json",
               good.encode().replace(b'"complete":true', b'"complete":false'))
    target.put(f"{backups}/stray.txt", b"hello")
    listed, problems = store.manifests("vol")
    assert [m.id for m in listed] == [good.id]
    assert len(problems) == 4 and all(p.reason for p in problems)


def test_cancel_leaves_no_backup(target: ObjectStore, replica: Replica) -> None:
    store = BackupStore(target)
    replica.write(os.urandom(8 * MiB), 0)
    replica.snapshot("s")
    options = BackupOptions(block_size=BLOCK, workers=1)
    options.progress = lambda done, total: options.cancel.set() if done >= 2 else None
    with pytest.raises(Cancelled):
        create_backup(store, "vol", SnapshotImage(LocalSource(replica), "s"), options)
    assert store.manifests("vol") == ([], [])
    assert not store.locks("vol")

"""RELIABILITY row 16 (concurrent delete and backup) and row 15 (a damaged store) against
real targets: a delete never runs beside a backup; a deleter killed half-way leaves only
unreferenced blocks, and collecting again finishes the job; the newer backup restores
bit-exact throughout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.backup import format as fmt
from appliance.backup.image import SnapshotImage
from appliance.backup.jobs import BackupOptions, create_backup, restore_backup
from appliance.backup.store import BackupStore
from appliance.backup.targets import opened
from appliance.backup.targets.base import ObjectStore
from appliance.chain import Replica
from appliance.chain.source import LocalSource
from appliance.errors import Busy
from tests.backup.conftest import S3Endpoint
from tests.harness import wait_for

MiB = 1 << 20
BLOCK = 1 * MiB

DELETER = """
import sys, time
from pathlib import Path
from appliance.backup.store import BackupStore
from appliance.backup.targets import opened
url, credentials, volume, backup = sys.argv[1:5]
with opened(url, Path(credentials) if credentials else None) as target:
    slow_delete = target.delete
    def delete(name):
        slow_delete(name)
        print("deleted", name, flush=True)
        time.sleep(0.3)
    target.delete = delete
    BackupStore(target).delete_backup(volume, backup)
"""


class SlowTarget(ObjectStore):
    """A target whose writes take a while, so that a backup is still running."""

    def __init__(self, inner: ObjectStore, delay: float) -> None:
        self.inner, self.delay, self.url = inner, delay, inner.url

    def put(self, name: str, data: bytes) -> None:
        time.sleep(self.delay)
        self.inner.put(name, data)

    def get(self, name: str) -> bytes:
        return self.inner.get(name)

    def exists(self, name: str) -> bool:
        return self.inner.exists(name)

    def list(self, prefix: str) -> Iterator[str]:
        return self.inner.list(prefix)

    def delete(self, name: str) -> None:
        self.inner.delete(name)


@pytest.fixture(params=["file", "s3"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path | None]:
    if request.param == "file":
        (tmp_path / "target").mkdir()
        return f"file://{tmp_path / 'target'}", None
    endpoint: S3Endpoint = request.getfixturevalue("s3_endpoint")
    return endpoint.url(f"row16-{os.urandom(4).hex()}"), endpoint.credentials


def image_of(replica: Replica, snapshot: str) -> SnapshotImage:
    return SnapshotImage(LocalSource(replica), snapshot)


def test_row16_concurrent_delete_and_backup(location: tuple[str, Path | None],
                                            tmp_path: Path) -> None:
    url, credentials = location
    source = Replica.create(tmp_path / "source", 16 * MiB)
    try:
        source.write(os.urandom(16 * MiB), 0)
        source.snapshot("s1")
        source.write(os.urandom(4 * MiB), 4 * MiB)
        source.snapshot("s2")
        with opened(url, credentials) as target:
            store = BackupStore(target)
            older = create_backup(store, "vol", image_of(source, "s1"),
                                  BackupOptions(block_size=BLOCK))
            # backup N+1 runs (slowly) while a delete of N is attempted: refused
            slow = BackupStore(SlowTarget(target, 0.1))
            result: dict[str, Any] = {}
            backup = threading.Thread(target=lambda: result.update(manifest=create_backup(
                slow, "vol", image_of(source, "s2"), BackupOptions(block_size=BLOCK,
                                                                   workers=1))))
            backup.start()
            wait_for(lambda: any(x.kind == "backup" for x in store.locks("vol")), 30,
                     "the backup's lock")
            with pytest.raises(Busy, match="busy"):
                store.delete_backup("vol", older.id)
            backup.join(timeout=120)
            newer: fmt.Manifest = result["manifest"]
            assert store.manifest("vol", older.id)  # the refused delete changed nothing

            # the deleter is killed half-way through collecting N's blocks
            deleter = subprocess.Popen(
                [sys.executable, "-c", DELETER, url, str(credentials or ""), "vol", older.id],
                stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
            assert deleter.stdout is not None
            lines = [deleter.stdout.readline(), deleter.stdout.readline()]
            assert all("deleted" in line for line in lines), lines  # manifest + 1 block
            deleter.send_signal(signal.SIGKILL)
            deleter.wait(timeout=30)
            deleter.stdout.close()
            listed, problems = store.manifests("vol")
            assert [m.id for m in listed] == [newer.id] and not problems
            left = store.collect_garbage("vol")  # finishes the job (the lock is dead)
            assert left >= 1
            assert store.collect_garbage("vol") == 0  # idempotent
            used = {b for _, b in newer.blocks}
            assert store.block_ids("vol")[0] == used
            restored = Replica.create(tmp_path / "restored", 4096)
            try:
                restore_backup(store, newer, [restored])
                with source.open_snapshot("s2") as reader:
                    assert restored.read(0, restored.size) == reader.read(0, reader.size)
            finally:
                restored.close()
    finally:
        source.close()


def test_row15_damage_is_reported_and_never_restored(location: tuple[str, Path | None],
                                                     tmp_path: Path) -> None:
    url, credentials = location
    source = Replica.create(tmp_path / "source", 8 * MiB)
    try:
        source.write(os.urandom(8 * MiB), 0)
        source.snapshot("s")
        with opened(url, credentials) as target:
            store = BackupStore(target)
            good = create_backup(store, "vol", image_of(source, "s"),
                                 BackupOptions(block_size=BLOCK))
            damaged = create_backup(store, "vol", image_of(source, "s"),
                                    BackupOptions(block_size=BLOCK))
            names = [fmt.block_name("vol", b) for _, b in good.blocks]
            target.put(names[0], target.get(names[0])[:100])  # truncated
            flipped = bytearray(target.get(names[1]))
            flipped[-1] ^= 1
            target.put(names[1], bytes(flipped))
            target.delete(names[2])
            backups = f"{fmt.volume_dir('vol')}/backups"
            target.put(f"{backups}/backup-00000000000000ee.json", b"")
            target.put(f"{backups}/backup-00000000000000ff.json", b'{"format": 1, "id": 7}')
            target.put(f"{fmt.volume_dir('vol')}/blocks/zz/stray", b"?")
            listed, problems = store.manifests("vol")
            assert {m.id for m in listed} == {good.id, damaged.id}
            assert len(problems) == 2
            assert len(store.block_ids("vol")[1]) == 1  # the stray block object
            bad = {p.name for p in store.verify(good)}
            assert bad == set(names[:3])
            restored = Replica.create(tmp_path / "restored", 4096)
            try:
                with pytest.raises(Exception, match=r"block [0-9a-f]{64}"):
                    restore_backup(store, good, [restored])
                # what was written before the failure is correct data, never garbage
                with source.open_snapshot("s") as reader:
                    for index in range(8):
                        got = restored.read(index * BLOCK, BLOCK)
                        assert got in (bytes(BLOCK), reader.read(index * BLOCK, BLOCK))
            finally:
                restored.close()
    finally:
        source.close()

"""The backup store format: names, records and manifests round-trip; anything malformed is
refused with a message naming the object and the problem (row 15's listing relies on it)."""

from __future__ import annotations

import json

import pytest

from appliance.backup import format as fmt
from appliance.errors import Corruption, InvalidArgument

BLOCK = "ab" * 32


def manifest(**changes: object) -> fmt.Manifest:
    values: dict[str, object] = {
        "id": "backup-0123456789abcdef", "volume": "db", "snapshot": "s1",
        "snapshot_created": "2026-11-27T12:00:00Z", "created": "2026-11-27T12:00:01Z",
        "completed": "2026-11-27T12:00:09Z", "size": 10 << 20, "block_size": 2 << 20,
        "compression": "lz4", "key_id": None, "hash": "sha256",
        "blocks": [(0, BLOCK), (4, "cd" * 32)], "labels": {"app": "db"}, "base": None,
        "stats": {"uploaded_bytes": 7}}
    values.update(changes)
    return fmt.Manifest(**values)  # type: ignore[arg-type]


def test_names() -> None:
    assert fmt.volume_dir("db").startswith("appliance-backups/volumes/")
    assert len(fmt.volume_dir("db").split("/")[2]) == 2
    name = fmt.block_name("db", BLOCK)
    assert name.endswith(f"/blocks/ab/ab/{BLOCK}") and fmt.block_id_of(name) == BLOCK
    assert fmt.block_id_of(name + ".tmp") is None
    assert fmt.block_id_of(f"{fmt.volume_dir('db')}/blocks/00/00/{BLOCK}") is None
    assert fmt.manifest_name("db", "backup-0123456789abcdef").endswith(
        "/backups/backup-0123456789abcdef.json")
    for bad in ("../x", "a/b", "", "-x"):
        with pytest.raises(InvalidArgument):
            fmt.volume_dir(bad)
    with pytest.raises(InvalidArgument, match="backup id"):
        fmt.manifest_name("db", "backup-../../x")
    assert fmt.check_backup_id(fmt.new_backup_id())


def test_manifest_round_trip() -> None:
    original = manifest()
    data = original.encode()
    assert json.loads(data)["complete"] is True
    assert fmt.Manifest.decode(data, "m") == original


@pytest.mark.parametrize(("change", "message"), [
    (lambda v: v.pop("complete"), "not marked complete"),
    (lambda v: v.update(complete=False), "not marked complete"),
    (lambda v: v.update(format=9), "unknown format"),
    (lambda v: v.pop("size"), "'size' is missing"),
    (lambda v: v.update(size="big"), "'size' has the wrong type"),
    (lambda v: v.update(size=True), "'size' has the wrong type"),
    (lambda v: v.update(block_size=3000), "block size"),
    (lambda v: v.update(blocks=[[4, BLOCK], [0, BLOCK]]), "out of order"),
    (lambda v: v.update(blocks=[[5, BLOCK]]), "out of order or range"),
    (lambda v: v.update(blocks=[[0, "xyz"]]), "malformed block entry"),
    (lambda v: v.update(blocks=[[0]]), "malformed block entry"),
    (lambda v: v.update(id="backup-nothex"), "invalid backup id"),
    (lambda v: v.update(labels={"": "x"}), "label"),
])
def test_damaged_manifests(change: object, message: str) -> None:
    value = json.loads(manifest().encode())
    change(value)  # type: ignore[operator]
    with pytest.raises(Corruption, match=message):
        fmt.Manifest.decode(json.dumps(value).encode(), "manifest m")


@pytest.mark.parametrize("data", [b"", b"\xff\xfe", b"[]", b"null", b"{", b"1" * 100])
def test_garbage_is_not_a_manifest(data: bytes) -> None:
    with pytest.raises(Corruption, match="manifest m"):
        fmt.Manifest.decode(data, "manifest m")


def test_volume_record_and_lock() -> None:
    record = fmt.VolumeRecord("db", "2026-11-27T12:00:00Z", 2 << 20, "sha256", None)
    assert fmt.VolumeRecord.decode(record.encode(), "r") == record
    with pytest.raises(Corruption, match="unknown hash"):
        fmt.VolumeRecord.decode(record.encode().replace(b"sha256", b"md5"), "r")
    lock = fmt.Lock(fmt.new_lock_id(), "delete", "node1:42", 1.0, 61.0)
    assert fmt.Lock.decode(lock.encode(), "l") == lock
    with pytest.raises(Corruption, match="not a lock"):
        fmt.Lock.decode(lock.encode().replace(b"delete", b"party"), "l")


def test_block_sizes() -> None:
    assert fmt.check_block_size(2 << 20)
    for bad in (0, 1000, 32 << 10, 128 << 20, 3 << 20):
        with pytest.raises(InvalidArgument, match="power of two"):
            fmt.check_block_size(bad)

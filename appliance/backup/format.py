"""The backup store format (docs/backup-format.md): object names, the volume record, the
manifest, locks. Pure: encoding, decoding and strict validation only."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from appliance.chain.format import check_labels, check_name
from appliance.errors import Corruption, InvalidArgument

FORMAT = 1
ROOT = "appliance-backups"
FORMAT_OBJECT = f"{ROOT}/format.json"
PROBES = f"{ROOT}/probes"  # objects that prove a target usable, deleted at once
DEFAULT_BLOCK_SIZE = 2 << 20
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 64 << 10, 64 << 20
_BACKUP_ID = re.compile(r"backup-[0-9a-f]{16}")
_BLOCK_ID = re.compile(r"[0-9a-f]{64}")
_LOCK_ID = re.compile(r"lock-[0-9a-f]{16}")
LOCK_KINDS = ("backup", "restore", "delete")


def new_backup_id() -> str:
    return "backup-" + os.urandom(8).hex()


def new_lock_id() -> str:
    return "lock-" + os.urandom(8).hex()


def new_probe_name() -> str:
    return f"{PROBES}/probe-" + os.urandom(8).hex()


def check_backup_id(backup_id: str) -> str:
    if not isinstance(backup_id, str) or not _BACKUP_ID.fullmatch(backup_id):
        raise InvalidArgument(f"invalid backup id {str(backup_id)[:80]!r}: backup- and 16 "
                              "hex digits")
    return backup_id


def check_block_size(size: int) -> int:
    if not isinstance(size, int) or size & (size - 1) or \
            not MIN_BLOCK_SIZE <= size <= MAX_BLOCK_SIZE:
        raise InvalidArgument(f"invalid backup block size {size!r}: a power of two from "
                              f"{MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE} bytes")
    return size


# -- names ----------------------------------------------------------------------------------


def volume_dir(volume: str) -> str:
    fan = hashlib.sha256(check_name(volume, "volume name").encode()).hexdigest()[:2]
    return f"{ROOT}/volumes/{fan}/{volume}"


def volume_record_name(volume: str) -> str:
    return f"{volume_dir(volume)}/volume.json"


def manifest_name(volume: str, backup_id: str) -> str:
    return f"{volume_dir(volume)}/backups/{check_backup_id(backup_id)}.json"


def block_name(volume: str, block_id: str) -> str:
    return f"{volume_dir(volume)}/blocks/{block_id[:2]}/{block_id[2:4]}/{block_id}"


def lock_name(volume: str, lock_id: str) -> str:
    return f"{volume_dir(volume)}/locks/{lock_id}.json"


def block_id_of(name: str) -> str | None:
    """The block id an object name under ``blocks/`` holds, or None (a stray object)."""
    block_id = name.rsplit("/", 1)[-1]
    return block_id if _BLOCK_ID.fullmatch(block_id) and \
        name.endswith(f"/{block_id[:2]}/{block_id[2:4]}/{block_id}") else None


# -- records --------------------------------------------------------------------------------


def _decode(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > 1 << 30:  # a 16 TiB volume's manifest is about 620 MiB
        raise Corruption(f"{what}: {len(data)} bytes, too large to be one")
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Corruption(f"{what}: not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise Corruption(f"{what}: not a JSON object")
    return value


def _field(value: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str,
           *, optional: bool = False) -> Any:
    if name not in value:
        if optional:
            return None
        raise Corruption(f"{what}: field {name!r} is missing")
    item = value[name]
    if (optional and item is None) or (isinstance(item, kind) and not (
            isinstance(item, bool) and kind in (int, (int, float)))):
        return item
    raise Corruption(f"{what}: field {name!r} has the wrong type")


@dataclass(frozen=True)
class VolumeRecord:
    volume: str
    created: str
    block_size: int
    hash: str  # "sha256" or "hmac-sha256"
    key_id: str | None

    def encode(self) -> bytes:
        return json.dumps({"format": FORMAT, **asdict(self)}, sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes, what: str) -> VolumeRecord:
        value = _decode(data, what)
        if value.get("format") != FORMAT:
            raise Corruption(f"{what}: unknown format {value.get('format')!r}")
        record = cls(_field(value, "volume", str, what), _field(value, "created", str, what),
                     _field(value, "block_size", int, what), _field(value, "hash", str, what),
                     _field(value, "key_id", str, what, optional=True))
        try:
            check_block_size(record.block_size)
        except InvalidArgument as exc:
            raise Corruption(f"{what}: {exc}") from None
        if record.hash not in ("sha256", "hmac-sha256"):
            raise Corruption(f"{what}: unknown hash {record.hash!r}")
        return record


@dataclass(frozen=True)
class Manifest:
    id: str
    volume: str
    snapshot: str
    snapshot_created: str | None
    created: str
    completed: str
    size: int
    block_size: int
    compression: str
    key_id: str | None
    hash: str
    blocks: list[tuple[int, str]]
    labels: dict[str, str] = field(default_factory=dict)
    base: str | None = None
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def data_bytes(self) -> int:
        """The bytes of the blocks the backup lists (zeros are not), uncompressed: what a
        restore writes."""
        last = -(-self.size // self.block_size) - 1
        short = (last + 1) * self.block_size - self.size  # the last block may be shorter
        return len(self.blocks) * self.block_size - \
            (short if self.blocks and self.blocks[-1][0] == last else 0)

    def encode(self) -> bytes:
        value = asdict(self)
        value["blocks"] = [[index, block_id] for index, block_id in self.blocks]
        return json.dumps({"format": FORMAT, **value, "complete": True},
                          separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes, what: str) -> Manifest:
        value = _decode(data, what)
        if value.get("format") != FORMAT:
            raise Corruption(f"{what}: unknown format {value.get('format')!r}")
        if value.get("complete") is not True:
            raise Corruption(f"{what}: not marked complete")
        raw_blocks = _field(value, "blocks", list, what)
        size = _field(value, "size", int, what)
        block_size = _field(value, "block_size", int, what)
        try:
            check_block_size(block_size)
        except InvalidArgument as exc:
            raise Corruption(f"{what}: {exc}") from None
        if size < 0:
            raise Corruption(f"{what}: negative size")
        count = -(-size // block_size)
        blocks: list[tuple[int, str]] = []
        previous = -1
        for entry in raw_blocks:
            if not (isinstance(entry, list) and len(entry) == 2 and
                    isinstance(entry[0], int) and not isinstance(entry[0], bool) and
                    isinstance(entry[1], str) and _BLOCK_ID.fullmatch(entry[1])):
                raise Corruption(f"{what}: a malformed block entry {str(entry)[:80]}")
            if not previous < entry[0] < count:
                raise Corruption(f"{what}: block index {entry[0]} out of order or range")
            previous = entry[0]
            blocks.append((entry[0], entry[1]))
        labels = _field(value, "labels", dict, what, optional=True) or {}
        stats = _field(value, "stats", dict, what, optional=True) or {}
        try:
            check_labels(labels)
            check_backup_id(_field(value, "id", str, what))
        except InvalidArgument as exc:
            raise Corruption(f"{what}: {exc}") from None
        return cls(
            id=value["id"], volume=_field(value, "volume", str, what),
            snapshot=_field(value, "snapshot", str, what),
            snapshot_created=_field(value, "snapshot_created", str, what, optional=True),
            created=_field(value, "created", str, what),
            completed=_field(value, "completed", str, what), size=size,
            block_size=block_size, compression=_field(value, "compression", str, what),
            key_id=_field(value, "key_id", str, what, optional=True),
            hash=_field(value, "hash", str, what), blocks=blocks, labels=labels,
            base=_field(value, "base", str, what, optional=True),
            stats={k: v for k, v in stats.items() if isinstance(v, int)})


@dataclass(frozen=True)
class Lock:
    id: str
    kind: str
    owner: str
    created: float
    expires: float

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes, what: str) -> Lock:
        value = _decode(data, what)
        lock = cls(_field(value, "id", str, what), _field(value, "kind", str, what),
                   _field(value, "owner", str, what),
                   float(_field(value, "created", (int, float), what)),
                   float(_field(value, "expires", (int, float), what)))
        if lock.kind not in LOCK_KINDS or not _LOCK_ID.fullmatch(lock.id):
            raise Corruption(f"{what}: not a lock")
        return lock

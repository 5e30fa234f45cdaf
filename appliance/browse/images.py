"""What a browse mount serves: the bytes of a snapshot (from its layer files) or of a
backup (its blocks fetched from the target on demand, verified, and kept in a bounded
cache). Both answer ``read(offset, length)`` at any alignment, from several threads."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from appliance.backup import format as bfmt
from appliance.backup.codec import BlockCodec
from appliance.backup.image import SnapshotImage
from appliance.backup.jobs import fetch_block
from appliance.backup.store import BackupStore
from appliance.chain.format import BLOCK_SIZE
from appliance.chain.frozen import FrozenSnapshot
from appliance.errors import FailedPrecondition

CACHE_BYTES = 256 << 20  # a backup mount keeps at most this much of its blocks


class Image(Protocol):
    size: int

    def read(self, offset: int, length: int) -> bytes: ...

    def statistics(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class SnapshotFile:
    """Snapshot *snapshot* of the replica in *directory*."""

    def __init__(self, directory: Path, snapshot: str) -> None:
        self.frozen = FrozenSnapshot.open(directory, snapshot)
        self.image = SnapshotImage(self.frozen, snapshot)
        self.size = self.image.size
        self.reads = 0

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        if not length:
            return b""
        start = offset - offset % BLOCK_SIZE
        end = -(-(offset + length) // BLOCK_SIZE) * BLOCK_SIZE
        buffer = memoryview(bytearray(end - start))
        self.image.read(buffer, start)
        self.reads += 1
        return bytes(buffer[offset - start:offset - start + length])

    def statistics(self) -> dict[str, Any]:
        return {"reads": self.reads}

    def close(self) -> None:
        self.frozen.close()


@dataclass
class _Counters:
    fetched_blocks: int = 0
    fetched_bytes: int = 0  # plaintext
    cache_hits: int = 0
    reads: int = 0
    fetched: set[int] = field(default_factory=set)  # distinct block indexes


class BackupFile:
    """Backup *manifest* on *store*: each block fetched, verified (the store's codec checks
    the tag and the plaintext's hash) and cached when first read."""

    def __init__(self, store: BackupStore, manifest: bfmt.Manifest,
                 cache_bytes: int = CACHE_BYTES) -> None:
        if (manifest.key_id or None) != (store.key.key_id if store.key else None):
            raise FailedPrecondition(
                f"backup {manifest.id} is encrypted with key {manifest.key_id}; the target's "
                "key is " + (store.key.key_id if store.key else "not set")
                if manifest.key_id else f"backup {manifest.id} is not encrypted; the target "
                "has a key")
        self.store = store
        self.manifest = manifest
        self.size = manifest.size
        self.codec = BlockCodec(manifest.compression, store.key)
        self.blocks = dict(manifest.blocks)
        self.capacity = max(1, cache_bytes // manifest.block_size)
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[int, threading.Event] = {}
        self.counters = _Counters()

    def _block(self, index: int) -> bytes:
        block_size = self.manifest.block_size
        expected = min(block_size, self.size - index * block_size)
        block_id = self.blocks.get(index)
        if block_id is None:
            return bytes(expected)
        while True:
            with self._lock:
                data = self._cache.get(index)
                if data is not None:
                    self._cache.move_to_end(index)
                    self.counters.cache_hits += 1
                    return data
                waiting = self._loading.get(index)
                if waiting is None:
                    self._loading[index] = threading.Event()
                    break
            waiting.wait()  # another thread fetches it: then from the cache
        try:
            data = fetch_block(self.store, self.manifest, self.codec, index, block_id)
            with self._lock:
                self._cache[index] = data
                while len(self._cache) > self.capacity:
                    self._cache.popitem(last=False)
                self.counters.fetched_blocks += 1
                self.counters.fetched_bytes += len(data)
                self.counters.fetched.add(index)
            return data
        finally:
            with self._lock:
                self._loading.pop(index).set()

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        block_size = self.manifest.block_size
        parts = []
        position = offset
        while position < offset + length:
            index = position // block_size
            data = self._block(index)
            start = position - index * block_size
            piece = data[start:start + offset + length - position]
            parts.append(piece)
            position += len(piece)
        with self._lock:
            self.counters.reads += 1
        return b"".join(parts)

    def statistics(self) -> dict[str, Any]:
        with self._lock:
            return {"reads": self.counters.reads,
                    "fetched_blocks": self.counters.fetched_blocks,
                    "distinct_blocks": len(self.counters.fetched),
                    "fetched_bytes": self.counters.fetched_bytes,
                    "cache_hits": self.counters.cache_hits,
                    "cached_blocks": len(self._cache),
                    "backup_blocks": len(self.blocks), "block_size": self.manifest.block_size}

    def close(self) -> None:
        """Nothing is held open between reads."""

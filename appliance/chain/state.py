"""The state record: the replica's generation and revision counter.

* ``generation`` rises each time a new engine session takes the replica (DESIGN invariant 4:
  a replica refuses an engine of an older generation).
* ``revision`` rises by one for every data change (write, write-zeroes, unmap). Replicas of
  a volume that were equal and then received the same writes have equal revisions; a replica
  that stopped receiving writes has a smaller one. Salvage uses it to pick the replica that
  holds every acknowledged write (invariant 7).

The record lives in the 4096-byte file ``state``, mapped into memory: bumping the revision on
every write is a store into the page cache, with no system call, yet survives a crash of the
process. :meth:`StateRecord.sync` (called by every flush) makes it durable. The record is
written twice, in two sectors, each copy with its own CRC, so a torn write of the page can
damage at most one copy.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import zlib

from appliance.chain.durable import create_sparse
from appliance.chain.format import STATE_FILE
from appliance.errors import Corruption, InvalidArgument

STATE_SIZE = 4096
SLOT_OFFSETS = (0, 2048)
MAGIC = b"APLSTATE"
STATE_VERSION = 1
#: magic, version, reserved (zero), generation, revision; then a CRC-32 of those 32 bytes.
_PAYLOAD = struct.Struct("<8sIIQQ")
_CRC = struct.Struct("<I")
RECORD_SIZE = _PAYLOAD.size + _CRC.size


def encode_record(generation: int, revision: int) -> bytes:
    payload = _PAYLOAD.pack(MAGIC, STATE_VERSION, 0, generation, revision)
    return payload + _CRC.pack(zlib.crc32(payload))


def decode_record(data: bytes) -> tuple[int, int] | None:
    """Return ``(generation, revision)`` of a valid record copy, else ``None``."""
    payload = data[: _PAYLOAD.size]
    (crc,) = _CRC.unpack_from(data, _PAYLOAD.size)
    if zlib.crc32(payload) != crc:
        return None
    magic, version, _reserved, generation, revision = _PAYLOAD.unpack(payload)
    if magic != MAGIC or version != STATE_VERSION:
        return None
    return generation, revision


def create_state_file(dir_fd: int) -> None:
    fd = create_sparse(dir_fd, STATE_FILE, STATE_SIZE)
    try:
        record = encode_record(0, 0)
        for offset in SLOT_OFFSETS:
            os.pwrite(fd, record, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_state_file(dir_fd: int) -> tuple[int, int]:
    """Read ``(generation, revision)`` without mapping the file (for read-only use)."""
    fd = os.open(STATE_FILE, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return best_record(os.pread(fd, STATE_SIZE, 0))
    finally:
        os.close(fd)


def best_record(page: bytes) -> tuple[int, int]:
    """``(generation, revision)`` of the newest valid copy in the state file's *page*; a
    Corruption when both copies are damaged (one torn write damages at most one)."""
    if len(page) < STATE_SIZE:
        raise Corruption(f"{STATE_FILE}: truncated to {len(page)} bytes")
    copies = [decode_record(page[offset: offset + RECORD_SIZE]) for offset in SLOT_OFFSETS]
    valid = [copy for copy in copies if copy is not None]
    if not valid:
        raise Corruption(f"{STATE_FILE}: both copies of the state record are damaged")
    return max(valid)


class StateRecord:
    """The mapped, writable state record of an open replica."""

    def __init__(self, dir_fd: int) -> None:
        fd = os.open(STATE_FILE, os.O_RDWR | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            self._map = mmap.mmap(fd, STATE_SIZE, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self._lock = threading.Lock()
        self.generation, self.revision = best_record(self._map[:STATE_SIZE])

    def _store(self) -> None:
        record = encode_record(self.generation, self.revision)
        mapped = self._map
        mapped[0:RECORD_SIZE] = record
        mapped[SLOT_OFFSETS[1]: SLOT_OFFSETS[1] + RECORD_SIZE] = record

    def bump(self) -> None:
        """Count one data change."""
        with self._lock:
            self.revision += 1
            self._store()

    def set_revision(self, revision: int) -> None:
        """Adopt *revision* (a rebuilt replica takes its source's count), durably."""
        with self._lock:
            self.revision = revision
            self._store()
            self._map.flush()

    def set_generation(self, generation: int) -> None:
        with self._lock:
            if generation < self.generation:
                raise InvalidArgument(f"generation {generation} is older than the replica's "
                                      f"generation {self.generation}")
            self.generation = generation
            self._store()
            self._map.flush()

    def sync(self) -> None:
        self._map.flush()

    def close(self) -> None:
        if not self._map.closed:
            self._map.flush()
            self._map.close()

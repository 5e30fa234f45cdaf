"""Checksums of immutable layers, for rebuild comparison and bit-rot detection.

A layer's content is cut into 1 MiB chunks. A chunk that holds data has a digest: sha256 of
its allocation bitmap (one bit per 4 KiB block, least significant bit first) followed by the
bytes of its allocated blocks. The layer digest is sha256 of a header naming the layer size
and chunk size followed by every (chunk number, chunk digest) pair in order. Allocation is
part of the digest because a written block of zeros and a hole differ: the first hides the
layers below, the second does not. sha256 is chosen because it runs at ~1.7 GB/s on CPUs with
SHA extensions (faster than blake2b in Python's hashlib) and is collision resistant, so equal
digests prove equal layers.

The chunk digests are stored in ``layer-NNNNNN.sum`` (see docs/replica-format.md) so that
a damaged chunk can be named and so two replicas can find the chunks in which they differ;
the layer digest is also kept in the metadata, which is authoritative.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from appliance.chain.durable import atomic_replace
from appliance.chain.format import BLOCK_SIZE, checksum_file_name
from appliance.chain.layerfile import LayerFile
from appliance.errors import Corruption

CHUNK_SIZE = 1 << 20
BLOCKS_PER_CHUNK = CHUNK_SIZE // BLOCK_SIZE
SUM_MAGIC = b"APLSUMS\x00"
SUM_VERSION = 1
DIGEST_PREFIX = "sha256:"
#: magic, version, chunk size, layer size, number of records, layer digest
_HEADER = struct.Struct("<8sIIQQ32s")
#: chunk number, chunk digest
_RECORD = struct.Struct("<Q32s")
_DIGEST_DOMAIN = b"appliance-layer-v1"


@dataclass(frozen=True)
class LayerChecksum:
    size: int
    chunks: dict[int, bytes]

    @property
    def digest(self) -> str:
        hasher = hashlib.sha256(_DIGEST_DOMAIN)
        hasher.update(struct.pack("<QI", self.size, CHUNK_SIZE))
        for number in sorted(self.chunks):
            hasher.update(_RECORD.pack(number, self.chunks[number]))
        return DIGEST_PREFIX + hasher.hexdigest()


def _chunk_runs(layer: LayerFile) -> Iterator[tuple[int, list[tuple[int, int]]]]:
    """Yield ``(chunk number, [(first, last) block runs inside it])`` for chunks with data."""
    current: int | None = None
    runs: list[tuple[int, int]] = []
    for run_first, last in layer.block_runs():
        first = run_first
        while first < last:
            chunk = first // BLOCKS_PER_CHUNK
            stop = min(last, (chunk + 1) * BLOCKS_PER_CHUNK)
            if chunk != current:
                if current is not None:
                    yield current, runs
                current, runs = chunk, []
            runs.append((first, stop))
            first = stop
    if current is not None:
        yield current, runs


def compute(layer: LayerFile, progress: Callable[[int], None] | None = None
            ) -> LayerChecksum:
    """Read the whole layer and compute its checksum; *progress* is called with the bytes
    read after each chunk (a scrub's rate limit and cancellation)."""
    chunks: dict[int, bytes] = {}
    for number, runs in _chunk_runs(layer):
        bitmap, data = _read_runs(layer, number, runs)
        chunks[number] = chunk_digest(bitmap, data)
        if progress is not None:
            progress(len(data))
    return LayerChecksum(layer.size, chunks)


def chunk_digest(bitmap: int, data: bytes | bytearray) -> bytes:
    """The digest of a chunk whose allocated blocks (*bitmap*, bit *i*: block *i* of the
    chunk) hold *data*, in order."""
    hasher = hashlib.sha256(bitmap.to_bytes(BLOCKS_PER_CHUNK // 8, "little"))
    hasher.update(data)
    return hasher.digest()


def bitmap_runs(bitmap: int) -> list[tuple[int, int]]:
    """The runs ``(first, end)`` of set bits of *bitmap* (block numbers in the chunk)."""
    runs: list[tuple[int, int]] = []
    block = 0
    while bitmap >> block:
        if bitmap >> block & 1:
            start = block
            while bitmap >> block & 1:
                block += 1
            runs.append((start, block))
        else:
            block += 1
    return runs


def _read_runs(layer: LayerFile, number: int, runs: list[tuple[int, int]]
               ) -> tuple[int, bytes]:
    base = number * BLOCKS_PER_CHUNK
    bitmap = 0
    data = bytearray()
    for first, last in runs:
        bitmap |= ((1 << (last - first)) - 1) << (first - base)
        length = (last - first) * BLOCK_SIZE
        piece = os.pread(layer.fd, length, first * BLOCK_SIZE)
        if len(piece) != length:
            raise Corruption(f"layer {layer.id}: short read at block {first}")
        data += piece
    return bitmap, bytes(data)


def read_chunk(layer: LayerFile, number: int) -> tuple[int, bytes]:
    """Chunk *number* of *layer*: its allocation bitmap and the bytes of its allocated
    blocks, in order (what its digest is computed over)."""
    base = number * BLOCKS_PER_CHUNK
    return _read_runs(layer, number, list(layer.block_runs(base, base + BLOCKS_PER_CHUNK)))


def rewrite_chunk(layer: LayerFile, number: int, bitmap: int, data: bytes) -> None:
    """Write *data* over the allocated blocks (*bitmap*) of chunk *number*, durably. The
    caller has checked that the chunk's allocation is *bitmap* already: only the bytes of
    blocks the layer holds are rewritten, so the layer's allocation never changes."""
    base = number * BLOCKS_PER_CHUNK
    position = 0
    for first, end in bitmap_runs(bitmap):
        length = (end - first) * BLOCK_SIZE
        piece = data[position:position + length]
        if len(piece) != length or os.pwrite(layer.fd, piece,
                                             (base + first) * BLOCK_SIZE) != length:
            raise Corruption(f"layer {layer.id}: chunk {number}: short write")
        position += length
    if position != len(data):
        raise Corruption(f"layer {layer.id}: chunk {number}: {len(data)} bytes given for "
                         f"{position} bytes of allocated blocks")
    os.fsync(layer.fd)


def differing_chunks(a: LayerChecksum, b: LayerChecksum) -> list[int]:
    """Chunk numbers whose digests differ (or exist on one side only)."""
    numbers = a.chunks.keys() | b.chunks.keys()
    return sorted(n for n in numbers if a.chunks.get(n) != b.chunks.get(n))


def chunk_ranges(numbers: list[int], size: int) -> list[tuple[int, int]]:
    """Merge chunk numbers into byte ranges ``(offset, length)`` clipped to *size*."""
    ranges: list[tuple[int, int]] = []
    for number in numbers:
        start, end = number * CHUNK_SIZE, min((number + 1) * CHUNK_SIZE, size)
        if ranges and ranges[-1][0] + ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], end - ranges[-1][0])
        else:
            ranges.append((start, end - start))
    return ranges


def encode(checksum: LayerChecksum) -> bytes:
    digest = bytes.fromhex(checksum.digest.removeprefix(DIGEST_PREFIX))
    parts = [_HEADER.pack(SUM_MAGIC, SUM_VERSION, CHUNK_SIZE, checksum.size,
                          len(checksum.chunks), digest)]
    parts += [_RECORD.pack(n, checksum.chunks[n]) for n in sorted(checksum.chunks)]
    return b"".join(parts)


def decode(data: bytes, where: str) -> LayerChecksum:
    if len(data) < _HEADER.size:
        raise Corruption(f"{where}: truncated header")
    magic, version, chunk_size, size, count, digest = _HEADER.unpack_from(data)
    if magic != SUM_MAGIC or version != SUM_VERSION or chunk_size != CHUNK_SIZE:
        raise Corruption(f"{where}: not a version {SUM_VERSION} checksum file")
    if len(data) != _HEADER.size + count * _RECORD.size:
        raise Corruption(f"{where}: {len(data)} bytes where {count} records need "
                         f"{_HEADER.size + count * _RECORD.size}")
    chunks = dict(_RECORD.iter_unpack(data[_HEADER.size:]))
    checksum = LayerChecksum(size, chunks)
    if checksum.digest != DIGEST_PREFIX + digest.hex() or len(chunks) != count:
        raise Corruption(f"{where}: the records do not match the stored digest")
    return checksum


def store(dir_fd: int, layer_id: int, checksum: LayerChecksum) -> None:
    atomic_replace(dir_fd, checksum_file_name(layer_id), encode(checksum), mode=0o600)


def load(dir_fd: int, layer_id: int) -> LayerChecksum:
    name = checksum_file_name(layer_id)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError as exc:
        raise Corruption(f"{name}: missing") from exc
    try:
        with os.fdopen(fd, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise Corruption(f"{name}: unreadable ({exc.strerror})") from exc
    return decode(data, name)


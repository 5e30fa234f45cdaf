"""Block objects: every compression with and without encryption round-trips; every kind of
damage, and a wrong key, is detected and named; nothing unverified comes out."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from appliance.backup.codec import HEADER, BlockCodec, BlockDamaged
from appliance.backup.keys import BackupKey, load_key
from appliance.errors import FailedPrecondition, InvalidArgument

KEY = BackupKey.from_bytes(bytes(range(32)))
OTHER = BackupKey.from_bytes(bytes(range(1, 33)))
COMPRESSIBLE = b"appliance block " * 131072  # 2 MiB
RANDOM = os.urandom(1 << 20)


@pytest.mark.parametrize("compression", ["none", "lz4", "zstd"])
@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
@pytest.mark.parametrize("data", [COMPRESSIBLE, RANDOM, b"x"], ids=["text", "random", "1B"])
def test_round_trip(compression: str, key: BackupKey | None, data: bytes) -> None:
    codec = BlockCodec(compression, key)
    encoded = codec.encode(data)
    assert codec.decode(encoded.block_id, encoded.data) == data
    if key is None:
        assert encoded.block_id == hashlib.sha256(data).hexdigest()
    else:
        assert encoded.block_id != hashlib.sha256(data).hexdigest()  # keyed: reveals nothing
        if len(data) >= 64:  # (one byte may occur in any ciphertext by chance)
            assert data[:64] not in encoded.data
    if compression != "none" and data is COMPRESSIBLE:
        assert encoded.stored_compressed and len(encoded.data) < len(data) // 10
    if data is RANDOM:
        assert not encoded.stored_compressed  # incompressible: stored as is


def test_same_block_same_id_across_codecs() -> None:
    assert BlockCodec("lz4").block_id(RANDOM) == BlockCodec("zstd").block_id(RANDOM)
    assert BlockCodec("lz4", KEY).block_id(RANDOM) == BlockCodec("none", KEY).block_id(RANDOM)
    assert BlockCodec("lz4", KEY).block_id(RANDOM) != BlockCodec("lz4", OTHER).block_id(RANDOM)


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
def test_damage_is_detected(key: BackupKey | None) -> None:
    codec = BlockCodec("lz4", key)
    encoded = codec.encode(COMPRESSIBLE)
    data, block_id = encoded.data, encoded.block_id
    damaged = {
        "flipped": data[:-100] + bytes([data[-100] ^ 1]) + data[-99:],
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "magic": b"XXXX" + data[4:],
        "version": data[:4] + b"\x09" + data[5:],
        "header length": data[:8] + (1).to_bytes(4, "big") + data[12:],
    }
    for bad in damaged.values():
        with pytest.raises(BlockDamaged, match=block_id[:16]):
            codec.decode(block_id, bad)
    other = codec.encode(RANDOM)
    with pytest.raises(BlockDamaged):  # an object under another block's name
        codec.decode(block_id, other.data)


def test_wrong_key_and_missing_key() -> None:
    encoded = BlockCodec("zstd", KEY).encode(COMPRESSIBLE)
    with pytest.raises(BlockDamaged, match="another key"):
        BlockCodec("zstd", OTHER).decode(encoded.block_id, encoded.data)
    with pytest.raises(InvalidArgument, match="no key"):
        BlockCodec("zstd").decode(encoded.block_id, encoded.data)
    plain = BlockCodec("zstd").encode(COMPRESSIBLE)
    with pytest.raises(BlockDamaged, match="not encrypted"):
        BlockCodec("zstd", KEY).decode(plain.block_id, plain.data)


def test_header_layout() -> None:
    encoded = BlockCodec("none").encode(b"abc")
    assert HEADER.size == 16
    assert encoded.data[:8] == b"APBK\x01\x00\x00\x00"
    assert encoded.data[8:12] == (3).to_bytes(4, "big") and encoded.data[16:] == b"abc"


def test_unknown_compression() -> None:
    with pytest.raises(InvalidArgument, match="unknown compression 'gzip'"):
        BlockCodec("gzip")


def test_key_files(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.write_bytes(bytes(range(32)))
    raw.chmod(0o600)
    hexed = tmp_path / "hex"
    hexed.write_text(bytes(range(32)).hex() + "\n")
    hexed.chmod(0o600)
    assert load_key(raw).key_id == load_key(hexed).key_id == KEY.key_id
    assert len(KEY.key_id) == 16 and KEY.key_id != OTHER.key_id
    newline_key = tmp_path / "newline"
    newline_key.write_bytes(bytes(31) + b"\n")  # a raw key may end in 0x0a
    newline_key.chmod(0o600)
    assert load_key(newline_key).key_id == BackupKey.from_bytes(bytes(31) + b"\n").key_id
    short = tmp_path / "short"
    short.write_bytes(b"0123456789")
    short.chmod(0o600)
    with pytest.raises(InvalidArgument, match="32 bytes or 64 hex digits"):
        load_key(short)
    loose = tmp_path / "loose"
    loose.write_bytes(bytes(32))
    loose.chmod(0o644)
    with pytest.raises(FailedPrecondition, match="0600"):
        load_key(loose)
    assert repr(KEY) == f"BackupKey(key_id='{KEY.key_id}')"  # keys never printed


@pytest.mark.parametrize("compression", ["lz4", "zstd"])
def test_one_codec_many_threads(compression: str) -> None:
    """Backups share a codec between worker threads (zstandard's contexts must not be)."""
    import concurrent.futures  # noqa: PLC0415

    codec = BlockCodec(compression, KEY)
    blocks = [os.urandom(4096) * 64 for _ in range(64)]

    def round_trip(block: bytes) -> bool:
        encoded = codec.encode(block)
        return codec.decode(encoded.block_id, encoded.data) == block

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert all(pool.map(round_trip, blocks * 4))

"""Block objects (docs/backup-format.md, "Block objects"): id, compression, authenticated
encryption, and the checks every read makes. Pure: no I/O, no framework."""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import threading
from dataclasses import dataclass

import lz4.frame
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from appliance.backup.keys import BackupKey
from appliance.errors import Corruption, InvalidArgument

MAGIC = b"APBK"
VERSION = 1
HEADER = struct.Struct(">4sBBBBII")  # magic, version, compression, encryption, 0, length, 0
NONCE_BYTES = 12
TAG_BYTES = 16
COMPRESSIONS = {"none": 0, "lz4": 1, "zstd": 2}
_NAMES = {number: name for name, number in COMPRESSIONS.items()}
ENCRYPTION_NONE, ENCRYPTION_AES_GCM = 0, 1
MAX_BLOCK = 64 << 20


class BlockDamaged(Corruption):
    """A block object failed a check; the message names the block and the check."""


@dataclass(frozen=True)
class Encoded:
    block_id: str
    data: bytes  # the object's bytes
    stored_compressed: bool


class BlockCodec:
    """Encodes and decodes the block objects of one backup volume."""

    def __init__(self, compression: str = "lz4", key: BackupKey | None = None) -> None:
        if compression not in COMPRESSIONS:
            raise InvalidArgument(f"unknown compression {compression!r}: one of "
                                  f"{', '.join(COMPRESSIONS)}")
        self.compression = compression
        self.key = key
        self._aead = AESGCM(key.data_key) if key else None
        # zstandard's (de)compressors must not be shared between threads: one per thread
        self._local = threading.local()

    def _zstd(self) -> zstandard.ZstdCompressor:
        compressor = getattr(self._local, "compressor", None)
        if compressor is None:
            compressor = self._local.compressor = zstandard.ZstdCompressor(level=3)
        return compressor

    def _unzstd(self) -> zstandard.ZstdDecompressor:
        decompressor = getattr(self._local, "decompressor", None)
        if decompressor is None:
            decompressor = self._local.decompressor = zstandard.ZstdDecompressor()
        return decompressor

    @property
    def hash_name(self) -> str:
        return "hmac-sha256" if self.key else "sha256"

    def block_id(self, plaintext: bytes | memoryview) -> str:
        if self.key is not None:
            return hmac.new(self.key.id_key, plaintext, hashlib.sha256).hexdigest()
        return hashlib.sha256(plaintext).hexdigest()

    def _compress(self, plaintext: bytes | memoryview) -> tuple[int, bytes]:
        if self.compression == "lz4":
            packed = lz4.frame.compress(plaintext, store_size=False)
        elif self.compression == "zstd":
            packed = self._zstd().compress(plaintext)
        else:
            return 0, bytes(plaintext)
        if len(packed) >= len(plaintext):
            return 0, bytes(plaintext)  # incompressible: stored as is
        return COMPRESSIONS[self.compression], packed

    def encode(self, plaintext: bytes | memoryview, block_id: str | None = None) -> Encoded:
        if not 0 < len(plaintext) <= MAX_BLOCK:
            raise InvalidArgument(f"a block of {len(plaintext)} bytes")
        block_id = block_id or self.block_id(plaintext)
        method, payload = self._compress(plaintext)
        encryption = ENCRYPTION_AES_GCM if self._aead else ENCRYPTION_NONE
        header = HEADER.pack(MAGIC, VERSION, method, encryption, 0, len(plaintext), 0)
        if self._aead is not None:
            nonce = os.urandom(NONCE_BYTES)
            payload = nonce + self._aead.encrypt(nonce, payload,
                                                 header + bytes.fromhex(block_id))
        return Encoded(block_id, header + payload, method != 0)

    def decode(self, block_id: str, data: bytes) -> bytes:
        """The verified plaintext of block *block_id* from its object's bytes."""
        method, encryption, length = self._header(block_id, data)
        payload = self._decrypt(block_id, data, encryption)
        try:
            if method == 1:
                plaintext = bytes(lz4.frame.decompress(payload))
            elif method == 2:
                plaintext = self._unzstd().decompress(payload, max_output_size=length)
            else:
                plaintext = bytes(payload)
        except (RuntimeError, zstandard.ZstdError) as exc:
            raise BlockDamaged(f"block {block_id}: cannot be decompressed ({exc})") from exc
        if len(plaintext) != length:
            raise BlockDamaged(f"block {block_id}: {len(plaintext)} bytes, the header says "
                               f"{length}")
        if not hmac.compare_digest(self.block_id(plaintext), block_id):
            raise BlockDamaged(f"block {block_id}: content does not match its id")
        return plaintext

    @staticmethod
    def _header(block_id: str, data: bytes) -> tuple[int, int, int]:
        if len(data) < HEADER.size:
            raise BlockDamaged(f"block {block_id}: {len(data)} bytes, shorter than a header")
        magic, version, method, encryption, _, length, _ = HEADER.unpack_from(data)
        if magic != MAGIC:
            raise BlockDamaged(f"block {block_id}: not a block object (bad magic)")
        if version != VERSION:
            raise BlockDamaged(f"block {block_id}: unknown format version {version}")
        if method not in _NAMES:
            raise BlockDamaged(f"block {block_id}: unknown compression {method}")
        if encryption not in (ENCRYPTION_NONE, ENCRYPTION_AES_GCM):
            raise BlockDamaged(f"block {block_id}: unknown encryption {encryption}")
        if not 0 < length <= MAX_BLOCK:
            raise BlockDamaged(f"block {block_id}: implausible length {length}")
        return method, encryption, length

    def _decrypt(self, block_id: str, data: bytes, encryption: int) -> bytes:
        payload = data[HEADER.size:]
        if encryption == ENCRYPTION_NONE:
            if self._aead is not None:
                raise BlockDamaged(f"block {block_id} is not encrypted, but the backup "
                                   "volume is")
            return payload
        if self._aead is None:
            raise InvalidArgument(f"block {block_id} is encrypted and no key was given")
        if len(payload) < NONCE_BYTES + TAG_BYTES:
            raise BlockDamaged(f"block {block_id}: truncated")
        try:
            return self._aead.decrypt(payload[:NONCE_BYTES], payload[NONCE_BYTES:],
                                      data[:HEADER.size] + bytes.fromhex(block_id))
        except InvalidTag:
            raise BlockDamaged(f"block {block_id}: authentication failed (damaged, or "
                               "encrypted with another key)") from None

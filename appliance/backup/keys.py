"""Backup encryption keys (docs/backup-format.md, "Encryption keys"): read from a 0600 file,
expanded with HKDF-SHA-256 into the data key, the block-id key and the key id."""

from __future__ import annotations

import binascii
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from appliance.errors import InvalidArgument
from appliance.secrets import read_private_file

KEY_BYTES = 32


def _derive(key: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(key)


@dataclass(frozen=True)
class BackupKey:
    data_key: bytes = field(repr=False)
    id_key: bytes = field(repr=False)
    key_id: str

    @classmethod
    def from_bytes(cls, key: bytes) -> BackupKey:
        if len(key) != KEY_BYTES:
            raise InvalidArgument(f"a backup encryption key is {KEY_BYTES} bytes "
                                  f"(or {2 * KEY_BYTES} hex digits), not {len(key)}")
        return cls(_derive(key, b"appliance-backup data v1"),
                   _derive(key, b"appliance-backup id v1"),
                   _derive(key, b"appliance-backup key-id v1", 8).hex())


def load_key(path: str | Path) -> BackupKey:
    """The key in *path*: 32 raw bytes, or 64 hex digits (a final newline ignored), in a
    file only its owner can read."""
    raw = read_private_file(path, 4 * KEY_BYTES)
    if len(raw) != KEY_BYTES:
        text = raw.strip()
        if len(text) != 2 * KEY_BYTES:
            raise InvalidArgument(f"key file {path} must hold {KEY_BYTES} bytes or "
                                  f"{2 * KEY_BYTES} hex digits, not {len(raw)} bytes")
        try:
            raw = binascii.unhexlify(text)
        except binascii.Error:
            raise InvalidArgument(f"key file {path}: {2 * KEY_BYTES} characters that are "
                                  "not all hex digits") from None
    return BackupKey.from_bytes(raw)

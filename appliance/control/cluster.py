"""The cluster key: what a node needs, beside the etcd addresses, to join a cluster
(docs/cluster.md, "Secrets").

The key is 32 random bytes kept hex-encoded in a file of mode 0600. Everything secret a
cluster shares is derived from it (HKDF-SHA256, one *purpose* string each) or sealed with
it, so that etcd never holds a secret in plain text:

- the API token every node accepts (``api_token``), written by each node to its
  ``DATA_DIR/token``;
- a key check stored in etcd (``key_check``): an HMAC of a fixed string, which tells a
  node started with another cluster's key to stop, and tells nothing about the key;
- volume secrets, sealed with AES-256-GCM (``seal``/``unseal``); the store key they are
  kept under is the associated data, so that a sealed value moved to another key does
  not open.

Pure and blocking (files, no trio): the daemon calls it from worker threads.
"""

from __future__ import annotations

import base64
import hmac
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from appliance.errors import Corruption, InvalidArgument, NotFound
from appliance.secrets import read_private_file, write_secret_file

KEY_BYTES = 32
NONCE_BYTES = 12


def create_key(path: Path) -> bytes:
    """A new cluster key in *path* (mode 0600; AlreadyExists-safe: an existing file wins)."""
    key = os.urandom(KEY_BYTES)
    try:
        write_secret_file(path, key.hex().encode() + b"\n")
    except FileExistsError:
        return read_key(path)
    return key


def read_key(path: Path) -> bytes:
    """The cluster key in *path* (a file only its owner can read); a clear error when it
    is missing, open to others, or not a key."""
    try:
        text = read_private_file(path, 256).decode(errors="replace").strip()
    except NotFound:
        raise NotFound(f"cluster key file {path} does not exist: copy it from a node of the "
                       "cluster (the first node of a new cluster creates it)") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise InvalidArgument(f"cluster key file {path} does not hold a cluster key "
                              f"({KEY_BYTES * 2} hex digits)")
    return key


def derive(key: bytes, purpose: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=f"appliance cluster {purpose}".encode()).derive(key)


def api_token(key: bytes) -> str:
    return derive(key, "api token").hex()


def key_check(key: bytes) -> str:
    return hmac.new(derive(key, "key check"), b"appliance cluster key", "sha256").hexdigest()


def seal(key: bytes, secret: bytes, context: str) -> dict[str, str]:
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(derive(key, "secrets")).encrypt(nonce, secret, context.encode())
    return {"nonce": base64.b64encode(nonce).decode(),
            "sealed": base64.b64encode(sealed).decode()}


def unseal(key: bytes, value: dict[str, str], context: str) -> bytes:
    try:
        nonce = base64.b64decode(value["nonce"], validate=True)
        sealed = base64.b64decode(value["sealed"], validate=True)
        return AESGCM(derive(key, "secrets")).decrypt(nonce, sealed, context.encode())
    except (KeyError, TypeError, ValueError, InvalidTag):
        raise Corruption(f"the sealed secret {context} does not open with this cluster's "
                         "key") from None

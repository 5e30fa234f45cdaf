"""Opening the backup store of the node's target: its URL and flags as the state store
keeps them, its credentials and encryption key from the node's secrets directory (files,
mode 0600: never in the state store, a log or an argument)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from appliance.backup.keys import BackupKey
from appliance.backup.store import BackupStore
from appliance.backup.targets import open_target, parse_target
from appliance.secrets import read_secret_file

CREDENTIALS_FILE = "backup-credentials"
KEY_FILE = "backup-key"


@contextlib.contextmanager
def open_backup_store(value: dict[str, Any], secrets_dir: Path) -> Iterator[BackupStore]:
    """Blocking: the backup store on the target *value* (``{"url", "credentials",
    "key_id"}``), with the secrets kept in *secrets_dir*."""
    spec = parse_target(value["url"])
    key = None
    if value.get("key_id"):
        key = BackupKey.from_bytes(bytes.fromhex(
            read_secret_file(secrets_dir / KEY_FILE).decode()))
    credentials = secrets_dir / CREDENTIALS_FILE if value.get("credentials") else None
    with open_target(spec, credentials) as target:
        yield BackupStore(target, key)

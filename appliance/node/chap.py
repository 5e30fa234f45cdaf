"""Where the iSCSI CHAP credentials live, and the targets' names.

* One node: files of the node, 0600, in ``DATA_DIR/iscsi/``: ``<volume>.chap`` for a
  volume's own credentials, ``.global.chap`` for the node's (made on first use: CHAP is
  required on every target).
* A cluster: sealed with the cluster's key in the state store (``/iscsi-chap/<volume>``
  and ``/iscsi-chap-global``), so that the node a target moves to can serve it.

Secrets never leave this module except towards tgtd's management socket.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import string
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from appliance.control import cluster
from appliance.control.store import StateStore
from appliance.errors import Conflict, NotFound
from appliance.frontend.iscsi import Credentials, target_name
from appliance.node.config import NodeConfig
from appliance.secrets import read_private_file, write_secret_file

T = TypeVar("T")
PREFIX = "/iscsi-chap/"
GLOBAL_KEY = "/iscsi-chap-global"
GLOBAL_USER = "appliance"
_ALPHABET = string.ascii_letters + string.digits


class ChapKeeper:
    def __init__(self, store: StateStore, config: NodeConfig, cluster_key: bytes | None,
                 thread: Callable[..., Awaitable[Any]]) -> None:
        self.store = store
        self.config = config
        self.cluster_key = cluster_key
        self.thread = thread

    @property
    def directory(self) -> Path:
        return self.config.data_dir / "iscsi"

    def iqn(self, volume: str) -> str:
        """The volume's IQN: the node's name alone; in a cluster a name derived from the
        cluster's key (the same on every node, so that a target keeps its name when it
        moves)."""
        if self.cluster_key is None:
            return target_name(self.config.node_name, volume)
        tag = hmac.new(self.cluster_key, b"iscsi-name", hashlib.sha256).hexdigest()[:12]
        return target_name(f"cluster-{tag}", volume)

    async def credentials(self, volume: str, own: bool) -> Credentials:
        """The credentials initiators use for *volume*: its own (*own*) or the node's."""
        if own:
            found = await self._read(PREFIX + volume, self.directory / f"{volume}.chap")
            if found is None:
                raise NotFound(f"volume {volume}'s CHAP credentials are missing; attach it "
                               "again with --chap-user and --chap-secret-file")
            return found
        found = await self._read(GLOBAL_KEY, self.directory / ".global.chap")
        if found is None:
            made = Credentials(GLOBAL_USER, "".join(secrets.choice(_ALPHABET)
                                                    for _ in range(16)))
            with contextlib.suppress(Conflict, FileExistsError):  # made meanwhile: that one
                await self._write(GLOBAL_KEY, self.directory / ".global.chap", made,
                                  replace=False)
            found = await self._read(GLOBAL_KEY, self.directory / ".global.chap")
            assert found is not None
        return found

    async def keep(self, volume: str, credentials: Credentials) -> None:
        await self._write(PREFIX + volume, self.directory / f"{volume}.chap", credentials,
                          replace=True)

    async def forget(self, volume: str) -> None:
        if self.cluster_key is None:
            (self.directory / f"{volume}.chap").unlink(missing_ok=True)
        else:
            await self.store.delete(PREFIX + volume)

    async def _read(self, key: str, path: Path) -> Credentials | None:
        if self.cluster_key is None:
            try:
                text = await self.thread(read_private_file, path, 8192)
            except NotFound:
                return None
            return Credentials.from_json(text)
        entry = await self.store.get(key)
        if entry is None:
            return None
        text = await self.thread(cluster.unseal, self.cluster_key, entry.value, key)
        return Credentials.from_json(text)

    async def _write(self, key: str, path: Path, credentials: Credentials, *,
                     replace: bool) -> None:
        data = credentials.to_json().encode()
        if self.cluster_key is None:
            await self.thread(_write_file, path, data, replace)
            return
        sealed = await self.thread(cluster.seal, self.cluster_key, data, key)
        if replace:
            await self.store.put(key, sealed)
        else:
            await self.store.put(key, sealed, expect=0)


def _write_file(path: Path, data: bytes, replace: bool) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not replace:
        write_secret_file(path, data)
        return
    temporary = path.with_name(f".{path.name}.{os.getpid()}.new")
    temporary.unlink(missing_ok=True)
    write_secret_file(temporary, data)
    temporary.replace(path)

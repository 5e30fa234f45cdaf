"""The state store: one small interface for the cluster's state (DESIGN "Processes").

Keys are paths (``/volumes/vol1``), values are JSON objects. Every change gets the next
store-wide **revision**; an entry remembers the revision of its last change (``revision``)
and of its creation. Writes can be conditional on that revision (compare-and-swap), which
is how concurrent controllers avoid lost updates. **Watches** deliver every change under a
prefix after a given revision. **Leases** expire unless kept alive, and take the keys
attached to them along.

:class:`~appliance.control.sqlite_store.SQLiteStore` is the embedded implementation (one
node, nothing to install); :class:`~appliance.control.etcd_store.EtcdStore` keeps it in etcd
for nodes that form a cluster. Both pass the same contract tests (tests/control).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from appliance.errors import ApplianceError, Conflict

UPDATE_ATTEMPTS = 10  # reads and writes of one update before it gives up


@dataclass(frozen=True)
class Entry:
    key: str
    value: dict[str, Any]
    revision: int  # of the entry's last change
    created: int  # revision that created it
    lease: int | None = None


@dataclass(frozen=True)
class Event:
    kind: str  # "put" or "delete"
    key: str
    revision: int
    entry: Entry | None  # the new entry of a put; None for a delete


class Compacted(ApplianceError):
    """The requested revision is older than the store still remembers: list again."""

    code = "compacted"


class StateStore(abc.ABC):
    @abc.abstractmethod
    async def get(self, key: str) -> Entry | None:
        """The entry at *key*, or None."""

    @abc.abstractmethod
    async def put(self, key: str, value: dict[str, Any], *, expect: int | None = None,
                  lease: int | None = None) -> int:
        """Store *value* at *key* and return the new revision. With *expect*, only if the
        entry's revision is *expect* (0: only if the key does not exist), else raise
        :class:`~appliance.errors.Conflict`."""

    @abc.abstractmethod
    async def delete(self, key: str, *, expect: int | None = None) -> bool:
        """Delete *key* (conditionally, like :meth:`put`); False if it did not exist."""

    @abc.abstractmethod
    async def list(self, prefix: str) -> tuple[list[Entry], int]:
        """Entries whose key starts with *prefix*, sorted by key, and the store revision they
        were read at (to watch from)."""

    @abc.abstractmethod
    def watch(self, prefix: str, after: int) -> AbstractAsyncContextManager[AsyncIterator[Event]]:
        """``async with store.watch(prefix, after) as events: async for event in events``:
        every change under *prefix* with a revision greater than *after*, as it happens.
        Raises :class:`Compacted` when *after* is too old to replay."""

    async def update(self, key: str,
                     change: Callable[[dict[str, Any]], dict[str, Any] | None], *,
                     attempts: int = UPDATE_ATTEMPTS) -> Entry | None:
        """Read-modify-write of *key* that loses no concurrent change (docs/state-store.md,
        "Updates"): read the entry, call *change* with its value, write what it returns
        with ``expect`` set to the revision read; on a conflict read and call *change*
        again, at most *attempts* times, then raise :class:`~appliance.errors.Conflict`.

        *change* returns the new value, or None to leave the entry as it is (nothing is
        written); an exception it raises ends the update (nothing is written). Returns
        the entry as it is afterwards, or None when *key* does not exist (*change* is not
        called: creating is :meth:`put` with ``expect=0``)."""
        for _ in range(attempts):
            entry = await self.get(key)
            if entry is None:
                return None
            value = change(entry.value)
            if value is None:
                return entry
            try:
                revision = await self.put(key, value, expect=entry.revision, lease=entry.lease)
            except Conflict:
                continue
            return Entry(key, value, revision, entry.created, entry.lease)
        raise Conflict(f"{key} kept changing: {attempts} attempts to update it conflicted")

    @abc.abstractmethod
    async def grant_lease(self, ttl: float) -> int:
        """A new lease that expires *ttl* seconds from now unless kept alive."""

    @abc.abstractmethod
    async def keep_alive(self, lease: int) -> None:
        """Push the lease's expiry *ttl* seconds into the future (NotFound if it expired)."""

    @abc.abstractmethod
    async def revoke(self, lease: int) -> None:
        """End the lease now, deleting its keys."""

    @abc.abstractmethod
    async def run(self) -> None:
        """The store's background work (expiring leases), until cancelled."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release the store's resources (again: nothing happens)."""

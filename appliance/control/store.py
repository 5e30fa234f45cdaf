"""The state store: one small interface for the cluster's state (DESIGN "Processes").

Keys are paths (``/volumes/vol1``), values are JSON objects. Every change gets the next
store-wide **revision**; an entry remembers the revision of its last change (``revision``)
and of its creation. Writes can be conditional on that revision (compare-and-swap), which
is how concurrent controllers avoid lost updates. **Watches** deliver every change under a
prefix after a given revision. **Leases** expire unless kept alive, and take the keys
attached to them along.

:class:`~appliance.control.sqlite_store.SQLiteStore` is the embedded implementation (one
node, nothing to install); an etcd implementation goes behind the same interface.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from appliance.errors import ApplianceError


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
        """Release the store's resources."""

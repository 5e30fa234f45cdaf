"""The node's event log: what an operator should know happened, so that nobody has to read
the daemon's log: a volume's state and robustness changes, replicas failing, rebuilt and
back, salvages, refused engine starts, branches kept as volumes, snapshots, expansions,
clones and restores, backups, forced detaches; and of the node (volume ``""``): disks and
settings. The newest 1000 are kept in the state store under ``/events/<sequence>``
(docs/state-store.md)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import trio

from appliance.control.objects import Event
from appliance.control.store import StateStore
from appliance.errors import Conflict

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class EventLog:
    def __init__(self, store: StateStore) -> None:
        self.store = store
        self._lock = trio.Lock()
        self._next = 0  # the next sequence number; 0: not read from the store yet

    async def _load(self) -> None:
        """Find the next sequence number, and drop all but the newest events."""
        entries, _ = await self.store.list(Event.PREFIX)
        self._next = Event.from_dict(entries[-1].value).sequence + 1 if entries else 1
        for entry in entries[:-Event.KEEP]:
            await self.store.delete(entry.key)

    async def record(self, volume: str, kind: str, message: str) -> Event | None:
        """Add an event; the oldest beyond the newest ``Event.KEEP`` goes. Best effort:
        what happened happened, whether it could be recorded or not (None: it could not;
        the daemon's log says why)."""
        try:
            return await self._record(volume, kind, message)
        except Exception:  # the store failed: the action it reports stands
            log.exception("event not recorded: volume %s: %s: %s", volume, kind, message)
            return None

    async def _record(self, volume: str, kind: str, message: str) -> Event:
        async with self._lock:
            for _ in range(10):
                if not self._next:
                    await self._load()
                event = Event(self._next, _now(), volume, kind, message)
                try:
                    await self.store.put(event.key, event.to_dict(), expect=0)
                except Conflict:  # written by another writer of the store: read again
                    self._next = 0
                    continue
                self._next += 1
                if event.sequence > Event.KEEP:
                    await self.store.delete(Event.key_of(event.sequence - Event.KEEP))
                log.info("event: volume %s: %s: %s", volume, kind, message)
                return event
        raise Conflict("the event log keeps changing; an event was not recorded")

    async def list(self, volume: str | None = None, after: int = 0) -> list[dict[str, Any]]:
        """The events, oldest first (of one volume when *volume* is given; only those
        with a sequence number above *after*: what a follower has not seen yet)."""
        entries, _ = await self.store.list(Event.PREFIX)
        events = [Event.from_dict(e.value) for e in entries]
        return [e.to_dict() for e in events
                if (volume is None or e.volume == volume) and e.sequence > after]

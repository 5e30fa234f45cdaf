"""The embedded state store: one SQLite database in the data directory.

Every call runs on one worker thread (sqlite3 connections are not for concurrent use; a
capacity limiter of one serializes them) so the event loop never blocks on the disk.
Writes run under a trio lock that also covers publishing their events, so watchers see
changes in revision order. The database is in WAL mode with ``synchronous=FULL``: a change
is on stable storage when its call returns. Watches replay from an in-memory history of
recent events; after a restart (or beyond the history) they raise ``Compacted`` and the
caller lists again.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import trio

from appliance.control.store import Compacted, Entry, Event, StateStore
from appliance.errors import Conflict, InvalidArgument, NotFound

T = TypeVar("T")
Events = list[Event]
HISTORY = 10_000
LEASE_SWEEP = 0.5  # seconds between looks for expired leases

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('revision', 0), ('format', 1);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY, value TEXT NOT NULL, revision INTEGER NOT NULL,
    created INTEGER NOT NULL, lease INTEGER);
CREATE INDEX IF NOT EXISTS kv_lease ON kv (lease);
CREATE TABLE IF NOT EXISTS leases (id INTEGER PRIMARY KEY, ttl REAL NOT NULL,
                                   expires REAL NOT NULL);
"""


def _check_key(key: str) -> str:
    if not key.startswith("/") or "\0" in key or len(key) > 1024:
        raise InvalidArgument(f"invalid store key {key[:60]!r}")
    return key


class SQLiteStore(StateStore):
    def __init__(self, db: sqlite3.Connection, *, inline: bool = False) -> None:
        self._db = db
        self._inline = inline
        self._limiter = trio.CapacityLimiter(1)
        self._write_lock = trio.Lock()
        self._history: deque[Event] = deque(maxlen=HISTORY)
        self._history_start = self._revision_now()
        self._watchers: list[tuple[str, trio.MemorySendChannel[Event]]] = []

    @classmethod
    async def open(cls, path: str | Path, *, inline: bool = False) -> SQLiteStore:
        """The store in the database file *path*. Statements run in a worker thread; with
        *inline*, in the caller's (for runs on trio's autojump clock, which jumps whenever
        every task waits, a task waiting on a worker thread too: inline, a statement is
        never a wait)."""
        def connect() -> sqlite3.Connection:
            db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            Path(path).chmod(0o600)
            return db

        return cls(await trio.to_thread.run_sync(connect), inline=inline)

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        if self._inline:
            await trio.lowlevel.checkpoint()
            return function(*args)
        return await trio.to_thread.run_sync(function, *args, limiter=self._limiter)

    def _revision_now(self) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE name='revision'")
                   .fetchone()[0])

    @staticmethod
    def _entry(row: tuple[Any, ...]) -> Entry:
        key, value, revision, created, lease = row
        return Entry(key, json.loads(value), revision, created, lease)

    # -- reads ----------------------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        _check_key(key)

        def read() -> Entry | None:
            row = self._db.execute("SELECT key, value, revision, created, lease FROM kv "
                                   "WHERE key=?", (key,)).fetchone()
            return self._entry(row) if row else None

        return await self._run(read)

    async def list(self, prefix: str) -> tuple[list[Entry], int]:
        _check_key(prefix)

        def read() -> tuple[list[Entry], int]:
            with self._db:  # one read transaction: entries and revision agree
                self._db.execute("BEGIN")
                rows = self._db.execute(
                    "SELECT key, value, revision, created, lease FROM kv WHERE key >= ? AND "
                    "key < ? ORDER BY key", (prefix, prefix + "\U0010ffff")).fetchall()
                return [self._entry(row) for row in rows], self._revision_now()

        return await self._run(read)

    # -- writes ---------------------------------------------------------------------------

    def _transaction(self, change: Callable[[int], Events]) -> Events:
        """Run *change* with the next revision inside one immediate transaction."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            revision = self._revision_now() + 1
            events = change(revision)
            if events:
                db.execute("UPDATE meta SET value=? WHERE name='revision'",
                           (events[-1].revision,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return events

    def _check_expect(self, key: str, expect: int | None) -> tuple[int, int] | None:
        row = self._db.execute("SELECT revision, created FROM kv WHERE key=?",
                               (key,)).fetchone()
        if expect is not None:
            current = row[0] if row else 0
            if current != expect:
                raise Conflict(f"{key} changed (revision {current}, expected {expect})")
        return (int(row[0]), int(row[1])) if row else None

    async def _write(self, change: Callable[[int], Events]) -> Events:
        async with self._write_lock:
            events = await self._run(self._transaction, change)
            for event in events:
                self._publish(event)
            return events

    async def put(self, key: str, value: dict[str, Any], *, expect: int | None = None,
                  lease: int | None = None) -> int:
        _check_key(key)
        if not isinstance(value, dict):
            raise InvalidArgument("a stored value is a JSON object")
        text = json.dumps(value, sort_keys=True)

        def change(revision: int) -> Events:
            existing = self._check_expect(key, expect)
            if lease is not None and not self._db.execute(
                    "SELECT 1 FROM leases WHERE id=?", (lease,)).fetchone():
                raise NotFound(f"lease {lease} does not exist")
            created = existing[1] if existing else revision
            self._db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?, ?)",
                             (key, text, revision, created, lease))
            return [Event("put", key, revision,
                          Entry(key, json.loads(text), revision, created, lease))]

        events = await self._write(change)
        return events[0].revision

    async def delete(self, key: str, *, expect: int | None = None) -> bool:
        _check_key(key)

        def change(revision: int) -> Events:
            if self._check_expect(key, expect) is None:
                return []
            self._db.execute("DELETE FROM kv WHERE key=?", (key,))
            return [Event("delete", key, revision, None)]

        return bool(await self._write(change))

    # -- watches --------------------------------------------------------------------------

    def _publish(self, event: Event) -> None:
        self._history.append(event)
        for prefix, channel in list(self._watchers):
            if event.key.startswith(prefix):
                try:
                    channel.send_nowait(event)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._watchers.remove((prefix, channel))

    @asynccontextmanager
    async def watch(self, prefix: str, after: int) -> AsyncIterator[AsyncIterator[Event]]:
        # Events after `floor` are all still in the history.
        full = len(self._history) == self._history.maxlen
        floor = self._history[0].revision - 1 if full else self._history_start
        if after < floor:
            raise Compacted(f"revision {after} is older than the store's history")
        send, receive = trio.open_memory_channel[Event](math.inf)
        # No await between registering and replaying: no event can slip between them.
        self._watchers.append((prefix, send))
        for event in self._history:
            if event.revision > after and event.key.startswith(prefix):
                send.send_nowait(event)
        try:
            async with receive:
                yield receive
        finally:
            if (prefix, send) in self._watchers:
                self._watchers.remove((prefix, send))
            send.close()

    # -- leases ---------------------------------------------------------------------------

    async def grant_lease(self, ttl: float) -> int:
        if not 0 < ttl <= 86400:
            raise InvalidArgument(f"invalid lease time {ttl}")

        def grant() -> int:
            cursor = self._db.execute("INSERT INTO leases (ttl, expires) VALUES (?, ?)",
                                      (ttl, time.time() + ttl))
            return int(cursor.lastrowid or 0)

        return await self._run(grant)

    async def keep_alive(self, lease: int) -> None:
        def renew() -> int:
            return self._db.execute("UPDATE leases SET expires = ? + ttl WHERE id=? AND "
                                    "expires > ?", (time.time(), lease, time.time())).rowcount

        if not await self._run(renew):
            raise NotFound(f"lease {lease} does not exist or expired")

    async def revoke(self, lease: int) -> None:
        def change(revision: int) -> Events:
            keys = [row[0] for row in self._db.execute(
                "SELECT key FROM kv WHERE lease=? ORDER BY key", (lease,))]
            self._db.execute("DELETE FROM kv WHERE lease=?", (lease,))
            self._db.execute("DELETE FROM leases WHERE id=?", (lease,))
            return [Event("delete", key, revision + n, None) for n, key in enumerate(keys)]

        await self._write(change)

    async def run(self) -> None:
        """Expire leases until cancelled (the daemon runs this in its nursery)."""
        while True:
            expired = await self._run(lambda: [row[0] for row in self._db.execute(
                "SELECT id FROM leases WHERE expires <= ?", (time.time(),))])
            for lease in expired:
                await self.revoke(lease)
            await trio.sleep(LEASE_SWEEP)

    async def aclose(self) -> None:
        await self._run(self._db.close)

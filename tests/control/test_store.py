"""The state store contract, on the embedded SQLite store."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from appliance.control import sqlite_store
from appliance.control.sqlite_store import SQLiteStore
from appliance.control.store import Compacted, Entry, Event
from appliance.errors import Conflict, FailedPrecondition, InvalidArgument, NotFound


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    opened = await SQLiteStore.open(tmp_path / "state.db")
    yield opened
    await opened.aclose()


async def test_put_get_list_delete_and_revisions(store: SQLiteStore) -> None:
    first = await store.put("/volumes/a", {"size": 1})
    second = await store.put("/volumes/b", {"size": 2})
    third = await store.put("/volumes/a", {"size": 3})
    assert first < second < third
    entry = await store.get("/volumes/a")
    assert entry is not None and entry.value == {"size": 3}
    assert (entry.revision, entry.created) == (third, first)
    await store.put("/disks/x", {"path": "/x"})
    entries, revision = await store.list("/volumes/")
    assert [e.key for e in entries] == ["/volumes/a", "/volumes/b"] and revision == third + 1
    assert await store.delete("/volumes/a") is True
    assert await store.delete("/volumes/a") is False
    assert await store.get("/volumes/a") is None


async def test_the_database_file_is_private(store: SQLiteStore, tmp_path: Path) -> None:
    await store.put("/k", {})
    assert os.stat(tmp_path / "state.db").st_mode & 0o777 == 0o600


async def test_compare_and_swap(store: SQLiteStore) -> None:
    revision = await store.put("/k", {"n": 0}, expect=0)  # create only if absent
    with pytest.raises(Conflict):
        await store.put("/k", {"n": 9}, expect=0)
    with pytest.raises(Conflict, match=f"expected {revision + 5}"):
        await store.put("/k", {"n": 9}, expect=revision + 5)
    newer = await store.put("/k", {"n": 1}, expect=revision)
    with pytest.raises(Conflict):
        await store.delete("/k", expect=revision)
    assert await store.delete("/k", expect=newer)


async def test_concurrent_increments_lose_nothing(store: SQLiteStore) -> None:
    await store.put("/counter", {"n": 0})

    async def increment() -> None:
        while True:
            entry = await store.get("/counter")
            assert entry is not None
            try:
                await store.put("/counter", {"n": entry.value["n"] + 1}, expect=entry.revision)
                return
            except Conflict:
                continue

    async with trio.open_nursery() as nursery:
        for _ in range(30):
            nursery.start_soon(increment)
    entry = await store.get("/counter")
    assert entry is not None and entry.value["n"] == 30


async def test_watch_from_a_listed_revision(store: SQLiteStore) -> None:
    await store.put("/volumes/a", {"v": 1})
    _, revision = await store.list("/volumes/")
    seen: list[Event] = []

    async def watcher(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with store.watch("/volumes/", revision) as events:
            task_status.started()
            async for event in events:
                seen.append(event)
                if len(seen) == 3:
                    return

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher)
            await store.put("/volumes/b", {"v": 2})
            await store.put("/disks/ignored", {})
            await store.delete("/volumes/a")
            await store.put("/volumes/b", {"v": 3})
    assert [(e.kind, e.key) for e in seen] == [("put", "/volumes/b"), ("delete", "/volumes/a"),
                                               ("put", "/volumes/b")]
    assert seen[0].revision < seen[1].revision < seen[2].revision
    assert seen[2].entry is not None and seen[2].entry.value == {"v": 3}


async def test_watch_replays_recent_history_and_refuses_older(store: SQLiteStore,
                                                              tmp_path: Path) -> None:
    start = await store.put("/a", {"n": 0})
    await store.put("/a", {"n": 1})
    await store.put("/a", {"n": 2})
    with trio.fail_after(10):
        replay = []
        async with store.watch("/a", start) as events:
            async for event in events:
                replay.append(event.entry.value["n"] if event.entry else None)
                if len(replay) == 2:
                    break
    assert replay == [1, 2]
    await store.aclose()
    reopened = await SQLiteStore.open(tmp_path / "state.db")  # history is memory only
    try:
        entries, revision = await reopened.list("/")
        assert entries[0].value == {"n": 2} and revision == start + 2
        with pytest.raises(Compacted):
            async with reopened.watch("/", start):
                pass
    finally:
        await reopened.aclose()


async def test_leases_expire_with_their_keys(store: SQLiteStore,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_store, "LEASE_SWEEP", 0.05)
    short = await store.grant_lease(0.3)
    kept = await store.grant_lease(0.3)
    await store.put("/locks/short", {"owner": "x"}, lease=short)
    await store.put("/locks/kept", {"owner": "y"}, lease=kept)
    with pytest.raises(NotFound):
        await store.put("/locks/none", {}, lease=12345)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.run)
            while await store.get("/locks/short") is not None:
                await store.keep_alive(kept)
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    assert await store.get("/locks/kept") is not None
    with pytest.raises(NotFound):
        await store.keep_alive(short)
    await store.revoke(kept)
    assert await store.get("/locks/kept") is None


async def test_bad_keys_and_values(store: SQLiteStore) -> None:
    for key in ("relative", "/nul\0", "/" + "x" * 2000):
        with pytest.raises(InvalidArgument):
            await store.put(key, {})
    with pytest.raises(InvalidArgument):
        await store.put("/k", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        await store.grant_lease(0)


# -- update: read-modify-write with compare-and-swap (docs/state-store.md, "Updates") ------


def add(amount: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda value: {**value, "n": value["n"] + amount}


async def test_update_writes_what_the_change_returns(store: SQLiteStore) -> None:
    created = await store.put("/k", {"n": 1, "other": "kept"})
    updated = await store.update("/k", add(2))
    assert updated is not None and updated.value == {"n": 3, "other": "kept"}
    assert updated.revision > created and updated.created == created
    assert await store.get("/k") == updated


async def test_update_of_a_missing_key_or_without_change_writes_nothing(
        store: SQLiteStore) -> None:
    calls: list[dict[str, Any]] = []

    def unchanged(value: dict[str, Any]) -> None:
        calls.append(value)

    assert await store.update("/absent", add(1)) is None
    assert await store.get("/absent") is None
    revision = await store.put("/k", {"n": 1})
    entry = await store.update("/k", unchanged)
    assert calls == [{"n": 1}] and entry is not None and entry.revision == revision
    assert (await store.list("/"))[1] == revision  # no write at all

    def refuse(value: dict[str, Any]) -> dict[str, Any]:
        raise FailedPrecondition("refused")

    with pytest.raises(FailedPrecondition, match="refused"):
        await store.update("/k", refuse)
    assert (await store.list("/"))[1] == revision


async def test_concurrent_updates_lose_nothing(store: SQLiteStore) -> None:
    await store.put("/counter", {"n": 0})
    async with trio.open_nursery() as nursery:
        for _ in range(30):
            nursery.start_soon(partial(store.update, "/counter", add(1), attempts=100))
    entry = await store.get("/counter")
    assert entry is not None and entry.value["n"] == 30


class Contended(SQLiteStore):
    """A store where another writer changes every entry right after it is read."""

    async def get(self, key: str) -> Entry | None:
        entry = await super().get(key)
        if entry is not None:
            await self.put(key, {**entry.value, "n": entry.value["n"] + 100})
        return entry


async def test_update_gives_up_after_its_attempts(tmp_path: Path) -> None:
    store = await Contended.open(tmp_path / "contended.db")
    try:
        await store.put("/k", {"n": 0})
        seen: list[int] = []

        def change(value: dict[str, Any]) -> dict[str, Any]:
            seen.append(value["n"])
            return {"n": -1}

        with pytest.raises(Conflict, match="3 attempts"):
            await store.update("/k", change, attempts=3)
        assert seen == [0, 100, 200]  # each attempt on the newest value
        entry = await SQLiteStore.get(store, "/k")
        assert entry is not None and entry.value == {"n": 300}  # the other writer's
    finally:
        await store.aclose()


async def test_update_keeps_the_entry_lease(store: SQLiteStore) -> None:
    lease = await store.grant_lease(60)
    await store.put("/locks/x", {"n": 0}, lease=lease)
    updated = await store.update("/locks/x", add(1))
    assert updated is not None and updated.lease == lease
    await store.revoke(lease)
    assert await store.get("/locks/x") is None

"""The recurring-job runner in-process, against a clock the tests control: a real SQLite
store, the real event log, trio's autojump clock (minutes of schedule take no real time),
and volumes modelled in memory (what the snapshot, backup and purge requests do to a
volume is tested on real volumes in test_recurring_jobs.py; here the subject is the
runner: what runs when, what is kept, what is skipped, what a restart does).

The wall clock the runner reads follows the virtual one, from a fixed start (a Saturday,
00:00:30 UTC)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from appliance.control.objects import RecurringJobStatus, Volume
from appliance.control.sqlite_store import SQLiteStore
from appliance.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from appliance.node.events import EventLog
from appliance.node.recurring import LABEL, RecurringJobs
from tests.logcheck import expect_log

START = datetime(2026, 12, 5, 0, 0, 30, tzinfo=UTC).timestamp()
MINUTE = 60.0


@dataclass
class ModelVolume:
    name: str
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    written: int = 0  # blocks in the head
    parent: str | None = None


class ModelVolumes:
    """Volumes in memory, doing what the API does to snapshots and backups; counts what
    was asked, and can hold a request until the test lets it go."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.vols: dict[str, ModelVolume] = {}
        self.backup_list: list[dict[str, Any]] = []
        self.ids = itertools.count(1)
        self.calls: list[tuple[str, str]] = []
        self.hold: trio.Event | None = None  # create_snapshot waits on it when set
        self.held = trio.Event()
        self.active: dict[str, int] = {}
        self.most_at_once = 0
        self.most_on_one_volume = 0
        self.fail_on: set[str] = set()

    def write(self, volume: str) -> None:
        self.vols[volume].written += 1

    async def snapshots(self, volume: str) -> list[dict[str, Any]]:
        v = self.vols[volume]
        return [*[dict(s) for s in v.snapshots],
                {"name": None, "parent": v.parent, "size": 1 << 20, "removed": False,
                 "actual_size": 4096 * v.written, "user_created": True, "labels": {},
                 "created": None}]

    async def create_snapshot(self, volume: str, name: str, labels: dict[str, str]) -> None:
        self.calls.append(("snapshot", volume))
        self.active[volume] = self.active.get(volume, 0) + 1
        self.most_on_one_volume = max(self.most_on_one_volume, self.active[volume])
        self.most_at_once = max(self.most_at_once, sum(self.active.values()))
        try:
            if volume in self.fail_on:
                raise FailedPrecondition(f"volume {volume} has no replica in service")
            if self.hold is not None:
                self.held.set()
                await self.hold.wait()
            await trio.sleep(1)  # a request takes time: lets overlaps show
            v = self.vols[volume]
            if any(s["name"] == name for s in v.snapshots):
                raise AlreadyExists(f"snapshot {name} exists")
            created = f"{self.clock():017.3f}"
            v.snapshots.append({"name": name, "parent": v.parent, "size": 1 << 20,
                                "removed": False, "actual_size": 4096 * v.written,
                                "user_created": True, "labels": dict(labels),
                                "created": created})
            v.parent, v.written = name, 0
        finally:
            self.active[volume] -= 1

    async def delete_snapshot(self, volume: str, name: str) -> None:
        self.calls.append(("delete", volume))
        for s in self.vols[volume].snapshots:
            if s["name"] == name:
                s["removed"] = True

    async def purge(self, volume: str) -> None:
        self.calls.append(("purge", volume))
        v = self.vols[volume]
        v.snapshots = [s for s in v.snapshots if not s["removed"] or s["name"] == v.parent]

    async def backups(self, volume: str) -> list[dict[str, Any]]:
        return [dict(b) for b in self.backup_list if b["volume"] == volume]

    async def backup(self, volume: str, snapshot: str, labels: dict[str, str]
                     ) -> dict[str, Any]:
        self.calls.append(("backup", volume))
        await trio.sleep(5)
        made = {"id": f"backup-{next(self.ids):016x}", "volume": volume,
                "snapshot": snapshot, "labels": dict(labels), "state": "complete",
                "created": f"{self.clock():017.3f}"}
        self.backup_list.append(made)
        return made

    async def wait_backup(self, backup_id: str) -> dict[str, Any]:
        return next(b for b in self.backup_list if b["id"] == backup_id)

    async def delete_backup(self, backup_id: str) -> None:
        self.calls.append(("delete-backup", backup_id))
        self.backup_list = [b for b in self.backup_list if b["id"] != backup_id]

    async def trim(self, volume: str) -> tuple[bool, str]:
        return True, "trimmed"

    async def scrub(self, volume: str) -> str:
        return "scrubbed"

    def kept(self, volume: str, job: str) -> list[str]:
        return [s["name"] for s in self.vols[volume].snapshots
                if not s["removed"] and s["labels"].get(LABEL) == job]


@dataclass
class World:
    store: SQLiteStore
    model: ModelVolumes
    events: EventLog
    nursery: trio.Nursery
    runner: RecurringJobs | None = None
    scope: trio.CancelScope | None = None

    async def start(self) -> RecurringJobs:
        runner = RecurringJobs(self.store, self.model, self.events, now=wall_clock)
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await runner.run(task_status=task_status)

        await self.nursery.start(run)
        self.runner, self.scope = runner, scope
        return runner

    def stop(self) -> None:
        """What a stop of the daemon does to the runner: cancelled wherever it is."""
        assert self.scope is not None
        self.scope.cancel()
        self.runner = self.scope = None

    async def add_volume(self, name: str, jobs: list[str] | None = None,
                         groups: list[str] | None = None) -> None:
        volume = Volume(name, 1 << 20, 1, "2026-12-05T00:00:00Z", jobs=jobs or [],
                        job_groups=groups or [])
        await self.store.put(volume.key, volume.to_dict())
        self.model.vols[name] = ModelVolume(name)

    async def runs(self, job: str) -> list[dict[str, Any]]:
        entry = await self.store.get(RecurringJobStatus.key_of(job))
        assert entry is not None
        return list(RecurringJobStatus.from_dict(entry.value).runs)

    async def until_runs(self, job: str, count: int) -> list[dict[str, Any]]:
        """Wait (in virtual time, by the minute) until *job* has *count* finished runs."""
        while True:
            runs = await self.runs(job)
            if len([r for r in runs if r["state"] != "running"]) >= count:
                return runs
            await trio.sleep(MINUTE / 4)


def wall_clock() -> float:
    return START + trio.current_time()


@asynccontextmanager
async def world(tmp_path: Path) -> AsyncIterator[World]:
    store = await SQLiteStore.open(tmp_path / "state.db", inline=True)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.run)
            yield World(store, ModelVolumes(wall_clock), EventLog(store), nursery)
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()


def run_virtual(test: Callable[[Path], Any], tmp_path: Path) -> None:
    trio.run(test, tmp_path, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_snapshot_job_keeps_retain_and_skips_unchanged_volumes(tmp_path: Path) -> None:
    async def scenario(tmp_path: Path) -> None:
        async with world(tmp_path) as w:
            await w.add_volume("a", groups=["daily"])
            await w.add_volume("b", jobs=["snap"])
            runner = await w.start()
            await runner.create("snap", "snapshot", "* * * * *", retain=3, groups=["daily"])
            for minute in range(6):
                w.model.write("a")
                if minute < 2:
                    w.model.write("b")  # b stops changing after two runs
                await w.until_runs("snap", minute + 1)
            runs = await w.runs("snap")
            assert [r["trigger"] for r in runs] == ["schedule"] * 6
            slots = [r["slot"] for r in runs]
            assert slots == [START + 30 + MINUTE * i for i in range(6)], slots
            assert all(r["state"] == "succeeded" for r in runs)
            assert len(w.model.kept("a", "snap")) == 3
            assert w.model.kept("a", "snap") == [
                f"snap-20261205-00{m:02d}00" for m in (4, 5, 6)]
            assert len(w.model.kept("b", "snap")) == 2  # two changes, then skipped
            assert [r["volumes"]["b"]["result"] for r in runs] == \
                ["done", "done", "skipped", "skipped", "skipped", "skipped"]
            assert "unchanged since snapshot snap-20261205-000200" in \
                runs[-1]["volumes"]["b"]["message"]
            w.stop()

    run_virtual(scenario, tmp_path)


def test_a_backup_job_keeps_retain_backups_and_their_snapshots(tmp_path: Path) -> None:
    async def scenario(tmp_path: Path) -> None:
        async with world(tmp_path) as w:
            await w.add_volume("a")
            await w.add_volume("b")
            runner = await w.start()
            await runner.create("nightly", "backup", "*/5 * * * *", retain=2,
                                groups=["default"], labels={"tier": "gold"})
            for run in range(4):
                w.model.write("a")
                w.model.write("b")
                await w.until_runs("nightly", run + 1)
            w.stop()
            for volume in ("a", "b"):
                kept = [b for b in w.model.backup_list if b["volume"] == volume]
                assert [b["snapshot"] for b in kept] == [
                    "nightly-20261205-001500", "nightly-20261205-002000"]
                assert all(b["labels"] == {"tier": "gold", LABEL: "nightly"} for b in kept)
                assert w.model.kept(volume, "nightly") == [b["snapshot"] for b in kept]
            assert len([c for c in w.model.calls if c[0] == "backup"]) == 8

    run_virtual(scenario, tmp_path)


def test_missed_slots_run_once_at_start(tmp_path: Path) -> None:
    async def scenario(tmp_path: Path) -> None:
        async with world(tmp_path) as w:
            await w.add_volume("a", jobs=["snap"])
            runner = await w.start()
            await runner.create("snap", "snapshot", "* * * * *", retain=10)
            w.model.write("a")
            await w.until_runs("snap", 1)
            w.stop()  # the daemon is down for ten minutes
            await trio.sleep(10 * MINUTE)
            w.model.write("a")
            await w.start()
            runs = await w.until_runs("snap", 3)
            # one run for the ten slots missed (the latest), then the schedule goes on
            assert [r["trigger"] for r in runs] == ["schedule", "missed", "schedule"]
            assert [r["slot"] - START for r in runs] == [30, 30 + 10 * MINUTE,
                                                        30 + 11 * MINUTE]
            assert runs[1]["started"] - START < 30 + 11 * MINUTE
            assert len(w.model.kept("a", "snap")) == 2  # nothing written after the second
            w.stop()

    run_virtual(scenario, tmp_path)


def test_a_restart_during_a_run_neither_loses_nor_doubles_it(tmp_path: Path) -> None:
    async def scenario(tmp_path: Path) -> None:
        async with world(tmp_path) as w:
            for name in ("a", "b", "c"):
                await w.add_volume(name, jobs=["snap"])
                w.model.write(name)
            runner = await w.start()
            await runner.create("snap", "snapshot", "0 * * * *", retain=5)
            w.model.hold = trio.Event()
            await w.model.held.wait()  # the run is on its first volume
            w.stop()
            w.model.hold.set()
            w.model.hold = None
            [run] = await w.runs("snap")
            assert run["state"] == "running"
            await w.start()
            [run] = await w.until_runs("snap", 1)
            assert run["state"] == "succeeded"
            for name in ("a", "b", "c"):
                assert w.model.kept(name, "snap") == ["snap-20261205-010000"]
            # the request the stop interrupted may have been carried out before the stop,
            # or not: either way each volume has the slot's snapshot once
            assert len([c for c in w.model.calls if c[0] == "snapshot"]) <= 4
            w.stop()

    run_virtual(scenario, tmp_path)


def test_concurrency_and_jobs_sharing_a_volume_take_turns(tmp_path: Path) -> None:
    async def scenario(tmp_path: Path) -> None:
        async with world(tmp_path) as w:
            for index in range(6):
                await w.add_volume(f"v{index}", groups=["g"])
                w.model.write(f"v{index}")
            runner = await w.start()
            await runner.create("one", "snapshot", "*/2 * * * *", concurrency=2, groups=["g"])
            await runner.create("two", "snapshot", "*/2 * * * *", concurrency=2, groups=["g"])
            await w.until_runs("one", 1)
            await w.until_runs("two", 1)
            w.stop()
            assert w.model.most_at_once <= 4  # two per job
            assert w.model.most_at_once >= 3  # (the jobs did overlap)
            assert w.model.most_on_one_volume == 1

    run_virtual(scenario, tmp_path)


def test_a_failure_is_recorded_counted_and_reported(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(tmp_path: Path) -> None:
        async with world(tmp_path) as w:
            await w.add_volume("good", jobs=["snap"])
            await w.add_volume("bad", jobs=["snap"])
            w.model.write("good")
            w.model.write("bad")
            w.model.fail_on.add("bad")
            runner = await w.start()
            await runner.create("snap", "snapshot", "* * * * *")
            [run] = await w.until_runs("snap", 1)
            assert run["state"] == "failed" and run["message"] == "failed on bad"
            assert run["volumes"]["good"]["result"] == "done"
            assert "no replica in service" in run["volumes"]["bad"]["message"]
            shown = await runner.show("snap")
            assert shown["failures"] == 1
            events = await w.events.list("bad")
            assert [e["kind"] for e in events] == ["job-failed"]
            w.stop()

    run_virtual(scenario, tmp_path)
    expect_log(caplog, r"job snap failed on volume bad: volume bad has no replica")


def test_bad_jobs_are_refused_and_change_nothing(tmp_path: Path) -> None:
    async def scenario(tmp_path: Path) -> None:
        async with world(tmp_path) as w:
            await w.add_volume("a")
            runner = await w.start()
            bad: list[tuple[dict[str, Any], type[Exception], str]] = [
                ({"schedule": "* * *"}, InvalidArgument, "3 field(s)"),
                ({"schedule": "61 * * * *"}, InvalidArgument, "out of range"),
                ({"schedule": "* * * * * *"}, InvalidArgument, "6 field(s)"),
                ({"retain": 0}, InvalidArgument, "invalid retain 0"),
                ({"task": "defrag"}, InvalidArgument, "unknown task 'defrag'"),
                ({"name": "x" * 41}, InvalidArgument, "at most 40"),
                ({"groups": ["bad group"]}, InvalidArgument, "group name"),
                ({"task": "scrub", "retain": 3}, InvalidArgument, "--retain means nothing"),
            ]
            for change, error, words in bad:
                arguments = {"name": "j", "task": "snapshot", "schedule": "* * * * *",
                             "retain": 1, **change}
                with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
                    await runner.create(arguments.pop("name"), arguments.pop("task"),
                                        arguments.pop("schedule"), **arguments)
            assert await runner.list_jobs() == []
            await runner.create("j", "snapshot", "@hourly", groups=["nightly"])
            with pytest.raises(AlreadyExists):
                await runner.create("j", "backup", "@daily")
            with pytest.raises(NotFound, match="no job or group is named 'nope'"):
                await runner.volume_jobs("a", ["nope"], [])
            with pytest.raises(NotFound, match="volume 'missing'"):
                await runner.volume_jobs("missing", ["j"], [])
            with pytest.raises(NotFound, match="job 'other' does not exist"):
                await runner.delete("other")
            entry = await w.store.get(Volume.key_of("a"))
            assert entry is not None and entry.value["jobs"] == [] and \
                entry.value["job_groups"] == []
            joined = await runner.volume_jobs("a", ["nightly"], [])
            assert joined == {"volume": "a", "jobs": [], "groups": ["nightly"],
                              "effective": ["j"]}
            [listed] = await runner.list_jobs()
            assert listed["volumes"] == ["a"] and listed["cron"] == "@hourly"
            await runner.delete("j")
            assert await runner.list_jobs() == []
            w.stop()

    run_virtual(scenario, tmp_path)

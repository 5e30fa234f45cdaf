"""Placement's disk usage never waits on a disk that does not answer: statfs runs in a
thread of its own per disk, bounded in time, and a hung one is not asked again until its
thread returns. (The whole daemon with a hung FUSE disk: test_hung_disk.py.)"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from appliance.control.objects import Disk, Volume
from appliance.control.sqlite_store import SQLiteStore
from appliance.errors import FailedPrecondition
from appliance.node import placement as placement_module
from appliance.node.config import NodeConfig
from appliance.node.placement import NOT_ANSWERING, DiskUsage, Placement
from tests.logcheck import expect_log


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    opened = await SQLiteStore.open(tmp_path / "state.db")
    yield opened
    await opened.aclose()


async def test_a_hung_disk_is_unknown_within_the_bound(
        store: SQLiteStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    hung, fine = tmp_path / "hung", tmp_path / "fine"
    release = threading.Event()
    calls: list[str] = []
    real = placement_module.statfs

    def statfs(path: str) -> DiskUsage | None:
        calls.append(path)
        if path == str(hung):
            release.wait(30)
        return real(path)

    monkeypatch.setattr(placement_module, "statfs", statfs)
    for disk in (Disk("hung", str(hung)), Disk("fine", str(fine))):
        Path(disk.path).mkdir()
        await store.put(disk.key, disk.to_dict())
    config = NodeConfig(tmp_path, ("127.0.0.1", 0), "test")
    placement = Placement(store, config, statfs_timeout=0.3)
    disks = [Disk("hung", str(hung)), Disk("fine", str(fine))]
    with trio.fail_after(5):
        states = await placement.disk_states(disks, [], {})
    assert states["hung"].capacity == 0 and states["hung"].problem == NOT_ANSWERING
    assert states["fine"].capacity > 0 and not states["fine"].problem
    expect_log(caplog, rf"disk {hung}: its file system does not answer \(statfs\) within "
                       r"0.3 s; it takes no new replicas until it does$")

    # asked again while its thread is blocked: unknown at once, no second thread
    with trio.fail_after(0.2):
        assert (await placement.usage(str(hung)))[0] is None
    assert calls.count(str(hung)) == 1
    with pytest.raises(FailedPrecondition, match="hung: its file system does not answer"):
        async with placement.lock:
            await placement.plan_replicas(Volume("v", 1 << 20, 2, "now"), [], 2)

    release.set()  # it answers again
    with trio.fail_after(5):
        while (await placement.usage(str(hung)))[0] is None:
            await trio.sleep(0.05)
    assert calls.count(str(hung)) == 2

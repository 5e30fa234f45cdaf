"""Replica placement rules."""

from __future__ import annotations

import pytest

from appliance.control.objects import Settings
from appliance.control.scheduler import DiskState, place
from appliance.errors import FailedPrecondition

GiB = 1 << 30


def disk(name: str, capacity: int = 100 * GiB, available: int | None = None,
         scheduled: int = 0, **extra: object) -> DiskState:
    return DiskState(name, capacity, capacity if available is None else available, scheduled,
                     **extra)  # type: ignore[arg-type]


def test_spreads_over_disks_with_the_most_room() -> None:
    disks = [disk("a", available=50 * GiB), disk("b", available=90 * GiB), disk("c")]
    assert place(10 * GiB, 2, disks, [], [], Settings()) == ["c", "b"]


def test_one_replica_per_disk_unless_soft() -> None:
    disks = [disk("a"), disk("b")]
    with pytest.raises(FailedPrecondition, match="already holds a replica"):
        place(GiB, 3, disks, [], [], Settings())
    assert sorted(place(GiB, 3, disks, [], [], Settings(replica_soft_anti_affinity=True))) \
        == ["a", "a", "b"]
    assert place(GiB, 1, disks, ["a"], [], Settings()) == ["b"]


def test_over_provisioning_and_minimal_available() -> None:
    full = disk("a", scheduled=95 * GiB)
    with pytest.raises(FailedPrecondition, match="over its limit"):
        place(10 * GiB, 1, [full], [], [], Settings())
    assert place(10 * GiB, 1, [full], [], [], Settings(over_provisioning_percentage=200)) \
        == ["a"]
    low = disk("b", available=5 * GiB)
    with pytest.raises(FailedPrecondition, match="under its minimum"):
        place(GiB, 1, [low], [], [], Settings(minimal_available_percentage=10))
    reserved = disk("c", available=30 * GiB, reserved=25 * GiB)
    with pytest.raises(FailedPrecondition, match="under its minimum"):
        place(GiB, 1, [reserved], [], [], Settings(minimal_available_percentage=10))


def test_tags_and_disabled_disks() -> None:
    disks = [disk("a", tags=("ssd",)), disk("b"), disk("c", tags=("ssd",),
                                                        allow_scheduling=False)]
    assert place(GiB, 1, disks, [], ["ssd"], Settings()) == ["a"]
    with pytest.raises(FailedPrecondition) as info:
        place(GiB, 2, disks, [], ["ssd"], Settings())
    assert "b: lacks tag(s) ssd" in str(info.value)
    assert "c: scheduling is disabled" in str(info.value)

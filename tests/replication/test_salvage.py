"""Membership across failures, crashes and restarts with real replica servers (in this
process): the scenarios of docs/membership.md's crash table, the double crash during a
rebuild that once lost acknowledged writes, divergent histories, and what a rebuild leaves
for the next start."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import (
    ApplianceError,
    Diverged,
    FailedPrecondition,
    StorageIOError,
    Unavailable,
)
from appliance.replication.engine import Engine
from tests.harness import wait_for
from tests.logcheck import expect_log

from .conftest import BS, JOB_FAILED, LEFT, REBUILD_FAILED, Cluster, MiB, left, modes, mv, read


def copying(engine: Engine, index: int) -> bool:
    replica = engine.status()["replicas"][index]
    return bool(replica["mode"] == "WO" and
                (replica.get("rebuild") or {}).get("copied_bytes", 0) > 0)


def record_of(cluster: Cluster, index: int) -> dict[str, Any]:
    record = cluster.servers[index].replica.volume_record()
    assert record is not None
    return record


@pytest.fixture
def rebuilding(cluster: Cluster) -> tuple[Engine, bytes]:
    """A, B in RW holding 8 MiB of acknowledged data; C added and being rebuilt slowly."""
    for _ in range(2):
        cluster.add(size=32 * MiB)
    engine = cluster.engine(rebuild_bandwidth=2 * MiB)
    data = os.urandom(8 * MiB)
    engine.write(mv(data), 0)
    new = cluster.add(size=32 * MiB)
    engine.add_replica(new.address)
    wait_for(lambda: copying(engine, 2), 60, "C to copy", interval=0.02)
    return engine, data


def test_double_crash_during_rebuild_never_serves_the_half_rebuilt_replica(
        cluster: Cluster, rebuilding: tuple[Engine, bytes],
        caplog: pytest.LogCaptureFixture) -> None:
    engine, data = rebuilding
    cluster.crash(0)
    cluster.crash(1)
    with pytest.raises(StorageIOError):
        engine.write(mv(b"late" * 1024), 16 * MiB)  # never acknowledged
    assert engine.status()["state"] == "faulted"
    # The last record on every replica still names the replicas that hold the data.
    record = record_of(cluster, 2)
    assert record["members"] and cluster.servers[2].replica.replica_id not in record["members"]
    engine.close()
    a, b = cluster.restart(0), cluster.restart(1)
    # C alone can never serve: not even with --salvage
    with pytest.raises(FailedPrecondition, match="cannot be reached"):
        cluster.engine(addresses=(cluster.servers[2].address,))
    with pytest.raises(FailedPrecondition, match="no reachable replica is a member"):
        cluster.engine(addresses=(cluster.servers[2].address,), salvage=True)
    again = cluster.engine()
    assert set(again.status()["started"]["rw"]) <= {f"{s.address[0]}:{s.address[1]}"
                                                     for s in (a, b)}
    assert modes(again)[2] != "RW"
    assert read(again, 0, 8 * MiB) == data
    assert again.wait_rebuilds(120)
    assert modes(again) == ["RW", "RW", "RW"]
    heads = cluster.heads()
    assert heads[0] == heads[1] == heads[2] and heads[0][:8 * MiB] == data
    again.close()
    expect_log(caplog, LEFT, REBUILD_FAILED, JOB_FAILED)


def test_the_rebuilding_replica_crashing_too(cluster: Cluster, rebuilding: tuple[Engine, bytes],
                                             caplog: pytest.LogCaptureFixture) -> None:
    engine, data = rebuilding
    for index in range(3):
        cluster.crash(index)
    with pytest.raises(StorageIOError):
        engine.write(mv(b"x" * BS), 0)
    engine.close()
    for index in range(3):
        cluster.restart(index)
    again = cluster.engine()
    assert read(again, 0, 8 * MiB) == data
    assert again.wait_rebuilds(120)
    assert cluster.heads()[2][:8 * MiB] == data
    again.close()
    expect_log(caplog, LEFT, REBUILD_FAILED, JOB_FAILED)


def test_one_rw_survivor_serves_and_the_rebuild_completes(
        cluster: Cluster, rebuilding: tuple[Engine, bytes],
        caplog: pytest.LogCaptureFixture) -> None:
    engine, data = rebuilding
    source = engine.status()["replicas"][2]["rebuild"]["source"]
    survivor = 1 if source.endswith(f":{cluster.servers[0].address[1]}") else 0
    cluster.crash(1 - survivor)  # the rebuild's source, or not
    engine.write(mv(b"after" * 1000), 20 * MiB)  # acknowledged by the survivor (and C)
    assert engine.wait_rebuilds(120)
    assert modes(engine)[survivor] == "RW" and modes(engine)[2] == "RW"
    engine.close()
    cluster.restart(1 - survivor)
    again = cluster.engine()  # the one that left is behind: rebuilt
    assert read(again, 20 * MiB, 5000) == b"after" * 1000
    assert read(again, 0, 8 * MiB) == data
    assert again.wait_rebuilds(120)
    assert modes(again) == ["RW", "RW", "RW"]
    again.close()
    expect_log(caplog, left(1),
               f"{REBUILD_FAILED}|{JOB_FAILED}")


def test_crash_during_promotion(cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    """The engine dies while the record that makes C a member reaches A and B: the next
    start serves a replica that holds every acknowledged write (any member does)."""
    for _ in range(2):
        cluster.add()
    engine = cluster.engine()
    data = os.urandom(4 * MiB)
    engine.write(mv(data), 0)
    new = cluster.add()
    c_id = new.replica.replica_id
    store = engine.roster.store  # the roster's way of writing a record (the test's hook)

    def dying_store(member: Any, record: dict[str, Any]) -> None:
        store(member, record)
        if c_id in record["members"]:  # the promotion record reached its first replica
            for index in range(3):
                cluster.crash(index)  # the engine is gone: nothing else arrives

    engine.roster.store = dying_store
    engine.add_replica(new.address)
    assert engine.wait_rebuilds(120)
    assert modes(engine)[2] != "RW"  # it never became RW: every RW replica failed first
    engine.close()
    for index in range(3):
        cluster.restart(index)
    members = [set(record_of(cluster, index)["members"]) for index in range(3)]
    assert any(c_id in m for m in members)  # the crash came after a member took it
    again = cluster.engine()
    assert read(again, 0, 4 * MiB) == data
    assert again.wait_rebuilds(120)
    assert modes(again) == ["RW", "RW", "RW"]
    again.close()
    expect_log(caplog, LEFT,
               r"rebuild: volume vol: rebuild of .* stopped: .*could not be made RW")


def test_divergent_histories_are_never_resolved_automatically(
        cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    for _ in range(2):
        cluster.add()
    a, b = cluster.addresses()
    engine = cluster.engine()
    engine.write(mv(b"1" * BS), 0)
    cluster.crash(1)
    engine.write(mv(b"A" * BS), BS)  # acknowledged by A only
    engine.close()
    # B comes back, A is gone: B alone may lack A's writes: refused, then salvaged
    cluster.crash(0)
    cluster.restart(1)
    with pytest.raises(FailedPrecondition, match="cannot be reached"):
        cluster.engine()
    salvaged = cluster.engine(salvage_from=b)
    status = salvaged.status()
    assert status["salvage"]["from"] == f"{b[0]}:{b[1]}"
    assert status["started"]["salvaged"] and status["salvage"]["given_up"]
    salvaged.write(mv(b"B" * BS), 2 * BS)  # acknowledged on B's branch only
    salvaged.close()
    # A comes back alone: its own record names only A, so it serves its own branch
    cluster.crash(1)
    cluster.restart(0)
    alone = cluster.engine()
    alone.write(mv(b"a" * BS), 3 * BS)
    alone.close()
    # Both: diverged. Refused, naming both branches, with or without --salvage
    cluster.restart(1)
    for salvage in (False, True):
        with pytest.raises(Diverged) as refused:
            cluster.engine(salvage=salvage)
    message = str(refused.value)
    branch_a = record_of(cluster, 0)["history"][-1]["id"][:8]
    branch_b = record_of(cluster, 1)["history"][-1]["id"][:8]
    assert branch_a in message and branch_b in message and "--salvage-from" in message
    # The operator chooses A; B is kept: out of service, untouched, never rebuilt
    b_head = cluster.servers[1].replica.read(0, 4 * BS)
    chosen = cluster.engine(salvage_from=a)
    assert modes(chosen) == ["RW", "ERR"]
    replica_b = chosen.status()["replicas"][1]
    assert replica_b["diverged"]["branch"].startswith(branch_b)
    assert read(chosen, 0, 4 * BS) == b"1" * BS + b"A" * BS + bytes(BS) + b"a" * BS
    chosen.write(mv(b"z" * BS), 0)
    assert cluster.servers[1].replica.read(0, 4 * BS) == b_head == \
        b"1" * BS + bytes(BS) + b"B" * BS + bytes(BS)
    with pytest.raises(FailedPrecondition, match="--discard"):
        chosen.add_replica(b)
    chosen.add_replica(b, discard=True)  # the operator lets B's branch go
    assert chosen.wait_rebuilds(60)
    assert modes(chosen) == ["RW", "RW"]
    heads = cluster.heads()
    assert heads[0] == heads[1]
    chosen.close()
    expect_log(caplog, left(1),
               r"engine: volume vol salvaged from .*unreachable member",
               r"engine: volume vol salvaged from .*kept, not rebuilt")


def test_a_rebuild_is_not_repeated_after_a_clean_restart(
        cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    for _ in range(2):
        cluster.add()
    engine = cluster.engine()
    for round_ in range(2):  # two rebuilds: their system snapshots differ
        engine.write(mv(os.urandom(2 * MiB)), round_ * 4 * MiB)
        cluster.crash(1)
        engine.write(mv(os.urandom(BS)), 9 * MiB)
        back = cluster.restart(1)
        engine.add_replica(back.address)
        assert engine.wait_rebuilds(60)
        assert engine.status()["state"] == "healthy"
        engine.purge()  # works as soon as the volume is healthy
    layers = [[x.name for x in s.replica.layers() if x.name and not x.removed]
              for s in cluster.servers]
    assert layers[0] == layers[1] == []  # no rebuild snapshot left behind
    engine.close()
    again = cluster.engine()
    assert again.status()["started"]["behind"] == []
    assert modes(again) == ["RW", "RW"]
    again.close()
    expect_log(caplog, left(1))


def test_a_start_that_cannot_reach_any_replica_is_unavailable(tmp_path: Path,
                                                               cluster: Cluster) -> None:
    cluster.add()
    address = cluster.servers[0].address
    cluster.crash(0)
    with pytest.raises(Unavailable):
        cluster.engine(addresses=(address,))
    with pytest.raises(ApplianceError):
        cluster.engine(addresses=(address,), salvage_from=address)


def test_a_replica_given_up_while_away_is_kept_when_it_comes_back(
        cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    """C serves alone (salvaged) and acknowledges a write; while C is away the volume is
    salvaged from A. When C comes back to that engine, its branch is not in the volume's
    history: adding it is refused (it may hold acknowledged writes, and it does) and it is
    kept, untouched, until an operator discards it (found by the membership model)."""
    for _ in range(3):
        cluster.add()
    c = cluster.addresses()[2]
    engine = cluster.engine()
    engine.write(mv(b"1" * BS), 0)
    engine.close()
    cluster.crash(0)
    cluster.crash(1)
    alone = cluster.engine(salvage=True)  # C alone
    alone.write(mv(b"C" * BS), BS)  # acknowledged on C only
    alone.close()
    cluster.crash(2)
    cluster.restart(0)
    cluster.restart(1)
    salvaged = cluster.engine(salvage=True)  # A and B; C is given up
    assert salvaged.status()["salvage"]["given_up"]
    cluster.restart(2)
    c_head = cluster.servers[2].replica.read(0, 2 * BS)
    assert c_head == b"1" * BS + b"C" * BS
    with pytest.raises(FailedPrecondition, match=r"history does not contain.*--discard"):
        salvaged.add_replica(c)
    replica_c = salvaged.status()["replicas"][2]
    assert replica_c["mode"] == "ERR" and "diverged" in replica_c
    assert cluster.servers[2].replica.read(0, 2 * BS) == c_head
    salvaged.add_replica(c, discard=True)  # the operator lets C's branch go
    assert salvaged.wait_rebuilds(60)
    assert modes(salvaged) == ["RW", "RW", "RW"]
    salvaged.close()
    expect_log(caplog, r"engine: volume vol salvaged from .*unreachable member")

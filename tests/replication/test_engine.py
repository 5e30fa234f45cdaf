"""The engine over real replica servers on loopback: replication, alignment, failures,
fencing, start decisions, snapshots, rebuilds, full disks."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from appliance.chain import Replica
from appliance.errors import FailedPrecondition, NoSpace, StorageIOError
from appliance.replication.engine import Engine, EngineConfig
from appliance.replication.liveness import PING_FAILED
from appliance.replication.server_process import RunningServer
from tests.logcheck import expect_log

from .conftest import BS, SECRET, Cluster, MiB, left, modes, mv, read


def test_writes_reach_every_replica_and_reads_come_back(cluster: Cluster) -> None:
    for _ in range(3):
        cluster.add()
    engine = cluster.engine()
    try:
        assert modes(engine) == ["RW", "RW", "RW"] and engine.status()["state"] == "healthy"
        rng = random.Random(1)
        expected = bytearray(32 * MiB)
        for _ in range(200):
            offset = rng.randrange(32 * MiB - 70_000)
            data = rng.randbytes(rng.randrange(1, 70_000))
            engine.write(mv(data), offset, fua=rng.random() < 0.1)
            expected[offset: offset + len(data)] = data
        engine.zero(1000, 3 * BS + 17)
        expected[1000: 1000 + 3 * BS + 17] = bytes(3 * BS + 17)
        engine.flush()
        assert read(engine, 0, 32 * MiB) == bytes(expected)
        heads = cluster.heads()
        assert heads[0] == heads[1] == heads[2] == bytes(expected)
        for server in cluster.servers:  # whole blocks only: equal allocation everywhere
            assert server.replica.layer_extents() == cluster.servers[0].replica.layer_extents()
        assert engine.extents(0, 8 * BS)[0][2] is True
    finally:
        engine.close()


def test_a_failed_replica_leaves_and_the_volume_continues(
        cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    for _ in range(3):
        cluster.add()
    engine = cluster.engine()
    engine.write(mv(b"a" * BS), 0)
    cluster.crash(1)
    engine.write(mv(b"b" * BS), 0)  # acknowledged by the two that remain
    assert modes(engine) == ["RW", "ERR", "RW"]
    assert engine.status()["state"] == "degraded"
    assert read(engine, 0, BS) == b"b" * BS
    survivors = [cluster.servers[0].replica, cluster.servers[2].replica]
    for replica in survivors:  # the record excluding it was written before the ack
        record = replica.volume_record()
        assert record is not None
        assert cluster.servers[1].replica.replica_id not in record["members"]
    assert "replica 127.0.0.1" in caplog.text
    expect_log(caplog, left(2))
    engine.close()


def test_a_newer_engine_fences_the_old_one(cluster: Cluster,
                                           caplog: pytest.LogCaptureFixture) -> None:
    for _ in range(2):
        cluster.add()
    old = cluster.engine()
    old.write(mv(b"1" * BS), 0)
    old.close()
    old = cluster.engine()
    new = cluster.engine()  # takes over with a higher generation
    assert new.generation > old.generation
    with pytest.raises(StorageIOError):
        old.write(mv(b"2" * BS), 0)
    assert old.status()["state"] == "faulted"
    new.write(mv(b"3" * BS), 0)
    assert read(new, 0, BS) == b"3" * BS
    assert new.wait_rebuilds(60)
    assert read(new, 0, BS) == b"3" * BS
    new.close()
    old.close()
    # The old engine's data path connects on its first write and is refused at the
    # handshake; the record of that failure, sent on a session opened before the takeover,
    # is refused as stale.
    expect_log(caplog, r"server: refused a writer from .*: generation \d+ is older than",
               r"roster: .* failed \(.*refused the session",
               r"roster: .* failed \(.*a newer engine session owns this replica\)", left(0))


def test_clean_restart_keeps_every_replica(cluster: Cluster) -> None:
    for _ in range(3):
        cluster.add()
    engine = cluster.engine()
    engine.write(mv(os.urandom(MiB)), 0)
    engine.close()
    for server in cluster.servers:
        record = server.replica.volume_record()
        assert record is not None and record["clean"] is True
    again = cluster.engine()
    assert modes(again) == ["RW", "RW", "RW"]
    again.close()


def test_unclean_restart_trusts_one_and_resyncs_the_others(cluster: Cluster) -> None:
    for _ in range(3):
        cluster.add()
    engine = cluster.engine()
    data = os.urandom(4 * MiB)
    engine.write(mv(data), 0)
    # the engine dies without a clean stop; each replica got a different last write
    for index, server in enumerate(cluster.servers):
        server.replica.write(bytes([index]) * BS, 8 * MiB)
    for member in engine.members:
        member.close_connections()
    again = cluster.engine()
    assert sorted(modes(again)) == ["ERR", "ERR", "RW"] or "WO" in modes(again)
    assert again.wait_rebuilds(60)
    assert modes(again) == ["RW", "RW", "RW"]
    heads = cluster.heads()
    assert heads[0] == heads[1] == heads[2]
    assert heads[0][:4 * MiB] == data
    again.close()


def test_snapshot_on_every_replica(cluster: Cluster) -> None:
    for _ in range(2):
        cluster.add()
    engine = cluster.engine()
    engine.write(mv(b"x" * BS), 0)
    engine.snapshot("s1", labels={"k": "v"})
    engine.write(mv(b"y" * BS), 0)
    for server in cluster.servers:
        with server.replica.open_snapshot("s1") as snap:
            assert snap.read(0, BS) == b"x" * BS
    engine.close()


def test_rebuild_a_new_replica(cluster: Cluster, tmp_path: Path) -> None:
    for _ in range(2):
        cluster.add()
    engine = cluster.engine()
    data = os.urandom(6 * MiB)
    engine.write(mv(data), MiB)
    engine.snapshot("before")
    engine.write(mv(b"z" * MiB), 20 * MiB)
    new = cluster.add()
    engine.add_replica(new.address)
    for _ in range(20):  # writes continue during the rebuild
        engine.write(mv(os.urandom(BS)), random.randrange(32 * MiB // BS) * BS)
    assert engine.wait_rebuilds(60)
    assert modes(engine) == ["RW", "RW", "RW"]
    heads = cluster.heads()
    assert heads[0] == heads[1] == heads[2]
    with new.replica.open_snapshot("before") as snap:
        assert snap.read(MiB, len(data)) == data
    engine.close()


def test_rebuild_after_a_short_outage_copies_only_what_differs(
        cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    for _ in range(2):
        cluster.add()
    engine = cluster.engine()
    engine.write(mv(os.urandom(16 * MiB)), 0)
    cluster.crash(1)
    engine.write(mv(os.urandom(BS)), 5 * MiB)  # one block changes while it is away
    assert modes(engine) == ["RW", "ERR"]
    back = cluster.restart(1)
    engine.add_replica(back.address)
    assert engine.wait_rebuilds(60)
    assert modes(engine) == ["RW", "RW"]
    info = engine.status()["replicas"][1]["rebuild"]
    assert info["state"] == "done"
    assert 0 < info["copied_bytes"] <= 1 * MiB  # one 1 MiB chunk, not 16 MiB
    heads = cluster.heads()
    assert heads[0] == heads[1]
    engine.close()
    expect_log(caplog, left(1))


def test_start_refuses_when_a_member_may_hold_newer_writes(
        cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    for _ in range(2):
        cluster.add()
    engine = cluster.engine()
    engine.write(mv(b"old" * 1000), 0)
    cluster.crash(1)
    engine.write(mv(b"new" * 1000), 0)  # only replica 0 has this; the record says so
    engine.close()
    cluster.restart(1)
    cluster.crash(0)
    with pytest.raises(FailedPrecondition, match="cannot be reached"):
        cluster.engine()
    salvaged = cluster.engine(salvage=True)  # the operator accepts the best reachable one
    assert read(salvaged, 0, 3) == b"old"
    salvaged.close()
    expect_log(caplog, left(1),
               r"engine: volume vol salvaged from .*given up: .*unreachable member")


def test_start_with_an_unreachable_non_member(cluster: Cluster,
                                              caplog: pytest.LogCaptureFixture) -> None:
    for _ in range(3):
        cluster.add()
    engine = cluster.engine()
    cluster.crash(2)
    engine.write(mv(b"w" * BS), 0)
    engine.close()
    again = cluster.engine()  # replica 2 left the membership: not needed to start
    assert modes(again) == ["RW", "RW", "ERR"]
    again.close()
    expect_log(caplog, left(2))


def test_all_replicas_full_fails_the_write_and_keeps_them(tmp_path: Path,
                                                          small_ext4: Path) -> None:
    directories = []
    for index in range(2):
        (small_ext4 / f"d{index}").mkdir()
        Replica.create(small_ext4 / f"d{index}" / "r", 64 * MiB).close()
        directories.append(small_ext4 / f"d{index}" / "r")
    servers = [RunningServer(d, ("127.0.0.1", 0), SECRET) for d in directories]
    try:
        engine = Engine(EngineConfig("vol", tuple(s.address for s in servers), SECRET))
        engine.start()
        engine.write(mv(b"k" * MiB), 0)
        with pytest.raises(NoSpace, match="every replica is full"):
            for offset in range(MiB, 64 * MiB, 4 * MiB):
                engine.write(mv(os.urandom(4 * MiB)), offset)
        assert modes(engine) == ["RW", "RW"]  # full, not failed: reads still work
        assert read(engine, 0, MiB) == b"k" * MiB
        heads = [s.replica.read(0, 64 * MiB) for s in servers]
        assert heads[0] == heads[1]
        engine.trim(MiB, 16 * MiB)  # space freed: writes resume
        engine.write(mv(b"again" * 100), MiB)
        assert read(engine, MiB, 5) == b"again"
        engine.close()
    finally:
        for server in servers:
            server.stop()


def test_an_idle_volume_notices_a_dead_replica(cluster: Cluster,
                                               caplog: pytest.LogCaptureFixture) -> None:
    for _ in range(2):
        cluster.add()
    engine = cluster.engine(monitor_interval=0.2)
    engine.write(mv(b"m" * BS), 0)
    io = dict(engine.status()["io"], latency=None)
    cluster.crash(1)
    deadline = time.monotonic() + 20
    while modes(engine) != ["RW", "ERR"]:  # no I/O: the engine's pings find it
        assert time.monotonic() < deadline, engine.status()
        time.sleep(0.05)
    status = engine.status()
    assert status["state"] == "degraded" and dict(status["io"], latency=None) == io
    assert status["replicas"][1]["reason"].startswith(PING_FAILED), status["replicas"][1]
    assert status["liveness"]["interval"] == 0.2
    assert read(engine, 0, BS) == b"m" * BS
    engine.close()
    expect_log(caplog, left(1))


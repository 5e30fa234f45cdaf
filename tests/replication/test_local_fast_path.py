"""The local fast path (docs/local-fast-path.md): a replica on the engine's host lent by its
server and served in the engine's process, while everyone else still reaches it through
the server's address; given back when the engine stops, when its server goes, when a newer
engine asks for it.

The servers here run in the test's process, so the lend goes through a real unix socket
and the replica's directory lock (flock) is taken and released exactly as between
processes. Engine crashes with the fast path are RELIABILITY row 9 (tests/reliability)."""

from __future__ import annotations

import os

import pytest

from appliance.errors import FailedPrecondition, InvalidArgument, StorageIOError
from appliance.replication.client import ReplicaConnection
from appliance.replication.protocol import Op, Role
from tests.harness import wait_for
from tests.logcheck import expect_log

from .conftest import BS, SECRET, Cluster, MiB, left, modes, mv, read


def lent(engine_status: dict[str, object]) -> list[bool]:
    replicas = engine_status["replicas"]
    assert isinstance(replicas, list)
    return [bool(replica.get("lent")) for replica in replicas]


def test_the_local_replica_is_lent_and_still_reachable_through_its_server(
        cluster: Cluster) -> None:
    for _ in range(2):
        cluster.add()
    engine = cluster.engine(local_fast_path=True)
    data = os.urandom(4 * MiB)
    engine.write(mv(data), 0)
    assert lent(engine.status()) == [True, False]  # one replica lent, at most
    assert cluster.servers[0].lent and not cluster.servers[1].lent
    assert read(engine, 0, len(data)) == data
    assert engine.status()["replicas"][0]["reads"] > 0  # reads go to the lent one
    # Others reach it through its server's address as before (the engine serves them).
    with ReplicaConnection(cluster.servers[0].address, SECRET) as reader:
        status = reader.status()
        assert status["replica_id"] == engine.status()["replicas"][0]["replica_id"]
        assert status["volume_record"]["members"]
    engine.flush()
    engine.close()
    wait_for(lambda: not cluster.servers[0].lent, 30, "the replica given back")
    # its server serves it again, with every write
    assert cluster.heads() == [data + bytes(28 * MiB)] * 2
    again = cluster.engine(local_fast_path=True)
    assert lent(again.status()) == [True, False] and read(again, 0, len(data)) == data
    again.close()


def test_a_rebuild_copies_from_the_lent_replica(cluster: Cluster,
                                                caplog: pytest.LogCaptureFixture) -> None:
    for _ in range(2):
        cluster.add()
    engine = cluster.engine(local_fast_path=True)
    engine.write(mv(b"a" * MiB), 0)
    cluster.crash(1)
    engine.write(mv(b"b" * MiB), MiB)  # on the lent replica alone
    assert modes(engine) == ["RW", "ERR"]
    cluster.restart(1)
    engine.add_replica(cluster.servers[1].address)  # its source: the lent replica
    assert engine.wait_rebuilds(60)
    assert modes(engine) == ["RW", "RW"] and lent(engine.status()) == [True, False]
    engine.close()
    wait_for(lambda: not cluster.servers[0].lent, 30, "the replica given back")
    heads = cluster.heads()
    assert heads[0] == heads[1] and heads[0][: 2 * MiB] == b"a" * MiB + b"b" * MiB
    expect_log(caplog, left(1))


def test_the_replica_goes_back_when_its_server_stops(cluster: Cluster,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    for _ in range(2):
        cluster.add()
    engine = cluster.engine(local_fast_path=True)
    engine.write(mv(b"a" * BS), 0)
    cluster.crash(0)  # its server stops: the lend ends, the engine gives the replica back
    wait_for(lambda: not lent(engine.status())[0], 30, "the replica given back")
    engine.write(mv(b"b" * BS), 0)  # its server is gone: it leaves, the other one serves
    assert modes(engine) == ["ERR", "RW"]
    assert read(engine, 0, BS) == b"b" * BS
    engine.close()
    wait_for(lambda: not cluster.servers[0].lent, 30, "the replica given back")
    expect_log(caplog, r"local: replica 127\.0\.0\.1:\d+: its server closed the lend",
               left(1))


def test_a_newer_engine_takes_the_replica_back_and_fences_the_old_one(
        cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    cluster.add()
    old = cluster.engine(local_fast_path=True)
    old.write(mv(b"1" * BS), 0)
    assert lent(old.status()) == [True]
    # The newcomer is told to retry while the old engine gives the replica back, then
    # registers with the server; the old engine is fenced from the moment it asked.
    new = cluster.engine(local_fast_path=True)
    assert new.generation > old.generation
    with pytest.raises(StorageIOError):
        old.write(mv(b"2" * BS), 0)
    assert old.status()["state"] == "faulted"
    assert lent(new.status()) == [True]
    assert read(new, 0, BS) == b"1" * BS
    new.write(mv(b"3" * BS), 0)
    new.close()
    old.close()
    wait_for(lambda: not cluster.servers[0].lent, 30, "the replica given back")
    assert cluster.heads() == [b"3" * BS + bytes(32 * MiB - BS)]
    assert "asked a writer from unix to retry" in caplog.text  # the newcomer retried
    # The old engine's write met the replica back with its server, which refused it.
    expect_log(caplog, r"local: replica .*: a newer engine asks for it",
               r"server: refused a writer from unix: generation 1 is older than 2",
               r"roster: .* failed \(.*refused the session", left(0))


def test_lend_is_refused_to_readers_and_over_tcp(cluster: Cluster) -> None:
    server = cluster.add()
    with ReplicaConnection(server.address, SECRET) as reader, \
            pytest.raises(InvalidArgument, match="needs a writer session"):
        reader.call(Op.LEND)
    with ReplicaConnection(server.address, SECRET, role=Role.WRITER, generation=1,
                           token=7) as writer, \
            pytest.raises(FailedPrecondition, match="only through its server's unix socket"):
        writer.call(Op.LEND)
    assert not server.lent
    engine = cluster.engine()  # the server still serves its replica
    engine.write(mv(b"x" * BS), 0)
    engine.close()

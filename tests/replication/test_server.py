"""The replica server and client over real TCP on loopback: authentication, fencing of
stale sessions, every operation, errors, pipelining and out-of-order completion."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.chain import Replica
from appliance.errors import (
    AlreadyExists,
    AuthenticationFailed,
    InvalidArgument,
    NotFound,
    StaleSession,
    Unavailable,
)
from appliance.replication import protocol as proto
from appliance.replication.client import ReplicaConnection
from appliance.replication.protocol import Op, Role
from appliance.replication.server_process import RunningServer
from tests.logcheck import expect_log

SECRET = b"s3cret-for-tests-only-0123456789"
MiB = 1 << 20
BS = 4096


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    Replica.create(tmp_path / "r", 16 * MiB).close()
    with RunningServer(tmp_path / "r", ("127.0.0.1", 0), SECRET) as running:
        yield running


def writer(server: RunningServer, generation: int = 1, token: int = 7) -> ReplicaConnection:
    return ReplicaConnection(server.address, SECRET, role=Role.WRITER, generation=generation,
                             token=token, timeout=10)


def test_handshake_reports_the_replica(server: RunningServer) -> None:
    with ReplicaConnection(server.address, SECRET) as reader:
        assert reader.welcome.size == 16 * MiB
        assert reader.welcome.replica_id == server.replica.replica_id
        assert reader.welcome.generation == 0


def test_wrong_secret_is_refused_and_not_logged(server: RunningServer,
                                                caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(AuthenticationFailed, match="refused the secret"):
        ReplicaConnection(server.address, b"wrong")
    assert "authentication failed" in caplog.text
    assert SECRET.decode() not in caplog.text and "wrong" not in caplog.text
    expect_log(caplog, r"server: refused a connection from .*: authentication failed")


def test_client_refuses_a_server_without_the_secret(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    Replica.create(tmp_path / "r", MiB).close()
    with RunningServer(tmp_path / "r", ("127.0.0.1", 0), b"another secret") as other, \
            pytest.raises(AuthenticationFailed):
        ReplicaConnection(other.address, SECRET)
    assert "authentication failed" in caplog.text
    expect_log(caplog, r"server: refused a connection from .*: authentication failed")


def test_not_a_replica_server(tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    address = listener.getsockname()
    try:
        with pytest.raises(Unavailable, match="timed out"):
            ReplicaConnection(address, SECRET, timeout=0.5)
    finally:
        listener.close()
    with pytest.raises(Unavailable, match="cannot connect"):
        ReplicaConnection(address, SECRET, timeout=2)


def test_data_operations(server: RunningServer) -> None:
    with writer(server) as conn:
        data = os.urandom(3 * BS)
        conn.write(data, BS, fua=True)
        buf = memoryview(bytearray(3 * BS))
        conn.read(buf, BS)
        assert bytes(buf) == data
        conn.snapshot("s1", labels={"k": "v"})
        conn.write(b"x" * BS, 0)
        assert conn.write_zeroes(BS, BS, report=True) == [(1, 2)]  # s1 holds block 1
        conn.unmap(2 * BS, BS)  # falls through to s1
        conn.flush()
        conn.read(buf, 0)
        assert bytes(buf) == b"x" * BS + bytes(BS) + data[BS: 2 * BS]
        extents = conn.extents(0, 8 * BS)
        assert extents[0] == (0, 4 * BS, True) and extents[1][2] is False
        status = conn.status()
        assert status["revision"] == server.replica.revision > 0
        assert status["snapshots"] == ["s1"] and status["head_parent"] == "s1"
        assert [x["name"] for x in conn.layers()] == ["s1", None]
        checksum = conn.checksum("s1", chunks=True)
        assert checksum["digest"].startswith("sha256:") and "0" in checksum["chunks"]
        conn.set_volume_record({"epoch": 1, "members": ["x"]})
        assert conn.status()["volume_record"] == {"epoch": 1, "members": ["x"]}
        conn.expand(32 * MiB)
        assert conn.status()["size"] == 32 * MiB


def test_errors_come_back_as_the_same_classes(server: RunningServer) -> None:
    with writer(server) as conn:
        conn.snapshot("s1")
        with pytest.raises(AlreadyExists, match="already exists"):
            conn.snapshot("s1")
        with pytest.raises(NotFound, match="does not exist"):
            conn.revert("nope")
        with pytest.raises(InvalidArgument, match="outside"):
            conn.read(memoryview(bytearray(BS)), 16 * MiB)
        conn.ping()  # the connection survives errors


def test_a_reader_cannot_change_anything(server: RunningServer) -> None:
    with ReplicaConnection(server.address, SECRET) as reader:
        with pytest.raises(InvalidArgument, match="writer session"):
            reader.write(b"x", 0)
        with pytest.raises(InvalidArgument, match="writer session"):
            reader.snapshot("s")
        assert reader.status()["revision"] == 0


def test_newer_generation_fences_the_older_engine(server: RunningServer,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    old = writer(server, generation=1)
    old.write(b"a" * BS, 0)
    new = writer(server, generation=2)
    assert server.replica.generation == 2
    with pytest.raises(StaleSession, match="newer engine"):
        old.write(b"b" * BS, 0)
    with pytest.raises(StaleSession, match="generation is 2"):
        writer(server, generation=1)
    assert "generation 1 is older than 2" in caplog.text
    expect_log(caplog, r"server: refused a writer from .*: generation 1 is older than 2")
    buf = memoryview(bytearray(BS))
    new.read(buf, 0)
    assert bytes(buf) == b"a" * BS
    new.close()
    old.close()


def test_reattaching_fences_the_old_connections_of_the_same_engine(server: RunningServer) -> None:
    first = writer(server, generation=3, token=1)
    second_lane = writer(server, generation=3, token=1)  # another lane of the same attach
    first.ping()
    second_lane.ping()
    reattached = writer(server, generation=3, token=2)
    with pytest.raises(StaleSession):
        first.ping()
    with pytest.raises((StaleSession, Unavailable)):
        second_lane.ping()
    reattached.ping()
    for conn in (first, second_lane, reattached):
        conn.close()


def test_pipelining_and_out_of_order_completion(server: RunningServer) -> None:
    with writer(server) as conn:
        conn.write(os.urandom(8 * MiB), 0)
        conn.snapshot("big")
        # a slow control request, then fast data requests behind it on the same connection
        slow = conn.send(Op.CHECKSUM, payload=proto.encode_json({"layer": "big"}))
        pings = [conn.send(Op.PING) for _ in range(20)]
        order = [conn.receive()[0].id for _ in range(21)]
        assert sorted(order) == sorted([slow, *pings])
        assert order[:20] == pings  # the data requests finished first, in order
        assert order[-1] == slow


def test_bad_frames_close_the_connection(server: RunningServer,
                                          caplog: pytest.LogCaptureFixture) -> None:
    with writer(server) as conn:
        conn.sock.sendall(b"\xff" * proto.REQUEST.size)
        with pytest.raises(Unavailable):
            conn.receive()
    assert "bad request magic" in caplog.text
    expect_log(caplog, r"server: closed the connection from .*: bad request magic")
    with writer(server) as conn:  # the server is fine
        conn.ping()


def test_error_codes_round_trip() -> None:
    for code in (errno.ENOSPC, errno.ENOENT, errno.EEXIST, errno.EINVAL, errno.ESTALE,
                 errno.EACCES, errno.EUCLEAN, errno.EIO):
        error = proto.error_from_code(code, "m")
        assert proto.error_code(error) == code
    assert proto.error_from_code(errno.ENODEV, "m").errno == errno.ENODEV

"""Races of the engine found by reading (issue 10): each test widens the window the race
needs, so that it fails on the code before the fix instead of once in a thousand runs."""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from typing import Any

import pytest

from appliance.errors import AlreadyExists
from tests.logcheck import expect_log

from .conftest import BS, Cluster, MiB, left, modes, mv, read


def test_two_add_replica_calls_start_one_rebuild(cluster: Cluster,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Both calls check that the replica is not being rebuilt; the one that loses must see
    the other's rebuild and be refused, not start a second rebuild of the same replica."""
    for _ in range(2):
        cluster.add()
    engine = cluster.engine()
    engine.write(mv(b"a" * MiB), 0)
    new = cluster.add()
    rebuild_thread = f"rebuild-{new.address[0]}:{new.address[1]}"
    created: list[str] = []

    class SlowThread(threading.Thread):
        """A rebuild thread slow to build: the time between an add_replica's check and
        its rebuild being registered, where the other call may come in."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if kwargs.get("name") == rebuild_thread:
                created.append(rebuild_thread)
                time.sleep(0.3)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(threading, "Thread", SlowThread)
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def add() -> None:
        barrier.wait()
        try:
            engine.add_replica(new.address)
        except AlreadyExists:
            outcomes.append("refused")
        else:
            outcomes.append("started")

    callers = [threading.Thread(target=add) for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(30)
    assert sorted(outcomes) == ["refused", "started"]
    assert len(created) == 1
    assert engine.wait_rebuilds(60)
    assert modes(engine) == ["RW", "RW", "RW"]
    engine.close()


class YieldingCounts(dict[str, int]):
    """Counters that give the interpreter away between reading a count and storing it back,
    as a free-threaded Python (or an unlucky switch) may: ``counts[k] += 1`` done by two
    threads at once then loses one unless a lock covers it."""

    def __getitem__(self, key: str) -> int:
        value = super().__getitem__(key)
        time.sleep(0)
        return value


def test_member_counts_are_not_lost_under_concurrent_io(cluster: Cluster) -> None:
    for _ in range(2):
        cluster.add()
    engine = cluster.engine()
    for member in engine.members:
        member.stats = YieldingCounts(member.stats)
    threads, rounds = 8, 100

    def io(index: int) -> None:
        for round_ in range(rounds):
            offset = (index * rounds + round_) * BS
            engine.write(mv(bytes([index]) * BS), offset)
            assert read(engine, offset, BS) == bytes([index]) * BS

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        workers = [threading.Thread(target=io, args=(i,)) for i in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(120)
    finally:
        sys.setswitchinterval(interval)
    replicas = engine.status()["replicas"]
    assert [r["writes"] for r in replicas] == [threads * rounds] * 2
    assert sum(r["reads"] for r in replicas) == threads * rounds
    assert engine.status()["io"]["write_ops"] == threads * rounds
    engine.close()


class Hung:
    """A replica server that accepts connections and never answers (a hung host)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self.connected = threading.Event()
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                self.connections.append(conn)
                self.connected.set()

    def close(self) -> None:
        self.listener.close()
        for conn in self.connections:
            conn.close()


def test_a_hung_target_holds_writes_no_longer_than_the_data_timeout(
        cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    """The rebuild first reaches its target with writes paused; a target that never answers
    must release them within the data timeout, not the (long) control timeout."""
    for _ in range(2):
        cluster.add()
    timeout = 1.0
    engine = cluster.engine(timeout=timeout, control_timeout=30.0)
    hung = Hung()
    try:
        engine.add_replica(hung.address)
        assert hung.connected.wait(30)  # the rebuild is talking to it: writes are paused
        started = time.monotonic()
        written = threading.Event()

        def write() -> None:
            engine.write(mv(b"w" * BS), 0)
            written.set()

        threading.Thread(target=write, daemon=True).start()
        assert written.wait(10), "writes stayed paused behind the hung replica"
        assert time.monotonic() - started < 3 * timeout
        assert read(engine, 0, BS) == b"w" * BS
        assert engine.wait_rebuilds(30)
        assert modes(engine) == ["RW", "RW", "ERR"]
    finally:
        hung.close()
    expect_log(caplog, r"rebuild of 127\.0\.0\.1:\d+ stopped: .*timed out")
    engine.close()


class Partition:
    """A TCP relay in front of a replica server that can be cut (every byte either way is
    dropped: requests are lost and nothing comes back, as with a firewall's drop rule) and
    healed (the connections that lost bytes are closed; new ones are relayed again)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self.cut = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.upstream)
                self.sockets += [client, server]
                for source, target in ((client, server), (server, client)):
                    threading.Thread(target=self._pump, args=(source, target),
                                     daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                if not self.cut.is_set():
                    target.sendall(data)

    def heal(self) -> None:
        sockets, self.sockets = self.sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.cut.clear()

    def close(self) -> None:
        self.listener.close()
        self.heal()


def test_a_ping_and_a_write_failing_on_one_replica_are_one_failure(
        cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    """The liveness ping and a write in flight time out together on a partitioned replica
    (one connection, one timeout): the replica leaves once (one new branch), the write is
    acknowledged by the other replica only once the record without it is durable there,
    and a restart serves that replica with every acknowledged write, the other behind."""
    for _ in range(2):
        cluster.add()
    cut = Partition(cluster.servers[1].address)
    cluster.servers[1].unix_path.unlink()  # the engine reaches it through the relay only
    try:
        addresses = (cluster.servers[0].address, cut.address)
        engine = cluster.engine(addresses=addresses, timeout=1.0, monitor_interval=0)
        engine.write(mv(b"0" * BS), 0)
        branches = len(engine.status()["history"])
        cut.cut.set()
        outcomes: list[str] = []
        barrier = threading.Barrier(2)

        def write() -> None:
            barrier.wait()
            engine.write(mv(b"1" * BS), 0)
            outcomes.append("acknowledged")

        def ping() -> None:
            barrier.wait()
            engine.liveness.check(engine.members[1])
            outcomes.append("pinged")

        racers = [threading.Thread(target=write), threading.Thread(target=ping)]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join(30)
        assert sorted(outcomes) == ["acknowledged", "pinged"]
        status = engine.status()
        assert modes(engine) == ["RW", "ERR"]
        assert len(status["history"]) == branches + 1  # one departure: one branch
        record = cluster.servers[0].replica.volume_record()
        assert record is not None and record["members"] == [status["replicas"][0]["replica_id"]]
        assert record["history"][-1]["id"] == status["branch"]
        engine.close()
        cut.heal()
        restart = cluster.engine(addresses=addresses, timeout=1.0, monitor_interval=0)
        assert restart.status()["started"]["behind"] == [cut_name(cut)]
        assert read(restart, 0, BS) == b"1" * BS
        assert restart.wait_rebuilds(60)
        assert modes(restart) == ["RW", "RW"]
        restart.close()
    finally:
        cut.close()
    expect_log(caplog, left(1))


def cut_name(cut: Partition) -> str:
    return f"{cut.address[0]}:{cut.address[1]}"

"""Replica servers on loopback, in this process, for engine tests. Engines built here check
their lock order (docs/engine-locks.md)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.chain import Replica
from appliance.replication import lockorder
from appliance.replication.engine import Engine, EngineConfig
from appliance.replication.server_process import RunningServer

SECRET = b"s3cret-for-tests-only-0123456789"
MiB = 1 << 20
BS = 4096


@pytest.fixture(autouse=True)
def check_lock_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every engine of these tests raises when it takes a lock out of order."""
    monkeypatch.setenv(lockorder.ENVIRONMENT, "1")


# The warnings engine tests expect (tests.logcheck.expect_log patterns).
#: any replica leaving service
LEFT = r"roster: volume vol: replica 127\.0\.0\.1:\d+ failed \("
#: a rebuild attempt that failed, or a rebuild that stopped
REBUILD_FAILED = r"rebuild: volume vol: rebuild of [\d.:]+(, attempt \d+ failed| stopped): "
#: a replica server's rebuild job that failed or was cancelled
JOB_FAILED = r"rebuild_job: rebuild from 127\.0\.0\.1:\d+ failed: "


def left(remaining: int) -> str:
    """A replica leaving service, *remaining* replicas staying in service."""
    return LEFT + rf".*\); {remaining} replica\(s\) remain in service"


def mv(data: bytes) -> memoryview:
    return memoryview(data)


def read(engine: Engine, offset: int, length: int) -> bytes:
    buf = memoryview(bytearray(length))
    engine.read(buf, offset)
    return bytes(buf)


def modes(engine: Engine) -> list[str]:
    return [r["mode"] for r in engine.status()["replicas"]]


class Cluster:
    """Replica directories and their servers; servers can be stopped and started again on
    the same address (a crash and a restart, as the engine sees them)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.servers: list[RunningServer] = []
        self.directories: list[Path] = []
        self.engines: list[Engine] = []

    def add(self, size: int = 32 * MiB) -> RunningServer:
        directory = self.root / f"replica{len(self.directories)}"
        Replica.create(directory, size).close()
        self.directories.append(directory)
        server = RunningServer(directory, ("127.0.0.1", 0), SECRET)
        self.servers.append(server)
        return server

    def addresses(self) -> tuple[tuple[str, int], ...]:
        return tuple(server.address for server in self.servers)

    def crash(self, index: int) -> None:
        self.servers[index].stop()

    def restart(self, index: int) -> RunningServer:
        old = self.servers[index]
        old.stop()
        self.servers[index] = RunningServer(self.directories[index], old.address, SECRET)
        return self.servers[index]

    def engine(self, *, salvage: bool = False, timeout: float = 5.0,
               addresses: tuple[tuple[str, int], ...] | None = None, **options: Any) -> Engine:
        engine = Engine(EngineConfig("vol", addresses or self.addresses(), SECRET,
                                     timeout=timeout, salvage=salvage, **options))
        self.engines.append(engine)
        engine.start()
        return engine

    def heads(self) -> list[bytes]:
        return [server.replica.read(0, server.replica.size) for server in self.servers
                if not server.stop_event.is_set()]

    def close(self) -> None:
        # Engines a test left running are stopped before their replicas (quietly: their
        # replicas may be gone), so that none keeps working into the next test.
        previous = logging.root.manager.disable
        logging.disable(logging.CRITICAL)
        try:
            for engine in self.engines:
                engine.close()
        finally:
            logging.disable(previous)
        for server in self.servers:
            server.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    running = Cluster(tmp_path)
    try:
        yield running
    finally:
        running.close()

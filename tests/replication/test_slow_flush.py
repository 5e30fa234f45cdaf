"""A flush that takes longer than the data timeout (it writes back what the page cache
holds, and the disk below is slow to take it) completes, and the replica stays in service:
a busy disk is not a dead one (a replica that stops answering is found by the engine's
liveness pings). The disk is held (nbdkit's pause filter) while the flush waits."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from appliance.errors import ApplianceError
from tests.faults import FaultyDisk

from .conftest import Cluster, MiB, modes, mv

DATA_TIMEOUT = 1.0


def test_a_flush_slower_than_the_data_timeout_keeps_the_replica(tmp_path: Path) -> None:
    disk = FaultyDisk(tmp_path, 256)
    cluster = Cluster(disk.mount)
    try:
        cluster.add(64 * MiB)
        engine = cluster.engine(timeout=DATA_TIMEOUT)
        for offset in range(0, 16 * MiB, MiB):  # buffered: the page cache takes them
            engine.write(mv(os.urandom(MiB)), offset)
        failures: list[ApplianceError] = []

        def flush() -> None:
            try:
                engine.flush()
            except ApplianceError as exc:
                failures.append(exc)

        disk.pause()
        flusher = threading.Thread(target=flush)
        try:
            flusher.start()
            # The write-back cannot reach the disk: the flush is still waiting well past
            # the data timeout (with that timeout it would have failed and ended).
            flusher.join(3 * DATA_TIMEOUT)
            assert flusher.is_alive(), f"the flush ended while the disk was held: {failures}"
        finally:
            disk.resume()
        flusher.join(60)
        assert not flusher.is_alive() and not failures, failures
        assert modes(engine) == ["RW"]
        engine.close()
    finally:
        cluster.close()
        disk.close()

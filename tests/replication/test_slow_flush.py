"""A flush that takes longer than the data timeout (it writes back what the page cache
holds, on a slow disk) completes, and the replica stays in service: a busy disk is not a
dead one (a replica that stops answering is found by the idle monitor's pings)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.faults import FaultyDisk

from .conftest import Cluster, MiB, modes, mv

DATA_TIMEOUT = 1.0


def test_a_flush_slower_than_the_data_timeout_keeps_the_replica(tmp_path: Path) -> None:
    disk = FaultyDisk(tmp_path, 256, write_delay="100ms")
    cluster = Cluster(disk.mount)
    try:
        cluster.add(64 * MiB)
        engine = cluster.engine(timeout=DATA_TIMEOUT)
        for offset in range(0, 16 * MiB, MiB):  # buffered: the page cache takes them
            engine.write(mv(os.urandom(MiB)), offset)
        started = time.monotonic()
        engine.flush()
        elapsed = time.monotonic() - started
        # The test's precondition, not a performance claim: the disk was slow enough.
        assert elapsed > DATA_TIMEOUT, f"the flush took {elapsed:.2f} s: the disk is too fast"
        assert modes(engine) == ["RW"]
        engine.close()
    finally:
        cluster.close()
        disk.close()

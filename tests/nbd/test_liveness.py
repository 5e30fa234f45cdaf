"""Liveness of an idle engine (docs/engine-control.md, "Liveness"), as an operator runs it:
with no I/O at all, the engine finds a replica whose server was killed or stopped, takes it
out of service with a reason naming its ping, and the volume reports it (degraded). Every
wait is on a condition, bounded."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.replication.liveness import PING_FAILED
from tests.harness import Volume, nbdsh, run, wait_for

TIMEOUT = "2"  # the engine's data timeout (seconds), which bounds a ping
#: seconds a test waits for the engine to find the replica: its ping interval (5 s) and
#: timeout, with room for a loaded host
FOUND_WITHIN = 60


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Volume]:
    created = Volume(tmp_path, 3, "64M")
    created.name = "liveness"  # its own device name (/dev/appliance/NAME)
    try:
        created.serve_all()
        created.start_engine("--timeout", TIMEOUT)
        nbdsh(created.uri, "h.pwrite(b'live' * 1024, 0); h.flush()")
        yield created
    finally:
        created.cleanup()


def idle(volume: Volume) -> dict[str, Any]:
    """Wait until the engine has pinged its replicas (it does only while no I/O flows);
    its I/O counters then."""
    wait_for(lambda: volume.status()["liveness"]["rounds"] > 0, FOUND_WITHIN,
             "the engine's first round of pings")
    return io_counters(volume.status())


def io_counters(status: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in status["io"].items() if key != "latency"}


def found(volume: Volume, index: int) -> dict[str, Any]:
    """Wait until the engine took replica *index* out of service; its status then."""
    volume.wait_mode(index, "ERR", timeout=FOUND_WITHIN)
    status = volume.status()
    replica = status["replicas"][index]
    assert replica["reason"].startswith(PING_FAILED), replica
    assert status["state"] == "degraded", status
    return status


def test_an_idle_attached_volume_finds_a_killed_replica(volume: Volume) -> None:
    run("engine", "attach", "--control", volume.control)
    before = idle(volume)
    volume.crash_server(1)  # SIGKILL
    status = found(volume, 1)
    assert io_counters(status) == before  # no I/O found it: the engine's ping did
    assert [r["mode"] for r in status["replicas"]] == ["RW", "ERR", "RW"]
    run("engine", "detach", "--control", volume.control)


def test_an_idle_volume_finds_a_hung_replica_and_never_takes_it_back_silently(
        volume: Volume) -> None:
    before = idle(volume)
    volume.signal_server(2, signal.SIGSTOP)
    try:
        status = found(volume, 2)
    finally:
        volume.signal_server(2, signal.SIGCONT)
    assert io_counters(status) == before
    assert volume.modes() == ["RW", "RW", "ERR"]  # answering again changes nothing
    run("engine", "add-replica", "--control", volume.control, volume.address(2))
    volume.wait_healthy()  # a rebuild brings it back, as for any failed replica

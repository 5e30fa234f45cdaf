"""Salvage as an operator meets it, with real processes: replica servers and engines started
with the `appliance` program, the acknowledgement oracle as the client.

The first test is the sequence that once lost acknowledged writes without anyone asking for
a salvage: two replicas in service, a third being rebuilt slowly under writes, the two
killed at the same moment, everything started again."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from tests.ackcheck import AckWorkload, verify_acknowledged
from tests.harness import MiB, Volume, alive, nbdsh, run, wait_for

TIMEOUT = "2"


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Volume]:
    created = Volume(tmp_path, 3)
    yield created
    created.cleanup()


def start(volume: Volume, indexes: list[int], *extra: str,
          check: bool = True) -> tuple[int, str, str]:
    """``engine start`` with the replicas *indexes*; (exit code, stdout, stderr)."""
    replicas = [item for index in indexes for item in ("--replica", volume.address(index))]
    result = run("engine", "start", volume.name, *replicas, "--secret-file", volume.secret,
                 "--socket", volume.socket, "--control", volume.control, "--timeout",
                 TIMEOUT, *extra, check=check)
    if result.returncode == 0:
        volume.engine_pid = int(Path(str(volume.socket) + ".pid").read_text())
    return result.returncode, result.stdout, result.stderr


def kill_servers(volume: Volume, indexes: list[int]) -> None:
    """kill -9 the servers of *indexes* at the same moment."""
    pids = [volume.server_pid(index) for index in indexes]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    for pid in pids:
        wait_for(partial(dead, pid), 30, "a replica server to die")


def dead(pid: int) -> bool:
    return not alive(pid)


def clean(report: dict[str, object]) -> None:
    assert report["lost"] == 0 and report["foreign"] == 0, report


def test_double_crash_during_rebuild_keeps_every_acknowledged_write(
        tmp_path: Path, volume: Volume) -> None:
    a, b, c = 0, 1, 2
    volume.serve(a)
    volume.serve(b)
    start(volume, [a, b], "--rebuild-bandwidth", str(MiB))
    # 16 MiB written and acknowledged on A and B
    first = AckWorkload(volume.uri, tmp_path / "first.journal", 0, 16 * MiB,
                        writes=800, max_blocks=16).start()
    summary = first.finish()
    assert summary["acked"] == 800, summary
    # C joins and is rebuilt, slowly, while writes go on elsewhere
    volume.serve(c)
    run("engine", "add-replica", "--control", volume.control, volume.address(c))
    with AckWorkload(volume.uri, tmp_path / "second.journal", 64 * MiB, 32 * MiB,
                     rate=1000) as second:
        wait_for(lambda: (volume.status()["replicas"][c].get("rebuild") or {})
                 .get("copied_bytes", 0) > 0, 60, "C to copy")
        assert volume.modes()[c] == "WO"
        kill_servers(volume, [a, b])
        wait_for(lambda: volume.status()["state"] == "faulted", 60, "the volume to fault")
        second.stop()
    run("engine", "stop", "--control", volume.control)
    volume.serve(a)
    volume.serve(b)
    # C alone cannot serve: its record names A and B, the replicas that hold the data
    code, _, stderr = start(volume, [c], check=False)
    assert code == 1 and "cannot be reached" in stderr and "Traceback" not in stderr
    code, _, stderr = start(volume, [c], "--salvage", check=False)
    assert code == 1 and "no reachable replica is a member" in stderr
    # Without --salvage, from A and B; C is rebuilt
    _, stdout, _ = start(volume, [a, b, c])
    assert "salvaged" not in stdout and volume.address(c) in stdout  # rebuilding (behind)
    status = volume.status()
    assert status["salvage"] is None and status["replicas"][c]["mode"] != "RW"
    clean(verify_acknowledged(volume.uri, first.journal))
    clean(verify_acknowledged(volume.uri, second.journal))
    volume.wait_healthy(180)
    volume.stop_engine()
    for index in (a, b, c):
        volume.stop_server(index)
    volume.replicas_identical()


def test_divergent_histories_refused_then_chosen(tmp_path: Path, volume: Volume) -> None:
    a, b = 0, 1
    volume.serve_all()
    start(volume, [a, b])

    def write(text: bytes, offset: int) -> None:
        nbdsh(volume.uri, f"h.pwrite({text!r} * 4096, {offset}); h.flush()")

    write(b"1", 0)
    volume.crash_server(b)
    write(b"A", 4096)  # A only
    run("engine", "stop", "--control", volume.control)
    volume.crash_server(a)
    volume.serve(b)
    code, _, stderr = start(volume, [a, b], check=False)
    assert code == 1 and "cannot be reached" in stderr and "Traceback" not in stderr
    _, stdout, _ = start(volume, [a, b], "--salvage-from", volume.address(b))
    assert "salvaged at" in stdout and f"from {volume.address(b)}" in stdout
    status = volume.status()
    assert status["salvage"]["from"] == volume.address(b)
    write(b"B", 8192)  # B's branch
    run("engine", "stop", "--control", volume.control)
    volume.stop_server(b)
    volume.serve(a)
    start(volume, [a])  # A's own record names only A: it serves its branch
    write(b"a", 12288)
    run("engine", "stop", "--control", volume.control)
    volume.serve(b)
    code, _, stderr = start(volume, [a, b], check=False)
    assert code == 1 and "diverged" in stderr and "--salvage-from" in stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    _, stdout, _ = start(volume, [a, b], "--salvage-from", volume.address(a))
    assert "kept (diverged)" in stdout
    status = json.loads(run("engine", "status", "--control", volume.control, "-o",
                            "json").stdout)
    assert [r["mode"] for r in status["replicas"]] == ["RW", "ERR"]
    assert "diverged" in status["replicas"][b]
    refused = run("engine", "add-replica", "--control", volume.control, volume.address(b),
                  check=False)
    assert refused.returncode == 1 and "--discard" in refused.stderr
    run("engine", "add-replica", "--control", volume.control, volume.address(b), "--discard")
    volume.wait_healthy()
    volume.stop_engine()
    volume.stop_server(a)
    volume.stop_server(b)
    image = volume.replicas_identical([a, b])[0].read_bytes()
    assert image[:16384] == b"1" * 4096 + b"A" * 4096 + bytes(4096) + b"a" * 4096

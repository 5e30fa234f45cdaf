"""A disk whose file system hangs (a FUSE file system, built here from hungfs.c, whose
statfs does not answer while a gate file exists) does not stop the daemon: ``/healthz``,
``volume list``, ``disk list`` and ``volume create`` answer within seconds, the disk
shown with unknown usage and given no replica; once it answers again, so does its usage.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.harness import Node, wait_for

T = TypeVar("T")
SOURCE = Path(__file__).with_name("hungfs.c")
ANSWER = 10.0  # seconds within which the API answers while the disk hangs


@pytest.fixture
def hungfs(tmp_path: Path) -> Path:
    """The hungfs program, compiled."""
    assert shutil.which("gcc") and Path("/dev/fuse").exists(), \
        "needs gcc and FUSE: run ./setup.sh, which installs gcc and libfuse3-dev"
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True,
                           text=True, check=True).stdout.split()
    binary = tmp_path / "hungfs"
    subprocess.run(["gcc", "-Wall", "-o", str(binary), str(SOURCE), *flags], check=True,
                   timeout=120)
    return binary


@pytest.fixture
def hung_disk(node: Node, tmp_path: Path, hungfs: Path) -> Iterator[Path]:
    """A disk of the node whose statfs hangs, from when it is yielded until the end."""
    disk = tmp_path / "disk3"
    disk.mkdir()
    node.cli("disk", "add", disk, "--tag", "hung")
    gate = tmp_path / "statfs-gate"
    gate.touch()
    fs = subprocess.Popen([str(hungfs), str(gate), str(disk), "-f"], stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    probe = threading.Thread(target=os.statvfs, args=(disk,), daemon=True)
    try:
        wait_for(lambda: os.path.ismount(disk), 30, "the FUSE file system to be mounted")
        probe.start()
        probe.join(1.0)
        assert probe.is_alive(), "statfs of the FUSE file system does not hang"
        yield disk
    finally:
        gate.unlink(missing_ok=True)  # everything blocked in its statfs goes on
        if probe.is_alive():
            probe.join(30)
        subprocess.run(["fusermount3", "-u", "-z", str(disk)], check=False, timeout=60)
        try:
            fs.wait(timeout=30)
        finally:
            if fs.poll() is None:
                fs.kill()
                fs.wait(timeout=30)


def timed(what: str, call: Callable[[], T]) -> T:
    started = time.monotonic()
    result = call()
    assert time.monotonic() - started < ANSWER, f"{what} took over {ANSWER} s"
    return result


def healthz(node: Node) -> int:
    with urllib.request.urlopen(node.url + "/healthz", timeout=ANSWER) as response:
        return int(response.status)


def disks(node: Node) -> dict[str, dict[str, Any]]:
    listed = json.loads(node.cli("disk", "list", "-o", "json", timeout=ANSWER).stdout)
    return {d["path"]: d for d in listed}


def volume_names(node: Node) -> list[str]:
    listed = json.loads(node.cli("volume", "list", "-o", "json", timeout=ANSWER).stdout)
    return [v["name"] for v in listed]


def test_a_hung_disk_does_not_stop_the_api(node: Node, hung_disk: Path) -> None:
    node.cli("volume", "create", "before", "--size", "16M", "--replicas", "1")
    assert timed("/healthz", lambda: healthz(node)) == 200
    assert timed("volume list", lambda: volume_names(node)) == ["before"]
    shown = timed("disk list", lambda: disks(node))
    hung = shown[str(hung_disk)]
    assert hung["capacity"] == 0 and hung["available"] == 0
    assert shown[str(node.root / "disk2")]["capacity"] > 0
    # a new volume goes to a disk that answers; one that asks for the hung disk is refused
    timed("volume create", lambda: node.cli("volume", "create", "during", "--size", "16M",
                                            "--replicas", "1", timeout=ANSWER))
    assert node.volume("during")["replica_list"][0]["disk"] != hung["name"]
    refused = timed("volume create", lambda: node.cli(
        "volume", "create", "on-hung", "--size", "16M", "--replicas", "1", "--disk-tag",
        "hung", check=False, timeout=ANSWER))
    assert refused.returncode == 1
    assert "does not answer" in refused.stderr
    assert timed("/healthz", lambda: healthz(node)) == 200
    assert timed("volume list", lambda: volume_names(node)) == ["before", "during"]
    (hung_disk.parent / "statfs-gate").unlink()  # it answers again
    wait_for(lambda: disks(node)[str(hung_disk)]["capacity"] == 1 << 30, 30,
             "the disk's usage once it answers")


"""Evicting a disk: its replicas move to other disks (rebuilt online for an attached
volume, copied for a detached one) with their data and snapshots; then it can be removed.
Through the real CLI against a real daemon."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.harness import MiB, Node, run, wait_for
from tests.node.test_volume_ops import write_at


def disks(node: Node) -> dict[str, dict[str, Any]]:
    return {d["path"]: d for d in json.loads(node.cli("disk", "list", "-o", "json").stdout)}


def read(device: str, size: int) -> bytes:
    with open(device, "rb") as block:
        return block.read(size)


def test_evict_a_disk_then_remove_it(node: Node, tmp_path: Path) -> None:
    evicted = disks(node)[str(tmp_path / "disk2")]["name"]
    cold_data, hot_data = os.urandom(2 * MiB), os.urandom(2 * MiB)
    node.cli("volume", "create", "cold", "--size", "16M", "--replicas", "2")
    device = node.cli("volume", "attach", "cold").stdout.strip()
    write_at(device, 0, cold_data[:MiB])
    node.cli("snapshot", "create", "cold", "s1")
    write_at(device, MiB, cold_data[MiB:])
    node.cli("volume", "detach", "cold")
    node.cli("volume", "create", "single", "--size", "16M", "--replicas", "1", "--disk-tag",
             "second")
    device = node.cli("volume", "attach", "single").stdout.strip()
    write_at(device, 0, cold_data)
    node.cli("volume", "detach", "single")
    node.cli("volume", "create", "hot", "--size", "16M", "--replicas", "2")
    hot = node.cli("volume", "attach", "hot").stdout.strip()
    write_at(hot, 0, hot_data)
    assert {r["disk"] for r in node.volume("hot")["replica_list"]} >= {evicted}

    third = tmp_path / "disk3"
    third.mkdir()
    node.cli("disk", "add", third, "--tag", "second")  # where single may go
    said = node.cli("disk", "update", evicted, "--evict").stdout
    assert "evicting" in said
    refused = node.cli("disk", "remove", evicted, check=False)
    assert refused.returncode == 1 and "--evict" in refused.stderr

    wait_for(lambda: disks(node)[str(tmp_path / "disk2")]["replicas"] == [], 180,
             "the disk to hold no replica")
    wait_for(lambda: node.volume("hot")["robustness"] == "healthy", 120, "hot healthy")
    target = disks(node)[str(third)]["name"]
    for name in ("hot", "cold"):
        placed = {r["disk"] for r in node.volume(name)["replica_list"]}
        assert evicted not in placed and target in placed and len(placed) == 2, (name, placed)
    assert [r["disk"] for r in node.volume("single")["replica_list"]] != [evicted]
    assert read(hot, len(hot_data)) == hot_data  # served throughout
    cold = node.cli("volume", "attach", "cold").stdout.strip()
    assert read(cold, len(cold_data)) == cold_data
    assert node.volume("cold")["robustness"] == "healthy"
    assert [s["name"] for s in json.loads(node.cli("snapshot", "list", "cold", "-o",
                                                   "json").stdout)] == ["s1"]
    node.cli("volume", "detach", "cold")
    # every replica, read from its directory, holds the data (the moved ones included)
    for name, data in (("cold", cold_data), ("single", cold_data)):
        for replica in node.volume(name)["replica_list"]:
            image = tmp_path / "image"
            run("replica", "export", replica["directory"], image, "--force")
            assert image.read_bytes()[:len(data)] == data, (name, replica)
    for replica in node.volume("hot")["replica_list"]:
        assert replica["mode"] == "RW"
    assert not list((tmp_path / "disk2" / "replicas").iterdir())

    node.cli("disk", "remove", evicted)
    assert str(tmp_path / "disk2") not in disks(node)
    kinds = [e["kind"] for e in json.loads(node.cli("events", "-o", "json").stdout)]
    assert kinds.count("replica-evicted") == 3 and "eviction-started" in kinds


def _replicas_hold(node: Node, tmp_path: Path, volume: str, data: bytes) -> None:
    for replica in node.volume(volume)["replica_list"]:
        image = tmp_path / "image"
        run("replica", "export", replica["directory"], image, "--force")
        assert image.read_bytes()[:len(data)] == data, (volume, replica)


@pytest.mark.slow  # 20 s; the default suite keeps the plain eviction (run with -m slow)
def test_eviction_survives_a_daemon_kill_and_can_be_called_off(node: Node,
                                                               tmp_path: Path) -> None:
    evicted = disks(node)[str(tmp_path / "disk2")]["name"]
    third = tmp_path / "disk3"
    third.mkdir()
    node.cli("disk", "add", third)
    data = os.urandom(4 * MiB)
    for name in ("a", "b"):
        node.cli("volume", "create", name, "--size", "16M", "--replicas", "2")
        device = node.cli("volume", "attach", name).stdout.strip()
        write_at(device, 0, data)
        if name == "a":
            node.cli("volume", "detach", name)
    # killed at once after the request: the next start carries the eviction out
    node.cli("disk", "update", evicted, "--evict")
    node.stop(signal.SIGKILL)
    node.start()
    wait_for(lambda: disks(node)[str(tmp_path / "disk2")]["replicas"] == [], 180,
             "the disk to hold no replica")
    wait_for(lambda: node.volume("b")["robustness"] == "healthy", 120, "b healthy")
    node.cli("volume", "detach", "b")
    for name in ("a", "b"):
        assert len(node.volume(name)["replica_list"]) == 2
        _replicas_hold(node, tmp_path, name, data)

    # called off at once: whichever way the race goes, c keeps two whole replicas
    node.cli("disk", "update", evicted, "--no-evict")
    node.cli("volume", "create", "c", "--size", "16M", "--replicas", "2")
    device = node.cli("volume", "attach", "c").stdout.strip()
    write_at(device, 0, data)
    node.cli("volume", "detach", "c")
    node.cli("disk", "update", evicted, "--evict")
    node.cli("disk", "update", evicted, "--no-evict")
    wait_for(lambda: len(node.volume("c")["replica_list"]) == 2, 120, "c at two replicas")
    node.cli("volume", "attach", "c")
    wait_for(lambda: node.volume("c")["robustness"] == "healthy", 120, "c healthy")
    node.cli("volume", "detach", "c")
    assert len(node.volume("c")["replica_list"]) == 2
    _replicas_hold(node, tmp_path, "c", data)

"""What an operator types must not hurt the data or leave a mess (issue: operator safety):
each test goes through the real CLI against a real daemon."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from appliance.node.supervisor import SHORT_SOCKETS
from tests.harness import Node, wait_for
from tests.node.test_volume_ops import write_at


def _mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as mounts:
        return any(line.split()[4] == str(path) for line in mounts)


def _fuse_mounts(node: Node) -> list[str]:
    """Mounts left below the daemon's run directory (nbdfuse's)."""
    run_dir = str(node.data / "run")
    with open("/proc/self/mountinfo") as mounts:
        return [line.split()[4] for line in mounts if line.split()[4].startswith(run_dir)]


def test_mounted_volume_is_not_detached_or_deleted(node: Node, tmp_path: Path) -> None:
    device = node.cli("volume", "attach", "t", check=False)
    assert device.returncode == 3  # no such volume yet
    node.cli("volume", "create", "t", "--size", "64M", "--replicas", "2")
    device_path = node.cli("volume", "attach", "t").stdout.strip()
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", device_path], check=True)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    subprocess.run(["mount", device_path, str(mountpoint)], check=True)
    payload = os.urandom(1 << 20)
    try:
        (mountpoint / "data").write_bytes(payload)
        for command in (["volume", "detach", "t"], ["volume", "delete", "t"]):
            refused = node.cli(*command, check=False)
            assert refused.returncode == 1, refused
            assert f"mounted at {mountpoint}" in refused.stderr
            assert "--force" in refused.stderr
        # nothing changed: still attached and served, the file system still writable
        info = node.volume("t")
        assert (info["state"], info["attached"], info["deleting"]) == ("attached", True, False)
        (mountpoint / "more").write_bytes(payload)
        os.sync()
        assert (mountpoint / "data").read_bytes() == payload
        # open (not mounted): refused too, naming the process
        subprocess.run(["umount", str(mountpoint)], check=True)
        with open(device_path, "rb"):
            refused = node.cli("volume", "detach", "t", check=False)
        assert refused.returncode == 1 and f"process {os.getpid()}" in refused.stderr
        subprocess.run(["mount", device_path, str(mountpoint)], check=True)

        forced = node.cli("volume", "detach", "t", "--force")
        assert "detached" in forced.stdout
    finally:
        if _mounted(mountpoint):
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)
    assert not _mounted(mountpoint)
    assert _fuse_mounts(node) == []  # no dead FUSE mount behind
    events = node.cli("event", "list", "--volume", "t").stdout
    assert "forced-detach" in events and str(mountpoint) in events

    # the data written through the file system reached the volume before the detach
    device_path = node.cli("volume", "attach", "t").stdout.strip()
    subprocess.run(["fsck.ext4", "-n", "-f", device_path], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "ro", device_path, str(mountpoint)], check=True)
    try:
        assert (mountpoint / "data").read_bytes() == payload
        assert (mountpoint / "more").read_bytes() == payload
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
    node.cli("volume", "delete", "t")
    assert node.cli("volume", "show", "t", check=False).returncode == 3


def test_attach_cleans_a_dead_fuse_mount_of_its_own(node: Node) -> None:
    """An nbdfuse killed under an attached volume leaves a dead FUSE mount; the next
    attach of that volume must not trip over it."""
    node.cli("volume", "create", "dead", "--size", "16M", "--replicas", "1")
    node.cli("volume", "attach", "dead")
    state = node.data / "run" / "dead" / "ctl.sock.attach"
    pid = json.loads(state.read_text()).get("nbdfuse_pid")
    if pid is None:
        pytest.skip("attached with the kernel nbd driver: no FUSE mount to go stale")
    node.cli("volume", "detach", "dead")
    # what an old detach left: the mount of a dead nbdfuse at the volume's FUSE directory
    fuse_dir = state.with_name(state.name + ".fuse")
    fuse_dir.mkdir(mode=0o700)
    killed = subprocess.Popen(["nbdfuse", str(fuse_dir / "dead"), "--command", "nbdkit",
                               "-s", "memory", "1M"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        wait_for(lambda: _mounted(fuse_dir), 30, "nbdfuse to mount")
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
    assert _mounted(fuse_dir)  # dead now: "Transport endpoint is not connected"
    device = node.cli("volume", "attach", "dead").stdout.strip()
    with open(device, "rb") as block:
        assert block.read(4096) == bytes(4096)
    node.cli("volume", "detach", "dead")
    assert _fuse_mounts(node) == []


def test_longest_volume_name_works_everywhere(node: Node, tmp_path: Path) -> None:
    """Every name the API accepts can be created, attached, written, snapshotted, cloned,
    detached and deleted (a long name once made socket paths too long to bind)."""
    name = "v" * 128
    too_long = node.cli("volume", "create", name + "x", "--size", "16M", check=False)
    assert too_long.returncode == 2 and "at most 128" in too_long.stderr
    node.cli("volume", "create", name, "--size", "16M", "--replicas", "2")
    device = node.cli("volume", "attach", name, "--timeout", "120").stdout.strip()
    natural = node.data / "run" / name / "nbd.sock"
    short = SHORT_SOCKETS / f"{hashlib.sha256(bytes(natural)).hexdigest()[:32]}.sock"
    assert short.is_socket()  # served there: the natural path is too long
    payload = os.urandom(4096)
    write_at(device, 8192, payload)
    node.cli("snapshot", "create", name, "s")
    node.cli("volume", "detach", name)
    node.cli("volume", "clone", name, "c", "--snapshot", "s")
    device = node.cli("volume", "attach", "c").stdout.strip()
    with open(device, "rb") as block:
        block.seek(8192)
        assert block.read(4096) == payload
    node.cli("volume", "detach", "c")
    node.cli("volume", "delete", name)
    assert not short.exists() and not short.with_name(short.name + ".pid").exists()


def test_replica_port_taken_by_another_program(node: Node) -> None:
    """A replica whose port another program took meanwhile is moved to a free port (the
    event names the holder), and the volume serves with all its replicas and its data."""
    node.cli("volume", "create", "ported", "--size", "16M", "--replicas", "2")
    device = node.cli("volume", "attach", "ported").stdout.strip()
    payload = os.urandom(65536)
    write_at(device, 0, payload)
    node.cli("volume", "detach", "ported")
    replica = node.volume("ported")["replica_list"][0]
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", replica["port"]))
        squatter.listen()
        device = node.cli("volume", "attach", "ported", "--timeout", "120").stdout.strip()
        wait_for(lambda: node.volume("ported")["robustness"] == "healthy", 120,
                 "both replicas in service")
        with open(device, "rb") as block:
            assert block.read(65536) == payload
        moved = next(r for r in node.volume("ported")["replica_list"]
                     if r["name"] == replica["name"])
        assert moved["port"] != replica["port"]
        events = node.cli("event", "list", "--volume", "ported").stdout
        assert "replica-port-moved" in events and f"process {os.getpid()}" in events
    node.cli("volume", "detach", "ported")


def test_failed_clone_leaves_nothing_behind(node: Node) -> None:
    node.cli("volume", "create", "src", "--size", "16M", "--replicas", "2")
    before = node.cli("snapshot", "list", "src", "-o", "json").stdout
    for attached in (False, True):
        refused = node.cli("volume", "clone", "src", "c3", "--replicas", "3", check=False)
        assert refused.returncode == 1 and "c3" not in node.cli("volume", "list").stdout
        assert "disk" in refused.stderr  # placement says why
        assert node.cli("snapshot", "list", "src", "-o", "json").stdout == before
        if not attached:
            node.cli("volume", "attach", "src")
    node.cli("volume", "clone", "src", "c2", "--replicas", "2")  # the same request, placeable
    assert [s["name"] for s in json.loads(node.cli("snapshot", "list", "src", "-o",
                                                    "json").stdout)] == ["clone-c2"]


def test_disk_update_and_remove(node: Node, tmp_path: Path) -> None:
    disks = {d["path"]: d for d in json.loads(node.cli("disk", "list", "-o", "json").stdout)}
    second = disks[str(tmp_path / "disk2")]["name"]
    default = next(name for path, name in ((p, d["name"]) for p, d in disks.items())
                   if name != second)
    node.cli("volume", "create", "held", "--size", "16M", "--replicas", "1", "--disk-tag",
             "second")
    refused = node.cli("disk", "remove", second, check=False)
    assert refused.returncode == 1 and "held-" in refused.stderr and "volume held" in \
        refused.stderr
    assert second in node.cli("disk", "list").stdout  # nothing changed
    missing = node.cli("disk", "remove", "nope", check=False)
    assert missing.returncode == 3 and second in missing.stderr  # names the known disks

    node.cli("disk", "update", default, "--no-scheduling")
    no_room = node.cli("volume", "create", "two", "--size", "16M", "--replicas", "2",
                       check=False)
    assert no_room.returncode == 1 and "scheduling is disabled" in no_room.stderr
    node.cli("disk", "update", default, "--scheduling", "--tag", "fast", "--reserved", "1M")
    info = {d["name"]: d for d in json.loads(node.cli("disk", "list", "-o", "json").stdout)}
    assert info[default]["tags"] == ["fast"] and info[default]["storage_reserved"] == 1 << 20
    assert info[default]["allow_scheduling"] is True
    node.cli("volume", "create", "two", "--size", "16M", "--replicas", "2")

    node.cli("volume", "delete", "held")
    node.cli("volume", "delete", "two")
    node.cli("disk", "remove", second)
    assert second not in node.cli("disk", "list").stdout
    assert (tmp_path / "disk2").is_dir()  # its directory is left
    kinds = [e["kind"] for e in json.loads(node.cli("events", "-o", "json").stdout)]
    assert "disk-updated" in kinds and "disk-removed" in kinds

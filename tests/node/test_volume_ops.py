"""Snapshots, revert, clone, expand and trim through the CLI against a real daemon, with
contents checked byte for byte; snapshot under load (RELIABILITY row 12)."""

from __future__ import annotations

import json
import mmap
import os
import struct
import subprocess
import threading
from pathlib import Path

from tests.harness import MiB, Node, run, wait_for

BLOCK = 4096


def write_at(device: str, offset: int, data: bytes) -> None:
    fd = os.open(device, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_all(device: str) -> bytes:
    with open(device, "rb") as block:
        return block.read()


def device_size(device: str) -> int:
    fd = os.open(device, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def snapshots(node: Node, volume: str) -> list[dict[str, object]]:
    result: list[dict[str, object]] = json.loads(
        node.cli("snapshot", "list", volume, "--all", "-o", "json").stdout)
    return result


def export(directory: str, snapshot: str | None, destination: Path) -> bytes:
    extra = ["--snapshot", snapshot] if snapshot else []
    run("replica", "export", directory, destination, *extra, "--force")
    return destination.read_bytes()


def test_snapshot_revert_clone_purge(node: Node, tmp_path: Path) -> None:
    size = 32 * MiB
    node.cli("volume", "create", "src", "--size", "32M", "--replicas", "2")
    device = node.cli("volume", "attach", "src").stdout.strip()
    first, second = os.urandom(3 * MiB), os.urandom(2 * MiB)
    write_at(device, MiB, first)
    node.cli("snapshot", "create", "src", "one")  # online
    image_one = read_all(device)
    assert image_one == bytes(MiB) + first + bytes(size - 4 * MiB)
    write_at(device, 2 * MiB, second)
    image_two = read_all(device)
    assert [s["name"] for s in snapshots(node, "src")] == ["one"]

    # a clone of an attached volume's snapshot holds exactly that snapshot
    node.cli("volume", "clone", "src", "copy1", "--snapshot", "one")
    assert node.volume("copy1")["state"] == "detached"

    refused = node.cli("snapshot", "revert", "src", "one", check=False)
    assert refused.returncode == 1 and "detach" in refused.stderr
    node.cli("volume", "detach", "src")

    # a clone of a detached volume, from a snapshot taken for it
    node.cli("volume", "clone", "src", "copy2")
    node.cli("snapshot", "revert", "src", "one")  # offline
    device = node.cli("volume", "attach", "src").stdout.strip()
    assert read_all(device) == image_one
    assert node.volume("src")["robustness"] == "healthy"  # no replica left behind

    copy1 = node.cli("volume", "attach", "copy1").stdout.strip()
    assert read_all(copy1) == image_one
    assert node.volume("copy1")["robustness"] == "healthy"
    copy2 = node.cli("volume", "attach", "copy2").stdout.strip()
    assert read_all(copy2) == image_two
    assert [s["name"] for s in snapshots(node, "copy2")] == []  # a clone starts flat

    # delete and purge online; the data stays
    node.cli("snapshot", "create", "src", "two")
    node.cli("snapshot", "delete", "src", "one")
    assert {s["name"]: s["removed"] for s in snapshots(node, "src")} == \
        {"one": True, "clone-copy2": False, "two": False}
    node.cli("snapshot", "purge", "src")  # "one" has two children: it must stay
    assert {s["name"]: s["removed"] for s in snapshots(node, "src")} == \
        {"one": True, "clone-copy2": False, "two": False}
    node.cli("snapshot", "delete", "src", "clone-copy2")
    node.cli("snapshot", "purge", "src")
    assert [s["name"] for s in snapshots(node, "src")] == ["two"]
    assert read_all(device) == image_one
    node.cli("volume", "detach", "src")
    for replica in node.volume("src")["replica_list"]:
        assert export(replica["directory"], None, tmp_path / "head.img") == image_one

    missing = node.cli("snapshot", "revert", "src", "nope", check=False)
    assert missing.returncode == 3 and "does not exist" in missing.stderr
    bad = node.cli("snapshot", "create", "src", "a/b", check=False)
    assert bad.returncode == 2 and "snapshot name" in bad.stderr


def ext4_bytes(device: str) -> int:
    dumped = subprocess.run(["dumpe2fs", "-h", device], capture_output=True, text=True,
                            check=True).stdout
    fields = dict(line.split(":", 1) for line in dumped.splitlines() if ":" in line)
    return int(fields["Block count"]) * int(fields["Block size"])


def _capable(bit: int) -> bool:
    status = Path("/proc/self/status").read_text()
    return bool(int(status.split("CapEff:")[1].split()[0], 16) >> bit & 1)


CAN_RESIZE_MOUNTED_EXT4 = _capable(24)  # CAP_SYS_RESOURCE


def test_expand_offline_and_online(node: Node, tmp_path: Path) -> None:
    node.cli("volume", "create", "grow", "--size", "32M", "--replicas", "2")
    node.cli("volume", "expand", "grow", "--size", "48M")  # offline
    assert node.volume("grow")["size"] == 48 * MiB
    device = node.cli("volume", "attach", "grow").stdout.strip()
    assert device_size(device) == 48 * MiB
    payload = os.urandom(MiB)
    write_at(device, 47 * MiB, payload)  # the new space is usable
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", device], check=True)
    node.cli("volume", "expand", "grow", "--size", "64M", "--resize-fs")  # online, unmounted
    assert node.volume("grow")["device"] == device
    assert device_size(device) == 64 * MiB and ext4_bytes(device) == 64 * MiB
    subprocess.run(["fsck.ext4", "-n", "-f", device], check=True, capture_output=True)

    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    subprocess.run(["mount", device, str(mountpoint)], check=True)
    try:
        data = os.urandom(8 * MiB)
        (mountpoint / "before").write_bytes(data)
        node.cli("volume", "expand", "grow", "--size", "96M")  # the device grows in use
        assert device_size(device) == 96 * MiB
        if not CAN_RESIZE_MOUNTED_EXT4:
            refused = node.cli("volume", "expand", "grow", "--size", "112M", "--resize-fs",
                               check=False)
            assert refused.returncode == 1 and "CAP_SYS_RESOURCE" in refused.stderr
            assert node.volume("grow")["size"] == 96 * MiB  # refused before any change
        else:
            node.cli("volume", "expand", "grow", "--size", "112M", "--resize-fs")
            (mountpoint / "after").write_bytes(os.urandom(60 * MiB))  # needs the new space
        assert (mountpoint / "before").read_bytes() == data
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
    subprocess.run(["fsck.ext4", "-n", "-f", device], check=True, capture_output=True)
    node.cli("volume", "expand", "grow", "--size", "112M", "--resize-fs")  # unmounted
    assert ext4_bytes(device) == 112 * MiB
    shrink = node.cli("volume", "expand", "grow", "--size", "16M", check=False)
    assert shrink.returncode == 2 and "only grow" in shrink.stderr
    node.cli("volume", "detach", "grow")
    for replica in node.volume("grow")["replica_list"]:
        info = json.loads(run("replica", "inspect", replica["directory"], "-o", "json").stdout)
        assert info["size"] == 112 * MiB
    device = node.cli("volume", "attach", "grow").stdout.strip()
    assert device_size(device) == 112 * MiB
    subprocess.run(["mount", "-o", "ro", device, str(mountpoint)], check=True)
    try:
        assert (mountpoint / "before").read_bytes() == data
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def test_expand_mounted_xfs(node: Node, tmp_path: Path) -> None:
    """A mounted xfs file system grows online with the volume."""
    node.cli("volume", "create", "xfs", "--size", "320M", "--replicas", "2")
    device = node.cli("volume", "attach", "xfs").stdout.strip()
    subprocess.run(["mkfs.xfs", "-q", "-f", "-K", device], check=True)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    subprocess.run(["mount", device, str(mountpoint)], check=True)
    try:
        data = os.urandom(8 * MiB)
        (mountpoint / "before").write_bytes(data)
        before = os.statvfs(mountpoint)
        node.cli("volume", "expand", "xfs", "--size", "448M", "--resize-fs")
        after = os.statvfs(mountpoint)
        assert after.f_blocks * after.f_frsize >= before.f_blocks * before.f_frsize + 120 * MiB
        assert device_size(device) == 448 * MiB
        assert (mountpoint / "before").read_bytes() == data
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
    subprocess.run(["xfs_repair", "-n", device], check=True, capture_output=True)


def test_trim_returns_space(node: Node, tmp_path: Path) -> None:
    node.cli("volume", "create", "thin", "--size", "128M", "--replicas", "2")
    device = node.cli("volume", "attach", "thin").stdout.strip()
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", device], check=True)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    subprocess.run(["mount", device, str(mountpoint)], check=True)
    try:
        (mountpoint / "data").write_bytes(os.urandom(48 * MiB))
        subprocess.run(["sync"], check=True)
        directories = [r["directory"] for r in node.volume("thin")["replica_list"]]

        def allocated() -> list[int]:
            return [sum(f.stat().st_blocks * 512 for f in Path(d).glob("layer-*"))
                    for d in directories]

        before = allocated()
        assert all(b >= 48 * MiB for b in before), before
        (mountpoint / "data").unlink()
        subprocess.run(["sync", "-f", str(mountpoint)], check=True)  # the blocks are free
        subprocess.run(["fstrim", "-v", str(mountpoint)], check=True)
        after = allocated()
        assert all(a <= b - 40 * MiB for a, b in zip(after, before, strict=True)), \
            (before, after)
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def test_snapshot_under_load(node: Node, tmp_path: Path) -> None:
    """Row 12: sequence-numbered writes while snapshots are taken; each snapshot holds
    exactly a prefix of the sequence that includes every write acknowledged before it."""
    blocks = 8192
    node.cli("volume", "create", "seq", "--size", str(blocks * BLOCK), "--replicas", "2")
    device = node.cli("volume", "attach", "seq").stdout.strip()
    acknowledged = 0
    stop = threading.Event()
    failure: list[BaseException] = []

    def writer() -> None:
        nonlocal acknowledged
        fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
        page = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT wants
        try:
            sequence = 1
            while not stop.is_set() and sequence < blocks:
                page.seek(0)
                page.write(struct.pack("<Q", sequence) * (BLOCK // 8))
                os.pwrite(fd, page, sequence * BLOCK)
                acknowledged = sequence
                sequence += 1
        except BaseException as exc:
            failure.append(exc)
        finally:
            page.close()
            os.close(fd)

    thread = threading.Thread(target=writer)
    thread.start()
    bounds: dict[str, tuple[int, int]] = {}
    try:
        for index in range(5):
            wait_for(lambda: acknowledged > 0, 30, "the first write")
            before = acknowledged
            name = f"s{index}"
            node.cli("snapshot", "create", "seq", name)
            bounds[name] = (before, acknowledged)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not failure, failure
    node.cli("volume", "detach", "seq")
    for name, (low, high) in bounds.items():
        seen = set()
        for replica in node.volume("seq")["replica_list"]:
            image = export(replica["directory"], name, tmp_path / f"{name}.img")
            present = set()
            for sequence in range(1, blocks):
                block = image[sequence * BLOCK:(sequence + 1) * BLOCK]
                if block != bytes(BLOCK):
                    assert block == struct.pack("<Q", sequence) * (BLOCK // 8), \
                        f"snapshot {name}: block {sequence} is damaged"
                    present.add(sequence)
            last = max(present, default=0)
            assert present == set(range(1, last + 1)), f"snapshot {name} has a gap"
            assert low <= last <= high, (name, low, last, high)
            seen.add(last)
        assert len(seen) == 1, f"replicas differ in snapshot {name}: {seen}"

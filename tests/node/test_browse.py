"""Browsing snapshots and backups as files, on a real daemon with real file systems:
files written before a snapshot read back byte-exact from ``snapshot mount`` (attached, as
the volume keeps changing, and detached) and from ``backup mount``, which fetches only the
blocks the files need (counted by the mount's helper) and serves an image bit-exact with
the snapshot backed up; bad input changes nothing."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.harness import MiB, Node, run, wait_for


def mounts(node: Node) -> list[dict[str, Any]]:
    response = httpx.get(node.url + "/v1/mounts", headers={
        "Authorization": f"Bearer {node.token_file.read_text().strip()}"})
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()
    return found


@contextmanager
def mounted(device: str, where: Path) -> Iterator[Path]:
    where.mkdir(exist_ok=True)
    subprocess.run(["mount", device, str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def snapshot_frozen(node: Node, volume: str, name: str, mountpoint: Path) -> None:
    """Take a snapshot with the file system frozen, as an operator does for a consistent
    one (the journal is flushed: the browse mount replays none)."""
    subprocess.run(["fsfreeze", "-f", str(mountpoint)], check=True)
    try:
        node.cli("snapshot", "create", volume, name)
    finally:
        subprocess.run(["fsfreeze", "-u", str(mountpoint)], check=True)


def write_files(root: Path, count: int, size: int, seed: str) -> dict[str, bytes]:
    files = {}
    for index in range(count):
        data = hashlib.shake_256(f"{seed}-{index}".encode()).digest(size)
        (root / f"file-{index}").write_bytes(data)
        files[f"file-{index}"] = data
    os.sync()
    return files


def test_snapshot_mount_reads_the_snapshot_while_the_volume_changes(
        node: Node, tmp_path: Path) -> None:
    node.cli("volume", "create", "v", "--size", "128M", "--replicas", "2")
    device = node.cli("volume", "attach", "v").stdout.strip()
    subprocess.run(["mkfs.ext4", "-q", device], check=True)
    view = tmp_path / "view"
    view.mkdir()
    with mounted(device, tmp_path / "live") as live:
        before = write_files(live, 4, 3 * MiB + 123, "before")
        snapshot_frozen(node, "v", "s1", live)
        stop = threading.Event()

        def keep_changing() -> None:
            round_ = 0
            while not stop.is_set():
                write_files(live, 4, 3 * MiB + 123, f"after-{round_}")
                round_ += 1

        writer = threading.Thread(target=keep_changing)
        writer.start()
        try:
            printed = node.cli("snapshot", "mount", "v", "s1", view).stdout
            assert f"snapshot s1 of volume v mounted read-only at {view} (ext4" in printed
            for name, data in before.items():
                assert (view / name).read_bytes() == data
            refused = node.cli("snapshot", "delete", "v", "s1", check=False)
            assert refused.returncode == 1 and f"is mounted at {view}" in refused.stderr
            write = subprocess.run(["touch", str(view / "new")], capture_output=True,
                                   check=False)
            assert write.returncode != 0  # read-only
        finally:
            stop.set()
            writer.join()
        node.cli("snapshot", "umount", view)
        assert not os.path.ismount(view) and list(view.iterdir()) == []
        assert (live / "file-0").read_bytes() != before["file-0"]
    # detached: the same, and the volume can be attached meanwhile
    node.cli("volume", "detach", "v")
    node.cli("snapshot", "mount", "v", "s1", view)
    node.cli("volume", "attach", "v")
    assert {p.name for p in view.iterdir()} >= set(before)
    for name, data in before.items():
        assert (view / name).read_bytes() == data
    [info] = mounts(node)
    assert (info["kind"], info["volume"], info["snapshot"], info["serving"]) == \
        ("snapshot", "v", "s1", True)
    node.cli("snapshot", "umount", view)
    assert mounts(node) == []
    node.cli("snapshot", "delete", "v", "s1")


def test_backup_mount_fetches_only_what_is_read(node: Node, tmp_path: Path) -> None:
    (tmp_path / "backups").mkdir()
    node.cli("backup-target", "set", f"file://{tmp_path / 'backups'}")
    node.cli("volume", "create", "data", "--size", "256M", "--replicas", "1")
    device = node.cli("volume", "attach", "data").stdout.strip()
    subprocess.run(["mkfs.ext4", "-q", device], check=True)
    with mounted(device, tmp_path / "live") as live:
        write_files(live, 20, 8 * MiB, "bulk")  # most of the backup: never read
        wanted = hashlib.shake_256(b"wanted").digest(MiB + 7)
        (live / "wanted").write_bytes(wanted)
        os.sync()
        snapshot_frozen(node, "data", "b1", live)
    backup_id = node.cli("backup", "create", "data", "--snapshot", "b1").stdout.strip()
    view = tmp_path / "view"
    view.mkdir()
    node.cli("backup", "mount", backup_id, view)
    assert (view / "wanted").read_bytes() == wanted
    [info] = mounts(node)
    assert info["kind"] == "backup" and info["backup"] == backup_id
    # the helper writes its statistics every 2 s: wait for the reads to show
    statistics = wait_for(lambda: [m["statistics"] for m in mounts(node)
                                   if m["statistics"].get("reads")], 30,
                          "the mount's statistics")[0]
    assert statistics["backup_blocks"] >= 80
    assert statistics["distinct_blocks"] <= statistics["backup_blocks"] // 5, statistics
    # the whole image, read through the mount, is the snapshot backed up
    image = Path(node.data) / "run" / "browse" / info["id"] / "fuse" / "disk.img"
    node.cli("volume", "detach", "data")
    directory = node.volume("data")["replica_list"][0]["directory"]
    exported = tmp_path / "b1.img"
    run("replica", "export", directory, exported, "--snapshot", "b1", "--force")
    assert hashlib.sha256(image.read_bytes()).digest() == \
        hashlib.sha256(exported.read_bytes()).digest()
    refused = node.cli("backup", "delete", backup_id, check=False)
    assert refused.returncode == 1 and "is mounted at" in refused.stderr
    node.cli("backup", "umount", view)
    assert not os.path.ismount(view)
    node.cli("backup", "delete", backup_id)


def test_bad_mounts_change_nothing(node: Node, tmp_path: Path) -> None:
    node.cli("volume", "create", "v", "--size", "64M", "--replicas", "1")
    node.cli("snapshot", "create", "v", "s1")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["snapshot", "mount", "v", "s1", str(tmp_path / "missing")], 2, "does not exist"),
        (["snapshot", "mount", "v", "s1", str(full)], 2, "is not empty"),
        (["snapshot", "mount", "v", "nope", str(empty)], 3, "snapshot 'nope'"),
        (["snapshot", "mount", "nope", "s1", str(empty)], 3, "volume 'nope' does not exist"),
        (["snapshot", "mount", "v", "s1", str(empty)], 1, "holds no file system"),
        (["snapshot", "umount", str(empty)], 3, "no snapshot or backup is mounted at"),
        (["backup", "mount", "backup-0123456789abcdef", str(empty)], 1, "no backup target"),
    ]
    for args, status, words in cases:
        result = node.cli(*args, check=False)
        assert result.returncode == status, (args, result.stderr)
        assert words in result.stderr, (args, result.stderr)
    assert mounts(node) == []
    assert list(empty.iterdir()) == [] and not os.path.ismount(empty)
    assert not list((Path(node.data) / "run" / "browse").glob("*"))
    assert json.loads(node.cli("snapshot", "list", "v", "-o", "json").stdout)[0]["name"] == "s1"


def test_a_mount_whose_helper_died_is_taken_down_at_the_next_start(
        node: Node, tmp_path: Path) -> None:
    node.cli("volume", "create", "v", "--size", "64M", "--replicas", "1")
    device = node.cli("volume", "attach", "v").stdout.strip()
    subprocess.run(["mkfs.ext4", "-q", device], check=True)
    node.cli("snapshot", "create", "v", "s1")
    view = tmp_path / "view"
    view.mkdir()
    node.cli("snapshot", "mount", "v", "s1", view)
    [info] = mounts(node)
    node.stop()
    os.kill(info["pid"], signal.SIGKILL)  # as a reboot or a crash would
    wait_for(lambda: not Path(f"/proc/{info['pid']}").exists() or
             "Z" in Path(f"/proc/{info['pid']}/stat").read_text().split()[2], 30,
             "the helper to die")
    node.start()
    assert mounts(node) == []
    assert not os.path.ismount(view)
    kinds = [e["kind"] for e in json.loads(node.cli("events", "--volume", "v", "-o",
                                                    "json").stdout)]
    assert "browse-lost" in kinds
    node.cli("snapshot", "delete", "v", "s1")  # no longer held by the mount

"""Standby (DR) volumes across two appliances (two daemons with their own data
directories, one backup target): a volume written by fio is backed up three times; a
standby on the second appliance follows each backup, applying only the blocks that
changed (reported per step); its content is each backup's snapshot exactly (the oracle:
``replica export`` of the source's snapshots, compared byte for byte); it refuses attach
while standby; activation gives the newest backup's content and an attachable volume."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.backup.test_node_backups import export_sha
from tests.harness import MiB, Node, wait_for


def fio(device: str, seed: int, size: str) -> None:
    subprocess.run(["fio", "--name=w", f"--filename={device}", "--rw=randwrite", "--bs=64k",
                    "--direct=1", f"--io_size={size}", f"--randseed={seed}",
                    "--refill_buffers", "--output-format=terse"],
                   check=True, capture_output=True, timeout=300)


def standby(node: Node, name: str) -> dict[str, Any]:
    info: dict[str, Any] = node.volume(name)["standby"] or {}
    return info


@pytest.fixture
def second(tmp_path: Path) -> Any:
    other = Node(tmp_path / "dr")
    (tmp_path / "dr" / "disk2").mkdir(parents=True)
    other.start()
    other.cli("disk", "add", tmp_path / "dr" / "disk2")
    try:
        yield other
    finally:
        other.cleanup()


def test_a_standby_follows_backups_incrementally_and_activates(
        node: Node, second: Node, tmp_path: Path) -> None:
    target = tmp_path / "backups"
    target.mkdir()
    for appliance in (node, second):
        appliance.cli("backup-target", "set", f"file://{target}")
    second.change_settings(standby_poll_interval=1)
    node.cli("volume", "create", "src", "--size", "64M", "--replicas", "1")
    device = node.cli("volume", "attach", "src").stdout.strip()
    fio(device, 1, "64M")  # the whole volume
    node.cli("snapshot", "create", "src", "s1")
    backups = [node.cli("backup", "create", "src", "--snapshot", "s1").stdout.strip()]

    made = second.cli("volume", "create", "dr", "--standby", "--from-backup-volume", "src",
                      "--replicas", "2").stdout
    assert "standby volume dr created (64 MiB, 2 replicas), following backup volume src" \
        in made
    held = wait_for(lambda: standby(second, "dr").get("last_backup") == backups[0], 60,
                    "the standby to hold the first backup")
    assert held
    refused = second.cli("volume", "attach", "dr", check=False)
    assert refused.returncode == 1 and "is a standby of backup volume src" in refused.stderr
    directories = [r["directory"] for r in second.volume("dr")["replica_list"]]
    held_digests = [export_sha(directories[0], None, tmp_path)]

    for round_ in (2, 3):
        fio(device, round_, "2M")  # a few blocks of the backup change
        node.cli("snapshot", "create", "src", f"s{round_}")
        backups.append(node.cli("backup", "create", "src", "--snapshot",
                                f"s{round_}").stdout.strip())
        wait_for(lambda: standby(second, "dr").get("last_backup") == backups[-1], 60,
                 f"the standby to apply backup {round_}")
        update = standby(second, "dr")["last_update"]
        assert update["from"] == backups[-2]
        # fio wrote 2 MiB in 64 KiB pieces: at most 32 of the 32 backup blocks of 2 MiB
        # change, usually fewer; never the whole volume again
        assert 0 < update["blocks"] <= 32 and update["bytes_fetched"] <= 32 * 2 * MiB
        assert standby(second, "dr")["lag_seconds"] >= 0
        digests = {export_sha(d, None, tmp_path) for d in directories}
        assert len(digests) == 1  # the replicas are equal
        held_digests.append(digests.pop())
    events = json.loads(second.cli("events", "--volume", "dr", "-o", "json").stdout)
    assert [e["kind"] for e in events].count("standby-updated") == 2

    # the oracle: the source's snapshots, exported once the source is detached
    node.cli("volume", "detach", "src")
    source = node.volume("src")["replica_list"][0]["directory"]
    assert held_digests == [export_sha(source, f"s{i}", tmp_path) for i in (1, 2, 3)]

    second.cli("snapshot", "create", "dr", "kept")
    refused = second.cli("snapshot", "revert", "dr", "kept", check=False)
    assert refused.returncode == 1 and "is a standby" in refused.stderr
    activated = second.cli("volume", "activate", "dr").stdout
    assert f"volume dr activated, holding backup {backups[-1]}" in activated
    shown = second.volume("dr")
    assert shown["standby_of"] == "" and shown["standby"]["activated"]
    restored = second.cli("volume", "attach", "dr").stdout.strip()
    with open(restored, "rb") as block:
        assert hashlib.sha256(block.read()).hexdigest() == held_digests[-1]
    again = second.cli("volume", "activate", "dr", check=False)
    assert again.returncode == 1 and "is not a standby volume" in again.stderr


def test_standby_refusals(node: Node, tmp_path: Path) -> None:
    target = tmp_path / "backups"
    target.mkdir()
    node.cli("backup-target", "set", f"file://{target}")
    cases = [
        (["volume", "create", "x", "--standby", "--from-backup-volume", "nope"], 3,
         "backup volume 'nope' has no complete backup"),
        (["volume", "create", "x", "--standby"], 2, "go together"),
        (["volume", "create", "x", "--standby", "--from-backup-volume", "a", "--size", "1G"],
         2, "takes the size of its backups"),
        (["volume", "activate", "nope"], 3, "volume 'nope' does not exist"),
    ]
    for args, status, words in cases:
        result = node.cli(*args, check=False)
        assert result.returncode == status, (args, result.stderr)
        assert words in result.stderr, (args, result.stderr)
    assert json.loads(node.cli("volume", "list", "-o", "json").stdout) == []

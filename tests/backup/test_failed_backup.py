"""A backup that does not complete, through the CLI against a real daemon: it removes the
snapshot it took itself (not one the operator named), and its entry in ``backup list``
(failed or cancelled, with the error) is removed by ``backup delete``."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.backup.helpers import HeldObject, cli_json
from tests.harness import Node, wait_for


def kept_snapshots(node: Node, volume: str) -> list[str]:
    return [s["name"] for s in cli_json(node, "snapshot", "list", volume) if not s["removed"]]


def test_a_failed_backup_leaves_nothing_behind(node: Node, tmp_path: Path) -> None:
    target = tmp_path / "backups"
    target.mkdir()
    node.cli("backup-target", "set", f"file://{target}")
    node.cli("volume", "create", "v", "--size", "16M", "--replicas", "1")
    node.cli("snapshot", "create", "v", "mine")
    shutil.rmtree(target)  # the target is gone: backups fail
    for args in ((), ("--snapshot", "mine")):
        failed = node.cli("backup", "create", "v", *args, check=False)
        assert failed.returncode == 1 and "is not a directory" in failed.stderr, failed.stderr
    assert kept_snapshots(node, "v") == ["mine"]  # the one the backup took is removed

    target.mkdir()  # listing needs the target
    listed = cli_json(node, "backup", "list")
    assert [(b["state"], b["snapshot"] == "mine") for b in listed] == \
        [("failed", False), ("failed", True)], listed
    assert all("is not a directory" in b["error"] for b in listed)
    for backup in listed:
        assert node.cli("backup", "delete", backup["id"]).stdout.strip() == \
            f"backup {backup['id']} deleted"
        gone = node.cli("backup", "show", backup["id"], check=False)
        assert gone.returncode == 3 and "does not exist" in gone.stderr
    assert cli_json(node, "backup", "list") == []
    node.stop()  # forgotten for good: not taken up again at the next start
    node.start()
    assert cli_json(node, "backup", "list") == []


def test_a_cancelled_backup_removes_its_snapshot(node: Node, tmp_path: Path) -> None:
    target = tmp_path / "backups"
    target.mkdir()
    node.cli("backup-target", "set", f"file://{target}")
    node.cli("volume", "create", "v", "--size", "16M", "--replicas", "1")
    complete = node.cli("backup", "create", "v").stdout.strip()  # with the volume record
    before = kept_snapshots(node, "v")
    held = HeldObject(next(target.rglob("volume.json")), tmp_path)
    try:
        backup_id = node.cli("backup", "create", "v", "--no-wait").stdout.strip()
        held.wait_reader()
        assert node.cli("backup", "delete", backup_id).stdout.strip() == \
            f"backup {backup_id} cancelling"
        held.release()
    finally:
        held.close()
    info = wait_for(lambda: (b := cli_json(node, "backup", "show", backup_id))["state"]
                    != "in-progress" and b, 120, "the backup to end")
    assert info["state"] == "cancelled", info
    assert kept_snapshots(node, "v") == before
    node.cli("backup", "delete", backup_id)
    assert [b["id"] for b in cli_json(node, "backup", "list")] == [complete]

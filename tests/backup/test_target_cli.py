"""The backup target through the CLI against a real daemon: a target that cannot hold
backups is refused, naming it and the cause, and nothing changes; ``backup-target unset``
forgets the target and its secrets, and is refused while a backup or a restore uses it (a
job held in the middle on an object of the target, as by a hung server)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.backup.helpers import HeldObject, cli_json, write_volume
from tests.harness import APPLIANCE, MiB, Node, wait_for


def test_a_target_that_cannot_be_written_is_refused(node: Node, tmp_path: Path) -> None:
    good = tmp_path / "backups"
    good.mkdir()
    node.cli("backup-target", "set", f"file://{good}")
    refused = node.cli("backup-target", "set", "file:///proc", check=False)
    assert refused.returncode == 1, refused.stderr
    assert "backup target file:///proc: cannot write" in refused.stderr, refused.stderr
    assert f"nothing changed: the backup target stays file://{good}" in refused.stderr
    assert cli_json(node, "backup-target", "show")["url"] == f"file://{good}"
    assert [p for p in good.rglob("*") if p.is_file()] == []  # the probe did not stay


def test_unset_forgets_the_target_and_its_key(node: Node, tmp_path: Path) -> None:
    assert node.cli("backup-target", "unset").stdout.strip() == "no backup target was set"
    target = tmp_path / "backups"
    target.mkdir()
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    node.cli("backup-target", "set", f"file://{target}", "--encryption-key", key)
    assert (node.data / "secrets" / "backup-key").exists()
    assert node.cli("backup-target", "unset").stdout.strip() == \
        f"backup target file://{target} unset"
    assert cli_json(node, "backup-target", "show") == \
        {"url": None, "credentials": False, "encrypted": False, "key_id": None}
    assert not (node.data / "secrets" / "backup-key").exists()
    refused = node.cli("backup", "create", "anything", check=False)
    assert refused.returncode == 1 and "no backup target" in refused.stderr


def test_unset_is_refused_while_a_backup_or_a_restore_runs(node: Node,
                                                           tmp_path: Path) -> None:
    target = tmp_path / "backups"
    target.mkdir()
    node.cli("backup-target", "set", f"file://{target}")
    node.cli("volume", "create", "v", "--size", "16M", "--replicas", "1")
    write_volume(node, "v", 0, os.urandom(MiB))
    first = node.cli("backup", "create", "v").stdout.strip()

    def unset_refused(message: str) -> None:
        result = node.cli("backup-target", "unset", check=False)
        assert result.returncode == 1 and message in result.stderr, result.stderr
        assert cli_json(node, "backup-target", "show")["url"] == f"file://{target}"

    # a backup held reading the volume record
    held = HeldObject(next(target.rglob("volume.json")), tmp_path)
    try:
        running = node.cli("backup", "create", "v", "--no-wait").stdout.strip()
        held.wait_reader()
        unset_refused(f"backup {running} of volume v is running")
        held.release()
    finally:
        held.close()
    wait_for(lambda: cli_json(node, "backup", "show", running)["state"] == "complete", 120,
             "the backup to complete")

    # a restore held reading a block
    held = HeldObject(next(p for p in target.rglob("*") if "/blocks/" in str(p)
                           and p.is_file()), tmp_path)
    restore = subprocess.Popen(
        [APPLIANCE, "backup", "restore", first, "copy", "--replicas", "1", "--url", node.url,
         "--token-file", str(node.token_file)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        held.wait_reader()
        unset_refused(f"volume copy is being restored from backup {first}")
        held.release()
        _, err = restore.communicate(timeout=300)
        assert restore.returncode == 0, err
    finally:
        held.close()
        if restore.poll() is None:
            restore.kill()
            restore.communicate(timeout=60)
    assert node.volume("copy")["state"] == "detached"
    assert node.cli("backup-target", "unset").stdout.strip() == \
        f"backup target file://{target} unset"

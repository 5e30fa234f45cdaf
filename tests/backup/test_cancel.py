"""A backup cancelled by a stop of the daemon (SIGTERM) ends with the daemon, within
seconds: it is reported cancelled after the restart, and leaves no committed backup (no
manifest) on the target (docs/backup-format.md)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx

from tests.harness import MiB, Node, wait_for


def show(node: Node, backup_id: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(node.cli("backup", "show", backup_id, "-o",
                                                 "json").stdout)
    return result


def test_sigterm_during_a_backup_cancels_it(node: Node, tmp_path: Path) -> None:
    # small backup blocks, each stored with two fsyncs: a backup of seconds, not instants
    token = node.token_file.read_text().strip()
    response = httpx.patch(node.url + "/v1/settings", json={"backup_block_size": 64 << 10},
                           headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    target = tmp_path / "backups"
    target.mkdir()
    node.cli("backup-target", "set", f"file://{target}")
    node.cli("volume", "create", "data", "--size", "256M", "--replicas", "1")
    device = node.cli("volume", "attach", "data").stdout.strip()
    with open(device, "r+b") as block:
        for offset in range(0, 192 * MiB, 4 * MiB):
            block.seek(offset)
            block.write(os.urandom(4 * MiB))
        os.fsync(block.fileno())
    node.cli("volume", "detach", "data")

    backup_id = node.cli("backup", "create", "data", "--no-wait").stdout.strip()
    running = wait_for(lambda: (info := show(node, backup_id))["progress"] > 0 and info,
                       120, "the backup to make progress", interval=0.05)
    assert running["state"] == "in-progress", running  # else the backup was too short
    assert node.process is not None
    stopped = time.monotonic()
    node.process.send_signal(signal.SIGTERM)
    node.process.wait(timeout=10)
    assert time.monotonic() - stopped < 10
    assert not list(target.rglob(f"{backup_id}.json")), "a cancelled backup left a manifest"

    node.start()
    info = show(node, backup_id)
    assert info["state"] == "cancelled", info
    assert "stopped" in info["error"], info
    listed = json.loads(node.cli("backup", "list", "data", "-o", "json").stdout)
    assert [(b["id"], b["state"]) for b in listed] == [(backup_id, "cancelled")]
    assert not list(target.rglob(f"{backup_id}.json"))
    # the volume is backed up completely by the next backup
    again = node.cli("backup", "create", "data").stdout.strip()
    assert show(node, again)["state"] == "complete"
    assert show(node, backup_id)["state"] == "cancelled"

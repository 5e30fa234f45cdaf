"""What ``backup`` shows an operator, through the CLI against a real daemon: the progress
bar of ``backup create`` at a terminal ends at 100 %, ``backup restore`` runs at a
terminal, and ``backup list`` shows each backup's size (its data, and what it stored on
the target), not the volume's."""

from __future__ import annotations

import os
import re
from pathlib import Path

from appliance.units import format_size
from tests.backup.helpers import cli_json, in_terminal, write_volume
from tests.harness import MiB, Node

BAR = re.compile(r"backing up: \[[# ]{40}\] +(\d+)%")


def test_create_and_restore_at_a_terminal(node: Node, tmp_path: Path) -> None:
    (tmp_path / "backups").mkdir()
    node.cli("backup-target", "set", f"file://{tmp_path / 'backups'}")
    node.cli("volume", "create", "v", "--size", "16M", "--replicas", "1")
    write_volume(node, "v", 0, os.urandom(4 * MiB))
    client = ("--url", node.url, "--token-file", node.token_file)

    status, output = in_terminal("backup", "create", "v", *client)
    assert status == 0, output
    shown = [int(p) for p in BAR.findall(output)]
    assert shown and shown[-1] == 100, output
    backup_id = output.split()[-1]
    assert cli_json(node, "backup", "show", backup_id)["state"] == "complete"

    status, output = in_terminal("backup", "restore", backup_id, "copy", "--replicas", "1",
                                 *client)
    assert status == 0 and "Traceback" not in output, output
    assert f"volume copy restored from {backup_id}" in output
    assert node.volume("copy")["state"] == "detached"


def test_list_shows_the_size_of_each_backup(node: Node, tmp_path: Path) -> None:
    (tmp_path / "backups").mkdir()
    node.cli("backup-target", "set", f"file://{tmp_path / 'backups'}")
    node.cli("volume", "create", "v", "--size", "64M", "--replicas", "1")
    write_volume(node, "v", 8 * MiB, os.urandom(4 * MiB))  # whole blocks of any block size
    full = node.cli("backup", "create", "v").stdout.strip()
    again = node.cli("backup", "create", "v").stdout.strip()  # nothing changed

    listed = {b["id"]: b for b in cli_json(node, "backup", "list", "v")}
    assert {i: (b["size"], b["data_bytes"]) for i, b in listed.items()} == \
        {full: (64 * MiB, 4 * MiB), again: (64 * MiB, 4 * MiB)}
    assert listed[full]["uploaded_bytes"] >= 4 * MiB  # random data: no smaller compressed
    assert listed[again]["uploaded_bytes"] == 0

    lines = node.cli("backup", "list", "v").stdout.splitlines()
    header = re.split(r"\s{2,}", lines[0])
    rows = {cells[0]: dict(zip(header, cells, strict=True))
            for cells in (re.split(r"\s{2,}", line) for line in lines[1:])}
    assert (rows[full]["SIZE"], rows[full]["NEW"]) == \
        ("4 MiB", format_size(listed[full]["uploaded_bytes"]))
    assert (rows[again]["SIZE"], rows[again]["NEW"]) == ("4 MiB", "0 B")

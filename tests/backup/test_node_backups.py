"""Backups through the CLI against a real daemon, on file:// and on s3:// (moto over HTTP):
a full and three incremental backups taken while fio writes, each restored into a new
volume equal to its snapshot (RELIABILITY row 14); incremental uploads only changed
blocks; wrong key, unreachable target, missing credentials, malformed URL."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.backup.conftest import S3Endpoint
from tests.harness import VERIFY, MiB, Node, free_port, run


def export_sha(directory: str, snapshot: str | None, scratch: Path) -> str:
    image = scratch / "export.img"
    run("replica", "export", directory, image, *(["--snapshot", snapshot] if snapshot else []),
        "--force", timeout=300)
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    image.unlink()
    return digest


def show(node: Node, backup_id: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(node.cli("backup", "show", backup_id, "-o",
                                                 "json").stdout)
    return result


# under load against S3 with -m slow (the suite's time budget); S3 itself is in the
# default suite through every test of the `target` fixture
@pytest.mark.parametrize("kind", ["file", pytest.param("s3", marks=pytest.mark.slow)])
def test_backups_under_load_restore_exactly(node: Node, tmp_path: Path, kind: str,
                                            request: pytest.FixtureRequest) -> None:
    if kind == "file":
        (tmp_path / "backups").mkdir()
        node.cli("backup-target", "set", f"file://{tmp_path / 'backups'}")
    else:
        endpoint: S3Endpoint = request.getfixturevalue("s3_endpoint")
        node.cli("backup-target", "set", endpoint.url(f"node-{os.urandom(4).hex()}"),
                 "--credentials", endpoint.credentials)
    node.cli("volume", "create", "data", "--size", "64M", "--replicas", "2")
    device = node.cli("volume", "attach", "data").stdout.strip()
    with open(device, "r+b") as block:  # 48 MiB of data for the full backup
        for offset in range(16 * MiB, 64 * MiB, 4 * MiB):
            block.seek(offset)
            block.write(os.urandom(4 * MiB))
        os.fsync(block.fileno())
    uri = f"nbd+unix:///?socket={node.data / 'run' / 'data' / 'nbd.sock'}"
    # writes go on in the first 8 MiB (4 blocks of the backup) while backups are taken
    workload = subprocess.Popen(
        ["fio", "--ioengine=nbd", f"--uri={uri}", "--output-format=json", *VERIFY,
         "--verify_state_save=0", "--size=8M", "--time_based", "--runtime=120",
         "--rate=4m"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    backups = []
    try:
        for index in range(4):
            node.cli("snapshot", "create", "data", f"s{index}")
            backups.append(node.cli("backup", "create", "data", "--snapshot", f"s{index}",
                                    "--label", f"round={index}").stdout.strip())
    finally:
        workload.terminate()
        workload.communicate(timeout=60)
    node.cli("volume", "detach", "data")
    infos = [show(node, backup_id) for backup_id in backups]
    assert [i["state"] for i in infos] == ["complete"] * 4
    assert [i["base"] for i in infos[1:]] == backups[:3]  # incremental
    assert infos[0]["stats"]["uploaded_bytes"] >= 48 * MiB
    for info in infos[1:]:  # only the blocks fio wrote: at most the first 4
        assert info["stats"]["read_bytes"] <= 4 * 2 * MiB, info["stats"]
        assert info["stats"]["uploaded_bytes"] <= 4 * 2 * MiB + 4096, info["stats"]
    listed = json.loads(node.cli("backup", "list", "data", "-o", "json").stdout)
    assert [b["id"] for b in listed] == backups
    assert {"id", "volume", "snapshot", "created", "size", "state"} <= set(listed[0])

    source = node.volume("data")["replica_list"][0]["directory"]
    for index, backup_id in enumerate(backups):
        node.cli("backup", "restore", backup_id, f"copy{index}", "--replicas", "1")
        restored = node.volume(f"copy{index}")
        assert restored["state"] == "detached"
        assert export_sha(restored["replica_list"][0]["directory"], None, tmp_path) == \
            export_sha(source, f"s{index}", tmp_path), f"backup {index} differs"
    verified = json.loads(node.cli("backup", "verify", "--volume", "data", "-o",
                                   "json").stdout)
    assert verified["ok"] and len(verified["backups"]) == 4

    token = node.token_file.read_text().strip()
    scrape = httpx.get(node.url + "/metrics", headers={"Authorization": f"Bearer {token}"})
    for family in ("appliance_backup_state", "appliance_backup_uploaded_bytes",
                   "appliance_backup_duration_seconds",
                   "appliance_volume_last_backup_timestamp_seconds"):
        assert family in scrape.text, family
    assert f'appliance_backup_state{{backup="{backups[0]}",state="complete",volume="data"}} 1.0' \
        in scrape.text
    if shutil.which("promtool"):
        checked = subprocess.run(["promtool", "check", "metrics"], input=scrape.text,
                                 text=True, capture_output=True, check=False)
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_backup_errors(node: Node, tmp_path: Path, s3_endpoint: S3Endpoint) -> None:
    def refused(*args: str | Path, status: int, message: str) -> None:
        result = node.cli(*args, check=False)
        assert result.returncode == status, result.stderr
        assert message in result.stderr, result.stderr
        assert "testing-secret" not in result.stderr

    refused("backup-target", "set", "ftp://x/y", status=2, message="scheme")
    refused("backup-target", "set", "s3://Bad_Bucket", status=2, message="bucket name")
    refused("backup-target", "set", s3_endpoint.url("p"), status=2, message="credentials")
    refused("backup-target", "set", f"s3://backups/p?endpoint=http://127.0.0.1:{free_port()}",
            "--credentials", s3_endpoint.credentials, status=1, message="cannot be reached")
    refused("backup-target", "set", f"file://{tmp_path}/absent", status=3,
            message="not a directory")
    assert json.loads(node.cli("backup-target", "show", "-o", "json").stdout)["url"] is None
    refused("backup", "create", "nothing", status=1, message="no backup target")

    key_a, key_b = tmp_path / "a.key", tmp_path / "b.key"
    for key in (key_a, key_b):
        key.write_bytes(os.urandom(32))
        key.chmod(0o600)
    (tmp_path / "backups").mkdir()
    node.cli("backup-target", "set", f"file://{tmp_path / 'backups'}", "--encryption-key",
             key_a)
    node.cli("volume", "create", "v", "--size", "16M", "--replicas", "1")
    device = node.cli("volume", "attach", "v").stdout.strip()
    with open(device, "r+b") as block:
        block.write(b"secret " * 100000)
        os.fsync(block.fileno())
    backup_id = node.cli("backup", "create", "v").stdout.strip()
    for name in (tmp_path / "backups").rglob("*"):
        if name.is_file():
            assert b"secret secret" not in name.read_bytes()
    node.cli("backup-target", "set", f"file://{tmp_path / 'backups'}", "--encryption-key",
             key_b)
    refused("backup", "restore", backup_id, "wrongkey", status=1, message="encrypted with key")
    assert "wrongkey" not in node.cli("volume", "list").stdout  # nothing made
    refused("backup", "create", "v", status=1, message="encrypted with key")
    node.cli("backup-target", "set", f"file://{tmp_path / 'backups'}", "--encryption-key",
             key_a)
    node.cli("backup", "restore", backup_id, "rightkey")
    refused("backup", "show", "backup-0000000000000000", status=3, message="does not exist")
    refused("backup", "show", "../../etc", status=2, message="invalid backup id")
    loose = tmp_path / "loose.key"
    loose.write_bytes(os.urandom(32))
    loose.chmod(0o644)
    refused("backup-target", "set", f"file://{tmp_path / 'backups'}", "--encryption-key",
            loose, status=1, message="0600")
    node.cli("backup", "delete", backup_id)
    refused("backup", "show", backup_id, status=3, message="does not exist")
    blocks = [p for p in (tmp_path / "backups").rglob("*") if p.is_file() and
              "/blocks/" in str(p)]
    assert blocks == []  # the only backup's blocks were collected


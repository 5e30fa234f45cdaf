"""A sweep over the mutating commands: each with a failure injected after its first side
effect (a placement that fails, a backup target that fails, the daemon killed) either
leaves the state as it was, or finishes at the daemon's next start. The state is what an
operator sees (volume, snapshot and backup lists) and the replica directories on the
disks."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from tests.harness import Node, wait_for


def _json(node: Node, *args: str) -> Any:
    return json.loads(node.cli(*args, "-o", "json").stdout)


def state(node: Node, tmp_path: Path) -> dict[str, Any]:
    volumes = {v["name"]: (v["size"], v["replicas"], v["state"], v["attached"])
               for v in _json(node, "volume", "list")}
    # removed snapshots are not listed (their space is reclaimed by the next purge)
    snapshots = {name: [s["name"] for s in _json(node, "snapshot", "list", name)]
                 for name, info in volumes.items() if info[2] in ("attached", "detached")}
    directories = sorted(str(p.relative_to(tmp_path)) for p in
                         [*tmp_path.glob("disk2/replicas/*"),
                          *tmp_path.glob("data/disks/*/replicas/*")])
    return {"volumes": volumes, "snapshots": snapshots, "directories": directories}


def backups(node: Node) -> list[tuple[str, str]]:
    return sorted((b["id"], b["state"]) for b in _json(node, "backup", "list"))


def settled(node: Node, tmp_path: Path) -> dict[str, Any]:
    """The state once nothing is on its way (no volume creating, attaching, detaching
    or deleting)."""
    def steady() -> dict[str, Any] | None:
        now = state(node, tmp_path)
        busy = [name for name, info in now["volumes"].items()
                if info[2] not in ("attached", "detached")]
        return None if busy else now

    result: dict[str, Any] = wait_for(steady, 180, "the volumes to settle")
    return result


def test_placement_failures_change_nothing(node: Node, tmp_path: Path) -> None:
    node.cli("volume", "create", "base", "--size", "16M", "--replicas", "2")
    node.cli("snapshot", "create", "base", "s1")
    before = settled(node, tmp_path)
    for command in (["volume", "create", "x", "--size", "16M", "--replicas", "3"],
                    ["volume", "create", "x", "--size", "16T"],
                    ["volume", "clone", "base", "x", "--replicas", "3"],
                    ["volume", "expand", "base", "--size", "16T"]):
        failed = node.cli(*command, check=False)
        assert failed.returncode == 1, (command, failed)
        assert "cannot place" in failed.stderr or "cannot expand" in failed.stderr, failed
        assert settled(node, tmp_path) == before, command


def test_target_failures_change_nothing(node: Node, tmp_path: Path) -> None:
    target = tmp_path / "backups"
    target.mkdir()
    node.cli("backup-target", "set", f"file://{target}")
    node.cli("volume", "create", "base", "--size", "16M", "--replicas", "2")
    device = node.cli("volume", "attach", "base").stdout.strip()
    with open(device, "r+b") as block:
        block.write(os.urandom(1 << 20))
        block.flush()
        os.fsync(block.fileno())
    node.cli("volume", "detach", "base")
    backup = node.cli("backup", "create", "base").stdout.strip()
    before, listed = settled(node, tmp_path), backups(node)
    # a target that cannot take backups is not kept
    refused = node.cli("backup-target", "set", "file:///proc", check=False)
    assert refused.returncode != 0
    assert _json(node, "backup-target", "show")["url"] == f"file://{target}"
    # the target breaks after it was set: a backup and a restore fail, and change nothing
    shutil.move(target, tmp_path / "moved")
    target.write_text("not a directory")
    assert node.cli("backup", "create", "base", check=False).returncode == 1
    assert node.cli("backup", "restore", backup, "r", check=False).returncode != 0
    target.unlink()
    shutil.move(tmp_path / "moved", target)
    assert settled(node, tmp_path) == before
    # a restore that fails during its copy (a block of the backup is lost on the target)
    blocks = sorted(p for p in target.rglob("blocks/*/*/*") if p.is_file())
    assert blocks, sorted(target.rglob("*"))
    hidden = tmp_path / "hidden-block"
    shutil.move(blocks[0], hidden)
    restore = node.cli("backup", "restore", backup, "r", check=False)
    assert restore.returncode == 1 and "volume r: restore failed" in restore.stderr, restore
    shutil.move(hidden, blocks[0])
    after = settled(node, tmp_path)
    assert after == before
    failed = [b for b in backups(node) if b not in listed]
    assert [state for _, state in failed] == ["failed"]  # listed, and deletable:
    node.cli("backup", "delete", failed[0][0])
    assert backups(node) == listed


def _kill_and_restart(node: Node) -> None:
    node.stop(signal.SIGKILL)
    node.start()


def test_daemon_killed_after_each_request_finishes_at_next_start(node: Node,
                                                                 tmp_path: Path) -> None:
    """--no-wait returns once the daemon stored the request (its first side effect); the
    daemon is killed at once; its next start carries the request out."""
    node.cli("volume", "create", "base", "--size", "32M", "--replicas", "2")
    node.cli("snapshot", "create", "base", "s1")
    steps: list[tuple[list[str], Any]] = [
        (["volume", "create", "v", "--size", "16M", "--replicas", "2"],
         lambda s: s["volumes"]["v"][2] == "detached"),
        (["volume", "clone", "base", "c", "--snapshot", "s1"],
         lambda s: s["volumes"]["c"][2] == "detached"),
        (["volume", "attach", "v"], lambda s: s["volumes"]["v"][2:] == ("attached", True)),
        (["volume", "detach", "v"], lambda s: s["volumes"]["v"][2:] == ("detached", False)),
        (["volume", "delete", "c"], lambda s: "c" not in s["volumes"]),
        (["volume", "delete", "v"], lambda s: "v" not in s["volumes"]),
    ]
    for command, done in steps:
        node.cli(*command, "--no-wait")
        _kill_and_restart(node)
        now = settled(node, tmp_path)
        assert done(now), (command, now)
    final = settled(node, tmp_path)
    assert list(final["volumes"]) == ["base"]
    # nothing but base's replicas is left on the disks
    base = {Path(r["directory"]).name for r in node.volume("base")["replica_list"]}
    assert {Path(d).name for d in final["directories"]} == base

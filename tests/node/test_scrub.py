"""``volume scrub`` on a real daemon: bytes flipped in one replica's snapshot layer are
found and repaired from the other replica (detached: replica directories; attached: through
the replica servers while the volume serves), and the replicas are identical afterwards;
the same bytes flipped in every replica are reported lost with their range, and nothing is
rewritten. The oracle is the layer files themselves: their bytes before the damage, the
bytes after the scrub, and ``replica check`` (which recomputes every checksum)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from tests.harness import MiB, Node, run, wait_for

DAMAGE = 3 * MiB + 777  # inside the data written before the snapshot


def layer_file(directory: str, snapshot: str) -> Path:
    meta = json.loads((Path(directory) / "replica.json").read_text())
    [layer] = [x for x in meta["layers"] if x["name"] == snapshot]
    return Path(directory) / f"layer-{layer['id']:06d}.img"


def flip(path: Path, offset: int) -> bytes:
    """Flip the bits of 16 bytes of *path* at *offset* behind the replica's back; the
    bytes that were there."""
    with open(path, "r+b") as file:
        file.seek(offset)
        before = file.read(16)
        file.seek(offset)
        file.write(bytes(b ^ 0xFF for b in before))
        file.flush()
        os.fsync(file.fileno())
    return before


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def scrub(node: Node, volume: str) -> tuple[int, dict[str, Any]]:
    result = node.cli("volume", "scrub", volume, "--wait", "-o", "json", check=False)
    return result.returncode, json.loads(result.stdout)


def prepare(node: Node, name: str) -> list[str]:
    """A volume of two replicas with 8 MiB of data in snapshot s1 and more on top; the
    replica directories."""
    node.cli("volume", "create", name, "--size", "32M", "--replicas", "2")
    device = node.cli("volume", "attach", name).stdout.strip()
    with open(device, "r+b") as block:
        block.write(os.urandom(8 * MiB))
        os.fsync(block.fileno())
    node.cli("snapshot", "create", name, "s1")
    with open(device, "r+b") as block:
        block.seek(2 * MiB)
        block.write(os.urandom(MiB))
        os.fsync(block.fileno())
    return [r["directory"] for r in node.volume(name)["replica_list"]]


def check(directory: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(run("replica", "check", directory, "-o", "json",
                                            check=False).stdout)
    return result


def test_scrub_repairs_one_damaged_replica_detached_and_attached(node: Node) -> None:
    directories = prepare(node, "v")
    node.cli("volume", "detach", "v")
    status, first = scrub(node, "v")  # the first scrub takes the layers' checksums
    assert status == 0 and first["report"]["findings"] == [], first
    assert first["report"]["snapshots"] == ["s1"] and not first["report"]["problems"]
    good = [digest(layer_file(d, "s1")) for d in directories]
    assert good[0] == good[1]

    # detached: the replica directories are opened by the daemon
    flip(layer_file(directories[0], "s1"), DAMAGE)
    assert not check(directories[0])["ok"]
    status, record = scrub(node, "v")
    assert status == 0, record
    [finding] = record["report"]["findings"]
    replica_names = [r["name"] for r in node.volume("v")["replica_list"]]
    assert finding == {"snapshot": "s1", "replica": replica_names[0], "offset": 3 * MiB,
                       "length": MiB, "result": "repaired", "source": replica_names[1],
                       "message": ""}
    assert [digest(layer_file(d, "s1")) for d in directories] == good
    assert check(directories[0])["ok"] and check(directories[1])["ok"]

    # attached: through the replica servers, while the volume serves
    node.cli("volume", "attach", "v")
    flip(layer_file(directories[1], "s1"), DAMAGE + MiB)
    status, record = scrub(node, "v")
    assert status == 0, record
    [finding] = record["report"]["findings"]
    assert (finding["replica"], finding["offset"], finding["result"], finding["source"]) == \
        (replica_names[1], 4 * MiB, "repaired", replica_names[0])
    assert [digest(layer_file(d, "s1")) for d in directories] == good
    node.cli("volume", "detach", "v")
    assert check(directories[0])["ok"] and check(directories[1])["ok"]
    kinds = [e["kind"] for e in json.loads(node.cli("events", "--volume", "v", "-o",
                                                    "json").stdout)]
    assert kinds.count("scrub-repaired") == 2 and "scrub-complete" in kinds


def test_damage_on_every_replica_is_lost_and_nothing_is_rewritten(node: Node) -> None:
    directories = prepare(node, "w")
    node.cli("volume", "detach", "w")
    assert scrub(node, "w")[0] == 0
    for directory in directories:
        flip(layer_file(directory, "s1"), DAMAGE)
    damaged = [digest(layer_file(d, "s1")) for d in directories]
    status, record = scrub(node, "w")
    assert status == 1
    assert record["state"] == "complete" and record["report"]["lost"] == 2
    assert record["report"]["repaired"] == 0
    assert {(f["offset"], f["length"], f["result"]) for f in record["report"]["findings"]} == \
        {(3 * MiB, MiB, "lost")}
    assert f"lost: snapshot s1 bytes {3 * MiB}-{4 * MiB - 1}" in record["summary"]
    assert [digest(layer_file(d, "s1")) for d in directories] == damaged  # untouched
    again = node.cli("volume", "scrub", "w", "--wait", check=False)  # as a person reads it
    assert again.returncode == 1
    assert f"s1 replica {record['report']['replicas'][0]} bytes {3 * MiB}-{4 * MiB - 1}: " \
        "lost (no replica holds a copy that verifies)" in again.stdout
    events = json.loads(node.cli("events", "--volume", "w", "-o", "json").stdout)
    assert events[-1]["kind"] == "scrub-lost"


def test_scrub_refusals(node: Node) -> None:
    missing = node.cli("volume", "scrub", "nope", check=False)
    assert missing.returncode == 3 and "volume 'nope' does not exist" in missing.stderr
    node.cli("volume", "create", "x", "--size", "16M", "--replicas", "1")
    never = node.cli("volume", "scrub", "x", "--wait", check=False)
    assert never.returncode == 0 and "0 snapshot(s) on 1 replica(s): no damage" in never.stdout


def finished_runs(node: Node, job: str, count: int) -> list[dict[str, Any]]:
    def done() -> list[dict[str, Any]] | None:
        runs = json.loads(node.cli("job", "show", job, "-o", "json").stdout)["runs"]
        ended = [r for r in runs if r["state"] != "running"]
        return ended if len(ended) >= count else None

    found: list[dict[str, Any]] = wait_for(done, 60, f"{count} finished run(s) of {job}")
    return found


def test_a_scrub_job_fails_its_part_on_a_volume_with_lost_data(node: Node) -> None:
    directories = prepare(node, "j")
    node.cli("volume", "detach", "j")
    node.cli("job", "create", "weekly", "--task", "scrub", "--cron", "@weekly",
             "--group", "default")
    node.cli("job", "run", "weekly")
    [first] = finished_runs(node, "weekly", 1)
    assert first["state"] == "succeeded"
    assert "1 snapshot(s) on 2 replica(s): no damage" in first["volumes"]["j"]["message"]
    for directory in directories:
        flip(layer_file(directory, "s1"), DAMAGE)
    node.cli("job", "run", "weekly")
    second = finished_runs(node, "weekly", 2)[-1]
    assert second["state"] == "failed"
    assert "lost: snapshot s1 bytes" in second["volumes"]["j"]["message"]

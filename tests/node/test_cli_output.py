"""What the CLI prints must not mislead (sizes, repeated requests, removed snapshots, help
text): through the real CLI against a real daemon."""

from __future__ import annotations

import json

from tests.harness import Node, wait_for


def test_sizes_and_repeats_are_said_exactly(node: Node) -> None:
    refused = node.cli("volume", "create", "big", "--size", "16T", check=False)
    assert refused.returncode == 1
    assert "16 TiB" in refused.stderr and "over_provisioning_percentage" in refused.stderr
    assert "17592186044416" not in refused.stderr  # no raw byte counts
    node.cli("volume", "create", "v", "--size", "1G", "--replicas", "1")
    grown = node.cli("volume", "expand", "v", "--size", "1025M").stdout
    assert "from 1 GiB to 1025 MiB" in grown
    again = node.cli("volume", "expand", "v", "--size", "1025M").stdout
    assert "already 1025 MiB" in again and "expanded" not in again
    assert node.volume("v")["size"] == 1025 << 20


def test_snapshot_names_and_removed_snapshots(node: Node) -> None:
    node.cli("volume", "create", "s", "--size", "16M", "--replicas", "2")
    node.cli("snapshot", "create", "s", "one")
    duplicate = node.cli("snapshot", "create", "s", "one", check=False)
    assert duplicate.returncode == 2
    assert "snapshot 'one' of volume 's' already exists" in duplicate.stderr
    assert "/replicas/" not in duplicate.stderr  # no internal paths
    node.cli("snapshot", "create", "s", "two")
    node.cli("snapshot", "delete", "s", "one")
    listed = [line.split()[0] for line in node.cli("snapshot", "list", "s").stdout.splitlines()]
    assert listed == ["NAME", "two"]  # removed: not listed by default
    every = node.cli("snapshot", "list", "s", "--all").stdout
    assert "one" in every and "snapshot purge" in every
    purged = node.cli("snapshot", "purge", "s")
    assert "one" not in purged.stderr  # merged away: nothing to explain
    assert [x["name"] for x in json.loads(node.cli("snapshot", "list", "s", "--all", "-o",
                                                   "json").stdout)] == ["two"]
    again = node.cli("snapshot", "create", "s", "one")  # the name is free again
    assert again.returncode == 0


def test_help_agrees_with_the_docs(node: Node) -> None:
    text = node.cli("volume", "expand", "--help").stdout
    assert "mounted (online) or not" in " ".join(text.split())


def test_a_volume_without_engine_has_unknown_robustness(node: Node) -> None:
    node.cli("volume", "create", "r", "--size", "16M", "--replicas", "1")
    assert node.volume("r")["robustness"] == "unknown"
    node.cli("volume", "attach", "r")
    assert node.volume("r")["robustness"] == "healthy"
    node.cli("volume", "detach", "r")
    listed = {v["name"]: v for v in json.loads(node.cli("volume", "list", "-o",
                                                        "json").stdout)}
    assert listed["r"]["robustness"] == node.volume("r")["robustness"] == "unknown"
    node.cli("volume", "clone", "r", "rc")
    assert node.volume("rc")["robustness"] == "unknown"


def test_timeout_and_no_wait(node: Node) -> None:
    node.cli("volume", "create", "w", "--size", "16M", "--replicas", "1", "--no-wait")
    wait_for(lambda: node.volume("w")["state"] == "detached", 60, "the volume created")
    late = node.cli("volume", "attach", "w", "--timeout", "0", check=False)
    assert late.returncode == 1 and "did not finish (attaching) in 0 s" in late.stderr
    assert "the daemon goes on" in late.stderr
    wait_for(lambda: node.volume("w")["state"] == "attached", 120, "the attach to go on")
    asked = node.cli("volume", "detach", "w", "--no-wait")
    assert asked.stdout.strip() == "volume w detaching"
    wait_for(lambda: node.volume("w")["state"] == "detached", 120, "the detach")

"""An RWX volume's node dies: the volume is attached on another node (auto failover, the
old engine fenced) and its share served there, with every file written before the
failure intact; a client reconnects to the share's new address."""

from __future__ import annotations

import os
import random
import shutil

import pytest

from tests.cluster.harness import Cluster
from tests.harness import MiB, wait_for
from tests.nfsclient import Client

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ganesha.nfsd") is None,
    reason="needs root and nfs-ganesha")


def url(share: dict[str, object]) -> str:
    return f"nfs://{share['address']}{share['path']}?version=4&nfsport={share['port']}"


def test_the_share_comes_back_on_another_node(cluster: Cluster) -> None:
    n1, n2, _ = cluster.nodes
    n2.change_settings(auto_failover=True, replica_replenishment_wait=1)
    n1.cli("volume", "create", "files", "--size", "320M", "--replicas", "3",
           "--access-mode", "rwx")
    n1.cli("volume", "share", "files", "--allow", "127.0.0.0/8")
    shown = n2.json("volume", "show", "files")
    assert shown["node"] == "n1" and shown["share"]["address"] == "127.0.0.1"
    written = {f"f{index}": random.Random(index).randbytes(MiB // 2) for index in range(12)}
    client = Client(url(shown["share"]))
    try:
        for name, data in written.items():
            client.write(name, data)  # each synced (NFS COMMIT) before the next
    finally:
        client.close()
    n1.die()

    def served_elsewhere() -> dict[str, object] | None:
        info = n2.json("volume", "show", "files")
        share = info["share"]
        return info if info["node"] not in ("n1", "") and info["state"] == "attached" and \
            share and share["address"] != "127.0.0.1" else None

    moved = wait_for(served_elsewhere, 120, "the share served on another node")
    assert not moved["refusal"] and not moved["salvage"]
    assert moved["share"]["address"] == f"127.0.0.{moved['node'][1:]}"
    assert moved["share_formatted"] is True  # its file system was not made again
    client = Client(url(moved["share"]))
    try:
        for name, data in written.items():
            assert client.read(name, len(data)) == data, name
        client.write("after", b"new node" * 512)
        assert client.read("after", 4096) == b"new node" * 512
    finally:
        client.close()
    kinds = [e["kind"] for e in n2.json("events", "--volume", "files")]
    assert "failover" in kinds and kinds.count("share-served") >= 2

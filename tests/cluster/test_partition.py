"""Partitions of a cluster whose nodes are network namespaces (tests/netns.py), each with
its own address, daemon, data directory and etcd member: cutting a node off (nftables,
both ways) cuts its etcd member off too.

The acknowledgement oracle (tests/oracle.py) writes through the engine's NBD socket and
knows exactly which writes were acknowledged."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ackcheck import AckWorkload, verify_acknowledged
from tests.cluster import harness
from tests.cluster.harness import Cluster, ClusterNode
from tests.cluster.test_volumes import exports_equal
from tests.harness import alive, wait_for
from tests.netns import Host

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

REGION = (0, 32 << 20)  # where the oracle writes


def uri(node: ClusterNode, volume: str) -> str:
    return f"nbd+unix:///?socket={node.data / 'run' / volume / 'nbd.sock'}"


@pytest.fixture
def netns_cluster(tmp_path: Path) -> Iterator[tuple[Cluster, list[Host]]]:
    """Three nodes, each in its own network namespace beside one of three etcd members."""
    with harness.netns_cluster(tmp_path, 3) as running:
        yield running


def progress(workload: AckWorkload) -> dict[str, int]:
    """The oracle's counts, as computed after this call began (its report is replaced
    every 0.2 s)."""
    first = workload.progress_file.stat().st_mtime_ns
    wait_for(lambda: workload.progress_file.stat().st_mtime_ns != first, 30,
             "the oracle's next report", interval=0.02)
    second = workload.progress_file.stat().st_mtime_ns
    wait_for(lambda: workload.progress_file.stat().st_mtime_ns != second, 30,
             "the oracle's report after that", interval=0.02)
    return workload.progress()


@pytest.mark.slow  # a minute (the default suite's 30-minute budget): run with -m slow
def test_forced_attach_across_a_partition_fences_the_old_engine(
        netns_cluster: tuple[Cluster, list[Host]], tmp_path: Path) -> None:
    """Node 1 (the engine's) is cut off while the oracle writes; the volume is attached on
    node 2 with --force. Every write acknowledged before is there; the old engine
    acknowledges nothing more (its client gets errors); when the partition heals, the old
    engine stops and its replica is rebuilt: no replica holds a write issued after the
    partition."""
    cluster, namespaces = netns_cluster
    n1, n2, _ = cluster.nodes
    n2.cli("volume", "create", "v", "--size", "64M", "--replicas", "3")
    n2.cli("volume", "attach", "v", "--node", "n1")
    engine = int((n1.data / "run" / "v" / "nbd.sock.pid").read_text())
    journal = tmp_path / "old.journal"
    with AckWorkload(uri(n1, "v"), journal, *REGION, queue_depth=8, max_blocks=8,
                     io_timeout=120) as old:
        old.wait_writes(200, 60)
        namespaces[0].partition(both_ways=True)
        cut_at = progress(old)["issued"]  # any later write was issued behind the partition
        wait_for(lambda: n2.json("node", "show", "n1")["state"] == "down", 60, "n1 down")
        refused = n2.cli("volume", "attach", "v", "--node", "n2", check=False)
        assert refused.returncode == 1 and "--force" in refused.stderr
        n2.cli("volume", "attach", "v", "--node", "n2", "--force")
        shown = n2.json("volume", "show", "v")
        assert shown["node"] == "n2" and shown["state"] == "attached"
        assert "the witness names" in str(shown["history"])
        # The old engine cannot record the loss of the replicas it cannot reach: fenced,
        # it fails every write from now on.
        wait_for(lambda: old.progress().get("failed", 0) > 0, 120,
                 "the old engine's client to see errors")
        summary = old.stop(timeout=180)
    acked = summary["acked"]
    assert acked >= 200 and summary["failed"] > 0, summary

    report = verify_acknowledged(uri(n2, "v"), journal)
    assert report["lost"] == 0 and report["foreign"] == 0, report
    assert report["newest_found"] <= cut_at, report  # nothing issued behind the partition

    namespaces[0].heal()
    wait_for(lambda: n2.json("node", "show", "n1")["state"] == "ready", 60, "n1 back")

    def whole() -> bool:
        shown = n2.json("volume", "show", "v")
        return shown["robustness"] == "healthy" and len(shown["replica_list"]) == 3 and \
            all(r["mode"] == "RW" for r in shown["replica_list"])

    wait_for(whole, 180, "n1's replica rebuilt")
    wait_for(lambda: not alive(engine), 60, "n1 to stop its fenced engine")
    report = verify_acknowledged(uri(n2, "v"), journal)
    assert report["lost"] == 0 and report["foreign"] == 0, report
    assert report["newest_found"] <= cut_at, report
    kinds = [e["kind"] for e in n2.json("events")]
    assert "forced-attach" in kinds
    n2.cli("volume", "detach", "v")
    exports_equal(cluster.nodes, "v", tmp_path)  # every replica holds what was verified

"""Volumes of a cluster: replicas on different nodes, an engine on the node it is attached
on, a node that dies (the volume keeps serving, its replica comes back or is replaced on
another node), and a forced attach elsewhere that fences the old engine."""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.conftest import running_cluster
from tests.cluster.harness import Cluster, ClusterNode
from tests.etcd import Etcd
from tests.harness import APPLIANCE, VERIFY, MiB, engine_writes, fio_errors, run, wait_for
from tests.node.test_volume_ops import write_at

WRITES = 200  # by fio before a node is killed


def replicas(node: ClusterNode, volume: str) -> list[dict[str, object]]:
    return list(node.json("volume", "show", volume)["replica_list"])


def healthy(node: ClusterNode, volume: str) -> bool:
    shown = node.json("volume", "show", volume)
    return bool(shown["robustness"] == "healthy" and
                all(r["mode"] == "RW" for r in shown["replica_list"]))


def read_at(device: str, offset: int, length: int) -> bytes:
    """*length* bytes at *offset*, read past the page cache (O_DIRECT, an aligned buffer)."""
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    try:
        with mmap.mmap(-1, length) as aligned:
            os.preadv(fd, [aligned], offset)
            return bytes(aligned)
    finally:
        os.close(fd)


def exports_equal(nodes: list[ClusterNode], volume: str, tmp_path: Path) -> None:
    """Every replica of the detached *volume* holds the same bytes."""
    images = []
    for replica in replicas(nodes[0], volume):
        output = tmp_path / f"{replica['name']}.img"
        run("replica", "export", str(replica["directory"]), "--force", output)
        images.append(output.read_bytes())
        output.unlink()
    assert len(images) >= 2 and all(image == images[0] for image in images[1:])


def test_three_replicas_on_three_nodes_ride_out_a_node_death(cluster: Cluster,
                                                              tmp_path: Path) -> None:
    n1, n2, n3 = cluster.nodes
    n1.change_settings(replica_replenishment_wait=1)
    n2.cli("volume", "create", "v", "--size", "128M", "--replicas", "3")
    assert sorted(str(r["node"]) for r in replicas(n1, "v")) == ["n1", "n2", "n3"]
    device = n3.cli("volume", "attach", "v", "--node", "n1").stdout.strip()
    assert n2.json("volume", "show", "v")["node"] == "n1"
    assert Path(device).exists()
    uri = f"nbd+unix:///?socket={n1.data / 'run' / 'v' / 'nbd.sock'}"
    workload = subprocess.Popen(
        ["fio", "--ioengine=nbd", f"--uri={uri}", "--output-format=json", *VERIFY,
         "--verify_state_save=0", "--size=64M", "--time_based", "--runtime=12"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    control = n1.engine_control("v")
    wait_for(lambda: engine_writes(control) >= WRITES, 60, f"{WRITES} writes by fio")
    n3.die()
    before = engine_writes(control)
    wait_for(lambda: engine_writes(control) >= before + WRITES, 60, "writes without n3")
    stdout, stderr = workload.communicate(timeout=180)
    result = subprocess.CompletedProcess(workload.args, workload.returncode, stdout, stderr)
    assert workload.returncode == 0 and fio_errors(result) == 0, stderr
    shown = n2.json("volume", "show", "v")
    assert shown["robustness"] == "degraded"
    assert {str(r["node"]): r["mode"] for r in shown["replica_list"]}["n3"] == "ERR"
    n3.start()
    wait_for(lambda: healthy(n1, "v"), 120, "n3's replica rebuilt")
    n2.cli("volume", "detach", "v")
    exports_equal(cluster.nodes, "v", tmp_path)


@pytest.fixture
def cluster4(tmp_path: Path, etcd: Etcd) -> Iterator[Cluster]:
    with running_cluster(tmp_path, 4, etcd) as nodes:
        yield nodes


def test_a_lost_node_replica_is_replaced_on_another_node(cluster4: Cluster) -> None:
    n1, n2, n3, n4 = cluster4.nodes
    n1.change_settings(replica_replenishment_wait=1)
    n1.cli("node", "cordon", "n4")
    n1.cli("volume", "create", "v", "--size", "64M", "--replicas", "3")
    n1.cli("node", "uncordon", "n4")
    device = n1.cli("volume", "attach", "v", "--node", "n1").stdout.strip()
    payload = os.urandom(4 * MiB)
    write_at(device, MiB, payload)
    lost = next(r for r in replicas(n1, "v") if r["node"] == "n3")
    n3.die()
    write_at(device, 8 * MiB, payload)  # finds n3 gone
    wait_for(lambda: any(r["node"] == "n4" for r in replicas(n1, "v")), 60,
             "a replacement on n4")
    wait_for(lambda: healthy(n2, "v"), 120, "the replacement rebuilt")
    assert sorted(str(r["node"]) for r in replicas(n1, "v")) == ["n1", "n2", "n4"]
    assert read_at(device, MiB, len(payload)) == payload
    assert read_at(device, 8 * MiB, len(payload)) == payload
    assert Path(str(lost["directory"])).exists()  # n3 is down: nothing deleted it
    n3.start()
    wait_for(lambda: not Path(str(lost["directory"])).exists(), 60,
             "n3 to delete its replaced replica")
    kinds = [e["kind"] for e in n4.json("events")]
    assert "replica-replaced" in kinds


@pytest.mark.slow  # half a minute; the forced attach across a real partition runs by default
def test_forced_attach_elsewhere_fences_the_old_engine(cluster: Cluster) -> None:
    n1, n2, _ = cluster.nodes
    n1.cli("volume", "create", "v", "--size", "64M", "--replicas", "3")
    old_device = n1.cli("volume", "attach", "v").stdout.strip()
    first = os.urandom(MiB)
    write_at(old_device, 0, first)
    engine = int((n1.data / "run" / "v" / "nbd.sock.pid").read_text())
    assert n1.process is not None
    n1.process.send_signal(signal.SIGSTOP)  # n1's daemon is cut off; its engine serves on
    try:
        wait_for(lambda: n2.json("node", "show", "n1")["state"] == "down", 30, "n1 down")
        refused = n2.cli("volume", "attach", "v", "--node", "n2", check=False)
        assert refused.returncode == 1 and "attached on node n1" in refused.stderr
        assert "--force" in refused.stderr
        new_device = n2.cli("volume", "attach", "v", "--node", "n2", "--force").stdout.strip()
        assert n2.json("volume", "show", "v")["node"] == "n2"
        with pytest.raises(OSError):  # the old engine is fenced: its writes fail
            write_at(old_device, 2 * MiB, os.urandom(MiB))
        assert read_at(new_device, 0, MiB) == first
        assert read_at(new_device, 2 * MiB, MiB) == bytes(MiB)  # no replica took it
        second = os.urandom(MiB)
        write_at(new_device, 4 * MiB, second)
    finally:
        n1.process.send_signal(signal.SIGCONT)
    wait_for(lambda: not Path(f"/proc/{engine}").exists(), 60,
             "n1 to stop its fenced engine")
    assert read_at(new_device, 4 * MiB, MiB) == second
    kinds = [e["kind"] for e in n2.json("events")]
    assert "forced-attach" in kinds


@pytest.mark.slow  # a minute: with the slow tests, to keep the default suite in its budget
def test_drain_under_fio_keeps_every_volume_whole(cluster4: Cluster) -> None:
    n1, n2, _, n4 = cluster4.nodes
    n1.cli("node", "cordon", "n4")
    n1.cli("volume", "create", "v", "--size", "128M", "--replicas", "3")
    n1.cli("volume", "create", "idle", "--size", "32M", "--replicas", "3")
    n1.cli("node", "uncordon", "n4")
    n1.cli("volume", "attach", "v", "--node", "n1")
    uri = f"nbd+unix:///?socket={n1.data / 'run' / 'v' / 'nbd.sock'}"
    workload = subprocess.Popen(
        ["fio", "--ioengine=nbd", f"--uri={uri}", "--output-format=json", *VERIFY,
         "--verify_state_save=0", "--size=64M", "--time_based", "--runtime=20"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: engine_writes(n1.engine_control("v")) >= WRITES, 60, "fio writing")
    lowest = [3]
    drain = subprocess.Popen(
        [APPLIANCE, "node", "drain", "n3", "--wait", "--timeout", "240"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=n2.cli_env())
    while drain.poll() is None:  # sample the serving replicas all along
        shown = n2.json("volume", "show", "v")
        lowest[0] = min(lowest[0], sum(r["mode"] == "RW" for r in shown["replica_list"]))
    out, err = drain.communicate()
    assert drain.returncode == 0 and "node n3 drained" in out, err
    stdout, stderr = workload.communicate(timeout=180)
    result = subprocess.CompletedProcess(workload.args, workload.returncode, stdout, stderr)
    assert workload.returncode == 0 and fio_errors(result) == 0, stderr
    assert lowest[0] >= 3  # never fewer serving replicas than it asks for
    assert n1.json("node", "show", "n3")["replicas"] == 0
    assert n1.json("node", "show", "n3")["state"] == "cordoned"
    assert sorted(str(r["node"]) for r in replicas(n1, "v")) == ["n1", "n2", "n4"]
    assert healthy(n1, "v")
    # the detached volume moved too (attached without a device meanwhile), detached again
    wait_for(lambda: n1.json("volume", "show", "idle")["state"] == "detached", 60,
             "the drained detached volume detached again")
    idle = n1.json("volume", "show", "idle")
    assert sorted(r["node"] for r in idle["replica_list"]) == ["n1", "n2", "n4"]
    assert not idle["attached"] and not idle["maintenance"]
    refused = n4.cli("node", "drain", "n2", check=False)
    assert refused.returncode == 1 and "cannot be drained" in refused.stderr
    assert n1.json("node", "show", "n2")["state"] == "ready"  # nothing changed


def test_auto_failover_moves_a_dead_nodes_volume_without_a_loss(cluster: Cluster) -> None:
    """The engine's node dies with its replica: the volume is attached on another node,
    whose engine starts without the dead member, because the witness names the replicas it
    reaches (they hold every acknowledged write): no salvage, nothing given up."""
    n1, n2, _ = cluster.nodes
    settings = n2.change_settings(auto_failover=True, replica_replenishment_wait=1)
    assert settings["auto_failover"] is True
    n2.cli("volume", "create", "v", "--size", "64M", "--replicas", "3")
    device = n2.cli("volume", "attach", "v", "--node", "n1").stdout.strip()
    payload = os.urandom(2 * MiB)
    write_at(device, 3 * MiB, payload)
    n1.die()

    def moved() -> dict[str, object] | None:
        shown = n2.json("volume", "show", "v")
        return shown if shown["node"] not in ("n1", "") and shown["state"] == "attached" \
            and shown["device"] else None

    shown = wait_for(moved, 90, "the volume attached on another node")
    assert not shown["refusal"] and not shown["salvage"]
    assert "failover" in [e["kind"] for e in n2.json("events")]
    assert read_at(str(shown["device"]), 3 * MiB, len(payload)) == payload
    assert "the witness names" in str(shown["history"])


def test_best_effort_locality_builds_a_replica_where_the_volume_attaches(
        cluster: Cluster) -> None:
    """Attached on a node without a replica, a best-effort volume gets one built there in
    place of another node's; it never has fewer than its replica count meanwhile."""
    n1, n2, _ = cluster.nodes
    n1.cli("node", "cordon", "n1")
    n1.cli("volume", "create", "v", "--size", "64M", "--replicas", "2",
           "--data-locality", "best-effort")
    n1.cli("node", "uncordon", "n1")
    assert "n1" not in [r["node"] for r in replicas(n2, "v")]
    device = n2.cli("volume", "attach", "v", "--node", "n1").stdout.strip()
    payload = os.urandom(2 * MiB)
    write_at(device, MiB, payload)

    def local_and_whole() -> bool:
        listed = replicas(n2, "v")
        return "n1" in [r["node"] for r in listed] and len(listed) == 2 and healthy(n2, "v")

    wait_for(local_and_whole, 120, "a replica on n1 in place of a remote one")
    assert read_at(device, MiB, len(payload)) == payload
    kinds = [e["kind"] for e in n2.json("events")]
    assert "replica-local" in kinds and "replica-drained" in kinds


def test_disk_eviction_moves_a_detached_volumes_replica_to_another_node(
        cluster: Cluster, tmp_path: Path) -> None:
    n1, _, n3 = cluster.nodes
    n1.cli("node", "cordon", "n3")
    n1.cli("volume", "create", "v", "--size", "64M", "--replicas", "2")
    n1.cli("node", "uncordon", "n3")
    device = n1.cli("volume", "attach", "v", "--node", "n1").stdout.strip()
    payload = os.urandom(2 * MiB)
    write_at(device, MiB, payload)
    n1.cli("volume", "detach", "v")
    leaving = next(r for r in replicas(n1, "v") if r["node"] == "n2")
    n3.cli("disk", "update", str(leaving["disk"]), "--evict")

    def moved() -> bool:
        shown = n1.json("volume", "show", "v")
        return sorted(str(r["node"]) for r in shown["replica_list"]) == ["n1", "n3"] and \
            shown["state"] == "detached"

    wait_for(moved, 120, "the replica moved off the evicted disk, the volume detached")
    assert not Path(str(leaving["directory"])).exists()
    exports_equal(cluster.nodes, "v", tmp_path)
    device = n1.cli("volume", "attach", "v").stdout.strip()
    assert read_at(device, MiB, len(payload)) == payload

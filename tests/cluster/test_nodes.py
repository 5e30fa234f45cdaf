"""Nodes joining a cluster: one token, node states, cordon, labels, the leader, and what
is refused (a wrong key, unknown nodes, cordoning the last schedulable node)."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.cluster.harness import Cluster, ClusterNode
from tests.etcd import Etcd
from tests.harness import wait_for


def test_three_nodes_share_one_token_and_know_each_other(cluster: Cluster) -> None:
    n1, n2, n3 = cluster.nodes
    assert os.stat(cluster.key_file).st_mode & 0o777 == 0o600
    tokens = {node.token_file.read_text() for node in cluster.nodes}
    assert len(tokens) == 1  # a client uses one token for any node
    assert all(os.stat(n.token_file).st_mode & 0o777 == 0o600 for n in cluster.nodes)
    for node in cluster.nodes:
        listed = node.json("node", "list")
        assert [(n["name"], n["address"], n["state"]) for n in listed] == [
            ("n1", "127.0.0.1", "ready"), ("n2", "127.0.0.2", "ready"),
            ("n3", "127.0.0.3", "ready")]
        assert sum(n["leader"] for n in listed) == 1
    shown = n3.json("node", "show", "n2")
    assert shown["api"] == f"127.0.0.2:{n2.port}" and shown["last_heartbeat"]
    # each node has its default disk, named after it
    disks = n1.json("disk", "list")
    assert sorted(d["node"] for d in disks) == ["n1", "n2", "n3"]
    assert all(d["name"].startswith(d["node"] + "-") for d in disks)


def test_cordon_label_and_bad_input(cluster: Cluster) -> None:
    n1, n2, _ = cluster.nodes
    n2.cli("node", "cordon", "n2")
    assert n1.json("node", "show", "n2")["state"] == "cordoned"
    n1.cli("node", "label", "n2", "zone=z2", "rack=r1")
    shown = n1.json("node", "show", "n2")
    assert shown["zone"] == "z2" and shown["labels"] == {"rack": "r1", "zone": "z2"}
    n1.cli("node", "label", "n2", "rack-")
    assert n1.json("node", "show", "n2")["labels"] == {"zone": "z2"}
    n1.cli("node", "uncordon", "n2")
    assert n1.json("node", "show", "n2")["state"] == "ready"
    for args in (("node", "show", "n9"), ("node", "cordon", "n9"),
                 ("node", "label", "n9", "zone=a")):
        result = n1.cli(*args, check=False)
        assert result.returncode == 3 and "node n9 does not exist" in result.stderr, result
    result = n1.cli("node", "label", "n2", "zone=bad value", check=False)
    assert result.returncode == 2 and "invalid value" in result.stderr
    result = n1.cli("disk", "add", "/tmp", "--node", "n9", check=False)
    assert result.returncode == 3 and "node n9 does not exist" in result.stderr
    n1.cli("node", "cordon", "n1")
    n1.cli("node", "cordon", "n2")
    result = n1.cli("node", "cordon", "n3", check=False)
    assert result.returncode == 1 and "last node that can take new replicas" in result.stderr
    assert n1.json("node", "show", "n3")["state"] == "ready"  # nothing changed


def test_a_dead_node_is_down_and_comes_back(cluster: Cluster) -> None:
    n1, _, n3 = cluster.nodes
    n3.die()
    wait_for(lambda: n1.json("node", "show", "n3")["state"] == "down", 30, "n3 down")
    assert n1.json("node", "show", "n3")["last_heartbeat"] is None
    token = n1.token_file.read_text().strip()
    metrics = httpx.get(n1.url + "/metrics", headers={"Authorization": f"Bearer {token}"},
                        timeout=30).text
    assert 'appliance_node_ready{node="n3"} 0.0' in metrics
    assert 'appliance_node_ready{node="n1"} 1.0' in metrics
    assert metrics.count("appliance_node_leader{") == 3
    def kinds() -> list[str]:
        return [e["kind"] for e in json.loads(n1.cli("events", "-o", "json").stdout)]

    # the leader looks at the nodes every third of the lease: it records the death
    wait_for(lambda: "node-down" in kinds(), 30, "the node-down event")
    n3.start()
    wait_for(lambda: n1.json("node", "show", "n3")["state"] == "ready", 30, "n3 back")
    wait_for(lambda: "node-up" in kinds(), 30, "the node-up event")


def test_joining_with_another_key_or_none_is_refused(tmp_path: Path, cluster: Cluster,
                                                     etcd: Etcd) -> None:
    other_key = tmp_path / "other.key"
    other_key.write_text(os.urandom(32).hex() + "\n")
    other_key.chmod(0o600)
    stranger = ClusterNode(tmp_path / "n4", 4, etcd, other_key, cluster.config)
    stranger.start(wait=False)
    assert stranger.process is not None
    assert stranger.process.wait(timeout=60) == 1
    assert "is not the key of the cluster" in stranger.log.read_text()
    missing = ClusterNode(tmp_path / "n5", 5, etcd, tmp_path / "absent.key", cluster.config)
    missing.start(wait=False)
    assert missing.process is not None
    assert missing.process.wait(timeout=60) == 2  # a usage error: the file is missing
    assert "copy it from a node of the cluster" in missing.log.read_text()
    assert not (tmp_path / "absent.key").exists()
    assert len(cluster.nodes[0].json("node", "list")) == 3  # neither joined


def test_another_node_leads_when_the_leader_dies(cluster: Cluster) -> None:
    leader = cluster.leader()
    assert leader is not None
    leader.die()
    alive = next(n for n in cluster.nodes if n is not leader)

    def new_leader() -> str | None:
        found = [n["name"] for n in alive.json("node", "list") if n["leader"]]
        return found[0] if found and found[0] != leader.name else None

    assert wait_for(new_leader, 30, "another leader") != leader.name


def test_creates_through_every_node_at_once_place_each_replica_once(cluster: Cluster) -> None:
    token = cluster.nodes[0].token_file.read_text().strip()
    headers = {"Authorization": f"Bearer {token}"}

    def create(index: int) -> int:
        node = cluster.nodes[index % 3]
        answer = httpx.post(node.url + "/v1/volumes", headers=headers, timeout=120,
                            json={"name": f"c{index}", "size": "16M", "replicas": 3})
        return answer.status_code

    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(create, range(24)))
        # the same name through two nodes at once: one creates it
        twice = list(pool.map(lambda node: httpx.post(
            node.url + "/v1/volumes", headers=headers, timeout=120,
            json={"name": "same", "size": "16M", "replicas": 2}).status_code,
            cluster.nodes[:2]))
    assert codes == [201] * 24
    assert sorted(twice) == [201, 409]
    n1 = cluster.nodes[0]
    wait_for(lambda: all(v["state"] == "detached" for v in n1.json("volume", "list")), 120,
             "every volume created")
    ports: dict[str, list[int]] = {}
    for volume in n1.json("volume", "list"):
        placed = volume["replica_list"]
        assert len(placed) == volume["replicas"]
        assert len({r["node"] for r in placed}) == len(placed)  # one per node
        for replica in placed:
            ports.setdefault(replica["node"], []).append(replica["port"])
    assert sum(len(p) for p in ports.values()) == 24 * 3 + 2
    assert all(len(set(p)) == len(p) for p in ports.values())  # no port given twice

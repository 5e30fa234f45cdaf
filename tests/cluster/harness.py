"""Clusters for tests: an etcd cluster of real members, and node daemons started as an
operator would, either on their own loopback addresses (127.0.0.N: each binds only its
own) or each in a network namespace of its own with one etcd member beside it
(tests/netns.py), where cutting a node off cuts its etcd member off too."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from appliance.frontend import attach as frontend
from tests.etcd import Etcd
from tests.harness import Node, alive, wait_for
from tests.netns import Host, hosts

LEASE_TTL = 3  # seconds: a killed node is down this soon


class ClusterNode(Node):
    """A node daemon of a cluster, on loopback address 127.0.0.*index*, or in the network
    namespace of *netns* (beside etcd member *index* - 1)."""

    def __init__(self, root: Path, index: int, etcd: Etcd, key_file: Path,
                 config: Path, netns: Host | None = None) -> None:
        root.mkdir(exist_ok=True)
        super().__init__(root, host=netns.address if netns else f"127.0.0.{index}",
                         launcher=netns.launcher if netns else ())
        self.name = f"n{index}"
        self.index = index
        self.netns = netns
        self.etcd = etcd
        self.key_file = key_file
        self.config = config

    def start(self, *extra: str | Path, wait: bool = True) -> None:
        flag = self.etcd.flag_from(self.index - 1) if self.netns else self.etcd.cluster_flag
        super().start("--cluster", flag, "--node-name", self.name,
                      "--advertise", self.host, "--cluster-key-file", self.key_file,
                      "--config", self.config, *extra, wait=wait)

    def json(self, *args: str | Path) -> Any:
        return json.loads(self.cli(*args, "-o", "json").stdout)

    def processes(self) -> list[int]:
        """The engines, replica servers and NFS servers this node's daemon started."""
        pids = []
        for pid_file in [*self.data.rglob("server.pid"), *self.data.rglob("nbd.sock.pid"),
                         *self.data.rglob("ganesha.pid")]:
            with contextlib.suppress(OSError, ValueError):
                pids.append(int(pid_file.read_text()))
        return [pid for pid in pids if alive(pid)]

    def cleanup(self) -> None:
        """Everything this node started gone, fast: devices detached, then every process
        killed (a graceful engine stop may wait out replicas other nodes' cleanups took)."""
        self.stop(signal.SIGKILL)
        self.stop_shares()  # before the devices under them go
        run_dir = self.data / "run"
        for state in sorted(run_dir.glob("*/ctl.sock.attach")) if run_dir.exists() else []:
            with contextlib.suppress(Exception):
                frontend.detach(state)
        self.die()
        super().cleanup()

    def die(self) -> None:
        """Every process of the node killed with SIGKILL (its daemon, engines, servers)."""
        self.stop(signal.SIGKILL)
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in self.processes():
            wait_for(partial(_dead, pid), 30, f"process {pid} to die")
        self.stop_shares()  # a dead machine's NFS servers and mounts are gone too


def _dead(pid: int) -> bool:
    return not alive(pid)


class Cluster:
    def __init__(self, root: Path, size: int, etcd: Etcd, netns: list[Host] | None = None,
                 **config: Any) -> None:
        self.root = root
        self.etcd = etcd
        self.key_file = root / "cluster.key"
        settings = {"node_lease_ttl": LEASE_TTL, "reconcile_interval": 1.0, **config}
        self.config = root / "node.toml"
        self.config.write_text("".join(f"{key} = {json.dumps(value)}\n"
                                       for key, value in settings.items()))
        self.nodes = [ClusterNode(root / f"n{index}", index, etcd, self.key_file, self.config,
                                  netns[index - 1] if netns else None)
                      for index in range(1, size + 1)]

    def start(self) -> None:
        self.nodes[0].start()  # makes the cluster's key
        for node in self.nodes[1:]:
            node.start()
        wait_for(lambda: all(n["state"] == "ready" for n in self.nodes[0].json("node", "list"))
                 and len(self.nodes[0].json("node", "list")) == len(self.nodes), 60,
                 "every node to be ready")

    def leader(self) -> ClusterNode | None:
        names = [n["name"] for n in self.nodes[0].json("node", "list") if n["leader"]]
        return next((n for n in self.nodes if names and n.name == names[0]), None)

    def cleanup(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.cleanup()


@contextmanager
def netns_cluster(root: Path, size: int = 3) -> Iterator[tuple[Cluster, list[Host]]]:
    """*size* nodes, each in its own network namespace beside one of *size* etcd members;
    everything stopped afterwards (partitions healed first)."""
    with hosts(size) as namespaces:
        (root / "etcd").mkdir(parents=True)
        etcd = Etcd(root / "etcd", size, hosts=namespaces)
        nodes = Cluster(root, size, etcd, netns=namespaces)
        try:
            etcd.start()
            nodes.start()
            yield nodes, namespaces
        finally:
            for host in namespaces:
                host.heal()
            nodes.cleanup()
            etcd.stop()
            for host in namespaces:
                host.kill_everything()

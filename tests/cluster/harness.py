"""Clusters for tests: an etcd cluster of real members, and node daemons on their own
loopback addresses (127.0.0.N: each binds only its own), started as an operator would."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from tests.harness import Node, alive, free_port, wait_for

LEASE_TTL = 3  # seconds: a killed node is down this soon


class Etcd:
    """*size* etcd members on 127.0.0.1, one process each."""

    def __init__(self, root: Path, size: int = 1) -> None:
        self.root = root
        self.names = [f"e{index}" for index in range(size)]
        self.clients = {name: free_port() for name in self.names}
        self.peers = {name: free_port() for name in self.names}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{self.clients[name]}" for name in self.names]

    @property
    def cluster_flag(self) -> str:
        return ",".join(f"etcd://127.0.0.1:{self.clients[name]}" for name in self.names)

    def start(self, name: str | None = None) -> None:
        initial = ",".join(f"{n}=http://127.0.0.1:{self.peers[n]}" for n in self.names)
        for member in [name] if name else self.names:
            client = f"http://127.0.0.1:{self.clients[member]}"
            peer = f"http://127.0.0.1:{self.peers[member]}"
            with open(self.root / f"{member}.log", "ab") as log:
                self.processes[member] = subprocess.Popen(
                    ["etcd", "--name", member, "--data-dir", str(self.root / member),
                     "--listen-client-urls", client, "--advertise-client-urls", client,
                     "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                     "--initial-cluster", initial, "--initial-cluster-state", "new",
                     "--heartbeat-interval", "100", "--election-timeout", "1000"],
                    stdout=log, stderr=log, start_new_session=True)
        wait_for(self.healthy, 60, "etcd to have a leader")

    def healthy(self) -> bool:
        for url in self.urls:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).json().get("health") == "true":
                    return True
        return False

    def kill(self, name: str) -> None:
        process = self.processes.pop(name)
        process.kill()
        process.wait(timeout=30)

    def stop(self) -> None:
        for name in list(self.processes):
            self.kill(name)


class ClusterNode(Node):
    """A node daemon of a cluster, on loopback address 127.0.0.*index*."""

    def __init__(self, root: Path, index: int, etcd: Etcd, key_file: Path,
                 config: Path) -> None:
        root.mkdir(exist_ok=True)
        super().__init__(root, host=f"127.0.0.{index}")
        self.name = f"n{index}"
        self.etcd = etcd
        self.key_file = key_file
        self.config = config

    def start(self, *extra: str | Path, wait: bool = True) -> None:
        super().start("--cluster", self.etcd.cluster_flag, "--node-name", self.name,
                      "--advertise", self.host, "--cluster-key-file", self.key_file,
                      "--config", self.config, *extra, wait=wait)

    def json(self, *args: str | Path) -> Any:
        return json.loads(self.cli(*args, "-o", "json").stdout)

    def processes(self) -> list[int]:
        """The engines and replica servers this node's daemon started."""
        pids = []
        for pid_file in [*self.data.rglob("server.pid"), *self.data.rglob("nbd.sock.pid")]:
            with contextlib.suppress(OSError, ValueError):
                pids.append(int(pid_file.read_text()))
        return [pid for pid in pids if alive(pid)]

    def die(self) -> None:
        """Every process of the node killed with SIGKILL (its daemon, engines, servers)."""
        self.stop(signal.SIGKILL)
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in self.processes():
            wait_for(partial(_dead, pid), 30, f"process {pid} to die")


def _dead(pid: int) -> bool:
    return not alive(pid)


class Cluster:
    def __init__(self, root: Path, size: int, etcd: Etcd, **config: Any) -> None:
        self.root = root
        self.etcd = etcd
        self.key_file = root / "cluster.key"
        settings = {"node_lease_ttl": LEASE_TTL, "reconcile_interval": 1.0, **config}
        self.config = root / "node.toml"
        self.config.write_text("".join(f"{key} = {json.dumps(value)}\n"
                                       for key, value in settings.items()))
        self.nodes = [ClusterNode(root / f"n{index}", index, etcd, self.key_file, self.config)
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

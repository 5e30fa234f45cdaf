"""A real etcd for tests and benchmarks: members of Debian's etcd-server, on free loopback
ports or each on the address of a network namespace (tests/netns.py), their data and logs in
a given directory. Every member runs with ``--pre-vote`` (docs/cluster.md)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.harness import free_port, wait_for
from tests.netns import Host


class Etcd:
    """*size* etcd members, one process each: on 127.0.0.1, or member *i* on *hosts[i]*
    started through *launchers[i]* (a command prefix: nsenter into its namespace)."""

    def __init__(self, root: Path, size: int = 1, hosts: list[Host] | None = None, *,
                 scheme: str = "http", options: Sequence[str] = ()) -> None:
        self.root = root
        self.scheme = scheme  # of the client URLs
        self.options = list(options)  # more etcd options (TLS files)
        self.names = [f"e{index}" for index in range(size)]
        self.hosts = {name: hosts[index] if hosts else None
                      for index, name in enumerate(self.names)}
        self.clients = {name: free_port() for name in self.names}
        self.peers = {name: free_port() for name in self.names}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def address(self, name: str) -> str:
        host = self.hosts[name]
        return host.address if host else "127.0.0.1"

    @property
    def urls(self) -> list[str]:
        return [f"{self.scheme}://{self.address(name)}:{self.clients[name]}"
                for name in self.names]

    @property
    def cluster_flag(self) -> str:
        return self.flag_from(0)

    def flag_from(self, first: int) -> str:
        """``--cluster`` naming every member, member *first* first (the one beside a node)."""
        names = self.names[first:] + self.names[:first]
        return ",".join(f"etcd://{self.address(n)}:{self.clients[n]}" for n in names)

    def start(self, name: str | None = None) -> None:
        """Start every member (or *name*), and wait until the cluster has a leader."""
        self.launch(name)
        wait_for(self.healthy, 60, "etcd to have a leader")

    def launch(self, name: str | None = None) -> None:
        """Start every member (or *name*) without waiting."""
        initial = ",".join(f"{n}=http://{self.address(n)}:{self.peers[n]}" for n in self.names)
        for member in [name] if name else self.names:
            client = f"{self.scheme}://{self.address(member)}:{self.clients[member]}"
            peer = f"http://{self.address(member)}:{self.peers[member]}"
            host = self.hosts[member]
            with open(self.root / f"{member}.log", "ab") as log:
                self.processes[member] = subprocess.Popen(
                    [*(host.launcher if host else []), "etcd", "--name", member,
                     "--data-dir", str(self.root / member),
                     "--listen-client-urls", client, "--advertise-client-urls", client,
                     "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                     "--initial-cluster", initial, "--initial-cluster-state", "new",
                     "--heartbeat-interval", "100", "--election-timeout", "1000",
                     "--pre-vote", *self.options],
                    stdout=log, stderr=log, start_new_session=True)

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



def answers(url: str) -> bool:
    """Whether the etcd at *url* (plain HTTP) answers its status call."""
    try:
        return httpx.post(url + "/v3/maintenance/status", json={}, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def start_etcd(directory: Path, scheme: str = "http",
               *tls: str) -> tuple[subprocess.Popen[bytes], str]:
    """One etcd member on free loopback ports (clients over *scheme*, with the *tls*
    options), not waited for; the process and its client URL."""
    etcd = Etcd(directory, scheme=scheme, options=tls)
    etcd.launch()
    return etcd.processes[etcd.names[0]], etcd.urls[0]


@contextmanager
def running_etcd(directory: Path) -> Iterator[str]:
    """A plain-HTTP etcd that answers, for the block: its client URL; stopped after."""
    etcd = Etcd(directory)
    try:
        etcd.start()
        yield etcd.urls[0]
    finally:
        etcd.stop()

"""A real etcd for tests and benchmarks: one member of Debian's etcd-server on free loopback
ports, its data and log in a given directory."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.harness import free_port, wait_for


def answers(url: str) -> bool:
    """Whether the etcd at *url* (plain HTTP) answers its status call."""
    try:
        return httpx.post(url + "/v3/maintenance/status", json={}, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def start_etcd(directory: Path, scheme: str = "http",
               *tls: str) -> tuple[subprocess.Popen[bytes], str]:
    """One etcd member on free loopback ports (clients over *scheme*, with the *tls*
    options); the process and its client URL."""
    client, peer = free_port(), free_port()
    url, peer_url = f"{scheme}://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
    with open(directory / "etcd.log", "wb") as log:
        process = subprocess.Popen(
            ["etcd", "--data-dir", str(directory / "etcd"), "--listen-client-urls", url,
             "--advertise-client-urls", url, "--listen-peer-urls", peer_url,
             "--initial-advertise-peer-urls", peer_url, "--initial-cluster",
             f"default={peer_url}", *tls], stdout=log, stderr=log)
    return process, url


@contextmanager
def running_etcd(directory: Path) -> Iterator[str]:
    """A plain-HTTP etcd that answers, for the block: its client URL; stopped after."""
    process, url = start_etcd(directory)
    try:
        wait_for(lambda: answers(url), 30, "etcd to answer")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)

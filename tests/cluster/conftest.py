"""Fixtures of the cluster tests: etcd, and clusters of node daemons."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.harness import Cluster, Etcd


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[Etcd]:
    (tmp_path / "etcd").mkdir()
    running = Etcd(tmp_path / "etcd")
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def cluster(tmp_path: Path, etcd: Etcd) -> Iterator[Cluster]:
    """Three nodes on one etcd member."""
    nodes = Cluster(tmp_path, 3, etcd)
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.cleanup()

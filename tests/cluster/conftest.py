"""Fixtures of the cluster tests: etcd, and clusters of node daemons."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.cluster.harness import Cluster
from tests.etcd import Etcd


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[Etcd]:
    (tmp_path / "etcd").mkdir()
    running = Etcd(tmp_path / "etcd")
    running.start()
    try:
        yield running
    finally:
        running.stop()


@contextmanager
def running_cluster(tmp_path: Path, size: int, etcd: Etcd) -> Iterator[Cluster]:
    """*size* nodes on *etcd*, every node ready; everything they started stopped after."""
    nodes = Cluster(tmp_path, size, etcd)
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.cleanup()


@pytest.fixture
def cluster(tmp_path: Path, etcd: Etcd) -> Iterator[Cluster]:
    """Three nodes on one etcd member."""
    with running_cluster(tmp_path, 3, etcd) as nodes:
        yield nodes

"""Shared fixtures. Tests fail on any WARNING or ERROR log record they did not expect."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.faults import small_disk
from tests.harness import Node

settings.register_profile("default", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", deadline=None, max_examples=1000,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _no_unexpected_log_records(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.INFO)
    yield
    bad = [f"{r.levelname} {r.name}: {r.getMessage()}" for r in caplog.get_records("call")
           if r.levelno >= logging.WARNING]
    assert not bad, f"unexpected log records: {bad}"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """A node daemon started as an operator would, with a second disk (tagged "second")
    beside its default one; everything it started is stopped afterwards."""
    running = Node(tmp_path)
    running.start()
    second = tmp_path / "disk2"
    second.mkdir()
    running.cli("disk", "add", second, "--tag", "second")
    try:
        yield running
    finally:
        running.cleanup()


@pytest.fixture
def replica_path(tmp_path: Path) -> Path:
    return tmp_path / "replica"


@pytest.fixture
def small_ext4(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB ext4 filesystem on a loop device, mounted: a disk that fills up quickly."""
    if os.geteuid() != 0:
        pytest.skip("mounting a loop device needs root")
    with small_disk(tmp_path, "disk", 24) as mount:
        yield mount

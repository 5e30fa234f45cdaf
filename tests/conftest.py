"""Shared fixtures. Tests fail on any WARNING or ERROR log record they did not expect."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

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
def replica_path(tmp_path: Path) -> Path:
    return tmp_path / "replica"


@pytest.fixture
def small_ext4(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB ext4 filesystem on a loop device, mounted: a disk that fills up quickly."""
    if os.geteuid() != 0:
        pytest.skip("mounting a loop device needs root")
    image, mount = tmp_path / "disk.img", tmp_path / "disk"
    with open(image, "wb") as file:
        file.truncate(24 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    mount.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)

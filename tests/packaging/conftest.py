"""The appliance's Debian package, built once per test session, and machines to install it
on (tests/packaging/sandbox.py)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.netns import hosts
from tests.packaging.sandbox import Sandbox, sandboxes

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "packaging" / "deb" / "build.sh"


@dataclass(frozen=True)
class Debs:
    first: Path  # revision 1
    newer: Path  # the same source rebuilt as revision 2: an upgrade


def build(out: Path, revision: int) -> Path:
    result = subprocess.run([str(BUILD), "--out", str(out), "--revision", str(revision)],
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, f"build.sh failed:\n{result.stdout}{result.stderr}"
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def debs(tmp_path_factory: pytest.TempPathFactory) -> Debs:
    out = tmp_path_factory.mktemp("debs")
    return Debs(build(out, 1), build(out, 2))


def installed_version() -> str | None:
    result = subprocess.run(["dpkg-query", "-W", "-f", "${Status} ${Version}", "appliance"],
                            capture_output=True, text=True, check=False)
    words = result.stdout.split()
    return words[-1] if result.returncode == 0 and "installed" in words[:3] else None


def purge(box: Sandbox) -> None:
    """No appliance package on the machine: one left by an interrupted run is purged, from
    inside *box* so that its scripts touch the sandbox's /run and /var/log, not the
    machine's."""
    listed = subprocess.run(["dpkg-query", "-W", "appliance"], capture_output=True,
                            check=False)
    if listed.returncode == 0:
        box.run(["dpkg", "--purge", "--force-remove-reinstreq", "appliance"],
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "APPLIANCE_FORCE_REMOVE": "1"})


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    """One machine to install on; no appliance package installed before or after."""
    with hosts(1) as made, sandboxes(made, tmp_path / "hosts") as (box,):
        purge(box)
        try:
            yield box
        finally:
            purge(box)

"""Fixtures of the CSI tests: the plugin in front of a real node daemon."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.csi.harness import SANITY, Plugin, unmount_all
from tests.harness import Node

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


def node_name(node: Node) -> str:
    return str(json.loads(node.cli("node", "show", "-o", "json").stdout)["name"])


@pytest.fixture
def plugin(node: Node, tmp_path: Path) -> Iterator[Plugin]:
    """`appliance csi --mode all` for the node daemon of the `node` fixture; whatever its
    calls mounted under tmp_path is unmounted afterwards."""
    running = Plugin(tmp_path / "csi", node, node_name(node))
    running.start()
    try:
        yield running
    finally:
        running.stop()
        unmount_all(tmp_path, besides=node.data)


@pytest.fixture
def sanity() -> Path:
    if not SANITY.is_file():
        pytest.fail(f"csi-sanity is not at {SANITY} (../shared/tools beside the project)")
    return SANITY

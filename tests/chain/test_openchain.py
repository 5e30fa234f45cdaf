"""The open chain's rule, held by construction: its metadata and its set of layer files change
only under the exclusive access, and only in the order commit first, files after."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.chain import Replica
from appliance.chain.access import AccessLock
from appliance.chain.directory import open_directory, read_metadata
from appliance.chain.layerfile import LayerFile
from appliance.chain.openchain import OpenChain


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[OpenChain]:
    path = tmp_path / "r"
    Replica.create(path, 1 << 20).close()
    dir_fd = open_directory(path, exclusive=True)
    opened = OpenChain(path, dir_fd, read_metadata(dir_fd, path))
    yield opened
    opened.close()


def test_changes_need_the_exclusive_access(chain: OpenChain) -> None:
    meta = chain.meta
    with pytest.raises(AssertionError, match="exclusive"):
        chain.commit(meta.evolve(next_layer_id=meta.next_layer_id + 1))
    with chain.access.shared(), pytest.raises(AssertionError, match="exclusive"):
        chain.commit(meta.evolve(next_layer_id=meta.next_layer_id + 1))
    with chain.access.exclusive():
        chain.commit(meta.evolve(next_layer_id=meta.next_layer_id + 1))
    assert chain.meta.next_layer_id == meta.next_layer_id + 1
    assert read_metadata(chain.dir_fd, chain.path) == chain.meta  # durably


def test_files_join_after_the_commit_that_lists_them(chain: OpenChain) -> None:
    unlisted = chain.meta.next_layer_id
    fd = os.open(os.devnull, os.O_RDONLY)
    with chain.access.exclusive(), pytest.raises(AssertionError, match="after the commit"):
        chain.add_layer(LayerFile(unlisted, fd, 4096))
    os.close(fd)
    with chain.access.exclusive(), pytest.raises(AssertionError, match="after the commit"):
        chain.close_layer(chain.meta.head)  # still listed: it cannot leave


def test_held_exclusively_names_the_holding_thread() -> None:
    lock = AccessLock()
    seen: list[bool] = []
    with lock.exclusive():
        assert lock.held_exclusively()
        other = threading.Thread(target=lambda: seen.append(lock.held_exclusively()))
        other.start()
        other.join()
    assert seen == [False]
    assert not lock.held_exclusively()
    with lock.shared():
        assert not lock.held_exclusively()

"""A replica creation cut short (the process killed before the metadata, written last, was
in place) leaves files that a new creation clears; anything else in the directory is kept
and refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.chain import format as fmt
from appliance.chain.replica import Replica
from appliance.errors import AlreadyExists


def _cut_short(path: Path) -> None:
    """The files a creation makes before its metadata."""
    path.mkdir()
    (path / fmt.STATE_FILE).write_bytes(bytes(4096))
    with open(path / fmt.layer_file_name(1), "wb") as layer:
        layer.truncate(1 << 20)
    (path / (fmt.METADATA_FILE + fmt.TEMP_SUFFIX)).write_bytes(b"{")


def test_a_creation_cut_short_is_made_again(tmp_path: Path) -> None:
    path = tmp_path / "replica"
    _cut_short(path)
    with Replica.create(path, 1 << 20) as replica:
        assert replica.size == 1 << 20
    assert sorted(os.listdir(path)) == sorted([fmt.METADATA_FILE, fmt.STATE_FILE,
                                               fmt.layer_file_name(1)])


@pytest.mark.parametrize("extra", [fmt.METADATA_FILE, "data.img", "notes.txt"])
def test_anything_else_is_refused_and_kept(tmp_path: Path, extra: str) -> None:
    path = tmp_path / "replica"
    _cut_short(path)
    (path / extra).write_bytes(b"keep me")
    before = sorted(os.listdir(path))
    with pytest.raises(AlreadyExists, match="is not empty"):
        Replica.create(path, 1 << 20)
    assert sorted(os.listdir(path)) == before
    assert (path / extra).read_bytes() == b"keep me"

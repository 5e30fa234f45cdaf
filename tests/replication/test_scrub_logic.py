"""The scrub's decisions on real replica directories opened in-process (the daemon's runs
are in tests/node/test_scrub.py): a chunk damaged on two of three replicas is mended from
the third; a copy that does not match a replica's own checksum is never written; a
replica whose damaged chunk holds other blocks than its checksum says is left unrepaired;
replicas whose first checksums already disagree are reported, not mended; a stop request
ends a scrub."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.chain import Replica
from appliance.chain.checksum import CHUNK_SIZE
from appliance.chain.format import BLOCK_SIZE
from appliance.errors import Cancelled, InvalidArgument
from appliance.replication.scrub import LocalPeer, scrub
from tests.chain.helpers import pattern, snapshot_bytes
from tests.logcheck import expect_log

SIZE = 8 * CHUNK_SIZE


def layer_path(replica: Replica, name: str) -> Path:
    meta = json.loads((Path(replica.path) / "replica.json").read_text())
    [layer] = [x for x in meta["layers"] if x["name"] == name]
    return Path(replica.path) / f"layer-{layer['id']:06d}.img"


def damage(replica: Replica, name: str, offset: int) -> None:
    with open(layer_path(replica, name), "r+b") as file:
        file.seek(offset)
        old = file.read(8)
        file.seek(offset)
        file.write(bytes(b ^ 0x55 for b in old))


@contextlib.contextmanager
def replicas(tmp_path: Path, count: int) -> Iterator[list[Replica]]:
    """*count* replicas holding the same snapshot s1 (3 MiB of data, a hole, 1 MiB more)."""
    with contextlib.ExitStack() as stack:
        opened = []
        for index in range(count):
            replica = stack.enter_context(Replica.create(tmp_path / f"r{index}", SIZE))
            replica.write(pattern(1, 3 * CHUNK_SIZE), 0)
            replica.write(pattern(2, CHUNK_SIZE), 5 * CHUNK_SIZE)
            replica.snapshot("s1")
            replica.write(pattern(3, BLOCK_SIZE), 0)  # the head changes too
            opened.append(replica)
        yield opened


def peers(opened: list[Replica]) -> list[LocalPeer]:
    return [LocalPeer(f"r{i}", replica) for i, replica in enumerate(opened)]


def test_damage_on_two_of_three_replicas_is_mended_from_the_third(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with replicas(tmp_path, 3) as opened:
        assert scrub(peers(opened), 0).findings == []  # checksums taken
        expected = snapshot_bytes(opened[2], "s1")
        damage(opened[0], "s1", CHUNK_SIZE + 5)
        damage(opened[1], "s1", CHUNK_SIZE + 5)
        damage(opened[1], "s1", 5 * CHUNK_SIZE + 100)
        report = scrub(peers(opened), 0)
        assert sorted((f.replica, f.offset, f.result, f.source) for f in report.findings) == [
            ("r0", CHUNK_SIZE, "repaired", "r2"),
            ("r1", CHUNK_SIZE, "repaired", "r2"),
            ("r1", 5 * CHUNK_SIZE, "repaired", "r0")]
        assert all(snapshot_bytes(r, "s1") == expected for r in opened)
        assert scrub(peers(opened), 0).findings == []
    expect_log(caplog, r"bytes \d+-\d+ were damaged: repaired")


def test_a_copy_that_does_not_match_the_checksum_is_refused(tmp_path: Path) -> None:
    with replicas(tmp_path, 2) as opened:
        scrub(peers(opened), 0)
        before = layer_path(opened[0], "s1").read_bytes()
        bitmap, data = opened[1].read_chunk("s1", 0)
        with pytest.raises(InvalidArgument, match="does not match this replica's checksum"):
            opened[0].repair_chunk("s1", 0, bitmap, data[:-1] + b"x")
        assert layer_path(opened[0], "s1").read_bytes() == before


def test_allocation_damage_is_left_unrepaired(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    with replicas(tmp_path, 2) as opened:
        scrub(peers(opened), 0)
        with open(layer_path(opened[0], "s1"), "r+b") as file:  # a block in the hole
            file.seek(4 * CHUNK_SIZE)
            file.write(b"stray")
        report = scrub(peers(opened), 0)
        [finding] = report.findings
        assert (finding.replica, finding.offset, finding.result) == \
            ("r0", 4 * CHUNK_SIZE, "unrepaired")
        assert "holds blocks its checksum says the layer does not" in finding.message
    expect_log(caplog, r"hold blocks its checksum says the layer does not: unrepaired")


def test_first_checksums_that_disagree_are_reported(tmp_path: Path) -> None:
    with replicas(tmp_path, 2) as opened:
        damage(opened[0], "s1", 2 * CHUNK_SIZE + 9)  # before any checksum was taken
        report = scrub(peers(opened), 0)
        assert report.findings == []
        assert report.problems == [
            f"snapshot s1 bytes {2 * CHUNK_SIZE}-{3 * CHUNK_SIZE - 1} differ between "
            "replicas whose checksums were taken after they did: rebuild the replicas you do "
            "not trust"]


def test_a_stop_request_ends_a_scrub(tmp_path: Path) -> None:
    with replicas(tmp_path, 2) as opened:
        stop = threading.Event()
        stop.set()
        with pytest.raises(Cancelled):
            scrub([LocalPeer(f"r{i}", r, stop) for i, r in enumerate(opened)], 1 << 20)

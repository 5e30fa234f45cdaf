"""Structure operations: snapshot, revert, remove, purge, expand, diff, checksums, limits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.chain import Replica
from appliance.chain import format as fmt
from appliance.chain.check import check
from appliance.chain.format import checksum_file_name, layer_file_name
from appliance.errors import (
    AlreadyExists,
    Corruption,
    FailedPrecondition,
    InvalidArgument,
    LimitExceeded,
    NotFound,
)

from .helpers import BS, head_bytes, pattern, snapshot_bytes, visible_state

MiB = 1 << 20


@pytest.fixture
def replica(replica_path: Path):
    with Replica.create(replica_path, 2 * MiB) as opened:
        yield opened


def names(replica: Replica) -> dict[str | None, str | None]:
    return {x.name: x.parent for x in replica.layers()}


def test_snapshot_freezes_content_and_records_attributes(replica: Replica) -> None:
    replica.write(pattern(1, 8 * BS), 0)
    info = replica.snapshot("s1", labels={"app": "db", "tier": "gold"})
    replica.write(pattern(2, BS), 0)
    assert snapshot_bytes(replica, "s1")[: 8 * BS] == pattern(1, 8 * BS)
    assert head_bytes(replica)[:BS] == pattern(2, BS)
    assert info.labels == {"app": "db", "tier": "gold"} and info.user_created
    assert info.created and info.created.endswith("Z") and info.allocated == 8 * BS
    assert names(replica) == {"s1": None, None: "s1"}
    with pytest.raises(AlreadyExists):
        replica.snapshot("s1")
    with pytest.raises(InvalidArgument, match="label"):
        replica.snapshot("s2", labels={"bad key": "x"})
    assert names(replica) == {"s1": None, None: "s1"}


def test_revert_discards_the_head_and_keeps_the_branch(replica: Replica) -> None:
    replica.write(pattern(1, BS), 0)
    replica.snapshot("a")
    replica.write(pattern(2, BS), 0)
    replica.snapshot("b")
    replica.write(pattern(3, BS), 0)
    replica.revert("a")
    assert head_bytes(replica)[:BS] == pattern(1, BS)
    assert snapshot_bytes(replica, "b")[:BS] == pattern(2, BS)
    assert names(replica) == {"a": None, "b": "a", None: "a"}
    replica.write(pattern(4, BS), BS)
    replica.close()
    with Replica.open(replica.path) as reopened:
        assert reopened.read(0, 2 * BS) == pattern(1, BS) + pattern(4, BS)
        with pytest.raises(NotFound):
            reopened.revert("nope")
        reopened.remove_snapshot("b")
        with pytest.raises(FailedPrecondition, match="removed"):
            reopened.revert("b")


def test_purge_deletes_a_removed_leaf(replica: Replica) -> None:
    replica.write(pattern(1, BS), 0)
    replica.snapshot("a")
    replica.snapshot("leaf")
    replica.revert("a")
    leaf_id = next(x.id for x in replica.meta.layers.values() if x.name == "leaf")
    replica.remove_snapshot("leaf")
    stats = replica.purge()
    assert stats["deleted"] == 1
    assert "leaf" not in names(replica)
    assert not (replica.path / layer_file_name(leaf_id)).exists()


@pytest.mark.parametrize("bigger", ["parent", "child"])
def test_purge_coalesces_into_the_cheaper_side(replica: Replica, bigger: str) -> None:
    big, small = pattern(1, 64 * BS), pattern(2, 4 * BS)
    replica.write(big if bigger == "parent" else small, 0)
    replica.snapshot("p")
    replica.write(small if bigger == "parent" else big, 32 * BS)
    replica.snapshot("c")
    replica.write(pattern(3, BS), 0)
    replica.remove_snapshot("p")
    before = visible_state(replica)
    stats = replica.purge()
    assert stats["coalesced"] == 1
    assert stats["copied_bytes"] == 4 * BS  # the smaller side is what gets copied
    assert names(replica) == {"c": None, None: "c"}
    assert visible_state(replica) == before
    replica.close()
    with Replica.open(replica.path) as reopened:
        assert visible_state(reopened) == before
    assert check(replica.path).ok


def test_purge_prunes_the_removed_parent_of_the_head(replica: Replica) -> None:
    replica.write(pattern(1, 16 * BS), 0)
    replica.snapshot("old")
    replica.write(pattern(2, 8 * BS), 0)  # the head overwrites half of "old"
    replica.remove_snapshot("old")
    before = head_bytes(replica)
    stats = replica.purge()
    assert stats["pruned"] == 1 and stats["punched_bytes"] == 8 * BS
    assert {x.name: x.allocated for x in replica.layers()}["old"] == 8 * BS
    assert head_bytes(replica) == before
    replica.write(pattern(3, 8 * BS), 8 * BS)  # now the head covers everything
    before = head_bytes(replica)
    replica.purge()
    assert names(replica) == {None: None}  # the emptied layer left the chain
    assert head_bytes(replica) == before


def test_purge_leaves_a_removed_layer_with_two_children(replica: Replica) -> None:
    replica.write(pattern(1, BS), 0)
    replica.snapshot("base")
    replica.write(pattern(2, BS), BS)
    replica.snapshot("left")
    replica.revert("base")
    replica.write(pattern(3, BS), 2 * BS)
    replica.remove_snapshot("base")
    before = visible_state(replica)
    replica.purge()
    assert "base" in names(replica)
    assert visible_state(replica) == before
    replica.remove_snapshot("left")  # now "base" has one child left: the head
    replica.purge()
    assert visible_state(replica)["head"] == before["head"]
    assert set(names(replica)) <= {"base", None}


def test_purge_of_a_long_removed_chain_keeps_every_kept_snapshot(replica: Replica) -> None:
    for n in range(8):
        replica.write(pattern(n, 3 * BS), n * 2 * BS)
        replica.snapshot(f"s{n}")
    replica.write(pattern(99, BS), 0)
    for n in (0, 1, 3, 4, 6):
        replica.remove_snapshot(f"s{n}")
    before = visible_state(replica)
    replica.purge()
    assert set(names(replica)) == {"s2", "s5", "s7", None}
    assert visible_state(replica) == before


def test_expand_grows_with_zeros_and_keeps_snapshot_sizes(replica: Replica) -> None:
    replica.write(pattern(1, 2 * BS), replica.size - 2 * BS)
    replica.snapshot("small")
    old = replica.size
    replica.expand(old + 3 * BS)
    assert replica.read(old, 3 * BS) == bytes(3 * BS)
    data = pattern(2, 2 * BS)
    replica.write(data, old - BS)  # across the old end
    assert replica.read(old - BS, 2 * BS) == data
    with replica.open_snapshot("small") as small:
        assert small.size == old
        assert small.read(old - 2 * BS, 2 * BS) == pattern(1, 2 * BS)
    replica.revert("small")
    assert replica.size == old + 3 * BS  # volumes never shrink
    assert replica.read(old - 2 * BS, 5 * BS) == pattern(1, 2 * BS) + bytes(3 * BS)
    with pytest.raises(InvalidArgument, match="shrink"):
        replica.expand(old)
    with pytest.raises(InvalidArgument, match="multiple"):
        replica.expand(old + 4 * BS + 1)
    replica.expand(replica.size)  # same size: nothing to do


def test_diff_between_snapshots(replica: Replica) -> None:
    replica.write(b"a" * BS, 0)
    replica.snapshot("one")
    replica.write(b"b" * 2 * BS, 4 * BS)
    replica.snapshot("two")
    replica.write(b"c" * BS, 10 * BS)
    replica.snapshot("three")
    assert replica.diff(None, "one") == [(0, BS)]
    assert replica.diff("one", "three") == [(4 * BS, 2 * BS), (10 * BS, BS)]
    assert replica.diff("two", "three") == [(10 * BS, BS)]
    replica.revert("one")
    replica.write(b"d" * BS, 20 * BS)
    replica.snapshot("other")
    # across branches: what either side changed since their common ancestor
    assert replica.diff("three", "other") == [(4 * BS, 2 * BS), (10 * BS, BS), (20 * BS, BS)]
    with pytest.raises(NotFound):
        replica.diff("nope", "one")


def test_checksums_find_the_damaged_range(replica: Replica) -> None:
    replica.write(pattern(1, 500 * BS), 0)
    replica.snapshot("s1")
    digest = replica.compute_checksum("s1")
    assert digest.startswith("sha256:") and replica.verify_checksum("s1") == []
    layer_id = next(x.id for x in replica.meta.layers.values() if x.name == "s1")
    path = replica.path
    replica.close()
    with open(path / layer_file_name(layer_id), "r+b") as layer:
        layer.seek(MiB + 12345)
        byte = layer.read(1)
        layer.seek(MiB + 12345)
        layer.write(bytes([byte[0] ^ 0x40]))
    report = check(path)
    assert not report.ok
    assert report.problems == [f"snapshot 's1': data differs from its checksum in bytes "
                               f"{MiB}-{2 * MiB - 1}"]
    with Replica.open(path) as reopened:
        assert reopened.verify_checksum("s1") == [(MiB, MiB)]


def test_checksum_depends_on_allocation_not_only_bytes(tmp_path: Path) -> None:
    with Replica.create(tmp_path / "a", MiB) as a, Replica.create(tmp_path / "b", MiB) as b:
        a.write(bytes(BS), 0)  # an allocated block of zeros hides lower layers...
        a.snapshot("s")
        b.snapshot("s")        # ...a hole does not
        assert a.compute_checksum("s") != b.compute_checksum("s")
        b.write(bytes(BS), 0)
        b.snapshot("t")
        assert b.compute_checksum("t") == a.compute_checksum("s")


def test_missing_checksum_file_is_reported(replica: Replica) -> None:
    replica.snapshot("s1")
    replica.compute_checksum("s1")
    layer_id = next(x.id for x in replica.meta.layers.values() if x.name == "s1")
    replica.close()
    (replica.path / checksum_file_name(layer_id)).unlink()
    report = check(replica.path)
    assert not report.ok and "missing" in report.problems[0]


def test_damaged_metadata_is_refused_and_reported(replica: Replica) -> None:
    replica.snapshot("s1")
    path = replica.path
    replica.close()
    meta = path / fmt.METADATA_FILE
    meta.write_bytes(meta.read_bytes().replace(b'"s1"', b'"s2"'))
    with pytest.raises(Corruption, match="digest mismatch"):
        Replica.open(path)
    report = check(path)
    assert not report.ok and "digest mismatch" in report.problems[0]


def test_missing_layer_file_is_refused(replica: Replica) -> None:
    replica.snapshot("s1")
    path = replica.path
    replica.close()
    (path / layer_file_name(1)).unlink()
    with pytest.raises(Corruption, match="missing"):
        Replica.open(path)
    assert "cannot be opened" in check(path).problems[0]


def test_many_snapshots_beyond_the_one_byte_index(replica: Replica) -> None:
    count = 300  # more than 255 layers: the index switches to two bytes per block
    for n in range(count):
        replica.write(n.to_bytes(2, "big") * (BS // 2), (n % 500) * BS)
        replica.snapshot(f"s{n}")
    assert replica.index_size.bytes_per_block == 2
    path = replica.path
    replica.close()
    with Replica.open(path) as reopened:
        for n in (0, 1, 254, 255, 256, count - 1):
            assert reopened.read(n * BS, 2) == n.to_bytes(2, "big")
            with reopened.open_snapshot(f"s{n}") as snap:
                assert snap.read(n * BS, 2) == n.to_bytes(2, "big")
        reopened.remove_snapshot("s0")
        reopened.purge()
        assert reopened.read(0, 2) == (0).to_bytes(2, "big")


def test_snapshot_limit(replica: Replica, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fmt, "MAX_SNAPSHOTS", 5)
    for n in range(5):
        replica.snapshot(f"s{n}")
    with pytest.raises(LimitExceeded, match="5 snapshots"):
        replica.snapshot("one-too-many")
    replica.remove_snapshot("s0")
    replica.purge()
    replica.snapshot("after-purge")


def test_orphans_of_interrupted_operations_are_removed_at_open(replica: Replica) -> None:
    path = replica.path
    replica.close()
    for name in (layer_file_name(77), "replica.json.tmp", checksum_file_name(1)):
        (path / name).write_bytes(b"junk")
    (path / "operator-notes.txt").write_text("not ours")
    with Replica.open(path) as reopened:
        assert sorted(reopened.cleaned_up) == sorted(
            [layer_file_name(77), "replica.json.tmp", checksum_file_name(1)])
    assert (path / "operator-notes.txt").exists()
    assert sorted(os.listdir(path)) == ["layer-000001.img", "operator-notes.txt",
                                        "replica.json", "state"]

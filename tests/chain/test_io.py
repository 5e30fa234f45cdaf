"""Data operations of the replica store: read, write, write-zeroes, unmap, flush, extents."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.chain import Replica
from appliance.chain.format import layer_file_name
from appliance.errors import (
    Busy,
    Corruption,
    InvalidArgument,
    NoSpace,
    ReadOnly,
    StorageIOError,
)

from .helpers import BS, pattern

MiB = 1 << 20


@pytest.fixture
def replica(replica_path: Path):
    with Replica.create(replica_path, 4 * MiB) as opened:
        yield opened


def test_new_replica_reads_zeros_and_allocates_nothing(replica: Replica) -> None:
    assert replica.read(0, replica.size) == bytes(replica.size)
    assert replica.extents() == [replica.extents()[0]]
    assert not replica.extents()[0].allocated
    assert replica.revision == 0 and replica.generation == 0
    assert os.stat(replica.path / layer_file_name(1)).st_blocks == 0


def test_aligned_and_unaligned_writes_read_back(replica: Replica) -> None:
    data = pattern(1, 3 * BS)
    replica.write(data, BS)
    assert replica.read(BS, 3 * BS) == data
    odd = pattern(2, 5000)
    replica.write(odd, 3 * BS - 7)  # crosses two block boundaries, unaligned both ends
    expected = bytearray(replica.read(0, 8 * BS))
    assert expected[3 * BS - 7: 3 * BS - 7 + 5000] == odd
    assert expected[BS: 3 * BS - 7] == data[: 2 * BS - 7]
    assert replica.read(0, BS) == bytes(BS)


def test_unaligned_write_over_snapshot_keeps_the_rest_of_the_block(replica: Replica) -> None:
    base = pattern(3, 2 * BS)
    replica.write(base, 0)
    replica.snapshot("s1")
    replica.write(b"X" * 10, 100)
    replica.write(b"Y" * 10, BS - 5)  # spans the end of block 0 and start of block 1
    expected = bytearray(base)
    expected[100:110] = b"X" * 10
    expected[BS - 5: BS + 5] = b"Y" * 10
    assert replica.read(0, 2 * BS) == bytes(expected)
    replica.close()
    with Replica.open(replica.path) as reopened:
        assert reopened.read(0, 2 * BS) == bytes(expected)


def test_write_at_the_end_and_out_of_range(replica: Replica) -> None:
    replica.write(b"end", replica.size - 3)
    assert replica.read(replica.size - 3, 3) == b"end"
    with pytest.raises(InvalidArgument, match="outside"):
        replica.write(b"x", replica.size)
    with pytest.raises(InvalidArgument):
        replica.read(replica.size - 1, 2)
    with pytest.raises(InvalidArgument):
        replica.read(-1, 1)
    assert replica.read(replica.size, 0) == b""


def test_write_zeroes_hides_snapshot_data_and_returns_space(replica: Replica) -> None:
    replica.write(pattern(4, 4 * BS), 0)
    replica.snapshot("s1")
    replica.write(pattern(5, 4 * BS), 8 * BS)  # only in the head
    replica.write_zeroes(BS + 100, 2 * BS)      # partial + whole over snapshot data
    replica.write_zeroes(8 * BS, 4 * BS)        # whole blocks only in the head
    assert replica.read(BS + 100, 2 * BS) == bytes(2 * BS)
    assert replica.read(8 * BS, 4 * BS) == bytes(4 * BS)
    with replica.open_snapshot("s1") as s1:
        assert s1.read(0, 4 * BS) == pattern(4, 4 * BS)
    # the head holds explicit zeros only where a snapshot has data
    head_extents = replica.layer_extents()
    assert all(x.offset + x.length <= 4 * BS for x in head_extents)


def test_unmap_falls_through_to_the_snapshot_and_keeps_partial_blocks(replica: Replica) -> None:
    replica.write(pattern(6, 4 * BS), 0)
    replica.snapshot("s1")
    replica.write(pattern(7, 4 * BS), 0)
    replica.unmap(100, 3 * BS)  # block 0 is partial: unchanged; blocks 1 and 2 discarded
    data = replica.read(0, 4 * BS)
    assert data[:BS] == pattern(7, 4 * BS)[:BS]
    assert data[BS: 3 * BS] == pattern(6, 4 * BS)[BS: 3 * BS]
    assert data[3 * BS:] == pattern(7, 4 * BS)[3 * BS:]
    replica.unmap(10, 20)  # less than a block: nothing happens
    assert replica.read(0, 4 * BS) == data


def test_unmap_punches_removed_layers_only_the_head_needs(replica: Replica) -> None:
    replica.write(pattern(8, 8 * BS), 0)
    replica.snapshot("keep")
    replica.write(pattern(9, 8 * BS), 0)
    replica.snapshot("gone")
    replica.write(pattern(10, 2 * BS), 0)
    replica.remove_snapshot("gone")
    before = {x.name: x.allocated for x in replica.layers()}
    replica.unmap(0, 8 * BS)
    after = {x.name: x.allocated for x in replica.layers()}
    assert after["gone"] == 0 < before["gone"]
    assert after["keep"] == before["keep"]
    assert replica.read(0, 8 * BS) == pattern(8, 8 * BS)


def test_unmap_leaves_a_removed_layer_with_two_children(replica: Replica) -> None:
    replica.write(pattern(11, 4 * BS), 0)
    replica.snapshot("shared")
    replica.snapshot("branch")
    replica.revert("shared")
    replica.remove_snapshot("shared")
    replica.unmap(0, 4 * BS)
    assert replica.read(0, 4 * BS) == pattern(11, 4 * BS)  # still visible through "shared"
    assert {x.name: x.allocated for x in replica.layers()}["shared"] == 4 * BS


def test_extents_merge_runs_and_report_holes(replica: Replica) -> None:
    replica.write(b"a" * BS, 0)
    replica.snapshot("s1")
    replica.write(b"b" * BS, BS)
    replica.write(b"c" * BS, 4 * BS)
    extents = [(x.offset, x.length, x.allocated) for x in replica.extents(0, 6 * BS)]
    assert extents == [(0, 2 * BS, True), (2 * BS, 2 * BS, False), (4 * BS, BS, True),
                       (5 * BS, BS, False)]
    assert [(x.offset, x.length) for x in replica.extents(snapshot="s1")
            if x.allocated] == [(0, BS)]


def test_reads_merge_runs_across_layers(replica: Replica) -> None:
    chunks = []
    for n in range(6):
        data = pattern(20 + n, BS)
        replica.write(data, n * BS)
        chunks.append(data)
        replica.snapshot(f"s{n}")
    replica.write(b"z" * 100, 2 * BS + 50)
    expected = bytearray(b"".join(chunks))
    expected[2 * BS + 50: 2 * BS + 150] = b"z" * 100
    assert replica.read(0, 6 * BS) == bytes(expected)
    assert replica.read(BS + 1, 3 * BS) == bytes(expected[BS + 1: 4 * BS + 1])


def test_revision_counts_changes_and_survives_reopen(replica: Replica) -> None:
    replica.write(b"x", 0)
    replica.write_zeroes(0, BS)
    replica.unmap(0, BS)
    assert replica.revision == 3
    replica.flush()
    replica.set_generation(7)
    path = replica.path
    replica.close()
    with Replica.open(path) as reopened:
        assert (reopened.revision, reopened.generation) == (3, 7)
        with pytest.raises(InvalidArgument, match="older"):
            reopened.set_generation(6)


def test_revision_survives_a_killed_process_without_flush(replica_path: Path) -> None:
    Replica.create(replica_path, MiB).close()
    script = ("import os, signal, sys\nfrom appliance.chain import Replica\n"
              "r = Replica.open(sys.argv[1])\n"
              "for i in range(5): r.write(b'x' * 4096, i * 4096)\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    result = subprocess.run([sys.executable, "-c", script, str(replica_path)], check=False)
    assert result.returncode == -9
    with Replica.open(replica_path) as reopened:
        assert reopened.revision == 5
        assert reopened.read(0, 5 * BS) == b"x" * 5 * BS


def test_one_writer_at_a_time(replica: Replica) -> None:
    with pytest.raises(Busy, match="in use"):
        Replica.open(replica.path)
    with pytest.raises(Busy):
        Replica.open(replica.path, writable=False)


def test_read_only_open_refuses_changes(replica: Replica) -> None:
    replica.write(b"data", 0)
    path = replica.path
    replica.close()
    with Replica.open(path, writable=False) as reader, \
            Replica.open(path, writable=False) as second:
        assert reader.read(0, 4) == second.read(0, 4) == b"data"
        with pytest.raises(ReadOnly):
            reader.write(b"x", 0)
        with pytest.raises(ReadOnly):
            reader.snapshot("s")


def test_full_disk_fails_the_whole_write_and_space_can_be_freed(small_ext4: Path) -> None:
    with Replica.create(small_ext4 / "r", 64 * MiB) as replica:
        base = pattern(1, 4 * MiB)
        replica.write(base, 0)
        replica.snapshot("s1")
        replica.write(pattern(2, MiB), 8 * MiB)
        before = replica.read(0, 32 * MiB)
        with pytest.raises(NoSpace, match="no space"):
            replica.write(pattern(3, 30 * MiB), MiB)  # more than the disk holds
        assert replica.read(0, 32 * MiB) == before  # nothing of the failed write landed
        replica.close()
        with Replica.open(small_ext4 / "r") as reopened:
            assert reopened.read(0, 32 * MiB) == before
            reopened.unmap(8 * MiB, MiB)  # free some space: writes work again
            reopened.write(b"ok" * 100, 8 * MiB)
            assert reopened.read(8 * MiB, 200) == b"ok" * 100


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting ramfs needs root")
def test_unsuitable_filesystem_is_refused_and_nothing_is_left(tmp_path: Path) -> None:
    mount = tmp_path / "ramfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mount)], check=True)
    try:
        with pytest.raises(InvalidArgument, match="cannot hold replicas"):
            Replica.create(mount / "r", MiB)
        assert not (mount / "r").exists()
        (mount / "empty").mkdir()
        with pytest.raises(InvalidArgument):
            Replica.create(mount / "empty", MiB)
        assert list((mount / "empty").iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_read_errors_are_translated(replica: Replica, monkeypatch: pytest.MonkeyPatch) -> None:
    replica.write(b"x" * BS, 0)

    def failing_preadv(fd: int, buffers: object, offset: int) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "preadv", failing_preadv)
    with pytest.raises(StorageIOError, match=r"read from replica .*Input/output error") as info:
        replica.read(0, BS)
    assert info.value.errno == errno.EIO


def test_volume_record_is_kept_whole_and_durable(replica: Replica) -> None:
    assert replica.volume_record() is None
    replica.set_volume_record({"epoch": 3, "members": ["a", "b"]})
    replica.set_volume_record({"epoch": 4, "members": ["a"]})
    path = replica.path
    replica.close()
    with Replica.open(path, writable=False) as reader:
        assert reader.volume_record() == {"epoch": 4, "members": ["a"]}
    with Replica.open(path) as writer:
        with pytest.raises(InvalidArgument, match="larger than"):
            writer.set_volume_record({"x": "y" * (70 << 10)})
        assert writer.volume_record() == {"epoch": 4, "members": ["a"]}
    (path / "volume.json").write_text("[1]")
    with Replica.open(path) as writer, pytest.raises(Corruption, match="not a JSON object"):
        writer.volume_record()


def test_zero_exact_repeats_another_replicas_decisions(tmp_path: Path) -> None:
    with Replica.create(tmp_path / "a", MiB) as a, Replica.create(tmp_path / "b", MiB) as b:
        a.write(pattern(1, 8 * BS), 0)  # a has data below its head, b does not
        a.snapshot("s")
        b.snapshot("s")
        for replica in (a, b):
            replica.write(pattern(2, 2 * BS), 10 * BS)
        explicit = a.write_zeroes(2 * BS, 10 * BS)  # blocks 2..11
        assert explicit == [(2, 8)]  # zeros where the snapshot has data, holes elsewhere
        b.zero_exact(2, 12, explicit)
        assert a.layer_extents() == b.layer_extents()
        assert a.read(2 * BS, 10 * BS) == b.read(2 * BS, 10 * BS) == bytes(10 * BS)
        with pytest.raises(InvalidArgument, match="not within"):
            b.zero_exact(2, 4, [(3, 9)])
        assert a.write_zeroes(100, 10) == [(0, 1)]  # a partial block is written

"""A punched hole in the attached device reads zeros: the kernel's "zero this range,
unmapping allowed" (``fallocate --punch-hole`` on the device; ext4 zeroing unwritten
extents; tgt's UNMAP) reaches the engine as an NBD trim through nbdfuse, and a trim alone
would leave a snapshot's data or a partial block's old bytes behind."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.harness import MiB, Node

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="attaching needs root")


def punch(device: str, offset: int, length: int) -> None:
    subprocess.run(["fallocate", "--punch-hole", "--offset", str(offset), "--length",
                    str(length), device], check=True, timeout=60)


def test_punched_ranges_read_zeros_over_snapshots_and_in_partial_blocks(node: Node) -> None:
    node.cli("volume", "create", "pz", "--size", "32M", "--replicas", "2")
    device = node.cli("volume", "attach", "pz").stdout.strip()
    fd = os.open(device, os.O_RDWR)
    try:
        os.pwrite(fd, b"\xab" * MiB, 4 * MiB)
        os.pwrite(fd, b"\xcd" * 8192, 8 * MiB)
        os.fsync(fd)
        node.cli("snapshot", "create", "pz", "below")  # the old data stays in a snapshot
        punch(device, 4 * MiB, MiB)  # whole blocks, held by the snapshot
        punch(device, 8 * MiB + 512, 1024)  # inside one block
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(fd, MiB, 4 * MiB) == bytes(MiB)
        partial = os.pread(fd, 8192, 8 * MiB)
        assert partial == b"\xcd" * 512 + bytes(1024) + b"\xcd" * (8192 - 1536)
    finally:
        os.close(fd)
    node.cli("volume", "detach", "pz")
    node.cli("volume", "attach", "pz")  # and on the replicas, not in a cache
    fd = os.open(device, os.O_RDONLY)
    try:
        assert os.pread(fd, MiB, 4 * MiB) == bytes(MiB)
    finally:
        os.close(fd)

"""Layer files: FIEMAP and SEEK_DATA/SEEK_HOLE must agree on which blocks a layer holds,
since the index is built from the first and everything else asks the second."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

from appliance.chain import layerfile
from appliance.chain.layerfile import block_run_arrays, block_runs, punch_hole

BS = 4096


def merged(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    result: list[tuple[int, int]] = []
    for first, last in sorted(pairs):
        if result and first <= result[-1][1]:
            result[-1] = (result[-1][0], max(last, result[-1][1]))
        else:
            result.append((first, last))
    return result


def make_layout(path: Path, seed: int, blocks: int, *, sync: bool) -> int:
    rng = random.Random(seed)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(fd, blocks * BS)
    for _ in range(300):
        first = rng.randrange(blocks)
        count = rng.choice([1, 1, 2, 3, 17, 200])
        data = bytes(count * BS) if rng.random() < 0.2 else os.urandom(count * BS)
        os.pwrite(fd, data[: (min(blocks, first + count) - first) * BS], first * BS)
        if rng.random() < 0.3:
            punch_hole(fd, rng.randrange(blocks) * BS, rng.choice([1, 5, 64]) * BS)
        if sync and rng.random() < 0.1:
            os.fsync(fd)
    return fd


@pytest.mark.parametrize("sync", [False, True], ids=["page-cache", "flushed"])
@pytest.mark.parametrize("seed", range(6))
def test_fiemap_and_seek_agree(tmp_path: Path, seed: int, sync: bool) -> None:
    blocks = 20000
    fd = make_layout(tmp_path / "layer.img", seed, blocks, sync=sync)
    try:
        by_seek = merged(list(block_runs(fd, 0, blocks * BS)))
        fiemap = layerfile.fiemap_block_runs(fd, blocks * BS)
        assert fiemap is not None, "this filesystem has FIEMAP: the fast path must be used"
        by_fiemap = merged(list(zip(fiemap[0].tolist(), fiemap[1].tolist(), strict=True)))
        assert by_fiemap == by_seek
        assert len(by_seek) > 50  # the layout really is fragmented
        # and clipped to a layer smaller than its file
        firsts, lasts = block_run_arrays(fd, 5000 * BS)
        assert merged(list(zip(firsts.tolist(), lasts.tolist(), strict=True))) == \
            merged(list(block_runs(fd, 0, 5000 * BS)))
    finally:
        os.close(fd)


def test_many_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layerfile, "FIEMAP_BATCH", 7)  # force many ioctl rounds
    fd = make_layout(tmp_path / "layer.img", 99, 5000, sync=True)
    try:
        firsts, lasts = block_run_arrays(fd, 5000 * BS)
        assert merged(list(zip(firsts.tolist(), lasts.tolist(), strict=True))) == \
            merged(list(block_runs(fd, 0, 5000 * BS)))
    finally:
        os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting tmpfs needs root")
def test_fallback_without_fiemap(tmp_path: Path) -> None:
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True)
    try:
        fd = make_layout(mount / "layer.img", 5, 4000, sync=False)
        try:
            assert layerfile.fiemap_block_runs(fd, 4000 * BS) is None  # tmpfs has no FIEMAP
            firsts, lasts = block_run_arrays(fd, 4000 * BS)
            assert merged(list(zip(firsts.tolist(), lasts.tolist(), strict=True))) == \
                merged(list(block_runs(fd, 0, 4000 * BS)))
        finally:
            os.close(fd)
    finally:
        subprocess.run(["umount", str(mount)], check=True)

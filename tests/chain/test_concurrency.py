"""Many threads on one replica: writes, reads, unmaps and zeroing racing with snapshots and
purges. Afterwards the index must agree with the files (a reopen reads the same bytes) and
every snapshot must be a consistent cut: per region, a version the writer really wrote, and
never older than in an earlier snapshot."""

from __future__ import annotations

import threading
from pathlib import Path

from appliance.chain import Replica

from .helpers import BS, head_bytes, snapshot_bytes

REGIONS = 8
REGION_BLOCKS = 16
ROUNDS = 60
SNAPSHOTS = 16


def region_data(region: int, version: int) -> bytes:
    stamp = region.to_bytes(2, "big") + version.to_bytes(4, "big")
    return (stamp * (REGION_BLOCKS * BS // len(stamp) + 1))[: REGION_BLOCKS * BS]


def decode_region(data: bytes) -> tuple[int, int]:
    """Return (region, version) of a region's bytes; every block must carry the same."""
    first = data[:6]
    assert data == (first * (len(data) // 6 + 1))[: len(data)], "torn or mixed region"
    return int.from_bytes(first[:2], "big"), int.from_bytes(first[2:], "big")


def test_writers_snapshots_and_purges_race(tmp_path: Path) -> None:
    size = REGIONS * REGION_BLOCKS * BS + 64 * BS
    replica = Replica.create(tmp_path / "r", size)
    for region in range(REGIONS):
        replica.write(region_data(region, 0), region * REGION_BLOCKS * BS)
    errors: list[BaseException] = []
    stop = threading.Event()
    final_version = [0] * REGIONS

    def guarded(function, *args):
        def run() -> None:
            try:
                function(*args)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)
                stop.set()
        return threading.Thread(target=run)

    def writer(region: int) -> None:
        version = 0
        while not stop.is_set() and (version < ROUNDS or not snapshots_done.is_set()):
            version += 1
            replica.write(region_data(region, version), region * REGION_BLOCKS * BS)
            got = replica.read(region * REGION_BLOCKS * BS, REGION_BLOCKS * BS)
            assert decode_region(got)[0] == region
        final_version[region] = version

    def scratch() -> None:  # unaligned writes, zeroing and unmaps in a separate area
        base = REGIONS * REGION_BLOCKS * BS
        n = 0
        while not stop.is_set():
            n += 1
            replica.write(bytes([n % 256]) * 5000, base + (n * 777) % (40 * BS))
            replica.write_zeroes(base + (n * 1313) % (40 * BS), 3 * BS + 11)
            replica.unmap(base + (n * 2909) % (40 * BS), 6 * BS)
            replica.flush()

    snapshots_done = threading.Event()
    taken: dict[str, bytes] = {}

    def snapshotter() -> None:
        n = 0
        while not stop.is_set():
            replica.snapshot(f"snap{n}")
            taken[f"snap{n}"] = snapshot_bytes(replica, f"snap{n}")
            if n + 1 == SNAPSHOTS:
                snapshots_done.set()
            if n >= 2 and n % 2 == 0:
                replica.remove_snapshot(f"snap{n - 1}")
                replica.purge()
            n += 1

    writers = [guarded(writer, region) for region in range(REGIONS)]
    others = [guarded(scratch), guarded(snapshotter)]
    for thread in writers + others:
        thread.start()
    for thread in writers:
        thread.join(timeout=120)
    stop.set()
    for thread in others:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in writers + others), "a thread hung"
    if errors:
        raise errors[0]

    kept = [x.name for x in replica.layers() if x.name and not x.removed]
    kept.sort(key=lambda name: int(name.removeprefix("snap")))
    assert len(kept) >= SNAPSHOTS // 2
    versions_before = [0] * REGIONS
    for name in kept:
        data = snapshot_bytes(replica, name)
        assert data == taken[name], f"{name} changed after it was taken"
        for region in range(REGIONS):
            start = region * REGION_BLOCKS * BS
            owner, version = decode_region(data[start: start + REGION_BLOCKS * BS])
            assert owner == region
            assert version >= versions_before[region], (name, region)
            versions_before[region] = version
    for region in range(REGIONS):
        start = region * REGION_BLOCKS * BS
        assert head_bytes(replica)[start: start + REGION_BLOCKS * BS] == \
            region_data(region, final_version[region])

    before = {name: snapshot_bytes(replica, name) for name in kept}
    head = head_bytes(replica)
    replica.close()
    with Replica.open(tmp_path / "r") as reopened:  # index rebuilt from the files
        assert head_bytes(reopened) == head
        for name, data in before.items():
            assert snapshot_bytes(reopened, name) == data

"""Backup benchmark: backup and restore throughput of a volume of incompressible and of
compressible data, beside a plain copy of the same bytes to the same target in the same
run (the ratio is the figure), and the bytes an incremental backup uploads after 1 % of
the blocks changed.

The reference copy puts the volume's bytes as objects of the backup block size through the
same target code (no hashing, compression or encryption) and reads them back; it is the
target's own speed, the limit a backup can approach.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from appliance.backup.image import SnapshotImage
from appliance.backup.jobs import BackupOptions, create_backup, restore_backup
from appliance.backup.keys import BackupKey
from appliance.backup.store import BackupStore
from appliance.backup.targets import opened
from appliance.chain import Replica
from appliance.chain.source import LocalSource
from appliance.units import format_size, parse_size

MiB = 1 << 20
BLOCK = 2 * MiB
WORKERS = 4


def fill(replica: Replica, size: int, compressible: bool) -> None:
    words = [os.urandom(4).hex().encode() for _ in range(4096)]
    rng = random.Random(7)
    for offset in range(0, size, 8 * MiB):
        if compressible:  # a quarter random, the rest text-like words
            text = b" ".join(rng.choice(words) for _ in range(6 * MiB // 9 + 1))[:6 * MiB]
            chunk = b"".join(os.urandom(16384) + text[i:i + 49152]
                             for i in range(0, 6 * MiB, 49152))
        else:
            chunk = os.urandom(8 * MiB)
        replica.write(chunk, offset)
    replica.flush()


def plain_copy(replica: Replica, size: int, target_url: str,
               workers: int) -> dict[str, float]:
    """The same bytes as objects of the same size, with the same parallelism, no work."""
    count = size // BLOCK
    lock = threading.Lock()
    with opened(target_url) as target:
        def put(index: int) -> None:
            buffer = bytearray(BLOCK)
            with lock:  # one reader, as in a backup
                replica.readinto(buffer, index * BLOCK)
            target.put(f"plain/{index:06d}", bytes(buffer))

        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(put, range(count)))
        put_seconds = time.monotonic() - started
        image = Path(target_url.removeprefix("file://")).parent / "plain.img"
        fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

        def get(index: int) -> None:
            os.pwrite(fd, target.get(f"plain/{index:06d}"), index * BLOCK)

        started = time.monotonic()
        try:
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                list(pool.map(get, range(count)))
            os.fsync(fd)
        finally:
            os.close(fd)
        get_seconds = time.monotonic() - started
    return {"put_mib_s": size / MiB / put_seconds, "get_mib_s": size / MiB / get_seconds}


def run(root: Path, size: int, compressible: bool, key: BackupKey | None,
        compression: str) -> dict[str, Any]:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / "target").mkdir()
    url = f"file://{root / 'target'}"
    source = Replica.create(root / "source", size)
    result: dict[str, Any] = {"size": size, "compressible": compressible,
                              "compression": compression, "encrypted": key is not None}
    try:
        fill(source, size, compressible)
        source.snapshot("s1")
        os.sync()
        result["plain"] = plain_copy(source, size, url, WORKERS)
        os.sync()
        with opened(url) as target:
            store = BackupStore(target, key)
            started = time.monotonic()
            manifest = create_backup(store, "bench", SnapshotImage(LocalSource(source), "s1"),
                                     BackupOptions(compression=compression, workers=WORKERS))
            seconds = time.monotonic() - started
            result["backup_mib_s"] = size / MiB / seconds
            result["stored_bytes"] = manifest.stats["uploaded_bytes"]
            os.sync()
            restored = Replica.create(root / "restored", 4096)
            try:
                started = time.monotonic()
                restore_backup(store, manifest, [restored], workers=WORKERS)
                result["restore_mib_s"] = size / MiB / (time.monotonic() - started)
            finally:
                restored.close()
            rng = random.Random(11)
            blocks = size // BLOCK
            changed = rng.sample(range(blocks), max(1, blocks // 100))
            for index in changed:
                source.write(os.urandom(64 << 10), index * BLOCK + 4096)
            source.snapshot("s2")
            started = time.monotonic()
            incremental = create_backup(store, "bench",
                                        SnapshotImage(LocalSource(source), "s2"),
                                        BackupOptions(compression=compression))
            result["incremental"] = {
                "changed_blocks": len(changed), "seconds": time.monotonic() - started,
                "uploaded_bytes": incremental.stats["uploaded_bytes"],
                "read_bytes": incremental.stats["read_bytes"]}
    finally:
        source.close()
        shutil.rmtree(root, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="2G")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/appliance-backup-bench"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    size = parse_size("64M" if args.quick else args.size)
    key = BackupKey.from_bytes(os.urandom(32))
    runs = [run(args.dir, size, False, None, "lz4"), run(args.dir, size, True, None, "lz4"),
            run(args.dir, size, True, key, "lz4")]
    print(f"backup benchmarks, {format_size(size)} volume, file:// target, 2 MiB blocks, "
          "4 workers")
    for result in runs:
        kind = ("compressible" if result["compressible"] else "incompressible") + \
            (", encrypted" if result["encrypted"] else "")
        plain = result["plain"]
        print(f"{kind:28} backup {result['backup_mib_s']:6.0f} MiB/s "
              f"({result['backup_mib_s'] / plain['put_mib_s']:.0%} of the plain copy's "
              f"{plain['put_mib_s']:.0f}), restore {result['restore_mib_s']:6.0f} MiB/s "
              f"({result['restore_mib_s'] / plain['get_mib_s']:.0%} of "
              f"{plain['get_mib_s']:.0f}), stored {format_size(result['stored_bytes'])}")
        inc = result["incremental"]
        print(f"{'':28} incremental after {inc['changed_blocks']} of {size // BLOCK} blocks "
              f"changed: uploaded {format_size(inc['uploaded_bytes'])}, read "
              f"{format_size(inc['read_bytes'])}, {inc['seconds']:.2f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

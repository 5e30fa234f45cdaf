"""Replica store micro-benchmark, beside raw os.preadv/os.pwrite on a file of the same size.

    .venv/bin/python -m bench.chain_bench [--size 1G] [--seconds 3] [--runs 3]

Workloads: 4 KiB random reads and writes, 1 MiB sequential reads and writes, on

* ``raw``: a plain file, fully written, read and written with os.preadv/os.pwrite;
* ``store-0``: a replica whose head holds all the data (no snapshot below);
* ``store-10``: a replica whose data is spread over 10 snapshot layers in 1 MiB stripes
  (stripe *s* in layer *s* % 10) under an empty head, so reads hit every layer;
* ``store-10f``: the same in 64 KiB stripes, a worst case: every 1 MiB read needs 16 reads
  from 10 different files;
* ``files-10``: a reference for reads only: ``store-10``'s own layer files read directly with
  os.preadv from the file that holds each stripe, no store code. It separates the store's
  cost from the kernel's (page cache of sparse, strided-written files).

All three live on the same filesystem and are read and written through the page cache
(buffered I/O, no fsync), so the ratios show the store's own cost. Writes to ``store-10``
allocate head blocks (copy-on-write after a snapshot) where ``raw`` overwrites in place.
Each workload alternates between the targets, with a ``sync`` before every measurement so
that writeback of one does not slow the next; the median of ``--runs`` runs is reported.

Then: the time to open a 100 GiB replica with 10 layers (``--open-size``), with few and with
many 4 KiB extents per layer, and the memory the index takes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from appliance.chain import Replica
from appliance.units import format_size, parse_size

BS = 4096
MiB = 1 << 20


class Target:
    def __init__(self, name: str, read: Callable[[memoryview, int], object],
                 write: Callable[[memoryview, int], object] | None) -> None:
        self.name, self.read, self.write = name, read, write


def make_raw(path: Path, size: int, chunk: bytes) -> Target:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    for offset in range(0, size, len(chunk)):
        os.pwrite(fd, chunk, offset)
    os.fsync(fd)
    return Target("raw", lambda b, o: os.preadv(fd, [b], o), lambda b, o: os.pwrite(fd, b, o))


def make_store(path: Path, size: int, chunk: bytes, layers: int,
               stripe: int) -> tuple[Replica, str]:
    replica = Replica.create(path, size)
    if layers == 0:
        for offset in range(0, size, len(chunk)):
            replica.write(chunk, offset)
    else:
        view = memoryview(chunk)
        for layer in range(layers):
            for offset in range(layer * stripe, size, layers * stripe):
                start = offset % len(chunk)
                replica.write(view[start: start + stripe], offset)
            replica.snapshot(f"layer{layer}")
    replica.flush()
    return replica, path.name


def direct_reads(replica: Replica, stripe: int) -> Target:
    """Reads straight from the layer file holding each stripe of a striped replica."""
    chain = replica.layers()
    fds = [os.open(replica.path / f"layer-{n:06d}.img", os.O_RDONLY)
           for n in range(1, len(chain))]

    def read(buf: memoryview, offset: int) -> int:
        return os.preadv(fds[(offset // stripe) % len(fds)], [buf], offset)

    return Target("files-10", read, None)


def run_random(target: Target, size: int, seconds: float, write: bool) -> float:
    buf = memoryview(bytearray(os.urandom(BS)))
    rng = random.Random(42)
    blocks = size // BS
    offsets = [rng.randrange(blocks) * BS for _ in range(4096)]
    operation = target.write if write else target.read
    assert operation is not None
    done = 0
    deadline = time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < deadline:
        for offset in offsets:
            operation(buf, offset)
        done += len(offsets)
    return done / (time.perf_counter() - start)


def run_sequential(target: Target, size: int, seconds: float, write: bool) -> float:
    buf = memoryview(bytearray(os.urandom(MiB)))
    operation = target.write if write else target.read
    assert operation is not None
    done = 0
    deadline = time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < deadline:
        for offset in range(0, size, MiB):
            operation(buf, offset)
            done += MiB
            if time.perf_counter() >= deadline:
                break
    return done / (time.perf_counter() - start) / MiB


#: Reads run first: the writes change the layouts (random writes scatter blocks over the
#: heads of the layered replicas, which would then no longer be "10 layers under the head").
WORKLOADS: dict[str, tuple[Callable[[Target, int, float, bool], float], bool, str]] = {
    "4K random read": (run_random, False, "IOPS"),
    "1M sequential read": (run_sequential, False, "MiB/s"),
    "4K random write": (run_random, True, "IOPS"),
    "1M sequential write": (run_sequential, True, "MiB/s"),
}


def bench_open(directory: Path, size: int, layers: int, extents: int,
               runs: int) -> dict[str, float]:
    """Open time of a sparse replica of *size* with *layers* layers of *extents* scattered
    4 KiB extents each (open time grows with extents, not bytes); and its index memory."""
    path = directory / f"open-{extents}"
    replica = Replica.create(path, size)
    rng = random.Random(7)
    data = os.urandom(BS)
    for layer in range(layers):
        for _ in range(extents):
            replica.write(data, rng.randrange(size // BS) * BS)
        replica.snapshot(f"layer{layer}")
    replica.close()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        opened = Replica.open(path)
        times.append(time.perf_counter() - start)
        index = opened.index_size
        opened.close()
    shutil.rmtree(path)
    return {"seconds": statistics.median(times), "index_bytes_per_block": index.bytes_per_block,
            "index_bytes": index.total_bytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1G", help="file and volume size (default 1G)")
    parser.add_argument("--seconds", type=float, default=3.0, help="per workload and run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default="/var/tmp/appliance-bench", type=Path)
    parser.add_argument("--open-size", default="100G")
    parser.add_argument("--open-extents", default="1000,50000",
                        help="extents per layer for the open benchmark")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.seconds, args.runs = "16M", 0.1, 1
        args.open_size, args.open_extents = "1G", "50"
    size = parse_size(args.size)
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    chunk = os.urandom(MiB)
    targets = [make_raw(args.dir / "raw.img", size, chunk)]
    replicas = []
    for layers, stripe, name in ((0, 0, "store-0"), (10, MiB, "store-10"),
                                 (10, 64 << 10, "store-10f")):
        replica, _ = make_store(args.dir / name, size, chunk, layers, stripe)
        targets.append(Target(name, replica.readinto, replica.write))
        replicas.append(replica)
        if name == "store-10":
            targets.append(direct_reads(replica, MiB))

    results: dict[str, dict[str, float]] = {}
    for workload, (function, write, _unit) in WORKLOADS.items():
        samples: dict[str, list[float]] = {t.name: [] for t in targets}
        for _ in range(args.runs):
            for target in targets:
                if write and target.write is None:
                    continue
                os.sync()
                samples[target.name].append(function(target, size, args.seconds, write))
        results[workload] = {name: statistics.median(values)
                             for name, values in samples.items() if values}
    for replica in replicas:
        replica.close()

    print(f"replica store vs raw file, {format_size(size)}, page cache, median of {args.runs} "
          f"x {args.seconds}s, Python {sys.version.split()[0]}")
    names = [t.name for t in targets]
    stores = [n for n in names if n.startswith("store")]
    print(f"{'workload':20}" + "".join(f"{n:>10}" for n in names) +
          "".join(f"{n.replace('store', '/raw'):>9}" for n in stores) + f"{'10/files':>9}")
    for workload, (_function, _write, unit) in WORKLOADS.items():
        row = results[workload]
        versus_files = f"{row['store-10'] / row['files-10']:>9.0%}" if "files-10" in row \
            else f"{'-':>9}"
        print(f"{workload:20}" + "".join(f"{row[n]:>10,.0f}" if n in row else f"{'-':>10}"
                                         for n in names) +
              "".join(f"{row[n] / row['raw']:>9.0%}" for n in stores) + versus_files +
              f"  {unit}")

    opens = {}
    for extents in (int(x) for x in args.open_extents.split(",")):
        opens[extents] = bench_open(args.dir, parse_size(args.open_size), 10, extents,
                                    max(args.runs, 3))
        info = opens[extents]
        print(f"open {args.open_size} replica, 10 layers x {extents} extents: "
              f"{info['seconds'] * 1000:.0f} ms; index {info['index_bytes_per_block']:.0f} "
              f"byte(s) per 4 KiB block = {format_size(int(info['index_bytes']))}, of which "
              "only pages covering written data are resident")
    shutil.rmtree(args.dir, ignore_errors=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"size": size, "seconds": args.seconds,
                                         "runs": args.runs, "io": results,
                                         "open": opens}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

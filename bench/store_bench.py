"""State store benchmark: EtcdStore (etcd's v3 JSON gateway over httpx, on a real etcd
started here) beside SQLiteStore, in the same run and on the same filesystem.

Measured on each store, in rounds that alternate between the two: ``get`` of a volume
record, compare-and-swap ``put``, ``list`` of 100 volume records, watch delivery (from the
start of a ``put`` to its event in the watcher's hands), and what ``GET /v1/volumes`` does
with 100 volumes of 2 replicas (``NodeService.list_volumes``: the volumes and the replicas
listed, decoded and joined). Reported as medians and p99 per store and the ratio
etcd/SQLite of the medians (with its range over the rounds).

The daemon's HTTP figure on etcd beside SQLite (``GET /v1/volumes`` through a cluster
node) is measured by ``cluster_bench.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import trio

from appliance.control.etcd_store import EtcdStore
from appliance.control.objects import ReplicaRecord, Volume
from appliance.control.sqlite_store import SQLiteStore
from appliance.control.store import StateStore
from appliance.node.config import NodeConfig
from appliance.node.controller import Controller
from appliance.node.service import NodeService
from appliance.node.supervisor import Supervisor
from tests.etcd import running_etcd

Op = Callable[[], Awaitable[float]]  # one timed operation: its seconds
OPS = ("get", "cas put", "list", "watch", "volume list")


def volume_record(index: int) -> Volume:
    """A volume as the store keeps one in service (tags, labels, status filled in)."""
    return Volume(f"vol-{index:04d}", 20 << 30, 2, "2026-01-01T00:00:00Z", disk_tags=["ssd"],
                  labels={"app": f"db-{index}", "team": "storage", "tier": "gold"},
                  state="detached", robustness="healthy", branch="b-2f4c9a1e",
                  message="replica vol-0000-3 rebuilt from vol-0000-1 in 41 s")


def replica_records(volume: Volume) -> list[ReplicaRecord]:
    return [ReplicaRecord(f"{volume.name}-{n}", volume.name, f"disk{n}",
                          f"/var/lib/appliance/disks/disk{n}/{volume.name}-{n}",
                          10100 + n, replica_id=f"{n:08x}-1c2d-4e5f-8a9b-0c1d2e3f4a5b")
            for n in range(volume.replicas)]


async def fill(store: StateStore, volumes: int) -> None:
    for index in range(volumes):
        volume = volume_record(index)
        await store.put(volume.key, volume.to_dict())
        for replica in replica_records(volume):
            await store.put(replica.key, replica.to_dict())


def timed(call: Callable[[], Awaitable[object]]) -> Op:
    async def op() -> float:
        started = time.perf_counter()
        await call()
        return time.perf_counter() - started
    return op


async def cas_put_op(store: StateStore) -> Op:
    key, value = "/bench/cas", volume_record(0).to_dict()
    revision = await store.put(key, value)

    async def op() -> float:
        nonlocal revision
        started = time.perf_counter()
        revision = await store.put(key, value, expect=revision)
        return time.perf_counter() - started
    return op


@asynccontextmanager
async def watch_op(store: StateStore) -> AsyncIterator[Op]:
    """Timed from the start of a put until the watch of its prefix has its event."""
    value = volume_record(1).to_dict()
    _, after = await store.list("/watched/")
    async with store.watch("/watched/", after) as events:
        iterator = aiter(events)

        async def op() -> float:
            started = time.perf_counter()
            revision = await store.put("/watched/v", value)
            while (await anext(iterator)).revision < revision:
                pass
            return time.perf_counter() - started
        yield op


def service_on(store: StateStore, root: Path) -> NodeService:
    """The node service over *store*, as the daemon builds it (its controller not run)."""
    root.mkdir(parents=True, exist_ok=True)
    config = NodeConfig(root, ("127.0.0.1", 0), "bench")
    return NodeService(store, Controller(store, Supervisor(config), config))


@asynccontextmanager
async def store_ops(store: StateStore, volumes: int, root: Path) -> AsyncIterator[dict[str, Op]]:
    """The timed operations of OPS on *store*, filled with *volumes* volumes."""
    await fill(store, volumes)
    keys = [Volume.key_of(volume_record(i).name) for i in range(volumes)]
    service = service_on(store, root)
    async with watch_op(store) as watch:
        yield {"get": timed(lambda: store.get(random.choice(keys))),
               "cas put": await cas_put_op(store),
               "list": timed(lambda: store.list(Volume.PREFIX)),
               "watch": watch,
               "volume list": timed(service.list_volumes)}


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_ms": 1000 * statistics.median(ordered),
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
            "count": len(ordered)}


async def measure(root: Path, etcd_url: str, volumes: int, rounds: int,
                  count: int) -> dict[str, Any]:
    """Rounds alternating between the stores (which goes first alternates too)."""
    samples: dict[str, dict[str, list[list[float]]]] = {
        name: {op: [] for op in OPS} for name in ("sqlite", "etcd")}
    async with AsyncExitStack() as stack:
        sqlite = await SQLiteStore.open(root / "state.db")
        stack.push_async_callback(sqlite.aclose)
        etcd = await EtcdStore.open(etcd_url)
        stack.push_async_callback(etcd.aclose)
        ops = {"sqlite": await stack.enter_async_context(store_ops(sqlite, volumes,
                                                                   root / "node-sqlite")),
               "etcd": await stack.enter_async_context(store_ops(etcd, volumes,
                                                                 root / "node-etcd"))}
        for round_ in range(rounds):
            order = ("sqlite", "etcd") if round_ % 2 == 0 else ("etcd", "sqlite")
            for op in OPS:
                for name in order:
                    for _ in range(3):  # warm-up: connections, caches
                        await ops[name][op]()
                    samples[name][op].append([await ops[name][op]() for _ in range(count)])
    return {"samples": samples}


def ratios(samples: dict[str, dict[str, list[list[float]]]]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = {}
    for op in OPS:
        per_store = {name: summary([s for batch in samples[name][op] for s in batch])
                     for name in samples}
        per_round = [statistics.median(e) / statistics.median(s) for e, s in
                     zip(samples["etcd"][op], samples["sqlite"][op], strict=True)]
        result[op] = {**per_store, "ratio": per_store["etcd"]["p50_ms"] /
                      per_store["sqlite"]["p50_ms"],
                      "ratio_rounds": [min(per_round), max(per_round)]}
    return result


def etcd_version() -> str:
    output = subprocess.run(["etcd", "--version"], capture_output=True, text=True,
                            check=False).stdout
    return output.split("\n")[0].removeprefix("etcd Version: ") or "unknown"


LABELS = {"get": "get (one volume record)", "cas put": "put, compare-and-swap",
          "list": "list of {n} volume records", "watch": "watch delivery (put to event)",
          "volume list": "volume list handler, {n} volumes + {r} replicas"}


def report(result: dict[str, Any]) -> None:
    n, rounds = result["volumes"], result["rounds"]
    print(f"state store benchmarks: etcd {result['etcd']} via its JSON gateway (httpx "
          f"{httpx.__version__}) beside SQLite {result['sqlite']} (WAL, synchronous=FULL); "
          f"{rounds} rounds of {result['count']}, {os.cpu_count()} CPUs, load average "
          f"{result['load']:.2f} before")
    print(f"{'operation':<50} {'SQLite p50/p99 ms':>18} {'etcd p50/p99 ms':>18} "
          f"{'etcd/SQLite':>12}  rounds")
    for op in OPS:
        info = result["figures"][op]
        sqlite, etcd = info["sqlite"], info["etcd"]
        low, high = info["ratio_rounds"]
        label = LABELS[op].format(n=n, r=2 * n)
        print(f"{label:<50} {sqlite['p50_ms']:>8.3f}/{sqlite['p99_ms']:<9.3f} "
              f"{etcd['p50_ms']:>8.3f}/{etcd['p99_ms']:<9.3f} {info['ratio']:>11.2f}x  "
              f"{low:.2f}-{high:.2f}x")
    print("GET /v1/volumes on etcd through the daemon: awaits the --cluster flag "
          "(node_bench.py measures it on SQLite)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--volumes", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=200, help="operations per round")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/appliance-store-bench"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.volumes, args.rounds, args.count = 5, 2, 5
    if shutil.which("etcd") is None:
        raise SystemExit("etcd is not installed (./setup.sh installs etcd-server)")
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    load = os.getloadavg()[0]
    try:
        with running_etcd(args.dir) as url:
            measured = trio.run(measure, args.dir, url, args.volumes, args.rounds, args.count)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    result = {"volumes": args.volumes, "rounds": args.rounds, "count": args.count,
              "etcd": etcd_version(), "sqlite": sqlite3.sqlite_version, "load": load,
              "figures": ratios(measured["samples"])}
    report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**result, **measured}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cluster benchmark: four nodes, each a network namespace with its own address and daemon
(tests/netns.py), beside three etcd members in the first three; and a single node on SQLite
in the root namespace as the reference, in the same run.

Measured:

* API latency of ``GET /v1/volumes`` with N volumes of 2 replicas, through a cluster node
  (etcd) beside the single node (SQLite); ``/healthz`` of each as the floor;
* the fio set (BENCHMARKS.md) on a 3-replica volume whose replicas are on three namespace
  nodes beside the same volume on the single node (three disks), as ratios;
* node death: a volume attached on node 1 with replicas on nodes 1-3 while a writer writes
  4 KiB blocks (O_DIRECT) in a loop; node 3's namespace is cut off (as a machine that lost
  power answers nothing) and every process in it is killed: how long
  writes stall until the volume is degraded but writable, and how long until it is whole
  again (a replacement rebuilt on node 4, after ``replica_replenishment_wait``), with that
  rebuild's MiB/s beside a plain copy of the same bytes between the same two namespaces;
* forced attach across a partition: a 3-replica volume attached on node 1, which is cut off
  (both ways); the time from ``volume attach --node n2 --force`` to the first write
  completed on node 2's device (the new engine's probe of node 1's replica times out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.fio_bench import WORKLOADS, Workload, measure, prefill
from bench.node_bench import latency
from tests.cluster.harness import Cluster, ClusterNode
from tests.etcd import Etcd
from tests.harness import Node, wait_for
from tests.netns import Host, hosts

MiB = 1 << 20


def client(node: Node) -> httpx.Client:
    return httpx.Client(base_url=node.url, timeout=60, headers={
        "Authorization": f"Bearer {node.token_file.read_text().strip()}"})


def create_volumes(node: Node, count: int) -> None:
    with client(node) as http:
        for index in range(count):
            http.post("/v1/volumes", json={"name": f"l{index:03d}", "size": "1G",
                                           "replicas": 2}).raise_for_status()
        wait_for(lambda: not any(v["state"] == "creating"
                                 for v in http.get("/v1/volumes").json()), 600,
                 "the volumes to be created")


def api_latency(cluster_node: Node, single: Node, repeat: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for label, node in (("etcd", cluster_node), ("sqlite", single)):
        with client(node) as http:
            result[label] = {
                "healthz": latency(lambda: http.get("/healthz").raise_for_status(), repeat),
                "volume_list": latency(lambda: http.get("/v1/volumes").raise_for_status(),
                                       repeat)}
    result["ratio_etcd_sqlite"] = (result["etcd"]["volume_list"]["p50_ms"] /
                                   result["sqlite"]["volume_list"]["p50_ms"])
    return result


def nbd_uri(node: Node, volume: str) -> str:
    return f"nbd+unix:///?socket={node.data / 'run' / volume / 'nbd.sock'}"


def fio_set(uri: str, size: int, runtime: int, workloads: list[Workload]) -> dict[str, float]:
    prefill(uri, size)
    return {w.name: measure(uri, w, size, runtime) for w in workloads}


class Writer:
    """4 KiB O_DIRECT writes in a loop on a device; every completion's time."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.done: list[tuple[float, float]] = []  # (started, completed)
        self.errors = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import mmap  # noqa: PLC0415

        fd = os.open(self.device, os.O_WRONLY | os.O_DIRECT)
        block = mmap.mmap(-1, 4096)
        block.write(os.urandom(4096))
        offset = 0
        try:
            while not self.stopping.is_set():
                started = time.monotonic()
                try:
                    os.pwritev(fd, [block], offset)
                except OSError:
                    self.errors += 1
                    time.sleep(0.1)
                    continue
                self.done.append((started, time.monotonic()))
                offset = (offset + 4096) % (16 * MiB)
        finally:
            os.close(fd)

    def __enter__(self) -> Writer:
        self.thread.start()
        wait_for(lambda: len(self.done) >= 10, 60, "the writer to write")
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        self.thread.join(timeout=120)

    def stall_after(self, moment: float) -> float:
        """Seconds from *moment* until a write issued after it completes."""
        wait_for(lambda: any(s >= moment for s, _ in self.done), 300,
                 "a write after the fault to complete")
        return next(c for s, c in self.done if s >= moment) - moment


def whole(node: ClusterNode, volume: str, replicas: int) -> bool:
    shown = node.json("volume", "show", volume)
    return bool(shown["robustness"] == "healthy" and len(shown["replica_list"]) == replicas
                and all(r["mode"] == "RW" for r in shown["replica_list"]))


def plain_copy(source: Host, target: Host, size: int, root: Path) -> float:
    """MiB/s of *size* bytes sent from *source*'s namespace to a file in *target*'s
    (written, fsynced), over the same veths a rebuild uses."""
    data, output = root / "copy.src", root / "copy.dst"
    with open(data, "wb") as handle:
        handle.write(os.urandom(size))
    receiver = subprocess.Popen(
        [*target.launcher, sys.executable, "-c", RECEIVE, target.address, str(output)],
        stdout=subprocess.PIPE, text=True)
    wait_for(output.exists, 30, "the receiver to listen")
    started = time.perf_counter()
    subprocess.run([*source.launcher, sys.executable, "-c", SEND, target.address, str(data)],
                   check=True)
    receiver.communicate(timeout=300)
    seconds = time.perf_counter() - started
    data.unlink()
    output.unlink()
    return size / MiB / seconds


RECEIVE = """
import os, socket, sys
listener = socket.create_server((sys.argv[1], 47001))
out = open(sys.argv[2], "wb")
conn, _ = listener.accept()
while chunk := conn.recv(1 << 20):
    out.write(chunk)
out.flush(); os.fsync(out.fileno())
"""
SEND = """
import socket, sys
with socket.create_connection((sys.argv[1], 47001)) as conn, open(sys.argv[2], "rb") as f:
    conn.sendfile(f)
"""


def node_death(cluster: Cluster, namespaces: list[Host], size: int,
               root: Path) -> dict[str, Any]:
    n1 = cluster.nodes[0]
    n1.cli("node", "cordon", "n4")
    n1.cli("volume", "create", "k", "--size", f"{size // MiB}M", "--replicas", "3")
    n1.cli("node", "uncordon", "n4")
    device = n1.cli("volume", "attach", "k", "--node", "n1").stdout.strip()
    prefill(nbd_uri(n1, "k"), size)
    with Writer(device) as writer:
        # a dead machine answers nothing: cut off first, then every process killed
        namespaces[2].partition(both_ways=True)
        killed = time.monotonic()
        namespaces[2].kill_everything()
        stall = writer.stall_after(killed)
        wait_for(lambda: whole(n1, "k", 3), 900, "the volume whole again")
        rebuilt = time.monotonic() - killed
    replica = next(r for r in n1.json("volume", "show", "k")["replica_list"]
                   if r["node"] == "n4")
    rebuild = replica.get("rebuild") or {}
    copied, seconds = rebuild.get("copied_bytes", 0), rebuild.get("seconds", 0)
    source = str(rebuild.get("source", "")).rsplit(":", 1)[0]
    sender = next((h for h in namespaces if h.address == source), namespaces[0])
    reference = plain_copy(sender, namespaces[3], max(copied, MiB), root)
    n1.cli("volume", "detach", "k")
    return {"write_stall_seconds": stall, "whole_again_seconds": rebuilt,
            "writer_errors": writer.errors,
            "rebuild_copied_bytes": copied, "rebuild_seconds": seconds,
            "rebuild_mibs": copied / MiB / seconds if seconds else 0.0,
            "plain_copy_mibs": reference,
            "ratio_rebuild_copy": (copied / MiB / seconds / reference) if seconds else 0.0}


def forced_attach(cluster: Cluster, namespaces: list[Host]) -> dict[str, Any]:
    n2 = cluster.nodes[1]
    n2.cli("volume", "create", "f", "--size", "64M", "--replicas", "3")
    n2.cli("volume", "attach", "f", "--node", "n1")
    namespaces[0].partition(both_ways=True)
    try:
        wait_for(lambda: n2.json("node", "show", "n1")["state"] == "down", 120, "n1 down")
        started = time.monotonic()
        device = n2.cli("volume", "attach", "f", "--node", "n2", "--force").stdout.strip()
        attached = time.monotonic() - started
        fd = os.open(device, os.O_WRONLY)
        try:
            os.pwrite(fd, os.urandom(4096), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        first_write = time.monotonic() - started
    finally:
        namespaces[0].heal()
    return {"attach_seconds": attached, "first_write_seconds": first_write}


def run(root: Path, quick: bool) -> dict[str, Any]:
    volumes = 5 if quick else 100
    size = 64 * MiB if quick else 512 * MiB
    runtime = 2 if quick else 20
    workloads = WORKLOADS[:2] if quick else WORKLOADS
    result: dict[str, Any] = {"volumes": volumes, "size": size, "runtime": runtime}
    single = Node(root / "single")
    single.root.mkdir()
    single.start()
    try:
        with hosts(4) as namespaces:
            (root / "etcd").mkdir()
            etcd = Etcd(root / "etcd", 3, hosts=namespaces[:3])
            cluster = Cluster(root, 4, etcd, netns=namespaces, node_lease_ttl=10)
            try:
                etcd.start()
                cluster.start()
                n1 = cluster.nodes[0]
                n1.change_settings(replica_replenishment_wait=10)
                result["replica_replenishment_wait"] = 10
                result["node_lease_ttl"] = 10

                create_volumes(n1, volumes)
                for disk in ("d2", "d3"):
                    (single.root / disk).mkdir()
                    single.cli("disk", "add", single.root / disk)
                create_volumes(single, volumes)
                result["api"] = api_latency(n1, single, 20 if quick else 100)

                n1.cli("volume", "create", "fio", "--size", f"{size // MiB}M",
                       "--replicas", "3")
                n1.cli("volume", "attach", "fio", "--node", "n1")
                spread = fio_set(nbd_uri(n1, "fio"), size, runtime, workloads)
                n1.cli("volume", "detach", "fio")
                single.cli("volume", "create", "fio", "--size", f"{size // MiB}M",
                           "--replicas", "3")
                single.cli("volume", "attach", "fio")
                alone = fio_set(nbd_uri(single, "fio"), size, runtime, workloads)
                single.cli("volume", "detach", "fio")
                result["fio"] = {name: {"three_nodes": spread[name], "one_node": alone[name],
                                        "ratio": spread[name] / alone[name]}
                                 for name in spread}

                # first the partition (it cuts node 1's etcd member off), then node 3's
                # death (its member dies with it): each leaves etcd a quorum
                result["forced_attach"] = forced_attach(cluster, namespaces)
                wait_for(lambda: n1.json("node", "show", "n1")["state"] == "ready", 120,
                         "n1 back after the partition")
                result["node_death"] = node_death(cluster, namespaces, size, root)
            finally:
                for host in namespaces:
                    host.heal()
                cluster.cleanup()
                etcd.stop()
                for host in namespaces:
                    host.kill_everything()
    finally:
        single.cleanup()
    return result


def report(result: dict[str, Any]) -> str:
    api = result["api"]
    lines = [f"GET /v1/volumes, {result['volumes']} volumes of 2 replicas: etcd "
             f"{api['etcd']['volume_list']['p50_ms']:.1f} ms, SQLite "
             f"{api['sqlite']['volume_list']['p50_ms']:.1f} ms (p50), ratio "
             f"{api['ratio_etcd_sqlite']:.2f}; /healthz {api['etcd']['healthz']['p50_ms']:.1f}"
             f" / {api['sqlite']['healthz']['p50_ms']:.1f} ms",
             "fio, 3 replicas on 3 namespace nodes / on one node:"]
    for name, row in result["fio"].items():
        lines.append(f"  {name:20} {row['three_nodes']:10.1f} {row['one_node']:10.1f}  "
                     f"ratio {row['ratio']:.2f}")
    death = result["node_death"]
    lines.append(f"node 3 killed: writes stalled {death['write_stall_seconds']:.1f} s; whole "
                 f"again after {death['whole_again_seconds']:.1f} s (replenishment wait "
                 f"{result['replica_replenishment_wait']} s, lease {result['node_lease_ttl']}"
                 f" s); rebuild {death['rebuild_mibs']:.1f} MiB/s beside a plain copy "
                 f"{death['plain_copy_mibs']:.1f} MiB/s (ratio {death['ratio_rebuild_copy']:.2f})")
    forced = result["forced_attach"]
    lines.append(f"forced attach across a partition: attached in {forced['attach_seconds']:.1f}"
                 f" s, first write after {forced['first_write_seconds']:.1f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: seconds, not minutes")
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("network namespaces need root")
    with contextlib.ExitStack() as stack:
        root = args.dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        root.mkdir(parents=True, exist_ok=True)
        result = run(root, args.quick)
    print(report(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

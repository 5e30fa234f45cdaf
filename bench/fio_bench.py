"""The fio set of BENCHMARKS.md: the engine with 1, 2 and 3 replicas beside the limit
(``nbdkit file``, C, on a raw file) and the peer (``qemu-nbd`` on a 3-layer qcow2 chain),
all through NBD unix sockets, in one run, on the same filesystem.

    .venv/bin/python -m bench.fio_bench [--size 2G] [--runtime 20] [--runs 1]

Every target is written in full first (no reads of holes) and layered alike: the full
write, a snapshot (a qcow2 backing file), 10 % more random writes, a snapshot, and an empty
head (top image) that the workloads then use. Page cache everywhere (the project's replicas
and nbdkit use buffered I/O; qemu-nbd runs with --cache=writeback). The raw fio JSON of
every run is kept in the results directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.units import parse_size

APPLIANCE = str(Path(sys.executable).parent / "appliance")


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str
    bs: str
    iodepth: int
    metric: str  # "iops", "mibs" or "lat_us"


WORKLOADS = [
    Workload("4K randread QD64", "randread", "4k", 64, "iops"),
    Workload("4K randwrite QD64", "randwrite", "4k", 64, "iops"),
    Workload("128K read QD64", "read", "128k", 64, "mibs"),
    Workload("128K write QD64", "write", "128k", 64, "mibs"),
    Workload("4K randread QD1", "randread", "4k", 1, "lat_us"),
    Workload("4K randwrite QD1", "randwrite", "4k", 1, "lat_us"),
]


def wait_for_socket(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.05)


def fio(uri: str, *args: str) -> dict[str, Any]:
    result = subprocess.run(["fio", "--ioengine=nbd", f"--uri={uri}", "--output-format=json",
                             "--name=bench", *args], capture_output=True, text=True, check=True)
    report: dict[str, Any] = json.loads(result.stdout[result.stdout.index("{"):])
    return report


def prefill(uri: str, size: int) -> None:
    fio(uri, "--rw=write", "--bs=1M", "--iodepth=16", f"--size={size}")


def more_writes(uri: str, size: int) -> None:
    fio(uri, "--rw=randwrite", "--bs=64k", "--iodepth=16", f"--size={size}",
        f"--io_size={size // 10}", "--randseed=7")


@dataclass
class Target:
    name: str
    socket: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def stop(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)


def limit(root: Path, size: int) -> Target:
    image = root / "limit.img"
    with open(image, "wb") as file:
        file.truncate(size)
    target = Target("limit", root / "limit.sock")
    target.processes.append(subprocess.Popen(
        ["nbdkit", "-f", "-U", str(target.socket), "file", str(image)]))
    wait_for_socket(target.socket)
    prefill(target.uri, size)
    more_writes(target.uri, size)
    return target


def peer(root: Path, size: int) -> Target:
    """qemu-nbd on base <- mid <- top, written like the project's chain."""
    socket = root / "peer.sock"
    previous = None
    for name in ("base", "mid", "top"):
        image = root / f"{name}.qcow2"
        backing: list[str] = ["-b", str(previous), "-F", "qcow2"] if previous else []
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *backing, str(image),
                        str(size)], check=True)
        process = subprocess.Popen(["qemu-nbd", "-t", "-k", str(socket), "-f", "qcow2",
                                    "--cache=writeback", "--discard=unmap", str(image)])
        wait_for_socket(socket)
        target = Target("peer", socket, [process])
        if name == "base":
            prefill(target.uri, size)
        elif name == "mid":
            more_writes(target.uri, size)
        else:
            return target
        target.stop()
        socket.unlink(missing_ok=True)
        previous = image
    raise AssertionError("unreachable")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def project(root: Path, size: int, replicas: int, engine_args: tuple[str, ...] = ()) -> Target:
    base = root / f"project{replicas}"
    base.mkdir()
    secret = base / "secret"
    secret.write_bytes(os.urandom(24).hex().encode())
    secret.chmod(0o600)
    addresses = []
    for index in range(replicas):
        directory = base / f"r{index}"
        subprocess.run([APPLIANCE, "replica", "create", str(directory), "--size", str(size)],
                       check=True, capture_output=True)
        port = free_port()
        subprocess.run([APPLIANCE, "replica", "serve", str(directory), "--listen",
                        f"127.0.0.1:{port}", "--secret-file", str(secret)], check=True,
                       capture_output=True)
        addresses += ["--replica", f"127.0.0.1:{port}"]
    control = base / "ctl.sock"
    target = Target(f"{replicas} replica{'s' if replicas > 1 else ''}", base / "nbd.sock")
    subprocess.run([APPLIANCE, "engine", "start", "vol", *addresses, "--secret-file",
                    str(secret), "--socket", str(target.socket), "--control", str(control),
                    *engine_args],
                   check=True, capture_output=True)
    target.pids = [int(Path(str(target.socket) + ".pid").read_text())] + \
        [int((base / f"r{i}" / "server.pid").read_text()) for i in range(replicas)]
    prefill(target.uri, size)
    subprocess.run([APPLIANCE, "engine", "snapshot", "--control", str(control), "s1"],
                   check=True, capture_output=True)
    more_writes(target.uri, size)
    subprocess.run([APPLIANCE, "engine", "snapshot", "--control", str(control), "s2"],
                   check=True, capture_output=True)
    return target


def stop_project(target: Target) -> None:
    for pid in target.pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for pid in target.pids:
        deadline = time.monotonic() + 60
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "Z":
                break
            time.sleep(0.05)


def measure(uri: str, workload: Workload, size: int, runtime: int,
            raw: Path | None = None) -> float:
    """*workload*'s figure on the NBD export at *uri*; the raw fio JSON goes to *raw* when
    given."""
    report = fio(uri, f"--rw={workload.rw}", f"--bs={workload.bs}",
                 f"--iodepth={workload.iodepth}", f"--size={size}", "--time_based",
                 f"--runtime={runtime}", "--randseed=42")
    if raw is not None:
        raw.write_text(json.dumps(report))
    side = report["jobs"][0]["read" if "read" in workload.rw else "write"]
    if workload.metric == "iops":
        return float(side["iops"])
    if workload.metric == "mibs":
        return float(side["bw"]) / 1024
    return float(side["lat_ns"]["mean"]) / 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="2G")
    parser.add_argument("--runtime", type=int, default=20, help="seconds per workload")
    parser.add_argument("--runs", type=int, default=1, help="median of this many runs")
    parser.add_argument("--replicas", default="1,2,3")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/appliance-fio-bench"))
    parser.add_argument("--results", type=Path, default=Path("bench/results/fio"))
    parser.add_argument("--local", action="store_true",
                        help="engines with the local fast path (one replica lent to each)")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.runtime, args.replicas = "64M", 1, "1"
    engine_args = ("--local-fast-path",) if args.local else ()
    size = parse_size(args.size)
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    args.results.mkdir(parents=True, exist_ok=True)
    targets: list[Target] = []
    try:
        targets = [limit(args.dir, size), peer(args.dir, size)]
        targets += [project(args.dir, size, int(n), engine_args)
                    for n in args.replicas.split(",")]
        samples: dict[str, dict[str, list[float]]] = {w.name: {t.name: [] for t in targets}
                                                      for w in WORKLOADS}
        for run in range(args.runs):
            for workload in WORKLOADS:
                for target in targets:
                    raw = args.results / f"{run}-{workload.name}-{target.name}.json" \
                        .replace(" ", "_").replace("/", "")
                    samples[workload.name][target.name].append(
                        measure(target.uri, workload, size, args.runtime, raw))
    finally:
        for target in targets:
            if target.pids:
                stop_project(target)
            else:
                target.stop()
    medians = {w: {t: statistics.median(v) for t, v in row.items()} for w, row in samples.items()}
    report(medians, targets, args)
    (args.results / "summary.json").write_text(json.dumps(medians, indent=2))
    shutil.rmtree(args.dir, ignore_errors=True)
    return 0


def report(medians: dict[str, dict[str, float]], targets: list[Target],
           args: argparse.Namespace) -> None:
    names = [t.name for t in targets]
    projects = [n for n in names if "replica" in n]
    print(f"fio over NBD unix sockets, {args.size} volume, {args.runtime} s per workload, "
          f"median of {args.runs} run(s); local fast path {'on' if args.local else 'off'}")
    print(f"{'workload':20}" + "".join(f"{n:>12}" for n in names) +
          "".join(f"{p.split()[0] + 'r/limit':>12}{p.split()[0] + 'r/peer':>11}"
                  for p in projects))
    for workload in WORKLOADS:
        row = medians[workload.name]
        unit = {"iops": "IOPS", "mibs": "MiB/s", "lat_us": "us"}[workload.metric]
        cells = "".join(f"{row[n]:>12,.0f}" for n in names)
        ratios = ""
        for name in projects:
            if workload.metric == "lat_us":  # latency: how many times the reference's
                ratios += f"{row[name] / row['limit']:>11.1f}x{row[name] / row['peer']:>10.1f}x"
            else:
                ratios += f"{row[name] / row['limit']:>12.0%}{row[name] / row['peer']:>11.0%}"
        print(f"{workload.name:20}{cells}{ratios}  {unit}")


if __name__ == "__main__":
    sys.exit(main())

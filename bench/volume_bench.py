"""Rebuild throughput and the resources of a volume, measured through the real CLI.

    .venv/bin/python -m bench.volume_bench [--size 2G]

* rebuild: a fresh replica added to a volume whose data is dense (fully written) or sparse
  (10 % written); MiB/s of data copied, seconds per GiB of volume, beside a plain ``cp``
  of the same replica directory (the disk's own speed, the reference);
* memory: resident set of the engine and of a replica server, for a small and a 16x larger
  (sparse) volume, so the cost per GiB shows;
* idle CPU: CPU time of the engine, the replica servers and nbdfuse over an idle period
  while the volume is attached;
* attach: seconds from ``engine attach`` to a usable block device, and 4K random reads and
  writes (QD64) on that device beside the same on the NBD socket, measured alternately
  (bench/device_bench.py compares variants of the attach path the same way).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from appliance.units import format_size, parse_size
from bench.device_bench import WORKLOADS, interleaved

APPLIANCE = str(Path(sys.executable).parent / "appliance")
MiB = 1 << 20


def cli(*args: str | Path) -> str:
    return subprocess.run([APPLIANCE, *map(str, args)], check=True, capture_output=True,
                          text=True).stdout


class Volume:
    def __init__(self, root: Path, name: str, size: int, replicas: int, port: int) -> None:
        self.root = root / name
        self.root.mkdir(parents=True)
        self.secret = self.root / "secret"
        self.secret.write_bytes(os.urandom(24).hex().encode())
        self.secret.chmod(0o600)
        self.size = size
        self.port = port
        self.control = self.root / "ctl.sock"
        self.socket = self.root / "nbd.sock"
        self.uri = f"nbd+unix:///?socket={self.socket}"
        self.replicas = [self.add_replica_dir(i) for i in range(replicas)]
        cli("engine", "start", name, *[x for i in range(replicas)
                                       for x in ("--replica", self.address(i))],
            "--secret-file", self.secret, "--socket", self.socket, "--control", self.control)

    def address(self, index: int) -> str:
        return f"127.0.0.1:{self.port + index}"

    def add_replica_dir(self, index: int) -> Path:
        directory = self.root / f"r{index}"
        cli("replica", "create", directory, "--size", str(self.size))
        cli("replica", "serve", directory, "--listen", self.address(index), "--secret-file",
            self.secret)
        return directory

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(cli("engine", "status", "--control", self.control,
                                                "-o", "json"))
        return result

    def pids(self) -> dict[str, int]:
        pids = {"engine": int(Path(str(self.socket) + ".pid").read_text())}
        for index, directory in enumerate(self.replicas):
            pids[f"replica{index}"] = int((directory / "server.pid").read_text())
        return pids

    def stop(self) -> None:
        subprocess.run([APPLIANCE, "engine", "stop", "--control", str(self.control)],
                       capture_output=True, check=False)
        for directory in self.replicas:
            pid = int((directory / "server.pid").read_text())
            subprocess.run(["kill", str(pid)], check=False)


def fill(uri: str, size: int, fraction: float) -> None:
    if fraction >= 1:
        args = ["--rw=write", "--bs=1M", f"--size={size}"]
    else:
        args = ["--rw=randwrite", "--bs=64k", f"--size={size}",
                f"--io_size={int(size * fraction)}"]
    subprocess.run(["fio", "--ioengine=nbd", f"--uri={uri}", "--name=fill", "--iodepth=16",
                    *args], check=True, capture_output=True)


def rebuild(root: Path, size: int, fraction: float, port: int) -> dict[str, float]:
    volume = Volume(root, f"rebuild{int(fraction * 100)}", size, 1, port)
    try:
        fill(volume.uri, size, fraction)
        cli("engine", "snapshot", "--control", volume.control, "filled")
        volume.replicas.append(volume.add_replica_dir(1))
        start = time.monotonic()
        cli("engine", "add-replica", "--control", volume.control, volume.address(1))
        while volume.status()["state"] != "healthy":
            time.sleep(0.05)
        seconds = time.monotonic() - start
        info = volume.status()["replicas"][1]["rebuild"]
        copied = info["copied_bytes"]
    finally:
        volume.stop()
    reference = root / "copy-reference"
    os.sync()
    start = time.monotonic()
    reference.mkdir()
    subprocess.run(["cp", "--sparse=always", *map(str, sorted(volume.replicas[0].glob(
        "layer-*"))), str(reference)], check=True)  # the data, not sockets or logs
    os.sync()
    copy_seconds = time.monotonic() - start
    shutil.rmtree(reference)
    return {"copied_bytes": copied, "seconds": seconds,
            "mib_per_second": copied / MiB / seconds,
            "seconds_per_gib": seconds / (size / (1 << 30)),
            "cp_mib_per_second": copied / MiB / copy_seconds}


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


ATTACH_WORKLOADS = ("4k-randread", "4k-randwrite")


def attach_path(uri: str, device: str, size: int, seconds: float,
                rounds: int) -> dict[str, dict[str, Any]]:
    """4K random reads and writes at QD64 through the attached device (fio libaio,
    direct=1, on nbdfuse + loop) and on the NBD socket (fio's nbd engine), alternately,
    *rounds* pairs each: the median of the pairs' ratios device/socket."""
    return {name: interleaved(device, uri, WORKLOADS[name], size, seconds, rounds)
            for name in ATTACH_WORKLOADS}


def resources(root: Path, size: int, idle: float, port: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for offset, (label, volume_size) in enumerate((("small", size), ("large", 16 * size))):
        volume = Volume(root, f"mem-{label}", volume_size, 2, port + 10 * offset)
        try:
            fill(volume.uri, volume_size, 0.05)
            pids = volume.pids()
            result[label] = {"size": volume_size,
                             "engine_rss": rss(pids["engine"]),
                             "replica_rss": rss(pids["replica0"])}
            if label == "small":
                start = time.monotonic()
                device = cli("engine", "attach", "--control", volume.control).strip()
                result["attach_seconds"] = time.monotonic() - start
                nbdfuse = int(json.loads(Path(str(volume.control) + ".attach").read_text())
                              ["nbdfuse_pid"])
                watched = {**pids, "nbdfuse": nbdfuse}
                before = {name: cpu_seconds(pid) for name, pid in watched.items()}
                time.sleep(idle)
                result["idle_cpu_percent"] = {
                    name: 100 * (cpu_seconds(pid) - before[name]) / idle
                    for name, pid in watched.items()}
                result["device"] = device
                result["attach_path"] = attach_path(
                    volume.uri, device, volume_size, 1.0 if idle < 5 else 5.0,
                    1 if idle < 5 else 3)
                cli("engine", "detach", "--control", volume.control)
        finally:
            volume.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="2G")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle measurement")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/appliance-volume-bench"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.idle = "64M", 1.0
    size = parse_size(args.size)
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    results: dict[str, Any] = {}
    try:
        results["rebuild_dense"] = rebuild(args.dir, size, 1.0, 9500)
        results["rebuild_sparse"] = rebuild(args.dir, size, 0.1, 9520)
        results["resources"] = resources(args.dir, size, args.idle, 9540)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    print(f"volume benchmarks, {format_size(size)} volume")
    for kind in ("dense", "sparse"):
        info = results[f"rebuild_{kind}"]
        print(f"rebuild {kind:6}: {format_size(int(info['copied_bytes'])):>9} copied in "
              f"{info['seconds']:.1f} s = {info['mib_per_second']:.0f} MiB/s, "
              f"{info['seconds_per_gib']:.1f} s per GiB of volume "
              f"(cp of the replica: {info['cp_mib_per_second']:.0f} MiB/s)")
    res = results["resources"]
    for label in ("small", "large"):
        info = res[label]
        print(f"memory, {format_size(info['size']):>8} volume: engine "
              f"{format_size(info['engine_rss'])}, replica server "
              f"{format_size(info['replica_rss'])} resident")
    cpu = ", ".join(f"{name} {value:.2f}%" for name, value in res["idle_cpu_percent"].items())
    print(f"idle attached volume, CPU of a core: {cpu}")
    print(f"attach to a usable device: {res['attach_seconds']:.2f} s")
    for name, label in (("4k-randread", "4K random read QD64"),
                        ("4k-randwrite", "4K random write QD64")):
        cell = res["attach_path"][name]
        print(f"attach path, {label}: device {cell['device']:,.0f} IOPS, NBD socket "
              f"{cell['socket']:,.0f} IOPS ({cell['ratio']:.0%} through nbdfuse + loop, median "
              f"of {len(cell['ratios'])} interleaved pair(s))")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The attached block device (nbdfuse + loop) against the NBD socket it is built on.

    .venv/bin/python -m bench.device_bench [--size 1G] [--runtime 5] [--rounds 3]
        [--variants default,attach] [--workloads 4k-randread,4k-randwrite]

One 1-replica project volume; for each variant of the attach path (nbdfuse options, FUSE
queue limits, loop device settings) the volume is attached, and each workload runs on the
device (fio libaio, direct=1) and on the socket (fio's nbd engine) alternately, device then
socket, ``--rounds`` times, so both sides see the same machine load. Reported: the median
over rounds of each pair's ratio device/socket (for QD1 latency, socket/device, so above
100 % is always better), beside the medians of the figures themselves. The variant
``attach`` is what :func:`appliance.frontend.attach.attach` sets up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.frontend import attach as attach_module
from appliance.nbd.settings import FRONTEND_EXPORT
from appliance.units import parse_size
from bench.fio_bench import Target, Workload, project, stop_project


@dataclass(frozen=True)
class Variant:
    name: str
    connections: int | None = None  # nbdfuse -C
    fuse_options: tuple[str, ...] = ()  # each one -o
    max_background: int | None = None  # /sys/fs/fuse/connections/N/max_background
    direct_io: bool = True  # losetup --direct-io
    sector_size: int | None = None  # losetup --sector-size
    nr_requests: int | None = None
    scheduler: str | None = None


VARIANTS = {v.name: v for v in [
    Variant("default"),  # nbdfuse's defaults, loop direct I/O (attach before it was tuned)
    Variant("bg64", max_background=64),
    Variant("bg64+C1", connections=1, max_background=64),
    Variant("bg64+C8", connections=8, max_background=64),
    Variant("bg64+sector4k", max_background=64, sector_size=4096),
    Variant("bg64+none", max_background=64, scheduler="none", nr_requests=256),
    Variant("bg64+nodio", max_background=64, direct_io=False),
    Variant("nodio", direct_io=False),
]}


WORKLOADS = {w.name: w for w in [
    Workload("4k-randread", "randread", "4k", 64, "iops"),
    Workload("4k-randwrite", "randwrite", "4k", 64, "iops"),
    Workload("128k-read", "read", "128k", 64, "iops"),
    Workload("128k-write", "write", "128k", 64, "iops"),
    Workload("4k-randread-qd1", "randread", "4k", 1, "lat_us"),
]}


@dataclass
class Attached:
    device: str
    mountpoint: Path
    process: subprocess.Popen[bytes] | None = None
    state_file: Path | None = None
    settings: dict[str, str] = field(default_factory=dict)


FUSECTL = Path("/sys/fs/fuse/connections")


def fuse_connection(path: Path) -> Path:
    """The fusectl directory (``max_background``, ``congestion_threshold``...) of the FUSE
    connection serving *path*, mounting fusectl first if nobody has."""
    if not os.path.ismount(FUSECTL):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(FUSECTL)], check=True)
    return FUSECTL / str(os.minor(path.stat().st_dev))


def attach_variant(target: Target, variant: Variant, root: Path, size: int) -> Attached:
    if variant.name == "attach":
        state_file = root / "attach.state"
        device = attach_module.attach("benchvol", target.socket, state_file, size)
        state = json.loads(state_file.read_text())
        return Attached(device, Path(state["mountpoint"]), state_file=state_file,
                        settings=_settings(device, Path(state["mountpoint"]) / "benchvol"))
    mountpoint = root / f"fuse-{variant.name}"
    mountpoint.mkdir()
    disk = mountpoint / "disk"
    command = ["nbdfuse"]
    if variant.connections:
        command += ["-C", str(variant.connections)]
    for option in variant.fuse_options:
        command += ["-o", option]
    command += [str(disk), f"nbd+unix:///{FRONTEND_EXPORT}?socket={target.socket}"]
    process = subprocess.Popen(command, start_new_session=True)
    deadline = time.monotonic() + 30
    while not disk.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"nbdfuse failed: {command}")
        time.sleep(0.05)
    if variant.max_background:
        connection = fuse_connection(disk)
        (connection / "max_background").write_text(str(variant.max_background))
        (connection / "congestion_threshold").write_text(
            str(variant.max_background * 3 // 4))
    losetup = ["losetup", "--find", "--show", f"--direct-io={'on' if variant.direct_io else 'off'}",
               "--sizelimit", str(size)]
    if variant.sector_size:
        losetup += ["--sector-size", str(variant.sector_size)]
    device = subprocess.run([*losetup, str(disk)], check=True, capture_output=True,
                            text=True).stdout.strip()
    queue = Path("/sys/block") / Path(device).name / "queue"
    if variant.scheduler:
        (queue / "scheduler").write_text(variant.scheduler)
    if variant.nr_requests:
        with contextlib.suppress(OSError):
            (queue / "nr_requests").write_text(str(variant.nr_requests))
    return Attached(device, mountpoint, process, settings=_settings(device, disk))


def _settings(device: str, disk: Path) -> dict[str, str]:
    queue = Path("/sys/block") / Path(device).name / "queue"
    found = {name: (queue / name).read_text().strip()
             for name in ("scheduler", "nr_requests", "logical_block_size", "max_sectors_kb")}
    found["dio"] = (Path("/sys/block") / Path(device).name / "loop" / "dio").read_text().strip()
    with contextlib.suppress(OSError):
        connection = fuse_connection(disk)
        for name in ("max_background", "congestion_threshold"):
            found[name] = (connection / name).read_text().strip()
    return found


def detach_variant(attached: Attached) -> None:
    if attached.state_file is not None:
        attach_module.detach(attached.state_file)
        return
    subprocess.run(["losetup", "-d", attached.device], check=False)
    subprocess.run(["fusermount3", "-u", str(attached.mountpoint)], check=False)
    if attached.process is not None:
        attached.process.wait(timeout=30)
    with contextlib.suppress(OSError):
        attached.mountpoint.rmdir()


def run_fio(target_args: list[str], workload: Workload, size: int, runtime: float) -> float:
    result = subprocess.run(
        ["fio", "--name=bench", *target_args, f"--rw={workload.rw}", f"--bs={workload.bs}",
         f"--iodepth={workload.iodepth}", f"--size={size}", "--time_based",
         f"--runtime={runtime}", "--randseed=42", "--output-format=json"],
        check=True, capture_output=True, text=True)
    report = json.loads(result.stdout[result.stdout.index("{"):])
    side = report["jobs"][0]["read" if "read" in workload.rw else "write"]
    if workload.metric == "iops":
        return float(side["iops"])
    return float(side["lat_ns"]["mean"]) / 1000


def device_args(device: str) -> list[str]:
    return ["--ioengine=libaio", "--direct=1", f"--filename={device}"]


def socket_args(uri: str) -> list[str]:
    return ["--ioengine=nbd", f"--uri={uri}"]


def interleaved(device: str, uri: str, workload: Workload, size: int, runtime: float,
                rounds: int) -> dict[str, Any]:
    """*rounds* pairs device, socket; the median of the pairs' ratios (better is higher)."""
    pairs = []
    for _ in range(rounds):
        on_device = run_fio(device_args(device), workload, size, runtime)
        on_socket = run_fio(socket_args(uri), workload, size, runtime)
        pairs.append((on_device, on_socket))
    # higher is better: IOPS device/socket, latency socket/device
    ratios = [(s / d) if workload.metric == "lat_us" else (d / s) for d, s in pairs]
    return {"ratio": statistics.median(ratios), "ratios": ratios,
            "device": statistics.median(d for d, _ in pairs),
            "socket": statistics.median(s for _, s in pairs), "metric": workload.metric}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--runtime", type=float, default=5.0, help="seconds per fio run")
    parser.add_argument("--rounds", type=int, default=3, help="device/socket pairs")
    parser.add_argument("--variants", default="default,attach",
                        help=f"comma-separated, of: attach, {', '.join(VARIANTS)}")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/appliance-device-bench"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.runtime, args.rounds = "64M", 1.0, 1
    size = parse_size(args.size)
    variants = [VARIANTS.get(name) or Variant(name) for name in args.variants.split(",")]
    workloads = [WORKLOADS[name] for name in args.workloads.split(",")]
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    results: dict[str, Any] = {}
    target = project(args.dir, size, 1)
    try:
        for variant in variants:
            attached = attach_variant(target, variant, args.dir, size)
            try:
                results[variant.name] = {"settings": attached.settings}
                for workload in workloads:
                    cell = interleaved(attached.device, target.uri, workload, size,
                                       args.runtime, args.rounds)
                    results[variant.name][workload.name] = cell
                    unit = "us" if workload.metric == "lat_us" else "IOPS"
                    print(f"{variant.name:28} {workload.name:16} {cell['ratio']:6.0%}  "
                          f"device {cell['device']:9,.0f} socket {cell['socket']:9,.0f} {unit}"
                          f"  pairs {' '.join(f'{r:.0%}' for r in cell['ratios'])}",
                          flush=True)
            finally:
                detach_variant(attached)
    finally:
        stop_project(target)
        shutil.rmtree(args.dir, ignore_errors=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The iSCSI frontend: the fio-like set through the node's target with a userspace
initiator, for 1 and 3 replicas, beside tgt serving a plain file (the limit) in the same
run, interleaved workload by workload.

    .venv/bin/python -m bench.iscsi_bench [--size 2G] [--runtime 15] [--replicas 1,3]
                                          [--dir DIR] [--json FILE] [--quick]

The load generator is ``iscsi-wperf`` (../shared/tools/iscsi-wperf.c, built here against
libiscsi): asynchronous READ(16)/WRITE(16) at a queue depth, for reads and writes alike, so
both sides are driven the same way. Every target is written in full first (no reads of
holes). QD1 write latency is the inverse of QD1 IOPS. The reference is a second tgtd (the
same binary, tgt's default ``rdwr`` store, buffered: what "tgt serving a file" is when
nobody tunes it) on a plain file on the same filesystem; the volumes' LUNs use the same
store with direct I/O on their device (docs/iscsi.md), their replicas the page cache.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from appliance.frontend import tgt as tgtd
from appliance.units import parse_size

APPLIANCE = str(Path(sys.executable).parent / "appliance")
TOOL = Path(__file__).resolve().parent.parent.parent / "shared" / "tools" / "iscsi-wperf.c"
SECRET = "bench-secret-1234"  # a throwaway secret of a throwaway node
WORKLOADS = [  # name, r|w, rand|seq, 512-byte blocks per I/O, queue depth, metric
    ("4K random read QD32", "r", "rand", 8, 32, "iops"),
    ("4K random write QD32", "w", "rand", 8, 32, "iops"),
    ("128K sequential read QD8", "r", "seq", 256, 8, "mbs"),
    ("128K sequential write QD8", "w", "seq", 256, 8, "mbs"),
    ("QD1 4K write latency", "w", "rand", 8, 1, "lat_us"),
]
RESULT = re.compile(r"RESULT .*= (?P<iops>[\d.]+) IOPS, (?P<mbs>[\d.]+) MB/s "
                    r"\(errors (?P<errors>\d+)\)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def build_tool(directory: Path) -> Path:
    binary = directory / "iscsi-wperf"
    subprocess.run(["cc", "-O2", "-o", str(binary), str(TOOL), "-liscsi"], check=True)
    return binary


def wperf(tool: Path, url: str, args: list[str], chap: bool) -> dict[str, float]:
    environment = dict(os.environ)
    if chap:  # (from the environment: not in the arguments)
        environment.update(LIBISCSI_CHAP_USERNAME="bench", LIBISCSI_CHAP_PASSWORD=SECRET)
    result = subprocess.run([str(tool), url, *args], capture_output=True, text=True,
                            env=environment, timeout=3600, check=False)
    found = RESULT.search(result.stdout + result.stderr)
    if result.returncode or found is None or int(found["errors"]):
        raise RuntimeError(f"iscsi-wperf {url} {args} failed: {result.stdout}{result.stderr}")
    return {"iops": float(found["iops"]), "mbs": float(found["mbs"])}


class Daemon:
    def __init__(self, root: Path, disks: int) -> None:
        self.root = root
        self.data = root / "node"
        self.url = f"http://127.0.0.1:{free_port()}"
        self.portal = f"127.0.0.1:{free_port()}"
        config = root / "node.toml"
        config.write_text(f'iscsi_portal = "{self.portal}"\n')
        self.log = open(root / "daemon.log", "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [APPLIANCE, "serve", "--data-dir", str(self.data), "--listen",
             self.url.removeprefix("http://"), "--config", str(config)],
            stdout=self.log, stderr=self.log, start_new_session=True)
        deadline = time.monotonic() + 60
        while not (self.data / "token").exists() or self.cli("node", "show",
                                                             check=False).returncode:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("the daemon did not start: see " + str(root / "daemon.log"))
            time.sleep(0.2)
        for index in range(1, disks):
            disk = root / f"disk{index}"
            disk.mkdir()
            self.cli("disk", "add", str(disk))
        self.secret = root / "chap"
        self.secret.write_text(SECRET + "\n")
        self.secret.chmod(0o600)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([APPLIANCE, *args, "--url", self.url, "--token-file",
                               str(self.data / "token")], capture_output=True, text=True,
                              check=check, timeout=600)

    def volume(self, name: str, size: int, replicas: int) -> str:
        self.cli("volume", "create", name, "--size", str(size), "--replicas", str(replicas))
        return self.cli("volume", "attach", name, "--frontend", "iscsi", "--chap-user",
                        "bench", "--chap-secret-file", str(self.secret)).stdout.strip()

    def stop(self) -> None:
        for name in json.loads(self.cli("volume", "list", "-o", "json").stdout):
            self.cli("volume", "detach", name["name"], "--force", check=False)
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)
        self.log.close()
        for pid_file in [self.data / "run" / "tgtd" / "tgtd.pid",
                         *self.root.rglob("server.pid")]:
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)


def reference(root: Path, size: int) -> tuple[tgtd.Tgt, str]:
    """tgt on a plain file: the limit."""
    image = root / "plain.img"
    with open(image, "wb") as out:
        out.truncate(size)
    server = tgtd.Tgt(root / "reftgt", ("127.0.0.1", free_port()))
    server.ensure_running()
    iqn = "iqn.2026-12.io.appliance.bench:plain"
    tid = server.new_target(iqn)
    server.request(tgtd.MODE_DEVICE, tgtd.OP_NEW, f"path={image},bstype=rdwr", tid=tid, lun=1)
    server.request(tgtd.MODE_TARGET, tgtd.OP_BIND, "initiator-address=ALL", tid=tid)
    return server, f"iscsi://{server.portal[0]}:{server.portal[1]}/{iqn}/1"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="2G")
    parser.add_argument("--runtime", type=float, default=15)
    parser.add_argument("--replicas", default="1,3")
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    options = parser.parse_args()
    if options.quick:
        options.size, options.runtime, options.replicas = "64M", 1, "1"
    size = parse_size(options.size)
    counts = [int(n) for n in options.replicas.split(",")]
    root = options.dir or Path(tempfile.mkdtemp(prefix="iscsi-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    tool = build_tool(root)
    daemon = Daemon(root, max(counts))
    server, limit = reference(root, size)
    try:
        targets: dict[str, tuple[str, bool]] = {"tgt on a file": (limit, False)}
        for count in counts:
            targets[f"{count} replica(s)"] = (daemon.volume(f"r{count}", size, count), True)
        for url, chap in targets.values():  # written in full: no reads of holes
            wperf(tool, url, ["w", "fill", "256", "8", "0"], chap)
        results: dict[str, dict[str, float]] = {name: {} for name in targets}
        for name_w, rw, mode, blocks, depth, metric in WORKLOADS:
            for name, (url, chap) in targets.items():  # interleaved, in one run
                found = wperf(tool, url, [rw, mode, str(blocks), str(depth),
                                          str(options.runtime)], chap)
                results[name][name_w] = 1e6 / found["iops"] if metric == "lat_us" \
                    else found[metric]
        report(results)
        if options.json:
            options.json.parent.mkdir(parents=True, exist_ok=True)
            options.json.write_text(json.dumps({"size": size, "runtime": options.runtime,
                                                "results": results}, indent=2))
    finally:
        daemon.stop()
        server.stop()
        if options.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


def report(results: dict[str, dict[str, Any]]) -> None:
    names = list(results)
    base = results[names[0]]
    print(f"{'workload':28} " + " ".join(f"{name:>22}" for name in names))
    for workload, *_, metric in WORKLOADS:
        cells = []
        for name in names:
            value = results[name][workload]
            unit = {"iops": "IOPS", "mbs": "MB/s", "lat_us": "us"}[metric]
            if name == names[0]:
                cells.append(f"{value:>14.0f} {unit:>7}")
            elif metric == "lat_us":
                cells.append(f"{value:>9.0f} ({value / base[workload]:.1f}x)".rjust(22))
            else:
                cells.append(f"{value:>9.0f} ({100 * value / base[workload]:.0f} %)".rjust(22))
        print(f"{workload:28} " + " ".join(cells))


if __name__ == "__main__":
    sys.exit(main())

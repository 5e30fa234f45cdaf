"""RWX volumes: NFS throughput through a shared volume's ganesha beside ganesha exporting a
plain directory on the same filesystem (the limit), in one run, interleaved.

    .venv/bin/python -m bench.nfs_bench [--size 64M] [--runtime 10] [--replicas 1,3]
                                        [--dir DIR] [--json FILE] [--quick]

The client is libnfs 4.0 through ctypes (tests/nfsclient.py), NFSv4.0 over loopback, on
one connection, one request at a time: sequential write of a file of --size (in 3 KiB
WRITEs, the most libnfs 4.0 sends over NFSv4; each file synced at the end), sequential
read of it (1 MiB READs), and for --runtime seconds 4 KiB random reads and 3 KiB random
writes inside it. The plain export is the same ganesha binary and configuration
(appliance.frontend.nfs) on a directory beside the daemon's data.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from appliance.frontend import nfs
from appliance.units import parse_size
from bench.iscsi_bench import APPLIANCE, free_port
from tests.nfsclient import CHUNK, Client

READ_PIECE = 1 << 20


def url(address: str, path: str, port: int) -> str:
    return f"nfs://{address}{path}?version=4&nfsport={port}"


def measure(target: str, size: int, runtime: float) -> dict[str, float]:
    client = Client(target)
    lib, context = client.lib, client.context
    name = f"bench-{os.getpid()}-{time.monotonic_ns()}"
    data = os.urandom(size)
    results: dict[str, float] = {}
    try:
        started = time.perf_counter()
        client.write(name, data)  # CHUNK-byte WRITEs, then COMMIT
        results["sequential write MiB/s"] = size / (time.perf_counter() - started) / 2**20
        handle = ctypes.c_void_p()
        client.check(lib.nfs_open(context, f"/{name}".encode(), os.O_RDWR,
                                  ctypes.byref(handle)), "open")
        try:
            buffer = ctypes.create_string_buffer(READ_PIECE)
            started = time.perf_counter()
            for offset in range(0, size, READ_PIECE):
                client.check(lib.nfs_pread(context, handle, offset, READ_PIECE, buffer), "read")
            results["sequential read MiB/s"] = size / (time.perf_counter() - started) / 2**20
            generator = random.Random(7)
            small = ctypes.create_string_buffer(4096)
            count, deadline = 0, time.perf_counter() + runtime
            started = time.perf_counter()
            while time.perf_counter() < deadline:
                offset = generator.randrange(size // 4096) * 4096
                client.check(lib.nfs_pread(context, handle, offset, 4096, small), "read")
                count += 1
            results["4K random read IOPS"] = count / (time.perf_counter() - started)
            piece = os.urandom(CHUNK)
            count, deadline = 0, time.perf_counter() + runtime
            started = time.perf_counter()
            while time.perf_counter() < deadline:
                offset = generator.randrange(size // 4096) * 4096
                client.check(lib.nfs_pwrite(context, handle, offset, CHUNK, piece), "write")
                count += 1
            client.check(lib.nfs_fsync(context, handle), "fsync")
            results["3K random write IOPS"] = count / (time.perf_counter() - started)
        finally:
            lib.nfs_close(context, handle)
    finally:
        client.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="64M")
    parser.add_argument("--runtime", type=float, default=10)
    parser.add_argument("--replicas", default="1,3")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    options = parser.parse_args()
    if options.quick:
        options.size, options.runtime, options.replicas = "4M", 1, "1"
    size = parse_size(options.size)
    counts = [int(n) for n in options.replicas.split(",")]
    root = options.dir or Path(tempfile.mkdtemp(prefix="nfs-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    data = root / "node"
    api = f"127.0.0.1:{free_port()}"
    config = root / "node.toml"
    first = free_port()
    config.write_text(f"share_port_range = [{first}, {first + 20}]\n")
    with open(root / "daemon.log", "ab") as log:
        daemon = subprocess.Popen([APPLIANCE, "serve", "--data-dir", str(data), "--listen",
                                   api, "--config", str(config)], stdout=log, stderr=log,
                                  start_new_session=True)

    def cli(*args: str) -> str:
        return subprocess.run([APPLIANCE, *args, "--url", f"http://{api}", "--token-file",
                               str(data / "token")], capture_output=True, text=True,
                              check=True, timeout=600).stdout

    plain = nfs.ShareServer(directory=root / "plain-ganesha", export_path=root / "plain",
                            pseudo="/plain", address="127.0.0.1", port=free_port(),
                            lease_lifetime=30, grace_period=40)
    try:
        deadline = time.monotonic() + 60
        while not (data / "token").exists() or subprocess.run(
                [APPLIANCE, "node", "show", "--url", f"http://{api}", "--token-file",
                 str(data / "token")], capture_output=True, check=False).returncode:
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise RuntimeError(f"the daemon did not start: see {root / 'daemon.log'}")
            time.sleep(0.2)
        for index in range(1, max(counts)):
            (root / f"disk{index}").mkdir()
            cli("disk", "add", str(root / f"disk{index}"))
        (root / "plain").mkdir()
        (root / "plain").chmod(0o1777)
        plain.directory.mkdir()
        nfs.start(plain.validate())
        targets = {"ganesha on a directory": url("127.0.0.1", "/plain", plain.port)}
        for count in counts:
            cli("volume", "create", f"r{count}", "--size", "320M", "--replicas", str(count),
                "--access-mode", "rwx")
            cli("volume", "share", f"r{count}", "--allow", "127.0.0.0/8")
            share = json.loads(cli("volume", "show", f"r{count}", "-o", "json"))["share"]
            targets[f"{count} replica(s)"] = url(share["address"], share["path"],
                                                 share["port"])
        results: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
        for _ in range(options.runs):
            for name, target in targets.items():  # interleaved, in one run
                results[name].append(measure(target, size, options.runtime))
        report(results)
        if options.json:
            options.json.parent.mkdir(parents=True, exist_ok=True)
            options.json.write_text(json.dumps({"size": size, "runtime": options.runtime,
                                                "results": results}, indent=2))
    finally:
        nfs.stop(plain.directory)
        for count in counts:
            subprocess.run([APPLIANCE, "volume", "detach", f"r{count}", "--force", "--url",
                            f"http://{api}", "--token-file", str(data / "token")],
                           capture_output=True, check=False, timeout=300)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
        for pid_file in root.rglob("server.pid"):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
        if options.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


def report(results: dict[str, list[dict[str, Any]]]) -> None:
    names = list(results)
    medians = {name: {key: sorted(run[key] for run in runs)[len(runs) // 2]
                      for key in runs[0]} for name, runs in results.items()}
    base = medians[names[0]]
    print(f"{'workload':24} " + " ".join(f"{name:>24}" for name in names))
    for key in base:
        cells = [f"{base[key]:>24.1f}"] + [
            f"{medians[name][key]:>14.1f} ({100 * medians[name][key] / base[key]:.0f} %)"
            .rjust(24) for name in names[1:]]
        print(f"{key:24} " + " ".join(cells))


if __name__ == "__main__":
    sys.exit(main())

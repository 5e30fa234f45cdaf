"""Node service benchmark: API latency of `volume list` with many volumes, daemon memory,
CPU of an idle attached volume (every process it involves), time from `volume attach` to a
usable device.

References measured in the same run: `GET /healthz` (the HTTP stack with no work: the floor
of any API call) and the daemon's memory with no volumes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.volume_bench import cpu_seconds, rss

APPLIANCE = str(Path(sys.executable).parent / "appliance")


class Daemon:
    def __init__(self, root: Path, port: int) -> None:
        self.data = root / "data"
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [APPLIANCE, "serve", "--data-dir", str(self.data), "--listen", f"127.0.0.1:{port}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(root / "daemon.log", "ab"), start_new_session=True)  # noqa: SIM115
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit("the daemon did not start")
            time.sleep(0.1)
        token = (self.data / "token").read_text().strip()
        self.http = httpx.Client(base_url=self.url, timeout=120,
                                 headers={"Authorization": f"Bearer {token}"})

    def cli(self, *args: str) -> str:
        return subprocess.run([APPLIANCE, *args, "--url", self.url, "--token-file",
                               str(self.data / "token")], capture_output=True, text=True,
                              check=True, timeout=300).stdout

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)


def latency(call: Any, repeat: int) -> dict[str, float]:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    samples.sort()
    return {"p50_ms": 1000 * statistics.median(samples),
            "p99_ms": 1000 * samples[min(len(samples) - 1, int(len(samples) * 0.99))]}


def process_tree(volume_dir: Path, replica_dirs: list[str]) -> dict[str, int]:
    pids = {"engine": int((volume_dir / "nbd.sock.pid").read_text())}
    for index, directory in enumerate(replica_dirs):
        pids[f"replica{index}"] = int((Path(directory) / "server.pid").read_text())
    attach_state = json.loads((volume_dir / "ctl.sock.attach").read_text())
    if attach_state.get("nbdfuse_pid"):
        pids["nbdfuse"] = int(attach_state["nbdfuse_pid"])
    return pids


def run(root: Path, volumes: int, idle: float, port: int) -> dict[str, Any]:
    daemon = Daemon(root, port)
    result: dict[str, Any] = {"volumes": volumes}
    try:
        # The benchmark measures latency, not capacity: thin 1G volumes on a host whose disk
        # is nearly full (another run's leftovers) must not be refused by the free-space floor.
        daemon.http.patch("/v1/settings",
                          json={"minimal_available_percentage": 0}).raise_for_status()
        (root / "disk2").mkdir()
        daemon.cli("disk", "add", str(root / "disk2"))
        time.sleep(1)
        result["rss_empty"] = rss(daemon.process.pid)
        result["healthz"] = latency(lambda: daemon.http.get("/healthz"), 200)
        result["list_empty"] = latency(lambda: daemon.http.get("/v1/volumes"), 100)
        started = time.perf_counter()
        for index in range(volumes):
            daemon.http.post("/v1/volumes", json={"name": f"v{index:03d}", "size": "1G",
                                                  "replicas": 2}).raise_for_status()
        result["create_seconds_each"] = (time.perf_counter() - started) / max(1, volumes)
        deadline = time.monotonic() + 300
        while any(v["state"] == "creating" for v in daemon.http.get("/v1/volumes").json()):
            if time.monotonic() > deadline:
                raise SystemExit("volumes stayed in creating")
            time.sleep(0.2)
        result["list_full"] = latency(lambda: daemon.http.get("/v1/volumes"), 50)
        cli_samples = []
        for _ in range(5):
            started = time.perf_counter()
            daemon.cli("volume", "list", "-o", "json")
            cli_samples.append(time.perf_counter() - started)
        result["cli_list_seconds"] = statistics.median(cli_samples)
        time.sleep(2)
        result["rss_full"] = rss(daemon.process.pid)

        attach = []
        for _ in range(3):
            started = time.perf_counter()
            device = daemon.cli("volume", "attach", "v000").strip()
            with open(device, "rb") as block:
                block.read(4096)
            attach.append(time.perf_counter() - started)
            daemon.cli("volume", "detach", "v000")
        result["attach_seconds"] = statistics.median(attach)
        daemon.cli("volume", "attach", "v000")
        info = daemon.http.get("/v1/volumes/v000").json()
        pids = process_tree(daemon.data / "run" / "v000",
                            [r["directory"] for r in info["replica_list"]])
        pids["daemon"] = daemon.process.pid
        time.sleep(2)
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        time.sleep(idle)
        result["idle_cpu_percent"] = {name: 100 * (cpu_seconds(pid) - before[name]) / idle
                                      for name, pid in pids.items()}
        daemon.cli("volume", "detach", "v000")
        for index in range(volumes):
            daemon.http.delete(f"/v1/volumes/v{index:03d}")
    finally:
        daemon.stop()
        subprocess.run([APPLIANCE, "engine", "stop", "--control",
                        str(daemon.data / "run" / "v000" / "ctl.sock")],
                       capture_output=True, check=False)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--volumes", type=int, default=100)
    parser.add_argument("--idle", type=float, default=30.0)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/appliance-node-bench"))
    parser.add_argument("--port", type=int, default=0, help="API port (default: a free one)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.volumes, args.idle = 5, 1.0
    if not args.port:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            args.port = probe.getsockname()[1]
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    try:
        result = run(args.dir, args.volumes, args.idle, args.port)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    mib = 1 << 20
    print(f"node benchmarks, {result['volumes']} volumes of 2 replicas")
    print(f"GET /healthz (reference): p50 {result['healthz']['p50_ms']:.2f} ms")
    for key, label in (("list_empty", "no volumes"), ("list_full", f"{result['volumes']} volumes")):
        info = result[key]
        print(f"GET /v1/volumes, {label}: p50 {info['p50_ms']:.2f} ms, p99 {info['p99_ms']:.2f} "
              f"ms ({info['p50_ms'] / result['healthz']['p50_ms']:.1f}x healthz)")
    print(f"appliance volume list -o json (CLI, process start included): "
          f"{result['cli_list_seconds']:.2f} s")
    print(f"volume create: {1000 * result['create_seconds_each']:.1f} ms each (API call)")
    print(f"daemon memory: {result['rss_empty'] / mib:.1f} MiB empty, "
          f"{result['rss_full'] / mib:.1f} MiB with {result['volumes']} volumes")
    print(f"volume attach to a usable device: {result['attach_seconds']:.2f} s")
    cpu = ", ".join(f"{name} {value:.2f}%" for name, value in result["idle_cpu_percent"].items())
    print(f"idle attached volume, CPU of a core: {cpu} "
          f"(total {sum(result['idle_cpu_percent'].values()):.2f}%)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

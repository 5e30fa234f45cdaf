"""CSI plugin benchmark: time from CreateVolume to a volume ready for a pod (ControllerPublish,
NodeStage, NodePublish) beside the same through the CLI (`volume create` + `volume attach`,
and mkfs + mount for a file system), and RPC latency of ListVolumes and NodeGetVolumeStats
with 100 volumes beside the API call underneath (`GET /v1/volumes`) and the gRPC floor
(Probe's round trip costs one API call too; GetPluginInfo none).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from appliance import unixsock
from appliance.csi.proto import csi_pb2 as csi
from appliance.csi.proto import csi_pb2_grpc as csi_grpc
from bench.node_bench import APPLIANCE, Daemon, latency

MIB = 1 << 20
Mode = csi.VolumeCapability.AccessMode
BLOCK = csi.VolumeCapability(block=csi.VolumeCapability.BlockVolume(),
                             access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER))
MOUNT = csi.VolumeCapability(mount=csi.VolumeCapability.MountVolume(fs_type="ext4"),
                             access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER))


class Plugin:
    def __init__(self, root: Path, daemon: Daemon, node_id: str) -> None:
        self.socket = root / "csi.sock"
        self.process = subprocess.Popen(
            [APPLIANCE, "csi", "--endpoint", f"unix://{self.socket}", "--node-id", node_id,
             "--url", daemon.url, "--token-file", str(daemon.data / "token")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(root / "plugin.log", "ab"), start_new_session=True)  # noqa: SIM115
        deadline = time.monotonic() + 30
        while not unixsock.listening(self.socket):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit("the CSI plugin did not start")
            time.sleep(0.05)
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        self.identity = csi_grpc.IdentityStub(self.channel)
        self.controller = csi_grpc.ControllerStub(self.channel)
        self.node = csi_grpc.NodeStub(self.channel)
        self.node_id = node_id

    def stop(self) -> None:
        self.channel.close()
        self.process.terminate()
        self.process.wait(timeout=30)


def csi_ready(plugin: Plugin, name: str, capability: csi.VolumeCapability,
              where: Path) -> tuple[float, Path]:
    """Seconds from CreateVolume to NodePublish's answer; the published path."""
    stage, target = where / f"{name}-stage", where / f"{name}-pod"
    started = time.perf_counter()
    volume_id = plugin.controller.CreateVolume(csi.CreateVolumeRequest(
        name=name, capacity_range=csi.CapacityRange(required_bytes=256 * MIB),
        volume_capabilities=[capability], parameters={"numberOfReplicas": "2"})).volume.volume_id
    plugin.controller.ControllerPublishVolume(csi.ControllerPublishVolumeRequest(
        volume_id=volume_id, node_id=plugin.node_id, volume_capability=capability))
    plugin.node.NodeStageVolume(csi.NodeStageVolumeRequest(
        volume_id=volume_id, staging_target_path=str(stage), volume_capability=capability))
    plugin.node.NodePublishVolume(csi.NodePublishVolumeRequest(
        volume_id=volume_id, staging_target_path=str(stage), target_path=str(target),
        volume_capability=capability))
    return time.perf_counter() - started, target


def csi_release(plugin: Plugin, name: str, where: Path) -> None:
    plugin.node.NodeUnpublishVolume(csi.NodeUnpublishVolumeRequest(
        volume_id=name, target_path=str(where / f"{name}-pod")))
    plugin.node.NodeUnstageVolume(csi.NodeUnstageVolumeRequest(
        volume_id=name, staging_target_path=str(where / f"{name}-stage")))
    plugin.controller.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(
        volume_id=name, node_id=plugin.node_id))
    plugin.controller.DeleteVolume(csi.DeleteVolumeRequest(volume_id=name))


def cli_ready(daemon: Daemon, name: str, filesystem: bool, where: Path) -> float:
    """Seconds from `volume create` to a usable device (and a mounted ext4)."""
    started = time.perf_counter()
    daemon.cli("volume", "create", name, "--size", "256M", "--replicas", "2")
    device = daemon.cli("volume", "attach", name).strip()
    if filesystem:
        mount = where / f"{name}-mnt"
        mount.mkdir()
        subprocess.run(["mkfs.ext4", "-q", device], check=True)
        subprocess.run(["mount", device, str(mount)], check=True)
    return time.perf_counter() - started


def cli_release(daemon: Daemon, name: str, where: Path) -> None:
    mount = where / f"{name}-mnt"
    if mount.exists():
        subprocess.run(["umount", str(mount)], check=True)
    daemon.cli("volume", "delete", name)


def run(root: Path, volumes: int, rounds: int, port: int) -> dict[str, Any]:
    daemon = Daemon(root, port)
    result: dict[str, Any] = {"volumes": volumes, "rounds": rounds}
    plugin = None
    work = root / "kubelet"
    work.mkdir()
    try:
        daemon.http.patch("/v1/settings",
                          json={"minimal_available_percentage": 0}).raise_for_status()
        (root / "disk2").mkdir()
        daemon.cli("disk", "add", str(root / "disk2"))
        node_id = daemon.http.get("/v1/node").json()["name"]
        plugin = Plugin(root, daemon, node_id)
        samples: dict[str, list[float]] = {k: [] for k in (
            "csi_block", "cli_block", "csi_mount", "cli_mount")}
        for index in range(rounds):  # interleaved: a drift affects both sides alike
            for capability, kind in ((BLOCK, "block"), (MOUNT, "mount")):
                name = f"csi-{kind}-{index}"
                seconds, _ = csi_ready(plugin, name, capability, work)
                samples[f"csi_{kind}"].append(seconds)
                csi_release(plugin, name, work)
                name = f"cli-{kind}-{index}"
                samples[f"cli_{kind}"].append(cli_ready(daemon, name, kind == "mount", work))
                cli_release(daemon, name, work)
        result["ready_seconds"] = {k: statistics.median(v) for k, v in samples.items()}

        for index in range(volumes):
            plugin.controller.CreateVolume(csi.CreateVolumeRequest(
                name=f"pvc-{index:03d}", capacity_range=csi.CapacityRange(
                    required_bytes=64 * MIB), volume_capabilities=[MOUNT],
                parameters={"numberOfReplicas": "2"}))
        seconds, target = csi_ready(plugin, "pvc-stats", MOUNT, work)
        stats = csi.NodeGetVolumeStatsRequest(volume_id="pvc-stats", volume_path=str(target))
        result["latency"] = {
            "GetPluginInfo": latency(lambda: plugin.identity.GetPluginInfo(
                csi.GetPluginInfoRequest()), 200),
            "GET /v1/volumes": latency(lambda: daemon.http.get("/v1/volumes"), 50),
            "ListVolumes": latency(lambda: plugin.controller.ListVolumes(
                csi.ListVolumesRequest()), 50),
            "ListVolumes page of 10": latency(lambda: plugin.controller.ListVolumes(
                csi.ListVolumesRequest(max_entries=10)), 50),
            "GET /v1/volumes/NAME": latency(lambda: daemon.http.get(
                "/v1/volumes/pvc-stats"), 100),
            "NodeGetVolumeStats": latency(lambda: plugin.node.NodeGetVolumeStats(stats), 100),
        }
        csi_release(plugin, "pvc-stats", work)
        for index in range(volumes):
            plugin.controller.DeleteVolume(csi.DeleteVolumeRequest(volume_id=f"pvc-{index:03d}"))
    finally:
        if plugin is not None:
            plugin.stop()
        for mount in sorted(work.rglob("*"), key=lambda p: len(str(p)), reverse=True):
            subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)
        daemon.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--volumes", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/appliance-csi-bench"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.volumes, args.rounds = 3, 1
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    try:
        result = run(args.dir, args.volumes, args.rounds, port)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    ready = result["ready_seconds"]
    print(f"CSI benchmarks, medians of {result['rounds']} rounds, 256 MiB volumes of 2 replicas")
    for kind, what in (("block", "a block device"), ("mount", "a mounted ext4")):
        print(f"ready for a pod, {what}: CSI CreateVolume..NodePublish {ready[f'csi_{kind}']:.2f}"
              f" s, CLI {ready[f'cli_{kind}']:.2f} s (ratio "
              f"{ready[f'csi_{kind}'] / ready[f'cli_{kind}']:.2f})")
    floor = result["latency"]["GetPluginInfo"]["p50_ms"]
    for name, value in result["latency"].items():
        print(f"{name} ({result['volumes']} volumes): p50 {value['p50_ms']:.2f} ms, "
              f"p99 {value['p99_ms']:.2f} ms ({value['p50_ms'] / floor:.1f}x GetPluginInfo)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

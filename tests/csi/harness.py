"""The CSI plugin (`appliance csi`) started as kubelet's sidecars would find it: a process
serving a unix socket, in front of a real node daemon; a gRPC client of its services; and
the flows kubelet and the external sidecars drive."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from appliance import unixsock
from appliance.csi.proto import csi_pb2 as csi
from appliance.csi.proto import csi_pb2_grpc as csi_grpc
from tests.harness import APPLIANCE, Node, wait_for

Mode = csi.VolumeCapability.AccessMode
SHARED = Path(__file__).resolve().parents[2].parent / "shared"
SANITY = SHARED / "tools" / "csi-sanity"


def mount_capability(fs_type: str = "", mode: Any = Mode.SINGLE_NODE_WRITER
                     ) -> csi.VolumeCapability:
    return csi.VolumeCapability(mount=csi.VolumeCapability.MountVolume(fs_type=fs_type),
                                access_mode=Mode(mode=mode))


def block_capability(mode: Any = Mode.SINGLE_NODE_WRITER) -> csi.VolumeCapability:
    return csi.VolumeCapability(block=csi.VolumeCapability.BlockVolume(),
                                access_mode=Mode(mode=mode))


def has_sys_resource() -> bool:
    """Whether this process may grow a mounted ext4 (CAP_SYS_RESOURCE; containers drop it)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> 24 & 1)
    return False


class Plugin:
    """`appliance csi` for *node*'s daemon, serving *mode* on a socket in *root*."""

    def __init__(self, root: Path, node: Node, node_id: str, mode: str = "all",
                 launcher: Sequence[str] = ()) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.node = node
        self.node_id = node_id
        self.mode = mode
        self.launcher = list(launcher)
        self.socket = root / "csi.sock"
        self.endpoint = f"unix://{self.socket}"
        self.log = root / "plugin.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [*self.launcher, APPLIANCE, "csi", "--endpoint", self.endpoint, "--node-id",
                 self.node_id, "--mode", self.mode, "--url", self.node.url,
                 "--token-file", str(self.node.token_file), "--wait", "60"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        wait_for(self._serving, 30, "the CSI plugin to serve its socket")
        self.channel = grpc.insecure_channel(self.endpoint)
        self.identity = csi_grpc.IdentityStub(self.channel)
        self.controller = csi_grpc.ControllerStub(self.channel)
        self.node_service = csi_grpc.NodeStub(self.channel)

    def _serving(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError("the CSI plugin exited:\n" + self.log.read_text()[-3000:])
        return unixsock.listening(self.socket)  # not a socket a killed plugin left

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)

    # -- the flows the sidecars and kubelet drive ---------------------------------------------

    def create(self, name: str, size: int = 64 << 20, capability: csi.VolumeCapability | None
               = None, parameters: dict[str, str] | None = None, **extra: Any) -> csi.Volume:
        reply = self.controller.CreateVolume(csi.CreateVolumeRequest(
            name=name, capacity_range=csi.CapacityRange(required_bytes=size),
            volume_capabilities=[capability or mount_capability()],
            parameters=parameters if parameters is not None else {"numberOfReplicas": "2"},
            **extra))
        volume: csi.Volume = reply.volume
        return volume

    def publish(self, volume_id: str, capability: csi.VolumeCapability, stage: Path,
                target: Path, node_id: str | None = None, readonly: bool = False) -> None:
        """ControllerPublish, NodeStage, NodePublish: the volume ready for a pod."""
        self.controller.ControllerPublishVolume(csi.ControllerPublishVolumeRequest(
            volume_id=volume_id, node_id=node_id or self.node_id,
            volume_capability=capability, readonly=readonly))
        self.node_service.NodeStageVolume(csi.NodeStageVolumeRequest(
            volume_id=volume_id, staging_target_path=str(stage),
            volume_capability=capability))
        self.node_service.NodePublishVolume(csi.NodePublishVolumeRequest(
            volume_id=volume_id, staging_target_path=str(stage), target_path=str(target),
            volume_capability=capability, readonly=readonly))

    def unpublish(self, volume_id: str, stage: Path, target: Path,
                  node_id: str | None = None) -> None:
        """NodeUnpublish, NodeUnstage, ControllerUnpublish: the pod is gone."""
        self.node_service.NodeUnpublishVolume(csi.NodeUnpublishVolumeRequest(
            volume_id=volume_id, target_path=str(target)))
        self.node_service.NodeUnstageVolume(csi.NodeUnstageVolumeRequest(
            volume_id=volume_id, staging_target_path=str(stage)))
        self.controller.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(
            volume_id=volume_id, node_id=node_id or self.node_id))

    def stats(self, volume_id: str, path: Path) -> Any:
        return self.node_service.NodeGetVolumeStats(csi.NodeGetVolumeStatsRequest(
            volume_id=volume_id, volume_path=str(path)))


def mounts_under(root: Path, besides: Path | None = None) -> list[str]:
    """The mount points below *root* (not below *besides*), deepest first."""
    with open("/proc/self/mountinfo") as table:
        points = [line.split()[4] for line in table]
    inside = [p for p in points if (p == str(root) or p.startswith(f"{root}/")) and not (
        besides and p.startswith(f"{besides}/"))]
    return sorted(inside, key=len, reverse=True)


def unmount_all(root: Path, besides: Path | None = None) -> None:
    """Unmount what the plugin's calls left below *root* (the daemon's own mounts, below
    *besides*, are its cleanup's)."""
    for point in mounts_under(root, besides):
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run(["umount", "-l", point], check=True, capture_output=True)


def error_of(call: Any, request: Any) -> grpc.RpcError:
    """The gRPC error *call*(*request*) fails with (AssertionError if it succeeds)."""
    try:
        call(request)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError(f"{call} succeeded where it should fail: {request}")


def run_sanity(plugin: Plugin, work: Path, access_type: str, parameters: dict[str, str],
               skip: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """csi-sanity against *plugin*; its JUnit report in *work*/junit.xml."""
    work.mkdir(parents=True, exist_ok=True)
    params_file = work / "parameters.yaml"
    params_file.write_text("".join(f'{k}: "{v}"\n' for k, v in parameters.items()))
    command = [str(SANITY), "--csi.endpoint", plugin.endpoint,
               "--csi.mountdir", str(work / "mnt"), "--csi.stagingdir", str(work / "stage"),
               "--csi.testvolumesize", str(320 << 20),
               "--csi.testvolumeexpandsize", str(512 << 20),
               "--csi.testvolumeaccesstype", access_type,
               "--csi.testvolumeparameters", str(params_file),
               "--ginkgo.junit-report", str(work / "junit.xml"), "--ginkgo.no-color"]
    for pattern in skip:
        command += ["--ginkgo.skip", pattern]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, check=False,
                          env={**os.environ, "GINKGO_NO_COLOR": "TRUE"})

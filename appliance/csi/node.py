"""The CSI Node service: the attached volume's device made usable on this node.

NodeStage finds the device of a volume that ControllerPublish attached on this node (from
the daemon: a device can change when an engine restarts, a publish context can be old),
makes a file system on it when it is blank and mounts it at the staging path; raw block
volumes skip both. NodePublish binds the staging mount (or the device file) at the pod's
target path, read-only when asked.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import grpc

from appliance.csi import capability, mounts, params
from appliance.csi.backend import Appliance, Info
from appliance.csi.config import PluginConfig
from appliance.csi.controller import condition
from appliance.csi.inflight import InFlight
from appliance.csi.params import FS_LABEL, MKFS_LABEL, TOPOLOGY_KEY
from appliance.csi.proto import csi_pb2 as csi
from appliance.csi.proto import csi_pb2_grpc as csi_grpc
from appliance.errors import FailedPrecondition, InvalidArgument, NotFound, OutOfRange
from appliance.frontend import filesystem

NodeRPC = csi.NodeServiceCapability.RPC
CAPABILITIES = (NodeRPC.STAGE_UNSTAGE_VOLUME, NodeRPC.GET_VOLUME_STATS, NodeRPC.EXPAND_VOLUME,
                NodeRPC.VOLUME_CONDITION, NodeRPC.SINGLE_NODE_MULTI_WRITER)
Usage = csi.VolumeUsage


def _required(value: str, what: str) -> str:
    if not value:
        raise InvalidArgument(f"the request has no {what}")
    return value


class Node(csi_grpc.NodeServicer):
    def __init__(self, appliance: Appliance, config: PluginConfig,
                 inflight: InFlight | None = None) -> None:
        self.appliance = appliance
        self.config = config
        self.inflight = inflight or InFlight()

    def _attached_here(self, name: str) -> tuple[Info, str]:
        """The volume and its device on this node; NotFound or FailedPrecondition."""
        info = self.appliance.volume(name)
        if info is None:
            raise NotFound(f"volume {name!r} does not exist")
        if info["state"] != "attached" or not info.get("device") or \
                info.get("node") != self.config.node_id:
            where = f"on node {info['node']}" if info.get("node") else "nowhere"
            raise FailedPrecondition(f"volume {name} is not attached on node "
                                     f"{self.config.node_id} (it is {info['state']}, "
                                     f"{where}): ControllerPublishVolume comes first")
        return info, str(info["device"])

    def NodeStageVolume(self, request: csi.NodeStageVolumeRequest,
                        context: grpc.ServicerContext) -> csi.NodeStageVolumeResponse:
        name = params.check_volume_id(request.volume_id)
        path = _required(request.staging_target_path, "staging_target_path")
        wanted = capability.check_one(request.volume_capability,
                                      request.HasField("volume_capability"))
        with self.inflight.hold(name):
            info, device = self._attached_here(name)
            if capability.is_block(wanted):
                return csi.NodeStageVolumeResponse()
            labels = info.get("labels") or {}
            fs_type = params.check_fs_type(
                wanted.mount.fs_type or request.volume_context.get("fsType")
                or labels.get(FS_LABEL) or "ext4")
            mkfs = request.volume_context.get("mkfsParams", labels.get(MKFS_LABEL, ""))
            mounts.stage(device, path, fs_type, mkfs, list(wanted.mount.mount_flags),
                         read_only=capability.read_only(wanted))
        return csi.NodeStageVolumeResponse()

    def NodeUnstageVolume(self, request: csi.NodeUnstageVolumeRequest,
                          context: grpc.ServicerContext) -> csi.NodeUnstageVolumeResponse:
        name = params.check_volume_id(request.volume_id)
        path = _required(request.staging_target_path, "staging_target_path")
        with self.inflight.hold(name):
            mounts.unmount(path, remove=False)
        return csi.NodeUnstageVolumeResponse()

    def NodePublishVolume(self, request: csi.NodePublishVolumeRequest,
                          context: grpc.ServicerContext) -> csi.NodePublishVolumeResponse:
        name = params.check_volume_id(request.volume_id)
        target = _required(request.target_path, "target_path")
        wanted = capability.check_one(request.volume_capability,
                                      request.HasField("volume_capability"))
        if not request.staging_target_path:
            raise FailedPrecondition("the request has no staging_target_path: this driver "
                                     "stages volumes (NodeStageVolume comes first)")
        read_only = request.readonly or capability.read_only(wanted)
        with self.inflight.hold(name):
            _, device = self._attached_here(name)
            if capability.single_writer(wanted):
                others = mounts.uses_of(device) - {
                    os.path.realpath(p) for p in (target, request.staging_target_path)}
                if others:
                    raise FailedPrecondition(
                        f"volume {name} is published at {', '.join(sorted(others))} with "
                        "access mode SINGLE_NODE_SINGLE_WRITER: one target path at a time")
            if capability.is_block(wanted):
                mounts.bind(device, target, block_device=device, read_only=read_only,
                            options=[])
            else:
                if not mounts.is_mount_point(request.staging_target_path):
                    raise FailedPrecondition(f"volume {name} is not staged at "
                                             f"{request.staging_target_path}: "
                                             "NodeStageVolume comes first")
                mounts.bind(request.staging_target_path, target, block_device=None,
                            read_only=read_only, options=list(wanted.mount.mount_flags))
        return csi.NodePublishVolumeResponse()

    def NodeUnpublishVolume(self, request: csi.NodeUnpublishVolumeRequest,
                            context: grpc.ServicerContext
                            ) -> csi.NodeUnpublishVolumeResponse:
        name = params.check_volume_id(request.volume_id)
        target = _required(request.target_path, "target_path")
        with self.inflight.hold(name):
            mounts.unmount(target, remove=True)
        return csi.NodeUnpublishVolumeResponse()

    def NodeGetVolumeStats(self, request: csi.NodeGetVolumeStatsRequest,
                           context: grpc.ServicerContext) -> csi.NodeGetVolumeStatsResponse:
        name = params.check_volume_id(request.volume_id)
        path = _required(request.volume_path, "volume_path")
        info = self.appliance.volume(name)
        if info is None:
            raise NotFound(f"volume {name!r} does not exist")
        try:
            mode = Path(path).stat().st_mode
        except FileNotFoundError:
            raise NotFound(f"volume path {path} does not exist") from None
        if stat.S_ISBLK(mode):
            usage = [Usage(unit=Usage.BYTES, total=mounts.block_size(path))]
        else:
            if not mounts.is_mount_point(path):
                raise NotFound(f"volume {name} is not mounted at {path}")
            fs = os.statvfs(path)
            usage = [Usage(unit=Usage.BYTES, total=fs.f_blocks * fs.f_frsize,
                           available=fs.f_bavail * fs.f_frsize,
                           used=(fs.f_blocks - fs.f_bfree) * fs.f_frsize),
                     Usage(unit=Usage.INODES, total=fs.f_files, available=fs.f_favail,
                           used=fs.f_files - fs.f_ffree)]
        return csi.NodeGetVolumeStatsResponse(usage=usage, volume_condition=condition(info))

    def NodeExpandVolume(self, request: csi.NodeExpandVolumeRequest,
                         context: grpc.ServicerContext) -> csi.NodeExpandVolumeResponse:
        name = params.check_volume_id(request.volume_id)
        path = _required(request.volume_path, "volume_path")
        with self.inflight.hold(name):
            _, device = self._attached_here(name)
            size = mounts.block_size(device)
            required = request.capacity_range.required_bytes
            if required and size < required:
                raise OutOfRange(f"volume {name}'s device is {size} bytes, less than the "
                                 f"{required} asked for: ControllerExpandVolume comes first")
            block = request.HasField("volume_capability") and \
                capability.is_block(request.volume_capability)
            try:
                mode = Path(path).stat().st_mode
            except FileNotFoundError:
                raise NotFound(f"volume path {path} does not exist") from None
            if not block and not stat.S_ISBLK(mode):
                if not mounts.is_mount_point(path):
                    raise NotFound(f"volume {name} is not mounted at {path}")
                filesystem.grow(device, f"NodeExpandVolume of volume {name}",
                                "run the node plugin privileged (the DaemonSet does)")
        return csi.NodeExpandVolumeResponse(capacity_bytes=size)

    def NodeGetCapabilities(self, request: csi.NodeGetCapabilitiesRequest,
                            context: grpc.ServicerContext) -> csi.NodeGetCapabilitiesResponse:
        return csi.NodeGetCapabilitiesResponse(capabilities=[
            csi.NodeServiceCapability(rpc=NodeRPC(type=kind)) for kind in CAPABILITIES])

    def NodeGetInfo(self, request: csi.NodeGetInfoRequest,
                    context: grpc.ServicerContext) -> csi.NodeGetInfoResponse:
        """This node, once its daemon confirms the name (kubelet registers the plugin with
        it: a wrong --node-id fails here, not at every NodeStage)."""
        daemon = str(self.appliance.node()["name"])
        if daemon != self.config.node_id:
            raise FailedPrecondition(
                f"--node-id {self.config.node_id} is not the node of the daemon at "
                f"{self.appliance.client.url}, which is {daemon}: give the appliance node's "
                "name (in Kubernetes, the node's name must be the appliance node's)")
        return csi.NodeGetInfoResponse(
            node_id=self.config.node_id,
            accessible_topology=csi.Topology(segments={TOPOLOGY_KEY: self.config.node_id}))

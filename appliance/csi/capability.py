"""Which volume capabilities the driver serves: one node at a time (RWO, RWOP), as a
mounted ext4/ext3/xfs file system or as a raw block device. Volumes shared by many nodes
(RWX) are the NFS frontend's, not this driver's."""

from __future__ import annotations

from collections.abc import Iterable

from appliance.csi.params import check_fs_type
from appliance.csi.proto import csi_pb2 as csi
from appliance.errors import InvalidArgument, UsageError

Mode = csi.VolumeCapability.AccessMode
SUPPORTED_MODES = {Mode.SINGLE_NODE_WRITER, Mode.SINGLE_NODE_READER_ONLY,
                   Mode.SINGLE_NODE_SINGLE_WRITER, Mode.SINGLE_NODE_MULTI_WRITER}


def problem(capability: csi.VolumeCapability) -> str | None:
    """Why *capability* is not served, or None."""
    kind = capability.WhichOneof("access_type")
    if kind is None:
        return "a volume capability has neither block nor mount access type"
    if kind == "mount" and capability.mount.fs_type:
        try:
            check_fs_type(capability.mount.fs_type, "mount fs_type")
        except UsageError as exc:
            return exc.message
    if not capability.HasField("access_mode"):
        return "a volume capability has no access mode"
    mode = capability.access_mode.mode
    if mode not in SUPPORTED_MODES:
        named = csi.VolumeCapability.AccessMode.Mode.Name(mode)
        return (f"access mode {named} is not supported: volumes attach to one node at a "
                "time (SINGLE_NODE_*); share a volume between nodes over NFS")
    return None


def check(capabilities: Iterable[csi.VolumeCapability], what: str = "volume_capabilities"
          ) -> list[csi.VolumeCapability]:
    """*capabilities* if there are some and each is served; InvalidArgument naming the
    problem otherwise."""
    given = list(capabilities)
    if not given:
        raise InvalidArgument(f"the request has no {what}")
    for capability in given:
        reason = problem(capability)
        if reason:
            raise InvalidArgument(reason)
    return given


def check_one(capability: csi.VolumeCapability, present: bool) -> csi.VolumeCapability:
    if not present:
        raise InvalidArgument("the request has no volume_capability")
    return check([capability], "volume_capability")[0]


def is_block(capability: csi.VolumeCapability) -> bool:
    kind: str | None = capability.WhichOneof("access_type")
    return kind == "block"


def read_only(capability: csi.VolumeCapability) -> bool:
    return capability.access_mode.mode == int(Mode.SINGLE_NODE_READER_ONLY)


def single_writer(capability: csi.VolumeCapability) -> bool:
    """Whether the volume may be published at one target path only (ReadWriteOncePod)."""
    return capability.access_mode.mode == int(Mode.SINGLE_NODE_SINGLE_WRITER)

"""What kubelet and the sidecars do with a volume, driven through the plugin's gRPC
services against a real node daemon: provision, attach, format, mount, write, move,
expand, snapshot, clone, restore."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import grpc

from appliance.csi.proto import csi_pb2 as csi
from tests.csi.harness import (
    Plugin,
    block_capability,
    error_of,
    has_sys_resource,
    mount_capability,
    mounts_under,
)
from tests.harness import Node, wait_for

MIB = 1 << 20


def write_files(directory: Path, count: int = 4) -> dict[str, str]:
    """Files of random bytes in *directory*, synced; their SHA-256 by name."""
    digests = {}
    for index in range(count):
        data = os.urandom(256 << 10)
        path = directory / f"file-{index}"
        with open(path, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        digests[path.name] = hashlib.sha256(data).hexdigest()
    return digests


def read_files(directory: Path, names: list[str]) -> dict[str, str]:
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
            for name in names}


def test_mounted_volume_keeps_its_files_across_unpublish_and_publish(
        plugin: Plugin, node: Node, tmp_path: Path) -> None:
    capability = mount_capability("ext4")
    volume = plugin.create("pvc-0c9e1f7a-files", capability=capability)
    assert volume.volume_id == "pvc-0c9e1f7a-files"
    assert volume.capacity_bytes == 64 * MIB
    stage, target = tmp_path / "stage", tmp_path / "pods" / "a" / "volume"
    plugin.publish(volume.volume_id, capability, stage, target)
    assert node.volume(volume.volume_id)["state"] == "attached"
    digests = write_files(target)
    stats = plugin.stats(volume.volume_id, target)
    by_unit = {u.unit: u for u in stats.usage}
    assert by_unit[csi.VolumeUsage.BYTES].used >= 1 * MIB  # the files
    assert by_unit[csi.VolumeUsage.INODES].used >= 4
    assert not stats.volume_condition.abnormal

    plugin.unpublish(volume.volume_id, stage, target)
    assert not target.exists(), "NodeUnpublish leaves no target path behind"
    assert mounts_under(tmp_path, node.data) == []
    assert node.volume(volume.volume_id)["state"] == "detached"

    again = tmp_path / "pods" / "b" / "volume"
    plugin.publish(volume.volume_id, capability, stage, again)
    assert read_files(again, list(digests)) == digests  # not formatted again
    plugin.unpublish(volume.volume_id, stage, again)
    plugin.controller.DeleteVolume(csi.DeleteVolumeRequest(volume_id=volume.volume_id))
    names = [v["name"] for v in json.loads(node.cli("volume", "list", "-o", "json").stdout)]
    assert volume.volume_id not in names


def test_read_only_publish_cannot_write(plugin: Plugin, tmp_path: Path) -> None:
    capability = mount_capability("ext4")
    volume = plugin.create("pvc-ro", capability=capability)
    stage = tmp_path / "stage"
    plugin.publish(volume.volume_id, capability, stage, tmp_path / "rw")
    write_files(tmp_path / "rw", 1)
    reader = tmp_path / "ro"
    plugin.node_service.NodePublishVolume(csi.NodePublishVolumeRequest(
        volume_id=volume.volume_id, staging_target_path=str(stage), target_path=str(reader),
        volume_capability=capability, readonly=True))
    assert (reader / "file-0").stat().st_size == 256 << 10
    try:
        (reader / "new").write_bytes(b"x")
    except OSError as exc:
        assert exc.errno == 30  # EROFS
    else:
        raise AssertionError("a read-only publish accepted a write")


def test_block_volume_round_trip(plugin: Plugin, node: Node, tmp_path: Path) -> None:
    capability = block_capability()
    volume = plugin.create("pvc-block", size=32 * MIB, capability=capability)
    stage, target = tmp_path / "stage", tmp_path / "pods" / "a" / "dev"
    plugin.publish(volume.volume_id, capability, stage, target)
    assert target.is_block_device()
    data = os.urandom(4 * MIB)
    fd = os.open(target, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 8 * MIB)
        os.fsync(fd)
    finally:
        os.close(fd)
    stats = plugin.stats(volume.volume_id, target)
    assert stats.usage[0].total == 32 * MIB
    plugin.unpublish(volume.volume_id, stage, target)
    assert not target.exists()

    target = tmp_path / "pods" / "b" / "dev"
    plugin.publish(volume.volume_id, capability, stage, target)
    fd = os.open(target, os.O_RDONLY)
    try:
        assert os.pread(fd, len(data), 8 * MIB) == data
    finally:
        os.close(fd)
    plugin.unpublish(volume.volume_id, stage, target)


def test_expanding_a_mounted_volume_grows_its_file_system(plugin: Plugin,
                                                          tmp_path: Path) -> None:
    # ext4 grows online only with CAP_SYS_RESOURCE; xfs grows online without it
    fs_type = "ext4" if has_sys_resource() else "xfs"
    capability = mount_capability(fs_type)
    volume = plugin.create("pvc-grow", size=320 * MIB, capability=capability,
                           parameters={"numberOfReplicas": "2", "fsType": fs_type})
    stage, target = tmp_path / "stage", tmp_path / "pod"
    plugin.publish(volume.volume_id, capability, stage, target)
    digests = write_files(target)
    before = plugin.stats(volume.volume_id, target).usage[0].total

    expanded = plugin.controller.ControllerExpandVolume(csi.ControllerExpandVolumeRequest(
        volume_id=volume.volume_id, capacity_range=csi.CapacityRange(required_bytes=640 * MIB),
        volume_capability=capability))
    assert expanded.capacity_bytes == 640 * MIB and expanded.node_expansion_required
    grown = plugin.node_service.NodeExpandVolume(csi.NodeExpandVolumeRequest(
        volume_id=volume.volume_id, volume_path=str(target),
        capacity_range=csi.CapacityRange(required_bytes=640 * MIB),
        volume_capability=capability))
    assert grown.capacity_bytes == 640 * MIB
    after = plugin.stats(volume.volume_id, target).usage[0].total
    assert after > before + 250 * MIB, (before, after)
    assert read_files(target, list(digests)) == digests


def _filled_volume(plugin: Plugin, tmp_path: Path, name: str) -> tuple[str, dict[str, str]]:
    """A volume with files on ext4, unpublished again."""
    capability = mount_capability("ext4")
    volume = plugin.create(name, capability=capability)
    stage, target = tmp_path / f"{name}-stage", tmp_path / f"{name}-pod"
    plugin.publish(volume.volume_id, capability, stage, target)
    digests = write_files(target)
    plugin.unpublish(volume.volume_id, stage, target)
    return volume.volume_id, digests


def _contents(plugin: Plugin, tmp_path: Path, volume_id: str,
              names: list[str]) -> dict[str, str]:
    capability = mount_capability("ext4")
    stage, target = tmp_path / f"{volume_id}-stage", tmp_path / f"{volume_id}-pod"
    plugin.publish(volume_id, capability, stage, target)
    try:
        return read_files(target, names)
    finally:
        plugin.unpublish(volume_id, stage, target)


def test_snapshot_clone_and_their_volumes(plugin: Plugin, tmp_path: Path) -> None:
    source, digests = _filled_volume(plugin, tmp_path, "pvc-source")
    snapshot = plugin.controller.CreateSnapshot(csi.CreateSnapshotRequest(
        source_volume_id=source, name="snapshot-1a2b")).snapshot
    assert snapshot.ready_to_use and snapshot.snapshot_id == f"snap:{source}:snapshot-1a2b"
    assert snapshot.size_bytes == 64 * MIB

    from_snapshot = plugin.create("pvc-from-snap", size=128 * MIB,
                                  volume_content_source=csi.VolumeContentSource(
                                      snapshot=csi.VolumeContentSource.SnapshotSource(
                                          snapshot_id=snapshot.snapshot_id)))
    assert from_snapshot.capacity_bytes == 128 * MIB  # grown past the snapshot's size
    assert from_snapshot.content_source.snapshot.snapshot_id == snapshot.snapshot_id
    clone = plugin.create("pvc-clone", volume_content_source=csi.VolumeContentSource(
        volume=csi.VolumeContentSource.VolumeSource(volume_id=source)))
    for volume_id in (from_snapshot.volume_id, clone.volume_id):
        assert _contents(plugin, tmp_path, volume_id, list(digests)) == digests

    # the snapshot lives in the source's replicas: the source is kept while it exists
    refused = error_of(plugin.controller.DeleteVolume, csi.DeleteVolumeRequest(
        volume_id=source))
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "snapshot-1a2b" in str(refused.details())
    plugin.controller.DeleteSnapshot(csi.DeleteSnapshotRequest(
        snapshot_id=snapshot.snapshot_id))
    plugin.controller.DeleteVolume(csi.DeleteVolumeRequest(volume_id=source))


def test_backup_snapshot_restores_into_a_new_volume(plugin: Plugin, node: Node,
                                                    tmp_path: Path) -> None:
    target = tmp_path / "backups"
    target.mkdir()
    node.cli("backup-target", "set", f"file://{target}")
    source, digests = _filled_volume(plugin, tmp_path, "pvc-backed-up")
    request = csi.CreateSnapshotRequest(source_volume_id=source, name="snapshot-bak",
                                        parameters={"type": "bak"})
    first = plugin.controller.CreateSnapshot(request).snapshot
    assert first.snapshot_id.startswith("bak:backup-")

    def ready() -> bool:  # the external-snapshotter asks again until it is ready
        again = plugin.controller.CreateSnapshot(request).snapshot
        assert again.snapshot_id == first.snapshot_id
        return bool(again.ready_to_use)

    wait_for(ready, 120, "the backup to complete")
    listed = plugin.controller.ListSnapshots(csi.ListSnapshotsRequest(
        snapshot_id=first.snapshot_id)).entries
    assert [e.snapshot.source_volume_id for e in listed] == [source]
    restored = plugin.create("pvc-restored", volume_content_source=csi.VolumeContentSource(
        snapshot=csi.VolumeContentSource.SnapshotSource(snapshot_id=first.snapshot_id)))
    # a backup outlives its volume
    plugin.controller.DeleteVolume(csi.DeleteVolumeRequest(volume_id=source))
    assert _contents(plugin, tmp_path, restored.volume_id, list(digests)) == digests
    plugin.controller.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=first.snapshot_id))
    assert plugin.controller.ListSnapshots(csi.ListSnapshotsRequest(
        snapshot_id=first.snapshot_id)).entries == []


def test_create_volume_is_idempotent_and_refuses_a_different_request(
        plugin: Plugin, node: Node) -> None:
    first = plugin.create("pvc-same", size=64 * MIB)
    again = plugin.create("pvc-same", size=64 * MIB)
    assert again == first
    other_size = error_of(plugin.controller.CreateVolume, csi.CreateVolumeRequest(
        name="pvc-same", capacity_range=csi.CapacityRange(required_bytes=128 * MIB),
        volume_capabilities=[mount_capability()], parameters={"numberOfReplicas": "2"}))
    assert other_size.code() == grpc.StatusCode.ALREADY_EXISTS
    other_parameters = error_of(plugin.controller.CreateVolume, csi.CreateVolumeRequest(
        name="pvc-same", capacity_range=csi.CapacityRange(required_bytes=64 * MIB),
        volume_capabilities=[mount_capability()], parameters={"numberOfReplicas": "1"}))
    assert other_parameters.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "parameters" in str(other_parameters.details())
    # a volume an operator made is not taken over by a CreateVolume of its name
    node.cli("volume", "create", "by-hand", "--size", "64M")
    taken = error_of(plugin.controller.CreateVolume, csi.CreateVolumeRequest(
        name="by-hand", volume_capabilities=[mount_capability()]))
    assert taken.code() == grpc.StatusCode.ALREADY_EXISTS
    for _ in range(2):  # deleting twice succeeds twice
        plugin.controller.DeleteVolume(csi.DeleteVolumeRequest(volume_id=first.volume_id))


def test_storage_class_parameters_reach_the_volume(plugin: Plugin, node: Node) -> None:
    volume = plugin.create("pvc-params", parameters={
        "numberOfReplicas": "1", "diskSelector": "second", "staleReplicaTimeout": "30",
        "dataLocality": "best-effort", "fsType": "xfs", "mkfsParams": "-m reflink=0",
        "recurringJobSelector": '[{"name":"daily","isGroup":false}]',
        "csi.storage.k8s.io/pvc/name": "data", "csi.storage.k8s.io/pvc/namespace": "shop"})
    info = node.volume(volume.volume_id)
    assert info["replicas"] == 1 and info["data_locality"] == "best-effort"
    assert info["disk_tags"] == ["second"]
    assert [r["disk"] for r in info["replica_list"]] == [
        d["name"] for d in json.loads(node.cli("disk", "list", "-o", "json").stdout)
        if "second" in d["tags"]]
    labels = info["labels"]
    assert labels["k8s.pvc.name"] == "data" and labels["k8s.pvc.namespace"] == "shop"
    assert labels["csi.staleReplicaTimeout"] == "30"
    assert labels["csi.recurringJobSelector"].startswith("[{")
    assert dict(volume.volume_context) == {"fsType": "xfs", "mkfsParams": "-m reflink=0",
                                           "numberOfReplicas": "1",
                                           "dataLocality": "best-effort"}


def _mbr(size: int) -> bytes:
    """A DOS partition table with one Linux partition from 1 MiB to the end."""
    entry = bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + (2048).to_bytes(4, "little") + \
        (size // 512 - 2048).to_bytes(4, "little")
    return bytes(440) + os.urandom(4) + bytes(2) + entry + bytes(48) + b"\x55\xaa"


def test_a_device_is_formatted_only_when_blkid_finds_it_blank(plugin: Plugin,
                                                              tmp_path: Path) -> None:
    """A volume used as a raw disk with a partition table, then asked for as a file system:
    NodeStage refuses and the table stays. A read-only volume is never formatted."""
    block = block_capability()
    volume = plugin.create("pvc-disk", size=32 * MIB, capability=block).volume_id
    stage, target = tmp_path / "stage", tmp_path / "pods" / "vm" / "disk"
    plugin.publish(volume, block, stage, target)
    table = _mbr(32 * MIB)
    with open(target, "r+b") as disk:
        disk.write(table)
        os.fsync(disk.fileno())
    plugin.node_service.NodeUnpublishVolume(csi.NodeUnpublishVolumeRequest(
        volume_id=volume, target_path=str(target)))
    mount = mount_capability("ext4")
    refused = error_of(plugin.node_service.NodeStageVolume, csi.NodeStageVolumeRequest(
        volume_id=volume, staging_target_path=str(stage), volume_capability=mount))
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "dos partition table" in str(refused.details())
    plugin.publish(volume, block, stage, target)
    with open(target, "rb") as disk:
        assert disk.read(512) == table
    plugin.unpublish(volume, stage, target)

    blank = plugin.create("pvc-blank", capability=mount).volume_id
    reader = mount_capability("ext4", mode=csi.VolumeCapability.AccessMode.SINGLE_NODE_READER_ONLY)
    plugin.controller.ControllerPublishVolume(csi.ControllerPublishVolumeRequest(
        volume_id=blank, node_id=plugin.node_id, volume_capability=reader))
    refused = error_of(plugin.node_service.NodeStageVolume, csi.NodeStageVolumeRequest(
        volume_id=blank, staging_target_path=str(stage), volume_capability=reader))
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "holds no file system and the volume is read-only" in str(refused.details())
    assert subprocess.run(["blkid", "-p", plugin.node.volume(blank)["device"]],
                          capture_output=True, check=False).returncode == 2  # still blank


def test_a_second_publish_with_other_arguments_is_already_exists(plugin: Plugin,
                                                                 tmp_path: Path) -> None:
    capability = mount_capability("ext4")
    volume = plugin.create("pvc-twice", capability=capability).volume_id
    stage, target = tmp_path / "stage", tmp_path / "pod"
    plugin.publish(volume, capability, stage, target)
    same = csi.NodePublishVolumeRequest(volume_id=volume, staging_target_path=str(stage),
                                        target_path=str(target), volume_capability=capability)
    plugin.node_service.NodePublishVolume(same)  # the same again: success
    other = csi.NodePublishVolumeRequest(volume_id=volume, staging_target_path=str(stage),
                                         target_path=str(target),
                                         volume_capability=capability, readonly=True)
    refused = error_of(plugin.node_service.NodePublishVolume, other)
    assert refused.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "read-write" in str(refused.details())
    (target / "still-writable").write_text("yes")
    plugin.unpublish(volume, stage, target)

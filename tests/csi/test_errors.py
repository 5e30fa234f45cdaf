"""Bad requests get the CSI spec's error code and a message that names the problem; nothing
changes on the node."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from appliance.csi.proto import csi_pb2 as csi
from tests.csi.harness import Plugin, error_of, mount_capability
from tests.harness import Node, run

Code = grpc.StatusCode
Mode = csi.VolumeCapability.AccessMode
MIB = 1 << 20
RANGE = csi.CapacityRange(required_bytes=64 * MIB)
MOUNT = mount_capability()


def _cases(existing: str, tmp: Path) -> list[tuple[str, str, Any, Code, str]]:
    """(service, method, request, code, words of the message) for each bad request."""
    create = csi.CreateVolumeRequest
    return [
        ("controller", "CreateVolume", create(volume_capabilities=[MOUNT]),
         Code.INVALID_ARGUMENT, "needs a name"),
        ("controller", "CreateVolume", create(name="pvc-x", capacity_range=RANGE),
         Code.INVALID_ARGUMENT, "volume_capabilities"),
        ("controller", "CreateVolume", create(
            name="pvc-x", volume_capabilities=[MOUNT], parameters={"replicaCount": "3"}),
         Code.INVALID_ARGUMENT, "unknown parameter(s) replicaCount"),
        ("controller", "CreateVolume", create(
            name="pvc-x", volume_capabilities=[MOUNT], parameters={"numberOfReplicas": "9"}),
         Code.INVALID_ARGUMENT, "numberOfReplicas=9 is out of range"),
        ("controller", "CreateVolume", create(
            name="pvc-x", volume_capabilities=[MOUNT], parameters={"fsType": "btrfs"}),
         Code.INVALID_ARGUMENT, "'btrfs' is not supported"),
        ("controller", "CreateVolume", create(
            name="pvc-x", volume_capabilities=[mount_capability(
                mode=Mode.MULTI_NODE_MULTI_WRITER)]),
         Code.INVALID_ARGUMENT, "MULTI_NODE_MULTI_WRITER is not supported"),
        ("controller", "CreateVolume", create(
            name="pvc-x", volume_capabilities=[MOUNT],
            capacity_range=csi.CapacityRange(required_bytes=10 * MIB, limit_bytes=5 * MIB)),
         Code.OUT_OF_RANGE, "above limit_bytes"),
        ("controller", "CreateVolume", create(
            name="pvc-x", volume_capabilities=[MOUNT],
            capacity_range=csi.CapacityRange(limit_bytes=1000)),
         Code.OUT_OF_RANGE, "no volume size fits"),
        ("controller", "CreateVolume", create(
            name="pvc-x", volume_capabilities=[MOUNT],
            volume_content_source=csi.VolumeContentSource(
                snapshot=csi.VolumeContentSource.SnapshotSource(snapshot_id="snap:no:such"))),
         Code.NOT_FOUND, "source snapshot 'snap:no:such' does not exist"),
        ("controller", "CreateVolume", create(
            name="pvc-x", volume_capabilities=[MOUNT],
            volume_content_source=csi.VolumeContentSource(
                volume=csi.VolumeContentSource.VolumeSource(volume_id="missing"))),
         Code.NOT_FOUND, "source volume 'missing' does not exist"),
        ("controller", "CreateVolume", create(
            name="pvc-x", volume_capabilities=[MOUNT],
            capacity_range=csi.CapacityRange(limit_bytes=32 * MIB),
            volume_content_source=csi.VolumeContentSource(
                volume=csi.VolumeContentSource.VolumeSource(volume_id=existing))),
         Code.OUT_OF_RANGE, "more than limit_bytes"),
        ("controller", "DeleteVolume", csi.DeleteVolumeRequest(), Code.INVALID_ARGUMENT,
         "no volume_id"),
        ("controller", "ControllerPublishVolume", csi.ControllerPublishVolumeRequest(
            node_id="x", volume_capability=MOUNT), Code.INVALID_ARGUMENT, "no volume_id"),
        ("controller", "ControllerPublishVolume", csi.ControllerPublishVolumeRequest(
            volume_id=existing, volume_capability=MOUNT), Code.INVALID_ARGUMENT, "no node_id"),
        ("controller", "ControllerPublishVolume", csi.ControllerPublishVolumeRequest(
            volume_id=existing, node_id="x"), Code.INVALID_ARGUMENT, "no volume_capability"),
        ("controller", "ControllerPublishVolume", csi.ControllerPublishVolumeRequest(
            volume_id="missing", node_id="x", volume_capability=MOUNT), Code.NOT_FOUND,
         "volume 'missing' does not exist"),
        ("controller", "ControllerPublishVolume", csi.ControllerPublishVolumeRequest(
            volume_id=existing, node_id="no-such-node", volume_capability=MOUNT),
         Code.NOT_FOUND, "node 'no-such-node' does not exist"),
        ("controller", "ValidateVolumeCapabilities", csi.ValidateVolumeCapabilitiesRequest(
            volume_id="missing", volume_capabilities=[MOUNT]), Code.NOT_FOUND,
         "volume 'missing' does not exist"),
        ("controller", "ListVolumes", csi.ListVolumesRequest(starting_token="99"),
         Code.ABORTED, "starting_token '99' is not a position"),
        ("controller", "ListVolumes", csi.ListVolumesRequest(max_entries=-1),
         Code.INVALID_ARGUMENT, "max_entries -1 is negative"),
        ("controller", "ControllerExpandVolume", csi.ControllerExpandVolumeRequest(
            volume_id=existing), Code.INVALID_ARGUMENT, "no capacity_range"),
        ("controller", "ControllerExpandVolume", csi.ControllerExpandVolumeRequest(
            volume_id="missing", capacity_range=RANGE), Code.NOT_FOUND, "does not exist"),
        ("controller", "ControllerExpandVolume", csi.ControllerExpandVolumeRequest(
            volume_id=existing, capacity_range=csi.CapacityRange(required_bytes=MIB,
                                                                limit_bytes=2 * MIB)),
         Code.OUT_OF_RANGE, "volumes do not shrink"),
        ("controller", "ControllerGetVolume", csi.ControllerGetVolumeRequest(
            volume_id="missing"), Code.NOT_FOUND, "does not exist"),
        ("controller", "CreateSnapshot", csi.CreateSnapshotRequest(
            source_volume_id=existing), Code.INVALID_ARGUMENT, "needs a name"),
        ("controller", "CreateSnapshot", csi.CreateSnapshotRequest(
            name="s", source_volume_id=existing, parameters={"type": "tape"}),
         Code.INVALID_ARGUMENT, "type='tape'"),
        ("controller", "CreateSnapshot", csi.CreateSnapshotRequest(
            name="s", source_volume_id="missing"), Code.NOT_FOUND, "does not exist"),
        ("controller", "GetSnapshot", csi.GetSnapshotRequest(snapshot_id="snap:a:b"),
         Code.NOT_FOUND, "snapshot 'snap:a:b' does not exist"),
        ("controller", "ListSnapshots", csi.ListSnapshotsRequest(starting_token="x"),
         Code.ABORTED, "not a position"),
        ("node", "NodeStageVolume", csi.NodeStageVolumeRequest(
            volume_id=existing, staging_target_path=str(tmp / "s")), Code.INVALID_ARGUMENT,
         "no volume_capability"),
        ("node", "NodeStageVolume", csi.NodeStageVolumeRequest(
            volume_id=existing, volume_capability=MOUNT), Code.INVALID_ARGUMENT,
         "no staging_target_path"),
        ("node", "NodeStageVolume", csi.NodeStageVolumeRequest(
            volume_id="missing", staging_target_path=str(tmp / "s"), volume_capability=MOUNT),
         Code.NOT_FOUND, "does not exist"),
        ("node", "NodeStageVolume", csi.NodeStageVolumeRequest(
            volume_id=existing, staging_target_path=str(tmp / "s"), volume_capability=MOUNT),
         Code.FAILED_PRECONDITION, "ControllerPublishVolume comes first"),
        ("node", "NodePublishVolume", csi.NodePublishVolumeRequest(
            volume_id=existing, target_path=str(tmp / "t"), volume_capability=MOUNT),
         Code.FAILED_PRECONDITION, "no staging_target_path"),
        ("node", "NodeUnpublishVolume", csi.NodeUnpublishVolumeRequest(volume_id=existing),
         Code.INVALID_ARGUMENT, "no target_path"),
        ("node", "NodeGetVolumeStats", csi.NodeGetVolumeStatsRequest(
            volume_id=existing, volume_path=str(tmp / "nowhere")), Code.NOT_FOUND,
         "does not exist"),
        ("node", "NodeExpandVolume", csi.NodeExpandVolumeRequest(volume_id=existing),
         Code.INVALID_ARGUMENT, "no volume_path"),
    ]


def test_bad_requests_get_the_spec_code_and_a_clear_message(plugin: Plugin, node: Node,
                                                            tmp_path: Path) -> None:
    existing = plugin.create("pvc-existing").volume_id
    before = json.loads(node.cli("volume", "list", "-o", "json").stdout)
    wrong = []
    for service, method, request, code, words in _cases(existing, tmp_path):
        stub = plugin.controller if service == "controller" else plugin.node_service
        call: Callable[[Any], Any] = getattr(stub, method)
        error = error_of(call, request)
        if error.code() != code or words not in str(error.details()):
            wrong.append(f"{method}: {error.code()} {error.details()!r}, wanted {code} "
                         f"with {words!r}")
    assert not wrong, "\n".join(wrong)
    after = json.loads(node.cli("volume", "list", "-o", "json").stdout)
    assert [v["name"] for v in after] == [v["name"] for v in before]
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())


def test_an_operation_in_flight_on_a_volume_is_aborted_not_raced(plugin: Plugin) -> None:
    """Calls at once for the same volume: all but the one that came first are ABORTED (the
    spec's "operation pending"); one volume is made, and a retry gets it."""
    request = csi.CreateVolumeRequest(name="pvc-race", capacity_range=RANGE,
                                      volume_capabilities=[MOUNT],
                                      parameters={"numberOfReplicas": "2"})
    calls = [plugin.controller.CreateVolume.future(request) for _ in range(4)]
    made, aborted = [], []
    for call in calls:
        try:
            made.append(call.result().volume.volume_id)
        except grpc.RpcError as exc:
            assert exc.code() == Code.ABORTED, exc.details()
            assert "in progress" in str(exc.details())
            aborted.append(exc)
    assert made == ["pvc-race"] and len(aborted) == 3
    assert plugin.create("pvc-race").volume_id == "pvc-race"


def test_unknown_ids_are_already_gone_for_deletes(plugin: Plugin) -> None:
    """Deleting what does not exist succeeds (the spec's idempotency)."""
    plugin.controller.DeleteVolume(csi.DeleteVolumeRequest(volume_id="no-such-volume"))
    plugin.controller.DeleteVolume(csi.DeleteVolumeRequest(volume_id="not/one/of/ours"))
    plugin.controller.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id="snap:x:y"))
    plugin.controller.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id="other-driver"))
    plugin.controller.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(
        volume_id="no-such-volume", node_id="x"))


def test_the_socket_is_the_owners_and_a_second_plugin_is_refused(plugin: Plugin,
                                                                  tmp_path: Path) -> None:
    assert plugin.socket.stat().st_mode & 0o077 == 0
    second = run("csi", "--endpoint", plugin.endpoint, "--node-id", plugin.node_id,
                 "--url", plugin.node.url, "--token-file", plugin.node.token_file,
                 check=False, timeout=60)  # the same endpoint: refused
    assert second.returncode == 1
    assert f"another process serves {plugin.socket}" in second.stderr
    assert plugin.identity.GetPluginInfo(csi.GetPluginInfoRequest()).name == \
        "driver.appliance.io"


def test_a_node_id_that_is_not_the_daemons_node_is_refused(plugin: Plugin) -> None:
    """kubelet registers the node plugin with NodeGetInfo: a node id that names another
    node than the daemon's fails there, loudly, instead of at every NodeStage."""
    wrong = Plugin(plugin.root.parent / "wrong", plugin.node, "not-this-node", mode="node")
    wrong.start()
    try:
        refused = error_of(wrong.node_service.NodeGetInfo, csi.NodeGetInfoRequest())
        assert refused.code() == Code.FAILED_PRECONDITION
        assert "not-this-node" in str(refused.details())
        assert plugin.node_id in str(refused.details())
        info = plugin.node_service.NodeGetInfo(csi.NodeGetInfoRequest())
        assert info.node_id == plugin.node_id
        assert dict(info.accessible_topology.segments) == {
            "topology.appliance.io/node": plugin.node_id}
    finally:
        wrong.stop()


def test_delete_of_a_volume_in_use_is_refused_and_changes_nothing(plugin: Plugin,
                                                                  tmp_path: Path) -> None:
    capability = mount_capability("ext4")
    volume = plugin.create("pvc-in-use", capability=capability).volume_id
    stage, pod = tmp_path / "stage", tmp_path / "pod"
    plugin.publish(volume, capability, stage, pod)
    (pod / "kept").write_text("data")
    refused = error_of(plugin.controller.DeleteVolume, csi.DeleteVolumeRequest(
        volume_id=volume))
    assert refused.code() == Code.FAILED_PRECONDITION
    assert "in use" in str(refused.details()) and str(stage) in str(refused.details())
    assert (pod / "kept").read_text() == "data"
    plugin.unpublish(volume, stage, pod)
    plugin.controller.DeleteVolume(csi.DeleteVolumeRequest(volume_id=volume))

"""The node daemon (or the plugin) killed in the middle of a call: the caller's retries
converge to one volume and one mount, as the sidecars and kubelet expect."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import grpc
import httpx

from appliance.csi.proto import csi_pb2 as csi
from tests.csi.harness import Plugin, mount_capability, mounts_under
from tests.harness import Node, wait_for

MIB = 1 << 20


def _volume_stored(node: Node, name: str) -> bool:
    token = node.token_file.read_text().strip()
    try:
        answer = httpx.get(f"{node.url}/v1/volumes/{name}", timeout=2,
                           headers={"Authorization": f"Bearer {token}"})
    except httpx.HTTPError:
        return False
    return answer.status_code == 200


def test_create_volume_converges_after_the_daemon_is_killed_during_it(
        plugin: Plugin, node: Node) -> None:
    request = csi.CreateVolumeRequest(
        name="pvc-killed", capacity_range=csi.CapacityRange(required_bytes=64 * MIB),
        volume_capabilities=[mount_capability()], parameters={"numberOfReplicas": "2"})
    first = plugin.controller.CreateVolume.future(request)
    # the daemon dies as soon as the volume is stored, while its replicas are made
    wait_for(lambda: _volume_stored(node, "pvc-killed"), 30, "the volume to be stored",
             interval=0.005)
    node.stop(signal.SIGKILL)
    outcome = threading.Event()
    first.add_done_callback(lambda _: outcome.set())
    assert outcome.wait(90), "CreateVolume did not end after the daemon died"
    node.start()
    # the provisioner retries until it succeeds
    volume = plugin.controller.CreateVolume(request).volume
    assert volume.volume_id == "pvc-killed" and volume.capacity_bytes == 64 * MIB
    again = plugin.controller.CreateVolume(request).volume
    assert again == volume
    listed = json.loads(node.cli("volume", "list", "-o", "json").stdout)
    assert [v["name"] for v in listed] == ["pvc-killed"]
    assert listed[0]["state"] == "detached" and len(node.volume("pvc-killed")[
        "replica_list"]) == 2


def test_node_stage_converges_after_the_daemon_or_the_plugin_restarts(
        plugin: Plugin, node: Node, tmp_path: Path) -> None:
    capability = mount_capability("ext4")
    volume = plugin.create("pvc-stage", capability=capability).volume_id
    plugin.controller.ControllerPublishVolume(csi.ControllerPublishVolumeRequest(
        volume_id=volume, node_id=plugin.node_id, volume_capability=capability))
    stage = tmp_path / "stage"
    request = csi.NodeStageVolumeRequest(volume_id=volume, staging_target_path=str(stage),
                                         volume_capability=capability)
    node.stop(signal.SIGKILL)  # kubelet's NodeStage meets a dead daemon
    try:
        plugin.node_service.NodeStageVolume(request)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
        assert "cannot reach the appliance API" in str(exc.details())
    else:
        raise AssertionError("NodeStage succeeded without the daemon")
    assert mounts_under(tmp_path, node.data) == []
    node.start()
    plugin.node_service.NodeStageVolume(request)  # the retry
    # the plugin dies after mounting, before kubelet heard back: kubelet calls again
    assert plugin.process is not None
    plugin.process.send_signal(signal.SIGKILL)
    plugin.process.wait(timeout=30)
    plugin.stop()
    plugin.start()
    plugin.node_service.NodeStageVolume(request)
    plugin.node_service.NodeStageVolume(request)
    assert mounts_under(tmp_path, node.data) == [str(stage)]
    (stage / "written").write_text("once")
    plugin.node_service.NodeUnstageVolume(csi.NodeUnstageVolumeRequest(
        volume_id=volume, staging_target_path=str(stage)))
    assert mounts_under(tmp_path, node.data) == []

"""The plugin in a cluster whose nodes are network namespaces (tests/netns.py): a volume
published to node n1 is written there, moves to node n2 with kubelet's flow, and keeps its
files; while it is published to n1 it cannot be published to n2 (ReadWriteOnce)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from appliance.csi.proto import csi_pb2 as csi
from tests.cluster.harness import Cluster, netns_cluster
from tests.csi.harness import Plugin, error_of, mount_capability, mounts_under, unmount_all
from tests.csi.test_flow import read_files, write_files
from tests.harness import wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[tuple[Cluster, list[Plugin]]]:
    """Two namespace nodes, each with a plugin in its namespace (the one on n1 also serves
    the Controller service, as the controller Deployment would)."""
    with netns_cluster(tmp_path / "cluster", 2) as (cluster, _):
        plugins = [Plugin(tmp_path / f"csi-{node.name}", node, node.name,
                          mode="all" if node.index == 1 else "node", launcher=node.launcher)
                   for node in cluster.nodes]
        try:
            for plugin in plugins:
                plugin.start()
            yield cluster, plugins
        finally:
            for plugin in plugins:
                plugin.stop()
            unmount_all(tmp_path / "kubelet")


def test_a_volume_moves_between_nodes_with_its_files(two_nodes: tuple[Cluster, list[Plugin]],
                                                     tmp_path: Path) -> None:
    cluster, (first, second) = two_nodes
    capability = mount_capability("ext4")
    volume = first.create("pvc-moves", capability=capability).volume_id
    kubelet = tmp_path / "kubelet"
    stage1, pod1 = kubelet / "n1" / "stage", kubelet / "n1" / "pod"
    first.publish(volume, capability, stage1, pod1, node_id="n1")
    digests = write_files(pod1)

    refused = error_of(first.controller.ControllerPublishVolume,
                       csi.ControllerPublishVolumeRequest(volume_id=volume, node_id="n2",
                                                          volume_capability=capability))
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "published on node n1" in str(refused.details())
    listed = first.controller.ListVolumes(csi.ListVolumesRequest()).entries
    assert [list(e.status.published_node_ids) for e in listed] == [["n1"]]

    first.unpublish(volume, stage1, pod1, node_id="n1")
    assert mounts_under(kubelet) == []
    stage2, pod2 = kubelet / "n2" / "stage", kubelet / "n2" / "pod"
    # the controller publishes to n2; n2's own node plugin stages and publishes there
    first.controller.ControllerPublishVolume(csi.ControllerPublishVolumeRequest(
        volume_id=volume, node_id="n2", volume_capability=capability))
    assert cluster.nodes[1].volume(volume)["node"] == "n2"
    wrong_node = error_of(first.node_service.NodeStageVolume, csi.NodeStageVolumeRequest(
        volume_id=volume, staging_target_path=str(stage1), volume_capability=capability))
    assert wrong_node.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not attached on node n1" in str(wrong_node.details())
    second.node_service.NodeStageVolume(csi.NodeStageVolumeRequest(
        volume_id=volume, staging_target_path=str(stage2), volume_capability=capability))
    second.node_service.NodePublishVolume(csi.NodePublishVolumeRequest(
        volume_id=volume, staging_target_path=str(stage2), target_path=str(pod2),
        volume_capability=capability))
    assert read_files(pod2, list(digests)) == digests
    unimplemented = error_of(second.controller.ControllerUnpublishVolume,
                             csi.ControllerUnpublishVolumeRequest(volume_id=volume))
    assert unimplemented.code() == grpc.StatusCode.UNIMPLEMENTED  # a node plugin only
    second.node_service.NodeUnpublishVolume(csi.NodeUnpublishVolumeRequest(
        volume_id=volume, target_path=str(pod2)))
    second.node_service.NodeUnstageVolume(csi.NodeUnstageVolumeRequest(
        volume_id=volume, staging_target_path=str(stage2)))
    first.controller.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(
        volume_id=volume, node_id="n2"))
    assert cluster.nodes[0].volume(volume)["state"] == "detached"


def test_a_volume_moves_off_a_dead_node(two_nodes: tuple[Cluster, list[Plugin]],
                                        tmp_path: Path) -> None:
    """n1 dies with the volume published there (its daemon, engine and replica server
    killed). Kubernetes force-detaches after its timeout (ControllerUnpublish to n1, which
    cannot answer) and publishes to n2: the engine started there fences n1's, and every
    file written on n1 before it died is there."""
    cluster, (first, second) = two_nodes
    capability = mount_capability("ext4")
    volume = first.create("pvc-failover", capability=capability).volume_id
    kubelet = tmp_path / "kubelet"
    first.publish(volume, capability, kubelet / "n1" / "stage", kubelet / "n1" / "pod",
                  node_id="n1")
    digests = write_files(kubelet / "n1" / "pod")
    survivor = cluster.nodes[1]
    cluster.nodes[0].die()
    wait_for(lambda: any(n["name"] == "n1" and n["state"] == "down"
                         for n in survivor.json("node", "list")), 60, "n1 to be down")
    # the controller Deployment is rescheduled on n2
    controller = Plugin(tmp_path / "csi-controller-n2", survivor, "n2", mode="controller",
                        launcher=survivor.launcher)
    controller.start()
    try:
        controller.controller.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(
            volume_id=volume, node_id="n1"))
        assert not survivor.volume(volume)["attached"]  # asked for, carried out on n1's return
        controller.controller.ControllerPublishVolume(csi.ControllerPublishVolumeRequest(
            volume_id=volume, node_id="n2", volume_capability=capability))
        moved = survivor.volume(volume)
        assert moved["node"] == "n2" and moved["state"] == "attached"
        stage, pod = kubelet / "n2" / "stage", kubelet / "n2" / "pod"
        second.node_service.NodeStageVolume(csi.NodeStageVolumeRequest(
            volume_id=volume, staging_target_path=str(stage), volume_capability=capability))
        second.node_service.NodePublishVolume(csi.NodePublishVolumeRequest(
            volume_id=volume, staging_target_path=str(stage), target_path=str(pod),
            volume_capability=capability))
        assert read_files(pod, list(digests)) == digests
    finally:
        controller.stop()

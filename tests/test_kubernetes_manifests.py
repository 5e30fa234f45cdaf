"""The Kubernetes manifests (packaging/kubernetes/) validate offline against the schemas of
Kubernetes 1.33 (kubernetes-validate, strict: unknown fields are errors), the snapshot
class against the schema of the snapshot.storage.k8s.io/v1 CRD, and they agree with the
plugin: its driver name, its parameters, its sockets and the sidecars' rights."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from appliance.csi.params import DRIVER, parse_parameters, snapshot_type

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "packaging" / "kubernetes"
KUBERNETES = "1.33"
# the CRD's schema (kubernetes-csi/external-snapshotter, snapshot.storage.k8s.io/v1)
SNAPSHOT_CLASS = {
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "driver", "deletionPolicy"],
    "properties": {
        "apiVersion": {"const": "snapshot.storage.k8s.io/v1"},
        "kind": {"const": "VolumeSnapshotClass"},
        "metadata": {"type": "object", "required": ["name"]},
        "driver": {"type": "string"},
        "deletionPolicy": {"enum": ["Delete", "Retain"]},
        "parameters": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        found += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def validate(document: dict[str, Any]) -> None:
    if document["kind"] == "VolumeSnapshotClass":
        jsonschema.validate(document, SNAPSHOT_CLASS)
    else:
        kubernetes_validate.validate(document, KUBERNETES, strict=True)


def test_every_manifest_is_valid() -> None:
    kinds = []
    for name, document in documents():
        try:
            validate(document)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
            raise AssertionError(f"{name}: {document['kind']} is invalid: {exc}") from exc
        kinds.append(document["kind"])
    assert sorted(set(kinds)) == ["CSIDriver", "ClusterRole", "ClusterRoleBinding",
                                  "DaemonSet", "Deployment", "Namespace", "ServiceAccount",
                                  "StorageClass", "VolumeSnapshotClass"]


def test_the_validators_reject_a_broken_manifest() -> None:
    """The check can fail: a misspelt field and a wrong type are caught."""
    deployment = next(d for _, d in documents() if d["kind"] == "Deployment")
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)
    broken = copy.deepcopy(deployment)
    broken["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)
    snapshot_class = next(d for _, d in documents() if d["kind"] == "VolumeSnapshotClass")
    with pytest.raises(jsonschema.ValidationError):
        validate({**snapshot_class, "deletionPolicy": "Keep"})


def test_the_manifests_agree_with_the_plugin() -> None:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for _, document in documents():
        by_kind.setdefault(document["kind"], []).append(document)
    assert [d["metadata"]["name"] for d in by_kind["CSIDriver"]] == [DRIVER]
    for storage_class in by_kind["StorageClass"]:
        assert storage_class["provisioner"] == DRIVER
        parse_parameters(storage_class["parameters"])  # the plugin takes them
    assert sorted(snapshot_type(c["parameters"]) for c in by_kind["VolumeSnapshotClass"]) \
        == ["bak", "snap"]
    assert all(c["driver"] == DRIVER for c in by_kind["VolumeSnapshotClass"])
    for workload, mode in ((by_kind["Deployment"][0], "controller"),
                           (by_kind["DaemonSet"][0], "node")):
        pod = workload["spec"]["template"]["spec"]
        plugin = pod["containers"][0]
        assert plugin["command"] == ["appliance", "csi"]
        assert plugin["args"][:2] == ["--mode", mode]
        env = {e["name"]: e for e in plugin["env"]}
        endpoint = env["CSI_ENDPOINT"]["value"]
        assert env["NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
        socket_dir = next(m["mountPath"] for m in plugin["volumeMounts"]
                          if m["name"] in ("socket-dir", "plugin-dir"))
        assert endpoint == f"unix://{socket_dir}/csi.sock"
        for sidecar in pod["containers"][1:]:
            assert f"--csi-address={socket_dir}/csi.sock" in sidecar["args"], sidecar["name"]
        assert pod["hostNetwork"]  # the daemon's API is on the node's loopback
    node_plugin = by_kind["DaemonSet"][0]["spec"]["template"]["spec"]["containers"][0]
    assert node_plugin["securityContext"]["privileged"]
    kubelet = next(m for m in node_plugin["volumeMounts"] if m["name"] == "kubelet-dir")
    assert kubelet["mountPropagation"] == "Bidirectional"
    sidecars = {c["name"] for c in by_kind["Deployment"][0]["spec"]["template"]["spec"][
        "containers"]}
    assert {"csi-provisioner", "csi-attacher", "csi-snapshotter", "csi-resizer",
            "liveness-probe"} <= sidecars
    registrar = next(c for c in by_kind["DaemonSet"][0]["spec"]["template"]["spec"][
        "containers"] if c["name"] == "node-driver-registrar")
    assert (f"--kubelet-registration-path=/var/lib/kubelet/plugins/{DRIVER}/csi.sock"
            in registrar["args"])
    rules = {(group, resource) for role in by_kind["ClusterRole"] for rule in role["rules"]
             for group in rule["apiGroups"] for resource in rule["resources"]}
    for needed in [("", "persistentvolumes"), ("storage.k8s.io", "volumeattachments"),
                   ("snapshot.storage.k8s.io", "volumesnapshotcontents"),
                   ("", "persistentvolumeclaims/status"), ("coordination.k8s.io", "leases")]:
        assert needed in rules, needed

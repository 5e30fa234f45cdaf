"""The CSI Controller service: volumes and snapshots through the node daemon's API.

Handlers validate, call the daemon, and build the reply; errors are the project's and are
translated to gRPC status codes once, in :mod:`appliance.csi.server`.
"""

from __future__ import annotations

import calendar
import contextlib
import logging
import time
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from google.protobuf.wrappers_pb2 import Int64Value

from appliance.csi import capability, params
from appliance.csi.backend import Appliance, Info
from appliance.csi.config import PluginConfig
from appliance.csi.inflight import InFlight
from appliance.csi.params import (
    FS_LABEL,
    MKFS_LABEL,
    NAME_LABEL,
    PARAMETERS_LABEL,
    SOURCE_LABEL,
    TOPOLOGY_KEY,
)
from appliance.csi.proto import csi_pb2 as csi
from appliance.csi.proto import csi_pb2_grpc as csi_grpc
from appliance.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
)

log = logging.getLogger("appliance.csi")
RPC = csi.ControllerServiceCapability.RPC
CAPABILITIES = (RPC.CREATE_DELETE_VOLUME, RPC.PUBLISH_UNPUBLISH_VOLUME, RPC.LIST_VOLUMES,
                RPC.GET_CAPACITY, RPC.CREATE_DELETE_SNAPSHOT, RPC.LIST_SNAPSHOTS,
                RPC.CLONE_VOLUME, RPC.EXPAND_VOLUME, RPC.LIST_VOLUMES_PUBLISHED_NODES,
                RPC.VOLUME_CONDITION, RPC.GET_VOLUME, RPC.SINGLE_NODE_MULTI_WRITER,
                RPC.GET_SNAPSHOT)


def _timestamp(text: str | None) -> Timestamp:
    stamp = Timestamp()
    if text:
        with contextlib.suppress(ValueError):
            stamp.seconds = calendar.timegm(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S"))
    return stamp


def volume_context(info: Info) -> dict[str, str]:
    labels = info.get("labels") or {}
    return {"fsType": labels.get(FS_LABEL, "ext4"), "mkfsParams": labels.get(MKFS_LABEL, ""),
            "numberOfReplicas": str(info["replicas"]),
            "dataLocality": info.get("data_locality", "disabled")}


def condition(info: Info) -> csi.VolumeCondition:
    """The volume's health as CSI reports it."""
    if info.get("refusal"):
        return csi.VolumeCondition(abnormal=True, message=f"cannot be served: "
                                                          f"{info['refusal']}")
    robustness = info.get("robustness", "unknown")
    if robustness in ("degraded", "faulted"):
        return csi.VolumeCondition(abnormal=True, message=f"volume is {robustness}"
                                   + (f": {info['message']}" if info.get("message") else ""))
    return csi.VolumeCondition(abnormal=False, message=f"volume is {info['state']}"
                               + (f", {robustness}" if info["state"] == "attached" else ""))


def published_on(info: Info) -> str:
    """The node the volume is published (attached) on, or ''."""
    wanted = info.get("attached") or info["state"] in ("attaching", "attached")
    return str(info.get("node") or "") if wanted else ""


class Controller(csi_grpc.ControllerServicer):
    def __init__(self, appliance: Appliance, config: PluginConfig,
                 inflight: InFlight | None = None) -> None:
        self.appliance = appliance
        self.config = config
        self.inflight = inflight or InFlight()

    # -- replies ----------------------------------------------------------------------------

    def _volume(self, info: Info) -> csi.Volume:
        reply = csi.Volume(volume_id=info["name"], capacity_bytes=info["size"],
                           volume_context=volume_context(info))
        source = (info.get("labels") or {}).get(SOURCE_LABEL, "")
        kind, _, value = source.partition("=")
        if kind == "snapshot":
            reply.content_source.snapshot.snapshot_id = value
        elif kind == "volume":
            reply.content_source.volume.volume_id = value
        if info.get("data_locality") == "strict-local":
            reply.accessible_topology.append(
                csi.Topology(segments={TOPOLOGY_KEY: info.get("node") or self._node_name()}))
        return reply

    def _node_name(self) -> str:
        return str(self.appliance.node()["name"])

    # -- volumes ----------------------------------------------------------------------------

    def CreateVolume(self, request: csi.CreateVolumeRequest,
                     context: grpc.ServicerContext) -> csi.CreateVolumeResponse:
        name = params.volume_name(request.name)
        capability.check(request.volume_capabilities)
        wanted = params.parse_parameters(request.parameters)
        source = self._source(request)
        required, limit = request.capacity_range.required_bytes, \
            request.capacity_range.limit_bytes
        source_volume = _source_volume(source)
        with self.inflight.hold(name), contextlib.ExitStack() as held:
            if source_volume and source_volume != name:  # not deleted while it is copied
                held.enter_context(self.inflight.hold(source_volume))
            info = self.appliance.volume(name)
            if info is None:
                info = self._create(request, name, wanted, source, required, limit)
            else:
                info = self._existing(request, info, wanted, source, required, limit)
            return csi.CreateVolumeResponse(volume=self._volume(info))

    @staticmethod
    def _source(request: csi.CreateVolumeRequest) -> str:
        """The content source as ``snapshot=ID`` or ``volume=ID``, or ''."""
        if not request.HasField("volume_content_source"):
            return ""
        kind = request.volume_content_source.WhichOneof("type")
        if kind == "snapshot":
            snapshot_id = request.volume_content_source.snapshot.snapshot_id
            if not snapshot_id:
                raise InvalidArgument("the content source names no snapshot_id")
            return f"snapshot={snapshot_id}"
        if kind == "volume":
            volume_id = request.volume_content_source.volume.volume_id
            if not volume_id:
                raise InvalidArgument("the content source names no volume_id")
            return f"volume={volume_id}"
        raise InvalidArgument("the content source is neither a snapshot nor a volume")

    def _labels(self, request: csi.CreateVolumeRequest, wanted: params.VolumeParameters,
                source: str) -> dict[str, str]:
        labels = {NAME_LABEL: request.name[:256], PARAMETERS_LABEL: wanted.digest(),
                  FS_LABEL: wanted.fs_type, **dict(wanted.labels)}
        if source:
            labels[SOURCE_LABEL] = source[:256]
        if wanted.mkfs_params:
            labels[MKFS_LABEL] = wanted.mkfs_params[:256]
        if wanted.stale_replica_timeout is not None:
            labels["csi.staleReplicaTimeout"] = str(wanted.stale_replica_timeout)
        if wanted.recurring_job_selector:
            labels["csi.recurringJobSelector"] = wanted.recurring_job_selector[:256]
        return labels

    def _strict_node(self, request: csi.CreateVolumeRequest) -> str:
        """The node of a strict-local volume: the first the topology prefers."""
        requirement = request.accessibility_requirements
        for topology in [*requirement.preferred, *requirement.requisite]:
            if TOPOLOGY_KEY in topology.segments:
                return str(topology.segments[TOPOLOGY_KEY])
        return self.config.node_id

    def _create(self, request: csi.CreateVolumeRequest, name: str,
                wanted: params.VolumeParameters, source: str, required: int,
                limit: int) -> Info:
        labels = self._labels(request, wanted, source)
        copy = {"name": name, "replicas": wanted.replicas, "labels": labels,
                "disk_tags": list(wanted.disk_selector)}
        kind, _, value = source.partition("=")
        if kind == "snapshot":
            source_size = self._from_snapshot(value, copy, limit)
        elif kind == "volume":
            original = self.appliance.volume(value)
            if original is None:
                raise NotFound(f"source volume {value!r} does not exist")
            source_size = _fits_limit(int(original["size"]), limit)
            self.appliance.clone(value, copy)
        elif wanted.from_backup:
            source_size = self._restore(wanted.from_backup, copy, limit)
        else:
            size = params.capacity(required, limit)
            body: dict[str, Any] = {"name": name, "size": size, "replicas": wanted.replicas,
                                    "disk_tags": list(wanted.disk_selector),
                                    "node_tags": list(wanted.node_selector),
                                    "labels": labels, "data_locality": wanted.data_locality}
            if wanted.data_locality == "strict-local":
                body["node"] = self._strict_node(request)
            self.appliance.create_volume(body)
            return self._ready(name)
        return self._filled(name, source_size, required, limit)

    def _from_snapshot(self, snapshot_id: str, copy: dict[str, Any], limit: int) -> int:
        """Start filling the new volume from a snapshot; the snapshot's size."""
        ref = params.parse_snapshot_id(snapshot_id)
        if ref.kind == "bak":
            return self._restore(ref.name, copy, limit)
        layer = self._snapshot(ref) if ref.kind == "snap" else None
        if layer is None:
            raise NotFound(f"source snapshot {snapshot_id!r} does not exist")
        size = _fits_limit(int(layer["size"]), limit)
        self.appliance.clone(ref.volume, {**copy, "snapshot": ref.name})
        return size

    def _restore(self, backup_id: str, copy: dict[str, Any], limit: int) -> int:
        backup = self.appliance.backup(backup_id)
        if backup is None:
            raise NotFound(f"backup {backup_id!r} does not exist on the backup target")
        if backup["state"] != "complete":
            raise FailedPrecondition(f"backup {backup_id} is {backup['state']}, not complete")
        size = _fits_limit(int(backup["size"]), limit)
        self.appliance.restore(backup_id, copy)
        return size

    def _filled(self, name: str, source_size: int, required: int, limit: int) -> Info:
        """Wait for a clone or restore into *name*; grow it to the range asked for."""
        self._ready(name)
        if required > source_size:
            self.appliance.expand(name, params.capacity(required, limit))
        info = self.appliance.volume(name)
        if info is None:
            raise NotFound(f"volume {name!r} was deleted while it was made")
        return info

    def _ready(self, name: str) -> Info:
        """Volume *name* once made (its replicas created, a copy into it done)."""
        self.appliance.wait_copied(name, self.config.wait)
        info = self.appliance.volume(name)
        if info is None:
            raise NotFound(f"volume {name!r} was deleted while it was made")
        return info

    def _existing(self, request: csi.CreateVolumeRequest, info: Info,
                  wanted: params.VolumeParameters, source: str, required: int,
                  limit: int) -> Info:
        """A CreateVolume for a volume that exists: the same request again gets the same
        volume (a copy or growth it had started is finished first); another is refused."""
        name = info["name"]
        labels = info.get("labels") or {}
        if labels.get(NAME_LABEL) != request.name[:256]:
            raise AlreadyExists(f"volume {name!r} exists and was not made by CreateVolume "
                                f"{request.name!r}")
        if labels.get(PARAMETERS_LABEL) != wanted.digest():
            raise AlreadyExists(f"volume {name!r} exists with other parameters than this "
                                "request's")
        if labels.get(SOURCE_LABEL, "") != source[:256]:
            raise AlreadyExists(f"volume {name!r} exists with another content source "
                                f"({labels.get(SOURCE_LABEL) or 'none'})")
        if info["state"] == "creating":
            info = self._ready(name)
        if source or wanted.from_backup:
            if required > info["size"] and (not limit or required <= limit):
                self.appliance.expand(name, params.capacity(required, limit))
            info = self.appliance.volume(name) or info
        if not params.fits(info["size"], required, limit):
            raise AlreadyExists(f"volume {name!r} exists with size {info['size']}, outside "
                                f"the capacity range {required}..{limit or 'unlimited'}")
        return info

    def DeleteVolume(self, request: csi.DeleteVolumeRequest,
                     context: grpc.ServicerContext) -> csi.DeleteVolumeResponse:
        """Delete the volume. One still attached (left on a node that was down when it was
        unpublished) goes too, unless its device is mounted or open there: the daemon
        refuses that, naming the mount (FAILED_PRECONDITION)."""
        if not request.volume_id:
            raise InvalidArgument("the request has no volume_id")
        name = request.volume_id
        with self.inflight.hold(name):
            info = self.appliance.volume(name) if _plausible(name) else None
            if info is None:
                return csi.DeleteVolumeResponse()  # already gone: success
            layers = [] if info["deleting"] else self.appliance.snapshots(name)
            # (None: they cannot be listed now; docs/kubernetes.md "Limits")
            kept = [s["name"] for s in layers or [] if NAME_LABEL in (s.get("labels") or {})]
            if kept:
                raise FailedPrecondition(
                    f"volume {name} has snapshots {', '.join(kept[:5])}: its snapshots live "
                    "in its replicas; delete them first (or back the volume up with a "
                    "snapshot class of type bak, which outlives it)")
            self.appliance.delete_volume(name, self.config.wait)
        return csi.DeleteVolumeResponse()

    def ControllerPublishVolume(self, request: csi.ControllerPublishVolumeRequest,
                                context: grpc.ServicerContext
                                ) -> csi.ControllerPublishVolumeResponse:
        name = params.check_volume_id(request.volume_id)
        if not request.node_id:
            raise InvalidArgument("the request has no node_id")
        capability.check_one(request.volume_capability, request.HasField("volume_capability"))
        with self.inflight.hold(name):
            info = self.appliance.volume(name)
            if info is None:
                raise NotFound(f"volume {name!r} does not exist")
            if self.appliance.node_state(request.node_id) is None:
                raise NotFound(f"node {request.node_id!r} does not exist")
            node = published_on(info)
            moved = bool(node) and node != request.node_id
            if moved and self.appliance.node_state(node) != "down":
                raise FailedPrecondition(f"volume {name} is published on node {node}; it "
                                         "is attached to one node at a time")
            # its node is down (it was unpublished from there without an answer): the
            # engine started on the new node fences the old one, which writes no more
            attached = self.appliance.attach(name, request.node_id, self.config.wait,
                                             force=moved)
        return csi.ControllerPublishVolumeResponse(
            publish_context={"device": str(attached["device"])})

    def ControllerUnpublishVolume(self,
                                  request: csi.ControllerUnpublishVolumeRequest,
                                  context: grpc.ServicerContext
                                  ) -> csi.ControllerUnpublishVolumeResponse:
        if not request.volume_id:
            raise InvalidArgument("the request has no volume_id")
        name = request.volume_id
        with self.inflight.hold(name):
            info = self.appliance.volume(name) if _plausible(name) else None
            node = published_on(info) if info else ""
            if node and (not request.node_id or node == request.node_id):
                if self.appliance.node_state(node) == "down":
                    # (Kubernetes' force-detach after a node failure) the detach is asked
                    # for and carried out when the node is back; a publish elsewhere first
                    # fences the engine there
                    self.appliance.request_detach(name)
                    log.info("volume %s: detach from node %s (down) asked for", name, node)
                else:
                    self.appliance.detach(name, self.config.wait)
        return csi.ControllerUnpublishVolumeResponse()

    def ValidateVolumeCapabilities(self,
                                   request: csi.ValidateVolumeCapabilitiesRequest,
                                   context: grpc.ServicerContext
                                   ) -> csi.ValidateVolumeCapabilitiesResponse:
        name = params.check_volume_id(request.volume_id)
        if not request.volume_capabilities:
            raise InvalidArgument("the request has no volume_capabilities")
        if self.appliance.volume(name) is None:
            raise NotFound(f"volume {name!r} does not exist")
        for item in request.volume_capabilities:
            reason = capability.problem(item)
            if reason:
                return csi.ValidateVolumeCapabilitiesResponse(message=reason)
        if request.parameters:
            params.parse_parameters(request.parameters)
        return csi.ValidateVolumeCapabilitiesResponse(
            confirmed=csi.ValidateVolumeCapabilitiesResponse.Confirmed(
                volume_context=request.volume_context,
                volume_capabilities=request.volume_capabilities,
                parameters=request.parameters))

    def ListVolumes(self, request: csi.ListVolumesRequest,
                    context: grpc.ServicerContext) -> csi.ListVolumesResponse:
        volumes = sorted(self.appliance.volumes(), key=lambda v: str(v["name"]))
        start, end, token = params.page([v["name"] for v in volumes], request.starting_token,
                                        request.max_entries)
        reply = csi.ListVolumesResponse(next_token=token)
        for info in volumes[start:end]:
            node = published_on(info)
            reply.entries.append(csi.ListVolumesResponse.Entry(
                volume=self._volume(info), status=csi.ListVolumesResponse.VolumeStatus(
                    published_node_ids=[node] if node else [],
                    volume_condition=condition(info))))
        return reply

    def ControllerGetVolume(self, request: csi.ControllerGetVolumeRequest,
                            context: grpc.ServicerContext) -> csi.ControllerGetVolumeResponse:
        name = params.check_volume_id(request.volume_id)
        info = self.appliance.volume(name)
        if info is None:
            raise NotFound(f"volume {name!r} does not exist")
        node = published_on(info)
        return csi.ControllerGetVolumeResponse(
            volume=self._volume(info), status=csi.ControllerGetVolumeResponse.VolumeStatus(
                published_node_ids=[node] if node else [], volume_condition=condition(info)))

    def GetCapacity(self, request: csi.GetCapacityRequest,
                    context: grpc.ServicerContext) -> csi.GetCapacityResponse:
        """The largest volume that placement can make now with the parameters given (each
        replica on its own disk), on the node the topology names, else anywhere."""
        for item in request.volume_capabilities:
            reason = capability.problem(item)
            if reason:
                raise InvalidArgument(reason)
        wanted = params.parse_parameters(request.parameters)
        node = request.accessible_topology.segments.get(TOPOLOGY_KEY) \
            if request.HasField("accessible_topology") else None
        settings = self.appliance.settings()
        free = []
        for disk in self.appliance.disks():
            if not disk["allow_scheduling"] or disk["eviction_requested"]:
                continue
            if node and (disk["node"] or self.config.node_id) != node:
                continue
            if not set(wanted.disk_selector) <= set(disk["tags"]):
                continue
            bound = disk["capacity"] * settings["over_provisioning_percentage"] // 100
            floor = disk["capacity"] * settings["minimal_available_percentage"] // 100
            free.append(max(0, min(bound - disk["scheduled"] - disk["storage_reserved"],
                                   disk["available"] - floor)))
        free.sort(reverse=True)
        room = free[wanted.replicas - 1] // params.MIB * params.MIB \
            if len(free) >= wanted.replicas else 0
        return csi.GetCapacityResponse(available_capacity=room,
                                       maximum_volume_size=Int64Value(value=room),
                                       minimum_volume_size=Int64Value(value=params.MIB))

    def ControllerGetCapabilities(self,
                                  request: csi.ControllerGetCapabilitiesRequest,
                                  context: grpc.ServicerContext
                                  ) -> csi.ControllerGetCapabilitiesResponse:
        return csi.ControllerGetCapabilitiesResponse(capabilities=[
            csi.ControllerServiceCapability(rpc=RPC(type=kind)) for kind in CAPABILITIES])

    def ControllerExpandVolume(self, request: csi.ControllerExpandVolumeRequest,
                               context: grpc.ServicerContext
                               ) -> csi.ControllerExpandVolumeResponse:
        name = params.check_volume_id(request.volume_id)
        if not request.HasField("capacity_range"):
            raise InvalidArgument("the request has no capacity_range")
        required, limit = request.capacity_range.required_bytes, \
            request.capacity_range.limit_bytes
        if request.HasField("volume_capability"):
            capability.check_one(request.volume_capability, True)
        block = request.HasField("volume_capability") and \
            capability.is_block(request.volume_capability)
        with self.inflight.hold(name):
            info = self.appliance.volume(name)
            if info is None:
                raise NotFound(f"volume {name!r} does not exist")
            size = int(info["size"])
            if required > size:
                size = int(self.appliance.expand(name, params.capacity(required, limit))["size"])
            elif limit and size > limit:
                raise OutOfRange(f"volume {name} is {size} bytes, above limit_bytes {limit}: "
                                 "volumes do not shrink")
        return csi.ControllerExpandVolumeResponse(capacity_bytes=size,
                                                  node_expansion_required=not block)

    # -- snapshots --------------------------------------------------------------------------

    def _snapshot(self, ref: params.SnapshotRef) -> Info | None:
        if not ref.volume or not ref.name or not _plausible(ref.volume):
            return None
        return next((s for s in self.appliance.snapshots(ref.volume) or []
                     if s["name"] == ref.name), None)

    def _snap_reply(self, volume: str, layer: Info) -> csi.Snapshot:
        return csi.Snapshot(snapshot_id=params.snapshot_id("snap", volume, layer["name"]),
                            source_volume_id=volume, size_bytes=int(layer["size"]),
                            creation_time=_timestamp(layer.get("created")), ready_to_use=True)

    @staticmethod
    def _bak_reply(backup: Info) -> csi.Snapshot:
        return csi.Snapshot(snapshot_id=params.snapshot_id("bak", backup["id"]),
                            source_volume_id=backup["volume"],
                            size_bytes=int(backup.get("size") or 0),
                            creation_time=_timestamp(backup.get("created")),
                            ready_to_use=backup["state"] == "complete")

    def CreateSnapshot(self, request: csi.CreateSnapshotRequest,
                       context: grpc.ServicerContext) -> csi.CreateSnapshotResponse:
        if not request.name:
            raise InvalidArgument("CreateSnapshot needs a name")
        volume = params.check_volume_id(request.source_volume_id)
        kind = params.snapshot_type(request.parameters)
        with self.inflight.hold(volume), self.inflight.hold(f"snapshot {request.name}"):
            if kind == "bak":
                return csi.CreateSnapshotResponse(snapshot=self._backup_for(request, volume))
            return csi.CreateSnapshotResponse(snapshot=self._snap_for(request, volume))

    def _made_as(self, name: str) -> tuple[str, Info] | None:
        """The snapshot made by CreateSnapshot *name*, on whichever volume."""
        for info in self.appliance.volumes():
            for layer in self.appliance.snapshots(info["name"]) or []:
                if (layer.get("labels") or {}).get(NAME_LABEL) == name[:256]:
                    return info["name"], layer
        return None

    def _snap_for(self, request: csi.CreateSnapshotRequest, volume: str) -> csi.Snapshot:
        if self.appliance.volume(volume) is None:
            raise NotFound(f"source volume {volume!r} does not exist")
        snapshot = params.snapshot_name(request.name, volume)
        listed = self.appliance.snapshots(volume)
        if listed is None:
            raise FailedPrecondition(f"the snapshots of volume {volume} cannot be listed now "
                                     "(it is being made, moved or deleted, or it is detached "
                                     "in a cluster); try again when it is attached")
        layers = {s["name"]: s for s in listed}
        layer = layers.get(snapshot)
        if layer is not None and (layer.get("labels") or {}).get(NAME_LABEL) == \
                request.name[:256]:
            return self._snap_reply(volume, layer)
        made = self._made_as(request.name)
        if made is not None:
            raise AlreadyExists(f"snapshot {request.name!r} exists, of volume {made[0]}, not "
                                f"of {volume}")
        if layer is not None:
            raise AlreadyExists(f"volume {volume} has a snapshot {snapshot!r} that "
                                f"CreateSnapshot {request.name!r} did not make")
        self.appliance.create_snapshot(volume, snapshot, {NAME_LABEL: request.name[:256]})
        layer = next((s for s in self.appliance.snapshots(volume) or []
                      if s["name"] == snapshot), None)
        if layer is None:
            raise NotFound(f"snapshot {snapshot} of volume {volume} vanished as it was made")
        return self._snap_reply(volume, layer)

    def _backup_for(self, request: csi.CreateSnapshotRequest, volume: str) -> csi.Snapshot:
        name = request.name[:256]
        for backup in self.appliance.backups():
            if (backup.get("labels") or {}).get(NAME_LABEL) != name:
                continue
            if backup["volume"] != volume:
                raise AlreadyExists(f"snapshot {request.name!r} exists, a backup of volume "
                                    f"{backup['volume']}, not of {volume}")
            if backup["state"] in ("failed", "cancelled"):
                self.appliance.delete_backup(backup["id"])  # forget it; back up again
                break
            return self._bak_reply(backup)
        if self.appliance.volume(volume) is None:
            raise NotFound(f"source volume {volume!r} does not exist")
        job = self.appliance.create_backup(volume, {NAME_LABEL: name})
        return self._bak_reply(job)

    def DeleteSnapshot(self, request: csi.DeleteSnapshotRequest,
                       context: grpc.ServicerContext) -> csi.DeleteSnapshotResponse:
        ref = params.parse_snapshot_id(request.snapshot_id)
        with self.inflight.hold(ref.volume or f"backup {ref.name}"):
            if ref.kind == "snap" and self._snapshot(ref) is not None:
                self.appliance.delete_snapshot(ref.volume, ref.name)
            elif ref.kind == "bak" and ref.name:
                self.appliance.delete_backup(ref.name)
        return csi.DeleteSnapshotResponse()

    def _all_snapshots(self, volume: str = "") -> list[csi.Snapshot]:
        found = []
        names = [volume] if volume else [v["name"] for v in self.appliance.volumes()]
        for name in names:
            found += [self._snap_reply(name, layer)
                      for layer in self.appliance.snapshots(name) or []]
        if self.appliance.backup_target_set():
            found += [self._bak_reply(b) for b in self.appliance.backups(volume or None)
                      if b["state"] not in ("failed", "cancelled")]
        return sorted(found, key=lambda s: s.snapshot_id)

    def ListSnapshots(self, request: csi.ListSnapshotsRequest,
                      context: grpc.ServicerContext) -> csi.ListSnapshotsResponse:
        if request.snapshot_id:
            one = self._get_snapshot(request.snapshot_id)
            found = [one] if one is not None and (
                not request.source_volume_id or one.source_volume_id ==
                request.source_volume_id) else []
        elif request.source_volume_id:
            found = self._all_snapshots(request.source_volume_id) \
                if _plausible(request.source_volume_id) else []
        else:
            found = self._all_snapshots()
        start, end, token = params.page([s.snapshot_id for s in found],
                                        request.starting_token, request.max_entries)
        return csi.ListSnapshotsResponse(
            entries=[csi.ListSnapshotsResponse.Entry(snapshot=s) for s in found[start:end]],
            next_token=token)

    def _get_snapshot(self, snapshot_id: str) -> csi.Snapshot | None:
        ref = params.parse_snapshot_id(snapshot_id)
        if ref.kind == "snap":
            layer = self._snapshot(ref)
            return self._snap_reply(ref.volume, layer) if layer is not None else None
        if ref.kind == "bak" and ref.name:
            backup = self.appliance.backup(ref.name) if self.appliance.backup_target_set() else None
            if backup is not None and backup["state"] not in ("failed", "cancelled"):
                return self._bak_reply(backup)
        return None

    def GetSnapshot(self, request: csi.GetSnapshotRequest,
                    context: grpc.ServicerContext) -> csi.GetSnapshotResponse:
        found = self._get_snapshot(request.snapshot_id)
        if found is None:
            raise NotFound(f"snapshot {request.snapshot_id!r} does not exist")
        return csi.GetSnapshotResponse(snapshot=found)


def _source_volume(source: str) -> str:
    """The volume a content source (``snapshot=ID``, ``volume=ID``) copies from, or ''."""
    kind, _, value = source.partition("=")
    if kind == "volume":
        return value
    ref = params.parse_snapshot_id(value) if kind == "snapshot" else None
    return ref.volume if ref is not None and ref.kind == "snap" else ""


def _fits_limit(size: int, limit: int) -> int:
    """*size*, a source's, if a volume of it fits under *limit*; checked before a copy."""
    if limit and size > limit:
        raise OutOfRange(f"the source holds {size} bytes, more than limit_bytes {limit}: "
                         "a volume is at least as large as its source")
    return size


def _plausible(volume_id: str) -> bool:
    """Whether *volume_id* could name a volume (an id of another driver names none)."""
    try:
        params.check_volume_id(volume_id)
    except InvalidArgument:
        return False
    return True

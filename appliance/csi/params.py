"""What the CSI plugin makes of a request's fields: StorageClass parameters, capacity
ranges, volume and snapshot ids. Pure: no gRPC, no HTTP; errors are the project's.

Ids (docs/kubernetes.md "Ids"):

* a volume's id is its name in the appliance. A CreateVolume name that is a valid volume
  name is used as it is (Kubernetes sends ``pvc-<uuid>``); any other becomes
  ``csi-<40 hex digits of its SHA-256>``, the same every time, so a retry finds it;
* a snapshot's id is ``snap:VOLUME:SNAPSHOT`` (a snapshot in the volume's chain) or
  ``bak:BACKUP`` (a backup on the backup target).
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from appliance.chain.format import check_name
from appliance.control.objects import check_tags
from appliance.errors import InvalidArgument, OutOfRange, Pending, UsageError

DRIVER = "driver.appliance.io"
TOPOLOGY_KEY = "topology.appliance.io/node"
MIB = 1 << 20
DEFAULT_SIZE = 1 << 30
MAX_ID = 128  # the spec's size limit of a string field
FILESYSTEMS = ("ext4", "ext3", "xfs")
# labels the plugin keeps on what it makes
NAME_LABEL = "csi.name"  # the CreateVolume/CreateSnapshot name
PARAMETERS_LABEL = "csi.parameters"  # SHA-256 of the parameters, to tell a retry from a clash
SOURCE_LABEL = "csi.source"  # the content source, as the request gave it
# parameters the Kubernetes sidecars add (--extra-create-metadata): kept as labels
KUBERNETES_PREFIX = "csi.storage.k8s.io/"
KUBERNETES_LABELS = {"csi.storage.k8s.io/pvc/name": "k8s.pvc.name",
                     "csi.storage.k8s.io/pvc/namespace": "k8s.pvc.namespace",
                     "csi.storage.k8s.io/pv/name": "k8s.pv.name",
                     "csi.storage.k8s.io/volumesnapshot/name": "k8s.snapshot.name",
                     "csi.storage.k8s.io/volumesnapshot/namespace": "k8s.snapshot.namespace",
                     "csi.storage.k8s.io/volumesnapshotcontent/name": "k8s.content.name"}
FS_LABEL = "csi.fsType"  # what NodeStage makes on a blank device
MKFS_LABEL = "csi.mkfsParams"
LOCALITY = ("disabled", "best-effort", "strict-local")


@dataclass(frozen=True)
class VolumeParameters:
    """A StorageClass's parameters, as Longhorn users write them."""

    replicas: int = 2
    stale_replica_timeout: int | None = None  # minutes; kept as a label for now
    from_backup: str | None = None
    data_locality: str = "disabled"
    fs_type: str = "ext4"
    mkfs_params: str = ""
    disk_selector: tuple[str, ...] = ()
    node_selector: tuple[str, ...] = ()
    recurring_job_selector: str = ""  # accepted and kept; recurring jobs come later
    labels: tuple[tuple[str, str], ...] = ()  # from the sidecars' metadata

    def digest(self) -> str:
        """What tells two requests' parameters apart (the sidecars' metadata aside)."""
        fields = asdict(self)
        del fields["labels"]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def _integer(key: str, value: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise InvalidArgument(f"parameter {key}={value!r} is not a whole number") from None
    if not low <= number <= high:
        raise InvalidArgument(f"parameter {key}={value} is out of range: {low} to {high}")
    return number


def _selector(key: str, value: str) -> tuple[str, ...]:
    tags = [tag.strip() for tag in value.split(",") if tag.strip()]
    try:
        return tuple(check_tags(tags))
    except UsageError as exc:
        raise InvalidArgument(f"parameter {key}={value!r}: {exc.message}") from None


def _locality(key: str, value: str) -> str:
    if value not in LOCALITY:
        raise InvalidArgument(f"parameter {key}={value!r}: use one of {', '.join(LOCALITY)}")
    return value


def _mkfs(key: str, value: str) -> str:
    try:
        shlex.split(value)
    except ValueError as exc:
        raise InvalidArgument(f"parameter {key}={value!r}: {exc}") from None
    return value


# StorageClass key -> (field of VolumeParameters, parser(key, value))
_PARAMETERS: dict[str, tuple[str, Callable[[str, str], object]]] = {
    "numberOfReplicas": ("replicas", lambda k, v: _integer(k, v, 1, 8)),
    "staleReplicaTimeout": ("stale_replica_timeout", lambda k, v: _integer(k, v, 0, 10**6)),
    "fromBackup": ("from_backup", lambda k, v: v.strip() or None),
    "dataLocality": ("data_locality", _locality),
    "fsType": ("fs_type", lambda k, v: check_fs_type(v, k)),
    "csi.storage.k8s.io/fstype": ("fs_type", lambda k, v: check_fs_type(v, k)),
    "mkfsParams": ("mkfs_params", _mkfs),
    "diskSelector": ("disk_selector", _selector),
    "nodeSelector": ("node_selector", _selector),
    "recurringJobSelector": ("recurring_job_selector", lambda k, v: v),
}


def parse_parameters(parameters: Mapping[str, str]) -> VolumeParameters:
    """*parameters* of a CreateVolume; InvalidArgument naming any that is unknown or bad."""
    values: dict[str, Any] = {}
    labels: list[tuple[str, str]] = []
    unknown = []
    for key, value in sorted(parameters.items()):
        if key in _PARAMETERS:
            field, parse = _PARAMETERS[key]
            values[field] = parse(key, value)
        elif key in KUBERNETES_LABELS:
            labels.append((KUBERNETES_LABELS[key], value[:256]))
        elif not key.startswith(KUBERNETES_PREFIX):
            unknown.append(key)
    if unknown:
        raise InvalidArgument(
            f"unknown parameter(s) {', '.join(unknown)}: the StorageClass may have "
            "numberOfReplicas, staleReplicaTimeout, fromBackup, dataLocality, fsType, "
            "mkfsParams, diskSelector, nodeSelector and recurringJobSelector")
    result = VolumeParameters(**values, labels=tuple(labels))
    if result.data_locality == "strict-local" and result.replicas != 1:
        raise InvalidArgument("dataLocality=strict-local keeps one replica, on the node of "
                              "the pod: set numberOfReplicas to 1")
    return result


def check_fs_type(value: str, what: str = "fsType") -> str:
    if value not in FILESYSTEMS:
        raise InvalidArgument(f"{what} {value!r} is not supported: use one of "
                              f"{', '.join(FILESYSTEMS)}")
    return value


def capacity(required: int, limit: int, *, default: int = DEFAULT_SIZE,
             minimum: int = MIB) -> int:
    """The size for a capacity range: *required* rounded up to MiB (at least *minimum*);
    without a range, *default* bounded by *limit*. OutOfRange when no multiple of a MiB
    fits the range."""
    if required < 0 or limit < 0:
        raise OutOfRange(f"capacity range {required}..{limit} has a negative bound")
    if limit and required > limit:
        raise OutOfRange(f"capacity range required_bytes {required} is above limit_bytes "
                         f"{limit}")
    if required:
        size = max(-(-required // MIB) * MIB, minimum)
    else:
        size = max(min(default, limit // MIB * MIB) if limit else default, minimum)
    if limit and size > limit:
        raise OutOfRange(f"no volume size fits the capacity range {required}..{limit}: "
                         f"sizes are whole MiB, at least {minimum} bytes")
    return size


def fits(size: int, required: int, limit: int) -> bool:
    """Whether a volume of *size* satisfies a capacity range."""
    return size >= required and (not limit or size <= limit)


def volume_name(name: str) -> str:
    """The appliance's name for the volume a CreateVolume of *name* makes."""
    if not name:
        raise InvalidArgument("CreateVolume needs a name")
    try:
        return check_name(name, "volume name")
    except UsageError:
        return "csi-" + hashlib.sha256(name.encode()).hexdigest()[:40]


def check_volume_id(volume_id: str) -> str:
    if not volume_id:
        raise InvalidArgument("the request has no volume_id")
    try:
        return check_name(volume_id, "volume name")
    except UsageError:
        raise InvalidArgument(f"volume id {volume_id[:80]!r} is not one of this driver's "
                              "(a volume name)") from None


def snapshot_name(name: str, volume: str) -> str:
    """The name in the volume's chain of the snapshot a CreateSnapshot of *name* makes."""
    if not name:
        raise InvalidArgument("CreateSnapshot needs a name")
    try:
        check_name(name, "snapshot name")
    except UsageError:
        pass
    else:
        if len(snapshot_id("snap", volume, name)) <= MAX_ID:
            return name
    return "csi-" + hashlib.sha256(name.encode()).hexdigest()[:32]


def snapshot_id(kind: str, first: str, second: str = "") -> str:
    return f"snap:{first}:{second}" if kind == "snap" else f"bak:{first}"


@dataclass(frozen=True)
class SnapshotRef:
    kind: str  # "snap" or "bak"
    volume: str = ""  # snap: the volume
    name: str = ""  # snap: the snapshot's name; bak: the backup's id


def parse_snapshot_id(value: str) -> SnapshotRef:
    """The snapshot an id names; NotFound-worthy ids that are malformed are InvalidArgument
    only when empty (an id of another driver is simply not found)."""
    if not value:
        raise InvalidArgument("the request has no snapshot_id")
    kind, _, rest = value.partition(":")
    if kind == "snap":
        volume, _, name = rest.partition(":")
        return SnapshotRef("snap", volume, name)
    return SnapshotRef("bak" if kind == "bak" else "", name=rest)


def snapshot_type(parameters: Mapping[str, str]) -> str:
    """A CreateSnapshot's ``type`` parameter: ``snap`` (default) or ``bak``."""
    unknown = sorted(k for k in parameters if k != "type" and not k.startswith(
        KUBERNETES_PREFIX))
    if unknown:
        raise InvalidArgument(f"unknown snapshot parameter(s) {', '.join(unknown)}: a "
                              "VolumeSnapshotClass may have type (snap or bak)")
    kind = parameters.get("type", "snap")
    if kind not in ("snap", "bak"):
        raise InvalidArgument(f"snapshot parameter type={kind!r}: use snap (a snapshot in "
                              "the volume) or bak (a backup to the backup target)")
    return kind


def page(items: list[str], starting_token: str, max_entries: int) -> tuple[int, int, str]:
    """The slice [start, end) of a listing of *items* (sorted) and the next token.
    InvalidArgument for a negative max_entries; Pending (ABORTED, as the spec asks) for a
    token that is no position in the listing."""
    if max_entries < 0:
        raise InvalidArgument(f"max_entries {max_entries} is negative")
    start = 0
    if starting_token:
        if not starting_token.isdigit() or int(starting_token) > len(items):
            raise Pending(f"starting_token {starting_token[:40]!r} is not a position in the "
                          f"listing ({len(items)} entries): list again from the start")
        start = int(starting_token)
    end = len(items) if not max_entries else min(len(items), start + max_entries)
    return start, end, str(end) if end < len(items) else ""

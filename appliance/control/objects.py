"""The objects the node service keeps in its state store, and their keys.

Each object has a *spec* (what the operator asked for, changed only through the API) and a
*status* (what controllers observed, changed only by them). Both are plain data: JSON in
the store, dataclasses here, decoded strictly so that a malformed entry is an error naming
the field rather than a half-used object.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from appliance.chain.format import BLOCK_SIZE, MAX_SIZE, check_labels, check_name
from appliance.errors import Corruption, InvalidArgument

T = TypeVar("T", bound="Record")
MAX_REPLICAS = 8
FRONTENDS = ("blockdev", "iscsi")
ACCESS_MODES = ("rwo", "rwx")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def check_tags(tags: list[str]) -> list[str]:
    for tag in tags:
        if not isinstance(tag, str) or not _TAG.fullmatch(tag):
            raise InvalidArgument(f"invalid tag {tag!r}: letters, digits, '.', '_', '-'")
    return sorted(set(tags))


def check_volume_size(size: int) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise InvalidArgument(f"invalid volume size {size!r}: must be a positive number of bytes")
    if size % BLOCK_SIZE:
        raise InvalidArgument(f"invalid volume size {size}: must be a multiple of "
                              f"{BLOCK_SIZE} bytes")
    if size > MAX_SIZE:
        raise InvalidArgument(f"invalid volume size {size}: larger than {MAX_SIZE} bytes")
    return size


class Record:
    """A dataclass stored as a JSON object under ``PREFIX + name``."""

    PREFIX: ClassVar[str] = "/"

    @classmethod
    def key_of(cls, name: str) -> str:
        return cls.PREFIX + name

    @property
    def key(self) -> str:
        return self.key_of(self.name)  # type: ignore[attr-defined]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload, no-any-return]

    @classmethod
    def from_dict(cls: type[T], value: dict[str, Any]) -> T:
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = set(value) - names
        if unknown:
            raise Corruption(f"{cls.__name__}: unknown field {sorted(unknown)[0]!r}")
        try:
            return cls(**value)
        except TypeError as exc:
            raise Corruption(f"{cls.__name__}: {exc}") from exc


@dataclass
class Disk(Record):
    PREFIX: ClassVar[str] = "/disks/"
    name: str
    path: str
    tags: list[str] = field(default_factory=list)
    allow_scheduling: bool = True
    storage_reserved: int = 0  # bytes kept free for other uses
    eviction_requested: bool = False  # its replicas move to other disks; it takes none
    node: str = ""  # the node it is on ("": the one node of a single-node store)
    # status, reported by its node for the others (placement on a remote disk)
    capacity: int = 0
    available: int = 0
    reported: float = 0.0  # when (seconds since the epoch); 0: never


@dataclass
class Node(Record):
    """A node of the cluster (one in single-node mode): spec set by operators (labels,
    tags, cordon), the rest by the node itself when it starts. Whether it is alive is the
    key ``NodeAlive.key_of(name)``, kept under the node's lease."""

    PREFIX: ClassVar[str] = "/nodes/"
    name: str
    address: str  # the host other nodes reach it at (its replica servers listen there)
    api: str  # HOST:PORT of its API
    version: str = ""
    labels: dict[str, str] = field(default_factory=dict)  # "zone" among them
    tags: list[str] = field(default_factory=list)
    cordoned: bool = False  # takes no new replicas
    draining: bool = False  # its replicas move to other nodes (it is cordoned too)
    joined: str = ""  # when it first registered (UTC, ISO 8601)

    @property
    def zone(self) -> str:
        return self.labels.get("zone", "")


@dataclass
class NodeAlive(Record):
    """Written by a node while it runs, under its lease: gone when the lease expires."""

    PREFIX: ClassVar[str] = "/nodes-alive/"
    name: str
    heartbeat: float  # seconds since the epoch, of the node's last heartbeat
    pid: int = 0


@dataclass
class Volume(Record):
    PREFIX: ClassVar[str] = "/volumes/"
    name: str
    size: int
    replicas: int
    created: str
    attached: bool = False  # desired: the operator wants a block device
    disk_tags: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    # where the data came from: a clone {"volume", "snapshot"}, a restore {"backup"}, or a
    # branch kept from another volume {"diverged-from", "replica", "branch"}
    source: dict[str, str] | None = None
    deleting: bool = False
    # a one-shot salvage of the next engine start: {"id": N, "from": replica name or None}
    salvage_request: dict[str, Any] | None = None
    # status, written by controllers
    state: str = "creating"  # creating, detached, attaching, attached, detaching, deleting
    robustness: str = "unknown"  # healthy, degraded, faulted, unknown
    device: str | None = None
    message: str = ""
    refusal: str = ""  # why its engine's last start was refused ("" once it serves)
    error: str = ""  # the code (errors.py) of the error in message; "" when the last pass worked
    branch: str = ""  # the current branch of its history, as its engine last reported it
    salvage: dict[str, Any] | None = None  # the last salvage of its lineage (replica names)
    salvage_done: int = 0  # the id of the last salvage request carried out
    # desired: the node its engine runs on when attached ("": the one node of a
    # single-node store); the node field of a status says where it runs
    node: str = ""
    data_locality: str = "disabled"  # disabled, best-effort, strict-local
    # status: attached by a drain (no device) while its replicas are rebuilt elsewhere
    maintenance: bool = False
    node_tags: list[str] = field(default_factory=list)
    # desired: how an attach exposes it: "blockdev" (a local block device) or "iscsi" (a
    # target on the node's portal, CHAP required: its own credentials when iscsi_chap is
    # "volume", the node's otherwise), and the initiators allowed (empty: any with CHAP)
    frontend: str = "blockdev"
    iscsi_chap: str = ""
    iscsi_initiators: list[str] = field(default_factory=list)
    # status: where the frontend serves it ({"kind": "iscsi", "portal", "iqn", "lun"})
    frontend_info: dict[str, Any] | None = None
    # desired: "rwo" (attached on one node) or "rwx" (shared over NFS: a share manager on
    # its node attaches it, makes its file system once, mounts it and exports it), and the
    # export's options: the clients allowed (addresses or CIDRs; empty: any), read-only,
    # squash ("root", "none" or "all")
    access_mode: str = "rwo"
    share_allow: list[str] = field(default_factory=list)
    share_read_only: bool = False
    share_squash: str = "root"
    # status of a shared volume: where it is exported ({"address", "port", "path",
    # "protocols"}), whether its file system was made (never made again), its port
    share_info: dict[str, Any] | None = None
    share_formatted: bool = False
    share_port: int = 0
    # desired: the recurring jobs it takes part in, by job name and by group (none of
    # either: the jobs of group "default")
    jobs: list[str] = field(default_factory=list)
    job_groups: list[str] = field(default_factory=list)
    # desired: a standby (disaster-recovery) volume follows the backups of this backup
    # volume on the target and cannot be attached until activated ("": a normal volume)
    standby_of: str = ""
    # status of a standby: the backup it holds, when it was taken, what the last update
    # restored, an update under way (docs/dr-volumes.md)
    standby: dict[str, Any] | None = None

    @property
    def pending_salvage(self) -> dict[str, Any] | None:
        """The salvage request the next engine start carries out, if any."""
        request = self.salvage_request
        return request if request and int(request["id"]) > self.salvage_done else None

    def validate(self) -> Volume:
        check_name(self.name, "volume name")
        check_volume_size(self.size)
        if not isinstance(self.replicas, int) or not 1 <= self.replicas <= MAX_REPLICAS:
            raise InvalidArgument(f"invalid replica count {self.replicas!r}: 1 to "
                                  f"{MAX_REPLICAS}")
        check_tags(self.disk_tags)
        check_labels(self.labels)
        if self.frontend not in FRONTENDS:
            raise InvalidArgument(f"unknown frontend {self.frontend!r}: "
                                  f"{' or '.join(FRONTENDS)}")
        if self.access_mode not in ACCESS_MODES:
            raise InvalidArgument(f"unknown access mode {self.access_mode!r}: "
                                  f"{' or '.join(ACCESS_MODES)}")
        return self


@dataclass
class ReplicaRecord(Record):
    """One replica of a volume: a directory on a disk, served on a port."""

    PREFIX: ClassVar[str] = "/replicas/"
    name: str  # "<volume>-<id>"
    volume: str
    disk: str
    directory: str
    port: int
    failed_at: float | None = None  # when the engine last reported it out of service
    replica_id: str | None = None  # the id in its directory (replica.json), once known
    # set while this replica is being made, by an eviction, to replace the one named: not a
    # complete copy yet (appliance/node/eviction.py)
    evicting_from: str = ""
    node: str = ""  # the node of its disk ("": the one node of a single-node store)
    host: str = ""  # that node's address, where its server listens ("": this node's)
    removing: bool = False  # replaced: its node deletes it (and then its record)

    def address(self, local_host: str) -> str:
        """``HOST:PORT`` of its server; *local_host* is this node's replica address."""
        return f"{self.host or local_host}:{self.port}"

    @classmethod
    def prefix_of(cls, volume: str) -> str:
        return f"{cls.PREFIX}{volume}-"


@dataclass
class Event(Record):
    """Something an operator should know happened to a volume (a salvage, a refused start,
    a branch kept as a volume of its own). Keys are sequence numbers, zero-padded so that
    they sort in order; only the newest ``Event.KEEP`` are kept."""

    PREFIX: ClassVar[str] = "/events/"
    KEEP: ClassVar[int] = 1000
    sequence: int
    time: str
    volume: str
    kind: str
    message: str

    @classmethod
    def key_of(cls, name: str | int) -> str:
        return f"{cls.PREFIX}{int(name):012d}"

    @property
    def key(self) -> str:
        return self.key_of(self.sequence)


@dataclass
class Settings(Record):
    PREFIX: ClassVar[str] = "/settings/"
    name: str = "global"
    over_provisioning_percentage: int = 100
    minimal_available_percentage: int = 10
    replica_soft_anti_affinity: bool = False
    replica_node_soft_anti_affinity: bool = False
    replica_replenishment_wait: float = 30.0  # seconds before a failed replica is rebuilt
    auto_salvage: bool = True  # restart a faulted engine (never accepting a loss)
    auto_failover: bool = False  # a cluster: move a down node's engines to another node
    backup_compression: str = "lz4"  # lz4, zstd or none
    backup_block_size: int = 2 << 20  # for a volume's first backup; fixed afterwards
    scrub_rate_limit: int = 100  # MiB/s a scrub reads on each replica (0: no limit)
    standby_poll_interval: float = 60.0  # seconds between looks for new backups (standbys)

    def validate(self) -> Settings:
        if self.backup_compression not in ("lz4", "zstd", "none"):
            raise InvalidArgument("backup_compression must be lz4, zstd or none")
        size = self.backup_block_size
        if not isinstance(size, int) or size & (size - 1) or not 64 << 10 <= size <= 64 << 20:
            raise InvalidArgument("backup_block_size must be a power of two from 65536 to "
                                  "67108864 bytes")
        if not 1 <= self.over_provisioning_percentage <= 10000:
            raise InvalidArgument("over_provisioning_percentage must be 1 to 10000")
        if not 0 <= self.minimal_available_percentage <= 100:
            raise InvalidArgument("minimal_available_percentage must be 0 to 100")
        if not isinstance(self.scrub_rate_limit, int) or isinstance(self.scrub_rate_limit, bool) \
                or not 0 <= self.scrub_rate_limit <= 100000:
            raise InvalidArgument("scrub_rate_limit must be 0 (no limit) to 100000 MiB/s")
        if not 1 <= self.standby_poll_interval <= 86400:
            raise InvalidArgument("standby_poll_interval must be 1 to 86400 seconds")
        if not 0 <= self.replica_replenishment_wait <= 86400:
            raise InvalidArgument("replica_replenishment_wait must be 0 to 86400 seconds")
        return self


# What each setting does, in one line: the one place `appliance settings list` and
# GET /v1/settings/definitions take it from (tests check that every setting has one).
SETTING_DESCRIPTIONS: dict[str, str] = {
    "over_provisioning_percentage": "% of a disk's capacity (less reserved) that the sizes "
                                    "of its replicas may add up to (1-10000)",
    "minimal_available_percentage": "% of a disk's capacity that must stay free for it to "
                                    "take a new replica (0-100)",
    "replica_soft_anti_affinity": "let a disk take a second replica of a volume when no "
                                  "other disk can",
    "replica_node_soft_anti_affinity": "in a cluster, let a node take a second replica of a "
                                       "volume when no other node can",
    "replica_replenishment_wait": "seconds to wait for a failed replica before rebuilding "
                                  "or replacing it (0-86400)",
    "auto_salvage": "restart a faulted engine; it serves only if no acknowledged write can "
                    "be missing",
    "auto_failover": "in a cluster, attach a volume whose engine's node is down on another "
                     "node after replica_replenishment_wait (the old engine is fenced)",
    "backup_compression": "compression of new backups: lz4, zstd or none",
    "backup_block_size": "bytes per block of a volume's first backup: a power of two, "
                         "64 KiB to 64 MiB",
    "scrub_rate_limit": "MiB/s a scrub reads on each replica, so foreground I/O keeps its "
                        "latency (0: no limit)",
    "standby_poll_interval": "seconds between looks for new backups to apply to standby "
                             "(DR) volumes (1-86400)",
}


def setting_definitions() -> list[dict[str, Any]]:
    """Every setting: ``name``, ``type`` (bool, int, float or str), ``default`` and
    ``description``."""
    defaults = Settings()
    return [{"name": f.name, "type": str(f.type), "default": getattr(defaults, f.name),
             "description": SETTING_DESCRIPTIONS[f.name]}
            for f in fields(Settings) if f.name != "name"]


TASKS = ("snapshot", "snapshot-cleanup", "snapshot-delete", "backup", "filesystem-trim",
         "scrub")
DEFAULT_GROUP = "default"
MAX_RETAIN = 250
MAX_JOB_NAME = 40  # leaves room in a snapshot name for the run's time


@dataclass
class RecurringJob(Record):
    """A task run on a cron schedule on the volumes that take part in it (by the job's
    name or one of its groups); docs/recurring-jobs.md."""

    PREFIX: ClassVar[str] = "/recurring-jobs/"
    name: str
    task: str
    cron: str
    retain: int = 1  # snapshots or backups this job keeps per volume
    concurrency: int = 1  # volumes it works on at once
    groups: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)  # put on what it makes
    created: float = 0.0  # seconds since the epoch; the first slot is after it

    def validate(self) -> RecurringJob:
        check_name(self.name, "job name")
        if len(self.name) > MAX_JOB_NAME:
            raise InvalidArgument(f"invalid job name {self.name!r}: at most {MAX_JOB_NAME} "
                                  "characters (snapshot names are made from it)")
        if self.task not in TASKS:
            raise InvalidArgument(f"unknown task {self.task!r}: one of {', '.join(TASKS)}")
        for number, what, low, high in ((self.retain, "retain", 1, MAX_RETAIN),
                                        (self.concurrency, "concurrency", 1, 64)):
            if not isinstance(number, int) or isinstance(number, bool) or \
                    not low <= number <= high:
                raise InvalidArgument(f"invalid {what} {number!r}: {low} to {high}")
        for group in self.groups:
            check_name(group, "group name")
        self.groups = sorted(set(self.groups))
        check_labels(self.labels)
        return self


@dataclass
class RecurringJobStatus(Record):
    """What a recurring job did: the last slot it ran for (or passed over, when it was
    missed more than once) and its recent runs, newest last. Written by the runner only."""

    PREFIX: ClassVar[str] = "/recurring-job-status/"
    KEEP: ClassVar[int] = 20
    name: str
    last_slot: float = 0.0
    runs: list[dict[str, Any]] = field(default_factory=list)
    failures: int = 0  # runs that failed on some volume, since the job was made


@dataclass
class Scrub(Record):
    """The last scrub of a volume (docs/scrub.md): written by the node that ran it."""

    PREFIX: ClassVar[str] = "/scrubs/"
    name: str  # the volume's
    state: str = "running"  # running, complete, failed, cancelled
    started: float = 0.0
    finished: float | None = None
    node: str = ""
    error: str = ""
    report: dict[str, Any] | None = None  # ScrubReport.as_dict once complete
    summary: str = ""


@dataclass
class Mount(Record):
    """A snapshot or a backup browsed as files on a node (docs/browse.md): its helper
    process serves the image over FUSE, a read-only loop device on it holds the file
    system, mounted read-only at ``path``."""

    PREFIX: ClassVar[str] = "/mounts/"
    name: str  # an id
    node: str
    path: str
    kind: str  # snapshot or backup
    volume: str
    snapshot: str = ""  # kind snapshot
    backup: str = ""  # kind backup
    pid: int = 0  # the helper's
    loop: str = ""
    fs_type: str = ""
    created: float = 0.0
    state: str = "mounting"  # mounting (recorded before anything is made), mounted


@dataclass
class BackupJob(Record):
    """A backup this node started that is not complete on the target (a complete backup
    is its manifest there): kept so that one that failed or was cancelled, by an operator
    or by a stop of the daemon, is reported so after a restart."""

    PREFIX: ClassVar[str] = "/backup/jobs/"
    id: str
    volume: str
    snapshot: str
    started: float  # seconds since the epoch
    finished: float | None = None
    state: str = "in-progress"  # in-progress, failed, cancelled
    error: str = ""

    @property
    def key(self) -> str:
        return self.key_of(self.id)

"""What the node's API offers, independent of HTTP: validate, change the store, let the
controller act. The REST API (api.py), and later the CSI plugin, call this."""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import trio

from appliance.chain.directory import probe_filesystem
from appliance.chain.format import check_labels, check_name
from appliance.control.objects import (
    FRONTENDS,
    Disk,
    Mount,
    Node,
    ReplicaRecord,
    Settings,
    Volume,
    check_tags,
    check_volume_size,
)
from appliance.control.scheduler import DiskState
from appliance.control.store import StateStore
from appliance.errors import (
    AlreadyExists,
    ApplianceError,
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Pending,
)
from appliance.frontend import holders
from appliance.frontend.iscsi import Credentials, check_initiators
from appliance.frontend.nfs import ExportOptions
from appliance.node import volumeops
from appliance.node.backupjobs import BackupJobs
from appliance.node.chap import GLOBAL_USER
from appliance.node.controller import Controller
from appliance.units import format_size_exact

_DISK_NAME = re.compile(r"[^A-Za-z0-9._-]+")
MIN_SHARED_SIZE = 300 << 20  # the smallest xfs file system mkfs.xfs makes


def standby_lag(standby: dict[str, Any] | None, now: float | None = None) -> float | None:
    """Seconds since the backup a standby volume holds was taken: what activating it now
    would give up (its recovery point objective, met or not); None before it holds one."""
    stamp = (standby or {}).get("recovery_point")
    if not stamp:
        return None
    taken = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    return round(max(0.0, (now or time.time()) - taken), 3)


class NodeService:
    def __init__(self, store: StateStore, controller: Controller, *,
                 backup_jobs: BackupJobs | None = None) -> None:
        self.store = store
        self.controller = controller
        self.placement = controller.placement
        self.backup_jobs = backup_jobs  # None: this node runs no backups

    # -- disks --------------------------------------------------------------------------

    async def add_disk(self, path: str, tags: list[str], node: str | None = None
                       ) -> dict[str, Any]:
        """Add directory *path* of this node as a disk (in a cluster, named after the node;
        the API sends a disk of another node to that node)."""
        tags = check_tags(tags)
        if node is not None and node != self.controller.config.node_name:
            raise InvalidArgument(f"node {node!r} is not this node "
                                  f"({self.controller.config.node_name}); "
                                  + ("'appliance node list' shows the nodes"
                                     if self.controller.config.clustered else
                                     "this daemon is a single node"))
        if not path.startswith("/"):
            raise InvalidArgument(f"disk path {path!r} must be absolute")
        config = self.controller.config
        disks = [d for d in await self._disks() if self.placement.mine(d.node)]
        resolved, known = await trio.to_thread.run_sync(self._check_disk, path,
                                                        [Path(d.path) for d in disks])
        name = _DISK_NAME.sub("-", str(resolved).strip("/")) or "root"
        if config.clustered:
            name = f"{config.node_name}-{name}"
        for disk, where in zip(disks, known, strict=True):
            if where == resolved:
                raise AlreadyExists(f"disk {path} is already added (as {disk.name})")
        disk = Disk(name, str(resolved), tags, node=config.node_name if config.clustered else "")
        await self.store.put(disk.key, disk.to_dict(), expect=0)
        await self.controller.events.record("", "disk-added", f"disk {name} at {resolved}")
        self.controller.poke()
        return await self._disk_info(disk)

    @staticmethod
    def _check_disk(path: str, disks: list[Path]) -> tuple[Path, list[Path]]:
        """Blocking (file systems answer when they do): check that directory *path* can
        hold replicas; its resolved path, and those of the *disks* already added."""
        directory = Path(path)
        if not directory.is_dir():
            raise NotFound(f"disk path {path} is not a directory")
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            probe_filesystem(fd, directory)
        finally:
            os.close(fd)
        return directory.resolve(), [disk.resolve() for disk in disks]

    async def _disks(self) -> list[Disk]:
        entries, _ = await self.store.list(Disk.PREFIX)
        return [Disk.from_dict(e.value) for e in entries]

    async def _disk_info(self, disk: Disk) -> dict[str, Any]:
        replicas = [ReplicaRecord.from_dict(e.value)
                    for e in (await self.store.list(ReplicaRecord.PREFIX))[0]]
        volumes = {v.name: v for v in await self._volumes()}
        state = (await self.placement.disk_states([disk], replicas, volumes))[disk.name]
        return self._disk_fields(disk, state, replicas)

    @staticmethod
    def _disk_fields(disk: Disk, state: DiskState,
                     replicas: list[ReplicaRecord]) -> dict[str, Any]:
        return {**disk.to_dict(), "capacity": state.capacity, "available": state.available,
                "scheduled": state.scheduled,
                "replicas": sorted(r.name for r in replicas if r.disk == disk.name)}

    async def _disk(self, name: str) -> Disk:
        entry = await self.store.get(Disk.key_of(name))
        if entry is None:
            known = ", ".join(sorted(d.name for d in await self._disks())) or "none"
            raise NotFound(f"disk {name!r} does not exist (disks: {known})")
        return Disk.from_dict(entry.value)

    async def update_disk(self, name: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Change disk *name*'s ``tags``, ``allow_scheduling`` or ``storage_reserved``
        (what later placements see; replicas on it stay), or ``eviction_requested`` (its
        replicas move to other disks: the controller does it, volume by volume)."""
        async with self.placement.lock:
            disk = await self._disk(name)
            if "tags" in changes:
                changes["tags"] = check_tags(changes["tags"])
            reserved = changes.get("storage_reserved")
            if reserved is not None and (isinstance(reserved, bool) or
                                         not isinstance(reserved, int) or reserved < 0):
                raise InvalidArgument(f"invalid storage_reserved {reserved!r}: a size in "
                                      "bytes, 0 or more")
            updated = replace(disk, **changes)
            if updated != disk:
                await self.store.put(updated.key, updated.to_dict())
                before, after = disk.to_dict(), updated.to_dict()
                said = ", ".join(f"{key} {before[key]} -> {after[key]}"
                                 for key in sorted(after) if before[key] != after[key])
                await self.controller.events.record("", "disk-updated", f"disk {name}: {said}")
        self.controller.poke()
        return await self._disk_info(updated)

    async def remove_disk(self, name: str) -> None:
        """Forget disk *name* (its directory stays); refused while it holds replicas."""
        async with self.placement.lock:  # no replica is placed on it meanwhile
            disk = await self._disk(name)
            entries, _ = await self.store.list(ReplicaRecord.PREFIX)
            held = sorted(f"{r.name} (volume {r.volume})" for r in
                          (ReplicaRecord.from_dict(e.value) for e in entries)
                          if r.disk == name)
            if held:
                raise FailedPrecondition(
                    f"disk {name} holds {len(held)} replica(s): {', '.join(held)}. Move them "
                    f"to other disks first ('disk update {name} --evict'; 'disk list' shows "
                    "when it holds none), or delete their volumes")
            await self.store.delete(disk.key)
        await self.controller.events.record("", "disk-removed", f"disk {name} at {disk.path} "
                                            "(its directory is left as it is)")
        self.controller.poke()

    async def list_disks(self) -> list[dict[str, Any]]:
        """The disks with their usage (asked side by side: a disk whose file system does
        not answer shows none, after a few seconds at most)."""
        disks = await self._disks()
        replicas = [ReplicaRecord.from_dict(e.value)
                    for e in (await self.store.list(ReplicaRecord.PREFIX))[0]]
        volumes = {v.name: v for v in await self._volumes()}
        states = await self.placement.disk_states(disks, replicas, volumes)
        return [self._disk_fields(disk, states[disk.name], replicas) for disk in disks]

    # -- nodes --------------------------------------------------------------------------

    async def drain_node(self, name: str) -> dict[str, Any]:
        """Cordon node *name* and move every replica on it to other nodes, each rebuilt
        before the one it replaces leaves (the leader does it: docs/cluster.md). Refused,
        changing nothing, when another node cannot take one of them."""
        membership = self.controller.membership
        node = await membership.node(name)
        if not self.controller.config.clustered:
            raise FailedPrecondition(f"node {name} is the only node: its replicas have "
                                     "nowhere to go")
        entries, _ = await self.store.list(ReplicaRecord.PREFIX)
        leaving = [r for r in (ReplicaRecord.from_dict(e.value) for e in entries)
                   if r.node == name and not r.removing]
        volumes = {v.name: v for v in await self._volumes()}
        if not node.cordoned:
            await membership.cordon(name, True)
        async with self.placement.lock:
            try:
                for replica in leaving:
                    volume = volumes.get(replica.volume)
                    if volume is None:
                        continue
                    staying = [r for r in await self.controller.replicas_of(volume.name)
                               if r.node != name]
                    await self.placement.plan_replicas(volume, staying, 1)  # a dry run
            except FailedPrecondition as exc:
                if not node.cordoned:
                    await membership.cordon(name, False)
                raise FailedPrecondition(f"node {name} cannot be drained: replica "
                                         f"{replica.name} of volume {replica.volume} has "
                                         f"nowhere to go: {exc}") from None
        await self.store.update(node.key, lambda value: replace(
            Node.from_dict(value), cordoned=True, draining=True).to_dict())
        await self.controller.events.record("", "node-draining",
                                            f"node {name}: {len(leaving)} replica(s) move to "
                                            "other nodes")
        self.controller.poke()
        return await membership.get(name)

    # -- volumes ------------------------------------------------------------------------

    async def _volumes(self) -> list[Volume]:
        entries, _ = await self.store.list(Volume.PREFIX)
        return [Volume.from_dict(e.value) for e in entries]

    async def _volume(self, name: str) -> tuple[Volume, int]:
        entry = await self.store.get(Volume.key_of(name))
        if entry is None:
            raise NotFound(f"volume {name!r} does not exist")
        return Volume.from_dict(entry.value), entry.revision

    async def create_volume(self, name: str, size: int, replicas: int,
                            disk_tags: list[str], labels: dict[str, str],
                            source: dict[str, str] | None = None, *,
                            first: Callable[[], Awaitable[None]] | None = None,
                            node_tags: list[str] | None = None,
                            data_locality: str = "disabled", node: str | None = None,
                            access_mode: str = "rwo", standby_of: str = "",
                            ) -> dict[str, Any]:
        """Create volume *name*; *first* (a clone's snapshot) runs once its replicas are
        placed, before anything is stored: a volume that cannot be placed changes
        nothing. A ``strict-local`` volume has one replica, on *node*, where it attaches.
        An ``rwx`` volume is shared at once (attached by its share manager, exported over
        NFS)."""
        config = self.controller.config
        if source is not None and config.clustered:
            raise FailedPrecondition("clones and restores are not available in a cluster yet: "
                                     "restore or clone on a single-node appliance")
        if data_locality == "strict-local":
            if replicas != 1:
                raise InvalidArgument("a strict-local volume has one replica (on the node of "
                                      "its engine): --replicas 1")
            node = node or config.node_name
            if config.clustered:
                await self.controller.membership.node(node)
        volume = Volume(name, size, replicas, datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                        disk_tags=disk_tags, labels=labels, source=source,
                        node_tags=check_tags(node_tags or []), data_locality=data_locality,
                        # (in a cluster, a strict-local volume's engine runs on its
                        # replica's node, an RWX volume's share on the node asked)
                        node=(node or config.node_name) if config.clustered and (
                            data_locality == "strict-local" or access_mode == "rwx") else "",
                        access_mode=access_mode, standby_of=standby_of,
                        attached=access_mode == "rwx").validate()
        if access_mode == "rwx" and size < MIN_SHARED_SIZE:
            raise InvalidArgument(f"an RWX volume holds an xfs file system: at least "
                                  f"{format_size_exact(MIN_SHARED_SIZE)} (--size 300M)")
        if not await self._disks():
            raise FailedPrecondition("no disks: add one with 'appliance disk add PATH'")
        if await self.store.get(volume.key) is not None:
            raise AlreadyExists(f"volume {name!r} already exists")
        async with self.placement.lock:  # no other placement in between
            planned = await self.placement.plan_replicas(volume, [], replicas)
            if first is not None:
                await first()
            try:
                await self.store.put(volume.key, volume.to_dict(), expect=0)
            except FailedPrecondition:
                raise AlreadyExists(f"volume {name!r} already exists") from None
            for replica in planned:
                await self.store.put(replica.key, replica.to_dict(), expect=0)
        origin = "" if source is None else " from " + ", ".join(
            f"{key} {value}" for key, value in sorted(source.items()))
        await self.controller.events.record(
            name, "created", f"{format_size_exact(size)}, {replicas} replica(s) on "
            f"{', '.join(r.disk for r in planned)}{origin}")
        self.controller.poke()
        return await self.show_volume(name)

    async def clone_volume(self, source: str, name: str, snapshot: str | None,
                           replicas: int | None, *, labels: dict[str, str] | None = None,
                           disk_tags: list[str] | None = None) -> dict[str, Any]:
        """A new volume holding snapshot *snapshot* of volume *source* (a snapshot is taken
        now when none is named); the copy runs in the background (state ``creating``).
        Its labels and disk tags are the source's unless given."""
        original, _ = await self._volume(source)
        labels = dict(original.labels) if labels is None else labels
        disk_tags = original.disk_tags if disk_tags is None else disk_tags
        check_name(name, "volume name")
        if await self.store.get(Volume.key_of(name)) is not None:
            raise AlreadyExists(f"volume {name!r} already exists")
        if snapshot is not None:
            layer = next((x for x in await self.list_snapshots(source)
                          if x["name"] == snapshot and not x["removed"]), None)
            if layer is None:
                raise NotFound(f"snapshot {snapshot!r} of volume {source!r} does not exist")
            return await self.create_volume(name, layer["size"], replicas or original.replicas,
                                            disk_tags, labels,
                                            {"volume": source, "snapshot": snapshot})
        # a snapshot taken for the clone, once its replicas are placed (a clone that cannot
        # be placed leaves no snapshot behind)
        taken = f"clone-{name}"
        made = []

        async def take() -> None:
            layer = await self.create_snapshot(source, taken, {"clone": name})
            made.append(taken)
            if layer["size"] != original.size:  # expanded meanwhile
                raise Conflict(f"volume {source!r} changed size while it was cloned; try "
                               "again")

        try:
            return await self.create_volume(name, original.size, replicas or original.replicas,
                                            disk_tags, labels,
                                            {"volume": source, "snapshot": taken}, first=take)
        except ApplianceError:
            if made:
                with contextlib.suppress(ApplianceError):  # the clone was not made: undo
                    await self.delete_snapshot(source, taken)
            raise

    async def list_volumes(self) -> list[dict[str, Any]]:
        entries, _ = await self.store.list(ReplicaRecord.PREFIX)  # one query for every volume
        by_volume: dict[str, list[ReplicaRecord]] = {}
        for entry in entries:
            replica = ReplicaRecord.from_dict(entry.value)
            by_volume.setdefault(replica.volume, []).append(replica)
        return [self._info(v, by_volume.get(v.name, [])) for v in await self._volumes()]

    async def show_volume(self, name: str) -> dict[str, Any]:
        """The volume; for an attached one each replica's mode, rebuild progress and
        diverged branch as its engine reports them, its I/O counters and latency
        histograms (``io``), and its recent history; the volumes
        that keep branches of its history that it gave up."""
        volume, _ = await self._volume(name)
        info = await self._describe(volume)
        info["branch_volumes"] = sorted(
            v.name for v in await self._volumes()
            if v.source and v.source.get("diverged-from") == name)
        if volume.state == "attached":
            status = await trio.to_thread.run_sync(
                self.controller.supervisor.engine_status, name)
            if status is None:
                return info
            names = await self.controller.names()
            modes = {r["address"]: r for r in status["replicas"]}
            for replica in info["replica_list"]:
                reported = modes.get(replica["address"], {})
                replica["mode"] = reported.get("mode")
                for key in ("rebuild", "diverged", "reason"):
                    if reported.get(key):
                        replica[key] = reported[key]
                if "reason" in replica:
                    replica["reason"] = names.text(replica["reason"])
            info["history"] = [{**branch, "cause": names.text(str(branch.get("cause")))}
                               for branch in status.get("history", [])]
            if status.get("io"):
                info["io"] = status["io"]
        return info

    async def _describe(self, volume: Volume) -> dict[str, Any]:
        return self._info(volume, await self.controller.replicas_of(volume.name))

    def _info(self, volume: Volume, replicas: list[ReplicaRecord]) -> dict[str, Any]:
        info = volume.to_dict()
        # where it is served: the target's portal and IQN, or the local device
        info["share"] = info.pop("share_info")
        served = info.pop("frontend_info")
        info["frontend"] = served or ({"kind": volume.frontend, "device": volume.device}
                                      if volume.frontend == "blockdev" and volume.device
                                      else {"kind": volume.frontend})
        if volume.name in self.controller.cloning:
            copied, total = self.controller.cloning[volume.name]
            info["progress"] = {"done_bytes": copied, "total_bytes": total}
        config = self.controller.config
        local = config.replica_address
        info["replica_list"] = [{"name": r.name, "disk": r.disk, "port": r.port,
                                 "node": r.node or config.node_name,
                                 "address": r.address(local),
                                 "directory": r.directory, "replica_id": r.replica_id}
                                for r in replicas]
        info["node"] = (volume.node or config.node_name) if volume.attached else ""
        if volume.standby is not None:
            info["standby"] = {**volume.standby, "lag_seconds": standby_lag(volume.standby)}
        return info

    async def _change(self, name: str, **changes: Any) -> dict[str, Any]:
        def change(value: dict[str, Any]) -> dict[str, Any]:
            volume = Volume.from_dict(value)
            if volume.deleting:
                raise FailedPrecondition(f"volume {name!r} is being deleted")
            # the last pass's error is about the request before: a waiting client must
            # not take it for this one's
            return replace(volume, error="", **changes).to_dict()

        try:
            entry = await self.store.update(Volume.key_of(name), change)
        except Conflict:
            raise FailedPrecondition(f"volume {name!r} keeps changing; try again") from None
        if entry is None:
            raise NotFound(f"volume {name!r} does not exist")
        self.controller.poke()
        return await self._describe(Volume.from_dict(entry.value))

    async def attach(self, name: str, node: str | None = None, *, force: bool = False,
                     frontend: str = "blockdev", chap: Credentials | None = None,
                     initiators: list[str] | None = None) -> dict[str, Any]:
        """Attach volume *name* on *node* (default: this node). Attached on another node,
        it moves only with *force*: the engine started on *node* fences the old one (a
        higher generation on every replica it reaches), which can then write no more.

        *frontend* ``iscsi`` exports it as an iSCSI target instead of a local device, with
        CHAP required: the credentials *chap* (kept by the daemon, 0600) or the node's,
        and only *initiators* (IQNs) allowed when given."""
        config = self.controller.config
        target = node or config.node_name
        volume, _ = await self._volume(name)
        if volume.standby_of:
            raise FailedPrecondition(
                f"volume {name!r} is a standby of backup volume {volume.standby_of}: it "
                f"follows its backups and cannot be attached; activate it first ('appliance "
                f"volume activate {name}')")
        if volume.access_mode == "rwx" and (frontend != "blockdev" or chap or initiators):
            raise InvalidArgument(f"volume {name!r} is an RWX volume: it is shared over NFS, "
                                  "not attached with a frontend ('volume show' gives its "
                                  "export; 'volume share' changes its options)")
        options = {} if volume.access_mode == "rwx" else await self._frontend_options(
            volume, frontend, chap, initiators or [])
        if not config.clustered:
            if target != config.node_name:
                raise InvalidArgument(f"node {target!r} is not this node ({config.node_name});"
                                      " this daemon is a single node")
            await self._keep_chap(name, chap)
            return await self._change(name, attached=True, refusal="", message="", **options)
        await self.controller.membership.node(target)  # NotFound names it
        elsewhere = volume.node and volume.node != target and not volume.maintenance and (
            volume.attached or volume.state in ("attaching", "attached", "detaching"))
        if elsewhere and not force:
            raise FailedPrecondition(
                f"volume {name!r} is attached on node {volume.node}: detach it there first, "
                f"or attach with --force to move it to node {target} (its engine on "
                f"{volume.node} is fenced and can write no more)")
        await self._keep_chap(name, chap)
        if elsewhere:
            await self.controller.events.record(
                name, "forced-attach", f"attached on node {target} while attached on node "
                f"{volume.node}: the engine there is fenced")
        # a refused start is tried again at once (refusal: the status the CLI waits on)
        state = {"state": "attaching", "device": None} if elsewhere else {}
        # (a drain's attach without a device becomes the operator's: it moves if need be)
        return await self._change(name, attached=True, node=target, refusal="", message="",
                                  maintenance=False, **state, **options)

    async def _frontend_options(self, volume: Volume, frontend: str,
                                chap: Credentials | None,
                                initiators: list[str]) -> dict[str, Any]:
        """The volume's frontend fields for an attach (checked; nothing is changed)."""
        if frontend not in FRONTENDS:
            raise InvalidArgument(f"unknown frontend {frontend!r}: {' or '.join(FRONTENDS)}")
        if frontend != "iscsi" and (chap is not None or initiators):
            raise InvalidArgument("CHAP credentials and initiators are options of the iscsi "
                                  "frontend (--frontend iscsi)")
        if chap is not None:
            chap.validate()
            await self._check_chap_user(volume.name, chap)
        initiators = check_initiators(initiators)
        serving = volume.attached or volume.state in ("attaching", "attached", "detaching")
        if serving and volume.frontend != frontend:
            raise FailedPrecondition(
                f"volume {volume.name!r} is attached with the {volume.frontend} frontend: "
                f"detach it, then attach it with --frontend {frontend}")
        keep_chap = volume.iscsi_chap if frontend == "iscsi" and chap is None and serving \
            else ""
        return {"frontend": frontend, "iscsi_initiators": initiators,
                "iscsi_chap": "volume" if chap is not None else keep_chap}

    async def _check_chap_user(self, name: str, chap: Credentials) -> None:
        """A CHAP user is one account of the node's target, with one secret: a user another
        volume has (as its user or its mutual user) must come with the same secret; the
        node's own user is not for volumes."""
        if chap.mutual_user == chap.user:
            raise InvalidArgument("the mutual CHAP user must differ from the CHAP user")
        for user in (chap.user, chap.mutual_user):
            if user == GLOBAL_USER:
                raise InvalidArgument(f"CHAP user {GLOBAL_USER!r} is the node's own; choose "
                                      "another user")
        keeper = self.controller.chap
        mine = {chap.user: chap.secret, **({chap.mutual_user: chap.mutual_secret}
                                           if chap.mutual_user else {})}
        for other in await self._volumes():
            if other.name == name or other.frontend != "iscsi" or other.iscsi_chap != "volume":
                continue
            with contextlib.suppress(NotFound):
                theirs = await keeper.credentials(other.name, True)
                known = {theirs.user: theirs.secret, **({theirs.mutual_user:
                                                         theirs.mutual_secret}
                                                        if theirs.mutual_user else {})}
                for user, secret in mine.items():
                    if user in known and known[user] != secret:
                        raise InvalidArgument(
                            f"CHAP user {user!r} is volume {other.name!r}'s with another "
                            "secret: a user has one secret on a node; choose another user")

    async def share(self, name: str, allow: list[str] | None, read_only: bool | None,
                    squash: str | None) -> dict[str, Any]:
        """Change the export options of RWX volume *name* that are given (None: kept);
        applied to its running NFS server at once, for connected clients too."""
        volume, _ = await self._volume(name)
        allow = volume.share_allow if allow is None else allow
        read_only = volume.share_read_only if read_only is None else read_only
        squash = volume.share_squash if squash is None else squash
        options = ExportOptions(allow=tuple(allow), read_only=read_only,
                                squash=squash).validate()
        if volume.access_mode != "rwx":
            attached = f" (it is attached as a {volume.frontend} device)" \
                if volume.attached else ""
            raise FailedPrecondition(f"volume {name!r} is not an RWX volume{attached}: only "
                                     "volumes created with --access-mode rwx are shared")
        described = await self._change(name, share_allow=list(options.allow),
                                       share_read_only=read_only, share_squash=squash)
        await self.controller.events.record(
            name, "share-options", f"allow {', '.join(options.allow) or 'no client'}, "
            f"{'read-only' if read_only else 'read-write'}, squash {squash}")
        return described

    async def _keep_chap(self, name: str, chap: Credentials | None) -> None:
        if chap is not None:
            await self.controller.chap.keep(name, chap)

    async def iscsi(self, name: str, *, secret: bool = False) -> dict[str, Any]:
        """Where initiators find volume *name*'s target and the user they log in as (and
        the secrets, when asked)."""
        volume, _ = await self._volume(name)
        if volume.frontend != "iscsi" or not volume.attached:
            raise FailedPrecondition(f"volume {name!r} is not attached with the iscsi "
                                     f"frontend: attach it with --frontend iscsi")
        if volume.frontend_info is None:
            raise Pending(f"volume {name!r} is not exported yet (state {volume.state}); "
                          "try again when it is attached")
        credentials = await self.controller.chap.credentials(name, volume.iscsi_chap == "volume")
        info = {**volume.frontend_info, "user": credentials.user,
                "mutual_user": credentials.mutual_user,
                "initiators": volume.iscsi_initiators,
                "own_credentials": volume.iscsi_chap == "volume"}
        if secret:
            info.update(secret=credentials.secret, mutual_secret=credentials.mutual_secret)
        return info

    async def detach(self, name: str, *, force: bool = False) -> dict[str, Any]:
        """Detach volume *name*; refused while its device is mounted or open, unless
        *force* (its mounts are unmounted first, lazily when busy)."""
        await self._release(name, "detach", force)
        # a salvage request not yet carried out must not apply to a later attach
        return await self._change(name, attached=False, salvage_request=None)

    async def _release(self, name: str, action: str, force: bool) -> None:
        """Refuse *action* while the device of volume *name* is used; with *force*,
        unmount it and record that."""
        volume, _ = await self._volume(name)
        if volume.deleting:
            return
        supervisor = self.controller.supervisor
        if volume.frontend == "iscsi":
            await self._release_target(volume, action, force)
            return
        if volume.access_mode == "rwx":
            await self._release_share(volume, action, force)
            return
        device, users = await trio.to_thread.run_sync(supervisor.device_users, name)
        if not users:
            return
        described = holders.describe(users)
        if not force:
            raise FailedPrecondition(
                f"volume {name!r} is in use: its device {device} is {described}. Unmount it "
                f"or stop what uses it, and {action} again; with --force the {action} goes "
                "ahead (what is mounted is unmounted first; open files on it fail)")
        unmounted = await trio.to_thread.run_sync(supervisor.release_device, name)
        await self.controller.events.record(
            name, f"forced-{action}",
            f"{action} forced while its device {device} was {described}"
            + (f"; unmounted {', '.join(unmounted)}" if unmounted else ""))

    async def _release_target(self, volume: Volume, action: str, force: bool) -> None:
        """Refuse *action* while initiators are logged in to the volume's target; with
        *force*, go ahead (their sessions end) and record that."""
        sessions = await trio.to_thread.run_sync(
            self.controller.supervisor.iscsi_sessions, volume.name)
        if not sessions:
            return
        initiators = ", ".join(sorted({str(s["initiator"]) for s in sessions}))
        if not force:
            raise FailedPrecondition(
                f"volume {volume.name!r} is in use: initiators are logged in to its iSCSI "
                f"target ({initiators}). Log them out (iscsiadm -m node -T IQN --logout) and "
                f"{action} again; with --force the {action} goes ahead and their sessions end")
        await self.controller.events.record(
            volume.name, f"forced-{action}",
            f"{action} forced while initiators were logged in to its target: {initiators}")

    async def _release_share(self, volume: Volume, action: str, force: bool) -> None:
        """Refuse *action* while NFS clients are connected to the volume's export; with
        *force*, go ahead (their next requests fail) and record that."""
        clients = await trio.to_thread.run_sync(self.controller.supervisor.share_clients,
                                                volume.name)
        if not clients:
            return
        if not force:
            raise FailedPrecondition(
                f"volume {volume.name!r} is in use: {clients} NFS client(s) are connected to "
                f"its export. Unmount it on the clients and {action} again; with --force the "
                f"{action} goes ahead and their requests fail")
        await self.controller.events.record(
            volume.name, f"forced-{action}",
            f"{action} forced while {clients} NFS client(s) were connected to its export")

    async def salvage(self, name: str, source: str | None) -> dict[str, Any]:
        """Ask that the next start of volume *name*'s engine salvage (from replica
        *source*, or the best reachable member of its newest membership): allowed only
        while it is meant to be attached and its engine does not serve."""
        volume, _ = await self._volume(name)
        if source is not None:
            replicas = await self.controller.replicas_of(name)
            if source not in {r.name for r in replicas}:
                raise NotFound(f"replica {source!r} is not a replica of volume {name!r} (its "
                               f"replicas: {', '.join(sorted(r.name for r in replicas))})")
        if volume.deleting:
            raise FailedPrecondition(f"volume {name!r} is being deleted")
        if not volume.attached:
            raise FailedPrecondition(
                f"volume {name!r} is not attached: a salvage chooses how its engine starts; "
                f"attach it, and salvage if the start is refused")
        status = await trio.to_thread.run_sync(self.controller.supervisor.engine_status, name)
        if status is not None and status["state"] != "faulted":
            raise FailedPrecondition(f"volume {name!r} is served by its engine "
                                     f"({status['state']}): there is nothing to salvage")
        if status is None and volume.robustness != "faulted":
            raise FailedPrecondition(f"volume {name!r} is {volume.state}: its engine has "
                                     "neither faulted nor been refused; try again if it is")
        number = max(volume.salvage_done,
                     int((volume.salvage_request or {}).get("id", 0))) + 1
        info = await self._change(name, salvage_request={"id": number, "from": source},
                                  refusal="", message="")
        await self.controller.events.record(
            name, "salvage-requested",
            f"salvage request {number}: the next start serves "
            + (f"replica {source}" if source else "the best reachable member of the newest "
               "membership"))
        return info

    async def read_witness(self, name: str) -> dict[str, Any]:
        """The witness of volume *name*'s member set (its engine's, in a cluster)."""
        return await self.controller.read_witness(name)

    async def record_witness(self, name: str, revision: int, generation: int,
                             members: list[str]) -> dict[str, Any]:
        return await self.controller.record_witness(name, revision, generation, members)

    async def list_events(self, volume: str | None, after: int = 0) -> list[dict[str, Any]]:
        """The events (of *volume*; those after sequence number *after*), oldest first."""
        return await self.controller.events.list(volume, after)

    async def delete_volume(self, name: str, *, force: bool = False) -> None:
        """Delete volume *name* and its data; refused while its device is mounted or
        open, unless *force*."""
        await self._release(name, "delete", force)
        await self._change(name, deleting=True, attached=False)

    # -- snapshots and expansion ----------------------------------------------------------

    async def where(self, name: str) -> tuple[Volume, list[Path] | None]:
        """Volume *name* and, when detached, its replica directories (see :meth:`_where`)."""
        return await self._where(name)

    async def _where(self, name: str) -> tuple[Volume, list[Path] | None]:
        """Volume *name* and, when no engine serves it, its replica directories (None
        when its engine serves it); refuses while it changes between the two."""
        volume, _ = await self._volume(name)
        if volume.deleting or volume.state in ("creating", "failed"):
            state = "being deleted" if volume.deleting else volume.state
            raise FailedPrecondition(f"volume {name!r} is {state}")
        if volume.state == "attached" and volume.attached:
            return volume, None
        if volume.state == "detached" and not volume.attached:
            if self.controller.config.clustered:
                raise FailedPrecondition(f"volume {name!r} is detached, and its replicas are "
                                         "on several nodes: attach it first")
            replicas = await self.controller.replicas_of(name)
            return volume, [Path(r.directory) for r in replicas]
        raise FailedPrecondition(f"volume {name!r} is {volume.state}; try again when it is "
                                 "attached or detached")

    async def _engine(self, volume: str, op: str, **arguments: Any) -> Any:
        return await trio.to_thread.run_sync(partial(
            self.controller.supervisor.engine_call, volume, op, **arguments))

    @staticmethod
    async def _offline(directories: list[Path], what: str, action: Any) -> list[Any]:
        return await trio.to_thread.run_sync(volumeops.change, directories, what, action)

    async def create_snapshot(self, volume: str, name: str,
                              labels: dict[str, str]) -> dict[str, Any]:
        check_name(name, "snapshot name")
        check_labels(labels)
        _, directories = await self._where(volume)
        same = next((x for x in await self.list_snapshots(volume) if x["name"] == name), None)
        if same is not None:
            raise AlreadyExists(f"snapshot {name!r} of volume {volume!r} already exists" + (
                " (removed, not purged yet: 'snapshot purge' reclaims it and its name)"
                if same["removed"] else ""))
        if directories is None:
            await self._engine(volume, "snapshot", name=name, labels=labels)
        else:
            await self._offline(directories, f"snapshot {name!r}",
                                lambda r: r.snapshot(name, labels=labels))
        await self.controller.events.record(volume, "snapshot-created", f"snapshot {name}")
        return next(x for x in await self.list_snapshots(volume) if x["name"] == name)

    async def list_snapshots(self, volume: str, *, head: bool = False
                             ) -> list[dict[str, Any]]:
        """The snapshots of *volume*, parents first; with *head*, its head last (named
        None: what was written since its parent snapshot)."""
        _, directories = await self._where(volume)
        if directories is None:
            layers = await self._engine(volume, "snapshots")
        else:
            layers = await trio.to_thread.run_sync(volumeops.layers, directories)
        snapshots = [{"name": x["name"], "parent": x["parent"], "created": x["created"],
                      "size": x["size"], "actual_size": x["allocated"],
                      "removed": x["removed"], "user_created": x["user_created"],
                      "labels": x["labels"]} for x in layers if not x["head"]]
        if head:
            snapshots += [{"name": None, "parent": x["parent"], "created": None,
                           "size": x["size"], "actual_size": x["allocated"],
                           "removed": False, "user_created": True, "labels": {}}
                          for x in layers if x["head"]]
        return snapshots

    async def trim_filesystem(self, name: str) -> dict[str, Any]:
        """fstrim the file system of attached volume *name* where it is mounted on this
        node (the request is forwarded to the node of its engine)."""
        _, directories = await self._where(name)
        if directories is not None:
            return {"trimmed": False, "message": "detached: nothing to trim"}
        trimmed, message = await trio.to_thread.run_sync(
            self.controller.supervisor.trim_filesystem, name)
        if trimmed:
            await self.controller.events.record(name, "trimmed", message)
        return {"trimmed": trimmed, "message": message}

    async def _snapshot_exists(self, volume: str, name: str) -> None:
        check_name(name, "snapshot name")
        if not any(x["name"] == name and not x["removed"]
                   for x in await self.list_snapshots(volume)):
            raise NotFound(f"snapshot {name!r} of volume {volume!r} does not exist")

    async def revert_snapshot(self, volume: str, name: str) -> None:
        await self._snapshot_exists(volume, name)
        found, directories = await self._where(volume)
        if found.standby_of:
            raise FailedPrecondition(f"volume {volume!r} is a standby: it holds the backup "
                                     "it follows, and only that; activate it first")
        if directories is None:
            raise FailedPrecondition(f"volume {volume!r} is attached: detach it before "
                                     "reverting (its users would see their data change)")
        await self._offline(directories, f"revert to {name!r}", lambda r: r.revert(name))
        await self.controller.events.record(volume, "reverted", f"to snapshot {name}")

    async def mounted_at(self, *, volume: str = "", snapshot: str = "",
                         backup: str = "") -> Mount | None:
        """Where the snapshot or backup is browsed (docs/browse.md), if it is."""
        entries, _ = await self.store.list(Mount.PREFIX)
        for entry in entries:
            mount = Mount.from_dict(entry.value)
            if (backup and mount.backup == backup) or (
                    snapshot and mount.volume == volume and mount.snapshot == snapshot):
                return mount
        return None

    async def delete_snapshot(self, volume: str, name: str) -> None:
        await self._snapshot_exists(volume, name)
        mount = await self.mounted_at(volume=volume, snapshot=name)
        if mount is not None:
            raise FailedPrecondition(f"snapshot {name!r} of volume {volume!r} is mounted at "
                                     f"{mount.path} on node {mount.node}: unmount it first "
                                     f"('appliance snapshot umount {mount.path}')")
        _, directories = await self._where(volume)
        if directories is None:
            await self._engine(volume, "remove-snapshot", name=name)
        else:
            await self._offline(directories, f"remove snapshot {name!r}",
                                lambda r: r.remove_snapshot(name))
        await self.controller.events.record(volume, "snapshot-removed", f"snapshot {name}")

    async def purge_snapshots(self, volume: str) -> None:
        _, directories = await self._where(volume)
        if self.backup_jobs is not None and self.backup_jobs.running(volume):
            raise FailedPrecondition(f"a backup of volume {volume!r} is running: purge "
                                     "when it is done (it reads the snapshot's layers)")
        if directories is None:
            await self._engine(volume, "purge")
        else:
            await self._offline(directories, "purge", lambda r: r.purge())
        await self.controller.events.record(volume, "purged", "removed snapshots reclaimed")

    async def expand_volume(self, name: str, size: int, *,
                            resize_fs: bool = False) -> dict[str, Any]:
        """Grow volume *name*, attached (its device grows at once, in use or not) or
        detached; *resize_fs* grows the file system on the attached device too."""
        volume, directories = await self._where(name)
        check_volume_size(size)
        if volume.standby_of:
            raise FailedPrecondition(f"volume {name!r} is a standby: it takes the size of the "
                                     "backups it follows; activate it first")
        if size < volume.size:
            raise InvalidArgument(f"cannot shrink volume {name!r} from {volume.size} to {size} "
                                  "bytes: volumes only grow")
        supervisor = self.controller.supervisor
        if resize_fs and volume.frontend == "iscsi":
            raise InvalidArgument(f"--resize-fs: volume {name!r} is exported over iSCSI, and "
                                  "its file system is the initiator's: expand without it, then "
                                  "rescan (iscsiadm -m session --rescan) and grow the file "
                                  "system on the initiator")
        if resize_fs:
            if directories is not None:
                raise FailedPrecondition(f"--resize-fs needs volume {name!r} attached")
            await trio.to_thread.run_sync(supervisor.check_growable, name)
        if size == volume.size and not resize_fs:
            return await self._describe(volume)
        async with self.placement.lock:  # the disks must have room for the growth
            grown = replace(volume, size=size)
            replicas = await self.controller.replicas_of(name)
            await self.placement.check_capacity(grown, replicas)
            _, directories = await self._where(name)
            if directories is None:
                await self._engine(name, "expand", size=size)
            else:
                await self._offline(directories, f"expand to {size} bytes",
                                    lambda r: r.expand(size))
            await self.controller.set_size(name, size)
        if size != volume.size:
            await self.controller.events.record(
                name, "expanded",
                f"from {format_size_exact(volume.size)} to {format_size_exact(size)}")
        if directories is None:
            await trio.to_thread.run_sync(partial(supervisor.grow_device, name, size,
                                                  resize_fs=resize_fs))
            self.controller.poke()
        return await self.show_volume(name)

    # -- settings -----------------------------------------------------------------------

    async def settings(self) -> dict[str, Any]:
        return (await self.controller.settings()).to_dict()

    async def update_settings(self, changes: dict[str, Any]) -> dict[str, Any]:
        current = await self.controller.settings()
        unknown = sorted(set(changes) - set(current.to_dict()) | ({"name"} & set(changes)))
        if unknown:
            raise InvalidArgument(f"unknown setting {unknown[0]!r}")
        try:
            updated = replace(current, **changes).validate()
        except TypeError as exc:
            raise InvalidArgument(str(exc)) from exc
        await self.store.put(Settings.key_of("global"), updated.to_dict())
        before, after = current.to_dict(), updated.to_dict()
        said = ", ".join(f"{key} {before[key]} -> {after[key]}" for key in sorted(after)
                         if before[key] != after[key])
        if said:
            await self.controller.events.record("", "settings-changed", said)
        self.controller.poke()
        return updated.to_dict()

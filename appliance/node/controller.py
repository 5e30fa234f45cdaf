"""The volume controller: level-triggered and idempotent.

Each pass compares every volume's spec with what is observed (replica directories, replica
servers, the engine and its replicas' modes, the block device) and does the next step
toward the spec; a pass after a crash or a restart simply continues. Passes run when the
store changes and at least every ``reconcile_interval`` seconds (to notice processes that
died). Blocking work (processes, files, sockets) runs in worker threads; the copies that
make a clone or a restore run as jobs that a stop of the daemon cancels (work.py). Where
new replicas go is :mod:`appliance.node.placement`'s to say.

For an attached volume: its replica servers run, its engine runs, its device exists. A
replica the engine reports out of service is restarted if its server died, and added back
(rebuilt) after ``replica_replenishment_wait``. An engine whose replicas all failed is
restarted when ``auto_salvage`` is on, never with salvage: it serves again only when no
acknowledged write can be missing (docs/membership.md). A refused start is reported once
(status message, event) and tried again every RETRY_INTERVAL, or at once when the volume or
its replicas change. A salvage happens only at an operator's request (``volume salvage``),
carried out at the next start; a replica kept because it holds a diverged branch becomes a
detached volume of its own. A detached volume has no processes.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any, Protocol, TypeVar

import trio

from appliance.control.objects import Disk, ReplicaRecord, Settings, Volume
from appliance.control.store import StateStore
from appliance.errors import (
    AddressInUse,
    ApplianceError,
    Conflict,
    FailedPrecondition,
    Unavailable,
)
from appliance.node.chap import ChapKeeper
from appliance.node.clustered import SECRET_PREFIX, WITNESS_PREFIX, ClusterWork
from appliance.node.config import NodeConfig
from appliance.node.events import EventLog
from appliance.node.eviction import Eviction
from appliance.node.lineage import one_line
from appliance.node.nodes import Membership
from appliance.node.placement import Placement, load_settings
from appliance.node.recovery import Recovery
from appliance.node.supervisor import Supervisor
from appliance.node.work import run_job
from appliance.ports import bindable

log = logging.getLogger(__name__)
T = TypeVar("T")
RESYNC_INTERVAL = 60.0  # seconds: a detached, unchanged volume is looked at this often
NOT_SERVED = frozenset({"creating", "detached", "failed", "deleting"})  # robustness unknown


class Restorer(Protocol):
    """Writes a backup into a new volume's replicas; returns the bytes written (the backup
    service's target provides it; a node without backups has none)."""

    async def __call__(self, backup_id: str, volume: str, replicas: list[ReplicaRecord],
                       progress: Callable[[int, int], None]) -> int: ...


class Controller(Recovery, Eviction, ClusterWork):
    def __init__(self, store: StateStore, supervisor: Supervisor, config: NodeConfig, *,
                 placement: Placement | None = None, restorer: Restorer | None = None,
                 wall_clock: Callable[[], float] = time.time,
                 cluster_key: bytes | None = None) -> None:
        self.store = store
        self.supervisor = supervisor
        self.config = config
        self.wake = trio.Event()
        self.passes = 0
        self._lock = trio.Lock()  # one pass at a time
        # replicas are placed one volume at a time (under placement.lock)
        self.placement = placement if placement is not None else Placement(store, config)
        self._jobs: trio.Nursery | None = None  # long work (clones) beside the passes
        self.cloning: dict[str, tuple[int, int]] = {}  # volume -> (copied, total) bytes
        self.restorer = restorer  # restores a new volume from a backup
        self._wall_clock = wall_clock  # stamps kept in the store (a replica's failed_at)
        # detached volumes found in order: skipped until they change or RESYNC_INTERVAL
        self._settled: dict[str, tuple[tuple[Any, ...], float]] = {}
        self.events = EventLog(store)
        self.membership = Membership(store, config, self.events)
        self.cluster_key = cluster_key  # None alone: volume secrets are files of this node
        self.chap = ChapKeeper(store, config, cluster_key, self.thread)
        self._server_wait: dict[str, float] = {}  # volume -> since when its start waits
        self._down_since: dict[str, float] = {}  # volume -> since when its node is down
        # the last thing said (logged, recorded as an event) per (volume, topic)
        self._said: dict[tuple[str, str], str] = {}
        # per volume, its engine's last refusal: (message, what it was tried with, when)
        self._refused: dict[str, tuple[str, Any, float]] = {}
        # replicas being handed over to a volume of their own (a kept diverged branch)
        self._handed_over: set[str] = set()
        # disks whose replicas move away, and volumes whose replicas are being copied
        self._evicting: set[str] = set()
        self.moving: set[str] = set()
        self._move_failed: dict[str, tuple[str, float]] = {}
        # the mode each replica of an attached volume was last seen in (events on change)
        self._modes: dict[tuple[str, str], str] = {}
        # per volume, the iSCSI options its target was last set up with (by this daemon)
        self._exported: dict[str, tuple[int, tuple[str, ...]]] = {}

    async def thread(self, function: Callable[..., T], *args: Any) -> T:
        """Blocking work (processes, files, sockets) in a worker thread."""
        return await trio.to_thread.run_sync(function, *args)

    # -- loop ---------------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._jobs = nursery
            task_status.started()
            await self._loop()

    async def _loop(self) -> None:
        unavailable = ""  # the state store's last failure, said once
        while True:
            self.wake = trio.Event()
            try:
                await self.reconcile_all()
            except Unavailable as exc:  # the store (etcd without quorum): the data path serves
                if not unavailable:
                    log.warning("reconciling waits for the state store: %s", exc)
                unavailable = str(exc)
            except Exception:
                log.exception("a reconcile pass failed")
            else:
                if unavailable:
                    log.info("the state store answers again")
                unavailable = ""
            with trio.move_on_after(self.config.reconcile_interval):
                await self.wake.wait()

    def poke(self) -> None:
        """Run a pass soon (the API calls this after a change)."""
        self.wake.set()

    def poke_later(self, delay: float) -> None:
        """Run a pass after *delay* seconds (sooner than the reconcile interval)."""
        if self._jobs is not None:
            wake = self.wake

            async def later() -> None:
                await trio.sleep(delay)
                wake.set()

            self._jobs.start_soon(later)

    async def reconcile_all(self) -> None:
        async with self._lock:
            entries, _ = await self.store.list(Volume.PREFIX)
            volumes = [Volume.from_dict(entry.value) for entry in entries]
            self._handed_over = {v.source["replica"] for v in volumes if v.state == "creating"
                                 and v.source and "replica" in v.source}
            disks = [Disk.from_dict(e.value) for e in (await self.store.list(Disk.PREFIX))[0]]
            evicting = {disk.name for disk in disks if disk.eviction_requested}
            if self.config.clustered:
                await self._report_disks([d for d in disks if self.placement.mine(d.node)])
            if evicting != self._evicting:  # settled volumes may have replicas to move
                self._settled.clear()
                self._move_failed.clear()
            self._evicting = evicting
            now = trio.current_time()
            for entry, volume in zip(entries, volumes, strict=True):
                settled = self._settled.get(volume.name)
                if settled and settled[0] == self._steady_key(volume) and \
                        now - settled[1] < RESYNC_INTERVAL:
                    continue  # detached and unchanged: nothing runs that could have died
                try:
                    await self.reconcile(volume, entry.revision)
                except Conflict:
                    self.poke()  # the volume changed meanwhile: look again
                except ApplianceError as exc:
                    if self._note(volume.name, "error", str(exc)):  # once, not every pass
                        log.warning("volume %s: %s", volume.name, exc)
                    await self._status(volume.name, message=one_line(str(exc)),
                                       error=exc.code)
                except Exception as exc:  # a bug: keep reconciling the other volumes
                    log.exception("volume %s: reconcile failed", volume.name)
                    await self._status(volume.name, message=f"internal error: {exc}",
                                       error="internal")
                else:
                    self._note(volume.name, "error", "")
                    if volume.error:
                        await self._status(volume.name, error="")
            self.passes += 1

    @staticmethod
    def _steady_key(volume: Volume) -> tuple[Any, ...] | None:
        """What must stay the same for a detached volume to need no look, or None."""
        if volume.attached or volume.deleting or volume.state != "detached" or volume.message:
            return None
        return (volume.size, volume.replicas, volume.state)

    async def _settle(self, volume: str) -> None:
        entry = await self.store.get(Volume.key_of(volume))
        key = self._steady_key(Volume.from_dict(entry.value)) if entry else None
        if key is None:
            self._settled.pop(volume, None)
        else:
            self._settled[volume] = (key, trio.current_time())

    async def settings(self) -> Settings:
        return await load_settings(self.store)

    async def replicas_of(self, volume: str, *, removing: bool = False) -> list[ReplicaRecord]:
        """The replicas of *volume* (with *removing*: also those replaced, which their
        nodes are deleting)."""
        entries, _ = await self.store.list(ReplicaRecord.prefix_of(volume))
        found = [ReplicaRecord.from_dict(e.value) for e in entries]
        return [r for r in found if r.volume == volume and (removing or not r.removing)]

    def mine(self, node: str) -> bool:
        """Whether a replica or an engine on *node* is this node's to run."""
        return self.placement.mine(node)

    async def _status(self, name: str, **changes: Any) -> None:
        """Write status fields of volume *name* (retrying on concurrent spec changes; a
        volume that keeps changing gets them at a later pass); a change of its state or
        robustness is an event."""
        seen: list[Volume] = []

        def change(value: dict[str, Any]) -> dict[str, Any] | None:
            volume = Volume.from_dict(value)
            updated = replace(volume, **changes)
            if updated.state in NOT_SERVED:  # no engine: nothing is known of its replicas
                updated = replace(updated, robustness="unknown")
            seen[:] = [volume, updated]
            return None if updated == volume else updated.to_dict()

        try:
            await self.store.update(Volume.key_of(name), change)
        except Conflict:
            return
        if seen:
            await self._transition_events(*seen)

    async def _transition_events(self, old: Volume, new: Volume) -> None:
        if new.state != old.state:
            why = f": {new.message}" if new.message and new.state in ("failed", "attaching") \
                else ""
            await self.events.record(new.name, "state", f"{old.state} -> {new.state}{why}")
        # faulted and recovered have events of their own; unknown is a detached volume's
        if new.robustness != old.robustness and "unknown" not in (old.robustness,
                                                                  new.robustness) \
                and "faulted" not in (old.robustness, new.robustness):
            await self.events.record(new.name, "robustness",
                                     f"{old.robustness} -> {new.robustness}")

    async def _mode_events(self, volume: Volume, status: dict[str, Any]) -> None:
        """A replica leaving service, starting a rebuild, or back in service: an event."""
        changed = []
        for replica in status["replicas"]:
            key = (volume.name, replica["address"])
            mode, before = replica["mode"], self._modes.get(key)
            self._modes[key] = mode
            if before is not None and before != mode:
                changed.append((replica, mode, before))
        if not changed:
            return
        names = await self.names()
        for replica, mode, before in changed:
            who = f"replica {names.name(replica['address'])}"
            if mode == "ERR":
                reason = names.text(str(replica.get("reason") or "")) or "no reason given"
                await self.events.record(volume.name, "replica-failed",
                                         f"{who} out of service: {reason}")
            elif mode == "WO":
                await self.events.record(volume.name, "rebuild-started",
                                         f"{who} is being rebuilt")
            elif mode == "RW":
                await self.events.record(volume.name, "rebuild-done" if before == "WO"
                                         else "replica-back", f"{who} in service")

    # -- one volume ---------------------------------------------------------------------

    async def reconcile(self, volume: Volume, revision: int) -> None:
        if volume.deleting:
            if volume.name not in self.cloning and volume.name not in self.moving:
                await self._delete(volume)
            return
        if volume.name in self.moving:
            return  # its replicas are being copied to other disks (detached meanwhile)
        if volume.state == "creating" and volume.source and "replica" in volume.source:
            if await self._adopts_here(volume):
                await self._adopt(volume)  # a branch kept from another volume (after a crash)
            return
        replicas = await self._ensure_replicas(volume)
        if self.config.clustered:
            await self._remove_replaced(volume)
        if volume.state in ("creating", "failed"):
            return  # not usable (yet)
        if self.config.clustered:
            await self._reconcile_member(volume, replicas)
        elif volume.attached:
            # a move a crash interrupted is settled before an engine could see both copies
            replicas = await self._finish_moves(volume, replicas, attached=True)
            await self._run_attached(volume, replicas)
        else:
            await self._run_detached(volume, replicas)
            await self._settle(volume.name)

    async def _ensure_replicas(self, volume: Volume) -> list[ReplicaRecord]:
        # a replica being handed over to a volume of its own is no longer this volume's
        replicas = [r for r in await self.replicas_of(volume.name)
                    if r.name not in self._handed_over]
        placed: list[ReplicaRecord] = []
        if volume.replicas > len(replicas) and self.membership.is_leader:
            async with self.placement.lock:
                # Counted again under the lock: a create (or a replacement) places replicas
                # under it too, and may have stored them since the count above; placing
                # the difference from that count would give the volume extra replicas, on
                # nodes and disks that hold one already.
                replicas = [r for r in await self.replicas_of(volume.name)
                            if r.name not in self._handed_over]
                missing = volume.replicas - len(replicas)
                if missing > 0:
                    placed = await self.placement.place(volume, replicas, missing)
            replicas += placed
        if self.config.clustered:
            # a new replica (no id yet) is made by its node, whoever placed it
            for replica in replicas:
                if self.mine(replica.node) and replica.replica_id is None:
                    await self._create_dir(replica, volume.size)
            if volume.state == "creating" and self.membership.is_leader and \
                    len(replicas) >= volume.replicas:
                current = await self.replicas_of(volume.name)
                if current and all(r.replica_id for r in current):
                    await self._status(volume.name, state="detached", message="")
            return replicas
        # Directories are made for new replicas only: one that vanished later is a failed
        # replica (replaced after the wait), not something to recreate empty in its place.
        for replica in replicas if volume.state == "creating" else placed:
            await self._create_dir(replica, volume.size)
        if volume.state == "creating" and volume.source:
            if volume.name not in self.cloning and self._jobs is not None:
                self.cloning[volume.name] = (0, 0)
                self._jobs.start_soon(self._clone, volume, replicas)
        elif volume.state == "creating":
            await self._status(volume.name, state="detached", message="")
        return replicas

    async def _create_dir(self, replica: ReplicaRecord, size: int) -> None:
        replica_id = await self.thread(self.supervisor.create_replica_dir, replica, size)
        if replica_id and replica.replica_id != replica_id:
            await self._put_replica(replace(replica, replica_id=replica_id))

    async def _clone(self, volume: Volume, replicas: list[ReplicaRecord]) -> None:
        """Copy the source snapshot into the new volume's replicas, then make it usable."""
        assert volume.source is not None
        what = "restore" if "backup" in volume.source else "clone"

        def progress(done: int, total: int) -> None:
            self.cloning[volume.name] = (done, total)

        try:
            if what == "restore":
                if self.restorer is None:
                    raise FailedPrecondition("backups are not available on this node")
                log.info("volume %s: restoring backup %s", volume.name, volume.source["backup"])
                copied = await self.restorer(volume.source["backup"], volume.name, replicas,
                                             progress)
            else:
                source, snapshot = volume.source["volume"], volume.source["snapshot"]
                log.info("volume %s: cloning snapshot %s of volume %s", volume.name,
                         snapshot, source)
                source_replicas = await self.replicas_of(source)
                copied = await run_job(self.supervisor.clone_into, source, source_replicas,
                                       snapshot, volume.name, replicas, progress)
        except ApplianceError as exc:
            # what the copy made goes (a failed operation changes nothing); the reason
            # stays in the events ("creating -> failed: ...")
            log.warning("volume %s: the %s failed (the volume is removed): %s", volume.name,
                        what, exc)
            await self._status(volume.name, state="failed", deleting=True, attached=False,
                               message=f"{what} failed: {one_line(str(exc))}",
                               error=exc.code)
        else:
            log.info("volume %s: %s done (%d bytes written)", volume.name, what, copied)
            await self._status(volume.name, state="detached", message="")
        finally:
            del self.cloning[volume.name]
            self.poke()

    async def set_size(self, name: str, size: int) -> None:
        """Record the new size of volume *name* (after its replicas grew)."""
        try:
            await self.store.update(Volume.key_of(name), lambda value: replace(
                Volume.from_dict(value), size=size).to_dict())
        except Conflict:
            raise Conflict(f"volume {name} keeps changing; its new size was not recorded"
                           ) from None

    async def _run_attached(self, volume: Volume, replicas: list[ReplicaRecord]) -> None:
        sup = self.supervisor
        if volume.state in ("detached", "creating"):
            await self._status(volume.name, state="attaching")
        self._settled.pop(volume.name, None)
        status = await self.thread(sup.engine_status, volume.name)
        await self._learn_replica_ids(replicas, status)
        failures, replicas = await self._ensure_servers(volume, replicas, status)
        settings = await self.settings()
        if status is None:
            if not await self._remote_servers_ready(volume, replicas):
                return
            if not await self._start(volume, replicas, failures):
                return
            status = await self.thread(sup.engine_status, volume.name)
            if status is None:
                return
            await self._started(volume, status)
        elif volume.pending_salvage and status["state"] != "faulted":
            await self._drop_salvage_request(volume, status)
        if status["state"] == "faulted":
            await self._faulted(volume, settings, status.get("fenced"))
            return
        kept = await self._keep_branches(volume, replicas, status)
        replicas = [r for r in replicas if r.name not in kept]
        await self._observe(volume, status)
        await self._mode_events(volume, status)
        await self._replenish(volume, replicas, status, settings, set(failures))
        if self.config.clustered:
            await self._finish_drain(volume, replicas, status)
            await self._drop_replaced(volume, replicas, status)
        else:
            await self._evict_online(volume, replicas, status, set(failures))
        device = await self.thread(sup.attached_device, volume.name)
        iscsi = volume.frontend == "iscsi"
        if device is None and not volume.maintenance:  # (a drain's attach has no device)
            # (no /dev/appliance link for a device only a frontend or a share uses)
            device = await self.thread(partial(sup.attach, volume.name, link=not iscsi and
                                               volume.access_mode != "rwx"))
        frontend_info = share_info = None
        if iscsi and device is not None:
            frontend_info = await self._export_iscsi(volume)
            device = ""  # (initiators reach it through the target, not a local device)
        if volume.access_mode == "rwx" and device is not None:
            share_info = await self._serve_share(volume)
            device = ""  # (clients reach it through its NFS export)
        await self._status(volume.name, state="attached", robustness=status["state"],
                           device=device, message="", refusal="",
                           branch=status.get("branch", ""), frontend_info=frontend_info,
                           share_info=share_info)

    async def _serve_share(self, volume: Volume) -> dict[str, Any]:
        """Share the attached RWX volume (its file system made once, mounted, exported by
        its own NFS server); a restarted daemon adopts the server that runs."""
        port = volume.share_port or await self._share_port(volume)
        try:
            info, made = await self.thread(self.supervisor.serve_share, volume, port)
        except AddressInUse as exc:  # another program took it, or another node's share
            port = await self._share_port(volume)  # had it here: a new one (event below)
            log.info("volume %s: its NFS port moves to %d: %s", volume.name, port, exc)
            info, made = await self.thread(self.supervisor.serve_share, volume, port)
        if made or port != volume.share_port:
            await self._status(volume.name, share_formatted=volume.share_formatted or made,
                               share_port=port)
        if volume.share_info is None or any(volume.share_info.get(key) != info[key]
                                            for key in ("address", "port", "path")):
            await self.events.record(volume.name, "share-served",
                                     f"NFS export {info['address']}:{info['port']}"
                                     f"{info['path']}"
                                     + (" (its xfs file system made)" if made else ""))
        return info

    async def _share_port(self, volume: Volume) -> int:
        """A port of the share range no other shared volume of this node has and nothing
        listens on."""
        taken = {v.share_port for v in (Volume.from_dict(e.value) for e in
                                        (await self.store.list(Volume.PREFIX))[0])
                 if v.name != volume.name and self.mine(v.node)}
        first, last = self.config.share_port_range
        for port in range(first, last + 1):
            if port not in taken and await self.thread(
                    bindable, self.config.replica_address, port):
                return port
        raise FailedPrecondition(f"no free port in share_port_range {first}-{last} for "
                                 f"volume {volume.name}'s NFS export")

    async def _export_iscsi(self, volume: Volume) -> dict[str, Any]:
        """Export the attached volume as its iSCSI target unless tgtd serves it already
        (a restarted daemon adopts it; a tgtd that died is started again)."""
        sup = self.supervisor
        iqn = self.chap.iqn(volume.name)
        exported = await self.thread(sup.exported_iqn, volume.name)
        credentials = await self.chap.credentials(volume.name, volume.iscsi_chap == "volume")
        # (new credentials, given by an attach of the attached volume, reach tgtd too)
        wanted = (hash(credentials.to_json()), tuple(volume.iscsi_initiators))
        if exported != iqn or volume.frontend_info is None or \
                self._exported.get(volume.name) != wanted:
            info: dict[str, Any] = await self.thread(
                sup.export_iscsi, volume.name, iqn, credentials, volume.iscsi_initiators)
            self._exported[volume.name] = wanted
            if exported != iqn:
                await self.events.record(volume.name, "iscsi-exported",
                                         f"target {iqn} on portal {info['portal']}")
            return info
        return dict(volume.frontend_info)

    async def _ensure_servers(self, volume: Volume, replicas: list[ReplicaRecord],
                              status: dict[str, Any] | None
                              ) -> tuple[dict[str, ApplianceError], list[ReplicaRecord]]:
        """Start the replica servers that do not run; the failures by replica name, and
        the replicas (one whose port another program took is moved to a free one)."""
        sup = self.supervisor
        # A server the engine has in service answers it: only its process is looked at
        # (cheap); the others are probed with a connection.
        in_service = {r["address"] for r in status["replicas"] if r["mode"] != "ERR"} \
            if status else set()
        failures: dict[str, ApplianceError] = {}

        async def ensure_server(replica: ReplicaRecord) -> None:
            check = sup.replica_process_alive \
                if replica.address(self.config.replica_address) in in_service \
                else sup.replica_running
            if not await self.thread(check, replica):
                if (volume.name, f"server {replica.name}") not in self._said:  # not failing
                    log.info("volume %s: starting replica server %s", volume.name,
                             replica.name)
                try:
                    await self.thread(sup.start_replica, replica)
                except AddressInUse as exc:
                    moved = await self._move_port(volume, replica, exc, status)
                    try:
                        await self.thread(sup.start_replica, moved)
                    except ApplianceError as again:
                        failures[replica.name] = again
                except ApplianceError as exc:
                    failures[replica.name] = exc

        await self._secret(volume.name)  # made once, before they start
        async with trio.open_nursery() as servers:  # started side by side
            for replica in replicas:
                if self.mine(replica.node):  # another node's: that node runs it
                    servers.start_soon(ensure_server, replica)
        current = {r.name: r for r in await self.replicas_of(volume.name)}
        replicas = [current.get(r.name, r) for r in replicas]
        for replica in replicas:
            exc = failures.get(replica.name)
            # the engine serves from the others meanwhile, or refuses to start without it
            if self._note(volume.name, f"server {replica.name}", str(exc or "")) and exc:
                log.warning("volume %s: replica %s cannot be served: %s", volume.name,
                            replica.name, exc)
        return failures, replicas

    async def _move_port(self, volume: Volume, replica: ReplicaRecord, exc: AddressInUse,
                         status: dict[str, Any] | None) -> ReplicaRecord:
        """Give *replica*, whose port another program took, a free port (recorded, and
        told to its engine when one runs: the old address leaves it, the new one is added
        by the next step, rebuilt as any returning replica)."""
        async with self.placement.lock:
            moved = await self.placement.move_port(replica)
        await self.events.record(volume.name, "replica-port-moved",
                                 f"replica {replica.name} moved from port {replica.port} to "
                                 f"{moved.port}: {exc}")
        old = replica.address(self.config.replica_address)
        if status is not None and any(r["address"] == old for r in status["replicas"]):
            with contextlib.suppress(ApplianceError):
                await self.thread(partial(self.supervisor.engine_call, volume.name,
                                          "remove-replica", address=old))
        return moved

    async def _replenish(self, volume: Volume, replicas: list[ReplicaRecord],
                         status: dict[str, Any], settings: Settings, unservable: set[str]) -> None:
        """Bring replicas the engine reports out of service back, after the wait: rebuilt
        in place when their server runs, replaced by a new replica (placed like any other)
        when it cannot be served (its directory or disk is gone or broken)."""
        modes = {r["address"]: r for r in status["replicas"]}
        for replica in replicas:
            address = replica.address(self.config.replica_address)
            info = modes.get(address)
            if info is None:  # new (placed in a lost one's place): the engine takes it
                if replica.name not in unservable:
                    await self._add_to_engine(volume, replica, address)
                continue
            if info["mode"] != "ERR" or info.get("diverged") or info.get(
                    "rebuild", {}).get("state") in ("queued", "starting", "running"):
                if replica.failed_at is not None and info["mode"] != "ERR":
                    await self._put_replica(replace(replica, failed_at=None))
                continue
            if replica.failed_at is None:
                await self._put_replica(replace(replica, failed_at=self._wall_clock()))
                continue
            if self._wall_clock() - replica.failed_at < settings.replica_replenishment_wait:
                continue
            if not self.mine(replica.node) and not await self._node_alive(replica.node):
                continue  # its node is down: the leader replaces it
            if replica.name in unservable:
                await self._replace(volume, replicas, replica, address)
                continue
            log.info("volume %s: rebuilding replica %s", volume.name, replica.name)
            try:
                await self.thread(partial(self.supervisor.engine_call, volume.name,
                                          "add-replica", address=address))
            except ApplianceError as exc:
                log.warning("volume %s: could not add replica %s back: %s", volume.name,
                            replica.name, exc)
            await self._put_replica(replace(replica, failed_at=None))

    async def _add_to_engine(self, volume: Volume, replica: ReplicaRecord, address: str) -> None:
        if (volume.name, f"add {replica.name}") not in self._said:  # not failing
            log.info("volume %s: adding replica %s to its engine (rebuilt)", volume.name,
                     replica.name)
        try:
            await self.thread(partial(self.supervisor.engine_call, volume.name,
                                      "add-replica", address=address))
        except ApplianceError as exc:
            if self._note(volume.name, f"add {replica.name}", str(exc)):
                log.warning("volume %s: could not add replica %s: %s", volume.name,
                            replica.name, exc)
        else:
            self._note(volume.name, f"add {replica.name}", "")

    async def _replace(self, volume: Volume, replicas: list[ReplicaRecord], failed: ReplicaRecord,
                       address: str) -> None:
        sup = self.supervisor
        others = [r for r in replicas if r.name != failed.name]
        async with self.placement.lock:
            try:
                [new] = await self.placement.plan_replicas(volume, others, 1)
            except FailedPrecondition as exc:
                log.warning("volume %s: replica %s cannot be replaced: %s", volume.name,
                            failed.name, exc)
                await self._status(volume.name, message=f"replica {failed.name} cannot be "
                                   f"replaced: {exc}")
                return
            await self.store.put(new.key, new.to_dict(), expect=0)
        log.info("volume %s: replacing replica %s (cannot be served) by %s on disk %s",
                 volume.name, failed.name, new.name, new.disk)
        await self._create_dir(new, volume.size)
        await self.thread(sup.start_replica, new)
        with contextlib.suppress(ApplianceError):  # may be gone from the engine already
            await self.thread(partial(sup.engine_call, volume.name, "remove-replica",
                                      address=address))
        await self.thread(partial(sup.engine_call, volume.name, "add-replica",
                                  address=new.address(self.config.replica_address)))
        await self.store.delete(failed.key)
        await self.thread(sup.stop_replica, failed)
        await self.thread(sup.delete_replica_dir, failed)

    async def _put_replica(self, replica: ReplicaRecord) -> None:
        await self.store.put(replica.key, replica.to_dict())

    async def _run_detached(self, volume: Volume, replicas: list[ReplicaRecord]) -> None:
        sup = self.supervisor
        if await self.thread(sup.engine_status, volume.name) is not None or \
                await self.thread(sup.attached_device, volume.name) is not None:
            await self._status(volume.name, state="detaching")
            await self.thread(sup.stop_engine, volume.name)
        for replica in replicas:
            if await self.thread(sup.replica_running, replica):
                await self.thread(sup.stop_replica, replica)
        self._refused.pop(volume.name, None)
        for key in [k for k in self._said if k[0] == volume.name]:
            del self._said[key]
        for key in [k for k in self._modes if k[0] == volume.name]:
            del self._modes[key]
        self._exported.pop(volume.name, None)
        await self._status(volume.name, state="detached", device=None, robustness="unknown",
                           refusal="", frontend_info=None, share_info=None)
        await self._start_moves(volume, replicas)

    async def _delete(self, volume: Volume) -> None:
        sup = self.supervisor
        await self._status(volume.name, state="deleting")
        await self.thread(sup.stop_engine, volume.name)
        for replica in await self.replicas_of(volume.name, removing=True):
            if not self.mine(replica.node):
                continue  # its node deletes it
            await self.thread(sup.stop_replica, replica)
            await self.thread(sup.delete_replica_dir, replica)
            await self.store.delete(replica.key)
        await self.thread(sup.forget_volume, volume.name)
        await self.chap.forget(volume.name)
        if self.config.clustered:
            left = await self.replicas_of(volume.name, removing=True)
            if left or not self.membership.is_leader:
                if left and self.membership.is_leader and self._note(
                        volume.name, "delete", ", ".join(sorted({r.node for r in left}))):
                    log.info("volume %s: waiting for node(s) %s to delete its replicas",
                             volume.name, ", ".join(sorted({r.node for r in left})))
                return
            await self.store.delete(SECRET_PREFIX + volume.name)
            await self.store.delete(WITNESS_PREFIX + volume.name)
        await self.store.delete(volume.key)
        log.info("volume %s deleted", volume.name)
        await self.events.record(volume.name, "deleted", "the volume and its data are gone")

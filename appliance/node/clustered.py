"""A node's part of each volume in a cluster (docs/cluster.md, "What each node does").
Mixed into :class:`~appliance.node.controller.Controller`; alone, a node does all of it
there, and none of this runs.

* its replicas: servers run while the volume is attached (wherever its engine is), stopped
  when it is detached, deleted when they were replaced;
* the engine, on the volume's node: started once the other nodes' servers answer;
  replaced replicas leave it; an engine of the volume anywhere else on this node stops;
* the leader: replicas lost with their node are replaced on another node after the wait;
* the volume's secret, sealed in the store with the cluster key, in this node's file;
* the usage of this node's disks, reported in their records for placement elsewhere;
* the witness of each volume's member set, which its engine reads and changes through this
  node's API (docs/membership.md, "The witness").
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from appliance.control import cluster
from appliance.control.objects import Disk, ReplicaRecord, Settings, Volume
from appliance.control.store import StateStore
from appliance.errors import ApplianceError, Conflict, FailedPrecondition
from appliance.node.config import NodeConfig
from appliance.node.events import EventLog
from appliance.node.nodes import Membership
from appliance.node.placement import Placement
from appliance.node.supervisor import Supervisor

log = logging.getLogger(__name__)
T = TypeVar("T")
SECRET_PREFIX = "/secrets/"  # noqa: S105 - a key prefix: a volume's sealed secret
WITNESS_PREFIX = "/witness/"  # a volume's witness: {"generation", "members"}
SERVER_WAIT = 20.0  # seconds an engine start waits for other nodes' replica servers
SERVER_POLL = 0.5  # seconds between looks meanwhile
REPORT_INTERVAL = 30.0  # seconds between reports of an unchanged disk's usage


def _merged(value: dict[str, Any], *, report: dict[str, Any]) -> dict[str, Any]:
    return {**value, **report}


class ClusterWork:
    """The controller's work that only a node of a cluster does (see the module)."""

    store: StateStore
    supervisor: Supervisor
    config: NodeConfig
    events: EventLog
    placement: Placement
    membership: Membership
    cluster_key: bytes | None
    _evicting: set[str]  # the disks being evicted (read at each pass)
    _server_wait: dict[str, float]  # volume -> since when its engine start waits
    _down_since: dict[str, float]  # volume -> since when its engine's node is seen down
    _wall_clock: Callable[[], float]

    if TYPE_CHECKING:  # provided by the Controller
        async def thread(self, function: Callable[..., T], *args: Any) -> T: ...
        def poke_later(self, delay: float) -> None: ...
        def mine(self, node: str) -> bool: ...
        async def settings(self) -> Settings: ...
        async def _status(self, name: str, **changes: Any) -> None: ...
        async def _create_dir(self, replica: ReplicaRecord, size: int) -> None: ...
        async def _put_replica(self, replica: ReplicaRecord) -> None: ...
        async def replicas_of(self, volume: str, *,
                              removing: bool = False) -> list[ReplicaRecord]: ...
        async def _ensure_servers(self, volume: Volume, replicas: list[ReplicaRecord],
                                  status: dict[str, Any] | None
                                  ) -> tuple[dict[str, ApplianceError],
                                             list[ReplicaRecord]]: ...
        async def _run_attached(self, volume: Volume,
                                replicas: list[ReplicaRecord]) -> None: ...
        def _note(self, volume: str, topic: str, message: str) -> bool: ...

    async def _report_disks(self, disks: list[Disk]) -> None:
        """Publish the usage of this node's disks for the other nodes (placement), when it
        changed by a percent of the capacity or is REPORT_INTERVAL old."""
        for disk in disks:
            usage, _ = await self.placement.usage(disk.path)
            if usage is None:
                continue
            moved = abs(usage.available - disk.available) > usage.capacity // 100
            if moved or usage.capacity != disk.capacity or \
                    self._wall_clock() - disk.reported > REPORT_INTERVAL:
                report = {"capacity": usage.capacity, "available": usage.available,
                          "reported": self._wall_clock()}
                await self.store.update(disk.key, partial(_merged, report=report))

    async def _secret(self, volume: str) -> None:
        """In a cluster: the volume's secret, sealed in the store (made by the first node
        that needs it), in this node's secret file; alone, the file is the secret."""
        if self.cluster_key is None:
            await self.thread(self.supervisor.secret_file, volume)
            return
        key = SECRET_PREFIX + volume
        entry = await self.store.get(key)
        if entry is None:
            sealed = await self.thread(cluster.seal, self.cluster_key, os.urandom(32).hex()
                                       .encode(), key)
            with contextlib.suppress(Conflict):  # another node made it meanwhile: that one
                await self.store.put(key, sealed, expect=0)
            entry = await self.store.get(key)
            if entry is None:
                raise Conflict(f"the secret of volume {volume} vanished while it was made")
        secret = await self.thread(cluster.unseal, self.cluster_key, entry.value, key)
        await self.thread(self.supervisor.write_secret, volume, secret)

    async def read_witness(self, volume: str) -> dict[str, Any]:
        """The witness of *volume*: ``{"revision", "generation", "members"}`` (revision 0:
        none yet)."""
        entry = await self.store.get(WITNESS_PREFIX + volume)
        if entry is None:
            return {"revision": 0, "generation": 0, "members": []}
        return {"revision": entry.revision, "generation": int(entry.value["generation"]),
                "members": list(entry.value["members"])}

    async def record_witness(self, volume: str, revision: int, generation: int,
                             members: list[str]) -> dict[str, Any]:
        """Replace the witness of *volume* last seen at *revision*; raises
        :class:`~appliance.errors.Conflict` when it changed since (another engine wrote
        it: the caller is fenced), or when the volume is now attached on another node.
        A request sent again after its answer was lost (the witness already holds exactly
        it: generations are unique to an engine) succeeds."""
        entry = await self.store.get(Volume.key_of(volume))
        if entry is None:
            raise Conflict(f"volume {volume} does not exist any more")
        where = Volume.from_dict(entry.value).node
        if where and not self.mine(where):
            raise Conflict(f"volume {volume} is attached on node {where} now")
        key = WITNESS_PREFIX + volume
        try:
            new = await self.store.put(key, {"generation": generation,
                                             "members": sorted(members)}, expect=revision)
        except Conflict:
            current = await self.read_witness(volume)
            if current["generation"] == generation and \
                    sorted(current["members"]) == sorted(members):
                return current
            raise Conflict(f"the witness of volume {volume} changed since revision "
                           f"{revision}: now revision {current['revision']}, generation "
                           f"{current['generation']}") from None
        log.info("volume %s: the witness names %d replica(s) for generation %d", volume,
                 len(members), generation)
        return {"revision": new, "generation": generation, "members": sorted(members)}

    async def _reconcile_member(self, volume: Volume, replicas: list[ReplicaRecord]) -> None:
        """In a cluster: this node's part of *volume*: the servers of its replicas while
        the volume is attached, its engine when it is attached here (and no engine of it
        anywhere else on this node); the leader's part (replacing replicas whose node is
        down, the end of a detach whose node is down)."""
        here = [r for r in replicas if self.mine(r.node)]
        if self.membership.is_leader:
            volume = await self._drain(volume, replicas)
        if volume.attached and self.membership.is_leader:
            volume = await self._fail_over(volume, replicas)
            await self._replace_lost(volume, replicas)
            await self._keep_local(volume, replicas)
        if volume.attached and self.mine(volume.node):
            await self._run_attached(volume, replicas)
            return
        engine = await self.thread(self.supervisor.engine_status, volume.name)
        if engine is not None or await self.thread(self.supervisor.attached_device,
                                                   volume.name) is not None:
            # attached elsewhere (moved by a forced attach) or detached: this engine goes
            log.info("volume %s: stopping its engine here (%s)", volume.name,
                     f"attached on node {volume.node}" if volume.attached else "detached")
            await self.thread(self.supervisor.stop_engine, volume.name)
        if volume.attached:
            failures, _ = await self._ensure_servers(volume, here, None)
            del failures  # the engine, on its node, finds them out of service
            return
        for replica in here:
            if await self.thread(self.supervisor.replica_running, replica):
                await self.thread(self.supervisor.stop_replica, replica)
        if volume.state != "detached" and (self.mine(volume.node) or (
                self.membership.is_leader and not await self._node_alive(volume.node))):
            await self._status(volume.name, state="detached", device=None,
                               robustness="unknown", refusal="")

    async def _adopts_here(self, volume: Volume) -> bool:
        """Whether this node hands the replica kept by *volume* over (its node does)."""
        if not self.config.clustered:
            return True
        assert volume.source is not None
        entry = await self.store.get(ReplicaRecord.key_of(volume.source["replica"]))
        return (entry is None and self.membership.is_leader) or \
            (entry is not None and self.mine(ReplicaRecord.from_dict(entry.value).node))

    async def _remote_servers_ready(self, volume: Volume, replicas: list[ReplicaRecord]
                                    ) -> bool:
        """Before an engine starts: whether the servers of its replicas on other nodes
        answer (their nodes start them when they see the volume attached). It waits, pass
        after pass, at most SERVER_WAIT seconds for those on nodes that are up, so that an
        attach does not start degraded for a server a moment late."""
        if not self.config.clustered:
            return True
        _, alive = await self.placement.nodes()
        late = [r for r in replicas if not self.mine(r.node) and r.node in alive
                and not await self.thread(self.supervisor.replica_running, r)]
        if not late:
            self._server_wait.pop(volume.name, None)
            return True
        since = self._server_wait.setdefault(volume.name, trio.current_time())
        if trio.current_time() - since < SERVER_WAIT:
            self.poke_later(SERVER_POLL)
            return False
        log.warning("volume %s: starting its engine without replica(s) %s, whose servers do "
                    "not answer", volume.name, ", ".join(r.name for r in late))
        self._server_wait.pop(volume.name, None)
        return True

    async def _node_alive(self, node: str) -> bool:
        if not node:
            return False
        _, alive = await self.placement.nodes()
        return node in alive

    async def _fail_over(self, volume: Volume, replicas: list[ReplicaRecord]) -> Volume:
        """With ``auto_failover``: a volume attached on a node that has been down for
        ``replica_replenishment_wait`` is attached on another node (one holding a replica
        first), as a forced attach would: the engine started there fences the old one."""
        settings = await self.settings()
        if not settings.auto_failover or not volume.node:
            return volume
        _, alive = await self.placement.nodes()
        if volume.node in alive:
            self._down_since.pop(volume.name, None)
            return volume
        since = self._down_since.setdefault(volume.name, self._wall_clock())
        if self._wall_clock() - since < settings.replica_replenishment_wait:
            return volume
        holders = sorted({r.node for r in replicas if r.node in alive})
        target = holders[0] if holders else min(alive, default=None)
        if target is None:
            return volume
        del self._down_since[volume.name]
        log.warning("volume %s: its node %s is down; attaching it on node %s (failover)",
                    volume.name, volume.node, target)
        await self.events.record(volume.name, "failover",
                                 f"node {volume.node} is down: attached on node {target}; "
                                 "the engine there fences the old one")
        return await self._set_spec(volume, node=target, state="attaching", device=None)

    async def _replace_lost(self, volume: Volume, replicas: list[ReplicaRecord]) -> None:
        """The leader's part of replenishment: a replica out of service for longer than
        ``replica_replenishment_wait`` whose node is down is replaced by a new replica on
        another node (rebuilt by the engine); the lost one is marked removing, and its node
        deletes it when it comes back."""
        settings = await self.settings()
        _, alive = await self.placement.nodes()
        for failed in replicas:
            if failed.failed_at is None or failed.node in alive or \
                    self._wall_clock() - failed.failed_at < settings.replica_replenishment_wait:
                continue
            others = [r for r in replicas if r.name != failed.name]
            async with self.placement.lock:
                try:
                    [new] = await self.placement.plan_replicas(volume, others, 1)
                except FailedPrecondition as exc:
                    if self._note(volume.name, f"replace {failed.name}", str(exc)):
                        log.warning("volume %s: replica %s (node %s down) cannot be "
                                    "replaced: %s", volume.name, failed.name, failed.node, exc)
                    continue
                await self.store.put(new.key, new.to_dict(), expect=0)
                await self._put_replica(replace(failed, removing=True))
            await self.events.record(volume.name, "replica-replaced",
                                     f"replica {failed.name} (node {failed.node} down) "
                                     f"replaced by {new.name} on node {new.node}")
            replicas = [*others, new]

    async def _remove_replaced(self, volume: Volume) -> None:
        """Delete this node's replicas of *volume* that were replaced (their engine has
        dropped them), and then their records."""
        for replica in await self.replicas_of(volume.name, removing=True):
            if not replica.removing or not self.mine(replica.node):
                continue
            await self.thread(self.supervisor.stop_replica, replica)
            await self.thread(self.supervisor.delete_replica_dir, replica)
            await self.store.delete(replica.key)
            log.info("volume %s: replaced replica %s deleted", volume.name, replica.name)

    async def _drain(self, volume: Volume, replicas: list[ReplicaRecord]) -> Volume:
        """The leader's part of a drain and of a disk eviction: each replica of *volume* on
        a draining node or an evicted disk gets a replacement elsewhere (``evicting_from``
        names it), which its engine rebuilds; a detached volume is attached meanwhile,
        without a device (``maintenance``), on this node, and detached again once no
        replica is left to move. The volume as it is now."""
        nodes, _ = await self.placement.nodes()
        draining = {name for name, node in nodes.items() if node.draining}
        replacing = {r.evicting_from for r in replicas if r.evicting_from}

        def leaves(replica: ReplicaRecord) -> bool:
            return replica.node in draining or replica.disk in self._evicting

        leaving = [r for r in replicas if leaves(r) and r.name not in replacing
                   and not r.removing]
        staying = [r for r in replicas if not leaves(r) and not r.removing]
        if not leaving and not replacing:
            if volume.maintenance:
                log.info("volume %s: drained; detached again", volume.name)
                return await self._set_spec(volume, attached=False, maintenance=False)
            return volume
        for old in leaving:
            async with self.placement.lock:
                try:
                    [new] = await self.placement.plan_replicas(volume, staying, 1)
                except FailedPrecondition as exc:
                    if self._note(volume.name, f"drain {old.name}", str(exc)):
                        log.warning("volume %s: replica %s cannot leave node %s: %s",
                                    volume.name, old.name, old.node, exc)
                    continue
                new = replace(new, evicting_from=old.name)
                await self.store.put(new.key, new.to_dict(), expect=0)
            staying.append(new)
            where = f"node {old.node}" if old.node in draining else \
                f"evicted disk {old.disk} (node {old.node})"
            await self.events.record(volume.name, "replica-draining",
                                     f"replica {old.name} leaves {where}: rebuilt as "
                                     f"{new.name} on node {new.node} first")
        if not volume.attached:
            log.info("volume %s: attached on node %s (no device) to rebuild the replicas "
                     "leaving a drained node", volume.name, self.config.node_name)
            return await self._set_spec(volume, attached=True, maintenance=True,
                                        node=self.config.node_name)
        return volume

    async def _keep_local(self, volume: Volume, replicas: list[ReplicaRecord]) -> None:
        """The leader's part of data locality ``best-effort``: a volume attached on a node
        without a replica of it gets one built there, in place of a replica on another
        node (``evicting_from``), which leaves once the new one serves. When that node
        cannot take one, the volume serves from the others (it is best effort)."""
        if volume.data_locality != "best-effort" or not volume.node or volume.maintenance:
            return
        current = [r for r in replicas if not r.removing]
        if any(r.node == volume.node or r.evicting_from for r in current):
            return
        remote = [r for r in current if r.node != volume.node]
        if not remote:
            return
        old = remote[-1]
        async with self.placement.lock:
            try:
                [new] = await self.placement.plan_replicas(
                    volume, [r for r in current if r is not old], 1, on_node=volume.node)
            except FailedPrecondition as exc:
                if self._note(volume.name, "locality", str(exc)):
                    log.info("volume %s: no replica can be kept on node %s (data locality "
                             "best-effort): %s", volume.name, volume.node, exc)
                return
            new = replace(new, evicting_from=old.name)
            await self.store.put(new.key, new.to_dict(), expect=0)
        await self.events.record(volume.name, "replica-local",
                                 f"replica {new.name} is built on node {volume.node}, where "
                                 f"the volume is attached (data locality best-effort); "
                                 f"{old.name} on node {old.node} leaves once it serves")

    async def _set_spec(self, volume: Volume, **changes: Any) -> Volume:
        entry = await self.store.update(volume.key, lambda value: replace(
            Volume.from_dict(value), **changes).to_dict())
        return Volume.from_dict(entry.value) if entry else volume

    async def _finish_drain(self, volume: Volume, replicas: list[ReplicaRecord],
                            status: dict[str, Any]) -> None:
        """On the engine's node: a replacement of a leaving replica that serves (RW) takes
        its place; the leaving one is marked removing (it leaves the engine, then its node
        deletes it). The volume never has fewer serving replicas than it asks for."""
        modes = {r["address"]: r["mode"] for r in status["replicas"]}
        by_name = {r.name: r for r in replicas}
        for new in replicas:
            old = by_name.get(new.evicting_from)
            if not new.evicting_from or modes.get(new.address(self.config.replica_address)) \
                    != "RW":
                continue
            if old is not None:
                await self._put_replica(replace(old, removing=True))
            await self._put_replica(replace(new, evicting_from=""))
            await self.events.record(volume.name, "replica-drained",
                                     f"replica {new.name} serves in place of "
                                     f"{new.evicting_from}")

    async def _drop_replaced(self, volume: Volume, replicas: list[ReplicaRecord],
                             status: dict[str, Any]) -> None:
        """Take replicas that were replaced (marked removing) out of the engine."""
        current = {r.address(self.config.replica_address) for r in replicas}
        gone = {r.address(self.config.replica_address)
                for r in await self.replicas_of(volume.name, removing=True) if r.removing}
        for reported in status["replicas"]:
            address = reported["address"]
            if address in gone and address not in current:
                log.info("volume %s: dropping replaced replica %s from its engine",
                         volume.name, address)
                with contextlib.suppress(ApplianceError):
                    await self.thread(partial(self.supervisor.engine_call, volume.name,
                                              "remove-replica", address=address))

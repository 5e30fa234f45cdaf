"""What the volume controller does when an attached volume's engine cannot serve: engine
starts that are refused, engines that faulted, salvage requests, and replicas kept because
they hold a diverged branch (docs/membership.md). Mixed into
:class:`~appliance.node.controller.Controller`.

* A faulted engine is restarted (with ``auto_salvage``), never with salvage: the engine
  serves again only when no acknowledged write can be missing.
* A refused start keeps the volume faulted with the refusal as its message; it is logged
  and recorded as an event once (when it changes), and tried again every RETRY_INTERVAL,
  or at once when the volume or its replicas change (a replica server that starts again).
* A salvage happens only at an operator's request (``salvage_request`` in the volume's
  spec), carried out by the next start; the engine's salvage report is kept in the
  volume's status with replica names, and recorded as an event.
* A replica the engine keeps (diverged) becomes a detached volume of its own.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from appliance.control.objects import ReplicaRecord, Settings, Volume
from appliance.control.store import StateStore
from appliance.errors import ApplianceError, FailedPrecondition
from appliance.node.config import NodeConfig
from appliance.node.events import EventLog
from appliance.node.lineage import (
    ReplicaNames,
    branch_volume_name,
    describe_salvage,
    keep_as_volume,
    node_terms,
    one_line,
)
from appliance.node.supervisor import Supervisor
from appliance.replication import membership

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_INTERVAL = 30.0  # seconds: a refused engine start is tried again this often


class Recovery:
    """The controller's work on engines that do not serve (see the module)."""

    store: StateStore
    supervisor: Supervisor
    config: NodeConfig
    events: EventLog
    # the last thing said (logged, recorded as an event) per (volume, topic)
    _said: dict[tuple[str, str], str]
    # per volume, its engine's last refusal: (message, what it was tried with, when)
    _refused: dict[str, tuple[str, Any, float]]

    if TYPE_CHECKING:  # provided by the Controller
        async def thread(self, function: Callable[..., T], *args: Any) -> T: ...
        def poke(self) -> None: ...
        async def _status(self, name: str, **changes: Any) -> None: ...
        async def _put_replica(self, replica: ReplicaRecord) -> None: ...

    async def _learn_replica_ids(self, replicas: list[ReplicaRecord],
                                 status: dict[str, Any] | None) -> None:
        """Keep the replica ids the engine reports (its messages name replicas by id)."""
        ids = {r["address"]: r.get("replica_id") for r in status["replicas"]} if status else {}
        for replica in replicas:
            found = ids.get(replica.address(self.config.replica_address))
            if found and replica.replica_id != found:
                await self._put_replica(replace(replica, replica_id=found))

    def _note(self, volume: str, topic: str, message: str) -> bool:
        """Remember *message* as the last one about *topic* of *volume*; True when it is
        new (so that a condition seen at every pass is logged, and recorded, once)."""
        key = (volume, topic)
        if self._said.get(key, "") == message:
            return False
        if message:
            self._said[key] = message
        else:
            self._said.pop(key, None)
        return True

    async def names(self) -> ReplicaNames:
        entries, _ = await self.store.list(ReplicaRecord.PREFIX)
        return ReplicaNames([ReplicaRecord.from_dict(e.value) for e in entries],
                            self.config.replica_address)

    async def _start(self, volume: Volume, replicas: list[ReplicaRecord],
                     failures: dict[str, ApplianceError]) -> bool:
        """Start the engine of *volume* (carrying out a pending salvage request); False
        when the start was refused, or not tried again yet after a refusal: that happens
        every RETRY_INTERVAL, or at once when the volume or its replicas change."""
        name = volume.name
        request = volume.pending_salvage
        key = (volume.salvage_request["id"] if volume.salvage_request else 0,
               tuple((r.name, r.port) for r in replicas), tuple(sorted(failures)))
        last = self._refused.get(name)
        if last is not None and last[1] == key and volume.refusal == last[0] and \
                trio.current_time() - last[2] < RETRY_INTERVAL:
            return False
        try:
            await self._try_start(volume, replicas, failures, request)
        except ApplianceError as exc:
            names = await self.names()
            message = one_line(names.text(node_terms(exc.message, name)),
                               self.supervisor.engine_log(name))
            self._refused[name] = (message, key, trio.current_time())
            # once: not at every try, nor again after a daemon restart
            if self._note(name, "refused", message) and volume.refusal != message:
                log.warning("volume %s: its engine refused to start: %s", name, message)
                await self.events.record(name, "start-refused", message)
            await self._status(name, state="attaching", device=None, robustness="faulted",
                               refusal=message, message=message,
                               salvage_done=request["id"] if request else volume.salvage_done)
            return False
        self._refused.pop(name, None)
        if request:
            await self._status(name, salvage_done=request["id"])
        return True

    async def _try_start(self, volume: Volume, replicas: list[ReplicaRecord],
                         failures: dict[str, ApplianceError],
                         request: dict[str, Any] | None) -> None:
        sup = self.supervisor
        if len(failures) == len(replicas):
            raise next(iter(failures.values()))  # no replica to start with
        chosen = None
        if request and request.get("from"):
            chosen = next((r for r in replicas if r.name == request["from"]), None)
            if chosen is None:
                raise FailedPrecondition(f"replica {request['from']}, chosen for the salvage "
                                         f"of volume {volume.name}, is no longer one of its "
                                         "replicas")
        # A device left from an engine that died is dead too: set up again afterwards.
        await self.thread(sup.detach, volume.name)
        how = f" salvaging from {chosen.name}" if chosen else " with salvage" if request else ""
        log.info("volume %s: starting its engine%s", volume.name, how)
        await self.thread(partial(sup.start_engine, volume, replicas,
                                  salvage=request is not None and chosen is None,
                                  salvage_from=chosen))

    async def _started(self, volume: Volume, status: dict[str, Any]) -> None:
        """After a start that followed a fault or a refusal: an event saying it serves."""
        faulted = self._said.pop((volume.name, "faulted"), None)
        refused = self._said.pop((volume.name, "refused"), None)
        started = status.get("started") or {}
        if not (faulted or refused) or started.get("salvaged"):
            return  # a salvage has an event of its own
        names = await self.names()
        parts = [f"its engine serves again from "
                 f"{', '.join(str(names.name(a)) for a in started.get('rw', []))}"]
        for field_name, what in (("behind", "rebuilding"), ("kept", "keeping"),
                                 ("unreachable", "without")):
            if started.get(field_name):
                parts.append(f"{what} {', '.join(str(names.name(a)) for a in started[field_name])}")
        await self.events.record(volume.name, "recovered", "; ".join(parts))

    async def _faulted(self, volume: Volume, settings: Settings, fenced: str | None = None
                       ) -> None:
        """Every replica of the running engine failed: restart it without salvage when
        auto_salvage is on (it serves again only when no acknowledged write can be
        missing), or for a salvage request; otherwise wait for one. A fenced engine (in a
        cluster: the witness refused it, or could not be reached) is always restarted:
        its next start asks the witness again, and serves only if it may."""
        name = volume.name
        restart = settings.auto_salvage or volume.pending_salvage or fenced
        if fenced:
            message = (f"its engine was fenced ({fenced}); restarting it: it serves again "
                       "only if the volume's witness lets it")
        elif settings.auto_salvage or volume.pending_salvage:
            message = "every replica failed; restarting its engine" + (
                " to carry out the salvage request" if volume.pending_salvage else
                " (without salvage: it serves again only if no acknowledged write can be "
                "missing)")
        else:
            message = ("every replica failed; auto_salvage is off: 'appliance volume salvage "
                       f"{name} [--from REPLICA]' restarts its engine")
        first = (name, "faulted") not in self._said  # this fault, not its next step
        if self._note(name, "faulted", message):
            log.log(logging.WARNING if first else logging.INFO, "volume %s: %s", name, message)
            if first:
                await self.events.record(name, "fenced" if fenced else "faulted", message)
        await self._status(name, robustness="faulted", message=message)
        if restart:
            await self.thread(self.supervisor.stop_engine, name)
            self.poke()  # the next pass starts it again

    async def _drop_salvage_request(self, volume: Volume, status: dict[str, Any]) -> None:
        """A salvage request for an engine that serves (it recovered meanwhile) is moot:
        carried out as nothing, so that it cannot apply to a later start by surprise."""
        request = volume.pending_salvage
        assert request is not None
        log.info("volume %s: its engine serves (%s): salvage request %s dropped", volume.name,
                 status["state"], request["id"])
        await self._status(volume.name, salvage_done=request["id"])

    async def _observe(self, volume: Volume, status: dict[str, Any]) -> None:
        """Keep the engine's salvage report in the volume's status (with replica names);
        a salvage this start made is an event."""
        salvage = status.get("salvage")
        stored = volume.salvage

        def identity(report: dict[str, Any] | None) -> Any:
            return (report.get("at"), report.get("generation"), report.get("replica_id")) \
                if report else None

        if identity(salvage) == identity(stored):
            return
        named = (await self.names()).salvage(salvage)
        await self._status(volume.name, salvage=named)
        if named and (status.get("started") or {}).get("salvaged"):
            text = describe_salvage(named)
            log.warning("volume %s: %s", volume.name, text)
            await self.events.record(volume.name, "salvaged", text)

    async def _keep_branches(self, volume: Volume, replicas: list[ReplicaRecord],
                             status: dict[str, Any]) -> set[str]:
        """Each replica the engine keeps out of service because it holds a diverged branch
        becomes a detached volume of its own (its data stays until that volume is
        deleted); the volume goes on without it, and gets a new replica in its place at
        the next pass. Returns the names of the replicas it lost.

        Order: the new volume (which names the replica it takes) is stored first, so that
        from then on no pass of this volume touches the replica (a replica the engine
        does not know is otherwise added to it, and rebuilt: its data would go); then the
        replica leaves the engine; then the new volume takes it over (:meth:`_adopt`)."""
        by_address = {r.address(self.config.replica_address): r for r in replicas}
        taken = {Volume.from_dict(e.value).name for e in (await self.store.list(
            Volume.PREFIX))[0]}
        moved: set[str] = set()
        for info in status["replicas"]:
            if not info.get("diverged"):
                continue
            replica = by_address.get(info["address"])
            new = None
            if replica is not None:
                branch = str(info["diverged"].get("branch") or "unknown")
                name = branch_volume_name(volume.name, branch, taken)
                taken.add(name)
                log.info("volume %s: replica %s holds diverged branch %s: keeping it as "
                         "volume %s", volume.name, replica.name, branch, name)
                new = Volume(name, volume.size, 1, membership.now(),
                             labels={"diverged-from": volume.name},
                             source={"diverged-from": volume.name, "replica": replica.name,
                                     "branch": branch},
                             message=f"taking over replica {replica.name} of volume "
                                     f"{volume.name}")
                await self.store.put(new.key, new.to_dict(), expect=0)
                moved.add(replica.name)
            # not this volume's (any more): out of its engine, which never writes to it
            with contextlib.suppress(ApplianceError):
                await self.thread(partial(self.supervisor.engine_call, volume.name,
                                          "remove-replica", address=info["address"]))
            if new is not None:
                await self._adopt(new)
        if moved:
            self.poke()  # the next pass places replicas in their place
        return moved

    async def _adopt(self, volume: Volume) -> None:
        """Finish making *volume* the owner of the replica it keeps from another volume:
        the replica's record rewritten for it (offline), the replica object renamed;
        idempotent (a pass after a crash half-way finishes it)."""
        assert volume.source is not None
        origin, old_name = volume.source["diverged-from"], volume.source["replica"]
        entry = await self.store.get(ReplicaRecord.key_of(old_name))
        if entry is not None:
            old = ReplicaRecord.from_dict(entry.value)
            await self.thread(self.supervisor.stop_replica, old)
            replica_id = await self.thread(keep_as_volume, Path(old.directory), origin,
                                           volume.name)
            suffix = old.name[len(origin) + 1:] if old.name.startswith(origin + "-") \
                else uuid.uuid4().hex[:8]
            moved = replace(old, name=f"{volume.name}-{suffix}", volume=volume.name,
                            failed_at=None, replica_id=replica_id)
            await self.store.put(moved.key, moved.to_dict())
            await self.store.delete(old.key)
            await self.events.record(origin, "branch-kept", (
                f"replica {old.name} holds diverged branch "
                f"{volume.source.get('branch', '')[:8]}, which may hold acknowledged writes "
                f"the volume lacks: kept as volume {volume.name} (replica {moved.name}); "
                f"delete it when its data is no longer needed"))
        await self._status(volume.name, state="detached", message="")

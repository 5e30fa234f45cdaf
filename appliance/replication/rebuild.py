"""Rebuilding a replica online: the engine's half (DESIGN "Rebuild", invariant 3).

:func:`rebuild_member`:

1. stops writes for a moment, takes a system snapshot ``rebuild-…`` on every RW replica and
   on the target, gives the target the source's revision, and puts the target in WO mode:
   from then on it receives every live write into its new head;
2. asks the target's server to rebuild from a source replica (the server's half,
   :mod:`appliance.replication.rebuild_job`, pulls directly from the source's server);
3. checks the snapshot layers' checksums while writes go on (snapshot layers do not change,
   and no structure change runs during a rebuild), then stops writes again, checks that
   target and source list the same layers and that their heads (which took the same
   writes) have the same checksum, and only then makes the target RW. Any failure restarts
   the procedure, with another source if the source failed; the target is never RW before
   this check passed.

While writes are stopped every request is bounded by the data timeout (``timeout``), not the
control timeout: a replica that stops answering then holds every client write for at most
that long, as it would during a write.

The engine hands a rebuild a :class:`RebuildContext`, not itself: what a rebuild may do to
the engine is listed there.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from appliance.errors import ApplianceError, FailedPrecondition, StorageIOError
from appliance.replication import protocol as proto
from appliance.replication.client import ReplicaConnection
from appliance.replication.lockorder import Lock
from appliance.replication.member import Member, Mode
from appliance.replication.protocol import Op
from appliance.replication.roster import Roster

log = logging.getLogger(__name__)

PREFIX = "rebuild-"  # the names of the system snapshots rebuilds take
ATTEMPTS = 5
POLL = 0.1


@dataclass(frozen=True)
class RebuildContext:
    """What a rebuild uses of its engine."""

    volume: str
    members: Roster  # modes change only through it
    one_at_a_time: Lock  # the engine's rebuild lock
    #: stops new writes and waits for those in flight while the context is entered
    pause_writes: Callable[[], AbstractContextManager[Any]]
    #: runs an action on a pooled connection to a member (bounded by the data timeout)
    call: Callable[[Member, Callable[[ReplicaConnection], Any]], Any]
    #: snapshots every RW member (writes paused by the caller); a member that fails leaves
    snapshot_in_service: Callable[[str], None]
    size: Callable[[], int]  # the volume's size in bytes
    closed: threading.Event  # set when the engine stops
    timeout: float  # the data timeout
    control_timeout: float  # long operations, while writes go on
    bandwidth: int  # bytes per second the rebuild job may copy, 0 for no limit


class TargetFailed(StorageIOError):
    """The replica being rebuilt failed: retrying cannot help until it is back."""


def rebuild_member(context: RebuildContext, member: Member) -> None:
    """Bring *member* from out of service (or new) to RW, proven equal (see the module)."""
    created: list[str] = []
    member.rebuild = {"state": "queued"}
    with context.one_at_a_time:
        try:
            _rebuild(context, member, created)
        finally:
            _remove_snapshots(context, created)


def _rebuild(context: RebuildContext, member: Member, created: list[str]) -> None:
    for attempt in range(1, ATTEMPTS + 1):
        if context.closed.is_set() or member not in context.members.seats:
            return
        try:
            _attempt(context, member, created)
        except TargetFailed as exc:
            log.warning("volume %s: rebuild of %s stopped: %s", context.volume,
                        member.name, exc)
            member.rebuild = {**(member.rebuild or {}), "state": "failed",
                              "error": str(exc)}
            return
        except ApplianceError as exc:
            log.warning("volume %s: rebuild of %s, attempt %d failed: %s", context.volume,
                        member.name, attempt, exc)
            continue
        log.info("volume %s: replica %s rebuilt and in service", context.volume,
                 member.name)
        return
    if member.mode == Mode.WO:
        context.members.fail(member, StorageIOError(f"rebuild gave up after {ATTEMPTS} "
                                                    "attempts"))


def _attempt(context: RebuildContext, member: Member, created: list[str]) -> None:
    rw = context.members.serving()
    if not rw:
        raise StorageIOError("no replica in service to rebuild from")
    source = sorted(rw, key=lambda m: not m.local)[0]
    name = f"{PREFIX}{os.urandom(4).hex()}"
    member.rebuild = {"state": "starting", "source": source.name}
    with context.pause_writes():
        _retire_leftovers(context)
        _prepare_target(context, member, name)
        context.snapshot_in_service(name)
        created.append(name)
        revision = context.call(source, lambda conn: conn.status()["revision"])
        with member.connect(timeout=context.timeout) as target:
            target.set_revision(revision)
        if not context.members.begin_rebuild(member):
            raise TargetFailed(f"replica {member.name} could not start rebuilding: "
                               f"{member.reason or 'the engine is stopping'}")
    _run_job(context, member, source, name)
    wanted = _snapshot_digests(context, source)
    have = _snapshot_digests(context, member)
    with context.pause_writes():
        if member.mode != Mode.WO:
            raise TargetFailed(f"replica {member.name}: {member.reason}")
        problem = _compare(context, (source, wanted), (member, have))
        if problem:
            raise StorageIOError(f"verification failed: {problem}")
        # The rebuild snapshot goes before the replica serves, so that a healthy volume has
        # no rebuild left to finish (and every replica lists the same live snapshots).
        _retire(context, [name], context.timeout)
        created.remove(name)
    _purge(context)
    if not context.members.promote(member):
        raise TargetFailed(f"replica {member.name} could not be made RW: "
                           f"{member.reason or 'the engine is stopping'}")
    member.rebuild = {**(member.rebuild or {}), "state": "done"}


def _prepare_target(context: RebuildContext, member: Member, name: str) -> None:
    """Give the target the volume's size and the rebuild snapshot (writes are paused)."""
    size = context.size()
    try:
        with member.connect(timeout=context.timeout) as target:
            status = target.status()
            if status["size"] > size:
                raise TargetFailed(f"replica {member.name} is larger than the volume")
            if status["size"] < size:
                target.expand(size)
            member.replica_id = status["replica_id"]
            target.snapshot(name, user_created=False)
        member.learn_unix_socket(status.get("unix_socket"))
    except TargetFailed:
        raise
    except ApplianceError as exc:
        if member.mode == Mode.WO:
            context.members.fail(member, exc)
        raise TargetFailed(f"replica {member.name}: {exc}") from exc


def _run_job(context: RebuildContext, member: Member, source: Member, name: str) -> None:
    request = {"source": source.name, "snapshot": name, "bandwidth": context.bandwidth,
               "timeout": context.timeout}
    with member.connect(timeout=context.control_timeout) as conn:
        conn.call(Op.REBUILD, payload=proto.encode_json(request))
    last_progress, last_copied = time.monotonic(), -1
    with member.connect(timeout=context.timeout) as conn:
        while True:
            if member.mode != Mode.WO:
                raise TargetFailed(f"replica {member.name}: {member.reason}")
            status = proto.decode_json(conn.call(Op.REBUILD_STATUS)) or {}
            member.rebuild = status
            if status.get("state") == "done":
                return
            if status.get("state") in ("failed", "cancelled"):
                raise StorageIOError(f"the rebuild job stopped: {status.get('error')}")
            if status.get("copied_bytes") != last_copied:
                last_progress, last_copied = time.monotonic(), status.get("copied_bytes", 0)
            elif time.monotonic() - last_progress > context.timeout * 30:
                raise StorageIOError("the rebuild job made no progress")
            if context.closed.wait(POLL):
                raise FailedPrecondition("the engine is stopping")


def _snapshot_digests(context: RebuildContext, member: Member) -> dict[str, str]:
    """The checksum of each snapshot layer of *member* (taken while writes go on: they are
    long, and snapshot layers do not change)."""
    timeout = context.control_timeout
    with member.connect(timeout=timeout) as conn:
        return {x["name"]: conn.checksum(x["name"], timeout=timeout)["digest"]
                for x in conn.layers() if x["name"] is not None}


def _compare(context: RebuildContext, source: tuple[Member, dict[str, str]],
             target: tuple[Member, dict[str, str]]) -> str:
    """An empty string when target and source have the same layers with the same
    checksums (*digests* of each) and identical heads (writes are stopped while this
    runs)."""
    def describe(member: Member, digests: dict[str, str]) -> list[tuple[Any, ...]]:
        with member.connect(timeout=context.timeout) as conn:
            layers = [x for x in conn.layers() if x["name"] is not None]
            head = conn.checksum(None)["digest"]
            size = conn.status()["size"]
        if {x["name"] for x in layers} != digests.keys():
            raise StorageIOError(f"the snapshot layers of {member.name} changed during the "
                                 "verification")
        return [(x["name"], x["parent"], x["removed"], digests[x["name"]])
                for x in layers] + [("(head)", head, size)]

    want, have = describe(*source), describe(*target)
    if want == have:
        return ""
    diff = [f"{w} != {h}" for w, h in zip(want, have, strict=False) if w != h]
    return f"{len(diff)} difference(s), first: {diff[0] if diff else 'the layer count'}"


def _remove_snapshots(context: RebuildContext, names: list[str]) -> None:
    """Mark the snapshots of failed rebuild attempts removed on every replica in service,
    and purge."""
    if names:
        _retire(context, names, context.control_timeout)
        _purge(context)


def _retire(context: RebuildContext, names: list[str], timeout: float) -> None:
    """Mark rebuild snapshots *names* removed on every replica in service (a metadata
    change; purge then reclaims them); each request bounded by *timeout*."""
    for member in context.members.in_service():
        try:
            with member.connect(timeout=timeout) as conn:
                live = {x["name"] for x in conn.layers() if not x["removed"]}
                for name in names:
                    if name in live:
                        conn.remove_snapshot(name)
        except ApplianceError as exc:
            log.warning("volume %s: could not remove rebuild snapshots from %s: %s",
                        context.volume, member.name, exc)


def _retire_leftovers(context: RebuildContext) -> None:
    """Rebuild snapshots an engine that died in a rebuild left behind: removed before the
    next rebuild (which then copies them as removed layers, and purges them). Writes are
    paused: each request is bounded by the data timeout."""
    names: set[str] = set()
    for member in context.members.serving():
        try:
            with member.connect(timeout=context.timeout) as conn:
                names.update(x["name"] for x in conn.layers() if x["name"] and
                             x["name"].startswith(PREFIX) and not x["user_created"] and
                             not x["removed"])
        except ApplianceError:
            continue  # a replica that fails is found by the rebuild's own steps
    if names:
        log.info("volume %s: removing %d rebuild snapshot(s) left by an earlier engine",
                 context.volume, len(names))
        _retire(context, sorted(names), context.timeout)


def _purge(context: RebuildContext) -> None:
    """Reclaim removed snapshots on every replica in service while I/O goes on."""
    for member in context.members.in_service():
        try:
            with member.connect(timeout=context.control_timeout) as conn:
                conn.purge(timeout=context.control_timeout)
        except ApplianceError as exc:
            log.warning("volume %s: could not purge %s: %s", context.volume, member.name,
                        exc)

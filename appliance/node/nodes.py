"""This node's membership of the cluster: registration, heartbeat, leadership, and what
the API says and changes about nodes (docs/cluster.md).

A node registers its :class:`~appliance.control.objects.Node` record when it starts and
keeps a :class:`~appliance.control.objects.NodeAlive` key under a lease of
``node_lease_ttl`` seconds, renewed every third of that: a node whose lease expired is
``down``. Cluster-wide decisions (placement, replacement, the end of a deletion) are taken
by one **leader**: the node whose lease holds the key ``/leader``. A leader that cannot renew
its lease stops acting as one before the lease can have expired in etcd (it counts from
the moment it asked for the renewal), so two leaders never act at once.

In single-node mode (SQLite) the node registers the same way and is always the leader.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import time
from dataclasses import replace
from typing import Any

import trio

from appliance import __version__
from appliance.control.objects import Node, NodeAlive, ReplicaRecord, check_tags
from appliance.control.store import StateStore
from appliance.errors import (
    AlreadyExists,
    ApplianceError,
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from appliance.node.config import NodeConfig
from appliance.node.events import EventLog

log = logging.getLogger(__name__)
LEADER_KEY = "/leader"
_LABEL_KEY = r"[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?"


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def check_label(key: str, value: str) -> None:
    if not re.fullmatch(_LABEL_KEY, key):
        raise InvalidArgument(f"invalid label key {key!r}: letters, digits, '.', '_', '/', "
                              "'-', at most 63")
    if len(value) > 63 or not re.fullmatch(r"[A-Za-z0-9._-]*", value):
        raise InvalidArgument(f"invalid value {value!r} of label {key}: letters, digits, "
                              "'.', '_', '-', at most 63")


class Membership:
    def __init__(self, store: StateStore, config: NodeConfig, events: EventLog) -> None:
        self.store = store
        self.config = config
        self.events = events
        self.name = config.node_name
        self._lease: int | None = None
        self._renewed = 0.0  # trio clock: when the last renewal that succeeded was asked
        self._leading = False
        self._states: dict[str, str] = {}  # the states the leader last saw (events)
        self.changed = trio.Event()  # set when leadership or a node's state changes

    # -- joining and the heartbeat ------------------------------------------------------

    async def join(self) -> None:
        """Register this node (its address, API and version; what operators set stays)
        and its alive key. Refuses a name that a running node at another address uses."""
        key = Node.key_of(self.name)
        entry = await self.store.get(key)
        alive = await self.store.get(NodeAlive.key_of(self.name))
        if entry is not None and alive is not None and self.config.clustered:
            known = Node.from_dict(entry.value)
            if known.address != self.config.replica_address:
                raise AlreadyExists(f"node name {self.name} is in use by a running node at "
                                    f"{known.address}; choose another --node-name")
        if entry is None:
            node = Node(self.name, self.config.replica_address, self.config.api_address,
                        __version__, joined=now_iso())
            try:
                await self.store.put(key, node.to_dict(), expect=0)
            except Conflict:
                raise AlreadyExists(f"node {self.name} registered meanwhile by another "
                                    "process; choose another --node-name") from None
        else:
            await self.store.update(key, lambda value: replace(
                Node.from_dict(value), address=self.config.replica_address,
                api=self.config.api_address, version=__version__).to_dict())
        await self._renew()

    async def _renew(self) -> None:
        """Keep the lease (a new one when it expired) and write the alive key."""
        asked = trio.current_time()
        if self._lease is not None:
            try:
                await self.store.keep_alive(self._lease)
            except NotFound:
                log.warning("node %s: its lease expired (cut off from the store for longer "
                            "than %g s); joining again", self.name, self.config.node_lease_ttl)
                self._lease = None
                self._leading = False
        if self._lease is None:
            self._lease = await self.store.grant_lease(self.config.node_lease_ttl)
        alive = NodeAlive(self.name, time.time(), os.getpid())
        await self.store.put(NodeAlive.key_of(self.name), alive.to_dict(), lease=self._lease)
        self._renewed = asked

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The heartbeat, the leader election and the leader's look at the nodes."""
        task_status.started()
        period = self.config.node_lease_ttl / 3
        failing = False
        while True:
            try:
                await self._renew()
                await self._campaign()
                if self.is_leader:
                    await self._note_states()
            except ApplianceError as exc:
                if not failing:
                    log.warning("node %s: heartbeat failed: %s", self.name, exc)
                failing = True
            else:
                if failing:
                    log.info("node %s: heartbeat works again", self.name)
                failing = False
            await trio.sleep(period)

    async def leave(self) -> None:
        """A clean stop: give up leadership and the alive key at once."""
        if self._lease is not None:
            try:
                await self.store.revoke(self._lease)
            except ApplianceError as exc:
                log.info("node %s: could not end its lease (it expires): %s", self.name, exc)
            self._lease = None
            self._leading = False

    # -- leadership ---------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        """Whether this node may take cluster-wide decisions now."""
        if not self.config.clustered:
            return True
        # a lease renewal asked at _renewed keeps the lease until _renewed + ttl in etcd at
        # the earliest; stop a third of the ttl before that
        margin = self.config.node_lease_ttl / 3
        return self._leading and \
            trio.current_time() < self._renewed + self.config.node_lease_ttl - margin

    async def _campaign(self) -> None:
        if not self.config.clustered or self._lease is None:
            return
        value = {"node": self.name, "since": now_iso()}
        entry = await self.store.get(LEADER_KEY)
        was = self._leading
        if entry is None:
            try:
                await self.store.put(LEADER_KEY, value, expect=0, lease=self._lease)
            except Conflict:
                entry = await self.store.get(LEADER_KEY)
            else:
                self._leading = True
        if entry is not None:
            self._leading = entry.value.get("node") == self.name and entry.lease == self._lease
        if self._leading != was:
            log.info("node %s: %s", self.name, "leader of the cluster now" if self._leading
                     else "no longer the leader")
            if self._leading:
                await self.events.record("", "leader", f"node {self.name} is the leader")
            self.changed.set()
            self.changed = trio.Event()

    async def leader(self) -> str | None:
        if not self.config.clustered:
            return self.name
        entry = await self.store.get(LEADER_KEY)
        return str(entry.value.get("node")) if entry else None

    async def _note_states(self) -> None:
        """The leader's look at the nodes: an event when one goes down or comes back."""
        states = {node["name"]: node["state"] for node in await self.describe_all()}
        for name, state in states.items():
            before = self._states.get(name)
            if before is not None and (before == "down") != (state == "down"):
                kind = "node-down" if state == "down" else "node-up"
                log.warning("node %s is %s", name, "down" if state == "down" else "back")
                await self.events.record("", kind, f"node {name} is "
                                         f"{'down (no heartbeat)' if state == 'down' else 'back'}")
                self.changed.set()
                self.changed = trio.Event()
        self._states = states

    # -- what the API says and changes --------------------------------------------------

    async def alive(self) -> dict[str, NodeAlive]:
        return {NodeAlive.from_dict(e.value).name: NodeAlive.from_dict(e.value)
                for e in (await self.store.list(NodeAlive.PREFIX))[0]}

    async def nodes(self) -> dict[str, Node]:
        return {Node.from_dict(e.value).name: Node.from_dict(e.value)
                for e in (await self.store.list(Node.PREFIX))[0]}

    @staticmethod
    def state(node: Node, alive: NodeAlive | None) -> str:
        if alive is None:
            return "down"
        return "cordoned" if node.cordoned else "ready"

    async def describe_all(self) -> list[dict[str, Any]]:
        nodes, alive = await self.nodes(), await self.alive()
        leader = await self.leader()
        replicas = [ReplicaRecord.from_dict(e.value)
                    for e in (await self.store.list(ReplicaRecord.PREFIX))[0]]
        return [self._describe(node, alive.get(name), leader, replicas)
                for name, node in sorted(nodes.items())]

    def _describe(self, node: Node, alive: NodeAlive | None, leader: str | None,
                  replicas: list[ReplicaRecord]) -> dict[str, Any]:
        return {"name": node.name, "address": node.address, "api": node.api,
                "state": self.state(node, alive), "zone": node.zone,
                "labels": node.labels, "tags": node.tags, "cordoned": node.cordoned,
                "leader": node.name == leader, "draining": node.draining,
                "version": node.version,
                "joined": node.joined,
                "last_heartbeat": alive.heartbeat if alive else None,
                "replicas": sum(1 for r in replicas if (r.node or self.name) == node.name)}

    async def get(self, name: str) -> dict[str, Any]:
        for node in await self.describe_all():
            if node["name"] == name:
                return node
        raise NotFound(f"node {name} does not exist; 'appliance node list' shows the nodes")

    async def node(self, name: str) -> Node:
        entry = await self.store.get(Node.key_of(name))
        if entry is None:
            raise NotFound(f"node {name} does not exist; 'appliance node list' shows the nodes")
        return Node.from_dict(entry.value)

    async def cordon(self, name: str, cordoned: bool) -> dict[str, Any]:
        await self.node(name)
        if cordoned:
            nodes, alive = await self.nodes(), await self.alive()
            others = [n for n in nodes.values() if n.name != name and not n.cordoned
                      and n.name in alive]
            if not others and not nodes[name].cordoned:
                raise FailedPrecondition(f"node {name} is the last node that can take new "
                                         "replicas; add or uncordon another node first")
        await self.store.update(Node.key_of(name), lambda value: replace(
            Node.from_dict(value), cordoned=cordoned,
            draining=Node.from_dict(value).draining and cordoned).to_dict())
        await self.events.record("", "node-cordoned" if cordoned else "node-uncordoned",
                                 f"node {name} {'cordoned' if cordoned else 'uncordoned'}")
        return await self.get(name)

    async def label(self, name: str, labels: dict[str, str | None],
                    tags: list[str] | None = None) -> dict[str, Any]:
        """Set labels (a value of None removes the label) and, given *tags*, the tags."""
        for key, value in labels.items():
            check_label(key, value or "")
        checked = check_tags(tags) if tags is not None else None
        await self.node(name)

        def change(value: dict[str, Any]) -> dict[str, Any]:
            node = Node.from_dict(value)
            merged = {**node.labels, **{k: v for k, v in labels.items() if v is not None}}
            for key in [k for k, v in labels.items() if v is None]:
                merged.pop(key, None)
            return replace(node, labels=dict(sorted(merged.items())),
                           tags=checked if checked is not None else node.tags).to_dict()

        await self.store.update(Node.key_of(name), change)
        return await self.get(name)

"""Scrubs on a node (docs/scrub.md): ``volume scrub`` starts one, in a worker thread that
a cancellation reaches; its record (``/scrubs/VOLUME``) says how it went, with what it
found. An attached volume's replicas are reached through their servers (the request is
forwarded to the node of its engine); a detached one's directories are opened here."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

import trio

from appliance.chain import Replica
from appliance.control.objects import ReplicaRecord, Scrub
from appliance.control.store import StateStore
from appliance.errors import ApplianceError, Cancelled, FailedPrecondition, NotFound
from appliance.node.placement import load_settings
from appliance.node.service import NodeService
from appliance.node.work import run_job
from appliance.replication import protocol as proto
from appliance.replication.client import ReplicaConnection
from appliance.replication.protocol import Role
from appliance.replication.scrub import LocalPeer, Peer, RemotePeer, ScrubReport, scrub
from appliance.secrets import read_secret_file

log = logging.getLogger(__name__)
STOPPED = "cancelled: the node daemon stopped during the scrub"


class ScrubService:
    def __init__(self, store: StateStore, service: NodeService) -> None:
        self.store = store
        self.service = service
        self.supervisor = service.controller.supervisor
        self.node = service.controller.config.node_name
        self._running: dict[str, threading.Event] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run scrubs until cancelled; a scrub this node left running when it stopped is
        recorded as cancelled."""
        entries, _ = await self.store.list(Scrub.PREFIX)
        for entry in entries:
            record = Scrub.from_dict(entry.value)
            if record.state == "running" and record.node == self.node:
                record.state, record.error, record.finished = "cancelled", STOPPED, time.time()
                await self.store.put(record.key, record.to_dict())
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def start(self, name: str) -> dict[str, Any]:
        """Start a scrub of volume *name*; its record (state ``running``)."""
        if name in self._running:
            raise FailedPrecondition(f"a scrub of volume {name} is running: wait for it "
                                     f"('appliance volume scrub {name} --wait')")
        stop = threading.Event()
        self._running[name] = stop  # reserved before the first wait: one scrub at a time
        try:
            _, directories = await self.service.where(name)
            replicas = await self.service.controller.replicas_of(name)
            rate = (await load_settings(self.store)).scrub_rate_limit << 20
            status = None
            if directories is None:
                status = await trio.to_thread.run_sync(self.supervisor.engine_status, name)
                if status is None:
                    raise FailedPrecondition(f"volume {name} has no engine running on node "
                                             f"{self.node}; try again when it is attached")
            record = Scrub(name, "running", time.time(), node=self.node)
            await self.store.put(record.key, record.to_dict())
        except BaseException:
            self._running.pop(name, None)
            raise
        assert self._nursery is not None
        self._nursery.start_soon(self._scrub, record, replicas, directories, status, rate, stop)
        return record.to_dict()

    async def show(self, name: str) -> dict[str, Any]:
        entry = await self.store.get(Scrub.key_of(name))
        if entry is None:
            await self.service.show_volume(name)  # NotFound for an unknown volume
            raise NotFound(f"volume {name} was never scrubbed ('appliance volume scrub "
                           f"{name}' starts one)")
        return entry.value

    async def _scrub(self, record: Scrub, replicas: list[ReplicaRecord],
                     directories: list[Path] | None, status: dict[str, Any] | None,
                     rate: int, stop: threading.Event) -> None:
        name = record.name
        try:
            report = await run_job(self._blocking, name, replicas, directories, status, rate,
                                   cancel=stop)
        except trio.Cancelled:
            record.state, record.error = "cancelled", STOPPED
            raise
        except Cancelled as exc:
            record.state, record.error = "cancelled", str(exc)
        except ApplianceError as exc:
            record.state, record.error = "failed", str(exc)
            log.warning("scrub of volume %s failed: %s", name, exc)
        except Exception as exc:  # a bug: the scrub fails, the daemon stays up
            record.state, record.error = "failed", f"internal error: {exc}"
            log.exception("scrub of volume %s", name)
        else:
            record.state, record.report, record.summary = "complete", report.as_dict(), \
                report.summary()
        finally:
            self._running.pop(name, None)
            record.finished = time.time()
            with trio.CancelScope(shield=True):
                await self.store.put(record.key, record.to_dict())
                kind = "scrub-lost" if record.report and record.report["lost"] else \
                    "scrub-repaired" if record.report and record.report["repaired"] else \
                    f"scrub-{record.state}"
                await self.service.controller.events.record(
                    name, kind, record.summary or record.error)

    def _blocking(self, name: str, replicas: list[ReplicaRecord],
                  directories: list[Path] | None, status: dict[str, Any] | None, rate: int,
                  *, cancel: threading.Event) -> ScrubReport:
        with contextlib.ExitStack() as stack:
            peers: list[Peer] = []
            skipped: list[str] = []
            connections: list[ReplicaConnection] = []
            done = threading.Event()

            def close_on_cancel() -> None:  # a wait on a replica server ends at once
                while not done.wait(0.2):
                    if cancel.is_set():
                        for connection in connections:
                            connection.close()
                        return

            watcher = threading.Thread(target=close_on_cancel, name=f"scrub-{name}",
                                       daemon=True)
            watcher.start()
            stack.callback(done.set)
            if directories is not None:
                for replica in replicas:
                    opened = stack.enter_context(Replica.open(Path(replica.directory)))
                    peers.append(LocalPeer(replica.name, opened, cancel))
            else:
                assert status is not None
                local = self.service.controller.config.replica_address
                names = {r.address(local): r.name for r in replicas}
                secret = read_secret_file(self.supervisor.secret_file(name))
                for member in status["replicas"]:
                    if member["mode"] != "RW":  # being rebuilt, or out of service
                        skipped.append(f"{names.get(member['address'], member['address'])} "
                                       f"({member['mode'] or 'out of service'})")
                        continue
                    connection = stack.enter_context(ReplicaConnection(
                        proto.parse_address(member["address"]), secret, role=Role.READER,
                        timeout=120))
                    connections.append(connection)
                    peers.append(RemotePeer(names.get(member["address"], member["address"]),
                                            connection))
            if not peers:
                raise FailedPrecondition(f"volume {name} has no replica in service")
            report = scrub(peers, rate, stop=cancel.is_set)
            report.skipped = skipped
            return report

"""What ``appliance node show`` (``GET /v1/node``) says about this node: its version and
configuration, its disks, its volumes by state, the replica server ports left, and the
engines and replica servers running with their pids.

Everything comes from what the daemon already holds (the configuration, the state store)
and from looking at the host: disks through :class:`~appliance.node.placement.Placement`
(bounded in time, like ``GET /v1/disks``), pid files and ports in one worker thread.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from appliance import __version__, ports
from appliance.control.objects import ReplicaRecord, Volume
from appliance.nbd import launch
from appliance.node.service import NodeService
from appliance.replication.protocol import format_address

DISK_FIELDS = ("name", "path", "tags", "capacity", "available", "scheduled")


@dataclass(frozen=True)
class PortUsage:
    """The replica server ports of this node, as placement chooses from them."""

    first: int
    last: int
    total: int
    assigned: int  # to replicas (their servers listen there when running)
    free: int  # not assigned, and bindable now
    taken: int  # not assigned, but held by another program

    def to_dict(self) -> dict[str, int]:
        return {"first": self.first, "last": self.last, "total": self.total,
                "assigned": self.assigned, "free": self.free, "taken": self.taken}


def port_usage(host: str, candidates: range, assigned: set[int]) -> PortUsage:
    """Blocking: how many of *candidates* are *assigned*, free, or taken by others."""
    mine = sum(1 for port in candidates if port in assigned)
    free = sum(1 for port in candidates
               if port not in assigned and ports.bindable(host, port))
    last = candidates[-1] if candidates else candidates.start
    return PortUsage(candidates.start, last, len(candidates), mine, free,
                     len(candidates) - mine - free)


def running_pid(pid_file: Path) -> int | None:
    """Blocking: the pid in *pid_file* while that process runs, else None."""
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return None
    return pid if launch.process_running(pid) else None


def engine_pid_file(nbd_socket: Path) -> Path:
    """Where an engine serving *nbd_socket* keeps its pid (EngineSettings.pid_file)."""
    return nbd_socket.with_name(nbd_socket.name + ".pid")


class NodeInfo:
    """The facts about the node behind *service* (see the module)."""

    def __init__(self, service: NodeService) -> None:
        self.service = service
        self.supervisor = service.controller.supervisor
        self.config = service.controller.config

    async def describe(self) -> dict[str, Any]:
        store = self.service.store
        volumes = [Volume.from_dict(e.value) for e in (await store.list(Volume.PREFIX))[0]]
        replicas = [ReplicaRecord.from_dict(e.value)
                    for e in (await store.list(ReplicaRecord.PREFIX))[0]]
        disks = await self.service.list_disks()
        usage, processes = await trio.to_thread.run_sync(self._look, volumes, replicas)
        config = self.config
        return {
            "name": config.node_name,
            "version": __version__,
            "pid": os.getpid(),
            "data_dir": str(config.data_dir),
            "api_listen": format_address(config.listen),
            "replica_address": config.replica_address,
            "replica_ports": usage.to_dict(),
            "disks": [{key: disk[key] for key in DISK_FIELDS} for disk in disks],
            "volumes": {"total": len(volumes),
                        "states": dict(sorted(Counter(v.state for v in volumes).items())),
                        "robustness": dict(sorted(Counter(v.robustness
                                                          for v in volumes).items()))},
            "processes": processes,
        }

    def _look(self, volumes: list[Volume],
              replicas: list[ReplicaRecord]) -> tuple[PortUsage, dict[str, Any]]:
        """Blocking: the port usage, and the engines and replica servers running."""
        usage = port_usage(self.config.replica_address, self.config.replica_ports,
                           {r.port for r in replicas})
        engines = []
        for volume in sorted(volumes, key=lambda v: v.name):
            pid = running_pid(engine_pid_file(self.supervisor.nbd_socket(volume.name)))
            if pid is not None:
                engines.append({"volume": volume.name, "pid": pid})
        servers = []
        for replica in sorted(replicas, key=lambda r: r.name):
            pid_file, _ = launch.replica_server_files(Path(replica.directory))
            pid = running_pid(pid_file)
            if pid is not None:
                servers.append({"replica": replica.name, "volume": replica.volume,
                                "port": replica.port, "pid": pid})
        return usage, {"engines": engines, "replica_servers": servers}

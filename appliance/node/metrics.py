"""Prometheus metrics: collected at scrape time from the store, the engines' status and
the replica directories, rendered with prometheus-client (naming: appliance_*, base units,
_total for counters)."""

from __future__ import annotations

import os
import time
from typing import Any

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from appliance import __version__
from appliance.control.objects import Disk, RecurringJobStatus, ReplicaRecord, Volume
from appliance.control.scheduler import DiskState
from appliance.control.store import StateStore
from appliance.node.backupjobs import BackupJobs
from appliance.node.config import NodeConfig
from appliance.node.nodes import Membership
from appliance.node.placement import Placement
from appliance.node.service import standby_lag
from appliance.node.supervisor import Supervisor

STATES = ("creating", "detached", "attaching", "attached", "detaching", "deleting", "failed")
ROBUSTNESS = ("healthy", "degraded", "faulted", "unknown")
MODES = ("RW", "WO", "ERR")


def allocated_bytes(directory: str) -> int:
    total = 0
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith("layer-") and entry.name.endswith(".img"):
                    total += entry.stat().st_blocks * 512
    except OSError:
        return 0
    return total


class _Snapshot(Collector):
    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> Any:
        return iter(self.families)


class Metrics:
    def __init__(self, store: StateStore, supervisor: Supervisor, config: NodeConfig, *,
                 placement: Placement, backup_jobs: BackupJobs | None = None,
                 membership: Membership | None = None) -> None:
        self.store = store
        self.membership = membership  # the nodes of the cluster (None: not reported)
        self.supervisor = supervisor
        self.config = config
        self.placement = placement  # disk usage, bounded in time
        self.backup_jobs = backup_jobs  # None: this node runs no backups

    async def render(self) -> bytes:
        volumes = [Volume.from_dict(e.value) for e in (await self.store.list(Volume.PREFIX))[0]]
        replicas = [ReplicaRecord.from_dict(e.value)
                    for e in (await self.store.list(ReplicaRecord.PREFIX))[0]]
        disks = [Disk.from_dict(e.value) for e in (await self.store.list(Disk.PREFIX))[0]]
        engines = {}
        targets: dict[str, dict[str, int]] = {}
        shares: dict[str, int] = {}
        for volume in volumes:
            if volume.attached:
                engines[volume.name] = await trio.to_thread.run_sync(
                    self.supervisor.engine_status, volume.name)
            if volume.frontend_info and volume.frontend_info.get("kind") == "iscsi" and \
                    self.placement.mine(volume.node):
                found = await trio.to_thread.run_sync(self.supervisor.iscsi_statistics,
                                                      volume.name)
                if found is not None:
                    targets[volume.name] = found
            if volume.share_info is not None and self.placement.mine(volume.node):
                shares[volume.name] = await trio.to_thread.run_sync(
                    self.supervisor.share_clients, volume.name)
        jobs = [RecurringJobStatus.from_dict(e.value)
                for e in (await self.store.list(RecurringJobStatus.PREFIX))[0]]
        usage = await self.placement.disk_states(disks, replicas, {v.name: v for v in volumes})
        nodes = await self.membership.describe_all() if self.membership else []
        families = await trio.to_thread.run_sync(self._families, volumes, replicas, disks,
                                                 usage, engines)
        families += self._nodes(nodes) + self._target_families(targets)
        clients = GaugeMetricFamily("appliance_share_clients",
                                    "Client hosts connected to the RWX volume's NFS export.",
                                    labels=["volume"])
        for volume_name, count in sorted(shares.items()):
            clients.add_metric([volume_name], count)
        families.append(clients)
        families += self._job_families(jobs)
        standby = GaugeMetricFamily("appliance_volume_standby_lag_seconds",
                                    "Age of the backup a standby volume holds (its RPO).",
                                    labels=["volume", "backup_volume"])
        for volume in volumes:
            lag = standby_lag(volume.standby) if volume.standby_of else None
            if lag is not None:
                standby.add_metric([volume.name, volume.standby_of], lag)
        families.append(standby)
        registry = CollectorRegistry()
        registry.register(_Snapshot(families))
        return generate_latest(registry)

    @staticmethod
    def _target_families(targets: dict[str, dict[str, int]]) -> list[Any]:
        """The iSCSI targets this node serves: sessions, and what those sessions moved."""
        sessions = GaugeMetricFamily("appliance_iscsi_sessions",
                                     "Initiators logged in to the volume's iSCSI target.",
                                     labels=["volume"])
        moved = {key: GaugeMetricFamily(f"appliance_iscsi_session_{key}", text,
                                        labels=["volume"])
                 for key, text in (("read_bytes", "Bytes read by the sessions logged in now."),
                                   ("written_bytes",
                                    "Bytes written by the sessions logged in now."),
                                   ("errors", "Failed commands of the sessions logged in now."))}
        for volume, found in sorted(targets.items()):
            sessions.add_metric([volume], found["sessions"])
            for key, family in moved.items():
                family.add_metric([volume], found[key])
        return [sessions, *moved.values()]

    @staticmethod
    def _nodes(nodes: list[dict[str, Any]]) -> list[Any]:
        ready = GaugeMetricFamily("appliance_node_ready",
                                  "1 while the node has a heartbeat (ready or cordoned).",
                                  labels=["node"])
        cordoned = GaugeMetricFamily("appliance_node_cordoned",
                                     "1 while the node takes no new replicas.", labels=["node"])
        leader = GaugeMetricFamily("appliance_node_leader", "1 for the cluster's leader.",
                                   labels=["node"])
        count = GaugeMetricFamily("appliance_node_replicas", "Replicas on the node.",
                                  labels=["node"])
        for node in nodes:
            ready.add_metric([node["name"]], int(node["state"] != "down"))
            cordoned.add_metric([node["name"]], int(node["cordoned"]))
            leader.add_metric([node["name"]], int(node["leader"]))
            count.add_metric([node["name"]], node["replicas"])
        return [ready, cordoned, leader, count]

    def _families(self, volumes: list[Volume], replicas: list[ReplicaRecord], disks: list[Disk],
                  states: dict[str, DiskState], engines: dict[str, Any]) -> list[Any]:
        node = GaugeMetricFamily("appliance_node_info", "This node.",
                                 labels=["node", "version"])
        node.add_metric([self.config.node_name, __version__], 1)
        families: list[Any] = [node]
        capacity = GaugeMetricFamily("appliance_disk_capacity_bytes", "Disk capacity.",
                                     labels=["disk"])
        available = GaugeMetricFamily("appliance_disk_available_bytes", "Disk free space.",
                                      labels=["disk"])
        scheduled = GaugeMetricFamily("appliance_disk_scheduled_bytes",
                                      "Sizes of the replicas placed on a disk.", labels=["disk"])
        for disk in disks:
            usage = states[disk.name]
            capacity.add_metric([disk.name], usage.capacity)
            available.add_metric([disk.name], usage.available)
            scheduled.add_metric([disk.name], usage.scheduled)
        families += [capacity, available, scheduled]
        size = GaugeMetricFamily("appliance_volume_size_bytes", "Volume size.", labels=["volume"])
        actual = GaugeMetricFamily("appliance_volume_actual_size_bytes",
                                   "Space the volume's replicas take on disk.", labels=["volume"])
        state = GaugeMetricFamily("appliance_volume_state", "Volume state (1 for the current).",
                                  labels=["volume", "state"])
        robust = GaugeMetricFamily("appliance_volume_robustness",
                                   "Volume robustness (1 for the current).",
                                   labels=["volume", "robustness"])
        count = GaugeMetricFamily("appliance_volume_replicas", "Replicas wanted.",
                                  labels=["volume"])
        for volume in volumes:
            size.add_metric([volume.name], volume.size)
            actual.add_metric([volume.name], sum(allocated_bytes(r.directory) for r in replicas
                                                 if r.volume == volume.name))
            for name in STATES:
                state.add_metric([volume.name, name], int(volume.state == name))
            for name in ROBUSTNESS:
                robust.add_metric([volume.name, name], int(volume.robustness == name))
            count.add_metric([volume.name], volume.replicas)
        families += [size, actual, state, robust, count]
        names = {r.address(self.config.replica_address): r.name for r in replicas}
        families += self._engine_families(engines, names)
        if self.backup_jobs is not None:
            families += self._backup_families(self.backup_jobs)
        return families

    @staticmethod
    def _job_families(statuses: list[RecurringJobStatus]) -> list[Any]:
        """Recurring jobs (the cluster's, from the store: the same on every node)."""
        failures = CounterMetricFamily("appliance_recurring_job_failures",
                                       "Runs of a recurring job that failed on a volume.",
                                       labels=["job"])
        last = GaugeMetricFamily("appliance_recurring_job_last_run_timestamp_seconds",
                                 "When the last run of a recurring job started.",
                                 labels=["job"])
        ok = GaugeMetricFamily("appliance_recurring_job_last_run_success",
                               "1 when the last finished run of a recurring job succeeded.",
                               labels=["job"])
        for status in statuses:
            failures.add_metric([status.name], status.failures)
            if status.runs:
                last.add_metric([status.name], status.runs[-1]["started"])
            ended = [r for r in status.runs if r["state"] != "running"]
            if ended:
                ok.add_metric([status.name], int(ended[-1]["state"] == "succeeded"))
        return [failures, last, ok]

    @staticmethod
    def _backup_families(jobs: BackupJobs) -> list[Any]:
        """This node's backup jobs: those since the daemon started, and those before that
        did not complete (complete ones are listed on the target too)."""
        state = GaugeMetricFamily("appliance_backup_state", "Backup state (1 for the current).",
                                  labels=["backup", "volume", "state"])
        size = GaugeMetricFamily("appliance_backup_size_bytes", "Size of the backed-up volume.",
                                 labels=["backup", "volume"])
        uploaded = GaugeMetricFamily("appliance_backup_uploaded_bytes",
                                     "Bytes a backup uploaded (new blocks only).",
                                     labels=["backup", "volume"])
        duration = GaugeMetricFamily("appliance_backup_duration_seconds",
                                     "How long a backup took (so far, while running).",
                                     labels=["backup", "volume"])
        last = GaugeMetricFamily("appliance_volume_last_backup_timestamp_seconds",
                                 "When the last backup of a volume completed.",
                                 labels=["volume"])
        for job in jobs.all():
            for name in ("in-progress", "complete", "failed", "cancelled"):
                state.add_metric([job.id, job.volume, name], int(job.state == name))
            if job.manifest is not None:
                size.add_metric([job.id, job.volume], job.manifest.size)
                uploaded.add_metric([job.id, job.volume],
                                    job.manifest.stats.get("uploaded_bytes", 0))
            duration.add_metric([job.id, job.volume],
                                (job.finished or time.time()) - job.started)
        for volume, when in jobs.last_success.items():
            last.add_metric([volume], when)
        return [state, size, uploaded, duration, last]

    def _engine_families(self, engines: dict[str, Any], names: dict[str, str]) -> list[Any]:
        """Per engine; replicas are labelled with their names (addresses when unknown)."""
        mode = GaugeMetricFamily("appliance_replica_mode", "Replica mode (1 for the current).",
                                 labels=["volume", "replica", "mode"])
        progress = GaugeMetricFamily("appliance_replica_rebuild_progress_ratio",
                                     "Rebuild progress, 0 to 1.", labels=["volume", "replica"])
        counters = {key: CounterMetricFamily(f"appliance_volume_{key}", text, labels=["volume"])
                    for key, text in (("read_bytes", "Bytes read."),
                                      ("read_operations", "Read requests."),
                                      ("write_bytes", "Bytes written."),
                                      ("write_operations", "Write requests."),
                                      ("flush_operations", "Flush requests."),
                                      ("errors", "Failed requests."))}
        latency = {kind: HistogramMetricFamily(
            f"appliance_volume_{kind}_latency_seconds",
            f"Time from a {kind} request's arrival in the engine to its completion.",
            labels=["volume"]) for kind in ("read", "write")}
        sources = {"read_bytes": "read_bytes", "read_operations": "read_ops",
                   "write_bytes": "write_bytes", "write_operations": "write_ops",
                   "flush_operations": "flush_ops", "errors": "errors"}
        for volume, status in engines.items():
            if not status:
                continue
            for replica in status["replicas"]:
                label = names.get(replica["address"], replica["address"])
                for name in MODES:
                    mode.add_metric([volume, label, name], int(replica["mode"] == name))
                rebuild = replica.get("rebuild") or {}
                if replica["mode"] == "WO" and rebuild.get("total_bytes"):
                    progress.add_metric([volume, label],
                                        rebuild.get("copied_bytes", 0) / rebuild["total_bytes"])
            for key, counter in counters.items():
                counter.add_metric([volume], status["io"][sources[key]])
            for kind, histogram in latency.items():
                observed = status["io"].get("latency", {}).get(kind)
                if observed:
                    histogram.add_metric([volume], _cumulative(observed),
                                         observed["sum"])
        return [mode, progress, *counters.values(), *latency.values()]


def _cumulative(observed: dict[str, Any]) -> list[tuple[str, float]]:
    """Prometheus buckets (cumulative counts, ending with +Inf) from per-bucket counts."""
    buckets, total = [], 0
    for bound, count in zip([*observed["buckets"], float("inf")], observed["counts"],
                            strict=True):
        total += count
        buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
    return buckets

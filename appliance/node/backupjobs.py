"""This node's backup jobs: which run, how far they got, how those that did not complete
ended. Shared by the backup service (which runs them), the node service (which refuses a
purge while a backup reads the volume) and the metrics: one object handed to each.

A job that is not complete is also kept in the state store (``/backup/jobs/ID``,
docs/state-store.md), so that after a restart a backup that failed, or was cancelled (by
``backup delete``, or because the daemon stopped during it), is still reported so; a job
found in progress at the start was interrupted by the stop, and is reported cancelled.
Complete backups are their manifests on the target: their records go. The record of one
that did not complete goes when the operator deletes it (``backup delete``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from appliance.backup import format as fmt
from appliance.control.objects import BackupJob
from appliance.control.store import StateStore

KEEP = 100  # records of jobs that did not complete kept in the store, newest first
INTERRUPTED = "cancelled: the node daemon stopped during the backup"


@dataclass
class Job:
    id: str
    volume: str
    snapshot: str
    started: float
    finished: float | None = None
    state: str = "in-progress"  # in-progress, complete, failed, cancelled
    done: int = 0
    total: int = 0
    error: str = ""
    manifest: fmt.Manifest | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    own_snapshot: bool = False  # the backup took its snapshot itself (not kept in the store)
    labels: dict[str, str] = field(default_factory=dict)  # the manifest's, once written

    def record(self) -> BackupJob:
        return BackupJob(self.id, self.volume, self.snapshot, self.started, self.finished,
                         self.state, self.error)


class BackupJobs:
    """The jobs of this node by id, and when each volume's last backup completed."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.jobs: dict[str, Job] = {}
        self.last_success: dict[str, float] = {}

    async def load(self) -> None:
        """Take up the jobs the store keeps (at the start): one still in progress was
        interrupted by the stop of the daemon, and is cancelled."""
        entries, _ = await self.store.list(BackupJob.PREFIX)
        records = sorted((BackupJob.from_dict(e.value) for e in entries),
                         key=lambda r: r.started, reverse=True)
        for record in records[KEEP:]:
            await self.store.delete(record.key)
        for record in records[:KEEP]:
            job = Job(record.id, record.volume, record.snapshot, record.started,
                      record.finished, record.state, error=record.error)
            if job.state == "in-progress":
                job.state, job.error, job.finished = "cancelled", INTERRUPTED, time.time()
                await self.store.put(job.record().key, job.record().to_dict())
            self.jobs[job.id] = job

    async def start(self, job: Job) -> None:
        await self.store.put(job.record().key, job.record().to_dict())
        self.jobs[job.id] = job

    async def finish(self, job: Job) -> None:
        """Keep how *job* ended (a complete one: its manifest on the target says it)."""
        job.finished = time.time()
        if job.state == "complete":
            self.last_success[job.volume] = job.finished
            await self.store.delete(job.record().key)
        else:
            await self.store.put(job.record().key, job.record().to_dict())

    async def forget(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)
        await self.store.delete(BackupJob.key_of(job_id))

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def running(self, volume: str) -> bool:
        return any(j.volume == volume for j in self.in_progress())

    def in_progress(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.state == "in-progress"]

    def all(self) -> list[Job]:
        return list(self.jobs.values())

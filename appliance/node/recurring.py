"""Recurring jobs (docs/recurring-jobs.md): tasks run on a cron schedule on the volumes that
take part in them.

The leader runs them (the one node in single-node mode). A job acts on volumes through
:class:`VolumeActions`; on a node that is the cluster's own API (:class:`ApiActions`), so
each step is carried out by the node it belongs to (a snapshot by the node of an attached
volume's engine), exactly as an operator's request would be.

What makes a run happen once, neither lost nor doubled:

* A run is recorded in the job's status (``/recurring-job-status/NAME``) *before* it does
  anything, in the same compare-and-swap write that moves the job's ``last_slot`` to the
  run's slot: a slot is run by one runner, once.
* Each volume's part is recorded as it ends. A run found ``running`` at a start (the daemon
  stopped, or the leader changed, during it) is resumed for the volumes not done yet.
* What a run makes is named after the job and the slot (``JOB-YYYYmmdd-HHMMSS``), so a
  resumed part first looks for it: a snapshot or backup made just before the stop is found
  and counted, never made twice.
* Slots missed while no runner ran (the daemon was down) are run once, at the start, not
  once per missed slot: the run takes the latest slot and ``last_slot`` moves past them all.

Jobs that act on the same volume at the same time take turns (a lock per volume), so a
snapshot job and a backup job of the same minute never race on its snapshots.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol
from urllib.parse import quote

import httpx
import trio

from appliance.control import cron
from appliance.control.objects import (
    DEFAULT_GROUP,
    RecurringJob,
    RecurringJobStatus,
    Volume,
)
from appliance.control.store import StateStore
from appliance.errors import (
    AlreadyExists,
    ApplianceError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    error_class,
)
from appliance.node.events import EventLog

log = logging.getLogger(__name__)
LABEL = "recurring-job"  # the label on the snapshots and backups a job makes: its name
MAX_WAIT = 30.0  # seconds between looks at the jobs when no slot is nearer
BACKUP_POLL = 1.0  # seconds between looks at a running backup or scrub


class VolumeActions(Protocol):
    """What a job does to volumes. Each raises an ApplianceError when it fails."""

    async def snapshots(self, volume: str) -> list[dict[str, Any]]:
        """The volume's snapshots, and its head last (``"name": None``)."""

    async def create_snapshot(self, volume: str, name: str, labels: dict[str, str]) -> None: ...

    async def delete_snapshot(self, volume: str, name: str) -> None: ...

    async def purge(self, volume: str) -> None: ...

    async def backups(self, volume: str) -> list[dict[str, Any]]: ...

    async def backup(self, volume: str, snapshot: str, labels: dict[str, str]
                     ) -> dict[str, Any]:
        """Back up *snapshot* and wait until the backup is complete (raise if it is not)."""

    async def wait_backup(self, backup_id: str) -> dict[str, Any]:
        """Wait until backup *backup_id* is complete (raise if it ends otherwise)."""

    async def delete_backup(self, backup_id: str) -> None: ...

    async def trim(self, volume: str) -> tuple[bool, str]:
        """Trim the volume's mounted file system: whether it was, and what was done or
        why not, in words."""

    async def scrub(self, volume: str) -> str:
        """Scrub the volume; what was found, in words (raises if a range is lost)."""


def _stamp(moment: float) -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(moment))


def _iso(moment: float | None) -> str | None:
    return None if moment is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))


def takes_part(volume: Volume, job: RecurringJob) -> bool:
    """Whether *volume* takes part in *job*: by the job's name, by one of its groups, or,
    when it names no job or group of its own, by the group ``default``."""
    if volume.jobs or volume.job_groups:
        return job.name in volume.jobs or bool(set(volume.job_groups) & set(job.groups))
    return DEFAULT_GROUP in job.groups


class RecurringJobs:
    """The jobs (created, listed, shown, deleted through the API) and their runner."""

    def __init__(self, store: StateStore, actions: VolumeActions, events: EventLog, *,
                 is_leader: Callable[[], bool] = lambda: True,
                 now: Callable[[], float] = time.time) -> None:
        self.store = store
        self.actions = actions
        self.events = events
        self.is_leader = is_leader
        self.now = now
        self._wake = trio.Event()
        self._running: set[tuple[str, int]] = set()  # (job, run id) being run here
        self._volume_locks: dict[str, trio.Lock] = {}
        self._status_locks: dict[str, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None

    # -- jobs --------------------------------------------------------------------------------

    async def create(self, name: str, task: str, schedule: str, *, retain: int = 1,
                     concurrency: int = 1, groups: list[str] | None = None,
                     labels: dict[str, str] | None = None) -> dict[str, Any]:
        job = RecurringJob(name, task, cron.check(schedule), retain, concurrency,
                           list(groups or []), dict(labels or {}), self.now()).validate()
        if task in ("snapshot-cleanup", "filesystem-trim", "scrub") and retain != 1:
            raise InvalidArgument(f"--retain means nothing to task {task}: it keeps nothing")
        try:
            await self.store.put(job.key, job.to_dict(), expect=0)
        except FailedPrecondition:
            raise AlreadyExists(f"job {name!r} already exists: delete it first, or choose "
                                "another name") from None
        status = RecurringJobStatus(name, last_slot=job.created)
        await self.store.put(status.key, status.to_dict())
        await self.events.record("", "job-created", f"job {name}: {task} at '{job.cron}'")
        self._wake.set()
        return await self.show(name)

    async def _job(self, name: str) -> RecurringJob:
        entry = await self.store.get(RecurringJob.key_of(name))
        if entry is None:
            raise NotFound(f"job {name!r} does not exist ('appliance job list' shows the jobs)")
        return RecurringJob.from_dict(entry.value)

    async def _status(self, name: str) -> RecurringJobStatus:
        entry = await self.store.get(RecurringJobStatus.key_of(name))
        return RecurringJobStatus.from_dict(entry.value) if entry else RecurringJobStatus(name)

    async def _volumes(self) -> list[Volume]:
        entries, _ = await self.store.list(Volume.PREFIX)
        return [Volume.from_dict(e.value) for e in entries]

    def _describe(self, job: RecurringJob, status: RecurringJobStatus,
                  volumes: list[Volume], runs: int) -> dict[str, Any]:
        last = status.runs[-1] if status.runs else None
        return {**job.to_dict(), "created": _iso(job.created),
                "next_run": _iso(cron.next_after(job.cron, max(status.last_slot,
                                                               job.created))),
                "volumes": sorted(v.name for v in volumes if takes_part(v, job)),
                "last_run": self._run_info(last) if last else None,
                "failures": status.failures,
                "runs": [self._run_info(r) for r in status.runs[-runs:]] if runs else []}

    @staticmethod
    def _run_info(run: dict[str, Any]) -> dict[str, Any]:
        return {**run, "slot": _iso(run["slot"]), "started": _iso(run["started"]),
                "finished": _iso(run["finished"])}

    async def list_jobs(self) -> list[dict[str, Any]]:
        entries, _ = await self.store.list(RecurringJob.PREFIX)
        volumes = await self._volumes()
        jobs = [RecurringJob.from_dict(e.value) for e in entries]
        return [self._describe(j, await self._status(j.name), volumes, 0) for j in jobs]

    async def show(self, name: str) -> dict[str, Any]:
        job = await self._job(name)
        return self._describe(job, await self._status(name), await self._volumes(),
                              RecurringJobStatus.KEEP)

    async def delete(self, name: str) -> None:
        """Delete the job (a run in progress finishes its current volume and stops); the
        volumes that named it stop naming it. What it made stays."""
        await self._job(name)
        await self.store.delete(RecurringJob.key_of(name))
        await self.store.delete(RecurringJobStatus.key_of(name))
        for volume in await self._volumes():
            if name in volume.jobs:
                await self.store.update(volume.key, lambda v: {
                    **v, "jobs": [j for j in v.get("jobs", []) if j != name]})
        await self.events.record("", "job-deleted", f"job {name}")

    async def volume_jobs(self, volume: str, add: list[str], remove: list[str]
                          ) -> dict[str, Any]:
        """Make *volume* take part in the jobs and groups *add*, and no longer in *remove*.
        A name is a job's when a job has it, else a group's when a job is in that group
        (``default`` always is one); anything else is refused, and nothing changes."""
        entries, _ = await self.store.list(RecurringJob.PREFIX)
        jobs = {RecurringJob.from_dict(e.value).name: RecurringJob.from_dict(e.value)
                for e in entries}
        groups = {g for j in jobs.values() for g in j.groups} | {DEFAULT_GROUP}
        if not add and not remove:
            raise InvalidArgument("give --add or --remove with a job or group name")
        for name in add:
            if name not in jobs and name not in groups:
                raise NotFound(f"no job or group is named {name!r} ('appliance job list' "
                               "shows the jobs and their groups)")

        def change(value: dict[str, Any]) -> dict[str, Any]:
            names, in_groups = list(value.get("jobs", [])), list(value.get("job_groups", []))
            for name in add:
                if name in jobs:
                    names.append(name)
                else:
                    in_groups.append(name)
            names = [n for n in names if n not in remove]
            in_groups = [g for g in in_groups if g not in remove]
            return {**value, "jobs": sorted(set(names)), "job_groups": sorted(set(in_groups))}

        if (await self.store.update(Volume.key_of(volume), change)) is None:
            raise NotFound(f"volume {volume!r} does not exist")
        updated = Volume.from_dict((await self.store.get(Volume.key_of(volume))).value)  # type: ignore[union-attr]
        return {"volume": volume, "jobs": updated.jobs, "groups": updated.job_groups,
                "effective": sorted(j.name for j in jobs.values() if takes_part(updated, j))}

    async def run_now(self, name: str) -> dict[str, Any]:
        """Start a run of the job now (besides its schedule); the run's record."""
        job = await self._job(name)
        if not self.is_leader():
            raise Unavailable("recurring jobs run on the cluster's leader: ask it")
        run = await self._start_run(job, math.floor(self.now()), "manual")
        if run is None:
            raise FailedPrecondition(f"job {name} is already running for this second")
        assert self._nursery is not None
        self._nursery.start_soon(self._execute, job, run["id"])
        return self._run_info(run)

    # -- runner -------------------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                wait = MAX_WAIT
                if self.is_leader():
                    try:
                        wait = await self._pass(nursery)
                    except ApplianceError as exc:  # the store: the next pass tries again
                        log.warning("recurring jobs: %s", exc)
                self._wake = trio.Event()
                with trio.move_on_after(max(0.0, min(wait, MAX_WAIT))):
                    await self._wake.wait()

    async def _pass(self, nursery: trio.Nursery) -> float:
        """Start what is due (runs to resume, slots reached); seconds to the next slot."""
        entries, _ = await self.store.list(RecurringJob.PREFIX)
        wait = MAX_WAIT
        for entry in entries:
            job = RecurringJob.from_dict(entry.value)
            status = await self._status(job.name)
            for run in status.runs:
                if run["state"] == "running" and (job.name, run["id"]) not in self._running:
                    log.info("job %s: resuming run %d (interrupted)", job.name, run["id"])
                    self._running.add((job.name, run["id"]))
                    nursery.start_soon(self._execute, job, run["id"])
            now = self.now()
            due = cron.next_after(job.cron, max(status.last_slot, job.created))
            if due <= now:
                slot = cron.latest_at_or_before(job.cron, now)
                started = await self._start_run(job, slot,
                                                "schedule" if slot == due else "missed")
                if started is not None:
                    nursery.start_soon(self._execute, job, started["id"])
                due = cron.next_after(job.cron, slot)
            wait = min(wait, due - now)
        return wait

    async def _start_run(self, job: RecurringJob, slot: float, trigger: str
                         ) -> dict[str, Any] | None:
        """Record a run of *job* for *slot* (and, unless manual, move ``last_slot`` to it)
        in one conditional write; None when that slot was already taken."""
        volumes = sorted(v.name for v in await self._volumes()
                         if takes_part(v, job) and not v.deleting)
        started: list[dict[str, Any]] = []

        def change(value: dict[str, Any]) -> dict[str, Any] | None:
            started.clear()  # a conflict calls again: only the attempt written counts
            status = RecurringJobStatus.from_dict(value)
            if trigger != "manual" and slot <= status.last_slot:
                return None
            if any(r["slot"] == slot for r in status.runs):  # a manual run had this second
                if trigger == "manual":
                    return None
                status.last_slot = slot
                return status.to_dict()
            run = {"id": (status.runs[-1]["id"] + 1) if status.runs else 1, "slot": slot,
                   "trigger": trigger, "task": job.task, "started": self.now(),
                   "finished": None, "state": "running", "message": "",
                   "volumes": {v: {"result": "pending", "message": ""} for v in volumes}}
            started[:] = [run]
            if trigger != "manual":
                status.last_slot = slot
            status.runs = [*status.runs, run][-RecurringJobStatus.KEEP:]
            return status.to_dict()

        async with self._status_lock(job.name):
            if await self.store.update(RecurringJobStatus.key_of(job.name), change) is None:
                return None  # the job is gone
        if not started:
            return None
        run = started[0]
        self._running.add((job.name, run["id"]))
        log.info("job %s: run %d (%s, slot %s) on %d volume(s)", job.name, run["id"], trigger,
                 _iso(slot), len(volumes))
        return run

    async def _record(self, job: str, run_id: int,
                      change: Callable[[dict[str, Any]], None]) -> dict[str, Any] | None:
        """Change run *run_id* of *job* in the store; the run as it is then (None: gone)."""
        changed: list[dict[str, Any]] = []

        def update(value: dict[str, Any]) -> dict[str, Any] | None:
            changed.clear()  # a conflict calls again: only the attempt written counts
            status = RecurringJobStatus.from_dict(value)
            run = next((r for r in status.runs if r["id"] == run_id), None)
            if run is None:
                return None
            change(run)
            if run["state"] == "failed" and run.get("counted") is None:
                run["counted"] = True
                status.failures += 1
            changed[:] = [run]
            return status.to_dict()

        async with self._status_lock(job):
            await self.store.update(RecurringJobStatus.key_of(job), update)
        return changed[0] if changed else None

    def _status_lock(self, job: str) -> trio.Lock:
        """Writes of a job's status from this runner take turns (its parts would otherwise
        conflict with each other on the one key)."""
        return self._status_locks.setdefault(job, trio.Lock())

    async def _execute(self, job: RecurringJob, run_id: int) -> None:
        try:
            status = await self._status(job.name)
            found = next((r for r in status.runs if r["id"] == run_id), None)
            if found is None:
                return
            run: dict[str, Any] = found
            pending = [v for v, part in run["volumes"].items() if part["result"] == "pending"]
            limiter = trio.CapacityLimiter(job.concurrency)
            async with trio.open_nursery() as nursery:
                for volume in pending:
                    nursery.start_soon(self._one_volume, job, run, volume, limiter)
            if not self.is_leader():
                return  # the new leader finishes it
            if await self.store.get(job.key) is None:
                return  # deleted meanwhile

            def end(record: dict[str, Any]) -> None:
                failed = sorted(v for v, p in record["volumes"].items()
                                if p["result"] == "failed")
                record["finished"] = self.now()
                record["state"] = "failed" if failed else "succeeded"
                record["message"] = (f"failed on {', '.join(failed)}" if failed else
                                     f"{len(record['volumes'])} volume(s)")

            ended = await self._record(job.name, run_id, end)
            if ended is not None:
                log.info("job %s: run %d %s: %s", job.name, run_id, ended["state"],
                         ended["message"])
        except ApplianceError as exc:  # the store: the run stays running, resumed later
            log.warning("job %s: run %d not recorded (resumed at the next look): %s",
                        job.name, run_id, exc)
        except Exception:  # a bug: the daemon stays up; the run is resumed
            log.exception("job %s: run %d", job.name, run_id)
        finally:
            self._running.discard((job.name, run_id))

    async def _one_volume(self, job: RecurringJob, run: dict[str, Any], volume: str,
                          limiter: trio.CapacityLimiter) -> None:
        async with limiter:
            if not self.is_leader() or await self.store.get(job.key) is None:
                return
            lock = self._volume_locks.setdefault(volume, trio.Lock())
            async with lock:
                name = f"{job.name}-{_stamp(run['slot'])}"
                try:
                    result, message = await TASK_RUNNERS[job.task](self, job, volume, name)
                except AlreadyExists as exc:  # made by a part still running elsewhere
                    result, message = "done", f"made meanwhile by another run: {exc}"
                except ApplianceError as exc:
                    result, message = "failed", str(exc)
                except Exception as exc:  # a bug: this volume's part fails, the rest goes on
                    log.exception("job %s on volume %s", job.name, volume)
                    result, message = "failed", f"internal error: {exc}"

            def done(record: dict[str, Any]) -> None:
                record["volumes"][volume] = {"result": result, "message": message}

            await self._record(job.name, run["id"], done)
            if result == "failed":
                log.warning("job %s failed on volume %s: %s", job.name, volume, message)
                await self.events.record(volume, "job-failed", f"job {job.name} "
                                         f"({job.task}): {message}")

    # -- tasks --------------------------------------------------------------------------------

    async def _snapshot(self, job: RecurringJob, volume: str, name: str) -> tuple[str, str]:
        layers = await self.actions.snapshots(volume)
        if any(s["name"] == name and not s["removed"] for s in layers):
            return "done", f"snapshot {name} (taken before an interruption)"
        mine = self._made_by(job, layers)
        if mine and not _changed_since(layers, mine[-1]["name"]):
            return "skipped", f"unchanged since snapshot {mine[-1]['name']}"
        await self.actions.create_snapshot(volume, name, {**job.labels, LABEL: job.name})
        removed = await self._keep(job, volume, job.retain)
        return "done", f"snapshot {name}" + (f"; removed {', '.join(removed)}" if removed
                                              else "")

    @staticmethod
    def _made_by(job: RecurringJob, layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The snapshots *job* made that are kept, oldest first."""
        return sorted((s for s in layers if s["name"] and not s["removed"]
                       and s["labels"].get(LABEL) == job.name),
                      key=lambda s: (s["created"] or "", s["name"]))

    async def _keep(self, job: RecurringJob, volume: str, retain: int) -> list[str]:
        """Remove the snapshots *job* made beyond the newest *retain*, and purge."""
        mine = self._made_by(job, await self.actions.snapshots(volume))
        extra = [s["name"] for s in mine[:max(0, len(mine) - retain)]]
        return await self._remove(volume, extra)

    async def _remove(self, volume: str, names: list[str]) -> list[str]:
        for name in names:
            await self.actions.delete_snapshot(volume, name)
        if names:
            try:
                await self.actions.purge(volume)
            except FailedPrecondition as exc:  # a backup reads it: the next purge reclaims
                log.info("volume %s: purge put off: %s", volume, exc)
        return names

    async def _backup(self, job: RecurringJob, volume: str, name: str) -> tuple[str, str]:
        listed = await self.actions.backups(volume)
        running = next((b for b in listed if b["snapshot"] == name
                        and b["state"] == "in-progress"), None)
        if running is not None:  # a part cut short elsewhere left it running: wait for it
            await self.actions.wait_backup(running["id"])
            listed = await self.actions.backups(volume)
        backups = sorted((b for b in listed
                          if b["labels"].get(LABEL) == job.name and b["state"] == "complete"),
                         key=lambda b: (b["created"], b["id"]))
        made = next((b for b in backups if b["snapshot"] == name), None)
        if made is not None:
            return "done", f"backup {made['id']} (made before an interruption)"
        layers = await self.actions.snapshots(volume)
        if backups and not _changed_since(layers, backups[-1]["snapshot"]):
            return "skipped", f"unchanged since backup {backups[-1]['id']}"
        if not any(s["name"] == name and not s["removed"] for s in layers):
            await self.actions.create_snapshot(volume, name, {**job.labels, LABEL: job.name})
        made = await self.actions.backup(volume, name, {**job.labels, LABEL: job.name})
        backups.append(made)
        gone = [b["id"] for b in backups[:max(0, len(backups) - job.retain)]]
        for backup_id in gone:
            await self.actions.delete_backup(backup_id)
        await self._keep(job, volume, job.retain)
        return "done", f"backup {made['id']}" + (f"; deleted {', '.join(gone)}" if gone
                                                  else "")

    async def _snapshot_delete(self, job: RecurringJob, volume: str, name: str
                               ) -> tuple[str, str]:
        kept = sorted((s for s in await self.actions.snapshots(volume)
                       if s["name"] and not s["removed"] and s["user_created"]),
                      key=lambda s: (s["created"] or "", s["name"]))
        removed = await self._remove(volume, [s["name"] for s in
                                              kept[:max(0, len(kept) - job.retain)]])
        return ("done", f"removed {', '.join(removed)}") if removed else \
            ("skipped", f"{len(kept)} snapshot(s), no more than {job.retain}")

    async def _snapshot_cleanup(self, job: RecurringJob, volume: str, name: str
                                ) -> tuple[str, str]:
        system = [s["name"] for s in await self.actions.snapshots(volume)
                  if s["name"] and not s["removed"] and not s["user_created"]]
        removed = await self._remove(volume, system)
        return ("done", f"removed {', '.join(removed)}") if removed else \
            ("skipped", "no system snapshot")

    async def _trim(self, job: RecurringJob, volume: str, name: str) -> tuple[str, str]:
        trimmed, message = await self.actions.trim(volume)
        return ("done" if trimmed else "skipped"), message

    async def _scrub(self, job: RecurringJob, volume: str, name: str) -> tuple[str, str]:
        return "done", await self.actions.scrub(volume)


def _changed_since(layers: list[dict[str, Any]], snapshot: str) -> bool:
    """Whether the volume may differ from *snapshot*: unless *snapshot* is an ancestor of
    the head, the head and every layer between them hold no block, and the size is the
    same (other snapshots taken since, by other jobs, change nothing)."""
    by_name = {x["name"]: x for x in layers}
    base = by_name.get(snapshot)
    layer = by_name.get(None)
    if base is None or base["removed"] or layer is None or layer["size"] != base["size"]:
        return True
    seen = 0
    while layer is not None and layer["name"] != snapshot and seen <= len(layers):
        if layer["actual_size"]:
            return True
        layer = by_name.get(layer["parent"]) if layer["parent"] is not None else None
        seen += 1
    return layer is None or seen > len(layers)


TASK_RUNNERS: dict[str, Callable[[RecurringJobs, RecurringJob, str, str],
                                 Awaitable[tuple[str, str]]]] = {
    "snapshot": RecurringJobs._snapshot,
    "backup": RecurringJobs._backup,
    "snapshot-delete": RecurringJobs._snapshot_delete,
    "snapshot-cleanup": RecurringJobs._snapshot_cleanup,
    "filesystem-trim": RecurringJobs._trim,
    "scrub": RecurringJobs._scrub,
}


class ApiActions:
    """:class:`VolumeActions` through the cluster's API at *url* (this node's), so that
    the node a request belongs to carries it out."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token

    async def _call(self, method: str, path: str, body: Any = None,
                    timeout: float = 330.0) -> Any:
        try:
            async with httpx.AsyncClient(base_url=self.url, timeout=timeout, headers={
                    "Authorization": f"Bearer {self.token}"}) as client:
                response = await client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise Unavailable(f"the node's API at {self.url} cannot be reached: "
                              f"{exc or type(exc).__name__}") from exc
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                cls, message = error_class(error["code"]), error["message"]
            except (ValueError, KeyError, TypeError):
                cls, message = ApplianceError, f"HTTP {response.status_code} from {path}"
            raise cls(message)
        return response.json() if response.content else None

    @staticmethod
    def _path(volume: str) -> str:
        return f"/v1/volumes/{quote(volume, safe='')}"

    async def snapshots(self, volume: str) -> list[dict[str, Any]]:
        return list(await self._call("GET", f"{self._path(volume)}/snapshots?head=true"))

    async def create_snapshot(self, volume: str, name: str, labels: dict[str, str]) -> None:
        await self._call("POST", f"{self._path(volume)}/snapshots",
                         {"name": name, "labels": labels})

    async def delete_snapshot(self, volume: str, name: str) -> None:
        await self._call("DELETE", f"{self._path(volume)}/snapshots/{quote(name, safe='')}")

    async def purge(self, volume: str) -> None:
        await self._call("POST", f"{self._path(volume)}/purge")

    async def backups(self, volume: str) -> list[dict[str, Any]]:
        answer = await self._call("GET", f"/v1/backups?volume={quote(volume, safe='')}")
        return list(answer["backups"])

    async def backup(self, volume: str, snapshot: str, labels: dict[str, str]
                     ) -> dict[str, Any]:
        started = await self._call("POST", "/v1/backups", {
            "volume": volume, "snapshot": snapshot, "labels": labels})
        return await self.wait_backup(started["id"])

    async def wait_backup(self, backup_id: str) -> dict[str, Any]:
        while True:
            info: dict[str, Any] = await self._call(
                "GET", f"/v1/backups/{quote(backup_id, safe='')}")
            if info["state"] == "complete":
                return info
            if info["state"] != "in-progress":
                raise FailedPrecondition(f"backup {info['id']} {info['state']}: "
                                         f"{info.get('error') or 'no reason given'}")
            await trio.sleep(BACKUP_POLL)

    async def delete_backup(self, backup_id: str) -> None:
        await self._call("DELETE", f"/v1/backups/{quote(backup_id, safe='')}")

    async def trim(self, volume: str) -> tuple[bool, str]:
        answer = await self._call("POST", f"{self._path(volume)}/trim")
        return bool(answer["trimmed"]), str(answer["message"])

    async def scrub(self, volume: str) -> str:
        await self._call("POST", f"{self._path(volume)}/scrub")
        while True:
            record = await self._call("GET", f"{self._path(volume)}/scrub")
            if record["state"] == "complete":
                report = record["report"]
                if report["lost"] or report["unrepaired"] or report["problems"]:
                    raise FailedPrecondition(str(record["summary"]))
                return str(record["summary"])
            if record["state"] != "running":
                raise FailedPrecondition(f"scrub {record['state']}: {record['error']}")
            await trio.sleep(BACKUP_POLL)

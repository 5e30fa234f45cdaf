"""Browse mounts on this node (docs/browse.md): ``snapshot mount``, ``backup mount`` and
their ``umount``.

Each mount is a helper process (``appliance.browse.helper``, started detached like an
engine, so that it outlives a restart of the daemon) that serves the image read-only over
FUSE in DATA_DIR/run/browse/ID/fuse; a read-only loop device on the image file; and the
file system in it mounted read-only at the operator's directory: ext2/3/4 with ``noload``
and xfs with ``norecovery`` (a journal is never replayed: nothing is written, not even to
the page cache of the image). Every step is undone when a later one fails; the record
(``/mounts/ID``) is written once the file system is mounted and removed by ``umount``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from appliance.backup import format as bfmt
from appliance.control.objects import Mount, ReplicaRecord
from appliance.control.store import StateStore
from appliance.errors import (
    ApplianceError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    StorageIOError,
    Unavailable,
)
from appliance.nbd.launch import process_running
from appliance.nbd.spawn import spawn_daemon
from appliance.node.backups import BackupTarget
from appliance.node.config import NodeConfig
from appliance.node.events import EventLog
from appliance.node.service import NodeService
from appliance.secrets import write_secret_file

log = logging.getLogger(__name__)
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
MOUNT_OPTIONS = {"ext2": "ro,noload", "ext3": "ro,noload", "ext4": "ro,noload",
                 "xfs": "ro,norecovery"}


def _run(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise StorageIOError(f"{' '.join(command)} failed ({result.returncode}): "
                             f"{(result.stderr or result.stdout).strip()[-400:]}")
    return result.stdout.strip()


def mounted(path: Path) -> bool:
    """Whether *path* is a mount point, a dead FUSE mount included (whose ``stat`` fails,
    so that ``os.path.ismount`` says no)."""
    escaped = str(path).replace("\\", "\\134").replace(" ", "\\040").replace(
        "\t", "\\011").replace("\n", "\\012")
    with open("/proc/self/mountinfo") as table:
        return any(line.split(" ")[4] == escaped for line in table)


def _source(path: str) -> str:
    """The device mounted at *path*."""
    result = subprocess.run(["findmnt", "-n", "-o", "SOURCE", "--mountpoint", path],
                            capture_output=True, text=True, check=False)
    return result.stdout.strip()


def check_directory(path: str) -> Path:
    """*path* if it can take a mount: absolute, an existing empty directory, not a mount
    point already."""
    where = Path(path)
    if not where.is_absolute():
        raise InvalidArgument(f"{path!r} is not an absolute path")
    if not where.exists():
        raise InvalidArgument(f"{path} does not exist: make the directory first")
    if not where.is_dir():
        raise InvalidArgument(f"{path} is not a directory")
    if os.path.ismount(where):
        raise InvalidArgument(f"{path} is a mount point already")
    if any(where.iterdir()):
        raise InvalidArgument(f"{path} is not empty: mount on an empty directory (what it "
                              "holds would be hidden)")
    return where


class BrowseService:
    def __init__(self, store: StateStore, service: NodeService, target: BackupTarget,
                 config: NodeConfig, events: EventLog) -> None:
        self.store = store
        self.service = service
        self.target = target
        self.config = config
        self.events = events
        self.node = config.node_name
        self._lock = trio.Lock()  # one mount or umount at a time on this node

    def _run_dir(self, mount_id: str) -> Path:
        return self.config.data_dir / "run" / "browse" / mount_id

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """At the start: take down this node's mounts whose helper is gone (the machine
        restarted, or the helper died; a mount cut short by a stop of the daemon too)."""
        entries, _ = await self.store.list(Mount.PREFIX)
        for entry in entries:
            record = Mount.from_dict(entry.value)
            if record.node != self.node or (record.state == "mounted"
                                            and self._helper_running(record)):
                continue
            try:
                await trio.to_thread.run_sync(self._undo, record)
            except ApplianceError as exc:
                log.warning("stale mount at %s: %s", record.path, exc)
            await self.store.delete(record.key)
            await self.events.record(record.volume, "browse-lost",
                                     f"{record.path} on node {self.node}: its helper is gone "
                                     "(taken down)")
        task_status.started()

    def _helper_running(self, record: Mount) -> bool:
        """Whether *record*'s helper runs: its pid runs the helper with its spec."""
        if not record.pid or not process_running(record.pid):
            return False
        try:
            command = Path(f"/proc/{record.pid}/cmdline").read_bytes()
        except OSError:
            return False
        spec = str(self._run_dir(record.name) / "spec.json").encode()
        return b"appliance.browse.helper" in command and spec in command

    def _own_loop(self, record: Mount) -> bool:
        """Whether *record*'s loop device is still the one over its helper's image."""
        if not record.loop:
            return False
        backing = Path("/sys/block") / Path(record.loop).name / "loop" / "backing_file"
        try:
            return backing.read_text().strip() == str(
                self._run_dir(record.name) / "fuse" / "disk.img")
        except OSError:
            return False

    async def mounts(self) -> list[dict[str, Any]]:
        """The mounts of the cluster, with the statistics of this node's."""
        entries, _ = await self.store.list(Mount.PREFIX)
        found = []
        for entry in entries:
            record = Mount.from_dict(entry.value)
            info: dict[str, Any] = record.to_dict()
            info["id"] = info.pop("name")
            if record.node == self.node:
                status = await trio.to_thread.run_sync(self._status, record.name)
                info["serving"] = status.get("state") == "ready" and process_running(
                    record.pid)
                info["statistics"] = {k: v for k, v in status.items() if k != "state"}
            found.append(info)
        return found

    def _status(self, mount_id: str) -> dict[str, Any]:
        try:
            value: dict[str, Any] = json.loads(
                (self._run_dir(mount_id) / "status.json").read_text())
        except (OSError, ValueError):
            return {}
        return value

    # -- mounting -----------------------------------------------------------------------------

    async def mount_snapshot(self, volume: str, snapshot: str, path: str) -> dict[str, Any]:
        where = await trio.to_thread.run_sync(check_directory, path)
        if not any(s["name"] == snapshot and not s["removed"]
                   for s in await self.service.list_snapshots(volume)):
            raise NotFound(f"snapshot {snapshot!r} of volume {volume!r} does not exist")
        directory = await self._local_replica(volume)
        return await self._mount(Mount("", self.node, str(where), "snapshot", volume,
                                       snapshot=snapshot),
                                 {"kind": "snapshot", "directory": directory,
                                  "snapshot": snapshot})

    async def mount_backup(self, backup_id: str, path: str) -> dict[str, Any]:
        bfmt.check_backup_id(backup_id)
        where = await trio.to_thread.run_sync(check_directory, path)
        target = await self.target.settings()

        def find() -> bfmt.Manifest:
            with self.target.open_store(target) as store:
                return store.find(backup_id)

        manifest = await trio.to_thread.run_sync(find)
        return await self._mount(Mount("", self.node, str(where), "backup", manifest.volume,
                                       backup=backup_id),
                                 {"kind": "backup", "backup": backup_id, "target": target,
                                  "secrets_dir": str(self.config.secrets_dir)})

    async def _local_replica(self, volume: str) -> str:
        """A directory of *volume* on this node, in service when the volume is attached."""
        entries, _ = await self.store.list(ReplicaRecord.prefix_of(volume))
        local = [ReplicaRecord.from_dict(e.value) for e in entries]
        local = [r for r in local if r.volume == volume and not r.removing
                 and (not self.config.clustered or r.node == self.node)]
        if not local:
            raise FailedPrecondition(f"no replica of volume {volume} is on node {self.node}: "
                                     "mount it on a node that holds one ('volume show' "
                                     "lists them)")
        status = await trio.to_thread.run_sync(
            self.service.controller.supervisor.engine_status, volume)
        if status is not None:  # attached: a replica in service (one rebuilt may lack it)
            serving = {r["address"] for r in status["replicas"] if r["mode"] == "RW"}
            address = self.config.replica_address
            local = [r for r in local if r.address(address) in serving]
            if not local:
                raise FailedPrecondition(f"no replica of volume {volume} on node {self.node} "
                                         "is in service now (being rebuilt?): try again "
                                         "later, or on another node")
        return local[0].directory

    async def _mount(self, record: Mount, spec: dict[str, Any]) -> dict[str, Any]:
        async with self._lock:
            entries, _ = await self.store.list(Mount.PREFIX)
            if any(Mount.from_dict(e.value).path == record.path and
                   Mount.from_dict(e.value).node == self.node for e in entries):
                raise InvalidArgument(f"{record.path} is a mount point already")
            record.name = secrets.token_hex(6)
            record.created = time.time()
            # recorded first: the snapshot or backup cannot be deleted from now on, and a
            # mount cut short is found and taken down at the next start
            await self.store.put(record.key, record.to_dict(), expect=0)
            try:
                await trio.to_thread.run_sync(self._mount_blocking, record, spec)
                record.state = "mounted"
                await self.store.put(record.key, record.to_dict())
            except BaseException:
                with trio.CancelScope(shield=True):
                    with contextlib.suppress(ApplianceError):
                        await trio.to_thread.run_sync(self._undo, record)
                    await self.store.delete(record.key)
                raise
        what = f"snapshot {record.snapshot}" if record.kind == "snapshot" else \
            f"backup {record.backup}"
        await self.events.record(record.volume, "browse-mounted",
                                 f"{what} at {record.path} on node {self.node}")
        return (await self._info(record))

    async def _info(self, record: Mount) -> dict[str, Any]:
        for info in await self.mounts():
            if info["id"] == record.name:
                return info
        raise NotFound(f"mount {record.name} is gone")

    def _mount_blocking(self, record: Mount, spec: dict[str, Any]) -> None:
        run_dir = self._run_dir(record.name)
        fuse = run_dir / "fuse"
        fuse.mkdir(parents=True, mode=0o700)
        status = run_dir / "status.json"
        spec_file = run_dir / "spec.json"
        write_secret_file(spec_file, json.dumps({**spec, "fuse": str(fuse),
                                                 "status": str(status)}).encode())
        record.pid = spawn_daemon([sys.executable, "-m", "appliance.browse.helper",
                                   str(spec_file)], dict(os.environ), run_dir / "helper.log")
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            state = self._status(record.name).get("state")
            if state == "ready" and os.path.ismount(fuse):
                break
            if state == "failed":
                raise FailedPrecondition(str(self._status(record.name).get("error")))
            if not process_running(record.pid):
                tail = (run_dir / "helper.log").read_text()[-600:].strip()
                raise Unavailable(f"the browse helper exited: {tail or 'no output'}")
            if time.monotonic() > deadline:
                raise Unavailable(f"the browse helper was not ready in {READY_TIMEOUT:.0f} s")
            time.sleep(0.05)
        record.loop = _run("losetup", "--read-only", "--find", "--show", str(fuse / "disk.img"))
        kind = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", record.loop],
                              capture_output=True, text=True, check=False).stdout.strip()
        if not kind:
            what = "snapshot" if record.kind == "snapshot" else "backup"
            raise FailedPrecondition(f"the {what} holds no file system that can be mounted "
                                     "(blkid finds none): restore it to read it as a device")
        record.fs_type = kind
        options = MOUNT_OPTIONS.get(kind, "ro")
        _run("mount", "-t", kind, "-o", options, record.loop, record.path)

    def _undo(self, record: Mount) -> None:
        """Take down what exists of *record*'s mount, in the reverse order; best effort."""
        problems = []
        own_loop = self._own_loop(record)  # (a loop device number is reused)
        if own_loop and record.path and os.path.ismount(record.path) and \
                _source(record.path) == record.loop:
            try:
                _run("umount", record.path)
            except StorageIOError as exc:
                problems.append(str(exc))
        if own_loop:
            try:
                _run("losetup", "--detach", record.loop)
            except StorageIOError as exc:
                problems.append(str(exc))
        if self._helper_running(record):  # (a pid is reused)
            os.kill(record.pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            while process_running(record.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if process_running(record.pid):
                os.kill(record.pid, signal.SIGKILL)
        run_dir = self._run_dir(record.name) if record.name else None
        if run_dir is not None:
            fuse = run_dir / "fuse"
            if mounted(fuse):
                subprocess.run(["fusermount3", "-u", "-z", str(fuse)], capture_output=True,
                               check=False)
            if not mounted(fuse):
                shutil.rmtree(run_dir, ignore_errors=True)
            else:
                problems.append(f"{fuse} stays mounted")
        if problems:
            raise FailedPrecondition("; ".join(problems))

    # -- unmounting ---------------------------------------------------------------------------

    async def umount(self, path: str) -> dict[str, Any]:
        where = str(Path(path))
        async with self._lock:
            entries, _ = await self.store.list(Mount.PREFIX)
            records = [Mount.from_dict(e.value) for e in entries]
            record = next((r for r in records if r.path == where and r.node == self.node),
                          None)
            if record is None:
                elsewhere = next((r for r in records if r.path == where), None)
                raise NotFound(f"no snapshot or backup is mounted at {where} on node "
                               f"{self.node}" + (f" (one is on node {elsewhere.node}: ask "
                                                 "it)" if elsewhere else ""))
            if os.path.ismount(where):
                try:
                    await trio.to_thread.run_sync(_run, "umount", where)
                except StorageIOError as exc:
                    raise FailedPrecondition(f"{where} is in use, nothing changed: {exc}") \
                        from None
            problems = []
            try:
                await trio.to_thread.run_sync(self._undo, record)
            except ApplianceError as exc:
                log.warning("umount of %s: %s", where, exc)
                problems.append(str(exc))
            await self.store.delete(record.key)
        await self.events.record(record.volume, "browse-unmounted",
                                 f"{where} on node {self.node}"
                                 + (f" ({'; '.join(problems)})" if problems else ""))
        return {"status": "unmounted", "path": where, "problems": problems}

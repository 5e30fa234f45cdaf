"""Starting, stopping, adopting and observing the processes of the volumes on this node.

Engines and replica servers are detached processes (their own sessions, pid files beside
their sockets, see appliance/nbd/launch.py). They keep serving while the daemon is down;
when it comes back it finds them again by their pid files and sockets (adoption) instead
of starting new ones. Everything here blocks: the daemon runs it in worker threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance import unixsock
from appliance.chain import Replica
from appliance.chain.directory import open_directory
from appliance.control.objects import ReplicaRecord, Volume
from appliance.defaults import CONTROL_TIMEOUT
from appliance.errors import (
    ApplianceError,
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    StorageIOError,
    Unavailable,
)
from appliance.frontend import attach as frontend
from appliance.frontend import filesystem, holders, iscsi, nfs
from appliance.frontend.tgt import Tgt
from appliance.nbd import launch
from appliance.nbd.settings import EngineSettings
from appliance.node import lineage, volumeops
from appliance.node.config import NodeConfig
from appliance.replication import engine_control
from appliance.replication import protocol as proto
from appliance.replication.client import ReplicaConnection
from appliance.replication.protocol import Role
from appliance.secrets import read_secret_file, write_secret_file

log = logging.getLogger(__name__)
# NBD sockets whose natural path is too long for a socket address: a fixed short directory
# (any data directory, any volume name), each named by a digest of its natural path
SHORT_SOCKETS = Path("/run/appliance/nbd")
NBD_DIGEST = 32  # hex digits
# a shared volume's NFS server: NFSv4 lease and grace (seconds: how long a client that
# vanished holds its state; how long after a server start clients may only reclaim), and
# the protocols it serves
SHARE_LEASE = 30
SHARE_GRACE = 40
SHARE_PROTOCOLS = ("nfs4.0", "nfs4.1", "nfs4.2")


def filesystem_device(mountpoint: Path) -> str:
    """The device mounted at *mountpoint* (or an empty string)."""
    result = subprocess.run(["findmnt", "-n", "-o", "SOURCE", "--mountpoint", str(mountpoint)],
                            capture_output=True, text=True, check=False, timeout=60)
    return result.stdout.strip().splitlines()[0] if result.stdout.strip() else ""


def _run_command(*command: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
    if result.returncode:
        raise StorageIOError(f"{' '.join(command)} failed: "
                             f"{(result.stderr or result.stdout).strip()[-500:]}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_tree(source: Path, destination: Path, cancel: threading.Event | None) -> None:
    """``cp -a --sparse=always`` (holes stay holes); stopped when *cancel* is set."""
    process = subprocess.Popen(["cp", "-a", "--sparse=always", "--", str(source),
                                str(destination)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while True:
        try:
            _, errors = process.communicate(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            if cancel is not None and cancel.is_set():
                process.kill()
                process.communicate()
                shutil.rmtree(destination, ignore_errors=True)
                raise Cancelled(f"the copy of {source} was cancelled") from None
    if process.returncode:
        shutil.rmtree(destination, ignore_errors=True)
        raise StorageIOError(f"cannot copy {source} to {destination}: {errors.strip()}")


class Supervisor:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.tgt = Tgt(config.run_dir / "tgtd", config.portal)
        for directory in (config.run_dir, config.secrets_dir):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(OSError):  # not root: long names then cannot be attached
            SHORT_SOCKETS.mkdir(parents=True, exist_ok=True, mode=0o700)

    # -- paths --------------------------------------------------------------------------

    def volume_dir(self, volume: str) -> Path:
        return self.config.run_dir / volume

    def control_socket(self, volume: str) -> Path:
        return self.volume_dir(volume) / "ctl.sock"

    def nbd_socket(self, volume: str) -> Path:
        """The engine's NBD socket: beside its control socket, unless that path is too long
        for a socket address (nbdkit binds it and NBD clients connect to it by name: a
        long volume name, or a deep data directory); then a short path in SHORT_SOCKETS
        named by a digest of that path (unique per data directory and volume), so that
        every name the API accepts can be attached."""
        path = self.volume_dir(volume) / "nbd.sock"
        if len(os.fsencode(path)) <= unixsock.MAX_PATH:
            return path
        digest = hashlib.sha256(os.fsencode(path)).hexdigest()[:NBD_DIGEST]
        return SHORT_SOCKETS / f"{digest}.sock"

    def attach_state(self, volume: str) -> Path:
        return self.volume_dir(volume) / "ctl.sock.attach"

    def secret_file(self, volume: str) -> Path:
        path = self.config.secrets_dir / volume
        if not path.exists():
            with contextlib.suppress(FileExistsError):  # made meanwhile by another thread
                write_secret_file(path, os.urandom(32).hex().encode())
        return path

    def write_secret(self, volume: str, secret: bytes) -> None:
        """Keep *secret* as volume *volume*'s secret file (0600), replacing another."""
        path = self.config.secrets_dir / volume
        with contextlib.suppress(OSError, InvalidArgument, NotFound, FailedPrecondition):
            if read_secret_file(path) == secret:
                return
        temporary = path.with_name(f".{volume}.{os.getpid()}.new")
        temporary.unlink(missing_ok=True)
        write_secret_file(temporary, secret)
        temporary.replace(path)

    def address(self, replica: ReplicaRecord) -> tuple[str, int]:
        return replica.host or self.config.replica_address, replica.port

    # -- replicas -----------------------------------------------------------------------

    def create_replica_dir(self, replica: ReplicaRecord, size: int) -> str | None:
        """Make the directory of a new replica (unless it exists); return its replica id
        (None when it cannot be read now)."""
        directory = Path(replica.directory)
        if (directory / "replica.json").exists():
            return lineage.read_replica_id(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        with Replica.create(directory, size) as created:
            return created.replica_id

    def replica_process_alive(self, replica: ReplicaRecord) -> bool:
        pid_file, _ = launch.replica_server_files(Path(replica.directory))
        try:
            return launch.process_running(int(pid_file.read_text()))
        except (FileNotFoundError, ValueError):
            return False

    def replica_running(self, replica: ReplicaRecord) -> bool:
        pid_file, _ = launch.replica_server_files(Path(replica.directory))
        try:
            pid = int(pid_file.read_text())
        except (FileNotFoundError, ValueError):
            return False
        if not launch.process_running(pid):
            return False
        try:
            ReplicaConnection(self.address(replica), read_secret_file(
                self.secret_file(replica.volume)), timeout=2).close()
        except ApplianceError:
            return False
        return True

    def start_replica(self, replica: ReplicaRecord) -> None:
        launch.start_replica_server(Path(replica.directory), self.address(replica),
                                    self.secret_file(replica.volume))

    def stop_replica(self, replica: ReplicaRecord) -> None:
        with contextlib.suppress(ApplianceError):
            launch.stop_replica_server(Path(replica.directory))

    def delete_replica_dir(self, replica: ReplicaRecord) -> None:
        shutil.rmtree(replica.directory, ignore_errors=True)

    @staticmethod
    def replica_dir_complete(replica: ReplicaRecord) -> bool:
        return (Path(replica.directory) / "replica.json").exists()

    @staticmethod
    def copy_replica_dir(source: ReplicaRecord, target: ReplicaRecord, *,
                         cancel: threading.Event | None = None) -> None:
        """Copy the directory of the closed replica *source* (sparse files stay sparse)
        into *target*'s place: under a temporary name, made durable, then renamed over
        whatever an interrupted copy left there. The replica is locked meanwhile (no server
        opens it); with *cancel* set the copy stops, leaving the source as it was."""
        final = Path(target.directory)
        partial = final.with_name(final.name + ".copying")
        try:
            shutil.rmtree(partial, ignore_errors=True)
            final.parent.mkdir(parents=True, exist_ok=True)
            lock = open_directory(Path(source.directory), exclusive=True)
            try:
                _copy_tree(Path(source.directory), partial, cancel)
                for stale in ("server.pid", "server.log", "server.sock"):
                    (partial / stale).unlink(missing_ok=True)
                for path in [*partial.iterdir(), partial]:  # durable before it is used
                    _fsync(path)
                shutil.rmtree(final, ignore_errors=True)  # an earlier, unfinished copy
                partial.rename(final)
                _fsync(final.parent)
            finally:
                os.close(lock)
        except OSError as exc:
            shutil.rmtree(partial, ignore_errors=True)
            raise StorageIOError(f"cannot copy replica {source.name} to {final}: "
                                 f"{exc.strerror or exc}") from exc

    def clone_into(self, source: str, source_replicas: list[ReplicaRecord], snapshot: str,
                   volume: str, replicas: list[ReplicaRecord],
                   progress: Callable[[int, int], None], *,
                   cancel: threading.Event | None = None) -> int:
        """Copy snapshot *snapshot* of volume *source* into the replicas of new volume
        *volume*: from a replica server in service when the source is attached, else from
        the source's replica directories. Setting *cancel* stops the copy after the piece
        being copied (:class:`~appliance.errors.Cancelled`; the volume stays
        ``creating``, and its copy starts over at the next start of the daemon)."""
        targets = [Path(r.directory) for r in replicas]

        def checked(done: int, total: int) -> None:  # called after every piece
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"the copy of snapshot {snapshot} of volume {source} into "
                                f"volume {volume} was cancelled")
            progress(done, total)

        status = self.engine_status(source)
        if status is not None:
            address = next((r["address"] for r in status["replicas"] if r["mode"] == "RW"),
                           None)
            if address is None:
                raise Unavailable(f"volume {source} has no replica in service to clone from")
            with ReplicaConnection(proto.parse_address(address), read_secret_file(
                    self.secret_file(source)), role=Role.READER) as connection:
                return volumeops.copy_snapshot(connection, snapshot, volume, targets, checked)
        with volumeops.local_source([Path(r.directory) for r in source_replicas]) as local:
            return volumeops.copy_snapshot(local, snapshot, volume, targets, checked)

    # -- engines ------------------------------------------------------------------------

    def engine_status(self, volume: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = engine_control.call(self.control_socket(volume), "status",
                                                  timeout=10)
        except Unavailable:
            return None
        return result

    def start_engine(self, volume: Volume, replicas: list[ReplicaRecord], *, salvage: bool = False,
                     salvage_from: ReplicaRecord | None = None) -> None:
        """Start the engine of *volume*; raises the engine's refusal (appliance.errors) when
        it will not serve (docs/membership.md, "Starting")."""
        self.volume_dir(volume.name).mkdir(parents=True, exist_ok=True, mode=0o700)
        settings = EngineSettings(
            volume.name, tuple(self.address(r) for r in replicas),
            self.secret_file(volume.name), self.nbd_socket(volume.name),
            self.control_socket(volume.name), salvage=salvage,
            salvage_from=self.address(salvage_from) if salvage_from else None,
            timeout=self.config.replica_timeout, local_fast_path=self.config.local_fast_path,
            witness=self.config.local_api_url if self.config.clustered else None,
            witness_token_file=self.config.token_file if self.config.clustered else None)
        launch.start_engine(settings, foreground=False)

    def engine_log(self, volume: str) -> Path:
        control = self.control_socket(volume)
        return control.with_name(control.name + ".log")

    def stop_engine(self, volume: str) -> None:
        self.stop_share(volume)
        self.unexport_iscsi(volume)
        frontend.detach(self.attach_state(volume))
        with contextlib.suppress(Unavailable):
            launch.stop_engine(self.control_socket(volume))

    def engine_call(self, volume: str, op: str, **arguments: Any) -> Any:
        return engine_control.call(self.control_socket(volume), op, timeout=CONTROL_TIMEOUT,
                                   **arguments)

    # -- devices ------------------------------------------------------------------------

    def attached_device(self, volume: str) -> str | None:
        state = self.attach_state(volume)
        if not state.exists():
            return None
        device: str = json.loads(state.read_text())["device"]
        return device

    def attach(self, volume: str, *, link: bool = True) -> str:
        status = self.engine_status(volume)
        if status is None:
            raise Unavailable(f"the engine of volume {volume} is not running")
        return frontend.attach(volume, self.nbd_socket(volume), self.attach_state(volume),
                               int(status["size"]), link=link)

    # -- the iSCSI frontend ---------------------------------------------------------------

    def iscsi_state(self, volume: str) -> Path:
        return self.volume_dir(volume) / "iscsi.json"

    def export_iscsi(self, volume: str, iqn: str, credentials: iscsi.Credentials,
                     initiators: list[str]) -> dict[str, Any]:
        """Export the attached device of *volume* as target *iqn* (again: idempotent);
        where initiators find it."""
        device = self.attached_device(volume)
        if device is None:
            raise FailedPrecondition(f"volume {volume} has no device to export")
        state = self.iscsi_state(volume)
        state.write_text(json.dumps({"iqn": iqn}))
        iscsi.export(self.tgt, iscsi.Export(iqn, device, credentials, tuple(initiators)))
        return self.iscsi_info(iqn)

    def iscsi_info(self, iqn: str) -> dict[str, Any]:
        return {"kind": "iscsi", "portal": proto.format_address(self.config.portal),
                "iqn": iqn, "lun": iscsi.LUN}

    def exported_iqn(self, volume: str) -> str | None:
        """The target *volume* is exported as, if it is (tgtd serves it)."""
        try:
            iqn = str(json.loads(self.iscsi_state(volume).read_text())["iqn"])
        except (OSError, ValueError, KeyError):
            return None
        if self.tgt.pid() is None:
            return None
        try:
            return iqn if iqn in self.tgt.targets() else None
        except (StorageIOError, Unavailable):
            return None

    def iscsi_sessions(self, volume: str) -> list[dict[str, Any]]:
        iqn = self.exported_iqn(volume)
        return iscsi.sessions(self.tgt, iqn) if iqn else []

    # -- shared (RWX) volumes --------------------------------------------------------------

    def share_directory(self, volume: str) -> Path:
        """Where the volume's NFS server keeps its configuration, log and state."""
        return self.volume_dir(volume) / "ganesha"

    def share_mountpoint(self, volume: str) -> Path:
        """Where the shared volume's file system is mounted (outside its run directory,
        which a delete removes whole)."""
        return self.config.data_dir / "shares" / volume

    def serve_share(self, volume: Volume, port: int) -> tuple[dict[str, Any], bool]:
        """Make the attached *volume* shared: its file system (made once, never again),
        mounted, exported by its own NFS server on *port*; again: idempotent (a restarted
        daemon adopts the server). The share's description, and whether the file system was
        made now."""
        device = self.attached_device(volume.name)
        if device is None:
            raise FailedPrecondition(f"volume {volume.name} has no device to share")
        mountpoint = self.share_mountpoint(volume.name)
        made = False
        if filesystem.mountpoint(device) != str(mountpoint):
            made = self._mount_share(volume, device, mountpoint)
        server = nfs.ShareServer(
            directory=self.share_directory(volume.name), export_path=mountpoint,
            pseudo=f"/{volume.name}", address=self.config.replica_address, port=port,
            # no client until the operator names some (volume share --allow)
            options=nfs.ExportOptions(allow=tuple(volume.share_allow),
                                      read_only=volume.share_read_only,
                                      squash=volume.share_squash,
                                      closed=not volume.share_allow),
            lease_lifetime=SHARE_LEASE, grace_period=SHARE_GRACE).validate()
        if nfs.running(server.directory) is None:
            nfs.start(server)
        elif nfs.load(server.directory) != server:
            nfs.update(server)
        return {"address": server.address, "port": port, "path": server.pseudo,
                "protocols": list(SHARE_PROTOCOLS),
                # what the server serves with now (the CLI waits for a change to show here)
                "options": {"allow": list(volume.share_allow),
                            "read_only": volume.share_read_only,
                            "squash": volume.share_squash}}, made

    def _mount_share(self, volume: Volume, device: str, mountpoint: Path) -> bool:
        kind = filesystem.fs_type(device)
        made = False
        if not kind:
            if volume.share_formatted:
                raise FailedPrecondition(
                    f"shared volume {volume.name} had a file system and its device {device} "
                    "holds none now: refusing to make a new one over it (restore it from a "
                    "snapshot or a backup)")
            # xfs: it grows online without CAP_SYS_RESOURCE, which a mounted ext4 needs and
            # containers drop (docs/rwx.md)
            _run_command("mkfs.xfs", "-q", "-K", "-L", volume.name[:12], device)
            kind, made = "xfs", True
        mountpoint.mkdir(mode=0o755, parents=True, exist_ok=True)
        _run_command("mount", "-t", kind, device, str(mountpoint))
        if made:  # clients squashed to nobody write too (a sticky directory, like /tmp)
            mountpoint.chmod(0o1777)
        return made

    def stop_share(self, volume: str) -> None:
        """Stop the volume's NFS server and unmount its file system (nothing to do when it
        is not shared)."""
        nfs.stop(self.share_directory(volume))
        mountpoint = self.share_mountpoint(volume)
        if os.path.ismount(mountpoint):
            try:
                _run_command("umount", str(mountpoint))
            except StorageIOError as exc:
                users = holders.users(filesystem_device(mountpoint))
                raise FailedPrecondition(
                    f"cannot unmount shared volume {volume}'s file system at {mountpoint}: "
                    f"{exc}; on this node it is "
                    f"{holders.describe(users) if users else 'in use'}: stop what uses it "
                    "and the controller tries again") from exc
        with contextlib.suppress(OSError):
            mountpoint.rmdir()

    def share_clients(self, volume: str) -> int:
        """How many client hosts are connected to the volume's NFS server."""
        return nfs.clients(self.share_directory(volume)) or 0

    def iscsi_statistics(self, volume: str) -> dict[str, int] | None:
        """Its target's sessions and their bytes, if this node exports it."""
        iqn = self.exported_iqn(volume)
        return iscsi.statistics(self.tgt, iqn) if iqn else None

    def unexport_iscsi(self, volume: str, *, force: bool = True) -> None:
        state = self.iscsi_state(volume)
        try:
            iqn = str(json.loads(state.read_text())["iqn"])
        except (OSError, ValueError, KeyError):
            return
        iscsi.unexport(self.tgt, iqn, force=force)
        state.unlink(missing_ok=True)

    def device_users(self, volume: str) -> tuple[str | None, list[holders.Use]]:
        """The attached device of *volume* (None: none) and what uses it."""
        device = frontend.owned_device(self.attach_state(volume))
        return device, holders.users(device) if device else []

    def release_device(self, volume: str) -> list[str]:
        """Unmount what is mounted on the device of *volume* (``--force``); what was."""
        device = frontend.owned_device(self.attach_state(volume))
        return holders.release(device) if device else []

    def check_growable(self, volume: str) -> None:
        """Refuse --resize-fs unless the device holds a file system that can grow."""
        device = self.attached_device(volume)
        if device is None:
            raise FailedPrecondition(f"volume {volume} has no device")
        filesystem.check_growable(device)

    def trim_filesystem(self, volume: str) -> tuple[bool, str]:
        """fstrim the file system of *volume* mounted on this node (its device's first
        mount point, or its share's); (whether it ran, what happened in words)."""
        share = self.share_mountpoint(volume)
        mounted: str | None
        if os.path.ismount(share):
            mounted = str(share)
        elif self.exported_iqn(volume) is not None:
            return False, "exported over iSCSI: its file system is the initiator's to trim"
        else:
            device = self.attached_device(volume)
            if device is None:
                return False, "no device on this node: nothing to trim"
            mounted = filesystem.mountpoint(device)
        if mounted is None:
            return False, f"the device of volume {volume} is not mounted: nothing to trim"
        trimmed = filesystem.trim(mounted)
        return True, f"{mounted}: {trimmed} bytes trimmed"

    def grow_device(self, volume: str, size: int, *, resize_fs: bool) -> None:
        """Make the attached device *size* bytes (in use or not), then grow its file
        system when asked (mounted or not)."""
        device = frontend.resize(self.attach_state(volume), size)
        iqn = self.exported_iqn(volume)
        if iqn is not None and resize_fs:  # (checked before anything changed, too)
            raise FailedPrecondition("the file system of an iSCSI volume is its initiator's")
        if os.path.ismount(self.share_mountpoint(volume)):
            resize_fs = True  # a shared volume's file system always grows with it
        if iqn is not None:
            iscsi.resize(self.tgt, iqn, device)
        if resize_fs:
            kind = filesystem.grow(device)
            log.info("volume %s: %s file system on %s grown", volume, kind, device)

    def detach(self, volume: str) -> None:
        self.stop_share(volume)
        self.unexport_iscsi(volume)
        frontend.detach(self.attach_state(volume))

    def forget_volume(self, volume: str) -> None:
        socket = self.nbd_socket(volume)  # a short path outside its directory, maybe
        for leftover in (socket, socket.with_name(socket.name + ".pid")):
            leftover.unlink(missing_ok=True)
        shutil.rmtree(self.volume_dir(volume), ignore_errors=True)
        (self.config.secrets_dir / volume).unlink(missing_ok=True)

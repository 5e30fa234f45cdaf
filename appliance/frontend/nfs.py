"""Sharing a mounted volume read-write among many clients over NFS ("RWX" volumes).

One nfs-ganesha server runs per shared volume, exporting the directory where the volume's
filesystem is mounted. Each server owns a *directory* of its own (:attr:`ShareServer.directory`)
holding everything it needs, so that servers on one machine never meet:

* ``ganesha.conf``: the configuration (mode 0600), rendered by :func:`render_config`;
* ``share.json``: the :class:`ShareServer` it was started or last updated with (:func:`load`);
* ``ganesha.pid``: written by ganesha (and removed on a clean exit);
* ``ganesha.log``: ganesha's log and its stdout/stderr (appended to, never rotated here);
* ``recovery/``: the NFSv4 client recovery records (ganesha's ``RecoveryRoot``, by default a
  machine-wide ``/var/lib/nfs/ganesha`` that two servers would share).

Ganesha runs in the foreground (``-F``) in a session of its own, started detached and
reparented like the engines (:func:`appliance.nbd.spawn.spawn_daemon`, which also keeps every
descriptor of the starter's out of it): it outlives the process that started it, which can be
restarted and find it again by :func:`running` (the pid file, checked against
``/proc/PID/cmdline``). No dbus and no rpcbind are needed for NFSv4 (ganesha logs a few
CRIT/MAJ lines about both at start; they are harmless).

Facts this module is built on, checked with ganesha 4.3 (Debian 12) and libnfs 4.0:

* Readiness: ganesha answers an RPC ``NULL`` call on its port once it serves; :func:`start`
  probes for it (the "NFS SERVER INITIALIZED" log line is an EVENT, gone at level WARN).
* A bad export (a missing path) does not stop ganesha: it serves with no export. :func:`start`
  reads the log for that and fails instead.
* A taken port makes ganesha exit (status 2, "Error binding to V6 interface").
* SIGHUP re-reads the exports: access type, client list and squash change at once, for
  connected clients too ("Reread exports complete" in the log). :func:`update` uses it; what
  SIGHUP cannot change (address, port, path, protocols, NFSv4 timers) needs a restart.
* After a restart, while client records exist in ``recovery/``, ganesha refuses every new OPEN
  (reads included) with NFS4ERR_GRACE for :attr:`ShareServer.grace_period` seconds; with no
  records it leaves grace at once.
* NFSv3 (:attr:`ShareServer.nfs3`) needs a running rpcbind: without one ganesha exits at start
  ("Cannot register NFS V3 on TCP"). rpcbind holds one registration per program on a machine,
  so the last server started wins it: NFSv3 clients must name both ports (Linux
  ``-o port=N,mountport=M,mountproto=tcp,nolock``; libnfs ``?nfsport=N&mountport=M``). NLM is
  off, so NFSv3 locks are client-local (``nolock``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import (
    AddressInUse,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    StorageIOError,
    Unavailable,
)
from appliance.nbd.spawn import spawn_daemon

logger = logging.getLogger(__name__)

CONFIG_FILE = "ganesha.conf"
SHARE_FILE = "share.json"
PID_FILE = "ganesha.pid"
LOG_FILE = "ganesha.log"
RECOVERY_DIRECTORY = "recovery"

SQUASH = {"root": "root_squash", "none": "no_root_squash", "all": "all_squash"}
LOG_LEVELS = ("FATAL", "MAJ", "CRIT", "WARN", "EVENT", "INFO", "DEBUG")
NOBODY = 65534
NFS_PROGRAM = 100003
POLL_INTERVAL = 0.05
KILL_TIMEOUT = 10.0
LOG_TAIL_LINES = 8
SEVERE = ("FATAL", "MAJ", "CRIT", "WARN")
# Paths and names go into the configuration between double quotes: nothing may end the quote.
UNSAFE = re.compile(r'["\\\x00-\x1f\x7f]')
PSEUDO = re.compile(r"(/[A-Za-z0-9_][A-Za-z0-9._-]*)+")
# Log lines that mean the export was not created although ganesha runs.
EXPORT_FAILED = ("Could not create export", "No export entries found",
                 "Errors processing block", "Error while parsing")
RELOADED = "Reread exports complete"
BIND_FAILED = "Error binding"
RPCBIND_FAILED = "Cannot register NFS V3"


@dataclass(frozen=True)
class ExportOptions:
    """Who may use the export and how.

    ``allow`` lists addresses or CIDRs (``10.0.0.0/24``); empty lets every address in. Host
    names are refused: a reverse lookup per client is slow and proves nothing. ``squash``:
    ``"root"`` maps uid 0 to ``anonymous_uid``/``anonymous_gid`` (root_squash), ``"all"`` maps
    everyone, ``"none"`` maps nobody. With a squash, the squashed identity must be able to write
    the exported directory (a fresh ext4 root is root's, mode 0755: chown it or make it 1777).
    """

    allow: tuple[str, ...] = ()
    read_only: bool = False
    squash: str = "root"
    closed: bool = False  # no client at all, whatever ``allow`` says
    anonymous_uid: int = NOBODY
    anonymous_gid: int = NOBODY

    def validate(self) -> ExportOptions:
        """These options with ``allow`` in canonical form; InvalidArgument names what is
        wrong."""
        entries: object = self.allow
        if isinstance(entries, str):  # a tuple by type, but callers pass what they parsed
            raise InvalidArgument("allow must be a list of addresses or CIDRs, not a string")
        networks = []
        for entry in self.allow:
            try:
                networks.append(str(ipaddress.ip_network(entry, strict=True)))
            except ValueError as exc:
                raise InvalidArgument(f"allowed client {entry!r} is not an address or CIDR: "
                                      f"{exc}") from exc
        if self.squash not in SQUASH:
            raise InvalidArgument(f"unknown squash {self.squash!r} (one of "
                                  f"{', '.join(SQUASH)})")
        for name in ("anonymous_uid", "anonymous_gid"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32 - 1:
                raise InvalidArgument(f"{name} must be an id from 0 to {2**32 - 2}")
        return dataclasses.replace(self, allow=tuple(dict.fromkeys(networks)))


@dataclass(frozen=True)
class ShareServer:
    """One ganesha server exporting one mounted filesystem.

    ``pseudo`` is the NFSv4 path clients mount (``server:/vol1``; with ``nfs3`` NFSv3 mounts
    it too). ``mount_port`` is the NFSv3 MOUNT protocol's port, required with ``nfs3``.
    ``lease_lifetime`` and ``grace_period`` (seconds) are NFSv4's: a client that stops renewing
    loses its state after the lease; after a restart, clients reclaim during the grace period
    and nobody else may open a file."""

    directory: Path
    export_path: Path
    pseudo: str
    address: str
    port: int
    options: ExportOptions = field(default_factory=ExportOptions)
    nfs3: bool = False
    mount_port: int | None = None
    lease_lifetime: int = 60
    grace_period: int = 90
    log_level: str = "EVENT"

    def validate(self) -> ShareServer:
        """This server with its options and address in canonical form, or InvalidArgument."""
        for name in ("directory", "export_path"):
            path = Path(getattr(self, name))
            if not path.is_absolute() or UNSAFE.search(str(path)):
                raise InvalidArgument(f"{name} must be an absolute path without quotes, "
                                      f"backslashes or control characters: {str(path)!r}")
        if not PSEUDO.fullmatch(self.pseudo) or any(
                part in (".", "..") for part in self.pseudo.split("/")):
            raise InvalidArgument(f"pseudo path {self.pseudo!r} must look like /name or "
                                  "/name/name (letters, digits, '.', '_', '-')")
        try:
            address = str(ipaddress.ip_address(self.address))
        except ValueError as exc:
            raise InvalidArgument(f"bind address {self.address!r} is not an IP address") from exc
        ports = [("port", self.port)]
        if self.nfs3:
            if self.mount_port is None:
                raise InvalidArgument("an NFSv3 share needs a mount_port")
            ports.append(("mount_port", self.mount_port))
        for name, port in ports:
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                raise InvalidArgument(f"{name} {port!r} is not a TCP port")
        if self.nfs3 and self.mount_port == self.port:
            raise InvalidArgument("port and mount_port must differ")
        if not 1 <= self.lease_lifetime <= 120:
            raise InvalidArgument("lease_lifetime must be 1 to 120 seconds")
        if not self.lease_lifetime <= self.grace_period <= 180:
            raise InvalidArgument("grace_period must be from lease_lifetime to 180 seconds")
        if self.log_level not in LOG_LEVELS:
            raise InvalidArgument(f"unknown log level {self.log_level!r} (one of "
                                  f"{', '.join(LOG_LEVELS)})")
        return dataclasses.replace(self, directory=Path(self.directory),
                                   export_path=Path(self.export_path), address=address,
                                   options=self.options.validate())

    def to_json(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        fields.update(directory=str(self.directory), export_path=str(self.export_path))
        fields["options"]["allow"] = list(self.options.allow)
        return fields

    @classmethod
    def from_json(cls, fields: dict[str, Any]) -> ShareServer:
        options = dict(fields["options"], allow=tuple(fields["options"]["allow"]))
        return cls(**dict(fields, directory=Path(fields["directory"]),
                          export_path=Path(fields["export_path"]),
                          options=ExportOptions(**options)))


# -- configuration -------------------------------------------------------------------------

def render_config(server: ShareServer) -> str:
    """Ganesha's configuration for *server* (validated first)."""
    server = server.validate()
    protocols = "3, 4" if server.nfs3 else "4"
    core = [f"Protocols = {protocols};", f"Bind_Addr = {server.address};",
            f"NFS_Port = {server.port};"]
    if server.nfs3:
        # the same path for NFSv3 mounts as for NFSv4
        core += [f"MNT_Port = {server.mount_port};", "mount_path_pseudo = true;"]
    core += ["Enable_NLM = false;", "Enable_RQUOTA = false;", "Enable_UDP = false;"]
    options = server.options
    access = "RO" if options.read_only else "RW"
    # A Linux NFSv4.1 client takes two servers with the same owner and scope for one server
    # reached by two addresses (session trunking): each server names itself.
    identity = f"appliance-{server.address}-{server.port}"
    export = [
        "Export_Id = 1;", f'Path = "{server.export_path}";', f'Pseudo = "{server.pseudo}";',
        f"Protocols = {protocols};", "Transports = TCP;", "SecType = sys;",
        f"Access_Type = {'None' if options.allow or options.closed else access};",
        f"Squash = {SQUASH[options.squash]};", f"Anonymous_Uid = {options.anonymous_uid};",
        f"Anonymous_Gid = {options.anonymous_gid};", "FSAL { Name = VFS; }"]
    if options.allow and not options.closed:
        export.append(f"CLIENT {{ Clients = {', '.join(options.allow)}; "
                      f"Access_Type = {access}; Protocols = {protocols}; }}")
    blocks = {
        "NFS_CORE_PARAM": core,
        # Kerberos is not used; this spares a few errors at start (not all: ganesha still
        # looks for a keytab for its callback channel and logs that it found none).
        "NFS_KRB5": ["Active_krb5 = false;"],
        "NFSV4": ["RecoveryBackend = fs;",
                  f'RecoveryRoot = "{server.directory / RECOVERY_DIRECTORY}";',
                  f"Lease_Lifetime = {server.lease_lifetime};",
                  f"Grace_Period = {server.grace_period};",
                  "Minor_Versions = 0, 1, 2;",  # libnfs 4.0 speaks 4.0 only
                  f'Server_Scope = "{identity}";', f'Server_Owner = "{identity}";'],
        # CONFIG stays at EVENT: update() waits for its "Reread exports complete".
        "LOG": [f"Default_Log_Level = {server.log_level};", "COMPONENTS { CONFIG = EVENT; }"],
        "EXPORT": export,
    }
    lines = ["# Written by appliance.frontend.nfs: one nfs-ganesha server for one share."]
    for name, body in blocks.items():
        lines += [f"{name} {{", *(f"    {line}" for line in body), "}"]
    return "\n".join(lines) + "\n"


def load(directory: Path) -> ShareServer:
    """The server last started or updated in *directory*."""
    try:
        return ShareServer.from_json(json.loads((directory / SHARE_FILE).read_text()))
    except FileNotFoundError as exc:
        raise NotFound(f"no NFS share server was set up in {directory}") from exc


def _write_private(path: Path, text: str) -> None:
    """Replace *path* by *text* atomically, readable by its owner only."""
    temporary = path.with_name(path.name + ".new")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    temporary.replace(path)


def _save(server: ShareServer) -> None:
    _write_private(server.directory / CONFIG_FILE, render_config(server))
    _write_private(server.directory / SHARE_FILE, json.dumps(server.to_json(), indent=1))


# -- processes -----------------------------------------------------------------------------

def start(server: ShareServer, timeout: float = 30.0) -> int:
    """Start ganesha for *server*, detached (it outlives the caller); return its pid once it
    answers on its port. A server already running with the same settings is left alone."""
    server = server.validate()
    if not server.export_path.is_dir():
        raise FailedPrecondition(f"{server.export_path} is not a directory")
    pid = running(server.directory)
    if pid is not None:
        if load(server.directory) == server:
            return pid
        raise AlreadyExists(f"ganesha (pid {pid}) serves {server.directory} with other "
                            "settings: update() or stop() it")
    for port in (server.port, server.mount_port if server.nfs3 else None):
        if port is not None:
            _check_free(server.address, port)
    server.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    (server.directory / RECOVERY_DIRECTORY).mkdir(mode=0o700, exist_ok=True)
    _save(server)
    with contextlib.suppress(FileNotFoundError):
        (server.directory / PID_FILE).unlink()  # stale: running() found no process for it
    log = server.directory / LOG_FILE
    offset = log.stat().st_size if log.exists() else 0
    pid = _spawn(server.directory)
    try:
        _wait_serving(server, pid, log, offset, timeout)
    except BaseException:
        _terminate(pid, timeout)
        raise
    logger.info("ganesha pid %d serves %s as %s on %s:%d", pid, server.export_path,
                server.pseudo, server.address, server.port)
    return pid


def _spawn(directory: Path) -> int:
    binary = shutil.which("ganesha.nfsd", path="/usr/bin:/usr/sbin:/bin:/sbin")
    if binary is None:
        raise FailedPrecondition("ganesha.nfsd is not installed (Debian: nfs-ganesha, "
                                 "nfs-ganesha-vfs)")
    log = directory / LOG_FILE
    argv = [binary, "-F", "-f", str(directory / CONFIG_FILE), "-L", str(log),
            "-p", str(directory / PID_FILE)]
    # A session of its own, reparented (no signal from the caller's terminal or process
    # group reaches it), no descriptor of the caller's (a daemon's listening socket would
    # stay open in ganesha for its life) and a bare environment (the caller's may hold
    # secrets).
    return spawn_daemon(argv, {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, log)


def _check_free(address: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUse(f"{address} port {port} is taken by another program") from exc
            raise FailedPrecondition(f"cannot listen on {address} port {port}: "
                                     f"{exc.strerror}") from exc


def _wait_serving(server: ShareServer, pid: int, log: Path, offset: int,
                  timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _rpc_null(server.address, server.port, timeout=1.0):
        status = _reap(pid)
        if status is not None or not _exists(pid):  # (before exec, cmdline is not ganesha)
            lines = _log_since(log, offset)
            if any(BIND_FAILED in line for line in lines):
                raise AddressInUse(f"{server.address} port {server.port} is taken by another "
                                   f"program: {_tail(lines)}")
            hint = ("; NFSv3 needs a running rpcbind"
                    if any(RPCBIND_FAILED in line for line in lines) else "")
            raise StorageIOError(f"ganesha for {server.pseudo} exited at start "
                                 f"({_describe(status)}): {_tail(lines)}{hint}")
        if time.monotonic() > deadline:
            raise Unavailable(f"ganesha for {server.pseudo} did not answer on "
                              f"{server.address} port {server.port} within {timeout:g} s: "
                              f"{_tail(_log_since(log, offset))}")
        time.sleep(POLL_INTERVAL)
    failed = [line for line in _log_since(log, offset)
              if any(marker in line for marker in EXPORT_FAILED)]
    if failed:
        raise StorageIOError(f"ganesha could not export {server.export_path}: {_tail(failed)}")


def _rpc_null(address: str, port: int, timeout: float) -> bool:
    """Whether an ONC RPC NULL call to NFS version 4 on *address*:*port* succeeds."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address, address)  # noqa: S104
    xid = int.from_bytes(os.urandom(4), "big")
    # call: xid, CALL, RPC version 2, program, version 4, procedure 0, AUTH_NONE cred and verf
    call = struct.pack(">10I", xid, 0, 2, NFS_PROGRAM, 4, 0, 0, 0, 0, 0)
    try:
        with socket.create_connection((host, port), timeout=timeout) as connection:
            connection.sendall(struct.pack(">I", 0x80000000 | len(call)) + call)
            reply = b""
            while len(reply) < 28:  # record mark, xid, REPLY, ACCEPTED, verifier, status
                chunk = connection.recv(28 - len(reply))
                if not chunk:
                    return False
                reply += chunk
    except OSError:
        return False
    _, got, kind, state, _, _, accepted = struct.unpack(">7I", reply)
    return (got, kind, state, accepted) == (xid, 1, 0, 0)


def running(directory: Path) -> int | None:
    """The pid of the ganesha serving from *directory*, or None."""
    try:
        pid = int((directory / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        pid = 0
    if pid and _is_ganesha(pid, directory):
        return pid
    # no pid file yet (ganesha writes it while starting) or a stale one: look for the process
    with os.scandir("/proc") as entries:
        found = [int(entry.name) for entry in entries
                 if entry.name.isdigit() and _is_ganesha(int(entry.name), directory)]
    return found[0] if found else None


def _is_ganesha(pid: int, directory: Path) -> bool:
    """Whether *pid* is a live ganesha reading *directory*'s configuration (a zombie has no
    command line)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    config = os.fsencode(directory / CONFIG_FILE)
    return (bool(argv) and argv[0].rsplit(b"/", 1)[-1] == b"ganesha.nfsd"
            and any(argv[i] == b"-f" and argv[i + 1] == config for i in range(len(argv) - 1)))


def _reap(pid: int) -> int | None:
    """The wait status of *pid* if it is this process's child and has exited, else None."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return status if done else None


def _describe(status: int | None) -> str:
    if status is None:
        return "gone"
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"status {os.waitstatus_to_exitcode(status)}"


def stop(directory: Path, timeout: float = 30.0) -> None:
    """Stop the ganesha serving from *directory* (SIGTERM, then SIGKILL after *timeout*);
    nothing to do if none runs."""
    pid = running(directory)
    if pid is not None:
        _terminate(pid, timeout, directory)
        logger.info("ganesha pid %d for %s stopped", pid, directory)


def _terminate(pid: int, timeout: float, directory: Path | None = None) -> None:
    def gone() -> bool:
        _reap(pid)
        return not (_is_ganesha(pid, directory) if directory else _exists(pid))

    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, KILL_TIMEOUT)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while not gone():
            if time.monotonic() > deadline:
                break
            time.sleep(POLL_INTERVAL)
        else:
            return
    raise Unavailable(f"ganesha pid {pid} did not stop after SIGKILL")


def _exists(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def update(server: ShareServer, timeout: float = 30.0) -> None:
    """Give the running server of ``server.directory`` these settings. Export options and the
    log level change in place (SIGHUP: clients keep their connections, the new rules apply to
    their next request); anything else restarts ganesha, and clients then wait out the grace
    period before they may open files."""
    server = server.validate()
    previous = load(server.directory)
    pid = running(server.directory)
    if pid is None:
        raise FailedPrecondition(f"no ganesha serves {server.directory}: start it")
    if previous == server:
        return
    in_place = dataclasses.replace(previous, options=server.options,
                                   log_level=server.log_level)
    if in_place != server:
        stop(server.directory, timeout)
        start(server, timeout)
        return
    log = server.directory / LOG_FILE
    offset = log.stat().st_size if log.exists() else 0
    _save(server)
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    lines = _log_since(log, offset)
    while not any(RELOADED in line for line in lines):
        if time.monotonic() > deadline:
            raise Unavailable(f"ganesha pid {pid} did not reload its exports within "
                              f"{timeout:g} s: {_tail(lines)}")
        time.sleep(POLL_INTERVAL)
        lines = _log_since(log, offset)
    failed = [line for line in lines if any(marker in line for marker in EXPORT_FAILED)]
    if failed:
        raise StorageIOError(f"ganesha pid {pid} rejected the new export: {_tail(failed)}")
    logger.info("ganesha pid %d for %s reloaded its export", pid, server.pseudo)


def clients(directory: Path) -> int | None:
    """How many client addresses hold a TCP connection to the server (a client host, however
    many mounts or processes use it), or None when it does not run."""
    pid = running(directory)
    if pid is None:
        return None
    server = load(directory)
    local = ipaddress.ip_address(server.address)
    peers: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for table in ("tcp", "tcp6"):
        try:  # ganesha's own view: the tables of its network namespace
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] != "01":  # ESTABLISHED
                continue
            address, port = _proc_endpoint(fields[1])
            if port == server.port and (address == local or (
                    isinstance(address, ipaddress.IPv6Address)
                    and address.ipv4_mapped == local)):
                peer = _proc_endpoint(fields[2])[0]
                mapped = peer.ipv4_mapped if isinstance(peer, ipaddress.IPv6Address) else None
                peers.add(mapped or peer)
    return len(peers)


def _proc_endpoint(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """An ``ADDRESS:PORT`` of /proc/net/tcp{,6}: the address in 32-bit words of host order."""
    address, port = text.split(":")
    raw = bytes.fromhex(address)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words), int(port, 16)


# -- the log -------------------------------------------------------------------------------

def _log_since(log: Path, offset: int) -> list[str]:
    try:
        with open(log, "rb") as file:
            file.seek(offset)
            return file.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return []


def _tail(lines: list[str]) -> str:
    """The last complaints of the log (WARN or worse, else any lines), without their timestamp
    prefix, and without those ganesha always makes here about dbus, Kerberos, RADOS and (for
    NFSv4, which needs none) rpcbind."""
    noise = ("DBUS", "Cannot register NFS V4", "krb5", "keytab", "default realm", "RADOS")
    useful = [line.split("] ", 1)[-1] for line in lines
              if line.strip() and not any(word in line for word in noise)]
    severe = [line for line in useful if any(f":{level} :" in line for level in SEVERE)]
    return " | ".join((severe or useful)[-LOG_TAIL_LINES:]) or "(nothing in the log)"

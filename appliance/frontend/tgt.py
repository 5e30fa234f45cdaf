"""tgtd, the userspace iSCSI target: one instance per node, run by the daemon and
configured through its management socket.

The daemon starts its own tgtd (not the machine's ``tgt`` service): its management socket
lives in the node's run directory (``TGT_IPC_SOCKET``), its portal is the node's iSCSI
portal, and it outlives the daemon like the engines do, so that initiators stay logged in
while the daemon restarts; the next daemon finds it by its pid file and its socket.

Requests go over the management socket in tgt's own format (docs/iscsi.md): a fixed header
and a ``key=value,...`` parameter string. Talking to the socket rather than running
``tgtadm`` keeps CHAP secrets out of every process's arguments.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from appliance import ports
from appliance.errors import AddressInUse, FailedPrecondition, StorageIOError, Unavailable
from appliance.nbd.spawn import spawn_daemon
from appliance.replication.protocol import format_address

Address = tuple[str, int]

# enum tgtadm_mode and enum tgtadm_op (tgt's usr/tgtadm.h)
MODE_SYSTEM, MODE_TARGET, MODE_DEVICE, MODE_PORTAL, MODE_LLD, MODE_SESSION, \
    MODE_CONNECTION, MODE_ACCOUNT = range(8)
OP_NEW, OP_DELETE, OP_SHOW, OP_BIND, OP_UNBIND, OP_UPDATE, OP_STATS = range(7)
ACCOUNT_INCOMING, ACCOUNT_OUTGOING = 0, 1
GLOBAL_TID = -1  # the discovery sessions' "target": accounts bound to it guard discovery

# struct tgtadm_req: mode, op, lld[64], len, tid, sid, lun, cid, host_no, device_type,
# ac_dir, pack, force
_REQUEST = struct.Struct("=ii64sIiQQIIIIII")
_RESPONSE = struct.Struct("=II")  # struct tgtadm_rsp: err, len

_ERRORS = {
    1: "unknown error", 2: "out of memory", 3: "no such driver", 4: "no such target",
    5: "no such logical unit", 6: "no such session", 7: "no such connection",
    8: "no such binding", 9: "the target exists", 10: "the logical unit exists",
    11: "the binding exists", 12: "the ACL entry exists", 13: "no such ACL entry",
    14: "the account exists", 15: "no such account", 16: "too many accounts",
    17: "invalid request", 18: "an outgoing account is bound already",
    19: "the target has sessions", 20: "the logical unit is busy", 21: "the driver is busy",
    22: "unsupported operation", 23: "unknown parameter", 24: "removal prevented",
}
NO_TARGET, NO_LUN, TARGET_EXISTS, ACCOUNT_EXISTS, NO_ACCOUNT, ACL_EXISTS, ACL_MISSING, \
    BINDING_EXISTS = 4, 5, 9, 14, 15, 12, 13, 11

READY_TIMEOUT = 30.0
REQUEST_TIMEOUT = 30.0


class TgtError(StorageIOError):
    """tgtd refused a management request."""

    def __init__(self, what: str, status: int) -> None:
        super().__init__(f"tgtd: {what}: {_ERRORS.get(status, f'error {status}')}")
        self.status = status


@dataclass
class Session:
    initiator: str
    addresses: list[str] = field(default_factory=list)


@dataclass
class Target:
    """A target as tgtd shows it."""

    tid: int
    name: str
    backing: dict[int, str] = field(default_factory=dict)  # LUN: backing store path
    sessions: list[Session] = field(default_factory=list)
    accounts: list[str] = field(default_factory=list)  # incoming users
    outgoing: str = ""  # the outgoing (mutual CHAP) user
    acl: list[str] = field(default_factory=list)


class Tgt:
    """The node's tgtd: *directory* holds its management socket, pid file and log;
    *portal* is where it listens for initiators."""

    def __init__(self, directory: Path, portal: Address) -> None:
        self.directory = directory
        self.portal = portal

    @property
    def socket_path(self) -> Path:
        return self.directory / "socket.0"  # TGT_IPC_SOCKET + "." + control port 0

    @property
    def pid_file(self) -> Path:
        return self.directory / "tgtd.pid"

    @property
    def log_file(self) -> Path:
        return self.directory / "tgtd.log"

    # -- the process ----------------------------------------------------------------------

    def pid(self) -> int | None:
        """The pid of this node's tgtd if it runs, else None."""
        try:
            pid = int(self.pid_file.read_text())
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        return pid if command and Path(os.fsdecode(command[0])).name == "tgtd" else None

    def ensure_running(self) -> None:
        """Start tgtd unless it runs and answers."""
        running = self.pid()
        if running is not None:
            if self._answers():
                return
            raise Unavailable(f"the node's tgtd (process {running}) does not answer on "
                              f"{self.socket_path}: kill it, and the next attempt starts "
                              "another")
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        host, port = self.portal
        if not ports.bindable(host, port):
            raise AddressInUse(f"the iSCSI portal {host}:{port} is taken by "
                               f"{ports.holder(port)}; free it, or set iscsi_portal in the "
                               "node's configuration")
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()  # left by a tgtd that died
        binary = shutil.which("tgtd", path="/usr/sbin:/usr/bin:/sbin:/bin")
        if binary is None:
            raise FailedPrecondition("tgtd is not installed (Debian: tgt)")
        # its own session, reparented: it outlives the daemon (a bare environment: the
        # daemon's may hold secrets)
        pid = spawn_daemon([binary, "-f", "-C", "0", "--iscsi",
                            f"portal={format_address(self.portal)}"],
                           {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                            "TGT_IPC_SOCKET": str(self.directory / "socket")}, self.log_file)
        self.pid_file.write_text(f"{pid}\n")
        deadline = time.monotonic() + READY_TIMEOUT
        while not (self._answers() and _listening(self.portal)):
            if not Path(f"/proc/{pid}").exists():
                tail = self.log_file.read_text(errors="replace").strip().splitlines()[-5:]
                raise StorageIOError("tgtd could not start: " + " ".join(tail))
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                raise Unavailable(f"tgtd did not answer within {READY_TIMEOUT:.0f} s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop tgtd (its targets go with it)."""
        pid = self.pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # tgtd has no orderly stop with targets defined
        deadline = time.monotonic() + READY_TIMEOUT
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.02)
        self.pid_file.unlink(missing_ok=True)

    def _answers(self) -> bool:
        try:
            self.request(MODE_SYSTEM, OP_SHOW, tid=GLOBAL_TID)
        except (TgtError, Unavailable):
            return False
        return True

    # -- the management socket --------------------------------------------------------------

    def request(self, mode: int, op: int, params: str = "", *, tid: int = 0, lun: int = 0,
                ac_dir: int = 0, force: bool = False, what: str = "") -> str:
        """Send one management request; tgtd's answer text. A refusal raises
        :class:`TgtError` (its ``status`` is tgt's error number)."""
        body = params.encode() + b"\0" if params else b""
        header = _REQUEST.pack(mode, op, b"iscsi", _REQUEST.size + len(body), tid, 0, lun, 0,
                               0, 0, ac_dir, 0, int(force))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(REQUEST_TIMEOUT)
            try:
                connection.connect(str(self.socket_path))
                connection.sendall(header + body)
                status, length = _RESPONSE.unpack(_receive(connection, _RESPONSE.size))
                text = _receive(connection, length - _RESPONSE.size) \
                    if length > _RESPONSE.size else b""
            except OSError as exc:
                raise Unavailable(f"tgtd does not answer on {self.socket_path}: "
                                  f"{exc.strerror or exc}") from exc
        if status:
            raise TgtError(what or f"request {mode}/{op}", status)
        return text.rstrip(b"\0").decode(errors="replace")

    # -- targets --------------------------------------------------------------------------

    def targets(self) -> dict[str, Target]:
        """The targets by name."""
        return {target.name: target for target in parse_show(
            self.request(MODE_TARGET, OP_SHOW, tid=GLOBAL_TID, what="list targets"))}

    def new_target(self, name: str) -> int:
        """Create target *name*; its tid."""
        used = {target.tid for target in self.targets().values()}
        tid = next(number for number in range(1, len(used) + 2) if number not in used)
        self.request(MODE_TARGET, OP_NEW, f"targetname={name}", tid=tid,
                     what=f"create target {name}")
        return tid


def _receive(connection: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            raise ConnectionResetError("tgtd closed the connection")
        data += chunk
    return bytes(data)


def _listening(portal: Address) -> bool:
    family = socket.AF_INET6 if ":" in portal[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(portal) == 0


def parse_show(text: str) -> list[Target]:
    """tgtd's ``show target`` text as targets."""
    targets: list[Target] = []
    section = ""
    lun = [-1]  # the LUN whose lines are being read
    for line in text.splitlines():
        stripped = line.strip()
        if line.startswith("Target "):
            number, _, name = line[len("Target "):].partition(": ")
            targets.append(Target(int(number), name.strip()))
            section = ""
        elif targets and stripped:
            if len(line) - len(line.lstrip(" ")) == 4:
                section = stripped.rstrip(":")
            else:
                _parse_line(targets[-1], section, stripped, lun)
    return targets


def _parse_line(target: Target, section: str, line: str, lun: list[int]) -> None:
    if section == "I_T nexus information":
        if line.startswith("Initiator:"):
            target.sessions.append(Session(line[len("Initiator:"):].partition(" alias:")[0]
                                           .strip()))
        elif line.startswith("IP Address:") and target.sessions:
            target.sessions[-1].addresses.append(line.split(":", 1)[1].strip())
    elif section == "LUN information":
        if line.startswith("LUN:"):
            lun[0] = int(line.split(":", 1)[1])
        elif line.startswith("Backing store path:") and lun[0] > 0:
            target.backing[lun[0]] = line.split(":", 1)[1].strip()
    elif section == "Account information":
        if line.endswith(" (outgoing)"):
            target.outgoing = line.removesuffix(" (outgoing)")
        else:
            target.accounts.append(line)
    elif section == "ACL information":
        target.acl.append(line)


def check_backing(device: str) -> None:
    if not Path(device).exists():
        raise FailedPrecondition(f"the device {device} to export does not exist")

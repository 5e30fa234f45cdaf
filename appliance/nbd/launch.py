"""Starting and stopping server processes: the engine (nbdkit with the plugin) and the
replica server. In the background they run in their own session, log to a file, and are
only reported started once they answer; a pid file records them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import appliance
from appliance import ports, unixsock
from appliance.chain.directory import lock_directory
from appliance.errors import (
    AddressInUse,
    AlreadyExists,
    ApplianceError,
    AuthenticationFailed,
    Busy,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from appliance.nbd.failure import read_start_failure
from appliance.nbd.settings import EngineSettings
from appliance.nbd.spawn import spawn_daemon
from appliance.replication import engine_control
from appliance.replication.client import ReplicaConnection
from appliance.secrets import read_secret_file

PLUGIN = Path(__file__).with_name("plugin.py")
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0


def plugin_environment() -> dict[str, str]:
    """nbdkit's embedded interpreter finds the project and the virtualenv's packages."""
    paths = [str(Path(appliance.__file__).resolve().parents[1]), sysconfig.get_paths()["purelib"]]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def nbdkit_command(settings: EngineSettings) -> list[str]:
    return ["nbdkit", "-f", "-U", str(settings.socket), "-t", str(settings.worker_threads),
            "python", str(PLUGIN), *settings.plugin_parameters()]


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def process_running(pid: int) -> bool:
    """True while *pid* runs (a zombie, exited but not yet reaped by init, is not running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _wait_ready(pid: int, ready: Callable[[], bool], what: str, log_file: Path) -> None:
    """Wait until *ready* says the server *pid* answers; fail (with the end of its log) if
    it exits first or takes longer than READY_TIMEOUT (it is then killed)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if not process_running(pid):
            raise FailedPrecondition(f"{what} did not start:\n" + _log_tail(log_file))
        with contextlib.suppress(Unavailable):
            if ready():
                return
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            raise Unavailable(f"{what} did not become ready in {READY_TIMEOUT:.0f} s:\n"
                              + _log_tail(log_file))
        time.sleep(0.05)


def _remove_stale_socket(path: Path) -> None:
    """Remove a unix socket file that a crashed engine left (nobody accepts on it)."""
    if not path.is_socket():
        if path.exists():
            raise AlreadyExists(f"{path} exists and is not a socket")
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        unixsock.connect(probe, path)
    except ConnectionRefusedError:
        path.unlink()
        return
    finally:
        probe.close()
    raise AlreadyExists(f"something is already serving on {path}")


def start_engine(settings: EngineSettings, *, foreground: bool) -> int:
    read_secret_file(settings.secret_file)  # a clear error now, not in the engine's log
    for path in (settings.socket, settings.control):
        if not path.parent.is_dir():
            raise NotFound(f"directory {path.parent} does not exist")
    if len(os.fsencode(settings.socket)) > unixsock.MAX_PATH:
        raise InvalidArgument(f"the NBD socket path {settings.socket} is longer than "
                              f"{unixsock.MAX_PATH} bytes; choose a shorter runtime directory")
    with contextlib.suppress(Unavailable):
        engine_control.call(settings.control, "status", timeout=5)
        raise AlreadyExists(f"an engine is already running with control socket "
                            f"{settings.control}")
    _remove_stale_socket(settings.socket)
    settings.start_failure_file.unlink(missing_ok=True)
    command = nbdkit_command(settings)
    if foreground:
        os.execvpe(command[0], command, plugin_environment())  # noqa: S606 - no shell wanted
    pid = spawn_daemon(command, plugin_environment(), settings.log_file)

    def ready() -> bool:
        engine_control.call(settings.control, "status", timeout=5)
        return settings.socket.exists()

    try:
        _wait_ready(pid, ready, f"the engine of volume {settings.volume}", settings.log_file)
    except ApplianceError:
        refusal = read_start_failure(settings.start_failure_file)
        if refusal is not None:
            raise refusal from None
        raise
    settings.pid_file.write_text(f"{pid}\n")
    return pid


def stop_engine(control_path: Path) -> None:
    """Ask the engine to stop cleanly and wait until its process is gone."""
    status = engine_control.call(control_path, "status")
    pid = int(status["pid"])
    engine_control.call(control_path, "stop")
    deadline = time.monotonic() + STOP_TIMEOUT
    while process_running(pid):
        if time.monotonic() > deadline:
            raise Unavailable(f"the engine (pid {pid}) did not stop in {STOP_TIMEOUT:.0f} s")
        time.sleep(0.05)
    with contextlib.suppress(FileNotFoundError):
        Path(status["socket"] + ".pid").unlink()


# -- replica servers ------------------------------------------------------------------------


def replica_server_files(directory: Path) -> tuple[Path, Path]:
    """The pid file and the log file of the server of the replica in *directory*."""
    return directory / "server.pid", directory / "server.log"


def start_replica_server(directory: Path, listen: tuple[str, int], secret_file: Path) -> int:
    secret = read_secret_file(secret_file)
    pid_file, log_file = replica_server_files(directory)
    if not directory.is_dir():
        raise NotFound(f"replica directory {directory} does not exist")
    if not ports.bindable(*listen):
        _check_port_holder(directory, listen)
    command = [sys.executable, "-m", "appliance", "replica", "serve", str(directory),
               "--listen", f"{listen[0]}:{listen[1]}", "--secret-file", str(secret_file),
               "--foreground"]
    pid = spawn_daemon(command, dict(os.environ), log_file)

    def ready() -> bool:
        try:
            ReplicaConnection(listen, secret, timeout=2).close()
        except AuthenticationFailed:
            # not this server (it did not start, or not yet): another one took the port
            if process_running(pid):
                raise Unavailable("not ready") from None
            raise AddressInUse(f"port {listen[1]} of {listen[0]} is taken by "
                               f"{ports.holder(listen[1])}") from None
        return True

    try:
        _wait_ready(pid, ready, "the replica server", log_file)
    except FailedPrecondition as exc:
        if isinstance(exc, AddressInUse) or ports.bindable(*listen):
            raise
        _check_port_holder(directory, listen)  # taken meanwhile
    pid_file.write_text(f"{pid}\n")
    return pid


def _check_port_holder(directory: Path, listen: tuple[str, int]) -> None:
    """The port of the replica in *directory* is taken: by its own server when another
    process holds the replica (a server that does not answer now: stopped, overloaded, or
    started by a daemon that died before recording it), which :class:`Unavailable` says;
    else by another program (:class:`AddressInUse`: the port has to change)."""
    try:
        fd = lock_directory(directory, exclusive=True)
    except Busy:
        raise Unavailable(f"the replica server of {directory} holds port {listen[1]} but does "
                          "not answer (stopped or overloaded); tried again later") from None
    os.close(fd)
    raise AddressInUse(f"port {listen[1]} of {listen[0]} is taken by {ports.holder(listen[1])}")


def stop_replica_server(directory: Path) -> None:
    pid_file, _ = replica_server_files(directory)
    try:
        pid = int(pid_file.read_text())
    except (FileNotFoundError, ValueError):
        raise NotFound(f"no replica server is recorded for {directory}") from None
    if process_running(pid):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while process_running(pid):
        if time.monotonic() > deadline:
            raise Unavailable(f"the replica server (pid {pid}) did not stop")
        time.sleep(0.05)
    pid_file.unlink(missing_ok=True)

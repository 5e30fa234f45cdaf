"""Running volumes the way an operator does: replica servers and an engine started with the
real ``appliance`` program, real clients (fio, nbdcopy, qemu-img), and helpers to crash,
stop, restart and compare replicas. Every wait is bounded."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from appliance.frontend import attach as frontend
from appliance.nbd.launch import process_running

APPLIANCE = str(Path(sys.executable).parent / "appliance")
MiB = 1 << 20


def run(*args: str | Path, check: bool = True, timeout: float = 120,
        prefix: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*prefix, APPLIANCE, *map(str, args)], capture_output=True,
                            text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"appliance {' '.join(map(str, args))} failed "
                             f"({result.returncode}):\n{result.stdout}{result.stderr}")
    return result


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(condition: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def alive(pid: int) -> bool:
    return process_running(pid)


def engine_status(control: Path) -> dict[str, Any]:
    """``appliance engine status -o json`` of the engine behind *control*."""
    result: dict[str, Any] = json.loads(
        run("engine", "status", "--control", control, "-o", "json").stdout)
    return result


def engine_writes(control: Path) -> int:
    """The writes the engine has completed since it started (its ``io.write_ops``): the
    observable progress a test waits on before it injects a fault."""
    return int(engine_status(control)["io"]["write_ops"])


class Volume:
    """N replicas (directories served by replica servers) and an engine."""

    def __init__(self, root: Path, replicas: int, size: str = "256M", *,
                 hosts: Sequence[str] | None = None,
                 namespaces: Sequence[str | None] | None = None,
                 directories: Sequence[Path] | None = None) -> None:
        self.root = root
        self.secret = root / "secret"
        if not self.secret.exists():
            self.secret.write_bytes(os.urandom(24).hex().encode())
            self.secret.chmod(0o600)
        self.name = "vol"
        self.size = size
        self.socket = root / "nbd.sock"
        self.control = root / "ctl.sock"
        self.hosts = list(hosts or ["127.0.0.1"] * replicas)
        self.namespaces = list(namespaces or [None] * replicas)
        self.directories = list(directories or
                                [root / f"replica{index}" for index in range(replicas)])
        self.ports = [free_port() for _ in range(replicas)]
        self.engine_args: tuple[str, ...] = ()  # given to every start of the engine
        for directory in self.directories:
            run("replica", "create", directory, "--size", size)
        self.engine_pid = 0

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def address(self, index: int) -> str:
        return f"{self.hosts[index]}:{self.ports[index]}"

    def _prefix(self, index: int) -> list[str]:
        namespace = self.namespaces[index]
        return ["ip", "netns", "exec", namespace] if namespace else []

    def serve(self, index: int) -> None:
        run("replica", "serve", self.directories[index], "--listen", self.address(index),
            "--secret-file", self.secret, prefix=self._prefix(index))

    def serve_all(self) -> None:
        for index in range(len(self.directories)):
            self.serve(index)

    def server_pid(self, index: int) -> int:
        return int((self.directories[index] / "server.pid").read_text())

    def signal_server(self, index: int, number: int) -> None:
        os.kill(self.server_pid(index), number)

    def crash_server(self, index: int) -> None:
        pid = self.server_pid(index)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not alive(pid), 30, f"replica server {index} to die")

    def stop_server(self, index: int) -> None:
        pid = self.server_pid(index)
        if alive(pid):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda: not alive(pid), 60, f"replica server {index} to stop")

    def start_engine(self, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        replicas = [item for index in range(len(self.directories))
                    for item in ("--replica", self.address(index))]
        result = run("engine", "start", self.name, *replicas, "--secret-file", self.secret,
                     "--socket", self.socket, "--control", self.control, *self.engine_args,
                     *extra, check=check)
        if result.returncode == 0:
            self.engine_pid = int(Path(str(self.socket) + ".pid").read_text())
        return result

    def status(self) -> dict[str, Any]:
        return engine_status(self.control)

    def writes(self) -> int:
        return engine_writes(self.control)

    def modes(self) -> list[str]:
        return [replica["mode"] for replica in self.status()["replicas"]]

    def wait_healthy(self, timeout: float = 120) -> None:
        wait_for(lambda: self.status()["state"] == "healthy", timeout, "a healthy volume",
                 interval=0.2)

    def wait_mode(self, index: int, mode: str, timeout: float = 60) -> None:
        address = self.address(index)
        wait_for(lambda: any(r["address"] == address and r["mode"] == mode
                             for r in self.status()["replicas"]), timeout,
                 f"replica {address} in mode {mode}", interval=0.1)

    def crash_engine(self) -> None:
        os.kill(self.engine_pid, signal.SIGKILL)
        wait_for(lambda: not alive(self.engine_pid), 30, "the engine to die")

    def stop_engine(self) -> None:
        if self.engine_pid and alive(self.engine_pid):
            run("engine", "stop", "--control", self.control)

    def export(self, index: int, output: Path) -> Path:
        run("replica", "export", self.directories[index], "--force", output)
        return output

    def replicas_identical(self, indexes: Sequence[int] | None = None) -> list[Path]:
        """Export the heads of the (stopped) replicas and prove them identical with
        qemu-img compare; return the images."""
        chosen = list(indexes if indexes is not None else range(len(self.directories)))
        images = [self.export(index, self.root / f"head{index}.img") for index in chosen]
        for image in images[1:]:
            result = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw",
                                     str(images[0]), str(image)], check=False)
            assert result.returncode == 0, f"{images[0]} and {image} differ"
        return images

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            run("engine", "detach", "--control", self.control, check=False, timeout=60)
        if self.engine_pid and alive(self.engine_pid):
            with contextlib.suppress(Exception):
                run("engine", "stop", "--control", self.control, check=False, timeout=60)
            if alive(self.engine_pid):
                os.kill(self.engine_pid, signal.SIGKILL)
        for index in range(len(self.directories)):
            with contextlib.suppress(Exception):
                self.stop_server(index)


def nbdsh(uri: str, code: str) -> None:
    """Run Python *code* with ``h`` connected to *uri* (libnbd's shell, on the Debian
    interpreter that has the ``nbd`` module)."""
    subprocess.run(["/usr/bin/python3", "-m", "nbd", "-u", uri, "-c", code], check=True,
                   timeout=120)


def fio(uri: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run fio against an NBD URI; the standard workload options come from the caller."""
    return subprocess.run(["fio", "--ioengine=nbd", f"--uri={uri}", "--output-format=json",
                           *args], capture_output=True, text=True, timeout=timeout, check=False)


def fio_errors(result: subprocess.CompletedProcess[str]) -> int:
    """Jobs that reported an error (verify failures included)."""
    try:
        report = json.loads(result.stdout[result.stdout.index("{"):])
    except ValueError:
        return -1
    return sum(1 for job in report["jobs"] if job.get("error"))


VERIFY = ["--rw=randwrite", "--bsrange=4k-64k", "--bs_unaligned=0", "--verify=crc32c",
          "--verify_backlog=1024", "--verify_fatal=1", "--serialize_overlap=1",
          "--iodepth=16", "--name=workload"]


def _dead(pid: int) -> bool:
    return not alive(pid)


class Node:
    """A node daemon (`appliance serve`) started as an operator would, and its client."""

    def __init__(self, root: Path, host: str = "127.0.0.1",
                 launcher: Sequence[str] = ()) -> None:
        self.root = root
        self.host = host
        self.launcher = list(launcher)  # a prefix of the daemon's command (nsenter ...)
        self.data = root / "data"
        self.port = free_port()
        self.url = f"http://{host}:{self.port}"
        self.log = root / "daemon.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str | Path, wait: bool = True) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [*self.launcher, APPLIANCE, "serve", "--data-dir", str(self.data), "--listen",
                 f"{self.host}:{self.port}", *map(str, extra)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        if wait:
            wait_for(self._healthy, 60, "the daemon to answer")

    def _healthy(self) -> bool:
        import urllib.request  # noqa: PLC0415

        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError("the daemon exited:\n" + self.log.read_text()[-3000:])
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=60)

    @property
    def token_file(self) -> Path:
        return self.data / "token"

    def engine_control(self, volume: str) -> Path:
        """The control socket of the engine the daemon runs for *volume*."""
        return self.data / "run" / volume / "ctl.sock"

    def change_settings(self, **changes: Any) -> dict[str, Any]:
        """PATCH /v1/settings; the settings the daemon answers with."""
        response = httpx.patch(self.url + "/v1/settings", json=changes, headers={
            "Authorization": f"Bearer {self.token_file.read_text().strip()}"})
        assert response.status_code == 200, response.text
        settings: dict[str, Any] = response.json()
        return settings

    def cli_env(self) -> dict[str, str]:
        """The environment of a CLI process talking to this daemon."""
        return {**os.environ, "APPLIANCE_URL": self.url,
                "APPLIANCE_TOKEN_FILE": str(self.token_file)}

    def cli(self, *args: str | Path, check: bool = True,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return run(*args, "--url", self.url, "--token-file", self.token_file, check=check,
                   timeout=timeout)

    def volume(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.cli("volume", "show", name, "-o", "json").stdout)
        return result

    def stop_shares(self) -> None:
        """Kill the NFS servers of this node's shared volumes (found by their command
        line: their pid files may be gone) and unmount the shares' file systems."""
        marker = os.fsencode(self.data)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                command = (entry / "cmdline").read_bytes()
                if b"ganesha.nfsd" in command and marker + b"/" in command:
                    os.kill(int(entry.name), signal.SIGKILL)
        for mount in sorted((self.data / "shares").glob("*")):
            subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True,
                           timeout=60)

    def stop_browsing(self) -> None:
        """Take down this node's browse mounts (docs/browse.md) that a test left: the file
        systems on loop devices over its helpers' images, the loop devices, the helpers
        and their FUSE mounts."""
        browse = self.data / "run" / "browse"
        if not browse.exists():
            return
        listed = subprocess.run(["losetup", "--json", "--list"], capture_output=True,
                                text=True, check=False, timeout=60).stdout
        for loop in json.loads(listed or '{"loopdevices": []}')["loopdevices"]:
            if str(loop.get("back-file") or "").startswith(str(browse)):
                targets = subprocess.run(["findmnt", "-n", "-o", "TARGET", "--source",
                                          loop["name"]], capture_output=True, text=True,
                                         check=False, timeout=60).stdout.split()
                for target in targets:
                    subprocess.run(["umount", "-l", target], check=False,
                                   capture_output=True, timeout=60)
                subprocess.run(["losetup", "--detach", loop["name"]], check=False,
                               capture_output=True, timeout=60)
        marker = os.fsencode(browse)
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    command = (entry / "cmdline").read_bytes()
                    if b"appliance.browse.helper" in command and marker in command:
                        os.kill(int(entry.name), signal.SIGKILL)
        for fuse in sorted(browse.glob("*/fuse")):
            subprocess.run(["fusermount3", "-u", "-z", str(fuse)], check=False,
                           capture_output=True, timeout=60)

    def cleanup(self) -> None:
        """Stop everything the daemon started, whatever state it is in."""
        self.stop(signal.SIGKILL)
        run_dir = self.data / "run"
        self.stop_browsing()
        self.stop_shares()  # then its iSCSI target, before the devices go
        tgtd = run_dir / "tgtd" / "tgtd.pid"
        with contextlib.suppress(OSError, ValueError):
            pid = int(tgtd.read_text())
            if alive(pid) and Path(f"/proc/{pid}/comm").read_text().strip() == "tgtd":
                os.kill(pid, signal.SIGKILL)
                wait_for(partial(_dead, pid), 30, "tgtd to stop")
        for control in sorted(run_dir.glob("*/ctl.sock")) if run_dir.exists() else []:
            with contextlib.suppress(Exception):
                frontend.detach(control.with_name("ctl.sock.attach"))
            run("engine", "stop", "--control", control, check=False, timeout=60)
        for pid_file in sorted(self.data.rglob("server.pid")) + sorted(self.root.rglob(
                "replicas/*/server.pid")):
            with contextlib.suppress(Exception):
                pid = int(pid_file.read_text())
                if alive(pid):
                    os.kill(pid, signal.SIGTERM)
                    wait_for(partial(_dead, pid), 30, "a replica server to stop")

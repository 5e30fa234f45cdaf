"""Machines for installing the appliance's package on: each is a network namespace (a test
host of tests/netns.py) with a mount namespace of its own, in which the paths a node keeps
to itself are private directories bind-mounted over the real ones.

Everything else is this machine's: the package installs into the real /opt, /usr and dpkg
database (several sandboxes share one installation, as hosts of a cluster built from one
image would), while each sandbox has its own configuration, data, runtime files, logs and
loopback address space, so that its daemon is a node of its own and the node daemon this
machine may already run (on 127.0.0.1:9500, /var/lib/appliance) is never touched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.netns import Host

# the paths of a node's own: configuration (what the machine has under /etc is copied in),
# data, runtime files (pid files: etcd's is /run/etcd.pid), logs, caches
PRIVATE = ("/etc/appliance", "/etc/default", "/etc/etcd", "/etc/sysctl.d", "/etc/modprobe.d",
           "/etc/modules-load.d", "/var/lib/appliance", "/var/lib/etcd", "/var/log/appliance",
           "/var/cache/appliance", "/run")


class Sandbox:
    def __init__(self, host: Host, root: Path, private: Sequence[str] = PRIVATE) -> None:
        self.host = host
        self.root = root
        self.private = tuple(private)
        self.holder: subprocess.Popen[bytes] | None = None
        self.created: list[Path] = []  # real directories made only as mount points
        self.processes: list[subprocess.Popen[bytes]] = []  # started by popen()

    @property
    def address(self) -> str:
        return self.host.address

    def path(self, real: str) -> Path:
        """Where the sandbox's private *real* path (one of ``private``) lives outside it."""
        for base in self.private:
            if real == base or real.startswith(base + "/"):
                return self.root / base.strip("/").replace("/", "_") / real[len(base) + 1:]
        raise ValueError(f"{real} is not private to the sandbox")

    def start(self) -> None:
        self.holder = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.host.name}", "--", "unshare", "--mount",
             "--propagation", "private", "--", "sleep", "infinity"], start_new_session=True)
        own = os.readlink("/proc/self/ns/mnt")
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{self.holder.pid}/ns/mnt") == own:
            if time.monotonic() > deadline or self.holder.poll() is not None:
                raise RuntimeError("the sandbox's mount namespace did not appear")
            time.sleep(0.02)
        for real in self.private:
            source = self.path(real)
            source.mkdir(parents=True, exist_ok=True)
            target = Path(real)
            if real.startswith("/etc/") and target.is_dir():  # the machine's, privately
                subprocess.run(["cp", "-a", f"{real}/.", str(source)], check=True)
            if target.exists():  # the owner and mode a package gave it (etcd's: etcd, 0700)
                status = target.stat()
                os.chown(source, status.st_uid, status.st_gid)
                source.chmod(status.st_mode & 0o7777)
            else:
                target.mkdir(parents=True)
                self.created.append(target)
            self.run(["mount", "--bind", str(source), real], check=True)

    def command(self, argv: Sequence[str]) -> list[str]:
        assert self.holder is not None, "the sandbox is not started"
        return ["nsenter", "-t", str(self.holder.pid), "-m", "-n", "--", *argv]

    def run(self, argv: Sequence[str], *, check: bool = False, timeout: float = 600,
            env: dict[str, str] | None = None, input: str | None = None,
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(argv), capture_output=True, text=True, check=check,
                              timeout=timeout, env=env, input=input)

    def popen(self, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        """A process in the sandbox; killed and reaped by stop() if it still runs then."""
        process = subprocess.Popen(self.command(argv), start_new_session=True,
                                   stdin=subprocess.DEVNULL)
        self.processes.append(process)
        return process

    def stop(self) -> None:
        """Kill everything the sandbox runs, then its namespace; remove the mount points it
        made (the private directories stay under its root for a failed test's look)."""
        if self.holder is not None:
            self.release_loop_devices()
        self.host.kill_everything()
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(timeout=10)
        if self.holder is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.holder.pid, signal.SIGKILL)
            self.holder.wait(timeout=10)
        for path in reversed(self.created):
            with contextlib.suppress(OSError):
                path.rmdir()


    def release_loop_devices(self) -> None:
        """Detach the loop devices over FUSE files mounted in the sandbox (a volume left
        attached by a failed test): loop devices are the machine's, not the sandbox's."""
        assert self.holder is not None
        devices = set()
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.holder.pid}/mountinfo").read_text().splitlines():
                fields = line.split()
                fstype = fields[fields.index("-") + 1]
                if fstype.startswith("fuse") and fields[4].startswith(self.private):
                    devices.add(fields[2])
        listed = subprocess.run(["losetup", "-l", "-n", "--raw", "-O", "NAME,BACK-MAJ:MIN"],
                                capture_output=True, text=True, check=False).stdout
        for line in listed.splitlines():
            name, _, device = line.partition(" ")
            if device.strip() in devices:
                subprocess.run(["losetup", "-d", name], check=False, capture_output=True)


@contextlib.contextmanager
def sandboxes(hosts: Sequence[Host], root: Path) -> Iterator[list[Sandbox]]:
    made = [Sandbox(host, root / host.name) for host in hosts]
    try:
        for sandbox in made:
            sandbox.start()
        yield made
    finally:
        for sandbox in made:
            sandbox.stop()


def start_sshd(box: Sandbox, authorized_key: str) -> subprocess.Popen[bytes]:
    """An SSH server for root on the sandbox's address, port 22, that lets in the holder of
    *authorized_key* (a public key line) only; stopped with the sandbox."""
    home = box.root / "sshd"
    home.mkdir(parents=True, exist_ok=True)
    key = home / "ssh_host_ed25519_key"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True)
    (home / "authorized_keys").write_text(authorized_key.strip() + "\n")
    (home / "sshd_config").write_text(
        f"ListenAddress {box.address}\nPort 22\nHostKey {key}\nPidFile {home}/sshd.pid\n"
        f"AuthorizedKeysFile {home}/authorized_keys\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "StrictModes no\nSubsystem sftp /usr/lib/openssh/sftp-server\n")
    box.run(["mkdir", "-p", "-m", "0755", "/run/sshd"], check=True)  # its privilege separation
    server = box.popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(home / "sshd_config")])
    deadline = time.monotonic() + 20
    while box.run(["bash", "-c", f"exec 3<>/dev/tcp/{box.address}/22"]).returncode != 0:
        if time.monotonic() > deadline or server.poll() is not None:
            raise RuntimeError(f"sshd on {box.address} did not start")
        time.sleep(0.1)
    return server

"""The file system on an attached volume's device: which file system it holds, where it is
mounted, and growing it after the volume grew (online when mounted)."""

from __future__ import annotations

import errno
import os
import subprocess
import tempfile

from appliance.errors import FailedPrecondition, InvalidArgument, StorageIOError

GROWABLE = ("ext2", "ext3", "ext4", "xfs")


def in_use(device: str) -> bool:
    """Whether something holds the device (a mount, a holder; an exclusive open fails)."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return True
        raise
    os.close(fd)
    return False


def fs_type(device: str) -> str:
    """The file system type on *device*, or an empty string."""
    result = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", device],
                            capture_output=True, text=True, check=False)
    return result.stdout.strip()


CAP_SYS_RESOURCE = 24


def _capable(capability: int) -> bool:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> capability & 1)
    return False


ONLINE_EXT4 = ("unmount it and expand with --resize-fs again (or run resize2fs where the "
               "capability exists)")


def check_growable(device: str, what: str = "--resize-fs",
                   remedy: str = ONLINE_EXT4) -> str:
    """The file system type on *device*, if this process can grow it as it is now; the
    errors start with *what* asked, and a mounted ext4 without the capability says *remedy*."""
    kind = fs_type(device)
    if kind not in GROWABLE:
        raise InvalidArgument(f"{what}: the device holds {kind or 'no file system'}; "
                              f"only {', '.join(GROWABLE)} can be grown")
    if kind != "xfs" and mountpoint(device) and not _capable(CAP_SYS_RESOURCE):
        # the kernel refuses an online ext4 resize without it (containers often drop it)
        raise FailedPrecondition(
            f"{what}: growing the mounted {kind} file system on {device} needs "
            f"CAP_SYS_RESOURCE, which this process lacks here; {remedy}")
    return kind


def _run(*command: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    # e2fsck: 1 means errors were corrected, which a forced check may report on success
    if result.returncode and not (command[0] == "e2fsck" and result.returncode == 1):
        raise StorageIOError(f"{' '.join(command)} failed ({result.returncode}): "
                             f"{(result.stderr or result.stdout).strip()[-500:]}")


def mountpoint(device: str) -> str | None:
    """Where *device* is mounted (the first place), or None."""
    result = subprocess.run(["findmnt", "-n", "-o", "TARGET", "--source", device],
                            capture_output=True, text=True, check=False)
    lines = result.stdout.splitlines()
    return lines[0] if lines else None


def trim(mounted: str) -> int:
    """Discard the free space of the file system mounted at *mounted* (fstrim); the bytes
    the file system reported as trimmed."""
    result = subprocess.run(["fstrim", "-v", mounted], capture_output=True, text=True,
                            check=False)
    if result.returncode:
        raise StorageIOError(f"fstrim {mounted} failed ({result.returncode}): "
                             f"{(result.stderr or result.stdout).strip()[-500:]}")
    words = result.stdout.split("(")[-1].split()
    return int(words[0]) if words and words[0].isdigit() else 0


def grow(device: str, what: str = "--resize-fs", remedy: str = ONLINE_EXT4) -> str:
    """Grow the file system on *device* to the device's size, mounted (online) or not;
    return its type (errors as :func:`check_growable` words them)."""
    kind = check_growable(device, what, remedy)
    mounted = mountpoint(device)
    if kind == "xfs":  # xfs grows only while mounted
        if mounted:
            _run("xfs_growfs", mounted)
            return kind
        if in_use(device):
            raise FailedPrecondition(f"{device} is in use but not mounted here")
        with tempfile.TemporaryDirectory(prefix="appliance-grow-") as scratch:
            _run("mount", "-t", "xfs", device, scratch)
            try:
                _run("xfs_growfs", scratch)
            finally:
                _run("umount", scratch)
    elif mounted:
        _run("resize2fs", device)  # ext4 grows online
    else:
        if in_use(device):
            raise FailedPrecondition(f"{device} is in use but not mounted here")
        _run("e2fsck", "-f", "-p", device)
        _run("resize2fs", device)
    return kind

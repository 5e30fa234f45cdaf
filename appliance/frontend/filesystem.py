"""The file system on an attached volume's device: is the device in use, which file system
it holds, and growing that file system after the volume grew."""

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


def check_growable(device: str) -> str:
    kind = fs_type(device)
    if kind not in GROWABLE:
        raise InvalidArgument(f"--resize-fs: the device holds {kind or 'no file system'}; "
                              f"only {', '.join(GROWABLE)} can be grown")
    return kind


def _run(*command: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    # e2fsck: 1 means errors were corrected, which a forced check may report on success
    if result.returncode and not (command[0] == "e2fsck" and result.returncode == 1):
        raise StorageIOError(f"{' '.join(command)} failed ({result.returncode}): "
                             f"{(result.stderr or result.stdout).strip()[-500:]}")


def grow(device: str) -> str:
    """Grow the (unmounted) file system on *device* to the device's size; return its type."""
    if in_use(device):
        raise FailedPrecondition(f"{device} is in use: unmount it to grow its file system")
    kind = check_growable(device)
    if kind == "xfs":  # xfs grows only while mounted
        with tempfile.TemporaryDirectory(prefix="appliance-grow-") as mountpoint:
            _run("mount", "-t", "xfs", device, mountpoint)
            try:
                _run("xfs_growfs", mountpoint)
            finally:
                _run("umount", mountpoint)
    else:
        _run("e2fsck", "-f", "-p", device)
        _run("resize2fs", device)
    return kind

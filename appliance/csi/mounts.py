"""Mounts on the node, as the CSI Node service makes them: a file system of a volume's
device at its staging path, bind mounts of it (or of the device itself, for raw block
volumes) at a pod's target path. Every call is idempotent: it looks before it acts."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
from pathlib import Path

from appliance.errors import AlreadyExists, ApplianceError, FailedPrecondition, StorageIOError


def _unescape(field: str) -> str:
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _mountinfo() -> list[list[str]]:
    with open("/proc/self/mountinfo") as table:
        return [line.split() for line in table]


def mount_points() -> list[str]:
    """Every mount point of this mount namespace, in mount order."""
    return [_unescape(fields[4]) for fields in _mountinfo()]


def uses_of(device: str) -> set[str]:
    """Where *device* is mounted or bound: its file system's mounts and bind mounts (each
    shows the device's major:minor), and bind mounts of the device file itself (a devtmpfs
    mount whose root is the device's name)."""
    rdev = Path(device).stat().st_rdev
    number = f"{os.major(rdev)}:{os.minor(rdev)}"
    name = "/" + os.path.relpath(os.path.realpath(device), "/dev")
    found = set()
    for fields in _mountinfo():
        dash = fields.index("-")
        fs_type = fields[dash + 1]
        if fields[2] == number or (fs_type == "devtmpfs" and _unescape(fields[3]) == name):
            found.add(_unescape(fields[4]))
    return found


def mount_options(path: str) -> set[str]:
    """The per-mount options (``ro``/``rw``, ...) of the top mount at *path*."""
    real = os.path.realpath(path)
    found: set[str] = set()
    for fields in _mountinfo():
        if _unescape(fields[4]) == real:
            found = set(fields[5].split(","))  # the last one is on top
    return found


def is_mount_point(path: str) -> bool:
    return os.path.realpath(path) in mount_points()


def _run(*command: str, error: type[ApplianceError] = StorageIOError) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise error(f"{shlex.join(command)} failed: "
                    f"{(result.stderr or result.stdout).strip()[-500:]}")


def _same_device(path: str, device: str) -> bool:
    """Whether the file system mounted at *path* is on *device*."""
    return Path(path).stat().st_dev == Path(device).stat().st_rdev


def _bound_device(path: str, device: str) -> bool:
    """Whether *path* is *device* itself (a bind mount of the device file)."""
    info = Path(path).stat()
    return stat.S_ISBLK(info.st_mode) and info.st_rdev == Path(device).stat().st_rdev


def probe(device: str) -> dict[str, str]:
    """What blkid finds on *device* (``TYPE`` of a file system, ``PTTYPE`` of a partition
    table); empty only when blkid is sure it holds nothing (its status 2). Any other
    failure is an error: a device is never taken for blank because it could not be read."""
    result = subprocess.run(["blkid", "-p", "-o", "export", "-s", "TYPE", "-s", "PTTYPE",
                             device], capture_output=True, text=True, check=False)
    if result.returncode == 2:
        return {}
    if result.returncode != 0:
        raise StorageIOError(f"blkid could not tell what {device} holds (status "
                             f"{result.returncode}): {result.stderr.strip()}; nothing was "
                             "formatted")
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


def _check_done(path: str, same: bool, read_only: bool, what: str, undo: str) -> None:
    """A call repeated on a *path* already mounted succeeds when the mount is the one
    asked for (the same source, the same read-only mode); ALREADY_EXISTS otherwise."""
    if not same:
        raise AlreadyExists(f"{what} path {path} holds another mount; {undo} it first")
    if ("ro" in mount_options(path)) != read_only:
        raise AlreadyExists(f"{what} path {path} is mounted "
                            f"{'read-write' if read_only else 'read-only'}; {undo} it first")


def stage(device: str, path: str, fs_type: str, mkfs_params: str, options: list[str],
          *, read_only: bool) -> None:
    """Mount the file system on *device* at *path*, made first when the device is blank
    (never for a read-only volume: it is mounted read-only, as it is)."""
    Path(path).mkdir(parents=True, exist_ok=True)
    options = [*options, "ro"] if read_only else options
    if is_mount_point(path):
        _check_done(path, _same_device(path, device), read_only, "staging", "unstage")
        return
    found = probe(device)
    if "PTTYPE" in found and "TYPE" not in found:
        raise FailedPrecondition(f"device {device} holds a {found['PTTYPE']} partition table "
                                 "and no file system: it is not formatted (publish it as a "
                                 "block volume, or clear it)")
    if not found:
        if read_only:
            raise FailedPrecondition(f"device {device} holds no file system and the volume "
                                     "is read-only: nothing to mount")
        # a failed mkfs fails again when retried (a device too small, bad mkfsParams)
        _run(f"mkfs.{fs_type}", *shlex.split(mkfs_params), device, error=FailedPrecondition)
    elif found["TYPE"] != fs_type:
        found_type = found["TYPE"]
        raise FailedPrecondition(f"device {device} holds a {found_type} file system, not "
                                 f"{fs_type}: it is mounted as it is only when the volume "
                                 f"asks for {found_type}")
    _run("mount", "-t", fs_type, *(["-o", ",".join(options)] if options else []), device, path)


def bind(source: str, target: str, *, block_device: str | None, read_only: bool,
         options: list[str]) -> None:
    """Bind *source* (a staged file system, or a device file) at *target*."""
    if block_device is not None:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        if not Path(target).exists():
            Path(target).touch()
    else:
        Path(target).mkdir(parents=True, exist_ok=True)
    if is_mount_point(target):
        same = _bound_device(target, block_device) if block_device else \
            Path(target).stat().st_dev == Path(source).stat().st_dev
        _check_done(target, same, read_only, "target", "unpublish")
        return
    _run("mount", "--bind", source, target)
    if read_only or options:
        flags = ["remount", "bind", *options, *(["ro"] if read_only else [])]
        try:
            _run("mount", "-o", ",".join(flags), target)
        except StorageIOError:
            _run("umount", target)  # never left bound without the options asked for
            raise


def unmount(path: str, *, remove: bool) -> None:
    """Unmount whatever is mounted at *path* (stacked mounts too); remove it if asked."""
    while os.path.lexists(path) and is_mount_point(path):
        _run("umount", path)
    where = Path(path)
    if remove and os.path.lexists(path):
        if where.is_dir() and not where.is_symlink():
            where.rmdir()
        else:
            where.unlink()


def block_size(device: str) -> int:
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)

"""Who uses a block device: mounts (in every mount namespace), holders (device mapper, md,
a loop device stacked on it) and processes that hold it open.

A volume is not detached or deleted while its device is used: the file system on it would
get I/O errors and the data of a delete would go with it (docs/cli.md, "volume detach").
``release`` is what ``--force`` does first: unmount what is mounted on the device, so
that what was written through the file system reaches the volume before it goes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class Use:
    """One use of a device: ``kind`` is ``mount``, ``holder``, ``open`` or ``exclusive``."""

    kind: str
    what: str  # the mount point, the holding device, or the process
    elsewhere: str = ""  # a mount in another mount namespace: a process in it

    def __str__(self) -> str:
        text = {"mount": "mounted at {}", "holder": "held by {}", "open": "open by {}",
                "exclusive": "claimed by {}"}[self.kind].format(self.what)
        return f"{text} (in the mount namespace of {self.elsewhere})" if self.elsewhere \
            else text


def _unescape(field: str) -> str:
    """A mountinfo path field (space, tab, newline, backslash are octal escapes)."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _device_number(device: str) -> int | None:
    try:
        info = Path(device).stat()
    except FileNotFoundError:
        return None
    return info.st_rdev if stat.S_ISBLK(info.st_mode) else None


def _pids() -> list[str]:
    return [entry.name for entry in PROC.iterdir() if entry.name.isdigit()]


def _command(pid: str) -> str:
    try:
        name = (PROC / pid / "comm").read_text().strip()
    except OSError:
        name = "?"
    return f"process {pid} ({name})"


def _mounts(rdev: int) -> list[Use]:
    """Mounts of the device in every mount namespace (one mountinfo per namespace)."""
    wanted = f"{os.major(rdev)}:{os.minor(rdev)}"
    seen: set[str] = set()
    found: dict[str, Use] = {}
    own = str((PROC / "self" / "ns" / "mnt").readlink())
    for pid in ["self", *_pids()]:
        try:
            namespace = str((PROC / pid / "ns" / "mnt").readlink())
            if namespace in seen:
                continue
            seen.add(namespace)
            lines = (PROC / pid / "mountinfo").read_text().splitlines()
        except OSError:
            continue  # gone, or a kernel thread
        for line in lines:
            fields = line.split()
            if len(fields) > 4 and fields[2] == wanted:
                where = _unescape(fields[4])
                elsewhere = _command(pid) if namespace != own else ""
                found.setdefault(f"{namespace} {where}", Use("mount", where, elsewhere))
    return list(found.values())


def _holders(rdev: int) -> list[Use]:
    holders = Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/holders")
    try:
        return [Use("holder", f"/dev/{name}") for name in sorted(p.name for p in holders.iterdir())]
    except OSError:
        return []


def _openers(rdev: int) -> list[Use]:
    found = []
    me = str(os.getpid())
    for pid in _pids():
        if pid == me:
            continue
        try:
            descriptors = list((PROC / pid / "fd").iterdir())
        except OSError:
            continue
        for fd in descriptors:
            try:
                info = fd.stat()
            except OSError:
                continue
            if stat.S_ISBLK(info.st_mode) and info.st_rdev == rdev:
                found.append(Use("open", _command(pid)))
                break
    return found


def _claimed(device: str) -> bool:
    """Whether the kernel refuses an exclusive open (a file system, md or dm has it)."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        return exc.errno == errno.EBUSY
    os.close(fd)
    return False


def users(device: str) -> list[Use]:
    """Everything that uses block device *device* (empty: nothing, or no such device)."""
    rdev = _device_number(device)
    if rdev is None:
        return []
    found = _mounts(rdev) + _holders(rdev) + _openers(rdev)
    if not found and _claimed(device):
        found.append(Use("exclusive", "the kernel (an exclusive opener not found in /proc)"))
    return found


def describe(found: list[Use]) -> str:
    return "; ".join(str(use) for use in found)


def release(device: str) -> list[str]:
    """Unmount every mount of *device* in this mount namespace (the file system writes back
    what it holds); one that is busy is detached lazily (its open files then fail). Return
    what was unmounted, for the record."""
    rdev = _device_number(device)
    if rdev is None:
        return []
    done = []
    for use in _mounts(rdev):
        if use.elsewhere:
            continue  # another namespace's: not ours to unmount
        where = use.what
        plain = subprocess.run(["umount", where], capture_output=True, text=True, check=False)
        if plain.returncode:
            with contextlib.suppress(OSError):
                os.sync()
            subprocess.run(["umount", "-l", where], capture_output=True, check=False)
            done.append(f"{where} (busy: detached lazily)")
        else:
            done.append(where)
    return done

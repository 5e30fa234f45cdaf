"""Who uses a block device: mounts (in every mount namespace), holders (device mapper, md,
a loop device stacked on it) and processes that hold it open.

A volume is not detached or deleted while its device is used: the file system on it would
get I/O errors and the data of a delete would go with it (docs/cli.md, "volume detach").
``release`` is what ``--force`` does first: unmount what is mounted on the device, so
that what was written through the file system reaches the volume before it goes.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import StorageIOError

PROC = Path("/proc")
UMOUNT_TIMEOUT = 120.0  # seconds an unmount may take to write back the file system


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


def _openers(rdevs: set[int]) -> list[Use]:
    """Processes with one of the devices open. Only descriptors that name a file below
    /dev are looked at (stat of any other could hang on a dead network or FUSE mount)."""
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
                if not str(fd.readlink()).startswith("/dev/"):
                    continue
                info = fd.stat()
            except OSError:
                continue
            if stat.S_ISBLK(info.st_mode) and info.st_rdev in rdevs:
                found.append(Use("open", _command(pid)))
                break
    return found


def _partitions(device: str) -> dict[str, int]:
    """The partitions of *device* (``/dev/nbd0p1``...) by path, with their numbers."""
    name = Path(device).resolve().name
    found = {}
    for entry in sorted(Path(f"/sys/class/block/{name}").glob(f"{name}*")):
        try:
            major, minor = (entry / "dev").read_text().strip().split(":")
        except (OSError, ValueError):
            continue
        found[f"/dev/{entry.name}"] = os.makedev(int(major), int(minor))
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
    """Everything that uses block device *device* or one of its partitions (empty:
    nothing, or no such device)."""
    rdev = _device_number(device)
    if rdev is None:
        return []
    numbers = {device: rdev, **_partitions(device)}
    found: list[Use] = []
    for number in numbers.values():
        found += _mounts(number) + _holders(number)
    found += _openers(set(numbers.values()))
    if not found and any(_claimed(path) for path in numbers):
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
    mounts = [use for number in [rdev, *_partitions(device).values()]
              for use in _mounts(number)]
    for use in mounts:
        if use.elsewhere:
            continue  # another namespace's: not ours to unmount
        where = use.what
        if _umount(where):
            done.append(where)
        elif _umount(where, "-l"):
            # busy: gone from the tree; the file system is written back and released
            # when its last open file closes
            done.append(f"{where} (busy: detached lazily)")
        else:
            raise StorageIOError(f"cannot unmount {where}: it stays mounted; unmount it, "
                                 "then try again")
    return done


def _umount(where: str, *options: str) -> bool:
    try:
        result = subprocess.run(["umount", *options, where], capture_output=True, text=True,
                                check=False, timeout=UMOUNT_TIMEOUT)
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0

"""Where replicas live: the data directory and each disk to add. Each must be on a local
filesystem that keeps its data across reboots, have room, and keep sparse files sparse
(holes punched and found again, extents listed by FIEMAP), which a probe file proves."""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from appliance.chain.format import BLOCK_SIZE
from appliance.chain.layerfile import data_runs, fiemap_block_runs, punch_hole
from appliance.hostcheck.result import DEFAULT_CONFIG, Result, Settings, fail, ok, warn
from appliance.units import format_size

MOUNTINFO = Path("/proc/self/mountinfo")
GiB = 1 << 30
WARN_FREE = 10 * GiB
FAIL_FREE = 1 * GiB
PROBE_UNIT = 64 * 1024  # the probe file: data, a hole, data
TESTED = {"ext4", "xfs"}
MEMORY = ("a filesystem in memory: its data is lost at reboot, and it holds no more than RAM "
          "and swap allow")
NETWORK = ("a network filesystem: replicas belong on this node's own disks (the appliance "
           "replicates them), and holes and locks there are not dependable")
#: filesystems replicas must not be on, and why
UNFIT = {
    "tmpfs": MEMORY, "ramfs": MEMORY, "devtmpfs": MEMORY,
    "overlay": "a container's overlay filesystem: its data goes with the container",
    "aufs": "a container's union filesystem: its data goes with the container",
    "fuse": "a FUSE filesystem: another program serves it, and holes and FIEMAP depend on it",
    "fuseblk": "a FUSE filesystem: another program serves it, and holes and FIEMAP depend on it",
    "nfs": NETWORK, "nfs4": NETWORK, "cifs": NETWORK, "smb3": NETWORK, "9p": NETWORK,
    "ceph": NETWORK, "afs": NETWORK,
    "vfat": "FAT: no sparse files, no file over 4 GiB", "msdos": "FAT: no sparse files",
    "exfat": "exFAT: no sparse files",
    "squashfs": "read-only", "iso9660": "read-only", "erofs": "read-only",
}


@dataclass(frozen=True)
class Mount:
    """The mount a path is on (a line of /proc/self/mountinfo)."""

    point: str
    fstype: str
    source: str
    options: tuple[str, ...]

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (``\\040``)."""
    for code in ("040", "011", "012", "134"):
        field = field.replace("\\" + code, chr(int(code, 8)))
    return field


def mount_of(path: Path, mountinfo: Path = MOUNTINFO) -> Mount | None:
    """The mount that holds *path* (an existing path; symlinks resolved): the longest
    mount point above it, the last mounted when two share it."""
    target = os.path.realpath(path)
    best: Mount | None = None
    for line in mountinfo.read_text().splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 6:
            continue
        after = line.split(" - ", 1)[1].split()
        point = unescape(fields[4])
        inside = point in ("/", target) or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best.point)):
            best = Mount(point, after[0], unescape(after[1]) if len(after) > 1 else "",
                         tuple(fields[5].split(",")))
    return best


def existing_ancestor(path: Path) -> Path:
    """*path* itself, or its nearest parent that exists."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def unfit_reason(fstype: str) -> str:
    """Why replicas must not live on a filesystem of *fstype* ("" if they may)."""
    return UNFIT.get(fstype.split(".", 1)[0] if fstype.startswith("fuse") else fstype, "")


def filesystem_result(name: str, where: str, mount: Mount | None, remedy: str) -> Result:
    if mount is None:
        return warn(name, f"{where}: its mount is not in {MOUNTINFO}", remedy)
    on = f"{where} is on {mount.fstype} ({mount.source} at {mount.point})"
    reason = unfit_reason(mount.fstype)
    if reason:
        return fail(name, f"{on}: {reason}", remedy)
    if mount.read_only:
        return fail(name, f"{on}, mounted read-only", remedy)
    if mount.fstype not in TESTED:
        return warn(name, f"{on}: the appliance is tested on ext4 and xfs", remedy)
    return ok(name, on)


def space_result(name: str, where: str, free: int) -> Result:
    detail = f"{where}: {format_size(free)} free"
    if free < FAIL_FREE:
        return fail(name, f"{detail}, under {format_size(FAIL_FREE)}: replicas cannot grow",
                    "free space there, or choose a larger filesystem")
    if free < WARN_FREE:
        return warn(name, f"{detail}, under {format_size(WARN_FREE)}",
                    "free space there, or add a larger disk (appliance disk add PATH)")
    return ok(name, detail)


def probe_sparse(directory: Path) -> tuple[str, str]:
    """Write a probe file in *directory* (data, then a punched hole, then data), look for
    the hole with SEEK_HOLE/SEEK_DATA and the extents with FIEMAP, remove it. Returns
    (problem, note): a problem fails the check; a note warns."""
    fd, name = tempfile.mkstemp(prefix=".appliance-check-", dir=directory)
    try:
        os.pwrite(fd, b"\xa5" * 3 * PROBE_UNIT, 0)
        os.fsync(fd)
        try:
            punch_hole(fd, PROBE_UNIT, PROBE_UNIT)
        except OSError as exc:
            return f"a hole cannot be punched (fallocate: {exc.strerror})", ""
        os.fsync(fd)
        expected = [(0, PROBE_UNIT), (2 * PROBE_UNIT, 3 * PROBE_UNIT)]
        runs = list(data_runs(fd, 0, 3 * PROBE_UNIT))
        if runs != expected:
            return (f"SEEK_HOLE/SEEK_DATA do not find the punched hole (data runs {runs}, "
                    f"expected {expected})"), ""
        extents = fiemap_block_runs(fd, 3 * PROBE_UNIT)
        if extents is None:
            return "", ("FIEMAP lists no extents here: replicas fall back to SEEK_DATA, "
                        "slower to open when they hold many data runs")
        blocks = [(int(a) * BLOCK_SIZE, int(b) * BLOCK_SIZE) for a, b in zip(*extents, strict=True)]
        if blocks != expected:
            return f"FIEMAP reports extents {blocks}, SEEK_DATA {expected}", ""
        return "", ""
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            Path(name).unlink()


def sparse_result(name: str, where: str, directory: Path, remedy: str) -> Result:
    if not os.access(directory, os.W_OK):
        return fail(name, f"{where}: {directory} is not writable by this user "
                          f"(uid {os.geteuid()}), the probe file could not be made",
                    "run appliance check as root, as the node daemon runs")
    try:
        problem, note = probe_sparse(directory)
    except OSError as exc:
        return fail(name, f"{where}: the probe file failed: {exc}", remedy)
    if problem:
        return fail(name, f"{where}: {problem}. Replicas are sparse files: without holes, "
                          "thin provisioning and trim do not work", remedy)
    if note:
        return warn(name, f"{where}: holes work; {note}", remedy)
    return ok(name, f"{where}: holes punched and found (SEEK_HOLE), extents listed (FIEMAP)")


def check_location(path: Path, role: str, remedy: str) -> list[Result]:
    """The three checks of one place for replicas; *role* says what it is for."""
    where = f"{path} ({role})"
    probed = existing_ancestor(path)
    if probed != path.absolute():
        where = f"{path} ({role}, not there yet: its parent {probed} checked)"
    stat = os.statvfs(probed)
    return [filesystem_result(f"disk/filesystem {path}", where, mount_of(probed), remedy),
            space_result(f"disk/space {path}", where, stat.f_bavail * stat.f_frsize),
            sparse_result(f"disk/sparse-files {path}", where, probed, remedy)]


def check_disks(settings: Settings) -> list[Result]:
    config = settings.config_file or DEFAULT_CONFIG
    results = check_location(settings.config.data_dir, "data directory",
                             "put the data directory on a local ext4 or xfs filesystem "
                             f"(--data-dir, or data_dir in {config})")
    for disk in settings.disks:
        results += check_location(disk, "disk", "choose a directory on a local ext4 or xfs "
                                                "filesystem for the disk")
    return results

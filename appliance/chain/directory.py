"""The replica directory as a whole: checking the filesystem, locking, reading metadata."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import resource
from pathlib import Path

from appliance.chain import format as fmt
from appliance.chain.format import BLOCK_SIZE, Metadata
from appliance.chain.layerfile import punch_hole
from appliance.errors import Busy, InvalidArgument, NotFound


class NotAReplica(InvalidArgument):
    """The directory is not a replica."""


def probe_filesystem(dir_fd: int, path: Path) -> None:
    """Refuse filesystems on which the format cannot work: the layer index relies on holes
    reported exactly, at 4 KiB granularity or finer, and on punching holes."""
    name = ".probe" + fmt.TEMP_SUFFIX
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600,
                 dir_fd=dir_fd)
    try:
        os.ftruncate(fd, 3 * BLOCK_SIZE)
        os.pwrite(fd, b"\1" * BLOCK_SIZE, BLOCK_SIZE)
        data = os.lseek(fd, 0, os.SEEK_DATA)
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        punch_hole(fd, BLOCK_SIZE, BLOCK_SIZE)
        try:
            after = os.lseek(fd, 0, os.SEEK_DATA)
        except OSError as exc:
            after = -1 if exc.errno == errno.ENXIO else -2
        if (data, hole, after) != (BLOCK_SIZE, 2 * BLOCK_SIZE, -1):
            raise InvalidArgument(f"{path}: the filesystem does not report holes in 4 KiB "
                                  "blocks (SEEK_DATA/SEEK_HOLE); replicas need ext4, xfs, "
                                  "btrfs or tmpfs")
    except OSError as exc:
        raise InvalidArgument(f"{path}: the filesystem cannot hold replicas "
                              f"(sparse files and hole punching are required: "
                              f"{exc.strerror})") from exc
    finally:
        os.close(fd)
        os.unlink(name, dir_fd=dir_fd)


TMPFS_MAGIC = 0x01021994
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def filesystem_type(path: Path) -> int:
    """The ``f_type`` magic number of the filesystem holding *path* (statfs(2))."""
    buffer = ctypes.create_string_buffer(256)  # struct statfs; f_type is its first word
    if _libc.statfs(os.fsencode(path), buffer) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(path))
    return ctypes.c_long.from_buffer(buffer).value


def ensure_fd_budget(layers: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = layers + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(want, soft), hard), hard))


def lock_directory(path: Path, *, exclusive: bool) -> int:
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(dir_fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(dir_fd)
        raise Busy(f"replica {path} is in use by another process") from None
    return dir_fd


def open_directory(path: Path, *, exclusive: bool) -> int:
    """Open and lock a replica directory: exclusively for a writer, shared for readers."""
    if not path.exists():
        raise NotFound(f"replica directory {path} does not exist")
    if not path.is_dir():
        raise NotAReplica(f"{path} is not a directory")
    return lock_directory(path, exclusive=exclusive)


def read_metadata(dir_fd: int, path: Path) -> Metadata:
    try:
        fd = os.open(fmt.METADATA_FILE, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        raise NotAReplica(f"{path} is not a replica (it has no {fmt.METADATA_FILE})") from None
    with os.fdopen(fd, "rb") as file:
        return fmt.decode(file.read(), f"{path / fmt.METADATA_FILE}")

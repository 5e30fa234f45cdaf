"""Copying raw images into and out of a replica, sparsely."""

from __future__ import annotations

import errno
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from appliance.chain.durable import write_all
from appliance.chain.layerfile import data_runs
from appliance.chain.reader import SnapshotReader
from appliance.chain.replica import Replica
from appliance.errors import AlreadyExists, InvalidArgument, NotFound, from_os_error

COPY_CHUNK = 1 << 20
Progress = Callable[[int], None]


def _is_zero(chunk: memoryview) -> bool:
    return chunk.nbytes == 0 or (chunk[0] == 0 and chunk == bytes(chunk.nbytes))


def _input_size(fd: int, path: Path) -> int:
    info = os.fstat(fd)
    if stat.S_ISREG(info.st_mode):
        return info.st_size
    if stat.S_ISBLK(info.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    raise InvalidArgument(f"{path} is not a regular file or a block device")


def _input_runs(fd: int, size: int) -> list[tuple[int, int]]:
    try:
        return list(data_runs(fd, 0, size))
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENXIO, errno.EOPNOTSUPP):
            return [(0, size)]  # no hole information: treat everything as data
        raise


def import_image(replica: Replica, source: str | Path, offset: int = 0,
                 progress: Progress | None = None) -> int:
    """Write the file *source* into the head at *offset* so that the head then reads back
    exactly its bytes there; holes and zero blocks become zeros without using space.
    Return the number of bytes imported. Nothing is written if the input does not fit."""
    path = Path(source)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"input {path} does not exist") from None
    except OSError as exc:
        raise from_os_error(exc, f"open {path}") from exc
    try:
        size = _input_size(fd, path)
        if offset < 0 or offset + size > replica.size:
            raise InvalidArgument(f"input {path} ({size} bytes) at offset {offset} does not "
                                  f"fit in the replica of {replica.size} bytes")
        buffer = bytearray(COPY_CHUNK)
        position = 0
        for start, end in _input_runs(fd, size):
            if start > position:
                replica.write_zeroes(offset + position, start - position)
            for chunk_start in range(start, end, COPY_CHUNK):
                length = min(COPY_CHUNK, end - chunk_start)
                chunk = memoryview(buffer)[:length]
                if os.preadv(fd, [chunk], chunk_start) != length:
                    raise InvalidArgument(f"input {path} changed size while it was read")
                if _is_zero(chunk):
                    replica.write_zeroes(offset + chunk_start, length)
                else:
                    replica.write(chunk, offset + chunk_start)
                if progress:
                    progress(length)
            position = end
        if size > position:
            replica.write_zeroes(offset + position, size - position)
        replica.flush()
        return size
    finally:
        os.close(fd)


def export_image(replica: Replica, destination: str | Path, *, snapshot: str | None = None,
                 force: bool = False, progress: Progress | None = None) -> int:
    """Write the head (or *snapshot*) as a raw image to *destination*: a new sparse file,
    created under a temporary name and renamed when complete, or ``-`` for standard output.
    Return the image size."""
    reader = replica.open_snapshot(snapshot) if snapshot else None
    size = reader.size if reader else replica.size
    if str(destination) == "-":
        _stream(replica, reader, sys.stdout.buffer, progress)
        return size
    path = Path(destination)
    if path.exists() and not force:
        raise AlreadyExists(f"output {path} exists (use --force to replace it)")
    if not path.parent.is_dir():
        raise NotFound(f"the directory of output {path} does not exist")
    temp = path.with_name(f".{path.name}.partial")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise from_os_error(exc, f"create {temp}") from exc
    try:
        os.ftruncate(fd, size)
        buffer = bytearray(COPY_CHUNK)
        for start, length in _allocated(replica, reader):
            for chunk_start in range(start, start + length, COPY_CHUNK):
                chunk = memoryview(buffer)[: min(COPY_CHUNK, start + length - chunk_start)]
                _read(replica, reader, chunk, chunk_start)
                if not _is_zero(chunk):
                    write_all(fd, chunk, chunk_start)
                if progress:
                    progress(len(chunk))
        os.fsync(fd)
        os.close(fd)
        fd = -1
        temp.replace(path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    return size


def _allocated(replica: Replica, reader: SnapshotReader | None) -> list[tuple[int, int]]:
    extents = reader.extents() if reader else replica.extents()
    return [(x.offset, x.length) for x in extents if x.allocated]


def _read(replica: Replica, reader: SnapshotReader | None, chunk: memoryview,
          offset: int) -> None:
    if reader:
        reader.readinto(chunk, offset)
    else:
        replica.readinto(chunk, offset)


def _stream(replica: Replica, reader: SnapshotReader | None, out: BinaryIO,
            progress: Progress | None) -> None:
    size = reader.size if reader else replica.size
    buffer = bytearray(COPY_CHUNK)
    for start in range(0, size, COPY_CHUNK):
        chunk = memoryview(buffer)[: min(COPY_CHUNK, size - start)]
        _read(replica, reader, chunk, start)
        out.write(chunk)
        if progress:
            progress(len(chunk))
    out.flush()

"""One layer's sparse file: its data runs and hole punching.

Which blocks a layer holds is defined by ``SEEK_DATA``/``SEEK_HOLE``. Listing a whole layer
that way costs two system calls per run, which dominates opening a replica whose layers
hold hundreds of thousands of runs; :func:`block_run_arrays` therefore asks ``FIEMAP`` for
thousands of extents per call, and falls back to seeking where ``FIEMAP`` is missing
(tmpfs) or could disagree with it (unwritten or inline extents).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import struct
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from appliance.chain.format import BLOCK_SIZE

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate ``[offset, offset+length)`` of *fd*; the range then reads as zeros."""
    if length <= 0:
        return
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def reserve(fd: int, offset: int, length: int) -> None:
    """Allocate ``[offset, offset+length)`` of *fd* now, so that writing it later cannot run
    out of space (the range still reads as before: allocation alone writes nothing)."""
    if length > 0 and _fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def data_runs(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Yield ``(offset, end)`` of every run of allocated data of *fd* within ``[start, end)``."""
    position = start
    while position < end:
        try:
            data = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data at or after position
                return
            raise
        if data >= end:
            return
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        yield data, min(hole, end)
        position = hole


def block_runs(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Like :func:`data_runs` but in block numbers, ``[first, last + 1)``."""
    for data, data_end in data_runs(fd, start, end):
        yield data // BLOCK_SIZE, -(-data_end // BLOCK_SIZE)


_FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_HEADER = struct.Struct("=QQIIII")  # start, length, flags, mapped, count, reserved
_FIEMAP_EXTENT = np.dtype([("logical", "<u8"), ("physical", "<u8"), ("length", "<u8"),
                           ("reserved64", "<u8", 2), ("flags", "<u4"), ("reserved", "<u4", 3)])
_FIEMAP_EXTENT_LAST = 0x1
#: extents whose content SEEK_DATA may report differently: fall back to seeking
_FIEMAP_DOUBTFUL = 0x100 | 0x200 | 0x400 | 0x800  # not aligned, inline, tail, unwritten
#: extents asked for per FIEMAP call (tests lower it to cross batch boundaries)
FIEMAP_BATCH = 4096
Runs = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]


def fiemap_block_runs(fd: int, end: int) -> Runs | None:
    """Block runs ``(firsts, lasts)`` of ``[0, end)`` from FIEMAP, or None where FIEMAP is
    missing or doubtful; :func:`block_run_arrays` then falls back to seeking."""
    buffer = bytearray(_FIEMAP_HEADER.size + FIEMAP_BATCH * _FIEMAP_EXTENT.itemsize)
    firsts: list[npt.NDArray[np.int64]] = []
    lasts: list[npt.NDArray[np.int64]] = []
    position = 0
    while position < end:
        _FIEMAP_HEADER.pack_into(buffer, 0, position, end - position, 0, 0, FIEMAP_BATCH, 0)
        try:
            fcntl.ioctl(fd, _FS_IOC_FIEMAP, buffer, True)
        except OSError:
            return None
        mapped = _FIEMAP_HEADER.unpack_from(buffer)[3]
        if not mapped:
            break
        extents = np.frombuffer(buffer, _FIEMAP_EXTENT, mapped, _FIEMAP_HEADER.size)
        if (extents["flags"] & _FIEMAP_DOUBTFUL).any():
            return None
        logical = extents["logical"].astype(np.int64)
        stop = logical + extents["length"].astype(np.int64)
        firsts.append(logical // BLOCK_SIZE)
        lasts.append(-(-np.minimum(stop, end) // BLOCK_SIZE))
        if extents["flags"][-1] & _FIEMAP_EXTENT_LAST:
            break
        position = int(stop[-1])
    if not firsts:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    first, last = np.concatenate(firsts), np.concatenate(lasts)
    keep = last > first
    return first[keep], last[keep]


def block_run_arrays(fd: int, end: int) -> Runs:
    """Every run of allocated blocks of ``[0, end)`` as arrays ``(firsts, lasts)``."""
    runs = fiemap_block_runs(fd, end)
    if runs is not None:
        return runs
    pairs = list(block_runs(fd, 0, end))
    return (np.fromiter((a for a, _ in pairs), np.int64, len(pairs)),
            np.fromiter((b for _, b in pairs), np.int64, len(pairs)))


class LayerFile:
    """An open layer file. ``size`` is the layer's logical size from the metadata."""

    __slots__ = ("fd", "id", "size")

    def __init__(self, layer_id: int, fd: int, size: int) -> None:
        self.id = layer_id
        self.fd = fd
        self.size = size

    def block_runs(self, first: int = 0, last: int | None = None) -> Iterator[tuple[int, int]]:
        """Runs of allocated blocks within blocks ``[first, last)``, clipped to the layer."""
        end = self.size if last is None else min(last * BLOCK_SIZE, self.size)
        return block_runs(self.fd, first * BLOCK_SIZE, end)

    def block_run_arrays(self) -> Runs:
        """All runs of allocated blocks of the layer, as arrays (for building an index)."""
        return block_run_arrays(self.fd, self.size)

    def allocated_bytes(self) -> int:
        return sum(end - start for start, end in self.block_runs()) * BLOCK_SIZE

    def punch_blocks(self, first: int, last: int) -> None:
        end = min(last * BLOCK_SIZE, self.size)
        punch_hole(self.fd, first * BLOCK_SIZE, end - first * BLOCK_SIZE)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

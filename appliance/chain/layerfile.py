"""One layer's sparse file: its data runs (``SEEK_DATA``/``SEEK_HOLE``) and hole punching."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterator

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

    def allocated_bytes(self) -> int:
        return sum(end - start for start, end in self.block_runs()) * BLOCK_SIZE

    def punch_blocks(self, first: int, last: int) -> None:
        end = min(last * BLOCK_SIZE, self.size)
        punch_hole(self.fd, first * BLOCK_SIZE, end - first * BLOCK_SIZE)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

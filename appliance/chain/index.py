"""The block index of a chain: which layer holds each 4 KiB block.

A :class:`ChainView` is the list of a chain's layer files from the root (position 1) to its
top (the head, or a snapshot being read) and a numpy array with one entry per block: the
position of the topmost layer that holds the block, or 0 when no layer does (the block reads
as zeros). Entries are one byte while the chain has at most 255 layers and two bytes beyond.

The array is allocated zeroed (``calloc``): pages of it that cover never-written parts of
the volume stay unmapped, so the index costs memory in proportion to the written data.
Whole-array passes therefore skip all-zero chunks instead of touching them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from appliance.chain.format import BLOCK_SIZE
from appliance.chain.layerfile import LayerFile
from appliance.errors import Corruption

Index = npt.NDArray[np.unsignedinteger]
_CHUNK = 1 << 20  # index entries per step of a whole-array pass
_ZEROS = memoryview(bytes(1 << 20))


def dtype_for(layers: int) -> type[np.unsignedinteger]:
    return np.uint8 if layers <= 0xFF else np.uint16


def fill_zeros(buf: memoryview) -> None:
    for start in range(0, len(buf), len(_ZEROS)):
        part = buf[start: start + len(_ZEROS)]
        part[:] = _ZEROS[: len(part)]


def copy_sparse(dst: Index, src: Index) -> None:
    """``dst[:len(src)] = src``, leaving the pages of all-zero stretches untouched."""
    for start in range(0, len(src), _CHUNK):
        chunk = src[start: start + _CHUNK]
        if chunk.any():
            dst[start: start + len(chunk)] = chunk


_SHORT_RUN = 64  # blocks; shorter runs are filled by one vectorized assignment


def fill_runs(index: Index, firsts: npt.NDArray[np.int64], lasts: npt.NDArray[np.int64],
              position: int) -> None:
    """``index[first:last] = position`` for every run. Long runs are few (they cover the
    volume) and assigned one by one; the many short ones at once, by fancy indexing."""
    lengths = lasts - firsts
    short = lengths <= _SHORT_RUN
    starts, counts = firsts[short], lengths[short]
    if len(starts):
        total = int(counts.sum())
        base = np.repeat(starts - (np.cumsum(counts) - counts), counts)
        index[base + np.arange(total)] = position
    for first, last in zip(firsts[~short].tolist(), lasts[~short].tolist(), strict=True):
        index[first:last] = position


class ChainView:
    def __init__(self, files: list[LayerFile], size: int, index: Index) -> None:
        self.files = files
        self.size = size
        self.index = index

    @classmethod
    def build(cls, files: list[LayerFile], size: int) -> ChainView:
        """Scan every layer's data runs, root first, so upper layers win."""
        index = np.zeros(size // BLOCK_SIZE, dtype_for(len(files)))
        for position, layer in enumerate(files, 1):
            fill_runs(index, *layer.block_run_arrays(), position)
        return cls(files, size, index)

    # -- structure changes (callers hold the replica's exclusive lock) ---------------------

    def push(self, layer: LayerFile) -> None:
        """Add a new, empty top layer."""
        self.files.append(layer)
        if dtype_for(len(self.files)) != self.index.dtype:
            self.index = self._converted(len(self.index), dtype_for(len(self.files)))

    def grow(self, size: int) -> None:
        self.index = self._converted(size // BLOCK_SIZE, self.index.dtype.type)
        self.size = size

    def _converted(self, blocks: int, dtype: type[np.unsignedinteger]) -> Index:
        index = np.zeros(blocks, dtype)
        copy_sparse(index, self.index)
        return index

    def remap(self, mapping: Index) -> None:
        """Replace every position *p* in the index with ``mapping[p]`` (``mapping[0] == 0``)."""
        index = self.index
        for start in range(0, len(index), _CHUNK):
            chunk = index[start: start + _CHUNK]
            if chunk.any():
                chunk[:] = mapping[chunk]

    # -- reads ------------------------------------------------------------------------------

    def runs(self, first: int, last: int) -> Iterator[tuple[int, int, int]]:
        """Yield ``(start, end, position)`` for the maximal runs of blocks ``[first, last)``
        held by the same layer."""
        segment = self.index[first:last]
        cuts = (np.flatnonzero(segment[1:] != segment[:-1]) + 1).tolist()
        start = 0
        for cut in [*cuts, last - first]:
            yield first + start, first + cut, int(segment[start])
            start = cut

    def readinto(self, buf: memoryview, offset: int) -> None:
        """Fill *buf* with the chain's bytes at *offset* (bounds checked by the caller)."""
        end = offset + len(buf)
        first = offset // BLOCK_SIZE
        last = -(-end // BLOCK_SIZE)
        if last - first == 1:
            self._read_part(int(self.index[first]), buf, offset)
            return
        packed = self.index[first:last].tobytes()
        width = self.index.itemsize
        if packed == packed[:width] * (last - first):  # one layer holds it all: one read
            self._read_part(int(self.index[first]), buf, offset)
            return
        for start, stop, position in self.runs(first, last):
            part_start = max(offset, start * BLOCK_SIZE)
            part_end = min(end, stop * BLOCK_SIZE)
            self._read_part(position, buf[part_start - offset: part_end - offset], part_start)

    def _read_part(self, position: int, part: memoryview, offset: int) -> None:
        if position == 0:
            fill_zeros(part)
            return
        if os.preadv(self.files[position - 1].fd, [part], offset) != len(part):
            self.short_read(position, offset)

    def short_read(self, position: int, offset: int) -> None:
        layer = self.files[position - 1]
        raise Corruption(f"layer {layer.id}: short read at offset {offset}: the layer file is "
                         "shorter than the index says")

    def resolve(self, first: int, last: int, top: int) -> Index:
        """Scan the layers at positions ``top..1`` for blocks ``[first, last)``: the position
        of the topmost one holding each block, or 0."""
        result = np.zeros(last - first, self.index.dtype)
        for position in range(top, 0, -1):
            for start, stop in self.files[position - 1].block_runs(first, last):
                segment = result[start - first: stop - first]
                segment[segment == 0] = position
        return result

    def extents(self, first: int, last: int) -> Iterator[tuple[int, int, bool]]:
        """Yield ``(start, end, allocated)`` block runs; unallocated blocks read as zeros."""
        if first >= last:
            return
        allocated = self.index[first:last] != 0
        cuts = (np.flatnonzero(allocated[1:] != allocated[:-1]) + 1).tolist()
        start = 0
        for cut in [*cuts, last - first]:
            yield first + start, first + cut, bool(allocated[start])
            start = cut

"""A snapshot as a backup reads it: its content composed from its chain of layers, which
parts hold data, and which parts changed since an older snapshot. Works on any layer
source (a replica directory, or a replica server through a reader connection)."""

from __future__ import annotations

from typing import Any

import numpy as np

from appliance.chain.format import BLOCK_SIZE
from appliance.chain.source import LayerSource, ancestry


class SnapshotImage:
    def __init__(self, source: LayerSource, snapshot: str) -> None:
        self.source = source
        self.snapshot = snapshot
        layers = source.layers()
        self.chain = ancestry(layers, snapshot)
        self.layer: dict[str, Any] = self.chain[-1]
        self.size: int = int(self.layer["size"])
        self.created: str | None = self.layer.get("created")
        self._blocks = -(-self.size // BLOCK_SIZE)
        # which layer of the chain holds each 4 KiB block (-1: none, reads as zeros)
        self._owner = np.full(self._blocks, -1, dtype=np.int32)
        self._runs: dict[str, list[tuple[int, int]]] = {}
        for index, layer in enumerate(self.chain):
            runs = source.layer_extents(layer["name"])
            self._runs[layer["name"]] = runs
            for first, end in runs:
                self._owner[first:min(end, self._blocks)] = index
        self._all_layers = {x["name"]: x for x in layers if not x["head"]}

    def has_data(self, offset: int, length: int) -> bool:
        first, end = offset // BLOCK_SIZE, -(-(offset + length) // BLOCK_SIZE)
        return bool((self._owner[first:end] >= 0).any())

    def read(self, buf: memoryview, offset: int) -> None:
        """Fill *buf* with the snapshot's bytes at *offset* (both 4 KiB aligned)."""
        first = offset // BLOCK_SIZE
        owners = self._owner[first:first + len(buf) // BLOCK_SIZE]
        if not len(owners):
            return
        edges = np.flatnonzero(np.diff(owners)) + 1
        starts = [0, *edges.tolist()]
        ends = [*edges.tolist(), len(owners)]
        for start, end in zip(starts, ends, strict=True):
            piece = buf[start * BLOCK_SIZE:end * BLOCK_SIZE]
            owner = int(owners[start])
            if owner < 0:
                piece[:] = bytes(len(piece))
            else:
                self.source.read_layer(self.chain[owner]["name"], piece,
                                       (first + start) * BLOCK_SIZE)

    def changed_since(self, base: str) -> np.ndarray[Any, np.dtype[np.bool_]] | None:
        """A mask of the 4 KiB blocks that may differ from snapshot *base* (never missing
        a difference), or None when *base* is not an ancestor one can compare with."""
        if base not in self._all_layers or self._all_layers[base]["removed"]:
            return None
        base_chain = {x["name"] for x in ancestry(list(self._all_layers.values()), base)}
        mask = np.zeros(self._blocks, dtype=bool)
        for layer in self.chain:
            if layer["name"] in base_chain:
                continue
            for first, end in self._runs[layer["name"]]:
                mask[first:min(end, self._blocks)] = True
        for name in base_chain - {x["name"] for x in self.chain}:
            # a layer of the base that this snapshot does not contain (another branch)
            for first, end in self.source.layer_extents(name):
                mask[first:min(end, self._blocks)] = True
        return mask

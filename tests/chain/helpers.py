"""Helpers for replica tests: deterministic data and whole-replica views."""

from __future__ import annotations

import hashlib
import random

from appliance.chain import Replica

BS = 4096


def pattern(seed: int, length: int) -> bytes:
    """Deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(length)


def head_bytes(replica: Replica) -> bytes:
    return replica.read(0, replica.size)


def snapshot_bytes(replica: Replica, name: str) -> bytes:
    with replica.open_snapshot(name) as reader:
        return reader.read(0, reader.size)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def visible_state(replica: Replica) -> dict[str, object]:
    """What a user can observe: sizes, the head, every kept snapshot and its nearest kept
    ancestor. Removed snapshots are not observable (only their effect on others is)."""
    layers = {x.name: x for x in replica.layers()}

    def kept_parent(name: str | None) -> str | None:
        while name is not None and layers[name].removed:
            name = layers[name].parent
        return name

    snapshots = {
        name: (digest(snapshot_bytes(replica, name)), kept_parent(info.parent), info.size,
               dict(info.labels))
        for name, info in layers.items() if name is not None and not info.removed}
    return {"size": replica.size, "head": digest(head_bytes(replica)),
            "head_parent": kept_parent(layers[None].parent), "snapshots": snapshots}

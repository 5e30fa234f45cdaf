"""Purge: reclaim the space of removed snapshots without changing what any kept layer reads.

For each removed layer ``P`` (never the head), by its children:

* **none**: nothing reads ``P``; it is deleted.
* **one snapshot** ``C``: ``P`` and ``C`` are *coalesced* into one layer standing for
  ``C``. The cheaper direction is chosen: ``P``'s blocks that ``C`` lacks are copied into
  ``C``'s file, or ``C``'s blocks are copied over ``P``'s file which then takes ``C``'s place.
  Either way ``C`` and everything above it read the same bytes throughout, so the copy needs
  no lock against readers; it is recorded in the metadata first (``pending``) and redone
  after a crash, which is safe because the copy is idempotent.
* **the head**: ``P`` is *pruned*: the blocks the head has overwritten are punched out of
  ``P``. If nothing is left, ``P`` is dropped from the chain.
* **two or more**: every child needs ``P``'s data; it stays until the others go.

Copies and punches run in steps of :data:`STEP_BLOCKS` blocks, each under a range lock, so
foreground I/O waits for one step at most; only the final metadata switch is exclusive.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from appliance.chain import format as fmt
from appliance.chain.durable import crashpoint, unlink_durably, write_all
from appliance.chain.format import BLOCK_SIZE, Layer, PendingCoalesce
from appliance.chain.layerfile import LayerFile
from appliance.errors import Corruption, from_os_error

if TYPE_CHECKING:
    from appliance.chain.replica import Replica

STEP_BLOCKS = 1024  # 4 MiB


def purge(replica: Replica) -> dict[str, int]:
    """Run every possible purge step; return counts of what was done."""
    stats = {"deleted": 0, "coalesced": 0, "pruned": 0, "copied_bytes": 0, "punched_bytes": 0}
    with replica._maintenance:
        if replica.meta.pending is not None:
            stats["copied_bytes"] += _coalesce(replica, replica.meta.pending)
            stats["coalesced"] += 1
        pruned: set[int] = set()
        while (step := _next_step(replica, pruned)) is not None:
            kind, layer = step
            if kind == "delete":
                _delete(replica, layer)
                stats["deleted"] += 1
            elif kind == "prune":
                pruned.add(layer.id)
                stats["punched_bytes"] += _prune(replica, layer)
                stats["pruned"] += 1
            else:
                child = replica.meta.children(layer.id)[0]
                stats["copied_bytes"] += _start_coalesce(replica, layer, child)
                stats["coalesced"] += 1
    return stats


def resume_pending(replica: Replica) -> None:
    """Finish a coalesce a crash interrupted (called while a writable replica opens)."""
    assert replica.meta.pending is not None
    _coalesce(replica, replica.meta.pending, opening=True)


def _next_step(replica: Replica, pruned: set[int]) -> tuple[str, Layer] | None:
    meta = replica.meta
    for layer in sorted(meta.layers.values(), key=lambda x: x.id):
        if not layer.removed:
            continue
        children = meta.children(layer.id)
        if not children:
            return "delete", layer
        if len(children) == 1 and children[0].id == meta.head:
            if layer.id not in pruned:
                return "prune", layer
        elif len(children) == 1:
            return "coalesce", layer
    return None


def _delete(replica: Replica, layer: Layer) -> None:
    with replica._access.exclusive():
        replica._commit(replica.meta.with_layers(drop=(layer.id,)))
        crashpoint("purge:delete-committed")
        _forget(replica, layer.id)


def _forget(replica: Replica, layer_id: int) -> None:
    """Close and delete a layer that the committed metadata no longer lists."""
    replica._close_layer(layer_id)
    unlink_durably(replica._dir_fd, fmt.layer_file_name(layer_id),
                   fmt.checksum_file_name(layer_id))
    crashpoint("purge:files-deleted")


def _prune(replica: Replica, layer: Layer) -> int:
    """Punch from removed *layer* the blocks its child (the head) holds; drop it if empty."""
    punched = 0
    target = replica._files[layer.id]
    for first in range(0, layer.size // BLOCK_SIZE, STEP_BLOCKS):
        last = min(first + STEP_BLOCKS, layer.size // BLOCK_SIZE)
        with replica._access.range(first, last):
            children = replica.meta.children(layer.id)
            if len(children) != 1:
                break  # the chain changed (a revert); the next purge looks again
            child = replica._files[children[0].id]
            for start, stop in _covered(target, child, first, last):
                try:
                    target.punch_blocks(start, stop)
                except OSError as exc:
                    raise from_os_error(exc, f"purge of replica {replica.path}") from exc
                punched += (stop - start) * BLOCK_SIZE
            replica._dirty.add(layer.id)
        crashpoint("purge:prune-step")
    if next(target.block_runs(), None) is None:
        _drop_empty(replica, layer.id)
    return punched


def _covered(lower: LayerFile, upper: LayerFile, first: int, last: int) -> list[tuple[int, int]]:
    """Block runs within ``[first, last)`` where both layers hold data."""
    upper_runs = list(upper.block_runs(first, last))
    result = []
    for a, b in lower.block_runs(first, last):
        for c, d in upper_runs:
            start, stop = max(a, c), min(b, d)
            if start < stop:
                result.append((start, stop))
    return result


def _drop_empty(replica: Replica, layer_id: int) -> None:
    with replica._access.exclusive():
        meta = replica.meta
        layer = meta.layers.get(layer_id)
        children = meta.children(layer_id)
        if layer is None or not layer.removed or len(children) != 1:
            return
        if next(replica._files[layer_id].block_runs(), None) is not None:
            return
        child = replace(children[0], parent=layer.parent)
        replica._commit(meta.with_layers(child, drop=(layer_id,)))
        crashpoint("purge:drop-committed")
        _switch_view(replica, layer_id, keep=child.id)
        _forget(replica, layer_id)


def _start_coalesce(replica: Replica, parent: Layer, child: Layer) -> int:
    parent_bytes = replica._files[parent.id].allocated_bytes()
    child_bytes = replica._files[child.id].allocated_bytes()
    into = parent.id if child_bytes < parent_bytes else child.id
    pending = PendingCoalesce(parent=parent.id, child=child.id, into=into)
    with replica._access.exclusive():
        meta = replica.meta
        changed = [replace(meta.layers[child.id], checksum=None)] if into == child.id else []
        replica._commit(meta.with_layers(*changed, pending=pending))
    crashpoint("purge:coalesce-started")
    if into == child.id:
        unlink_durably(replica._dir_fd, fmt.checksum_file_name(child.id))
    return _coalesce(replica, pending)


def _coalesce(replica: Replica, pending: PendingCoalesce, *, opening: bool = False) -> int:
    files = replica._files
    meta = replica.meta
    parent, child = files[pending.parent], files[pending.child]
    into_parent = pending.into == pending.parent
    child_size = meta.layers[pending.child].size
    if into_parent and os.fstat(parent.fd).st_size < child_size:
        os.ftruncate(parent.fd, child_size)
    copied = 0
    source, target = (child, parent) if into_parent else (parent, child)
    for first in range(0, -(-source.size // BLOCK_SIZE), STEP_BLOCKS):
        last = first + STEP_BLOCKS
        if opening:
            copied += _copy_step(source, target, first, last, only_holes=not into_parent)
        else:
            with replica._access.range(first, last):
                copied += _copy_step(source, target, first, last, only_holes=not into_parent)
        crashpoint("purge:coalesce-step")
    try:
        os.fdatasync(target.fd)
    except OSError as exc:
        raise from_os_error(exc, f"purge of replica {replica.path}") from exc
    _finish_coalesce(replica, pending, opening=opening)
    return copied


def _copy_step(source: LayerFile, target: LayerFile, first: int, last: int, *,
               only_holes: bool) -> int:
    runs = list(source.block_runs(first, last))
    if only_holes:
        runs = _subtract(runs, list(target.block_runs(first, last)))
    copied = 0
    for start, stop in runs:
        length = (stop - start) * BLOCK_SIZE
        data = os.pread(source.fd, length, start * BLOCK_SIZE)
        if len(data) != length:
            raise Corruption(f"layer {source.id}: short read at block {start}")
        write_all(target.fd, data, start * BLOCK_SIZE)
        copied += length
    return copied


Runs = list[tuple[int, int]]


def _subtract(runs: Runs, covered: Runs) -> Runs:
    """The parts of *runs* not covered by *covered* (both sorted, non-overlapping)."""
    result = []
    for start, stop in runs:
        position = start
        for a, b in covered:
            if b <= position or a >= stop:
                continue
            if a > position:
                result.append((position, a))
            position = max(position, b)
        if position < stop:
            result.append((position, stop))
    return result


def _finish_coalesce(replica: Replica, pending: PendingCoalesce, *, opening: bool) -> None:
    def commit() -> int:
        meta = replica.meta
        parent, child = meta.layers[pending.parent], meta.layers[pending.child]
        merged = replace(child, parent=parent.parent, checksum=None)
        changed: list[Layer] = []
        if pending.into == parent.id:
            # The parent's file holds the merged layer: it takes the child's place.
            merged = replace(merged, id=parent.id)
            changed = [replace(x, parent=parent.id) for x in meta.children(child.id)]
            dropped = child.id
        else:
            dropped = parent.id
        replica._commit(meta.with_layers(merged, *changed, drop=(dropped,),
                                         pending=None))
        crashpoint("purge:coalesce-committed")
        replica._files[merged.id].size = merged.size
        return dropped

    if opening:  # no view exists yet; the replica builds it after this
        dropped = commit()
        replica._close_layer(dropped)
        unlink_durably(replica._dir_fd, fmt.layer_file_name(dropped),
                       fmt.checksum_file_name(dropped))
        return
    with replica._access.exclusive():
        dropped = commit()
        _switch_view(replica, dropped, keep=pending.into)
        _forget(replica, dropped)


def _switch_view(replica: Replica, dropped: int, keep: int) -> None:
    """Update the head's view after layer *dropped* merged into its neighbour *keep*
    (or, being empty, left the chain): positions above the pair move down by one."""
    view = replica._view
    positions = {layer.id: n for n, layer in enumerate(view.files, 1)}
    if dropped not in positions:
        return
    low = min(positions[dropped], positions.get(keep, positions[dropped]))
    mapping = np.arange(len(view.files) + 1, dtype=view.index.dtype)
    mapping[low + 1:] -= 1
    view.remap(mapping)
    files = [x for x in view.files if x.id != dropped]
    files[low - 1] = replica._files[keep]
    view.files[:] = files

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

from appliance.chain import format as fmt
from appliance.chain.durable import crashpoint, unlink_durably, write_all
from appliance.chain.format import BLOCK_SIZE, Layer, PendingCoalesce
from appliance.chain.layerfile import LayerFile
from appliance.chain.openchain import OpenChain
from appliance.errors import Corruption, from_os_error

STEP_BLOCKS = 1024  # 4 MiB


def purge(chain: OpenChain) -> dict[str, int]:
    """Run every possible purge step; return counts of what was done."""
    stats = {"deleted": 0, "coalesced": 0, "pruned": 0, "copied_bytes": 0, "punched_bytes": 0}
    with chain.maintenance:
        if chain.meta.pending is not None:
            stats["copied_bytes"] += _coalesce(chain, chain.meta.pending)
            stats["coalesced"] += 1
        pruned: set[int] = set()
        while (step := _next_step(chain, pruned)) is not None:
            kind, layer = step
            if kind == "delete":
                _delete(chain, layer)
                stats["deleted"] += 1
            elif kind == "prune":
                pruned.add(layer.id)
                stats["punched_bytes"] += _prune(chain, layer)
                stats["pruned"] += 1
            else:
                child = chain.meta.children(layer.id)[0]
                stats["copied_bytes"] += _start_coalesce(chain, layer, child)
                stats["coalesced"] += 1
    return stats


def resume_pending(chain: OpenChain) -> None:
    """Finish a coalesce a crash interrupted (called while a writable replica opens)."""
    assert chain.meta.pending is not None
    _coalesce(chain, chain.meta.pending, opening=True)


def _next_step(chain: OpenChain, pruned: set[int]) -> tuple[str, Layer] | None:
    meta = chain.meta
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


def _delete(chain: OpenChain, layer: Layer) -> None:
    with chain.access.exclusive():
        chain.commit(chain.meta.with_layers(drop=(layer.id,)))
        crashpoint("purge:delete-committed")
        _forget(chain, layer.id)


def _forget(chain: OpenChain, layer_id: int) -> None:
    """Close and delete a layer that the committed metadata no longer lists."""
    chain.close_layer(layer_id)
    unlink_durably(chain.dir_fd, fmt.layer_file_name(layer_id),
                   fmt.checksum_file_name(layer_id))
    crashpoint("purge:files-deleted")


def _prune(chain: OpenChain, layer: Layer) -> int:
    """Punch from removed *layer* the blocks its child (the head) holds; drop it if empty."""
    punched = 0
    target = chain.files[layer.id]
    for first in range(0, layer.size // BLOCK_SIZE, STEP_BLOCKS):
        last = min(first + STEP_BLOCKS, layer.size // BLOCK_SIZE)
        with chain.access.range(first, last):
            children = chain.meta.children(layer.id)
            if len(children) != 1:
                break  # the chain changed (a revert); the next purge looks again
            child = chain.files[children[0].id]
            for start, stop in _covered(target, child, first, last):
                try:
                    target.punch_blocks(start, stop)
                except OSError as exc:
                    raise from_os_error(exc, f"purge of replica {chain.path}") from exc
                punched += (stop - start) * BLOCK_SIZE
            chain.mark_dirty((layer.id,))
        crashpoint("purge:prune-step")
    if next(target.block_runs(), None) is None:
        _drop_empty(chain, layer.id)
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


def _drop_empty(chain: OpenChain, layer_id: int) -> None:
    with chain.access.exclusive():
        meta = chain.meta
        layer = meta.layers.get(layer_id)
        children = meta.children(layer_id)
        if layer is None or not layer.removed or len(children) != 1:
            return
        if next(chain.files[layer_id].block_runs(), None) is not None:
            return
        child = replace(children[0], parent=layer.parent)
        chain.commit(meta.with_layers(child, drop=(layer_id,)))
        crashpoint("purge:drop-committed")
        chain.merge_in_view(layer_id, keep=child.id)
        _forget(chain, layer_id)


def _start_coalesce(chain: OpenChain, parent: Layer, child: Layer) -> int:
    parent_bytes = chain.files[parent.id].allocated_bytes()
    child_bytes = chain.files[child.id].allocated_bytes()
    into = parent.id if child_bytes < parent_bytes else child.id
    pending = PendingCoalesce(parent=parent.id, child=child.id, into=into)
    with chain.access.exclusive():
        meta = chain.meta
        changed = [replace(meta.layers[child.id], checksum=None)] if into == child.id else []
        chain.commit(meta.with_layers(*changed, pending=pending))
    crashpoint("purge:coalesce-started")
    if into == child.id:
        unlink_durably(chain.dir_fd, fmt.checksum_file_name(child.id))
    return _coalesce(chain, pending)


def _coalesce(chain: OpenChain, pending: PendingCoalesce, *, opening: bool = False) -> int:
    files = chain.files
    meta = chain.meta
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
            with chain.access.range(first, last):
                copied += _copy_step(source, target, first, last, only_holes=not into_parent)
        crashpoint("purge:coalesce-step")
    try:
        os.fdatasync(target.fd)
    except OSError as exc:
        raise from_os_error(exc, f"purge of replica {chain.path}") from exc
    _finish_coalesce(chain, pending, opening=opening)
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


def _finish_coalesce(chain: OpenChain, pending: PendingCoalesce, *, opening: bool) -> None:
    def commit() -> int:
        meta = chain.meta
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
        chain.commit(meta.with_layers(merged, *changed, drop=(dropped,), pending=None))
        crashpoint("purge:coalesce-committed")
        chain.files[merged.id].size = merged.size
        return dropped

    if opening:  # no view yet; the opening replica, holding exclusive access, builds it next
        dropped = commit()
        chain.close_layer(dropped)
        unlink_durably(chain.dir_fd, fmt.layer_file_name(dropped),
                       fmt.checksum_file_name(dropped))
        return
    with chain.access.exclusive():
        dropped = commit()
        chain.merge_in_view(dropped, keep=pending.into)
        _forget(chain, dropped)

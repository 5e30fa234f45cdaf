"""The state of one open chain, and the only code that changes it.

An open replica is a directory, one open file per layer, the metadata, the head's view (its
block index), an epoch, and the locks that order access to them. :class:`OpenChain` holds all
of it; :class:`~appliance.chain.replica.Replica` (the facade: data path and user operations),
:mod:`~appliance.chain.purge`, :mod:`~appliance.chain.staging` and
:class:`~appliance.chain.reader.SnapshotReader` work on this one object.

The rules of docs/replica-format.md ("Changing the metadata", "Locking and concurrency") are
enforced here instead of by convention in each caller: the metadata changes only through
:meth:`OpenChain.commit`, and layer files join or leave the chain and the head's view changes
shape only through the methods below; each asserts that the calling thread holds the
exclusive access. An opening replica holds it too, although no other thread can see the
chain yet, so that the rule has no exception.

Everything here is read freely by its users; only the attributes the data path reads on
every I/O (:attr:`~OpenChain.size`, :attr:`~OpenChain.view`, :attr:`~OpenChain.access`) are
plain attributes rather than properties, to cost one attribute load each; they too are
assigned only by this module.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from appliance.chain import format as fmt
from appliance.chain.access import AccessLock
from appliance.chain.durable import atomic_replace
from appliance.chain.format import Layer, Metadata
from appliance.chain.index import ChainView
from appliance.chain.layerfile import LayerFile
from appliance.errors import FailedPrecondition, InvalidArgument, NotFound, from_os_error


class OpenChain:
    """One replica directory's chain while it is open. Made by the replica's open, which
    adds the layer files and builds the view; closed by :meth:`close`."""

    def __init__(self, path: Path, dir_fd: int, meta: Metadata) -> None:
        self.path = path
        #: the directory, open (and ``flock``-ed) while the chain is; -1 once closed
        self.dir_fd = dir_fd
        #: orders data access against structure changes; see :mod:`appliance.chain.access`
        self.access = AccessLock()
        #: serializes purge and checksum computation, which read or rewrite whole layers
        self.maintenance = threading.Lock()
        #: the volume size, ``meta.size``, kept as a plain attribute for the data path
        self.size = meta.size
        #: the head's view; valid once :attr:`ready`
        self.view: ChainView
        #: how many layers an unmap punches: the head, then each removed ancestor that no
        #: other layer needs (removed, with the chain below it as its only child)
        self.unmap_depth = 1
        self._meta = meta
        self._files: dict[int, LayerFile] = {}
        self._dirty: set[int] = set()
        self._epoch = 0
        self._ready = False
        self._update_unmap_depth()

    # -- what users read --------------------------------------------------------------------

    @property
    def meta(self) -> Metadata:
        return self._meta

    @property
    def files(self) -> Mapping[int, LayerFile]:
        """The open file of every layer the metadata lists, by layer id."""
        return self._files

    @property
    def epoch(self) -> int:
        """Rises whenever layer files are closed or the tree is rebuilt: a snapshot reader
        built at an older epoch may read files that no longer stand for its snapshot."""
        return self._epoch

    @property
    def ready(self) -> bool:
        """True once the head's view is built (the open finished)."""
        return self._ready

    @property
    def closed(self) -> bool:
        return self.dir_fd < 0

    def layer(self, name: str, *, removed_ok: bool = False) -> Layer:
        """Snapshot *name*'s layer; NotFound when there is none, FailedPrecondition when it
        is removed (unless *removed_ok*: removed layers are still part of chains)."""
        layer = self._meta.snapshot(fmt.check_name(name))
        if layer is None:
            raise NotFound(f"snapshot {name!r} does not exist in replica {self.path}")
        if layer.removed and not removed_ok:
            raise FailedPrecondition(f"snapshot {name!r} is removed (purge deletes it)")
        return layer

    def check_io(self, offset: int, length: int, size: int | None = None) -> None:
        """Refuse a range outside ``[0, size)`` (the volume's size by default)."""
        size = self._meta.size if size is None else size
        if offset < 0 or length < 0 or offset + length > size:
            raise InvalidArgument(f"I/O range offset {offset} length {length} is outside "
                                  f"the volume of {size} bytes")

    def view_of(self, layer: Layer) -> ChainView:
        """A new view of *layer*'s chain (for reading a snapshot; shared access held)."""
        files = [self._files[x.id] for x in self._meta.ancestry(layer.id)]
        return ChainView.build(files, layer.size)

    # -- changes (exclusive access held) ----------------------------------------------------

    def _check_exclusive(self) -> None:
        assert self.access.held_exclusively(), "the chain changes only under exclusive access"

    def commit(self, meta: Metadata) -> None:
        """Make *meta* the chain's metadata, durably."""
        self._check_exclusive()
        fmt.validate(meta)
        atomic_replace(self.dir_fd, fmt.METADATA_FILE, fmt.encode(meta))
        self._meta = meta
        self.size = meta.size
        self._update_unmap_depth()

    def add_layer(self, layer: LayerFile) -> None:
        """Let the open file of a layer the committed metadata lists join the chain (the
        view is unchanged: see :meth:`push_head` and :meth:`reset_view`)."""
        self._check_exclusive()
        assert layer.id in self._meta.layers, "a layer joins after the commit that lists it"
        self._files[layer.id] = layer

    def push_head(self, layer: LayerFile) -> None:
        """Add the new, empty head that a snapshot committed, on top of the head's view."""
        self.add_layer(layer)
        self.view.push(layer)

    def close_layer(self, layer_id: int) -> None:
        """Close a layer the committed metadata no longer lists."""
        self._check_exclusive()
        assert layer_id not in self._meta.layers, "a layer leaves after the commit that drops it"
        self._files.pop(layer_id).close()
        self._dirty.discard(layer_id)
        self._epoch += 1

    def reset_view(self) -> None:
        """Build the head's view from the metadata, after a change of the tree below the
        head; snapshot readers built before must reopen (the epoch rises)."""
        self._check_exclusive()
        meta = self._meta
        files = [self._files[layer.id] for layer in meta.ancestry(meta.head)]
        self.view = ChainView.build(files, meta.size)
        self._epoch += 1
        self._ready = True

    def merge_in_view(self, dropped: int, keep: int) -> None:
        """Update the head's view after layer *dropped* merged into its neighbour *keep* (or,
        being empty, left the chain): positions above the pair move down by one."""
        self._check_exclusive()
        view = self.view
        positions = {layer.id: n for n, layer in enumerate(view.files, 1)}
        if dropped not in positions:
            return
        low = min(positions[dropped], positions.get(keep, positions[dropped]))
        mapping = np.arange(len(view.files) + 1, dtype=view.index.dtype)
        mapping[low + 1:] -= 1
        view.remap(mapping)
        files = [x for x in view.files if x.id != dropped]
        files[low - 1] = self._files[keep]
        view.files[:] = files

    def _update_unmap_depth(self) -> None:
        meta = self._meta
        depth, child = 1, meta.layers[meta.head]
        while child.parent is not None:
            parent = meta.layers[child.parent]
            if not parent.removed or len(meta.children(parent.id)) != 1:
                break
            depth, child = depth + 1, parent
        self.unmap_depth = depth

    # -- durability -------------------------------------------------------------------------

    def mark_dirty(self, layer_ids: Iterable[int]) -> None:
        """Note layers other than the head that were punched: the next sync flushes them."""
        self._dirty.update(layer_ids)

    def sync_layers(self) -> None:
        """``fdatasync`` the head and every layer marked dirty since the last sync."""
        try:
            os.fdatasync(self.view.files[-1].fd)
            for layer_id in list(self._dirty):
                os.fdatasync(self._files[layer_id].fd)
                self._dirty.discard(layer_id)
        except OSError as exc:
            raise from_os_error(exc, f"flush of replica {self.path}") from exc

    def close(self) -> None:
        """Close every layer file and the directory (unlocking it)."""
        if self.dir_fd < 0:
            return
        try:
            for layer in self._files.values():
                layer.close()
            self._files.clear()
        finally:
            os.close(self.dir_fd)
            self.dir_fd = -1

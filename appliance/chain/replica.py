"""An open replica: a volume's snapshot chain in one directory.

See docs/replica-format.md for the format and the rules every change follows. In short:

* data operations (read, write, write-zeroes, unmap, flush) touch the head layer, plus the
  removed layers that only the head still needs (unmap), and the in-memory index;
* structure operations (snapshot, revert, remove, purge, expand) change the metadata with
  write-temp, fsync, rename, fsync-directory, ordered so that a crash after any step leaves
  a replica that opens in the old or the new state (DESIGN invariant 6).

A replica may be used by many threads at once; see :mod:`appliance.chain.access`.

:class:`Replica` is the facade. The open chain's state (directory, layer files, metadata, the
head's index, the locks) is one :class:`~appliance.chain.openchain.OpenChain`, which the
facade, :mod:`~appliance.chain.purge`, :mod:`~appliance.chain.staging` and the snapshot
reader share and which alone changes it.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.chain import checksum as checksums
from appliance.chain import format as fmt
from appliance.chain import purge, staging
from appliance.chain.access import AccessStatistics
from appliance.chain.directory import (
    TMPFS_MAGIC,
    ensure_fd_budget,
    filesystem_type,
    lock_directory,
    open_directory,
    probe_filesystem,
    read_metadata,
)
from appliance.chain.durable import (
    atomic_replace,
    crashpoint,
    create_sparse,
    unlink_durably,
    write_all,
)
from appliance.chain.format import BLOCK_SIZE, Layer, Metadata, block_span, split_blocks
from appliance.chain.index import ChainView, fill_zeros
from appliance.chain.layerfile import LayerFile, punch_hole, reserve
from appliance.chain.openchain import OpenChain
from appliance.chain.reader import Extent, SnapshotReader, chain_extents
from appliance.chain.staging import LayerSpec, StagedLayer
from appliance.chain.state import StateRecord, create_state_file, read_state_file
from appliance.errors import (
    AlreadyExists,
    Corruption,
    FailedPrecondition,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    ReadOnly,
    StorageIOError,
    from_os_error,
)

_ZERO_BLOCKS = bytes(256 * BLOCK_SIZE)


@dataclass(frozen=True)
class LayerInfo:
    """A layer as shown to operators. The head has ``name`` None."""

    name: str | None
    parent: str | None
    children: tuple[str | None, ...]
    size: int
    allocated: int
    removed: bool
    user_created: bool
    created: str | None
    labels: Mapping[str, str]
    checksum: str | None

    @property
    def is_head(self) -> bool:
        return self.name is None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "head": self.is_head, "parent": self.parent,
                "children": list(self.children), "size": self.size, "allocated": self.allocated,
                "removed": self.removed, "user_created": self.user_created,
                "created": self.created, "labels": dict(self.labels), "checksum": self.checksum}


@dataclass(frozen=True)
class IndexSize:
    """The in-memory index of the head (docs/replica-format.md, "The index"): bytes per
    block entry (1 up to 255 layers in the chain, 2 beyond) and the array's size in bytes
    (pages of never-written parts of the volume take no memory)."""

    bytes_per_block: int
    total_bytes: int


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cut_short(names: set[str]) -> bool:
    """Whether *names*, a directory's entries, are what a :meth:`Replica.create` that
    stopped before its last step leaves: no metadata (written last, it marks a complete
    replica), only the files creation makes before it."""
    made_first = {fmt.STATE_FILE, fmt.layer_file_name(1), fmt.METADATA_FILE + fmt.TEMP_SUFFIX,
                  ".probe" + fmt.TEMP_SUFFIX}
    return fmt.METADATA_FILE not in names and names <= made_first


class Replica:
    """An open replica. Create one with :meth:`create` or :meth:`open`; close it after use."""

    def __init__(self, path: Path, dir_fd: int, meta: Metadata, writable: bool) -> None:
        self.path = path
        self.writable = writable
        self._chain = OpenChain(path, dir_fd, meta)
        self._state: StateRecord | None = None
        self._read_state: tuple[int, int] = (0, 0)
        # Writes reserve space before writing blocks new to the head, so a full disk fails
        # a write as a whole instead of leaving part of it. Not on tmpfs, where a reserved
        # but unwritten page would read as data after a crash.
        self._reserve_space = filesystem_type(path) != TMPFS_MAGIC
        self.cleaned_up: list[str] = []

    # -- lifecycle --------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, size: int, *, replica_id: str | None = None) -> Replica:
        """Create a replica of *size* bytes in *path* (absent, an empty directory, or what a
        creation cut short by a crash left: its first files, without the metadata)."""
        path = Path(path)
        fmt.check_size(size)
        made = False
        try:
            path.mkdir()
            made = True
        except FileExistsError:
            if not path.is_dir():
                raise InvalidArgument(f"{path} exists and is not a directory") from None
            with os.scandir(path) as entries:
                names = {entry.name for entry in entries}
            if names and not _cut_short(names):
                raise AlreadyExists(f"{path} is not empty; a replica needs a new or empty "
                                    "directory") from None
            for name in names:  # a creation cut short (a crash): it held no data yet
                (path / name).unlink()
        except FileNotFoundError:
            raise NotFound(f"the parent directory of {path} does not exist") from None
        dir_fd = lock_directory(path, exclusive=True)
        try:
            probe_filesystem(dir_fd, path)
            create_state_file(dir_fd)
            os.close(create_sparse(dir_fd, fmt.layer_file_name(1), size))
            meta = Metadata(replica_id=replica_id or str(uuid.uuid4()), size=size, head=1,
                            layers={1: Layer(id=1, parent=None, size=size)}, next_layer_id=2)
            # The metadata file is written last: its presence marks a complete replica.
            atomic_replace(dir_fd, fmt.METADATA_FILE, fmt.encode(meta))
        except BaseException:
            # Leave the directory as it was: it was absent or empty.
            for entry in os.listdir(dir_fd):  # noqa: PTH208 - by fd
                os.unlink(entry, dir_fd=dir_fd)
            os.close(dir_fd)
            if made:
                path.rmdir()
            raise
        os.close(dir_fd)
        return cls.open(path)

    @classmethod
    def open(cls, path: str | Path, *, writable: bool = True) -> Replica:
        path = Path(path)
        dir_fd = open_directory(path, exclusive=writable)
        try:
            meta = read_metadata(dir_fd, path)
            replica = cls(path, dir_fd, meta, writable)
        except BaseException:
            os.close(dir_fd)
            raise
        try:
            with replica._chain.access.exclusive():  # see appliance.chain.openchain
                replica._open_layers()
        except BaseException:
            replica.close()
            raise
        return replica

    def _open_layers(self) -> None:
        chain = self._chain
        meta = chain.meta
        ensure_fd_budget(len(meta.layers))
        if self.writable:
            self._state = StateRecord(chain.dir_fd)
            self._remove_orphans()
        else:
            self._read_state = read_state_file(chain.dir_fd)
        flags = (os.O_RDWR if self.writable else os.O_RDONLY) | os.O_CLOEXEC
        for layer in meta.layers.values():
            name = fmt.layer_file_name(layer.id)
            try:
                fd = os.open(name, flags, dir_fd=chain.dir_fd)
            except FileNotFoundError:
                raise Corruption(f"{self.path}: layer file {name} "
                                 f"({layer.name or 'the head'}) is missing") from None
            chain.add_layer(LayerFile(layer.id, fd, layer.size))
            actual = os.fstat(fd).st_size
            if layer.id == meta.head and actual != meta.size and self.writable:
                os.ftruncate(fd, meta.size)  # an expand stopped before its metadata commit
            elif actual < layer.size and layer.id != meta.head:
                raise Corruption(f"{self.path}: layer file {name} is {actual} bytes, "
                                 f"the metadata says {layer.size}")
        if self.writable and meta.pending is not None:
            purge.resume_pending(chain)
        chain.reset_view()

    def _remove_orphans(self) -> None:
        """Delete files a crash left behind: temporaries and layer or checksum files the
        metadata does not reference. Only names of this format are ever touched."""
        meta = self._chain.meta
        dir_fd = self._chain.dir_fd
        for entry in sorted(os.listdir(dir_fd)):  # noqa: PTH208 - by fd
            match = fmt.LAYER_FILE.fullmatch(entry)
            orphan = entry.endswith(fmt.TEMP_SUFFIX)
            if match:
                layer = meta.layers.get(int(match["id"]))
                orphan = layer is None or (match["kind"] == "sum" and layer.checksum is None)
            if orphan:
                os.unlink(entry, dir_fd=dir_fd)
                self.cleaned_up.append(entry)
        if self.cleaned_up:
            os.fsync(dir_fd)

    def close(self) -> None:
        chain = self._chain
        if chain.closed:
            return
        try:
            if self._state is not None:
                if chain.ready:
                    self._sync()
                self._state.close()
        finally:
            chain.close()

    def __enter__(self) -> Replica:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- properties -------------------------------------------------------------------------

    @property
    def meta(self) -> Metadata:
        return self._chain.meta

    @property
    def size(self) -> int:
        return self._chain.size

    @property
    def replica_id(self) -> str:
        return self._chain.meta.replica_id

    @property
    def revision(self) -> int:
        return self._state.revision if self._state else self._read_state[1]

    @property
    def generation(self) -> int:
        return self._state.generation if self._state else self._read_state[0]

    @property
    def index_size(self) -> IndexSize:
        index = self._chain.view.index
        return IndexSize(bytes_per_block=index.itemsize, total_bytes=index.nbytes)

    def access_statistics(self) -> AccessStatistics:
        """Who holds and who waits for access to the replica now (see
        :mod:`appliance.chain.access`)."""
        return self._chain.access.statistics()

    def set_generation(self, generation: int) -> None:
        self._writable_state().set_generation(generation)

    def set_revision(self, revision: int) -> None:
        self._writable_state().set_revision(revision)

    def _writable_state(self) -> StateRecord:
        if self._state is None:
            raise ReadOnly(f"replica {self.path} is open read-only")
        return self._state

    # -- data operations --------------------------------------------------------------------

    def readinto(self, buf: memoryview | bytearray, offset: int) -> None:
        """Fill *buf* with the head's bytes at *offset*."""
        view = buf if isinstance(buf, memoryview) and buf.format == "B" else \
            memoryview(buf).cast("B")
        length = len(view)
        open_chain = self._chain
        if offset < 0 or offset + length > open_chain.size:
            open_chain.check_io(offset, length)
        if not length:
            return
        access = open_chain.access
        access.acquire_shared()
        try:
            chain = open_chain.view
            first = offset // BLOCK_SIZE
            if (offset + length - 1) // BLOCK_SIZE == first:  # one block: the common case
                position = int(chain.index[first])
                if position:
                    if os.preadv(chain.files[position - 1].fd, [view], offset) != length:
                        chain.short_read(position, offset)
                else:
                    fill_zeros(view)
            else:
                chain.readinto(view, offset)
        except OSError as exc:
            raise from_os_error(exc, f"read from replica {self.path}") from exc
        finally:
            access.release_shared()

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(buf, offset)
        return bytes(buf)

    def write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        view = data if isinstance(data, memoryview) and data.format == "B" else \
            memoryview(data).cast("B")
        length = len(view)
        open_chain = self._chain
        state = self._state
        if state is None or offset < 0 or offset + length > open_chain.size:
            open_chain.check_io(offset, length)
            state = self._writable_state()
        if not length:
            return
        access = open_chain.access
        token = access.acquire_range(offset // BLOCK_SIZE, -(-(offset + length) // BLOCK_SIZE))
        try:
            self._write_locked(open_chain.view, view, offset)
            state.bump()
        finally:
            access.release_range(token)

    def _write_locked(self, chain: ChainView, data: memoryview, offset: int) -> None:
        """Write *data* to the head of *chain* (the head's view; its range is held)."""
        top = len(chain.files)
        first, last = block_span(offset, len(data))
        end = offset + len(data)
        partial_head = offset % BLOCK_SIZE and chain.index[first] != top
        partial_tail = end % BLOCK_SIZE and chain.index[last - 1] != top
        if partial_head or partial_tail:
            # A partial block not yet in the head: write it whole, merged with what the
            # layers below hold, or the rest of the block would read as zeros.
            widened = bytearray((last - first) * BLOCK_SIZE)
            whole = memoryview(widened)
            chain.readinto(whole[:BLOCK_SIZE], first * BLOCK_SIZE)
            chain.readinto(whole[-BLOCK_SIZE:], (last - 1) * BLOCK_SIZE)
            start = offset - first * BLOCK_SIZE
            whole[start: start + len(data)] = data
            data, offset = whole, first * BLOCK_SIZE
        head = chain.files[-1]
        if self._reserve_space and (chain.index[first] != top if last - first == 1
                                    else not (chain.index[first:last] == top).all()):
            self._reserve(chain, first, last)
        try:
            write_all(head.fd, data, offset)
        except OSError as exc:
            # Part of the range may be written: make the index agree with the files again.
            chain.index[first:last] = chain.resolve(first, last, top)
            raise from_os_error(exc, f"write to replica {self.path}") from exc
        chain.index[first:last] = top

    def _reserve(self, chain: ChainView, first: int, last: int) -> None:
        """Reserve head space for blocks ``[first, last)``; on failure release what was
        reserved for blocks the head did not hold, and raise (nothing was written)."""
        head, top = chain.files[-1], len(chain.files)
        try:
            reserve(head.fd, first * BLOCK_SIZE, (last - first) * BLOCK_SIZE)
        except OSError as exc:
            for start, stop, position in chain.runs(first, last):
                if position != top:
                    punch_hole(head.fd, start * BLOCK_SIZE, (stop - start) * BLOCK_SIZE)
            raise from_os_error(exc, f"write to replica {self.path}") from exc

    def write_zeroes(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Make ``[offset, offset+length)`` read as zeros, returning space where it can.

        Returns the block runs ``[first, last)`` the head now holds as written zeros (where a
        lower layer holds data, or a partial block was written); elsewhere it punched holes.
        :meth:`zero_exact` repeats exactly these decisions on another replica.
        """
        open_chain = self._chain
        open_chain.check_io(offset, length)
        state = self._writable_state()
        if not length:
            return []
        pieces, first, last = split_blocks(offset, offset + length)
        explicit: list[tuple[int, int]] = []
        with open_chain.access.range(*block_span(offset, length)):
            for start, end in pieces:
                self._write_locked(open_chain.view, memoryview(_ZERO_BLOCKS)[: end - start],
                                   start)
                explicit.append(block_span(start, end - start))
            if first < last:
                explicit += self._zero_blocks(first, last)
            state.bump()
        return sorted(explicit)

    def zero_exact(self, first: int, last: int, explicit: list[tuple[int, int]]) -> None:
        """Punch blocks ``[first, last)`` out of the head, then write zeros into the runs
        *explicit* (within the range): the head ends up as another replica's did after
        :meth:`write_zeroes`, whatever this replica's lower layers hold."""
        open_chain = self._chain
        open_chain.check_io(first * BLOCK_SIZE, (last - first) * BLOCK_SIZE)
        state = self._writable_state()
        if any(start < first or end > last or start >= end for start, end in explicit):
            raise InvalidArgument(f"explicit zero runs {explicit} are not within blocks "
                                  f"[{first}, {last})")
        with open_chain.access.range(first, last):
            chain = open_chain.view
            top = len(chain.files)
            try:
                chain.files[-1].punch_blocks(first, last)
                chain.index[first:last] = chain.resolve(first, last, top - 1)
                for start, end in explicit:
                    self._write_zero_run(chain, start, end)
            except OSError as exc:
                chain.index[first:last] = chain.resolve(first, last, top)
                raise from_os_error(exc, f"write zeroes to replica {self.path}") from exc
            state.bump()

    def _write_zero_run(self, chain: ChainView, start: int, stop: int) -> None:
        if self._reserve_space:
            self._reserve(chain, start, stop)
        for block in range(start, stop, 256):
            count = min(256, stop - block)
            write_all(chain.files[-1].fd, memoryview(_ZERO_BLOCKS)[: count * BLOCK_SIZE],
                      block * BLOCK_SIZE)
            chain.index[block: block + count] = len(chain.files)

    def _zero_blocks(self, first: int, last: int) -> list[tuple[int, int]]:
        chain = self._chain.view
        top = len(chain.files)
        if not chain.index[first:last].any():
            return []
        explicit = []
        try:
            chain.files[-1].punch_blocks(first, last)
            chain.index[first:last] = chain.resolve(first, last, top - 1)
            # Where a snapshot holds data the head must hold explicit zeros to hide it.
            for start, stop, position in list(chain.runs(first, last)):
                if position:
                    self._write_zero_run(chain, start, stop)
                    explicit.append((start, stop))
        except OSError as exc:
            chain.index[first:last] = chain.resolve(first, last, top)
            raise from_os_error(exc, f"write zeroes to replica {self.path}") from exc
        return explicit

    def unmap(self, offset: int, length: int) -> None:
        """Discard the whole blocks in the range, returning their space.

        Afterwards the range reads as it does in the nearest snapshot below the head that
        is kept (or as zeros); partial blocks at the edges are left unchanged.
        """
        open_chain = self._chain
        open_chain.check_io(offset, length)
        state = self._writable_state()
        _pieces, first, last = split_blocks(offset, offset + length)
        if first >= last:
            return
        with open_chain.access.range(first, last):
            chain = open_chain.view
            top = len(chain.files)
            punched = chain.files[top - open_chain.unmap_depth:]
            try:
                for layer in punched:
                    if first * BLOCK_SIZE < layer.size:
                        layer.punch_blocks(first, last)
            except OSError as exc:
                raise from_os_error(exc, f"unmap in replica {self.path}") from exc
            finally:
                chain.index[first:last] = chain.resolve(first, last, top)
            open_chain.mark_dirty(layer.id for layer in punched[:-1])
            state.bump()

    def flush(self) -> None:
        """Return once every change made so far is on stable storage."""
        self._writable_state()
        with self._chain.access.shared():
            self._sync()

    def _sync(self) -> None:
        self._chain.sync_layers()
        assert self._state is not None
        self._state.sync()

    # -- reading the chain ------------------------------------------------------------------

    def extents(self, offset: int = 0, length: int | None = None, *,
                snapshot: str | None = None) -> list[Extent]:
        """Allocated and unallocated (zero) runs of the head, or of a snapshot."""
        if snapshot is not None:
            with self.open_snapshot(snapshot) as reader:
                return reader.extents(offset, length)
        chain = self._chain
        with chain.access.shared():
            return chain_extents(chain.view, offset, length)

    def layer_extents(self, snapshot: str | None = None) -> list[Extent]:
        """The runs of data held by one layer itself (the head when *snapshot* is None)."""
        chain = self._chain
        with chain.access.shared():
            layer = chain.layer(snapshot, removed_ok=True) if snapshot else \
                chain.meta.layers[chain.meta.head]
            lf = chain.files[layer.id]
            return [Extent(a * BLOCK_SIZE, (b - a) * BLOCK_SIZE, True)
                    for a, b in lf.block_runs()]

    def diff(self, base: str | None, target: str) -> list[tuple[int, int]]:
        """Byte ranges ``(offset, length)`` in which snapshot *target* may differ from
        snapshot *base* (from an empty volume when *base* is None).

        Computed from allocation: the union of the data of every layer that is in one
        snapshot's ancestry and not in the other's. It never misses a difference; it may
        include ranges written again with the same bytes.
        """
        chain = self._chain
        with chain.access.shared():
            meta = chain.meta
            target_chain = meta.ancestry(chain.layer(target).id)
            base_chain = meta.ancestry(chain.layer(base).id) if base else []
            shared = {x.id for x in target_chain} & {x.id for x in base_chain}
            differing = [x for x in (*target_chain, *base_chain) if x.id not in shared]
            runs = sorted(run for layer in differing
                          for run in chain.files[layer.id].block_runs())
        merged: list[tuple[int, int]] = []
        for start, end in runs:
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
            else:
                merged.append((start, end))
        return [(a * BLOCK_SIZE, (b - a) * BLOCK_SIZE) for a, b in merged]

    def open_snapshot(self, name: str) -> SnapshotReader:
        """A reader of a snapshot's content, valid until the chain's files change (a purge
        step or a revert): reads after that raise :class:`FailedPrecondition`."""
        chain = self._chain
        with chain.access.shared():
            return SnapshotReader(chain, name, chain.view_of(chain.layer(name)), chain.epoch)

    def read_layer(self, name: str, buf: memoryview | bytearray, offset: int) -> None:
        """Fill *buf* with snapshot layer *name*'s own bytes (not its chain's) at *offset*;
        blocks the layer does not hold read as zeros. Removed layers can be read too: they
        are part of the chains of the snapshots above them."""
        view = memoryview(buf).cast("B")
        chain = self._chain
        with chain.access.shared():
            layer = chain.layer(name, removed_ok=True)
            chain.check_io(offset, len(view), layer.size)
            try:
                done = os.preadv(chain.files[layer.id].fd, [view], offset)
            except OSError as exc:
                raise from_os_error(exc, f"read of layer {name!r}") from exc
            if done != len(view):
                raise Corruption(f"layer {name!r}: short read at offset {offset + done}")

    def layers(self) -> list[LayerInfo]:
        """Every layer (snapshots and the head), parents before children."""
        chain = self._chain
        with chain.access.shared():
            meta = chain.meta
            by_parent: dict[int | None, list[Layer]] = {}
            for layer in sorted(meta.layers.values(), key=lambda x: x.id):
                by_parent.setdefault(layer.parent, []).append(layer)
            ordered: list[LayerInfo] = []
            pending = list(reversed(by_parent.get(None, [])))
            while pending:
                layer = pending.pop()
                children = by_parent.get(layer.id, [])
                parent = meta.layers[layer.parent].name if layer.parent is not None else None
                ordered.append(LayerInfo(
                    name=layer.name, parent=parent, children=tuple(x.name for x in children),
                    size=layer.size, allocated=chain.files[layer.id].allocated_bytes(),
                    removed=layer.removed, user_created=layer.user_created,
                    created=layer.created, labels=dict(layer.labels), checksum=layer.checksum))
                pending.extend(reversed(children))
            return ordered

    # -- structure operations ---------------------------------------------------------------

    def _new_layer_file(self, size: int) -> tuple[int, int]:
        chain = self._chain
        layer_id = chain.meta.next_layer_id
        try:
            return layer_id, create_sparse(chain.dir_fd, fmt.layer_file_name(layer_id), size)
        except OSError as exc:
            raise from_os_error(exc, f"create a layer in replica {self.path}") from exc

    def snapshot(self, name: str, *, labels: Mapping[str, str] | None = None,
                 user_created: bool = True) -> LayerInfo:
        """Freeze the head as snapshot *name* and continue on a new, empty head."""
        fmt.check_name(name)
        labels = fmt.check_labels(labels or {})
        self._writable_state()
        chain = self._chain
        with chain.access.exclusive():
            meta = chain.meta
            if meta.snapshot(name) is not None:
                raise AlreadyExists(f"snapshot {name!r} already exists in replica {self.path}")
            if len(meta.layers) > fmt.MAX_SNAPSHOTS:
                raise LimitExceeded(f"replica {self.path} has {fmt.MAX_SNAPSHOTS} snapshots, "
                                    "the most it can hold: remove and purge some first")
            self._sync()
            head_id, fd = self._new_layer_file(meta.size)
            crashpoint("snapshot:head-created")
            frozen = replace(meta.layers[meta.head], name=name, created=_now(),
                             user_created=user_created, labels=labels)
            head = Layer(id=head_id, parent=frozen.id, size=meta.size)
            try:
                chain.commit(meta.with_layers(frozen, head, head=head_id,
                                              next_layer_id=head_id + 1))
            except BaseException:
                os.close(fd)
                raise
            crashpoint("snapshot:committed")
            chain.push_head(LayerFile(head_id, fd, meta.size))
        return self._info(name)

    def _info(self, name: str) -> LayerInfo:
        return next(x for x in self.layers() if x.name == name)

    def revert(self, name: str) -> None:
        """Discard the head and continue on a new, empty head over snapshot *name*."""
        self._writable_state()
        chain = self._chain
        with chain.access.exclusive():
            target = chain.layer(name)
            meta = chain.meta
            self._sync()
            head_id, fd = self._new_layer_file(meta.size)
            crashpoint("revert:head-created")
            old_head = meta.head
            try:
                chain.commit(meta.with_layers(
                    Layer(id=head_id, parent=target.id, size=meta.size), drop=(old_head,),
                    head=head_id, next_layer_id=head_id + 1))
            except BaseException:
                os.close(fd)
                raise
            crashpoint("revert:committed")
            chain.add_layer(LayerFile(head_id, fd, meta.size))
            chain.close_layer(old_head)
            unlink_durably(chain.dir_fd, fmt.layer_file_name(old_head))
            crashpoint("revert:old-head-deleted")
            chain.reset_view()

    def remove_snapshot(self, name: str) -> None:
        """Mark snapshot *name* removed; :meth:`purge` then reclaims its space."""
        fmt.check_name(name)
        self._writable_state()
        chain = self._chain
        with chain.access.exclusive():
            layer = chain.meta.snapshot(name)
            if layer is None:
                raise NotFound(f"snapshot {name!r} does not exist in replica {self.path}")
            if layer.removed:
                return
            # A removed layer's content may change (unmap and purge punch it), so its
            # checksum is dropped.
            chain.commit(chain.meta.with_layers(replace(layer, removed=True, checksum=None)))
            crashpoint("remove:committed")
            unlink_durably(chain.dir_fd, fmt.checksum_file_name(layer.id))

    def expand(self, size: int) -> None:
        """Grow the volume to *size* bytes; the new space reads as zeros."""
        fmt.check_size(size, "new size")
        self._writable_state()
        chain = self._chain
        with chain.access.exclusive():
            meta = chain.meta
            if size < meta.size:
                raise InvalidArgument(f"cannot shrink replica {self.path} from {meta.size} to "
                                      f"{size} bytes: volumes only grow")
            if size == meta.size:
                return
            head = chain.files[meta.head]
            try:
                os.ftruncate(head.fd, size)
                os.fsync(head.fd)
            except OSError as exc:
                raise from_os_error(exc, f"expand replica {self.path}") from exc
            crashpoint("expand:head-grown")
            chain.commit(meta.with_layers(replace(meta.layers[meta.head], size=size),
                                          size=size))
            crashpoint("expand:committed")
            head.size = size
            chain.view.grow(size)

    def purge(self) -> dict[str, int]:
        """Reclaim the space of removed snapshots; see :mod:`appliance.chain.purge`."""
        self._writable_state()
        return purge.purge(self._chain)

    # -- rebuilds ----------------------------------------------------------------------------

    def stage_layer(self, size: int, *, copy_of: str | None = None) -> StagedLayer:
        """A layer file outside the chain, to be filled and then installed by
        :meth:`install_layers`; see :mod:`appliance.chain.staging`."""
        return staging.stage_layer(self._chain, size, copy_of=copy_of)

    def install_layers(self, specs: list[LayerSpec], sources: Mapping[str, int | StagedLayer],
                       head_parent: str, size: int) -> None:
        """Replace the tree below the head in one commit; see
        :func:`appliance.chain.staging.install_layers`."""
        staging.install_layers(self._chain, specs, sources, head_parent, size)

    # -- the volume record -------------------------------------------------------------------

    def volume_record(self) -> dict[str, Any] | None:
        """The record the engine keeps in this replica (membership of the volume), or None.

        The store does not interpret it: a JSON object of at most 64 KiB, replaced whole."""
        try:
            fd = os.open(fmt.VOLUME_FILE, os.O_RDONLY | os.O_CLOEXEC,
                         dir_fd=self._chain.dir_fd)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as file:
            data = file.read(fmt.MAX_VOLUME_RECORD + 1)
        try:
            record = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise Corruption(f"{self.path}: {fmt.VOLUME_FILE} is not valid JSON") from exc
        if not isinstance(record, dict):
            raise Corruption(f"{self.path}: {fmt.VOLUME_FILE} is not a JSON object")
        return record

    def set_volume_record(self, record: Mapping[str, Any]) -> None:
        """Replace the volume record, durably."""
        self._writable_state()
        data = json.dumps(record, sort_keys=True).encode()
        if len(data) > fmt.MAX_VOLUME_RECORD:
            raise InvalidArgument(f"volume record of {len(data)} bytes is larger than "
                                  f"{fmt.MAX_VOLUME_RECORD}")
        try:
            atomic_replace(self._chain.dir_fd, fmt.VOLUME_FILE, data, mode=0o600)
        except OSError as exc:
            raise from_os_error(exc, f"write the volume record of {self.path}") from exc

    # -- checksums --------------------------------------------------------------------------

    def compute_checksum(self, name: str) -> str:
        """Compute and store the checksum of snapshot *name*; return its digest."""
        self._writable_state()
        chain = self._chain
        with chain.maintenance:
            with chain.access.shared():
                layer = chain.layer(name)
            result = checksums.compute(chain.files[layer.id])
            checksums.store(chain.dir_fd, layer.id, result)
            with chain.access.exclusive():
                current = chain.meta.layers.get(layer.id)
                if current is None or current.name != name or current.removed:
                    raise FailedPrecondition(f"snapshot {name!r} was removed while its "
                                             "checksum was computed")
                chain.commit(chain.meta.with_layers(replace(current, checksum=result.digest)))
        return result.digest

    def layer_checksum(self, name: str | None) -> checksums.LayerChecksum:
        """The checksum of snapshot layer *name* (stored, computed and stored when missing),
        or of the head when *name* is None (computed, never stored: it changes). Callers
        that need the head's checksum to mean something stop writes first."""
        chain = self._chain
        if name is None:
            with chain.access.shared():
                head = chain.files[chain.meta.head]
                return checksums.compute(head)
        layer = chain.layer(name, removed_ok=True)
        if layer.checksum is None:
            if layer.removed:  # removed layers may change; never stored
                with chain.maintenance:
                    return checksums.compute(chain.files[layer.id])
            self.compute_checksum(name)
            layer = chain.layer(name)
        stored = checksums.load(chain.dir_fd, layer.id)
        if stored.digest != layer.checksum:
            raise Corruption(f"snapshot {name!r}: the checksum file does not match the "
                             "metadata")
        return stored

    def scrub_layer(self, name: str, progress: Callable[[int], None] | None = None
                    ) -> tuple[checksums.LayerChecksum, list[int]]:
        """Snapshot *name*'s stored checksum (computed and stored first when it has none)
        and the chunks whose data no longer matches it (*progress* is called with the
        bytes read after each chunk). The layer is read without the maintenance lock (a
        purge or a rebuild is not held up for a whole layer); the chunks found different
        are read again under it, and only those that still differ are reported."""
        stored = self.layer_checksum(name)
        chain = self._chain
        with chain.access.shared():
            layer = chain.layer(name)
            layer_file = chain.files[layer.id]
        actual = checksums.compute(layer_file, progress)
        suspects = checksums.differing_chunks(stored, actual)
        if not suspects:
            return stored, []
        with chain.maintenance:
            with chain.access.shared():
                again = chain.layer(name)
            if again.id != layer.id or again.checksum != stored.digest:
                raise FailedPrecondition(f"snapshot {name!r} changed while it was scrubbed "
                                         "(a purge merged a layer into it): scrub again")
            layer_file = chain.files[again.id]
            damaged = [n for n in suspects if stored.chunks.get(n) != checksums.chunk_digest(
                *checksums.read_chunk(layer_file, n))]
        return stored, damaged

    def read_chunk(self, name: str, number: int) -> tuple[int, bytes]:
        """Chunk *number* of snapshot *name*: its allocation bitmap and allocated bytes."""
        chain = self._chain
        with chain.access.shared():
            layer = chain.layer(name)
            return checksums.read_chunk(chain.files[layer.id], number)

    def repair_chunk(self, name: str, number: int, bitmap: int, data: bytes) -> None:
        """Rewrite chunk *number* of snapshot *name* with *data*, a good copy from another
        replica: only when *bitmap* and *data* match the chunk digest this replica stores
        (nothing else can be written), and the chunk's allocation is *bitmap* already (the
        layer's allocation, which readers' indexes are built from, never changes). Checked
        again once written."""
        self._writable_state()
        chain = self._chain
        with chain.maintenance:
            with chain.access.shared():
                layer = chain.layer(name)
            stored = checksums.load(chain.dir_fd, layer.id)
            if stored.digest != layer.checksum:
                raise Corruption(f"snapshot {name!r}: the checksum file does not match the "
                                 "metadata")
            expected = stored.chunks.get(number)
            if expected is None or checksums.chunk_digest(bitmap, data) != expected:
                raise InvalidArgument(f"snapshot {name!r} chunk {number}: the copy given "
                                      "does not match this replica's checksum of it")
            lf = chain.files[layer.id]
            have, _ = checksums.read_chunk(lf, number)
            if have != bitmap:
                raise FailedPrecondition(
                    f"snapshot {name!r} chunk {number}: its blocks here are not the blocks "
                    "of the good copy (allocation differs), which a rewrite cannot mend: "
                    "replace this replica (it is rebuilt from a healthy one)")
            checksums.rewrite_chunk(lf, number, bitmap, data)
            again = checksums.chunk_digest(*checksums.read_chunk(lf, number))
            if again != expected:
                raise StorageIOError(f"snapshot {name!r} chunk {number} still differs from "
                                     "its checksum after it was rewritten: the disk may be "
                                     "failing")

    def verify_checksum(self, name: str) -> list[tuple[int, int]]:
        """Recompute snapshot *name*'s checksum; return the byte ranges that differ from the
        stored one (empty when the layer is intact)."""
        chain = self._chain
        with chain.maintenance:
            with chain.access.shared():
                layer = chain.layer(name)
            if layer.checksum is None:
                raise FailedPrecondition(f"snapshot {name!r} has no stored checksum")
            stored = checksums.load(chain.dir_fd, layer.id)
            if stored.digest != layer.checksum:
                raise Corruption(f"snapshot {name!r}: the checksum file does not match the "
                                 "metadata")
            actual = checksums.compute(chain.files[layer.id])
        return checksums.chunk_ranges(checksums.differing_chunks(stored, actual), layer.size)

"""A snapshot held open by its layer files, without the replica's lock: what browsing a
snapshot reads (docs/browse.md), beside an engine or replica server that has the replica
open, or while the volume is detached and may be attached at any time.

It reads the metadata once, with no lock (``replica.json`` is replaced atomically, so a
read sees one version or the next), opens the files of the snapshot's chain read-only and
keeps them open. What a snapshot holds never changes, and what changes the files keeps it
so: a purge that merges a removed layer into its child copies blocks the child lacks (the
open files still hold every block where they were) and deletes the merged file (an open
file stays readable). A purge caught half-way (``pending`` in the metadata) is waited for.
The one change that would show is punching a removed snapshot's blocks, which an unmap
does to removed ancestors of the head; the node refuses to remove a snapshot while it is
browsed, so a browsed snapshot is never removed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from appliance.chain import format as fmt
from appliance.chain.layerfile import block_runs
from appliance.errors import FailedPrecondition, NotFound, StorageIOError

SETTLE = 30.0  # seconds a purge in progress is waited for


class FrozenSnapshot:
    """A :class:`~appliance.chain.source.LayerSource` of one snapshot of a replica
    directory, from layer files opened once."""

    def __init__(self, path: Path, meta: fmt.Metadata, snapshot: str,
                 files: dict[str, int]) -> None:
        self.path = path
        self.snapshot = snapshot
        self._meta = meta
        self._files = files  # layer name -> fd

    @classmethod
    def open(cls, path: str | Path, snapshot: str) -> FrozenSnapshot:
        path = Path(path)
        deadline = time.monotonic() + SETTLE
        while True:
            try:
                data = (path / fmt.METADATA_FILE).read_bytes()
            except FileNotFoundError:
                raise NotFound(f"{path} is not a replica directory") from None
            meta = fmt.decode(data, str(path / fmt.METADATA_FILE))
            layer = meta.snapshot(fmt.check_name(snapshot))
            if layer is None or layer.removed:
                raise NotFound(f"snapshot {snapshot!r} does not exist in replica {path}")
            if meta.pending is None:
                files: dict[str, int] = {}
                try:
                    for member in meta.ancestry(layer.id):
                        files[member.name or ""] = os.open(
                            path / fmt.layer_file_name(member.id), os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    for fd in files.values():  # changed meanwhile: read the metadata again
                        os.close(fd)
                else:
                    return cls(path, meta, snapshot, files)
            if time.monotonic() > deadline:
                raise FailedPrecondition(f"replica {path} kept changing (a purge) for "
                                         f"{SETTLE:.0f} s: try again")
            time.sleep(0.2)

    def layers(self) -> list[dict[str, Any]]:
        by_id = self._meta.layers
        chain = self._meta.ancestry(self._meta.snapshot(self.snapshot).id)  # type: ignore[union-attr]
        return [{"name": x.name, "head": False, "removed": x.removed, "size": x.size,
                 "created": x.created,
                 "parent": by_id[x.parent].name if x.parent is not None else None}
                for x in chain]

    def layer_extents(self, name: str) -> list[tuple[int, int]]:
        layer = self._meta.snapshot(name)
        if layer is None or name not in self._files:
            raise NotFound(f"layer {name!r} is not in the chain of {self.snapshot!r}")
        return list(block_runs(self._files[name], 0, layer.size))

    def read_layer(self, name: str, buf: memoryview, offset: int) -> None:
        try:
            done = os.preadv(self._files[name], [buf], offset)
        except OSError as exc:
            raise StorageIOError(f"read of layer {name!r} of {self.path}: "
                                 f"{exc.strerror}") from exc
        if done < len(buf):
            buf[done:] = bytes(len(buf) - done)  # beyond the file's end: a hole

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def __enter__(self) -> FrozenSnapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Building layers outside the chain and installing them in one step (for rebuilds).

A rebuild makes a replica's snapshot layers equal to another replica's while the head keeps
taking live writes. Layers that differ are built as *staged* layers: files with ids reserved
in the metadata but not part of the tree, so a crash leaves only files that the next open
deletes. :func:`install_layers` then replaces the whole tree below the head with the new
layers (kept ones and staged ones) in a single metadata commit (DESIGN invariant 6).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from appliance.chain import checksum as checksums
from appliance.chain import format as fmt
from appliance.chain.durable import crashpoint, create_sparse, unlink_durably, write_all
from appliance.chain.format import BLOCK_SIZE, Layer
from appliance.chain.layerfile import LayerFile, punch_hole
from appliance.errors import Corruption, FailedPrecondition, InvalidArgument, from_os_error

if TYPE_CHECKING:
    from appliance.chain.replica import Replica

COPY_STEP = 4 << 20


@dataclass(frozen=True)
class LayerSpec:
    """A snapshot layer as the source replica has it."""

    name: str
    parent: str | None
    size: int
    created: str | None = None
    user_created: bool = True
    labels: Mapping[str, str] = field(default_factory=dict)
    removed: bool = False
    checksum: str | None = None


class StagedLayer:
    """A layer file being built: written and punched freely, not yet in the chain."""

    def __init__(self, replica: Replica, layer: LayerFile) -> None:
        self.replica = replica
        self.layer = layer

    @property
    def id(self) -> int:
        return self.layer.id

    def write(self, data: bytes | memoryview, offset: int) -> None:
        try:
            write_all(self.layer.fd, data, offset)
        except OSError as exc:
            raise from_os_error(exc, f"rebuild of replica {self.replica.path}") from exc

    def punch(self, offset: int, length: int) -> None:
        punch_hole(self.layer.fd, offset, length)

    def checksum(self) -> checksums.LayerChecksum:
        return checksums.compute(self.layer)

    def discard(self) -> None:
        if self.layer.fd >= 0:
            self.layer.close()
            unlink_durably(self.replica._dir_fd, fmt.layer_file_name(self.layer.id))


def stage_layer(replica: Replica, size: int, *, copy_of: str | None = None) -> StagedLayer:
    """A new empty staged layer of *size* bytes, or a local copy of this replica's layer
    *copy_of* (so that only the chunks that differ need to come over the network)."""
    fmt.check_size(size, "layer size")
    with replica._access.exclusive():
        meta = replica.meta
        layer_id = meta.next_layer_id
        replica._commit(meta.evolve(next_layer_id=layer_id + 1))  # the id is never reused
        source = None
        if copy_of is not None:
            layer = replica._layer(copy_of, removed_ok=True)
            source = replica._files[layer.id]
    try:
        fd = create_sparse(replica._dir_fd, fmt.layer_file_name(layer_id), size)
    except OSError as exc:
        raise from_os_error(exc, f"rebuild of replica {replica.path}") from exc
    staged = StagedLayer(replica, LayerFile(layer_id, fd, size))
    if source is not None:
        try:
            _copy_local(source, staged, min(size, source.size))
        except BaseException:
            staged.discard()
            raise
    return staged


def _copy_local(source: LayerFile, staged: StagedLayer, end: int) -> None:
    for first, last in source.block_runs(0, -(-end // BLOCK_SIZE)):
        for start in range(first * BLOCK_SIZE, last * BLOCK_SIZE, COPY_STEP):
            length = min(COPY_STEP, last * BLOCK_SIZE - start)
            data = os.pread(source.fd, length, start)
            if len(data) != length:
                raise Corruption(f"layer {source.id}: short read at {start}")
            staged.write(data, start)


def install_layers(replica: Replica, specs: list[LayerSpec],
                   sources: Mapping[str, int | StagedLayer], head_parent: str,
                   size: int) -> None:
    """Make the tree below the head exactly *specs* (parents before children): each layer
    is either a kept layer of this replica (its id) or a staged layer, and the head's
    parent becomes *head_parent*. Layers not used are deleted; the volume grows to *size*
    if it is larger. One metadata commit: a crash leaves the old or the new tree."""
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names) or set(names) != set(sources) or head_parent not in names:
        raise InvalidArgument("the layers to install do not match their sources")
    staged = [s for s in sources.values() if isinstance(s, StagedLayer)]
    for layer in staged:  # durable data and checksum files before the switch
        os.fdatasync(layer.layer.fd)
        spec = next(x for x in specs if sources[x.name] is layer)
        if spec.checksum is not None:
            checksums.store(replica._dir_fd, layer.id, layer.checksum())
    with replica._access.exclusive():
        meta = replica.meta
        id_of = {spec.name: s if isinstance(s, int) else s.id for spec, s in
                 ((spec, sources[spec.name]) for spec in specs)}
        layers = [Layer(id=id_of[spec.name], parent=id_of[spec.parent] if spec.parent else None,
                        size=spec.size, name=spec.name, created=spec.created,
                        user_created=spec.user_created, labels=dict(spec.labels),
                        removed=spec.removed, checksum=spec.checksum) for spec in specs]
        if size < meta.size:
            raise FailedPrecondition(f"replica {replica.path} is larger than the source")
        head_file = replica._files[meta.head]
        if size > meta.size:
            os.ftruncate(head_file.fd, size)
            os.fsync(head_file.fd)
            head_file.size = size
        head = replace(meta.layers[meta.head], parent=id_of[head_parent], size=size)
        used = set(id_of.values()) | {meta.head}
        dropped = tuple(layer_id for layer_id in meta.layers if layer_id not in used)
        new = meta.evolve(layers={layer.id: layer for layer in [*layers, head]}, size=size)
        replica._commit(new)
        crashpoint("rebuild:installed")
        for layer in staged:
            replica._files[layer.id] = layer.layer
        for layer_id in dropped:
            replica._close_layer(layer_id)
            unlink_durably(replica._dir_fd, fmt.layer_file_name(layer_id),
                           fmt.checksum_file_name(layer_id))
        replica._epoch += 1
        replica._reset_view()

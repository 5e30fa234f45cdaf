"""Building layers outside the chain and installing them in one step (for rebuilds).

A rebuild makes a replica's snapshot layers equal to another replica's while the head keeps
taking live writes. Layers that differ are built as *staged* layers: files with ids reserved
in the metadata but not part of the tree, so a crash leaves only files that the next open
deletes. :func:`install_layers` then replaces the whole tree below the head with the new
layers (kept ones and staged ones) in a single metadata commit (DESIGN invariant 6).

Both work on the replica's :class:`~appliance.chain.openchain.OpenChain`; code outside this
package calls them as :meth:`Replica.stage_layer <appliance.chain.replica.Replica.stage_layer>`
and :meth:`Replica.install_layers <appliance.chain.replica.Replica.install_layers>`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from appliance.chain import checksum as checksums
from appliance.chain import format as fmt
from appliance.chain.durable import crashpoint, create_sparse, unlink_durably, write_all
from appliance.chain.format import BLOCK_SIZE, Layer
from appliance.chain.layerfile import LayerFile, punch_hole
from appliance.chain.openchain import OpenChain
from appliance.errors import Corruption, FailedPrecondition, InvalidArgument, from_os_error

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

    def __init__(self, chain: OpenChain, layer: LayerFile) -> None:
        self._chain = chain
        self.layer = layer

    @property
    def id(self) -> int:
        return self.layer.id

    def write(self, data: bytes | memoryview, offset: int) -> None:
        try:
            write_all(self.layer.fd, data, offset)
        except OSError as exc:
            raise from_os_error(exc, f"rebuild of replica {self._chain.path}") from exc

    def punch(self, offset: int, length: int) -> None:
        punch_hole(self.layer.fd, offset, length)

    def checksum(self) -> checksums.LayerChecksum:
        return checksums.compute(self.layer)

    def discard(self) -> None:
        if self.layer.fd >= 0:
            self.layer.close()
            unlink_durably(self._chain.dir_fd, fmt.layer_file_name(self.layer.id))


def stage_layer(chain: OpenChain, size: int, *, copy_of: str | None = None) -> StagedLayer:
    """A new empty staged layer of *size* bytes, or a local copy of this replica's layer
    *copy_of* (so that only the chunks that differ need to come over the network)."""
    fmt.check_size(size, "layer size")
    with chain.access.exclusive():
        meta = chain.meta
        layer_id = meta.next_layer_id
        chain.commit(meta.evolve(next_layer_id=layer_id + 1))  # the id is never reused
        source = None
        if copy_of is not None:
            layer = chain.layer(copy_of, removed_ok=True)
            source = chain.files[layer.id]
    try:
        fd = create_sparse(chain.dir_fd, fmt.layer_file_name(layer_id), size)
    except OSError as exc:
        raise from_os_error(exc, f"rebuild of replica {chain.path}") from exc
    staged = StagedLayer(chain, LayerFile(layer_id, fd, size))
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


def install_layers(chain: OpenChain, specs: list[LayerSpec],
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
            checksums.store(chain.dir_fd, layer.id, layer.checksum())
    with chain.access.exclusive():
        meta = chain.meta
        id_of = {spec.name: s if isinstance(s, int) else s.id for spec, s in
                 ((spec, sources[spec.name]) for spec in specs)}
        layers = [Layer(id=id_of[spec.name], parent=id_of[spec.parent] if spec.parent else None,
                        size=spec.size, name=spec.name, created=spec.created,
                        user_created=spec.user_created, labels=dict(spec.labels),
                        removed=spec.removed, checksum=spec.checksum) for spec in specs]
        if size < meta.size:
            raise FailedPrecondition(f"replica {chain.path} is larger than the source")
        head_file = chain.files[meta.head]
        if size > meta.size:
            os.ftruncate(head_file.fd, size)
            os.fsync(head_file.fd)
            head_file.size = size
        head = replace(meta.layers[meta.head], parent=id_of[head_parent], size=size)
        used = set(id_of.values()) | {meta.head}
        dropped = tuple(layer_id for layer_id in meta.layers if layer_id not in used)
        new = meta.evolve(layers={layer.id: layer for layer in [*layers, head]}, size=size)
        chain.commit(new)
        crashpoint("rebuild:installed")
        for layer in staged:
            chain.add_layer(layer.layer)
        for layer_id in dropped:
            chain.close_layer(layer_id)
            unlink_durably(chain.dir_fd, fmt.layer_file_name(layer_id),
                           fmt.checksum_file_name(layer_id))
        chain.reset_view()  # snapshot readers reopen: the tree changed

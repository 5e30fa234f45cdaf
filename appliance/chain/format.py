"""The replica directory format: constants, metadata records and their JSON encoding.

``docs/replica-format.md`` is the specification; this module is its executable form. The
metadata is decoded strictly: every field is checked for type and range, so that damaged or
hand-edited metadata is refused with a message naming the field instead of being half-used.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from appliance.errors import Corruption, InvalidArgument

FORMAT_NAME = "appliance-replica"
FORMAT_VERSION = 1
BLOCK_SIZE = 4096
METADATA_FILE = "replica.json"
STATE_FILE = "state"
VOLUME_FILE = "volume.json"
MAX_VOLUME_RECORD = 64 << 10
LAYER_SUFFIX = ".img"
CHECKSUM_SUFFIX = ".sum"
TEMP_SUFFIX = ".tmp"
LAYER_FILE = re.compile(r"layer-(?P<id>[0-9]{6,})\.(?P<kind>img|sum)")

#: Snapshots per replica (every branch counted). Each layer holds an open file descriptor, is
#: scanned when the replica opens and has an entry in the metadata rewritten by every change;
#: 1023 snapshots keep all three small while allowing an hourly snapshot for six weeks.
MAX_SNAPSHOTS = 1023
#: Largest volume: the in-memory index takes 1-2 bytes per 4 KiB block of *written* data
#: (pages of the index that cover never-written regions are never touched), so 16 TiB costs
#: at most 4-8 GiB of memory when completely written.
MAX_SIZE = 16 << 40
MAX_NAME_LENGTH = 128
MAX_LABELS = 64
MAX_LABEL_VALUE_LENGTH = 256

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")


def layer_file_name(layer_id: int) -> str:
    return f"layer-{layer_id:06d}{LAYER_SUFFIX}"


def checksum_file_name(layer_id: int) -> str:
    return f"layer-{layer_id:06d}{CHECKSUM_SUFFIX}"


def block_span(offset: int, length: int) -> tuple[int, int]:
    """The blocks ``[first, last)`` that bytes ``[offset, offset+length)`` touch."""
    return offset // BLOCK_SIZE, -(-(offset + length) // BLOCK_SIZE)


def split_blocks(offset: int, end: int) -> tuple[list[tuple[int, int]], int, int]:
    """Split bytes ``[offset, end)`` into partial-block pieces and whole blocks
    ``[first, last)`` (none when ``first >= last``)."""
    first = -(-offset // BLOCK_SIZE)
    last = end // BLOCK_SIZE
    if first > last:  # inside one block
        return [(offset, end)], 0, 0
    pieces = [(offset, first * BLOCK_SIZE), (last * BLOCK_SIZE, end)]
    return [(a, b) for a, b in pieces if a < b], first, last


def check_name(name: str, what: str = "snapshot name") -> str:
    """Return *name* if it is a valid snapshot name, else raise :class:`InvalidArgument`.

    Names start with a letter or digit and continue with letters, digits, ``.``, ``_`` or
    ``-``: safe as file names, URL path segments and command-line arguments.
    """
    if not name:
        raise InvalidArgument(f"invalid {what}: it is empty")
    if len(name.encode()) > MAX_NAME_LENGTH:
        raise InvalidArgument(f"invalid {what} {name[:40]!r}...: longer than "
                              f"{MAX_NAME_LENGTH} bytes")
    if not _NAME.fullmatch(name):
        raise InvalidArgument(f"invalid {what} {name!r}: use letters, digits, '.', '_' and '-', "
                              "starting with a letter or digit")
    return name


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"too many labels: at most {MAX_LABELS}")
    for key, value in labels.items():
        if not isinstance(key, str) or not _LABEL_KEY.fullmatch(key):
            raise InvalidArgument(f"invalid label key {key!r}: use letters, digits, '.', '_', "
                                  "'/' and '-', at most 63 characters")
        if not isinstance(value, str) or len(value) > MAX_LABEL_VALUE_LENGTH \
                or not value.isprintable():
            raise InvalidArgument(f"invalid value for label {key!r}: printable text of at most "
                                  f"{MAX_LABEL_VALUE_LENGTH} characters")
    return dict(labels)


def check_size(size: int, what: str = "size") -> int:
    if size <= 0:
        raise InvalidArgument(f"invalid {what} {size}: must be positive")
    if size % BLOCK_SIZE:
        raise InvalidArgument(f"invalid {what} {size}: must be a multiple of {BLOCK_SIZE} bytes")
    if size > MAX_SIZE:
        raise InvalidArgument(f"invalid {what} {size}: larger than the limit of {MAX_SIZE} bytes")
    return size


@dataclass(frozen=True)
class Layer:
    """One layer of the chain: a snapshot (immutable) or the head (writable)."""

    id: int
    parent: int | None
    size: int
    name: str | None = None
    created: str | None = None
    user_created: bool = True
    labels: Mapping[str, str] = field(default_factory=dict)
    removed: bool = False
    checksum: str | None = None

    @property
    def is_head(self) -> bool:
        return self.name is None


@dataclass(frozen=True)
class PendingCoalesce:
    """A coalesce of removed layer ``parent`` and its only child ``child`` that has started.

    ``into`` is the id of the layer whose file receives the other's blocks and which stands
    for the merged layer once the operation completes.
    """

    parent: int
    child: int
    into: int


@dataclass(frozen=True)
class Metadata:
    replica_id: str
    size: int
    head: int
    layers: Mapping[int, Layer]
    next_layer_id: int
    serial: int = 0
    pending: PendingCoalesce | None = None
    version: int = FORMAT_VERSION
    block_size: int = BLOCK_SIZE

    # -- queries -------------------------------------------------------------------------

    def ancestry(self, layer_id: int) -> list[Layer]:
        """The layers from the root down to *layer_id*, inclusive."""
        chain: list[Layer] = []
        current: int | None = layer_id
        while current is not None:
            layer = self.layers[current]
            chain.append(layer)
            current = layer.parent
        chain.reverse()
        return chain

    def children(self, layer_id: int) -> list[Layer]:
        return [layer for layer in self.layers.values() if layer.parent == layer_id]

    def snapshot(self, name: str) -> Layer | None:
        for layer in self.layers.values():
            if layer.name == name:
                return layer
        return None

    def snapshots(self) -> list[Layer]:
        return sorted((x for x in self.layers.values() if not x.is_head), key=lambda x: x.id)

    # -- changes (each returns a new Metadata with ``serial`` advanced) --------------------

    def evolve(self, **changes: Any) -> Metadata:
        return replace(self, serial=self.serial + 1, **changes)

    def with_layers(self, *updated: Layer, drop: tuple[int, ...] = (), **changes: Any) -> Metadata:
        layers = dict(self.layers)
        for layer_id in drop:
            del layers[layer_id]
        for layer in updated:
            layers[layer.id] = layer
        return self.evolve(layers=layers, **changes)


# -- encoding ------------------------------------------------------------------------------


def _canonical(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def encode(meta: Metadata) -> bytes:
    """Serialize *meta*; the ``digest`` field is sha256 of the canonical rest of the object."""
    document: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": meta.version,
        "replica_id": meta.replica_id,
        "block_size": meta.block_size,
        "size": meta.size,
        "head": meta.head,
        "next_layer_id": meta.next_layer_id,
        "serial": meta.serial,
        "pending": None if meta.pending is None else {
            "op": "coalesce", "parent": meta.pending.parent, "child": meta.pending.child,
            "into": meta.pending.into},
        "layers": [_encode_layer(layer) for layer in sorted(meta.layers.values(),
                                                            key=lambda x: x.id)],
    }
    document["digest"] = "sha256:" + hashlib.sha256(_canonical(document)).hexdigest()
    return json.dumps(document, sort_keys=True, indent=1).encode() + b"\n"


def _encode_layer(layer: Layer) -> dict[str, Any]:
    return {
        "id": layer.id, "parent": layer.parent, "size": layer.size, "name": layer.name,
        "created": layer.created, "user_created": layer.user_created,
        "labels": dict(layer.labels), "removed": layer.removed, "checksum": layer.checksum,
    }


class _Reader:
    """Typed field access that names the offending field in its errors."""

    def __init__(self, document: Any, where: str) -> None:
        if not isinstance(document, dict):
            raise Corruption(f"{where}: expected an object")
        self.document = document
        self.where = where

    def get(self, key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
        if key not in self.document:
            raise Corruption(f"{self.where}: field {key!r} is missing")
        value = self.document[key]
        if value is None and optional:
            return None
        if isinstance(value, bool) and kind is int:
            raise Corruption(f"{self.where}: field {key!r} must be an integer")
        if not isinstance(value, kind):
            raise Corruption(f"{self.where}: field {key!r} has the wrong type")
        return value

    def only(self, *keys: str) -> None:
        unknown = sorted(set(self.document) - set(keys))
        if unknown:
            raise Corruption(f"{self.where}: unknown field {unknown[0]!r}")

    def count(self, key: str, *, optional: bool = False) -> Any:
        value = self.get(key, int, optional=optional)
        if value is not None and value < 0:
            raise Corruption(f"{self.where}: field {key!r} is negative")
        return value


def decode(data: bytes, where: str = METADATA_FILE) -> Metadata:
    """Parse and validate metadata; raise :class:`Corruption` naming the first problem."""
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Corruption(f"{where}: not valid JSON ({exc})") from exc
    top = _Reader(document, where)
    top.only("format", "version", "replica_id", "block_size", "size", "head", "next_layer_id",
             "serial", "pending", "layers", "digest")
    if top.get("format", str) != FORMAT_NAME:
        raise Corruption(f"{where}: not an appliance replica (format {document['format']!r})")
    version = top.count("version")
    if version != FORMAT_VERSION:
        raise Corruption(f"{where}: format version {version} is not supported "
                         f"(this program reads version {FORMAT_VERSION})")
    digest = top.get("digest", str)
    rest = {key: value for key, value in document.items() if key != "digest"}
    if digest != "sha256:" + hashlib.sha256(_canonical(rest)).hexdigest():
        raise Corruption(f"{where}: digest mismatch, the metadata is damaged")
    if top.count("block_size") != BLOCK_SIZE:
        raise Corruption(f"{where}: block size {document['block_size']} is not supported")
    layers: dict[int, Layer] = {}
    for position, item in enumerate(top.get("layers", list)):
        layer = _decode_layer(_Reader(item, f"{where}: layers[{position}]"))
        if layer.id in layers:
            raise Corruption(f"{where}: layer id {layer.id} appears twice")
        layers[layer.id] = layer
    pending = None
    if top.get("pending", dict, optional=True) is not None:
        entry = _Reader(document["pending"], f"{where}: pending")
        entry.only("op", "parent", "child", "into")
        if entry.get("op", str) != "coalesce":
            raise Corruption(f"{where}: unknown pending operation {document['pending']['op']!r}")
        pending = PendingCoalesce(entry.count("parent"), entry.count("child"),
                                  entry.count("into"))
    meta = Metadata(
        replica_id=top.get("replica_id", str), size=top.count("size"), head=top.count("head"),
        layers=layers, next_layer_id=top.count("next_layer_id"), serial=top.count("serial"),
        pending=pending, version=version)
    validate(meta, where)
    return meta


def _decode_layer(entry: _Reader) -> Layer:
    entry.only("id", "parent", "size", "name", "created", "user_created", "labels", "removed",
               "checksum")
    labels = entry.get("labels", dict)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise Corruption(f"{entry.where}: labels must map text to text")
    return Layer(
        id=entry.count("id"), parent=entry.count("parent", optional=True),
        size=entry.count("size"), name=entry.get("name", str, optional=True),
        created=entry.get("created", str, optional=True),
        user_created=entry.get("user_created", bool), labels=labels,
        removed=entry.get("removed", bool), checksum=entry.get("checksum", str, optional=True))


def validate(meta: Metadata, where: str = METADATA_FILE) -> None:
    """Check the structural rules of the format (docs/replica-format.md, "Metadata")."""
    if meta.size <= 0 or meta.size % BLOCK_SIZE or meta.size > MAX_SIZE:
        raise Corruption(f"{where}: invalid volume size {meta.size}")
    if meta.head not in meta.layers:
        raise Corruption(f"{where}: the head layer {meta.head} is not listed")
    names: set[str] = set()
    for layer in meta.layers.values():
        _check_layer(meta, layer, f"{where}: layer {layer.id}")
        if layer.name is not None:
            if layer.name in names:
                raise Corruption(f"{where}: snapshot name {layer.name!r} is used twice")
            names.add(layer.name)
    _check_acyclic(meta, where)
    if meta.pending is not None:
        _check_pending(meta, meta.pending, where)


def _check_layer(meta: Metadata, layer: Layer, what: str) -> None:
    if layer.id >= meta.next_layer_id:
        raise Corruption(f"{what}: id is not below next_layer_id {meta.next_layer_id}")
    if layer.size <= 0 or layer.size % BLOCK_SIZE or layer.size > meta.size:
        raise Corruption(f"{what}: invalid size {layer.size}")
    if layer.parent is not None:
        parent = meta.layers.get(layer.parent)
        if parent is None:
            raise Corruption(f"{what}: parent {layer.parent} does not exist")
        if parent.is_head:
            raise Corruption(f"{what}: parent {layer.parent} is the head")
        if parent.size > layer.size:
            raise Corruption(f"{what}: smaller than its parent")
    if layer.id == meta.head:
        if layer.name is not None or layer.removed or layer.size != meta.size:
            raise Corruption(f"{what}: the head must be unnamed, live and of the volume size")
        return
    if layer.name is None:
        raise Corruption(f"{what}: a snapshot without a name (only the head has none)")
    try:
        check_name(layer.name)
    except InvalidArgument as exc:
        raise Corruption(f"{what}: {exc}") from exc


def _check_acyclic(meta: Metadata, where: str) -> None:
    settled: set[int] = set()
    for start in meta.layers:
        path: set[int] = set()
        current: int | None = start
        while current is not None and current not in settled:
            if current in path:
                raise Corruption(f"{where}: the parent links of layer {start} form a cycle")
            path.add(current)
            current = meta.layers[current].parent
        settled |= path


def _check_pending(meta: Metadata, pending: PendingCoalesce, where: str) -> None:
    parent = meta.layers.get(pending.parent)
    child = meta.layers.get(pending.child)
    if parent is None or child is None or child.parent != parent.id or not parent.removed \
            or child.is_head or pending.into not in (parent.id, child.id):
        raise Corruption(f"{where}: the pending coalesce does not match the layers")

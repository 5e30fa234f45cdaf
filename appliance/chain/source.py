"""Reading a replica's layers the same way whether the replica is a directory here or is
served by a replica server (a reader connection has the same three methods): what clones,
backups and rebuild-like copies build on."""

from __future__ import annotations

from typing import Any, Protocol

from appliance.chain.format import BLOCK_SIZE
from appliance.chain.replica import Replica
from appliance.errors import NotFound


class LayerSource(Protocol):
    """Where a snapshot's layers are read from: a replica server (a reader connection) or
    a replica directory (:class:`LocalSource`)."""

    def layers(self) -> list[dict[str, Any]]: ...

    def layer_extents(self, name: str) -> list[tuple[int, int]]:
        """Runs of blocks ``(first, end)`` the layer itself holds."""

    def read_layer(self, name: str, buf: memoryview, offset: int) -> None: ...


class LocalSource:
    def __init__(self, replica: Replica) -> None:
        self.replica = replica

    def layers(self) -> list[dict[str, Any]]:
        return [layer.as_dict() for layer in self.replica.layers()]

    def layer_extents(self, name: str) -> list[tuple[int, int]]:
        return [(e.offset // BLOCK_SIZE, (e.offset + e.length) // BLOCK_SIZE)
                for e in self.replica.layer_extents(name)]

    def read_layer(self, name: str, buf: memoryview, offset: int) -> None:
        self.replica.read_layer(name, buf, offset)


def ancestry(layer_list: list[dict[str, Any]], snapshot: str) -> list[dict[str, Any]]:
    """The layers whose data make up *snapshot*, root first."""
    by_name = {layer["name"]: layer for layer in layer_list if not layer["head"]}
    layer = by_name.get(snapshot)
    if layer is None or layer["removed"]:
        raise NotFound(f"snapshot {snapshot!r} does not exist")
    chain = []
    while layer is not None:
        chain.append(layer)
        layer = by_name.get(layer["parent"]) if layer["parent"] else None
    return list(reversed(chain))

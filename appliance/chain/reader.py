"""Reading a snapshot's content, and extents of a chain."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.chain.format import BLOCK_SIZE, block_span
from appliance.chain.index import ChainView
from appliance.chain.openchain import OpenChain
from appliance.errors import FailedPrecondition, InvalidArgument, from_os_error


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    allocated: bool


def chain_extents(chain: ChainView, offset: int, length: int | None) -> list[Extent]:
    length = chain.size - offset if length is None else length
    if offset < 0 or length < 0 or offset + length > chain.size:
        raise InvalidArgument(f"range offset {offset} length {length} is outside "
                              f"{chain.size} bytes")
    first, last = block_span(offset, length)
    result = []
    for start, stop, allocated in chain.extents(first, last):
        a, b = max(offset, start * BLOCK_SIZE), min(offset + length, stop * BLOCK_SIZE)
        result.append(Extent(a, b - a, allocated))
    return result


class SnapshotReader:
    """Reads one snapshot through its own index (see :meth:`Replica.open_snapshot`)."""

    def __init__(self, open_chain: OpenChain, name: str, chain: ChainView, epoch: int) -> None:
        self.name = name
        self.size = chain.size
        self._open_chain = open_chain
        self._chain = chain
        self._epoch = epoch

    def _check(self) -> None:
        if self._epoch != self._open_chain.epoch:
            raise FailedPrecondition(f"snapshot {self.name!r}: the chain changed while it "
                                     "was read; open it again")

    def readinto(self, buf: memoryview | bytearray, offset: int) -> None:
        view = memoryview(buf).cast("B")
        self._open_chain.check_io(offset, len(view), self.size)
        with self._open_chain.access.shared():
            self._check()
            if len(view):
                try:
                    self._chain.readinto(view, offset)
                except OSError as exc:
                    raise from_os_error(exc, f"read of snapshot {self.name!r}") from exc

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(buf, offset)
        return bytes(buf)

    def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        with self._open_chain.access.shared():
            self._check()
            return chain_extents(self._chain, offset, length)

    def __enter__(self) -> SnapshotReader:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

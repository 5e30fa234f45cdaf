"""The data operations of the replica protocol applied to a replica: the one meaning of
WRITE, WRITE_ZEROES, ZERO_EXACT and UNMAP, shared by the replica server and by an engine that
serves a lent replica in its own process (docs/local-fast-path.md)."""

from __future__ import annotations

from appliance.chain import Replica
from appliance.replication import protocol as proto
from appliance.replication.protocol import FLAG_FUA


def write(replica: Replica, offset: int, flags: int, payload: bytes | memoryview) -> None:
    replica.write(payload, offset)
    if flags & FLAG_FUA:
        replica.flush()


def write_zeroes(replica: Replica, offset: int, length: int, flags: int) -> bytes:
    """Zero the range; return the block runs written as explicit zeros (encoded)."""
    explicit = replica.write_zeroes(offset, length)
    if flags & FLAG_FUA:
        replica.flush()
    return proto.encode_runs(explicit)


def zero_exact(replica: Replica, first: int, count: int, flags: int,
               payload: bytes | memoryview) -> None:
    """Zero blocks [*first*, *first* + *count*), as explicit zeros where *payload* says."""
    replica.zero_exact(first, first + count, proto.decode_runs(payload))
    if flags & FLAG_FUA:
        replica.flush()


def unmap(replica: Replica, offset: int, length: int) -> None:
    replica.unmap(offset, length)

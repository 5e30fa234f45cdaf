"""The witness: the cluster's own record of a volume's member set, which an engine of a
clustered volume must update before it serves without a member (docs/membership.md, "The
witness").

The membership records on the replicas tell a starting engine which replicas hold every
acknowledged write, but only the reachable ones speak: behind a partition, an engine that
lost the other replicas could go on alone with the one beside it, while a new engine on the
other side, which cannot reach that one, could not know whether it did. The witness breaks
that tie. It is a small record in the cluster store (etcd), kept by the node daemons:

* ``members``: replica ids, each of which holds every write acknowledged since the record
  was written; ``generation``: the engine generation that wrote it; ``revision``: the
  store's revision of the record (0: none yet), for compare-and-swap.

The rules an engine keeps (the :class:`~appliance.replication.roster.Roster` enforces them):

* it serves without a member only after the witness durably names the smaller set
  (compare-and-swap on the revision it last saw); when the witness refuses (another engine
  wrote since) or cannot be reached in time, the engine is **fenced**: it acknowledges
  nothing more, every later request fails;
* a member is added (a rebuilt replica promoted) only once the witness names it; when that
  fails, the replica stays write-only, the engine keeps serving;
* a starting engine reads the witness first, may leave out unreachable members when a
  reachable replica is named by the witness (it holds every acknowledged write), and claims
  the record with its new generation before it takes over any replica.

So a write is acknowledged only by replicas the witness names, or by a set the witness
named before the write: after a new engine claims the record, the old engine can neither
shrink its set nor reach the replicas the new one took over.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Witnessed:
    """What the witness holds for a volume."""

    revision: int  # the store's revision of the record; 0 when there is none
    generation: int = 0
    members: frozenset[str] = frozenset()


class Witness(Protocol):
    """The witness of one volume, as an engine reaches it."""

    def read(self) -> Witnessed:
        """The record (revision 0 when there is none); raises
        :class:`~appliance.errors.Unavailable` when it cannot be read in time."""

    def record(self, revision: int, generation: int, members: Iterable[str]) -> int:
        """Replace the record last seen at *revision* (0: none) and return the new revision.
        Raises :class:`~appliance.errors.Conflict` when it changed since, and
        :class:`~appliance.errors.Unavailable` when it cannot be written in time."""

"""Which replicas hold the volume's newest state: the membership record, and the decision
made when an engine starts (DESIGN invariants 3 and 7).

The engine keeps a **membership record** in every replica it writes to (the replica's
volume record):

    {"volume": NAME, "epoch": N, "members": [replica ids], "clean": BOOL}

``members`` are the replicas in RW mode; ``epoch`` rises with every change of that set. When
a replica leaves RW mode, the engine writes the new record to the remaining ones **before**
acknowledging anything else: a replica missing from the newest record may lack acknowledged
writes, and one listed in it has all of them. ``clean`` is false while an engine runs and
true after it stopped cleanly (every write drained and flushed): only then are members with
equal revisions known to be identical, since an engine that crashes with several writes in
flight may leave each replica with a different subset of them.

At start, :func:`decide` applies these rules to what the reachable replicas report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from appliance.errors import Corruption, FailedPrecondition, Unavailable


@dataclass(frozen=True)
class Probe:
    """What one replica reported when probed (``reachable`` False: it did not answer)."""

    name: str
    reachable: bool
    replica_id: str = ""
    size: int = 0
    revision: int = 0
    generation: int = 0
    record: dict[str, Any] | None = None
    snapshots: tuple[str, ...] = ()
    error: str = ""

    @property
    def epoch(self) -> int:
        return int(self.record.get("epoch", 0)) if self.record else 0

    @property
    def pristine(self) -> bool:
        return self.revision == 0 and not self.snapshots and self.record is None


@dataclass(frozen=True)
class Decision:
    rw: list[Probe]
    stale: list[Probe] = field(default_factory=list)
    unreachable: list[Probe] = field(default_factory=list)
    epoch: int = 0
    generation: int = 1
    salvaged: bool = False


def decide(volume: str, probes: list[Probe], *, salvage: bool = False) -> Decision:
    """Choose the replicas that serve (RW), those to rebuild, and the next generation.

    Raises :class:`FailedPrecondition` when a member of the newest record is unreachable
    (it may hold the newest writes) unless *salvage* accepts the best reachable replica,
    and :class:`Unavailable` when no replica answers."""
    reachable = [p for p in probes if p.reachable]
    unreachable = [p for p in probes if not p.reachable]
    if not reachable:
        raise Unavailable(f"volume {volume}: no replica is reachable ("
                          + "; ".join(f"{p.name}: {p.error}" for p in unreachable) + ")")
    for probe in reachable:
        owner = probe.record.get("volume") if probe.record else None
        if owner not in (None, volume):
            raise FailedPrecondition(f"replica {probe.name} belongs to volume {owner!r}, "
                                     f"not {volume!r}")
    epoch = max(p.epoch for p in reachable)
    candidates, salvaged = _candidates(volume, reachable, epoch, salvage=salvage)
    best = max(candidates, key=lambda p: (p.epoch, p.revision))
    clean = epoch > 0 and all(p.record and p.record.get("clean") for p in candidates)
    if all(p.pristine for p in candidates):
        rw = candidates  # a new volume: empty replicas are equal
    elif clean:
        rw = [p for p in candidates if p.revision == best.revision and
              p.snapshots == best.snapshots and p.size == best.size]
    else:
        rw = [best]  # after an unclean stop only one replica is trusted; the rest resync
    stale = [p for p in reachable if p not in rw]
    generation = max(p.generation for p in reachable) + 1
    return Decision(rw, stale, unreachable, epoch, generation, salvaged)


def _candidates(volume: str, reachable: list[Probe], epoch: int, *,
                salvage: bool) -> tuple[list[Probe], bool]:
    if epoch == 0:
        return reachable, False
    newest = {tuple(sorted(p.record["members"])) for p in reachable
              if p.record and p.epoch == epoch}
    if len(newest) != 1:
        raise Corruption(f"volume {volume}: replicas disagree on the members of epoch {epoch}")
    members = set(next(iter(newest)))
    candidates = [p for p in reachable if p.replica_id in members]
    missing = sorted(members - {p.replica_id for p in reachable})
    if missing and not salvage:
        raise FailedPrecondition(
            f"volume {volume}: replica(s) {', '.join(missing)} of the newest membership "
            f"(epoch {epoch}) cannot be reached and may hold the newest writes; start with "
            "them, or with --salvage to accept the best reachable replica")
    if not candidates:
        return reachable, True
    return candidates, bool(missing)


def record(volume: str, epoch: int, members: list[str], *, clean: bool) -> dict[str, Any]:
    return {"volume": volume, "epoch": epoch, "members": sorted(members), "clean": clean}

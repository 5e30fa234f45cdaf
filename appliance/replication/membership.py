"""Which replicas hold every acknowledged write: the membership record each replica keeps,
its history of branches, and the decision an engine makes when it starts (DESIGN invariants
3 and 7). docs/membership.md states the rules and the reasoning; this module is pure.

Every replica an engine writes to keeps a **record** (its ``volume.json``)::

    {"volume": NAME, "epoch": N, "members": [replica ids], "clean": BOOL,
     "history": [{"id", "began", "generation", "cause"}, ...], "salvage": {...} or null}

* ``members`` are the replicas in RW mode. A write is acknowledged only while the record
  naming exactly the RW replicas is durable on each of them, so **every member of the newest
  record holds every acknowledged write**. ``epoch`` rises with every record.
* ``history`` is the lineage of **branches** (as DRBD's generation identifiers): a new branch
  begins whenever the replicas that go on taking writes are fewer than the members of the
  record before (a replica failed or was removed, a start left a member behind, a salvage).
  A replica whose current branch is in another's history stopped taking writes before the
  other did: it is **behind**. Two replicas neither of which is behind the other
  **diverged**: each may hold acknowledged writes the other lacks, and only an operator may
  choose between them.
* ``clean`` is true only after an engine stopped cleanly (every write drained and flushed):
  only then are members with equal revisions known to be identical.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from appliance.errors import Corruption, Diverged, FailedPrecondition, InvalidArgument, Unavailable

#: branches kept in a record's history (the oldest are dropped)
MAX_HISTORY = 100
#: the branch that stands for the history of a record written before histories existed
LEGACY = "legacy"


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_branch_id() -> str:
    return os.urandom(8).hex()


@dataclass(frozen=True)
class Branch:
    """One stretch of a volume's history: writes taken by one unchanged-or-growing set of
    replicas. ``cause`` says why it began."""

    id: str
    began: str
    generation: int
    cause: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "began": self.began, "generation": self.generation,
                "cause": self.cause}

    @classmethod
    def from_dict(cls, value: Any) -> Branch:
        if not isinstance(value, Mapping) or not isinstance(value.get("id"), str):
            raise Corruption(f"malformed history entry in a volume record: {value!r}")
        return cls(value["id"], str(value.get("began", "")), int(value.get("generation", 0)),
                   str(value.get("cause", "")))

    def describe(self) -> str:
        return f"branch {self.id[:8]} (began {self.began}, generation {self.generation}: " \
               f"{self.cause})"


@dataclass(frozen=True)
class Record:
    """A replica's membership record (see the module)."""

    volume: str
    epoch: int
    members: tuple[str, ...]
    clean: bool
    history: tuple[Branch, ...]
    salvage: Mapping[str, Any] | None = None
    addresses: Mapping[str, str] = field(default_factory=dict)  # member id -> HOST:PORT

    @property
    def branch(self) -> str:
        return self.history[-1].id if self.history else ""

    @property
    def lineage(self) -> tuple[str, ...]:
        return tuple(b.id for b in self.history)

    def to_dict(self) -> dict[str, Any]:
        return {"volume": self.volume, "epoch": self.epoch, "members": sorted(self.members),
                "clean": self.clean, "history": [b.to_dict() for b in self.history],
                "salvage": dict(self.salvage) if self.salvage else None,
                "addresses": dict(self.addresses)}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> Record:
        try:
            members = value["members"]
            if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
                raise TypeError("members")
            if "history" in value:
                history = tuple(Branch.from_dict(b) for b in value["history"])
            else:  # written before histories existed: one branch stands for all of it
                history = (Branch(LEGACY, "", 0, "recorded before branch histories"),)
            salvage = value.get("salvage")
            addresses = value.get("addresses")
            return cls(str(value["volume"]), int(value["epoch"]), tuple(members),
                       bool(value.get("clean", False)), history,
                       salvage if isinstance(salvage, Mapping) else None,
                       {str(k): str(v) for k, v in addresses.items()}
                       if isinstance(addresses, Mapping) else {})
        except (KeyError, TypeError, ValueError) as exc:
            raise Corruption(f"malformed volume record: {exc}") from exc


def initial_record(volume: str, members: Iterable[str], cause: str, *,
                   generation: int = 0) -> dict[str, Any]:
    """The record of replicas written equal by a control operation (a clone, a restore):
    all members, clean, a history with one new branch."""
    return Record(volume, 1, tuple(members), True,
                  (Branch(new_branch_id(), now(), generation, cause),)).to_dict()


@dataclass(frozen=True)
class Probe:
    """What one replica reported when probed (``reachable`` False: it did not answer)."""

    name: str
    reachable: bool
    replica_id: str = ""
    size: int = 0
    revision: int = 0
    generation: int = 0
    record: Record | None = None
    snapshots: tuple[str, ...] = ()  # live (not removed) snapshots
    error: str = ""

    @property
    def epoch(self) -> int:
        return self.record.epoch if self.record else 0

    @property
    def lineage(self) -> tuple[str, ...]:
        return self.record.lineage if self.record else ()

    @property
    def branch(self) -> str:
        return self.record.branch if self.record else ""

    @property
    def pristine(self) -> bool:
        return self.revision == 0 and not self.snapshots and self.record is None

    def describe_branch(self) -> str:
        return self.record.history[-1].describe() if self.record and self.record.history \
            else "no recorded history"


def behind(probe: Probe, other: Probe) -> bool:
    """True when *probe* stopped taking writes before *other* did (its branch is an earlier
    branch of *other*'s history, or it has no history while *other* has one)."""
    if not probe.lineage:
        return bool(other.lineage)
    return probe.branch != other.branch and probe.branch in other.lineage


def holds_another_branch(probe: Probe, history: tuple[Branch, ...]) -> bool:
    """True when *probe*, a replica coming back to a running engine, holds a branch outside
    *history* (the engine's lineage): it went on, or a salvage gave it up while it was away,
    so it may hold acknowledged writes the volume lacks. It is kept, not rebuilt, until an
    operator discards it (docs/membership.md, "Running", rule 6)."""
    return bool(probe.lineage) and probe.branch not in {branch.id for branch in history}


@dataclass(frozen=True)
class Decision:
    """What a starting engine does with each replica."""

    rw: list[Probe]  # serve, in RW mode
    stale: list[Probe] = field(default_factory=list)  # behind: rebuilt
    diverged: list[Probe] = field(default_factory=list)  # another branch: kept, untouched
    unreachable: list[Probe] = field(default_factory=list)
    epoch: int = 0  # the newest epoch seen; the engine's first record has the next one
    generation: int = 1
    history: tuple[Branch, ...] = ()  # the lineage the engine continues (a new branch last)
    branched: bool = False
    salvage: Mapping[str, Any] | None = None  # this start's salvage, when it was one
    previous_salvage: Mapping[str, Any] | None = None  # the last one of the chosen lineage

    @property
    def salvaged(self) -> bool:
        return self.salvage is not None


@dataclass
class _Start:
    """The working state of :func:`decide`."""

    volume: str
    reachable: list[Probe]
    generation: int
    clock: Callable[[], str]
    make_id: Callable[[], str]
    given_up: list[dict[str, Any]] = field(default_factory=list)

    def branch(self, base: tuple[Branch, ...], cause: str) -> tuple[Branch, ...]:
        new = Branch(self.make_id(), self.clock(), self.generation, cause)
        return (*base, new)[-MAX_HISTORY:]


def decide(volume: str, probes: list[Probe], *, salvage: bool = False,
           salvage_from: str | None = None, clock: Callable[[], str] = now,
           make_id: Callable[[], str] = new_branch_id,
           witnessed: frozenset[str] = frozenset(), generation_floor: int = 0) -> Decision:
    """Choose the replicas that serve (RW), those to rebuild, those to keep, and the
    lineage the engine continues (docs/membership.md, "Starting").

    *witnessed*: the replica ids the volume's witness names (a clustered volume), each of
    which holds every acknowledged write: an unreachable member of the newest record is
    no obstacle when a reachable replica is one of them. The generation chosen is above
    every replica's and above *generation_floor* (the witness's).

    Raises :class:`Unavailable` when no replica answers, :class:`Diverged` when replicas
    hold diverged branches and *salvage_from* does not choose one, and
    :class:`FailedPrecondition` when a member of the newest record is unreachable (it may
    hold acknowledged writes the others lack) unless *salvage* accepts that."""
    reachable = [p for p in probes if p.reachable]
    unreachable = [p for p in probes if not p.reachable]
    if not reachable:
        raise Unavailable(f"volume {volume}: no replica is reachable ("
                          + "; ".join(f"{p.name}: {p.error}" for p in unreachable) + ")")
    for probe in reachable:
        owner = probe.record.volume if probe.record else None
        if owner not in (None, volume):
            raise FailedPrecondition(f"replica {probe.name} belongs to volume {owner!r}, "
                                     f"not {volume!r}")
    start = _Start(volume, reachable,
                   max(generation_floor, *(p.generation for p in probes)) + 1, clock, make_id)
    epoch = max(p.epoch for p in reachable)
    if salvage_from is not None:
        decision = _salvage_from(start, _chosen(volume, probes, salvage_from))
    elif all(p.pristine for p in reachable):
        decision = Decision(list(reachable), history=start.branch((), "created"),
                            branched=True)
    else:
        decision = _continue(start, salvage=salvage, witnessed=witnessed)
    return replace(decision, unreachable=unreachable, epoch=epoch,
                   generation=start.generation)


def _chosen(volume: str, probes: list[Probe], name: str) -> Probe:
    chosen = next((p for p in probes if p.name == name), None)
    if chosen is None:
        raise InvalidArgument(f"volume {volume}: {name} is not one of the replicas given")
    if not chosen.reachable:
        raise Unavailable(f"volume {volume}: cannot salvage from {name}: it is unreachable "
                          f"({chosen.error})")
    if chosen.pristine:
        raise FailedPrecondition(f"volume {volume}: cannot salvage from {name}: it holds no "
                                 "data")
    return chosen


def _heads(live: list[Probe]) -> dict[str, list[Probe]]:
    """The replicas no other one is ahead of, by branch."""
    heads: dict[str, list[Probe]] = {}
    for probe in live:
        if not any(behind(probe, other) for other in live):
            heads.setdefault(probe.branch, []).append(probe)
    return heads


def _newest(volume: str, on_branch: list[Probe]) -> Record | None:
    records = [p.record for p in on_branch if p.record is not None]
    if not records:
        return None
    top = max(r.epoch for r in records)
    newest = {tuple(sorted(r.members)) for r in records if r.epoch == top}
    if len(newest) != 1:
        raise Corruption(f"volume {volume}: replicas disagree on the members of epoch {top}")
    return next(r for r in records if r.epoch == top)


def _continue(start: _Start, *, salvage: bool,
              witnessed: frozenset[str] = frozenset()) -> Decision:
    """A start without a chosen replica: one branch, the members of its newest record
    (those the witness names, when some member cannot be reached)."""
    volume, reachable = start.volume, start.reachable
    live = [p for p in reachable if not p.pristine]
    heads = _heads(live)
    if len(heads) > 1:
        raise Diverged(_diverged_message(volume, heads))
    [(branch, _)] = heads.items()
    on_branch = [p for p in live if p.branch == branch]
    newest = _newest(volume, on_branch)
    members = set(newest.members) if newest else {p.replica_id for p in on_branch}
    candidates = [p for p in on_branch if p.replica_id in members]
    missing = sorted(members - {p.replica_id for p in reachable})
    vouched = [p for p in candidates if p.replica_id in witnessed]
    if missing and vouched:
        # Each replica the witness names holds every acknowledged write: the unreachable
        # members hold nothing more. A new branch leaves them behind.
        cause = f"started without unreachable {_where(newest, missing)}; the witness " \
                f"names {', '.join(p.name for p in vouched)}"
        best = max(vouched, key=lambda p: p.revision)
        return Decision([best], [p for p in reachable if p is not best],
                        history=start.branch(newest.history if newest else (), cause),
                        branched=True, previous_salvage=newest.salvage if newest else None)
    if missing and not salvage:
        raise FailedPrecondition(
            f"volume {volume}: replica(s) {_where(newest, missing)} of the newest membership "
            f"(epoch {newest.epoch if newest else 0}) cannot be reached and may hold the "
            "newest writes; start with them, or with --salvage to accept the best reachable "
            "member (or --salvage-from HOST:PORT to choose one)")
    if not candidates:
        raise FailedPrecondition(
            f"volume {volume}: no reachable replica is a member of the newest membership "
            f"({', '.join(sorted(members))}); none is known to hold every acknowledged "
            "write. Choose one with --salvage-from HOST:PORT")
    best = max(candidates, key=lambda p: p.revision)
    clean = newest is not None and all(
        p.record is not None and p.record.clean and p.epoch == newest.epoch
        for p in candidates)
    rw = [p for p in candidates if p.revision == best.revision and
          p.snapshots == best.snapshots and p.size == best.size] if clean else [best]
    base = newest.history if newest else ()
    previous = newest.salvage if newest else None
    stale = [p for p in reachable if p not in rw]
    if missing:
        _give_up_missing(start, missing, newest)
        info = _salvage_info(start, best, chosen_was_member=True)
        history = start.branch(base, f"salvaged from {best.name}")
        return Decision(rw, stale, history=history, branched=True, salvage=info,
                        previous_salvage=previous)
    left = sorted(p.name for p in candidates if p not in rw)
    if newest is not None and not left:
        return Decision(rw, stale, history=base, previous_salvage=previous)
    cause = "first start" if newest is None else f"started without {', '.join(left)}"
    return Decision(rw, stale, history=start.branch(base, cause), branched=True,
                    previous_salvage=previous)


def _salvage_from(start: _Start, chosen: Probe) -> Decision:
    """The operator chose *chosen*: it serves alone. Replicas provably behind it are
    rebuilt from it; every other replica that holds data is kept, untouched."""
    live = [p for p in start.reachable if not p.pristine]
    same = [p for p in live if p.branch == chosen.branch]
    newest = _newest(start.volume, same)
    in_good_standing = newest is not None and chosen.replica_id in newest.members
    if in_good_standing and chosen.record is not None:
        # It holds every write acknowledged on its branch: what is behind it loses nothing.
        base = chosen.record.history
        behind_it = [p for p in live if p is not chosen and
                     (p.branch == chosen.branch or behind(p, chosen))]
    else:
        # Nothing proves it holds what others acknowledged: a new root, every other
        # replica with data is kept.
        base = ()
        behind_it = []
    if newest is not None:
        _give_up_missing(start, sorted(set(newest.members) -
                                       {p.replica_id for p in start.reachable}), newest)
    kept = [p for p in live if p is not chosen and p not in behind_it]
    for probe in kept:
        start.given_up.append({"replica": probe.name, "replica_id": probe.replica_id,
                               "branch": probe.branch, "why": (
                                   f"holds {probe.describe_branch()}: kept, not rebuilt")})
    info = _salvage_info(start, chosen, chosen_was_member=in_good_standing)
    stale = [p for p in start.reachable if p is not chosen and p not in kept]
    return Decision([chosen], stale, kept,
                    history=start.branch(base, f"salvaged from {chosen.name}"),
                    branched=True, salvage=info,
                    previous_salvage=chosen.record.salvage if chosen.record else None)


def _where(record: Record | None, ids: list[str]) -> str:
    """The replicas *ids*, by the address the record knew them at."""
    known = record.addresses if record else {}
    return ", ".join(f"{known[i]} (id {i[:8]})" if i in known else i for i in ids)


def _give_up_missing(start: _Start, missing: list[str], record: Record | None) -> None:
    known = record.addresses if record else {}
    for replica_id in missing:
        entry = {"replica_id": replica_id, "why": (
            "unreachable member of the newest membership: it may hold newer writes; if it "
            "did, it will be found diverged when it returns")}
        if replica_id in known:
            entry["replica"] = known[replica_id]
        start.given_up.append(entry)


def _salvage_info(start: _Start, chosen: Probe, *, chosen_was_member: bool) -> dict[str, Any]:
    return {"at": start.clock(), "generation": start.generation, "from": chosen.name,
            "replica_id": chosen.replica_id, "chosen_was_member": chosen_was_member,
            "given_up": list(start.given_up)}


def _diverged_message(volume: str, heads: dict[str, list[Probe]]) -> str:
    parts = []
    for probes in heads.values():
        names = ", ".join(p.name for p in probes)
        parts.append(f"{probes[0].describe_branch()} on {names}")
    lineages = [set(probes[0].lineage) for probes in heads.values()]
    common = set.intersection(*lineages) if lineages else set()
    shared = next((b for b in reversed(next(iter(heads.values()))[0].lineage)
                   if b in common), None)
    since = f"; they share branch {shared[:8]}" if shared else "; they share no branch"
    return (f"volume {volume}: replicas hold diverged histories: " + "; ".join(parts) + since
            + ". Each may hold acknowledged writes the other lacks, so the engine will not "
            "choose. Start with --salvage-from HOST:PORT to serve one branch; the replicas "
            "of the other branches are kept, not rebuilt")

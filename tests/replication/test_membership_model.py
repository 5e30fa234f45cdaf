"""A model-based test of the membership rules (hypothesis, stateful).

The real decision code (``membership.decide``) and the real roster (``roster.Roster``, which
the engine uses for every mode change and membership record) run against simulated
replicas. Random programs of writes, replica crashes and returns, rebuilds (begun, completed
and promoted), clean stops, engine crashes at any point (also in the middle of writing
membership records to the replicas, or of fanning a write out), and restarts with any subset
of the replicas in any order, with and without salvage, are checked against a model of
which writes were acknowledged on which branch of the volume's history.

What is checked, at every start that serves:

* every replica put in RW mode holds, for every block, the last write acknowledged on the
  lineage the engine continues, or a later unacknowledged one: nothing acknowledged is lost;
* unless the start was a salvage that names, among what it gave up, a replica that still
  holds the lost write (an explicit operator choice that names it);
* replicas kept by a salvage (diverged) are never written again unless an operator
  discards them.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from appliance.errors import ApplianceError, FailedPrecondition, Unavailable
from appliance.replication import membership
from appliance.replication.member import Mode
from appliance.replication.membership import Probe, Record
from appliance.replication.roster import Roster

BLOCKS = 2


class Crash(BaseException):
    """The engine process died here (nothing after this point happens)."""


@dataclass
class SimReplica:
    name: str
    replica_id: str
    up: bool = True
    data: dict[int, int] = field(default_factory=dict)  # block -> write id (0: initial)
    revision: int = 0
    generation: int = 0
    record: dict[str, Any] | None = None

    def probe(self, *, anyway: bool = False) -> Probe:
        """What it answers a probe (*anyway*: as if it were up)."""
        if not self.up and not anyway:
            return Probe(self.name, False, error="down")
        record = Record.from_dict(self.record) if self.record else None
        return Probe(self.name, True, self.replica_id, 1, self.revision, self.generation,
                     record)


@dataclass
class Seat:
    """The engine's view of one replica (what the roster works on)."""

    name: str
    replica_id: str = ""
    mode: Mode = Mode.ERR
    reason: str = ""
    kept: Any = None
    local: bool = False

    def leave(self) -> None:
        pass


class World:
    def __init__(self, count: int) -> None:
        self.replicas = {f"r{i}": SimReplica(f"r{i}", f"id{i}") for i in range(count)}
        self.crash_in: int | None = None  # steps until the engine dies
        self.ids = itertools.count(1)

    def tick(self) -> None:
        if self.crash_in is not None:
            self.crash_in -= 1
            if self.crash_in <= 0:
                self.crash_in = None
                raise Crash


class SimEngine:
    """An engine over simulated replicas, driven like appliance.replication.engine."""

    def __init__(self, world: World, names: list[str], *, salvage: bool,
                 salvage_from: str | None) -> None:
        self.world = world
        self.seats = [Seat(name) for name in names]
        self.salvage, self.salvage_from = salvage, salvage_from
        self.roster = Roster("vol", self.seats, self.store,
                             make_id=lambda: f"b{next(world.ids)}")
        self.rebuilds: dict[str, tuple[str, dict[int, int], dict[int, int]]] = {}
        self.decision: membership.Decision | None = None

    def replica(self, seat: Seat) -> SimReplica:
        return self.world.replicas[seat.name]

    def store(self, seat: Seat, document: dict[str, Any]) -> None:
        self.world.tick()
        replica = self.replica(seat)
        if not replica.up:
            raise Unavailable(f"{seat.name} is down")
        replica.record = document
        self.world.tick()  # stored, but the engine dies before it hears so

    def decide(self) -> membership.Decision:
        probes = [self.world.replicas[s.name].probe() for s in self.seats]
        return membership.decide("vol", probes, salvage=self.salvage,
                                 salvage_from=self.salvage_from,
                                 make_id=lambda: f"b{next(self.world.ids)}")

    def start(self, decision: membership.Decision) -> None:
        for probe in [*decision.rw, *decision.stale, *decision.diverged]:
            self.world.replicas[probe.name].generation = decision.generation
        self.roster.start(decision)

    def write(self, block: int, wid: int) -> bool:
        """Fan a write out; True when it is acknowledged (the engine's rule)."""
        succeeded, failed = [], []
        for seat in self.roster.targets:  # as published once the record is durable
            self.world.tick()
            replica = self.replica(seat)
            if seat.mode == Mode.ERR or not replica.up:
                failed.append(seat)
                continue
            replica.data[block] = wid
            replica.revision += 1
            if seat.name in self.rebuilds:
                self.rebuilds[seat.name][2][block] = wid
            succeeded.append(seat)
        for seat in failed:
            self.roster.fail(seat, Unavailable(f"{seat.name} is down"))
        return any(s.mode == Mode.RW for s in succeeded)

    def check_returning(self, seat: Seat) -> None:
        """As Engine.add_replica: a replica back on a branch outside the engine's history
        is kept (refused unless discarded)."""
        replica = self.replica(seat)
        if seat.kept is None and replica.up and membership.holds_another_branch(
                replica.probe(), self.roster.history):
            seat.kept = {"branch": replica.probe().branch}

    def begin_rebuild(self, seat: Seat, *, discard: bool) -> None:
        if seat.kept is not None and not discard:
            return  # Engine.add_replica refuses
        serving = self.roster.serving()
        if not serving or not self.replica(seat).up:
            return
        source = self.replica(serving[0])
        target = self.replica(seat)
        target.revision = source.revision
        if self.roster.begin_rebuild(seat):
            self.rebuilds[seat.name] = (source.name, dict(source.data), {})

    def complete_rebuild(self, seat: Seat, *, source_dies: bool = False) -> None:
        source_name, base, live = self.rebuilds[seat.name]
        source = self.world.replicas[source_name]
        target = self.replica(seat)
        if seat.mode != Mode.WO or not target.up or not source.up or \
                next(s for s in self.seats if s.name == source_name).mode != Mode.RW:
            return  # the real rebuild retries, or gives up
        copied = {**base, **live}
        if copied != source.data:
            return  # verification fails (an unacknowledged write reached only one side)
        target.data = copied
        del self.rebuilds[seat.name]
        if source_dies:  # verified, then the source fails before the promotion
            source.up = False
        self.roster.promote(seat)


State = dict[int, int]  # block -> the id of the write it holds (absent: initial)


@dataclass
class Timelines:
    """The model's truth. A timeline is a history of acknowledged writes that the volume
    shows to its clients; every salvage forks a new one from the state the chosen replica
    holds (the replicas it gave up may continue the old one). Each engine session continues
    one timeline: acknowledged writes extend it."""

    states: list[list[State]] = field(default_factory=lambda: [[{}]])  # by version
    # (parent, version) whose state a timeline began from; None: from no known state
    parent: list[tuple[int, int] | None] = field(default_factory=lambda: [None])
    discarded: set[int] = field(default_factory=set)  # an operator discarded it
    unacked: set[int] = field(default_factory=set)  # write ids never acknowledged
    acked_in: dict[int, tuple[int, int]] = field(default_factory=dict)  # wid -> (t, version)

    def latest(self, timeline: int) -> State:
        return self.states[timeline][-1]

    def version(self, timeline: int) -> int:
        return len(self.states[timeline]) - 1

    def issue(self, wid: int) -> None:
        self.unacked.add(wid)

    def acknowledge(self, timeline: int, block: int, wid: int) -> None:
        self.states[timeline].append({**self.latest(timeline), block: wid})
        self.unacked.discard(wid)
        self.acked_in[wid] = (timeline, self.version(timeline))

    def shows_state(self, state: State, content: State) -> bool:
        """*content* is *state*, but for unacknowledged writes that landed after it."""
        return all(content.get(b, 0) == state.get(b, 0) or
                   (content.get(b, 0) in self.unacked and content.get(b, 0) > state.get(b, 0))
                   for b in range(BLOCKS))

    def shows(self, timeline: int, content: State) -> bool:
        return self.shows_state(self.latest(timeline), content)

    def matching(self, contents: list[State]) -> list[int]:
        """The timelines whose latest state every one of *contents* shows."""
        return [t for t in range(len(self.states)) if all(self.shows(t, c) for c in contents)]

    def past(self, content: State) -> tuple[int, int] | None:
        """The most recent (timeline, version) whose state *content* shows."""
        found = [(t, v) for t in range(len(self.states)) for v in range(len(self.states[t]))
                 if self.shows_state(self.states[t][v], content)]
        return max(found, key=lambda tv: (max(self.states[tv[0]][tv[1]].values(), default=0),
                                          tv[1])) if found else None

    def fork(self, content: State) -> int:
        parent = self.past(content)
        self.states.append([{b: w for b, w in content.items() if w in self.acked_in}])
        self.parent.append(parent)
        return len(self.states) - 1

    def ancestry(self, current: int) -> list[tuple[int, int]]:
        """(timeline, version) of every stretch of history *current* contains."""
        chain = [(current, self.version(current))]
        while (link := self.parent[chain[-1][0]]) is not None:
            chain.append(link)
        return chain

    def contains(self, current: int, wid: int) -> bool:
        """True when acknowledged write *wid* is part of *current*'s history."""
        timeline, at = self.acked_in[wid]
        return any(t == timeline and at <= v for t, v in self.ancestry(current))

    def subsumes(self, current: int, timeline: int) -> bool:
        """True when *timeline*'s latest state is a past state of *current*."""
        at = self.version(timeline)
        while at == 0 and (link := self.parent[timeline]) is not None:
            timeline, at = link  # begun and never written: the state it began from
        return any(t == timeline and at <= v for t, v in self.ancestry(current))


class MembershipModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # Replicas failing is what this test does: the roster's warnings are expected.
        self._log = logging.getLogger("appliance.replication.roster")
        self._level = self._log.level
        self._log.setLevel(logging.ERROR)
        self.world = World(3)
        self.truth = Timelines()
        self.timeline = 0  # the timeline the running engine continues
        self.branches: dict[str, int] = {}  # the engine's branch ids -> the model's timeline
        self.engine: SimEngine | None = None
        self.kept: dict[str, str] = {}  # replica -> branch a salvage kept it on

    def teardown(self) -> None:
        self._log.setLevel(self._level)

    @initialize()
    def first_start(self) -> None:
        self._start(list(self.world.replicas), salvage=False, salvage_from=None)
        assert self.engine is not None

    # -- what the engine does -------------------------------------------------------------

    def _guard(self, action: Any) -> None:
        """Run *action* on the engine; a crash ends the engine."""
        try:
            action()
        except Crash:
            self.engine = None
        self._map_branches()

    def _map_branches(self) -> None:
        """Branches a running engine began (replicas left) continue its timeline."""
        if self.engine is not None:
            for branch in self.engine.roster.history:
                self.branches.setdefault(branch.id, self.timeline)

    def _timeline_of(self, probe: Probe) -> int | None:
        for branch in reversed(probe.lineage):
            if branch in self.branches:
                return self.branches[branch]
        return None

    @invariant()
    def lineage_agrees_with_truth(self) -> None:
        """A replica the histories call behind another holds no acknowledged write that
        the other's timeline lacks (so rebuilding it from the other loses nothing)."""
        probes = [r.probe(anyway=True) for r in self.world.replicas.values()]
        probes = [p for p in probes if p.record]
        for ahead in probes:
            timeline = self._timeline_of(ahead)
            for other in probes:
                if timeline is None or not membership.behind(other, ahead):
                    continue
                for block, wid in self.world.replicas[other.name].data.items():
                    if wid not in self.truth.acked_in or \
                            self.truth.acked_in[wid][0] in self.truth.discarded:
                        continue  # never acknowledged, or an operator discarded it
                    assert self.truth.contains(timeline, wid), \
                        f"{other.name} (branch {other.branch}) holds write {wid} of block " \
                        f"{block}, which timeline {timeline} lacks, but the histories put " \
                        f"it behind {ahead.name} (branch {ahead.branch})"

    @precondition(lambda self: self.engine is not None)
    @rule(block=st.integers(0, BLOCKS - 1), crash=st.none() | st.integers(1, 4))
    def write(self, block: int, crash: int | None) -> None:
        engine = self.engine
        assert engine is not None
        wid = next(self.world.ids)
        self.truth.issue(wid)
        self.world.crash_in = crash
        acked = False

        def go() -> None:
            nonlocal acked
            acked = engine.write(block, wid)

        self._guard(go)
        self.world.crash_in = None
        if acked and self.engine is not None:
            self.truth.acknowledge(self.timeline, block, wid)

    @rule(index=st.integers(0, 2))
    def replica_crash_or_return(self, index: int) -> None:
        replica = self.world.replicas[f"r{index}"]
        replica.up = not replica.up

    @precondition(lambda self: self.engine is not None)
    @rule(index=st.integers(0, 2), crash=st.none() | st.integers(1, 6),
          discard=st.booleans())
    def begin_rebuild(self, index: int, crash: int | None, discard: bool) -> None:
        engine = self.engine
        assert engine is not None
        seat = next((s for s in engine.seats if s.name == f"r{index}"), None)
        if seat is None or seat.mode != Mode.ERR:
            return
        engine.check_returning(seat)
        if seat.kept is not None and discard:
            self.kept.pop(seat.name, None)  # the operator discards the kept branch
            data = self.world.replicas[seat.name].data
            for timeline in range(len(self.truth.states)):
                if self.truth.shows(timeline, data) and timeline != self.timeline:
                    self.truth.discarded.add(timeline)
        self.world.crash_in = crash
        self._guard(lambda: engine.begin_rebuild(seat, discard=discard))
        self.world.crash_in = None

    @precondition(lambda self: self.engine is not None and bool(self.engine.rebuilds))
    @rule(data=st.data(), crash=st.none() | st.integers(1, 6), source_dies=st.booleans())
    def complete_rebuild(self, data: st.DataObject, crash: int | None,
                         source_dies: bool) -> None:
        engine = self.engine
        assert engine is not None
        name = data.draw(st.sampled_from(sorted(engine.rebuilds)))
        seat = next(s for s in engine.seats if s.name == name)
        self.world.crash_in = crash
        self._guard(lambda: engine.complete_rebuild(seat, source_dies=source_dies))
        self.world.crash_in = None

    @precondition(lambda self: self.engine is not None)
    @rule()
    def engine_crash(self) -> None:
        self.engine = None

    @precondition(lambda self: self.engine is not None)
    @rule(crash=st.none() | st.integers(1, 6))
    def clean_stop(self, crash: int | None) -> None:
        engine = self.engine
        assert engine is not None
        self.world.crash_in = crash
        self._guard(engine.roster.stop_clean)
        self.world.crash_in = None
        self.engine = None

    @precondition(lambda self: self.engine is None)
    @rule(data=st.data(), crash=st.none() | st.integers(1, 6))
    def start(self, data: st.DataObject, crash: int | None) -> None:
        order = data.draw(st.permutations(sorted(self.world.replicas)))
        given = data.draw(st.lists(st.booleans(), min_size=3, max_size=3))
        names = [name for name, keep in zip(order, given, strict=True) if keep] or order[:1]
        mode = data.draw(st.sampled_from(["plain", "salvage", "from"]))
        chosen = data.draw(st.sampled_from(names)) if mode == "from" else None
        self.world.crash_in = crash
        try:
            self._start(list(names), salvage=mode == "salvage", salvage_from=chosen)
        except Crash:
            self.engine = None
        finally:
            self.world.crash_in = None

    # -- the check --------------------------------------------------------------------------

    def _start(self, names: list[str], *, salvage: bool, salvage_from: str | None) -> None:
        engine = SimEngine(self.world, names, salvage=salvage, salvage_from=salvage_from)
        try:
            decision = engine.decide()
        except (FailedPrecondition, Unavailable, ApplianceError) as exc:
            # Refused: nothing changes. Without any salvage ever, a start with every
            # replica up is never refused (nothing can have diverged or gone missing).
            everyone = set(names) == set(self.world.replicas) and all(
                r.up for r in self.world.replicas.values())
            assert not (everyone and len(self.truth.states) == 1), \
                f"a start with every replica up was refused: {exc}"
            return
        self._check(decision)
        self.engine = engine
        for name in [p.name for p in decision.rw] + [p.name for p in decision.stale]:
            self.kept.pop(name, None)
        for probe in decision.diverged:
            self.kept[probe.name] = probe.branch
        forked = len(self.truth.states) - 1 if decision.salvage is not None else None
        try:
            engine.start(decision)
        finally:
            if forked is not None and not self._durable(decision.history[-1].id):
                self.truth.discarded.add(forked)  # it died before any replica heard of it
        self._map_branches()

    def _durable(self, branch: str) -> bool:
        return any(r.record and branch in Record.from_dict(r.record).lineage
                   for r in self.world.replicas.values())

    def _check(self, decision: membership.Decision) -> None:
        """A start serves the latest state of one timeline (or, a salvage, forks one), and
        destroys (rebuilds) no replica that holds the only copy of another timeline's
        latest state. A salvage that loses acknowledged writes names a replica that keeps
        them, untouched."""
        continued = {b.id for b in decision.history}
        for probe in decision.stale:  # rebuilt: only from the lineage it is on (or behind)
            assert probe.branch in continued or not probe.lineage, \
                f"{probe.name} on branch {probe.branch} would be rebuilt from another " \
                f"lineage ({sorted(continued)}; kept: {self.kept})"
        replicas = self.world.replicas
        contents = [replicas[p.name].data for p in decision.rw]
        assert all(c == contents[0] for c in contents), \
            f"replicas {[p.name for p in decision.rw]} serve together but differ: {contents}"
        matching = self.truth.matching(contents)
        holders = {t: {n for n, r in replicas.items() if self.truth.shows(t, r.data)}
                   for t in range(len(self.truth.states)) if t not in self.truth.discarded}
        if decision.salvage is None:
            assert matching, f"a start without salvage serves {[p.name for p in decision.rw]}" \
                ", which lack acknowledged writes of every timeline"
            current = matching[-1]
        else:
            current = self.truth.fork(contents[0])
            if not matching:
                self._check_named(decision, holders)
        if decision.history:
            self.branches[decision.history[-1].id] = current
        rebuilt = {p.name for p in decision.stale}
        for timeline, names in holders.items():
            if names and not self.truth.subsumes(current, timeline):
                assert names - rebuilt, f"the start rebuilds {sorted(names)}, the last " \
                    f"replicas showing timeline {timeline}, from timeline {current}"
        self.timeline = current

    def _check_named(self, decision: membership.Decision, holders: dict[int, set[str]]) -> None:
        assert decision.salvage is not None
        named = {item.get("replica_id") for item in decision.salvage["given_up"]} | \
            {item.get("replica") for item in decision.salvage["given_up"]}
        touched = {p.name for p in [*decision.rw, *decision.stale]}
        preserved = {n for n, r in self.world.replicas.items()
                     if n not in touched and (n in named or r.replica_id in named)}
        assert any(names & preserved for names in holders.values() if names), \
            f"salvage from {decision.rw[0].name} loses acknowledged writes without naming " \
            f"a replica that keeps them (named {sorted(x for x in named if x)})"


#: examples per run (MEMBERSHIP_EXAMPLES raises it for a soak)
EXAMPLES = int(os.environ.get("MEMBERSHIP_EXAMPLES", "300"))
MembershipModel.TestCase.settings = settings(max_examples=EXAMPLES, stateful_step_count=30,
                                             deadline=None)
TestMembershipModel = MembershipModel.TestCase


def test_a_replica_given_up_by_a_salvage_is_kept_when_it_returns() -> None:
    """Found by the model: r2 serves alone (salvage) and takes a write; while r2 is away
    the volume is salvaged from r0. When r2 returns to that engine, its branch is not in
    the engine's history: it may hold acknowledged writes (it does), so it is kept, not
    rebuilt over, and its record stays its own."""
    world = World(3)

    def started(names: list[str], *, salvage: bool) -> SimEngine:
        engine = SimEngine(world, names, salvage=salvage, salvage_from=None)
        engine.start(engine.decide())
        return engine

    started(["r0", "r1", "r2"], salvage=False)  # then it crashes: dropped
    alone = started(["r2"], salvage=True)
    assert alone.write(0, 99)  # acknowledged, on r2 only
    world.replicas["r2"].up = False
    engine = started(["r0", "r2"], salvage=True)
    world.replicas["r2"].up = True
    seat = next(s for s in engine.seats if s.name == "r2")
    record_before = world.replicas["r2"].record
    engine.check_returning(seat)
    assert seat.kept is not None
    engine.begin_rebuild(seat, discard=False)
    assert seat.mode == Mode.ERR and world.replicas["r2"].record == record_before
    assert world.replicas["r2"].data == {0: 99}

"""The pieces of the node's salvage handling that need no daemon: replica names in engine
messages, a kept replica's record rewritten for a volume of its own (which an engine then
serves), and the event log keeping only the newest events."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.chain import Replica
from appliance.control.objects import Event, ReplicaRecord
from appliance.control.sqlite_store import SQLiteStore
from appliance.node.events import EventLog
from appliance.node.lineage import (
    ReplicaNames,
    branch_volume_name,
    keep_as_volume,
    node_terms,
    one_line,
)
from appliance.replication import membership


def test_engine_messages_in_replica_names() -> None:
    names = ReplicaNames([ReplicaRecord("v-aaaa", "v", "d", "/r/a", 1010, replica_id="id-a"),
                          ReplicaRecord("v-bbbb", "v", "d", "/r/b", 10101)], "127.0.0.1")
    assert names.text("127.0.0.1:10101 and 127.0.0.1:1010, id-a; 127.0.0.1:9") == \
        "v-bbbb and v-aaaa, v-aaaa; 127.0.0.1:9"
    salvage = names.salvage({"at": "T", "generation": 3, "from": "127.0.0.1:10101",
                             "replica_id": "id-b", "chosen_was_member": True,
                             "given_up": [{"replica_id": "id-a", "why": "unreachable"},
                                          {"replica": "127.0.0.1:1010", "replica_id": "id-a",
                                           "why": "holds branch x", "branch": "x"}]})
    assert salvage is not None and salvage["from"] == "v-bbbb"
    assert [g["replica"] for g in salvage["given_up"]] == ["v-aaaa", "v-aaaa"]
    assert node_terms("start with --salvage, or --salvage-from HOST:PORT", "v") == \
        "start with 'appliance volume salvage v', or 'appliance volume salvage v --from " \
        "REPLICA'"
    assert one_line("the engine did not start:\nlog line 1\nlog line 2", Path("/x.log")) == \
        "the engine did not start (see /x.log)"
    assert branch_volume_name("v", "0123456789abcdef", {"v-branch-01234567"}) == \
        "v-branch-01234567-2"
    assert len(branch_volume_name("x" * 128, "0123456789abcdef", set())) <= 116


def test_a_kept_replica_becomes_the_only_member_of_a_new_volume(tmp_path: Path) -> None:
    directory = tmp_path / "replica"
    with Replica.create(directory, 1 << 20) as replica:
        replica_id = replica.replica_id
        history = (membership.Branch("a" * 16, "T0", 1, "created"),
                   membership.Branch("b" * 16, "T1", 2, "salvaged"))
        old = membership.Record("v", 7, (replica_id, "other"), False, history,
                                {"at": "T1", "from": "x"})
        replica.set_volume_record(old.to_dict())
    assert keep_as_volume(directory, "v", "v-branch-bbbbbbbb") == replica_id
    assert keep_as_volume(directory, "v", "v-branch-bbbbbbbb") == replica_id  # done: same
    with Replica.open(directory, writable=False) as replica:
        raw = replica.volume_record()
        assert raw is not None
        record = membership.Record.from_dict(raw)
        probe = membership.Probe("127.0.0.1:1", True, replica_id, replica.size,
                                 replica.revision, replica.generation, record)
    assert (record.volume, record.epoch, record.members, record.clean) == \
        ("v-branch-bbbbbbbb", 8, (replica_id,), True)
    assert record.history[:2] == history and len(record.history) == 3
    assert "kept from volume v" in record.history[-1].cause
    decision = membership.decide("v-branch-bbbbbbbb", [probe])
    assert decision.rw == [probe] and not decision.salvaged


async def test_the_event_log_keeps_the_newest(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Event, "KEEP", 3)
    store = await SQLiteStore.open(tmp_path / "state.db")
    try:
        log = EventLog(store)
        for number in range(5):
            await log.record("v" if number % 2 else "w", "kind", f"event {number}")
        assert [e["message"] for e in await log.list()] == ["event 2", "event 3", "event 4"]
        assert [e["sequence"] for e in await log.list("v")] == [4]
        again = EventLog(store)  # after a restart: numbering goes on
        recorded = await again.record("v", "kind", "event 5")
        assert recorded is not None and recorded.sequence == 6
        assert [e["sequence"] for e in await again.list()] == [4, 5, 6]
    finally:
        await store.aclose()

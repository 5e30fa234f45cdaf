"""The web UI's views (appliance/ui/views.py): what the pages show, from inputs shaped like
the node API's answers (service.py ``_info``/``list_disks``/``list_snapshots``, nodes.py
``_describe``, backups.py ``_manifest_info``/``_job_info``, the engine's ``io`` stats)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from appliance.ui import views

GiB = 1 << 30
MiB = 1 << 20
# the engine's latency bounds (appliance/replication/engine.py LATENCY_BUCKETS)
BOUNDS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
          0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


def a_volume(name: str, *, state: str = "attached", robustness: str = "healthy",
             size: int | None = 10 * GiB, node: str = "node-a",
             labels: dict[str, str] | None = None,
             replica_list: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A volume as GET /v1/volumes lists it (service.py ``_info``)."""
    return {"name": name, "size": size, "replicas": 3, "created": "2024-05-01T10:00:00Z",
            "attached": state == "attached", "disk_tags": [], "labels": labels or {},
            "source": None, "deleting": state == "deleting", "state": state,
            "robustness": robustness, "device": f"/dev/appliance/{name}", "message": "",
            "node": node if state == "attached" else "", "access_mode": "rwo",
            "frontend": {"kind": "blockdev", "device": f"/dev/appliance/{name}"},
            "share": None, "replica_list": replica_list or []}


def a_replica(name: str, mode: str | None, node: str = "node-b",
              rebuild: dict[str, Any] | None = None) -> dict[str, Any]:
    """A replica of show_volume's replica_list, with the mode its engine reports."""
    replica: dict[str, Any] = {"name": name, "disk": "disk-1", "port": 10010,
                               "node": node, "address": f"10.0.0.2:{10010}",
                               "directory": f"/var/lib/appliance/disk-1/{name}",
                               "replica_id": f"id-{name}", "mode": mode}
    if rebuild is not None:
        replica["rebuild"] = rebuild
    return replica


def a_disk(name: str, *, capacity: int, available: int, scheduled: int, reserved: int = 0,
           node: str = "", allow_scheduling: bool = True, eviction_requested: bool = False,
           replicas: list[str] | None = None) -> dict[str, Any]:
    """A disk as GET /v1/disks lists it (service.py ``_disk_fields``)."""
    return {"name": name, "path": f"/srv/{name}", "tags": ["ssd"],
            "allow_scheduling": allow_scheduling, "storage_reserved": reserved,
            "eviction_requested": eviction_requested, "node": node, "capacity": capacity,
            "available": available, "reported": 1714557600.0, "scheduled": scheduled,
            "replicas": replicas or []}


# -- storage ------------------------------------------------------------------------------

def test_storage_limit_is_capacity_less_reserved_times_the_percentage_rounded_down(
        ) -> None:
    # (1000 - 1) * 150 // 100 = 1498 (1498.5 rounded down, as the scheduler does)
    [row] = views.storage([a_disk("d1", capacity=1000, available=900, scheduled=0,
                                  reserved=1)],
                          {"over_provisioning_percentage": 150}, "node-a")
    assert row.limit == 1498
    assert row.schedulable == 1498


def test_storage_follows_the_scheduler_on_a_realistic_over_provisioned_disk() -> None:
    disk = a_disk("d1", capacity=100 * GiB, available=70 * GiB, scheduled=120 * GiB,
                  reserved=10 * GiB, replicas=["r1", "r2"])
    [row] = views.storage([disk], {"over_provisioning_percentage": 200}, "node-a")
    assert row.limit == 180 * GiB
    assert row.schedulable == 60 * GiB
    # 120 GiB scheduled on 90 GiB (capacity less reserved): 30 GiB over-provisioned
    assert row.over_provisioned == 30 * GiB
    assert row.used == 30 * GiB
    assert row.replicas == 2
    assert row.node == "node-a"  # "" in single-node mode: the default node
    assert row.tags == ["ssd"]


def test_storage_schedulable_is_never_negative() -> None:
    [row] = views.storage([a_disk("d1", capacity=100 * GiB, available=10 * GiB,
                                  scheduled=150 * GiB)],
                          {"over_provisioning_percentage": 100}, "node-a")
    assert row.limit == 100 * GiB
    assert row.schedulable == 0
    assert row.over_provisioned == 50 * GiB


def test_storage_not_over_provisioned_up_to_capacity_less_reserved() -> None:
    [row] = views.storage([a_disk("d1", capacity=100 * GiB, available=50 * GiB,
                                  scheduled=90 * GiB, reserved=10 * GiB)],
                          {"over_provisioning_percentage": 300}, "node-a")
    assert row.over_provisioned == 0
    [row] = views.storage([a_disk("d1", capacity=100 * GiB, available=50 * GiB,
                                  scheduled=90 * GiB + 1, reserved=10 * GiB)],
                          {"over_provisioning_percentage": 300}, "node-a")
    assert row.over_provisioned == 1


def test_storage_reserved_above_capacity_leaves_no_limit() -> None:
    [row] = views.storage([a_disk("d1", capacity=10 * GiB, available=10 * GiB,
                                  scheduled=1 * GiB, reserved=20 * GiB)],
                          {"over_provisioning_percentage": 200}, "node-a")
    assert row.limit == 0
    assert row.schedulable == 0
    assert row.over_provisioned == 1 * GiB


def test_storage_percentage_defaults_to_100_and_rows_sort_by_node_then_name() -> None:
    disks = [a_disk("zeta", capacity=10 * GiB, available=10 * GiB, scheduled=0,
                    node="node-b"),
             a_disk("beta", capacity=10 * GiB, available=10 * GiB, scheduled=0,
                    node="node-a"),
             a_disk("alpha", capacity=10 * GiB, available=10 * GiB, scheduled=0,
                    node="node-b")]
    rows = views.storage(disks, {}, "node-a")
    assert [(r.node, r.name) for r in rows] == [("node-a", "beta"), ("node-b", "alpha"),
                                                ("node-b", "zeta")]
    assert all(r.limit == 10 * GiB for r in rows)


def test_a_disk_that_takes_no_new_replicas_has_no_schedulable_space() -> None:
    """Scheduling turned off, or its replicas being evicted: the scheduler puts nothing
    there (scheduler.py), so neither its row nor the totals count space on it."""
    disks = [a_disk("open", capacity=100 * GiB, available=80 * GiB, scheduled=40 * GiB),
             a_disk("closed", capacity=50 * GiB, available=50 * GiB, scheduled=0,
                    allow_scheduling=False),
             a_disk("emptying", capacity=50 * GiB, available=50 * GiB, scheduled=0,
                    eviction_requested=True)]
    rows = views.storage(disks, {"over_provisioning_percentage": 100}, "node-a")
    for name in ("closed", "emptying"):
        row = next(r for r in rows if r.name == name)
        assert row.schedulable == 0 and not row.takes_replicas
    totals = views.storage_totals(rows)
    assert totals["schedulable"] == 60 * GiB
    assert totals["capacity"] == 200 * GiB  # their capacity is still counted
    assert totals["used"] == 20 * GiB
    assert totals["scheduled"] == 40 * GiB
    assert totals["reserved"] == 0
    assert totals["over_provisioned"] == 0


def test_storage_percent_is_capped_and_safe_on_a_disk_without_capacity() -> None:
    [row] = views.storage([a_disk("d1", capacity=100 * GiB, available=75 * GiB,
                                  scheduled=250 * GiB)],
                          {"over_provisioning_percentage": 300}, "node-a")
    assert row.percent(row.used) == 25.0
    assert row.percent(row.scheduled) == 100.0
    [empty] = views.storage([a_disk("d2", capacity=0, available=0, scheduled=0)], {},
                            "node-a")
    assert empty.percent(empty.used) == 0.0


# -- volume classes and counts ------------------------------------------------------------

@pytest.mark.parametrize(("state", "robustness", "expected"), [
    ("attached", "healthy", "healthy"),
    ("attached", "degraded", "degraded"),
    ("attached", "faulted", "faulted"),
    ("attached", "unknown", "faulted"),  # attached but its engine refused to start
    ("detached", "unknown", "detached"),
    ("faulted", "unknown", "faulted"),
    ("creating", "unknown", "other"),
    ("attaching", "unknown", "other"),
    ("detaching", "unknown", "other"),
    ("deleting", "unknown", "other"),
])
def test_volume_class(state: str, robustness: str, expected: str) -> None:
    assert views.volume_class(a_volume("v", state=state, robustness=robustness)) == expected


def test_volume_counts_has_every_class_in_order_zeros_included() -> None:
    volumes = [a_volume("a"), a_volume("b"), a_volume("c", robustness="degraded"),
               a_volume("d", state="detached", robustness="unknown"),
               a_volume("e", state="creating", robustness="unknown")]
    counts = views.volume_counts(volumes)
    assert list(counts) == list(views.VOLUME_CLASSES)
    assert counts == {"healthy": 2, "degraded": 1, "faulted": 0, "detached": 1, "other": 1}


def a_node(name: str, state: str, cordoned: bool = False) -> dict[str, Any]:
    """A node as GET /v1/nodes lists it (nodes.py ``_describe``)."""
    return {"name": name, "address": "10.0.0.1", "api": "http://10.0.0.1:9500",
            "state": state, "zone": "", "labels": {}, "tags": [], "cordoned": cordoned,
            "leader": False, "draining": False, "version": "1.0", "joined": 1714557600.0,
            "last_heartbeat": None if state == "down" else 1714557600.0, "replicas": 0}


def test_node_counts_ready_and_down() -> None:
    counts = views.node_counts([a_node("a", "ready"), a_node("b", "ready"),
                                a_node("c", "down"), a_node("d", "down", cordoned=True)])
    assert counts == {"ready": 2, "down": 2, "cordoned": 1}


def test_node_counts_an_alive_cordoned_node_is_not_down() -> None:
    # GET /v1/nodes gives an alive cordoned node the state "cordoned" (nodes.py ``state``)
    counts = views.node_counts([a_node("a", "ready"), a_node("b", "cordoned", cordoned=True)])
    assert counts["cordoned"] == 1
    assert counts["down"] == 0


# -- rebuilds -----------------------------------------------------------------------------

def test_rebuilds_lists_only_wo_replicas_with_their_progress() -> None:
    volume = a_volume("vol1", robustness="degraded", replica_list=[
        a_replica("r1", "RW", node="node-a"),
        a_replica("r2", "WO", node="node-b", rebuild={
            "state": "copying", "error": "", "copied_bytes": 256 * MiB,
            "total_bytes": 1024 * MiB, "kept_layers": 1, "copied_layers": 0,
            "source": "10.0.0.1:10010", "seconds": 3.2}),
        a_replica("r3", "ERR", node="node-c"),
        a_replica("r4", None, node="node-c")])
    assert views.rebuilds(volume) == [
        {"volume": "vol1", "replica": "r2", "node": "node-b", "done": 0.25}]


def test_rebuilds_progress_unknown_without_totals() -> None:
    volume = a_volume("vol1", robustness="degraded", replica_list=[
        a_replica("r1", "WO"),  # no rebuild reported yet
        a_replica("r2", "WO", rebuild={"state": "starting", "copied_bytes": 0,
                                       "total_bytes": 0})])
    found = views.rebuilds(volume)
    assert [(r["replica"], r["done"]) for r in found] == [("r1", None), ("r2", None)]


def test_rebuilds_of_a_detached_volume_are_none() -> None:
    volume = a_volume("vol1", state="detached", robustness="unknown",
                      replica_list=[{"name": "r1", "disk": "disk-1", "node": "node-a"}])
    assert views.rebuilds(volume) == []


# -- filter and sort ----------------------------------------------------------------------

def some_volumes() -> list[dict[str, Any]]:
    return [
        a_volume("web-data", node="node-a", labels={"app": "web", "tier": "gold"},
                 size=20 * GiB),
        a_volume("db-main", node="node-b", labels={"app": "db"}, robustness="degraded",
                 size=50 * GiB),
        a_volume("db-logs", node="node-a", labels={"app": "db"}, size=20 * GiB),
        a_volume("scratch", state="detached", robustness="unknown", size=5 * GiB),
    ]


def names(volumes: list[dict[str, Any]]) -> list[str]:
    return [v["name"] for v in volumes]


def test_filter_by_words_every_word_must_match_case_insensitively() -> None:
    volumes = some_volumes()
    assert names(views.filter_sort(volumes, "DB", "", "name", False)) == ["db-logs", "db-main"]
    assert names(views.filter_sort(volumes, "db node-a", "", "name", False)) == ["db-logs"]
    assert names(views.filter_sort(volumes, "tier=gold", "", "name", False)) == ["web-data"]
    assert names(views.filter_sort(volumes, "app=db", "", "name", False)) == [
        "db-logs", "db-main"]
    assert names(views.filter_sort(volumes, "node-b", "", "name", False)) == ["db-main"]
    assert names(views.filter_sort(volumes, "app=web node-b", "", "name", False)) == []
    assert names(views.filter_sort(volumes, "   ", "", "name", False)) == [
        "db-logs", "db-main", "scratch", "web-data"]


def test_filter_by_class() -> None:
    volumes = some_volumes()
    assert names(views.filter_sort(volumes, "", "degraded", "name", False)) == ["db-main"]
    assert names(views.filter_sort(volumes, "", "detached", "name", False)) == ["scratch"]
    assert names(views.filter_sort(volumes, "", "healthy", "name", False)) == [
        "db-logs", "web-data"]
    assert names(views.filter_sort(volumes, "db", "healthy", "name", False)) == ["db-logs"]


def test_sort_by_size_with_name_as_tie_break() -> None:
    volumes = some_volumes()
    assert names(views.filter_sort(volumes, "", "", "size", False)) == [
        "scratch", "db-logs", "web-data", "db-main"]
    descending = names(views.filter_sort(volumes, "", "", "size", True))
    assert descending[0] == "db-main"
    assert descending[-1] == "scratch"
    assert set(descending[1:3]) == {"db-logs", "web-data"}


def test_sort_by_an_unknown_key_sorts_by_name() -> None:
    volumes = some_volumes()
    assert names(views.filter_sort(volumes, "", "", "no-such-key", False)) == [
        "db-logs", "db-main", "scratch", "web-data"]
    assert names(views.filter_sort(volumes, "", "", "no-such-key", True)) == [
        "web-data", "scratch", "db-main", "db-logs"]


def test_sort_by_size_ascending_puts_unknown_sizes_last() -> None:
    volumes = [*some_volumes(), a_volume("unsized", size=None)]
    assert names(views.filter_sort(volumes, "", "", "size", False))[-1] == "unsized"


def test_sort_by_size_descending_puts_unknown_sizes_last() -> None:
    volumes = [a_volume("unsized", size=None), *some_volumes()]
    ordered = names(views.filter_sort(volumes, "", "", "size", True))
    assert ordered[0] == "db-main"
    assert ordered[-1] == "unsized"


# -- snapshot tree ------------------------------------------------------------------------

def a_snapshot(name: str | None, parent: str | None, created: str | None,
               removed: bool = False) -> dict[str, Any]:
    """A snapshot as GET /v1/volumes/NAME/snapshots?head=true lists it."""
    return {"name": name, "parent": parent, "created": created, "size": 10 * GiB,
            "actual_size": 4 * MiB, "removed": removed, "user_created": name is not None,
            "labels": {}}


def test_snapshot_tree_after_a_revert_keeps_the_newer_snapshots_on_a_branch() -> None:
    # s1 -> s2 -> head, reverted to s1, then s3 taken: s1 has s2 and s3, the head is under
    # s3; parents first (depth first, by layer id), the head last, as list_snapshots gives
    snapshots = [a_snapshot("s1", None, "2024-05-01T10:00:00Z"),
                 a_snapshot("s2", "s1", "2024-05-01T11:00:00Z"),
                 a_snapshot("s3", "s1", "2024-05-01T12:00:00Z"),
                 a_snapshot(None, "s3", None)]
    [root] = views.snapshot_tree(snapshots)
    assert root.name == "s1"
    assert not root.is_head
    assert [c.name for c in root.children] == ["s2", "s3"]
    s2, s3 = root.children
    assert s2.children == []
    [head] = s3.children
    assert head.is_head
    assert head.info["actual_size"] == 4 * MiB
    assert head.children == []


def test_snapshot_tree_keeps_removed_snapshots_in_place() -> None:
    snapshots = [a_snapshot("s1", None, "2024-05-01T10:00:00Z"),
                 a_snapshot("s2", "s1", "2024-05-01T11:00:00Z", removed=True),
                 a_snapshot("s3", "s2", "2024-05-01T12:00:00Z"),
                 a_snapshot(None, "s3", None)]
    [root] = views.snapshot_tree(snapshots)
    [s2] = root.children
    assert s2.name == "s2"
    assert s2.info["removed"] is True
    [s3] = s2.children
    assert s3.name == "s3"
    assert [c.is_head for c in s3.children] == [True]


def test_snapshot_tree_head_is_last_among_its_siblings() -> None:
    # a revert to s1 with no snapshot since: s2 and the head are both children of s1
    snapshots = [a_snapshot("s1", None, "2024-05-01T10:00:00Z"),
                 a_snapshot("s2", "s1", "2024-05-01T11:00:00Z"),
                 a_snapshot(None, "s1", None)]
    [root] = views.snapshot_tree(snapshots)
    assert [c.name for c in root.children] == ["s2", None]


def test_snapshot_tree_of_a_volume_without_snapshots_is_its_head() -> None:
    [head] = views.snapshot_tree([a_snapshot(None, None, None)])
    assert head.is_head
    assert views.snapshot_tree([]) == []


# -- I/O ----------------------------------------------------------------------------------

def engine_io(read_bytes: int, read_ops: int, write_bytes: int, write_ops: int, *,
              read_counts: list[int] | None = None, write_counts: list[int] | None = None,
              read_sum: float = 0.0, write_sum: float = 0.0) -> dict[str, Any]:
    """The engine's "io" stats (engine.py ``status``): counters and latency histograms,
    counts one longer than the bounds (the last: above every bound)."""
    empty = [0] * (len(BOUNDS) + 1)
    return {"read_ops": read_ops, "read_bytes": read_bytes, "write_ops": write_ops,
            "write_bytes": write_bytes, "flush_ops": 7, "errors": 0,
            "latency": {"read": {"buckets": list(BOUNDS), "counts": read_counts or empty,
                                 "sum": read_sum},
                        "write": {"buckets": list(BOUNDS), "counts": write_counts or empty,
                                  "sum": write_sum}}}


def counts_at(**at: int) -> list[int]:
    """Latency counts: {"i3": 5} puts 5 in bucket 3; "above" past the last bound."""
    counts = [0] * (len(BOUNDS) + 1)
    for key, value in at.items():
        counts[len(BOUNDS) if key == "above" else int(key[1:])] = value
    return counts


def test_io_figures_totals_and_rates_since_the_previous_sample() -> None:
    before = engine_io(100 * MiB, 1000, 50 * MiB, 500)
    now = engine_io(120 * MiB, 1400, 90 * MiB, 900)
    figures = views.io_figures(now, (1000.0, before), 1002.0)
    assert figures is not None
    assert figures["read_bytes"] == 120 * MiB
    assert figures["flush_ops"] == 7
    assert figures["errors"] == 0
    assert figures["rates"] == {"read_bytes": 10 * MiB, "read_ops": 200.0,
                                "write_bytes": 20 * MiB, "write_ops": 200.0}


@pytest.mark.parametrize(("age", "has_rates"), [
    (0.4, False), (0.5, True), (60.0, True), (120.0, True), (120.5, False)])
def test_io_figures_rates_only_from_a_sample_half_a_second_to_two_minutes_old(
        age: float, has_rates: bool) -> None:
    io = engine_io(2 * MiB, 20, 0, 0)
    figures = views.io_figures(io, (1000.0, engine_io(MiB, 10, 0, 0)), 1000.0 + age)
    assert figures is not None
    assert (figures["rates"] is not None) == has_rates
    if has_rates:
        assert figures["rates"]["read_bytes"] == pytest.approx(MiB / age)


def test_io_figures_no_rates_without_a_previous_sample() -> None:
    figures = views.io_figures(engine_io(MiB, 10, 0, 0), None, 1000.0)
    assert figures is not None
    assert figures["rates"] is None


def test_io_figures_counters_going_backwards_give_zero_rates() -> None:
    # the engine restarted: its counters began again from zero
    before = engine_io(500 * MiB, 5000, 300 * MiB, 3000)
    now = engine_io(4 * MiB, 40, 400 * MiB, 3100)
    figures = views.io_figures(now, (1000.0, before), 1010.0)
    assert figures is not None
    rates = figures["rates"]
    assert rates["read_bytes"] == 0
    assert rates["read_ops"] == 0
    assert rates["write_bytes"] == 10 * MiB
    assert rates["write_ops"] == 10.0


def test_io_figures_latency_mean_and_percentiles_from_the_buckets() -> None:
    # 100 reads: 60 at most 0.5 ms (bucket 2), 39 at most 1 ms (bucket 3), 1 at most 10 ms
    io = engine_io(MiB, 100, 0, 0, read_counts=counts_at(i2=60, i3=39, i6=1), read_sum=0.07)
    figures = views.io_figures(io, None, 1000.0)
    assert figures is not None
    read = figures["latency"]["read"]
    assert read["mean"] == pytest.approx(0.0007)
    assert read["p50"] == 0.0005
    assert read["p99"] == 0.001
    # no writes yet: nothing to say about their latency
    assert figures["latency"]["write"] is None


def test_io_figures_percentile_in_the_bucket_it_falls_in_at_an_exact_boundary() -> None:
    io = engine_io(MiB, 100, 0, 0, read_counts=counts_at(i0=50, i4=50), read_sum=0.1)
    figures = views.io_figures(io, None, 1000.0)
    assert figures is not None
    assert figures["latency"]["read"]["p50"] == 0.0001
    assert figures["latency"]["read"]["p99"] == 0.0025


def test_io_figures_percentile_above_the_last_bound_is_none() -> None:
    io = engine_io(0, 0, MiB, 100, write_counts=counts_at(i1=98, above=2), write_sum=30.0)
    figures = views.io_figures(io, None, 1000.0)
    assert figures is not None
    write = figures["latency"]["write"]
    assert write["p50"] == 0.00025
    assert write["p99"] is None
    assert write["mean"] == pytest.approx(0.3)
    # 99 of 100 within the bounds: the 99th percentile is still known
    io = engine_io(0, 0, MiB, 100, write_counts=counts_at(i15=99, above=1), write_sum=30.0)
    figures = views.io_figures(io, None, 1000.0)
    assert figures is not None
    assert figures["latency"]["write"]["p99"] == 10.0


def test_io_figures_none_without_io() -> None:
    assert views.io_figures(None, None, 1000.0) is None
    assert views.io_figures({}, None, 1000.0) is None


# -- last backups -------------------------------------------------------------------------

def a_backup(backup_id: str, volume: str, created: str, state: str = "complete"
             ) -> dict[str, Any]:
    """A backup as GET /v1/backups lists it (``_manifest_info`` or ``_job_info``)."""
    if state == "complete":
        return {"id": backup_id, "volume": volume, "snapshot": f"backup-{backup_id}",
                "created": created, "completed": created, "size": 10 * GiB,
                "data_bytes": 1 * GiB, "uploaded_bytes": 512 * MiB, "state": "complete",
                "labels": {}, "block_size": 2 * MiB, "compression": "lz4",
                "encrypted": False, "key_id": None, "base": None, "blocks": 512,
                "stats": {}}
    return {"id": backup_id, "volume": volume, "snapshot": f"backup-{backup_id}",
            "created": created, "size": None, "data_bytes": None, "uploaded_bytes": None,
            "state": state, "error": "target unreachable" if state == "error" else None,
            "labels": {}, "progress": 0.4}


def test_last_backups_is_the_newest_complete_backup_of_each_volume() -> None:
    backups = [a_backup("b1", "vol1", "2024-05-01T10:00:00Z"),
               a_backup("b3", "vol1", "2024-05-03T10:00:00Z"),
               a_backup("b2", "vol1", "2024-05-02T10:00:00Z"),
               a_backup("b4", "vol1", "2024-05-04T10:00:00Z", state="in-progress"),
               a_backup("b5", "vol1", "2024-05-05T10:00:00Z", state="error"),
               a_backup("c1", "vol2", "2024-04-01T10:00:00Z"),
               a_backup("d1", "vol3", "2024-05-05T10:00:00Z", state="in-progress")]
    newest = views.last_backups(backups)
    assert set(newest) == {"vol1", "vol2"}
    assert newest["vol1"]["id"] == "b3"
    assert newest["vol2"]["id"] == "c1"


def test_last_backups_of_nothing() -> None:
    assert views.last_backups([]) == {}


# -- how values are written ---------------------------------------------------------------

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(("text", "expected"), [
    ("2024-05-01T12:00:00Z", "0 s ago"),
    ("2024-05-01T11:59:01Z", "59 s ago"),
    ("2024-05-01T11:59:00Z", "1 min ago"),
    ("2024-05-01T11:00:01Z", "59 min ago"),
    ("2024-05-01T11:00:00Z", "1 h ago"),
    ("2024-04-30T12:00:01Z", "23 h ago"),
    ("2024-04-30T12:00:00Z", "1 d ago"),
    ("2024-04-21T11:00:00Z", "10 d ago"),
    ("2024-05-01T11:58:30+00:00", "1 min ago"),
    ("2024-05-01T13:58:30+02:00", "1 min ago"),  # another zone, same instant
    ("2024-05-01T11:58:30", "1 min ago"),  # no zone: UTC
    ("2024-05-01T12:05:00Z", "0 s ago"),  # in the future (clocks apart): never negative
    (None, ""),
    ("", ""),
    ("not a time", ""),
])
def test_ago(text: str | None, expected: str) -> None:
    assert views.ago(text, NOW) == expected


def test_parse_time_reads_a_time_without_zone_as_utc() -> None:
    assert views.parse_time("2024-05-01T12:00:00") == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert views.parse_time("2024-05-01T12:00:00Z") == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert views.parse_time("yesterday") is None


@pytest.mark.parametrize(("seconds", "expected"), [
    (None, "—"),
    (0.0, "0 µs"),
    (0.000250, "250 µs"),
    (0.0009994, "999 µs"),
    (0.001, "1.0 ms"),
    (0.0125, "12.5 ms"),
    (0.999, "999.0 ms"),
    (1.0, "1.00 s"),
    (12.345, "12.35 s"),
])
def test_duration(seconds: float | None, expected: str) -> None:
    assert views.duration(seconds) == expected


def test_size_and_rate() -> None:
    assert views.size(None) == ""
    assert views.size(0) == "0 B"
    assert views.size(1536) == "1.5 KiB"
    assert views.size(10 * GiB) == "10 GiB"
    assert views.rate(0.0) == "0 B/s"
    assert views.rate(MiB + 0.9) == "1 MiB/s"
    assert views.rate(2.5 * MiB) == "2.5 MiB/s"

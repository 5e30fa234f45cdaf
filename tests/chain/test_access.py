"""The replica's access lock: shared, range and exclusive access, and a snapshot that waits
for the write in flight (so a snapshot is a clean cut, DESIGN invariant 5)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.chain import Replica, durable
from appliance.chain import replica as replica_module
from appliance.chain.access import AccessLock, AccessStatistics

WAIT = 10.0  # seconds; a bound on every wait, never a timing assertion


def start(function: Callable[[], object]) -> threading.Event:
    """Run *function* in a thread; the event is set when it returns."""
    done = threading.Event()

    def run() -> None:
        function()
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return done


def reaches(statistics: Callable[[], AccessStatistics],
            condition: Callable[[AccessStatistics], bool]) -> bool:
    """Wait until the lock's *statistics* meet *condition* (True), or WAIT passes (False).
    The lock counts a thread as waiting only once it is blocked in an acquire."""
    deadline = time.monotonic() + WAIT
    while not condition(statistics()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def blocked(statistics: Callable[[], AccessStatistics], waiters: int,
            event: threading.Event) -> bool:
    """True when *waiters* threads wait for the lock and the one that sets *event* (once it
    holds its access) has not: it is among them."""
    return reaches(statistics, lambda now: now.waiting == waiters) and not event.is_set()


def test_overlapping_ranges_wait_and_disjoint_ranges_do_not() -> None:
    lock = AccessLock()
    with lock.range(0, 10):
        done = start(lambda: lock.range(20, 30).__enter__())
        assert done.wait(WAIT)
        done = start(lambda: lock.range(5, 15).__enter__())
        assert blocked(lock.statistics, 1, done)
    # the first range was released, but (20, 30) is still held and does not overlap (5, 15)
    assert done.wait(WAIT)


def test_exclusive_waits_for_holders_and_keeps_newcomers_out() -> None:
    lock = AccessLock()
    release = threading.Event()
    entered_exclusive = threading.Event()

    def hold_shared() -> None:
        with lock.shared():
            release.wait(WAIT)

    start(hold_shared)
    assert reaches(lock.statistics, lambda now: now.shared == 1)

    def exclusive() -> None:
        with lock.exclusive():
            entered_exclusive.set()

    ex_done = start(exclusive)
    assert blocked(lock.statistics, 1, ex_done)
    # a new reader arriving while the exclusive waits must queue behind it
    reader_saw_exclusive_done: list[bool] = []

    def late_reader() -> None:
        with lock.shared():
            reader_saw_exclusive_done.append(entered_exclusive.is_set())

    reader_done = start(late_reader)
    assert blocked(lock.statistics, 2, reader_done)
    release.set()
    assert ex_done.wait(WAIT) and reader_done.wait(WAIT)
    assert reader_saw_exclusive_done == [True]


def test_snapshot_waits_for_the_write_in_flight(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    replica = Replica.create(tmp_path / "r", 1 << 20)
    in_write = threading.Event()
    release = threading.Event()
    real_write_all = durable.write_all

    def slow_write_all(fd: int, data: object, offset: int) -> None:
        if offset == 8192:
            in_write.set()
            assert release.wait(WAIT)
        real_write_all(fd, data, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(replica_module, "write_all", slow_write_all)
    written = start(lambda: replica.write(b"w" * 4096, 8192))
    assert in_write.wait(WAIT)
    snapped = start(lambda: replica.snapshot("cut"))
    # the snapshot drains the write first
    assert blocked(replica.access_statistics, 1, snapped)
    release.set()
    assert written.wait(WAIT) and snapped.wait(WAIT)
    with replica.open_snapshot("cut") as cut:
        assert cut.read(8192, 4096) == b"w" * 4096  # acknowledged before the cut: inside
    replica.write(b"x" * 4096, 8192)
    with replica.open_snapshot("cut") as cut:
        assert cut.read(8192, 4096) == b"w" * 4096  # after the cut: not inside
    replica.close()

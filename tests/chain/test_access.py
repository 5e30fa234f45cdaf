"""The replica's access lock: shared, range and exclusive access, and a snapshot that waits
for the write in flight (so a snapshot is a clean cut, DESIGN invariant 5)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.chain import Replica, durable
from appliance.chain import replica as replica_module
from appliance.chain.access import AccessLock

WAIT = 10.0  # seconds; a bound on every wait, never a timing assertion


def start(function: Callable[[], object]) -> tuple[threading.Thread, threading.Event]:
    done = threading.Event()

    def run() -> None:
        function()
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, done


def blocked(event: threading.Event, thread: threading.Thread) -> bool:
    """True when *thread* is alive and has not set *event*: it waits on something."""
    thread.join(timeout=0.2)  # give it the chance to run; the result does not depend on it
    return thread.is_alive() and not event.is_set()


def test_overlapping_ranges_wait_and_disjoint_ranges_do_not() -> None:
    lock = AccessLock()
    with lock.range(0, 10):
        thread, done = start(lambda: lock.range(20, 30).__enter__())
        assert done.wait(WAIT)
        thread, done = start(lambda: lock.range(5, 15).__enter__())
        assert blocked(done, thread)
    # the first range was released, but (20, 30) is still held and does not overlap (5, 15)
    assert done.wait(WAIT)


def test_exclusive_waits_for_holders_and_keeps_newcomers_out() -> None:
    lock = AccessLock()
    release = threading.Event()
    entered_exclusive = threading.Event()

    def hold_shared() -> None:
        with lock.shared():
            release.wait(WAIT)

    holder, _ = start(hold_shared)
    holder.join(timeout=0.2)

    def exclusive() -> None:
        with lock.exclusive():
            entered_exclusive.set()

    ex_thread, ex_done = start(exclusive)
    assert blocked(ex_done, ex_thread)
    # a new reader arriving while the exclusive waits must queue behind it
    reader_saw_exclusive_done: list[bool] = []

    def late_reader() -> None:
        with lock.shared():
            reader_saw_exclusive_done.append(entered_exclusive.is_set())

    reader, reader_done = start(late_reader)
    assert blocked(reader_done, reader)
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
    _writer, written = start(lambda: replica.write(b"w" * 4096, 8192))
    assert in_write.wait(WAIT)
    snapshotter, snapped = start(lambda: replica.snapshot("cut"))
    assert blocked(snapped, snapshotter)  # the snapshot drains the write first
    release.set()
    assert written.wait(WAIT) and snapped.wait(WAIT)
    with replica.open_snapshot("cut") as cut:
        assert cut.read(8192, 4096) == b"w" * 4096  # acknowledged before the cut: inside
    replica.write(b"x" * 4096, 8192)
    with replica.open_snapshot("cut") as cut:
        assert cut.read(8192, 4096) == b"w" * 4096  # after the cut: not inside
    replica.close()

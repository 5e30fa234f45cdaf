"""Concurrency control for an open replica.

Three kinds of access, from one lock:

* **shared**: reads. Any number at once.
* **range**: data changes (write, write-zeroes, unmap, purge copying) over a block range.
  Any number at once as long as their ranges do not overlap; overlapping ones run one after
  the other, so a replica's layers and its index always agree.
* **exclusive**: changes of the chain's structure (snapshot, revert, expand, the switch
  at the end of a purge step). It waits for every other access to finish and keeps new ones
  out; it is preferred over new shared and range access so a snapshot under load is not
  starved.

The data path calls the ``acquire_*``/``release_*`` pairs directly: they cost a few hundred
nanoseconds, where a generator-based context manager costs more than the read it guards.
The context managers are for everything else.

Two observations cost nothing on the uncontended path, because only the exclusive side and
the waiting side keep them: :meth:`AccessLock.held_exclusively` lets the code that changes a
chain's structure assert that its caller holds the exclusive access, and
:meth:`AccessLock.statistics` shows who holds and who waits (tests wait on it instead of
guessing with timeouts).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class AccessStatistics:
    """A snapshot of an :class:`AccessLock`: how many hold each kind of access and how many
    threads wait for one (of any kind)."""

    shared: int
    ranges: int
    exclusive: bool
    waiting: int


class AccessLock:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._shared = 0
        self._ranges: list[tuple[int, int]] = []
        self._exclusive = False
        self._exclusive_waiting = 0
        self._exclusive_owner: int | None = None  # the thread id holding exclusive access
        self._waiting = 0  # threads blocked in an acquire, of any kind

    def _overlaps(self, start: int, end: int) -> bool:
        return any(start < held_end and held_start < end for held_start, held_end in self._ranges)

    # -- shared -----------------------------------------------------------------------------

    def acquire_shared(self) -> None:
        with self._lock:
            if self._exclusive or self._exclusive_waiting:
                self._waiting += 1
                try:
                    while self._exclusive or self._exclusive_waiting:
                        self._cond.wait()
                finally:
                    self._waiting -= 1
            self._shared += 1

    def release_shared(self) -> None:
        with self._lock:
            self._shared -= 1
            if not self._shared and self._exclusive_waiting:
                self._cond.notify_all()

    @contextmanager
    def shared(self) -> Iterator[None]:
        self.acquire_shared()
        try:
            yield
        finally:
            self.release_shared()

    # -- range ------------------------------------------------------------------------------

    def acquire_range(self, start: int, end: int) -> tuple[int, int]:
        """Hold blocks ``[start, end)``; pass the returned token to :meth:`release_range`."""
        entry = (start, end)
        with self._lock:
            if self._exclusive or self._exclusive_waiting or \
                    (self._ranges and self._overlaps(start, end)):
                self._waiting += 1
                try:
                    while self._exclusive or self._exclusive_waiting or self._overlaps(start, end):
                        self._cond.wait()
                finally:
                    self._waiting -= 1
            self._ranges.append(entry)
        return entry

    def release_range(self, entry: tuple[int, int]) -> None:
        with self._lock:
            self._ranges.remove(entry)
            self._cond.notify_all()

    @contextmanager
    def range(self, start: int, end: int) -> Iterator[None]:
        entry = self.acquire_range(start, end)
        try:
            yield
        finally:
            self.release_range(entry)

    # -- exclusive --------------------------------------------------------------------------

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._lock:
            self._exclusive_waiting += 1
            try:
                if self._exclusive or self._shared or self._ranges:
                    self._waiting += 1
                    try:
                        while self._exclusive or self._shared or self._ranges:
                            self._cond.wait()
                    finally:
                        self._waiting -= 1
            finally:
                self._exclusive_waiting -= 1
            self._exclusive = True
            self._exclusive_owner = threading.get_ident()
        try:
            yield
        finally:
            with self._lock:
                self._exclusive = False
                self._exclusive_owner = None
                self._cond.notify_all()

    def held_exclusively(self) -> bool:
        """True when the calling thread holds the exclusive access (for assertions)."""
        return self._exclusive_owner == threading.get_ident()

    # -- observation ------------------------------------------------------------------------

    def statistics(self) -> AccessStatistics:
        with self._lock:
            return AccessStatistics(shared=self._shared, ranges=len(self._ranges),
                                    exclusive=self._exclusive, waiting=self._waiting)

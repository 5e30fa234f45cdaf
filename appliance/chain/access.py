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
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class AccessLock:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._shared = 0
        self._ranges: list[tuple[int, int]] = []
        self._exclusive = False
        self._exclusive_waiting = 0

    def _overlaps(self, start: int, end: int) -> bool:
        return any(start < held_end and held_start < end for held_start, held_end in self._ranges)

    def _wake_exclusive(self) -> None:
        if not self._shared and self._exclusive_waiting:
            self._cond.notify_all()

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._exclusive_waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._wake_exclusive()

    @contextmanager
    def range(self, start: int, end: int) -> Iterator[None]:
        """Hold blocks ``[start, end)``."""
        entry = (start, end)
        with self._cond:
            while self._exclusive or self._exclusive_waiting or self._overlaps(start, end):
                self._cond.wait()
            self._ranges.append(entry)
        try:
            yield
        finally:
            with self._cond:
                self._ranges.remove(entry)
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._exclusive_waiting += 1
            try:
                while self._exclusive or self._shared or self._ranges:
                    self._cond.wait()
            finally:
                self._exclusive_waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()

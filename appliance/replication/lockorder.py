"""The engine's lock order, checked in debug runs (docs/engine-locks.md).

Every lock of the engine has a rank; a thread may only take a lock of a higher rank than
every lock it holds (or take again a reentrant lock it holds). Taking one out of order
raises :class:`LockOrderError` instead of, some day, deadlocking.

The check is chosen once, when the engine is built: with ``APPLIANCE_LOCK_CHECK=1`` in the
environment the engine's locks are wrapped by checking proxies; otherwise :class:`Locks`
hands back the plain locks themselves, and the data path pays nothing.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from enum import IntEnum
from typing import Any, Protocol

from appliance.chain.access import AccessLock

#: the environment variable that turns the check on ("1")
ENVIRONMENT = "APPLIANCE_LOCK_CHECK"


class Rank(IntEnum):
    """The engine's locks, in the order they may be taken."""

    REBUILD = 1  # Engine.rebuild_lock: one rebuild (or structure change) at a time
    IO = 2  # the engine's AccessLock: a block range (writes), or exclusive (writes paused)
    ROSTER = 3  # Roster.lock: modes and membership records
    MEMBER = 4  # Member's connection pool
    STATS = 5  # the engine's counters


class LockOrderError(AssertionError):
    """A lock was taken out of the documented order (a bug)."""


class Lock(Protocol):
    """What the engine needs of a lock (threading.Lock and RLock have it)."""

    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...

    def release(self) -> None: ...

    def __enter__(self) -> bool: ...

    def __exit__(self, kind: Any, exc: Any, traceback: Any) -> None: ...


class IOLock(Protocol):
    """What the engine uses of its :class:`AccessLock`."""

    def acquire_range(self, start: int, end: int) -> tuple[int, int]: ...

    def release_range(self, entry: tuple[int, int]) -> None: ...

    def exclusive(self) -> AbstractContextManager[None]: ...


class Locks:
    """Makes the engine's locks; checked ones when *check* is true."""

    def __init__(self, check: bool) -> None:
        self.check = check
        self._held = threading.local()

    @classmethod
    def from_environment(cls) -> Locks:
        return cls(os.environ.get(ENVIRONMENT) == "1")

    def lock(self, rank: Rank, lock: Lock) -> Lock:
        """*lock* itself, or a proxy that checks the order before taking it."""
        return CheckedLock(self, rank, lock) if self.check else lock

    def access(self, lock: AccessLock) -> IOLock:
        """The engine's I/O lock, itself or checked (rank IO)."""
        return CheckedAccessLock(self, lock) if self.check else lock

    # -- the check --------------------------------------------------------------------------

    def held(self) -> list[tuple[Rank, object]]:
        """The (rank, lock) pairs this thread holds, in the order taken."""
        stack: list[tuple[Rank, object]] | None = getattr(self._held, "stack", None)
        if stack is None:
            stack = self._held.stack = []
        return stack

    def before(self, rank: Rank, lock: object) -> None:
        """Raise if this thread may not take *lock* of *rank* now."""
        for held_rank, held in self.held():
            if held is lock:
                continue  # a reentrant lock taken again
            if held_rank >= rank:
                raise LockOrderError(f"lock order: {rank.name} taken while holding "
                                     f"{held_rank.name} (see docs/engine-locks.md)")

    def taken(self, rank: Rank, lock: object) -> None:
        self.held().append((rank, lock))

    def released(self, lock: object) -> None:
        stack = self.held()
        for index in range(len(stack) - 1, -1, -1):
            if stack[index][1] is lock:
                del stack[index]
                return


class CheckedLock:
    """A lock that checks the order before each acquisition."""

    def __init__(self, locks: Locks, rank: Rank, lock: Lock) -> None:
        self.locks = locks
        self.rank = rank
        self.lock = lock

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        self.locks.before(self.rank, self)
        got = self.lock.acquire(blocking, timeout)
        if got:
            self.locks.taken(self.rank, self)
        return got

    def release(self) -> None:
        self.locks.released(self)
        self.lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, kind: Any, exc: Any, traceback: Any) -> None:
        self.release()


class CheckedAccessLock:
    """The engine's I/O lock, checking the order of its range and exclusive access."""

    def __init__(self, locks: Locks, lock: AccessLock) -> None:
        self.locks = locks
        self.lock = lock

    def acquire_range(self, start: int, end: int) -> tuple[int, int]:
        self.locks.before(Rank.IO, self)
        token = self.lock.acquire_range(start, end)
        self.locks.taken(Rank.IO, self)
        return token

    def release_range(self, entry: tuple[int, int]) -> None:
        self.locks.released(self)
        self.lock.release_range(entry)

    def exclusive(self) -> AbstractContextManager[None]:
        return self._exclusive()

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        self.locks.before(Rank.IO, self)
        with self.lock.exclusive():
            self.locks.taken(Rank.IO, self)
            try:
                yield
            finally:
                self.locks.released(self)

"""The lock-order check the engine tests run with (docs/engine-locks.md)."""

from __future__ import annotations

import threading

import pytest

from appliance.chain.access import AccessLock
from appliance.replication.lockorder import LockOrderError, Locks, Rank


def test_locks_taken_in_order_pass() -> None:
    locks = Locks(check=True)
    rebuild = locks.lock(Rank.REBUILD, threading.Lock())
    io = locks.access(AccessLock())
    roster = locks.lock(Rank.ROSTER, threading.RLock())
    member = locks.lock(Rank.MEMBER, threading.Lock())
    with rebuild, io.exclusive(), roster, roster, member:  # the roster's lock is reentrant
        pass
    token = io.acquire_range(0, 1)
    with roster:
        pass
    io.release_range(token)
    assert locks.held() == []


def test_a_lock_out_of_order_raises_before_it_is_taken() -> None:
    locks = Locks(check=True)
    io = locks.access(AccessLock())
    roster = locks.lock(Rank.ROSTER, threading.RLock())
    stats = locks.lock(Rank.STATS, threading.Lock())
    with roster:
        with pytest.raises(LockOrderError, match="IO taken while holding ROSTER"):
            io.acquire_range(0, 1)
        with pytest.raises(LockOrderError, match="IO taken while holding ROSTER"), \
                io.exclusive():
            pass
    with stats, pytest.raises(LockOrderError, match="ROSTER taken while holding STATS"):
        roster.acquire()
    first = locks.lock(Rank.MEMBER, threading.Lock())
    second = locks.lock(Rank.MEMBER, threading.Lock())
    with first, pytest.raises(LockOrderError, match="MEMBER taken while holding MEMBER"):
        second.acquire()
    assert locks.held() == []
    with io.exclusive():  # nothing was left taken
        pass


def test_unchecked_locks_are_the_plain_locks() -> None:
    """Off, the check costs nothing: the engine gets its locks themselves."""
    locks = Locks(check=False)
    lock, access = threading.Lock(), AccessLock()
    assert locks.lock(Rank.STATS, lock) is lock
    assert locks.access(access) is access

"""One Python thread state per nbdkit thread, kept for the thread's life.

nbdkit's Python plugin wraps every callback in ``PyGILState_Ensure`` / ``PyGILState_Release``.
On a thread that has no Python thread state of its own (every nbdkit worker), that pair
creates a thread state and destroys it again around each request: an mmap, a munmap and a
gettid per I/O, a longer hand-off of the interpreter lock, and no ``threading.local`` that
outlives a request. :func:`pin` takes one more reference on the current thread state (one
``PyGILState_Ensure`` that is never released), so nbdkit's own pair finds the state in place
and keeps it.

The cost: the state of a thread that exits stays allocated until the process ends (a few KiB
per nbdkit worker thread; nbdkit starts ``-t`` of them per NBD connection). Engines hold a
handful of long-lived connections, so this is bounded in practice; :func:`pinned` counts
them (the engine's status shows it as ``threads_pinned``).

The check that a thread is pinned uses a ``threading.local``, which lives in the thread
state itself: a new thread (even one that reuses an exited thread's id) starts unpinned.
"""

from __future__ import annotations

import ctypes
import threading

_ensure = ctypes.pythonapi.PyGILState_Ensure
_ensure.restype = ctypes.c_int
_ensure.argtypes = []

_local = threading.local()
_count_lock = threading.Lock()
_pinned = 0


def pin() -> None:
    """Keep the calling thread's Python thread state until the thread ends (the caller holds
    the interpreter lock, as every nbdkit callback does)."""
    global _pinned  # noqa: PLW0603 - one count per process
    if getattr(_local, "pinned", False):
        return
    _ensure()
    _local.pinned = True
    with _count_lock:
        _pinned += 1


def pinned() -> int:
    """How many threads have pinned their state in this process."""
    return _pinned

"""Long blocking jobs (backups, restores, clones) in worker threads that a cancellation
reaches.

``trio.to_thread.run_sync`` cannot stop a thread: cancelled, it either waits for the
thread to finish (the daemon does not stop until the job is done) or abandons it (the job
goes on writing behind the daemon's back). :func:`run_job` does neither: it hands the job
a cancel token (a ``threading.Event``), sets the token when the calling trio scope is
cancelled, and waits for the thread to stop. A job checks its token between blocks or
chunks and, once set, stops with :class:`~appliance.errors.Cancelled` without
committing anything; so a cancellation ends a job within one block's work.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")


async def run_job(job: Callable[..., T], *args: Any, cancel: threading.Event | None = None) -> T:
    """Run ``job(*args, cancel=TOKEN)`` in a worker thread and return what it returns.

    *cancel* is the token to hand over (one the caller can also set, to cancel the job
    alone); by default a new one. When the calling scope is cancelled, the token is set
    and the thread waited for, shielded; then ``trio.Cancelled`` propagates, unless the
    job finished anyway (it was past its last check): its result is returned, and the
    caller meets the cancellation at its next checkpoint."""
    token = threading.Event() if cancel is None else cancel
    stopped = trio.Event()
    finished: list[T] = []

    def work() -> T:
        try:
            value = job(*args, cancel=token)
            finished.append(value)
            return value
        finally:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(stopped.set)

    try:
        return await trio.to_thread.run_sync(work, abandon_on_cancel=True)
    except trio.Cancelled:
        token.set()
        with trio.CancelScope(shield=True):
            await stopped.wait()
        if finished:
            return finished[0]
        raise

"""Pacing long background reads (a scrub) so that foreground I/O keeps its latency: a
caller reports the bytes it read, and :class:`Pace` sleeps as long as it takes to keep
the average rate at or under a limit, and stops the work when asked to."""

from __future__ import annotations

import threading
import time

from appliance.errors import Cancelled


class Pace:
    """Call with the bytes just read: returns once the average since the start is at or
    under *rate* bytes per second (0: no limit); raises
    :class:`~appliance.errors.Cancelled` once *stop* is set."""

    def __init__(self, rate: float, stop: threading.Event | None = None) -> None:
        self.rate = rate
        self.stop = stop
        self.done = 0
        self.started = time.monotonic()

    def __call__(self, count: int) -> None:
        self.done += count
        if self.stop is not None and self.stop.is_set():
            raise Cancelled("stopped on request")
        if self.rate > 0:
            ahead = self.started + self.done / self.rate - time.monotonic()
            if ahead > 0:
                if self.stop is not None:
                    if self.stop.wait(ahead):
                        raise Cancelled("stopped on request")
                else:
                    time.sleep(ahead)

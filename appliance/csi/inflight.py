"""One operation at a time per volume or snapshot: a second call for the same object while
one runs is refused with ABORTED, as the CSI spec allows ("operation pending"), instead of
racing it; the caller retries with back-off."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from appliance.errors import Pending


class InFlight:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy: set[str] = set()

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._lock:
            if key in self._busy:
                raise Pending(f"an operation on {key} is in progress; try again when it ends")
            self._busy.add(key)
        try:
            yield
        finally:
            with self._lock:
                self._busy.discard(key)

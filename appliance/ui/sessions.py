"""Browser sessions of the web UI.

The API token is typed once into the login form; the browser then holds only a random
session id in a cookie that is ``HttpOnly`` (no script reads it), ``SameSite=Strict`` (no
other site's page sends it) and has no expiry (it ends with the browser session). Each
session has its own CSRF token, which every state-changing request must carry besides the
cookie. Sessions live in the daemon's memory: a restart logs everyone out.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

COOKIE = "appliance_ui"
IDLE = 8 * 3600.0  # seconds without a request before a session ends
LIFETIME = 24 * 3600.0  # seconds after login at most
MOST = 256  # sessions kept; the least recently used goes first


@dataclass
class Session:
    id: str
    csrf: str
    created: float
    seen: float
    flashes: list[tuple[str, str]] = field(default_factory=list)  # (kind, text)

    def flash(self, kind: str, text: str) -> None:
        """A message for the next page shown (kind ``ok`` or ``error``)."""
        self.flashes.append((kind, text))
        del self.flashes[:-5]

    def take_flashes(self) -> list[tuple[str, str]]:
        taken, self.flashes = self.flashes, []
        return taken

    def csrf_matches(self, offered: str | None) -> bool:
        return offered is not None and hmac.compare_digest(offered.encode(), self.csrf.encode())


class Sessions:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._sessions: dict[str, Session] = {}
        self._clock = clock

    def create(self) -> Session:
        now = self._clock()
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now, now)
        self._sessions[session.id] = session
        while len(self._sessions) > MOST:
            oldest = min(self._sessions.values(), key=lambda s: s.seen)
            del self._sessions[oldest.id]
        return session

    def get(self, session_id: str | None, *, touch: bool = True) -> Session | None:
        """The live session with this id, or None; *touch*: the request is the operator's
        (a page, an action), so its idle time restarts (a live part's poll does not)."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self._clock()
        if now - session.seen > IDLE or now - session.created > LIFETIME:
            del self._sessions[session_id]
            return None
        if touch:
            session.seen = now
        return session

    def end(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(session_id, None)

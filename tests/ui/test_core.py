"""The UI's shared checks, without a daemon: where a login may send the browser back to,
which requests count as the UI's own, sessions' expiry, forms' limits."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.requests import Request

from appliance.errors import InvalidArgument
from appliance.ui import sessions as sessions_module
from appliance.ui.core import MAX_FORM, read_form, safe_next, same_origin
from appliance.ui.sessions import Sessions


def request(headers: dict[str, str], *, body: bytes = b"", scheme: str = "http",
            host: str = "node1:9500") -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in {"host": host, **headers}.items()]
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "scheme": scheme, "path": "/ui/x",
             "headers": raw, "query_string": b"", "server": ("node1", 9500)}
    return Request(scope, receive)


@pytest.mark.parametrize("target", ["/ui/", "/ui/volumes?q=a", "/ui/volumes/db"])
def test_safe_next_keeps_a_path_of_the_ui(target: str) -> None:
    assert safe_next(target) == target


@pytest.mark.parametrize("target", [
    None, "", "/", "/v1/volumes", "https://evil.example/ui/", "//evil.example/ui/",
    "/ui\\..\\x", "/ui/\r\nSet-Cookie: a=b", "ui/", "/uix/volumes", "javascript:alert(1)"])
def test_safe_next_sends_anything_else_to_the_dashboard(target: str | None) -> None:
    assert safe_next(target) == "/ui/"


def test_same_origin_believes_the_browsers_fetch_metadata() -> None:
    assert same_origin(request({"Sec-Fetch-Site": "same-origin"}))
    assert same_origin(request({"Sec-Fetch-Site": "none"}))  # typed or bookmarked
    for site in ("same-site", "cross-site"):
        assert not same_origin(request({"Sec-Fetch-Site": site}))
        assert not same_origin(request({"Sec-Fetch-Site": site, "Origin": "http://node1:9500"}))
    # behind a TLS proxy the browser's origin is https and another host: still its own
    assert same_origin(request({"Sec-Fetch-Site": "same-origin",
                                "Origin": "https://storage.example"}))


def test_same_origin_without_fetch_metadata_compares_the_origin_with_the_host() -> None:
    assert same_origin(request({}))  # not a browser: the CSRF token decides
    assert same_origin(request({"Origin": "http://node1:9500"}))
    assert same_origin(request({"Origin": "https://node1:9500"}))  # a TLS proxy in front
    assert same_origin(request({"Origin": "https://storage.example",
                                "X-Forwarded-Host": "storage.example"}))
    assert not same_origin(request({"Origin": "http://evil.example"}))
    assert not same_origin(request({"Origin": "http://node1:9501"}))
    assert not same_origin(request({"Origin": "null"}))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_session_ends_when_idle_or_too_old_and_polls_do_not_keep_it() -> None:
    clock = Clock()
    sessions = Sessions(clock=clock)
    first = sessions.create()
    assert sessions.get(first.id) is first
    clock.now += sessions_module.IDLE - 1
    assert sessions.get(first.id, touch=False) is first  # a poll: not activity
    clock.now += 2
    assert sessions.get(first.id) is None  # idle too long
    assert sessions.get(first.id) is None  # and gone
    second = sessions.create()
    for _ in range(int(sessions_module.LIFETIME // (sessions_module.IDLE / 2)) + 1):
        clock.now += sessions_module.IDLE / 2
        if sessions.get(second.id) is None:
            break
    else:
        raise AssertionError("a session in use lived beyond its lifetime")
    assert clock.now - 1000.0 > sessions_module.LIFETIME


def test_sessions_are_random_bounded_and_end_on_request() -> None:
    sessions = Sessions()
    made = [sessions.create() for _ in range(sessions_module.MOST + 5)]
    assert len({s.id for s in made}) == len(made) and len({s.csrf for s in made}) == len(made)
    assert all(len(s.id) >= 40 for s in made)
    assert sessions.get(made[0].id) is None  # the least recently used went
    assert sessions.get(made[-1].id) is made[-1]
    sessions.end(made[-1].id)
    assert sessions.get(made[-1].id) is None
    assert sessions.get(None) is None and sessions.get("") is None
    assert not made[1].csrf_matches(None) and not made[1].csrf_matches(made[2].csrf)
    assert made[1].csrf_matches(made[1].csrf)


async def test_read_form_takes_an_urlencoded_form_only_and_bounds_it() -> None:
    kind = {"Content-Type": "application/x-www-form-urlencoded"}
    form = await read_form(request(kind, body=b"a=1&b=&a=2&t%5B%5D=x&t%5B%5D=y"))
    assert form == {"a": "2", "b": "", "t[]": "x,y"}
    with pytest.raises(InvalidArgument, match="larger than"):
        await read_form(request(kind, body=b"a=" + b"x" * MAX_FORM))
    with pytest.raises(InvalidArgument, match="application/json"):
        await read_form(request({"Content-Type": "application/json"}, body=b"{}"))
    with pytest.raises(InvalidArgument, match="no content type"):
        await read_form(request({}, body=b"a=1"))

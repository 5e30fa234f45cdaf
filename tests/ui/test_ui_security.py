"""The web UI's security: nothing but the login page and its assets without a session,
a Content-Security-Policy on every answer, and no change made cross-site (a session
cookie that is SameSite=Strict, and a CSRF token and same-origin check on every POST),
tried with plain HTTP and with a real browser on another site's page."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, expect

from appliance.ui.app import GUARDED
from tests.harness import Node
from tests.ui.browser import api, login, new_page, token

PUBLIC_ASSETS = ["pico.css", "app.css", "favicon.svg"]
PRIVATE_ASSETS = ["htmx.js", "app.js"]


def concrete(path: str) -> str:
    return re.sub(r"\{[a-z]+\}", "x", path)


@contextmanager
def session(node: Node) -> Iterator[tuple[httpx.Client, str]]:
    """A client logged in as a browser would be, and its CSRF token."""
    with httpx.Client(base_url=node.url, timeout=60, follow_redirects=False) as client:
        answer = client.post("/ui/login", data={"token": token(node), "next": "/ui/"},
                             headers={"Origin": node.url})
        assert answer.status_code == 303, answer.text
        page = client.get("/ui/new-volume")
        found = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert found is not None
        yield client, found.group(1)


def assert_headers(answer: httpx.Response) -> None:
    policy = answer.headers.get("content-security-policy", "")
    assert "default-src 'none'" in policy and "script-src 'self'" in policy, answer.url
    assert "frame-ancestors 'none'" in policy and "form-action 'self'" in policy
    assert answer.headers.get("x-content-type-options") == "nosniff"


def test_nothing_but_the_login_page_and_its_assets_without_a_session(node: Node) -> None:
    node.cli("volume", "create", "x", "--size", "16M", "--replicas", "1")
    with httpx.Client(base_url=node.url, timeout=60, follow_redirects=False) as client:
        for path, page, action in GUARDED:
            if page is not None:
                answer = client.get("/ui" + concrete(path))
                assert answer.status_code == 303, path
                assert answer.headers["location"].startswith("/ui/login?next="), path
                assert_headers(answer)
                polled = client.get("/ui" + concrete(path), headers={"HX-Request": "true"})
                assert polled.status_code == 401, path
                assert polled.headers["hx-redirect"].startswith("/ui/login?next="), path
            if action is not None:
                answer = client.post("/ui" + concrete(path), data={"name": "evil"},
                                     headers={"Origin": node.url})
                assert answer.status_code == 401, path
                assert "session has ended" in answer.text
                assert_headers(answer)
        for asset in PRIVATE_ASSETS:
            answer = client.get(f"/ui/assets/{asset}")
            assert answer.status_code == 401 and not answer.content.startswith(b"(")
        for asset in PUBLIC_ASSETS:
            answer = client.get(f"/ui/assets/{asset}")
            assert answer.status_code == 200, asset
            assert_headers(answer)
        login = client.get("/ui/login")
        assert login.status_code == 200 and 'type="password"' in login.text
        assert_headers(login)
        assert client.get("/ui/assets/../token").status_code == 404
        assert client.get("/").headers["location"] == "/ui/"
    # the unauthenticated POSTs changed nothing
    assert api(node, "GET", "/v1/volumes/x/snapshots") == []
    assert [v["name"] for v in api(node, "GET", "/v1/volumes")] == ["x"]


def test_a_post_needs_the_session_csrf_token_and_the_same_origin(node: Node) -> None:
    node.cli("volume", "create", "x", "--size", "16M", "--replicas", "1")
    with session(node) as (client, csrf):
        for asset in PRIVATE_ASSETS:
            assert client.get(f"/ui/assets/{asset}").status_code == 200
        url = "/ui/volumes/x/snapshots"
        refused = [
            ({"name": "a"}, {"Origin": node.url}),  # no token
            ({"name": "b", "csrf": "0" * 43}, {"Origin": node.url}),  # a wrong one
            ({"name": "c", "csrf": csrf}, {"Origin": "http://evil.example"}),
            ({"name": "d", "csrf": csrf}, {"Origin": node.url, "Sec-Fetch-Site": "cross-site"}),
            ({"name": "e", "csrf": csrf}, {"Origin": node.url, "Sec-Fetch-Site": "same-site"}),
        ]
        for form, headers in refused:
            answer = client.post(url, data=form, headers=headers)
            assert answer.status_code == 403, (form, headers, answer.text)
            assert_headers(answer)
        assert api(node, "GET", "/v1/volumes/x/snapshots") == []
        # the token in the header htmx sends instead of the field
        answer = client.post(url, data={"name": "h"}, headers={
            "Origin": node.url, "X-CSRF-Token": "0" * 43})
        assert answer.status_code == 403
        # a JSON body is not a form: refused, not parsed
        answer = client.post(url, json={"name": "f", "csrf": csrf}, headers={"Origin": node.url})
        assert answer.status_code == 403
        answer = client.post(url, data={"name": "ok", "csrf": csrf},
                             headers={"Origin": node.url, "Sec-Fetch-Site": "same-origin"})
        assert answer.status_code == 303, answer.text
        answer = client.post(url, data={"name": "ok2"}, headers={
            "Origin": node.url, "X-CSRF-Token": csrf})
        assert answer.status_code == 303, answer.text
        assert [s["name"] for s in api(node, "GET", "/v1/volumes/x/snapshots")] == ["ok", "ok2"]
        # another session's token is not this one's
        with session(node) as (_, other_csrf):
            assert other_csrf != csrf
            answer = client.post(url, data={"name": "g", "csrf": other_csrf},
                                 headers={"Origin": node.url})
            assert answer.status_code == 403
    assert [s["name"] for s in api(node, "GET", "/v1/volumes/x/snapshots")] == ["ok", "ok2"]


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def attacker(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """Another web site: a static server on its own port, serving *directory*."""
    directory = tmp_path / "site"
    directory.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield directory, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_another_sites_page_cannot_make_a_change_in_a_logged_in_browser(
        node: Node, browser: Browser, attacker: tuple[Path, int], host: str) -> None:
    """localhost is another site than 127.0.0.1 (the cookie is not sent at all);
    127.0.0.1 on another port is the same site but another origin (the cookie is sent,
    the origin check and the missing CSRF token refuse)."""
    node.cli("volume", "create", "x", "--size", "16M", "--replicas", "1")
    directory, port = attacker
    (directory / "index.html").write_text(f"""<!doctype html><title>prize</title>
<form method="post" action="{node.url}/ui/volumes/x/snapshots">
<input type="hidden" name="name" value="evil"><button id="go">Claim the prize</button>
</form>""")
    context, page, _ = new_page(browser)
    login(page, node)
    page.goto(f"http://{host}:{port}/index.html")
    page.click("#go")
    page.wait_for_load_state()
    assert page.url.startswith(node.url)
    if host == "localhost":
        expect(page.locator("body")).to_contain_text("session has ended")
    else:
        expect(page.locator("body")).to_contain_text("another site was refused")
    assert api(node, "GET", "/v1/volumes/x/snapshots") == []
    # the session itself still works from its own pages
    page.goto(f"{node.url}/ui/volumes/x")
    page.fill("form[action$='/snapshots'] input[name=name]", "mine")
    page.click("#take-snapshot")
    expect(page.locator(".flashes")).to_contain_text("Snapshot mine taken")
    assert [s["name"] for s in api(node, "GET", "/v1/volumes/x/snapshots")] == ["mine"]
    context.close()

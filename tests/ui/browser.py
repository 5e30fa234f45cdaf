"""Driving Debian's chromium with Playwright (no browser download) against a real daemon:
logging in, the API beside the browser, axe-core in the page, screenshots kept as the
suite's artifacts."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Page, sync_playwright

from tests.harness import Node

CHROMIUM = "/usr/bin/chromium"
# what the Debian chromium needs as root on this machine: no sandbox, no GPU, no calls home
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]
ROOT = Path(__file__).resolve().parents[2]
AXE = ROOT / "appliance" / "ui" / "node_modules" / "axe-core" / "axe.min.js"
SHOTS = Path(os.environ.get("APPLIANCE_UI_SCREENSHOTS", ROOT / "build" / "ui-screenshots"))
TIMEOUT_MS = 60_000


@contextmanager
def chromium() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS,
                                             headless=True)
        try:
            yield browser
        finally:
            browser.close()


def new_page(browser: Browser, *, width: int = 1280, height: int = 900,
             javascript: bool = True) -> tuple[BrowserContext, Page, list[str]]:
    """A fresh context (no cookies) and page; the list collects the page's script errors
    and the console's errors."""
    context = browser.new_context(viewport={"width": width, "height": height},
                                  java_script_enabled=javascript)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    problems: list[str] = []

    def console(message: ConsoleMessage) -> None:
        if message.type == "error":
            problems.append(f"console error: {message.text}")

    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", console)
    return context, page, problems


def token(node: Node) -> str:
    return node.token_file.read_text().strip()


def login(page: Page, node: Node) -> None:
    page.goto(f"{node.url}/ui/login")
    page.fill("#token", token(node))
    page.click("button[type=submit]")
    page.wait_for_url(f"{node.url}/ui/")


def api(node: Node, method: str, path: str, body: Any = None, status: int | None = None
        ) -> Any:
    response = httpx.request(method, node.url + path, json=body, timeout=120, headers={
        "Authorization": f"Bearer {token(node)}"})
    if status is not None:
        assert response.status_code == status, response.text
    else:
        assert response.status_code < 400, response.text
    return response.json() if response.content else None


def screenshot(page: Page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=path, full_page=True)
    return path


def axe(page: Page) -> list[dict[str, Any]]:
    """axe-core's serious and critical findings on the page as it is."""
    page.evaluate(AXE.read_text())  # through the debugger: the page's CSP allows no inline script
    result: dict[str, Any] = page.evaluate(
        "async () => await axe.run(document, {resultTypes: ['violations']})")
    return [{"id": v["id"], "impact": v["impact"], "help": v["help"],
             "nodes": [n["html"][:160] for n in v["nodes"][:3]]}
            for v in result["violations"] if v["impact"] in ("serious", "critical")]

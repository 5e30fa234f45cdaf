"""Every page of the web UI: no serious or critical accessibility finding (axe-core in
the browser), readable without JavaScript (and its forms work), usable from the keyboard
and on a narrow screen."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.harness import Node, wait_for
from tests.ui.browser import api, axe, login, new_page, screenshot


@pytest.fixture(scope="module")
def furnished(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Node, str]]:
    """A node with something on every page, shared by this module's tests (none changes
    what another looks at): an attached volume with two replicas and two snapshots, a
    detached one, a backup, a recurring job. Yields the node and the backup's id."""
    root = tmp_path_factory.mktemp("furnished")
    node = Node(root)
    node.start()
    try:
        yield furnish(node, root)
    finally:
        node.cleanup()


def furnish(node: Node, root: Path) -> tuple[Node, str]:
    (root / "disk2").mkdir()
    node.cli("disk", "add", root / "disk2")
    (root / "backups").mkdir()
    node.cli("backup-target", "set", f"file://{root / 'backups'}")
    node.cli("volume", "create", "db", "--size", "64M", "--replicas", "2")
    node.cli("volume", "create", "logs", "--size", "32M", "--replicas", "1")
    node.cli("volume", "attach", "db")
    node.cli("snapshot", "create", "db", "before-upgrade")
    node.cli("snapshot", "create", "db", "after-upgrade")
    backup = node.cli("backup", "create", "db").stdout.strip()
    node.cli("job", "create", "nightly", "--task", "snapshot", "--cron", "0 3 * * *",
             "--retain", "7")
    return node, backup


def pages(backup: str) -> list[tuple[str, str]]:
    return [("dashboard", "/ui/"), ("volumes", "/ui/volumes"),
            ("volume-new", "/ui/new-volume"), ("volume", "/ui/volumes/db"),
            ("volume-delete", "/ui/volumes/db/delete"),
            ("snapshot-revert", "/ui/volumes/db/snapshots/before-upgrade/revert"),
            ("nodes", "/ui/nodes"), ("backups", "/ui/backups"),
            ("restore", f"/ui/backups/{backup}/restore"), ("jobs", "/ui/jobs"),
            ("settings", "/ui/settings"), ("events", "/ui/events"),
            ("not-found", "/ui/no/such/page")]


def test_every_page_passes_axe(furnished: tuple[Node, str], browser: Browser) -> None:
    node, backup = furnished
    context, page, problems = new_page(browser)
    page.goto(f"{node.url}/ui/login")
    assert axe(page) == [], "login"
    login(page, node)
    for name, path in pages(backup):
        page.goto(node.url + path)
        page.wait_for_load_state("networkidle")
        findings = axe(page)
        assert findings == [], (name, findings)
    assert [p for p in problems if "status of 404" not in p] == []
    context.close()


def test_pages_read_and_forms_work_without_javascript(furnished: tuple[Node, str],
                                                       browser: Browser) -> None:
    node, backup = furnished
    context, page, problems = new_page(browser, javascript=False)
    login(page, node)
    expect(page.locator("#dashboard-main")).to_contain_text("Volumes")
    for _, path in pages(backup)[:-1]:
        answer = page.goto(node.url + path)
        assert answer is not None and answer.status == 200, path
    page.goto(f"{node.url}/ui/volumes?q=db")
    expect(page.locator("#volume-table a", has_text="db")).to_have_count(1)
    expect(page.locator("#volume-table a", has_text="logs")).to_have_count(0)
    page.goto(f"{node.url}/ui/volumes/db")
    expect(page.locator("#snapshot-tree")).to_contain_text("after-upgrade")
    page.fill("form[action$='/snapshots'] input[name=name]", "no-script")
    page.click("#take-snapshot")
    expect(page.locator(".flashes")).to_contain_text("Snapshot no-script taken")
    assert "no-script" in [s["name"] for s in api(node, "GET", "/v1/volumes/db/snapshots")]
    assert problems == []
    context.close()


def tab_to(page: Page, selector: str) -> None:
    """Press Tab until the focused element matches *selector*."""
    for _ in range(80):
        page.keyboard.press("Tab")
        if page.evaluate("(s) => document.activeElement.matches(s)", selector):
            return
    raise AssertionError(f"{selector} is not reachable with Tab")


def test_keyboard_and_a_narrow_screen(furnished: tuple[Node, str], browser: Browser) -> None:
    """On a phone-sized screen: log in, go to the create form, fill it and send it with
    the keyboard alone; no page is wider than the screen (tables scroll in their box)."""
    node, backup = furnished
    context, page, problems = new_page(browser, width=390, height=844)
    page.goto(f"{node.url}/ui/login")
    assert page.evaluate("() => document.activeElement.id") == "token"  # autofocus
    page.keyboard.type(node.token_file.read_text().strip())
    page.keyboard.press("Enter")
    page.wait_for_url(f"{node.url}/ui/")
    tab_to(page, "a[href='/ui/new-volume']")
    page.keyboard.press("Enter")
    page.wait_for_url(f"{node.url}/ui/new-volume")
    tab_to(page, "input[name=name]")
    page.keyboard.type("typed")
    tab_to(page, "input[name=size]")
    page.keyboard.type("16M")
    page.keyboard.press("Enter")
    page.wait_for_url(f"{node.url}/ui/volumes/typed")
    assert api(node, "GET", "/v1/volumes/typed")["size"] == 16 << 20
    # a destructive action from the keyboard: to the page that asks, type the name, Enter
    tab_to(page, "a[href='/ui/volumes/typed/delete']")
    page.keyboard.press("Enter")
    page.wait_for_url(f"{node.url}/ui/volumes/typed/delete")
    assert page.evaluate("() => document.activeElement.id") == "typed"
    page.keyboard.type("typed")
    page.keyboard.press("Enter")
    page.wait_for_url(f"{node.url}/ui/volumes")
    wait_for(lambda: "typed" not in [v["name"] for v in api(node, "GET", "/v1/volumes")],
             120, "the volume to go")
    for name, path in pages(backup):
        page.goto(node.url + path)
        page.wait_for_load_state("networkidle")
        wide = page.evaluate("() => document.documentElement.scrollWidth")
        assert wide <= 390, (name, wide)
        if name in ("dashboard", "volume"):
            screenshot(page, f"narrow-{name}")
    assert [p for p in problems if "status of 404" not in p] == []
    context.close()


def test_a_poll_keeps_the_focus_and_forms_change_only_what_was_changed(
        furnished: tuple[Node, str], browser: Browser) -> None:
    """A link focused in a live part stays focused when its poll brings new content; a
    disk's or the settings' form sends only what the operator changed, so what changed
    elsewhere after the page was shown is not undone, and a reserved size that is no
    round unit is kept exactly."""
    node, _ = furnished
    context, page, problems = new_page(browser)
    login(page, node)
    page.goto(f"{node.url}/ui/volumes")
    page.focus("#volume-db")
    with page.expect_response(lambda r: "part=table" in r.url, timeout=30_000):
        node.cli("volume", "create", "arrives", "--size", "16M", "--replicas", "1")
    expect(page.locator("#volume-arrives")).to_be_visible()  # the poll swapped it in
    assert page.evaluate("() => document.activeElement.id") == "volume-db"

    disk = next(d for d in api(node, "GET", "/v1/disks") if d["path"].endswith("disk2"))
    odd = 10 * (1 << 30) + 50 * (1 << 20)  # 10 GiB 50 MiB: shown rounded as "10 GiB"
    api(node, "PATCH", f"/v1/disks/{disk['name']}", {"storage_reserved": odd})
    page.goto(f"{node.url}/ui/nodes")
    form = page.locator(f"form[action='/ui/disks/{disk['name']}']")
    page.click(f"summary:has-text('{disk['name']}')")
    api(node, "PATCH", f"/v1/disks/{disk['name']}", {"allow_scheduling": False})  # elsewhere
    form.locator("input[name=tags]").fill("fast, second")
    form.locator("button[type=submit]").click()
    expect(page.locator(".flashes")).to_contain_text("changed: tags")
    after = next(d for d in api(node, "GET", "/v1/disks") if d["name"] == disk["name"])
    assert (after["tags"], after["storage_reserved"], after["allow_scheduling"]) == \
        (["fast", "second"], odd, False)

    page.goto(f"{node.url}/ui/settings")
    node.change_settings(auto_failover=True)  # elsewhere, after the page was shown
    page.fill("#setting-over_provisioning_percentage", "150")
    page.click("text=Save settings")
    expect(page.locator(".flashes")).to_contain_text("over_provisioning_percentage")
    settings = api(node, "GET", "/v1/settings")
    assert (settings["over_provisioning_percentage"], settings["auto_failover"]) == (150, True)
    assert [p for p in problems if "status of 404" not in p] == []
    context.close()
    api(node, "PATCH", f"/v1/disks/{disk['name']}", {"allow_scheduling": True})

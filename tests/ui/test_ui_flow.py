"""The web UI in a real browser (Debian's chromium) against a real daemon: what an operator
does, each step checked through the API as well."""

from __future__ import annotations

import hashlib
import os
import re
import signal
from pathlib import Path

from playwright.sync_api import Browser, Page, expect

from tests.harness import Node, wait_for
from tests.ui.browser import api, login, new_page, screenshot, token

MiB = 1 << 20


def device_sha(device: str, size: int) -> str:
    with open(device, "rb") as block:
        return hashlib.sha256(block.read(size)).hexdigest()


def flash(page: Page) -> str:
    return page.locator(".flashes").inner_text()


def test_login_refuses_a_wrong_token_and_the_browser_never_holds_the_token(
        node: Node, browser: Browser) -> None:
    context, page, problems = new_page(browser)
    page.goto(f"{node.url}/ui/volumes")
    expect(page).to_have_url(re.compile(r"/ui/login\?next=%2Fui%2Fvolumes$"))
    page.fill("#token", "0" * 64)
    page.click("button[type=submit]")
    expect(page.locator("#login-error")).to_contain_text("not this node's API token")
    assert context.cookies() == []
    page.fill("#token", token(node))
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{node.url}/ui/volumes")  # back where it was sent from
    cookies = context.cookies()
    assert [(c["name"], c["httpOnly"], c["sameSite"], c["expires"], c["path"])
            for c in cookies] == [("appliance_ui", True, "Strict", -1, "/ui")]
    assert token(node) not in cookies[0]["value"]
    stored = page.evaluate("() => JSON.stringify([{...localStorage}, {...sessionStorage},"
                           " document.cookie])")
    assert token(node) not in stored and "appliance_ui" not in stored  # HttpOnly
    assert token(node) not in page.content()
    # logging out ends the session on the server too: the old cookie is refused
    old = cookies[0]["value"]
    page.click("text=Log out")
    expect(page).to_have_url(f"{node.url}/ui/login")
    context.add_cookies([{"name": "appliance_ui", "value": old, "url": node.url + "/ui/"}])
    page.goto(f"{node.url}/ui/")
    expect(page).to_have_url(re.compile(r"/ui/login"))
    assert token(node) not in node.log.read_text()
    # a daemon restart ends the sessions: an open page's poll goes to the login page, and
    # the login comes back to that page
    login(page, node)
    page.goto(f"{node.url}/ui/volumes?q=x")
    node.stop()
    node.start()
    expect(page).to_have_url(re.compile(r"/ui/login\?next=%2Fui%2Fvolumes%3Fq%3Dx$"),
                             timeout=30_000)
    page.fill("#token", token(node))
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{node.url}/ui/volumes?q=x")
    # the refused login's and the polls' 401s, and the polls that found the daemon down,
    # are reported on the console; nothing else
    expected = ("status of 401", "ERR_CONNECTION_REFUSED", "htmx:sendError",
                "htmx:responseError")
    assert [p for p in problems if not any(e in p for e in expected)] == []
    context.close()


def test_volume_lifecycle_in_the_browser(node: Node, browser: Browser, tmp_path: Path) -> None:
    """Create, attach, snapshot (seen in the tree), expand, back up, restore to a new
    volume, detach, delete: each by clicking, each checked through the API."""
    context, page, problems = new_page(browser)
    login(page, node)
    screenshot(page, "dashboard-empty")

    # the backup target: a wrong one is refused and changes nothing; a right one is tested
    (tmp_path / "backups").mkdir()
    page.click("nav >> text=Backups")
    page.fill("input[name=url]", f"file://{tmp_path / 'missing'}")
    page.click("text=Save the target")
    expect(page.locator(".flashes")).to_contain_text("is not a directory")
    assert api(node, "GET", "/v1/backup-target")["url"] is None
    page.fill("input[name=url]", f"file://{tmp_path / 'backups'}")
    page.click("text=Save the target")
    expect(page.locator(".flashes")).to_contain_text("Backup target set")
    assert api(node, "GET", "/v1/backup-target")["url"] == f"file://{tmp_path / 'backups'}"
    page.click("#test-target")
    expect(page.locator(".flashes")).to_contain_text("The backup target answers: 0 backup(s)")
    page.click("nav >> text=Dashboard")

    # bad input changes nothing and says what is wrong
    page.click("text=Create a volume")
    page.fill("input[name=name]", "web")
    page.fill("input[name=size]", "12Q")
    page.click("button:text('Create')")
    expect(page.locator("#form-error")).to_contain_text("unknown unit")
    assert api(node, "GET", "/v1/volumes") == []
    expect(page.locator("input[name=name]")).to_have_value("web")  # the form kept

    page.fill("input[name=size]", "64M")
    page.fill("input[name=replicas]", "2")
    page.click("button:text('Create')")
    expect(page).to_have_url(f"{node.url}/ui/volumes/web")
    assert api(node, "GET", "/v1/volumes/web")["size"] == 64 * MiB

    page.click("#attach")
    expect(page.locator("#volume-status")).to_contain_text("attached", timeout=120_000)
    expect(page.locator("#volume-status")).to_contain_text("healthy")
    volume = api(node, "GET", "/v1/volumes/web")
    assert volume["state"] == "attached"
    device = volume["device"]
    expect(page.locator("#volume-frontend")).to_contain_text(device)
    with open(device, "r+b") as block:
        block.write(os.urandom(8 * MiB))
        os.fsync(block.fileno())
    written = device_sha(device, 64 * MiB)

    page.fill("form[action$='/snapshots'] input[name=name]", "first")
    page.click("#take-snapshot")
    expect(page.locator(".flashes")).to_contain_text("Snapshot first taken")
    expect(page.locator("#snapshot-tree .snap-name", has_text="first")).to_be_visible()
    assert [s["name"] for s in api(node, "GET", "/v1/volumes/web/snapshots")] == ["first"]

    page.fill("form[action$='/expand'] input[name=size]", "128M")
    page.click("#expand")
    expect(page.locator(".flashes")).to_contain_text("expanded")
    expect(page.locator("#volume-size")).to_have_text("128 MiB")
    assert api(node, "GET", "/v1/volumes/web")["size"] == 128 * MiB

    page.click("#create-backup")
    expect(page.locator(".flashes")).to_contain_text("Backup started")
    # the backup's row turns complete on its own (the list polls while one runs)
    expect(page.locator("#volume-backups [data-backup] .badge-healthy")).to_have_text(
        "complete", timeout=120_000)
    backups = api(node, "GET", "/v1/backups?volume=web")["backups"]
    assert [b["state"] for b in backups] == ["complete"]
    backup_id = backups[0]["id"]
    screenshot(page, "volume-page")

    page.goto(f"{node.url}/ui/backups")
    expect(page.locator(f"[data-backup='{backup_id}']")).to_be_visible()
    screenshot(page, "backups-page")
    page.click(f"[aria-label='Restore {backup_id}']")
    page.fill("input[name=name]", "web-restored")
    page.fill("input[name=replicas]", "1")
    page.click("button:text('Restore')")
    expect(page).to_have_url(f"{node.url}/ui/volumes/web-restored")
    wait_for(lambda: api(node, "GET", "/v1/volumes/web-restored")["state"] == "detached",
             180, "the restore to end")
    expect(page.locator("#volume-status")).to_contain_text("detached")  # live, no reload
    restored = node.cli("volume", "attach", "web-restored").stdout.strip()
    assert device_sha(restored, 64 * MiB) == written
    node.cli("volume", "detach", "web-restored")

    page.goto(f"{node.url}/ui/volumes/web")
    page.click("#detach")
    expect(page.locator("#volume-status")).to_contain_text("detached", timeout=120_000)
    assert api(node, "GET", "/v1/volumes/web")["state"] == "detached"

    page.click("text=Delete…")
    page.fill("#typed", "wbe")  # a wrong name deletes nothing
    page.click("button:text('Delete volume web')")
    expect(page.locator("#confirm-error")).to_contain_text("Type the volume's name")
    assert api(node, "GET", "/v1/volumes/web")["name"] == "web"
    page.fill("#typed", "web")
    page.click("button:text('Delete volume web')")
    expect(page).to_have_url(f"{node.url}/ui/volumes")
    expect(page.locator(".flashes")).to_contain_text("being deleted")
    wait_for(lambda: "web" not in [v["name"] for v in api(node, "GET", "/v1/volumes")],
             120, "the volume to go")
    expect(page.locator("#volume-table a", has_text=re.compile(r"^web$"))).to_have_count(0)
    expect(page.locator("#volume-table a", has_text="web-restored")).to_have_count(1)
    page.goto(f"{node.url}/ui/")
    screenshot(page, "dashboard")
    # the refused form's answer is a 400, which the console reports; nothing else
    assert [p for p in problems if "status of 400" not in p] == []
    context.close()


def test_a_killed_replica_shows_degraded_then_its_rebuild_without_a_reload(
        node: Node, browser: Browser) -> None:
    node.change_settings(replica_replenishment_wait=3)
    node.cli("volume", "create", "heal", "--size", "512M", "--replicas", "2")
    device = node.cli("volume", "attach", "heal").stdout.strip()
    context, page, problems = new_page(browser)
    login(page, node)
    page.goto(f"{node.url}/ui/volumes/heal")
    expect(page.locator("#volume-status")).to_contain_text("healthy")
    # every state the live part goes through, recorded in the page as it changes; and a
    # marker that a reload would lose
    page.evaluate("""() => {
        window.notReloaded = true;
        window.seen = [];
        const look = () => {
            const live = document.querySelector('#volume-live');
            if (!live) return;
            const status = live.querySelector('#volume-status').innerText.trim();
            const bars = [...live.querySelectorAll('tr[data-replica] progress')].length;
            const last = window.seen[window.seen.length - 1];
            const now = status + '|' + bars;
            if (last !== now) window.seen.push(now);
        };
        new MutationObserver(look).observe(document.body, {subtree: true, childList: true});
        look();
    }""")
    victim = api(node, "GET", "/v1/volumes/heal")["replica_list"][1]
    os.kill(int((Path(victim["directory"]) / "server.pid").read_text()), signal.SIGKILL)
    with open(device, "r+b") as block:  # writes find it gone; its rebuild copies them
        chunk = os.urandom(4 * MiB)
        for _ in range(100):
            block.write(chunk)
        os.fsync(block.fileno())
    expect(page.locator("#volume-status")).to_contain_text("degraded", timeout=60_000)
    expect(page.locator(f"tr[data-replica='{victim['name']}'] progress")).to_be_attached(
        timeout=120_000)
    screenshot(page, "volume-rebuilding")
    expect(page.locator("#volume-status")).to_contain_text("healthy", timeout=120_000)
    expect(page.locator(f"tr[data-replica='{victim['name']}'] progress")).to_have_count(0)
    assert page.evaluate("() => window.notReloaded") is True
    seen = page.evaluate("() => window.seen")
    degraded = [s for s in seen if s.startswith("attached degraded")]
    assert degraded and any(s.endswith("|1") for s in degraded), seen
    assert seen[-1] == "attached healthy|0", seen
    assert api(node, "GET", "/v1/volumes/heal")["robustness"] == "healthy"
    assert not problems
    context.close()

"""Web UI benchmark, on a real daemon with many volumes, in Debian's chromium:

* the dashboard's time to first render (first contentful paint) and to interactive (the
  end of DOMContentLoaded: htmx has run and the polls are set), from the browser's own
  performance timing, medians over repeated loads;
* beside the ``GET /v1/volumes`` call alone (the API's list that the dashboard is built
  from), the dashboard's HTML alone (``GET /ui/``), and one poll of its live part
  (``GET /ui/?part=main``), each timed from a Python client.

Ratios are the figures (docs/performance.md); absolute times depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import sync_playwright

from bench.node_bench import Daemon

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]
TIMING = """() => {
    const nav = performance.getEntriesByType('navigation')[0];
    const paint = performance.getEntriesByName('first-contentful-paint')[0];
    // paintTime: when the frame was painted (startTime is when it was presented, which a
    // headless browser delays)
    const painted = paint ? (paint.paintTime || paint.startTime) : null;
    return {first_byte: nav.responseStart, first_render: painted,
            interactive: nav.domContentLoadedEventEnd, load: nav.loadEventEnd};
}"""


def timed(call: Any, repeat: int) -> float:
    """The median of *repeat* calls, in milliseconds."""
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return 1000 * statistics.median(samples)


def populate(daemon: Daemon, count: int, attached: int) -> None:
    for index in range(count):
        answer = daemon.http.post("/v1/volumes", json={
            "name": f"vol-{index:03d}", "size": "16M", "replicas": 1,
            "labels": {"app": f"app-{index % 7}"}})
        answer.raise_for_status()
    for index in range(attached):
        daemon.cli("volume", "attach", f"vol-{index:03d}")


def browser_figures(url: str, token: str, repeat: int) -> dict[str, float]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{url}/ui/login")
            page.fill("#token", token)
            page.click("button[type=submit]")
            page.wait_for_url(f"{url}/ui/")
            samples: dict[str, list[float]] = {}
            for _ in range(repeat + 1):  # the first load warms the caches: not counted
                page.goto(f"{url}/ui/", wait_until="load")
                page.wait_for_function(  # the paint entry is recorded a little after
                    "() => performance.getEntriesByName('first-contentful-paint').length",
                    timeout=30_000)
                figures = page.evaluate(TIMING)
                for key, value in figures.items():
                    samples.setdefault(key, []).append(value)
            cookies = {c["name"]: c["value"] for c in page.context.cookies()}
        finally:
            browser.close()
    medians = {f"{key}_ms": statistics.median(values[1:]) for key, values in samples.items()
               if all(v is not None for v in values[1:])}
    with httpx.Client(base_url=url, cookies=cookies, timeout=120) as client:
        medians["html_ms"] = timed(lambda: client.get("/ui/").raise_for_status(), repeat)
        medians["poll_ms"] = timed(
            lambda: client.get("/ui/?part=main").raise_for_status(), repeat)
    return medians


def run(root: Path, volumes: int, attached: int, repeat: int, port: int) -> dict[str, Any]:
    daemon = Daemon(root, port)
    try:
        populate(daemon, volumes, attached)
        api_ms = timed(lambda: daemon.http.get("/v1/volumes").raise_for_status(), repeat)
        token = (daemon.data / "token").read_text().strip()
        figures = browser_figures(daemon.url, token, repeat)
        for volume in range(attached):
            daemon.cli("volume", "detach", f"vol-{volume:03d}")
    finally:
        daemon.stop()
    return {"volumes": volumes, "attached": attached, "repeat": repeat,
            "api_volumes_ms": api_ms, **figures}


def report(results: dict[str, Any]) -> str:
    api = results["api_volumes_ms"]

    def line(label: str, key: str) -> str:
        value = results.get(key)
        if value is None:
            return f"{label}: not measured"
        return f"{label}: {value:.0f} ms ({value / api:.1f}x the API call)"

    return "\n".join([
        f"dashboard with {results['volumes']} volumes ({results['attached']} attached), "
        f"medians of {results['repeat']} loads",
        f"GET /v1/volumes alone: {api:.1f} ms",
        line("dashboard HTML (GET /ui/)", "html_ms"),
        line("one poll of its live part", "poll_ms"),
        line("first byte in the browser", "first_byte_ms"),
        line("first render (first contentful paint)", "first_render_ms"),
        line("interactive (DOMContentLoaded done)", "interactive_ms"),
        line("load", "load_ms")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=100)
    parser.add_argument("--attached", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="10 volumes, 3 loads")
    parser.add_argument("--dir", type=Path, help="work directory (default: a new temporary one)")
    parser.add_argument("--port", type=int, default=9570, help="the daemon's (0: any free)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    volumes, attached, repeat = (10, 1, 3) if args.quick else (args.volumes, args.attached,
                                                               args.repeat)
    port = args.port
    if port == 0:
        import socket  # noqa: PLC0415

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    root = args.dir or Path(tempfile.mkdtemp(prefix="ui-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    results = run(root, volumes, attached, repeat, port)
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()

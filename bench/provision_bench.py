"""Provisioning benchmark: a converge of ansible/'s site.yml on one node from nothing (no
appliance package; the machine's Debian packages as they are) to a healthy daemon with a
second disk and `appliance check` passed, and an idempotent re-run, beside their floors:
the same install by hand (`dpkg -i`, `service appliance start`, the API answering, `disk
add`) and an ansible-playbook run that only gathers facts on the same host (what any run
costs). The node is a sandbox (tests/packaging/sandbox.py), the connection local.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.harness import wait_for
from tests.netns import hosts
from tests.packaging.conftest import build, purge
from tests.packaging.converge import ansible_env, local_inventory, playbook
from tests.packaging.sandbox import Sandbox, sandboxes

FACTS = """- name: Gather facts, nothing else
  hosts: appliance_nodes
  gather_facts: true
  tasks: []
"""


def timed(action: Any) -> float:
    started = time.monotonic()
    action()
    return time.monotonic() - started


def by_hand(box: Sandbox, deb: Path) -> None:
    for argv in (["dpkg", "-i", str(deb)], ["service", "appliance", "start"]):
        result = box.run(argv, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                    "DEBIAN_FRONTEND": "noninteractive"})
        assert result.returncode == 0, result.stdout + result.stderr
    wait_for(lambda: box.run(["appliance", "version"]).returncode == 0, 120, "the daemon")
    box.run(["mkdir", "-p", "/var/lib/appliance/disk2"], check=True)
    box.run(["appliance", "disk", "add", "/var/lib/appliance/disk2", "--tag", "second"],
            check=True)


def round_trip(root: Path, deb: Path, index: int) -> dict[str, float]:
    """One node from nothing: by hand, then (in a fresh sandbox) by the roles, twice, and a
    facts-only run; the package purged before each."""
    figures = {}
    env = ansible_env(root / "home")
    inventory = local_inventory(root / "local.yml", deb)
    (root / "facts.yml").write_text(FACTS)
    for what in ("by_hand", "converge"):
        with hosts(1) as made, sandboxes(made, root / f"{what}-{index}") as (box,):
            purge(box)
            try:
                if what == "by_hand":
                    figures["by_hand_seconds"] = timed(lambda: by_hand(box, deb))
                else:
                    figures["converge_seconds"] = timed(
                        lambda: playbook(["-i", str(inventory)], env, box))
                    figures["rerun_seconds"] = timed(
                        lambda: playbook(["-i", str(inventory)], env, box))
                    figures["facts_only_seconds"] = timed(
                        lambda: playbook(["-i", str(inventory)], env, box,
                                         playbook_file=str(root / "facts.yml")))
            finally:
                purge(box)
    return figures


def run(root: Path, quick: bool, deb: Path | None) -> dict[str, Any]:
    deb = deb or build(root / "debs", 1)
    rounds = [round_trip(root, deb, index) for index in range(1 if quick else 3)]
    result: dict[str, Any] = {"rounds": rounds, "deb": str(deb)}
    for key in rounds[0]:
        result[key] = statistics.median(figure[key] for figure in rounds)
    result["ratio_converge_by_hand"] = result["converge_seconds"] / result["by_hand_seconds"]
    result["ratio_rerun_facts_only"] = result["rerun_seconds"] / result["facts_only_seconds"]
    return result


def report(result: dict[str, Any]) -> str:
    return "\n".join([
        f"converge of one node from nothing: {result['converge_seconds']:.1f} s beside the "
        f"same by hand {result['by_hand_seconds']:.1f} s (ratio "
        f"{result['ratio_converge_by_hand']:.2f})",
        f"idempotent re-run: {result['rerun_seconds']:.1f} s beside a facts-only run "
        f"{result['facts_only_seconds']:.1f} s (ratio {result['ratio_rerun_facts_only']:.2f})",
        f"medians of {len(result['rounds'])} rounds"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round instead of three")
    parser.add_argument("--deb", type=Path, help="the package (default: build one)")
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("sandboxes and packages need root")
    with contextlib.ExitStack() as stack:
        root = args.dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        root.mkdir(parents=True, exist_ok=True)
        result = run(root, args.quick, args.deb)
    print(report(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

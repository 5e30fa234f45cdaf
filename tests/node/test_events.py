"""The event stream: what happened to a volume and to the node, through the real CLI
against a real daemon, without reading the daemon's log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from typing import Any

from tests.harness import APPLIANCE, Node, wait_for


def kinds(node: Node, volume: str) -> list[str]:
    events: list[dict[str, Any]] = json.loads(
        node.cli("events", "--volume", volume, "-o", "json").stdout)
    return [e["kind"] + (": " + e["message"] if e["kind"] == "state" else "") for e in events]


def test_events_of_a_volume_and_follow(node: Node) -> None:
    node.change_settings(replica_replenishment_wait=0)
    follower = subprocess.Popen(
        [APPLIANCE, "events", "--follow", "-o", "json", "--url", node.url, "--token-file",
         str(node.token_file)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    followed: list[dict[str, Any]] = []

    def read() -> None:
        assert follower.stdout is not None
        for line in follower.stdout:
            followed.append(json.loads(line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        node.cli("volume", "create", "e", "--size", "16M", "--replicas", "2")
        device = node.cli("volume", "attach", "e").stdout.strip()
        wait_for(lambda: node.volume("e")["robustness"] == "healthy", 60, "healthy")
        # a replica server dies: out of service, restarted, rebuilt, back
        replica = node.volume("e")["replica_list"][1]
        pid = int((node.root / replica["directory"] / "server.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        fd = os.open(device, os.O_WRONLY)
        try:
            os.pwrite(fd, os.urandom(4096), 0)  # the engine notices at its next write
            os.fsync(fd)
        finally:
            os.close(fd)
        wait_for(lambda: "rebuild-done" in kinds(node, "e") or "replica-back" in kinds(
            node, "e"), 120, "the replica rebuilt")
        node.cli("snapshot", "create", "e", "s1")
        node.cli("volume", "expand", "e", "--size", "32M")
        node.cli("volume", "detach", "e")
        node.cli("volume", "delete", "e")
        seen = kinds(node, "e")
        for expected in ("created", "state: creating -> detached",
                         "state: detached -> attaching", "state: attaching -> attached",
                         "replica-failed", "snapshot-created", "expanded",
                         "state: attached -> detaching", "state: detaching -> detached",
                         "deleted"):
            assert expected in seen, (expected, seen)
        assert seen.index("replica-failed") < seen.index("snapshot-created")
        node_events = json.loads(node.cli("events", "-o", "json").stdout)
        assert any(e["kind"] == "settings-changed" and e["volume"] == ""
                   and "replica_replenishment_wait" in e["message"] for e in node_events)

        # the follower printed each event once, as it happened, one JSON object per line
        wait_for(lambda: bool(followed) and followed[-1]["kind"] == "deleted", 30,
                 "the follower to print the delete")
        sequences = [e["sequence"] for e in followed]
        assert sequences == sorted(set(sequences))
        assert next(e for e in followed if e["volume"] == "e")["kind"] == "created"
    finally:
        follower.send_signal(signal.SIGINT)
        status = follower.wait(timeout=30)
        reader.join(timeout=30)
        assert follower.stderr is not None
        problems = follower.stderr.read()
        follower.stdout.close()  # type: ignore[union-attr]
        follower.stderr.close()
        assert status == 0, problems

"""Faults, refused starts, salvage and diverged branches through the node daemon
(docs/membership.md): a faulted volume comes back without salvage, a refused start is
reported once and heals by itself, a salvage happens only when an operator asks for it and
is visible afterwards, and a branch the chosen replica lacks is kept as a volume of its own,
with every byte checked."""

from __future__ import annotations

import json
import os
import signal
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from tests.harness import MiB, Node, alive, wait_for

# the events of faults, refusals and salvages (the others: tests/node/test_events.py)
SALVAGE_KINDS = {"faulted", "recovered", "start-refused", "salvage-requested", "salvaged",
                 "branch-kept"}


def events(node: Node, volume: str) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = json.loads(
        node.cli("event", "list", "--volume", volume, "-o", "json").stdout)
    return [e for e in listed if e["kind"] in SALVAGE_KINDS]


def kinds(node: Node, volume: str) -> list[str]:
    return [e["kind"] for e in events(node, volume)]


def write(device: str, offset: int, data: bytes) -> None:
    fd = os.open(device, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)  # acknowledged: must survive
    finally:
        os.close(fd)


def read(device: str, offset: int, length: int) -> bytes:
    fd = os.open(device, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def kill_server(directory: str) -> None:
    pid = int((Path(directory) / "server.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), 30, "a replica server to die")


def write_fails(device: str, offset: int) -> bool:
    try:
        write(device, offset, os.urandom(MiB))
    except OSError:
        return True
    return False


def serving(node: Node, volume: str, replicas: int) -> bool:
    info = node.volume(volume)
    return info["state"] == "attached" and info["robustness"] == "healthy" and \
        [r["mode"] for r in info["replica_list"]] == ["RW"] * replicas


def settings(node: Node, **changes: Any) -> None:
    response = httpx.patch(node.url + "/v1/settings", json=changes, headers={
        "Authorization": f"Bearer {node.token_file.read_text().strip()}"})
    assert response.status_code == 200, response.text


def test_every_replica_server_killed(node: Node) -> None:
    """The engine faults; the controller restarts it without salvage (every member of the
    last membership is back), and it serves every acknowledged write."""
    node.cli("volume", "create", "lost", "--size", "32M", "--replicas", "2")
    device = node.cli("volume", "attach", "lost").stdout.strip()
    payload = os.urandom(2 * MiB)
    write(device, 0, payload)
    for replica in node.volume("lost")["replica_list"]:
        kill_server(replica["directory"])
    # nothing to write to: the volume faults (a write may still reach a replica lent to
    # the engine until the engine notices that its server is gone)
    wait_for(partial(write_fails, device, 4 * MiB), 60, "a write to fail")
    wait_for(lambda: "recovered" in kinds(node, "lost"), 60, "the engine started again")
    wait_for(lambda: serving(node, "lost", 2), 60, "a healthy volume")
    info = node.volume("lost")
    assert read(info["device"], 0, len(payload)) == payload
    assert info["salvage"] is None and info["refusal"] == ""
    assert kinds(node, "lost") == ["faulted", "recovered"]
    assert "salvaged" not in node.cli("volume", "show", "lost").stdout


def test_without_auto_salvage_a_faulted_volume_waits_for_the_operator(node: Node) -> None:
    settings(node, auto_salvage=False)
    node.cli("volume", "create", "wait", "--size", "16M", "--replicas", "1")
    device = node.cli("volume", "attach", "wait").stdout.strip()
    payload = os.urandom(MiB)
    write(device, 0, payload)
    kill_server(node.volume("wait")["replica_list"][0]["directory"])
    wait_for(partial(write_fails, device, MiB), 60, "a write to fail")
    wait_for(lambda: "faulted" in kinds(node, "wait"), 60, "the fault noticed")
    engine = (node.data / "run" / "wait" / "nbd.sock.pid").read_text()
    time.sleep(3)  # a pass later (every 2 s) it is still faulted, not restarted
    info = node.volume("wait")
    assert (info["robustness"], info["state"]) == ("faulted", "attached")
    assert "auto_salvage is off" in info["message"]
    assert (node.data / "run" / "wait" / "nbd.sock.pid").read_text() == engine
    salvaged = node.cli("volume", "salvage", "wait")  # every member is back: nothing lost
    assert "no acknowledged write was missing" in salvaged.stdout
    assert read(node.volume("wait")["device"], 0, len(payload)) == payload
    assert kinds(node, "wait") == ["faulted", "salvage-requested", "recovered"]


def test_refused_start_is_reported_and_heals(node: Node, tmp_path: Path) -> None:
    node.cli("volume", "create", "held", "--size", "16M", "--replicas", "2")
    device = node.cli("volume", "attach", "held").stdout.strip()
    payload = os.urandom(MiB)
    write(device, 0, payload)
    node.cli("volume", "detach", "held")
    victim = node.volume("held")["replica_list"][0]
    aside = tmp_path / "aside"
    Path(victim["directory"]).rename(aside)  # a disk that did not come back

    refused = node.cli("volume", "attach", "held", check=False)
    assert refused.returncode == 1, refused.stderr
    message = refused.stderr.strip().removeprefix("error: ")
    assert "\n" not in message and "Traceback" not in refused.stderr
    assert victim["name"] in message and "cannot be reached" in message
    assert "appliance volume salvage held" in message  # the node's advice, not the engine's
    info = node.volume("held")
    assert (info["robustness"], info["refusal"], info["message"]) == \
        ("faulted", message, message)
    assert [(e["kind"], e["message"]) for e in events(node, "held")] == \
        [("start-refused", message)]

    aside.rename(victim["directory"])  # it is back: the start is tried again at once
    wait_for(lambda: serving(node, "held", 2), 60, "the refused volume served")
    assert read(node.volume("held")["device"], 0, len(payload)) == payload
    assert kinds(node, "held") == ["start-refused", "recovered"]
    assert "Traceback" not in node.log.read_text()


def test_diverged_branches(node: Node, tmp_path: Path) -> None:
    """Replica B misses D2 (acknowledged on A only); B alone is salvaged and takes D3; when
    both return they are diverged: the operator chooses A, and B's branch is kept as a
    volume of its own that reads D1 + D3."""
    settings(node, replica_replenishment_wait=3600)  # a missing replica is not replaced
    node.cli("volume", "create", "split", "--size", "16M", "--replicas", "2")
    device = node.cli("volume", "attach", "split").stdout.strip()
    a, b = node.volume("split")["replica_list"]
    d1, d2, d3 = (os.urandom(MiB) for _ in range(3))
    write(device, 0, d1)
    b_aside, a_aside = tmp_path / "b-aside", tmp_path / "a-aside"
    Path(b["directory"]).rename(b_aside)  # B's disk is gone...
    kill_server(str(b_aside))  # ...and its server with it
    write(device, MiB, d2)  # acknowledged by A alone
    node.cli("volume", "detach", "split")

    Path(a["directory"]).rename(a_aside)  # now A is gone and B is back
    b_aside.rename(b["directory"])
    refused = node.cli("volume", "attach", "split", check=False)
    assert refused.returncode == 1 and a["name"] in refused.stderr, refused.stderr
    assert "cannot be reached" in refused.stderr
    salvaged = node.cli("volume", "salvage", "split", "--from", b["name"])
    assert "salvaged at" in salvaged.stdout and f"from {b['name']}" in salvaged.stdout
    assert a["name"] in salvaged.stdout  # given up
    info = node.volume("split")
    assert info["salvage"]["from"] == b["name"]
    assert info["salvage"]["given_up"][0]["replica"] == a["name"]
    shown = node.cli("volume", "show", "split").stdout
    assert f"from {b['name']}; given up: {a['name']}" in shown and info["branch"] in shown
    b_branch = info["branch"]
    write(info["device"], MiB, d3)
    node.cli("volume", "detach", "split")

    a_aside.rename(a["directory"])  # both are back, each with writes the other lacks
    refused = node.cli("volume", "attach", "split", check=False)
    assert refused.returncode == 1 and "diverged" in refused.stderr, refused.stderr
    assert a["name"] in refused.stderr and b["name"] in refused.stderr
    assert b_branch[:8] in refused.stderr and refused.stderr.count("branch ") >= 3
    node.cli("volume", "salvage", "split", "--from", a["name"])
    wait_for(lambda: serving(node, "split", 2), 120, "the chosen branch, rebuilt")
    info = node.volume("split")
    assert a["name"] in [r["name"] for r in info["replica_list"]]
    assert b["name"] not in [r["name"] for r in info["replica_list"]]
    assert read(info["device"], 0, 2 * MiB) == d1 + d2
    kept = f"split-branch-{b_branch[:8]}"
    assert info["branch_volumes"] == [kept]
    assert kinds(node, "split") == ["start-refused", "salvage-requested", "salvaged",
                                    "start-refused", "salvage-requested", "branch-kept",
                                    "salvaged"]

    branch = node.volume(kept)
    assert (branch["state"], branch["replicas"], branch["labels"]) == \
        ("detached", 1, {"diverged-from": "split"})
    assert branch["replica_list"][0]["directory"] == b["directory"]
    kept_device = node.cli("volume", "attach", kept).stdout.strip()
    assert read(kept_device, 0, 2 * MiB) == d1 + d3
    node.cli("volume", "delete", kept)
    assert not Path(b["directory"]).exists()
    assert node.volume("split")["branch_volumes"] == []


def test_salvage_bad_input_changes_nothing(node: Node) -> None:
    node.cli("volume", "create", "fine", "--size", "16M", "--replicas", "1")
    node.cli("volume", "create", "idle", "--size", "16M", "--replicas", "1")
    node.cli("volume", "attach", "fine")
    before = node.cli("volume", "list", "-o", "json").stdout
    events_before = node.cli("event", "list", "-o", "json").stdout
    for args, status, message in [
            (["nope"], 3, "does not exist"),
            (["fine"], 1, "served by its engine (healthy)"),
            (["fine", "--from", "fine-nope"], 3, "not a replica of volume 'fine'"),
            (["idle"], 1, "not attached")]:
        result = node.cli("volume", "salvage", *args, check=False)
        assert result.returncode == status and message in result.stderr, (args, result.stderr)
    response = httpx.post(node.url + "/v1/volumes/fine/salvage", json={"form": "x"}, headers={
        "Authorization": f"Bearer {node.token_file.read_text().strip()}"})
    assert response.status_code == 400 and "form" in response.json()["error"]["message"]
    assert node.cli("volume", "list", "-o", "json").stdout == before
    assert node.cli("event", "list", "-o", "json").stdout == events_before

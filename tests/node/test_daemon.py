"""The node service through its CLI against a real daemon: lifecycle with data checked by
checksums, restart under load (RELIABILITY row 13), replica failure repaired by the
controller, bad input and authentication (rows 17, 18)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from tests.harness import VERIFY, MiB, Node, alive, engine_writes, fio_errors, run, wait_for

WRITES = 100  # writes a workload has made before a fault, and again after it


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_lifecycle(node: Node, tmp_path: Path) -> None:
    disks = json.loads(node.cli("disk", "list", "-o", "json").stdout)
    assert len(disks) == 2 and {"second"} == set(disks[1]["tags"]) | set(disks[0]["tags"])
    node.cli("volume", "create", "data", "--size", "128M", "--replicas", "2")
    listed = json.loads(node.cli("volume", "list", "-o", "json").stdout)
    assert [(v["name"], v["size"], v["replicas"], v["state"]) for v in listed] == \
        [("data", 128 * MiB, 2, "detached")]
    assert {r["disk"] for r in listed[0]["replica_list"]} == {d["name"] for d in disks}
    device = node.cli("volume", "attach", "data").stdout.strip()
    assert Path("/dev/appliance/data").resolve() == Path(device).resolve()
    info = node.volume("data")
    assert (info["state"], info["robustness"], info["device"]) == ("attached", "healthy", device)
    payload = os.urandom(5 * MiB)
    with open(device, "r+b") as block:
        block.seek(MiB)
        block.write(payload)
        block.flush()
        os.fsync(block.fileno())
    node.cli("volume", "detach", "data")
    assert node.volume("data")["state"] == "detached"
    assert not Path("/dev/appliance/data").exists()
    device = node.cli("volume", "attach", "data").stdout.strip()
    with open(device, "rb") as block:
        block.seek(MiB)
        assert block.read(len(payload)) == payload  # the data survived detach and attach
    shown = node.cli("volume", "show", "data", "-o", "yaml").stdout
    assert "yaml" not in shown
    assert yaml.safe_load(shown)["name"] == "data" and yaml.safe_load(shown)["size"] == 128 * MiB
    node.cli("volume", "delete", "data")
    assert json.loads(node.cli("volume", "list", "-o", "json").stdout) == []
    assert not list((node.data / "disks" / "default" / "replicas").iterdir())


def test_daemon_restart_under_load(node: Node, tmp_path: Path) -> None:
    node.cli("volume", "create", "busy", "--size", "128M", "--replicas", "2")
    node.cli("volume", "attach", "busy")
    uri = f"nbd+unix:///?socket={node.data / 'run' / 'busy' / 'nbd.sock'}"
    workload = subprocess.Popen(
        ["fio", "--ioengine=nbd", f"--uri={uri}", "--output-format=json", *VERIFY,
         "--verify_state_save=0",
         "--size=64M", "--time_based", "--runtime=8"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    control = node.engine_control("busy")
    wait_for(lambda: engine_writes(control) >= WRITES, 60, f"{WRITES} writes by fio")
    engine = int((node.data / "run" / "busy" / "nbd.sock.pid").read_text())
    node.stop(signal.SIGKILL)  # the daemon dies; the data path must not notice
    before = engine_writes(control)
    wait_for(lambda: engine_writes(control) >= before + WRITES, 60,
             f"{WRITES} more writes served while the daemon is down")
    node.start()
    stdout, stderr = workload.communicate(timeout=120)
    result = subprocess.CompletedProcess(workload.args, workload.returncode, stdout, stderr)
    assert workload.returncode == 0 and fio_errors(result) == 0, stderr
    assert alive(engine)  # re-adopted, not restarted
    assert int((node.data / "run" / "busy" / "nbd.sock.pid").read_text()) == engine
    info = node.volume("busy")
    assert (info["state"], info["robustness"]) == ("attached", "healthy")


def test_controller_rebuilds_a_killed_replica(node: Node) -> None:
    assert node.change_settings(replica_replenishment_wait=1)["replica_replenishment_wait"] == 1
    node.cli("volume", "create", "heal", "--size", "64M", "--replicas", "2")
    device = node.cli("volume", "attach", "heal").stdout.strip()
    with open(device, "r+b") as block:
        block.write(os.urandom(4 * MiB))
        os.fsync(block.fileno())
    victim = node.volume("heal")["replica_list"][1]
    pid = int((Path(victim["directory"]) / "server.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    with open(device, "r+b") as block:  # a write finds it gone
        block.write(os.urandom(MiB))
        os.fsync(block.fileno())
    wait_for(lambda: node.volume("heal")["robustness"] == "degraded", 60, "degraded")
    wait_for(lambda: node.volume("heal")["robustness"] == "healthy", 120, "healthy again")
    assert [r["mode"] for r in node.volume("heal")["replica_list"]] == ["RW", "RW"]
    new_pid = int((Path(victim["directory"]) / "server.pid").read_text())
    assert new_pid != pid and alive(new_pid)


BAD = [
    (["volume", "create", "a/b", "--size", "1G"], 2, "volume name"),
    (["volume", "create", "ok", "--size", "1000"], 2, "multiple of 4096"),
    (["volume", "create", "ok", "--size", "0"], 2, "positive"),
    (["volume", "create", "ok", "--size", "1X"], 2, "unknown unit"),
    (["volume", "create", "ok", "--size", "1G", "--replicas", "9"], 2, "9"),
    (["volume", "create", "-x", "--size", "1G"], 2, ""),
    (["volume", "create", "big", "--size", "1G", "--replicas", "3"], 1, "cannot place 3"),
    (["volume", "show", "nope"], 3, "does not exist"),
    (["volume", "attach", "nope"], 3, "does not exist"),
    (["volume", "delete", "nope"], 3, "does not exist"),
    (["volume", "create", "..", "--size", "1G"], 2, "volume name"),
    (["volume", "create", "x" * 300, "--size", "1G"], 2, "name"),
    (["volume", "create", "ok", "--size=-1"], 2, "size"),
    (["volume", "create", "ok", "--size", "17T"], 2, "larger than"),
    (["volume", "expand", "nope", "--size", "1G"], 3, "does not exist"),
    (["volume", "clone", "nope", "copy"], 3, "does not exist"),
    (["snapshot", "create", "nope", "s1"], 3, "does not exist"),
    (["snapshot", "list", "nope"], 3, "does not exist"),
    (["disk", "add", "relative/path"], 2, "must be absolute"),
    (["disk", "add", "/nonexistent/dir"], 3, "not a directory"),
]


@pytest.mark.parametrize(("args", "status", "message"), BAD,
                         ids=[" ".join(a)[:40] for a, _, _ in BAD])
def test_bad_input_changes_nothing(node: Node, args: list[str], status: int,
                                   message: str) -> None:
    before = node.cli("volume", "list", "-o", "json").stdout
    result = node.cli(*args, check=False)
    assert result.returncode == status, result.stderr
    assert message in result.stderr
    assert node.cli("volume", "list", "-o", "json").stdout == before


def test_authentication(node: Node, tmp_path: Path) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
        response = httpx.get(node.url + "/v1/volumes", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthenticated"
    assert httpx.get(node.url + "/metrics").status_code == 401
    wrong = tmp_path / "wrong-token"
    wrong.write_text("nope")
    wrong.chmod(0o600)  # a token file others can read is refused before it is sent
    refused = run("volume", "list", "--url", node.url, "--token-file", wrong, check=False)
    assert refused.returncode == 1 and "authentication" in refused.stderr.lower()
    missing = run("volume", "list", "--url", node.url, "--token-file", tmp_path / "absent",
                  check=False)
    assert missing.returncode == 2 and "absent" in missing.stderr
    token = node.token_file.read_text().strip()
    assert node.token_file.stat().st_mode & 0o777 == 0o600
    assert token not in node.log.read_text()


def test_engine_crash_is_noticed(node: Node) -> None:
    node.cli("volume", "create", "phoenix", "--size", "32M", "--replicas", "2")
    device = node.cli("volume", "attach", "phoenix").stdout.strip()
    payload = os.urandom(2 * MiB)
    with open(device, "r+b") as block:
        block.write(payload)
        os.fsync(block.fileno())
    pid_file = node.data / "run" / "phoenix" / "nbd.sock.pid"
    engine = int(pid_file.read_text())
    os.kill(engine, signal.SIGKILL)

    def restarted() -> bool:
        info = node.volume("phoenix")
        return (info["state"], info["robustness"]) == ("attached", "healthy") and \
            pid_file.exists() and int(pid_file.read_text()) != engine
    wait_for(restarted, 60, "the engine to be started again")
    with open(node.volume("phoenix")["device"], "rb") as again:
        assert again.read(len(payload)) == payload


HOSTILE = [
    ("POST", "/v1/volumes", b"{not json", "invalid request"),
    ("POST", "/v1/volumes", b'{"name": "v", "size": 4096, "colour": "red"}', "colour"),
    ("POST", "/v1/volumes", b'{"name": "a\\u0000b", "size": 4096}', "volume name"),
    ("POST", "/v1/volumes", b'{"name": "-lead", "size": 4096}', "volume name"),
    ("POST", "/v1/volumes", b'{"name": "v", "size": -4096}', "size"),
    ("POST", "/v1/volumes", b'{"name": "v", "size": "1Q"}', "unit"),
    ("POST", "/v1/volumes", b'{"name": "v", "size": 4096, "replicas": 0}', "replicas"),
    ("POST", "/v1/volumes", b'[]', "invalid request"),
    ("PATCH", "/v1/settings", b'{"replica_replenishment_wait": -5}', "replenishment"),
    ("PATCH", "/v1/settings", b'{"name": "other"}', "name"),
    ("PATCH", "/v1/settings", b'{"backup_compression": "gzip"}', "backup_compression"),
    ("PATCH", "/v1/settings", b'{"backup_block_size": 3000}', "backup_block_size"),
]


@pytest.mark.parametrize(("method", "path", "body", "message"), HOSTILE,
                         ids=[f"{m} {p} {b[:24]!r}" for m, p, b, _ in HOSTILE])
def test_hostile_requests(node: Node, method: str, path: str, body: bytes,
                          message: str) -> None:
    """Row 17 at the API: a 4xx naming the problem, nothing changed, the daemon up."""
    headers = {"Authorization": f"Bearer {node.token_file.read_text().strip()}",
               "Content-Type": "application/json"}
    before = httpx.get(node.url + "/v1/volumes", headers=headers).json()
    settings = httpx.get(node.url + "/v1/settings", headers=headers).json()
    response = httpx.request(method, node.url + path, content=body, headers=headers)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid-argument" and message in error["message"], error
    assert httpx.get(node.url + "/v1/volumes", headers=headers).json() == before
    assert httpx.get(node.url + "/v1/settings", headers=headers).json() == settings


def test_a_lost_replica_is_replaced(node: Node) -> None:
    """A replica whose directory is gone (a failed disk) is replaced by a new replica,
    rebuilt online; the volume becomes healthy again with its data."""
    assert node.change_settings(replica_replenishment_wait=1)["replica_replenishment_wait"] == 1
    node.cli("volume", "create", "lose", "--size", "32M", "--replicas", "2")
    device = node.cli("volume", "attach", "lose").stdout.strip()
    payload = os.urandom(4 * MiB)
    with open(device, "r+b") as block:
        block.write(payload)
        os.fsync(block.fileno())
    victim = node.volume("lose")["replica_list"][0]
    os.kill(int((Path(victim["directory"]) / "server.pid").read_text()), signal.SIGKILL)
    shutil.rmtree(victim["directory"])
    with open(device, "r+b") as block:  # a write finds it gone
        block.seek(8 * MiB)
        block.write(payload)
        os.fsync(block.fileno())

    def replaced() -> bool:
        info = node.volume("lose")
        names = {r["name"] for r in info["replica_list"]}
        return victim["name"] not in names and len(names) == 2 and \
            info["robustness"] == "healthy"
    wait_for(replaced, 120, "a new replica, rebuilt")
    assert not Path(victim["directory"]).exists()
    with open(node.volume("lose")["device"], "rb") as reader:
        assert reader.read(len(payload)) == payload
        reader.seek(8 * MiB)
        assert reader.read(len(payload)) == payload
    node.cli("volume", "detach", "lose")
    node.cli("volume", "attach", "lose")  # the new set starts as equals
    assert node.volume("lose")["robustness"] == "healthy"


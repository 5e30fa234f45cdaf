"""RWX volumes: one volume shared read-write over NFSv4 by its own ganesha, with real
libnfs clients in two network namespaces (tests/nfsclient.py), through a replica killed
and a daemon restarted under their load."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import Node, wait_for
from tests.netns import SUBNET, Host, hosts
from tests.nfsclient import Client

ROOT = Path(__file__).resolve().parents[2]
CLIENT_TIMEOUT = 180.0

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ganesha.nfsd") is None,
    reason="needs root and nfs-ganesha")


@pytest.fixture
def clients() -> Iterator[list[Host]]:
    with hosts(2) as made:
        yield made


@pytest.fixture
def snode(tmp_path: Path, clients: list[Host]) -> Iterator[Node]:
    """A node daemon that serves its shares on the test network's bridge address (the
    clients' namespaces reach it there), with a second disk."""
    running = Node(tmp_path)
    running.start("--advertise", f"{SUBNET}.1")
    second = tmp_path / "disk2"
    second.mkdir()
    running.cli("disk", "add", second)
    try:
        yield running
    finally:
        running.cleanup()


def share_clients(node: Node, volume: str) -> int:
    text = httpx.get(node.url + "/metrics", headers={
        "Authorization": f"Bearer {node.token_file.read_text().strip()}"}).text
    prefix = f'appliance_share_clients{{volume="{volume}"}} '
    return next(int(float(line[len(prefix):])) for line in text.splitlines()
                if line.startswith(prefix))


def share_url(info: dict[str, object]) -> str:
    return f"nfs://{info['address']}{info['path']}?version=4&nfsport={info['port']}"


def client(host: Host, *argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*host.launcher, sys.executable, "-m", "tests.nfsclient", *argv],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(processes: list[subprocess.Popen[str]]) -> list[str]:
    """Wait for every client (bounded); their outputs; every one must have succeeded."""
    outputs = []
    try:
        for process in processes:
            output, _ = process.communicate(timeout=CLIENT_TIMEOUT)
            assert process.returncode == 0, output
            outputs.append(output)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
    return outputs


def wait_written(process: subprocess.Popen[str], count: int) -> None:
    """Read the client's progress until it wrote *count* files (it keeps going)."""
    assert process.stdout is not None
    seen = 0
    while seen < count:
        line = process.stdout.readline()
        assert line, "the client ended early"
        seen += line.startswith("written ")


def test_two_clients_share_a_volume_through_a_replica_kill_and_a_restart(
        snode: Node, clients: list[Host]) -> None:
    created = snode.cli("volume", "create", "shared", "--size", "320M", "--replicas", "2",
                        "--access-mode", "rwx").stdout
    info = snode.volume("shared")
    share = info["share"]
    assert share["address"] == f"{SUBNET}.1" and share["path"] == "/shared"
    assert "nfs4.1" in share["protocols"]
    assert f"shared at {SUBNET}.1:/shared (NFS port {share['port']}" in created
    assert (info["state"], info["access_mode"], info["device"]) == ("attached", "rwx", "")
    assert not Path("/dev/appliance/shared").exists()  # the share's device is its alone
    url = share_url(share)
    one, two = clients
    # a new share admits no client until the operator names some
    refused = client(one, "check", url, "a", "1")
    output, _ = refused.communicate(timeout=CLIENT_TIMEOUT)
    assert refused.returncode != 0 and f"mount {url}" in output, output
    snode.cli("volume", "share", "shared", "--allow", f"{SUBNET}.0/24")
    share = snode.volume("shared")["share"]
    assert share["options"] == {"allow": [f"{SUBNET}.0/24"], "read_only": False,
                                "squash": "root"}
    # two clients write different files at once; each reads the other's back intact
    finish([client(one, "write", url, "a", "1"), client(two, "write", url, "b", "2")])
    finish([client(one, "check", url, "b", "2"), client(two, "check", url, "a", "1")])
    # a replica killed under their load: no client error
    victim = Path(info["replica_list"][1]["directory"]) / "server.pid"
    killed = int(victim.read_text())
    writers = [client(one, "write", url, "c", "3", "24"), client(two, "write", url, "d", "4", "24")]
    wait_written(writers[0], 4)
    os.kill(killed, signal.SIGKILL)
    finish(writers)
    wait_for(lambda: int(victim.read_text()) != killed and
             snode.volume("shared")["robustness"] == "healthy", 180, "the replica rebuilt")
    # the daemon restarted under their load: ganesha keeps serving
    ganesha = int((snode.data / "run" / "shared" / "ganesha" / "ganesha.pid").read_text())
    writers = [client(one, "write", url, "e", "5", "24"), client(two, "write", url, "f", "6", "24")]
    wait_written(writers[1], 4)
    snode.stop()
    snode.start("--advertise", f"{SUBNET}.1")
    finish(writers)
    wait_for(lambda: snode.volume("shared")["state"] == "attached", 60, "adopted")
    assert snode.volume("shared")["share"] == share
    assert int((snode.data / "run" / "shared" / "ganesha" / "ganesha.pid").read_text()) == \
        ganesha
    finish([client(one, "check", url, prefix, seed, "24")
            for prefix, seed in (("c", "3"), ("d", "4"), ("e", "5"), ("f", "6"))] +
           [client(two, "check", url, "a", "1")])


@pytest.mark.slow  # a minute (the default suite's 30-minute budget): run with -m slow
def test_export_options_expansion_and_bad_input(snode: Node, clients: list[Host]) -> None:
    snode.cli("volume", "create", "opts", "--size", "320M", "--replicas", "1",
              "--access-mode", "rwx")
    share = snode.volume("opts")["share"]
    url = share_url(share)
    one, two = clients
    # only the first client's address
    snode.cli("volume", "share", "opts", "--allow", f"{one.address}/32")
    finish([client(one, "write", url, "x", "7")])
    refused = client(two, "check", url, "x", "7")
    output, _ = refused.communicate(timeout=CLIENT_TIMEOUT)
    assert refused.returncode != 0 and "NFS4ERR" in output, output
    # read-only (the allow-list kept), then for both: reads work, writes are refused
    shown = snode.cli("volume", "share", "opts", "--read-only").stdout
    assert f"{one.address}/32, read-only, squash root" in shown
    snode.cli("volume", "share", "opts", "--allow", f"{SUBNET}.0/24")
    finish([client(two, "check", url, "x", "7")])
    writer = client(two, "write", url, "y", "8")
    output, _ = writer.communicate(timeout=CLIENT_TIMEOUT)
    assert writer.returncode != 0 and "ROFS" in output, output
    snode.cli("volume", "share", "opts", "--read-write")
    # online expansion grows the file system behind the share
    mountpoint = snode.data / "shares" / "opts"
    before = os.statvfs(mountpoint)
    snode.cli("volume", "expand", "opts", "--size", "640M")
    after = os.statvfs(mountpoint)
    assert after.f_blocks * after.f_frsize > before.f_blocks * before.f_frsize + (250 << 20)
    finish([client(two, "write", url, "z", "9", "8")])
    # bad input: clear errors, nothing changed
    spec = {k: snode.volume("opts")[k] for k in ("share_allow", "share_read_only",
                                                  "share_squash", "size")}
    for args, code, message in (
            (["volume", "share", "opts", "--allow", "10.0.0.0/33"], 2, "not an address or CIDR"),
            (["volume", "share", "opts", "--allow", "10.0.0.1/8"], 2, "host bits"),
            (["volume", "share", "opts", "--allow", "host.example"], 2, "not an address"),
            (["volume", "attach", "opts", "--frontend", "iscsi"], 2, "RWX volume"),
            (["volume", "create", "tiny", "--size", "64M", "--access-mode", "rwx"], 2,
             "at least 300 MiB")):
        result = snode.cli(*args, check=False)
        assert (result.returncode, message in result.stderr) == (code, True), (args, result)
    assert {k: snode.volume("opts")[k] for k in spec} == spec
    assert "tiny" not in json.dumps(json.loads(snode.cli("volume", "list", "-o", "json").stdout))
    # a block volume is not shared
    snode.cli("volume", "create", "block", "--size", "16M", "--replicas", "1")
    snode.cli("volume", "attach", "block")
    result = snode.cli("volume", "share", "block", "--allow", "10.0.0.0/8", check=False)
    assert result.returncode == 1 and "not an RWX volume" in result.stderr
    assert snode.volume("block")["share_allow"] == []
    # a detach refused while a client is connected, and done once it is not
    snode.cli("volume", "share", "opts", "--allow", "127.0.0.0/8", "--allow", f"{SUBNET}.0/24")
    connected = Client(url)
    try:
        wait_for(lambda: share_clients(snode, "opts") == 1, 30, "the client counted")
        refused_detach = snode.cli("volume", "detach", "opts", check=False)
        assert refused_detach.returncode == 1, refused_detach
        assert "NFS client(s) are connected" in refused_detach.stderr
        assert snode.volume("opts")["share"]["port"] == share["port"]
    finally:
        connected.close()
    wait_for(lambda: share_clients(snode, "opts") == 0, 60, "the client gone")
    snode.cli("volume", "detach", "opts")
    # its port taken meanwhile by another program: shared again on another port
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind((share["address"], share["port"]))
        squatter.listen()
        snode.cli("volume", "attach", "opts")
        wait_for(lambda: snode.volume("opts")["share"], 60, "shared again")
        moved = snode.volume("opts")["share"]
        assert moved["port"] != share["port"]

        def readable() -> bool:  # after the NFSv4 grace period of a server start (40 s)
            checker = client(two, "check", share_url(moved), "z", "9", "8")
            output, _ = checker.communicate(timeout=CLIENT_TIMEOUT)
            assert checker.returncode == 0 or "NFS4ERR_GRACE" in output, output
            return checker.returncode == 0
        wait_for(readable, 120, "the files readable on the new port")
    snode.cli("volume", "detach", "opts")
    assert snode.volume("opts")["share"] is None
    assert not os.path.ismount(mountpoint)

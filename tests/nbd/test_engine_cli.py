"""The engine as an operator runs it: `appliance replica serve`, `appliance engine ...`,
and real NBD clients (fio, nbdinfo, nbdcopy, qemu-img) on its socket."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import VERIFY, MiB, Volume, alive, fio, fio_errors, free_port, run, wait_for


@pytest.fixture
def volumes(tmp_path: Path) -> Iterator[list[Volume]]:
    created: list[Volume] = []
    yield created
    for volume in created:
        volume.cleanup()


def make(volumes: list[Volume], root: Path, replicas: int, size: str = "256M") -> Volume:
    volume = Volume(root, replicas, size)
    volumes.append(volume)
    volume.serve_all()
    return volume


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_fio_verify_and_real_clients(tmp_path: Path, volumes: list[Volume],
                                     replicas: int) -> None:
    volume = make(volumes, tmp_path, replicas)
    volume.start_engine()
    info = subprocess.run(["nbdinfo", "--json", volume.uri], capture_output=True, text=True,
                          check=True)
    assert json.loads(info.stdout)["exports"][0]["export-size"] == 256 * MiB
    result = fio(volume.uri, *VERIFY, "--size=64M", "--offset=64M")
    assert result.returncode == 0 and fio_errors(result) == 0, result.stderr
    # a reference image written with nbdcopy, read back with qemu-img
    source = tmp_path / "source.img"
    source.write_bytes(os.urandom(8 * MiB) + bytes(4 * MiB) + os.urandom(MiB))
    subprocess.run(["nbdcopy", "--destination-is-zero", str(source),
                    f"nbd+unix:///?socket={volume.socket}"], check=True)
    extents = json.loads(subprocess.run(["nbdinfo", "--map", "--json", volume.uri],
                                        capture_output=True, text=True, check=True).stdout)
    beyond = next(e for e in extents if e["offset"] <= 200 * MiB < e["offset"] + e["length"])
    assert beyond["description"] == "hole,zero"  # nothing was ever written there
    assert any(e["description"] == "data" and e["offset"] == 0 for e in extents)
    back = tmp_path / "back.img"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", volume.uri, str(back)],
                   check=True)
    assert back.read_bytes()[: source.stat().st_size] == source.read_bytes()
    assert volume.status()["state"] == "healthy"
    volume.stop_engine()
    for index in range(replicas):
        volume.stop_server(index)
    images = volume.replicas_identical()
    assert images[0].read_bytes() == back.read_bytes()


def test_attach_mkfs_crash_rebuild_fsck(tmp_path: Path, volumes: list[Volume]) -> None:
    volume = make(volumes, tmp_path, 3, "512M")
    volume.start_engine("--timeout", "4")
    device = run("engine", "attach", "--control", volume.control).stdout.strip()
    assert Path(f"/dev/appliance/{volume.name}").resolve() == Path(device).resolve()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    subprocess.run(["mkfs.ext4", "-q", device], check=True)
    subprocess.run(["mount", device, str(mountpoint)], check=True)
    digests = {}
    try:
        for index in range(20):
            data = os.urandom(512 * 1024 + index)
            (mountpoint / f"file{index}").write_bytes(data)
            digests[f"file{index}"] = hashlib.sha256(data).hexdigest()
            if index == 5:
                subprocess.run(["sync"], check=True)
                volume.crash_server(1)  # kill -9 a replica; writing goes on
        subprocess.run(["sync"], check=True)
        volume.wait_mode(1, "ERR")
        volume.serve(1)
        run("engine", "add-replica", "--control", volume.control, volume.address(1))
        for index in range(20, 30):  # and during the rebuild
            data = os.urandom(300_000)
            (mountpoint / f"file{index}").write_bytes(data)
            digests[f"file{index}"] = hashlib.sha256(data).hexdigest()
        subprocess.run(["sync"], check=True)
        volume.wait_healthy()
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
    fsck = subprocess.run(["fsck.ext4", "-n", "-f", device], capture_output=True, text=True,
                          check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    subprocess.run(["mount", "-o", "ro", device, str(mountpoint)], check=True)
    try:
        for name, digest in digests.items():
            assert hashlib.sha256((mountpoint / name).read_bytes()).hexdigest() == digest
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
    run("engine", "detach", "--control", volume.control)
    assert not Path(f"/dev/appliance/{volume.name}").exists()
    volume.stop_engine()
    for index in range(3):
        volume.stop_server(index)
    volume.replicas_identical()


def test_snapshot_add_and_remove_replica(tmp_path: Path, volumes: list[Volume]) -> None:
    volume = make(volumes, tmp_path, 2)
    volume.start_engine()
    subprocess.run(["nbdcopy", "--", "[", "nbdkit", "pattern", "size=16M", "]",
                    volume.uri], check=True)
    run("engine", "snapshot", "--control", volume.control, "first", "--label", "k=v")
    status = run("engine", "status", "--control", volume.control).stdout
    assert "healthy" in status and "RW" in status
    result = run("engine", "snapshot", "--control", volume.control, "first", check=False)
    assert result.returncode == 2 and "already exists" in result.stderr
    run("engine", "remove-replica", "--control", volume.control, volume.address(1))
    assert [r["address"] for r in volume.status()["replicas"]] == [volume.address(0)]
    result = run("engine", "remove-replica", "--control", volume.control, volume.address(0),
                 check=False)
    assert result.returncode == 1 and "last one in service" in result.stderr
    run("engine", "add-replica", "--control", volume.control, volume.address(1))
    volume.wait_healthy()
    volume.stop_engine()
    volume.stop_server(0)
    volume.stop_server(1)
    layers = json.loads(run("replica", "inspect", volume.directories[1], "-o", "json").stdout)
    assert "first" in [layer["name"] for layer in layers["layers"]]
    volume.replicas_identical()


def test_engine_refuses_bad_setups_clearly(tmp_path: Path, volumes: list[Volume]) -> None:
    volume = make(volumes, tmp_path, 1)
    base: list[str | Path] = ["engine", "start", "v", "--replica", volume.address(0),
                              "--socket", tmp_path / "n.sock", "--control", tmp_path / "c.sock"]
    result = run(*base, "--secret-file", tmp_path / "missing", check=False)
    assert result.returncode == 2 and "does not exist" in result.stderr
    loose = tmp_path / "loose"
    loose.write_bytes(b"x" * 32)
    loose.chmod(0o644)
    result = run(*base, "--secret-file", loose, check=False)
    assert result.returncode == 1 and "make it 0600" in result.stderr
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"y" * 32)
    wrong.chmod(0o600)
    result = run(*base, "--secret-file", wrong, check=False)
    assert result.returncode == 1 and "refused the secret" in result.stderr
    assert b"y" * 32 not in (tmp_path / "c.sock.log").read_bytes()
    result = run("engine", "start", "v", "--replica", "127.0.0.1:1", "--secret-file",
                 volume.secret, "--socket", tmp_path / "n.sock", "--control",
                 tmp_path / "c.sock", check=False)
    assert result.returncode == 1 and "no replica is reachable" in result.stderr
    result = run("engine", "start", "v", "--replica", "nonsense", "--secret-file",
                 volume.secret, "--socket", tmp_path / "n.sock", "--control",
                 tmp_path / "c.sock", check=False)
    assert result.returncode == 2 and "HOST:PORT" in result.stderr
    result = run("engine", "status", "--control", tmp_path / "nothing.sock", check=False)
    assert result.returncode == 1 and "no engine control socket" in result.stderr
    volume.start_engine()
    result = volume.start_engine(check=False)
    assert result.returncode == 2 and "already running" in result.stderr


def test_tcp_listener_requires_tls_psk(tmp_path: Path, volumes: list[Volume]) -> None:
    volume = make(volumes, tmp_path, 1)
    port = free_port()
    volume.start_engine("--listen", f"127.0.0.1:{port}")
    psk = Path(str(volume.control) + ".psk")
    assert psk.stat().st_mode & 0o777 == 0o600
    plain = subprocess.run(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}"],
                           capture_output=True, text=True, check=False)
    assert plain.returncode != 0
    secure = subprocess.run(["nbdinfo", "--size",
                             f"nbds://appliance@127.0.0.1:{port}?tls-psk-file={psk}"],
                            capture_output=True, text=True, check=False)
    assert secure.returncode == 0 and secure.stdout.strip() == str(256 * MiB), secure.stderr


def test_replica_server_stops_cleanly_on_sigterm(tmp_path: Path, volumes: list[Volume]) -> None:
    volume = make(volumes, tmp_path, 1)
    pid = volume.server_pid(0)
    unix_socket = volume.directories[0] / "server.sock"
    assert unix_socket.is_socket()
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not alive(pid), 30, "the replica server to exit")
    assert not unix_socket.exists()  # it ran its clean stop, not just died
    run("replica", "check", volume.directories[0])  # and left the replica usable

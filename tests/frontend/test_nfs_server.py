"""NFS share servers (appliance.frontend.nfs): real nfs-ganesha, real libnfs clients.

The clients are libnfs 4.0 (Debian 12): its tools (``nfs-ls``, ``nfs-cat``, ``nfs-cp``) and,
for large files, a small ctypes client on ``libnfs.so.13`` (tests/nfsclient.py, also run as a
program in other network namespaces: ``python -m tests.nfsclient``).

libnfs 4.0's limits shape these tests:

* It speaks NFSv4.0 only (``?version=4``; a server offering only 4.1 answers
  NFS4ERR_MINOR_VERS_MISMATCH).
* Over NFSv4 it encodes each COMPOUND into a buffer of about 4 KiB, so one WRITE carries at most
  3936 bytes ("Failed to encode COMPOUND4args" above): ``nfs-cp`` writes a file in one call and
  cannot copy files above that size. :class:`Client` writes 1 MiB files in 3 KiB pwrites at
  increasing offsets, which works; reads have no such limit (one 1 MiB pread).
* Over NFSv4 its ``O_CREAT`` is an exclusive create: existing files are opened without it.

Every server, namespace and mount a test makes is removed by its fixtures.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from appliance.errors import AddressInUse, FailedPrecondition, InvalidArgument
from appliance.frontend import nfs
from tests.netns import Host, hosts
from tests.nfsclient import MIB, Client, content

ROOT = Path(__file__).resolve().parents[2]
CLIENT_TIMEOUT = 60.0

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ganesha.nfsd") is None or shutil.which("nfs-ls") is None,
    reason="needs root, nfs-ganesha(-vfs) and libnfs-utils")


def url(server: nfs.ShareServer, name: str = "") -> str:
    return f"nfs://{server.address}{server.pseudo}/{name}?version=4&nfsport={server.port}"


def tool(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=CLIENT_TIMEOUT,
                          check=False)


def client_program(host: Host | None, *argv: str) -> list[str]:
    """This module run as a client program (see :func:`main`), in *host*'s namespace."""
    prefix = host.launcher if host else []
    return [*prefix, sys.executable, "-m", "tests.nfsclient", *argv]


def run_at_once(commands: list[list[str]]) -> list[subprocess.CompletedProcess[str]]:
    """Run *commands* concurrently; each must finish within the client timeout."""
    started = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for command in commands]
    results = []
    try:
        for process in started:
            output, _ = process.communicate(timeout=CLIENT_TIMEOUT)
            results.append(subprocess.CompletedProcess(process.args, process.returncode,
                                                       output, ""))
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
    return results


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def listening(address: str, port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex((address, port)) == 0


def free_port(address: str) -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


# -- fixtures ------------------------------------------------------------------------------

@pytest.fixture
def export_root(small_ext4: Path) -> Path:
    """The mounted ext4 filesystem to share, writable by the squashed root of the clients (a
    fresh filesystem's root is root's, mode 0755)."""
    small_ext4.chmod(0o1777)
    return small_ext4


@pytest.fixture
def share(tmp_path: Path, export_root: Path) -> Iterator[Callable[..., nfs.ShareServer]]:
    """Makes and starts share servers (keyword arguments of ShareServer over defaults: a free
    port on 127.0.0.2); every one is stopped afterwards, before the filesystem they export is
    unmounted."""
    started: list[Path] = []

    def make(export_path: Path, **settings: object) -> nfs.ShareServer:
        address = str(settings.pop("address", "127.0.0.2"))
        fields: dict[str, object] = {
            "directory": tmp_path / f"share{len(started)}", "export_path": export_path,
            "pseudo": f"/vol{len(started)}", "address": address,
            "port": free_port(address), **settings}
        server = nfs.ShareServer(**fields)  # type: ignore[arg-type]
        started.append(server.directory)
        nfs.start(server)
        return server

    yield make
    for directory in started:
        nfs.stop(directory)
        assert nfs.running(directory) is None


@pytest.fixture
def two_hosts() -> Iterator[list[Host]]:
    """Two client hosts in network namespaces (10.77.0.10, .11), the root namespace at
    10.77.0.1."""
    with hosts(2) as made:
        yield made


# -- tests ---------------------------------------------------------------------------------

def test_options_are_validated() -> None:
    with pytest.raises(InvalidArgument, match=r"10\.0\.0\.300"):
        nfs.ExportOptions(allow=("10.0.0.300",)).validate()
    with pytest.raises(InvalidArgument, match=r"10\.0\.0\.1/24"):
        nfs.ExportOptions(allow=("10.0.0.1/24",)).validate()  # host bits set: a typo
    with pytest.raises(InvalidArgument, match="squash"):
        nfs.ExportOptions(squash="root_squash").validate()
    assert nfs.ExportOptions(allow=("10.0.0.0/24", "10.1.0.5")).validate().allow == (
        "10.0.0.0/24", "10.1.0.5/32")
    server = nfs.ShareServer(Path("/run/s"), Path("/mnt/v"), "/v", "127.0.0.2", 2049)
    for bad in ({"pseudo": "/"}, {"pseudo": "/a/../b"}, {"pseudo": 'v"'},
                {"export_path": Path('/mnt/"; }')}, {"address": "host"}, {"port": 0},
                {"nfs3": True}, {"grace_period": 5, "lease_lifetime": 10},
                {"log_level": "LOUD"}):
        with pytest.raises(InvalidArgument):
            replace(server, **bad).validate()


def test_config_names_allowed_clients_and_nothing_else() -> None:
    server = nfs.ShareServer(Path("/run/s"), Path("/mnt/v"), "/v", "10.77.0.1", 20490,
                             nfs.ExportOptions(allow=("10.77.0.10",), read_only=True))
    config = nfs.render_config(server)
    assert "Access_Type = None;" in config  # the export's default: nobody
    assert "CLIENT { Clients = 10.77.0.10/32; Access_Type = RO; Protocols = 4; }" in config
    assert 'RecoveryRoot = "/run/s/recovery";' in config
    assert "Protocols = 4;" in config and "MNT_Port" not in config


def test_start_serve_stop(share: Callable[..., nfs.ShareServer], export_root: Path) -> None:
    (export_root / "hello.txt").write_text("hello\n")
    server = share(export_root)
    pid = nfs.running(server.directory)
    assert pid and (server.directory / nfs.CONFIG_FILE).stat().st_mode & 0o777 == 0o600
    assert nfs.start(server) == pid  # the same settings again: already done
    listing = tool("nfs-ls", url(server))
    assert listing.returncode == 0 and "hello.txt" in listing.stdout, listing.stderr
    assert tool("nfs-cat", url(server, "hello.txt")).stdout == "hello\n"
    nfs.stop(server.directory)
    assert nfs.running(server.directory) is None
    assert tool("nfs-ls", url(server)).returncode != 0


def test_a_file_one_client_writes_is_read_intact_by_another(
        share: Callable[..., nfs.ShareServer], export_root: Path) -> None:
    server = share(export_root)
    data = content(1)
    writer, reader = Client(url(server)), Client(url(server))
    try:
        writer.write("big.bin", data)
        assert reader.read("big.bin", MIB) == data
        assert nfs.clients(server.directory) == 1  # two connections, one address
    finally:
        writer.close()
        reader.close()
    assert (export_root / "big.bin").read_bytes() == data
    assert (export_root / "big.bin").stat().st_uid == 65534  # root was squashed
    copied = subprocess.run(["nfs-cat", url(server, "big.bin")], capture_output=True,
                            timeout=CLIENT_TIMEOUT, check=True)
    assert copied.stdout == data


def test_clients_in_two_namespaces_write_at_once_and_read_each_other(
        share: Callable[..., nfs.ShareServer], export_root: Path,
        two_hosts: list[Host]) -> None:
    """Each host writes two 1 MiB files (in 3 KiB NFSv4 WRITEs, libnfs' limit) at the same time
    as the other, then reads the other's back."""
    server = share(export_root, address="10.77.0.1",
                   options=nfs.ExportOptions(allow=tuple(h.address for h in two_hosts)))
    writes = run_at_once([client_program(host, "write", url(server), f"h{n}-", str(n))
                          for n, host in enumerate(two_hosts)])
    assert all(r.returncode == 0 for r in writes), [r.stdout for r in writes]
    checks = run_at_once([client_program(host, "check", url(server), f"h{1 - n}-", str(1 - n))
                          for n, host in enumerate(two_hosts)])
    assert all(r.returncode == 0 for r in checks), [r.stdout for r in checks]
    assert (export_root / "h1-0").read_bytes() == content(1000)  # seed 1, file 0


def test_allow_list_refuses_another_address_until_updated(
        share: Callable[..., nfs.ShareServer], export_root: Path,
        two_hosts: list[Host]) -> None:
    allowed, other = two_hosts
    server = share(export_root, address="10.77.0.1",
                   options=nfs.ExportOptions(allow=(allowed.address,)))
    pid = nfs.running(server.directory)
    assert tool(*allowed.launcher, "nfs-ls", url(server)).returncode == 0
    refused = tool(*other.launcher, "nfs-ls", url(server))
    assert refused.returncode != 0 and "NFS4ERR_NOENT" in refused.stderr  # export hidden
    nfs.update(replace(server, options=nfs.ExportOptions(allow=(f"{other.address}/32",))))
    assert nfs.running(server.directory) == pid  # changed in place, without a restart
    assert tool(*other.launcher, "nfs-ls", url(server)).returncode == 0
    assert tool(*allowed.launcher, "nfs-ls", url(server)).returncode != 0


def test_read_only_export_refuses_writes(share: Callable[..., nfs.ShareServer],
                                         export_root: Path, tmp_path: Path) -> None:
    (export_root / "kept.txt").write_text("kept\n")
    (export_root / "kept.txt").chmod(0o644)
    server = share(export_root, options=nfs.ExportOptions(read_only=True))
    assert tool("nfs-cat", url(server, "kept.txt")).stdout == "kept\n"
    (tmp_path / "new.txt").write_text("new\n")
    refused = tool("nfs-cp", str(tmp_path / "new.txt"), url(server, "new.txt"))
    assert refused.returncode != 0 and "NFS4ERR_ROFS" in refused.stderr
    assert not (export_root / "new.txt").exists()
    nfs.update(replace(server, options=nfs.ExportOptions()))
    assert tool("nfs-cp", str(tmp_path / "new.txt"), url(server, "new.txt")).returncode == 0


def test_squash_changes_on_update(share: Callable[..., nfs.ShareServer], export_root: Path,
                                  tmp_path: Path) -> None:
    small = tmp_path / "small.txt"
    small.write_text("x")
    server = share(export_root, options=nfs.ExportOptions(anonymous_uid=4242,
                                                          anonymous_gid=4343))
    assert tool("nfs-cp", str(small), url(server, "squashed")).returncode == 0
    assert (export_root / "squashed").stat().st_uid == 4242
    nfs.update(replace(server, options=nfs.ExportOptions(squash="none")))
    assert tool("nfs-cp", str(small), url(server, "as-root")).returncode == 0
    assert (export_root / "as-root").stat().st_uid == 0
    nfs.update(replace(server, options=nfs.ExportOptions(squash="all", anonymous_uid=7)))
    user = url(server, "as-user") + "&uid=1234&gid=1234"
    assert tool("nfs-cp", str(small), user).returncode == 0
    assert (export_root / "as-user").stat().st_uid == 7


def test_two_servers_side_by_side(share: Callable[..., nfs.ShareServer],
                                  export_root: Path) -> None:
    first, second = export_root / "a", export_root / "b"
    for directory in (first, second):
        directory.mkdir(mode=0o1777)
        directory.chmod(0o1777)
        (directory / f"in-{directory.name}").write_text(directory.name)
    one = share(first)
    two = share(second, address="127.0.0.3")
    three = share(second, port=one.port + 1 if one.port < 65535 else one.port - 1,
                  address="127.0.0.2")  # same address as one, another port
    assert "in-a" in tool("nfs-ls", url(one)).stdout
    for server in (two, three):
        listing = tool("nfs-ls", url(server)).stdout
        assert "in-b" in listing and "in-a" not in listing
    assert len({nfs.running(s.directory) for s in (one, two, three)}) == 3
    assert (one.directory / "recovery" / "v4recov").is_dir()


def test_start_on_a_taken_port_names_the_port(share: Callable[..., nfs.ShareServer],
                                              export_root: Path, tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.2", 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = nfs.ShareServer(tmp_path / "taken", export_root, "/v", "127.0.0.2", port)
        with pytest.raises(AddressInUse, match=f"port {port}"):
            nfs.start(server)
    assert nfs.running(server.directory) is None
    running = share(export_root)  # and a ganesha holding the port
    with pytest.raises(AddressInUse, match=f"port {running.port}"):
        nfs.start(replace(running, directory=tmp_path / "second"))


def test_export_path_must_be_a_directory(tmp_path: Path) -> None:
    server = nfs.ShareServer(tmp_path / "s", tmp_path / "missing", "/v", "127.0.0.2",
                             free_port("127.0.0.2"))
    with pytest.raises(FailedPrecondition, match="missing"):
        nfs.start(server)
    assert nfs.running(server.directory) is None


def test_stop_without_a_server_does_nothing(share: Callable[..., nfs.ShareServer],
                                            export_root: Path, tmp_path: Path) -> None:
    nfs.stop(tmp_path / "never-started")
    server = share(export_root)
    nfs.stop(server.directory)
    nfs.stop(server.directory)
    assert nfs.running(server.directory) is None
    assert nfs.clients(server.directory) is None


def test_server_outlives_the_process_that_started_it(
        share: Callable[..., nfs.ShareServer], export_root: Path, tmp_path: Path) -> None:
    server = nfs.ShareServer(tmp_path / "adopted", export_root, "/adopted", "127.0.0.2",
                             free_port("127.0.0.2"))
    script = ("import sys; from pathlib import Path; from appliance.frontend import nfs; "
              f"print(nfs.start(nfs.ShareServer(Path({str(server.directory)!r}), "
              f"Path({str(export_root)!r}), '/adopted', '127.0.0.2', {server.port})))")
    try:
        starter = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                                 text=True, timeout=60, check=True)
        pid = nfs.running(server.directory)
        assert pid == int(starter.stdout)
        assert nfs.load(server.directory) == server
        assert tool("nfs-ls", url(server)).returncode == 0
    finally:
        nfs.stop(server.directory)
    assert nfs.running(server.directory) is None


@pytest.mark.skipif(shutil.which("rpcbind") is None, reason="needs rpcbind")
def test_nfs3_takes_large_writes_with_rpcbind(share: Callable[..., nfs.ShareServer],
                                              export_root: Path, tmp_path: Path) -> None:
    """NFSv3 (ganesha exits at start without rpcbind) takes the 1 MiB WRITE that libnfs cannot
    send over NFSv4; the client names both ports, rpcbind is not asked."""
    if listening("127.0.0.1", 111):
        pytest.skip("an rpcbind of someone else's runs")
    rpcbind = subprocess.Popen(["rpcbind", "-f"])  # no -w: no state of earlier runs
    try:
        wait_for(lambda: listening("127.0.0.1", 111), 10, "rpcbind")
        server = share(export_root, nfs3=True, mount_port=free_port("127.0.0.2"))
        (tmp_path / "big").write_bytes(content(3))
        v3 = f"nfs://127.0.0.2{server.pseudo}/big?nfsport={server.port}" \
             f"&mountport={server.mount_port}"
        copied = tool("nfs-cp", str(tmp_path / "big"), v3)
        assert copied.returncode == 0, copied.stderr
        assert (export_root / "big").read_bytes() == content(3)
        nfs.stop(server.directory)
    finally:
        rpcbind.terminate()
        rpcbind.wait(timeout=10)


def test_a_restart_holds_new_opens_for_the_grace_period(
        share: Callable[..., nfs.ShareServer], export_root: Path) -> None:
    """A change SIGHUP cannot make (the port) restarts ganesha; the recorded client makes it
    refuse new OPENs (NFS4ERR_GRACE) until the grace period ends (10 s here: ~11 s test)."""
    server = share(export_root, lease_lifetime=5, grace_period=10)
    client = Client(url(server))
    try:
        client.write("before", b"x" * 100)
    finally:
        client.close()
    moved = replace(server, port=free_port(server.address))
    restarted = time.monotonic()
    nfs.update(moved)
    refused = tool("nfs-cat", url(moved, "before"))
    assert "NFS4ERR_GRACE" in refused.stderr
    wait_for(lambda: tool("nfs-cat", url(moved, "before")).returncode == 0, 30, "grace to end")
    assert 8 < time.monotonic() - restarted < 20

"""The iSCSI frontend through real initiators: libiscsi's tools (iscsi-ls,
iscsi-readcapacity16), a libiscsi session of the test's own (tests/iscsiclient.py) and
qemu-img's iSCSI driver, against the daemon's own tgtd."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from appliance.node.metrics import allocated_bytes
from tests.harness import MiB, Node, alive, free_port, wait_for
from tests.iscsiclient import IscsiClient, IscsiError

SECRET = "correct-horse-battery"
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="attaching needs root")


@pytest.fixture
def inode(tmp_path: Path) -> Iterator[Node]:
    """A node daemon whose iSCSI portal is a free port on 127.0.0.1, with a second disk."""
    config = tmp_path / "node.toml"
    config.write_text(f'iscsi_portal = "127.0.0.1:{free_port()}"\n')
    running = Node(tmp_path)
    running.start("--config", config)
    second = tmp_path / "disk2"
    second.mkdir()
    running.cli("disk", "add", second)
    try:
        yield running
    finally:
        running.cleanup()


def secret_file(tmp_path: Path, secret: str = SECRET, name: str = "chap") -> Path:
    path = tmp_path / name
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return path


def attach_iscsi(node: Node, volume: str, *extra: str | Path) -> dict[str, object]:
    url = node.cli("volume", "attach", volume, "--frontend", "iscsi", *extra).stdout.strip()
    served: dict[str, object] = node.volume(volume)["frontend"]
    assert url == f"iscsi://{served['portal']}/{served['iqn']}/1"
    return served


def ls(portal: object, user: str | None = None, secret: str | None = None
       ) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith("LIBISCSI_")}
    if user is not None and secret is not None:  # (the environment, not the arguments)
        environment.update(LIBISCSI_CHAP_USERNAME=user, LIBISCSI_CHAP_PASSWORD=secret)
    return subprocess.run(["iscsi-ls", "-s", f"iscsi://{portal}"], capture_output=True,
                          text=True, timeout=60, env=environment, check=False)


def test_chap_is_required_and_the_lun_is_described(inode: Node, tmp_path: Path) -> None:
    inode.cli("volume", "create", "tv", "--size", "64M", "--replicas", "1")
    served = attach_iscsi(inode, "tv", "--chap-user", "alice", "--chap-secret-file",
                          secret_file(tmp_path))
    assert served["kind"] == "iscsi" and served["lun"] == 1
    assert str(served["iqn"]).startswith("iqn.2026-12.io.appliance:") and \
        str(served["iqn"]).endswith(".tv")
    assert not Path("/dev/appliance/tv").exists()  # no local device for an iSCSI volume
    for user, secret in ((None, None), ("alice", "wrong-secret-1"), ("mallory", SECRET)):
        refused = ls(served["portal"], user, secret)
        assert refused.returncode != 0 and "Authentication failure" in (
            refused.stdout + refused.stderr), refused
    listed = ls(served["portal"], "alice", SECRET)
    assert listed.returncode == 0, listed.stderr
    assert f"Target:{served['iqn']}" in listed.stdout and "Lun:1" in listed.stdout
    capacity = subprocess.run(
        ["iscsi-readcapacity16", f"iscsi://{served['portal']}/{served['iqn']}/1"],
        capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, "LIBISCSI_CHAP_USERNAME": "alice",
             "LIBISCSI_CHAP_PASSWORD": SECRET}).stdout
    assert "Total size:67108864" in capacity
    assert "LOGICAL BLOCK LENGTH IN BYTES:512" in capacity
    assert "LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT:3" in capacity  # 4 KiB physical
    assert "LBPME:1" in capacity  # thin provisioned: UNMAP
    # the operator's view: iscsiadm commands, and the secret only into a 0600 file
    commands = inode.cli("volume", "iscsi", "tv").stdout
    assert f"iscsiadm -m node -T {served['iqn']} -p {served['portal']} --login" in commands
    assert SECRET not in commands
    written = tmp_path / "out" / "secret"
    written.parent.mkdir()
    commands = inode.cli("volume", "iscsi", "tv", "--secret-file", written).stdout
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert written.read_text().strip() == SECRET and SECRET not in commands
    assert f'"$(cat {written})"' in commands
    info = json.loads(inode.cli("volume", "iscsi", "tv", "-o", "json").stdout)
    assert info["user"] == "alice" and "secret" not in info
    # the secret is nowhere in the daemon's log or in any process's arguments
    assert SECRET not in inode.log.read_text()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                assert SECRET.encode() not in (entry / "cmdline").read_bytes()
            except OSError:
                continue
    metrics = httpx.get(inode.url + "/metrics", headers={
        "Authorization": f"Bearer {inode.token_file.read_text().strip()}"}).text
    assert 'appliance_iscsi_sessions{volume="tv"} 0.0' in metrics


def test_node_credentials_initiators_and_mutual_chap(inode: Node, tmp_path: Path) -> None:
    """Without --chap-user the node's credentials hold (CHAP is still required); an
    allow-list admits only the initiators named; mutual CHAP makes the target prove
    itself."""
    inode.cli("volume", "create", "nc", "--size", "16M", "--replicas", "1")
    served = attach_iscsi(inode, "nc", "--initiator", "iqn.2026-12.test.appliance:client")
    node_secret = tmp_path / "node-secret"
    inode.cli("volume", "iscsi", "nc", "--secret-file", node_secret)
    user = json.loads(inode.cli("volume", "iscsi", "nc", "-o", "json").stdout)["user"]
    secret = node_secret.read_text().strip()
    portal, iqn = str(served["portal"]), str(served["iqn"])
    with pytest.raises(IscsiError, match="Authentication"):
        IscsiClient(portal, iqn, None, None)
    with IscsiClient(portal, iqn, user, secret) as client:
        client.write(0, b"x" * 4096)
    with pytest.raises(IscsiError, match="log in"):
        IscsiClient(portal, iqn, user, secret, initiator="iqn.2026-12.test.appliance:other")
    # mutual CHAP on another volume
    inode.cli("volume", "create", "mc", "--size", "16M", "--replicas", "1")
    mutual = attach_iscsi(inode, "mc", "--chap-user", "bob", "--chap-secret-file",
                          secret_file(tmp_path), "--mutual-chap-user", "target-mc",
                          "--mutual-chap-secret-file",
                          secret_file(tmp_path, "the-target-secret", "mutual"))
    with IscsiClient(str(mutual["portal"]), str(mutual["iqn"]), "bob", SECRET,
                     mutual=("target-mc", "the-target-secret")) as client:
        client.write(0, b"y" * 4096)
    with pytest.raises(IscsiError):
        IscsiClient(str(mutual["portal"]), str(mutual["iqn"]), "bob", SECRET,
                    mutual=("target-mc", "not-the-target-secret"))
    # new credentials for the attached volume reach the target
    attach_iscsi(inode, "mc", "--chap-user", "bob", "--chap-secret-file",
                 secret_file(tmp_path, "bobs-new-secret-2", "rotated"))

    def rotated() -> bool:
        try:
            IscsiClient(str(mutual["portal"]), str(mutual["iqn"]), "bob",
                        "bobs-new-secret-2").close()
        except IscsiError:
            return False
        return True
    wait_for(rotated, 30, "the new secret in force")
    with pytest.raises(IscsiError, match="Authentication"):
        IscsiClient(str(mutual["portal"]), str(mutual["iqn"]), "bob", SECRET)


def test_data_survives_a_replica_killed_and_rebuilt(inode: Node, tmp_path: Path) -> None:
    """A volume-sized pattern written through the target (each write acknowledged GOOD,
    recorded) while a replica is killed and rebuilt reads back with zero mismatches; the
    replicas end identical to what was acknowledged."""
    inode.change_settings(replica_replenishment_wait=1)
    size = 64 * MiB
    inode.cli("volume", "create", "dv", "--size", str(size), "--replicas", "2")
    served = attach_iscsi(inode, "dv", "--chap-user", "dv-user", "--chap-secret-file",
                          secret_file(tmp_path))
    chunk = 256 << 10
    pattern = {offset: os.urandom(chunk) for offset in range(0, size, chunk)}
    acknowledged: dict[int, bytes] = {}
    victim = inode.volume("dv")["replica_list"][1]
    pid_file = Path(victim["directory"]) / "server.pid"
    killed = int(pid_file.read_text())
    with IscsiClient(str(served["portal"]), str(served["iqn"]), "dv-user", SECRET) as client:
        for index, (offset, data) in enumerate(pattern.items()):
            if index == len(pattern) // 3:
                os.kill(killed, signal.SIGKILL)
            client.write(offset, data, fua=index % 16 == 0)
            acknowledged[offset] = data
        client.flush()

        def rebuilt() -> bool:  # its server started again, and the replica back in service
            info = inode.volume("dv")
            return int(pid_file.read_text()) != killed and info["robustness"] == "healthy" \
                and [r["mode"] for r in info["replica_list"]] == ["RW", "RW"]
        wait_for(rebuilt, 180, "the killed replica rebuilt")
        mismatches = [offset for offset, data in acknowledged.items()
                      if client.read(offset, chunk) != data]
    assert len(acknowledged) == len(pattern) and mismatches == []


def test_unmap_returns_space_and_expansion_reaches_the_initiator(inode: Node,
                                                                 tmp_path: Path) -> None:
    inode.cli("volume", "create", "uv", "--size", "64M", "--replicas", "2")
    served = attach_iscsi(inode, "uv", "--chap-user", "uv-user", "--chap-secret-file",
                          secret_file(tmp_path))
    directories = [r["directory"] for r in inode.volume("uv")["replica_list"]]
    portal, iqn = str(served["portal"]), str(served["iqn"])
    with IscsiClient(portal, iqn, "uv-user", SECRET) as client:
        client.write(0, os.urandom(32 * MiB))
        client.flush()
        before = [allocated_bytes(d) for d in directories]
        client.unmap(0, 32 * MiB)
        client.flush()
        assert client.read(0, MiB) == bytes(MiB)  # LBPRZ: unmapped blocks read zeros
        after = [allocated_bytes(d) for d in directories]
        assert all(b - a >= 24 * MiB for b, a in zip(before, after, strict=True)), \
            (before, after)
        # over a snapshot's data, unmapped blocks read zeros too (LBPRZ)
        client.write(40 * MiB, b"\xab" * MiB)
        client.flush()
        inode.cli("snapshot", "create", "uv", "below")
        client.unmap(40 * MiB, MiB)
        client.unmap(41 * MiB, 512)  # and inside a block
        assert client.read(40 * MiB, MiB) == bytes(MiB)
        # the file system of an iSCSI volume is its initiator's: not grown here
        refused = inode.cli("volume", "expand", "uv", "--size", "80M", "--resize-fs",
                            check=False)
        assert refused.returncode == 2 and "initiator" in refused.stderr
        assert inode.volume("uv")["size"] == 64 * MiB
        # online expansion while logged in: READ CAPACITY grows, the new end is writable
        inode.cli("volume", "expand", "uv", "--size", "96M")
        capacity = subprocess.run(
            ["iscsi-readcapacity16", f"iscsi://{portal}/{iqn}/1"], capture_output=True,
            text=True, timeout=60, check=True, env={
                **os.environ, "LIBISCSI_CHAP_USERNAME": "uv-user",
                "LIBISCSI_CHAP_PASSWORD": SECRET}).stdout
        assert "Total size:100663296" in capacity
        tail = os.urandom(MiB)
        client.write(95 * MiB, tail)
        assert client.read(95 * MiB, MiB) == tail


def test_restart_keeps_the_target_and_detach_removes_it(inode: Node, tmp_path: Path) -> None:
    """tgtd keeps serving while the daemon restarts (the session stays logged in); detach
    is refused while an initiator is logged in, and then removes the target."""
    inode.cli("volume", "create", "rv", "--size", "32M", "--replicas", "1")
    served = attach_iscsi(inode, "rv", "--chap-user", "rv-user", "--chap-secret-file",
                          secret_file(tmp_path))
    tgtd = int((inode.data / "run" / "tgtd" / "tgtd.pid").read_text())
    portal, iqn = str(served["portal"]), str(served["iqn"])
    client = IscsiClient(portal, iqn, "rv-user", SECRET)
    try:
        written = {}
        exports = [e for e in json.loads(inode.cli("events", "--volume", "rv", "-o",
                                                   "json").stdout)
                   if e["kind"] == "iscsi-exported"]
        inode.stop()
        for index in range(64):
            written[index] = os.urandom(4096)
            client.write(index * 4096, written[index])
        inode.start("--config", tmp_path / "node.toml")
        # a volume created now is made by a pass of the new daemon, which visits "rv" too
        inode.cli("volume", "create", "marker", "--size", "16M", "--replicas", "1")
        assert inode.volume("rv")["state"] == "attached"
        assert inode.volume("rv")["frontend"] == served  # adopted: not exported again
        assert [e for e in json.loads(inode.cli("events", "--volume", "rv", "-o",
                                                "json").stdout)
                if e["kind"] == "iscsi-exported"] == exports
        for index in range(64, 128):
            written[index] = os.urandom(4096)
            client.write(index * 4096, written[index])
        assert all(client.read(i * 4096, 4096) == data for i, data in written.items())
        assert int((inode.data / "run" / "tgtd" / "tgtd.pid").read_text()) == tgtd
        refused = inode.cli("volume", "detach", "rv", check=False)
        assert refused.returncode == 1 and "initiators are logged in" in refused.stderr
        assert inode.volume("rv")["state"] == "attached"
    finally:
        client.close()
    inode.cli("volume", "detach", "rv")
    assert ls(portal, "rv-user", SECRET).stdout.count(iqn) == 0
    assert alive(tgtd)  # tgtd stays for the other targets
    assert inode.volume("rv")["frontend"] == {"kind": "iscsi"}


def test_qemu_img_reads_what_the_local_device_wrote(inode: Node, tmp_path: Path) -> None:
    """A hypervisor's view: what was written through the local block device is what
    qemu-img reads through iscsi://USER%SECRET@PORTAL/IQN/LUN."""
    inode.cli("volume", "create", "qv", "--size", "16M", "--replicas", "2")
    device = inode.cli("volume", "attach", "qv").stdout.strip()
    image = tmp_path / "written.raw"
    image.write_bytes(os.urandom(16 * MiB))
    with open(device, "r+b") as block:
        block.write(image.read_bytes())
        os.fsync(block.fileno())
    inode.cli("volume", "detach", "qv")
    served = attach_iscsi(inode, "qv", "--chap-user", "qv-user", "--chap-secret-file",
                          secret_file(tmp_path))
    copy = tmp_path / "read.raw"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw",
                    f"iscsi://qv-user%{SECRET}@{served['portal']}/{served['iqn']}/1",
                    str(copy)], check=True, capture_output=True, timeout=120)
    assert copy.read_bytes() == image.read_bytes()


BAD_ATTACH = [
    (["--chap-user", "u1", "--chap-secret-file", "SHORT"], 2, "12 to 255 characters"),
    (["--chap-user", "u1"], 2, "go together"),
    (["--chap-user", "bad user", "--chap-secret-file", "GOOD"], 2, "invalid CHAP user"),
    (["--initiator", "not-an-iqn"], 2, "invalid initiator name"),
    (["--chap-user", "appliance", "--chap-secret-file", "GOOD"], 2, "the node's own"),
    (["--initiator", "iqn.2024-01.com.example:initiator-address=ALL"], 2,
     "invalid initiator name"),  # (would be a second ACL entry in tgt's request)
    (["--chap-user", "u1", "--chap-secret-file", "GOOD", "--mutual-chap-user", "appliance",
      "--mutual-chap-secret-file", "OTHER"], 2, "the node's own"),
    (["--chap-user", "u1", "--chap-secret-file", "GOOD", "--mutual-chap-user", "u1",
      "--mutual-chap-secret-file", "OTHER"], 2, "must differ"),
]


def test_bad_input_changes_nothing(inode: Node, tmp_path: Path) -> None:
    inode.cli("volume", "create", "bv", "--size", "16M", "--replicas", "1")
    files = {"SHORT": str(secret_file(tmp_path, "elevenchars", "short")),
             "GOOD": str(secret_file(tmp_path)),
             "OTHER": str(secret_file(tmp_path, "the-other-secret", "other-secret"))}
    for extra, code, message in BAD_ATTACH:
        args = [files.get(arg, arg) for arg in extra]
        result = inode.cli("volume", "attach", "bv", "--frontend", "iscsi", *args, check=False)
        assert (result.returncode, message in result.stderr) == (code, True), (extra, result)
        info = inode.volume("bv")
        assert (info["state"], info["attached"], info["frontend"]) == \
            ("detached", False, {"kind": "blockdev"}), extra
    unknown = inode.cli("volume", "attach", "bv", "--frontend", "nvme", check=False)
    assert unknown.returncode == 2 and "nvme" in unknown.stderr
    response = httpx.post(inode.url + "/v1/volumes/bv/attach", json={"frontend": "nvme"},
                          headers={"Authorization":
                                   f"Bearer {inode.token_file.read_text().strip()}"})
    assert response.status_code == 400 and "unknown frontend" in response.text
    assert not (inode.data / "iscsi" / "bv.chap").exists()
    # a volume attached as a block device is not exported without a detach
    inode.cli("volume", "attach", "bv")
    moved = inode.cli("volume", "attach", "bv", "--frontend", "iscsi", check=False)
    assert moved.returncode == 1 and "detach it" in moved.stderr
    assert inode.volume("bv")["frontend"]["kind"] == "blockdev"
    # one CHAP user, one secret on a node
    inode.cli("volume", "create", "b2", "--size", "16M", "--replicas", "1")
    attach_iscsi(inode, "b2", "--chap-user", "shared", "--chap-secret-file", files["GOOD"])
    inode.cli("volume", "create", "b3", "--size", "16M", "--replicas", "1")
    clash = inode.cli("volume", "attach", "b3", "--frontend", "iscsi", "--chap-user", "shared",
                      "--chap-secret-file", secret_file(tmp_path, "another-secret-1", "other"),
                      check=False)
    assert clash.returncode == 2 and "another secret" in clash.stderr
    assert inode.volume("b3")["attached"] is False


@pytest.mark.slow  # minutes: libiscsi's whole SCSI conformance suite, twice
def test_conformance_matches_tgt_on_a_file(inode: Node, tmp_path: Path) -> None:
    """libiscsi's iscsi-test-cu against the volume's LUN and against tgt serving a plain
    file (the same tgtd binary and store): every test that passes there passes here, and
    the LUN fails nothing tgt itself does not."""
    from appliance.frontend import tgt  # noqa: PLC0415
    from tests.frontend.conformance import run_all  # noqa: PLC0415

    inode.cli("volume", "create", "cv", "--size", "64M", "--replicas", "2")
    served = attach_iscsi(inode, "cv", "--chap-user", "cv-user", "--chap-secret-file",
                          secret_file(tmp_path))
    image = tmp_path / "plain.img"
    with open(image, "wb") as out:
        out.truncate(64 * MiB)
    reference = tgt.Tgt(tmp_path / "reftgt", ("127.0.0.1", free_port()))
    reference.ensure_running()
    try:
        tid = reference.new_target("iqn.2026-12.test.appliance:plain")
        reference.request(tgt.MODE_DEVICE, tgt.OP_NEW, f"path={image},bstype=rdwr", tid=tid,
                          lun=1)
        reference.request(tgt.MODE_DEVICE, tgt.OP_UPDATE, "thin_provisioning=1,lbppbe=3",
                          tid=tid, lun=1)
        reference.request(tgt.MODE_TARGET, tgt.OP_BIND, "initiator-address=ALL", tid=tid)
        portal = f"{reference.portal[0]}:{reference.portal[1]}"
        theirs = run_all(f"iscsi://{portal}/iqn.2026-12.test.appliance:plain/1")
    finally:
        reference.stop()
    ours = run_all(f"iscsi://{served['portal']}/{served['iqn']}/1", "cv-user", SECRET)
    report = "\n".join(f"{name} {ours.get(name)} (tgt on a file: {outcome})"
                       for name, outcome in sorted(theirs.items()))
    (tmp_path / "conformance.txt").write_text(report)
    assert len(ours) == len(theirs) > 200, report
    worse = [name for name, outcome in theirs.items()
             if outcome == "passed" and ours.get(name) != "passed"]
    assert worse == [], report

"""The offline replica tools, run as an operator runs them: the installed ``appliance``
program in a subprocess, checked against real clients (qemu-img, qemu-io)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

APPLIANCE = str(Path(sys.executable).parent / "appliance")
MiB = 1 << 20


def run(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([APPLIANCE, *map(str, args)], capture_output=True, text=True,
                            timeout=120, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"appliance {args} failed ({result.returncode}): {result.stderr}")
    return result


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fill(path: Path, byte: int, length: int) -> Path:
    path.write_bytes(bytes([byte]) * length)
    return path


def directory_state(path: Path) -> dict[str, tuple[int, str]]:
    """Every file of a directory with its size and content hash: to prove nothing changed."""
    return {entry.name: (entry.stat().st_size, sha256(entry)) for entry in sorted(path.iterdir())}


@pytest.fixture
def replica(tmp_path: Path) -> Path:
    path = tmp_path / "replica"
    run("replica", "create", path, "--size", "16M")
    return path


def test_lifecycle_with_checksummed_data(tmp_path: Path, replica: Path) -> None:
    one = tmp_path / "one.img"
    one.write_bytes(os.urandom(3 * MiB + 123))
    run("replica", "import", replica, one, "--offset", "1M")
    run("replica", "snapshot", replica, "first", "--label", "purpose=test")
    run("replica", "import", replica, fill(tmp_path / "z.img", 0, MiB), "--offset", "2M")
    run("replica", "snapshot", replica, "second")
    run("replica", "expand", replica, "--size", "32M")
    run("replica", "import", replica, fill(tmp_path / "t.img", 7, MiB), "--offset", "16M")

    expected = bytearray(32 * MiB)
    expected[MiB: MiB + len(one.read_bytes())] = one.read_bytes()
    snapshot_first = bytes(expected[: 16 * MiB])
    expected[2 * MiB: 3 * MiB] = bytes(MiB)
    snapshot_second = bytes(expected[: 16 * MiB])
    expected[16 * MiB: 17 * MiB] = bytes([7]) * MiB

    run("replica", "export", replica, tmp_path / "head.img")
    run("replica", "export", replica, "--snapshot", "first", tmp_path / "first.img")
    run("replica", "export", replica, "--snapshot", "second", tmp_path / "second.img")
    assert sha256(tmp_path / "head.img") == hashlib.sha256(expected).hexdigest()
    assert sha256(tmp_path / "first.img") == hashlib.sha256(snapshot_first).hexdigest()
    assert sha256(tmp_path / "second.img") == hashlib.sha256(snapshot_second).hexdigest()
    streamed = subprocess.run([APPLIANCE, "replica", "export", str(replica), "-"],
                              capture_output=True, timeout=60, check=True).stdout
    assert streamed == bytes(expected)

    info = json.loads(run("replica", "inspect", replica, "-o", "json").stdout)
    assert info["format_version"] == 1 and info["size"] == 32 * MiB
    layers = {x["name"]: x for x in info["layers"]}
    assert layers["first"]["labels"] == {"purpose": "test"}
    assert layers["second"]["parent"] == "first" and layers[None]["parent"] == "second"
    assert layers["first"]["size"] == 16 * MiB and layers[None]["size"] == 32 * MiB
    assert info["revision"] > 0 and info["generation"] == 0

    run("replica", "revert", replica, "first")
    run("replica", "export", replica, "--force", tmp_path / "head.img")
    assert sha256(tmp_path / "head.img") == hashlib.sha256(
        snapshot_first + bytes(16 * MiB)).hexdigest()
    run("replica", "rm", replica, "first")
    run("replica", "purge", replica)
    run("replica", "export", replica, "--force", tmp_path / "after.img")
    assert sha256(tmp_path / "after.img") == sha256(tmp_path / "head.img")
    names = [x["name"] for x in json.loads(run("replica", "inspect", replica, "-o",
                                                "json").stdout)["layers"]]
    assert "second" in names  # a branch survives the purge of its parent
    report = json.loads(run("replica", "check", replica, "-o", "json").stdout)
    assert report["ok"] and report["verified_snapshots"] == ["second"]


def test_exports_match_a_qcow2_chain_built_by_qemu(tmp_path: Path, replica: Path) -> None:
    """An independent snapshot-chain implementation as the reference: the same writes
    applied with qemu-io to a qcow2 backing chain must read back identically."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    writes = [  # (offset, pattern byte, length)
        (0, 0xAB, 64 * 1024), (5 * MiB + 1000, 0x11, 300_000), (15 * MiB, 0x22, MiB)]
    overlay_writes = [(4096 + 100, 0xCD, 1000), (5 * MiB, 0x33, 8192), (3 * MiB, 0x00, 12288)]
    for offset, byte, length in writes:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {byte} {offset} {length}",
                        str(base)], check=True, capture_output=True)
        run("replica", "import", replica, fill(tmp_path / "w.img", byte, length),
            "--offset", str(offset))
    run("replica", "snapshot", replica, "base")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    str(top)], check=True)
    for offset, byte, length in overlay_writes:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {byte} {offset} {length}",
                        str(top)], check=True, capture_output=True)
        run("replica", "import", replica, fill(tmp_path / "w.img", byte, length),
            "--offset", str(offset))
    run("replica", "export", replica, "--snapshot", "base", tmp_path / "base.img")
    run("replica", "export", replica, tmp_path / "head.img")
    for ours, reference in (("base.img", base), ("head.img", top)):
        result = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2",
                                 str(tmp_path / ours), str(reference)],
                                capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
    # and the comparison can fail: one changed byte is found
    run("replica", "import", replica, fill(tmp_path / "w.img", 0x99, 1), "--offset", "7")
    run("replica", "export", replica, "--force", tmp_path / "head.img")
    result = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2",
                             str(tmp_path / "head.img"), str(top)], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 1 and "offset 0" in result.stdout


BAD_INPUTS = [
    (["create", "{dir}", "--size", "1000"], "multiple of 4096"),
    (["create", "{dir}", "--size", "0"], "must be positive"),
    (["create", "{dir}", "--size", "-5"], "size"),
    (["create", "{dir}", "--size", "10Q"], "unknown unit"),
    (["create", "{tmp}/x/y", "--size", "1M"], "parent directory"),
    (["revert", "{dir}", "nosuch"], "'nosuch' does not exist"),
    (["rm", "{dir}", "nosuch"], "'nosuch' does not exist"),
    (["export", "{dir}", "--snapshot", "nosuch", "{tmp}/o.img"], "'nosuch' does not exist"),
    (["expand", "{dir}", "--size", "8M"], "cannot shrink"),
    (["expand", "{dir}", "--size", "16M+1"], "invalid size"),
    (["expand", "{dir}", "--size", "17000000"], "multiple of 4096"),
    (["snapshot", "{dir}", "a/b"], "invalid snapshot name 'a/b'"),
    (["snapshot", "{dir}", ".."], "invalid snapshot name '..'"),
    (["snapshot", "{dir}", "--", "-lead"], "invalid snapshot name '-lead'"),
    (["snapshot", "{dir}", "x" * 300], "longer than 128 bytes"),
    (["snapshot", "{dir}", "a\tb"], "invalid snapshot name"),
    (["snapshot", "{dir}", "s1", "--label", "novalue"], "KEY=VALUE"),
    (["snapshot", "{dir}", "s1", "--label", "bad key=1"], "invalid label key"),
    (["snapshot", "{dir}", "existing"], "'existing' already exists"),
    (["inspect", "{tmp}/missing"], "does not exist"),
    (["inspect", "{tmp}"], "is not a replica"),
    (["check", "{tmp}/file.txt"], "is not a directory"),
    (["import", "{dir}", "{tmp}/missing.img"], "input"),
    (["import", "{dir}", "{tmp}/big.img"], "does not fit"),
    (["import", "{dir}", "{tmp}/file.txt", "--offset", "16M"], "does not fit"),
    (["export", "{dir}", "{tmp}/file.txt"], "exists"),
    (["purge", "{tmp}"], "is not a replica"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS,
                         ids=[" ".join(a)[:40] for a, _ in BAD_INPUTS])
def test_bad_input_is_a_one_line_usage_error_and_changes_nothing(
        tmp_path: Path, replica: Path, args: list[str], message: str) -> None:
    run("replica", "snapshot", replica, "existing")
    (tmp_path / "file.txt").write_text("x")
    with open(tmp_path / "big.img", "wb") as big:
        big.truncate(17 * MiB)
    before = directory_state(replica), sorted(os.listdir(tmp_path))
    result = run("replica", *[a.format(dir=replica, tmp=tmp_path) for a in args], check=False)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(("error:", "Error:")) and "Traceback" not in result.stderr
    assert (directory_state(replica), sorted(os.listdir(tmp_path))) == before


def test_check_reports_damage_with_exit_status_1(tmp_path: Path, replica: Path) -> None:
    data = tmp_path / "data.img"
    data.write_bytes(os.urandom(4 * MiB))
    run("replica", "import", replica, data)
    run("replica", "snapshot", replica, "s1")
    assert run("replica", "check", replica).returncode == 0
    layer = next(p for p in sorted(replica.glob("layer-*.img")))
    with open(layer, "r+b") as damaged:
        damaged.seek(3 * MiB + 5)
        damaged.write(b"\xff\x00\xff")
    result = run("replica", "check", replica, check=False)
    assert result.returncode == 1
    assert "DAMAGED" in result.stdout
    assert f"bytes {3 * MiB}-{4 * MiB - 1}" in result.stdout
    (replica / "replica.json").write_text("{ not json")
    result = run("replica", "check", replica, check=False)
    assert result.returncode == 1 and "not valid JSON" in result.stdout
    result = run("replica", "inspect", replica, check=False)
    assert result.returncode == 1 and "damaged data" in result.stderr


def test_a_replica_in_use_is_refused(replica: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom appliance.chain import Replica\n"
         "r = Replica.open(sys.argv[1])\nprint('ready', flush=True)\nsys.stdin.read()",
         str(replica)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        result = run("replica", "snapshot", replica, "s1", check=False)
        assert result.returncode == 1 and "in use by another process" in result.stderr
    finally:
        holder.communicate("", timeout=30)


def test_help_and_version() -> None:
    assert "Offline tools" in run("replica", "--help").stdout
    assert run("--version").stdout.startswith("appliance, version")
    assert run("replica", "frobnicate", check=False).returncode == 2

"""``appliance check`` run as an operator runs it, on this machine: what it finds here,
a data directory on a real tmpfs, an API port another program holds (and one the node
daemon itself holds), a cluster whose etcd is down (and one whose etcd answers), bad input."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.hostcheck.result import STATUSES
from tests.etcd import running_etcd
from tests.harness import Node, free_port, run


def free_range(count: int = 32) -> tuple[int, int]:
    """*count* consecutive ports that can be bound now (for a replica port range)."""
    first = 20000 + (os.getpid() * 37) % 20000
    while True:
        candidates = range(first, first + count)
        if all(bindable(port) for port in candidates):
            return candidates[0], candidates[-1]
        first += count


def bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def write_config(path: Path, **values: Any) -> Path:
    """A node.toml with *values* (strings, numbers, lists of ports)."""
    values.setdefault("port_range", list(free_range()))
    lines = [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def check(*args: str | Path) -> tuple[int, dict[str, dict[str, str]], dict[str, Any]]:
    """``appliance check ARGS -o json``: exit status, the items by name, the document."""
    result = run("check", *args, "-o", "json", check=False, timeout=120)
    assert result.returncode in (0, 1), result.stderr
    document = json.loads(result.stdout)
    return result.returncode, {item["name"]: item for item in document["checks"]}, document


def module_available(name: str) -> bool:
    """Whether this kernel has module *name* loaded, or files to load it from."""
    if Path(f"/sys/module/{name}").exists():
        return True
    modules = Path("/lib/modules") / os.uname().release
    return modules.is_dir() and any(modules.rglob(f"{name}.ko*"))


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "node.toml", listen=f"127.0.0.1:{free_port()}")


def test_this_machine_can_run_a_node_with_warnings(tmp_path: Path, config: Path) -> None:
    data = tmp_path / "data"
    status, items, document = check("--config", config, "--data-dir", data)
    failures = {name: item for name, item in items.items() if item["status"] == "fail"}
    assert status == 0 and document["ok"] is True and not failures, failures
    for item in items.values():
        assert item["status"] in STATUSES and item["detail"], item
        assert item["remedy"] or item["status"] == "ok", item
    for name in ("kernel/fuse", "kernel/loop", "packages/required", "python/nbdkit",
                 "python/engine-plugin", f"disk/filesystem {data}", f"disk/space {data}",
                 f"disk/sparse-files {data}", "ports/api", "ports/replicas"):
        assert items[name]["status"] == "ok", items[name]
    nbd, nfs = items["kernel/nbd"], items["kernel/nfs"]
    if not module_available("nbd"):  # this machine: no nbd, no /lib/modules
        assert nbd["status"] == "warn", nbd
        assert "nbdfuse" in nbd["detail"] and "slower" in nbd["detail"], nbd
    if not module_available("nfs"):
        assert nfs["status"] == "warn", nfs
        assert "nfs://" in nfs["detail"] and "RWX" in nfs["detail"], nfs
    assert items["clock"]["status"] in STATUSES and items["multipath"]["status"] in STATUSES
    assert f"{data} (data directory, not there yet: its parent {tmp_path} checked)" in \
        items[f"disk/space {data}"]["detail"]
    assert not data.exists(), "the check created the data directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.toml"], "a probe file is left"
    assert not any(name.startswith("cluster") for name in items)  # no cluster configured


def test_the_table_has_a_row_per_item_the_remedies_and_a_summary(tmp_path: Path,
                                                                  config: Path) -> None:
    result = run("check", "--config", config, "--data-dir", tmp_path, check=False)
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.fullmatch(r"CHECK +STATUS +DETAIL", lines[0]), lines[0]
    rows = [line for line in lines[1:-1] if not line[0].isspace()]
    _, items, _ = check("--config", config, "--data-dir", tmp_path)
    assert len(rows) == len(items)
    for row, (name, item) in zip(rows, items.items(), strict=True):
        assert row.startswith(name + " ") and row[len(name):].split()[0] == item["status"], row
    counts = [sum(i["status"] == s for i in items.values()) for s in STATUSES]
    assert re.fullmatch(rf"{counts[0]} ok, {counts[1]} warnings?, 0 failures", lines[-1])
    fixes = [line.strip() for line in lines if line.strip().startswith("fix: ")]
    assert len(fixes) == counts[1]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_data_directory_on_tmpfs_fails(tmpfs: Path, config: Path) -> None:
    data = tmpfs / "data"
    status, items, document = check("--config", config, "--data-dir", data)
    assert status == 1 and document["ok"] is False
    item = items[f"disk/filesystem {data}"]
    assert item["status"] == "fail", item
    assert "on tmpfs" in item["detail"] and "lost at reboot" in item["detail"], item
    assert "local ext4 or xfs" in item["remedy"] and "--data-dir" in item["remedy"], item
    assert items[f"disk/space {data}"]["status"] == "fail"  # 64 MiB
    assert list(tmpfs.iterdir()) == []


def test_an_api_port_another_program_holds_fails_naming_it(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        config = write_config(tmp_path / "node.toml", listen=f"127.0.0.1:{port}")
        status, items, _ = check("--config", config, "--data-dir", tmp_path)
    item = items["ports/api"]
    assert status == 1 and item["status"] == "fail", item
    assert f"port {port} is taken by process {os.getpid()} (" in item["detail"], item
    assert "listen" in item["remedy"], item


def test_replica_ports_other_programs_hold_are_counted(tmp_path: Path) -> None:
    first, last = free_range(20)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", first + 3))
        listener.listen()
        config = write_config(tmp_path / "node.toml", listen=f"127.0.0.1:{free_port()}",
                              port_range=[first, last])
        status, items, _ = check("--config", config, "--data-dir", tmp_path)
    item = items["ports/replicas"]
    assert item["status"] == "warn", item  # 19 free: enough, but one taken
    assert f"{first + 3} (process {os.getpid()} (" in item["detail"], item
    assert "19 of 20 free" in item["detail"], item
    narrow = write_config(tmp_path / "narrow.toml", listen=f"127.0.0.1:{free_port()}",
                          port_range=[first, first + 7])
    status, items, _ = check("--config", narrow, "--data-dir", tmp_path)
    assert status == 1 and items["ports/replicas"]["status"] == "fail", items["ports/replicas"]


def test_the_api_port_of_the_running_node_daemon_is_ok(tmp_path: Path) -> None:
    node = Node(tmp_path)
    node.start()
    try:
        config = write_config(tmp_path / "node.toml", listen=f"127.0.0.1:{node.port}")
        _, items, _ = check("--config", config, "--data-dir", node.data)
    finally:
        node.cleanup()
    item = items["ports/api"]
    assert item["status"] == "ok", item
    assert f"held by the node daemon itself (process {node.process.pid if node.process else 0})" \
        in item["detail"], item


def test_a_cluster_whose_etcd_is_down_fails(tmp_path: Path) -> None:
    closed = free_port()
    config = write_config(tmp_path / "node.toml", listen=f"127.0.0.1:{free_port()}",
                          cluster=f"etcd://127.0.0.1:{closed}", node_name="n1")
    status, items, _ = check("--config", config, "--data-dir", tmp_path)
    item = items[f"cluster/etcd http://127.0.0.1:{closed}"]
    assert status == 1 and item["status"] == "fail", item
    assert f"cannot connect to 127.0.0.1:{closed}" in item["detail"], item
    assert "etcd://HOST:PORT" in item["remedy"], item
    key = items["cluster/key"]
    assert key["status"] == "warn" and "does not exist" in key["detail"], key


def test_a_cluster_whose_etcd_answers_and_its_key(tmp_path: Path) -> None:
    key = tmp_path / "cluster.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o644)
    with running_etcd(tmp_path) as url:
        config = write_config(tmp_path / "node.toml", listen=f"127.0.0.1:{free_port()}",
                              cluster=url.replace("http://", "etcd://"), node_name="n1",
                              cluster_key_file=str(key))
        status, items, _ = check("--config", config, "--data-dir", tmp_path)
        assert items[f"cluster/etcd {url}"]["status"] == "ok", items[f"cluster/etcd {url}"]
        assert status == 1 and items["cluster/key"]["status"] == "fail"
        assert "chmod 600" in items["cluster/key"]["remedy"], items["cluster/key"]
        key.chmod(stat.S_IRUSR | stat.S_IWUSR)
        status, items, _ = check("--config", config, "--data-dir", tmp_path)
    assert status == 0 and items["cluster/key"]["status"] == "ok", items["cluster/key"]


def test_a_config_without_listen_is_checked_with_the_default_address(tmp_path: Path) -> None:
    config = write_config(tmp_path / "node.toml", data_dir=str(tmp_path / "data"))
    _, items, _ = check("--config", config)
    assert items["config"]["status"] == "warn", items["config"]
    assert "127.0.0.1:9500" in items["config"]["detail"]
    assert f"disk/space {tmp_path / 'data'}" in items  # the file's data_dir


def test_bad_input_exits_2(tmp_path: Path, config: Path) -> None:
    missing = tmp_path / "nowhere"
    result = run("check", "--config", config, "--disk", missing, check=False)
    assert result.returncode == 2 and not result.stdout
    assert "--disk" in result.stderr and f"'{missing}' does not exist" in result.stderr
    result = run("check", "--config", config, "-o", "yaml", check=False)
    assert result.returncode == 2 and "'yaml' is not one of" in result.stderr
    result = run("check", "--config", missing, check=False)
    assert result.returncode == 2 and f"config file {missing} does not exist" in result.stderr
    bad = write_config(tmp_path / "bad.toml", listen="127.0.0.1:9500", colour="blue")
    result = run("check", "--config", bad, check=False)
    assert result.returncode == 2 and "unknown key 'colour'" in result.stderr


def test_the_iscsi_portal_taken_by_another_program_is_a_warning(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        config = write_config(tmp_path / "node.toml", listen=f"127.0.0.1:{free_port()}",
                              iscsi_portal=f"127.0.0.1:{port}")
        _, items, _ = check("--config", config, "--data-dir", tmp_path)
    item = items["ports/iscsi"]
    assert item["status"] == "warn", item  # only volumes exported over iSCSI need it
    assert f"127.0.0.1:{port} is taken by process {os.getpid()} (" in item["detail"], item
    assert "tgt" in item["remedy"] and "iscsi_portal" in item["remedy"], item
    free = write_config(tmp_path / "free.toml", listen=f"127.0.0.1:{free_port()}",
                        iscsi_portal=f"127.0.0.1:{free_port()}")
    _, items, _ = check("--config", free, "--data-dir", tmp_path)
    assert items["ports/iscsi"]["status"] == "ok", items["ports/iscsi"]

"""The host checks one by one, on real files, sockets and filesystems of this machine (and
on small made-up /proc and /lib/modules trees where this machine has only one answer)."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import ports
from appliance.hostcheck import disks, kernel, multipath, processes
from appliance.hostcheck.interpreter import version_problem
from appliance.hostcheck.result import Result, Settings, load_settings, ok
from appliance.hostcheck.runner import run_checks
from tests.harness import wait_for


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    config = tmp_path / "node.toml"
    config.write_text('listen = "127.0.0.1:9599"\n')
    return load_settings(config, tmp_path / "data")


def test_a_check_that_crashes_is_a_failure_naming_the_error(settings: Settings) -> None:
    def broken(_: Settings) -> list[Result]:
        raise ValueError("no such thing")

    def fine(_: Settings) -> list[Result]:
        return [ok("fine", "all good")]

    results = run_checks(settings, (("first", fine), ("broken", broken), ("last", fine)))
    assert [(r.name, r.status) for r in results] == \
        [("fine", "ok"), ("broken", "fail"), ("fine", "ok")]
    assert "broken failed: ValueError: no such thing" in results[1].detail


def test_settings_read_the_file_and_the_default_address(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'data_dir = "{tmp_path}"\nport_range = [12000, 12099]\n')
    settings = load_settings(config, None, [tmp_path])
    assert settings.config.listen == ("127.0.0.1", 9500) and not settings.listen_configured
    assert settings.config.data_dir == tmp_path and settings.disks == (tmp_path,)
    assert settings.config.port_range == (12000, 12099)
    assert load_settings(None, tmp_path).config.listen == ("127.0.0.1", 9500)


# -- kernel ---------------------------------------------------------------------------------


def test_a_device_that_is_missing_or_cannot_be_opened(tmp_path: Path) -> None:
    assert kernel.device_problem(Path("/dev/null")) is None
    assert kernel.device_problem(tmp_path / "fuse") == f"{tmp_path / 'fuse'} does not exist"
    (tmp_path / "dir").mkdir()
    assert "cannot be opened: Is a directory" in str(kernel.device_problem(tmp_path / "dir"))
    lost = kernel.device_result("kernel/fuse", "/dev/fuse does not exist", "FUSE", "fix",
                                nbd_usable=False)
    assert lost.status == "fail" and "cannot attach" in lost.detail
    fallback = kernel.device_result("kernel/fuse", "/dev/fuse does not exist", "FUSE", "fix",
                                    nbd_usable=True)
    assert fallback.status == "warn" and "/dev/nbdX" in fallback.detail


def test_module_states_from_sys_and_lib_modules(tmp_path: Path) -> None:
    sys_module, lib = tmp_path / "sys", tmp_path / "lib"
    (sys_module / "loop").mkdir(parents=True)
    release = lib / "6.1.0-test"
    release.mkdir(parents=True)
    (release / "modules.dep").write_text(
        "kernel/drivers/block/nbd.ko.xz:\nkernel/drivers/scsi/iscsi_tcp.ko: kernel/x.ko\n")
    (release / "modules.builtin").write_text("kernel/fs/fuse/fuse.ko\n")

    def state(name: str, version: str = "6.1.0-test") -> tuple[bool, str]:
        return kernel.module_state(name, version, sys_module, lib)

    assert state("loop") == (True, "loaded")
    assert state("nbd") == (True, "loadable")
    assert state("iscsi_tcp") == (True, "loadable")
    assert state("fuse") == (True, "built in")
    assert state("nfs") == (False, f"not loaded, and not among the modules of {release}")
    assert state("nbd", "7.0") == (
        False, f"not loaded; {lib / '7.0'} does not exist, so no module can be loaded")


# -- disks ----------------------------------------------------------------------------------


def mount_of(path: Path, table: Path = disks.MOUNTINFO) -> disks.Mount:
    found = disks.mount_of(path, table)
    assert found is not None
    return found


def test_the_mount_of_a_path_is_the_longest_mount_point_above_it(tmp_path: Path) -> None:
    table = tmp_path / "mountinfo"
    table.write_text(
        "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
        "40 27 0:40 / /srv/my\\040data rw,nosuid - xfs /dev/vdb1 rw\n"
        "41 40 0:41 / /srv/my\\040data/ram rw - tmpfs tmpfs rw\n"
        "42 27 0:42 / /srv/my ro - squashfs /dev/loop3 ro\n")
    assert mount_of(Path("/srv/my data/x/y"), table) == \
        disks.Mount("/srv/my data", "xfs", "/dev/vdb1", ("rw", "nosuid"))
    assert mount_of(Path("/srv/my data/ram"), table).fstype == "tmpfs"
    assert mount_of(Path("/srv/mydata"), table).point == "/"
    assert mount_of(Path("/srv/my"), table).read_only


def test_filesystems_replicas_must_not_be_on() -> None:
    for fstype in ("tmpfs", "overlay", "fuse.sshfs", "nfs4", "vfat", "squashfs"):
        result = disks.filesystem_result("f", "D", disks.Mount("/d", fstype, "x", ("rw",)), "r")
        assert result.status == "fail" and f"on {fstype}" in result.detail, result
    assert disks.filesystem_result("f", "D", disks.Mount("/d", "ext4", "x", ("rw",)),
                                   "r").status == "ok"
    assert disks.filesystem_result("f", "D", disks.Mount("/d", "btrfs", "x", ("rw",)),
                                   "r").status == "warn"
    read_only = disks.filesystem_result("f", "D", disks.Mount("/d", "xfs", "x", ("ro",)), "r")
    assert read_only.status == "fail" and "read-only" in read_only.detail


def test_free_space_thresholds() -> None:
    assert disks.space_result("s", "D", 20 * disks.GiB).status == "ok"
    assert disks.space_result("s", "D", 5 * disks.GiB).status == "warn"
    low = disks.space_result("s", "D", 512 << 20)
    assert low.status == "fail" and "512 MiB free" in low.detail


def test_the_sparse_file_probe_on_this_disk(tmp_path: Path) -> None:
    assert disks.probe_sparse(tmp_path) == ("", "")
    assert list(tmp_path.iterdir()) == []
    result = disks.sparse_result("p", "D", tmp_path, "r")
    assert result.status == "ok" and "FIEMAP" in result.detail


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(tmp_path)],
                   check=True)
    try:
        yield tmp_path
    finally:
        subprocess.run(["umount", str(tmp_path)], check=True)


def test_the_sparse_file_probe_on_tmpfs_finds_holes_but_no_fiemap(tmpfs: Path) -> None:
    problem, note = disks.probe_sparse(tmpfs)
    assert problem == "" and "FIEMAP" in note
    assert mount_of(tmpfs).fstype == "tmpfs"
    results = disks.check_location(tmpfs / "data", "data directory", "move it")
    assert [r.status for r in results] == ["fail", "fail", "warn"]


def test_the_nearest_existing_parent(tmp_path: Path) -> None:
    assert disks.existing_ancestor(tmp_path / "a" / "b") == tmp_path
    assert disks.existing_ancestor(tmp_path) == tmp_path


# -- nbdkit's interpreter, processes, multipath ---------------------------------------------


def test_the_interpreter_versions_must_match() -> None:
    assert version_problem("3.11.1", (3, 11)) == ""
    assert "embeds Python 3.11, the appliance is installed for 3.12" in \
        version_problem("3.11.1", (3, 12))
    assert "python_version=''" in version_problem("", (3, 11))


def test_listeners_and_roles_of_processes() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert ports.listeners([port, 1]) == {port: {os.getpid()}}
        assert ports.holder(port) == ports.describe(os.getpid())
    assert ports.listeners([port]) == {}
    assert processes.appliance_role(os.getpid()) is None
    assert ports.describe(os.getpid()).startswith(f"process {os.getpid()} (")


@pytest.mark.parametrize(("argv", "role"), [
    (["/opt/appliance/.venv/bin/appliance", "serve", "--config", "x"], "the node daemon"),
    (["-m", "appliance", "replica", "serve", "/d"], "a replica server"),
    (["-U", "s", "python", "/opt/appliance/nbd/plugin.py", "volume=v"], "an engine"),
    (["appliance", "volume", "list"], None),
    (["serve", "appliance"], None),
])
def test_the_appliance_s_processes_are_told_by_their_command_line(argv: list[str],
                                                                   role: str | None) -> None:
    # bash -c 'CMD' ARGV0 ARGS...: a real process whose command line ends with ARGV
    process = subprocess.Popen(["bash", "-c", "sleep 30; true", *argv], start_new_session=True)
    try:
        wait_for(lambda: processes.command_line(process.pid)[:1] == ["bash"], 10, "bash")
        assert processes.command_line(process.pid)[3:] == argv
        assert processes.appliance_role(process.pid) == role
    finally:
        process.kill()
        process.wait()


MULTIPATH_COVERED = """
defaults { user_friendly_names yes }
blacklist {
    devnode "^(nbd|loop)[0-9]+"   # the appliance's devices
    wwid "3600.*"
}
"""
MULTIPATH_PARTIAL = """
blacklist_exceptions { devnode "^nbd[0-9]+" }
blacklist {
    device { vendor "X" }
    devnode "^loop[0-9]+"
}
# blacklist { devnode "^nbd" }
"""


def test_the_multipath_blacklist_must_cover_nbd_and_loop() -> None:
    assert multipath.uncovered(MULTIPATH_COVERED) == []
    assert multipath.blacklist_patterns(MULTIPATH_PARTIAL) == ["^loop[0-9]+"]
    assert multipath.uncovered(MULTIPATH_PARTIAL) == ["nbd0"]
    assert multipath.uncovered("defaults {}\n") == ["nbd0", "loop0"]
    assert multipath.uncovered(f"blacklist {{ {multipath.STANZA.split('{')[1]}\n") == []

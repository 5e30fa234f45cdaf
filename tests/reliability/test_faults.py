"""RELIABILITY.md rows 1-7 and 9-11: faults injected into real processes under a real
fio workload, then proof that every replica in service holds the same bytes and that every
write fio saw acknowledged is there.

fio's verify state (``--verify_state_save``) records how many writes completed; a later
``--verify_only --verify_state_load`` run checks exactly those, which is how "no
acknowledged write was lost" is shown after a crash.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults import DelayProxy, FaultyDisk, small_disk
from tests.harness import VERIFY, MiB, Volume, fio, fio_errors, nbdsh, run, wait_for
from tests.netns import hosts

TIMEOUT = "2"  # the engine's replica timeout in these tests (seconds)


@pytest.fixture
def volumes() -> Iterator[list[Volume]]:
    created: list[Volume] = []
    yield created
    for volume in created:
        volume.cleanup()


def start(volumes: list[Volume], volume: Volume, *extra: str) -> Volume:
    volumes.append(volume)
    volume.serve_all()
    volume.start_engine("--timeout", TIMEOUT, *extra)
    return volume


def background_fio(volume: Volume, cwd: Path, seconds: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["fio", "--ioengine=nbd", f"--uri={volume.uri}", "--output-format=json", *VERIFY,
         "--size=96M", "--time_based", f"--runtime={seconds}", *extra],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


Completed = subprocess.CompletedProcess[str]


def finish(process: subprocess.Popen[str], timeout: float = 120) -> Completed:
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def verify_acknowledged(volume: Volume, cwd: Path) -> Completed:
    """Re-read every write the earlier (interrupted) workload saw acknowledged."""
    return subprocess.run(
        ["fio", "--ioengine=nbd", f"--uri={volume.uri}", "--output-format=json", *VERIFY,
         "--size=96M", "--time_based", "--runtime=1", "--verify_state_load=1",
         "--verify_only"], cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


def salvage_and_verify(volume: Volume, cwd: Path) -> None:
    """Restart the faulted volume with --salvage; every write the workload saw acknowledged
    must be there, and the replicas must end up identical."""
    volume.stop_engine()
    volume.start_engine("--timeout", TIMEOUT, "--salvage")
    check = verify_acknowledged(volume, cwd)
    assert check.returncode == 0 and fio_errors(check) == 0, check.stderr[-3000:]
    volume.wait_healthy()
    stop_all(volume)
    volume.replicas_identical()


def stop_all(volume: Volume) -> None:
    volume.stop_engine()
    for index in range(len(volume.directories)):
        volume.stop_server(index)


def rebuild(volume: Volume, index: int) -> None:
    volume.serve(index)
    run("engine", "add-replica", "--control", volume.control, volume.address(index))
    volume.wait_healthy()


# -- row 1: a replica process crashes ------------------------------------------------------


def test_row1_replica_crash(tmp_path: Path, volumes: list[Volume],
                            caplog: pytest.LogCaptureFixture) -> None:
    volume = start(volumes, Volume(tmp_path, 3))
    workload = background_fio(volume, tmp_path, 8)
    time.sleep(2)  # the workload is under way
    volume.crash_server(1)
    result = finish(workload)
    assert result.returncode == 0 and fio_errors(result) == 0, result.stderr
    assert volume.modes() == ["RW", "ERR", "RW"]
    rebuild(volume, 1)
    stop_all(volume)
    volume.replicas_identical()


# -- row 2: a replica hangs ------------------------------------------------------------------


def test_row2_hung_replica_is_dropped_and_never_silently_rejoins(tmp_path: Path,
                                                                 volumes: list[Volume]) -> None:
    volume = start(volumes, Volume(tmp_path, 3))
    workload = background_fio(volume, tmp_path, 8)
    time.sleep(1.5)
    volume.signal_server(2, signal.SIGSTOP)
    volume.wait_mode(2, "ERR", timeout=30)
    time.sleep(1)
    volume.signal_server(2, signal.SIGCONT)
    result = finish(workload)
    assert result.returncode == 0 and fio_errors(result) == 0, result.stderr
    # back, but not in service: only a rebuild brings it back
    assert volume.modes() == ["RW", "RW", "ERR"]
    run("engine", "add-replica", "--control", volume.control, volume.address(2))
    volume.wait_healthy()
    stop_all(volume)
    volume.replicas_identical()


# -- row 3: partition between the engine and one replica ------------------------------------


def test_row3_short_partition_is_ridden_out(tmp_path: Path, volumes: list[Volume]) -> None:
    with hosts(3) as nodes:
        volume = start(volumes, Volume(tmp_path, 3, hosts=[n.address for n in nodes],
                                       namespaces=[n.name for n in nodes]))
        workload = background_fio(volume, tmp_path, 5)
        time.sleep(1)
        nodes[1].partition()
        time.sleep(0.5)  # shorter than the replica timeout: TCP retransmits cover it
        nodes[1].heal()
        result = finish(workload)
        assert result.returncode == 0 and fio_errors(result) == 0, result.stderr
        assert volume.modes() == ["RW", "RW", "RW"]
        stop_all(volume)
        volume.replicas_identical()


def test_row3_long_partition_then_rebuild_copies_only_what_differs(
        tmp_path: Path, volumes: list[Volume], caplog: pytest.LogCaptureFixture) -> None:
    with hosts(3) as nodes:
        volume = start(volumes, Volume(tmp_path, 3, hosts=[n.address for n in nodes],
                                       namespaces=[n.name for n in nodes]))
        subprocess.run(["nbdcopy", "--", "[", "nbdkit", "random", "size=64M", "]",
                        volume.uri], check=True)
        result = fio(volume.uri, *VERIFY, "--size=96M", "--time_based", "--runtime=2")
        assert result.returncode == 0 and fio_errors(result) == 0, result.stderr
        nodes[1].partition()
        offsets = [index * 7 * MiB + 4096 for index in range(10)]  # ten different chunks
        nbdsh(volume.uri, "; ".join(f"h.pwrite(b'p' * 4096, {o})" for o in offsets))
        volume.wait_mode(1, "ERR", timeout=30)
        nodes[1].heal()
        run("engine", "add-replica", "--control", volume.control, volume.address(1))
        volume.wait_healthy()
        copied = volume.status()["replicas"][1]["rebuild"]["copied_bytes"]
        assert 0 < copied <= len(offsets) * MiB, copied  # a chunk per write, not 96 MiB
        stop_all(volume)
        volume.replicas_identical()
    caplog.clear()


# -- row 4: partition of every replica -----------------------------------------------------


def test_row4_partition_all_then_salvage(tmp_path: Path, volumes: list[Volume],
                                         caplog: pytest.LogCaptureFixture) -> None:
    with hosts(3) as nodes:
        volume = start(volumes, Volume(tmp_path, 3, hosts=[n.address for n in nodes],
                                       namespaces=[n.name for n in nodes]))
        workload = background_fio(volume, tmp_path, 30, "--verify_state_save=1")
        time.sleep(2)
        for node in nodes:
            node.partition()
        result = finish(workload)
        assert fio_errors(result) > 0  # the client saw I/O errors: nothing false acknowledged
        wait_for(lambda: volume.status()["state"] == "faulted", 30, "the volume to fault")
        for node in nodes:
            node.heal()
        salvage_and_verify(volume, tmp_path)


# -- row 5: a slow replica -------------------------------------------------------------------


def test_row5_slow_replica_causes_no_errors_and_no_rebuild(tmp_path: Path,
                                                           volumes: list[Volume]) -> None:
    volume = Volume(tmp_path, 3)
    volumes.append(volume)
    volume.serve_all()
    proxy = DelayProxy(("127.0.0.1", volume.ports[1]), delay=0.02)
    try:
        replicas = [item for address in (volume.address(0), f"127.0.0.1:{proxy.address[1]}",
                                          volume.address(2))
                    for item in ("--replica", address)]
        run("engine", "start", "vol", *replicas, "--secret-file", volume.secret, "--socket",
            volume.socket, "--control", volume.control, "--timeout", TIMEOUT)
        volume.engine_pid = int(Path(str(volume.socket) + ".pid").read_text())
        result = fio(volume.uri, *VERIFY, "--size=32M", "--time_based", "--runtime=5")
        assert result.returncode == 0 and fio_errors(result) == 0, result.stderr
        status = volume.status()
        assert [r["mode"] for r in status["replicas"]] == ["RW", "RW", "RW"]
        assert all("rebuild" not in r for r in status["replicas"])
        volume.stop_engine()
    finally:
        proxy.close()
    for index in range(3):
        volume.stop_server(index)
    volume.replicas_identical()


# -- row 6: a replica's disk fills up --------------------------------------------------------


def test_row6_one_replica_disk_full(tmp_path: Path, volumes: list[Volume],
                                    caplog: pytest.LogCaptureFixture) -> None:
    with small_disk(tmp_path, "small", 40) as small:
        directories = [tmp_path / "r0", small / "r1", tmp_path / "r2"]
        volume = start(volumes, Volume(tmp_path, 3, directories=directories))
        try:
            result = fio(volume.uri, *VERIFY, "--size=96M", "--io_size=128M")
            assert result.returncode == 0 and fio_errors(result) == 0, result.stderr
            assert volume.modes() == ["RW", "ERR", "RW"]
            assert "no space" in volume.status()["replicas"][1]["reason"]
            stop_all(volume)
            volume.replicas_identical([0, 2])
        finally:
            volume.cleanup()


FILL = """
written = 0
try:
    for offset in range(32 << 20, 256 << 20, 1 << 20):
        h.pwrite(bytes([7]) * (1 << 20), offset)
        written += 1
except nbd.Error as error:
    print("stopped after", written, "MiB:", error.string)
"""


def test_row6_every_disk_full(tmp_path: Path, volumes: list[Volume]) -> None:
    with small_disk(tmp_path, "d0", 40) as d0, small_disk(tmp_path, "d1", 40) as d1:
        volume = start(volumes, Volume(tmp_path, 2, directories=[d0 / "r", d1 / "r"]))
        try:
            data = tmp_path / "data.img"
            data.write_bytes(os.urandom(16 * MiB))
            subprocess.run(["nbdcopy", str(data), volume.uri], check=True)
            filled = subprocess.run(["/usr/bin/python3", "-m", "nbd", "-u", volume.uri, "-c",
                                     FILL], capture_output=True, text=True, check=True)
            assert "No space left" in filled.stdout  # the client sees ENOSPC
            assert volume.modes() == ["RW", "RW"]  # full, not failed
            back = tmp_path / "back.img"
            subprocess.run(["nbdcopy", volume.uri, str(back)], check=True)  # reads work
            assert back.read_bytes()[: 16 * MiB] == data.read_bytes()
            nbdsh(volume.uri, "h.trim(224 << 20, 32 << 20); h.flush()")  # free the space
            nbdsh(volume.uri, "h.pwrite(b'again' * 1000, 40 << 20); h.flush()")  # writes resume
            stop_all(volume)
            volume.replicas_identical()
        finally:
            volume.cleanup()


# -- row 7: a replica's disk returns I/O errors ----------------------------------------------


def test_row7_replica_io_errors(tmp_path: Path, volumes: list[Volume],
                                caplog: pytest.LogCaptureFixture) -> None:
    disk = FaultyDisk(tmp_path, 512)
    volume = Volume(tmp_path, 3, directories=[disk.mount / "r0", tmp_path / "r1",
                                              tmp_path / "r2"])
    try:
        start(volumes, volume)
        data = tmp_path / "data.img"
        data.write_bytes(os.urandom(32 * MiB))
        subprocess.run(["nbdcopy", str(data), volume.uri], check=True)
        nbdsh(volume.uri, "h.flush()")
        disk.fail()  # replica 0 (the one reads go to first) starts failing every I/O
        back = tmp_path / "back.img"
        subprocess.run(["nbdcopy", volume.uri, str(back)], check=True)  # no client error
        assert back.read_bytes()[: 32 * MiB] == data.read_bytes()
        result = fio(volume.uri, *VERIFY, "--size=32M", "--offset=64M")
        assert result.returncode == 0 and fio_errors(result) == 0, result.stderr
        assert volume.modes()[0] == "ERR" and volume.modes()[1:] == ["RW", "RW"]
        disk.heal()
        stop_all(volume)
        volume.replicas_identical([1, 2])
    finally:
        disk.heal()
        volume.cleanup()
        disk.close()


# -- row 9: the engine crashes in the middle of writes --------------------------------------


def test_row9_engine_crash_loses_no_acknowledged_write(tmp_path: Path,
                                                       volumes: list[Volume]) -> None:
    volume = start(volumes, Volume(tmp_path, 3))
    workload = background_fio(volume, tmp_path, 30, "--verify_state_save=1")
    time.sleep(3)
    volume.crash_engine()
    finish(workload)  # fio stops with errors: its engine died
    volume.start_engine("--timeout", TIMEOUT)
    check = verify_acknowledged(volume, tmp_path)
    assert check.returncode == 0 and fio_errors(check) == 0, check.stderr[-3000:]
    volume.wait_healthy()  # the others were resynchronized from the trusted one
    stop_all(volume)
    volume.replicas_identical()


def test_row9_engine_crash_under_a_filesystem(tmp_path: Path, volumes: list[Volume],
                                              caplog: pytest.LogCaptureFixture) -> None:
    volume = start(volumes, Volume(tmp_path, 2, "256M"))
    device = run("engine", "attach", "--control", volume.control).stdout.strip()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    subprocess.run(["mkfs.ext4", "-q", device], check=True)
    subprocess.run(["mount", device, str(mountpoint)], check=True)
    kept = os.urandom(3 * MiB)
    (mountpoint / "kept").write_bytes(kept)
    subprocess.run(["sync"], check=True)
    writer = subprocess.Popen(["dd", "if=/dev/urandom", f"of={mountpoint / 'busy'}",
                               "bs=1M", "count=100"], stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    volume.crash_engine()
    writer.wait(timeout=120)
    subprocess.run(["umount", "-l", str(mountpoint)], check=False)
    run("engine", "detach", "--control", volume.control)
    volume.start_engine("--timeout", TIMEOUT)
    device = run("engine", "attach", "--control", volume.control).stdout.strip()
    subprocess.run(["mount", device, str(mountpoint)], check=True)  # replays the journal
    assert (mountpoint / "kept").read_bytes() == kept
    subprocess.run(["umount", str(mountpoint)], check=True)
    fsck = subprocess.run(["fsck.ext4", "-n", "-f", device], capture_output=True, text=True,
                          check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    run("engine", "detach", "--control", volume.control)
    volume.wait_healthy()
    stop_all(volume)
    volume.replicas_identical()
    caplog.clear()


# -- row 10: every replica crashes -----------------------------------------------------------


def test_row10_all_replicas_crash_then_salvage(tmp_path: Path, volumes: list[Volume]) -> None:
    volume = start(volumes, Volume(tmp_path, 3))
    workload = background_fio(volume, tmp_path, 30, "--verify_state_save=1")
    time.sleep(3)
    for index in range(3):
        volume.crash_server(index)
    result = finish(workload)
    assert fio_errors(result) > 0
    wait_for(lambda: volume.status()["state"] == "faulted", 30, "the volume to fault")
    volume.serve_all()
    salvage_and_verify(volume, tmp_path)


# -- row 11: crashes during a rebuild ----------------------------------------------------------


def test_row11_crash_during_rebuild(tmp_path: Path, volumes: list[Volume],
                                    caplog: pytest.LogCaptureFixture) -> None:
    volume = start(volumes, Volume(tmp_path, 3), "--rebuild-bandwidth", str(16 * MiB))
    subprocess.run(["nbdcopy", "--", "[", "nbdkit", "random", "size=80M", "]", volume.uri],
                   check=True)
    volume.crash_server(2)
    nbdsh(volume.uri, "h.pwrite(b'x' * 4096, 0)")
    volume.wait_mode(2, "ERR")

    def replace_and_add() -> None:
        """A new, empty replica on the same address (a replaced disk): all 80 MiB travel."""
        shutil.rmtree(volume.directories[2])
        run("replica", "create", volume.directories[2], "--size", volume.size)
        volume.serve(2)
        run("engine", "add-replica", "--control", volume.control, volume.address(2))
        wait_for(lambda: (volume.status()["replicas"][2].get("rebuild") or {})
                 .get("copied_bytes", 0) > 0, 30, "the copy to start")

    # the rebuilding replica dies: it must never have been RW
    replace_and_add()
    volume.crash_server(2)
    seen = set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "ERR" not in seen:
        seen.add(volume.modes()[2])
    assert "RW" not in seen and volume.modes()[2] == "ERR"
    # again, and now its source dies: the rebuild starts over from the other replica
    replace_and_add()
    source = volume.status()["replicas"][2]["rebuild"]["source"]
    index = [volume.address(i) for i in range(3)].index(source)
    assert volume.modes()[2] == "WO"
    volume.crash_server(index)
    volume.wait_mode(2, "RW", timeout=120)
    assert sorted(volume.modes()) == ["ERR", "RW", "RW"]
    survivors = [i for i in range(3) if i != index]
    stop_all(volume)
    volume.replicas_identical(survivors)
    caplog.clear()

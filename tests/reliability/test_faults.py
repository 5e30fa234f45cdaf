"""RELIABILITY.md rows 1-7 and 9-11: faults injected into real processes under a real
workload, then proof that every replica in service holds the same bytes and that no
acknowledged write was lost.

Two clients write at once: fio (the real client, verifying what it reads back as it goes)
and the acknowledgement oracle (tests/oracle.py), which records exactly which of its writes
were acknowledged and judges the volume afterwards: every acknowledged write present, every
unacknowledged one reading as its old or its new content. fio's own verify state cannot
judge after a crash: it counts writes that failed when a server died as written
(tests/reliability/test_oracle.py shows it). Every row runs idle and under CPU load
(stress-ng on every core), where timeouts happen as they do on busy nodes.

Every row but row 4 runs twice more with the local fast path (``LOCAL``): replica 0 is
then lent to the engine and served in its process (docs/local-fast-path.md), and the engine
crashing (row 9) takes unflushed writes of it down with the process. Row 4 partitions every
replica from the engine, which a replica in the engine's process cannot be.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.replication.liveness import PING_FAILED
from tests.ackcheck import AckWorkload, verify_acknowledged
from tests.faults import DelayProxy, FaultyDisk, small_disk
from tests.harness import VERIFY, MiB, Volume, fio, fio_errors, nbdsh, run, wait_for
from tests.load import cpu_load
from tests.netns import SUBNET, hosts

TIMEOUT = "2"  # the engine's replica timeout in these tests (seconds)
ORACLE_REGION = (160 * MiB, 32 * MiB)  # fio writes the first 96 MiB
REPORT_WAIT = 30  # seconds the oracle has to publish its next progress report


@pytest.fixture(params=["idle", pytest.param("loaded", marks=pytest.mark.slow)])
def load(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each row runs on an idle machine and under CPU load on every core (that one with
    -m slow: the default suite's 30-minute budget)."""
    if request.param == "idle":
        yield "idle"
        return
    with cpu_load():
        yield "loaded"


class Volumes(list[Volume]):
    """The volumes a test started, and how their engines run: ``server`` (every replica
    behind its server) or ``local`` (the local fast path: replica 0 lent to the engine)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path


#: run a row with every replica behind its server, then with replica 0 lent to the engine
LOCAL = pytest.mark.parametrize("volumes", ["server", "local"], indirect=True)


@pytest.fixture
def volumes(load: str, request: pytest.FixtureRequest) -> Iterator[Volumes]:
    created = Volumes(getattr(request, "param", "server"))
    yield created
    for volume in created:
        volume.cleanup()


@contextlib.contextmanager
def oracle(volume: Volume, root: Path, **options: Any) -> Iterator[AckWorkload]:
    """The acknowledgement oracle writing to its own region of the volume."""
    offset, size = ORACLE_REGION
    with AckWorkload(volume.uri, root / "oracle.journal", offset, size, queue_depth=8,
                     max_blocks=8, **options) as workload:
        workload.wait_writes(1, 60)
        yield workload


def report_stamp(workload: AckWorkload) -> int:
    """The ``st_mtime_ns`` of the oracle's progress report (0: none yet). The oracle
    replaces the report (a rename) every 0.2 s, each time with counts computed just before."""
    report = workload.progress_file
    return report.stat().st_mtime_ns if report.exists() else 0


def next_report(workload: AckWorkload, after: int) -> int:
    """Wait until the oracle publishes a report other than the one stamped *after*."""
    wait_for(lambda: report_stamp(workload) != after, REPORT_WAIT,
             "the oracle's next progress report", interval=0.02)
    return report_stamp(workload)


def fresh_progress(workload: AckWorkload) -> dict[str, int]:
    """The oracle's counts as computed after this call began. The report replacing the one
    current now may hold counts computed before; the next one cannot."""
    next_report(workload, next_report(workload, report_stamp(workload)))
    return workload.progress()


def fio_writes(volume: Volume, workload: AckWorkload) -> int:
    """At least how many writes fio has had completed: the engine's count of completed
    writes (both clients') less every write the oracle had issued by then."""
    engine = volume.writes()
    return engine - fresh_progress(workload)["issued"]


def under_way(volume: Volume, workload: AckWorkload, writes: int) -> None:
    """Wait until both clients, fio and the oracle, have had *writes* writes each
    acknowledged, so that the fault that follows meets I/O in flight however slow the
    host (a fixed sleep could inject it before any)."""
    workload.wait_writes(writes, 60)
    wait_for(lambda: fio_writes(volume, workload) >= writes, 60, f"{writes} writes by fio",
             interval=0)


def served_after_fault(workload: AckWorkload, writes: int = 100) -> None:
    """The volume goes on serving: *writes* more of the oracle's writes acknowledged after
    the fault."""
    workload.wait_writes(fresh_progress(workload)["acked"] + writes, 60)


def check_acknowledged(volume: Volume, workload: AckWorkload) -> dict[str, Any]:
    """Every write the oracle saw acknowledged is there, nothing else is."""
    report = verify_acknowledged(volume.uri, workload.journal)
    assert report["lost"] == 0 and report["foreign"] == 0, report
    return report


def no_client_errors(summary: dict[str, Any]) -> None:
    assert summary["failed"] == 0 and summary["unknown"] == 0, summary


def start(volumes: Volumes, volume: Volume, *extra: str) -> Volume:
    volumes.append(volume)
    volume.serve_all()
    if volumes.path == "local":
        volume.engine_args = ("--local-fast-path",)
    volume.start_engine("--timeout", TIMEOUT, *extra)
    if volumes.path == "local":
        assert volume.status()["replicas"][0].get("lent"), "replica 0 is not lent"
    return volume


def placement(volumes: Volumes, nodes: list[Any]) -> tuple[list[str], list[str | None]]:
    """Replicas on the network hosts *nodes*; with the local fast path, replica 0 on this
    host instead (lent to the engine), at this host's address on the hosts' network, where
    the others (rebuilt from it) reach it."""
    addresses = [n.address for n in nodes]
    namespaces: list[str | None] = [n.name for n in nodes]
    if volumes.path == "local":
        addresses[0], namespaces[0] = f"{SUBNET}.1", None
    return addresses, namespaces


def background_fio(volume: Volume, cwd: Path, seconds: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["fio", "--ioengine=nbd", f"--uri={volume.uri}", "--output-format=json", *VERIFY,
         "--size=96M", "--time_based", f"--runtime={seconds}", *extra],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


Completed = subprocess.CompletedProcess[str]


def finish(process: subprocess.Popen[str], timeout: float = 120) -> Completed:
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def restart_and_verify(volume: Volume, workload: AckWorkload) -> None:
    """Start the faulted volume again (every replica is back: no salvage is needed, and none
    is given); every write the oracle saw acknowledged must be there, and the replicas must
    end up identical."""
    volume.stop_engine()
    started = volume.start_engine("--timeout", TIMEOUT)
    assert "salvaged" not in started.stdout
    check_acknowledged(volume, workload)
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


@LOCAL
def test_row1_replica_crash(tmp_path: Path, volumes: Volumes) -> None:
    volume = start(volumes, Volume(tmp_path, 3))
    with oracle(volume, tmp_path) as acks:
        workload = background_fio(volume, tmp_path, 8)
        under_way(volume, acks, 200)
        volume.crash_server(1)
        served_after_fault(acks)
        result = finish(workload)
        no_client_errors(acks.stop())
    assert result.returncode == 0 and fio_errors(result) == 0, result.stderr
    assert volume.modes() == ["RW", "ERR", "RW"]
    check_acknowledged(volume, acks)
    rebuild(volume, 1)
    stop_all(volume)
    volume.replicas_identical()


# -- row 2: a replica hangs ------------------------------------------------------------------


@LOCAL
def test_row2_hung_replica_is_dropped_and_never_silently_rejoins(tmp_path: Path,
                                                                 volumes: Volumes) -> None:
    volume = start(volumes, Volume(tmp_path, 3))
    with oracle(volume, tmp_path) as acks:
        workload = background_fio(volume, tmp_path, 8)
        under_way(volume, acks, 100)
        volume.signal_server(2, signal.SIGSTOP)
        volume.wait_mode(2, "ERR", timeout=30)
        served_after_fault(acks)  # without it
        volume.signal_server(2, signal.SIGCONT)
        result = finish(workload)
        no_client_errors(acks.stop())
    assert result.returncode == 0 and fio_errors(result) == 0, result.stderr
    # back, but not in service: only a rebuild brings it back
    assert volume.modes() == ["RW", "RW", "ERR"]
    check_acknowledged(volume, acks)
    run("engine", "add-replica", "--control", volume.control, volume.address(2))
    volume.wait_healthy()
    stop_all(volume)
    volume.replicas_identical()


# -- row 3: partition between the engine and one replica ------------------------------------


@LOCAL
def test_row3_short_partition_is_ridden_out(tmp_path: Path, volumes: Volumes) -> None:
    with hosts(3) as nodes:
        addresses, namespaces = placement(volumes, nodes)
        volume = start(volumes, Volume(tmp_path, 3, hosts=addresses, namespaces=namespaces))
        with oracle(volume, tmp_path) as acks:
            workload = background_fio(volume, tmp_path, 5)
            under_way(volume, acks, 100)
            nodes[1].partition()
            time.sleep(0.5)  # the fault's length: shorter than the replica timeout
            nodes[1].heal()
            served_after_fault(acks)
            result = finish(workload)
            no_client_errors(acks.stop())
        assert result.returncode == 0 and fio_errors(result) == 0, result.stderr
        assert volume.modes() == ["RW", "RW", "RW"]
        check_acknowledged(volume, acks)
        stop_all(volume)
        volume.replicas_identical()


@LOCAL
def test_row3_long_partition_then_rebuild_copies_only_what_differs(
        tmp_path: Path, volumes: Volumes) -> None:
    with hosts(3) as nodes:
        addresses, namespaces = placement(volumes, nodes)
        volume = start(volumes, Volume(tmp_path, 3, hosts=addresses, namespaces=namespaces))
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


# -- row 4: partition of every replica -----------------------------------------------------


def test_row4_partition_all_then_restart(tmp_path: Path, volumes: Volumes) -> None:
    with hosts(3) as nodes:
        volume = start(volumes, Volume(tmp_path, 3, hosts=[n.address for n in nodes],
                                       namespaces=[n.name for n in nodes]))
        with oracle(volume, tmp_path) as acks:
            workload = background_fio(volume, tmp_path, 30)
            under_way(volume, acks, 200)
            for node in nodes:
                node.partition()
            result = finish(workload)
            summary = acks.stop()
        # The clients saw I/O errors: nothing is acknowledged that is not replicated
        assert fio_errors(result) > 0 and summary["failed"] + summary["unknown"] > 0
        wait_for(lambda: volume.status()["state"] == "faulted", 30, "the volume to fault")
        for node in nodes:
            node.heal()
        restart_and_verify(volume, acks)


def test_row4_idle_volume_is_faulted_by_its_pings(tmp_path: Path) -> None:
    """Row 4 with no I/O at the partition: the engine's liveness pings, not a write, find
    the replicas gone and fault the volume; every acknowledged write survives the restart.
    (Once, idle: the soak repeats it under CPU load.)"""
    with hosts(3) as nodes:
        volume = Volume(tmp_path, 3, hosts=[n.address for n in nodes],
                        namespaces=[n.name for n in nodes])
        try:
            volume.serve_all()
            volume.start_engine("--timeout", TIMEOUT)
            with oracle(volume, tmp_path) as acks:
                acks.wait_writes(200, 60)
                no_client_errors(acks.stop())
            reasons = partition_idle(volume, nodes)
            assert any(reason.startswith(PING_FAILED) for reason in reasons), reasons
            for node in nodes:
                node.heal()
            restart_and_verify(volume, acks)
        finally:
            volume.cleanup()
            for node in nodes:
                node.heal()


def partition_idle(volume: Volume, nodes: list[Any]) -> list[str]:
    """Partition every replica of the volume once its engine pinged them with no I/O
    since (the volume is idle), and wait until the pings faulted it; the replicas'
    reasons."""
    rounds = volume.status()["liveness"]["rounds"]
    wait_for(lambda: volume.status()["liveness"]["rounds"] > rounds, 60,
             "a round of pings of the idle volume")
    for node in nodes:
        node.partition()
    wait_for(lambda: volume.status()["state"] == "faulted", 60, "the pings to fault it")
    return [replica["reason"] for replica in volume.status()["replicas"]]


# -- row 5: a slow replica -------------------------------------------------------------------


@LOCAL
def test_row5_slow_replica_causes_no_errors_and_no_rebuild(tmp_path: Path,
                                                           volumes: Volumes) -> None:
    volume = Volume(tmp_path, 3)
    volumes.append(volume)
    volume.serve_all()
    proxy = DelayProxy(("127.0.0.1", volume.ports[1]), delay=0.02)
    try:
        replicas = [item for address in (volume.address(0), f"127.0.0.1:{proxy.address[1]}",
                                          volume.address(2))
                    for item in ("--replica", address)]
        local = ("--local-fast-path",) if volumes.path == "local" else ()
        run("engine", "start", "vol", *replicas, "--secret-file", volume.secret, "--socket",
            volume.socket, "--control", volume.control, "--timeout", TIMEOUT, *local)
        volume.engine_pid = int(Path(str(volume.socket) + ".pid").read_text())
        assert bool(volume.status()["replicas"][0].get("lent")) == bool(local)
        with oracle(volume, tmp_path) as acks:
            result = fio(volume.uri, *VERIFY, "--size=32M", "--time_based", "--runtime=5")
            no_client_errors(acks.stop())
        assert result.returncode == 0 and fio_errors(result) == 0, result.stderr
        status = volume.status()
        assert [r["mode"] for r in status["replicas"]] == ["RW", "RW", "RW"]
        assert all("rebuild" not in r for r in status["replicas"])
        check_acknowledged(volume, acks)
        volume.stop_engine()
    finally:
        proxy.close()
    for index in range(3):
        volume.stop_server(index)
    volume.replicas_identical()


# -- row 6: a replica's disk fills up --------------------------------------------------------


@LOCAL
def test_row6_one_replica_disk_full(tmp_path: Path, volumes: Volumes) -> None:
    with small_disk(tmp_path, "small", 40) as small:
        directories = [tmp_path / "r0", small / "r1", tmp_path / "r2"]
        volume = start(volumes, Volume(tmp_path, 3, directories=directories))
        try:
            with oracle(volume, tmp_path) as acks:
                result = fio(volume.uri, *VERIFY, "--size=96M", "--io_size=128M")
                no_client_errors(acks.stop())
            assert result.returncode == 0 and fio_errors(result) == 0, result.stderr
            assert volume.modes() == ["RW", "ERR", "RW"]
            assert "no space" in volume.status()["replicas"][1]["reason"]
            check_acknowledged(volume, acks)
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


@LOCAL
def test_row6_every_disk_full(tmp_path: Path, volumes: Volumes) -> None:
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


@LOCAL
def test_row7_replica_io_errors(tmp_path: Path, volumes: Volumes) -> None:
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
        with oracle(volume, tmp_path) as acks:
            subprocess.run(["nbdcopy", volume.uri, str(back)], check=True)  # no client error
            result = fio(volume.uri, *VERIFY, "--size=32M", "--offset=64M")
            no_client_errors(acks.stop())
        assert back.read_bytes()[: 32 * MiB] == data.read_bytes()
        assert result.returncode == 0 and fio_errors(result) == 0, result.stderr
        check_acknowledged(volume, acks)
        assert volume.modes()[0] == "ERR" and volume.modes()[1:] == ["RW", "RW"]
        disk.heal()
        stop_all(volume)
        volume.replicas_identical([1, 2])
    finally:
        disk.heal()
        volume.cleanup()
        disk.close()


# -- row 9: the engine crashes in the middle of writes --------------------------------------


@LOCAL
def test_row9_engine_crash_loses_no_acknowledged_write(tmp_path: Path,
                                                       volumes: Volumes) -> None:
    volume = start(volumes, Volume(tmp_path, 3))
    with oracle(volume, tmp_path) as acks:
        workload = background_fio(volume, tmp_path, 30)
        under_way(volume, acks, 300)
        volume.crash_engine()
        finish(workload)  # fio stops with errors: its engine died
        assert acks.finish()["stopped"] != "seconds"  # so did the oracle's connection
    volume.start_engine("--timeout", TIMEOUT)
    check_acknowledged(volume, acks)
    volume.wait_healthy()  # the others were resynchronized from the trusted one
    stop_all(volume)
    volume.replicas_identical()


@LOCAL
def test_row9_engine_crash_under_a_filesystem(tmp_path: Path, volumes: Volumes) -> None:
    volume = start(volumes, Volume(tmp_path, 2, "256M"))
    device = run("engine", "attach", "--control", volume.control).stdout.strip()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    subprocess.run(["mkfs.ext4", "-q", device], check=True)
    subprocess.run(["mount", device, str(mountpoint)], check=True)
    kept = os.urandom(3 * MiB)
    (mountpoint / "kept").write_bytes(kept)
    subprocess.run(["sync"], check=True)
    before = volume.writes()
    # direct I/O: the writer's data goes to the engine now, not at the next writeback. It
    # writes until a write fails (the crash), so it cannot finish before the crash lands.
    writer = subprocess.Popen(
        ["sh", "-c", f"while dd if=/dev/urandom of={mountpoint / 'busy'} bs=1M count=64 "
         "oflag=direct conv=notrunc status=none; do :; done; exit 1"],
        stderr=subprocess.DEVNULL)
    wait_for(lambda: volume.writes() >= before + 16, 60, "the writer's data at the engine",
             interval=0)
    volume.crash_engine()
    assert writer.wait(timeout=120) != 0  # the crash met the writer half-way
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


# -- row 10: every replica crashes -----------------------------------------------------------


@LOCAL
def test_row10_all_replicas_crash_then_restart(tmp_path: Path, volumes: Volumes) -> None:
    volume = start(volumes, Volume(tmp_path, 3))
    with oracle(volume, tmp_path) as acks:
        workload = background_fio(volume, tmp_path, 30)
        under_way(volume, acks, 300)
        for index in range(3):
            volume.crash_server(index)
        result = finish(workload)
        summary = acks.stop()
    assert fio_errors(result) > 0 and summary["failed"] + summary["unknown"] > 0
    wait_for(lambda: volume.status()["state"] == "faulted", 30, "the volume to fault")
    volume.serve_all()
    restart_and_verify(volume, acks)


# -- row 11: crashes during a rebuild ----------------------------------------------------------


@LOCAL
def test_row11_crash_during_rebuild(tmp_path: Path, volumes: Volumes) -> None:
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

    with oracle(volume, tmp_path, rate=200) as acks:  # writes go on throughout
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
        no_client_errors(acks.stop())
    assert sorted(volume.modes()) == ["ERR", "RW", "RW"]
    check_acknowledged(volume, acks)
    survivors = [i for i in range(3) if i != index]
    stop_all(volume)
    volume.replicas_identical(survivors)


# -- row 4, fifty times under CPU load (a soak: pytest -m slow -s) ---------------------------


@pytest.mark.slow
@pytest.mark.timeout(6 * 3600)  # about 30 s an iteration under load; the default is 300 s
def test_row4_soak_under_cpu_load(tmp_path: Path) -> None:
    """Row 4 repeated (ROW4_ITERATIONS, default 50) under CPU load with the engine's
    liveness pings on, judged by the oracle; after every fifth of them, row 4 on an idle
    volume, which the pings fault (ROW4_IDLE_ITERATIONS, default 10). Each line says how
    many replicas a ping took out of service, racing the writes' failures.

    fio's verify state is judged too, to show what it counts: its ``--verify_only
    --verify_state_load`` check reads 16 fixed blocks whether or not its workload wrote
    them (after a clean run on a plain file too: test_oracle.py), so it reports them lost
    whenever the partition came before the workload happened to write them. That, not the
    pings, is what failed row 4 when it was judged by fio (commit db63c6d)."""
    iterations = int(os.environ.get("ROW4_ITERATIONS", "50"))
    idle_iterations = int(os.environ.get("ROW4_IDLE_ITERATIONS", "10"))
    plan = [("busy", i) for i in range(iterations)]
    for number in range(idle_iterations):  # after every fifth busy one, then the rest
        plan.insert(min(len(plan), 6 * number + 5), ("idle", number))
    lines = []
    with cpu_load(), hosts(3) as nodes:
        for kind, iteration in plan:
            root = tmp_path / f"{kind}{iteration}"
            root.mkdir()
            volume = Volume(root, 3, hosts=[n.address for n in nodes],
                            namespaces=[n.name for n in nodes])
            try:
                lines.append({"kind": kind, **_row4_once(volume, root, nodes, kind)})
            finally:
                volume.cleanup()
                for node in nodes:
                    node.heal()
            print(f"row 4 {kind} iteration {iteration}: {lines[-1]}", flush=True)
    lost = sum(line["oracle_lost"] + line["oracle_foreign"] for line in lines)
    flagged = [line["fio_flagged"] for line in lines if line["kind"] == "busy"]
    raced = sum(1 for line in lines if line["kind"] == "busy" and line["pinged"])
    print(f"row 4 soak: {iterations} iterations under writes ({raced} with a replica taken "
          f"out by a ping), {idle_iterations} idle (faulted by the pings), oracle "
          f"lost/foreign {lost}; fio's verify state flagged "
          f"{sum(1 for n in flagged if n)} iterations ({sum(flagged)} blocks)", flush=True)
    assert lost == 0, lines
    assert all(line["pinged"] for line in lines if line["kind"] == "idle"), lines


def _row4_once(volume: Volume, root: Path, nodes: list[Any], kind: str) -> dict[str, Any]:
    volume.serve_all()
    volume.start_engine("--timeout", TIMEOUT)
    assert volume.status()["liveness"]["interval"] > 0  # the pings are on
    fio_check = None
    with oracle(volume, root) as acks:
        if kind == "busy":
            workload = background_fio(volume, root, 30, "--verify_state_save=1")
            under_way(volume, acks, 200)
            for node in nodes:
                node.partition()
            finish(workload)
            summary = acks.stop()
            wait_for(lambda: volume.status()["state"] == "faulted", 60, "the volume to fault")
            reasons = [replica["reason"] for replica in volume.status()["replicas"]]
        else:
            acks.wait_writes(200, 60)
            summary = acks.stop()
            reasons = partition_idle(volume, nodes)
    for node in nodes:
        node.heal()
    volume.stop_engine()
    volume.start_engine("--timeout", TIMEOUT)
    report = verify_acknowledged(volume.uri, acks.journal)
    if kind == "busy":
        fio_check = subprocess.run(
            ["fio", "--ioengine=nbd", f"--uri={volume.uri}", "--output-format=json",
             *VERIFY, "--size=96M", "--time_based", "--runtime=1", "--verify_state_load=1",
             "--verify_only"], cwd=root, capture_output=True, text=True, timeout=300,
            check=False)
    volume.wait_healthy()
    stop_all(volume)
    volume.replicas_identical()
    return {"acked": summary["acked"], "failed": summary["failed"],
            "unknown": summary["unknown"], "oracle_lost": report["lost"],
            "oracle_foreign": report["foreign"],
            "pinged": sum(1 for reason in reasons if reason.startswith(PING_FAILED)),
            "fio_flagged": fio_check.stderr.count("bad magic header") if fio_check else 0}

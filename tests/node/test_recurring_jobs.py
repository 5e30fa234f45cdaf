"""Recurring jobs on a real daemon, through the CLI: snapshot and backup jobs on two real
volumes (runs started with ``job run`` so that the test does not wait for the clock, and
once on the real schedule), their retention and skips; a daemon killed during a backup
run; bad input. The schedule's arithmetic on a clock the tests control is in
test_recurring_inprocess.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import MiB, Node, wait_for


def show_job(node: Node, name: str) -> dict[str, Any]:
    shown: dict[str, Any] = json.loads(node.cli("job", "show", name, "-o", "json").stdout)
    return shown


def finished_runs(node: Node, name: str, count: int, timeout: float = 120) -> list[Any]:
    """Wait until job *name* has *count* finished runs; its runs."""
    def done() -> list[Any] | None:
        runs = show_job(node, name)["runs"]
        return runs if len([r for r in runs if r["state"] != "running"]) >= count else None

    runs: list[Any] = wait_for(done, timeout, f"{count} finished run(s) of job {name}",
                               interval=0.5)
    return runs


def run_job(node: Node, name: str) -> dict[str, Any]:
    """``job run NAME`` and wait for the run to finish; the run."""
    before = len(show_job(node, name)["runs"])
    node.cli("job", "run", name)
    return dict(finished_runs(node, name, before + 1)[-1])


def write(device: str, offset: int, data: bytes) -> None:
    fd = os.open(device, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def snapshots(node: Node, volume: str, job: str) -> list[str]:
    listed = json.loads(node.cli("snapshot", "list", volume, "-o", "json").stdout)
    return [s["name"] for s in listed if s["labels"].get("recurring-job") == job]


def backups(node: Node, volume: str, job: str) -> list[dict[str, Any]]:
    listed = json.loads(node.cli("backup", "list", volume, "-o", "json").stdout)
    return [b for b in listed if b["labels"].get("recurring-job") == job]


@pytest.mark.slow  # 40 s (the suite's budget); the in-process tests keep the same rules
def test_snapshot_and_backup_jobs_keep_retain_and_skip_unchanged(node: Node,
                                                                  tmp_path: Path) -> None:
    (tmp_path / "backups").mkdir()
    node.cli("backup-target", "set", f"file://{tmp_path / 'backups'}")
    devices = {}
    for name in ("a", "b"):
        node.cli("volume", "create", name, "--size", "16M", "--replicas", "2")
        devices[name] = node.cli("volume", "attach", name).stdout.strip()
    node.cli("volume", "create", "other", "--size", "16M", "--replicas", "1")
    node.cli("job", "create", "snap", "--task", "snapshot", "--cron", "0 0 1 1 *",
             "--retain", "3", "--group", "gold")
    node.cli("job", "create", "safe", "--task", "backup", "--cron", "0 0 1 1 *",
             "--retain", "2", "--concurrency", "2", "--group", "gold",
             "--label", "tier=gold")
    for name in ("a", "b"):
        joined = json.loads(node.cli("volume", "jobs", name, "--add", "gold", "-o",
                                     "json").stdout)
        assert joined["effective"] == ["safe", "snap"]
    assert show_job(node, "snap")["volumes"] == ["a", "b"]  # not "other"
    for round_ in range(4):
        write(devices["a"], round_ * MiB, os.urandom(MiB))
        if round_ < 2:
            write(devices["b"], round_ * MiB, os.urandom(MiB))  # b stops changing
        snap = run_job(node, "snap")
        safe = run_job(node, "safe")
        assert snap["state"] == safe["state"] == "succeeded", (snap, safe)
        assert snap["volumes"]["a"]["result"] == "done"
        assert safe["volumes"]["a"]["result"] == "done"
        expected = "done" if round_ < 2 else "skipped"
        assert snap["volumes"]["b"]["result"] == expected, snap
        assert safe["volumes"]["b"]["result"] == expected, safe
        assert len(snapshots(node, "a", "snap")) == min(round_ + 1, 3)
        assert len(backups(node, "a", "safe")) == min(round_ + 1, 2)
    assert len(snapshots(node, "b", "snap")) == 2
    made = backups(node, "a", "safe")
    assert all(b["state"] == "complete" and b["labels"]["tier"] == "gold" for b in made)
    # the backups kept are those of the snapshots kept, the newest two
    assert sorted(b["snapshot"] for b in made) == snapshots(node, "a", "safe")
    assert snapshots(node, "other", "snap") == []
    listed = json.loads(node.cli("job", "list", "-o", "json").stdout)
    assert {j["name"]: j["last_run"]["state"] for j in listed} == {
        "safe": "succeeded", "snap": "succeeded"}
    text = node.cli("job", "show", "snap").stdout
    assert "b: skipped: unchanged since snapshot snap-" in text
    metrics = httpx.get(node.url + "/metrics", headers={
        "Authorization": f"Bearer {node.token_file.read_text().strip()}"}).text
    assert 'appliance_recurring_job_last_run_success{job="snap"} 1.0' in metrics
    assert 'appliance_recurring_job_failures_total{job="safe"} 0.0' in metrics
    # leaving the group: the volume no longer takes part
    node.cli("volume", "jobs", "b", "--remove", "gold")
    assert show_job(node, "snap")["volumes"] == ["a"]
    node.cli("job", "delete", "snap")
    assert len(snapshots(node, "a", "snap")) == 3  # what it made stays


@pytest.mark.slow  # waits for the next minute (up to 60 s); virtual-clock tests cover more
def test_a_job_runs_on_its_real_schedule(node: Node) -> None:
    node.cli("volume", "create", "v", "--size", "16M", "--replicas", "1")
    made = node.cli("job", "create", "minutely", "--task", "snapshot", "--cron",
                    "* * * * *", "--group", "default").stdout
    assert "next run" in made
    [run] = finished_runs(node, "minutely", 1, timeout=90)
    assert run["trigger"] == "schedule" and run["state"] == "succeeded"
    assert run["slot"].endswith(":00Z")
    assert snapshots(node, "v", "minutely") == [
        "minutely-" + run["slot"].replace("-", "").replace(":", "").replace("T", "-")
        .rstrip("Z")]


def test_a_daemon_killed_during_a_backup_run_finishes_it_once(node: Node,
                                                             tmp_path: Path) -> None:
    (tmp_path / "backups").mkdir()
    node.cli("backup-target", "set", f"file://{tmp_path / 'backups'}")
    node.cli("volume", "create", "big", "--size", "256M", "--replicas", "1")
    device = node.cli("volume", "attach", "big").stdout.strip()
    for offset in range(0, 256 * MiB, 8 * MiB):
        write(device, offset, os.urandom(8 * MiB))
    node.cli("job", "create", "safe", "--task", "backup", "--cron", "0 0 1 1 *",
             "--group", "default")
    node.cli("job", "run", "safe")

    def backing_up() -> bool:
        listed = json.loads(node.cli("backup", "list", "big", "-o", "json").stdout)
        return any(b["state"] == "in-progress" for b in listed)

    wait_for(backing_up, 60, "the job's backup to start")
    node.stop(signal.SIGKILL)
    node.start()
    [run] = finished_runs(node, "safe", 1, timeout=300)
    assert run["state"] == "succeeded", run
    complete = [b for b in backups(node, "big", "safe") if b["state"] == "complete"]
    assert len(complete) == 1, complete
    assert complete[0]["snapshot"] == snapshots(node, "big", "safe")[0]
    assert len(snapshots(node, "big", "safe")) == 1


def test_a_trim_job_trims_mounted_file_systems(node: Node, tmp_path: Path) -> None:
    node.cli("volume", "create", "fs", "--size", "64M", "--replicas", "1")
    node.cli("volume", "create", "idle", "--size", "16M", "--replicas", "1")
    device = node.cli("volume", "attach", "fs").stdout.strip()
    subprocess.run(["mkfs.ext4", "-q", "-E", "nodiscard", device], check=True)
    mount = tmp_path / "mnt"
    mount.mkdir()
    subprocess.run(["mount", device, str(mount)], check=True)
    try:
        (mount / "file").write_bytes(os.urandom(16 * MiB))
        os.sync()
        (mount / "file").unlink()
        os.sync()
        node.cli("job", "create", "trim", "--task", "filesystem-trim", "--cron", "@weekly",
                 "--group", "default")
        run = run_job(node, "trim")
        assert run["state"] == "succeeded", run
        assert run["volumes"]["fs"]["result"] == "done"
        assert f"{mount}: " in run["volumes"]["fs"]["message"]
        trimmed = int(run["volumes"]["fs"]["message"].split(": ")[1].split()[0])
        assert trimmed >= 16 * MiB
        assert run["volumes"]["idle"] == {"result": "skipped",
                                          "message": "detached: nothing to trim"}
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_bad_input_is_refused_and_changes_nothing(node: Node) -> None:
    node.cli("volume", "create", "v", "--size", "16M", "--replicas", "1")
    cases = [
        (["job", "create", "j", "--task", "snapshot", "--cron", "* * *"], "3 field(s)"),
        (["job", "create", "j", "--task", "snapshot", "--cron", "99 * * * *"],
         "out of range"),
        (["job", "create", "j", "--task", "snapshot", "--cron", "* * * * *", "--retain", "0"],
         "retain"),
        (["job", "create", "j", "--task", "defrag", "--cron", "* * * * *"],
         "'defrag' is not one of"),
        (["job", "show", "nope"], "job 'nope' does not exist"),
        (["job", "delete", "nope"], "job 'nope' does not exist"),
        (["job", "run", "nope"], "job 'nope' does not exist"),
        (["volume", "jobs", "v", "--add", "nope"], "no job or group is named 'nope'"),
        (["volume", "jobs", "v"], "give --add or --remove"),
        (["volume", "jobs", "missing", "--add", "default"], "volume 'missing' does not exist"),
    ]
    for args, words in cases:
        result = node.cli(*args, check=False)
        assert result.returncode != 0, args
        assert words in result.stderr, (args, result.stderr)
    assert json.loads(node.cli("job", "list", "-o", "json").stdout) == []
    assert json.loads(node.cli("volume", "show", "v", "-o", "json").stdout)["jobs"] == []
    node.cli("job", "create", "j", "--task", "snapshot", "--cron", "@daily")
    again = node.cli("job", "create", "j", "--task", "backup", "--cron", "@daily", check=False)
    assert again.returncode != 0 and "job 'j' already exists" in again.stderr
    assert show_job(node, "j")["task"] == "snapshot"

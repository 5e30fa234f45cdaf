"""Continuous-protection benchmark, on a real daemon (two for the standby):

* **backup mount**: the time to read one file (10 MiB) from a backup of a 2 GiB volume
  through ``backup mount`` (mount, read, unmount; caches dropped first), beside a full
  ``backup restore`` of the same backup, and the backup blocks the read fetched;
* **scrub**: MiB/s of ``volume scrub`` with no rate limit, beside ``sha256sum`` of the same
  snapshot layer files (caches dropped before each); and fio's 4 KiB random-read latency at
  queue depth 1 on the attached volume alone, during a scrub at the default rate limit, and
  during one without a limit;
* **standby**: the time a standby takes to apply a backup in which 1 % of the blocks
  changed, beside the full restore that made it.

Ratios are the figures (docs/performance.md); absolute times depend on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.node_bench import Daemon

MiB = 1 << 20
BLOCK = 2 * MiB  # the backup block size


def drop_caches() -> None:
    os.sync()
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def wait(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def fio_qd1(device: str, seconds: float) -> dict[str, float]:
    result = subprocess.run(
        ["fio", "--name=lat", f"--filename={device}", "--rw=randread", "--bs=4k",
         "--iodepth=1", "--direct=1", "--ioengine=psync", f"--runtime={seconds}",
         "--time_based", "--output-format=json"],
        capture_output=True, text=True, check=True, timeout=seconds + 120)
    job = json.loads(result.stdout)["jobs"][0]["read"]
    percentiles = job["clat_ns"]["percentile"]
    return {"iops": job["iops"], "mean_us": job["clat_ns"]["mean"] / 1000,
            "p50_us": percentiles["50.000000"] / 1000, "p99_us": percentiles["99.000000"] / 1000}


def fill(root: Path, size: int, wanted: bytes) -> None:
    """Fill the file system at *root* with incompressible files (most of *size*), and the
    file to be read back, written in the middle."""
    piece = 32 * MiB
    count = int(size * 0.8) // piece
    for index in range(count):
        (root / f"bulk-{index:04d}").write_bytes(os.urandom(piece))
        if index == count // 2:
            (root / "wanted").write_bytes(wanted)
    os.sync()


def backup_mount_figures(daemon: Daemon, root: Path, backup_id: str,
                         wanted: bytes) -> dict[str, Any]:
    view = root / "view"
    view.mkdir()
    drop_caches()
    started = time.perf_counter()
    daemon.cli("backup", "mount", backup_id, str(view))
    data = (view / "wanted").read_bytes()
    read_done = time.perf_counter()
    time.sleep(2.5)  # the helper writes its statistics every 2 s
    [mount] = daemon.http.get("/v1/mounts").json()
    daemon.cli("backup", "umount", str(view))
    if data != wanted:
        raise SystemExit("the file read from the backup mount differs")
    statistics = mount["statistics"]
    drop_caches()
    started_restore = time.perf_counter()
    daemon.cli("backup", "restore", backup_id, "restored", "--replicas", "1",
               "--timeout", "3600")
    restore_seconds = time.perf_counter() - started_restore
    daemon.cli("volume", "delete", "restored")
    mount_seconds = read_done - started
    return {"mount_read_seconds": mount_seconds, "restore_seconds": restore_seconds,
            "restore_over_mount": restore_seconds / mount_seconds,
            "fetched_blocks": statistics["distinct_blocks"],
            "backup_blocks": statistics["backup_blocks"],
            "fetched_fraction": statistics["distinct_blocks"] / statistics["backup_blocks"]}


def scrub_once(daemon: Daemon, volume: str) -> dict[str, Any]:
    started = time.perf_counter()
    record = json.loads(daemon.cli("volume", "scrub", volume, "--wait", "-o", "json"))
    return {"seconds": time.perf_counter() - started, "report": record["report"]}


def layer_files(directory: str, snapshot: str) -> Path:
    meta = json.loads((Path(directory) / "replica.json").read_text())
    [layer] = [x for x in meta["layers"] if x["name"] == snapshot]
    return Path(directory) / f"layer-{layer['id']:06d}.img"


def scrub_figures(daemon: Daemon, volume: str, device: str, seconds: float
                  ) -> dict[str, Any]:
    directories = [r["directory"] for r in daemon.http.get(f"/v1/volumes/{volume}").json()
                   ["replica_list"]]
    scrub_once(daemon, volume)  # takes the checksums (first scrub)
    daemon.http.patch("/v1/settings", json={"scrub_rate_limit": 0}).raise_for_status()
    drop_caches()
    unlimited = scrub_once(daemon, volume)
    scanned = unlimited["report"]["scanned_bytes"]
    drop_caches()
    started = time.perf_counter()
    files = [str(layer_files(d, "s1")) for d in directories]
    subprocess.run(["sha256sum", *files], check=True, capture_output=True)
    sha_seconds = time.perf_counter() - started
    sha_bytes = sum(os.path.getsize(f) for f in files)
    figures: dict[str, Any] = {
        "scrub_mib_s": scanned / MiB / unlimited["seconds"],
        "sha256sum_mib_s": sha_bytes / MiB / sha_seconds,
        "scanned_bytes": scanned}
    figures["scrub_over_sha256sum"] = figures["scrub_mib_s"] / figures["sha256sum_mib_s"]
    figures["latency_alone"] = fio_qd1(device, seconds)
    for label, rate in (("latency_during_limited_scrub", 100), ("latency_during_scrub", 0)):
        daemon.http.patch("/v1/settings", json={"scrub_rate_limit": rate}).raise_for_status()
        daemon.cli("volume", "scrub", volume)
        figures[label] = fio_qd1(device, seconds)
        figures[label]["scrub_outlasted_fio"] = \
            daemon.http.get(f"/v1/volumes/{volume}/scrub").json()["state"] == "running"
        wait(lambda: daemon.http.get(f"/v1/volumes/{volume}/scrub").json()["state"]
             != "running", 3600, "the scrub to end")
    alone = figures["latency_alone"]
    for label in ("latency_during_limited_scrub", "latency_during_scrub"):
        figures[label]["p50_ratio"] = figures[label]["p50_us"] / alone["p50_us"]
        figures[label]["p99_ratio"] = figures[label]["p99_us"] / alone["p99_us"]
    return figures


def standby_figures(root: Path, port: int, target: Path, device: str, size: int,
                    primary: Daemon) -> dict[str, Any]:
    (root / "dr").mkdir()
    second = Daemon(root / "dr", port + 1)
    try:
        second.http.patch("/v1/settings", json={"standby_poll_interval": 1,
                                                "minimal_available_percentage": 0}
                          ).raise_for_status()
        (root / "dr" / "disk2").mkdir()
        second.cli("disk", "add", str(root / "dr" / "disk2"))
        second.cli("backup-target", "set", f"file://{target}")
        drop_caches()
        started = time.perf_counter()
        second.cli("volume", "create", "dr", "--standby", "--from-backup-volume", "data",
                   "--replicas", "2", "--timeout", "3600")  # waits for the first restore
        full_seconds = time.perf_counter() - started

        def standby() -> dict[str, Any]:
            info: dict[str, Any] = second.http.get("/v1/volumes/dr").json()["standby"] or {}
            return info

        first = wait(lambda: standby().get("last_backup"), 600, "the standby's first backup")
        blocks = size // BLOCK
        changed = random.Random(5).sample(range(blocks), max(1, blocks // 100))
        fd = os.open(device, os.O_WRONLY)
        try:  # 64 KiB in each changed block of the backup
            for index in changed:
                os.pwrite(fd, os.urandom(64 << 10), index * BLOCK + 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
        primary.cli("snapshot", "create", "data", "s2")
        newest = primary.cli("backup", "create", "data", "--snapshot", "s2").strip()
        wait(lambda: standby().get("last_backup") == newest, 600, "the standby's update")
        update = standby()["last_update"]
        assert first
        return {"full_restore_seconds": full_seconds, "changed_blocks": len(changed),
                "blocks": blocks, "apply_seconds": update["seconds"],
                "applied_blocks": update["blocks"], "fetched_bytes": update["bytes_fetched"],
                "full_over_apply": full_seconds / max(update["seconds"], 1e-3)}
    finally:
        with contextlib.suppress(Exception):
            second.cli("volume", "delete", "dr")
        second.stop()


def run(root: Path, size: int, wanted_size: int, seconds: float, port: int
        ) -> dict[str, Any]:
    daemon = Daemon(root, port)
    target = root / "backups"
    target.mkdir()
    results: dict[str, Any] = {"volume_bytes": size, "file_bytes": wanted_size}
    try:
        daemon.http.patch("/v1/settings",
                          json={"minimal_available_percentage": 0}).raise_for_status()
        (root / "disk2").mkdir()
        daemon.cli("disk", "add", str(root / "disk2"))
        daemon.cli("backup-target", "set", f"file://{target}")
        daemon.cli("volume", "create", "data", "--size", str(size), "--replicas", "2")
        device = daemon.cli("volume", "attach", "data").strip()
        subprocess.run(["mkfs.ext4", "-q", "-E", "nodiscard", device], check=True)
        live = root / "live"
        live.mkdir()
        wanted = hashlib.shake_256(b"wanted").digest(wanted_size)
        subprocess.run(["mount", device, str(live)], check=True)
        try:
            fill(live, size, wanted)
            subprocess.run(["fsfreeze", "-f", str(live)], check=True)
            try:
                daemon.cli("snapshot", "create", "data", "s1")
            finally:
                subprocess.run(["fsfreeze", "-u", str(live)], check=True)
        finally:
            subprocess.run(["umount", str(live)], check=True)
        started = time.perf_counter()
        backup_id = daemon.cli("backup", "create", "data", "--snapshot", "s1").strip()
        results["backup_seconds"] = time.perf_counter() - started
        results["backup_mount"] = backup_mount_figures(daemon, root, backup_id, wanted)
        results["scrub"] = scrub_figures(daemon, "data", device, seconds)
        results["standby"] = standby_figures(root, port, target, device, size, daemon)
    finally:
        with contextlib.suppress(Exception):
            daemon.cli("volume", "detach", "data", "--force")
        daemon.stop()
    return results


def report(results: dict[str, Any]) -> str:
    mount, scrub, standby = results["backup_mount"], results["scrub"], results["standby"]
    lines = [
        f"backup mount: {results['file_bytes'] // MiB} MiB file read in "
        f"{mount['mount_read_seconds']:.2f} s (mount included); full restore of the "
        f"{results['volume_bytes'] // MiB} MiB backup {mount['restore_seconds']:.2f} s: "
        f"{mount['restore_over_mount']:.1f}x; {mount['fetched_blocks']} of "
        f"{mount['backup_blocks']} blocks fetched ({100 * mount['fetched_fraction']:.1f} %)",
        f"scrub: {scrub['scrub_mib_s']:.0f} MiB/s beside sha256sum {scrub['sha256sum_mib_s']:.0f}"
        f" MiB/s of the same layers: {100 * scrub['scrub_over_sha256sum']:.0f} %"]
    alone = scrub["latency_alone"]
    lines.append(f"fio 4K randread QD1 alone: p50 {alone['p50_us']:.0f} us, p99 "
                 f"{alone['p99_us']:.0f} us")
    for label, text in (("latency_during_limited_scrub", "during scrub at 100 MiB/s"),
                        ("latency_during_scrub", "during scrub without limit")):
        figure = scrub[label]
        lines.append(f"fio 4K randread QD1 {text}: p50 {figure['p50_us']:.0f} us "
                     f"({figure['p50_ratio']:.2f}x), p99 {figure['p99_us']:.0f} us "
                     f"({figure['p99_ratio']:.2f}x)"
                     + ("" if figure["scrub_outlasted_fio"] else " (the scrub ended first)"))
    lines.append(f"standby: {standby['changed_blocks']} of {standby['blocks']} blocks changed "
                 f"(1 %), applied in {standby['apply_seconds']:.2f} s "
                 f"({standby['applied_blocks']} blocks, {standby['fetched_bytes'] // MiB} MiB "
                 f"fetched) beside the full restore {standby['full_restore_seconds']:.2f} s: "
                 f"{standby['full_over_apply']:.1f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="work directory (default: a new one)")
    parser.add_argument("--quick", action="store_true", help="a small run (smoke test)")
    parser.add_argument("--port", type=int, default=9610)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="protection-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    if args.port == 0:  # two free ports in a row are likely; the daemons say if not
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            args.port = probe.getsockname()[1]
    size, wanted, seconds = (256 * MiB, 2 * MiB, 3.0) if args.quick else \
        (2048 * MiB, 10 * MiB, 20.0)
    results = run(root, size, wanted, seconds, args.port)
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()

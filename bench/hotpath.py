"""Where the time of one I/O goes: CPU, context switches and system calls per I/O of the
engine and of each replica server under one fio workload, and (with ``--py-spy``) the
functions that take the most samples in each process.

    .venv/bin/python -m bench.hotpath [--replicas 1] [--workload "4K randread QD64"]
                                      [--seconds 10] [--py-spy] [--strace]

The volume is filled and layered as in :mod:`bench.fio_bench`. Per-I/O figures divide a
process's counters over a window of steady load by the engine's own count of completed
reads and writes in that window. ``--strace`` runs a second window under ``strace -c -f``
(which slows the process: its counts are per I/O, its times mean nothing). py-spy's top
functions are by own samples (the frame that was running), and by inclusive samples of the
project's functions.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from appliance.replication import engine_control
from appliance.units import parse_size
from bench.fio_bench import WORKLOADS, Target, Workload, project, stop_project
from bench.volume_bench import cpu_seconds


def context_switches(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
    return total


def threads(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


def engine_ops(control: Path) -> int:
    io = engine_control.call(control, "status")["io"]
    return int(io["read_ops"]) + int(io["write_ops"])


def run_fio(target: Target, workload: Workload, size: int, seconds: int) -> \
        subprocess.Popen[str]:
    return subprocess.Popen(
        ["fio", "--ioengine=nbd", f"--uri={target.uri}", "--name=hotpath",
         f"--rw={workload.rw}", f"--bs={workload.bs}", f"--iodepth={workload.iodepth}",
         f"--size={size}", "--time_based", f"--runtime={seconds}", "--randseed=42",
         "--output-format=json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def measure_window(pids: dict[str, int], control: Path, seconds: float) -> dict[str, Any]:
    before = {name: (cpu_seconds(pid), context_switches(pid)) for name, pid in pids.items()}
    ops_before = engine_ops(control)
    time.sleep(seconds)
    ops = engine_ops(control) - ops_before
    result: dict[str, Any] = {"ops": ops, "iops": ops / seconds, "processes": {}}
    for name, pid in pids.items():
        cpu = cpu_seconds(pid) - before[name][0]
        switches = context_switches(pid) - before[name][1]
        result["processes"][name] = {
            "cpu_us_per_io": 1e6 * cpu / max(ops, 1),
            "cpu_share": cpu / seconds,
            "switches_per_io": switches / max(ops, 1),
            "threads": threads(pid)}
    return result


def strace_window(pids: dict[str, int], control: Path, seconds: float,
                  out: Path) -> dict[str, Any]:
    tracers = {name: subprocess.Popen(["strace", "-c", "-f", "-q", "-o",
                                       str(out / f"{name}.strace"), "-p", str(pid)],
                                      stderr=subprocess.DEVNULL)
               for name, pid in pids.items()}
    time.sleep(1)
    ops_before = engine_ops(control)
    time.sleep(seconds)
    ops = engine_ops(control) - ops_before
    for tracer in tracers.values():
        tracer.terminate()
    for tracer in tracers.values():
        tracer.wait(timeout=30)
    per_io: dict[str, dict[str, float]] = {}
    for name in pids:
        counts: dict[str, float] = {}
        for line in (out / f"{name}.strace").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                counts[parts[-1]] = int(parts[3]) / max(ops, 1)
        per_io[name] = dict(sorted(counts.items(), key=lambda kv: -kv[1])[:8])
    return {"ops_traced": ops, "syscalls_per_io": per_io}


def py_spy(pids: dict[str, int], seconds: float, out: Path) -> dict[str, Any]:
    spy = str(Path(sys.executable).parent / "py-spy")
    # --gil: only the thread holding the interpreter lock, i.e. where interpreter time goes
    records = {name: subprocess.Popen([spy, "record", "-p", str(pid), "-d", str(int(seconds)),
                                       "-r", "250", "--gil", "-f", "raw", "-o",
                                       str(out / f"{name}.txt"), "--nonblocking"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for name, pid in pids.items()}
    for record in records.values():
        record.wait(timeout=seconds + 60)
    return {name: summarise(out / f"{name}.txt") for name in pids}


def short_frame(frame: str) -> str:
    """``function (/path/to/file.py:123)`` as ``function (file.py)``."""
    function, paren, where = frame.partition(" (")
    if not paren:
        return frame
    return f"{function} ({Path(where.rsplit(':', 1)[0]).name})"


def summarise(path: Path, top: int = 12) -> dict[str, Any]:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    if not path.exists():
        return {"samples": 0}
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [short_frame(frame) for frame in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            if "appliance" in frame or ".py)" in frame:
                inclusive[frame] += count
    return {"samples": total,
            "own": [(f, round(100 * c / total, 1)) for f, c in own.most_common(top)],
            "inclusive": [(f, round(100 * c / total, 1))
                          for f, c in inclusive.most_common(top)]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--workload", action="append",
                        help="a workload name of bench.fio_bench (all when not given)")
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--threads", type=int, help="nbdkit threads (the engine's default)")
    parser.add_argument("--local", action="store_true",
                        help="the engine's local fast path (one replica lent to it)")
    parser.add_argument("--py-spy", action="store_true")
    parser.add_argument("--strace", action="store_true")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/appliance-hotpath"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.seconds, args.workload = "64M", 1, ["4K randread QD64"]
    size = parse_size(args.size)
    workloads = [w for w in WORKLOADS if not args.workload or w.name in args.workload]
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    engine_args = (("--threads", str(args.threads)) if args.threads else ()) + \
        (("--local-fast-path",) if args.local else ())
    target = project(args.dir, size, args.replicas, engine_args)
    control = args.dir / f"project{args.replicas}" / "ctl.sock"
    names = ["engine"] + [f"replica{i}" for i in range(args.replicas)]
    pids = dict(zip(names, target.pids, strict=True))
    report: dict[str, Any] = {}
    try:
        for workload in workloads:
            windows = 1 + args.strace + args.py_spy
            fio = run_fio(target, workload, size, int(2 + windows * (args.seconds + 3)))
            try:
                time.sleep(2)
                entry = measure_window(pids, control, args.seconds)
                if args.strace:
                    entry.update(strace_window(pids, control, args.seconds, args.dir))
                if args.py_spy:
                    entry["py_spy"] = py_spy(pids, args.seconds, args.dir)
            finally:
                fio.terminate()
                fio.wait(timeout=60)
            report[workload.name] = entry
            print_entry(workload.name, entry)
    finally:
        stop_project(target)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    shutil.rmtree(args.dir, ignore_errors=True)
    return 0


def print_entry(name: str, entry: dict[str, Any]) -> None:
    print(f"== {name}: {entry['iops']:,.0f} I/O per second")
    for process, figures in entry["processes"].items():
        print(f"  {process:9} {figures['cpu_us_per_io']:7.1f} CPU-us/IO  "
              f"{figures['switches_per_io']:5.1f} switches/IO  "
              f"{figures['cpu_share']:5.0%} of a core  {figures['threads']} threads")
    for process, calls in entry.get("syscalls_per_io", {}).items():
        print(f"  {process:9} syscalls/IO: " +
              ", ".join(f"{call} {count:.2f}" for call, count in calls.items()))
    for process, summary in entry.get("py_spy", {}).items():
        if not summary.get("samples"):
            continue
        print(f"  {process} py-spy ({summary['samples']} samples), own:")
        for frame, share in summary["own"]:
            print(f"    {share:5.1f} %  {frame}")
        print(f"  {process} inclusive:")
        for frame, share in summary["inclusive"]:
            print(f"    {share:5.1f} %  {frame}")


if __name__ == "__main__":
    sys.exit(main())

"""Background CPU load for the reliability tests: stress-ng in its own session, always
stopped afterwards (its workers with it)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def cpu_load(percent: int = 90, workers: int | None = None,
             timeout: float = 10) -> Iterator[subprocess.Popen[bytes]]:
    """Keep *workers* (default: every core) CPU stressors busy *percent* of the time."""
    count = workers or os.cpu_count() or 1
    process = subprocess.Popen(
        ["stress-ng", "--cpu", str(count), "--cpu-load", str(percent), "--timeout", "3600",
         "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_workers(process, count, timeout)
        yield process
    finally:
        stop_session(process, timeout)


def wait_workers(process: subprocess.Popen[bytes], count: int, timeout: float) -> None:
    """Wait until stress-ng has forked its *count* workers (or fail if it exited)."""
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        with contextlib.suppress(OSError):
            if len(children.read_text().split()) >= count:
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"stress-ng did not start {count} workers in {timeout} s")
        time.sleep(0.02)
    stderr = process.stderr.read().decode() if process.stderr else ""
    raise AssertionError(f"stress-ng exited {process.returncode}: {stderr}")


def stop_session(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM the whole session; SIGKILL whatever is left of it; reap the leader."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout)
    if process.stderr:
        process.stderr.close()

"""Run the acknowledgement oracle (tests/oracle.py) from the test suite.

The oracle needs libnbd's Python module, which exists only for Debian's /usr/bin/python3,
so it runs as a separate process: ``AckWorkload`` drives a journaled random-write workload
in the background, ``verify_acknowledged`` judges the volume against the journal later.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

ORACLE = Path(__file__).with_name("oracle.py")
PYTHON = "/usr/bin/python3"  # the interpreter python3-libnbd is built for
POLL_SECONDS = 0.02


class OracleFailed(AssertionError):
    """The oracle itself broke (usage error, no connection at start, a bug)."""


class AckWorkload:
    """``oracle.py write`` in the background. It ends after *writes* writes, after
    *seconds*, when the connection dies or at stop() (with neither limit it runs until
    stop(), for at most an hour). Use it as a context manager (which starts it, and kills
    it if still running at the end) or call start() then stop() or finish()."""

    def __init__(self, uri: str, journal: Path, offset: int, size: int, *,
                 queue_depth: int = 16, max_blocks: int = 16, seconds: float | None = None,
                 writes: int | None = None, rate: int | None = None, seed: int | None = None,
                 io_timeout: float = 30, drain_seconds: float = 10) -> None:
        self.journal = journal
        self.progress_file = journal.with_name(journal.name + ".progress")
        stop = ["--writes", str(writes)] if writes else ["--seconds", str(seconds or 3600)]
        self.args = [
            PYTHON, str(ORACLE), "write", "--uri", uri, "--journal", str(journal),
            "--offset", str(offset), "--size", str(size), "--queue-depth", str(queue_depth),
            "--max-blocks", str(max_blocks), "--io-timeout", str(io_timeout),
            "--drain-seconds", str(drain_seconds), "--progress", str(self.progress_file),
            *stop,
            *(["--rate", str(rate)] if rate else []),
            *(["--seed", str(seed)] if seed is not None else []),
        ]
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> AckWorkload:
        self.progress_file.unlink(missing_ok=True)
        self.process = subprocess.Popen(self.args, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        return self

    def __enter__(self) -> AckWorkload:
        return self.start() if self.process is None else self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.communicate(timeout=30)

    def progress(self) -> dict[str, int]:
        """The latest counts the oracle published (issued, acked, failed, unknown...)."""
        try:
            counts: dict[str, int] = json.loads(self.progress_file.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return counts

    def wait_writes(self, count: int, timeout: float) -> dict[str, int]:
        """Wait until at least *count* writes were acknowledged; returns the counts."""
        deadline = time.monotonic() + timeout
        while (counts := self.progress()).get("acked", 0) < count:
            if self._running().poll() is not None:
                raise OracleFailed(f"the workload ended before {count} acknowledged writes: "
                                   f"{counts}, {self._output(1)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {count} "
                                     f"acknowledged writes: {counts}")
            time.sleep(POLL_SECONDS)
        return counts

    def stop(self, timeout: float = 60) -> dict[str, Any]:
        """SIGTERM: stop issuing, wait (bounded) for the writes in flight; the summary."""
        self._running().send_signal(signal.SIGTERM)
        return self.finish(timeout)

    def finish(self, timeout: float = 120) -> dict[str, Any]:
        """Wait for the workload to end by itself (time, count or a dead connection)."""
        return summary_of(self._output(timeout))

    def _running(self) -> subprocess.Popen[str]:
        if self.process is None:
            raise RuntimeError("the workload was not started")
        return self.process

    def _output(self, timeout: float) -> subprocess.CompletedProcess[str]:
        process = self._running()
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate(timeout=30)
            raise
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def summary_of(result: subprocess.CompletedProcess[str], ok: tuple[int, ...] = (0,)) -> \
        dict[str, Any]:
    """The JSON line the oracle printed last; OracleFailed if it broke."""
    lines = result.stdout.strip().splitlines()
    if result.returncode not in ok or not lines:
        raise OracleFailed(f"oracle exited {result.returncode}: {result.stderr[-3000:]}")
    summary: dict[str, Any] = json.loads(lines[-1])
    return summary


def verify_acknowledged(uri: str, journal: Path, timeout: float = 300) -> dict[str, Any]:
    """Judge the region against *journal*; the report (lost, foreign, examples...).
    Does not assert: a report with losses is returned like any other."""
    result = subprocess.run([PYTHON, str(ORACLE), "verify", "--uri", uri,
                             "--journal", str(journal)],
                            capture_output=True, text=True, timeout=timeout, check=False)
    return summary_of(result, ok=(0, 1))

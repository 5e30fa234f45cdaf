"""nbdkit's Python plugin drops a worker thread's Python state after every request unless
the thread pins it (appliance.nbd.threadstate): shown with a real nbdkit, whose one worker
thread counts its requests in a ``threading.local``."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from appliance.nbd.launch import plugin_environment

PLUGIN = """
import threading

import nbdkit

from appliance.nbd.threadstate import pin, pinned

API_VERSION = 2
settings = {"pin": "0"}
local = threading.local()


def config(key, value):
    settings[key] = value


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):
    return 1


def get_size(h):
    return 4096


def pread(h, buf, offset, flags):
    if settings["pin"] == "1":
        pin()
    seen = getattr(local, "calls", 0)
    local.calls = seen + 1
    buf[:16] = seen.to_bytes(8, "big") + pinned().to_bytes(8, "big")
"""

READS = """
import sys
for _ in range(5):
    data = h.pread(16, 0)
    print(int.from_bytes(data[:8], "big"), int.from_bytes(data[8:], "big"))
"""


def requests_seen(tmp_path: Path, pin: bool) -> list[tuple[int, int]]:
    plugin = tmp_path / "counter.py"
    plugin.write_text(PLUGIN)
    sock = tmp_path / f"nbd-{int(pin)}.sock"
    pidfile = tmp_path / f"nbdkit-{int(pin)}.pid"
    log = tmp_path / f"nbdkit-{int(pin)}.log"
    with log.open("wb") as stderr:
        server = subprocess.Popen(
            ["nbdkit", "-f", "--exit-with-parent", "-t", "1", "-U", str(sock), "-P",
             str(pidfile), "python", str(plugin), f"pin={int(pin)}"],
            env=plugin_environment(), stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 30
        while not pidfile.exists():
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "nbdkit did not start in 30 s"
            time.sleep(0.01)
        result = subprocess.run(["/usr/bin/python3", "-m", "nbd", "-u",
                                 f"nbd+unix:///?socket={sock}", "-c", READS],
                                capture_output=True, text=True, check=True, timeout=60)
    finally:
        server.terminate()
        server.wait(timeout=30)
    pairs = [line.split() for line in result.stdout.splitlines()]
    return [(int(calls), int(pinned)) for calls, pinned in pairs]


@pytest.mark.parametrize("pin", [False, True], ids=["unpinned", "pinned"])
def test_a_pinned_worker_keeps_its_python_state(tmp_path: Path, pin: bool) -> None:
    seen = requests_seen(tmp_path, pin)
    if pin:
        # The one worker thread keeps its state: it counts every request before this one,
        # and it pinned once.
        assert seen == [(n, 1) for n in range(5)]
    else:
        # nbdkit's own ensure/release pair gives every request a new thread state.
        assert seen == [(0, 0)] * 5

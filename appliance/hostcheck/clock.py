"""The clock: nodes compare times (node leases, events), so each must be synchronised. The
kernel knows whether a time service has synchronised it (``adjtimex``: ``STA_UNSYNC``,
or the state ``TIME_ERROR``); ``timedatectl``'s NTPSynchronized is read from the same."""

from __future__ import annotations

import ctypes
import ctypes.util

from appliance.hostcheck import processes
from appliance.hostcheck.result import Result, Settings, ok, warn

TIME_ERROR = 5  # adjtimex's return value: the clock is not synchronised
STA_UNSYNC = 0x0040
#: processes that keep the clock synchronised (names as /proc/PID/comm shows them)
TIME_SERVICES = ("chronyd", "ntpd", "systemd-timesyn", "openntpd", "timemaster", "ptp4l")


class Timex(ctypes.Structure):
    """The start of ``struct timex`` (sys/timex.h); the rest is room the kernel may fill."""

    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long),
                ("status", ctypes.c_int), ("rest", ctypes.c_byte * 256)]


def kernel_clock() -> tuple[bool, int]:
    """Whether the kernel counts the clock synchronised, and its maximum error (µs)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    timex = Timex()  # modes 0: read only
    state = libc.adjtimex(ctypes.byref(timex))
    if state < 0:
        raise OSError(ctypes.get_errno(), "adjtimex failed")
    return state != TIME_ERROR and not timex.status & STA_UNSYNC, int(timex.maxerror)


def check_clock(settings: Settings) -> list[Result]:
    synchronised, max_error = kernel_clock()
    services = sorted(processes.running_names() & set(TIME_SERVICES))
    running = f"time service running: {', '.join(services)}" if services else \
        "no time service running (chronyd, ntpd, systemd-timesyncd)"
    if synchronised:
        return [ok("clock", f"synchronised (maximum error {max_error / 1000:.1f} ms); "
                            f"{running}")]
    return [warn("clock", f"not synchronised, says the kernel (adjtimex); {running}: nodes "
                          "compare times (node leases, events), a clock that drifts makes "
                          "them disagree",
                 "run a time service: apt-get install chrony (or systemctl enable --now "
                 "systemd-timesyncd)")]

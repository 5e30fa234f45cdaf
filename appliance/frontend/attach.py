"""Attaching a volume as a local block device.

* With the kernel's ``nbd`` driver: ``nbd-client`` connects ``/dev/nbdX`` to the engine's
  unix socket.
* Without it (this kind of machine has none): ``nbdfuse`` (libnbd's FUSE client, in C)
  exposes the volume as a file, and a loop device turns the file into a block device.
  nbdfuse was chosen over a pyfuse3 file system by measurement: through nbdfuse and a
  direct-I/O loop device, 4 KiB random reads reach ~27k IOPS on this machine (with a C
  backend), while a trivial Python pass-through serves ~20k requests/s, and a pyfuse3 server
  would add that second Python hop in series with the engine. How the device compares with
  the NBD socket it is built on, and why it is set up as it is, see :func:`_attach_fuse`
  (bench/device_bench.py and bench/volume_bench.py measure it).

The FUSE file is the engine's ``frontend`` export, as large as a volume may grow; the loop
device's size limit is the volume's size, raised in place when the volume grows
(:func:`resize`), so a device in use grows without being set up again.

Either way ``/dev/appliance/<volume>`` links to the device. What was set up is recorded in a
small JSON state file, so that detach (possibly from another process) undoes exactly that.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

from appliance.errors import AlreadyExists, FailedPrecondition, StorageIOError, Unavailable
from appliance.nbd.settings import FRONTEND_EXPORT

LINK_DIRECTORY = Path("/dev/appliance")
READY_TIMEOUT = 30.0


def kernel_nbd_available() -> bool:
    if not Path("/sys/module/nbd").exists() and shutil.which("modprobe"):
        subprocess.run(["modprobe", "-q", "nbd"], check=False, capture_output=True)
    return Path("/sys/module/nbd").exists() and shutil.which("nbd-client") is not None


def _run(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise StorageIOError(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def attach(volume: str, nbd_socket: Path, state_file: Path, size: int, *,
           link: bool = True) -> str:
    """Make the volume of *size* bytes served on *nbd_socket* a block device; return its
    path. With *link*, ``/dev/appliance/<volume>`` links to it (not for a device that only
    a frontend such as the iSCSI target uses)."""
    if state_file.exists():
        existing = json.loads(state_file.read_text())
        raise AlreadyExists(f"volume {volume} is already attached at {existing['device']}")
    state: dict[str, Any] = {"volume": volume}
    try:
        if kernel_nbd_available():
            state.update(_attach_kernel(nbd_socket))
        else:
            state.update(_attach_fuse(volume, nbd_socket, state_file, size))
        if link:
            LINK_DIRECTORY.mkdir(mode=0o755, exist_ok=True)
            path = LINK_DIRECTORY / volume
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            path.symlink_to(state["device"])
            state["link"] = str(path)
    except BaseException:
        _undo(state)
        raise
    state_file.write_text(json.dumps(state))
    return str(state["device"])


def _attach_kernel(nbd_socket: Path) -> dict[str, Any]:
    for index in range(64):
        device = Path(f"/dev/nbd{index}")
        if not device.exists():
            break
        if Path(f"/sys/block/nbd{index}/pid").exists():
            continue  # in use
        _run("nbd-client", "-unix", str(nbd_socket), str(device), "-block-size", "4096")
        return {"kind": "kernel-nbd", "device": str(device)}
    raise FailedPrecondition("no free /dev/nbdX device")


def _attach_fuse(volume: str, nbd_socket: Path, state_file: Path, size: int) -> dict[str, Any]:
    """Expose the engine's ``frontend`` export as a file with nbdfuse, and that file as a
    loop device.

    Set up with nbdfuse's defaults and a direct-I/O loop device, on purpose: none of the
    knobs of this path measured better (bench/device_bench.py, 1-replica volume, fio
    libaio direct=1 on the device beside fio's nbd engine on the socket, interleaved; the
    device reached about 50-70 % of the socket's 4K random IOPS at QD64 whatever the
    setting):

    * FUSE ``max_background`` (12; written in fusectl) and nbdfuse's worker threads (10:
      nbdfuse 1.14 runs libfuse's multi-threaded loop with its default cap, and each worker
      waits for its NBD reply, so at most 10 requests are in flight): lifting both to 64
      (the threads with a preloaded shim, for the measurement) left the device's IOPS where
      they were. The queue depth is not the limit.
    * nbdfuse ``-C`` connections (1, the default 4, 8), the loop device's logical sector size
      (4096), its scheduler (none) and ``nr_requests``: no change beyond the noise.
    * A buffered loop device (``--direct-io=off``) serves repeated reads from the FUSE
      file's page cache (a second cache under the filesystem's, which is what the benchmark
      then measures), and does writes one at a time: 4K random writes fell to ~50 %.

    The limit is CPU: on two cores the device path costs 1.5-2x the CPU per 4 KiB I/O of the
    socket path (nbdfuse alone ~75 us, its FUSE worker and its libnbd operations thread
    handing each request over; the engine 1.2-1.8x its per-I/O cost, as requests reach it
    one at a time from several connections instead of batched on one), so the engine gets
    less of the machine. The kernel ``nbd`` driver (:func:`_attach_kernel`) has none of it.

    Durability: the loop device uses direct I/O (no page cache of its own) and declares a
    volatile write cache without FUA, so the block layer turns a FUA write into a write and
    a flush; a flush (fsync on the device or a filesystem's barrier) becomes ``fsync`` of
    the FUSE file, which nbdfuse sends to the engine as an NBD flush. A write acknowledged
    after a flush is durable on the replicas.

    Setting up a direct-I/O loop device flushes the file first (the kernel's
    ``loop_configure`` calls ``vfs_fsync``): ``losetup`` waits for a flush of the whole
    volume, as long as the replicas take to write back their page cache (27-40 s after 1.7-2.3
    GB of writes through the socket, measured here; the flush timeout covers it).
    """
    mountpoint = state_file.with_name(state_file.name + ".fuse")
    _unmount_stale(mountpoint)  # left by an nbdfuse that died (its mount is dead)
    mountpoint.mkdir(mode=0o700, exist_ok=True)
    disk = mountpoint / volume
    # The engine's "frontend" export is as large as the volume may grow; the loop device's
    # size limit is the volume's size, raised when the volume grows (see resize()).
    uri = f"nbd+unix:///{FRONTEND_EXPORT}?socket={nbd_socket}"
    # nbdfuse reports the NBD errors it returns to the kernel on stderr for as long as it
    # runs: they go to a log beside the state file (a pipe nobody reads would lose them).
    log_file = state_file.with_name(state_file.name + ".nbdfuse.log")
    with open(log_file, "ab") as log:
        process = subprocess.Popen(["nbdfuse", str(disk), uri],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=log, start_new_session=True)
    state: dict[str, Any] = {"kind": "fuse-loop", "mountpoint": str(mountpoint),
                             "nbdfuse_pid": process.pid, "nbdfuse_log": str(log_file)}
    deadline = time.monotonic() + READY_TIMEOUT
    while not disk.exists():
        if process.poll() is not None:
            error = log_file.read_text(errors="replace").strip().splitlines()[-5:]
            raise StorageIOError(f"nbdfuse could not attach volume {volume}: "
                                 + " ".join(error))
        if time.monotonic() > deadline:
            state["device"] = ""
            _undo(state)
            raise Unavailable(f"nbdfuse did not expose volume {volume} in time")
        time.sleep(0.05)
    # Direct I/O: the filesystem above caches already; the loop device would cache it again
    # (and, buffered, would write one request at a time).
    state["device"] = _run("losetup", "--find", "--show", "--direct-io=on", "--sizelimit",
                           str(size), str(disk))
    return state


# struct loop_info64 (linux/loop.h): lo_sizelimit is the fifth 64-bit field
LOOP_GET_STATUS64 = 0x4C05
LOOP_SET_STATUS64 = 0x4C04
LOOP_INFO64_SIZE = 232
SIZELIMIT_OFFSET = 32


def resize(state_file: Path, size: int) -> str:
    """Make the attached device *size* bytes, while in use; return the device."""
    if not state_file.exists():
        raise FailedPrecondition("the volume is not attached")
    state = json.loads(state_file.read_text())
    if state.get("kind") != "fuse-loop":
        raise FailedPrecondition(f"a {state.get('kind')} device cannot grow while attached; "
                                 "detach and attach the volume")
    device = str(state["device"])
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        info = bytearray(LOOP_INFO64_SIZE)
        fcntl.ioctl(fd, LOOP_GET_STATUS64, info)
        struct.pack_into("=Q", info, SIZELIMIT_OFFSET, size)
        fcntl.ioctl(fd, LOOP_SET_STATUS64, bytes(info))
        current = os.lseek(fd, 0, os.SEEK_END)
    except OSError as exc:
        raise StorageIOError(f"cannot resize {device}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if current != size:
        raise StorageIOError(f"{device} is {current} bytes after resizing to {size}")
    return device


def owned_device(state_file: Path) -> str | None:
    """The device recorded in *state_file* if it is still the one attach set up (after a
    reboot the same /dev/loopN may be something else's), else None."""
    if not state_file.exists():
        return None
    state = json.loads(state_file.read_text())
    device = str(state.get("device") or "")
    if not device:
        return None
    if state.get("kind") == "fuse-loop":
        name = Path(device).name
        try:
            backing = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
        except OSError:
            return None
        expected = Path(state["mountpoint"]) / str(state.get("volume", ""))
        return device if backing == str(expected) else None
    if state.get("kind") == "kernel-nbd":
        return device if Path(f"/sys/block/{Path(device).name}/pid").exists() else None
    return None


def detach(state_file: Path) -> None:
    """Undo :func:`attach` (nothing to do if the volume is not attached)."""
    if not state_file.exists():
        return
    _undo(json.loads(state_file.read_text()))
    state_file.unlink()


def _undo(state: dict[str, Any]) -> None:
    if state.get("link"):
        link = Path(state["link"])
        # only while it is still ours (another attach of the name may have taken it)
        with contextlib.suppress(OSError):
            if str(link.readlink()) == str(state.get("device")):
                link.unlink()
    if state.get("kind") == "kernel-nbd" and state.get("device"):
        _run("nbd-client", "-d", state["device"])
    if state.get("kind") == "fuse-loop":
        if state.get("device") and _loop_backing(state["device"]) == str(
                Path(state.get("mountpoint", "")) / str(state.get("volume", ""))):
            # (else detached already, by a run that stopped before it recorded so, and
            # maybe set up again by someone else since: not ours to detach)
            _run("losetup", "-d", state["device"])
        if state.get("mountpoint"):
            unmounted = subprocess.run(["fusermount3", "-u", state["mountpoint"]],
                                       check=False, capture_output=True)
            if unmounted.returncode and _mounted(Path(state["mountpoint"])):
                # busy (a loop device whose detach the kernel deferred still holds the
                # file): detached lazily, so that no dead mount stays behind
                subprocess.run(["fusermount3", "-u", "-z", state["mountpoint"]],
                               check=False, capture_output=True)
            _wait_gone(int(state.get("nbdfuse_pid", 0)))
            with contextlib.suppress(OSError):
                Path(state["mountpoint"]).rmdir()


def _loop_backing(device: str) -> str | None:
    """The backing file of loop *device*, or None when it is not set up."""
    try:
        return Path(f"/sys/block/{Path(device).name}/loop/backing_file").read_text().strip()
    except OSError:
        return None


def _mounted(path: Path) -> bool:
    """Whether something is mounted at *path* (dead FUSE mounts included, which
    os.path.ismount cannot see: their stat fails)."""
    wanted = str(path)
    with open("/proc/self/mountinfo") as mounts:
        return any(len(fields) > 4 and fields[4].replace("\\040", " ") == wanted
                   for fields in (line.split() for line in mounts))


def _unmount_stale(mountpoint: Path) -> None:
    if _mounted(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False,
                       capture_output=True)
        if _mounted(mountpoint):
            _run("umount", "-l", str(mountpoint))


def _wait_gone(pid: int) -> None:
    if not pid:
        return
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        try:
            finished, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            finished = pid if not _exists(pid) else 0
        if finished:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True

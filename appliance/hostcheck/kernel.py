"""The kernel: FUSE and loop devices (a volume becomes a block device through them where
there is no ``nbd`` module) and the modules the other paths need (nbd, iscsi_tcp, nfs)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from appliance.hostcheck.result import Result, Settings, fail, ok, warn

FUSE_DEVICE = Path("/dev/fuse")
LOOP_CONTROL = Path("/dev/loop-control")
SYS_MODULE = Path("/sys/module")
LIB_MODULES = Path("/lib/modules")
PROC_FILESYSTEMS = Path("/proc/filesystems")


@dataclass(frozen=True)
class Module:
    """A kernel module the appliance can use: what works with it, what is lost without."""

    name: str
    use: str
    without: str
    remedy: str


MODULES = (
    Module("nbd", "volumes attach as /dev/nbdX (with nbd-client)",
           "volumes attach through nbdfuse and a loop device instead of /dev/nbdX: one more "
           "copy per I/O, slower",
           "boot a kernel with the nbd module (CONFIG_BLK_DEV_NBD, in Debian's and Ubuntu's "
           "stock kernels) and apt-get install nbd-client; the FUSE path works meanwhile"),
    Module("iscsi_tcp", "iSCSI initiators on this node (iscsiadm) can log in to exports",
           "an iSCSI initiator on this node cannot log in to volumes exported over iSCSI "
           "(other machines can)",
           "boot a kernel with iscsi_tcp (CONFIG_ISCSI_TCP) if this node must use iSCSI "
           "exports itself"),
    Module("nfs", "nfs:// backup targets and RWX volumes can be mounted on this node",
           "nfs:// backup targets (mounted with the kernel's client) and RWX volumes (NFS "
           "exports) cannot be mounted on this node; file:// and s3:// targets work",
           "boot a kernel with the NFS client (CONFIG_NFS_FS) and apt-get install nfs-common"),
)


def device_problem(path: Path) -> str | None:
    """Why *path* (a character device) cannot be opened for reading and writing, or None."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return f"{path} does not exist"
    except OSError as exc:
        return f"{path} cannot be opened: {exc.strerror}"
    os.close(fd)
    return None


def module_state(name: str, release: str | None = None, sys_module: Path = SYS_MODULE,
                 lib_modules: Path = LIB_MODULES) -> tuple[bool, str]:
    """Whether module *name* is usable (loaded, built in, or loadable) and how that was
    seen. Loadable means named in ``modules.dep`` of the running kernel, as modprobe finds
    it; a kernel without ``/lib/modules/RELEASE`` can load no module at all."""
    if (sys_module / name).exists():
        return True, "loaded"
    if name == "nfs" and _proc_filesystem("nfs"):
        return True, "in the kernel (/proc/filesystems)"
    directory = lib_modules / (release or os.uname().release)
    if not directory.is_dir():
        return False, f"not loaded; {directory} does not exist, so no module can be loaded"
    for listing, state in (("modules.builtin", "built in"), ("modules.dep", "loadable")):
        try:
            text = (directory / listing).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            path = line.split(":", 1)[0].strip()
            if Path(path).name.split(".ko", 1)[0].replace("-", "_") == name:
                return True, state
    return False, f"not loaded, and not among the modules of {directory}"


def _proc_filesystem(name: str) -> bool:
    try:
        lines = PROC_FILESYSTEMS.read_text().splitlines()
    except OSError:
        return False
    return any(line.split()[-1] == name for line in lines if line.split())


def kernel_nbd_usable() -> bool:
    """Whether volumes can attach as /dev/nbdX: the module and nbd-client are there."""
    return module_state("nbd")[0] and shutil.which("nbd-client") is not None


def check_modules(settings: Settings) -> list[Result]:
    results = []
    for module in MODULES:
        usable, how = module_state(module.name)
        name = f"kernel/{module.name}"
        if usable:
            results.append(ok(name, f"the {module.name} module is {how}: {module.use}"))
        else:
            results.append(warn(name, f"no {module.name} module ({how}). Without it, "
                                      f"{module.without}", module.remedy))
    return results


def device_result(name: str, problem: str | None, needed_for: str, remedy: str,
                  nbd_usable: bool) -> Result:
    """A device the FUSE path needs: missing fails, unless volumes can attach through the
    kernel's nbd driver instead (then only the fallback is lost)."""
    if problem is None:
        return ok(name, f"usable: {needed_for}")
    if nbd_usable:
        return warn(name, f"{problem}; volumes attach through /dev/nbdX, but the FUSE path "
                          "(where nbd is missing or fails) is lost", remedy)
    return fail(name, f"{problem}: {needed_for}, the only way without the kernel's nbd "
                      "driver (and nbd-client): volumes cannot attach as block devices", remedy)


def check_devices(settings: Settings) -> list[Result]:
    nbd_usable = kernel_nbd_usable()
    return [
        device_result("kernel/fuse", device_problem(FUSE_DEVICE),
                      "nbdfuse exposes each attached volume as a FUSE file",
                      "modprobe fuse (a kernel with CONFIG_FUSE_FS); in a container, give it "
                      "/dev/fuse (docker run --device /dev/fuse --cap-add SYS_ADMIN)",
                      nbd_usable),
        device_result("kernel/loop", device_problem(LOOP_CONTROL),
                      "a loop device turns each volume's FUSE file into a block device",
                      "modprobe loop (a kernel with CONFIG_BLK_DEV_LOOP); in a container, "
                      "give it /dev/loop-control and the /dev/loopN devices", nbd_usable),
    ]

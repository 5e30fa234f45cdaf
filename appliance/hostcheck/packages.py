"""Debian packages: those the node cannot run without, and those each optional feature
needs (asked of dpkg in one call)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

from appliance.hostcheck.result import Result, Settings, fail, ok, warn

#: package: what the node uses it for
REQUIRED = {
    "nbdkit": "the engine's NBD server",
    "nbdkit-plugin-python": "nbdkit's Python plugin, which runs the engine",
    "libnbd-bin": "nbdfuse and nbdinfo",
    "fuse3": "fusermount3, for nbdfuse's mounts",
    "qemu-utils": "qemu-img",
    "e2fsprogs": "mkfs.ext4, resize2fs",
    "xfsprogs": "mkfs.xfs, xfs_growfs",
}


@dataclass(frozen=True)
class Feature:
    """Optional packages: what they enable."""

    packages: tuple[str, ...]
    enables: str


OPTIONAL = (
    Feature(("nbd-client",), "volumes attached as /dev/nbdX where the kernel has nbd"),
    Feature(("open-iscsi",), "an iSCSI initiator on this node (iscsiadm)"),
    Feature(("nfs-common",), "the kernel NFS client's tools: nfs:// backup targets"),
    Feature(("tgt",), "the iSCSI frontend (volumes exported over iSCSI)"),
    Feature(("nfs-ganesha", "nfs-ganesha-vfs"), "RWX volumes (NFS exports of a volume)"),
    Feature(("etcd-client",), "etcdctl, to look at a cluster's etcd"),
)


def installed(packages: list[str], timeout: float) -> set[str]:
    """Which of *packages* dpkg says are installed."""
    result = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package}\t${db:Status-Status}\n", *packages],
        capture_output=True, text=True, timeout=timeout, check=False)
    found = set()
    for line in result.stdout.splitlines():
        name, _, status = line.partition("\t")
        if status.strip() == "installed":
            found.add(name.split(":", 1)[0])  # a multiarch name is NAME:ARCH
    return found


def check_packages(settings: Settings) -> list[Result]:
    if shutil.which("dpkg-query") is None:
        return [warn("packages", "dpkg-query is not here (not a Debian or Ubuntu system): "
                     "the packages were not checked",
                     "install the equivalents of: " + " ".join(REQUIRED))]
    names = [*REQUIRED, *(p for feature in OPTIONAL for p in feature.packages)]
    present = installed(names, settings.timeout)
    results = []
    missing = [name for name in REQUIRED if name not in present]
    if missing:
        needs = "; ".join(f"{name}: {REQUIRED[name]}" for name in missing)
        results.append(fail("packages/required", f"not installed: {needs}",
                            f"apt-get install {' '.join(missing)}"))
    else:
        results.append(ok("packages/required", f"installed: {', '.join(REQUIRED)}"))
    for feature in OPTIONAL:
        name = f"packages/{feature.packages[0]}"
        absent = [p for p in feature.packages if p not in present]
        if absent:
            results.append(warn(name, f"not installed (optional): {' '.join(absent)}, for "
                                      f"{feature.enables}",
                                f"apt-get install {' '.join(absent)}, if this node needs it"))
        else:
            results.append(ok(name, f"installed: {feature.enables}"))
    return results

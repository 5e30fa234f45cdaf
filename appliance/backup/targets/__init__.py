"""Backup targets: ``file:///path``, ``nfs://server/export/path`` and
``s3://bucket/prefix?endpoint=URL&region=NAME``, behind one interface (base.ObjectStore).

:func:`parse_target` checks a URL (and changes nothing); :func:`open_target` connects.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, parse_qs, urlsplit

from appliance.backup.targets.base import ObjectStore
from appliance.backup.targets.file import FileStore
from appliance.errors import FailedPrecondition, InvalidArgument, Unavailable

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_HOST = re.compile(r"[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]")


@dataclass(frozen=True)
class TargetSpec:
    scheme: str  # file, nfs, s3
    url: str  # as given (it holds no secret)
    path: str = ""  # file: the directory; nfs: the path inside the export; s3: the prefix
    host: str = ""  # nfs: the server; s3: the bucket
    export: str = ""  # nfs
    endpoint: str | None = None  # s3
    region: str | None = None  # s3


def parse_target(url: str) -> TargetSpec:
    """Check a target URL; raise InvalidArgument naming what is wrong."""
    if not isinstance(url, str) or not url or len(url) > 2048 or any(
            ord(c) < 32 for c in url):
        raise InvalidArgument("a backup target URL is file:///PATH, nfs://SERVER/EXPORT/PATH "
                              "or s3://BUCKET/PREFIX")
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise InvalidArgument(f"invalid target {url!r}: file URLs are file:///ABSOLUTE/PATH")
        if parts.query or parts.fragment:
            raise InvalidArgument(f"invalid target {url!r}: file URLs take no options")
        return TargetSpec("file", url, path=os.path.normpath(parts.path))
    if parts.scheme == "nfs":
        if not parts.hostname or not _HOST.fullmatch(parts.netloc.rsplit("@")[-1]):
            raise InvalidArgument(f"invalid target {url!r}: nfs://SERVER/EXPORT[/PATH]")
        segments = [s for s in parts.path.split("/") if s]
        if not segments or ".." in segments:
            raise InvalidArgument(f"invalid target {url!r}: name the export, "
                                  "nfs://SERVER/EXPORT[/PATH]")
        return TargetSpec("nfs", url, host=parts.netloc, export="/" + segments[0],
                          path="/".join(segments[1:]))
    if parts.scheme == "s3":
        return _parse_s3(url, parts)
    raise InvalidArgument(f"invalid target {url!r}: the scheme must be file, nfs or s3")


def _parse_s3(url: str, parts: SplitResult) -> TargetSpec:
    if parts.username or parts.password:
        raise InvalidArgument("credentials do not belong in the target URL: give them "
                              "with --credentials FILE")
    if not _BUCKET.fullmatch(parts.netloc):
        raise InvalidArgument(f"invalid target {url!r}: {parts.netloc!r} is not a "
                              "bucket name (3-63 of a-z, 0-9, '.', '-')")
    options = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    unknown = sorted(set(options) - {"endpoint", "region"})
    if unknown:
        raise InvalidArgument(f"invalid target {url!r}: unknown option {unknown[0]!r} "
                              "(endpoint, region)")
    endpoint = options.get("endpoint", [None])[-1]
    if endpoint is not None and urlsplit(endpoint).scheme not in ("http", "https"):
        raise InvalidArgument(f"invalid target {url!r}: endpoint must be an http(s) URL")
    prefix = parts.path.strip("/")
    if prefix and ".." in prefix.split("/"):
        raise InvalidArgument(f"invalid target {url!r}: '..' in the prefix")
    return TargetSpec("s3", url, host=parts.netloc, path=prefix, endpoint=endpoint,
                      region=options.get("region", [None])[-1])


def nfs_client_available() -> bool:
    if shutil.which("modprobe"):
        subprocess.run(["modprobe", "-q", "nfs"], capture_output=True, check=False)
    with open("/proc/filesystems") as filesystems:
        kinds = {line.split()[-1] for line in filesystems if line.strip()}
    return bool({"nfs", "nfs4"} & kinds) and shutil.which("mount.nfs") is not None


class NFSStore(FileStore):
    """An NFS export mounted with the kernel client at a private mount point."""

    def __init__(self, spec: TargetSpec) -> None:
        if not nfs_client_available():
            raise FailedPrecondition(
                f"backup target {spec.url}: this machine's kernel has no NFS client (no nfs "
                "in /proc/filesystems, or mount.nfs missing); mount the export yourself and "
                "use a file:// target")
        self.mountpoint = Path(tempfile.mkdtemp(prefix="appliance-nfs-"))
        result = subprocess.run(["mount", "-t", "nfs", "-o", "hard,timeo=600",
                                 f"{spec.host}:{spec.export}", str(self.mountpoint)],
                                capture_output=True, text=True, check=False)
        if result.returncode:
            self.mountpoint.rmdir()
            raise Unavailable(f"backup target {spec.url}: mount failed: "
                              f"{result.stderr.strip()}")
        root = self.mountpoint / spec.path
        try:
            root.mkdir(parents=True, exist_ok=True)
            super().__init__(root, spec.url)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        subprocess.run(["umount", str(self.mountpoint)], capture_output=True, check=False)
        with contextlib.suppress(OSError):
            self.mountpoint.rmdir()


def open_target(spec: TargetSpec, credentials: Path | None = None) -> ObjectStore:
    """Connect to the target; raise a clear error when it cannot be used."""
    if spec.scheme == "file":
        if credentials is not None:
            raise InvalidArgument("a file:// target takes no credentials")
        return FileStore(Path(spec.path), spec.url)
    if spec.scheme == "nfs":
        if credentials is not None:
            raise InvalidArgument("an nfs:// target takes no credentials")
        return NFSStore(spec)
    from appliance.backup.targets.s3 import S3Store, read_credentials  # noqa: PLC0415

    if credentials is None:
        raise InvalidArgument(f"backup target {spec.url} needs --credentials FILE (the AWS "
                              "shared-credentials format)")
    return S3Store(spec.host, spec.path, credentials=read_credentials(credentials),
                   endpoint=spec.endpoint, region=spec.region)


@contextlib.contextmanager
def opened(url: str, credentials: Path | None = None) -> Iterator[ObjectStore]:
    store = open_target(parse_target(url), credentials)
    try:
        yield store
    finally:
        store.close()


__all__ = ["ObjectStore", "TargetSpec", "open_target", "opened", "parse_target"]

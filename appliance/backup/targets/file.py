"""A backup target in a directory: local, or any mounted file system (NFS included).

Objects are files; ``put`` writes a temporary file beside the object, fsyncs it, renames
it into place and fsyncs the directory, so that an object is whole or absent, also after a
crash of this machine or of an NFS server with stable writes.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from appliance.backup.targets.base import ObjectStore, check_name, check_prefix
from appliance.errors import NoSpace, NotFound, StorageIOError, Unavailable

TEMPORARY = ".tmp-"


class FileStore(ObjectStore):
    def __init__(self, root: Path, url: str | None = None) -> None:
        self.root = root
        self.url = url or f"file://{root}"
        if not root.is_dir():
            raise NotFound(f"backup target {self.url}: {root} is not a directory")
        if not os.access(root, os.W_OK | os.X_OK):
            raise Unavailable(f"backup target {self.url}: {root} is not writable")

    def _path(self, name: str) -> Path:
        return self.root / check_name(name)

    def _failed(self, exc: OSError, what: str) -> Exception:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return NoSpace(f"backup target {self.url}: no space to {what}")
        if exc.errno in (errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EHOSTUNREACH):
            return Unavailable(f"backup target {self.url}: cannot {what}: {exc.strerror}")
        return StorageIOError(f"backup target {self.url}: cannot {what}: {exc.strerror}")

    def put(self, name: str, data: bytes) -> None:
        path = self._path(name)
        temporary = path.with_name(f"{TEMPORARY}{path.name}.{os.urandom(6).hex()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            temporary.rename(path)
            directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise self._failed(exc, f"write {name}") from exc

    def get(self, name: str) -> bytes:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"backup target {self.url}: no object {name}") from None
        except IsADirectoryError:
            raise NotFound(f"backup target {self.url}: {name} is a directory") from None
        except OSError as exc:
            raise self._failed(exc, f"read {name}") from exc

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def list(self, prefix: str) -> Iterator[str]:
        base = self.root / check_prefix(prefix) if prefix else self.root
        if not base.is_dir():
            return
        for directory, _subdirectories, files in os.walk(base):
            relative = os.path.relpath(directory, self.root)
            for file in files:
                if not file.startswith(TEMPORARY):
                    yield file if relative == "." else f"{relative}/{file}"

    def delete(self, name: str) -> None:
        try:
            self._path(name).unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise self._failed(exc, f"delete {name}") from exc

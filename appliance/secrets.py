"""Reading shared secrets from files (never from arguments or the environment)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from appliance.errors import FailedPrecondition, InvalidArgument, NotFound

MAX_SECRET = 4096


def read_secret_file(path: str | Path) -> bytes:
    """The secret in *path*, which must be a regular file that only its owner can read
    (mode 0600 or stricter), holding 16 to 4096 bytes (a final newline is dropped)."""
    secret = read_private_file(path, MAX_SECRET + 1).removesuffix(b"\n")
    if not 16 <= len(secret) <= MAX_SECRET:
        raise InvalidArgument(f"secret file {path} must hold 16 to {MAX_SECRET} bytes")
    return secret


def read_private_file(path: str | Path, limit: int) -> bytes:
    """Up to *limit* bytes of *path*, a regular file (not a symlink) that only its owner
    can read."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise NotFound(f"secret file {path} does not exist") from None
    except OSError as exc:
        raise InvalidArgument(f"secret file {path} cannot be opened: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidArgument(f"secret file {path} is not a regular file")
        if info.st_mode & 0o077:
            raise FailedPrecondition(f"secret file {path} can be read by others (mode "
                                     f"{stat.S_IMODE(info.st_mode):04o}); make it 0600")
        return os.read(fd, limit)
    finally:
        os.close(fd)


def write_secret_file(path: str | Path, secret: bytes) -> None:
    """Create *path* (mode 0600) holding *secret*; refuse to replace an existing file
    (:class:`FileExistsError`). The file appears complete or not at all: it is written
    under a temporary name and linked into place."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.write(fd, secret)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)

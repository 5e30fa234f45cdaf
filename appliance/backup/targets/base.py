"""The one interface every backup target implements: whole objects under names.

A name is a relative path of ``/``-separated segments of letters, digits, ``.``, ``_`` and
``-`` (no empty, ``.`` or ``..`` segment). ``put`` is atomic: a reader sees the old object,
the new one, or nothing, never a part. ``list`` takes a prefix that is a directory (empty,
or ending in ``/``) and yields every name below it, in no particular order.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Iterator

from appliance.errors import InvalidArgument

_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*|\.[A-Za-z0-9_][A-Za-z0-9._-]*")


def check_name(name: str) -> str:
    segments = name.split("/")
    if not name or len(name) > 1024 or not all(_SEGMENT.fullmatch(s) for s in segments):
        raise InvalidArgument(f"invalid object name {name[:80]!r}")
    return name


def check_prefix(prefix: str) -> str:
    if prefix and (not prefix.endswith("/") or check_name(prefix[:-1]) is None):
        raise InvalidArgument(f"invalid object prefix {prefix[:80]!r}")
    return prefix


class ObjectStore(abc.ABC):
    """A backup target. Methods block; they raise the appliance's errors: NotFound for a
    missing object, Unavailable when the target cannot be reached, AuthenticationFailed
    when it refuses the credentials, StorageIOError for other failures."""

    #: where it is, for messages (never with credentials)
    url: str

    @abc.abstractmethod
    def put(self, name: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def get(self, name: str) -> bytes: ...

    @abc.abstractmethod
    def exists(self, name: str) -> bool: ...

    @abc.abstractmethod
    def list(self, prefix: str) -> Iterator[str]: ...

    @abc.abstractmethod
    def delete(self, name: str) -> None:
        """Remove the object; nothing happens when it does not exist."""

    def close(self) -> None:  # noqa: B027 - most targets hold nothing
        """Release what the target holds (connections, a mount)."""

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

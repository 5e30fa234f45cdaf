"""A small iSCSI initiator for tests: libiscsi (Debian's libiscsi7) through ctypes.

Synchronous SCSI commands on one session: each write returns only when the target
answered GOOD, so a caller that records what returned knows exactly what was acknowledged.
Every command has a timeout (libiscsi's ``iscsi_set_timeout``): a dead target fails the
call instead of hanging the test.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

BLOCK = 512
GOOD = 0


class IscsiError(Exception):
    pass


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Unmap(ctypes.Structure):
    _fields_ = [("lba", ctypes.c_uint64), ("num", ctypes.c_uint32)]


def _library() -> ctypes.CDLL:
    name = ctypes.util.find_library("iscsi") or "libiscsi.so.7"
    lib = ctypes.CDLL(name)
    p, i, u32, u64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_uint64
    signatures: dict[str, tuple[Any, list[Any]]] = {
        "iscsi_create_context": (p, [ctypes.c_char_p]),
        "iscsi_destroy_context": (i, [p]),
        "iscsi_get_error": (ctypes.c_char_p, [p]),
        "iscsi_set_targetname": (i, [p, ctypes.c_char_p]),
        "iscsi_set_session_type": (i, [p, i]),
        "iscsi_set_initiator_username_pwd": (i, [p, ctypes.c_char_p, ctypes.c_char_p]),
        "iscsi_set_target_username_pwd": (i, [p, ctypes.c_char_p, ctypes.c_char_p]),
        "iscsi_set_timeout": (i, [p, i]),
        "iscsi_full_connect_sync": (i, [p, ctypes.c_char_p, i]),
        "iscsi_logout_sync": (i, [p]),
        "iscsi_write16_sync": (p, [p, i, u64, ctypes.c_char_p, u32, i, i, i, i, i, i]),
        "iscsi_read16_iov_sync": (p, [p, i, u64, u32, i, i, i, i, i, i,
                                      ctypes.POINTER(_Iovec), i]),
        "iscsi_synchronizecache16_sync": (p, [p, i, u64, u32, i, i]),
        "iscsi_unmap_sync": (p, [p, i, i, i, ctypes.POINTER(_Unmap), i]),
        "scsi_free_scsi_task": (None, [p]),
    }
    for function, (result, arguments) in signatures.items():
        getattr(lib, function).restype = result
        getattr(lib, function).argtypes = arguments
    return lib


_LIB: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    global _LIB  # noqa: PLW0603 - loaded once
    if _LIB is None:
        _LIB = _library()
    return _LIB


class IscsiClient:
    """A logged-in session to LUN *lun* of target *iqn* on *portal* (``HOST:PORT``)."""

    def __init__(self, portal: str, iqn: str, user: str | None, secret: str | None, *,
                 lun: int = 1, initiator: str = "iqn.2026-12.test.appliance:client",
                 mutual: tuple[str, str] | None = None, timeout: int = 60) -> None:
        self.lib = lib()
        self.lun = lun
        self.context = self.lib.iscsi_create_context(initiator.encode())
        if not self.context:
            raise IscsiError("cannot create an iSCSI context")
        try:
            self.lib.iscsi_set_targetname(self.context, iqn.encode())
            self.lib.iscsi_set_session_type(self.context, 2)  # normal
            if user is not None and secret is not None:
                self.lib.iscsi_set_initiator_username_pwd(self.context, user.encode(),
                                                          secret.encode())
            if mutual is not None:
                self.lib.iscsi_set_target_username_pwd(self.context, mutual[0].encode(),
                                                       mutual[1].encode())
            self.lib.iscsi_set_timeout(self.context, timeout)
            if self.lib.iscsi_full_connect_sync(self.context, portal.encode(), lun):
                raise IscsiError(f"login to {iqn} failed: {self.error()}")
        except BaseException:
            self.lib.iscsi_destroy_context(self.context)
            self.context = None
            raise

    def error(self) -> str:
        message = self.lib.iscsi_get_error(self.context)
        return message.decode(errors="replace") if message else "unknown error"

    def _finish(self, task: int | None, what: str) -> None:
        if not task:
            raise IscsiError(f"{what}: {self.error()}")
        status = ctypes.cast(task, ctypes.POINTER(ctypes.c_int))[0]
        self.lib.scsi_free_scsi_task(task)
        if status != GOOD:
            raise IscsiError(f"{what}: SCSI status {status}: {self.error()}")

    def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        assert offset % BLOCK == 0 and len(data) % BLOCK == 0
        task = self.lib.iscsi_write16_sync(self.context, self.lun, offset // BLOCK, data,
                                           len(data), BLOCK, 0, 0, int(fua), 0, 0)
        self._finish(task, f"WRITE(16) at {offset}")

    def read(self, offset: int, length: int) -> bytes:
        assert offset % BLOCK == 0 and length % BLOCK == 0
        buffer = ctypes.create_string_buffer(length)
        iov = _Iovec(ctypes.cast(buffer, ctypes.c_void_p), length)
        task = self.lib.iscsi_read16_iov_sync(self.context, self.lun, offset // BLOCK, length,
                                              BLOCK, 0, 0, 0, 0, 0, ctypes.byref(iov), 1)
        self._finish(task, f"READ(16) at {offset}")
        return buffer.raw

    def flush(self) -> None:
        task = self.lib.iscsi_synchronizecache16_sync(self.context, self.lun, 0, 0, 0, 0)
        self._finish(task, "SYNCHRONIZE CACHE(16)")

    def unmap(self, offset: int, length: int) -> None:
        assert offset % BLOCK == 0 and length % BLOCK == 0
        ranges = (_Unmap * 1)(_Unmap(offset // BLOCK, length // BLOCK))
        task = self.lib.iscsi_unmap_sync(self.context, self.lun, 0, 0, ranges, 1)
        self._finish(task, f"UNMAP at {offset}")

    def close(self) -> None:
        if self.context:
            self.lib.iscsi_logout_sync(self.context)
            self.lib.iscsi_destroy_context(self.context)
            self.context = None

    def __enter__(self) -> IscsiClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

"""A small NFSv4 client for tests: libnfs 4.0 (Debian's libnfs13) through ctypes, also
run as a program (``python -m tests.nfsclient write|check URL PREFIX SEED``) in other
network namespaces.

libnfs 4.0 speaks NFSv4.0 (``?version=4``) and sends at most 3936 bytes per NFSv4 WRITE
(it encodes each COMPOUND into a buffer of about 4 KiB): files are written in 3 KiB
pwrites at increasing offsets; reads have no such limit. Its ``O_CREAT`` over NFSv4 is an
exclusive create.
"""

from __future__ import annotations

import ctypes
import os
import random
import sys

CHUNK = 3072  # bytes per NFSv4 WRITE: libnfs 4.0 cannot send more than 3936
MIB = 1 << 20


class NFSURL(ctypes.Structure):
    _fields_ = [("server", ctypes.c_char_p), ("path", ctypes.c_char_p),
                ("file", ctypes.c_char_p)]


def libnfs() -> ctypes.CDLL:
    lib = ctypes.CDLL("libnfs.so.13")
    handle, context = ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p
    lib.nfs_init_context.restype = context
    lib.nfs_destroy_context.argtypes = [context]
    lib.nfs_set_timeout.argtypes = [context, ctypes.c_int]
    lib.nfs4_set_client_name.argtypes = [context, ctypes.c_char_p]
    lib.nfs_get_error.restype = ctypes.c_char_p
    lib.nfs_get_error.argtypes = [context]
    lib.nfs_parse_url_dir.restype = ctypes.POINTER(NFSURL)
    lib.nfs_parse_url_dir.argtypes = [context, ctypes.c_char_p]
    lib.nfs_destroy_url.argtypes = [ctypes.POINTER(NFSURL)]
    lib.nfs_mount.argtypes = [context, ctypes.c_char_p, ctypes.c_char_p]
    lib.nfs_create.argtypes = [context, ctypes.c_char_p, ctypes.c_int, ctypes.c_int, handle]
    lib.nfs_open.argtypes = [context, ctypes.c_char_p, ctypes.c_int, handle]
    lib.nfs_pwrite.argtypes = [context, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64,
                               ctypes.c_char_p]
    lib.nfs_pread.argtypes = [context, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64,
                              ctypes.c_char_p]
    lib.nfs_fsync.argtypes = [context, ctypes.c_void_p]
    lib.nfs_close.argtypes = [context, ctypes.c_void_p]
    return lib


class Client:
    """One NFSv4 mount of ``nfs://ADDRESS/PSEUDO?version=4&nfsport=PORT`` (one TCP
    connection, one NFSv4 client id).

    Each gets a name of its own: libnfs names a client "Libnfs pid:PID TIME", the same for two
    mounts a process makes within a second, and a server takes a second SETCLIENTID of a name
    with a new verifier for a client that rebooted, expiring the first one's state (its
    next OPEN fails with NFS4ERR_EXPIRED)."""

    def __init__(self, url: str) -> None:
        self.lib = libnfs()
        self.context = self.lib.nfs_init_context()
        self.lib.nfs_set_timeout(self.context, 10_000)  # ms: no call waits forever
        name = f"appliance-test {os.getpid()} {os.urandom(8).hex()}"
        self.lib.nfs4_set_client_name(self.context, name.encode())
        parsed = self.lib.nfs_parse_url_dir(self.context, url.encode())
        if not parsed:
            self.close()
            raise OSError(f"bad URL {url}")
        try:
            self.check(self.lib.nfs_mount(self.context, parsed.contents.server,
                                          parsed.contents.path), f"mount {url}")
        except OSError:
            self.close()
            raise
        finally:
            self.lib.nfs_destroy_url(parsed)

    def check(self, result: int, what: str) -> int:
        if result < 0:
            raise OSError(f"{what}: {self.lib.nfs_get_error(self.context).decode()}")
        return result

    def write(self, name: str, data: bytes) -> None:
        handle = ctypes.c_void_p()
        self.check(self.lib.nfs_create(self.context, f"/{name}".encode(), os.O_WRONLY, 0o644,
                                       ctypes.byref(handle)), f"create {name}")
        try:
            for offset in range(0, len(data), CHUNK):
                piece = data[offset:offset + CHUNK]
                written = self.check(self.lib.nfs_pwrite(self.context, handle, offset,
                                                         len(piece), piece), f"write {name}")
                assert written == len(piece), f"short write of {name} at {offset}"
            self.check(self.lib.nfs_fsync(self.context, handle), f"fsync {name}")
        finally:
            self.lib.nfs_close(self.context, handle)

    def read(self, name: str, size: int) -> bytes:
        handle = ctypes.c_void_p()
        self.check(self.lib.nfs_open(self.context, f"/{name}".encode(), os.O_RDONLY,
                                     ctypes.byref(handle)), f"open {name}")
        try:
            buffer = ctypes.create_string_buffer(size + 1)
            got = self.check(self.lib.nfs_pread(self.context, handle, 0, size + 1, buffer),
                             f"read {name}")
            return buffer.raw[:got]
        finally:
            self.lib.nfs_close(self.context, handle)

    def close(self) -> None:
        if self.context:
            self.lib.nfs_destroy_context(self.context)
            self.context = None


def content(seed: int, size: int = MIB) -> bytes:
    return random.Random(seed).randbytes(size)



# -- the client program (run in a network namespace) ---------------------------------------

def main(argv: list[str]) -> int:
    """``write URL PREFIX SEED [COUNT]``: write PREFIX0 ... (COUNT files, default 2, 1 MiB
    each, from SEED*1000+i), printing each name once it is written and synced;
    ``check URL PREFIX SEED [COUNT]``: read them back and compare."""
    command, address, prefix, seed = argv[0], argv[1], argv[2], int(argv[3])
    count = int(argv[4]) if len(argv) > 4 else 2
    client = Client(address)
    try:
        for index in range(count):
            name, data = f"{prefix}{index}", content(seed * 1000 + index)
            if command == "write":
                client.write(name, data)
                print(f"written {name}", flush=True)
            elif client.read(name, MIB) != data:
                print(f"{name} differs")
                return 1
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

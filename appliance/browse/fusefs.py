"""A read-only FUSE file system (pyfuse3, on trio) holding one file, ``disk.img``: the
bytes of an :class:`~appliance.browse.images.Image`. The kernel's page cache is kept across
opens (the content never changes), and reads run in worker threads, many at once."""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from typing import Any

import pyfuse3
import trio

from appliance.browse.images import Image
from appliance.errors import ApplianceError

log = logging.getLogger(__name__)
FILE_NAME = b"disk.img"
FILE_INODE = pyfuse3.ROOT_INODE + 1
TIMEOUT = 3600.0  # seconds the kernel may keep names and attributes: they never change


class ImageFS(pyfuse3.Operations):
    def __init__(self, image: Image) -> None:
        super().__init__()
        self.image = image
        self.started = time.time_ns()
        self.errors = 0

    def _attributes(self, inode: int) -> Any:
        attributes = pyfuse3.EntryAttributes()
        attributes.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            attributes.st_mode = stat.S_IFDIR | 0o555
            attributes.st_nlink = 2
        elif inode == FILE_INODE:
            attributes.st_mode = stat.S_IFREG | 0o444
            attributes.st_nlink = 1
            attributes.st_size = self.image.size
            attributes.st_blocks = -(-self.image.size // 512)
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attributes.st_blksize = 1 << 20
        attributes.st_atime_ns = attributes.st_mtime_ns = attributes.st_ctime_ns = \
            self.started
        attributes.attr_timeout = attributes.entry_timeout = TIMEOUT
        return attributes

    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self._attributes(inode)

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        if parent_inode == pyfuse3.ROOT_INODE and name == FILE_NAME:
            return self._attributes(FILE_INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, FILE_NAME, self._attributes(FILE_INODE), 1)

    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            data: bytes = await trio.to_thread.run_sync(self.image.read, off, size)
        except ApplianceError as exc:
            self.errors += 1
            log.error("read of %d bytes at %d failed: %s", size, off, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        return data

    async def statfs(self, ctx: Any) -> Any:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_blocks = -(-self.image.size // 4096)
        data.f_files = 2
        data.f_namemax = 255
        return data


async def serve(image: Image, mountpoint: str, ready: Any) -> None:
    """Mount the file system at *mountpoint* and serve it until it is unmounted or this
    task is cancelled (which unmounts it); *ready* is called once it is mounted."""
    options = set(pyfuse3.default_options) | {"ro", "fsname=appliance-browse",
                                               "subtype=appliance"}
    pyfuse3.init(ImageFS(image), mountpoint, options)
    try:
        ready()
        await pyfuse3.main(min_tasks=4, max_tasks=32)
    finally:
        pyfuse3.close(unmount=True)

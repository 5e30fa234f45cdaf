"""The nbdkit plugin: nbdkit runs this file with its embedded Python (PARALLEL threads).

Thin on purpose: it collects the ``key=value`` parameters, starts the engine service after
nbdkit forked, and maps each NBD callback to the engine, translating errors once: an
:class:`~appliance.errors.ApplianceError` becomes the errno the NBD client sees. Each data
callback first pins its thread's Python thread state (:mod:`appliance.nbd.threadstate`), which
nbdkit would otherwise create and destroy around every request.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import nbdkit  # type: ignore[import-not-found]

from appliance.errors import ApplianceError
from appliance.nbd.engine_service import EngineService
from appliance.nbd.failure import report_start_failure
from appliance.nbd.settings import FRONTEND_EXPORT, FRONTEND_SIZE, EngineSettings
from appliance.nbd.threadstate import pin
from appliance.replication.engine import Engine

API_VERSION = 2
_parameters: list[tuple[str, str]] = []
_settings: EngineSettings | None = None
_service: EngineService | None = None


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def config(key: str, value: str) -> None:
    _parameters.append((key, value))


def config_complete() -> None:
    global _settings  # noqa: PLW0603 - nbdkit's plugin model is module state
    _settings = EngineSettings.from_parameters(_parameters)


def after_fork() -> None:
    global _service  # noqa: PLW0603
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    assert _settings is not None
    try:
        _service = EngineService(_settings, nbdkit.shutdown)
        _service.start()
    except ApplianceError as exc:
        # A refusal (or a failure) to start: one line in the log, the error for the
        # launcher beside the control socket, and no serving of a volume we do not have.
        logging.getLogger("appliance.nbd").error("the engine did not start: %s", exc)
        report_start_failure(_settings.start_failure_file, exc)
        logging.shutdown()
        os._exit(1)


def cleanup() -> None:
    if _service is not None:
        _service.stop()


class FrontendView:
    """The handle of the ``frontend`` export (what a local block device is attached
    through): FRONTEND_SIZE bytes, of which the volume's size is real. The device above is
    limited to the volume's size and grows when the volume does, on the same connection.
    Reads beyond the volume read zeros; writes there fail (the device never sends any).

    A trim here makes the range read zeros (it is the engine's zero): the device above is
    a loop device over nbdfuse's file, where the kernel's "zero this range, unmapping
    allowed" (``fallocate(PUNCH_HOLE)`` on the device, ext4's zero-out of unwritten
    extents, an iSCSI UNMAP through tgt, which promises LBPRZ) becomes a punched hole in
    the file, which nbdfuse sends as an NBD trim. An NBD trim may leave anything behind (the
    engine's leaves a snapshot's data and partial blocks); a punched hole must read zeros.
    Discards arrive the same way and cannot be told apart: they get zeros too, which costs
    written zero blocks only where a snapshot below holds data."""

    size = FRONTEND_SIZE

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.write, self.zero = engine.write, engine.zero
        self.flush = engine.flush

    def trim(self, offset: int, length: int) -> None:
        self.engine.zero(offset, length)

    def read(self, buf: memoryview, offset: int) -> None:
        engine = self.engine
        if offset + len(buf) <= engine.size:  # always, from the device above
            engine.read(buf, offset)
            return
        inside = max(0, engine.size - offset)
        if inside:
            self.engine.read(buf[:inside], offset)
        buf[inside:] = bytes(len(buf) - inside)

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        inside = min(length, max(0, self.engine.size - offset))
        found = self.engine.extents(offset, inside) if inside else []
        if inside < length:
            found.append((offset + inside, length - inside, False))
        return found


Handle = Engine | FrontendView


def open(readonly: bool) -> Handle:  # nbdkit calls it by this name
    assert _service is not None
    if nbdkit.export_name() == FRONTEND_EXPORT:
        return FrontendView(_service.engine)
    return _service.engine


def get_size(h: Handle) -> int:
    return h.size


def block_size(h: Handle) -> tuple[int, int, int]:
    return 1, 4096, 32 << 20


def can_write(h: Handle) -> bool:
    return True


def can_flush(h: Handle) -> bool:
    return True


def can_trim(h: Handle) -> bool:
    return True


def can_zero(h: Handle) -> bool:
    return True


def can_fast_zero(h: Handle) -> bool:
    return True


def can_fua(h: Handle) -> int:
    return int(nbdkit.FUA_NATIVE)


def can_multi_conn(h: Handle) -> bool:
    return True  # one engine serves every connection; a flush covers them all


def can_extents(h: Handle) -> bool:
    return True


def is_rotational(h: Handle) -> bool:
    return False


def _failed(exc: ApplianceError) -> None:
    nbdkit.set_error(exc.errno)


def pread(h: Handle, buf: Any, offset: int, flags: int) -> None:
    pin()
    try:
        h.read(memoryview(buf), offset)
    except ApplianceError as exc:
        _failed(exc)
        raise


def pwrite(h: Handle, buf: Any, offset: int, flags: int) -> None:
    pin()
    try:
        h.write(memoryview(buf), offset, fua=bool(flags & nbdkit.FLAG_FUA))
    except ApplianceError as exc:
        _failed(exc)
        raise


def zero(h: Handle, count: int, offset: int, flags: int) -> None:
    pin()
    try:
        h.zero(offset, count, fua=bool(flags & nbdkit.FLAG_FUA))
    except ApplianceError as exc:
        _failed(exc)
        raise


def trim(h: Handle, count: int, offset: int, flags: int) -> None:
    pin()
    try:
        h.trim(offset, count)
        if flags & nbdkit.FLAG_FUA:
            h.flush()
    except ApplianceError as exc:
        _failed(exc)
        raise


def flush(h: Handle, flags: int) -> None:
    pin()
    try:
        h.flush()
    except ApplianceError as exc:
        _failed(exc)
        raise


def extents(h: Handle, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    pin()
    try:
        found = h.extents(offset, count)
    except ApplianceError as exc:
        _failed(exc)
        raise
    hole = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO
    return [(start, length, 0 if allocated else hole) for start, length, allocated in found]

"""The nbdkit plugin: nbdkit runs this file with its embedded Python (PARALLEL threads).

Thin on purpose: it collects the ``key=value`` parameters, starts the engine service after
nbdkit forked, and maps each NBD callback to the engine, translating errors once: an
:class:`~appliance.errors.ApplianceError` becomes the errno the NBD client sees.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import nbdkit  # type: ignore[import-not-found]

from appliance.errors import ApplianceError
from appliance.nbd.service import EngineService
from appliance.nbd.settings import EngineSettings
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
    _service = EngineService(_settings, nbdkit.shutdown)
    _service.start()


def cleanup() -> None:
    if _service is not None:
        _service.stop()


def open(readonly: bool) -> Engine:  # nbdkit calls it by this name
    assert _service is not None
    return _service.engine


def get_size(h: Engine) -> int:
    return h.size


def block_size(h: Engine) -> tuple[int, int, int]:
    return 1, 4096, 32 << 20


def can_write(h: Engine) -> bool:
    return True


def can_flush(h: Engine) -> bool:
    return True


def can_trim(h: Engine) -> bool:
    return True


def can_zero(h: Engine) -> bool:
    return True


def can_fast_zero(h: Engine) -> bool:
    return True


def can_fua(h: Engine) -> int:
    return int(nbdkit.FUA_NATIVE)


def can_multi_conn(h: Engine) -> bool:
    return True  # one engine serves every connection; a flush covers them all


def can_extents(h: Engine) -> bool:
    return True


def is_rotational(h: Engine) -> bool:
    return False


def _failed(exc: ApplianceError) -> None:
    nbdkit.set_error(exc.errno)


def pread(h: Engine, buf: Any, offset: int, flags: int) -> None:
    try:
        h.read(memoryview(buf), offset)
    except ApplianceError as exc:
        _failed(exc)
        raise


def pwrite(h: Engine, buf: Any, offset: int, flags: int) -> None:
    try:
        h.write(memoryview(buf), offset, fua=bool(flags & nbdkit.FLAG_FUA))
    except ApplianceError as exc:
        _failed(exc)
        raise


def zero(h: Engine, count: int, offset: int, flags: int) -> None:
    try:
        h.zero(offset, count, fua=bool(flags & nbdkit.FLAG_FUA))
    except ApplianceError as exc:
        _failed(exc)
        raise


def trim(h: Engine, count: int, offset: int, flags: int) -> None:
    try:
        h.trim(offset, count)
        if flags & nbdkit.FLAG_FUA:
            h.flush()
    except ApplianceError as exc:
        _failed(exc)
        raise


def flush(h: Engine, flags: int) -> None:
    try:
        h.flush()
    except ApplianceError as exc:
        _failed(exc)
        raise


def extents(h: Engine, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    try:
        found = h.extents(offset, count)
    except ApplianceError as exc:
        _failed(exc)
        raise
    hole = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO
    return [(start, length, 0 if allocated else hole) for start, length, allocated in found]

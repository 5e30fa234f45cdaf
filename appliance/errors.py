"""The appliance's one exception hierarchy.

Every error a user can meet is an :class:`ApplianceError`. Each class knows how it is shown
at every edge of the product, so that each edge translates errors exactly once:

* ``exit_code``: the CLI's process exit status (0 ok, 1 operation failed, 2 bad input);
* ``errno``: what an NBD client sees when a data-path request fails;
* ``http_status``: the REST API's status code;
* ``grpc_status``: the name of the ``grpc.StatusCode`` the CSI plugin answers with (a name, so
  that this module imports no framework);
* ``code``: a short machine-readable identifier for API clients.

:class:`Corruption` marks damaged data or metadata: never a user mistake, always worth a
report. Exceptions that are not ``ApplianceError`` are bugs and are shown with a traceback.
"""

from __future__ import annotations

import errno as _errno


class ApplianceError(Exception):
    """An operation failed."""

    exit_code = 1
    errno = _errno.EIO
    http_status = 500
    grpc_status = "INTERNAL"
    code = "failed"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or self.__class__.__name__).strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


class UsageError(ApplianceError):
    """Bad input: nothing was changed."""

    exit_code = 2
    errno = _errno.EINVAL
    http_status = 400
    grpc_status = "INVALID_ARGUMENT"
    code = "invalid-argument"


class InvalidArgument(UsageError):
    """An argument is malformed or out of range."""


class NotFound(UsageError):
    """A named object does not exist."""

    errno = _errno.ENOENT
    http_status = 404
    grpc_status = "NOT_FOUND"
    code = "not-found"


class OutOfRange(InvalidArgument):
    """A size or range is outside what the object allows."""

    grpc_status = "OUT_OF_RANGE"
    code = "out-of-range"


class AlreadyExists(UsageError):
    """An object with that name already exists."""

    errno = _errno.EEXIST
    http_status = 409
    grpc_status = "ALREADY_EXISTS"
    code = "already-exists"


class FailedPrecondition(ApplianceError):
    """The object is not in a state that allows the operation."""

    errno = _errno.EBUSY
    http_status = 409
    grpc_status = "FAILED_PRECONDITION"
    code = "failed-precondition"


class Diverged(FailedPrecondition):
    """Replicas of a volume hold diverged histories: each may have writes the other lacks,
    and only an operator may choose which one serves."""

    code = "diverged"


class Busy(FailedPrecondition):
    """The object is in use by another process."""

    code = "busy"


class ReadOnly(FailedPrecondition):
    """The object was opened read-only."""

    errno = _errno.EROFS
    code = "read-only"


class LimitExceeded(UsageError):
    """A configured or format limit would be exceeded."""

    errno = _errno.EFBIG
    grpc_status = "RESOURCE_EXHAUSTED"
    code = "limit-exceeded"


class NoSpace(ApplianceError):
    """The storage holding the data is full."""

    errno = _errno.ENOSPC
    http_status = 507
    grpc_status = "RESOURCE_EXHAUSTED"
    code = "no-space"


class StorageIOError(ApplianceError):
    """The storage holding the data failed an I/O."""

    code = "io-error"
    grpc_status = "UNAVAILABLE"


class Corruption(ApplianceError):
    """Data or metadata is damaged."""

    http_status = 500
    grpc_status = "DATA_LOSS"
    code = "corruption"


def from_os_error(exc: OSError, what: str) -> ApplianceError:
    """Translate an ``OSError`` met while doing *what* into the hierarchy.

    The caller chains the original (``raise from_os_error(e, ...) from e``) so no detail is lost.
    """
    reason = exc.strerror or str(exc)
    if exc.errno in (_errno.ENOSPC, _errno.EDQUOT):
        return NoSpace(f"{what}: no space left on the device")
    if exc.errno == _errno.ENOENT:
        return NotFound(f"{what}: {reason}")
    if exc.errno in (_errno.EACCES, _errno.EPERM):
        return FailedPrecondition(f"{what}: {reason}")
    if exc.errno == _errno.EROFS:
        return ReadOnly(f"{what}: read-only filesystem")
    error = StorageIOError(f"{what}: {reason}")
    if exc.errno is not None:
        error.errno = exc.errno
    return error


class AuthenticationFailed(ApplianceError):
    """The peer could not prove it holds the shared secret."""

    errno = _errno.EACCES
    http_status = 401
    grpc_status = "UNAUTHENTICATED"
    code = "unauthenticated"


class StaleSession(FailedPrecondition):
    """A newer engine session owns the replica (DESIGN invariant 4)."""

    errno = _errno.ESTALE
    code = "stale-session"


class Pending(FailedPrecondition):
    """Another operation on the same object is in progress: try again when it ended."""

    grpc_status = "ABORTED"
    code = "pending"


class AddressInUse(FailedPrecondition):
    """A network address (a replica server's port) is taken by another program."""

    errno = _errno.EADDRINUSE
    code = "address-in-use"


class Cancelled(ApplianceError):
    """Long work (a backup, a restore, a scrub) was asked to stop, and stopped; what it
    did not finish is not visible."""

    code = "cancelled"


class Unavailable(ApplianceError):
    """A peer did not answer in time or the connection to it broke."""

    errno = _errno.EIO
    http_status = 503
    grpc_status = "UNAVAILABLE"
    code = "unavailable"


class ProtocolError(ApplianceError):
    """A peer sent a malformed message: a bug or a damaged connection."""

    code = "protocol-error"


def error_class(code: str) -> type[ApplianceError]:
    """The most general error class with the machine-readable *code* (for errors that
    crossed a process boundary as their code and message)."""
    pending: list[type[ApplianceError]] = [ApplianceError]
    while pending:
        cls = pending.pop(0)
        if cls.code == code:
            return cls
        pending.extend(cls.__subclasses__())
    return ApplianceError


class Conflict(FailedPrecondition):
    """The object changed since it was read (a compare-and-swap failed)."""

    http_status = 409
    grpc_status = "ABORTED"
    code = "conflict"

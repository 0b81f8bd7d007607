"""The FUSE edge's error rule: only FUSEError leaves a handler
(``fuse_errors`` maps every other exception to an errno, and logs what is
not expected), and entry names are checked the same way everywhere."""
from __future__ import annotations

import errno
import functools
import logging
from typing import Any, Awaitable, Callable, TypeVar

from kvfs.errors import CapacityError, InvalidArgument, InvalidKey, KvfsError, NotFound

from . import fuse_types as ft

log = logging.getLogger("kvfsd.fuse")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def errno_of(e: BaseException, what: str) -> int:
    """The errno a request that failed with ``e`` answers (``what`` names
    the request in the log, for what is not expected)."""
    if isinstance(e, ft.FUSEError):
        return int(e.errno)
    if isinstance(e, NotFound):
        return errno.ENOENT
    if isinstance(e, (InvalidKey, InvalidArgument)):
        return errno.EINVAL
    if isinstance(e, CapacityError):
        return errno.ENOSPC
    if isinstance(e, OSError):
        return e.errno or errno.EIO
    if isinstance(e, KvfsError):
        log.warning("%s: %s", what, e)
        return errno.EIO
    # a bug must not take the mount down
    log.error("internal error in FUSE %s", what, exc_info=(type(e), e, e.__traceback__))
    return errno.EIO


def fuse_errors(fn: F) -> F:
    """Only FUSEError may leave a handler."""
    @functools.wraps(fn)
    async def wrapper(*a: Any, **kw: Any) -> Any:
        try:
            return await fn(*a, **kw)
        except ft.FUSEError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ft.FUSEError(errno_of(e, fn.__name__)) from None
    return wrapper  # type: ignore[return-value]


def entry_name(raw: bytes) -> str:
    if len(raw) > 255:
        raise ft.FUSEError(errno.ENAMETOOLONG)
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise ft.FUSEError(errno.EINVAL) from None

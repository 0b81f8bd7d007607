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


def fuse_errors(fn: F) -> F:
    """Only FUSEError may leave a handler."""
    @functools.wraps(fn)
    async def wrapper(*a: Any, **kw: Any) -> Any:
        try:
            return await fn(*a, **kw)
        except ft.FUSEError:
            raise
        except NotFound:
            raise ft.FUSEError(errno.ENOENT) from None
        except (InvalidKey, InvalidArgument):
            raise ft.FUSEError(errno.EINVAL) from None
        except CapacityError:
            raise ft.FUSEError(errno.ENOSPC) from None
        except OSError as e:
            raise ft.FUSEError(e.errno or errno.EIO) from None
        except KvfsError as e:
            log.warning("%s: %s", fn.__name__, e)
            raise ft.FUSEError(errno.EIO) from None
        except Exception:  # noqa: BLE001 - a bug must not take the mount down
            log.exception("internal error in FUSE %s", fn.__name__)
            raise ft.FUSEError(errno.EIO) from None
    return wrapper  # type: ignore[return-value]


def entry_name(raw: bytes) -> str:
    if len(raw) > 255:
        raise ft.FUSEError(errno.ENAMETOOLONG)
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise ft.FUSEError(errno.EINVAL) from None

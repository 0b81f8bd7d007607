"""The kvfs exception hierarchy.

One root, :class:`KvfsError`; each subclass says what happened and what the
caller can do about it. The daemon sends errors as ``(code, message, extra)``
and the client turns the code back into the same class, so a caller sees the
same exception whether the failure happened locally or in the daemon.
"""
from __future__ import annotations

from typing import Any


class KvfsError(Exception):
    """Root of every kvfs error."""

    code = "error"

    def to_wire(self) -> tuple[str, str, dict[str, Any]]:
        return (self.code, str(self), {})


class NotFound(KvfsError, KeyError):
    """The key is not in the store (or its bytes failed verification twice)."""

    code = "not_found"

    def __str__(self) -> str:  # KeyError quotes its message; we don't want that
        return Exception.__str__(self)


class InvalidKey(KvfsError, ValueError):
    """A key or namespace breaks the key rules (see kvfs.keys)."""

    code = "invalid_key"


class InvalidArgument(KvfsError, ValueError):
    """An argument has the wrong type, size or value (e.g. meta over 4 KiB)."""

    code = "invalid_argument"


class CapacityError(KvfsError):
    """The store cannot make room: the value is larger than the capacity, or
    everything that could be evicted is leased, or the disk is full."""

    code = "capacity"

    def __init__(self, message: str, *, needed: int = 0, capacity: int = 0, used: int = 0):
        super().__init__(message)
        self.needed = needed
        self.capacity = capacity
        self.used = used

    def to_wire(self) -> tuple[str, str, dict[str, Any]]:
        return (self.code, str(self), {"needed": self.needed, "capacity": self.capacity, "used": self.used})


class ProtocolError(KvfsError):
    """A frame or message broke the wire protocol (client or daemon bug, or
    client and daemon of different versions)."""

    code = "protocol"


class DaemonUnavailable(KvfsError, ConnectionError):
    """No daemon answers on the socket."""

    code = "unavailable"

    def __init__(self, socket_path: str, reason: str = ""):
        self.socket_path = socket_path
        msg = (
            f"no kvfs daemon at {socket_path}"
            + (f" ({reason})" if reason else "")
            + f"; start one with: kvfs daemon --socket {socket_path}"
        )
        super().__init__(msg)

    def to_wire(self) -> tuple[str, str, dict[str, Any]]:
        return (self.code, str(self), {"socket_path": self.socket_path})


class CorruptionDetected(KvfsError):
    """Stored bytes failed their checksum and no good copy could be read.
    The entry has been dropped from the index; nothing wrong was returned."""

    code = "corruption"


class PermissionDenied(KvfsError, PermissionError):
    """Refused by the trust model: this process is not admitted (its uid and
    groups are neither the daemon's user, root, nor in its --allow-uid /
    --allow-gid grants), or the right it was granted (read, write, admin)
    does not cover what it asked. The message says which; ask the operator."""

    code = "permission"


class MissingDependency(KvfsError, ImportError):
    """A feature needs an optional package (or a system library) that is not
    installed; the message names the extra to install (kvfs.optional)."""

    code = "missing_dependency"

    def __init__(self, message: str, module: str = ""):
        super().__init__(message)
        self.name = module  # ImportError's: the module that is missing


_BY_CODE: dict[str, type[KvfsError]] = {
    cls.code: cls
    for cls in (KvfsError, NotFound, InvalidKey, InvalidArgument, CapacityError,
                ProtocolError, DaemonUnavailable, CorruptionDetected, PermissionDenied, MissingDependency)
}


def from_wire(code: str, message: str, extra: dict[str, Any] | None = None) -> KvfsError:
    """Rebuild the exception the daemon raised."""
    extra = extra or {}
    cls = _BY_CODE.get(code, KvfsError)
    if cls is CapacityError:
        return CapacityError(message, needed=int(extra.get("needed", 0)),
                             capacity=int(extra.get("capacity", 0)), used=int(extra.get("used", 0)))
    if cls is DaemonUnavailable:
        err = DaemonUnavailable.__new__(DaemonUnavailable)
        Exception.__init__(err, message)
        err.socket_path = str(extra.get("socket_path", ""))
        return err
    return cls(message)

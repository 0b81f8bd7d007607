"""One owner per store root: the daemon, or an offline admin tool.

``<root>/kvfs.lock`` is held with an exclusive ``flock`` for the owner's
lifetime; the kernel drops it when the process dies (kill -9 included), so
a crashed daemon never leaves a stale lock behind.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from kvfs.errors import KvfsError, PermissionDenied


class RootLock:
    def __init__(self, root: Path, what: str) -> None:
        self.path = Path(root) / "kvfs.lock"
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except PermissionError:
            raise not_yours(Path(root), what) from None
        os.fchmod(self.fd, 0o600)  # the owner's alone, even where an older kvfs made it wider
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise KvfsError(f"{root} is in use by {holder}; stop it first ({what} needs the store alone)") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{what} (pid {os.getpid()})\n".encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1


def not_yours(root: Path, what: str) -> PermissionDenied:
    """The error for a store root this process may not open: a store is
    its daemon user's (and root's) alone, whatever the daemon grants
    others through the socket (see kvfsd.access)."""
    try:
        owner = f"uid {os.stat(root).st_uid}"
    except OSError:
        owner = "another user"
    return PermissionDenied(f"{root} belongs to {owner}: only that user or root may run {what} on it "
                            f"(you are uid {os.getuid()})")

"""The trust model (kvfsd.access) at the FUSE edge.

Without grants the mount has no ``allow_other``: the kernel admits only the
daemon's own user, and nothing here needs to run. With grants the mount is
opened to every user (``allow_other``), and each request that names a path
(lookup, getattr, opendir, open, create, mkdir, unlink, rmdir, xattrs,
statfs, access) is checked against the policy with the caller's uid and
groups; reads and writes on an open file were checked at its open. A
refusal is ``EACCES``.

The kernel caches entries and attributes for every user at once, so a
shared mount gives them no cache time: every path walk reaches the check.
Modes show the owner, and the group when a granted group is shown as the
file's group; a granted uid is admitted by the check, as a named-user ACL
entry would be, though no mode bit can show it.
"""
from __future__ import annotations

import errno
import os
from typing import Any

from . import fuse_types as ft

from .access import Policy, Right
from .peers import process_groups

W_OK, X_OK = os.W_OK, os.X_OK


class MountAccess:
    def __init__(self, policy: Policy):
        self.policy = policy
        self.shared = policy.shared
        self.uid = os.getuid()
        # the group a file shows: the granted group with the most right, if any
        best = max(policy.gids.items(), key=lambda kv: (kv[1], -kv[0]), default=None)
        self.gid = best[0] if best is not None else os.getgid()
        group_right = best[1] if best is not None else None
        self.file_mode = 0o400 | (0o040 if group_right is not None else 0)
        self.dir_mode = 0o700 | (0o050 if group_right is not None else 0) \
            | (0o020 if group_right is not None and group_right >= Right.WRITE else 0)

    def right(self, ctx: Any) -> Right | None:
        uid = ctx.uid
        gids = [ctx.gid] + (process_groups(ctx.pid) if self.policy.needs_groups(uid) else [])
        return self.policy.right_of(uid, gids)

    def require(self, ctx: Any, need: Right) -> None:
        """EACCES unless the caller holds ``need``."""
        if not self.shared or ctx is None:
            return  # only the daemon's user reaches an unshared mount (the kernel sees to it)
        have = self.right(ctx)
        if have is None or have < need:
            raise ft.FUSEError(errno.EACCES)

    def timeout(self, t: float) -> float:
        return 0.0 if self.shared else t

    def access(self, ctx: Any, is_dir: bool, writable: bool, mode: int) -> bool:
        """access(2): whether the caller could do it, as the handlers would
        decide (``writable``: a directory a file or namespace can be made in)."""
        if (mode & W_OK and not writable) or (mode & X_OK and not is_dir):
            return False  # objects and stats are immutable, nothing executes
        if not self.shared or ctx is None:
            return True
        have = self.right(ctx)
        return have is not None and have >= (Right.WRITE if mode & W_OK else Right.READ)

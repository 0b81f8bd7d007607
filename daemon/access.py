"""Who may do what: the trust model, as one pure policy every path asks.

Rights are levels, each including the ones below it:

    read   look up and read objects, list, stats, metrics
    write  read, and store new objects (put; create a file or a namespace
           in the mount)
    admin  write, and remove or rewrite what is stored (delete, evict,
           compact, verify and --repair, rm/rmdir in the mount)

The daemon's own uid and root hold ``admin``. Nobody else holds anything
unless ``--allow-uid``/``--allow-gid`` grants it; a grant names one uid or
one gid (primary or supplementary) and a right, ``write`` when none is
given. A process holds the highest right any of its ids is granted.

This module decides; the places that enforce (socket server, FUSE
handlers, metrics endpoint, file modes and ACLs in kvfsd.fileperms) only
ask it. It does no I/O except resolving user and group names.
"""
from __future__ import annotations

import enum
import grp
import pwd
from dataclasses import dataclass, field
from typing import Iterable

from kvfs import protocol as P
from kvfs.errors import InvalidArgument, PermissionDenied


class Right(enum.IntEnum):
    READ = 1
    WRITE = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()


RIGHTS = {r.label: r for r in Right}

# The right each socket op needs (test_access checks that every op in
# protocol.OPS is placed here deliberately).
OP_RIGHT: dict[str, Right] = {
    P.HELLO: Right.READ, P.LOOKUP: Right.READ, P.RELEASE: Right.READ, P.CONTAINS: Right.READ,
    P.PREFIX_MATCH: Right.READ, P.STAT: Right.READ, P.NAMESPACES: Right.READ, P.KEYS: Right.READ,
    P.STATS: Right.READ, P.TOUCH: Right.READ, P.REMOTE_HAS: Right.READ,
    # a reader's report makes the daemon re-check the object itself; only
    # bytes that fail their checksum are dropped, so it is a read
    P.REPORT_BAD: Right.READ,
    # an adapter that only reads reports its hits too; what is kept is
    # bounded (daemon.connector_stats), and it changes no stored byte
    P.REPORT: Right.READ,
    P.PUT: Right.WRITE, P.ALLOC: Right.WRITE, P.COMMIT: Right.WRITE, P.ABORT: Right.WRITE,
    P.RESERVE: Right.WRITE, P.PUT_T0: Right.WRITE,
    P.FLUSH: Right.WRITE,
    P.DELETE: Right.ADMIN, P.EVICT: Right.ADMIN, P.VERIFY: Right.ADMIN, P.COMPACT: Right.ADMIN,
    P.JOB: Right.ADMIN, P.GC_REMOTE: Right.ADMIN,
}


# what a refused op is called in the error (a put is alloc, then commit)
_ACTION = {P.ALLOC: "put", P.COMMIT: "put", P.ABORT: "put", P.RESERVE: "put", P.PUT_T0: "put",
           P.JOB: "an admin job's progress"}


def action_of(op: str) -> str:
    return _ACTION.get(op, op)


@dataclass(frozen=True)
class Grant:
    id: int
    right: Right


def parse_grant(text: str, kind: str) -> Grant:
    """``UID[:RIGHT]`` or ``NAME[:RIGHT]`` (``kind``: "uid" or "gid")."""
    name, _, right = str(text).partition(":")
    right = right or "write"
    if right not in RIGHTS:
        raise InvalidArgument(f"--allow-{kind} {text}: the right is one of {', '.join(RIGHTS)}, not {right!r}")
    if name.isdigit():
        ident = int(name)
    else:
        try:
            ident = pwd.getpwnam(name).pw_uid if kind == "uid" else grp.getgrnam(name).gr_gid
        except KeyError:
            raise InvalidArgument(f"--allow-{kind} {text}: no such {'user' if kind == 'uid' else 'group'} "
                                  f"{name!r}") from None
    return Grant(ident, RIGHTS[right])


def _merge(grants: Iterable[Grant]) -> dict[int, Right]:
    out: dict[int, Right] = {}
    for g in grants:
        out[g.id] = max(out.get(g.id, g.right), g.right)
    return out


@dataclass(frozen=True)
class Policy:
    owner: int  # the daemon's uid
    uids: dict[int, Right] = field(default_factory=dict)
    gids: dict[int, Right] = field(default_factory=dict)

    @classmethod
    def of(cls, owner: int, uid_grants: Iterable[str | Grant] = (),
           gid_grants: Iterable[str | Grant] = ()) -> "Policy":
        u = [g if isinstance(g, Grant) else parse_grant(g, "uid") for g in uid_grants]
        gr = [g if isinstance(g, Grant) else parse_grant(g, "gid") for g in gid_grants]
        return cls(owner, _merge(u), _merge(gr))

    @property
    def shared(self) -> bool:
        """Anyone besides the owner and root is admitted somewhere."""
        return bool(self.uids or self.gids)

    def right_of(self, uid: int, gids: Iterable[int] = ()) -> Right | None:
        """The right of a process with these ids; None: not admitted."""
        if uid == 0 or uid == self.owner:
            return Right.ADMIN
        best = self.uids.get(uid)
        for g in gids:
            r = self.gids.get(g)
            if r is not None and (best is None or r > best):
                best = r
        return best

    def needs_groups(self, uid: int) -> bool:
        """Whether ``right_of(uid, ...)`` can depend on the groups (the
        caller may skip looking them up otherwise)."""
        return bool(self.gids) and uid != 0 and uid != self.owner and self.uids.get(uid) != Right.ADMIN

    def refusal(self, have: Right | None, need: Right, what: str, who: str) -> PermissionDenied | None:
        """The error for doing ``what`` with ``have`` where ``need`` is
        needed; None if ``have`` covers it."""
        if have is not None and have >= need:
            return None
        if have is None:
            return PermissionDenied(f"{who} is not admitted to this kvfs store (the daemon admits its own user, "
                                    f"root and what --allow-uid/--allow-gid name)")
        return PermissionDenied(f"{what} needs the {need.label} right; {who} has {have.label} "
                                f"(the daemon grants it with --allow-uid UID:{need.label} "
                                f"or --allow-gid GID:{need.label})")

    def describe(self) -> dict[str, object]:
        """For kvfs stats: who is admitted, with which right."""
        return {"owner_uid": self.owner,
                "uids": {str(u): r.label for u, r in sorted(self.uids.items())},
                "gids": {str(g): r.label for g, r in sorted(self.gids.items())}}

"""File modes and POSIX ACLs: the trust model (kvfsd.access) on disk.

Every file and directory the daemon or an offline tool makes is the
owner's alone (mode 0600/0700, under a umask of 077). What a client of
another uid must reach itself, because the data plane bypasses the daemon,
gets one POSIX ACL entry per ``--allow-uid``/``--allow-gid`` grant, and
nothing else does:

    kind       what                                     granted entries
    PRIVATE    index, kvfs.json, lock, T0 journal,      none
               an old index kept by rebuild-index
    TRAVERSE   the root and the stripe directories      --x (open a known name;
                                                        no listing)
    SHARED_RO  location directory, generation file      r--
    DATA       segment files, the T0 arena              r-- for read, rw- for
                                                        write and admin
    SOCKET     the control socket                       rw- (connect(2) needs w)

Named-user and named-group entries are what let "exactly these users" be
enforced by the kernel on every open: modes alone know one owner and one
group. The group-owner and other entries stay empty. Without grants the ACL
is removed, so narrowing the lists and restarting revokes what an earlier
run granted (``apply`` runs on every existing file at each start).

``acl_xattr`` is pure (the Linux ``system.posix_acl_access`` format);
``FilePerms.apply`` does the I/O.
"""
from __future__ import annotations

import enum
import errno
import os
import stat
import struct
from pathlib import Path

from kvfs.errors import KvfsError
from kvfs.generation import FILE_NAME as GENERATION_FILE

from .access import Policy, Right

ACL_XATTR = "system.posix_acl_access"
_VERSION = 2
_ENTRY = struct.Struct("<HHI")
assert _ENTRY.size == 8
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_UNDEFINED = 0xFFFFFFFF
R, W, X = 4, 2, 1


class Kind(enum.Enum):
    PRIVATE = "private"
    TRAVERSE = "traverse"
    SHARED_RO = "shared_ro"
    DATA = "data"
    SOCKET = "socket"


def granted_perm(kind: Kind, right: Right) -> int:
    """The rwx bits a grant of ``right`` gives on a ``kind`` of file."""
    if kind is Kind.PRIVATE:
        return 0
    if kind is Kind.TRAVERSE:
        return X
    if kind is Kind.SHARED_RO:
        return R
    if kind is Kind.SOCKET:
        return R | W
    return R if right == Right.READ else R | W


def acl_xattr(owner_perm: int, users: dict[int, int], groups: dict[int, int]) -> bytes:
    """An access ACL: the owner's bits, one entry per named user and group
    (their bits), an empty group-owner and other, and the mask the kernel
    requires (the union of the named entries). Entries in the order the
    kernel checks for: by tag, then by id."""
    entries = [(USER_OBJ, owner_perm, _UNDEFINED)]
    entries += [(USER, p, u) for u, p in sorted(users.items())]
    entries.append((GROUP_OBJ, 0, _UNDEFINED))
    entries += [(GROUP, p, g) for g, p in sorted(groups.items())]
    mask = 0
    for _t, p, _i in entries[1:]:
        mask |= p
    entries += [(MASK, mask, _UNDEFINED), (OTHER, 0, _UNDEFINED)]
    return struct.pack("<I", _VERSION) + b"".join(_ENTRY.pack(*e) for e in entries)


def parse_acl_xattr(raw: bytes) -> list[tuple[int, int, int]]:
    """(tag, perm, id) entries of an ACL xattr (tests, kvfs doctor)."""
    if len(raw) < 4 or struct.unpack_from("<I", raw)[0] != _VERSION or (len(raw) - 4) % _ENTRY.size:
        raise ValueError("not a POSIX ACL xattr")
    return [_ENTRY.unpack_from(raw, off) for off in range(4, len(raw), _ENTRY.size)]


class FilePerms:
    def __init__(self, policy: Policy):
        self.policy = policy

    def acl_for(self, kind: Kind, is_dir: bool) -> bytes | None:
        """The ACL a ``kind`` of file gets; None: none (mode bits only)."""
        if kind is Kind.PRIVATE or not self.policy.shared:
            return None
        users = {u: granted_perm(kind, r) for u, r in self.policy.uids.items()}
        groups = {g: granted_perm(kind, r) for g, r in self.policy.gids.items()}
        return acl_xattr(7 if is_dir else 6, users, groups)

    def apply(self, target: str | os.PathLike[str] | int, kind: Kind) -> None:
        """Give ``target`` (a path, or an open descriptor) the mode and ACL
        of its kind. Raises KvfsError if the filesystem refuses ACLs while
        grants need them."""
        st = os.stat(target)
        is_dir = stat.S_ISDIR(st.st_mode)
        mode = 0o700 if is_dir else 0o600
        acl = self.acl_for(kind, is_dir)
        if acl is None:
            try:
                os.removexattr(target, ACL_XATTR)
            except OSError as e:
                if e.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                    raise
            if stat.S_IMODE(st.st_mode) != mode:
                os.chmod(target, mode)
            return
        try:
            os.setxattr(target, ACL_XATTR, acl)  # also sets the mode's bits to match
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
                where = target if not isinstance(target, int) else os.readlink(f"/proc/self/fd/{target}")
                raise KvfsError(f"--allow-uid/--allow-gid need POSIX ACLs, and the filesystem of {where} "
                                f"does not support them (mount it with the acl option, or put the stripe "
                                f"elsewhere)") from None
            raise

    def apply_tree(self, root: Path, kind: Kind, dir_kind: Kind | None = None) -> int:
        """``apply`` to every regular file directly under ``root`` (and to
        ``root`` as ``dir_kind``). Returns how many files."""
        if dir_kind is not None:
            self.apply(root, dir_kind)
        n = 0
        with os.scandir(root) as it:
            for ent in it:
                if ent.is_file(follow_symlinks=False):
                    self.apply(ent.path, kind)
                    n += 1
        return n


def apply_private_tree(perms: FilePerms, top: Path) -> None:
    """PRIVATE on a directory and everything under it (an LMDB index)."""
    perms.apply(top, Kind.PRIVATE)
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            perms.apply(os.path.join(dirpath, name), Kind.PRIVATE)


def secure_store(perms: FilePerms, root: Path, stripes: list[Path]) -> int:
    """Bring every file of a store to its kind (at each daemon start): the
    root and stripes TRAVERSE, segments DATA, the generation file SHARED_RO,
    indexes (``index``, ``index.*``) and the other regular files of the root
    PRIVATE. The socket and the /dev/shm files are made fresh each start by
    their owners, which apply their kinds then. Other entries of the root
    (a mountpoint, say) are left alone. Returns the segments seen."""
    perms.apply(root, Kind.TRAVERSE)
    n = 0
    for s in stripes:
        n += perms.apply_tree(s, Kind.DATA, Kind.TRAVERSE)
    stripe_set = {str(s) for s in stripes}
    with os.scandir(root) as it:
        for ent in it:
            if ent.path in stripe_set:
                continue
            try:
                is_index = ent.is_dir(follow_symlinks=False) and (ent.name == "index" or ent.name.startswith("index."))
                is_file = not is_index and ent.is_file(follow_symlinks=False)
            except OSError:
                continue  # not ours to judge: a dead mount of a killed daemon, say
            if is_index:
                apply_private_tree(perms, Path(ent.path))
            elif is_file:
                perms.apply(ent.path, Kind.SHARED_RO if ent.name == GENERATION_FILE else Kind.PRIVATE)
    return n

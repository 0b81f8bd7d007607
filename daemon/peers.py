"""Who is calling: the uid and groups of a peer, on each path the daemon
serves (the Unix socket, the FUSE mount, the metrics endpoint), for
kvfsd.access to decide on. Linux only, like the rest of the daemon.

Groups count whether primary or supplementary, as the kernel counts them
for the ACLs of kvfsd.fileperms, so a grant means the same on every path.
"""
from __future__ import annotations

import os
import pwd
import socket
import struct
from dataclasses import dataclass
from typing import Any, Callable

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; Python does not name it
_CRED = struct.Struct("3i")


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gids: tuple[int, ...]  # primary first

    @property
    def who(self) -> str:
        return f"pid {self.pid} uid {self.uid} gid {self.gids[0] if self.gids else '?'}"


def unix_peer(sock: Any) -> Peer:
    """The credentials the peer had when it connected (SO_PEERCRED, and
    SO_PEERGROUPS for its supplementary groups). ``sock``: a socket, or
    trio's."""
    pid, uid, gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    gids: list[int] = [gid]
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)  # CPython caps the buffer at 1024
        gids += struct.unpack(f"{len(raw) // 4}I", raw[:len(raw) // 4 * 4])
    except OSError:  # more than 256 groups, or an old kernel
        gids += process_groups(pid)
    return Peer(pid, uid, tuple(dict.fromkeys(gids)))


def process_groups(pid: int) -> list[int]:
    """The supplementary groups of a live process ([] if it is gone)."""
    if pid <= 0:
        return []
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return [int(g) for g in line.split()[1:]]
    except (OSError, ValueError):
        pass
    return []


def user_groups(uid: int) -> list[int]:
    """The groups the user database gives ``uid`` (for peers whose process
    cannot be asked: a TCP connection names only its uid)."""
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        return []
    try:
        return list(os.getgrouplist(pw.pw_name, pw.pw_gid))
    except OSError:
        return [pw.pw_gid]


def _hex_addr(host: str, port: int) -> str:
    """An IPv4 address as /proc/net/tcp writes it: little-endian hex, port hex."""
    return f"{struct.unpack('<I', socket.inet_aton(host))[0]:08X}:{port:04X}"


def tcp_peer(peer: tuple[str, int], local: tuple[str, int]) -> tuple[int, int] | None:
    """(uid, socket inode) of the other end of a loopback TCP connection:
    its socket is the one in /proc/net/tcp whose local address is ``peer``
    and remote address is ``local``. None if it is not found (gone, or not
    in this host's network namespace)."""
    want_local, want_remote = _hex_addr(*peer[:2]), _hex_addr(*local[:2])
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                cols = line.split()
                if len(cols) > 9 and cols[1] == want_local and cols[2] == want_remote:
                    return int(cols[7]), int(cols[9])
    except (OSError, ValueError, StopIteration):
        pass
    return None


def socket_owner_groups(uid: int, inode: int) -> list[int] | None:
    """The groups of the process of ``uid`` that holds socket ``inode``
    (its fds are readable to root and to the same uid), or None."""
    link = f"socket:[{inode}]"
    try:
        pids = [e for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return None
    for e in pids:
        try:
            if e.stat().st_uid != uid:
                continue
            for fd in os.scandir(f"/proc/{e.name}/fd"):
                if os.readlink(fd.path) == link:
                    with open(f"/proc/{e.name}/status") as f:
                        for line in f:
                            if line.startswith("Gid:"):
                                gids = [int(line.split()[1])]
                            elif line.startswith("Groups:"):
                                return gids + [int(g) for g in line.split()[1:]]
        except (OSError, ValueError, UnboundLocalError):
            continue
    return None


def tcp_peer_ids(peer: tuple[str, int], local: tuple[str, int],
                 want_groups: Callable[[int], bool]) -> tuple[int | None, list[int]]:
    """uid and (if ``want_groups(uid)``) groups of a loopback TCP peer: the
    groups of the process holding the socket where it can be found, else
    those the user database gives the uid."""
    found = tcp_peer(peer, local)
    if found is None:
        return None, []
    uid, inode = found
    if not want_groups(uid):
        return uid, []
    groups = socket_owner_groups(uid, inode)
    return uid, groups if groups is not None else user_groups(uid)

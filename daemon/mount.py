"""Mounting the FUSE namespace (kvfsd.fuse_ops) inside the daemon: the C
mount (kvfsd.mount_c, libfuse's low-level API on threads of its own) where
it was built, pyfuse3's (on the trio loop) where it was not.

pyfuse3 and libfuse are imported here, only when a mount is asked for, so
the daemon and the client run where libfuse is absent.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Awaitable, Callable

import trio

from kvfs.errors import KvfsError, MissingDependency
from kvfs.optional import need

log = logging.getLogger("kvfsd")

READ_AHEAD_KB = 8192


def clean_stale_mount(mountpoint: Path) -> None:
    """A daemon killed with its mount active leaves a dead FUSE mount
    ("Transport endpoint is not connected"): detach it before mounting."""
    try:
        os.statvfs(mountpoint)  # never answered from the kernel's attribute cache, unlike stat
        return
    except FileNotFoundError:
        mountpoint.mkdir(parents=True, exist_ok=True)
        return
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise
    log.warning("%s: stale mount of a dead daemon; detaching it", mountpoint)
    for cmd in (["fusermount3", "-u", "-z", str(mountpoint)], ["umount", "-l", str(mountpoint)]):
        if shutil.which(cmd[0]) and subprocess.run(cmd, capture_output=True).returncode == 0:
            return
    raise RuntimeError(f"{mountpoint} is a stale mount and could not be detached (fusermount3 -u -z {mountpoint})")


def _user_allow_other() -> bool:
    try:
        with open("/etc/fuse.conf") as f:
            return any(line.split("#")[0].strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def mount_options(policy: Any) -> set[str]:
    """The mount options of both mounts. Without grants the kernel itself
    keeps everyone but the daemon's user out (no allow_other;
    default_permissions checks the modes). With grants the mount is opened
    to other users, and the kernel's mode checks are turned off (a mode
    cannot name a list of users): KvfsOps checks each request against the
    policy the socket uses."""
    options = {"default_permissions", "fsname=kvfs", "subtype=kvfs"}
    if policy.shared:
        if os.geteuid() != 0 and not _user_allow_other():
            raise KvfsError("--allow-uid/--allow-gid share the mount through FUSE's allow_other, which a "
                            "daemon not run as root may use only with user_allow_other in /etc/fuse.conf")
        options.add("allow_other")
        options.discard("default_permissions")
    return options


async def tune_readahead(mountpoint: Path) -> None:
    """Let the kernel send large reads (and read ahead) on this mount: a
    FUSE mount's readahead is 128 KiB by default, so a 1 MiB application
    read became 8 requests. Needs root; otherwise the default stays."""
    try:
        st = await trio.to_thread.run_sync(os.stat, mountpoint)  # served by the mount itself
        path = Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb")
        await trio.to_thread.run_sync(path.write_text, f"{READ_AHEAD_KB}\n")
        log.info("read-ahead of the mount set to %d KiB", READ_AHEAD_KB)
    except OSError as e:
        log.info("read-ahead of the mount left at the kernel default (%s)", e)


class Mount:
    """The pyfuse3 mount: every request is served by KvfsOps on the trio loop."""

    impl = "pyfuse3"

    def __init__(self, engine: Any, settle: Callable[[], Awaitable[bool]], mountpoint: Path):
        pyfuse3 = need("pyfuse3")

        from .fuse_ops import KvfsOps

        self.pyfuse3 = pyfuse3
        self.mountpoint = mountpoint
        self.why = ""  # set when this mount was chosen because the C one could not be
        clean_stale_mount(mountpoint)
        policy = engine.cfg.policy
        self.ops = KvfsOps(engine, settle, policy)
        self.ops.mount_stats = self.stats
        options = mount_options(policy) | set(pyfuse3.default_options)
        try:
            pyfuse3.init(self.ops, str(mountpoint), options)
        except RuntimeError as e:  # libfuse's own words, e.g. no /dev/fuse, or not a directory
            raise KvfsError(f"cannot mount the store at {mountpoint}: {e}") from None
        self.mounted = True
        log.info("mounted the store at %s (pyfuse3)", mountpoint)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.ops.nursery = nursery
            nursery.start_soon(tune_readahead, self.mountpoint)
            await self.pyfuse3.main()
            nursery.cancel_scope.cancel()

    def stats(self) -> dict[str, Any]:
        return {"path": str(self.mountpoint), "impl": self.impl, "why": self.why, **self.ops.counters}

    def close(self) -> None:
        if self.mounted:
            self.mounted = False
            self.pyfuse3.close(unmount=True)
            log.info("unmounted %s", self.mountpoint)


MOUNT_IMPLS = ("auto", "c", "pyfuse3")


def open_mount(engine: Any, settle: Callable[[], Awaitable[bool]], mountpoint: Path, impl: str,
               threads: int) -> Any:
    """The mount ``impl`` asks for: the C one (kvfsd.mount_c), pyfuse3's,
    or (auto) the C one where it was built and pyfuse3's where it was not,
    saying why in the log and in ``kvfs stats``."""
    if impl not in MOUNT_IMPLS:
        raise KvfsError(f"--mount-impl must be one of {', '.join(MOUNT_IMPLS)}, not {impl!r}")
    why = ""
    if impl in ("auto", "c"):
        from .mount_c import CMount, c_mount_missing

        why = c_mount_missing()
        if not why:
            return CMount(engine, settle, mountpoint, threads)
        if impl == "c":
            raise MissingDependency(f"--mount-impl c: {why}", "kvfsd._cfuse")
        log.warning("the C mount is not available (%s); serving the mount with pyfuse3", why)
    m = Mount(engine, settle, mountpoint)
    m.why = why
    return m

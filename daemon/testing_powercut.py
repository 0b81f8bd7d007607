"""The power-cut simulator of the test kit: a FUSE pass-through that serves
a ``VolatileDisk`` (kvfsd.volatile_disk: the rules it models are written
there), and ``PowerCutDisk``, which mounts it, cuts the power and mounts
what survived.

``python -m kvfsd.testing_powercut BACKING MOUNTPOINT`` serves the disk.
A power cut is the SIGKILL of that process: everything it held that no
sync had written to the backing directory dies with it, and the kernel's
page cache of the mount goes with the mount. Then the caller kills the
daemon (which until then gets ENOTCONN, as from a dead disk), removes what
it had in /dev/shm (``DaemonProcess.remove_shm``: shared memory does not
outlive a power cut), and mounts again.
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .durable import fsync_file
from .volatile_disk import FsError, Node, VolatileDisk

TIMEOUT = 300.0  # every change passes through this process: the kernel's caches stay right


def _serve(backing: Path, mountpoint: Path) -> None:
    import pyfuse3
    import trio

    disk = VolatileDisk(backing)
    uid, gid = os.getuid(), os.getgid()

    def attrs(n: Node) -> Any:
        a = pyfuse3.EntryAttributes()
        a.st_ino = n.ino
        a.generation = 0
        a.entry_timeout = a.attr_timeout = TIMEOUT
        a.st_mode = n.mode
        a.st_nlink = 2 if n.entries is not None else 1
        a.st_uid, a.st_gid = uid, gid
        a.st_rdev = 0
        a.st_size = n.size
        a.st_blksize = 4096
        a.st_blocks = -(-n.size // 512)
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = n.mtime_ns
        return a

    def fs(fn: Any) -> Any:
        """Run a VolatileDisk call; its errors become FUSE replies."""
        async def wrapped(*args: Any) -> Any:
            try:
                return fn(*args)
            except FsError as e:
                raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
            except OSError as e:  # the backing directory's own (a full disk)
                raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        return wrapped

    def refuse(code: int) -> Any:
        def never(*_args: Any) -> Any:
            raise FsError(code)
        return fs(never)

    handles: dict[int, int] = {}  # fh -> inode
    counter = [0]

    def new_fh(ino: int) -> int:
        counter[0] += 1
        handles[counter[0]] = ino
        return counter[0]

    def touched(n: Node) -> Node:
        n.mtime_ns = time.time_ns()
        return n

    class Ops(pyfuse3.Operations):
        lookup = fs(lambda self, parent, name, ctx=None: attrs(disk.lookup(parent, name)))
        getattr = fs(lambda self, ino, ctx=None: attrs(disk.node(ino)))

        @fs
        def setattr(self, ino: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
            n = disk.node(ino)
            if fields.update_size:
                disk.truncate(ino, attr.st_size)
            if fields.update_mode:
                n.mode = stat.S_IFMT(n.mode) | stat.S_IMODE(attr.st_mode)
            if fields.update_mtime:
                n.mtime_ns = attr.st_mtime_ns
            return attrs(n)

        mkdir = fs(lambda self, parent, name, mode, ctx: attrs(touched(
            disk.make(parent, name, stat.S_IFDIR | stat.S_IMODE(mode)))))

        @fs
        def create(self, parent: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
            n = touched(disk.make(parent, name, stat.S_IFREG | stat.S_IMODE(mode)))
            return pyfuse3.FileInfo(fh=new_fh(n.ino), keep_cache=True), attrs(n)

        @fs
        def mknod(self, parent: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
            return attrs(touched(disk.make(parent, name, mode)))  # regular files only (R7)

        unlink = fs(lambda self, parent, name, ctx: disk.remove(parent, name, False))
        rmdir = fs(lambda self, parent, name, ctx: disk.remove(parent, name, True))

        @fs
        def rename(self, p_old: int, old: bytes, p_new: int, new: bytes, flags: int, ctx: Any) -> None:
            if flags & 2:  # RENAME_EXCHANGE
                raise FsError(errno.EINVAL)
            if flags & 1 and new in disk.node(p_new).entries:  # type: ignore[operator]  # RENAME_NOREPLACE
                raise FsError(errno.EEXIST)
            disk.rename(p_old, old, p_new, new)

        @fs
        def open(self, ino: int, flags: int, ctx: Any) -> Any:
            if flags & os.O_TRUNC:
                disk.truncate(ino, 0)
            return pyfuse3.FileInfo(fh=new_fh(ino), keep_cache=True)

        read = fs(lambda self, fh, off, size: disk.read(handles[fh], off, size))

        @fs
        def write(self, fh: int, off: int, buf: bytes) -> int:
            return disk.write(touched(disk.node(handles[fh])).ino, off, buf)

        fsync = fs(lambda self, fh, datasync: disk.fsync(handles[fh]))
        fsyncdir = fs(lambda self, fh, datasync: disk.fsyncdir(handles[fh]))
        opendir = fs(lambda self, ino, ctx: new_fh(disk.node(ino).ino))

        @fs
        def readdir(self, fh: int, start: int, token: Any) -> None:
            ents = sorted(disk.node(handles[fh]).entries.items())  # type: ignore[union-attr]
            for i, (name, ino) in enumerate(ents[start:], start + 1):
                if not pyfuse3.readdir_reply(token, name, attrs(disk.nodes[ino]), i):
                    break

        release = fs(lambda self, fh: handles.pop(fh, None) and None)
        releasedir = release
        flush = fs(lambda self, fh: None)
        forget = fs(lambda self, inodes: None)

        @fs
        def statfs(self, ctx: Any) -> Any:
            v = disk.statfs()
            s = pyfuse3.StatvfsData()
            for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                      "f_favail", "f_namemax"):
                setattr(s, f, getattr(v, f))
            return s

        # refused (R7): no xattrs, hard links or symlinks
        getxattr = removexattr = refuse(errno.ENODATA)
        setxattr = refuse(errno.ENOTSUP)
        link = symlink = refuse(errno.EPERM)
        listxattr = fs(lambda self, ino, ctx: [])

    async def names_on_signal() -> None:
        """SIGUSR1: commit every directory's entries (a cut "with names"
        follows), then say so in ``names-committed``. Between requests."""
        with trio.open_signal_receiver(signal.SIGUSR1) as signals:
            async for _sig in signals:
                tear = backing / "tear"
                if tear.exists():  # SIGUSR1 with a name: tear that file's next fsync instead
                    disk.tear = tear.read_bytes()
                    tear.unlink()
                else:
                    disk.commit_names()
                (backing / "names-committed").write_text("1")

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(names_on_signal)
            await pyfuse3.main()
            n.cancel_scope.cancel()

    pyfuse3.init(Ops(), str(mountpoint), set(pyfuse3.default_options) | {"fsname=powercut", "subtype=powercut"})
    try:
        trio.run(main)
    finally:
        pyfuse3.close(unmount=True)


def _detach(mountpoint: Path) -> None:
    for cmd in (["fusermount3", "-u", "-z", str(mountpoint)], ["umount", "-l", str(mountpoint)]):
        if shutil.which(cmd[0]) and subprocess.run(cmd, capture_output=True).returncode == 0:
            return


def usable() -> str | None:
    """Why the simulator cannot run here, or None."""
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        return "pyfuse3 is not installed"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if os.geteuid() != 0:
        return "FUSE mounts of the test kit need root"
    return None


class PowerCutDisk:
    """A mount of the simulator at ``mountpoint`` whose durable state lives
    in ``backing``. ``cut()`` loses everything not synced; ``mount()``
    again serves what survived."""

    def __init__(self, backing: Path, mountpoint: Path) -> None:
        self.backing = Path(backing)
        self.mountpoint = Path(mountpoint)
        self.proc: subprocess.Popen[bytes] | None = None

    def mount(self, timeout: float = 20.0) -> "PowerCutDisk":
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.backing.mkdir(parents=True, exist_ok=True)
        log = open(self.backing.parent / f"{self.backing.name}-fuse.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "kvfsd.testing_powercut", str(self.backing),
                                     str(self.mountpoint)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the power-cut simulator exited with {self.proc.returncode}")
            if os.path.ismount(self.mountpoint):
                try:
                    os.statvfs(self.mountpoint)
                    return self
                except OSError:
                    pass
            time.sleep(0.02)
        raise TimeoutError("the power-cut simulator did not mount")

    def _signal_and_wait(self) -> None:
        assert self.proc is not None
        flag = self.backing / "names-committed"
        flag.unlink(missing_ok=True)
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 20
        while not flag.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        if not flag.exists():
            raise TimeoutError("the power-cut simulator did not answer")

    def cut(self, names: bool = False) -> None:
        """The power goes: the simulator dies with everything unsynced.
        ``names``: every directory's entries reach the disk first, as
        ext4's periodic journal commit may put them there (R6)."""
        if names and self.proc is not None and self.proc.poll() is None:
            self._signal_and_wait()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        _detach(self.mountpoint)

    def tear_next_fsync(self, name: str) -> None:
        """The next fsync of a file called ``name`` writes only its lowest
        unsynced range, and the power goes (kvfsd.volatile_disk, R6)."""
        assert self.proc is not None
        (self.backing / "tear").write_bytes(name.encode())
        self._signal_and_wait()

    def wait_dead(self, timeout: float) -> bool:
        """Wait for a torn fsync to have cut the power; False if none came."""
        assert self.proc is not None
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    fsync_path = staticmethod(fsync_file)  # a file or directory on the mount, as a careful tool does

    def __enter__(self) -> "PowerCutDisk":
        return self.mount()

    def __exit__(self, *exc: object) -> None:
        self.cut()


if __name__ == "__main__":
    _serve(Path(sys.argv[1]), Path(sys.argv[2]))

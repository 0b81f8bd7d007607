"""Test kit: run a real daemon process on a temporary store.

    with DaemonProcess(tmp_path, stripes=3) as d:
        store = d.connect()

Used by the test suite, the benchmark and the demo. The daemon is a real
subprocess (real socket, real LMDB, real files), so ``kill()`` is a real
``kill -9``.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import kvfs


class DaemonProcess:
    def __init__(self, root: str | os.PathLike[str], *, stripes: int | list[str] = 1,
                 capacity: str | int | None = None, durability: str = "fast", shm_size: str | int | None = "256M",
                 extra: list[str] | None = None, log: str | os.PathLike[str] | None = None,
                 mount: str | os.PathLike[str] | None = None, shm_dir: str | os.PathLike[str] | None = None,
                 socket: str | os.PathLike[str] | None = None):
        self.root = Path(root)
        self.socket = Path(socket) if socket is not None else self.root / "kvfs.sock"
        if isinstance(stripes, int):
            self.stripes = [str(self.root / f"stripe{i}") for i in range(stripes)]
        else:
            self.stripes = [str(s) for s in stripes]
        self.capacity = capacity
        self.durability = durability
        self.shm_size = shm_size  # T0 arena; 0: none; None: the daemon's default
        self.mount = Path(mount) if mount is not None else None
        self.shm_dir = Path(shm_dir) if shm_dir is not None else None  # None: the daemon's default, /dev/shm
        self.extra = list(extra or [])
        self.log_path = Path(log) if log else self.root.parent / f"{self.root.name}-daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        a = [sys.executable, "-m", "kvfstools.cli", "daemon", "--root", str(self.root),
             "--socket", str(self.socket), "--durability", self.durability]
        for s in self.stripes:
            a += ["--stripe", s]
        if self.capacity is not None:
            a += ["--capacity", str(self.capacity)]
        if self.shm_size is not None:
            a += ["--shm-size", str(self.shm_size)]
        if self.mount is not None:
            a += ["--mount", str(self.mount)]
        if self.shm_dir is not None:
            a += ["--shm-dir", str(self.shm_dir)]
        return a + self.extra

    def start(self, timeout: float = 30.0) -> "DaemonProcess":
        self.root.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv(), stdout=logf, stderr=subprocess.STDOUT)
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(str(self.socket))
                if self.mount is None or (os.path.ismount(self.mount) and _mount_answers(self.mount)):
                    return self  # listening (and mounted, if asked)
            except OSError:
                pass
            time.sleep(0.02)
        raise TimeoutError(f"daemon did not listen within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except FileNotFoundError:
            return ""

    def connect(self, **kw: Any) -> kvfs.Store:
        return kvfs.connect(str(self.socket), **kw)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: a clean shutdown."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout)
        return self.proc.returncode

    def kill(self) -> None:
        """kill -9: a crash."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> "DaemonProcess":
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        return self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> "DaemonProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.stop(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.remove_shm()
        if self.mount is not None:
            # a killed daemon leaves a dead mount behind (a restart would detach it)
            from kvfsd.mount import clean_stale_mount
            try:
                clean_stale_mount(self.mount)
            except (OSError, RuntimeError):
                pass

    def remove_shm(self) -> None:
        """Remove what a killed daemon left in /dev/shm (arena, directory,
        T0 journal). A restart on the same root would use or remove them;
        a test's root is never started again."""
        from kvfsd.arena import SHM_DIR, arena_path
        a = arena_path(self.root.absolute(), self.shm_dir.absolute() if self.shm_dir else SHM_DIR)
        from kvfsd.t0journal import rewrite_path
        j = a.with_suffix(".journal")
        for p in (a, a.with_suffix(".dir"), j, rewrite_path(j)):
            p.unlink(missing_ok=True)


def _mount_answers(path: Path) -> bool:
    """The mount at ``path`` is served (statfs is never answered from a
    cache, unlike a stale mount's cached root attributes)."""
    try:
        os.statvfs(path)
        return True
    except OSError:
        return False

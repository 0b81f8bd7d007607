"""The C mount: libfuse's low-level API on worker threads of its own
(kvfsd._cfuse, native/cfuse*.c), inside the daemon process.

- Object reads are served in C, without the GIL: each chunk is read and
  verified whole into a buffer of the open file (or checked in place in
  the leased arena), then replied from there; several workers serve the
  kernel's read-ahead requests at once.
- New files' writes are served in C too: each lands at its reserved place
  in T1 from the request's buffer and is hashed as it arrives.
- Every other request goes to the same handlers as pyfuse3's mount
  (kvfsd.fuse_ops), run on the daemon's trio loop (kvfsd.cfuse_bridge).

Stopping: the workers are stopped from a worker thread of trio, so a
worker in the middle of a Python request can still finish it on the loop.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any, Awaitable, Callable

import trio

from kvfs.errors import KvfsError

from .mount import clean_stale_mount, mount_options, tune_readahead

log = logging.getLogger("kvfsd")

# Workers mostly wait (for the disk, or for Python on the loop), so more
# of them than cores: 4 readers of cold files through 4 workers on 2 cores
# got 0.41-0.51 x plain readers, through 8 0.52-0.73 x
DEFAULT_THREADS = 8


def c_mount_missing() -> str:
    """Why the C mount cannot be used here ("" if it can)."""
    try:
        importlib.import_module("kvfsd._cfuse")
    except ImportError as e:
        return (f"kvfsd._cfuse did not import ({e}); it is built when kvfs is installed where pkg-config finds "
                "libfuse3: apt install fuse3 libfuse3-dev pkg-config, then reinstall kvfs")
    return ""


class CMount:
    impl = "c"

    def __init__(self, engine: Any, settle: Callable[[], Awaitable[bool]], mountpoint: Path,
                 threads: int = DEFAULT_THREADS) -> None:
        from .cfuse_bridge import Bridge
        from .fuse_ops import KvfsOps

        self.cfuse = _cfuse = importlib.import_module("kvfsd._cfuse")
        self.mountpoint = mountpoint
        self.threads = threads or DEFAULT_THREADS
        self.why = ""
        clean_stale_mount(mountpoint)
        policy = engine.cfg.policy
        self.ops = KvfsOps(engine, settle, policy)
        self.ops.mount_stats = self.stats
        self.bridge = Bridge(self.ops, _cfuse.DIRENTPLUS_BASE, _cfuse.WriteState)
        try:
            self.cm: Any = _cfuse.Mount(str(mountpoint), ",".join(sorted(mount_options(policy))), self.bridge)
        except RuntimeError as e:  # libfuse's own words are on stderr above it
            raise KvfsError(f"cannot mount the store at {mountpoint}: {e}") from None
        self.closed = False
        log.info("mounted the store at %s (C mount, %d threads)", mountpoint, self.threads)

    async def run(self) -> None:
        self.bridge.token = trio.lowlevel.current_trio_token()
        try:
            async with trio.open_nursery() as nursery:
                self.ops.nursery = nursery
                self.cm.start(self.threads)
                nursery.start_soon(tune_readahead, self.mountpoint)
                await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                # off the loop: a worker finishing a Python request needs it
                await trio.to_thread.run_sync(self._close)

    def stats(self) -> dict[str, Any]:
        c = self.cfuse.counters()
        py = self.ops.counters
        return {"path": str(self.mountpoint), "impl": self.impl, "why": self.why, "threads": self.threads,
                **py, "reads": c["reads"] + py["reads"], "read_bytes": c["read_bytes"] + py["read_bytes"],
                "writes": c["writes"] + py["writes"], "write_bytes": c["write_bytes"] + py["write_bytes"],
                "chunks_loaded": c["chunks_loaded"] + py["chunks_loaded"],
                **{k: c[k] for k in ("writes_direct", "chunks_private", "t0_chunks_verified", "bad_chunks", "python_calls")}}

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.cm.close()
            log.info("unmounted %s", self.mountpoint)

    def close(self) -> None:
        """After run (which closes), or when run never started."""
        self._close()

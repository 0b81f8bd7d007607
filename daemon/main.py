"""Run the daemon: open the engine, serve the socket, shut down cleanly on
SIGTERM/SIGINT (the index is synced and closed before the process exits)."""
from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import trio

from kvfs.errors import MissingDependency
from kvfs.optional import need

from .config import Config
from .engine import Engine
from .sd_notify import notify
from .server import Server
from .threadnames import name_os_thread

log = logging.getLogger("kvfsd")


async def _serve(server: Server, mountpoint: Path | None) -> None:
    mount = None
    try:
        if mountpoint is not None:
            from .mount import open_mount  # libfuse only when a mount is asked for
            # before the nursery, so a mount that fails is one clear error,
            # not a group of them; requests wait until mount.run serves them
            cfg = server.engine.cfg
            mount = open_mount(server.engine, server.settle, mountpoint, cfg.mount_impl, cfg.mount_threads)
            server.mount_stats = mount.stats
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve)
                if mount is not None:
                    nursery.start_soon(mount.run)
                print(f"kvfs daemon ready: socket {server.socket_path} (pid {os.getpid()})"
                      + (f", mounted at {mountpoint}" if mountpoint else ""), file=sys.stderr, flush=True)
                notify("READY=1")  # Type=notify units: started
                async for sig in signals:
                    log.info("signal %d: shutting down", sig)
                    notify("STOPPING=1")
                    nursery.cancel_scope.cancel()
                    break
    finally:
        if mount is not None:
            mount.close()  # unmount on SIGTERM (a kill -9 leaves it to the next start)


def run(cfg: Config) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s kvfsd %(levelname)s %(message)s")
    # Whatever the daemon creates is its user's alone unless kvfsd.fileperms
    # grants more (a file made without an explicit mode stays private too).
    os.umask(0o077)
    name_os_thread("kvfsd")  # the main thread runs the event loop; ps and top show the daemon as kvfsd
    # what the asked features need, before any work (one line each if missing)
    if cfg.mount is not None:
        from .mount_c import c_mount_missing

        why = c_mount_missing()
        if cfg.mount_impl == "c" and why:
            raise MissingDependency(f"--mount-impl c: {why}", "kvfsd._cfuse")
        if cfg.mount_impl == "pyfuse3" or (cfg.mount_impl == "auto" and why):
            need("pyfuse3")
    if cfg.metrics_port is not None:
        need("prometheus_client")
    if cfg.remote is not None:
        need("obstore")
        if cfg.remote.presence:
            need("hiredis")
    cfg.resolve()
    engine = Engine(cfg)
    rep = engine.recovery
    log.info("store %s: %d stripe(s), capacity %d bytes, %s mode; recovery %.3fs, %d objects",
             cfg.root, len(cfg.stripes), engine.capacity, cfg.durability, rep.seconds, len(engine.lru))
    if engine.remote is not None:
        r = engine.remote
        log.info("shared tier: %s (endpoint %s, credentials: %s), presence index %s", r.cfg.url,
                 r.cfg.endpoint or "AWS", r.bucket.credential_source, r.cfg.presence or "none (HEAD requests)")
    assert cfg.socket is not None
    server = Server(engine, cfg.socket)
    metrics = None
    try:
        if cfg.metrics_port is not None:
            from .metrics import serve_prometheus  # prometheus-client only when asked for
            metrics = serve_prometheus(cfg.metrics_port, server.snapshot, cfg.policy)
            log.info("Prometheus metrics on http://127.0.0.1:%d/metrics", cfg.metrics_port)
        trio.run(_serve, server, cfg.mount)
    finally:
        if metrics is not None:
            metrics.shutdown()
        engine.close()
        log.info("index committed; bye")
    return 0

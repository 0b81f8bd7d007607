"""Run the daemon: open the engine, serve the socket, shut down cleanly on
SIGTERM/SIGINT (the index is synced and closed before the process exits)."""
from __future__ import annotations

import logging
import signal
import sys

import trio

from .config import Config
from .engine import Engine
from .server import Server

log = logging.getLogger("kvfsd")


async def _serve(server: Server) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            print(f"kvfs daemon ready: socket {server.socket_path} (pid {__import__('os').getpid()})",
                  file=sys.stderr, flush=True)
            async for sig in signals:
                log.info("signal %d: shutting down", sig)
                nursery.cancel_scope.cancel()
                break


def run(cfg: Config) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s kvfsd %(levelname)s %(message)s")
    cfg.resolve()
    engine = Engine(cfg)
    rep = engine.recovery
    log.info("store %s: %d stripe(s), capacity %d bytes, %s mode; recovery %.3fs, %d objects",
             cfg.root, len(cfg.stripes), engine.capacity, cfg.durability, rep.seconds, len(engine.lru))
    assert cfg.socket is not None
    server = Server(engine, cfg.socket, cfg.socket_mode)
    try:
        trio.run(_serve, server)
    finally:
        engine.close()
        log.info("index committed; bye")
    return 0

"""systemd's readiness protocol (sd_notify(3)) without libsystemd: under a
unit of Type=notify, systemd names a datagram socket in $NOTIFY_SOCKET
and waits for "READY=1" before it counts the service as started (and for
"STOPPING=1" when it stops). Elsewhere this does nothing."""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("kvfsd")


def notify(state: str) -> bool:
    """Send ``state`` (e.g. "READY=1") to systemd; False if not under it."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):  # an abstract socket
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError as e:
        log.warning("could not tell systemd %r at $NOTIFY_SOCKET (%s)", state, e)
        return False

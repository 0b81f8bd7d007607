"""OS names for the daemon's threads.

Python names its threads for itself only: every thread of the daemon shows
as ``python`` in ``top -H`` and ``/proc/PID/task/*/comm``, so which thread
spends the CPU could only be guessed. ``name_os_thread`` gives the calling
thread's OS task a name (Linux keeps 15 bytes of it). The event loop runs
on the main thread, whose name is also the process's in ``ps`` and
``top``: ``kvfsd``. The benchmarks read these names to split the daemon's
CPU time by thread (kvfstools.bench_puts).
"""
from __future__ import annotations

import ctypes
import threading

PR_SET_NAME = 15
_libc: ctypes.CDLL | None = None


def name_os_thread(name: str | None = None) -> None:
    """Name the calling OS thread ``name`` (default: its Python name).
    Best effort: where the call is missing, nothing changes."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols, libc's among them (no ldconfig run)
        raw = (name or threading.current_thread().name).encode()[:15]
        _libc.prctl(PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0)
    except (OSError, AttributeError):
        pass

"""Engine adapters' counters, per namespace (op ``report``; ``kvfs stats``).

A vLLM or LMCache adapter knows what the daemon cannot: how many prompt
tokens it looked up and hit, how long its loads took, how many saves it
dropped. It reports the growth of its counters; the daemon adds them up
per namespace (one namespace is one model fingerprint) and shows them.

What is kept is bounded whatever clients send: at most MAX_NAMESPACES
namespaces (the least recently reported goes first), MAX_COUNTERS names of
at most 40 characters each, values that are non-negative integers. They
live in memory only and start again at zero with the daemon, as the
daemon's own counters do.
"""
from __future__ import annotations

import re
import threading
import time
from collections import Counter, OrderedDict
from typing import Any

from kvfs.errors import InvalidArgument
from kvfs.keys import normalize_ns

MAX_NAMESPACES = 256
MAX_COUNTERS = 32
MAX_VALUE = 1 << 62
_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")


class ConnectorStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_ns: OrderedDict[str, tuple[Counter[str], float]] = OrderedDict()

    def add(self, ns: Any, counters: Any) -> bool:
        """Add one report; a malformed one is refused whole (InvalidArgument)."""
        ns = normalize_ns(ns)
        if not isinstance(counters, dict) or len(counters) > MAX_COUNTERS:
            raise InvalidArgument(f"counters must be a map of at most {MAX_COUNTERS} names to integers")
        for k, v in counters.items():
            if not isinstance(k, str) or not _NAME.fullmatch(k):
                raise InvalidArgument(f"counter name {k!r}: lower-case letters, digits and _, at most 40")
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < MAX_VALUE:
                raise InvalidArgument(f"counter {k!r}: a non-negative integer below 2**62")
        with self._lock:
            cur, _ = self._by_ns.pop(ns, (Counter(), 0.0))
            if len(set(cur) | set(counters)) > MAX_COUNTERS:
                raise InvalidArgument(f"namespace {ns!r} already has {len(cur)} counters (at most {MAX_COUNTERS})")
            for k, v in counters.items():
                cur[k] = min(MAX_VALUE, cur[k] + v)
            self._by_ns[ns] = (cur, time.time())
            while len(self._by_ns) > MAX_NAMESPACES:
                self._by_ns.popitem(last=False)
        return True

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {ns: {"counters": dict(c), "reported_at": at} for ns, (c, at) in self._by_ns.items()}

"""The client's cache of object locations.

Objects are immutable and segment ids are never reused, so a location the
daemon once gave for a key names that key's bytes for as long as the
segment file exists; once it is unlinked, an open fails and the client asks
the daemon again. What a cache could get wrong is only *visibility of
removals*: a deleted or evicted key must not keep reading. The daemon bumps
a shared removal generation (kvfs.generation) after every unpublishing
commit; the cache empties itself whenever that counter has moved, and an
entry is only added if the counter did not move while it was being looked
up. Reads from the cache still verify checksums (unless verification is
off), and hits are reported to the daemon in batches so its LRU stays true.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from .generation import GenerationReader


class LocationCache:
    def __init__(self, gen: GenerationReader, limit: int = 65536):
        self.gen = gen
        self.limit = limit
        self._lock = threading.Lock()
        self._d: OrderedDict[tuple[str, str], list[Any]] = OrderedDict()
        self._seen = gen.value

    def generation(self) -> int:
        return self.gen.value

    def _check(self) -> None:
        v = self.gen.value
        if v != self._seen:
            self._d.clear()
            self._seen = v

    def get_many(self, ns: str, keys: list[str]) -> dict[int, list[Any]]:
        """Cached locations of ``keys`` by index."""
        out: dict[int, list[Any]] = {}
        with self._lock:
            self._check()
            d = self._d
            if not d:
                return out
            for i, k in enumerate(keys):
                item = d.get((ns, k))
                if item is not None:
                    out[i] = item
        return out

    def put_many(self, ns: str, pairs: list[tuple[str, list[Any]]], gen_before: int) -> None:
        """Remember locations from a lookup that started at ``gen_before``."""
        with self._lock:
            self._check()
            if self._seen != gen_before:
                return  # a removal raced with the lookup: trust nothing from it
            d = self._d
            for k, item in pairs:
                d[(ns, k)] = item
            while len(d) > self.limit:
                d.popitem(last=False)

    def drop(self, ns: str, key: str) -> None:
        with self._lock:
            self._d.pop((ns, key), None)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()

    def __len__(self) -> int:
        return len(self._d)

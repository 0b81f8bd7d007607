"""Metadata: is it stored (``contains``, ``prefix_match``), what is it
(``stat``), what is there (listings), and holds (leases a caller keeps).

Invariants:
- ``contains`` and ``prefix_match`` are answered from the shared location
  directory (kvfs.directory) with no round trip while the daemon that made
  it keeps it; a key the directory cannot settle (full, or a slot kept
  changing) is asked of the daemon; so an answer is never wrong, only
  slower;
- a thread's own puts sent with ``wait=False`` are drained before it reads
  the directory: it sees its own writes.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from . import protocol as P
from .connection import Connection
from .directory import ABSENT as DIR_ABSENT
from .directory import DirectoryReader
from .directory import PRESENT as DIR_PRESENT
from .directory import SLOW as DIR_SLOW
from .directory import UNKNOWN as DIR_UNKNOWN
from .errors import DaemonUnavailable, InvalidKey
from .keys import normalize_key, normalize_keys, normalize_ns
from .session import Session
from .store_state import BATCH_KEYS

log = logging.getLogger("kvfs")


@dataclass(frozen=True)
class ObjectInfo:
    ns: str
    key: str
    size: int
    checksum: str  # xxh3-128 hex of the whole value
    meta: dict[str, Any] | None
    tier: str
    extents: list[tuple[str, int, int]]  # (segment path, payload offset, length)
    created: float
    last_access: float


class Hold:
    """What ``Store.hold`` returns: for each key, where its bytes are
    (``items``: the daemon's wire form, ``[size, checksum, seq, extents,
    t0?]`` with extents ``[stripe, segment, offset, length, chunk sum]``,
    or None for a miss), pinned by one lease until ``release()``."""

    def __init__(self, store: "Session", conn: Connection, ns: str, keys: list[str],
                 items: list[list[Any] | None], lease: int):
        self.store, self._conn, self.ns, self.keys, self.items, self.lease = store, conn, ns, keys, items, lease

    @property
    def found(self) -> list[bool]:
        return [it is not None for it in self.items]

    def release(self) -> None:
        """End the lease (at most once; never raises)."""
        lease, self.lease = self.lease, 0
        if lease:
            self.store._end_hold(self._conn, lease)

    def __enter__(self) -> "Hold":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Lookups(Session):
    def contains(self, keys: Sequence[str | bytes], *, ns: str = "default", remote: bool = True) -> list[bool]:
        """Whether each key is stored. Answered from the shared location
        directory with no round trip (kvfs.directory); only keys it cannot
        settle (it is full, or a slot kept changing) are asked of the daemon.
        With a shared tier (``kvfs daemon --remote``) the keys missing here
        are then asked of it in one call (its presence index), unless
        ``remote=False``: a key held there counts as stored, since a get
        reads it through."""
        ns = normalize_ns(ns)
        out = self._contains_local(keys, ns)
        if remote and self.remote_tier and not all(out):
            miss = [i for i, hit in enumerate(out) if not hit]
            for i, hit in zip(miss, self._contains_asked(normalize_keys([keys[i] for i in miss]), ns, P.REMOTE_HAS)):
                out[i] = bool(hit)
        return out

    def _contains_local(self, keys: Sequence[str | bytes], ns: str) -> list[bool]:
        d = self._live_dir(keys)
        try:
            token = d.complete() if d is not None else None
            fast = d.contains(ns, keys if isinstance(keys, list) else list(keys)) if d is not None else None
            complete = d is not None and d.still_complete(token)
        except ValueError:  # closed under us by a reconnect to a restarted daemon
            fast = None
        if fast is None:
            return self._contains_asked(normalize_keys(keys), ns)
        out, seen = fast
        if seen & (1 << DIR_SLOW):  # keys C did not take: the exact rules, key by key
            got = self._dir_states(ns, keys)
            if got is None:
                return self._contains_asked(normalize_keys(keys), ns)
            states, complete = got
            out = [st == DIR_PRESENT for st in states]
            seen = sum(1 << st for st in set(states) if st != DIR_PRESENT)
        ask = []
        if seen & (1 << DIR_UNKNOWN) or (seen & (1 << DIR_ABSENT) and not complete):
            ask = [i for i, hit in enumerate(out) if not hit]
        if ask:
            for i, hit in zip(ask, self._contains_asked(normalize_keys([keys[i] for i in ask]), ns)):
                out[i] = hit
        return out

    def prefix_match(self, keys: Sequence[str | bytes], *, ns: str = "default", remote: bool = True) -> int:
        """How many of ``keys``, from the first, are all stored (the leading
        run of hits). From the directory, as ``contains``; with a shared
        tier the run goes on through what it holds (one call), unless
        ``remote=False``."""
        ns = normalize_ns(ns)
        n = self._prefix_local(keys, ns)
        if remote and self.remote_tier and n < len(keys):
            n += self._prefix_asked(normalize_keys(keys[n:]), ns, P.REMOTE_HAS, {"prefix": True})
        return n

    def _prefix_local(self, keys: Sequence[str | bytes], ns: str) -> int:
        got = self._dir_states(ns, keys)
        if got is None:
            return self._prefix_asked(normalize_keys(keys), ns)
        states, complete = got
        n = 0
        for st in states:
            if st != DIR_PRESENT:
                break
            n += 1
        if n == len(states) or (states[n] == DIR_ABSENT and complete):
            return n
        return n + self._prefix_asked(normalize_keys(keys[n:]), ns)

    def _dir_states(self, ns: str, keys: Sequence[str | bytes]) -> tuple[bytes | bytearray, bool] | None:
        """Each key's state in the directory (DIR_*), and whether the
        directory held every resident object from before the probe began
        until it ended (kvfs.directory's reader rule: a key stored before
        this call and outside the table is then seen as incomplete, never
        as absent). None: no directory here."""
        d = self._live_dir(keys)
        if d is None:
            return None
        ks = keys if isinstance(keys, list) else list(keys)
        try:
            token = d.complete()
            states: bytes | bytearray = d.probe(ns, ks)
        except ValueError:  # closed under us by a reconnect to a restarted daemon
            return None
        if DIR_SLOW in states:  # keys C did not take: kvfs.keys' exact rules (raises for a bad key)
            states = bytearray(states)
            for i, st in enumerate(states):
                if st == DIR_SLOW:
                    states[i] = d.holds(ns, normalize_key(ks[i]))
        try:
            return states, d.still_complete(token)
        except ValueError:
            return states, False

    def _live_dir(self, keys: Any) -> DirectoryReader | None:
        """The directory, if there is one and its daemon still keeps it
        (else None: ask, and reconnect to, the daemon)."""
        if isinstance(keys, (str, bytes)):
            raise InvalidKey("expected a list of keys, got a single key")
        if self._dir is None:
            return None
        own: Connection | None = getattr(self._local, "conn", None)
        if own is not None and own.deferred:
            own.drain()  # this thread's puts sent without waiting are published: it sees its own writes
        self._check_restart()  # a restarted daemon has a new directory
        d = self._dir
        return d if d is not None and d.kept() else None

    def _contains_asked(self, ks: list[str], ns: str, op: str = P.CONTAINS) -> list[bool]:
        """Asked of the daemon, in batches: of its store (CONTAINS), or of its
        shared tier (REMOTE_HAS)."""
        out: list[bool] = []
        for i in range(0, len(ks), BATCH_KEYS * 4):
            out += self._call(op, {"ns": ns, "keys": ks[i:i + BATCH_KEYS * 4]})
        return out

    def _prefix_asked(self, ks: list[str], ns: str, op: str = P.PREFIX_MATCH,
                      extra: dict[str, Any] | None = None) -> int:
        """As ``_contains_asked``, the leading run (PREFIX_MATCH, or REMOTE_HAS
        with ``{"prefix": True}``)."""
        n = 0
        step = BATCH_KEYS * 4
        for i in range(0, len(ks), step):
            got = self._call(op, {"ns": ns, "keys": ks[i:i + step], **(extra or {})})
            n += got
            if got < len(ks[i:i + step]):
                break
        return n

    def stat(self, key: str | bytes, *, ns: str = "default") -> ObjectInfo:
        r = self._call(P.STAT, {"ns": normalize_ns(ns), "key": normalize_key(key)})
        return ObjectInfo(r["ns"], r["key"], r["size"], r["checksum"],
                          json.loads(r["meta"]) if r["meta"] else None, r["tier"],
                          [tuple(x) for x in r["extents"]], r["created"], r["last_access"])

    def hold(self, keys: Sequence[str | bytes], *, ns: str = "default") -> "Hold":
        """Pin ``keys`` where they are now and say where that is: until the
        hold is released, eviction passes them over and no segment holding
        their bytes is unlinked (compaction waits). For callers that move
        the bytes themselves (NIXL descriptors) or must know a later read
        will find them (LMCache's lookup-and-lock). One round trip; any
        thread may release it. A hold also ends when the daemon's lease
        timeout (``lease_timeout``, 30 s by default) passes, or with this
        store."""
        ns = normalize_ns(ns)
        ks = normalize_keys(keys)
        with self._hold_lock:
            c = self._hold_connection()
            try:
                res = c.call(P.LOOKUP, {"ns": ns, "keys": ks})
            except DaemonUnavailable:
                if not c.answered:
                    raise
                c = self._hold_connection()  # cut after it worked (a restart): once more on a new one
                res = c.call(P.LOOKUP, {"ns": ns, "keys": ks})
        return Hold(self, c, ns, ks, list(res["items"]), int(res["lease"] or 0))

    def namespaces(self) -> list[str]:
        return list(self._call(P.NAMESPACES, {}))

    def keys(self, ns: str = "default", *, page: int = 10000, after: str | None = None) -> Iterator[str]:
        """Every key of ``ns`` in order (those past ``after`` if given)."""
        ns = normalize_ns(ns)
        while True:
            r = self._call(P.KEYS, {"ns": ns, "after": after, "limit": page})
            yield from r["keys"]
            if not r["more"] or not r["keys"]:
                return
            after = r["keys"][-1]

    def objects(self, ns: str = "default", *, page: int = 10000, after: str | None = None
                ) -> Iterator[dict[str, Any]]:
        """Every object of ``ns`` in key order (past ``after`` if given), as
        {key, size, tier, created} (what ``kvfs ls --long`` and ``kvfs du`` show)."""
        ns = normalize_ns(ns)
        while True:
            r = self._call(P.KEYS, {"ns": ns, "after": after, "limit": page, "long": True})
            for key, size, tier, created in r["objects"]:
                yield {"key": key, "size": size, "tier": tier, "created": created}
            if not r["more"] or not r["keys"]:
                return
            after = r["keys"][-1]

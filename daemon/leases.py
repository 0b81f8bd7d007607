"""The lease table (pure: no I/O, no threads; the engine guards it with its lock).

A lease pins what one lookup returned: the objects (so eviction passes them
over) and the segments their bytes live in (so no segment is unlinked while
a client may still be reading it). Invariant: a segment whose lease count
is above zero is never unlinked. Leases end when the client releases them,
when its connection closes, or ``timeout`` seconds after they were granted.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Hashable, Iterable


@dataclass
class Lease:
    owner: Hashable
    expires: float
    segs: tuple[int, ...]
    objs: tuple[bytes, ...]


@dataclass
class LeaseTable:
    timeout: float = 30.0
    _next: int = 1
    _leases: dict[int, Lease] = field(default_factory=dict)
    _by_owner: dict[Hashable, set[int]] = field(default_factory=dict)
    _seg_count: Counter[int] = field(default_factory=Counter)
    _obj_count: Counter[bytes] = field(default_factory=Counter)
    # objects whose last lease ended since the owner last drained this list
    # (T0 frees deferred extents of such objects: kvfsd.tier0)
    unpinned: list[bytes] = field(default_factory=list)

    def grant(self, owner: Hashable, segs: Iterable[int], objs: Iterable[bytes], now: float) -> int:
        lid = self._next
        self._next += 1
        lease = Lease(owner, now + self.timeout, tuple(set(segs)), tuple(set(objs)))
        self._leases[lid] = lease
        self._by_owner.setdefault(owner, set()).add(lid)
        self._seg_count.update(lease.segs)
        self._obj_count.update(lease.objs)
        return lid

    def release(self, lid: int, owner: Hashable | None = None) -> list[int]:
        """End one lease; returns segments that are no longer leased at all.
        A lease of another owner is left alone (a client can end only its own)."""
        lease = self._leases.get(lid)
        if lease is None or (owner is not None and lease.owner != owner):
            return []
        del self._leases[lid]
        ids = self._by_owner.get(lease.owner)
        if ids is not None:
            ids.discard(lid)
            if not ids:
                del self._by_owner[lease.owner]
        freed = []
        for s in lease.segs:
            self._seg_count[s] -= 1
            if self._seg_count[s] <= 0:
                del self._seg_count[s]
                freed.append(s)
        for o in lease.objs:
            self._obj_count[o] -= 1
            if self._obj_count[o] <= 0:
                del self._obj_count[o]
                self.unpinned.append(o)
        return freed

    def release_owner(self, owner: Hashable) -> list[int]:
        freed: list[int] = []
        for lid in list(self._by_owner.get(owner, ())):
            freed += self.release(lid)
        return freed

    def expire(self, now: float) -> list[int]:
        freed: list[int] = []
        for lid in [lid for lid, l in self._leases.items() if l.expires <= now]:
            freed += self.release(lid)
        return freed

    def take_unpinned(self) -> list[bytes]:
        out, self.unpinned = self.unpinned, []
        return out

    def seg_leased(self, seg: int) -> bool:
        return self._seg_count.get(seg, 0) > 0

    def obj_leased(self, obj: bytes) -> bool:
        return self._obj_count.get(obj, 0) > 0

    @property
    def leased_objects(self) -> Counter[bytes]:
        """The objects a lease pins now, a live view (its keys are exactly
        those: a count that reaches 0 is deleted). Read it only."""
        return self._obj_count

    def __len__(self) -> int:
        return len(self._leases)

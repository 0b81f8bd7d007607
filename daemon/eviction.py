"""Choosing what to evict (pure).

Disk space comes back only when a whole segment is dead, so eviction walks
objects from least to most recently used, skipping leased ones, and counts a
segment as freed once every record in it belongs to a victim. It stops when
the projected usage falls to the target. If even evicting every candidate
would not reach the target it evicts nothing: destroying cache that cannot
make the room asked for helps nobody. (Compaction, which moves live records
out of mostly-dead segments, closes the gap for scattered survivors.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence


@dataclass
class Victims:
    objects: list[bytes]
    segments: list[int]  # segments that become fully dead
    freed: int  # bytes those segments occupy


def choose_victims(
    lru: Iterable[tuple[bytes, Sequence[tuple[int, int]]]],  # oldest first: (objkey, [(seg, span)])
    seg_live: dict[int, int],
    seg_size: dict[int, int],
    usage: int,
    target: int,
    evictable: Callable[[bytes], bool],
    seg_reclaimable: Callable[[int], bool],
) -> Victims:
    if usage <= target:
        return Victims([], [], 0)
    live: dict[int, int] = {}
    objs: list[bytes] = []
    dead_segs: list[int] = []
    freed = 0
    for ok, spans in lru:
        if not evictable(ok):
            continue
        objs.append(ok)
        for seg, span in spans:
            left = live.get(seg, seg_live.get(seg, 0)) - span
            live[seg] = left
            if left <= 0 and seg_reclaimable(seg) and seg not in dead_segs:
                dead_segs.append(seg)
                freed += seg_size.get(seg, 0)
        if usage - freed <= target:
            return Victims(objs, dead_segs, freed)
    return Victims([], [], 0)

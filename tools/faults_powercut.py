"""The fault campaign's power cuts (`kvfs faults --only powercut`).

The daemon runs with its whole store root (index, stripes, kvfs.json,
generation) on the test kit's power-cut simulator (kvfsd.testing_powercut:
a FUSE file system that keeps what no fsync has written in a volatile
layer; the rules it models are in kvfsd.volatile_disk), its T0 arena and
journal in /dev/shm. Under the crash loop's mixed load (sync and fast
puts, deletes, batched reads, compaction, and puts then evictions of a
namespace of their own) the power goes at a random moment: the simulator
drops everything unsynced, the daemon is killed, /dev/shm loses the
daemon's files, and the store is mounted and started again. Per
durability mode (the cuts take turns: plain, "with names", and a torn index
sync; ``CUT_KINDS``):

- ``sync``: every acknowledged put (all are sync) is there, byte-exact;
- ``fast``: every acknowledged ``sync=True`` put is there; a lost fast
  put was acknowledged less than ``bound_s`` before the cut (the daemon's
  sync interval plus one sync round and T0's write-back, ``FAST_SLACK_S``);
- both: no read returns wrong bytes; the daemon starts on its own (or
  names ``kvfs rebuild-index``, which is then run and must restore all);
  no read finds a corrupt object (what recovery accepted was synced or
  checked); ``kvfs verify --deep`` at the end finds nothing broken.
"""
from __future__ import annotations

import random
import re
import statistics
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .fault_worker import NS, value_of

if TYPE_CHECKING:
    from kvfsd.testing_powercut import PowerCutDisk
from .faults import _check, _compact_quietly, _env, _Workers

SYNC_INTERVAL_S = 2.0  # the daemon's default --sync-interval
# a fast put is committed by T0's write-back (milliseconds behind, here)
# and made durable by the first sync round that starts after its commit:
# one that may start up to SYNC_INTERVAL_S later, behind one that is running
FAST_SLACK_S = 1.0
EVICT_NS = "evictme"
# the cuts, in turn (kvfsd.volatile_disk, R6): everything unsynced lost;
# every directory's entries on disk first (ext4's journal commits them on
# its own); the index's next sync torn (its lowest dirty page written, then
# the power goes: a meta page ahead of its tree, where nothing orders them)
CUT_KINDS = ("plain", "names", "torn")


def _torn(disk: "PowerCutDisk") -> bool:
    disk.tear_next_fsync("data.mdb")
    return disk.wait_dead(3 * SYNC_INTERVAL_S)


def _evict_quietly(sock: Path, stop: threading.Event, counts: list[int]) -> None:
    """Puts into a namespace of its own and evicts it, over and over (the
    namespace the checks read is never evicted: an eviction is a loss by
    design). ``counts`` gets the objects each eviction removed."""
    import kvfs
    try:
        with kvfs.connect(sock) as s:
            n = 0
            while not stop.is_set():
                keys = [f"ev{n}-{i}" for i in range(6)]
                n += 1
                s.put_many(keys, [value_of(k) for k in keys], ns=EVICT_NS)
                counts.append(s.evict(0, ns=EVICT_NS)["objects"])
                stop.wait(0.2)
    except (kvfs.KvfsError, OSError):
        pass  # the power went


def _one_mode(work: Path, mode: str, cuts: int, seed: int) -> dict[str, Any]:
    import kvfs
    from kvfsd.rebuild import rebuild_index
    from kvfsd.testing import DaemonProcess
    from kvfsd.testing_powercut import PowerCutDisk

    rng = random.Random(seed)
    failures: list[str] = []
    disk = PowerCutDisk(work / "backing", work / "disk")
    d = DaemonProcess(work / "disk" / "store", stripes=2, capacity="64G", shm_size="128M", durability=mode,
                      socket=work / "kvfs.sock", log=work / "daemon.log",
                      extra=["--stripe-unit", "128K", "--segment-size", "16M", "--compact-at", "0.0002",
                             "--compact-threshold", "0.3", "--sync-interval", str(SYNC_INTERVAL_S)])
    must: list[str] = []  # acknowledged puts that must survive every cut
    lost_keys: dict[str, int] = {}  # such a put found missing: the cut after which it was
    last_fast: list[tuple[str, float]] = []  # fast puts acknowledged in the cycle the last cut ended
    maybe_deleted: set[str] = set()
    cut_at = 0.0
    acked = lost_fast = wrong = checked = rebuilds = evicted = done_cuts = corrupt = 0
    lost_ages: list[float] = []
    kinds = {k: 0 for k in CUT_KINDS}
    recovery: list[float] = []
    restart: list[float] = []
    compacted: list[int] = []
    bound = SYNC_INTERVAL_S + FAST_SLACK_S
    ver: dict[str, Any] = {"broken_count": -1}
    with _env(KVFS_COMPACT_CHECK_S="0.5"):
        try:
            for cycle in range(cuts + 1):
                disk.mount()
                t = time.monotonic()
                try:
                    d.start(timeout=120)
                except RuntimeError as e:
                    if "kvfs rebuild-index" not in str(e):
                        failures.append(f"the daemon did not start after cut {cycle}: {str(e)[-300:]}")
                        break
                    rebuild_index(d.root)
                    rebuilds += 1
                    d.start(timeout=120)
                restart.append(time.monotonic() - t)
                with d.connect() as s:
                    recovery.append(s.stats()["recovery"]["seconds"])
                    for k in [k for k in must if k not in maybe_deleted and k not in lost_keys]:
                        checked += 1
                        try:
                            wrong += s.get(k, ns=NS) != value_of(k)
                        except kvfs.NotFound:
                            lost_keys[k] = cycle  # counted once: not checked again after later cuts
                    for k, when in last_fast:
                        if k in maybe_deleted:
                            continue
                        checked += 1
                        try:
                            wrong += s.get(k, ns=NS) != value_of(k)
                        except kvfs.NotFound:
                            lost_fast += 1
                            lost_ages.append(cut_at - when)
                    if cycle == cuts:
                        ver = s.verify_store(deep=True)
                        corrupt += s.stats()["counters"].get("corrupt_dropped", 0)
                        break
                w = _Workers(d.socket, ["sync", "fast", "churn", "fast"], seed + cycle)
                stop = threading.Event()
                ev_counts: list[int] = []
                helpers = [threading.Thread(target=_compact_quietly, args=(d.socket, compacted), daemon=True),
                           threading.Thread(target=_evict_quietly, args=(d.socket, stop, ev_counts), daemon=True)]
                for h in helpers:
                    h.start()
                time.sleep(rng.uniform(0.5, 3.0))
                with d.connect() as s:
                    # what reads found corrupt since the start: nothing that
                    # recovery accepted may be (it was synced, or checked)
                    corrupt += s.stats()["counters"].get("corrupt_dropped", 0)
                kind = CUT_KINDS[cycle % len(CUT_KINDS)]
                if kind == "torn" and not _torn(disk):
                    kind = "plain"  # no index sync came: an ordinary cut
                kinds[kind] += 1
                cut_at = time.monotonic()
                disk.cut(names=kind == "names")  # the power goes: what was not synced is gone ...
                d.kill()  # ... with every process
                done_cuts += 1
                stop.set()
                w.wait()
                for h in helpers:
                    h.join(30)
                d.remove_shm()  # /dev/shm does not outlive the power
                evicted += sum(ev_counts)
                wrong += len(w.keys("bad"))
                syncs = w.acks("ack-sync")
                fasts = w.acks("ack-fast")
                acked += len(syncs) + len(fasts)
                must += [k for k, _t in syncs] + ([k for k, _t in fasts] if mode == "sync" else [])
                last_fast = fasts if mode == "fast" else []
                maybe_deleted.update(w.keys("del?"))
            d.stop()
        finally:
            if d.proc is not None and d.proc.poll() is None:
                d.kill()
            d.remove_shm()
            disk.cut()
    _check(failures, not lost_keys, f"{len(lost_keys)} acknowledged {'puts' if mode == 'sync' else 'sync puts'} lost "
                                    f"(key: found missing after cut N: {dict(list(lost_keys.items())[:5])})")
    _check(failures, wrong == 0, f"{wrong} reads returned wrong bytes")
    late = [a for a in lost_ages if a > bound]
    _check(failures, not late, f"{len(late)} fast puts lost that were acknowledged more than {bound:.1f} s before "
                               f"the cut (oldest {max(late, default=0):.2f} s)")
    # An object a read finds corrupt is dropped, never served; but none may
    # be there to find: recovery checks every record no sync covered (a
    # SEALED row means the segment was synced whole), so what it keeps is
    # whole, fast puts included. "unreadable": a read that met the dead
    # disk after a cut, not bad bytes.
    dropped = [k for k, why in re.findall(rf"corrupt object {NS}/(\S+) \(chunk \d+\): dropped \((.*)\)",
                                          d.log_path.read_text(errors="replace")) if "unreadable" not in why]
    _check(failures, not dropped, f"reads found {len(dropped)} objects corrupt that recovery had kept: {dropped[:5]}")
    _check(failures, ver["broken_count"] == 0, f"verify --deep found {ver['broken_count']} broken objects")
    return {"failures": failures, "cuts": done_cuts, "acked": acked, "must_survive": len(must),
            "reads_checked": checked, "lost_must": len(lost_keys), "lost_fast": lost_fast,
            "oldest_lost_fast_s": max(lost_ages, default=0.0), "bound_s": bound, "wrong_bytes": wrong,
            "rebuilds": rebuilds, "corrupt_found": corrupt, "corrupt_after_recovery": len(dropped), "cut_kinds": kinds, "evicted": evicted, "compactions_finished": len(compacted),
            "recovery_s": {"median": statistics.median(recovery), "max": max(recovery)},
            "restart_s": {"median": statistics.median(restart), "max": max(restart)}}


def power_cut(work: Path, cuts: int = 20, seed: int = 11) -> dict[str, Any]:
    """``cuts`` power cuts per durability mode (see the module's text)."""
    from kvfsd.testing_powercut import usable
    why = usable()
    if why is not None:
        return {"ok": None, "skipped": why}
    modes = {mode: _one_mode(work / mode, mode, cuts, seed) for mode in ("sync", "fast")}
    failures = [f"{m}: {f}" for m, r in modes.items() for f in r.pop("failures")]
    return {"ok": not failures, "failures": failures, "modes": modes}

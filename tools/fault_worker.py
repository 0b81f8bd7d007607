"""A client process of the fault campaign (``python -m kvfstools.fault_worker
SOCKET ROLE ID SEED [SECONDS]``). It runs its role until SECONDS pass or
the daemon goes away, and reports on stdout, one line per event, flushed:

  ack-sync KEY T / ack-fast KEY T   a put the daemon acknowledged, at
                                T (time.monotonic(): one clock for every process)
  del? KEY                      a delete about to be sent (it may take effect unacknowledged)
  del KEY                       a delete the daemon acknowledged
  bad KEY                       a get returned bytes other than KEY's value
  op NAME SECONDS               one operation's latency (role "load")
  done N                        it stopped on its own after N operations

Every value is a function of its key (``value_of``), so any reader can tell
right bytes from wrong ones. Roles: ``sync`` (puts with sync=True, reads
back), ``fast`` (plain puts and batched reads), ``churn`` (puts then
deletes its own keys, reads others), ``load`` (a mix of all, timed).
"""
from __future__ import annotations

import random
import sys
import time

import xxhash

NS = "faults"


def value_of(key: str) -> bytes:
    """The bytes every put of ``key`` stores: 4 KiB to 516 KiB, from the key."""
    h = xxhash.xxh3_64_intdigest(key.encode())
    n = 4096 + h % (512 << 10)
    block = xxhash.xxh3_128_digest(key.encode()) * 64  # 1 KiB
    return (block * (n // len(block) + 1))[:n]


def main(argv: list[str]) -> int:
    import kvfs

    sock, role, wid, seed = argv[0], argv[1], int(argv[2]), int(argv[3])
    seconds = float(argv[4]) if len(argv) > 4 else 1e9
    rng = random.Random(seed)
    out = sys.stdout
    mine: list[str] = []
    seen: list[str] = []  # acknowledged by this worker, not deleted
    n = 0
    end = time.monotonic() + seconds

    def emit(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    def check(store: "kvfs.Store", key: str) -> None:
        try:
            if store.get(key, ns=NS) != value_of(key):
                emit(f"bad {key}")
        except kvfs.NotFound:
            pass  # deleted or evicted: a miss is allowed, wrong bytes are not

    def timed(name: str, fn: object) -> None:
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        if role == "load":
            emit(f"op {name} {time.perf_counter() - t:.6f}")
    try:
        with kvfs.connect(sock) as store:
            while time.monotonic() < end:
                n += 1
                key = f"{role}{wid}-{seed}-{n}"
                r = rng.random()
                if role in ("sync", "fast") or (role in ("churn", "load") and r < 0.4):
                    sync = role == "sync" or (role == "load" and r < 0.05)
                    timed("put", lambda: store.put(key, value_of(key), ns=NS, sync=sync))
                    emit(f"ack-{'sync' if sync else 'fast'} {key} {time.monotonic():.6f}")
                    mine.append(key)
                    seen.append(key)
                elif role in ("churn", "load") and r < 0.6 and mine:
                    victim = mine.pop(rng.randrange(len(mine)))
                    emit(f"del? {victim}")
                    timed("delete", lambda: store.delete([victim], ns=NS))
                    emit(f"del {victim}")
                    seen.remove(victim)
                elif seen:
                    batch = rng.sample(seen, min(8, len(seen)))
                    outs = [bytearray(len(value_of(k))) for k in batch]

                    def many() -> None:
                        sizes = store.get_many_into(batch, outs, ns=NS)
                        for k, sz, o in zip(batch, sizes, outs):
                            if sz >= 0 and bytes(o[:sz]) != value_of(k):
                                emit(f"bad {k}")
                    timed("get_many", many)
                if role != "load" and seen and rng.random() < 0.3:
                    check(store, rng.choice(seen))
    except (kvfs.KvfsError, OSError) as e:
        emit(f"down {type(e).__name__}")  # the daemon was killed under us (the crash loop's point)
        return 0
    emit(f"done {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

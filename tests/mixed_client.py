"""A client process for the concurrency test: puts its own keys and the
shared keys, reads everything back with verification, reports errors."""
import random
import sys

import kvfs
from helpers import value_for

sock, me, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(me)
store = kvfs.connect(sock)
bad = 0
mine = [me * 100000 + i for i in range(n)]
shared = list(range(n))  # every client puts the same shared keys: immutability decides
for i in rng.sample(mine + shared, len(mine + shared)):
    store.put(f"k{i}", value_for(i, 2_000_000))
    j = rng.choice(mine + shared)
    try:
        if store.get(f"k{j}") != value_for(j, 2_000_000):
            bad += 1
    except kvfs.NotFound:
        pass  # not written yet by its owner
keys = [f"k{i}" for i in mine + shared]
outs = [bytearray(2_000_000) for _ in keys]
sizes = store.get_many_into(keys, outs)
for i, sz, out in zip(mine + shared, sizes, outs):
    if sz < 0 or bytes(out[:sz]) != value_for(i, 2_000_000):
        bad += 1
print(bad)

"""A client process for crash tests: puts key i = value_for(i) forever and
prints each key once its put was acknowledged."""
import sys

import kvfs
from helpers import value_for

sock, start = sys.argv[1], int(sys.argv[2])
store = kvfs.connect(sock)
i = start
while True:
    try:
        store.put(f"k{i}", value_for(i))
    except kvfs.KvfsError:
        break
    print(i, flush=True)
    i += 1

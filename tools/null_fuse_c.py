"""A filesystem that accepts writes and discards them, in C
(native/cfuse_null.c), served by the C mount's own workers
(kvfsd._cfuse): the kernel's FUSE round trip and libfuse's copy of each
request, with nothing stored. No libfuse write path, the C mount's
included, can beat it on the machine it runs on: `kvfs bench --fuse` runs
it beside the mount, in the same run, as the mount's write ceiling.

    python -m kvfstools.null_fuse_c MOUNTPOINT     (runs until unmounted)
"""
from __future__ import annotations

import importlib
import os
import sys
import time


def main() -> None:
    mountpoint = sys.argv[1]
    cfuse = importlib.import_module("kvfsd._cfuse")
    m = cfuse.Mount(mountpoint, "fsname=kvfs-null-c", None)
    m.start(4)
    try:
        while os.path.ismount(mountpoint):  # until fusermount3 -u
            time.sleep(0.1)
    finally:
        m.close()


if __name__ == "__main__":
    main()

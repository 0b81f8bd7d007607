"""`kvfs get NS KEY FILE`: write an object's bytes to FILE ("-": stdout)."""
from __future__ import annotations

import argparse
import os
import sys

from .cli import add_socket_arg


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("get", help="write NS/KEY to FILE")
    add_socket_arg(p)
    p.add_argument("ns")
    p.add_argument("key")
    p.add_argument("file", help='path, or "-" for standard output')
    return p


def run(args: argparse.Namespace) -> int:
    import kvfs

    with kvfs.connect(args.socket) as store:
        data = store.get(args.key, ns=args.ns)
    if args.file == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        tmp = f"{args.file}.kvfs-tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, args.file)
    return 0

"""`kvfs put NS KEY FILE`: store a file's bytes ("-" reads standard input)."""
from __future__ import annotations

import argparse
import mmap
import sys

from .cli import add_socket_arg


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("put", help="store FILE as NS/KEY")
    add_socket_arg(p)
    p.add_argument("ns")
    p.add_argument("key")
    p.add_argument("file", help='path, or "-" for standard input')
    return p


def run(args: argparse.Namespace) -> int:
    import kvfs

    with kvfs.connect(args.socket) as store:
        if args.file == "-":
            data: object = sys.stdin.buffer.read()
            created = store.put(args.key, data, ns=args.ns)
        else:
            with open(args.file, "rb") as f:
                try:
                    data = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
                except ValueError:  # empty file
                    data = b""
                created = store.put(args.key, data, ns=args.ns)
    print("stored" if created else "already there", file=sys.stderr)
    return 0

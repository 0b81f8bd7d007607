"""`kvfs ls [NS]`: list namespaces, or the keys of one namespace."""
from __future__ import annotations

import argparse

from .cli import add_socket_arg


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("ls", help="list namespaces, or the keys in NS")
    add_socket_arg(p)
    p.add_argument("ns", nargs="?", help="namespace")
    return p


def run(args: argparse.Namespace) -> int:
    import kvfs

    with kvfs.connect(args.socket) as store:
        names = store.namespaces() if args.ns is None else store.keys(args.ns)
        for name in names:
            print(name)
    return 0
